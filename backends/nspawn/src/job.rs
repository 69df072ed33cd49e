//! A job's container: boot, stages, teardown, in either host mode.
//!
//! What prepare builds, in the job's state directory (mode 0700):
//!
//! ```text
//! layer/        the job's writable filesystem (ext4 of disk_max bytes on a loop device, nodev,nosuid)
//!   upper/ work/  the overlay's writable layer and scratch, upper owned by the job's root
//! lower/        the image generation, an idmapped read-only clone (host root's files show as the job's root)
//! root/         the overlay (lower + upper, nodev): the container's /
//! cache/        the project's cache directory, bound nosuid,nodev (nspawn binds it idmapped at /cache)
//! scripts/      stage scripts and their exit status, owned by the job's root, bound at /run/berth
//! notify        the sd_notify socket (standalone mode)
//! ```
//!
//! The container runs with `--private-users=BASE:65536`: its root is host
//! uid BASE, a range of the job's own ([`berth_backend_support::userns`]).
//! The machine name and the uid range are claims under `/run/berth`
//! ([`berth_backend_support::claims`]): a container is recognised by what
//! berth recorded (its claim, its cgroup, its unit, pids with their start
//! times), never by the arguments of a process, which any job can forge.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_backend_api::process::{self, Ended};
use berth_backend_api::{Cancel, Failure, JobContext, JobKey, JobState};
use nix::mount::MsFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::notify::{Notify, Wait};
use crate::settings::Mode;
use crate::{machine_name, Nspawn, BUILDS_DIR, CACHE_DIR, GITLAB_RUNNER, SCRIPTS_DIR};
use berth_backend_support::cgroup::JobCgroup;
use berth_backend_support::claims::Claims;
use berth_backend_support::image::Image;
use berth_backend_support::proc as host;
use berth_backend_support::settings::sys;
use berth_backend_support::userns::{self, Allocator, Range, UserNs};
use berth_backend_support::{cache, diskfs, mounts, rootfs};

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
    /// The start time of `leader`: with it, the pid is the container's init
    /// and not a process that got the pid after it.
    #[serde(default)]
    leader_start: Option<u64>,
    /// The transient unit running nspawn (systemd mode).
    unit: Option<String>,
    /// The job's host uid/gid range (none: `private_users = false`).
    #[serde(default)]
    users: Option<Range>,
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
/// The claims of machine names.
const MACHINES: &str = "machines";
/// Where the host-side stage launcher and the container's tools are found.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn layer_dir(state: &JobState) -> PathBuf {
    state.dir().join("layer")
}

fn upper_dir(state: &JobState) -> PathBuf {
    layer_dir(state).join("upper")
}

