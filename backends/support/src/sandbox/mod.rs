//! The sandbox of the chroot and bwrap backends: a job root of its own on
//! the host, entered anew by every stage. The two backends differ only in
//! how a stage enters it ([`enter`] for chroot, bubblewrap's flags for bwrap).
//!
//! What [`Sandbox::prepare`] makes, under the job's state directory:
//!
//! - `layer/`: the job's writable layer (`upper/`, `work/` of overlayfs, or
//!   `root/` with `layer = "copy"`), on a sparse ext4 filesystem of
//!   `disk_max` ([`crate::diskfs`]): `/tmp` is part of it, so what a job
//!   writes anywhere is bounded;
//! - `lower/`: the image, mounted idmapped ([`crate::userns`]): its
//!   root-owned files appear owned by the job's root, a host uid range of
//!   the job's own;
//! - `root/`: the job's root (the overlay, `nodev`);
//! - `cache/`: the project's cache directory, idmapped the same way,
//!   `nosuid,nodev`;
//! - `userns`: the job's user namespace, pinned (a bind mount of it), which
//!   every stage enters;
//! - a cgroup `berth/berth-<job>` with the runner's limits
//!   ([`crate::cgroup`]), which every stage joins before it starts anything.
//!
//! A stage is root in the job and a uid of the job's range on the host, with
//! the capabilities a build needs ([`KEEP_CAPS`]), `no_new_privs`, and the
//! system calls container runtimes block refused ([`seccomp`]).
//! [`Sandbox::cleanup`] kills the cgroup (nothing double-forked survives),
//! unmounts everything, removes the layer and releases the range.

pub mod enter;
pub mod maintain;
pub mod seccomp;

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_backend_api::process::{self, Ended};
use berth_backend_api::{
    Cancel, Capabilities, ConfigOutput, Description, Failure, Isolation, JobContext, JobKey, JobState, RunnerInfo,
};
use nix::mount::MsFlags;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::cache::{self, CacheScope};
use crate::cgroup::{self, JobCgroup};
use crate::claims::Claims;
use crate::image::{Image, ImageStore};
use crate::limits::{LimitSettings, Limits};
use crate::rootfs::make_dir;
use crate::settings::{sys, Bind, ImageSettings, ImageSetup};
use crate::userns::{self, Allocator, Range, UserNs};
use crate::{diskfs, mounts, rootfs};

/// Where the job's builds are, as the job sees them.
pub const BUILDS_DIR: &str = "/builds";
/// Where the job's cache is, as the job sees it.
pub const CACHE_DIR: &str = "/cache";
/// Where stage scripts are placed, relative to the job's root.
pub const SCRIPTS_DIR: &str = "run/berth";
/// Where the gitlab-runner binary is bound, relative to the job's root.
pub const GITLAB_RUNNER: &str = "usr/local/bin/gitlab-runner";
/// The PATH of a stage.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The size of a job's `/dev/shm` when `shm_max` is not set (Docker's default).
pub const DEFAULT_SHM_MAX: &str = "64M";
/// The claims of sandbox names.
const NAMES: &str = "sandboxes";
/// Where [`Sandbox::make_view`] puts a job's view.
const VIEWS: &str = "/run/berth-views";

/// The capabilities root in the job keeps (within its user namespace):
/// Docker's default set without `CAP_MKNOD`, enough for package managers
/// and builds.
pub const KEEP_CAPS: &[(u32, &str)] = &[
    (0, "CAP_CHOWN"),
    (1, "CAP_DAC_OVERRIDE"),
    (3, "CAP_FOWNER"),
    (4, "CAP_FSETID"),
    (5, "CAP_KILL"),
    (6, "CAP_SETGID"),
    (7, "CAP_SETUID"),
    (8, "CAP_SETPCAP"),
    (10, "CAP_NET_BIND_SERVICE"),
    (13, "CAP_NET_RAW"),
    (18, "CAP_SYS_CHROOT"),
    (29, "CAP_AUDIT_WRITE"),
    (31, "CAP_SETFCAP"),
];

/// How the job's writable root is made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// overlayfs over the image (instant; the image is never written).
    #[default]
    Overlay,
    /// A full copy of the image (`cp -a --reflink=auto`), where overlayfs is unavailable.
    Copy,
}

