//! The four hooks gitlab-runner calls, plus `describe` and `reap`.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use berth_backend_api::{Backend, Cancel, ConfigOutput, JobContext, JobRecord, JobState, StateDir};
use serde::Serialize;
use tracing::{info, warn};

use crate::config::Runner;
use crate::error::Error;

type Result<T> = std::result::Result<T, Error>;

/// A cancel signal that fires on SIGTERM (the runner's cancel) or SIGINT.
pub fn cancel_on_signals() -> Result<Cancel> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
        .context("failed to create the cancel pipe")?;
    let write2: OwnedFd = write.try_clone().context("failed to create the cancel pipe")?;
    signal_hook::low_level::pipe::register(signal_hook::consts::SIGTERM, write).context("failed to handle SIGTERM")?;
    signal_hook::low_level::pipe::register(signal_hook::consts::SIGINT, write2).context("failed to handle SIGINT")?;
    Ok(Cancel::from_fd(read))
}

#[derive(Serialize)]
struct Driver<'a> {
    name: &'a str,
    version: &'a str,
}

#[derive(Serialize)]
struct ConfigJson<'a> {
    driver: Driver<'a>,
    #[serde(flatten)]
    output: &'a ConfigOutput,
}

/// `berth config`: the JSON object for stdout; warnings go to the job log.
pub fn config(runner: &Runner, backend: &dyn Backend, job: &JobContext) -> Result<String> {
    let description = backend.describe();
    let mut output = backend.config(job)?;
    if runner.builds_dir.is_some() {
        output.builds_dir = runner.builds_dir.clone();
    }
    if runner.cache_dir.is_some() {
        output.cache_dir = runner.cache_dir.clone();
    }
    // gitlab-runner needs both; berth always answers so its config.toml need not set them.
    output.builds_dir.get_or_insert_with(|| "/builds".to_owned());
    output.cache_dir.get_or_insert_with(|| "/cache".to_owned());
    for warning in &output.warnings {
        eprintln!("WARNING: {warning}");
    }
    let json =
        ConfigJson { driver: Driver { name: &description.name, version: &description.version }, output: &output };
    Ok(serde_json::to_string(&json).context("failed to encode config output")?)
}

/// `berth prepare`.
pub fn prepare(runner: &Runner, backend: &dyn Backend, job: &JobContext, cancel: &Cancel) -> Result<()> {
    let states = StateDir::new(&runner.state_dir);
    let record = JobRecord::new(job.key().clone(), backend.describe().name)
        .runner_tmpdir(job.tmpdir().map(Path::to_owned))
        .timeout_secs(job.timeout());
    let state = states.create(record)?;
    info!(job = %job.key(), "prepare");
    note_stage(&state, "prepare");
    backend.prepare(job, &state, cancel)?;
    Ok(())
}

/// `berth run SCRIPT STAGE`.
pub fn run(
    runner: &Runner,
    backend: &dyn Backend,
    job: &JobContext,
    script: &Path,
    stage: &str,
    cancel: &Cancel,
) -> Result<()> {
    let states = StateDir::new(&runner.state_dir);
    let state = states.open(job.key())?;
    info!(job = %job.key(), stage, "run");
    note_stage(&state, stage);
    backend.run(job, &state, script, stage, cancel)?;
    Ok(())
}

/// Records the step a hook starts, for `berth ps`; what `ps` shows is not
/// worth failing a job for.
fn note_stage(state: &JobState, name: &str) {
    if let Err(e) = state.set_stage(name) {
        warn!(job = %state.key(), stage = name, "failed to record the stage for `berth ps`: {e}");
    }
}

/// `berth cleanup`: idempotent; works for a job never or half prepared.
pub fn cleanup(runner: &Runner, backend: &dyn Backend, job: &JobContext) -> Result<()> {
    let states = StateDir::new(&runner.state_dir);
    let state = states.open_for_cleanup(job.key())?;
    info!(job = %job.key(), prepared = state.record().is_some(), "cleanup");
    if state.record().is_some() {
        note_stage(&state, "cleanup");
    }
    backend.cleanup(&state)?;
    // A backend may hand the removal of what is left (its layers, the state)
    // to a background process holding the job's lock.
    if !state.handed_over() {
        state.remove()?;
    }
    Ok(())
}

