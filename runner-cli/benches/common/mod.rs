//! What berth's benchmarks share: summary statistics, the workspace root,
//! the environment a timed berth must not inherit, timing a command.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Min, median, p95 and mean of a set of timings, in milliseconds.
pub struct Stats {
    pub runs: usize,
    pub min: f64,
    pub median: f64,
    pub p95: f64,
    pub mean: f64,
}

impl Stats {
    /// The statistics of `samples` (panics, naming `label`, when there are none).
    pub fn of(label: &str, mut samples: Vec<Duration>) -> Stats {
        assert!(!samples.is_empty(), "{label}: no samples");
        samples.sort();
        let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        let n = ms.len();
        let median = if n % 2 == 1 { ms[n / 2] } else { (ms[n / 2 - 1] + ms[n / 2]) / 2.0 };
        // Nearest rank: the smallest sample with at least 95 % of samples at or below it.
        let p95 = ms[(n * 95).div_ceil(100) - 1];
        Stats { runs: n, min: ms[0], median, p95, mean: ms.iter().sum::<f64>() / n as f64 }
    }
}

/// Whether the bench was started by `cargo bench` (`--bench`; otherwise it is
/// a smoke run of `cargo test --benches`), and `BERTH_BENCH_ITERS` if set.
pub fn bench_mode_and_iters() -> (bool, Option<usize>) {
    let bench_mode = std::env::args().any(|arg| arg == "--bench");
    let iters = std::env::var("BERTH_BENCH_ITERS")
        .ok()
        .map(|v| v.parse::<usize>().ok().filter(|n| *n > 0).expect("BERTH_BENCH_ITERS must be a positive integer"));
    (bench_mode, iters)
}

/// The workspace root (fixtures and examples live there).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("runner-cli is inside the workspace").to_owned()
}

/// Variables of this process that would change berth's behaviour (`BERTH_*`, `CUSTOM_ENV_*`).
pub fn scrubbed_vars() -> Vec<OsString> {
    std::env::vars_os()
        .map(|(key, _)| key)
        .filter(|key| key.to_str().is_some_and(|k| k.starts_with("BERTH_") || k.starts_with("CUSTOM_ENV_")))
        .collect()
}

/// Wall time of `command` from spawn to exit, without the variables `scrub`
/// names; panics with its output unless it exits 0. stderr, and stdout too if
/// `keep_stdout`, go to the file `log`.
pub fn timed(command: &mut Command, log: &Path, keep_stdout: bool, label: &str, scrub: &[OsString]) -> Duration {
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
