//! Reads a `.gitlab-ci.yml` and resolves one of its jobs, as GitLab would.
//!
//! This is the interpreter behind `berth exec`, which runs a single job of a
//! pipeline file locally, the way the removed `gitlab-runner exec` did. It
//! turns the file into a flat [`PipelineJob`]: the job's stage, image,
//! variables, scripts, timeout and failure policy, with everything GitLab
//! would compute from other parts of the file already applied. It depends on
//! nothing of berth's; its messages name `berth exec` because that is the
//! program a user of it runs.
//!
//! # What it interprets
//!
//! The file is processed in GitLab's order:
//!
//! 1. YAML, loaded as GitLab's Ruby loader (Psych) loads it: anchors,
//!    aliases and merge keys (`<<: *a`, lists of them, several `<<` in one
//!    hash, a `<<` after an explicit key overriding it), a repeated key
//!    replacing the earlier value (with a warning), YAML 1.1 scalars (`0755`
//!    is 493, `1_000` is 1000, `yes`/`on`/`off` are booleans, `1e3` is a
//!    string), numbers written back as Ruby writes them; unquoted dates are
//!    refused, as GitLab refuses them; nesting deeper than 100 levels and
//!    aliases expanding past a few megabytes stop with the position;
//! 2. `include: local:` files (with [`load_in`]/[`list_in`] and [`Files`]), read from the
//!    project's root, and `remote:`/`project:`/`template:` includes from
//!    copies in an include directory, each loaded on its own with its own
//!    includes, the including file deep-merged over them;
//! 3. `extends:` (one name or a list, recursive, deep-merging hashes, at most
//!    [`MAX_EXTENDS_DEPTH`] levels, cycles rejected);
//! 4. `!reference [entry, key, ...]` tags, anywhere in the values used
//!    (references may point at values holding references);
//! 5. `default:` and the legacy global `image:`, `before_script:`,
//!    `after_script:`, honouring `inherit:default` and `inherit:variables`;
//! 6. `parallel: N` and `parallel: matrix:`, which replace the job by the
//!    jobs GitLab creates (`name 1/N`, `name: [v1, v2]`), each with its node
//!    index and matrix variables.
//!
//! Then each keyword a local run needs is decoded: `script:` and its
//! neighbours (nested lists flattened), `variables:` (plain or
//! `{value: ..., expand: false}`), `image:` (a name or `{name: ...}`),
//! `timeout:` (GitLab's duration syntax, like `1h 30m`), `allow_failure:`
//! (also `{exit_codes: ...}` and the `when: manual` default), `stage:` and
//! `rules:`, which [`rules::decide`] evaluates with the variables a caller
//! gives (`if:` expressions, `when:`, `variables:`).
//!
//! Variable values and the image are kept as written: the runner expands
//! them (`$VAR`, `${VAR}`) when the job starts, with its own variables.
//!
//! # What it refuses
//!
//! Not read: `component:` includes, `remote:`/`project:`/`template:`
//! includes without a copy in the include directory, and local includes
//! with wildcards or variables in their path: they are listed (with where a
//! copy would go), and messages about what may be defined there say so.
//! Not evaluated: `rules:changes`/`rules:exists` (taken to hold, and said),
//! `rules` of an `include`, `only`/`except`, `workflow:rules`, `needs`.
//! Not supported: `spec:inputs` interpolation (a `spec:` header document is
//! skipped), `services`, `cache`, `artifacts`. Keywords that do not affect a
//! local run are ignored silently. A file of several YAML documents, YAML
//! tags other than `!reference`, trigger jobs (which have no script), hidden
//! jobs and values of the wrong shape are refused with a [`PipelineError`]
//! naming the file (with the line and column where known), the job and the
//! keyword, and saying how to fix it.
//!
//! # Layers
//!
//! `yaml` (the loader: events to a tree, anchors, merge keys, scalars),
//! `include` (local includes), `resolve` (the job resolver), `keywords` (one
//! decoder per keyword), `rules` (`rules:` and their expressions), `duration`
//! (GitLab's duration syntax) and `error` (the messages).

#![deny(missing_docs)]

mod duration;
mod error;
mod include;
mod keywords;
mod resolve;
pub mod rules;
mod yaml;

use std::path::Path;

pub use error::PipelineError;
pub use resolve::MAX_EXTENDS_DEPTH;
pub use yaml::Position;

use resolve::Resolver;

