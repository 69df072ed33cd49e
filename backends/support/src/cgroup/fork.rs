//! Forking into a cgroup between fork and exec, the way `unshare --fork`
//! does: the first process waits for its child and exits with its status.

use std::io;
use std::os::fd::RawFd;

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Forks (between fork and exec): the parent waits for the child and exits
/// with its status; the child returns, in cgroup2 directory `cgroup` when
/// given and the kernel can (`true`: `clone3(CLONE_INTO_CGROUP)`, no
/// migration), else where this process is (`false`).
pub(crate) fn fork_into(cgroup: Option<RawFd>) -> io::Result<bool> {
    let mut joined = false;
    let mut child = -1;
    if let Some(fd) = cgroup {
        let args = CloneArgs {
            flags: CLONE_INTO_CGROUP,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: fd as u64,
            ..CloneArgs::default()
        };
        // SAFETY: clone3 without CLONE_VM and without a stack is fork: the
        // child continues on a copy of this stack.
        child = unsafe { libc::syscall(libc::SYS_clone3, &args, std::mem::size_of::<CloneArgs>()) } as libc::pid_t;
        joined = child >= 0;
    }
    if child < 0 {
        // SAFETY: fork between fork and exec; the child makes system calls only.
        child = unsafe { libc::fork() };
    }
    if child < 0 {
        return Err(io::Error::last_os_error());
    }
    if child > 0 {
        wait_and_exit(child);
    }
    Ok(joined)
}

/// The parent of the stage's first process: waits for it, exits with its
/// status (128 + N for a process killed by signal N, as a shell reports it).
fn wait_and_exit(child: libc::pid_t) -> ! {
    // SAFETY: system calls only; this process never returns to Rust code.
    unsafe {
        // Only the child holds the spawn's error pipe and the stage's output.
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        let mut status = 0;
        loop {
            let rc = libc::waitpid(child, &mut status, 0);
            if rc == child {
                break;
            }
            if rc < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(127);
            }
        }
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else if libc::WIFSIGNALED(status) {
            128 + libc::WTERMSIG(status)
        } else {
            127
        };
        libc::_exit(code)
    }
}
