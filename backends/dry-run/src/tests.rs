//! Hook tests against the shared fixtures (testdata/fixtures).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use berth_backend_api::{script, JobRecord, JobResponse, ResponseVariable, StateDir};
use serde_json::Value;

use super::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/fixtures");
const SECRET: &str = "glpat-not-a-real-token";
const JOB_TOKEN: &str = "glcbt-64_example-job-token";

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

/// The CUSTOM_ENV_* pairs of hook-environment.env (`KEY="json-quoted"` lines).
fn custom_env() -> Vec<(String, String)> {
    let text = fs::read_to_string(fixture("hook-environment.env")).unwrap();
    text.lines()
        .filter(|line| line.starts_with("CUSTOM_ENV_"))
        .map(|line| {
            let (key, quoted) = line.split_once('=').unwrap();
            (key.to_owned(), serde_json::from_str::<String>(quoted).unwrap())
        })
        .collect()
}

/// The fixture job, with its payload copied into `dir`.
fn fixture_job(dir: &Path) -> JobContext {
    let response = dir.join("response.json");
    fs::copy(fixture("job-response.json"), &response).unwrap();
    let mut pairs = custom_env();
    pairs.push(("JOB_RESPONSE_FILE".into(), response.to_str().unwrap().into()));
    JobContext::from_vars("demo", pairs).unwrap()
}

/// A dry run whose job log is captured, with its state under `state_dir`.
fn dry_run(settings: Settings, state_dir: &Path) -> (DryRun, Arc<Mutex<String>>) {
    let mut backend = DryRun::new(settings, &RunnerInfo::new("demo", state_dir)).unwrap();
    let captured = Arc::new(Mutex::new(String::new()));
    backend.log = JobLog { captured: Some(captured.clone()) };
    (backend, captured)
}

fn take(log: &Arc<Mutex<String>>) -> String {
    std::mem::take(&mut *log.lock().unwrap())
}

fn transcript_lines(path: &Path) -> Vec<Value> {
    fs::read_to_string(path).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

fn failing(stage: &str, kind: FailKind, code: Option<i32>) -> Settings {
    Settings { fail_stage: Some(stage.into()), fail_kind: kind, fail_exit_code: code, ..Settings::default() }
}

#[test]
fn describes_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let (backend, _) = dry_run(Settings::default(), tmp.path());
    let description = backend.describe();
    assert_eq!(description.name, "dry-run");
    assert_eq!(description.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(description.isolation, Isolation::None);
    let caps = description.capabilities;
    assert!(!caps.executes_scripts && !caps.cancel && !caps.reap && !caps.images);
    assert!(caps.concurrent_jobs);
}

#[test]
fn config_reports_dirs_and_prints_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let job = fixture_job(tmp.path());
    let (backend, log) = dry_run(Settings::default(), tmp.path());
    let config = backend.config(&job).unwrap();
    assert_eq!(config, ConfigOutput::with_dirs("/builds", "/cache"));
    assert_eq!(take(&log), "");

    let mut runner = RunnerInfo::new("demo", tmp.path());
    runner.builds_dir = Some("/srv/builds".into());
    runner.cache_dir = Some("/srv/cache".into());
    let backend = DryRun::new(Settings::default(), &runner).unwrap();
    assert_eq!(backend.config(&job).unwrap(), ConfigOutput::with_dirs("/srv/builds", "/srv/cache"));

    let lines = transcript_lines(&tmp.path().join("logs/dry-run/demo-48151623.jsonl"));
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["hook"], "config");
    assert_eq!(lines[1]["builds_dir"], "/srv/builds");
}

#[test]
fn prepare_report_shows_job_image_and_variables_masked() {
    let tmp = tempfile::tempdir().unwrap();
    let job = fixture_job(tmp.path());
    let text = report::prepare(&job, &Mask::for_job(&job));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], report::HEADER);
    assert_eq!(lines[1], "Job 48151623 \"test\" (stage test) of acme/widget, timeout 3600 s");
    assert_eq!(lines[2], "Image: registry.example.com/ci/bookworm:latest");
    assert_eq!(lines[3], format!("Variables ({}):", job.variables().len()));
    for expected in [
        "  GREETING=hello",
        "  DEPLOY_TOKEN=[MASKED]",
        "  MULTI=\"line one\\nline two\"",
        "  KUBECONFIG=(file) \"apiVersion: v1\\nkind: Config\\n\"",
        "  CI_JOB_SERVICES=\"[{\\\"name\\\": \\\"postgres:16\\\", \\\"alias\\\": \\\"db\\\", \\\"entrypoint\\\": null, \\\"command\\\": null}]\"",
    ] {
        assert!(lines.contains(&expected), "missing {expected:?} in\n{text}");
    }
    assert!(!text.contains(SECRET), "{text}");
}

