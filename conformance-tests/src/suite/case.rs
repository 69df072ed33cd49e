//! One job driven hook by hook, as the checks use it, and what every case
//! ends with: the leak check.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_backend_api::{JobInfo, JobResponse, ResponseVariable};
use berth_runner_imitation::runner::{Driver, Exit, Hook, HookResult, JobRun, Log, Quiet};

use super::{CheckOutcome, Finding, Target};

static NEXT_JOB: AtomicU64 = AtomicU64::new(0);

/// A job id no real GitLab job on this host has: far above GitLab's ids, and
/// unique per process and case.
fn job_id() -> u64 {
    9_000_000_000_000 + (u64::from(std::process::id()) << 16) + NEXT_JOB.fetch_add(1, Ordering::Relaxed)
}

pub(super) fn response() -> JobResponse {
    let mut response = JobResponse::new(job_id());
    response.token = format!("conformance-token-{}", response.id);
    response.job_info = JobInfo::new("conformance", "test", "berth/probe");
    let id = response.id.to_string();
    response.variables = vec![
        ResponseVariable::new("CI_JOB_ID", &id),
        ResponseVariable::new("CI_PROJECT_PATH", "berth/probe"),
        ResponseVariable::new("CI_RUNNER_SHORT_TOKEN", "conform1"),
        ResponseVariable::new("CI_CONCURRENT_ID", "0"),
        ResponseVariable::new("CI_CONCURRENT_PROJECT_ID", "0"),
        ResponseVariable::new("CI", "true"),
    ];
    response
}

/// One job driven hook by hook.
pub(super) struct Case<'a> {
    pub(super) target: &'a Target,
    pub(super) driver: Driver,
    pub(super) job: JobRun,
    pub(super) log: Arc<dyn Log>,
}

impl<'a> Case<'a> {
    pub(super) fn new(target: &'a Target) -> Result<Self, Finding> {
        Self::with(target, |_| {})
    }

    pub(super) fn with(target: &'a Target, edit: impl FnOnce(&mut JobResponse)) -> Result<Self, Finding> {
        let mut response = response();
        edit(&mut response);
        let job = JobRun::new(&response).map_err(|e| format!("failed to create the job's temp dir: {e}"))?;
        Ok(Case { target, driver: target.driver.clone(), job, log: Arc::new(Quiet) })
    }

    pub(super) fn id(&self) -> u64 {
        self.job.response().id
    }

    pub(super) fn config(&mut self) -> Result<HookResult, Finding> {
        let (result, parsed) = self.driver.config(&mut self.job, &self.log);
        parsed.map_err(|e| format!("{e}\n{}", result.output()))?;
        Ok(result)
    }

    pub(super) fn prepare(&mut self) -> Result<HookResult, Finding> {
        self.config()?;
        let result =
            self.driver.call(&self.job, Hook::Prepare, &[], Some(self.driver.timeouts.prepare), None, &self.log);
        if !result.ok() {
            return Err(Finding::Fail(format!("prepare ended in a {}\n{}", result.exit, tail(&result.output()))));
        }
        Ok(result)
    }

    pub(super) fn run(&mut self, stage: &str, body: &str) -> HookResult {
        self.driver.run_stage(&mut self.job, stage, body, None, &self.log)
    }

    pub(super) fn run_ok(&mut self, stage: &str, body: &str) -> Result<HookResult, Finding> {
        let result = self.run(stage, body);
        if !result.ok() {
            return Err(Finding::Fail(format!("run {stage} ended in a {}\n{}", result.exit, tail(&result.output()))));
        }
        Ok(result)
    }

    pub(super) fn cleanup(&mut self) -> HookResult {
        self.driver.call(&self.job, Hook::Cleanup, &[], Some(self.driver.timeouts.cleanup), None, &self.log)
    }

    /// Cleans up (twice, when `twice`) and checks that nothing of the job is left.
    pub(super) fn finish(mut self) -> CheckOutcome {
        let result = self.cleanup();
        if !result.ok() {
            return Err(Finding::Fail(format!("cleanup ended in a {}\n{}", result.exit, tail(&result.output()))));
        }
        leak_check(self.target, self.id())
    }
}

pub(super) fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

/// How long what cleanup handed to the background (removing a job's layer
/// and state) may take to finish after the hook returned.
pub(super) const BACKGROUND_CLEANUP: Duration = Duration::from_secs(30);

