//! A cgroup of its own for each job: the nspawn backend's containers in
//! standalone mode, and every job of the chroot and bwrap sandboxes
//! (`berth/<name>` in every hierarchy, `<name>` being the job's machine or
//! sandbox name).
//!
//! With `--keep-unit` nspawn creates its `payload` and `supervisor` cgroups
//! inside the cgroup it was started in. Started from the same cgroup, two
//! containers would share `payload/system.slice/...`: each container's
//! systemd would manage the other's processes. So before nspawn starts, it
//! joins `berth/<machine>` in every hierarchy systemd uses (the cgroup2
//! hierarchy, and on hybrid hosts the named `systemd` one too). Teardown
//! kills the whole cgroup and removes its directories, deepest first.
//!
//! The runner's resource limits are written into that cgroup before nspawn
//! joins it, so that they hold from the container's first process on: into
//! `memory.max`, `pids.max`, `cpu.max` and `cpu.weight` on a cgroup2 host
//! (berth enables the controllers for its `berth` subtree), or on a v1 or
//! hybrid host into `berth/<machine>` of the `memory`, `pids` and `cpu`
//! hierarchies, which the process then joins too.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::unistd::AccessFlags;

mod fork;
pub mod memory;
mod stage;
pub(crate) use fork::fork_into;
pub use stage::{Joiner, StageCgroup};

use crate::host::{Host, System};
use crate::userns::{self, Range};

use crate::limits::{quota_us, weight_to_shares, Amount, LimitSettings, Limits, CPU_PERIOD_US};

/// A cgroup controller berth can set a limit with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    /// `memory_max`.
    Memory,
    /// `tasks_max`.
    Pids,
    /// `cpu_quota` and `cpu_weight`.
    Cpu,
}

pub(crate) const CONTROLLERS: [Controller; 3] = [Controller::Memory, Controller::Pids, Controller::Cpu];

impl Controller {
    /// The controller's name in cgroupfs.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
        }
    }

    /// Whether berth can set limits with this controller on this host.
    pub fn available(self) -> bool {
        self.unavailable_because().is_none()
    }

    /// Why berth cannot set limits with this controller here, with what to do.
    pub fn unavailable_because(self) -> Option<String> {
        self.unavailable_in(&System.cgroup_root())
    }

    /// Why berth cannot set limits with this controller in the cgroup
    /// hierarchies under `root`, with what to do.
    pub fn unavailable_in(self, root: &Path) -> Option<String> {
        let name = self.name();
        let shown = root.display();
        if !unified(root) {
            return (!writable(&root.join(name)))
                .then(|| format!("this host has no writable cgroup v1 {name} hierarchy at {shown}/{name}"));
        }
        let listed = |file: &str| {
            std::fs::read_to_string(root.join(file)).is_ok_and(|c| c.split_whitespace().any(|n| n == name))
        };
        if !listed("cgroup.controllers") {
            return Some(format!("the {name} controller is not in {shown}/cgroup.controllers"));
        }
        // berth enables it for its `berth` subtree. The kernel allows that at
        // the true root, and below it (a cgroup namespace, as in a container)
        // only while the namespace's root holds no process itself.
        let namespace_root_busy = root.join("cgroup.type").exists()
            && std::fs::read_to_string(root.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty());
        if namespace_root_busy && !listed("cgroup.subtree_control") {
            return Some(format!(
                "{shown} is a cgroup namespace (berth runs in a container) where the {name} controller is not enabled for child cgroups; \
                 move the processes of {shown} into a child cgroup and run `echo +{name} > {shown}/cgroup.subtree_control`"
            ));
        }
        None
    }
}

fn writable(dir: &Path) -> bool {
    dir.join("cgroup.procs").exists() && nix::unistd::access(dir, AccessFlags::W_OK).is_ok()
}

/// Whether the host has only the cgroup2 hierarchy.
pub(crate) fn unified(root: &Path) -> bool {
    root.join("cgroup.controllers").exists()
}

/// The hierarchies a container's processes join, whatever its limits.
fn hierarchies(root: &Path) -> Vec<PathBuf> {
    if unified(root) {
        return vec![root.to_owned()];
    }
    ["systemd", "unified"].iter().map(|h| root.join(h)).filter(|h| h.join("cgroup.procs").exists()).collect()
}

/// Every hierarchy a container may have a cgroup in: those above, and on a
/// v1 or hybrid host the mounted hierarchies of the limits' controllers.
fn all_hierarchies(root: &Path) -> Vec<PathBuf> {
    let mut all = hierarchies(root);
    if !unified(root) {
        all.extend(CONTROLLERS.iter().map(|c| root.join(c.name())).filter(|h| h.join("cgroup.procs").exists()));
    }
    all
}

