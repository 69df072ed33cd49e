//! `berth ps`: the jobs this host runs now, the warm containers of nspawn
//! runners, and what ended jobs left for `berth reap`.
//!
//! Everything is read from berth's own state files without taking a job's
//! lock (a hook holds it while it runs): each job's record, the step a hook
//! started last and what its backend said of its environment
//! ([`StateDir::peek_all`]), whether a hook holds its lock now (from
//! `/proc/locks`), and the memory its cgroup holds.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use berth_backend_api::{JobPeek, StateDir};
use berth_backend_support::cgroup::memory;
use serde::Serialize;

use crate::cli::{Cli, PsArgs};
use crate::config::{self, BackendChoice, Runner};
use crate::error::Error;
use crate::exit::Done;

/// What a row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum State {
    /// prepare holds the job.
    Preparing,
    /// A stage runs.
    Running,
    /// cleanup (or the background part of it) holds the job.
    Cleaning,
    /// Between two hooks: the runner still has the job.
    Idle,
    /// The job has state and no hook runs, but whether the runner still has
    /// it is unknown (this host does not list locks).
    Active,
    /// The job ended without its cleanup: `berth reap` removes it. Also a
    /// warm container whose init is gone.
    Leftover,
    /// A warm container, ready for a job.
    Warm,
    /// A warm container being booted.
    Booting,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Preparing => "preparing",
            State::Running => "running",
            State::Cleaning => "cleaning",
            State::Idle => "idle",
            State::Active => "active",
            State::Leftover => "leftover",
            State::Warm => "warm",
            State::Booting => "booting",
        }
    }
}

/// One line of the table, one object of `--json`.
#[derive(Debug, Clone, Serialize)]
struct Row {
    runner: String,
    /// The job's id; none for a warm container.
    job: Option<u64>,
    state: State,
    /// Why a leftover is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    image: Option<String>,
    generation: Option<u64>,
    /// The container's machine name.
    machine: Option<String>,
    /// The job's root on the host, for a backend without a container.
    root: Option<PathBuf>,
    /// When the job's prepare started (a warm container: when its record
    /// was last written), in seconds since the Unix epoch.
    started_unix: Option<u64>,
    age_secs: Option<u64>,
    /// The step a hook started last (`prepare`, a stage, `cleanup`).
    stage: Option<String>,
    /// Whether that step runs now.
    stage_running: bool,
    stage_started_unix: Option<u64>,
    memory_bytes: Option<u64>,
}

/// What `--json` prints.
#[derive(Serialize)]
struct Listing<'a> {
    jobs: &'a [Row],
}

/// `berth ps`.
pub fn main(cli: &Cli, args: &PsArgs) -> Result<Done, Error> {
    let runners: Vec<Runner> =
        config::load_all(&cli.config, cli.runner.as_deref())?.into_iter().collect::<Result<_, _>>()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (rows, notes) = collect(&runners, now)?;
    let text = if args.json {
        let mut text =
            serde_json::to_string_pretty(&Listing { jobs: &rows }).context("failed to encode the listing")?;
        text.push('\n');
        text
    } else {
        render(&rows, &runners, &reap_command(cli), now)
    };
    // `berth ps | head -1`: a closed pipe ends the listing, quietly.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(anyhow::Error::new(e).context("failed to write the listing").into())
        }
        _ => {}
    }
    for note in notes {
        eprintln!("warning: {note}");
    }
    Ok(Done::Success)
}

