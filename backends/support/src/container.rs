//! Entering a running container from berth's own process: how an nspawn
//! stage starts, with no program but the stage's own shell.
//!
//! What the stage's process gets is what a process the container's own init
//! starts has: the init's namespaces (user namespace last: from then on it is
//! the container's root, a uid of the job's range, never the host's root),
//! its root directory, its capability bounding set and its system call
//! filters, copied from the init once at prepare ([`Profile::of`], which reads
//! them with `PTRACE_SECCOMP_GET_FILTER` while the init is stopped for an
//! instant); its cgroups are a stage's own inside the container's
//! ([`crate::cgroup::StageCgroup`]). It is set up between fork and exec with
//! system calls only ([`install`]):
//!
//! 1. `setns` into the init's PID namespace (for the children of the process);
//! 2. fork into the stage's cgroup (`clone3(CLONE_INTO_CGROUP)`, see
//!    [`crate::cgroup`]): the first process waits and exits with the stage's
//!    status; the second, in the container's PID namespace, goes on;
//! 3. joins the v1 hierarchies, enters the cgroup, IPC, UTS, network and
//!    mount namespaces, and the init's root directory (`fchdir` + `chroot`);
//! 4. marks itself not dumpable (no process of the container can open its
//!    `/proc` entries, which still show berth's executable until exec);
//! 5. enters the user namespace and becomes its root (uid and gid 0, no
//!    supplementary groups), drops the capabilities the init's bounding set
//!    lacks, and loads the init's filters (without `no_new_privs`, as the
//!    container has them: its set-uid programs keep working);
//! 6. execs the stage's shell, which the container's files provide and which
//!    runs with the container's credentials.
//!
//! Nothing of the container's filesystem runs before step 6, and nothing is
//! read from it but the descriptors opened here from the init's `/proc`
//! entries, which the caller checks against the init's pidfd and start time.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use crate::cgroup::{fork_into, Joiner};
use crate::sandbox::seccomp::Program;

/// What a process entering the container copies from its init: the
/// capability bounding set and the system call filters, oldest first.
#[derive(Debug, Clone)]
pub struct Profile {
    /// The init's `CapBnd`.
    pub bounding: u64,
    /// The init's filters, in the order they were loaded.
    pub filters: Vec<Program>,
}

const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const PTRACE_EVENT_STOP: i32 = 128;

impl Profile {
    /// Reads the profile of process `pid` (the container's init, checked by
    /// the caller): its bounding set from `/proc`, its filters through
    /// ptrace, the process stopped only while they are copied.
    pub fn of(pid: i32) -> io::Result<Profile> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let bounding = status
            .lines()
            .find_map(|l| l.strip_prefix("CapBnd:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no CapBnd in /proc/{pid}/status")))?;
        let filtered = status.lines().find_map(|l| l.strip_prefix("Seccomp:")).map(str::trim).unwrap_or("0");
        let filters = if filtered == "0" { Vec::new() } else { filters_of(pid)? };
        Ok(Profile { bounding, filters })
    }

    /// The profile as bytes (for the job's state directory): the bounding
    /// set, then each filter as its length in instructions and its instructions.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.bounding.to_le_bytes().to_vec();
        for filter in &self.filters {
            let bytes = filter.bytes();
            out.extend_from_slice(&((bytes.len() / 8) as u32).to_le_bytes());
            out.extend_from_slice(&bytes);
        }
        out
    }

    /// A profile from [`Profile::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> io::Result<Profile> {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "not a saved container profile");
        let (head, mut rest) = bytes.split_at_checked(8).ok_or_else(bad)?;
        let bounding = u64::from_le_bytes(head.try_into().map_err(|_| bad())?);
        let mut filters = Vec::new();
        while !rest.is_empty() {
            let (len, tail) = rest.split_at_checked(4).ok_or_else(bad)?;
            let len = u32::from_le_bytes(len.try_into().map_err(|_| bad())?) as usize;
            let (filter, tail) = tail.split_at_checked(len * 8).ok_or_else(bad)?;
            filters.push(Program::from_bytes(filter)?);
            rest = tail;
        }
        Ok(Profile { bounding, filters })
    }

    /// Saves the profile in file `path` (made root's alone).
    pub fn save(&self, path: &Path) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::remove_file(path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        file.write_all(&self.to_bytes())
    }

    /// Loads a profile [`Profile::save`] wrote.
    pub fn load(path: &Path) -> io::Result<Profile> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut bytes = Vec::new();
        let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
        file.take(1 << 20).read_to_end(&mut bytes)?;
        Profile::from_bytes(&bytes)
    }
}

