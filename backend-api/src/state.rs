//! The per-job state area: what prepare made, found again by run, cleanup and reap.
//!
//! Layout under the state directory (default `/var/lib/berth`):
//!
//! ```text
//! jobs/<key>.lock   flock(2) lock file of the job (exists while the job has state)
//! jobs/<key>/       the job's directory: job.json (the record) and the backend's files
//!   stage           the step a hook started last ([`Stage`]), for `berth ps`:
//!                   a symbolic link whose target is `<started_unix> <name>`
//!   status.json     the job's environment as its backend describes it ([`JobStatus`])
//!   scratch/<name>/ the backend's scratch directories ([`JobState::scratch`])
//! logs/             records meant to outlive their job ([`RunnerInfo::logs_dir`](crate::RunnerInfo::logs_dir))
//! ```
//!
//! Every operation on a job holds its lock, so a cleanup that arrives while a
//! killed `run` is still exiting waits for it instead of racing it. Only
//! `berth ps` reads a job's files without it ([`StateDir::peek_all`]): every
//! file is written to a temporary name and renamed, so it reads a whole file
//! or none.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::status::{JobPeek, JobStatus, Stage};
use crate::JobKey;

/// The job's record.
const RECORD: &str = "job.json";
/// The step a hook started last: a symbolic link whose target is
/// `<started_unix> <name>` ([`Stage`]).
const STAGE: &str = "stage";
/// The backend's description of the job's environment.
const STATUS: &str = "status.json";
/// The directory of the backend's scratch directories.
const SCRATCH: &str = "scratch";

/// The directory of job `key`'s scratch directories under the state
/// directory `root` ([`JobState::scratch`]).
pub(crate) fn scratch_root(root: &Path, key: &JobKey) -> PathBuf {
    StateDir::new(root).jobs.join(key.to_string()).join(SCRATCH)
}

/// Now, in seconds since the Unix epoch.
pub(crate) fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Errors of the state area.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// A filesystem operation failed.
    #[error("failed to {action} {path}")]
    Io {
        /// What was being done ("create", "lock", "read", ...).
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A state file holds something unreadable.
    #[error("failed to parse {path} (remove the job with `berth cleanup` or `berth reap`)")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// `run` was called for a job that prepare never set up.
    #[error("job {0} has no environment: prepare did not run or did not finish, or cleanup already removed it")]
    NotPrepared(JobKey),
    /// The file name is not a plain file name.
    #[error("{0:?} is not a valid state file name")]
    BadName(String),
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io { action, path: path.to_owned(), source }
}

/// The record every job state starts with (`job.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JobRecord {
    /// The job.
    pub key: JobKey,
    /// The backend that prepared it.
    pub backend: String,
    /// When prepare started, in seconds since the Unix epoch.
    pub created_unix: u64,
    /// The runner's per-job temporary directory; the runner removes it when
    /// the job ends, so its absence tells reap the job is gone.
    pub runner_tmpdir: Option<PathBuf>,
    /// The job timeout in seconds.
    pub timeout_secs: Option<u64>,
}

impl JobRecord {
    /// A record of `key` prepared now by `backend`.
    pub fn new(key: JobKey, backend: impl Into<String>) -> Self {
        JobRecord { key, backend: backend.into(), created_unix: now_unix(), runner_tmpdir: None, timeout_secs: None }
    }

    /// With the runner's temporary directory.
    pub fn runner_tmpdir(mut self, dir: Option<PathBuf>) -> Self {
        self.runner_tmpdir = dir;
        self
    }

    /// With the job timeout.
    pub fn timeout_secs(mut self, secs: Option<u64>) -> Self {
        self.timeout_secs = secs;
        self
    }
}

/// berth's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    jobs: PathBuf,
}

/// How long to wait for a job's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Block,
    NoWait,
}

impl StateDir {
    /// The state directory at `root`; nothing is created until a job needs it.
    pub fn new(root: impl AsRef<Path>) -> Self {
        StateDir { jobs: root.as_ref().join("jobs") }
    }

