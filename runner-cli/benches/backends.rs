//! What a job costs with the backends that isolate jobs on real images
//! (`nspawn` and `chroot`), end to end, as gitlab-runner pays it.
//!
//! The nspawn backend boots a fresh systemd container (`systemd-nspawn --boot`,
//! standalone mode) per job and runs every stage in it as a unit of its own.
//! The chroot backend mounts a disposable copy-on-write root of the same image
//! per job (no init) and every stage enters it (`pivot_root`, the job's user
//! namespace and cgroup, a PID namespace of its own). This bench drives berth's
//! hooks through the GitLab Runner imitation (`berth_runner_imitation`), each
//! a new process with the runner's environment (its own `TMPDIR` with a
//! `response.json`, the exit-code variables, `CUSTOM_ENV_*`) and stage scripts
//! in the runner's format, and times whole processes, spawn to exit. It prints one table per backend. The floor of a stage is the same
//! `true` stage script run directly on the host with `bash SCRIPT` (spawn and
//! wait); a stage's overhead is the median of `berth run` minus the median of
//! that floor.
//!
//! The issues' targets (they apply to the median; none is asserted):
//!
//! | figure                                   | nspawn            | chroot            |
//! |------------------------------------------|-------------------|-------------------|
//! | full job of 8 trivial stages             | ≤ 1000 ms         | ≤ 150 ms          |
//! | `berth run` of a `true` script, overhead | ≤ 30 ms           | ≤ 10 ms           |
//! | `berth cleanup`                          | ≤ 300 ms          | -                 |
//! | 8 jobs at once                           | all succeed, ≤ 3× | all succeed       |
//! |                                          | one job alone     | (ratio printed)   |
//!
//! - a full job: `config`, `prepare`, 8 × `run` of a `true` script
//!   (prepare_script, get_sources, restore_cache, download_artifacts,
//!   build_script, after_script, archive_cache, upload_artifacts_on_success),
//!   `cleanup`. `berth exec` of job `test` of `examples/hello` is timed next to
//!   it, for comparison (no target), and so are its `config`, `prepare` and
//!   `cleanup` hooks and its 8 stages;
//! - `berth run` of a `true` script, again and again in one prepared job,
//!   each run followed by the floor (`bash SCRIPT` on the host);
//! - 8 jobs started at once (8 threads, each config/prepare/run/cleanup of its
//!   own job), against one such job alone. The host-wide CPU time of both
//!   (`/proc/stat`, every core and process) is printed too, with the bound the
//!   CPU alone puts on their ratio: 8 jobs cannot take less than 8 × the CPU
//!   time of one job / the number of cores, so when one job keeps a core busy
//!   for most of its wall time, 8 jobs on 2 cores take about 4× one job.
//!
//! Every hook must exit 0 (otherwise the bench panics with its stderr), so a
//! broken hook cannot pass for a fast one. Every job is cleaned up, on failure
//! paths too, and after each backend the bench checks that nothing is left in
//! its temp dir (the state directory and the jobs' temp dirs): no
//! `systemd-nspawn --machine=berth-ns-...` process (from /proc) of a container
//! in its state directory (others' jobs on the host are not counted), no
//! process whose root directory is inside it, no mount in /proc/self/mountinfo
//! at or below it, and nothing in the state directory's `jobs/`. If something
//! is left, the temp dir is kept for inspection and the bench exits 1 after
//! the last table.
//!
//! Both backends need root and an image directory `bookworm` in
//! `$BERTH_TEST_IMAGES` (default `/var/cache/berth-test/images`); nspawn needs
//! `systemd-nspawn` too, chroot `mkfs.ext4` (e2fsprogs, for its disk bound). A backend that cannot
//! run here prints `berth BACKEND benchmarks skipped: <reason>`; the others
//! still run, and the bench exits 0.
//!
//! Run with `cargo bench -p berth --bench backends`.
//! `BERTH_BENCH_BACKENDS=nspawn,chroot` selects the backends, in that order
//! (default: both). `BERTH_BENCH_ITERS=N` sets the number of timed full jobs
//! (default 5; also the `berth exec` runs); `BERTH_BENCH_BINARY=PATH` benches
//! another berth binary (a before/after comparison); the run-stage figure takes 40
//! stages and the concurrency figure 3 rounds. Without `--bench`
//! (`cargo test --benches`) each figure is taken once, as a smoke test.

