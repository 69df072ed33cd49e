use super::*;
use crate::job_names;
use crate::test_support::*;

#[test]
fn minimal_job_gets_defaults() {
    assert_eq!(
        job("build:\n  script: make\n", "build"),
        PipelineJob {
            name: "build".into(),
            stage: "test".into(),
            image: None,
            variables: Vec::new(),
            before_script: Vec::new(),
            script: strings(&["make"]),
            after_script: Vec::new(),
            timeout_secs: None,
            allow_failure: false,
            allow_failure_exit_codes: Vec::new(),
            node: None,
            rules: None,
            warnings: Vec::new(),
        }
    );
}

#[test]
fn full_job_with_unknown_keywords_ignored() {
    let text = r#"
stages: [build, test]
build:
  stage: build
  image: rust:1.85
  tags: [docker]
  rules:
    - if: $CI_COMMIT_BRANCH
  needs: []
  artifacts: {paths: [target/]}
  cache: {key: x, paths: [.cargo]}
  services: [postgres]
  retry: 2
  before_script: echo before
  script:
    - cargo build
    - cargo test
  after_script: [echo after]
  timeout: 1h 30m
  allow_failure: true
"#;
    let build = job(text, "build");
    assert_eq!(build.stage, "build");
    assert_eq!(build.image.as_deref(), Some("rust:1.85"));
    assert_eq!(build.before_script, strings(&["echo before"]));
    assert_eq!(build.script, strings(&["cargo build", "cargo test"]));
    assert_eq!(build.after_script, strings(&["echo after"]));
    assert_eq!(build.timeout_secs, Some(5400));
    assert!(build.allow_failure);
}

