//! `berth doctor`: whether this host can run the runners' jobs, checked
//! before the first job finds out: the configuration, the host, and what each
//! runner's backend needs ([`Backend::check`]), each line ok, a warning or an
//! error with its fix.

use std::path::Path;

use berth_backend_api::{Backend, Finding, Level};
use serde::Serialize;

use crate::cli::{Cli, DoctorArgs};
use crate::config::{self, BackendChoice, Runner};
use crate::exit::Done;
use crate::registry;

/// Where gitlab-runner's configuration is on a Debian host (its package's service).
const GITLAB_RUNNER_CONFIG: &str = "/etc/gitlab-runner/config.toml";

/// What was found of one runner.
#[derive(Debug, Serialize)]
struct RunnerReport {
    name: String,
    backend: String,
    findings: Vec<Finding>,
}

/// The whole report (`--json` prints it as it is).
#[derive(Debug, Serialize)]
struct Report {
    config: String,
    host: Vec<Finding>,
    runners: Vec<RunnerReport>,
    errors: usize,
    warnings: usize,
}

/// `berth doctor [--runner NAME] [--json]`.
pub fn main(cli: &Cli, args: &DoctorArgs) -> anyhow::Result<Done> {
    let mut host = vec![
        Finding::ok("berth", format!("{} {}", current_exe(), env!("CARGO_PKG_VERSION"))),
        Finding::ok("kernel", berth_backend_support::check::kernel_release()),
    ];
    host.push(match berth_backend_support::settings::which("gitlab-runner") {
        Some(path) => Finding::ok("gitlab-runner", format!("{} (on PATH)", path.display())),
        None => Finding::warning(
            "gitlab-runner",
            "not on PATH: nothing on this host calls berth's hooks, and jobs' cache and artifact stages need it",
            "install gitlab-runner (https://docs.gitlab.com/runner/install/linux-repository/)",
        ),
    });
    let runners = config::load_all(&cli.config, cli.runner.as_deref()).unwrap_or_else(|e| {
        host.push(Finding::error("configuration", e.to_string(), "fix the file (README: Configuration)"));
        Vec::new()
    });
    let gitlab = gitlab_runner_config(Path::new(GITLAB_RUNNER_CONFIG));
    let mut reports = Vec::new();
    for runner in runners {
        match runner {
            Ok(runner) => reports.push(check_runner(&runner, gitlab.as_ref())),
            Err(e) => host.push(Finding::error(
                "configuration",
                e.to_string(),
                format!("fix the runner in {}", cli.config.display()),
            )),
        }
    }
    if !host.iter().any(|f| f.check == "configuration") {
        let names: Vec<&str> = reports.iter().map(|r| r.name.as_str()).collect();
        host.insert(0, Finding::ok("configuration", format!("{}: runners {}", cli.config.display(), names.join(", "))));
    }
    let (errors, warnings) = tally(host.iter().chain(reports.iter().flat_map(|r| r.findings.iter())));
    let report = Report { config: cli.config.display().to_string(), host, runners: reports, errors, warnings };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(if errors > 0 { Done::Unsuccessful } else { Done::Success })
}

fn current_exe() -> String {
    std::env::current_exe().map_or_else(|_| "berth".to_owned(), |p| p.display().to_string())
}

/// The findings of one runner: its backend built from its settings, then
/// the backend's own checks, then whether gitlab-runner calls it.
fn check_runner(runner: &Runner, gitlab: Option<&GitlabRunners>) -> RunnerReport {
    let backend_name = match &runner.backend {
        BackendChoice::BuiltIn(name) => name.clone(),
        BackendChoice::Plugin(path) => path.display().to_string(),
    };
    let mut findings = Vec::new();
    match registry::load(runner) {
        Ok(backend) => {
            let description = backend.describe();
            findings.push(Finding::ok(
                "settings",
                format!("valid for backend {} {}", description.name, description.version),
            ));
            findings.extend(checks(backend.as_ref(), runner));
        }
        Err(e) => findings.push(Finding::error(
            "settings",
            crate::Error::from(e).report(),
            "fix the runner's settings; every job would fail at prepare",
        )),
    }
    if let Some(gitlab) = gitlab {
        findings.push(gitlab.calls(&runner.name));
    }
    RunnerReport { name: runner.name.clone(), backend: backend_name, findings }
}

/// What `backend` finds, or a line saying a plugin reports nothing.
pub fn checks(backend: &dyn Backend, runner: &Runner) -> Vec<Finding> {
    let findings = backend.check();
    if findings.is_empty() && matches!(runner.backend, BackendChoice::Plugin(_)) {
        return vec![Finding::ok("host", "the plugin checks nothing of the host (ABI 1.0 has no such call)")];
    }
    findings
}

/// How many errors and warnings `findings` hold.
pub fn tally<'a>(findings: impl Iterator<Item = &'a Finding>) -> (usize, usize) {
    findings.fold((0, 0), |(errors, warnings), f| match f.level {
        Level::Error => (errors + 1, warnings),
        Level::Warning => (errors, warnings + 1),
        _ => (errors, warnings),
    })
}

/// `1 error, 2 warnings`.
pub fn summary(errors: usize, warnings: usize) -> String {
    let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    format!("{}, {}", plural(errors, "error"), plural(warnings, "warning"))
}

