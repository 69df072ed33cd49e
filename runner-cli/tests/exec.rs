//! `berth exec`: whole jobs through the full protocol.

use crate::util::*;

#[test]
fn a_dry_run_job_shows_every_stage_decoded_and_succeeds() {
    let env = Env::new(DRY_RUN);
    let out = env.exec_sample("demo", "test", &[]);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    for stage in ["prepare_script", "get_sources", "build_script", "after_script"] {
        assert!(log.contains(&format!("stage {stage}")), "{stage} missing:\n{log}");
    }
    assert!(log.contains("echo \"$GREETING from $TARGET on $(hostname)\""), "decoded commands:\n{log}");
    assert!(!log.contains("eval $'"), "the script is shown decoded:\n{log}");
    assert!(log.contains("Using Custom executor with driver dry-run"), "{log}");
    assert!(String::from_utf8_lossy(&out.stdout).trim_end().ends_with("Job succeeded"), "{log}");
}

#[test]
fn a_dry_run_failure_of_42_is_reported_with_gitlabs_wording() {
    let env = Env::new(DRY_RUN_FAIL_42);
    let out = env.exec_sample("fail42", "test", &[]);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(String::from_utf8_lossy(&out.stdout).trim_end().ends_with("ERROR: Job failed: exit code 42"), "{log}");
    assert!(log.contains("stage after_script"), "after_script still runs:\n{log}");
}

#[test]
fn a_system_failure_in_prepare_is_retried_three_times_then_reported() {
    let env = Env::new("[runners.sys]\nbackend = \"dry-run\"\n[runners.sys.settings]\nfail_stage = \"prepare\"\nfail_kind = \"system\"\n");
    let out = env.exec_sample("sys", "test", &[]);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(2), "{log}");
    assert_eq!(log.matches("Preparing environment").count(), 3, "{log}");
    assert!(log.contains("ERROR: Job failed (system failure):"), "{log}");
    assert!(!log.contains("stage build_script"), "{log}");
}

#[test]
fn real_scripts_run_with_sources_and_exit_codes() {
    let env = Env::new(HOST);
    let out = env.exec_sample("host", "test", &[]);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("hello from berth"), "{log}");
    assert!(log.contains("carried into the job by berth exec"), "sources arrived:\n{log}");
    assert!(log.contains("after_script sees CI_JOB_STATUS=success"), "{log}");

    let out = env.exec_sample("host", "fails", &[]);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("after_script sees CI_JOB_STATUS=failed"), "{log}");
    assert!(String::from_utf8_lossy(&out.stdout).trim_end().ends_with("ERROR: Job failed: exit code 42"), "{log}");
    assert_eq!(std::fs::read_dir(env.state().join("jobs")).unwrap().count(), 0, "cleanup ran");
}

#[test]
fn masked_variables_stay_out_of_the_log() {
    let env = Env::new(DRY_RUN);
    let out = env.exec_sample(
        "demo",
        "test",
        &["--masked-var", "DEPLOY_TOKEN=glpat-very-secret-123", "--var", "PLAIN=visible-value"],
    );
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(!log.contains("glpat-very-secret-123"), "{log}");
    assert!(log.contains("DEPLOY_TOKEN=[MASKED]"), "{log}");
    assert!(log.contains("PLAIN=visible-value"), "{log}");
    let logs = env.state().join("logs/dry-run");
    for entry in std::fs::read_dir(&logs).unwrap() {
        let transcript = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        assert!(!transcript.contains("glpat-very-secret-123"));
    }
    // The job log says where its transcript is, without -v.
    let named = log.lines().find_map(|l| l.strip_prefix("Transcript of this job: ")).unwrap_or_default();
    assert!(named.starts_with(logs.to_str().unwrap()) && std::path::Path::new(named).is_file(), "{log}");
}

#[test]
fn an_unknown_job_lists_the_available_ones() {
    let env = Env::new(DRY_RUN);
    let out = env.exec_sample("demo", "nosuchjob", &[]);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(2), "{log}");
    assert!(log.contains("nosuchjob") && log.contains("test") && log.contains("fails"), "{log}");
}

