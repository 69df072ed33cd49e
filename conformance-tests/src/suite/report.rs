//! The report rendered: a readable table, JSON (serde) and JUnit XML.

use std::time::Duration;

use quick_junit::{NonSuccessKind, TestCase, TestCaseStatus, TestSuite};
use serde::ser::{Serialize, SerializeStruct, Serializer};

use super::{is_protocol_section, CheckResult, Level, Report, Verdict};

impl Serialize for CheckResult {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut out = serializer.serialize_struct("CheckResult", 7)?;
        out.serialize_field("id", self.id)?;
        out.serialize_field("level", &self.level)?;
        out.serialize_field("statement", self.statement)?;
        out.serialize_field("protocol", self.protocol)?;
        out.serialize_field("verdict", self.verdict.as_str())?;
        out.serialize_field("detail", self.verdict.detail())?;
        out.serialize_field("seconds", &self.seconds)?;
        out.end()
    }
}

impl Report {
    /// The report as JUnit XML: one test case per check, skipped and failed
    /// ones marked as such (a failed SHOULD check is reported as skipped with
    /// a warning, since it does not fail the suite). Text a JUnit reader
    /// cannot take (terminal escapes, control characters) is left out.
    pub fn junit(&self) -> String {
        let mut suite = TestSuite::new(format!("berth conformance: {} {}", self.backend, self.version));
        let mut skipped = 0;
        for r in &self.results {
            let status = match (&r.verdict, r.level) {
                (Verdict::Pass, _) => TestCaseStatus::success(),
                (Verdict::Fail(detail), Level::Must) => {
                    let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
                    status.set_message(detail.lines().next().unwrap_or(""));
                    status
                }
                (Verdict::Fail(detail), Level::Should) => skipped_with(&format!("SHOULD not met: {detail}")),
                (Verdict::Skip(detail), _) => skipped_with(detail),
            };
            if matches!(status, TestCaseStatus::Skipped { .. }) {
                skipped += 1;
            }
            let name = format!(
                "{} ({}, {}{}): {}",
                r.id,
                r.level.as_str(),
                if is_protocol_section(r.protocol) { "protocol section " } else { "" },
                r.protocol,
                r.statement
            );
            let mut case = TestCase::new(name, status);
            case.set_classname(format!("conformance.{}", r.level.as_str()));
            case.set_time(Duration::from_secs_f64(r.seconds));
            suite.add_test_case(case);
        }
        suite.extra.insert("skipped".into(), skipped.to_string().into());
        suite.set_time(Duration::from_secs_f64(self.results.iter().map(|r| r.seconds).sum()));
        let mut report = quick_junit::Report::new("berth conformance");
        report.add_test_suite(suite);
        // Serializing into memory fails only on an I/O error, which memory has not.
        report.to_string().unwrap_or_default()
    }

    /// A readable table.
    pub fn table(&self) -> String {
        let mut out = format!("conformance of backend {} {}\n\n", self.backend, self.version);
        for r in &self.results {
            let verdict = match (&r.verdict, r.level) {
                (Verdict::Fail(_), Level::Should) => "WARN",
                (Verdict::Fail(_), _) => "FAIL",
                (Verdict::Pass, _) => "pass",
                (Verdict::Skip(_), _) => "skip",
            };
            out.push_str(&format!(
                "{verdict:<5} {:<29} {:<6} {:>6.2}s  {}\n",
                r.id,
                r.level.as_str(),
                r.seconds,
                r.statement
            ));
            for line in r.verdict.detail().lines() {
                out.push_str(&format!("        {line}\n"));
            }
        }
        let count = |v: &str| self.results.iter().filter(|r| r.verdict.as_str() == v).count();
        out.push_str(&format!("\n{} passed, {} failed, {} skipped\n", count("pass"), count("fail"), count("skip")));
        out
    }
}

fn skipped_with(message: &str) -> TestCaseStatus {
    let mut status = TestCaseStatus::skipped();
    status.set_message(message);
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(id: &'static str, level: Level, verdict: Verdict) -> CheckResult {
        CheckResult { id, level, statement: "a statement", protocol: "5", verdict, seconds: 0.25 }
    }

    fn report() -> Report {
        Report {
            backend: "host-test".into(),
            version: "0.1.0".into(),
            results: vec![
                result("exit.success", Level::Must, Verdict::Pass),
                result(
                    "exit.codes",
                    Level::Must,
                    Verdict::Fail("run exited \x1b[31m2\x1b[0m\0 \x07\x08\x0b\x0c\x1f<&>\nsecond line".into()),
                ),
                result("isolation.concurrent", Level::Must, Verdict::Skip("the backend declares no isolation".into())),
                result(
                    "containment.chroot-escape",
                    Level::Should,
                    Verdict::Fail("reached \x1b[1mthe host's /\x1b[0m".into()),
                ),
            ],
        }
    }

    #[test]
    fn junit_has_no_control_characters_and_keeps_the_text() {
        let xml = report().junit();
        let illegal = |b: &u8| matches!(b, 0x00..=0x08 | 0x0b | 0x0c | 0x0e..=0x1f);
        assert!(!xml.as_bytes().iter().any(illegal), "{xml:?}");
        assert!(xml.starts_with("<?xml"), "{xml}");
        assert!(xml.contains("<testsuite name=\"berth conformance: host-test 0.1.0\" tests=\"4\""), "{xml}");
        assert!(xml.contains("failures=\"1\"") && xml.contains("skipped=\"2\""), "{xml}");
        // The colours are gone, the rest escaped; only the first line is the message.
        assert!(xml.contains("<failure message=\"run exited 2 &lt;&amp;&gt;\"/>"), "{xml}");
        assert!(xml.contains("<skipped message=\"the backend declares no isolation\"/>"), "{xml}");
        assert!(xml.contains("<skipped message=\"SHOULD not met: reached the host&apos;s /\"/>"), "{xml}");
        assert!(
            xml.contains("classname=\"conformance.MUST\"")
                && xml.contains("name=\"exit.codes (MUST, protocol section 5): a statement\""),
            "{xml}"
        );
    }

    #[test]
    fn json_keeps_verdict_and_detail_strings() {
        let value = serde_json::to_value(report()).unwrap();
        let results = value["results"].as_array().unwrap();
        let verdicts: Vec<_> = results.iter().map(|r| r["verdict"].as_str().unwrap()).collect();
        assert_eq!(verdicts, ["pass", "fail", "skip", "fail"]);
        assert_eq!(results[0]["detail"], "");
        assert_eq!(results[2]["detail"], "the backend declares no isolation");
        assert_eq!(results[0]["level"], "MUST");
        assert_eq!(results[0]["seconds"], 0.25);
        let keys: Vec<_> = results[0].as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys.len(), 7);
    }

    #[test]
    fn table_marks_should_failures_as_warnings() {
        let table = report().table();
        assert!(table.contains("WARN  containment.chroot-escape"), "{table}");
        assert!(table.contains("FAIL  exit.codes"), "{table}");
        assert!(table.trim_end().ends_with("1 passed, 2 failed, 1 skipped"), "{table}");
    }
}
