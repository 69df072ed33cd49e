//! What a job is given: masked values stay hidden, the job's identity comes
//! from the payload, variables arrive byte for byte.

use berth_backend_api::{JobResponse, ResponseVariable};
use berth_runner_imitation::runner::Exit;

use super::case::{expect_exit, read_small_file, walk, Case};
use super::{Check, CheckOutcome, Finding, Level, Needs, Target};

const SECRET_KEY: &str = "BERTH_CONFORMANCE_SECRET";

pub(super) const SECRETS_MASKED: Check = Check {
    id: "secrets.masked",
    level: Level::Must,
    statement: "masked values reach no hook output and no state file",
    protocol: "2",
    needs: Needs::Nothing,
    run: masked,
};

fn masked(target: &Target) -> CheckOutcome {
    let secret = format!(
        "berth-masked-{:x}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |d| d.as_nanos())
    );
    let mut case = Case::with(target, |r| r.variables.push(ResponseVariable::new(SECRET_KEY, &secret).masked()))?;
    let mut outputs = vec![case.prepare()?.output()];
    let body = format!("export {SECRET_KEY}={}\ntrue\n", berth_backend_api::script::quote(&secret));
    outputs.push(case.run("build_script", &body).output());
    let mut files = Vec::new();
    if let Some(root) = &target.state_dir {
        walk(root, &mut |path| {
            if let Some(text) = read_small_file(path) {
                if String::from_utf8_lossy(&text).contains(&secret) {
                    files.push(path.display().to_string());
                }
            }
        });
    }
    outputs.push(case.cleanup().output());
    if outputs.iter().any(|o| o.contains(&secret)) {
        return Err("a masked variable's value appeared in a hook's output".into());
    }
    if !files.is_empty() {
        return Err(Finding::Fail(format!("a masked variable's value was written to {}", files.join(", "))));
    }
    case.finish()
}

pub(super) const IDENTITY_TRUSTED: Check = Check {
    id: "identity.trusted",
    level: Level::Must,
    statement: "the job's identity comes from JOB_RESPONSE_FILE, not the shadowable CUSTOM_ENV_CI_JOB_ID",
    protocol: "2",
    needs: Needs::ExecutesScripts,
    run: identity,
};

fn identity(target: &Target) -> CheckOutcome {
    let shadow = |r: &mut JobResponse| r.variables.push(ResponseVariable::new("CI_JOB_ID", "1"));
    let mut a = Case::with(target, shadow)?;
    let mut b = Case::with(target, shadow)?;
    a.job.set_variable("CI_JOB_ID", "1");
    b.job.set_variable("CI_JOB_ID", "1");
    a.prepare()?;
    let project = a.job.project_dir();
    a.run_ok("get_sources", &format!("mkdir -p '{project}'\necho a > '{project}/berth-identity'\n"))?;
    b.prepare()?;
    let cleaned = b.cleanup();
    expect_exit(&cleaned, &Exit::Success, "cleanup of the second job")?;
    let result = a.run("build_script", &format!("test \"$(cat '{project}/berth-identity')\" = a\n"));
    expect_exit(
        &result,
        &Exit::Success,
        "the first job, after another job with the same CUSTOM_ENV_CI_JOB_ID was cleaned up",
    )?;
    b.finish()?;
    a.finish()
}

/// Bytes as lowercase hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) const VARIABLES_EXACT: Check = Check {
    id: "variables.exact",
    level: Level::Must,
    statement: "variables reach the script byte for byte (quotes, newlines, unicode)",
    protocol: "2",
    needs: Needs::ExecutesScripts,
    run: variables_exact,
};

fn variables_exact(target: &Target) -> CheckOutcome {
    let value = "it's \"quoted\" $HOME `id` \\ back\nsecond line\ttab ünïcødé ☃ 🚀 %s *";
    let mut case = Case::with(target, |r| r.variables.push(ResponseVariable::new("BERTH_EXACT", value)))?;
    case.prepare()?;
    let body = format!(
        "export BERTH_EXACT={}\nprintf 'hex=%s\\n' \"$(printf '%s' \"$BERTH_EXACT\" | od -An -tx1 -v | tr -d ' \\n')\"\n",
        berth_backend_api::script::quote(value)
    );
    let result = case.run_ok("build_script", &body)?;
    let want = format!("hex={}", hex(value.as_bytes()));
    if !result.output().lines().any(|l| l.trim() == want) {
        return Err(Finding::Fail(format!(
            "the variable did not reach the script exactly: want {want}, output {:?}",
            result.output()
        )));
    }
    case.finish()
}
