//! GitLab's duration syntax, as `timeout:` takes it.

/// Parses a duration the way GitLab does for `timeout:`: `3600` (seconds),
/// `1h 30m`, `1h30m`, `90 minutes`, `1 hour and 5 minutes, 10s`, `1.5 hours`,
/// `01:30:00` or `1:30` (minutes and seconds).
pub(crate) fn parse_duration(text: &str) -> Result<u64, String> {
    let bad = || format!("`{text}` is not a duration; write it like `3600`, `2h`, `1h 30m` or `90 minutes`");
    let lower = text.trim().to_ascii_lowercase();
    if lower.is_empty() {
        return Err(bad());
    }
    let secs = if lower.bytes().all(|b| b.is_ascii_digit()) {
        lower.parse::<f64>().map_err(|_| bad())?
    } else if lower.contains(':') {
        let parts: Vec<&str> = lower.split(':').collect();
        if parts.len() > 3 || parts.iter().any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
            return Err(bad());
        }
        parts
            .iter()
            .try_fold(0.0, |total: f64, part| part.parse::<f64>().map(|n| total * 60.0 + n).map_err(|_| bad()))?
    } else {
        let mut total = 0.0;
        let mut components = 0;
        let mut rest = lower.as_str();
        loop {
            rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ',');
            if rest.is_empty() {
                break;
            }
            if components > 0 {
                if let Some(after) = rest.strip_prefix("and") {
                    if after.starts_with(|c: char| c.is_whitespace()) {
                        rest = after;
                        continue;
                    }
                }
            }
            let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
            let number: f64 = rest[..number_len].parse().map_err(|_| bad())?;
            rest = rest[number_len..].trim_start();
            let unit_len = rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(rest.len());
            let unit = unit_seconds(&rest[..unit_len]).ok_or_else(bad)?;
            rest = &rest[unit_len..];
            total += number * unit;
            components += 1;
        }
        if components == 0 {
            return Err(bad());
        }
        total
    };
    let secs = secs.round();
    if !(1.0..=1e12).contains(&secs) {
        return Err(format!("`{text}` must be at least one second and at most a few thousand years"));
    }
    // The range check above makes the conversion exact.
    Ok(secs as u64)
}

/// Seconds in a duration unit as ChronicDuration (GitLab's parser) names it.
fn unit_seconds(unit: &str) -> Option<f64> {
    const MINUTE: f64 = 60.0;
    const HOUR: f64 = 60.0 * MINUTE;
    const DAY: f64 = 24.0 * HOUR;
    Some(match unit {
        "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
        "m" | "min" | "mins" | "minute" | "minutes" => MINUTE,
        "h" | "hr" | "hrs" | "hour" | "hours" => HOUR,
        "d" | "day" | "days" => DAY,
        "w" | "wk" | "wks" | "week" | "weeks" => 7.0 * DAY,
        "mo" | "mos" | "month" | "months" => 30.0 * DAY,
        "y" | "yr" | "yrs" | "year" | "years" => 365.0 * DAY,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_parsing_table() {
        let table: &[(&str, u64)] = &[
            ("3600", 3600),
            ("2h", 7200),
            ("1h 30m", 5400),
            ("1h30m", 5400),
            ("90 minutes", 5400),
            ("90 min", 5400),
            ("1 hour 5 minutes 10s", 3910),
            ("1 hour and 5 minutes", 3900),
            ("1 hour, 5 minutes, 10 seconds", 3910),
            ("30 secs", 30),
            ("45s", 45),
            ("1.5 hours", 5400),
            ("1 day", 86_400),
            ("2d 3h", 183_600),
            ("1 week", 604_800),
            ("3 Hours", 10_800),
            ("  10m  ", 600),
            ("01:30:00", 5400),
            ("1:30", 90),
        ];
        for (text, secs) in table {
            assert_eq!(parse_duration(text), Ok(*secs), "{text}");
        }
        for text in ["", "0", "0s", "soon", "10 parsecs", "1h 30", "h", "1..5h", "1:2:3:4", "and 5m"] {
            assert!(parse_duration(text).is_err(), "{text:?} should not parse");
        }
    }
}
