//! A booted "test host": a container whose PID 1 is systemd, in which
//! berth's systemd host mode (and standalone mode on a cgroup2-only host) is
//! exercised. Shared by the integration tests and the backends bench
//! (`benches/backends.rs` includes this file with `#[path]`).

use std::os::fd::AsFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A booted "test host" container whose PID 1 is systemd, for systemd mode.
pub struct TestHost {
    nspawn: std::process::Child,
    leader: i32,
    /// Its own cgroups (one per hierarchy nspawn uses): two test hosts never share one.
    cgroups: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl TestHost {
    /// Boots test host `name`; `unified` gives it a cgroup2-only hierarchy
    /// (what a container gets on a cgroup2 host), else the host's layout.
    pub fn boot(images: &Path, name: &str, unified: bool, binds: &[(PathBuf, &str, bool)]) -> TestHost {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("upper");
        std::fs::create_dir_all(upper.join("etc")).unwrap();
        std::fs::write(upper.join("etc/hostname"), "testhost\n").unwrap();
        let name = format!("berth-testhost-{name}-{}", std::process::id());
        let socket_name = format!("{name}-notify");
        let socket = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(socket_name.as_bytes()).unwrap()).unwrap();
        let root = images.join("testhost/current").canonicalize().unwrap();
        // nspawn --keep-unit makes its cgroups inside the one it starts in.
        let cgroups: Vec<PathBuf> = ["/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .map(Path::new)
            .filter(|h| h.join("cgroup.procs").exists())
            .take(if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() { 1 } else { 2 })
            .map(|h| h.join("berth-test").join(&name))
            .collect();
        let mut join = String::new();
        for cgroup in &cgroups {
            std::fs::create_dir_all(cgroup).unwrap();
            join.push_str(&format!("echo $$ > {}/cgroup.procs; ", cgroup.display()));
        }
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!("{join}exec systemd-nspawn \"$@\"")).arg("sh");
        if unified {
            cmd.env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1");
        }
        // A real host's services run without a system call filter; the test
        // host's would otherwise filter every service in it (a filtered
        // process cannot copy a container's filters, so berth's stages would
        // take their slower path there). Its job containers keep theirs:
        // this variable reaches the test host's nspawn, not the ones in it.
        cmd.env("SYSTEMD_SECCOMP", "0");
        cmd.args(["--quiet", "--register=no", "--keep-unit", "--console=passive", "--notify-ready=yes"])
            .arg(format!("--machine={name}"))
            .arg("--directory")
            .arg(&root)
            .arg(format!("--overlay={}:{}:/", root.display(), upper.display()))
            .arg("--capability=all")
            // berth's disk_max attaches loop devices (and makes the node of a new one).
            .arg("--bind=/dev/loop-control");
        for (source, target, writable) in binds {
            cmd.arg(format!("--bind{}={}:{target}", if *writable { "" } else { "-ro" }, source.display()));
        }
        let log = std::fs::File::create(dir.path().join("boot.log")).unwrap();
        let nspawn = cmd
            .arg("--boot")
            .env("NOTIFY_SOCKET", format!("@{socket_name}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let n = socket.recv(&mut buf).expect("the test host did not get ready within 60 s");
            if buf[..n].split(|b| *b == b'\n').any(|l| l == b"READY=1") {
                break;
            }
            assert!(Instant::now() < deadline, "the test host did not get ready");
        }
        let _ = socket.as_fd();
        let leader = loop {
            let children = std::fs::read_to_string(format!("/proc/{}/task/{}/children", nspawn.id(), nspawn.id()))
                .unwrap_or_default();
            if let Some(child) = children.split_whitespace().next() {
                break child.parse().unwrap();
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        TestHost { nspawn, leader, cgroups, _dir: dir }
    }

    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.leader.to_string(), "-a", "--", program]);
        cmd
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.leader), nix::sys::signal::Signal::SIGKILL);
        let _ = self.nspawn.wait();
        for cgroup in &self.cgroups {
            remove_cgroup(cgroup);
        }
    }
}

/// Removes a cgroup directory and those below it, deepest first.
fn remove_cgroup(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup(&entry.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}
