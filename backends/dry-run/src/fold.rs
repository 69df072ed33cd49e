//! Folding a stage body for the job log, so that the commands stand out.
//!
//! Two things fill a stage body without telling a pipeline author much: the
//! `export NAME=$'value'` lines that repeat the job's variables at the top of
//! every stage (their values were listed at prepare), and the data of long
//! heredocs (the project sources as base64 in `get_sources`). [`fold`] turns a
//! body's lines into [`Piece`]s that keep everything else as it is. The
//! transcript keeps the whole body.

use std::collections::HashMap;

use berth_backend_api::script;

/// Heredoc bodies of more lines than this are elided.
pub(crate) const MAX_HEREDOC_LINES: usize = 3;

/// Runs of fewer exports with their prepare values than this are not folded:
/// the summary would not be shorter than the lines.
const MIN_FOLDED_EXPORTS: usize = 2;

/// What the job log shows for a stretch of a stage body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece<'a> {
    /// One line of the body, as it is.
    Line(&'a str),
    /// This many consecutive exports whose values are the ones prepare listed.
    Exports(usize),
    /// The elided body of a heredoc: its number of lines and of bytes
    /// (newlines included).
    Data {
        /// Lines left out.
        lines: usize,
        /// Bytes left out.
        bytes: usize,
    },
}

/// Folds a stage body's `lines`.
///
/// Each maximal run of `export NAME=VALUE` lines becomes one [`Piece::Exports`]
/// for the exports whose value is `prepared[NAME]`, followed by the other
/// exports of the run as lines, in order (a run with fewer than two such
/// exports stays as it is). The body of a heredoc longer than
/// [`MAX_HEREDOC_LINES`] becomes one [`Piece::Data`] between the line that
/// starts it and its delimiter line.
///
/// `values` is read instead of `lines` to compare an export's value (the same
/// number of lines: the unmasked body, when `lines` is masked); `lines` decides
/// the shape and is what is shown.
pub(crate) fn fold<'a>(lines: &[&'a str], values: &[&str], prepared: &HashMap<&str, &str>) -> Vec<Piece<'a>> {
    let values = if values.len() == lines.len() { values } else { lines };
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if export(line).is_some() {
            let end = (i..lines.len()).find(|&j| export(lines[j]).is_none()).unwrap_or(lines.len());
            fold_exports(&lines[i..end], &values[i..end], prepared, &mut out);
            i = end;
            continue;
        }
        out.push(Piece::Line(line));
        i += 1;
        let Some(bodies) = heredoc_bodies(line, &lines[i..]) else {
            continue;
        };
        for body in bodies {
            let body = &lines[i..i + body];
            if body.len() > MAX_HEREDOC_LINES {
                out.push(Piece::Data { lines: body.len(), bytes: body.iter().map(|l| l.len() + 1).sum() });
            } else {
                out.extend(body.iter().map(|l| Piece::Line(l)));
            }
            out.push(Piece::Line(lines[i + body.len()]));
            i += body.len() + 1;
        }
    }
    out
}

/// One run of export lines: see [`fold`].
fn fold_exports<'a>(lines: &[&'a str], values: &[&str], prepared: &HashMap<&str, &str>, out: &mut Vec<Piece<'a>>) {
    let unchanged: Vec<bool> = lines
        .iter()
        .zip(values)
        .map(|(line, value)| {
            let name = export(line).map(|(name, _)| name);
            export(value).is_some_and(|(key, value)| Some(key) == name && prepared.get(key) == Some(&value.as_str()))
        })
        .collect();
    let folded = unchanged.iter().filter(|&&same| same).count();
    if folded < MIN_FOLDED_EXPORTS {
        out.extend(lines.iter().map(|l| Piece::Line(l)));
        return;
    }
    out.push(Piece::Exports(folded));
    out.extend(lines.iter().zip(&unchanged).filter(|(_, &same)| !same).map(|(l, _)| Piece::Line(l)));
}

