//! `berth exec`: one job of a .gitlab-ci.yml, run locally through the full
//! custom-executor protocol, the way gitlab-runner would run it.

mod sources;

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use berth_backend_api::{Cancel, JobImage, JobInfo, JobResponse, Redactor, ResponseVariable, Step};
use berth_runner_imitation::job::{Interrupts, JobSpec};
use berth_runner_imitation::runner::{Driver, Hook, Log, Stream};
use berth_runner_imitation::variables::expand_image;

use crate::cli::{Cli, ExecArgs};
use crate::config;
use crate::exit::Done;

/// `berth exec`: how the job ended, or why it could not run.
pub fn main(cli: &Cli, args: &ExecArgs) -> Result<Done, crate::Error> {
    if let (Some(backend), Some(runner)) = (&args.backend, &cli.runner) {
        return Err(anyhow::anyhow!(
            "--backend {backend} makes a runner of its own, and --runner (or BERTH_RUNNER) names {runner}: give one of them"
        )
        .into());
    }
    Ok(exec(cli, args)?)
}

/// The job log on this terminal.
struct Terminal {
    verbose: bool,
    color: bool,
    /// The masked variables' values, hidden in the job's own output as
    /// GitLab hides them in the job log; `None` when there are none.
    redactor: Option<Redactor>,
    /// With a redactor: the part of each stream's output after its last
    /// newline, held until the line is whole (a secret may span reads).
    pending: Mutex<[Vec<u8>; 2]>,
}

/// A line held this long without a newline is shown anyway (redacted).
const MAX_PENDING: usize = 64 * 1024;

impl Terminal {
    fn write(stream: Stream, bytes: &[u8]) {
        let _ = match stream {
            Stream::Stdout => std::io::stdout().lock().write_all(bytes).and_then(|()| std::io::stdout().flush()),
            Stream::Stderr => std::io::stderr().lock().write_all(bytes),
        };
    }

    /// Shows what each stream holds back (before a runner line, and at the end).
    fn flush(&self) {
        let Some(redactor) = &self.redactor else { return };
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for (stream, held) in [Stream::Stdout, Stream::Stderr].into_iter().zip(pending.iter_mut()) {
            if !held.is_empty() {
                Self::write(stream, redactor.redact(&String::from_utf8_lossy(held)).as_bytes());
                held.clear();
            }
        }
    }
}

impl Log for Terminal {
    fn runner(&self, line: &str) {
        self.flush();
        let mut out = std::io::stdout().lock();
        let _ = if self.color {
            let color = if line.starts_with("ERROR") {
                "31;1"
            } else if line.starts_with("WARNING") {
                "33;1"
            } else if line.starts_with("Job succeeded") {
                "32;1"
            } else {
                "36;1"
            };
            writeln!(out, "\x1b[{color}m{line}\x1b[0;m")
        } else {
            writeln!(out, "{line}")
        };
        let _ = out.flush();
    }

    fn hook(&self, hook: Hook, stream: Stream, bytes: &[u8]) {
        let show = match hook {
            // config's stdout is its JSON answer, not log.
            Hook::Config => stream == Stream::Stderr,
            Hook::Prepare | Hook::Run => true,
            Hook::Cleanup => self.verbose,
        };
        if !show {
            return;
        }
        let Some(redactor) = &self.redactor else { return Self::write(stream, bytes) };
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let held = &mut pending[usize::from(stream == Stream::Stderr)];
        held.extend_from_slice(bytes);
        let whole = match held.iter().rposition(|b| *b == b'\n') {
            Some(end) => end + 1,
            None if held.len() > MAX_PENDING => held.len(),
            None => return,
        };
        let lines: Vec<u8> = held.drain(..whole).collect();
        Self::write(stream, redactor.redact(&String::from_utf8_lossy(&lines)).as_bytes());
    }
}

