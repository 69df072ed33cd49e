//! How much memory a job's cgroup holds, for `berth ps`: cgroup2's
//! `memory.current`, or on a v1 or hybrid host the `memory` hierarchy's
//! `memory.usage_in_bytes`.

use std::path::{Component, Path, PathBuf};

use super::stage::{memberships, Membership};
use super::{unified, JobCgroup};
use crate::host::{Host, System};

/// The directory of the cgroup that accounts the memory of the container
/// whose init is `pid`: its cgroup in the v1 `memory` hierarchy, else its
/// cgroup2 one; the cgroup that holds the init's `init.scope` (the whole
/// container, its stages included), not the scope alone.
pub fn dir_of(pid: i32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    dir_from(&System.cgroup_root(), &text)
}

/// [`dir_of`] from the text of `/proc/PID/cgroup`, under cgroup root `root`.
fn dir_from(root: &Path, text: &str) -> Option<PathBuf> {
    let container = |path: &Path| match path.file_name() {
        Some(name) if name == "init.scope" => path.parent().unwrap_or(path).to_owned(),
        _ => path.to_owned(),
    };
    let memberships = memberships(text);
    let v1 = memberships.iter().find_map(|m| match m {
        Membership::Controller(controllers, path) if controllers.split(',').any(|c| c == "memory") => {
            Some(root.join(controllers).join(container(path)))
        }
        _ => None,
    });
    let v2 = || {
        memberships.iter().find_map(|m| match m {
            Membership::V2(path) if unified(root) => Some(root.join(container(path))),
            _ => None,
        })
    };
    v1.or_else(v2)
}

/// The bytes of memory cgroup `dir` holds now (`memory.current`, or
/// `memory.usage_in_bytes` in the v1 hierarchy); `None` when it is gone,
/// accounts no memory, or is not a directory under the host's cgroup root.
pub fn usage(dir: &Path) -> Option<u64> {
    usage_under(&System.cgroup_root(), dir)
}

fn usage_under(root: &Path, dir: &Path) -> Option<u64> {
    let below = dir.strip_prefix(root).ok()?;
    if below.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    ["memory.current", "memory.usage_in_bytes"]
        .iter()
        .find_map(|file| std::fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok())
}

impl JobCgroup {
    /// The directory of the cgroup that accounts the job's memory (see
    /// [`usage`]), if it has one.
    pub fn memory_dir(&self) -> Option<PathBuf> {
        let root = self.host.cgroup_root();
        let hierarchy = if unified(&root) { root } else { root.join("memory") };
        Some(hierarchy.join("berth").join(&self.machine)).filter(|dir| dir.is_dir())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_is_accounted_in_its_memory_hierarchy_or_its_cgroup2_cgroup() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        // Hybrid: the v1 memory hierarchy, whatever cgroup2 says.
        let hybrid = "12:memory:/berth/m\n1:name=systemd:/berth/m/payload/init.scope\n0::/berth/m/payload/init.scope\n";
        assert_eq!(dir_from(root, hybrid), Some(root.join("memory/berth/m")));
        assert_eq!(dir_from(root, "4:cpu,memory:/x/init.scope\n"), Some(root.join("cpu,memory/x")));
        // Hybrid without a memory controller: nothing accounts it.
        assert_eq!(dir_from(root, "0::/berth/m/payload/init.scope\n"), None);
        // cgroup2 only: the cgroup holding the init's scope.
        std::fs::write(root.join("cgroup.controllers"), "memory pids").unwrap();
        let v2 = "0::/machine.slice/berth-r-1.service/payload/init.scope\n";
        assert_eq!(dir_from(root, v2), Some(root.join("machine.slice/berth-r-1.service/payload")));
        assert_eq!(dir_from(root, "0::/berth/m\n"), Some(root.join("berth/m")));
        assert_eq!(dir_from(root, "0::/../../etc\n"), None, "no path out of the hierarchy");
    }

    #[test]
    fn usage_is_read_from_either_files_and_only_under_the_root() {
        let root = tempfile::tempdir().unwrap();
        let (v2, v1) = (root.path().join("a"), root.path().join("memory/b"));
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v2.join("memory.current"), "148897792\n").unwrap();
        std::fs::write(v1.join("memory.usage_in_bytes"), "4096\n").unwrap();
        assert_eq!(usage_under(root.path(), &v2), Some(148_897_792));
        assert_eq!(usage_under(root.path(), &v1), Some(4096));
        assert_eq!(usage_under(root.path(), &root.path().join("gone")), None);
        assert_eq!(usage_under(root.path(), &root.path().join("memory/../a")), None);
        assert_eq!(usage_under(&root.path().join("memory"), &v2), None, "outside the root");
    }
}