#[test]
fn prepare_without_payload_says_so() {
    let job = JobContext::from_vars("demo", [("CUSTOM_ENV_CI_JOB_ID".to_owned(), "7".to_owned())]).unwrap();
    let text = report::prepare(&job, &Mask::for_job(&job));
    assert!(text.contains("Job 7 (no job payload: JOB_RESPONSE_FILE is not set)\nImage: none\n"), "{text}");
    assert!(text.ends_with("Variables (1):\n  CI_JOB_ID=7\n"), "{text}");
}

#[test]
fn stage_report_decodes_and_masks_the_body() {
    let tmp = tempfile::tempdir().unwrap();
    let job = fixture_job(tmp.path());
    let script = fs::read_to_string(fixture("script-build_script.sh")).unwrap();
    // full_scripts: every line.
    let text = report::stage("build_script", &Script::parse(&script), &Mask::for_job(&job), None);
    assert!(text.starts_with("── stage build_script ──\n  export CI_JOB_ID=$'48151623'\n"), "{text}");
    assert!(text.contains("\n  export DEPLOY_TOKEN=$'[MASKED]'\n"), "{text}");
    assert!(text.contains("\n  export MULTI=$'line one\\nline two'\n"), "{text}");
    assert!(text.ends_with("\n  make test\n"), "{text}");
    assert!(!text.contains(SECRET));
}

#[test]
fn stage_report_folds_the_fixture_preamble() {
    let tmp = tempfile::tempdir().unwrap();
    let job = fixture_job(tmp.path());
    let script = fs::read_to_string(fixture("script-build_script.sh")).unwrap();
    let text = report::stage("build_script", &Script::parse(&script), &Mask::for_job(&job), Some(job.variables()));
    // KUBECONFIG is exported as the file's path, not the contents prepare
    // listed; the one export after it alone is not folded.
    assert_eq!(
        text,
        "── stage build_script ──
  export: 23 variables (values as listed at prepare)
  mkdir -p '/builds/acme/widget.tmp'
  printf '%s' $'apiVersion: v1\\nkind: Config\\n' > '/builds/acme/widget.tmp/KUBECONFIG'
  export KUBECONFIG='/builds/acme/widget.tmp/KUBECONFIG'
  export RUNNER_TEMP_PROJECT_DIR=$'/builds/acme/widget.tmp'
  cd '/builds/acme/widget'
  echo $'\\x1b[32;1m$ echo \"$GREETING from $(hostname)\"\\x1b[0;m'
  echo \"$GREETING from $(hostname)\"
  echo $'\\x1b[32;1m$ make test\\x1b[0;m'
  make test
"
    );
}

/// A stage body like `berth exec`'s: the job's exports (some changed, one
/// masked, some new), commands and the sources as a heredoc.
fn exec_like_body(status: &str, token: &str) -> String {
    let mut body = String::new();
    for (key, value) in [
        ("CI_JOB_ID", "48151623"),
        ("GREETING", "hello"),
        ("DEPLOY_TOKEN", token),
        ("MULTI", "line one\nline two"),
        ("CI_JOB_STATUS", status),
        ("CI_PROJECT_NAME", "widget"),
    ] {
        body.push_str(&format!("export {key}={}\n", script::quote(value)));
    }
    body.push_str("cd '/builds/acme/widget'\n");
    body.push_str("base64 -d <<'BERTH_SOURCES_EOF' | tar -xzf - --no-same-owner\n");
    for _ in 0..100 {
        body.push_str(&"QUJD".repeat(19));
        body.push('\n');
    }
    body.push_str("BERTH_SOURCES_EOF\necho \"after: $CI_JOB_STATUS\"\n");
    body
}

