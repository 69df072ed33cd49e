//! How a stage of the chroot backend enters its sandbox: in the stage's
//! process, between fork and exec (`pre_exec`), with nothing but system calls.
//!
//! 1. unshare mount, PID, IPC and UTS namespaces (and the network's with
//!    `private_network`), as host root;
//! 2. fork into the job's cgroup (`clone3(CLONE_INTO_CGROUP)`, no costly
//!    migration; where the kernel cannot, the child joins by writing
//!    `cgroup.procs`): everything the stage starts counts against the job's
//!    bounds and dies with it. The parent waits for the child and exits with
//!    its status (what `unshare --fork` does); the child, PID 1 of the new
//!    PID namespace, dies with it (`PR_SET_PDEATHSIG`) and unshares a cgroup
//!    namespace;
//! 4. mount `/proc` of the new PID namespace in the job's root (its
//!    `/proc/sys` read-only), make the root the mount namespace's root
//!    (`pivot_root`) and detach the host's: nothing of the host is left to
//!    reach, by `chroot` tricks or otherwise;
//! 5. enter the job's user namespace (root in the job is a uid of the job's
//!    range on the host), switch to the scripts' user;
//! 6. drop every capability but [`super::KEEP_CAPS`] from the bounding,
//!    permitted, effective and inheritable sets, set `no_new_privs`, load
//!    the system call filters;
//! 7. exec the stage's script (by the job's own `/bin/bash`).
//!
//! The mount namespace belongs to the host's user namespace, so the job
//! cannot mount or unmount anything in it, whatever it does.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use super::seccomp::Program;
use super::{Stage, KEEP_CAPS};
use crate::cgroup::fork_into;

pub use crate::cgroup::Joiner;

/// What [`Entry::enter`] uses, all made before the fork.
struct Entry {
    cgroup: Option<RawFd>,
    join: Option<Joiner>,
    flags: libc::c_int,
    root: CString,
    userns: Option<RawFd>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    hostname: Vec<u8>,
    keep: u64,
    filters: Vec<Program>,
}

/// The mask of [`KEEP_CAPS`].
fn keep_mask() -> u64 {
    KEEP_CAPS.iter().fold(0, |mask, (cap, _)| mask | 1 << cap)
}

/// What a process needs to enter a sandbox root (see the module doc). The
/// descriptors are borrowed: their owners must outlive the command's spawn.
pub struct Spec<'a> {
    /// The root to `pivot_root` into (a directory on the host).
    pub root: &'a Path,
    /// The user namespace to enter, unless the process stays host root.
    pub userns: Option<BorrowedFd<'a>>,
    /// The uid and gid to run as (in the user namespace when there is one).
    pub ids: (u32, u32),
    /// The hostname in the new UTS namespace.
    pub hostname: &'a str,
    /// The cgroup2 directory to start in.
    pub cgroup: Option<BorrowedFd<'a>>,
    /// Joins the cgroup otherwise.
    pub join: Option<Joiner>,
    /// The system call filters.
    pub filters: Vec<Program>,
    /// A network namespace of its own, with only loopback.
    pub private_network: bool,
}

impl std::fmt::Debug for Spec<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spec").field("root", &self.root).field("ids", &self.ids).finish_non_exhaustive()
    }
}

/// Sets `cmd` up to enter `stage`'s sandbox before it execs. `stage` must
/// outlive the command's spawn.
pub fn install(cmd: &mut Command, stage: &mut Stage, private_network: bool) -> io::Result<()> {
    let ids = match stage.record.users {
        Some(_) => (stage.record.uid, stage.record.gid),
        None => stage.record.host_ids(),
    };
    let spec = Spec {
        root: &stage.paths.root,
        userns: stage.userns.as_ref().map(|ns| ns.fd()),
        ids,
        hostname: &stage.hostname,
        cgroup: stage.cgroup.as_ref().map(|fd| fd.as_fd()),
        join: stage.join.take(),
        filters: std::mem::take(&mut stage.filters),
        private_network,
    };
    install_spec(cmd, spec)
}

/// Sets `cmd` up to enter the sandbox `spec` describes before it execs.
pub fn install_spec(cmd: &mut Command, spec: Spec<'_>) -> io::Result<()> {
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if spec.private_network {
        flags |= libc::CLONE_NEWNET;
    }
    let mut entry = Entry {
        cgroup: spec.cgroup.map(|fd| fd.as_raw_fd()),
        join: spec.join,
        flags,
        root: CString::new(spec.root.as_os_str().as_bytes()).map_err(io::Error::other)?,
        userns: spec.userns.map(|fd| fd.as_raw_fd()),
        uid: spec.ids.0,
        gid: spec.ids.1,
        hostname: spec.hostname.as_bytes().to_vec(),
        keep: keep_mask(),
        filters: spec.filters,
    };
    // SAFETY: `Entry::enter` makes system calls only, on memory allocated
    // before the fork; the descriptors it uses are borrowed from owners
    // that outlive the spawn.
    unsafe { cmd.pre_exec(move || entry.enter()) };
    Ok(())
}