    /// Creates and locks the state of a job about to be prepared, writing its
    /// record. Any state left by an earlier attempt of the same job is kept:
    /// the backend's prepare sees it through [`JobState::dir`].
    pub fn create(&self, record: JobRecord) -> Result<JobState, StateError> {
        let mut state = self.lock(&record.key, Wait::Block)?.expect("blocking lock");
        mkdir_private(&state.dir)?;
        state.save(RECORD, &record)?;
        state.record = Some(record);
        Ok(state)
    }

    /// Locks the state of a prepared job (for `run`).
    pub fn open(&self, key: &JobKey) -> Result<JobState, StateError> {
        let state = self.lock(key, Wait::Block)?.expect("blocking lock");
        if state.record.is_none() {
            let key = key.clone();
            // Never leave a lock file behind for a job that has no state.
            state.remove()?;
            return Err(StateError::NotPrepared(key));
        }
        Ok(state)
    }

    /// Locks the state of a job for cleanup, whether or not it was ever
    /// prepared ([`JobState::record`] is `None` then).
    pub fn open_for_cleanup(&self, key: &JobKey) -> Result<JobState, StateError> {
        Ok(self.lock(key, Wait::Block)?.expect("blocking lock"))
    }

    /// Locks a job's state only if no hook holds it now (for reap).
    pub fn try_open(&self, key: &JobKey) -> Result<Option<JobState>, StateError> {
        self.lock(key, Wait::NoWait)
    }

    /// The jobs that have state here, sorted.
    pub fn list(&self) -> Result<Vec<JobKey>, StateError> {
        let entries = match fs::read_dir(&self.jobs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list", &self.jobs)(e)),
        };
        let mut keys: Vec<JobKey> = entries
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                let name = name.strip_suffix(".lock").map(str::to_owned).unwrap_or(name);
                JobKey::try_from(name).ok()
            })
            .collect();
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// Every job with state here, read without taking any lock (for
    /// `berth ps`), sorted: what a job's files said when they were read. A
    /// job whose files all vanished meanwhile (its cleanup finished) is left
    /// out; a file that cannot be read is named in [`JobPeek::unreadable`].
    pub fn peek_all(&self) -> Result<Vec<JobPeek>, StateError> {
        let keys = self.list()?;
        let locks = std::fs::read_to_string("/proc/locks").ok().map(|text| held_locks(&text));
        let mut peeks = Vec::with_capacity(keys.len());
        for key in keys {
            let dir = self.jobs.join(key.to_string());
            let lock_path = self.jobs.join(format!("{key}.lock"));
            let mut unreadable = Vec::new();
            let record: Option<JobRecord> = peek_file(&dir, RECORD, &mut unreadable);
            let status: Option<JobStatus> = peek_file(&dir, STATUS, &mut unreadable);
            let stage = peek_stage(&dir, &mut unreadable);
            let lock_file = fs::metadata(&lock_path).ok();
            if record.is_none() && lock_file.is_none() && !dir.exists() {
                continue;
            }
            let locked = match (&locks, lock_file) {
                (Some(locks), Some(meta)) => Some(locks.contains(&file_id(&meta))),
                (Some(_), None) => Some(false),
                (None, _) => None,
            };
            peeks.push(JobPeek { key, record, status, stage, locked, unreadable });
        }
        Ok(peeks)
    }

    fn lock(&self, key: &JobKey, wait: Wait) -> Result<Option<JobState>, StateError> {
        if let Some(root) = self.jobs.parent() {
            mkdir_private(root)?;
        }
        mkdir_private(&self.jobs)?;
        let lock_path = self.jobs.join(format!("{key}.lock"));
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&lock_path)
                .map_err(io_err("create", &lock_path))?;
            let arg = match wait {
                Wait::Block => FlockArg::LockExclusive,
                Wait::NoWait => FlockArg::LockExclusiveNonblock,
            };
            let lock = match Flock::lock(file, arg) {
                Ok(lock) => lock,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) if wait == Wait::NoWait => return Ok(None),
                Err((_, errno)) => return Err(io_err("lock", &lock_path)(errno.into())),
            };
            // The holder we waited for may have removed the lock file (cleanup):
            // our lock is then on a dead inode. Start again on the current file.
            let held = lock.metadata().map_err(io_err("lock", &lock_path))?;
            match fs::metadata(&lock_path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {}
                _ => continue,
            }
            let dir = self.jobs.join(key.to_string());
            let mut state = JobState {
                key: key.clone(),
                dir,
                lock_path,
                record: None,
                _lock: Some(lock),
                handed_over: Default::default(),
            };
            state.record = state.load(RECORD)?;
            return Ok(Some(state));
        }
    }
}

