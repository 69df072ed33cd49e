//! Keeping masked values out of the job log and the transcript.

use std::borrow::Cow;

use berth_backend_api::{JobContext, Redactor};

/// The job's secrets in every form a dry run can show them.
///
/// The job's own [`Redactor`] knows the raw values of the masked variables;
/// this one also knows those of the payload and the job token. Both hide each
/// secret raw, trimmed, and as GitLab Runner's quoting writes it once (a
/// decoded stage body) and twice (the script file), `\xHH` escapes included.
#[derive(Debug, Clone)]
pub(crate) struct Mask {
    forms: Redactor,
    job: Redactor,
}

impl Mask {
    /// The secrets of `job`: masked variables (from the payload and the
    /// environment) and the job token.
    pub(crate) fn for_job(job: &JobContext) -> Self {
        let mut raw: Vec<String> = job.variables().iter().filter(|v| v.masked).map(|v| v.value.clone()).collect();
        if let Some(response) = job.response() {
            raw.push(response.token.clone());
            raw.extend(response.variables.iter().filter(|v| v.masked).map(|v| v.value.clone()));
        }
        Mask { forms: Redactor::new(raw), job: job.redactor().clone() }
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
