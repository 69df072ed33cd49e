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
use crate::{Files, PipelineError};

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
    /// The included files read, with where their keys are written.
    pub(crate) files: Vec<(PathBuf, HashMap<String, Position>)>,
    /// The top-level keys that come from an included file: its index in `files`.
    pub(crate) key_files: HashMap<String, usize>,
}

struct Includer<'a> {
    project: Option<&'a Path>,
    /// Where copies of `remote:`, `project:` and `template:` includes are (`--include-dir`).
    include_dir: Option<&'a Path>,
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
            if let Value::Mapping(fields) = &entry {
                if fields.contains_key("rules") {
                    self.merged.warnings.push(format!(
                        "{}: `include: {}`: its `rules:` are not evaluated; the file is included",
                        path.display(),
                        describe(&entry)
                    ));
                }
            }
            for (label, file) in self.files_of(&entry, path, at)? {
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
                let text = std::fs::read_to_string(&file).map_err(|e| {
                    Self::structure(
                        path,
                        at,
                        format!(
                            "`include: {label}` cannot be read from {} ({e}); GitLab would say the file \
                             does not exist: fix the path",
                            file.display()
                        ),
                    )
                })?;
                let document = parse_document(&text, &file)?;
                self.merged.warnings.extend(document.warnings);
                let own: Vec<String> = document.root.keys().filter_map(Value::as_str).map(str::to_owned).collect();
                let included = self.expand(document.root, &file, None, depth + 1)?;
                let index = self.merged.files.len();
                self.merged.files.push((file.clone(), document.positions));
                for key in own.into_iter().filter(|key| key != "include") {
                    self.merged.key_files.insert(key.clone(), index);
                    self.merged.origins.insert(key, label.clone());
                }
                deep_merge(&mut base, &included);
            }
        }
        for key in root.keys().filter_map(Value::as_str) {
            if depth == 0 {
                self.merged.origins.remove(key);
                self.merged.key_files.remove(key);
            }
        }
        deep_merge(&mut base, &root);
        Ok(base)
    }

    /// The files `entry` includes, each with how it is named (`local: x.yml`),
    /// that can be read: local files from the project, other kinds from their
    /// copy in the include directory. What cannot be read is noted as unread,
    /// with what to do.
    fn files_of(
        &mut self,
        entry: &Value,
        path: &Path,
        at: Option<Position>,
    ) -> Result<Vec<(String, PathBuf)>, PipelineError> {
        let in_file = path.display();
        let local = match entry {
            Value::String(text) if !text.starts_with("http://") && !text.starts_with("https://") => Some(text.clone()),
            Value::Mapping(fields) if fields.contains_key("local") => Some(
                fields
                    .get("local")
                    .and_then(scalar_string)
                    .ok_or_else(|| Self::structure(path, at, "`include:local` must be a file path".to_owned()))?,
            ),
            _ => None,
        };
        if let Some(local) = local {
            if local.contains('*') || local.contains('$') {
                self.merged.unread.push(format!(
                    "`local: {local}` (in {in_file}; wildcards and variables in include paths are not supported)"
                ));
                return Ok(Vec::new());
            }
            let Some(project) = self.project else {
                self.merged.unread.push(format!("`local: {local}` (in {in_file}; no project directory)"));
                return Ok(Vec::new());
            };
            let name = local.trim_start_matches('/').to_owned();
            return Ok(vec![(format!("local: {name}"), project.join(&name))]);
        }
        let copies = copy_paths(entry);
        if copies.is_empty() {
            self.merged.unread.push(format!(
                "`{}` (in {in_file}; this kind of include is not supported by `berth exec`)",
                describe(entry)
            ));
            return Ok(Vec::new());
        }
        let mut files = Vec::new();
        for copy in copies {
            match self.include_dir.map(|dir| dir.join(&copy)).filter(|file| file.is_file()) {
                Some(file) => files.push((describe(entry), file)),
                None => self.merged.unread.push(format!(
                    "`{}` (in {in_file}; to use it, put a copy at DIR/{} and pass --include-dir DIR{})",
                    describe(entry),
                    copy.display(),
                    self.include_dir.map_or(String::new(), |dir| format!(": {} has none", dir.display()))
                )),
            }
        }
        Ok(files)
    }
}

/// Where copies of a `remote:`, `project:` or `template:` include are
/// looked for below the include directory: `<host>/<path>` of a URL,
/// `<project>/<file>` (each file of a list), `templates/<name>`. Empty for
/// kinds without a copy (`component:`, which needs `spec:inputs`).
pub(crate) fn copy_paths(entry: &Value) -> Vec<PathBuf> {
    let url = |url: &str| {
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        let rest = rest.split(['?', '#']).next().unwrap_or(rest);
        plain(rest).into_iter().collect::<Vec<_>>()
    };
    match entry {
        Value::String(text) => url(text),
        Value::Mapping(fields) => {
            if let Some(remote) = fields.get("remote").and_then(scalar_string) {
                return url(&remote);
            }
            if let Some(template) = fields.get("template").and_then(scalar_string) {
                return plain(&template).map(|t| Path::new("templates").join(t)).into_iter().collect();
            }
            if let Some(project) = fields.get("project").and_then(scalar_string) {
                let files = match fields.get("file") {
                    Some(Value::Sequence(items)) => items.iter().filter_map(scalar_string).collect(),
                    Some(other) => scalar_string(other).into_iter().collect(),
                    None => Vec::new(),
                };
                return files.iter().filter_map(|file| plain(&format!("{project}/{file}"))).collect();
            }
            Vec::new()
        }
        _ => Vec::new(),
    }
}

/// `path` as a relative path of plain components (no `..`, no root), or `None`.
fn plain(path: &str) -> Option<PathBuf> {
    let parts: Vec<&str> = path.split('/').filter(|part| !part.is_empty() && *part != ".").collect();
    (!parts.is_empty() && !parts.iter().any(|part| *part == ".." || part.contains('\0')))
        .then(|| parts.iter().collect())
}

/// `root`, the file `path`, with the includes `files` can give merged in.
pub(crate) fn merge_includes(
    root: Mapping,
    path: &Path,
    include_at: Option<Position>,
    files: Files<'_>,
) -> Result<Merged, PipelineError> {
    let mut includer =
        Includer { project: files.project, include_dir: files.include_dir, read: 0, merged: Merged::default() };
    let root = includer.expand(root, path, include_at, 0)?;
    includer.merged.root = root;
    Ok(includer.merged)
}
