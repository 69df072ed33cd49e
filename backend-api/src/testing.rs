//! A fake backend for tests of code that drives backends.

use std::path::Path;
use std::sync::Mutex;

use crate::{Backend, Cancel, Capabilities, ConfigOutput, Description, Failure, Isolation, JobContext, JobState};

/// A backend that executes nothing and records every call, in order.
///
/// `fail_stage` makes `run` of that stage fail with `fail_with`.
#[derive(Debug, Default)]
pub struct FakeBackend {
    /// The calls so far: `prepare`, `run STAGE`, `cleanup`.
    pub calls: Mutex<Vec<String>>,
    /// A stage whose `run` fails.
    pub fail_stage: Option<String>,
    /// The script exit code that stage fails with.
    pub fail_code: i32,
}

impl FakeBackend {
    /// The calls so far.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self, call: String) {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).push(call);
    }
}

impl Backend for FakeBackend {
    fn describe(&self) -> Description {
        Description::new("fake", "0", "records calls, executes nothing")
            .isolation(Isolation::None)
            .capabilities(Capabilities::none())
    }

    fn config(&self, _job: &JobContext) -> Result<ConfigOutput, Failure> {
        Ok(ConfigOutput::with_dirs("/builds", "/cache"))
    }

    fn prepare(&self, _job: &JobContext, _state: &JobState, _cancel: &Cancel) -> Result<(), Failure> {
        self.record("prepare".into());
        Ok(())
    }

    fn run(
        &self,
        _job: &JobContext,
        _state: &JobState,
        _script: &Path,
        stage: &str,
        _cancel: &Cancel,
    ) -> Result<(), Failure> {
        self.record(format!("run {stage}"));
        match &self.fail_stage {
            Some(fail) if fail == stage => Err(Failure::script(self.fail_code)),
            _ => Ok(()),
        }
    }

    fn cleanup(&self, _state: &JobState) -> Result<(), Failure> {
        self.record("cleanup".into());
        Ok(())
    }
}

/// Whether a test's prerequisite is met, for tests that need root, a tool or
/// a built artefact: `missing` is `None` when it is, or says what is missing
/// and how to get it. A developer's machine skips the test with the reason
/// printed (`false`); under `CI=true` a missing prerequisite fails the test,
/// so that CI never passes by skipping.
#[track_caller]
pub fn prerequisite(missing: Option<String>) -> bool {
    let Some(reason) = missing else { return true };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but {reason}");
    }
    eprintln!("skipped: {reason}");
    false
}