/// File `name` of a job's directory `dir`, read without the job's lock:
/// `None` when it is not there, or cannot be read or parsed (then said in
/// `unreadable`).
fn peek_file<T: DeserializeOwned>(dir: &Path, name: &str, unreadable: &mut Vec<String>) -> Option<T> {
    let why = match fs::read(dir.join(name)) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(value) => return Some(value),
            Err(e) => format!("not what berth writes ({e})"),
        },
        // Not written yet, or the job's directory is being removed.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => e.to_string(),
    };
    unreadable.push(format!("{name}: {why}"));
    None
}

/// The stage link of a job's directory `dir` (see [`JobState::set_stage`]).
fn peek_stage(dir: &Path, unreadable: &mut Vec<String>) -> Option<Stage> {
    let why = match fs::read_link(dir.join(STAGE)) {
        Ok(target) => match target.to_str().and_then(Stage::parse) {
            Some(stage) => return Some(stage),
            None => format!("{target:?} is not `<started_unix> <name>`"),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => e.to_string(),
    };
    unreadable.push(format!("{STAGE}: {why}"));
    None
}

/// A file's identity as `/proc/locks` gives it: device major, minor, inode.
type FileId = (u64, u64, u64);

fn file_id(meta: &fs::Metadata) -> FileId {
    let dev = meta.dev();
    (libc::major(dev) as u64, libc::minor(dev) as u64, meta.ino())
}

/// The files on which a process holds a `flock(2)` lock, from the text of
/// `/proc/locks` (`1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF`; the
/// device in hexadecimal; lines with `->` are waiters, not holders).
fn held_locks(text: &str) -> std::collections::HashSet<FileId> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(1) != Some(&"FLOCK") {
                return None;
            }
            let mut id = fields.get(5)?.split(':');
            let major = u64::from_str_radix(id.next()?, 16).ok()?;
            let minor = u64::from_str_radix(id.next()?, 16).ok()?;
            Some((major, minor, id.next()?.parse().ok()?))
        })
        .collect()
}

/// Creates `path` (and missing parents) with mode 0700, whatever the umask;
/// an existing directory that others can enter is tightened to 0700, and
/// one that is not berth's user's is refused.
fn mkdir_private(path: &Path) -> Result<(), StateError> {
    DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(io_err("create", path))?;
    let meta = fs::symlink_metadata(path).map_err(io_err("inspect", path))?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(io_err("use", path)(io::Error::other(format!(
            "it is not a directory of berth's user (uid {}): job state holds job tokens; remove it or point state_dir elsewhere",
            nix::unistd::geteuid()
        ))));
    }
    if meta.mode() & 0o077 != 0 {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io_err("tighten the mode of", path))?;
        tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.mode() & 0o777), "tightened to 0700: job state holds job tokens");
    }
    Ok(())
}

/// The locked state of one job. The lock is released when it is dropped.
#[derive(Debug)]
pub struct JobState {
    key: JobKey,
    dir: PathBuf,
    lock_path: PathBuf,
    record: Option<JobRecord>,
    _lock: Option<Flock<File>>,
    /// A background process holds the lock now and removes the state.
    handed_over: std::cell::Cell<bool>,
}

