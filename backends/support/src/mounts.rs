//! Mounting a job's root, and taking every mount under it down again: an
//! overlay of an image, filesystems and private bind mounts inside it, and
//! [`unmount_all`] to undo all of that deepest first at cleanup.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{MntFlags, MsFlags};

use crate::host::{Host, MountCall};

/// A mount failure, naming what was mounted where.
pub fn mount_err(what: &str, target: &Path, e: nix::errno::Errno) -> io::Error {
    io::Error::new(io::Error::from(e).kind(), format!("failed to mount {what} on {}: {e}", target.display()))
}

fn call(source: Option<&Path>, target: &Path, fstype: Option<&str>, flags: MsFlags, data: Option<&str>) -> MountCall {
    MountCall {
        source: source.map(Path::to_owned),
        target: target.to_owned(),
        fstype: fstype.map(str::to_owned),
        flags,
        data: data.map(str::to_owned),
    }
}

/// Changes the flags of mount `target` (a remount, or a propagation change).
fn set_flags(host: &dyn Host, target: &Path, flags: MsFlags) -> nix::Result<()> {
    host.mount(&call(None, target, None, flags, None))
}

/// Mounts `fstype` (`source`) at `target` with `flags` and `data`.
pub fn mount_fs(
    host: &dyn Host,
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> io::Result<()> {
    host.mount(&call(Some(Path::new(source)), target, Some(fstype), flags, data))
        .map_err(|e| mount_err(fstype, target, e))
}

/// Bind-mounts `source` at `target`, read-only unless `writable`, not propagating.
pub fn bind(host: &dyn Host, source: &Path, target: &Path, writable: bool) -> io::Result<()> {
    let what = source.display().to_string();
    host.mount(&call(Some(source), target, None, MsFlags::MS_BIND | MsFlags::MS_REC, None))
        .map_err(|e| mount_err(&what, target, e))?;
    set_flags(host, target, MsFlags::MS_PRIVATE | MsFlags::MS_REC).map_err(|e| mount_err(&what, target, e))?;
    if !writable {
        let flags =
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        set_flags(host, target, flags).map_err(|e| mount_err(&what, target, e))?;
    }
    Ok(())
}

/// Bind-mounts `source` at `target`, not propagating, always `nosuid,nodev`
/// (what a job writes there can never be a set-uid program or a device for
/// the host), read-only unless `writable`.
pub fn bind_guarded(host: &dyn Host, source: &Path, target: &Path, writable: bool) -> io::Result<()> {
    let what = source.display().to_string();
    host.mount(&call(Some(source), target, None, MsFlags::MS_BIND, None)).map_err(|e| mount_err(&what, target, e))?;
    set_flags(host, target, MsFlags::MS_PRIVATE).map_err(|e| mount_err(&what, target, e))?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if !writable {
        flags |= MsFlags::MS_RDONLY;
    }
    set_flags(host, target, flags).map_err(|e| mount_err(&what, target, e))
}

/// [`mount_overlay`] with mount flags (`MS_NODEV`, ...).
pub fn mount_overlay_with(
    host: &dyn Host,
    image_root: &Path,
    upper: &Path,
    work: &Path,
    merged: &Path,
    flags: MsFlags,
) -> io::Result<()> {
    let data = format!("lowerdir={},upperdir={},workdir={}", image_root.display(), upper.display(), work.display());
    mount_fs(host, "overlay", merged, "overlay", flags, Some(&data))?;
    set_flags(host, merged, MsFlags::MS_PRIVATE).map_err(|e| {
        io::Error::new(io::Error::from(e).kind(), format!("failed to make {} private: {e}", merged.display()))
    })
}

/// Mounts a job's copy-on-write root at `merged`: an overlay with the image's
/// root `image_root` as its lower layer and the job's writable layer in `upper`
/// (with overlayfs's scratch directory `work`, on the same filesystem as
/// `upper`), then makes `merged` a private mount, so that mounts below it never
/// propagate to or from the host. The three directories must exist; none of
/// the paths may contain `,` or `:` (overlayfs's option separators).
pub fn mount_overlay(host: &dyn Host, image_root: &Path, upper: &Path, work: &Path, merged: &Path) -> io::Result<()> {
    mount_overlay_with(host, image_root, upper, work, merged, MsFlags::empty())
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

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mount {
    /// The device (`major:minor`).
    pub device: String,
    /// The root of the mount within its filesystem (unescaped).
    pub root: PathBuf,
    /// The mount point (unescaped).
    pub point: PathBuf,
    /// Per-mount options (`rw,nosuid,...`).
    pub options: String,
    /// Optional fields (`shared:N`, `master:N`, ...).
    pub optional: Vec<String>,
    /// The filesystem type.
    pub fstype: String,
    /// The source.
    pub source: String,
    /// Per-superblock options (`lowerdir=...` of an overlay, ...).
    pub super_options: String,
}

/// Parses the text of `/proc/PID/mountinfo`, in its order (mount order);
/// malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            if sep < 6 || fields.len() < sep + 3 {
                return None;
            }
            Some(Mount {
                device: fields[2].to_owned(),
                root: unescape(fields[3]),
                point: unescape(fields[4]),
                options: fields[5].to_owned(),
                optional: fields[6..sep].iter().map(|f| (*f).to_owned()).collect(),
                fstype: fields[sep + 1].to_owned(),
                source: fields[sep + 2].to_owned(),
                super_options: fields.get(sep + 3).copied().unwrap_or("").to_owned(),
            })
        })
        .collect()
}