/// `berth reap`: cleans up jobs whose runner is gone.
pub fn reap(runner: &Runner, backend: &dyn Backend, grace: Duration, dry_run: bool) -> Result<()> {
    let states = StateDir::new(&runner.state_dir);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut known = Vec::new();
    let mut removed = 0;
    let _reap = tracing::info_span!("reap", runner = %runner.name).entered();
    for key in states.list()?.into_iter().filter(|k| k.runner() == runner.name) {
        let _job = tracing::info_span!("job", job = key.id()).entered();
        let Some(state) = states.try_open(&key)? else {
            info!("busy: a hook is using it");
            known.push(key);
            continue;
        };
        let verdict = match state.record() {
            None => Some("no record (prepare never started)".to_owned()),
            Some(record) => gone(record, now, grace),
        };
        let Some(reason) = verdict else {
            known.push(key);
            continue;
        };
        if dry_run {
            println!("would remove {key}: {reason}");
            known.push(key);
            continue;
        }
        if state.record().is_some() {
            note_stage(&state, "cleanup");
        }
        let cleaned = backend.cleanup(&state).map_err(Error::from);
        match cleaned.and_then(|()| if state.handed_over() { Ok(()) } else { Ok(state.remove()?) }) {
            Ok(()) => {
                println!("removed {key}: {reason}");
                removed += 1;
            }
            Err(e) => {
                let e = e.report();
                warn!("reap failed: {e}");
                eprintln!("failed to remove {key}: {e}");
                known.push(key);
            }
        }
    }
    if dry_run {
        match backend.orphans(&known)? {
            Some(lines) => lines.iter().for_each(|line| println!("would remove {line}")),
            None => println!(
                "(backend {} cannot tell what else `berth reap` would remove: environments whose job state is gone, and what it keeps for jobs)",
                backend.describe().name
            ),
        }
    } else {
        for line in backend.reap_orphans(&known)? {
            println!("removed {line}");
            removed += 1;
        }
    }
    info!(removed, "reap done");
    Ok(())
}