impl JobState {
    /// The state of `key` in `dir`, whose lock another party holds: the host
    /// process, when a backend runs as a plugin ([`crate::plugin`]).
    pub fn held_elsewhere(key: JobKey, dir: PathBuf, record: Option<JobRecord>) -> JobState {
        let lock_path = dir.with_extension("lock");
        JobState { key, dir, lock_path, record, _lock: None, handed_over: Default::default() }
    }

    /// The job.
    pub fn key(&self) -> &JobKey {
        &self.key
    }

    /// The job's private directory (mode 0700). It exists once prepare started;
    /// during cleanup of a job that was never prepared it does not.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The job's record; `None` when the job was never prepared.
    pub fn record(&self) -> Option<&JobRecord> {
        self.record.as_ref()
    }

    /// Stores `value` as JSON in file `name` of the job's directory, atomically.
    pub fn save<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        let path = self.file(name)?;
        mkdir_private(&self.dir)?;
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let bytes =
            serde_json::to_vec_pretty(value).map_err(|source| StateError::Parse { path: path.clone(), source })?;
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("write", &tmp))?;
        file.write_all(&bytes).map_err(io_err("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("write", &path))
    }

    /// Reads file `name` of the job's directory; `None` if it does not exist.
    pub fn load<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StateError> {
        let path = self.file(name)?;
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|source| StateError::Parse { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    /// The job's scratch directory `name` (`<dir>/scratch/<name>`, mode
    /// 0700), created with its parents if missing: where a backend puts the
    /// files and directories it makes for the job (a writable layer, a
    /// builds directory, a home, sockets, copies of scripts). It is part of
    /// the job's state, so it is removed with it after cleanup, whatever the
    /// job left in it ([`JobState::remove`]); nothing of it outlives the
    /// job. Records meant to outlive the job (transcripts, boot logs) go to
    /// [`RunnerInfo::logs_dir`](crate::RunnerInfo::logs_dir) instead.
    ///
    /// `name` is a plain file name (no `/`, not hidden). Every hook may
    /// call it: prepare to make the directory, run to find it again. An
    /// existing directory is kept as it is (a backend may have given it to
    /// the job's user); anything else in its place is an error. Its
    /// path is known before the job has state:
    /// [`RunnerInfo::host_dirs`](crate::RunnerInfo::host_dirs) gives the
    /// builds directory's (scratch `builds`) to `config`.
    pub fn scratch(&self, name: &str) -> Result<PathBuf, StateError> {
        let parent = self.dir.join(SCRATCH);
        let dir = crate::child_path(&parent, name).ok_or_else(|| StateError::BadName(name.to_owned()))?;
        mkdir_private(&self.dir)?;
        mkdir_private(&parent)?;
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let meta = fs::symlink_metadata(&dir).map_err(io_err("inspect", &dir))?;
                match meta.is_dir() {
                    true => Ok(dir),
                    false => Err(io_err("use", &dir)(io::Error::other("it is not a directory"))),
                }
            }
            Err(e) => Err(io_err("create", &dir)(e)),
        }
    }

    /// Records what the backend made for the job (`status.json`), for
    /// `berth ps`: a backend calls it once the job's environment exists.
    pub fn set_status(&self, status: &JobStatus) -> Result<(), StateError> {
        self.save(STATUS, status)
    }

    /// Records that a hook starts step `name` (`stage`), for `berth ps`, in
    /// the job's directory, which must exist (as it does once
    /// [`StateDir::create`] or [`StateDir::open`] returned).
    ///
    /// The record is a symbolic link whose target is the text, made under a
    /// temporary name and renamed over the last one: atomic for a reader, and
    /// cheap for a stage, as a link holds no data block (about 30 µs on ext4,
    /// where a small file renamed over another costs 0.3 to 1.5 ms).
    pub fn set_stage(&self, name: &str) -> Result<(), StateError> {
        let stage = Stage::now(name);
        let (path, tmp) = (self.dir.join(STAGE), self.dir.join(format!(".{STAGE}.tmp")));
        let target = format!("{} {}", stage.started_unix, stage.name);
        let made = match std::os::unix::fs::symlink(&target, &tmp) {
            // One a killed hook left is in the way.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                fs::remove_file(&tmp).and_then(|()| std::os::unix::fs::symlink(&target, &tmp))
            }
            made => made,
        };
        made.map_err(io_err("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("write", &path))
    }

    fn file(&self, name: &str) -> Result<PathBuf, StateError> {
        crate::child_path(&self.dir, name).ok_or_else(|| StateError::BadName(name.to_owned()))
    }

    /// Removes the job's directory and lock file (after the backend's cleanup).
    ///
    /// Whatever the job left in it is removed with [`crate::remove_tree`]
    /// (any depth, width or names, bounded descriptors). The record goes
    /// last: a removal that fails keeps the job listed with its record, so
    /// the next cleanup or `reap` tries again.
    pub fn remove(self) -> Result<(), StateError> {
        self.remove_files()
        // The lock is released here, after the lock file is gone: a waiter
        // notices it locked a removed file and starts again.
    }

    fn remove_files(&self) -> Result<(), StateError> {
        match fs::read_dir(&self.dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(io_err("list", &self.dir))?;
                    if entry.file_name() != RECORD {
                        let path = entry.path();
                        crate::remove_tree(&path).map_err(io_err("remove", &path))?;
                    }
                }
                crate::remove_tree(&self.dir).map_err(io_err("remove", &self.dir))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("list", &self.dir)(e)),
        }
        match fs::remove_file(&self.lock_path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &self.lock_path)(e)),
        }
    }

    /// Hands the rest of the job's teardown to a background process
    /// ([`crate::process::detach`], its output appended to `log`) that holds
    /// the job's lock until it ends: it runs `work` and then removes the
    /// job's state as [`JobState::remove`] does. Meanwhile, the next hook of
    /// the same job (a retried prepare, a second cleanup) waits for the lock,
    /// as it waits for any hook; a background process that fails or dies
    /// leaves the state with its record, so the next cleanup or `reap`
    /// finishes it.
    ///
    /// `Ok(false)`: nothing was handed over (this state's lock is held by
    /// another process, as for a plugin, or this process has several
    /// threads); the caller does the work itself. After `Ok(true)`, the
    /// caller must not remove the state: [`JobState::handed_over`] says so.
    pub fn finish_in_background(&self, log: &Path, work: impl FnOnce() -> Result<(), String>) -> std::io::Result<bool> {
        let Some(lock) = &self._lock else { return Ok(false) };
        let handed = crate::process::detach(log, &[lock.as_raw_fd()], || {
            let result = work().and_then(|()| self.remove_files().map_err(|e| format!("{e}")));
            match result {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("job {}: the background part of its cleanup failed: {e}", self.key);
                    1
                }
            }
        })?;
        self.handed_over.set(handed);
        Ok(handed)
    }

    /// Whether [`JobState::finish_in_background`] handed the job's state to a
    /// background process, which removes it.
    pub fn handed_over(&self) -> bool {
        self.handed_over.get()
    }
}