#[test]
fn missing_or_empty_script_is_an_error() {
    let e = error("j:\n  stage: build\n", "j");
    match &e {
        PipelineError::Invalid { path, job, key, .. } => {
            assert_eq!(path, Path::new("ci.yml"));
            assert_eq!(job, "j");
            assert_eq!(key, "script");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        e.to_string(),
        "ci.yml:1:1: job `j`: invalid `script`: the job has no `script:`; \
             add one (or `extends:` a template that has one)"
    );
    let e = error("j:\n  script: []\n", "j");
    assert!(e.to_string().contains("is empty"), "{e}");
    let e = error("j:\n  script:\n", "j");
    assert!(e.to_string().contains("has no `script:`"), "{e}");
}

#[test]
fn extends_chain_of_three_levels_deep_merges() {
    let text = r#"
.base:
  image: base-image
  variables: {A: base, B: base}
  before_script: [base before]
  script: [base script]
  timeout: 10m
.middle:
  extends: .base
  variables: {B: middle, C: middle}
  script: [middle script]
j:
  extends: .middle
  variables: {C: job, D: job}
  stage: build
"#;
    let j = job(text, "j");
    assert_eq!(j.image.as_deref(), Some("base-image"));
    assert_eq!(j.variables, vars(&[("A", "base"), ("B", "middle"), ("C", "job"), ("D", "job")]));
    assert_eq!(j.before_script, strings(&["base before"]));
    // Lists are replaced, not concatenated.
    assert_eq!(j.script, strings(&["middle script"]));
    assert_eq!(j.timeout_secs, Some(600));
    assert_eq!(j.stage, "build");
}

#[test]
fn extends_several_parents_later_wins_and_job_wins_over_all() {
    let text = r#"
.a:
  image: a
  stage: a
  variables: {X: a, Y: a}
  script: a
.b:
  image: b
  variables: {Y: b}
  allow_failure: true
j:
  extends: [.a, .b]
  stage: own
"#;
    let j = job(text, "j");
    assert_eq!(j.image.as_deref(), Some("b"));
    assert_eq!(j.stage, "own");
    assert_eq!(j.variables, vars(&[("X", "a"), ("Y", "b")]));
    assert_eq!(j.script, strings(&["a"]));
    assert!(j.allow_failure);
}

#[test]
fn extends_from_a_visible_job() {
    let text = "build:\n  script: make\n  image: gcc\ndebug:\n  extends: build\n";
    let debug = job(text, "debug");
    assert_eq!(debug.script, strings(&["make"]));
    assert_eq!(debug.image.as_deref(), Some("gcc"));
}

#[test]
fn extends_cycle_is_an_error() {
    let text = ".a:\n  extends: .b\n.b:\n  extends: .c\n.c:\n  extends: .a\nj:\n  extends: .a\n  script: x\n";
    match error(text, "j") {
        PipelineError::ExtendsCycle { job, chain, .. } => {
            assert_eq!(job, "j");
            assert_eq!(chain, strings(&["j", ".a", ".b", ".c", ".a"]));
        }
        other => panic!("{other:?}"),
    }
    let e = error("j:\n  extends: j\n  script: x\n", "j");
    assert_eq!(e.to_string(), "ci.yml:2:3: job `j`: `extends` forms a cycle (j -> j); remove one of the links");
}

#[test]
fn extends_missing_names_the_template() {
    let text = ".a:\n  extends: .gone\nj:\n  extends: [.a]\n  script: x\n";
    match error(text, "j") {
        PipelineError::ExtendsMissing { job, missing, includes, .. } => {
            assert_eq!(job, ".a");
            assert_eq!(missing, ".gone");
            assert!(!includes);
        }
        other => panic!("{other:?}"),
    }
    let with_include = format!("include: templates.yml\n{text}");
    let message = error(&with_include, "j").to_string();
    assert!(message.contains("`.a` extends `.gone`"), "{message}");
    assert!(message.contains("an `include:` that `berth exec` does not read"), "{message}");
}

#[test]
fn extends_depth_is_limited_to_eleven() {
    let chain = |levels: usize| {
        let mut text = String::from(".t0:\n  script: deep\n");
        for level in 1..levels {
            text.push_str(&format!(".t{level}:\n  extends: .t{}\n", level - 1));
        }
        text.push_str(&format!("j:\n  extends: .t{}\n", levels - 1));
        text
    };
    assert_eq!(job(&chain(MAX_EXTENDS_DEPTH), "j").script, strings(&["deep"]));
    // Also when the templates were extended (and cached) before the job.
    let mut text = chain(MAX_EXTENDS_DEPTH + 1);
    text.push_str("k:\n  script: !reference [.t11, script]\n");
    let mut resolver = Resolver::new(&text, path(), crate::Files::default()).unwrap();
    assert_eq!(resolver.job("k").unwrap().script, strings(&["deep"]));
    assert!(matches!(resolver.job("j"), Err(PipelineError::ExtendsTooDeep { .. })));
    match error(&chain(MAX_EXTENDS_DEPTH + 1), "j") {
        PipelineError::ExtendsTooDeep { job, chain, .. } => {
            assert_eq!(job, "j");
            assert_eq!(chain.len(), MAX_EXTENDS_DEPTH + 2);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn extends_of_the_wrong_shape() {
    let e = error("j:\n  extends: {a: b}\n  script: x\n", "j");
    assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "extends"), "{e:?}");
    let e = error(".t: just text\nj:\n  extends: .t\n  script: x\n", "j");
    assert!(e.to_string().contains("which is a string instead of a hash"), "{e}");
}

#[test]
fn references_in_scripts_are_inserted() {
    let text = r#"
.setup:
  script:
    - echo setup one
    - echo setup two
  after_script: [echo cleanup]
.tools:
  before_script:
    - !reference [.setup, script]
    - echo tools
j:
  before_script: !reference [.tools, before_script]
  script:
    - echo first
    - !reference [.setup, script]
    - echo last
  after_script:
    - !reference [.setup, after_script]
"#;
    let j = job(text, "j");
    assert_eq!(j.before_script, strings(&["echo setup one", "echo setup two", "echo tools"]));
    assert_eq!(j.script, strings(&["echo first", "echo setup one", "echo setup two", "echo last"]));
    assert_eq!(j.after_script, strings(&["echo cleanup"]));
}

#[test]
fn references_in_variables_image_and_through_extends() {
    let text = r#"
variables:
  GLOBAL: g
.vars:
  variables:
    A: a
    B: "2"
.images:
  image:
    name: registry/tool:1
.base:
  variables: {INHERITED: yes-from-base}
.child:
  extends: .base
j:
  image: !reference [.images, image, name]
  variables:
    ONE: !reference [.vars, variables, A]
    INH: !reference [.child, variables, INHERITED]
    TOP: !reference [variables, GLOBAL]
  script: x
k:
  variables: !reference [.vars, variables]
  image: !reference [.images, image]
  script: x
"#;
    let j = job(text, "j");
    assert_eq!(j.image.as_deref(), Some("registry/tool:1"));
    assert_eq!(j.variables, vars(&[("GLOBAL", "g"), ("ONE", "a"), ("INH", "yes-from-base"), ("TOP", "g")]));
    let k = job(text, "k");
    assert_eq!(k.image.as_deref(), Some("registry/tool:1"));
    assert_eq!(k.variables, vars(&[("GLOBAL", "g"), ("A", "a"), ("B", "2")]));
}

#[test]
fn references_are_resolved_after_extends() {
    // The job's `script` comes from `.t`, and its reference is resolved in
    // the extended job, as GitLab does.
    let text = r#"
.steps:
  script: [step]
.t:
  script:
    - !reference [.steps, script]
    - more
j:
  extends: .t
"#;
    assert_eq!(job(text, "j").script, strings(&["step", "more"]));
}

#[test]
fn bad_references() {
    let text = "j:\n  script: !reference [.nope, script]\n";
    match error(text, "j") {
        PipelineError::BadReference { job, reference, includes, .. } => {
            assert_eq!(job, "j");
            assert_eq!(reference, strings(&[".nope", "script"]));
            assert!(!includes);
        }
        other => panic!("{other:?}"),
    }
    let message = error(&format!("include: x.yml\n{text}"), "j").to_string();
    assert!(message.contains("`!reference [.nope, script]`"), "{message}");
    assert!(message.contains("not defined in this file"), "{message}");
    assert!(message.contains("an `include:` that `berth exec` does not read"), "{message}");

    let e = error(".t:\n  image: x\nj:\n  script: !reference [.t, script]\n", "j");
    assert!(e.to_string().contains("`.t` has no such key"), "{e}");

    let e = error(".t:\n  script: x\nj:\n  script: !reference [.t, script, deeper]\n", "j");
    assert!(e.to_string().contains("which is a string instead of a hash"), "{e}");

    let cycle = ".a:\n  script: !reference [.b, script]\n.b:\n  script: !reference [.a, script]\nj:\n  script: !reference [.a, script]\n";
    let e = error(cycle, "j");
    assert!(matches!(e, PipelineError::BadReference { .. }), "{e:?}");
    assert!(e.to_string().contains("cycle"), "{e}");

    let e = error("j:\n  script: !reference .t\n", "j");
    assert!(e.to_string().contains("must be a list of names"), "{e}");

    let e = error("j:\n  script: !custom [x]\n", "j");
    assert!(e.to_string().contains("`!custom` is not supported"), "{e}");
}

#[test]
fn references_in_default_and_global_keywords() {
    let text = r#"
.setup:
  script: [echo setup]
  variables: {FROM_TEMPLATE: t}
  image: template-image
variables: !reference [.setup, variables]
after_script: !reference [.setup, script]
default:
  before_script:
    - !reference [.setup, script]
    - echo default
  image: !reference [.setup, image]
j:
  script: x
"#;
    let j = job(text, "j");
    assert_eq!(j.before_script, strings(&["echo setup", "echo default"]));
    assert_eq!(j.after_script, strings(&["echo setup"]));
    assert_eq!(j.image.as_deref(), Some("template-image"));
    assert_eq!(j.variables, vars(&[("FROM_TEMPLATE", "t")]));
}

#[test]
fn default_and_legacy_globals_are_inherited() {
    let text = r#"
image: legacy-image
before_script: [legacy before]
after_script: legacy after
default:
  image: {name: default-image, entrypoint: [""]}
  before_script: [default before]
  timeout: 2h
  tags: [ignored]
plain:
  script: x
own:
  image: own-image
  before_script: []
  after_script: [own after]
  timeout: 5m
  script: x
"#;
    let plain = job(text, "plain");
    assert_eq!(plain.image.as_deref(), Some("default-image"));
    assert_eq!(plain.before_script, strings(&["default before"]));
    assert_eq!(plain.after_script, strings(&["legacy after"]));
    assert_eq!(plain.timeout_secs, Some(7200));
    let own = job(text, "own");
    assert_eq!(own.image.as_deref(), Some("own-image"));
    assert_eq!(own.before_script, Vec::<String>::new());
    assert_eq!(own.after_script, strings(&["own after"]));
    assert_eq!(own.timeout_secs, Some(300));

    let legacy = "image: legacy\nbefore_script: [b]\nj:\n  script: x\n";
    let j = job(legacy, "j");
    assert_eq!(j.image.as_deref(), Some("legacy"));
    assert_eq!(j.before_script, strings(&["b"]));
}

#[test]
fn inherit_controls_defaults_and_variables() {
    let text = r#"
image: legacy
variables: {A: a, B: b, C: c}
default:
  before_script: [default before]
  after_script: [default after]
  timeout: 1h
none:
  inherit: {default: false, variables: false}
  variables: {OWN: o}
  script: x
some:
  inherit:
    default: [after_script, image]
    variables: [C, A]
  script: x
all:
  inherit: {default: true, variables: true}
  script: x
"#;
    let none = job(text, "none");
    assert_eq!(none.image, None);
    assert!(none.before_script.is_empty());
    assert!(none.after_script.is_empty());
    assert_eq!(none.timeout_secs, None);
    assert_eq!(none.variables, vars(&[("OWN", "o")]));

    let some = job(text, "some");
    assert_eq!(some.image.as_deref(), Some("legacy"));
    assert!(some.before_script.is_empty());
    assert_eq!(some.after_script, strings(&["default after"]));
    assert_eq!(some.timeout_secs, None);
    assert_eq!(some.variables, vars(&[("A", "a"), ("C", "c")]));

    let all = job(text, "all");
    assert_eq!(all.before_script, strings(&["default before"]));
    assert_eq!(all.timeout_secs, Some(3600));
    assert_eq!(all.variables.len(), 3);

    let e = error("j:\n  inherit: {defaults: false}\n  script: x\n", "j");
    assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "inherit"), "{e:?}");
    let e = error("j:\n  inherit: {variables: maybe}\n  script: x\n", "j");
    assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "inherit:variables"), "{e:?}");
}

