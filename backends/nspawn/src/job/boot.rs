//! Booting the container, in standalone or systemd mode.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use berth_backend_api::process::Ended;
use berth_backend_api::{Cancel, Failure};
use tracing::debug;

use super::{boot_log, command_output, root_dir, Container, Home, PATH};
use crate::notify::{Notify, Wait};
use crate::{Nspawn, GITLAB_RUNNER, SCRIPTS_DIR};
use berth_backend_support::cgroup::JobCgroup;
use berth_backend_support::host::Cmd;
use berth_backend_support::proc;
use berth_backend_support::settings::sys;
use berth_backend_support::userns::Range;

/// The last lines of a log file, for error messages.
fn tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
        let _ = file.read_to_string(&mut text);
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The end of a boot log for an error message: `; its log ends with:` and
/// its last lines, or what to do when it has none.
pub(super) fn log_end(path: &Path) -> String {
    match tail(path, 20) {
        text if text.trim().is_empty() => {
            "; it wrote nothing to its log (raise settings.boot_timeout on a slow host; BERTH_LOG=debug shows the boot command)"
                .to_owned()
        }
        text => format!("; its log ends with:\n{text}"),
    }
}

fn bind_arg(source: &Path, target: &Path, writable: bool, idmap: bool) -> OsString {
    let mut arg = OsString::from(if writable { "--bind=" } else { "--bind-ro=" });
    arg.push(source);
    arg.push(":");
    arg.push(target);
    if idmap {
        arg.push(":idmap");
    }
    arg
}

impl Nspawn {
    /// The systemd-nspawn arguments of a job's container.
    fn nspawn_args(&self, machine: &str, home: &Home, users: Option<Range>, register: bool) -> Vec<OsString> {
        let idmap = users.is_some();
        let mut args: Vec<OsString> = vec![
            "--quiet".into(),
            "--keep-unit".into(),
            if register { "--register=yes".into() } else { "--register=no".into() },
            format!("--machine={machine}").into(),
            "--directory".into(),
            root_dir(&home.dir).into(),
            "--console=passive".into(),
            "--notify-ready=yes".into(),
        ];
        if let Some(range) = users {
            args.push(format!("--private-users={}", range.nspawn_arg()).into());
            args.push("--private-users-ownership=off".into());
        }
        if home.cache {
            args.push(bind_arg(&home.dir.join("cache"), &self.cache_dir, true, idmap));
        }
        args.push(bind_arg(&home.dir.join("scripts"), Path::new(SCRIPTS_DIR), true, false));
        if let Some(gitlab_runner) = &self.gitlab_runner {
            args.push(bind_arg(gitlab_runner, Path::new(GITLAB_RUNNER), false, false));
        }
        if self.settings.private_network {
            args.push("--private-network".into());
        }
        for bind in &self.settings.bind {
            args.push(bind_arg(&bind.source, bind.target(), bind.writable, idmap));
        }
        args.extend(self.settings.nspawn_args.iter().map(OsString::from));
        args.push("--boot".into());
        args.extend(self.settings.init_args.iter().flatten().map(OsString::from));
        args
    }

    /// The command that boots the container in standalone mode: nspawn,
    /// detached, with an empty environment and its notify socket.
    pub(super) fn standalone_command(&self, machine: &str, home: &Home, users: Option<Range>, notify: &Path) -> Cmd {
        let mut cmd = Cmd::new("systemd-nspawn").args(self.nspawn_args(machine, home, users, false)).env_clear();
        for (key, value) in self.nspawn_env() {
            cmd = cmd.env(key, value);
        }
        cmd.env("NOTIFY_SOCKET", notify)
    }

    /// The command that boots the container in systemd mode: nspawn in a
    /// transient unit `unit` of `machine.slice`, registered with machined.
    pub(super) fn systemd_command(&self, unit: &str, machine: &str, home: &Home, users: Option<Range>) -> Cmd {
        let mut cmd = Cmd::new("systemd-run")
            .arg("--quiet")
            .arg(format!("--unit={unit}"))
            .args(["--slice=machine.slice", "--collect"]);
        for prop in self.unit_properties(home) {
            cmd = cmd.arg("-p").arg(prop);
        }
        cmd.arg("--").arg("systemd-nspawn").args(self.nspawn_args(machine, home, users, true))
    }

