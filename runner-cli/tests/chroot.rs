//! The chroot backend on real mounts: the conformance suite, and what a job
//! finds inside its root.

use std::path::Path;

use crate::util::*;

fn runner(images: &Path, extra: &str) -> String {
    image_runner(images, "ch", "chroot", extra)
}

#[test]
fn chroot_passes_the_conformance_suite() {
    let Some(images) = real_containers() else { return };
    let env = Env::new(&runner(&images, ""));
    let out = env.berth("ch").args(["conformance", "--json"]).output().unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    let results = report["results"].as_array().unwrap();
    let bad = not_passed(&report);
    assert!(results.len() >= 18 && bad.is_empty(), "{}", bad.join("\n"));
}

fn exec(env: &Env, script: &str) -> (i32, String) {
    exec_script(env, "ch", script)
}

#[test]
fn a_job_gets_its_own_proc_tmp_and_a_minimal_dev_and_leaves_no_mount() {
    let Some(images) = real_containers() else { return };
    let env = Env::new(&runner(&images, ""));
    let (code, log) = exec(
        &env,
        "test \"$(cat /proc/1/comm)\" = bash\n\
         ls /dev | sort | tr '\\n' ' '; echo\n\
         touch /sys/x 2>/dev/null && exit 3 || true\n\
         test -s /etc/resolv.conf\n\
         echo data > /dev/null && head -c4 /dev/urandom | wc -c\n\
         test -d /dev/pts && test -d /dev/shm\n\
         grep ' /cache ' /proc/self/mountinfo | grep nosuid | grep -q nodev\n\
         echo tmp-$(stat -f -c %T /tmp) shm-$(stat -f -c %T /dev/shm)",
    );
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("fd full null ptmx pts random shm stderr stdin stdout tty urandom zero"), "{log}");
    // /tmp is part of the job's bounded layer; /dev/shm a bounded tmpfs.
    assert!(log.contains("tmp-overlayfs shm-tmpfs"), "{log}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(env.state().to_str().unwrap()), "mounts left:\n{mounts}");
}

#[test]
fn the_copy_layer_works_where_overlayfs_is_not_wanted() {
    let Some(images) = real_containers() else { return };
    let env = Env::new(&runner(&images, "layer = \"copy\"\n"));
    let (code, log) = exec(&env, "echo from-$(. /etc/os-release; echo $ID)\necho x > /etc/written-by-job");
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("from-debian") && log.contains("(copied)"), "{log}");
    assert!(!images.join("bookworm/etc/written-by-job").exists(), "the image is never written");
    assert_eq!(std::fs::read_dir(env.state().join("jobs")).unwrap().count(), 0);
}

#[test]
fn chroot_runs_the_readme_sample_job() {
    let Some(images) = real_containers() else { return };
    let env = Env::new(&runner(&images, ""));
    let out = env.exec_sample("ch", "test", &[]);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("Prepared a root from image bookworm, generation 1 (overlay)"), "{log}");
    assert!(
        log.contains("carried into the job by berth exec") && log.contains("after_script sees CI_JOB_STATUS=success"),
        "{log}"
    );
}
