//! One part of the bench: every figure of a backend in a host mode, taken,
//! then printed as one table with its targets.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::bench::{Bench, FullJobs, STAGES};
use crate::common::{timed, Stats};
use crate::host::{host_cpu, leftovers};
use crate::pool::PoolFigures;
use crate::table::{Row, Target};
use crate::{Kind, Plan, CONCURRENT, IMAGE};

/// Takes and prints every figure of one part; false if it left something behind.
pub fn bench_part(kind: Kind, binary: &Path, images: &Path, plan: Plan) -> bool {
    let Plan { bench_mode, full_jobs, run_stages, rounds, warmup } = plan;
    let targets = kind.targets();
    let bench = Bench::berth(kind.name(), binary, images, kind.backend(), kind.runner(), &kind.settings());

    // 1. Trivial jobs by hand, and `berth exec` for comparison.
    let jobs = bench.full_jobs(warmup, full_jobs, || {});
    let exec = Exec::runs(&bench, plan);
    // 2. Run stages in one prepared job, each next to its floor.
    let (runs, floors, stage_cgroup) = bench.run_stages(run_stages, warmup);
    let starts = bench.version_starts(run_stages);
    // 3. One job alone, then 8 at once, per round.
    let concurrency = Concurrency::rounds(&bench, rounds);
    // 4. The same trivial job through the seed's scripts.
    let seed = kind.seed().map(|seed| {
        seed.can_run()?;
        let reference = seed.bench(images);
        let jobs = reference.bench.full_jobs(warmup, full_jobs, || {});
        let stopped = reference.settle();
        let (mut found, _) = leftovers(&reference.bench, "run-");
        found.extend(stopped.into_iter().map(|p| format!("left running after cleanup, stopped: {p}")));
        if !found.is_empty() {
            reference.bench.keep.store(true, Ordering::Relaxed);
        }
        Ok::<_, String>((seed, jobs, found))
    });
    let (mut found, foreign) = leftovers(&bench, &format!("berth-{}-", kind.runner()));

    let floor = Row::new("bash SCRIPT on the host (floor)", Target::info("spawn + wait"), floors);
    let floor_median = floor.median;
    let seed_median = match &seed {
        Some(Ok((_, jobs, _))) => Some(Stats::of("seed", jobs.total.clone()).median),
        _ => None,
    };
    // 5. With a pool.
    let pool = kind.mode().map(|_| crate::pool::figures(kind, binary, images, plan, floor_median, seed_median));

    let start = Row::new("berth --version (one start of berth)", Target::info("process start"), starts);
    let (start_median, run_median) = (start.median, Stats::of("run", runs.clone()).median);
    let overhead = Target::overhead(targets.run_overhead);
    let (prepare_label, prepare_target) = kind.prepare_row();
    let cleanup_target = targets.cleanup.map_or_else(Target::none, Target::max);
    let full_target = match kind {
        Kind::Chroot => Target::max(targets.full_job),
        _ => Target::max(targets.full_job).with_note("no slower than today"),
    };
    let mut rows = vec![
        Row::new(&format!("trivial job, {} stages (by hand)", STAGES.len()), full_target, jobs.total.clone()),
        Row::new("berth exec examples/hello test", Target::none(), exec.times.clone()),
        Row::new("berth config", Target::none(), jobs.config),
        Row::new(prepare_label, prepare_target, jobs.prepare),
        floor,
        start,
        Row::new("berth run, first stage after prepare", overhead.clone(), jobs.first).with_floor(floor_median),
        Row::new(&format!("berth run, the other {} stages", STAGES.len() - 1), overhead.clone(), jobs.rest)
            .with_floor(floor_median),
        Row::new(&format!("berth run `true` ({})", kind.stage_place()), overhead, runs).with_floor(floor_median),
        Row::new("berth cleanup", cleanup_target, jobs.cleanup),
    ];
    let mut notes = vec![
        format!(
            "a stage's cgroup (in its container's cgroup namespace): {stage_cgroup}{}",
            kind.stage_path(&stage_cgroup)
        ),
        format!(
            "berth run `true`: {:.1} ms over the floor, of which {start_median:.1} ms is one start of berth's binary \
             (berth --version) and {:.1} ms the stage's own work (entering, its cgroup, waiting, removing it)",
            run_median - floor_median,
            run_median - floor_median - start_median
        ),
    ];
    match seed {
        Some(Ok((seed, seed_jobs, seed_left))) => {
            let file = seed.file();
            let total = Stats::of("seed", jobs.total).median;
            rows.extend(seed_rows(file, seed_jobs, floor_median));
            let seed_median = seed_median.expect("taken with the seed's jobs");
            notes.push(format!(
                "trivial job, berth / {file}: {:.2}× without a pool (medians {total:.0} / {seed_median:.0} ms)",
                total / seed_median
            ));
            found.extend(seed_left);
        }
        Some(Err(reason)) => notes.push(format!("seed's scripts: not measured here: {reason}")),
        None => {}
    }
    rows.extend(concurrency.rows(&targets));
    notes.extend(concurrency.notes(&targets));
    let mut sections = vec![(String::new(), rows)];
    match pool {
        Some(PoolFigures::Refused(reason)) => notes.push(format!("pool: not supported by this berth ({reason})")),
        Some(PoolFigures::Taken { rows, notes: pool_notes, leftovers }) => {
            sections.push(("with a pool".to_owned(), rows));
            notes.extend(pool_notes);
            found.extend(leftovers);
        }
        None => {}
    }

    let profile = if cfg!(debug_assertions) { "debug build: figures are not representative" } else { "release build" };
    println!();
    println!(
        "berth {} benchmarks, {} ({profile}; image {IMAGE} from {}; {full_jobs} trivial jobs, {run_stages} run \
         stages, {rounds} rounds of {CONCURRENT} concurrent jobs)",
        kind.name(),
        kind.place(),
        images.display()
    );
    println!(
        "{:<50}{:>6}  {:>8} {:>8} {:>8} {:>8} {:>9}   target",
        "command", "runs", "min", "median", "p95", "mean", "overhead"
    );
    for (title, rows) in &sections {
        if !title.is_empty() {
            println!("-- {title}");
        }
        for row in rows {
            println!("{row}");
        }
    }
    for note in &notes {
        println!("{note}");
    }
    println!(
        "(milliseconds, wall time from spawn to exit; overhead = median − median of the floor; \
         targets apply to the median, or to the overhead where there is one)"
    );
    if !bench_mode {
        println!("(smoke run: each figure once; use `cargo bench` for figures)");
    }
    exec.print_retries();
    if foreign > 0 {
        println!(
            "({foreign} berth-{}- container(s) of another state directory, not this bench's, ignored)",
            kind.runner()
        );
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
        println!("(temp dirs kept: {} and the reference's or pool's where named)", bench.dir.path().display());
        false
    }
}