#[test]
fn stage_report_folds_exports_and_sources_but_keeps_changed_values() {
    let tmp = tempfile::tempdir().unwrap();
    let job = fixture_job(tmp.path());
    let mask = Mask::for_job(&job);
    let script = Script::parse(&script::render(&exec_like_body("failed", SECRET)));
    let text = report::stage("after_script", &script, &mask, Some(job.variables()));
    assert_eq!(
        text,
        "── stage after_script ──
  export: 4 variables (values as listed at prepare)
  export CI_JOB_STATUS=failed
  export CI_PROJECT_NAME=widget
  cd '/builds/acme/widget'
  base64 -d <<'BERTH_SOURCES_EOF' | tar -xzf - --no-same-owner
  … 100 lines of data (7.5 KiB) …
  BERTH_SOURCES_EOF
  echo \"after: $CI_JOB_STATUS\"
"
    );

    // A masked variable exported with another (masked) value is listed, masked.
    let other_secret = "glpat-another-secret";
    let mut response = JobResponse::new(48151623);
    response.token = JOB_TOKEN.into();
    for (key, value) in [("DEPLOY_TOKEN", SECRET), ("OTHER", other_secret)] {
        response.variables.push(ResponseVariable::new(key, value).masked());
    }
    let response_path = tmp.path().join("masked.json");
    fs::write(&response_path, serde_json::to_vec(&response).unwrap()).unwrap();
    let job = JobContext::from_vars(
        "demo",
        custom_env().into_iter().chain([
            ("CUSTOM_ENV_OTHER".to_owned(), other_secret.to_owned()),
            ("JOB_RESPONSE_FILE".to_owned(), response_path.to_str().unwrap().to_owned()),
        ]),
    )
    .unwrap();
    let script = Script::parse(&script::render(&exec_like_body("running", other_secret)));
    let text = report::stage("build_script", &script, &Mask::for_job(&job), Some(job.variables()));
    assert!(
        text.starts_with(
            "── stage build_script ──\n  export: 4 variables (values as listed at prepare)\n  \
             export DEPLOY_TOKEN=[MASKED]\n  export CI_PROJECT_NAME=widget\n"
        ),
        "{text}"
    );
    assert!(!text.contains(SECRET) && !text.contains(other_secret), "{text}");
}

#[test]
fn a_masked_value_with_a_newline_does_not_unfold_or_show() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = "top\nsecret-line";
    let mut response = JobResponse::new(9);
    response.variables.push(ResponseVariable::new("ML", secret).masked());
    let response_path = tmp.path().join("ml.json");
    fs::write(&response_path, serde_json::to_vec(&response).unwrap()).unwrap();
    let job = JobContext::from_vars(
        "demo",
        [
            ("JOB_RESPONSE_FILE".to_owned(), response_path.to_str().unwrap().to_owned()),
            ("CUSTOM_ENV_ML".to_owned(), secret.to_owned()),
            ("CUSTOM_ENV_A".to_owned(), "a".to_owned()),
        ],
    )
    .unwrap();
    let body = format!("export ML={}\nexport A=$'a'\ncat <<EOF\n{secret}\nEOF\n", script::quote(secret));
    let text = report::stage(
        "build_script",
        &Script::parse(&script::render(&body)),
        &Mask::for_job(&job),
        Some(job.variables()),
    );
    assert_eq!(
        text,
        "── stage build_script ──\n  export: 2 variables (values as listed at prepare)\n  cat <<EOF\n  [MASKED]\n  EOF\n"
    );
}

#[test]
fn the_full_scripts_setting_reaches_run() {
    let tmp = tempfile::tempdir().unwrap();
    let job = fixture_job(tmp.path());
    let state = StateDir::new(tmp.path()).create(JobRecord::new(job.key().clone(), "dry-run")).unwrap();
    let cancel = Cancel::never().unwrap();
    let script = fixture("script-build_script.sh");
    let settings = Settings { full_scripts: true, ..Settings::default() };
    let (backend, log) = dry_run(settings, tmp.path());
    backend.run(&job, &state, &script, "build_script", &cancel).unwrap();
    let full = take(&log);
    assert!(full.contains("\n  export DEPLOY_TOKEN=$'[MASKED]'\n") && !full.contains("  export: "), "{full}");
    let (backend, log) = dry_run(Settings::default(), tmp.path());
    backend.run(&job, &state, &script, "build_script", &cancel).unwrap();
    let folded = take(&log);
    assert!(!folded.contains("DEPLOY_TOKEN"), "{folded}");
    for text in [&full, &folded] {
        assert!(!text.contains(SECRET), "{text}");
    }
    // The transcript has the whole body either way.
    for line in transcript_lines(&tmp.path().join("logs/dry-run/demo-48151623.jsonl")) {
        let body = line["script_body"].as_str().unwrap();
        assert!(body.contains("export DEPLOY_TOKEN=$'[MASKED]'\n"), "{body}");
    }
}

