//! State between hooks: stages see what earlier stages wrote; cleanup works
//! on any job, prepared or not, any number of times.

use berth_runner_imitation::runner::Exit;

use super::case::{expect_exit, Case};
use super::{Check, CheckOutcome, Level, Needs, Target};

pub(super) const CLEANUP_UNPREPARED: Check = Check {
    id: "cleanup.unprepared",
    level: Level::Must,
    statement: "cleanup of a job that was never prepared succeeds and leaves nothing",
    protocol: "5",
    needs: Needs::Nothing,
    run: cleanup_unprepared,
};

fn cleanup_unprepared(target: &Target) -> CheckOutcome {
    let mut case = Case::new(target)?;
    case.config()?;
    case.finish()
}

pub(super) const CLEANUP_IDEMPOTENT: Check = Check {
    id: "cleanup.idempotent",
    level: Level::Must,
    statement: "cleanup twice in a row succeeds both times",
    protocol: "5",
    needs: Needs::Nothing,
    run: cleanup_idempotent,
};

fn cleanup_idempotent(target: &Target) -> CheckOutcome {
    let mut case = Case::new(target)?;
    case.prepare()?;
    let first = case.cleanup();
    expect_exit(&first, &Exit::Success, "the first cleanup")?;
    let second = case.cleanup();
    expect_exit(&second, &Exit::Success, "a second cleanup of the same job")?;
    case.finish()
}

pub(super) const STAGE_STATE_PERSISTS: Check = Check {
    id: "stage.state-persists",
    level: Level::Must,
    statement: "files written in one stage are visible in the next (each stage is a new process)",
    protocol: "2",
    needs: Needs::ExecutesScripts,
    run: state_persists,
};

fn state_persists(target: &Target) -> CheckOutcome {
    let mut case = Case::new(target)?;
    case.prepare()?;
    let project = case.job.project_dir();
    let marker = format!("'{project}/berth-marker'");
    case.run_ok("get_sources", &format!("mkdir -p '{project}'\necho one > {marker}\n"))?;
    case.run_ok("build_script", &format!("echo two >> {marker}\n"))?;
    let result = case.run("after_script", &format!("test \"$(cat {marker})\" = \"$(printf 'one\\ntwo')\"\n"));
    expect_exit(&result, &Exit::Success, "a file written by earlier stages, read by a later one")?;
    case.finish()
}