mod common;
#[path = "backends/host.rs"]
mod host;
#[path = "backends/table.rs"]
mod table;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use berth_backend_api::{JobInfo, JobResponse, ResponseVariable};
use berth_backend_support::mounts::mounts_under;
use berth_runner_imitation::runner::{Driver, Hook, JobRun, Log, Quiet};
use common::{timed, Stats};
use host::{can_run, host_cpu, leftovers};
use table::{Row, Target};

/// The berth binary cargo built for this bench (same profile as the bench).
const BERTH: &str = env!("CARGO_BIN_EXE_berth");
/// The berth under test: `BERTH_BENCH_BINARY` (another build, e.g. the last
/// release, for a before/after comparison on the same machine), else [`BERTH`].
fn berth_binary() -> PathBuf {
    std::env::var_os("BERTH_BENCH_BINARY").map_or_else(|| PathBuf::from(BERTH), PathBuf::from)
}

/// Timed full jobs (and `berth exec` runs), unless `BERTH_BENCH_ITERS` is set.
const FULL_JOBS: usize = 5;
/// Timed `berth run` stages (and as many floors) in one prepared job.
const RUN_STAGES: usize = 40;
/// Rounds of one job alone, then 8 jobs at once.
const ROUNDS: usize = 3;
/// Jobs started at once.
const CONCURRENT: usize = 8;
/// Untimed full jobs, `berth exec` runs and stages first (page cache, the image's files).
const WARMUP: usize = 1;
/// The image every job uses.
const IMAGE: &str = "bookworm";
/// Where the images are unless `BERTH_TEST_IMAGES` says otherwise.
const DEFAULT_IMAGES: &str = "/var/cache/berth-test/images";
/// The stages of a full job, in the runner's order.
const STAGES: [&str; 8] = [
    "prepare_script",
    "get_sources",
    "restore_cache",
    "download_artifacts",
    "build_script",
    "after_script",
    "archive_cache",
    "upload_artifacts_on_success",
];
/// What a container's nspawn process has on its command line.
const MACHINE_ARG: &str = "--machine=berth-ns-";
/// Job ids per backend (each backend's jobs have ids of their own).
const IDS_PER_BACKEND: u64 = 50_000;

/// A backend this bench measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Nspawn,
    Chroot,
}

/// A backend's targets from its issue (milliseconds, on the median).
#[derive(Debug)]
struct Targets {
    /// A full job of 8 trivial stages.
    full_job: f64,
    /// `berth run` of a `true` script, minus the floor (`bash SCRIPT` on the host).
    run_overhead: f64,
    /// `berth cleanup`, if it has a target.
    cleanup: Option<f64>,
    /// 8 jobs at once over one job alone, if it has a target.
    concurrent_ratio: Option<f64>,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::Nspawn, Kind::Chroot];

    /// The backend's name in the configuration and in `BERTH_BENCH_BACKENDS`.
    fn name(self) -> &'static str {
        match self {
            Kind::Nspawn => "nspawn",
            Kind::Chroot => "chroot",
        }
    }

    /// The runner name in the generated configuration.
    fn runner(self) -> &'static str {
        match self {
            Kind::Nspawn => "ns",
            Kind::Chroot => "ch",
        }
    }

    /// The runner's settings besides `images_dir` and `default_image`.
    fn extra_settings(self) -> &'static str {
        match self {
            Kind::Nspawn => "mode = \"standalone\"\n",
            Kind::Chroot => "",
        }
    }

    /// The program the backend cannot do without (besides root and the image).
    fn tool(self) -> &'static str {
        match self {
            Kind::Nspawn => "systemd-nspawn",
            Kind::Chroot => "mkfs.ext4",
        }
    }

    fn targets(self) -> Targets {
        match self {
            Kind::Nspawn => {
                Targets { full_job: 1000.0, run_overhead: 30.0, cleanup: Some(300.0), concurrent_ratio: Some(3.0) }
            }
            Kind::Chroot => Targets { full_job: 150.0, run_overhead: 10.0, cleanup: None, concurrent_ratio: None },
        }
    }

    /// The label and target of the `berth prepare` row.
    fn prepare_row(self) -> (&'static str, Target) {
        match self {
            Kind::Nspawn => ("berth prepare (boot to ready)", Target::info("floor ~400 ms")),
            Kind::Chroot => ("berth prepare (mount the root)", Target::none()),
        }
    }

    /// Where a stage runs, for the `berth run` row's label.
    fn stage_place(self) -> &'static str {
        match self {
            Kind::Nspawn => "booted container",
            Kind::Chroot => "mounted root",
        }
    }
}

