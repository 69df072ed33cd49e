//! The operations a backend implements.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Cancel, Description, Failure, Finding, JobContext, JobKey, JobState};

/// The name of the scratch directory ([`JobState::scratch`]) that holds a
/// job's builds directory in [`RunnerInfo::host_dirs`].
pub const BUILDS_SCRATCH: &str = "builds";

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
    /// a job must be gone after its cleanup; the conformance suite checks
    /// that. Files a backend needs while the job lives go to the job's
    /// scratch directories ([`JobState::scratch`]), removed with its state.
    pub fn logs_dir(&self) -> PathBuf {
        self.state_dir.join(LOGS_DIR)
    }

    /// Where a **host-level** backend (its jobs see the host's filesystem,
    /// as with `unshare` or no wrapper at all) keeps `job`'s builds and
    /// cache directories, and the paths the job sees them at.
    ///
    /// Such a backend must not let its jobs write where config's default
    /// `/builds` and `/cache` would put them, the host's own directories:
    ///
    /// - **builds**: on the host, the job's scratch directory `builds`
    ///   (`<state_dir>/jobs/<key>/scratch/builds`, which
    ///   `state.scratch(BUILDS_SCRATCH)` creates at prepare), removed with
    ///   the job's state;
    /// - **cache**: on the host, `<state_dir>/cache/<runner>/project-<id>`
    ///   (the project id of the trusted job payload, `project-unknown`
    ///   without one), which outlives the job, shared by the project's jobs.
    ///
    /// The job sees each at the runner's `builds_dir`/`cache_dir` when its
    /// TOML sets one ([`MappedDir::is_mapped`]: bind the host directory
    /// onto it in the job's mount namespace, or refuse the job), else at
    /// the host path itself. Answer config with [`HostDirs::config_output`].
    ///
    /// This works in `config`, which runs before the job has any state:
    /// the runner calls config first, for a job it may never prepare and
    /// never clean up, so config makes nothing and only names paths; the
    /// job's state directory exists from prepare on.
    pub fn host_dirs(&self, job: &JobContext) -> HostDirs {
        let builds = crate::state::scratch_root(&self.state_dir, job.key()).join(BUILDS_SCRATCH);
        let project = job.response().map(|r| r.job_info.project_id).filter(|id| *id != 0);
        let project = project.map_or_else(|| "project-unknown".to_owned(), |id| format!("project-{id}"));
        let cache = self.state_dir.join("cache").join(&self.name).join(project);
        HostDirs {
            builds: MappedDir::new(self.builds_dir.as_deref(), builds),
            cache: MappedDir::new(self.cache_dir.as_deref(), cache),
        }
    }
}

/// A directory of a job: the path the job sees and the host directory
/// behind it ([`RunnerInfo::host_dirs`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MappedDir {
    /// The path as the job sees it: what config answers.
    pub job: String,
    /// The directory on the host.
    pub host: PathBuf,
}

impl MappedDir {
    fn new(seen: Option<&str>, host: PathBuf) -> Self {
        let job = seen.map_or_else(|| host.display().to_string(), str::to_owned);
        MappedDir { job, host }
    }

    /// Whether the job sees the directory at another path than the host's
    /// (the runner's TOML names one): the backend binds [`MappedDir::host`]
    /// onto [`MappedDir::job`] in the job's own mount namespace, or, without
    /// one, refuses the job with a system failure naming the setting.
    pub fn is_mapped(&self) -> bool {
        Path::new(&self.job) != self.host
    }
}

/// A host-level job's builds and cache directories ([`RunnerInfo::host_dirs`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HostDirs {
    /// The builds directory: the job's scratch directory `builds`, removed with its state.
    pub builds: MappedDir,
    /// The cache directory: one per project, outliving its jobs.
    pub cache: MappedDir,
}

impl HostDirs {
    /// What config answers: both directories as the job sees them.
    pub fn config_output(&self) -> ConfigOutput {
        ConfigOutput::with_dirs(self.builds.job.clone(), self.cache.job.clone())
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
    /// nothing, and berth answers `/builds` and `/cache` (or the runner's
    /// TOML `builds_dir`/`cache_dir`): paths as the job sees them, right
    /// for a backend that gives jobs a root of their own. A host-level
    /// backend answers with [`RunnerInfo::host_dirs`] instead. config runs
    /// before the job has any state (and the runner may never prepare or
    /// clean up the job): compute paths here, create nothing.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job(project: Option<u64>) -> (tempfile::TempDir, JobContext) {
        let dir = tempfile::tempdir().unwrap();
        let mut vars = vec![("CUSTOM_ENV_CI_JOB_ID".to_owned(), "7".to_owned())];
        if let Some(project) = project {
            let payload = dir.path().join("response.json");
            std::fs::write(&payload, format!(r#"{{"id":7,"job_info":{{"project_id":{project}}}}}"#)).unwrap();
            vars.push(("JOB_RESPONSE_FILE".to_owned(), payload.display().to_string()));
        }
        (dir, JobContext::from_vars("demo", vars).unwrap())
    }

    #[test]
    fn host_dirs_are_under_the_state_and_the_job_sees_the_runners_paths_when_set() {
        let (_dir, with_project) = job(Some(42));
        let mut runner = RunnerInfo::new("demo", "/var/lib/berth");
        let dirs = runner.host_dirs(&with_project);
        assert_eq!(dirs.builds.host, Path::new("/var/lib/berth/jobs/demo-7/scratch/builds"));
        assert_eq!(dirs.cache.host, Path::new("/var/lib/berth/cache/demo/project-42"));
        assert!(!dirs.builds.is_mapped() && !dirs.cache.is_mapped(), "the job sees the host paths");
        let out = dirs.config_output();
        assert_eq!(out.builds_dir.as_deref(), Some("/var/lib/berth/jobs/demo-7/scratch/builds"));
        assert_eq!(out.cache_dir.as_deref(), Some("/var/lib/berth/cache/demo/project-42"));

        runner.builds_dir = Some("/builds".into());
        let dirs = runner.host_dirs(&with_project);
        assert!(dirs.builds.is_mapped() && !dirs.cache.is_mapped());
        assert_eq!(
            (dirs.builds.job.as_str(), dirs.builds.host.as_path()),
            ("/builds", Path::new("/var/lib/berth/jobs/demo-7/scratch/builds"))
        );
        assert_eq!(dirs.config_output().builds_dir.as_deref(), Some("/builds"));

        // The project comes from the trusted payload only.
        let (_dir, without) = job(None);
        assert_eq!(runner.host_dirs(&without).cache.host, Path::new("/var/lib/berth/cache/demo/project-unknown"));
    }

    #[test]
    fn the_builds_dir_is_the_scratch_directory_prepare_creates() {
        let root = tempfile::tempdir().unwrap();
        let (_dir, job) = job(Some(1));
        let runner = RunnerInfo::new("demo", root.path());
        let state = crate::StateDir::new(root.path()).create(crate::JobRecord::new(job.key().clone(), "fake")).unwrap();
        assert_eq!(state.scratch(BUILDS_SCRATCH).unwrap(), runner.host_dirs(&job).builds.host);
        state.remove().unwrap();
    }
}
