//! berth's chroot backend, for hosts where containers are not available (no
//! systemd-nspawn, running inside another container, old kernels): each job
//! gets a disposable copy-on-write root (overlayfs over an image of the same
//! image store the nspawn backend uses), with no init system inside.
//!
//! prepare mounts the job's root under its state directory: the overlay, a
//! read-only `/sys`, a minimal `/dev` (null, zero, full, random, urandom, tty,
//! pts, shm), a `/tmp` of its own, the cache directory and the gitlab-runner
//! binary, and copies the host's `/etc/resolv.conf` and `/etc/hosts` in.
//! Every stage runs chrooted into it, in a PID namespace of its own with its
//! own `/proc` (`unshare --pid --fork --mount-proc --root`): when the script
//! ends, the kernel kills whatever it left, so nothing outlives the stage or
//! holds the job log. cleanup kills anything still using the root, unmounts
//! everything deepest first (detaching a busy mount only as a last resort, and
//! saying so) and the framework removes the writable layer.
#![deny(missing_docs)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_backend_api::process::{self, Ended};
use berth_backend_api::{
    Backend, Cancel, Capabilities, ConfigOutput, Description, Failure, Isolation, JobContext, JobState, NewBackend,
    RunnerInfo,
};
use berth_backend_support::cache::{self, CacheScope};
use berth_backend_support::image::ImageStore;
use berth_backend_support::mounts;
use berth_backend_support::rootfs;
use berth_backend_support::settings::{sys, Bind, ImageSettings, ImageSetup};
use nix::mount::MsFlags;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// How the job's writable root is made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// overlayfs over the image (instant; the image is never written).
    #[default]
    Overlay,
    /// A full copy of the image (`cp -a --reflink=auto`), where overlayfs is unavailable.
    Copy,
}

/// `[runners.NAME.settings]` of the chroot backend.
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
    /// A network namespace with only loopback for every stage.
    #[serde(default)]
    pub private_network: bool,
    /// Extra bind mounts (read-only unless `writable`).
    #[serde(default)]
    pub bind: Vec<Bind>,
}

/// The chroot backend of one runner.
#[derive(Debug)]
pub struct Chroot {
    settings: Settings,
    images: ImageStore,
    cache_host_dir: PathBuf,
    gitlab_runner: Option<PathBuf>,
}

