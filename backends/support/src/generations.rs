//! Images with generations, maintained by `berth image`.
//!
//! ```text
//! IMAGES_DIR/.NAME.lock            flock(2): one `berth image` command per image at a time
//! IMAGES_DIR/NAME/current          symlink to generations/N: what new jobs get
//! IMAGES_DIR/NAME/generations/N/   a root filesystem, never changed once published
//! IMAGES_DIR/NAME/generations/.N.tmp/   being built; removed if the build fails
//! ```
//!
//! Every change makes a new generation and switches `current` atomically
//! (rename of a symlink). A running job keeps the generation it started from
//! (changing an overlayfs lower directory under a mounted overlay is undefined
//! behaviour); generations that are neither current nor used by a job are
//! removed by [`Images::prune`]. A generation is in use while an overlay mount
//! in this mount namespace has it as a lower directory, or a process (a
//! container) names it in its arguments.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::image::valid_name;

/// The current generation of the image at `image_dir`: `None` for a plain
/// image (a root filesystem directory without generations).
pub fn current(image_dir: &Path) -> io::Result<Option<(u64, PathBuf)>> {
    let link = image_dir.join("current");
    let target = match fs::read_link(&link) {
        Ok(target) => target,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let root = image_dir.join(&target).canonicalize()?;
    let generations = image_dir.join("generations").canonicalize()?;
    let number = root.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<u64>().ok());
    match number {
        Some(number) if root.parent() == Some(generations.as_path()) && root.is_dir() => Ok(Some((number, root))),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} does not point to a generation", link.display()),
        )),
    }
}

/// Who uses the root filesystem `root`: overlay mounts with it as a lower
/// directory, mounts of it (the idmapped clones jobs get), and processes
/// (containers) that name it.
pub fn users_of(root: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let identity = fs::metadata(root).ok().map(|m| (m.dev(), m.ino()));
    let root = root.to_string_lossy().into_owned();
    let mut users = Vec::new();
    for mount in crate::mounts::mountinfo() {
        let point = mount.point.display();
        let lower = mount.super_options.split(',').find_map(|o| o.strip_prefix("lowerdir=")).unwrap_or("");
        // A mount of the generation itself: on its device, its root the generation's directory.
        let device = identity.map(|(dev, _)| format!("{}:{}", libc::major(dev), libc::minor(dev)));
        let clone = device.as_deref() == Some(mount.device.as_str())
            && mount.root != Path::new("/")
            && fs::metadata(&mount.point).is_ok_and(|m| Some((m.dev(), m.ino())) == identity);
        if lower.split(':').any(|l| l == root) || clone {
            users.push(format!("mount {point}"));
        }
    }
    let overlay = format!("--overlay={root}:");
    // This process too, as the scan of /proc always did.
    let me = crate::proc::Process::read(std::process::id() as i32);
    for process in crate::proc::processes().into_iter().chain(me) {
        let args = &process.cmdline;
        if args.iter().any(|a| a == root.as_bytes() || a.starts_with(overlay.as_bytes())) {
            let name = String::from_utf8_lossy(args.first().map(Vec::as_slice).unwrap_or(b"?")).into_owned();
            users.push(format!("process {} ({name})", process.pid));
        }
    }
    users
}

/// The image directory of a `berth image` command.
#[derive(Debug, Clone)]
pub struct Images {
    dir: PathBuf,
}

/// A held lock on one image.
#[derive(Debug)]
pub struct ImageLock {
    _file: nix::fcntl::Flock<File>,
    name: String,
}

/// A generation being built; removed on drop unless published.
#[derive(Debug)]
pub struct Draft {
    tmp: PathBuf,
    number: u64,
    image_dir: PathBuf,
    published: bool,
}

/// What `list` shows of an image.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    /// Its name.
    pub name: String,
    /// The current generation (`None`: a plain directory image).
    pub generation: Option<u64>,
    /// Every generation on disk.
    pub generations: Vec<u64>,
    /// The current root filesystem.
    pub root: PathBuf,
    /// When the current generation was made.
    pub created: Option<SystemTime>,
    /// Who uses any of its generations.
    pub users: Vec<String>,
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

impl Images {
    /// The images in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Images {
        Images { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn image_dir(&self, name: &str) -> io::Result<PathBuf> {
        if !valid_name(name) {
            return Err(invalid(format!("{name:?} is not an image name (letters, digits, '.', '_', '-')")));
        }
        Ok(self.dir.join(name))
    }

    /// Locks image `name`; `waiting` is called once if another command holds it.
    pub fn lock(&self, name: &str, waiting: impl FnOnce()) -> io::Result<ImageLock> {
        self.image_dir(name)?;
        // Missing parents (berth's state directory, when the images live in
        // it) are made root's alone, as berth makes its state directory.
        if !self.dir.exists() {
            std::os::unix::fs::DirBuilderExt::mode(fs::DirBuilder::new().recursive(true), 0o700).create(&self.dir)?;
            fs::set_permissions(&self.dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        }
        let path = self.dir.join(format!(".{name}.lock"));
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
        let file = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(ImageLock { _file: lock, name: name.to_owned() }),
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => file,
            Err((_, e)) => return Err(e.into()),
        };
        waiting();
        let lock =
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| io::Error::from(e))?;
        Ok(ImageLock { _file: lock, name: name.to_owned() })
    }