#[test]
fn stage_must_be_a_name() {
    assert_eq!(job("j:\n  stage: .pre\n  script: x\n", "j").stage, ".pre");
    let e = error("j:\n  stage: [a]\n  script: x\n", "j");
    assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "stage"), "{e:?}");
}

const MANY_JOBS: &str = r#"
stages: [build, test, deploy]
variables: {A: a}
default:
  image: alpine
workflow:
  rules: [{when: always}]
.hidden:
  script: hidden
build:
  script: make
test:
  extends: .hidden
downstream:
  trigger: other/project
pages:
  script: publish
"#;

#[test]
fn job_names_lists_runnable_jobs_in_file_order() {
    assert_eq!(job_names(MANY_JOBS, path()).unwrap().jobs, strings(&["build", "test", "pages"]));
    assert_eq!(job_names("", path()).unwrap().jobs, Vec::<String>::new());
}

#[test]
fn no_such_job_lists_the_available_ones() {
    match error(MANY_JOBS, "deploy") {
        PipelineError::NoSuchJob { job, available, includes, .. } => {
            assert_eq!(job, "deploy");
            assert_eq!(available, strings(&["build", "test", "pages"]));
            assert!(!includes);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        error(MANY_JOBS, "deploy").to_string(),
        "ci.yml: there is no job `deploy` to run; run one of: build, test, pages"
    );
    let hidden = error(MANY_JOBS, ".hidden").to_string();
    assert!(hidden.contains("hidden templates"), "{hidden}");
    let keyword = error(MANY_JOBS, "variables").to_string();
    assert!(keyword.contains("`variables` is a global keyword"), "{keyword}");
    let e = error("", "j").to_string();
    assert!(e.contains("defines no runnable jobs"), "{e}");
}

#[test]
fn no_such_job_mentions_includes() {
    let text = "include:\n  - local: ci/build.yml\nlint:\n  script: lint\n";
    assert_eq!(job(text, "lint").script, strings(&["lint"]));
    let message = error(text, "build").to_string();
    assert!(message.contains("run one of: lint"), "{message}");
    assert!(message.contains("an `include:` that `berth exec` does not read"), "{message}");
}

#[test]
fn trigger_jobs_cannot_run() {
    let e = error(MANY_JOBS, "downstream");
    assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "trigger"), "{e:?}");
    assert!(e.to_string().contains("trigger job"), "{e}");
}