fn root_dir(state: &JobState) -> PathBuf {
    state.dir().join("root")
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

/// Creates directory `path` (its parent exists) with `mode`, owned by the
/// job's root when there is a range: what the container sees as its own.
fn make_dir(path: &Path, mode: u32, owner: Option<Range>) -> Result<(), Failure> {
    rootfs::make_dir(path, mode, owner.map(|range| (range.base, range.base)))
}

fn give(path: &Path, owner: Option<Range>) -> Result<(), Failure> {
    match owner {
        Some(range) => {
            userns::give(path, range).map_err(|e| Failure::system_with("failed to prepare the job's layer", e))
        }
        None => Ok(()),
    }
}

/// Writes a file of the container (in the fresh upper layer, before boot),
/// creating its directories like the image has them (0755), all the job's.
fn write_in_layer(upper: &Path, rel: &str, content: &[u8], owner: Option<Range>) -> Result<(), Failure> {
    let path = upper.join(rel);
    make_parents(upper, &path, owner)?;
    fs::write(&path, content).map_err(sys(format!("failed to write {}", path.display())))?;
    give(&path, owner)
}

fn make_parents(upper: &Path, path: &Path, owner: Option<Range>) -> Result<(), Failure> {
    let rel = path.parent().and_then(|p| p.strip_prefix(upper).ok()).unwrap_or(Path::new(""));
    let mut dir = upper.to_path_buf();
    for part in rel.components() {
        dir.push(part);
        if !dir.is_dir() {
            make_dir(&dir, 0o755, owner)?;
        }
    }
    Ok(())
}

/// Masks units or generators for the container's systemd: a link to
/// /dev/null in `rel` of the job's fresh overlay layer (the image is not
/// touched; nothing in the layer was written by a container yet).
fn mask(upper: &Path, rel: &str, names: &[String], owner: Option<Range>) -> Result<(), Failure> {
    for name in names {
        let link = upper.join(rel).join(name);
        make_parents(upper, &link, owner)?;
        std::os::unix::fs::symlink("/dev/null", &link)
            .map_err(|e| Failure::system_with(format!("failed to mask {name} ({})", link.display()), e))?;
        give(&link, owner)?;
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
    fn nspawn_args(&self, machine: &str, state: &JobState, users: Option<Range>, register: bool) -> Vec<OsString> {
        let idmap = users.is_some();
        let mut args: Vec<OsString> = vec![
            "--quiet".into(),
            "--keep-unit".into(),
            if register { "--register=yes".into() } else { "--register=no".into() },
            format!("--machine={machine}").into(),
            "--directory".into(),
            root_dir(state).into(),
            "--console=passive".into(),
            "--notify-ready=yes".into(),
        ];
        if let Some(range) = users {
            args.push(format!("--private-users={}", range.nspawn_arg()).into());
            args.push("--private-users-ownership=off".into());
        }
        args.push(bind_arg(&state.dir().join("cache"), Path::new(CACHE_DIR), true, idmap));
        args.push(bind_arg(&scripts_dir(state), Path::new(SCRIPTS_DIR), true, false));
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

    /// Unit properties for the container's unit (systemd mode): the
    /// device policy of systemd's own `systemd-nspawn@.service` (no device
    /// but the pseudo devices, ptys and tun), delegation, limits.
    fn unit_properties(&self, state: &JobState) -> Vec<String> {
        let boot = self.settings.boot_timeout.unwrap_or(60);
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
            format!(
                "TasksMax={}",
                self.settings.tasks_max.map_or(berth_backend_support::limits::DEFAULT_TASKS_MAX, u64::from)
            ),
            format!("MemoryMax={}", self.settings.memory_max.as_deref().unwrap_or(crate::settings::DEFAULT_MEMORY_MAX)),
            // Who made this unit: reap recognises a job's container by it.
            format!("Description=berth job {} ({})", state.key(), state.dir().display()),
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

pub(crate) fn prepare(backend: &Nspawn, job: &JobContext, state: &JobState, cancel: &Cancel) -> Result<(), Failure> {
    let started = Instant::now();
    let image = backend.images.resolve(job.image())?;
    let machine = machine_name(job.key());
    let claims = Claims::host(MACHINES);
    if !claims.claim(&machine, state.dir()).map_err(sys("failed to record the container's name"))? {
        let owner = claims.owner(&machine).map(|o| o.display().to_string()).unwrap_or_default();
        return Err(Failure::system(format!(
            "a container named {machine} already runs on this host for {owner}: another berth configuration has a runner named {:?} (runner names must be unique per host)",
            job.key().runner()
        )));
    }
    // An earlier attempt of this job: take all of it down (its range is kept).
    let earlier: Option<Container> = state.load(RECORD).unwrap_or(None);
    tear_down(state, earlier.as_ref())?;
    let users = if backend.private_users() {
        let allocator = Allocator::host();
        Some(match earlier.as_ref().and_then(|c| c.users) {
            Some(range) if allocator.holds(range, state.dir()) => range,
            _ => allocator.allocate(state.dir()).map_err(sys("failed to allocate a uid range for the job"))?,
        })
    } else {
        println!("WARNING: this runner runs jobs as root of the host (settings.private_users = false): a job can take over the host");
        None
    };
    let mut container = Container {
        mode: if backend.mode == Mode::Systemd { ModeName::Systemd } else { ModeName::Standalone },
        machine: machine.clone(),
        image: image.name.clone(),
        nspawn: None,
        leader: None,
        leader_start: None,
        unit: None,
        users,
    };
    state.save(RECORD, &container)?;
    build_root(backend, job, state, &image, &machine, users)?;
    if backend.gitlab_runner.is_none() {
        println!("{}", berth_backend_support::rootfs::GITLAB_RUNNER_MISSING);
    }
    let timeout = Duration::from_secs(backend.settings.boot_timeout.unwrap_or(60));
    match backend.mode {
        Mode::Systemd => boot_systemd(backend, state, &mut container, cancel)?,
        _ => boot_standalone(backend, state, &mut container, timeout, cancel)?,
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
    info!(job = %job.key(), machine, image = container.image, mode, users = ?container.users, "container ready");
    Ok(())
}

/// Mounts the container's root and what is bound into it (see the module doc).
fn build_root(
    backend: &Nspawn,
    job: &JobContext,
    state: &JobState,
    image: &Image,
    machine: &str,
    users: Option<Range>,
) -> Result<(), Failure> {
    let dir = state.dir();
    let layer = layer_dir(state);
    make_dir(&layer, 0o755, users)?;
    if let Some(size) = backend.limits.disk {
        diskfs::mount_bounded(&dir.join("layer.img"), size, &layer, users)
            .map_err(sys("failed to make the job's disk (settings.disk_max)"))?;
    }
    let upper = upper_dir(state);
    let work = layer.join("work");
    make_dir(&upper, 0o755, users)?;
    make_dir(&work, 0o700, None)?;
    make_dir(&upper.join(BUILDS_DIR.trim_start_matches('/')), 0o755, users)?;
    // The image's /etc/hostname would win over --machine; an empty machine-id
    // makes systemd generate one per boot instead of every job sharing the image's.
    write_in_layer(&upper, "etc/hostname", format!("{machine}\n").as_bytes(), users)?;
    write_in_layer(&upper, "etc/machine-id", b"", users)?;
    mask(&upper, "etc/systemd/system", &backend.masked_units, users)?;
    mask(&upper, "etc/systemd/system-generators", &backend.masked_generators, users)?;
    make_dir(&scripts_dir(state), 0o700, users)?;
    // The cache: the project's directory, private to root on the host, and
    // bound nosuid,nodev, so that nothing a job leaves there is a set-uid
    // program or a device for anyone on the host.
    let cache = cache::job_cache_dir(&backend.cache_host_dir, backend.settings.cache_scope, job)?;
    let cache_mount = dir.join("cache");
    make_dir(&cache_mount, 0o700, None)?;
    mounts::bind_guarded(&cache, &cache_mount, true).map_err(sys("failed to mount the job's cache"))?;
    let lower = match users {
        Some(range) => {
            let lower = dir.join("lower");
            make_dir(&lower, 0o755, None)?;
            let ns = UserNs::new(range).map_err(sys("failed to create the job's user namespace"))?;
            let attrs = userns::Attrs { read_only: true, nodev: true, nosuid: false };
            userns::mount_idmapped(&image.root, &lower, &ns, attrs)
                .map_err(sys("failed to mount the image for the job"))?;
            lower
        }
        None => image.root.clone(),
    };
    let root = root_dir(state);
    make_dir(&root, 0o755, None)?;
    mounts::mount_overlay_with(&lower, &upper, &work, &root, MsFlags::MS_NODEV)
        .map_err(sys("failed to mount the container's root"))?;
    Ok(())
}

fn boot_standalone(
    backend: &Nspawn,
    state: &JobState,
    container: &mut Container,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<(), Failure> {
    let machine = container.machine.clone();
    let notify = Notify::new(&state.dir().join("notify")).map_err(sys("failed to create the readiness socket"))?;
    let log_path = boot_log(state);
    let log = File::create(&log_path).map_err(sys(format!("failed to create {}", log_path.display())))?;
    let log2 = log.try_clone().map_err(sys("failed to open the boot log"))?;
    let mut cmd = Command::new("systemd-nspawn");
    cmd.args(backend.nspawn_args(&machine, state, container.users, false))
        .env_clear()
        .envs(backend.nspawn_env())
        .env("NOTIFY_SOCKET", notify.env())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    // Its own process group: the runner's signals to the hook's group are not for it.
    cmd.process_group(0);
    let mut cgroup = JobCgroup::of(&machine);
    cgroup.create(&backend.limits).map_err(sys("failed to create the container's cgroup with its resource limits"))?;
    if let Some(range) = container.users {
        cgroup.give(range).map_err(sys("failed to delegate the container's cgroup to its root"))?;
    }
    let join = cgroup.joiner().map_err(sys("failed to prepare the container's cgroup"))?;
    // SAFETY: the closure only performs async-signal-safe system calls (see JobCgroup::joiner).
    unsafe { cmd.pre_exec(join) };
    debug!(?cmd, "booting");
    let child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            Failure::system_with("systemd-nspawn is not installed (apt-get install systemd-container)", e)
        }
        // The joiner's errors come back from spawn too.
        _ => Failure::system_with(format!("failed to start systemd-nspawn in the container's cgroup ({cgroup})"), e),
    })?;
    let pid = child.id() as i32;
    container.nspawn = Some((pid, host::start_time(pid).unwrap_or(0)));
    state.save(RECORD, container)?;
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
    let leader = loop {
        if let Some(leader) = host::leader_of(pid) {
            break leader;
        }
        if Instant::now() > deadline {
            return Err(Failure::system(format!("container {machine} is ready but its init process was not found")));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    container.leader = Some(leader);
    container.leader_start = host::start_time(leader);
    state.save(RECORD, container)?;
    Ok(())
}

/// Runs a host command to its end, capturing its output.
fn command_output(cmd: &mut Command) -> Result<std::process::Output, Failure> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null()).output().map_err(|e| Failure::system_with(format!("failed to run {program}"), e))
}

fn boot_systemd(backend: &Nspawn, state: &JobState, container: &mut Container, cancel: &Cancel) -> Result<(), Failure> {
    let unit = unit_name(state.key());
    container.unit = Some(unit.clone());
    state.save(RECORD, container)?;
    let mut cmd = Command::new("systemd-run");
    cmd.arg("--quiet").arg(format!("--unit={unit}")).arg("--slice=machine.slice").arg("--collect");
    for prop in backend.unit_properties(state) {
        cmd.arg("-p").arg(prop);
    }
    cmd.arg("--").arg("systemd-nspawn").args(backend.nspawn_args(&container.machine, state, container.users, true));
    let log_path = boot_log(state);
    let log = File::create(&log_path).map_err(sys(format!("failed to create {}", log_path.display())))?;
    let log2 = log.try_clone().map_err(sys("failed to open the boot log"))?;
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
    .map_err(sys("failed to run systemd-run (is systemd-container installed?)"))?;
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
    let out = command_output(Command::new("systemctl").args(["show", &unit, "-p", "MainPID", "--value"]))?;
    // The unit's main process is nspawn; its child that is PID 1 of its own namespace is the container's init.
    let nspawn: Option<i32> = String::from_utf8_lossy(&out.stdout).trim().parse().ok().filter(|p| *p > 0);
    container.leader = nspawn.and_then(host::leader_of);
    container.leader_start = container.leader.and_then(host::start_time);
    state.save(RECORD, container)?;
    Ok(())
}

/// The container's init, if it still runs: the recorded pid with the
/// recorded start time, held by a pidfd (so the pid cannot be reused while held).
fn leader(container: &Container) -> Option<(i32, OwnedFd)> {
    let (pid, start) = (container.leader?, container.leader_start?);
    let fd = host::pidfd(pid)?;
    (host::start_time(pid) == Some(start) && host::alive(pid)).then_some((pid, fd))
}

/// A command that runs `program` inside the container as the container's
/// root, for standalone mode: `nsenter` (the host's) enters every namespace of
/// the container's init, the user namespace included, so that what it then
/// executes from the container's filesystem runs with the container's
/// credentials, never the host's; with an empty environment, from a leaf
/// cgroup of the container's. The namespaces are opened here, from a pidfd
/// checked against the init's start time, and handed over as descriptors:
/// a pid reused by another process cannot be entered.
fn enter(container: &Container, cgroup: &JobCgroup, program: &str) -> Result<Command, Failure> {
    let gone = || Failure::system(format!("the job's container {} is no longer running", container.machine));
    let (pid, pidfd) = leader(container).ok_or_else(gone)?;
    let mut namespaces: Vec<&str> = vec!["mnt", "pid", "uts", "ipc", "net", "cgroup"];
    if container.users.is_some() {
        namespaces.insert(0, "user");
    }
    let mut fds: Vec<File> = Vec::new();
    let mut args: Vec<String> = Vec::new();
    for ns in &namespaces {
        let file = File::open(format!("/proc/{pid}/ns/{ns}")).map_err(|_| gone())?;
        let flag = if *ns == "mnt" { "mount".to_owned() } else { (*ns).to_owned() };
        args.push(format!("--{flag}=/proc/self/fd/{}", file.as_raw_fd()));
        fds.push(file);
    }
    let root = File::open(format!("/proc/{pid}/root")).map_err(|_| gone())?;
    args.push(format!("--root=/proc/self/fd/{}", root.as_raw_fd()));
    args.push(format!("--wd=/proc/self/fd/{}", root.as_raw_fd()));
    fds.push(root);
    // Opened while the pidfd's process still ran with the recorded start time:
    // the namespaces are its.
    if nix::sys::signal::kill(Pid::from_raw(pid), None).is_err() || host::start_time(pid) != container.leader_start {
        return Err(gone());
    }
    drop(pidfd);
    let mut cmd = Command::new("nsenter");
    cmd.args(&args).arg("--").arg(program).env_clear().env("PATH", PATH);
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut join = cgroup.stage_joiner().map_err(sys("failed to prepare the stage's cgroup"))?;
    // SAFETY: only fcntl(2) and the joiner's open/write/close, all
    // async-signal-safe; `fds` outlives the spawn (the closure keeps them).
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &fds;
            for fd in &raw {
                if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            join()
        })
    };
    Ok(cmd)
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
    if leader(&container).is_none() {
        return Err(Failure::system(format!(
            "the job's container {} is no longer running (killed, or the host rebooted)",
            container.machine
        )));
    }
    let seq = std::process::id();
    let dir = scripts_dir(state);
    let rc_name = format!("stage-{seq}.rc");
    let rc_file = dir.join(&rc_name);
    let _ = fs::remove_file(&rc_file);
    // The container can write into the scripts dir: never follow what it planted.
    let body = fs::read(script).map_err(sys(format!("failed to read the stage script {}", script.display())))?;
    rootfs::place_file(&dir, "", &format!("stage-{seq}.sh"), &body).map_err(sys("failed to copy the stage script"))?;
    // The wrapper records the script's exit status (so that a failure of
    // systemd-run itself is never taken for the script's) and exits with it
    // (a script killed by a signal is 128+N, not what systemd-run makes of it).
    let wrapper_text = format!(
        "#!/bin/sh\n/bin/bash {SCRIPTS_DIR}/stage-{seq}.sh\nrc=$?\necho $rc > {SCRIPTS_DIR}/{rc_name}\nexit $rc\n"
    );
    rootfs::place_file(&dir, "", &format!("stage-{seq}.run"), wrapper_text.as_bytes())
        .map_err(sys("failed to write the stage's wrapper"))?;
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
    // The stop command is made only when a cancel needs it: making it
    // (standalone: opening the container's namespaces) is not paid per stage.
    let stop_command = || -> Result<Command, Failure> {
        let mut stop = match container.mode {
            ModeName::Standalone => enter(&container, &JobCgroup::of(&container.machine), "systemctl")?,
            ModeName::Systemd => {
                let mut stop = Command::new("systemctl");
                stop.args(["--machine", &container.machine]);
                stop
            }
        };
        stop.args(["stop", &unit]);
        Ok(stop)
    };
    let mut cmd = match container.mode {
        ModeName::Standalone => enter(&container, &JobCgroup::of(&container.machine), "systemd-run")?,
        // The host's systemd-run, through machined into the container's
        // bus: nothing of the container's filesystem runs on the host.
        ModeName::Systemd => {
            let mut cmd = Command::new("systemd-run");
            cmd.arg(format!("--machine={}", container.machine));
            cmd
        }
    };
    cmd.args(&run_args);
    let _ = std::io::stdout().flush();
    cmd.stdin(Stdio::null());
    let ended = process::run_with_stop(
        &mut cmd,
        cancel,
        &mut || {
            if let Ok(mut stop) = stop_command() {
                let _ = command_output(&mut stop);
            }
        },
        Duration::from_secs(5),
    )
    .map_err(sys("failed to run the stage in the container"))?;
    for name in [format!("stage-{seq}.sh"), format!("stage-{seq}.run")] {
        let _ = fs::remove_file(dir.join(name));
    }
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

/// Stops everything of a job's container and takes its mounts down; what
/// identifies it is the job's own record and the names berth made (its
/// unit, its cgroup), never the arguments of a process.
fn tear_down(state: &JobState, container: Option<&Container>) -> Result<(), Failure> {
    let machine = machine_name(state.key());
    let started = Instant::now();
    // The machine's name, unit and cgroup are this job's only while it holds
    // the name (another berth configuration's runner of the same name could).
    if Claims::host(MACHINES).owner(&machine).is_some_and(|owner| owner != state.dir()) {
        warn!(
            machine,
            "the container's name is held by another berth state directory: only this job's files are removed"
        );
        return remove_layers(state, &machine);
    }
    // systemd mode: the unit holds everything; kill it, then let it go.
    if container.is_some_and(|c| c.mode == ModeName::Systemd) && crate::systemd_is_pid1() {
        let unit = unit_name(state.key());
        let _ = command_output(Command::new("systemctl").args(["kill", "--signal=SIGKILL", &unit]));
        let _ = command_output(Command::new("systemctl").args(["stop", &unit]));
        let _ = command_output(Command::new("systemctl").args(["reset-failed", &unit]));
    }
    // Standalone: the recorded init and nspawn, if they are still those
    // processes. SIGKILL of nspawn alone would orphan the container: kill its
    // init first, which ends the container and lets nspawn exit by itself.
    let mut pids = Vec::new();
    if let Some(container) = container {
        if let Some((pid, _fd)) = leader(container) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            pids.push(pid);
        }
        if let Some((pid, start)) = container.nspawn {
            if host::start_time(pid) == Some(start) {
                pids.push(pid);
            }
        }
    }
    // The container's cgroup (standalone mode) is berth's, named after the
    // job: everything in it is the job's, whatever it calls itself.
    let cgroup = JobCgroup::of(&machine);
    let stragglers = cgroup.pids();
    if !stragglers.is_empty() && !cgroup.kill() {
        for pid in &stragglers {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }
    let nspawn: Vec<i32> = container.and_then(|c| c.nspawn).map(|(p, _)| p).into_iter().collect();
    if !host::wait_gone(&pids, Duration::from_secs(3)) {
        warn!(machine, "nspawn did not exit after its container was killed; killing it");
        for pid in pids.iter().filter(|p| nspawn.contains(p)) {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }
    let all: Vec<i32> = pids.iter().chain(&stragglers).copied().collect();
    if !host::wait_gone(&all, Duration::from_secs(10)) {
        return Err(Failure::system(format!("container {machine} (processes {all:?}) did not exit after SIGKILL")));
    }
    cgroup.remove().map_err(sys(format!("failed to remove the cgroup of container {machine}")))?;
    remove_layers(state, &machine)?;
    if container.is_some() || !all.is_empty() {
        info!(machine, elapsed_ms = started.elapsed().as_millis() as u64, "container removed");
    }
    Ok(())
}

/// Unmounts the job's filesystems and removes what the job wrote.
fn remove_layers(state: &JobState, machine: &str) -> Result<(), Failure> {
    // The root, the image's clone, the cache and the layer's filesystem.
    let report = mounts::unmount_all(state.dir())
        .map_err(sys(format!("failed to unmount the container's filesystems in {}", state.dir().display())))?;
    for point in &report.detached {
        warn!(machine, "{} was busy; detached it (lazy unmount)", point.display());
    }
    // Left by nspawn when it cannot clean up after itself without systemd.
    let propagate = Path::new("/run/systemd/nspawn/propagate").join(machine);
    if propagate.exists() {
        if let Err(e) = fs::remove_dir_all(&propagate) {
            warn!("failed to remove {}: {e}", propagate.display());
        }
    }
    // The layer (on the state's filesystem when disk_max is infinity), written
    // by the job: any tree it made, with bounded descriptors, never crossing a mount.
    for dir in [layer_dir(state), root_dir(state), state.dir().join("lower"), state.dir().join("cache")] {
        berth_backend_api::remove_tree(&dir).map_err(sys(format!("failed to remove {}", dir.display())))?;
    }
    Ok(())
}

pub(crate) fn cleanup(_backend: &Nspawn, state: &JobState) -> Result<(), Failure> {
    let container: Option<Container> = state.load(RECORD).unwrap_or(None);
    tear_down(state, container.as_ref())?;
    Allocator::host().release_all(state.dir()).map_err(sys("failed to release the job's uid range"))?;
    Claims::host(MACHINES)
        .release(&machine_name(state.key()), state.dir())
        .map_err(sys("failed to release the container's name"))?;
    Ok(())
}

pub(crate) fn reap_orphans(backend: &Nspawn, _known: &[JobKey]) -> Result<Vec<String>, Failure> {
    let jobs = backend.runner.state_dir.join("jobs");
    let prefix = format!("berth-{}-", backend.runner.name);
    let mut removed = Vec::new();
    // Containers whose job's state is gone (its cleanup never ran): found by
    // the claim of their name, which only berth makes, owned by a job
    // directory of this state dir. (`berth-<runner>-` also prefixes the
    // machines of a runner named `<runner>-x`: the key must be this runner's.)
    let claims = Claims::host(MACHINES);
    for (machine, owner) in claims.orphans(&prefix, &jobs) {
        let Ok(key) = JobKey::try_from(machine["berth-".len()..].to_owned()) else { continue };
        if key.runner() != backend.runner.name {
            continue;
        }
        if crate::systemd_is_pid1() {
            let unit = unit_name(&key);
            let _ = command_output(Command::new("systemctl").args(["kill", "--signal=SIGKILL", &unit]));
            let _ = command_output(Command::new("systemctl").args(["stop", &unit]));
        }
        let cgroup = JobCgroup::of(&machine);
        let pids = cgroup.pids();
        if !pids.is_empty() && !cgroup.kill() {
            for pid in &pids {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
        }
        if host::wait_gone(&pids, Duration::from_secs(10)) && cgroup.remove().is_ok() {
            let _ = claims.release(&machine, &owner);
            removed.push(format!("container {machine} (its job's state {} is gone)", owner.display()));
        }
    }
    // Empty cgroups of jobs whose cleanup never ran (standalone mode). A young
    // one may belong to a prepare that has not started nspawn yet.
    for machine in JobCgroup::machines(&prefix, Duration::from_secs(60)) {
        let Ok(key) = JobKey::try_from(machine["berth-".len()..].to_owned()) else { continue };
        let cgroup = JobCgroup::of(&machine);
        let unclaimed = claims.owner(&machine).is_none();
        if key.runner() == backend.runner.name
            && unclaimed
            && !jobs.join(key.to_string()).exists()
            && cgroup.pids().is_empty()
            && cgroup.remove().is_ok()
        {
            removed.push(format!("cgroup of container {machine} (no job state, no process)"));
        }
    }
    removed.extend(Allocator::host().reclaim(&jobs));
    removed.extend(berth_backend_support::generations::Images::new(backend.images.dir()).prune());
    Ok(removed)
}