#[test]
fn full_scripts_shows_every_line() {
    let tmp = tempfile::tempdir().unwrap();
    let job = fixture_job(tmp.path());
    let body = exec_like_body("failed", SECRET);
    let script = Script::parse(&script::render(&body));
    let text = report::stage("after_script", &script, &Mask::for_job(&job), None);
    let expected: String = body.replace(SECRET, MASKED).lines().map(|line| format!("  {line}\n")).collect();
    assert_eq!(text, format!("── stage after_script ──\n{expected}"));
}

#[test]
fn a_whole_job_is_shown_and_recorded_without_secrets() {
    let tmp = tempfile::tempdir().unwrap();
    let job = fixture_job(tmp.path());
    let (backend, log) = dry_run(Settings::default(), tmp.path());
    let states = StateDir::new(tmp.path().join("state"));
    let cancel = Cancel::never().unwrap();

    backend.config(&job).unwrap();
    let state = states.create(JobRecord::new(job.key().clone(), "dry-run")).unwrap();
    backend.prepare(&job, &state, &cancel).unwrap();
    let prepare_log = take(&log);
    assert!(prepare_log.starts_with(report::HEADER), "{prepare_log}");
    assert!(prepare_log.contains("  DEPLOY_TOKEN=[MASKED]\n"), "{prepare_log}");

    for stage in ["prepare_script", "build_script"] {
        let script = fixture(&format!("script-{stage}.sh"));
        backend.run(&job, &state, &script, stage, &cancel).unwrap();
    }
    let run_log = take(&log);
    assert!(run_log.starts_with("── stage prepare_script ──\n  echo \"Running on $(hostname)...\"\n"), "{run_log}");
    assert!(run_log.contains("── stage build_script ──\n"), "{run_log}");
    assert!(run_log.contains("\n  make test\n"), "{run_log}");
    assert!(
        run_log.contains("── stage build_script ──\n  export: 23 variables (values as listed at prepare)\n"),
        "{run_log}"
    );

    backend.cleanup(&state).unwrap();
    let cleanup_log = take(&log);
    assert_eq!(cleanup_log.lines().count(), 1, "{cleanup_log}");
    assert!(cleanup_log.contains("demo-48151623.jsonl"), "{cleanup_log}");
    state.remove().unwrap();

    for text in [&prepare_log, &run_log] {
        assert!(!text.contains(SECRET) && !text.contains(JOB_TOKEN));
    }

    let dir = tmp.path().join("logs/dry-run");
    let path = dir.join("demo-48151623.jsonl");
    let raw = fs::read_to_string(&path).unwrap();
    assert!(!raw.contains(SECRET) && !raw.contains(JOB_TOKEN), "{raw}");
    assert!(raw.contains(MASKED));
    assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);

    let lines = transcript_lines(&path);
    let hooks: Vec<&str> = lines.iter().map(|l| l["hook"].as_str().unwrap()).collect();
    assert_eq!(hooks, ["config", "prepare", "run", "run", "cleanup"]);
    for line in &lines {
        assert_eq!(line["job"], "demo-48151623");
        assert!(line["time_unix"].as_u64().unwrap() > 1_600_000_000);
    }
    let prepare = &lines[1];
    assert_eq!(prepare["image"], "registry.example.com/ci/bookworm:latest");
    assert_eq!(prepare["job_name"], "test");
    assert_eq!(prepare["project"], "acme/widget");
    assert_eq!(prepare["variables"]["DEPLOY_TOKEN"], MASKED);
    assert_eq!(prepare["variables"]["MULTI"], "line one\nline two");
    assert_eq!(prepare["variables"]["KUBECONFIG"], "apiVersion: v1\nkind: Config\n");
    assert_eq!(prepare["file_variables"], serde_json::json!(["KUBECONFIG"]));
    assert_eq!(prepare["simulated_failure"], Value::Null);
    let build = &lines[3];
    assert_eq!(build["stage"], "build_script");
    assert_eq!(build["runner_format"], true);
    let body = build["script_body"].as_str().unwrap();
    assert!(body.contains("export DEPLOY_TOKEN=$'[MASKED]'\n") && body.ends_with("\nmake test\n"), "{body}");
    assert_eq!(lines[4]["prepared"], true);
}

