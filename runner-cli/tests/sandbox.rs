//! The sandbox of the chroot and bwrap backends, attacked by the root jobs it
//! runs (issue #11). Each attack below got out on the code before the
//! sandbox (chroot under `unshare --root` in the host's user namespace, bwrap
//! started by root with every capability): here each must fail, on both
//! backends, with default settings. The generic attacks (a binary the host
//! runs, devices, sysctls, the cache, bounds, leftovers, other jobs) are the
//! conformance suite's containment section, which both backends pass
//! (`chroot_passes_the_conformance_suite`, `the_bwrap_plugin_passes_...`).

use std::path::Path;

use crate::util::*;

/// The runner table of a sandbox backend (`chroot` or `bwrap`), named `sb`,
/// with `extra` settings; `None` (skipped, printed) where it cannot run here.
fn runner(kind: &str, extra: &str) -> Option<(Env, std::path::PathBuf)> {
    let images = real_containers()?;
    let backend = match kind {
        "chroot" => "backend = \"chroot\"".to_owned(),
        _ => format!("plugin = {:?}", bwrap_plugin()?.display().to_string()),
    };
    let toml = format!(
        "[runners.sb]\n{backend}\n[runners.sb.settings]\nimages_dir = {:?}\ndefault_image = \"bookworm\"\n{extra}",
        images.display().to_string()
    );
    Some((Env::new(&toml), images))
}

/// Whether no process of the host has `needle` in its command line.
fn no_process_with(needle: &str) -> bool {
    berth_backend_support::proc::processes()
        .iter()
        .all(|p| !p.cmdline.iter().map(|a| String::from_utf8_lossy(a)).collect::<Vec<_>>().join(" ").contains(needle))
}

