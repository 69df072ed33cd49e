//! Running a host process to its end, or until the runner cancels.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::Cancel;

/// How a process run with [`run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It exited by itself with this code (128+N when killed by signal N).
    Exited(i32),
    /// The cancel fired; the process group got SIGTERM (then SIGKILL after the
    /// grace period) and has exited.
    Cancelled,
}

/// The shell-style exit code of `status`: the code, or 128+N for signal N.
pub fn exit_code(status: ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Runs `cmd` in a process group of its own until it exits or `cancel` fires.
///
/// When the process exits, whatever it left running in its group is killed,
/// so no background process outlives it holding the job log. On cancel the
/// group gets SIGTERM, and SIGKILL if it is still there after `grace`.
pub fn run(cmd: &mut Command, cancel: &Cancel, grace: Duration) -> io::Result<Ended> {
    run_inner(cmd, cancel, None, grace)
}

/// Like [`run`], but on cancel first calls `stop` (which asks whatever really
/// runs the work to stop, e.g. `systemctl stop` of a unit the process only
/// waits for) and waits up to `grace` for the process to exit by itself; only
/// then its group gets SIGTERM, and SIGKILL a second later.
pub fn run_with_stop(cmd: &mut Command, cancel: &Cancel, stop: &mut dyn FnMut(), grace: Duration) -> io::Result<Ended> {
    run_inner(cmd, cancel, Some(stop), grace)
}

fn run_inner(cmd: &mut Command, cancel: &Cancel, stop: Option<&mut dyn FnMut()>, grace: Duration) -> io::Result<Ended> {
    cmd.process_group(0);
    let mut child = cmd.spawn()?;
    let group = Pid::from_raw(child.id() as i32);
    let exited = wait_exit(&mut child, Some(cancel), None)?;
    if !exited {
        let last_resort = match stop {
            Some(stop) => {
                stop();
                if wait_exit(&mut child, None, Some(Instant::now() + grace))? {
                    None
                } else {
                    let _ = killpg(group, Signal::SIGTERM);
                    Some(Duration::from_secs(1))
                }
            }
            None => {
                let _ = killpg(group, Signal::SIGTERM);
                Some(grace)
            }
        };
        if let Some(wait) = last_resort {
            if !wait_exit(&mut child, None, Some(Instant::now() + wait))? {
                let _ = killpg(group, Signal::SIGKILL);
            }
        }
    }
    // The leader is a zombie until reaped, so its pid (the group id) cannot be
    // reused yet: the group kill below reaches only its own leftovers.
    let _ = killpg(group, Signal::SIGKILL);
    let status = child.wait()?;
    Ok(if exited { Ended::Exited(exit_code(status)) } else { Ended::Cancelled })
}

/// Waits until one of `fds` is readable (a pidfd whose process exited, a
/// [`Cancel`] that fired, a socket with a message) or `deadline` passes
/// (never, when `None`): the index in `fds` of the first readable one, in
/// their order, or `None` when the time ran out. A signal interrupting the
/// wait does not end it.
pub fn wait_readable(fds: &[BorrowedFd<'_>], deadline: Option<Instant>) -> io::Result<Option<usize>> {
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        // Whole milliseconds, rounded up; a deadline already passed still polls once.
        let timeout = left.map_or(PollTimeout::NONE, |l| {
            PollTimeout::try_from(l.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX)
        });
        let mut polled: Vec<PollFd<'_>> = fds.iter().map(|fd| PollFd::new(*fd, PollFlags::POLLIN)).collect();
        match poll(&mut polled, timeout) {
            Ok(0) if left == Some(Duration::ZERO) => return Ok(None),
            Err(nix::errno::Errno::EINTR) | Ok(0) => continue,
            Err(e) => return Err(e.into()),
            Ok(_) => {
                if let Some(ready) = polled.iter().position(|p| p.any().unwrap_or(false)) {
                    return Ok(Some(ready));
                }
            }
        }
    }
}

/// Waits, without reaping, until `child` exits (true), `cancel` fires or
/// `deadline` passes (false): through its pidfd, or by polling every 5 ms on
/// a kernel without pidfds.
pub fn wait_exit(child: &mut Child, cancel: Option<&Cancel>, deadline: Option<Instant>) -> io::Result<bool> {
    let Some(pidfd) = pidfd(child.id()) else {
        return poll_exit(child, cancel, deadline);
    };
    let mut fds = vec![pidfd.as_fd()];
    fds.extend(cancel.map(AsFd::as_fd));
    Ok(wait_readable(&fds, deadline)? == Some(0))
}

/// Fallback for kernels without pidfd: polls every 5 ms.
fn poll_exit(child: &mut Child, cancel: Option<&Cancel>, deadline: Option<Instant>) -> io::Result<bool> {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    loop {
        // WNOWAIT only inspects the child's state: it stays to be reaped.
        if waitid(Id::Pid(Pid::from_raw(child.id() as i32)), flags)? != WaitStatus::StillAlive {
            return Ok(true);
        }
        if cancel.is_some_and(Cancel::is_cancelled) || deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A pidfd for process `pid` (Linux 5.3+): readable once the process exits,
/// without reaping it. `None` if the kernel has none or the process is gone.
pub fn pidfd(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether this process runs a single thread (`Threads:` of /proc/self/status).
fn single_threaded() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| status.lines().find_map(|l| l.strip_prefix("Threads:").map(|n| n.trim() == "1")))
        .unwrap_or(false)
}

/// Runs `work` in a detached grandchild of this process, which goes on after
/// this process exits: its own session (the runner's signals to the hook's
/// process group are not for it), stdin `/dev/null`, stdout and stderr
/// appended to `log` (never the hook's pipes, which the runner waits for),
/// every other descriptor closed but those in `keep` (a lock this process
/// holds and keeps there stays held until the grandchild ends too; one it
/// does not keep, such as the job's lock for a process that outlives the
/// job, is not held by it). Its exit code is what `work` returns; `work` must
/// not use descriptors opened before the fork but those in `keep`.
///
/// `work` runs in a forked copy of this process without `exec`, which is
/// only sound in a single-threaded process: with more threads nothing is
/// forked and the answer is `Ok(false)` (do the work in this process then).
pub fn detach(log: &std::path::Path, keep: &[std::os::fd::RawFd], work: impl FnOnce() -> i32) -> io::Result<bool> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    if !single_threaded() {
        return Ok(false);
    }
    let null = std::fs::File::open("/dev/null")?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", log.display())))?;
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    // SAFETY: this process has one thread (checked above), so the child is a
    // complete copy of it and may run any code.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(io::Error::last_os_error());
    }
    if child > 0 {
        let status = nix::sys::wait::waitpid(Pid::from_raw(child), None).map_err(io::Error::from)?;
        return Ok(matches!(status, WaitStatus::Exited(_, 0)));
    }
    // The child: a new session, then the grandchild that does the work (not
    // a session leader, so it never acquires a terminal), reparented once
    // the child exits.
    // SAFETY: plain system calls in a single-threaded child; `_exit` leaves
    // without running this process's exit handlers twice.
    unsafe {
        if libc::setsid() < 0 {
            libc::_exit(1);
        }
        match libc::fork() {
            0 => {}
            pid if pid > 0 => libc::_exit(0),
            _ => libc::_exit(1),
        }
        if libc::dup2(null.as_raw_fd(), 0) < 0
            || libc::dup2(out.as_raw_fd(), 1) < 0
            || libc::dup2(out.as_raw_fd(), 2) < 0
        {
            libc::_exit(1);
        }
    }
    drop((null, out));
    let mut keep: Vec<libc::c_uint> = keep.iter().filter(|fd| **fd > 2).map(|fd| *fd as libc::c_uint).collect();
    keep.sort_unstable();
    let mut from: libc::c_uint = 3;
    for fd in keep.iter().chain([&libc::c_uint::MAX]) {
        if *fd > from {
            // SAFETY: closes descriptors this grandchild does not use again (see the doc).
            unsafe { libc::syscall(libc::SYS_close_range, from, *fd - 1, 0) };
        }
        from = fd.saturating_add(1);
    }
    let code = work();
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    // SAFETY: ends the grandchild without unwinding into the caller's code.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_exact() {
        let cancel = Cancel::never().unwrap();
        for code in [0, 1, 42, 255] {
            let ended =
                run(Command::new("sh").args(["-c", &format!("exit {code}")]), &cancel, Duration::from_secs(1)).unwrap();
            assert_eq!(ended, Ended::Exited(code));
        }
        let ended = run(Command::new("sh").args(["-c", "kill -9 $$"]), &cancel, Duration::from_secs(1)).unwrap();
        assert_eq!(ended, Ended::Exited(137));
    }

    #[test]
    fn wait_readable_says_which_came_first() {
        let (cancel, trigger) = Cancel::pair().unwrap();
        let mut child = Command::new("sleep").arg("0.05").spawn().unwrap();
        let fd = pidfd(child.id()).unwrap();
        let soon = Some(Instant::now() + Duration::from_millis(20));
        assert_eq!(wait_readable(&[fd.as_fd(), cancel.as_fd()], soon).unwrap(), None, "the time ran out");
        assert_eq!(wait_readable(&[fd.as_fd(), cancel.as_fd()], None).unwrap(), Some(0), "the process exited");
        trigger.fire();
        assert_eq!(wait_readable(&[cancel.as_fd(), fd.as_fd()], None).unwrap(), Some(0), "in the order given");
        assert_eq!(wait_readable(&[fd.as_fd(), cancel.as_fd()], None).unwrap(), Some(0));
        child.wait().unwrap();
        assert_eq!(wait_readable(&[], Some(Instant::now())).unwrap(), None);
        let past = Some(Instant::now() - Duration::from_millis(5));
        assert_eq!(wait_readable(&[cancel.as_fd()], past).unwrap(), Some(0), "a passed deadline still looks once");
    }

    #[test]
    fn cancel_stops_the_group_and_leftovers_are_killed() {
        let (cancel, trigger) = Cancel::pair().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("bg.pid");
        let script = format!("sleep 300 & echo $! > {}; exec sleep 300", pidfile.display());
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            trigger.fire();
        });
        let ended = run(Command::new("sh").args(["-c", &script]), &cancel, Duration::from_secs(2)).unwrap();
        thread.join().unwrap();
        assert_eq!(ended, Ended::Cancelled);
        assert!(started.elapsed() < Duration::from_secs(5));
        let bg: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        // Gone, or a zombie waiting for a reaper that is not ours.
        let stat = std::fs::read_to_string(format!("/proc/{bg}/stat")).unwrap_or_default();
        let state = stat.rsplit(") ").next().and_then(|rest| rest.chars().next());
        assert!(matches!(state, None | Some('Z')), "background process {bg} survived: {stat}");
    }
}
