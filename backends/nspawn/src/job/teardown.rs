//! Taking a job's container down: cleanup, and reap of containers whose
//! job is gone.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_backend_api::{Failure, JobKey, JobState};
use nix::sys::signal::Signal;
use tracing::{info, warn};

use super::{command_output, container_dir, leader, unit_name, Container, ModeName, MACHINES, RECORD};
use crate::{machine_name, Nspawn};
use berth_backend_support::cgroup::JobCgroup;
use berth_backend_support::claims::Claims;
use berth_backend_support::host::{Cmd, Host};
use berth_backend_support::settings::sys;
use berth_backend_support::userns::Allocator;
use berth_backend_support::{mounts, proc};

/// Stops everything of a job's container and takes its mounts down; what
/// identifies it is the job's own record and the names berth made (its
/// unit, its cgroup), never the arguments of a process.
pub(super) fn tear_down(host: &Arc<dyn Host>, state: &JobState, container: Option<&Container>) -> Result<(), Failure> {
    let machine = machine_of(state, container);
    stop(host, &owners(state, container), &machine, container)?;
    remove_files(&**host, state.dir(), &container_dir(state), &machine)
}

/// The container's machine name: the recorded one (a warm container's
/// differs from the job's), else the job's.
fn machine_of(state: &JobState, container: Option<&Container>) -> String {
    container.map_or_else(|| machine_name(state.key()), |c| c.machine.clone())
}

/// Who may hold the container's claims: the job's state directory, or the
/// pool slot a warm container came from (until its claims are transferred).
fn owners<'a>(state: &'a JobState, container: Option<&'a Container>) -> Vec<&'a Path> {
    let mut owners = vec![state.dir()];
    owners.extend(container.and_then(|c| c.slot.as_deref()));
    owners
}

/// Stops everything of container `machine` (its record `container`): when it
/// returns, nothing of the container runs (its processes are gone, its unit
/// stopped, its cgroup removed); its mounts and files remain. Its name, unit
/// and cgroup are acted on only while one of `owners` holds its name claim
/// (or no one does).
pub(super) fn stop(
    host: &Arc<dyn Host>,
    owners: &[&Path],
    machine: &str,
    container: Option<&Container>,
) -> Result<(), Failure> {
    let started = Instant::now();
    // The machine's name, unit and cgroup are this job's only while it holds
    // the name (another berth configuration's runner of the same name could).
    if Claims::host(MACHINES).owner(machine).is_some_and(|owner| !owners.contains(&owner.as_path())) {
        warn!(
            machine,
            "the container's name is held by another berth state directory: only this job's files are removed"
        );
        return Ok(());
    }
    // systemd mode: the unit holds everything; kill it, then let it go.
    if let Some(c) = container.filter(|c| c.mode == ModeName::Systemd && host.systemd_booted()) {
        let unit = c.unit.clone().unwrap_or_else(|| format!("{machine}.service"));
        for args in [["kill", "--signal=SIGKILL"].as_slice(), &["stop"], &["reset-failed"]] {
            let _ = command_output(&**host, &Cmd::new("systemctl").args(args).arg(&unit));
        }
    }
    // Standalone: the recorded init and nspawn, if they are still those
    // processes. SIGKILL of nspawn alone would orphan the container: kill its
    // init first, which ends the container and lets nspawn exit by itself.
    let mut pids = Vec::new();
    if let Some(container) = container {
        if let Some((pid, _fd)) = leader(&**host, container) {
            let _ = host.signal(pid, Some(Signal::SIGKILL));
            pids.push(pid);
        }
        if let Some((pid, start)) = container.nspawn {
            if host.process(pid).map(|p| p.start_time) == Some(start) {
                pids.push(pid);
            }
        }
    }
    // The container's cgroup (standalone mode) is berth's, named after the
    // machine: everything in it is the container's, whatever it calls itself.
    let cgroup = JobCgroup::on(host.clone(), machine);
    let stragglers = cgroup.pids();
    if !stragglers.is_empty() && !cgroup.kill() {
        for pid in &stragglers {
            let _ = host.signal(*pid, Some(Signal::SIGKILL));
        }
    }
    let nspawn: Vec<i32> = container.and_then(|c| c.nspawn).map(|(p, _)| p).into_iter().collect();
    if !proc::wait_gone_on(&**host, &pids, Duration::from_secs(3)) {
        warn!(machine, "nspawn did not exit after its container was killed; killing it");
        for pid in pids.iter().filter(|p| nspawn.contains(p)) {
            let _ = host.signal(*pid, Some(Signal::SIGKILL));
        }
    }
    let all: Vec<i32> = pids.iter().chain(&stragglers).copied().collect();
    if !proc::wait_gone_on(&**host, &all, Duration::from_secs(10)) {
        return Err(Failure::system(format!("container {machine} (processes {all:?}) did not exit after SIGKILL")));
    }
    cgroup.remove().map_err(sys(format!("failed to remove the cgroup of container {machine}")))?;
    if container.is_some() || !all.is_empty() {
        info!(machine, elapsed_ms = started.elapsed().as_millis() as u64, "container stopped");
    }
    Ok(())
}

