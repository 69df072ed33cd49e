//! GitLab Runner's side of the custom-executor protocol, imitated.
//!
//! [`Driver`] calls a driver's hooks exactly as gitlab-runner does
//! (custom-executor-protocol.md §2-§6): each hook a new process in its own
//! process group, stdin `/dev/null`, working directory the job's temp dir, the
//! runner's environment variables, the job's variables as `CUSTOM_ENV_*`, both
//! output pipes read until closed, exit codes classified by the protocol's
//! rules, SIGTERM then SIGKILL to the whole group on cancel or timeout.
//! [`Driver::run_job`] runs a whole job: config, prepare (with retries),
//! every stage in order, cleanup. `berth exec` and the conformance checks
//! both use it.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use berth_backend_api::script;
use berth_backend_api::{Cancel, JobResponse, ResponseVariable};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;

/// The exit code the runner passes as `BUILD_FAILURE_EXIT_CODE`.
pub const BUILD_FAILURE: i32 = 1;
/// The exit code the runner passes as `SYSTEM_FAILURE_EXIT_CODE`.
pub const SYSTEM_FAILURE: i32 = 2;

/// One of the four hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// `config_exec`.
    Config,
    /// `prepare_exec`.
    Prepare,
    /// `run_exec`.
    Run,
    /// `cleanup_exec`.
    Cleanup,
}

impl Hook {
    /// The subcommand name (`config`, `prepare`, `run`, `cleanup`).
    pub fn name(self) -> &'static str {
        match self {
            Hook::Config => "config",
            Hook::Prepare => "prepare",
            Hook::Run => "run",
            Hook::Cleanup => "cleanup",
        }
    }
}

/// Which pipe output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// stdout.
    Stdout,
    /// stderr.
    Stderr,
}

/// Where the job log goes.
pub trait Log: Send + Sync {
    /// A line the runner itself writes (section headers, the verdict).
    fn runner(&self, line: &str);
    /// Output of a hook as it arrives. The runner shows config's stderr and
    /// prepare's and run's output in the job log, and keeps cleanup's for its own log.
    fn hook(&self, hook: Hook, stream: Stream, bytes: &[u8]);
}

/// A [`Log`] that drops everything (results still carry the output).
#[derive(Debug, Default)]
pub struct Quiet;

impl Log for Quiet {
    fn runner(&self, _line: &str) {}
    fn hook(&self, _hook: Hook, _stream: Stream, _bytes: &[u8]) {}
}

/// The runner's timeouts (config.toml's `[runners.custom]`).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// `config_exec_timeout`.
    pub config: Duration,
    /// `prepare_exec_timeout`.
    pub prepare: Duration,
    /// `cleanup_exec_timeout`.
    pub cleanup: Duration,
    /// `graceful_kill_timeout`: SIGTERM to SIGKILL.
    pub graceful_kill: Duration,
    /// `force_kill_timeout`: after SIGKILL, when the runner gives up on the process.
    pub force_kill: Duration,
    /// How long, after a hook exited, its pipes may stay open before the
    /// imitation stops waiting (the real runner waits forever: a hung job).
    pub log_release: Duration,
    /// Pause between prepare attempts (the runner's is 3 s).
    pub retry_delay: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            config: Duration::from_secs(3600),
            prepare: Duration::from_secs(3600),
            cleanup: Duration::from_secs(3600),
            graceful_kill: Duration::from_secs(600),
            force_kill: Duration::from_secs(10),
            log_release: Duration::from_secs(3600),
            retry_delay: Duration::from_secs(3),
        }
    }
}

/// How a hook ended, classified as the runner classifies it (§5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Exit 0.
    Success,
    /// `BUILD_FAILURE_EXIT_CODE`: a job failure with this exit code (from
    /// `BUILD_EXIT_CODE_FILE` when it exists, else the exit status itself).
    Build {
        /// The job's exit code.
        code: i32,
        /// Whether `BUILD_EXIT_CODE_FILE` existed.
        from_file: bool,
    },
    /// `SYSTEM_FAILURE_EXIT_CODE`, an unknown code, a signal, a timeout, or an
    /// unreadable `BUILD_EXIT_CODE_FILE`.
    System(String),
}

impl std::fmt::Display for Exit {
    /// As a report says it: `success`, `build failure, exit code 3`,
    /// `system failure: <why, verbatim>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Success => f.write_str("success"),
            Exit::Build { code, from_file: true } => {
                write!(f, "build failure, exit code {code} (from BUILD_EXIT_CODE_FILE)")
            }
            Exit::Build { code, from_file: false } => {
                write!(f, "build failure, exit code {code} (no BUILD_EXIT_CODE_FILE written)")
            }
            Exit::System(why) => write!(f, "system failure: {why}"),
        }
    }
}