/// `[runners.NAME.settings]` of the chroot and bwrap backends.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Settings {
    /// Where the images are (default `/var/lib/berth/images`).
    pub images_dir: Option<PathBuf>,
    /// The image for jobs without `image:`.
    pub default_image: Option<String>,
    /// Globs of image names jobs may use (default: every image).
    #[serde(default)]
    pub allowed_images: Vec<String>,
    /// `overlay` (default) or `copy`.
    #[serde(default)]
    pub layer: Layer,
    /// The host directory behind the job's cache dir (default `<state_dir>/cache/<runner>`).
    pub cache_host_dir: Option<PathBuf>,
    /// `project` (default): a cache directory per project; `runner`: one for all.
    #[serde(default)]
    pub cache_scope: CacheScope,
    /// The gitlab-runner binary to bind in (default: `gitlab-runner` on PATH).
    pub gitlab_runner: Option<PathBuf>,
    /// The user (a name in the image's /etc/passwd) that runs the scripts (default root).
    pub user: Option<String>,
    /// A network namespace with only loopback for every stage (default:
    /// the host's network, shared).
    #[serde(default)]
    pub private_network: bool,
    /// Extra bind mounts (read-only unless `writable`).
    #[serde(default)]
    pub bind: Vec<Bind>,
    /// The job's memory limit, systemd syntax (`4G`, `50%`, `infinity`; default 50%).
    pub memory_max: Option<String>,
    /// The job's CPU quota (`200%` = two CPUs).
    pub cpu_quota: Option<String>,
    /// The job's CPU weight (1-10000).
    pub cpu_weight: Option<u32>,
    /// The job's task (process and thread) limit (default 4096).
    pub tasks_max: Option<u32>,
    /// What a job can write to disk, `/tmp` included (default 20G; `infinity`: unbounded).
    pub disk_max: Option<String>,
    /// The size of the job's `/dev/shm` (default 64M).
    pub shm_max: Option<String>,
    /// Root in the job is an unprivileged host uid range of its own (default true).
    pub private_users: Option<bool>,
    /// Run root jobs even where root in the job would be root of the host
    /// (`private_users = false`, or a host without user namespaces, idmapped
    /// mounts or cgroups): every such job's log says so. Default false: refused.
    #[serde(default)]
    pub allow_host_root: bool,
}

impl Settings {
    fn limits(&self) -> LimitSettings<'_> {
        LimitSettings {
            memory_max: self.memory_max.as_deref(),
            cpu_quota: self.cpu_quota.as_deref(),
            cpu_weight: self.cpu_weight,
            tasks_max: self.tasks_max,
            disk_max: self.disk_max.as_deref(),
        }
    }
}

/// What prepare made (`sandbox.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// The image's name.
    pub image: String,
    /// The uid of the scripts' user, in the job.
    pub uid: u32,
    /// Its gid.
    pub gid: u32,
    /// Its home directory.
    pub home: String,
    /// The host directory of the job's cache.
    pub cache: PathBuf,
    /// The job's host uid range, unless the job runs as host root.
    pub users: Option<Range>,
    /// The job's cgroup (`berth/<name>`), if the host has cgroups berth can use.
    pub cgroup: Option<String>,
    /// How the root was made.
    pub layer: Layer,
}

impl Record {
    /// The host uid and gid of the scripts' user.
    pub fn host_ids(&self) -> (u32, u32) {
        match self.users {
            Some(range) => (range.base + self.uid, range.base + self.gid),
            None => (self.uid, self.gid),
        }
    }
}

/// The sandbox of one runner, shared by its backend's hooks.
#[derive(Debug)]
pub struct Sandbox {
    kind: &'static str,
    settings: Settings,
    runner: RunnerInfo,
    images: ImageStore,
    cache_host_dir: PathBuf,
    gitlab_runner: Option<PathBuf>,
    limits: Limits,
    shm: u64,
}

/// The file of the job's [`Record`] in its state directory.
pub const RECORD: &str = "sandbox.json";

/// The paths of a job's sandbox under its state directory.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The writable layer's filesystem.
    pub layer: PathBuf,
    /// The image, idmapped.
    pub lower: PathBuf,
    /// The job's root.
    pub root: PathBuf,
    /// The project's cache, idmapped.
    pub cache: PathBuf,
    /// The pinned user namespace.
    pub userns: PathBuf,
}