#[test]
fn build_failure_of_a_stage_has_the_configured_code() {
    let tmp = tempfile::tempdir().unwrap();
    let job = fixture_job(tmp.path());
    let (backend, log) = dry_run(failing("build_script", FailKind::Build, Some(42)), tmp.path());
    let state = StateDir::new(tmp.path()).create(JobRecord::new(job.key().clone(), "dry-run")).unwrap();
    let cancel = Cancel::never().unwrap();
    backend.prepare(&job, &state, &cancel).unwrap();
    backend.run(&job, &state, &fixture("script-prepare_script.sh"), "prepare_script", &cancel).unwrap();
    let failure = backend.run(&job, &state, &fixture("script-build_script.sh"), "build_script", &cancel).unwrap_err();
    assert!(matches!(failure, Failure::Script { code: 42 }), "{failure:?}");
    let text = take(&log);
    assert!(
        text.ends_with("  make test\nDry run: simulating a build failure of build_script with exit code 42 (settings.fail_stage).\n"),
        "{text}"
    );
    let lines = transcript_lines(&tmp.path().join("logs/dry-run/demo-48151623.jsonl"));
    assert_eq!(lines[2]["simulated_failure"], serde_json::json!({"kind": "build", "exit_code": 42}));
}

#[test]
fn prepare_can_fail_as_build_or_system() {
    let tmp = tempfile::tempdir().unwrap();
    let job = fixture_job(tmp.path());
    let state = StateDir::new(tmp.path()).create(JobRecord::new(job.key().clone(), "dry-run")).unwrap();
    let cancel = Cancel::never().unwrap();

    let (backend, log) = dry_run(failing("prepare", FailKind::Build, None), tmp.path());
    let failure = backend.prepare(&job, &state, &cancel).unwrap_err();
    assert!(matches!(failure, Failure::Script { code: 1 }), "{failure:?}");
    assert!(take(&log).contains("  DEPLOY_TOKEN=[MASKED]\n"), "what was received is shown before failing");

    let (backend, _) = dry_run(failing("prepare", FailKind::System, None), tmp.path());
    let failure = backend.prepare(&job, &state, &cancel).unwrap_err();
    assert!(matches!(failure, Failure::System { .. }), "{failure:?}");
    assert_eq!(failure.to_string(), "dry-run: simulated system failure in prepare (settings.fail_stage)");
    let script = fixture("script-build_script.sh");
    backend.run(&job, &state, &script, "build_script", &cancel).expect("only prepare fails");
}

#[test]
fn system_failure_of_a_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let job = fixture_job(tmp.path());
    let state = StateDir::new(tmp.path()).create(JobRecord::new(job.key().clone(), "dry-run")).unwrap();
    let (backend, _) = dry_run(failing("step_lint", FailKind::System, None), tmp.path());
    let cancel = Cancel::never().unwrap();
    backend.prepare(&job, &state, &cancel).unwrap();
    let failure = backend.run(&job, &state, &fixture("script-build_script.sh"), "step_lint", &cancel).unwrap_err();
    assert!(matches!(failure, Failure::System { .. }), "{failure:?}");
    assert!(failure.to_string().contains("in step_lint (settings.fail_stage)"), "{failure}");
}

