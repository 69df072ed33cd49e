//! The exact command lines and mount sequences of a job's container, with
//! a recording host: no root, no systemd, no container.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_backend_api::process::Ended;
use berth_backend_api::{Cancel, Failure, JobContext, JobKey, JobRecord, JobState, NewBackend, RunnerInfo, StateDir};
use berth_backend_support::host::{Call, Cmd, MountCall, MountEntry, Process, Recorder};
use berth_backend_support::image::Image;
use berth_backend_support::userns::Range;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::signal::Signal;

use super::{boot, container_dir, layer, stage, teardown, unit_name, Container, Home, ModeName, RECORD};
use crate::settings::{Mode, Settings};
use crate::Nspawn;

/// A runner name no real job on this host has (claims are host-wide).
const RUNNER: &str = "hostops-unit";

struct Fixture {
    dir: tempfile::TempDir,
    host: Arc<Recorder>,
    backend: Nspawn,
    state: JobState,
}

fn fixture(mode: Mode, host: Recorder) -> Fixture {
    fixture_with(mode, host, None)
}

/// A fixture whose runner sets `cache_dir`.
fn fixture_with(mode: Mode, host: Recorder, cache_dir: Option<&str>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["images", "cache", "state"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
    }
    let settings = Settings {
        mode,
        images_dir: Some(dir.path().join("images")),
        cache_host_dir: Some(dir.path().join("cache")),
        gitlab_runner: Some("/opt/gitlab-runner".into()),
        disk_max: Some("infinity".into()),
        memory_max: Some("2G".into()),
        private_users: Some(false),
        ..Settings::default()
    };
    let host = Arc::new(host);
    let mut runner = RunnerInfo::new(RUNNER, dir.path().join("state"));
    runner.cache_dir = cache_dir.map(str::to_owned);
    let backend = Nspawn::new(settings, &runner).unwrap().with_host(host.clone());
    let key = JobKey::new(RUNNER, 5).unwrap();
    let state = StateDir::new(dir.path().join("state/jobs")).create(JobRecord::new(key, "nspawn")).unwrap();
    std::fs::create_dir(container_dir(&state)).unwrap();
    Fixture { dir, host, backend, state }
}

fn container(mode: ModeName) -> Container {
    let me = std::process::id() as i32;
    Container {
        mode,
        machine: format!("berth-{RUNNER}-5"),
        image: "bookworm".into(),
        nspawn: None,
        leader: Some(me),
        leader_start: berth_backend_support::proc::start_time(me),
        unit: None,
        users: None,
        generation: None,
        slot: None,
        ready: false,
    }
}

/// This test process, standing for the container's init.
fn init_process() -> Process {
    Process::read(std::process::id() as i32).unwrap()
}

fn strings(cmd: &Cmd) -> Vec<String> {
    cmd.argv()
}

fn nspawn_args(state: &JobState, register: &str, users: &str) -> Vec<String> {
    let dir = container_dir(state);
    let dir = dir.display();
    let mut args: Vec<String> = [
        "--quiet".to_owned(),
        "--keep-unit".to_owned(),
        format!("--register={register}"),
        format!("--machine=berth-{RUNNER}-5"),
        "--directory".to_owned(),
        format!("{dir}/root"),
        "--console=passive".to_owned(),
        "--notify-ready=yes".to_owned(),
    ]
    .into();
    if !users.is_empty() {
        args.push(format!("--private-users={users}:65536"));
        args.push("--private-users-ownership=off".to_owned());
    }
    let idmap = if users.is_empty() { "" } else { ":idmap" };
    args.extend([
        format!("--bind={dir}/cache:/cache{idmap}"),
        format!("--bind={dir}/scripts:/run/berth"),
        "--bind-ro=/opt/gitlab-runner:/usr/local/bin/gitlab-runner".to_owned(),
        "--boot".to_owned(),
    ]);
    args
}

