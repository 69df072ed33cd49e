//! The transcript: one JSON line per hook, appended to `<dir>/<job key>.jsonl`.

use std::fs::{DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use berth_backend_api::{JobContext, JobKey};
use serde_json::{json, Map, Value};

use crate::mask::Mask;
use crate::report::Script;
use crate::Simulated;

/// The transcript file of one job.
#[derive(Debug, Clone)]
pub(crate) struct Transcript {
    path: PathBuf,
}

impl Transcript {
    /// The transcript of `key` in `dir`.
    pub(crate) fn new(dir: &Path, key: &JobKey) -> Self {
        // A job key is a safe path component (validated runner name and a number).
        Transcript { path: dir.join(format!("{key}.jsonl")) }
    }

    /// The file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` as one line, with every string in it (keys too) masked.
    pub(crate) fn append(&self, mask: &Mask, mut record: Value) -> io::Result<()> {
        mask_strings(&mut record, mask);
        let text = serde_json::to_string(&record)?;
        // Strings were masked before they were escaped; this catches anything
        // that only shows up in the serialized line.
        let mut line = mask.redact(&text).into_owned();
        line.push('\n');
        if let Some(dir) = self.path.parent() {
            DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        }
        let mut file = OpenOptions::new().create(true).append(true).mode(0o600).open(&self.path)?;
        // One write per record, so records of concurrent writers never interleave.
        file.write_all(line.as_bytes())
    }
}

/// Removes the oldest transcripts of runner `runner` in `dir` so that, with
/// `current` (the job's, which is kept), at most `keep` remain; 0 keeps all.
/// Only regular files named `<runner>-<job id>.jsonl` count. Returns what
/// was removed.
pub(crate) fn prune(dir: &Path, runner: &str, keep: u32, current: &Path) -> Vec<PathBuf> {
    if keep == 0 {
        return Vec::new();
    }
    let prefix = format!("{runner}-");
    let ours = |name: &str| {
        name.strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".jsonl"))
            .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
    };
    let mut found: Vec<(SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(ours) && e.path() != current)
        .filter_map(|e| {
            let meta = std::fs::symlink_metadata(e.path()).ok().filter(|m| m.is_file())?;
            Some((meta.modified().ok()?, e.path()))
        })
        .collect();
    let others = keep as usize - 1;
    if found.len() <= others {
        return Vec::new();
    }
    found.sort();
    let excess = found.len() - others;
    found.into_iter().take(excess).map(|(_, path)| path).filter(|path| std::fs::remove_file(path).is_ok()).collect()
}

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The record of config.
pub(crate) fn config_record(key: &JobKey, builds_dir: &str, cache_dir: &str) -> Value {
    json!({
        "hook": "config",
        "job": key.to_string(),
        "time_unix": now_unix(),
        "builds_dir": builds_dir,
        "cache_dir": cache_dir,
    })
}

/// The record of prepare: the job, its image and its variables (masked ones
/// as `[MASKED]`).
pub(crate) fn prepare_record(job: &JobContext, simulated: Option<Simulated>) -> Value {
    let mut variables = Map::new();
    let mut files = Vec::new();
    for var in job.variables() {
        let value = if var.masked { crate::MASKED.to_owned() } else { var.value.clone() };
        variables.insert(var.key.clone(), Value::String(value));
        if var.file {
            files.push(Value::String(var.key.clone()));
        }
    }
    let response = job.response();
    json!({
        "hook": "prepare",
        "job": job.key().to_string(),
        "time_unix": now_unix(),
        "job_name": response.map(|r| r.job_info.name.clone()),
        "project": response.map(|r| r.job_info.project_full_path.clone()),
        "image": job.image(),
        "variables": variables,
        "file_variables": files,
        "simulated_failure": simulated_value(simulated),
    })
}

/// The record of one run stage.
pub(crate) fn run_record(
    job: &JobContext,
    stage: &str,
    script_path: &Path,
    script: &Script,
    simulated: Option<Simulated>,
) -> Value {
    json!({
        "hook": "run",
        "job": job.key().to_string(),
        "time_unix": now_unix(),
        "stage": stage,
        "script": script_path.to_string_lossy(),
        "runner_format": matches!(script, Script::Decoded(_)),
        "script_body": script.text(),
        "simulated_failure": simulated_value(simulated),
    })
}

/// The record of cleanup.
pub(crate) fn cleanup_record(key: &JobKey, prepared: bool) -> Value {
    json!({
        "hook": "cleanup",
        "job": key.to_string(),
        "time_unix": now_unix(),
        "prepared": prepared,
    })
}

fn simulated_value(simulated: Option<Simulated>) -> Value {
    match simulated {
        None => Value::Null,
        Some(Simulated::Build(code)) => json!({"kind": "build", "exit_code": code}),
        Some(Simulated::System) => json!({"kind": "system"}),
    }
}

fn mask_strings(value: &mut Value, mask: &Mask) {
    match value {
        Value::String(text) => {
            if let std::borrow::Cow::Owned(masked) = mask.redact(text) {
                *text = masked;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| mask_strings(item, mask)),
        Value::Object(map) => {
            let entries = std::mem::take(map);
            for (key, mut item) in entries {
                mask_strings(&mut item, mask);
                map.insert(mask.redact(&key).into_owned(), item);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn prune_keeps_the_newest_transcripts_of_the_runner_and_nothing_else_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let write = |name: &str, age_s: u64| {
            let path = d.join(name);
            std::fs::write(&path, "{}\n").unwrap();
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(SystemTime::now() - Duration::from_secs(age_s)).unwrap();
            path
        };
        let old: Vec<PathBuf> = (1..=4).map(|n| write(&format!("r-{n}.jsonl"), 100 - n)).collect();
        let others = [write("r2-1.jsonl", 1000), write("r-x.jsonl", 1000), write("notes.txt", 1000)];
        let current = write("r-9.jsonl", 0);
        std::os::unix::fs::symlink(&old[0], d.join("r-7.jsonl")).unwrap();
        // keep 3: this job's and the two newest others (r-4, r-3).
        let removed = prune(d, "r", 3, &current);
        assert_eq!(removed, [old[0].clone(), old[1].clone()]);
        assert!(old[2].exists() && old[3].exists() && current.exists());
        assert!(others.iter().all(|p| p.exists()), "other runners' files and other names stay");
        assert!(d.join("r-7.jsonl").symlink_metadata().is_ok(), "a link is not a transcript");
        // 0 keeps all.
        assert!(prune(d, "r", 0, &current).is_empty());
        assert!(old[2].exists());
    }
}