#[test]
fn bad_failure_settings_are_rejected_by_new() {
    let tmp = tempfile::tempdir().unwrap();
    let runner = RunnerInfo::new("demo", tmp.path());
    let cases = [
        (failing("build_script", FailKind::Build, Some(0)), "settings.fail_exit_code = 0 is out of range"),
        (failing("build_script", FailKind::Build, Some(256)), "settings.fail_exit_code = 256 is out of range"),
        (failing("build_script", FailKind::Build, Some(-1)), "settings.fail_exit_code = -1 is out of range"),
        (failing("build_script", FailKind::System, Some(3)), "settings.fail_exit_code applies to build failures only"),
        (failing("  ", FailKind::Build, None), "settings.fail_stage is empty"),
        (Settings { fail_exit_code: Some(3), ..Settings::default() }, "need settings.fail_stage"),
        (Settings { fail_kind: FailKind::System, ..Settings::default() }, "need settings.fail_stage"),
        (Settings { transcript_dir: Some("rel/dir".into()), ..Settings::default() }, "settings.transcript_dir"),
    ];
    for (settings, expected) in cases {
        let failure = DryRun::new(settings.clone(), &runner).unwrap_err();
        assert!(matches!(failure, Failure::System { .. }), "{settings:?}: {failure:?}");
        assert!(failure.to_string().contains(expected), "{settings:?}: {failure}");
    }
    for code in [1, 255] {
        DryRun::new(failing("build_script", FailKind::Build, Some(code)), &runner).unwrap();
    }
}