/// A job of a pipeline file, resolved: defaults applied, `extends` merged, `!reference` expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineJob {
    /// The job's name: its top-level key.
    pub name: String,
    /// The job's `stage:`, `"test"` when it has none.
    pub stage: String,
    /// The image name: the job's `image:`, else `default:image`, else the
    /// legacy global `image:`. `image: {name: x}` gives `x`.
    pub image: Option<String>,
    /// Top-level `variables:` first, then the job's; a job variable replaces
    /// a global one of the same name in place. `{value: x, ...}` gives `x`;
    /// numbers and booleans are written as YAML writes them. Values are as
    /// written: the runner expands them when the job starts.
    pub variables: Vec<Variable>,
    /// The job's `before_script:`, else `default:before_script`, else the legacy global one.
    pub before_script: Vec<String>,
    /// The job's `script:`, nested lists flattened; never empty.
    pub script: Vec<String>,
    /// The job's `after_script:`, else `default:after_script`, else the legacy global one.
    pub after_script: Vec<String>,
    /// The job's `timeout:`, else `default:timeout`, in seconds.
    pub timeout_secs: Option<u64>,
    /// `allow_failure: true`, or a `when: manual` job without `rules` and
    /// without `allow_failure:`. False for `allow_failure: {exit_codes: ...}`.
    pub allow_failure: bool,
    /// The exit codes of `allow_failure: {exit_codes: ...}`: the job may fail
    /// with these codes only.
    pub allow_failure_exit_codes: Vec<i32>,
    /// For a job `parallel:` makes: its `CI_NODE_INDEX` (from 1) and
    /// `CI_NODE_TOTAL`. Its matrix variables are in `variables`, after (and
    /// replacing) the job's own.
    pub node: Option<(usize, usize)>,
    /// The job's `rules:`, `None` without them: evaluate them with [`rules::decide`].
    pub rules: Option<Vec<rules::Rule>>,
    /// What loading the file had to say (repeated keys, ...), each naming the
    /// file and position: accepted as GitLab accepts them, but worth a word.
    pub warnings: Vec<String>,
}

/// The runnable jobs of a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobList {
    /// The jobs' names, in file order.
    pub jobs: Vec<String>,
    /// The jobs defined in an included file, with the include (`local: ci/x.yml`).
    pub included: Vec<(String, String)>,
    /// The includes not read (a component, one without a copy in the
    /// include directory, a local one with a wildcard), described with the
    /// file holding them and what to do.
    pub unread_includes: Vec<String>,
    /// What loading the file had to say, as [`PipelineJob::warnings`].
    pub warnings: Vec<String>,
}

/// A variable of the job, as the pipeline file defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// The name.
    pub name: String,
    /// The value, unexpanded.
    pub value: String,
    /// Whether the runner expands `$NAME` references in the value: false for
    /// `expand: false`, which reaches the runner as a `raw` variable.
    pub expand: bool,
}

impl Variable {
    /// A variable that is expanded, as most are.
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Variable { name: name.into(), value: value.into(), expand: true }
    }
}

/// Reads the pipeline file at `path` and resolves its job `job`.
///
/// # Errors
///
/// [`PipelineError::Read`] when the file cannot be read, else as [`parse`].
pub fn load(path: &Path, job: &str) -> Result<PipelineJob, PipelineError> {
    load_in(path, Files::default(), job)
}

/// Where the files a pipeline includes are read from.
#[derive(Debug, Clone, Copy, Default)]
pub struct Files<'a> {
    /// The project's directory: `include:local` paths are relative to its root.
    pub project: Option<&'a Path>,
    /// Copies of the files of `remote:`, `project:` and `template:` includes
    /// (`berth exec --include-dir`): `<host>/<path>` of a URL,
    /// `<project>/<file>`, `templates/<name>`.
    pub include_dir: Option<&'a Path>,
}

/// Like [`load`], reading included files as `files` says.
///
/// # Errors
///
/// As [`load`], and when an included file cannot be read or parsed.
pub fn load_in(path: &Path, files: Files<'_>, job: &str) -> Result<PipelineJob, PipelineError> {
    let text = std::fs::read_to_string(path).map_err(|source| PipelineError::Read { path: path.to_owned(), source })?;
    Resolver::new(&text, path, files)?.job(job)
}

/// The runnable jobs of the pipeline file at `path`, reading included files
/// as [`load_in`] does.
///
/// # Errors
///
/// As [`job_names`], and when the file or an included one cannot be read.
pub fn list_in(path: &Path, files: Files<'_>) -> Result<JobList, PipelineError> {
    let text = std::fs::read_to_string(path).map_err(|source| PipelineError::Read { path: path.to_owned(), source })?;
    Resolver::new(&text, path, files)?.list()
}

