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
//! The containment section (`containment.*`, in `suite/containment.rs`) holds a
//! backend that declares `contains_root` to that claim: a job's root is not
//! the host's.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_backend_api::{Cancel, Description, Isolation, JobInfo, JobResponse, ResponseVariable, Step};
use serde::Serialize;

use crate::job::{Interrupts, JobSpec, Outcome};
use crate::runner::{Driver, Exit, Hook, HookExec, HookResult, JobRun, Log, Quiet, Timeouts};

mod containment;

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
    run: fn(&Target) -> Result<(), String>,
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
        Target { driver, description, state_dir }
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

/// The result of one check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// Check ID.
    pub id: &'static str,
    /// Level.
    pub level: Level,
    /// Statement.
    pub statement: &'static str,
    /// Protocol section, or rationale (see [`Check::protocol`]).
    pub protocol: &'static str,
    /// `pass`, `fail` or `skip`.
    pub verdict: &'static str,
    /// Why it failed or was skipped.
    pub detail: String,
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
        !self.results.iter().any(|r| r.verdict == "fail" && r.level == Level::Must)
    }

    /// The verdict of check `id`.
    pub fn verdict(&self, id: &str) -> Option<&str> {
        self.results.iter().find(|r| r.id == id).map(|r| r.verdict)
    }

    /// The report as JUnit XML: one test case per check, skipped and failed
    /// ones marked as such (a failed SHOULD check is reported as skipped with
    /// a warning, since it does not fail the suite).
    pub fn junit(&self) -> String {
        fn escape(text: &str) -> String {
            text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
        }
        let count = |v: &str| self.results.iter().filter(|r| r.verdict == v).count();
        let failures = self.results.iter().filter(|r| r.verdict == "fail" && r.level == Level::Must).count();
        let skipped =
            count("skip") + self.results.iter().filter(|r| r.verdict == "fail" && r.level == Level::Should).count();
        let total: f64 = self.results.iter().map(|r| r.seconds).sum();
        let mut out = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuite name=\"berth conformance: {} {}\" tests=\"{}\" failures=\"{failures}\" skipped=\"{skipped}\" time=\"{total:.3}\">\n",
            escape(&self.backend),
            escape(&self.version),
            self.results.len()
        );
        for r in &self.results {
            out.push_str(&format!(
                "  <testcase classname=\"conformance.{}\" name=\"{} ({}, {}{}): {}\" time=\"{:.3}\">",
                escape(r.level.as_str()),
                escape(r.id),
                r.level.as_str(),
                if is_protocol_section(r.protocol) { "protocol section " } else { "" },
                escape(r.protocol),
                escape(r.statement),
                r.seconds
            ));
            match (r.verdict, r.level) {
                ("fail", Level::Must) => {
                    out.push_str(&format!("<failure message=\"{}\"/>", escape(r.detail.lines().next().unwrap_or(""))))
                }
                ("fail", Level::Should) => {
                    out.push_str(&format!("<skipped message=\"SHOULD not met: {}\"/>", escape(&r.detail)))
                }
                ("skip", _) => out.push_str(&format!("<skipped message=\"{}\"/>", escape(&r.detail))),
                _ => {}
            }
            out.push_str("</testcase>\n");
        }
        out.push_str("</testsuite>\n");
        out
    }

    /// A readable table.
    pub fn table(&self) -> String {
        let mut out = format!("conformance of backend {} {}\n\n", self.backend, self.version);
        for r in &self.results {
            let verdict = match (r.verdict, r.level) {
                ("fail", Level::Should) => "WARN",
                ("fail", _) => "FAIL",
                ("pass", _) => "pass",
                _ => "skip",
            };
            out.push_str(&format!(
                "{verdict:<5} {:<29} {:<6} {:>6.2}s  {}\n",
                r.id,
                r.level.as_str(),
                r.seconds,
                r.statement
            ));
            if !r.detail.is_empty() {
                for line in r.detail.lines() {
                    out.push_str(&format!("        {line}\n"));
                }
            }
        }
        let count = |v: &str| self.results.iter().filter(|r| r.verdict == v).count();
        out.push_str(&format!("\n{} passed, {} failed, {} skipped\n", count("pass"), count("fail"), count("skip")));
        out
    }
}

