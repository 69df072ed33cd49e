//! Result classes of a backend operation.

use std::error::Error as StdError;
use std::fmt;

/// Why a backend operation did not succeed.
///
/// Each variant maps onto exactly one outcome of the custom-executor protocol
/// (see `custom-executor-protocol.md` §5). `berth` turns them into exit codes;
/// a backend only has to pick the right class:
///
/// | variant | what GitLab shows | retried |
/// |---|---|---|
/// | [`Failure::Script`] | `Job failed: exit code N` | no |
/// | [`Failure::Refused`] | `Job failed: exit code 1` with the message | no |
/// | [`Failure::System`] | `Job failed (system failure)` | yes, for prepare |
/// | [`Failure::Cancelled`] | the job's cancel or timeout | no |
#[derive(Debug)]
#[non_exhaustive]
pub enum Failure {
    /// The job's stage script ran and exited with a non-zero code.
    Script {
        /// The script's exit code (1..=255; 128+N for a script killed by signal N).
        code: i32,
    },
    /// The job asked for something this runner does not allow (an image that is
    /// not allowed, a forbidden setting). A build failure: retrying cannot help.
    Refused {
        /// What was refused and what the pipeline author can do about it.
        message: String,
    },
    /// The environment failed: the host, the backend or its configuration.
    System {
        /// What failed, on what, and what the admin can do.
        message: String,
        /// The underlying error, if any.
        source: Option<Box<dyn StdError + Send + Sync + 'static>>,
    },
    /// The operation stopped because the runner asked it to (SIGTERM).
    Cancelled,
}

impl Failure {
    /// A system failure with a message.
    pub fn system(message: impl Into<String>) -> Self {
        Failure::System { message: message.into(), source: None }
    }

    /// A system failure caused by `source`.
    pub fn system_with(
        message: impl Into<String>,
        source: impl Into<Box<dyn StdError + Send + Sync + 'static>>,
    ) -> Self {
        Failure::System { message: message.into(), source: Some(source.into()) }
    }

    /// A job-caused refusal (build failure, not retried).
    pub fn refused(message: impl Into<String>) -> Self {
        Failure::Refused { message: message.into() }
    }

    /// The script exited with `code`. A code of 0 is not a failure; callers map
    /// it to `Ok(())` themselves.
    pub fn script(code: i32) -> Self {
        Failure::Script { code }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Script { code } => write!(f, "script exited with code {code}"),
            Failure::Refused { message } => f.write_str(message),
            Failure::System { message, source: None } => f.write_str(message),
            Failure::System { message, source: Some(source) } => {
                write!(f, "{message}: {source}")?;
                let mut next = source.source();
                while let Some(cause) = next {
                    write!(f, ": {cause}")?;
                    next = cause.source();
                }
                Ok(())
            }
            Failure::Cancelled => f.write_str("cancelled by the runner"),
        }
    }
}

impl StdError for Failure {}

impl From<crate::StateError> for Failure {
    fn from(err: crate::StateError) -> Self {
        Failure::system_with("job state", err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_failure_shows_its_cause_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let failure = Failure::system_with("failed to read /x", io);
        assert_eq!(failure.to_string(), "failed to read /x: no such file");
    }
}