/// What one hook call did.
#[derive(Debug, Clone)]
pub struct HookResult {
    /// The hook.
    pub hook: Hook,
    /// Its classification.
    pub exit: Exit,
    /// The raw exit status: code, or 128+signal; `None` when abandoned.
    pub status: Option<i32>,
    /// stdout as captured.
    pub stdout: Vec<u8>,
    /// stderr as captured.
    pub stderr: Vec<u8>,
    /// From start to process exit.
    pub elapsed: Duration,
    /// From process exit to both pipes closed; `None` when they were still
    /// open after [`Timeouts::log_release`] (a background process holds the log).
    pub log_released_after: Option<Duration>,
    /// Whether the hook was sent SIGTERM (cancel or timeout).
    pub terminated: bool,
}

impl HookResult {
    /// stdout and stderr as text.
    pub fn output(&self) -> String {
        let mut text = String::from_utf8_lossy(&self.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&self.stderr));
        text
    }

    /// Whether the hook succeeded.
    pub fn ok(&self) -> bool {
        self.exit == Exit::Success
    }
}

/// Config's answer (§3).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DriverConfig {
    /// `driver`.
    #[serde(default)]
    pub driver: Option<DriverName>,
    /// `hostname`.
    #[serde(default)]
    pub hostname: Option<String>,
    /// `builds_dir`.
    #[serde(default)]
    pub builds_dir: Option<String>,
    /// `cache_dir`.
    #[serde(default)]
    pub cache_dir: Option<String>,
    /// `builds_dir_is_shared`.
    #[serde(default)]
    pub builds_dir_is_shared: Option<bool>,
    /// `job_env`.
    #[serde(default)]
    pub job_env: BTreeMap<String, String>,
    /// `shell`.
    #[serde(default)]
    pub shell: Option<String>,
}

/// `driver` of config's answer.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DriverName {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Version.
    #[serde(default)]
    pub version: String,
}

/// Parses config's stdout: empty, or one JSON object (§3).
pub fn parse_config(stdout: &[u8]) -> Result<DriverConfig, String> {
    let text = String::from_utf8_lossy(stdout);
    if text.trim().is_empty() {
        return Ok(DriverConfig::default());
    }
    let config: DriverConfig =
        serde_json::from_str(text.trim()).map_err(|e| format!("config_exec output is not valid JSON: {e}"))?;
    if config.builds_dir.as_deref() == Some("") || config.cache_dir.as_deref() == Some("") {
        return Err("config_exec returned an empty builds_dir or cache_dir".into());
    }
    Ok(config)
}

/// How one hook is started when it is not `program args... HOOK`: what
/// gitlab-runner's `*_exec` and `*_args` say, for drivers whose hooks are
/// separate programs or take the hook name elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookExec {
    /// `program args... [hook args]`: no hook name is added (gitlab-runner
    /// adds none); run's script path and stage name follow `args`.
    Command {
        /// `*_exec`.
        program: PathBuf,
        /// `*_args`.
        args: Vec<OsString>,
    },
    /// Not configured (`config_exec`, `prepare_exec` or `cleanup_exec`
    /// unset): the runner skips the hook, as if it succeeded with no output.
    Skipped,
}

/// The command that runs the driver's hooks: `program args... HOOK [hook args]`,
/// unless [`Driver::per_hook`] says otherwise for a hook.
#[derive(Debug, Clone)]
pub struct Driver {
    /// The executable (`berth`).
    pub program: PathBuf,
    /// Arguments placed before the hook name (`*_args`: `--config ... --runner ...`).
    pub args: Vec<OsString>,
    /// Hooks started otherwise than `program args... HOOK` (the last entry
    /// for a hook wins; see [`Driver::with_hook`]).
    pub per_hook: Vec<(Hook, HookExec)>,
    /// Extra environment for every hook (the runner's own environment).
    pub env: Vec<(OsString, OsString)>,
    /// The runner's timeouts.
    pub timeouts: Timeouts,
    /// `BUILD_FAILURE_EXIT_CODE` and `SYSTEM_FAILURE_EXIT_CODE` to pass.
    pub exit_codes: (i32, i32),
}

