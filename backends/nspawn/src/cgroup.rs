//! A cgroup of its own for each container in standalone mode.
//!
//! With `--keep-unit` nspawn creates its `payload` and `supervisor` cgroups
//! inside the cgroup it was started in. Started from the same cgroup, two
//! containers would share `payload/system.slice/...`: each container's
//! systemd would manage the other's processes. So before nspawn starts, it
//! joins `berth/<machine>` in every hierarchy systemd uses (the cgroup2
//! hierarchy, and on hybrid hosts the named `systemd` one too). Teardown
//! kills the whole cgroup and removes its directories, deepest first.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";

/// The per-job cgroup directories of one container.
#[derive(Debug, Clone)]
pub struct JobCgroup {
    dirs: Vec<PathBuf>,
}

fn hierarchies() -> Vec<PathBuf> {
    let root = Path::new(ROOT);
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_owned()];
    }
    ["systemd", "unified"].iter().map(|h| root.join(h)).filter(|h| h.join("cgroup.procs").exists()).collect()
}

impl JobCgroup {
    /// The cgroup of `machine` (nothing is created yet).
    pub fn of(machine: &str) -> JobCgroup {
        JobCgroup { dirs: hierarchies().into_iter().map(|h| h.join("berth").join(machine)).collect() }
    }

    /// Creates the directories.
    pub fn create(&self) -> io::Result<()> {
        if self.dirs.is_empty() {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("no writable cgroup hierarchy under {ROOT}")));
        }
        for dir in &self.dirs {
            std::fs::create_dir_all(dir).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        }
        Ok(())
    }

    /// A function for `pre_exec` that moves the calling process into the cgroup.
    /// It allocates nothing and calls only open(2), write(2) and close(2).
    pub fn joiner(&self) -> io::Result<impl FnMut() -> io::Result<()> + Send + Sync + 'static> {
        let paths: Vec<CString> = self
            .dirs
            .iter()
            .map(|d| CString::new(d.join("cgroup.procs").as_os_str().as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(move || {
            for path in &paths {
                // SAFETY: `path` is a valid NUL-terminated string; open, write
                // and close are async-signal-safe, as pre_exec requires.
                unsafe {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if written != 1 {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
            Ok(())
        })
    }

    /// Pids of every process in the cgroup, in any hierarchy.
    pub fn pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for dir in &self.dirs {
            walk_dirs(dir, &mut |d| {
                if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
                    pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
                }
            });
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Kills everything in the cgroup at once (`cgroup.kill`), where the kernel has it.
    pub fn kill(&self) -> bool {
        self.dirs.iter().any(|dir| std::fs::write(dir.join("cgroup.kill"), "1").is_ok())
    }

    /// Removes the directories, deepest first; those already gone are fine.
    pub fn remove(&self) -> io::Result<()> {
        for dir in &self.dirs {
            let mut all = Vec::new();
            walk_dirs(dir, &mut |d| all.push(d.to_owned()));
            for d in all.iter().rev() {
                match std::fs::remove_dir(d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", d.display()))),
                }
            }
        }
        Ok(())
    }
}

/// Visits `dir` and its subdirectories, parents before children.
fn walk_dirs(dir: &Path, visit: &mut dyn FnMut(&Path)) {
    if !dir.is_dir() {
        return;
    }
    visit(dir);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk_dirs(&entry.path(), visit);
            }
        }
    }
}
