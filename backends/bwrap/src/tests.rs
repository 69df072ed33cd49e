use std::fs;

use berth_backend_api::{Capabilities, Isolation, JobRecord, StateDir};

use super::*;

fn settings(toml: &str) -> Result<Settings, toml::de::Error> {
    toml::from_str(toml)
}

fn runner(state_dir: &Path) -> RunnerInfo {
    RunnerInfo::new("bw", state_dir)
}

fn backend(toml: &str) -> Bwrap {
    Bwrap::new(settings(toml).unwrap(), &runner(Path::new("/var/lib/berth"))).unwrap()
}

fn strings(args: &[OsString]) -> Vec<String> {
    args.iter().map(|a| a.to_str().unwrap().to_owned()).collect()
}

#[test]
fn settings_reject_unknown_keys_and_default_sensibly() {
    assert!(settings("nspawn_args = []\n").is_err(), "nspawn-only settings are unknown here");
    assert!(settings("private_netwrk = true\n").is_err());
    let s = settings("").unwrap();
    assert!(s.images_dir.is_none() && s.allowed_images.is_empty() && s.bind.is_empty() && !s.private_network);
    assert!(s.private_users.is_none() && !s.allow_host_root);
    let s = settings(
        "images_dir = \"/srv/images\"\ndefault_image = \"bookworm\"\nallowed_images = [\"book*\"]\n\
         cache_host_dir = \"/srv/cache\"\ngitlab_runner = \"/opt/gitlab-runner\"\nprivate_network = true\n\
         memory_max = \"2G\"\ntasks_max = 100\ndisk_max = \"5G\"\nshm_max = \"128M\"\nuser = \"nobody\"\n\
         [[bind]]\nsource = \"/srv/data\"\n",
    )
    .unwrap();
    assert_eq!(s.images_dir.as_deref(), Some(Path::new("/srv/images")));
    assert_eq!(s.bind.len(), 1);
}

#[test]
fn bad_settings_are_refused_with_the_setting_named() {
    for (bad, named) in [
        ("images_dir = \"relative\"\n", "images_dir"),
        ("cache_host_dir = \"/a,b\"\n", "cache_host_dir"),
        ("gitlab_runner = \"gitlab-runner\"\n", "gitlab_runner"),
        ("[[bind]]\nsource = \"/srv:x\"\n", "bind"),
        ("memory_max = \"4 gigs\"\n", "memory_max"),
        ("shm_max = \"lots\"\n", "shm_max"),
        ("user = \"a b\"\n", "user"),
        // Host root is never a silent default: it takes a second, explicit setting.
        ("private_users = false\n", "allow_host_root"),
    ] {
        let err = Bwrap::new(settings(bad).unwrap(), &runner(Path::new("/var/lib/berth"))).unwrap_err();
        assert!(matches!(err, Failure::System { .. }) && err.to_string().contains(named), "{bad}: {err}");
    }
    let ok = settings("private_users = false\nallow_host_root = true\n").unwrap();
    let b = Bwrap::new(ok, &runner(Path::new("/var/lib/berth"))).unwrap();
    assert!(!b.describe().capabilities.contains_root, "host root is not contained, and says so");
}

#[test]
fn describes_itself_and_asks_for_its_dirs() {
    let b = backend("");
    let d = b.describe();
    assert_eq!((d.name.as_str(), d.version.as_str()), ("bwrap", env!("CARGO_PKG_VERSION")));
    assert_eq!(d.isolation, Isolation::Filesystem);
    assert_eq!(
        d.capabilities,
        Capabilities::none()
            .executes_scripts(true)
            .cancel(true)
            .reap(true)
            .images(true)
            .concurrent_jobs(true)
            .contains_root(true)
    );
    let job = JobContext::from_vars("bw", [("CUSTOM_ENV_CI_JOB_ID".to_owned(), "7".to_owned())]).unwrap();
    let out = b.config(&job).unwrap();
    assert_eq!(out.builds_dir.as_deref(), Some("/builds"));
    assert_eq!(out.cache_dir.as_deref(), Some("/cache"));
}

const CAPS: &str = "--cap-drop ALL --cap-add CAP_CHOWN --cap-add CAP_DAC_OVERRIDE --cap-add CAP_FOWNER \
     --cap-add CAP_FSETID --cap-add CAP_KILL --cap-add CAP_SETGID --cap-add CAP_SETUID --cap-add CAP_SETPCAP \
     --cap-add CAP_NET_BIND_SERVICE --cap-add CAP_NET_RAW --cap-add CAP_SYS_CHROOT --cap-add CAP_AUDIT_WRITE \
     --cap-add CAP_SETFCAP";