/// The runner's per-attempt state of one job: its temp dir with
/// `response.json`, and the environment every hook gets.
#[derive(Debug)]
pub struct JobRun {
    tmp: tempfile::TempDir,
    response: JobResponse,
    /// config's answer (after [`Driver::config`]).
    pub config: DriverConfig,
    /// `CUSTOM_ENV_*` variables, by name without the prefix: the last value
    /// of each name, expanded as gitlab-runner expands them.
    pub variables: BTreeMap<String, String>,
    /// The payload's variables, then those the runner set, as given: what
    /// [`JobRun::variables`] is expanded from.
    given: Vec<ResponseVariable>,
    script_seq: u32,
}

impl JobRun {
    /// A fresh temp dir (`custom-executor*`) holding the payload, mode 0600.
    pub fn new(response: &JobResponse) -> io::Result<JobRun> {
        let tmp = tempfile::Builder::new().prefix("custom-executor").tempdir()?;
        let path = tmp.path().join("response.json");
        let mut file = std::fs::OpenOptions::new().create_new(true).write(true).mode(0o600).open(&path)?;
        serde_json::to_writer(&mut file, response)?;
        let mut given = response.variables.clone();
        given.push(ResponseVariable::new("CI_JOB_SERVICES", ""));
        for key in ["CI_BUILDS_DIR", "CI_PROJECT_DIR"] {
            if !given.iter().any(|v| v.key == key) {
                given.push(ResponseVariable::new(key, ""));
            }
        }
        let mut job = JobRun {
            tmp,
            response: response.clone(),
            config: DriverConfig::default(),
            variables: BTreeMap::new(),
            given,
            script_seq: 0,
        };
        job.expand();
        Ok(job)
    }

    /// Recomputes [`JobRun::variables`] from what was given.
    fn expand(&mut self) {
        self.variables = crate::variables::expand_all(&self.given).into_iter().map(|v| (v.key, v.value)).collect();
    }

    /// The temp dir.
    pub fn tmpdir(&self) -> &Path {
        self.tmp.path()
    }

    /// `BUILD_EXIT_CODE_FILE`.
    pub fn build_exit_code_file(&self) -> PathBuf {
        self.tmp.path().join("build_exit_code")
    }

    /// The payload.
    pub fn response(&self) -> &JobResponse {
        &self.response
    }

    /// Sets a job variable (what the runner would pass as `CUSTOM_ENV_KEY`).
    /// Like gitlab-runner's own variables, it comes after the payload's, so
    /// it wins over them, and its value is expanded.
    pub fn set_variable(&mut self, key: &str, value: &str) {
        self.given.retain(|v| v.key != key);
        self.given.push(ResponseVariable::new(key, value));
        self.expand();
    }

    /// The project directory the job sees, from config's answer (§3).
    pub fn project_dir(&self) -> String {
        let builds = self.config.builds_dir.clone().unwrap_or_else(|| "/builds".into());
        let path = if self.response.job_info.project_full_path.is_empty() {
            "project".to_owned()
        } else {
            self.response.job_info.project_full_path.clone()
        };
        if self.config.builds_dir_is_shared == Some(true) {
            let token = self.variables.get("CI_RUNNER_SHORT_TOKEN").cloned().unwrap_or_default();
            let concurrent = self.variables.get("CI_CONCURRENT_PROJECT_ID").cloned().unwrap_or_else(|| "0".into());
            format!("{builds}/{token}/{concurrent}/{path}")
        } else {
            format!("{builds}/{path}")
        }
    }

    /// Writes a stage script (mode 0700) for `body`, as the runner does before
    /// every run call, and returns its path.
    pub fn write_script(&mut self, stage: &str, body: &str) -> io::Result<PathBuf> {
        self.script_seq += 1;
        let path = self.tmp.path().join(format!("script{}-{stage}", self.script_seq));
        let mut file = std::fs::OpenOptions::new().create_new(true).write(true).mode(0o700).open(&path)?;
        io::Write::write_all(&mut file, script::render(body).as_bytes())?;
        Ok(path)
    }
}

impl Driver {
    /// A driver run as `program args...`.
    pub fn new(program: impl Into<PathBuf>, args: Vec<OsString>) -> Self {
        Driver {
            program: program.into(),
            args,
            per_hook: Vec::new(),
            env: Vec::new(),
            timeouts: Timeouts::default(),
            exit_codes: (BUILD_FAILURE, SYSTEM_FAILURE),
        }
    }

    /// With `hook` started as `exec` says instead of `program args... HOOK`.
    pub fn with_hook(mut self, hook: Hook, exec: HookExec) -> Self {
        self.per_hook.push((hook, exec));
        self
    }

