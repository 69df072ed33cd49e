//! The nspawn backend on real containers: the conformance suite in both host
//! modes, the sample job, and what must be refused or reported.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::testhost::TestHost;
use crate::util::*;

pub(crate) fn runner(images: &Path, mode: &str) -> String {
    format!(
        "[runners.ns]\nbackend = \"nspawn\"\n[runners.ns.settings]\nmode = \"{mode}\"\nimages_dir = {:?}\ndefault_image = \"bookworm\"\nallowed_images = [\"bookworm\", \"broken\"]\n",
        images.display().to_string()
    )
}

/// `berth exec` of `job` of the pipeline `file` on runner `ns`, without sources.
pub(crate) fn exec(env: &Env, file: &Path, job: &str) -> std::process::Output {
    env.berth("ns").args(["exec", "--no-sources", "--file"]).arg(file).arg(job).output().unwrap()
}

pub(crate) fn assert_all_pass(report: &serde_json::Value) {
    let results = report["results"].as_array().unwrap();
    assert!(results.len() >= 18, "{report}");
    // Every check applies to nspawn and passes, the containment section included.
    let bad: Vec<String> = results
        .iter()
        .filter(|r| r["verdict"] != "pass")
        .map(|r| format!("{} {}: {}", r["id"], r["verdict"], r["detail"]))
        .collect();
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    assert!(results.iter().filter(|r| r["id"].as_str().is_some_and(|id| id.starts_with("containment."))).count() >= 8);
}

#[test]
fn standalone_mode_passes_the_conformance_suite() {
    let Some(images) = real_containers() else { return };
    let env = Env::new(&runner(&images, "standalone"));
    let out = env.berth("ns").args(["conformance", "--json"]).output().unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_all_pass(&report);
    assert_eq!(report["backend"], "nspawn");
}

#[test]
fn standalone_mode_runs_the_sample_job() {
    let Some(images) = real_containers() else { return };
    let env = Env::new(&runner(&images, "standalone"));
    let out = env.exec_sample("ns", "test", &[]);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("Booted a container from image bookworm, generation 1 (standalone mode)"), "{log}");
    assert!(log.contains("hello from berth on berth-ns-"), "the script ran in the container:\n{log}");
    assert!(log.contains("carried into the job by berth exec"), "{log}");
    assert_eq!(jobs_left(&env.state()), 0, "{log}");
}

#[test]
fn images_outside_the_allowed_store_are_refused_as_job_failures() {
    let Some(images) = real_containers() else { return };
    let env = Env::new(&runner(&images, "standalone"));
    for image in ["../../etc", "registry.example.com/x/testhost:latest", "/", "nosuch"] {
        let job = env.job_with_id("job", 700_001);
        let response = std::fs::read_to_string(job.tmp.join("response.json")).unwrap();
        let mut payload: serde_json::Value = serde_json::from_str(&response).unwrap();
        payload["image"] = serde_json::json!({ "name": image });
        std::fs::write(job.tmp.join("response.json"), payload.to_string()).unwrap();
        let out = job.hook(&env, "ns", &["prepare"]);
        let log = text(&out);
        assert_eq!(out.status.code(), Some(1), "{image}: a refusal is a build failure, not retried:\n{log}");
        assert!(log.contains("images this runner allows: bookworm"), "{image}: {log}");
        let out = job.hook(&env, "ns", &["cleanup"]);
        assert!(out.status.success(), "{}", text(&out));
    }
}

#[test]
fn a_container_that_cannot_boot_is_a_system_failure_with_its_log() {
    let Some(images) = real_containers() else { return };
    // An image without an OS: a private store holding it and a link to the real one.
    let store = tempfile::tempdir().unwrap();
    std::fs::create_dir(store.path().join("broken")).unwrap();
    let env = Env::new(&runner(store.path(), "standalone"));
    let job = env.job_with_id("job", 700_002);
    let response = std::fs::read_to_string(job.tmp.join("response.json")).unwrap();
    std::fs::write(
        job.tmp.join("response.json"),
        response.replace("registry.example.com/ci/bookworm:latest", "broken"),
    )
    .unwrap();
    let out = job.hook(&env, "ns", &["prepare"]);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(2), "{log}");
    assert!(log.contains("systemd-nspawn exited while booting"), "{log}");
    assert!(job.hook(&env, "ns", &["cleanup"]).status.success());
    drop(images);
}

