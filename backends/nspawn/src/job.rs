//! A job's container: boot, stages, teardown, in either host mode.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_backend_api::process::{self, Ended};
use berth_backend_api::{Cancel, Failure, JobContext, JobKey, JobState};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::cgroup::JobCgroup;
use crate::notify::{Notify, Wait};
use crate::settings::Mode;
use crate::{machine_name, Nspawn, BUILDS_DIR, CACHE_DIR, GITLAB_RUNNER, SCRIPTS_DIR};
use berth_backend_support::image::Image;
use berth_backend_support::proc as host;
use berth_backend_support::rootfs;

/// What prepare made, found again by run and cleanup (`container.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Container {
    mode: ModeName,
    machine: String,
    image: String,
    /// The nspawn process and its start time (standalone mode).
    nspawn: Option<(i32, u64)>,
    /// The container's init, as seen from the host.
    leader: Option<i32>,
    /// The transient unit running nspawn (systemd mode).
    unit: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ModeName {
    Systemd,
    Standalone,
}

const RECORD: &str = "container.json";
/// How long a stage may take to stop after a cancel before its unit is killed.
const STOP_TIMEOUT: &str = "3s";

fn upper_dir(state: &JobState) -> PathBuf {
    state.dir().join("upper")
}

fn scripts_dir(state: &JobState) -> PathBuf {
    state.dir().join("scripts")
}

fn boot_log(state: &JobState) -> PathBuf {
    state.dir().join("boot.log")
}

fn unit_name(key: &JobKey) -> String {
    format!("berth-{key}.service")
}

fn mkdir(path: &Path) -> Result<(), Failure> {
    fs::create_dir_all(path).map_err(|e| Failure::system_with(format!("failed to create {}", path.display()), e))
}

/// Masks units or generators for the container's systemd: a link to
/// /dev/null in `dir` of the job's fresh overlay layer (the image is not
/// touched; nothing in the layer was written by a container yet).
fn mask(dir: &Path, names: &[String]) -> Result<(), Failure> {
    if names.is_empty() {
        return Ok(());
    }
    mkdir(dir)?;
    for name in names {
        let link = dir.join(name);
        std::os::unix::fs::symlink("/dev/null", &link)
            .map_err(|e| Failure::system_with(format!("failed to mask {name} ({})", link.display()), e))?;
    }
    Ok(())
}

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

fn bind_arg(source: &Path, target: &Path, writable: bool) -> OsString {
    let mut arg = OsString::from(if writable { "--bind=" } else { "--bind-ro=" });
    arg.push(source);
    arg.push(":");
    arg.push(target);
    arg
}

impl Nspawn {
    /// The systemd-nspawn arguments of a job's container.
    fn nspawn_args(&self, machine: &str, root: &Path, state: &JobState, register: bool) -> Vec<OsString> {
        let mut overlay = OsString::from("--overlay=");
        overlay.push(root);
        overlay.push(":");
        overlay.push(upper_dir(state));
        overlay.push(":/");
        let mut args: Vec<OsString> = vec![
            "--quiet".into(),
            "--keep-unit".into(),
            if register { "--register=yes".into() } else { "--register=no".into() },
            format!("--machine={machine}").into(),
            "--directory".into(),
            root.into(),
            overlay,
            "--console=passive".into(),
            "--notify-ready=yes".into(),
            bind_arg(&self.cache_host_dir, Path::new(CACHE_DIR), true),
            bind_arg(&scripts_dir(state), Path::new(SCRIPTS_DIR), true),
        ];
        if let Some(gitlab_runner) = &self.gitlab_runner {
            args.push(bind_arg(gitlab_runner, Path::new(GITLAB_RUNNER), false));
        }
        if self.settings.private_network {
            args.push("--private-network".into());
        }
        for bind in &self.settings.bind {
            args.push(bind_arg(&bind.source, bind.target(), bind.writable));
        }
        args.extend(self.settings.nspawn_args.iter().map(OsString::from));
        args.push("--boot".into());
        args.extend(self.settings.init_args.iter().flatten().map(OsString::from));
        args
    }

