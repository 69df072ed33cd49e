//! What the job log shows: pure functions from a hook's input to text.
//!
//! Every value that came from the job passes through the [`Mask`] before it
//! is escaped or shortened, so a secret is never cut in half and shown.

use std::fmt::Write as _;

use std::borrow::Cow;
use std::collections::HashMap;

use berth_backend_api::{script, JobContext, Variable};

use crate::fold::{self, Piece};
use crate::mask::Mask;
use crate::Simulated;

/// The first line of every prepare.
pub(crate) const HEADER: &str = "Dry run: nothing is executed; showing what the runner sends.";

/// Values longer than this (in characters) are shortened in the job log; the
/// transcript keeps them whole.
const MAX_SHOWN_CHARS: usize = 200;

/// A stage script as read from the file the runner wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Script {
    /// The stage body, decoded from the runner's `eval $'...'` wrapper.
    Decoded(String),
    /// The file's text: it is not in the runner's format.
    Raw(String),
}

impl Script {
    /// Decodes `text` if it is in the runner's format.
    pub(crate) fn parse(text: &str) -> Self {
        match script::body(text) {
            Some(body) => Script::Decoded(body),
            None => Script::Raw(text.to_owned()),
        }
    }

    /// The text to show: the body, or the whole file.
    pub(crate) fn text(&self) -> &str {
        match self {
            Script::Decoded(text) | Script::Raw(text) => text,
        }
    }
}

/// The job log of prepare: the header, the job, its image and its variables.
pub(crate) fn prepare(job: &JobContext, mask: &Mask) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{HEADER}");
    match job.response() {
        Some(response) => {
            let info = &response.job_info;
            let _ = write!(out, "Job {}", response.id);
            if !info.name.is_empty() {
                let _ = write!(out, " {}", quoted(&mask.redact(&info.name)));
            }
            if !info.stage.is_empty() {
                let _ = write!(out, " (stage {})", one_line(&mask.redact(&info.stage)));
            }
            if !info.project_full_path.is_empty() {
                let _ = write!(out, " of {}", one_line(&mask.redact(&info.project_full_path)));
            }
            if let Some(timeout) = job.timeout() {
                let _ = write!(out, ", timeout {timeout} s");
            }
            out.push('\n');
        }
        None => {
            let _ = writeln!(out, "Job {} (no job payload: JOB_RESPONSE_FILE is not set)", job.key().id());
        }
    }
    match job.image() {
        Some(image) => {
            let _ = writeln!(out, "Image: {}", one_line(&mask.redact(image)));
        }
        None => out.push_str("Image: none\n"),
    }
    let variables = job.variables();
    if variables.is_empty() {
        out.push_str("Variables: none\n");
    } else {
        let _ = writeln!(out, "Variables ({}):", variables.len());
    }
    for var in variables {
        let key = one_line(&mask.redact(&var.key));
        let file = if var.file { "(file) " } else { "" };
        let value = if var.masked { crate::MASKED.to_owned() } else { shown_value(&mask.redact(&var.value), var.file) };
        let _ = writeln!(out, "  {key}={file}{value}");
    }
    out
}

/// The job log of one run stage: a header line and the script, indented.
///
/// With the job's `prepared` variables (the ones prepare listed), a body in
/// the runner's format is folded (see [`fold`](crate::fold::fold)): runs of
/// exports whose values are the prepared ones become one line, and long
/// heredoc bodies one line with their size. Without them (`full_scripts`), and
/// for a script not in the runner's format, every line is shown.
pub(crate) fn stage(stage: &str, script: &Script, mask: &Mask, prepared: Option<&[Variable]>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "── stage {} ──", one_line(stage));
    if let Script::Raw(_) = script {
        out.push_str("(not in the runner's script format: showing the file as it is)\n");
    }
    let text = mask.redact(script.text());
    if text.trim().is_empty() {
        out.push_str("  (empty)\n");
        return out;
    }
    let lines = body_lines(&text);
    let prepared = match (script, prepared) {
        (Script::Decoded(_), Some(prepared)) => prepared,
        _ => {
            for line in lines {
                let _ = writeln!(out, "  {}", visible(line));
            }
            return out;
        }
    };
    // Values are compared unmasked, line by line, unless masking joined lines
    // (a secret with a newline): then as shown, with the values prepare showed.
    let raw = body_lines(script.text());
    let unmasked = raw.len() == lines.len();
    let values: Vec<(&str, Cow<'_, str>)> = prepared
        .iter()
        .rev() // the first of duplicates wins, as in JobContext::variable
        .map(|var| {
            let value = if unmasked {
                Cow::Borrowed(var.value.as_str())
            } else if var.masked {
                Cow::Borrowed(crate::MASKED)
            } else {
                mask.redact(&var.value)
            };
            (var.key.as_str(), value)
        })
        .collect();
    let prepared: HashMap<&str, &str> = values.iter().map(|(k, v)| (*k, v.as_ref())).collect();
    let values = if unmasked { &raw } else { &lines };
    for piece in fold::fold(&lines, values, &prepared) {
        match piece {
            Piece::Line(line) => {
                let _ = writeln!(out, "  {}", visible(line));
            }
            Piece::Exports(count) => {
                let _ = writeln!(out, "  export: {count} variables (values as listed at prepare)");
            }
            Piece::Data { lines, bytes } => {
                let _ = writeln!(out, "  … {lines} lines of data ({}) …", size(bytes));
            }
        }
    }
    out
}

