//! The job as the runner describes it to every hook.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Redactor;

/// Errors building a [`JobContext`] from the hook's environment.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    /// `JOB_RESPONSE_FILE` is set but could not be read.
    #[error("failed to read the job payload {path}")]
    ReadResponse {
        /// The file named by `JOB_RESPONSE_FILE`.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `JOB_RESPONSE_FILE` is not the JSON GitLab sends.
    #[error("failed to parse the job payload {path}")]
    ParseResponse {
        /// The file named by `JOB_RESPONSE_FILE`.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Neither `JOB_RESPONSE_FILE` nor a numeric `CUSTOM_ENV_CI_JOB_ID` names the job.
    #[error(
        "no job identity: JOB_RESPONSE_FILE is not set and CUSTOM_ENV_CI_JOB_ID is {0}; \
         berth must be called by gitlab-runner's custom executor (or `berth exec`)"
    )]
    NoIdentity(String),
    /// The runner name cannot be used in a job key.
    #[error(
        "runner name {0:?} is not usable: use 1-32 characters of a-z, 0-9 and '-', starting with a letter or digit"
    )]
    BadRunnerName(String),
}

/// A job's identity on this host: the runner name and GitLab's job id.
///
/// Safe to use in a path component, a systemd unit name or a machine name:
/// only `a-z`, `0-9` and `-`, at most 53 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobKey {
    runner: String,
    id: u64,
}

impl JobKey {
    /// The key of job `id` of runner `runner`; the runner name is validated.
    pub fn new(runner: &str, id: u64) -> Result<Self, ContextError> {
        if !valid_runner_name(runner) {
            return Err(ContextError::BadRunnerName(runner.to_owned()));
        }
        Ok(JobKey { runner: runner.to_owned(), id })
    }

    /// The runner name.
    pub fn runner(&self) -> &str {
        &self.runner
    }

    /// GitLab's job id.
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// Whether `name` may name a runner: 1-32 of `a-z0-9-`, starting with a letter
/// or digit, so that `berth-<runner>-<job id>` is a valid machine and host name
/// (at most 64 characters, no `_`).
pub(crate) fn valid_runner_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

impl fmt::Display for JobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.runner, self.id)
    }
}

impl From<JobKey> for String {
    fn from(key: JobKey) -> String {
        key.to_string()
    }
}

impl TryFrom<String> for JobKey {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let bad = || format!("bad job key {text:?}");
        let (runner, id) = text.rsplit_once('-').ok_or_else(bad)?;
        // Only the form `Display` writes: `u64::from_str` also takes `+7` and
        // `007`, which would name job 7 by a second spelling (a state file
        // `demo-007.lock` listed as the job whose lock is `demo-7.lock`).
        let canonical = !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) && (id == "0" || !id.starts_with('0'));
        let id = id.parse().ok().filter(|_| canonical).ok_or_else(bad)?;
        JobKey::new(runner, id).map_err(|e| e.to_string())
    }
}

/// One job variable as GitLab lists it in the job payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ResponseVariable {
    /// The name.
    pub key: String,
    /// The value (for a file variable: the file's contents).
    #[serde(default)]
    pub value: String,
    /// Visible in the job log.
    #[serde(default)]
    pub public: bool,
    /// A file-type variable.
    #[serde(default)]
    pub file: bool,
    /// Masked: the value must never reach a log or a file.
    #[serde(default)]
    pub masked: bool,
    /// Not expanded.
    #[serde(default)]
    pub raw: bool,
}

impl ResponseVariable {
    /// A plain public variable.
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        ResponseVariable { key: key.into(), value: value.into(), public: true, ..Default::default() }
    }

    /// Marks the variable masked (and not public).
    pub fn masked(mut self) -> Self {
        self.masked = true;
        self.public = false;
        self
    }

    /// Marks the variable a file variable.
    pub fn file(mut self) -> Self {
        self.file = true;
        self
    }
}

/// `job_info` of the job payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JobInfo {
    /// The job's name.
    #[serde(default)]
    pub name: String,
    /// The job's stage.
    #[serde(default)]
    pub stage: String,
    /// The project's numeric id.
    #[serde(default)]
    pub project_id: u64,
    /// The project's name.
    #[serde(default)]
    pub project_name: String,
    /// The project's full path, `group/project`.
    #[serde(default)]
    pub project_full_path: String,
}

