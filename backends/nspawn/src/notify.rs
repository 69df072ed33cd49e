//! The sd_notify protocol: how a standalone container says it is ready.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_backend_api::process::wait_readable;
use berth_backend_api::Cancel;

/// A socket receiving sd_notify messages: a socket file in the job's own
/// state directory (mode 0700), so that only root on the host can send to
/// it; never an abstract socket, which anything sharing the host's network
/// namespace (another job) could reach.
pub struct Notify {
    socket: UnixDatagram,
    path: PathBuf,
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
    /// A fresh socket at `path` (whatever was there is replaced).
    pub fn new(path: &Path) -> std::io::Result<Notify> {
        if path.as_os_str().len() >= 108 {
            return Err(std::io::Error::other(format!(
                "{} is too long for a socket (at most 107 bytes): choose a shorter state_dir",
                path.display()
            )));
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let socket = UnixDatagram::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Notify { socket, path: path.to_owned() })
    }

    /// The value for `NOTIFY_SOCKET`.
    pub fn env(&self) -> &Path {
        &self.path
    }

    /// Waits for `READY=1`, for `process` (a pidfd) to exit, for `cancel`, or `timeout`.
    pub fn wait(&self, process: Option<&OwnedFd>, cancel: &Cancel, timeout: Duration) -> Wait {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        let mut fds = vec![self.socket.as_fd(), cancel.as_fd()];
        fds.extend(process.map(AsFd::as_fd));
        loop {
            match wait_readable(&fds, Some(deadline)) {
                Ok(None) => return Wait::Timeout,
                Ok(Some(0)) => {
                    if let Ok(n) = self.socket.recv(&mut buf) {
                        if buf[..n].split(|b| *b == b'\n').any(|l| l == b"READY=1") {
                            return Wait::Ready;
                        }
                    }
                }
                Ok(Some(1)) => return Wait::Cancelled,
                Ok(Some(_)) => return Wait::Exited,
                Err(_) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_sees_ready_and_exits() {
        let dir = tempfile::tempdir().unwrap();
        let notify = Notify::new(&dir.path().join("notify")).unwrap();
        let cancel = Cancel::never().unwrap();
        let sender = UnixDatagram::unbound().unwrap();
        sender.send_to(b"STATUS=booting\nX=1", notify.env()).unwrap();
        sender.send_to(b"X=2\nREADY=1\n", notify.env()).unwrap();
        assert_eq!(notify.wait(None, &cancel, Duration::from_secs(5)), Wait::Ready);
        assert_eq!(notify.wait(None, &cancel, Duration::from_millis(20)), Wait::Timeout);
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let fd = berth_backend_support::proc::pidfd(child.id() as i32).unwrap();
        assert_eq!(notify.wait(Some(&fd), &cancel, Duration::from_secs(5)), Wait::Exited);
        child.wait().unwrap();
        // Only root may send: the socket is 0600, in a 0700 directory.
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(notify.env()).unwrap().mode() & 0o777, 0o600);
        assert!(Notify::new(&dir.path().join("x".repeat(120))).is_err(), "too long for sun_path");
    }
}
