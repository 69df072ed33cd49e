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

/// The stage body of a script in the runner's format: the decoded argument of
/// its `eval $'...'`. `None` when the text is not in that format.
pub fn body(script: &str) -> Option<String> {
    let start = script.find("eval $'")? + "eval $'".len();
    decode(&script[start..]).map(|(body, _)| body)
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
}
