//! The container's root: its layer, the image's idmapped clone, the overlay,
//! the cache, and the files written on the fresh layer before boot.

use std::fs;
use std::path::Path;

use berth_backend_api::Failure;
use nix::mount::MsFlags;

use super::{layer_dir, root_dir, upper_dir, Home};
use crate::{Nspawn, BUILDS_DIR};
use berth_backend_support::image::Image;
use berth_backend_support::settings::sys;
use berth_backend_support::userns::{self, Range, UserNs};
use berth_backend_support::{diskfs, mounts, rootfs};

/// Creates directory `path` (its parent exists) with `mode`, owned by the
/// job's root when there is a range: what the container sees as its own.
fn make_dir(path: &Path, mode: u32, owner: Option<Range>) -> Result<(), Failure> {
    rootfs::make_dir(path, mode, owner.map(|range| (range.base, range.base)))
}

fn give(path: &Path, owner: Option<Range>) -> Result<(), Failure> {
    match owner {
        Some(range) => {
            userns::give(path, range).map_err(|e| Failure::system_with("failed to prepare the job's layer", e))
        }
        None => Ok(()),
    }
}

/// Writes a file of the container (in the fresh upper layer, before boot),
/// creating its directories like the image has them (0755), all the job's.
fn write_in_layer(upper: &Path, rel: &str, content: &[u8], owner: Option<Range>) -> Result<(), Failure> {
    let path = upper.join(rel);
    make_parents(upper, &path, owner)?;
    fs::write(&path, content).map_err(sys(format!("failed to write {}", path.display())))?;
    give(&path, owner)
}

fn make_parents(upper: &Path, path: &Path, owner: Option<Range>) -> Result<(), Failure> {
    let rel = path.parent().and_then(|p| p.strip_prefix(upper).ok()).unwrap_or(Path::new(""));
    let mut dir = upper.to_path_buf();
    for part in rel.components() {
        dir.push(part);
        if !dir.is_dir() {
            make_dir(&dir, 0o755, owner)?;
        }
    }
    Ok(())
}

/// Masks units or generators for the container's systemd: a link to
/// /dev/null in `rel` of the job's fresh overlay layer (the image is not
/// touched; nothing in the layer was written by a container yet).
fn mask(upper: &Path, rel: &str, names: &[String], owner: Option<Range>) -> Result<(), Failure> {
    for name in names {
        let link = upper.join(rel).join(name);
        make_parents(upper, &link, owner)?;
        std::os::unix::fs::symlink("/dev/null", &link)
            .map_err(|e| Failure::system_with(format!("failed to mask {name} ({})", link.display()), e))?;
        give(&link, owner)?;
    }
    Ok(())
}

/// Mounts the container's root and what is bound into it (see the module
/// doc) in `home`'s directory (it exists); `cache` is the project's cache
/// directory when the container is a job's (nspawn binds it at boot), none
/// for a warm container, which gets an empty `/cache` to be mounted on when a
/// job takes it.
pub(super) fn build_root(
    backend: &Nspawn,
    home: &Home,
    cache: Option<&Path>,
    image: &Image,
    machine: &str,
    users: Option<Range>,
) -> Result<(), Failure> {
    let dir = &home.dir;
    let layer = layer_dir(dir);
    make_dir(&layer, 0o755, users)?;
    if let Some(size) = backend.limits.disk {
        diskfs::mount_bounded(&*backend.host, &dir.join("layer.img"), size, &layer, users)
            .map_err(sys("failed to make the job's disk (settings.disk_max)"))?;
    }
    let upper = upper_dir(dir);
    let work = layer.join("work");
    make_dir(&upper, 0o755, users)?;
    make_dir(&work, 0o700, None)?;
    make_dir(&upper.join(BUILDS_DIR.trim_start_matches('/')), 0o755, users)?;
    // The image's /etc/hostname would win over --machine; an empty machine-id
    // makes systemd generate one per boot instead of every job sharing the image's.
    write_in_layer(&upper, "etc/hostname", format!("{machine}\n").as_bytes(), users)?;
    write_in_layer(&upper, "etc/machine-id", b"", users)?;
    mask(&upper, "etc/systemd/system", &backend.masked_units, users)?;
    mask(&upper, "etc/systemd/system-generators", &backend.masked_generators, users)?;
    make_dir(&dir.join("scripts"), 0o700, users)?;
    // The cache: the project's directory, private to root on the host, and
    // bound nosuid,nodev, so that nothing a job leaves there is a set-uid
    // program or a device for anyone on the host.
    match cache {
        Some(cache) => {
            let cache_mount = dir.join("cache");
            make_dir(&cache_mount, 0o700, None)?;
            mounts::bind_guarded(&*backend.host, cache, &cache_mount, true)
                .map_err(sys("failed to mount the job's cache"))?;
        }
        // A warm container: the cache is mounted at take, on this directory
        // (and the directories above it the image lacks).
        None => {
            let rel = backend.cache_dir.strip_prefix("/").unwrap_or(&backend.cache_dir);
            let mut above = std::path::PathBuf::new();
            for part in rel.parent().into_iter().flat_map(Path::iter) {
                above.push(part);
                if !fs::symlink_metadata(image.root.join(&above)).is_ok_and(|m| m.is_dir()) {
                    make_dir(&upper.join(&above), 0o755, users)?;
                }
            }
            make_dir(&upper.join(rel), 0o755, users)?;
        }
    }
    let lower = match users {
        Some(range) => {
            let lower = dir.join("lower");
            make_dir(&lower, 0o755, None)?;
            let ns = UserNs::new(range).map_err(sys("failed to create the job's user namespace"))?;
            let attrs = userns::Attrs { read_only: true, nodev: true, nosuid: false };
            userns::mount_idmapped(&image.root, &lower, &ns, attrs)
                .map_err(sys("failed to mount the image for the job"))?;
            lower
        }
        None => image.root.clone(),
    };
    let root = root_dir(dir);
    make_dir(&root, 0o755, None)?;
    mounts::mount_overlay_with(&*backend.host, &lower, &upper, &work, &root, MsFlags::MS_NODEV)
        .map_err(sys("failed to mount the container's root"))?;
    Ok(())
}
