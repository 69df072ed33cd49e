//! Cancellation: a pollable signal that the runner wants the operation to stop.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::unistd::pipe2;

/// The runner's request to stop: becomes readable (and stays readable) once
/// the process received SIGTERM.
///
/// A backend polls [`Cancel::as_fd`] next to what it waits for, or calls
/// [`Cancel::is_cancelled`] between steps, and returns
/// [`Failure::Cancelled`](crate::Failure::Cancelled) promptly after undoing
/// what it can. `berth` creates it; tests use [`Cancel::pair`].
#[derive(Debug)]
pub struct Cancel {
    read: OwnedFd,
    // Keeps the write end open for `Cancel::never`, so the read end never sees EOF.
    _keep: Option<OwnedFd>,
}

/// The sending side of a [`Cancel`] made with [`Cancel::pair`].
#[derive(Debug)]
pub struct CancelTrigger {
    write: OwnedFd,
}

impl Cancel {
    /// A cancel signal backed by `read`, the read end of a pipe that something
    /// (a signal handler) writes to on SIGTERM.
    pub fn from_fd(read: OwnedFd) -> Self {
        Cancel { read, _keep: None }
    }

    /// A cancel signal and the trigger that fires it. Neither end is
    /// inherited by a program this process starts (close-on-exec).
    pub fn pair() -> std::io::Result<(Cancel, CancelTrigger)> {
        let (read, write) = pipe2(OFlag::O_CLOEXEC)?;
        Ok((Cancel { read, _keep: None }, CancelTrigger { write }))
    }

    /// A cancel signal that never fires.
    pub fn never() -> std::io::Result<Cancel> {
        let (read, write) = pipe2(OFlag::O_CLOEXEC)?;
        Ok(Cancel { read, _keep: Some(write) })
    }

    /// Whether the runner asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.wait(Duration::ZERO)
    }

    /// Sleeps until cancelled or until `timeout` passed; true when cancelled.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now().checked_add(timeout);
        matches!(crate::process::wait_readable(&[self.read.as_fd()], deadline), Ok(Some(_)))
    }
}

impl AsFd for Cancel {
    /// The descriptor that becomes readable on cancel; poll it for `POLLIN`.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}

impl AsRawFd for Cancel {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.read.as_raw_fd()
    }
}

impl CancelTrigger {
    /// Fires the cancel signal.
    pub fn fire(&self) {
        // A full pipe is already readable, so a failed write changes nothing.
        let _ = nix::unistd::write(&self.write, b"x");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_once_triggered_and_stays_fired() {
        let (cancel, trigger) = Cancel::pair().unwrap();
        assert!(!cancel.is_cancelled());
        trigger.fire();
        assert!(cancel.is_cancelled());
        assert!(cancel.is_cancelled());
        assert!(cancel.wait(Duration::from_secs(5)));
    }

    #[test]
    fn no_program_started_inherits_a_cancel_pipe() {
        let (cancel, trigger) = Cancel::pair().unwrap();
        let never = Cancel::never().unwrap();
        for (what, fd) in [("cancel", &cancel.read), ("trigger", &trigger.write), ("never", &never.read)] {
            let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert!(flags & libc::FD_CLOEXEC != 0, "the {what} pipe would leak into a started program");
        }
    }

    #[test]
    fn never_does_not_fire() {
        let cancel = Cancel::never().unwrap();
        assert!(!cancel.wait(Duration::from_millis(20)));
    }
}
