//! What a job costs with the backends that isolate jobs on real images
//! (`nspawn` in both host modes, and `chroot`), end to end, as gitlab-runner
//! pays it, beside the seed design's scripts on the same host.
//!
//! The nspawn backend boots a fresh systemd container per job (or hands out a
//! warm one of its pool, `pool_size`): in standalone mode (PID 1 is not
//! systemd) as a detached `systemd-nspawn`, in systemd mode through
//! `systemd-run` + machined; berth starts every stage in it itself, in a
//! cgroup of the stage's own. The
//! chroot backend mounts a disposable copy-on-write root of the same image per
//! job (no init) and every stage enters it. This bench drives berth's hooks
//! through the GitLab Runner imitation (`berth_runner_imitation`), each a new
//! process with the runner's environment (its own `TMPDIR` with a
//! `response.json`, the exit-code variables, `CUSTOM_ENV_*`) and stage scripts
//! in the runner's format, and times whole processes, spawn to exit. It prints
//! one table per part (backend and host mode), all in one run:
//!
//! - `nspawn`: standalone mode on this host (PID 1 not systemd; hybrid cgroups
//!   on the machine this was written on);
//! - `chroot`: the chroot backend on this host;
//! - `nspawn-systemd`: systemd mode, and `nspawn-cgroup2`: standalone mode on a
//!   cgroup2-only host, both taken natively inside a booted test host (image
//!   `testhost`, systemd as PID 1, `SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`): the
//!   bench re-executes itself there as a service of the test host's systemd,
//!   through `nsenter` and `systemd-run` (`backends/inside.rs`). The test host
//!   runs without nspawn's system call filter on its own services
//!   (`SYSTEMD_SECCOMP=0`), as a real host's services do; its job containers
//!   keep theirs.
//!
//! The trivial job: `config`, `prepare`, 11 stages of a `true` script
//! (prepare_script, get_sources, restore_cache, download_artifacts,
//! step_script, after_script, archive_cache, archive_cache_on_failure,
//! upload_artifacts_on_success, upload_artifacts_on_failure,
//! cleanup_file_variables), `cleanup`. For reference the same job goes through
//! the seed design's scripts (`benches/reference/`, copies of the drivers this
//! project started from, kept as yardsticks, not part of berth) with the same
//! imitation: `seed-scripts.sh` (systemd-run + machined) in systemd mode,
//! `seed-design-standalone.sh` (detached nspawn + nsenter) in standalone mode,
//! on the current generation of the same image.
//!
//! The floor of a stage is the same `true` stage script run on the same host
//! with `bash SCRIPT` (spawn and wait); a stage's overhead is the median of
//! `berth run` minus the median of that floor. A row of `berth --version`
//! says what one start of berth's binary costs on the host, and a note splits
//! the overhead into that start and the stage's own work. Another note says
//! how stages started (the cgroup a stage saw: `/berth-stage-N` when berth
//! entered the container, a `berth-stage-N.service` unit when it went through
//! the container's systemd, the fallback of a berth that cannot copy the
//! init's system call filters, e.g. one that runs under a filter itself).
//!
//! The targets (issue #13 for nspawn, earlier issues for the rest; they apply
//! to the median, or to the overhead where there is one; none is asserted):
//!
//! | figure                                   | nspawn (both modes)          | chroot          |
//! |------------------------------------------|------------------------------|-----------------|
//! | `berth run` of a `true` script, overhead | ≤ 8 ms                       | ≤ 10 ms         |
//! | trivial job, no pool                     | no slower than today         | ≤ 150 ms        |
//! |                                          | (≤ 1000 ms; compare with     |                 |
//! |                                          | `BERTH_BENCH_BINARY`)        |                 |
//! | `berth prepare`, `pool_size = 2`         | ≤ 20 ms                      | -               |
//! | trivial job, `pool_size = 2`             | ≤ 0.5 × the seed's scripts   | -               |
//! |                                          | (systemd mode)               |                 |
//! | `berth cleanup`                          | ≤ 300 ms                     | -               |
//! | 8 jobs at once                           | all succeed, ≤ 3 × one job   | all succeed     |
//! | 8 jobs at once, `pool_size = 8`          | all succeed                  | -               |
//! | idle warm container                      | memory reported              | -               |
//!
//! Each table: the trivial job by hand (its config, prepare, first stage after
//! prepare, other stages and cleanup as rows) and through the seed's scripts
//! with the ratio; `berth exec` of job `test` of `examples/hello`; `berth run`
//! of a `true` script again and again in one prepared job, each run followed
//! by the floor; one job alone against 8 jobs started at once, with the
//! host-wide CPU time of both (`/proc/stat`) and the bound the CPU alone puts
//! on their ratio. For nspawn, the same with `pool_size = 2` (each timed job
//! starts once the pool is full: every `berth-<runner>-pool<n>` container's
//! systemd running), 8 jobs at once with `pool_size = 8`, and the memory of an
//! idle warm container (its cgroup's `memory.current`, or where the cgroup2
//! hierarchy has no memory controller the sum of its processes' Pss). A berth
//! that refuses `pool_size` prints `pool: not supported by this berth (...)`
//! instead, and the bench goes on. Each pool is then emptied as an admin
//! would: `pool_size = 0` and one `berth reap`.
//!
//! Every hook must exit 0 (otherwise the bench panics with its stderr), so a
//! broken hook cannot pass for a fast one. Every job is cleaned up, on failure
//! paths too; the seed's containers are stopped (whatever its cleanup left)
//! when its bench ends; and after each part the bench checks that nothing is
//! left in its temp dirs: no `systemd-nspawn --machine=berth-<runner>-...`
//! process of a container in its state directory, no process whose root
//! directory is inside it, no mount at or below it, nothing in the state
//! directory's `jobs/`. If something is left, the temp dir is kept for
//! inspection and the bench exits 1 after the last table.
//!
//! Every part needs root and an image directory `bookworm` in
//! `$BERTH_TEST_IMAGES` (default `/var/cache/berth-test/images`); nspawn needs
//! `systemd-nspawn`, chroot `mkfs.ext4` (e2fsprogs), the test host parts the
//! image `testhost` (scripts/test builds both images). A part that cannot run
//! here prints `berth PART benchmarks skipped: <reason>`; the others still
//! run, and the bench exits 0.
//!
//! Run with `cargo bench -p berth --bench backends` (as root; where others run
//! container tests on the same machine, under the same lock as theirs).
//! `BERTH_BENCH_BACKENDS=nspawn,chroot,nspawn-systemd,nspawn-cgroup2` selects
//! the parts (default: all; the test host's parts run last, in one test host).
//! `BERTH_BENCH_ITERS=N` sets the number of timed trivial jobs (default 5; also
//! the `berth exec` runs and the seed's jobs); `BERTH_BENCH_BINARY=PATH`
//! benches another berth binary (a before/after comparison); the run-stage
//! figure takes 40 stages and the concurrency figure 3 rounds. Without
//! `--bench` (`cargo test --benches`) each figure is taken once, as a smoke
//! test.

