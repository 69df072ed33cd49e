//! [`System`]: the host operations done on this host.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use berth_backend_api::process::{self, Ended};
use berth_backend_api::Cancel;
use nix::mount::{mount, umount2, MntFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{Cmd, Host, MountCall, MountEntry, Process, Setup};

/// Where the cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// This host: every operation is the system call or program it names.
#[derive(Debug, Clone, Copy, Default)]
pub struct System;

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

impl Host for System {
    fn output_with(&self, cmd: &Cmd, setup: Setup<'_>) -> io::Result<Output> {
        let mut command = cmd.command();
        command.stdin(Stdio::null());
        setup(&mut command)?;
        command.output()
    }

    fn run(
        &self,
        cmd: &Cmd,
        setup: Setup<'_>,
        cancel: &Cancel,
        stop: Option<&mut dyn FnMut()>,
        grace: Duration,
    ) -> io::Result<Ended> {
        let mut command = cmd.command();
        command.stdin(Stdio::null());
        setup(&mut command)?;
        match stop {
            Some(stop) => process::run_with_stop(&mut command, cancel, stop, grace),
            None => process::run(&mut command, cancel, grace),
        }
    }

    fn spawn(&self, cmd: &Cmd, setup: Setup<'_>) -> io::Result<i32> {
        let mut command = cmd.command();
        command.stdin(Stdio::null());
        setup(&mut command)?;
        // Dropping the child neither waits for it nor kills it.
        Ok(command.spawn()?.id() as i32)
    }

    fn pidfd(&self, pid: i32) -> Option<std::os::fd::OwnedFd> {
        crate::proc::pidfd(pid)
    }

    fn signal(&self, pid: i32, signal: Option<Signal>) -> nix::Result<()> {
        kill(Pid::from_raw(pid), signal)
    }

    fn mount(&self, call: &MountCall) -> nix::Result<()> {
        mount(call.source.as_deref(), &call.target, call.fstype.as_deref(), call.flags, call.data.as_deref())
    }

    fn unmount(&self, target: &Path, flags: MntFlags) -> nix::Result<()> {
        umount2(target, flags)
    }

    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        std::fs::write(path, value).map_err(|e| with_path(e, path))
    }

    fn mkdir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path).map_err(|e| with_path(e, path))
    }

    fn rmdir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }

    fn processes(&self) -> Vec<Process> {
        crate::proc::processes()
    }

    fn process(&self, pid: i32) -> Option<Process> {
        Process::read(pid)
    }

    fn mounts(&self) -> Vec<MountEntry> {
        crate::mounts::mountinfo()
    }

    fn cgroup_root(&self) -> PathBuf {
        PathBuf::from(CGROUP_ROOT)
    }

    fn systemd_booted(&self) -> bool {
        Path::new("/run/systemd/system").is_dir()
    }

    fn profile(&self, pid: i32) -> io::Result<crate::container::Profile> {
        crate::container::Profile::of(pid)
    }
}
