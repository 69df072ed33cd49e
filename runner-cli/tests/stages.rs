//! nspawn stages on real containers: entered directly by berth, they are
//! what the container's init would start (its credentials, bounding set and
//! system call filters), in a cgroup of their own that ends with them; a
//! container whose init's profile is missing runs them through its systemd.

use crate::nspawn::{exec, runner};
use crate::util::*;

#[test]
fn a_stage_is_what_the_containers_init_would_start_and_ends_whole() {
    let Some(images) = real_containers() else { return };
    let env = Env::new(&runner(&images, "standalone"));
    let (_dir, file) = pipeline(
        r#"probe:
  script:
    - grep '^0::/berth-stage-' /proc/self/cgroup
    - test "$(grep CapBnd /proc/self/status)" = "$(grep CapBnd /proc/1/status)"
    - mine=$(sed -n 's/^Seccomp_filters:\s*//p' /proc/self/status); init=$(sed -n 's/^Seccomp_filters:\s*//p' /proc/1/status); test "$init" -gt 0 && test "$mine" -ge "$init"
    - grep '^NoNewPrivs:\s*0$' /proc/self/status
    - test "$(id -u):$(id -g):$(id -G)" = "0:0:0"
    - echo "uid_map:$(cat /proc/self/uid_map)"
    - sleep 1000 &
    - setsid sleep 1001 &
  after_script:
    - for c in /proc/[0-9]*/cmdline; do if tr '\0' ' ' < $c | grep -q '^sleep 100'; then echo "survived=$c"; fi; done
    - echo after-done
killed:
  script:
    - kill -9 $$
"#,
    );
    let out = exec(&env, &file, "probe");
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(mapped_base(&log).is_some_and(|b| b >= 0x7000_0000), "root in the stage is the job's range:\n{log}");
    assert!(log.contains("after-done") && !log.contains("survived=/proc"), "what a stage leaves ends with it:\n{log}");
    let out = exec(&env, &file, "killed");
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("exit code 137"), "a shell killed by SIGKILL is 128 + 9:\n{log}");
}

#[test]
fn a_container_without_its_inits_profile_runs_stages_through_its_systemd() {
    let Some(images) = real_containers() else { return };
    let env = Env::new(&runner(&images, "standalone"));
    let job = env.job_with_id("job", 700_031);
    let out = job.hook(&env, "ns", &["prepare"]);
    assert!(out.status.success(), "{}", text(&out));
    let profile = env.state().join("jobs/ns-700031/container/init.profile");
    assert!(profile.exists(), "prepare copied the init's profile");
    let script = job.script("probe", "cat /proc/self/cgroup\ngrep CapBnd /proc/self/status /proc/1/status\n");
    let direct = job.hook(&env, "ns", &["run", script.to_str().unwrap(), "build_script"]);
    std::fs::remove_file(&profile).unwrap();
    let through_systemd = job.hook(&env, "ns", &["run", script.to_str().unwrap(), "build_script"]);
    let cleanup = job.hook(&env, "ns", &["cleanup"]);
    assert!(cleanup.status.success(), "{}", text(&cleanup));
    let (direct, through_systemd) = (text(&direct), text(&through_systemd));
    assert!(direct.contains("0::/berth-stage-"), "{direct}");
    assert!(through_systemd.contains("0::/system.slice/berth-stage-"), "{through_systemd}");
    for log in [&direct, &through_systemd] {
        let bounds: Vec<&str> =
            log.lines().filter(|l| l.contains("CapBnd")).map(|l| l.rsplit(':').next().unwrap().trim()).collect();
        assert!(bounds.len() == 2 && bounds[0] == bounds[1], "{log}");
    }
}
