//! `[runners.NAME.settings]` of the nspawn backend.

use std::path::PathBuf;

use berth_backend_support::settings::Bind;
use serde::Deserialize;

/// How containers are started and reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `systemd` when PID 1 is systemd, else `standalone`.
    #[default]
    Auto,
    /// A transient unit per job (machine.slice, Delegate=yes), registered with
    /// systemd-machined; stages through `systemd-run --machine`.
    Systemd,
    /// No systemd on the host: nspawn started detached, stages entered through
    /// the container leader's namespaces.
    Standalone,
}

/// The nspawn backend's settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Settings {
    /// `auto` (default), `systemd` or `standalone`.
    #[serde(default)]
    pub mode: Mode,
    /// Where the images are: one root filesystem directory per image
    /// (default `/var/lib/berth/images`).
    pub images_dir: Option<PathBuf>,
    /// The image for jobs without `image:`.
    pub default_image: Option<String>,
    /// Globs of the image names jobs may use (default: every image in images_dir).
    #[serde(default)]
    pub allowed_images: Vec<String>,
    /// The host directory behind the job's cache dir; survives jobs
    /// (default `<state_dir>/cache/<runner>`).
    pub cache_host_dir: Option<PathBuf>,
    /// The gitlab-runner binary to bind into containers, for the cache and
    /// artifact stages (default: `gitlab-runner` found on PATH).
    pub gitlab_runner: Option<PathBuf>,
    /// Seconds to wait for the container's systemd to be ready (default 60).
    pub boot_timeout: Option<u64>,
    /// The container's memory limit, systemd syntax (`4G`); systemd mode only.
    pub memory_max: Option<String>,
    /// The container's CPU quota (`200%` = two CPUs); systemd mode only.
    pub cpu_quota: Option<String>,
    /// The container's CPU weight (1-10000); systemd mode only.
    pub cpu_weight: Option<u32>,
    /// The container's task (process and thread) limit (default 4096 in systemd mode).
    pub tasks_max: Option<u32>,
    /// A private network namespace with only loopback (default: the host's network).
    #[serde(default)]
    pub private_network: bool,
    /// Extra bind mounts.
    #[serde(default)]
    pub bind: Vec<Bind>,
    /// Extra arguments for systemd-nspawn, placed before `--boot`.
    #[serde(default)]
    pub nspawn_args: Vec<String>,
    /// Arguments for the container's init (systemd), kernel-command-line style
    /// (default: mask the console getty, logind, the journal flush and utmp
    /// records, which a CI job does not use, so that containers boot with less work).
    pub init_args: Option<Vec<String>>,
}
