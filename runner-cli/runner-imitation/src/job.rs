//! A whole job, run the way GitLab Runner runs it (custom-executor-protocol.md §4-§6).

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_backend_api::script::quote;
use berth_backend_api::{Cancel, JobResponse};

use crate::runner::{Driver, Exit, Hook, HookResult, JobRun, Log};

/// A job to run: GitLab's payload plus what the runner takes from elsewhere.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// The payload written to `JOB_RESPONSE_FILE`. Its `steps` named `script`
    /// (before_script and script together) and `after_script` are run.
    pub response: JobResponse,
    /// The project's files as a base64-encoded tar.gz, unpacked by the
    /// `get_sources` stage; `None` skips the stage's checkout.
    pub sources: Option<String>,
    /// Exit codes that fail the job only as "allowed to fail".
    pub allow_failure_codes: Vec<i32>,
    /// Any failure is allowed.
    pub allow_failure: bool,
    /// The job timeout.
    pub timeout: Duration,
}

/// How the job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `Job succeeded`.
    Succeeded,
    /// `Job failed: exit code N`.
    Failed {
        /// The job's exit code.
        code: i32,
        /// Whether `allow_failure` covers it.
        allowed: bool,
    },
    /// `Job failed (system failure)`.
    SystemFailure(String),
    /// The job was cancelled.
    Cancelled,
    /// The job timeout passed.
    TimedOut(Duration),
}

impl Outcome {
    /// The job passed: it succeeded, or failed only as allowed to fail.
    pub fn passed(&self) -> bool {
        matches!(self, Outcome::Succeeded | Outcome::Failed { allowed: true, .. })
    }

    /// The job failed for the environment's sake rather than its script's.
    pub fn is_system_failure(&self) -> bool {
        matches!(self, Outcome::SystemFailure(_))
    }

    /// The runner's last line for this outcome.
    pub fn verdict(&self) -> String {
        match self {
            Outcome::Succeeded => "Job succeeded".into(),
            Outcome::Failed { code, allowed: true } => {
                format!("WARNING: Job failed: exit code {code} (allowed to fail)")
            }
            Outcome::Failed { code, .. } => format!("ERROR: Job failed: exit code {code}"),
            Outcome::SystemFailure(reason) => format!("ERROR: Job failed (system failure): {reason}"),
            Outcome::Cancelled => "ERROR: Job failed: canceled".into(),
            Outcome::TimedOut(t) => format!("ERROR: Job failed: execution took longer than {} seconds", t.as_secs()),
        }
    }
}

/// What happened, hook by hook.
#[derive(Debug)]
pub struct Report {
    /// The outcome.
    pub outcome: Outcome,
    /// Every hook call in order, with the stage name for run calls.
    pub calls: Vec<(String, HookResult)>,
    /// Prepare attempts made.
    pub attempts: u32,
}

impl Report {
    /// The run stages called, in order.
    pub fn stages(&self) -> Vec<&str> {
        self.calls.iter().filter(|(_, r)| r.hook == Hook::Run).map(|(s, _)| s.as_str()).collect()
    }
}

/// The runner's interrupts: the first cancels the job (the running user step
/// is stopped; after_script and cleanup still run), the second aborts it
/// (the running hook is stopped; only cleanup runs). `abort` must fire only
/// after `cancel` has.
#[derive(Debug)]
pub struct Interrupts {
    /// A cancel.
    pub cancel: Cancel,
    /// An abort.
    pub abort: Cancel,
}

impl Interrupts {
    /// Interrupts that never fire.
    pub fn none() -> std::io::Result<Self> {
        Ok(Interrupts { cancel: Cancel::never()?, abort: Cancel::never()? })
    }
}

const ATTEMPTS: u32 = 3;

