//! The one place that decides berth's exit codes (custom-executor-protocol.md §5).

use std::path::Path;
use std::process::ExitCode;

use berth_backend_api::Failure;

/// The protocol's exit codes for this process, from the runner's environment.
#[derive(Debug, Clone, Copy)]
pub struct Codes {
    pub build: u8,
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

/// How a hook ended, classified.
#[derive(Debug)]
pub enum Class {
    Success,
    /// The script exited with this code: write it to `BUILD_EXIT_CODE_FILE`.
    Script(i32),
    /// A build failure without a script exit code (refusal, cancel).
    Build,
    System,
}

/// Classifies the result of a hook.
pub fn classify(result: &anyhow::Result<()>) -> Class {
    let Err(err) = result else { return Class::Success };
    match err.downcast_ref::<Failure>() {
        Some(Failure::Script { code }) => Class::Script(*code),
        Some(Failure::Refused { .. }) | Some(Failure::Cancelled) => Class::Build,
        _ => Class::System,
    }
}

/// The process exit code for `result`, writing `BUILD_EXIT_CODE_FILE` for a
/// script failure. A script code that cannot be recorded becomes a system failure.
pub fn exit_code(result: &anyhow::Result<()>, codes: Codes, exit_code_file: Option<&Path>) -> ExitCode {
    match classify(result) {
        Class::Success => ExitCode::SUCCESS,
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_failures_write_the_code_and_exit_with_build_failure() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("build_exit_code");
        let codes = Codes { build: 77, system: 78 };
        let result: anyhow::Result<()> = Err(Failure::script(42).into());
        assert_eq!(exit_code(&result, codes, Some(&file)), ExitCode::from(77));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "42\n");
        let result: anyhow::Result<()> = Err(Failure::system("x").into());
        assert_eq!(exit_code(&result, codes, Some(&file)), ExitCode::from(78));
        let result: anyhow::Result<()> = Err(anyhow::anyhow!("config broken"));
        assert_eq!(exit_code(&result, codes, None), ExitCode::from(78));
        let result: anyhow::Result<()> = Err(Failure::refused("no").into());
        assert_eq!(exit_code(&result, codes, None), ExitCode::from(77));
        let unwritable = dir.path().join("missing/dir/file");
        let result: anyhow::Result<()> = Err(Failure::script(3).into());
        assert_eq!(exit_code(&result, codes, Some(&unwritable)), ExitCode::from(78));
    }
}