/// The rows of the seed's trivial jobs, for reference.
fn seed_rows(file: &str, jobs: FullJobs, floor_median: f64) -> Vec<Row> {
    let stages = jobs.first.into_iter().chain(jobs.rest).collect();
    vec![
        Row::new(&format!("{file}: trivial job"), Target::info("reference"), jobs.total),
        Row::new(&format!("{file}: prepare"), Target::info("reference"), jobs.prepare),
        Row::new(&format!("{file}: run, the {} stages", STAGES.len()), Target::info("reference"), stages)
            .with_floor(floor_median),
        Row::new(&format!("{file}: cleanup"), Target::info("reference"), jobs.cleanup),
    ]
}

/// `berth exec` of job `test` of `examples/hello`, and whether it retried prepare.
struct Exec {
    times: Vec<Duration>,
    retries: usize,
    /// The output of the first failed prepare attempt.
    first_failed_prepare: String,
}

impl Exec {
    fn runs(bench: &Bench, plan: Plan) -> Exec {
        let root = crate::common::workspace_root();
        let pipeline = root.join("examples/hello/.gitlab-ci.yml");
        let sources = root.join("examples/hello");
        let mut exec = Exec { times: Vec::new(), retries: 0, first_failed_prepare: String::new() };
        for n in 0..plan.warmup + plan.full_jobs {
            let mut command = bench.command();
            command.arg("exec").arg("--file").arg(&pipeline).arg("--sources").arg(&sources).arg("test");
            command.env("TMPDIR", bench.dir.path()).current_dir(bench.dir.path());
            let log = bench.dir.path().join("exec.log");
            let elapsed = timed(&mut command, &log, true, &format!("{}: berth exec", bench.label), &[]);
            // The job log tells whether prepare was retried (every attempt says "Preparing environment").
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let attempts = text.lines().filter(|line| line.trim() == "Preparing environment").count();
            if attempts > 1 && exec.retries == 0 {
                // The first failed attempt's output: from the first "Preparing environment" to the next.
                exec.first_failed_prepare = text
                    .lines()
                    .skip_while(|line| line.trim() != "Preparing environment")
                    .skip(1)
                    .take_while(|line| line.trim() != "Preparing environment")
                    .map(|line| format!("  | {line}\n"))
                    .collect();
            }
            exec.retries += attempts.saturating_sub(1);
            if n >= plan.warmup {
                exec.times.push(elapsed);
            }
        }
        exec
    }

