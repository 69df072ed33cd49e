//! Warm containers (`pool_size`): containers booted ahead of jobs, one pool
//! per image jobs ask for, kept by the hooks themselves (no service).
//!
//! ```text
//! <state_dir>/pool/<runner>/<image>/   (0700)
//!   take.lock   held briefly by whoever changes a slot's state (ready, taken)
//!   fill.lock   held by the image's one filler for as long as it runs
//!   fill.log    what fillers said
//!   stop        asks fillers to stop: made by a reap that empties the pool
//!   <n>/        a slot: laid out like a job's container directory, with its
//!               record (container.json: booting until `ready`)
//! ```
//!
//! A warm container boots exactly like a job's (same limits, uid range
//! allocation, masks and binds) but for what is the job's: its machine is
//! `berth-<runner>-pool<n>` (never a job's name: a job id is digits) and the
//! project's cache is not bound. Prepare takes a ready slot of the image's
//! current generation whose init still runs, renames it to the job's
//! container directory (so no container ever goes back to the pool), moves
//! its claims to the job, sets the job's host name and mounts the project's
//! cache into it. Cleanup, not prepare, starts a filler, so that a
//! replacement never boots beside the stages of the job that took one (on a
//! small host they would share its CPUs); the first job of an image (which
//! found no pool) fills it the same way, at its cleanup. A filler is a
//! detached process ([`berth_backend_api::process::detach`]) that boots the
//! missing containers one at a time under the fill lock; a slot left booting
//! by a filler that died (the fill lock is free) is destroyed by the next
//! filler, as are slots of an older generation and slots whose init is gone;
//! `berth reap` does the same, and removes every slot when `pool_size` is 0
//! or the image is gone: it then asks a running filler to stop (the `stop`
//! file, seen before each boot), waits for it, and empties the pool.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use berth_backend_api::{Cancel, Failure, JobContext, JobKey, JobState, JobStatus};
use nix::fcntl::{Flock, FlockArg};
use tracing::warn;

use super::teardown::{kill_by_names, remove_files, stop};
use super::{container_dir, layer, leader, load_record, Container, Home, MACHINES, RECORD};
use crate::Nspawn;
use berth_backend_support::cgroup::memory;
use berth_backend_support::claims::Claims;
use berth_backend_support::host::System;
use berth_backend_support::image::{valid_name, Image};
use berth_backend_support::settings::sys;
use berth_backend_support::userns::{self, Allocator};
use berth_backend_support::{cache, rootfs};

const TAKE: &str = "take.lock";
const FILL: &str = "fill.lock";
const STOP: &str = "stop";

/// The pool of one image of a runner.
struct Pool {
    dir: PathBuf,
}

/// A runner's pools: `<state_dir>/pool/<runner>`.
fn runner_dir(backend: &Nspawn) -> PathBuf {
    pools_dir(&backend.runner.state_dir, &backend.runner.name)
}

fn pools_dir(state_dir: &Path, runner: &str) -> PathBuf {
    state_dir.join("pool").join(runner)
}

impl Pool {
    /// `image` is a checked image name (a plain file name).
    fn of(backend: &Nspawn, image: &str) -> Pool {
        Pool { dir: runner_dir(backend).join(image) }
    }

    fn create(&self) -> Result<(), Failure> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(sys(format!("failed to create {}", self.dir.display())))
    }

    /// Locks `name`; `None` when it is held and `wait` is false.
    fn lock(&self, name: &str, wait: bool) -> Result<Option<Flock<File>>, Failure> {
        let path = self.dir.join(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(sys(format!("failed to open {}", path.display())))?;
        let arg = if wait { FlockArg::LockExclusive } else { FlockArg::LockExclusiveNonblock };
        match Flock::lock(file, arg) {
            Ok(lock) => Ok(Some(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if !wait => Ok(None),
            Err((_, e)) => Err(Failure::system_with(format!("failed to lock {}", path.display()), io::Error::from(e))),
        }
    }

    /// The slots, by number, with their records.
    fn slots(&self) -> Vec<(PathBuf, Option<Container>)> {
        let mut slots: Vec<(u32, PathBuf)> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path())))
            .collect();
        slots.sort();
        slots.into_iter().map(|(_, dir)| (dir.clone(), load_record(&dir.join(RECORD)))).collect()
    }
}