/// Why a job whose state is unlocked counts as gone, or `None` while it may
/// run (`berth ps` asks with no grace: what reap removes once its grace passed).
pub(crate) fn gone(record: &JobRecord, now: u64, grace: Duration) -> Option<String> {
    let age = now.saturating_sub(record.created_unix);
    if age < grace.as_secs() {
        return None;
    }
    if let Some(dir) = &record.runner_tmpdir {
        if !dir.exists() {
            return Some(format!("the runner removed its job directory {}", dir.display()));
        }
    }
    let limit = record.timeout_secs.unwrap_or(24 * 3600) + grace.as_secs();
    (age > limit).then(|| format!("older than the job timeout plus grace ({age} s)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Class;
    use berth_backend_api::testing::FakeBackend;
    use berth_backend_api::{JobKey, StateError};

    /// A runner whose state lives in a temp dir, and a job of it (id 7).
    struct Setup {
        dir: tempfile::TempDir,
        runner: Runner,
        job: JobContext,
    }

    fn setup(extra: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "state_dir = {:?}\n[runners.demo]\nbackend = \"dry-run\"\n{extra}",
            dir.path().join("state").display().to_string()
        );
        let runner = crate::config::parse(&text, Path::new("test.toml"), None).unwrap();
        let vars = [("CUSTOM_ENV_CI_JOB_ID", "7"), ("TMPDIR", dir.path().to_str().unwrap())];
        let job = JobContext::from_vars("demo", vars.map(|(k, v)| (k.to_owned(), v.to_owned()))).unwrap();
        Setup { dir, runner, job }
    }

    fn never() -> Cancel {
        Cancel::never().unwrap()
    }

    #[test]
    fn config_answers_json_with_the_drivers_name_and_the_runners_dirs() {
        let s = setup("builds_dir = \"/srv/builds\"\n");
        let json: serde_json::Value =
            serde_json::from_str(&config(&s.runner, &FakeBackend::default(), &s.job).unwrap()).unwrap();
        assert_eq!(json["driver"]["name"], "fake");
        assert_eq!(json["builds_dir"], "/srv/builds", "the runner's TOML overrides the backend");
        assert_eq!(json["cache_dir"], "/cache", "the backend's answer where the runner says nothing");
    }

    #[test]
    fn a_job_is_prepared_run_and_cleaned_up_in_its_state_dir() {
        let s = setup("");
        let backend = FakeBackend { fail_stage: Some("build_script".into()), fail_code: 42, ..Default::default() };
        let script = s.dir.path().join("script");
        prepare(&s.runner, &backend, &s.job, &never()).unwrap();
        let states = StateDir::new(&s.runner.state_dir);
        assert_eq!(states.list().unwrap(), vec![s.job.key().clone()], "prepare leaves the job's state");
        run(&s.runner, &backend, &s.job, &script, "step_script", &never()).unwrap();
        let err = run(&s.runner, &backend, &s.job, &script, "build_script", &never()).unwrap_err();
        assert_eq!(err.class(), Class::Script(42), "{}", err.report());
        cleanup(&s.runner, &backend, &s.job).unwrap();
        assert!(states.list().unwrap().is_empty(), "cleanup removes the state");
        cleanup(&s.runner, &backend, &s.job).unwrap();
        assert_eq!(backend.calls(), ["prepare", "run step_script", "run build_script", "cleanup", "cleanup"]);
    }

    #[test]
    fn each_hook_records_the_step_it_starts_for_ps() {
        let s = setup("");
        let backend = FakeBackend::default();
        let states = StateDir::new(&s.runner.state_dir);
        let stage = || states.peek_all().unwrap().pop().and_then(|p| p.stage).map(|s| s.name);
        prepare(&s.runner, &backend, &s.job, &never()).unwrap();
        assert_eq!(stage().as_deref(), Some("prepare"));
        run(&s.runner, &backend, &s.job, &s.dir.path().join("script"), "step_script", &never()).unwrap();
        assert_eq!(stage().as_deref(), Some("step_script"));
        let lock = states.open(s.job.key()).unwrap();
        assert_eq!(states.peek_all().unwrap()[0].locked, Some(true), "a hook holds the job: ps says it runs");
        drop(lock);
        cleanup(&s.runner, &backend, &s.job).unwrap();
        assert!(states.peek_all().unwrap().is_empty());
    }

    #[test]
    fn a_stage_of_a_job_never_prepared_is_a_system_failure_and_reaches_no_backend() {
        let s = setup("");
        let backend = FakeBackend::default();
        let err = run(&s.runner, &backend, &s.job, Path::new("/x"), "build_script", &never()).unwrap_err();
        assert!(matches!(err, Error::State(StateError::NotPrepared(_))), "{}", err.report());
        assert_eq!(err.class(), Class::System);
        assert!(backend.calls().is_empty());
    }

    #[test]
    fn a_retried_prepare_reaches_the_backend_again_over_the_kept_state() {
        let s = setup("");
        let backend = FakeBackend::default();
        prepare(&s.runner, &backend, &s.job, &never()).unwrap();
        let states = StateDir::new(&s.runner.state_dir);
        let marker = states.open(s.job.key()).unwrap().dir().join("left-by-attempt-1");
        std::fs::write(&marker, "").unwrap();
        prepare(&s.runner, &backend, &s.job, &never()).unwrap();
        assert!(marker.exists(), "the runner retries prepare: the backend sees what the first attempt left");
        assert_eq!(backend.calls(), ["prepare", "prepare"]);
    }

    #[test]
    fn reap_removes_jobs_whose_runner_is_gone_and_keeps_the_others() {
        let s = setup("");
        let backend = FakeBackend::default();
        let states = StateDir::new(&s.runner.state_dir);
        let two_minutes_ago = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() - 120;
        let record = |id: u64, tmp: &Path| {
            let mut record = JobRecord::new(JobKey::new("demo", id).unwrap(), "fake").runner_tmpdir(Some(tmp.into()));
            record.created_unix = two_minutes_ago; // past the grace, within the timeout
            record
        };
        drop(states.create(record(1, Path::new("/nonexistent/berth-runner-dir"))).unwrap());
        drop(states.create(record(2, s.dir.path())).unwrap());
        reap(&s.runner, &backend, Duration::from_secs(60), true).unwrap();
        assert_eq!(states.list().unwrap().len(), 2, "a dry run removes nothing");
        assert!(backend.calls().is_empty());
        reap(&s.runner, &backend, Duration::from_secs(60), false).unwrap();
        assert_eq!(states.list().unwrap(), vec![JobKey::new("demo", 2).unwrap()]);
        assert_eq!(backend.calls(), ["cleanup"]);
    }

    #[test]
    fn a_job_is_gone_when_its_runner_dir_vanished_or_it_outlived_its_timeout() {
        let key = JobKey::new("demo", 1).unwrap();
        let grace = Duration::from_secs(60);
        let mut record = JobRecord::new(key, "x")
            .runner_tmpdir(Some("/nonexistent/custom-executor1".into()))
            .timeout_secs(Some(3600));
        record.created_unix = 1_000_000;
        assert!(gone(&record, 1_000_030, grace).is_none(), "within grace");
        assert!(gone(&record, 1_000_100, grace).unwrap().contains("removed its job directory"));
        record.runner_tmpdir = Some(std::env::temp_dir());
        assert!(gone(&record, 1_000_100, grace).is_none(), "runner dir still there, within timeout");
        assert!(gone(&record, 1_000_000 + 3600 + 61, grace).unwrap().contains("timeout"));
    }
}
