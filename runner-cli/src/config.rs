//! berth's own configuration file (TOML), resolved into one validated runner.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// Where the configuration file is looked for by default.
pub const DEFAULT_CONFIG: &str = "/etc/berth/config.toml";
/// Where job state is kept by default.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/berth";

/// A configuration problem: says the file, the key and the line where it can.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read berth's configuration {path}: {source} (set --config or BERTH_CONFIG, or create it; `berth gitlab-config` shows an example)")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid configuration {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration {path}, line {line}: key `{key}`: {message}")]
    Key { path: PathBuf, line: usize, key: String, message: String },
    #[error("{path} defines no runner named {name:?}; defined: {defined}")]
    NoSuchRunner { path: PathBuf, name: String, defined: String },
    #[error("{path} defines {count} runners ({defined}): choose one with --runner or BERTH_RUNNER")]
    WhichRunner { path: PathBuf, count: usize, defined: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    state_dir: Option<Spanned<PathBuf>>,
    #[serde(default)]
    runners: BTreeMap<Spanned<String>, RawRunner>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRunner {
    backend: Option<Spanned<String>>,
    plugin: Option<Spanned<PathBuf>>,
    builds_dir: Option<Spanned<String>>,
    cache_dir: Option<Spanned<String>>,
    #[serde(default)]
    settings: BTreeMap<String, Spanned<toml::Value>>,
}

/// Which backend a runner uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendChoice {
    /// A backend built into berth.
    BuiltIn(String),
    /// A backend library loaded at run time.
    Plugin(PathBuf),
}

/// One runner, validated.
#[derive(Debug, Clone)]
pub struct Runner {
    pub name: String,
    pub backend: BackendChoice,
    pub state_dir: PathBuf,
    pub builds_dir: Option<String>,
    pub cache_dir: Option<String>,
    pub settings: toml::Table,
    /// Where each setting was written, to point errors at the right line.
    setting_lines: BTreeMap<String, usize>,
    /// The line of the runner's table, for errors about the table as a whole.
    runner_line: usize,
    /// The line of `backend` or `plugin`.
    backend_line: usize,
    pub path: PathBuf,
}

impl Runner {
    /// An error about `key` of this runner's settings (`key` may be a path
    /// like `mounts[0].source`; the line is the top-level key's).
    pub fn settings_error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let top = key.split(['.', '[']).next().unwrap_or(key);
        let line = self.setting_lines.get(top).copied().unwrap_or(self.runner_line);
        ConfigError::Key {
            path: self.path.clone(),
            line,
            key: format!("runners.{}.settings.{key}", self.name),
            message: message.into(),
        }
    }
}

impl Runner {
    /// An error about the runner's `backend`/`plugin` key.
    pub fn backend_error(&self, message: impl Into<String>) -> ConfigError {
        let key = match self.backend {
            BackendChoice::BuiltIn(_) => "backend",
            BackendChoice::Plugin(_) => "plugin",
        };
        ConfigError::Key {
            path: self.path.clone(),
            line: self.backend_line,
            key: format!("runners.{}.{key}", self.name),
            message: message.into(),
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|b| *b == b'\n').count() + 1
}

/// Reads `path` and resolves the runner `name` (or the only one).
pub fn load(path: &Path, name: Option<&str>) -> Result<Runner, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse(&text, path, name)
}

