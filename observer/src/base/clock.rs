//! The clocks: CLOCK_MONOTONIC, which the kernel side's timestamps (`bpf_ktime_get_ns`) and
//! the pipeline's deadlines use; its offset to the wall clock, for printing those timestamps;
//! and durations as the flags spell them.

use std::time::Duration;

/// CLOCK_MONOTONIC in ns, the clock of the kernel side's timestamps.
pub fn monotonic_ns() -> u64 {
    u64::try_from(clock_ns(libc::CLOCK_MONOTONIC)).unwrap_or(0)
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC, taken once: kernel timestamps (`bpf_ktime_get_ns`, the
/// monotonic clock) plus this offset are wall-clock times. Taken once so that the times of one
/// trace stay in the order of their timestamps even if the wall clock is stepped meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockOffset {
    /// Nanoseconds to add to a monotonic timestamp to get nanoseconds since the Unix epoch.
    pub realtime_minus_monotonic_ns: i128,
}

impl ClockOffset {
    pub fn now() -> ClockOffset {
        // Bracketing the realtime read by two monotonic reads halves the error of the pairing.
        let before = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        let after = clock_ns(libc::CLOCK_MONOTONIC);
        ClockOffset::from_readings(before, real, after)
    }

    /// The offset from a realtime reading taken between two monotonic readings.
    pub fn from_readings(monotonic_before: i128, realtime: i128, monotonic_after: i128) -> Self {
        let monotonic = monotonic_before + (monotonic_after - monotonic_before) / 2;
        ClockOffset {
            realtime_minus_monotonic_ns: realtime - monotonic,
        }
    }

    /// Nanoseconds since the Unix epoch of a kernel monotonic timestamp.
    pub fn wall_ns(&self, monotonic_ns: u64) -> i128 {
        i128::from(monotonic_ns) + self.realtime_minus_monotonic_ns
    }
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec, and both clocks exist on every Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// RFC 3339 in UTC with nanoseconds, always nine digits: `2024-05-01T10:00:00.000000042Z`.
pub fn rfc3339_nanos(unix_ns: i128) -> String {
    let since = std::time::Duration::from_nanos(u64::try_from(unix_ns).unwrap_or(0));
    humantime::format_rfc3339_nanos(std::time::UNIX_EPOCH + since).to_string()
}

/// A duration flag: `5s`, `300ms`, `2m`, `1h 30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|err| format!("{text:?}: {err} (e.g. 5s, 300ms, 2m)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_offset_maps_monotonic_to_wall_time() {
        let offset = ClockOffset::from_readings(1_000, 1_700_000_000_000_000_500, 1_000);
        assert_eq!(offset.wall_ns(1_000), 1_700_000_000_000_000_500);
        assert_eq!(offset.wall_ns(2_000), 1_700_000_000_000_001_500);
        // The realtime reading is paired with the middle of the two monotonic readings.
        let bracketed = ClockOffset::from_readings(1_000, 5_000, 3_000);
        assert_eq!(bracketed.realtime_minus_monotonic_ns, 3_000);

        let now = ClockOffset::now();
        let mono = clock_ns(libc::CLOCK_MONOTONIC) as u64;
        let real = clock_ns(libc::CLOCK_REALTIME);
        assert!((now.wall_ns(mono) - real).abs() < 1_000_000_000, "{now:?}");
    }
}
