//! Isolation between two jobs running at once.

use std::time::Duration;

use berth_runner_imitation::runner::Exit;

use super::case::{expect_exit, tail, Case};
use super::{Check, CheckOutcome, Finding, Level, Needs, Target};

pub(super) const ISOLATION_CONCURRENT: Check = Check {
    id: "isolation.concurrent",
    level: Level::Must,
    statement: "two concurrent jobs see neither each other's files nor processes",
    protocol: "7",
    needs: Needs::Isolation,
    run: concurrent_isolation,
};

fn concurrent_isolation(target: &Target) -> CheckOutcome {
    let mut a = Case::new(target)?;
    let mut b = Case::new(target)?;
    a.prepare()?;
    b.prepare()?;
    let marker = format!("berth-iso-{}", a.id());
    let (first, rest) = marker.split_at(1);
    let project = a.job.project_dir();
    let builds = b.job.config.builds_dir.clone().unwrap_or_else(|| "/builds".into());
    a.run_ok(
        "get_sources",
        &format!("echo secret > /tmp/{marker}\nmkdir -p '{project}' && echo a > '{project}/{marker}'\n"),
    )?;
    let probe = format!(
        "test ! -e /tmp/{marker}\nif grep -rqsa '[{first}]{rest}' '{builds}' 2>/dev/null; then exit 3; fi\nif grep -qsa '[{first}]{rest}' /proc/[0-9]*/cmdline; then exit 4; fi\n"
    );
    let (a_result, b_result) = std::thread::scope(|scope| {
        let long = scope.spawn(|| a.run("build_script", &format!("(exec -a {marker} sleep 4)\n")));
        std::thread::sleep(Duration::from_millis(1000));
        let probe = b.run("build_script", &probe);
        (long.join(), probe)
    });
    let a_result = a_result.map_err(|_| "the first job's stage panicked".to_owned())?;
    expect_exit(&a_result, &Exit::Success, "the first job's long stage")?;
    match &b_result.exit {
        Exit::Success => {}
        Exit::Build { code: 1, .. } => return Err("a job saw another job's file in /tmp".into()),
        Exit::Build { code: 3, .. } => return Err("a job saw another job's files under its builds dir".into()),
        Exit::Build { code: 4, .. } => return Err("a job saw another job's processes".into()),
        other => {
            return Err(Finding::Fail(format!("the probe stage ended in a {other}\n{}", tail(&b_result.output()))))
        }
    }
    b.finish()?;
    a.finish()
}
