//! Removing a directory tree a job wrote, whatever its shape.
//!
//! A job controls what it leaves behind: directories thousands of levels deep,
//! hundreds of thousands of entries wide, names that are not UTF-8, symbolic
//! links to host paths, entries made immutable or append-only. [`remove_tree`]
//! removes all of it with a bounded number of open descriptors (a recursive
//! removal, `std::fs::remove_dir_all` included, keeps one per level and fails
//! with "Too many open files" under the usual limit of 1024), never follows a
//! symbolic link, never crosses into another filesystem, and clears the
//! immutable and append-only attributes of entries inside the tree that stand
//! in its way. It works relative to open directories (`openat`, `unlinkat`),
//! climbing back through `..` only after checking it leads to the directory
//! it descended from.

use std::ffi::{CStr, CString, OsStr};
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

/// Directory descriptors held open at most (plus one or two briefly).
pub const MAX_OPEN_DIRS: usize = 16;

/// Names read from a directory per pass.
const BATCH: usize = 512;

/// `FS_IMMUTABLE_FL` and `FS_APPEND_FL` of `linux/fs.h`.
const STUCK_FLAGS: libc::c_int = 0x10 | 0x20;

nix::ioctl_read_bad!(get_flags, nix::request_code_read!(b'f', 1, std::mem::size_of::<libc::c_long>()), libc::c_int);
nix::ioctl_write_ptr_bad!(
    set_flags,
    nix::request_code_write!(b'f', 2, std::mem::size_of::<libc::c_long>()),
    libc::c_int
);

/// Removes `path` and everything under it; a missing `path` is not an error.
///
/// Safe on trees a job wrote: at most [`MAX_OPEN_DIRS`] directory
/// descriptors open at any depth, symbolic links never followed, no mount
/// point crossed, immutable and append-only attributes of entries inside the
/// tree cleared when they stand in the way. An error names the entry that could not be removed (relative to `path`); what was
/// removed before it stays removed, so calling again continues the work.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return fs::remove_file(path);
    }
    let root = open_dir_at(None, path.as_os_str())?;
    let stat = fstat(root.as_fd())?;
    let mut walk = Walk { stack: vec![Level::new(root, CString::default(), stat.st_dev, stat.st_ino)], lowest_open: 0 };
    walk.run()?;
    match fs::remove_dir(path) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            // The tree's own root may be marked too; its parent is not ours to change.
            if let Ok(root) = open_dir_at(None, path.as_os_str()) {
                clear_stuck_flags(root.as_fd());
            }
            fs::remove_dir(path)
        }
        other => other,
    }
}

/// One directory on the way down.
struct Level {
    /// Its descriptor, while it is among the [`MAX_OPEN_DIRS`] deepest.
    dir: Option<Dir>,
    /// Its name in its parent (empty for the root).
    name: CString,
    dev: u64,
    ino: u64,
    /// Names read but not yet removed, with their type when the directory says it.
    pending: Vec<(CString, Option<Type>)>,
}

impl Level {
    fn new(dir: Dir, name: CString, dev: u64, ino: u64) -> Self {
        Level { dir: Some(dir), name, dev, ino, pending: Vec::new() }
    }
}

struct Walk {
    stack: Vec<Level>,
    /// Index of the shallowest level whose descriptor is open.
    lowest_open: usize,
}

impl Walk {
    fn run(&mut self) -> io::Result<()> {
        while let Some(top) = self.stack.last_mut() {
            if top.pending.is_empty() {
                let dir = top.dir.as_mut().expect("the deepest level is open");
                match read_batch(dir) {
                    Ok(names) => top.pending = names,
                    Err(e) => return Err(self.error("read", None, e)),
                }
                if self.stack.last().is_some_and(|top| top.pending.is_empty()) {
                    if self.stack.len() == 1 {
                        return Ok(());
                    }
                    self.ascend()?;
                }
                continue;
            }
            let (name, kind) = top.pending.pop().expect("not empty");
            self.remove_entry(name, kind)?;
        }
        Ok(())
    }