/// Every check, in the order the suite runs them.
pub fn checks() -> &'static [Check] {
    CHECKS
}

/// Runs the checks `filter` selects against `target`.
pub fn run(target: &Target, filter: &Filter) -> Result<Report, String> {
    for id in filter.only.iter().chain(&filter.skip) {
        if !CHECKS.iter().any(|c| c.id == id) {
            return Err(format!("unknown check {id:?}; `berth conformance --list` lists them"));
        }
    }
    let mut results = Vec::new();
    for check in CHECKS {
        if (!filter.only.is_empty() && !filter.only.iter().any(|id| id == check.id))
            || filter.skip.iter().any(|id| id == check.id)
        {
            continue;
        }
        let started = Instant::now();
        let (verdict, detail) = match check.needs.missing(&target.description) {
            Some(reason) => ("skip", reason.to_owned()),
            None => match (check.run)(target) {
                Ok(()) => ("pass", String::new()),
                Err(detail) => ("fail", detail),
            },
        };
        results.push(CheckResult {
            id: check.id,
            level: check.level,
            statement: check.statement,
            protocol: check.protocol,
            verdict,
            detail,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    Ok(Report { backend: target.description.name.clone(), version: target.description.version.clone(), results })
}

static NEXT_JOB: AtomicU64 = AtomicU64::new(0);

/// A job id no real GitLab job on this host has: far above GitLab's ids, and
/// unique per process and case.
fn job_id() -> u64 {
    9_000_000_000_000 + (u64::from(std::process::id()) << 16) + NEXT_JOB.fetch_add(1, Ordering::Relaxed)
}

fn response() -> JobResponse {
    let mut response = JobResponse::new(job_id());
    response.token = format!("conformance-token-{}", response.id);
    response.job_info = JobInfo::new("conformance", "test", "berth/probe");
    let id = response.id.to_string();
    response.variables = vec![
        ResponseVariable::new("CI_JOB_ID", &id),
        ResponseVariable::new("CI_PROJECT_PATH", "berth/probe"),
        ResponseVariable::new("CI_RUNNER_SHORT_TOKEN", "conform1"),
        ResponseVariable::new("CI_CONCURRENT_ID", "0"),
        ResponseVariable::new("CI_CONCURRENT_PROJECT_ID", "0"),
        ResponseVariable::new("CI", "true"),
    ];
    response
}

/// One job driven hook by hook.
struct Case<'a> {
    target: &'a Target,
    driver: Driver,
    job: JobRun,
    log: Arc<dyn Log>,
}

impl<'a> Case<'a> {
    fn new(target: &'a Target) -> Result<Self, String> {
        Self::with(target, |_| {})
    }

    fn with(target: &'a Target, edit: impl FnOnce(&mut JobResponse)) -> Result<Self, String> {
        let mut response = response();
        edit(&mut response);
        let job = JobRun::new(&response).map_err(|e| format!("failed to create the job's temp dir: {e}"))?;
        Ok(Case { target, driver: target.driver.clone(), job, log: Arc::new(Quiet) })
    }

    fn id(&self) -> u64 {
        self.job.response().id
    }

    fn config(&mut self) -> Result<HookResult, String> {
        let (result, parsed) = self.driver.config(&mut self.job, &self.log);
        parsed.map_err(|e| format!("{e}\n{}", result.output()))?;
        Ok(result)
    }

    fn prepare(&mut self) -> Result<HookResult, String> {
        self.config()?;
        let result =
            self.driver.call(&self.job, Hook::Prepare, &[], Some(self.driver.timeouts.prepare), None, &self.log);
        if !result.ok() {
            return Err(format!("prepare failed: {:?}\n{}", result.exit, tail(&result.output())));
        }
        Ok(result)
    }

    fn run(&mut self, stage: &str, body: &str) -> HookResult {
        self.driver.run_stage(&mut self.job, stage, body, None, &self.log)
    }

    fn run_ok(&mut self, stage: &str, body: &str) -> Result<HookResult, String> {
        let result = self.run(stage, body);
        if !result.ok() {
            return Err(format!("run {stage} failed: {:?}\n{}", result.exit, tail(&result.output())));
        }
        Ok(result)
    }

    fn cleanup(&mut self) -> HookResult {
        self.driver.call(&self.job, Hook::Cleanup, &[], Some(self.driver.timeouts.cleanup), None, &self.log)
    }

    /// Cleans up (twice, when `twice`) and checks that nothing of the job is left.
    fn finish(mut self) -> Result<(), String> {
        let result = self.cleanup();
        if !result.ok() {
            return Err(format!("cleanup failed: {:?}\n{}", result.exit, tail(&result.output())));
        }
        leak_check(self.target, self.id())
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

/// Fails if anything of job `id` is left: a file or directory under the
/// state directory named after it (except in `logs`, for records meant to
/// outlive the job), a process whose command line names it (a container, a
/// helper), or a mount whose path names it.
fn leak_check(target: &Target, id: u64) -> Result<(), String> {
    let needle = format!("-{id}");
    let mut leaks = Vec::new();
    if let Some(root) = &target.state_dir {
        let logs = root.join(berth_backend_api::LOGS_DIR);
        walk(root, &mut |path| {
            if !path.starts_with(&logs)
                && path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains(&needle))
            {
                leaks.push(format!("file {}", path.display()));
            }
        });
    }
    // Processes and mounts may take a moment to go after cleanup returned.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let live = live_leaks(&needle);
        if live.is_empty() || Instant::now() >= deadline {
            leaks.extend(live);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if leaks.is_empty() {
        Ok(())
    } else {
        Err(format!("cleanup left job {id} behind: {}", leaks.join(", ")))
    }
}

fn live_leaks(needle: &str) -> Vec<String> {
    let mut leaks = Vec::new();
    let me = std::process::id().to_string();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
            if pid == me {
                continue;
            }
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                leaks.push(format!("process {pid} ({})", cmdline.trim()));
            }
        }
    }
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
        for line in mounts.lines().filter(|l| l.contains(needle)) {
            let point = line.split(' ').nth(4).unwrap_or(line);
            leaks.push(format!("mount {point}"));
        }
    }
    leaks
}