impl Drop for JobState {
    fn drop(&mut self) {
        // Handed over: the background process shares the lock's open file
        // description; closing this descriptor without LOCK_UN (which would
        // release it for both) leaves the lock to it.
        if self.handed_over.get() {
            if let Some(lock) = self._lock.take() {
                let fd = lock.as_raw_fd();
                std::mem::forget(lock);
                // SAFETY: `fd` was the forgotten lock's own descriptor, closed once, here.
                unsafe { libc::close(fd) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u64) -> JobKey {
        JobKey::new("demo", id).unwrap()
    }

    #[test]
    fn a_state_dir_others_can_enter_is_tightened_and_new_ones_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        // New: the state dir and its jobs dir are berth's alone, whatever the umask.
        let fresh = root.path().join("fresh");
        let states = StateDir::new(&fresh);
        drop(states.create(JobRecord::new(JobKey::new("r", 1).unwrap(), "dry-run")).unwrap());
        for dir in [fresh.clone(), fresh.join("jobs"), fresh.join("jobs/r-1")] {
            assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700, "{}", dir.display());
        }
        // Existing and loose (as `berth image` used to leave it): tightened.
        let loose = root.path().join("loose");
        fs::create_dir_all(loose.join("jobs")).unwrap();
        for dir in [loose.clone(), loose.join("jobs")] {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        }
        drop(StateDir::new(&loose).create(JobRecord::new(JobKey::new("r", 2).unwrap(), "dry-run")).unwrap());
        for dir in [loose.clone(), loose.join("jobs")] {
            assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700, "{}", dir.display());
        }
        // Not a directory: refused, with the path.
        let file = root.path().join("file");
        fs::write(&file, "").unwrap();
        let err = StateDir::new(&file).create(JobRecord::new(JobKey::new("r", 3).unwrap(), "dry-run")).unwrap_err();
        assert!(err.to_string().contains(file.to_str().unwrap()), "{err}");
    }