#[test]
fn a_job_must_be_a_hash() {
    let e = error("j: make\n", "j");
    assert!(matches!(&e, PipelineError::Invalid { key, .. } if key.is_empty()), "{e:?}");
    assert_eq!(
        e.to_string(),
        "ci.yml:1:1: job `j`: the job is a string, but a job is a hash of keywords like `script:`"
    );
}

/// <https://docs.gitlab.com/ci/yaml/#parallel>: `parallel: N` makes jobs
/// `name 1/N` ... `name N/N`, and only those.
#[test]
fn parallel_n_makes_numbered_jobs() {
    let text = "test:\n  parallel: 3\n  script: x\nlint:\n  script: y\n";
    assert_eq!(job_names(text, path()).unwrap().jobs, strings(&["test 1/3", "test 2/3", "test 3/3", "lint"]));
    let second = job(text, "test 2/3");
    assert_eq!((second.name.as_str(), second.node), ("test 2/3", Some((2, 3))));
    assert_eq!(job(text, "lint").node, None);
    let e = error(text, "test");
    assert!(e.to_string().contains("run one of: test 1/3, test 2/3, test 3/3, lint"), "{e}");
    for bad in ["0", "201", "two", "{matrix: []}", "{other: 1}"] {
        let e = error(&format!("t:\n  parallel: {bad}\n  script: x\n"), "t 1/1");
        assert!(
            matches!(&e, PipelineError::Invalid { key, .. } if key == "parallel") || e.to_string().contains("no job"),
            "{bad}: {e}"
        );
    }
    let e = error("t:\n  parallel: 0\n  script: x\n", "t");
    assert!(e.to_string().contains("ci.yml:2:3: job `t`: invalid `parallel`: must be a number from 1 to 200"), "{e}");
}

