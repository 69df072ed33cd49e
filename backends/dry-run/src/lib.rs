//! The dry-run backend: executes nothing and shows what the runner sends.
//!
//! For pipeline debugging. For every hook it writes to the job log, readably,
//! what it received (the job, its image and variables in prepare; the decoded
//! stage script in run) and appends the same as one JSON line to a transcript,
//! `<transcript_dir>/<job key>.jsonl`, which outlives the job (prepare names
//! it in the job log, and removes the runner's oldest beyond
//! `transcript_keep`, default 100). Masked values and
//! the job token are replaced by `[MASKED]` everywhere, in the forms a stage
//! script quotes them too.
//!
//! Every hook succeeds unless the settings ask for a simulated failure:
//!
//! ```toml
//! [runners.debug.settings]
//! fail_stage = "build_script"   # a run stage, or "prepare"
//! fail_kind = "build"           # or "system"
//! fail_exit_code = 42           # build failures only; default 1
//! ```
//!
//! The job log shows a stage body folded: the `export` lines that repeat the
//! variables listed at prepare become one line (exports with other values are
//! still listed) and long heredocs (the sources in `get_sources`) their size.
//! `full_scripts = true` shows every line; the transcript always has them all.
#![deny(missing_docs)]

mod fold;
mod mask;
mod report;
mod transcript;

#[cfg(test)]
mod tests;

use std::io::Write;
use std::path::{Path, PathBuf};

use berth_backend_api::{
    Backend, Cancel, Capabilities, ConfigOutput, Description, Failure, Isolation, JobContext, JobKey, JobState,
    NewBackend, RunnerInfo,
};
use serde::Deserialize;

use crate::mask::Mask;
use crate::report::Script;
use crate::transcript::Transcript;

/// What masked values are shown as (GitLab's own wording).
const MASKED: &str = "[MASKED]";

/// The pseudo-stage name that makes prepare fail.
const PREPARE: &str = "prepare";

/// The builds directory config reports when the runner sets none.
const DEFAULT_BUILDS_DIR: &str = "/builds";

/// The cache directory config reports when the runner sets none.
const DEFAULT_CACHE_DIR: &str = "/cache";

/// The dry-run backend's settings (`[runners.NAME.settings]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Settings {
    /// Where transcripts are written, one `<job key>.jsonl` per job; an
    /// absolute path. Default: `<state_dir>/logs/dry-run`. Created (mode 0700) when
    /// needed; cleanup does not remove transcripts.
    #[serde(default)]
    pub transcript_dir: Option<PathBuf>,
    /// The hook that fails: a run stage name (e.g. `build_script`, or any
    /// stage the runner may send) or `prepare`. Default: none fails.
    #[serde(default)]
    pub fail_stage: Option<String>,
    /// How `fail_stage` fails. Default: a build failure.
    #[serde(default)]
    pub fail_kind: FailKind,
    /// The exit code of a simulated build failure, 1 to 255. Default: 1.
    /// Not allowed with `fail_kind = "system"`.
    #[serde(default)]
    pub fail_exit_code: Option<i32>,
    /// Show each stage body in full in the job log. Default: false, which
    /// folds the runs of `export NAME=...` lines that repeat the variables
    /// listed at prepare into one line (still listing exports whose value
    /// differs from prepare's or that prepare did not list, such as
    /// `CI_JOB_STATUS` in `after_script`), and shows a heredoc of more than
    /// three lines (the sources in `get_sources`) as its first line, its size
    /// and its delimiter line. The transcript always has the full body.
    #[serde(default)]
    pub full_scripts: bool,
    /// How many transcripts of this runner `transcript_dir` keeps: prepare
    /// removes the oldest beyond this number (a transcript with the job's
    /// sources is a few hundred KB). 0 keeps all. Default: 100.
    #[serde(default)]
    pub transcript_keep: Option<u32>,
}

/// Transcripts a runner keeps when `transcript_keep` is not set.
const DEFAULT_TRANSCRIPT_KEEP: u32 = 100;

/// How a simulated failure fails (`settings.fail_kind`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailKind {
    /// The job fails as if its script exited non-zero (`Failure::Script`).
    #[default]
    Build,
    /// The runner sees a system failure (`Failure::System`); GitLab retries
    /// a failed prepare.
    System,
}

/// A simulated failure, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Simulated {
    /// A build failure with this exit code.
    Build(i32),
    /// A system failure.
    System,
}

impl Simulated {
    fn failure(self, stage: &str) -> Failure {
        match self {
            Simulated::Build(code) => Failure::script(code),
            Simulated::System => {
                Failure::system(format!("dry-run: simulated system failure in {stage} (settings.fail_stage)"))
            }
        }
    }
}