/// The mounts of this process's mount namespace.
pub fn mountinfo() -> Vec<Mount> {
    std::fs::read_to_string("/proc/self/mountinfo").map(|t| parse_mountinfo(&t)).unwrap_or_default()
}

/// Mount points at or below `root` in this mount namespace, deepest (latest) first.
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    mounts_under_on(&crate::host::System, root)
}

/// [`mounts_under`] among the mounts of `host`.
pub fn mounts_under_on(host: &dyn Host, root: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> =
        host.mounts().into_iter().map(|m| m.point).filter(|point| point.starts_with(root)).collect();
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
pub fn unmount_all(host: &dyn Host, root: &Path) -> io::Result<Unmounted> {
    let mut report = Unmounted::default();
    for _round in 0..3 {
        let points = mounts_under_on(host, root);
        if points.is_empty() {
            return Ok(report);
        }
        for point in points {
            let mut done = false;
            for attempt in 0..5 {
                match host.unmount(&point, MntFlags::UMOUNT_NOFOLLOW) {
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
                host.unmount(&point, MntFlags::MNT_DETACH).map_err(|e| {
                    io::Error::new(io::Error::from(e).kind(), format!("failed to detach {}: {e}", point.display()))
                })?;
                report.detached.push(point);
            }
        }
    }
    let left = mounts_under_on(host, root);
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
    fn mountinfo_is_parsed() {
        let text = "36 35 98:0 /mnt1 /mnt\\040x rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue\n\
                    40 36 0:50 / /merged rw,nodev - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w\n\
                    garbage\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].point, PathBuf::from("/mnt x"));
        assert_eq!(mounts[0].root, PathBuf::from("/mnt1"));
        assert_eq!(mounts[0].device, "98:0");
        assert_eq!(mounts[0].optional, ["master:1", "shared:2"]);
        assert_eq!((mounts[0].fstype.as_str(), mounts[0].source.as_str()), ("ext3", "/dev/root"));
        assert_eq!(mounts[1].super_options, "rw,lowerdir=/l,upperdir=/u,workdir=/w");
        assert!(mounts[1].optional.is_empty());
    }

    #[test]
    fn unmount_all_goes_deepest_first() {
        let host = crate::host::Recorder::new();
        let mount = |point: &str| Mount { point: point.into(), ..Mount::default() };
        host.set_mounts(vec![mount("/"), mount("/job/root"), mount("/job/root/dev"), mount("/job/cache")]);
        unmount_all(&host, Path::new("/job")).unwrap();
        let nofollow = MntFlags::UMOUNT_NOFOLLOW;
        assert_eq!(
            host.calls(),
            ["/job/cache", "/job/root/dev", "/job/root"]
                .map(|p| crate::host::Call::Unmount { target: p.into(), flags: nofollow })
        );
    }

    #[test]
    fn an_overlay_root_is_private_and_unmounted_again() {
        let not_root = !nix::unistd::Uid::effective().is_root();
        if !berth_backend_api::testing::prerequisite(not_root.then(|| "not running as root".to_owned())) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let [image, upper, work, merged] = ["image", "upper", "work", "merged"].map(|d| dir.path().join(d));
        for d in [&image, &upper, &work, &merged] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(image.join("file"), "image").unwrap();
        let host = crate::host::System;
        mount_overlay(&host, &image, &upper, &work, &merged).unwrap();
        assert_eq!(mounts_under(dir.path()), vec![merged.clone()]);
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = info.lines().find(|l| l.split(' ').nth(4) == merged.to_str()).unwrap();
        assert!(!line.contains("shared:"), "not private: {line}");
        std::fs::write(merged.join("file"), "job").unwrap();
        assert_eq!(std::fs::read_to_string(image.join("file")).unwrap(), "image", "the image is never written");
        assert_eq!(std::fs::read_to_string(upper.join("file")).unwrap(), "job");
        assert!(unmount_all(&host, dir.path()).unwrap().detached.is_empty());
        assert!(mounts_under(dir.path()).is_empty());
    }
}
