//! The conformance checks: what every backend is held to.
//!
//! Each check has a stable ID, a level (MUST: failing it fails the suite;
//! SHOULD: reported), a one-line statement and the section of
//! `custom-executor-protocol.md` it protects. Checks a backend cannot take part
//! in (by its declared [`Capabilities`](berth_backend_api::Capabilities)) are skipped with the reason; a
//! backend that declares a capability and fails it fails.
//!
//! Every case ends with a leak check: nothing named after the case's job may
//! remain under the state directory once cleanup ran.
//!
//! The containment section (`containment.*`, in `suite/containment/`) holds a
//! backend that declares `contains_root` to that claim: a job's root is not
//! the host's.
//!
//! Checks live by family, each module holding its checks and their entries
//! of the table (`protocol`, `state`, `cancel`, `secrets`, `isolation`,
//! `jobs`, `containment`); this module lists the entries in the suite's order.
//! A check returns a [`CheckOutcome`]; the report holds one [`Verdict`] per
//! check, rendered by `report` as a table, JSON or JUnit XML.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use berth_backend_api::{Description, Isolation};
use berth_runner_imitation::runner::{Driver, Hook, HookExec, Timeouts};
use serde::Serialize;

use case::Case;

mod cancel;
mod case;
mod containment;
mod declared;
mod isolation;
mod jobs;
mod protocol;
mod report;
mod secrets;
mod state;

/// MUST or SHOULD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Level {
    /// Failing it fails the suite.
    Must,
    /// Failing it is reported, the suite still passes.
    Should,
}

impl Level {
    /// `MUST` or `SHOULD`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Must => "MUST",
            Level::Should => "SHOULD",
        }
    }
}

/// What a check needs the backend to support.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    Nothing,
    ExecutesScripts,
    Cancel,
    /// Executes scripts, runs jobs concurrently, and isolates them.
    Isolation,
    /// Executes scripts and claims that a job's root is not the host's.
    Containment,
}

impl Needs {
    fn missing(self, description: &Description) -> Option<&'static str> {
        let caps = &description.capabilities;
        match self {
            Needs::Nothing => None,
            Needs::Isolation if !caps.executes_scripts => {
                Some("the backend does not execute scripts (executes_scripts = false)")
            }
            Needs::Isolation if !caps.concurrent_jobs => {
                Some("the backend does not run jobs concurrently (concurrent_jobs = false)")
            }
            Needs::Isolation if matches!(description.isolation, Isolation::None | Isolation::Host) => {
                Some("the backend declares no isolation between jobs")
            }
            Needs::ExecutesScripts if !caps.executes_scripts => {
                Some("the backend does not execute scripts (executes_scripts = false)")
            }
            Needs::Cancel if !caps.executes_scripts => {
                Some("the backend does not execute scripts (executes_scripts = false)")
            }
            Needs::Cancel if !caps.cancel => Some("the backend does not declare cancel support (cancel = false)"),
            Needs::Containment if !caps.executes_scripts => {
                Some("the backend does not execute scripts (executes_scripts = false)")
            }
            Needs::Containment if !caps.contains_root => {
                Some("the backend does not claim to contain root jobs (contains_root = false)")
            }
            _ => None,
        }
    }
}

/// Why a check did not pass: the message the report shows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Finding {
    /// The backend does not do what the check holds it to.
    #[error("{0}")]
    Fail(String),
    /// The check cannot be made against this backend, and why.
    #[error("{0}")]
    Skip(String),
}

impl From<String> for Finding {
    fn from(message: String) -> Self {
        Finding::Fail(message)
    }
}

impl From<&str> for Finding {
    fn from(message: &str) -> Self {
        Finding::Fail(message.to_owned())
    }
}

/// What a check (or a step of one) comes to: `Ok` when it holds.
pub type CheckOutcome = Result<(), Finding>;

/// A check's verdict in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The backend meets the check.
    Pass,
    /// The backend fails the check, and how.
    Fail(String),
    /// The check was not made, and why.
    Skip(String),
}

impl Verdict {
    /// `pass`, `fail` or `skip`, as the JSON report gives it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail(_) => "fail",
            Verdict::Skip(_) => "skip",
        }
    }

    /// Why it failed or was skipped; empty for a pass.
    pub fn detail(&self) -> &str {
        match self {
            Verdict::Pass => "",
            Verdict::Fail(detail) | Verdict::Skip(detail) => detail,
        }
    }
}