#[test]
fn settings_deserialize_strictly() {
    let settings: Settings =
        serde_json::from_str(r#"{"transcript_dir": "/var/log/dry", "fail_stage": "prepare", "fail_kind": "system"}"#)
            .unwrap();
    assert_eq!(settings.transcript_dir.as_deref(), Some(Path::new("/var/log/dry")));
    assert_eq!(settings.fail_kind, FailKind::System);
    assert_eq!(serde_json::from_str::<Settings>("{}").unwrap(), Settings::default());
    assert!(serde_json::from_str::<Settings>(r#"{"fail_kind": "System"}"#).is_err());
    assert!(serde_json::from_str::<Settings>(r#"{"full_scripts": true}"#).unwrap().full_scripts);
    assert!(!Settings::default().full_scripts);
    assert!(serde_json::from_str::<Settings>(r#"{"full_script": true}"#).is_err());
    let err = serde_json::from_str::<Settings>(r#"{"fail_stages": "x"}"#).unwrap_err();
    assert!(err.to_string().contains("unknown field `fail_stages`"), "{err}");
}

#[test]
fn transcript_dir_setting_is_used() {
    let tmp = tempfile::tempdir().unwrap();
    let job = fixture_job(tmp.path());
    let dir = tmp.path().join("nested/transcripts");
    let settings = Settings { transcript_dir: Some(dir.clone()), ..Settings::default() };
    let (backend, _) = dry_run(settings, tmp.path());
    backend.config(&job).unwrap();
    assert_eq!(transcript_lines(&dir.join("demo-48151623.jsonl")).len(), 1);
    assert!(!tmp.path().join("dry-run").exists());
}

#[test]
fn cleanup_without_prepare_succeeds_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let (backend, _) = dry_run(Settings::default(), tmp.path());
    let states = StateDir::new(tmp.path().join("state"));
    let key = berth_backend_api::JobKey::new("demo", 48151623).unwrap();
    for _ in 0..2 {
        let state = states.open_for_cleanup(&key).unwrap();
        assert!(state.record().is_none());
        backend.cleanup(&state).unwrap();
        state.remove().unwrap();
    }
    let lines = transcript_lines(&tmp.path().join("logs/dry-run/demo-48151623.jsonl"));
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["hook"] == "cleanup" && l["prepared"] == false));
}

#[test]
fn cleanup_succeeds_when_the_transcript_cannot_be_written() {
    let tmp = tempfile::tempdir().unwrap();
    let blocker = tmp.path().join("not-a-dir");
    fs::write(&blocker, "").unwrap();
    let (backend, log) = dry_run(Settings { transcript_dir: Some(blocker), ..Settings::default() }, tmp.path());
    let key = berth_backend_api::JobKey::new("demo", 1).unwrap();
    let state = StateDir::new(tmp.path().join("state")).open_for_cleanup(&key).unwrap();
    backend.cleanup(&state).unwrap();
    assert_eq!(take(&log), "");

    // prepare, whose transcript is the product, fails as a system failure.
    let job = fixture_job(tmp.path());
    let failure = backend.prepare(&job, &state, &Cancel::never().unwrap()).unwrap_err();
    assert!(failure.to_string().starts_with("dry-run: failed to write the transcript "), "{failure}");
}

#[test]
fn unreadable_script_is_a_system_failure_naming_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let job = fixture_job(tmp.path());
    let state = StateDir::new(tmp.path()).create(JobRecord::new(job.key().clone(), "dry-run")).unwrap();
    let (backend, _) = dry_run(Settings::default(), tmp.path());
    let missing = tmp.path().join("missing.sh");
    let failure = backend.run(&job, &state, &missing, "build_script", &Cancel::never().unwrap()).unwrap_err();
    assert!(matches!(failure, Failure::System { .. }), "{failure:?}");
    assert!(failure.to_string().contains(&missing.display().to_string()), "{failure}");
}

#[test]
fn a_script_not_in_the_runner_format_is_shown_raw() {
    let tmp = tempfile::tempdir().unwrap();
    let job = fixture_job(tmp.path());
    let state = StateDir::new(tmp.path()).create(JobRecord::new(job.key().clone(), "dry-run")).unwrap();
    let (backend, log) = dry_run(Settings::default(), tmp.path());
    let script = tmp.path().join("script.sh");
    fs::write(&script, format!("#!/bin/sh\necho {SECRET}\n")).unwrap();
    backend.run(&job, &state, &script, "build_script", &Cancel::never().unwrap()).unwrap();
    assert_eq!(
        take(&log),
        "── stage build_script ──\n(not in the runner's script format: showing the file as it is)\n  #!/bin/sh\n  echo [MASKED]\n"
    );
    let lines = transcript_lines(&tmp.path().join("logs/dry-run/demo-48151623.jsonl"));
    assert_eq!(lines[0]["runner_format"], false);
    assert_eq!(lines[0]["script_body"], "#!/bin/sh\necho [MASKED]\n");
}

/// Job `id` of runner `demo` (token `job-token-<id × 1111>`) whose masked
/// variable `name` holds `secret`, from a payload written in `dir`.
fn masked_job(dir: &std::path::Path, id: u64, name: &str, secret: &str) -> JobContext {
    let mut response = JobResponse::new(id);
    response.token = format!("job-token-{}", id * 1111);
    response.variables.push(ResponseVariable::new(name, secret).masked());
    let response_path = dir.join("response.json");
    fs::write(&response_path, serde_json::to_vec(&response).unwrap()).unwrap();
    JobContext::from_vars(
        "demo",
        [
            ("JOB_RESPONSE_FILE".to_owned(), response_path.to_str().unwrap().to_owned()),
            (format!("CUSTOM_ENV_{name}"), secret.to_owned()),
        ],
    )
    .unwrap()
}

#[test]
fn secrets_are_masked_in_their_shell_quoted_forms() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = "it's-a\\secret\"value";
    let job = masked_job(tmp.path(), 5, "QUOTED", secret);
    let body = format!("export QUOTED={}\necho done\n", script::quote(secret));
    let rendered = script::render(&body);
    let decoded = tmp.path().join("decoded.sh");
    fs::write(&decoded, &rendered).unwrap();
    // Not recognised as the runner's format: the body is shown still quoted twice.
    let raw = tmp.path().join("raw.sh");
    fs::write(&raw, rendered.replace("eval $'", "eval  $'")).unwrap();

    let state = StateDir::new(tmp.path()).create(JobRecord::new(job.key().clone(), "dry-run")).unwrap();
    let (backend, log) = dry_run(Settings::default(), tmp.path());
    let cancel = Cancel::never().unwrap();
    backend.prepare(&job, &state, &cancel).unwrap();
    backend.run(&job, &state, &decoded, "build_script", &cancel).unwrap();
    backend.run(&job, &state, &raw, "after_script", &cancel).unwrap();
    let text = take(&log);
    let transcript = fs::read_to_string(tmp.path().join("logs/dry-run/demo-5.jsonl")).unwrap();
    assert!(text.contains("  export QUOTED=$'[MASKED]'\n"), "{text}");
    assert!(text.contains("export QUOTED=$\\'[MASKED]\\'"), "{text}");
    for fragment in ["secret", "it's", "it\\'s", "job-token-5555"] {
        assert!(!text.contains(fragment), "{fragment:?} in {text}");
        assert!(!transcript.contains(fragment), "{fragment:?} in {transcript}");
    }
}

#[test]
fn a_cancelled_hook_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let job = fixture_job(tmp.path());
    let state = StateDir::new(tmp.path()).create(JobRecord::new(job.key().clone(), "dry-run")).unwrap();
    let (backend, log) = dry_run(Settings::default(), tmp.path());
    let (cancel, trigger) = Cancel::pair().unwrap();
    trigger.fire();
    assert!(matches!(backend.prepare(&job, &state, &cancel), Err(Failure::Cancelled)));
    let script = fixture("script-build_script.sh");
    assert!(matches!(backend.run(&job, &state, &script, "build_script", &cancel), Err(Failure::Cancelled)));
    assert_eq!(take(&log), "");
}

/// What a dry run shows and writes of a job whose masked variable holds
/// `secret`: its job log and every string of its transcript.
fn shown_by_a_dry_run(secret: &str) -> (String, String) {
    let tmp = tempfile::tempdir().unwrap();
    let job = masked_job(tmp.path(), 6, "SECRET", secret);
    // As berth exec's runner imitation writes a stage (the runner's quoting).
    let body = format!(
        "export SECRET={}\necho {}\nprintf '%s\\n' {}\n",
        script::quote(secret),
        script::quote(&format!("value: {secret}")),
        script::quote(secret)
    );
    let rendered = script::render(&body);
    let decoded = tmp.path().join("decoded.sh");
    fs::write(&decoded, &rendered).unwrap();
    let raw = tmp.path().join("raw.sh");
    fs::write(&raw, rendered.replace("eval $'", "eval  $'")).unwrap();
    let state = StateDir::new(tmp.path()).create(JobRecord::new(job.key().clone(), "dry-run")).unwrap();
    let settings = Settings { full_scripts: true, ..Settings::default() };
    let (backend, log) = dry_run(settings, tmp.path());
    let cancel = Cancel::never().unwrap();
    backend.prepare(&job, &state, &cancel).unwrap();
    backend.run(&job, &state, &decoded, "build_script", &cancel).unwrap();
    backend.run(&job, &state, &raw, "after_script", &cancel).unwrap();
    let mut strings = String::new();
    for record in transcript_lines(&tmp.path().join("logs/dry-run/demo-6.jsonl")) {
        collect_strings(&record, &mut strings);
    }
    (take(&log), strings)
}

fn collect_strings(value: &Value, out: &mut String) {
    match value {
        Value::String(s) => {
            out.push_str(s);
            out.push('\0');
        }
        Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        Value::Object(map) => map.iter().for_each(|(k, v)| {
            out.push_str(k);
            out.push('\0');
            collect_strings(v, out);
        }),
        _ => {}
    }
}

/// The forms of `secret` found in `text` around its masks.
fn leaked_forms(secret: &str, text: &str) -> Vec<String> {
    let left = text.replace(MASKED, "\0");
    let once = script::escape(secret);
    let twice = script::escape(&once);
    [secret.to_owned(), once, twice].into_iter().filter(|form| left.contains(form.as_str())).collect()
}

#[test]
fn a_non_ascii_secret_leaks_in_no_escaped_form() {
    let secret = "pässwörd-ünïcødé";
    let (log, transcript) = shown_by_a_dry_run(secret);
    assert!(log.contains("export SECRET=$'[MASKED]'"), "{log}");
    assert_eq!(leaked_forms(secret, &log), Vec::<String>::new(), "{log}");
    assert_eq!(leaked_forms(secret, &transcript), Vec::<String>::new(), "{transcript}");
    for fragment in ["xc3", "xa4", "job-token-6666"] {
        assert!(!log.contains(fragment), "{fragment:?} in {log}");
        assert!(!transcript.contains(fragment), "{fragment:?} in {transcript}");
    }
}

mod property {
    use super::*;
    use proptest::prelude::*;

    fn secret() -> impl Strategy<Value = String> {
        let c = prop_oneof![
            3 => any::<char>().prop_filter("no NUL", |c| *c != '\0'),
            2 => prop::sample::select(vec!['\'', '\\', '\n', '"', '$', ' ', '\x1b']),
            2 => prop::sample::select(vec!['é', 'ö', '☃', '\u{80}', '🚀']),
        ];
        // GitLab masks values of 8 characters or more.
        prop::collection::vec(c, 8..20).prop_map(|cs| cs.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn no_form_of_a_masked_value_reaches_the_job_log_or_the_transcript(s in secret()) {
            let (log, transcript) = shown_by_a_dry_run(&s);
            prop_assert!(leaked_forms(&s, &log).is_empty(), "job log: {:?}", log);
            prop_assert!(leaked_forms(&s, &transcript).is_empty(), "transcript: {:?}", transcript);
        }
    }
}
