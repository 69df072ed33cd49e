//! Why a pipeline file or one of its jobs could not be resolved, with messages
//! that say what to fix.

use std::path::{Path, PathBuf};

use crate::resolve::MAX_EXTENDS_DEPTH;
use crate::yaml::{Position, RESERVED_KEYWORDS};

/// Why a pipeline file or one of its jobs could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The pipeline file could not be read.
    #[error("failed to read pipeline file {}: check that it exists and is readable", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the filesystem said.
        source: std::io::Error,
    },
    /// The pipeline file is not YAML as GitLab loads it: a syntax error, an
    /// alias bomb, a value GitLab's loader refuses.
    #[error("{}:{at}: {message}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where in the file.
        at: Position,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The file is YAML, but not shaped like a pipeline (not a hash, several
    /// documents, a bad merge key).
    #[error("{}: {message}", .path.display())]
    Structure {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The requested job is not a runnable job of the file.
    #[error("{}", no_such_job_message(.path, .job, .available, .includes))]
    NoSuchJob {
        /// The file.
        path: PathBuf,
        /// The requested job.
        job: String,
        /// The runnable jobs of the file, in file order.
        available: Vec<String>,
        /// Whether the file has `include:` (whose jobs are not read).
        includes: bool,
    },
    /// A value has the wrong shape.
    #[error("{}{}: job `{job}`: {}", .path.display(), at_suffix(.at), invalid_detail(.key, .message))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Where the keyword (else the job) is written, when known.
        at: Option<Position>,
        /// The job being resolved.
        job: String,
        /// The keyword holding the value, like `script` or `default:image`;
        /// empty when the job itself is wrong.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// `extends` loops back to an entry already being extended.
    #[error(
        "{}{}: job `{job}`: `extends` forms a cycle ({}); remove one of the links",
        .path.display(),
        at_suffix(.at),
        .chain.join(" -> ")
    )]
    ExtendsCycle {
        /// The file.
        path: PathBuf,
        /// Where the job's `extends` is written, when known.
        at: Option<Position>,
        /// The job being resolved.
        job: String,
        /// The entries extended, ending with the one seen twice.
        chain: Vec<String>,
    },
    /// `extends` chains more than [`MAX_EXTENDS_DEPTH`] levels.
    #[error(
        "{}{}: job `{job}`: `extends` nests deeper than {MAX_EXTENDS_DEPTH} levels ({}); \
         flatten the template chain",
        .path.display(),
        at_suffix(.at),
        .chain.join(" -> ")
    )]
    ExtendsTooDeep {
        /// The file.
        path: PathBuf,
        /// Where the job's `extends` is written, when known.
        at: Option<Position>,
        /// The job being resolved.
        job: String,
        /// The entries extended.
        chain: Vec<String>,
    },
    /// `extends` names an entry the file does not define.
    #[error(
        "{}{}: `{job}` extends `{missing}`, which is not defined in this file; \
         define it or fix the name{}",
        .path.display(),
        at_suffix(.at),
        include_hint(.includes)
    )]
    ExtendsMissing {
        /// The file.
        path: PathBuf,
        /// Where the `extends` naming it is written, when known.
        at: Option<Position>,
        /// The job or template whose `extends` names the missing entry.
        job: String,
        /// The missing entry.
        missing: String,
        /// Whether the file has `include:` (whose templates are not read).
        includes: bool,
    },
    /// A `!reference` tag points nowhere, or into a cycle.
    #[error(
        "{}{}: job `{job}`: `!reference [{}]` {message}{}",
        .path.display(),
        at_suffix(.at),
        .reference.join(", "),
        include_hint(.includes)
    )]
    BadReference {
        /// The file.
        path: PathBuf,
        /// Where the keyword holding the reference is written, when known.
        at: Option<Position>,
        /// The job being resolved.
        job: String,
        /// The path of the reference: an entry, then keys.
        reference: Vec<String>,
        /// What is wrong and how to fix it.
        message: String,
        /// Whether the target may be missing because `include:` is not read.
        includes: bool,
    },
}

fn at_suffix(at: &Option<Position>) -> String {
    at.map(|at| format!(":{at}")).unwrap_or_default()
}

fn invalid_detail(key: &str, message: &str) -> String {
    if key.is_empty() {
        message.to_owned()
    } else {
        format!("invalid `{key}`: {message}")
    }
}

fn include_hint(includes: &bool) -> &'static str {
    if *includes {
        " (it may come from an `include:` that `berth exec` does not read: remote, project, template and \
         component includes are not fetched; pass a copy with --include-dir, as `berth exec --list` says)"
    } else {
        ""
    }
}