fn escapes(kind: &str) {
    let Some((env, _)) = runner(kind, "") else { return };
    let id = std::process::id();
    // On the host: a file in the host's /tmp (where the runner keeps job
    // payloads), and the runner's state directory with other jobs in it.
    let marker = format!("/tmp/berth-host-marker-{id}");
    std::fs::write(&marker, "host").unwrap();
    let escaped = format!("/escaped-by-job-{id}");
    let state = env.state();
    let script = format!(
        "perl -e 'mkdir \"x\"; chroot \"x\" or die \"chroot: $!\"; chdir \"..\" for 1..64; chroot \".\" or die; print \"ESC\".\"APED\\n\" if -e \"{marker}\"; print \"WRO\".\"TE\\n\" if open(F, \">{escaped}\")' || true\n\
         test -e {marker} && echo SA\"W-HOST-TMP\" || true\n\
         test -e {state} && echo SA\"W-RUNNER-STATE\" || true\n\
         perl -e 'syscall(304, -100, 0, 0); print \"handle: $!\\n\"'\n\
         unshare -U true 2>/dev/null && echo UN\"SHARED\" || echo unshare-refused\n\
         mknod /tmp/mem c 1 1 2>/dev/null && echo MK\"NOD\" || echo mknod-refused\n\
         (echo 1 > /proc/sys/vm/drop_caches) 2>/dev/null && echo SY\"SCTL\" || echo sysctl-refused\n\
         echo processes-$(ls /proc | grep -c '^[0-9]')\n\
         awk '{{print \"maps-to-\" $2}}' /proc/self/uid_map\n\
         grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status | tr -d '\\t' | tr '\\n' ' '; echo",
        state = state.display(),
    );
    let (code, log) = exec_script(&env, "sb", &script);
    let _ = std::fs::remove_file(&marker);
    let wrote = Path::new(&escaped).exists();
    let _ = std::fs::remove_file(&escaped);
    assert_eq!(code, 0, "{log}");
    for sign in ["ESCAPED", "SAW-HOST-TMP", "SAW-RUNNER-STATE", "UNSHARED", "MKNOD", "SYSCTL"] {
        assert!(!log.contains(sign), "{kind}: the job got out ({sign}):\n{log}");
    }
    assert!(!wrote, "{kind}: the job wrote {escaped} on the host");
    assert!(log.contains("handle: Operation not permitted"), "{kind}: open_by_handle_at was not refused:\n{log}");
    assert!(log.contains("NoNewPrivs:1 Seccomp:2"), "{kind}: no no_new_privs or no filter:\n{log}");
    let base: u64 = log
        .lines()
        .find_map(|l| l.trim().strip_prefix("maps-to-"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{kind}: no uid map:\n{log}"));
    assert!(base >= 0x7000_0000, "{kind}: root in the job is host uid {base}:\n{log}");
    let processes: u32 = log
        .lines()
        .find_map(|l| l.trim().strip_prefix("processes-"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{kind}: no process count:\n{log}"));
    assert!(processes < 10, "{kind}: the job sees {processes} processes (the host's?):\n{log}");
}

#[test]
fn a_root_job_does_not_get_out_of_the_chroot_sandbox() {
    escapes("chroot");
}

#[test]
fn a_root_job_does_not_get_out_of_the_bwrap_sandbox() {
    escapes("bwrap");
}

fn bounds_hold(kind: &str) {
    let settings = "tasks_max = 64\nmemory_max = \"128M\"\ndisk_max = \"100M\"\nshm_max = \"8M\"\n";
    let Some((env, _)) = runner(kind, settings) else { return };
    let needle = format!("{}", 870_000 + std::process::id() % 1000);
    let script = format!(
        "perl -e 'for (1..200) {{ $p = fork(); if (!defined $p) {{ print \"forks-refused-at-$_\\n\"; last }} if (!$p) {{ sleep 20; exit }} push @k, $p }} kill 9, @k; 1 while wait != -1'\n\
         dd if=/dev/zero of=/tmp/fill bs=1M count=150 2>&1 | grep -o 'No space left on device' | sed 's/^/tmp-/' || true\n\
         rm -f /tmp/fill\n\
         dd if=/dev/zero of=/dev/shm/fill bs=1M count=20 2>&1 | grep -o 'No space left on device' | sed 's/^/shm-/' || true\n\
         perl -e '$x = \"a\" x (400 * 1024 * 1024); print \"ALLO\".\"CATED\\n\"' || echo memory-refused-$?\n\
         (setsid sleep {needle} &)\n\
         (nohup sh -c 'sleep {needle}' >/dev/null 2>&1 &)"
    );
    let (code, log) = exec_script(&env, "sb", &script);
    assert_eq!(code, 0, "{log}");
    let refused_at: u32 = log
        .lines()
        .find_map(|l| l.trim().strip_prefix("forks-refused-at-"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{kind}: the fork bomb was not stopped:\n{log}"));
    assert!(refused_at <= 64, "{kind}: {refused_at} processes before tasks_max = 64 held:\n{log}");
    assert!(log.contains("tmp-No space left on device"), "{kind}: /tmp grew past disk_max:\n{log}");
    assert!(log.contains("shm-No space left on device"), "{kind}: /dev/shm grew past shm_max:\n{log}");
    assert!(
        !log.contains("ALLOCATED") && log.contains("memory-refused-137"),
        "{kind}: memory_max did not hold:\n{log}"
    );
    // Whatever the job double-forked is gone with it, and so is its cgroup.
    assert!(no_process_with(&format!("sleep {needle}")), "{kind}: a process of the job outlived it");
    let cgroups = std::fs::read_dir("/sys/fs/cgroup/berth")
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("berth-sb-")).count())
        .unwrap_or(0);
    assert_eq!(cgroups, 0, "{kind}: the job's cgroup outlived it");
    assert_eq!(std::fs::read_dir(env.state().join("jobs")).unwrap().count(), 0, "{kind}: job state left");
}

#[test]
fn bounds_hold_in_the_chroot_sandbox() {
    bounds_hold("chroot");
}

#[test]
fn bounds_hold_in_the_bwrap_sandbox() {
    bounds_hold("bwrap");
}

#[test]
fn host_root_is_refused_unless_the_runner_says_so() {
    let Some((env, _)) = runner("chroot", "private_users = false\n") else { return };
    let (code, log) = exec_script(&env, "sb", "true");
    assert_ne!(code, 0, "{log}");
    assert!(log.contains("allow_host_root"), "{log}");
    let Some((env, _)) = runner("chroot", "private_users = false\nallow_host_root = true\n") else { return };
    let out = env.berth("sb").arg("config").env("CUSTOM_ENV_CI_JOB_ID", "1").output().unwrap();
    assert!(text(&out).contains("jobs run as root of the host"), "said at config: {}", text(&out));
    let (code, log) = exec_script(&env, "sb", "test \"$(awk '{print $2}' /proc/self/uid_map)\" = 0");
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("WARNING: this runner runs jobs as root of the host"), "{log}");
}

fn run_user(kind: &str) {
    let Some((env, _)) = runner(kind, "user = \"nobody\"\nprivate_network = true\n") else { return };
    // The cache is the user's too (a cache stage writes it as that user).
    let (code, log) = exec_script(
        &env,
        "sb",
        "echo user-$(id -un)\ntouch /builds/mine /cache/mine\ngrep CapEff /proc/self/status | tr -d '\\t'\n\
         echo ifaces-$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ,)",
    );
    assert_eq!(code, 0, "{kind}: {log}");
    assert!(log.contains("user-nobody"), "{kind}: {log}");
    assert!(log.contains("CapEff:0000000000000000"), "{kind}: the job's user has capabilities:\n{log}");
    assert!(log.contains("ifaces-lo,"), "{kind}: only loopback:\n{log}");
}

#[test]
fn the_run_user_and_private_network_settings_apply_in_chroot() {
    run_user("chroot");
}

#[test]
fn the_run_user_and_private_network_settings_apply_in_bwrap() {
    run_user("bwrap");
}
