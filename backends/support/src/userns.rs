//! Root in a job is not root on the host: a host uid/gid range of its own for
//! every job, and idmapped mounts that show shared, unchanged files (an
//! image, a cache) to the job as if that range owned them.
//!
//! - [`Allocator`] hands out ranges of [`RANGE_SIZE`] ids from a pool no
//!   other software on a Debian host uses (above systemd's container range,
//!   below its foreign range), one per live job and never two jobs at once:
//!   [`crate::claims`] under `/run/berth/userns`, owned by the job's state
//!   directory; cleanup releases a range and `reap` reclaims those whose job
//!   is gone.
//! - [`UserNs`] is a user namespace mapping `0..RANGE_SIZE` to a range,
//!   held by a descriptor, the way idmapped mounts name their mapping.
//! - [`mount_idmapped`] clones a directory (`open_tree`), attaches the
//!   mapping (`mount_setattr(MOUNT_ATTR_IDMAP)`) and mounts it (`move_mount`):
//!   the image's root-owned files appear owned by the job's root, and what
//!   the job writes through such a mount is written as the job's ids.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::claims::Claims;

/// How many uids (and gids) a job gets: 0..65535 inside, like a whole system.
pub const RANGE_SIZE: u32 = 65536;
/// The first host uid of the pool: 0x70000000, just above systemd's container
/// range (524288..1879048191, which `systemd-nspawn --private-users=pick` uses).
pub const POOL_START: u32 = 0x7000_0000;
/// How many ranges the pool holds: up to 0x7FFDFFFF, below systemd's foreign
/// range (0x7FFE0000) and the 16-bit-unsafe top.
pub const POOL_SLOTS: u32 = 4094;

/// A job's host uid/gid range: inside id `n` is host id `base + n`, for `n < RANGE_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Range {
    /// The host id of the job's root.
    pub base: u32,
}

impl Range {
    /// The `--private-users=` value of systemd-nspawn: `BASE:SIZE`.
    pub fn nspawn_arg(&self) -> String {
        format!("{}:{RANGE_SIZE}", self.base)
    }

    /// The lines of `/proc/PID/uid_map` (and `gid_map`) of a namespace with this range.
    pub fn map(&self) -> String {
        format!("0 {} {RANGE_SIZE}\n", self.base)
    }

    /// Whether host id `id` is in the range.
    pub fn contains(&self, id: u32) -> bool {
        id >= self.base && id - self.base < RANGE_SIZE
    }
}

/// The host-wide register of ranges (claims named by their base).
#[derive(Debug, Clone)]
pub struct Allocator {
    claims: Claims,
}

impl Default for Allocator {
    fn default() -> Self {
        Allocator::host()
    }
}

/// FNV-1a: where to start looking, so that jobs rarely probe each other's slots.
fn spread(owner: &Path) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in owner.as_os_str().as_bytes() {
        hash = (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193);
    }
    hash % POOL_SLOTS
}

impl Allocator {
    /// The register every berth process of this host shares.
    pub fn host() -> Allocator {
        Allocator { claims: Claims::host("userns") }
    }

    /// A register in `dir` (tests).
    pub fn in_dir(dir: impl Into<PathBuf>) -> Allocator {
        Allocator { claims: Claims::in_dir(dir) }
    }

    /// Whether `owner` holds `range`.
    pub fn holds(&self, range: Range, owner: &Path) -> bool {
        self.claims.owner(&range.base.to_string()).as_deref() == Some(owner)
    }

    /// A range no one holds, now `owner`'s (a job's state directory).
    pub fn allocate(&self, owner: &Path) -> io::Result<Range> {
        let start = spread(owner);
        for i in 0..POOL_SLOTS {
            let range = Range { base: POOL_START + ((start + i) % POOL_SLOTS) * RANGE_SIZE };
            let name = range.base.to_string();
            if self.claims.owner(&name).is_none() && self.claims.claim(&name, owner)? {
                return Ok(range);
            }
        }
        Err(io::Error::other(format!(
            "all {POOL_SLOTS} uid ranges of berth's pool are taken (`berth reap` reclaims those of finished jobs)"
        )))
    }

