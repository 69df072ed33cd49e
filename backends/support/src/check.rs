//! The checks of the host that the built-in backends share (their
//! [`berth_backend_api::Backend::check`]): tools, kernel features, the image
//! store, free space.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use berth_backend_api::Finding;

use crate::image::ImageStore;
use crate::limits::{LimitSettings, Limits};
use crate::settings::which;
use crate::userns::{self, Attrs, Range, UserNs};

/// Below this much free space on the filesystem of the images or of the
/// state (where jobs write), a warning: one large build fills it.
pub const LOW_SPACE: u64 = 5 << 30;

/// A program jobs need on the host (`name`, from Debian package `package`),
/// with the first line of its `--version`.
pub fn tool(name: &str, package: &str, needed_for: &str) -> Finding {
    let Some(path) = which(name) else {
        return Finding::error(name, format!("not found on PATH ({needed_for})"), format!("apt install {package}"));
    };
    let version = Command::new(&path)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.lines().next().map(str::to_owned))
        .unwrap_or_default();
    Finding::ok(name, format!("{} {version}", path.display()).trim_end().to_owned())
}

/// The image store of a runner: its directory, the images it offers, its
/// default image. `runner` names the runner in the fixes.
pub fn images(store: &ImageStore, runner: &str) -> Vec<Finding> {
    let dir = store.dir();
    if !dir.is_dir() {
        return vec![Finding::error(
            "images_dir",
            format!("{} does not exist: every job would fail at prepare", dir.display()),
            format!(
                "build an image into it: berth --runner {runner} image create bookworm --suite bookworm (or fix settings.images_dir)"
            ),
        )];
    }
    let available = store.available();
    let mut out = Vec::new();
    if available.is_empty() {
        out.push(Finding::error(
            "images",
            format!("{} holds no image this runner allows: every job would fail at prepare", dir.display()),
            format!(
                "berth --runner {runner} image create bookworm --suite bookworm (or check settings.allowed_images)"
            ),
        ));
    } else {
        out.push(Finding::ok("images", format!("{}: {}", dir.display(), available.join(", "))));
    }
    if let Some(default) = store.default_image() {
        if available.iter().any(|name| name == default) {
            out.push(Finding::ok("default_image", default.to_owned()));
        } else {
            out.push(Finding::error(
                "default_image",
                format!(
                    "{default} is not an image of {} this runner allows: jobs without `image:` would fail",
                    dir.display()
                ),
                format!(
                    "berth --runner {runner} image create {default} --suite bookworm (or fix settings.default_image)"
                ),
            ));
        }
    }
    out
}

