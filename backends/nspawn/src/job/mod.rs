//! A job's container: boot, stages, teardown, in either host mode.
//!
//! What prepare builds, in the job's state directory (mode 0700):
//!
//! ```text
//! layer/        the job's writable filesystem (ext4 of disk_max bytes on a loop device, nodev,nosuid)
//!   upper/ work/  the overlay's writable layer and scratch, upper owned by the job's root
//! lower/        the image generation, an idmapped read-only clone (host root's files show as the job's root)
//! root/         the overlay (lower + upper, nodev): the container's /
//! cache/        the project's cache directory, bound nosuid,nodev (nspawn binds it idmapped at /cache)
//! scripts/      stage scripts and their exit status, owned by the job's root, bound at /run/berth
//! notify        the sd_notify socket (standalone mode)
//! init.profile  the init's capability bounding set and system call filters, copied by stages
//! ```
//!
//! The container runs with `--private-users=BASE:65536`: its root is host
//! uid BASE, a range of the job's own ([`berth_backend_support::userns`]).
//! The machine name and the uid range are claims under `/run/berth`
//! ([`berth_backend_support::claims`]): a container is recognised by what
//! berth recorded (its claim, its cgroup, its unit, pids with their start
//! times), never by the arguments of a process, which any job can forge.

mod boot;
mod layer;
mod stage;
mod teardown;
#[cfg(test)]
mod tests;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use berth_backend_api::{Cancel, Failure, JobContext, JobKey, JobState};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::settings::Mode;
use crate::{machine_name, Nspawn};
use berth_backend_support::claims::Claims;
use berth_backend_support::host::{Cmd, Host};
use berth_backend_support::settings::sys;
use berth_backend_support::userns::{Allocator, Range};

pub(crate) use stage::run;
use teardown::tear_down;
pub(crate) use teardown::{cleanup, reap_orphans};

/// What prepare made, found again by run and cleanup (`container.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Container {
    mode: ModeName,
    machine: String,
    image: String,
    /// The nspawn process and its start time (standalone mode).
    nspawn: Option<(i32, u64)>,
    /// The container's init, as seen from the host.
    leader: Option<i32>,
    /// The start time of `leader`: with it, the pid is the container's init
    /// and not a process that got the pid after it.
    #[serde(default)]
    leader_start: Option<u64>,
    /// The transient unit running nspawn (systemd mode).
    unit: Option<String>,
    /// The job's host uid/gid range (none: `private_users = false`).
    #[serde(default)]
    users: Option<Range>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ModeName {
    Systemd,
    Standalone,
}

const RECORD: &str = "container.json";
/// How long a stage may take to stop after a cancel before its unit is killed.
const STOP_TIMEOUT: &str = "3s";
/// The claims of machine names.
const MACHINES: &str = "machines";
/// Where the host-side stage launcher and the container's tools are found.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn layer_dir(state: &JobState) -> PathBuf {
    state.dir().join("layer")
}

fn upper_dir(state: &JobState) -> PathBuf {
    layer_dir(state).join("upper")
}

fn root_dir(state: &JobState) -> PathBuf {
    state.dir().join("root")
}

fn scripts_dir(state: &JobState) -> PathBuf {
    state.dir().join("scripts")
}

/// What stages copy from the container's init to enter it directly
/// (`berth_backend_support::container::Profile`), root's alone.
fn profile_file(state: &JobState) -> PathBuf {
    state.dir().join("init.profile")
}

fn boot_log(state: &JobState) -> PathBuf {
    state.dir().join("boot.log")
}

fn unit_name(key: &JobKey) -> String {
    format!("berth-{key}.service")
}

pub(crate) fn prepare(backend: &Nspawn, job: &JobContext, state: &JobState, cancel: &Cancel) -> Result<(), Failure> {
    let started = Instant::now();
    let image = backend.images.resolve(job.image())?;
    let machine = machine_name(job.key());
    let claims = Claims::host(MACHINES);
    if !claims.claim(&machine, state.dir()).map_err(sys("failed to record the container's name"))? {
        let owner = claims.owner(&machine).map(|o| o.display().to_string()).unwrap_or_default();
        return Err(Failure::system(format!(
            "a container named {machine} already runs on this host for {owner}: another berth configuration has a runner named {:?} (runner names must be unique per host)",
            job.key().runner()
        )));
    }
    // An earlier attempt of this job: take all of it down (its range is kept).
    let earlier: Option<Container> = state.load(RECORD).unwrap_or(None);
    tear_down(&backend.host, state, earlier.as_ref())?;
    let users = if backend.private_users() {
        let allocator = Allocator::host();
        Some(match earlier.as_ref().and_then(|c| c.users) {
            Some(range) if allocator.holds(range, state.dir()) => range,
            _ => allocator.allocate(state.dir()).map_err(sys("failed to allocate a uid range for the job"))?,
        })
    } else {
        println!("WARNING: this runner runs jobs as root of the host (settings.private_users = false): a job can take over the host");
        None
    };
    let mut container = Container {
        mode: if backend.mode == Mode::Systemd { ModeName::Systemd } else { ModeName::Standalone },
        machine: machine.clone(),
        image: image.name.clone(),
        nspawn: None,
        leader: None,
        leader_start: None,
        unit: None,
        users,
    };
    state.save(RECORD, &container)?;
    layer::build_root(backend, job, state, &image, &machine, users)?;
    if backend.gitlab_runner.is_none() {
        println!("{}", berth_backend_support::rootfs::GITLAB_RUNNER_MISSING);
    }
    let timeout = backend.settings.boot_timeout().unwrap_or(Duration::from_secs(60));
    match backend.mode {
        Mode::Systemd => boot::boot_systemd(backend, state, &mut container, cancel)?,
        _ => boot::boot_standalone(backend, state, &mut container, timeout, cancel)?,
    };
    stage::learn(backend, state, &container);
    let mode = match container.mode {
        ModeName::Systemd => "systemd",
        ModeName::Standalone => "standalone",
    };
    let generation = image.generation.map(|g| format!(", generation {g}")).unwrap_or_default();
    println!(
        "Booted a container from image {}{generation} ({mode} mode) in {:.2} s",
        container.image,
        started.elapsed().as_secs_f64()
    );
    info!(job = %job.key(), machine, image = container.image, mode, users = ?container.users, "container ready");
    Ok(())
}

/// The container's init, if it still runs: the recorded pid with the
/// recorded start time, held by a pidfd (so the pid cannot be reused while held).
fn leader(host: &dyn Host, container: &Container) -> Option<(i32, OwnedFd)> {
    let (pid, start) = (container.leader?, container.leader_start?);
    let fd = host.pidfd(pid)?;
    host.process(pid).is_some_and(|p| p.start_time == start && p.alive()).then_some((pid, fd))
}

/// Runs a host command to its end, capturing its output.
fn command_output(host: &dyn Host, cmd: &Cmd) -> Result<std::process::Output, Failure> {
    host.output(cmd).map_err(|e| Failure::system_with(format!("failed to run {}", cmd.program.to_string_lossy()), e))
}
