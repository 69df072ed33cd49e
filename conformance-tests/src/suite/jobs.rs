//! Whole jobs, run through the runner imitation the way gitlab-runner runs
//! them.

use std::sync::Arc;
use std::time::Duration;

use berth_backend_api::Step;
use berth_runner_imitation::job::{Interrupts, JobSpec, Outcome};
use berth_runner_imitation::runner::{Exit, Hook, Log, Quiet};

use super::case::{expect_exit, leak_check, response};
use super::{Check, CheckOutcome, Finding, Level, Needs, Target};

fn job_spec(script: &[&str], after: &[&str]) -> JobSpec {
    let mut response = response();
    response.steps = vec![Step::new("script", script.iter().map(|s| s.to_string()).collect(), "on_success")];
    if !after.is_empty() {
        response.steps.push(Step::new("after_script", after.iter().map(|s| s.to_string()).collect(), "always"));
    }
    JobSpec {
        response,
        sources: None,
        allow_failure_codes: Vec::new(),
        allow_failure: false,
        timeout: Duration::from_secs(120),
    }
}

fn whole_job(target: &Target, spec: &JobSpec) -> Result<berth_runner_imitation::job::Report, Finding> {
    let interrupts = Interrupts::none().map_err(|e| e.to_string())?;
    let log: Arc<dyn Log> = Arc::new(Quiet);
    let report = target.driver.run_job(spec, &interrupts, &log);
    // A failed cleanup is the finding, not what it failed to remove.
    if let Some((_, cleanup)) = report.calls.iter().rev().find(|(_, r)| r.hook == Hook::Cleanup) {
        expect_exit(cleanup, &Exit::Success, "cleanup at the end of the job")?;
    }
    leak_check(target, spec.response.id)?;
    Ok(report)
}

pub(super) const JOB_SUCCESS: Check = Check {
    id: "job.success",
    level: Level::Must,
    statement: "a whole job succeeds through config, prepare, every stage and cleanup",
    protocol: "4",
    needs: Needs::Nothing,
    run: job_success,
};

fn job_success(target: &Target) -> CheckOutcome {
    let report = whole_job(target, &job_spec(&["echo berth-job-ran"], &[]))?;
    if report.outcome != Outcome::Succeeded {
        return Err(Finding::Fail(format!("a job whose script succeeds ended with `{}`", report.outcome.verdict())));
    }
    let stages = report.stages();
    if stages != ["prepare_script", "get_sources", "build_script"] {
        return Err(Finding::Fail(format!("stages called: {stages:?}")));
    }
    let ran = report.calls.iter().any(|(_, r)| r.output().contains("berth-job-ran"));
    if target.description.capabilities.executes_scripts && !ran {
        return Err("the job's script output is not in the job log".into());
    }
    Ok(())
}

pub(super) const JOB_FAILURE: Check = Check {
    id: "job.failure",
    level: Level::Must,
    statement: "a failing script fails the job with its exit code, after_script runs with CI_JOB_STATUS=failed",
    protocol: "4",
    needs: Needs::ExecutesScripts,
    run: job_failure,
};

fn job_failure(target: &Target) -> CheckOutcome {
    let report = whole_job(target, &job_spec(&["exit 42"], &["echo \"berth-after-$CI_JOB_STATUS\""]))?;
    if report.outcome != (Outcome::Failed { code: 42, allowed: false }) {
        return Err(Finding::Fail(format!("a job whose script exits 42 ended with `{}`", report.outcome.verdict())));
    }
    if !report.calls.iter().any(|(stage, r)| stage == "after_script" && r.output().contains("berth-after-failed")) {
        return Err("after_script did not run with CI_JOB_STATUS=failed after the script failed".into());
    }
    Ok(())
}
