//! A stage. berth enters the container itself and starts the stage's shell
//! there, in a cgroup of the stage's own, with the credentials, bounding set
//! and system call filters of the container's init
//! ([`berth_backend_support::container`]): one process start (the shell's)
//! beyond berth's, in either host mode. A container whose init's profile
//! could not be copied at prepare runs its stages as before, as transient
//! units of its own systemd, through machined (systemd mode) or `nsenter`
//! (standalone mode): slower, as safe.

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use berth_backend_api::process::Ended;
use berth_backend_api::{Cancel, Failure, JobContext, JobState};

use super::{container_dir, leader, profile_file, scripts_dir, Container, ModeName, PATH, RECORD, STOP_TIMEOUT};
use crate::{Nspawn, SCRIPTS_DIR};
use berth_backend_api::process;
use berth_backend_support::cgroup::{JobCgroup, StageCgroup};
use berth_backend_support::container::{self, Namespaces, Profile};
use berth_backend_support::host::{Cmd, Host};
use berth_backend_support::rootfs;
use berth_backend_support::settings::sys;
use tracing::{debug, warn};

/// How long a stage's shell has after SIGTERM (a cancel) before SIGKILL.
const STAGE_GRACE: Duration = Duration::from_secs(3);

/// Copies what stages need to enter the container directly from its init
/// (see the module doc), once, right after boot; without it, stages go
/// through the container's systemd.
pub(super) fn learn(backend: &Nspawn, dir: &Path, container: &Container) {
    let file = profile_file(dir);
    let _ = fs::remove_file(&file);
    let Some((pid, _pidfd)) = leader(&*backend.host, container) else { return };
    match backend.host.profile(pid).and_then(|profile| profile.save(&file)) {
        Ok(()) => debug!(machine = container.machine, "stages enter the container directly"),
        Err(e) => warn!(
            machine = container.machine,
            "stages go through the container's systemd (slower): its init's system call filters could not be copied: {e}"
        ),
    }
}

/// Runs a stage by entering the container (see the module doc) whose init
/// is `pid` (checked by the caller), unless the container has no profile
/// (`None`: the caller goes through systemd).
fn run_entered(
    backend: &Nspawn,
    state: &JobState,
    container: &Container,
    pid: i32,
    body: &[u8],
    cancel: &Cancel,
) -> Option<Result<(), Failure>> {
    let profile = match Profile::load(&profile_file(&container_dir(state))) {
        Ok(profile) => profile,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Err(Failure::system_with("failed to read the container's profile", e))),
    };
    Some(enter_and_run(backend, state, container, pid, profile, body, cancel))
}

fn enter_and_run(
    backend: &Nspawn,
    state: &JobState,
    container: &Container,
    pid: i32,
    profile: Profile,
    body: &[u8],
    cancel: &Cancel,
) -> Result<(), Failure> {
    let host = &backend.host;
    let gone = || Failure::system(format!("the job's container {} is no longer running", container.machine));
    let namespaces = Namespaces::open(pid, container.users.is_some()).map_err(|_| gone())?;
    // Opened while the pidfd's process still ran with the recorded start
    // time: the namespaces are its.
    if host.process(pid).map(|p| p.start_time) != container.leader_start {
        return Err(gone());
    }
    let seq = std::process::id();
    let cgroup = StageCgroup::make(host.clone(), pid, &format!("berth-stage-{seq}"))
        .map_err(sys(format!("failed to make the stage's cgroup in container {}", container.machine)))?;
    let dir = scripts_dir(state);
    let name = format!("stage-{seq}.sh");
    // The container can write into the scripts dir: never follow what it planted.
    let placed = rootfs::place_file(&dir, "", &name, body).map_err(sys("failed to copy the stage script"));
    let ended = placed.and_then(|_| {
        let mut cmd = Command::new("/bin/bash");
        cmd.arg(format!("{SCRIPTS_DIR}/{name}"))
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", "/root")
            .env("LANG", "C.UTF-8")
            .stdin(std::process::Stdio::null());
        let entry = container::Entry {
            namespaces: &namespaces,
            profile,
            cgroup: cgroup.dir(),
            join_rest: cgroup.joiner(false).map_err(sys("failed to prepare the stage's cgroup"))?,
            join_all: cgroup.joiner(true).map_err(sys("failed to prepare the stage's cgroup"))?,
        };
        container::install(&mut cmd, entry);
        let _ = std::io::stdout().flush();
        process::run(&mut cmd, cancel, STAGE_GRACE).map_err(berth_backend_support::settings::stage_start(
            format!("failed to start the stage in container {}", container.machine),
            &container.image,
            super::root_dir(&container_dir(state)).join("bin/bash"),
        ))
    });
    // Whatever the stage left running ends with it.
    if let Err(e) = cgroup.finish(Duration::from_secs(5)) {
        warn!(machine = container.machine, "the stage's leftovers: {e}");
    }
    let _ = fs::remove_file(dir.join(&name));
    match ended? {
        Ended::Exited(0) => Ok(()),
        Ended::Exited(code) => Err(Failure::script(code)),
        Ended::Cancelled => Err(Failure::Cancelled),
    }
}

