//! Command-line arguments.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// berth: a GitLab Runner custom-executor driver with pluggable isolation backends.
///
/// gitlab-runner calls `berth config`, `berth prepare`, `berth run SCRIPT STAGE`
/// and `berth cleanup` for every job (`berth gitlab-config` prints the runner
/// configuration that does so). `berth exec` runs a job of a .gitlab-ci.yml
/// locally through the same protocol.
#[derive(Debug, Parser)]
#[command(name = "berth", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    /// berth's configuration file.
    #[arg(long, global = true, env = "BERTH_CONFIG", default_value = crate::config::DEFAULT_CONFIG)]
    pub config: PathBuf,

    /// The runner (`[runners.NAME]`) to use; optional when the file defines one.
    #[arg(long, global = true, env = "BERTH_RUNNER")]
    pub runner: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Hook: print the driver's settings for the runner as JSON (config_exec).
    Config,
    /// Hook: create the job's environment (prepare_exec).
    Prepare,
    /// Hook: run one stage script inside the job's environment (run_exec).
    Run(RunArgs),
    /// Hook: remove everything of the job (cleanup_exec).
    Cleanup,
    /// Print the `[[runners]]` block to paste into gitlab-runner's config.toml.
    GitlabConfig(GitlabConfigArgs),
    /// Run one job of a .gitlab-ci.yml locally, through the full protocol.
    Exec(ExecArgs),
    /// Run the conformance suite against the runner's backend.
    Conformance(ConformanceArgs),
    /// Describe the runner's backend (name, version, capabilities).
    Describe(DescribeArgs),
    /// Check whether this host can run the runners' jobs: configuration, host, backends.
    ///
    /// Each line is ok, a warning or an error with its fix; the exit status is
    /// 1 when there is an error. Without --runner, every runner of the file.
    Doctor(DoctorArgs),
    /// List the built-in backends, and the backend of each configured runner.
    Backends,
    /// Remove environments of jobs that are gone (crashed runner, reboot, killed hook),
    /// and image generations no job uses any more: of the runner given with `--runner`,
    /// else of every runner of the file.
    Reap(ReapArgs),
    /// Build and maintain images (root filesystems) for the nspawn and chroot backends.
    Image(ImageArgs),
    /// List the jobs this host runs now (every runner of the file, or --runner's),
    /// warm containers, and leftovers waiting for `berth reap`.
    Ps(PsArgs),
}

#[derive(Debug, Args)]
pub struct PsArgs {
    /// As JSON, for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ImageArgs {
    /// The images directory (default: the `images_dir` of the runner given with
    /// `--runner`, else /var/lib/berth/images).
    #[arg(long, env = "BERTH_IMAGES_DIR")]
    pub images_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: ImageCommand,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build a Debian or Ubuntu image with mmdebstrap (when installed) or debootstrap.
    Create {
        /// The image's name (what jobs write in `image:`).
        name: String,
        /// The distribution release: bookworm, trixie, jammy, noble, ...
        #[arg(long)]
        suite: String,
        /// The package mirror (default: Debian's, or Ubuntu's for Ubuntu suites).
        #[arg(long)]
        mirror: Option<String>,
        /// More packages, comma-separated (besides systemd, dbus, git, ca-certificates, curl).
        #[arg(long, value_delimiter = ',')]
        include: Vec<String>,
        /// A provisioning script run as root inside the image before it is published.
        #[arg(long)]
        setup: Option<PathBuf>,
        /// The tool that builds the root filesystem.
        #[arg(long, value_enum, default_value_t = Bootstrapper::Auto)]
        tool: Bootstrapper,
    },
    /// Adopt a root filesystem: a directory or a tarball (`docker export`, mkosi, ...).
    Import {
        /// The image's name.
        name: String,
        /// A directory or a tarball.
        source: PathBuf,
    },
    /// List the images: generation, size, creation time, jobs using them.
    List,
    /// A root shell in a new generation; published when the shell exits with 0.
    Shell {
        /// The image.
        name: String,
    },
    /// Make a new generation by running a script (default: the distribution's upgrade).
    Update {
        /// The image.
        name: String,
        /// The script to run as root inside the image.
        #[arg(long)]
        script: Option<PathBuf>,
    },
    /// Remove an image (refused while a job uses it).
    Remove {
        /// The image.
        name: String,
        /// Remove it even while jobs use it.
        #[arg(long)]
        force: bool,
    },
    /// Remove old generations that no job uses (also done by `berth reap`).
    Prune,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The stage script the runner wrote (a bash program on this host).
    pub script: PathBuf,
    /// The stage name (`prepare_script`, `build_script`, ...; unknown names are accepted).
    pub stage: String,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the findings as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GitlabConfigArgs {
    /// Path of the berth executable gitlab-runner should call (default: this one).
    #[arg(long)]
    pub berth: Option<PathBuf>,
    /// Print the block even when the runner's checks find errors (see `berth doctor`).
    #[arg(long)]
    pub skip_checks: bool,
    /// The runner's `name` in gitlab-runner's config.toml (default: the berth runner's name).
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The job to run.
    #[arg(required_unless_present = "list")]
    pub job: Option<String>,
    /// List the file's runnable jobs and exit.
    #[arg(long)]
    pub list: bool,
    /// The pipeline file.
    #[arg(long, short, default_value = ".gitlab-ci.yml")]
    pub file: PathBuf,
    /// A variable for the job, KEY=VALUE (repeatable; overrides the file's).
    #[arg(long = "var", value_name = "KEY=VALUE")]
    pub vars: Vec<String>,
    /// A masked variable, KEY=VALUE (repeatable): kept out of logs like GitLab's masked variables.
    #[arg(long = "masked-var", value_name = "KEY=VALUE")]
    pub masked_vars: Vec<String>,
    /// The project's files (default: the git work tree around the pipeline file).
    #[arg(long)]
    pub sources: Option<PathBuf>,
    /// Do not copy any sources into the job.
    #[arg(long, conflicts_with = "sources")]
    pub no_sources: bool,
    /// Copies of the files of `remote:`, `project:` and `template:` includes,
    /// which berth does not fetch: DIR/HOST/PATH of a URL,
    /// DIR/PROJECT/FILE, DIR/templates/NAME.
    #[arg(long, value_name = "DIR")]
    pub include_dir: Option<PathBuf>,
    /// Use this built-in backend with its default settings instead of a configured runner.
    #[arg(long)]
    pub backend: Option<String>,
    /// Job timeout: seconds, or a duration such as `90m` or `1h 30m` (default: the job's
    /// `timeout:`, else 1h).
    #[arg(long, value_parser = duration)]
    pub timeout: Option<Duration>,
    /// Run the job even when its `rules:` say GitLab would not create it.
    #[arg(long)]
    pub ignore_rules: bool,
    /// Show cleanup's output (the runner keeps it for its own log).
    #[arg(long, short)]
    pub verbose: bool,
    /// Pause between prepare attempts, in milliseconds (gitlab-runner: 3000).
    #[arg(long, default_value_t = 3000, hide = true)]
    pub retry_delay_ms: u64,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("foreign").args(["driver", "driver_config"]).multiple(false))]
