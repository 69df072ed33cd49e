//! The YAML document: parsing, anchors and merge keys, and what its top-level
//! keys and values are.

use std::path::Path;

use serde::Deserialize as _;
use serde_norway::{Mapping, Value};

use crate::PipelineError;

/// Top-level keys that are global keywords, not jobs.
pub(crate) const RESERVED_KEYWORDS: &[&str] = &[
    "default",
    "include",
    "stages",
    "variables",
    "workflow",
    "image",
    "services",
    "cache",
    "before_script",
    "after_script",
    "types",
    "spec",
];

/// Whether a top-level key names a job (visible or not): not a global keyword.
pub(crate) fn is_job_or_template(name: &str) -> bool {
    !RESERVED_KEYWORDS.contains(&name)
}

/// Whether a top-level key names a visible job.
pub(crate) fn is_visible_job(name: &str) -> bool {
    is_job_or_template(name) && !name.starts_with('.')
}

/// What a value is, for messages.
pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "empty",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a hash",
        Value::Tagged(_) => "a tagged value",
    }
}

/// A scalar as a string, the way YAML writes it.
pub(crate) fn scalar_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Parses the text into the top-level hash, merge keys applied.
pub(crate) fn parse_document(text: &str, path: &Path) -> Result<Mapping, PipelineError> {
    let parse_error = |source| PipelineError::Parse { path: path.to_owned(), source };
    let mut documents = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        documents.push(Value::deserialize(document).map_err(parse_error)?);
    }
    let is_spec_header = |value: &Value| match value {
        Value::Mapping(m) => m.len() == 1 && m.contains_key("spec"),
        _ => false,
    };
    let mut document = match documents.len() {
        0 => Value::Null,
        1 => documents.pop().unwrap_or(Value::Null),
        2 if is_spec_header(&documents[0]) => documents.pop().unwrap_or(Value::Null),
        n => {
            return Err(PipelineError::Structure {
                path: path.to_owned(),
                message: format!(
                    "the file holds {n} YAML documents; a pipeline is one document, \
                     optionally after a `spec:` header: remove the extra `---` separators"
                ),
            })
        }
    };
    apply_merge_keys(&mut document, &mut Vec::new())
        .map_err(|message| PipelineError::Structure { path: path.to_owned(), message })?;
    match document {
        Value::Null => Ok(Mapping::new()),
        Value::Mapping(root) => Ok(root),
        other => Err(PipelineError::Structure {
            path: path.to_owned(),
            message: format!("the top level is {}, but a pipeline is a hash of jobs and global keywords", kind(&other)),
        }),
    }
}

/// Applies YAML merge keys (`<<`) everywhere in `value`.
///
/// Unlike `Value::apply_merge`, this merges nested merge keys (an anchor
/// whose hash itself uses `<<`) and keeps key order: merged keys take the
/// place of the `<<` key. Keys of the hash win over merged ones; among
/// several merged hashes, the first one holding a key wins.
fn apply_merge_keys(value: &mut Value, at: &mut Vec<String>) -> Result<(), String> {
    match value {
        Value::Mapping(mapping) => {
            for (key, child) in mapping.iter_mut() {
                at.push(scalar_string(key).unwrap_or_else(|| "?".to_owned()));
                let result = apply_merge_keys(child, at);
                at.pop();
                result?;
            }
            if !mapping.contains_key("<<") {
                return Ok(());
            }
            let old = std::mem::take(mapping);
            for (key, child) in &old {
                if key.as_str() != Some("<<") {
                    mapping.insert(key.clone(), child.clone());
                    continue;
                }
                let sources: Vec<&Mapping> = match child {
                    Value::Mapping(source) => vec![source],
                    Value::Sequence(items) => items
                        .iter()
                        .map(|item| match item {
                            Value::Mapping(source) => Ok(source),
                            other => Err(merge_error(at, other)),
                        })
                        .collect::<Result<_, _>>()?,
                    other => return Err(merge_error(at, other)),
                };
                for source in sources {
                    for (merged_key, merged) in source {
                        if !old.contains_key(merged_key) && !mapping.contains_key(merged_key) {
                            mapping.insert(merged_key.clone(), merged.clone());
                        }
                    }
                }
            }
            Ok(())
        }
        Value::Sequence(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                at.push(index.to_string());
                let result = apply_merge_keys(item, at);
                at.pop();
                result?;
            }
            Ok(())
        }
        Value::Tagged(tagged) => apply_merge_keys(&mut tagged.value, at),
        _ => Ok(()),
    }
}

