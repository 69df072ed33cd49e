//! The JSON Schemas of `schema/` (one per ABI document) against what this
//! crate really writes, edge cases included, and against documents they must
//! refuse: a schema that accepts anything would pass the first half alone.

use serde_json::{json, Value};

use super::*;
use crate::{Capabilities, Description, Isolation, JobResponse, ResponseVariable, StateDir};

/// Every schema file, by document.
const SCHEMAS: &[&str] = &["config", "description", "job", "known", "reap-output", "runner", "settings", "state"];

fn validator(name: &str) -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema").join(format!("{name}.schema.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let schema: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(schema["$schema"], "https://json-schema.org/draft/2020-12/schema", "{name}");
    jsonschema::draft202012::meta::validate(&schema).unwrap_or_else(|e| panic!("{name} is no valid schema: {e}"));
    jsonschema::draft202012::new(&schema).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Asserts that `value`, serialized as the ABI sends it, fits schema `name`.
fn accepts(name: &str, value: &impl Serialize) -> Value {
    let json = serde_json::to_value(value).unwrap();
    let validator = validator(name);
    let errors: Vec<String> = validator.iter_errors(&json).map(|e| format!("{e} (at {})", e.instance_path())).collect();
    assert!(errors.is_empty(), "{name} refuses what berth writes: {}\n{json:#}", errors.join("; "));
    json
}

/// Asserts that schema `name` refuses `json` (`why` says what is wrong with it).
fn refuses(name: &str, json: Value, why: &str) {
    assert!(!validator(name).is_valid(&json), "{name} accepts a document where {why}: {json:#}");
}

/// `json` with the member at `pointer` (`/a/b`) replaced by `value`, or removed when `None`.
fn with(json: &Value, pointer: &str, value: Option<Value>) -> Value {
    let mut json = json.clone();
    let (parent, last) = pointer.rsplit_once('/').unwrap();
    let target = json.pointer_mut(parent).unwrap_or_else(|| panic!("no {parent}"));
    match (target, value) {
        (Value::Object(map), Some(value)) => drop(map.insert(last.to_owned(), value)),
        (Value::Object(map), None) => assert!(map.remove(last).is_some(), "no {pointer}"),
        (Value::Array(items), Some(value)) => items[last.parse::<usize>().unwrap()] = value,
        (other, _) => panic!("{pointer}: {other}"),
    }
    json
}

#[test]
fn every_schema_file_is_tested() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter_map(|name| name.strip_suffix(".schema.json").map(str::to_owned))
        .collect();
    files.sort();
    assert_eq!(files, SCHEMAS);
    for name in SCHEMAS {
        let schema: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.schema.json"))).unwrap()).unwrap();
        assert_eq!(schema["$id"], format!("urn:berth:backend-abi:1:{name}"));
    }
}

/// Every isolation level: a level added later stops this match from
/// compiling until it is listed here and in `description.schema.json`.
fn every_isolation() -> Vec<Isolation> {
    let all =
        [Isolation::None, Isolation::Host, Isolation::Filesystem, Isolation::Container, Isolation::VirtualMachine];
    for level in all {
        match level {
            Isolation::None
            | Isolation::Host
            | Isolation::Filesystem
            | Isolation::Container
            | Isolation::VirtualMachine => {}
        }
    }
    all.to_vec()
}

#[test]
fn descriptions_fit_their_schema() {
    let mut last = Value::Null;
    for isolation in every_isolation() {
        for bits in 0..64u8 {
            let bit = |n: u8| bits & (1 << n) != 0;
            let description = Description::new("mine", "1.2.3-rc.1", "").isolation(isolation).capabilities(
                Capabilities::none()
                    .executes_scripts(bit(0))
                    .cancel(bit(1))
                    .reap(bit(2))
                    .images(bit(3))
                    .concurrent_jobs(bit(4))
                    .contains_root(bit(5)),
            );
            last = accepts("description", &description);
        }
    }
    accepts("description", &crate::testing::FakeBackend::default().describe());
    // A plugin built before contains_root existed leaves it out.
    let old = with(&last, "/capabilities/contains_root", None);
    assert!(validator("description").is_valid(&old));
    refuses("description", with(&last, "/isolation", Some(json!("namespaces"))), "the isolation is unknown");
    refuses("description", with(&last, "/isolation", Some(json!("Host"))), "the isolation is not kebab-case");
    refuses("description", with(&last, "/name", Some(json!(""))), "the name is empty");
    refuses("description", with(&last, "/capabilities", None), "capabilities are missing");
    refuses("description", with(&last, "/capabilities/cancel", None), "a capability is missing");
    refuses("description", with(&last, "/capabilities/cancel", Some(json!("true"))), "a capability is a string");
    refuses("description", with(&last, "/capabilities/teleport", Some(json!(true))), "a capability is unknown");
    refuses("description", with(&last, "/colour", Some(json!("blue"))), "a member is unknown");
}

