//! The one place that decides berth's exit codes (custom-executor-protocol.md §5
//! for the hooks): [`process_exit_code`].

use std::path::Path;
use std::process::ExitCode;

use berth_runner_imitation::job::Outcome;

use crate::error::{Class, Error};

/// The protocol's exit codes for this process, from the runner's environment.
#[derive(Debug, Clone, Copy)]
pub struct Codes {
    /// `BUILD_FAILURE_EXIT_CODE`.
    pub build: u8,
    /// `SYSTEM_FAILURE_EXIT_CODE`.
    pub system: u8,
}

impl Codes {
    /// `BUILD_FAILURE_EXIT_CODE` and `SYSTEM_FAILURE_EXIT_CODE`, defaulting to 1 and 2.
    pub fn from_env() -> Codes {
        let read = |key: &str, default: u8| {
            std::env::var(key).ok().and_then(|v| v.trim().parse::<u8>().ok()).filter(|c| *c != 0).unwrap_or(default)
        };
        Codes { build: read("BUILD_FAILURE_EXIT_CODE", 1), system: read("SYSTEM_FAILURE_EXIT_CODE", 2) }
    }
}

/// Who is exiting: a hook gitlab-runner called, or a command a person ran.
#[derive(Debug, Clone, Copy)]
pub enum Invocation<'a> {
    /// config, prepare, run or cleanup: the protocol's codes, and the file a
    /// script's exit code is written to.
    Hook {
        /// The runner's codes.
        codes: Codes,
        /// `BUILD_EXIT_CODE_FILE`, when the job context was read.
        exit_code_file: Option<&'a Path>,
    },
    /// Every other command: 0 done, 1 done with a negative answer, 2 failed.
    Command,
}

/// How a command that ran to its end ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// It did what was asked.
    Success,
    /// It ran, and its answer is no: failed conformance checks, an image shell
    /// that exited non-zero (changes dropped).
    Unsuccessful,
    /// `berth exec`: the job ran and ended so.
    Job(Outcome),
}

/// The exit code of a command that failed to run (bad arguments, config, host).
const COMMAND_ERROR: u8 = 2;

/// The process exit code for how `invocation` ended. For a hook whose script
/// failed, the script's code is written to `BUILD_EXIT_CODE_FILE`; a code that
/// cannot be recorded makes it a system failure.
pub fn process_exit_code(invocation: Invocation<'_>, result: &Result<Done, Error>) -> ExitCode {
    match (invocation, result) {
        (_, Ok(Done::Success)) => ExitCode::SUCCESS,
        (_, Ok(Done::Unsuccessful)) => ExitCode::from(1),
        (_, Ok(Done::Job(outcome))) if outcome.passed() => ExitCode::SUCCESS,
        (_, Ok(Done::Job(outcome))) if outcome.is_system_failure() => ExitCode::from(2),
        (_, Ok(Done::Job(_))) => ExitCode::from(1),
        (Invocation::Command, Err(_)) => ExitCode::from(COMMAND_ERROR),
        (Invocation::Hook { codes, exit_code_file }, Err(error)) => match error.class() {
            Class::Script(code) => match exit_code_file {
                Some(path) => match std::fs::write(path, format!("{code}\n")) {
                    Ok(()) => ExitCode::from(codes.build),
                    Err(e) => {
                        eprintln!("ERROR: failed to record exit code {code} in {}: {e}", path.display());
                        ExitCode::from(codes.system)
                    }
                },
                // Without the file the runner reports the build failure code itself.
                None => ExitCode::from(codes.build),
            },
            Class::Build => ExitCode::from(codes.build),
            Class::System => ExitCode::from(codes.system),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_backend_api::Failure;

    fn hook(file: Option<&Path>, result: Result<Done, Error>) -> ExitCode {
        let codes = Codes { build: 77, system: 78 };
        process_exit_code(Invocation::Hook { codes, exit_code_file: file }, &result)
    }

    #[test]
    fn script_failures_write_the_code_and_exit_with_build_failure() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("build_exit_code");
        assert_eq!(hook(Some(&file), Err(Failure::script(42).into())), ExitCode::from(77));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "42\n");
        assert_eq!(hook(Some(&file), Err(Failure::system("x").into())), ExitCode::from(78));
        assert_eq!(hook(None, Err(anyhow::anyhow!("config broken").into())), ExitCode::from(78));
        assert_eq!(hook(None, Err(Failure::refused("no").into())), ExitCode::from(77));
        assert_eq!(hook(None, Err(Failure::Cancelled.into())), ExitCode::from(77));
        assert_eq!(hook(None, Ok(Done::Success)), ExitCode::SUCCESS);
        let unwritable = dir.path().join("missing/dir/file");
        assert_eq!(hook(Some(&unwritable), Err(Failure::script(3).into())), ExitCode::from(78));
    }

    #[test]
    fn commands_exit_0_done_1_no_2_failed_and_exec_by_the_jobs_outcome() {
        let command = |result: Result<Done, Error>| process_exit_code(Invocation::Command, &result);
        assert_eq!(command(Ok(Done::Success)), ExitCode::SUCCESS);
        assert_eq!(command(Ok(Done::Unsuccessful)), ExitCode::from(1));
        assert_eq!(command(Err(Failure::script(9).into())), ExitCode::from(2));
        assert_eq!(command(Err(anyhow::anyhow!("bad").into())), ExitCode::from(2));
        let job = |outcome| command(Ok(Done::Job(outcome)));
        assert_eq!(job(Outcome::Succeeded), ExitCode::SUCCESS);
        assert_eq!(job(Outcome::Failed { code: 3, allowed: true }), ExitCode::SUCCESS);
        assert_eq!(job(Outcome::Failed { code: 3, allowed: false }), ExitCode::from(1));
        assert_eq!(job(Outcome::Cancelled), ExitCode::from(1));
        assert_eq!(job(Outcome::TimedOut(std::time::Duration::from_secs(1))), ExitCode::from(1));
        assert_eq!(job(Outcome::SystemFailure("x".into())), ExitCode::from(2));
    }
}