/// The errors of `findings`, as lines for a refusal.
pub fn errors(findings: &[Finding]) -> Vec<String> {
    findings
        .iter()
        .filter(|f| f.level == Level::Error)
        .map(|f| match &f.fix {
            Some(fix) => format!("{}: {} (fix: {fix})", f.check, f.detail),
            None => format!("{}: {}", f.check, f.detail),
        })
        .collect()
}

fn table(report: &Report) -> String {
    let mut out = format!("host (configuration {})\n", report.config);
    lines(&mut out, &report.host);
    for runner in &report.runners {
        out.push_str(&format!("\nrunner {} (backend {})\n", runner.name, runner.backend));
        lines(&mut out, &runner.findings);
    }
    out.push_str(&format!("\n{}", summary(report.errors, report.warnings)));
    out.push_str(if report.errors > 0 { ": jobs would fail until the errors are fixed\n" } else { "\n" });
    out
}

fn lines(out: &mut String, findings: &[Finding]) {
    for finding in findings {
        out.push_str(&format!("  {:<8} {:<17} {}\n", finding.level.as_str(), finding.check, finding.detail));
        if let Some(fix) = finding.fix.as_ref().filter(|_| finding.level != Level::Ok) {
            out.push_str(&format!("  {:<8} {:<17} fix: {fix}\n", "", ""));
        }
    }
}

/// The `[[runners]]` of gitlab-runner's config.toml that call berth.
#[derive(Debug)]
struct GitlabRunners {
    path: String,
    /// For each: gitlab-runner's runner name, and the berth runner its hooks name (`--runner X`).
    calls: Vec<(String, Option<String>)>,
}

fn gitlab_runner_config(path: &Path) -> Option<GitlabRunners> {
    let text = std::fs::read_to_string(path).ok()?;
    let doc: toml::Table = toml::from_str(&text).ok()?;
    let runners = doc.get("runners")?.as_array()?;
    let mut calls = Vec::new();
    for runner in runners {
        let Some(custom) = runner.get("custom").and_then(toml::Value::as_table) else { continue };
        let Some(program) = custom.get("run_exec").and_then(toml::Value::as_str) else { continue };
        if Path::new(program).file_name().is_none_or(|name| name != "berth") {
            continue;
        }
        let args: Vec<&str> = custom
            .get("run_args")
            .and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            .collect();
        let named = args.windows(2).find(|w| w[0] == "--runner").map(|w| w[1].to_owned());
        let name = runner.get("name").and_then(toml::Value::as_str).unwrap_or("?").to_owned();
        calls.push((name, named));
    }
    Some(GitlabRunners { path: path.display().to_string(), calls })
}

impl GitlabRunners {
    fn calls(&self, berth_runner: &str) -> Finding {
        let callers: Vec<&str> = self
            .calls
            .iter()
            .filter(|(_, named)| named.as_deref() == Some(berth_runner))
            .map(|(name, _)| name.as_str())
            .collect();
        if callers.is_empty() {
            Finding::warning(
                "gitlab-runner",
                format!("no [[runners]] of {} calls berth runner {berth_runner}", self.path),
                format!("paste the block of `berth --runner {berth_runner} gitlab-config` and restart gitlab-runner"),
            )
        } else {
            Finding::ok("gitlab-runner", format!("called by {} ({})", callers.join(", "), self.path))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitlab_runners_that_call_a_berth_runner_are_found_by_its_runner_argument() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            r#"concurrent = 4
[[runners]]
  name = "ci-1"
  executor = "custom"
  [runners.custom]
    run_exec = "/usr/bin/berth"
    run_args = ["--config", "/etc/berth/config.toml", "--runner", "nspawn", "run"]
[[runners]]
  name = "docker"
  executor = "docker"
"#,
        )
        .unwrap();
        let found = gitlab_runner_config(&path).unwrap();
        assert_eq!(found.calls, [("ci-1".to_owned(), Some("nspawn".to_owned()))]);
        let called = found.calls("nspawn");
        assert_eq!(called.level, Level::Ok);
        assert!(called.detail.contains("ci-1"), "{called:?}");
        let uncalled = found.calls("debug");
        assert_eq!(uncalled.level, Level::Warning);
        assert!(uncalled.fix.unwrap().contains("berth --runner debug gitlab-config"));
        assert!(gitlab_runner_config(&dir.path().join("absent.toml")).is_none());
    }

    #[test]
    fn the_table_shows_fixes_of_problems_and_counts_them() {
        let report = Report {
            config: "/etc/berth/config.toml".into(),
            host: vec![Finding::ok("kernel", "6.1")],
            runners: vec![RunnerReport {
                name: "n".into(),
                backend: "nspawn".into(),
                findings: vec![
                    Finding::error("images_dir", "/x does not exist", "berth image create"),
                    Finding::warning("disk_max", "infinity", "set it"),
                ],
            }],
            errors: 1,
            warnings: 1,
        };
        let text = table(&report);
        assert!(text.contains("  error    images_dir        /x does not exist\n"), "{text}");
        assert!(text.contains("fix: berth image create\n"), "{text}");
        assert!(text.contains("runner n (backend nspawn)"), "{text}");
        assert!(text.ends_with("1 error, 1 warning: jobs would fail until the errors are fixed\n"), "{text}");
        assert_eq!(errors(&report.runners[0].findings), ["images_dir: /x does not exist (fix: berth image create)"]);
    }
}