impl JobInfo {
    /// Job `name` of stage `stage` in project `project_full_path` (`group/project`).
    pub fn new(name: impl Into<String>, stage: impl Into<String>, project_full_path: impl Into<String>) -> Self {
        let path: String = project_full_path.into();
        let project_name = path.rsplit('/').next().unwrap_or_default().to_owned();
        JobInfo { name: name.into(), stage: stage.into(), project_id: 0, project_name, project_full_path: path }
    }
}

/// `runner_info` of the job payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RunnerLimits {
    /// The job timeout in seconds.
    #[serde(default)]
    pub timeout: Option<u64>,
}

/// A step of the job (`script`, `after_script`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Step {
    /// `script`, `after_script`, or a named step.
    pub name: String,
    /// The commands.
    #[serde(default)]
    pub script: Vec<String>,
    /// Timeout in seconds.
    #[serde(default)]
    pub timeout: Option<u64>,
    /// `on_success`, `on_failure` or `always`.
    #[serde(default)]
    pub when: Option<String>,
    /// Whether a failure of this step fails the job.
    #[serde(default)]
    pub allow_failure: bool,
}

impl Step {
    /// A step named `name` running `script`.
    pub fn new(name: impl Into<String>, script: Vec<String>, when: &str) -> Self {
        Step { name: name.into(), script, timeout: None, when: Some(when.to_owned()), allow_failure: false }
    }
}

/// The job's `image:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JobImage {
    /// The image reference as written in the pipeline, e.g. `registry/x/bookworm:latest`.
    #[serde(default)]
    pub name: String,
    /// The entrypoint override, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
}

impl JobImage {
    /// An image reference.
    pub fn new(name: impl Into<String>) -> Self {
        JobImage { name: name.into(), entrypoint: None }
    }
}

/// The part of GitLab's job payload (`JOB_RESPONSE_FILE`) that drivers use.
///
/// Unknown fields are ignored when reading, as GitLab adds fields over time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JobResponse {
    /// The job id, unique within the GitLab instance.
    pub id: u64,
    /// The job token (a secret: treated as masked).
    #[serde(default)]
    pub token: String,
    /// Names of the job and project.
    #[serde(default)]
    pub job_info: JobInfo,
    /// Limits set by the runner.
    #[serde(default)]
    pub runner_info: RunnerLimits,
    /// Every job variable with its flags.
    #[serde(default)]
    pub variables: Vec<ResponseVariable>,
    /// The job's steps.
    #[serde(default)]
    pub steps: Vec<Step>,
    /// The job's `image:`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<JobImage>,
    /// The job's `services:` as GitLab sends them.
    #[serde(default)]
    pub services: Vec<serde_json::Value>,
}

impl JobResponse {
    /// A payload for job `id` (used by `berth exec` and tests).
    pub fn new(id: u64) -> Self {
        JobResponse { id, ..Default::default() }
    }
}

/// One variable as the job sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Variable {
    /// The name, without the `CUSTOM_ENV_` prefix.
    pub key: String,
    /// The value.
    pub value: String,
    /// Masked in the job payload: never log or store the value.
    pub masked: bool,
    /// A file-type variable (the value is the file's contents).
    pub file: bool,
}

/// The job as one hook process sees it, built once from the environment.
///
/// Everything in [`JobContext::variables`] is **user-controlled input**: a job
/// can set any variable, including ones that shadow predefined names. The
/// job's identity ([`JobContext::key`]) comes from the trusted job payload.
#[derive(Debug, Clone)]
pub struct JobContext {
    key: JobKey,
    response: Option<JobResponse>,
    variables: Vec<Variable>,
    job_env: BTreeMap<String, String>,
    tmpdir: Option<PathBuf>,
    build_exit_code_file: Option<PathBuf>,
    redactor: Redactor,
}

/// Variables the runner itself sets on every exec, which are not job variables.
pub(crate) const RUNNER_KEYS: &[&str] =
    &["TMPDIR", "BUILD_FAILURE_EXIT_CODE", "SYSTEM_FAILURE_EXIT_CODE", "BUILD_EXIT_CODE_FILE", "JOB_RESPONSE_FILE"];

