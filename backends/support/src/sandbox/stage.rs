//! A stage: what its entry needs, opened before its process is forked.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_backend_api::process::{self, Ended};
use berth_backend_api::{Cancel, Failure, JobState};

use super::{enter, sandbox_name, seccomp, Paths, Record, Sandbox, PATH, RECORD, SCRIPTS_DIR};
use crate::cgroup::JobCgroup;
use crate::rootfs;
use crate::settings::sys;
use crate::userns::UserNs;

impl Sandbox {
    /// The job's record, and its root, checked to be mounted: what a stage needs.
    pub fn load(&self, state: &JobState) -> Result<(Record, Paths), Failure> {
        let record: Record = state
            .load(RECORD)?
            .ok_or_else(|| Failure::system("the job's root was never prepared (prepare did not finish)"))?;
        let paths = Paths::of(state);
        if !crate::mounts::mounts_under_on(&*self.host, &paths.root).iter().any(|point| point == &paths.root) {
            return Err(Failure::system(format!(
                "the job's root {} is not mounted (host rebooted?)",
                paths.root.display()
            )));
        }
        Ok((record, paths))
    }

    /// Everything a stage's entry needs, opened here (before the stage's
    /// process is forked): the script placed in the job's root, the user
    /// namespace, the cgroup to join, the system call filters.
    pub fn stage(&self, state: &JobState, script: &Path) -> Result<Stage, Failure> {
        let (record, paths) = self.load(state)?;
        let name = format!("stage-{}.sh", std::process::id());
        let body = fs::read(script).map_err(sys(format!("failed to read the stage script {}", script.display())))?;
        // The job owns its root: never follow a link it planted.
        let copy = rootfs::place_file(&paths.root, SCRIPTS_DIR, &name, &body)
            .map_err(sys(format!("failed to copy the stage script into {}", paths.root.display())))?;
        // The script holds the job's secrets: only its user reads it.
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o600))
            .map_err(sys("failed to protect the stage script"))?;
        let (uid, gid) = record.host_ids();
        std::os::unix::fs::lchown(&copy, Some(uid), Some(gid))
            .map_err(sys("failed to give the stage script to the job"))?;
        let userns = match record.users {
            Some(_) => Some(UserNs::open(&paths.userns).map_err(sys("failed to open the job's user namespace"))?),
            None => None,
        };
        let (cgroup, join) = match &record.cgroup {
            Some(group) => {
                let group = JobCgroup::on(self.host.clone(), group);
                let dir = group.stage_dir().map_err(sys("failed to open the job's cgroup"))?;
                let join: enter::Joiner =
                    Box::new(group.stage_joiner().map_err(sys("failed to join the job's cgroup"))?);
                (dir, Some(join))
            }
            None => (None, None),
        };
        let filters =
            seccomp::filters().map_err(|e| Failure::system(format!("failed to build the system call filter: {e}")))?;
        Ok(Stage {
            script: format!("/{SCRIPTS_DIR}/{name}"),
            copy,
            record,
            paths,
            userns,
            cgroup,
            join,
            filters,
            hostname: sandbox_name(state.key()),
        })
    }

    /// Runs a stage's command (its entry set up), and removes the stage's script.
    pub fn run(&self, stage: &Stage, cmd: &mut Command, cancel: &Cancel, what: &str) -> Result<(), Failure> {
        cmd.env_clear().env("PATH", PATH).env("HOME", &stage.record.home).env("LANG", "C.UTF-8").stdin(Stdio::null());
        let _ = std::io::Write::flush(&mut std::io::stdout());
        let ended = process::run(cmd, cancel, Duration::from_secs(2)).map_err(crate::settings::stage_start(
            format!("failed to run {what}"),
            &stage.record.image,
            stage.paths.root.join("bin/bash"),
        ))?;
        let _ = fs::remove_file(&stage.copy);
        match ended {
            Ended::Exited(0) => Ok(()),
            Ended::Exited(code) => Err(Failure::script(code)),
            Ended::Cancelled => Err(Failure::Cancelled),
        }
    }
}

/// What a stage's entry needs (see [`Sandbox::stage`]).
pub struct Stage {
    /// The script's path in the job.
    pub script: String,
    /// The script's copy on the host.
    copy: PathBuf,
    /// The job's record.
    pub record: Record,
    /// The job's paths.
    pub paths: Paths,
    /// The job's user namespace, unless it runs as host root.
    pub userns: Option<UserNs>,
    /// The job's cgroup2 directory for a stage's processes, which they start in.
    pub cgroup: Option<std::os::fd::OwnedFd>,
    /// Joins the job's cgroup where there is no such directory (cgroup v1)
    /// or the kernel cannot start a process in it (no `clone3`).
    pub join: Option<enter::Joiner>,
    /// The system call filters.
    pub filters: Vec<seccomp::Program>,
    /// The job's hostname.
    pub hostname: String,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage").field("script", &self.script).field("record", &self.record).finish_non_exhaustive()
    }
}

impl Stage {
    /// The user namespace's descriptor, if any.
    pub fn userns_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.userns.as_ref().map(|ns| ns.fd())
    }
}