/// A command that runs `program` inside the container as the container's
/// root, for standalone mode: `nsenter` (the host's) enters every namespace of
/// the container's init, the user namespace included, so that what it then
/// executes from the container's filesystem runs with the container's
/// credentials, never the host's; with an empty environment, from a leaf
/// cgroup of the container's. The namespaces are opened here, from a pidfd
/// checked against the init's start time, and handed over as descriptors:
/// a pid reused by another process cannot be entered.
fn enter(host: &dyn Host, container: &Container, cgroup: &JobCgroup, program: &str) -> Result<Entered, Failure> {
    let gone = || Failure::system(format!("the job's container {} is no longer running", container.machine));
    let (pid, pidfd) = leader(host, container).ok_or_else(gone)?;
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
    if host.signal(pid, None).is_err() || host.process(pid).map(|p| p.start_time) != container.leader_start {
        return Err(gone());
    }
    drop(pidfd);
    let cmd = Cmd::new("nsenter").args(&args).arg("--").arg(program).env_clear().env("PATH", PATH);
    let mut join = Some(cgroup.stage_joiner().map_err(sys("failed to prepare the stage's cgroup"))?);
    let mut fds = Some(fds);
    let setup = Box::new(move |cmd: &mut Command| {
        let (Some(fds), Some(mut join)) = (fds.take(), join.take()) else { return Ok(()) };
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
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
        Ok(())
    });
    Ok(Entered { cmd, setup })
}

/// A command entering the container, and what its process needs (the
/// namespaces' descriptors, the cgroup joiner) before it executes.
struct Entered {
    cmd: Cmd,
    setup: SetupFn,
}

/// What a process needs before it executes (see [`berth_backend_support::host::Setup`]).
type SetupFn = Box<dyn FnMut(&mut Command) -> std::io::Result<()>>;

pub(crate) fn run(
    backend: &Nspawn,
    _job: &JobContext,
    state: &JobState,
    script: &Path,
    stage: &str,
    cancel: &Cancel,
) -> Result<(), Failure> {
    let container: Container = state
        .load(RECORD)?
        .ok_or_else(|| Failure::system("the job's container was never booted (prepare did not finish)"))?;
    let host = &backend.host;
    // Held while the namespaces are opened: the pid stays the init's.
    let Some((pid, _pidfd)) = leader(&**host, &container) else {
        return Err(Failure::system(format!(
            "the job's container {} is no longer running (killed, or the host rebooted)",
            container.machine
        )));
    };
    let body = fs::read(script).map_err(sys(format!("failed to read the stage script {}", script.display())))?;
    if let Some(done) = run_entered(backend, state, &container, pid, &body, cancel) {
        return done;
    }
    let seq = std::process::id();
    let dir = scripts_dir(state);
    let rc_name = format!("stage-{seq}.rc");
    let rc_file = dir.join(&rc_name);
    let _ = fs::remove_file(&rc_file);
    // The container can write into the scripts dir: never follow what it planted.
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
    let cgroup = || JobCgroup::on(host.clone(), &container.machine);
    let stop_command = || -> Result<Entered, Failure> {
        let mut stop = match container.mode {
            ModeName::Standalone => enter(&**host, &container, &cgroup(), "systemctl")?,
            ModeName::Systemd => Entered {
                cmd: Cmd::new("systemctl").args(["--machine", &container.machine]),
                setup: Box::new(|_| Ok(())),
            },
        };
        stop.cmd = stop.cmd.args(["stop", &unit]);
        Ok(stop)
    };
    let mut entered = match container.mode {
        ModeName::Standalone => enter(&**host, &container, &cgroup(), "systemd-run")?,
        // The host's systemd-run, through machined into the container's
        // bus: nothing of the container's filesystem runs on the host.
        ModeName::Systemd => Entered {
            cmd: Cmd::new("systemd-run").arg(format!("--machine={}", container.machine)),
            setup: Box::new(|_| Ok(())),
        },
    };
    let cmd = entered.cmd.clone().args(&run_args);
    let _ = std::io::stdout().flush();
    let ended = host
        .run(
            &cmd,
            &mut entered.setup,
            cancel,
            Some(&mut || {
                if let Ok(mut stop) = stop_command() {
                    let _ = host.output_with(&stop.cmd, &mut stop.setup);
                }
            }),
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
