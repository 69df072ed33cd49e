//! A cgroup of a stage's own inside a running container's: what a stage
//! starts is killed at its end, and counts against the container's bounds
//! from its first instruction on.
//!
//! The stage's cgroups follow the container's init, as the host sees them in
//! `/proc/<init>/cgroup`: in the cgroup2 hierarchy (on a host without one,
//! in the named `systemd` hierarchy) a leaf next to the init's `init.scope`,
//! inside the container's own cgroup namespace (`payload/` of nspawn); in
//! every v1 controller hierarchy the init's cgroup itself, unless this
//! process is already there. The cgroup2 leaf is entered by `clone3(CLONE_INTO_CGROUP)`,
//! without the migration of a running process, which costs a grace period of
//! the kernel's (milliseconds) per hierarchy; the v1 hierarchies, where the
//! kernel cannot do that, are joined by writing `cgroup.procs`. A host with
//! only cgroup2 (Debian 12, Ubuntu 22.04 and later) therefore migrates nothing.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::{joiner_of, unified};
use crate::host::Host;

/// Moves the calling process into cgroups; safe between fork and exec.
pub type Joiner = Box<dyn FnMut() -> io::Result<()> + Send + Sync>;

/// One stage's cgroups (see the module doc), made by [`StageCgroup::make`]
/// and removed by [`StageCgroup::finish`].
pub struct StageCgroup {
    host: Arc<dyn Host>,
    /// The cgroup2 leaf, and its directory opened for `clone3`.
    v2: Option<(PathBuf, OwnedFd)>,
    /// Leaves made in v1 hierarchies (the named `systemd` one).
    v1_leaves: Vec<PathBuf>,
    /// Existing v1 cgroups the stage joins (the init's, in controller hierarchies).
    v1_joins: Vec<PathBuf>,
}

impl std::fmt::Debug for StageCgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageCgroup")
            .field("v2", &self.v2.as_ref().map(|(p, _)| p))
            .field("v1_leaves", &self.v1_leaves)
            .field("v1_joins", &self.v1_joins)
            .finish()
    }
}

/// One line of `/proc/PID/cgroup`: the hierarchy's mount point (under the
/// host's cgroup root) and the process's cgroup in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Membership {
    /// The cgroup2 hierarchy.
    V2(PathBuf),
    /// The named `systemd` hierarchy (v1, no controller).
    Systemd(PathBuf),
    /// A v1 controller hierarchy, by its controllers (`memory`, `cpu,cpuacct`).
    Controller(String, PathBuf),
}

pub(super) fn memberships(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            // Paths are the kernel's, absolute, relative to this process's
            // cgroup namespace; anything else is not a cgroup of ours to touch.
            let path = Path::new(path.strip_prefix('/')?).to_owned();
            if path.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
                return None;
            }
            match (id, controllers) {
                ("0", "") => Some(Membership::V2(path)),
                (_, "name=systemd") => Some(Membership::Systemd(path)),
                (_, c) if !c.is_empty() && !c.starts_with("name=") => Some(Membership::Controller(c.to_owned(), path)),
                _ => None,
            }
        })
        .collect()
}

/// Where a stage leaf goes next to a process in cgroup `path`: beside its
/// `init.scope` (inside the container's cgroup namespace), else below it.
fn leaf_of(path: &Path, leaf: &str) -> PathBuf {
    match path.file_name() {
        Some(name) if name == "init.scope" => path.parent().unwrap_or(path).join(leaf),
        _ => path.join(leaf),
    }
}

impl StageCgroup {
    /// Makes the cgroups of stage `leaf` (a plain name) in the container whose
    /// init is `init` (checked by the caller to be the container's).
    pub fn make(host: Arc<dyn Host>, init: i32, leaf: &str) -> io::Result<StageCgroup> {
        let theirs = std::fs::read_to_string(format!("/proc/{init}/cgroup"))?;
        let ours = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        StageCgroup::make_from(host, &theirs, &ours, leaf)
            .map_err(|e| io::Error::new(e.kind(), format!("process {init}: {e}")))
    }