/// The per-job cgroup directories of one container.
#[derive(Debug, Clone)]
pub struct JobCgroup {
    host: Arc<dyn Host>,
    machine: String,
    /// Every directory the container may have, in every hierarchy (what teardown looks at).
    dirs: Vec<PathBuf>,
    /// Those a new process joins: made by [`JobCgroup::create`].
    joined: Vec<PathBuf>,
}

impl std::fmt::Display for JobCgroup {
    /// The directories a new process joins.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dirs: Vec<String> = self.joined.iter().map(|d| d.display().to_string()).collect();
        f.write_str(&dirs.join(", "))
    }
}

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

impl JobCgroup {
    /// The cgroup of `machine` on this host (nothing is created yet).
    pub fn of(machine: &str) -> JobCgroup {
        JobCgroup::on(Arc::new(System), machine)
    }

    /// The cgroup of `machine` on `host` (nothing is created yet).
    pub fn on(host: Arc<dyn Host>, machine: &str) -> JobCgroup {
        let dirs = all_hierarchies(&host.cgroup_root()).into_iter().map(|h| h.join("berth").join(machine)).collect();
        JobCgroup { host, machine: machine.to_owned(), dirs, joined: Vec::new() }
    }

    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        self.host.write(path, value)
    }

    /// Machines with a cgroup under `berth/` in any hierarchy, named with
    /// `prefix` and at least `age` old.
    pub fn machines(prefix: &str, age: Duration) -> Vec<String> {
        let mut machines: Vec<String> = all_hierarchies(&System.cgroup_root())
            .iter()
            .filter_map(|top| std::fs::read_dir(top.join("berth")).ok())
            .flat_map(|dir| dir.flatten())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter(|e| e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|a| a >= age)))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| name.starts_with(prefix))
            .collect();
        machines.sort();
        machines.dedup();
        machines
    }

    /// Creates the directories and sets `limits` in them; a limit whose
    /// controller the host lacks is skipped (`berth config` says so).
    pub fn create(&mut self, limits: &Limits) -> io::Result<()> {
        let root = &self.host.cgroup_root();
        let unified = unified(root);
        let mut joined: Vec<PathBuf> =
            hierarchies(root).into_iter().map(|h| h.join("berth").join(&self.machine)).collect();
        if joined.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no writable cgroup hierarchy under {}", root.display()),
            ));
        }
        let wanted: Vec<Controller> = [
            (Controller::Memory, limits.memory.is_some()),
            (Controller::Pids, limits.tasks.is_some()),
            (Controller::Cpu, limits.cpu_quota.is_some() || limits.cpu_weight.is_some()),
        ]
        .into_iter()
        .filter(|(c, wanted)| *wanted && c.unavailable_in(root).is_none())
        .map(|(c, _)| c)
        .collect();
        // What a cleanup that failed left of this container's cgroup would
        // carry over (child cgroups, enabled controllers): start afresh.
        if self.dirs.iter().any(|d| d.exists()) && self.pids().is_empty() {
            self.remove()?;
        }
        // Where each controller's files are: the job's one cgroup2 directory,
        // or its directory in the controller's v1 hierarchy.
        let dir_of = |controller: Controller| {
            let hierarchy = if unified { root.to_owned() } else { root.join(controller.name()) };
            hierarchy.join("berth").join(&self.machine)
        };
        if unified && !wanted.is_empty() {
            // Controllers must be enabled on every level above the job's cgroup.
            let berth = root.join("berth");
            self.host.mkdir(&berth)?;
            for parent in [root, berth.as_path()] {
                let enabled = std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
                let enable: Vec<String> = wanted
                    .iter()
                    .filter(|c| !enabled.split_whitespace().any(|n| n == c.name()))
                    .map(|c| format!("+{}", c.name()))
                    .collect();
                if !enable.is_empty() {
                    self.write(&parent.join("cgroup.subtree_control"), &enable.join(" "))?;
                }
            }
        } else {
            joined.extend(wanted.iter().map(|c| dir_of(*c)));
        }
        for dir in &joined {
            self.host.mkdir(dir)?;
        }
        self.joined = joined;
        for controller in wanted {
            let dir = dir_of(controller);
            match controller {
                Controller::Memory => {
                    let (file, max) = if unified { ("memory.max", "max") } else { ("memory.limit_in_bytes", "-1") };
                    self.write(&dir.join(file), &amount(limits.memory, max))?;
                }
                Controller::Pids => self.write(&dir.join("pids.max"), &amount(limits.tasks, "max"))?,
                Controller::Cpu if unified => {
                    if let Some(quota) = limits.cpu_quota {
                        self.write(&dir.join("cpu.max"), &format!("{} {CPU_PERIOD_US}", quota_us(quota)))?;
                    }
                    if let Some(weight) = limits.cpu_weight {
                        self.write(&dir.join("cpu.weight"), &weight.to_string())?;
                    }
                }
                Controller::Cpu => {
                    if let Some(quota) = limits.cpu_quota {
                        self.write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                        self.write(&dir.join("cpu.cfs_quota_us"), &quota_us(quota).to_string())?;
                    }
                    if let Some(weight) = limits.cpu_weight {
                        self.write(&dir.join("cpu.shares"), &weight_to_shares(weight).to_string())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Gives the container's cgroup to the job's root (`range`), the way
    /// systemd delegates one: the directory and its `cgroup.procs`,
    /// `cgroup.subtree_control` and `cgroup.threads`, in the hierarchies the
    /// container's systemd manages. Its limits stay root's.
    pub fn give(&self, range: Range) -> io::Result<()> {
        for dir in hierarchies(&self.host.cgroup_root()).into_iter().map(|h| h.join("berth").join(&self.machine)) {
            if !dir.is_dir() {
                continue;
            }
            for path in
                [dir.clone(), dir.join("cgroup.procs"), dir.join("cgroup.subtree_control"), dir.join("cgroup.threads")]
            {
                if path.exists() {
                    userns::give(&path, range)?;
                }
            }
        }
        Ok(())
    }

    /// A function for `pre_exec` that moves the calling process into a leaf
    /// `berth-stage` of the container's cgroup (made here, root's), in every
    /// hierarchy: what a stage's host-side launcher starts counts against
    /// the container's limits and dies with the container.
    pub fn stage_joiner(&self) -> io::Result<impl FnMut() -> io::Result<()> + Send + Sync + 'static> {
        let dirs: Vec<PathBuf> = self.dirs.iter().filter(|d| d.is_dir()).map(|d| d.join("berth-stage")).collect();
        if dirs.is_empty() {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("container {} has no cgroup", self.machine)));
        }
        for dir in &dirs {
            self.host.mkdir(dir)?;
        }
        joiner_of(&dirs)
    }

    /// The leaf `berth-stage` of the cgroup (made here, root's), opened for
    /// `clone3(CLONE_INTO_CGROUP)`: a new process starts in it, without the
    /// costly migration of a running one (several milliseconds, an RCU
    /// grace period). `None` on a v1 or hybrid host, where
    /// [`JobCgroup::stage_joiner`] does it.
    pub fn stage_dir(&self) -> io::Result<Option<std::os::fd::OwnedFd>> {
        if !unified(&self.host.cgroup_root()) {
            return Ok(None);
        }
        let Some(top) = self.dirs.first().filter(|d| d.is_dir()) else {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("container {} has no cgroup", self.machine)));
        };
        let dir = top.join("berth-stage");
        self.host.mkdir(&dir)?;
        let file = std::fs::File::open(&dir).map_err(|e| with_path(e, &dir))?;
        Ok(Some(file.into()))
    }

    /// A function for `pre_exec` that moves the calling process into the cgroup.
    /// It allocates nothing and calls only open(2), write(2) and close(2).
    pub fn joiner(&self) -> io::Result<impl FnMut() -> io::Result<()> + Send + Sync + 'static> {
        joiner_of(&self.joined)
    }
}