/// The dry-run backend: executes nothing; shows and records what each hook
/// receives. Built with [`NewBackend::new`] from [`Settings`].
#[derive(Debug)]
pub struct DryRun {
    transcript_dir: PathBuf,
    fail: Option<(String, Simulated)>,
    builds_dir: String,
    cache_dir: String,
    full_scripts: bool,
    transcript_keep: u32,
    log: JobLog,
}

impl DryRun {
    /// The simulated failure of `stage`, if the settings ask for one.
    fn simulated(&self, stage: &str) -> Option<Simulated> {
        self.fail.as_ref().filter(|(fail, _)| fail == stage).map(|&(_, simulated)| simulated)
    }

    fn transcript(&self, key: &berth_backend_api::JobKey) -> Transcript {
        Transcript::new(&self.transcript_dir, key)
    }

    /// Appends `record` to the job's transcript; a failure is a system failure.
    fn record(&self, transcript: &Transcript, mask: &Mask, record: serde_json::Value) -> Result<(), Failure> {
        transcript.append(mask, record).map_err(|err| {
            Failure::system_with(
                format!("dry-run: failed to write the transcript {}", transcript.path().display()),
                err,
            )
        })
    }
}

/// Checks the failure settings and turns them into what to simulate.
fn simulated_failure(settings: &Settings) -> Result<Option<(String, Simulated)>, Failure> {
    if let Some(code) = settings.fail_exit_code {
        if !(1..=255).contains(&code) {
            return Err(Failure::system(format!(
                "dry-run: settings.fail_exit_code = {code} is out of range: use 1 to 255"
            )));
        }
    }
    let Some(stage) = &settings.fail_stage else {
        if settings.fail_exit_code.is_some() || settings.fail_kind == FailKind::System {
            return Err(Failure::system(
                "dry-run: settings.fail_kind and settings.fail_exit_code need settings.fail_stage \
                 (the stage to fail, e.g. \"build_script\" or \"prepare\")",
            ));
        }
        return Ok(None);
    };
    if stage.trim().is_empty() {
        return Err(Failure::system(
            "dry-run: settings.fail_stage is empty: name a run stage (e.g. \"build_script\") or \"prepare\"",
        ));
    }
    let simulated = match (settings.fail_kind, settings.fail_exit_code) {
        (FailKind::Build, code) => Simulated::Build(code.unwrap_or(1)),
        (FailKind::System, None) => Simulated::System,
        (FailKind::System, Some(_)) => {
            return Err(Failure::system(
                "dry-run: settings.fail_exit_code applies to build failures only, \
                 but settings.fail_kind is \"system\": remove one of them",
            ))
        }
    };
    Ok(Some((stage.clone(), simulated)))
}

impl NewBackend for DryRun {
    type Settings = Settings;

    fn new(settings: Settings, runner: &RunnerInfo) -> Result<Self, Failure> {
        let fail = simulated_failure(&settings)?;
        let transcript_dir = match settings.transcript_dir {
            Some(dir) if dir.is_relative() => {
                return Err(Failure::system(format!(
                    "dry-run: settings.transcript_dir {:?} is not an absolute path \
                     (hooks run in a temporary directory that the runner removes)",
                    dir.display().to_string()
                )))
            }
            Some(dir) => dir,
            None => runner.logs_dir().join("dry-run"),
        };
        Ok(DryRun {
            transcript_dir,
            fail,
            builds_dir: runner.builds_dir.clone().unwrap_or_else(|| DEFAULT_BUILDS_DIR.to_owned()),
            cache_dir: runner.cache_dir.clone().unwrap_or_else(|| DEFAULT_CACHE_DIR.to_owned()),
            full_scripts: settings.full_scripts,
            transcript_keep: settings.transcript_keep.unwrap_or(DEFAULT_TRANSCRIPT_KEEP),
            log: JobLog::default(),
        })
    }
}

impl Backend for DryRun {
    fn describe(&self) -> Description {
        Description::new(
            "dry-run",
            env!("CARGO_PKG_VERSION"),
            "executes nothing; shows in the job log and records in a transcript what each hook receives",
        )
        .isolation(Isolation::None)
        .capabilities(
            Capabilities::none().executes_scripts(false).cancel(false).reap(false).images(false).concurrent_jobs(true),
        )
    }

