//! Tests of `context`.

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn identity_comes_from_the_payload_not_the_shadowable_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("response.json");
    let mut response = JobResponse::new(48151623);
    response.variables.push(ResponseVariable::new("DEPLOY_TOKEN", "glpat-secret-value").masked());
    response.token = "job-token-123".into();
    std::fs::write(&path, serde_json::to_vec(&response).unwrap()).unwrap();
    let ctx = JobContext::from_vars(
        "demo",
        env(&[
            ("JOB_RESPONSE_FILE", path.to_str().unwrap()),
            ("CUSTOM_ENV_CI_JOB_ID", "1"),
            ("CUSTOM_ENV_DEPLOY_TOKEN", "glpat-secret-value"),
            ("CUSTOM_ENV_GREETING", "hello"),
            ("PATH", "/usr/bin"),
        ]),
    )
    .unwrap();
    assert_eq!(ctx.key().to_string(), "demo-48151623");
    assert_eq!(ctx.variable("CI_JOB_ID"), Some("1"));
    let token = ctx.variables().iter().find(|v| v.key == "DEPLOY_TOKEN").unwrap();
    assert!(token.masked);
    assert!(!ctx.variables().iter().find(|v| v.key == "GREETING").unwrap().masked);
    assert_eq!(ctx.redactor().redact("a glpat-secret-value b job-token-123"), "a [MASKED] b [MASKED]");
    assert!(ctx.variable("PATH").is_none(), "only CUSTOM_ENV_ variables are job variables");
}

#[test]
fn without_payload_a_numeric_job_id_is_required() {
    let err = JobContext::from_vars("demo", env(&[("CUSTOM_ENV_CI_JOB_ID", "../../etc")])).unwrap_err();
    assert!(matches!(err, ContextError::NoIdentity(_)), "{err}");
    let ctx = JobContext::from_vars("demo", env(&[("CUSTOM_ENV_CI_JOB_ID", "7")])).unwrap();
    assert_eq!(ctx.key().id(), 7);
}

#[test]
fn runner_names_are_validated_and_keys_round_trip() {
    assert!(JobKey::new("a/../b", 1).is_err());
    assert!(JobKey::new("", 1).is_err());
    assert!(JobKey::new("-x", 1).is_err());
    assert!(JobKey::new("Upper", 1).is_err());
    assert!(JobKey::new("under_score", 1).is_err(), "not valid in a machine name");
    assert!(JobKey::new(&"a".repeat(33), 1).is_err());
    let key = JobKey::new("nspawn-fast-1", 42).unwrap();
    assert_eq!(JobKey::try_from(key.to_string()).unwrap(), key);
}

#[test]
fn unknown_payload_fields_are_ignored() {
    let text = r#"{"id": 5, "future_field": {"x": 1}, "image": {"name": "debian:12", "ports": []}}"#;
    let response: JobResponse = serde_json::from_str(text).unwrap();
    assert_eq!(response.id, 5);
    assert_eq!(response.image.unwrap().name, "debian:12");
}

#[test]
fn reads_the_shared_fixture_payload() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/fixtures/job-response.json");
    let bytes = std::fs::read(path).unwrap();
    let response: JobResponse = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(response.id, 48151623);
    assert!(response.variables.iter().any(|v| v.key == "DEPLOY_TOKEN" && v.masked));
    assert_eq!(response.image.unwrap().name, "registry.example.com/ci/bookworm:latest");
}

#[test]
fn a_job_key_has_one_spelling() {
    // Found by `property::job_keys_parse_to_their_own_spelling`: these
    // were keys of job 1 and 7, so a stray `demo-007.lock` was listed as
    // job `demo-7`, whose lock is another file.
    for text in ["a-+1", "demo-007", "demo-00", "demo-", "demo- 1", "-1", "demo-18446744073709551616"] {
        assert!(JobKey::try_from(text.to_owned()).is_err(), "{text:?}");
    }
    assert_eq!(JobKey::try_from("demo-0".to_owned()).unwrap().id(), 0);
    assert_eq!(JobKey::try_from("a--1".to_owned()).unwrap().runner(), "a-");
}

#[test]
fn a_payload_nested_without_end_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("response.json");
    let depth = 100_000;
    let text = format!("{{\"id\": 1, \"services\": {}{}}}", "[".repeat(depth), "]".repeat(depth));
    std::fs::write(&path, text).unwrap();
    let err = JobContext::from_vars("demo", env(&[("JOB_RESPONSE_FILE", path.to_str().unwrap())])).unwrap_err();
    assert!(matches!(err, ContextError::ParseResponse { .. }), "{err}");
    assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");
}

