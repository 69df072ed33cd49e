//! Cancellation: SIGTERM stops a stage; a prepare killed half-way leaves
//! nothing behind once cleanup ran.

use std::time::{Duration, Instant};

use berth_backend_api::Cancel;
use berth_runner_imitation::runner::Hook;

use super::case::Case;
use super::{Check, CheckOutcome, Finding, Level, Needs, Target};

pub(super) const CANCEL_SIGTERM: Check = Check {
    id: "cancel.sigterm",
    level: Level::Must,
    statement: "SIGTERM to run's process group stops the stage within seconds; cleanup still works",
    protocol: "6",
    needs: Needs::Cancel,
    run: cancel,
};

fn cancel(target: &Target) -> CheckOutcome {
    let mut case = Case::new(target)?;
    case.prepare()?;
    let (cancel, trigger) = Cancel::pair().map_err(|e| e.to_string())?;
    let fire = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        trigger.fire();
    });
    let path = case
        .job
        .write_script("build_script", "echo berth-sleeping\nsleep 12\necho berth-not-cancelled\n")
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let result =
        case.driver.call(&case.job, Hook::Run, &[path.into(), "build_script".into()], None, Some(&cancel), &case.log);
    let stopped = started.elapsed();
    let _ = fire.join();
    if result.ok() || result.output().contains("berth-not-cancelled") {
        return Err(Finding::Fail(format!("the stage ran to its end despite SIGTERM: {}", result.exit)));
    }
    if stopped > Duration::from_secs(5) {
        return Err(Finding::Fail(format!(
            "the stage stopped {stopped:.1?} after SIGTERM (needs to stop within a few seconds)"
        )));
    }
    case.finish()
}

pub(super) const CLEANUP_AFTER_KILLED_PREPARE: Check = Check {
    id: "cleanup.after-killed-prepare",
    level: Level::Must,
    statement: "cleanup after a prepare killed with SIGKILL leaves no state, process or mount behind",
    protocol: "5",
    needs: Needs::Nothing,
    run: killed_prepare,
};

fn killed_prepare(target: &Target) -> CheckOutcome {
    let mut case = Case::new(target)?;
    case.config()?;
    let mut driver = case.driver.clone();
    driver.timeouts.graceful_kill = Duration::ZERO;
    let (cancel, trigger) = Cancel::pair().map_err(|e| e.to_string())?;
    let fire = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        trigger.fire();
    });
    let _ = driver.call(&case.job, Hook::Prepare, &[], Some(driver.timeouts.prepare), Some(&cancel), &case.log);
    let _ = fire.join();
    case.finish()
}
