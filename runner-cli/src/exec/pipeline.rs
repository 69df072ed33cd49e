//! Reading a `.gitlab-ci.yml` and resolving one of its jobs for `berth exec`.
//!
//! `berth exec` runs a single job of a pipeline file locally, the way the
//! removed `gitlab-runner exec` did. This module turns the file into a flat
//! [`PipelineJob`]: the job's stage, image, variables, scripts, timeout and
//! failure policy, with everything GitLab would compute from other parts of
//! the file already applied.
//!
//! The file is processed in GitLab's order:
//!
//! 1. YAML anchors, aliases and merge keys (`<<: *anchor`, also nested and
//!    lists of anchors);
//! 2. `extends:` (one name or a list, recursive, deep-merging hashes, at most
//!    [`MAX_EXTENDS_DEPTH`] levels, cycles rejected);
//! 3. `!reference [entry, key, ...]` tags, anywhere in the values used
//!    (references may point at values holding references);
//! 4. `default:` and the legacy global `image:`, `before_script:`,
//!    `after_script:`, honouring `inherit:default` and `inherit:variables`.
//!
//! Not supported: `include:` (included files are not fetched: jobs and
//! templates defined there are unknown, and error messages say so),
//! `spec:inputs` interpolation (a `spec:` header document is skipped),
//! evaluation of `rules`/`only`/`except`/`needs`, `services`, `cache`,
//! `artifacts`, `parallel`, and variable expansion (values are kept verbatim).
//! Keywords that do not affect a local run are ignored silently.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize as _;
use serde_norway::{Mapping, Value};

/// Top-level keys that are global keywords, not jobs.
const RESERVED_KEYWORDS: &[&str] = &[
    "default",
    "include",
    "stages",
    "variables",
    "workflow",
    "image",
    "services",
    "cache",
    "before_script",
    "after_script",
    "types",
    "spec",
];

/// Deepest `extends` chain accepted below a job, as in GitLab.
pub const MAX_EXTENDS_DEPTH: usize = 11;

/// Deepest chain of `!reference` tags pointing at values holding more of them.
const MAX_REFERENCE_DEPTH: usize = 10;

/// Deepest nesting of lists accepted in `script`, `before_script` and `after_script`.
const MAX_SCRIPT_NESTING: usize = 10;

/// The stage of a job without `stage:`.
const DEFAULT_STAGE: &str = "test";

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
    /// numbers and booleans are written as YAML writes them.
    pub variables: Vec<(String, String)>,
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
}

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
    /// The pipeline file is not valid YAML.
    #[error("failed to parse {} as YAML{}: fix the YAML syntax there", .path.display(), location_suffix(.source))]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the YAML parser said.
        source: serde_norway::Error,
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
    #[error("{}: job `{job}`: {}", .path.display(), invalid_detail(.key, .message))]
    Invalid {
        /// The file.
        path: PathBuf,
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
        "{}: job `{job}`: `extends` forms a cycle ({}); remove one of the links",
        .path.display(),
        .chain.join(" -> ")
    )]
    ExtendsCycle {
        /// The file.
        path: PathBuf,
        /// The job being resolved.
        job: String,
        /// The entries extended, ending with the one seen twice.
        chain: Vec<String>,
    },
    /// `extends` chains more than [`MAX_EXTENDS_DEPTH`] levels.
    #[error(
        "{}: job `{job}`: `extends` nests deeper than {MAX_EXTENDS_DEPTH} levels ({}); \
         flatten the template chain",
        .path.display(),
        .chain.join(" -> ")
    )]
    ExtendsTooDeep {
        /// The file.
        path: PathBuf,
        /// The job being resolved.
        job: String,
        /// The entries extended.
        chain: Vec<String>,
    },
    /// `extends` names an entry the file does not define.
    #[error(
        "{}: `{job}` extends `{missing}`, which is not defined in this file; \
         define it or fix the name{}",
        .path.display(),
        include_hint(.includes)
    )]
    ExtendsMissing {
        /// The file.
        path: PathBuf,
        /// The job or template whose `extends` names the missing entry.
        job: String,
        /// The missing entry.
        missing: String,
        /// Whether the file has `include:` (whose templates are not read).
        includes: bool,
    },
    /// A `!reference` tag points nowhere, or into a cycle.
    #[error(
        "{}: job `{job}`: `!reference [{}]` {message}{}",
        .path.display(),
        .reference.join(", "),
        include_hint(.includes)
    )]
    BadReference {
        /// The file.
        path: PathBuf,
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

/// Reads the pipeline file at `path` and resolves its job `job`.
///
/// # Errors
///
/// [`PipelineError::Read`] when the file cannot be read, else as [`parse`].
pub fn load(path: &Path, job: &str) -> Result<PipelineJob, PipelineError> {
    let text = std::fs::read_to_string(path).map_err(|source| PipelineError::Read { path: path.to_owned(), source })?;
    parse(&text, path, job)
}

/// Resolves the job `job` of the pipeline file `text`; `path` only names the file in errors.
///
/// # Errors
///
/// When the text is not YAML or not a pipeline, when `job` is not one of its
/// runnable jobs, and when the job, what it extends or references, or the
/// defaults it inherits hold a value of the wrong shape.
pub fn parse(text: &str, path: &Path, job: &str) -> Result<PipelineJob, PipelineError> {
    Resolver::new(text, path)?.job(job)
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
pub fn job_names(text: &str, path: &Path) -> Result<Vec<String>, PipelineError> {
    Ok(Resolver::new(text, path)?.job_names())
}

fn location_suffix(error: &serde_norway::Error) -> String {
    match error.location() {
        Some(at) => format!(" at line {}, column {}", at.line(), at.column()),
        None => String::new(),
    }
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
        " (this file uses `include:`, and `berth exec` does not read included files)"
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
            "; jobs from `include:` files are not read by `berth exec`, \
             so only jobs defined in this file can run",
        );
    }
    message
}

/// Whether a top-level key names a job (visible or not): not a global keyword.
fn is_job_or_template(name: &str) -> bool {
    !RESERVED_KEYWORDS.contains(&name)
}

/// Whether a top-level key names a visible job.
fn is_visible_job(name: &str) -> bool {
    is_job_or_template(name) && !name.starts_with('.')
}

/// What a value is, for messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "empty",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a hash",
        Value::Tagged(_) => "a tagged value",
    }
}

/// A scalar as a string, the way YAML writes it.
fn scalar_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Parses the text into the top-level hash, merge keys applied.
fn parse_document(text: &str, path: &Path) -> Result<Mapping, PipelineError> {
    let parse_error = |source| PipelineError::Parse { path: path.to_owned(), source };
    let mut documents = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        documents.push(Value::deserialize(document).map_err(parse_error)?);
    }
    let is_spec_header = |value: &Value| match value {
        Value::Mapping(m) => m.len() == 1 && m.contains_key("spec"),
        _ => false,
    };
    let mut document = match documents.len() {
        0 => Value::Null,
        1 => documents.pop().unwrap_or(Value::Null),
        2 if is_spec_header(&documents[0]) => documents.pop().unwrap_or(Value::Null),
        n => {
            return Err(PipelineError::Structure {
                path: path.to_owned(),
                message: format!(
                    "the file holds {n} YAML documents; a pipeline is one document, \
                     optionally after a `spec:` header: remove the extra `---` separators"
                ),
            })
        }
    };
    apply_merge_keys(&mut document, &mut Vec::new())
        .map_err(|message| PipelineError::Structure { path: path.to_owned(), message })?;
    match document {
        Value::Null => Ok(Mapping::new()),
        Value::Mapping(root) => Ok(root),
        other => Err(PipelineError::Structure {
            path: path.to_owned(),
            message: format!("the top level is {}, but a pipeline is a hash of jobs and global keywords", kind(&other)),
        }),
    }
}

