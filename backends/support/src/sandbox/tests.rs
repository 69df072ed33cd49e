//! The exact mount sequence of a sandbox's prepare, with a recording host:
//! no root, nothing mounted.

use std::path::Path;
use std::sync::Arc;

use berth_backend_api::{JobKey, JobRecord, JobState, RunnerInfo, StateDir};

use super::{mount_system_dirs, Layer, Record, Sandbox, Settings};
use crate::host::Recorder;
use crate::image::Image;

fn sandbox(dir: &Path, layer: Layer, host: Arc<Recorder>) -> Sandbox {
    for sub in ["images/bookworm", "cache", "state"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let settings = Settings {
        images_dir: Some(dir.join("images")),
        cache_host_dir: Some(dir.join("cache")),
        gitlab_runner: Some("/opt/gitlab-runner".into()),
        disk_max: Some("infinity".into()),
        private_users: Some(false),
        allow_host_root: true,
        layer,
        ..Settings::default()
    };
    let runner = RunnerInfo::new("hostops-unit", dir.join("state"));
    Sandbox::new("chroot", settings, &runner).unwrap().with_host(host)
}

fn state(dir: &Path) -> JobState {
    let key = JobKey::new("hostops-unit", 3).unwrap();
    StateDir::new(dir.join("state/jobs")).create(JobRecord::new(key, "chroot")).unwrap()
}

/// A record of a job running as this test's user (so that no chown needs root).
fn record(dir: &Path, layer: Layer) -> Record {
    Record {
        image: "bookworm".into(),
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        home: "/root".into(),
        cache: dir.join("cache"),
        users: None,
        cgroup: None,
        layer,
    }
}

#[test]
fn the_system_dirs_are_mounted_in_order() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().display();
    let host = Recorder::new();
    mount_system_dirs(&host, root.path(), 1 << 20, None).unwrap();
    let mut expected = vec![
        format!("mount sysfs {r}/sys sysfs MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC -"),
        format!("mount tmpfs {r}/dev tmpfs MS_NOSUID | MS_NOEXEC mode=755,size=64k"),
    ];
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        expected.push(format!("mount /dev/{node} {r}/dev/{node} - MS_BIND | MS_REC -"));
        expected.push(format!("mount - {r}/dev/{node} - MS_REC | MS_PRIVATE -"));
    }
    expected.push(format!("mount devpts {r}/dev/pts devpts MS_NOSUID | MS_NOEXEC newinstance,ptmxmode=0666,mode=620"));
    expected.push(format!("mount tmpfs {r}/dev/shm tmpfs MS_NOSUID | MS_NODEV mode=1777,size=1048576"));
    assert_eq!(host.lines(), expected);
    assert_eq!(std::fs::read_link(root.path().join("dev/ptmx")).unwrap(), Path::new("pts/ptmx"));
    assert!(root.path().join("proc").is_dir());
}

#[test]
fn an_overlay_root_and_a_guarded_cache_are_mounted() {
    let dir = tempfile::tempdir().unwrap();
    let host = Arc::new(Recorder::new());
    let sandbox = sandbox(dir.path(), Layer::Overlay, host.clone());
    let state = state(dir.path());
    let image = Image { name: "bookworm".into(), root: dir.path().join("images/bookworm"), generation: None };
    sandbox.build_root(&state, &image, &record(dir.path(), Layer::Overlay)).unwrap();
    let (s, d) = (state.dir().display(), dir.path().display());
    assert_eq!(
        host.lines(),
        [
            format!(
                "mount overlay {s}/root overlay MS_NODEV lowerdir={d}/images/bookworm,upperdir={s}/layer/upper,workdir={s}/layer/work"
            ),
            format!("mount - {s}/root - MS_PRIVATE -"),
            format!("mount {d}/cache {s}/cache - MS_BIND -"),
            format!("mount - {s}/cache - MS_PRIVATE -"),
            format!("mount - {s}/cache - MS_NOSUID | MS_NODEV | MS_REMOUNT | MS_BIND -"),
        ]
    );
    let upper = state.dir().join("layer/upper");
    assert!(upper.join("builds").is_dir() && upper.join("run/berth").is_dir() && upper.join("tmp").is_dir());
}

#[test]
fn a_copied_root_is_copied_then_bound() {
    let dir = tempfile::tempdir().unwrap();
    let host = Arc::new(Recorder::new());
    let sandbox = sandbox(dir.path(), Layer::Copy, host.clone());
    let state = state(dir.path());
    let image = Image { name: "bookworm".into(), root: dir.path().join("images/bookworm"), generation: None };
    sandbox.build_root(&state, &image, &record(dir.path(), Layer::Copy)).unwrap();
    let (s, d) = (state.dir().display(), dir.path().display());
    assert_eq!(
        host.lines(),
        [
            format!("output cp -a --reflink=auto {d}/images/bookworm/. {s}/layer/root"),
            format!("mount {s}/layer/root {s}/root - MS_BIND | MS_REC -"),
            format!("mount - {s}/root - MS_REC | MS_PRIVATE -"),
            format!("mount {d}/cache {s}/cache - MS_BIND -"),
            format!("mount - {s}/cache - MS_PRIVATE -"),
            format!("mount - {s}/cache - MS_NOSUID | MS_NODEV | MS_REMOUNT | MS_BIND -"),
        ]
    );
}

#[test]
fn teardown_unmounts_what_prepare_mounted() {
    let dir = tempfile::tempdir().unwrap();
    let host = Arc::new(Recorder::new());
    let sandbox = sandbox(dir.path(), Layer::Overlay, host.clone());
    let state = state(dir.path());
    let image = Image { name: "bookworm".into(), root: dir.path().join("images/bookworm"), generation: None };
    sandbox.build_root(&state, &image, &record(dir.path(), Layer::Overlay)).unwrap();
    host.take();
    super::teardown::tear_down(sandbox.host(), &state).unwrap();
    let s = state.dir().display();
    assert_eq!(
        host.lines(),
        [format!("unmount {s}/root UMOUNT_NOFOLLOW"), format!("unmount {s}/cache UMOUNT_NOFOLLOW")],
        "the root once for the processes on it, then everything under the state directory, deepest first"
    );
    assert!(!state.dir().join("layer").exists());
}