/// Unmounts everything under `mounts` (the job's state or a pool slot) and
/// removes what the container wrote, `dir` (its directory, any tree the job
/// made in it, with bounded descriptors, never crossing a mount).
pub(super) fn remove_files(host: &dyn Host, mounts: &Path, dir: &Path, machine: &str) -> Result<(), Failure> {
    // The root, the image's clone, the cache and the layer's filesystem.
    let report = mounts::unmount_all(host, mounts)
        .map_err(sys(format!("failed to unmount the container's filesystems in {}", mounts.display())))?;
    for point in &report.detached {
        warn!(machine, "{} was busy; detached it (lazy unmount)", point.display());
    }
    // Left by nspawn when it cannot clean up after itself without systemd.
    let propagate = Path::new("/run/systemd/nspawn/propagate").join(machine);
    if propagate.exists() {
        if let Err(e) = fs::remove_dir_all(&propagate) {
            warn!("failed to remove {}: {e}", propagate.display());
        }
    }
    berth_backend_api::remove_tree(dir).map_err(sys(format!("failed to remove {}", dir.display())))
}

/// Releases what a job's container held: its name (the recorded machine's and
/// the job's own, which differ for a warm container), from the job or the
/// slot it came from.
fn release_names(state: &JobState, container: Option<&Container>) -> Result<(), Failure> {
    let claims = Claims::host(MACHINES);
    let mut names = vec![machine_name(state.key())];
    names.extend(container.map(|c| c.machine.clone()));
    for name in names {
        for owner in owners(state, container) {
            claims.release(&name, owner).map_err(sys("failed to release the container's name"))?;
        }
    }
    Ok(())
}

/// Cleanup: the container is stopped before the hook returns (nothing of the
/// job runs any more, its name is free); unmounting and removing its layer,
/// releasing its uid range and removing the job's state may go on in a
/// background process that holds the job's lock
/// ([`JobState::finish_in_background`]): the next hook of the same job waits
/// for it, and what a failed or killed background process leaves (the state
/// with its record) is finished by the next cleanup or `reap`.
pub(crate) fn cleanup(backend: &Nspawn, state: &JobState) -> Result<(), Failure> {
    let started = Instant::now();
    let container: Option<Container> = state.load(RECORD).unwrap_or(None);
    let container = container.or_else(|| super::load_record(&container_dir(state).join(RECORD)));
    let machine = machine_of(state, container.as_ref());
    stop(&backend.host, &owners(state, container.as_ref()), &machine, container.as_ref())?;
    release_names(state, container.as_ref())?;
    let finish = || -> Result<(), Failure> {
        remove_files(&*backend.host, state.dir(), &container_dir(state), &machine)?;
        for owner in owners(state, container.as_ref()) {
            Allocator::host().release_all(owner).map_err(sys("failed to release the job's uid range"))?;
        }
        Ok(())
    };
    if let Some(container) = &container {
        // The pool lost one: a replacement.
        super::pool::start_filler(backend, &container.image);
        let logs = backend.runner.logs_dir();
        let _ = fs::create_dir_all(&logs);
        let log = logs.join("nspawn-cleanup.log");
        // Bounded: only failures and diagnostics go there.
        if fs::metadata(&log).is_ok_and(|m| m.len() > 1 << 20) {
            let _ = fs::remove_file(&log);
        }
        match state.finish_in_background(&log, || finish().map_err(|e| e.to_string())) {
            Ok(true) => {
                info!(
                    machine,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "container stopped; its layer is removed in the background"
                );
                return Ok(());
            }
            Ok(false) => {}
            Err(e) => warn!(machine, "failed to start the background part of cleanup ({e}): doing it now"),
        }
    }
    finish()
}

