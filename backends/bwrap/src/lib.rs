//! berth's bubblewrap backend: every stage of a job runs under `bwrap` on a
//! disposable copy-on-write root of an image of the same image store the
//! nspawn and chroot backends use, with no init system inside.
//!
//! bubblewrap 0.8 (Debian 12) has no overlay option, so prepare mounts the
//! job's writable root itself, on the host, under the job's state directory
//! (an overlay of the image: `upper`, `work`, `root`), creates `/builds` and
//! `/run/berth` in it and copies the host's `/etc/resolv.conf` and
//! `/etc/hosts` in. Each stage is one `bwrap` over that root, with its own
//! `/proc`, a minimal `/dev`, a `/tmp` of its own, the cache directory, the
//! gitlab-runner binary and the extra bind mounts, in PID, IPC and UTS
//! namespaces of its own (`--unshare-pid --die-with-parent`): when the script
//! ends, bwrap exits and the kernel kills whatever the script left in the PID
//! namespace, so nothing outlives the stage or holds the job log. cleanup
//! kills anything still running on the job's root, unmounts everything under
//! it deepest first, and the framework removes the writable layer.
//!
//! Jobs run as root with root's capabilities, as in the chroot backend: this
//! isolates the filesystem, it is not a security boundary.
#![deny(missing_docs)]

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_backend_api::process::{self, Ended};
use berth_backend_api::{
    Backend, Cancel, Capabilities, ConfigOutput, Description, Failure, Isolation, JobContext, JobKey, JobState,
    NewBackend, RunnerInfo,
};
use berth_backend_support::cache::{self, CacheScope};
use berth_backend_support::image::ImageStore;
use berth_backend_support::mounts;
use berth_backend_support::rootfs;
use berth_backend_support::settings::{sys, Bind, ImageSettings, ImageSetup};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// `[runners.NAME.settings]` of the bwrap backend.
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
    /// The host directory behind the job's cache dir (default `<state_dir>/cache/<runner>`).
    pub cache_host_dir: Option<PathBuf>,
    /// `project` (default): a cache directory per project; `runner`: one for all.
    #[serde(default)]
    pub cache_scope: CacheScope,
    /// The gitlab-runner binary to bind in (default: `gitlab-runner` on PATH).
    pub gitlab_runner: Option<PathBuf>,
    /// Extra bind mounts (read-only unless `writable`).
    #[serde(default)]
    pub bind: Vec<Bind>,
    /// A network namespace with only loopback for every stage (`--unshare-net`).
    #[serde(default)]
    pub private_network: bool,
}

/// The bwrap backend of one runner.
#[derive(Debug)]
pub struct Bwrap {
    settings: Settings,
    images: ImageStore,
    cache_host_dir: PathBuf,
    gitlab_runner: Option<PathBuf>,
}

const BUILDS_DIR: &str = "/builds";
const CACHE_DIR: &str = "/cache";
const SCRIPTS_DIR: &str = "run/berth";
const GITLAB_RUNNER: &str = "/usr/local/bin/gitlab-runner";
const RECORD: &str = "bwrap.json";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const INSTALL_HINT: &str =
    "bubblewrap is not installed on this host (no bwrap on PATH); install it (apt-get install bubblewrap)";

/// What prepare made (`bwrap.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    image: String,
    /// The host directory of the job's cache (bwrap binds it nosuid,nodev).
    #[serde(default)]
    cache: PathBuf,
}

impl NewBackend for Bwrap {
    type Settings = Settings;

    fn new(settings: Settings, runner: &RunnerInfo) -> Result<Self, Failure> {
        let ImageSetup { images, cache_host_dir, gitlab_runner } = ImageSettings {
            images_dir: settings.images_dir.as_deref(),
            allowed_images: &settings.allowed_images,
            default_image: settings.default_image.as_deref(),
            cache_host_dir: settings.cache_host_dir.as_deref(),
            gitlab_runner: settings.gitlab_runner.as_deref(),
            bind: &settings.bind,
        }
        .resolve(runner)?;
        Ok(Bwrap { settings, images, cache_host_dir, gitlab_runner })
    }
}

/// The job's overlay directories: writable layer, overlayfs's work dir, the mounted root.
fn layer_dirs(state: &JobState) -> (PathBuf, PathBuf, PathBuf) {
    (state.dir().join("upper"), state.dir().join("work"), state.dir().join("root"))
}

/// The `bwrap` executable on [`PATH`].
fn find_bwrap() -> Option<PathBuf> {
    std::env::split_paths(PATH).map(|dir| dir.join("bwrap")).find(|p| p.is_file())
}

/// `rel` below `root`, as a real directory (created if a stage removed it):
/// the host would follow a symbolic link a stage put there out of the job's
/// root, so every component must be a directory, not a link to one.
impl Bwrap {
    /// Everything bwrap needs besides the root: where builds and stage scripts
    /// go, and name resolution as on the host.
    fn furnish(&self, root: &Path) -> Result<(), Failure> {
        let mkdir = |path: &Path| fs::create_dir_all(path).map_err(sys(format!("failed to create {}", path.display())));
        mkdir(&root.join(BUILDS_DIR.trim_start_matches('/')))?;
        mkdir(&root.join(SCRIPTS_DIR))?;
        mkdir(&root.join("etc"))?;
        for file in ["etc/resolv.conf", "etc/hosts"] {
            let target = root.join(file);
            // A symbolic link (e.g. to systemd-resolved's stub) would be followed on the host.
            let _ = fs::remove_file(&target);
            if let Err(e) = fs::copy(Path::new("/").join(file), &target) {
                warn!("failed to copy /{file} into the job's root: {e}");
            }
        }
        Ok(())
    }