    fn print_retries(&self) {
        if self.retries > 0 {
            println!(
                "(berth exec retried prepare {} time(s), warm-up included: 3 s pause each; first failure:)",
                self.retries
            );
            print!("{}", self.first_failed_prepare);
        }
    }
}

/// One job alone against 8 at once, with the host-wide CPU time of each.
struct Concurrency {
    alone: Vec<Duration>,
    together: Vec<Duration>,
    cpu_alone: f64,
    cpu_together: f64,
}

impl Concurrency {
    fn rounds(bench: &Bench, rounds: usize) -> Concurrency {
        // Host-wide CPU time is taken around each, to tell a CPU-bound run from one that waits.
        let (mut alone, mut together) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
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
        Concurrency { alone, together, cpu_alone, cpu_together }
    }

    fn medians(&self) -> (f64, f64) {
        (Stats::of("1 job", self.alone.clone()).median, Stats::of("8 jobs", self.together.clone()).median)
    }

    fn rows(&self, targets: &crate::Targets) -> Vec<Row> {
        let (alone, _) = self.medians();
        let together_target = match targets.concurrent_ratio {
            Some(ratio) => Target::relative(&format!("all succeed, ≤ {ratio} × 1 job"), ratio * alone),
            None => Target::info("all succeed"),
        };
        vec![
            Row::new("1 job (config/prepare/run/cleanup)", Target::none(), self.alone.clone()),
            Row::new(&format!("{CONCURRENT} jobs at once (total wall)"), together_target, self.together.clone()),
        ]
    }

    fn notes(&self, targets: &crate::Targets) -> Vec<String> {
        let (alone_ms, together_ms) = self.medians();
        let ratio = together_ms / alone_ms;
        let (cpu_alone, cpu_together) = (self.cpu_alone, self.cpu_together);
        let verdict = match targets.concurrent_ratio {
            Some(limit) => format!("target ≤ {limit}×) {}", if ratio <= limit { "ok" } else { "OVER" }),
            None => "no target)".to_owned(),
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let bound = CONCURRENT as f64 * cpu_alone / cores;
        vec![
            format!(
                "{CONCURRENT} jobs at once / 1 job: {ratio:.2}× (medians; all {CONCURRENT} jobs succeeded in every \
                 round; {verdict}"
            ),
            format!(
                "CPU (host-wide, medians): 1 job {cpu_alone:.0} ms of CPU in {alone_ms:.0} ms ({:.0}% of one core); \
                 {CONCURRENT} at once {cpu_together:.0} ms in {together_ms:.0} ms ({:.0}% of {cores} cores). \
                 The CPU alone bounds {CONCURRENT} jobs to ≥ {CONCURRENT} × {cpu_alone:.0} / {cores} = {bound:.0} ms \
                 = {:.2}× one job.",
                100.0 * cpu_alone / alone_ms,
                100.0 * cpu_together / (together_ms * cores),
                bound / alone_ms,
            ),
        ]
    }
}