/// The name and value of a line `export NAME=VALUE`, where VALUE is one
/// `$'...'` string (decoded), one `'...'` string, or a word the runner leaves
/// unquoted (letters, digits, `,-./@_`) or masked; `None` for any other line.
pub(crate) fn export(line: &str) -> Option<(&str, String)> {
    let (name, value) = line.strip_prefix("export ")?.split_once('=')?;
    if !is_name(name) {
        return None;
    }
    let value = if let Some(quoted) = value.strip_prefix("$'") {
        let (decoded, used) = script::decode(quoted)?;
        (used == quoted.len()).then_some(decoded)?
    } else if value == crate::MASKED
        || !value.is_empty() && value.bytes().all(|b| b.is_ascii_alphanumeric() || b",-./@_".contains(&b))
    {
        value.to_owned()
    } else {
        let inner = value.strip_prefix('\'')?.strip_suffix('\'')?;
        (!inner.contains('\'')).then(|| inner.to_owned())?
    };
    Some((name, value))
}

/// A shell variable name.
fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// For a line that starts heredocs, the number of body lines of each (each
/// body is followed by its delimiter line in `rest`, the lines after it);
/// `None` if the line starts none or a delimiter is missing.
fn heredoc_bodies(line: &str, rest: &[&str]) -> Option<Vec<usize>> {
    let starts = heredocs(line);
    if starts.is_empty() {
        return None;
    }
    let mut bodies = Vec::with_capacity(starts.len());
    let mut from = 0;
    for (word, strip_tabs) in starts {
        let end = (from..rest.len()).find(|&j| {
            let candidate = if strip_tabs { rest[j].trim_start_matches('\t') } else { rest[j] };
            candidate == word
        })?;
        bodies.push(end - from);
        from = end + 1;
    }
    Some(bodies)
}

/// The delimiters of the heredocs that `line` starts (`<<WORD`, `<<'WORD'`,
/// `<<"WORD"`, `<<-WORD`, ...), in order, each with whether leading tabs are
/// stripped (`<<-`). `<<` inside quotes or a comment and `<<<` are skipped.
pub(crate) fn heredocs(line: &str) -> Vec<(String, bool)> {
    let chars: Vec<char> = line.chars().collect();
    let mut out = Vec::new();
    let mut word_start = true;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' => i += 2,
            '\'' => i = closing(&chars, i + 1, '\'', false) + 1,
            '"' => i = closing(&chars, i + 1, '"', true) + 1,
            '$' if chars.get(i + 1) == Some(&'\'') => {
                i = closing(&chars, i + 2, '\'', true) + 1;
            }
            '#' if word_start => break,
            '<' if chars.get(i + 1) == Some(&'<') => {
                if chars.get(i + 2) == Some(&'<') {
                    i += 3;
                } else {
                    i += 2;
                    let strip_tabs = chars.get(i) == Some(&'-');
                    if strip_tabs {
                        i += 1;
                    }
                    while chars.get(i).is_some_and(|&c| c == ' ' || c == '\t') {
                        i += 1;
                    }
                    let (word, end) = shell_word(&chars, i);
                    if !word.is_empty() {
                        out.push((word, strip_tabs));
                    }
                    i = end;
                }
                word_start = false;
                continue;
            }
            _ => i += 1,
        }
        word_start = c.is_whitespace() || matches!(c, ';' | '|' | '&' | '(' | ')');
    }
    out
}

/// The index of the `quote` that closes a quoted string whose text starts at
/// `from` (the end of `chars` if none); `escapes`: a backslash escapes the
/// next character.
fn closing(chars: &[char], from: usize, quote: char, escapes: bool) -> usize {
    let mut i = from;
    while i < chars.len() {
        match chars[i] {
            '\\' if escapes => i += 2,
            c if c == quote => return i,
            _ => i += 1,
        }
    }
    chars.len()
}

