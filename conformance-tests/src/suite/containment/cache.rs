//! The cache: a mount of its own with `nosuid,nodev`, one per project.

use berth_backend_api::{JobResponse, ResponseVariable};
use berth_backend_support::mounts::parse_mountinfo;
use berth_runner_imitation::runner::{Exit, HookResult};

use super::{nonce, tagged, then_finish};
use crate::suite::case::{expect_exit, Case};
use crate::suite::{Check, CheckOutcome, Finding, Level, Needs, Target};

/// The job's cache dir, from config's answer.
fn cache_dir(case: &Case<'_>) -> String {
    case.job.config.cache_dir.clone().unwrap_or_else(|| "/cache".into())
}

/// The mount of `mountinfo` (lines of /proc/self/mountinfo) that holds `path`:
/// its mount point and per-mount options.
fn mount_holding(mountinfo: &[String], path: &str) -> Option<(String, String)> {
    let under = |point: &str| point == "/" || path == point || path.starts_with(&format!("{point}/"));
    parse_mountinfo(&mountinfo.join("\n"))
        .into_iter()
        .map(|mount| (mount.point.to_string_lossy().into_owned(), mount.options))
        .filter(|(point, _)| under(point))
        // The deepest mount point; among equal ones, the last mounted.
        .fold(None, |best: Option<(String, String)>, (point, options)| match &best {
            Some((b, _)) if b.len() > point.len() => best,
            _ => Some((point, options)),
        })
}

pub(in crate::suite) const CONTAINMENT_CACHE_NOSUID: Check = Check {
    id: "containment.cache-nosuid",
    level: Level::Must,
    statement: "the cache dir is a mount of its own with nosuid and nodev",
    protocol: "security: what a job leaves in the cache must not grant privileges to later jobs",
    needs: Needs::Containment,
    run: cache_nosuid,
};

fn cache_nosuid(target: &Target) -> CheckOutcome {
    let mut case = Case::new(target)?;
    case.prepare()?;
    let cache = cache_dir(&case);
    then_finish(case, |case| {
        // The runner's own scripts create the cache dir when it is missing.
        let body = format!(
            "mkdir -p '{cache}' 2>/dev/null || true\n\
             if test -d '{cache}'; then echo \"berth-cache: $(cd -P '{cache}' && pwd -P)\"; fi\n\
             while IFS= read -r line; do echo \"berth-mount: $line\"; done < /proc/self/mountinfo\n"
        );
        let result = case.run_ok("build_script", &body)?;
        let Some(real) = tagged(&result, "berth-cache: ").pop() else {
            return Err(Finding::Fail(format!(
                "the cache dir {cache} does not exist in the job and cannot be created, so it is not a mount point \
                 of its own (it must be a mount with nosuid,nodev)"
            )));
        };
        let mounts = tagged(&result, "berth-mount: ");
        let Some((point, options)) = mount_holding(&mounts, &real) else {
            return Err(Finding::Fail(format!(
                "no mount in the job's /proc/self/mountinfo holds the cache dir {real}"
            )));
        };
        if point != real {
            return Err(Finding::Fail(format!(
                "the cache dir {cache} is not a mount point of its own (it lies on {point}, mounted {options}): \
                 it must be a mount with nosuid,nodev, or a job could leave a setuid binary or a device node \
                 there for the next job"
            )));
        }
        let missing: Vec<&str> =
            ["nosuid", "nodev"].into_iter().filter(|o| !options.split(',').any(|have| have == *o)).collect();
        if !missing.is_empty() {
            return Err(Finding::Fail(format!(
                "the cache dir {cache} is mounted without {} ({options}): a setuid binary or a device node a job \
                 leaves in the cache works in the next job",
                missing.join(",")
            )));
        }
        Ok(())
    })
}

/// A payload edit: the job belongs to project `id`.
fn project(id: u64) -> impl FnOnce(&mut JobResponse) {
    move |r: &mut JobResponse| {
        r.job_info.project_id = id;
        r.variables.push(ResponseVariable::new("CI_PROJECT_ID", id.to_string()));
    }
}

/// Runs `body` in one stage of a new job of `project_id` and returns the
/// stage's result and the job's cache dir.
fn cache_job(target: &Target, project_id: u64, body: impl Fn(&str) -> String) -> Result<HookResult, Finding> {
    let mut case = Case::with(target, project(project_id))?;
    case.prepare()?;
    let cache = cache_dir(&case);
    let mut result = None;
    then_finish(case, |case| {
        result = Some(case.run("build_script", &body(&cache)));
        Ok(())
    })?;
    result.ok_or_else(|| "the stage did not run".into())
}

pub(in crate::suite) const CONTAINMENT_CACHE_PER_PROJECT: Check = Check {
    id: "containment.cache-per-project",
    level: Level::Must,
    statement: "jobs of different projects do not share a cache; jobs of one project do",
    protocol: "security: a job must not poison or read another project's cache",
    needs: Needs::Containment,
    run: cache_per_project,
};

fn cache_per_project(target: &Target) -> CheckOutcome {
    let file = format!("berth-cache-probe-{}", nonce());
    let a = cache_job(target, 1, |cache| format!("mkdir -p '{cache}'\necho project-1 > '{cache}/{file}'\n"))?;
    expect_exit(&a, &Exit::Success, "job A (project 1) writing a file into its cache dir")?;
    let b = cache_job(target, 2, |cache| {
        format!("if test -e '{cache}/{file}'; then rm -f '{cache}/{file}'; exit 3; fi\n")
    })?;
    if matches!(b.exit, Exit::Build { code: 3, .. }) {
        return Err(Finding::Fail(format!(
            "job B, of project 2, saw the file {file} job A of project 1 left in its cache: projects share a cache, \
             so a job can poison another project's builds and read what it cached"
        )));
    }
    expect_exit(&b, &Exit::Success, "job B (project 2) looking into its cache dir")?;
    let c = cache_job(target, 1, |cache| format!("test -e '{cache}/{file}' || exit 4\nrm -f '{cache}/{file}'\n"))?;
    if matches!(c.exit, Exit::Build { code: 4, .. }) {
        return Err(Finding::Fail(format!(
            "job C, of project 1 again, did not see the file {file} job A of project 1 left in its cache: \
             caches must survive jobs"
        )));
    }
    expect_exit(&c, &Exit::Success, "job C (project 1) finding job A's file in its cache dir")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_holding_a_path_is_the_deepest_and_last() {
        let info: Vec<String> = [
            "20 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw",
            "30 20 0:40 / /cache rw,relatime - tmpfs tmpfs rw",
            "31 20 0:41 / /cache rw,nosuid,nodev - tmpfs tmpfs rw",
            "32 20 0:42 / /cache\\040dir rw - tmpfs tmpfs rw",
        ]
        .map(str::to_owned)
        .to_vec();
        assert_eq!(mount_holding(&info, "/cache"), Some(("/cache".into(), "rw,nosuid,nodev".into())));
        assert_eq!(mount_holding(&info, "/cache/x"), Some(("/cache".into(), "rw,nosuid,nodev".into())));
        assert_eq!(mount_holding(&info, "/cachex"), Some(("/".into(), "rw,relatime".into())));
        assert_eq!(mount_holding(&info, "/cache dir"), Some(("/cache dir".into(), "rw".into())));
    }
}
