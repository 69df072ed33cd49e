//! Start-up cost of `berth` as gitlab-runner pays it.
//!
//! gitlab-runner starts a new `berth` process for every hook: `config`,
//! `prepare`, one `run` per stage (a dozen for a typical job: prepare_script,
//! get_sources, restore_cache, download_artifacts, build_script, ...) and
//! `cleanup`. Whatever berth does before it reaches the backend (loading the
//! binary, parsing arguments and the configuration, reading the job response,
//! collecting the `CUSTOM_ENV_*` variables) is paid a dozen times per job, so
//! it has to stay small. This bench times whole processes, spawn to exit, with
//! the `dry-run` backend (which executes nothing), so the figures are berth's
//! own overhead:
//!
//! - `/bin/true`: the floor, what spawning any process costs on this machine;
//! - `berth --version`: the binary's bare start-up (target: well under 5 ms);
//! - `berth config`, `prepare`, `run SCRIPT build_script`, `cleanup`: one hook
//!   each, with the realistic fixtures of `testdata/fixtures` (a job response
//!   with ~50 variables, the matching `CUSTOM_ENV_*` environment, the runner's
//!   build script) (target: well under 5 ms each);
//! - `berth exec`: a whole dry-run job of `examples/hello` through the full
//!   protocol, every hook included (target: under 100 ms).
//!
//! It prints min / median / p95 / mean per command and whether the median
//! meets its target; it asserts nothing about time (figures depend on the
//! machine). It does check that every command succeeds, so a broken hook
//! cannot pass for a fast one.
//!
//! Run with `cargo bench -p berth --bench hooks` (the bench profile builds an
//! optimized `berth`). `BERTH_BENCH_ITERS=N` sets the number of timed runs per
//! command. Without `--bench` (`cargo test --benches`) every command runs once,
//! as a smoke test.

mod common;

use common::Stats;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The berth binary cargo built for this bench (same profile as the bench).
const BERTH: &str = env!("CARGO_BIN_EXE_berth");
/// Timed runs per hook and per `berth exec`, unless `BERTH_BENCH_ITERS` is set.
const HOOK_ITERS: usize = 200;
const EXEC_ITERS: usize = 30;
/// Untimed runs first (page cache, dynamic loader, the state directory).
const HOOK_WARMUP: usize = 10;
const EXEC_WARMUP: usize = 3;
/// The runner name in the generated configuration.
const RUNNER: &str = "demo";