    /// Releases `range` if `owner` holds it.
    pub fn release(&self, range: Range, owner: &Path) -> io::Result<()> {
        self.claims.release(&range.base.to_string(), owner)
    }

    /// Gives `range`, held by `from`, to `to` ([`Claims::transfer`]).
    pub fn transfer(&self, range: Range, from: &Path, to: &Path) -> io::Result<bool> {
        self.claims.transfer(&range.base.to_string(), from, to)
    }

    /// Releases every range `owner` holds (one recorded or not: a prepare
    /// killed between allocating and recording leaves none behind).
    pub fn release_all(&self, owner: &Path) -> io::Result<()> {
        for (name, held_by) in self.claims.list("") {
            if held_by == owner {
                self.claims.release(&name, owner)?;
            }
        }
        Ok(())
    }

    /// Every taken range with its owner.
    pub fn taken(&self) -> Vec<(Range, PathBuf)> {
        let mut taken: Vec<(Range, PathBuf)> = self
            .claims
            .list("")
            .into_iter()
            .filter_map(|(name, owner)| Some((Range { base: name.parse().ok()? }, owner)))
            .collect();
        taken.sort_by_key(|(r, _)| r.base);
        taken
    }

    /// Releases the ranges of owners under `jobs_dir` that no longer exist
    /// (their job's state is gone); says what it released (`dry_run`: what
    /// it would release, releasing nothing).
    pub fn reclaim(&self, jobs_dir: &Path, dry_run: bool) -> Vec<String> {
        let mut released = Vec::new();
        for (name, owner) in self.claims.orphans("", jobs_dir) {
            if dry_run || self.claims.release(&name, &owner).is_ok() {
                released.push(format!("uid range {name} of {} (its job is gone)", owner.display()));
            }
        }
        released
    }
}

/// A user namespace mapping ids `0..RANGE_SIZE` to a [`Range`], held open.
#[derive(Debug)]
pub struct UserNs {
    fd: OwnedFd,
}

fn last_os_error(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl UserNs {
    /// A new user namespace with `range`'s mapping.
    ///
    /// A child process unshares a user namespace and waits; this process
    /// writes its maps (allowed to a parent privileged over the namespace),
    /// opens `/proc/CHILD/ns/user`, and kills the child.
    pub fn new(range: Range) -> io::Result<UserNs> {
        UserNs::create(range, None)
    }

    /// A new user namespace with `range`'s mapping, owned by host uid and
    /// gid `owner` (an id of the range): a process with that uid has every
    /// capability in it, and may enter it without privileges on the host
    /// (an unprivileged bubblewrap's `--userns`).
    pub fn new_owned_by(range: Range, owner: u32) -> io::Result<UserNs> {
        if !range.contains(owner) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("uid {owner} is not in the job's range")));
        }
        UserNs::create(range, Some(owner))
    }

    /// Keeps the namespace alive without a process: a bind mount of it on
    /// `file` (an existing, empty regular file), which [`UserNs::open`] opens again.
    pub fn pin(&self, file: &Path) -> io::Result<()> {
        let source = PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()));
        nix::mount::mount(Some(&source), file, None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("failed to pin the job's user namespace on {}: {e}", file.display()),
            )
        })
    }

    /// The namespace pinned on `file` by [`UserNs::pin`].
    pub fn open(file: &Path) -> io::Result<UserNs> {
        let fd = fs::File::open(file).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", file.display())))?;
        Ok(UserNs { fd: fd.into() })
    }

    /// The namespace's descriptor.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    fn create(range: Range, owner: Option<u32>) -> io::Result<UserNs> {
        let owner = owner.map(|id| id as libc::uid_t).unwrap_or(libc::uid_t::MAX);
        let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
        let (ready_r, ready_w) = nix::unistd::pipe2(cloexec).map_err(io::Error::from)?;
        // SAFETY: the child calls only async-signal-safe functions (setgroups,
        // setresgid, setresuid, unshare, write, pause) until it is killed, as
        // fork in a possibly multi-threaded process requires.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(last_os_error("fork"));
        }
        if pid == 0 {
            // SAFETY: async-signal-safe calls on descriptors this process owns.
            unsafe {
                // The namespace belongs to the uid that creates it.
                let owned = owner == libc::uid_t::MAX
                    || (libc::setgroups(0, std::ptr::null()) == 0
                        && libc::setresgid(owner, owner, owner) == 0
                        && libc::setresuid(owner, owner, owner) == 0);
                let ok: u8 = if owned && libc::unshare(libc::CLONE_NEWUSER) == 0 { 1 } else { 0 };
                libc::write(ready_w.as_raw_fd(), (&ok as *const u8).cast(), 1);
                // Held until the parent has what it needs, then killed: never
                // waiting on a descriptor, which another thread's child could
                // hold open too.
                loop {
                    libc::pause();
                }
            }
        }
        drop(ready_w);
        let result = (|| {
            let mut ok = [0u8];
            let n = nix::unistd::read(&ready_r, &mut ok).map_err(io::Error::from)?;
            if n != 1 || ok[0] != 1 {
                return Err(io::Error::other(
                    "failed to create a user namespace (unshare(CLONE_NEWUSER) was refused: are user namespaces disabled, e.g. by sysctl user.max_user_namespaces = 0?)",
                ));
            }
            for file in ["uid_map", "gid_map"] {
                let path = format!("/proc/{pid}/{file}");
                fs::write(&path, range.map()).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
            }
            let path = CString::new(format!("/proc/{pid}/ns/user")).map_err(io::Error::other)?;
            // SAFETY: a valid NUL-terminated path; the result is checked.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(last_os_error("open /proc/PID/ns/user"));
            }
            // SAFETY: `fd` was just opened and is owned by nothing else.
            Ok(UserNs { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
        })();
        // The child forked above: killed and reaped.
        let child = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(child, None);
        result
    }
}