    #[test]
    fn prepare_run_cleanup_round_trip() {
        let root = tempfile::tempdir().unwrap();
        let states = StateDir::new(root.path());
        assert!(matches!(states.open(&key(1)), Err(StateError::NotPrepared(_))));
        assert!(states.list().unwrap().is_empty(), "a failed open leaves nothing behind");

        let state = states.create(JobRecord::new(key(1), "fake")).unwrap();
        state.save("machine.json", &"berth-demo-1").unwrap();
        drop(state);

        let state = states.open(&key(1)).unwrap();
        assert_eq!(state.record().unwrap().backend, "fake");
        assert_eq!(state.load::<String>("machine.json").unwrap().as_deref(), Some("berth-demo-1"));
        assert!(state.load::<String>("../escape").is_err());
        drop(state);
        assert_eq!(states.list().unwrap(), vec![key(1)]);

        states.open_for_cleanup(&key(1)).unwrap().remove().unwrap();
        assert!(states.list().unwrap().is_empty());
        let again = states.open_for_cleanup(&key(1)).unwrap();
        assert!(again.record().is_none());
        again.remove().unwrap();
        assert_eq!(fs::read_dir(root.path().join("jobs")).unwrap().count(), 0);
    }

    #[test]
    fn scratch_directories_are_private_found_again_and_removed_with_the_state() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let states = StateDir::new(root.path());
        let state = states.create(JobRecord::new(key(7), "fake")).unwrap();
        let builds = state.scratch("builds").unwrap();
        assert_eq!(builds, root.path().join("jobs/demo-7/scratch/builds"));
        assert_eq!(builds, scratch_root(root.path(), &key(7)).join("builds"), "known before the state is");
        assert_eq!(fs::metadata(&builds).unwrap().mode() & 0o777, 0o700);
        fs::write(builds.join("file"), "x").unwrap();
        // Given to the job: found again as it is.
        fs::set_permissions(&builds, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(state.scratch("builds").unwrap(), builds);
        assert!(builds.join("file").exists() && fs::metadata(&builds).unwrap().mode() & 0o777 == 0o755);
        for bad in ["", "../x", "a/b", ".hidden"] {
            assert!(matches!(state.scratch(bad), Err(StateError::BadName(_))), "{bad:?}");
        }
        std::os::unix::fs::symlink("/", builds.parent().unwrap().join("link")).unwrap();
        assert!(state.scratch("link").unwrap_err().to_string().contains("failed to use"));
        state.remove().unwrap();
        assert!(!root.path().join("jobs/demo-7").exists());
    }

