//! Writing into a job's root filesystem from the host, safely.
//!
//! A job controls its root: it can replace any directory or file with a
//! symbolic link to a host path. The host must never follow such a link when
//! it writes a stage script into the root, or reads something back.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_backend_api::Failure;
use nix::sys::signal::Signal;

use crate::host::Host;
use crate::mounts;

/// The job-log warning of a backend that found no gitlab-runner binary to put into jobs.
pub const GITLAB_RUNNER_MISSING: &str = "WARNING: gitlab-runner is not installed on this host: cache and artifact stages will fail in the job (ask the admin to install it or set settings.gitlab_runner)";

/// Prints prepare's job-log lines for a root made from `image`: the
/// gitlab-runner warning when there is none, then one progress line.
pub fn announce_prepared(image: &crate::image::Image, how: &str, started: std::time::Instant, has_gitlab_runner: bool) {
    if !has_gitlab_runner {
        println!("{GITLAB_RUNNER_MISSING}");
    }
    let generation = image.generation.map(|g| format!(", generation {g}")).unwrap_or_default();
    println!(
        "Prepared a root from image {}{generation} ({how}) in {:.2} s",
        image.name,
        started.elapsed().as_secs_f64()
    );
}

/// Processes running on the job's root `root`: chrooted into it, or (as
/// under bwrap, where /proc/PID/root reads `/`) with their root on its overlay.
pub fn processes_in(host: &dyn Host, root: &Path) -> Vec<i32> {
    let mounted = mounts::mounts_under_on(host, root).iter().any(|point| point == root);
    // Mounted: the overlay has a device of its own, and anything on it is the
    // job's. Not mounted: only the directory itself.
    let target = fs::metadata(root).ok().map(|m| (m.dev(), m.ino()));
    host.processes()
        .into_iter()
        .map(|p| p.pid)
        .filter(|pid| {
            let link = format!("/proc/{pid}/root");
            if fs::read_link(&link).is_ok_and(|r| r.starts_with(root)) {
                return true;
            }
            let (Some((dev, ino)), Ok(meta)) = (target, fs::metadata(&link)) else { return false };
            meta.dev() == dev && (mounted || meta.ino() == ino)
        })
        .collect()
}

/// Takes a job's root down: kills what still runs on it, then unmounts
/// everything under it deepest first (a busy mount is detached as a last
/// resort, with a warning on stderr, the runner's log). Idempotent.
pub fn tear_down(host: &dyn Host, root: &Path) -> Result<(), Failure> {
    let stragglers = processes_in(host, root);
    for pid in &stragglers {
        let _ = host.signal(*pid, Some(Signal::SIGKILL));
    }
    if !crate::proc::wait_gone_on(host, &stragglers, Duration::from_secs(5)) {
        return Err(Failure::system(format!("processes {stragglers:?} in {} survived SIGKILL", root.display())));
    }
    let report = mounts::unmount_all(host, root)
        .map_err(|e| Failure::system_with(format!("failed to unmount the job's root {}", root.display()), e))?;
    for point in &report.detached {
        eprintln!("WARNING: {} was busy; detached it (lazy unmount) so that cleanup could finish", point.display());
    }
    Ok(())
}

/// Creates directory `path` (its parent exists) with `mode`, whatever the
/// umask, owned by host ids `owner` when given (a job's root: what the job
/// sees as its own).
pub fn make_dir(path: &Path, mode: u32, owner: Option<(u32, u32)>) -> Result<(), Failure> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match fs::DirBuilder::new().mode(mode).create(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            return Err(Failure::system_with(format!("failed to create {}", path.display()), e))
        }
        _ => {}
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| Failure::system_with(format!("failed to set the mode of {}", path.display()), e))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .map_err(|e| Failure::system_with(format!("failed to give {} to the job", path.display()), e))?;
    }
    Ok(())
}

/// `root/rel`, created where missing, refusing any component that is not a
/// real directory (a symbolic link planted by the job).
pub fn real_dir(root: &Path, rel: &str) -> io::Result<PathBuf> {
    let mut dir = root.to_path_buf();
    for part in Path::new(rel).components() {
        dir.push(part);
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} in the job's root is not a directory", dir.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(&dir)?,
            Err(e) => return Err(e),
        }
    }
    Ok(dir)
}

/// Writes `bytes` to a fresh file `name` in `root/rel` (mode 0644), replacing
/// whatever the job left under that name without following it.
pub fn place_file(root: &Path, rel: &str, name: &str, bytes: &[u8]) -> io::Result<PathBuf> {
    let path = real_dir(root, rel)?.join(name);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file =
        OpenOptions::new().write(true).create_new(true).mode(0o644).custom_flags(libc::O_NOFOLLOW).open(&path)?;
    file.write_all(bytes)?;
    Ok(path)
}

/// Reads file `path` (at most 4 KiB) that a job could have written or
/// replaced: never through a symbolic link, never blocking on a FIFO, never
/// from a device or socket (opened without blocking, then `fstat`ed: only a
/// regular file is read), never more than 4 KiB.
pub fn read_small(path: &Path) -> io::Result<String> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a regular file (planted by the job?)", path.display()),
        ));
    }
    let mut text = String::new();
    Read::take(file, 4096).read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planted_links_are_neither_followed_nor_used_as_directories() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("run")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("run/berth")).unwrap();
        assert!(place_file(root.path(), "run/berth", "s.sh", b"x").is_err(), "a linked directory is refused");
        std::fs::remove_file(root.path().join("run/berth")).unwrap();
        std::fs::create_dir(root.path().join("run/berth")).unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "host data").unwrap();
        std::os::unix::fs::symlink(&victim, root.path().join("run/berth/s.sh")).unwrap();
        let placed = place_file(root.path(), "run/berth", "s.sh", b"script").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "host data", "the link was replaced, not followed");
        assert_eq!(std::fs::read_to_string(&placed).unwrap(), "script");
        std::os::unix::fs::symlink(&victim, root.path().join("run/berth/rc")).unwrap();
        assert!(read_small(&root.path().join("run/berth/rc")).is_err());
    }

    #[test]
    fn reads_of_job_files_never_block_nor_open_devices() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("rc");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let started = std::time::Instant::now();
        let e = read_small(&fifo).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1), "blocked on a FIFO");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        // A device (a link to one is refused anyway): /dev/zero would never end.
        let e = read_small(Path::new("/dev/zero")).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let big = dir.path().join("big");
        std::fs::write(&big, "7".repeat(100_000)).unwrap();
        assert_eq!(read_small(&big).unwrap().len(), 4096, "bounded");
    }
}