    /// The environment of systemd-nspawn: nothing of berth's own (the
    /// runner's variables, a `SYSTEMD_SECCOMP=0` that would turn the system
    /// call filter off), and `/tmp` on the job's bounded layer.
    fn nspawn_env(&self) -> Vec<(&'static str, &'static str)> {
        let mut env = vec![("PATH", PATH)];
        if self.limits.disk.is_some() {
            env.push(("SYSTEMD_NSPAWN_TMPFS_TMP", "0"));
        }
        env
    }

    /// `TasksMax=` for the container's unit: the setting (checked at
    /// construction), else the default.
    fn tasks_max(&self) -> String {
        use berth_backend_support::limits::{Amount, DEFAULT_TASKS_MAX};
        match self.settings.tasks_max.as_ref().map(|t| t.amount()) {
            Some(Ok(Amount::Max)) => "infinity".to_owned(),
            Some(Ok(Amount::Value(n))) => n.to_string(),
            None | Some(Err(_)) => DEFAULT_TASKS_MAX.to_string(),
        }
    }

    /// Unit properties for the container's unit (systemd mode): the
    /// device policy of systemd's own `systemd-nspawn@.service` (no device
    /// but the pseudo devices, ptys and tun), delegation, limits.
    fn unit_properties(&self, home: &Home) -> Vec<String> {
        let boot = self.settings.boot_timeout().map_or(60, |t| t.as_secs());
        let mut props = vec![
            "Type=notify".to_owned(),
            "NotifyAccess=all".to_owned(),
            "Delegate=yes".to_owned(),
            "KillMode=mixed".to_owned(),
            "DevicePolicy=closed".to_owned(),
            "DeviceAllow=/dev/net/tun rwm".to_owned(),
            "DeviceAllow=char-pts rw".to_owned(),
            format!("TimeoutStartSec={boot}s"),
            "TimeoutStopSec=5s".to_owned(),
            format!("TasksMax={}", self.tasks_max()),
            format!("MemoryMax={}", self.settings.memory_max.as_deref().unwrap_or(crate::settings::DEFAULT_MEMORY_MAX)),
            // Who made this unit: reap recognises a job's container by it.
            format!("Description={}", home.description),
        ];
        if let Some(quota) = &self.settings.cpu_quota {
            props.push(format!("CPUQuota={quota}"));
        }
        if let Some(weight) = self.settings.cpu_weight {
            props.push(format!("CPUWeight={weight}"));
        }
        for (key, value) in self.nspawn_env() {
            props.push(format!("Environment={key}={value}"));
        }
        props
    }
}