impl Paths {
    /// The paths under `state`.
    pub fn of(state: &JobState) -> Paths {
        let dir = state.dir();
        Paths {
            layer: dir.join("layer"),
            lower: dir.join("lower"),
            root: dir.join("root"),
            cache: dir.join("cache"),
            userns: dir.join("userns"),
        }
    }
}

/// The name of a job's cgroup (and hostname).
pub fn sandbox_name(key: &JobKey) -> String {
    format!("berth-{key}")
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> Result<(), Failure> {
    match owner {
        Some((uid, gid)) => std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .map_err(sys(format!("failed to give {} to the job", path.display()))),
        None => Ok(()),
    }
}

/// The uid, gid and home of `user` in the image's /etc/passwd.
fn lookup_user(root: &Path, user: &str) -> Result<(u32, u32, String), Failure> {
    let passwd = fs::read_to_string(root.join("etc/passwd")).map_err(sys("failed to read the image's /etc/passwd"))?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && f[0] == user)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?, f[5].to_owned())))
        .filter(|(uid, gid, _)| *uid < userns::RANGE_SIZE && *gid < userns::RANGE_SIZE)
        .ok_or_else(|| {
            Failure::system(format!(
                "settings.user: there is no user {user:?} (uid below 65536) in the image's /etc/passwd"
            ))
        })
}

/// Whether this host lets berth create user namespaces.
fn user_namespaces_enabled() -> bool {
    fs::read_to_string("/proc/sys/user/max_user_namespaces").is_ok_and(|n| n.trim() != "0")
}