/// Visits everything below `dir` on `dir`'s own filesystem (a job's mounted
/// root, /proc or /dev inside the state directory are not entered).
fn walk(dir: &Path, visit: &mut dyn FnMut(&Path)) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(dir) else { return };
    walk_dev(dir, meta.dev(), visit);
}

fn walk_dev(dir: &Path, dev: u64, visit: &mut dyn FnMut(&Path)) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        visit(&path);
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if meta.is_dir() && meta.dev() == dev {
            walk_dev(&path, dev, visit);
        }
    }
}

/// The contents of `path` if it is a regular file of at most 4 MiB.
fn read_small_file(path: &Path) -> Option<Vec<u8>> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    (meta.is_file() && meta.len() <= 4 << 20).then(|| std::fs::read(path).ok()).flatten()
}

fn expect_exit(result: &HookResult, want: &Exit, what: &str) -> Result<(), String> {
    if &result.exit != want {
        return Err(format!(
            "{what}: expected {want:?}, got {:?} (exit status {:?})\n{}",
            result.exit,
            result.status,
            tail(&result.output())
        ));
    }
    Ok(())
}

fn config_json(target: &Target) -> Result<(), String> {
    let mut case = Case::new(target)?;
    let result = case.config()?;
    let text = String::from_utf8_lossy(&result.stdout);
    let value: serde_json::Value =
        serde_json::from_str(text.trim()).map_err(|e| format!("config output is not JSON ({e}): {text:?}"))?;
    if !value.is_object() {
        return Err(format!("config output is not a JSON object: {text:?}"));
    }
    let driver = &case.job.config.driver;
    let Some(driver) = driver else { return Err("config output names no driver".into()) };
    if driver.name != target.description.name || driver.version != target.description.version {
        return Err(format!(
            "config names driver {} {}, the backend describes itself as {} {}",
            driver.name, driver.version, target.description.name, target.description.version
        ));
    }
    for (key, dir) in [("builds_dir", &case.job.config.builds_dir), ("cache_dir", &case.job.config.cache_dir)] {
        match dir {
            Some(dir) if dir.starts_with('/') => {}
            other => return Err(format!("config's {key} must be an absolute path, got {other:?}")),
        }
    }
    case.finish()
}