    /// The deepest directory, open.
    fn top_fd(&self) -> BorrowedFd<'_> {
        self.stack.last().and_then(|l| l.dir.as_ref()).expect("the deepest level is open").as_fd()
    }

    /// Removes entry `name` of the deepest directory, or descends into it.
    fn remove_entry(&mut self, name: CString, kind: Option<Type>) -> io::Result<()> {
        if kind != Some(Type::Directory) {
            match unlink(self.top_fd(), &name, UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => return Ok(()),
                Err(Errno::EISDIR) => {}
                Err(e) => return Err(self.error("remove", Some(&name), e)),
            }
        }
        let child = match openat(self.top_fd(), name.as_c_str(), dir_flags(), Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(()),
            // Not a directory after all (the type was a guess, or it changed).
            Err(Errno::ENOTDIR | Errno::ELOOP) => {
                return match unlink(self.top_fd(), &name, UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => Ok(()),
                    Err(e) => Err(self.error("remove", Some(&name), e)),
                }
            }
            Err(e) => return Err(self.error("open", Some(&name), e)),
        };
        let stat = fstat(child.as_fd()).map_err(|e| self.error("inspect", Some(&name), e))?;
        let top = self.stack.last().expect("a level");
        if stat.st_dev != top.dev {
            return Err(self.error_msg(
                Some(&name),
                "is on another filesystem (a mount point): unmount it, then remove the tree again",
            ));
        }
        let dir = Dir::from_fd(child).map_err(|e| self.error("read", Some(&name), e))?;
        self.stack.push(Level::new(dir, name, stat.st_dev, stat.st_ino));
        let open = self.stack.len() - self.lowest_open;
        if open > MAX_OPEN_DIRS {
            self.stack[self.lowest_open].dir = None;
            self.lowest_open += 1;
        }
        Ok(())
    }

    /// Leaves the deepest directory, now empty, and removes it.
    fn ascend(&mut self) -> io::Result<()> {
        let parent_index = self.stack.len() - 2;
        if self.stack[parent_index].dir.is_none() {
            let child = self.stack.last().and_then(|l| l.dir.as_ref()).expect("the deepest level is open");
            let fd =
                openat(child.as_fd(), c"..", dir_flags(), Mode::empty()).map_err(|e| self.error("open", None, e))?;
            let stat = fstat(fd.as_fd()).map_err(|e| self.error("inspect", None, e))?;
            let parent = &self.stack[parent_index];
            if (stat.st_dev, stat.st_ino) != (parent.dev, parent.ino) {
                return Err(self.error_msg(None, "was moved while being removed"));
            }
            let dir = Dir::from_fd(fd).map_err(|e| self.error("read", None, e))?;
            self.stack[parent_index].dir = Some(dir);
            self.lowest_open = parent_index;
        }
        let done = self.stack.pop().expect("a level");
        drop(done.dir);
        match unlink(self.top_fd(), &done.name, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(self.error("remove", Some(&done.name), e)),
        }
    }

    /// The path of entry `name` of the deepest directory, relative to the root.
    fn relative(&self, name: Option<&CStr>) -> String {
        let mut parts: Vec<String> = self.stack[1..].iter().map(|l| show(&l.name)).collect();
        parts.extend(name.map(show));
        if parts.len() > 8 {
            let hidden = parts.len() - 6;
            parts.splice(2..parts.len() - 4, [format!("...({hidden} levels)...")]);
        }
        if parts.is_empty() {
            ".".to_owned()
        } else {
            parts.join("/")
        }
    }

    fn error(&self, action: &str, name: Option<&CStr>, errno: Errno) -> io::Error {
        let source = io::Error::from(errno);
        io::Error::new(source.kind(), format!("failed to {action} {}: {source}", self.relative(name)))
    }

    fn error_msg(&self, name: Option<&CStr>, what: &str) -> io::Error {
        io::Error::other(format!("{} {what}", self.relative(name)))
    }
}

/// A name for messages (lossy).
fn show(name: &CStr) -> String {
    String::from_utf8_lossy(name.to_bytes()).into_owned()
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK
}

fn open_dir_at(dir: Option<BorrowedFd<'_>>, path: &OsStr) -> io::Result<Dir> {
    let fd: OwnedFd = match dir {
        Some(dir) => openat(dir, path.as_bytes(), dir_flags(), Mode::empty())?,
        None => nix::fcntl::open(path.as_bytes(), dir_flags(), Mode::empty())?,
    };
    Ok(Dir::from_fd(fd)?)
}

/// Up to [`BATCH`] names of `dir` (not `.` and `..`), read from its start.
fn read_batch(dir: &mut Dir) -> Result<Vec<(CString, Option<Type>)>, Errno> {
    let mut names = Vec::new();
    // The iterator rewinds the directory when dropped, so every pass starts
    // over: what was removed is gone, what is left comes again.
    for entry in dir.iter() {
        let entry = entry?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        names.push((name.to_owned(), entry.file_type()));
        if names.len() == BATCH {
            break;
        }
    }
    Ok(names)
}

