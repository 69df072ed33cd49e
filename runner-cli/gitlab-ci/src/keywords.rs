//! Decoders of single keywords: each turns one value into what a job needs,
//! or into a message saying what is wrong with it.

use serde_norway::Value;

use crate::duration::parse_duration;
use crate::yaml::{kind, scalar_string};
use crate::Variable;

/// Deepest nesting of lists accepted in `script`, `before_script` and `after_script`.
const MAX_SCRIPT_NESTING: usize = 10;

/// Which entries an `inherit:` setting lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Inherit {
    All,
    Nothing,
    Only(Vec<String>),
}

impl Inherit {
    pub(crate) fn parse(value: Option<&Value>) -> Result<Self, String> {
        match value {
            None | Some(Value::Null) | Some(Value::Bool(true)) => Ok(Inherit::All),
            Some(Value::Bool(false)) => Ok(Inherit::Nothing),
            Some(Value::Sequence(items)) => items
                .iter()
                .map(|item| item.as_str().map(str::to_owned).ok_or(()))
                .collect::<Result<_, _>>()
                .map(Inherit::Only)
                .map_err(|()| "the list must hold names only".to_owned()),
            Some(other) => Err(format!("must be true, false or a list of names, not {}", kind(other))),
        }
    }

    pub(crate) fn allows(&self, name: &str) -> bool {
        match self {
            Inherit::All => true,
            Inherit::Nothing => false,
            Inherit::Only(names) => names.iter().any(|n| n == name),
        }
    }
}