fn exit_success(target: &Target) -> Result<(), String> {
    let mut case = Case::new(target)?;
    case.prepare()?;
    let result = case.run("build_script", "true\n");
    expect_exit(&result, &Exit::Success, "a script that exits 0")?;
    if case.job.build_exit_code_file().exists() {
        return Err("BUILD_EXIT_CODE_FILE was written for a successful script".into());
    }
    case.finish()
}

fn exit_codes(target: &Target) -> Result<(), String> {
    let mut case = Case::new(target)?;
    case.prepare()?;
    for code in [1, 42, 255] {
        let result = case.run("build_script", &format!("exit {code}\n"));
        expect_exit(&result, &Exit::Build { code, from_file: true }, &format!("a script that exits {code}"))?;
    }
    case.finish()
}

fn exit_codes_from_env(target: &Target) -> Result<(), String> {
    let mut case = Case::new(target)?;
    case.driver.exit_codes = (77, 78);
    case.prepare()?;
    let result = case.run("build_script", "exit 3\n");
    if result.status != Some(77) {
        return Err(format!(
            "with BUILD_FAILURE_EXIT_CODE=77, a script exiting 3 made the hook exit {:?} instead of 77\n{}",
            result.status,
            tail(&result.output())
        ));
    }
    expect_exit(&result, &Exit::Build { code: 3, from_file: true }, "a script that exits 3")?;
    case.finish()
}

fn unknown_stage(target: &Target) -> Result<(), String> {
    let mut case = Case::new(target)?;
    case.prepare()?;
    let result = case.run("step_berth_future_stage", "true\n");
    expect_exit(&result, &Exit::Success, "a stage with a name unknown today")?;
    case.finish()
}

fn state_persists(target: &Target) -> Result<(), String> {
    let mut case = Case::new(target)?;
    case.prepare()?;
    let project = case.job.project_dir();
    let marker = format!("'{project}/berth-marker'");
    case.run_ok("get_sources", &format!("mkdir -p '{project}'\necho one > {marker}\n"))?;
    case.run_ok("build_script", &format!("echo two >> {marker}\n"))?;
    let result = case.run("after_script", &format!("test \"$(cat {marker})\" = \"$(printf 'one\\ntwo')\"\n"));
    expect_exit(&result, &Exit::Success, "a file written by earlier stages, read by a later one")?;
    case.finish()
}

fn cleanup_idempotent(target: &Target) -> Result<(), String> {
    let mut case = Case::new(target)?;
    case.prepare()?;
    let first = case.cleanup();
    expect_exit(&first, &Exit::Success, "the first cleanup")?;
    let second = case.cleanup();
    expect_exit(&second, &Exit::Success, "a second cleanup of the same job")?;
    case.finish()
}

fn cleanup_unprepared(target: &Target) -> Result<(), String> {
    let mut case = Case::new(target)?;
    case.config()?;
    case.finish()
}

fn log_released(target: &Target) -> Result<(), String> {
    let mut case = Case::new(target)?;
    let mut results = vec![case.prepare()?];
    results.push(case.run("build_script", "true\n"));
    results.push(case.cleanup());
    for result in &results {
        match result.log_released_after {
            Some(after) if after < Duration::from_secs(1) => {}
            Some(after) => return Err(format!("{} kept the job log open {after:?} after exiting", result.hook.name())),
            None => {
                return Err(format!(
                    "{} exited but its stdout/stderr stayed open (a process it left holds the job log; gitlab-runner would hang)",
                    result.hook.name()
                ))
            }
        }
    }
    case.finish()
}

fn background_process(target: &Target) -> Result<(), String> {
    let mut case = Case::new(target)?;
    case.prepare()?;
    let result = case.run("build_script", "(sleep 20; echo berth-late-output) &\necho berth-started\n");
    expect_exit(&result, &Exit::Success, "a stage that leaves a background process")?;
    match result.log_released_after {
        Some(after) if after < Duration::from_secs(2) => {}
        _ => return Err("a background process left by the stage kept the job log open".into()),
    }
    if !result.output().contains("berth-started") {
        return Err(format!("the stage's output is missing: {:?}", result.output()));
    }
    case.finish()
}