pub struct ConformanceArgs {
    /// Run only these checks (by ID; repeatable).
    #[arg(long = "check", value_name = "ID")]
    pub checks: Vec<String>,
    /// Skip these checks (by ID; repeatable).
    #[arg(long = "skip", value_name = "ID")]
    pub skips: Vec<String>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// List the checks and exit.
    #[arg(long)]
    pub list: bool,
    /// Also write the report as JUnit XML to this file (for a CI system).
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Test this backend library instead of a configured runner.
    #[arg(long, value_name = "PATH")]
    pub plugin: Option<PathBuf>,
    /// The plugin's settings: a TOML file of what would be `[runners.NAME.settings]`.
    #[arg(long, value_name = "FILE", requires = "plugin")]
    pub settings: Option<PathBuf>,
    /// Test any custom-executor driver, given as a command split like a shell
    /// splits words: its hooks are called as `CMD ARGS... config|prepare|run SCRIPT STAGE|cleanup`.
    #[arg(long, value_name = "'CMD ARGS...'", conflicts_with_all = ["plugin", "runner", "driver_config"])]
    pub driver: Option<String>,
    /// Test the driver a gitlab-runner config.toml's `[runners.custom]` block
    /// describes (`*_exec` and `*_args` for each hook).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["plugin", "runner"])]
    pub driver_config: Option<PathBuf>,
    /// What the driver supports, as `berth describe --json` prints it (default:
    /// executes scripts, cancel, concurrent jobs, no isolation or containment claim).
    #[arg(long, value_name = "FILE", requires = "foreign")]
    pub describe: Option<PathBuf>,
    /// Declare the driver's capabilities, on top of the default or `--describe`:
    /// KEY=VALUE, comma-separated, for executes_scripts, cancel, reap, images,
    /// concurrent_jobs, contains_root (true/false) and isolation
    /// (none, host, filesystem, container, virtual-machine).
    #[arg(long, value_name = "KEY=VALUE,...", value_delimiter = ',', requires = "foreign")]
    pub declare: Vec<String>,
    /// The driver's state directory: after every case, nothing named after the
    /// case's job may remain in it (without it, only processes and mounts are checked).
    #[arg(long, value_name = "DIR", requires = "foreign")]
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// As JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReapArgs {
    /// Only jobs whose state is older than this: seconds, or a duration such as `10m`.
    #[arg(long, default_value = "600", value_parser = duration)]
    pub grace: Duration,
    /// Show what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// What builds an image's root filesystem (`berth image create --tool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Bootstrapper {
    /// mmdebstrap when it is installed, else debootstrap.
    Auto,
    /// mmdebstrap (faster; apt resolves the packages).
    Mmdebstrap,
    /// debootstrap.
    Debootstrap,
}

/// A duration on the command line: bare seconds (`600`), as always, or
/// humantime's syntax (`10m`, `1h 30m`, `2days`).
fn duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text).map_err(|e| format!("{e}: give seconds (600) or a duration such as 10m or 1h 30m"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_bare_seconds_or_humantime() {
        assert_eq!(duration("600"), Ok(Duration::from_secs(600)));
        assert_eq!(duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(duration("1h 30m"), Ok(Duration::from_secs(5400)));
        let err = duration("ten minutes").unwrap_err();
        assert!(err.contains("give seconds (600) or a duration"), "{err}");
        assert!(duration("-5").is_err());
    }
}
