//! The YAML document: parsing, anchors and merge keys, and what its top-level
//! keys and values are.

use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use std::sync::LazyLock;

use regex::Regex;
use saphyr_parser::{Event, Marker, Parser, ScalarStyle, Span, StrInput, Tag};
use serde_norway::value::TaggedValue;
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

/// A scalar as a string, the way GitLab (Ruby's `to_s`) writes it.
pub(crate) fn scalar_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) if n.is_f64() => n.as_f64().map(ruby_float),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Where something is in a file: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    /// The line, from 1.
    pub line: usize,
    /// The column, from 1.
    pub column: usize,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

impl From<Marker> for Position {
    fn from(mark: Marker) -> Self {
        Position { line: mark.line(), column: mark.col() + 1 }
    }
}

/// Deepest nesting GitLab loads (`Gitlab::Config::Loader::Yaml::MAX_YAML_DEPTH`).
pub(crate) const MAX_DEPTH: usize = 100;

/// Most bytes a loaded file may take, counting each node as 40 bytes plus its
/// text: four times GitLab's `MAX_YAML_SIZE` of 1 MB (which counts Ruby's
/// object sizes), so that no file GitLab loads is refused, while an alias
/// bomb stops after a few megabytes.
pub(crate) const MAX_LOADED_BYTES: usize = 4 << 20;

/// What one node costs against [`MAX_LOADED_BYTES`].
const NODE_BYTES: usize = 40;

/// A loaded document: the top-level hash, where its keys are, and what the
/// loader has to say about it.
#[derive(Debug, Default)]
pub(crate) struct Document {
    pub(crate) root: Mapping,
    /// Where each top-level key is, and each key of a top-level hash
    /// (`"job"` and `"job:script"`).
    pub(crate) positions: HashMap<String, Position>,
    /// Duplicate keys and the like: accepted as GitLab accepts them, but worth a word.
    pub(crate) warnings: Vec<String>,
}

/// A node being built: its value, its cost and how deep it nests.
struct Node {
    value: Value,
    bytes: usize,
    height: usize,
}

struct Loader<'a> {
    events: Parser<'a, StrInput<'a>>,
    path: &'a Path,
    anchors: HashMap<usize, Rc<Node>>,
    loaded: usize,
    positions: HashMap<String, Position>,
    warnings: Vec<String>,
}

fn key_text(value: &Value) -> String {
    scalar_string(value).unwrap_or_else(|| kind(value).to_owned())
}

impl<'a> Loader<'a> {
    fn error(&self, at: Marker, message: impl Into<String>) -> PipelineError {
        PipelineError::Parse { path: self.path.to_owned(), at: at.into(), message: message.into() }
    }

    fn next(&mut self) -> Result<(Event<'a>, Span), PipelineError> {
        match self.events.next() {
            Some(Ok(event)) => Ok(event),
            Some(Err(e)) => Err(self.error(*e.marker(), format!("invalid YAML: {}; fix the syntax there", e.info()))),
            None => Err(self.error(Marker::default(), "the YAML ends too early")),
        }
    }

    fn charge(&mut self, bytes: usize, at: Marker) -> Result<(), PipelineError> {
        self.loaded = self.loaded.saturating_add(bytes);
        if self.loaded > MAX_LOADED_BYTES {
            return Err(self.error(
                at,
                format!(
                    "the parsed YAML is too big (more than {} MiB once aliases are expanded), \
                     as GitLab would say; look for aliases of aliases",
                    MAX_LOADED_BYTES >> 20
                ),
            ));
        }
        Ok(())
    }

    fn check_depth(&self, depth: usize, at: Marker) -> Result<(), PipelineError> {
        if depth > MAX_DEPTH {
            return Err(self.error(at, format!("the YAML nests deeper than {MAX_DEPTH} levels, which GitLab refuses")));
        }
        Ok(())
    }

    /// The documents of the stream.
    fn documents(&mut self) -> Result<Vec<(Value, Span)>, PipelineError> {
        let mut documents = Vec::new();
        loop {
            match self.next()? {
                (Event::StreamStart, _) | (Event::DocumentEnd, _) | (Event::Nothing, _) => {}
                (Event::StreamEnd, _) => return Ok(documents),
                (Event::DocumentStart(_), _) => {
                    let (event, span) = self.next()?;
                    let node = self.node(event, span, 1, &[])?;
                    documents.push((node.value, span));
                }
                (_, span) => return Err(self.error(span.start, "unexpected YAML outside a document")),
            }
        }
    }