impl From<CheckOutcome> for Verdict {
    fn from(outcome: CheckOutcome) -> Self {
        match outcome {
            Ok(()) => Verdict::Pass,
            Err(Finding::Fail(detail)) => Verdict::Fail(detail),
            Err(Finding::Skip(detail)) => Verdict::Skip(detail),
        }
    }
}

/// One check.
#[derive(Debug)]
pub struct Check {
    /// Stable identifier.
    pub id: &'static str,
    /// MUST or SHOULD.
    pub level: Level,
    /// What it holds the backend to.
    pub statement: &'static str,
    /// The protocol section it protects (`4`), or for a check beyond the
    /// protocol its rationale (`security: ...`).
    pub protocol: &'static str,
    needs: Needs,
    run: fn(&Target) -> CheckOutcome,
}

/// The backend under test, reached through the `berth` executable, or any
/// custom-executor driver given as its hooks' commands.
#[derive(Debug, Clone)]
pub struct Target {
    driver: Driver,
    /// The backend's description (decides what is checked).
    pub description: Description,
    /// The state directory to check for leaks, if known.
    pub state_dir: Option<PathBuf>,
    /// The host directories outside the state a job must leave as it found
    /// them, as the suite found them before its first case.
    outside: Arc<OnceLock<Vec<case::Watched>>>,
}

impl Target {
    /// A target whose hooks are `program args... HOOK`.
    pub fn new(
        program: impl Into<PathBuf>,
        args: Vec<OsString>,
        description: Description,
        state_dir: Option<PathBuf>,
    ) -> Self {
        let mut driver = Driver::new(program, args);
        driver.timeouts = Timeouts {
            config: Duration::from_secs(60),
            prepare: Duration::from_secs(120),
            cleanup: Duration::from_secs(120),
            graceful_kill: Duration::from_secs(10),
            force_kill: Duration::from_secs(5),
            log_release: Duration::from_secs(3),
            retry_delay: Duration::from_millis(100),
        };
        Target { driver, description, state_dir, outside: Arc::default() }
    }

    /// With `hook` started as `exec` says instead of `program args... HOOK`
    /// (a driver configured by a gitlab-runner `[runners.custom]` block).
    pub fn with_hook(mut self, hook: Hook, exec: HookExec) -> Self {
        self.driver = self.driver.with_hook(hook, exec);
        self
    }

    /// The driver's name and version as its config hook gives them, for a
    /// driver that has no description of its own: one config call on a
    /// fresh job, then cleanup. `None` when config fails or names no driver.
    pub fn driver_name(&self) -> Option<(String, String)> {
        let mut case = Case::new(self).ok()?;
        let named = case.config().ok().and_then(|_| case.job.config.driver.clone());
        let _ = case.cleanup();
        named.map(|d| (d.name, d.version))
    }

    /// With an extra environment variable for every hook.
    pub fn with_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.driver.env.push((key.into(), value.into()));
        self
    }
}

/// Whether `protocol` (a [`Check::protocol`]) names a protocol section
/// rather than giving a rationale.
pub fn is_protocol_section(protocol: &str) -> bool {
    protocol.starts_with(|c: char| c.is_ascii_digit())
}

/// Which checks to run.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only these IDs (all when empty).
    pub only: Vec<String>,
    /// Not these IDs.
    pub skip: Vec<String>,
}

/// The result of one check (as JSON: `verdict` is `pass`, `fail` or `skip`,
/// `detail` the verdict's message).
#[derive(Debug, Clone)]
pub struct CheckResult {
    /// Check ID.
    pub id: &'static str,
    /// Level.
    pub level: Level,
    /// Statement.
    pub statement: &'static str,
    /// Protocol section, or rationale (see [`Check::protocol`]).
    pub protocol: &'static str,
    /// Pass, or fail or skip with the reason.
    pub verdict: Verdict,
    /// How long it took.
    pub seconds: f64,
}

/// The suite's report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The backend's name.
    pub backend: String,
    /// The backend's version.
    pub version: String,
    /// One entry per check, in suite order.
    pub results: Vec<CheckResult>,
}

impl Report {
    /// No MUST check failed.
    pub fn passed(&self) -> bool {
        !self.results.iter().any(|r| matches!(r.verdict, Verdict::Fail(_)) && r.level == Level::Must)
    }

    /// The verdict of check `id`.
    pub fn verdict(&self, id: &str) -> Option<&Verdict> {
        self.results.iter().find(|r| r.id == id).map(|r| &r.verdict)
    }
}

/// Every check, in the order the suite runs them.
pub fn checks() -> &'static [&'static Check] {
    CHECKS
}