/// Whether slot `slot`'s container can be handed to a job of `image` now: it
/// finished booting, is of the image's current generation, its init still
/// runs (the recorded pid with its start time), and it has the directory
/// the runner's cache is mounted on (a `cache_dir` changed since it booted
/// would leave it without one).
fn usable(backend: &Nspawn, slot: &Path, container: Option<&Container>, image: &Image) -> bool {
    let cache_dir = backend.cache_dir.strip_prefix("/").unwrap_or(&backend.cache_dir);
    container.is_some_and(|c| {
        c.ready
            && c.generation == image.generation
            && c.image == image.name
            && leader(&*backend.host, c).is_some()
            && super::root_dir(slot).join(cache_dir).is_dir()
    })
}

/// A warm container, as `berth ps` shows it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WarmContainer {
    /// Its image and generation, machine, and the cgroup that accounts its
    /// memory (while its init runs).
    pub status: JobStatus,
    /// Its slot directory.
    pub slot: PathBuf,
    /// It finished booting and no job took it.
    pub ready: bool,
    /// Its init runs (the recorded pid with its start time).
    pub running: bool,
    /// When its record was last written (the boot began, or it became
    /// ready), in seconds since the Unix epoch.
    pub since_unix: Option<u64>,
}

/// The warm containers of runner `runner` whose state is in `state_dir`,
/// read without any of the pool's locks; a slot without a readable record
/// (one a filler begins to boot) has an empty status.
pub fn warm_containers(state_dir: &Path, runner: &str) -> Vec<WarmContainer> {
    if JobKey::new(runner, 0).is_err() {
        return Vec::new();
    }
    let mut images: Vec<(String, PathBuf)> = fs::read_dir(pools_dir(state_dir, runner))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str().filter(|n| valid_name(n))?.to_owned(), e.path())))
        .filter(|(_, dir)| dir.is_dir())
        .collect();
    images.sort();
    let mut warm = Vec::new();
    for (_, dir) in images {
        for (slot, container) in (Pool { dir }).slots() {
            let since_unix = fs::metadata(slot.join(RECORD))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs());
            let (status, ready, running) = match &container {
                Some(c) => {
                    let init = leader(&System, c);
                    let status = JobStatus::new().image(&c.image, c.generation).machine(&c.machine);
                    let cgroup = init.as_ref().and_then(|(pid, _)| memory::dir_of(*pid));
                    (status.cgroup(cgroup), c.ready, init.is_some())
                }
                None => (JobStatus::new(), false, false),
            };
            warm.push(WarmContainer { status, slot, ready, running, since_unix });
        }
    }
    warm
}

/// Takes a warm container of `image` for the job, if one is ready: it is
/// the job's container from then on (renamed to its container directory,
/// its claims the job's), with the job's host name and the project's cache.
pub(super) fn take(
    backend: &Nspawn,
    job: &JobContext,
    state: &JobState,
    image: &Image,
) -> Result<Option<Container>, Failure> {
    let pool = Pool::of(backend, &image.name);
    if !pool.dir.is_dir() {
        return Ok(None);
    }
    let container = {
        let _lock = pool.lock(TAKE, true)?;
        let Some((slot, mut container)) = pool
            .slots()
            .into_iter()
            .find(|(s, c)| usable(backend, s, c.as_ref(), image))
            .and_then(|(s, c)| Some((s, c?)))
        else {
            return Ok(None);
        };
        let target = container_dir(state);
        fs::rename(&slot, &target).map_err(sys(format!(
            "failed to move warm container {} to {}",
            slot.display(),
            target.display()
        )))?;
        container.slot = Some(slot.clone());
        container.ready = false;
        state.save(RECORD, &container)?;
        let claims = Claims::host(MACHINES);
        claims
            .transfer(&container.machine, &slot, state.dir())
            .map_err(sys("failed to give the container's name to the job"))?;
        if let Some(range) = container.users {
            Allocator::host()
                .transfer(range, &slot, state.dir())
                .map_err(sys("failed to give the container's uid range to the job"))?;
        }
        container
    };
    adopt(backend, job, state, &container)?;
    Ok(Some(container))
}

