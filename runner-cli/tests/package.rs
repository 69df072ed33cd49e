//! The Debian package (`scripts/package`): its example configuration, and the
//! package itself installed into a booted test host, its reap timer and
//! service run there by systemd, and purged.

use std::path::PathBuf;
use std::process::Output;

use crate::testhost::TestHost;
use crate::util::*;

/// The package's sources (runner-cli/package-assets/debian).
fn debian() -> PathBuf {
    repo().join("runner-cli/package-assets/debian")
}

/// Where `[package.metadata.deb]` installs the asset whose source is `source`.
fn installed_at(source: &str) -> String {
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(repo().join("runner-cli/Cargo.toml")).unwrap()).unwrap();
    let assets = manifest["package"]["metadata"]["deb"]["assets"].as_array().unwrap();
    let asset = assets.iter().find(|a| a[0].as_str() == Some(source)).unwrap_or_else(|| panic!("no asset {source}"));
    asset[1].as_str().unwrap().to_owned()
}

#[test]
fn the_example_configuration_loads_every_runner_and_names_the_installed_plugin() {
    let config = debian().join("config.toml");
    let example = std::fs::read_to_string(&config).unwrap();
    for (runner, backend) in [("nspawn", "nspawn"), ("debug", "dry-run")] {
        let out = std::process::Command::new(BERTH)
            .arg("--config")
            .arg(&config)
            .args(["--runner", runner, "describe"])
            .env_remove("BERTH_RUNNER")
            .output()
            .unwrap();
        assert!(out.status.success(), "{runner}: {}", text(&out));
        assert!(text(&out).contains(&format!("backend:     {backend} ")), "{runner}: {}", text(&out));
    }
    // The commented bwrap runner names the plugin where the package puts it.
    let plugin = format!("/{}libberth_backend_bwrap.so", installed_at("target/release/libberth_backend_bwrap.so"));
    assert!(example.contains(&format!("# plugin = \"{plugin}\"")), "{plugin} not in the example:\n{example}");
    assert_eq!(installed_at("package-assets/debian/config.toml"), "etc/berth/config.toml");
}

/// The package scripts/package built (`BERTH_DEB`, set by scripts/test), or
/// `None` with the reason printed (under `CI=true`, a panic).
fn package() -> Option<PathBuf> {
    let deb = std::env::var_os("BERTH_DEB").map(PathBuf::from);
    let missing = match &deb {
        None => Some(
            "BERTH_DEB is not set: run scripts/package and set BERTH_DEB to the path it prints (scripts/test does)"
                .to_owned(),
        ),
        Some(deb) if !deb.is_file() => Some(format!("BERTH_DEB={} is not a file", deb.display())),
        Some(_) => None,
    };
    prerequisite(missing.map(|reason| format!("cannot test the Debian package: {reason}"))).then(|| deb.unwrap())
}

/// `sh -c SCRIPT` in the test host.
fn sh(host: &TestHost, script: &str) -> Output {
    host.command("sh").args(["-c", script]).env("DEBIAN_FRONTEND", "noninteractive").output().unwrap()
}

/// `sh -c SCRIPT` in the test host, which must succeed; its output.
fn ok(host: &TestHost, script: &str) -> String {
    let out = sh(host, script);
    assert!(out.status.success(), "{script}: {}", text(&out));
    text(&out)
}

fn exists(host: &TestHost, path: &str) -> bool {
    sh(host, &format!("test -e {path}")).status.success()
}

