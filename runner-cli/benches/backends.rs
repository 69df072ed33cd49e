//! What a job costs with the nspawn backend, end to end, as gitlab-runner pays it.
//!
//! The nspawn backend boots a fresh systemd container (`systemd-nspawn --boot`,
//! standalone mode) per job and runs every stage in it as a unit of its own.
//! This bench drives berth's hooks by hand, each a new process with the
//! runner's environment (its own `TMPDIR` with a `response.json`, the exit-code
//! variables, `CUSTOM_ENV_*`), and times whole processes, spawn to exit. The
//! issue's targets (they apply to the median; none is asserted):
//!
//! - a full job of 8 trivial stages: `config`, `prepare`, 8 × `run` of a `true`
//!   script (prepare_script, get_sources, restore_cache, download_artifacts,
//!   build_script, after_script, archive_cache, upload_artifacts_on_success),
//!   `cleanup`: wall time ≤ 1.0 s. `berth exec` of job `test` of
//!   `examples/hello` is timed next to it, for comparison (no target);
//! - `berth prepare`, boot to ready: the floor is about 0.4 s (no target);
//! - `berth run` of a `true` script in a booted container: ≤ 30 ms of overhead;
//! - `berth cleanup`: ≤ 0.3 s;
//! - 8 jobs started at once (8 threads, each config/prepare/run/cleanup of its
//!   own job): all succeed, and the whole takes ≤ 3 × one job alone.
//!
//! Every hook must exit 0 (otherwise the bench panics with its stderr), so a
//! broken hook cannot pass for a fast one. Every job is cleaned up, on failure
//! paths too, and at the end the bench checks that nothing is left: no
//! `systemd-nspawn --machine=berth-ns-...` process (from /proc) of a container
//! in its state directory (others' jobs on the host are not counted) and
//! nothing in the state directory's `jobs/`.
//!
//! Needs root, `systemd-nspawn` and an image directory `bookworm` in
//! `$BERTH_TEST_IMAGES` (default `/var/cache/berth-test/images`); without them
//! it prints `skipped: <reason>` and exits 0.
//!
//! Run with `cargo bench -p berth --bench nspawn`. `BERTH_BENCH_ITERS=N` sets
//! the number of timed full jobs (default 5; also the `berth exec` runs); the
//! run-stage figure takes 40 stages and the concurrency figure 3 rounds.
//! Without `--bench` (`cargo test --benches`) each figure is taken once, as a
//! smoke test.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// The berth binary cargo built for this bench (same profile as the bench).
const BERTH: &str = env!("CARGO_BIN_EXE_berth");
/// Timed full jobs (and `berth exec` runs), unless `BERTH_BENCH_ITERS` is set.
const FULL_JOBS: usize = 5;
/// Timed `berth run` stages in one booted container.
const RUN_STAGES: usize = 40;
/// Rounds of one job alone, then 8 jobs at once.
const ROUNDS: usize = 3;
/// Jobs started at once.
const CONCURRENT: usize = 8;
/// Untimed full jobs and `berth exec` runs first (page cache, the image's files).
const WARMUP: usize = 1;
/// The runner name in the generated configuration.
const RUNNER: &str = "ns";
/// The image every job boots.
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

    let images = std::env::var_os("BERTH_TEST_IMAGES").map_or_else(|| PathBuf::from(DEFAULT_IMAGES), PathBuf::from);
    if let Err(reason) = can_run(&images) {
        println!("berth nspawn benchmarks skipped: {reason}");
        return;
    }
    let bench = Bench::new(&images);
    let mut rows = Vec::new();

    // 1. Full jobs by hand, and `berth exec` for comparison.
    for _ in 0..warmup {
        bench.full_job();
    }
    let mut full = Vec::with_capacity(full_jobs);
    let mut config = Vec::with_capacity(full_jobs);
    let mut prepare = Vec::with_capacity(full_jobs);
    let mut cleanup = Vec::with_capacity(full_jobs);
    for _ in 0..full_jobs {
        let times = bench.full_job();
        full.push(times.total);
        config.push(times.config);
        prepare.push(times.prepare);
        cleanup.push(times.cleanup);
    }
    rows.push(Row::new("full job, 8 stages (by hand)", Target::max(1000.0), full));

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
        let elapsed = timed(&mut exec, &log, true, "berth exec", &bench.scrub);
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
    let exec = (0..full_jobs).map(|_| exec_once()).collect();
    rows.push(Row::new("berth exec examples/hello test", Target::none(), exec));
    rows.push(Row::new("berth config", Target::none(), config));
    rows.push(Row::new("berth prepare (boot to ready)", Target::info("floor ~400 ms"), prepare));

    // 2. Run stages in one booted container.
    rows.push(Row::new("berth run `true` (booted container)", Target::max(30.0), bench.run_stages(run_stages)));
    rows.push(Row::new("berth cleanup", Target::max(300.0), cleanup));

    // 3. One job alone, then 8 at once, per round.
    let mut alone = Vec::with_capacity(rounds);
    let mut together = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        alone.push(bench.short_job());
        together.push(bench.concurrent_jobs(CONCURRENT));
    }
    let alone = Row::new("1 job (config/prepare/run/cleanup)", Target::none(), alone);
    let limit = 3.0 * alone.median;
    let together =
        Row::new(&format!("{CONCURRENT} jobs at once (total wall)"), Target::relative("≤ 3 × 1 job", limit), together);
    let ratio = together.median / alone.median;
    rows.push(alone);
    rows.push(together);

    let (found, foreign) = leftovers(&bench.state);

    let profile = if cfg!(debug_assertions) { "debug build: figures are not representative" } else { "release build" };
    println!();
    println!(
        "berth nspawn benchmarks ({profile}; image {IMAGE} from {}; {full_jobs} full jobs, {run_stages} run stages, \
         {rounds} rounds of {CONCURRENT} concurrent jobs)",
        images.display()
    );
    println!("{:<40}{:>6}  {:>8} {:>8} {:>8} {:>8}   target", "command", "runs", "min", "median", "p95", "mean");
    for row in &rows {
        println!("{row}");
    }
    println!(
        "{CONCURRENT} jobs at once / 1 job: {ratio:.2}× (medians; target ≤ 3×) {}",
        if ratio <= 3.0 { "ok" } else { "OVER" }
    );
    println!("(milliseconds, wall time from spawn to exit; targets apply to the median)");
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
    } else {
        println!("leftovers:");
        for item in &found {
            println!("  {item}");
        }
        // Keep the state directory for inspection rather than delete files under a live container.
        let kept = bench.dir.keep();
        println!("(temp dir kept: {})", kept.display());
        std::process::exit(1);
    }
}

