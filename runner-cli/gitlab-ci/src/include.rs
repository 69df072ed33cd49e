//! `include:`: local files read from the project's directory and merged in
//! GitLab's order; other kinds of include named, not fetched.
//!
//! <https://docs.gitlab.com/ci/yaml/includes/>: each file is loaded on its own
//! (anchors do not cross files), its own `include:` first; the including
//! file is deep-merged over what it includes (hashes merge, other values
//! replace), later includes over earlier ones.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_norway::{Mapping, Value};

use crate::resolve::deep_merge;
use crate::yaml::{kind, parse_document, scalar_string, Position};
use crate::PipelineError;

/// Most files one pipeline may include, as in GitLab.
pub(crate) const MAX_INCLUDES: usize = 150;
/// Deepest nesting of includes, as in GitLab.
pub(crate) const MAX_INCLUDE_DEPTH: usize = 100;

/// A pipeline with its local includes merged in.
#[derive(Debug, Default)]
pub(crate) struct Merged {
    pub(crate) root: Mapping,
    /// The top-level keys that come from an included file, and which.
    pub(crate) origins: HashMap<String, String>,
    /// The includes not read, described like `remote: <https://...`> (and where).
    pub(crate) unread: Vec<String>,
    pub(crate) warnings: Vec<String>,
}

struct Includer<'a> {
    project: Option<&'a Path>,
    read: usize,
    merged: Merged,
}

fn describe(entry: &Value) -> String {
    match entry {
        Value::Mapping(fields) => fields
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Value::Sequence(items) => {
                        format!("[{}]", items.iter().filter_map(scalar_string).collect::<Vec<_>>().join(", "))
                    }
                    other => scalar_string(other).unwrap_or_else(|| kind(other).to_owned()),
                };
                format!("{}: {value}", scalar_string(k).unwrap_or_default())
            })
            .collect::<Vec<_>>()
            .join(", "),
        other => scalar_string(other).unwrap_or_else(|| kind(other).to_owned()),
    }
}

impl Includer<'_> {
    fn structure(path: &Path, at: Option<Position>, message: String) -> PipelineError {
        match at {
            Some(at) => PipelineError::Parse { path: path.to_owned(), at, message },
            None => PipelineError::Structure { path: path.to_owned(), message },
        }
    }

    /// `root` (the file `path`) with what it includes merged under it.
    fn expand(
        &mut self,
        mut root: Mapping,
        path: &Path,
        at: Option<Position>,
        depth: usize,
    ) -> Result<Mapping, PipelineError> {
        let Some(include) = root.shift_remove("include") else { return Ok(root) };
        let entries = match include {
            Value::Sequence(items) => items,
            Value::Null => Vec::new(),
            other => vec![other],
        };
        let mut base = Mapping::new();
        for entry in entries {
            let local =
                match &entry {
                    Value::String(text) if !text.starts_with("http://") && !text.starts_with("https://") => {
                        Some(text.clone())
                    }
                    Value::Mapping(fields) if fields.contains_key("local") => {
                        if fields.contains_key("rules") {
                            self.merged.warnings.push(format!(
                                "{}: `include: {}`: its `rules:` are not evaluated; the file is included",
                                path.display(),
                                describe(&entry)
                            ));
                        }
                        Some(fields.get("local").and_then(scalar_string).ok_or_else(|| {
                            Self::structure(path, at, "`include:local` must be a file path".to_owned())
                        })?)
                    }
                    _ => None,
                };
            let Some(local) = local else {
                self.merged.unread.push(format!("`{}` (in {})", describe(&entry), path.display()));
                continue;
            };
            if local.contains('*') || local.contains('$') {
                self.merged.unread.push(format!(
                    "`local: {local}` (in {}; wildcards and variables in include paths are not supported)",
                    path.display()
                ));
                continue;
            }
            let Some(project) = self.project else {
                self.merged.unread.push(format!("`local: {local}` (in {}; no project directory)", path.display()));
                continue;
            };
            if depth >= MAX_INCLUDE_DEPTH || self.read >= MAX_INCLUDES {
                return Err(Self::structure(
                    path,
                    at,
                    format!(
                        "`include:` nests deeper than {MAX_INCLUDE_DEPTH} levels or reads more than \
                         {MAX_INCLUDES} files, which GitLab refuses"
                    ),
                ));
            }
            self.read += 1;
            let file: PathBuf = project.join(local.trim_start_matches('/'));
            let text = std::fs::read_to_string(&file).map_err(|e| {
                Self::structure(
                    path,
                    at,
                    format!(
                        "`include: local: {local}` cannot be read from {} ({e}); GitLab would say the local file \
                         does not exist: fix the path (relative to the project's root)",
                        file.display()
                    ),
                )
            })?;
            let document = parse_document(&text, &file)?;
            self.merged.warnings.extend(document.warnings);
            let own: Vec<String> = document.root.keys().filter_map(Value::as_str).map(str::to_owned).collect();
            let included = self.expand(document.root, &file, None, depth + 1)?;
            for key in own.into_iter().filter(|key| key != "include") {
                self.merged.origins.insert(key, local.trim_start_matches('/').to_owned());
            }
            deep_merge(&mut base, &included);
        }
        for key in root.keys().filter_map(Value::as_str) {
            if depth == 0 {
                self.merged.origins.remove(key);
            }
        }
        deep_merge(&mut base, &root);
        Ok(base)
    }
}

/// `root`, the file `path`, with its local includes (read from `project`) merged in.
pub(crate) fn merge_includes(
    root: Mapping,
    path: &Path,
    include_at: Option<Position>,
    project: Option<&Path>,
) -> Result<Merged, PipelineError> {
    let mut includer = Includer { project, read: 0, merged: Merged::default() };
    let root = includer.expand(root, path, include_at, 0)?;
    includer.merged.root = root;
    Ok(includer.merged)
}
