//! Wall-clock instants as text, in UTC, as Ollama's Go server writes them: `time.RFC3339Nano`
//! (`created_at`, trailing zeros of the fraction trimmed) and the IMF-fixdate of the HTTP
//! `Date` header. One calendar conversion serves both. (The daemon's own timestamps are
//! fixed-width RFC 3339 from `humantime`.)
//!
//! Pure functions of a `SystemTime`. No clock is read here; callers pass the instant they mean.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const WEEKDAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// A UTC calendar breakdown of an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    nanos: u32,
    /// 0 = Sunday.
    weekday: usize,
}

fn civil(t: SystemTime) -> Civil {
    // Instants before 1970 never occur here; clamp rather than carry a sign through.
    let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = i64::try_from(since.as_secs()).unwrap_or(i64::MAX / 2);
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    Civil {
        year,
        month: month as u32,
        day: day as u32,
        hour: (of_day / 3_600) as u32,
        minute: (of_day / 60 % 60) as u32,
        second: (of_day % 60) as u32,
        nanos: since.subsec_nanos(),
        // 1970-01-01 was a Thursday.
        weekday: (days + 4).rem_euclid(7) as usize,
    }
}

/// Go's `time.RFC3339Nano` in UTC: fractional seconds with trailing zeros trimmed, and no
/// fraction at all on a whole second (`2024-05-01T10:00:00.12345Z`, `2024-05-01T10:00:00Z`).
pub fn rfc3339_nano(t: SystemTime) -> String {
    let c = civil(t);
    let mut out = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    );
    if c.nanos != 0 {
        let fraction = format!("{:09}", c.nanos);
        out.push('.');
        out.push_str(fraction.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// The HTTP `Date` header value, as Go's `http.TimeFormat` writes it.
pub fn http_date(t: SystemTime) -> String {
    let c = civil(t);
    format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[c.weekday],
        c.day,
        MONTHS[(c.month - 1) as usize],
        c.year,
        c.hour,
        c.minute,
        c.second
    )
}

/// Seconds since the Unix epoch (OpenAI's `created`), as Go's `Time.Unix`.
pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    #[test]
    fn http_date_matches_go_time_format() {
        assert_eq!(http_date(at(0, 0)), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            http_date(at(1_700_000_000, 999)),
            "Tue, 14 Nov 2023 22:13:20 GMT"
        );
        // A leap day.
        assert_eq!(
            http_date(at(1_709_210_096, 0)),
            "Thu, 29 Feb 2024 12:34:56 GMT"
        );
    }

    #[test]
    fn rfc3339_nano_trims_trailing_zeros_like_go() {
        assert_eq!(rfc3339_nano(at(1_700_000_000, 0)), "2023-11-14T22:13:20Z");
        assert_eq!(
            rfc3339_nano(at(1_700_000_000, 123_456_780)),
            "2023-11-14T22:13:20.12345678Z"
        );
        assert_eq!(
            rfc3339_nano(at(1_700_000_000, 5)),
            "2023-11-14T22:13:20.000000005Z"
        );
        assert_eq!(
            rfc3339_nano(at(951_782_400, 500_000_000)),
            "2000-02-29T00:00:00.5Z"
        );
    }

    #[test]
    fn unix_seconds_drops_the_fraction() {
        assert_eq!(unix_seconds(at(1_700_000_000, 999_999_999)), 1_700_000_000);
    }
}