    #[test]
    fn a_failed_removal_keeps_the_record_for_the_next_attempt() {
        let root = tempfile::tempdir().unwrap();
        let states = StateDir::new(root.path());
        let state = states.create(JobRecord::new(key(3), "fake")).unwrap();
        // A mount point left in the job's tree: removal refuses to cross it.
        let point = state.dir().join("upper/mnt");
        fs::create_dir_all(&point).unwrap();
        if nix::mount::mount(Some("tmpfs"), &point, Some("tmpfs"), nix::mount::MsFlags::empty(), None::<&str>).is_err()
        {
            assert!(!crate::testing::prerequisite(Some("cannot mount a tmpfs here (needs root)".into())));
            return;
        }
        fs::write(state.dir().join("machine.json"), "{}").unwrap();
        let err = state.remove().unwrap_err();
        assert!(format!("{:?}", err).contains("another filesystem"), "{err:?}");
        assert_eq!(states.list().unwrap(), vec![key(3)], "the job is still listed");
        let again = states.try_open(&key(3)).unwrap().unwrap();
        assert!(again.record().is_some(), "its record survives, so reap retries it");
        nix::mount::umount(&point).unwrap();
        again.remove().unwrap();
        assert!(states.list().unwrap().is_empty());
    }

    #[test]
    fn a_multi_threaded_process_hands_nothing_over() {
        let root = tempfile::tempdir().unwrap();
        let states = StateDir::new(root.path());
        let state = states.create(JobRecord::new(key(4), "fake")).unwrap();
        // The test harness runs this test in a thread of its own: no fork.
        let mut ran = false;
        let handed = state.finish_in_background(&root.path().join("log"), || {
            ran = true;
            Ok(())
        });
        assert!(!handed.unwrap() && !ran && !state.handed_over());
        let held_elsewhere = JobState::held_elsewhere(key(5), root.path().join("jobs/demo-5"), None);
        assert!(!held_elsewhere.finish_in_background(&root.path().join("log"), || Ok(())).unwrap());
        state.remove().unwrap();
        assert!(states.list().unwrap().is_empty());
    }

