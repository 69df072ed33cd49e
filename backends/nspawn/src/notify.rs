//! The sd_notify protocol: how a standalone container says it is ready.

use std::os::fd::{AsFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use berth_backend_api::Cancel;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// A socket receiving sd_notify messages (`NOTIFY_SOCKET=@name`, abstract, so
/// nothing is left on disk).
pub struct Notify {
    socket: UnixDatagram,
    name: String,
}

/// How waiting for readiness ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Wait {
    /// `READY=1` arrived.
    Ready,
    /// The watched process exited first.
    Exited,
    /// The time ran out.
    Timeout,
    /// The runner cancelled.
    Cancelled,
}

impl Notify {
    /// A fresh socket named after `tag`.
    pub fn new(tag: &str) -> std::io::Result<Notify> {
        let name = format!("berth-notify-{tag}-{}", std::process::id());
        let socket = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
        Ok(Notify { socket, name })
    }

    /// The value for `NOTIFY_SOCKET`.
    pub fn env(&self) -> String {
        format!("@{}", self.name)
    }

    /// Waits for `READY=1`, for `process` (a pidfd) to exit, for `cancel`, or `timeout`.
    pub fn wait(&self, process: Option<&OwnedFd>, cancel: &Cancel, timeout: Duration) -> Wait {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Wait::Timeout;
            }
            let mut fds = vec![
                PollFd::new(self.socket.as_fd(), PollFlags::POLLIN),
                PollFd::new(cancel.as_fd(), PollFlags::POLLIN),
            ];
            if let Some(process) = process {
                fds.push(PollFd::new(process.as_fd(), PollFlags::POLLIN));
            }
            let millis = left.as_millis().clamp(1, 60_000) as i32;
            match poll(&mut fds, PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX)) {
                Ok(n) if n > 0 => {}
                _ => continue,
            }
            if fds[0].any().unwrap_or(false) {
                if let Ok(n) = self.socket.recv(&mut buf) {
                    if buf[..n].split(|b| *b == b'\n').any(|l| l == b"READY=1") {
                        return Wait::Ready;
                    }
                }
                continue;
            }
            if fds[1].any().unwrap_or(false) {
                return Wait::Cancelled;
            }
            if fds.get(2).and_then(|f| f.any()).unwrap_or(false) {
                return Wait::Exited;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_sees_ready_and_exits() {
        let notify = Notify::new("test").unwrap();
        let cancel = Cancel::never().unwrap();
        let sender = UnixDatagram::unbound().unwrap();
        let addr = SocketAddr::from_abstract_name(&notify.env().as_bytes()[1..]).unwrap();
        sender.send_to_addr(b"STATUS=booting\nX=1", &addr).unwrap();
        sender.send_to_addr(b"X=2\nREADY=1\n", &addr).unwrap();
        assert_eq!(notify.wait(None, &cancel, Duration::from_secs(5)), Wait::Ready);
        assert_eq!(notify.wait(None, &cancel, Duration::from_millis(20)), Wait::Timeout);
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let fd = berth_backend_support::proc::pidfd(child.id() as i32).unwrap();
        assert_eq!(notify.wait(Some(&fd), &cancel, Duration::from_secs(5)), Wait::Exited);
        child.wait().unwrap();
    }
}
