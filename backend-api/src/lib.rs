//! The contract between `berth` and its isolation backends.
//!
//! GitLab Runner's custom executor calls four programs per job (config, prepare,
//! run once per stage, cleanup), each as a **new process**. `berth` is that
//! program; it speaks the protocol and hands the isolation work to a
//! [`Backend`]. This crate is everything a backend author needs:
//!
//! - [`JobContext`]: the job as the runner describes it, built once per process
//!   from the environment, with the job's identity taken from the trusted
//!   `JOB_RESPONSE_FILE` and masked variables known as masked;
//! - [`Backend`]: the operations (config, prepare, run, cleanup, reap) and
//!   [`NewBackend`], how a backend is built from its runner's settings;
//! - [`Failure`]: the result classes, which map 1:1 onto the protocol's exit
//!   codes (a failed script, a job-caused refusal, a system fault, a cancel);
//! - [`StateDir`] / [`JobState`]: a locked per-job state area, so what prepare
//!   made is found again by run, cleanup and reap; [`JobStatus`] and
//!   [`Stage`], what `berth ps` shows of a job, read without the lock;
//! - [`Cancel`]: a pollable cancellation signal (SIGTERM from the runner);
//! - [`Finding`]: what [`Backend::check`] finds of the host and the runner's
//!   settings (`berth doctor`), each ok, a warning or an error, with the fix;
//! - [`Description`]: what a backend is and what it supports, used by
//!   `berth config` (the driver line) and by the conformance suite;
//! - [`script`]: the stage-script format the runner writes, [`process`]:
//!   running a host process to its end or to a cancel, [`remove_tree`]:
//!   removing a tree a job wrote with bounded descriptors, [`testing`]: a fake
//!   backend for tests.
//!
//! Architecture invariant: this crate depends on no other crate of the berth
//! workspace, and it never decides a process exit code (only `berth` does).
#![deny(missing_docs)]

mod backend;
mod cancel;
mod check;
mod context;
mod describe;
mod failure;
pub mod plugin;
pub mod process;
mod redact;
pub mod script;
mod state;
mod status;
pub mod testing;
mod tree;

pub use backend::{
    child_path, Backend, ConfigOutput, HostDirs, MappedDir, NewBackend, RunnerInfo, BUILDS_SCRATCH, LOGS_DIR,
};
pub use cancel::{Cancel, CancelTrigger};
pub use check::{Finding, Level};
pub use context::{
    ContextError, JobContext, JobImage, JobInfo, JobKey, JobResponse, ResponseVariable, RunnerLimits, Step, Variable,
};
pub use describe::{Capabilities, Description, Isolation};
pub use failure::Failure;
pub use redact::{Redactor, MASK};
pub use state::{JobRecord, JobState, StateDir, StateError};
pub use status::{JobPeek, JobStatus, Stage};
pub use tree::{remove_tree, MAX_OPEN_DIRS};