#[test]
fn reap_removes_the_container_of_a_job_whose_runner_is_gone() {
    let Some(images) = real_containers() else { return };
    let env = Env::new(&runner(&images, "standalone"));
    let job = env.job_with_id("job", 700_003);
    let out = job.hook(&env, "ns", &["prepare"]);
    assert!(out.status.success(), "{}", text(&out));
    let machine = "--machine=berth-ns-700003";
    assert!(berth_backend_support::proc::pids_with_arg(machine).len() == 1);
    std::fs::remove_dir_all(&job.tmp).unwrap();
    // Cgroups of jobs whose cleanup never ran: an old one goes, a young one
    // (a prepare that has not started nspawn yet) stays.
    let top = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "/sys/fs/cgroup"
    } else {
        "/sys/fs/cgroup/systemd"
    };
    let (old, young) = (Path::new(top).join("berth/berth-ns-700098"), Path::new(top).join("berth/berth-ns-700097"));
    // Runner `ns-x`'s: not runner `ns`'s, though its name starts the same.
    let other = Path::new(top).join("berth/berth-ns-x-700096");
    for dir in [&old, &young, &other] {
        std::fs::create_dir_all(dir).unwrap();
    }
    for dir in [&old, &other] {
        assert!(Command::new("touch").args(["-d", "2 minutes ago"]).arg(dir).status().unwrap().success());
    }
    let out = env.berth("ns").args(["reap", "--grace", "0"]).output().unwrap();
    let other_survived = other.exists();
    let _ = std::fs::remove_dir(&young);
    let _ = std::fs::remove_dir(&other);
    assert!(other_survived, "another runner's cgroup was reaped:\n{}", text(&out));
    let log = text(&out);
    assert!(log.contains("removed ns-700003"), "{log}");
    assert!(berth_backend_support::proc::pids_with_arg(machine).is_empty(), "the container is gone");
    assert_eq!(jobs_left(&env.state()), 0);
    assert!(log.contains("removed cgroup of container berth-ns-700098 (no job state, no process)"), "{log}");
    assert!(!old.exists(), "{log}");
    assert!(!log.contains("berth-ns-700097"), "a young cgroup is left alone:\n{log}");
}

/// A booted test host with berth, the test images, a state directory and
/// `/etc/berth/config.toml` holding `config`.
struct Hosted {
    host: TestHost,
    state: PathBuf,
    etc: PathBuf,
    _scratch: tempfile::TempDir,
}

fn hosted(images: &Path, name: &str, unified: bool, config: &str) -> Hosted {
    let scratch = tempfile::tempdir().unwrap();
    let state = scratch.path().join("state");
    let etc = scratch.path().join("etc");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("config.toml"), format!("state_dir = \"/var/lib/berth/state\"\n{config}")).unwrap();
    // Inside the test host: images at /var/lib/berth/images, state on a bind
    // mount (an overlay's upper dir cannot live on the test host's own overlay).
    let host = TestHost::boot(
        images,
        name,
        unified,
        &[
            (PathBuf::from(BERTH), "/usr/local/bin/berth", false),
            (images.to_owned(), "/var/lib/berth/images", false),
            (state.clone(), "/var/lib/berth/state", true),
            (etc.clone(), "/etc/berth", false),
        ],
    );
    let out = host.command("systemctl").args(["is-system-running", "--wait"]).output().unwrap();
    eprintln!("test host {name}: {}", text(&out).trim());
    Hosted { host, state, etc, _scratch: scratch }
}