/// A list of commands: a string, or a list of strings and nested lists.
pub(crate) fn commands(value: &Value) -> Result<Vec<String>, String> {
    fn flatten(items: &[Value], depth: usize, out: &mut Vec<String>) -> Result<(), String> {
        for item in items {
            match item {
                Value::String(command) => out.push(command.clone()),
                Value::Sequence(inner) if depth < MAX_SCRIPT_NESTING => {
                    flatten(inner, depth + 1, out)?;
                }
                Value::Sequence(_) => {
                    return Err(format!("lists nest deeper than {MAX_SCRIPT_NESTING} levels; flatten them"))
                }
                Value::Mapping(_) => {
                    return Err(format!(
                        "command {} is a hash: a command holding `: ` must be quoted, \
                         like `- 'echo \"key: value\"'`",
                        out.len() + 1
                    ))
                }
                other => {
                    return Err(format!(
                        "command {} is {}, but commands are strings: quote it",
                        out.len() + 1,
                        kind(other)
                    ))
                }
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    match value {
        Value::String(command) => out.push(command.clone()),
        Value::Sequence(items) => flatten(items, 1, &mut out)?,
        other => return Err(format!("must be a string or a list of strings, not {}", kind(other))),
    }
    Ok(out)
}

/// A `variables:` hash as variables, in order.
pub(crate) fn variables(value: &Value) -> Result<Vec<Variable>, String> {
    let Value::Mapping(mapping) = value else {
        return Err(format!("must be a hash of NAME: value, not {}", kind(value)));
    };
    let mut out = Vec::with_capacity(mapping.len());
    for (name, value) in mapping {
        let name = match name {
            Value::String(name) => name.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(_) => {
                return Err("a variable name is a boolean (YAML reads `on`, `off`, `yes`, `no`, `true` and \
                     `false` so, as GitLab does); quote it"
                    .to_owned())
            }
            other => return Err(format!("a variable name is {}; use a string", kind(other))),
        };
        let mut expand = true;
        let value = match value {
            Value::Mapping(fields) => {
                if let Some(key) = fields
                    .keys()
                    .find(|key| !matches!(key.as_str(), Some("value" | "description" | "expand" | "options")))
                {
                    return Err(format!(
                        "variable `{name}` has the unknown key `{}`; \
                         the known keys are value, description, expand and options",
                        scalar_string(key).unwrap_or_else(|| kind(key).to_owned())
                    ));
                }
                // `expand: false` reaches the runner as `raw`
                // (https://docs.gitlab.com/ci/yaml/#variablesexpand).
                match fields.get("expand") {
                    None | Some(Value::Null) => {}
                    Some(Value::Bool(value)) => expand = *value,
                    Some(other) => {
                        return Err(format!("`expand` of variable `{name}` is {}; use true or false", kind(other)))
                    }
                }
                match fields.get("value") {
                    None | Some(Value::Null) => String::new(),
                    Some(inner) => scalar_string(inner)
                        .ok_or_else(|| format!("the value of variable `{name}` is {}; use a string", kind(inner)))?,
                }
            }
            other => scalar_string(other).ok_or_else(|| {
                format!(
                    "variable `{name}` is {}; use a string (quote it, like `{name}: \"\"`) \
                     or `{{value: ..., description: ...}}`",
                    kind(other)
                )
            })?,
        };
        out.push(Variable { name, value, expand });
    }
    Ok(out)
}

/// The image name of `image: name` or `image: {name: name, ...}`.
pub(crate) fn image_name(value: &Value) -> Result<String, String> {
    let name = match value {
        Value::Mapping(fields) => match fields.get("name") {
            Some(name) => name,
            None => return Err("an image hash needs a `name:`".to_owned()),
        },
        other => other,
    };
    match name {
        Value::String(name) if !name.trim().is_empty() => Ok(name.clone()),
        Value::String(_) => Err("the image name is empty".to_owned()),
        other => Err(format!("the image must be a name or a hash with `name:`, not {}", kind(other))),
    }
}

/// Seconds of a `timeout:` value: a duration string, or a number of seconds.
pub(crate) fn timeout(value: &Value) -> Result<u64, String> {
    match value {
        Value::Number(n) => match n.as_u64() {
            Some(secs) if secs > 0 => Ok(secs),
            _ => Err(format!("{n} is not a positive number of seconds")),
        },
        Value::String(text) => parse_duration(text),
        other => Err(format!("must be a duration like `1h 30m`, not {}", kind(other))),
    }
}

/// `allow_failure:` as (allowed, exit codes).
pub(crate) fn allow_failure(value: &Value) -> Result<(bool, Vec<i32>), String> {
    let exit_code = |value: &Value| {
        value
            .as_i64()
            .and_then(|code| i32::try_from(code).ok())
            .ok_or_else(|| format!("`exit_codes` must hold integers, not {}", kind(value)))
    };
    match value {
        Value::Bool(allowed) => Ok((*allowed, Vec::new())),
        Value::Mapping(fields) => {
            if let Some(key) = fields.keys().find(|key| key.as_str() != Some("exit_codes")) {
                return Err(format!(
                    "the only key of an `allow_failure` hash is `exit_codes`, not `{}`",
                    scalar_string(key).unwrap_or_else(|| kind(key).to_owned())
                ));
            }
            let codes = match fields.get("exit_codes") {
                Some(Value::Sequence(codes)) => codes.iter().map(exit_code).collect(),
                Some(code) => exit_code(code).map(|code| vec![code]),
                None => Err("an `allow_failure` hash needs `exit_codes:`".to_owned()),
            }?;
            Ok((false, codes))
        }
        other => Err(format!("must be true, false or `{{exit_codes: [...]}}`, not {}", kind(other))),
    }
}

/// Most jobs one `parallel:` may make (GitLab's limit).
pub(crate) const MAX_PARALLEL: usize = 200;

/// One job `parallel:` makes of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Instance {
    /// The job's name as GitLab names it.
    pub(crate) name: String,
    /// `CI_NODE_INDEX`, from 1.
    pub(crate) index: usize,
    /// `CI_NODE_TOTAL`.
    pub(crate) total: usize,
    /// The matrix variables of this combination.
    pub(crate) variables: Vec<Variable>,
}

/// The jobs `parallel:` makes of the job `job`, named as GitLab names them
/// (<https://docs.gitlab.com/ci/yaml/#parallel>, #parallelmatrix): `job 1/3`
/// for `parallel: 3`; `job: [a, b]` for a matrix combination, its values in
/// the order of the matrix entry (GitLab's `Normalizer::MatrixStrategy`).
pub(crate) fn parallel(job: &str, value: &Value) -> Result<Vec<Instance>, String> {
    match value {
        Value::Number(n) => {
            let total = n
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|n| (1..=MAX_PARALLEL).contains(n))
                .ok_or_else(|| format!("must be a number from 1 to {MAX_PARALLEL}, not {n}"))?;
            Ok((1..=total)
                .map(|index| Instance { name: format!("{job} {index}/{total}"), index, total, variables: Vec::new() })
                .collect())
        }
        Value::Mapping(fields) => {
            if let Some(key) = fields.keys().find(|key| key.as_str() != Some("matrix")) {
                return Err(format!(
                    "the only key of a `parallel` hash is `matrix`, not `{}`",
                    scalar_string(key).unwrap_or_else(|| kind(key).to_owned())
                ));
            }
            let Some(Value::Sequence(entries)) = fields.get("matrix") else {
                return Err("`matrix` must be a list of hashes of VARIABLE: [values]".to_owned());
            };
            let mut combinations: Vec<Vec<Variable>> = Vec::new();
            for entry in entries {
                let Value::Mapping(entry) = entry else {
                    return Err(format!("a `matrix` entry is {}; use a hash of VARIABLE: [values]", kind(entry)));
                };
                let mut product: Vec<Vec<Variable>> = vec![Vec::new()];
                for (name, values) in entry {
                    let name = scalar_string(name).ok_or("a matrix variable name must be a string")?;
                    let values: Vec<String> = match values {
                        Value::Sequence(items) => items.iter().map(scalar_string).collect::<Option<_>>(),
                        other => scalar_string(other).map(|v| vec![v]),
                    }
                    .ok_or_else(|| format!("matrix variable `{name}` must be a value or a list of values"))?;
                    if values.is_empty() {
                        return Err(format!("matrix variable `{name}` has no values"));
                    }
                    product = product
                        .into_iter()
                        .flat_map(|done| {
                            let name = &name;
                            values.iter().map(move |value| {
                                let mut next = done.clone();
                                next.push(Variable::new(name.clone(), value.clone()));
                                next
                            })
                        })
                        .collect();
                    if product.len() + combinations.len() > MAX_PARALLEL {
                        return Err(format!("the matrix makes more than {MAX_PARALLEL} jobs, GitLab's limit"));
                    }
                }
                combinations.extend(product);
            }
            if combinations.is_empty() {
                return Err("`matrix` is empty".to_owned());
            }
            let total = combinations.len();
            Ok(combinations
                .into_iter()
                .enumerate()
                .map(|(at, variables)| {
                    let values: Vec<&str> = variables.iter().map(|v| v.value.as_str()).collect();
                    Instance { name: format!("{job}: [{}]", values.join(", ")), index: at + 1, total, variables }
                })
                .collect())
        }
        other => Err(format!("must be a number or `{{matrix: [...]}}`, not {}", kind(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::*;
    use crate::PipelineError;

    #[test]
    fn single_string_scripts() {
        let text = "j:\n  before_script: a\n  script: b\n  after_script: c\n";
        let j = job(text, "j");
        assert_eq!(j.before_script, strings(&["a"]));
        assert_eq!(j.script, strings(&["b"]));
        assert_eq!(j.after_script, strings(&["c"]));
    }

    #[test]
    fn nested_script_arrays_are_flattened_and_blocks_stay_whole() {
        let text = r#"
j:
  script:
    - one
    - [two, three]
    - - four
      - [five]
    - |
      if true; then
        echo six
      fi
    - >
      folded
      line
"#;
        assert_eq!(
            job(text, "j").script,
            strings(&["one", "two", "three", "four", "five", "if true; then\n  echo six\nfi\n", "folded line\n",])
        );
    }

    #[test]
    fn script_entries_must_be_strings() {
        let e = error("j:\n  script:\n    - echo ok\n    - echo key: value\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "script"), "{e:?}");
        let message = e.to_string();
        assert!(message.contains("command 2 is a hash"), "{message}");
        assert!(message.contains("quoted"), "{message}");

        let e = error("j:\n  script: [echo, 42]\n", "j");
        assert!(e.to_string().contains("command 2 is a number"), "{e}");

        let e = error("j:\n  script: {a: b}\n", "j");
        assert!(e.to_string().contains("must be a string or a list of strings, not a hash"), "{e}");

        let e = error("j:\n  script: x\n  after_script: 3\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "after_script"), "{e:?}");
    }

    #[test]
    fn scripts_nested_too_deep_are_rejected() {
        let mut script = "x".to_owned();
        for _ in 0..MAX_SCRIPT_NESTING {
            script = format!("[{script}]");
        }
        assert_eq!(job(&format!("j:\n  script: {script}\n"), "j").script, strings(&["x"]));
        let e = error(&format!("j:\n  script: [{script}]\n"), "j");
        assert!(e.to_string().contains("nest deeper than 10"), "{e}");
    }

    #[test]
    fn timeout_values_in_jobs() {
        assert_eq!(job("j:\n  timeout: 600\n  script: x\n", "j").timeout_secs, Some(600));
        assert_eq!(job("j:\n  timeout: '1 hour'\n  script: x\n", "j").timeout_secs, Some(3600));
        let e = error("j:\n  timeout: whenever\n  script: x\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "timeout"), "{e:?}");
        assert!(e.to_string().contains("`whenever` is not a duration"), "{e}");
        let e = error("default:\n  timeout: [1]\nj:\n  script: x\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "default:timeout"), "{e:?}");
    }

    #[test]
    fn image_string_or_hash() {
        assert_eq!(job("j:\n  image: alpine\n  script: x\n", "j").image.as_deref(), Some("alpine"));
        let text = "j:\n  image:\n    name: alpine:3.20\n    entrypoint: ['']\n    pull_policy: always\n  script: x\n";
        assert_eq!(job(text, "j").image.as_deref(), Some("alpine:3.20"));
        let e = error("j:\n  image: {entrypoint: ['']}\n  script: x\n", "j");
        assert!(e.to_string().contains("needs a `name:`"), "{e}");
        let e = error("j:\n  image: 3\n  script: x\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "image"), "{e:?}");
        let e = error("image: ''\nj:\n  script: x\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "image (top-level)"), "{e:?}");
    }

    #[test]
    fn variable_forms() {
        let text = r#"
variables:
  STR: text
  INT: 42
  FLOAT: 1.10
  NEG: -3
  BOOL: true
  OFF_: off
  QUOTED: "007"
  OCTAL: 0o17
  MODE: 0755
  BIG: 100_000_000_000_000_000_000.0
  SMALL: 0.00001
  SEP: 1_000
  DESCRIBED:
    value: v1
    description: shown in the run pipeline form
    options: [v1, v2]
  RAW:
    value: $NOT_EXPANDED
    expand: false
  NUMVALUE: {value: 5}
  ONLYDOC: {description: no value}
  1234: numeric name
j:
  variables:
    INT: overridden
    JOB: 1e3
  script: x
"#;
        let mut want = vars(&[
            ("STR", "text"),
            ("INT", "overridden"),
            ("FLOAT", "1.1"),
            ("NEG", "-3"),
            ("BOOL", "true"),
            ("OFF_", "false"),
            ("QUOTED", "007"),
            ("OCTAL", "0o17"),
            ("MODE", "493"),
            ("BIG", "1.0e+20"),
            ("SMALL", "1.0e-05"),
            ("SEP", "1000"),
            ("DESCRIBED", "v1"),
            ("RAW", "$NOT_EXPANDED"),
            ("NUMVALUE", "5"),
            ("ONLYDOC", ""),
            ("1234", "numeric name"),
            ("JOB", "1e3"),
        ]);
        // `expand: false` (https://docs.gitlab.com/ci/yaml/#variablesexpand).
        want[13].expand = false;
        assert_eq!(job(text, "j").variables, want);
        let e = error("j:\n  variables: {V: {value: x, expand: maybe}}\n  script: x\n", "j");
        assert!(e.to_string().contains("`expand` of variable `V` is a string"), "{e}");
    }

    #[test]
    fn variables_of_the_wrong_shape() {
        let e = error("j:\n  variables:\n    EMPTY:\n  script: x\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "variables"), "{e:?}");
        assert!(e.to_string().contains("variable `EMPTY` is empty"), "{e}");
        let e = error("j:\n  variables: {L: [a]}\n  script: x\n", "j");
        assert!(e.to_string().contains("variable `L` is a list"), "{e}");
        let e = error("j:\n  variables: {V: {value: x, bogus: 1}}\n  script: x\n", "j");
        assert!(e.to_string().contains("unknown key `bogus`"), "{e}");
        let e = error("variables:\n  ON: 1\nj:\n  script: x\n", "j");
        assert!(
            e.to_string()
                .contains("ci.yml:1:1: job `j`: invalid `variables (top-level)`: a variable name is a boolean"),
            "{e}"
        );
        let e = error("variables: [A]\nj:\n  script: x\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "variables (top-level)"), "{e:?}");
    }

    #[test]
    fn allow_failure_forms() {
        let j = job("j:\n  allow_failure: {exit_codes: 42}\n  script: x\n", "j");
        assert!(!j.allow_failure);
        assert_eq!(j.allow_failure_exit_codes, vec![42]);
        let j = job("j:\n  allow_failure:\n    exit_codes: [1, 137]\n  script: x\n", "j");
        assert_eq!(j.allow_failure_exit_codes, vec![1, 137]);
        assert!(!job("j:\n  allow_failure: false\n  script: x\n", "j").allow_failure);
        // Manual jobs without rules may fail by default.
        assert!(job("j:\n  when: manual\n  script: x\n", "j").allow_failure);
        assert!(!job("j:\n  when: manual\n  rules: [{when: manual}]\n  script: x\n", "j").allow_failure);
        assert!(!job("j:\n  when: manual\n  allow_failure: false\n  script: x\n", "j").allow_failure);
        let e = error("j:\n  allow_failure: {exit_codes: [x]}\n  script: x\n", "j");
        assert!(e.to_string().contains("must hold integers"), "{e}");
        let e = error("j:\n  allow_failure: yes please\n  script: x\n", "j");
        assert!(matches!(&e, PipelineError::Invalid { key, .. } if key == "allow_failure"), "{e:?}");
    }
}
