//! Keeping masked values out of logs and files.

use std::borrow::Cow;

/// Replaces secret values (masked variables, the job token) with `[MASKED]`.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    // Longest first, so a secret that contains another is replaced whole.
    secrets: Vec<String>,
}

/// What a redacted value is replaced with (GitLab's own wording).
pub const MASK: &str = "[MASKED]";

impl Redactor {
    /// A redactor for these secret values; empty values are ignored. Each
    /// secret is also hidden in the escaped form it takes inside bash's
    /// `$'...'` quoting, which is how stage scripts carry variables.
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        let mut secrets: Vec<String> = secrets
            .into_iter()
            .filter(|s| !s.is_empty())
            .flat_map(|s| {
                let quoted = crate::script::quote(&s);
                let escaped = quoted[2..quoted.len() - 1].to_owned();
                if escaped == s {
                    vec![s]
                } else {
                    vec![s, escaped]
                }
            })
            .collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        Redactor { secrets }
    }

    /// `text` with every secret replaced by `[MASKED]`.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for secret in &self.secrets {
            if out.contains(secret.as_str()) {
                out = Cow::Owned(out.replace(secret.as_str(), MASK));
            }
        }
        out
    }

    /// Whether `text` contains any secret.
    pub fn leaks(&self, text: &str) -> bool {
        self.secrets.iter().any(|s| text.contains(s.as_str()))
    }

    /// Whether there are secrets to hide.
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
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
}
