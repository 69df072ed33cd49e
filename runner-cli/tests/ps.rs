//! `berth ps` on jobs driven hook by hook: what it shows while a stage runs,
//! between hooks, for a job whose runner is gone, and after cleanup.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// `berth --config CFG [--runner NAME] ps ARGS...`.
fn ps(env: &Env, runner: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(BERTH);
    cmd.arg("--config").arg(env.config()).env_remove("BERTH_LOG").env_remove("BERTH_RUNNER");
    if let Some(runner) = runner {
        cmd.args(["--runner", runner]);
    }
    cmd.arg("ps").args(args).output().unwrap()
}

/// The rows of `berth ps --json`.
fn rows(env: &Env) -> Vec<serde_json::Value> {
    let out = ps(env, None, &["--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    json["jobs"].as_array().unwrap().clone()
}

fn table(env: &Env) -> String {
    let out = ps(env, None, &[]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// The table's line of job `id`, split into its columns.
fn line_of(table: &str, id: u64) -> Vec<String> {
    let line = table.lines().find(|l| l.split_whitespace().nth(1) == Some(&id.to_string()));
    line.unwrap_or_else(|| panic!("no line for job {id}:\n{table}")).split_whitespace().map(str::to_owned).collect()
}

#[test]
fn ps_lists_a_dry_run_job_between_hooks_a_leftover_and_nothing_after_cleanup() {
    let env = Env::new(&format!("{DRY_RUN}[runners.other]\nbackend = \"dry-run\"\n"));
    assert_eq!(table(&env), "no jobs (runners demo, other)\n", "an empty host says so");
    let job = env.job("job");
    let out = job.hook(&env, "demo", &["prepare"]);
    assert!(out.status.success(), "{}", text(&out));

    let columns = line_of(&table(&env), 48151623);
    // Between hooks: no lock held; dry-run says nothing of an environment.
    assert_eq!(columns[..5], ["demo", "48151623", "idle", "-", "-"], "{columns:?}");
    assert_eq!(columns[7..], ["prepare", "(ended)", "-"], "{columns:?}");
    let row = &rows(&env)[0];
    assert_eq!((row["runner"].as_str(), row["job"].as_u64()), (Some("demo"), Some(48151623)), "{row}");
    assert_eq!(row["state"], "idle", "{row}");
    let out = ps(&env, Some("other"), &[]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "no jobs (runner other)\n", "--runner: that runner only");

    // The runner removed its job directory without a cleanup: a leftover.
    let moved = job.tmp.with_extension("moved");
    std::fs::rename(&job.tmp, &moved).unwrap();
    let listing = table(&env);
    assert_eq!(line_of(&listing, 48151623)[2], "leftover", "{listing}");
    assert!(listing.contains("1 leftover") && listing.contains("--runner demo reap` removes them"), "{listing}");
    assert!(rows(&env)[0]["reason"].as_str().unwrap().contains("removed its job directory"));
    std::fs::rename(&moved, &job.tmp).unwrap();

    let out = job.hook(&env, "demo", &["cleanup"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(table(&env), "no jobs (runners demo, other)\n");
}

#[test]
fn ps_into_a_closed_pipe_ends_quietly() {
    let env = Env::new(DRY_RUN);
    let job = env.job("job");
    assert!(job.hook(&env, "demo", &["prepare"]).status.success());
    let mut child = Command::new(BERTH)
        .args(["--config", env.config().to_str().unwrap(), "ps"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // `berth ps | head -0`: the reader is gone before berth writes
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked") && out.status.code() != Some(101), "{:?}: {stderr}", out.status);
    assert!(job.hook(&env, "demo", &["cleanup"]).status.success());
}

/// A stage of `job` that runs until a file `release` appears in the job's
/// `/var/tmp`, started in the background as gitlab-runner would.
fn blocked_stage(env: &Env, job: &Job, runner: &str) -> Child {
    let script =
        job.script("step", "echo started\nwhile [ ! -e /var/tmp/release ]; do sleep 0.1; done\necho released\n");
    env.berth(runner)
        .args(["run", script.to_str().unwrap(), "step_script"])
        .envs(job.env.iter().cloned())
        .current_dir(&job.tmp)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `berth ps` shows job `id` running stage `step_script`; its row.
fn wait_running(env: &Env, id: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row = rows(env).into_iter().find(|r| r["job"] == id);
        if let Some(row) = row.filter(|r| r["state"] == "running" && r["stage"] == "step_script") {
            return row;
        }
        assert!(Instant::now() < deadline, "job {id} never ran its stage: {}", table(env));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Drives a job of `runner` through prepare, a stage that `ps` sees running,
/// a leftover and cleanup; `root` is the job's root on the host, from its state.
fn a_real_job_in_ps(env: &Env, runner: &str, id: u64, root: &dyn Fn(&Path) -> PathBuf) -> (String, serde_json::Value) {
    let job = env.job_with_id("job", id);
    let out = job.hook(env, runner, &["prepare"]);
    assert!(out.status.success(), "{}", text(&out));
    let stage = blocked_stage(env, &job, runner);
    let row = wait_running(env, id);
    let running = table(env);
    let columns = line_of(&running, id);
    assert_eq!(columns[..5], [runner, &id.to_string(), "running", "bookworm", "1"], "{running}");
    assert_eq!(columns[7], "step_script", "{running}");

    let job_dir = env.state().join("jobs").join(format!("{runner}-{id}"));
    std::fs::write(root(&job_dir).join("var/tmp/release"), "").unwrap();
    let out = stage.wait_with_output().unwrap();
    assert!(out.status.success() && text(&out).contains("released"), "{}", text(&out));
    let listing = table(env);
    assert_eq!(line_of(&listing, id)[2], "idle", "{listing}");
    assert!(listing.contains("step_script (ended)"), "{listing}");

    let moved = job.tmp.with_extension("moved");
    std::fs::rename(&job.tmp, &moved).unwrap();
    let listing = table(env);
    assert_eq!(line_of(&listing, id)[2], "leftover", "{listing}");
    assert!(listing.contains(&format!("--runner {runner} reap` removes them")), "{listing}");
    std::fs::rename(&moved, &job.tmp).unwrap();

    let out = job.hook(env, runner, &["cleanup"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(jobs_left(&env.state()), 0);
    assert_eq!(table(env), format!("no jobs (runner {runner})\n"));
    (running, row)
}

#[test]
fn ps_shows_a_running_chroot_job_its_root_stage_and_memory() {
    let Some(images) = real_containers() else { return };
    let env = Env::new(&image_runner(&images, "pch", "chroot", ""));
    let (running, row) = a_real_job_in_ps(&env, "pch", 914_001, &|dir| dir.join("root"));
    println!("{running}");
    assert_eq!(row["root"].as_str().map(PathBuf::from), Some(env.state().join("jobs/pch-914001/root")), "{row}");
    assert!(row["memory_bytes"].as_u64().is_some_and(|n| n > 0), "the job's cgroup holds its memory: {row}");
}

#[test]
fn ps_shows_a_running_nspawn_job_its_machine_stage_and_memory() {
    let Some(images) = real_containers() else { return };
    let env = Env::new(&image_runner(&images, "pns", "nspawn", "mode = \"standalone\"\n"));
    let (running, row) = a_real_job_in_ps(&env, "pns", 914_002, &|dir| dir.join("container/root"));
    println!("{running}");
    assert_eq!(row["machine"], "berth-pns-914002", "{row}");
    assert_eq!(line_of(&running, 914_002)[5], "berth-pns-914002", "{running}");
    assert!(row["memory_bytes"].as_u64().is_some_and(|n| n > 1 << 20), "a booted container holds memory: {row}");
    assert_ne!(line_of(&running, 914_002).last().unwrap(), "-", "{running}");
}

#[test]
fn ps_shows_the_warm_containers_of_an_nspawn_pool() {
    let Some(images) = real_containers() else { return };
    let runner = image_runner(&images, "pwp", "nspawn", "mode = \"standalone\"\n");
    let env = Env::new(&format!("{runner}pool_size = 1\n"));
    // A job's cleanup fills the pool of its image.
    let job = env.job_with_id("job", 914_003);
    for hook in ["prepare", "cleanup"] {
        let out = job.hook(&env, "pwp", &[hook]);
        assert!(out.status.success(), "{hook}: {}", text(&out));
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    let row = loop {
        if let Some(row) = rows(&env).into_iter().find(|r| r["state"] == "warm") {
            break row;
        }
        assert!(Instant::now() < deadline, "no warm container: {}", table(&env));
        std::thread::sleep(Duration::from_millis(200));
    };
    let listing = table(&env);
    println!("{listing}");
    assert_eq!(
        (row["job"].is_null(), row["image"].as_str(), row["generation"].as_u64()),
        (true, Some("bookworm"), Some(1))
    );
    assert_eq!(row["machine"], "berth-pwp-pool0", "{row}");
    assert!(row["memory_bytes"].as_u64().is_some_and(|n| n > 1 << 20), "{row}");
    let columns: Vec<&str> = listing.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(columns[..6], ["pwp", "-", "warm", "bookworm", "1", "berth-pwp-pool0"], "{listing}");
    // A job that takes it: its row says so.
    let job = env.job_with_id("job", 914_004);
    let out = job.hook(&env, "pwp", &["prepare"]);
    assert!(text(&out).contains("Took a warm container"), "{}", text(&out));
    let rows = rows(&env);
    let taken = rows.iter().find(|r| r["job"] == 914_004).unwrap_or_else(|| panic!("{rows:?}"));
    assert_eq!((taken["image"].as_str(), taken["machine"].as_str()), (Some("bookworm"), Some("berth-pwp-pool0")));
    assert!(taken["memory_bytes"].as_u64().is_some_and(|n| n > 1 << 20), "{taken}");
    assert!(job.hook(&env, "pwp", &["cleanup"]).status.success());
    assert_eq!(jobs_left(&env.state()), 0);
    // pool_size 0: one reap empties the pool, and ps shows nothing.
    std::fs::write(env.config(), format!("state_dir = {:?}\n{runner}", env.state().display().to_string())).unwrap();
    let out = env.berth("pwp").args(["reap", "--grace", "0"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(table(&env), "no jobs (runner pwp)\n");
}
