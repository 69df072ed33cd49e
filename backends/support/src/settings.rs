//! Settings and checks the built-in backends share.

use std::path::{Path, PathBuf};

use berth_backend_api::{Failure, RunnerInfo};
use serde::Deserialize;

use crate::image::ImageStore;

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

/// What mount options and nspawn arguments use as separators: never in a path berth passes on.
const SEPARATORS: [char; 4] = [':', ',', '\\', '\n'];

/// Refuses a path setting that is relative or holds a character that mount
/// options and nspawn arguments use as separators (`:`, `,`, `\`).
pub fn check_path(setting: &str, path: &Path) -> Result<(), Failure> {
    if !path.is_absolute() || path.to_string_lossy().contains(SEPARATORS) {
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
        None => Ok(which("gitlab-runner")),
    }
}

/// The file `name` in a directory of `PATH` (the usual directories when
/// `PATH` is not set), the first one found.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    which_in(&path, name)
}

/// The file `name` in a directory of `path` (`PATH`'s syntax), the first one found.
pub fn which_in(path: &std::ffi::OsStr, name: &str) -> Option<PathBuf> {
    std::env::split_paths(path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

/// The settings every backend that runs jobs on images has, borrowed from
/// its own settings struct.
#[derive(Debug, Clone, Copy)]
pub struct ImageSettings<'a> {
    /// `images_dir` (default `/var/lib/berth/images`).
    pub images_dir: Option<&'a Path>,
    /// `allowed_images` (default: every image).
    pub allowed_images: &'a [String],
    /// `default_image`.
    pub default_image: Option<&'a str>,
    /// `cache_host_dir` (default `<state_dir>/cache/<runner>`).
    pub cache_host_dir: Option<&'a Path>,
    /// `gitlab_runner` (default: `gitlab-runner` on PATH).
    pub gitlab_runner: Option<&'a Path>,
    /// `bind`.
    pub bind: &'a [Bind],
}

/// [`ImageSettings`] checked, with their defaults.
#[derive(Debug)]
pub struct ImageSetup {
    /// The images jobs may use.
    pub images: ImageStore,
    /// The host directory behind the job's cache dir.
    pub cache_host_dir: PathBuf,
    /// The gitlab-runner binary to put into jobs, if there is one.
    pub gitlab_runner: Option<PathBuf>,
    /// Where the job sees its cache: the runner's `cache_dir`, else `/cache`
    /// (what `berth config` tells the runner, and where the cache is mounted).
    pub cache_dir: PathBuf,
}

/// Where a job sees its cache when the runner does not say.
pub const DEFAULT_CACHE_DIR: &str = "/cache";

/// The runner's `cache_dir` (a path in the job's environment), checked: an
/// absolute path of plain components, not `/`, without the separators
/// [`check_path`] refuses; `/cache` when it is not set.
pub fn job_cache_dir(runner: &RunnerInfo) -> Result<PathBuf, Failure> {
    let Some(dir) = runner.cache_dir.as_deref() else { return Ok(PathBuf::from(DEFAULT_CACHE_DIR)) };
    let path = Path::new(dir);
    // Plain: `..` refused, and nothing Path would normalise away (`.`, `//`, a trailing `/`).
    let plain = path.components().skip(1).all(|c| matches!(c, std::path::Component::Normal(_)))
        && path.components().collect::<PathBuf>().as_os_str() == path.as_os_str();
    if !path.is_absolute() || !plain || path.parent().is_none() || dir.contains(SEPARATORS) {
        return Err(Failure::system(format!(
            "runners.{}.cache_dir: {dir:?} must be an absolute path below / without '.', '..', ':', ',' or '\\' \
             (where jobs see their cache, e.g. \"/cache\")",
            runner.name
        )));
    }
    Ok(path.to_owned())
}

impl ImageSettings<'_> {
    /// Checks the settings (and the runner's state dir) and applies their defaults.
    pub fn resolve(self, runner: &RunnerInfo) -> Result<ImageSetup, Failure> {
        let images_dir = self.images_dir.map_or_else(|| PathBuf::from("/var/lib/berth/images"), Path::to_owned);
        check_path("images_dir", &images_dir)?;
        let images = ImageStore::new(images_dir, self.allowed_images, self.default_image.map(str::to_owned))
            .map_err(|e| Failure::system(format!("settings.{e}")))?;
        let cache_host_dir =
            self.cache_host_dir.map_or_else(|| runner.state_dir.join("cache").join(&runner.name), Path::to_owned);
        check_path("cache_host_dir", &cache_host_dir)?;
        check_path("state_dir", &runner.state_dir)?;
        check_binds(self.bind)?;
        let cache_dir = job_cache_dir(runner)?;
        Ok(ImageSetup { images, cache_host_dir, gitlab_runner: gitlab_runner(self.gitlab_runner)?, cache_dir })
    }
}

/// The failure of a stage whose shell could not be started (`what`, e.g.
/// "failed to start the stage in container X"): a shell missing from the
/// job's root (`shell`, the host path of its `/bin/bash`) of image `image`
/// is named with its likely cause.
pub fn stage_start(what: String, image: &str, shell: PathBuf) -> impl FnOnce(std::io::Error) -> Failure + use<> {
    let image = image.to_owned();
    move |e| match e.kind() {
        std::io::ErrorKind::NotFound if !shell.exists() => Failure::system(format!(
            "{what}: the job's shell /bin/bash is missing from its root; was image {image} removed while the job \
             ran (berth image remove --force)? The job cannot go on"
        )),
        _ => Failure::system_with(what, e),
    }
}

/// Maps an I/O error to a system failure that says what failed (`.map_err(sys("..."))`).
pub fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Failure {
    let what = what.into();
    move |e| Failure::system_with(what, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_finds_a_program_on_path() {
        assert!(which("sh").is_some_and(|p| p.is_absolute() && p.ends_with("sh")));
        assert_eq!(which("no-such-program-anywhere"), None);
    }

    #[test]
    fn a_runners_cache_dir_is_a_plain_absolute_path_and_defaults_to_cache() {
        let runner = |dir: Option<&str>| {
            let mut runner = RunnerInfo::new("r", "/s");
            runner.cache_dir = dir.map(str::to_owned);
            runner
        };
        assert_eq!(job_cache_dir(&runner(None)).unwrap(), Path::new("/cache"));
        assert_eq!(job_cache_dir(&runner(Some("/mycache"))).unwrap(), Path::new("/mycache"));
        assert_eq!(job_cache_dir(&runner(Some("/var/ci/cache"))).unwrap(), Path::new("/var/ci/cache"));
        for bad in ["mycache", "/", "/a/../etc", "/a/./b", "/a//b", "/a/", "/a:b", "/a,b", "/a\\b"] {
            let err = job_cache_dir(&runner(Some(bad))).unwrap_err().to_string();
            assert!(err.contains("runners.r.cache_dir") && err.contains("absolute path"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_stage_whose_shell_is_gone_says_so_and_other_start_errors_stay_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let (gone, there) = (dir.path().join("gone/bin/bash"), dir.path().join("bash"));
        std::fs::write(&there, "").unwrap();
        let not_found = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let said = stage_start("failed to start".into(), "deb", gone.clone())(not_found()).to_string();
        assert!(said.contains("/bin/bash is missing") && said.contains("image deb"), "{said}");
        for (shell, e) in [(there, not_found()), (gone, std::io::Error::from(std::io::ErrorKind::PermissionDenied))] {
            let said = stage_start("failed to start".into(), "deb", shell)(e).to_string();
            assert!(said.starts_with("failed to start") && !said.contains("missing"), "{said}");
        }
    }

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