/// Why the bench cannot run here, if it cannot.
fn can_run(images: &Path) -> Result<(), String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("not root (systemd-nspawn needs root)".into());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    if !std::env::split_paths(&path).any(|dir| dir.join("systemd-nspawn").is_file()) {
        return Err("systemd-nspawn is not installed (not on PATH)".into());
    }
    if !images.join(IMAGE).is_dir() {
        return Err(format!("no image {IMAGE:?} in {} (set BERTH_TEST_IMAGES)", images.display()));
    }
    Ok(())
}

/// The configuration, state directory and job ids shared by every job.
struct Bench {
    /// The workspace root (examples live there).
    root: PathBuf,
    /// Removed on drop, with the state and the jobs' temp dirs in it.
    dir: tempfile::TempDir,
    config: PathBuf,
    state: PathBuf,
    /// Variables of this process that would change berth's behaviour.
    scrub: Vec<OsString>,
    /// Job ids: distinct per bench process and per job.
    base_id: u64,
    next: AtomicU64,
}

/// Hook times of one full job.
struct FullJob {
    total: Duration,
    config: Duration,
    prepare: Duration,
    cleanup: Duration,
}

impl Bench {
    fn new(images: &Path) -> Self {
        let root =
            Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("runner-cli is inside the workspace").to_owned();
        let dir = tempfile::Builder::new().prefix("berth-bench-nspawn").tempdir().expect("failed to create a temp dir");
        let state = dir.path().join("state");
        let config = dir.path().join("config.toml");
        let toml_str = |path: &Path| serde_json::to_string(path.to_str().expect("path is UTF-8")).expect("encodes");
        let text = format!(
            "state_dir = {}\n[runners.{RUNNER}]\nbackend = \"nspawn\"\n[runners.{RUNNER}.settings]\n\
             images_dir = {}\ndefault_image = \"{IMAGE}\"\nmode = \"standalone\"\n",
            toml_str(&state),
            toml_str(images),
        );
        std::fs::write(&config, text).expect("failed to write the configuration");
        let scrub = std::env::vars_os()
            .map(|(key, _)| key)
            .filter(|key| key.to_str().is_some_and(|k| k.starts_with("BERTH_") || k.starts_with("CUSTOM_ENV_")))
            .collect();
        let base_id = 7_000_000_000_000 + u64::from(std::process::id()) * 100_000;
        Bench { root, dir, config, state, scrub, base_id, next: AtomicU64::new(0) }
    }

    /// `berth --config CONFIG --runner ns`.
    fn berth(&self) -> Command {
        let mut command = Command::new(BERTH);
        command.arg("--config").arg(&self.config).arg("--runner").arg(RUNNER);
        command
    }

