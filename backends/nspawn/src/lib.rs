//! berth's reference backend: every job gets a fresh, fully booted systemd
//! container (`systemd-nspawn --boot`) on a copy-on-write overlay of an
//! admin-provided image, thrown away at cleanup.
//!
//! Two host modes with the same semantics ([`settings::Mode`]):
//! - **systemd** (PID 1 is systemd): the container runs in a transient unit
//!   `berth-<job>.service` in `machine.slice` (Delegate=yes, KillMode=mixed,
//!   Type=notify, resource limits as unit properties), registered with
//!   systemd-machined; stages run with `systemd-run --machine`.
//! - **standalone** (no systemd on the host, e.g. inside a container): nspawn
//!   is started detached with `--register=no --keep-unit`, readiness comes
//!   from its notify socket, and stages enter the container leader's
//!   namespaces with `nsenter`.
//!
//! In both, each stage runs **inside the container as a unit of its own**
//! (`systemd-run --pipe --wait` in the container), so when the script ends
//! every process it started is gone and nothing holds the job log; a cancel
//! stops that unit explicitly (killing the `systemd-run` client alone would
//! leave it running).
//!
//! With `pool_size`, containers are booted ahead of jobs and handed to them
//! at prepare (`job/pool.rs`); cleanup returns once the container is
//! stopped and removes its layer in the background.
#![deny(missing_docs)]

mod job;
mod notify;
pub mod settings;

pub use job::pool::{warm_containers, WarmContainer};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_backend_api::{
    Backend, Cancel, Capabilities, ConfigOutput, Description, Failure, Finding, Isolation, JobContext, JobKey,
    JobState, NewBackend, RunnerInfo,
};

use crate::settings::{Mode, Settings};
use berth_backend_support::host::{Host, System};
use berth_backend_support::image::ImageStore;
use berth_backend_support::limits::Limits;
use berth_backend_support::settings::{ImageSettings, ImageSetup};
use berth_backend_support::{cgroup, check};

/// Where the job's builds dir is inside the container.
const BUILDS_DIR: &str = "/builds";
/// Where stage scripts appear inside the container.
const SCRIPTS_DIR: &str = "/run/berth";
/// Where gitlab-runner appears inside the container.
const GITLAB_RUNNER: &str = "/usr/local/bin/gitlab-runner";

/// The nspawn backend of one runner.
#[derive(Debug)]
pub struct Nspawn {
    settings: Settings,
    mode: Mode,
    images: ImageStore,
    runner: RunnerInfo,
    cache_host_dir: PathBuf,
    /// Where jobs see their cache (the runner's `cache_dir`, else `/cache`).
    cache_dir: PathBuf,
    gitlab_runner: Option<PathBuf>,
    /// Units and generators masked on every job's overlay (checked names).
    masked_units: Vec<String>,
    masked_generators: Vec<String>,
    limits: Limits,
    /// What performs the host operations ([`System`] but in tests).
    host: Arc<dyn Host>,
}

/// Whether PID 1 is systemd (`sd_booted()`).
pub fn systemd_is_pid1() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

impl NewBackend for Nspawn {
    type Settings = Settings;

    fn new(settings: Settings, runner: &RunnerInfo) -> Result<Self, Failure> {
        let mode = match settings.mode {
            Mode::Auto if systemd_is_pid1() => Mode::Systemd,
            Mode::Auto => Mode::Standalone,
            mode => mode,
        };
        let ImageSetup { images, cache_host_dir, gitlab_runner, cache_dir } = ImageSettings {
            images_dir: settings.images_dir.as_deref(),
            allowed_images: &settings.allowed_images,
            default_image: settings.default_image.as_deref(),
            cache_host_dir: settings.cache_host_dir.as_deref(),
            gitlab_runner: settings.gitlab_runner.as_deref(),
            bind: &settings.bind,
        }
        .resolve(runner)?;
        let limits = Limits::of(&settings.limits()).map_err(|e| Failure::system(format!("settings.{e}")))?;
        settings.boot_timeout().map_err(|e| Failure::system(format!("settings.{e}")))?;
        let masked_units = settings.masked_units().map_err(|e| Failure::system(format!("settings.{e}")))?;
        let masked_generators = settings.masked_generators().map_err(|e| Failure::system(format!("settings.{e}")))?;
        settings::check_nspawn_args(&settings.nspawn_args).map_err(|e| Failure::system(format!("settings.{e}")))?;
        settings.pool_size().map_err(|e| Failure::system(format!("settings.{e}")))?;
        Ok(Nspawn {
            images,
            mode,
            cache_host_dir,
            cache_dir,
            gitlab_runner,
            runner: runner.clone(),
            settings,
            masked_units,
            masked_generators,
            limits,
            host: Arc::new(System),
        })
    }
}

