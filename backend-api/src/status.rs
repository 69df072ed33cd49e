//! What `berth ps` shows of a job, written into the job's state directory
//! by the hooks (the stage running) and by the backend (its environment),
//! and read back without taking the job's lock ([`crate::StateDir::peek_all`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{JobKey, JobRecord};

/// What a backend tells `berth ps` about a job it prepared (`status.json`),
/// written once its environment exists with [`crate::JobState::set_status`].
///
/// Every field is optional: a backend fills in what it has, `berth ps` shows
/// `-` for the rest. Unknown fields are ignored when read, so a newer berth
/// may add some.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct JobStatus {
    /// The image the job runs on (its name in the image store).
    pub image: Option<String>,
    /// The image's generation the job pinned, for images with generations.
    pub generation: Option<u64>,
    /// The container's machine name, for a backend that runs a container.
    pub machine: Option<String>,
    /// The job's root filesystem on the host, for a backend without a container.
    pub root: Option<PathBuf>,
    /// The directory of the cgroup that holds the job's processes and
    /// accounts their memory: a cgroup2 directory (`memory.current`) or one
    /// of the v1 `memory` hierarchy (`memory.usage_in_bytes`), under
    /// `/sys/fs/cgroup`.
    pub cgroup: Option<PathBuf>,
}

impl JobStatus {
    /// An empty status.
    pub fn new() -> Self {
        Self::default()
    }

    /// With the image and its generation.
    pub fn image(mut self, name: impl Into<String>, generation: Option<u64>) -> Self {
        self.image = Some(name.into());
        self.generation = generation;
        self
    }

    /// With the container's machine name.
    pub fn machine(mut self, name: impl Into<String>) -> Self {
        self.machine = Some(name.into());
        self
    }

    /// With the job's root filesystem on the host.
    pub fn root(mut self, root: impl Into<PathBuf>) -> Self {
        self.root = Some(root.into());
        self
    }

    /// With the cgroup that accounts the job's memory (see [`JobStatus::cgroup`]).
    pub fn cgroup(mut self, dir: Option<PathBuf>) -> Self {
        self.cgroup = dir;
        self
    }
}

/// The step a hook is running (`stage`): `prepare`, a stage's name as the
/// runner gave it to `run`, or `cleanup`. Written by the hooks when they
/// start it ([`crate::JobState::set_stage`]), left in place when it ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Stage {
    /// Its name.
    pub name: String,
    /// When it started, in seconds since the Unix epoch.
    pub started_unix: u64,
}

impl Stage {
    /// Stage `name`, started now.
    pub fn now(name: impl Into<String>) -> Self {
        Stage { name: name.into(), started_unix: crate::state::now_unix() }
    }

    /// A stage as its record says it: `<started_unix> <name>`.
    pub fn parse(text: &str) -> Option<Self> {
        let (started, name) = text.split_once(' ')?;
        Some(Stage { name: name.to_owned(), started_unix: started.parse().ok()? })
    }
}

/// A job's state as read without its lock, for `berth ps`
/// ([`crate::StateDir::peek_all`]): each file as it was when read, or
/// `None` when it was not there.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct JobPeek {
    /// The job.
    pub key: JobKey,
    /// Its record; `None` before prepare wrote it (or once cleanup removed it).
    pub record: Option<JobRecord>,
    /// What its backend said about its environment.
    pub status: Option<JobStatus>,
    /// The last step a hook started.
    pub stage: Option<Stage>,
    /// Whether a hook (or the background part of a cleanup) holds the job's
    /// lock now; `None` when this host does not say (no `/proc/locks`).
    pub locked: Option<bool>,
    /// The job's files that could not be read, each with why.
    pub unreadable: Vec<String>,
}
