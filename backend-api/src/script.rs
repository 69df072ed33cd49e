//! The stage-script format GitLab Runner writes for bash
//! (custom-executor-protocol.md §4), and bash's `$'...'` quoting it relies on.
//!
//! ```text
//! #!/usr/bin/env bash
//!
//! trap 'exit 1' TERM
//!
//! case "$(set -o)" in *"pipefail"*) set -o pipefail;; esac; set -o errexit
//! set +o noclobber
//! (trap 'exit 1' TERM; eval $'<stage body>') < /dev/null
//! exit 0
//! ```

/// The runner's script around a stage `body`.
pub fn render(body: &str) -> String {
    format!(
        "#!/usr/bin/env bash\n\ntrap 'exit 1' TERM\n\ncase \"$(set -o)\" in *\"pipefail\"*) set -o pipefail;; esac; set -o errexit\nset +o noclobber\n(trap 'exit 1' TERM; eval {}) < /dev/null\nexit 0\n",
        quote(body)
    )
}

/// The stage body of a script in the runner's format: the value of the word
/// after its `eval` as [`quote`] writes it (`$'...'` decoded, `''`, or a word
/// left unquoted, ending at the `)` of the subshell). `None` when the text is
/// not in that format.
pub fn body(script: &str) -> Option<String> {
    let rest = &script[script.find("eval ")? + "eval ".len()..];
    if let Some(quoted) = rest.strip_prefix("$'") {
        return decode(quoted).map(|(body, _)| body);
    }
    if rest.starts_with("'')") {
        return Some(String::new());
    }
    let word = rest.bytes().take_while(|&b| is_literal(b)).count();
    (word > 0 && rest[word..].starts_with(')')).then(|| rest[..word].to_owned())
}

/// `text` quoted for bash exactly as GitLab Runner quotes it (its
/// `helpers.ShellEscape`, used for every value and command of a stage body
/// and for the body itself):
///
/// - `''` for an empty text;
/// - the text as it is when every byte is a letter, a digit or one of `,-./@_`;
/// - otherwise `$'...'` around the text with `\a \b \t \n \v \f \r`, `\'` and
///   `\\` for those bytes, `\xHH` (lowercase hex) for every other control byte,
///   DEL and **every byte from 0x80 on** (so UTF-8 text arrives as `\xc3\xa9`),
///   and any other byte as it is.
pub fn quote(text: &str) -> String {
    if text.is_empty() {
        return "''".to_owned();
    }
    if text.bytes().all(is_literal) {
        return text.to_owned();
    }
    format!("$'{}'", escape(text))
}

/// The inside of [`quote`]'s `$'...'` for `text`, whether or not `quote`
/// would need the quotes. The escaping is byte by byte, so the escaped form
/// of a part of a text is a part of the escaped form of the text: this is
/// the form a secret takes inside a quoted stage body, and applied twice,
/// inside the script file.
pub fn escape(text: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(text.len() + 8);
    for b in text.bytes() {
        match b {
            0x07 => out.push_str("\\a"),
            0x08 => out.push_str("\\b"),
            b'\t' => out.push_str("\\t"),
            b'\n' => out.push_str("\\n"),
            0x0b => out.push_str("\\v"),
            0x0c => out.push_str("\\f"),
            b'\r' => out.push_str("\\r"),
            b'\'' => out.push_str("\\'"),
            b'\\' => out.push_str("\\\\"),
            b if is_literal(b) || is_quoted_as_is(b) => out.push(char::from(b)),
            b => {
                out.push_str("\\x");
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0x0f)]));
            }
        }
    }
    out
}

/// A byte the runner leaves unquoted.
fn is_literal(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b",-./@_".contains(&b)
}

/// A byte that makes the runner quote, written as it is inside the quotes.
fn is_quoted_as_is(b: u8) -> bool {
    b" !\"#$%&()*+:;<=>?[]^`{|}~".contains(&b)
}

