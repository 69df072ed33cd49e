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
    #[error("failed to read berth's configuration {path}: {error}; create it (README: \"Using berth with gitlab-runner\" shows one) or give its path with --config or BERTH_CONFIG")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("invalid configuration {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration {path}, line {line}: key `{key}`: {message}")]
    Key { path: PathBuf, line: usize, key: String, message: String },
    #[error("{path} defines no runner named {name:?}; defined: {defined}")]
    NoSuchRunner { path: PathBuf, name: String, defined: String },
    #[error("{path} defines no runners: add one, e.g. [runners.demo] with backend = \"dry-run\"")]
    NoRunners { path: PathBuf },
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
            key: match key {
                "" => format!("runners.{}.settings", self.name),
                key => format!("runners.{}.settings.{key}", self.name),
            },
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

/// Writes `dir/config.toml`, a configuration of one runner `name` (the
/// given table: `backend` or `plugin`, `settings`, ...) with its state in
/// `state_dir`, for commands that make a runner up (`berth exec --backend`,
/// `berth conformance --plugin`): the hooks they run read it like any other.
pub fn write_adhoc(dir: &Path, state_dir: &Path, name: &str, runner: toml::Table) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let mut runners = toml::Table::new();
    runners.insert(name.into(), toml::Value::Table(runner));
    let mut file = toml::Table::new();
    file.insert("state_dir".into(), toml::Value::String(state_dir.display().to_string()));
    file.insert("runners".into(), toml::Value::Table(runners));
    let path = dir.join("config.toml");
    std::fs::write(&path, toml::to_string(&file)?).with_context(|| format!("failed to write {}", path.display()))?;
    Ok(path)
}

/// Reads `path` and resolves the runner `only`, else every runner it
/// defines, in name order (each validated, or its error): what commands
/// that serve the whole host (`reap`, `doctor`, `ps`) work on.
pub fn load_all(path: &Path, only: Option<&str>) -> Result<Vec<Result<Runner, ConfigError>>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.to_owned(), error })?;
    if only.is_some() {
        return Ok(vec![parse(&text, path, only)]);
    }
    let raw = parse_raw(&text, path)?;
    if raw.runners.is_empty() {
        return Err(ConfigError::NoRunners { path: path.to_owned() });
    }
    Ok(raw.runners.keys().map(|name| parse(&text, path, Some(name.get_ref()))).collect())
}

/// Reads `path` and resolves the runner `name` (or the only one).
pub fn load(path: &Path, name: Option<&str>) -> Result<Runner, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.to_owned(), error })?;
    parse(&text, path, name)
}

fn parse_raw(text: &str, path: &Path) -> Result<RawFile, ConfigError> {
    toml::from_str(text)
        .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string().trim_end().to_owned() })
}

