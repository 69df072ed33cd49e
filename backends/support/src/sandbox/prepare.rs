//! [`Sandbox::prepare`]: the job's root, its mounts, the view for a launcher.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use berth_backend_api::{Cancel, Failure, JobContext, JobState, JobStatus};
use nix::mount::MsFlags;
use tracing::{info, warn};

use super::teardown::{kill_cgroup, remove_view, tear_down, view_dir};
use super::{sandbox_name, Layer, Paths, Record, Sandbox, BUILDS_DIR, NAMES, RECORD, SCRIPTS_DIR, VIEWS};
use crate::cache;
use crate::cgroup::JobCgroup;
use crate::claims::Claims;
use crate::host::{Cmd, Host};
use crate::image::Image;
use crate::rootfs::make_dir;
use crate::settings::sys;
use crate::userns::{self, Allocator, Range, UserNs};
use crate::{diskfs, mounts, rootfs};

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
pub(super) fn user_namespaces_enabled() -> bool {
    fs::read_to_string("/proc/sys/user/max_user_namespaces").is_ok_and(|n| n.trim() != "0")
}

impl Sandbox {
    /// Mounts the job's root (see the module doc) and records it.
    pub fn prepare(&self, job: &JobContext, state: &JobState, cancel: &Cancel) -> Result<Record, Failure> {
        let started = Instant::now();
        let image = self.images.resolve(job.image())?;
        let name = sandbox_name(job.key());
        let claims = Claims::host(NAMES);
        let mut claimed = claims.claim(&name, state.dir()).map_err(sys("failed to record the sandbox's name"))?;
        if let Some(stale) = claims.owner(&name).filter(|owner| !claimed && !owner.exists()) {
            // Left by a job whose state is gone (what `reap` removes): take it over.
            kill_cgroup(&self.host, &name)?;
            remove_view(&*self.host, &name)?;
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
        tear_down(&self.host, state)?;
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
        let mut group = JobCgroup::on(self.host.clone(), &name);
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
        let memory = record.cgroup.as_ref().and_then(|_| group.memory_dir());
        state.set_status(
            &JobStatus::new().image(&image.name, image.generation).root(Paths::of(state).root).cgroup(memory),
        )?;
        let how = match self.settings.layer {
            Layer::Overlay => "overlay",
            Layer::Copy => "copied",
        };
        rootfs::announce_prepared(&image, how, started, self.gitlab_runner.is_some());
        info!(job = %job.key(), image = image.name, users = ?users, "{} sandbox ready", self.kind);
        Ok(record)
    }

    pub(super) fn build_root(&self, state: &JobState, image: &Image, record: &Record) -> Result<(), Failure> {
        let paths = Paths::of(state);
        let users = record.users;
        let job_root = users.map(|r| (r.base, r.base));
        make_dir(&paths.layer, 0o755, job_root)?;
        if let Some(size) = self.limits.disk {
            diskfs::mount_bounded(&*self.host, &state.dir().join("layer.img"), size, &paths.layer, users)
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
                let cp = Cmd::new("cp").args(["-a", "--reflink=auto"]).arg(format!("{}/.", lower.display())).arg(&copy);
                let out = self.host.output(&cp).map_err(sys("failed to run cp"))?;
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
                &*self.host,
                &lower,
                &base,
                &paths.layer.join("work"),
                &paths.root,
                MsFlags::MS_NODEV,
            )
            .map_err(sys(
                "failed to mount the job's overlay (if overlayfs is unavailable here, set settings.layer = \"copy\")",
            ))?,
            Layer::Copy => {
                mounts::bind(&*self.host, &base, &paths.root, true).map_err(sys("failed to mount the job's root"))?
            }
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
            None => mounts::bind_guarded(&*self.host, &record.cache, &paths.cache, true)
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
            mounts::bind(&*self.host, &source, &target, writable)
                .map_err(sys(format!("failed to bind {} into the job's view", source.display())))?;
        }
        Ok(view)
    }
}

/// Mounts, on the host, what a root entered with [`super::enter`] needs besides
/// its own `/proc` (whose mount point is made): a read-only `/sys` and a
/// minimal `/dev` (null, zero, full, random, urandom and tty of the host, a
/// new devpts instance, a `shm`-byte `/dev/shm` given to `owner`), at real
/// directories of `root` (never links the image or a job planted).
pub fn mount_system_dirs(host: &dyn Host, root: &Path, shm: u64, owner: Option<Range>) -> io::Result<()> {
    use std::os::unix::fs::symlink;
    let dir = |rel: &str| {
        rootfs::real_dir(root, rel).map_err(|e| io::Error::new(e.kind(), format!("/{rel} in the root: {e}")))
    };
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mounts::mount_fs(host, "sysfs", &dir("sys")?, "sysfs", nodev | MsFlags::MS_RDONLY, None)?;
    let dev = dir("dev")?;
    mounts::mount_fs(host, "tmpfs", &dev, "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("mode=755,size=64k"))?;
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(node);
        fs::File::create(&target)?;
        mounts::bind(host, &Path::new("/dev").join(node), &target, true)?;
    }
    let pts = dir("dev/pts")?;
    let pts_options = "newinstance,ptmxmode=0666,mode=620";
    mounts::mount_fs(host, "devpts", &pts, "devpts", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some(pts_options))?;
    let shm_dir = dir("dev/shm")?;
    let size = format!("mode=1777,size={shm}");
    mounts::mount_fs(host, "tmpfs", &shm_dir, "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some(&size))?;
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