    /// The node that starts with `event`; `at` is the key path (for positions).
    fn node(&mut self, event: Event<'a>, span: Span, depth: usize, at: &[String]) -> Result<Node, PipelineError> {
        self.check_depth(depth, span.start)?;
        let (node, anchor) = match event {
            Event::Alias(id) => {
                let Some(target) = self.anchors.get(&id).cloned() else {
                    return Err(self.error(span.start, "an alias of an unknown anchor"));
                };
                self.check_depth(depth + target.height, span.start)?;
                self.charge(target.bytes, span.start)?;
                let node = Node { value: target.value.clone(), bytes: target.bytes, height: target.height };
                return Ok(node);
            }
            Event::Scalar(text, style, anchor, tag) => {
                self.charge(NODE_BYTES + text.len(), span.start)?;
                let value = scalar(&text, style, tag.as_deref()).map_err(|message| self.error(span.start, message))?;
                (Node { value, bytes: NODE_BYTES + text.len(), height: 0 }, anchor)
            }
            Event::SequenceStart(anchor, tag) => {
                self.charge(NODE_BYTES, span.start)?;
                let mut items = Vec::new();
                let (mut bytes, mut height) = (NODE_BYTES, 0);
                loop {
                    let (event, item_span) = self.next()?;
                    if matches!(event, Event::SequenceEnd) {
                        break;
                    }
                    let item = self.node(event, item_span, depth + 1, &[])?;
                    bytes += item.bytes;
                    height = height.max(item.height + 1);
                    items.push(item.value);
                }
                (Node { value: tagged(Value::Sequence(items), tag.as_deref()), bytes, height }, anchor)
            }
            Event::MappingStart(anchor, tag) => {
                self.charge(NODE_BYTES, span.start)?;
                let (mapping, bytes, height) = self.mapping(depth, at)?;
                (Node { value: tagged(Value::Mapping(mapping), tag.as_deref()), bytes, height }, anchor)
            }
            _ => return Err(self.error(span.start, "unexpected YAML event")),
        };
        if anchor != 0 {
            let stored = Node { value: node.value.clone(), bytes: node.bytes, height: node.height };
            self.anchors.insert(anchor, Rc::new(stored));
        }
        Ok(node)
    }

    /// The pairs of a mapping, up to its end, merged as Ruby's Psych merges
    /// them (`Psych::Visitors::ToRuby#revive_hash`): a `<<` key (unless
    /// tagged `!!str`) whose value is a hash merges it in *at that point*,
    /// replacing keys set before it; a list of hashes merges them with the
    /// first one winning; a repeated key replaces the value in place.
    fn mapping(&mut self, depth: usize, at: &[String]) -> Result<(Mapping, usize, usize), PipelineError> {
        let mut mapping = Mapping::new();
        let (mut bytes, mut height) = (NODE_BYTES, 0);
        let mut seen: HashMap<Value, Position> = HashMap::new();
        loop {
            let (event, key_span) = self.next()?;
            if matches!(event, Event::MappingEnd) {
                break;
            }
            let is_merge = matches!(&event, Event::Scalar(text, _, _, tag)
                if text == "<<" && !tag.as_ref().is_some_and(|t| t.is_yaml_core_schema() && t.suffix == "str"));
            let key = self.node(event, key_span, depth + 1, &[])?;
            let mut path = at.to_vec();
            if depth <= 2 {
                path.push(key_text(&key.value));
                self.positions.entry(path.join(":")).or_insert(key_span.start.into());
            }
            let (event, value_span) = self.next()?;
            let value = self.node(event, value_span, depth + 1, &path)?;
            bytes += key.bytes + value.bytes;
            height = height.max(key.height.max(value.height) + 1);
            if is_merge {
                self.merge(&mut mapping, value.value, key_span.start)?;
                continue;
            }
            if let Some(first) = seen.get(&key.value) {
                let here = Position::from(key_span.start);
                self.warnings.push(format!(
                    "{}:{here}: the key `{}` is repeated (first at line {}); the last one wins, as in GitLab",
                    self.path.display(),
                    key_text(&key.value),
                    first.line
                ));
            } else {
                seen.insert(key.value.clone(), key_span.start.into());
            }
            mapping.insert(key.value, value.value);
        }
        Ok((mapping, bytes, height))
    }