/// The lines of a body, split on '\n' only, so that a '\r' before it is
/// shown, not dropped.
fn body_lines(text: &str) -> Vec<&str> {
    text.strip_suffix('\n').unwrap_or(text).split('\n').collect()
}

/// A size in KiB with one decimal, in bytes below 1 KiB.
fn size(bytes: usize) -> String {
    if bytes < 1024 {
        format!("{bytes} bytes")
    } else {
        let kib = bytes as f64 / 1024.0;
        format!("{kib:.1} KiB")
    }
}

/// The job log line announcing a simulated failure of `stage`.
pub(crate) fn simulated(stage: &str, failure: Simulated) -> String {
    match failure {
        Simulated::Build(code) => {
            format!("Dry run: simulating a build failure of {stage} with exit code {code} (settings.fail_stage).\n")
        }
        Simulated::System => format!("Dry run: simulating a system failure of {stage} (settings.fail_stage).\n"),
    }
}

/// A variable's value on one line: quoted and escaped when it has control
/// characters, quotes, backslashes or edge spaces (always for a file
/// variable), and shortened when long.
fn shown_value(value: &str, file: bool) -> String {
    let total = value.chars().count();
    let head: String = value.chars().take(MAX_SHOWN_CHARS).collect();
    let mut shown = if file || needs_quotes(&head) { quoted(&head) } else { head };
    if total > MAX_SHOWN_CHARS {
        let _ = write!(shown, "… ({} bytes)", value.len());
    }
    shown
}

fn needs_quotes(text: &str) -> bool {
    text.chars().any(|c| c.is_control() || c == '"' || c == '\\')
        || text.starts_with(char::is_whitespace)
        || text.ends_with(char::is_whitespace)
}

/// `text` in double quotes, with `"`, `\` and control characters escaped.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => push_char(&mut out, c),
        }
    }
    out.push('"');
    out
}

/// `text` with every control character escaped (so it stays on one line).
fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    text.chars().for_each(|c| push_char(&mut out, c));
    out
}

/// A script line with control characters other than tab escaped, so that a
/// carriage return or a terminal escape cannot hide or restyle what is shown.
fn visible(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    for c in line.chars() {
        if c == '\t' {
            out.push(c);
        } else {
            push_char(&mut out, c);
        }
    }
    out
}

fn push_char(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\t' => out.push_str("\\t"),
        '\r' => out.push_str("\\r"),
        c if c.is_control() && (c as u32) < 0x80 => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c if c.is_control() => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
        c => out.push(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_shown_on_one_line() {
        assert_eq!(shown_value("hello", false), "hello");
        assert_eq!(shown_value("", false), "");
        assert_eq!(shown_value("line one\nline two", false), r#""line one\nline two""#);
        assert_eq!(shown_value("say \"hi\"", false), r#""say \"hi\"""#);
        assert_eq!(shown_value(" padded", false), r#"" padded""#);
        assert_eq!(shown_value("a: b\n", true), r#""a: b\n""#);
        assert_eq!(shown_value("plain", true), r#""plain""#);
        assert_eq!(shown_value("\x1b[31m\u{85}", false), r#""\x1b[31m\u{85}""#);
    }

    #[test]
    fn long_values_are_shortened() {
        let long = "x".repeat(500);
        let shown = shown_value(&long, false);
        assert_eq!(shown, format!("{}… (500 bytes)", "x".repeat(MAX_SHOWN_CHARS)));
    }

    #[test]
    fn script_lines_keep_tabs_and_show_other_control_characters() {
        assert_eq!(visible("a\tb\rc\x1bd"), "a\tb\\rc\\x1bd");
        let shown = stage("weird\nstage", &Script::Raw("echo hi\r\n".into()), &Mask::none(), Some(&[]));
        assert_eq!(
            shown,
            "── stage weird\\nstage ──\n(not in the runner's script format: showing the file as it is)\n  echo hi\\r\n"
        );
        assert_eq!(stage("s", &Script::Decoded("\n".into()), &Mask::none(), Some(&[])), "── stage s ──\n  (empty)\n");
    }

    #[test]
    fn simulated_failures_name_the_setting() {
        assert_eq!(
            simulated("build_script", Simulated::Build(42)),
            "Dry run: simulating a build failure of build_script with exit code 42 (settings.fail_stage).\n"
        );
        assert!(simulated("prepare", Simulated::System).contains("system failure of prepare"));
    }
}
