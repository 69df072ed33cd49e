//! A bench's driver, state and jobs: the runner imitation calling one
//! driver's hooks (berth's, or a reference driver's), timed spawn to exit.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use berth_backend_api::{JobInfo, JobResponse, ResponseVariable};
use berth_backend_support::mounts::mounts_under;
use berth_runner_imitation::runner::{Driver, Hook, HookResult, JobRun, Log, Quiet};

use crate::common::timed;

/// The stages of a trivial job, in the runner's order: every stage
/// gitlab-runner may call (a real job has one of each `_on_success` /
/// `_on_failure` pair; the trivial job has both, for eleven).
pub const STAGES: [&str; 11] = [
    "prepare_script",
    "get_sources",
    "restore_cache",
    "download_artifacts",
    "step_script",
    "after_script",
    "archive_cache",
    "archive_cache_on_failure",
    "upload_artifacts_on_success",
    "upload_artifacts_on_failure",
    "cleanup_file_variables",
];
/// Job ids per bench (each bench of a run has ids of its own).
const IDS_PER_BENCH: u64 = 50_000;
/// Benches of one run (distinct job id ranges).
const MAX_BENCHES: u64 = 20;
/// The next bench's place in this run.
static NEXT_SLOT: AtomicU64 = AtomicU64::new(0);

/// The driver, state directory and job ids shared by every job of one bench.
pub struct Bench {
    /// What the bench measures, for messages (`nspawn-systemd`, `seed-scripts.sh`).
    pub label: String,
    /// Removed on drop, with the state and the jobs' temp dirs in it, unless `keep`
    /// is set or something is still mounted in it.
    pub dir: tempfile::TempDir,
    pub keep: AtomicBool,
    pub state: PathBuf,
    /// How the runner calls the driver's hooks.
    pub driver: Driver,
    /// Job ids: distinct per bench process, per bench and per job.
    base_id: u64,
    next: AtomicU64,
}

/// Hook times of one full job.
pub struct FullJob {
    pub total: Duration,
    pub config: Duration,
    pub prepare: Duration,
    pub stages: Vec<Duration>,
    pub cleanup: Duration,
    /// Whether prepare said it took a warm (pool) container.
    pub warm: bool,
}

/// The hook times of several full jobs, hook by hook.
#[derive(Default)]
pub struct FullJobs {
    pub total: Vec<Duration>,
    pub config: Vec<Duration>,
    pub prepare: Vec<Duration>,
    /// The first stage after prepare.
    pub first: Vec<Duration>,
    /// The other stages.
    pub rest: Vec<Duration>,
    pub cleanup: Vec<Duration>,
    /// How many prepares took a warm container.
    pub warm: usize,
}

impl FullJobs {
    pub fn push(&mut self, job: FullJob) {
        self.total.push(job.total);
        self.config.push(job.config);
        self.prepare.push(job.prepare);
        let mut stages = job.stages.into_iter();
        self.first.extend(stages.next());
        self.rest.extend(stages);
        self.cleanup.push(job.cleanup);
        self.warm += usize::from(job.warm);
    }
}

