//! How a hook or command fails: one typed error, classified by its variant.

use berth_backend_api::{ContextError, Failure, StateError};

use crate::config::ConfigError;
use crate::registry::LoadError;

/// Why a hook or a command of berth failed.
///
/// The variant decides the protocol class of a hook's failure
/// ([`Error::class`]); [`crate::exit::process_exit_code`] turns that into
/// the exit code. Nothing is classified by downcasting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A backend's outcome (or berth's own, in the backend's terms).
    #[error(transparent)]
    Failure(#[from] Failure),
    /// The configuration file or the runner in it.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The runner's backend could not be built.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The job's environment (identity, payload).
    #[error(transparent)]
    Context(#[from] ContextError),
    /// The job's state directory.
    #[error(transparent)]
    State(#[from] StateError),
    /// Anything else, with the context of what was being done.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// A hook's failure in the protocol's classes (custom-executor-protocol.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The script exited with this code: it goes to `BUILD_EXIT_CODE_FILE`.
    Script(i32),
    /// A build failure without a script exit code (a refusal, a cancel).
    Build,
    /// A system failure: the runner may retry.
    System,
}

impl Class {
    /// The class of a backend's [`Failure`].
    pub fn of(failure: &Failure) -> Class {
        match failure {
            Failure::Script { code } => Class::Script(*code),
            Failure::Refused { .. } | Failure::Cancelled => Class::Build,
            _ => Class::System,
        }
    }
}

impl Error {
    /// The protocol class of this failure. A backend's failure keeps its
    /// class even when it happened while the backend was being built;
    /// everything berth itself fails at is a system failure.
    pub fn class(&self) -> Class {
        match self {
            Error::Failure(failure) | Error::Load(LoadError::Backend { failure, .. }) => Class::of(failure),
            Error::Config(_) | Error::Load(_) | Error::Context(_) | Error::State(_) | Error::Other(_) => Class::System,
        }
    }

    /// The message with every cause, `outer: inner: ...` (as `anyhow` prints `{:#}`).
    pub fn report(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn a_failure_keeps_its_class_wherever_it_travels() {
        assert_eq!(Error::from(Failure::script(3)).class(), Class::Script(3));
        assert_eq!(Error::from(Failure::refused("no")).class(), Class::Build);
        assert_eq!(Error::from(Failure::Cancelled).class(), Class::Build);
        assert_eq!(Error::from(Failure::system("x")).class(), Class::System);
        let load = LoadError::Backend { backend: "b".into(), runner: "r".into(), failure: Failure::refused("no") };
        assert_eq!(Error::from(load).class(), Class::Build, "a refusal while building the backend stays a refusal");
        assert_eq!(Error::from(anyhow::anyhow!("broken")).class(), Class::System);
    }

    #[test]
    fn the_report_names_every_cause_like_anyhow() {
        let io = std::io::Error::other("disk on fire");
        let wrapped = Err::<(), _>(io).context("failed to write /x").unwrap_err();
        let expected = format!("{wrapped:#}");
        assert_eq!(Error::from(wrapped).report(), expected);
        assert_eq!(expected, "failed to write /x: disk on fire");
    }
}