#[test]
fn ctrl_c_cancels_the_running_step_then_after_script_and_cleanup_run() {
    let env = Env::new(HOST);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(".gitlab-ci.yml");
    std::fs::write(
        &file,
        "slow:\n  script:\n    - echo started\n    - sleep 30\n  after_script:\n    - echo \"after=$CI_JOB_STATUS\"\n",
    )
    .unwrap();
    let child = env
        .berth("host")
        .args(["exec", "--no-sources", "--file", file.to_str().unwrap(), "slow"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let started = std::time::Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    let log = text(&out);
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "took {:?}\n{log}", started.elapsed());
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("after=canceled"), "{log}");
    assert!(String::from_utf8_lossy(&out.stdout).trim_end().ends_with("ERROR: Job failed: canceled"), "{log}");
    assert_eq!(std::fs::read_dir(env.state().join("jobs")).unwrap().count(), 0, "cleanup ran:\n{log}");
}

#[test]
fn a_pipeline_below_the_root_of_its_work_tree_says_which_files_the_job_gets() {
    let env = Env::new(DRY_RUN);
    let hello = repo().join("examples/hello");
    let out = env.berth("demo").current_dir(&hello).args(["exec", "--retry-delay-ms", "50", "test"]).output().unwrap();
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    let shown = std::fs::canonicalize(&hello).unwrap();
    let note = format!("(the pipeline file is in examples/hello/ of it); --sources {}", shown.display());
    assert!(log.contains("Project files: the git work tree") && log.contains(&note), "{log}");
    // With --sources, as the quick start runs it, nothing to say.
    let out = env.exec_sample("demo", "test", &[]);
    assert!(!text(&out).contains("Project files:"), "{}", text(&out));
}

#[test]
fn masked_values_are_hidden_in_the_jobs_own_output_too() {
    let env = Env::new(HOST);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(".gitlab-ci.yml");
    std::fs::write(
        &file,
        "show:\n  script:\n    - echo \"token is $DEPLOY_TOKEN\"\n    - echo \"to stderr=$DEPLOY_TOKEN\" >&2\n    - printf 'no newline=%s' \"$DEPLOY_TOKEN\"\n",
    )
    .unwrap();
    let out = env
        .berth("host")
        .args(["exec", "--retry-delay-ms", "50", "--no-sources", "--file"])
        .arg(&file)
        .args(["--masked-var", "DEPLOY_TOKEN=glpat-very-secret-123", "show"])
        .output()
        .unwrap();
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(!log.contains("glpat-very-secret-123"), "{log}");
    for shown in ["token is [MASKED]", "to stderr=[MASKED]", "no newline=[MASKED]"] {
        assert!(log.contains(shown), "{shown:?} missing:\n{log}");
    }
}

/// gitlab-runner hands prepare and run one writer for stdout and stderr (so
/// one pipe): the job log keeps the order the job wrote its lines in.
#[test]
fn the_jobs_stdout_and_stderr_reach_the_log_in_the_order_they_were_written() {
    let env = Env::new(HOST);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ci.yml");
    std::fs::write(
        &file,
        "probe:\n  script:\n    - for i in 1 2 3 4 5; do echo out-$i; echo err-$i >&2; done\n    - echo after-the-loop\n",
    )
    .unwrap();
    let out =
        env.berth("host").args(["exec", "--no-sources", "--file", file.to_str().unwrap(), "probe"]).output().unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("out-") || l.starts_with("err-")).collect();
    let want: Vec<String> = (1..=5).flat_map(|i| [format!("out-{i}"), format!("err-{i}")]).collect();
    assert_eq!(lines, want, "{log}");
    let loop_end = log.find("err-5").unwrap();
    assert!(log[loop_end..].contains("$ echo after-the-loop"), "the next command's echo comes after: {log}");
}

