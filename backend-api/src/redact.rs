//! Keeping masked values out of logs and files.

use std::borrow::Cow;

/// Replaces secret values (masked variables, the job token) with `[MASKED]`.
///
/// Each secret is hidden in every form berth can print or write it in:
///
/// - raw, and trimmed of surrounding whitespace (GitLab Runner masks the
///   trimmed value);
/// - as GitLab Runner's quoting writes it into a stage body ([`crate::script::escape`]:
///   quotes and backslashes escaped, control bytes and every byte from 0x80
///   on as `\xHH`), which is what a decoded body shows;
/// - escaped twice, which is what the script file itself holds (the runner
///   quotes the whole body again for its `eval`).
///
/// Every byte that belongs to an occurrence of any form is hidden, each run of
/// hidden bytes becoming one `[MASKED]`; overlapping or adjacent secrets are
/// therefore hidden whole, and what is left contains no form of a secret.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    forms: Vec<String>,
}

/// What a redacted value is replaced with (GitLab's own wording).
pub const MASK: &str = "[MASKED]";

impl Redactor {
    /// A redactor for these secret values; empty values are ignored.
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        let mut forms = Vec::new();
        for secret in secrets {
            for value in [secret.as_str(), secret.trim()] {
                if value.is_empty() {
                    continue;
                }
                let once = crate::script::escape(value);
                let twice = crate::script::escape(&once);
                forms.extend([value.to_owned(), once, twice]);
            }
        }
        forms.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        forms.dedup();
        Redactor { forms }
    }

    /// Every form [`Redactor::redact`] hides, longest first: what a plugin
    /// not written in Rust replaces with [`MASK`] (ABI 1.1's job document
    /// carries them).
    pub fn forms(&self) -> &[String] {
        &self.forms
    }

    /// `text` with every form of every secret replaced by `[MASKED]`.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut hidden: Vec<(usize, usize)> = Vec::new();
        for form in &self.forms {
            let mut from = 0;
            while let Some(at) = text[from..].find(form.as_str()).map(|i| from + i) {
                hidden.push((at, at + form.len()));
                // Overlapping occurrences too: go on from the next character.
                from = at + text[at..].chars().next().map_or(1, char::len_utf8);
            }
        }
        if hidden.is_empty() {
            return Cow::Borrowed(text);
        }
        hidden.sort_unstable();
        let mut out = String::with_capacity(text.len());
        let mut shown = 0;
        let mut runs = hidden.into_iter().peekable();
        while let Some((start, mut end)) = runs.next() {
            while let Some(&(next, next_end)) = runs.peek() {
                if next > end {
                    break;
                }
                end = end.max(next_end);
                runs.next();
            }
            if start < shown {
                continue;
            }
            out.push_str(&text[shown..start]);
            out.push_str(MASK);
            shown = end;
        }
        out.push_str(&text[shown..]);
        Cow::Owned(out)
    }

    /// Whether `text` contains any form of any secret.
    pub fn leaks(&self, text: &str) -> bool {
        self.forms.iter().any(|s| text.contains(s.as_str()))
    }

    /// Whether there are secrets to hide.
    pub fn is_empty(&self) -> bool {
        self.forms.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_secret_wins_and_text_without_secrets_is_borrowed() {
        let r = Redactor::new(["abcdefgh".to_string(), "abcdefgh-long".to_string(), String::new()]);
        assert_eq!(r.redact("x abcdefgh-long y abcdefgh"), "x [MASKED] y [MASKED]");
        assert!(matches!(r.redact("nothing"), Cow::Borrowed(_)));
        assert!(r.leaks("..abcdefgh.."));
        assert!(!r.leaks("abcdefg"));
    }

    #[test]
    fn secrets_are_also_hidden_in_their_script_quoted_form() {
        let r = Redactor::new(["it's\nsecret\n".to_string()]);
        let script = format!("export X={}", crate::script::quote("it's\nsecret\n"));
        assert_eq!(r.redact(&script), "export X=$'[MASKED]'");
    }

    #[test]
    fn non_ascii_secrets_are_hidden_in_the_runners_hex_escapes() {
        let r = Redactor::new(["pässwörd-1".to_string()]);
        let body = format!("export P={}\n", crate::script::quote("pässwörd-1"));
        assert_eq!(body, "export P=$'p\\xc3\\xa4ssw\\xc3\\xb6rd-1'\n");
        assert_eq!(r.redact(&body), "export P=$'[MASKED]'\n");
        let script = crate::script::render(&body);
        assert!(!r.redact(&script).contains("xc3"), "{script}");
        assert_eq!(r.redact(" pässwörd-1 and  x "), " [MASKED] and  x ");
    }

    #[test]
    fn overlapping_and_mask_like_secrets_leave_nothing_behind() {
        let r = Redactor::new(["]abcdefg".to_string(), "abcXdef".to_string(), "Xdefghi".to_string()]);
        assert_eq!(r.redact("]abcdefgabcdefg"), "[MASKED]abcdefg");
        assert_eq!(r.redact("abcXdefghi!"), "[MASKED]!");
    }

    mod property {
        use super::super::*;
        use crate::script;
        use proptest::prelude::*;

        /// Characters a secret is made of: anything but NUL (no environment
        /// variable holds one), with quotes, backslashes, newlines and
        /// bytes from 0x80 on made frequent.
        fn secret() -> impl Strategy<Value = String> {
            let c = prop_oneof![
                3 => any::<char>().prop_filter("no NUL", |c| *c != '\0'),
                2 => prop::sample::select(vec!['\'', '\\', '\n', '"', '$', ' ', '\t', '\x1b', '\x7f']),
                2 => prop::sample::select(vec!['é', 'ä', '☃', '世', '\u{80}', '\u{ff}', '🚀']),
                2 => prop::sample::select(vec!['a', 'x', 'c', '3', '[', ']', 'M']),
            ];
            prop::collection::vec(c, 1..16).prop_map(|cs| cs.into_iter().collect())
        }

        fn clean(text: &str) -> String {
            // What is left around the masks: a secret holds no NUL.
            text.replace(MASK, "\0")
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn no_form_of_a_secret_survives_in_a_runner_script(s in secret(), around in secret()) {
                let r = Redactor::new([s.clone()]);
                let body = format!(
                    "export SECRET={}\necho {}\nprintf '%s' {}\n",
                    script::quote(&s),
                    script::quote(&format!("{around}{s}{around}")),
                    script::quote(&around),
                );
                let file = script::render(&body);
                let decoded = script::body(&file).expect("the runner's format");
                prop_assert_eq!(&decoded, &body);
                let raw = format!("{around}{s}\n{s}{s}");
                for (view, shown) in [
                    ("script file", r.redact(&file).into_owned()),
                    ("decoded body", r.redact(&decoded).into_owned()),
                    ("raw text", r.redact(&raw).into_owned()),
                    ("decoded masked file", script::body(&r.redact(&file)).unwrap_or_default()),
                ] {
                    let left = clean(&shown);
                    prop_assert!(!left.contains(s.as_str()), "{}: raw secret in {:?}", view, shown);
                    prop_assert!(!left.contains(&script::escape(&s)), "{}: escaped secret in {:?}", view, shown);
                    prop_assert!(
                        !left.contains(&script::escape(&script::escape(&s))),
                        "{}: twice-escaped secret in {:?}", view, shown
                    );
                }
            }
        }
    }
}