    /// Unit properties for the container's unit (systemd mode).
    fn unit_properties(&self) -> Vec<String> {
        let boot = self.settings.boot_timeout.unwrap_or(60);
        let mut props = vec![
            "Type=notify".to_owned(),
            "NotifyAccess=all".to_owned(),
            "Delegate=yes".to_owned(),
            "KillMode=mixed".to_owned(),
            format!("TimeoutStartSec={boot}s"),
            "TimeoutStopSec=5s".to_owned(),
            format!("TasksMax={}", self.settings.tasks_max.map_or(crate::limits::DEFAULT_TASKS_MAX, u64::from)),
        ];
        if let Some(memory) = &self.settings.memory_max {
            props.push(format!("MemoryMax={memory}"));
        }
        if let Some(quota) = &self.settings.cpu_quota {
            props.push(format!("CPUQuota={quota}"));
        }
        if let Some(weight) = self.settings.cpu_weight {
            props.push(format!("CPUWeight={weight}"));
        }
        props
    }
}

pub(crate) fn prepare(backend: &Nspawn, job: &JobContext, state: &JobState, cancel: &Cancel) -> Result<(), Failure> {
    let started = Instant::now();
    let image = backend.images.resolve(job.image())?;
    let machine = machine_name(job.key());
    if !host::pids_with_arg(&format!("--machine={machine}")).is_empty() {
        return Err(Failure::system(format!(
            "a container named {machine} already runs on this host: another berth configuration has a runner named {:?} (runner names must be unique per host)",
            job.key().runner()
        )));
    }
    let upper = upper_dir(state);
    // An earlier attempt's layer (its container is gone: checked above) is
    // not reused: the container could write it, and berth writes into it now.
    if upper.exists() {
        fs::remove_dir_all(&upper).map_err(|e| {
            Failure::system_with(format!("failed to remove {} of an earlier attempt", upper.display()), e)
        })?;
    }
    mkdir(&upper.join("etc"))?;
    mkdir(&upper.join(BUILDS_DIR.trim_start_matches('/')))?;
    // The image's /etc/hostname would win over --machine; an empty machine-id
    // makes systemd generate one per boot instead of every job sharing the image's.
    for (file, content) in [("etc/hostname", format!("{machine}\n")), ("etc/machine-id", String::new())] {
        let path = upper.join(file);
        fs::write(&path, content)
            .map_err(|e| Failure::system_with(format!("failed to write {}", path.display()), e))?;
    }
    mask(&upper.join("etc/systemd/system"), &backend.masked_units)?;
    mask(&upper.join("etc/systemd/system-generators"), &backend.masked_generators)?;
    mkdir(&scripts_dir(state))?;
    mkdir(&backend.cache_host_dir)?;
    if backend.gitlab_runner.is_none() {
        println!("WARNING: gitlab-runner is not installed on this host: cache and artifact stages will fail in the container (ask the admin to install it or set settings.gitlab_runner)");
    }
    let timeout = Duration::from_secs(backend.settings.boot_timeout.unwrap_or(60));
    let container = match backend.mode {
        Mode::Systemd => boot_systemd(backend, job, state, &machine, &image, timeout, cancel)?,
        _ => boot_standalone(backend, job, state, &machine, &image, timeout, cancel)?,
    };
    let mode = match container.mode {
        ModeName::Systemd => "systemd",
        ModeName::Standalone => "standalone",
    };
    let generation = image.generation.map(|g| format!(", generation {g}")).unwrap_or_default();
    println!(
        "Booted a container from image {}{generation} ({mode} mode) in {:.2} s",
        container.image,
        started.elapsed().as_secs_f64()
    );
    info!(job = %job.key(), machine, image = container.image, mode, "container ready");
    Ok(())
}