/// Extra mount attributes for [`mount_idmapped`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Attrs {
    /// Read-only.
    pub read_only: bool,
    /// No set-uid/set-gid execution.
    pub nosuid: bool,
    /// No device nodes.
    pub nodev: bool,
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Mounts a clone of directory `source` (and the mounts under it) at
/// `target`, with ids mapped through `userns` (host id `base + n` shows as
/// `n`, and is written as such) and `attrs`. `target` must exist.
pub fn mount_idmapped(source: &Path, target: &Path, userns: &UserNs, attrs: Attrs) -> io::Result<()> {
    let tree = clone_idmapped(source, userns.fd(), attrs)?;
    let target_c = cstring(target)?;
    // SAFETY: `tree` is a detached mount; `target_c` a valid path.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target_c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!(
                "failed to mount an idmapped clone of {} on {} (move_mount): {e}",
                source.display(),
                target.display()
            ),
        ));
    }
    Ok(())
}

/// A detached clone of directory `source` (and the mounts under it) with ids
/// mapped through the user namespace `userns` and `attrs`
/// (`open_tree(OPEN_TREE_CLONE)` + `mount_setattr(MOUNT_ATTR_IDMAP)`): what
/// [`mount_idmapped`] mounts, or [`attach_in`] moves into another mount namespace.
pub fn clone_idmapped(source: &Path, userns: std::os::fd::BorrowedFd<'_>, attrs: Attrs) -> io::Result<OwnedFd> {
    clone_with(source, Some(userns), attrs)
}

/// [`clone_idmapped`] without a mapping (a runner without `private_users`).
pub fn clone_tree(source: &Path, attrs: Attrs) -> io::Result<OwnedFd> {
    clone_with(source, None, attrs)
}