fn cancel(target: &Target) -> Result<(), String> {
    let mut case = Case::new(target)?;
    case.prepare()?;
    let (cancel, trigger) = Cancel::pair().map_err(|e| e.to_string())?;
    let fire = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        trigger.fire();
    });
    let path = case
        .job
        .write_script("build_script", "echo berth-sleeping\nsleep 12\necho berth-not-cancelled\n")
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let result =
        case.driver.call(&case.job, Hook::Run, &[path.into(), "build_script".into()], None, Some(&cancel), &case.log);
    let stopped = started.elapsed();
    let _ = fire.join();
    if result.ok() || result.output().contains("berth-not-cancelled") {
        return Err(format!("the stage ran to its end despite SIGTERM: {:?}", result.exit));
    }
    if stopped > Duration::from_secs(5) {
        return Err(format!("the stage stopped {stopped:.1?} after SIGTERM (needs to stop within a few seconds)"));
    }
    case.finish()
}

const SECRET_KEY: &str = "BERTH_CONFORMANCE_SECRET";

fn masked(target: &Target) -> Result<(), String> {
    let secret = format!(
        "berth-masked-{:x}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |d| d.as_nanos())
    );
    let mut case = Case::with(target, |r| r.variables.push(ResponseVariable::new(SECRET_KEY, &secret).masked()))?;
    let mut outputs = vec![case.prepare()?.output()];
    let body = format!("export {SECRET_KEY}={}\ntrue\n", berth_backend_api::script::quote(&secret));
    outputs.push(case.run("build_script", &body).output());
    let mut files = Vec::new();
    if let Some(root) = &target.state_dir {
        walk(root, &mut |path| {
            if let Some(text) = read_small_file(path) {
                if String::from_utf8_lossy(&text).contains(&secret) {
                    files.push(path.display().to_string());
                }
            }
        });
    }
    outputs.push(case.cleanup().output());
    if outputs.iter().any(|o| o.contains(&secret)) {
        return Err("a masked variable's value appeared in a hook's output".into());
    }
    if !files.is_empty() {
        return Err(format!("a masked variable's value was written to {}", files.join(", ")));
    }
    case.finish()
}

fn identity(target: &Target) -> Result<(), String> {
    let shadow = |r: &mut JobResponse| r.variables.push(ResponseVariable::new("CI_JOB_ID", "1"));
    let mut a = Case::with(target, shadow)?;
    let mut b = Case::with(target, shadow)?;
    a.job.set_variable("CI_JOB_ID", "1");
    b.job.set_variable("CI_JOB_ID", "1");
    a.prepare()?;
    let project = a.job.project_dir();
    a.run_ok("get_sources", &format!("mkdir -p '{project}'\necho a > '{project}/berth-identity'\n"))?;
    b.prepare()?;
    let cleaned = b.cleanup();
    expect_exit(&cleaned, &Exit::Success, "cleanup of the second job")?;
    let result = a.run("build_script", &format!("test \"$(cat '{project}/berth-identity')\" = a\n"));
    expect_exit(
        &result,
        &Exit::Success,
        "the first job, after another job with the same CUSTOM_ENV_CI_JOB_ID was cleaned up",
    )?;
    b.finish()?;
    a.finish()
}

/// Bytes as lowercase hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn variables_exact(target: &Target) -> Result<(), String> {
    let value = "it's \"quoted\" $HOME `id` \\ back\nsecond line\ttab ünïcødé ☃ 🚀 %s *";
    let mut case = Case::with(target, |r| r.variables.push(ResponseVariable::new("BERTH_EXACT", value)))?;
    case.prepare()?;
    let body = format!(
        "export BERTH_EXACT={}\nprintf 'hex=%s\\n' \"$(printf '%s' \"$BERTH_EXACT\" | od -An -tx1 -v | tr -d ' \\n')\"\n",
        berth_backend_api::script::quote(value)
    );
    let result = case.run_ok("build_script", &body)?;
    let want = format!("hex={}", hex(value.as_bytes()));
    if !result.output().lines().any(|l| l.trim() == want) {
        return Err(format!(
            "the variable did not reach the script exactly: want {want}, output {:?}",
            result.output()
        ));
    }
    case.finish()
}

