//! The backends built into berth, and building the one a runner chose.

use berth_backend_api::{Backend, Failure, NewBackend, RunnerInfo};
use berth_backend_chroot::Chroot;
use berth_backend_dry_run::DryRun;
use berth_backend_host_test::HostTest;
use berth_backend_nspawn::Nspawn;

use crate::config::{BackendChoice, ConfigError, Runner};

/// Why a runner's backend could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("failed to set up backend {backend} of runner {runner}: {failure}")]
    Backend { backend: String, runner: String, failure: Failure },
}

/// Environment variable that unlocks test-fixture backends.
pub const TEST_BACKENDS_ENV: &str = "BERTH_ALLOW_TEST_BACKENDS";

/// Builds a backend from a runner's configuration.
type Build = fn(&Runner, &RunnerInfo) -> Result<Box<dyn Backend>, LoadError>;

/// A backend compiled into berth.
#[derive(Debug)]
pub struct BuiltIn {
    pub name: &'static str,
    pub summary: &'static str,
    /// A test fixture: not listed, and only usable with [`TEST_BACKENDS_ENV`]=1.
    pub test_fixture: bool,
    build: Build,
}

pub const BUILT_IN: &[BuiltIn] = &[
    BuiltIn {
        name: "dry-run",
        summary: "executes nothing; shows what the runner sends, for debugging pipelines",
        test_fixture: false,
        build: build::<DryRun>,
    },
    BuiltIn {
        name: "nspawn",
        summary: "a booted systemd-nspawn container per job, on a copy-on-write overlay of an image",
        test_fixture: false,
        build: build::<Nspawn>,
    },
    BuiltIn {
        name: "chroot",
        summary: "a disposable copy-on-write root of an image per job, no init: for hosts without containers",
        test_fixture: false,
        build: build::<Chroot>,
    },
    BuiltIn {
        name: "host-test",
        summary: "TEST FIXTURE: runs scripts with bash on the host, no isolation",
        test_fixture: true,
        build: build::<HostTest>,
    },
];

fn build<B: NewBackend + 'static>(runner: &Runner, info: &RunnerInfo) -> Result<Box<dyn Backend>, LoadError> {
    let settings: B::Settings =
        serde_path_to_error::deserialize(toml::Value::Table(runner.settings.clone())).map_err(|e| {
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            runner.settings_error(if path == "." { "" } else { &path }, message.trim_end().to_owned())
        })?;
    let backend = B::new(settings, info).map_err(|failure| match bad_setting(runner, &failure) {
        Some(error) => LoadError::Config(error),
        None => LoadError::Backend { backend: info_backend_name(runner), runner: runner.name.clone(), failure },
    })?;
    Ok(Box::new(backend))
}

/// A backend's refusal of a setting, which says `settings.KEY: why`
/// (`settings: why` about the table as a whole) in the convention of the
/// built-in backends and of the plugin SDK, as an error naming the file, the
/// key and its line, like a type error of the same setting.
fn bad_setting(runner: &Runner, failure: &Failure) -> Option<ConfigError> {
    let (Failure::System { message, .. } | Failure::Refused { message }) = failure else { return None };
    let rest = message.strip_prefix("settings")?;
    if let Some(why) = rest.strip_prefix(": ") {
        return Some(runner.settings_error("", why));
    }
    let (key, why) = rest.strip_prefix('.')?.split_once(": ")?;
    let top = key.split(['.', '[']).next()?;
    runner.settings.contains_key(top).then(|| runner.settings_error(key, why))
}

fn info_backend_name(runner: &Runner) -> String {
    match &runner.backend {
        BackendChoice::BuiltIn(name) => name.clone(),
        BackendChoice::Plugin(path) => path.display().to_string(),
    }
}

/// Builds the backend `runner` chose, refusing one whose description
/// contradicts itself ([`berth_backend_api::Description::contradictions`]).
pub fn load(runner: &Runner) -> Result<Box<dyn Backend>, LoadError> {
    let backend = build_chosen(runner)?;
    let contradictions = backend.describe().contradictions();
    if !contradictions.is_empty() {
        return Err(LoadError::Backend {
            backend: info_backend_name(runner),
            runner: runner.name.clone(),
            failure: Failure::system(format!(
                "its description contradicts itself: {}; declare what it really does \
                 (docs/writing-a-backend.md: isolation levels and capabilities)",
                contradictions.join("; ")
            )),
        });
    }
    Ok(backend)
}

fn build_chosen(runner: &Runner) -> Result<Box<dyn Backend>, LoadError> {
    let mut info = RunnerInfo::new(runner.name.clone(), runner.state_dir.clone());
    info.builds_dir = runner.builds_dir.clone();
    info.cache_dir = runner.cache_dir.clone();
    match &runner.backend {
        BackendChoice::BuiltIn(name) => {
            let listed = || BUILT_IN.iter().filter(|b| !b.test_fixture).map(|b| b.name).collect::<Vec<_>>().join(", ");
            let Some(builtin) = BUILT_IN.iter().find(|b| b.name == name) else {
                return Err(runner.backend_error(format!("unknown backend {name:?}; built in: {}", listed())).into());
            };
            if builtin.test_fixture && std::env::var(TEST_BACKENDS_ENV).as_deref() != Ok("1") {
                return Err(runner
                    .backend_error(format!(
                        "{name:?} is a test fixture without isolation, usable only by berth's own tests ({TEST_BACKENDS_ENV}=1); built in: {}",
                        listed()
                    ))
                    .into());
            }
            (builtin.build)(runner, &info)
        }
        BackendChoice::Plugin(path) => match crate::plugin::PluginBackend::load(path, &info, &runner.settings) {
            Ok(plugin) => Ok(Box::new(plugin)),
            Err(failure) => Err(match bad_setting(runner, &failure) {
                Some(error) => LoadError::Config(error),
                None => {
                    LoadError::Backend { backend: path.display().to_string(), runner: runner.name.clone(), failure }
                }
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_in_the_settings_convention_names_its_key_file_and_line() {
        let text = "[runners.p]\nplugin = \"/x.so\"\n[runners.p.settings]\nimages = \"/i\"\n[runners.p.settings.limits]\npids = 3\n";
        let runner = crate::config::parse(text, std::path::Path::new("c.toml"), None).unwrap();
        let refused = |failure: Failure| bad_setting(&runner, &failure).map(|e| e.to_string());
        assert_eq!(
            refused(Failure::system("settings.limits.pids: must be at least 16")).as_deref(),
            Some("invalid configuration c.toml, line 5: key `runners.p.settings.limits.pids`: must be at least 16")
        );
        assert_eq!(
            refused(Failure::refused("settings: images_dir is required")).as_deref(),
            Some("invalid configuration c.toml, line 1: key `runners.p.settings`: images_dir is required")
        );
        assert_eq!(refused(Failure::system("settings.gone: x")), None, "a key the file does not hold");
        assert_eq!(refused(Failure::system("settingsfoo: x")), None);
        assert_eq!(refused(Failure::system("cannot reach the images: no such directory")), None);
        assert_eq!(refused(Failure::Cancelled), None);
    }
}