/// Decodes the inside of a `$'...'` string that starts at `text` (just after
/// the opening quote), as bash does. Returns the decoded text and the number
/// of bytes consumed including the closing quote; `None` if it is unterminated.
pub fn decode(text: &str) -> Option<(String, usize)> {
    let bytes = text.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\'' {
            return Some((String::from_utf8_lossy(&out).into_owned(), i + 1));
        }
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let esc = *bytes.get(i + 1)?;
        i += 2;
        match esc {
            b'a' => out.push(7),
            b'b' => out.push(8),
            b'e' | b'E' => out.push(0x1b),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'\\' | b'\'' | b'"' | b'?' => out.push(esc),
            b'x' | b'u' | b'U' => {
                let max = match esc {
                    b'x' => 2,
                    b'u' => 4,
                    _ => 8,
                };
                let digits = hex_run(&bytes[i..], max);
                if digits == 0 {
                    out.extend_from_slice(&[b'\\', esc]);
                    continue;
                }
                let value = u32::from_str_radix(&text[i..i + digits], 16).ok()?;
                i += digits;
                if esc == b'x' {
                    out.push(value as u8);
                } else {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(char::from_u32(value).unwrap_or('\u{fffd}').encode_utf8(&mut buf).as_bytes());
                }
            }
            b'0'..=b'7' => {
                let mut value = u32::from(esc - b'0');
                let mut n = 1;
                while n < 3 && i < bytes.len() && (b'0'..=b'7').contains(&bytes[i]) {
                    value = value * 8 + u32::from(bytes[i] - b'0');
                    i += 1;
                    n += 1;
                }
                out.push(value as u8);
            }
            b'c' => {
                let c = *bytes.get(i)?;
                i += 1;
                out.push(c & 0x1f);
            }
            other => out.extend_from_slice(&[b'\\', other]),
        }
    }
    None
}

