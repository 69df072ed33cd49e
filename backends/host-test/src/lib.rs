//! A **test fixture**, not a backend for users: runs each stage script with
//! bash directly on the host, in a per-job directory, with no isolation at
//! all (like GitLab Runner's own test driver). berth's test suite uses it to
//! drive the protocol with scripts that really run, and, through
//! [`Settings::fault`], to prove that every conformance check catches the
//! defect it is meant for.
//!
//! berth refuses to load it unless `BERTH_ALLOW_TEST_BACKENDS=1`.
#![deny(missing_docs)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_backend_api::process::{self, StageCommand};
use berth_backend_api::{
    Backend, Cancel, Capabilities, ConfigOutput, Description, Failure, Isolation, JobContext, JobState, NewBackend,
    RunnerInfo,
};
use serde::Deserialize;

/// A deliberate defect, for proving the conformance suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// Every failing script is reported with exit code 1.
    LoseExitCode,
    /// A failing script is reported as a system failure.
    SystemForBuild,
    /// cleanup fails when there is nothing left to clean.
    CleanupNotIdempotent,
    /// A cancel is ignored: the stage runs to its end.
    IgnoreSigterm,
    /// prepare leaves a process holding the job log.
    DaemonHoldsLog,
    /// cleanup leaves the job's directory behind.
    LeakState,
    /// Every stage starts in an empty project directory.
    LoseFilesBetweenStages,
    /// prepare writes the job's variables, masked ones too, to a state file.
    LeakMasked,
    /// run refuses stages it does not know.
    RejectUnknownStage,
    /// The job's directory is named after `CUSTOM_ENV_CI_JOB_ID`.
    TrustUserJobId,
    /// prepare starts a process that cleanup does not stop.
    LeakProcess,
    /// Declares filesystem isolation it does not provide.
    ClaimIsolation,
    /// Declares container isolation and `contains_root` but runs jobs as bash on the host: every
    /// `containment.*` check must fail (their job scripts are harmless there).
    ClaimContainment,
    /// prepare mounts a tmpfs (at `/run/berth-leak-<job>`) that cleanup leaves mounted. Needs root.
    LeakMount,
    /// prepare panics (a plugin must turn that into a system failure).
    PanicInPrepare,
    /// config names a host directory ([`Settings::host_builds`], default
    /// `/builds`) as the builds directory, as a host-level backend that
    /// forgets to map it does: jobs write the host's files, outside the
    /// backend's state.
    HostBuilds,
    /// Declares isolation `none` ("nothing runs") while it executes scripts.
    ContradictCapabilities,
}

/// `[runners.NAME.settings]` of the fixture.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Settings {
    /// Where per-job directories go (default: `<state_dir>/host-test`).
    pub root: Option<PathBuf>,
    /// A deliberate defect.
    pub fault: Option<Fault>,
    /// The host directory of [`Fault::HostBuilds`] (default `/builds`).
    pub host_builds: Option<PathBuf>,
}

/// The fixture backend.
#[derive(Debug)]
pub struct HostTest {
    root: PathBuf,
    fault: Option<Fault>,
    host_builds: PathBuf,
}

impl NewBackend for HostTest {
    type Settings = Settings;

    fn new(settings: Settings, runner: &RunnerInfo) -> Result<Self, Failure> {
        Ok(HostTest {
            root: settings.root.unwrap_or_else(|| runner.state_dir.join("host-test")),
            fault: settings.fault,
            host_builds: settings.host_builds.unwrap_or_else(|| PathBuf::from("/builds")),
        })
    }
}

impl HostTest {
    fn job_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn dir_for(&self, job: &JobContext) -> PathBuf {
        match (self.fault, job.variable("CI_JOB_ID")) {
            (Some(Fault::TrustUserJobId), Some(id)) => self.job_dir(&format!("{}-{id}", job.key().runner())),
            _ => self.job_dir(&job.key().to_string()),
        }
    }

