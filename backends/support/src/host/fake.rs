//! [`Recorder`]: a host that only records what it is asked, for tests.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output};
use std::sync::Mutex;
use std::time::Duration;

use berth_backend_api::process::Ended;
use berth_backend_api::Cancel;
use nix::mount::MntFlags;
use nix::sys::signal::Signal;

use super::{Cmd, Host, MountCall, MountEntry, Process, Setup};

/// One operation asked of a [`Recorder`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// [`Host::output`] or [`Host::output_with`].
    Output(Cmd),
    /// [`Host::run`] (`stop`: whether a stop function was given).
    Run {
        /// The command.
        cmd: Cmd,
        /// Whether a cancel would call a stop function first.
        stop: bool,
    },
    /// [`Host::spawn`].
    Spawn(Cmd),
    /// [`Host::signal`].
    Signal {
        /// The process.
        pid: i32,
        /// The signal (`None`: an existence check).
        signal: Option<Signal>,
    },
    /// [`Host::mount`].
    Mount(MountCall),
    /// [`Host::unmount`].
    Unmount {
        /// The mount point.
        target: PathBuf,
        /// The flags.
        flags: MntFlags,
    },
    /// [`Host::write`].
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
    },
    /// [`Host::mkdir`].
    Mkdir(PathBuf),
    /// [`Host::rmdir`].
    Rmdir(PathBuf),
    /// [`Host::profile`].
    Profile(i32),
}

impl std::fmt::Display for Call {
    /// One line, for readable expectations: `mount SOURCE TARGET TYPE FLAGS DATA`
    /// (`-` for what is not given), `run ARGV`, `write PATH VALUE`, ...
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = |p: &Option<PathBuf>| p.as_ref().map_or("-".to_owned(), |p| p.display().to_string());
        match self {
            Call::Output(cmd) => write!(f, "output {cmd}"),
            Call::Run { cmd, .. } => write!(f, "run {cmd}"),
            Call::Spawn(cmd) => write!(f, "spawn {cmd}"),
            Call::Signal { pid, signal } => write!(f, "signal {pid} {}", signal.map_or("0", Signal::as_str)),
            Call::Mount(m) => write!(
                f,
                "mount {} {} {} {} {}",
                path(&m.source),
                m.target.display(),
                m.fstype.as_deref().unwrap_or("-"),
                flags(&m.flags),
                m.data.as_deref().unwrap_or("-")
            ),
            Call::Unmount { target, flags } => write!(f, "unmount {} {}", target.display(), self::flags(flags)),
            Call::Write { path, value } => write!(f, "write {} {value}", path.display()),
            Call::Mkdir(path) => write!(f, "mkdir {}", path.display()),
            Call::Rmdir(path) => write!(f, "rmdir {}", path.display()),
            Call::Profile(pid) => write!(f, "profile {pid}"),
        }
    }
}

/// `MS_BIND | MS_REC`: the names of a flag set, from its `Debug` (`MsFlags(...)`).
fn flags(flags: &dyn std::fmt::Debug) -> String {
    let debug = format!("{flags:?}");
    let inner = debug.split_once('(').map_or(debug.as_str(), |(_, rest)| rest);
    inner.strip_suffix(')').unwrap_or(inner).to_owned()
}

#[derive(Debug, Default)]
struct Script {
    calls: Vec<Call>,
    outputs: HashMap<String, VecDeque<Output>>,
    ended: VecDeque<Ended>,
    processes: Vec<Process>,
    mounts: Vec<MountEntry>,
    next_pid: i32,
}

/// A host that records every operation asked of it, in order, as a [`Call`],
/// and does none: a test aid for the exact command lines, mount sequences
/// and cgroup writes of a backend, without root.
///
/// Its answers are scripted, by default success: commands exit 0 with no
/// output ([`Recorder::answer`] scripts another), runs exit 0
/// ([`Recorder::end_runs`]), spawned processes get pids from 1000 on, no
/// process exists ([`Recorder::set_processes`]; a signal to another one
/// fails with `ESRCH`, SIGKILL ends one; its pidfd never becomes readable); the mount table is what
/// [`Recorder::set_mounts`] set, plus what was mounted since, minus what was
/// unmounted. Its cgroup root is a directory of the test's
/// ([`Recorder::with_cgroup_root`]), read for real, never written.
#[derive(Debug)]
pub struct Recorder {
    script: Mutex<Script>,
    cgroup_root: PathBuf,
    systemd: bool,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    /// A recorder with default answers, its cgroup root a directory that
    /// does not exist (no cgroup hierarchy), without systemd.
    pub fn new() -> Recorder {
        Recorder {
            script: Mutex::new(Script { next_pid: 1000, ..Script::default() }),
            cgroup_root: PathBuf::from("/nonexistent/cgroup"),
            systemd: false,
        }
    }

    /// The same, with the cgroup hierarchies under `root`.
    pub fn with_cgroup_root(mut self, root: &Path) -> Recorder {
        self.cgroup_root = root.to_owned();
        self
    }

    /// The same, on a host whose PID 1 is systemd.
    pub fn with_systemd(mut self) -> Recorder {
        self.systemd = true;
        self
    }

    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.script.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the next [`Host::output`] of `program` answers: exit `code`, `stdout`.
    pub fn answer(&self, program: &str, code: i32, stdout: &str) {
        let output =
            Output { status: ExitStatus::from_raw(code << 8), stdout: stdout.as_bytes().to_vec(), stderr: Vec::new() };
        self.script().outputs.entry(program.to_owned()).or_default().push_back(output);
    }

