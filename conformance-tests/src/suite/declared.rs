//! What the backend declares: the declarations decide which checks run, so
//! they must not contradict one another.

use super::{Check, CheckOutcome, Finding, Level, Needs, Target};

pub(super) const CAPABILITIES_CONSISTENT: Check = Check {
    id: "capabilities.consistent",
    level: Level::Must,
    statement: "the declared isolation and capabilities do not contradict one another",
    protocol: "suite: each declaration decides which checks run, so a contradictory one would go untested",
    needs: Needs::Nothing,
    run: consistent,
};

fn consistent(target: &Target) -> CheckOutcome {
    let contradictions = target.description.contradictions();
    if contradictions.is_empty() {
        return Ok(());
    }
    Err(Finding::Fail(format!("the description contradicts itself: {}", contradictions.join("; "))))
}