/// The system call filters of process `pid`, oldest first.
fn filters_of(pid: i32) -> io::Result<Vec<Program>> {
    let last = io::Error::last_os_error;
    // SAFETY: ptrace requests on `pid` with no memory of ours but the
    // buffers passed, each sized from the kernel's own count.
    unsafe {
        if libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) < 0 {
            return Err(last());
        }
        let mut pending = 0;
        let copied = (|| {
            if libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0) < 0 {
                return Err(last());
            }
            // The stop of the interrupt; a signal's stop first is kept, for
            // delivery at detach.
            loop {
                let mut status = 0;
                if libc::waitpid(pid, &mut status, libc::__WALL) < 0 {
                    if *libc::__errno_location() == libc::EINTR {
                        continue;
                    }
                    return Err(last());
                }
                if !libc::WIFSTOPPED(status) {
                    return Err(io::Error::other(format!("process {pid} ended while its filters were read")));
                }
                if status >> 16 == PTRACE_EVENT_STOP {
                    break;
                }
                pending = libc::WSTOPSIG(status);
                break;
            }
            let mut filters = Vec::new();
            for index in 0.. {
                let len = libc::ptrace(PTRACE_SECCOMP_GET_FILTER, pid, index as libc::c_long, 0);
                if len < 0 {
                    if *libc::__errno_location() == libc::ENOENT {
                        break;
                    }
                    return Err(last());
                }
                let mut insns = vec![0u8; len as usize * 8];
                if libc::ptrace(PTRACE_SECCOMP_GET_FILTER, pid, index as libc::c_long, insns.as_mut_ptr()) < 0 {
                    return Err(last());
                }
                filters.push(Program::from_bytes(&insns)?);
            }
            // Index 0 is the oldest: the order they were loaded in.
            Ok(filters)
        })();
        libc::ptrace(libc::PTRACE_DETACH, pid, 0, pending as libc::c_long);
        copied
    }
}

/// The namespaces and root of a running container's init, opened (before
/// the fork) for [`install`].
#[derive(Debug)]
pub struct Namespaces {
    pid: File,
    /// cgroup, IPC, UTS, network, mount, in the order entered.
    others: Vec<(File, libc::c_int)>,
    user: Option<File>,
    root: File,
}

impl Namespaces {
    /// Opens the namespaces of process `pid`; its user namespace only with
    /// `user` (a container without one runs as the host's root). The caller
    /// checks, after this, that `pid` is still the container's init.
    pub fn open(pid: i32, user: bool) -> io::Result<Namespaces> {
        let ns = |name: &str| File::open(format!("/proc/{pid}/ns/{name}"));
        let others = vec![
            (ns("cgroup")?, libc::CLONE_NEWCGROUP),
            (ns("ipc")?, libc::CLONE_NEWIPC),
            (ns("uts")?, libc::CLONE_NEWUTS),
            (ns("net")?, libc::CLONE_NEWNET),
            (ns("mnt")?, libc::CLONE_NEWNS),
        ];
        Ok(Namespaces {
            pid: ns("pid")?,
            others,
            user: if user { Some(ns("user")?) } else { None },
            root: File::open(format!("/proc/{pid}/root"))?,
        })
    }
}

/// What a stage's process needs between fork and exec, all made before.
pub struct Entry<'a> {
    /// The container's namespaces and root.
    pub namespaces: &'a Namespaces,
    /// What the init has that the process copies.
    pub profile: Profile,
    /// The stage's cgroup2 leaf, started in by `clone3`.
    pub cgroup: Option<BorrowedFd<'a>>,
    /// Joins what `clone3` did not.
    pub join_rest: Joiner,
    /// Joins everything, where the kernel has no `clone3`.
    pub join_all: Joiner,
}

impl std::fmt::Debug for Entry<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("namespaces", &self.namespaces)
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

struct Raw {
    pid: RawFd,
    others: Vec<(RawFd, libc::c_int)>,
    user: Option<RawFd>,
    root: RawFd,
    bounding: u64,
    filters: Vec<Program>,
    cgroup: Option<RawFd>,
    join_rest: Joiner,
    join_all: Joiner,
}

