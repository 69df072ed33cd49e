//! Dispatch of the subcommands.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use berth_backend_api::{Capabilities, Description, Failure, Isolation, JobContext};
use berth_runner_imitation::runner::{Hook, HookExec};
use clap::Parser;

use crate::cli::{Cli, Command, ConformanceArgs, DescribeArgs, GitlabConfigArgs, ReapArgs};
use crate::config::{self, Runner};
use crate::error::Error;
use crate::exit::{self, Codes, Done, Invocation};
use crate::{exec, hooks, registry};

/// Parses the command line, runs the command, and exits as
/// [`exit::process_exit_code`] decides.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Config | Command::Prepare | Command::Run(_) | Command::Cleanup => hook(&cli),
        command => {
            // A command's output piped into `head` ends it quietly, as for any Unix tool.
            // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            if !matches!(command, Command::Exec(_)) {
                init_tracing(if matches!(command, Command::Reap(_)) { "info" } else { "" });
            }
            let result = match command {
                Command::Exec(args) => exec::main(&cli, args),
                _ => tool(&cli),
            };
            if let Err(e) = &result {
                eprintln!("error: {}", e.report());
            }
            exit::process_exit_code(Invocation::Command, &result)
        }
    }
}

/// Installs the diagnostics subscriber when `BERTH_LOG` is set, or with
/// `default` (an env-filter directive; empty: none, keeping hook start-up
/// cheap). When stderr is the journal (a systemd service such as
/// `berth-reap.service`), lines go to journald natively, with the fields of
/// their spans and events (`BERTH_JOB`, `BERTH_RUNNER`, ...); else to stderr
/// as text, coloured only on a terminal.
pub fn init_tracing(default: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = match std::env::var("BERTH_LOG") {
        Ok(filter) => filter,
        Err(_) if default.is_empty() => return,
        Err(_) => default.to_owned(),
    };
    let filter = tracing_subscriber::EnvFilter::new(filter);
    if stderr_is_journal() {
        if let Ok(journal) = tracing_journald::layer() {
            let journal = journal.with_field_prefix(Some("BERTH".into())).with_syslog_identifier("berth".into());
            let _ = tracing_subscriber::registry().with(filter).with(journal).try_init();
            return;
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // The runner's log (journald) is no terminal: colour codes would be noise there.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Whether stderr is connected to the journal: `JOURNAL_STREAM` (set by
/// systemd for a service's output) names its device and inode
/// (systemd.exec(5)). A hook of gitlab-runner inherits the variable with a
/// pipe as stderr, and writes text there for the runner's log.
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    nix::sys::stat::fstat(std::io::stderr()).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

fn hook(cli: &Cli) -> ExitCode {
    let codes = Codes::from_env();
    // Cleanup's stderr goes to the runner's log: diagnostics belong there.
    init_tracing(if matches!(cli.command, Command::Cleanup) { "info" } else { "" });
    let mut exit_file = None;
    let result = (|| -> Result<Done, Error> {
        let runner = config::load(&cli.config, cli.runner.as_deref())?;
        let backend = registry::load(&runner)?;
        let job = JobContext::from_env(&runner.name)?;
        // Every diagnostic of the hook carries the job (a field in journald, a prefix in text).
        let _job = tracing::info_span!("job", job = job.key().id(), runner = %runner.name).entered();
        exit_file = job.build_exit_code_file().map(Path::to_owned);
        match &cli.command {
            Command::Config => println!("{}", hooks::config(&runner, backend.as_ref(), &job)?),
            Command::Prepare => hooks::prepare(&runner, backend.as_ref(), &job, &hooks::cancel_on_signals()?)?,
            Command::Run(args) => {
                hooks::run(&runner, backend.as_ref(), &job, &args.script, &args.stage, &hooks::cancel_on_signals()?)?
            }
            Command::Cleanup => hooks::cleanup(&runner, backend.as_ref(), &job)?,
            _ => unreachable!("not a hook"),
        }
        Ok(Done::Success)
    })();
    match &result {
        // The script's own output already explains a script failure.
        Err(Error::Failure(Failure::Script { .. })) | Ok(_) => {}
        Err(Error::Failure(Failure::Cancelled)) => eprintln!("berth: stopped: the job was cancelled"),
        Err(e) => eprintln!("ERROR: berth: {}", e.report()),
    }
    exit::process_exit_code(Invocation::Hook { codes, exit_code_file: exit_file.as_deref() }, &result)
}

fn load(cli: &Cli) -> Result<(Runner, Box<dyn berth_backend_api::Backend>), Error> {
    let runner = config::load(&cli.config, cli.runner.as_deref())?;
    let backend = registry::load(&runner)?;
    Ok((runner, backend))
}

fn tool(cli: &Cli) -> Result<Done, Error> {
    match &cli.command {
        Command::GitlabConfig(args) => Ok(gitlab_config(cli, args)?),
        Command::Describe(args) => Ok(describe(cli, args)?),
        Command::Doctor(args) => Ok(crate::doctor::main(cli, args)?),
        Command::Backends => {
            for builtin in registry::BUILT_IN.iter().filter(|b| !b.test_fixture) {
                println!("{:<10} {}", builtin.name, builtin.summary);
            }
            configured_backends(cli);
            Ok(Done::Success)
        }
        Command::Reap(args) => reap(cli, args),
        Command::Conformance(args) => Ok(conformance(cli, args)?),
        Command::Image(args) => Ok(crate::image::main(cli, args)?),
        Command::Ps(args) => crate::ps::main(cli, args),
        _ => unreachable!("hooks and exec are dispatched in main"),
    }
}

/// `berth reap`: the runner of `--runner`, else every runner of the file
/// (what a host-wide timer runs), each in turn; one that fails does not keep
/// the others from being reaped.
fn reap(cli: &Cli, args: &ReapArgs) -> Result<Done, Error> {
    let runners = config::load_all(&cli.config, cli.runner.as_deref())?;
    let count = runners.len();
    let mut failed = 0;
    for runner in runners {
        let reaped = runner.map_err(Error::from).and_then(|runner| {
            let backend = registry::load(&runner)?;
            hooks::reap(&runner, backend.as_ref(), args.grace, args.dry_run)
        });
        // One runner's failure is the command's when it is the only one.
        match reaped {
            Ok(()) => {}
            Err(e) if count == 1 => return Err(e),
            Err(e) => {
                eprintln!("error: {}", e.report());
                failed += 1;
            }
        }
    }
    match failed {
        0 => Ok(Done::Success),
        n => Err(anyhow::anyhow!("reap failed for {n} of {count} runners (see above); the others were reaped").into()),
    }
}

/// Under `berth backends`: the backend of each runner of the configuration
/// (or of `--runner`), when there is a configuration to read.
fn configured_backends(cli: &Cli) {
    let runners = config::load_all(&cli.config, cli.runner.as_deref()).unwrap_or_default();
    let runners: Vec<Runner> = runners.into_iter().flatten().collect();
    if runners.is_empty() {
        return;
    }
    println!("\nrunners of {}:", cli.config.display());
    for runner in runners {
        match &runner.backend {
            config::BackendChoice::BuiltIn(name) => println!("{:<10} backend {name}", runner.name),
            config::BackendChoice::Plugin(path) => println!("{:<10} plugin {}", runner.name, path.display()),
        }
    }
}

fn describe(cli: &Cli, args: &DescribeArgs) -> Result<Done> {
    let (runner, backend) = load(cli)?;
    let description = backend.describe();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&description)?);
    } else {
        let caps = description.capabilities;
        println!("runner:      {}", runner.name);
        println!("backend:     {} {}", description.name, description.version);
        println!("summary:     {}", description.summary);
        println!("isolation:   {}", serde_json::to_value(description.isolation)?.as_str().unwrap_or("?"));
        println!(
            "supports:    executes scripts: {}, cancel: {}, reap: {}, images: {}, concurrent jobs: {}, contains root: {}",
            caps.executes_scripts, caps.cancel, caps.reap, caps.images, caps.concurrent_jobs, caps.contains_root
        );
        let (errors, warnings) = crate::doctor::tally(crate::doctor::checks(backend.as_ref(), &runner).iter());
        if errors + warnings > 0 {
            let summary = crate::doctor::summary(errors, warnings);
            println!("host:        {summary}: see `berth --runner {} doctor`", runner.name);
        }
    }
    Ok(Done::Success)
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).or_else(|_| std::path::absolute(path)).unwrap_or_else(|_| path.to_owned())
}

fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

fn gitlab_config(cli: &Cli, args: &GitlabConfigArgs) -> Result<Done> {
    // The runner's backend is built as a job's would be: a block for a runner
    // whose settings are wrong would fail every job once pasted.
    let (runner, backend) = load(cli)?;
    // So are a host and settings on which every job would fail at prepare.
    let errors = crate::doctor::errors(&backend.check());
    if !errors.is_empty() && !args.skip_checks {
        bail!(
            "runner {} would fail its jobs on this host:\n  {}\nfix them (`berth --runner {0} doctor` shows every check), or pass --skip-checks to print the block anyway",
            runner.name,
            errors.join("\n  ")
        );
    }
    let berth = match &args.berth {
        // gitlab-runner runs hooks from its own directory: a relative path would not be found.
        Some(path) => absolute(path),
        None => std::env::current_exe().context("failed to find this executable's path; pass --berth")?,
    };
    let berth = toml_string(&berth.display().to_string());
    let config = toml_string(&absolute(&cli.config).display().to_string());
    let name = args.name.clone().unwrap_or_else(|| runner.name.clone());
    let hook_args = |hook: &str| {
        format!("[\"--config\", {config}, \"--runner\", {}, {}]", toml_string(&runner.name), toml_string(hook))
    };
    println!(
        r#"# gitlab-runner config.toml: a runner that runs every job through berth runner {runner_name:?}.
# Fill in url and token (from `gitlab-runner register`), then restart gitlab-runner.
# builds_dir and cache_dir come from `berth config`; set them here only to override.
[[runners]]
  name = {name}
  url = "https://gitlab.example.com"
  token = "REPLACE-WITH-RUNNER-TOKEN"
  executor = "custom"
  [runners.custom]
    config_exec = {berth}
    config_args = {config_args}
    config_exec_timeout = 60
    prepare_exec = {berth}
    prepare_args = {prepare_args}
    prepare_exec_timeout = 600
    run_exec = {berth}
    run_args = {run_args}
    cleanup_exec = {berth}
    cleanup_args = {cleanup_args}
    cleanup_exec_timeout = 300
    graceful_kill_timeout = 30
    force_kill_timeout = 10"#,
        runner_name = runner.name,
        name = toml_string(&name),
        config_args = hook_args("config"),
        prepare_args = hook_args("prepare"),
        run_args = hook_args("run"),
        cleanup_args = hook_args("cleanup"),
    );
    Ok(Done::Success)
}