/// The rows of `runners`' jobs and warm containers, and notes on what could
/// not be read.
fn collect(runners: &[Runner], now: u64) -> Result<(Vec<Row>, Vec<String>), Error> {
    // Runners may share a state directory: each is read once.
    let mut peeks: BTreeMap<&Path, Vec<JobPeek>> = BTreeMap::new();
    for runner in runners {
        if !peeks.contains_key(runner.state_dir.as_path()) {
            peeks.insert(&runner.state_dir, StateDir::new(&runner.state_dir).peek_all()?);
        }
    }
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for runner in runners {
        let mut jobs: Vec<&JobPeek> =
            peeks[runner.state_dir.as_path()].iter().filter(|p| p.key.runner() == runner.name).collect();
        jobs.sort_by_key(|p| p.key.id());
        for peek in jobs {
            for what in &peek.unreadable {
                notes.push(format!("job {}: {what}", peek.key));
            }
            rows.push(job_row(runner, peek, now));
        }
        if runner.backend == BackendChoice::BuiltIn("nspawn".into()) {
            for warm in berth_backend_nspawn::warm_containers(&runner.state_dir, &runner.name) {
                rows.push(warm_row(runner, &warm, now));
            }
        }
    }
    Ok((rows, notes))
}

fn job_row(runner: &Runner, peek: &JobPeek, now: u64) -> Row {
    let stage = peek.stage.as_ref();
    let (state, reason) = match (peek.locked, &peek.record) {
        (Some(true), _) => match stage.map(|s| s.name.as_str()) {
            Some("prepare") | None => (State::Preparing, None),
            Some("cleanup") => (State::Cleaning, None),
            Some(_) => (State::Running, None),
        },
        (_, None) => (State::Leftover, Some("no record: its prepare never got far or was killed".to_owned())),
        // reap's own rule, without its grace: what it removes once the grace passed.
        (locked, Some(record)) => match crate::hooks::gone(record, now, Duration::ZERO) {
            Some(reason) => (State::Leftover, Some(reason)),
            None if locked.is_some() => (State::Idle, None),
            None => (State::Active, None),
        },
    };
    let status = peek.status.clone().unwrap_or_default();
    let started = peek.record.as_ref().map(|r| r.created_unix);
    Row {
        runner: runner.name.clone(),
        job: Some(peek.key.id()),
        state,
        reason,
        image: status.image,
        generation: status.generation,
        machine: status.machine,
        root: status.root,
        started_unix: started,
        age_secs: started.map(|s| now.saturating_sub(s)),
        stage: stage.map(|s| s.name.clone()),
        stage_running: peek.locked == Some(true),
        stage_started_unix: stage.map(|s| s.started_unix),
        memory_bytes: status.cgroup.as_deref().and_then(memory::usage),
    }
}

fn warm_row(runner: &Runner, warm: &berth_backend_nspawn::WarmContainer, now: u64) -> Row {
    let (state, reason) = match (warm.ready, warm.running) {
        (true, true) => (State::Warm, None),
        (true, false) => (State::Leftover, Some("a warm container whose init is gone".to_owned())),
        (false, _) => (State::Booting, None),
    };
    let status = &warm.status;
    Row {
        runner: runner.name.clone(),
        job: None,
        state,
        reason,
        image: status.image.clone(),
        generation: status.generation,
        machine: status.machine.clone(),
        root: None,
        started_unix: warm.since_unix,
        age_secs: warm.since_unix.map(|s| now.saturating_sub(s)),
        stage: None,
        stage_running: false,
        stage_started_unix: None,
        memory_bytes: status.cgroup.as_deref().and_then(memory::usage),
    }
}

/// How this invocation's configuration is named on a `berth ... reap` line.
fn reap_command(cli: &Cli) -> String {
    if cli.config == Path::new(config::DEFAULT_CONFIG) {
        "berth".to_owned()
    } else {
        format!("berth --config {}", shell_quote(&cli.config.display().to_string()))
    }
}