impl Sandbox {
    /// The sandbox of a runner whose backend is `kind` (`chroot`, `bwrap`).
    pub fn new(kind: &'static str, settings: Settings, runner: &RunnerInfo) -> Result<Sandbox, Failure> {
        let ImageSetup { images, cache_host_dir, gitlab_runner } = ImageSettings {
            images_dir: settings.images_dir.as_deref(),
            allowed_images: &settings.allowed_images,
            default_image: settings.default_image.as_deref(),
            cache_host_dir: settings.cache_host_dir.as_deref(),
            gitlab_runner: settings.gitlab_runner.as_deref(),
            bind: &settings.bind,
        }
        .resolve(runner)?;
        if let Some(user) = &settings.user {
            if user.is_empty() || !user.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
                return Err(Failure::system(format!("settings.user: {user:?} is not a user name")));
            }
        }
        let limits = Limits::of(&settings.limits()).map_err(|e| Failure::system(format!("settings.{e}")))?;
        let shm_max = settings.shm_max.as_deref().unwrap_or(DEFAULT_SHM_MAX);
        let shm = match crate::limits::parse_bytes(shm_max, || 0) {
            Ok(crate::limits::Amount::Value(size)) => size,
            _ => return Err(Failure::system(format!("settings.shm_max: {shm_max:?} is not a size (like 64M or 1G)"))),
        };
        if !settings.private_users.unwrap_or(true) && !settings.allow_host_root {
            return Err(Failure::system(format!(
                "{kind} runner {}: settings.private_users = false runs jobs as root of the host, which can take it over; set allow_host_root = true as well to confirm",
                runner.name
            )));
        }
        Ok(Sandbox { kind, settings, runner: runner.clone(), images, cache_host_dir, gitlab_runner, limits, shm })
    }

    /// The runner's settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The gitlab-runner binary bound into jobs.
    pub fn gitlab_runner(&self) -> Option<&Path> {
        self.gitlab_runner.as_deref()
    }

    /// The size of a job's `/dev/shm`, in bytes.
    pub fn shm_size(&self) -> u64 {
        self.shm
    }

    fn private_users(&self) -> bool {
        self.settings.private_users.unwrap_or(true)
    }

    /// What `describe` says, for a backend `name` that does `summary`.
    pub fn describe(&self, name: &str, version: &str, summary: &str) -> Description {
        Description::new(name, version, summary).isolation(Isolation::Filesystem).capabilities(
            Capabilities::none()
                .executes_scripts(true)
                .cancel(true)
                .reap(true)
                .images(true)
                .concurrent_jobs(true)
                .contains_root(self.private_users()),
        )
    }

    /// What this host cannot enforce of the runner's protections and
    /// bounds, each with what to do: said at `berth config`, never silently.
    pub fn unhonoured(&self) -> Vec<String> {
        let (kind, runner) = (self.kind, &self.runner.name);
        let mut out = Vec::new();
        let fallback = if self.settings.allow_host_root {
            "jobs run without it (allow_host_root = true)"
        } else {
            "prepare refuses jobs (set allow_host_root = true to run them anyway)"
        };
        if self.private_users() && !user_namespaces_enabled() {
            out.push(format!(
                "{kind} runner {runner}: user namespaces are disabled on this host (sysctl user.max_user_namespaces = 0), so root in a job would be root of the host: {fallback}"
            ));
        }
        for (name, default, reason) in cgroup::unenforceable(&self.settings.limits()) {
            out.push(format!("{kind} runner {runner}: settings.{name}{default} is not enforced: {reason}"));
        }
        out.extend(crate::limits::host_warnings(kind, runner, &self.limits, self.private_users()));
        if !self.settings.private_network {
            info!(runner, "jobs share the host's network (settings.private_network = false)");
        }
        out
    }

    /// The output of `config`, with [`Sandbox::unhonoured`] as warnings.
    pub fn config(&self) -> ConfigOutput {
        let mut output = ConfigOutput::with_dirs(BUILDS_DIR, CACHE_DIR);
        output.warnings = self.unhonoured();
        output
    }

    /// Mounts the job's root (see the module doc) and records it.
    pub fn prepare(&self, job: &JobContext, state: &JobState, cancel: &Cancel) -> Result<Record, Failure> {
        let started = Instant::now();
        let image = self.images.resolve(job.image())?;
        let name = sandbox_name(job.key());
        let claims = Claims::host(NAMES);
        let mut claimed = claims.claim(&name, state.dir()).map_err(sys("failed to record the sandbox's name"))?;
        if let Some(stale) = claims.owner(&name).filter(|owner| !claimed && !owner.exists()) {
            // Left by a job whose state is gone (what `reap` removes): take it over.
            kill_cgroup(&name)?;
            remove_view(&name)?;
            claims.release(&name, &stale).map_err(sys("failed to release a stale sandbox name"))?;
            claimed = claims.claim(&name, state.dir()).map_err(sys("failed to record the sandbox's name"))?;
        }
        if !claimed {
            let owner = claims.owner(&name).map(|o| o.display().to_string()).unwrap_or_default();
            return Err(Failure::system(format!(
                "a sandbox named {name} already exists on this host for {owner}: another berth configuration has a runner named {:?} (runner names must be unique per host)",
                job.key().runner()
            )));
        }
        // An earlier attempt of this job: take all of it down (its range is kept).
        let earlier: Option<Record> = state.load(RECORD).unwrap_or(None);
        tear_down(state)?;
        let (uid, gid, home) = match &self.settings.user {
            Some(user) => lookup_user(&image.root, user)?,
            None => (0, 0, "/root".to_owned()),
        };
        let users = if self.private_users() && (user_namespaces_enabled() || !self.settings.allow_host_root) {
            let allocator = Allocator::host();
            Some(match earlier.as_ref().and_then(|r| r.users) {
                Some(range) if allocator.holds(range, state.dir()) => range,
                _ => allocator.allocate(state.dir()).map_err(sys("failed to allocate a uid range for the job"))?,
            })
        } else {
            if uid == 0 {
                println!("WARNING: this runner runs jobs as root of the host (allow_host_root = true): a job can take over the host");
            }
            None
        };
        let cache = cache::job_cache_dir(&self.cache_host_dir, self.settings.cache_scope, job)?;
        let mut record = Record {
            image: image.name.clone(),
            uid,
            gid,
            home,
            cache: cache.clone(),
            users,
            cgroup: None,
            layer: self.settings.layer,
        };
        let mut group = JobCgroup::of(&name);
        match group.create(&self.limits) {
            Ok(()) => record.cgroup = Some(name.clone()),
            Err(e) if self.settings.allow_host_root => {
                println!("WARNING: the job runs without a cgroup of its own (no memory, task or CPU bounds): {e}")
            }
            Err(e) => {
                return Err(Failure::system(format!(
                    "failed to create the job's cgroup (its memory, task and CPU bounds): {e}; run berth where it can manage cgroups, or set allow_host_root = true to run jobs without them"
                )))
            }
        }
        state.save(RECORD, &record)?;
        if uid != 0 {
            // The scripts' user writes the cache (it stays private: its parent
            // is root's, 0700). The cache is idmapped into the job: its
            // on-disk owner is the user's id in the job.
            std::os::unix::fs::chown(&cache, Some(uid), Some(gid))
                .map_err(sys(format!("failed to give {} to the job's user", cache.display())))?;
        }
        self.build_root(state, &image, &record)?;
        if cancel.is_cancelled() {
            return Err(Failure::Cancelled);
        }
        let how = match self.settings.layer {
            Layer::Overlay => "overlay",
            Layer::Copy => "copied",
        };
        rootfs::announce_prepared(&image, how, started, self.gitlab_runner.is_some());
        info!(job = %job.key(), image = image.name, users = ?users, "{} sandbox ready", self.kind);
        Ok(record)
    }

    fn build_root(&self, state: &JobState, image: &Image, record: &Record) -> Result<(), Failure> {
        let paths = Paths::of(state);
        let users = record.users;
        let job_root = users.map(|r| (r.base, r.base));
        make_dir(&paths.layer, 0o755, job_root)?;
        if let Some(size) = self.limits.disk {
            diskfs::mount_bounded(&state.dir().join("layer.img"), size, &paths.layer, users)
                .map_err(sys("failed to make the job's disk (settings.disk_max)"))?;
        }
        let userns = match users {
            Some(range) => {
                let (owner, _) = record.host_ids();
                let ns =
                    UserNs::new_owned_by(range, owner).map_err(sys("failed to create the job's user namespace"))?;
                fs::File::create(&paths.userns).map_err(sys(format!("failed to create {}", paths.userns.display())))?;
                ns.pin(&paths.userns).map_err(sys("failed to keep the job's user namespace"))?;
                Some(ns)
            }
            None => None,
        };
        let lower = match &userns {
            Some(ns) => {
                make_dir(&paths.lower, 0o755, None)?;
                let attrs = userns::Attrs { read_only: true, nodev: true, nosuid: false };
                userns::mount_idmapped(&image.root, &paths.lower, ns, attrs)
                    .map_err(sys("failed to mount the image for the job (idmapped)"))?;
                paths.lower.clone()
            }
            None => image.root.clone(),
        };
        // The job's writable base: overlayfs's upper layer (before the
        // overlay is mounted), or the copy itself.
        let base = match record.layer {
            Layer::Overlay => {
                let upper = paths.layer.join("upper");
                make_dir(&upper, 0o755, job_root)?;
                make_dir(&paths.layer.join("work"), 0o700, None)?;
                upper
            }
            Layer::Copy => {
                let copy = paths.layer.join("root");
                make_dir(&copy, 0o755, job_root)?;
                // From the idmapped image: the copy's files are the job's ids.
                let out = Command::new("cp")
                    .args(["-a", "--reflink=auto"])
                    .arg(format!("{}/.", lower.display()))
                    .arg(&copy)
                    .stdin(Stdio::null())
                    .output()
                    .map_err(sys("failed to run cp"))?;
                if !out.status.success() {
                    return Err(Failure::system(format!(
                        "failed to copy the image: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                copy
            }
        };
        self.furnish(&base, record)?;
        make_dir(&paths.root, 0o755, None)?;
        match record.layer {
            Layer::Overlay => mounts::mount_overlay_with(
                &lower,
                &base,
                &paths.layer.join("work"),
                &paths.root,
                MsFlags::MS_NODEV,
            )
            .map_err(sys(
                "failed to mount the job's overlay (if overlayfs is unavailable here, set settings.layer = \"copy\")",
            ))?,
            Layer::Copy => mounts::bind(&base, &paths.root, true).map_err(sys("failed to mount the job's root"))?,
        }
        // The cache: the project's directory, private to root on the host,
        // nosuid,nodev, and idmapped so that the job's root owns it.
        make_dir(&paths.cache, 0o700, None)?;
        match &userns {
            Some(ns) => {
                let attrs = userns::Attrs { read_only: false, nodev: true, nosuid: true };
                userns::mount_idmapped(&record.cache, &paths.cache, ns, attrs)
                    .map_err(sys("failed to mount the job's cache (idmapped)"))?
            }
            None => mounts::bind_guarded(&record.cache, &paths.cache, true)
                .map_err(sys("failed to mount the job's cache"))?,
        }
        Ok(())
    }

    /// What every sandbox has, written into the job's fresh writable base:
    /// where builds and stage scripts go (the scripts' user's), name
    /// resolution as on the host.
    fn furnish(&self, base: &Path, record: &Record) -> Result<(), Failure> {
        let job_root = record.users.map(|r| (r.base, r.base));
        let dir =
            |rel: &str| rootfs::real_dir(base, rel).map_err(sys(format!("failed to create /{rel} in the job's root")));
        for rel in ["etc", "tmp", "run"] {
            let path = dir(rel)?;
            if path.symlink_metadata().is_ok_and(|m| m.uid() == 0) {
                chown(&path, job_root)?;
            }
        }
        let tmp = base.join("tmp");
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).map_err(sys("failed to set the mode of /tmp"))?;
        for rel in [BUILDS_DIR.trim_start_matches('/'), SCRIPTS_DIR] {
            let path = dir(rel)?;
            chown(&path, Some(record.host_ids()))?;
        }
        for file in ["etc/resolv.conf", "etc/hosts"] {
            let target = base.join(file);
            // A symbolic link (e.g. to systemd-resolved's stub) would be followed on the host.
            let _ = fs::remove_file(&target);
            match fs::copy(Path::new("/").join(file), &target) {
                Ok(_) => chown(&target, job_root)?,
                Err(e) => warn!("failed to copy /{file} into the job's root: {e}"),
            }
        }
        Ok(())
    }

    /// The job's record, and its root, checked to be mounted: what a stage needs.
    pub fn load(&self, state: &JobState) -> Result<(Record, Paths), Failure> {
        let record: Record = state
            .load(RECORD)?
            .ok_or_else(|| Failure::system("the job's root was never prepared (prepare did not finish)"))?;
        let paths = Paths::of(state);
        if !mounts::mounts_under(&paths.root).iter().any(|point| point == &paths.root) {
            return Err(Failure::system(format!(
                "the job's root {} is not mounted (host rebooted?)",
                paths.root.display()
            )));
        }
        Ok((record, paths))
    }

    /// Everything a stage's entry needs, opened here (before the stage's
    /// process is forked): the script placed in the job's root, the user
    /// namespace, the cgroup to join, the system call filters.
    pub fn stage(&self, state: &JobState, script: &Path) -> Result<Stage, Failure> {
        let (record, paths) = self.load(state)?;
        let name = format!("stage-{}.sh", std::process::id());
        let body = fs::read(script).map_err(sys(format!("failed to read the stage script {}", script.display())))?;
        // The job owns its root: never follow a link it planted.
        let copy = rootfs::place_file(&paths.root, SCRIPTS_DIR, &name, &body)
            .map_err(sys(format!("failed to copy the stage script into {}", paths.root.display())))?;
        // The script holds the job's secrets: only its user reads it.
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o600))
            .map_err(sys("failed to protect the stage script"))?;
        let (uid, gid) = record.host_ids();
        std::os::unix::fs::lchown(&copy, Some(uid), Some(gid))
            .map_err(sys("failed to give the stage script to the job"))?;
        let userns = match record.users {
            Some(_) => Some(UserNs::open(&paths.userns).map_err(sys("failed to open the job's user namespace"))?),
            None => None,
        };
        let (cgroup, join) = match &record.cgroup {
            Some(group) => {
                let group = JobCgroup::of(group);
                let dir = group.stage_dir().map_err(sys("failed to open the job's cgroup"))?;
                let join: enter::Joiner =
                    Box::new(group.stage_joiner().map_err(sys("failed to join the job's cgroup"))?);
                (dir, Some(join))
            }
            None => (None, None),
        };
        let filters =
            seccomp::filters().map_err(|e| Failure::system(format!("failed to build the system call filter: {e}")))?;
        Ok(Stage {
            script: format!("/{SCRIPTS_DIR}/{name}"),
            copy,
            record,
            paths,
            userns,
            cgroup,
            join,
            filters,
            hostname: sandbox_name(state.key()),
        })
    }

    /// Runs a stage's command (its entry set up), and removes the stage's script.
    pub fn run(&self, stage: &Stage, cmd: &mut Command, cancel: &Cancel, what: &str) -> Result<(), Failure> {
        cmd.env_clear().env("PATH", PATH).env("HOME", &stage.record.home).env("LANG", "C.UTF-8").stdin(Stdio::null());
        let _ = std::io::Write::flush(&mut std::io::stdout());
        let ended = process::run(cmd, cancel, Duration::from_secs(2)).map_err(sys(format!("failed to run {what}")))?;
        let _ = fs::remove_file(&stage.copy);
        match ended {
            Ended::Exited(0) => Ok(()),
            Ended::Exited(code) => Err(Failure::script(code)),
            Ended::Cancelled => Err(Failure::Cancelled),
        }
    }

    /// Takes the job's sandbox down and releases its range and name.
    pub fn cleanup(&self, state: &JobState) -> Result<(), Failure> {
        tear_down(state)?;
        Allocator::host().release_all(state.dir()).map_err(sys("failed to release the job's uid range"))?;
        Claims::host(NAMES)
            .release(&sandbox_name(state.key()), state.dir())
            .map_err(sys("failed to release the sandbox's name"))?;
        Ok(())
    }

    /// Sandboxes whose job's state is gone, uid ranges of such jobs, and
    /// image generations no job uses.
    pub fn reap_orphans(&self) -> Vec<String> {
        let jobs = self.runner.state_dir.join("jobs");
        let prefix = format!("berth-{}-", self.runner.name);
        let mut removed = Vec::new();
        let claims = Claims::host(NAMES);
        for (name, owner) in claims.orphans(&prefix, &jobs) {
            let Ok(key) = JobKey::try_from(name["berth-".len()..].to_owned()) else { continue };
            if key.runner() != self.runner.name {
                continue;
            }
            if kill_cgroup(&name).is_ok() && remove_view(&name).is_ok() {
                let _ = claims.release(&name, &owner);
                removed.push(format!("sandbox {name} (its job's state {} is gone)", owner.display()));
            }
        }
        removed.extend(Allocator::host().reclaim(&jobs));
        removed.extend(crate::generations::Images::new(self.images.dir()).prune());
        removed
    }
}