#[path = "backends/bench.rs"]
mod bench;
mod common;
#[path = "backends/host.rs"]
mod host;
#[path = "backends/inside.rs"]
mod inside;
#[path = "backends/pool.rs"]
mod pool;
#[path = "backends/report.rs"]
mod report;
#[path = "backends/seed.rs"]
mod seed;
#[path = "backends/table.rs"]
mod table;
#[path = "../tests/testhost.rs"]
mod testhost;

use std::path::PathBuf;

use seed::Seed;
use table::Target;

/// The berth binary cargo built for this bench (same profile as the bench).
const BERTH: &str = env!("CARGO_BIN_EXE_berth");
/// The berth under test: `BERTH_BENCH_BINARY` (another build, e.g. the last
/// release, for a before/after comparison on the same machine), else [`BERTH`].
fn berth_binary() -> PathBuf {
    std::env::var_os("BERTH_BENCH_BINARY").map_or_else(|| PathBuf::from(BERTH), PathBuf::from)
}

/// Timed full jobs (and `berth exec` runs, and the seed's jobs), unless `BERTH_BENCH_ITERS` is set.
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

/// A part of the bench: a backend in a host mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// nspawn, standalone mode, on this host.
    Nspawn,
    /// chroot, on this host.
    Chroot,
    /// nspawn, systemd mode, in a test host.
    NspawnSystemd,
    /// nspawn, standalone mode on a cgroup2-only host, in a test host.
    NspawnCgroup2,
}