/// Parses configuration `text` (read from `path`) and resolves runner `name`.
pub fn parse(text: &str, path: &Path, name: Option<&str>) -> Result<Runner, ConfigError> {
    let raw: RawFile = toml::from_str(text)
        .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string().trim_end().to_owned() })?;
    let key_err = |span: std::ops::Range<usize>, key: String, message: String| ConfigError::Key {
        path: path.to_owned(),
        line: line_of(text, span.start),
        key,
        message,
    };
    let defined = || raw.runners.keys().map(|k| k.get_ref().as_str()).collect::<Vec<_>>().join(", ");
    let (runner_name, runner) = match name {
        Some(name) => {
            raw.runners.iter().find(|(k, _)| k.get_ref() == name).ok_or_else(|| ConfigError::NoSuchRunner {
                path: path.to_owned(),
                name: name.to_owned(),
                defined: if raw.runners.is_empty() { "none".into() } else { defined() },
            })?
        }
        None if raw.runners.len() == 1 => raw.runners.iter().next().expect("one runner"),
        None => {
            return Err(ConfigError::WhichRunner {
                path: path.to_owned(),
                count: raw.runners.len(),
                defined: if raw.runners.is_empty() { "none".into() } else { defined() },
            })
        }
    };
    let prefix = format!("runners.{}", runner_name.get_ref());
    if !berth_backend_api_valid_name(runner_name.get_ref()) {
        return Err(key_err(
            runner_name.span(),
            prefix,
            "runner names are 1-32 characters of a-z, 0-9 and '-', starting with a letter or digit (they name job state, units and machines)".into(),
        ));
    }
    let backend = match (&runner.backend, &runner.plugin) {
        (Some(backend), None) => BackendChoice::BuiltIn(backend.get_ref().clone()),
        (None, Some(plugin)) => {
            if !plugin.get_ref().is_absolute() {
                return Err(key_err(
                    plugin.span(),
                    format!("{prefix}.plugin"),
                    "must be an absolute path to the backend library".into(),
                ));
            }
            BackendChoice::Plugin(plugin.get_ref().clone())
        }
        (Some(b), Some(_)) => {
            return Err(key_err(
                b.span(),
                format!("{prefix}.backend"),
                "set either `backend` or `plugin`, not both".into(),
            ))
        }
        (None, None) => {
            return Err(key_err(
                runner_name.span(),
                prefix,
                "set `backend = \"NAME\"` (built in: see `berth backends`) or `plugin = \"/path/to/lib.so\"`".into(),
            ))
        }
    };
    for (key, value) in [("builds_dir", &runner.builds_dir), ("cache_dir", &runner.cache_dir)] {
        if let Some(value) = value {
            if !value.get_ref().starts_with('/') {
                return Err(key_err(
                    value.span(),
                    format!("{prefix}.{key}"),
                    "must be an absolute path (as the job sees it)".into(),
                ));
            }
        }
    }
    let state_dir = match &raw.state_dir {
        Some(dir) if !dir.get_ref().is_absolute() => {
            return Err(key_err(dir.span(), "state_dir".into(), "must be an absolute path".into()))
        }
        Some(dir) => dir.get_ref().clone(),
        None => PathBuf::from(DEFAULT_STATE_DIR),
    };
    Ok(Runner {
        name: runner_name.get_ref().clone(),
        backend,
        state_dir,
        builds_dir: runner.builds_dir.as_ref().map(|v| v.get_ref().clone()),
        cache_dir: runner.cache_dir.as_ref().map(|v| v.get_ref().clone()),
        settings: runner.settings.iter().map(|(k, v)| (k.clone(), v.get_ref().clone())).collect(),
        setting_lines: runner.settings.iter().map(|(k, v)| (k.clone(), line_of(text, v.span().start))).collect(),
        runner_line: line_of(text, runner_name.span().start),
        backend_line: line_of(
            text,
            runner
                .backend
                .as_ref()
                .map(|b| b.span().start)
                .or(runner.plugin.as_ref().map(|p| p.span().start))
                .unwrap_or(0),
        ),
        path: path.to_owned(),
    })
}

fn berth_backend_api_valid_name(name: &str) -> bool {
    berth_backend_api::JobKey::new(name, 0).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str, name: Option<&str>) -> String {
        parse(text, Path::new("/etc/berth/config.toml"), name).unwrap_err().to_string()
    }

    #[test]
    fn resolves_the_only_runner_and_its_settings() {
        let text = "state_dir = \"/srv/berth\"\n[runners.demo]\nbackend = \"dry-run\"\ncache_dir = \"/cache\"\n[runners.demo.settings]\nfail_stage = \"build_script\"\n";
        let runner = parse(text, Path::new("c.toml"), None).unwrap();
        assert_eq!(runner.name, "demo");
        assert_eq!(runner.backend, BackendChoice::BuiltIn("dry-run".into()));
        assert_eq!(runner.state_dir, PathBuf::from("/srv/berth"));
        assert_eq!(runner.cache_dir.as_deref(), Some("/cache"));
        assert_eq!(runner.settings["fail_stage"].as_str(), Some("build_script"));
        let err = runner.settings_error("fail_stage", "bad").to_string();
        assert_eq!(err, "invalid configuration c.toml, line 6: key `runners.demo.settings.fail_stage`: bad");
    }

    #[test]
    fn errors_name_file_key_and_line() {
        let err = parse_err("[runners.demo]\nbackend = \"dry-run\"\nbuild_dir = \"/b\"\n", None);
        assert!(err.contains("/etc/berth/config.toml") && err.contains("build_dir") && err.contains("line 3"), "{err}");
        let err = parse_err("[runners.demo]\nbackend = \"dry-run\"\nbuilds_dir = \"relative\"\n", None);
        assert!(err.contains("line 3") && err.contains("runners.demo.builds_dir") && err.contains("absolute"), "{err}");
        let err = parse_err("[runners.demo]\n", None);
        assert!(err.contains("runners.demo") && err.contains("backend"), "{err}");
        let err = parse_err("[runners.a]\nbackend = \"x\"\n[runners.b]\nbackend = \"x\"\n", None);
        assert!(err.contains("--runner") && err.contains("a, b"), "{err}");
        let err = parse_err("[runners.a]\nbackend = \"x\"\n", Some("b"));
        assert!(err.contains("no runner named \"b\"") && err.contains("defined: a"), "{err}");
        let err = parse_err("[runners.\"Bad/Name\"]\nbackend = \"x\"\n", None);
        assert!(err.contains("line 1") && err.contains("runner names"), "{err}");
        let err = parse_err("[runners.demo\n", None);
        assert!(err.contains("/etc/berth/config.toml") && err.contains("line 1"), "{err}");
    }
}