/// Kills a container whose record is gone by the names berth gave it (its
/// unit, its cgroup); true once nothing of it runs and its cgroup is removed.
pub(super) fn kill_by_names(host: &Arc<dyn Host>, machine: &str, unit: &str) -> bool {
    if host.systemd_booted() {
        for args in [["kill", "--signal=SIGKILL"].as_slice(), &["stop"]] {
            let _ = command_output(&**host, &Cmd::new("systemctl").args(args).arg(unit));
        }
    }
    let cgroup = JobCgroup::on(host.clone(), machine);
    let pids = cgroup.pids();
    if !pids.is_empty() && !cgroup.kill() {
        for pid in &pids {
            let _ = host.signal(*pid, Some(Signal::SIGKILL));
        }
    }
    proc::wait_gone_on(&**host, &pids, Duration::from_secs(10)) && cgroup.remove().is_ok()
}

/// Removes what jobs whose state is gone left behind (`dry_run`: only says what).
pub(crate) fn reap_orphans(backend: &Nspawn, _known: &[JobKey], dry_run: bool) -> Result<Vec<String>, Failure> {
    let jobs = backend.runner.state_dir.join("jobs");
    let prefix = format!("berth-{}-", backend.runner.name);
    let mut removed = Vec::new();
    // Containers whose job's state is gone (its cleanup never ran): found by
    // the claim of their name, which only berth makes, owned by a job
    // directory of this state dir.
    let claims = Claims::host(MACHINES);
    for (machine, owner, key) in claims.orphans_of(&backend.runner) {
        if dry_run {
            removed.push(format!("container {machine} (its job's state {} is gone)", owner.display()));
        } else if kill_by_names(&backend.host, &machine, &unit_name(&key)) {
            let _ = claims.release(&machine, &owner);
            removed.push(format!("container {machine} (its job's state {} is gone)", owner.display()));
        }
    }
    removed.extend(super::pool::reap(backend, dry_run));
    // Empty cgroups of jobs whose cleanup never ran (standalone mode). A young
    // one may belong to a prepare that has not started nspawn yet.
    for machine in JobCgroup::machines(&prefix, Duration::from_secs(60)) {
        let Ok(key) = JobKey::try_from(machine["berth-".len()..].to_owned()) else { continue };
        let cgroup = JobCgroup::on(backend.host.clone(), &machine);
        let unclaimed = claims.owner(&machine).is_none();
        if key.runner() == backend.runner.name
            && unclaimed
            && !jobs.join(key.to_string()).exists()
            && cgroup.pids().is_empty()
            && (dry_run || cgroup.remove().is_ok())
        {
            removed.push(format!("cgroup of container {machine} (no job state, no process)"));
        }
    }
    removed.extend(Allocator::host().reclaim(&jobs, dry_run));
    removed.extend(berth_backend_support::generations::Images::new(backend.images.dir()).prune(dry_run));
    Ok(removed)
}