    fn merge(&self, mapping: &mut Mapping, value: Value, at: Marker) -> Result<(), PipelineError> {
        let bad = |found: &Value| {
            self.error(
                at,
                format!(
                    "the merge key `<<` must hold an alias of a hash or a list of them \
                     (like `<<: *defaults`), but holds {}",
                    kind(found)
                ),
            )
        };
        match value {
            Value::Mapping(source) => {
                for (key, value) in source {
                    mapping.insert(key, value);
                }
            }
            Value::Sequence(items) => {
                let mut merged = Mapping::new();
                for item in items.into_iter().rev() {
                    match item {
                        Value::Mapping(source) => {
                            for (key, value) in source {
                                merged.insert(key, value);
                            }
                        }
                        other => return Err(bad(&other)),
                    }
                }
                for (key, value) in merged {
                    mapping.insert(key, value);
                }
            }
            other => return Err(bad(&other)),
        }
        Ok(())
    }
}

fn tagged(value: Value, tag: Option<&Tag>) -> Value {
    match tag {
        None => value,
        Some(tag) if tag.is_yaml_core_schema() => value,
        Some(tag) => {
            Value::Tagged(Box::new(TaggedValue { tag: serde_norway::value::Tag::new(tag.suffix.clone()), value }))
        }
    }
}

/// A scalar as Ruby's Psych reads it (YAML 1.1 types, `Psych::ScalarScanner#tokenize`):
/// only plain scalars without a tag are typed; quoted and block ones are strings.
fn scalar(text: &str, style: ScalarStyle, tag: Option<&Tag>) -> Result<Value, String> {
    match tag {
        Some(tag) if tag.is_yaml_core_schema() => {
            return match tag.suffix.as_str() {
                "str" => Ok(Value::String(text.to_owned())),
                "null" => Ok(Value::Null),
                _ => Ok(ruby_scalar(text)?),
            }
        }
        Some(tag) => return Ok(tagged(Value::String(text.to_owned()), Some(tag))),
        None => {}
    }
    if style != ScalarStyle::Plain {
        return Ok(Value::String(text.to_owned()));
    }
    ruby_scalar(text)
}

/// Psych's patterns (`Psych::ScalarScanner`), for single-line text.
struct Patterns {
    word: Regex,
    time: Regex,
    date: Regex,
    base60_int: Regex,
    base60_float: Regex,
    float: Regex,
    integer: Regex,
}