impl Driver {
    /// Runs `spec` to its end, calling cleanup at the end of every job and
    /// after every failed prepare attempt.
    pub fn run_job(&self, spec: &JobSpec, interrupts: &Interrupts, log: &Arc<dyn Log>) -> Report {
        let mut calls = Vec::new();
        let started = Instant::now();
        let deadline = started + spec.timeout;
        let mut attempt = 0;
        log.runner("Preparing the \"custom\" executor");
        let mut job = loop {
            attempt += 1;
            let mut job = match JobRun::new(&spec.response) {
                Ok(job) => job,
                Err(e) => {
                    let outcome = Outcome::SystemFailure(format!("failed to create the job's temp dir: {e}"));
                    return Report { outcome, calls, attempts: attempt };
                }
            };
            let (result, config) = self.config(&mut job, log);
            calls.push((Hook::Config.name().to_owned(), result));
            let failure = match config {
                Err(reason) => Some((reason, false)),
                Ok(config) => {
                    if let Some(driver) = &config.driver {
                        log.runner(&format!("Using Custom executor with driver {} {}...", driver.name, driver.version));
                    } else {
                        log.runner("Using Custom executor...");
                    }
                    log.runner("Preparing environment");
                    let left = deadline.saturating_duration_since(Instant::now()).min(self.timeouts.prepare);
                    let result = self.call(&job, Hook::Prepare, &[], Some(left), Some(&interrupts.cancel), log);
                    let exit = result.exit.clone();
                    let terminated = result.terminated;
                    calls.push((Hook::Prepare.name().to_owned(), result));
                    match exit {
                        Exit::Success => None,
                        Exit::Build { code, .. } => {
                            self.cleanup(&job, &mut calls, log);
                            let outcome = Outcome::Failed { code, allowed: allowed(spec, code) };
                            return Report { outcome, calls, attempts: attempt };
                        }
                        Exit::System(reason) => Some((reason, terminated)),
                    }
                }
            };
            let Some((reason, terminated)) = failure else { break job };
            self.cleanup(&job, &mut calls, log);
            if terminated {
                let outcome = interrupted_outcome(interrupts, deadline, spec);
                return Report { outcome, calls, attempts: attempt };
            }
            if attempt >= ATTEMPTS {
                return Report { outcome: Outcome::SystemFailure(reason), calls, attempts: attempt };
            }
            log.runner(&format!("WARNING: Preparation failed: {reason}"));
            log.runner(&format!("Will be retried in {:?} ...", self.timeouts.retry_delay));
            if interrupts.cancel.wait(self.timeouts.retry_delay) {
                return Report { outcome: Outcome::Cancelled, calls, attempts: attempt };
            }
        };

        job.set_variable("CI_JOB_STATUS", "running");
        let mut outcome = Outcome::Succeeded;
        let mut after_script = true;
        let plan = stage_plan(spec);
        for stage in &plan {
            let user_step = stage.name == "build_script" || stage.name.starts_with("step_");
            if stage.name == "after_script" {
                if !after_script {
                    continue;
                }
                let status = match outcome {
                    Outcome::Succeeded => "success",
                    Outcome::Cancelled => "canceled",
                    _ => "failed",
                };
                job.set_variable("CI_JOB_STATUS", status);
            } else if stage.name == "cleanup_file_variables" {
                // Always runs, unless the job was aborted.
            } else if outcome != Outcome::Succeeded {
                continue;
            }
            if let Some(header) = stage.header {
                log.runner(header);
            }
            let body = (stage.body)(spec, &job);
            let cancel = if stage.name == "after_script" || stage.name == "cleanup_file_variables" {
                &interrupts.abort
            } else {
                &interrupts.cancel
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout_before = left.is_zero();
            let mut result = if timeout_before {
                None
            } else {
                Some(self.run_stage_with_timeout(&mut job, stage.name, &body, left, cancel, log))
            };
            let terminated = result.as_ref().is_none_or(|r| r.terminated);
            let exit = result.as_ref().map(|r| r.exit.clone());
            if let Some(result) = result.take() {
                calls.push((stage.name.to_owned(), result));
            }
            if terminated {
                let interrupted = interrupted_outcome(interrupts, deadline, spec);
                if interrupted == Outcome::Cancelled && user_step && !interrupts.abort.is_cancelled() {
                    outcome = Outcome::Cancelled;
                    continue;
                }
                outcome = interrupted;
                break;
            }
            match exit {
                Some(Exit::Success) | None => {}
                Some(_) if stage.name == "after_script" => {
                    log.runner("WARNING: after_script failed, but job will continue unaffected");
                }
                Some(Exit::Build { code, .. }) => {
                    outcome = Outcome::Failed { code, allowed: allowed(spec, code) };
                    // get_sources and the like fail the job without after_script.
                    after_script = user_step;
                }
                Some(Exit::System(reason)) => {
                    outcome = Outcome::SystemFailure(reason);
                    after_script = user_step;
                }
            }
        }
        self.cleanup(&job, &mut calls, log);
        Report { outcome, calls, attempts: attempt }
    }

    fn run_stage_with_timeout(
        &self,
        job: &mut JobRun,
        stage: &str,
        body: &str,
        timeout: Duration,
        cancel: &Cancel,
        log: &Arc<dyn Log>,
    ) -> HookResult {
        match job.write_script(stage, body) {
            Ok(path) => self.call(job, Hook::Run, &[path.into(), stage.into()], Some(timeout), Some(cancel), log),
            Err(_) => self.run_stage(job, stage, body, Some(cancel), log),
        }
    }

    fn cleanup(&self, job: &JobRun, calls: &mut Vec<(String, HookResult)>, log: &Arc<dyn Log>) {
        let result = self.call(job, Hook::Cleanup, &[], Some(self.timeouts.cleanup), None, log);
        calls.push((Hook::Cleanup.name().to_owned(), result));
    }
}

fn allowed(spec: &JobSpec, code: i32) -> bool {
    spec.allow_failure || spec.allow_failure_codes.contains(&code)
}

fn interrupted_outcome(interrupts: &Interrupts, deadline: Instant, spec: &JobSpec) -> Outcome {
    if interrupts.cancel.is_cancelled() {
        Outcome::Cancelled
    } else if Instant::now() >= deadline {
        Outcome::TimedOut(spec.timeout)
    } else {
        Outcome::SystemFailure("the hook was stopped".into())
    }
}

struct Stage {
    name: &'static str,
    header: Option<&'static str>,
    body: fn(&JobSpec, &JobRun) -> String,
}

/// The stages the runner calls for this job, in order (§4).
fn stage_plan(spec: &JobSpec) -> Vec<Stage> {
    let mut plan = vec![
        Stage { name: "prepare_script", header: None, body: prepare_body },
        Stage { name: "get_sources", header: Some("Getting source from Git repository"), body: sources_body },
        Stage {
            name: "build_script",
            header: Some("Executing \"step_script\" stage of the job script"),
            body: script_body,
        },
    ];
    if step(spec, "after_script").is_some_and(|s| !s.is_empty()) {
        plan.push(Stage { name: "after_script", header: Some("Running after_script"), body: after_body });
    }
    if spec.response.variables.iter().any(|v| v.file) {
        plan.push(Stage {
            name: "cleanup_file_variables",
            header: Some("Cleaning up project directory and file based variables"),
            body: cleanup_files_body,
        });
    }
    plan
}

fn step<'a>(spec: &'a JobSpec, name: &str) -> Option<&'a [String]> {
    spec.response.steps.iter().find(|s| s.name == name).map(|s| s.script.as_slice())
}