    /// The images here, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| valid_name(n))
            .collect();
        names.sort();
        names
    }

    fn generation_numbers(&self, image_dir: &Path) -> Vec<u64> {
        let mut numbers: Vec<u64> = fs::read_dir(image_dir.join("generations"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        numbers.sort_unstable();
        numbers
    }

    /// What there is to know about image `name`.
    pub fn info(&self, name: &str) -> io::Result<ImageInfo> {
        let image_dir = self.image_dir(name)?;
        if !image_dir.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("there is no image {name:?} in {}", self.dir.display()),
            ));
        }
        let (generation, root) = match current(&image_dir)? {
            Some((n, root)) => (Some(n), root),
            None => (None, image_dir.clone()),
        };
        let generations = self.generation_numbers(&image_dir);
        let mut users = users_of(&root);
        for n in &generations {
            let path = image_dir.join("generations").join(n.to_string());
            if Some(*n) != generation {
                users.extend(users_of(&path.canonicalize().unwrap_or(path)));
            }
        }
        let created = fs::metadata(&root).ok().and_then(|m| m.modified().ok());
        Ok(ImageInfo { name: name.to_owned(), generation, generations, root, created, users })
    }

    /// Starts a new, empty generation of image `name` (created if new).
    pub fn draft(&self, lock: &ImageLock) -> io::Result<Draft> {
        let image_dir = self.image_dir(&lock.name)?;
        if image_dir.is_dir() && current(&image_dir)?.is_none() && fs::read_dir(&image_dir)?.next().is_some() {
            return Err(invalid(format!(
                "{} is a plain directory image, not one managed by `berth image`: import it under another name",
                image_dir.display()
            )));
        }
        let generations = image_dir.join("generations");
        fs::create_dir_all(&generations)?;
        let number = self.generation_numbers(&image_dir).last().copied().unwrap_or(0) + 1;
        let tmp = generations.join(format!(".{number}.tmp"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir(&tmp)?;
        Ok(Draft { tmp, number, image_dir, published: false })
    }

    /// Starts a new generation of image `name` as a copy of the current one
    /// (reflinks where the filesystem has them).
    pub fn draft_from_current(&self, lock: &ImageLock) -> io::Result<Draft> {
        let image_dir = self.image_dir(&lock.name)?;
        let Some((_, root)) = current(&image_dir)? else {
            return Err(invalid(format!(
                "there is no image {:?} managed by `berth image` in {}",
                lock.name,
                self.dir.display()
            )));
        };
        let draft = self.draft(lock)?;
        let out = std::process::Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(format!("{}/.", root.display()))
            .arg(&draft.tmp)
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "failed to copy {}: {}",
                root.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(draft)
    }

    /// Removes image `name`; refused while a job uses it, unless `force`.
    /// Returns what used it (forced): those jobs' next stages find no shell.
    pub fn remove(&self, lock: &ImageLock, force: bool) -> io::Result<Vec<String>> {
        let info = self.info(&lock.name)?;
        if !info.users.is_empty() && !force {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "image {:?} is in use ({}); wait for those jobs or use --force",
                    lock.name,
                    info.users.join(", ")
                ),
            ));
        }
        fs::remove_dir_all(self.image_dir(&lock.name)?)?;
        let _ = fs::remove_file(self.dir.join(format!(".{}.lock", lock.name)));
        Ok(info.users)
    }

    /// Removes generations that are neither current nor in use, and drafts
    /// left by builds that died (`dry_run`: only says what it would
    /// remove). Returns one line per removal.
    pub fn prune(&self, dry_run: bool) -> Vec<String> {
        let mut removed = Vec::new();
        for name in self.names() {
            let Ok(lock) = self.try_lock(&name) else { continue };
            let Some(lock) = lock else { continue };
            let Ok(image_dir) = self.image_dir(&lock.name) else { continue };
            let Ok(Some((current, _))) = current(&image_dir) else { continue };
            let generations = image_dir.join("generations");
            for entry in fs::read_dir(&generations).into_iter().flatten().flatten() {
                let file = entry.file_name().to_string_lossy().into_owned();
                let stale_draft = file.starts_with('.') && file.ends_with(".tmp");
                let old = file.parse::<u64>().is_ok_and(|n| n != current);
                if !(stale_draft || old) {
                    continue;
                }
                let path = entry.path();
                if old && !users_of(&path.canonicalize().unwrap_or(path.clone())).is_empty() {
                    continue;
                }
                if dry_run || fs::remove_dir_all(&path).is_ok() {
                    removed.push(format!(
                        "image {name}: {} {file}",
                        if stale_draft { "unfinished build" } else { "old generation" }
                    ));
                }
            }
        }
        removed
    }

    fn try_lock(&self, name: &str) -> io::Result<Option<ImageLock>> {
        let path = self.dir.join(format!(".{name}.lock"));
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(ImageLock { _file: lock, name: name.to_owned() })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(e.into()),
        }
    }
}