fn shell_quote(text: &str) -> String {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+:=@".contains(&b)) {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// The table, with a line on leftovers (or one saying there are no jobs).
fn render(rows: &[Row], runners: &[Runner], berth: &str, now: u64) -> String {
    if rows.is_empty() {
        let names: Vec<&str> = runners.iter().map(|r| r.name.as_str()).collect();
        let label = if names.len() == 1 { "runner" } else { "runners" };
        return format!("no jobs ({label} {})\n", names.join(", "));
    }
    let header = ["RUNNER", "JOB", "STATE", "IMAGE", "GEN", "ENVIRONMENT", "AGE", "STAGE", "MEMORY"];
    let cells: Vec<[String; 9]> = rows.iter().map(|row| cells(row, now)).collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header = header.map(str::to_owned);
    for line in std::iter::once(&header).chain(&cells) {
        let padded: Vec<String> = line.iter().zip(widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    }
    let mut leftovers: BTreeMap<&str, usize> = BTreeMap::new();
    for row in rows.iter().filter(|r| r.state == State::Leftover) {
        *leftovers.entry(&row.runner).or_default() += 1;
    }
    if !leftovers.is_empty() {
        let count: usize = leftovers.values().sum();
        let commands: Vec<String> = leftovers.keys().map(|r| format!("`{berth} --runner {r} reap`")).collect();
        let what = if count == 1 {
            "1 leftover (a job or warm container that ended without its cleanup)".to_owned()
        } else {
            format!("{count} leftovers (jobs or warm containers that ended without their cleanup)")
        };
        out.push_str(&format!(
            "\n{what}: {} removes them once they are older than its --grace (default 10m).\n",
            commands.join(", ")
        ));
    }
    out
}

fn cells(row: &Row, now: u64) -> [String; 9] {
    let dash = || "-".to_owned();
    let environment =
        row.machine.clone().or_else(|| row.root.as_ref().map(|r| r.display().to_string())).unwrap_or_else(dash);
    let stage = row.stage.as_ref().map_or_else(dash, |name| match (row.stage_running, row.stage_started_unix) {
        (true, Some(started)) => format!("{name} ({})", age(now.saturating_sub(started))),
        (true, None) => name.clone(),
        (false, _) => format!("{name} (ended)"),
    });
    [
        row.runner.clone(),
        row.job.map_or_else(dash, |id| id.to_string()),
        row.state.as_str().to_owned(),
        row.image.clone().unwrap_or_else(dash),
        row.generation.map_or_else(dash, |g| g.to_string()),
        environment,
        row.age_secs.map_or_else(dash, age),
        stage,
        row.memory_bytes.map_or_else(dash, bytes),
    ]
    .map(|cell| printable(&cell))
}

/// A cell as a terminal shows it harmlessly: control characters escaped, no
/// empty cell (it would shift the columns after it).
fn printable(cell: &str) -> String {
    let text: String = cell
        .chars()
        .flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] })
        .collect();
    if text.is_empty() {
        "-".to_owned()
    } else {
        text
    }
}

/// A duration in seconds, the way `ps` and `docker ps` show one: its two
/// largest units (`42s`, `3m12s`, `2h05m`, `3d04h`).
fn age(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h:02}h"),
    }
}

