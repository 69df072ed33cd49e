//! The project's files for `berth exec`: the local work tree, carried into
//! the job's environment inside the get_sources stage script.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use base64::Engine;

/// The git work tree around `file`.
pub fn work_tree(file: &Path) -> Result<PathBuf> {
    let dir = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "--show-toplevel"])
        .stderr(Stdio::null())
        .output()
        .context("failed to run git (needed to find the project's files; or pass --sources DIR or --no-sources)")?;
    if !out.status.success() {
        bail!("{} is not in a git work tree: pass --sources DIR or --no-sources", dir.display());
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// A note for the log when `file` is not at the root of its work tree `root`:
/// the job gets the whole tree (as GitLab would), which surprises a user
/// running a pipeline kept in a subdirectory, such as an example.
pub fn nested_note(root: &Path, file: &Path) -> Option<String> {
    let dir = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dir = std::fs::canonicalize(dir).ok()?;
    let inner = dir.strip_prefix(std::fs::canonicalize(root).ok()?).ok()?;
    (!inner.as_os_str().is_empty()).then(|| {
        format!(
            "Project files: the git work tree {} (the pipeline file is in {}/ of it); --sources {} carries only that directory",
            root.display(),
            inner.display(),
            dir.display()
        )
    })
}

fn git(dir: &Path, args: &[&str]) -> Option<Vec<u8>> {
    let out = Command::new("git").arg("-C").arg(dir).args(args).stderr(Stdio::null()).output().ok()?;
    out.status.success().then_some(out.stdout)
}

/// `dir`'s files as base64 of a tar.gz: in a git work tree the tracked and
/// untracked-but-not-ignored files as they are now (uncommitted edits
/// included), else everything below `dir`.
pub fn archive(dir: &Path) -> Result<String> {
    let listed = git(dir, &["ls-files", "-z", "--cached", "--others", "--exclude-standard"]);
    let mut tar = Command::new("tar");
    tar.arg("-C").arg(dir).args(["-czf", "-"]);
    let list = match listed {
        Some(list) => {
            // Tracked files deleted in the work tree are not sent.
            let existing: Vec<&[u8]> = list
                .split(|b| *b == 0)
                .filter(|name| !name.is_empty())
                .filter(|name| {
                    dir.join(std::ffi::OsStr::new(std::str::from_utf8(name).unwrap_or(""))).symlink_metadata().is_ok()
                })
                .collect();
            tar.args(["--null", "--no-recursion", "-T", "-"]);
            Some(existing.join(&0u8))
        }
        None => {
            tar.arg(".");
            None
        }
    };
    tar.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = tar.spawn().context("failed to run tar")?;
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || {
        if let Some(list) = list {
            let _ = std::io::Write::write_all(&mut stdin, &list);
        }
    });
    let out = child.wait_with_output().context("failed to run tar")?;
    let _ = writer.join();
    if !out.status.success() {
        bail!("failed to archive {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    if out.stdout.len() > 64 << 20 {
        eprintln!(
            "WARNING: the project's files take {} MiB compressed; every job carries them in its get_sources script",
            out.stdout.len() >> 20
        );
    }
    Ok(base64::engine::general_purpose::STANDARD.encode(out.stdout))
}

/// CI_COMMIT_* variables of the work tree, where git knows them.
pub fn git_variables(dir: &Path) -> Vec<(&'static str, String)> {
    let text =
        |args: &[&str]| git(dir, args).map(|o| String::from_utf8_lossy(&o).trim().to_owned()).filter(|s| !s.is_empty());
    let mut vars = Vec::new();
    if let Some(sha) = text(&["rev-parse", "HEAD"]) {
        vars.push(("CI_COMMIT_SHORT_SHA", sha.chars().take(8).collect()));
        vars.push(("CI_COMMIT_SHA", sha));
    }
    if let Some(branch) = text(&["symbolic-ref", "--short", "-q", "HEAD"]) {
        vars.push(("CI_COMMIT_REF_NAME", branch.clone()));
        vars.push(("CI_COMMIT_BRANCH", branch));
    }
    vars
}
