//! Writing into a job's root filesystem from the host, safely.
//!
//! A job controls its root: it can replace any directory or file with a
//! symbolic link to a host path. The host must never follow such a link when
//! it writes a stage script into the root, or reads something back.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// `root/rel`, created where missing, refusing any component that is not a
/// real directory (a symbolic link planted by the job).
pub fn real_dir(root: &Path, rel: &str) -> io::Result<PathBuf> {
    let mut dir = root.to_path_buf();
    for part in Path::new(rel).components() {
        dir.push(part);
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} in the job's root is not a directory", dir.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(&dir)?,
            Err(e) => return Err(e),
        }
    }
    Ok(dir)
}

/// Writes `bytes` to a fresh file `name` in `root/rel` (mode 0644), replacing
/// whatever the job left under that name without following it.
pub fn place_file(root: &Path, rel: &str, name: &str, bytes: &[u8]) -> io::Result<PathBuf> {
    let path = real_dir(root, rel)?.join(name);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file =
        OpenOptions::new().write(true).create_new(true).mode(0o644).custom_flags(libc::O_NOFOLLOW).open(&path)?;
    file.write_all(bytes)?;
    Ok(path)
}

/// Reads file `path` (at most 4 KiB), not following a symbolic link.
pub fn read_small(path: &Path) -> io::Result<String> {
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
    let mut text = String::new();
    Read::take(file, 4096).read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planted_links_are_neither_followed_nor_used_as_directories() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("run")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("run/berth")).unwrap();
        assert!(place_file(root.path(), "run/berth", "s.sh", b"x").is_err(), "a linked directory is refused");
        std::fs::remove_file(root.path().join("run/berth")).unwrap();
        std::fs::create_dir(root.path().join("run/berth")).unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "host data").unwrap();
        std::os::unix::fs::symlink(&victim, root.path().join("run/berth/s.sh")).unwrap();
        let placed = place_file(root.path(), "run/berth", "s.sh", b"script").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "host data", "the link was replaced, not followed");
        assert_eq!(std::fs::read_to_string(&placed).unwrap(), "script");
        std::os::unix::fs::symlink(&victim, root.path().join("run/berth/rc")).unwrap();
        assert!(read_small(&root.path().join("run/berth/rc")).is_err());
    }
}
