//! A stage: a transient unit inside the container, through machined
//! (systemd mode) or `nsenter` (standalone mode).

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use berth_backend_api::process::Ended;
use berth_backend_api::{Cancel, Failure, JobContext, JobState};

use super::{leader, scripts_dir, Container, ModeName, PATH, RECORD, STOP_TIMEOUT};
use crate::{Nspawn, SCRIPTS_DIR};
use berth_backend_support::cgroup::JobCgroup;
use berth_backend_support::host::{Cmd, Host};
use berth_backend_support::rootfs;
use berth_backend_support::settings::sys;

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
    if leader(&**host, &container).is_none() {
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