/// Fails if anything of job `id` is left once [`BACKGROUND_CLEANUP`] after
/// cleanup returned has passed: a file or directory under the state
/// directory named after it (except in `logs`, for records meant to outlive
/// the job), a process whose command line names it (a container, a helper),
/// or a mount whose path names it. A driver may finish its cleanup in the
/// background (the protocol only needs the hook to return once nothing of
/// the job runs or is visible to the next job); what remains after that time
/// is a leak.
pub(super) fn leak_check(target: &Target, id: u64) -> CheckOutcome {
    let needle = format!("-{id}");
    let deadline = Instant::now() + BACKGROUND_CLEANUP;
    loop {
        let leaks = leaks(target, &needle);
        if leaks.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Finding::Fail(format!(
                "cleanup left job {id} behind (still there {} s after cleanup returned): {}",
                BACKGROUND_CLEANUP.as_secs(),
                leaks.join(", ")
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A host directory outside the backend's state (`root`), and what was
/// below it before the suite's first case (`None`: it did not exist).
#[derive(Debug)]
pub(super) struct Watched {
    root: PathBuf,
    before: Option<BTreeSet<PathBuf>>,
}

/// How deep and how much of a watched directory is remembered: enough for
/// `<builds_dir>/<namespace>/<project>/...`, bounded on a busy host.
const WATCH_DEPTH: usize = 4;
const WATCH_ENTRIES: usize = 20_000;

/// The host directories a job must leave alone, as they are now: the builds
/// directory the driver's config names (a backend that runs jobs on the host
/// writes there unless it maps it into its state) and the usual paths jobs
/// see, `/builds` and `/cache`, each unless it is inside the state
/// directory. (The cache directory a config names is not watched: a cache
/// is meant to outlive its jobs.)
pub(super) fn watch(target: &Target) -> Vec<Watched> {
    let mut roots = vec![PathBuf::from("/builds"), PathBuf::from("/cache")];
    if let Ok(mut case) = Case::new(target) {
        if case.config().is_ok() {
            let config = &case.job.config;
            roots.extend(config.builds_dir.iter().map(PathBuf::from));
        }
        let _ = case.cleanup();
    }
    roots.sort();
    roots.dedup();
    roots
        .into_iter()
        .filter(|root| root.is_absolute() && root.parent().is_some())
        .filter(|root| target.state_dir.as_ref().is_none_or(|state| !root.starts_with(state)))
        .map(|root| {
            let before = root.exists().then(|| entries(&root));
            Watched { root, before }
        })
        .collect()
}

/// What is below `root`, [`WATCH_DEPTH`] levels deep, at most [`WATCH_ENTRIES`].
fn entries(root: &Path) -> BTreeSet<PathBuf> {
    fn visit(dir: &Path, depth: usize, out: &mut BTreeSet<PathBuf>) {
        let Ok(read) = std::fs::read_dir(dir) else { return };
        for entry in read.flatten() {
            if out.len() >= WATCH_ENTRIES {
                return;
            }
            let path = entry.path();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            out.insert(path.clone());
            if is_dir && depth + 1 < WATCH_DEPTH {
                visit(&path, depth + 1, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    visit(root, 0, &mut out);
    out
}

/// What was made below the watched directories since the suite began (the
/// topmost new paths), or the directory itself when it did not exist.
fn written_outside(watched: &[Watched]) -> Vec<String> {
    let mut found = Vec::new();
    for Watched { root, before } in watched {
        match before {
            None if root.exists() => found.push(root.clone()),
            None => {}
            Some(before) => {
                let now = entries(root);
                let mut new: Vec<&PathBuf> = now.difference(before).collect();
                new.retain(|path| !path.ancestors().skip(1).any(|a| now.contains(a) && !before.contains(a)));
                found.extend(new.into_iter().cloned());
            }
        }
    }
    found
        .into_iter()
        .map(|path| {
            format!("{} (written outside the backend's state: a job must not change the host's files)", path.display())
        })
        .collect()
}

/// What of the job named by `needle` is there now.
fn leaks(target: &Target, needle: &str) -> Vec<String> {
    let mut leaks = Vec::new();
    if let Some(watched) = target.outside.get() {
        leaks.extend(written_outside(watched));
    }
    if let Some(root) = &target.state_dir {
        let logs = root.join(berth_backend_api::LOGS_DIR);
        walk(root, &mut |path| {
            if !path.starts_with(&logs) && path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains(needle))
            {
                leaks.push(format!("file {}", path.display()));
            }
        });
    }
    for process in berth_backend_support::proc::processes() {
        let args: Vec<String> = process.cmdline.iter().map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let cmdline = args.join(" ");
        if cmdline.contains(needle) {
            leaks.push(format!("process {} ({})", process.pid, cmdline.trim()));
        }
    }
    for mount in berth_backend_support::mounts::mountinfo() {
        let point = mount.point.to_string_lossy();
        let named = [&*point, &*mount.root.to_string_lossy(), &mount.source, &mount.super_options];
        if named.iter().any(|field| field.contains(needle)) {
            leaks.push(format!("mount {point}"));
        }
    }
    leaks
}

/// Visits everything below `dir` on `dir`'s own filesystem (a job's mounted
/// root, /proc or /dev inside the state directory are not entered).
pub(super) fn walk(dir: &Path, visit: &mut dyn FnMut(&Path)) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(dir) else { return };
    walk_dev(dir, meta.dev(), visit);
}

fn walk_dev(dir: &Path, dev: u64, visit: &mut dyn FnMut(&Path)) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        visit(&path);
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if meta.is_dir() && meta.dev() == dev {
            walk_dev(&path, dev, visit);
        }
    }
}

/// The contents of `path` if it is a regular file of at most 4 MiB.
pub(super) fn read_small_file(path: &Path) -> Option<Vec<u8>> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    (meta.is_file() && meta.len() <= 4 << 20).then(|| std::fs::read(path).ok()).flatten()
}

pub(super) fn expect_exit(result: &HookResult, want: &Exit, what: &str) -> CheckOutcome {
    if &result.exit != want {
        return Err(Finding::Fail(format!(
            "{what}: expected a {want}, got a {} ({})\n{}",
            result.exit,
            result.status.map_or_else(|| "killed".to_owned(), |s| format!("exit status {s}")),
            tail(&result.output())
        )));
    }
    Ok(())
}