    fn builds(&self, job: &JobContext) -> PathBuf {
        self.dir_for(job).join("builds")
    }
}

fn fs_failure(what: &str, path: &Path, e: std::io::Error) -> Failure {
    Failure::system_with(format!("failed to {what} {}", path.display()), e)
}

impl Backend for HostTest {
    fn describe(&self) -> Description {
        let isolation = match self.fault {
            Some(Fault::ClaimIsolation) => Isolation::Filesystem,
            Some(Fault::ContradictCapabilities) => Isolation::None,
            // A consistent lie: the containment checks must see through it.
            Some(Fault::ClaimContainment) => Isolation::Container,
            _ => Isolation::Host,
        };
        let contains_root = self.fault == Some(Fault::ClaimContainment);
        Description::new("host-test", env!("CARGO_PKG_VERSION"), "test fixture: bash on the host, no isolation")
            .isolation(isolation)
            .capabilities(
                Capabilities::none()
                    .executes_scripts(true)
                    .cancel(true)
                    .concurrent_jobs(true)
                    .contains_root(contains_root),
            )
    }

    fn config(&self, job: &JobContext) -> Result<ConfigOutput, Failure> {
        if self.fault == Some(Fault::HostBuilds) {
            return Ok(ConfigOutput::with_dirs(self.host_builds.display().to_string(), "/cache"));
        }
        let builds = self.builds(job);
        Ok(ConfigOutput::with_dirs(builds.display().to_string(), self.root.join("cache").display().to_string()))
    }