pub(super) fn boot_standalone(
    backend: &Nspawn,
    home: &Home,
    container: &mut Container,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<(), Failure> {
    let machine = container.machine.clone();
    let notify = Notify::new(&home.dir.join("notify")).map_err(sys("failed to create the readiness socket"))?;
    let log_path = boot_log(&home.dir);
    let log = File::create(&log_path).map_err(sys(format!("failed to create {}", log_path.display())))?;
    let log2 = log.try_clone().map_err(sys("failed to open the boot log"))?;
    let cmd = backend.standalone_command(&machine, home, container.users, notify.env());
    let host = &backend.host;
    let mut cgroup = JobCgroup::on(host.clone(), &machine);
    cgroup.create(&backend.limits).map_err(sys("failed to create the container's cgroup with its resource limits"))?;
    if let Some(range) = container.users {
        cgroup.give(range).map_err(sys("failed to delegate the container's cgroup to its root"))?;
    }
    let join = cgroup.joiner().map_err(sys("failed to prepare the container's cgroup"))?;
    let mut io = Some((log, log2, join));
    let mut setup = |cmd: &mut Command| {
        let Some((log, log2, join)) = io.take() else { return Ok(()) };
        cmd.stdout(log).stderr(log2);
        // Its own process group: the runner's signals to the hook's group are not for it.
        cmd.process_group(0);
        // SAFETY: the closure only performs async-signal-safe system calls (see JobCgroup::joiner).
        unsafe { cmd.pre_exec(join) };
        Ok(())
    };
    debug!(%cmd, "booting");
    let pid = host.spawn(&cmd, &mut setup).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            Failure::system_with("systemd-nspawn is not installed (apt-get install systemd-container)", e)
        }
        // The joiner's errors come back from spawn too.
        _ => Failure::system_with(format!("failed to start systemd-nspawn in the container's cgroup ({cgroup})"), e),
    })?;
    container.nspawn = Some((pid, host.process(pid).map_or(0, |p| p.start_time)));
    home.save(container)?;
    let pidfd = host.pidfd(pid);
    let ready = notify.wait(pidfd.as_ref(), cancel, timeout);
    match ready {
        Wait::Ready => {}
        Wait::Cancelled => return Err(Failure::Cancelled),
        Wait::Exited => {
            return Err(Failure::system(format!(
                "systemd-nspawn exited while booting the container{}",
                log_end(&log_path)
            )))
        }
        Wait::Timeout => {
            return Err(Failure::system(format!(
                "the container was not ready after {} s (settings.boot_timeout){}",
                timeout.as_secs(),
                log_end(&log_path)
            )))
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    let leader = loop {
        if let Some(leader) = proc::leader_of(pid) {
            break leader;
        }
        if Instant::now() > deadline {
            return Err(Failure::system(format!("container {machine} is ready but its init process was not found")));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    container.leader = Some(leader);
    container.leader_start = host.process(leader).map(|p| p.start_time);
    home.save(container)?;
    Ok(())
}

pub(super) fn boot_systemd(
    backend: &Nspawn,
    home: &Home,
    container: &mut Container,
    cancel: &Cancel,
) -> Result<(), Failure> {
    // The job's machine name, or a warm container's: `<machine>.service`.
    let unit = format!("{}.service", container.machine);
    container.unit = Some(unit.clone());
    home.save(container)?;
    let cmd = backend.systemd_command(&unit, &container.machine, home, container.users);
    let log_path = boot_log(&home.dir);
    let log = File::create(&log_path).map_err(sys(format!("failed to create {}", log_path.display())))?;
    let log2 = log.try_clone().map_err(sys("failed to open the boot log"))?;
    let mut io = Some((log, log2));
    let mut setup = |cmd: &mut Command| {
        if let Some((log, log2)) = io.take() {
            cmd.stdout(log).stderr(log2);
        }
        Ok(())
    };
    debug!(%cmd, "booting");
    let host = &*backend.host;
    let stop = Cmd::new("systemctl").args(["stop", "--no-block", &unit]);
    let ended = host
        .run(
            &cmd,
            &mut setup,
            cancel,
            Some(&mut || {
                let _ = command_output(host, &stop);
            }),
            Duration::from_secs(2),
        )
        .map_err(sys("failed to run systemd-run (is systemd-container installed?)"))?;
    match ended {
        Ended::Exited(0) => {}
        Ended::Cancelled => return Err(Failure::Cancelled),
        Ended::Exited(code) => {
            let journal =
                command_output(host, &Cmd::new("journalctl").args(["--no-pager", "-q", "-n", "20", "-u", &unit]))
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
            return Err(Failure::system(format!(
                "the container's unit {unit} failed to start (systemd-run exited {code}): {}\n{journal}",
                tail(&log_path, 5)
            )));
        }
    }
    let out = command_output(host, &Cmd::new("systemctl").args(["show", &unit, "-p", "MainPID", "--value"]))?;
    // The unit's main process is nspawn; its child that is PID 1 of its own namespace is the container's init.
    let nspawn: Option<i32> = String::from_utf8_lossy(&out.stdout).trim().parse().ok().filter(|p| *p > 0);
    container.leader = nspawn.and_then(proc::leader_of);
    container.leader_start = container.leader.and_then(|pid| host.process(pid)).map(|p| p.start_time);
    home.save(container)?;
    Ok(())
}