#[test]
fn a_payload_of_several_megabytes_is_read_quickly() {
    // The payload is read whole (it comes from the runner, not the job);
    // what a job controls in it (variables, scripts) can be megabytes.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("response.json");
    let mut response = JobResponse::new(9);
    for i in 0..2000 {
        let value = format!("{i}-{}", "x\u{e9}'\\\n".repeat(400));
        let mut var = ResponseVariable::new(format!("V{i}"), value);
        var.masked = i % 10 == 0;
        response.variables.push(var);
    }
    response.steps.push(Step::new("script", vec!["echo hi".repeat(100_000)], "on_success"));
    let bytes = serde_json::to_vec(&response).unwrap();
    assert!(bytes.len() > 4 << 20, "{}", bytes.len());
    std::fs::write(&path, &bytes).unwrap();
    let vars = env(&[("JOB_RESPONSE_FILE", path.to_str().unwrap()), ("CUSTOM_ENV_V0", "0-x")]);
    let start = std::time::Instant::now();
    let ctx = JobContext::from_vars("demo", vars).unwrap();
    let took = start.elapsed();
    assert_eq!(ctx.key().id(), 9);
    assert!(took < std::time::Duration::from_secs(10), "{} MB took {took:?}", bytes.len() >> 20);
}

mod property {
    use super::super::*;
    use proptest::prelude::*;