fn merge_error(at: &[String], found: &Value) -> String {
    let place = if at.is_empty() { "the top level".to_owned() } else { format!("`{}`", at.join(":")) };
    format!(
        "the merge key `<<` at {place} must be an alias of a hash or a list of them \
         (like `<<: *defaults`), but holds {}",
        kind(found)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::*;

    #[test]
    fn anchors_and_merge_keys() {
        let text = r#"
.common: &common
  image: alpine:3
  before_script: [echo setup]
  variables: &common_vars
    A: "1"
    B: "2"
build:
  <<: *common
  variables:
    <<: *common_vars
    B: two
    C: "3"
  script: &build_script
    - make
test:
  <<: *common
  script: *build_script
"#;
        let build = job(text, "build");
        assert_eq!(build.image.as_deref(), Some("alpine:3"));
        assert_eq!(build.before_script, strings(&["echo setup"]));
        assert_eq!(build.variables, vars(&[("A", "1"), ("B", "two"), ("C", "3")]));
        assert_eq!(build.script, strings(&["make"]));
        let test = job(text, "test");
        assert_eq!(test.script, strings(&["make"]));
        assert_eq!(test.variables, vars(&[("A", "1"), ("B", "2")]));
    }

    #[test]
    fn nested_merge_keys_and_merge_lists() {
        let text = r#"
.base: &base
  image: base
  variables: {X: base}
  timeout: 1m
.middle: &middle
  <<: *base
  image: middle
.other: &other
  image: other
  stage: deploy
  timeout: 2m
j:
  <<: [*middle, *other]
  script: run
"#;
        let j = job(text, "j");
        // `.middle` overrides `.base`; the first of a merge list wins.
        assert_eq!(j.image.as_deref(), Some("middle"));
        assert_eq!(j.variables, vars(&[("X", "base")]));
        assert_eq!(j.timeout_secs, Some(60));
        assert_eq!(j.stage, "deploy");
    }

    #[test]
    fn merged_keys_take_the_place_of_the_merge_key() {
        let mut value: Value = serde_norway::from_str("a: &a {x: 1, y: 2}\nb: {w: 0, <<: *a, y: 3, z: 4}\n").unwrap();
        apply_merge_keys(&mut value, &mut Vec::new()).unwrap();
        let keys: Vec<&str> = value["b"].as_mapping().unwrap().keys().filter_map(Value::as_str).collect();
        assert_eq!(keys, ["w", "x", "y", "z"]);
        assert_eq!(value["b"]["y"], Value::from(3));
    }

    #[test]
    fn bad_merge_key_is_a_structure_error() {
        let e = error("j:\n  <<: just a string\n  script: x\n", "j");
        assert!(matches!(e, PipelineError::Structure { .. }), "{e:?}");
        assert!(e.to_string().contains("merge key `<<` at `j`"), "{e}");
    }

    #[test]
    fn parse_errors_give_the_location() {
        let e = error("build:\n  script: [make\n", "build");
        assert!(matches!(e, PipelineError::Parse { .. }), "{e:?}");
        let message = e.to_string();
        assert!(message.starts_with("failed to parse ci.yml as YAML at line 3, column 1"), "{message}");
        let source = std::error::Error::source(&e).expect("a source").to_string();
        assert!(source.contains("did not find expected ',' or ']'"), "{source}");

        let e = error("a:\n  script: x\nb: 1\nb: 2\n", "a");
        assert!(e.to_string().contains(" at line "), "{e}");
        let source = std::error::Error::source(&e).expect("a source").to_string();
        assert!(source.contains("duplicate entry with key \"b\""), "{source}");
    }

    #[test]
    fn document_shape() {
        let e = error("- a\n- b\n", "a");
        assert!(matches!(e, PipelineError::Structure { .. }), "{e:?}");
        assert!(e.to_string().contains("the top level is a list"), "{e}");
        let e = error("a: {script: x}\n---\nb: {script: y}\n", "a");
        assert!(e.to_string().contains("holds 2 YAML documents"), "{e}");
        // A `spec:` header document is skipped.
        let text = "spec:\n  inputs:\n    env: {default: dev}\n---\ndeploy:\n  script: ./deploy\n";
        assert_eq!(job(text, "deploy").script, strings(&["./deploy"]));
    }
}