/// Sets `cmd` (a launcher such as bubblewrap, which enters the sandbox
/// itself) up to start in the job's cgroup (forked into it, the parent
/// waiting as in [`install`]), with descriptors `fds` at 3, 4, ... (in that
/// order), as the host uid of the job's user: unprivileged on the host, the
/// owner of the job's user namespace.
pub fn install_launcher(cmd: &mut Command, stage: &mut Stage, fds: Vec<RawFd>) -> io::Result<()> {
    if fds.len() > 64 {
        return Err(io::Error::other(format!("too many descriptors for the launcher ({}; at most 64)", fds.len())));
    }
    let cgroup = stage.cgroup.as_ref().map(|fd| fd.as_raw_fd());
    let mut join = stage.join.take();
    let ids = stage.record.users.map(|_| stage.record.host_ids());
    let pre_exec = move || -> io::Result<()> {
        if !fork_into(cgroup)? {
            if let Some(join) = join.as_mut() {
                join()?;
            }
        }
        // SAFETY: system calls only, on memory allocated before the fork.
        unsafe {
            // Out of the way first, so that no target number is a source still needed.
            let mut high = [0 as RawFd; 64];
            for (slot, fd) in high.iter_mut().zip(&fds) {
                *slot = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 100);
                check(*slot, "duplicate a descriptor")?;
            }
            for (i, fd) in high.iter().take(fds.len()).enumerate() {
                check(libc::dup2(*fd, 3 + i as RawFd), "place a descriptor")?;
            }
            if let Some((uid, gid)) = ids {
                check(libc::setgroups(0, std::ptr::null()), "clear the supplementary groups")?;
                check(libc::setresgid(gid, gid, gid), "switch to the job's group")?;
                check(libc::setresuid(uid, uid, uid), "switch to the job's user")?;
            }
        }
        Ok(())
    };
    // SAFETY: the closure makes system calls only (see above); the cgroup's
    // descriptor stays open in `stage`, which outlives the spawn.
    unsafe { cmd.pre_exec(pre_exec) };
    Ok(())
}

/// The error of a failed step (`rc < 0`). Only its errno reaches the
/// spawning process (the standard library passes no more); `_what` names the
/// step for the reader.
fn check(rc: libc::c_int, _what: &'static str) -> io::Result<()> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

impl Entry {
    fn enter(&mut self) -> io::Result<()> {
        // The unsafe blocks below make system calls on memory this process
        // owns; no allocation, no lock (the state between fork and exec of a
        // possibly multi-threaded parent).
        // SAFETY: see above.
        let rc = unsafe { libc::unshare(self.flags) };
        check(rc, "unshare the stage's namespaces")?;
        if !fork_into(self.cgroup)? {
            if let Some(join) = self.join.as_mut() {
                join()?;
            }
        }
        if self.cgroup.is_some() || self.join.is_some() {
            // SAFETY: see above.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWCGROUP) };
            check(rc, "unshare a cgroup namespace")?;
        }
        // SAFETY: see above.
        unsafe {
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL), "set the parent-death signal")?;
            check(
                libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ),
                "make the stage's mounts private",
            )?;
            check(
                libc::mount(
                    self.root.as_ptr(),
                    self.root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ),
                "bind the job's root",
            )?;
            check(libc::chdir(self.root.as_ptr()), "enter the job's root")?;
            check(
                libc::mount(
                    c"proc".as_ptr(),
                    c"proc".as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ),
                "mount the job's /proc",
            )?;
            check(
                libc::mount(
                    c"proc/sys".as_ptr(),
                    c"proc/sys".as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ),
                "bind /proc/sys",
            )?;
            check(
                libc::mount(
                    std::ptr::null(),
                    c"proc/sys".as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND
                        | libc::MS_REMOUNT
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV
                        | libc::MS_NOEXEC,
                    std::ptr::null(),
                ),
                "make /proc/sys read-only",
            )?;
            check(
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
                "pivot_root into the job's root",
            )?;
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH), "detach the host's root")?;
            check(libc::chdir(c"/".as_ptr()), "chdir /")?;
            check(libc::sethostname(self.hostname.as_ptr().cast(), self.hostname.len()), "set the hostname")?;
            if let Some(fd) = self.userns {
                check(libc::setns(fd, libc::CLONE_NEWUSER), "enter the job's user namespace")?;
            }
            check(libc::setgroups(0, std::ptr::null()), "clear the supplementary groups")?;
            check(libc::setresgid(self.gid, self.gid, self.gid), "switch to the job's group")?;
            // Every capability the kernel knows (EINVAL past the last one).
            for cap in (0..64u64).filter(|cap| self.keep & (1 << cap) == 0) {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong) < 0 {
                    if *libc::__errno_location() == libc::EINVAL {
                        break;
                    }
                    return Err(io::Error::last_os_error());
                }
            }
            let header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
            let mut data = [CapData::default(); 2];
            check(libc::syscall(libc::SYS_capget, &header, data.as_mut_ptr()) as libc::c_int, "read capabilities")?;
            for (i, d) in data.iter_mut().enumerate() {
                let keep = (self.keep >> (32 * i)) as u32;
                d.effective &= keep;
                d.permitted &= keep;
                d.inheritable = 0;
            }
            check(libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as libc::c_int, "set capabilities")?;
            check(
                libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0),
                "clear ambient capabilities",
            )?;
            check(libc::setresuid(self.uid, self.uid, self.uid), "switch to the job's user")?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs")?;
        }
        for filter in &self.filters {
            filter.apply()?;
        }
        Ok(())
    }
}