/// The backends `BERTH_BENCH_BACKENDS` names (default: all), in its order.
fn selected_backends() -> Vec<Kind> {
    let Some(value) = std::env::var_os("BERTH_BENCH_BACKENDS") else { return Kind::ALL.to_vec() };
    let value = value.into_string().unwrap_or_else(|v| panic!("BERTH_BENCH_BACKENDS is not UTF-8: {v:?}"));
    let known = || Kind::ALL.map(Kind::name).join(", ");
    let mut kinds = Vec::new();
    for name in value.split(',').map(str::trim).filter(|name| !name.is_empty()) {
        let kind = Kind::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .unwrap_or_else(|| panic!("BERTH_BENCH_BACKENDS: unknown backend {name:?} (known: {})", known()));
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    assert!(!kinds.is_empty(), "BERTH_BENCH_BACKENDS names no backend (known: {}); unset it for all", known());
    kinds
}

/// How many times each figure is taken.
#[derive(Debug, Clone, Copy)]
struct Plan {
    bench_mode: bool,
    full_jobs: usize,
    run_stages: usize,
    rounds: usize,
    warmup: usize,
}

fn main() {
    let bench_mode = std::env::args().any(|arg| arg == "--bench");
    let iters_override = std::env::var("BERTH_BENCH_ITERS")
        .ok()
        .map(|v| v.parse::<usize>().ok().filter(|n| *n > 0).expect("BERTH_BENCH_ITERS must be a positive integer"));
    let (full_jobs, run_stages, rounds, warmup) = match (bench_mode, iters_override) {
        (false, _) => (1, 1, 1, 0),
        (true, Some(n)) => (n, RUN_STAGES, ROUNDS, WARMUP),
        (true, None) => (FULL_JOBS, RUN_STAGES, ROUNDS, WARMUP),
    };
    let plan = Plan { bench_mode, full_jobs, run_stages, rounds, warmup };
    let kinds = selected_backends();

    let images = std::env::var_os("BERTH_TEST_IMAGES").map_or_else(|| PathBuf::from(DEFAULT_IMAGES), PathBuf::from);
    let binary = berth_binary();
    // Hooks inherit this process's environment, as the runner's do: nothing of it may change berth's behaviour.
    for key in common::scrubbed_vars() {
        std::env::remove_var(key);
    }
    let mut left_something = false;
    for (slot, kind) in kinds.into_iter().enumerate() {
        if let Err(reason) = can_run(kind, &images) {
            println!("berth {} benchmarks skipped: {reason}", kind.name());
            continue;
        }
        let bench = Bench::new(kind, &binary, &images, slot as u64);
        left_something |= !bench_backend(&bench, &images, plan);
    }
    if left_something {
        std::process::exit(1);
    }
}

/// Takes and prints every figure of one backend; false if it left something behind.
fn bench_backend(bench: &Bench, images: &Path, plan: Plan) -> bool {
    let Plan { bench_mode, full_jobs, run_stages, rounds, warmup } = plan;
    let kind = bench.kind;
    let targets = kind.targets();

    // 1. Full jobs by hand, and `berth exec` for comparison.
    for _ in 0..warmup {
        bench.full_job();
    }
    let mut full = Vec::with_capacity(full_jobs);
    let mut config = Vec::with_capacity(full_jobs);
    let mut prepare = Vec::with_capacity(full_jobs);
    let mut stages = Vec::with_capacity(full_jobs * STAGES.len());
    let mut cleanup = Vec::with_capacity(full_jobs);
    for _ in 0..full_jobs {
        let times = bench.full_job();
        full.push(times.total);
        config.push(times.config);
        prepare.push(times.prepare);
        stages.extend(times.stages);
        cleanup.push(times.cleanup);
    }

    let pipeline = bench.root.join("examples/hello/.gitlab-ci.yml");
    let sources = bench.root.join("examples/hello");
    // The job log tells whether prepare was retried (every attempt says "Preparing environment").
    let mut exec_retries = 0;
    let mut first_failed_prepare = String::new();
    let mut exec_once = || {
        let mut exec = bench.berth();
        exec.arg("exec").arg("--file").arg(&pipeline).arg("--sources").arg(&sources).arg("test");
        exec.env("TMPDIR", bench.dir.path()).current_dir(bench.dir.path());
        let log = bench.dir.path().join("exec.log");
        let elapsed = timed(&mut exec, &log, true, &format!("{}: berth exec", kind.name()), &[]);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let attempts = text.lines().filter(|line| line.trim() == "Preparing environment").count();
        if attempts > 1 && exec_retries == 0 {
            // The first failed attempt's output: from the first "Preparing environment" to the next.
            first_failed_prepare = text
                .lines()
                .skip_while(|line| line.trim() != "Preparing environment")
                .skip(1)
                .take_while(|line| line.trim() != "Preparing environment")
                .map(|line| format!("  | {line}\n"))
                .collect();
        }
        exec_retries += attempts.saturating_sub(1);
        elapsed
    };
    for _ in 0..warmup {
        exec_once();
    }
    let exec: Vec<Duration> = (0..full_jobs).map(|_| exec_once()).collect();

    // 2. Run stages in one prepared job, each next to its floor.
    let (runs, floors) = bench.run_stages(run_stages, warmup);

    // 3. One job alone, then 8 at once, per round.
    // Host-wide CPU time is taken around each, to tell a CPU-bound run from one that waits.
    let mut alone = Vec::with_capacity(rounds);
    let mut together = Vec::with_capacity(rounds);
    let (mut alone_cpu, mut together_cpu) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for _ in 0..rounds {
        let cpu = host_cpu();
        alone.push(bench.short_job());
        alone_cpu.push(host_cpu().saturating_sub(cpu));
        let cpu = host_cpu();
        together.push(bench.concurrent_jobs(CONCURRENT));
        together_cpu.push(host_cpu().saturating_sub(cpu));
    }
    let cpu_alone = Stats::of("CPU of 1 job", alone_cpu).median;
    let cpu_together = Stats::of("CPU of 8 jobs", together_cpu).median;

    let (found, foreign) = leftovers(bench);

    let floor = Row::new("bash SCRIPT on the host (floor)", Target::info("spawn + wait"), floors);
    let overhead = Target::overhead(targets.run_overhead);
    let alone = Row::new("1 job (config/prepare/run/cleanup)", Target::none(), alone);
    let together_target = match targets.concurrent_ratio {
        Some(ratio) => Target::relative(&format!("≤ {ratio} × 1 job"), ratio * alone.median),
        None => Target::info("all succeed"),
    };
    let together = Row::new(&format!("{CONCURRENT} jobs at once (total wall)"), together_target, together);
    let ratio = together.median / alone.median;
    let (alone_ms, together_ms) = (alone.median, together.median);
    let (prepare_label, prepare_target) = kind.prepare_row();
    let cleanup_target = targets.cleanup.map_or_else(Target::none, Target::max);
    let floor_median = floor.median;
    let rows = vec![
        Row::new("full job, 8 stages (by hand)", Target::max(targets.full_job), full),
        Row::new("berth exec examples/hello test", Target::none(), exec),
        Row::new("berth config", Target::none(), config),
        Row::new(prepare_label, prepare_target, prepare),
        floor,
        Row::new("berth run, the 8 stages of full jobs", overhead.clone(), stages).with_floor(floor_median),
        Row::new(&format!("berth run `true` ({})", kind.stage_place()), overhead, runs).with_floor(floor_median),
        Row::new("berth cleanup", cleanup_target, cleanup),
        alone,
        together,
    ];

    let profile = if cfg!(debug_assertions) { "debug build: figures are not representative" } else { "release build" };
    println!();
    println!(
        "berth {} benchmarks ({profile}; image {IMAGE} from {}; {full_jobs} full jobs, {run_stages} run stages, \
         {rounds} rounds of {CONCURRENT} concurrent jobs)",
        kind.name(),
        images.display()
    );
    println!(
        "{:<40}{:>6}  {:>8} {:>8} {:>8} {:>8} {:>9}   target",
        "command", "runs", "min", "median", "p95", "mean", "overhead"
    );
    for row in &rows {
        println!("{row}");
    }
    let verdict = match targets.concurrent_ratio {
        Some(limit) => format!("target ≤ {limit}×) {}", if ratio <= limit { "ok" } else { "OVER" }),
        None => "no target)".to_owned(),
    };
    println!("{CONCURRENT} jobs at once / 1 job: {ratio:.2}× (medians; all {CONCURRENT} jobs succeeded in every round; {verdict}");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let bound = CONCURRENT as f64 * cpu_alone / cores;
    println!(
        "CPU (host-wide, medians): 1 job {cpu_alone:.0} ms of CPU in {:.0} ms ({:.0}% of one core); \
         {CONCURRENT} at once {cpu_together:.0} ms in {:.0} ms ({:.0}% of {cores} cores). \
         The CPU alone bounds {CONCURRENT} jobs to ≥ {CONCURRENT} × {cpu_alone:.0} / {cores} = {bound:.0} ms = {:.2}× one job.",
        alone_ms,
        100.0 * cpu_alone / alone_ms,
        together_ms,
        100.0 * cpu_together / (together_ms * cores),
        bound / alone_ms,
    );
    println!(
        "(milliseconds, wall time from spawn to exit; overhead = median − median of the floor; \
         targets apply to the median, or to the overhead where there is one)"
    );
    if !bench_mode {
        println!("(smoke run: each figure once; use `cargo bench` for figures)");
    }
    if exec_retries > 0 {
        println!(
            "(berth exec retried prepare {exec_retries} time(s), warm-up included: 3 s pause each; first failure:)"
        );
        print!("{first_failed_prepare}");
    }
    if foreign > 0 {
        println!("({foreign} berth-ns- container(s) of another state directory, not this bench's, ignored)");
    }
    if found.is_empty() {
        println!("leftovers: none");
        true
    } else {
        println!("leftovers:");
        for item in &found {
            println!("  {item}");
        }
        // Keep the temp dir for inspection rather than delete files under a live container or mount.
        bench.keep.store(true, Ordering::Relaxed);
        println!("(temp dir kept: {})", bench.dir.path().display());
        false
    }
}

/// The configuration, state directory and job ids shared by every job of one backend.
struct Bench {
    kind: Kind,
    /// The workspace root (examples live there).
    root: PathBuf,
    /// Removed on drop, with the state and the jobs' temp dirs in it, unless `keep`
    /// is set or something is still mounted in it.
    dir: tempfile::TempDir,
    keep: AtomicBool,
    state: PathBuf,
    /// `berth --config CONFIG --runner RUNNER HOOK`, as gitlab-runner calls it.
    driver: Driver,
    /// Job ids: distinct per bench process, per backend and per job.
    base_id: u64,
    next: AtomicU64,
}

/// Hook times of one full job.
struct FullJob {
    total: Duration,
    config: Duration,
    prepare: Duration,
    stages: Vec<Duration>,
    cleanup: Duration,
}

impl Bench {
    /// `slot`: the backend's place in this run (for distinct job ids).
    fn new(kind: Kind, binary: &Path, images: &Path, slot: u64) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("berth-bench-{}", kind.name()))
            .tempdir()
            .expect("failed to create a temp dir");
        let state = dir.path().join("state");
        let config = dir.path().join("config.toml");
        let toml_str = |path: &Path| serde_json::to_string(path.to_str().expect("path is UTF-8")).expect("encodes");
        let runner = kind.runner();
        let text = format!(
            "state_dir = {}\n[runners.{runner}]\nbackend = \"{}\"\n[runners.{runner}.settings]\n\
             images_dir = {}\ndefault_image = \"{IMAGE}\"\n{}",
            toml_str(&state),
            kind.name(),
            toml_str(images),
            kind.extra_settings(),
        );
        std::fs::write(&config, text).expect("failed to write the configuration");
        let args: Vec<OsString> = vec!["--config".into(), config.into(), "--runner".into(), runner.into()];
        let driver = Driver::new(binary, args);
        let base_id = 7_000_000_000_000 + u64::from(std::process::id()) * 100_000 + slot * IDS_PER_BACKEND;
        let root = common::workspace_root();
        Bench { kind, root, dir, keep: false.into(), state, driver, base_id, next: AtomicU64::new(0) }
    }

    /// `berth --config CONFIG --runner RUNNER`.
    fn berth(&self) -> Command {
        let mut command = Command::new(&self.driver.program);
        command.args(&self.driver.args);
        command
    }

    /// A new job: its own id, and the runner's temp dir for it with the job payload.
    fn job(&self) -> Job<'_> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        assert!(n < IDS_PER_BACKEND, "too many jobs for the id scheme");
        let mut response = JobResponse::new(self.base_id + n);
        response.token = "t".into();
        response.variables = vec![ResponseVariable::new("CI_JOB_ID", response.id.to_string())];
        response.job_info = JobInfo::new("bench", "test", "bench/project");
        let run = JobRun::new(&response).expect("failed to create the job temp dir");
        Job { bench: self, run, log: Arc::new(Quiet), needs_cleanup: false }
    }

    /// config, prepare, the 8 stages, cleanup; scripts are written before the clock starts.
    fn full_job(&self) -> FullJob {
        let mut job = self.job();
        let scripts: Vec<PathBuf> = STAGES.iter().map(|stage| job.script(stage)).collect();
        let start = Instant::now();
        let config = job.config();
        let prepare = job.prepare();
        let stages = scripts.iter().zip(STAGES).map(|(script, stage)| job.run(script, stage)).collect();
        let cleanup = job.cleanup();
        FullJob { total: start.elapsed(), config, prepare, stages, cleanup }
    }

    /// `count` build_script stages of a `true` script in one prepared job, each
    /// followed by the same script run with `bash` on the host (the floor), after
    /// `warmup` untimed pairs: each stage's time and each floor's.
    fn run_stages(&self, count: usize, warmup: usize) -> (Vec<Duration>, Vec<Duration>) {
        let mut job = self.job();
        let script = job.script("build_script");
        job.config();
        job.prepare();
        for _ in 0..warmup {
            job.run(&script, "build_script");
            job.floor(&script);
        }
        let (runs, floors) = (0..count).map(|_| (job.run(&script, "build_script"), job.floor(&script))).unzip();
        job.cleanup();
        (runs, floors)
    }

    /// config, prepare, one build_script stage, cleanup.
    fn short_job(&self) -> Duration {
        let mut job = self.job();
        let script = job.script("build_script");
        let start = Instant::now();
        job.config();
        job.prepare();
        job.run(&script, "build_script");
        job.cleanup();
        start.elapsed()
    }

    /// `count` short jobs started together, one per thread; the wall time until the last ends.
    fn concurrent_jobs(&self, count: usize) -> Duration {
        // Every job's files first: nothing can fail between the threads' start and the barrier.
        let jobs: Vec<(Job, PathBuf)> = (0..count)
            .map(|_| {
                let mut job = self.job();
                let script = job.script("build_script");
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
                        job.config();
                        job.prepare();
                        job.run(&script, "build_script");
                        job.cleanup();
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
                self.kind.name(),
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

/// One job of the runner imitation; cleaned up on drop if it was prepared
/// and not cleaned up yet (a failed hook, a panic).
struct Job<'a> {
    bench: &'a Bench,
    run: JobRun,
    log: Arc<dyn Log>,
    needs_cleanup: bool,
}

impl Job<'_> {
    /// A `true` stage script in the runner's format.
    fn script(&mut self, stage: &str) -> PathBuf {
        self.run.write_script(stage, "true\n").expect("failed to write a stage script")
    }

    /// A hook as the runner calls it; its wall time from spawn to exit, or a panic with its output.
    fn hook(&mut self, hook: Hook, args: &[OsString]) -> Duration {
        let driver = &self.bench.driver;
        let result = match hook {
            Hook::Config => {
                let (result, parsed) = driver.config(&mut self.run, &self.log);
                parsed.map(|_| result).map_err(|e| e.to_string())
            }
            _ => Ok(driver.call(&self.run, hook, args, None, None, &self.log)),
        };
        let label = format!("{} job {}: berth {}", self.bench.kind.name(), self.run.response().id, hook.name());
        match result {
            Ok(result) if result.ok() => result.elapsed,
            Ok(result) => panic!("{label}: {:?}\n{}", result.exit, result.output()),
            Err(e) => panic!("{label}: {e}"),
        }
    }

    fn config(&mut self) -> Duration {
        self.hook(Hook::Config, &[])
    }

    fn prepare(&mut self) -> Duration {
        // A prepare that fails half way still needs its cleanup, as with the runner.
        self.needs_cleanup = true;
        self.hook(Hook::Prepare, &[])
    }

    fn run(&mut self, script: &Path, stage: &str) -> Duration {
        self.hook(Hook::Run, &[script.into(), stage.into()])
    }

    /// The floor of a stage: `bash SCRIPT` on the host, spawn to exit.
    fn floor(&self, script: &Path) -> Duration {
        let mut command = Command::new("bash");
        command.arg(script).current_dir(self.run.tmpdir());
        let log = self.run.tmpdir().join("floor.stderr");
        timed(&mut command, &log, false, "bash SCRIPT (floor)", &[])
    }

    fn cleanup(&mut self) -> Duration {
        let elapsed = self.hook(Hook::Cleanup, &[]);
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
