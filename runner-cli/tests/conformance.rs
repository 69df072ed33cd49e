//! The conformance suite: the built-in backends pass it, and every check
//! catches the defect it exists for (the fixture backend's `fault` setting).

use crate::util::*;

fn suite(env: &Env, runner: &str, extra: &[&str]) -> serde_json::Value {
    let out = env.berth(runner).args(["conformance", "--json"]).args(extra).output().unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    report
}

fn verdicts(report: &serde_json::Value) -> Vec<(String, String, String)> {
    report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_owned(),
                r["verdict"].as_str().unwrap().to_owned(),
                r["detail"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn dry_run_passes_everything_that_applies_to_it() {
    let env = Env::new(DRY_RUN);
    let report = suite(&env, "demo", &[]);
    let results = verdicts(&report);
    assert!(results.len() >= 18);
    for (id, verdict, detail) in &results {
        assert_ne!(verdict, "fail", "{id}: {detail}");
    }
    for id in [
        "config.json",
        "cleanup.idempotent",
        "cleanup.unprepared",
        "stage.unknown-name",
        "secrets.masked",
        "job.success",
        "hook.releases-log",
    ] {
        assert!(
            results.iter().any(|(i, v, _)| i == id && v == "pass"),
            "{id} must apply to dry-run and pass: {results:?}"
        );
    }
    let skipped: Vec<_> = results.iter().filter(|(_, v, _)| v == "skip").collect();
    assert!(skipped.iter().all(|(_, _, why)| why.contains("does not execute scripts")), "{skipped:?}");
}

#[test]
fn the_script_running_fixture_passes_every_check() {
    let env = Env::new(HOST);
    let report = suite(&env, "host", &[]);
    for (id, verdict, detail) in verdicts(&report) {
        if id == "isolation.concurrent" {
            assert_eq!(verdict, "skip", "the fixture declares no isolation: {detail}");
            assert!(detail.contains("no isolation"), "{detail}");
            continue;
        }
        if id.starts_with("containment.") {
            assert_eq!(verdict, "skip", "the fixture does not claim to contain root: {id}: {detail}");
            assert!(detail.contains("contains_root = false"), "{detail}");
            continue;
        }
        assert_eq!(verdict, "pass", "{id}: {detail}");
    }
}

#[test]
fn every_deliberately_broken_backend_is_caught_by_its_check() {
    let cases = [
        ("lose-exit-code", "exit.codes"),
        ("system-for-build", "exit.codes"),
        ("cleanup-not-idempotent", "cleanup.idempotent"),
        ("ignore-sigterm", "cancel.sigterm"),
        ("daemon-holds-log", "hook.releases-log"),
        ("leak-state", "cleanup.idempotent"),
        ("lose-files-between-stages", "stage.state-persists"),
        ("leak-masked", "secrets.masked"),
        ("reject-unknown-stage", "stage.unknown-name"),
        ("trust-user-job-id", "identity.trusted"),
        ("leak-process", "cleanup.after-killed-prepare"),
        ("claim-isolation", "isolation.concurrent"),
    ];
    let mut missed = Vec::new();
    let mut cases = cases.to_vec();
    let not_root = !nix::unistd::Uid::effective().is_root();
    if prerequisite(not_root.then(|| "not root: the leaked-mount case needs root".to_owned())) {
        cases.push(("leak-mount", "cleanup.idempotent"));
    }
    cases.push(("host-builds", "stage.state-persists"));
    for (fault, check) in cases {
        let env = Env::new(&format!(
            "[runners.broken]\nbackend = \"host-test\"\n[runners.broken.settings]\nfault = \"{fault}\"\n"
        ));
        // The host directory it writes: outside its state, but this test's own.
        let host_builds = env.dir.path().join("host-builds");
        if fault == "host-builds" {
            let mut text = std::fs::read_to_string(env.config()).unwrap();
            text.push_str(&format!("host_builds = {:?}\n", host_builds.display().to_string()));
            std::fs::write(env.config(), text).unwrap();
        }
        // leak-process is caught only if prepare spawned its leak before the
        // suite killed it (150 ms in): on a loaded machine, a round can miss.
        let mut results = verdicts(&suite(&env, "broken", &["--check", check]));
        for _ in 0..2 {
            if fault != "leak-process" || results.iter().any(|(id, v, _)| id == check && v == "fail") {
                break;
            }
            eprintln!("{fault}: prepare was killed before it leaked; again");
            results = verdicts(&suite(&env, "broken", &["--check", check]));
        }
        match results.iter().find(|(id, _, _)| id == check) {
            Some((_, verdict, detail)) if verdict == "fail" => {
                eprintln!("{fault}: caught by {check}: {}", detail.lines().next().unwrap_or(""));
                if fault == "host-builds" {
                    let written = format!("{} (written outside the backend's state", host_builds.display());
                    assert!(detail.contains(&written), "{detail}");
                }
                if fault == "leak-mount" {
                    assert!(detail.contains("mount /run/berth-leak-broken-"), "{detail}");
                    // Undo what the broken backend left.
                    for mount in berth_backend_support::mounts::mountinfo() {
                        let point = mount.point;
                        if point.to_string_lossy().starts_with("/run/berth-leak-broken-") {
                            let status = std::process::Command::new("umount").arg(&point).status();
                            assert!(status.is_ok_and(|s| s.success()), "failed to unmount {}", point.display());
                            let _ = std::fs::remove_dir(&point);
                        }
                    }
                }
            }
            other => missed.push(format!("{fault} not caught by {check}: {other:?}")),
        }
    }
    assert!(missed.is_empty(), "{missed:#?}");
}

/// The IDs `berth conformance --list` lists that start with `prefix`.
fn listed(prefix: &str) -> Vec<String> {
    let env = Env::new(DRY_RUN);
    let out = env.berth("demo").args(["conformance", "--list"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|id| id.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_list_shows_the_containment_section() {
    let env = Env::new(DRY_RUN);
    let out = env.berth("demo").args(["conformance", "--list"]).output().unwrap();
    let list = text(&out);
    let section: Vec<&str> = list.lines().filter(|l| l.starts_with("containment.")).collect();
    assert_eq!(section.len(), 10, "{list}");
    for line in section {
        // The two probes that need perl or python3 in the image are SHOULDs.
        let probe = line.starts_with("containment.chroot-escape") || line.starts_with("containment.open-by-handle");
        let level = if probe { " SHOULD " } else { " MUST " };
        assert!(line.contains(level) && line.contains(" security "), "{line}");
    }
}

/// Entries of `dir` whose name starts with `prefix`.
fn entries(dir: &str, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.retain(|n| n.starts_with(prefix));
    names.sort();
    names
}

#[test]
fn a_backend_claiming_containment_but_running_jobs_on_the_host_fails_every_containment_check() {
    // What each check must say about bash running as root on the host.
    let expected = [
        ("containment.own-root", "the job sees the host's file"),
        ("containment.chroot-escape", "the job sees the host's file"),
        ("containment.open-by-handle", "the job sees the host's file"),
        ("containment.root-unmapped", "host's"),
        ("containment.no-devices", "and opened it"),
        ("containment.sysctl-readonly", "core_pattern for writing"),
        ("containment.env-private", "environ"),
        ("containment.job-binaries", "the job sees the host's file"),
        ("containment.cache-nosuid", "not a mount point of its own"),
        ("containment.cache-per-project", "projects share a cache"),
    ];
    let mut ids = listed("containment.");
    ids.sort();
    let mut want: Vec<String> = expected.iter().map(|(id, _)| id.to_string()).collect();
    want.sort();
    assert_eq!(ids, want, "every containment check needs its expected failure here");
    let not_root = !nix::unistd::Uid::effective().is_root();
    let root = prerequisite(not_root.then(|| "not root: the device and kernel-settings cases need root".to_owned()));
    let (run_before, slash_before) = (entries("/run", "berth-conformance-"), entries("/", "berth-probe-"));
    let env = Env::new(
        "[runners.broken]\nbackend = \"host-test\"\n[runners.broken.settings]\nfault = \"claim-containment\"\n",
    );
    let mut args = vec!["--check"];
    args.extend(ids.iter().flat_map(|id| [id.as_str(), "--check"]));
    args.pop();
    let results = verdicts(&suite(&env, "broken", &args));
    assert_eq!(results.len(), expected.len(), "{results:#?}");
    let mut missed = Vec::new();
    for (id, verdict, detail) in &results {
        let reason = expected.iter().find(|(i, _)| i == id).unwrap().1;
        if !root && (id == "containment.no-devices" || id == "containment.sysctl-readonly") {
            eprintln!("skipped {id}: not root, so the host's devices and kernel settings are out of reach anyway");
            continue;
        }
        if verdict == "fail" && detail.contains(reason) {
            eprintln!("{id}: fails on the host: {}", detail.lines().next().unwrap_or(""));
        } else {
            missed.push(format!("{id}: {verdict} (want a failure saying {reason:?}): {detail}"));
        }
    }
    assert!(missed.is_empty(), "{missed:#?}");
    // The probes were harmless: nothing left in /run or /. (Suites running
    // beside this test, on real backends, make and remove markers of their
    // own: a new name must go within a while; one of this run's would stay.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    let new = |before: &Vec<String>, dir: &str, prefix: &str| -> Vec<String> {
        entries(dir, prefix).into_iter().filter(|e| !before.contains(e)).collect()
    };
    let left = new(&run_before, "/run", "berth-conformance-");
    while left.iter().any(|e| std::path::Path::new("/run").join(e).exists()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let stayed: Vec<&String> = left.iter().filter(|e| std::path::Path::new("/run").join(e).exists()).collect();
    assert!(stayed.is_empty(), "left in /run: {stayed:?}");
    assert_eq!(new(&slash_before, "/", "berth-probe-"), Vec::<String>::new());
}

#[test]
fn the_table_counts_and_filters() {
    let env = Env::new(DRY_RUN);
    let out =
        env.berth("demo").args(["conformance", "--check", "config.json", "--check", "exit.codes"]).output().unwrap();
    let table = text(&out);
    assert!(out.status.success(), "{table}");
    assert!(table.contains("pass  config.json"), "{table}");
    assert!(table.contains("skip  exit.codes"), "{table}");
    assert!(table.trim_end().ends_with("1 passed, 0 failed, 1 skipped"), "{table}");
    let out = env.berth("demo").args(["conformance", "--check", "no.such"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("unknown check"), "{}", text(&out));
}

#[test]
fn a_failing_must_check_fails_the_command() {
    let env =
        Env::new("[runners.broken]\nbackend = \"host-test\"\n[runners.broken.settings]\nfault = \"lose-exit-code\"\n");
    let out = env.berth("broken").args(["conformance", "--check", "exit.codes"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("FAIL  exit.codes"), "{}", text(&out));
}

/// `berth conformance ARGS...` with no berth configuration, from `dir`:
/// a driver given by `--driver` or `--driver-config`.
fn foreign(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BERTH)
        .arg("conformance")
        .args(args)
        .current_dir(dir)
        .env("BERTH_ALLOW_TEST_BACKENDS", "1")
        .env_remove("BERTH_LOG")
        .env_remove("BERTH_CONFIG")
        .env_remove("BERTH_RUNNER")
        .output()
        .unwrap()
}

fn foreign_report(dir: &std::path::Path, args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = foreign(dir, &all);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    (out.status.code(), report)
}

/// The checks a driver without isolation or a containment claim skips.
fn skipped_by_default(id: &str) -> bool {
    id == "isolation.concurrent" || id.starts_with("containment.")
}

#[test]
fn berth_through_the_driver_command_passes_every_check_that_applies() {
    let env = Env::new(HOST);
    let driver = format!("'{BERTH}' --config '{}' --runner host", env.config().display());
    let state = env.state().display().to_string();
    let (code, report) = foreign_report(env.dir.path(), &["--driver", &driver, "--state-dir", &state]);
    assert_eq!(report["backend"], "host-test", "the name comes from config's answer");
    for (id, verdict, detail) in verdicts(&report) {
        if skipped_by_default(&id) {
            assert_eq!(verdict, "skip", "{id}: a foreign driver claims no isolation or containment: {detail}");
            continue;
        }
        assert_eq!(verdict, "pass", "{id}: {detail}");
    }
    assert_eq!(code, Some(0));
}

/// What the deliberately wrong script must fail: it exits 1 instead of
/// BUILD_FAILURE_EXIT_CODE and never writes BUILD_EXIT_CODE_FILE.
const WRONG_FAILS: [&str; 3] = ["exit.codes", "exit.codes-from-env", "job.failure"];

fn assert_wrong_script_caught(code: Option<i32>, report: &serde_json::Value) {
    assert_eq!(report["backend"], "wrong-exit-code");
    let results = verdicts(report);
    let mut failed: Vec<&str> = results.iter().filter(|(_, v, _)| v == "fail").map(|(id, _, _)| id.as_str()).collect();
    failed.sort();
    let mut want = WRONG_FAILS.to_vec();
    want.sort();
    assert_eq!(failed, want, "{results:#?}");
    for (id, verdict, detail) in &results {
        if skipped_by_default(id) {
            assert_eq!(verdict, "skip", "{id}: {detail}");
        } else if !WRONG_FAILS.contains(&id.as_str()) {
            assert_eq!(verdict, "pass", "{id}: {detail}");
        }
    }
    let detail = |id: &str| results.iter().find(|(i, _, _)| i == id).unwrap().2.clone();
    assert!(detail("exit.codes").contains("(no BUILD_EXIT_CODE_FILE written)"), "{}", detail("exit.codes"));
    assert!(detail("exit.codes-from-env").contains("instead of 77"), "{}", detail("exit.codes-from-env"));
    assert_eq!(code, Some(1), "a failed MUST check fails the command");
}

#[test]
fn a_deliberately_wrong_driver_script_fails_exactly_its_checks() {
    let state = tempfile::tempdir().unwrap();
    // A relative program path, from the repository: made absolute before the
    // hooks run in the job's temp dir.
    let driver = format!("testdata/drivers/wrong-exit-code.sh '{}'", state.path().display());
    let state_arg = state.path().display().to_string();
    let (code, report) = foreign_report(&repo(), &["--driver", &driver, "--state-dir", &state_arg]);
    assert_wrong_script_caught(code, &report);
}

#[test]
fn a_runners_custom_block_drives_the_same_script_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let script = repo().join("testdata/drivers/wrong-exit-code.sh");
    let mut toml =
        String::from("concurrent = 1\n[[runners]]\n  name = \"wrong\"\n  executor = \"custom\"\n  [runners.custom]\n");
    for hook in ["config", "prepare", "run", "cleanup"] {
        toml.push_str(&format!(
            "    {hook}_exec = {:?}\n    {hook}_args = [{:?}, {hook:?}]\n",
            script.display().to_string(),
            state.display().to_string()
        ));
    }
    toml.push_str("    graceful_kill_timeout = 30\n");
    std::fs::write(dir.path().join("config.toml"), toml).unwrap();
    let (code, report) =
        foreign_report(dir.path(), &["--driver-config", "config.toml", "--state-dir", state.to_str().unwrap()]);
    assert_wrong_script_caught(code, &report);
}

#[test]
fn declared_capabilities_decide_what_is_skipped() {
    let state = tempfile::tempdir().unwrap();
    let driver = format!("testdata/drivers/wrong-exit-code.sh '{}'", state.path().display());
    let (code, report) = foreign_report(
        &repo(),
        &[
            "--driver",
            &driver,
            "--check",
            "cancel.sigterm",
            "--check",
            "exit.codes",
            "--declare",
            "cancel=false,executes-scripts=false",
        ],
    );
    let results = verdicts(&report);
    assert_eq!(results.len(), 2, "{results:?}");
    assert!(results[0].2.contains("executes_scripts = false"), "{results:?}");
    assert!(results.iter().all(|(_, v, _)| v == "skip"), "{results:?}");
    assert_eq!(code, Some(0));
    // A description file as `berth describe --json` prints it, then a declaration on top.
    let env = Env::new(HOST);
    let out = env.berth("host").args(["describe", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    std::fs::write(env.dir.path().join("describe.json"), &out.stdout).unwrap();
    let describe = env.dir.path().join("describe.json").display().to_string();
    let (_, report) = foreign_report(
        &repo(),
        &[
            "--driver",
            &driver,
            "--describe",
            &describe,
            "--declare",
            "cancel=false",
            "--check",
            "cancel.sigterm",
            "--check",
            "config.json",
        ],
    );
    let results = verdicts(&report);
    assert_eq!(report["backend"], "host-test");
    assert!(
        results[0].1 == "fail" && results[0].2.contains("wrong-exit-code"),
        "config.json compares with --describe: {results:?}"
    );
    assert!(results[1].1 == "skip" && results[1].2.contains("cancel = false"), "{results:?}");
}

#[test]
fn bad_driver_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        std::fs::write(dir.path().join(name), text).unwrap();
        name.to_owned()
    };
    let no_block = write("no-block.toml", "[[runners]]\nname = \"x\"\nexecutor = \"shell\"\n");
    let no_run = write("no-run.toml", "[runners.custom]\nconfig_exec = \"/bin/true\"\n");
    let bad_args = write("bad-args.toml", "[runners.custom]\nrun_exec = \"/bin/true\"\nrun_args = \"run\"\n");
    let not_toml = write("not-toml.toml", "[runners.custom\n");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--driver", ""], "--driver is empty"),
        (vec!["--driver", "   "], "--driver is empty"),
        (vec!["--driver", "'unbalanced"], "not a valid command"),
        (vec!["--driver", "./no-such-driver"], "failed to find"),
        (vec!["--driver-config", "missing.toml"], "failed to read missing.toml"),
        (vec!["--driver-config", &not_toml], "invalid TOML in not-toml.toml"),
        (vec!["--driver-config", &no_block], "no [runners.custom] block"),
        (vec!["--driver-config", &no_run], "has no run_exec"),
        (vec!["--driver-config", &bad_args], "run_args must be an array of strings"),
        (vec!["--driver", "/bin/true", "--declare", "bogus=true"], "unknown key \"bogus\""),
        (vec!["--driver", "/bin/true", "--declare", "isolation=moon"], "invalid isolation"),
        (vec!["--driver", "/bin/true", "--describe", "missing.json"], "failed to read missing.json"),
        (vec!["--driver", "/bin/true", "--plugin", "/x.so"], "cannot be used with"),
        (vec!["--driver", "/bin/true", "--runner", "x"], "cannot be used with"),
        (vec!["--driver", "/bin/true", "--driver-config", &no_run], "cannot be used with"),
        (vec!["--state-dir", "/tmp"], "--driver"),
    ];
    for (args, says) in cases {
        let out = foreign(dir.path(), &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(says), "{args:?} must say {says:?}: {}", text(&out));
    }
}

#[test]
fn the_escape_probes_catch_a_plain_chroot_that_keeps_the_jobs_files_apart() {
    // What berth's chroot backend did before #11: the job's own files, but
    // a chroot as the host's root. own-root cannot tell; the two probes can.
    let Some(images) = real_containers() else { return };
    let state = tempfile::tempdir().unwrap();
    let driver = format!(
        "testdata/drivers/plain-chroot.sh '{}' '{}'",
        state.path().display(),
        images.join("bookworm/current").display()
    );
    let mut args = vec!["--driver", &driver, "--declare", "contains_root=true,isolation=filesystem"];
    for id in ["containment.own-root", "containment.chroot-escape", "containment.open-by-handle"] {
        args.extend(["--check", id]);
    }
    let (_, report) = foreign_report(&repo(), &args);
    let result = |id: &str| {
        let r = report["results"].as_array().unwrap().iter().find(|r| r["id"] == id).unwrap().clone();
        (r["verdict"].as_str().unwrap().to_owned(), r["detail"].as_str().unwrap_or("").to_owned())
    };
    assert_eq!(result("containment.own-root").0, "pass", "{report}");
    let (verdict, detail) = result("containment.chroot-escape");
    assert!(verdict == "fail" && detail.contains("reached the host's /"), "{verdict}: {detail}");
    let (verdict, detail) = result("containment.open-by-handle");
    assert!(verdict == "fail" && detail.contains("not EPERM"), "{verdict}: {detail}");
    assert!(!std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains(state.path().to_str().unwrap()));
}

/// A backend that declares isolation "none" (nothing runs) while it runs
/// scripts would skip the isolation checks unnoticed: berth refuses it at
/// load, and the suite fails such a declaration of any driver.
#[test]
fn contradictory_declarations_are_refused_at_load_and_fail_the_suite() {
    let env = Env::new(
        "[runners.broken]\nbackend = \"host-test\"\n[runners.broken.settings]\nfault = \"contradict-capabilities\"\n",
    );
    for args in [&["describe"][..], &["conformance"]] {
        let out = env.berth("broken").args(args).output().unwrap();
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {said}");
        assert!(said.contains("its description contradicts itself: isolation \"none\" means nothing runs"), "{said}");
    }
    let driver = format!("'{BERTH}' --config '{}' --runner host", env.config().display());
    std::fs::write(env.config(), format!("state_dir = {:?}\n{HOST}", env.state().display().to_string())).unwrap();
    let args = ["--driver", &driver, "--declare", "isolation=none", "--check", "capabilities.consistent"];
    let (code, report) = foreign_report(env.dir.path(), &args);
    let results = verdicts(&report);
    assert_eq!(code, Some(1), "{results:?}");
    let (_, verdict, detail) = results.iter().find(|(id, _, _)| id == "capabilities.consistent").unwrap();
    assert_eq!(verdict, "fail");
    assert!(detail.contains("isolation \"none\" means nothing runs, but executes_scripts is true"), "{detail}");
}