static INTERRUPTS: AtomicUsize = AtomicUsize::new(0);
static CANCEL_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);
static ABORT_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Ctrl-C (or SIGTERM) once cancels the job, twice aborts it.
fn interrupts() -> Result<Interrupts> {
    use std::os::fd::IntoRawFd;
    let flags = nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK;
    let (cancel, cancel_write) = nix::unistd::pipe2(flags).context("failed to create a pipe")?;
    let (abort, abort_write) = nix::unistd::pipe2(flags).context("failed to create a pipe")?;
    // The write ends live as long as the process: the handler may fire any time.
    CANCEL_FD.store(cancel_write.into_raw_fd(), Ordering::SeqCst);
    ABORT_FD.store(abort_write.into_raw_fd(), Ordering::SeqCst);
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // SAFETY: the handler only does async-signal-safe work: an atomic
        // increment, atomic loads and write(2) of one byte.
        unsafe {
            signal_hook::low_level::register(signal, || {
                let n = INTERRUPTS.fetch_add(1, Ordering::SeqCst);
                let fd = if n == 0 { CANCEL_FD.load(Ordering::SeqCst) } else { ABORT_FD.load(Ordering::SeqCst) };
                libc::write(fd, b"x".as_ptr().cast(), 1);
            })
        }
        .context("failed to handle Ctrl-C")?;
    }
    Ok(Interrupts { cancel: Cancel::from_fd(cancel), abort: Cancel::from_fd(abort) })
}

fn split_var(text: &str) -> Result<(String, String)> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => bail!("--var/--masked-var takes KEY=VALUE, got {text:?}"),
    }
}

fn local_state_dir() -> PathBuf {
    if nix::unistd::Uid::effective().is_root() {
        return PathBuf::from(config::DEFAULT_STATE_DIR);
    }
    match std::env::var_os("XDG_STATE_HOME")
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state").into()))
    {
        Some(dir) => Path::new(&dir).join("berth"),
        None => std::env::temp_dir().join("berth-state"),
    }
}

/// Where `include: local:` files are read from: the project's root (--sources,
/// else the git work tree around the pipeline file, else its directory).
fn project_dir(args: &ExecArgs) -> PathBuf {
    args.sources.clone().or_else(|| sources::work_tree(&args.file).ok()).unwrap_or_else(|| {
        args.file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_owned()
    })
}

/// Where the pipeline's included files are read from.
fn files<'a>(args: &'a ExecArgs, project: &'a Path) -> gitlab_ci::Files<'a> {
    gitlab_ci::Files { project: Some(project), include_dir: args.include_dir.as_deref() }
}

/// `berth exec --list`: the jobs on stdout, one a line; where they come
/// from and what was not read on stderr.
fn list(args: &ExecArgs) -> Result<Done> {
    let project = project_dir(args);
    let list = gitlab_ci::list_in(&args.file, files(args, &project))?;
    for warning in &list.warnings {
        eprintln!("WARNING: {warning}");
    }
    // A job that does not resolve (its template is in an unread include, a
    // keyword has the wrong shape) is no runnable job: named on stderr, with why.
    let mut runnable = 0;
    for name in &list.jobs {
        match gitlab_ci::load_in(&args.file, files(args, &project), name) {
            Ok(_) => {
                println!("{name}");
                runnable += 1;
            }
            Err(e) => eprintln!("note: job {name:?} cannot run here: {e}"),
        }
    }
    for (name, file) in &list.included {
        eprintln!("note: job {name:?} comes from `include: {file}`");
    }
    if !list.unread_includes.is_empty() {
        eprintln!(
            "note: these includes are not read, so their jobs are not listed and templates from them are unknown: {}",
            list.unread_includes.join(", ")
        );
    }
    if runnable == 0 {
        bail!("{} defines no runnable jobs", args.file.display());
    }
    Ok(Done::Success)
}

