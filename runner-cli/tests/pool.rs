//! nspawn's warm containers (`pool_size`) on real containers: a job takes one
//! as its own, the pool refills, never hands out an outdated generation or a
//! container that is not a finished boot, and `berth reap` empties it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::nspawn::{assert_all_pass, runner};
use crate::util::*;

/// A private image store whose `bookworm` generations are read-only bind
/// mounts of the test image, so that a test can publish a new generation
/// cheaply. Unmounted when dropped (before its directory is removed; left
/// in place if an unmount fails, never removed through a mount).
struct Store {
    dir: Option<tempfile::TempDir>,
    mounts: Vec<PathBuf>,
}

impl Store {
    fn new(images: &Path) -> Store {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("bookworm/generations")).unwrap();
        let mut store = Store { dir: Some(dir), mounts: Vec::new() };
        store.publish(images, 1);
        store
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    /// Publishes generation `n` of `bookworm` (atomically, as `berth image` does).
    fn publish(&mut self, images: &Path, n: u64) {
        let real = std::fs::canonicalize(images.join("bookworm/current")).unwrap();
        let image = self.path().join("bookworm");
        let generation = image.join(format!("generations/{n}"));
        std::fs::create_dir(&generation).unwrap();
        let mount = |args: &[&str]| {
            let status = std::process::Command::new("mount").args(args).status().unwrap();
            assert!(status.success(), "mount {args:?}");
        };
        mount(&["--bind", real.to_str().unwrap(), generation.to_str().unwrap()]);
        self.mounts.push(generation.clone());
        mount(&["-o", "remount,bind,ro", generation.to_str().unwrap()]);
        std::os::unix::fs::symlink(format!("generations/{n}"), image.join("current.new")).unwrap();
        std::fs::rename(image.join("current.new"), image.join("current")).unwrap();
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        for point in &self.mounts {
            let ok = std::process::Command::new("umount").arg(point).status().is_ok_and(|s| s.success());
            if !ok {
                eprintln!("failed to unmount {}: leaving the store in place", point.display());
                std::mem::forget(self.dir.take());
                return;
            }
        }
    }
}

/// The records of the warm containers of runner `ns`'s `bookworm` pool.
fn slots(state: &Path) -> Vec<(PathBuf, serde_json::Value)> {
    slots_of(state, "ns")
}

/// The records of the warm containers of runner `name`'s `bookworm` pool.
fn slots_of(state: &Path, name: &str) -> Vec<(PathBuf, serde_json::Value)> {
    let dir = state.join("pool").join(name).join("bookworm");
    let mut slots: Vec<(PathBuf, serde_json::Value)> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.parse::<u32>().is_ok()))
        .filter_map(|e| {
            let text = std::fs::read(e.path().join("container.json")).ok()?;
            Some((e.path(), serde_json::from_slice(&text).ok()?))
        })
        .collect();
    slots.sort_by(|a, b| a.0.cmp(&b.0));
    slots
}