/// <https://docs.gitlab.com/ci/yaml/#parallelmatrix>: one job per combination
/// of each entry, entries in order, named `job: [v1, v2]` with the values in
/// the entry's order (GitLab's `Normalizer::MatrixStrategy#name`); the matrix
/// variables replace the job's own; they come through `extends` too.
#[test]
fn parallel_matrix_makes_one_job_per_combination() {
    let text = r#"
.matrix:
  parallel:
    matrix:
      - PROVIDER: aws
        STACK: [monitoring, app1]
      - PROVIDER: [gcp, vultr]
        STACK: data
test:linux:
  extends: .matrix
  image: $PROVIDER-image
  variables: {STACK: own, KEEP: k}
  script: x
"#;
    assert_eq!(
        job_names(text, path()).unwrap().jobs,
        strings(&[
            "test:linux: [aws, monitoring]",
            "test:linux: [aws, app1]",
            "test:linux: [gcp, data]",
            "test:linux: [vultr, data]"
        ])
    );
    let j = job(text, "test:linux: [gcp, data]");
    assert_eq!(j.node, Some((3, 4)));
    assert_eq!(j.variables, vars(&[("STACK", "data"), ("KEEP", "k"), ("PROVIDER", "gcp")]));
    assert_eq!(j.image.as_deref(), Some("$PROVIDER-image"), "expanded by the runner, not here");
    let big = "t:\n  parallel:\n    matrix:\n      - A: [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]\n        B: [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]\n  script: x\n";
    let e = error(big, "t: [1, 1]");
    assert!(e.to_string().contains("more than 200 jobs"), "{e}");
}