/// A number of bytes in binary units (`512 B`, `8.0 KiB`, `142 MiB`, `1.4 GiB`):
/// one decimal below 10 of a unit, none above.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value < 9.95 {
        format!("{value:.1} {}", UNITS[unit])
    } else if value.round() >= 1024.0 && unit < UNITS.len() - 1 {
        format!("1.0 {}", UNITS[unit + 1])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_backend_api::{JobRecord, JobState, JobStatus};

    #[test]
    fn ages_show_their_two_largest_units() {
        assert_eq!(age(0), "0s");
        assert_eq!(age(59), "59s");
        assert_eq!(age(60), "1m00s");
        assert_eq!(age(192), "3m12s");
        assert_eq!(age(3599), "59m59s");
        assert_eq!(age(3600 + 5 * 60 + 59), "1h05m");
        assert_eq!(age(86_399), "23h59m");
        assert_eq!(age(3 * 86_400 + 4 * 3600 + 59), "3d04h");
    }

    #[test]
    fn memory_is_shown_in_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.0 KiB");
        assert_eq!(bytes(8 * 1024 + 512), "8.5 KiB");
        assert_eq!(bytes(148_897_792), "142 MiB");
        assert_eq!(bytes(1_503_238_553), "1.4 GiB");
        assert_eq!(bytes(10 * 1024 * 1024 - 1), "10 MiB");
        assert_eq!(bytes(1024 * 1024 - 1), "1.0 MiB", "never 1024 KiB");
        assert_eq!(bytes(u64::MAX), "16 EiB");
    }

    #[test]
    fn control_characters_in_a_cell_are_escaped() {
        assert_eq!(printable("build\x1b[31mred\n"), "build\\u{1b}[31mred\\n");
        assert_eq!(printable(""), "-");
    }

    fn runner(state_dir: &Path) -> Runner {
        let text =
            format!("state_dir = {:?}\n[runners.demo]\nbackend = \"dry-run\"\n", state_dir.display().to_string());
        crate::config::parse(&text, Path::new("test.toml"), None).unwrap()
    }

    /// A scratch dir, runner `demo` with its state there, its state dir, and now.
    fn setup() -> (tempfile::TempDir, Runner, StateDir, u64) {
        let dir = tempfile::tempdir().unwrap();
        let runner = runner(&dir.path().join("state"));
        let states = StateDir::new(&runner.state_dir);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        (dir, runner, states, now)
    }

    fn job(states: &StateDir, id: u64, tmpdir: &Path, created_ago: u64, now: u64) -> JobState {
        let key = berth_backend_api::JobKey::new("demo", id).unwrap();
        let mut record = JobRecord::new(key, "fake").runner_tmpdir(Some(tmpdir.to_owned()));
        record.created_unix = now - created_ago;
        states.create(record).unwrap()
    }

    #[test]
    fn a_job_is_running_idle_or_a_leftover_by_its_lock_and_its_runners_directory() {
        let (dir, runner, states, now) = setup();
        let running = job(&states, 10, dir.path(), 192, now);
        running.set_stage("build_script").unwrap();
        running.set_status(&JobStatus::new().image("bookworm", Some(2)).root("/x/root")).unwrap();
        drop(job(&states, 9, dir.path(), 30, now).set_stage("step_script"));
        drop(job(&states, 11, &dir.path().join("removed-by-the-runner"), 5, now));
        std::fs::write(runner.state_dir.join("jobs/demo-12.lock"), "").unwrap();
        let (rows, notes) = collect(std::slice::from_ref(&runner), now).unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        let summary: Vec<(Option<u64>, State)> = rows.iter().map(|r| (r.job, r.state)).collect();
        assert_eq!(
            summary,
            [
                (Some(9), State::Idle),
                (Some(10), State::Running),
                (Some(11), State::Leftover),
                (Some(12), State::Leftover)
            ],
            "by job id, 9 before 10"
        );
        assert!(rows[2].reason.as_deref().unwrap().contains("removed its job directory"), "{:?}", rows[2]);
        let table = render(&rows, std::slice::from_ref(&runner), "berth", now);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["RUNNER", "JOB", "STATE", "IMAGE", "GEN", "ENVIRONMENT", "AGE", "STAGE", "MEMORY"]
        );
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["demo", "10", "running", "bookworm", "2", "/x/root", "3m12s", "build_script", "(0s)", "-"],
            "{table}"
        );
        assert!(lines[1].contains("step_script (ended)"), "{table}");
        assert!(table.contains("2 leftovers") && table.contains("`berth --runner demo reap` removes them"), "{table}");
        drop(running);
        let (rows, _) = collect(std::slice::from_ref(&runner), now).unwrap();
        assert_eq!(rows[1].state, State::Idle, "its stage ended: the lock is free");
    }

    #[test]
    fn an_empty_host_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let runner = runner(&dir.path().join("state"));
        let (rows, _) = collect(std::slice::from_ref(&runner), 0).unwrap();
        assert!(rows.is_empty());
        assert_eq!(render(&rows, &[runner], "berth", 0), "no jobs (runner demo)\n");
    }

    #[test]
    fn an_unreadable_file_is_a_note_and_the_job_is_still_listed() {
        let (dir, runner, states, now) = setup();
        let state = job(&states, 3, dir.path(), 1, now);
        std::fs::write(state.dir().join("status.json"), "{\"image\": ").unwrap();
        drop(state);
        let (rows, notes) = collect(&[runner], now).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].image, None);
        assert!(notes[0].starts_with("job demo-3: status.json: not what berth writes"), "{notes:?}");
    }
}
