//! `rules:` evaluated as GitLab evaluates them when it creates a pipeline
//! (<https://docs.gitlab.com/ci/yaml/#rules>, <https://docs.gitlab.com/ci/jobs/job_rules/>):
//! the first rule whose clauses all hold decides; `when: never` (or no
//! matching rule) means the job is not created.
//!
//! `rules:if` expressions (<https://docs.gitlab.com/ci/jobs/job_rules/#cicd-variable-expressions>):
//! `$VAR`, `"string"` or `'string'`, `null`, `/regex/flags`; `==`, `!=`,
//! `=~`, `!~`; `&&` binding tighter than `||`; parentheses. An undefined
//! variable is null; `$VAR` alone holds when it is defined and not empty;
//! a pattern on the right of `=~` may come from a variable holding `/.../`.
//! `changes:` and `exists:` are not evaluated: they are taken to hold, and
//! the decision says so.

use regex::Regex;
use serde_norway::Value;

use crate::keywords::variables;
use crate::yaml::{kind, scalar_string};
use crate::Variable;

/// One rule of a job's `rules:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The `if:` expression.
    pub condition: Option<String>,
    /// `when:`, `on_success` when absent.
    pub when: String,
    /// `variables:`: set for the job when this rule decides.
    pub variables: Vec<Variable>,
    /// The clauses not evaluated (`changes`, `exists`), taken to hold.
    pub unevaluated: Vec<String>,
}

/// What a job's rules decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether GitLab would create the job.
    pub created: bool,
    /// The deciding rule's index (from 1), `None` when none matched.
    pub rule: Option<usize>,
    /// The `when:` of the deciding rule.
    pub when: Option<String>,
    /// Why, in words: which rule and what it says.
    pub reason: String,
}

/// The rules of a `rules:` value.
pub(crate) fn parse_rules(value: &Value) -> Result<Vec<Rule>, String> {
    let Value::Sequence(items) = value else {
        return Err(format!("must be a list of rules, not {}", kind(value)));
    };
    let mut rules = Vec::new();
    for (at, item) in items.iter().enumerate() {
        let Value::Mapping(fields) = item else {
            return Err(format!("rule {} is {}; a rule is a hash like `{{if: ..., when: ...}}`", at + 1, kind(item)));
        };
        let mut rule =
            Rule { condition: None, when: "on_success".to_owned(), variables: Vec::new(), unevaluated: Vec::new() };
        for (key, value) in fields {
            match key.as_str() {
                Some("if") => {
                    rule.condition =
                        Some(scalar_string(value).ok_or_else(|| format!("`if` of rule {} must be a string", at + 1))?)
                }
                Some("when") => {
                    rule.when =
                        value.as_str().ok_or_else(|| format!("`when` of rule {} must be a word", at + 1))?.to_owned()
                }
                Some("variables") => rule.variables = variables(value)?,
                Some(other @ ("changes" | "exists")) => rule.unevaluated.push(other.to_owned()),
                Some("allow_failure" | "needs" | "interruptible" | "start_in") => {}
                _ => {
                    return Err(format!(
                        "rule {} has the unknown key `{}`",
                        at + 1,
                        scalar_string(key).unwrap_or_else(|| kind(key).to_owned())
                    ))
                }
            }
        }
        rules.push(rule);
    }
    Ok(rules)
}

