//! The four hooks called by hand, with the environment gitlab-runner sets.

use std::path::Path;
use std::process::Command;

use crate::util::*;

#[test]
fn config_prints_json_naming_the_driver() {
    let env = Env::new(DRY_RUN);
    let job = env.job("job");
    let out = job.hook(&env, "demo", &["config"]);
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["driver"]["name"], "dry-run");
    assert_eq!(json["driver"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(json["builds_dir"], "/builds");
    assert_eq!(json["cache_dir"], "/cache");
}

#[test]
fn runner_toml_overrides_builds_and_cache_dirs() {
    let env =
        Env::new("[runners.demo]\nbackend = \"dry-run\"\nbuilds_dir = \"/srv/builds\"\ncache_dir = \"/srv/cache\"\n");
    let out = env.job("job").hook(&env, "demo", &["config"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["builds_dir"], "/srv/builds");
    assert_eq!(json["cache_dir"], "/srv/cache");
}

#[test]
fn a_stage_set_to_fail_with_42_records_42_and_exits_with_the_build_failure_code() {
    let env = Env::new(DRY_RUN_FAIL_42);
    let job = env.job("job");
    assert!(job.hook(&env, "fail42", &["prepare"]).status.success());
    let script = job.script("script", "echo hi\n");
    let out = job.hook(&env, "fail42", &["run", script.to_str().unwrap(), "build_script"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(job.exit_code_file()).unwrap().trim(), "42");
    // Other stages succeed.
    std::fs::remove_file(job.exit_code_file()).unwrap();
    let out = job.hook(&env, "fail42", &["run", script.to_str().unwrap(), "after_script"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!job.exit_code_file().exists());
    assert!(job.hook(&env, "fail42", &["cleanup"]).status.success());
}

#[test]
fn a_script_that_really_exits_42_records_42() {
    let env = Env::new(HOST);
    let job = env.job("job");
    let out = job.hook(&env, "host", &["prepare"]);
    assert!(out.status.success(), "{}", text(&out));
    let script = job.script("script", "echo about to fail\nexit 42\n");
    let out = job.hook(&env, "host", &["run", script.to_str().unwrap(), "build_script"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("about to fail"));
    assert_eq!(std::fs::read_to_string(job.exit_code_file()).unwrap(), "42\n");
    assert!(job.hook(&env, "host", &["cleanup"]).status.success());
}

#[test]
fn exit_codes_follow_the_runners_environment() {
    let env = Env::new(HOST);
    let mut job = env.job("job");
    job.env.push(("BUILD_FAILURE_EXIT_CODE".into(), "17".into()));
    job.env.push(("SYSTEM_FAILURE_EXIT_CODE".into(), "18".into()));
    assert!(job.hook(&env, "host", &["prepare"]).status.success());
    let script = job.script("script", "exit 3\n");
    let out = job.hook(&env, "host", &["run", script.to_str().unwrap(), "build_script"]);
    assert_eq!(out.status.code(), Some(17), "{}", text(&out));
    let out = job.hook(&env, "host", &["run", "/nonexistent/script", "build_script"]);
    assert_eq!(out.status.code(), Some(17), "bash reports a missing script as exit 127: {}", text(&out));
    assert_eq!(std::fs::read_to_string(job.exit_code_file()).unwrap().trim(), "127");
    assert!(job.hook(&env, "host", &["cleanup"]).status.success());
}

#[test]
fn a_broken_config_file_is_a_system_failure_naming_file_and_key() {
    let env =
        Env::new("[runners.demo]\nbackend = \"dry-run\"\n[runners.demo.settings]\nfail_stagee = \"build_script\"\n");
    let job = env.job("job");
    for hook in [&["config"][..], &["prepare"], &["cleanup"]] {
        let out = job.hook(&env, "demo", hook);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let message = text(&out);
        assert!(message.contains(env.config().to_str().unwrap()), "{message}");
        assert!(message.contains("runners.demo.settings.fail_stagee"), "{message}");
        assert!(message.contains("line 5"), "{message}"); // line 1 is state_dir
    }
    std::fs::write(env.config(), "[runners.demo\nbackend = \"dry-run\"\n").unwrap();
    let out = job.hook(&env, "demo", &["config"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("line 1"), "{}", text(&out));
}

#[test]
fn a_missing_config_file_says_how_to_fix_it() {
    let env = Env::new(DRY_RUN);
    let job = env.job("job");
    let out = std::process::Command::new(BERTH)
        .args(["--config", "/nonexistent/berth.toml", "prepare"])
        .envs(job.env.iter().cloned())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("/nonexistent/berth.toml") && text(&out).contains("--config"), "{}", text(&out));
}

#[test]
fn cleanup_twice_in_a_row_succeeds_and_leaves_nothing() {
    let env = Env::new(HOST);
    let job = env.job("job");
    assert!(job.hook(&env, "host", &["prepare"]).status.success());
    assert!(env.state().join("jobs/host-48151623").is_dir());
    for _ in 0..2 {
        let out = job.hook(&env, "host", &["cleanup"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    assert_eq!(std::fs::read_dir(env.state().join("jobs")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(env.state().join("host-test")).unwrap().count(), 0);
}

#[test]
fn run_without_prepare_is_a_system_failure_that_leaves_nothing() {
    let env = Env::new(HOST);
    let job = env.job("job");
    let script = job.script("script", "true\n");
    let out = job.hook(&env, "host", &["run", script.to_str().unwrap(), "build_script"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("has no environment"), "{}", text(&out));
    assert_eq!(std::fs::read_dir(env.state().join("jobs")).unwrap().count(), 0);
}

#[test]
fn without_a_payload_the_job_id_must_be_numeric() {
    let env = Env::new(DRY_RUN);
    let mut job = env.job("job");
    job.env.retain(|(k, _)| k != "JOB_RESPONSE_FILE" && k != "CUSTOM_ENV_CI_JOB_ID");
    job.env.push(("CUSTOM_ENV_CI_JOB_ID".into(), "../../etc".into()));
    let out = job.hook(&env, "demo", &["prepare"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("no job identity"), "{}", text(&out));
    assert!(!env.state().join("jobs").exists() || std::fs::read_dir(env.state().join("jobs")).unwrap().count() == 0);
}

#[test]
fn test_fixture_backends_need_the_test_switch() {
    let env = Env::new(HOST);
    let job = env.job("job");
    let out = env
        .berth("host")
        .env_remove("BERTH_ALLOW_TEST_BACKENDS")
        .arg("config")
        .envs(job.env.iter().cloned())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("test fixture"), "{}", text(&out));
}

#[test]
fn sigterm_stops_a_running_stage_promptly() {
    let env = Env::new(HOST);
    let job = env.job("job");
    assert!(job.hook(&env, "host", &["prepare"]).status.success());
    let script = job.script("script", "sleep 30\n");
    let mut child = env
        .berth("host")
        .args(["run", script.to_str().unwrap(), "build_script"])
        .envs(job.env.iter().cloned())
        .current_dir(&job.tmp)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let started = std::time::Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_eq!(status.code(), Some(1), "a cancelled stage is a build failure, not retried");
    assert!(job.hook(&env, "host", &["cleanup"]).status.success());
}

#[test]
fn gitlab_config_names_every_hook_with_config_and_runner() {
    let env = Env::new(DRY_RUN);
    let out = env.berth("demo").args(["gitlab-config", "--berth", "/usr/local/bin/berth"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let block: toml::Table = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let runner = &block["runners"].as_array().unwrap()[0];
    assert_eq!(runner["executor"].as_str(), Some("custom"));
    let custom = runner["custom"].as_table().unwrap();
    for hook in ["config", "prepare", "run", "cleanup"] {
        assert_eq!(custom[&format!("{hook}_exec")].as_str(), Some("/usr/local/bin/berth"));
        let args: Vec<&str> =
            custom[&format!("{hook}_args")].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(args, ["--config", env.config().to_str().unwrap(), "--runner", "demo", hook]);
    }
    assert!(custom.contains_key("graceful_kill_timeout"));
}

#[test]
fn gitlab_config_writes_a_relative_berth_as_an_absolute_path() {
    let env = Env::new(DRY_RUN);
    let dir = tempfile::tempdir().unwrap();
    let out = env.berth("demo").current_dir(dir.path()).args(["gitlab-config", "--berth", "./bin/berth"]).output();
    let out = out.unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let block: toml::Table = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let exec = block["runners"][0]["custom"]["run_exec"].as_str().unwrap().to_owned();
    assert_eq!(Path::new(&exec), dir.path().join("bin/berth"), "gitlab-runner runs hooks from its own directory");
}

#[test]
fn reap_removes_jobs_whose_runner_is_gone_and_keeps_running_ones() {
    let env = Env::new(HOST);
    let gone = env.job("gone");
    let live = env.job("live");
    let mut live_env = live.env.clone();
    // A different job id for the live job.
    let response = std::fs::read_to_string(live.tmp.join("response.json")).unwrap().replacen("48151623", "48151624", 1);
    std::fs::write(live.tmp.join("response.json"), response).unwrap();
    live_env.retain(|(k, _)| k != "CUSTOM_ENV_CI_JOB_ID");
    let live = Job { tmp: live.tmp, env: live_env };
    assert!(gone.hook(&env, "host", &["prepare"]).status.success());
    assert!(live.hook(&env, "host", &["prepare"]).status.success());
    std::fs::remove_dir_all(&gone.tmp).unwrap();
    let out = env.berth("host").args(["reap", "--grace", "0", "--dry-run"]).output().unwrap();
    assert!(text(&out).contains("would remove host-48151623"), "{}", text(&out));
    assert!(env.state().join("jobs/host-48151623").exists());
    let out = env.berth("host").args(["reap", "--grace", "0"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("removed host-48151623"), "{}", text(&out));
    assert!(!env.state().join("jobs/host-48151623").exists());
    assert!(!env.state().join("host-test/host-48151623").exists());
    assert!(env.state().join("jobs/host-48151624").exists(), "a job whose runner dir exists is kept");
    assert!(live.hook(&env, "host", &["cleanup"]).status.success());
}

/// `berth reap` without --runner (what the package's timer runs) reaps
/// every runner of the file; the runner-side log names the runner and job.
#[test]
fn reap_without_a_runner_reaps_every_runner_of_the_file() {
    let env = Env::new(&format!("{HOST}{DRY_RUN}"));
    let (host, demo) = (env.job("on-host"), env.job_with_id("on-demo", 48151700));
    assert!(host.hook(&env, "host", &["prepare"]).status.success());
    assert!(demo.hook(&env, "demo", &["prepare"]).status.success());
    std::fs::remove_dir_all(&host.tmp).unwrap();
    std::fs::remove_dir_all(&demo.tmp).unwrap();
    let out = std::process::Command::new(BERTH)
        .arg("--config")
        .arg(env.config())
        .args(["reap", "--grace", "0"])
        .env("BERTH_ALLOW_TEST_BACKENDS", "1")
        .env("BERTH_LOG", "info")
        .env_remove("BERTH_RUNNER")
        .output()
        .unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("removed host-48151623") && said.contains("removed demo-48151700"), "{said}");
    assert!(said.contains("reap{runner=host}") && said.contains("reap{runner=demo}"), "{said}");
    assert!(!env.state().join("jobs/host-48151623").exists() && !env.state().join("jobs/demo-48151700").exists());
}

#[test]
fn the_runner_side_log_has_no_colour_codes_when_it_is_not_a_terminal() {
    let env = Env::new(DRY_RUN);
    let job = env.job("job");
    assert!(job.hook(&env, "demo", &["prepare"]).status.success());
    let out = job.hook(&env, "demo", &["cleanup"]);
    assert!(out.status.success(), "{}", text(&out));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("cleanup"), "cleanup logs to the runner's log: {log}");
    assert!(log.contains("job{job=48151623 runner=demo}"), "the runner's log names the job and runner: {log}");
    assert!(!log.contains('\x1b'), "colour codes in a log that is no terminal: {log:?}");
    let out = env.berth("demo").arg("reap").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("reap done"), "{log}");
    assert!(!log.contains('\x1b'), "colour codes in reap's log: {log:?}");
}

#[test]
fn a_command_piped_into_a_closed_reader_ends_quietly_by_sigpipe() {
    use std::os::unix::process::ExitStatusExt;
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read); // `berth backends | head -0`: the reader is gone before berth writes
    let env = Env::new(DRY_RUN);
    let out = env.berth("demo").arg("backends").stdout(std::process::Stdio::from(write)).output().unwrap();
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?} {}", out.status, text(&out));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"), "{}", text(&out));
}

#[test]
fn gitlab_config_refuses_a_runner_whose_settings_would_fail_every_job() {
    let env =
        Env::new("[runners.demo]\nbackend = \"dry-run\"\n[runners.demo.settings]\nfail_stagee = \"build_script\"\n");
    let out = env.berth("demo").args(["gitlab-config", "--berth", "/usr/bin/berth"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(out.stdout.is_empty(), "no block for a broken runner: {}", text(&out));
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains("line 5") && message.contains("runners.demo.settings.fail_stagee"), "{message}");
}

#[test]
fn a_settings_value_a_backend_refuses_is_named_with_file_key_and_line() {
    let env = Env::new(
        "[runners.ch]\nbackend = \"chroot\"\n[runners.ch.settings]\nimages_dir = \"/nonexistent\"\nmemory_max = \"4 gigs\"\n",
    );
    let out = env.berth("ch").arg("describe").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let message = String::from_utf8_lossy(&out.stderr);
    let want =
        format!("invalid configuration {}, line 6: key `runners.ch.settings.memory_max`: ", env.config().display());
    assert!(message.contains(&want) && message.contains("\"4 gigs\" is not an amount of memory"), "{message}");
}

/// A runner whose settings are valid but whose host would fail every job at
/// prepare: gitlab-config refuses it with the fixes, unless told to skip the
/// checks, and doctor names every problem with its fix and exits 1.
#[test]
fn gitlab_config_and_doctor_refuse_a_runner_its_host_would_fail_at_prepare() {
    let env = Env::new(
        "[runners.ns]\nbackend = \"nspawn\"\n[runners.ns.settings]\nmode = \"systemd\"\nimages_dir = \"/nonexistent/images\"\n\
         [runners.demo]\nbackend = \"dry-run\"\n",
    );
    let systemd = Path::new("/run/systemd/system").is_dir();
    let out = env.berth("ns").args(["gitlab-config", "--berth", "/usr/bin/berth"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(out.stdout.is_empty(), "no block for a runner that would fail: {}", text(&out));
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains("runner ns would fail its jobs on this host"), "{message}");
    assert!(message.contains("/nonexistent/images does not exist") && message.contains("image create"), "{message}");
    assert_eq!(message.contains("PID 1 of this host is not systemd"), !systemd, "{message}");
    let forced =
        env.berth("ns").args(["gitlab-config", "--berth", "/usr/bin/berth", "--skip-checks"]).output().unwrap();
    assert!(forced.status.success() && text(&forced).contains("[[runners]]"), "{}", text(&forced));

    // Every runner of the file, without --runner.
    let mut all = std::process::Command::new(BERTH);
    all.arg("--config").arg(env.config()).args(["doctor", "--json"]);
    let out = all.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "errors make doctor exit 1: {}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let runners: Vec<&str> =
        report["runners"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(runners, ["demo", "ns"]);
    let findings = &report["runners"][1]["findings"];
    let of = |check: &str| findings.as_array().unwrap().iter().find(|f| f["check"] == check).cloned();
    let images = of("images_dir").expect("images_dir checked");
    assert_eq!(images["level"], "error");
    assert!(images["fix"].as_str().unwrap().contains("berth --runner ns image create"), "{images}");
    assert_eq!(of("host mode").unwrap()["level"], if systemd { "ok" } else { "error" });
    assert_eq!(of("systemd-nspawn").map(|f| f["level"].clone()), Some(serde_json::json!("ok")), "{findings}");
    assert!(report["errors"].as_u64().unwrap() >= 1);

    // A runner without problems passes, and its table says so.
    let out = env.berth("demo").arg("doctor").output().unwrap();
    let shown = text(&out);
    assert!(shown.contains("runner demo (backend dry-run)") && !shown.contains("runner ns"), "{shown}");
    assert!(out.status.success() && shown.contains("0 errors"), "{shown}");
}

#[test]
fn reap_without_a_runner_reaps_every_runner_of_the_file_even_when_one_fails() {
    let env = Env::new(&format!(
        "{HOST}[runners.other]\nbackend = \"host-test\"\n[runners.broken]\nplugin = \"/nonexistent/libgone.so\"\n"
    ));
    let first = env.job("first");
    let second = env.job("second");
    assert!(first.hook(&env, "host", &["prepare"]).status.success());
    assert!(second.hook(&env, "other", &["prepare"]).status.success());
    std::fs::remove_dir_all(&first.tmp).unwrap();
    std::fs::remove_dir_all(&second.tmp).unwrap();
    let out = Command::new(BERTH)
        .arg("--config")
        .arg(env.config())
        .args(["reap", "--grace", "0"])
        .env("BERTH_ALLOW_TEST_BACKENDS", "1")
        .env_remove("BERTH_RUNNER")
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "a runner that cannot be reaped fails the command: {said}");
    assert!(said.contains("of runner broken") && said.contains("reap failed for 1 of 3 runners"), "{said}");
    for key in ["host-48151623", "other-48151623"] {
        assert!(said.contains(&format!("removed {key}")), "{said}");
        assert!(!env.state().join("jobs").join(key).exists(), "{key} left: {said}");
    }
}