impl JobContext {
    /// Builds the context of runner `runner` from this process's environment.
    pub fn from_env(runner: &str) -> Result<Self, ContextError> {
        Self::from_vars(
            runner,
            std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    /// Builds the context from explicit environment pairs (for tests and embedders).
    ///
    /// `job_env` (config's extra variables, passed unprefixed) cannot be told
    /// apart from the runner's own environment here; see [`JobContext::with_job_env`].
    pub fn from_vars(runner: &str, vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, ContextError> {
        let mut custom = BTreeMap::new();
        let mut own = BTreeMap::new();
        for (key, value) in vars {
            if let Some(name) = key.strip_prefix("CUSTOM_ENV_") {
                custom.insert(name.to_owned(), value);
            } else if RUNNER_KEYS.contains(&key.as_str()) {
                own.insert(key, value);
            }
        }
        let response = match own.get("JOB_RESPONSE_FILE") {
            Some(path) if !path.is_empty() => {
                let path = PathBuf::from(path);
                let bytes =
                    std::fs::read(&path).map_err(|source| ContextError::ReadResponse { path: path.clone(), source })?;
                Some(
                    serde_json::from_slice::<JobResponse>(&bytes)
                        .map_err(|source| ContextError::ParseResponse { path, source })?,
                )
            }
            _ => None,
        };
        let id = match &response {
            Some(response) => response.id,
            None => {
                let shown = custom.get("CI_JOB_ID").map_or_else(|| "unset".to_owned(), |v| format!("{v:?}"));
                custom.get("CI_JOB_ID").and_then(|v| v.parse::<u64>().ok()).ok_or(ContextError::NoIdentity(shown))?
            }
        };
        let key = JobKey::new(runner, id)?;
        let mut flags: BTreeMap<&str, (bool, bool)> = BTreeMap::new();
        let mut secrets = Vec::new();
        if let Some(response) = &response {
            for var in &response.variables {
                let entry = flags.entry(var.key.as_str()).or_default();
                entry.0 |= var.masked;
                entry.1 |= var.file;
                if var.masked {
                    secrets.push(var.value.clone());
                }
            }
            secrets.push(response.token.clone());
        }
        let variables = custom
            .into_iter()
            .map(|(key, value)| {
                let (masked, file) = flags.get(key.as_str()).copied().unwrap_or_default();
                if masked {
                    secrets.push(value.clone());
                }
                Variable { key, value, masked, file }
            })
            .collect();
        Ok(JobContext {
            key,
            response,
            variables,
            job_env: BTreeMap::new(),
            tmpdir: own.get("TMPDIR").map(PathBuf::from),
            build_exit_code_file: own.get("BUILD_EXIT_CODE_FILE").filter(|p| !p.is_empty()).map(PathBuf::from),
            redactor: Redactor::new(secrets),
        })
    }

    /// Records config's `job_env` (extra variables the runner passes unprefixed).
    pub fn with_job_env(mut self, job_env: BTreeMap<String, String>) -> Self {
        self.job_env = job_env;
        self
    }

    /// The job's identity on this host.
    pub fn key(&self) -> &JobKey {
        &self.key
    }

    /// GitLab's job payload, when the runner provided one.
    pub fn response(&self) -> Option<&JobResponse> {
        self.response.as_ref()
    }

    /// The job's variables as the runner passed them (`CUSTOM_ENV_*`), sorted by
    /// name, with masked and file flags from the payload. User-controlled.
    pub fn variables(&self) -> &[Variable] {
        &self.variables
    }

    /// The value of job variable `key` (user-controlled).
    pub fn variable(&self, key: &str) -> Option<&str> {
        self.variables.iter().find(|v| v.key == key).map(|v| v.value.as_str())
    }

    /// The image the job asked for: the payload's `image.name`, else
    /// `CI_JOB_IMAGE`. Untrusted: validate before use.
    pub fn image(&self) -> Option<&str> {
        match &self.response {
            Some(response) => response.image.as_ref().map(|i| i.name.as_str()).filter(|n| !n.is_empty()),
            None => self.variable("CI_JOB_IMAGE").filter(|n| !n.is_empty()),
        }
    }

    /// The job timeout in seconds, from the payload.
    pub fn timeout(&self) -> Option<u64> {
        self.response.as_ref().and_then(|r| r.runner_info.timeout)
    }

    /// config's `job_env`, as recorded with [`JobContext::with_job_env`].
    pub fn job_env(&self) -> &BTreeMap<String, String> {
        &self.job_env
    }

    /// The runner's per-job temporary directory (the hook's working directory).
    pub fn tmpdir(&self) -> Option<&Path> {
        self.tmpdir.as_deref()
    }

    /// Where a failed script's exit code is written (`BUILD_EXIT_CODE_FILE`).
    pub fn build_exit_code_file(&self) -> Option<&Path> {
        self.build_exit_code_file.as_deref()
    }

    /// Replaces masked values (and the job token) in text meant for a log or file.
    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }
}

#[cfg(test)]
mod tests;