    /// The program and the arguments before the hook's own ones for `hook`;
    /// `None` when the hook is skipped.
    pub fn command_for(&self, hook: Hook) -> Option<(&Path, Vec<OsString>)> {
        match self.per_hook.iter().rev().find(|(h, _)| *h == hook).map(|(_, exec)| exec) {
            None => {
                let mut args = self.args.clone();
                args.push(hook.name().into());
                Some((&self.program, args))
            }
            Some(HookExec::Command { program, args }) => Some((program, args.clone())),
            Some(HookExec::Skipped) => None,
        }
    }

    fn env_for(&self, job: &JobRun) -> Vec<(OsString, OsString)> {
        let tmp = job.tmpdir();
        let mut env: Vec<(OsString, OsString)> = self.env.clone();
        env.push(("TMPDIR".into(), tmp.into()));
        env.push(("BUILD_FAILURE_EXIT_CODE".into(), self.exit_codes.0.to_string().into()));
        env.push(("SYSTEM_FAILURE_EXIT_CODE".into(), self.exit_codes.1.to_string().into()));
        env.push(("BUILD_EXIT_CODE_FILE".into(), job.build_exit_code_file().into()));
        env.push(("JOB_RESPONSE_FILE".into(), tmp.join("response.json").into()));
        for (key, value) in &job.config.job_env {
            env.push((key.into(), value.into()));
        }
        for (key, value) in &job.variables {
            env.push((format!("CUSTOM_ENV_{key}").into(), value.into()));
        }
        env
    }