fn concurrent_isolation(target: &Target) -> Result<(), String> {
    let mut a = Case::new(target)?;
    let mut b = Case::new(target)?;
    a.prepare()?;
    b.prepare()?;
    let marker = format!("berth-iso-{}", a.id());
    let (first, rest) = marker.split_at(1);
    let project = a.job.project_dir();
    let builds = b.job.config.builds_dir.clone().unwrap_or_else(|| "/builds".into());
    a.run_ok(
        "get_sources",
        &format!("echo secret > /tmp/{marker}\nmkdir -p '{project}' && echo a > '{project}/{marker}'\n"),
    )?;
    let probe = format!(
        "test ! -e /tmp/{marker}\nif grep -rqsa '[{first}]{rest}' '{builds}' 2>/dev/null; then exit 3; fi\nif grep -qsa '[{first}]{rest}' /proc/[0-9]*/cmdline; then exit 4; fi\n"
    );
    let (a_result, b_result) = std::thread::scope(|scope| {
        let long = scope.spawn(|| a.run("build_script", &format!("(exec -a {marker} sleep 4)\n")));
        std::thread::sleep(Duration::from_millis(1000));
        let probe = b.run("build_script", &probe);
        (long.join(), probe)
    });
    let a_result = a_result.map_err(|_| "the first job's stage panicked".to_owned())?;
    expect_exit(&a_result, &Exit::Success, "the first job's long stage")?;
    match &b_result.exit {
        Exit::Success => {}
        Exit::Build { code: 1, .. } => return Err("a job saw another job's file in /tmp".into()),
        Exit::Build { code: 3, .. } => return Err("a job saw another job's files under its builds dir".into()),
        Exit::Build { code: 4, .. } => return Err("a job saw another job's processes".into()),
        other => return Err(format!("the probe stage failed: {other:?}\n{}", tail(&b_result.output()))),
    }
    b.finish()?;
    a.finish()
}

fn killed_prepare(target: &Target) -> Result<(), String> {
    let mut case = Case::new(target)?;
    case.config()?;
    let mut driver = case.driver.clone();
    driver.timeouts.graceful_kill = Duration::ZERO;
    let (cancel, trigger) = Cancel::pair().map_err(|e| e.to_string())?;
    let fire = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        trigger.fire();
    });
    let _ = driver.call(&case.job, Hook::Prepare, &[], Some(driver.timeouts.prepare), Some(&cancel), &case.log);
    let _ = fire.join();
    case.finish()
}

fn job_spec(script: &[&str], after: &[&str]) -> JobSpec {
    let mut response = response();
    response.steps = vec![Step::new("script", script.iter().map(|s| s.to_string()).collect(), "on_success")];
    if !after.is_empty() {
        response.steps.push(Step::new("after_script", after.iter().map(|s| s.to_string()).collect(), "always"));
    }
    JobSpec {
        response,
        sources: None,
        allow_failure_codes: Vec::new(),
        allow_failure: false,
        timeout: Duration::from_secs(120),
    }
}

fn whole_job(target: &Target, spec: &JobSpec) -> Result<crate::job::Report, String> {
    let interrupts = Interrupts::none().map_err(|e| e.to_string())?;
    let log: Arc<dyn Log> = Arc::new(Quiet);
    let report = target.driver.run_job(spec, &interrupts, &log);
    leak_check(target, spec.response.id)?;
    if let Some((_, cleanup)) = report.calls.iter().rev().find(|(_, r)| r.hook == Hook::Cleanup) {
        expect_exit(cleanup, &Exit::Success, "cleanup at the end of the job")?;
    }
    Ok(report)
}

fn job_success(target: &Target) -> Result<(), String> {
    let report = whole_job(target, &job_spec(&["echo berth-job-ran"], &[]))?;
    if report.outcome != Outcome::Succeeded {
        return Err(format!("a job whose script succeeds ended as {:?}", report.outcome));
    }
    let stages = report.stages();
    if stages != ["prepare_script", "get_sources", "build_script"] {
        return Err(format!("stages called: {stages:?}"));
    }
    let ran = report.calls.iter().any(|(_, r)| r.output().contains("berth-job-ran"));
    if target.description.capabilities.executes_scripts && !ran {
        return Err("the job's script output is not in the job log".into());
    }
    Ok(())
}