/// A pipeline file in a scratch directory, run with `berth exec --backend dry-run --no-sources`.
fn dry_run_exec(pipeline: &str, args: &[&str]) -> (std::process::Output, String) {
    let env = Env::new("");
    let file = env.dir.path().join(".gitlab-ci.yml");
    std::fs::write(&file, pipeline).unwrap();
    let out = std::process::Command::new(BERTH)
        .arg("--config")
        .arg(env.config())
        .env_remove("BERTH_RUNNER")
        .env_remove("BERTH_LOG")
        .env("XDG_STATE_HOME", env.state())
        .args(["exec", "--backend", "dry-run", "--retry-delay-ms", "50", "--no-sources", "--file"])
        .arg(&file)
        .args(args)
        .output()
        .unwrap();
    let log = text(&out);
    (out, log)
}

/// gitlab-runner expands variables in variable values and in the image name
/// (https://docs.gitlab.com/ci/variables/#use-cicd-variables-in-other-variables,
/// https://docs.gitlab.com/ci/variables/where_variables_can_be_used/).
#[test]
fn variables_and_the_image_are_expanded_as_the_runner_does() {
    let pipeline = r#"
variables:
  IMG: alpine
  GOPATH: $CI_PROJECT_DIR/.GOPATH
  PRICE: "5$$ and $NOPE."
  KEEP:
    value: $IMG literally
    expand: false
j:
  image: ${IMG}:$TAG
  variables:
    IMG: debian
  script: [echo $GOPATH]
"#;
    let (out, log) = dry_run_exec(pipeline, &["--var", "TAG=3.20", "j"]);
    assert_eq!(out.status.code(), Some(0), "{log}");
    for line in [
        "Image: debian:3.20",
        "  CI_JOB_IMAGE=debian:3.20",
        "  GOPATH=/builds/local/",
        "  PRICE=5$ and .",
        "  KEEP=$IMG literally",
    ] {
        assert!(log.contains(line), "{line:?} missing:\n{log}");
    }
    assert!(log.contains("/.GOPATH\n"), "{log}");
    // An image naming only undefined variables falls back to the runner's default.
    let (out, log) = dry_run_exec("j:\n  image: $UNSET\n  script: [echo]\n", &["j"]);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("WARNING: the job's image `$UNSET` expands to nothing"), "{log}");
}

/// `parallel: matrix:` jobs are listed and run by GitLab's names, with their
/// matrix variables feeding the image (https://docs.gitlab.com/ci/yaml/#parallelmatrix).
#[test]
fn matrix_jobs_are_listed_and_run_by_their_gitlab_names() {
    let pipeline = r#"
test:linux:
  image: $DISTRO
  parallel:
    matrix:
      - HASH: [linux-sha1, linux-sha256]
        DISTRO: ubuntu:rolling
        CC: clang
  script: [echo "$HASH"]
shard:
  parallel: 2
  script: [echo]
"#;
    let (out, log) = dry_run_exec(pipeline, &["--list"]);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().collect::<Vec<_>>(),
        [
            "test:linux: [linux-sha1, ubuntu:rolling, clang]",
            "test:linux: [linux-sha256, ubuntu:rolling, clang]",
            "shard 1/2",
            "shard 2/2"
        ]
    );
    let (out, log) = dry_run_exec(pipeline, &["test:linux: [linux-sha256, ubuntu:rolling, clang]"]);
    assert_eq!(out.status.code(), Some(0), "{log}");
    for line in ["Image: ubuntu:rolling", "  HASH=linux-sha256", "  CI_NODE_INDEX=2", "  CI_NODE_TOTAL=2"] {
        assert!(log.contains(line), "{line:?} missing:\n{log}");
    }
    let (out, log) = dry_run_exec(pipeline, &["shard 2/2"]);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("  CI_NODE_INDEX=2") && log.contains("  CI_NODE_TOTAL=2"), "{log}");
}