/// <https://docs.gitlab.com/ci/yaml/includes/>: `include: local:` files are
/// read from the project's root, each with its own anchors and includes;
/// the including file is merged over them; other kinds are named, not fetched.
#[test]
fn local_includes_are_merged_and_other_kinds_named() {
    let in_project = |dir| crate::Files { project: Some(dir), include_dir: None };
    let project = tempfile::tempdir().unwrap();
    let dir = project.path();
    std::fs::create_dir_all(dir.join("ci")).unwrap();
    std::fs::write(
        dir.join("ci/templates.yml"),
        "include: ci/deeper.yml\n.base: &base\n  image: alpine\n  variables: {A: from-template, B: b}\nbuild:\n  <<: *base\n  script: make\n",
    )
    .unwrap();
    std::fs::write(dir.join("ci/deeper.yml"), "lint:\n  script: lint\n").unwrap();
    let main = "include:\n  - local: /ci/templates.yml\n  - remote: https://example.invalid/x.yml\n  - project: group/p\n    file: t.yml\nbuild:\n  variables: {A: main}\ntest:\n  extends: .base\n  script: test\n";
    let file = dir.join(".gitlab-ci.yml");
    std::fs::write(&file, main).unwrap();
    let list = crate::list_in(&file, in_project(dir)).unwrap();
    assert_eq!(list.jobs, strings(&["lint", "build", "test"]));
    assert_eq!(list.included, [("lint".to_owned(), "local: ci/deeper.yml".to_owned())]);
    assert_eq!(list.unread_includes.len(), 2, "{:?}", list.unread_includes);
    assert!(list.unread_includes[0].contains("remote: https://example.invalid/x.yml"), "{:?}", list.unread_includes);
    let build = crate::load_in(&file, in_project(dir), "build").unwrap();
    assert_eq!(build.image.as_deref(), Some("alpine"));
    assert_eq!(build.variables, vars(&[("A", "main"), ("B", "b")]));
    assert_eq!(crate::load_in(&file, in_project(dir), "test").unwrap().script, strings(&["test"]));
    // Without a project directory, the local include is not read either.
    let e = crate::load_in(&file, crate::Files::default(), "test").unwrap_err();
    assert!(e.to_string().contains("`.base`, which is not defined") && e.to_string().contains("`include:`"), "{e}");
    // A job whose script lives in an unread include says so.
    let e = error("include: {remote: 'https://x.invalid/t.yml'}\nj:\n  extends: []\n  stage: test\n", "j");
    assert!(e.to_string().contains("its template may be in an `include:`"), "{e}");
    // A missing local file is an error naming the include.
    std::fs::write(&file, "include: gone.yml\nj:\n  script: x\n").unwrap();
    let e = crate::load_in(&file, in_project(dir), "j").unwrap_err();
    assert!(e.to_string().contains(".gitlab-ci.yml:1:1: `include: local: gone.yml` cannot be read"), "{e}");
}

