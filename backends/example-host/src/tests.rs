use std::fs;

use berth_backend_api::{testing::prerequisite, JobKey, JobRecord, StateDir};

use super::*;

fn backend(state_dir: &Path, builds_dir: Option<&Path>) -> ExampleHost {
    let mut runner = RunnerInfo::new("ex", state_dir);
    runner.builds_dir = builds_dir.map(|dir| dir.display().to_string());
    ExampleHost::new(Settings::default(), &runner).unwrap()
}

fn job(id: u64) -> JobContext {
    JobContext::from_vars("ex", [("CUSTOM_ENV_CI_JOB_ID".to_owned(), id.to_string())]).unwrap()
}

/// Whether stages can run here (root, unshare); else `false`, with the reason printed.
fn can_unshare() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    prerequisite((!root).then(|| "example-host runs stages under unshare, which needs root".to_owned()))
}

#[test]
fn settings_are_checked_and_the_description_claims_no_isolation() {
    assert!(toml::from_str::<Settings>("path = \"/bin\"").is_ok());
    assert!(toml::from_str::<Settings>("pth = \"/bin\"").is_err(), "unknown keys are refused");
    let runner = RunnerInfo::new("ex", "/var/lib/berth");
    let err = ExampleHost::new(Settings { path: Some("bin:/usr/bin".into()) }, &runner).unwrap_err();
    assert!(matches!(err, Failure::System { .. }) && err.to_string().contains("absolute"), "{err}");
    let description = backend(Path::new("/var/lib/berth"), None).describe();
    assert_eq!(description.isolation, Isolation::Host);
    assert!(!description.capabilities.contains_root && description.capabilities.executes_scripts);
}

#[test]
fn config_names_dirs_under_the_state_and_refuses_a_bind_target_that_is_not_there() {
    let dir = tempfile::tempdir().unwrap();
    let out = backend(dir.path(), None).config(&job(1)).unwrap();
    let builds = out.builds_dir.unwrap();
    assert_eq!(builds, dir.path().join("jobs/ex-1/scratch/builds").display().to_string());
    assert!(out.cache_dir.unwrap().starts_with(&dir.path().display().to_string()));
    let missing = dir.path().join("no-such-dir");
    let err = backend(dir.path(), Some(&missing)).config(&job(1)).unwrap_err();
    assert!(err.to_string().contains(&format!("sets {} for jobs", missing.display())), "{err}");
    let out = backend(dir.path(), Some(dir.path())).config(&job(1)).unwrap();
    assert_eq!(out.builds_dir.as_deref(), Some(dir.path().to_str().unwrap()));
}

#[test]
fn run_without_prepare_is_a_system_failure() {
    let dir = tempfile::tempdir().unwrap();
    let state =
        StateDir::new(dir.path()).create(JobRecord::new(JobKey::new("ex", 2).unwrap(), "example-host")).unwrap();
    let err = backend(dir.path(), None)
        .run(&job(2), &state, Path::new("/nonexistent"), "build_script", &Cancel::never().unwrap())
        .unwrap_err();
    assert!(matches!(err, Failure::System { .. }) && err.to_string().contains("was not prepared"), "{err}");
}

#[test]
fn stages_run_in_the_builds_dir_bound_where_the_runner_says_and_a_failed_bind_is_a_system_failure() {
    if !can_unshare() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen-builds");
    fs::create_dir(&seen).unwrap();
    let b = backend(&dir.path().join("state"), Some(&seen));
    let job = job(3);
    let state =
        StateDir::new(dir.path().join("state")).create(JobRecord::new(job.key().clone(), "example-host")).unwrap();
    b.prepare(&job, &state, &Cancel::never().unwrap()).unwrap();
    let script = dir.path().join("script");
    fs::write(&script, format!("echo hi > {}/file && test \"$$\" -lt 10 && exit 7\n", seen.display())).unwrap();
    let result = b.run(&job, &state, &script, "build_script", &Cancel::never().unwrap());
    assert!(matches!(result, Err(Failure::Script { code: 7 })), "{result:?}");
    let builds = state.scratch(BUILDS_SCRATCH).unwrap();
    assert_eq!(fs::read_to_string(builds.join("file")).unwrap(), "hi\n", "written through the bind");
    assert_eq!(fs::read_dir(&seen).unwrap().count(), 0, "the host's directory is untouched");
    // The bind target vanished between config and run: the wrapper fails, not the script.
    fs::remove_dir(&seen).unwrap();
    let err = b.run(&job, &state, &script, "build_script", &Cancel::never().unwrap()).unwrap_err();
    assert!(matches!(err, Failure::System { .. }), "{err:?}");
    assert!(err.to_string().contains("before the stage's script started: mount"), "{err}");
    state.remove().unwrap();
}
