//! A job's container: boot, stages, teardown, in either host mode.
//!
//! What prepare builds, in the job's state directory (mode 0700), under
//! `container/` (a warm container of the pool, [`pool`], is booted in a slot
//! directory laid out the same way and renamed to it when a job takes it):
//!
//! ```text
//! container.json  the job's record of its container (the machine, unit, init, uid range)
//! container/
//!   layer/        the job's writable filesystem (ext4 of disk_max bytes on a loop device, nodev,nosuid)
//!     upper/ work/  the overlay's writable layer and scratch, upper owned by the job's root
//!   lower/        the image generation, an idmapped read-only clone (host root's files show as the job's root)
//!   root/         the overlay (lower + upper, nodev): the container's /
//!   cache/        the project's cache directory, bound nosuid,nodev (nspawn binds it idmapped at /cache)
//!   scripts/      stage scripts, owned by the job's root, bound at /run/berth
//!   notify        the sd_notify socket (standalone mode)
//!   boot.log      what nspawn or systemd-run said while booting
//!   init.profile  the init's capability bounding set and system call filters, copied by stages
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
pub(crate) mod pool;
mod stage;
mod teardown;
#[cfg(test)]
mod tests;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_backend_api::{Cancel, Failure, JobContext, JobKey, JobState, JobStatus};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::settings::Mode;
use crate::{machine_name, Nspawn};
use berth_backend_support::cache;
use berth_backend_support::cgroup::memory;
use berth_backend_support::claims::Claims;
use berth_backend_support::host::{Cmd, Host};
use berth_backend_support::image::Image;
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
    /// The image generation it was booted from.
    #[serde(default)]
    generation: Option<u64>,
    /// A warm container's slot directory in the pool, the first owner of its
    /// claims (kept when a job takes it: its claims are recognised by it
    /// until they are transferred).
    #[serde(default)]
    slot: Option<PathBuf>,
    /// A warm container finished booting (its init is recorded) and no job
    /// has taken it.
    #[serde(default)]
    ready: bool,
}

impl Container {
    /// The record of a container about to be booted in the backend's mode.
    fn new(backend: &Nspawn, machine: &str, image: &Image, users: Option<Range>, slot: Option<PathBuf>) -> Container {
        Container {
            mode: if backend.mode == Mode::Systemd { ModeName::Systemd } else { ModeName::Standalone },
            machine: machine.to_owned(),
            image: image.name.clone(),
            nspawn: None,
            leader: None,
            leader_start: None,
            unit: None,
            users,
            generation: image.generation,
            slot,
            ready: false,
        }
    }
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

/// The directory of a job's container (see the module doc).
fn container_dir(state: &JobState) -> PathBuf {
    state.dir().join("container")
}

fn layer_dir(dir: &Path) -> PathBuf {
    dir.join("layer")
}

fn upper_dir(dir: &Path) -> PathBuf {
    layer_dir(dir).join("upper")
}

fn root_dir(dir: &Path) -> PathBuf {
    dir.join("root")
}

fn scripts_dir(state: &JobState) -> PathBuf {
    container_dir(state).join("scripts")
}

/// What stages copy from the container's init to enter it directly
/// (`berth_backend_support::container::Profile`), root's alone.
fn profile_file(dir: &Path) -> PathBuf {
    dir.join("init.profile")
}

fn boot_log(dir: &Path) -> PathBuf {
    dir.join("boot.log")
}

fn unit_name(key: &JobKey) -> String {
    format!("berth-{key}.service")
}

/// Where a container lives: its directory, where its record is kept, and
/// what its unit is described as (a job's, or a warm container's slot).
pub(super) struct Home {
    dir: PathBuf,
    record: PathBuf,
    description: String,
    /// The project's cache is bound at boot (a job's container; a warm
    /// container gets it when a job takes it).
    cache: bool,
}

impl Home {
    fn job(state: &JobState) -> Home {
        Home {
            dir: container_dir(state),
            record: state.dir().join(RECORD),
            description: format!("berth job {} ({})", state.key(), state.dir().display()),
            cache: true,
        }
    }