/// `unlinkat`, clearing the immutable and append-only attributes of the
/// entry and of its directory when they forbid it (EPERM), then trying again.
fn unlink(dir: BorrowedFd<'_>, name: &CStr, how: UnlinkatFlags) -> Result<(), Errno> {
    let remove = || {
        unlinkat(
            dir,
            name,
            if matches!(how, UnlinkatFlags::RemoveDir) { UnlinkatFlags::RemoveDir } else { UnlinkatFlags::NoRemoveDir },
        )
    };
    match remove() {
        Err(Errno::EPERM) => {
            let mut cleared = clear_stuck_flags(dir);
            // Only regular files and directories carry these attributes, and
            // opening anything else (a device) could have effects.
            let is_plain = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok_and(|s| {
                let kind = SFlag::from_bits_truncate(s.st_mode) & SFlag::S_IFMT;
                kind == SFlag::S_IFREG || kind == SFlag::S_IFDIR
            });
            if is_plain {
                let flags =
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
                if let Ok(fd) = openat(dir, name, flags, Mode::empty()) {
                    cleared |= clear_stuck_flags(fd.as_fd());
                }
            }
            if cleared {
                remove()
            } else {
                Err(Errno::EPERM)
            }
        }
        other => other,
    }
}

/// Clears the immutable and append-only attributes of the open file `fd`;
/// whether there were any to clear.
fn clear_stuck_flags(fd: BorrowedFd<'_>) -> bool {
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int to the valid, exclusively
    // borrowed `flags`; `fd` is an open descriptor for the whole call.
    if unsafe { get_flags(fd.as_raw_fd(), &mut flags) }.is_err() || flags & STUCK_FLAGS == 0 {
        return false;
    }
    let cleared = flags & !STUCK_FLAGS;
    // SAFETY: FS_IOC_SETFLAGS reads one int from the valid `cleared`; `fd` is
    // an open descriptor for the whole call.
    unsafe { set_flags(fd.as_raw_fd(), &cleared) }.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn removes_odd_names_and_wide_directories_without_following_links() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), "host file").unwrap();
        let tree = tmp.path().join("tree");
        fs::create_dir_all(tree.join("wide")).unwrap();
        for i in 0..(BATCH * 2 + 7) {
            fs::write(tree.join("wide").join(format!("f{i}")), "").unwrap();
        }
        for i in 0..40 {
            fs::create_dir_all(tree.join("wide").join(format!("d{i}/x/y"))).unwrap();
        }
        let odd = OsStr::from_bytes(b"-rf \n\xff\xfe 'q' \\ $(x)");
        fs::create_dir(tree.join(odd)).unwrap();
        fs::write(tree.join(odd).join(odd), "").unwrap();
        symlink(&outside, tree.join("link-to-host")).unwrap();
        symlink(&outside, tree.join(odd).join("link")).unwrap();
        let locked = tree.join("locked");
        fs::create_dir(&locked).unwrap();
        fs::write(locked.join("f"), "").unwrap();
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
        nix::unistd::mkfifo(&tree.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();

        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
        assert_eq!(fs::read_to_string(outside.join("keep")).unwrap(), "host file", "links are not followed");
        remove_tree(&tree).unwrap();
        let file = tmp.path().join("plain");
        fs::write(&file, "").unwrap();
        remove_tree(&file).unwrap();
        assert!(!file.exists());
    }

    #[test]
    fn clears_immutable_and_append_only_attributes_inside_the_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        fs::create_dir_all(tree.join("sub")).unwrap();
        fs::write(tree.join("sub/immutable"), "").unwrap();
        fs::write(tree.join("sub/append"), "").unwrap();
        let set = |path: &Path, flag: libc::c_int| -> bool {
            let file = fs::File::open(path).unwrap();
            let mut flags: libc::c_int = 0;
            // SAFETY: as in clear_stuck_flags.
            if unsafe { get_flags(file.as_raw_fd(), &mut flags) }.is_err() {
                return false;
            }
            flags |= flag;
            // SAFETY: as in clear_stuck_flags.
            unsafe { set_flags(file.as_raw_fd(), &flags) }.is_ok()
        };
        if !(set(&tree.join("sub/immutable"), 0x10)
            && set(&tree.join("sub/append"), 0x20)
            && set(&tree.join("sub"), 0x10))
        {
            let missing = "cannot set file attributes here (needs root with CAP_LINUX_IMMUTABLE)";
            assert!(!crate::testing::prerequisite(Some(missing.into())));
            return;
        }
        assert!(fs::remove_dir_all(&tree).is_err(), "the attributes are in force");
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
    }

    #[test]
    fn refuses_to_cross_into_another_filesystem() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        let point = tree.join("a/mnt");
        fs::create_dir_all(&point).unwrap();
        let mounted =
            nix::mount::mount(Some("tmpfs"), &point, Some("tmpfs"), nix::mount::MsFlags::empty(), None::<&str>);
        if !crate::testing::prerequisite(mounted.err().map(|e| format!("cannot mount a tmpfs here: {e}"))) {
            return;
        }
        fs::write(point.join("on-tmpfs"), "").unwrap();
        let err = remove_tree(&tree).unwrap_err();
        assert!(err.to_string().contains("a/mnt is on another filesystem"), "{err}");
        assert!(point.join("on-tmpfs").exists());
        nix::mount::umount(&point).unwrap();
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
    }
}