/// `remote:`, `project:` and `template:` includes
/// (<https://docs.gitlab.com/ci/yaml/#include>) are read from their copies
/// in `--include-dir`: `<host>/<path>`, `<project>/<file>`,
/// `templates/<name>`; a missing copy is named with where to put it.
#[test]
fn other_includes_are_read_from_copies_in_the_include_dir() {
    let scratch = tempfile::tempdir().unwrap();
    let (project, copies) = (scratch.path().join("p"), scratch.path().join("copies"));
    for (file, text) in [
        ("example.com/ci/remote.yml", ".remote:\n  image: from-remote\n"),
        ("group/lib/ci/a.yml", "lib-a:\n  script: a\n"),
        ("group/lib/ci/b.yml", "lib-b:\n  script: b\n"),
        ("templates/Tmpl.gitlab-ci.yml", "tmpl:\n  script: t\n"),
    ] {
        let path = copies.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    std::fs::create_dir_all(&project).unwrap();
    let file = project.join(".gitlab-ci.yml");
    std::fs::write(
        &file,
        "include:\n  - remote: 'https://example.com/ci/remote.yml?ref=main'\n  - project: group/lib\n    file: [/ci/a.yml, ci/b.yml]\n  - template: Tmpl.gitlab-ci.yml\n  - remote: https://example.com/gone.yml\n  - component: example.com/g/c@1.0\nj:\n  extends: .remote\n  script: x\n",
    )
    .unwrap();
    let files = crate::Files { project: Some(&project), include_dir: Some(&copies) };
    let list = crate::list_in(&file, files).unwrap();
    assert_eq!(list.jobs, strings(&["lib-a", "lib-b", "tmpl", "j"]));
    assert!(
        list.included.iter().any(|(job, from)| job == "lib-a" && from.contains("project: group/lib")),
        "{:?}",
        list.included
    );
    assert_eq!(list.unread_includes.len(), 2, "{:?}", list.unread_includes);
    assert!(
        list.unread_includes[0].contains("put a copy at DIR/example.com/gone.yml and pass --include-dir DIR"),
        "{:?}",
        list.unread_includes
    );
    assert!(
        list.unread_includes[1].contains("component: example.com/g/c@1.0")
            && list.unread_includes[1].contains("not supported"),
        "{:?}",
        list.unread_includes
    );
    assert_eq!(crate::load_in(&file, files, "j").unwrap().image.as_deref(), Some("from-remote"));
    // Without the directory, each is named with where its copy goes.
    let list = crate::list_in(&file, crate::Files { project: Some(&project), include_dir: None }).unwrap();
    assert!(list.unread_includes.iter().any(|u| u.contains("DIR/group/lib/ci/b.yml")), "{:?}", list.unread_includes);
    assert!(
        list.unread_includes.iter().any(|u| u.contains("DIR/templates/Tmpl.gitlab-ci.yml")),
        "{:?}",
        list.unread_includes
    );
    // A copy path never leaves the directory.
    let outside = serde_norway::Value::String("https://h/../../etc/passwd".into());
    assert_eq!(crate::include::copy_paths(&outside), Vec::<std::path::PathBuf>::new());
}

/// A refusal about a job or template an included file defines names that
/// file and the keyword's position in it, not the including file.
#[test]
fn refusals_about_included_jobs_name_the_included_file_and_position() {
    let project = tempfile::tempdir().unwrap();
    let dir = project.path();
    std::fs::write(
        dir.join("jobs.yml"),
        "# jobs\nbroken:\n  script: x\n  image: [not, a, name]\ngone:\n  extends: .nowhere\n",
    )
    .unwrap();
    let file = dir.join(".gitlab-ci.yml");
    std::fs::write(&file, "include: jobs.yml\nfine:\n  script: x\n").unwrap();
    let files = crate::Files { project: Some(dir), include_dir: None };
    let e = crate::load_in(&file, files, "broken").unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}:4:3: job `broken`", dir.join("jobs.yml").display())), "{e}");
    let e = crate::load_in(&file, files, "gone").unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}:6:3: `gone` extends `.nowhere`", dir.join("jobs.yml").display())), "{e}");
}