/// A part's targets (milliseconds, on the median).
#[derive(Debug)]
pub struct Targets {
    /// A trivial job without a pool.
    full_job: f64,
    /// `berth run` of a `true` script, minus the floor (`bash SCRIPT` on the host).
    pub run_overhead: f64,
    /// `berth cleanup`, if it has a target.
    cleanup: Option<f64>,
    /// 8 jobs at once over one job alone, if it has a target.
    concurrent_ratio: Option<f64>,
    /// `berth prepare` with `pool_size = 2`, for a backend with a pool.
    pub pool_prepare: Option<f64>,
    /// A trivial job with `pool_size = 2` over the same job through the seed's scripts, if it has a target.
    pub pool_seed_ratio: Option<f64>,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Nspawn, Kind::Chroot, Kind::NspawnSystemd, Kind::NspawnCgroup2];

    /// The part's name in `BERTH_BENCH_BACKENDS` and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Nspawn => "nspawn",
            Kind::Chroot => "chroot",
            Kind::NspawnSystemd => "nspawn-systemd",
            Kind::NspawnCgroup2 => "nspawn-cgroup2",
        }
    }

    /// The backend in the configuration.
    fn backend(self) -> &'static str {
        if self == Kind::Chroot {
            "chroot"
        } else {
            "nspawn"
        }
    }

    /// The runner name in the generated configuration.
    pub fn runner(self) -> &'static str {
        if self == Kind::Chroot {
            "ch"
        } else {
            "ns"
        }
    }

    /// The nspawn backend's host mode, for nspawn.
    pub fn mode(self) -> Option<&'static str> {
        match self {
            Kind::Nspawn | Kind::NspawnCgroup2 => Some("standalone"),
            Kind::NspawnSystemd => Some("systemd"),
            Kind::Chroot => None,
        }
    }

    /// The runner's settings besides `images_dir`, `default_image` and the pool.
    pub fn settings(self) -> String {
        self.mode().map_or_else(String::new, |mode| format!("mode = \"{mode}\"\n"))
    }

    /// Whether the part's figures are taken in a test host.
    fn in_test_host(self) -> bool {
        matches!(self, Kind::NspawnSystemd | Kind::NspawnCgroup2)
    }

    /// Where the figures are taken, for the table's title.
    fn place(self) -> &'static str {
        if self.in_test_host() {
            inside::DESCRIPTION
        } else {
            "on this host"
        }
    }

    /// The program the backend cannot do without (besides root and the image).
    fn tool(self) -> &'static str {
        if self == Kind::Chroot {
            "mkfs.ext4"
        } else {
            "systemd-nspawn"
        }
    }

    /// The seed's driver for the same host mode (nspawn only).
    fn seed(self) -> Option<Seed> {
        match self {
            Kind::Nspawn | Kind::NspawnCgroup2 => Some(Seed::Standalone),
            Kind::NspawnSystemd => Some(Seed::Systemd),
            Kind::Chroot => None,
        }
    }

    pub fn targets(self) -> Targets {
        match self {
            Kind::Chroot => Targets {
                full_job: 150.0,
                run_overhead: 10.0,
                cleanup: None,
                concurrent_ratio: None,
                pool_prepare: None,
                pool_seed_ratio: None,
            },
            _ => Targets {
                full_job: 1000.0,
                run_overhead: 8.0,
                cleanup: Some(300.0),
                concurrent_ratio: Some(3.0),
                pool_prepare: Some(20.0),
                pool_seed_ratio: (self == Kind::NspawnSystemd).then_some(0.5),
            },
        }
    }

    /// The label and target of the `berth prepare` row.
    fn prepare_row(self) -> (&'static str, Target) {
        match self {
            Kind::Chroot => ("berth prepare (mount the root)", Target::none()),
            _ => ("berth prepare (boot to ready)", Target::info("floor ~400 ms")),
        }
    }

    /// Where a stage runs, for the `berth run` row's label.
    fn stage_place(self) -> &'static str {
        if self == Kind::Chroot {
            "mounted root"
        } else {
            "booted container"
        }
    }

    /// How a stage started, from the cgroup it ran in (nspawn: its own
    /// `berth-stage-N` cgroup when berth entered the container, a
    /// `berth-stage-N.service` unit when it went through the container's systemd).
    fn stage_path(self, cgroup: &str) -> &'static str {
        match self {
            Kind::Chroot => "",
            _ if cgroup.starts_with("/berth-stage-") => " (berth entered the container)",
            _ => " (through the container's systemd: the slower path; see berth's log)",
        }
    }
}