#[test]
fn config_outputs_fit_their_schema_and_the_smallest_is_read_back() {
    accepts("config", &ConfigDoc::default());
    let mut output = ConfigOutput::with_dirs("/builds", "/cache");
    output.builds_dir_is_shared = Some(false);
    output.hostname = Some("berth-demo-7".into());
    output.job_env.insert("GIT_SSL_CAINFO".into(), "/etc/ssl/ca.pem".into());
    output.shell = Some("bash".into());
    let full = accepts("config", &ConfigDoc { warnings: vec!["no disk_max on this host".into()], output });
    // What a plugin may write: nothing at all, or only part.
    for text in [r#"{}"#, r#"{"output":{}}"#, r#"{"warnings":[]}"#] {
        let json: Value = serde_json::from_str(text).unwrap();
        assert!(validator("config").is_valid(&json), "{text}");
        let doc: ConfigDoc = serde_json::from_value(json).unwrap();
        assert_eq!(doc.output, ConfigOutput::default());
    }
    refuses("config", with(&full, "/output/builds_dir", Some(json!("builds"))), "builds_dir is relative");
    refuses("config", with(&full, "/output/shell", Some(json!("sh"))), "the shell is not bash");
    refuses("config", with(&full, "/output/job_env/N", Some(json!(1))), "a job_env value is a number");
    refuses("config", with(&full, "/output/image", Some(json!("x"))), "an output member is unknown");
    refuses("config", with(&full, "/warnings", Some(json!("one"))), "warnings is not a list");
}

#[test]
fn runner_documents_fit_their_schema() {
    let plain = accepts("runner", &RunnerInfo::new("demo", "/var/lib/berth"));
    let mut info = RunnerInfo::new(&*"r".repeat(32), "/srv/berth");
    info.builds_dir = Some("/builds".into());
    info.cache_dir = Some("/cache".into());
    accepts("runner", &info);
    refuses("runner", with(&plain, "/name", Some(json!("Demo"))), "the name is not a runner name");
    refuses("runner", with(&plain, "/name", Some(json!("r".repeat(33)))), "the name is too long");
    refuses("runner", with(&plain, "/state_dir", Some(json!("state"))), "state_dir is relative");
    refuses("runner", with(&plain, "/builds_dir", None), "builds_dir is missing");
    refuses("runner", with(&plain, "/extra", Some(json!(1))), "a member is unknown");
}

#[test]
fn settings_tables_fit_their_schema() {
    let text = r#"
        images_dir = "/var/lib/berth/images"
        memory_max = 4096
        cpu_weight = 0.5
        pool = true
        allowed = ["bookworm", "trixie"]
        not_after = 1979-05-27T07:32:00Z
        [limits]
        pids = 512
        [[mounts]]
        from = "/srv/a"
        [[mounts]]
        from = "/srv/b"
        read_only = true
    "#;
    let table: toml::Table = toml::from_str(text).unwrap();
    let json = accepts("settings", &table);
    accepts("settings", &toml::Table::new());
    refuses("settings", with(&json, "/pool", Some(Value::Null)), "a value is null");
    refuses("settings", with(&json, "/limits/pids", Some(Value::Null)), "a nested value is null");
    refuses("settings", with(&json, "/allowed/1", Some(Value::Null)), "an item is null");
    refuses("settings", json!(["images_dir"]), "the settings are not a table");
}

#[test]
fn known_jobs_and_reap_outputs_fit_their_schemas() {
    let known = [JobKey::new("demo", 0).unwrap(), JobKey::new("a", u64::MAX).unwrap(), JobKey::new("x-1", 7).unwrap()];
    accepts("known", &known);
    accepts("known", &Vec::<JobKey>::new());
    for bad in ["demo", "Demo-1", "demo-007", "demo-+7", "-demo-1", "demo-18446744073709551615000"] {
        refuses("known", json!([bad]), &format!("{bad:?} is no job key"));
    }
    refuses("known", json!(["demo-1", "demo-1"]), "a key is listed twice");
    accepts("reap-output", &vec!["removed machine berth-demo-7".to_owned()]);
    accepts("reap-output", &Vec::<String>::new());
    refuses("reap-output", json!([1]), "a line is a number");
    refuses("reap-output", json!("removed"), "the output is not a list");
}

