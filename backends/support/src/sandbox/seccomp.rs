//! The system calls a sandboxed job may not make: what container runtimes
//! refuse by default (Docker's and Podman's profiles), as a deny list over
//! an otherwise open filter, compiled to BPF with `seccompiler`.
//!
//! Refused with `EPERM` ([`DENIED`]): opening files by handle
//! (`open_by_handle_at`, the classic escape through a bind mount), kernel
//! keyrings, `kexec`, module loading, `bpf`, `perf_event_open`,
//! `userfaultfd`, `io_uring`, every way to mount or unmount, `setns`,
//! `unshare` and `clone` with any namespace flag, swap, clock, `reboot`,
//! `acct`, `quotactl`, `syslog`. `clone3` gets `ENOSYS`, so that the C
//! library falls back to `clone`, whose flags a filter can see. A system
//! call of another architecture (32-bit calls on x86_64) kills the process:
//! the deny list would not see it.

use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// A compiled filter.
#[derive(Debug, Clone)]
pub struct Program(BpfProgram);

/// The system calls refused with `EPERM`, by name (for the docs and tests).
pub const DENIED: &[(&str, libc::c_long)] = &[
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("keyctl", libc::SYS_keyctl),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("open_tree", libc::SYS_open_tree),
    ("move_mount", libc::SYS_move_mount),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("setns", libc::SYS_setns),
    ("unshare", libc::SYS_unshare),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("reboot", libc::SYS_reboot),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("fanotify_init", libc::SYS_fanotify_init),
    ("syslog", libc::SYS_syslog),
];

/// The namespace flags `clone` may not have.
const NAMESPACE_FLAGS: [u64; 7] = [
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
];

fn arch() -> io::Result<TargetArch> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| io::Error::other(format!("no system call filter for {}", std::env::consts::ARCH)))
}

fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>, action: SeccompAction) -> io::Result<Program> {
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, action, arch()?).map_err(io::Error::other)?;
    Ok(Program(BpfProgram::try_from(filter).map_err(io::Error::other)?))
}

/// The filters of a sandboxed stage: the deny list (`EPERM`), and `clone3`
/// refused with `ENOSYS`.
pub fn filters() -> io::Result<Vec<Program>> {
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> = DENIED.iter().map(|(_, nr)| (*nr, Vec::new())).collect();
    // The clone flags are its first argument on x86_64 and aarch64.
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|flag| {
            SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(*flag), *flag)
                .and_then(|c| SeccompRule::new(vec![c]))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(io::Error::other)?;
    denied.insert(libc::SYS_clone, clone_rules);
    let clone3: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_clone3, Vec::new())].into_iter().collect();
    Ok(vec![
        compile(denied, SeccompAction::Errno(libc::EPERM as u32))?,
        compile(clone3, SeccompAction::Errno(libc::ENOSYS as u32))?,
    ])
}

impl Program {
    /// Loads the filter into the calling thread (no allocation: safe between fork and exec).
    pub fn apply(&self) -> io::Result<()> {
        seccompiler::apply_filter(&self.0)
            .map_err(|e| io::Error::other(format!("failed to load the system call filter: {e}")))
    }

    /// Loads the filter into the calling thread without setting
    /// `no_new_privs` (set-uid programs keep working, as in the container
    /// the filter was copied from): the thread needs `CAP_SYS_ADMIN` in its
    /// user namespace. No allocation: safe between fork and exec.
    pub fn load(&self) -> io::Result<()> {
        let prog = libc::sock_fprog { len: self.0.len() as u16, filter: self.0.as_ptr() as *mut libc::sock_filter };
        // SAFETY: `prog` points to this filter's instructions, alive for the call;
        // `seccompiler::sock_filter` has the kernel's layout, as libc's.
        let rc = unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &prog) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A filter from the bytes of its `struct sock_filter`s ([`Program::bytes`]).
    pub fn from_bytes(bytes: &[u8]) -> io::Result<Program> {
        if bytes.is_empty() || bytes.len() % 8 != 0 || bytes.len() / 8 > u16::MAX as usize {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not a system call filter"));
        }
        let insns = bytes
            .chunks_exact(8)
            .map(|c| seccompiler::sock_filter {
                code: u16::from_ne_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        Ok(Program(insns))
    }

    /// The filter as the bytes of `struct sock_filter`s, as bubblewrap's `--add-seccomp-fd` reads it.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() * 8);
        for insn in &self.0 {
            out.extend_from_slice(&insn.code.to_ne_bytes());
            out.push(insn.jt);
            out.push(insn.jf);
            out.extend_from_slice(&insn.k.to_ne_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile_and_serialise_whole_instructions() {
        let filters = filters().unwrap();
        assert_eq!(filters.len(), 2);
        for filter in &filters {
            assert!(!filter.0.is_empty());
            assert_eq!(filter.bytes().len(), filter.0.len() * 8);
        }
    }

    #[test]
    fn a_filtered_process_is_refused_what_the_list_says_and_nothing_else() {
        // In a child process: the filter is for good.
        let filters = filters().unwrap();
        // SAFETY: the child makes system calls only, then exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: as above.
            unsafe {
                let ok = libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
                    && filters.iter().all(|f| f.apply().is_ok());
                let errno = || *libc::__errno_location();
                let handle = libc::syscall(libc::SYS_open_by_handle_at, -1, 0, 0) == -1 && errno() == libc::EPERM;
                let userns = libc::unshare(libc::CLONE_NEWUSER) == -1 && errno() == libc::EPERM;
                let clone3 = libc::syscall(libc::SYS_clone3, 0, 0) == -1 && errno() == libc::ENOSYS;
                let getpid = libc::getpid() > 0;
                let code = [ok, handle, userns, clone3, getpid]
                    .iter()
                    .enumerate()
                    .find(|(_, v)| !**v)
                    .map_or(0, |(i, _)| i as i32 + 1);
                libc::_exit(code);
            }
        }
        let mut status = 0;
        // SAFETY: reaps the child above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "the filtered child was killed: {status}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "check {} failed (1 load, 2 handle, 3 userns, 4 clone3, 5 getpid)",
            libc::WEXITSTATUS(status)
        );
    }
}