/// Decides with `lookup` giving each variable's value (`None`: undefined).
///
/// # Errors
///
/// When an `if:` expression is not valid, naming the rule.
pub fn decide(rules: &[Rule], lookup: &dyn Fn(&str) -> Option<String>) -> Result<Decision, String> {
    for (at, rule) in rules.iter().enumerate() {
        let holds = match &rule.condition {
            None => true,
            Some(condition) => {
                evaluate(condition, lookup).map_err(|e| format!("rule {}: `if: {condition}`: {e}", at + 1))?
            }
        };
        if !holds {
            continue;
        }
        let mut reason = format!("rule {}", at + 1);
        if let Some(condition) = &rule.condition {
            reason.push_str(&format!(" (`if: {condition}`)"));
        }
        reason.push_str(&format!(" matches, with `when: {}`", rule.when));
        if !rule.unevaluated.is_empty() {
            reason.push_str(&format!(
                "; its `{}` {} not evaluated and taken to hold",
                rule.unevaluated.join("`, `"),
                if rule.unevaluated.len() == 1 { "is" } else { "are" }
            ));
        }
        return Ok(Decision {
            created: rule.when != "never",
            rule: Some(at + 1),
            when: Some(rule.when.clone()),
            reason,
        });
    }
    Ok(Decision { created: false, rule: None, when: None, reason: "no rule matches".to_owned() })
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Variable(String),
    Text(String),
    Null,
    Pattern(String, String),
    Op(&'static str),
    Open,
    Close,
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut at = 0;
    while at < chars.len() {
        let c = chars[at];
        let rest: String = chars[at..].iter().take(2).collect();
        match c {
            ' ' | '\t' | '\n' => at += 1,
            '(' => {
                tokens.push(Token::Open);
                at += 1
            }
            ')' => {
                tokens.push(Token::Close);
                at += 1
            }
            '$' => {
                let braced = chars.get(at + 1) == Some(&'{');
                let start = at + 1 + usize::from(braced);
                let mut end = start;
                while end < chars.len() && (chars[end].is_ascii_alphanumeric() || chars[end] == '_') {
                    end += 1;
                }
                if end == start {
                    return Err(format!("a `$` without a variable name at character {}", at + 1));
                }
                tokens.push(Token::Variable(chars[start..end].iter().collect()));
                at = end + usize::from(braced && chars.get(end) == Some(&'}'));
            }
            '"' | '\'' => {
                let end = chars[at + 1..].iter().position(|d| *d == c).ok_or("an unterminated string")?;
                tokens.push(Token::Text(chars[at + 1..at + 1 + end].iter().collect()));
                at += end + 2;
            }
            '/' => {
                let mut end = at + 1;
                while end < chars.len() && chars[end] != '/' {
                    end += if chars[end] == '\\' { 2 } else { 1 };
                }
                if end >= chars.len() {
                    return Err("an unterminated /pattern/".to_owned());
                }
                let pattern: String = chars[at + 1..end].iter().collect();
                let mut flags_end = end + 1;
                while flags_end < chars.len() && chars[flags_end].is_ascii_alphabetic() {
                    flags_end += 1;
                }
                tokens.push(Token::Pattern(pattern, chars[end + 1..flags_end].iter().collect()));
                at = flags_end;
            }
            _ if rest == "==" || rest == "!=" || rest == "=~" || rest == "!~" || rest == "&&" || rest == "||" => {
                tokens.push(Token::Op(match rest.as_str() {
                    "==" => "==",
                    "!=" => "!=",
                    "=~" => "=~",
                    "!~" => "!~",
                    "&&" => "&&",
                    _ => "||",
                }));
                at += 2;
            }
            _ if chars[at..].iter().take(4).collect::<String>() == "null" => {
                tokens.push(Token::Null);
                at += 4;
            }
            _ => return Err(format!("unexpected `{c}` at character {}", at + 1)),
        }
    }
    Ok(tokens)
}

#[derive(Debug, Clone, PartialEq)]
enum Operand {
    Value(Option<String>),
    Pattern(String, String),
}

struct Evaluator<'a> {
    tokens: Vec<Token>,
    at: usize,
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Evaluator<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn or(&mut self) -> Result<bool, String> {
        let mut value = self.and()?;
        while self.peek() == Some(&Token::Op("||")) {
            self.at += 1;
            let right = self.and()?;
            value = value || right;
        }
        Ok(value)
    }

    fn and(&mut self) -> Result<bool, String> {
        let mut value = self.comparison()?;
        while self.peek() == Some(&Token::Op("&&")) {
            self.at += 1;
            let right = self.comparison()?;
            value = value && right;
        }
        Ok(value)
    }

    fn operand(&mut self) -> Result<Operand, String> {
        let token = self.tokens.get(self.at).cloned().ok_or("the expression ends too early")?;
        self.at += 1;
        Ok(match token {
            Token::Variable(name) => Operand::Value((self.lookup)(&name)),
            Token::Text(text) => Operand::Value(Some(text)),
            Token::Null => Operand::Value(None),
            Token::Pattern(pattern, flags) => Operand::Pattern(pattern, flags),
            other => return Err(format!("expected a value, found {other:?}")),
        })
    }

    fn comparison(&mut self) -> Result<bool, String> {
        if self.peek() == Some(&Token::Open) {
            self.at += 1;
            let value = self.or()?;
            if self.peek() != Some(&Token::Close) {
                return Err("a `(` without its `)`".to_owned());
            }
            self.at += 1;
            return Ok(value);
        }
        let left = self.operand()?;
        let op = match self.peek() {
            Some(Token::Op(op @ ("==" | "!=" | "=~" | "!~"))) => *op,
            _ => {
                // A lone operand: a defined, non-empty value.
                return Ok(
                    matches!(&left, Operand::Value(Some(v)) if !v.is_empty()) || matches!(left, Operand::Pattern(..))
                );
            }
        };
        self.at += 1;
        let right = self.operand()?;
        let text = |operand: &Operand| match operand {
            Operand::Value(v) => v.clone(),
            Operand::Pattern(p, f) => Some(format!("/{p}/{f}")),
        };
        match op {
            "==" => Ok(text(&left) == text(&right)),
            "!=" => Ok(text(&left) != text(&right)),
            _ => {
                let (pattern, flags) = match right {
                    Operand::Pattern(p, f) => (p, f),
                    Operand::Value(Some(v)) if v.starts_with('/') && v.rfind('/').is_some_and(|end| end > 0) => {
                        let end = v.rfind('/').unwrap_or(0);
                        (v[1..end].to_owned(), v[end + 1..].to_owned())
                    }
                    other => return Err(format!("the right of `{op}` must be a /pattern/, not {other:?}")),
                };
                let inline: String = flags.chars().filter(|f| matches!(f, 'i' | 'm' | 's' | 'x')).collect();
                let source = if inline.is_empty() { pattern.clone() } else { format!("(?{inline}){pattern}") };
                let regex = Regex::new(&source).map_err(|e| format!("/{pattern}/ is not a valid pattern: {e}"))?;
                let matched = text(&left).is_some_and(|v| regex.is_match(&v));
                Ok(if op == "=~" { matched } else { !matched })
            }
        }
    }
}