fn job_failure(target: &Target) -> Result<(), String> {
    let report = whole_job(target, &job_spec(&["exit 42"], &["echo \"berth-after-$CI_JOB_STATUS\""]))?;
    if report.outcome != (Outcome::Failed { code: 42, allowed: false }) {
        return Err(format!("a job whose script exits 42 ended as {:?}", report.outcome));
    }
    if !report.calls.iter().any(|(stage, r)| stage == "after_script" && r.output().contains("berth-after-failed")) {
        return Err("after_script did not run with CI_JOB_STATUS=failed after the script failed".into());
    }
    Ok(())
}

const CHECKS: &[Check] = &[
    Check {
        id: "config.json",
        level: Level::Must,
        statement: "config prints one JSON object naming the driver, with absolute builds/cache dirs",
        protocol: "3",
        needs: Needs::Nothing,
        run: config_json,
    },
    Check {
        id: "cleanup.unprepared",
        level: Level::Must,
        statement: "cleanup of a job that was never prepared succeeds and leaves nothing",
        protocol: "5",
        needs: Needs::Nothing,
        run: cleanup_unprepared,
    },
    Check {
        id: "cleanup.idempotent",
        level: Level::Must,
        statement: "cleanup twice in a row succeeds both times",
        protocol: "5",
        needs: Needs::Nothing,
        run: cleanup_idempotent,
    },
    Check {
        id: "stage.unknown-name",
        level: Level::Must,
        statement: "run accepts stage names it does not know",
        protocol: "4",
        needs: Needs::Nothing,
        run: unknown_stage,
    },
    Check {
        id: "hook.releases-log",
        level: Level::Must,
        statement: "prepare, run and cleanup close the job log when they exit",
        protocol: "4",
        needs: Needs::Nothing,
        run: log_released,
    },
    Check {
        id: "secrets.masked",
        level: Level::Must,
        statement: "masked values reach no hook output and no state file",
        protocol: "2",
        needs: Needs::Nothing,
        run: masked,
    },
    Check {
        id: "job.success",
        level: Level::Must,
        statement: "a whole job succeeds through config, prepare, every stage and cleanup",
        protocol: "4",
        needs: Needs::Nothing,
        run: job_success,
    },
    Check {
        id: "exit.success",
        level: Level::Must,
        statement: "a script exiting 0 makes run exit 0 without BUILD_EXIT_CODE_FILE",
        protocol: "5",
        needs: Needs::ExecutesScripts,
        run: exit_success,
    },
    Check {
        id: "exit.codes",
        level: Level::Must,
        statement: "a script exiting 1/42/255 gives the build failure code and that code in BUILD_EXIT_CODE_FILE",
        protocol: "5",
        needs: Needs::ExecutesScripts,
        run: exit_codes,
    },
    Check {
        id: "exit.codes-from-env",
        level: Level::Must,
        statement: "exit codes follow BUILD_FAILURE_EXIT_CODE from the environment",
        protocol: "5",
        needs: Needs::ExecutesScripts,
        run: exit_codes_from_env,
    },
    Check {
        id: "job.failure",
        level: Level::Must,
        statement: "a failing script fails the job with its exit code, after_script runs with CI_JOB_STATUS=failed",
        protocol: "4",
        needs: Needs::ExecutesScripts,
        run: job_failure,
    },
    Check {
        id: "stage.state-persists",
        level: Level::Must,
        statement: "files written in one stage are visible in the next (each stage is a new process)",
        protocol: "2",
        needs: Needs::ExecutesScripts,
        run: state_persists,
    },
    Check {
        id: "stage.background-process",
        level: Level::Must,
        statement: "a background process left by a stage does not hold the job log",
        protocol: "4",
        needs: Needs::ExecutesScripts,
        run: background_process,
    },
    Check {
        id: "identity.trusted",
        level: Level::Must,
        statement: "the job's identity comes from JOB_RESPONSE_FILE, not the shadowable CUSTOM_ENV_CI_JOB_ID",
        protocol: "2",
        needs: Needs::ExecutesScripts,
        run: identity,
    },
    Check {
        id: "variables.exact",
        level: Level::Must,
        statement: "variables reach the script byte for byte (quotes, newlines, unicode)",
        protocol: "2",
        needs: Needs::ExecutesScripts,
        run: variables_exact,
    },
    Check {
        id: "cleanup.after-killed-prepare",
        level: Level::Must,
        statement: "cleanup after a prepare killed with SIGKILL leaves no state, process or mount behind",
        protocol: "5",
        needs: Needs::Nothing,
        run: killed_prepare,
    },
    Check {
        id: "isolation.concurrent",
        level: Level::Must,
        statement: "two concurrent jobs see neither each other's files nor processes",
        protocol: "7",
        needs: Needs::Isolation,
        run: concurrent_isolation,
    },
    Check {
        id: "cancel.sigterm",
        level: Level::Must,
        statement: "SIGTERM to run's process group stops the stage within seconds; cleanup still works",
        protocol: "6",
        needs: Needs::Cancel,
        run: cancel,
    },
    Check {
        id: "containment.own-root",
        level: Level::Must,
        statement: "a job sees none of the host's files, and what it writes at / stays out of the host's /",
        protocol: "security: a job's root filesystem must not be the host's",
        needs: Needs::Containment,
        run: containment::own_root,
    },
    Check {
        id: "containment.chroot-escape",
        level: Level::Should,
        statement: "the classic chroot escape (chroot into a subdirectory, \"..\" up, chroot \".\") stays in the job's root (probed with perl or python3)",
        protocol: "security: a job's root must be the root of its own mount namespace, not a chroot in the host's",
        needs: Needs::Containment,
        run: containment::chroot_escape,
    },
    Check {
        id: "containment.open-by-handle",
        level: Level::Should,
        statement: "open_by_handle_at is refused in a job (probed with perl or python3)",
        protocol: "security: a file handle of a bound filesystem must not open the host's files",
        needs: Needs::Containment,
        run: containment::open_by_handle,
    },
    Check {
        id: "containment.root-unmapped",
        level: Level::Must,
        statement: "the job's uid 0 is not the host's uid 0 (/proc/self/uid_map has no `0 0 N`)",
        protocol: "security: a job's root must not be the host's root",
        needs: Needs::Containment,
        run: containment::root_unmapped,
    },
    Check {
        id: "containment.no-devices",
        level: Level::Must,
        statement: "root in a job cannot create and open host devices (/dev/mem, /dev/kmsg, the disk of /)",
        protocol: "security: host devices must be out of a job's reach",
        needs: Needs::Containment,
        run: containment::no_devices,
    },
    Check {
        id: "containment.sysctl-readonly",
        level: Level::Must,
        statement: "root in a job cannot open kernel settings for writing, even after remounting /proc",
        protocol: "security: a job must not change the host's kernel settings",
        needs: Needs::Containment,
        run: containment::sysctl_readonly,
    },
    Check {
        id: "containment.env-private",
        level: Level::Must,
        statement: "no process a job can see holds the hooks' environment",
        protocol: "security: the runner's environment, with its tokens and credentials, must not reach a job",
        needs: Needs::Containment,
        run: containment::env_private,
    },
    Check {
        id: "containment.job-binaries",
        level: Level::Must,
        statement: "binaries a job replaces never run with the host's privileges or environment",
        protocol: "security: the host must not run code a job planted",
        needs: Needs::Containment,
        run: containment::job_binaries,
    },
    Check {
        id: "containment.cache-nosuid",
        level: Level::Must,
        statement: "the cache dir is a mount of its own with nosuid and nodev",
        protocol: "security: what a job leaves in the cache must not grant privileges to later jobs",
        needs: Needs::Containment,
        run: containment::cache_nosuid,
    },
    Check {
        id: "containment.cache-per-project",
        level: Level::Must,
        statement: "jobs of different projects do not share a cache; jobs of one project do",
        protocol: "security: a job must not poison or read another project's cache",
        needs: Needs::Containment,
        run: containment::cache_per_project,
    },
];
