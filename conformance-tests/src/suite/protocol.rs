//! The protocol's basics: config's JSON, exit codes and the exit code file,
//! stage names, and hooks releasing the job log.

use std::time::Duration;

use berth_runner_imitation::runner::Exit;

use super::case::{expect_exit, tail, Case};
use super::{Check, CheckOutcome, Finding, Level, Needs, Target};

pub(super) const CONFIG_JSON: Check = Check {
    id: "config.json",
    level: Level::Must,
    statement: "config prints one JSON object naming the driver, with absolute builds/cache dirs",
    protocol: "3",
    needs: Needs::Nothing,
    run: config_json,
};

fn config_json(target: &Target) -> CheckOutcome {
    let mut case = Case::new(target)?;
    let result = case.config()?;
    let text = String::from_utf8_lossy(&result.stdout);
    let value: serde_json::Value =
        serde_json::from_str(text.trim()).map_err(|e| format!("config output is not JSON ({e}): {text:?}"))?;
    if !value.is_object() {
        return Err(Finding::Fail(format!("config output is not a JSON object: {text:?}")));
    }
    let driver = &case.job.config.driver;
    let Some(driver) = driver else { return Err("config output names no driver".into()) };
    if driver.name != target.description.name || driver.version != target.description.version {
        return Err(Finding::Fail(format!(
            "config names driver {} {}, the backend describes itself as {} {}",
            driver.name, driver.version, target.description.name, target.description.version
        )));
    }
    for (key, dir) in [("builds_dir", &case.job.config.builds_dir), ("cache_dir", &case.job.config.cache_dir)] {
        match dir {
            Some(dir) if dir.starts_with('/') => {}
            other => return Err(Finding::Fail(format!("config's {key} must be an absolute path, got {other:?}"))),
        }
    }
    case.finish()
}

pub(super) const STAGE_UNKNOWN_NAME: Check = Check {
    id: "stage.unknown-name",
    level: Level::Must,
    statement: "run accepts stage names it does not know",
    protocol: "4",
    needs: Needs::Nothing,
    run: unknown_stage,
};

fn unknown_stage(target: &Target) -> CheckOutcome {
    let mut case = Case::new(target)?;
    case.prepare()?;
    let result = case.run("step_berth_future_stage", "true\n");
    expect_exit(&result, &Exit::Success, "a stage with a name unknown today")?;
    case.finish()
}

pub(super) const HOOK_RELEASES_LOG: Check = Check {
    id: "hook.releases-log",
    level: Level::Must,
    statement: "prepare, run and cleanup close the job log when they exit",
    protocol: "4",
    needs: Needs::Nothing,
    run: log_released,
};

fn log_released(target: &Target) -> CheckOutcome {
    let mut case = Case::new(target)?;
    let mut results = vec![case.prepare()?];
    results.push(case.run("build_script", "true\n"));
    results.push(case.cleanup());
    for result in &results {
        match result.log_released_after {
            Some(after) if after < Duration::from_secs(1) => {}
            Some(after) => return Err(Finding::Fail(format!("{} kept the job log open {after:?} after exiting", result.hook.name()))),
            None => {
                return Err(Finding::Fail(format!(
                    "{} exited but its stdout/stderr stayed open (a process it left holds the job log; gitlab-runner would hang)",
                    result.hook.name()
                )))
            }
        }
    }
    case.finish()
}

pub(super) const STAGE_BACKGROUND_PROCESS: Check = Check {
    id: "stage.background-process",
    level: Level::Must,
    statement: "a background process left by a stage does not hold the job log",
    protocol: "4",
    needs: Needs::ExecutesScripts,
    run: background_process,
};

fn background_process(target: &Target) -> CheckOutcome {
    let mut case = Case::new(target)?;
    case.prepare()?;
    let result = case.run("build_script", "(sleep 20; echo berth-late-output) &\necho berth-started\n");
    expect_exit(&result, &Exit::Success, "a stage that leaves a background process")?;
    match result.log_released_after {
        Some(after) if after < Duration::from_secs(2) => {}
        _ => return Err("a background process left by the stage kept the job log open".into()),
    }
    if !result.output().contains("berth-started") {
        return Err(Finding::Fail(format!("the stage's output is missing: {:?}", result.output())));
    }
    case.finish()
}

pub(super) const EXIT_SUCCESS: Check = Check {
    id: "exit.success",
    level: Level::Must,
    statement: "a script exiting 0 makes run exit 0 without BUILD_EXIT_CODE_FILE",
    protocol: "5",
    needs: Needs::ExecutesScripts,
    run: exit_success,
};

fn exit_success(target: &Target) -> CheckOutcome {
    let mut case = Case::new(target)?;
    case.prepare()?;
    let result = case.run("build_script", "true\n");
    expect_exit(&result, &Exit::Success, "a script that exits 0")?;
    if case.job.build_exit_code_file().exists() {
        return Err("BUILD_EXIT_CODE_FILE was written for a successful script".into());
    }
    case.finish()
}

pub(super) const EXIT_CODES: Check = Check {
    id: "exit.codes",
    level: Level::Must,
    statement: "a script exiting 1/42/255 gives the build failure code and that code in BUILD_EXIT_CODE_FILE",
    protocol: "5",
    needs: Needs::ExecutesScripts,
    run: exit_codes,
};

fn exit_codes(target: &Target) -> CheckOutcome {
    let mut case = Case::new(target)?;
    case.prepare()?;
    for code in [1, 42, 255] {
        let result = case.run("build_script", &format!("exit {code}\n"));
        expect_exit(&result, &Exit::Build { code, from_file: true }, &format!("a script that exits {code}"))?;
    }
    case.finish()
}

pub(super) const EXIT_CODES_FROM_ENV: Check = Check {
    id: "exit.codes-from-env",
    level: Level::Must,
    statement: "exit codes follow BUILD_FAILURE_EXIT_CODE from the environment",
    protocol: "5",
    needs: Needs::ExecutesScripts,
    run: exit_codes_from_env,
};

fn exit_codes_from_env(target: &Target) -> CheckOutcome {
    let mut case = Case::new(target)?;
    case.driver.exit_codes = (77, 78);
    case.prepare()?;
    let result = case.run("build_script", "exit 3\n");
    if result.status != Some(77) {
        return Err(Finding::Fail(format!(
            "with BUILD_FAILURE_EXIT_CODE=77, a script exiting 3 made the hook exit {:?} instead of 77\n{}",
            result.status,
            tail(&result.output())
        )));
    }
    expect_exit(&result, &Exit::Build { code: 3, from_file: true }, "a script that exits 3")?;
    case.finish()
}
