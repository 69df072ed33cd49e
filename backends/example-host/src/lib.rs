//! An example berth backend for backend authors, built the way
//! `docs/writing-a-backend.md` says, step by step: each stage of a job runs
//! under `unshare` in PID and mount namespaces of its own, **on the host's
//! filesystem**. It declares isolation `host`, honestly: a job sees the
//! host's files and the other jobs' files, and runs as berth's user.
//!
//! What it shows:
//!
//! - `config` names the job's builds and cache directories under berth's
//!   state ([`RunnerInfo::host_dirs`]), never the host's `/builds`;
//! - `prepare` makes them ([`JobState::scratch`]) and records them
//!   ([`JobState::save`]);
//! - `run` finds them again ([`JobState::load`]) and runs the stage through
//!   a wrapper ([`StageCommand::wrapped`], [`process::run_stage`]): when the
//!   runner's TOML sets `builds_dir` or `cache_dir`, the wrapper binds the
//!   host directory onto that path in the stage's mount namespace, and a
//!   bind that fails is a system failure, not the script's;
//! - `cleanup` has nothing to do: a stage's processes end with its PID
//!   namespace, and berth removes the job's state, scratch included.
//!
//! Use: `plugin = ".../libberth_backend_example_host.so"`; settings: `path`,
//! the `PATH` of stages. Needs root (or `CAP_SYS_ADMIN`) and util-linux's
//! `unshare` and `mount`.
#![deny(missing_docs)]
#![doc(test(attr(deny(warnings))))]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_backend_api::process::{self, StageCommand};
use berth_backend_api::{
    Backend, Cancel, Capabilities, ConfigOutput, Description, Failure, Isolation, JobContext, JobState, MappedDir,
    NewBackend, RunnerInfo, BUILDS_SCRATCH,
};
use serde::{Deserialize, Serialize};

/// The `PATH` of stages unless the settings give one.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long a cancelled stage gets between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(2);

/// The job's record in its state.
const RECORD: &str = "example-host.json";

/// Binds `host job` pairs given as arguments up to `--`, then execs the rest.
const BINDER: &str = r#"while [ "$1" != -- ]; do mount --bind "$1" "$2" || exit; shift 2; done; shift; exec "$@""#;

/// `[runners.NAME.settings]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The `PATH` of stages (default: Debian's).
    pub path: Option<String>,
}

/// The backend of one runner.
#[derive(Debug)]
pub struct ExampleHost {
    runner: RunnerInfo,
    path: String,
}

/// What prepare made, for run.
#[derive(Debug, Serialize, Deserialize)]
struct Prepared {
    /// The job's builds and cache directories.
    dirs: Vec<MappedDir>,
    /// The job's `HOME`.
    home: PathBuf,
}

impl NewBackend for ExampleHost {
    type Settings = Settings;

    fn new(settings: Settings, runner: &RunnerInfo) -> Result<Self, Failure> {
        let path = settings.path.unwrap_or_else(|| DEFAULT_PATH.to_owned());
        if path.is_empty() || path.split(':').any(|dir| !dir.starts_with('/')) {
            return Err(Failure::system(format!("path {path:?}: give absolute directories separated by ':'")));
        }
        Ok(ExampleHost { runner: runner.clone(), path })
    }
}

impl Backend for ExampleHost {
    fn describe(&self) -> Description {
        Description::new(
            "example-host",
            env!("CARGO_PKG_VERSION"),
            "example: each stage under unshare (own PID and mount namespaces) on the host's filesystem",
        )
        .isolation(Isolation::Host)
        .capabilities(Capabilities::none().executes_scripts(true).cancel(true).concurrent_jobs(true))
    }

    fn config(&self, job: &JobContext) -> Result<ConfigOutput, Failure> {
        let dirs = self.runner.host_dirs(job);
        for dir in [&dirs.builds, &dirs.cache] {
            bind_target(dir)?;
        }
        Ok(dirs.config_output())
    }

    fn prepare(&self, job: &JobContext, state: &JobState, _cancel: &Cancel) -> Result<(), Failure> {
        let dirs = self.runner.host_dirs(job);
        // The directory config named: the job's scratch `builds`.
        let builds = state.scratch(BUILDS_SCRATCH)?;
        std::fs::create_dir_all(&dirs.cache.host)
            .map_err(|e| Failure::system_with(format!("failed to create {}", dirs.cache.host.display()), e))?;
        let home = state.scratch("home")?;
        state.save(RECORD, &Prepared { dirs: vec![dirs.builds, dirs.cache], home })?;
        println!("example-host: job {} builds in {}", job.key(), builds.display());
        Ok(())
    }

    fn run(
        &self,
        _job: &JobContext,
        state: &JobState,
        script: &Path,
        _stage: &str,
        cancel: &Cancel,
    ) -> Result<(), Failure> {
        let prepared: Prepared = state
            .load(RECORD)?
            .ok_or_else(|| Failure::system(format!("job {} was not prepared: it has no record", state.key())))?;
        let mut unshare = Command::new("unshare");
        unshare.args(["--pid", "--fork", "--kill-child", "--mount-proc", "--propagation", "private"]);
        unshare.args(["/bin/sh", "-c", BINDER, "binder"]);
        for dir in prepared.dirs.iter().filter(|dir| dir.is_mapped()) {
            unshare.arg(&dir.host).arg(&dir.job);
        }
        unshare.arg("--");
        let mut stage = StageCommand::wrapped(unshare, script);
        stage
            .command()
            .current_dir(&prepared.dirs[0].host)
            .env_clear()
            .env("PATH", &self.path)
            .env("HOME", &prepared.home)
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null());
        process::run_stage(stage, cancel, GRACE)
    }

    fn cleanup(&self, _state: &JobState) -> Result<(), Failure> {
        // A stage's processes ended with its PID namespace; berth removes
        // the job's state, its scratch directories included.
        Ok(())
    }
}

/// Refuses a path the runner's TOML names that cannot be bound onto: the
/// bind needs an existing directory there, and making one would change the
/// host's filesystem.
fn bind_target(dir: &MappedDir) -> Result<(), Failure> {
    if dir.is_mapped() && !Path::new(&dir.job).is_dir() {
        return Err(Failure::system(format!(
            "the runner's TOML sets {} for jobs, which is not a directory on this host: example-host binds the \
             job's directory onto it in the stage's mount namespace; create it (empty) or remove the setting",
            dir.job
        )));
    }
    Ok(())
}

berth_backend_api::export_backend!(ExampleHost);

#[cfg(test)]
mod tests;

/// The guide's Rust code blocks, compiled (warnings denied) and run as
/// doc-tests, so that the guide cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/writing-a-backend.md")]
pub struct Guide;
