//! Running a host process to its end, or until the runner cancels.
//!
//! Two levels:
//!
//! - [`run_stage`] runs a stage's script, directly or inside a wrapper
//!   (`unshare`, `bwrap`, `nsenter`, a shell that mounts before it execs),
//!   and answers in the backend's own terms: `Ok(())`,
//!   [`Failure::Script`] with the script's exit code, [`Failure::System`]
//!   when the wrapper failed before the script started (with what the
//!   wrapper said), or [`Failure::Cancelled`]. The contract a wrapper keeps
//!   is on [`StageCommand::wrapped`].
//! - [`run`] runs any host process and says how it ended ([`Ended`]); the
//!   caller classifies the outcome.
//!
//! Both put the process in a process group of its own, kill what it leaves
//! in that group when it exits, and on cancel send the group SIGTERM, then
//! SIGKILL after the grace period.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::{Cancel, Failure};

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

/// The descriptor on which the starter of a wrapped stage says that the
/// script starts ([`StageCommand::wrapped`]).
pub const STARTED_FD: RawFd = 100;

/// The descriptor that carries the job log's stderr past a wrapper whose own
/// stderr is captured ([`StageCommand::wrapped`]).
pub const LOG_FD: RawFd = 101;

/// The shell that runs a stage's script, inside the environment.
const SHELL: &str = "/bin/bash";

/// The starter: back to the job log's stderr, say the script starts, close
/// both descriptors (the script inherits neither), then exec the script.
const STARTER: &str = r#"exec 2>&101 101>&- && printf s >&100 && exec 100>&- && exec "$@""#;

/// How much of a wrapper's captured stderr is kept for its failure message.
const WRAPPER_SAID: usize = 4096;

/// A stage's command: `/bin/bash SCRIPT` on the host, or inside a wrapper.
/// Set its environment, working directory and standard streams through
/// [`StageCommand::command`], then run it with [`run_stage`].
#[derive(Debug)]
pub struct StageCommand {
    cmd: Command,
    wrapped: bool,
}

impl StageCommand {
    /// The script run by `bash` directly (found on the command's `PATH`):
    /// its exit status is the script's.
    pub fn new(script: impl AsRef<OsStr>) -> Self {
        let mut cmd = Command::new("bash");
        cmd.arg(script);
        StageCommand { cmd, wrapped: false }
    }

    /// The script run inside `wrapper`, a program that sets up the job's
    /// environment and then runs the command given as its trailing
    /// arguments, the way `unshare ARGS`, `bwrap ARGS --`, `nsenter ARGS`
    /// or `sh -c 'mount ... && exec "$@"' sh` do. This appends that command,
    /// a starter run by `/bin/bash` inside the environment, to `wrapper`'s
    /// arguments.
    ///
    /// The contract, which tells the wrapper's failure from the script's:
    ///
    /// 1. [`run_stage`] starts `wrapper` with its stderr captured (a memory
    ///    file), the job log's stderr at descriptor [`LOG_FD`] (101) and the
    ///    write end of a pipe at [`STARTED_FD`] (100). Its stdout is the job
    ///    log.
    /// 2. The wrapper must pass descriptors 100 and 101 on to the command it
    ///    runs (a plain `exec` does; `systemd-run` does not, and cannot be
    ///    used here), and exit with that command's exit status.
    /// 3. The starter puts the job log back on stderr, writes one byte to
    ///    descriptor 100, closes both, and execs `/bin/bash SCRIPT`, so the
    ///    script inherits neither descriptor.
    /// 4. When the wrapper exits, the byte says who failed. With it, a
    ///    non-zero status is the script's: [`Failure::Script`]. Without it,
    ///    the wrapper failed before the script started (a bind mount, a
    ///    namespace, a missing `/bin/bash`): [`Failure::System`], its message
    ///    naming the wrapper, its exit status and the end of what it wrote
    ///    to stderr. What a wrapper writes to stderr after the script started
    ///    goes to the runner-side log (`tracing`), not the job log.
    ///
    /// Descriptors 100 and 101 are [`run_stage`]'s: a backend passing
    /// descriptors of its own to the wrapper uses lower numbers.
    pub fn wrapped(mut wrapper: Command, script: impl AsRef<OsStr>) -> Self {
        wrapper.args([OsStr::new(SHELL), OsStr::new("-c"), OsStr::new(STARTER), OsStr::new("berth-stage")]);
        wrapper.arg(SHELL).arg(script);
        StageCommand { cmd: wrapper, wrapped: true }
    }

    /// The command, to set its environment, working directory, standard
    /// streams or `pre_exec` steps. Its process group is [`run_stage`]'s.
    pub fn command(&mut self) -> &mut Command {
        &mut self.cmd
    }
}