#[test]
fn state_documents_fit_their_schema_prepared_or_not() {
    let root = tempfile::tempdir().unwrap();
    let key = JobKey::new("demo", 48151623).unwrap();
    let never = StateDoc::of(&JobState::held_elsewhere(key.clone(), root.path().join("jobs/demo-48151623"), None));
    let never = accepts("state", &never);
    assert_eq!(never["record"], Value::Null);
    let record = JobRecord::new(key.clone(), "mine")
        .runner_tmpdir(Some("/tmp/custom-executor1".into()))
        .timeout_secs(Some(3600));
    let state = StateDir::new(root.path()).create(record).unwrap();
    let prepared = accepts("state", &StateDoc::of(&state));
    let bare = StateDir::new(root.path().join("other"))
        .create(JobRecord::new(JobKey::new("demo", 1).unwrap(), "mine"))
        .unwrap();
    accepts("state", &StateDoc::of(&bare));
    refuses("state", with(&prepared, "/key", Some(json!("demo-007"))), "the key is not canonical");
    refuses("state", with(&prepared, "/dir", Some(json!("jobs/demo-1"))), "dir is relative");
    refuses("state", with(&prepared, "/record/backend", None), "the record has no backend");
    refuses("state", with(&prepared, "/record/created_unix", Some(json!(-1))), "the time is negative");
    refuses("state", with(&prepared, "/record", None), "the record is missing (null says never prepared)");
    refuses("state", with(&prepared, "/lock", Some(json!("x"))), "a member is unknown");
}

/// A job with a payload: masked, file and raw variables, an image, a timeout.
fn job_with_payload(dir: &Path) -> JobContext {
    let mut response = JobResponse::new(48151623);
    response.token = "glcbt-64_job-token".into();
    response.job_info = JobInfo::new("test", "build", "acme/widget");
    response.job_info.project_id = 4711;
    response.runner_info.timeout = Some(3600);
    response.image = Some(crate::JobImage::new("registry.example.com/acme/bookworm:latest"));
    let mut raw = ResponseVariable::new("TEMPLATE", "$NOT_EXPANDED");
    raw.raw = true;
    response.variables = vec![
        ResponseVariable::new("DEPLOY_KEY", " s3cr\"et-value ").masked(),
        ResponseVariable::new("KUBECONFIG", "apiVersion: v1\n").file(),
        raw,
    ];
    let payload = dir.join("response.json");
    std::fs::write(&payload, serde_json::to_vec(&response).unwrap()).unwrap();
    let vars = [
        ("JOB_RESPONSE_FILE", payload.to_str().unwrap()),
        ("TMPDIR", dir.to_str().unwrap()),
        ("BUILD_EXIT_CODE_FILE", &format!("{}/build_exit_code", dir.display())),
        ("CUSTOM_ENV_CI_JOB_ID", "1"),
        ("CUSTOM_ENV_DEPLOY_KEY", " s3cr\"et-value "),
        ("CUSTOM_ENV_KUBECONFIG", "apiVersion: v1\n"),
        ("CUSTOM_ENV_TEMPLATE", "$NOT_EXPANDED"),
        ("CUSTOM_ENV_EMPTY", ""),
    ];
    JobContext::from_vars("demo", vars.map(|(k, v)| (k.to_owned(), v.to_owned())))
        .unwrap()
        .with_job_env([("FROM_CONFIG".to_owned(), "1".to_owned())].into())
}