/// Whether the `rules:if` expression `text` holds.
pub(crate) fn evaluate(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<bool, String> {
    let mut evaluator = Evaluator { tokens: tokenize(text)?, at: 0, lookup };
    let value = evaluator.or()?;
    if evaluator.at != evaluator.tokens.len() {
        return Err(format!("unexpected {:?} after a whole expression", evaluator.tokens[evaluator.at]));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holds(expression: &str) -> bool {
        let lookup = |name: &str| match name {
            "CI_COMMIT_BRANCH" => Some("main".to_owned()),
            "CI_PIPELINE_SOURCE" => Some("push".to_owned()),
            "EMPTY" => Some(String::new()),
            "PATTERN" => Some("/^ma/".to_owned()),
            _ => None,
        };
        evaluate(expression, &lookup).unwrap_or_else(|e| panic!("{expression}: {e}"))
    }

    /// <https://docs.gitlab.com/ci/jobs/job_rules/#cicd-variable-expressions>
    #[test]
    fn variable_expressions() {
        assert!(holds("$CI_COMMIT_BRANCH == \"main\""));
        assert!(holds("$CI_COMMIT_BRANCH != 'dev'"));
        assert!(holds("$UNDEFINED == null"));
        assert!(!holds("$EMPTY == null"));
        assert!(holds("$EMPTY == ''"));
        assert!(holds("$CI_COMMIT_BRANCH"));
        assert!(!holds("$EMPTY"));
        assert!(!holds("$UNDEFINED"));
        assert!(holds("$CI_COMMIT_BRANCH =~ /^MA/i"));
        assert!(!holds("$CI_COMMIT_BRANCH =~ /^MA/"));
        assert!(holds("$CI_COMMIT_BRANCH !~ /^release/"));
        assert!(!holds("$UNDEFINED =~ /.*/"));
        assert!(holds("$CI_COMMIT_BRANCH =~ $PATTERN"), "a pattern from a variable");
        assert!(holds("${CI_COMMIT_BRANCH} == $CI_COMMIT_BRANCH"));
        // `&&` binds tighter than `||`; parentheses group.
        assert!(holds("$UNDEFINED || $CI_COMMIT_BRANCH == 'main' && $CI_PIPELINE_SOURCE == 'push'"));
        assert!(!holds("($UNDEFINED || $CI_COMMIT_BRANCH == 'main') && $CI_PIPELINE_SOURCE == 'web'"));
        assert!(holds("$CI_PIPELINE_SOURCE == 'web' || $CI_PIPELINE_SOURCE == 'push' && $CI_COMMIT_BRANCH"));
        for bad in ["$A ==", "$A = 'x'", "($A", "'open", "$A =~ 'x'", "$A =~ /(/"] {
            assert!(evaluate(bad, &|_| None).is_err(), "{bad}");
        }
    }

    /// <https://docs.gitlab.com/ci/yaml/#rules>: the first matching rule decides.
    #[test]
    fn the_first_matching_rule_decides() {
        let rules = parse_rules(
            &serde_norway::from_str(
                "- if: $CI_COMMIT_TAG\n  when: never\n- if: $CI_COMMIT_BRANCH == 'main'\n  changes: [src/**]\n  variables: {DEPLOY: 'yes'}\n- when: manual\n",
            )
            .unwrap(),
        )
        .unwrap();
        let main = |name: &str| (name == "CI_COMMIT_BRANCH").then(|| "main".to_owned());
        let decision = decide(&rules, &main).unwrap();
        assert!(decision.created);
        assert_eq!(decision.rule, Some(2));
        assert!(decision.reason.contains("`changes` is not evaluated"), "{}", decision.reason);
        assert_eq!(rules[1].variables[0].value, "yes");
        let tag = |name: &str| (name == "CI_COMMIT_TAG").then(|| "v1".to_owned());
        let decision = decide(&rules, &tag).unwrap();
        assert_eq!((decision.created, decision.rule), (false, Some(1)));
        let decision = decide(&rules, &|_| None).unwrap();
        assert_eq!((decision.created, decision.when.as_deref()), (true, Some("manual")));
        let none = decide(&rules[..1], &|_| None).unwrap();
        assert_eq!((none.created, none.rule), (false, None));
        assert!(parse_rules(&serde_norway::from_str("- bogus: 1\n").unwrap()).is_err());
    }
}