/// The machine (and host) name of a job's container.
pub fn machine_name(key: &JobKey) -> String {
    format!("berth-{key}")
}

impl Nspawn {
    /// The same backend, its host operations done by `host` (a
    /// [`berth_backend_support::host::Recorder`] in tests).
    pub fn with_host(mut self, host: Arc<dyn Host>) -> Nspawn {
        self.host = host;
        self
    }

    /// Whether jobs get a uid range of their own (`private_users`, default true).
    pub fn private_users(&self) -> bool {
        self.settings.private_users.unwrap_or(true)
    }

    /// What this host cannot enforce of the runner's bounds and protections,
    /// each with what to do: said at `berth config`, never dropped silently.
    fn unhonoured(&self) -> Vec<String> {
        let runner = &self.runner.name;
        let mut out = Vec::new();
        for (name, default, reason) in cgroup::unenforceable(&self.settings.limits()) {
            let how = if self.mode == Mode::Standalone {
                "standalone mode sets limits in the container's cgroup"
            } else {
                "systemd sets it on the container's unit, and cannot enforce it here"
            };
            out.push(format!("nspawn runner {runner}: settings.{name}{default} is not enforced: {reason} ({how})"));
        }
        out.extend(berth_backend_support::limits::host_warnings("nspawn", runner, &self.limits, self.private_users()));
        out
    }
}

impl Nspawn {
    /// [`Backend::check`]: what this runner's jobs need of the host.
    fn host_check(&self) -> Vec<Finding> {
        let runner = &self.runner.name;
        let mut out = Vec::new();
        out.push(match (self.settings.mode, self.mode) {
            (Mode::Systemd, _) if !systemd_is_pid1() => Finding::error(
                "host mode",
                "settings.mode = \"systemd\", but PID 1 of this host is not systemd: every prepare would fail",
                "set settings.mode = \"auto\" (standalone mode is used where systemd is not PID 1)",
            ),
            (_, Mode::Systemd) => Finding::ok("host mode", "systemd (containers run as units of the host's systemd)"),
            _ => Finding::ok("host mode", "standalone (PID 1 is not systemd: berth supervises containers itself)"),
        });
        out.push(check::tool("systemd-nspawn", "systemd-container", "it runs every job's container"));
        if self.mode == Mode::Systemd {
            out.push(check::tool("systemd-run", "systemd", "it starts containers as units"));
        }
        out.extend(check::runner(&check::Runner {
            name: runner,
            images: &self.images,
            state_dir: &self.runner.state_dir,
            limits: &self.limits,
            limit_settings: &self.settings.limits(),
            private_users: self.private_users(),
            gitlab_runner: self.gitlab_runner.as_deref(),
        }));
        out
    }
}

impl Backend for Nspawn {
    fn describe(&self) -> Description {
        Description::new(
            "nspawn",
            env!("CARGO_PKG_VERSION"),
            "a booted systemd-nspawn container per job, on an overlay of an image",
        )
        .isolation(Isolation::Container)
        .capabilities(
            Capabilities::none()
                .executes_scripts(true)
                .cancel(true)
                .reap(true)
                .images(true)
                .concurrent_jobs(true)
                // Root in the job is a uid range of its own, unless the runner opted out.
                .contains_root(self.private_users()),
        )
    }

    fn config(&self, _job: &JobContext) -> Result<ConfigOutput, Failure> {
        let mut output = ConfigOutput::with_dirs(BUILDS_DIR, self.cache_dir.to_string_lossy());
        output.warnings = self.unhonoured();
        Ok(output)
    }

    fn prepare(&self, job: &JobContext, state: &JobState, cancel: &Cancel) -> Result<(), Failure> {
        job::prepare(self, job, state, cancel)
    }

    fn run(
        &self,
        job: &JobContext,
        state: &JobState,
        script: &Path,
        stage: &str,
        cancel: &Cancel,
    ) -> Result<(), Failure> {
        job::run(self, job, state, script, stage, cancel)
    }

    fn cleanup(&self, state: &JobState) -> Result<(), Failure> {
        job::cleanup(self, state)
    }

    fn reap_orphans(&self, known: &[JobKey]) -> Result<Vec<String>, Failure> {
        job::reap_orphans(self, known, false)
    }

    fn orphans(&self, known: &[JobKey]) -> Result<Option<Vec<String>>, Failure> {
        job::reap_orphans(self, known, true).map(Some)
    }

    fn check(&self) -> Vec<Finding> {
        self.host_check()
    }
}