/// Sets `cmd` up to enter the container (see the module doc) before it
/// execs. The descriptors are borrowed: their owners must outlive the spawn.
pub fn install(cmd: &mut Command, entry: Entry<'_>) {
    let ns = entry.namespaces;
    let mut raw = Raw {
        pid: ns.pid.as_raw_fd(),
        others: ns.others.iter().map(|(f, flag)| (f.as_raw_fd(), *flag)).collect(),
        user: ns.user.as_ref().map(|f| f.as_raw_fd()),
        root: ns.root.as_fd().as_raw_fd(),
        bounding: entry.profile.bounding,
        filters: entry.profile.filters,
        cgroup: entry.cgroup.map(|fd| fd.as_raw_fd()),
        join_rest: entry.join_rest,
        join_all: entry.join_all,
    };
    // SAFETY: `Raw::enter` makes system calls only, on memory allocated
    // before the fork; the descriptors are borrowed from owners that
    // outlive the spawn.
    unsafe { cmd.pre_exec(move || raw.enter()) };
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Raw {
    fn enter(&mut self) -> io::Result<()> {
        // Every unsafe block below makes system calls on memory this process
        // owns; no allocation, no lock (between fork and exec).
        // SAFETY: see above.
        check(unsafe { libc::setns(self.pid, libc::CLONE_NEWPID) })?;
        if fork_into(self.cgroup)? {
            (self.join_rest)()?;
        } else {
            (self.join_all)()?;
        }
        for (fd, flag) in &self.others {
            // SAFETY: see above.
            check(unsafe { libc::setns(*fd, *flag) })?;
        }
        // SAFETY: see above.
        unsafe {
            check(libc::fchdir(self.root))?;
            check(libc::chroot(c".".as_ptr()))?;
            check(libc::chdir(c"/".as_ptr()))?;
            check(libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0))?;
            if let Some(user) = self.user {
                check(libc::setns(user, libc::CLONE_NEWUSER))?;
            }
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setresgid(0, 0, 0))?;
            check(libc::setresuid(0, 0, 0))?;
            // Every capability the kernel knows (EINVAL past the last one).
            for cap in (0..64u64).filter(|cap| self.bounding & (1 << cap) == 0) {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong) < 0 {
                    if *libc::__errno_location() == libc::EINVAL {
                        break;
                    }
                    return Err(io::Error::last_os_error());
                }
            }
        }
        for filter in &self.filters {
            filter.load()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_survives_its_bytes_and_bad_bytes_are_refused() {
        let filters = crate::sandbox::seccomp::filters().unwrap();
        let profile = Profile { bounding: 0xfdec_abff, filters };
        let back = Profile::from_bytes(&profile.to_bytes()).unwrap();
        assert_eq!(back.bounding, profile.bounding);
        assert_eq!(
            back.filters.iter().map(Program::bytes).collect::<Vec<_>>(),
            profile.filters.iter().map(Program::bytes).collect::<Vec<_>>()
        );
        let bytes = profile.to_bytes();
        for cut in [0, 7, 11, bytes.len() - 1] {
            assert!(Profile::from_bytes(&bytes[..cut]).is_err(), "{cut} bytes were taken for a profile");
        }
    }

    #[test]
    fn the_profile_of_a_filtered_process_is_its_filters_in_order() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: reading another process's filters needs root");
            return;
        }
        let filters = crate::sandbox::seccomp::filters().unwrap();
        let (read, write) = nix::unistd::pipe().unwrap();
        // SAFETY: the child makes system calls only, then exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: as above.
            unsafe {
                libc::prctl(libc::PR_CAPBSET_DROP, 21);
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                for f in &filters {
                    if f.apply().is_err() {
                        libc::_exit(1);
                    }
                }
                libc::write(write.as_raw_fd(), b"r".as_ptr().cast(), 1);
                // Until the parent kills it.
                loop {
                    libc::pause();
                }
            }
        }
        let mut b = [0u8; 1];
        nix::unistd::read(&read, &mut b).unwrap();
        let profile = Profile::of(pid);
        drop(write);
        // SAFETY: kills and reaps the child above.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        let profile = profile.unwrap();
        assert_eq!(profile.bounding & (1 << 21), 0, "CAP_SYS_ADMIN was dropped from its bounding set");
        // Its own two, after any it inherited from this test's process.
        let read: Vec<Vec<u8>> = profile.filters.iter().map(Program::bytes).collect();
        let loaded: Vec<Vec<u8>> = filters.iter().map(Program::bytes).collect();
        assert!(
            read.ends_with(&loaded),
            "{} filters read, of {:?} instructions",
            read.len(),
            read.iter().map(|f| f.len() / 8).collect::<Vec<_>>()
        );
    }
}
