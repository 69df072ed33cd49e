//! The host: whether it can run a backend, its CPU time, and what a
//! backend's jobs may leave on it (processes and mounts, read from /proc).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::bench::Bench;
use crate::{Kind, IMAGE};

/// Every process but this one: pid and the arguments of its command line.
pub fn processes() -> Vec<(u32, Vec<String>)> {
    let mut found: Vec<(u32, Vec<String>)> = berth_backend_support::proc::processes()
        .into_iter()
        .map(|p| (p.pid as u32, p.cmdline.iter().map(|a| String::from_utf8_lossy(a).into_owned()).collect()))
        .collect();
    found.sort();
    found
}

/// nspawn processes whose command line has `machine_arg...` (`--machine=berth-ns-`): pid and command line.
fn nspawn_processes(machine_arg: &str) -> Vec<(u32, String)> {
    processes()
        .into_iter()
        .filter(|(_, args)| {
            args.first().is_some_and(|a| a.ends_with("systemd-nspawn"))
                && args.iter().any(|a| a.starts_with(machine_arg))
        })
        .map(|(pid, args)| (pid, args.join(" ")))
        .collect()
}

/// Processes whose root directory is at or below `dir`: pid, root and command line.
fn processes_rooted_in(dir: &Path) -> Vec<(u32, PathBuf, String)> {
    processes()
        .into_iter()
        .filter_map(|(pid, args)| {
            let root = std::fs::read_link(format!("/proc/{pid}/root")).ok()?;
            root.starts_with(dir).then(|| (pid, root, args.join(" ")))
        })
        .collect()
}

/// What the bench left behind in its temp dir: nspawn processes of containers
/// (`--machine=` followed by `machine`) in its state directory (any `berth exec`
/// job's too), processes whose root is in it, mounts in it and jobs in the state
/// directory; and how many such containers of others (another state directory)
/// were seen.
pub fn leftovers(bench: &Bench, machine: &str) -> (Vec<String>, usize) {
    let ours = format!("{}/", bench.state.display());
    let (mine, others): (Vec<_>, Vec<_>) =
        nspawn_processes(&format!("--machine={machine}")).into_iter().partition(|(_, cmdline)| cmdline.contains(&ours));
    let mut found: Vec<String> = mine.into_iter().map(|(pid, cmdline)| format!("process {pid}: {cmdline}")).collect();
    let dir = bench.dir.path();
    found.extend(
        processes_rooted_in(dir)
            .into_iter()
            .map(|(pid, root, cmdline)| format!("process {pid} (root {}): {cmdline}", root.display())),
    );
    found.extend(
        berth_backend_support::mounts::mounts_under(dir).into_iter().map(|point| format!("mount {}", point.display())),
    );
    let jobs = bench.state.join("jobs");
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

/// Ends the processes whose command line names `dir` (a reference driver's
/// containers, whose cleanup may return before they are gone): waits up to
/// `grace` for them to end, then SIGTERM, `grace` again, then SIGKILL. Returns
/// those that had to be signalled.
pub fn stop_processes_naming(dir: &Path, grace: Duration) -> Vec<String> {
    let needle = format!("{}/", dir.display());
    let naming = || -> Vec<(u32, String)> {
        processes()
            .into_iter()
            .map(|(pid, args)| (pid, args.join(" ")))
            .filter(|(_, cmdline)| cmdline.contains(&needle))
            .collect()
    };
    let mut signalled = Vec::new();
    for signal in [None, Some(Signal::SIGTERM), Some(Signal::SIGKILL)] {
        if let Some(signal) = signal {
            for (pid, cmdline) in naming() {
                let _ = kill(Pid::from_raw(pid as i32), signal);
                signalled.push(format!("process {pid} ({signal}): {cmdline}"));
            }
        }
        let deadline = Instant::now() + grace;
        while !naming().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if naming().is_empty() {
            break;
        }
    }
    signalled
}

/// CPU time spent on the whole host so far, every core and process (`/proc/stat`).
pub fn host_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").expect("reads /proc/stat");
    let line = stat.lines().next().expect("/proc/stat has a cpu line");
    // user nice system idle iowait irq softirq steal: everything but idle and iowait.
    let ticks: Vec<u64> = line.split_whitespace().skip(1).take(8).map(|t| t.parse().expect("a tick count")).collect();
    let busy: u64 = ticks.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100).max(1) as u64;
    Duration::from_millis(busy * 1000 / hz)
}

/// Why the bench cannot run `kind` here, if it cannot.
pub fn can_run(kind: Kind, images: &Path) -> Result<(), String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(format!("not root (the {} backend needs root)", kind.name()));
    }
    if berth_backend_support::settings::which(kind.tool()).is_none() {
        return Err(format!("{} is not installed (not on PATH)", kind.tool()));
    }
    if !images.join(IMAGE).is_dir() {
        return Err(format!("no image {IMAGE:?} in {} (set BERTH_TEST_IMAGES)", images.display()));
    }
    Ok(())
}