/// Makes a taken container the job's: its host name (the job's machine
/// name, as a container booted for the job has) and the project's cache at
/// /cache, idmapped to the container's range, `nosuid,nodev`.
fn adopt(backend: &Nspawn, job: &JobContext, state: &JobState, container: &Container) -> Result<(), Failure> {
    let gone = || Failure::system(format!("the warm container {} stopped while it was taken", container.machine));
    let (pid, _pidfd) = leader(&*backend.host, container).ok_or_else(gone)?;
    let open = |ns: &str| File::open(format!("/proc/{pid}/ns/{ns}")).map_err(|_| gone());
    let (user, mnt, uts) = (open("user")?, open("mnt")?, open("uts")?);
    // Opened while the pidfd's process still ran with the recorded start time.
    if backend.host.process(pid).map(|p| p.start_time) != container.leader_start {
        return Err(gone());
    }
    let cache = cache::job_cache_dir(&backend.cache_host_dir, backend.settings.cache_scope, job)?;
    let attrs = userns::Attrs { read_only: false, nosuid: true, nodev: true };
    let tree = if container.users.is_some() {
        userns::clone_idmapped(&cache, user.as_fd(), attrs)
    } else {
        userns::clone_tree(&cache, attrs)
    }
    .map_err(sys("failed to mount the job's cache"))?;
    let hostname = crate::machine_name(state.key());
    let adoption = userns::Adoption {
        mnt: mnt.as_fd(),
        uts: uts.as_fd(),
        hostname: &hostname,
        tree: tree.as_fd(),
        target: &backend.cache_dir,
    };
    userns::attach_in(&adoption).map_err(sys("failed to hand the warm container to the job"))
}

/// Starts a filler for `image` in the background, when the runner keeps a
/// pool (it does nothing if another filler of the image runs).
pub(super) fn start_filler(backend: &Nspawn, image: &str) {
    if backend.settings.pool_size == 0 || !valid_name(image) {
        return;
    }
    let pool = Pool::of(backend, image);
    if let Err(e) = pool.create() {
        warn!(image, "failed to make the pool's directory: {e}");
        return;
    }
    let log = pool.dir.join("fill.log");
    if fs::metadata(&log).is_ok_and(|m| m.len() > 1 << 20) {
        let _ = fs::remove_file(&log);
    }
    let started = berth_backend_api::process::detach(&log, &[], || match fill(backend, image) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("failed to fill the pool of image {image}: {e}");
            1
        }
    });
    match started {
        Ok(true) => {}
        Ok(false) => warn!(image, "the pool's filler was not started (this process runs several threads)"),
        Err(e) => warn!(image, "failed to start the pool's filler: {e}"),
    }
}

/// Boots warm containers of `image` until `pool_size` are ready, one at a
/// time, as the image's only filler; destroys the slots no job may take.
pub(crate) fn fill(backend: &Nspawn, image_name: &str) -> Result<(), Failure> {
    let pool = Pool::of(backend, image_name);
    pool.create()?;
    let Some(_filling) = pool.lock(FILL, false)? else { return Ok(()) };
    loop {
        let image = backend.images.resolve(Some(image_name))?;
        let (ready, doomed): (Vec<_>, Vec<_>) = {
            let _lock = pool.lock(TAKE, true)?;
            // Holding the fill lock, no slot is booting: an unready one is a dead filler's.
            pool.slots().into_iter().partition(|(s, c)| usable(backend, s, c.as_ref(), &image))
        };
        for (slot, container) in doomed {
            destroy(backend, &slot, container.as_ref())?;
        }
        if ready.len() >= backend.settings.pool_size as usize || pool.dir.join(STOP).exists() {
            return Ok(());
        }
        boot_slot(backend, &pool, &image)?;
    }
}

/// Boots one warm container in a new slot of `pool`.
fn boot_slot(backend: &Nspawn, pool: &Pool, image: &Image) -> Result<(), Failure> {
    let claims = Claims::host(MACHINES);
    let runner = &backend.runner.name;
    let mut found = None;
    for n in 0..10_000u32 {
        let (slot, machine) = (pool.dir.join(n.to_string()), format!("berth-{runner}-pool{n}"));
        if !slot.exists() && claims.claim(&machine, &slot).map_err(sys("failed to claim a warm container's name"))? {
            found = Some((slot, machine));
            break;
        }
    }
    let (slot, machine) = found.ok_or_else(|| Failure::system("no free name for a warm container"))?;
    rootfs::make_dir(&slot, 0o700, None)?;
    let users = match backend.private_users() {
        true => Some(Allocator::host().allocate(&slot).map_err(sys("failed to allocate a uid range"))?),
        false => None,
    };
    let home = Home {
        dir: slot.clone(),
        record: slot.join(RECORD),
        description: format!("berth warm container of runner {runner} ({})", slot.display()),
        cache: false,
    };
    let mut container = Container::new(backend, &machine, image, users, Some(slot.clone()));
    let booted = home.save(&container).and_then(|()| {
        layer::build_root(backend, &home, None, image, &machine, users)?;
        super::boot(backend, &home, &mut container, &Cancel::never().map_err(sys("failed to make a pipe"))?)
    });
    if let Err(e) = booted {
        let _ = destroy(backend, &slot, Some(&container));
        return Err(e);
    }
    let _lock = pool.lock(TAKE, true)?;
    container.ready = true;
    home.save(&container)
}