/// Resolves the job `job` of the pipeline file `text`; `path` only names the file in errors.
///
/// # Errors
///
/// When the text is not YAML or not a pipeline, when `job` is not one of its
/// runnable jobs, and when the job, what it extends or references, or the
/// defaults it inherits hold a value of the wrong shape.
pub fn parse(text: &str, path: &Path, job: &str) -> Result<PipelineJob, PipelineError> {
    Resolver::new(text, path, Files::default())?.job(job)
}

/// The runnable jobs of the pipeline file `text`, in file order.
///
/// Hidden jobs (`.name`), global keywords, entries that are not hashes, and
/// trigger jobs (which start a downstream pipeline and have no script) are
/// left out. `path` only names the file in errors.
///
/// # Errors
///
/// When the text is not YAML or its top level is not a hash.
pub fn job_names(text: &str, path: &Path) -> Result<JobList, PipelineError> {
    Resolver::new(text, path, Files::default())?.list()
}

/// What the tests of every layer share: a file name and job lookups.
#[cfg(test)]
mod test_support {
    use std::path::Path;

    use crate::{parse, PipelineError, PipelineJob, Variable};

    pub(crate) fn path() -> &'static Path {
        Path::new("ci.yml")
    }

    pub(crate) fn job(text: &str, name: &str) -> PipelineJob {
        parse(text, path(), name).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    pub(crate) fn error(text: &str, name: &str) -> PipelineError {
        match parse(text, path(), name) {
            Ok(job) => panic!("{name} resolved to {job:?}"),
            Err(e) => e,
        }
    }

    pub(crate) fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    pub(crate) fn vars(items: &[(&str, &str)]) -> Vec<Variable> {
        items.iter().map(|(k, v)| Variable::new(*k, *v)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::*;

    #[test]
    fn load_reads_the_file() {
        let dir = std::env::temp_dir().join(format!("berth-pipeline-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(".gitlab-ci.yml");
        std::fs::write(&file, "hello:\n  script: echo hello\n").unwrap();
        let loaded = load(&file, "hello");
        let missing = load(&dir.join("absent.yml"), "hello");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(loaded.unwrap().script, strings(&["echo hello"]));
        let e = missing.unwrap_err();
        assert!(matches!(e, PipelineError::Read { .. }), "{e:?}");
        assert!(e.to_string().contains("absent.yml: check that it exists"), "{e}");
    }
}

/// Property tests of the whole interpreter: any text gives a job or an
/// error, never a panic, a hang or unbounded memory.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use crate::test_support::path;
    use crate::{job_names, parse, PipelineError};

    /// YAML-ish text built from the pieces pipelines are made of.
    fn pipeline_text() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("j:\n".to_owned()),
            Just(".t: &t\n".to_owned()),
            Just("  script: x\n".to_owned()),
            Just("  <<: *t\n".to_owned()),
            Just("  extends: .t\n".to_owned()),
            Just("  image: $I\n".to_owned()),
            Just("  variables: {A: 0755, B: yes}\n".to_owned()),
            Just("  script: !reference [.t, script]\n".to_owned()),
            Just("  parallel: 3\n".to_owned()),
            Just("a: &a [x, x, x, x]\nb: &b [*a, *a, *a, *a]\n".to_owned()),
            Just("c: [*b, *b, *b, *b, *b, *b]\n".to_owned()),
            Just("- \n".to_owned()),
            Just("  [{\n".to_owned()),
            Just("---\n".to_owned()),
            "[a-z:\\[\\]{}&*!<>|, \n-]{0,12}",
        ];
        prop::collection::vec(piece, 0..16).prop_map(|pieces| pieces.concat())
    }

    fn check(text: &str) {
        for job in ["j", "a"] {
            match parse(text, path(), job) {
                Ok(_) => {}
                Err(PipelineError::Parse { at, .. }) => assert!(at.line >= 1 || text.is_empty()),
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
        let _ = job_names(text, path());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
        #[test]
        fn generated_pipelines_resolve_or_fail_cleanly(text in pipeline_text()) {
            check(&text);
        }

        #[test]
        fn arbitrary_text_resolves_or_fails_cleanly(text in "\\PC{0,200}") {
            check(&text);
        }

        /// Alias chains of any depth and width stop within the byte budget.
        #[test]
        fn alias_bombs_are_bounded(width in 2usize..12, levels in 1usize..14) {
            let mut text = format!("l0: &l0 [{}]\n", vec!["xxxxxxxx"; width].join(", "));
            for level in 1..levels {
                let prev = level - 1;
                text.push_str(&format!("l{level}: &l{level} [{}]\n", vec![format!("*l{prev}"); width].join(", ")));
            }
            text.push_str("j:\n  script: x\n");
            let started = std::time::Instant::now();
            check(&text);
            prop_assert!(started.elapsed() < std::time::Duration::from_secs(10));
        }
    }
}