fn no_such_job_message(path: &Path, job: &str, available: &[String], includes: &bool) -> String {
    let mut message = format!("{}: there is no job `{job}` to run", path.display());
    if job.starts_with('.') {
        message.push_str(" (names starting with `.` are hidden templates, which never run)");
    } else if RESERVED_KEYWORDS.contains(&job) {
        message.push_str(&format!(" (`{job}` is a global keyword, not a job)"));
    }
    if available.is_empty() {
        message.push_str("; the file defines no runnable jobs");
    } else {
        message.push_str("; run one of: ");
        message.push_str(&available.join(", "));
    }
    if *includes {
        message.push_str(
            "; it may come from an `include:` that `berth exec` does not read (only `include: local:` \
             files are read; `berth exec --list` names the others)",
        );
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> PathBuf {
        PathBuf::from("ci.yml")
    }

    fn names(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn invalid_names_the_keyword_unless_the_job_itself_is_wrong() {
        let invalid = |key: &str| PipelineError::Invalid {
            path: path(),
            at: None,
            job: "j".into(),
            key: key.into(),
            message: "fix it".into(),
        };
        assert_eq!(invalid("script").to_string(), "ci.yml: job `j`: invalid `script`: fix it");
        assert_eq!(invalid("").to_string(), "ci.yml: job `j`: fix it");
        let placed = PipelineError::Invalid {
            path: path(),
            at: Some(Position { line: 3, column: 5 }),
            job: "j".into(),
            key: "image".into(),
            message: "fix it".into(),
        };
        assert_eq!(placed.to_string(), "ci.yml:3:5: job `j`: invalid `image`: fix it");
    }

    #[test]
    fn extends_messages() {
        let too_deep =
            PipelineError::ExtendsTooDeep { path: path(), at: None, job: "j".into(), chain: names(&["j", ".a"]) };
        assert_eq!(
            too_deep.to_string(),
            "ci.yml: job `j`: `extends` nests deeper than 11 levels (j -> .a); flatten the template chain"
        );
        let missing = |includes| PipelineError::ExtendsMissing {
            at: None,
            path: path(),
            job: ".a".into(),
            missing: ".gone".into(),
            includes,
        };
        assert_eq!(
            missing(false).to_string(),
            "ci.yml: `.a` extends `.gone`, which is not defined in this file; define it or fix the name"
        );
        assert_eq!(
            missing(true).to_string(),
            "ci.yml: `.a` extends `.gone`, which is not defined in this file; define it or fix the name \
             (it may come from an `include:` that `berth exec` does not read: remote, project, template and \
             component includes are not fetched; pass a copy with --include-dir, as `berth exec --list` says)"
        );
    }

    #[test]
    fn bad_reference_message() {
        let e = PipelineError::BadReference {
            at: None,
            path: path(),
            job: "j".into(),
            reference: names(&[".t", "script"]),
            message: "points at `.t`, which is not defined in this file".into(),
            includes: false,
        };
        assert_eq!(
            e.to_string(),
            "ci.yml: job `j`: `!reference [.t, script]` points at `.t`, which is not defined in this file"
        );
    }

    #[test]
    fn no_such_job_message_explains_the_name_and_lists_the_jobs() {
        let no_such_job = |job: &str, available: &[&str], includes| {
            PipelineError::NoSuchJob { path: path(), job: job.into(), available: names(available), includes }
                .to_string()
        };
        assert_eq!(
            no_such_job(".hidden", &["a", "b"], false),
            "ci.yml: there is no job `.hidden` to run (names starting with `.` are hidden templates, \
             which never run); run one of: a, b"
        );
        assert_eq!(
            no_such_job("stages", &[], true),
            "ci.yml: there is no job `stages` to run (`stages` is a global keyword, not a job); \
             the file defines no runnable jobs; it may come from an `include:` that `berth exec` does not read \
             (only `include: local:` files are read; `berth exec --list` names the others)"
        );
    }

    #[test]
    fn read_and_structure_messages() {
        let read = PipelineError::Read { path: path(), source: std::io::ErrorKind::NotFound.into() };
        assert_eq!(read.to_string(), "failed to read pipeline file ci.yml: check that it exists and is readable");
        let structure = PipelineError::Structure { path: path(), message: "the top level is a list".into() };
        assert_eq!(structure.to_string(), "ci.yml: the top level is a list");
    }
}
