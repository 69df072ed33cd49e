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
mod prepare;
pub mod seccomp;
mod stage;
mod teardown;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_backend_api::{Capabilities, ConfigOutput, Description, Failure, Isolation, JobKey, JobState, RunnerInfo};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::cache::CacheScope;
use crate::cgroup;
use crate::host::{Host, System};
use crate::image::ImageStore;
use crate::limits::{LimitSettings, Limits};
use crate::settings::{Bind, ImageSettings, ImageSetup};
use crate::userns::Range;

pub use prepare::mount_system_dirs;
pub use stage::Stage;
pub use teardown::view_dir;

/// Where the job's builds are, as the job sees them.
pub const BUILDS_DIR: &str = "/builds";
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
    pub tasks_max: Option<crate::limits::TasksMax>,
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
            tasks_max: self.tasks_max.as_ref(),
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
    /// Where jobs see their cache (the runner's `cache_dir`, else `/cache`).
    cache_dir: PathBuf,
    gitlab_runner: Option<PathBuf>,
    limits: Limits,
    shm: u64,
    host: Arc<dyn Host>,
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
impl Sandbox {
    /// The sandbox of a runner whose backend is `kind` (`chroot`, `bwrap`).
    pub fn new(kind: &'static str, settings: Settings, runner: &RunnerInfo) -> Result<Sandbox, Failure> {
        let ImageSetup { images, cache_host_dir, gitlab_runner, cache_dir } = ImageSettings {
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
        Ok(Sandbox {
            kind,
            settings,
            runner: runner.clone(),
            images,
            cache_host_dir,
            cache_dir,
            gitlab_runner,
            limits,
            shm,
            host: Arc::new(System),
        })
    }

    /// The same sandbox, its host operations done by `host` (a
    /// [`crate::host::Recorder`] in tests) instead of this host.
    pub fn with_host(mut self, host: Arc<dyn Host>) -> Sandbox {
        self.host = host;
        self
    }

    /// Where jobs see their cache: the runner's `cache_dir`, else `/cache`.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// What performs the sandbox's host operations.
    pub fn host(&self) -> &Arc<dyn Host> {
        &self.host
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
        if self.private_users() && !prepare::user_namespaces_enabled() {
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

    /// What the runner's jobs need of the host ([`berth_backend_api::Backend::check`]),
    /// besides the backend's own tools.
    pub fn check(&self) -> Vec<berth_backend_api::Finding> {
        let mut out = crate::check::runner(&crate::check::Runner {
            name: &self.runner.name,
            images: &self.images,
            state_dir: &self.runner.state_dir,
            limits: &self.limits,
            limit_settings: &self.settings.limits(),
            private_users: self.private_users(),
            gitlab_runner: self.gitlab_runner.as_deref(),
        });
        if self.settings.allow_host_root {
            // Jobs run anyway, as root of the host: weaker, not broken.
            for finding in out.iter_mut().filter(|f| f.check == "user namespaces" || f.check == "idmapped mounts") {
                if finding.level == berth_backend_api::Level::Error {
                    finding.level = berth_backend_api::Level::Warning;
                    finding.detail.push_str(": jobs run as root of the host (allow_host_root = true)");
                }
            }
        }
        out
    }

    /// The output of `config`, with [`Sandbox::unhonoured`] as warnings.
    pub fn config(&self) -> ConfigOutput {
        let mut output = ConfigOutput::with_dirs(BUILDS_DIR, self.cache_dir.to_string_lossy());
        output.warnings = self.unhonoured();
        output
    }
}

#[cfg(test)]
mod tests;