    /// [`StageCgroup::make`] from the `/proc/PID/cgroup` texts of the init
    /// (`theirs`) and of this process (`ours`).
    fn make_from(host: Arc<dyn Host>, theirs: &str, ours: &str, leaf: &str) -> io::Result<StageCgroup> {
        let root = host.cgroup_root();
        let ours = memberships(ours);
        let v2_mount = if unified(&root) { root.clone() } else { root.join("unified") };
        let mut stage = StageCgroup { host: host.clone(), v2: None, v1_leaves: Vec::new(), v1_joins: Vec::new() };
        let theirs = memberships(theirs);
        // The named `systemd` hierarchy holds no controller: with a cgroup2
        // leaf to track and kill the stage by, joining it would only cost a
        // migration (a hybrid host's systemd tracks units in cgroup2 too).
        let v2 = theirs.iter().any(|m| matches!(m, Membership::V2(_)));
        for membership in theirs {
            match &membership {
                Membership::Systemd(_) if v2 => {}
                Membership::V2(path) => {
                    let dir = v2_mount.join(leaf_of(path, leaf));
                    host.mkdir(&dir)?;
                    let fd = std::fs::File::open(&dir).map_err(|e| super::with_path(e, &dir))?;
                    stage.v2 = Some((dir, fd.into()));
                }
                Membership::Systemd(path) => {
                    let dir = root.join("systemd").join(leaf_of(path, leaf));
                    host.mkdir(&dir)?;
                    stage.v1_leaves.push(dir);
                }
                Membership::Controller(controllers, path) => {
                    let mount = root.join(controllers);
                    if !ours.contains(&membership) && mount.join("cgroup.procs").exists() {
                        stage.v1_joins.push(mount.join(path));
                    }
                }
            }
        }
        if stage.v2.is_none() && stage.v1_leaves.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "in no cgroup2 or systemd hierarchy berth can make a stage's cgroup in",
            ));
        }
        Ok(stage)
    }

    /// The cgroup2 leaf, for `clone3(CLONE_INTO_CGROUP)`.
    pub fn dir(&self) -> Option<BorrowedFd<'_>> {
        self.v2.as_ref().map(|(_, fd)| fd.as_fd())
    }

    /// For `pre_exec`: joins what `clone3` did not (the v1 hierarchies), or,
    /// with `all`, the cgroup2 leaf too (where the kernel has no `clone3`).
    pub fn joiner(&self, all: bool) -> io::Result<Joiner> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        if all {
            dirs.extend(self.v2.iter().map(|(dir, _)| dir.clone()));
        }
        dirs.extend(self.v1_leaves.iter().cloned());
        dirs.extend(self.v1_joins.iter().cloned());
        Ok(Box::new(joiner_of(&dirs)?))
    }

    /// Kills what is left of the stage, waits for it to be gone (at most
    /// `wait`) and removes the stage's leaves.
    pub fn finish(&self, wait: Duration) -> io::Result<()> {
        let deadline = Instant::now() + wait;
        if let Some((dir, _)) = &self.v2 {
            let killed = self.host.write(&dir.join("cgroup.kill"), "1").is_ok();
            loop {
                let populated = std::fs::read_to_string(dir.join("cgroup.events"))
                    .map(|events| events.lines().any(|l| l == "populated 1"))
                    .unwrap_or(false);
                if !populated {
                    break;
                }
                if !killed {
                    self.kill_listed(dir);
                }
                if Instant::now() > deadline {
                    return Err(io::Error::other(format!("processes of {} survived SIGKILL", dir.display())));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for dir in &self.v1_leaves {
            while self.kill_listed(dir) {
                if Instant::now() > deadline {
                    return Err(io::Error::other(format!("processes of {} survived SIGKILL", dir.display())));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for dir in self.v2.iter().map(|(dir, _)| dir).chain(&self.v1_leaves) {
            loop {
                match self.host.rmdir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    // A process just killed may still be leaving it.
                    Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => return Err(super::with_path(e, dir)),
                }
            }
        }
        Ok(())
    }

    /// SIGKILLs every process listed in `dir`; whether there was any.
    fn kill_listed(&self, dir: &Path) -> bool {
        let pids: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        for pid in &pids {
            let _ = self.host.signal(*pid, Some(Signal::SIGKILL));
        }
        !pids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memberships_are_read_per_hierarchy_and_strange_paths_ignored() {
        let text = "9:name=systemd:/berth/m/payload/init.scope\n4:memory:/berth/m\n1:cpu,cpuacct:/\n0::/berth/m/payload/init.scope\n3:name=other:/x\n2:pids:/../escape\n";
        assert_eq!(
            memberships(text),
            vec![
                Membership::Systemd("berth/m/payload/init.scope".into()),
                Membership::Controller("memory".into(), "berth/m".into()),
                Membership::Controller("cpu,cpuacct".into(), "".into()),
                Membership::V2("berth/m/payload/init.scope".into()),
            ]
        );
    }

    /// A cgroup root in a temp dir with `hierarchies` (each with a
    /// `cgroup.procs`) and the directories `dirs` below it.
    fn fake_root(hierarchies: &[&str], dirs: &[&str]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for h in hierarchies {
            std::fs::create_dir_all(root.path().join(h)).unwrap();
            std::fs::write(root.path().join(h).join("cgroup.procs"), "").unwrap();
        }
        for d in dirs {
            std::fs::create_dir_all(root.path().join(d)).unwrap();
        }
        root
    }

    #[test]
    fn on_a_hybrid_host_the_stage_starts_in_a_cgroup2_leaf_and_joins_only_the_v1_controllers_it_must() {
        let root = fake_root(&["unified", "systemd", "memory", "pids", "cpu"], &["unified/berth/m/payload/s-1"]);
        let recorder = Arc::new(crate::host::Recorder::new().with_cgroup_root(root.path()));
        let theirs = "9:name=systemd:/berth/m/payload/init.scope\n8:pids:/berth/m\n4:memory:/berth/m\n1:cpu:/\n0::/berth/m/payload/init.scope\n";
        let ours = "9:name=systemd:/user.slice\n8:pids:/\n4:memory:/\n1:cpu:/\n0::/user.slice\n";
        let stage = StageCgroup::make_from(recorder.clone(), theirs, ours, "s-1").unwrap();
        let calls: Vec<String> = recorder.calls().iter().map(|c| c.to_string()).collect();
        let r = root.path().display();
        assert_eq!(calls, [format!("mkdir {r}/unified/berth/m/payload/s-1")]);
        assert!(stage.dir().is_some());
        assert!(stage.v1_leaves.is_empty(), "no migration into the named systemd hierarchy: {stage:?}");
        assert_eq!(stage.v1_joins, [root.path().join("pids/berth/m"), root.path().join("memory/berth/m")]);
    }

    #[test]
    fn without_cgroup2_the_stage_has_a_leaf_in_the_named_systemd_hierarchy() {
        let root = fake_root(&["systemd", "memory"], &[]);
        let recorder = Arc::new(crate::host::Recorder::new().with_cgroup_root(root.path()));
        let theirs = "9:name=systemd:/berth/m/payload/init.scope\n4:memory:/berth/m\n";
        let stage = StageCgroup::make_from(recorder.clone(), theirs, "9:name=systemd:/\n4:memory:/\n", "s-1").unwrap();
        assert!(stage.dir().is_none());
        assert_eq!(stage.v1_leaves, [root.path().join("systemd/berth/m/payload/s-1")]);
        assert_eq!(stage.v1_joins, [root.path().join("memory/berth/m")]);
        assert!(
            StageCgroup::make_from(recorder, "4:memory:/berth/m\n", "", "s-1").is_err(),
            "nothing to track the stage by"
        );
    }

    #[test]
    fn a_stage_leaf_is_beside_the_init_scope_inside_the_container() {
        assert_eq!(leaf_of(Path::new("berth/m/payload/init.scope"), "s-1"), Path::new("berth/m/payload/s-1"));
        assert_eq!(
            leaf_of(Path::new("machine.slice/u.service/payload"), "s-1"),
            Path::new("machine.slice/u.service/payload/s-1")
        );
    }
}
