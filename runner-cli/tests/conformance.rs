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
    if nix::unistd::Uid::effective().is_root() {
        cases.push(("leak-mount", "cleanup.idempotent"));
    } else if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but not root: the leaked-mount case needs root");
    } else {
        eprintln!("skipped the leak-mount case: not root");
    }
    for (fault, check) in cases {
        let env = Env::new(&format!(
            "[runners.broken]\nbackend = \"host-test\"\n[runners.broken.settings]\nfault = \"{fault}\"\n"
        ));
        let report = suite(&env, "broken", &["--check", check]);
        let results = verdicts(&report);
        match results.iter().find(|(id, _, _)| id == check) {
            Some((_, verdict, detail)) if verdict == "fail" => {
                eprintln!("{fault}: caught by {check}: {}", detail.lines().next().unwrap_or(""));
                if fault == "leak-mount" {
                    assert!(detail.contains("mount /run/berth-leak-broken-"), "{detail}");
                    // Undo what the broken backend left.
                    for line in std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines() {
                        if let Some(point) = line.split(' ').nth(4).filter(|p| p.starts_with("/run/berth-leak-broken-"))
                        {
                            let status = std::process::Command::new("umount").arg(point).status();
                            assert!(status.is_ok_and(|s| s.success()), "failed to unmount {point}");
                            let _ = std::fs::remove_dir(point);
                        }
                    }
                }
            }
            other => missed.push(format!("{fault} not caught by {check}: {other:?}")),
        }
    }
    assert!(missed.is_empty(), "{missed:#?}");
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