#[test]
fn systemd_mode_passes_the_conformance_suite_in_a_test_host() {
    let Some(images) = real_containers() else { return };
    // With limits: every job's unit must be accepted by systemd with them.
    let config = format!(
        "{}memory_max = \"2G\"\ncpu_quota = \"150%\"\ncpu_weight = 50\ntasks_max = 2000\n",
        runner(Path::new("/var/lib/berth/images"), "auto")
    );
    let Hosted { host, state, etc, _scratch } = hosted(&images, "systemd", false, &config);
    let out = host.command("berth").args(["--runner", "ns", "describe"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = host.command("berth").args(["--runner", "ns", "conformance", "--json"]).output().unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_all_pass(&report);
    // A sample job, through systemd mode. It waits (up to 60 s) while the
    // test looks at its container's unit in the test host's systemd.
    let file = etc.join("ci.yml");
    std::fs::write(
        &file,
        "test:\n  script:\n    - echo \"in $(hostname) with $(cat /proc/1/comm) as init\"\n    - for i in $(seq 600); do test -e /cache/release && break; sleep 0.1; done\n",
    )
    .unwrap();
    let exec = host
        .command("berth")
        .args(["--runner", "ns", "exec", "--no-sources", "--file", "/etc/berth/ci.yml", "test"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let unit = loop {
        let out =
            host.command("systemctl").args(["list-units", "--plain", "--no-legend", "berth-ns-*"]).output().unwrap();
        if let Some(unit) = text(&out).split_whitespace().find(|w| w.ends_with(".service")) {
            break unit.to_owned();
        }
        assert!(Instant::now() < deadline, "no berth-ns-* unit in the test host: {}", text(&out));
        std::thread::sleep(Duration::from_millis(100));
    };
    let props =
        ["MemoryMax", "TasksMax", "CPUQuotaPerSecUSec", "CPUWeight", "Delegate", "KillMode", "Slice", "DevicePolicy"];
    let out = host.command("systemctl").arg("show").arg(&unit).args(props.map(|p| format!("-p{p}"))).output().unwrap();
    std::fs::write(state.join("cache/ns/release"), "").unwrap();
    let shown = text(&out);
    for expected in [
        "MemoryMax=2147483648",
        "TasksMax=2000",
        "CPUQuotaPerSecUSec=1.500000s",
        "CPUWeight=50",
        "Delegate=yes",
        "KillMode=mixed",
        "Slice=machine.slice",
        "DevicePolicy=closed",
    ] {
        assert!(shown.lines().any(|l| l == expected), "{unit} lacks {expected}:\n{shown}");
    }
    let out = exec.wait_with_output().unwrap();
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("(systemd mode)") && log.contains("with systemd as init"), "{log}");
    // A bound the host cannot enforce is said, never dropped silently: the
    // test host's v1 memory hierarchy is read-only where it is not writable.
    let out = host.command("sh").args(["-c", "if [ -e /sys/fs/cgroup/cgroup.controllers ]; then grep -qw memory /sys/fs/cgroup/cgroup.controllers && echo writable; else test -w /sys/fs/cgroup/memory/cgroup.procs && echo writable; fi"]).output().unwrap();
    let enforceable = text(&out).contains("writable");
    assert_eq!(log.contains("settings.memory_max is not enforced"), !enforceable, "{log}");
    // Root in the job is a range of its own in systemd mode too, and stages
    // enter the container directly (a stage cgroup beside its init.scope).
    std::fs::write(
        etc.join("ci2.yml"),
        "t:\n  script:\n    - echo \"uid_map:$(cat /proc/self/uid_map)\"\n    - \"! mknod /tmp/m c 1 1\"\n    - grep '^0::/berth-stage-' /proc/self/cgroup\n    - grep -q '^Seccomp:[[:space:]]*2' /proc/self/status\n",
    )
    .unwrap();
    let out = host
        .command("berth")
        .args(["--runner", "ns", "exec", "--no-sources", "--file", "/etc/berth/ci2.yml", "t"])
        .output()
        .unwrap();
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(mapped_base(&log).is_some_and(|b| b >= 0x7000_0000), "{log}");
    // The same host with warm containers: one test host boot for both.
    crate::pool::in_a_test_host(&|program| host.command(program), &etc, &state, &config);
    // Run as a service (what berth-reap.service does), berth logs to
    // journald natively: its lines carry the runner as a field, no colour.
    let out = host
        .command("systemd-run")
        .args(["--wait", "--quiet", "--collect", "-p", "StandardError=journal", "-E", "BERTH_LOG=info"])
        .args(["/usr/local/bin/berth", "--runner", "ns", "reap"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out =
            host.command("journalctl").args(["-o", "json", "--no-pager", "SYSLOG_IDENTIFIER=berth"]).output().unwrap();
        let entries: Vec<serde_json::Value> =
            text(&out).lines().filter_map(|line| serde_json::from_str(line).ok()).collect();
        let done = entries.iter().find(|e| e["MESSAGE"].as_str().is_some_and(|m| m.contains("reap done")));
        if let Some(done) = done {
            assert_eq!(done["BERTH_RUNNER"], "ns", "{done}");
            assert_eq!(done["BERTH_REMOVED"], "0", "{done}");
            assert!(!done["MESSAGE"].as_str().unwrap().contains('\x1b'), "{done}");
            break;
        }
        assert!(Instant::now() < deadline, "no `reap done` entry of berth in the test host's journal:\n{}", text(&out));
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn caches_survive_jobs_and_gitlab_runner_is_on_the_containers_path() {
    let Some(images) = real_containers() else { return };
    let scratch = tempfile::tempdir().unwrap();
    // gitlab-runner itself is not packaged for Debian: a stand-in proves the bind.
    let fake = scratch.path().join("gitlab-runner");
    std::fs::write(&fake, "#!/bin/sh\necho \"stand-in gitlab-runner $*\"\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let settings = format!("gitlab_runner = {:?}\n", fake.display().to_string());
    let env = Env::new(&format!("{}{settings}", runner(&images, "standalone")));
    let (_dir, file) = pipeline(
        "write:\n  script:\n    - gitlab-runner cache-archiver --file x\n    - echo kept > /cache/berth-cache-probe\nread:\n  script:\n    - test \"$(cat /cache/berth-cache-probe)\" = kept\n",
    );
    let out = exec(&env, &file, "write");
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("stand-in gitlab-runner cache-archiver --file x"), "{log}");
    assert!(!log.contains("gitlab-runner is not installed"), "{log}");
    let out = exec(&env, &file, "read");
    assert_eq!(out.status.code(), Some(0), "the cache dir outlives the job:\n{}", text(&out));
    // Per project (berth exec's payload has none: `project-unknown`), root's alone.
    let cache = env.state().join("cache/ns/project-unknown");
    assert!(cache.join("berth-cache-probe").exists());
    use std::os::unix::fs::PermissionsExt;
    for dir in [cache.as_path(), cache.parent().unwrap()] {
        assert_eq!(std::fs::metadata(dir).unwrap().permissions().mode() & 0o777, 0o700, "{}", dir.display());
    }
}

#[test]
fn containers_boot_lean_and_the_masks_are_settings() {
    let Some(images) = real_containers() else { return };
    let (_dir, file) = pipeline(
        r#"lean:
  script:
    - test "$(systemctl is-system-running)" = running
    - test "$(systemctl is-enabled apt-daily.timer)" = masked
    - test "$(systemctl is-enabled systemd-sysusers.service)" = masked
    - test "$(readlink /etc/systemd/system-generators/systemd-gpt-auto-generator)" = /dev/null
    - systemctl is-active systemd-journald.service dbus.service
full:
  script:
    - test "$(systemctl is-enabled apt-daily.timer)" = enabled
    - test ! -e /etc/systemd/system-generators/systemd-gpt-auto-generator
    - test "$(systemctl is-enabled cron.service)" = masked-runtime
"#,
    );
    let out = exec(&Env::new(&runner(&images, "standalone")), &file, "lean");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // Nothing masked; init_args reach systemd (its debug generator runs then).
    let settings = "mask_units = []\nmask_generators = []\ninit_args = [\"systemd.mask=cron.service\"]\n";
    let out = exec(&Env::new(&format!("{}{settings}", runner(&images, "standalone"))), &file, "full");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let env = Env::new(&format!("{}mask_units = [\"../../etc/passwd.service\"]\n", runner(&images, "standalone")));
    let out = env.berth("ns").arg("describe").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let want = format!(
        "{}, line 9: key `runners.ns.settings.mask_units`: \"../../etc/passwd.service\" is not a unit name",
        env.config().display()
    );
    assert!(text(&out).contains(&want), "{}", text(&out));
}

#[test]
fn standalone_mode_enforces_memory_cpu_and_task_limits() {
    let Some(images) = real_containers() else { return };
    // Each limit is shown to bite: without them the same job fails (0.99 s of
    // CPU, the hog exits 0, the 100 processes start).
    let (_dir, file) = pipeline(
        r#"limits:
  script:
    - echo "in machine $(hostname)."
    - bash -c 'timeout 1 bash -c "while :; do :; done"; times' > /tmp/times || true
    - t=$(tail -1 /tmp/times); t=${t%% *}; t=${t#*m}; echo "a busy loop got ${t%s} s of CPU in 1 s"
    - awk -v s="${t%s}" 'BEGIN { exit !(s < 0.75) }'
    - rc=0; head -c 400M /dev/zero | tail > /dev/null || rc=$?; echo "a 400M memory hog exited $rc"
    - test $rc = 137
    - rc=0; sh -c 'for i in $(seq 100); do sleep 5 & done' 2>/tmp/fork.err || rc=$?; echo "100 processes exited $rc"
    - grep -q "Cannot fork" /tmp/fork.err
"#,
    );
    let settings = "memory_max = \"128M\"\ncpu_quota = \"50%\"\ntasks_max = 60\n";

    let env = Env::new(&format!("{}{settings}", runner(&images, "standalone")));
    let out =
        env.berth("ns").args(["exec", "--no-sources", "--file", file.to_str().unwrap(), "limits"]).output().unwrap();
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(!log.contains("not enforced"), "this host has the memory, cpu and pids controllers:\n{log}");
    assert_eq!(jobs_left(&env.state()), 0, "{log}");
    let machine = log.split("in machine ").nth(2).and_then(|rest| rest.split('.').next()).expect("the machine's name");
    assert!(machine.starts_with("berth-ns-"), "{log}");
    let left: Vec<PathBuf> = ["memory", "pids", "cpu", "systemd", "unified", ""]
        .iter()
        .map(|c| Path::new("/sys/fs/cgroup").join(c).join("berth").join(machine))
        .filter(|dir| dir.exists())
        .collect();
    assert!(left.is_empty(), "the job's cgroups are left: {left:?}");
}

#[test]
fn standalone_mode_passes_the_conformance_suite_on_cgroup2_inside_a_container() {
    let Some(images) = real_containers() else { return };
    // berth inside a container of a cgroup2 host: standalone mode, its
    // containers' cgroups below the namespace's root.
    let config = format!("{}memory_max = \"1G\"\n", runner(Path::new("/var/lib/berth/images"), "standalone"));
    let Hosted { host, etc, _scratch, .. } = hosted(&images, "cgroup2", true, &config);
    let shell = |script: &str| text(&host.command("sh").args(["-c", script]).output().unwrap());
    assert_eq!(shell("stat -f -c %T /sys/fs/cgroup").trim(), "cgroup2fs", "a cgroup2-only test host");
    assert!(shell("ls /sys/fs/cgroup").contains("cgroup.type"), "its /sys/fs/cgroup is a cgroup namespace");
    let out = host.command("berth").args(["--runner", "ns", "conformance", "--json"]).output().unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_all_pass(&report);
    std::fs::write(
        etc.join("ci.yml"),
        "test:\n  script:\n    - echo \"in $(hostname) with cgroup $(tail -1 /proc/self/cgroup)\"\n",
    )
    .unwrap();
    let out = host
        .command("berth")
        .args(["--runner", "ns", "exec", "--no-sources", "--file", "/etc/berth/ci.yml", "test"])
        .output()
        .unwrap();
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("(standalone mode)") && log.contains("in berth-ns-"), "{log}");
    let warned = log.contains("settings.memory_max is not enforced");
    let has_memory = shell("cat /sys/fs/cgroup/cgroup.controllers").split_whitespace().any(|c| c == "memory");
    assert_eq!(warned, !has_memory, "the warning says whether memory_max holds:\n{log}");
    let left = shell("ls /sys/fs/cgroup/berth 2>/dev/null | grep berth-ns- || true");
    assert!(left.trim().is_empty(), "cgroups left: {left}");
}

#[test]
fn root_in_the_job_is_an_unprivileged_range_of_its_own() {
    let Some(images) = real_containers() else { return };
    let env = Env::new(&runner(&images, "standalone"));
    let (_dir, file) = pipeline(
        r#"root:
  script:
    - echo "uid_map:$(cat /proc/self/uid_map)"
    - test "$(id -u)" = 0
    - echo made > /builds/mine && test "$(stat -c %u /builds/mine)" = 0
    - test "$(stat -c %u /usr/bin/bash)" = 0
    - apt-get --version > /dev/null && touch /etc/written-by-root
    - test "$(systemctl is-system-running)" = running
    - echo "host-mapped processes:$(grep -l '^ *0 *0 *4294967295' /proc/[0-9]*/uid_map | wc -l)"
"#,
    );
    let first = text(&exec(&env, &file, "root"));
    // No process the job can see (and ptrace, or read the environment of) runs with the host's ids.
    assert!(first.contains("host-mapped processes:0"), "{first}");
    let second = text(&exec(&env, &file, "root"));
    let (a, b) = (mapped_base(&first), mapped_base(&second));
    assert!(a.is_some_and(|a| a >= 0x7000_0000), "root is not a range of berth's pool:\n{first}");
    assert!(b.is_some(), "{second}");
    assert!(first.contains("Job succeeded") && second.contains("Job succeeded"), "{first}\n{second}");
    // Released by cleanup (its part in the background, within seconds):
    // nothing of either job holds a range then.
    let taken = || -> Vec<String> {
        std::fs::read_dir("/run/berth/userns")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path()).is_ok_and(|o| o.starts_with(&env.state().display().to_string()))
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !taken().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(taken().is_empty(), "ranges still held: {:?}", taken());
}

#[test]
fn a_binary_the_job_replaces_never_runs_with_the_hosts_privileges() {
    let Some(images) = real_containers() else { return };
    let env = Env::new(&runner(&images, "standalone"));
    // The shell berth starts for the next stage (the container's bash) is
    // replaced by the job; when the next stage starts it records who ran it.
    let (_dir, file) = pipeline(
        r#"hostile:
  script:
    - cp /usr/bin/bash /usr/bin/bash.real
    - printf '#!/bin/sh\n{ echo "uid_map:$(head -1 /proc/self/uid_map)"; echo "caps:$(grep CapEff /proc/self/status)"; env | sed "s/^/env:/"; } >> /var/tmp/launcher.log\nexec /usr/bin/bash.real "$@"\n' > /usr/bin/bash.new
    - chmod 755 /usr/bin/bash.new && mv /usr/bin/bash.new /usr/bin/bash
  after_script:
    - cat /var/tmp/launcher.log
"#,
    );
    let out = exec(&env, &file, "hostile");
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("env:"), "the replaced launcher ran for the next stage (as the container's root):\n{log}");
    let base = mapped_base(&log).expect("the launcher recorded its uid map");
    assert!(base >= 0x7000_0000, "the launcher ran as host root:\n{log}");
    for secret in ["JOB_RESPONSE_FILE", "CUSTOM_ENV_", "BUILD_EXIT_CODE_FILE", "BERTH_"] {
        assert!(
            !log.lines().any(|l| l.starts_with("env:") && l.contains(secret)),
            "the runner's environment reached the job ({secret}):\n{log}"
        );
    }
}

#[test]
fn a_process_naming_another_jobs_machine_is_no_container() {
    let Some(images) = real_containers() else { return };
    let env = Env::new(&runner(&images, "standalone"));
    let job = env.job_with_id("job", 700_010);
    // Any process (here the host's; a job's own would do) may name a machine in its arguments.
    let mut impostor = Command::new("sh").args(["-c", "sleep 60", "--machine=berth-ns-700010"]).spawn().unwrap();
    let out = job.hook(&env, "ns", &["prepare"]);
    let prepared = text(&out);
    let out = job.hook(&env, "ns", &["cleanup"]);
    let cleaned = text(&out);
    let survived = impostor.try_wait().unwrap().is_none();
    let _ = impostor.kill();
    let _ = impostor.wait();
    assert!(prepared.contains("Booted a container"), "the impostor blocked prepare:\n{prepared}");
    assert!(out.status.success(), "{cleaned}");
    assert!(survived, "cleanup killed a process only because it named the machine");
}

/// Runs cleanup of a job when dropped, so that a failed assertion leaves no container running.
struct CleanupOnDrop<'a>(&'a Env, &'a Job);

impl Drop for CleanupOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.1.hook(self.0, "ns", &["cleanup"]);
    }
}

#[test]
fn job_written_files_never_block_or_fool_the_host() {
    let Some(images) = real_containers() else { return };
    let env = Env::new(&runner(&images, "standalone"));
    let job = env.job_with_id("job", 700_011);
    let _cleanup = CleanupOnDrop(&env, &job);
    assert!(job.hook(&env, "ns", &["prepare"]).status.success());
    // A service of the job, outliving its stage, turns every exit-status
    // file the wrapper wrote into a FIFO (opening it, the host would block).
    let saboteur = job.script(
        "s1",
        "systemd-run --unit=saboteur sh -c 'sleep 2; while :; do for f in /run/berth/*.rc; do [ -f \"$f\" ] && rm -f \"$f\" && mkfifo \"$f\"; done; done'\n",
    );
    let out = job.hook(&env, "ns", &["run", saboteur.to_str().unwrap(), "build_script"]);
    assert!(out.status.success(), "{}", text(&out));
    let probe = job.script("s2", "sleep 2.5; exit 7\n");
    let started = Instant::now();
    let out = job.hook(&env, "ns", &["run", probe.to_str().unwrap(), "after_script"]);
    assert!(started.elapsed() < Duration::from_secs(30), "run blocked on the job's FIFO");
    // The exit status was taken from the job: the stage's result is lost, never invented.
    assert!(matches!(out.status.code(), Some(1) | Some(2)), "{}", text(&out));
    assert!(job.hook(&env, "ns", &["cleanup"]).status.success());
}

#[test]
fn the_readiness_channel_is_private_to_the_job() {
    let Some(images) = real_containers() else { return };
    let env = Env::new(&runner(&images, "standalone"));
    let job = env.job_with_id("job", 700_012);
    let _cleanup = CleanupOnDrop(&env, &job);
    let seen = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut abstract_sockets = Vec::new();
            let mut files = false;
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
                abstract_sockets.extend(table.lines().filter(|l| l.contains("@berth-notify")).map(str::to_owned));
                files |= env.state().join("jobs/ns-700012/container/notify").exists();
                if files && env.state().join("jobs/ns-700012/container.json").exists() {
                    let record = std::fs::read_to_string(env.state().join("jobs/ns-700012/container.json")).unwrap();
                    if record.contains("\"leader_start\":") && !record.contains("\"leader_start\":null") {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (abstract_sockets, files)
        });
        let out = job.hook(&env, "ns", &["prepare"]);
        assert!(out.status.success(), "{}", text(&out));
        watcher.join().unwrap()
    });
    assert!(job.hook(&env, "ns", &["cleanup"]).status.success());
    assert!(seen.0.is_empty(), "an abstract notify socket, reachable from other jobs: {:?}", seen.0);
    assert!(seen.1, "the notify socket is a file in the job's 0700 state directory");
}

#[test]
fn disk_and_tasks_are_bounded_by_default_and_by_setting() {
    let Some(images) = real_containers() else { return };
    let (_dir, file) = pipeline(
        r#"disk:
  script:
    - df -h / /tmp | tail -n +2
    - rc=0; dd if=/dev/zero of=/builds/big bs=1M count=300 2>/tmp/dd.err || rc=$?; cat /tmp/dd.err
    - test $rc != 0 && grep -q "No space left" /tmp/dd.err
    - rm -f /builds/big
    - rc=0; dd if=/dev/zero of=/tmp/big bs=1M count=300 2>/var/tmp/dd.err || rc=$?
    - test $rc != 0 && grep -q "No space left" /var/tmp/dd.err
tasks:
  # The bomb's shell (which exits at its first failed fork) kills and reaps
  # its own group on the way out: the next command needs the pids back.
  script:
    - rc=0; setsid sh -c 'trap "trap \"\" TERM; kill 0; wait" EXIT; for i in $(seq 4200); do sleep 30 & done' 2>/tmp/fork.err || rc=$?
    - grep -c "Cannot fork" /tmp/fork.err
    - echo "default disk:$(df --output=size -B1G / | tail -1)"
"#,
    );
    let env = Env::new(&format!("{}disk_max = \"200M\"\n", runner(&images, "standalone")));
    let out = exec(&env, &file, "disk");
    assert_eq!(out.status.code(), Some(0), "writes past disk_max must fail with ENOSPC:\n{}", text(&out));
    let env = Env::new(&runner(&images, "standalone"));
    let out = exec(&env, &file, "tasks");
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "a fork bomb past the default tasks_max (4096) must fail:\n{log}");
    let size: u64 = log
        .split("default disk:")
        .nth(2)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size from df in the job's log:\n{log}"));
    assert!((19..=20).contains(&size), "the default disk_max is 20G: {size}G\n{log}");
}

