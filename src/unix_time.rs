//! Wall-clock instants as the numbers and text that status, metrics, errors and the CLI
//! show: Unix seconds, milliseconds and microseconds, and RFC 3339 for people.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Whole seconds since the epoch; negative before it (a certificate may say 1950).
pub fn secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Milliseconds since the epoch; 0 before it.
pub fn millis(t: SystemTime) -> i64 {
    since_epoch(t).as_millis().try_into().unwrap_or(i64::MAX)
}

/// Microseconds since the epoch; 0 before it.
pub fn micros(t: SystemTime) -> i64 {
    since_epoch(t).as_micros().try_into().unwrap_or(i64::MAX)
}

fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Unix seconds as RFC 3339 (`2026-12-02T19:44:35Z`); `@SECONDS` when out of range.
pub fn rfc3339(unix_secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("@{unix_secs}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn before_and_after_the_epoch() {
        let after = UNIX_EPOCH + Duration::from_millis(1_500);
        assert_eq!((secs(after), millis(after), micros(after)), (1, 1_500, 1_500_000));
        let before = UNIX_EPOCH - Duration::from_secs(60);
        assert_eq!((secs(before), millis(before), micros(before)), (-60, 0, 0));
        assert_eq!(rfc3339(1_764_704_675), "2025-12-02T19:44:35Z");
        assert_eq!(rfc3339(i64::MAX), format!("@{}", i64::MAX));
    }
}