    fn prepare(&self, job: &JobContext, state: &JobState, _cancel: &Cancel) -> Result<(), Failure> {
        let builds = self.builds(job);
        std::fs::create_dir_all(&builds).map_err(|e| fs_failure("create", &builds, e))?;
        state.save("dir.json", &self.dir_for(job))?;
        println!("host-test: job directory {}", self.dir_for(job).display());
        match self.fault {
            Some(Fault::PanicInPrepare) => panic!("host-test: deliberate panic in prepare"),
            Some(Fault::DaemonHoldsLog) => {
                // Inherits stdout and stderr and outlives the hook.
                Command::new("sleep")
                    .arg("8")
                    .stdin(Stdio::null())
                    .spawn()
                    .map_err(|e| Failure::system_with("spawn", e))?;
            }
            Some(Fault::LeakProcess) => {
                use std::os::unix::process::CommandExt;
                // Outlives the suite's wait for what a cleanup finishes in the background (30 s).
                Command::new("sleep")
                    .arg0(format!("berth-leak-{}", job.key()))
                    .arg("60")
                    .process_group(0)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .map_err(|e| Failure::system_with("spawn", e))?;
            }
            Some(Fault::LeakMount) => {
                let point = PathBuf::from(format!("/run/berth-leak-{}", job.key()));
                std::fs::create_dir_all(&point).map_err(|e| fs_failure("create", &point, e))?;
                let status = Command::new("mount")
                    .args(["-t", "tmpfs", "berth-leak"])
                    .arg(&point)
                    .status()
                    .map_err(|e| Failure::system_with("mount", e))?;
                if !status.success() {
                    return Err(Failure::system(format!("failed to mount a tmpfs at {}", point.display())));
                }
            }
            Some(Fault::LeakMasked) => {
                let all: Vec<(String, String)> =
                    job.variables().iter().map(|v| (v.key.clone(), v.value.clone())).collect();
                state.save("variables.json", &all)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn run(
        &self,
        job: &JobContext,
        state: &JobState,
        script: &Path,
        stage: &str,
        cancel: &Cancel,
    ) -> Result<(), Failure> {
        let dir: PathBuf =
            state.load("dir.json")?.ok_or_else(|| Failure::system("host-test: job directory not recorded"))?;
        if self.fault == Some(Fault::RejectUnknownStage)
            && !["prepare_script", "get_sources", "build_script", "after_script"].contains(&stage)
        {
            return Err(Failure::system(format!("unknown stage {stage}")));
        }
        if self.fault == Some(Fault::LoseFilesBetweenStages) {
            let builds = self.builds(job);
            let _ = berth_backend_api::remove_tree(&builds);
            std::fs::create_dir_all(&builds).map_err(|e| fs_failure("create", &builds, e))?;
        }
        let _ = std::io::stdout().flush();
        let mut stage = StageCommand::new(script);
        stage
            .command()
            .current_dir(&dir)
            .env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", &dir)
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null());
        let never;
        let cancel = if self.fault == Some(Fault::IgnoreSigterm) {
            never = Cancel::never().map_err(|e| Failure::system_with("cancel pipe", e))?;
            &never
        } else {
            cancel
        };
        match (process::run_stage(stage, cancel, Duration::from_secs(2)), self.fault) {
            (Err(Failure::Script { .. }), Some(Fault::LoseExitCode)) => Err(Failure::script(1)),
            (Err(Failure::Script { code }), Some(Fault::SystemForBuild)) => {
                Err(Failure::system(format!("script exited {code}")))
            }
            (result, _) => result,
        }
    }

    fn cleanup(&self, state: &JobState) -> Result<(), Failure> {
        let dir = state.load::<PathBuf>("dir.json")?.unwrap_or_else(|| self.job_dir(&state.key().to_string()));
        if self.fault == Some(Fault::LeakState) {
            return Ok(());
        }
        if std::fs::symlink_metadata(&dir).is_err() && self.fault == Some(Fault::CleanupNotIdempotent) {
            return Err(Failure::system(format!("{} is already gone", dir.display())));
        }
        match berth_backend_api::remove_tree(&dir) {
            Ok(()) => {
                tracing::info!(job = %state.key(), "host-test: removed the job's directory");
                Ok(())
            }
            Err(e) => Err(fs_failure("remove", &dir, e)),
        }
    }
}

/// The fixture as a plugin (`plugin = ".../libberth_backend_host_test.so"`).
/// `BERTH_TEST_PLUGIN_ABI` makes it export a deliberately incompatible table,
/// to prove berth refuses it: `null`, `major-2`, `truncated`; or one that
/// must load: `future-minor` (a table of a later minor version), `minor-0`
/// (a table of ABI 1.0, built before the job document had a context).
pub mod plugin {
    use berth_backend_api::plugin::{entry, BerthPlugin};

    use crate::HostTest;

    const TABLE: BerthPlugin = entry::table::<HostTest>();

    /// A table as a later minor version might define it: one more entry.
    #[repr(C)]
    struct Future {
        base: BerthPlugin,
        added_in_a_later_minor: usize,
    }

    static CURRENT: BerthPlugin = TABLE;
    static MAJOR_2: BerthPlugin = BerthPlugin { abi_major: 2, abi_minor: 0, ..TABLE };
    static TRUNCATED: BerthPlugin = BerthPlugin { size: 16, ..TABLE };
    // 1.0 and 1.1 have the same table; the SDK reads only `runner` and `vars`
    // of the job document, as plugins built for 1.0 do.
    static MINOR_0: BerthPlugin = BerthPlugin { abi_minor: 0, ..TABLE };
    static FUTURE: Future = Future {
        base: BerthPlugin { size: std::mem::size_of::<Future>() as u32, abi_minor: 99, ..TABLE },
        added_in_a_later_minor: 0,
    };

    /// The plugin entry point.
    #[no_mangle]
    pub extern "C" fn berth_backend_v1() -> *const BerthPlugin {
        match std::env::var("BERTH_TEST_PLUGIN_ABI").as_deref() {
            Ok("null") => std::ptr::null(),
            Ok("major-2") => &MAJOR_2,
            Ok("truncated") => &TRUNCATED,
            Ok("future-minor") => &FUTURE.base,
            Ok("minor-0") => &MINOR_0,
            _ => &CURRENT,
        }
    }
}