    /// Runner names: mostly near the valid alphabet, some anything.
    fn runner() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => "[a-z0-9][a-z0-9-]{0,31}",
            1 => "[a-zA-Z0-9_./ -]{0,40}",
            1 => any::<String>(),
        ]
    }

    /// Any text, with the characters that matter to berth frequent.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            2 => any::<String>(),
            2 => "[0-9+-]{0,22}",
            1 => prop::collection::vec(
                prop::sample::select(vec!['\0', '\n', '\'', '\\', ' ', 'é', '☃', '-', '1', 'a', '=', '$']),
                0..12
            )
            .prop_map(|cs| cs.into_iter().collect()),
        ]
    }

    /// Environment names: the runner's own, `CUSTOM_ENV_*` and anything.
    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            2 => prop::sample::select(RUNNER_KEYS.to_vec()).prop_map(str::to_owned),
            3 => prop_oneof![Just("CI_JOB_ID".to_owned()), Just("SECRET".to_owned()), Just("V".to_owned()), text()]
                .prop_map(|n| format!("CUSTOM_ENV_{n}")),
            1 => text(),
        ]
    }

    fn json() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            text().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((text(), inner), 0..6)
                    .prop_map(|fields| Value::Object(fields.into_iter().collect())),
            ]
        })
    }

    prop_compose! {
        fn variable()(key in prop_oneof![Just("SECRET".to_owned()), Just("V".to_owned()), text()],
                      value in text(), masked: bool, file: bool, public: bool)
                      -> ResponseVariable {
            ResponseVariable { key, value, masked, file, public, raw: false }
        }
    }

    prop_compose! {
        fn response()(id: u64, token in text(), name in text(), stage in text(),
                      timeout in any::<Option<u64>>(),
                      variables in prop::collection::vec(variable(), 0..6),
                      script in prop::collection::vec(text(), 0..3),
                      image in prop::option::of(text())) -> JobResponse {
            let mut response = JobResponse::new(id);
            response.token = token;
            response.job_info = JobInfo::new(name, stage, "group/project");
            response.runner_info.timeout = timeout;
            response.variables = variables;
            response.steps = vec![Step::new("script", script, "on_success")];
            response.image = image.map(JobImage::new);
            response
        }
    }

    /// What `JOB_RESPONSE_FILE` holds: any bytes, any JSON, a payload,
    /// or a payload with one field of any other JSON value.
    fn payload() -> impl Strategy<Value = Vec<u8>> {
        let fields = prop::sample::select(vec![
            "id",
            "token",
            "job_info",
            "runner_info",
            "variables",
            "steps",
            "image",
            "services",
        ]);
        prop_oneof![
            1 => prop::collection::vec(any::<u8>(), 0..64),
            1 => json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
            3 => response().prop_map(|r| serde_json::to_vec(&r).unwrap()),
            2 => (response(), fields, json()).prop_map(|(r, field, value)| {
                let mut doc = serde_json::to_value(&r).unwrap();
                doc[field] = value;
                serde_json::to_vec(&doc).unwrap()
            }),
            1 => (response(), any::<prop::sample::Index>(), 0..8usize).prop_map(|(r, at, cut)| {
                // A payload cut short or with bytes dropped.
                let mut bytes = serde_json::to_vec(&r).unwrap();
                let at = at.index(bytes.len());
                bytes.drain(at..(at + cut).min(bytes.len()));
                bytes
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any environment and payload give a context or an error, and a
        /// context has its identity from the payload and knows its secrets.
        #[test]
        fn any_environment_and_payload_give_a_context_or_an_error(
            runner in runner(),
            vars in prop::collection::vec((name(), text()), 0..10),
            payload in prop::option::of(payload()),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("response.json");
            let mut vars = vars;
            if let Some(bytes) = &payload {
                std::fs::write(&path, bytes).unwrap();
                vars.push(("JOB_RESPONSE_FILE".to_owned(), path.to_str().unwrap().to_owned()));
            }
            let last = |key: &str| vars.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.clone());
            let response_file = last("JOB_RESPONSE_FILE").filter(|p| !p.is_empty());
            let result = JobContext::from_vars(&runner, vars.clone());
            let ctx = match result {
                Ok(ctx) => ctx,
                Err(err) => {
                    prop_assert!(!err.to_string().is_empty());
                    if let ContextError::ReadResponse { path, .. } | ContextError::ParseResponse { path, .. } = &err {
                        prop_assert_eq!(Some(path.to_str().unwrap().to_owned()), response_file);
                    }
                    return Ok(());
                }
            };
            prop_assert!(valid_runner_name(&runner));
            prop_assert_eq!(ctx.key().runner(), runner.as_str());
            prop_assert_eq!(JobKey::try_from(ctx.key().to_string()), Ok(ctx.key().clone()));
            let response = ctx.response().cloned();
            match (&response_file, &response) {
                (Some(file), Some(response)) => {
                    let read: JobResponse = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
                    prop_assert_eq!(&read, response);
                    prop_assert_eq!(ctx.key().id(), response.id);
                }
                (None, None) => {
                    prop_assert_eq!(Some(ctx.key().id()), last("CUSTOM_ENV_CI_JOB_ID").and_then(|v| v.parse().ok()));
                }
                (file, response) => prop_assert!(false, "payload file {:?} but payload {:?}", file, response),
            }
            // Every CUSTOM_ENV_ variable, its last value, masked as the payload says.
            let custom: BTreeMap<String, String> = vars
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix("CUSTOM_ENV_")?.to_owned(), v.clone())))
                .collect();
            prop_assert_eq!(ctx.variables().len(), custom.len());
            let payload_vars = response.as_ref().map(|r| r.variables.clone()).unwrap_or_default();
            for var in ctx.variables() {
                prop_assert_eq!(Some(&var.value), custom.get(&var.key));
                let masked = payload_vars.iter().any(|p| p.key == var.key && p.masked);
                prop_assert_eq!(var.masked, masked, "{:?}", var.key);
            }
            // Every secret is known to the redactor.
            let mut secrets: Vec<&str> = ctx.variables().iter().filter(|v| v.masked).map(|v| v.value.as_str()).collect();
            if let Some(response) = &response {
                secrets.extend(response.variables.iter().filter(|v| v.masked).map(|v| v.value.as_str()));
                secrets.push(&response.token);
            }
            for secret in secrets.into_iter().filter(|s| !s.is_empty()) {
                prop_assert!(ctx.redactor().leaks(secret), "{:?}", secret);
                prop_assert_eq!(ctx.redactor().redact(secret), crate::MASK, "{:?}", secret);
            }
            if let Some(file) = last("BUILD_EXIT_CODE_FILE").filter(|p| !p.is_empty()) {
                prop_assert_eq!(ctx.build_exit_code_file(), Some(Path::new(&file)));
            }
            prop_assert_eq!(ctx.tmpdir().map(Path::to_path_buf), last("TMPDIR").map(PathBuf::from));
        }

        /// Any text is a job key or an error; a key is exactly the text it
        /// was read from, and every key reads back.
        #[test]
        fn job_keys_parse_to_their_own_spelling(text in prop_oneof![
            any::<String>(),
            "[a-z0-9-]{0,34}-[+0-9]{0,22}",
            text(),
        ]) {
            if let Ok(key) = JobKey::try_from(text.clone()) {
                prop_assert_eq!(key.to_string(), text);
                prop_assert!(valid_runner_name(key.runner()));
            }
        }

        #[test]
        fn every_key_reads_back(runner in "[a-z0-9][a-z0-9-]{0,31}", id: u64) {
            let key = JobKey::new(&runner, id).unwrap();
            prop_assert_eq!(JobKey::try_from(key.to_string()), Ok(key));
        }
    }
}