fn clone_with(source: &Path, userns: Option<std::os::fd::BorrowedFd<'_>>, attrs: Attrs) -> io::Result<OwnedFd> {
    let what = |e: io::Error, step: &str| {
        io::Error::new(e.kind(), format!("failed to make an idmapped clone of {} ({step}): {e}", source.display()))
    };
    let source_c = cstring(source)?;
    // SAFETY: a valid path; the result is checked and owned below.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            source_c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | AT_RECURSIVE,
        )
    };
    if tree < 0 {
        return Err(what(io::Error::last_os_error(), "open_tree"));
    }
    // SAFETY: open_tree returned a new descriptor that nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
    let mut set = if userns.is_some() { MOUNT_ATTR_IDMAP } else { 0 };
    for (wanted, flag) in
        [(attrs.read_only, MOUNT_ATTR_RDONLY), (attrs.nosuid, MOUNT_ATTR_NOSUID), (attrs.nodev, MOUNT_ATTR_NODEV)]
    {
        if wanted {
            set |= flag;
        }
    }
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.map_or(0, |fd| fd.as_raw_fd() as u64),
    };
    // SAFETY: `tree` is a detached mount; `attr` is a valid mount_attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(what(
            io::Error::last_os_error(),
            "mount_setattr: does this kernel and filesystem support idmapped mounts?",
        ));
    }
    Ok(tree)
}

const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;

/// What [`attach_in`] does in the container's namespaces.
#[derive(Debug)]
pub struct Adoption<'a> {
    /// The container's mount namespace (`/proc/PID/ns/mnt`).
    pub mnt: std::os::fd::BorrowedFd<'a>,
    /// The container's UTS namespace (`/proc/PID/ns/uts`).
    pub uts: std::os::fd::BorrowedFd<'a>,
    /// Its new host name, also written into its `/etc/hostname`.
    pub hostname: &'a str,
    /// A detached mount ([`clone_idmapped`]) to move onto `target`.
    pub tree: std::os::fd::BorrowedFd<'a>,
    /// An existing directory of the container (an absolute path inside it),
    /// reached without following a link.
    pub target: &'a Path,
}

/// Gives a running container a new host name and a mount: a child process
/// (host root) enters the container's mount and UTS namespaces, sets the host
/// name, rewrites `/etc/hostname` in place (a regular file, not followed if a
/// link) and moves the detached `tree` onto `target` (opened `O_PATH |
/// O_NOFOLLOW`, so a link planted there cannot redirect it). How a warm
/// container becomes a job's (nspawn's pool).
pub fn attach_in(adoption: &Adoption<'_>) -> io::Result<()> {
    let target = cstring(adoption.target)?;
    let hostname = adoption.hostname.as_bytes();
    let mut line = hostname.to_vec();
    line.push(b'\n');
    // SAFETY: the child makes only system calls on data prepared before the
    // fork (no allocation, no lock), then `_exit`s: sound in any process.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_os_error("fork"));
    }
    if pid == 0 {
        // SAFETY: as above; each step's failure is the exit code.
        unsafe {
            if libc::setns(adoption.mnt.as_raw_fd(), libc::CLONE_NEWNS) != 0 {
                libc::_exit(10);
            }
            if libc::setns(adoption.uts.as_raw_fd(), libc::CLONE_NEWUTS) != 0 {
                libc::_exit(11);
            }
            if libc::sethostname(hostname.as_ptr().cast(), hostname.len()) != 0 {
                libc::_exit(12);
            }
            let dir =
                libc::open(target.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC);
            if dir < 0 {
                libc::_exit(13);
            }
            let flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH;
            if libc::syscall(libc::SYS_move_mount, adoption.tree.as_raw_fd(), c"".as_ptr(), dir, c"".as_ptr(), flags)
                < 0
            {
                libc::_exit(14);
            }
            let file = libc::open(
                c"/etc/hostname".as_ptr(),
                libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
            );
            let mut stat: libc::stat = std::mem::zeroed();
            if file < 0 || libc::fstat(file, &mut stat) != 0 || stat.st_mode & libc::S_IFMT != libc::S_IFREG {
                libc::_exit(15);
            }
            if libc::ftruncate(file, 0) != 0
                || libc::write(file, line.as_ptr().cast(), line.len()) != line.len() as isize
            {
                libc::_exit(15);
            }
            libc::_exit(0);
        }
    }
    let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).map_err(io::Error::from)?;
    let step = match status {
        nix::sys::wait::WaitStatus::Exited(_, 0) => return Ok(()),
        nix::sys::wait::WaitStatus::Exited(_, 10) => "entering its mount namespace",
        nix::sys::wait::WaitStatus::Exited(_, 11) => "entering its UTS namespace",
        nix::sys::wait::WaitStatus::Exited(_, 12) => "setting its host name",
        nix::sys::wait::WaitStatus::Exited(_, 13) => "opening the mount point (missing, or not a directory)",
        nix::sys::wait::WaitStatus::Exited(_, 14) => "moving the mount into it",
        nix::sys::wait::WaitStatus::Exited(_, 15) => "rewriting its /etc/hostname (not a regular file?)",
        _ => "the helper process died",
    };
    Err(io::Error::other(format!(
        "failed to give the container host name {} and {} ({step})",
        adoption.hostname,
        adoption.target.display()
    )))
}