#[test]
fn the_bwrap_command_line_is_exact() {
    let key = JobKey::new("bw", 42).unwrap();
    let view = Path::new("/run/berth-views/berth-bw-42");
    let b = backend("cache_host_dir = \"/srv/cache\"\ngitlab_runner = \"/opt/gitlab-runner\"\n");
    assert_eq!(
        strings(&b.args(view, true, true, &key, 2, "/run/berth/stage-9.sh")).join(" "),
        format!(
            "--userns 3 --bind /run/berth-views/berth-bw-42/root / \
             --proc /proc --ro-bind /proc/sys /proc/sys --dev /dev --perms 1777 --size 67108864 --tmpfs /dev/shm \
             --bind /run/berth-views/berth-bw-42/cache /cache \
             --ro-bind /run/berth-views/berth-bw-42/gitlab-runner /usr/local/bin/gitlab-runner \
             --unshare-pid --unshare-ipc --unshare-uts --unshare-cgroup-try --hostname berth-bw-42 --die-with-parent \
             {CAPS} --add-seccomp-fd 4 --add-seccomp-fd 5 --chdir / -- /bin/bash /run/berth/stage-9.sh"
        )
    );
    let b = backend(
        "cache_host_dir = \"/srv/cache\"\nprivate_network = true\nshm_max = \"1M\"\n\
         private_users = false\nallow_host_root = true\n\
         [[bind]]\nsource = \"/srv/data\"\n\
         [[bind]]\nsource = \"/srv/out\"\ntarget = \"/out\"\nwritable = true\n",
    );
    let args = strings(&b.args(view, false, true, &key, 2, "/run/berth/stage-9.sh")).join(" ");
    assert!(
        args.starts_with("--bind /run/berth-views/berth-bw-42/root / --proc /proc")
            && args.contains("--size 1048576 --tmpfs /dev/shm")
            && args.contains(
                "--ro-bind /run/berth-views/berth-bw-42/bind-0 /srv/data --bind /run/berth-views/berth-bw-42/bind-1 /out"
            )
            && args.contains("--die-with-parent --unshare-net --cap-drop ALL")
            && args.ends_with("--add-seccomp-fd 3 --add-seccomp-fd 4 --chdir / -- /bin/bash /run/berth/stage-9.sh"),
        "{args}"
    );
    // A job of `settings.user` keeps no capability.
    let args = strings(&b.args(view, true, false, &key, 2, "/run/berth/stage-9.sh")).join(" ");
    assert!(args.contains("--cap-drop ALL --add-seccomp-fd 4") && !args.contains("--cap-add"), "{args}");
}

fn state(dir: &Path, id: u64) -> JobState {
    StateDir::new(dir).create(JobRecord::new(JobKey::new("bw", id).unwrap(), "bwrap")).unwrap()
}

#[test]
fn cleanup_works_for_a_job_never_prepared_and_twice() {
    let dir = tempfile::tempdir().unwrap();
    let b = Bwrap::new(Settings::default(), &runner(dir.path())).unwrap();
    let state = state(dir.path(), 1);
    b.cleanup(&state).unwrap();
    b.cleanup(&state).unwrap();
    // Half prepared: the layer directories exist, nothing is mounted.
    for sub in ["layer/upper", "layer/work", "root", "lower", "cache"] {
        fs::create_dir_all(state.dir().join(sub)).unwrap();
    }
    b.cleanup(&state).unwrap();
    assert!(berth_backend_support::rootfs::processes_in(
        &berth_backend_support::host::System,
        &state.dir().join("root")
    )
    .is_empty());
}

#[test]
fn run_refuses_a_job_that_was_never_prepared_or_is_not_mounted() {
    let dir = tempfile::tempdir().unwrap();
    let b = Bwrap::new(Settings::default(), &runner(dir.path())).unwrap();
    let state = state(dir.path(), 2);
    let job = JobContext::from_vars("bw", [("CUSTOM_ENV_CI_JOB_ID".to_owned(), "2".to_owned())]).unwrap();
    let cancel = Cancel::never().unwrap();
    let script = dir.path().join("script");
    fs::write(&script, "exit 0\n").unwrap();
    let err = b.run(&job, &state, &script, "build_script", &cancel).unwrap_err();
    assert!(err.to_string().contains("never prepared"), "{err}");
    let record = berth_backend_support::sandbox::Record {
        image: "bookworm".into(),
        uid: 0,
        gid: 0,
        home: "/root".into(),
        cache: PathBuf::from("/srv/cache"),
        users: None,
        cgroup: None,
        layer: berth_backend_support::sandbox::Layer::Overlay,
    };
    state.save(berth_backend_support::sandbox::RECORD, &record).unwrap();
    fs::create_dir_all(state.dir().join("root")).unwrap();
    let err = b.run(&job, &state, &script, "build_script", &cancel).unwrap_err();
    assert!(err.to_string().contains("is not mounted"), "{err}");
}

#[test]
fn prepare_refuses_an_image_that_is_not_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    for name in ["bookworm", "trixie"] {
        fs::create_dir_all(images.join(name).join("bin")).unwrap();
    }
    let toml = format!("images_dir = {:?}\nallowed_images = [\"bookworm\"]\n", images.display().to_string());
    let b = Bwrap::new(settings(&toml).unwrap(), &runner(dir.path())).unwrap();
    let state = state(dir.path(), 3);
    let job = JobContext::from_vars(
        "bw",
        [
            ("CUSTOM_ENV_CI_JOB_ID".to_owned(), "3".to_owned()),
            ("CUSTOM_ENV_CI_JOB_IMAGE".to_owned(), "registry.example.com/trixie:latest".to_owned()),
        ],
    )
    .unwrap();
    let err = b.prepare(&job, &state, &Cancel::never().unwrap()).unwrap_err();
    assert!(matches!(err, Failure::Refused { .. }), "{err}");
    assert!(!state.dir().join("root").exists(), "nothing mounted for a refused job");
    b.cleanup(&state).unwrap();
}
