//! berth's chroot backend, for hosts where containers are not available (no
//! systemd-nspawn, running inside another container, old kernels): each job
//! gets a disposable copy-on-write root of an image of the same image store
//! the nspawn backend uses, with no init system inside.
//!
//! The job's root, its bounds and its user namespace are the sandbox of
//! [`berth_backend_support::sandbox`], which the bwrap backend shares.
//! What is chroot's own is how a stage enters it: prepare mounts, on the
//! host, a read-only `/sys`, a minimal `/dev` (null, zero, full, random,
//! urandom, tty, pts, a bounded shm), the cache, the gitlab-runner binary and
//! the extra binds into the root; every stage then enters the root itself,
//! with nothing but system calls ([`berth_backend_support::sandbox::enter`]):
//! its own cgroup, mount, PID, IPC and UTS namespaces, `pivot_root` (the
//! host's root detached), the job's user namespace, a reduced capability set,
//! `no_new_privs` and a system call filter. When the script ends, the kernel
//! kills whatever it left in its PID namespace; cleanup kills the job's
//! cgroup, unmounts everything and removes the writable layer.
#![deny(missing_docs)]

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use berth_backend_api::{
    Backend, Cancel, ConfigOutput, Description, Failure, Finding, JobContext, JobKey, JobState, NewBackend, RunnerInfo,
};
use berth_backend_support::host::Host;
use berth_backend_support::mounts;
use berth_backend_support::rootfs::real_dir;
use berth_backend_support::sandbox::{self, enter, Record, Sandbox, GITLAB_RUNNER};
use berth_backend_support::settings::sys;

pub use berth_backend_support::sandbox::{Layer, Settings};

/// The chroot backend of one runner.
#[derive(Debug)]
pub struct Chroot {
    sandbox: Sandbox,
}

impl NewBackend for Chroot {
    type Settings = Settings;

    fn new(settings: Settings, runner: &RunnerInfo) -> Result<Self, Failure> {
        Ok(Chroot { sandbox: Sandbox::new("chroot", settings, runner)? })
    }
}

impl Chroot {
    /// The same backend, its host operations done by `host` (a
    /// [`berth_backend_support::host::Recorder`] in tests).
    pub fn with_host(self, host: Arc<dyn Host>) -> Chroot {
        Chroot { sandbox: self.sandbox.with_host(host) }
    }
}

/// Directory `rel` of the job's root, a real directory (never a link the image planted).
fn dir_in(root: &Path, rel: &str) -> Result<std::path::PathBuf, Failure> {
    real_dir(root, rel.trim_start_matches('/')).map_err(sys(format!("failed to create /{rel} in the job's root")))
}

/// File `rel` of the job's root, created empty to bind a file on.
fn file_in(root: &Path, rel: &str) -> Result<std::path::PathBuf, Failure> {
    let rel = Path::new(rel.trim_start_matches('/'));
    let parent = rel.parent().and_then(|p| p.to_str()).unwrap_or("");
    let target = dir_in(root, parent)?.join(rel.file_name().unwrap_or_default());
    if fs::symlink_metadata(&target).is_ok_and(|m| !m.is_file()) {
        return Err(Failure::system(format!("{} in the job's root is not a file", target.display())));
    }
    fs::File::create(&target).map_err(sys(format!("failed to create {}", target.display())))?;
    Ok(target)
}

impl Chroot {
    /// The host-side mounts of the job's root (see the module doc).
    fn furnish(&self, state: &JobState, record: &Record) -> Result<(), Failure> {
        let paths = sandbox::Paths::of(state);
        let root = &paths.root;
        let host = &**self.sandbox.host();
        sandbox::mount_system_dirs(host, root, self.sandbox.shm_size(), record.users)
            .map_err(sys("failed to mount /sys and /dev in the job's root"))?;
        let cache_dir = self.sandbox.cache_dir().to_string_lossy();
        mounts::bind_guarded(host, &paths.cache, &dir_in(root, &cache_dir)?, true)
            .map_err(sys("the cache directory"))?;
        if let Some(gitlab_runner) = self.sandbox.gitlab_runner() {
            mounts::bind(host, gitlab_runner, &file_in(root, GITLAB_RUNNER)?, false).map_err(sys("gitlab-runner"))?;
        }
        for bind in &self.sandbox.settings().bind {
            let target = bind.target().to_string_lossy();
            let target = if bind.source.is_dir() { dir_in(root, &target)? } else { file_in(root, &target)? };
            mounts::bind(host, &bind.source, &target, bind.writable)
                .map_err(sys(format!("bind {}", bind.source.display())))?;
        }
        Ok(())
    }
}

impl Backend for Chroot {
    fn describe(&self) -> Description {
        self.sandbox.describe(
            "chroot",
            env!("CARGO_PKG_VERSION"),
            "a disposable copy-on-write root of an image per job, entered with pivot_root in a user namespace, no init",
        )
    }

    fn config(&self, _job: &JobContext) -> Result<ConfigOutput, Failure> {
        Ok(self.sandbox.config())
    }

    fn prepare(&self, job: &JobContext, state: &JobState, cancel: &Cancel) -> Result<(), Failure> {
        let record = self.sandbox.prepare(job, state, cancel)?;
        self.furnish(state, &record)
    }