/// Applies YAML merge keys (`<<`) everywhere in `value`.
///
/// Unlike `Value::apply_merge`, this merges nested merge keys (an anchor
/// whose hash itself uses `<<`) and keeps key order: merged keys take the
/// place of the `<<` key. Keys of the hash win over merged ones; among
/// several merged hashes, the first one holding a key wins.
fn apply_merge_keys(value: &mut Value, at: &mut Vec<String>) -> Result<(), String> {
    match value {
        Value::Mapping(mapping) => {
            for (key, child) in mapping.iter_mut() {
                at.push(scalar_string(key).unwrap_or_else(|| "?".to_owned()));
                let result = apply_merge_keys(child, at);
                at.pop();
                result?;
            }
            if !mapping.contains_key("<<") {
                return Ok(());
            }
            let old = std::mem::take(mapping);
            for (key, child) in &old {
                if key.as_str() != Some("<<") {
                    mapping.insert(key.clone(), child.clone());
                    continue;
                }
                let sources: Vec<&Mapping> = match child {
                    Value::Mapping(source) => vec![source],
                    Value::Sequence(items) => items
                        .iter()
                        .map(|item| match item {
                            Value::Mapping(source) => Ok(source),
                            other => Err(merge_error(at, other)),
                        })
                        .collect::<Result<_, _>>()?,
                    other => return Err(merge_error(at, other)),
                };
                for source in sources {
                    for (merged_key, merged) in source {
                        if !old.contains_key(merged_key) && !mapping.contains_key(merged_key) {
                            mapping.insert(merged_key.clone(), merged.clone());
                        }
                    }
                }
            }
            Ok(())
        }
        Value::Sequence(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                at.push(index.to_string());
                let result = apply_merge_keys(item, at);
                at.pop();
                result?;
            }
            Ok(())
        }
        Value::Tagged(tagged) => apply_merge_keys(&mut tagged.value, at),
        _ => Ok(()),
    }
}

fn merge_error(at: &[String], found: &Value) -> String {
    let place = if at.is_empty() { "the top level".to_owned() } else { format!("`{}`", at.join(":")) };
    format!(
        "the merge key `<<` at {place} must be an alias of a hash or a list of them \
         (like `<<: *defaults`), but holds {}",
        kind(found)
    )
}

/// Which entries an `inherit:` setting lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Inherit {
    All,
    Nothing,
    Only(Vec<String>),
}

impl Inherit {
    fn parse(value: Option<&Value>) -> Result<Self, String> {
        match value {
            None | Some(Value::Null) | Some(Value::Bool(true)) => Ok(Inherit::All),
            Some(Value::Bool(false)) => Ok(Inherit::Nothing),
            Some(Value::Sequence(items)) => items
                .iter()
                .map(|item| item.as_str().map(str::to_owned).ok_or(()))
                .collect::<Result<_, _>>()
                .map(Inherit::Only)
                .map_err(|()| "the list must hold names only".to_owned()),
            Some(other) => Err(format!("must be true, false or a list of names, not {}", kind(other))),
        }
    }

    fn allows(&self, name: &str) -> bool {
        match self {
            Inherit::All => true,
            Inherit::Nothing => false,
            Inherit::Only(names) => names.iter().any(|n| n == name),
        }
    }
}

