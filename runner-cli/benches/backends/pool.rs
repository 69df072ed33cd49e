//! The nspawn backend's pool of warm containers (`pool_size` in the runner's
//! settings): whether this berth has one, waiting until it is full, the memory
//! of an idle warm container, emptying it. Pool containers are machines named
//! `berth-<runner>-pool<n>`; in standalone mode their cgroup is
//! `<cgroup2 root>/berth/berth-<runner>-pool<n>`, in systemd mode the unit
//! `berth-<runner>-pool<n>.service` in machine.slice. They are found from
//! /proc (each process's cgroup2 path), so both modes are one code path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::bench::{Bench, STAGES};
use crate::common::Stats;
use crate::host::leftovers;
use crate::table::{Row, Target};
use crate::{Kind, Plan, CONCURRENT};

/// How long an idle pool is left to settle before its memory is read.
pub const SETTLE: Duration = Duration::from_secs(3);

/// Whether the runner's configuration with `pool_size` is accepted: `Err`
/// with berth's words when it refuses the field (a berth without a pool);
/// panics when `describe` fails for another reason.
pub fn supported(bench: &Bench) -> Result<(), String> {
    let out = bench.command().arg("describe").output().expect("failed to run berth describe");
    if out.status.success() {
        return Ok(());
    }
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    match text.lines().find(|line| line.contains("unknown field")) {
        // `... line 8: key `runners.ns.settings.pool_size`: unknown field `pool_size`, expected one of ...`
        Some(line) => {
            let from = line.find("key `").or_else(|| line.find("unknown field")).unwrap_or(0);
            Err(line[from..].split(", expected").next().unwrap_or(line).trim().to_owned())
        }
        None => panic!("{}: berth describe failed: {}\n{text}", bench.label, out.status),
    }
}

/// A pool container found from /proc.
#[derive(Debug, Default)]
struct Warm {
    /// Its cgroup, relative to the cgroup2 root this process sees.
    cgroup: String,
    /// Every process in it.
    pids: Vec<i32>,
    /// Its init (PID 1 of its PID namespace, systemd).
    init: Option<i32>,
}