    /// Reports the builds and cache directories (the runner's, else `/builds`
    /// and `/cache`) and records the call; prints nothing (config's stdout is
    /// the runner's JSON).
    fn config(&self, job: &JobContext) -> Result<ConfigOutput, Failure> {
        let mask = Mask::for_job(job);
        let record = transcript::config_record(job.key(), &self.builds_dir, &self.cache_dir);
        self.record(&self.transcript(job.key()), &mask, record)?;
        Ok(ConfigOutput::with_dirs(&self.builds_dir, &self.cache_dir))
    }

    /// Shows the job, its image and its variables, and records them.
    fn prepare(&self, job: &JobContext, _state: &JobState, cancel: &Cancel) -> Result<(), Failure> {
        if cancel.is_cancelled() {
            return Err(Failure::Cancelled);
        }
        let mask = Mask::for_job(job);
        let simulated = self.simulated(PREPARE);
        let mut text = report::prepare(job, &mask);
        if let Some(simulated) = simulated {
            text.push_str(&report::simulated(PREPARE, simulated));
        }
        let transcript = self.transcript(job.key());
        text.push_str(&format!("Transcript of this job: {}\n", transcript.path().display()));
        self.log.write(&mask, &text);
        for old in transcript::prune(&self.transcript_dir, job.key().runner(), self.transcript_keep, transcript.path())
        {
            tracing::debug!(removed = %old.display(), "an old transcript (settings.transcript_keep)");
        }
        self.record(&transcript, &mask, transcript::prepare_record(job, simulated))?;
        simulated.map_or(Ok(()), |simulated| Err(simulated.failure(PREPARE)))
    }

    /// Shows the stage's script (decoded from the runner's wrapper) and
    /// records it; nothing is executed.
    fn run(
        &self,
        job: &JobContext,
        _state: &JobState,
        script: &Path,
        stage: &str,
        cancel: &Cancel,
    ) -> Result<(), Failure> {
        if cancel.is_cancelled() {
            return Err(Failure::Cancelled);
        }
        let bytes = std::fs::read(script).map_err(|err| {
            Failure::system_with(format!("dry-run: failed to read the stage script {}", script.display()), err)
        })?;
        let parsed = Script::parse(&String::from_utf8_lossy(&bytes));
        let mask = Mask::for_job(job);
        let simulated = self.simulated(stage);
        let prepared = (!self.full_scripts).then(|| job.variables());
        let mut text = report::stage(stage, &parsed, &mask, prepared);
        if let Some(simulated) = simulated {
            text.push_str(&report::simulated(stage, simulated));
        }
        self.log.write(&mask, &text);
        let record = transcript::run_record(job, stage, script, &parsed, simulated);
        self.record(&self.transcript(job.key()), &mask, record)?;
        simulated.map_or(Ok(()), |simulated| Err(simulated.failure(stage)))
    }

    /// Records the call; there is nothing to remove and the transcript is
    /// kept. Always succeeds: a transcript that cannot be written is only
    /// logged, as cleanup must succeed for any job, prepared or not.
    /// Nothing of a dry run outlives its job state but its transcript, which is kept.
    fn orphans(&self, _known: &[JobKey]) -> Result<Option<Vec<String>>, Failure> {
        Ok(Some(Vec::new()))
    }

    fn cleanup(&self, state: &JobState) -> Result<(), Failure> {
        let transcript = self.transcript(state.key());
        let record = transcript::cleanup_record(state.key(), state.record().is_some());
        match transcript.append(&Mask::none(), record) {
            Ok(()) => self.log.write(
                &Mask::none(),
                &format!(
                    "dry-run: nothing to clean up for {}; transcript: {}\n",
                    state.key(),
                    transcript.path().display()
                ),
            ),
            Err(err) => tracing::warn!(
                job = %state.key(),
                path = %transcript.path().display(),
                error = %err,
                "dry-run: failed to write the transcript"
            ),
        }
        Ok(())
    }
}

/// Where the hooks' output goes: the process's stdout (the job log for
/// prepare and run, the runner's log for cleanup); a buffer in unit tests.
#[derive(Debug, Default)]
struct JobLog {
    #[cfg(test)]
    captured: Option<std::sync::Arc<std::sync::Mutex<String>>>,
}

impl JobLog {
    /// Writes `text`, masked. A job log that cannot be written is only logged.
    fn write(&self, mask: &Mask, text: &str) {
        let text = mask.redact(text);
        #[cfg(test)]
        if let Some(captured) = &self.captured {
            captured.lock().unwrap_or_else(|e| e.into_inner()).push_str(&text);
            return;
        }
        let mut stdout = std::io::stdout().lock();
        if let Err(err) = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
            tracing::warn!(error = %err, "dry-run: failed to write the job log");
        }
    }
}