/// Gives `path` (not following a link) to the job's root: host ids `range.base`.
pub fn give(path: &Path, range: Range) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(range.base), Some(range.base))
        .map_err(|e| io::Error::new(e.kind(), format!("failed to give {} to uid {}: {e}", path.display(), range.base)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_never_shared_and_are_released_by_their_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let alloc = Allocator::in_dir(dir.path().join("userns"));
        let jobs = dir.path().join("jobs");
        let (a, b, c) = (jobs.join("r-1"), jobs.join("r-2"), jobs.join("r-3"));
        let ra = alloc.allocate(&a).unwrap();
        let rb = alloc.allocate(&b).unwrap();
        let rc = alloc.allocate(&c).unwrap();
        assert!(ra != rb && rb != rc && ra != rc);
        assert!(ra.base >= POOL_START && (ra.base - POOL_START) % RANGE_SIZE == 0);
        assert!(u64::from(ra.base) + u64::from(RANGE_SIZE) <= 0x7FFE_0000);
        assert!(alloc.holds(ra, &a) && !alloc.holds(ra, &b));
        alloc.release(ra, &b).unwrap();
        assert!(alloc.holds(ra, &a), "released by someone who does not hold it");
        alloc.release_all(&a).unwrap();
        assert!(!alloc.holds(ra, &a));
        // Reclaiming: owners under jobs/ that do not exist any more (c's job is gone, b's is not).
        std::fs::create_dir_all(&b).unwrap();
        let released = alloc.reclaim(&jobs, false);
        assert_eq!(released.len(), 1, "{released:?}");
        assert_eq!(alloc.taken(), vec![(rb, b.clone())]);
        assert_eq!(rb.nspawn_arg(), format!("{}:65536", rb.base));
        assert!(rb.contains(rb.base + 65535) && !rb.contains(rb.base + 65536) && !rb.contains(0));
    }

    #[test]
    fn a_full_pool_is_refused_with_a_remedy() {
        let dir = tempfile::tempdir().unwrap();
        let alloc = Allocator::in_dir(dir.path());
        for slot in 0..POOL_SLOTS {
            std::fs::write(dir.path().join((POOL_START + slot * RANGE_SIZE).to_string()), "/x\n").unwrap();
        }
        let e = alloc.allocate(Path::new("/jobs/a")).unwrap_err();
        assert!(e.to_string().contains("berth reap"), "{e}");
    }

    #[test]
    fn an_idmapped_clone_shows_root_files_as_the_jobs_root() {
        use std::os::unix::fs::MetadataExt;
        let not_root = !nix::unistd::Uid::effective().is_root();
        if !berth_backend_api::testing::prerequisite(not_root.then(|| "not running as root".to_owned())) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (image, target) = (dir.path().join("image"), dir.path().join("mnt"));
        std::fs::create_dir_all(&image).unwrap();
        std::fs::create_dir_all(&target).unwrap();
        std::fs::write(image.join("f"), "x").unwrap();
        let range = Range { base: POOL_START + 7 * RANGE_SIZE };
        let ns = UserNs::new(range).unwrap();
        mount_idmapped(&image, &target, &ns, Attrs { read_only: true, nodev: true, nosuid: false }).unwrap();
        let meta = std::fs::metadata(target.join("f")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (range.base, range.base), "root's file shows as the range's root");
        assert!(std::fs::write(target.join("g"), "y").is_err(), "read-only");
        assert_eq!(std::fs::metadata(image.join("f")).unwrap().uid(), 0, "the source is unchanged");
        crate::mounts::unmount_all(&crate::host::System, &target).unwrap();
    }
}