impl Bench {
    /// A bench of `driver` run as `program args...` with its state in a new
    /// temp dir; `args` gets the temp dir and returns the arguments.
    pub fn new(label: &str, program: &Path, args: impl FnOnce(&Path) -> Vec<OsString>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("berth-bench-{label}"))
            .tempdir()
            .expect("failed to create a temp dir");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).expect("failed to create the state directory");
        let driver = Driver::new(program, args(dir.path()));
        let slot = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
        assert!(slot < MAX_BENCHES, "too many benches for the id scheme");
        let base_id = 7_000_000_000_000 + u64::from(std::process::id()) * 1_000_000 + slot * IDS_PER_BENCH;
        Bench { label: label.to_owned(), dir, keep: false.into(), state, driver, base_id, next: AtomicU64::new(0) }
    }

    /// A bench of berth's runner `runner` of backend `backend` with these
    /// settings (besides `images_dir` and `default_image`).
    pub fn berth(label: &str, binary: &Path, images: &Path, backend: &str, runner: &str, settings: &str) -> Self {
        Bench::new(label, binary, |dir| {
            let state = dir.join("state");
            let config = dir.join("config.toml");
            let toml_str = |path: &Path| serde_json::to_string(path.to_str().expect("path is UTF-8")).expect("encodes");
            let text = format!(
                "state_dir = {}\n[runners.{runner}]\nbackend = \"{backend}\"\n[runners.{runner}.settings]\n\
                 images_dir = {}\ndefault_image = \"{}\"\n{settings}",
                toml_str(&state),
                toml_str(images),
                crate::IMAGE,
            );
            std::fs::write(&config, text).expect("failed to write the configuration");
            vec!["--config".into(), config.into(), "--runner".into(), runner.into()]
        })
    }

    /// `PROGRAM ARGS...` of the driver (`berth --config CONFIG --runner RUNNER`).
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.driver.program);
        command.args(&self.driver.args);
        command
    }

    /// A new job: its own id, and the runner's temp dir for it with the job payload.
    pub fn job(&self) -> Job<'_> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        assert!(n < IDS_PER_BENCH, "too many jobs for the id scheme");
        let mut response = JobResponse::new(self.base_id + n);
        response.token = "t".into();
        response.variables = vec![ResponseVariable::new("CI_JOB_ID", response.id.to_string())];
        response.job_info = JobInfo::new("bench", "test", "bench/project");
        let run = JobRun::new(&response).expect("failed to create the job temp dir");
        Job { bench: self, run, log: Arc::new(Quiet), needs_cleanup: false }
    }

    /// config, prepare, the 11 stages, cleanup; scripts are written before the clock starts.
    pub fn full_job(&self) -> FullJob {
        let mut job = self.job();
        let scripts: Vec<PathBuf> = STAGES.iter().map(|stage| job.script(stage)).collect();
        let start = Instant::now();
        let config = job.config();
        let (prepare, warm) = job.prepare();
        let stages = scripts.iter().zip(STAGES).map(|(script, stage)| job.run(script, stage)).collect();
        let cleanup = job.cleanup();
        FullJob { total: start.elapsed(), config, prepare, stages, cleanup, warm }
    }

    /// `warmup` untimed full jobs, then `count` timed ones, each after `before` (untimed).
    pub fn full_jobs(&self, warmup: usize, count: usize, mut before: impl FnMut()) -> FullJobs {
        for _ in 0..warmup {
            before();
            self.full_job();
        }
        let mut jobs = FullJobs::default();
        for _ in 0..count {
            before();
            jobs.push(self.full_job());
        }
        jobs
    }

    /// `count` step_script stages of a `true` script in one prepared job, each
    /// followed by the same script run with `bash` on the host (the floor), after
    /// `warmup` untimed pairs: each stage's time and each floor's, and the
    /// cgroup a last (untimed) stage ran in, which says how stages start.
    pub fn run_stages(&self, count: usize, warmup: usize) -> (Vec<Duration>, Vec<Duration>, String) {
        let mut job = self.job();
        let script = job.script("step_script");
        job.config();
        job.prepare();
        for _ in 0..warmup {
            job.run(&script, "step_script");
            job.floor(&script);
        }
        let (runs, floors) = (0..count).map(|_| (job.run(&script, "step_script"), job.floor(&script))).unzip();
        let probe = job.run.write_script("step_script", "grep '^0::' /proc/self/cgroup\n").expect("a stage script");
        let output = job.hook(Hook::Run, &[probe.into(), "step_script".into()]).output();
        let cgroup = output.lines().find_map(|line| line.strip_prefix("0::")).unwrap_or("(none)").trim().to_owned();
        job.cleanup();
        (runs, floors, cgroup)
    }

    /// `count` runs of `berth --version`: what one start of berth's binary costs here.
    pub fn version_starts(&self, count: usize) -> Vec<Duration> {
        let log = std::env::temp_dir().join(format!("berth-bench-version-{}.log", std::process::id()));
        let times = (0..count)
            .map(|_| timed(Command::new(&self.driver.program).arg("--version"), &log, false, "berth --version", &[]))
            .collect();
        let _ = std::fs::remove_file(&log);
        times
    }

    /// config, prepare, one step_script stage, cleanup.
    pub fn short_job(&self) -> Duration {
        let mut job = self.job();
        let script = job.script("step_script");
        let start = Instant::now();
        job.short(&script);
        start.elapsed()
    }

    /// `count` short jobs started together, one per thread; the wall time until the last ends.
    pub fn concurrent_jobs(&self, count: usize) -> Duration {
        // Every job's files first: nothing can fail between the threads' start and the barrier.
        let jobs: Vec<(Job, PathBuf)> = (0..count)
            .map(|_| {
                let mut job = self.job();
                let script = job.script("step_script");
                (job, script)
            })
            .collect();
        let barrier = Arc::new(Barrier::new(count + 1));
        std::thread::scope(|scope| {
            let threads: Vec<_> = jobs
                .into_iter()
                .map(|(mut job, script)| {
                    let barrier = Arc::clone(&barrier);
                    scope.spawn(move || {
                        barrier.wait();
                        job.short(&script);
                    })
                })
                .collect();
            barrier.wait();
            let start = Instant::now();
            // Join every thread (each cleans up its job, even when it fails) before reporting a failure.
            let failures: Vec<String> = threads
                .into_iter()
                .filter_map(|thread| thread.join().err())
                .map(|panic| {
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_else(|| "a job thread panicked".to_owned())
                })
                .collect();
            let elapsed = start.elapsed();
            assert!(
                failures.is_empty(),
                "{}: {} of {count} concurrent jobs failed:\n{}",
                self.label,
                failures.len(),
                failures.join("\n")
            );
            elapsed
        })
    }
}