fn conformance(cli: &Cli, args: &ConformanceArgs) -> Result<Done> {
    use berth_conformance::suite;
    if args.list {
        for check in suite::checks() {
            let (level, id) = (check.level.as_str(), check.id);
            if suite::is_protocol_section(check.protocol) {
                println!("{id:<29} {level:<6} §{:<4} {}", check.protocol, check.statement);
            } else {
                // A rationale rather than a section: `security: why`.
                let (kind, why) = check.protocol.split_once(": ").unwrap_or((check.protocol, ""));
                println!("{id:<29} {level:<6} {kind:<9} {} ({why})", check.statement);
            }
        }
        return Ok(Done::Success);
    }
    let foreign = args.driver.is_some() || args.driver_config.is_some();
    // `_scratch` holds what the hooks read (a made-up configuration file) until the suite is done.
    let (target, _scratch) = if foreign { (foreign_target(args)?, None) } else { berth_target(cli, args)? };
    let filter = suite::Filter { only: args.checks.clone(), skip: args.skips.clone() };
    let report = suite::run(&target, &filter).map_err(anyhow::Error::msg)?;
    if let Some(junit) = &args.junit {
        std::fs::write(junit, report.junit()).with_context(|| format!("failed to write {}", junit.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(if report.passed() { Done::Success } else { Done::Unsuccessful })
}

/// The target for the runner of berth's configuration, or for `--plugin`,
/// with the scratch directory its hooks need while the suite runs.
fn berth_target(
    cli: &Cli,
    args: &ConformanceArgs,
) -> Result<(berth_conformance::suite::Target, Option<tempfile::TempDir>)> {
    // A plugin under development needs no configuration file: make one.
    let scratch =
        tempfile::Builder::new().prefix("berth-conformance").tempdir().context("failed to create a temp dir")?;
    let (config_path, runner_name) = match &args.plugin {
        Some(plugin) => {
            let plugin =
                std::fs::canonicalize(plugin).with_context(|| format!("failed to find {}", plugin.display()))?;
            let settings: toml::Table = match &args.settings {
                Some(file) => {
                    let text =
                        std::fs::read_to_string(file).with_context(|| format!("failed to read {}", file.display()))?;
                    toml::from_str(&text).with_context(|| format!("invalid settings file {}", file.display()))?
                }
                None => toml::Table::new(),
            };
            let mut runner = toml::Table::new();
            runner.insert("plugin".into(), toml::Value::String(plugin.display().to_string()));
            runner.insert("settings".into(), toml::Value::Table(settings));
            let path = config::write_adhoc(scratch.path(), &scratch.path().join("state"), "plugin", runner)?;
            (path, Some("plugin".to_owned()))
        }
        None => (absolute(&cli.config), cli.runner.clone()),
    };
    let runner = config::load(&config_path, runner_name.as_deref())?;
    let backend = registry::load(&runner)?;
    let exe = std::env::current_exe().context("failed to find this executable's path")?;
    let hook_args: Vec<OsString> =
        vec!["--config".into(), config_path.into(), "--runner".into(), runner.name.clone().into()];
    let target =
        berth_conformance::suite::Target::new(exe, hook_args, backend.describe(), Some(runner.state_dir.clone()));
    drop(backend);
    Ok((target, Some(scratch)))
}

/// The default description of a driver that is not berth: it executes
/// scripts, stops a stage on SIGTERM and runs jobs concurrently, and claims
/// neither isolation between jobs nor containment of root.
fn foreign_description(name: &str, version: &str, command: &str) -> Description {
    Description::new(name, version, format!("custom-executor driver `{command}`"))
        .isolation(Isolation::Host)
        .capabilities(Capabilities::none().executes_scripts(true).cancel(true).concurrent_jobs(true))
}

/// `description` with `--declare KEY=VALUE` pairs applied.
fn declare(description: Description, pairs: &[String]) -> Result<Description> {
    const KEYS: &str =
        "executes_scripts, cancel, reap, images, concurrent_jobs, contains_root (true or false), isolation";
    let mut value = serde_json::to_value(&description)?;
    for pair in pairs.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let (key, val) =
            pair.split_once('=').with_context(|| format!("--declare {pair:?}: expected KEY=VALUE ({KEYS})"))?;
        let (key, val) = (key.trim().replace('-', "_"), val.trim());
        if key == "isolation" {
            value["isolation"] = serde_json::Value::String(val.to_owned());
            continue;
        }
        let caps = value["capabilities"].as_object_mut().context("a description without capabilities")?;
        if !caps.contains_key(&key) {
            bail!("--declare {pair:?}: unknown key {key:?}; known: {KEYS}");
        }
        let yes = match val {
            "true" | "yes" => true,
            "false" | "no" => false,
            _ => bail!("--declare {pair:?}: {key} is true or false"),
        };
        caps.insert(key, serde_json::Value::Bool(yes));
    }
    serde_json::from_value(value)
        .context("--declare: invalid isolation (none, host, filesystem, container, virtual-machine)")
}

/// A program as given on the command line or in a config file: a path with a
/// slash is made absolute from `base` (hooks run in the job's temp dir), a bare
/// name is left to `PATH`.
fn program_path(program: &str, base: &Path, what: &str) -> Result<PathBuf> {
    if !program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = base.join(program);
    std::fs::canonicalize(&path).with_context(|| format!("{what}: failed to find {}", path.display()))
}

/// The hooks of a gitlab-runner config.toml's `[runners.custom]` block: each
/// `*_exec` with its `*_args`; config, prepare and cleanup skipped when their
/// `*_exec` is unset, as gitlab-runner does; `run_exec` required.
fn custom_block(file: &Path) -> Result<Vec<(Hook, HookExec)>> {
    let shown = file.display();
    let text = std::fs::read_to_string(file).with_context(|| format!("failed to read {shown}"))?;
    let doc: toml::Table = toml::from_str(&text).with_context(|| format!("invalid TOML in {shown}"))?;
    let custom = match doc.get("runners") {
        Some(toml::Value::Table(runner)) => runner.get("custom"),
        Some(toml::Value::Array(runners)) => {
            let blocks: Vec<&toml::Value> = runners.iter().filter_map(|r| r.get("custom")).collect();
            if blocks.len() > 1 {
                bail!("{shown} has {} runners with a [runners.custom] block; keep only the one to test", blocks.len());
            }
            blocks.first().copied()
        }
        _ => None,
    };
    let custom =
        custom.and_then(toml::Value::as_table).with_context(|| format!("{shown} has no [runners.custom] block"))?;
    let base = absolute(file).parent().map(Path::to_owned).unwrap_or_else(|| PathBuf::from("/"));
    let mut hooks = Vec::new();
    for hook in [Hook::Config, Hook::Prepare, Hook::Run, Hook::Cleanup] {
        let (exec_key, args_key) = (format!("{}_exec", hook.name()), format!("{}_args", hook.name()));
        let program = match custom.get(&exec_key) {
            None if hook == Hook::Run => bail!("{shown}: [runners.custom] has no run_exec (gitlab-runner requires it)"),
            None => {
                hooks.push((hook, HookExec::Skipped));
                continue;
            }
            Some(toml::Value::String(program)) if !program.is_empty() => {
                program_path(program, &base, &format!("{shown}: {exec_key}"))?
            }
            Some(_) => bail!("{shown}: [runners.custom] {exec_key} must be a non-empty string"),
        };
        let args = match custom.get(&args_key) {
            None => Vec::new(),
            Some(toml::Value::Array(items)) => items
                .iter()
                .map(|item| item.as_str().map(OsString::from))
                .collect::<Option<Vec<_>>>()
                .with_context(|| format!("{shown}: [runners.custom] {args_key} must be an array of strings"))?,
            Some(_) => bail!("{shown}: [runners.custom] {args_key} must be an array of strings"),
        };
        hooks.push((hook, HookExec::Command { program, args }));
    }
    Ok(hooks)
}

/// The target for `--driver` or `--driver-config`: a driver that is not
/// berth, described by its config hook, `--describe` and `--declare`.
fn foreign_target(args: &ConformanceArgs) -> Result<berth_conformance::suite::Target> {
    let cwd = std::env::current_dir().context("failed to find the current directory")?;
    let (mut target, shown) = match (&args.driver, &args.driver_config) {
        (Some(command), _) => {
            let words =
                shell_words::split(command).with_context(|| format!("--driver {command:?} is not a valid command"))?;
            let Some((program, rest)) = words.split_first() else {
                bail!("--driver is empty: give the driver's command, e.g. --driver '/usr/local/bin/my-driver --flag'")
            };
            let program = program_path(program, &cwd, "--driver")?;
            let description = foreign_description("", "", command);
            let rest = rest.iter().map(OsString::from).collect();
            (berth_conformance::suite::Target::new(program, rest, description, None), command.clone())
        }
        (None, Some(file)) => {
            let hooks = custom_block(file)?;
            let run = hooks.iter().find_map(|(hook, exec)| match exec {
                HookExec::Command { program, .. } if *hook == Hook::Run => Some(program.clone()),
                _ => None,
            });
            let run = run.context("no run_exec")?;
            let shown = file.display().to_string();
            let mut target =
                berth_conformance::suite::Target::new(run, Vec::new(), foreign_description("", "", &shown), None);
            for (hook, exec) in hooks {
                target = target.with_hook(hook, exec);
            }
            (target, shown)
        }
        (None, None) => unreachable!("called for --driver or --driver-config"),
    };
    target.state_dir = args.state_dir.as_ref().map(|dir| absolute(dir));
    let description = match &args.describe {
        Some(file) => {
            let text = std::fs::read_to_string(file).with_context(|| format!("failed to read {}", file.display()))?;
            serde_json::from_str(&text).with_context(|| {
                format!("{} is not a description as `berth describe --json` prints it", file.display())
            })?
        }
        None => {
            // The name and version the driver gives in config's answer; a
            // driver that names none fails config.json, under its command's name.
            let (name, version) = target.driver_name().unwrap_or_else(|| {
                let program = shown.split_whitespace().next().unwrap_or(&shown);
                let name = Path::new(program).file_name().map_or(program.into(), |n| n.to_string_lossy().into_owned());
                (name, "unknown".to_owned())
            });
            foreign_description(&name, &version, &shown)
        }
    };
    target.description = declare(description, &args.declare)?;
    Ok(target)
}
