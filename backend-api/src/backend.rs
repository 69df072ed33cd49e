//! The operations a backend implements.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Cancel, Description, Failure, Finding, JobContext, JobKey, JobState};

/// The runner a backend instance serves, as configured in berth's TOML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RunnerInfo {
    /// The runner's name (`[runners.NAME]`), validated like a [`JobKey`] runner.
    pub name: String,
    /// berth's state directory for this runner's host (default `/var/lib/berth`).
    pub state_dir: PathBuf,
    /// `builds_dir` from the runner's TOML, if set (a path as the job sees it).
    pub builds_dir: Option<String>,
    /// `cache_dir` from the runner's TOML, if set (a path as the job sees it).
    pub cache_dir: Option<String>,
}

impl RunnerInfo {
    /// A runner named `name` keeping its state under `state_dir`.
    pub fn new(name: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        RunnerInfo { name: name.into(), state_dir: state_dir.into(), builds_dir: None, cache_dir: None }
    }

    /// `<state_dir>/logs`: where a backend keeps per-job records meant to
    /// outlive the job (transcripts, boot logs). Everything else named after
    /// a job must be gone after its cleanup; the conformance suite checks that.
    pub fn logs_dir(&self) -> PathBuf {
        self.state_dir.join(LOGS_DIR)
    }
}

/// The name of [`RunnerInfo::logs_dir`] below the state directory.
pub const LOGS_DIR: &str = "logs";

/// What `config` tells the runner (custom-executor-protocol.md §3); `berth`
/// adds the `driver` field from [`Backend::describe`] and the runner's TOML
/// overrides for `builds_dir` and `cache_dir`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ConfigOutput {
    /// The builds directory as the job sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builds_dir: Option<String>,
    /// The cache directory as the job sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<String>,
    /// Whether builds_dir is shared between concurrent jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builds_dir_is_shared: Option<bool>,
    /// The hostname shown in the job log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Extra variables for every later hook (passed unprefixed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub job_env: BTreeMap<String, String>,
    /// The shell the runner writes scripts for (only `bash` is supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Settings this runner cannot honour on this host, or other things the
    /// pipeline author should know; shown in the job log, not sent to the runner.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

impl ConfigOutput {
    /// Builds and cache directories as the job sees them.
    pub fn with_dirs(builds_dir: impl Into<String>, cache_dir: impl Into<String>) -> Self {
        ConfigOutput { builds_dir: Some(builds_dir.into()), cache_dir: Some(cache_dir.into()), ..Default::default() }
    }
}

/// An isolation backend: the part of berth that makes, uses and removes a
/// job's environment.
///
/// Every call happens in a **new process** (the runner starts one per hook);
/// a backend keeps nothing in memory between calls and finds what prepare made
/// through the [`JobState`] the framework hands it.
///
/// Output: `prepare` and `run` write the job log to the process's own stdout
/// and stderr, which the runner shows to the pipeline author; keep it to short
/// progress lines and actionable errors. Diagnostics go to `tracing`.
pub trait Backend {
    /// What this backend is and supports.
    fn describe(&self) -> Description;

    /// What to tell the runner before the job starts. The default asks for
    /// nothing (the runner's own `builds_dir`/`cache_dir` apply).
    fn config(&self, job: &JobContext) -> Result<ConfigOutput, Failure> {
        let _ = job;
        Ok(ConfigOutput::default())
    }

    /// Creates the job's environment. The state is locked and freshly created;
    /// record in it whatever `run` and `cleanup` need. A failure leaves the rest
    /// to `cleanup`, which the runner always calls next.
    fn prepare(&self, job: &JobContext, state: &JobState, cancel: &Cancel) -> Result<(), Failure>;

    /// Runs one stage script (a bash program on the host, see [`crate::script`])
    /// inside the environment. `Ok(())` means the script exited 0; a non-zero exit
    /// is [`Failure::Script`]. Unknown stage names must be accepted.
    fn run(
        &self,
        job: &JobContext,
        state: &JobState,
        script: &Path,
        stage: &str,
        cancel: &Cancel,
    ) -> Result<(), Failure>;

    /// Removes everything of the job. Must succeed for a job that was never
    /// prepared, half prepared (a SIGKILLed prepare), or already cleaned, and must
    /// work from the state alone: `reap` calls it with no runner environment.
    fn cleanup(&self, state: &JobState) -> Result<(), Failure>;

    /// Removes environments this backend finds on the host that belong to this
    /// runner but to no job in `known` (e.g. after a state directory was lost).
    /// Returns one line per thing removed. The default finds nothing.
    fn reap_orphans(&self, known: &[JobKey]) -> Result<Vec<String>, Failure> {
        let _ = known;
        Ok(Vec::new())
    }

    /// What [`Backend::reap_orphans`] would remove now, removing nothing
    /// (`berth reap --dry-run`), one line per thing. `None`, the default,
    /// says the backend cannot tell, and `berth reap --dry-run` says so.
    fn orphans(&self, known: &[JobKey]) -> Result<Option<Vec<String>>, Failure> {
        let _ = known;
        Ok(None)
    }

    /// Checks what this backend needs of the host for this runner's settings
    /// (tools, kernel features, directories, images, free space), one
    /// [`Finding`] per thing checked, each with its fix. `berth doctor` prints
    /// them, and `berth gitlab-config` refuses a runner with an error. Never
    /// called by the hooks, so it may take a moment (run a `--version`). The
    /// default checks nothing.
    fn check(&self) -> Vec<Finding> {
        Vec::new()
    }
}

/// How a backend is built from its runner's `[runners.NAME.settings]` table.
pub trait NewBackend: Backend + Sized {
    /// The settings table, deserialized by berth with a precise error (file,
    /// key, line) when it does not fit. Use `#[serde(deny_unknown_fields)]`.
    type Settings: DeserializeOwned + Default;

    /// Builds the backend; validate settings that serde cannot (paths exist, ...).
    fn new(settings: Self::Settings, runner: &RunnerInfo) -> Result<Self, Failure>;
}

/// The path of `name` below `dir`, refusing anything that is not a single
/// plain path component (no `/`, no `..`, no NUL, not empty, not hidden).
pub fn child_path(dir: &Path, name: &str) -> Option<PathBuf> {
    let ok = !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\0']) && name.len() <= 255;
    ok.then(|| dir.join(name))
}