    /// Calls one hook and waits for it as the runner does. `cancel` (if any)
    /// sends SIGTERM to the hook's process group, like a job cancel; so does
    /// `timeout`. The hook's output goes to `log` as it arrives.
    pub fn call(
        &self,
        job: &JobRun,
        hook: Hook,
        hook_args: &[OsString],
        timeout: Option<Duration>,
        cancel: Option<&Cancel>,
        log: &Arc<dyn Log>,
    ) -> HookResult {
        let started = Instant::now();
        let exit_file = job.build_exit_code_file();
        let _ = std::fs::remove_file(&exit_file);
        let Some((program, args)) = self.command_for(hook) else {
            return HookResult {
                hook,
                exit: Exit::Success,
                status: Some(0),
                stdout: Vec::new(),
                stderr: Vec::new(),
                elapsed: Duration::ZERO,
                log_released_after: Some(Duration::ZERO),
                terminated: false,
            };
        };
        let mut cmd = Command::new(program);
        cmd.args(&args)
            .args(hook_args)
            .envs(self.env_for(job))
            .current_dir(job.tmpdir())
            .stdin(Stdio::null())
            .process_group(0);
        // prepare and run write the job log: gitlab-runner gives them one
        // writer for both streams, so Go's os/exec hands the hook one pipe as
        // stdout and stderr, and the log keeps the order they were written in.
        // config's stdout is its answer and cleanup's streams go to two loggers.
        let shared = match hook {
            Hook::Prepare | Hook::Run => match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
                Ok((read, write)) => match write.try_clone() {
                    Ok(write2) => {
                        cmd.stdout(Stdio::from(write)).stderr(Stdio::from(write2));
                        Some(std::fs::File::from(read))
                    }
                    Err(_) => None,
                },
                Err(_) => None,
            },
            Hook::Config | Hook::Cleanup => None,
        };
        if shared.is_none() {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                return HookResult {
                    hook,
                    exit: Exit::System(format!("failed to start {}: {e}", program.display())),
                    status: None,
                    stdout: Vec::new(),
                    stderr: Vec::new(),
                    elapsed: started.elapsed(),
                    log_released_after: Some(Duration::ZERO),
                    terminated: false,
                }
            }
        };
        let group = Pid::from_raw(child.id() as i32);
        // This process's copies of the pipe's write end went with `cmd`.
        drop(cmd);
        let readers = start_readers(&mut child, shared, hook, log);
        let mut terminated = false;
        let deadline = timeout.map(|t| started + t);
        let status = match wait_child(&mut child, cancel, deadline) {
            Waited::Exited => child.wait().ok(),
            Waited::Interrupted => {
                terminated = true;
                let _ = killpg(group, Signal::SIGTERM);
                match wait_child(&mut child, None, Some(Instant::now() + self.timeouts.graceful_kill)) {
                    Waited::Exited => child.wait().ok(),
                    Waited::Interrupted => {
                        let _ = killpg(group, Signal::SIGKILL);
                        match wait_child(&mut child, None, Some(Instant::now() + self.timeouts.force_kill)) {
                            Waited::Exited => child.wait().ok(),
                            Waited::Interrupted => None,
                        }
                    }
                }
            }
        };
        let elapsed = started.elapsed();
        let (stdout, stderr, released) = readers.finish(self.timeouts.log_release);
        let log_released_after = released.map(|at| at.saturating_duration_since(started + elapsed));
        let code = status.map(|s| s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)));
        let exit = match (status.and_then(|s| s.code()), status) {
            (_, None) => Exit::System(format!("{} did not exit after SIGKILL; abandoned", hook.name())),
            (Some(0), _) => Exit::Success,
            (Some(c), _) if c == self.exit_codes.0 => match std::fs::read_to_string(&exit_file) {
                Ok(text) => match text.lines().next().unwrap_or("").trim().parse::<i32>() {
                    Ok(code) => Exit::Build { code, from_file: true },
                    Err(_) => Exit::System(format!("invalid build exit code in {}: {text:?}", exit_file.display())),
                },
                Err(_) => Exit::Build { code: c, from_file: false },
            },
            (Some(c), _) if c == self.exit_codes.1 => {
                Exit::System(format!("{} exited with the system failure code {c}", hook.name()))
            }
            (Some(c), _) => {
                Exit::System(format!("unknown Custom executor executable exit code {c}; executable {}", hook.name()))
            }
            (None, Some(s)) => {
                Exit::System(format!("{} was killed by signal {}", hook.name(), s.signal().unwrap_or(0)))
            }
        };
        HookResult { hook, exit, status: code, stdout, stderr, elapsed, log_released_after, terminated }
    }

    /// Calls config and records its answer in `job` (builds/cache dirs, job_env,
    /// and the CI_BUILDS_DIR/CI_PROJECT_DIR variables computed from them).
    pub fn config(&self, job: &mut JobRun, log: &Arc<dyn Log>) -> (HookResult, Result<DriverConfig, String>) {
        let result = self.call(job, Hook::Config, &[], Some(self.timeouts.config), None, log);
        let parsed = if result.ok() {
            parse_config(&result.stdout)
        } else {
            Err(format!("config_exec failed: {:?}", result.exit))
        };
        if let Ok(config) = &parsed {
            job.config = config.clone();
            let builds = config.builds_dir.clone().unwrap_or_else(|| "/builds".into());
            job.set_variable("CI_BUILDS_DIR", &builds);
            let project = job.project_dir();
            job.set_variable("CI_PROJECT_DIR", &project);
        }
        (result, parsed)
    }

    /// Calls run for one stage with a script made from `body`.
    pub fn run_stage(
        &self,
        job: &mut JobRun,
        stage: &str,
        body: &str,
        cancel: Option<&Cancel>,
        log: &Arc<dyn Log>,
    ) -> HookResult {
        match job.write_script(stage, body) {
            Ok(path) => self.call(job, Hook::Run, &[path.into(), stage.into()], None, cancel, log),
            Err(e) => HookResult {
                hook: Hook::Run,
                exit: Exit::System(format!("failed to write the {stage} script: {e}")),
                status: None,
                stdout: Vec::new(),
                stderr: Vec::new(),
                elapsed: Duration::ZERO,
                log_released_after: Some(Duration::ZERO),
                terminated: false,
            },
        }
    }
}

enum Waited {
    Exited,
    Interrupted,
}

/// Waits without reaping until the child exits, `cancel` fires or `deadline` passes.
fn wait_child(child: &mut Child, cancel: Option<&Cancel>, deadline: Option<Instant>) -> Waited {
    match berth_backend_api::process::wait_exit(child, cancel, deadline) {
        Ok(true) => Waited::Exited,
        Ok(false) => Waited::Interrupted,
        // The wait itself failed (not the hook): poll instead of stopping a hook that may be fine.
        Err(_) => loop {
            if let Ok(Some(_)) = child.try_wait() {
                return Waited::Exited;
            }
            if cancel.is_some_and(Cancel::is_cancelled) || deadline.is_some_and(|d| Instant::now() >= d) {
                return Waited::Interrupted;
            }
            thread::sleep(Duration::from_millis(5));
        },
    }
}

struct Readers {
    threads: Vec<thread::JoinHandle<(Vec<u8>, Instant)>>,
    done: std::sync::mpsc::Receiver<()>,
}