static PATTERNS: LazyLock<Patterns> = LazyLock::new(|| {
    let re = |pattern: &str| Regex::new(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}"));
    Patterns {
        word: re(r"^[^\d.:-]?[A-Za-z_\s!@#$%^&*(){}<>|/\\~;=]+"),
        time: re(
            r"^-?\d{4}-\d{1,2}-\d{1,2}(?:[Tt]|\s+)\d{1,2}:\d\d:\d\d(?:\.\d*)?(?:\s*(?:Z|[-+]\d{1,2}:?(?:\d\d)?))?$",
        ),
        date: re(r"^\d{4}-(?:1[012]|0\d|\d)-(?:[12]\d|3[01]|0\d|\d)$"),
        base60_int: re(r"^[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+$"),
        base60_float: re(r"^[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+\.[0-9_]*$"),
        float: re(
            r"^(?:[-+]?([0-9][0-9_,]*)?\.[0-9]*([eE][-+][0-9]+)?|[-+]?[0-9][0-9_,]*(:[0-5]?[0-9])+\.[0-9_]*|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN))$",
        ),
        integer: re(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    }
});

/// `Psych::ScalarScanner#tokenize` for a plain scalar: YAML 1.1 nulls,
/// booleans (`yes`/`no`/`on`/`off` too), integers (`0755` is octal, `1_000`
/// and `1,000` are 1000, `1:30` is 90), floats (`1.5`, `.inf`; `1e3` is a
/// string); dates and times, which GitLab's safe loading refuses, are an error.
pub(crate) fn ruby_scalar(text: &str) -> Result<Value, String> {
    let p = &*PATTERNS;
    let string = || Ok(Value::String(text.to_owned()));
    if text.is_empty() {
        return Ok(Value::Null);
    }
    if p.word.is_match(text) || text.contains('\n') {
        if text.chars().count() > 5 {
            return string();
        }
        return match text.to_ascii_lowercase().as_str() {
            "~" | "null" => Ok(Value::Null),
            "yes" | "true" | "on" => Ok(Value::Bool(true)),
            "no" | "false" | "off" => Ok(Value::Bool(false)),
            _ => string(),
        };
    }
    if p.time.is_match(text) || p.date.is_match(text) {
        return Err(format!(
            "`{text}` is an unquoted date or time, which GitLab refuses to load \
             (\"Tried to load unspecified class\"); quote it"
        ));
    }
    match text.to_ascii_lowercase().as_str() {
        ".inf" => return Ok(Value::from(f64::INFINITY)),
        "-.inf" => return Ok(Value::from(f64::NEG_INFINITY)),
        ".nan" => return Ok(Value::from(f64::NAN)),
        _ => {}
    }
    if text.starts_with(':') && text.len() > 1 {
        // A Ruby symbol: GitLab writes it back without the colon.
        return Ok(Value::String(text[1..].trim_matches(['"', '\'']).to_owned()));
    }
    let sign: i32 = if text.starts_with('-') { -1 } else { 1 };
    let parts = || text.trim_start_matches(['-', '+']).split(':').map(|n| n.replace('_', ""));
    if p.base60_int.is_match(text) {
        let mut total: i64 = 0;
        for part in parts() {
            total = total.saturating_mul(60).saturating_add(part.parse::<i64>().unwrap_or(0));
        }
        return Ok(Value::from(i64::from(sign) * total));
    }
    if p.base60_float.is_match(text) {
        let mut total = 0.0;
        for part in parts() {
            total = total * 60.0 + part.parse::<f64>().unwrap_or(0.0);
        }
        return Ok(Value::from(f64::from(sign) * total));
    }
    if p.float.is_match(text) {
        if matches!(text, "." | "+." | "-.") {
            return string();
        }
        let clean: String = text.chars().filter(|c| *c != ',' && *c != '_').collect();
        let clean = clean.strip_suffix('.').unwrap_or(&clean);
        let clean = if clean.contains("inf") || clean.contains("Inf") || clean.contains("INF") {
            clean.to_ascii_lowercase()
        } else {
            clean.to_owned()
        };
        return Ok(clean.parse::<f64>().map(Value::from).unwrap_or_else(|_| Value::String(text.to_owned())));
    }
    let clean: String = text.chars().filter(|c| *c != ',' && *c != '_').collect();
    if p.integer.is_match(&clean) {
        if let Some(n) = ruby_integer(&clean) {
            return Ok(Value::from(n));
        }
    }
    string()
}

/// Ruby's `Integer()` of text Psych's INTEGER matched: `0b`, `0x`, a leading
/// `0` for octal, else decimal.
fn ruby_integer(text: &str) -> Option<i64> {
    let (negative, body) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let (radix, digits) = if let Some(d) = body.strip_prefix("0b") {
        (2, d)
    } else if let Some(d) = body.strip_prefix("0x") {
        (16, d)
    } else if body.len() > 1 && body.starts_with('0') {
        (8, &body[1..])
    } else {
        (10, body)
    };
    let n = i64::from_str_radix(digits, radix).ok()?;
    Some(if negative { -n } else { n })
}

/// Ruby's `Float#to_s`: the shortest digits that read back, in fixed
/// notation from 1e-4 up to 1e16 (always with a `.`), else as `1.0e+20`.
pub(crate) fn ruby_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_owned();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    let scientific = format!("{x:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let point = exponent + 1;
    if x != 0.0 && !(-3..=16).contains(&point) {
        let mantissa = if mantissa.contains('.') { mantissa.to_owned() } else { format!("{mantissa}.0") };
        let sign = if exponent < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exponent.abs());
    }
    let fixed = format!("{x}");
    if fixed.contains('.') {
        fixed
    } else {
        format!("{fixed}.0")
    }
}

