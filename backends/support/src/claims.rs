//! Host-wide names a job holds while it lives (a uid range, a machine name),
//! recorded under `/run/berth` where no job can reach them.
//!
//! A claim is a file created with `O_EXCL` whose content is its owner, the
//! job's state directory: two berth processes, of any runner or
//! configuration, never hold the same name, and a job is recognised by what
//! berth itself recorded, never by anything a job can forge (such as the
//! arguments of a process). Cleanup releases a job's claims; `reap` releases
//! those whose job's state is gone. `/run` is a tmpfs: claims go with the
//! containers at a reboot.

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where berth keeps its host-wide claims.
pub const HOST_DIR: &str = "/run/berth";

/// A directory of claims.
#[derive(Debug, Clone)]
pub struct Claims {
    dir: PathBuf,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 200 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn bad_name(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?} is not a claim name"))
}

impl Claims {
    /// The claims of kind `kind` (`userns`, `machines`) of this host.
    pub fn host(kind: &str) -> Claims {
        Claims { dir: Path::new(HOST_DIR).join(kind) }
    }

    /// Claims kept in `dir` (tests).
    pub fn in_dir(dir: impl Into<PathBuf>) -> Claims {
        Claims { dir: dir.into() }
    }

    /// Claims `name` for `owner`: true if it is now `owner`'s, false if someone else holds it.
    /// A claim `owner` already holds is kept (true).
    pub fn claim(&self, name: &str, owner: &Path) -> io::Result<bool> {
        if !valid_name(name) {
            return Err(bad_name(name));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.dir.display())))?;
        let path = self.dir.join(name);
        match OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&path) {
            Ok(mut file) => {
                let mut text = owner.as_os_str().as_bytes().to_vec();
                text.push(b'\n');
                if let Err(e) = file.write_all(&text) {
                    let _ = fs::remove_file(&path);
                    return Err(e);
                }
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(self.owner(name).as_deref() == Some(owner)),
            Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        }
    }

    /// Who holds `name`.
    pub fn owner(&self, name: &str) -> Option<PathBuf> {
        if !valid_name(name) {
            return None;
        }
        let mut text = Vec::new();
        let file = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(self.dir.join(name));
        file.ok()?.take(4096).read_to_end(&mut text).ok()?;
        Some(PathBuf::from(OsStr::from_bytes(text.strip_suffix(b"\n").unwrap_or(&text))))
    }

    /// Releases `name` if `owner` holds it (a name someone else holds is left alone).
    pub fn release(&self, name: &str, owner: &Path) -> io::Result<()> {
        if self.owner(name).as_deref() != Some(owner) {
            return Ok(());
        }
        match fs::remove_file(self.dir.join(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Gives `name`, held by `from`, to `to` (a warm container handed to a
    /// job): the claim file is replaced atomically, so the name is held by
    /// one of them at every moment. False if `from` does not hold it.
    pub fn transfer(&self, name: &str, from: &Path, to: &Path) -> io::Result<bool> {
        if self.owner(name).as_deref() != Some(from) {
            return Ok(false);
        }
        let tmp = self.dir.join(format!(".{name}.{}", std::process::id()));
        let mut text = to.as_os_str().as_bytes().to_vec();
        text.push(b'\n');
        let _ = fs::remove_file(&tmp);
        let mut file =
            OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&tmp)?;
        file.write_all(&text)?;
        fs::rename(&tmp, self.dir.join(name))
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", tmp.display())))?;
        Ok(true)
    }

    /// Every claim whose name starts with `prefix`, with its owner, by name.
    pub fn list(&self, prefix: &str) -> Vec<(String, PathBuf)> {
        let Ok(entries) = fs::read_dir(&self.dir) else { return Vec::new() };
        let mut all: Vec<(String, PathBuf)> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| name.starts_with(prefix))
            .filter_map(|name| {
                let owner = self.owner(&name)?;
                Some((name, owner))
            })
            .collect();
        all.sort();
        all
    }

    /// Claims named with `prefix` whose owner lies under `jobs_dir` and no
    /// longer exists (the job's state is gone).
    pub fn orphans(&self, prefix: &str, jobs_dir: &Path) -> Vec<(String, PathBuf)> {
        self.list(prefix).into_iter().filter(|(_, owner)| owner.starts_with(jobs_dir) && !owner.exists()).collect()
    }

    /// [`Claims::orphans`] of `runner`'s jobs (`berth-<runner>-<id>` owned under
    /// its state dir), with each job's key. `berth-<runner>-` also prefixes the
    /// names of a runner called `<runner>-x`: the key must be this runner's.
    pub fn orphans_of(
        &self,
        runner: &berth_backend_api::RunnerInfo,
    ) -> Vec<(String, PathBuf, berth_backend_api::JobKey)> {
        let prefix = format!("berth-{}-", runner.name);
        self.orphans(&prefix, &runner.state_dir.join("jobs"))
            .into_iter()
            .filter_map(|(name, owner)| {
                let key = berth_backend_api::JobKey::try_from(name["berth-".len()..].to_owned()).ok()?;
                (key.runner() == runner.name).then_some((name, owner, key))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_has_one_owner_who_alone_releases_it() {
        let dir = tempfile::tempdir().unwrap();
        let claims = Claims::in_dir(dir.path().join("machines"));
        let jobs = dir.path().join("jobs");
        let (a, b) = (jobs.join("r-1"), jobs.join("r-2"));
        assert!(claims.claim("berth-r-1", &a).unwrap());
        assert!(claims.claim("berth-r-1", &a).unwrap(), "its owner keeps it");
        assert!(!claims.claim("berth-r-1", &b).unwrap(), "someone else does not get it");
        claims.release("berth-r-1", &b).unwrap();
        assert_eq!(claims.owner("berth-r-1"), Some(a.clone()));
        assert!(claims.claim("berth-r-2", &b).unwrap());
        std::fs::create_dir_all(&b).unwrap();
        assert_eq!(claims.orphans("berth-r-", &jobs), vec![("berth-r-1".to_owned(), a.clone())]);
        claims.release("berth-r-1", &a).unwrap();
        assert_eq!(claims.list(""), vec![("berth-r-2".to_owned(), b.clone())]);
        // A transfer: only from its holder, and the name is never free meanwhile.
        assert!(!claims.transfer("berth-r-2", &a, &a).unwrap(), "a does not hold it");
        assert!(claims.transfer("berth-r-2", &b, &a).unwrap());
        assert_eq!(claims.list(""), vec![("berth-r-2".to_owned(), a.clone())], "no temporary file is left");
        assert!(!claims.claim("berth-r-2", &b).unwrap());
        for bad in ["", "../x", "a/b", "."] {
            assert!(claims.claim(bad, &a).is_err(), "{bad:?}");
        }
    }
}