fn exec(cli: &Cli, args: &ExecArgs) -> Result<Done> {
    if args.list {
        return list(args);
    }
    let project = project_dir(args);
    let job = gitlab_ci::load_in(&args.file, files(args, &project), args.job.as_deref().unwrap_or_default())?;
    // The runner: a configured one, or an ad-hoc one for --backend.
    let adhoc = tempfile::Builder::new().prefix("berth-exec").tempdir().context("failed to create a temp dir")?;
    let (config_path, runner) = match &args.backend {
        Some(backend) => {
            let mut table = toml::Table::new();
            table.insert("backend".into(), toml::Value::String(backend.clone()));
            let path = config::write_adhoc(adhoc.path(), &local_state_dir(), "local", table)?;
            let runner = config::load(&path, None)?;
            (path, runner)
        }
        None => {
            let runner = config::load(&cli.config, cli.runner.as_deref())?;
            (std::fs::canonicalize(&cli.config).unwrap_or_else(|_| cli.config.clone()), runner)
        }
    };
    crate::registry::load(&runner)?;

    // Said in the log when the project is a work tree the pipeline file is not at the root of.
    let mut sources_note = None;
    let sources = if args.no_sources {
        None
    } else {
        let dir = match &args.sources {
            Some(dir) => dir.clone(),
            None => {
                let root = sources::work_tree(&args.file)?;
                sources_note = sources::nested_note(&root, &args.file);
                root
            }
        };
        Some((sources::archive(&dir)?, dir))
    };
    let project = sources
        .as_ref()
        .and_then(|(_, dir)| std::fs::canonicalize(dir).ok())
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .map(|name| sanitize(&name))
        .unwrap_or_else(|| "project".into());

    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let id = 8_000_000_000_000 + (now.as_millis() as u64 % 1_000_000_000) * 1000 + u64::from(std::process::id() % 1000);
    let timeout = args.timeout.map(|t| t.as_secs()).or(job.timeout_secs).unwrap_or(3600);
    let mut response = JobResponse::new(id);
    response.token = format!("berth-exec-token-{id:x}{:x}", now.subsec_nanos());
    response.job_info = JobInfo::new(job.name.clone(), job.stage.clone(), format!("local/{project}"));
    response.runner_info.timeout = Some(timeout);
    let mut vars = vec![
        ("CI_JOB_ID", id.to_string()),
        ("CI_JOB_NAME", job.name.clone()),
        ("CI_JOB_STAGE", job.stage.clone()),
        ("CI_PROJECT_PATH", format!("local/{project}")),
        ("CI_PROJECT_NAME", project.clone()),
        ("CI_PROJECT_ID", "0".into()),
        ("CI_RUNNER_SHORT_TOKEN", "local".into()),
        ("CI_CONCURRENT_ID", "0".into()),
        ("CI_CONCURRENT_PROJECT_ID", "0".into()),
        ("CI_SERVER", "yes".into()),
        ("CI", "true".into()),
        ("GITLAB_CI", "true".into()),
        ("CI_JOB_TIMEOUT", timeout.to_string()),
        ("CI_SHARED_ENVIRONMENT", "true".into()),
        ("CI_RUNNER_VERSION", format!("berth-exec {}", env!("CARGO_PKG_VERSION"))),
        // GitLab sets CI_NODE_TOTAL for every job, CI_NODE_INDEX for those `parallel:` makes.
        ("CI_NODE_TOTAL", job.node.map_or(1, |(_, total)| total).to_string()),
    ];
    if let Some((index, _)) = job.node {
        vars.push(("CI_NODE_INDEX", index.to_string()));
    }
    if let Some(image) = &job.image {
        // As GitLab sends it; the runner expands it with the other variables.
        vars.push(("CI_JOB_IMAGE", image.clone()));
    }
    if let Some((_, dir)) = &sources {
        vars.extend(sources::git_variables(dir));
    }
    // Lowest precedence first: the runner takes the last of a name
    // (https://docs.gitlab.com/ci/variables/#cicd-variable-precedence).
    response.variables = vars.into_iter().map(|(k, v)| ResponseVariable::new(k, v)).collect();
    for variable in &job.variables {
        let mut given = ResponseVariable::new(variable.name.clone(), variable.value.clone());
        given.raw = !variable.expand;
        response.variables.push(given);
    }
    let mut given = Vec::new();
    for text in &args.vars {
        let (key, value) = split_var(text)?;
        given.push(ResponseVariable::new(key, value));
    }
    for text in &args.masked_vars {
        let (key, value) = split_var(text)?;
        given.push(ResponseVariable::new(key, value).masked());
    }
    let rules_note = match &job.rules {
        None => None,
        Some(rules) => {
            let known: Vec<&ResponseVariable> = response.variables.iter().chain(&given).collect();
            let lookup = |name: &str| known.iter().rev().find(|v| v.key == name).map(|v| v.value.clone());
            let decision = gitlab_ci::rules::decide(rules, &lookup)
                .map_err(|e| anyhow::anyhow!("{}: job `{}`: invalid `rules`: {e}", args.file.display(), job.name))?;
            let verdict = if decision.created { "would create" } else { "would not create" };
            let note = format!("Rules: GitLab {verdict} this job: {}", decision.reason);
            if !decision.created && !args.ignore_rules {
                bail!(
                    "{}: job `{}`: {note} (with the variables given: set them with --var NAME=VALUE, \
                     or run it anyway with --ignore-rules)",
                    args.file.display(),
                    job.name
                );
            }
            // The deciding rule's variables replace the job's (pipeline variables still win).
            if let Some(rule) = decision.rule.filter(|_| decision.created).and_then(|at| rules.get(at - 1)) {
                for variable in &rule.variables {
                    let mut set = ResponseVariable::new(variable.name.clone(), variable.value.clone());
                    set.raw = !variable.expand;
                    response.variables.push(set);
                }
            }
            Some(note)
        }
    };
    response.variables.extend(given);
    // Said in the log when the image names variables that are not defined.
    let mut image_note = None;
    if let Some(image) = &job.image {
        let expanded = expand_image(image, &response.variables);
        if expanded.trim().is_empty() {
            image_note = Some(format!(
                "WARNING: the job's image `{image}` expands to nothing, so the runner's default image is used; \
                 define the variables it names (in the file or with --var NAME=VALUE)"
            ));
        } else {
            response.image = Some(JobImage::new(expanded));
        }
    }
    let mut script = job.before_script.clone();
    script.extend(job.script.iter().cloned());
    response.steps = vec![Step::new("script", script, "on_success")];
    if !job.after_script.is_empty() {
        response.steps.push(Step::new("after_script", job.after_script.clone(), "always"));
    }
    let spec = JobSpec {
        response,
        sources: sources.map(|(archive, _)| archive),
        allow_failure_codes: job.allow_failure_exit_codes.clone(),
        allow_failure: job.allow_failure,
        timeout: Duration::from_secs(timeout),
    };

    let exe = std::env::current_exe().context("failed to find this executable's path")?;
    let hook_args: Vec<OsString> =
        vec!["--config".into(), config_path.into(), "--runner".into(), runner.name.clone().into()];
    let mut driver = Driver::new(exe, hook_args);
    driver.timeouts.retry_delay = Duration::from_millis(args.retry_delay_ms);
    let color = std::env::var_os("NO_COLOR").is_none() && nix::unistd::isatty(std::io::stdout()).unwrap_or(false);
    let secrets: Vec<String> = spec.response.variables.iter().filter(|v| v.masked).map(|v| v.value.clone()).collect();
    let redactor = (!secrets.is_empty()).then(|| Redactor::new(secrets));
    let terminal = Arc::new(Terminal { verbose: args.verbose, color, redactor, pending: Mutex::default() });
    let log: Arc<dyn Log> = terminal.clone();
    log.runner(&format!(
        "Running with berth exec {} (job {:?} of {}, runner {:?})",
        env!("CARGO_PKG_VERSION"),
        job.name,
        args.file.display(),
        runner.name
    ));
    for warning in &job.warnings {
        log.runner(&format!("WARNING: {warning}"));
    }
    for note in [&rules_note, &sources_note, &image_note].into_iter().flatten() {
        log.runner(note);
    }
    let interrupts = interrupts()?;
    let report = driver.run_job(&spec, &interrupts, &log);
    terminal.flush();
    if !args.verbose {
        if let Some((_, cleanup)) = report.calls.iter().rev().find(|(_, r)| r.hook == Hook::Cleanup) {
            if !cleanup.ok() {
                log.runner(&format!("WARNING: cleanup failed: {:?}", cleanup.exit));
                eprint!("{}", cleanup.output());
            }
        }
    }
    log.runner(&report.outcome.verdict());
    Ok(Done::Job(report.outcome))
}

/// A project name usable in a path: keeps `a-z0-9._-`, maps the rest to `-`.
fn sanitize(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c.to_ascii_lowercase() } else { '-' })
        .collect();
    let clean = clean.trim_start_matches('.').to_owned();
    if clean.is_empty() {
        "project".into()
    } else {
        clean
    }
}