const BUILDS_DIR: &str = "/builds";
const CACHE_DIR: &str = "/cache";
const SCRIPTS_DIR: &str = "run/berth";
const GITLAB_RUNNER: &str = "usr/local/bin/gitlab-runner";
const RECORD: &str = "chroot.json";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What prepare made (`chroot.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    image: String,
    uid: u32,
    gid: u32,
    home: String,
    /// The host directory of the job's cache.
    #[serde(default)]
    cache: PathBuf,
}

impl NewBackend for Chroot {
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
        if let Some(user) = &settings.user {
            if user.is_empty() || !user.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
                return Err(Failure::system(format!("settings.user: {user:?} is not a user name")));
            }
        }
        Ok(Chroot { settings, images, cache_host_dir, gitlab_runner })
    }
}

fn layer_dirs(state: &JobState) -> (PathBuf, PathBuf, PathBuf) {
    (state.dir().join("upper"), state.dir().join("work"), state.dir().join("root"))
}

/// `path` (absolute, as the job sees it) below the job's root.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// The uid, gid and home of `user` in the image's /etc/passwd.
fn lookup_user(root: &Path, user: &str) -> Result<(u32, u32, String), Failure> {
    let passwd = fs::read_to_string(root.join("etc/passwd")).map_err(sys("failed to read the image's /etc/passwd"))?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && f[0] == user)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?, f[5].to_owned())))
        .ok_or_else(|| Failure::system(format!("settings.user: there is no user {user:?} in the image's /etc/passwd")))
}

impl Chroot {
    fn mount_root(&self, image_root: &Path, state: &JobState) -> Result<PathBuf, Failure> {
        let (upper, work, root) = layer_dirs(state);
        for dir in [&upper, &work, &root] {
            fs::create_dir_all(dir).map_err(sys(format!("failed to create {}", dir.display())))?;
        }
        match self.settings.layer {
            Layer::Overlay => {
                mounts::mount_overlay(image_root, &upper, &work, &root)
                    .map_err(sys("failed to mount the job's overlay (if overlayfs is unavailable here, set settings.layer = \"copy\")"))?;
            }
            Layer::Copy => {
                let out = Command::new("cp")
                    .args(["-a", "--reflink=auto"])
                    .arg(format!("{}/.", image_root.display()))
                    .arg(&root)
                    .stdin(Stdio::null())
                    .output()
                    .map_err(sys("failed to run cp"))?;
                if !out.status.success() {
                    return Err(Failure::system(format!(
                        "failed to copy the image: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
            }
        }
        Ok(root)
    }

    fn furnish(&self, root: &Path, record: &Record) -> Result<(), Failure> {
        let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        let mkdir = |path: &Path| fs::create_dir_all(path).map_err(sys(format!("failed to create {}", path.display())));
        // /sys, read-only.
        mkdir(&root.join("sys"))?;
        mounts::mount_fs("sysfs", &root.join("sys"), "sysfs", nodev | MsFlags::MS_RDONLY, None).map_err(sys("/sys"))?;
        // A minimal /dev.
        let dev = root.join("dev");
        mkdir(&dev)?;
        mounts::mount_fs("tmpfs", &dev, "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("mode=755,size=64k"))
            .map_err(sys("/dev"))?;
        for node in ["null", "zero", "full", "random", "urandom", "tty"] {
            let target = dev.join(node);
            fs::File::create(&target).map_err(sys(format!("failed to create {}", target.display())))?;
            mounts::bind(&Path::new("/dev").join(node), &target, true).map_err(sys(format!("/dev/{node}")))?;
        }
        mkdir(&dev.join("pts"))?;
        mounts::mount_fs(
            "devpts",
            &dev.join("pts"),
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=620"),
        )
        .map_err(sys("/dev/pts"))?;
        mkdir(&dev.join("shm"))?;
        mounts::mount_fs("tmpfs", &dev.join("shm"), "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777"))
            .map_err(sys("/dev/shm"))?;
        for (link, to) in [
            ("ptmx", "pts/ptmx"),
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            symlink(to, dev.join(link)).map_err(sys(format!("failed to create /dev/{link}")))?;
        }
        // /tmp of its own, and /proc (mounted per stage, in the stage's PID namespace).
        mkdir(&root.join("tmp"))?;
        mounts::mount_fs(
            "tmpfs",
            &root.join("tmp"),
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        )
        .map_err(sys("/tmp"))?;
        mkdir(&root.join("proc"))?;
        // Name resolution as on the host.
        for file in ["etc/resolv.conf", "etc/hosts"] {
            let target = root.join(file);
            let _ = fs::remove_file(&target);
            if let Err(e) = fs::copy(Path::new("/").join(file), &target) {
                warn!("failed to copy /{file} into the job's root: {e}");
            }
        }
        // The cache, gitlab-runner, extra binds.
        let cache = inside(root, Path::new(CACHE_DIR));
        mkdir(&cache)?;
        mounts::bind_guarded(&record.cache, &cache, true).map_err(sys("the cache directory"))?;
        if let Some(gitlab_runner) = &self.gitlab_runner {
            let target = root.join(GITLAB_RUNNER);
            mkdir(target.parent().expect("has a parent"))?;
            fs::File::create(&target).map_err(sys(format!("failed to create {}", target.display())))?;
            mounts::bind(gitlab_runner, &target, false).map_err(sys("gitlab-runner"))?;
        }
        for bind in &self.settings.bind {
            let target = inside(root, bind.target());
            if bind.source.is_dir() {
                mkdir(&target)?;
            } else {
                mkdir(target.parent().unwrap_or(root))?;
                fs::File::create(&target).map_err(sys(format!("failed to create {}", target.display())))?;
            }
            mounts::bind(&bind.source, &target, bind.writable)
                .map_err(sys(format!("bind {}", bind.source.display())))?;
        }
        // Where builds and stage scripts go, writable by the run user.
        let builds = inside(root, Path::new(BUILDS_DIR));
        mkdir(&builds)?;
        mkdir(&root.join(SCRIPTS_DIR))?;
        for dir in [&builds, &root.join(SCRIPTS_DIR)] {
            nix::unistd::chown(dir, Some(record.uid.into()), Some(record.gid.into()))
                .map_err(|e| Failure::system(format!("failed to chown {}: {e}", dir.display())))?;
        }
        Ok(())
    }
}

impl Backend for Chroot {
    fn describe(&self) -> Description {
        Description::new(
            "chroot",
            env!("CARGO_PKG_VERSION"),
            "a disposable copy-on-write root of an image per job, no init",
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
        let (uid, gid, home) = match &self.settings.user {
            Some(user) => lookup_user(&image.root, user)?,
            None => (0, 0, "/root".to_owned()),
        };
        let cache = cache::job_cache_dir(&self.cache_host_dir, self.settings.cache_scope, job)?;
        if uid != 0 {
            // The scripts' user writes the cache (it stays private: its parent is root's, 0700).
            std::os::unix::fs::chown(&cache, Some(uid), Some(gid))
                .map_err(sys(format!("failed to give {} to the job's user", cache.display())))?;
        }
        let record = Record { image: image.name.clone(), uid, gid, home, cache };
        state.save(RECORD, &record)?;
        let root = self.mount_root(&image.root, state)?;
        if cancel.is_cancelled() {
            return Err(Failure::Cancelled);
        }
        self.furnish(&root, &record)?;
        let layer = if self.settings.layer == Layer::Overlay { "overlay" } else { "copied" };
        rootfs::announce_prepared(&image, layer, started, self.gitlab_runner.is_some());
        info!(job = %job.key(), image = image.name, "chroot ready");
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
        if mounts::mounts_under(&root).is_empty() && self.settings.layer == Layer::Overlay {
            return Err(Failure::system(format!("the job's root {} is not mounted (host rebooted?)", root.display())));
        }
        let name = format!("stage-{}.sh", std::process::id());
        let body = fs::read(script).map_err(sys(format!("failed to read the stage script {}", script.display())))?;
        // The job owns its root: never follow a link it planted.
        let copy = rootfs::place_file(&root, SCRIPTS_DIR, &name, &body)
            .map_err(sys(format!("failed to copy the stage script into {}", root.display())))?;
        let mut cmd = Command::new("unshare");
        cmd.args(["--pid", "--fork", "--kill-child", "--mount", "--propagation", "private", "--mount-proc"]);
        if self.settings.private_network {
            cmd.arg("--net");
        }
        if record.uid != 0 {
            cmd.args(["--setgid", &record.gid.to_string(), "--setuid", &record.uid.to_string()]);
        }
        cmd.arg(format!("--root={}", root.display()))
            .arg("--wd=/")
            .args(["/bin/bash", &format!("/{SCRIPTS_DIR}/{name}")])
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", &record.home)
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null());
        let _ = std::io::stdout().flush();
        let ended = process::run(&mut cmd, cancel, Duration::from_secs(2))
            .map_err(sys("failed to run unshare (util-linux)"))?;
        let _ = fs::remove_file(&copy);
        match ended {
            Ended::Exited(0) => Ok(()),
            Ended::Exited(code) => Err(Failure::script(code)),
            Ended::Cancelled => Err(Failure::Cancelled),
        }
    }

    fn reap_orphans(&self, _known: &[berth_backend_api::JobKey]) -> Result<Vec<String>, Failure> {
        Ok(berth_backend_support::generations::Images::new(self.images.dir()).prune())
    }

    fn cleanup(&self, state: &JobState) -> Result<(), Failure> {
        let (_, _, root) = layer_dirs(state);
        rootfs::tear_down(&root)
    }
}
