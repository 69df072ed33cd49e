use berth_backend_api::{JobRecord, StateDir};

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
    assert!(settings("layer = \"copy\"\n").is_err(), "chroot-only settings are unknown here");
    assert!(settings("user = \"nobody\"\n").is_err());
    let s = settings("").unwrap();
    assert!(s.images_dir.is_none() && s.allowed_images.is_empty() && s.bind.is_empty() && !s.private_network);
    let s = settings(
        "images_dir = \"/srv/images\"\ndefault_image = \"bookworm\"\nallowed_images = [\"book*\"]\n\
         cache_host_dir = \"/srv/cache\"\ngitlab_runner = \"/opt/gitlab-runner\"\nprivate_network = true\n\
         [[bind]]\nsource = \"/srv/data\"\n",
    )
    .unwrap();
    assert_eq!(s.images_dir.as_deref(), Some(Path::new("/srv/images")));
    assert_eq!(s.bind.len(), 1);
}

#[test]
fn paths_are_checked_and_the_cache_defaults_under_the_state_dir() {
    let b = backend("gitlab_runner = \"/opt/gitlab-runner\"\n");
    assert_eq!(b.cache_host_dir, Path::new("/var/lib/berth/cache/bw"));
    assert_eq!(b.gitlab_runner.as_deref(), Some(Path::new("/opt/gitlab-runner")));
    for bad in [
        "images_dir = \"relative\"\n",
        "cache_host_dir = \"/a,b\"\n",
        "gitlab_runner = \"gitlab-runner\"\n",
        "[[bind]]\nsource = \"/srv:x\"\n",
        "allowed_images = [\"[\"]\n",
    ] {
        let err = Bwrap::new(settings(bad).unwrap(), &runner(Path::new("/var/lib/berth"))).unwrap_err();
        assert!(matches!(err, Failure::System { .. }), "{bad}: {err}");
    }
}

#[test]
fn describes_itself_and_asks_for_its_dirs() {
    let b = backend("");
    let d = b.describe();
    assert_eq!((d.name.as_str(), d.version.as_str()), ("bwrap", env!("CARGO_PKG_VERSION")));
    assert_eq!(d.isolation, Isolation::Filesystem);
    assert_eq!(
        d.capabilities,
        Capabilities::none().executes_scripts(true).cancel(true).reap(true).images(true).concurrent_jobs(true)
    );
    let job = JobContext::from_vars("bw", [("CUSTOM_ENV_CI_JOB_ID".to_owned(), "7".to_owned())]).unwrap();
    let out = b.config(&job).unwrap();
    assert_eq!(out.builds_dir.as_deref(), Some("/builds"));
    assert_eq!(out.cache_dir.as_deref(), Some("/cache"));
}

#[test]
fn the_bwrap_command_line_is_exact() {
    let key = JobKey::new("bw", 42).unwrap();
    let root = Path::new("/var/lib/berth/jobs/bw-42/root");
    let b = backend("cache_host_dir = \"/srv/cache\"\ngitlab_runner = \"/opt/gitlab-runner\"\n");
    assert_eq!(
        strings(&b.args(root, Path::new("/srv/cache/project-7"), &key, "stage-9.sh")).join(" "),
        "--bind /var/lib/berth/jobs/bw-42/root / --proc /proc --dev /dev --tmpfs /tmp \
         --bind /srv/cache/project-7 /cache --ro-bind /opt/gitlab-runner /usr/local/bin/gitlab-runner \
         --unshare-pid --unshare-ipc --unshare-uts --hostname berth-bw-42 --die-with-parent \
         --chdir / -- /bin/bash /run/berth/stage-9.sh"
    );
    let mut b = backend(
        "cache_host_dir = \"/srv/cache\"\nprivate_network = true\n\
         [[bind]]\nsource = \"/srv/data\"\n\
         [[bind]]\nsource = \"/srv/out\"\ntarget = \"/out\"\nwritable = true\n",
    );
    b.gitlab_runner = None;
    assert_eq!(
        strings(&b.args(root, Path::new("/srv/cache"), &key, "stage-9.sh")).join(" "),
        "--bind /var/lib/berth/jobs/bw-42/root / --proc /proc --dev /dev --tmpfs /tmp \
         --bind /srv/cache /cache --ro-bind /srv/data /srv/data --bind /srv/out /out \
         --unshare-pid --unshare-ipc --unshare-uts --hostname berth-bw-42 --die-with-parent --unshare-net \
         --chdir / -- /bin/bash /run/berth/stage-9.sh"
    );
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
    for sub in ["upper", "work", "root"] {
        fs::create_dir_all(state.dir().join(sub)).unwrap();
    }
    b.cleanup(&state).unwrap();
    assert!(berth_backend_support::rootfs::processes_in(&state.dir().join("root")).is_empty());
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
    state.save(RECORD, &Record { image: "bookworm".into(), cache: PathBuf::from("/srv/cache") }).unwrap();
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