/// `include: local:` files come from the project's root; `--list` says which
/// jobs come from them and which includes are not read
/// (https://docs.gitlab.com/ci/yaml/includes/).
#[test]
fn local_includes_are_read_and_listed() {
    let env = Env::new("");
    let project = env.dir.path().join("project");
    std::fs::create_dir_all(project.join("ci")).unwrap();
    std::fs::write(project.join("ci/jobs.yml"), ".tmpl:\n  image: $BASE\nfrom-include:\n  script: [echo included]\n")
        .unwrap();
    std::fs::write(
        project.join(".gitlab-ci.yml"),
        "include:\n  - local: ci/jobs.yml\n  - template: Jobs/Build.gitlab-ci.yml\nvariables:\n  BASE: alpine\nmain:\n  extends: .tmpl\n  script: [echo main]\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(BERTH)
            .arg("--config")
            .arg(env.config())
            .env_remove("BERTH_RUNNER")
            .env_remove("BERTH_LOG")
            .env("XDG_STATE_HOME", env.state())
            .args(["exec", "--backend", "dry-run", "--retry-delay-ms", "50", "--sources"])
            .arg(&project)
            .arg("--file")
            .arg(project.join(".gitlab-ci.yml"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--list"]);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().collect::<Vec<_>>(), ["from-include", "main"]);
    assert!(log.contains("job \"from-include\" comes from `include: local: ci/jobs.yml`"), "{log}");
    assert!(log.contains("not read") && log.contains("template: Jobs/Build.gitlab-ci.yml"), "{log}");
    let out = run(&["main"]);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("Image: alpine"), "{log}");
}

/// `rules:` decide whether GitLab would create the job, with the variables
/// given; `--ignore-rules` runs it anyway (https://docs.gitlab.com/ci/yaml/#rules).
#[test]
fn rules_decide_whether_the_job_runs() {
    let pipeline = r#"
deploy:
  rules:
    - if: $CI_COMMIT_BRANCH == "main" && $CI_PIPELINE_SOURCE =~ /^(push|web)$/
      variables: {TARGET: production}
    - if: $CI_COMMIT_BRANCH =~ /^release-/
      when: manual
  variables: {TARGET: staging}
  script: [echo "$TARGET"]
"#;
    let (out, log) =
        dry_run_exec(pipeline, &["--var", "CI_COMMIT_BRANCH=main", "--var", "CI_PIPELINE_SOURCE=push", "deploy"]);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("Rules: GitLab would create this job: rule 1 (`if: $CI_COMMIT_BRANCH"), "{log}");
    assert!(log.contains("  TARGET=production"), "{log}");
    let (out, log) = dry_run_exec(pipeline, &["--var", "CI_COMMIT_BRANCH=feature", "deploy"]);
    assert_eq!(out.status.code(), Some(2), "{log}");
    assert!(
        log.contains("GitLab would not create this job: no rule matches") && log.contains("--ignore-rules"),
        "{log}"
    );
    let (out, log) = dry_run_exec(pipeline, &["--var", "CI_COMMIT_BRANCH=feature", "--ignore-rules", "deploy"]);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("  TARGET=staging"), "{log}");
}

/// A `project:` include is read from its copy in `--include-dir`; without
/// it, `--list` says where the copy goes.
#[test]
fn exec_reads_project_includes_from_the_include_dir() {
    let copies = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(copies.path().join("group/ci-templates")).unwrap();
    std::fs::write(
        copies.path().join("group/ci-templates/build.yml"),
        ".build:\n  image: from-template\n  script:\n    - echo built-by-template\n",
    )
    .unwrap();
    let pipeline = "include:\n  - project: group/ci-templates\n    file: build.yml\nbuild:\n  extends: .build\n";
    let dir = copies.path().to_str().unwrap();
    let (out, log) = dry_run_exec(pipeline, &["--include-dir", dir, "build"]);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("echo built-by-template") && log.contains("from-template"), "{log}");
    let (out, log) = dry_run_exec(pipeline, &["--list"]);
    assert!(!out.status.success(), "no runnable job without the template: {log}");
    assert!(
        log.contains("note: job \"build\" cannot run here:") && !String::from_utf8_lossy(&out.stdout).contains("build"),
        "{log}"
    );
    assert!(log.contains("put a copy at DIR/group/ci-templates/build.yml and pass --include-dir DIR"), "{log}");
}