    /// A new job: its own id and temp dir with the job payload.
    fn job(&self) -> Job<'_> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        assert!(n < 100_000, "too many jobs for the id scheme");
        let id = self.base_id + n;
        let tmp = self.dir.path().join(format!("job-{id}"));
        std::fs::create_dir_all(&tmp).expect("failed to create the job temp dir");
        let response = serde_json::json!({
            "id": id,
            "token": "t",
            "variables": [{"key": "CI_JOB_ID", "value": id.to_string(), "public": true, "file": false, "masked": false}],
            "job_info": {"name": "bench", "stage": "test", "project_full_path": "bench/project"},
        });
        let response_file = tmp.join("response.json");
        std::fs::write(&response_file, response.to_string()).expect("failed to write response.json");
        let path = |p: &Path| p.to_str().expect("temp path is UTF-8").to_owned();
        let env = vec![
            ("TMPDIR".to_owned(), path(&tmp)),
            ("JOB_RESPONSE_FILE".to_owned(), path(&response_file)),
            ("BUILD_EXIT_CODE_FILE".to_owned(), path(&tmp.join("build_exit_code"))),
            ("BUILD_FAILURE_EXIT_CODE".to_owned(), "1".to_owned()),
            ("SYSTEM_FAILURE_EXIT_CODE".to_owned(), "2".to_owned()),
            ("CUSTOM_ENV_CI_JOB_ID".to_owned(), id.to_string()),
            ("CUSTOM_ENV_CI_PROJECT_DIR".to_owned(), "/builds/bench/project".to_owned()),
        ];
        Job { bench: self, id, tmp, env, needs_cleanup: false }
    }

    /// config, prepare, the 8 stages, cleanup; scripts are written before the clock starts.
    fn full_job(&self) -> FullJob {
        let mut job = self.job();
        let scripts: Vec<PathBuf> = STAGES.iter().map(|stage| job.script(stage)).collect();
        let start = Instant::now();
        let config = job.config();
        let prepare = job.prepare();
        for (script, stage) in scripts.iter().zip(STAGES) {
            job.run(script, stage);
        }
        let cleanup = job.cleanup();
        FullJob { total: start.elapsed(), config, prepare, cleanup }
    }

    /// `count` build_script stages of a `true` script in one booted container: each one's time.
    fn run_stages(&self, count: usize) -> Vec<Duration> {
        let mut job = self.job();
        let script = job.script("build_script");
        job.config();
        job.prepare();
        let runs = (0..count).map(|_| job.run(&script, "build_script")).collect();
        job.cleanup();
        runs
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
                let job = self.job();
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
                "{} of {count} concurrent jobs failed:\n{}",
                failures.len(),
                failures.join("\n")
            );
            elapsed
        })
    }
}

/// One job's temp dir and environment; cleaned up on drop if it was prepared
/// and not cleaned up yet (a failed hook, a panic).
struct Job<'a> {
    bench: &'a Bench,
    id: u64,
    tmp: PathBuf,
    /// The runner's environment for every hook.
    env: Vec<(String, String)>,
    needs_cleanup: bool,
}

impl Job<'_> {
    /// A `true` stage script in the runner's format.
    fn script(&self, stage: &str) -> PathBuf {
        let path = self.tmp.join(format!("script-{stage}"));
        std::fs::write(&path, berth_backend_api::script::render("true\n")).expect("failed to write a stage script");
        path
    }

    /// A hook as the runner calls it; its wall time, or a panic with its stderr.
    fn hook(&self, args: &[&OsStr]) -> Duration {
        let mut command = self.bench.berth();
        command.args(args).envs(self.env.iter().map(|(k, v)| (k, v))).current_dir(&self.tmp);
        let label = format!("job {}: berth {}", self.id, args[0].to_string_lossy());
        let log = self.tmp.join(format!("{}.stderr", args[0].to_string_lossy()));
        timed(&mut command, &log, false, &label, &self.bench.scrub)
    }

    fn config(&mut self) -> Duration {
        self.hook(&["config".as_ref()])
    }

    fn prepare(&mut self) -> Duration {
        // A prepare that fails half way still needs its cleanup, as with the runner.
        self.needs_cleanup = true;
        self.hook(&["prepare".as_ref()])
    }

    fn run(&mut self, script: &Path, stage: &str) -> Duration {
        self.hook(&["run".as_ref(), script.as_os_str(), stage.as_ref()])
    }

    fn cleanup(&mut self) -> Duration {
        let elapsed = self.hook(&["cleanup".as_ref()]);
        self.needs_cleanup = false;
        elapsed
    }
}