/// Reads the hook's output: its one `shared` pipe (prepare, run), as stdout,
/// else its stdout and stderr pipes.
fn start_readers(child: &mut Child, shared: Option<std::fs::File>, hook: Hook, log: &Arc<dyn Log>) -> Readers {
    let (tx, done) = std::sync::mpsc::channel();
    let pipes: Vec<(Stream, Box<dyn Read + Send>)> = match shared {
        Some(pipe) => vec![(Stream::Stdout, Box::new(pipe))],
        None => vec![
            (Stream::Stdout, Box::new(child.stdout.take().expect("piped stdout"))),
            (Stream::Stderr, Box::new(child.stderr.take().expect("piped stderr"))),
        ],
    };
    let threads = pipes
        .into_iter()
        .map(|(stream, mut pipe)| {
            let tx = tx.clone();
            let log = Arc::clone(log);
            thread::spawn(move || {
                let mut captured = Vec::new();
                let mut buf = [0u8; 8192];
                loop {
                    match pipe.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            captured.extend_from_slice(&buf[..n]);
                            log.hook(hook, stream, &buf[..n]);
                        }
                    }
                }
                let _ = tx.send(());
                (captured, Instant::now())
            })
        })
        .collect();
    Readers { threads, done }
}

impl Readers {
    /// Waits up to `limit` for both pipes to close. Returns what was captured
    /// and when the last pipe closed; `None` if one is still open (its thread
    /// is left to finish on its own, as the output is no longer awaited).
    fn finish(self, limit: Duration) -> (Vec<u8>, Vec<u8>, Option<Instant>) {
        let deadline = Instant::now() + limit;
        for _ in 0..self.threads.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.done.recv_timeout(left).is_err() {
                return (Vec::new(), Vec::new(), None);
            }
        }
        let mut results = self.threads.into_iter().map(|t| t.join().unwrap_or_else(|_| (Vec::new(), Instant::now())));
        let (stdout, t1) = results.next().expect("stdout reader");
        let (stderr, t2) = results.next().unwrap_or((Vec::new(), t1));
        (stdout, stderr, Some(t1.max(t2)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_are_program_args_hook_unless_overridden() {
        let driver = Driver::new("/usr/bin/berth", vec!["--runner".into(), "x".into()]).with_hook(
            Hook::Run,
            HookExec::Command { program: "/opt/run".into(), args: vec!["a".into(), "run".into()] },
        );
        let driver = driver.with_hook(Hook::Config, HookExec::Skipped);
        let (program, args) = driver.command_for(Hook::Prepare).unwrap();
        assert_eq!(
            (program, args),
            (Path::new("/usr/bin/berth"), vec!["--runner".into(), "x".into(), "prepare".into()])
        );
        let (program, args) = driver.command_for(Hook::Run).unwrap();
        assert_eq!((program, args), (Path::new("/opt/run"), vec![OsString::from("a"), "run".into()]));
        assert!(driver.command_for(Hook::Config).is_none());
        // A skipped hook succeeds with no output, as gitlab-runner skips an unset `*_exec`.
        let mut job = JobRun::new(&JobResponse::new(7)).unwrap();
        let (result, config) = driver.config(&mut job, &(Arc::new(Quiet) as Arc<dyn Log>));
        assert_eq!(result.exit, Exit::Success);
        assert!(config.unwrap().driver.is_none());
    }

    /// prepare's and run's one pipe reaches the hook as stdout and stderr
    /// only: a daemon it starts with its own output elsewhere holds no copy
    /// of it, so the job log is released when the hook exits.
    #[test]
    fn a_hooks_log_pipe_is_not_inherited_beyond_its_stdout_and_stderr() {
        let daemon = "exec 1>/dev/null 2>&1 </dev/null; sleep 30 & echo $! > \"$0\"";
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("daemon.pid");
        let mut driver = Driver::new("/bin/true", Vec::new()).with_hook(
            Hook::Prepare,
            HookExec::Command {
                program: "/bin/sh".into(),
                args: vec!["-c".into(), daemon.into(), pid_file.clone().into()],
            },
        );
        driver.timeouts.log_release = Duration::from_secs(2);
        let job = JobRun::new(&JobResponse::new(8)).unwrap();
        let result = driver.call(&job, Hook::Prepare, &[], None, None, &(Arc::new(Quiet) as Arc<dyn Log>));
        if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        assert_eq!(result.exit, Exit::Success);
        assert!(result.log_released_after.is_some(), "the daemon holds the job log: the pipe leaked into it");
    }
}
