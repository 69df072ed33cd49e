//! Settings and checks the built-in backends share.

use std::path::{Path, PathBuf};

use berth_backend_api::Failure;
use serde::Deserialize;

/// An extra bind mount into every job's environment (`[[runners.NAME.settings.bind]]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bind {
    /// The host path.
    pub source: PathBuf,
    /// The path inside the job's environment (default: the same as `source`).
    pub target: Option<PathBuf>,
    /// Writable by the job (default: read-only).
    #[serde(default)]
    pub writable: bool,
}

impl Bind {
    /// The path inside the job's environment.
    pub fn target(&self) -> &Path {
        self.target.as_deref().unwrap_or(&self.source)
    }
}

/// Refuses a path setting that is relative or holds a character that mount
/// options and nspawn arguments use as separators (`:`, `,`, `\`).
pub fn check_path(setting: &str, path: &Path) -> Result<(), Failure> {
    let text = path.to_string_lossy();
    if !path.is_absolute() || text.contains([':', ',', '\\', '\n']) {
        return Err(Failure::system(format!(
            "settings.{setting}: {} must be an absolute path without ':', ',' or '\\'",
            path.display()
        )));
    }
    Ok(())
}

/// Checks every bind mount's paths.
pub fn check_binds(binds: &[Bind]) -> Result<(), Failure> {
    for bind in binds {
        check_path("bind.source", &bind.source)?;
        check_path("bind.target", bind.target())?;
    }
    Ok(())
}

/// The gitlab-runner binary to put into jobs: the setting, else `gitlab-runner` on PATH.
pub fn gitlab_runner(setting: Option<&Path>) -> Result<Option<PathBuf>, Failure> {
    match setting {
        Some(path) => {
            check_path("gitlab_runner", path)?;
            Ok(Some(path.to_owned()))
        }
        None => {
            let path = std::env::var_os("PATH")
                .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
            Ok(std::env::split_paths(&path).map(|dir| dir.join("gitlab-runner")).find(|p| p.is_file()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_absolute_and_free_of_separators() {
        assert!(check_path("x", Path::new("/srv/data")).is_ok());
        for bad in ["relative", "/a:b", "/a,b", "/a\\b"] {
            assert!(check_path("x", Path::new(bad)).is_err(), "{bad}");
        }
        let bind = Bind { source: "/srv".into(), target: None, writable: false };
        assert_eq!(bind.target(), Path::new("/srv"));
    }
}
