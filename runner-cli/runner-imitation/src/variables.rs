//! gitlab-runner's variable expansion: `$VAR` and `${VAR}` in the values of
//! the job's variables and in its image name, done by the runner before the
//! job runs (gitlab-runner `common/variables.go`: `JobVariables.Expand`,
//! `ExpandValue` and `Get`, over `helpers/shell/legacy_expand.go`, the Go 1.10
//! `os.Expand` the runner keeps).
//!
//! The rules, all of them the runner's:
//! - `$NAME` (letters, digits, `_`) and `${NAME}` (anything up to `}`) become
//!   the value of the *last* variable of that name in the list; a name no
//!   variable has becomes empty.
//! - `$$` becomes `$`; `$*`, `$#`, `$@`, `$!`, `$?`, `$-` and `$0`..`$9`
//!   become empty, as does a `$` followed by anything that is not a name
//!   (the `$` is dropped: `a$/b` gives `a/b`); a `$` at the very end stays.
//!   `${}` and an unterminated `${` are dropped.
//! - One pass: a value is expanded with the *unexpanded* values of the others
//!   (`A: $B`, `B: $C` gives `A` the text `$C`), never recursively, and with
//!   no command substitution or other shell syntax.
//! - A variable marked `raw` (`expand: false` in the pipeline) is kept verbatim.
//! - The image name is expanded once more, with the already expanded variables.

use berth_backend_api::ResponseVariable;

/// The value of the last variable named `key`, as gitlab-runner's `JobVariables.Get`.
fn get<'a>(variables: &'a [ResponseVariable], key: &str) -> &'a str {
    match key {
        "$" => "$",
        "*" | "#" | "@" | "!" | "?" | "0" | "1" | "2" | "3" | "4" | "5" | "6" | "7" | "8" | "9" => "",
        _ => variables.iter().rev().find(|v| v.key == key).map_or("", |v| v.value.as_str()),
    }
}

fn is_special(c: u8) -> bool {
    matches!(c, b'*' | b'#' | b'$' | b'@' | b'!' | b'?' | b'-' | b'0'..=b'9')
}

fn is_name_byte(c: u8) -> bool {
    c == b'_' || c.is_ascii_alphanumeric()
}

/// The name at the start of `s` (just after a `$`) and how many bytes it takes.
fn shell_name(s: &[u8]) -> (&[u8], usize) {
    if s[0] == b'{' {
        if s.len() > 2 && is_special(s[1]) && s[2] == b'}' {
            return (&s[1..2], 3);
        }
        return match s.iter().skip(1).position(|c| *c == b'}') {
            Some(0) => (&[], 2),
            Some(end) => (&s[1..=end], end + 2),
            None => (&[], 1),
        };
    }
    if is_special(s[0]) {
        return (&s[..1], 1);
    }
    let end = s.iter().position(|c| !is_name_byte(*c)).unwrap_or(s.len());
    (&s[..end], end)
}

/// `value` with its `$` references replaced by what `lookup` gives for each name.
pub fn expand_with<'a>(value: &str, lookup: impl Fn(&str) -> &'a str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let (mut copied, mut at) = (0, 0);
    while at < bytes.len() {
        if bytes[at] == b'$' && at + 1 < bytes.len() {
            out.extend_from_slice(&bytes[copied..at]);
            let (name, width) = shell_name(&bytes[at + 1..]);
            out.extend_from_slice(lookup(&String::from_utf8_lossy(name)).as_bytes());
            at += width;
            copied = at + 1;
        }
        at += 1;
    }
    out.extend_from_slice(&bytes[copied.min(bytes.len())..]);
    // Names are split at ASCII bytes only, so the text stays UTF-8.
    String::from_utf8_lossy(&out).into_owned()
}

/// `value` expanded with `variables` (the last of a name wins).
pub fn expand_value(value: &str, variables: &[ResponseVariable]) -> String {
    expand_with(value, |key| get(variables, key))
}

/// Every variable of `variables` with its value expanded, except raw ones.
pub fn expand_all(variables: &[ResponseVariable]) -> Vec<ResponseVariable> {
    variables
        .iter()
        .map(|variable| {
            let mut variable = variable.clone();
            if !variable.raw {
                variable.value = expand_value(&variable.value, variables);
            }
            variable
        })
        .collect()
}

/// The image name as gitlab-runner expands it: with the expanded variables.
pub fn expand_image(name: &str, variables: &[ResponseVariable]) -> String {
    expand_value(name, &expand_all(variables))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn var(key: &str, value: &str) -> ResponseVariable {
        ResponseVariable::new(key, value)
    }

    /// The cases of gitlab-runner's `helpers/shell/legacy_expand_test.go`,
    /// with the runner's `Get` in place of the test's lookup.
    #[test]
    fn legacy_expand_cases() {
        let vars = [var("HOME", "/usr/gopher"), var("H", "(Value of H)"), var("home_1", "/usr/foo")];
        for (input, want) in [
            ("", ""),
            ("$*", ""),
            ("$$", "$"),
            ("${*}", ""),
            ("$1", ""),
            ("${1}", ""),
            ("now is the time", "now is the time"),
            ("$HOME", "/usr/gopher"),
            ("$home_1", "/usr/foo"),
            ("${HOME}", "/usr/gopher"),
            ("${H}OME", "(Value of H)OME"),
            ("A$$$#$1$H$home_1*B", "A$(Value of H)/usr/foo*B"),
        ] {
            assert_eq!(expand_value(input, &vars), want, "{input:?}");
        }
    }

    #[test]
    fn odd_dollars_are_dropped_or_kept_as_the_runner_does() {
        let vars = [var("A", "x")];
        for (input, want) in [
            ("a$/b", "a/b"),          // `$` before a non-name is eaten
            ("cost: 5$", "cost: 5$"), // a final `$` stays
            ("${}", ""),
            ("${A", "A"), // unterminated `${` is eaten
            ("${A}${A}", "xx"),
            ("$A-$-", "x-"),
            ("${A B}", ""),              // any text up to `}` is a name
            ("$(id) `id`", "(id) `id`"), // no command substitution
            ("ünï$A☃", "ünïx☃"),
        ] {
            assert_eq!(expand_value(input, &vars), want, "{input:?}");
        }
    }

    #[test]
    fn unknown_names_are_empty_and_the_last_definition_wins() {
        let vars = [var("A", "first"), var("B", "$A/$NOPE."), var("A", "second")];
        assert_eq!(expand_value("$B", &vars), "$A/$NOPE.");
        let all = expand_all(&vars);
        assert_eq!(all[1].value, "second/.");
    }

    #[test]
    fn one_pass_and_raw_variables_are_kept() {
        let mut raw = var("RAW", "$A");
        raw.raw = true;
        let vars = [var("A", "$B"), var("B", "$C"), var("C", "c"), raw];
        let all = expand_all(&vars);
        let values: Vec<&str> = all.iter().map(|v| v.value.as_str()).collect();
        assert_eq!(values, ["$C", "c", "c", "$A"]);
        // The image is expanded with the expanded variables: two levels.
        assert_eq!(expand_value("img:$B", &vars), "img:$C");
        assert_eq!(expand_image("img:$B", &vars), "img:c");
    }

    proptest! {
        #[test]
        fn text_without_dollars_is_unchanged(text in "[^$]*") {
            prop_assert_eq!(expand_value(&text, &[var("A", "x")]), text);
        }

        #[test]
        fn expansion_never_panics_and_keeps_utf8(text in "\\PC*", value in "\\PC*") {
            let _ = expand_value(&text, &[var("A", &value)]);
        }
    }
}
