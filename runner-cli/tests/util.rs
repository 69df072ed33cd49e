//! Helpers shared by berth's integration tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use berth_backend_api::testing::prerequisite;

pub const BERTH: &str = env!("CARGO_BIN_EXE_berth");

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// A scratch area with a berth configuration file.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    /// A config with `state_dir` inside the scratch dir and the given runner tables.
    pub fn new(runners: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("state_dir = {:?}\n{runners}", dir.path().join("state").display().to_string());
        std::fs::write(dir.path().join("config.toml"), text).unwrap();
        Env { dir }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `berth --config CFG --runner RUNNER ARGS...`, test backends allowed.
    pub fn berth(&self, runner: &str) -> Command {
        let mut cmd = Command::new(BERTH);
        cmd.arg("--config")
            .arg(self.config())
            .arg("--runner")
            .arg(runner)
            .env("BERTH_ALLOW_TEST_BACKENDS", "1")
            .env_remove("BERTH_LOG");
        cmd
    }

    /// `berth exec` of `job` of the sample pipeline (examples/hello, with its
    /// sources) on `runner`, retrying prepare after 50 ms instead of 3 s.
    pub fn exec_sample(&self, runner: &str, job: &str, extra: &[&str]) -> std::process::Output {
        let hello = repo().join("examples/hello");
        self.berth(runner)
            .arg("exec")
            .arg("--file")
            .arg(hello.join(".gitlab-ci.yml"))
            .arg("--sources")
            .arg(&hello)
            .args(["--retry-delay-ms", "50"])
            .args(extra)
            .arg(job)
            .output()
            .unwrap()
    }

    /// A runner's per-job temp dir with the fixture payload (job 48151623),
    /// and the environment gitlab-runner gives every hook.
    pub fn job(&self, name: &str) -> Job {
        let tmp = self.dir.path().join(name);
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::copy(repo().join("testdata/fixtures/job-response.json"), tmp.join("response.json")).unwrap();
        let mut env: Vec<(String, String)> =
            std::fs::read_to_string(repo().join("testdata/fixtures/hook-environment.env"))
                .unwrap()
                .lines()
                .filter_map(|line| line.split_once('='))
                .map(|(k, v)| (k.to_owned(), serde_json::from_str::<String>(v).unwrap()))
                .filter(|(k, _)| k.starts_with("CUSTOM_ENV_"))
                .collect();
        env.push(("TMPDIR".into(), tmp.display().to_string()));
        env.push(("BUILD_FAILURE_EXIT_CODE".into(), "1".into()));
        env.push(("SYSTEM_FAILURE_EXIT_CODE".into(), "2".into()));
        env.push(("BUILD_EXIT_CODE_FILE".into(), tmp.join("build_exit_code").display().to_string()));
        env.push(("JOB_RESPONSE_FILE".into(), tmp.join("response.json").display().to_string()));
        Job { tmp, env }
    }
}

impl Env {
    /// Like [`Env::job`], for job `id` instead of the fixture's: tests that run
    /// real containers at the same time need distinct machine names.
    pub fn job_with_id(&self, name: &str, id: u64) -> Job {
        let mut job = self.job(name);
        let response = std::fs::read_to_string(job.tmp.join("response.json")).unwrap();
        std::fs::write(job.tmp.join("response.json"), response.replacen("48151623", &id.to_string(), 1)).unwrap();
        for (key, value) in &mut job.env {
            if key == "CUSTOM_ENV_CI_JOB_ID" {
                *value = id.to_string();
            }
        }
        job
    }
}

pub struct Job {
    pub tmp: PathBuf,
    pub env: Vec<(String, String)>,
}

impl Job {
    /// Calls a hook the way gitlab-runner does.
    pub fn hook(&self, env: &Env, runner: &str, args: &[&str]) -> Output {
        let out = env.berth(runner).args(args).envs(self.env.iter().cloned()).current_dir(&self.tmp).output().unwrap();
        out
    }

    pub fn exit_code_file(&self) -> PathBuf {
        self.tmp.join("build_exit_code")
    }

    /// Writes a stage script in the runner's format.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.tmp.join(name);
        std::fs::write(&path, berth_backend_api::script::render(body)).unwrap();
        path
    }
}

pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// `berth exec` of a one-job pipeline whose script is `script`'s lines, without sources.
pub fn exec_script(env: &Env, runner: &str, script: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ci.yml");
    let commands: String = script.lines().map(|l| format!("    - {}\n", serde_json::to_string(l).unwrap())).collect();
    std::fs::write(&file, format!("probe:\n  script:\n{commands}")).unwrap();
    let out =
        env.berth(runner).args(["exec", "--no-sources", "--file", file.to_str().unwrap(), "probe"]).output().unwrap();
    (out.status.code().unwrap_or(-1), text(&out))
}

/// The bwrap plugin built beside the berth binary, where it and bubblewrap
/// are there; otherwise `None` with the reason printed (under `CI=true`, a panic).
pub fn bwrap_plugin() -> Option<PathBuf> {
    let path = Path::new(BERTH).parent().unwrap().join("libberth_backend_bwrap.so");
    let missing = if !path.exists() {
        Some(format!("{} is not built (run `cargo build --workspace` first; scripts/test does)", path.display()))
    } else if !Path::new("/usr/bin/bwrap").exists() {
        Some("bubblewrap is not installed (apt-get install bubblewrap)".to_owned())
    } else {
        None
    };
    prerequisite(missing).then_some(path)
}

pub const DRY_RUN: &str = "[runners.demo]\nbackend = \"dry-run\"\n";
pub const DRY_RUN_FAIL_42: &str = "[runners.fail42]\nbackend = \"dry-run\"\n[runners.fail42.settings]\nfail_stage = \"build_script\"\nfail_exit_code = 42\n";
pub const HOST: &str = "[runners.host]\nbackend = \"host-test\"\n";

/// The images for tests on real containers (`BERTH_TEST_IMAGES`, built by
/// scripts/test), or `None` with the reason printed when a prerequisite is
/// missing on a developer machine. Under `CI=true` a missing prerequisite fails.
pub fn real_containers() -> Option<PathBuf> {
    let images =
        PathBuf::from(std::env::var("BERTH_TEST_IMAGES").unwrap_or_else(|_| "/var/cache/berth-test/images".into()));
    let missing = if !nix::unistd::Uid::effective().is_root() {
        Some("not running as root".to_owned())
    } else if !Path::new("/usr/bin/systemd-nspawn").exists() {
        Some("systemd-nspawn is not installed (apt-get install systemd-container)".to_owned())
    } else if !images.join("bookworm/current").exists() || !images.join("testhost/current").exists() {
        Some(format!("no test images in {} (scripts/test builds them)", images.display()))
    } else {
        None
    };
    prerequisite(missing.map(|reason| format!("cannot test real containers: {reason}"))).then_some(images)
}

/// Runner `name` of `backend` on the images in `images` (`default_image`
/// bookworm), with `extra` lines of settings.
pub fn image_runner(images: &Path, name: &str, backend: &str, extra: &str) -> String {
    format!(
        "[runners.{name}]\nbackend = \"{backend}\"\n[runners.{name}.settings]\nimages_dir = {:?}\ndefault_image = \"bookworm\"\n{extra}",
        images.display().to_string()
    )
}

/// The results of a conformance report (`--json`) that did not pass, as
/// `id verdict: detail` lines; a backend that does not claim to contain root
/// skips the containment section, which is not counted.
pub fn not_passed(report: &serde_json::Value) -> Vec<String> {
    report["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["verdict"] != "pass")
        .filter(|r| {
            !(r["verdict"] == "skip"
                && r["id"].as_str().is_some_and(|id| id.starts_with("containment."))
                && r["detail"].as_str().is_some_and(|d| d.contains("contains_root = false")))
        })
        .map(|r| format!("{} {}: {}", r["id"], r["verdict"], r["detail"]))
        .collect()
}

/// How many jobs have state under `state`, once what cleanups handed to the
/// background (nspawn removes a job's layer and state after the hook
/// returned) finished, or 30 s passed.
pub fn jobs_left(state: &Path) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let left = std::fs::read_dir(state.join("jobs")).map_or(0, |d| d.count());
        if left == 0 || std::time::Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A pipeline file holding `yaml`, in a temp dir that lives as long as the first value.
pub fn pipeline(yaml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ci.yml");
    std::fs::write(&file, yaml).unwrap();
    (dir, file)
}

/// The job's root as the host sees it: the base of the uid range in `uid_map` (`0 BASE 65536`).
pub fn mapped_base(log: &str) -> Option<u64> {
    log.lines().filter_map(|l| l.split("uid_map:").nth(1)).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() == 3 && fields[0] == "0" {
            // `0 0 4294967295` is host root: reported as base 0.
            fields[1].parse().ok()
        } else {
            None
        }
    })
}