/// What a wrapper gets on top of its command: the capture of its stderr and
/// the pipe on which the starter says the script started.
struct Starter {
    said: std::fs::File,
    started: OwnedFd,
    /// The pipe's write end, which the child gets a copy of.
    _tell: OwnedFd,
}

impl Starter {
    /// Makes the capture and the pipe, and has `cmd` put them at
    /// [`STARTED_FD`], [`LOG_FD`] and stderr between fork and exec.
    fn install(cmd: &mut Command) -> io::Result<Starter> {
        use nix::fcntl::OFlag;
        let said = nix::sys::memfd::memfd_create(c"berth-wrapper-stderr", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(io::Error::from)?;
        let (started, tell) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(io::Error::from)?;
        // The child gets copies; this process keeps both ends until the
        // command ended, which is harmless: the pipe is read without waiting.
        let (said_fd, tell_fd) = (said.as_raw_fd(), tell.as_raw_fd());
        let place = move || -> io::Result<()> {
            // SAFETY: system calls only, on descriptors this process owns;
            // the copies above 101 are close-on-exec and vanish at exec.
            unsafe {
                let said = libc::fcntl(said_fd, libc::F_DUPFD_CLOEXEC, LOG_FD + 1);
                let tell = libc::fcntl(tell_fd, libc::F_DUPFD_CLOEXEC, LOG_FD + 1);
                if said < 0
                    || tell < 0
                    || libc::dup2(2, LOG_FD) < 0
                    || libc::dup2(said, 2) < 0
                    || libc::dup2(tell, STARTED_FD) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        };
        // SAFETY: the closure makes async-signal-safe system calls only.
        unsafe { cmd.pre_exec(place) };
        Ok(Starter { said: said.into(), started, _tell: tell })
    }

    /// Whether the starter said the script started.
    fn started(&self) -> bool {
        let mut byte = [0u8; 1];
        matches!(nix::unistd::read(&self.started, &mut byte), Ok(1))
    }

    /// The end of what the wrapper wrote to its stderr, trimmed.
    fn said(&self) -> String {
        use std::os::unix::fs::FileExt;
        let len = self.said.metadata().map_or(0, |m| m.len());
        let from = len.saturating_sub(WRAPPER_SAID as u64);
        let mut bytes = vec![0u8; (len - from) as usize];
        let read = self.said.read_at(&mut bytes, from).unwrap_or(0);
        bytes.truncate(read);
        String::from_utf8_lossy(&bytes).trim().to_owned()
    }
}

/// Runs a stage to its end or to a cancel, as [`run`] runs a process, and
/// classifies how it ended: `Ok(())` when the script exited 0,
/// [`Failure::Script`] with its exit code (128+N for signal N) otherwise,
/// [`Failure::Cancelled`] when `cancel` fired (the group got SIGTERM, then
/// SIGKILL after `grace`), and [`Failure::System`] when the command could
/// not be started, or, for a [`StageCommand::wrapped`] stage, when the
/// wrapper ended before the script started. A stage runs once: it is
/// consumed.
pub fn run_stage(mut stage: StageCommand, cancel: &Cancel, grace: Duration) -> Result<(), Failure> {
    let program = stage.cmd.get_program().to_string_lossy().into_owned();
    let starter = match stage.wrapped {
        true => Some(
            Starter::install(&mut stage.cmd)
                .map_err(|e| Failure::system_with(format!("failed to set up {program} for the stage"), e))?,
        ),
        false => None,
    };
    let ended =
        run(&mut stage.cmd, cancel, grace).map_err(|e| Failure::system_with(format!("failed to run {program}"), e))?;
    let code = match ended {
        Ended::Cancelled => return Err(Failure::Cancelled),
        Ended::Exited(code) => code,
    };
    if let Some(starter) = starter {
        let said = starter.said();
        if !starter.started() {
            let said = if said.is_empty() { "it wrote nothing to stderr".to_owned() } else { said };
            return Err(Failure::system(format!(
                "{program} exited with code {code} before the stage's script started: {said}"
            )));
        }
        if !said.is_empty() {
            tracing::warn!(wrapper = %program, "the stage's wrapper wrote to stderr: {said}");
        }
    }
    match code {
        0 => Ok(()),
        code => Err(Failure::script(code)),
    }
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

    /// `body` as a stage script in `dir`.
    fn script(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
        let path = dir.join("script");
        std::fs::write(&path, body).unwrap();
        path
    }

    /// A wrapper that runs its trailing command as `unshare` or `bwrap` do.
    fn exec_wrapper(setup: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &format!("{setup}\nexec \"$@\""), "wrapper"]);
        cmd
    }