fn prepare_body(_: &JobSpec, _: &JobRun) -> String {
    "echo \"Running on $(hostname)...\"\n".into()
}

fn is_name(key: &str) -> bool {
    let mut chars = key.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn single_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// The runner's preamble of every job stage: exports, file variables, cd.
fn preamble(spec: &JobSpec, job: &JobRun, cd: bool) -> String {
    let project = job.project_dir();
    let tmp = format!("{project}.tmp");
    let mut out = String::new();
    for (key, value) in &job.variables {
        if !is_name(key) || spec.response.variables.iter().any(|v| v.file && &v.key == key) {
            continue;
        }
        out.push_str(&format!("export {key}={}\n", quote(value)));
    }
    for var in spec.response.variables.iter().filter(|v| v.file && is_name(&v.key)) {
        let value = job.variables.get(&var.key).unwrap_or(&var.value);
        let path = format!("{tmp}/{}", var.key);
        out.push_str(&format!("mkdir -p {}\n", single_quote(&tmp)));
        out.push_str(&format!("printf '%s' {} > {}\n", quote(value), single_quote(&path)));
        out.push_str(&format!("export {}={}\n", var.key, single_quote(&path)));
    }
    out.push_str(&format!("export RUNNER_TEMP_PROJECT_DIR={}\n", quote(&tmp)));
    if cd {
        out.push_str(&format!("cd {}\n", single_quote(&project)));
    }
    out
}

fn sources_body(spec: &JobSpec, job: &JobRun) -> String {
    let project = job.project_dir();
    let mut out = preamble(spec, job, false);
    let Some(archive) = &spec.sources else {
        out.push_str("echo 'Skipping Git repository setup'\n");
        out.push_str(&format!("mkdir -p {}\n", single_quote(&project)));
        return out;
    };
    out.push_str(&format!(
        "echo {}\n",
        quote(&format!("\x1b[32;1mCopying the local work tree into {project}\x1b[0;m"))
    ));
    out.push_str(&format!("rm -rf {p}\nmkdir -p {p}\ncd {p}\n", p = single_quote(&project)));
    out.push_str("base64 -d <<'BERTH_SOURCES_EOF' | tar -xzf - --no-same-owner\n");
    for chunk in archive.as_bytes().chunks(76) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("BERTH_SOURCES_EOF\n");
    out
}

fn commands(out: &mut String, commands: &[String]) {
    for command in commands {
        let shown = command.lines().next().unwrap_or_default();
        let shown =
            if command.contains('\n') { format!("{shown} # collapsed multi-line command") } else { shown.to_owned() };
        out.push_str(&format!("echo {}\n", quote(&format!("\x1b[32;1m$ {shown}\x1b[0;m"))));
        out.push_str(command);
        out.push('\n');
    }
}

fn script_body(spec: &JobSpec, job: &JobRun) -> String {
    let mut out = preamble(spec, job, true);
    commands(&mut out, step(spec, "script").unwrap_or_default());
    out
}

fn after_body(spec: &JobSpec, job: &JobRun) -> String {
    let mut out = preamble(spec, job, true);
    commands(&mut out, step(spec, "after_script").unwrap_or_default());
    out
}

fn cleanup_files_body(spec: &JobSpec, job: &JobRun) -> String {
    let tmp = format!("{}.tmp", job.project_dir());
    let mut out = String::new();
    for var in spec.response.variables.iter().filter(|v| v.file && is_name(&v.key)) {
        out.push_str(&format!("rm -f {}\n", single_quote(&format!("{tmp}/{}", var.key))));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_backend_api::{ResponseVariable, Step};

    fn spec() -> JobSpec {
        let mut response = JobResponse::new(7);
        response.variables = vec![
            ResponseVariable::new("GREETING", "it's \"quoted\"\nand multi-line ☃"),
            ResponseVariable::new("KUBECONFIG", "apiVersion: v1\n").file(),
        ];
        response.steps = vec![Step::new("script", vec!["echo $GREETING".into()], "on_success")];
        JobSpec {
            response,
            sources: None,
            allow_failure_codes: vec![42],
            allow_failure: false,
            timeout: Duration::from_secs(60),
        }
    }

    #[test]
    fn plan_skips_stages_with_nothing_to_do() {
        let mut s = spec();
        let names: Vec<_> = stage_plan(&s).iter().map(|st| st.name).collect();
        assert_eq!(names, ["prepare_script", "get_sources", "build_script", "cleanup_file_variables"]);
        s.response.variables.retain(|v| !v.file);
        s.response.steps.push(Step::new("after_script", vec!["echo bye".into()], "always"));
        let names: Vec<_> = stage_plan(&s).iter().map(|st| st.name).collect();
        assert_eq!(names, ["prepare_script", "get_sources", "build_script", "after_script"]);
    }

    #[test]
    fn script_body_exports_variables_and_file_variables_then_runs_commands() {
        let s = spec();
        let mut job = JobRun::new(&s.response).unwrap();
        job.config.builds_dir = Some("/builds".into());
        let body = script_body(&s, &job);
        // As the runner writes it: bytes from 0x80 on as `\xHH`.
        assert!(body.contains("export GREETING=$'it\\'s \"quoted\"\\nand multi-line \\xe2\\x98\\x83'\n"), "{body}");
        assert!(body.contains("printf '%s' $'apiVersion: v1\\n' > '/builds/project.tmp/KUBECONFIG'\n"), "{body}");
        assert!(body.contains("export KUBECONFIG='/builds/project.tmp/KUBECONFIG'\n"));
        assert!(body.contains("cd '/builds/project'\n"));
        assert!(body.ends_with("echo $GREETING\n"));
    }

    #[test]
    fn verdicts_use_gitlab_wording() {
        assert_eq!(Outcome::Succeeded.verdict(), "Job succeeded");
        assert_eq!(Outcome::Failed { code: 42, allowed: false }.verdict(), "ERROR: Job failed: exit code 42");
        assert_eq!(Outcome::SystemFailure("x".into()).verdict(), "ERROR: Job failed (system failure): x");
        assert!(!Outcome::Failed { code: 42, allowed: false }.passed());
        assert!(Outcome::Failed { code: 42, allowed: true }.passed());
        assert!(!Outcome::Cancelled.passed() && !Outcome::Cancelled.is_system_failure());
        assert!(Outcome::SystemFailure("x".into()).is_system_failure());
    }
}
