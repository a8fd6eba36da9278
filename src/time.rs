//! Wall-clock times and lengths of time as people write them: RFC 3339 timestamps in UTC
//! with microseconds (restore points are that fine), and durations such as `24h` or
//! `1h30m`.
//!
//! Hand-written rather than a date crate: all Strata needs is UTC, the proleptic
//! Gregorian calendar and microseconds since the epoch, which is a few lines of
//! integer arithmetic (days to a civil date and back, after Howard Hinnant's algorithms).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, ErrorKind, Result};

const US_PER_SEC: u64 = 1_000_000;
const SECS_PER_DAY: u64 = 86_400;

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Days since 1970-01-01 to (year, month, day).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// (year, month, day) to days since 1970-01-01.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if month > 2 { month - 3 } else { month + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS` (UTC), for tables.
pub fn seconds_utc(secs: u64) -> String {
    let (year, month, day) = civil(i64::try_from(secs / SECS_PER_DAY).unwrap_or(0));
    let t = secs % SECS_PER_DAY;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

/// Microseconds since the epoch as RFC 3339 in UTC with six decimals
/// (`2026-12-04T10:42:00.000123Z`).
pub fn rfc3339_us(us: u64) -> String {
    let secs = us / US_PER_SEC;
    let mut s = seconds_utc(secs);
    s.replace_range(10..11, "T");
    format!("{s}.{:06}Z", us % US_PER_SEC)
}

fn bad_time(text: &str, why: &str) -> Error {
    Error::msg(
        ErrorKind::InvalidInput,
        format!("{text:?} is not a time: {why} (expected RFC 3339, e.g. 2026-12-04T10:42:00Z)"),
    )
}

/// Reads an RFC 3339 time (`T` or a space between date and time, optional fraction,
/// `Z` or an offset) as microseconds since the epoch.
pub fn parse_rfc3339(text: &str) -> Result<u64> {
    let b = text.as_bytes();
    let num = |from: usize, len: usize| -> Option<u32> {
        let s = text.get(from..from + len)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let sep = |at: usize, ok: &[u8]| b.get(at).is_some_and(|c| ok.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return Err(bad_time(text, "expected YYYY-MM-DDTHH:MM:SS"));
    }
    let field = |from, len, what| num(from, len).ok_or_else(|| bad_time(text, what));
    let year = i64::from(field(0, 4, "bad year")?);
    let month = field(5, 2, "bad month")?;
    let day = field(8, 2, "bad day")?;
    let (hour, minute, second) = (
        field(11, 2, "bad hour")?,
        field(14, 2, "bad minute")?,
        field(17, 2, "bad second")?,
    );
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err(bad_time(text, "no such date"));
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err(bad_time(text, "no such time of day"));
    }
    let mut rest = &text[19..];
    let mut micros = 0u64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad_time(text, "empty fraction of a second"));
        }
        for (i, c) in frac[..digits].bytes().enumerate().take(6) {
            micros += u64::from(c - b'0') * 10u64.pow(5 - i as u32);
        }
        rest = &frac[digits..];
    }
    let offset_secs: i64 = match rest.as_bytes() {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2]
            if [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()) =>
        {
            let h = i64::from((h1 - b'0') * 10 + (h2 - b'0'));
            let m = i64::from((m1 - b'0') * 10 + (m2 - b'0'));
            if h > 23 || m > 59 {
                return Err(bad_time(text, "bad UTC offset"));
            }
            if *sign == b'-' {
                -(h * 3600 + m * 60)
            } else {
                h * 3600 + m * 60
            }
        }
        _ => {
            return Err(bad_time(
                text,
                "expected Z or an offset such as +02:00 at the end",
            ));
        }
    };
    let secs = days_from_civil(year, month, day) * SECS_PER_DAY as i64
        + i64::from(hour * 3600 + minute * 60 + second.min(59))
        - offset_secs;
    let secs = u64::try_from(secs).map_err(|_| bad_time(text, "before 1970"))?;
    Ok(secs * US_PER_SEC + micros)
}

/// Reads a length of time: a number with a unit (`s`, `m`, `h`, `d`, `w`), or several
/// (`1h30m`). A bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let bad = |why: &str| {
        Error::msg(
            ErrorKind::InvalidInput,
            format!("{text:?} is not a length of time: {why} (e.g. 90s, 10m, 24h, 7d, 1h30m)"),
        )
    };
    let t = text.trim();
    if t.is_empty() {
        return Err(bad("empty"));
    }
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total: u64 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad("expected a number"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| bad("number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = match &rest[..unit_len] {
            "s" | "sec" | "secs" => 1,
            "m" | "min" | "mins" => 60,
            "h" | "hr" | "hrs" => 3600,
            "d" | "day" | "days" => SECS_PER_DAY,
            "w" | "week" | "weeks" => 7 * SECS_PER_DAY,
            "" => return Err(bad("a unit is missing")),
            _ => return Err(bad("unknown unit")),
        };
        rest = &rest[unit_len..];
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| bad("too long"))?;
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_in_utc_with_microseconds() {
        assert_eq!(rfc3339_us(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339_us(951_782_400_000_001),
            "2000-02-29T00:00:00.000001Z"
        );
        assert_eq!(seconds_utc(1_700_000_000), "2023-11-14 22:13:20");
    }

    #[test]
    fn times_parse_back() {
        for us in [
            0,
            951_782_400_000_001,
            1_796_387_520_123_456,
            4_102_444_799_999_999,
        ] {
            assert_eq!(parse_rfc3339(&rfc3339_us(us)).unwrap(), us);
        }
        assert_eq!(
            parse_rfc3339("2026-12-04 10:42:00Z").unwrap(),
            parse_rfc3339("2026-12-04T10:42:00.000Z").unwrap()
        );
        assert_eq!(
            parse_rfc3339("2026-12-04T12:42:00+02:00").unwrap(),
            parse_rfc3339("2026-12-04T10:42:00Z").unwrap()
        );
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00.5Z").unwrap(), 500_000);
    }

    #[test]
    fn bad_times_are_refused() {
        for t in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-12-04T24:00:00Z",
            "2026-12-04T10:42:00",
            "2026-12-04T10:42:00.Z",
            "2026-12-04T10:42:00+2",
            "1969-12-31T23:59:59Z",
        ] {
            let e = parse_rfc3339(t).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{t}");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5_400));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_duration("2w").unwrap(),
            Duration::from_secs(1_209_600)
        );
        for t in ["", "h", "10x", "1h30", "-5m", "99999999999999999999d"] {
            assert!(parse_duration(t).is_err(), "{t}");
        }
    }
}
