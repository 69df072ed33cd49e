//! The figures of a host whose PID 1 is systemd, taken natively in a booted
//! test host (`tests/testhost.rs`, image `testhost`): a cgroup2-only container
//! (`SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`, what a Debian 12 host has) with this
//! bench's own executable, berth, the images and a scratch directory bound in.
//! The bench re-executes itself there, as a service of the test host's systemd
//! (`nsenter` into the test host's init, then `systemd-run --wait --pipe`),
//! with [`INSIDE`] set and the parts that belong there; their tables are its
//! output.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::testhost::TestHost;
use crate::{Kind, Plan};

/// Set (to `1`) in the bench re-executed inside the test host.
pub const INSIDE: &str = "BERTH_BENCH_INSIDE";
/// Where things are inside the test host.
const BENCH: &str = "/usr/local/bin/berth-bench";
const BERTH: &str = "/usr/local/bin/berth";
const IMAGES: &str = "/var/lib/berth/images";
/// The scratch directory (state directories, jobs' temp dirs): a bind mount,
/// since an overlay's upper directory cannot lie on the test host's own overlay.
const SCRATCH: &str = "/var/lib/berth-bench";
/// The host's pgrep (procps) and its library, which the seed's standalone
/// driver needs and the test host image lacks.
const PGREP: [(&str, &str); 2] = [
    ("/usr/bin/pgrep", "/usr/local/bin/pgrep"),
    ("/lib/x86_64-linux-gnu/libproc2.so.0", "/usr/lib/x86_64-linux-gnu/libproc2.so.0"),
];

/// How the test host is described in the tables.
pub const DESCRIPTION: &str = "in a test host: systemd as PID 1, cgroup2 only (SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1, \
                               as on a Debian 12 host), nested in this host";

/// Why no test host can be booted here, if none can.
fn can_boot(images: &Path) -> Result<(), String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("not root (booting a test host needs root)".into());
    }
    if berth_backend_support::settings::which("systemd-nspawn").is_none() {
        return Err("systemd-nspawn is not installed (not on PATH)".into());
    }
    if !images.join("testhost/current").is_dir() {
        return Err(format!("no image \"testhost\" in {} (scripts/test builds it)", images.display()));
    }
    Ok(())
}

/// Boots a test host and runs the bench of `kinds` in it, its tables on this
/// process's output: whether it left nothing behind, or why it could not run.
/// A hook that fails inside fails the bench here (a panic).
pub fn run(kinds: &[Kind], images: &Path, binary: &Path, plan: Plan) -> Result<bool, String> {
    can_boot(images)?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this bench's executable: {e}"))?;
    let scratch = tempfile::Builder::new().prefix("berth-bench-testhost").tempdir().expect("a temp dir");
    // `berth exec` of the examples: the workspace, where it is here.
    let workspace = crate::common::workspace_root();
    let workspace_path = workspace.to_str().expect("the workspace path is UTF-8");
    let mut binds: Vec<(PathBuf, &str, bool)> = vec![
        (exe, BENCH, false),
        (binary.to_owned(), BERTH, false),
        (images.to_owned(), IMAGES, false),
        (scratch.path().to_owned(), SCRATCH, true),
        (workspace.clone(), workspace_path, false),
    ];
    let pgrep = PGREP.iter().filter(|(on_host, _)| Path::new(on_host).exists());
    binds.extend(pgrep.map(|(on_host, inside)| (PathBuf::from(on_host), *inside, false)));
    let host = TestHost::boot(images, "bench", true, &binds);
    let out = host.command("systemctl").args(["is-system-running", "--wait"]).output().expect("runs systemctl");
    let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !matches!(state.as_str(), "running" | "degraded") {
        panic!("the test host did not boot: systemctl is-system-running says {state:?}");
    }
    let names: Vec<&str> = kinds.iter().map(|kind| kind.name()).collect();
    let iters = plan.full_jobs.to_string();
    let env = [
        (INSIDE, "1"),
        ("BERTH_BENCH_BACKENDS", &names.join(",")),
        ("BERTH_BENCH_BINARY", BERTH),
        ("BERTH_TEST_IMAGES", IMAGES),
        ("BERTH_BENCH_ITERS", &iters),
        ("TMPDIR", SCRATCH),
    ];
    // A service of the test host's systemd, as a runner is on a real host: its
    // own cgroup (delegated, for the seed's `nspawn --keep-unit`), its output here.
    let mut bench = host.command("systemd-run");
    bench.args(["--quiet", "--wait", "--pipe", "--collect", "--unit=berth-bench", "--property=Delegate=yes"]);
    bench.args(env.iter().map(|(key, value)| format!("--setenv={key}={value}")));
    bench.arg(BENCH);
    if plan.bench_mode {
        bench.arg("--bench");
    }
    bench.stdin(Stdio::null());
    let status = bench.status().expect("failed to run the bench in the test host");
    drop(host);
    match status.code() {
        Some(0) => Ok(true),
        // Something left behind: said in its tables.
        Some(1) => Ok(false),
        _ => panic!("the bench inside the test host failed ({status}): see its output above"),
    }
}
