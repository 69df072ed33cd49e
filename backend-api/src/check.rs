//! What a backend needs of its host, checked before the first job needs it
//! (`berth doctor`, and `berth gitlab-config`, which refuses a runner that
//! would fail every job).

use serde::{Deserialize, Serialize};

/// How a [`Finding`] bears on the runner's jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Level {
    /// What was checked is as jobs need it.
    Ok,
    /// Jobs run, but something is weaker or slower than configured, or will
    /// fail for some jobs (a missing image, little free space).
    Warning,
    /// Every job (or every job of a kind) will fail until it is fixed.
    Error,
}

impl Level {
    /// `ok`, `warning` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

/// One thing checked: what, how it stands, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Finding {
    /// How it stands.
    pub level: Level,
    /// What was checked, a short noun phrase (`systemd-nspawn`, `images_dir`).
    pub check: String,
    /// What was found (`systemd 252 (252.33-1~deb12u1)`, `/srv/images does not exist`).
    pub detail: String,
    /// What to do, for a warning or an error (a command or a setting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    /// A check that passed.
    pub fn ok(check: impl Into<String>, detail: impl Into<String>) -> Self {
        Finding { level: Level::Ok, check: check.into(), detail: detail.into(), fix: None }
    }

    /// A warning, with what to do about it (empty: the detail says it).
    pub fn warning(check: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        let fix = Some(fix.into()).filter(|fix| !fix.is_empty());
        Finding { level: Level::Warning, check: check.into(), detail: detail.into(), fix }
    }

    /// An error, with what to do about it.
    pub fn error(check: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding { level: Level::Error, check: check.into(), detail: detail.into(), fix: Some(fix.into()) }
    }

    /// `ok` when `result` is, else an error with its message and `fix`.
    pub fn of<T, E: std::fmt::Display>(
        check: impl Into<String>,
        result: Result<T, E>,
        ok: impl FnOnce(T) -> String,
        fix: impl Into<String>,
    ) -> Self {
        match result {
            Ok(value) => Finding::ok(check, ok(value)),
            Err(e) => Finding::error(check, e.to_string(), fix),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_serialize_with_lowercase_levels_and_without_a_missing_fix() {
        let ok = serde_json::to_value(Finding::ok("kernel", "6.1")).unwrap();
        assert_eq!(ok, serde_json::json!({"level": "ok", "check": "kernel", "detail": "6.1"}));
        let error = serde_json::to_value(Finding::error("images_dir", "/x does not exist", "mkdir /x")).unwrap();
        assert_eq!(error["level"], "error");
        assert_eq!(error["fix"], "mkdir /x");
        assert!(Level::Error > Level::Warning && Level::Warning > Level::Ok, "levels order by severity");
        let failed: Result<(), &str> = Err("no");
        assert_eq!(Finding::of("x", failed, |()| String::new(), "fix it").level, Level::Error);
        assert_eq!(Finding::of("x", Ok::<_, &str>(3), |n| format!("{n}"), "").detail, "3");
    }
}