    /// How the next [`Host::run`]s end, in order.
    pub fn end_runs(&self, ended: impl IntoIterator<Item = Ended>) {
        self.script().ended.extend(ended);
    }

    /// The processes the host has.
    pub fn set_processes(&self, processes: Vec<Process>) {
        self.script().processes = processes;
    }

    /// The host's mount table.
    pub fn set_mounts(&self, mounts: Vec<MountEntry>) {
        self.script().mounts = mounts;
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.script().calls.clone()
    }

    /// Every call so far, forgotten.
    pub fn take(&self) -> Vec<Call> {
        std::mem::take(&mut self.script().calls)
    }

    /// Every call so far, one line each ([`Call`]'s `Display`).
    pub fn lines(&self) -> Vec<String> {
        self.calls().iter().map(Call::to_string).collect()
    }

    /// The argv of every command run, output or spawned so far, in order.
    pub fn commands(&self) -> Vec<Vec<String>> {
        self.calls()
            .into_iter()
            .filter_map(|call| match call {
                Call::Output(cmd) | Call::Run { cmd, .. } | Call::Spawn(cmd) => Some(cmd.argv()),
                _ => None,
            })
            .collect()
    }

    fn record(&self, call: Call) {
        self.script().calls.push(call);
    }
}

impl Host for Recorder {
    fn output_with(&self, cmd: &Cmd, _setup: Setup<'_>) -> io::Result<Output> {
        self.record(Call::Output(cmd.clone()));
        let program = cmd.program.to_string_lossy().into_owned();
        let scripted = self.script().outputs.get_mut(&program).and_then(VecDeque::pop_front);
        Ok(scripted.unwrap_or(Output { status: ExitStatus::from_raw(0), stdout: Vec::new(), stderr: Vec::new() }))
    }

    fn run(
        &self,
        cmd: &Cmd,
        _setup: Setup<'_>,
        _cancel: &Cancel,
        stop: Option<&mut dyn FnMut()>,
        _grace: Duration,
    ) -> io::Result<Ended> {
        self.record(Call::Run { cmd: cmd.clone(), stop: stop.is_some() });
        let ended = self.script().ended.pop_front().unwrap_or(Ended::Exited(0));
        if let (Ended::Cancelled, Some(stop)) = (ended, stop) {
            stop();
        }
        Ok(ended)
    }

    fn spawn(&self, cmd: &Cmd, _setup: Setup<'_>) -> io::Result<i32> {
        self.record(Call::Spawn(cmd.clone()));
        let mut script = self.script();
        script.next_pid += 1;
        Ok(script.next_pid - 1)
    }

    fn pidfd(&self, pid: i32) -> Option<std::os::fd::OwnedFd> {
        // A real descriptor (of this process, which outlives the test) for a
        // scripted process: it never becomes readable.
        let known = self.script().processes.iter().any(|p| p.pid == pid);
        known.then(|| crate::proc::pidfd(std::process::id() as i32)).flatten()
    }

    fn signal(&self, pid: i32, signal: Option<Signal>) -> nix::Result<()> {
        self.record(Call::Signal { pid, signal });
        let mut script = self.script();
        let known = script.processes.iter().position(|p| p.pid == pid);
        match (known, signal) {
            (None, _) => Err(nix::errno::Errno::ESRCH),
            // SIGKILL ends a process at once.
            (Some(i), Some(Signal::SIGKILL)) => {
                script.processes.remove(i);
                Ok(())
            }
            (Some(_), _) => Ok(()),
        }
    }

    fn mount(&self, call: &MountCall) -> nix::Result<()> {
        self.record(Call::Mount(call.clone()));
        use nix::mount::MsFlags;
        // A new mount (not a remount or a propagation change) enters the table.
        if (call.fstype.is_some() || call.flags.contains(MsFlags::MS_BIND)) && !call.flags.contains(MsFlags::MS_REMOUNT)
        {
            self.script().mounts.push(MountEntry { point: call.target.clone(), ..MountEntry::default() });
        }
        Ok(())
    }

    fn unmount(&self, target: &Path, flags: MntFlags) -> nix::Result<()> {
        self.record(Call::Unmount { target: target.to_owned(), flags });
        let mut script = self.script();
        if let Some(last) = script.mounts.iter().rposition(|m| m.point == target) {
            script.mounts.remove(last);
        }
        Ok(())
    }

    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        self.record(Call::Write { path: path.to_owned(), value: value.to_owned() });
        Ok(())
    }

    fn mkdir(&self, path: &Path) -> io::Result<()> {
        self.record(Call::Mkdir(path.to_owned()));
        Ok(())
    }

    fn rmdir(&self, path: &Path) -> io::Result<()> {
        self.record(Call::Rmdir(path.to_owned()));
        Ok(())
    }

    fn processes(&self) -> Vec<Process> {
        self.script().processes.clone()
    }

    fn process(&self, pid: i32) -> Option<Process> {
        self.script().processes.iter().find(|p| p.pid == pid).cloned()
    }

    fn mounts(&self) -> Vec<MountEntry> {
        self.script().mounts.clone()
    }

    fn cgroup_root(&self) -> PathBuf {
        self.cgroup_root.clone()
    }

    fn systemd_booted(&self) -> bool {
        self.systemd
    }

    /// Recorded; a recording host has no process to copy a profile from.
    fn profile(&self, pid: i32) -> io::Result<crate::container::Profile> {
        self.record(Call::Profile(pid));
        Err(io::Error::new(io::ErrorKind::Unsupported, "a recording host has no container profiles"))
    }
}
