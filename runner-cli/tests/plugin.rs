//! Backends loaded as plugins through the ABI: the fixture, the host-level
//! example of the backend author's guide and the bwrap backend pass the
//! conformance suite across it; incompatible or unsafe
//! libraries are refused with a clear message and a system failure.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::util::*;

/// A plugin built by `cargo build --workspace` (scripts/test does it first).
fn plugin(name: &str) -> Option<PathBuf> {
    let path = Path::new(BERTH).parent().unwrap().join(format!("lib{name}.so"));
    if path.exists() {
        return Some(path);
    }
    let reason = format!("{} is not built (run `cargo build --workspace` first; scripts/test does)", path.display());
    prerequisite(Some(reason));
    None
}

fn conformance(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = std::process::Command::new(BERTH);
    cmd.arg("conformance").args(args).env_remove("BERTH_ALLOW_TEST_BACKENDS");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn report(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

#[test]
fn the_fixture_passes_the_suite_through_the_plugin_abi_and_writes_junit() {
    let Some(lib) = plugin("berth_backend_host_test") else { return };
    let junit = tempfile::NamedTempFile::new().unwrap();
    let out =
        conformance(&["--plugin", lib.to_str().unwrap(), "--json", "--junit", junit.path().to_str().unwrap()], &[]);
    let report = report(&out);
    assert_eq!(report["backend"], "host-test");
    for line in not_passed(&report) {
        assert!(line.starts_with("\"isolation.concurrent\" \"skip\""), "{line}");
    }
    let xml = std::fs::read_to_string(junit.path()).unwrap();
    assert!(
        xml.starts_with("<?xml")
            && xml.contains("<testsuite name=\"berth conformance: host-test")
            && xml.contains("failures=\"0\""),
        "{xml}"
    );
    assert!(xml.contains("<skipped message=\"the backend declares no isolation between jobs\"/>"), "{xml}");
}

#[test]
fn a_failing_check_through_the_abi_is_a_junit_failure() {
    let Some(lib) = plugin("berth_backend_host_test") else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("settings.toml"), "fault = \"lose-exit-code\"\n").unwrap();
    let junit = dir.path().join("report.xml");
    let settings = dir.path().join("settings.toml");
    let out = conformance(
        &[
            "--plugin",
            lib.to_str().unwrap(),
            "--settings",
            settings.to_str().unwrap(),
            "--check",
            "exit.codes",
            "--junit",
            junit.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let xml = std::fs::read_to_string(junit).unwrap();
    assert!(xml.contains("failures=\"1\"") && xml.contains("<failure message=\"a script that exits 42"), "{xml}");
}

#[test]
fn a_plugin_built_for_a_later_minor_version_loads() {
    let Some(lib) = plugin("berth_backend_host_test") else { return };
    let out = conformance(
        &["--plugin", lib.to_str().unwrap(), "--check", "job.success", "--json"],
        &[("BERTH_TEST_PLUGIN_ABI", "future-minor")],
    );
    assert_eq!(report(&out)["results"][0]["verdict"], "pass", "{}", text(&out));
}

#[test]
fn a_plugin_built_for_abi_1_0_loads_and_passes() {
    // Its table says 1.0, and its SDK reads only `runner` and `vars` of the
    // job document, as before 1.1 added `context`.
    let Some(lib) = plugin("berth_backend_host_test") else { return };
    let mut args = vec!["--plugin", lib.to_str().unwrap(), "--json"];
    for check in ["job.success", "job.failure", "identity.trusted", "secrets.masked", "variables.exact"] {
        args.extend(["--check", check]);
    }
    let out = conformance(&args, &[("BERTH_TEST_PLUGIN_ABI", "minor-0")]);
    let report = report(&out);
    assert_eq!(report["results"].as_array().unwrap().len(), 5, "{}", text(&out));
    assert!(not_passed(&report).is_empty(), "{}", not_passed(&report).join("\n"));
}

#[test]
fn incompatible_or_unsafe_libraries_are_refused_with_a_system_failure() {
    let Some(lib) = plugin("berth_backend_host_test") else { return };
    let lib = lib.to_str().unwrap();
    for (variant, message) in [
        ("major-2", "built for backend ABI 2.0; this berth speaks 1.1"),
        ("truncated", "its table is truncated"),
        ("null", "returned no table"),
    ] {
        let out = conformance(&["--plugin", lib], &[("BERTH_TEST_PLUGIN_ABI", variant)]);
        assert_eq!(out.status.code(), Some(2), "{variant}: {}", text(&out));
        assert!(text(&out).contains(message), "{variant}: {}", text(&out));
    }
    let libc = ["/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib64/libc.so.6"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("a libc to try as a plugin");
    let out = conformance(&["--plugin", libc], &[]);
    assert!(text(&out).contains("exports no berth_backend_v1"), "{}", text(&out));
    let dir = tempfile::tempdir().unwrap();
    let writable = dir.path().join("writable.so");
    std::fs::copy(lib, &writable).unwrap();
    std::fs::set_permissions(&writable, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let out = conformance(&["--plugin", writable.to_str().unwrap()], &[]);
    assert!(text(&out).contains("writable by its group or by everyone"), "{}", text(&out));
}

#[test]
fn a_panicking_plugin_is_a_system_failure_not_a_crash() {
    let Some(lib) = plugin("berth_backend_host_test") else { return };
    let env = Env::new(&format!(
        "[runners.p]\nplugin = {:?}\n[runners.p.settings]\nfault = \"panic-in-prepare\"\n",
        lib.display().to_string()
    ));
    let job = env.job_with_id("job", 720_001);
    let out = job.hook(&env, "p", &["prepare"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("the plugin panicked: host-test: deliberate panic in prepare"), "{}", text(&out));
    assert!(job.hook(&env, "p", &["cleanup"]).status.success());
}

#[test]
fn a_plugins_tracing_events_reach_the_runner_side_log() {
    let Some(lib) = plugin("berth_backend_host_test") else { return };
    let env = Env::new(&format!("[runners.p]\nplugin = {:?}\n", lib.display().to_string()));
    let job = env.job_with_id("job", 720_002);
    let out = job.hook(&env, "p", &["prepare"]);
    assert!(out.status.success(), "{}", text(&out));
    // Cleanup's stderr is the runner's log, at info by default.
    let out = job.hook(&env, "p", &["cleanup"]);
    assert!(out.status.success(), "{}", text(&out));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("INFO")
            && log.contains("[berth_backend_host_test] host-test: removed the job's directory job=p-720002"),
        "{log}"
    );
}

#[test]
fn the_host_level_example_plugin_passes_every_check_that_applies() {
    let Some(lib) = plugin("berth_backend_example_host") else { return };
    let missing = "the example-host plugin runs stages under unshare, which needs root";
    if !prerequisite((!nix::unistd::Uid::effective().is_root()).then(|| missing.to_owned())) {
        return;
    }
    let out = conformance(&["--plugin", lib.to_str().unwrap(), "--json"], &[]);
    let report = report(&out);
    assert_eq!(report["backend"], "example-host");
    // Isolation `host`, honestly: the isolation check does not apply, nor
    // does the containment section (not counted by `not_passed`).
    let skipped = "\"isolation.concurrent\" \"skip\": \"the backend declares no isolation between jobs\"";
    let bad: Vec<String> = not_passed(&report).into_iter().filter(|line| line != skipped).collect();
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    let passed = report["results"].as_array().unwrap().iter().filter(|r| r["verdict"] == "pass").count();
    assert!(passed >= 17, "every check that applies ran and passed: {passed}");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn the_bwrap_plugin_passes_the_whole_suite_through_the_abi() {
    let Some(images) = real_containers() else { return };
    let Some(lib) = plugin("berth_backend_bwrap") else { return };
    let missing = "bubblewrap is not installed (apt-get install bubblewrap)";
    if !prerequisite((!Path::new("/usr/bin/bwrap").exists()).then(|| missing.to_owned())) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let settings = dir.path().join("settings.toml");
    std::fs::write(
        &settings,
        format!("images_dir = {:?}\ndefault_image = \"bookworm\"\n", images.display().to_string()),
    )
    .unwrap();
    let out =
        conformance(&["--plugin", lib.to_str().unwrap(), "--settings", settings.to_str().unwrap(), "--json"], &[]);
    let report = report(&out);
    assert_eq!(report["backend"], "bwrap");
    let results = report["results"].as_array().unwrap();
    let bad = not_passed(&report);
    assert!(results.len() >= 18 && bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn a_plugin_in_a_directory_others_can_change_is_refused() {
    let Some(lib) = plugin("berth_backend_host_test") else { return };
    let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let shared = base.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::copy(&lib, shared.join("backend.so")).unwrap();
    let run = |path: &Path| conformance(&["--plugin", path.to_str().unwrap(), "--check", "job.success"], &[]);
    let out = run(&shared.join("backend.so"));
    assert_eq!(out.status.code(), Some(0), "a plugin in a root-only directory loads: {}", text(&out));

    // Writable by everyone: another user could swap the file between berth's
    // check and its load.
    std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = run(&shared.join("backend.so"));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let want = format!("its directory {} is writable by its group or by everyone (mode 777)", shared.display());
    assert!(text(&out).contains(&want), "{}", text(&out));

    // Owned by another user, even with a safe mode.
    std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&shared, Some(65534), Some(65534)).unwrap();
    let out = run(&shared.join("backend.so"));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let want = format!("its directory {} belongs to uid 65534", shared.display());
    assert!(text(&out).contains(&want), "{}", text(&out));

    // A parent further up counts as much as the nearest one.
    std::os::unix::fs::chown(&shared, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(base.path(), std::os::unix::fs::PermissionsExt::from_mode(0o775)).unwrap();
    let out = run(&shared.join("backend.so"));
    assert!(text(&out).contains(&format!("its directory {} is writable", base.path().display())), "{}", text(&out));
}

#[test]
fn a_plugins_bad_setting_is_reported_with_the_file_the_key_and_its_line() {
    let Some(lib) = plugin("berth_backend_host_test") else { return };
    for (settings, line, key, why) in [
        // Line 1 is state_dir.
        ("root = \"/tmp/x\"\nfualt = \"leak-state\"\n", 6, "fualt", "unknown field `fualt`, expected one of `root`"),
        ("root = 5\n", 5, "root", "invalid type: integer `5`"),
        ("fault = \"sometimes\"\n", 5, "fault", "unknown variant `sometimes`"),
    ] {
        let env = Env::new(&format!(
            "[runners.p]\nplugin = {:?}\n[runners.p.settings]\n{settings}",
            lib.display().to_string()
        ));
        let job = env.job_with_id("job", 720_003);
        let out = job.hook(&env, "p", &["config"]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let want = format!(
            "invalid configuration {}, line {line}: key `runners.p.settings.{key}`: {why}",
            env.config().display()
        );
        assert!(text(&out).contains(&want) && !text(&out).contains("column"), "{want}\n{}", text(&out));
    }
}

#[test]
fn a_file_that_is_no_library_is_refused_with_dlopens_reason() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("notes.so");
    std::fs::write(&path, "these are notes, not a shared library; ".repeat(4)).unwrap();
    let out = conformance(&["--plugin", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("refusing to load it: it cannot be loaded: invalid ELF header")
            && !text(&out).contains("/proc/self/fd"),
        "{}",
        text(&out)
    );
}

/// `backends/example-c` built as its Makefile does, with `cc` and the header only.
fn example_c() -> Option<(tempfile::TempDir, PathBuf)> {
    // Below target/, whose directories only root (or this user) can write.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let lib = dir.path().join("libberth_example_c.so");
    let source = repo().join("backends/example-c");
    let include = repo().join("backend-api/include");
    let built = std::process::Command::new("cc")
        .args(["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared", "-I"])
        .arg(&include)
        .arg("-o")
        .arg(&lib)
        .arg(source.join("plugin.c"))
        .output();
    let built = match built {
        Ok(out) => out,
        Err(e) => {
            prerequisite(Some(format!("no C compiler to build backends/example-c ({e}; apt-get install gcc)")));
            return None;
        }
    };
    assert!(built.status.success(), "backends/example-c does not build: {}", text(&built));
    std::fs::set_permissions(&lib, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    Some((dir, lib))
}

#[test]
fn the_c_example_plugin_passes_every_check_its_capabilities_turn_on() {
    let Some((_dir, lib)) = example_c() else { return };
    let out = conformance(&["--plugin", lib.to_str().unwrap(), "--json"], &[]);
    let report = report(&out);
    assert_eq!(report["backend"], "example-c", "{}", text(&out));
    let results = report["results"].as_array().unwrap();
    let passed = results.iter().filter(|r| r["verdict"] == "pass").count();
    // Host isolation: jobs share the host, so only isolation.concurrent and
    // the containment section (no contains_root) are skipped.
    let bad: Vec<String> =
        not_passed(&report).into_iter().filter(|line| !line.starts_with("\"isolation.concurrent\" \"skip\"")).collect();
    assert!(bad.is_empty() && passed >= 17, "{passed} passed:\n{}", bad.join("\n"));
}

#[test]
fn the_c_example_plugin_reports_a_bad_setting_with_its_key_and_line() {
    let Some((_dir, lib)) = example_c() else { return };
    for (setting, why) in [
        ("grace_seconds = 90", "must be a whole number of seconds from 0 to 60"),
        ("grace = 1", "unknown setting; example-c takes only grace_seconds"),
    ] {
        let key = setting.split(' ').next().unwrap();
        let env = Env::new(&format!(
            "[runners.c]\nplugin = {:?}\n[runners.c.settings]\n{setting}\n",
            lib.display().to_string()
        ));
        let job = env.job_with_id("job", 720_004);
        let out = job.hook(&env, "c", &["config"]);
        let want = format!("{}, line 5: key `runners.c.settings.{key}`: {why}", env.config().display());
        assert!(out.status.code() == Some(2) && text(&out).contains(&want), "{want}\n{}", text(&out));
    }
}
