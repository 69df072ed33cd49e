//! The table a backend's figures are printed in.

use std::time::Duration;

use crate::common::Stats;

/// What a figure is compared with.
#[derive(Debug, Clone)]
pub struct Target {
    text: String,
    /// The median (or the overhead, for a row with a floor) must be at most this (milliseconds), if set.
    limit_ms: Option<f64>,
}

impl Target {
    pub fn none() -> Self {
        Target { text: "-".into(), limit_ms: None }
    }

    pub fn info(text: &str) -> Self {
        Target { text: text.into(), limit_ms: None }
    }

    pub fn max(ms: f64) -> Self {
        Target { text: format!("≤ {ms} ms"), limit_ms: Some(ms) }
    }

    pub fn overhead(ms: f64) -> Self {
        Target { text: format!("≤ {ms} ms overhead"), limit_ms: Some(ms) }
    }

    pub fn relative(text: &str, ms: f64) -> Self {
        Target { text: format!("{text} ({ms:.0} ms)"), limit_ms: Some(ms) }
    }

    /// The same target, `note` in parentheses after it.
    pub fn with_note(mut self, note: &str) -> Self {
        self.text = format!("{} ({note})", self.text);
        self
    }
}

/// One line of a table.
#[derive(Debug)]
pub struct Row {
    pub label: String,
    runs: usize,
    min: f64,
    pub median: f64,
    p95: f64,
    mean: f64,
    /// The median minus the floor's median, for a row measured against a floor.
    overhead: Option<f64>,
    target: Target,
}

impl Row {
    pub fn new(label: &str, target: Target, samples: Vec<Duration>) -> Self {
        let Stats { runs, min, median, p95, mean } = Stats::of(label, samples);
        Row { label: label.to_owned(), runs, min, median, p95, mean, overhead: None, target }
    }

    /// The overhead over a floor's median (milliseconds); the target then applies to it.
    pub fn with_floor(mut self, floor_median: f64) -> Self {
        self.overhead = Some(self.median - floor_median);
        self
    }
}

impl std::fmt::Display for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let overhead = self.overhead.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.2}"));
        write!(
            f,
            "{:<50}{:>6}  {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9}   {}",
            self.label, self.runs, self.min, self.median, self.p95, self.mean, overhead, self.target.text
        )?;
        if let Some(limit) = self.target.limit_ms {
            let figure = self.overhead.unwrap_or(self.median);
            write!(f, "  {}", if figure <= limit { "ok" } else { "OVER" })?;
        }
        Ok(())
    }
}
