//! Summary statistics shared by berth's benchmarks.

use std::time::Duration;

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