impl Draft {
    /// The root filesystem being built.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Its generation number.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// Makes the draft a generation and switches the image's `current` to it, atomically.
    pub fn publish(mut self) -> io::Result<PathBuf> {
        let done = self.image_dir.join("generations").join(self.number.to_string());
        // Its creation time, for `list` (copies keep their source's times).
        File::open(&self.tmp)?.set_modified(SystemTime::now())?;
        fs::rename(&self.tmp, &done)?;
        self.published = true;
        let tmp_link = self.image_dir.join(".current.tmp");
        let _ = fs::remove_file(&tmp_link);
        std::os::unix::fs::symlink(format!("generations/{}", self.number), &tmp_link)?;
        fs::rename(&tmp_link, self.image_dir.join("current"))?;
        // Make the switch durable before saying it happened.
        File::open(&self.image_dir)?.sync_all()?;
        Ok(done)
    }
}

impl Drop for Draft {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_dir_all(&self.tmp);
            // A new image whose first build failed leaves nothing behind.
            let generations = self.image_dir.join("generations");
            if fs::read_dir(&generations).is_ok_and(|mut d| d.next().is_none())
                && !self.image_dir.join("current").exists()
            {
                let _ = fs::remove_dir(&generations);
                let _ = fs::remove_dir(&self.image_dir);
            }
        }
    }
}

/// The total size of the files below `dir` on its filesystem, in bytes.
pub fn disk_usage(dir: &Path) -> u64 {
    fn walk(dir: &Path, dev: u64, total: &mut u64) {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.dev() != dev {
                continue;
            }
            *total += meta.blocks() * 512;
            if meta.is_dir() {
                walk(&entry.path(), dev, total);
            }
        }
    }
    let mut total = 0;
    if let Ok(meta) = fs::metadata(dir) {
        walk(dir, meta.dev(), &mut total);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_image_command_makes_missing_parents_roots_alone() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let images = Images::new(state.join("images"));
        drop(images.lock("deb", || panic!("nobody else holds it")).unwrap());
        // The state directory it made is not open to others (it holds job tokens later).
        assert_eq!(fs::metadata(&state).unwrap().mode() & 0o777, 0o700);
        assert_eq!(fs::metadata(state.join("images")).unwrap().mode() & 0o777, 0o755);
    }

    #[test]
    fn generations_are_published_atomically_and_failed_drafts_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let images = Images::new(dir.path());
        let lock = images.lock("deb", || panic!("nobody else holds it")).unwrap();
        drop(images.draft(&lock).unwrap());
        assert!(!dir.path().join("deb").exists(), "a failed first build leaves nothing");

        let draft = images.draft(&lock).unwrap();
        fs::write(draft.path().join("marker"), "1").unwrap();
        let first = draft.publish().unwrap();
        assert_eq!(current(&dir.path().join("deb")).unwrap().unwrap().0, 1);
        let draft = images.draft_from_current(&lock).unwrap();
        assert_eq!(fs::read_to_string(draft.path().join("marker")).unwrap(), "1");
        fs::write(draft.path().join("marker"), "2").unwrap();
        draft.publish().unwrap();
        let (n, root) = current(&dir.path().join("deb")).unwrap().unwrap();
        assert_eq!(n, 2);
        assert_eq!(fs::read_to_string(root.join("marker")).unwrap(), "2");
        assert_eq!(fs::read_to_string(first.join("marker")).unwrap(), "1", "old generations are untouched");
        drop(lock);
        assert_eq!(images.prune(false), vec!["image deb: old generation 1".to_owned()]);
        assert!(!first.exists());
        let info = images.info("deb").unwrap();
        assert_eq!((info.generation, info.generations), (Some(2), vec![2]));
    }

    #[test]
    fn plain_images_and_bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("plain/etc")).unwrap();
        let images = Images::new(dir.path());
        let lock = images.lock("plain", || {}).unwrap();
        assert!(images.draft(&lock).unwrap_err().to_string().contains("plain directory image"));
        assert!(images.lock("../x", || {}).is_err());
    }
}