impl Drop for Bench {
    /// Keeps the temp dir rather than delete files under a mount (a failure path's leftover).
    fn drop(&mut self) {
        let mounted = mounts_under(self.dir.path());
        if *self.keep.get_mut() || !mounted.is_empty() {
            self.dir.disable_cleanup(true);
            if !mounted.is_empty() {
                eprintln!(
                    "{} mount(s) left under {}; temp dir kept: {}",
                    mounted.len(),
                    self.dir.path().display(),
                    mounted.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                );
            }
        }
    }
}

/// Whether prepare's output says it handed out a warm container of the pool.
/// The pool's prepare says so in a line with "warm" in it: adjust here if it changes.
pub fn took_warm(prepare_output: &str) -> bool {
    prepare_output.lines().any(|line| line.to_ascii_lowercase().contains("warm"))
}

/// One job of the runner imitation; cleaned up on drop if it was prepared
/// and not cleaned up yet (a failed hook, a panic).
pub struct Job<'a> {
    bench: &'a Bench,
    run: JobRun,
    log: Arc<dyn Log>,
    needs_cleanup: bool,
}

impl Job<'_> {
    /// A `true` stage script in the runner's format.
    pub fn script(&mut self, stage: &str) -> PathBuf {
        self.run.write_script(stage, "true\n").expect("failed to write a stage script")
    }

    /// A hook as the runner calls it; its result, or a panic with its output.
    fn hook(&mut self, hook: Hook, args: &[OsString]) -> HookResult {
        let driver = &self.bench.driver;
        let result = match hook {
            Hook::Config => {
                let (result, parsed) = driver.config(&mut self.run, &self.log);
                parsed.map(|_| result).map_err(|e| e.to_string())
            }
            _ => Ok(driver.call(&self.run, hook, args, None, None, &self.log)),
        };
        let label = format!("{} job {}: {}", self.bench.label, self.run.response().id, hook.name());
        match result {
            Ok(result) if result.ok() => result,
            Ok(result) => panic!("{label}: {:?}\n{}", result.exit, result.output()),
            Err(e) => panic!("{label}: {e}"),
        }
    }

    pub fn config(&mut self) -> Duration {
        self.hook(Hook::Config, &[]).elapsed
    }

    /// Prepare's time, and whether it took a warm container.
    pub fn prepare(&mut self) -> (Duration, bool) {
        // A prepare that fails half way still needs its cleanup, as with the runner.
        self.needs_cleanup = true;
        let result = self.hook(Hook::Prepare, &[]);
        (result.elapsed, took_warm(&result.output()))
    }

    pub fn run(&mut self, script: &Path, stage: &str) -> Duration {
        self.hook(Hook::Run, &[script.into(), stage.into()]).elapsed
    }

    /// config, prepare, `script` as step_script, cleanup.
    fn short(&mut self, script: &Path) {
        self.config();
        self.prepare();
        self.run(script, "step_script");
        self.cleanup();
    }

    /// The floor of a stage: `bash SCRIPT` on the host, spawn to exit.
    pub fn floor(&self, script: &Path) -> Duration {
        let mut command = Command::new("bash");
        command.arg(script).current_dir(self.run.tmpdir());
        let log = self.run.tmpdir().join("floor.stderr");
        timed(&mut command, &log, false, "bash SCRIPT (floor)", &[])
    }

    pub fn cleanup(&mut self) -> Duration {
        let elapsed = self.hook(Hook::Cleanup, &[]).elapsed;
        self.needs_cleanup = false;
        elapsed
    }
}

impl Drop for Job<'_> {
    fn drop(&mut self) {
        if self.needs_cleanup {
            // Best effort on a failure path: the panic that got us here is the report.
            let _ = self.bench.driver.call(&self.run, Hook::Cleanup, &[], None, None, &self.log);
        }
    }
}
