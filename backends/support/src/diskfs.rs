//! A filesystem of bounded size for what a job writes (`disk_max`): a sparse
//! file formatted as ext4, attached to a loop device and mounted `nodev,nosuid`.
//!
//! The file is unlinked once mounted, so nothing is left to remove: its space
//! returns to the host when the filesystem is unmounted (the loop device is
//! set to clear itself then). A job that fills it gets `ENOSPC`; the host's
//! filesystem never fills past `disk_max` because of one job. The file is
//! sparse: a job costs the host only what it really wrote.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use crate::host::{Cmd, Host};
use crate::userns::Range;

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LOOP_MAJOR: u32 = 7;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config` of `LOOP_CONFIGURE`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn err(what: impl std::fmt::Display, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Attaches `file` to a free loop device that detaches itself at its last
/// close; returns the device, open.
fn attach(file: &File) -> io::Result<(PathBuf, OwnedFd)> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")
        .map_err(|e| err("failed to open /dev/loop-control (is the loop module loaded?)", e))?;
    for _ in 0..64 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument; the result is checked.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(err("failed to find a free loop device", io::Error::last_os_error()));
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        if !path.exists() {
            // In a container with a /dev of its own, the kernel's new node is
            // not there: make it (a loop device, nothing else).
            let dev = nix::sys::stat::makedev(u64::from(LOOP_MAJOR), n as u64);
            nix::sys::stat::mknod(
                &path,
                nix::sys::stat::SFlag::S_IFBLK,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
                dev,
            )
            .map_err(|e| err(format!("failed to create {}", path.display()), e.into()))?;
        }
        let device = match OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(&path) {
            Ok(device) => device,
            Err(e) => return Err(err(format!("failed to open {}", path.display()), e)),
        };
        // SAFETY: an all-zero loop_config is valid; the fields that matter are set.
        let mut config: LoopConfig = unsafe { std::mem::zeroed() };
        config.fd = file.as_raw_fd() as u32;
        config.info.flags = LO_FLAGS_AUTOCLEAR;
        // SAFETY: `config` is a valid loop_config that outlives the call.
        let rc = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE, &config as *const LoopConfig) };
        if rc == 0 {
            return Ok((path, device.into()));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(err(format!("failed to attach {}", path.display()), e));
        }
        // Taken by someone else between GET_FREE and CONFIGURE: next one.
    }
    Err(io::Error::other("failed to attach a loop device: every free one was taken first, 64 times"))
}

/// Makes an ext4 filesystem of `size` bytes whose root belongs to `owner`'s
/// root, in a sparse file `scratch` (removed again), and mounts it at
/// `mountpoint` (`nodev,nosuid`). `mountpoint` must exist.
/// mkfs.ext4 and the mount go through `host`; the loop device is attached
/// directly (ioctls on descriptors this process holds).
pub fn mount_bounded(
    host: &dyn Host,
    scratch: &Path,
    size: u64,
    mountpoint: &Path,
    owner: Option<Range>,
) -> io::Result<()> {
    let result = (|| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(scratch)
            .map_err(|e| err(format!("failed to create {}", scratch.display()), e))?;
        file.set_len(size).map_err(|e| err(format!("failed to size {}", scratch.display()), e))?;
        let mut options = "lazy_itable_init=1,lazy_journal_init=1,nodiscard".to_owned();
        if let Some(range) = owner {
            options.push_str(&format!(",root_owner={}:{}", range.base, range.base));
        }
        let mkfs =
            Cmd::new("mkfs.ext4").args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-E", &options]).arg(scratch);
        let out = host.output(&mkfs).map_err(|e| err("failed to run mkfs.ext4 (apt-get install e2fsprogs)", e))?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "mkfs.ext4 {} failed: {}",
                scratch.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let (device, _open) = attach(&file)?;
        let what = device.display().to_string();
        crate::mounts::mount_fs(
            host,
            &what,
            mountpoint,
            "ext4",
            MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOATIME,
            None,
        )
    })();
    // Mounted or not, the file itself is not needed any more.
    let _ = fs::remove_file(scratch);
    result
}

/// Parses a size in bytes from systemd-like syntax: `20G`, `512M`, `1.5T`,
/// plain bytes; `infinity` is `None` (no bound).
pub fn parse_size(text: &str) -> Result<Option<u64>, String> {
    let t = text.trim();
    if t == "infinity" {
        return Ok(None);
    }
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    let factor: u64 = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(format!("{text:?} is not a size (e.g. 20G, 512M, 1.5T or infinity)")),
    };
    let value: f64 =
        number.parse().map_err(|_| format!("{text:?} is not a size (e.g. 20G, 512M, 1.5T or infinity)"))?;
    let bytes = value * factor as f64;
    if !(bytes.is_finite() && bytes >= (64 << 20) as f64 && bytes < (1u64 << 60) as f64) {
        return Err(format!("{text:?}: a disk bound must be at least 64M"));
    }
    Ok(Some(bytes as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_systemds() {
        assert_eq!(parse_size("20G"), Ok(Some(20 << 30)));
        assert_eq!(parse_size("512M"), Ok(Some(512 << 20)));
        assert_eq!(parse_size("1.5T"), Ok(Some(3 << 39)));
        assert_eq!(parse_size("infinity"), Ok(None));
        for bad in ["", "G", "20 gigs", "-1G", "1M", "20GB"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_bounded_filesystem_fills_at_its_size_and_leaves_nothing() {
        let unable = !nix::unistd::Uid::effective().is_root() || !Path::new("/dev/loop-control").exists();
        if !berth_backend_api::testing::prerequisite(unable.then(|| "needs root and /dev/loop-control".to_owned())) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let owner = Range { base: crate::userns::POOL_START };
        mount_bounded(&crate::host::System, &dir.path().join("layer.img"), 64 << 20, &mnt, Some(owner)).unwrap();
        assert!(!dir.path().join("layer.img").exists(), "the backing file is unlinked");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(&mnt).unwrap().uid(), owner.base);
        let big = vec![0u8; 1 << 20];
        let mut file = File::create(mnt.join("fill")).unwrap();
        let mut written = 0u64;
        let full = loop {
            match io::Write::write_all(&mut file, &big) {
                Ok(()) => written += 1 << 20,
                Err(e) => break e,
            }
            assert!(written <= 64 << 20, "wrote past the bound");
        };
        assert_eq!(full.raw_os_error(), Some(libc::ENOSPC), "{full}");
        drop(file);
        crate::mounts::unmount_all(&crate::host::System, &mnt).unwrap();
    }
}