fn main() {
    let (bench_mode, iters_override) = common::bench_mode_and_iters();
    let (hook_iters, exec_iters, hook_warmup, exec_warmup) = match (bench_mode, iters_override) {
        (false, _) => (1, 1, 0, 0),
        (true, Some(n)) => (n, n, HOOK_WARMUP, EXEC_WARMUP),
        (true, None) => (HOOK_ITERS, EXEC_ITERS, HOOK_WARMUP, EXEC_WARMUP),
    };

    let fixture = Fixture::new();
    let mut rows = Vec::new();

    let floor = if Path::new("/bin/true").exists() { "/bin/true" } else { "true" };
    rows.push(Row::new(
        "/bin/true (spawn floor)",
        None,
        measure(hook_warmup, hook_iters, || fixture.time(&mut Command::new(floor), "/bin/true")),
    ));
    rows.push(Row::new(
        "berth --version",
        Some(5.0),
        measure(hook_warmup, hook_iters, || fixture.time(Command::new(BERTH).arg("--version"), "berth --version")),
    ));

    // The hooks in the order the runner calls them, so that every prepare
    // gets a clean state directory and every run and cleanup a prepared job.
    let script = fixture.root.join("testdata/fixtures/script-build_script.sh");
    let script_arg = script.to_str().expect("fixture path is UTF-8");
    let hooks: [(&str, &[&str]); 4] = [
        ("berth config", &["config"]),
        ("berth prepare", &["prepare"]),
        ("berth run <script> build_script", &["run", script_arg, "build_script"]),
        ("berth cleanup", &["cleanup"]),
    ];
    let mut hook_samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(hook_iters); hooks.len()];
    for i in 0..hook_warmup + hook_iters {
        for ((label, args), samples) in hooks.iter().zip(&mut hook_samples) {
            let elapsed = fixture.time(&mut fixture.hook(args), label);
            if i >= hook_warmup {
                samples.push(elapsed);
            }
        }
    }
    for ((label, _), samples) in hooks.iter().zip(hook_samples) {
        rows.push(Row::new(label, Some(5.0), samples));
    }

    // What loading a backend as a plugin adds to a hook: the same backend
    // (the host-test fixture) built in and as a shared library.
    let plugin = Path::new(BERTH).with_file_name("libberth_backend_host_test.so");
    let plugin_note = if plugin.exists() {
        let config = fixture.dir.path().join("plugin.toml");
        let state =
            serde_json::to_string(fixture.dir.path().join("plugin-state").to_str().expect("UTF-8")).expect("encodes");
        let lib = serde_json::to_string(plugin.to_str().expect("UTF-8")).expect("encodes");
        std::fs::write(
            &config,
            format!(
                "state_dir = {state}\n[runners.builtin]\nbackend = \"host-test\"\n[runners.plugin]\nplugin = {lib}\n"
            ),
        )
        .expect("failed to write the plugin configuration");
        let mut medians = Vec::new();
        for runner in ["builtin", "plugin"] {
            let samples = measure(hook_warmup, hook_iters, || {
                let mut command = Command::new(BERTH);
                command.args(["--config", config.to_str().expect("UTF-8"), "--runner", runner, "config"]);
                command.envs(fixture.hook_env.iter().map(|(k, v)| (k, v))).env("BERTH_ALLOW_TEST_BACKENDS", "1");
                fixture.time(&mut command, runner)
            });
            let row = Row::new(&format!("berth config (host-test, {runner})"), Some(5.0), samples);
            medians.push(row.median);
            rows.push(row);
        }
        format!(
            "loading the backend as a plugin adds {:.2} ms to a hook (medians; target <= 1 ms) {}",
            medians[1] - medians[0],
            if medians[1] - medians[0] <= 1.0 { "ok" } else { "OVER" }
        )
    } else {
        format!("plugin load not measured: {} is not built (cargo build --release --workspace)", plugin.display())
    };

    let pipeline = fixture.root.join("examples/hello/.gitlab-ci.yml");
    let sources = fixture.root.join("examples/hello");
    rows.push(Row::new(
        "berth exec (whole dry-run job)",
        Some(100.0),
        measure(exec_warmup, exec_iters, || {
            let mut exec = fixture.berth();
            exec.arg("exec").arg("--file").arg(&pipeline).arg("--sources").arg(&sources).arg("test");
            fixture.time(&mut exec, "berth exec")
        }),
    ));

    let profile = if cfg!(debug_assertions) { "debug build: figures are not representative" } else { "release build" };
    println!();
    println!("berth hook benchmarks ({profile}; {hook_iters} runs per hook, {exec_iters} per exec)");
    println!("{:<34}{:>6}  {:>7} {:>7} {:>7} {:>7}   target", "command", "runs", "min", "median", "p95", "mean");
    for row in &rows {
        println!("{row}");
    }
    println!("{plugin_note}");
    println!("(milliseconds, wall time from spawn to exit; target applies to the median)");
    if !bench_mode {
        println!("(smoke run: one run each; use `cargo bench` for figures)");
    }
}

/// The files a hook needs, in a temporary directory that plays the runner's
/// per-job temp dir, plus berth's configuration and state directory.
struct Fixture {
    /// The workspace root (fixtures and examples live there).
    root: PathBuf,
    /// Removed on drop, with the state and transcripts in it.
    dir: tempfile::TempDir,
    config: PathBuf,
    /// The runner's environment for a hook: `TMPDIR`, `JOB_RESPONSE_FILE`, ... and `CUSTOM_ENV_*`.
    hook_env: Vec<(String, String)>,
    /// Variables of this process that would change berth's behaviour.
    scrub: Vec<OsString>,
    /// Where the command under test writes stderr, shown if it fails.
    stderr: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let root = common::workspace_root();
        let dir = tempfile::Builder::new().prefix("berth-bench").tempdir().expect("failed to create a temp dir");
        let state = dir.path().join("state");
        let job_tmp = dir.path().join("custom-executor");
        std::fs::create_dir_all(&job_tmp).expect("failed to create the job temp dir");