#[test]
fn the_standalone_boot_command_is_exact() {
    let f = fixture(Mode::Standalone, Recorder::new());
    let home = Home::job(&f.state);
    let notify = home.dir.join("notify");
    let cmd = f.backend.standalone_command(&format!("berth-{RUNNER}-5"), &home, None, &notify);
    let mut expected = vec!["systemd-nspawn".to_owned()];
    expected.extend(nspawn_args(&f.state, "no", ""));
    assert_eq!(strings(&cmd), expected);
    assert!(cmd.env_clear, "nothing of berth's environment reaches nspawn");
    let env: Vec<(String, String)> =
        cmd.env.iter().map(|(k, v)| (k.to_string_lossy().into(), v.to_string_lossy().into())).collect();
    assert_eq!(
        env,
        [("PATH".to_owned(), super::PATH.to_owned()), ("NOTIFY_SOCKET".to_owned(), notify.display().to_string()),]
    );
    // With a uid range of its own: the container's root is BASE.
    let cmd = f.backend.standalone_command("m", &home, Some(Range { base: 1 << 20 }), &notify);
    let args = strings(&cmd);
    assert!(args.contains(&"--private-users=1048576:65536".to_owned()), "{args:?}");
    assert!(args.contains(&format!("--bind={}/cache:/cache:idmap", home.dir.display())), "{args:?}");
    // A warm container: the project's cache is mounted when a job takes it, not at boot.
    let warm = Home { cache: false, ..Home::job(&f.state) };
    let args = strings(&f.backend.standalone_command("m", &warm, None, &notify));
    assert!(!args.iter().any(|a| a.contains(":/cache")), "{args:?}");
}

#[test]
fn the_systemd_boot_commands_are_exact() {
    let f = fixture(Mode::Systemd, Recorder::new());
    let mut c = container(ModeName::Systemd);
    f.host.answer("systemctl", 0, "0\n");
    let cancel = Cancel::never().unwrap();
    boot::boot_systemd(&f.backend, &Home::job(&f.state), &mut c, &cancel).unwrap();
    let unit = unit_name(f.state.key());
    let mut boot = vec![
        "systemd-run".to_owned(),
        "--quiet".to_owned(),
        format!("--unit={unit}"),
        "--slice=machine.slice".to_owned(),
        "--collect".to_owned(),
    ];
    for prop in [
        "Type=notify",
        "NotifyAccess=all",
        "Delegate=yes",
        "KillMode=mixed",
        "DevicePolicy=closed",
        "DeviceAllow=/dev/net/tun rwm",
        "DeviceAllow=char-pts rw",
        "TimeoutStartSec=60s",
        "TimeoutStopSec=5s",
        "TasksMax=4096",
        "MemoryMax=2G",
        &format!("Description=berth job {RUNNER}-5 ({})", f.state.dir().display()),
        &format!("Environment=PATH={}", super::PATH),
    ] {
        boot.push("-p".to_owned());
        boot.push(prop.to_owned());
    }
    boot.push("--".to_owned());
    boot.push("systemd-nspawn".to_owned());
    boot.extend(nspawn_args(&f.state, "yes", ""));
    let show = ["systemctl", "show", &unit, "-p", "MainPID", "--value"].map(str::to_owned).to_vec();
    assert_eq!(f.host.commands(), vec![boot, show]);
    assert!(matches!(f.host.calls()[0], Call::Run { stop: true, .. }), "a cancel stops the unit first");
    assert_eq!(c.unit.as_deref(), Some(unit.as_str()));
    assert_eq!(c.leader, None, "MainPID 0: no init to record");
}

#[test]
fn a_cancelled_systemd_boot_stops_its_unit() {
    let f = fixture(Mode::Systemd, Recorder::new());
    f.host.end_runs([Ended::Cancelled]);
    let cancel = Cancel::never().unwrap();
    let result = boot::boot_systemd(&f.backend, &Home::job(&f.state), &mut container(ModeName::Systemd), &cancel);
    assert!(matches!(result, Err(Failure::Cancelled)), "{result:?}");
    let unit = unit_name(f.state.key());
    assert_eq!(f.host.commands()[1], ["systemctl", "stop", "--no-block", &unit]);
}