/// Runs the checks `filter` selects against `target`.
pub fn run(target: &Target, filter: &Filter) -> Result<Report, String> {
    for id in filter.only.iter().chain(&filter.skip) {
        if !CHECKS.iter().any(|c| c.id == id) {
            return Err(format!("unknown check {id:?}; `berth conformance --list` lists them"));
        }
    }
    target.outside.get_or_init(|| case::watch(target));
    let mut results = Vec::new();
    for check in CHECKS {
        if (!filter.only.is_empty() && !filter.only.iter().any(|id| id == check.id))
            || filter.skip.iter().any(|id| id == check.id)
        {
            continue;
        }
        let started = Instant::now();
        let verdict = match check.needs.missing(&target.description) {
            Some(reason) => Verdict::Skip(reason.to_owned()),
            None => Verdict::from((check.run)(target)),
        };
        results.push(CheckResult {
            id: check.id,
            level: check.level,
            statement: check.statement,
            protocol: check.protocol,
            verdict,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    Ok(Report { backend: target.description.name.clone(), version: target.description.version.clone(), results })
}

/// Every check, in the order the suite runs and reports them (the order is
/// behaviour: reports and `--check` filters follow it).
const CHECKS: &[&Check] = &[
    &declared::CAPABILITIES_CONSISTENT,
    &protocol::CONFIG_JSON,
    &state::CLEANUP_UNPREPARED,
    &state::CLEANUP_IDEMPOTENT,
    &protocol::STAGE_UNKNOWN_NAME,
    &protocol::HOOK_RELEASES_LOG,
    &secrets::SECRETS_MASKED,
    &jobs::JOB_SUCCESS,
    &protocol::EXIT_SUCCESS,
    &protocol::EXIT_CODES,
    &protocol::EXIT_CODES_FROM_ENV,
    &jobs::JOB_FAILURE,
    &state::STAGE_STATE_PERSISTS,
    &protocol::STAGE_BACKGROUND_PROCESS,
    &secrets::IDENTITY_TRUSTED,
    &secrets::VARIABLES_EXACT,
    &cancel::CLEANUP_AFTER_KILLED_PREPARE,
    &isolation::ISOLATION_CONCURRENT,
    &cancel::CANCEL_SIGTERM,
    &containment::CONTAINMENT_OWN_ROOT,
    &containment::CONTAINMENT_CHROOT_ESCAPE,
    &containment::CONTAINMENT_OPEN_BY_HANDLE,
    &containment::CONTAINMENT_ROOT_UNMAPPED,
    &containment::CONTAINMENT_NO_DEVICES,
    &containment::CONTAINMENT_SYSCTL_READONLY,
    &containment::CONTAINMENT_ENV_PRIVATE,
    &containment::CONTAINMENT_JOB_BINARIES,
    &containment::CONTAINMENT_CACHE_NOSUID,
    &containment::CONTAINMENT_CACHE_PER_PROJECT,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checks_keep_their_ids_and_order() {
        let ids: Vec<&str> = checks().iter().map(|c| c.id).collect();
        assert_eq!(
            ids,
            [
                "capabilities.consistent",
                "config.json",
                "cleanup.unprepared",
                "cleanup.idempotent",
                "stage.unknown-name",
                "hook.releases-log",
                "secrets.masked",
                "job.success",
                "exit.success",
                "exit.codes",
                "exit.codes-from-env",
                "job.failure",
                "stage.state-persists",
                "stage.background-process",
                "identity.trusted",
                "variables.exact",
                "cleanup.after-killed-prepare",
                "isolation.concurrent",
                "cancel.sigterm",
                "containment.own-root",
                "containment.chroot-escape",
                "containment.open-by-handle",
                "containment.root-unmapped",
                "containment.no-devices",
                "containment.sysctl-readonly",
                "containment.env-private",
                "containment.job-binaries",
                "containment.cache-nosuid",
                "containment.cache-per-project",
            ]
        );
    }

    #[test]
    fn a_finding_becomes_the_verdict_with_its_message() {
        assert_eq!(Verdict::from(Ok(())), Verdict::Pass);
        assert_eq!(Verdict::from(Err(Finding::from("broken"))), Verdict::Fail("broken".into()));
        let skip = Verdict::from(Err(Finding::Skip("cannot".into())));
        assert_eq!((skip.as_str(), skip.detail()), ("skip", "cannot"));
        assert_eq!((Verdict::Pass.as_str(), Verdict::Pass.detail()), ("pass", ""));
    }
}