/// Parses configuration `text` (read from `path`) and resolves runner `name`.
pub fn parse(text: &str, path: &Path, name: Option<&str>) -> Result<Runner, ConfigError> {
    let raw = parse_raw(text, path)?;
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
        None if raw.runners.is_empty() => return Err(ConfigError::NoRunners { path: path.to_owned() }),
        None => {
            return Err(ConfigError::WhichRunner {
                path: path.to_owned(),
                count: raw.runners.len(),
                defined: defined(),
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
        let err = parse_err("state_dir = \"/srv\"\n", None);
        assert_eq!(
            err,
            "/etc/berth/config.toml defines no runners: add one, e.g. [runners.demo] with backend = \"dry-run\""
        );
    }

    #[test]
    fn a_missing_file_says_so_once_and_what_to_do() {
        let err = load(Path::new("/nonexistent/berth.toml"), None).unwrap_err();
        let shown = crate::Error::from(err).report();
        assert_eq!(shown.matches("No such file").count(), 1, "{shown}");
        assert!(shown.contains("--config or BERTH_CONFIG"), "{shown}");
        assert!(!shown.contains("gitlab-config"), "gitlab-config needs the same file: {shown}");
    }

    mod property {
        use super::super::*;
        use proptest::prelude::*;

        const PATH: &str = "/etc/berth/odd dir/config.toml";

        /// Runner names: valid, nearly valid, and anything.
        fn name() -> impl Strategy<Value = String> {
            prop_oneof![
                3 => prop::sample::select(vec!["demo", "a", "nspawn-1", "Bad", "-x", "a_b", "", "é"]).prop_map(str::to_owned),
                1 => "[a-z0-9-]{0,34}",
                1 => any::<String>(),
            ]
        }

        /// Any TOML value, of any type.
        fn value() -> impl Strategy<Value = toml::Value> {
            use toml::Value;
            let leaf = prop_oneof![
                any::<String>().prop_map(Value::String),
                prop::sample::select(vec!["/abs", "relative", "", "dry-run", "/x/../y", "/lib.so"])
                    .prop_map(|s| Value::String(s.to_owned())),
                any::<i64>().prop_map(Value::Integer),
                any::<f64>().prop_map(Value::Float),
                any::<bool>().prop_map(Value::Boolean),
                Just(Value::Datetime("1979-05-27T07:32:00Z".parse().unwrap())),
            ];
            leaf.prop_recursive(3, 16, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map(name(), inner, 0..4)
                        .prop_map(|m| Value::Table(m.into_iter().collect())),
                ]
            })
        }

        /// A runner's table: its known keys (and others) with values of any type.
        fn runner() -> impl Strategy<Value = toml::Table> {
            let key = prop::sample::select(vec![
                "backend",
                "plugin",
                "builds_dir",
                "cache_dir",
                "state_dir",
                "settings",
                "build_dir",
            ]);
            (
                prop::collection::btree_map(key.prop_map(str::to_owned), value(), 0..5),
                prop::option::of(prop::collection::btree_map(name(), value(), 0..5)),
            )
                .prop_map(|(keys, settings)| {
                    let mut table: toml::Table = keys.into_iter().collect();
                    if let Some(settings) = settings {
                        table.insert("settings".into(), toml::Value::Table(settings.into_iter().collect()));
                    }
                    table
                })
        }

        /// A whole file: `state_dir` and `[runners.X]` tables, as TOML text.
        fn file() -> impl Strategy<Value = String> {
            (prop::option::of(value()), prop::collection::btree_map(name(), runner(), 0..3), any::<bool>()).prop_map(
                |(state_dir, runners, plain_dir)| {
                    let mut file = toml::Table::new();
                    if let Some(dir) = state_dir {
                        let dir = if plain_dir { toml::Value::String("/srv/berth".into()) } else { dir };
                        file.insert("state_dir".into(), dir);
                    }
                    file.insert(
                        "runners".into(),
                        toml::Value::Table(runners.into_iter().map(|(k, v)| (k, toml::Value::Table(v))).collect()),
                    );
                    toml::to_string(&file).unwrap()
                },
            )
        }

        /// TOML-looking text: lines of headers and assignments with raw values.
        fn lines() -> impl Strategy<Value = String> {
            let line = prop_oneof![
                prop::sample::select(vec![
                    "[runners.demo]",
                    "[runners.demo.settings]",
                    "[runners.\"x y\"]",
                    "[[runners.demo]]",
                    "[runners]",
                    "backend = \"dry-run\"",
                    "plugin = \"/p.so\"",
                    "state_dir = 3",
                    "a.b.c = 1",
                    "[runners.demo",
                    "x = [1, \"a\"]",
                    "y = { z = 1 }",
                    "s = \"\"\"",
                    "\"\\u0000\" = 1",
                ])
                .prop_map(str::to_owned),
                (prop::sample::select(vec!["backend", "plugin", "builds_dir", "k"]), any::<String>())
                    .prop_map(|(k, v)| format!("{k} = {v}")),
                any::<String>(),
            ];
            prop::collection::vec(line, 0..8).prop_map(|lines| lines.join("\n"))
        }

        /// A line number within `text` (a file of no line has line 1).
        fn within(text: &str, line: usize) -> bool {
            line >= 1 && line <= text.split('\n').count()
        }

        fn check(text: &str, name: Option<&str>) -> Result<(), TestCaseError> {
            match parse(text, Path::new(PATH), name) {
                Ok(runner) => {
                    prop_assert!(berth_backend_api_valid_name(&runner.name), "{:?}", runner.name);
                    if let Some(name) = name {
                        prop_assert_eq!(runner.name.as_str(), name);
                    }
                    prop_assert!(runner.state_dir.is_absolute());
                    for dir in [&runner.builds_dir, &runner.cache_dir].into_iter().flatten() {
                        prop_assert!(dir.starts_with('/'), "{:?}", dir);
                    }
                    if let BackendChoice::Plugin(path) = &runner.backend {
                        prop_assert!(path.is_absolute());
                    }
                    for key in runner.settings.keys().map(String::as_str).chain(["", "[", "x.y[0]", "é"]) {
                        let err = runner.settings_error(key, "bad");
                        prop_assert!(matches!(err, ConfigError::Key { line, .. } if within(text, line)), "{}", err);
                        prop_assert!(err.to_string().contains(PATH));
                    }
                    prop_assert!(runner.backend_error("bad").to_string().contains(PATH));
                }
                Err(err) => {
                    let shown = err.to_string();
                    prop_assert!(shown.contains(PATH), "{}", shown);
                    if let ConfigError::Key { line, .. } = err {
                        prop_assert!(within(text, line), "{}", shown);
                    }
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn any_text_is_a_runner_or_an_error_naming_the_file(text in any::<String>(), name in prop::option::of(name())) {
                check(&text, name.as_deref())?;
            }

            #[test]
            fn toml_lines_are_a_runner_or_an_error_naming_the_file(text in lines(), name in prop::option::of(name())) {
                check(&text, name.as_deref())?;
            }

            #[test]
            fn runner_tables_of_any_keys_and_types_are_a_runner_or_an_error(
                text in file(),
                name in prop::option::of(name()),
                cut: prop::sample::Index,
                truncate: bool,
            ) {
                check(&text, name.as_deref())?;
                if truncate {
                    let bounds: Vec<usize> = (0..=text.len()).filter(|&i| text.is_char_boundary(i)).collect();
                    check(&text[..bounds[cut.index(bounds.len())]], name.as_deref())?;
                }
            }
        }
    }
}