    #[test]
    fn a_status_and_a_stage_are_read_back_without_the_lock() {
        let root = tempfile::tempdir().unwrap();
        let states = StateDir::new(root.path());
        assert!(states.peek_all().unwrap().is_empty(), "no state dir: no jobs");
        let state = states.create(JobRecord::new(key(6), "fake")).unwrap();
        let status =
            JobStatus::new().image("bookworm", Some(3)).machine("berth-demo-6").cgroup(Some("/sys/fs/cgroup/x".into()));
        state.set_status(&status).unwrap();
        state.set_stage("build_script").unwrap();
        let peek = states.peek_all().unwrap().pop().unwrap();
        assert_eq!(peek.key, key(6));
        assert_eq!(peek.record.as_ref().map(|r| r.backend.as_str()), Some("fake"));
        assert_eq!(peek.status.as_ref(), Some(&status));
        assert_eq!(peek.stage.as_ref().map(|s| s.name.as_str()), Some("build_script"));
        assert!(peek.stage.unwrap().started_unix >= peek.record.unwrap().created_unix);
        assert_eq!(peek.locked, Some(true), "this process holds the job's lock");
        // A temporary link a killed hook left does not stop the next stage.
        std::os::unix::fs::symlink("x", root.path().join("jobs/demo-6/.stage.tmp")).unwrap();
        state.set_stage("after_script").unwrap();
        assert_eq!(states.peek_all().unwrap()[0].stage.as_ref().map(|s| s.name.as_str()), Some("after_script"));
        assert!(peek.unreadable.is_empty(), "{:?}", peek.unreadable);
        drop(state);
        assert_eq!(states.peek_all().unwrap()[0].locked, Some(false), "released");
        // Only through its files: no temporary file is left beside them.
        let names: Vec<String> = fs::read_dir(root.path().join("jobs/demo-6"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    }

    #[test]
    fn a_status_of_a_newer_berth_or_with_fields_missing_is_read() {
        let status: JobStatus = serde_json::from_str(r#"{"image":"bookworm","future":[1,2]}"#).unwrap();
        assert_eq!(status, JobStatus::new().image("bookworm", None));
        let back: JobStatus = serde_json::from_slice(&serde_json::to_vec(&status).unwrap()).unwrap();
        assert_eq!(back, status);
    }

    #[test]
    fn peeking_tolerates_missing_and_broken_files_and_skips_vanished_jobs() {
        let root = tempfile::tempdir().unwrap();
        let states = StateDir::new(root.path());
        let jobs = root.path().join("jobs");
        fs::create_dir_all(jobs.join("demo-1")).unwrap();
        // A record cut short (as no berth writes it) and a stage that is not a link.
        fs::write(jobs.join("demo-1/job.json"), br#"{"key":"demo-1","backend":"#).unwrap();
        fs::write(jobs.join("demo-1/stage"), b"1 build").unwrap();
        // A lock file alone: prepare has just begun, or it was killed before its record.
        fs::write(jobs.join("demo-2.lock"), b"").unwrap();
        // A directory without its lock file (a removal half done), with a status only.
        fs::create_dir_all(jobs.join("demo-3")).unwrap();
        fs::write(jobs.join("demo-3/status.json"), br#"{"image":"trixie"}"#).unwrap();
        // A status that is a directory: unreadable.
        fs::create_dir_all(jobs.join("demo-4/status.json")).unwrap();
        // Not a job's name: ignored.
        fs::create_dir_all(jobs.join("..junk")).unwrap();
        let peeks = states.peek_all().unwrap();
        let keys: Vec<String> = peeks.iter().map(|p| p.key.to_string()).collect();
        assert_eq!(keys, ["demo-1", "demo-2", "demo-3", "demo-4"]);
        let [one, two, three, four] = &peeks[..] else { unreachable!() };
        assert!(one.unreadable[1].starts_with("stage: "), "{:?}", one.unreadable);
        assert!(one.record.is_none() && one.stage.is_none());
        assert_eq!(one.unreadable.len(), 2, "{:?}", one.unreadable);
        assert!(one.unreadable[0].starts_with("job.json: not what berth writes"), "{:?}", one.unreadable);
        assert!(two.record.is_none() && two.unreadable.is_empty() && two.locked == Some(false));
        assert_eq!(three.status.as_ref().and_then(|s| s.image.as_deref()), Some("trixie"));
        assert!(four.status.is_none() && four.unreadable[0].starts_with("status.json: "), "{:?}", four.unreadable);
        // A job whose files are all gone by the time they are read is left out.
        fs::remove_dir_all(jobs.join("demo-3")).unwrap();
        fs::remove_file(jobs.join("demo-2.lock")).unwrap();
        let keys: Vec<String> = states.peek_all().unwrap().iter().map(|p| p.key.to_string()).collect();
        assert_eq!(keys, ["demo-1", "demo-4"]);
    }

    #[test]
    fn flock_holders_are_read_from_proc_locks_and_waiters_are_not() {
        let text = "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 1300 fd:01:9999 0 EOF\n\
                    2: POSIX  ADVISORY  WRITE 99 08:11:42 0 EOF\n\
                    3: OFDLCK ADVISORY  READ  -1 00:05:7 0 EOF\n\
                    garbage\n";
        let held = held_locks(text);
        assert_eq!(held.into_iter().collect::<Vec<_>>(), [(0xfd, 1, 5678)]);
    }

    #[test]
    fn a_held_lock_makes_try_open_wait_and_survives_removal() {
        let root = tempfile::tempdir().unwrap();
        let states = StateDir::new(root.path());
        let held = states.create(JobRecord::new(key(2), "fake")).unwrap();
        assert!(states.try_open(&key(2)).unwrap().is_none());
        let waiter = {
            let states = states.clone();
            std::thread::spawn(move || states.open_for_cleanup(&key(2)).unwrap().record().is_some())
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        held.remove().unwrap();
        assert!(!waiter.join().unwrap(), "the waiter sees the state as removed");
    }
}
