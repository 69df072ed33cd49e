//! Image maintenance (`berth image create --setup`, `update`, `shell`) in
//! the same sandbox as jobs: an image may come from a `docker export` of
//! unknown origin, and its scripts run as its root.
//!
//! The draft generation is mounted idmapped on a view of its own under
//! `/run/berth-image` (host uid 0 of its files shows as the root of a uid
//! range allocated for the run, and what that root writes is written as
//! uid 0, so the image's ownership stays what it is), furnished with a
//! minimal `/dev`, a read-only `/sys` and the host's `resolv.conf`
//! (read-only), and entered like a job's stage ([`super::enter`]): a
//! cgroup with the default bounds, `pivot_root`, the range's user
//! namespace, the capabilities a build needs, `no_new_privs`, the system
//! call filters. The host's network is shared (package managers need it).
//! Everything is undone when the command ends, whatever it did.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use super::{enter, seccomp};
use crate::cgroup::JobCgroup;
use crate::host::System;
use crate::limits::{LimitSettings, Limits};
use crate::mounts;
use crate::rootfs::real_dir;
use crate::userns::{self, Allocator, UserNs};

const VIEWS: &str = "/run/berth-image";

fn err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// The view of a draft while a command runs in it, undone on drop.
struct View {
    dir: PathBuf,
    name: String,
    owner: PathBuf,
}

impl Drop for View {
    fn drop(&mut self) {
        if let Err(e) = super::teardown::kill_cgroup(&crate::host::system(), &self.name) {
            eprintln!("WARNING: {e}");
        }
        if let Err(e) = mounts::unmount_all(&System, &self.dir) {
            eprintln!("WARNING: failed to unmount {}: {e}", self.dir.display());
        }
        let _ = fs::remove_dir(self.dir.join("root"));
        let _ = fs::remove_dir(&self.dir);
        let _ = Allocator::host().release_all(&self.owner);
    }
}

/// Runs `cmd` (its program and arguments as the image sees them; stdio and
/// environment as set) as root inside the image whose draft is `draft`, in
/// the sandbox the module doc describes.
pub fn run_in_image(draft: &Path, cmd: &mut Command) -> io::Result<ExitStatus> {
    let name = format!("berth-image-{}", std::process::id());
    let views = Path::new(VIEWS);
    fs::DirBuilder::new().mode(0o700).recursive(true).create(views).map_err(|e| err(VIEWS, e))?;
    let dir = views.join(&name);
    fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| err(dir.display(), e))?;
    let range =
        Allocator::host().allocate(draft).map_err(|e| err("failed to allocate a uid range for the image", e))?;
    let mut cgroup = JobCgroup::of(&name);
    let limits = Limits::of(&LimitSettings::default()).map_err(io::Error::other)?;
    let view = View { dir: dir.clone(), name: name.clone(), owner: draft.to_owned() };
    cgroup.create(&limits).map_err(|e| err("failed to create a cgroup for the image's command", e))?;
    let root = dir.join("root");
    fs::DirBuilder::new().mode(0o755).create(&root).map_err(|e| err(root.display(), e))?;
    let ns = UserNs::new(range).map_err(|e| err("failed to create a user namespace", e))?;
    userns::mount_idmapped(draft, &root, &ns, userns::Attrs { read_only: false, nosuid: false, nodev: true })?;
    furnish(&root)?;
    let stage_dir = cgroup.stage_dir()?;
    let spec = enter::Spec {
        root: &root,
        userns: Some(ns.fd()),
        ids: (0, 0),
        hostname: "berth-image",
        cgroup: stage_dir.as_ref().map(std::os::fd::AsFd::as_fd),
        join: Some(Box::new(cgroup.stage_joiner()?)),
        filters: seccomp::filters()?,
        private_network: false,
    };
    enter::install_spec(cmd, spec)?;
    let status = cmd.status();
    drop(view);
    status
}

/// A minimal `/dev`, a read-only `/sys` ([`super::mount_system_dirs`]) and
/// the host's resolv.conf (read-only), mounted on the view, never in the image.
fn furnish(root: &Path) -> io::Result<()> {
    super::mount_system_dirs(&System, root, 64 << 20, None)?;
    let resolv = real_dir(root, "etc").map_err(|e| err("/etc in the image", e))?.join("resolv.conf");
    if fs::symlink_metadata(&resolv).is_ok_and(|m| m.is_file()) {
        mounts::bind(&System, Path::new("/etc/resolv.conf"), &resolv, false)?;
    }
    Ok(())
}
