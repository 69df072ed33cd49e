//! `berth image` on real images: create, import, update under a running job,
//! generations and their pruning, locking.

use std::path::Path;
use std::process::Output;

use crate::util::*;

fn image(images: &Path, args: &[&str]) -> Output {
    std::process::Command::new(BERTH).arg("image").arg("--images-dir").arg(images).args(args).output().unwrap()
}

fn chroot_runner(images: &Path) -> String {
    format!(
        "[runners.ch]\nbackend = \"chroot\"\n[runners.ch.settings]\nimages_dir = {:?}\n",
        images.display().to_string()
    )
}

/// A job with `image:` set, prepared and ready for stages.
fn prepared(env: &Env, name: &str, id: u64, image_name: &str) -> Job {
    let job = env.job_with_id(name, id);
    let response = std::fs::read_to_string(job.tmp.join("response.json")).unwrap();
    std::fs::write(
        job.tmp.join("response.json"),
        response.replace("registry.example.com/ci/bookworm:latest", image_name),
    )
    .unwrap();
    let out = job.hook(env, "ch", &["prepare"]);
    assert!(out.status.success(), "{}", text(&out));
    job
}

fn stage(env: &Env, job: &Job, body: &str) -> String {
    let script = job.script(&format!("s{}", body.len()), body);
    let out = job.hook(env, "ch", &["run", script.to_str().unwrap(), "build_script"]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn an_update_does_not_change_a_running_jobs_view_and_old_generations_are_pruned_after_it() {
    let Some(test_images) = real_containers() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let images = scratch.path().join("images");
    let tarball = scratch.path().join("rootfs.tar");
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(test_images.join("bookworm/current"))
        .arg("-cf")
        .arg(&tarball)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let out = image(&images, &["import", "deb", tarball.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("image deb is now generation 1"), "{}", text(&out));

    let env = Env::new(&chroot_runner(&images));
    let running = prepared(&env, "running", 710_001, "deb");
    assert!(stage(&env, &running, "cat /etc/berth-version 2>/dev/null || echo none\n").contains("none"));

    let script = scratch.path().join("update.sh");
    std::fs::write(&script, "#!/bin/sh\nset -e\necho two > /etc/berth-version\n").unwrap();
    let out = image(&images, &["update", "deb", "--script", script.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("generation 2"), "{}", text(&out));

    // The running job still sees generation 1; a new job sees generation 2.
    assert!(stage(&env, &running, "cat /etc/berth-version 2>/dev/null || echo none\n").contains("none"));
    let next = prepared(&env, "next", 710_002, "deb");
    assert!(stage(&env, &next, "cat /etc/berth-version\n").contains("two"));
    let list = text(&image(&images, &["list"]));
    assert!(list.contains("2 (+1)") && list.contains("mount "), "generation 1 is in use:\n{list}");

    // Generation 1 stays while the running job uses it, and goes after.
    let out = env.berth("ch").args(["reap", "--grace", "0"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(images.join("deb/generations/1").exists(), "in use: kept");
    let out = image(&images, &["remove", "deb"]);
    assert!(!out.status.success() && text(&out).contains("in use"), "{}", text(&out));
    for job in [&running, &next] {
        assert!(job.hook(&env, "ch", &["cleanup"]).status.success());
    }
    // A dry run names the generation reap would remove, and keeps it.
    let out = env.berth("ch").args(["reap", "--grace", "0", "--dry-run"]).output().unwrap();
    assert!(text(&out).contains("would remove image deb: old generation 1"), "{}", text(&out));
    assert!(images.join("deb/generations/1").exists(), "a dry run removes nothing");
    let out = env.berth("ch").args(["reap", "--grace", "0"]).output().unwrap();
    assert!(text(&out).contains("removed image deb: old generation 1"), "{}", text(&out));
    assert!(!images.join("deb/generations/1").exists());
    assert!(images.join("deb/generations/2").exists());
    let out = image(&images, &["remove", "deb"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!images.join("deb").exists());
}

#[test]
fn imports_that_are_not_root_filesystems_are_refused_leaving_nothing() {
    let Some(_) = real_containers() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let images = scratch.path().join("images");
    let junk = scratch.path().join("junk");
    std::fs::create_dir_all(junk.join("etc")).unwrap();
    let out = image(&images, &["import", "junk", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("no /bin/sh"), "{}", text(&out));
    assert!(!images.join("junk").exists(), "nothing half-made under the image name");
    let out = image(&images, &["import", "../escape", junk.to_str().unwrap()]);
    assert!(!out.status.success() && text(&out).contains("not an image name"), "{}", text(&out));
}

#[test]
fn concurrent_image_commands_on_one_image_take_turns() {
    let Some(test_images) = real_containers() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let images = scratch.path().join("images");
    let out = image(&images, &["import", "deb", test_images.join("bookworm/current").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let script = scratch.path().join("slow.sh");
    std::fs::write(&script, "#!/bin/sh\nsleep 1\necho $$ >> /etc/berth-updates\n").unwrap();
    let spawn = || {
        std::process::Command::new(BERTH)
            .args([
                "image",
                "--images-dir",
                images.to_str().unwrap(),
                "update",
                "deb",
                "--script",
                script.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    assert!(outs.iter().all(|o| o.status.success()));
    assert!(outs.iter().any(|o| text(o).contains("waiting for another `berth image` command on deb")), "{outs:?}");
    let updates = std::fs::read_to_string(images.join("deb/current/etc/berth-updates")).unwrap();
    assert_eq!(updates.lines().count(), 2, "the second update built on the first: {updates}");
    assert!(images.join("deb/generations/3").exists());
}

#[test]
fn create_builds_a_usable_image_from_the_mirror_with_either_tool_and_a_failed_build_leaves_nothing() {
    let Some(_) = real_containers() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let images = scratch.path().join("images");
    let setup = scratch.path().join("setup.sh");
    std::fs::write(&setup, "#!/bin/sh\nset -e\necho provisioned > /etc/berth-setup\n").unwrap();
    let env = Env::new(&chroot_runner(&images));
    for (tool, id) in [("debootstrap", 710_010), ("mmdebstrap", 710_011)] {
        let missing = format!("{tool} is not installed (apt-get install {tool})");
        if !prerequisite(berth_backend_support::settings::which(tool).is_none().then_some(missing)) {
            continue;
        }
        let out = image(
            &images,
            &["create", tool, "--suite", "bookworm", "--tool", tool, "--setup", setup.to_str().unwrap()],
        );
        let log = text(&out);
        assert!(out.status.success(), "{log}");
        assert!(log.contains(&format!("{tool} bookworm from http://deb.debian.org/debian")), "{log}");
        let job = prepared(&env, "job", id, tool);
        let output = stage(
            &env,
            &job,
            "cat /etc/berth-setup\ngit --version\ncurl --version | head -1\ntest -x /lib/systemd/systemd && echo has-systemd\n",
        );
        assert!(
            output.contains("provisioned") && output.contains("git version") && output.contains("has-systemd"),
            "{tool}: {output}"
        );
        assert!(job.hook(&env, "ch", &["cleanup"]).status.success());
    }

    let out = image(&images, &["create", "broken", "--suite", "no-such-suite"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("nothing was published"), "{}", text(&out));
    assert!(!images.join("broken").exists());
}

#[test]
fn shell_publishes_its_changes_on_success_and_drops_them_otherwise() {
    let Some(test_images) = real_containers() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let images = scratch.path().join("images");
    let out = image(&images, &["import", "deb", test_images.join("bookworm/current").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    // The shell reads its commands from stdin, as an admin would type them.
    let shell = |commands: &str| {
        let mut child = std::process::Command::new(BERTH)
            .args(["image", "--images-dir", images.to_str().unwrap(), "shell", "deb"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), commands.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = shell("echo 'by hand' > /etc/berth-shell\ntest -d /proc/1 && test -c /dev/null\nexit 0\n");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("image deb is now generation 2"), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(images.join("deb/current/etc/berth-shell")).unwrap(), "by hand\n");
    let out = shell("rm /etc/berth-shell\nexit 3\n");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("exited with exit status: 3: changes dropped, deb is unchanged"), "{}", text(&out));
    assert!(images.join("deb/current/etc/berth-shell").exists(), "the failed shell's change was dropped");
    let generations: Vec<_> =
        std::fs::read_dir(images.join("deb/generations")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(generations.len(), 2, "no third generation, no draft left: {generations:?}");
    // Nothing mounted is left behind by the shell's namespace.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(images.to_str().unwrap()), "{mounts}");
}

#[test]
fn image_scripts_run_as_roots_of_their_own_not_as_the_hosts() {
    // An image of unknown origin runs its update script as its root: that
    // root must not be the host's (#12). Before, the script ran chrooted as
    // host root with the host's /dev and /sys.
    let Some(test_images) = real_containers() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let images = scratch.path().join("images");
    let out = image(&images, &["import", "deb", test_images.join("bookworm/current").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let marker = scratch.path().join("host-marker");
    std::fs::write(&marker, "host").unwrap();
    let escaped = format!("/escaped-by-image-{}", std::process::id());
    let script = scratch.path().join("hostile.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             touch /etc/created-by-update\n\
             awk '{{print \"maps-to-\" $2}}' /proc/self/uid_map\n\
             (echo 1 > /proc/sys/vm/drop_caches) 2>/dev/null && echo SYSCTL-\"WRITTEN\" || echo sysctl-refused\n\
             mknod /tmp/mem c 1 1 2>/dev/null && echo MKNOD-\"MADE\" || echo mknod-refused\n\
             ls /dev | grep -qE '^(sd|vd|xvd|nvme)' && echo HOST-\"DISK\" || true\n\
             perl -e 'mkdir \"x\"; chroot \"x\" or exit; chdir \"..\" for 1..64; chroot \".\"; print \"ESC\".\"APED\\n\" if -e \"{}\"; open(F, \">{escaped}\")'\n\
             exit 0\n",
            marker.display()
        ),
    )
    .unwrap();
    let out = image(&images, &["update", "deb", "--script", script.to_str().unwrap()]);
    let log = text(&out);
    let wrote = Path::new(&escaped).exists();
    let _ = std::fs::remove_file(&escaped);
    assert!(out.status.success(), "{log}");
    for sign in ["SYSCTL-WRITTEN", "MKNOD-MADE", "HOST-DISK", "ESCAPED"] {
        assert!(!log.contains(sign), "the image's script got out ({sign}):\n{log}");
    }
    assert!(!wrote, "the image's script wrote {escaped} on the host");
    let base: u64 = log
        .lines()
        .find_map(|l| l.trim().strip_prefix("maps-to-"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no uid map:\n{log}"));
    assert!(base >= 0x7000_0000, "the image's root is host uid {base}:\n{log}");
    // What it wrote is the image's root's, as on the image: uid 0 on disk.
    let meta = std::fs::metadata(images.join("deb/current/etc/created-by-update")).unwrap();
    assert_eq!((std::os::unix::fs::MetadataExt::uid(&meta), std::os::unix::fs::MetadataExt::gid(&meta)), (0, 0));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(images.to_str().unwrap()) && !mounts.contains("/run/berth-image/"), "{mounts}");
}

#[test]
fn an_image_command_given_a_runner_uses_that_runners_images_dir_and_says_so() {
    let scratch = tempfile::tempdir().unwrap();
    let images = scratch.path().join("runner-images");
    std::fs::create_dir(&images).unwrap();
    let env = Env::new(&format!("{}[runners.demo]\nbackend = \"dry-run\"\n", chroot_runner(&images)));
    let out = env.berth("ch").args(["image", "list"]).env_remove("BERTH_IMAGES_DIR").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let shown = images.display().to_string();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("no images in {shown}")), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("images: {shown} (images_dir of runner ch)")));
    // A runner without images has no images_dir to take: refused, with what to do.
    let out = env.berth("demo").args(["image", "list"]).env_remove("BERTH_IMAGES_DIR").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("runs no images, so it has no images_dir; give --images-dir"), "{}", text(&out));
}

#[test]
fn a_forced_remove_under_a_running_job_says_so_and_its_next_stage_is_a_system_failure() {
    let Some(test_images) = real_containers() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let images = scratch.path().join("images");
    let out = image(&images, &["import", "gone", test_images.join("bookworm/current").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let env = Env::new(&chroot_runner(&images));
    let running = prepared(&env, "running", 720_001, "gone");
    // Cleaned up even when an assertion fails: its claims are host-wide.
    struct Cleanup<'a>(&'a Env, &'a Job);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = self.1.hook(self.0, "ch", &["cleanup"]);
        }
    }
    let _cleanup = Cleanup(&env, &running);
    let out = image(&images, &["remove", "--force", "gone"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("WARNING") && said.contains("ch-720001"), "the jobs it breaks are named: {said}");
    let script = running.script("after", "echo still here\n");
    let out = running.hook(&env, "ch", &["run", script.to_str().unwrap(), "build_script"]);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(2), "a system failure, not the job's: {log}");
    assert!(log.contains("/bin/bash is missing") && log.contains("image gone"), "{log}");
    assert!(running.hook(&env, "ch", &["cleanup"]).status.success(), "cleanup works on a job whose image is gone");
}
