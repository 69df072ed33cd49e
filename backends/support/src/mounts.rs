//! Mounting a job's root, and taking every mount under it down again: an
//! overlay of an image, filesystems and private bind mounts inside it, and
//! [`unmount_all`] to undo all of that deepest first at cleanup.

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

/// Bind-mounts `source` at `target`, not propagating, always `nosuid,nodev`
/// (what a job writes there can never be a set-uid program or a device for
/// the host), read-only unless `writable`.
pub fn bind_guarded(source: &Path, target: &Path, writable: bool) -> io::Result<()> {
    let what = source.display().to_string();
    mount(Some(source), target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| mount_err(&what, target, e))?;
    mount(None::<&str>, target, None::<&str>, MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(|e| mount_err(&what, target, e))?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if !writable {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(|e| mount_err(&what, target, e))
}

/// [`mount_overlay`] with mount flags (`MS_NODEV`, ...).
pub fn mount_overlay_with(
    image_root: &Path,
    upper: &Path,
    work: &Path,
    merged: &Path,
    flags: MsFlags,
) -> io::Result<()> {
    let data = format!("lowerdir={},upperdir={},workdir={}", image_root.display(), upper.display(), work.display());
    mount_fs("overlay", merged, "overlay", flags, Some(&data))?;
    mount(None::<&str>, merged, None::<&str>, MsFlags::MS_PRIVATE, None::<&str>).map_err(|e| {
        io::Error::new(io::Error::from(e).kind(), format!("failed to make {} private: {e}", merged.display()))
    })
}

/// Mounts a job's copy-on-write root at `merged`: an overlay with the image's
/// root `image_root` as its lower layer and the job's writable layer in `upper`
/// (with overlayfs's scratch directory `work`, on the same filesystem as
/// `upper`), then makes `merged` a private mount, so that mounts below it never
/// propagate to or from the host. The three directories must exist; none of
/// the paths may contain `,` or `:` (overlayfs's option separators).
pub fn mount_overlay(image_root: &Path, upper: &Path, work: &Path, merged: &Path) -> io::Result<()> {
    mount_overlay_with(image_root, upper, work, merged, MsFlags::empty())
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

    #[test]
    fn an_overlay_root_is_private_and_unmounted_again() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: not running as root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let [image, upper, work, merged] = ["image", "upper", "work", "merged"].map(|d| dir.path().join(d));
        for d in [&image, &upper, &work, &merged] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(image.join("file"), "image").unwrap();
        mount_overlay(&image, &upper, &work, &merged).unwrap();
        assert_eq!(mounts_under(dir.path()), vec![merged.clone()]);
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = info.lines().find(|l| l.split(' ').nth(4) == merged.to_str()).unwrap();
        assert!(!line.contains("shared:"), "not private: {line}");
        std::fs::write(merged.join("file"), "job").unwrap();
        assert_eq!(std::fs::read_to_string(image.join("file")).unwrap(), "image", "the image is never written");
        assert_eq!(std::fs::read_to_string(upper.join("file")).unwrap(), "job");
        assert!(unmount_all(dir.path()).unwrap().detached.is_empty());
        assert!(mounts_under(dir.path()).is_empty());
    }
}
