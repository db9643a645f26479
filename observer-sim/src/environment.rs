//! Ollama's server settings read from the environment exactly as Ollama reads them
//! (`envconfig/config.go`, v0.32.15): `OLLAMA_NUM_PARALLEL`, `OLLAMA_MAX_QUEUE`,
//! `OLLAMA_CONTEXT_LENGTH`, `OLLAMA_MAX_LOADED_MODELS` and `OLLAMA_KEEP_ALIVE`.
//!
//! Facts taken from that file: `Var` trims white space, then any `"` and `'` at either end;
//! `Uint` is `strconv.ParseUint(s, 10, 64)` and falls back to the default (with a warning) on
//! anything else; defaults are NUM_PARALLEL 1, MAX_QUEUE 512, MAX_LOADED_MODELS 0 (3 per GPU),
//! CONTEXT_LENGTH 0 (chosen from VRAM: 4096 below 23 GiB, `server/routes.go`); `KeepAlive` tries
//! `time.ParseDuration`, then a whole number of seconds, keeps 5m otherwise, and makes any
//! negative value infinite. An observer reading `/proc/<pid>/environ` of the simulator applies
//! the same rules. Flags of `observer sim` override these variables.

use std::time::Duration;

use tracing::warn;

/// Looks an environment variable up (the process environment, or a test's map).
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

/// Ollama's defaults.
pub const DEFAULT_NUM_PARALLEL: u32 = 1;
pub const DEFAULT_MAX_QUEUE: u32 = 512;
/// Context length of the VRAM tier below 23 GiB (what `OLLAMA_CONTEXT_LENGTH=0` means here).
pub const DEFAULT_CONTEXT_LENGTH: u32 = 4096;
/// Loaded models when `OLLAMA_MAX_LOADED_MODELS` is 0: 3 per GPU; the simulator has one.
pub const DEFAULT_MAX_LOADED_MODELS: u32 = 3;
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(300);

/// `envconfig.Var`.
pub fn var(env: Lookup<'_>, key: &str) -> String {
    env(key)
        .unwrap_or_default()
        .trim()
        .trim_matches(['"', '\''])
        .to_owned()
}

/// `envconfig.Uint`, narrowed to what the simulator stores (larger values saturate).
pub fn uint(env: Lookup<'_>, key: &str, default: u32) -> u32 {
    let value = var(env, key);
    if value.is_empty() {
        return default;
    }
    // ParseUint takes decimal digits only: no sign, no spaces, no underscores.
    match value.parse::<u64>() {
        Ok(n) if value.bytes().all(|b| b.is_ascii_digit()) => u32::try_from(n).unwrap_or(u32::MAX),
        _ => {
            warn!(
                key,
                value, default, "invalid environment variable, using default"
            );
            default
        }
    }
}

/// `envconfig.KeepAlive`: `Duration::MAX` stands for Ollama's infinite (negative) keep-alive.
pub fn keep_alive(env: Lookup<'_>) -> Duration {
    let value = var(env, "OLLAMA_KEEP_ALIVE");
    if value.is_empty() {
        return DEFAULT_KEEP_ALIVE;
    }
    let nanos = parse_go_duration(&value).or_else(|| {
        value
            .parse::<i64>()
            .ok()
            .map(|secs| i128::from(secs) * 1_000_000_000)
    });
    match nanos {
        Some(n) if n < 0 => Duration::MAX,
        Some(n) => Duration::from_nanos(u64::try_from(n).unwrap_or(u64::MAX)),
        None => DEFAULT_KEEP_ALIVE,
    }
}

/// Go's `time.ParseDuration`, in nanoseconds: `[-+]?([0-9]*(\.[0-9]*)?unit)+`, or `0`.
pub fn parse_go_duration(text: &str) -> Option<i128> {
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: i128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, after) = rest.split_at(int_len);
        let (frac_part, after) = match after.strip_prefix('.') {
            Some(after) => {
                let len = after.bytes().take_while(u8::is_ascii_digit).count();
                after.split_at(len)
            }
            None => ("", after),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return None;
        }
        let unit_len = after
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let scale: i128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        let whole: i128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().ok()?
        };
        let mut value = whole.checked_mul(scale)?;
        // Fraction digits past nanosecond precision cannot change the result.
        let digits = &frac_part[..frac_part.len().min(18)];
        if !digits.is_empty() {
            let fraction: i128 = digits.parse().ok()?;
            value += fraction * scale / 10_i128.pow(digits.len() as u32);
        }
        total = total.checked_add(value)?;
        if total > i128::from(i64::MAX) {
            return None;
        }
        rest = after;
    }
    Some(if negative { -total } else { total })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |key| {
            pairs
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn uints_parse_like_envconfig() {
        let e = env(&[
            ("A", " \"4\" "),
            ("B", "+4"),
            ("C", "-1"),
            ("D", "x"),
            ("E", "0"),
        ]);
        assert_eq!(uint(&e, "A", 1), 4);
        assert_eq!(uint(&e, "B", 1), 1);
        assert_eq!(uint(&e, "C", 1), 1);
        assert_eq!(uint(&e, "D", 512), 512);
        assert_eq!(uint(&e, "E", 512), 0);
        assert_eq!(uint(&e, "MISSING", 512), 512);
    }

    #[test]
    fn keep_alive_parses_like_envconfig() {
        let keep = |v: &str| keep_alive(&env(&[("OLLAMA_KEEP_ALIVE", v)]));
        assert_eq!(keep(""), Duration::from_secs(300));
        assert_eq!(keep("10m"), Duration::from_secs(600));
        assert_eq!(keep("1h30m"), Duration::from_secs(5400));
        assert_eq!(keep("1.5s"), Duration::from_millis(1500));
        assert_eq!(keep("'90'"), Duration::from_secs(90));
        assert_eq!(keep("0"), Duration::ZERO);
        assert_eq!(keep("-1"), Duration::MAX);
        assert_eq!(keep("-1m"), Duration::MAX);
        assert_eq!(keep("soon"), Duration::from_secs(300));
        assert_eq!(keep("10"), Duration::from_secs(10));
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("300ms"), Some(300_000_000));
        assert_eq!(parse_go_duration(".5s"), Some(500_000_000));
        assert_eq!(parse_go_duration("2h45m"), Some(9_900_000_000_000));
        assert_eq!(parse_go_duration("1"), None);
        assert_eq!(parse_go_duration("s"), None);
        assert_eq!(parse_go_duration("1d"), None);
        assert_eq!(parse_go_duration("3000000h"), None);
    }
}
