//! Small text formats of the model: deviation id patterns and calendar dates.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A deviation id pattern where `*` matches any run of characters, `@` and `/` included, so
/// `unexpected-flow@web@*` covers every destination, protocol and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdPattern {
    pub text: String,
}

impl IdPattern {
    pub fn new(text: impl Into<String>) -> IdPattern {
        IdPattern { text: text.into() }
    }

    pub fn matches(&self, id: &str) -> bool {
        wildcard_match(self.text.as_bytes(), id.as_bytes())
    }
}

/// Iterative wildcard match with backtracking to the last `*`, linear in practice and without
/// recursion, so a hostile pattern cannot exhaust the stack.
fn wildcard_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// Parses `YYYY-MM-DD` to the start of that day in UTC.
///
/// # Errors
/// A message saying which part is invalid.
pub fn parse_date(text: &str) -> Result<SystemTime, String> {
    let parts: Vec<&str> = text.split('-').collect();
    let [year, month, day] = parts.as_slice() else {
        return Err("expected a date as YYYY-MM-DD".to_owned());
    };
    let digits = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(year, 4) || !digits(month, 2) || !digits(day, 2) {
        return Err("expected a date as YYYY-MM-DD".to_owned());
    }
    let year: i64 = year.parse().map_err(|_| "invalid year".to_owned())?;
    let month: u32 = month.parse().map_err(|_| "invalid month".to_owned())?;
    let day: u32 = day.parse().map_err(|_| "invalid day".to_owned())?;
    if !(1..=12).contains(&month) {
        return Err(format!("month {month} is not between 01 and 12"));
    }
    if day == 0 || day > days_in_month(year, month) {
        return Err(format!("day {day} does not exist in {year:04}-{month:02}"));
    }
    if year < 1970 {
        return Err("dates before 1970 are not supported".to_owned());
    }

    let days = days_from_civil(year, month, day);
    Ok(UNIX_EPOCH + Duration::from_secs(days as u64 * 86_400))
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 in the proleptic Gregorian calendar (Howard Hinnant's `days_from_civil`
/// algorithm, which counts in 400-year eras starting in March).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Formats the UTC day that contains `time` as `YYYY-MM-DD`, the inverse of [`parse_date`].
pub fn format_date(time: SystemTime) -> String {
    let seconds = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (year, month, day) = civil_from_days((seconds / 86_400) as i64);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The inverse of [`days_from_civil`], from the same algorithm family.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_date_inverts_parse_date() {
        for text in ["1970-01-01", "2000-02-29", "2027-03-01", "2099-12-31"] {
            assert_eq!(format_date(parse_date(text).unwrap()), text);
        }
    }

    #[test]
    fn wildcard_matches_across_separators() {
        let pattern = IdPattern::new("unexpected-flow@web@*@udp/53");
        assert!(pattern.matches("unexpected-flow@web@internet@udp/53"));
        assert!(pattern.matches("unexpected-flow@web@external:10.0.0.1@udp/53"));
        assert!(!pattern.matches("unexpected-flow@web@internet@tcp/53"));
        assert!(!pattern.matches("unexpected-flow@api@internet@udp/53"));
    }

    #[test]
    fn wildcard_without_star_is_exact() {
        let pattern = IdPattern::new("new-listener@web@0.0.0.0@tcp/80");
        assert!(pattern.matches("new-listener@web@0.0.0.0@tcp/80"));
        assert!(!pattern.matches("new-listener@web@0.0.0.0@tcp/8080"));
        assert!(!pattern.matches("new-listener@web@0.0.0.0@tcp/8"));
    }

    #[test]
    fn wildcard_backtracks_over_several_stars() {
        assert!(IdPattern::new("*@*@db@*").matches("unexpected-flow@web@db@tcp/5432"));
        assert!(!IdPattern::new("*@*@db@*").matches("unexpected-flow@web@dbx@tcp/5432"));
        assert!(IdPattern::new("*").matches(""));
        assert!(IdPattern::new("a*b*c").matches("aXbYbZc"));
    }

    #[test]
    fn date_parses_to_utc_midnight() {
        let epoch_day = parse_date("1970-01-01").unwrap();
        assert_eq!(epoch_day, UNIX_EPOCH);
        let leap = parse_date("2024-02-29").unwrap();
        assert_eq!(
            leap.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_709_164_800
        );
        let later = parse_date("2027-03-01").unwrap();
        assert_eq!(
            later.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_803_859_200
        );
    }

    #[test]
    fn date_rejects_impossible_days() {
        assert!(parse_date("2025-02-29").is_err());
        assert!(parse_date("2025-13-01").is_err());
        assert!(parse_date("2025-1-01").is_err());
        assert!(parse_date("tomorrow").is_err());
    }
}
