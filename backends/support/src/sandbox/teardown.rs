//! Taking a job's sandbox down: cleanup and reap.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use berth_backend_api::{Failure, JobState};
use nix::sys::signal::Signal;
use tracing::warn;

use super::{sandbox_name, Paths, Sandbox, NAMES, VIEWS};
use crate::cgroup::JobCgroup;
use crate::claims::Claims;
use crate::host::Host;
use crate::settings::sys;
use crate::userns::Allocator;
use crate::{mounts, rootfs};

impl Sandbox {
    /// Takes the job's sandbox down and releases its range and name.
    pub fn cleanup(&self, state: &JobState) -> Result<(), Failure> {
        tear_down(&self.host, state)?;
        Allocator::host().release_all(state.dir()).map_err(sys("failed to release the job's uid range"))?;
        Claims::host(NAMES)
            .release(&sandbox_name(state.key()), state.dir())
            .map_err(sys("failed to release the sandbox's name"))?;
        Ok(())
    }

    /// Removes sandboxes whose job's state is gone, uid ranges of such jobs,
    /// and image generations no job uses (`dry_run`: only says what).
    pub fn reap_orphans(&self, dry_run: bool) -> Vec<String> {
        let jobs = self.runner.state_dir.join("jobs");
        let mut removed = Vec::new();
        let claims = Claims::host(NAMES);
        for (name, owner, _) in claims.orphans_of(&self.runner) {
            if dry_run || (kill_cgroup(&self.host, &name).is_ok() && remove_view(&*self.host, &name).is_ok()) {
                if !dry_run {
                    let _ = claims.release(&name, &owner);
                }
                removed.push(format!("sandbox {name} (its job's state {} is gone)", owner.display()));
            }
        }
        removed.extend(Allocator::host().reclaim(&jobs, dry_run));
        removed.extend(crate::generations::Images::new(self.images.dir()).prune(dry_run));
        removed
    }
}

/// The view of the job named `name` (see [`Sandbox::make_view`]).
pub fn view_dir(name: &str) -> PathBuf {
    Path::new(VIEWS).join(name)
}

/// Unmounts and removes the view of the job named `name`, if any.
pub(super) fn remove_view(host: &dyn Host, name: &str) -> Result<(), Failure> {
    let view = view_dir(name);
    if !view.exists() {
        return Ok(());
    }
    mounts::unmount_all(host, &view).map_err(sys(format!("failed to unmount {}", view.display())))?;
    berth_backend_api::remove_tree(&view).map_err(sys(format!("failed to remove {}", view.display())))
}

/// Kills everything in the job's cgroup and removes it.
pub(crate) fn kill_cgroup(host: &Arc<dyn Host>, name: &str) -> Result<(), Failure> {
    let group = JobCgroup::on(host.clone(), name);
    let pids = group.pids();
    if !pids.is_empty() && !group.kill() {
        for pid in &pids {
            let _ = host.signal(*pid, Some(Signal::SIGKILL));
        }
    }
    if !crate::proc::wait_gone_on(&**host, &pids, Duration::from_secs(10)) {
        return Err(Failure::system(format!("the processes of sandbox {name} ({pids:?}) did not exit after SIGKILL")));
    }
    group.remove().map_err(sys(format!("failed to remove the cgroup of sandbox {name}")))
}

/// Kills everything of the job (its cgroup, and whatever still runs on its
/// root), unmounts everything under its state directory and removes the
/// layer. Idempotent.
pub(super) fn tear_down(host: &Arc<dyn Host>, state: &JobState) -> Result<(), Failure> {
    let paths = Paths::of(state);
    kill_cgroup(host, &sandbox_name(state.key()))?;
    rootfs::tear_down(&**host, &paths.root)?;
    remove_view(&**host, &sandbox_name(state.key()))?;
    let report = mounts::unmount_all(&**host, state.dir())
        .map_err(sys(format!("failed to unmount the job's filesystems in {}", state.dir().display())))?;
    for point in &report.detached {
        warn!("{} was busy; detached it (lazy unmount)", point.display());
    }
    for dir in [&paths.layer, &paths.root, &paths.lower, &paths.cache] {
        berth_backend_api::remove_tree(dir).map_err(sys(format!("failed to remove {}", dir.display())))?;
    }
    let _ = fs::remove_file(&paths.userns);
    Ok(())
}
