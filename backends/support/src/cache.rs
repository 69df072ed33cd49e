//! A job's cache directory on the host: whose it is and who can reach it.
//!
//! Caches survive jobs, so what one job leaves there the next one runs. Every
//! project gets a directory of its own by default (by the payload's project
//! id, which a job cannot choose), so that one project's jobs can neither read
//! nor poison another's cache; the directories are root's alone on the host
//! (mode 0700, parents included), and backends mount them `nosuid,nodev`, so
//! that nothing a job leaves there is a set-uid program or a device for anyone
//! on the host.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use berth_backend_api::{Failure, JobContext};
use serde::Deserialize;

/// Who shares a cache directory (`cache_scope`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    /// One directory per project (default).
    #[default]
    Project,
    /// One directory for every project of the runner.
    Runner,
}

/// Creates `dir` and its missing parents with mode 0700; an existing `dir`
/// with another mode is tightened to 0700.
pub fn private_dir(dir: &Path) -> Result<(), Failure> {
    let failed = |what: &str| {
        let what = format!("failed to {what} {}", dir.display());
        move |e| Failure::system_with(what, e)
    };
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(failed("create"))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(failed("set the mode of"))
}

/// The host directory of `job`'s cache under `root` (the runner's
/// `cache_host_dir`): `root/project-<id>`, or `root` itself for the runner
/// scope. Both are made private (mode 0700).
pub fn job_cache_dir(root: &Path, scope: CacheScope, job: &JobContext) -> Result<PathBuf, Failure> {
    private_dir(root)?;
    let dir = match scope {
        CacheScope::Runner => return Ok(root.to_owned()),
        CacheScope::Project => {
            let project = job.response().map(|r| r.job_info.project_id).filter(|id| *id != 0);
            root.join(project.map_or_else(|| "project-unknown".to_owned(), |id| format!("project-{id}")))
        }
    };
    private_dir(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_backend_api::{JobInfo, JobResponse};

    fn job(project: u64) -> JobContext {
        let dir = tempfile::tempdir().unwrap();
        let mut response = JobResponse::new(7);
        let mut info = JobInfo::new("j", "test", "g/p");
        info.project_id = project;
        response.job_info = info;
        let file = dir.path().join("response.json");
        fs::write(&file, serde_json::to_vec(&response).unwrap()).unwrap();
        let vars = vec![("JOB_RESPONSE_FILE".to_owned(), file.display().to_string())];
        let ctx = JobContext::from_vars("r", vars).unwrap();
        drop(dir);
        ctx
    }

    #[test]
    fn every_project_has_a_private_cache() {
        let root = tempfile::tempdir().unwrap();
        let caches = root.path().join("cache/r");
        let a = job_cache_dir(&caches, CacheScope::Project, &job(11)).unwrap();
        let b = job_cache_dir(&caches, CacheScope::Project, &job(12)).unwrap();
        assert_eq!((a.file_name().unwrap(), b.file_name().unwrap()), ("project-11".as_ref(), "project-12".as_ref()));
        assert_eq!(job_cache_dir(&caches, CacheScope::Runner, &job(11)).unwrap(), caches);
        for dir in [&a, &b, &caches, &caches.parent().unwrap().to_owned()] {
            assert_eq!(fs::metadata(dir).unwrap().permissions().mode() & 0o777, 0o700, "{}", dir.display());
        }
        // A looser existing directory is tightened.
        fs::set_permissions(&a, fs::Permissions::from_mode(0o755)).unwrap();
        job_cache_dir(&caches, CacheScope::Project, &job(11)).unwrap();
        assert_eq!(fs::metadata(&a).unwrap().permissions().mode() & 0o777, 0o700);
    }
}