/// Deep-merges `over` into `base`: hashes merge recursively, anything else
/// in `over` replaces what `base` holds.
fn deep_merge(base: &mut Mapping, over: &Mapping) {
    for (key, value) in over {
        match (base.get_mut(key), value) {
            (Some(Value::Mapping(inner)), Value::Mapping(value)) => deep_merge(inner, value),
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

/// A list of commands: a string, or a list of strings and nested lists.
fn commands(value: &Value) -> Result<Vec<String>, String> {
    fn flatten(items: &[Value], depth: usize, out: &mut Vec<String>) -> Result<(), String> {
        for item in items {
            match item {
                Value::String(command) => out.push(command.clone()),
                Value::Sequence(inner) if depth < MAX_SCRIPT_NESTING => {
                    flatten(inner, depth + 1, out)?;
                }
                Value::Sequence(_) => {
                    return Err(format!("lists nest deeper than {MAX_SCRIPT_NESTING} levels; flatten them"))
                }
                Value::Mapping(_) => {
                    return Err(format!(
                        "command {} is a hash: a command holding `: ` must be quoted, \
                         like `- 'echo \"key: value\"'`",
                        out.len() + 1
                    ))
                }
                other => {
                    return Err(format!(
                        "command {} is {}, but commands are strings: quote it",
                        out.len() + 1,
                        kind(other)
                    ))
                }
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    match value {
        Value::String(command) => out.push(command.clone()),
        Value::Sequence(items) => flatten(items, 1, &mut out)?,
        other => return Err(format!("must be a string or a list of strings, not {}", kind(other))),
    }
    Ok(out)
}

/// A `variables:` hash as name/value pairs, in order.
fn variables(value: &Value) -> Result<Vec<(String, String)>, String> {
    let Value::Mapping(mapping) = value else {
        return Err(format!("must be a hash of NAME: value, not {}", kind(value)));
    };
    let mut out = Vec::with_capacity(mapping.len());
    for (name, value) in mapping {
        let name = match name {
            Value::String(name) => name.clone(),
            Value::Number(n) => n.to_string(),
            other => return Err(format!("a variable name is {}; use a string", kind(other))),
        };
        let value = match value {
            Value::Mapping(fields) => {
                if let Some(key) = fields
                    .keys()
                    .find(|key| !matches!(key.as_str(), Some("value" | "description" | "expand" | "options")))
                {
                    return Err(format!(
                        "variable `{name}` has the unknown key `{}`; \
                         the known keys are value, description, expand and options",
                        scalar_string(key).unwrap_or_else(|| kind(key).to_owned())
                    ));
                }
                match fields.get("value") {
                    None | Some(Value::Null) => String::new(),
                    Some(inner) => scalar_string(inner)
                        .ok_or_else(|| format!("the value of variable `{name}` is {}; use a string", kind(inner)))?,
                }
            }
            other => scalar_string(other).ok_or_else(|| {
                format!(
                    "variable `{name}` is {}; use a string (quote it, like `{name}: \"\"`) \
                     or `{{value: ..., description: ...}}`",
                    kind(other)
                )
            })?,
        };
        out.push((name, value));
    }
    Ok(out)
}

/// The image name of `image: name` or `image: {name: name, ...}`.
fn image_name(value: &Value) -> Result<String, String> {
    let name = match value {
        Value::Mapping(fields) => match fields.get("name") {
            Some(name) => name,
            None => return Err("an image hash needs a `name:`".to_owned()),
        },
        other => other,
    };
    match name {
        Value::String(name) if !name.trim().is_empty() => Ok(name.clone()),
        Value::String(_) => Err("the image name is empty".to_owned()),
        other => Err(format!("the image must be a name or a hash with `name:`, not {}", kind(other))),
    }
}

/// Seconds of a `timeout:` value: a duration string, or a number of seconds.
fn timeout(value: &Value) -> Result<u64, String> {
    match value {
        Value::Number(n) => match n.as_u64() {
            Some(secs) if secs > 0 => Ok(secs),
            _ => Err(format!("{n} is not a positive number of seconds")),
        },
        Value::String(text) => parse_duration(text),
        other => Err(format!("must be a duration like `1h 30m`, not {}", kind(other))),
    }
}

/// Parses a duration the way GitLab does for `timeout:`: `3600` (seconds),
/// `1h 30m`, `1h30m`, `90 minutes`, `1 hour and 5 minutes, 10s`, `1.5 hours`,
/// `01:30:00` or `1:30` (minutes and seconds).
fn parse_duration(text: &str) -> Result<u64, String> {
    let bad = || format!("`{text}` is not a duration; write it like `3600`, `2h`, `1h 30m` or `90 minutes`");
    let lower = text.trim().to_ascii_lowercase();
    if lower.is_empty() {
        return Err(bad());
    }
    let secs = if lower.bytes().all(|b| b.is_ascii_digit()) {
        lower.parse::<f64>().map_err(|_| bad())?
    } else if lower.contains(':') {
        let parts: Vec<&str> = lower.split(':').collect();
        if parts.len() > 3 || parts.iter().any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
            return Err(bad());
        }
        parts
            .iter()
            .try_fold(0.0, |total: f64, part| part.parse::<f64>().map(|n| total * 60.0 + n).map_err(|_| bad()))?
    } else {
        let mut total = 0.0;
        let mut components = 0;
        let mut rest = lower.as_str();
        loop {
            rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ',');
            if rest.is_empty() {
                break;
            }
            if components > 0 {
                if let Some(after) = rest.strip_prefix("and") {
                    if after.starts_with(|c: char| c.is_whitespace()) {
                        rest = after;
                        continue;
                    }
                }
            }
            let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
            let number: f64 = rest[..number_len].parse().map_err(|_| bad())?;
            rest = rest[number_len..].trim_start();
            let unit_len = rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(rest.len());
            let unit = unit_seconds(&rest[..unit_len]).ok_or_else(bad)?;
            rest = &rest[unit_len..];
            total += number * unit;
            components += 1;
        }
        if components == 0 {
            return Err(bad());
        }
        total
    };
    let secs = secs.round();
    if !(1.0..=1e12).contains(&secs) {
        return Err(format!("`{text}` must be at least one second and at most a few thousand years"));
    }
    // The range check above makes the conversion exact.
    Ok(secs as u64)
}

/// Seconds in a duration unit as ChronicDuration (GitLab's parser) names it.
fn unit_seconds(unit: &str) -> Option<f64> {
    const MINUTE: f64 = 60.0;
    const HOUR: f64 = 60.0 * MINUTE;
    const DAY: f64 = 24.0 * HOUR;
    Some(match unit {
        "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
        "m" | "min" | "mins" | "minute" | "minutes" => MINUTE,
        "h" | "hr" | "hrs" | "hour" | "hours" => HOUR,
        "d" | "day" | "days" => DAY,
        "w" | "wk" | "wks" | "week" | "weeks" => 7.0 * DAY,
        "mo" | "mos" | "month" | "months" => 30.0 * DAY,
        "y" | "yr" | "yrs" | "year" | "years" => 365.0 * DAY,
        _ => return None,
    })
}

/// `allow_failure:` as (allowed, exit codes).
fn allow_failure(value: &Value) -> Result<(bool, Vec<i32>), String> {
    let exit_code = |value: &Value| {
        value
            .as_i64()
            .and_then(|code| i32::try_from(code).ok())
            .ok_or_else(|| format!("`exit_codes` must hold integers, not {}", kind(value)))
    };
    match value {
        Value::Bool(allowed) => Ok((*allowed, Vec::new())),
        Value::Mapping(fields) => {
            if let Some(key) = fields.keys().find(|key| key.as_str() != Some("exit_codes")) {
                return Err(format!(
                    "the only key of an `allow_failure` hash is `exit_codes`, not `{}`",
                    scalar_string(key).unwrap_or_else(|| kind(key).to_owned())
                ));
            }
            let codes = match fields.get("exit_codes") {
                Some(Value::Sequence(codes)) => codes.iter().map(exit_code).collect(),
                Some(code) => exit_code(code).map(|code| vec![code]),
                None => Err("an `allow_failure` hash needs `exit_codes:`".to_owned()),
            }?;
            Ok((false, codes))
        }
        other => Err(format!("must be true, false or `{{exit_codes: [...]}}`, not {}", kind(other))),
    }
}

/// The parsed file, with the entries extended so far.
#[derive(Debug)]
struct Resolver<'a> {
    path: &'a Path,
    root: Mapping,
    includes: bool,
    /// Entries with `extends` merged, and how many levels of `extends` lie below them.
    extended: HashMap<String, (Value, usize)>,
}

impl<'a> Resolver<'a> {
    fn new(text: &str, path: &'a Path) -> Result<Self, PipelineError> {
        let root = parse_document(text, path)?;
        let includes = root.contains_key("include");
        Ok(Resolver { path, root, includes, extended: HashMap::new() })
    }

    fn invalid(&self, job: &str, key: &str, message: impl Into<String>) -> PipelineError {
        PipelineError::Invalid {
            path: self.path.to_owned(),
            job: job.to_owned(),
            key: key.to_owned(),
            message: message.into(),
        }
    }

    fn job_names(&mut self) -> Vec<String> {
        let candidates: Vec<String> = self
            .root
            .iter()
            .filter(|(_, value)| value.is_mapping())
            .filter_map(|(key, _)| key.as_str())
            .filter(|name| is_visible_job(name))
            .map(str::to_owned)
            .collect();
        candidates
            .into_iter()
            .filter(|name| match self.extend(name, &mut vec![name.clone()]) {
                Ok(Value::Mapping(job)) => !job.contains_key("trigger"),
                _ => true,
            })
            .collect()
    }

    /// The entry `name` with its `extends` merged in; `chain` holds the
    /// entries being extended, `name` last.
    fn extend(&mut self, name: &str, chain: &mut Vec<String>) -> Result<Value, PipelineError> {
        if let Some((done, height)) = self.extended.get(name) {
            // A cached entry skips the walk below it: check its depth here.
            if chain.len() - 1 + height > MAX_EXTENDS_DEPTH {
                return Err(PipelineError::ExtendsTooDeep {
                    path: self.path.to_owned(),
                    job: chain[0].clone(),
                    chain: chain.clone(),
                });
            }
            return Ok(done.clone());
        }
        let Some(Value::Mapping(own)) = self.root.get(name) else {
            return Ok(self.root.get(name).cloned().unwrap_or(Value::Null));
        };
        let own = own.clone();
        let bases = match own.get("extends") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(base)) => vec![base.clone()],
            Some(Value::Sequence(items)) => {
                items.iter().map(|item| item.as_str().map(str::to_owned)).collect::<Option<Vec<_>>>().ok_or_else(
                    || {
                        self.invalid(
                            &chain[0],
                            "extends",
                            format!("`{name}` extends a list holding something other than names"),
                        )
                    },
                )?
            }
            Some(other) => {
                return Err(self.invalid(
                    &chain[0],
                    "extends",
                    format!("`{name}` extends {}; use a name or a list of names", kind(other)),
                ))
            }
        };
        let mut merged = Mapping::new();
        let mut height = 0;
        for base in bases {
            let exists = is_job_or_template(&base) && self.root.contains_key(base.as_str());
            if !exists {
                return Err(PipelineError::ExtendsMissing {
                    path: self.path.to_owned(),
                    job: name.to_owned(),
                    missing: base,
                    includes: self.includes,
                });
            }
            if chain.contains(&base) {
                let mut cycle = chain.clone();
                cycle.push(base);
                return Err(PipelineError::ExtendsCycle {
                    path: self.path.to_owned(),
                    job: chain[0].clone(),
                    chain: cycle,
                });
            }
            chain.push(base.clone());
            if chain.len() > MAX_EXTENDS_DEPTH + 1 {
                return Err(PipelineError::ExtendsTooDeep {
                    path: self.path.to_owned(),
                    job: chain[0].clone(),
                    chain: chain.clone(),
                });
            }
            let extended = self.extend(&base, chain)?;
            chain.pop();
            let base_height = self.extended.get(&base).map_or(0, |(_, h)| *h);
            height = height.max(base_height + 1);
            match extended {
                Value::Mapping(extended) => deep_merge(&mut merged, &extended),
                other => {
                    return Err(self.invalid(
                        &chain[0],
                        "extends",
                        format!("`{name}` extends `{base}`, which is {} instead of a hash of keywords", kind(&other)),
                    ))
                }
            }
        }
        deep_merge(&mut merged, &own);
        merged.shift_remove("extends");
        let merged = Value::Mapping(merged);
        self.extended.insert(name.to_owned(), (merged.clone(), height));
        Ok(merged)
    }

    /// `value` with every `!reference` tag replaced by what it points at.
    fn expand(
        &mut self,
        value: &Value,
        job: &str,
        key: &str,
        stack: &mut Vec<Vec<String>>,
    ) -> Result<Value, PipelineError> {
        match value {
            Value::Tagged(tagged) => {
                if tagged.tag != "reference" {
                    return Err(self.invalid(
                        job,
                        key,
                        format!("the YAML tag `{}` is not supported; only `!reference` is", tagged.tag),
                    ));
                }
                let reference = match &tagged.value {
                    Value::Sequence(items) if !items.is_empty() => {
                        items.iter().map(|item| item.as_str().map(str::to_owned)).collect::<Option<Vec<_>>>()
                    }
                    _ => None,
                }
                .ok_or_else(|| {
                    self.invalid(job, key, "`!reference` must be a list of names, like `!reference [.setup, script]`")
                })?;
                let bad = |message: &str, includes: bool| PipelineError::BadReference {
                    path: self.path.to_owned(),
                    job: job.to_owned(),
                    reference: reference.clone(),
                    message: message.to_owned(),
                    includes,
                };
                if stack.contains(&reference) {
                    return Err(bad("is part of a cycle of references; break the cycle", false));
                }
                if stack.len() >= MAX_REFERENCE_DEPTH {
                    return Err(bad(
                        &format!(
                            "nests references more than {MAX_REFERENCE_DEPTH} deep; \
                             reference the values directly"
                        ),
                        false,
                    ));
                }
                stack.push(reference.clone());
                let target = self.lookup(&reference, job, key, stack);
                let expanded = target.and_then(|target| self.expand(&target, job, key, stack));
                stack.pop();
                expanded
            }
            Value::Mapping(mapping) => {
                let mut out = Mapping::with_capacity(mapping.len());
                for (k, v) in mapping {
                    out.insert(k.clone(), self.expand(v, job, key, stack)?);
                }
                Ok(Value::Mapping(out))
            }
            Value::Sequence(items) => items
                .iter()
                .map(|item| self.expand(item, job, key, stack))
                .collect::<Result<_, _>>()
                .map(Value::Sequence),
            other => Ok(other.clone()),
        }
    }

    /// The value a `!reference` points at, in the extended file.
    fn lookup(
        &mut self,
        reference: &[String],
        job: &str,
        key: &str,
        stack: &mut Vec<Vec<String>>,
    ) -> Result<Value, PipelineError> {
        let bad = |message: String, includes: bool| PipelineError::BadReference {
            path: self.path.to_owned(),
            job: job.to_owned(),
            reference: reference.to_vec(),
            message,
            includes,
        };
        let entry = &reference[0];
        if !self.root.contains_key(entry.as_str()) {
            return Err(bad(format!("points at `{entry}`, which is not defined in this file"), self.includes));
        }
        let mut current = if is_job_or_template(entry) {
            self.extend(entry, &mut vec![entry.clone()])?
        } else {
            self.root[entry.as_str()].clone()
        };
        for (depth, step) in reference.iter().enumerate().skip(1) {
            if let Value::Tagged(_) = current {
                current = self.expand(&current, job, key, stack)?;
            }
            let parent = reference[..depth].join(":");
            current = match current {
                Value::Mapping(mut mapping) => mapping
                    .swap_remove(step.as_str())
                    .ok_or_else(|| bad(format!("points at `{step}`, but `{parent}` has no such key"), false))?,
                other => {
                    return Err(bad(
                        format!("looks up `{step}` in `{parent}`, which is {} instead of a hash", kind(&other)),
                        false,
                    ))
                }
            };
        }
        Ok(current)
    }

    /// `key` of `mapping`, references expanded; `None` when absent or null.
    fn field(&mut self, mapping: &Mapping, key: &str, job: &str, label: &str) -> Result<Option<Value>, PipelineError> {
        match mapping.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => match self.expand(value, job, label, &mut Vec::new())? {
                Value::Null => Ok(None),
                value => Ok(Some(value)),
            },
        }
    }

    /// The top-level keyword `key`, references expanded; `None` when absent or null.
    fn global(&mut self, key: &str, job: &str, label: &str) -> Result<Option<Value>, PipelineError> {
        let mut holder = Mapping::new();
        if let Some(value) = self.root.get(key) {
            holder.insert(Value::from(key), value.clone());
        }
        self.field(&holder, key, job, label)
    }

    /// The value of `key` for the job: the job's own, else `default:`'s if
    /// inherited, else the legacy global keyword if `legacy`. Returns the
    /// value with the label naming where it came from.
    fn inherited(
        &mut self,
        own: &Mapping,
        default: &Mapping,
        inherit: &Inherit,
        key: &str,
        legacy: bool,
        job: &str,
    ) -> Result<Option<(Value, String)>, PipelineError> {
        if let Some(value) = self.field(own, key, job, key)? {
            return Ok(Some((value, key.to_owned())));
        }
        if !inherit.allows(key) {
            return Ok(None);
        }
        let label = format!("default:{key}");
        if let Some(value) = self.field(default, key, job, &label)? {
            return Ok(Some((value, label)));
        }
        if legacy {
            let label = format!("{key} (top-level)");
            if let Some(value) = self.global(key, job, &label)? {
                return Ok(Some((value, label)));
            }
        }
        Ok(None)
    }

    fn job(&mut self, name: &str) -> Result<PipelineJob, PipelineError> {
        if !is_visible_job(name) || !self.root.contains_key(name) {
            return Err(PipelineError::NoSuchJob {
                path: self.path.to_owned(),
                job: name.to_owned(),
                available: self.job_names(),
                includes: self.includes,
            });
        }
        let own = match self.extend(name, &mut vec![name.to_owned()])? {
            Value::Mapping(own) => own,
            other => {
                return Err(self.invalid(
                    name,
                    "",
                    format!("the job is {}, but a job is a hash of keywords like `script:`", kind(&other)),
                ))
            }
        };
        if own.contains_key("trigger") {
            return Err(self.invalid(
                name,
                "trigger",
                "this is a trigger job, which starts a downstream pipeline instead of \
                 running a script; `berth exec` can only run jobs with `script:`",
            ));
        }

        let (inherit_default, inherit_variables) = match self.field(&own, "inherit", name, "inherit")? {
            None => (Inherit::All, Inherit::All),
            Some(Value::Mapping(inherit)) => {
                if let Some(key) = inherit.keys().find(|key| !matches!(key.as_str(), Some("default" | "variables"))) {
                    return Err(self.invalid(
                        name,
                        "inherit",
                        format!(
                            "unknown key `{}`; the known keys are default and variables",
                            scalar_string(key).unwrap_or_else(|| kind(key).to_owned())
                        ),
                    ));
                }
                let parse = |key: &str| {
                    Inherit::parse(inherit.get(key))
                        .map_err(|message| self.invalid(name, &format!("inherit:{key}"), message))
                };
                (parse("default")?, parse("variables")?)
            }
            Some(other) => {
                return Err(self.invalid(
                    name,
                    "inherit",
                    format!("must be a hash with `default:` and/or `variables:`, not {}", kind(&other)),
                ))
            }
        };

        let default = match self.global("default", name, "default")? {
            None => Mapping::new(),
            Some(Value::Mapping(default)) => default,
            Some(other) => {
                return Err(self.invalid(name, "default", format!("must be a hash of keywords, not {}", kind(&other))))
            }
        };

        let stage = match self.field(&own, "stage", name, "stage")? {
            None => DEFAULT_STAGE.to_owned(),
            Some(Value::String(stage)) if !stage.is_empty() => stage,
            Some(other) => {
                return Err(self.invalid(name, "stage", format!("must be a stage name, not {}", kind(&other))))
            }
        };

        let image = match self.inherited(&own, &default, &inherit_default, "image", true, name)? {
            None => None,
            Some((value, label)) => Some(image_name(&value).map_err(|message| self.invalid(name, &label, message))?),
        };

        let mut scripts = Vec::new();
        for key in ["before_script", "after_script"] {
            scripts.push(match self.inherited(&own, &default, &inherit_default, key, true, name)? {
                None => Vec::new(),
                Some((value, label)) => commands(&value).map_err(|message| self.invalid(name, &label, message))?,
            });
        }
        let after_script = scripts.pop().unwrap_or_default();
        let before_script = scripts.pop().unwrap_or_default();

        let script = match self.field(&own, "script", name, "script")? {
            None => {
                return Err(self.invalid(
                    name,
                    "script",
                    "the job has no `script:`; add one (or `extends:` a template that has one)",
                ))
            }
            Some(value) => commands(&value).map_err(|message| self.invalid(name, "script", message))?,
        };
        if script.is_empty() {
            return Err(self.invalid(name, "script", "the job's `script:` is empty; add a command"));
        }

        let timeout_secs = match self.inherited(&own, &default, &inherit_default, "timeout", false, name)? {
            None => None,
            Some((value, label)) => Some(timeout(&value).map_err(|message| self.invalid(name, &label, message))?),
        };

        let (allow_failure, allow_failure_exit_codes) =
            match self.field(&own, "allow_failure", name, "allow_failure")? {
                Some(value) => allow_failure(&value).map_err(|message| self.invalid(name, "allow_failure", message))?,
                None => {
                    let manual = self.field(&own, "when", name, "when")? == Some(Value::String("manual".to_owned()));
                    (manual && !own.contains_key("rules"), Vec::new())
                }
            };

        let global_variables = self.global("variables", name, "variables (top-level)")?;
        let mut all_variables: Vec<(String, String)> = match global_variables {
            None => Vec::new(),
            Some(value) => variables(&value)
                .map_err(|message| self.invalid(name, "variables (top-level)", message))?
                .into_iter()
                .filter(|(variable, _)| inherit_variables.allows(variable))
                .collect(),
        };
        if let Some(value) = self.field(&own, "variables", name, "variables")? {
            let job_variables = variables(&value).map_err(|message| self.invalid(name, "variables", message))?;
            for (variable, value) in job_variables {
                match all_variables.iter_mut().find(|(existing, _)| *existing == variable) {
                    Some(slot) => slot.1 = value,
                    None => all_variables.push((variable, value)),
                }
            }
        }

        Ok(PipelineJob {
            name: name.to_owned(),
            stage,
            image,
            variables: all_variables,
            before_script,
            script,
            after_script,
            timeout_secs,
            allow_failure,
            allow_failure_exit_codes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> &'static Path {
        Path::new("ci.yml")
    }

    fn job(text: &str, name: &str) -> PipelineJob {
        parse(text, path(), name).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn error(text: &str, name: &str) -> PipelineError {
        match parse(text, path(), name) {
            Ok(job) => panic!("{name} resolved to {job:?}"),
            Err(e) => e,
        }
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    fn vars(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn minimal_job_gets_defaults() {
        assert_eq!(
            job("build:\n  script: make\n", "build"),
            PipelineJob {
                name: "build".into(),
                stage: "test".into(),
                image: None,
                variables: Vec::new(),
                before_script: Vec::new(),
                script: strings(&["make"]),
                after_script: Vec::new(),
                timeout_secs: None,
                allow_failure: false,
                allow_failure_exit_codes: Vec::new(),
            }
        );
    }

    #[test]
    fn full_job_with_unknown_keywords_ignored() {
        let text = r#"
stages: [build, test]
build:
  stage: build
  image: rust:1.85
  tags: [docker]
  rules:
    - if: $CI_COMMIT_BRANCH
  needs: []
  artifacts: {paths: [target/]}
  cache: {key: x, paths: [.cargo]}
  services: [postgres]
  retry: 2
  before_script: echo before
  script:
    - cargo build
    - cargo test
  after_script: [echo after]
  timeout: 1h 30m
  allow_failure: true
"#;
        let build = job(text, "build");
        assert_eq!(build.stage, "build");
        assert_eq!(build.image.as_deref(), Some("rust:1.85"));
        assert_eq!(build.before_script, strings(&["echo before"]));
        assert_eq!(build.script, strings(&["cargo build", "cargo test"]));
        assert_eq!(build.after_script, strings(&["echo after"]));
        assert_eq!(build.timeout_secs, Some(5400));
        assert!(build.allow_failure);
    }

    #[test]
    fn single_string_scripts() {
        let text = "j:\n  before_script: a\n  script: b\n  after_script: c\n";
        let j = job(text, "j");
        assert_eq!(j.before_script, strings(&["a"]));
        assert_eq!(j.script, strings(&["b"]));
        assert_eq!(j.after_script, strings(&["c"]));
    }

    #[test]
    fn nested_script_arrays_are_flattened_and_blocks_stay_whole() {
        let text = r#"
j:
  script:
    - one
    - [two, three]
    - - four
      - [five]
    - |
      if true; then
        echo six
      fi
    - >
      folded
      line
"#;
        assert_eq!(
            job(text, "j").script,
            strings(&["one", "two", "three", "four", "five", "if true; then\n  echo six\nfi\n", "folded line\n",])
        );
    }

    #[test]
    fn script_entries_must_be_strings() {
        let e = error("j:\n  script:\n    - echo ok\n    - echo key: value\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "script"), "{e:?}");
        let message = e.to_string();
        assert!(message.contains("command 2 is a hash"), "{message}");
        assert!(message.contains("quoted"), "{message}");

        let e = error("j:\n  script: [echo, 42]\n", "j");
        assert!(e.to_string().contains("command 2 is a number"), "{e}");

        let e = error("j:\n  script: {a: b}\n", "j");
        assert!(e.to_string().contains("must be a string or a list of strings, not a hash"), "{e}");

        let e = error("j:\n  script: x\n  after_script: 3\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "after_script"), "{e:?}");
    }

    #[test]
    fn scripts_nested_too_deep_are_rejected() {
        let mut script = "x".to_owned();
        for _ in 0..MAX_SCRIPT_NESTING {
            script = format!("[{script}]");
        }
        assert_eq!(job(&format!("j:\n  script: {script}\n"), "j").script, strings(&["x"]));
        let e = error(&format!("j:\n  script: [{script}]\n"), "j");
        assert!(e.to_string().contains("nest deeper than 10"), "{e}");
    }

    #[test]
    fn missing_or_empty_script_is_an_error() {
        let e = error("j:\n  stage: build\n", "j");
        match &e {
            PipelineError::Invalid { path, job, key, .. } => {
                assert_eq!(path, Path::new("ci.yml"));
                assert_eq!(job, "j");
                assert_eq!(key, "script");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            e.to_string(),
            "ci.yml: job `j`: invalid `script`: the job has no `script:`; \
             add one (or `extends:` a template that has one)"
        );
        let e = error("j:\n  script: []\n", "j");
        assert!(e.to_string().contains("is empty"), "{e}");
        let e = error("j:\n  script:\n", "j");
        assert!(e.to_string().contains("has no `script:`"), "{e}");
    }

    #[test]
    fn anchors_and_merge_keys() {
        let text = r#"
.common: &common
  image: alpine:3
  before_script: [echo setup]
  variables: &common_vars
    A: "1"
    B: "2"
build:
  <<: *common
  variables:
    <<: *common_vars
    B: two
    C: "3"
  script: &build_script
    - make
test:
  <<: *common
  script: *build_script
"#;
        let build = job(text, "build");
        assert_eq!(build.image.as_deref(), Some("alpine:3"));
        assert_eq!(build.before_script, strings(&["echo setup"]));
        assert_eq!(build.variables, vars(&[("A", "1"), ("B", "two"), ("C", "3")]));
        assert_eq!(build.script, strings(&["make"]));
        let test = job(text, "test");
        assert_eq!(test.script, strings(&["make"]));
        assert_eq!(test.variables, vars(&[("A", "1"), ("B", "2")]));
    }

    #[test]
    fn nested_merge_keys_and_merge_lists() {
        let text = r#"
.base: &base
  image: base
  variables: {X: base}
  timeout: 1m
.middle: &middle
  <<: *base
  image: middle
.other: &other
  image: other
  stage: deploy
  timeout: 2m
j:
  <<: [*middle, *other]
  script: run
"#;
        let j = job(text, "j");
        // `.middle` overrides `.base`; the first of a merge list wins.
        assert_eq!(j.image.as_deref(), Some("middle"));
        assert_eq!(j.variables, vars(&[("X", "base")]));
        assert_eq!(j.timeout_secs, Some(60));
        assert_eq!(j.stage, "deploy");
    }

    #[test]
    fn merged_keys_take_the_place_of_the_merge_key() {
        let mut value: Value = serde_norway::from_str("a: &a {x: 1, y: 2}\nb: {w: 0, <<: *a, y: 3, z: 4}\n").unwrap();
        apply_merge_keys(&mut value, &mut Vec::new()).unwrap();
        let keys: Vec<&str> = value["b"].as_mapping().unwrap().keys().filter_map(Value::as_str).collect();
        assert_eq!(keys, ["w", "x", "y", "z"]);
        assert_eq!(value["b"]["y"], Value::from(3));
    }

    #[test]
    fn bad_merge_key_is_a_structure_error() {
        let e = error("j:\n  <<: just a string\n  script: x\n", "j");
        assert!(matches!(e, PipelineError::Structure { .. }), "{e:?}");
        assert!(e.to_string().contains("merge key `<<` at `j`"), "{e}");
    }

    #[test]
    fn extends_chain_of_three_levels_deep_merges() {
        let text = r#"
.base:
  image: base-image
  variables: {A: base, B: base}
  before_script: [base before]
  script: [base script]
  timeout: 10m
.middle:
  extends: .base
  variables: {B: middle, C: middle}
  script: [middle script]
j:
  extends: .middle
  variables: {C: job, D: job}
  stage: build
"#;
        let j = job(text, "j");
        assert_eq!(j.image.as_deref(), Some("base-image"));
        assert_eq!(j.variables, vars(&[("A", "base"), ("B", "middle"), ("C", "job"), ("D", "job")]));
        assert_eq!(j.before_script, strings(&["base before"]));
        // Lists are replaced, not concatenated.
        assert_eq!(j.script, strings(&["middle script"]));
        assert_eq!(j.timeout_secs, Some(600));
        assert_eq!(j.stage, "build");
    }

    #[test]
    fn extends_several_parents_later_wins_and_job_wins_over_all() {
        let text = r#"
.a:
  image: a
  stage: a
  variables: {X: a, Y: a}
  script: a
.b:
  image: b
  variables: {Y: b}
  allow_failure: true
j:
  extends: [.a, .b]
  stage: own
"#;
        let j = job(text, "j");
        assert_eq!(j.image.as_deref(), Some("b"));
        assert_eq!(j.stage, "own");
        assert_eq!(j.variables, vars(&[("X", "a"), ("Y", "b")]));
        assert_eq!(j.script, strings(&["a"]));
        assert!(j.allow_failure);
    }

    #[test]
    fn extends_from_a_visible_job() {
        let text = "build:\n  script: make\n  image: gcc\ndebug:\n  extends: build\n";
        let debug = job(text, "debug");
        assert_eq!(debug.script, strings(&["make"]));
        assert_eq!(debug.image.as_deref(), Some("gcc"));
    }

    #[test]
    fn extends_cycle_is_an_error() {
        let text = ".a:\n  extends: .b\n.b:\n  extends: .c\n.c:\n  extends: .a\nj:\n  extends: .a\n  script: x\n";
        match error(text, "j") {
            PipelineError::ExtendsCycle { job, chain, .. } => {
                assert_eq!(job, "j");
                assert_eq!(chain, strings(&["j", ".a", ".b", ".c", ".a"]));
            }
            other => panic!("{other:?}"),
        }
        let e = error("j:\n  extends: j\n  script: x\n", "j");
        assert_eq!(e.to_string(), "ci.yml: job `j`: `extends` forms a cycle (j -> j); remove one of the links");
    }

    #[test]
    fn extends_missing_names_the_template() {
        let text = ".a:\n  extends: .gone\nj:\n  extends: [.a]\n  script: x\n";
        match error(text, "j") {
            PipelineError::ExtendsMissing { job, missing, includes, .. } => {
                assert_eq!(job, ".a");
                assert_eq!(missing, ".gone");
                assert!(!includes);
            }
            other => panic!("{other:?}"),
        }
        let with_include = format!("include: templates.yml\n{text}");
        let message = error(&with_include, "j").to_string();
        assert!(message.contains("`.a` extends `.gone`"), "{message}");
        assert!(message.contains("does not read included files"), "{message}");
    }

    #[test]
    fn extends_depth_is_limited_to_eleven() {
        let chain = |levels: usize| {
            let mut text = String::from(".t0:\n  script: deep\n");
            for level in 1..levels {
                text.push_str(&format!(".t{level}:\n  extends: .t{}\n", level - 1));
            }
            text.push_str(&format!("j:\n  extends: .t{}\n", levels - 1));
            text
        };
        assert_eq!(job(&chain(MAX_EXTENDS_DEPTH), "j").script, strings(&["deep"]));
        // Also when the templates were extended (and cached) before the job.
        let mut text = chain(MAX_EXTENDS_DEPTH + 1);
        text.push_str("k:\n  script: !reference [.t11, script]\n");
        let mut resolver = Resolver::new(&text, path()).unwrap();
        assert_eq!(resolver.job("k").unwrap().script, strings(&["deep"]));
        assert!(matches!(resolver.job("j"), Err(PipelineError::ExtendsTooDeep { .. })));
        match error(&chain(MAX_EXTENDS_DEPTH + 1), "j") {
            PipelineError::ExtendsTooDeep { job, chain, .. } => {
                assert_eq!(job, "j");
                assert_eq!(chain.len(), MAX_EXTENDS_DEPTH + 2);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn extends_of_the_wrong_shape() {
        let e = error("j:\n  extends: {a: b}\n  script: x\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "extends"), "{e:?}");
        let e = error(".t: just text\nj:\n  extends: .t\n  script: x\n", "j");
        assert!(e.to_string().contains("which is a string instead of a hash"), "{e}");
    }

    #[test]
    fn references_in_scripts_are_inserted() {
        let text = r#"
.setup:
  script:
    - echo setup one
    - echo setup two
  after_script: [echo cleanup]
.tools:
  before_script:
    - !reference [.setup, script]
    - echo tools
j:
  before_script: !reference [.tools, before_script]
  script:
    - echo first
    - !reference [.setup, script]
    - echo last
  after_script:
    - !reference [.setup, after_script]
"#;
        let j = job(text, "j");
        assert_eq!(j.before_script, strings(&["echo setup one", "echo setup two", "echo tools"]));
        assert_eq!(j.script, strings(&["echo first", "echo setup one", "echo setup two", "echo last"]));
        assert_eq!(j.after_script, strings(&["echo cleanup"]));
    }

    #[test]
    fn references_in_variables_image_and_through_extends() {
        let text = r#"
variables:
  GLOBAL: g
.vars:
  variables:
    A: a
    B: "2"
.images:
  image:
    name: registry/tool:1
.base:
  variables: {INHERITED: yes-from-base}
.child:
  extends: .base
j:
  image: !reference [.images, image, name]
  variables:
    ONE: !reference [.vars, variables, A]
    INH: !reference [.child, variables, INHERITED]
    TOP: !reference [variables, GLOBAL]
  script: x
k:
  variables: !reference [.vars, variables]
  image: !reference [.images, image]
  script: x
"#;
        let j = job(text, "j");
        assert_eq!(j.image.as_deref(), Some("registry/tool:1"));
        assert_eq!(j.variables, vars(&[("GLOBAL", "g"), ("ONE", "a"), ("INH", "yes-from-base"), ("TOP", "g")]));
        let k = job(text, "k");
        assert_eq!(k.image.as_deref(), Some("registry/tool:1"));
        assert_eq!(k.variables, vars(&[("GLOBAL", "g"), ("A", "a"), ("B", "2")]));
    }

    #[test]
    fn references_are_resolved_after_extends() {
        // The job's `script` comes from `.t`, and its reference is resolved in
        // the extended job, as GitLab does.
        let text = r#"
.steps:
  script: [step]
.t:
  script:
    - !reference [.steps, script]
    - more
j:
  extends: .t
"#;
        assert_eq!(job(text, "j").script, strings(&["step", "more"]));
    }

    #[test]
    fn bad_references() {
        let text = "j:\n  script: !reference [.nope, script]\n";
        match error(text, "j") {
            PipelineError::BadReference { job, reference, includes, .. } => {
                assert_eq!(job, "j");
                assert_eq!(reference, strings(&[".nope", "script"]));
                assert!(!includes);
            }
            other => panic!("{other:?}"),
        }
        let message = error(&format!("include: x.yml\n{text}"), "j").to_string();
        assert!(message.contains("`!reference [.nope, script]`"), "{message}");
        assert!(message.contains("not defined in this file"), "{message}");
        assert!(message.contains("does not read included files"), "{message}");

        let e = error(".t:\n  image: x\nj:\n  script: !reference [.t, script]\n", "j");
        assert!(e.to_string().contains("`.t` has no such key"), "{e}");

        let e = error(".t:\n  script: x\nj:\n  script: !reference [.t, script, deeper]\n", "j");
        assert!(e.to_string().contains("which is a string instead of a hash"), "{e}");

        let cycle = ".a:\n  script: !reference [.b, script]\n.b:\n  script: !reference [.a, script]\nj:\n  script: !reference [.a, script]\n";
        let e = error(cycle, "j");
        assert!(matches!(e, PipelineError::BadReference { .. }), "{e:?}");
        assert!(e.to_string().contains("cycle"), "{e}");

        let e = error("j:\n  script: !reference .t\n", "j");
        assert!(e.to_string().contains("must be a list of names"), "{e}");

        let e = error("j:\n  script: !custom [x]\n", "j");
        assert!(e.to_string().contains("`!custom` is not supported"), "{e}");
    }

    #[test]
    fn references_in_default_and_global_keywords() {
        let text = r#"
.setup:
  script: [echo setup]
  variables: {FROM_TEMPLATE: t}
  image: template-image
variables: !reference [.setup, variables]
after_script: !reference [.setup, script]
default:
  before_script:
    - !reference [.setup, script]
    - echo default
  image: !reference [.setup, image]
j:
  script: x
"#;
        let j = job(text, "j");
        assert_eq!(j.before_script, strings(&["echo setup", "echo default"]));
        assert_eq!(j.after_script, strings(&["echo setup"]));
        assert_eq!(j.image.as_deref(), Some("template-image"));
        assert_eq!(j.variables, vars(&[("FROM_TEMPLATE", "t")]));
    }

    #[test]
    fn default_and_legacy_globals_are_inherited() {
        let text = r#"
image: legacy-image
before_script: [legacy before]
after_script: legacy after
default:
  image: {name: default-image, entrypoint: [""]}
  before_script: [default before]
  timeout: 2h
  tags: [ignored]
plain:
  script: x
own:
  image: own-image
  before_script: []
  after_script: [own after]
  timeout: 5m
  script: x
"#;
        let plain = job(text, "plain");
        assert_eq!(plain.image.as_deref(), Some("default-image"));
        assert_eq!(plain.before_script, strings(&["default before"]));
        assert_eq!(plain.after_script, strings(&["legacy after"]));
        assert_eq!(plain.timeout_secs, Some(7200));
        let own = job(text, "own");
        assert_eq!(own.image.as_deref(), Some("own-image"));
        assert_eq!(own.before_script, Vec::<String>::new());
        assert_eq!(own.after_script, strings(&["own after"]));
        assert_eq!(own.timeout_secs, Some(300));

        let legacy = "image: legacy\nbefore_script: [b]\nj:\n  script: x\n";
        let j = job(legacy, "j");
        assert_eq!(j.image.as_deref(), Some("legacy"));
        assert_eq!(j.before_script, strings(&["b"]));
    }

    #[test]
    fn inherit_controls_defaults_and_variables() {
        let text = r#"
image: legacy
variables: {A: a, B: b, C: c}
default:
  before_script: [default before]
  after_script: [default after]
  timeout: 1h
none:
  inherit: {default: false, variables: false}
  variables: {OWN: o}
  script: x
some:
  inherit:
    default: [after_script, image]
    variables: [C, A]
  script: x
all:
  inherit: {default: true, variables: true}
  script: x
"#;
        let none = job(text, "none");
        assert_eq!(none.image, None);
        assert!(none.before_script.is_empty());
        assert!(none.after_script.is_empty());
        assert_eq!(none.timeout_secs, None);
        assert_eq!(none.variables, vars(&[("OWN", "o")]));

        let some = job(text, "some");
        assert_eq!(some.image.as_deref(), Some("legacy"));
        assert!(some.before_script.is_empty());
        assert_eq!(some.after_script, strings(&["default after"]));
        assert_eq!(some.timeout_secs, None);
        assert_eq!(some.variables, vars(&[("A", "a"), ("C", "c")]));

        let all = job(text, "all");
        assert_eq!(all.before_script, strings(&["default before"]));
        assert_eq!(all.timeout_secs, Some(3600));
        assert_eq!(all.variables.len(), 3);

        let e = error("j:\n  inherit: {defaults: false}\n  script: x\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "inherit"), "{e:?}");
        let e = error("j:\n  inherit: {variables: maybe}\n  script: x\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "inherit:variables"), "{e:?}");
    }

    #[test]
    fn timeout_parsing_table() {
        let table: &[(&str, u64)] = &[
            ("3600", 3600),
            ("2h", 7200),
            ("1h 30m", 5400),
            ("1h30m", 5400),
            ("90 minutes", 5400),
            ("90 min", 5400),
            ("1 hour 5 minutes 10s", 3910),
            ("1 hour and 5 minutes", 3900),
            ("1 hour, 5 minutes, 10 seconds", 3910),
            ("30 secs", 30),
            ("45s", 45),
            ("1.5 hours", 5400),
            ("1 day", 86_400),
            ("2d 3h", 183_600),
            ("1 week", 604_800),
            ("3 Hours", 10_800),
            ("  10m  ", 600),
            ("01:30:00", 5400),
            ("1:30", 90),
        ];
        for (text, secs) in table {
            assert_eq!(parse_duration(text), Ok(*secs), "{text}");
        }
        for text in ["", "0", "0s", "soon", "10 parsecs", "1h 30", "h", "1..5h", "1:2:3:4", "and 5m"] {
            assert!(parse_duration(text).is_err(), "{text:?} should not parse");
        }
    }

    #[test]
    fn timeout_values_in_jobs() {
        assert_eq!(job("j:\n  timeout: 600\n  script: x\n", "j").timeout_secs, Some(600));
        assert_eq!(job("j:\n  timeout: '1 hour'\n  script: x\n", "j").timeout_secs, Some(3600));
        let e = error("j:\n  timeout: whenever\n  script: x\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "timeout"), "{e:?}");
        assert!(e.to_string().contains("`whenever` is not a duration"), "{e}");
        let e = error("default:\n  timeout: [1]\nj:\n  script: x\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "default:timeout"), "{e:?}");
    }

    #[test]
    fn image_string_or_hash() {
        assert_eq!(job("j:\n  image: alpine\n  script: x\n", "j").image.as_deref(), Some("alpine"));
        let text = "j:\n  image:\n    name: alpine:3.20\n    entrypoint: ['']\n    pull_policy: always\n  script: x\n";
        assert_eq!(job(text, "j").image.as_deref(), Some("alpine:3.20"));
        let e = error("j:\n  image: {entrypoint: ['']}\n  script: x\n", "j");
        assert!(e.to_string().contains("needs a `name:`"), "{e}");
        let e = error("j:\n  image: 3\n  script: x\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "image"), "{e:?}");
        let e = error("image: ''\nj:\n  script: x\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "image (top-level)"), "{e:?}");
    }

    #[test]
    fn variable_forms() {
        let text = r#"
variables:
  STR: text
  INT: 42
  FLOAT: 1.10
  NEG: -3
  BOOL: true
  OFF: false
  QUOTED: "007"
  OCTAL: 0o17
  DESCRIBED:
    value: v1
    description: shown in the run pipeline form
    options: [v1, v2]
  RAW:
    value: $NOT_EXPANDED
    expand: false
  NUMVALUE: {value: 5}
  ONLYDOC: {description: no value}
  1234: numeric name
j:
  variables:
    INT: overridden
    JOB: 1e3
  script: x
"#;
        assert_eq!(
            job(text, "j").variables,
            vars(&[
                ("STR", "text"),
                ("INT", "overridden"),
                ("FLOAT", "1.1"),
                ("NEG", "-3"),
                ("BOOL", "true"),
                ("OFF", "false"),
                ("QUOTED", "007"),
                ("OCTAL", "15"),
                ("DESCRIBED", "v1"),
                ("RAW", "$NOT_EXPANDED"),
                ("NUMVALUE", "5"),
                ("ONLYDOC", ""),
                ("1234", "numeric name"),
                ("JOB", "1000.0"),
            ])
        );
    }

    #[test]
    fn variables_of_the_wrong_shape() {
        let e = error("j:\n  variables:\n    EMPTY:\n  script: x\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "variables"), "{e:?}");
        assert!(e.to_string().contains("variable `EMPTY` is empty"), "{e}");
        let e = error("j:\n  variables: {L: [a]}\n  script: x\n", "j");
        assert!(e.to_string().contains("variable `L` is a list"), "{e}");
        let e = error("j:\n  variables: {V: {value: x, bogus: 1}}\n  script: x\n", "j");
        assert!(e.to_string().contains("unknown key `bogus`"), "{e}");
        let e = error("variables: [A]\nj:\n  script: x\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "variables (top-level)"), "{e:?}");
    }

    #[test]
    fn allow_failure_forms() {
        let j = job("j:\n  allow_failure: {exit_codes: 42}\n  script: x\n", "j");
        assert!(!j.allow_failure);
        assert_eq!(j.allow_failure_exit_codes, vec![42]);
        let j = job("j:\n  allow_failure:\n    exit_codes: [1, 137]\n  script: x\n", "j");
        assert_eq!(j.allow_failure_exit_codes, vec![1, 137]);
        assert!(!job("j:\n  allow_failure: false\n  script: x\n", "j").allow_failure);
        // Manual jobs without rules may fail by default.
        assert!(job("j:\n  when: manual\n  script: x\n", "j").allow_failure);
        assert!(!job("j:\n  when: manual\n  rules: [{when: manual}]\n  script: x\n", "j").allow_failure);
        assert!(!job("j:\n  when: manual\n  allow_failure: false\n  script: x\n", "j").allow_failure);
        let e = error("j:\n  allow_failure: {exit_codes: [x]}\n  script: x\n", "j");
        assert!(e.to_string().contains("must hold integers"), "{e}");
        let e = error("j:\n  allow_failure: yes please\n  script: x\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "allow_failure"), "{e:?}");
    }

    #[test]
    fn stage_must_be_a_name() {
        assert_eq!(job("j:\n  stage: .pre\n  script: x\n", "j").stage, ".pre");
        let e = error("j:\n  stage: [a]\n  script: x\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "stage"), "{e:?}");
    }

    const MANY_JOBS: &str = r#"
stages: [build, test, deploy]
variables: {A: a}
default:
  image: alpine
workflow:
  rules: [{when: always}]
.hidden:
  script: hidden
build:
  script: make
test:
  extends: .hidden
downstream:
  trigger: other/project
pages:
  script: publish
"#;

    #[test]
    fn job_names_lists_runnable_jobs_in_file_order() {
        assert_eq!(job_names(MANY_JOBS, path()).unwrap(), strings(&["build", "test", "pages"]));
        assert_eq!(job_names("", path()).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn no_such_job_lists_the_available_ones() {
        match error(MANY_JOBS, "deploy") {
            PipelineError::NoSuchJob { job, available, includes, .. } => {
                assert_eq!(job, "deploy");
                assert_eq!(available, strings(&["build", "test", "pages"]));
                assert!(!includes);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            error(MANY_JOBS, "deploy").to_string(),
            "ci.yml: there is no job `deploy` to run; run one of: build, test, pages"
        );
        let hidden = error(MANY_JOBS, ".hidden").to_string();
        assert!(hidden.contains("hidden templates"), "{hidden}");
        let keyword = error(MANY_JOBS, "variables").to_string();
        assert!(keyword.contains("`variables` is a global keyword"), "{keyword}");
        let e = error("", "j").to_string();
        assert!(e.contains("defines no runnable jobs"), "{e}");
    }

    #[test]
    fn no_such_job_mentions_includes() {
        let text = "include:\n  - local: ci/build.yml\nlint:\n  script: lint\n";
        assert_eq!(job(text, "lint").script, strings(&["lint"]));
        let message = error(text, "build").to_string();
        assert!(message.contains("run one of: lint"), "{message}");
        assert!(message.contains("`include:` files are not read by `berth exec`"), "{message}");
    }

    #[test]
    fn trigger_jobs_cannot_run() {
        let e = error(MANY_JOBS, "downstream");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "trigger"), "{e:?}");
        assert!(e.to_string().contains("trigger job"), "{e}");
    }

    #[test]
    fn a_job_must_be_a_hash() {
        let e = error("j: make\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key.is_empty()), "{e:?}");
        assert_eq!(
            e.to_string(),
            "ci.yml: job `j`: the job is a string, but a job is a hash of keywords like `script:`"
        );
    }

    #[test]
    fn parse_errors_give_the_location() {
        let e = error("build:\n  script: [make\n", "build");
        assert!(matches!(e, PipelineError::Parse { .. }), "{e:?}");
        let message = e.to_string();
        assert!(message.starts_with("failed to parse ci.yml as YAML at line 3, column 1"), "{message}");
        let source = std::error::Error::source(&e).expect("a source").to_string();
        assert!(source.contains("did not find expected ',' or ']'"), "{source}");

        let e = error("a:\n  script: x\nb: 1\nb: 2\n", "a");
        assert!(e.to_string().contains(" at line "), "{e}");
        let source = std::error::Error::source(&e).expect("a source").to_string();
        assert!(source.contains("duplicate entry with key \"b\""), "{source}");
    }

    #[test]
    fn document_shape() {
        let e = error("- a\n- b\n", "a");
        assert!(matches!(e, PipelineError::Structure { .. }), "{e:?}");
        assert!(e.to_string().contains("the top level is a list"), "{e}");
        let e = error("a: {script: x}\n---\nb: {script: y}\n", "a");
        assert!(e.to_string().contains("holds 2 YAML documents"), "{e}");
        // A `spec:` header document is skipped.
        let text = "spec:\n  inputs:\n    env: {default: dev}\n---\ndeploy:\n  script: ./deploy\n";
        assert_eq!(job(text, "deploy").script, strings(&["./deploy"]));
    }

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