fn hex_run(bytes: &[u8], max: usize) -> usize {
    bytes.iter().take(max).take_while(|b| b.is_ascii_hexdigit()).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shell value of a word [`quote`] wrote.
    fn unquote(word: &str) -> String {
        match word.strip_prefix("$'") {
            Some(rest) => {
                let (decoded, used) = decode(rest).unwrap();
                assert_eq!(used, rest.len(), "{word}");
                decoded
            }
            None if word == "''" => String::new(),
            None => word.to_owned(),
        }
    }

    #[test]
    fn quote_then_decode_is_identity() {
        for text in
            ["", "plain", "it's \"q\" \\ back", "line1\nline2\ttab", "\x1b[32;1m$ ls\x1b[0;m", "ünïcødé ☃", "\x01\x7f"]
        {
            assert_eq!(unquote(&quote(text)), text);
        }
    }

    #[test]
    fn quotes_exactly_as_the_runner_does() {
        // GitLab Runner's own cases (helpers/shell_escape_test.go).
        for (text, want) in [
            ("unquoted", "unquoted"),
            ("standard string", "$'standard string'"),
            ("+\t\n\r&", "$'+\\t\\n\\r&'"),
            ("", "''"),
            ("hello, 世界", "$'hello, \\xe4\\xb8\\x96\\xe7\\x95\\x8c'"),
            ("blackslash \\n", "$'blackslash \\\\n'"),
            ("f", "f"),
            ("\x0c", "$'\\f'"),
            ("export variable='test' && echo $variable", "$'export variable=\\'test\\' && echo $variable'"),
            ("$HOME", "$'$HOME'"),
            ("'$HOME'", "$'\\'$HOME\\''"),
            ("48151623", "48151623"),
            ("\x1b[0;m\x7f", "$'\\x1b[0;m\\x7f'"),
        ] {
            assert_eq!(quote(text), want, "{text:?}");
        }
        assert_eq!(escape("pässwörd"), "p\\xc3\\xa4ssw\\xc3\\xb6rd");
        assert_eq!(escape(&escape("ä'")), "\\\\xc3\\\\xa4\\\\\\'");
    }

    #[test]
    fn decodes_the_fixture_build_script() {
        let script = include_str!("../../testdata/fixtures/script-build_script.sh");
        let body = body(script).unwrap();
        assert!(body.starts_with("export CI_JOB_ID=$'48151623'\n"), "{body}");
        assert!(body.contains("export DEPLOY_TOKEN=$'glpat-not-a-real-token'\n"));
        assert!(body.contains("\necho \"$GREETING from $(hostname)\"\n"));
        assert!(body.ends_with("\nmake test\n"));
        assert!(body.contains("echo $'\\x1b[32;1m$ make test\\x1b[0;m'"));
    }

    #[test]
    fn render_matches_the_runner_layout() {
        let fixture = include_str!("../../testdata/fixtures/script-prepare_script.sh");
        assert_eq!(render(&body(fixture).unwrap()), fixture);
    }

    #[test]
    fn decodes_bash_escapes() {
        assert_eq!(decode(r"\x41\101\u263a\cA\e\q'").unwrap().0, "AA☺\x01\x1b\\q");
        assert!(decode("unterminated").is_none());
        assert!(body("echo hi").is_none());
    }

    #[test]
    fn bodies_the_runner_leaves_unquoted_read_back() {
        // Found by `property::render_then_body_is_identity`: `quote` writes
        // an empty body as `''` and a body of letters, digits and `,-./@_`
        // as it is (so does the runner), and `body` knew only `$'...'`.
        for text in ["", "a", "true", "make", "./build.sh"] {
            assert_eq!(body(&render(text)).as_deref(), Some(text), "{text:?}");
        }
        assert_eq!(body("(trap 'exit 1' TERM; eval true; echo) < /dev/null"), None);
        assert_eq!(body("eval  $'a'"), None);
    }

    mod property {
        use super::super::*;
        use proptest::prelude::*;

        /// Text made of what `$'...'` decoding cares about, and anything.
        fn text() -> impl Strategy<Value = String> {
            let c = prop_oneof![
                2 => any::<char>(),
                3 => prop::sample::select(vec!['\\', '\'', 'x', 'u', 'U', 'c', '0', '7', '9', 'f', 'F', 'e', '$', '\n']),
                1 => prop::sample::select(vec!['é', '☃', '\u{7f}', '\u{80}', '\u{10ffff}', '🚀', '\0']),
            ];
            prop_oneof![
                prop::collection::vec(c, 0..24).prop_map(|cs| cs.into_iter().collect::<String>()),
                prop::collection::vec(any::<u8>(), 0..32).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            ]
        }

        /// One change to a text, at a character boundary.
        #[derive(Debug, Clone)]
        enum Edit {
            Cut(prop::sample::Index),
            Drop(prop::sample::Index, usize),
            Insert(prop::sample::Index, String),
        }

        fn edit() -> impl Strategy<Value = Edit> {
            prop_oneof![
                any::<prop::sample::Index>().prop_map(Edit::Cut),
                (any::<prop::sample::Index>(), 1..6usize).prop_map(|(at, n)| Edit::Drop(at, n)),
                (any::<prop::sample::Index>(), text()).prop_map(|(at, s)| Edit::Insert(at, s)),
            ]
        }

        fn apply(text: &mut String, edit: &Edit) {
            let bounds: Vec<usize> = (0..=text.len()).filter(|&i| text.is_char_boundary(i)).collect();
            match edit {
                Edit::Cut(at) => text.truncate(bounds[at.index(bounds.len())]),
                Edit::Drop(at, n) => {
                    let from = at.index(bounds.len());
                    text.replace_range(bounds[from]..bounds[(from + n).min(bounds.len() - 1)], "");
                }
                Edit::Insert(at, s) => text.insert_str(bounds[at.index(bounds.len())], s),
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Any text decodes or is unterminated; what was consumed ends
            /// with the closing quote.
            #[test]
            fn any_text_decodes_or_is_unterminated(text in text()) {
                if let Some((_, used)) = decode(&text) {
                    prop_assert!(used <= text.len() && text.is_char_boundary(used));
                    prop_assert_eq!(text.as_bytes()[used - 1], b'\'');
                }
                let _ = body(&text);
                let _ = body(&format!("eval $'{text}"));
            }

            /// Rendering a body and reading it back gives the body, and the
            /// quoting of any text decodes to the text.
            #[test]
            fn render_then_body_is_identity(text in text()) {
                prop_assert_eq!(body(&render(&text)), Some(text.clone()));
                let inner = format!("{}'rest", escape(&text));
                prop_assert_eq!(decode(&inner), Some((text.clone(), inner.len() - "rest".len())));
            }

            /// A rendered script cut anywhere inside its `$'...'` body is
            /// not in the runner's format.
            #[test]
            fn a_script_cut_inside_its_body_has_none(text in text(), at: prop::sample::Index) {
                prop_assume!(quote(&text).starts_with("$'"));
                let script = render(&text);
                let start = script.find("eval $'").unwrap() + "eval $'".len();
                let end = start + escape(&text).len();
                let cut = start + at.index(end - start + 1);
                prop_assert!(script.is_char_boundary(cut));
                prop_assert_eq!(body(&script[..cut]), None);
            }

            /// Scripts a few edits away from valid ones read as a body or as
            /// not in the format, never a panic.
            #[test]
            fn edited_scripts_never_panic(text in text(), edits in prop::collection::vec(edit(), 1..4)) {
                let mut script = render(&text);
                for edit in &edits {
                    apply(&mut script, edit);
                }
                let _ = body(&script);
            }
        }
    }
}