/// A function for `pre_exec` that moves the calling process into `dirs`.
/// It allocates nothing and calls only open(2), write(2) and close(2).
pub(crate) fn joiner_of(dirs: &[PathBuf]) -> io::Result<impl FnMut() -> io::Result<()> + Send + Sync + 'static> {
    {
        let paths: Vec<CString> = dirs
            .iter()
            .map(|d| CString::new(d.join("cgroup.procs").as_os_str().as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(move || {
            for path in &paths {
                // SAFETY: `path` is a valid NUL-terminated string; open, write
                // and close are async-signal-safe, as pre_exec requires.
                unsafe {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if written != 1 {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
            Ok(())
        })
    }
}

impl JobCgroup {
    /// Pids of every process in the cgroup, in any hierarchy.
    pub fn pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for dir in &self.dirs {
            walk_dirs(dir, &mut |d| {
                if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
                    pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
                }
            });
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Kills everything in the cgroup at once (`cgroup.kill`), where the kernel has it.
    pub fn kill(&self) -> bool {
        self.dirs.iter().any(|dir| self.host.write(&dir.join("cgroup.kill"), "1").is_ok())
    }

    /// Removes the directories, deepest first; those already gone are fine.
    pub fn remove(&self) -> io::Result<()> {
        for dir in &self.dirs {
            let mut all = Vec::new();
            walk_dirs(dir, &mut |d| all.push(d.to_owned()));
            for d in all.iter().rev() {
                match self.host.rmdir(d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", d.display()))),
                }
            }
        }
        Ok(())
    }
}

/// Visits `dir` and its subdirectories, parents before children.
fn walk_dirs(dir: &Path, visit: &mut dyn FnMut(&Path)) {
    if !dir.is_dir() {
        return;
    }
    visit(dir);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk_dirs(&entry.path(), visit);
            }
        }
    }
}

/// What of a runner's limit settings this host cannot enforce in a job's
/// cgroup: each as `(setting, default note, reason with what to do)`.
pub fn unenforceable(settings: &LimitSettings<'_>) -> Vec<(&'static str, &'static str, String)> {
    let set = |name: &str| match name {
        "memory_max" | "tasks_max" => true,
        "cpu_quota" => settings.cpu_quota.is_some(),
        _ => settings.cpu_weight.is_some(),
    };
    let mut out = Vec::new();
    for (name, controller) in [
        ("memory_max", Controller::Memory),
        ("cpu_quota", Controller::Cpu),
        ("cpu_weight", Controller::Cpu),
        ("tasks_max", Controller::Pids),
    ] {
        if !set(name) {
            continue;
        }
        if let Some(reason) = controller.unavailable_because() {
            let default = match name {
                "memory_max" if settings.memory_max.is_none() => " (default 50%)",
                "tasks_max" if settings.tasks_max.is_none() => " (default 4096)",
                _ => "",
            };
            out.push((name, default, reason));
        }
    }
    out
}

fn amount(amount: Option<Amount>, max: &str) -> String {
    match amount {
        Some(Amount::Value(n)) => n.to_string(),
        Some(Amount::Max) | None => max.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{Call, Recorder};

    fn limits() -> Limits {
        Limits {
            memory: Some(Amount::Value(1 << 30)),
            tasks: Some(Amount::Value(512)),
            cpu_quota: Some(15_000),
            cpu_weight: Some(200),
            disk: None,
        }
    }

    fn touch(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn write(path: &Path, value: &str) -> Call {
        Call::Write { path: path.to_owned(), value: value.to_owned() }
    }

    #[test]
    fn cgroup2_limits_are_written_before_anything_joins() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        touch(&root.join("cgroup.controllers"), "cpuset cpu io memory pids\n");
        touch(&root.join("cgroup.procs"), "");
        touch(&root.join("cgroup.subtree_control"), "memory\n");
        let host = Arc::new(Recorder::new().with_cgroup_root(root));
        let mut group = JobCgroup::on(host.clone(), "berth-r-7");
        group.create(&limits()).unwrap();
        let job = root.join("berth/berth-r-7");
        assert_eq!(
            host.calls(),
            vec![
                Call::Mkdir(root.join("berth")),
                write(&root.join("cgroup.subtree_control"), "+pids +cpu"),
                write(&root.join("berth/cgroup.subtree_control"), "+memory +pids +cpu"),
                Call::Mkdir(job.clone()),
                write(&job.join("memory.max"), "1073741824"),
                write(&job.join("pids.max"), "512"),
                write(&job.join("cpu.max"), "150000 100000"),
                write(&job.join("cpu.weight"), "200"),
            ]
        );
        assert_eq!(group.to_string(), job.display().to_string());
        host.take();
        assert!(group.kill());
        group.remove().unwrap();
        assert_eq!(host.calls(), vec![write(&job.join("cgroup.kill"), "1")], "nothing to remove: nothing was made");
    }

    #[test]
    fn cgroup_v1_limits_go_to_each_controllers_hierarchy() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        for hierarchy in ["systemd", "memory", "pids", "cpu"] {
            touch(&root.join(hierarchy).join("cgroup.procs"), "");
        }
        let host = Arc::new(Recorder::new().with_cgroup_root(root));
        let mut group = JobCgroup::on(host.clone(), "berth-r-8");
        group.create(&Limits { memory: Some(Amount::Max), ..limits() }).unwrap();
        let dir = |h: &str| root.join(h).join("berth/berth-r-8");
        assert_eq!(
            host.calls(),
            vec![
                Call::Mkdir(dir("systemd")),
                Call::Mkdir(dir("memory")),
                Call::Mkdir(dir("pids")),
                Call::Mkdir(dir("cpu")),
                write(&dir("memory").join("memory.limit_in_bytes"), "-1"),
                write(&dir("pids").join("pids.max"), "512"),
                write(&dir("cpu").join("cpu.cfs_period_us"), "100000"),
                write(&dir("cpu").join("cpu.cfs_quota_us"), "150000"),
                write(&dir("cpu").join("cpu.shares"), "2048"),
            ]
        );
    }

    #[test]
    fn no_hierarchy_no_cgroup() {
        let host = Arc::new(Recorder::new());
        let error = JobCgroup::on(host.clone(), "berth-r-9").create(&limits()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert!(host.calls().is_empty());
    }
}