#[test]
fn the_chroot_sandbox_starts_stages_in_the_jobs_cgroup_on_a_cgroup2_host() {
    let Some(images) = real_containers() else { return };
    // berth's chroot backend inside a container of a cgroup2-only host: a
    // stage starts in the job's cgroup (clone3 into it, no migration).
    let config = "[runners.ch]\nbackend = \"chroot\"\n[runners.ch.settings]\nimages_dir = \"/var/lib/berth/images\"\n\
                  default_image = \"bookworm\"\n";
    let Hosted { host, etc, _scratch, .. } = hosted(&images, "sandbox2", true, config);
    let shell = |script: &str| text(&host.command("sh").args(["-c", script]).output().unwrap());
    assert_eq!(shell("stat -f -c %T /sys/fs/cgroup").trim(), "cgroup2fs", "a cgroup2-only test host");
    std::fs::write(etc.join("ci.yml"), "test:\n  script:\n    - sleep 4; grep '^0::' /proc/self/cgroup\n").unwrap();
    let exec = host
        .command("berth")
        .args(["--runner", "ch", "exec", "--no-sources", "--file", "/etc/berth/ci.yml", "test"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // While the stage sleeps: its processes are in the job's stage cgroup.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut inside = String::new();
    while inside.trim().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
        inside = shell("cat /sys/fs/cgroup/berth/berth-ch-*/berth-stage/cgroup.procs 2>/dev/null");
    }
    let out = exec.wait_with_output().unwrap();
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(!inside.trim().is_empty(), "no process of the stage in the job's cgroup:\n{log}");
    // A cgroup namespace rooted there: the stage sees its own cgroup as /.
    assert!(log.contains("0::/\n") || log.ends_with("0::/"), "{log}");
    let left = shell("ls /sys/fs/cgroup/berth 2>/dev/null | grep berth-ch- || true");
    assert!(left.trim().is_empty(), "cgroups left: {left}");
}