/// Runs a stage of `body` in `f`'s container; what run returned.
fn run_stage(f: &Fixture, c: &Container, stage_name: &str) -> Result<(), Failure> {
    f.state.save(RECORD, c).unwrap();
    std::fs::create_dir_all(super::scripts_dir(&f.state)).unwrap();
    let script = f.dir.path().join("script.sh");
    std::fs::write(&script, "echo hi\n").unwrap();
    let job = JobContext::from_vars(RUNNER, [("CUSTOM_ENV_CI_JOB_ID".to_owned(), "5".to_owned())]).unwrap();
    stage::run(&f.backend, &job, &f.state, &script, stage_name, &Cancel::never().unwrap())
}

fn run_args(stage_name: &str) -> Vec<String> {
    let seq = std::process::id();
    [
        "--quiet".to_owned(),
        "--pipe".to_owned(),
        "--wait".to_owned(),
        "--collect".to_owned(),
        format!("--unit=berth-stage-{seq}.service"),
        format!("--description=berth stage {stage_name}"),
        "-p".to_owned(),
        "TimeoutStopSec=3s".to_owned(),
        "-p".to_owned(),
        "Environment=HOME=/root".to_owned(),
        "--".to_owned(),
        "/bin/sh".to_owned(),
        format!("/run/berth/stage-{seq}.run"),
    ]
    .into()
}

#[test]
fn a_systemd_stage_runs_through_machined_and_a_cancel_stops_its_unit() {
    let f = fixture(Mode::Systemd, Recorder::new());
    f.host.set_processes(vec![init_process()]);
    let c = container(ModeName::Systemd);
    let result = run_stage(&f, &c, "build_script");
    // The recorder ran nothing, so no exit status was recorded by the wrapper.
    assert!(matches!(result, Err(Failure::System { .. })), "{result:?}");
    let mut expected = vec!["systemd-run".to_owned(), format!("--machine={}", c.machine)];
    expected.extend(run_args("build_script"));
    assert_eq!(f.host.commands(), vec![expected]);
    let wrapper = std::fs::read_dir(super::scripts_dir(&f.state)).unwrap().count();
    assert_eq!(wrapper, 0, "the stage's script and wrapper are removed");

    f.host.take();
    f.host.end_runs([Ended::Cancelled]);
    assert!(matches!(run_stage(&f, &c, "step_x"), Err(Failure::Cancelled)));
    let unit = format!("berth-stage-{}.service", std::process::id());
    assert_eq!(f.host.commands()[1], ["systemctl", "--machine", &c.machine, "stop", &unit]);
}

#[test]
fn a_standalone_stage_enters_the_inits_namespaces_by_descriptor() {
    let cgroups = tempfile::tempdir().unwrap();
    std::fs::write(cgroups.path().join("cgroup.controllers"), "memory pids cpu").unwrap();
    let machine = format!("berth-{RUNNER}-5");
    std::fs::create_dir_all(cgroups.path().join("berth").join(&machine)).unwrap();
    let f = fixture(Mode::Standalone, Recorder::new().with_cgroup_root(cgroups.path()));
    f.host.set_processes(vec![init_process()]);
    let c = container(ModeName::Standalone);
    assert!(matches!(run_stage(&f, &c, "build_script"), Err(Failure::System { .. })));
    let calls = f.host.calls();
    let stage_cgroup = cgroups.path().join("berth").join(&machine).join("berth-stage");
    assert_eq!(calls[0], Call::Signal { pid: c.leader.unwrap(), signal: None }, "the init still runs");
    assert_eq!(calls[1], Call::Mkdir(stage_cgroup), "from a leaf cgroup of the container's");
    let Call::Run { cmd, stop: true } = &calls[2] else { panic!("{calls:?}") };
    // Descriptor numbers vary: `/proc/self/fd/N` → `/proc/self/fd/*`.
    let argv: Vec<String> = cmd
        .argv()
        .into_iter()
        .map(|a| match a.find("/proc/self/fd/") {
            Some(i) => format!("{}/proc/self/fd/*", &a[..i]),
            None => a,
        })
        .collect();
    let mut expected: Vec<String> = ["nsenter", "--mount=", "--pid=", "--uts=", "--ipc=", "--net=", "--cgroup="]
        .iter()
        .map(|a| if a.ends_with('=') { format!("{a}/proc/self/fd/*") } else { (*a).to_owned() })
        .collect();
    expected.extend(["--root=/proc/self/fd/*", "--wd=/proc/self/fd/*", "--", "systemd-run"].map(str::to_owned));
    expected.extend(run_args("build_script"));
    assert_eq!(argv, expected);
    assert!(cmd.env_clear && cmd.env.len() == 1 && cmd.env[0].0 == "PATH", "{cmd:?}");
}

