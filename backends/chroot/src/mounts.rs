//! Mounting a job's root, and taking every mount under it down again.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// A mount failure, naming what was mounted where.
pub fn mount_err(what: &str, target: &Path, e: nix::errno::Errno) -> io::Error {
    io::Error::new(io::Error::from(e).kind(), format!("failed to mount {what} on {}: {e}", target.display()))
}

/// Mounts `fstype` (`source`) at `target` with `flags` and `data`.
pub fn mount_fs(source: &str, target: &Path, fstype: &str, flags: MsFlags, data: Option<&str>) -> io::Result<()> {
    mount(Some(source), target, Some(fstype), flags, data).map_err(|e| mount_err(fstype, target, e))
}

/// Bind-mounts `source` at `target`, read-only unless `writable`, not propagating.
pub fn bind(source: &Path, target: &Path, writable: bool) -> io::Result<()> {
    let what = source.display().to_string();
    mount(Some(source), target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
        .map_err(|e| mount_err(&what, target, e))?;
    mount(None::<&str>, target, None::<&str>, MsFlags::MS_PRIVATE | MsFlags::MS_REC, None::<&str>)
        .map_err(|e| mount_err(&what, target, e))?;
    if !writable {
        let flags =
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(|e| mount_err(&what, target, e))?;
    }
    Ok(())
}

/// Decodes the octal escapes (`\040`) of a path in /proc/self/mountinfo.
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            out.push((bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

/// Mount points at or below `root` in this mount namespace, deepest (latest) first.
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    let mut points: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape)
        .filter(|point| point.starts_with(root))
        .collect();
    // Later mounts stack on earlier ones: undo them in reverse order.
    points.reverse();
    points
}

/// What unmounting had to do.
#[derive(Debug, Default)]
pub struct Unmounted {
    /// Mounts that were busy and were detached (lazily unmounted) instead.
    pub detached: Vec<PathBuf>,
}

/// Unmounts everything at or below `root`, deepest first. A mount still busy
/// after a few tries is detached as a last resort, and reported.
pub fn unmount_all(root: &Path) -> io::Result<Unmounted> {
    let mut report = Unmounted::default();
    for _round in 0..3 {
        let points = mounts_under(root);
        if points.is_empty() {
            return Ok(report);
        }
        for point in points {
            let mut done = false;
            for attempt in 0..5 {
                match umount2(&point, MntFlags::UMOUNT_NOFOLLOW) {
                    Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {
                        done = true;
                        break;
                    }
                    Err(nix::errno::Errno::EBUSY) => std::thread::sleep(Duration::from_millis(20 << attempt)),
                    Err(e) => {
                        return Err(io::Error::new(
                            io::Error::from(e).kind(),
                            format!("failed to unmount {}: {e}", point.display()),
                        ))
                    }
                }
            }
            if !done {
                umount2(&point, MntFlags::MNT_DETACH).map_err(|e| {
                    io::Error::new(io::Error::from(e).kind(), format!("failed to detach {}: {e}", point.display()))
                })?;
                report.detached.push(point);
            }
        }
    }
    let left = mounts_under(root);
    if left.is_empty() {
        Ok(report)
    } else {
        Err(io::Error::other(format!(
            "still mounted: {}",
            left.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape("/a\\040b/c"), PathBuf::from("/a b/c"));
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape("/x\\"), PathBuf::from("/x\\"));
    }
}