/// Mounts, on the host, what a root entered with [`enter`] needs besides
/// its own `/proc` (whose mount point is made): a read-only `/sys` and a
/// minimal `/dev` (null, zero, full, random, urandom and tty of the host, a
/// new devpts instance, a `shm`-byte `/dev/shm` given to `owner`), at real
/// directories of `root` (never links the image or a job planted).
pub fn mount_system_dirs(root: &Path, shm: u64, owner: Option<Range>) -> io::Result<()> {
    use std::os::unix::fs::symlink;
    let dir = |rel: &str| {
        rootfs::real_dir(root, rel).map_err(|e| io::Error::new(e.kind(), format!("/{rel} in the root: {e}")))
    };
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mounts::mount_fs("sysfs", &dir("sys")?, "sysfs", nodev | MsFlags::MS_RDONLY, None)?;
    let dev = dir("dev")?;
    mounts::mount_fs("tmpfs", &dev, "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("mode=755,size=64k"))?;
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(node);
        fs::File::create(&target)?;
        mounts::bind(&Path::new("/dev").join(node), &target, true)?;
    }
    let pts = dir("dev/pts")?;
    let pts_options = "newinstance,ptmxmode=0666,mode=620";
    mounts::mount_fs("devpts", &pts, "devpts", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some(pts_options))?;
    let shm_dir = dir("dev/shm")?;
    let size = format!("mode=1777,size={shm}");
    mounts::mount_fs("tmpfs", &shm_dir, "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some(&size))?;
    if let Some(range) = owner {
        userns::give(&shm_dir, range)?;
    }
    let links = [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ];
    for (link, to) in links {
        symlink(to, dev.join(link))?;
    }
    dir("proc")?;
    Ok(())
}

/// The view of the job named `name` (see [`Sandbox::make_view`]).
pub fn view_dir(name: &str) -> PathBuf {
    Path::new(VIEWS).join(name)
}

impl Sandbox {
    /// A view of the job's sandbox for a launcher that runs as the job's
    /// (unprivileged) host user, such as bubblewrap, which resolves the
    /// paths it binds with its own permissions: `/run/berth-views/<name>` (the directory 0711),
    /// the job user's alone (0700), with the job's root (`root`), cache
    /// (`cache`), the gitlab-runner binary (`gitlab-runner`) and the extra
    /// binds (`bind-0`, `bind-1`, ...) bound in. Removed by cleanup.
    pub fn make_view(&self, state: &JobState, record: &Record) -> Result<PathBuf, Failure> {
        let paths = Paths::of(state);
        let views = Path::new(VIEWS);
        fs::create_dir_all(views).map_err(sys(format!("failed to create {VIEWS}")))?;
        fs::set_permissions(views, fs::Permissions::from_mode(0o711))
            .map_err(sys(format!("failed to set the mode of {VIEWS}")))?;
        let view = view_dir(&sandbox_name(state.key()));
        make_dir(&view, 0o700, Some(record.host_ids()))?;
        let mut binds: Vec<(PathBuf, PathBuf, bool)> =
            vec![(paths.root.clone(), view.join("root"), true), (paths.cache.clone(), view.join("cache"), true)];
        if let Some(gitlab_runner) = &self.gitlab_runner {
            binds.push((gitlab_runner.clone(), view.join("gitlab-runner"), false));
        }
        for (i, bind) in self.settings.bind.iter().enumerate() {
            binds.push((bind.source.clone(), view.join(format!("bind-{i}")), bind.writable));
        }
        for (source, target, writable) in binds {
            if source.is_dir() {
                make_dir(&target, 0o700, None)?;
            } else {
                fs::File::create(&target).map_err(sys(format!("failed to create {}", target.display())))?;
            }
            mounts::bind(&source, &target, writable)
                .map_err(sys(format!("failed to bind {} into the job's view", source.display())))?;
        }
        Ok(view)
    }
}

/// Unmounts and removes the view of the job named `name`, if any.
fn remove_view(name: &str) -> Result<(), Failure> {
    let view = view_dir(name);
    if !view.exists() {
        return Ok(());
    }
    mounts::unmount_all(&view).map_err(sys(format!("failed to unmount {}", view.display())))?;
    berth_backend_api::remove_tree(&view).map_err(sys(format!("failed to remove {}", view.display())))
}

/// Kills everything in the job's cgroup and removes it.
fn kill_cgroup(name: &str) -> Result<(), Failure> {
    let group = JobCgroup::of(name);
    let pids = group.pids();
    if !pids.is_empty() && !group.kill() {
        for pid in &pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    if !crate::proc::wait_gone(&pids, Duration::from_secs(10)) {
        return Err(Failure::system(format!("the processes of sandbox {name} ({pids:?}) did not exit after SIGKILL")));
    }
    group.remove().map_err(sys(format!("failed to remove the cgroup of sandbox {name}")))
}

/// Kills everything of the job (its cgroup, and whatever still runs on its
/// root), unmounts everything under its state directory and removes the
/// layer. Idempotent.
fn tear_down(state: &JobState) -> Result<(), Failure> {
    let paths = Paths::of(state);
    kill_cgroup(&sandbox_name(state.key()))?;
    rootfs::tear_down(&paths.root)?;
    remove_view(&sandbox_name(state.key()))?;
    let report = mounts::unmount_all(state.dir())
        .map_err(sys(format!("failed to unmount the job's filesystems in {}", state.dir().display())))?;
    for point in &report.detached {
        warn!("{} was busy; detached it (lazy unmount)", point.display());
    }
    for dir in [&paths.layer, &paths.root, &paths.lower, &paths.cache] {
        berth_backend_api::remove_tree(dir).map_err(sys(format!("failed to remove {}", dir.display())))?;
    }
    let _ = fs::remove_file(&paths.userns);
    Ok(())
}

/// What a stage's entry needs (see [`Sandbox::stage`]).
pub struct Stage {
    /// The script's path in the job.
    pub script: String,
    /// The script's copy on the host.
    copy: PathBuf,
    /// The job's record.
    pub record: Record,
    /// The job's paths.
    pub paths: Paths,
    /// The job's user namespace, unless it runs as host root.
    pub userns: Option<UserNs>,
    /// The job's cgroup2 directory for a stage's processes, which they start in.
    pub cgroup: Option<std::os::fd::OwnedFd>,
    /// Joins the job's cgroup where there is no such directory (cgroup v1)
    /// or the kernel cannot start a process in it (no `clone3`).
    pub join: Option<enter::Joiner>,
    /// The system call filters.
    pub filters: Vec<seccomp::Program>,
    /// The job's hostname.
    pub hostname: String,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage").field("script", &self.script).field("record", &self.record).finish_non_exhaustive()
    }
}

impl Stage {
    /// The user namespace's descriptor, if any.
    pub fn userns_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.userns.as_ref().map(|ns| ns.fd())
    }
}