#[test]
fn a_gone_init_is_never_entered() {
    let f = fixture(Mode::Standalone, Recorder::new());
    let result = run_stage(&f, &container(ModeName::Standalone), "build_script");
    assert!(matches!(&result, Err(Failure::System { .. })), "{result:?}");
    assert!(f.host.calls().is_empty(), "{:?}", f.host.calls());
}

#[test]
fn teardown_kills_the_unit_and_the_init_then_unmounts_deepest_first() {
    let f = fixture(Mode::Systemd, Recorder::new().with_systemd());
    f.host.set_processes(vec![init_process()]);
    let dir = container_dir(&f.state);
    let mount = |rel: &str| MountEntry { point: dir.join(rel), ..MountEntry::default() };
    f.host.set_mounts(vec![mount("cache"), mount("lower"), mount("root")]);
    let c = container(ModeName::Systemd);
    teardown::tear_down(&(f.host.clone() as _), &f.state, Some(&c)).unwrap();
    let unmount = |rel: &str| Call::Unmount { target: dir.join(rel), flags: MntFlags::UMOUNT_NOFOLLOW };
    let mut expected = killed(&unit_name(f.state.key()), c.leader.unwrap());
    expected.extend([unmount("root"), unmount("lower"), unmount("cache")]);
    assert_eq!(f.host.calls(), expected);
}

/// How a systemd-mode container with `unit` and init `leader` is killed.
fn killed(unit: &str, leader: i32) -> Vec<Call> {
    let systemctl = |args: &[&str]| Call::Output(Cmd::new("systemctl").args(args).arg(unit));
    vec![
        systemctl(&["kill", "--signal=SIGKILL"]),
        systemctl(&["stop"]),
        systemctl(&["reset-failed"]),
        Call::Signal { pid: leader, signal: Some(Signal::SIGKILL) },
    ]
}

#[test]
fn a_taken_warm_container_is_torn_down_by_its_recorded_names() {
    let f = fixture(Mode::Systemd, Recorder::new().with_systemd());
    f.host.set_processes(vec![init_process()]);
    let slot = f.dir.path().join("state/pool").join(RUNNER).join("bookworm/3");
    let machine = format!("berth-{RUNNER}-pool3");
    let c = Container {
        machine: machine.clone(),
        unit: Some(format!("{machine}.service")),
        slot: Some(slot.clone()),
        ..container(ModeName::Systemd)
    };
    teardown::tear_down(&(f.host.clone() as _), &f.state, Some(&c)).unwrap();
    assert_eq!(
        f.host.calls(),
        killed(&format!("{machine}.service"), c.leader.unwrap()),
        "the warm container's own unit, never one named after the job"
    );
    assert!(!container_dir(&f.state).exists(), "its files are removed");
}

