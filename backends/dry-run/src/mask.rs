//! Keeping masked values out of the job log and the transcript.

use std::borrow::Cow;

use berth_backend_api::{script, JobContext, Redactor};

/// The job's secrets in every form a dry run can show them.
///
/// The job's own [`Redactor`] knows the raw values. A stage body shows
/// variables as bash `$'...'` strings, so a secret containing a quote, a
/// backslash or a control character appears there escaped, and in a script
/// that is not decoded it appears escaped twice. This adds those forms.
#[derive(Debug, Clone)]
pub(crate) struct Mask {
    forms: Redactor,
    job: Redactor,
}

impl Mask {
    /// The secrets of `job`: masked variables (from the payload and the
    /// environment) and the job token, raw and as bash quotes them.
    pub(crate) fn for_job(job: &JobContext) -> Self {
        let mut raw: Vec<String> = job.variables().iter().filter(|v| v.masked).map(|v| v.value.clone()).collect();
        if let Some(response) = job.response() {
            raw.push(response.token.clone());
            raw.extend(response.variables.iter().filter(|v| v.masked).map(|v| v.value.clone()));
        }
        let mut forms = Vec::with_capacity(raw.len() * 3);
        for secret in raw {
            let once = bash_escaped(&secret);
            let twice = bash_escaped(&once);
            forms.extend([secret, once, twice]);
        }
        Mask { forms: Redactor::new(forms), job: job.redactor().clone() }
    }

    /// A mask with no secrets (for cleanup, which has no job context).
    pub(crate) fn none() -> Self {
        Mask { forms: Redactor::default(), job: Redactor::default() }
    }

    /// `text` with every secret replaced by `[MASKED]`.
    pub(crate) fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        match self.forms.redact(text) {
            Cow::Borrowed(text) => self.job.redact(text),
            Cow::Owned(text) => Cow::Owned(self.job.redact(&text).into_owned()),
        }
    }
}

/// `text` as it appears inside bash `$'...'` quotes written by the runner.
fn bash_escaped(text: &str) -> String {
    let quoted = script::quote(text);
    quoted[2..quoted.len() - 1].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bash_escaped_is_the_inside_of_the_runners_quotes() {
        assert_eq!(bash_escaped("plain-value"), "plain-value");
        assert_eq!(bash_escaped("it's\n"), r"it\'s\n");
        assert_eq!(bash_escaped(&bash_escaped("a'b")), r"a\\\'b");
    }
}