        let config = dir.path().join("config.toml");
        let toml_path = serde_json::to_string(state.to_str().expect("temp path is UTF-8")).expect("a string encodes");
        std::fs::write(&config, format!("state_dir = {toml_path}\n[runners.{RUNNER}]\nbackend = \"dry-run\"\n"))
            .expect("failed to write the configuration");

        let fixtures = root.join("testdata/fixtures");
        let response = job_tmp.join("response.json");
        std::fs::copy(fixtures.join("job-response.json"), &response).expect("failed to copy job-response.json");

        // `KEY="json-quoted value"` per line; the runner's paths point into our temp dir instead.
        let env_file = fixtures.join("hook-environment.env");
        let text = std::fs::read_to_string(&env_file).expect("failed to read hook-environment.env");
        let job_tmp_str = job_tmp.to_str().expect("temp path is UTF-8");
        let hook_env = text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                let (key, quoted) =
                    line.split_once('=').unwrap_or_else(|| panic!("{}: not KEY=VALUE: {line}", env_file.display()));
                let value = match key {
                    "TMPDIR" => job_tmp_str.to_owned(),
                    "JOB_RESPONSE_FILE" => response.to_str().expect("temp path is UTF-8").to_owned(),
                    "BUILD_EXIT_CODE_FILE" => format!("{job_tmp_str}/build_exit_code"),
                    _ => serde_json::from_str(quoted)
                        .unwrap_or_else(|e| panic!("{}: {key}: value is not a JSON string: {e}", env_file.display())),
                };
                (key.to_owned(), value)
            })
            .collect();

        let scrub = common::scrubbed_vars();
        let stderr = dir.path().join("stderr.log");
        Fixture { root, dir, config, hook_env, scrub, stderr }
    }

    /// `berth --config CONFIG --runner demo`, with `TMPDIR` in the temp dir.
    fn berth(&self) -> Command {
        let mut command = Command::new(BERTH);
        command.arg("--config").arg(&self.config).arg("--runner").arg(RUNNER).env("TMPDIR", self.dir.path());
        command
    }

    /// A hook as the runner calls it: its environment, working directory the job's temp dir.
    fn hook(&self, args: &[&str]) -> Command {
        let mut command = self.berth();
        command.args(args).envs(self.hook_env.iter().map(|(k, v)| (k, v)));
        let tmpdir =
            self.hook_env.iter().find(|(k, _)| k == "TMPDIR").map(|(_, v)| v).expect("the fixture sets TMPDIR");
        command.current_dir(tmpdir);
        command
    }

    /// Wall time of `command` from spawn to exit; panics with its stderr unless it exits 0.
    fn time(&self, command: &mut Command, label: &str) -> Duration {
        common::timed(command, &self.stderr, false, label, &self.scrub)
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
    target_ms: Option<f64>,
}

impl Row {
    fn new(label: &str, target_ms: Option<f64>, samples: Vec<Duration>) -> Self {
        let Stats { runs, min, median, p95, mean } = Stats::of(label, samples);
        Row { label: label.to_owned(), runs, min, median, p95, mean, target_ms }
    }
}

impl std::fmt::Display for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<34}{:>6}  {:>7.2} {:>7.2} {:>7.2} {:>7.2}   ",
            self.label, self.runs, self.min, self.median, self.p95, self.mean
        )?;
        match self.target_ms {
            Some(target) => {
                let verdict = if self.median < target { "ok" } else { "OVER" };
                write!(f, "{:<10}{verdict}", format!("< {target} ms"))
            }
            None => write!(f, "-"),
        }
    }
}

/// Runs `once` `warmup` times untimed, then `iters` times timed.
pub fn measure(warmup: usize, iters: usize, mut once: impl FnMut() -> Duration) -> Vec<Duration> {
    for _ in 0..warmup {
        once();
    }
    (0..iters).map(|_| once()).collect()
}