/// The shell word starting at `from`, with its quotes removed, and the index
/// after it.
fn shell_word(chars: &[char], from: usize) -> (String, usize) {
    let mut word = String::new();
    let mut i = from;
    while let Some(&c) = chars.get(i) {
        match c {
            c if c.is_whitespace() || matches!(c, ';' | '|' | '&' | '<' | '>' | '(' | ')') => break,
            '\'' | '"' => {
                let end = closing(chars, i + 1, c, c == '"');
                word.extend(&chars[i + 1..end.min(chars.len())]);
                i = end + 1;
            }
            '\\' => {
                word.extend(chars.get(i + 1));
                i += 2;
            }
            c => {
                word.push(c);
                i += 1;
            }
        }
    }
    (word, i.min(chars.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn exports_parse_only_when_the_whole_line_is_one_export() {
        assert_eq!(export("export A=$'x\\ny'"), Some(("A", "x\ny".into())));
        assert_eq!(export("export _B2=$'it\\'s'"), Some(("_B2", "it's".into())));
        assert_eq!(export("export P='/a b'"), Some(("P", "/a b".into())));
        assert_eq!(export("export E=''"), Some(("E", String::new())));
        // The runner leaves a value of letters, digits and `,-./@_` unquoted.
        assert_eq!(export("export CI_JOB_ID=48151623"), Some(("CI_JOB_ID", "48151623".into())));
        assert_eq!(export("export T=[MASKED]"), Some(("T", "[MASKED]".into())));
        for not in [
            "export A=$'x' && rm -rf /",
            "export A=$'unterminated",
            "export A='x'y'",
            "export A='",
            "export A=plain word",
            "export A=$HOME",
            "export 1A=$'x'",
            "export A-B=$'x'",
            " export A=$'x'",
            "exportA=$'x'",
            "echo export A=$'x'",
        ] {
            assert_eq!(export(not), None, "{not}");
        }
    }

    #[test]
    fn heredoc_starts_are_found_with_their_delimiters() {
        let cases: [(&str, &[(&str, bool)]); 12] = [
            ("base64 -d <<'BERTH_SOURCES_EOF' | tar -xzf - --no-same-owner", &[("BERTH_SOURCES_EOF", false)]),
            ("cat <<EOF", &[("EOF", false)]),
            ("cat <<\"EOF\" > f", &[("EOF", false)]),
            ("cat <<-END", &[("END", true)]),
            ("cat << 'E O'", &[("E O", false)]),
            ("cat <<\\EOF", &[("EOF", false)]),
            ("cat <<A; cat <<-'B'", &[("A", false), ("B", true)]),
            ("cat <<<\"$x\"", &[]),
            ("echo 'a <<EOF' \"<<EOF\" $'<<EOF'", &[]),
            ("echo hi # <<EOF", &[]),
            ("echo $(( 1 << 2 ))", &[("2", false)]),
            ("echo a#<<EOF", &[("EOF", false)]),
        ];
        for (line, expected) in cases {
            let expected: Vec<(String, bool)> = expected.iter().map(|&(w, s)| (w.to_owned(), s)).collect();
            assert_eq!(heredocs(line), expected, "{line}");
        }
    }

    #[test]
    fn exports_fold_but_changed_and_new_ones_are_kept() {
        let body = lines(
            "export CI_JOB_ID=$'7'\n\
             export CI_JOB_STATUS=$'failed'\n\
             export GREETING=$'hello'\n\
             export CI_PROJECT_DIR=$'/builds/p'\n\
             export MULTI=$'a\\nb'\n\
             cd '/builds/p'\n\
             export AFTER=$'1'\n\
             echo done",
        );
        let prepared = HashMap::from([
            ("CI_JOB_ID", "7"),
            ("CI_JOB_STATUS", "running"),
            ("GREETING", "hello"),
            ("MULTI", "a\nb"),
            ("AFTER", "1"),
        ]);
        assert_eq!(
            fold(&body, &body, &prepared),
            [
                Piece::Exports(3),
                Piece::Line("export CI_JOB_STATUS=$'failed'"),
                Piece::Line("export CI_PROJECT_DIR=$'/builds/p'"),
                Piece::Line("cd '/builds/p'"),
                Piece::Line("export AFTER=$'1'"),
                Piece::Line("echo done"),
            ]
        );
    }

    #[test]
    fn export_values_are_compared_from_the_unmasked_lines() {
        let shown = lines("export A=$'[MASKED]'\nexport B=$'[MASKED]'\nexport C=$'c'");
        let raw = lines("export A=$'secret-a'\nexport B=$'other'\nexport C=$'c'");
        let prepared = HashMap::from([("A", "secret-a"), ("B", "secret-b"), ("C", "c")]);
        assert_eq!(fold(&shown, &raw, &prepared), [Piece::Exports(2), Piece::Line("export B=$'[MASKED]'")]);
        // Lines that do not pair up: the shown lines are compared.
        let masked = HashMap::from([("A", "[MASKED]"), ("B", "[MASKED]"), ("C", "c")]);
        assert_eq!(fold(&shown, &raw[..1], &masked), [Piece::Exports(3)]);
    }

    #[test]
    fn long_heredocs_are_elided_with_counts() {
        let data = "H4sIAAAAAAAAA+3OMQrCQBCF4anXU2yfbuA";
        let mut text = String::from("cd /p\nbase64 -d <<'BERTH_SOURCES_EOF' | tar -xzf -\n");
        for _ in 0..40 {
            text.push_str(data);
            text.push('\n');
        }
        text.push_str("BERTH_SOURCES_EOF\ncat <<-EOF\n\tshort\n\tEOF\necho done");
        let body = lines(&text);
        assert_eq!(
            fold(&body, &body, &HashMap::new()),
            [
                Piece::Line("cd /p"),
                Piece::Line("base64 -d <<'BERTH_SOURCES_EOF' | tar -xzf -"),
                Piece::Data { lines: 40, bytes: 40 * (data.len() + 1) },
                Piece::Line("BERTH_SOURCES_EOF"),
                Piece::Line("cat <<-EOF"),
                Piece::Line("\tshort"),
                Piece::Line("\tEOF"),
                Piece::Line("echo done"),
            ]
        );
    }

    #[test]
    fn heredoc_bodies_are_data_even_when_they_look_like_exports() {
        let body = lines(
            "cat > env <<EOF\nexport A=$'1'\nexport B=$'2'\nEOF\ncat <<A <<B\n1\n2\n3\n4\nA\nb\nB\nexport A=$'1'",
        );
        let prepared = HashMap::from([("A", "1"), ("B", "2")]);
        assert_eq!(
            fold(&body, &body, &prepared),
            [
                Piece::Line("cat > env <<EOF"),
                Piece::Line("export A=$'1'"),
                Piece::Line("export B=$'2'"),
                Piece::Line("EOF"),
                Piece::Line("cat <<A <<B"),
                Piece::Data { lines: 4, bytes: 8 },
                Piece::Line("A"),
                Piece::Line("b"),
                Piece::Line("B"),
                Piece::Line("export A=$'1'"),
            ]
        );
    }

    #[test]
    fn a_heredoc_without_its_delimiter_is_shown_as_it_is() {
        let body = lines("echo $(( 1 << 2 ))\na\nb\nc\nd\ne");
        let pieces = fold(&body, &body, &HashMap::new());
        assert_eq!(pieces, body.iter().map(|l| Piece::Line(l)).collect::<Vec<_>>());
    }

    mod property {
        use super::super::*;
        use proptest::prelude::*;

        /// A line of a stage body: exports, heredoc starts and delimiters,
        /// quotes and escapes, and anything.
        fn line() -> impl Strategy<Value = String> {
            let piece = prop_oneof![
                prop::sample::select(vec![
                    "export A=",
                    "export B=$'",
                    "export _C='",
                    "cat <<EOF",
                    "<<-'E'",
                    "<<\"",
                    "<<<",
                    "EOF",
                    "\tE",
                    "E",
                    "$'",
                    "'",
                    "\"",
                    "\\",
                    "#",
                    " ",
                    ";",
                    "x",
                    "\\x41",
                    "[MASKED]",
                    "é",
                ])
                .prop_map(str::to_owned),
                any::<String>().prop_map(|s| s.replace('\n', "")),
            ];
            prop::collection::vec(piece, 0..6).prop_map(|p| p.concat())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Any body folds without a panic, and every line is shown or
            /// counted in exactly one piece.
            #[test]
            fn any_body_folds_every_line_once(lines in prop::collection::vec(line(), 0..12), other: bool) {
                let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
                let prepared: HashMap<&str, &str> = [("A", ""), ("B", "x")].into_iter().collect();
                let values: Vec<&str> = if other { lines.iter().rev().copied().collect() } else { lines.clone() };
                let pieces = fold(&lines, &values, &prepared);
                let counted: usize = pieces
                    .iter()
                    .map(|p| match p {
                        Piece::Line(_) => 1,
                        Piece::Exports(n) => *n,
                        Piece::Data { lines, .. } => *lines,
                    })
                    .sum();
                prop_assert_eq!(counted, lines.len());
            }
        }
    }
}
