//! The bwrap backend on a real image (as root, with bubblewrap installed and
//! the test images of `scripts/test`; skipped otherwise): a whole job through
//! the backend's operations, without berth's hooks around it.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_backend_api::{
    Backend, Cancel, Failure, JobContext, JobKey, JobRecord, JobState, NewBackend, RunnerInfo, StateDir,
};
use berth_backend_bwrap::{Bwrap, Settings};

fn images() -> Option<PathBuf> {
    let images =
        PathBuf::from(std::env::var("BERTH_TEST_IMAGES").unwrap_or_else(|_| "/var/cache/berth-test/images".into()));
    let missing = if !nix::unistd::Uid::effective().is_root() {
        Some("not running as root".to_owned())
    } else if !["/usr/bin/bwrap", "/usr/local/bin/bwrap"].iter().any(|p| Path::new(p).exists()) {
        Some("bubblewrap is not installed (apt-get install bubblewrap)".to_owned())
    } else if !images.join("bookworm/current").exists() {
        Some(format!("no test images in {} (scripts/test builds them)", images.display()))
    } else {
        None
    };
    berth_backend_api::testing::prerequisite(missing.map(|reason| format!("cannot test bwrap: {reason}")))
        .then_some(images)
}

struct Job {
    _dir: tempfile::TempDir,
    backend: Bwrap,
    job: JobContext,
    state: JobState,
    scripts: PathBuf,
}

impl Job {
    fn new(images: &Path, id: u64, extra: &str) -> Job {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!("images_dir = {:?}\ndefault_image = \"bookworm\"\n{extra}", images.display().to_string());
        let settings: Settings = toml::from_str(&toml).unwrap();
        let backend = Bwrap::new(settings, &RunnerInfo::new("bwt", dir.path())).unwrap();
        let job = JobContext::from_vars("bwt", [("CUSTOM_ENV_CI_JOB_ID".to_owned(), id.to_string())]).unwrap();
        let state = StateDir::new(dir.path()).create(JobRecord::new(JobKey::new("bwt", id).unwrap(), "bwrap")).unwrap();
        let scripts = dir.path().join("scripts");
        fs::create_dir_all(&scripts).unwrap();
        Job { _dir: dir, backend, job, state, scripts }
    }

    fn run(&self, body: &str, cancel: &Cancel) -> Result<(), Failure> {
        let script = self.scripts.join("script");
        fs::write(&script, body).unwrap();
        self.backend.run(&self.job, &self.state, &script, "build_script", cancel)
    }
}

fn code(result: Result<(), Failure>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(Failure::Script { code }) => code,
        Err(other) => panic!("not a script result: {other}"),
    }
}

/// A `sleep` argument no other process has: marks the processes of one test run.
fn marker(n: u32) -> String {
    format!("{n}.{}", std::process::id())
}

fn mounted_under(dir: &Path) -> bool {
    fs::read_to_string("/proc/self/mountinfo").unwrap().contains(dir.to_str().unwrap())
}

#[test]
fn a_whole_job_runs_in_its_root_and_leaves_nothing() {
    let Some(images) = images() else { return };
    let job = Job::new(&images, 1, "");
    let never = Cancel::never().unwrap();
    job.backend.prepare(&job.job, &job.state, &never).unwrap();
    for c in [0, 1, 42, 255] {
        assert_eq!(code(job.run(&format!("exit {c}\n"), &never)), c);
    }
    assert_eq!(code(job.run("kill -9 $$\n", &never)), 137);
    // What the job sees: its own root, hostname, /proc, /tmp, cache and builds.
    let probe = "set -e\n\
         test \"$(hostname)\" = berth-bwt-1\n\
         . /etc/os-release; test \"$ID\" = debian\n\
         test \"$(cat /proc/1/comm)\" = bwrap\n\
         test \"$(stat -f -c %T /tmp)\" = overlayfs\n\
         grep -q '^NoNewPrivs:\t1' /proc/self/status && grep -q '^Seccomp:\t2' /proc/self/status\n\
         test \"$(cut -c1-12 /proc/self/uid_map | tr -d ' ')\" = 0 && ! grep -q '^ *0 *0 ' /proc/self/uid_map\n\
         test -c /dev/null && test -d /builds && test -d /cache && test -s /etc/resolv.conf\n\
         echo kept > /builds/file; touch /cache/entry\n\
         grep ' /cache ' /proc/self/mountinfo | grep nosuid | grep -q nodev\n\
         test \"$HOME\" = /root && test -z \"${CUSTOM_ENV_CI_JOB_ID:-}\"\n";
    assert_eq!(code(job.run(probe, &never)), 0);
    assert_eq!(code(job.run("test \"$(cat /builds/file)\" = kept\n", &never)), 0, "files survive between stages");
    assert!(!images.join("bookworm/current/builds/file").exists(), "the image is never written");

    // A background process neither survives the stage nor delays it.
    let started = Instant::now();
    let bg = format!("sleep {0} &\nsetsid sleep {0} &\nexit 3\n", marker(7331));
    assert_eq!(code(job.run(&bg, &never)), 3);
    assert!(started.elapsed() < Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    assert!(berth_backend_support::proc::pids_with_arg(&marker(7331)).is_empty(), "a background process survived");

    // Cancel: the stage stops within the grace period even when it ignores SIGTERM.
    let (cancel, trigger) = Cancel::pair().unwrap();
    let thread = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        trigger.fire();
    });
    let started = Instant::now();
    let result = job.run(&format!("trap '' TERM\nsleep {0} &\nsleep {0}\n", marker(7332)), &cancel);
    thread.join().unwrap();
    assert!(matches!(result, Err(Failure::Cancelled)), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    assert!(berth_backend_support::proc::pids_with_arg(&marker(7332)).is_empty(), "a cancelled stage survived");

    job.backend.cleanup(&job.state).unwrap();
    job.backend.cleanup(&job.state).unwrap();
    assert!(!mounted_under(job.state.dir()), "a mount of the job is left");
}

#[test]
fn cleanup_kills_what_a_killed_hook_left_in_the_sandbox() {
    let Some(images) = images() else { return };
    let job = Job::new(&images, 2, "private_network = true\n");
    let never = Cancel::never().unwrap();
    job.backend.prepare(&job.job, &job.state, &never).unwrap();
    assert_eq!(code(job.run("test \"$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ')\" = lo\n", &never)), 0);
    // A sandbox berth no longer waits for (as after a SIGKILLed run hook).
    // --die-with-parent only so that a failing test leaves nothing behind.
    let root = job.state.dir().join("root");
    let mut orphan = std::process::Command::new("bwrap")
        .args(["--bind", root.to_str().unwrap(), "/", "--proc", "/proc", "--dev", "/dev", "--unshare-pid"])
        .args(["--die-with-parent", "--", "/bin/sleep", &marker(7333)])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!berth_backend_support::proc::pids_with_arg(&marker(7333)).is_empty());
    job.backend.cleanup(&job.state).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while orphan.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = orphan.kill();
            let _ = orphan.wait();
            panic!("the sandbox survived cleanup");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(berth_backend_support::proc::pids_with_arg(&marker(7333)).is_empty(), "the sandbox survived cleanup");
    assert!(!mounted_under(job.state.dir()), "a mount of the job is left");
}
