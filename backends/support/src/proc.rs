//! Looking at host processes through /proc: the one process lister of the
//! backends ([`processes`], behind [`crate::host::Host::processes`]).

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

/// A host process, as /proc shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// Its pid.
    pub pid: i32,
    /// Its start time (clock ticks since boot, field 22 of `/proc/PID/stat`):
    /// with the pid, it identifies a process across pid reuse.
    pub start_time: u64,
    /// Its state letter (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Its arguments.
    pub cmdline: Vec<Vec<u8>>,
}

impl Process {
    /// Process `pid` (`None` if it is gone).
    pub fn read(pid: i32) -> Option<Process> {
        let (state, start_time) = stat(pid)?;
        Some(Process { pid, start_time, state, cmdline: cmdline(pid) })
    }

    /// Whether it runs (is not a zombie).
    pub fn alive(&self) -> bool {
        self.state != 'Z'
    }

    /// Whether `arg` is exactly one of its arguments.
    pub fn has_arg(&self, arg: &[u8]) -> bool {
        self.cmdline.iter().any(|a| a == arg)
    }
}

/// The state and start time of `pid`, from `/proc/PID/stat`.
fn stat(pid: i32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let state = rest.chars().next()?;
    Some((state, rest.split(' ').nth(19)?.parse().ok()?))
}

/// The pids of every process of the host but this one.
pub fn pids() -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries.flatten().filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok()).filter(|pid| *pid != me).collect()
}

/// Every process of the host but this one.
pub fn processes() -> Vec<Process> {
    pids().into_iter().filter_map(Process::read).collect()
}

/// The start time of `pid` (see [`Process::start_time`]).
pub fn start_time(pid: i32) -> Option<u64> {
    stat(pid).map(|(_, start)| start)
}

/// Whether `pid` runs (exists and is not a zombie).
pub fn alive(pid: i32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != 'Z')
}

/// The container's init: the child of nspawn that is PID 1 of its own PID namespace.
pub fn leader_of(nspawn: i32) -> Option<i32> {
    let tasks = std::fs::read_dir(format!("/proc/{nspawn}/task")).ok()?;
    for task in tasks.flatten() {
        let Ok(children) = std::fs::read_to_string(task.path().join("children")) else { continue };
        for child in children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()) {
            let Ok(status) = std::fs::read_to_string(format!("/proc/{child}/status")) else { continue };
            let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:")).unwrap_or("");
            let ids: Vec<&str> = nspid.split_whitespace().collect();
            if ids.len() >= 2 && ids.last() == Some(&"1") {
                return Some(child);
            }
        }
    }
    None
}

/// The arguments of `pid`.
pub fn cmdline(pid: i32) -> Vec<Vec<u8>> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|b| *b == 0).filter(|a| !a.is_empty()).map(<[u8]>::to_vec).collect())
        .unwrap_or_default()
}

/// Processes (other than this one) with exactly `arg` among their arguments.
pub fn pids_with_arg(arg: &str) -> Vec<i32> {
    processes().into_iter().filter(|p| p.has_arg(arg.as_bytes())).map(|p| p.pid).collect()
}

/// Waits until every pid in `pids` is gone, at most `timeout`; true if they are.
pub fn wait_gone(pids: &[i32], timeout: Duration) -> bool {
    wait_gone_on(&crate::host::System, pids, timeout)
}

/// [`wait_gone`], looking at the processes of `host`.
pub fn wait_gone_on(host: &dyn crate::host::Host, pids: &[i32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !pids.iter().any(|p| host.process(*p).is_some_and(|p| p.alive())) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A pidfd for `pid`, readable once it exits.
pub fn pidfd(pid: i32) -> Option<OwnedFd> {
    berth_backend_api::process::pidfd(u32::try_from(pid).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_has_a_start_time() {
        let me = std::process::id() as i32;
        assert!(alive(me));
        assert!(start_time(me).is_some());
        assert!(!alive(i32::MAX));
        assert!(Process::read(me).is_some_and(|p| p.alive() && Some(p.start_time) == start_time(me)));
    }

    #[test]
    fn finds_processes_by_argument() {
        let mut child = std::process::Command::new("sleep").arg("7.25").spawn().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(pids_with_arg("7.25"), vec![child.id() as i32]);
        assert!(cmdline(child.id() as i32).iter().any(|a| a == b"7.25"));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(pids_with_arg("7.25").is_empty());
    }
}