/// Waits (up to 90 s) until `n` warm containers of `generation` are ready.
fn wait_ready(state: &Path, n: usize, generation: u64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let slots = slots(state);
        let ready = slots.iter().filter(|(_, r)| r["ready"] == true && r["generation"] == generation).count();
        if ready >= n {
            return;
        }
        let log = std::fs::read_to_string(state.join("pool/ns/bookworm/fill.log")).unwrap_or_default();
        assert!(Instant::now() < deadline, "{ready} of {n} warm containers ready: {slots:?}\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sets `pool_size` to 0 and reaps once; what reap said.
fn empty_the_pool(env: &Env, runner_toml: &str, name: &str) -> String {
    std::fs::write(
        env.config(),
        format!("state_dir = {:?}\n{runner_toml}", env.state().display().to_string()).replace("pool_size = 2", ""),
    )
    .unwrap();
    // A dry run names the warm containers the reap will remove, and keeps them.
    let before = slots_of(&env.state(), name);
    let out = env.berth(name).args(["reap", "--grace", "0", "--dry-run"]).output().unwrap();
    let said = text(&out);
    assert!(out.status.success() && !before.is_empty(), "{said}");
    for (_, container) in &before {
        let machine = container["machine"].as_str().unwrap();
        assert!(said.contains(&format!("would remove warm container {machine} of image bookworm")), "{said}");
    }
    assert!(before.iter().all(|(slot, _)| slot.join("container.json").exists()), "a dry run removes nothing");
    reap_empties(&env.state(), name, &mut || env.berth(name).args(["reap", "--grace", "0"]).output().unwrap())
}

/// Runs `reap` (with `pool_size` 0) once and asserts that no warm container
/// is left under `state`: a filler still booting one for the old settings is
/// asked to stop and waited for, never left to refill the pool; what it said.
fn reap_empties(state: &Path, name: &str, reap: &mut dyn FnMut() -> std::process::Output) -> String {
    let out = reap();
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(slots_of(state, name).is_empty(), "warm containers left after a reap: {:?}\n{said}", slots_of(state, name));
    let pool = state.join("pool").join(name).join("bookworm");
    assert!(!pool.join("stop").exists(), "the reap's request to the filler outlived it");
    said
}

/// systemd mode, in a test host whose berth reads `etc/config.toml` and keeps
/// its state in `state`: with `pool_size = 2` added to `config`, the suite
/// passes, a job takes a warm container (booted in a unit of its own), and
/// reap empties the pool once `pool_size` is 0 again.
pub(crate) fn in_a_test_host(command: &dyn Fn(&str) -> Command, etc: &Path, state: &Path, config: &str) {
    let write = |extra: &str| {
        let text = format!("state_dir = \"/var/lib/berth/state\"\n{config}{extra}");
        std::fs::write(etc.join("config.toml"), text).unwrap();
    };
    write("pool_size = 2\n");
    let out = command("berth").args(["--runner", "ns", "conformance", "--json"]).output().unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    wait_ready(state, 2, 1);
    std::fs::write(etc.join("pool.yml"), "t:\n  script:\n    - echo \"uid_map:$(cat /proc/self/uid_map)\"\n").unwrap();
    let out = command("berth")
        .args(["--runner", "ns", "exec", "--no-sources", "--file", "/etc/berth/pool.yml", "t"])
        .output()
        .unwrap();
    let log = text(&out);
    write("");
    let said = reap_empties(state, "ns", &mut || {
        command("berth").args(["--runner", "ns", "reap", "--grace", "0"]).output().unwrap()
    });
    assert_all_pass(&report);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("Took a warm container from the pool (image bookworm, generation 1)"), "{log}");
    assert!(mapped_base(&log).is_some_and(|b| b >= 0x7000_0000), "{log}");
    assert!(said.contains("removed warm container berth-ns-pool"), "{said}");
}

/// No warm container of runner `name` runs (tests that run at the same
/// time use runners of their own: machine names are per host).
fn no_warm_container_runs(name: &str) -> bool {
    let arg = format!("--machine=berth-{name}-pool");
    berth_backend_support::proc::processes().iter().all(|p| !p.cmdline.iter().any(|a| a.starts_with(arg.as_bytes())))
}

#[test]
fn a_job_takes_a_warm_container_as_its_own_and_never_an_outdated_or_unfinished_one() {
    let Some(images) = real_containers() else { return };
    let mut store = Store::new(&images);
    let runner_toml = format!("{}pool_size = 2\n", runner(store.path(), "standalone"));
    let env = Env::new(&runner_toml);
    let (_dir, file) = pipeline(
        "t:\n  script:\n    - echo \"host:$(hostname):$(cat /etc/hostname)\"\n    - echo \"uid_map:$(cat /proc/self/uid_map)\"\n    - echo \"cache:$(grep ' /cache ' /proc/self/mountinfo)\"\n    - echo job > /cache/written-by-the-job\n",
    );
    let run = |what: &str| {
        let out = env.berth("ns").args(["exec", "--no-sources", "--file"]).arg(&file).arg("t").output().unwrap();
        let log = text(&out);
        assert_eq!(out.status.code(), Some(0), "{what}: {log}");
        log
    };
    // The pool is empty: the first job boots its own, and fills the pool.
    let log = run("first job");
    assert!(log.contains("Booted a container from image bookworm, generation 1"), "{log}");
    wait_ready(&env.state(), 2, 1);
    // The second takes a warm one, which is the job's in every way.
    let log = run("warm job");
    assert!(log.contains("Took a warm container from the pool (image bookworm, generation 1)"), "{log}");
    let host = log.lines().find_map(|l| l.strip_prefix("host:")).unwrap_or_default().to_owned();
    let (name, etc) = host.split_once(':').unwrap_or_default();
    assert!(name.starts_with("berth-ns-") && name["berth-ns-".len()..].parse::<u64>().is_ok(), "{log}");
    assert_eq!(name, etc, "/etc/hostname says the job's name too:\n{log}");
    assert!(mapped_base(&log).is_some_and(|b| b >= 0x7000_0000), "{log}");
    let cache = log.lines().find_map(|l| l.strip_prefix("cache:")).unwrap_or_default();
    assert!(cache.contains("nosuid") && cache.contains("nodev"), "{log}");
    let written: Vec<PathBuf> = std::fs::read_dir(env.state().join("cache/ns"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("written-by-the-job"))
        .filter(|p| p.exists())
        .collect();
    assert_eq!(written.len(), 1, "the project's cache on the host holds what the job wrote");
    // It refills; a taken container never comes back.
    wait_ready(&env.state(), 2, 1);
    // A new generation: no job gets the old one, and the pool turns over.
    store.publish(&images, 2);
    let log = run("job after a new generation");
    assert!(log.contains("generation 2") && !log.contains("generation 1"), "{log}");
    wait_ready(&env.state(), 2, 2);
    let left = slots(&env.state());
    assert!(left.iter().all(|(_, r)| r["generation"] == 2), "old generations are destroyed: {left:?}");
    // Slots no job may take: one a dead filler left booting, one whose init is gone.
    let pool = env.state().join("pool/ns/bookworm");
    for (n, ready) in [(90, false), (91, true)] {
        std::fs::create_dir(pool.join(n.to_string())).unwrap();
        let record = serde_json::json!({
            "mode": "standalone", "machine": format!("berth-ns-pool{n}"), "image": "bookworm", "nspawn": null,
            "leader": std::process::id(), "leader_start": 0, "unit": null, "users": null, "generation": 2, "ready": ready,
        });
        std::fs::write(pool.join(format!("{n}/container.json")), record.to_string()).unwrap();
    }
    let log = run("job next to broken slots");
    assert!(log.contains("Took a warm container from the pool"), "{log}");
    let gone = |n: u32| !pool.join(n.to_string()).exists();
    // The filler started by that job destroys both; a reap would too.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(gone(90) && gone(91)) {
        assert!(Instant::now() < deadline, "broken slots survived a filler: {:?}", slots(&env.state()));
        std::thread::sleep(Duration::from_millis(200));
    }
    // pool_size = 0: reap removes every warm container.
    let said = empty_the_pool(&env, &runner_toml, "ns");
    assert!(said.contains("removed warm container berth-ns-pool"), "{said}");
    assert!(no_warm_container_runs("ns"), "{said}");
    assert_eq!(jobs_left(&env.state()), 0);
}

#[test]
fn standalone_mode_passes_the_conformance_suite_with_a_pool() {
    let Some(images) = real_containers() else { return };
    // Runner `np`: the other pool test's runner `ns` may run at the same time.
    let runner_toml = format!("{}pool_size = 2\n", runner(&images, "standalone")).replace("[runners.ns", "[runners.np");
    let env = Env::new(&runner_toml);
    let out = env.berth("np").args(["conformance", "--json"]).output().unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    let said = empty_the_pool(&env, &runner_toml, "np");
    assert_all_pass(&report);
    assert!(no_warm_container_runs("np"), "{said}");
}

#[test]
fn jobs_find_their_cache_at_the_runners_cache_dir_in_booted_and_warm_containers() {
    let Some(images) = real_containers() else { return };
    // Runner `nc` (machine names are per host), its cache two levels below /.
    let runner_toml = format!("{}pool_size = 2\n", runner(&images, "standalone"))
        .replace("[runners.ns]\n", "[runners.nc]\ncache_dir = \"/ci/cache\"\n")
        .replace("[runners.ns.settings]", "[runners.nc.settings]");
    let env = Env::new(&runner_toml);
    let (_dir, file) = pipeline(
        "write:\n  script:\n    - grep ' /ci/cache ' /proc/self/mountinfo\n    - echo $CI_JOB_ID >> /ci/cache/probe\nread:\n  script:\n    - grep ' /ci/cache ' /proc/self/mountinfo\n    - test \"$(wc -l < /ci/cache/probe)\" = 1\n",
    );
    let run = |job: &str| {
        let out = env.berth("nc").args(["exec", "--no-sources", "--file"]).arg(&file).arg(job).output().unwrap();
        let log = text(&out);
        assert_eq!(out.status.code(), Some(0), "{job}: {log}");
        log
    };
    // config tells the runner where the cache is.
    let out = env.job("config").hook(&env, "nc", &["config"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(json["cache_dir"], "/ci/cache");
    // A container booted for the job has it there, and it outlives the job.
    let log = run("write");
    assert!(log.contains("Booted a container"), "{log}");
    let host_cache = env.state().join("cache/nc/project-unknown/probe");
    assert!(host_cache.is_file(), "the project's cache on the host holds what the job wrote");
    // A warm container (filled by that job's cleanup) gets it there at take.
    let deadline = Instant::now() + Duration::from_secs(90);
    while !slots_of(&env.state(), "nc").iter().any(|(_, r)| r["ready"] == true) {
        assert!(Instant::now() < deadline, "no warm container: {:?}", slots_of(&env.state(), "nc"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = run("read");
    assert!(log.contains("Took a warm container from the pool"), "{log}");
    let said = empty_the_pool(&env, &runner_toml, "nc");
    assert!(no_warm_container_runs("nc"), "{said}");
}