    fn stderr_of(stage: &mut StageCommand, log: &std::path::Path) {
        stage.command().stderr(std::fs::File::create(log).unwrap());
    }

    #[test]
    fn a_stage_is_ok_or_a_script_failure_with_its_code() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = Cancel::never().unwrap();
        let grace = Duration::from_secs(1);
        for (body, want) in [("exit 0", None), ("exit 3", Some(3)), ("kill -9 $$", Some(137))] {
            let script = script(dir.path(), body);
            let plain = run_stage(StageCommand::new(&script), &cancel, grace);
            let wrapped = run_stage(StageCommand::wrapped(exec_wrapper(":"), &script), &cancel, grace);
            for result in [plain, wrapped] {
                match (result, want) {
                    (Ok(()), None) => {}
                    (Err(Failure::Script { code }), Some(want)) => assert_eq!(code, want, "{body}"),
                    (other, _) => panic!("{body}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn a_wrapper_failing_before_the_script_is_a_system_failure_with_what_it_said() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = Cancel::never().unwrap();
        let ran = dir.path().join("ran");
        let script = script(dir.path(), &format!("touch {}\n", ran.display()));
        let log = dir.path().join("log");
        for (setup, code) in [
            ("echo 'mount: /builds: mount point does not exist.' >&2; exit 32", 32),
            // Exit 1, as bwrap does for its own failures: a script's code too.
            ("echo 'bwrap: Can not mount proc' >&2; exit 1", 1),
            // Success without ever running the script is no success.
            ("echo 'usage: wrapper ...' >&2; exit 0", 0),
        ] {
            let mut stage = StageCommand::wrapped(exec_wrapper(setup), &script);
            stderr_of(&mut stage, &log);
            let err = run_stage(stage, &cancel, Duration::from_secs(1)).unwrap_err();
            let said = setup.split('\'').nth(1).unwrap();
            assert!(matches!(err, Failure::System { .. }), "{setup}: {err:?}");
            let message = err.to_string();
            assert!(
                message.starts_with(&format!("sh exited with code {code} before the stage's script started: {said}")),
                "{message}"
            );
            assert!(!ran.exists(), "the script did not run");
            assert_eq!(std::fs::read_to_string(&log).unwrap(), "", "the wrapper's message is not the job log's");
        }
        // A wrapper that does not pass the descriptors on cannot say the script started.
        let mut stage = StageCommand::wrapped(exec_wrapper("exec 100>&-"), &script);
        stderr_of(&mut stage, &log);
        let err = run_stage(stage, &cancel, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, Failure::System { .. }) && !ran.exists(), "{err:?}");
        // Nor can a program that is not there start.
        let err = run_stage(
            StageCommand::wrapped(Command::new("/nonexistent/wrapper"), &script),
            &cancel,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("failed to run /nonexistent/wrapper: "), "{err}");
    }

    #[test]
    fn a_wrapped_script_writes_the_job_log_and_inherits_neither_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = Cancel::never().unwrap();
        let body = "echo out; echo err >&2\nfor fd in 100 101; do if [ -e /proc/$$/fd/$fd ]; then echo \"fd $fd open\" >&2; exit 9; fi; done\nexit 4\n";
        let script = script(dir.path(), body);
        let (out, err) = (dir.path().join("out"), dir.path().join("err"));
        let mut stage = StageCommand::wrapped(exec_wrapper("echo 'wrapper: chatter' >&2"), &script);
        stage.command().stdout(std::fs::File::create(&out).unwrap());
        stderr_of(&mut stage, &err);
        let result = run_stage(stage, &cancel, Duration::from_secs(1));
        assert!(
            matches!(result, Err(Failure::Script { code: 4 })),
            "{result:?}: {}",
            std::fs::read_to_string(&err).unwrap()
        );
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "out\n");
        assert_eq!(std::fs::read_to_string(&err).unwrap(), "err\n", "the script's stderr, not the wrapper's");
    }

    #[test]
    fn a_cancelled_stage_is_cancelled_wrapped_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let script = script(dir.path(), "sleep 300\n");
        for wrapped in [false, true] {
            let (cancel, trigger) = Cancel::pair().unwrap();
            let stage = match wrapped {
                true => StageCommand::wrapped(exec_wrapper(":"), &script),
                false => StageCommand::new(&script),
            };
            let started = Instant::now();
            let thread = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                trigger.fire();
            });
            let result = run_stage(stage, &cancel, Duration::from_secs(2));
            thread.join().unwrap();
            assert!(matches!(result, Err(Failure::Cancelled)), "{result:?}");
            assert!(started.elapsed() < Duration::from_secs(5));
        }
    }

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