impl Drop for Job<'_> {
    fn drop(&mut self) {
        if self.needs_cleanup {
            // Best effort on a failure path: the panic that got us here is the report.
            let mut command = self.bench.berth();
            command.arg("cleanup").envs(self.env.iter().map(|(k, v)| (k, v))).current_dir(&self.tmp);
            for key in &self.bench.scrub {
                command.env_remove(key);
            }
            let _ = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
    }
}

/// Wall time of `command` from spawn to exit; panics with its output unless it exits 0.
/// stderr, and stdout too if `keep_stdout`, go to the file `log`.
fn timed(command: &mut Command, log: &Path, keep_stdout: bool, label: &str, scrub: &[OsString]) -> Duration {
    for key in scrub {
        command.env_remove(key);
    }
    let file = File::create(log).expect("failed to create the log file");
    let stdout =
        if keep_stdout { file.try_clone().expect("failed to share the log file").into() } else { Stdio::null() };
    command.stdin(Stdio::null()).stdout(stdout).stderr(file);
    let start = Instant::now();
    let status = command.status().unwrap_or_else(|e| panic!("{label}: failed to start: {e}"));
    let elapsed = start.elapsed();
    if !status.success() {
        let output = std::fs::read_to_string(log).unwrap_or_default();
        panic!("{label}: {status}\n{output}");
    }
    elapsed
}

/// Processes whose command line has `--machine=berth-ns-...`: pid and command line.
fn nspawn_processes() -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut found: Vec<(u32, String)> = entries
        .filter_map(|entry| {
            let pid = entry.ok()?.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into())
                .collect();
            let is_nspawn = args.first().is_some_and(|a| a.ends_with("systemd-nspawn"));
            (is_nspawn && args.iter().any(|a| a.starts_with(MACHINE_ARG))).then(|| (pid, args.join(" ")))
        })
        .collect();
    found.sort();
    found
}

/// What the bench left behind: nspawn processes of containers in its state directory
/// (any `berth exec` job's too) and jobs in the state directory; and how many
/// `berth-ns-` containers of others (another state directory) were seen.
fn leftovers(state: &Path) -> (Vec<String>, usize) {
    let ours = format!("{}/", state.display());
    let (mine, others): (Vec<_>, Vec<_>) =
        nspawn_processes().into_iter().partition(|(_, cmdline)| cmdline.contains(&ours));
    let mut found: Vec<String> = mine.into_iter().map(|(pid, cmdline)| format!("process {pid}: {cmdline}")).collect();
    let jobs = state.join("jobs");
    match std::fs::read_dir(&jobs) {
        Ok(entries) => {
            let mut names: Vec<String> =
                entries.filter_map(|e| e.ok()).map(|e| format!("{}", jobs.join(e.file_name()).display())).collect();
            names.sort();
            found.extend(names);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => found.push(format!("{}: cannot list: {e}", jobs.display())),
    }
    (found, others.len())
}

/// What a figure is compared with.
struct Target {
    text: String,
    /// The median must be at most this (milliseconds), if set.
    limit_ms: Option<f64>,
}

impl Target {
    fn none() -> Self {
        Target { text: "-".into(), limit_ms: None }
    }

    fn info(text: &str) -> Self {
        Target { text: text.into(), limit_ms: None }
    }

    fn max(ms: f64) -> Self {
        Target { text: format!("≤ {ms} ms"), limit_ms: Some(ms) }
    }

    fn relative(text: &str, ms: f64) -> Self {
        Target { text: format!("{text} ({ms:.0} ms)"), limit_ms: Some(ms) }
    }
}

/// One line of the table.
struct Row {
    label: String,
    runs: usize,
    min: f64,
    median: f64,
    p95: f64,
    mean: f64,
    target: Target,
}

impl Row {
    fn new(label: &str, target: Target, mut samples: Vec<Duration>) -> Self {
        assert!(!samples.is_empty(), "{label}: no samples");
        samples.sort();
        let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        let n = ms.len();
        let median = if n % 2 == 1 { ms[n / 2] } else { (ms[n / 2 - 1] + ms[n / 2]) / 2.0 };
        // Nearest rank: the smallest sample with at least 95 % of samples at or below it.
        let p95 = ms[(n * 95).div_ceil(100) - 1];
        Row {
            label: label.to_owned(),
            runs: n,
            min: ms[0],
            median,
            p95,
            mean: ms.iter().sum::<f64>() / n as f64,
            target,
        }
    }
}

impl std::fmt::Display for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<40}{:>6}  {:>8.2} {:>8.2} {:>8.2} {:>8.2}   {}",
            self.label, self.runs, self.min, self.median, self.p95, self.mean, self.target.text
        )?;
        if let Some(limit) = self.target.limit_ms {
            write!(f, "  {}", if self.median <= limit { "ok" } else { "OVER" })?;
        }
        Ok(())
    }
}