    fn run(
        &self,
        _job: &JobContext,
        state: &JobState,
        script: &Path,
        _stage: &str,
        cancel: &Cancel,
    ) -> Result<(), Failure> {
        let mut stage = self.sandbox.stage(state, script)?;
        let mut cmd = Command::new("/bin/bash");
        cmd.arg(&stage.script);
        enter::install(&mut cmd, &mut stage, self.sandbox.settings().private_network)
            .map_err(sys("failed to set up the stage's entry"))?;
        self.sandbox.run(&stage, &mut cmd, cancel, "the stage in the job's root")
    }

    fn cleanup(&self, state: &JobState) -> Result<(), Failure> {
        self.sandbox.cleanup(state)
    }

    fn reap_orphans(&self, _known: &[JobKey]) -> Result<Vec<String>, Failure> {
        Ok(self.sandbox.reap_orphans(false))
    }

    fn orphans(&self, _known: &[JobKey]) -> Result<Option<Vec<String>>, Failure> {
        Ok(Some(self.sandbox.reap_orphans(true)))
    }

    fn check(&self) -> Vec<Finding> {
        self.sandbox.check()
    }
}

#[cfg(test)]
mod tests {
    use berth_backend_api::{JobRecord, StateDir};
    use berth_backend_support::host::Recorder;
    use berth_backend_support::settings::Bind;

    use super::*;

    /// A chroot runner (its runner's `cache_dir`, gitlab-runner and a bind
    /// of `data` when `full`) on a recording host, whose job's root was
    /// furnished: the temp dir, the host, the backend, the job's state.
    fn furnished(cache_dir: Option<&str>, full: bool) -> (tempfile::TempDir, Arc<Recorder>, Chroot, JobState) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["images", "cache", "state", "data"] {
            fs::create_dir(d.join(sub)).unwrap();
        }
        let mut settings = Settings::default();
        settings.images_dir = Some(d.join("images"));
        settings.cache_host_dir = Some(d.join("cache"));
        if full {
            settings.gitlab_runner = Some("/opt/gitlab-runner".into());
            settings.bind = vec![Bind { source: d.join("data"), target: Some("/data".into()), writable: false }];
        }
        let host = Arc::new(Recorder::new());
        let mut runner = RunnerInfo::new("hostops-unit", d.join("state"));
        runner.cache_dir = cache_dir.map(str::to_owned);
        let chroot = Chroot::new(settings, &runner).unwrap().with_host(host.clone());
        let key = JobKey::new("hostops-unit", 4).unwrap();
        let state = StateDir::new(d.join("state/jobs")).create(JobRecord::new(key, "chroot")).unwrap();
        fs::create_dir(state.dir().join("root")).unwrap();
        let record = Record {
            image: "bookworm".into(),
            uid: 0,
            gid: 0,
            home: "/root".into(),
            cache: d.join("cache"),
            users: None,
            cgroup: None,
            layer: Layer::Overlay,
        };
        chroot.furnish(&state, &record).unwrap();
        (dir, host, chroot, state)
    }

    #[test]
    fn the_cache_is_mounted_at_the_runners_cache_dir() {
        let (_dir, host, chroot, state) = furnished(Some("/ci/cache"), false);
        let root = state.dir().join("root");
        let (r, s) = (root.display(), state.dir().display());
        assert!(host.lines().contains(&format!("mount {s}/cache {r}/ci/cache - MS_BIND -")), "{:#?}", host.lines());
        assert!(root.join("ci/cache").is_dir() && !root.join("cache").exists());
        let job = JobContext::from_vars("hostops-unit", [("CUSTOM_ENV_CI_JOB_ID".to_owned(), "4".to_owned())]).unwrap();
        assert_eq!(chroot.config(&job).unwrap().cache_dir.as_deref(), Some("/ci/cache"));
    }

    #[test]
    fn furnish_mounts_the_system_dirs_the_cache_gitlab_runner_and_binds() {
        let (dir, host, _chroot, state) = furnished(None, true);
        let root = state.dir().join("root");
        let (r, s) = (root.display(), state.dir().display());
        let lines = host.lines();
        // First /sys and /dev (their exact sequence: support's sandbox tests).
        assert!(lines[0].starts_with(&format!("mount sysfs {r}/sys sysfs")), "{lines:#?}");
        let shm = lines.iter().position(|l| l.starts_with(&format!("mount tmpfs {r}/dev/shm"))).unwrap();
        let ro = "MS_RDONLY | MS_NOSUID | MS_NODEV | MS_REMOUNT | MS_BIND";
        assert_eq!(
            lines[shm + 1..],
            [
                format!("mount {s}/cache {r}/cache - MS_BIND -"),
                format!("mount - {r}/cache - MS_PRIVATE -"),
                format!("mount - {r}/cache - MS_NOSUID | MS_NODEV | MS_REMOUNT | MS_BIND -"),
                format!("mount /opt/gitlab-runner {r}/usr/local/bin/gitlab-runner - MS_BIND | MS_REC -"),
                format!("mount - {r}/usr/local/bin/gitlab-runner - MS_REC | MS_PRIVATE -"),
                format!("mount - {r}/usr/local/bin/gitlab-runner - {ro} -"),
                format!("mount {} {r}/data - MS_BIND | MS_REC -", dir.path().join("data").display()),
                format!("mount - {r}/data - MS_REC | MS_PRIVATE -"),
                format!("mount - {r}/data - {ro} -"),
            ]
        );
        assert!(root.join("usr/local/bin/gitlab-runner").is_file() && root.join("data").is_dir());
    }
}