#[test]
fn job_documents_carry_the_trusted_context_and_fit_their_schema() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_with_payload(dir.path());
    let mut runner = RunnerInfo::new("demo", "/var/lib/berth");
    runner.builds_dir = Some("/builds".into());
    let doc = JobDoc {
        vars: vec![("CUSTOM_ENV_CI_JOB_ID".into(), "1".into()), ("TMPDIR".into(), "/tmp/x".into())],
        ..JobDoc::of(&job, &runner)
    };
    let json = accepts("job", &doc);
    let context = &json["context"];
    // The identity is the payload's, not the variable a job can set.
    assert_eq!((context["key"].as_str(), context["id"].as_u64()), (Some("demo-48151623"), Some(48151623)));
    assert_eq!(context["job"]["project_full_path"], "acme/widget");
    assert_eq!(context["job"]["project_id"], 4711);
    assert_eq!(context["image"], "registry.example.com/acme/bookworm:latest");
    assert_eq!(context["timeout_secs"], 3600);
    let variable =
        |key: &str| context["variables"].as_array().unwrap().iter().find(|v| v["key"] == key).unwrap().clone();
    assert_eq!(
        variable("DEPLOY_KEY"),
        json!({"key": "DEPLOY_KEY", "value": " s3cr\"et-value ", "masked": true, "file": false, "raw": false})
    );
    assert_eq!(
        (variable("KUBECONFIG")["file"].as_bool(), variable("TEMPLATE")["raw"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(context["job_env"], json!({"FROM_CONFIG": "1"}));
    assert_eq!((context["builds_dir"].as_str(), context["cache_dir"].as_str()), (Some("/builds"), None));
    assert_eq!(context["tmpdir"], dir.path().to_str().unwrap());
    assert_eq!(context["build_exit_code_file"], format!("{}/build_exit_code", dir.path().display()));
    // Replacing every string of `redact` hides each form of every secret, as the Rust redactor does.
    let redact: Vec<String> = serde_json::from_value(context["redact"].clone()).unwrap();
    let once = crate::script::escape("s3cr\"et-value");
    let twice = crate::script::escape(&once);
    for text in ["token glcbt-64_job-token", "key  s3cr\"et-value ", "trimmed s3cr\"et-value", &once, &twice] {
        let by_list = redact.iter().fold(text.to_owned(), |text, form| text.replace(form.as_str(), crate::MASK));
        assert_eq!(by_list, job.redactor().redact(text), "{text}");
        assert!(by_list.contains(crate::MASK), "{text}");
    }

    // Without a payload (`berth exec` of old): no job_info, no flags.
    let bare = JobContext::from_vars("demo", [("CUSTOM_ENV_CI_JOB_ID".to_owned(), "7".to_owned())]).unwrap();
    let bare = accepts("job", &JobDoc::of(&bare, &RunnerInfo::new("demo", "/var/lib/berth")));
    assert_eq!((bare["context"]["key"].as_str(), &bare["context"]["job"]), (Some("demo-7"), &Value::Null));

    refuses("job", with(&json, "/vars/0", Some(json!(["A", "1", "2"]))), "a pair has three members");
    refuses("job", with(&json, "/vars/0", Some(json!(["A"]))), "a pair has one member");
    refuses("job", with(&json, "/runner", Some(json!("Demo"))), "the runner is no runner name");
    refuses("job", with(&json, "/context/key", Some(json!("demo-x"))), "the key is no job key");
    refuses("job", with(&json, "/context/redact", None), "the context has no redact list");
    refuses("job", with(&json, "/context/variables/0/raw", None), "a variable has no raw flag");
    refuses("job", with(&json, "/context/variables/0/masked", Some(json!("yes"))), "a flag is a string");
    refuses("job", with(&json, "/context/job/project_id", Some(json!(-4))), "the project id is negative");
    refuses("job", with(&json, "/context/tmpdir", Some(json!("tmp"))), "tmpdir is relative");
    refuses("job", with(&json, "/context/secret", Some(json!("x"))), "a context member is unknown");
}

/// The job document as ABI 1.0 defined it, which plugins built then parse.
#[derive(Debug, Deserialize)]
struct JobDoc10 {
    runner: String,
    vars: Vec<(String, String)>,
}

#[test]
fn job_documents_of_abi_1_0_and_1_1_are_read_by_either_side() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_with_payload(dir.path());
    let doc =
        JobDoc { vars: vec![("CUSTOM_ENV_A".into(), "1".into())], ..JobDoc::of(&job, &RunnerInfo::new("demo", "/s")) };
    let text = serde_json::to_string(&doc).unwrap();
    // A plugin of 1.0 reads what a 1.1 host sends: the context is ignored.
    let old: JobDoc10 = serde_json::from_str(&text).unwrap();
    assert_eq!((old.runner.as_str(), old.vars), ("demo", vec![("CUSTOM_ENV_A".to_owned(), "1".to_owned())]));
    // A plugin of 1.1 reads what a 1.0 host sent, which fits the schema: no context.
    let from_old_host = json!({"runner": "demo", "vars": [["CUSTOM_ENV_A", "1"]]});
    assert!(validator("job").is_valid(&from_old_host));
    let read: JobDoc = serde_json::from_value(from_old_host).unwrap();
    assert!(read.context.is_none());
    // And the context survives the trip.
    let back: JobDoc = serde_json::from_str(&text).unwrap();
    assert_eq!(back.context, doc.context);
}