    /// The arguments of the `bwrap` that runs `/run/berth/<script>` over `root`.
    fn args(&self, root: &Path, cache: &Path, key: &JobKey, script: &str) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |items: &[&dyn AsRef<std::ffi::OsStr>]| {
            args.extend(items.iter().map(|a| a.as_ref().to_owned()));
        };
        push(&[&"--bind", &root, &"/"]);
        push(&[&"--proc", &"/proc", &"--dev", &"/dev", &"--tmpfs", &"/tmp"]);
        push(&[&"--bind", &cache, &CACHE_DIR]);
        if let Some(gitlab_runner) = &self.gitlab_runner {
            push(&[&"--ro-bind", gitlab_runner, &GITLAB_RUNNER]);
        }
        for bind in &self.settings.bind {
            let kind = if bind.writable { "--bind" } else { "--ro-bind" };
            push(&[&kind, &bind.source, &bind.target()]);
        }
        push(&[&"--unshare-pid", &"--unshare-ipc", &"--unshare-uts"]);
        push(&[&"--hostname", &format!("berth-{key}"), &"--die-with-parent"]);
        if self.settings.private_network {
            push(&[&"--unshare-net"]);
        }
        push(&[&"--chdir", &"/", &"--", &"/bin/bash", &format!("/{SCRIPTS_DIR}/{script}")]);
        args
    }
}

impl Backend for Bwrap {
    fn describe(&self) -> Description {
        Description::new(
            "bwrap",
            env!("CARGO_PKG_VERSION"),
            "every stage under bubblewrap on a disposable copy-on-write root of an image, no init",
        )
        .isolation(Isolation::Filesystem)
        .capabilities(
            Capabilities::none().executes_scripts(true).cancel(true).reap(true).images(true).concurrent_jobs(true),
        )
    }

    fn config(&self, _job: &JobContext) -> Result<ConfigOutput, Failure> {
        Ok(ConfigOutput::with_dirs(BUILDS_DIR, CACHE_DIR))
    }

    fn prepare(&self, job: &JobContext, state: &JobState, cancel: &Cancel) -> Result<(), Failure> {
        let started = Instant::now();
        let image = self.images.resolve(job.image())?;
        if find_bwrap().is_none() {
            return Err(Failure::system(INSTALL_HINT));
        }
        let cache = cache::job_cache_dir(&self.cache_host_dir, self.settings.cache_scope, job)?;
        state.save(RECORD, &Record { image: image.name.clone(), cache })?;
        let (upper, work, root) = layer_dirs(state);
        for dir in [&upper, &work, &root] {
            fs::create_dir_all(dir).map_err(sys(format!("failed to create {}", dir.display())))?;
        }
        mounts::mount_overlay(&image.root, &upper, &work, &root).map_err(sys("failed to mount the job's overlay"))?;
        if cancel.is_cancelled() {
            return Err(Failure::Cancelled);
        }
        self.furnish(&root)?;
        rootfs::announce_prepared(&image, "bubblewrap", started, self.gitlab_runner.is_some());
        info!(job = %job.key(), image = image.name, "bwrap root ready");
        Ok(())
    }

    fn run(
        &self,
        _job: &JobContext,
        state: &JobState,
        script: &Path,
        _stage: &str,
        cancel: &Cancel,
    ) -> Result<(), Failure> {
        let record: Record = state
            .load(RECORD)?
            .ok_or_else(|| Failure::system("the job's root was never prepared (prepare did not finish)"))?;
        let (_, _, root) = layer_dirs(state);
        if !mounts::mounts_under(&root).iter().any(|point| point == &root) {
            return Err(Failure::system(format!("the job's root {} is not mounted (host rebooted?)", root.display())));
        }
        let bwrap = find_bwrap().ok_or_else(|| Failure::system(INSTALL_HINT))?;
        let name = format!("stage-{}.sh", std::process::id());
        let body = fs::read(script).map_err(sys(format!("failed to read the stage script {}", script.display())))?;
        let copy = rootfs::place_file(&root, SCRIPTS_DIR, &name, &body)
            .map_err(sys(format!("failed to copy the stage script into {}", root.display())))?;
        let mut cmd = Command::new(bwrap);
        cmd.args(self.args(&root, &record.cache, state.key(), &name))
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", "/root")
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null());
        let _ = std::io::stdout().flush();
        let ended = process::run(&mut cmd, cancel, Duration::from_secs(2)).map_err(sys("failed to run bwrap"))?;
        let _ = fs::remove_file(&copy);
        match ended {
            Ended::Exited(0) => Ok(()),
            Ended::Exited(code) => Err(Failure::script(code)),
            Ended::Cancelled => Err(Failure::Cancelled),
        }
    }

    fn reap_orphans(&self, _known: &[JobKey]) -> Result<Vec<String>, Failure> {
        Ok(berth_backend_support::generations::Images::new(self.images.dir()).prune())
    }

    fn cleanup(&self, state: &JobState) -> Result<(), Failure> {
        let (_, _, root) = layer_dirs(state);
        rootfs::tear_down(&root)
    }
}

#[cfg(test)]
mod tests;

berth_backend_api::export_backend!(Bwrap);