#[test]
fn the_debian_package_installs_berth_with_a_working_reap_timer_and_purges_only_what_it_made() {
    let Some(images) = real_containers() else { return };
    let Some(deb) = package() else { return };
    let fields = std::process::Command::new("dpkg-deb").arg("-f").arg(&deb).args(["Depends", "Recommends"]).output();
    let fields = text(&fields.unwrap());
    for needle in ["systemd-container", "debootstrap | mmdebstrap", "Recommends: bubblewrap"] {
        assert!(fields.contains(needle), "{needle} not declared: {fields}");
    }
    let name = deb.file_name().unwrap().to_str().unwrap().to_owned();
    let dir = deb.parent().unwrap().canonicalize().unwrap();
    let host = TestHost::boot(&images, "package", false, &[(dir, "/mnt/berth-deb", false)]);
    let out = host.command("systemctl").args(["is-system-running", "--wait"]).output().unwrap();
    eprintln!("test host: {}", text(&out).trim());
    assert!(!exists(&host, "/usr/bin/berth"), "the test host has a berth before the package");

    // Installed by apt, offline: the test host has every dependency (and
    // bubblewrap, only recommended, is not fetched).
    ok(&host, &format!("apt-get install -y -q --no-install-recommends /mnt/berth-deb/{name}"));
    let version = ok(&host, "/usr/bin/berth --version");
    assert!(version.starts_with("berth "), "{version}");
    assert!(ok(&host, "dpkg-query -W -f='${Conffiles}' berth").contains("/etc/berth/config.toml"));

    // The example configuration, as installed.
    assert!(ok(&host, "berth --runner nspawn describe").contains("backend:     nspawn"));
    assert!(ok(&host, "berth --runner debug describe").contains("backend:     dry-run"));
    // The plugin, where the example says, loads (owned by root, not writable by others).
    ok(&host, "printf '[runners.bwrap]\\nplugin = \"/usr/lib/berth/libberth_backend_bwrap.so\"\\n[runners.bwrap.settings]\\nimages_dir = \"/var/lib/berth/images\"\\n' > /root/bwrap.toml");
    assert!(ok(&host, "berth --config /root/bwrap.toml describe").contains("backend:     bwrap"));
    // The installed berth checks its host: systemd as PID 1 and the package's
    // dependencies are there; no image is built yet, which doctor names with its fix.
    let doctor = sh(&host, "berth doctor --json");
    let report: serde_json::Value =
        serde_json::from_slice(&doctor.stdout).unwrap_or_else(|e| panic!("{e}: {doctor:?}"));
    let nspawn = report["runners"].as_array().unwrap().iter().find(|r| r["name"] == "nspawn").unwrap();
    let level = |check: &str| {
        nspawn["findings"].as_array().unwrap().iter().find(|f| f["check"] == check).map(|f| f["level"].clone())
    };
    assert_eq!(level("host mode"), Some("ok".into()), "{nspawn}");
    assert_eq!(level("systemd-nspawn"), Some("ok".into()), "{nspawn}");
    assert_eq!(level("images").or_else(|| level("images_dir")), Some("error".into()), "{nspawn}");
    assert_eq!(doctor.status.code(), Some(1), "an error makes doctor exit 1");

    // Man pages, one per command, and completions.
    for page in ["berth", "berth-reap", "berth-image-create", "berth-gitlab-config"] {
        let text = ok(&host, &format!("zcat /usr/share/man/man1/{page}.1.gz"));
        assert!(text.contains(&format!(".TH {page} 1")), "{page}: {text}");
    }
    assert!(ok(&host, "zcat /usr/share/man/man1/berth-reap.1.gz").contains("\\-\\-grace"));
    for file in [
        "/usr/share/bash-completion/completions/berth",
        "/usr/share/zsh/vendor-completions/_berth",
        "/usr/share/fish/vendor_completions.d/berth.fish",
    ] {
        assert!(ok(&host, &format!("cat {file}")).contains("gitlab-config"), "{file}");
    }

    // The units as systemd reads them: no unknown key or bad value (the
    // test host has no `man`, which their Documentation= names).
    let verify = text(&sh(
        &host,
        "systemd-analyze verify /usr/lib/systemd/system/berth-reap.service /usr/lib/systemd/system/berth-reap.timer",
    ));
    let problems: Vec<&str> = verify.lines().filter(|l| !l.trim().is_empty() && !l.contains("Command 'man ")).collect();
    assert!(problems.is_empty(), "{verify}");

    // The timer: enabled and running after installation.
    assert_eq!(ok(&host, "systemctl is-enabled berth-reap.timer").trim(), "enabled");
    assert_eq!(ok(&host, "systemctl is-active berth-reap.timer").trim(), "active");

    // The service, under its hardening, really reaps: a dead job of the
    // nspawn runner whose state holds a mount (as a job's overlay does) is
    // unmounted in the host's mount namespace and removed.
    let job = "/var/lib/berth/jobs/nspawn-4242";
    ok(&host, &format!("mkdir -p {job}/container/root && mount -t tmpfs berth-test {job}/container/root"));
    let started = sh(&host, "systemctl start berth-reap.service");
    let journal = ok(&host, "journalctl -q -o cat -u berth-reap.service");
    assert!(started.status.success(), "{}{journal}", text(&started));
    assert!(journal.contains("removed nspawn-4242"), "{journal}");
    assert!(!exists(&host, job), "{journal}");
    assert!(!ok(&host, "cat /proc/self/mountinfo").contains(job), "the job's mount is left: {journal}");
    assert_eq!(ok(&host, "systemctl show -P Result berth-reap.service").trim(), "success");

    // Purge: what the package made goes, the admin's images stay.
    ok(&host, "mkdir -p /var/lib/berth/images/x/etc && echo kept > /var/lib/berth/images/x/etc/marker");
    ok(&host, "dpkg --purge berth");
    for gone in [
        "/usr/bin/berth",
        "/etc/berth/config.toml",
        "/usr/lib/berth",
        "/usr/lib/systemd/system/berth-reap.service",
        "/usr/lib/systemd/system/berth-reap.timer",
        "/etc/systemd/system/timers.target.wants/berth-reap.timer",
        "/etc/systemd/system/berth-reap.timer",
        "/usr/share/man/man1/berth.1.gz",
        "/usr/share/bash-completion/completions/berth",
    ] {
        assert!(!exists(&host, gone), "{gone} is left after purge");
    }
    assert_ne!(sh(&host, "systemctl is-active berth-reap.timer").status.code(), Some(0));
    assert_eq!(ok(&host, "cat /var/lib/berth/images/x/etc/marker").trim(), "kept");
}