/// The parts `BERTH_BENCH_BACKENDS` names (default: all), in its order.
fn selected_backends() -> Vec<Kind> {
    let Some(value) = std::env::var_os("BERTH_BENCH_BACKENDS") else { return Kind::ALL.to_vec() };
    let value = value.into_string().unwrap_or_else(|v| panic!("BERTH_BENCH_BACKENDS is not UTF-8: {v:?}"));
    let known = || Kind::ALL.map(Kind::name).join(", ");
    let mut kinds = Vec::new();
    for name in value.split(',').map(str::trim).filter(|name| !name.is_empty()) {
        let kind = Kind::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .unwrap_or_else(|| panic!("BERTH_BENCH_BACKENDS: unknown part {name:?} (known: {})", known()));
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    assert!(!kinds.is_empty(), "BERTH_BENCH_BACKENDS names no part (known: {}); unset it for all", known());
    kinds
}

/// How many times each figure is taken.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub bench_mode: bool,
    pub full_jobs: usize,
    pub run_stages: usize,
    pub rounds: usize,
    pub warmup: usize,
}

impl Plan {
    /// From the command line (`--bench`) and `BERTH_BENCH_ITERS`.
    fn from_env() -> Plan {
        let (bench_mode, iters_override) = common::bench_mode_and_iters();
        let (full_jobs, run_stages, rounds, warmup) = match (bench_mode, iters_override) {
            (false, _) => (1, 1, 1, 0),
            (true, Some(n)) => (n, RUN_STAGES, ROUNDS, WARMUP),
            (true, None) => (FULL_JOBS, RUN_STAGES, ROUNDS, WARMUP),
        };
        Plan { bench_mode, full_jobs, run_stages, rounds, warmup }
    }
}

fn main() {
    let plan = Plan::from_env();
    let kinds = selected_backends();
    let inside = std::env::var_os(inside::INSIDE).is_some();
    let images = std::env::var_os("BERTH_TEST_IMAGES").map_or_else(|| PathBuf::from(DEFAULT_IMAGES), PathBuf::from);
    let binary = berth_binary();
    // Hooks inherit this process's environment, as the runner's do: nothing of it may change berth's behaviour.
    for key in common::scrubbed_vars() {
        std::env::remove_var(key);
    }
    let (here, hosted): (Vec<Kind>, Vec<Kind>) = kinds.into_iter().partition(|kind| inside || !kind.in_test_host());
    let mut clean = true;
    for kind in here {
        if let Err(reason) = host::can_run(kind, &images) {
            println!("berth {} benchmarks skipped: {reason}", kind.name());
            continue;
        }
        clean &= report::bench_part(kind, &binary, &images, plan);
    }
    if !hosted.is_empty() {
        match inside::run(&hosted, &images, &binary, plan) {
            Ok(left_nothing) => clean &= left_nothing,
            Err(reason) => {
                for kind in hosted {
                    println!("berth {} benchmarks skipped: {reason}", kind.name());
                }
            }
        }
    }
    if !clean {
        std::process::exit(1);
    }
}