/// Destroys a slot: its container stopped by its record and names, its
/// claims released, its mounts and files removed.
fn destroy(backend: &Nspawn, slot: &Path, container: Option<&Container>) -> Result<(), Failure> {
    if let Some(container) = container {
        stop(&backend.host, &[slot], &container.machine, Some(container))?;
        Claims::host(MACHINES)
            .release(&container.machine, slot)
            .map_err(sys("failed to release a warm container's name"))?;
    }
    remove_files(&*backend.host, slot, slot, container.map_or("", |c| c.machine.as_str()))?;
    Allocator::host().release_all(slot).map_err(sys("failed to release a warm container's uid range"))
}

/// `berth reap`: the warm containers no job may take (every one when
/// `pool_size` is 0 or the image is no longer offered; those of an older
/// generation; those whose init is gone; those a dead filler left booting),
/// and the names of warm containers whose slot or job is gone. `dry_run`:
/// only says what it would remove.
pub(super) fn reap(backend: &Nspawn, dry_run: bool) -> Vec<String> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(runner_dir(backend)).into_iter().flatten().flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned).filter(|n| valid_name(n)) else { continue };
        let pool = Pool { dir: entry.path() };
        let image = (backend.settings.pool_size > 0).then(|| backend.images.resolve(Some(&name)).ok()).flatten();
        let _locks = if dry_run {
            // A pool that stays and is being filled now is left to the next reap, as below.
            if image.is_some() && !matches!(pool.lock(FILL, false), Ok(Some(_))) {
                continue;
            }
            None
        } else {
            let stop = pool.dir.join(STOP);
            let filling = match image {
                // A running filler keeps a pool that stays; the next reap sees to it.
                Some(_) => pool.lock(FILL, false),
                // A pool to empty: its filler (started with the old settings)
                // stops before its next boot, and is waited for.
                None => match fs::write(&stop, b"") {
                    Ok(()) => pool.lock(FILL, true),
                    Err(e) => Err(Failure::system_with(format!("failed to create {}", stop.display()), e)),
                },
            };
            // Whether the filler was waited for or the lock failed: a stale
            // request would keep every later filler from working.
            if image.is_none() {
                let _ = fs::remove_file(&stop);
            }
            let Ok(Some(filling)) = filling else { continue };
            let Ok(Some(take)) = pool.lock(TAKE, true) else { continue };
            Some((filling, take))
        };
        for (slot, container) in pool.slots() {
            if image.as_ref().is_some_and(|image| usable(backend, &slot, container.as_ref(), image)) {
                continue;
            }
            let machine = container.as_ref().map_or_else(String::new, |c| c.machine.clone());
            let line = format!("warm container {machine} of image {name} ({})", slot.display());
            match if dry_run { Ok(()) } else { destroy(backend, &slot, container.as_ref()) } {
                Ok(()) => removed.push(line),
                Err(e) => warn!(slot = %slot.display(), "failed to remove a warm container: {e}"),
            }
        }
    }
    // A warm container's name whose owner (a slot, or the job that took it)
    // is gone: what its record named is killed by its names.
    let claims = Claims::host(MACHINES);
    let prefix = format!("berth-{}-pool", backend.runner.name);
    for (machine, owner) in claims.list(&prefix) {
        let numbered = machine[prefix.len()..].bytes().all(|b| b.is_ascii_digit());
        let ours = owner.starts_with(runner_dir(backend)) || owner.starts_with(backend.runner.state_dir.join("jobs"));
        if !(numbered && ours && !owner.exists()) {
            continue;
        }
        if dry_run || kill_by_names(&backend.host, &machine, &format!("{machine}.service")) {
            if !dry_run {
                let _ = claims.release(&machine, &owner);
            }
            removed.push(format!("warm container {machine} (its slot {} is gone)", owner.display()));
        }
    }
    removed.extend(Allocator::host().reclaim(&runner_dir(backend), dry_run));
    removed
}