/// The pool containers of `runner` running now, by machine name.
fn containers(runner: &str) -> BTreeMap<String, Warm> {
    let prefix = format!("berth-{runner}-pool");
    let is_pool = |component: &str| {
        component
            .strip_prefix(&prefix)
            .map(|rest| rest.strip_suffix(".service").unwrap_or(rest))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let mut found: BTreeMap<String, Warm> = BTreeMap::new();
    for process in berth_backend_support::proc::processes() {
        let pid = process.pid;
        let Ok(cgroups) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else { continue };
        let Some(path) = cgroups.lines().find_map(|line| line.strip_prefix("0::")) else { continue };
        let components: Vec<&str> = path.split('/').collect();
        let Some(at) = components.iter().position(|c| is_pool(c)) else { continue };
        let name = components[at].trim_end_matches(".service").to_owned();
        let warm = found.entry(name).or_default();
        warm.cgroup = components[..=at].join("/");
        warm.pids.push(pid);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:")).unwrap_or_default();
        let ids: Vec<&str> = nspid.split_whitespace().collect();
        if ids.len() > 1 && ids.last() == Some(&"1") {
            warm.init = Some(pid);
        }
    }
    found
}

/// Whether a container's systemd says it is up (`running`, or `degraded`).
fn booted(init: i32) -> bool {
    Command::new("nsenter")
        .args(["-t", &init.to_string(), "-a", "systemctl", "is-system-running"])
        .output()
        .is_ok_and(|out| matches!(String::from_utf8_lossy(&out.stdout).trim(), "running" | "degraded"))
}

/// Waits until `size` pool containers of `runner` are booted: how long it
/// took, or after `deadline` how many were.
pub fn wait_full(runner: &str, size: usize, deadline: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let ready = containers(runner).values().filter_map(|warm| warm.init).filter(|init| booted(*init)).count();
        if ready >= size {
            return Ok(start.elapsed());
        }
        if start.elapsed() > deadline {
            return Err(format!("{ready} of {size} pool containers booted after {} s", deadline.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The cgroup2 hierarchy's mount point as this process sees it.
fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let point = before.split_whitespace().nth(4)?;
        (after.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(point))
    })
}

/// Proportional set size of a process, from smaps_rollup (bytes).
fn pss(pid: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let kib = text.lines().find_map(|l| l.strip_prefix("Pss:")).and_then(|v| v.split_whitespace().next()?.parse().ok());
    kib.unwrap_or(0u64) * 1024
}

/// Memory of an idle warm container of `runner` (MiB, the mean over the pool),
/// how it was measured, and over how many containers; `None` without any.
pub fn memory_per_container(runner: &str) -> Option<(f64, &'static str, usize)> {
    let pool = containers(runner);
    if pool.is_empty() {
        return None;
    }
    let root = cgroup2_root();
    let current = |warm: &Warm| -> Option<u64> {
        let file = root.as_ref()?.join(warm.cgroup.trim_start_matches('/')).join("memory.current");
        std::fs::read_to_string(file).ok()?.trim().parse().ok()
    };
    let (bytes, how): (Vec<u64>, &str) = match pool.values().map(current).collect::<Option<Vec<u64>>>() {
        Some(bytes) => (bytes, "memory.current of its cgroup"),
        None => (
            pool.values().map(|warm| warm.pids.iter().map(|pid| pss(*pid)).sum()).collect(),
            "sum of the Pss of its processes (smaps_rollup; no memory controller in its cgroup2 hierarchy)",
        ),
    };
    let mean = bytes.iter().sum::<u64>() as f64 / bytes.len() as f64 / (1024.0 * 1024.0);
    Some((mean, how, bytes.len()))
}

/// Empties the pool as an admin would: `pool_size = 0` in the bench's
/// configuration, then one `berth reap` (which stops a filler still booting a
/// warm container and removes every slot); the leftovers check says what is
/// still there.
pub fn drain(bench: &Bench) {
    let config = bench.dir.path().join("config.toml");
    let text = std::fs::read_to_string(&config).expect("failed to read the bench's configuration");
    let emptied: Vec<&str> =
        text.lines().map(|l| if l.starts_with("pool_size") { "pool_size = 0" } else { l }).collect();
    std::fs::write(&config, emptied.join("\n") + "\n").expect("failed to write the bench's configuration");
    let out = bench.command().args(["reap", "--grace", "0"]).output().expect("failed to run berth reap");
    if !out.status.success() {
        panic!("{}: berth reap failed: {}\n{}", bench.label, out.status, String::from_utf8_lossy(&out.stderr));
    }
}

/// How long a pool gets to fill before a timed job goes on without it.
const FILL_DEADLINE: Duration = Duration::from_secs(120);

/// A part's figures with a pool, or berth's refusal of `pool_size`.
pub enum PoolFigures {
    Refused(String),
    Taken { rows: Vec<Row>, notes: Vec<String>, leftovers: Vec<String> },
}

/// Waits until the pool of `runner` has `size` booted containers; a pool
/// that does not fill in time is noted in `misses` (the job goes on).
fn fill(runner: &str, size: usize, misses: &mut Vec<String>) {
    if let Err(miss) = wait_full(runner, size, FILL_DEADLINE) {
        misses.push(format!("pool_size = {size}: {miss}; the job went on without waiting"));
    }
}

/// The figures of `kind` with `pool_size = 2` (trivial jobs, each started
/// once the pool is full; the memory of an idle warm container) and
/// `pool_size = 8` (8 jobs at once); `floor` and `seed` are the medians of the
/// floor and of the seed's trivial job without a pool.
pub fn figures(kind: Kind, binary: &Path, images: &Path, plan: Plan, floor: f64, seed: Option<f64>) -> PoolFigures {
    let runner = kind.runner();
    let pool = |size: usize| {
        let settings = format!("{}pool_size = {size}\n", kind.settings());
        Bench::berth(&format!("{}-pool{size}", kind.name()), binary, images, "nspawn", runner, &settings)
    };
    let two = pool(2);
    if let Err(refusal) = supported(&two) {
        return PoolFigures::Refused(refusal);
    }
    let targets = kind.targets();
    let mut misses = Vec::new();
    // The pool fills from the first job on (untimed); then its memory, idle.
    two.short_job();
    fill(runner, 2, &mut misses);
    std::thread::sleep(SETTLE);
    let memory = memory_per_container(runner);
    let jobs = two.full_jobs(plan.warmup, plan.full_jobs, || fill(runner, 2, &mut misses));
    drain(&two);

    let eight = pool(CONCURRENT);
    eight.short_job();
    fill(runner, CONCURRENT, &mut misses);
    let together = eight.concurrent_jobs(CONCURRENT);
    drain(&eight);

    let total = Stats::of("pool", jobs.total.clone()).median;
    let full_target = match (targets.pool_seed_ratio, seed) {
        (Some(ratio), Some(seed)) => Target::relative(&format!("≤ {ratio} × the seed's scripts"), ratio * seed),
        _ => Target::none(),
    };
    let overhead = Target::overhead(targets.run_overhead);
    let rows = vec![
        Row::new(&format!("trivial job, pool_size = 2 ({} stages)", STAGES.len()), full_target, jobs.total),
        Row::new(
            "berth prepare, pool_size = 2",
            targets.pool_prepare.map_or_else(Target::none, Target::max),
            jobs.prepare,
        ),
        Row::new("berth run, first stage after prepare", overhead.clone(), jobs.first).with_floor(floor),
        Row::new(&format!("berth run, the other {} stages", STAGES.len() - 1), overhead, jobs.rest).with_floor(floor),
        Row::new("berth cleanup, pool_size = 2", Target::none(), jobs.cleanup),
        Row::new(
            &format!("{CONCURRENT} jobs at once, pool_size = {CONCURRENT}"),
            Target::info("all succeed"),
            vec![together],
        ),
    ];
    let mut notes = vec![format!(
        "pool_size = 2: {} of {} timed prepares took a warm container; {CONCURRENT} jobs at once with pool_size = \
         {CONCURRENT}: all succeeded",
        jobs.warm, plan.full_jobs
    )];
    if let Some(seed) = seed {
        let verdict = targets.pool_seed_ratio.map_or_else(String::new, |limit| {
            format!(" (target ≤ {limit}×) {}", if total / seed <= limit { "ok" } else { "OVER" })
        });
        notes.push(format!("trivial job with pool_size = 2 / the seed's scripts: {:.2}×{verdict}", total / seed));
    }
    notes.push(match memory {
        Some((mib, how, count)) => {
            format!(
                "memory per idle warm container: {mib:.1} MiB ({how}; mean of {count}, after {} s idle)",
                SETTLE.as_secs()
            )
        }
        None => "memory per idle warm container: not measured (no pool container found)".to_owned(),
    });
    notes.extend(misses);
    let mut left = Vec::new();
    for bench in [&two, &eight] {
        let (found, _) = leftovers(bench, &format!("berth-{runner}-"));
        if !found.is_empty() {
            bench.keep.store(true, std::sync::atomic::Ordering::Relaxed);
            left.extend(found);
        }
    }
    PoolFigures::Taken { rows, notes, leftovers: left }
}
