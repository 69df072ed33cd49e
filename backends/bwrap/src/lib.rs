//! berth's bubblewrap backend: every stage of a job runs under `bwrap` in
//! the sandbox of [`berth_backend_support::sandbox`], which the chroot
//! backend shares (the job's root, its bounds, its user namespace).
//!
//! What is bwrap's own is how a stage enters the sandbox: the stage's
//! process joins the job's cgroup, becomes the host uid of the job's root
//! (an unprivileged uid of the job's range) and runs `bwrap`, which enters
//! the job's user namespace (`--userns`), binds the job's root, cache,
//! gitlab-runner and extra binds by descriptor (`--bind-fd`: bwrap itself
//! never resolves a host path), mounts its own `/proc` (with `/proc/sys`
//! read-only), a minimal `/dev` and a bounded `/dev/shm`, in PID, IPC, UTS
//! and cgroup namespaces of its own (`--die-with-parent`), keeps only the
//! capabilities a build needs and loads the system call filters
//! (`--add-seccomp-fd`). When the script ends, bwrap exits and the kernel
//! kills whatever the script left in the PID namespace; cleanup kills the
//! job's cgroup, unmounts everything and removes the writable layer.
#![deny(missing_docs)]

use std::ffi::OsString;
use std::io::{Seek, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use std::process::Command;

use berth_backend_api::{
    Backend, Cancel, ConfigOutput, Description, Failure, Finding, JobContext, JobKey, JobState, NewBackend, RunnerInfo,
};
use berth_backend_support::sandbox::{self, Sandbox, Stage, GITLAB_RUNNER, KEEP_CAPS};
use berth_backend_support::settings::sys;

pub use berth_backend_support::sandbox::Settings;

/// The bwrap backend of one runner.
#[derive(Debug)]
pub struct Bwrap {
    sandbox: Sandbox,
}

const INSTALL_HINT: &str =
    "bubblewrap is not installed on this host (no bwrap on PATH); install it (apt-get install bubblewrap)";

impl NewBackend for Bwrap {
    type Settings = Settings;

    fn new(settings: Settings, runner: &RunnerInfo) -> Result<Self, Failure> {
        Ok(Bwrap { sandbox: Sandbox::new("bwrap", settings, runner)? })
    }
}

/// The `bwrap` executable on [`sandbox::PATH`].
fn find_bwrap() -> Option<PathBuf> {
    berth_backend_support::settings::which_in(sandbox::PATH.as_ref(), "bwrap")
}

/// What bwrap gets besides its arguments: the descriptors it reads, which
/// the stage's process puts at 3, 4, ... in the order of [`Bwrap::args`].
#[derive(Debug)]
struct Fds {
    userns: Option<OwnedFd>,
    filters: Vec<OwnedFd>,
}

impl Fds {
    fn in_order(&self) -> Vec<RawFd> {
        self.userns.iter().chain(&self.filters).map(|fd| fd.as_raw_fd()).collect()
    }
}

/// A memory file holding `bytes`, read from its start.
fn memfd(bytes: &[u8]) -> std::io::Result<OwnedFd> {
    let fd = nix::sys::memfd::memfd_create(c"berth-seccomp", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(std::io::Error::from)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    file.rewind()?;
    Ok(file.into())
}

impl Bwrap {
    fn fds(&self, stage: &Stage) -> Result<Fds, Failure> {
        let userns = match stage.userns_fd() {
            Some(fd) => Some(fd.try_clone_to_owned().map_err(sys("failed to pass the job's user namespace"))?),
            None => None,
        };
        let filters = stage
            .filters
            .iter()
            .map(|f| memfd(&f.bytes()))
            .collect::<Result<_, _>>()
            .map_err(sys("failed to pass the system call filter"))?;
        Ok(Fds { userns, filters })
    }

    /// The arguments of the `bwrap` that runs `script` in the job's sandbox
    /// through its `view` ([`Sandbox::make_view`]), with `filters` system
    /// call filters; the user namespace (if `users`) and the filters are
    /// descriptors 3, 4, ... The capabilities a build needs are root's
    /// (`as_root`): a job of `settings.user` gets none, as in chroot.
    fn args(
        &self,
        view: &Path,
        users: bool,
        as_root: bool,
        key: &JobKey,
        filters: usize,
        script: &str,
    ) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |items: &[&dyn AsRef<std::ffi::OsStr>]| {
            args.extend(items.iter().map(|a| a.as_ref().to_owned()));
        };
        let mut next = 3..;
        let mut fd = || next.next().unwrap_or(0).to_string();
        if users {
            push(&[&"--userns", &fd()]);
        }
        push(&[&"--bind", &view.join("root"), &"/"]);
        push(&[&"--proc", &"/proc", &"--ro-bind", &"/proc/sys", &"/proc/sys", &"--dev", &"/dev"]);
        push(&[&"--perms", &"1777", &"--size", &self.sandbox.shm_size().to_string(), &"--tmpfs", &"/dev/shm"]);
        push(&[&"--bind", &view.join("cache"), &self.sandbox.cache_dir()]);
        if self.sandbox.gitlab_runner().is_some() {
            push(&[&"--ro-bind", &view.join("gitlab-runner"), &format!("/{GITLAB_RUNNER}")]);
        }
        for (i, bind) in self.sandbox.settings().bind.iter().enumerate() {
            let kind = if bind.writable { "--bind" } else { "--ro-bind" };
            push(&[&kind, &view.join(format!("bind-{i}")), &bind.target()]);
        }
        push(&[&"--unshare-pid", &"--unshare-ipc", &"--unshare-uts", &"--unshare-cgroup-try"]);
        push(&[&"--hostname", &sandbox::sandbox_name(key), &"--die-with-parent"]);
        if self.sandbox.settings().private_network {
            push(&[&"--unshare-net"]);
        }
        push(&[&"--cap-drop", &"ALL"]);
        for (_, cap) in KEEP_CAPS.iter().filter(|_| as_root) {
            push(&[&"--cap-add", cap]);
        }
        for _ in 0..filters {
            push(&[&"--add-seccomp-fd", &fd()]);
        }
        push(&[&"--chdir", &"/", &"--", &"/bin/bash", &script]);
        args
    }
}

impl Backend for Bwrap {
    fn describe(&self) -> Description {
        self.sandbox.describe(
            "bwrap",
            env!("CARGO_PKG_VERSION"),
            "every stage under bubblewrap on a disposable copy-on-write root of an image, in a user namespace, no init",
        )
    }

    fn config(&self, _job: &JobContext) -> Result<ConfigOutput, Failure> {
        let mut output = self.sandbox.config();
        if find_bwrap().is_none() {
            output.warnings.push(format!("bwrap runner: {INSTALL_HINT}; every job will fail"));
        }
        Ok(output)
    }

    fn prepare(&self, job: &JobContext, state: &JobState, cancel: &Cancel) -> Result<(), Failure> {
        if find_bwrap().is_none() {
            return Err(Failure::system(INSTALL_HINT));
        }
        let record = self.sandbox.prepare(job, state, cancel)?;
        self.sandbox.make_view(state, &record).map(|_| ())
    }

    fn run(
        &self,
        _job: &JobContext,
        state: &JobState,
        script: &Path,
        _stage: &str,
        cancel: &Cancel,
    ) -> Result<(), Failure> {
        let bwrap = find_bwrap().ok_or_else(|| Failure::system(INSTALL_HINT))?;
        let mut stage = self.sandbox.stage(state, script)?;
        let fds = self.fds(&stage)?;
        let mut cmd = Command::new(bwrap);
        let view = sandbox::view_dir(&sandbox::sandbox_name(state.key()));
        let (users, as_root) = (stage.record.users.is_some(), stage.record.uid == 0);
        cmd.args(self.args(&view, users, as_root, state.key(), fds.filters.len(), &stage.script));
        sandbox::enter::install_launcher(&mut cmd, &mut stage, fds.in_order())
            .map_err(sys("failed to set up bwrap"))?;
        let result = self.sandbox.run(&stage, &mut cmd, cancel, "bwrap");
        drop(fds);
        result
    }

    fn reap_orphans(&self, _known: &[JobKey]) -> Result<Vec<String>, Failure> {
        Ok(self.sandbox.reap_orphans(false))
    }

    fn orphans(&self, _known: &[JobKey]) -> Result<Option<Vec<String>>, Failure> {
        Ok(Some(self.sandbox.reap_orphans(true)))
    }

    fn check(&self) -> Vec<Finding> {
        let mut out = vec![berth_backend_support::check::tool("bwrap", "bubblewrap", "it runs every job's stages")];
        out.extend(self.sandbox.check());
        out
    }

    fn cleanup(&self, state: &JobState) -> Result<(), Failure> {
        self.sandbox.cleanup(state)
    }
}

#[cfg(test)]
mod tests;

berth_backend_api::export_backend!(Bwrap);