    fn save(&self, container: &Container) -> Result<(), Failure> {
        save_record(&self.record, container)
    }
}

/// Writes a container's record atomically.
fn save_record(path: &Path, container: &Container) -> Result<(), Failure> {
    let tmp = path.with_extension("json.tmp");
    let bytes =
        serde_json::to_vec_pretty(container).map_err(|e| Failure::system_with("failed to encode a record", e))?;
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(sys(format!("failed to write {}", path.display())))
}

/// Reads a container's record; `None` if there is none or it is unreadable.
fn load_record(path: &Path) -> Option<Container> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
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
    if let Some(earlier) = earlier.as_ref().filter(|c| c.machine != machine) {
        // A warm container the earlier attempt took: its name is free again.
        claims.release(&earlier.machine, state.dir()).map_err(sys("failed to release the container's name"))?;
    }
    let generation = image.generation.map(|g| format!(", generation {g}")).unwrap_or_default();
    if backend.settings.pool_size > 0 {
        // The replacement of a container taken (or the pool's first ones) is
        // booted after the job, by its cleanup: never beside its stages.
        if let Some(container) = pool::take(backend, job, state, &image)? {
            println!(
                "Took a warm container from the pool (image {}{generation}) in {:.2} s",
                container.image,
                started.elapsed().as_secs_f64()
            );
            info!(job = %job.key(), machine = container.machine, image = container.image, "took a warm container");
            state.set_status(&status_of(&*backend.host, &container))?;
            return Ok(());
        }
    }
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
    let mut container = Container::new(backend, &machine, &image, users, None);
    let home = Home::job(state);
    state.save(RECORD, &container)?;
    berth_backend_support::rootfs::make_dir(&home.dir, 0o700, None)?;
    let cache = cache::job_cache_dir(&backend.cache_host_dir, backend.settings.cache_scope, job)?;
    layer::build_root(backend, &home, Some(&cache), &image, &machine, users)?;
    if backend.gitlab_runner.is_none() {
        println!("{}", berth_backend_support::rootfs::GITLAB_RUNNER_MISSING);
    }
    boot(backend, &home, &mut container, cancel)?;
    state.set_status(&status_of(&*backend.host, &container))?;
    let mode = match container.mode {
        ModeName::Systemd => "systemd",
        ModeName::Standalone => "standalone",
    };
    println!(
        "Booted a container from image {}{generation} ({mode} mode) in {:.2} s",
        container.image,
        started.elapsed().as_secs_f64()
    );
    info!(job = %job.key(), machine, image = container.image, mode, users = ?container.users, "container ready");
    Ok(())
}

/// Boots the container whose root `home` holds, in the backend's mode.
fn boot(backend: &Nspawn, home: &Home, container: &mut Container, cancel: &Cancel) -> Result<(), Failure> {
    let timeout = backend.settings.boot_timeout().unwrap_or(Duration::from_secs(60));
    match backend.mode {
        Mode::Systemd => boot::boot_systemd(backend, home, container, cancel)?,
        _ => boot::boot_standalone(backend, home, container, timeout, cancel)?,
    }
    stage::learn(backend, &home.dir, container);
    Ok(())
}

/// The container's init, if it still runs: the recorded pid with the
/// recorded start time, held by a pidfd (so the pid cannot be reused while held).
fn leader(host: &dyn Host, container: &Container) -> Option<(i32, OwnedFd)> {
    let (pid, start) = (container.leader?, container.leader_start?);
    let fd = host.pidfd(pid)?;
    host.process(pid).is_some_and(|p| p.start_time == start && p.alive()).then_some((pid, fd))
}

/// What `berth ps` shows of a container: its image and generation, its
/// machine, and the cgroup that accounts its memory (found from its init).
fn status_of(host: &dyn Host, container: &Container) -> JobStatus {
    let cgroup = leader(host, container).and_then(|(pid, _pidfd)| memory::dir_of(pid));
    JobStatus::new().image(&container.image, container.generation).machine(&container.machine).cgroup(cgroup)
}

/// Runs a host command to its end, capturing its output.
fn command_output(host: &dyn Host, cmd: &Cmd) -> Result<std::process::Output, Failure> {
    host.output(cmd).map_err(|e| Failure::system_with(format!("failed to run {}", cmd.program.to_string_lossy()), e))
}