/// Free space on the filesystem of `path` (`what` names it: "images_dir").
pub fn free_space(what: &str, path: &Path) -> Finding {
    // The nearest existing ancestor: a state directory is made by the first job.
    let Some(existing) = path.ancestors().find(|p| p.exists()) else {
        return Finding::warning(what, format!("cannot find {}", path.display()), "check the path");
    };
    match nix::sys::statvfs::statvfs(existing) {
        Ok(stat) => {
            let free = stat.blocks_available() * stat.fragment_size();
            let detail = format!("{} free on the filesystem of {}", gib(free), path.display());
            if free < LOW_SPACE {
                Finding::warning(
                    what,
                    detail,
                    format!("free space there (jobs write their layers and caches to it), at least {}", gib(LOW_SPACE)),
                )
            } else {
                Finding::ok(what, detail)
            }
        }
        Err(e) => Finding::warning(what, format!("statvfs {}: {e}", existing.display()), "check the path"),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Whether the kernel offers filesystem `name` (`/proc/filesystems`, or a
/// module that would load on first mount).
pub fn filesystem(name: &str, needed_for: &str) -> Finding {
    let listed = std::fs::read_to_string("/proc/filesystems")
        .is_ok_and(|text| text.lines().any(|line| line.split_whitespace().last() == Some(name)));
    let release = kernel_release();
    let module = Path::new("/lib/modules").join(&release).join("kernel/fs").join(name);
    if listed {
        Finding::ok(name, "offered by the kernel")
    } else if module.is_dir() {
        Finding::ok(name, format!("module {} (loaded on first use)", module.display()))
    } else {
        Finding::error(name, format!("the kernel does not offer it ({needed_for})"), format!("modprobe {name}"))
    }
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default()
}

/// Whether this process can make user namespaces (jobs' root is a uid range of its own).
pub fn user_namespaces() -> Finding {
    let mut probe = Command::new("/bin/true");
    probe.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: unshare(2) is a system call, safe between fork and exec.
    unsafe {
        probe.pre_exec(|| nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).map_err(io::Error::from));
    }
    match probe.status() {
        Ok(status) if status.success() => Finding::ok("user namespaces", "available"),
        Ok(_) | Err(_) => {
            let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap_or_default();
            Finding::error(
                "user namespaces",
                format!("unshare(CLONE_NEWUSER) is refused (user.max_user_namespaces = {})", max.trim()),
                "sysctl -w user.max_user_namespaces=63000 (and in /etc/sysctl.d), or set private_users = false (jobs' root is then the host's root)",
            )
        }
    }
}

/// Whether an idmapped mount of `dir` (the images) can be made: how every
/// job's root shows the image's files to the job's own uid range.
pub fn idmapped_mounts(dir: &Path) -> Finding {
    let check = "idmapped mounts";
    if !dir.is_dir() {
        return Finding::warning(check, format!("not tried: {} does not exist", dir.display()), "see images_dir");
    }
    let tried = UserNs::new(Range { base: userns::POOL_START })
        .and_then(|ns| userns::clone_idmapped(dir, ns.fd(), Attrs::default()));
    match tried {
        // The detached mount goes with its descriptor.
        Ok(_mount) => Finding::ok(check, format!("supported on the filesystem of {}", dir.display())),
        Err(e) => Finding::error(
            check,
            format!("{e} (kernel {})", kernel_release()),
            "put images_dir on a filesystem that supports them (ext4, xfs, btrfs) with Linux 5.19 or later, or set private_users = false",
        ),
    }
}

/// What a runner of a backend that runs jobs on images needs (the checks
/// after the backend's own tools).
#[derive(Debug)]
pub struct Runner<'a> {
    /// The runner's name.
    pub name: &'a str,
    /// Its images.
    pub images: &'a ImageStore,
    /// Its state directory.
    pub state_dir: &'a Path,
    /// Its limits, checked.
    pub limits: &'a Limits,
    /// Its limits as written.
    pub limit_settings: &'a LimitSettings<'a>,
    /// Whether root in its jobs is a uid range of its own.
    pub private_users: bool,
    /// The gitlab-runner binary bound into its jobs, if any.
    pub gitlab_runner: Option<&'a Path>,
}

/// The checks of [`Runner`]: overlayfs, cgroups and limits, user namespaces and
/// idmapped mounts (or the warning of `private_users = false`), disk_max,
/// images, free space and gitlab-runner.
pub fn runner(runner: &Runner<'_>) -> Vec<Finding> {
    let mut out = vec![filesystem("overlay", "every job's root is an overlay of its image"), cgroups()];
    if runner.private_users {
        out.push(user_namespaces());
        out.push(idmapped_mounts(runner.images.dir()));
    } else {
        out.push(Finding::warning(
            "private_users",
            "false: root in a job is root of the host, and can take the host over",
            "remove settings.private_users (the default is true) unless every job is trusted",
        ));
    }
    for (name, default, reason) in crate::cgroup::unenforceable(runner.limit_settings) {
        out.push(Finding::warning(
            name,
            format!("settings.{name}{default} is not enforced: {reason}"),
            "enable the controller, or remove the setting",
        ));
    }
    out.extend(disk(runner.limits));
    out.extend(images(runner.images, runner.name));
    out.push(free_space("images_dir space", runner.images.dir()));
    out.push(free_space("state_dir space", runner.state_dir));
    out.push(gitlab_runner(runner.gitlab_runner));
    out
}

/// The gitlab-runner binary bound into jobs (their cache and artifact stages call it).
pub fn gitlab_runner(path: Option<&Path>) -> Finding {
    match path {
        Some(path) if path.is_file() => Finding::ok("gitlab-runner", format!("{} (bound into jobs)", path.display())),
        Some(path) => Finding::error(
            "gitlab-runner",
            format!(
                "settings.gitlab_runner {} does not exist: jobs' cache and artifact stages would fail",
                path.display()
            ),
            "fix settings.gitlab_runner",
        ),
        None => Finding::warning(
            "gitlab-runner",
            "not found on this host's PATH: jobs' cache and artifact stages fail unless their image has it",
            "install gitlab-runner on the host, or set settings.gitlab_runner",
        ),
    }
}

/// What `disk_max` needs: loop devices and mkfs.ext4 (a job's layer is a
/// filesystem of its own of that size).
pub fn disk(limits: &Limits) -> Vec<Finding> {
    let Some(bytes) = limits.disk else {
        return vec![Finding::warning(
            "disk_max",
            "infinity: a job can fill the filesystem of the state directory",
            "set settings.disk_max (e.g. \"20G\")",
        )];
    };
    let mut out = Vec::new();
    if Path::new("/dev/loop-control").exists() {
        out.push(Finding::ok("disk_max", format!("{} per job, on a loop device", gib(bytes))));
    } else {
        out.push(Finding::error(
            "disk_max",
            "this host has no /dev/loop-control: every prepare would fail",
            "modprobe loop, or set settings.disk_max = \"infinity\" (no disk bound)",
        ));
    }
    if which("mkfs.ext4").is_none() {
        out.push(Finding::error(
            "mkfs.ext4",
            "not found on PATH (disk_max makes each job's layer with it)",
            "apt install e2fsprogs",
        ));
    }
    out
}

/// The host's cgroup layout and the controllers berth sets limits with.
pub fn cgroups() -> Finding {
    use crate::host::Host;
    let root = crate::host::System.cgroup_root();
    let layout = if crate::cgroup::unified(&root) {
        "cgroup2"
    } else if root.join("unified/cgroup.procs").exists() {
        "hybrid (cgroup v1 controllers, cgroup2 for systemd)"
    } else {
        "cgroup v1"
    };
    let missing: Vec<String> = crate::cgroup::CONTROLLERS.into_iter().filter_map(|c| c.unavailable_in(&root)).collect();
    if missing.is_empty() {
        Finding::ok("cgroups", format!("{layout}; memory, pids and cpu controllers usable"))
    } else {
        Finding::warning(
            "cgroups",
            format!("{layout}; {}", missing.join("; ")),
            "the limits of those controllers are not enforced (`berth config` says which)",
        )
    }
}

#[cfg(test)]
mod tests {
    use berth_backend_api::Level;

    use super::*;

    #[test]
    fn a_missing_tool_is_an_error_naming_its_package_and_a_present_one_shows_its_version() {
        let missing = tool("no-such-tool-anywhere", "some-package", "jobs");
        assert_eq!(missing.level, Level::Error);
        assert_eq!(missing.fix.as_deref(), Some("apt install some-package"));
        let bash = tool("bash", "bash", "stages");
        assert_eq!(bash.level, Level::Ok);
        assert!(bash.detail.contains("GNU bash"), "{}", bash.detail);
    }

    #[test]
    fn an_image_store_is_checked_for_its_directory_images_and_default() {
        let dir = tempfile::tempdir().unwrap();
        let gone = ImageStore::new(dir.path().join("gone"), &[], None).unwrap();
        let found = images(&gone, "r");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].level, Level::Error);
        assert!(found[0].fix.as_deref().unwrap().contains("berth --runner r image create"), "{found:?}");

        let empty = ImageStore::new(dir.path(), &[], Some("deb".into())).unwrap();
        let found = images(&empty, "r");
        assert_eq!(found.iter().map(|f| f.level).collect::<Vec<_>>(), [Level::Error, Level::Error], "{found:?}");

        std::fs::create_dir(dir.path().join("deb")).unwrap();
        let found = images(&empty, "r");
        assert!(found.iter().all(|f| f.level == Level::Ok), "{found:?}");
        assert!(found[0].detail.ends_with(": deb"), "{found:?}");
    }

    #[test]
    fn free_space_is_measured_on_the_nearest_existing_directory() {
        let found = free_space("state_dir", Path::new("/tmp/no/such/dir/yet"));
        assert_ne!(found.level, Level::Error);
        assert!(found.detail.contains("GiB free on the filesystem of /tmp/no/such/dir/yet"), "{found:?}");
    }

    #[test]
    fn a_filesystem_the_kernel_does_not_know_is_an_error() {
        assert_eq!(filesystem("proc", "x").level, Level::Ok);
        let found = filesystem("no-such-fs", "jobs' roots");
        assert_eq!(found.level, Level::Error);
        assert_eq!(found.fix.as_deref(), Some("modprobe no-such-fs"));
    }
}