fn boot_standalone(
    backend: &Nspawn,
    job: &JobContext,
    state: &JobState,
    machine: &str,
    image: &Image,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<Container, Failure> {
    let root = image.root.as_path();
    let image = image.name.clone();
    let notify =
        Notify::new(&job.key().to_string()).map_err(|e| Failure::system_with("failed to create a notify socket", e))?;
    let log_path = boot_log(state);
    let log = File::create(&log_path)
        .map_err(|e| Failure::system_with(format!("failed to create {}", log_path.display()), e))?;
    let log2 = log.try_clone().map_err(|e| Failure::system_with("failed to open the boot log", e))?;
    let mut cmd = Command::new("systemd-nspawn");
    cmd.args(backend.nspawn_args(machine, root, state, false))
        .env("NOTIFY_SOCKET", notify.env())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    // Its own process group: the runner's signals to the hook's group are not for it.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut cgroup = JobCgroup::of(machine);
    cgroup
        .create(&backend.limits)
        .map_err(|e| Failure::system_with("failed to create the container's cgroup with its resource limits", e))?;
    let join = cgroup.joiner().map_err(|e| Failure::system_with("failed to prepare the container's cgroup", e))?;
    // SAFETY: the closure only performs async-signal-safe system calls (see JobCgroup::joiner).
    unsafe { std::os::unix::process::CommandExt::pre_exec(&mut cmd, join) };
    debug!(?cmd, "booting");
    let child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            Failure::system_with("systemd-nspawn is not installed (apt-get install systemd-container)", e)
        }
        // The joiner's errors come back from spawn too.
        _ => Failure::system_with(format!("failed to start systemd-nspawn in the container's cgroup ({cgroup})"), e),
    })?;
    let pid = child.id() as i32;
    let mut container = Container {
        mode: ModeName::Standalone,
        machine: machine.to_owned(),
        image,
        nspawn: Some((pid, host::start_time(pid).unwrap_or(0))),
        leader: None,
        unit: None,
    };
    state.save(RECORD, &container)?;
    let pidfd = host::pidfd(pid);
    let ready = notify.wait(pidfd.as_ref(), cancel, timeout);
    // Reap nspawn if it already exited; otherwise it outlives this process.
    drop(child);
    match ready {
        Wait::Ready => {}
        Wait::Cancelled => return Err(Failure::Cancelled),
        Wait::Exited => {
            return Err(Failure::system(format!(
                "systemd-nspawn exited while booting the container; its log ends with:\n{}",
                tail(&log_path, 20)
            )))
        }
        Wait::Timeout => {
            return Err(Failure::system(format!(
                "the container was not ready after {} s (settings.boot_timeout); its log ends with:\n{}",
                timeout.as_secs(),
                tail(&log_path, 20)
            )))
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    container.leader = loop {
        if let Some(leader) = host::leader_of(pid) {
            break Some(leader);
        }
        if Instant::now() > deadline {
            return Err(Failure::system(format!("container {machine} is ready but its init process was not found")));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    state.save(RECORD, &container)?;
    Ok(container)
}

/// Runs a host command to its end, capturing its output.
fn command_output(cmd: &mut Command) -> Result<std::process::Output, Failure> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null()).output().map_err(|e| Failure::system_with(format!("failed to run {program}"), e))
}

fn boot_systemd(
    backend: &Nspawn,
    job: &JobContext,
    state: &JobState,
    machine: &str,
    image: &Image,
    _timeout: Duration,
    cancel: &Cancel,
) -> Result<Container, Failure> {
    let root = image.root.as_path();
    let image = image.name.clone();
    let unit = unit_name(job.key());
    let mut container = Container {
        mode: ModeName::Systemd,
        machine: machine.to_owned(),
        image,
        nspawn: None,
        leader: None,
        unit: Some(unit.clone()),
    };
    state.save(RECORD, &container)?;
    let mut cmd = Command::new("systemd-run");
    cmd.arg("--quiet").arg(format!("--unit={unit}")).arg("--slice=machine.slice").arg("--collect");
    for prop in backend.unit_properties() {
        cmd.arg("-p").arg(prop);
    }
    cmd.arg("--").arg("systemd-nspawn").args(backend.nspawn_args(machine, root, state, true));
    let log_path = boot_log(state);
    let log = File::create(&log_path)
        .map_err(|e| Failure::system_with(format!("failed to create {}", log_path.display()), e))?;
    let log2 = log.try_clone().map_err(|e| Failure::system_with("failed to open the boot log", e))?;
    cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
    debug!(?cmd, "booting");
    let unit_for_stop = unit.clone();
    let ended = process::run_with_stop(
        &mut cmd,
        cancel,
        &mut || {
            let _ = command_output(Command::new("systemctl").args(["stop", "--no-block", &unit_for_stop]));
        },
        Duration::from_secs(2),
    )
    .map_err(|e| Failure::system_with("failed to run systemd-run (is systemd-container installed?)", e))?;
    match ended {
        Ended::Exited(0) => {}
        Ended::Cancelled => return Err(Failure::Cancelled),
        Ended::Exited(code) => {
            let journal =
                command_output(Command::new("journalctl").args(["--no-pager", "-q", "-n", "20", "-u", &unit]))
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
            return Err(Failure::system(format!(
                "the container's unit {unit} failed to start (systemd-run exited {code}): {}\n{journal}",
                tail(&log_path, 5)
            )));
        }
    }
    let out = command_output(Command::new("machinectl").args(["show", machine, "-p", "Leader", "--value"]))?;
    container.leader = String::from_utf8_lossy(&out.stdout).trim().parse().ok();
    state.save(RECORD, &container)?;
    Ok(container)
}

pub(crate) fn run(
    _backend: &Nspawn,
    _job: &JobContext,
    state: &JobState,
    script: &Path,
    stage: &str,
    cancel: &Cancel,
) -> Result<(), Failure> {
    let container: Container = state
        .load(RECORD)?
        .ok_or_else(|| Failure::system("the job's container was never booted (prepare did not finish)"))?;
    if !container_alive(&container) {
        return Err(Failure::system(format!(
            "the job's container {} is no longer running (killed, or the host rebooted)",
            container.machine
        )));
    }
    let seq = std::process::id();
    let dir = scripts_dir(state);
    let copy = dir.join(format!("stage-{seq}.sh"));
    let wrapper = dir.join(format!("stage-{seq}.run"));
    let rc_file = dir.join(format!("stage-{seq}.rc"));
    let _ = fs::remove_file(&rc_file);
    // The container can write into the scripts dir: never follow what it planted.
    let body = fs::read(script)
        .map_err(|e| Failure::system_with(format!("failed to read the stage script {}", script.display()), e))?;
    rootfs::place_file(&dir, "", &format!("stage-{seq}.sh"), &body)
        .map_err(|e| Failure::system_with("failed to copy the stage script", e))?;
    // The wrapper records the script's exit status (so that a failure of
    // systemd-run itself is never taken for the script's) and exits with it
    // (a script killed by a signal is 128+N, not what systemd-run makes of it).
    let wrapper_text = format!(
        "#!/bin/sh\n/bin/bash {SCRIPTS_DIR}/stage-{seq}.sh\nrc=$?\necho $rc > {SCRIPTS_DIR}/stage-{seq}.rc\nexit $rc\n"
    );
    rootfs::place_file(&dir, "", &format!("stage-{seq}.run"), wrapper_text.as_bytes())
        .map_err(|e| Failure::system_with(format!("failed to write {}", wrapper.display()), e))?;
    let unit = format!("berth-stage-{seq}.service");
    // systemd-run expands $VARIABLES in its arguments: pass only plain paths.
    let run_args: Vec<String> = vec![
        "--quiet".into(),
        "--pipe".into(),
        "--wait".into(),
        "--collect".into(),
        format!("--unit={unit}"),
        format!("--description=berth stage {}", stage.escape_default().to_string().replace('$', "")),
        "-p".into(),
        format!("TimeoutStopSec={STOP_TIMEOUT}"),
        "-p".into(),
        "Environment=HOME=/root".into(),
        "--".into(),
        "/bin/sh".into(),
        format!("{SCRIPTS_DIR}/stage-{seq}.run"),
    ];
    let (mut cmd, mut stop) = match container.mode {
        ModeName::Standalone => {
            let leader =
                container.leader.ok_or_else(|| Failure::system("the job's container has no recorded init process"))?;
            let mut cmd = Command::new("nsenter");
            cmd.args(["-t", &leader.to_string(), "-a", "--", "systemd-run"]).args(&run_args);
            let mut stop_cmd = Command::new("nsenter");
            stop_cmd.args(["-t", &leader.to_string(), "-a", "--", "systemctl", "stop", &unit]);
            (cmd, stop_cmd)
        }
        ModeName::Systemd => {
            let mut cmd = Command::new("systemd-run");
            cmd.arg(format!("--machine={}", container.machine)).args(&run_args);
            let mut stop_cmd = Command::new("systemctl");
            stop_cmd.args(["--machine", &container.machine, "stop", &unit]);
            (cmd, stop_cmd)
        }
    };
    let _ = std::io::stdout().flush();
    cmd.stdin(Stdio::null());
    let ended = process::run_with_stop(
        &mut cmd,
        cancel,
        &mut || {
            let _ = command_output(&mut stop);
        },
        Duration::from_secs(5),
    )
    .map_err(|e| Failure::system_with("failed to run the stage in the container", e))?;
    let _ = fs::remove_file(&copy);
    let _ = fs::remove_file(&wrapper);
    let recorded = rootfs::read_small(&rc_file).ok().and_then(|t| t.trim().parse::<i32>().ok());
    let _ = fs::remove_file(&rc_file);
    match (ended, recorded) {
        (Ended::Cancelled, _) => Err(Failure::Cancelled),
        (_, Some(0)) => Ok(()),
        (_, Some(code)) => Err(Failure::script(code)),
        (Ended::Exited(code), None) => Err(Failure::system(format!(
            "the stage did not run to its end in container {} (systemd-run exited {code})",
            container.machine
        ))),
    }
}

/// The nspawn processes of this job's container: named after its machine and
/// using this state directory's overlay (another berth configuration on the
/// host could use the same runner name).
fn our_nspawns(machine: &str, state: &JobState) -> Vec<i32> {
    let overlay = format!(":{}:/", upper_dir(state).display());
    host::pids_with_arg(&format!("--machine={machine}"))
        .into_iter()
        .filter(|pid| {
            host::cmdline(*pid).iter().any(|a| a.starts_with(b"--overlay=") && a.ends_with(overlay.as_bytes()))
        })
        .collect()
}

fn container_alive(container: &Container) -> bool {
    match container.mode {
        ModeName::Standalone => container.leader.is_some_and(host::alive),
        ModeName::Systemd => container.leader.is_some_and(host::alive),
    }
}

pub(crate) fn cleanup(_backend: &Nspawn, state: &JobState) -> Result<(), Failure> {
    let machine = machine_name(state.key());
    let container: Option<Container> = state.load(RECORD).unwrap_or(None);
    let started = Instant::now();
    // systemd mode: the unit holds everything; kill it, then let it go.
    let unit = unit_name(state.key());
    if container.as_ref().is_none_or(|c| c.mode == ModeName::Systemd) && crate::systemd_is_pid1() {
        let _ = command_output(Command::new("systemctl").args(["kill", "--signal=SIGKILL", &unit]));
        let _ = command_output(Command::new("systemctl").args(["stop", &unit]));
        let _ = command_output(Command::new("systemctl").args(["reset-failed", &unit]));
    }
    // Both modes: any nspawn of this machine, and its container. SIGKILL of
    // nspawn alone would orphan the container: kill its init first, which
    // ends the container and lets nspawn exit and unmount by itself.
    let mut pids = our_nspawns(&machine, state);
    if let Some((pid, start)) = container.as_ref().and_then(|c| c.nspawn) {
        if host::start_time(pid) == Some(start) && !pids.contains(&pid) {
            pids.push(pid);
        }
    }
    let leaders: Vec<i32> = pids.iter().filter_map(|p| host::leader_of(*p)).collect();
    for pid in &leaders {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    if !host::wait_gone(&pids, Duration::from_secs(3)) {
        warn!(machine, "nspawn did not exit after its container was killed; killing it");
        for pid in &pids {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }
    let cgroup = JobCgroup::of(&machine);
    let stragglers = cgroup.pids();
    if !stragglers.is_empty() && !cgroup.kill() {
        for pid in &stragglers {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }
    let all: Vec<i32> = leaders.iter().chain(&pids).chain(&stragglers).copied().collect();
    if !host::wait_gone(&all, Duration::from_secs(10)) {
        return Err(Failure::system(format!("container {machine} (processes {all:?}) did not exit after SIGKILL")));
    }
    if let Err(e) = cgroup.remove() {
        return Err(Failure::system_with(format!("failed to remove the cgroup of container {machine}"), e));
    }
    // Left by nspawn when it cannot clean up after itself without systemd.
    let propagate = Path::new("/run/systemd/nspawn/propagate").join(&machine);
    if propagate.exists() {
        if let Err(e) = fs::remove_dir_all(&propagate) {
            warn!("failed to remove {}: {e}", propagate.display());
        }
    }
    if !all.is_empty() || container.is_some() {
        info!(machine, elapsed_ms = started.elapsed().as_millis() as u64, "container removed");
    }
    Ok(())
}

pub(crate) fn reap_orphans(backend: &Nspawn, known: &[JobKey]) -> Result<Vec<String>, Failure> {
    let prefix = format!("--machine=berth-{}-", backend.runner.name);
    let jobs = backend.runner.state_dir.join("jobs");
    let ours = format!("{}/", jobs.display());
    // A job prepared since reap listed the known ones has its state by now.
    // (`berth-<runner>-` also prefixes the machines of a runner named `<runner>-x`.)
    let orphan = |key: &JobKey| {
        key.runner() == backend.runner.name && !known.contains(key) && !jobs.join(key.to_string()).exists()
    };
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else { return Ok(removed) };
    for pid in entries.flatten().filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok()) {
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let Some(arg) = cmdline.split(|b| *b == 0).find(|a| a.starts_with(prefix.as_bytes())) else { continue };
        let name = String::from_utf8_lossy(&arg["--machine=berth-".len()..]).into_owned();
        let Ok(key) = JobKey::try_from(name.clone()) else { continue };
        let args = host::cmdline(pid);
        let in_our_state =
            args.iter().any(|a| a.starts_with(b"--overlay=") && String::from_utf8_lossy(a).contains(&ours));
        if !orphan(&key) || !in_our_state {
            continue;
        }
        if let Some(leader) = host::leader_of(pid) {
            let _ = kill(Pid::from_raw(leader), Signal::SIGKILL);
        }
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        removed.push(format!("container berth-{name} (no job state; nspawn pid {pid})"));
    }
    // Empty cgroups of jobs whose cleanup never ran (standalone mode). A young
    // one may belong to a prepare that has not started nspawn yet.
    let machine_prefix = format!("berth-{}-", backend.runner.name);
    for machine in JobCgroup::machines(&machine_prefix, Duration::from_secs(60)) {
        let Ok(key) = JobKey::try_from(machine["berth-".len()..].to_owned()) else { continue };
        let cgroup = JobCgroup::of(&machine);
        if orphan(&key) && cgroup.pids().is_empty() && cgroup.remove().is_ok() {
            removed.push(format!("cgroup of container {machine} (no job state, no process)"));
        }
    }
    removed.extend(berth_backend_support::generations::Images::new(backend.images.dir()).prune());
    Ok(removed)
}
