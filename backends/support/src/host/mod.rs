//! The host operations of the built-in backends, behind one trait.
//!
//! A backend asks its [`Host`] to run a command, send a signal, mount and
//! unmount, write a cgroup file, make or remove a cgroup, list processes and
//! mounts: [`System`] does it on this host; [`Recorder`] only records what
//! was asked, in order, and answers with scripted results, so that the exact
//! command lines, mount sequences and cgroup writes of a backend are unit
//! tests that need no root (youki's `Syscall` and `TestHelperSyscall`).
//!
//! What stays direct, outside the seam: system calls between fork and exec
//! (`sandbox::enter`, the cgroup joiners: only async-signal-safe calls may
//! run there, and they are part of the process being started), and the
//! idmapped mounts of `userns` (descriptor-based `open_tree`/`move_mount`
//! on a user namespace held by a descriptor, which a fake could not hold).

mod fake;
mod real;

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use berth_backend_api::process::Ended;
use berth_backend_api::Cancel;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::signal::Signal;

pub use fake::{Call, Recorder};
pub use real::System;

pub use crate::mounts::Mount as MountEntry;
pub use crate::proc::Process;

/// A command to run on the host, as a plain description (so that a fake
/// records it exactly): the program, its arguments, its environment and
/// working directory. Its standard input is `/dev/null`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cmd {
    /// The program (looked up on `PATH` unless it has a `/`).
    pub program: OsString,
    /// The arguments.
    pub args: Vec<OsString>,
    /// Whether the environment starts empty (not berth's).
    pub env_clear: bool,
    /// Variables set, in order.
    pub env: Vec<(OsString, OsString)>,
    /// The working directory (berth's when `None`).
    pub cwd: Option<PathBuf>,
}

impl Cmd {
    /// `program` with no arguments, berth's environment.
    pub fn new(program: impl AsRef<OsStr>) -> Cmd {
        Cmd { program: program.as_ref().to_owned(), ..Cmd::default() }
    }

    /// Adds an argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Cmd {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Cmd {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Starts from an empty environment.
    pub fn env_clear(mut self) -> Cmd {
        self.env_clear = true;
        self.env.clear();
        self
    }

    /// Sets a variable.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Cmd {
        self.env.push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// The program and arguments as text (lossy), for tests and messages.
    pub fn argv(&self) -> Vec<String> {
        std::iter::once(&self.program).chain(&self.args).map(|a| a.to_string_lossy().into_owned()).collect()
    }

    /// The `std::process::Command` of this description (stdin not set).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        if self.env_clear {
            cmd.env_clear();
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(cwd) = &self.cwd {
            cmd.current_dir(cwd);
        }
        cmd
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.argv().join(" "))
    }
}

/// What a real process needs besides its description: standard output and
/// error, `pre_exec` hooks, descriptors. Applied by [`System`] to the
/// `Command` before it starts; a [`Recorder`] never calls it.
pub type Setup<'a> = &'a mut dyn FnMut(&mut Command) -> io::Result<()>;

/// One mount(2) call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountCall {
    /// The source (a device, a directory, or a name such as `tmpfs`).
    pub source: Option<PathBuf>,
    /// The mount point.
    pub target: PathBuf,
    /// The filesystem type (none for binds and remounts).
    pub fstype: Option<String>,
    /// The flags.
    pub flags: MsFlags,
    /// The filesystem's options.
    pub data: Option<String>,
}

/// The host operations the built-in backends perform (see the module doc).
pub trait Host: Send + Sync + fmt::Debug {
    /// Runs `cmd` (set up by `setup`) to its end, stdin `/dev/null`,
    /// capturing its output.
    fn output_with(&self, cmd: &Cmd, setup: Setup<'_>) -> io::Result<Output>;

    /// Runs `cmd` to its end, stdin `/dev/null`, capturing its output.
    fn output(&self, cmd: &Cmd) -> io::Result<Output> {
        self.output_with(cmd, &mut |_| Ok(()))
    }

    /// Runs `cmd` in a process group of its own to its end or to `cancel`
    /// ([`berth_backend_api::process::run`]; with `stop`,
    /// [`berth_backend_api::process::run_with_stop`]).
    fn run(
        &self,
        cmd: &Cmd,
        setup: Setup<'_>,
        cancel: &Cancel,
        stop: Option<&mut dyn FnMut()>,
        grace: Duration,
    ) -> io::Result<Ended>;

    /// Starts `cmd` and lets it run on (never waited for): its pid.
    fn spawn(&self, cmd: &Cmd, setup: Setup<'_>) -> io::Result<i32>;

    /// A pidfd for process `pid` (readable once it exits), if it exists.
    fn pidfd(&self, pid: i32) -> Option<std::os::fd::OwnedFd>;

    /// Sends `signal` to process `pid` (`None`: only checks that it exists).
    fn signal(&self, pid: i32, signal: Option<Signal>) -> nix::Result<()>;

    /// Mounts (mount(2)).
    fn mount(&self, call: &MountCall) -> nix::Result<()>;

    /// Unmounts `target` (umount2(2)).
    fn unmount(&self, target: &Path, flags: MntFlags) -> nix::Result<()>;

    /// Writes `value` into the existing file `path` (a cgroup's knob).
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;

    /// Creates directory `path` and its missing parents (a cgroup).
    fn mkdir(&self, path: &Path) -> io::Result<()>;

    /// Removes the empty directory `path` (a cgroup).
    fn rmdir(&self, path: &Path) -> io::Result<()>;

    /// The host's processes, other than this one.
    fn processes(&self) -> Vec<Process>;

    /// Process `pid`, if it exists.
    fn process(&self, pid: i32) -> Option<Process>;

    /// The mounts of this process's mount namespace, in mount order.
    fn mounts(&self) -> Vec<MountEntry>;

    /// Where the cgroup hierarchies are mounted (`/sys/fs/cgroup`).
    fn cgroup_root(&self) -> PathBuf;

    /// Whether PID 1 is systemd (`sd_booted()`).
    fn systemd_booted(&self) -> bool;

    /// What a process entering the container of init `pid` copies from it
    /// ([`crate::container::Profile::of`]: its filters are read through ptrace).
    fn profile(&self, pid: i32) -> io::Result<crate::container::Profile>;
}

/// The real host, shared.
pub fn system() -> std::sync::Arc<dyn Host> {
    std::sync::Arc::new(System)
}