/// Parses the text into its top-level hash as GitLab loads it.
pub(crate) fn parse_document(text: &str, path: &Path) -> Result<Document, PipelineError> {
    let mut loader = Loader {
        events: Parser::new_from_str(text),
        path,
        anchors: HashMap::new(),
        loaded: 0,
        positions: HashMap::new(),
        warnings: Vec::new(),
    };
    let mut documents = loader.documents()?;
    let is_spec_header = |value: &Value| match value {
        Value::Mapping(m) => m.len() == 1 && m.contains_key("spec"),
        _ => false,
    };
    let (document, span) = match documents.len() {
        0 => (Value::Null, Span::default()),
        1 => documents.pop().unwrap_or_default(),
        2 if is_spec_header(&documents[0].0) => documents.pop().unwrap_or_default(),
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
    let root = match document {
        Value::Null => Mapping::new(),
        Value::Mapping(root) => root,
        other => {
            return Err(PipelineError::Structure {
                path: path.to_owned(),
                message: format!(
                    "the top level (line {}) is {}, but a pipeline is a hash of jobs and global keywords",
                    span.start.line(),
                    kind(&other)
                ),
            })
        }
    };
    Ok(Document { root, positions: loader.positions, warnings: loader.warnings })
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

    fn root(text: &str) -> Mapping {
        parse_document(text, path()).unwrap_or_else(|e| panic!("{e}")).root
    }

    fn keys(value: &Value) -> Vec<String> {
        value.as_mapping().unwrap().keys().map(|k| scalar_string(k).unwrap()).collect()
    }

    /// Psych merges a `<<` where it stands: it replaces the keys before it,
    /// and keys after it replace merged ones; in a list the first hash wins
    /// (`Psych::Visitors::ToRuby#revive_hash`). Ruby hashes keep the place
    /// of the first insertion of a key.
    #[test]
    fn merge_keys_as_psych_merges_them() {
        let root = root("a: &a {x: 1, y: 2}\nb: &b {y: 20, z: 30}\nm: {w: 0, x: 9, <<: *a, y: 3}\nn: {<<: *a, <<: *b}\nl: {<<: [*a, *b]}\n");
        assert_eq!(keys(&root["m"]), ["w", "x", "y"]);
        assert_eq!(root["m"]["x"], Value::from(1), "a `<<` after an explicit key overrides it");
        assert_eq!(root["m"]["y"], Value::from(3));
        assert_eq!(root["n"]["y"], Value::from(20), "a repeated `<<` merges again: the later wins");
        assert_eq!(keys(&root["n"]), ["x", "y", "z"]);
        assert_eq!(root["l"]["y"], Value::from(2), "in a list, the first hash wins");
        // A quoted `<<` is a merge key too, in Psych; `!!str <<` is not.
        let root = self::root("a: &a {x: 1}\nq: {'<<': *a}\ns: {!!str '<<': 1}\n");
        assert_eq!(root["q"]["x"], Value::from(1));
        assert_eq!(keys(&root["s"]), ["<<"]);
    }

    #[test]
    fn duplicate_keys_last_wins_with_a_warning() {
        let document = parse_document("a:\n  script: x\nb: 1\nb: 2\n", path()).unwrap();
        assert_eq!(document.root["b"], Value::from(2));
        assert_eq!(keys(&Value::Mapping(document.root)), ["a", "b"]);
        assert_eq!(
            document.warnings,
            ["ci.yml:4:1: the key `b` is repeated (first at line 3); the last one wins, as in GitLab"]
        );
    }

    /// YAML 1.1 scalars as Psych's `ScalarScanner` reads them.
    #[test]
    fn scalars_as_psych_reads_them() {
        let cases: &[(&str, Value)] = &[
            ("0755", Value::from(493)),
            ("1_000", Value::from(1000)),
            ("1,000", Value::from(1000)),
            ("0x1F", Value::from(31)),
            ("0b101", Value::from(5)),
            ("-12", Value::from(-12)),
            ("1:30", Value::from(90)),
            ("08", Value::from("08")),
            ("0o17", Value::from("0o17")),
            ("1e3", Value::from("1e3")),
            ("1.10", Value::from(1.1)),
            ("1.", Value::from(1.0)),
            ("-.5", Value::from(-0.5)),
            ("yes", Value::Bool(true)),
            ("On", Value::Bool(true)),
            ("OFF", Value::Bool(false)),
            ("no", Value::Bool(false)),
            ("y", Value::from("y")),
            ("~", Value::Null),
            ("NULL", Value::Null),
            ("truely", Value::from("truely")),
            ("v1.2", Value::from("v1.2")),
            ("$HOME", Value::from("$HOME")),
            ("-", Value::from("-")),
            (":sym", Value::from("sym")),
        ];
        for (text, want) in cases {
            assert_eq!(&ruby_scalar(text).unwrap(), want, "{text}");
        }
        assert!(ruby_scalar(".inf").unwrap().as_f64().unwrap().is_infinite());
        let root = root("a: '0755'\nb: \"yes\"\nc: !!str 12\nd: |\n  on\n");
        for (key, want) in [("a", "0755"), ("b", "yes"), ("c", "12"), ("d", "on\n")] {
            assert_eq!(root[key], Value::from(want), "{key}");
        }
        for date in ["2024-01-31", "2001-12-14t21:59:43.10-05:00", "2001-12-14 21:59:43"] {
            let e = ruby_scalar(date).unwrap_err();
            assert!(e.contains("unquoted date or time"), "{date}: {e}");
        }
    }

    #[test]
    fn floats_as_ruby_writes_them() {
        for (x, want) in [
            (1.1, "1.1"),
            (1000.0, "1000.0"),
            (-0.5, "-0.5"),
            (0.0, "0.0"),
            (0.0001, "0.0001"),
            (0.00001, "1.0e-05"),
            (1e15, "1000000000000000.0"),
            (1e16, "1.0e+16"),
            (1.5e300, "1.5e+300"),
            (f64::INFINITY, "Infinity"),
        ] {
            assert_eq!(ruby_float(x), want, "{x}");
        }
    }

    #[test]
    fn bad_merge_key_is_an_error_with_a_position() {
        let e = error("j:\n  <<: just a string\n  script: x\n", "j");
        assert!(matches!(e, PipelineError::Parse { at: Position { line: 2, column: 3 }, .. }), "{e:?}");
        assert!(e.to_string().contains("merge key `<<` must hold an alias of a hash"), "{e}");
    }

    #[test]
    fn parse_errors_give_the_position() {
        let e = error("build:\n  script: [make\n", "build");
        assert!(matches!(e, PipelineError::Parse { .. }), "{e:?}");
        let message = e.to_string();
        assert!(message.starts_with("ci.yml:3:1: invalid YAML: "), "{message}");
    }

    #[test]
    fn alias_bombs_stop_with_a_position() {
        let mut text = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n".to_owned();
        for i in 1..12 {
            let p = i - 1;
            let list = vec![format!("*a{p}"); 10].join(", ");
            text.push_str(&format!("a{i}: &a{i} [{list}]\n"));
        }
        let started = std::time::Instant::now();
        let e = error(&text, "a");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(e.to_string().contains("the parsed YAML is too big"), "{e}");
        assert!(matches!(e, PipelineError::Parse { at: Position { line, .. }, .. } if line > 1), "{e:?}");
        // Deep nesting, through aliases too.
        let deep = format!("j: {}{}\n", "[".repeat(150), "]".repeat(150));
        assert!(error(&deep, "j").to_string().contains("deeper than 100"));
        let text = format!("a: &a {}x{}\nb: {}*a{}\n", "[".repeat(60), "]".repeat(60), "[".repeat(60), "]".repeat(60));
        assert!(error(&text, "b").to_string().contains("deeper than 100"));
    }

    #[test]
    fn document_shape() {
        let e = error("- a\n- b\n", "a");
        assert!(matches!(e, PipelineError::Structure { .. }), "{e:?}");
        assert!(e.to_string().contains("the top level (line 1) is a list"), "{e}");
        let e = error("a: {script: x}\n---\nb: {script: y}\n", "a");
        assert!(e.to_string().contains("holds 2 YAML documents"), "{e}");
        // A `spec:` header document is skipped.
        let text = "spec:\n  inputs:\n    env: {default: dev}\n---\ndeploy:\n  script: ./deploy\n";
        assert_eq!(job(text, "deploy").script, strings(&["./deploy"]));
    }
}