#[test]
fn the_root_is_an_overlay_on_the_image_and_the_cache_is_guarded() {
    let f = fixture(Mode::Standalone, Recorder::new());
    let image = Image { name: "bookworm".into(), root: f.dir.path().join("images/bookworm"), generation: None };
    let job = JobContext::from_vars(RUNNER, [("CUSTOM_ENV_CI_JOB_ID".to_owned(), "5".to_owned())]).unwrap();
    let cache_source =
        berth_backend_support::cache::job_cache_dir(&f.dir.path().join("cache"), Default::default(), &job).unwrap();
    assert_eq!(cache_source, f.dir.path().join("cache/project-unknown"));
    let home = Home::job(&f.state);
    layer::build_root(&f.backend, &home, Some(&cache_source), &image, &format!("berth-{RUNNER}-5"), None).unwrap();
    let dir = home.dir;
    let call = |source: Option<&Path>, target: PathBuf, fstype: Option<&str>, flags: MsFlags, data: Option<String>| {
        Call::Mount(MountCall {
            source: source.map(Path::to_owned),
            target,
            fstype: fstype.map(str::to_owned),
            flags,
            data,
        })
    };
    let overlay =
        format!("lowerdir={},upperdir={d}/layer/upper,workdir={d}/layer/work", image.root.display(), d = dir.display());
    assert_eq!(
        f.host.calls(),
        vec![
            call(Some(&cache_source), dir.join("cache"), None, MsFlags::MS_BIND, None),
            call(None, dir.join("cache"), None, MsFlags::MS_PRIVATE, None),
            call(
                None,
                dir.join("cache"),
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                None
            ),
            call(Some(Path::new("overlay")), dir.join("root"), Some("overlay"), MsFlags::MS_NODEV, Some(overlay)),
            call(None, dir.join("root"), None, MsFlags::MS_PRIVATE, None),
        ]
    );
    let upper = dir.join("layer/upper");
    assert_eq!(std::fs::read_to_string(upper.join("etc/hostname")).unwrap(), format!("berth-{RUNNER}-5\n"));
}

#[test]
fn a_boot_failure_quotes_the_end_of_its_log_or_says_it_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("boot.log");
    std::fs::write(&log, "").unwrap();
    let empty = boot::log_end(&log);
    assert!(empty.starts_with("; it wrote nothing to its log (raise settings.boot_timeout"), "{empty}");
    let lines: String = (1..=30).map(|n| format!("line {n}\n")).collect();
    std::fs::write(&log, lines).unwrap();
    let end = boot::log_end(&log);
    assert!(end.starts_with("; its log ends with:\nline 11\n") && end.ends_with("line 30"), "{end}");
}

#[test]
fn the_runners_cache_dir_is_where_the_cache_is_bound_and_what_config_says() {
    use berth_backend_api::Backend;
    let f = fixture_with(Mode::Standalone, Recorder::new(), Some("/ci/cache"));
    let home = Home::job(&f.state);
    let args = strings(&f.backend.standalone_command("m", &home, Some(Range { base: 1 << 20 }), Path::new("/n")));
    assert!(args.contains(&format!("--bind={}/cache:/ci/cache:idmap", home.dir.display())), "{args:?}");
    assert!(!args.iter().any(|a| a.ends_with(":/cache:idmap")), "{args:?}");
    let job = JobContext::from_vars(RUNNER, [("CUSTOM_ENV_CI_JOB_ID".to_owned(), "5".to_owned())]).unwrap();
    assert_eq!(f.backend.config(&job).unwrap().cache_dir.as_deref(), Some("/ci/cache"));
    // A cache_dir that is not a plain absolute path is refused when the backend is made.
    let dir = tempfile::tempdir().unwrap();
    let mut runner = RunnerInfo::new(RUNNER, dir.path());
    runner.cache_dir = Some("/ci/../etc".into());
    let settings = Settings { images_dir: Some(dir.path().to_owned()), ..Settings::default() };
    let err = Nspawn::new(settings, &runner).map(drop).unwrap_err().to_string();
    assert!(err.contains("cache_dir"), "{err}");
}
