//! The backoff after failed orders, and its record kept across restarts: a
//! crash-looping certwire waits as the previous run would have, instead of sending the
//! CA one failing order per start. `persist` stores the record next to the account.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// `[acme] retry_base` and `retry_max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max: Duration,
}

/// Failed orders of one certificate since its last success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    pub failures: u32,
    #[serde(rename = "next_attempt_unix", with = "unix_secs")]
    pub next_attempt: SystemTime,
    /// The last failure, `STEP: message` (never key material), shown again after a restart.
    pub last_error: String,
    /// What was ordered ([`spec_key`]): after a config change the record no longer applies.
    pub spec: String,
}

impl Backoff {
    /// The record after one more failure at `now`; `fraction` in [0, 1) is the jitter.
    pub fn after_failure(
        previous: Option<&Backoff>,
        now: SystemTime,
        policy: RetryPolicy,
        fraction: f64,
        last_error: String,
        spec: &str,
    ) -> Backoff {
        let failures = previous.filter(|p| p.spec == spec).map_or(0, |p| p.failures).saturating_add(1);
        // Whole seconds, as the record keeps it.
        let at = (now + delay(policy, failures, fraction)).duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let next_attempt =
            SystemTime::UNIX_EPOCH + Duration::from_secs(at.as_secs() + u64::from(at.subsec_nanos() > 0));
        Backoff { failures, next_attempt, last_error, spec: spec.to_string() }
    }

    /// The certificate's `last_error` in status.
    pub fn status_message(&self, now: SystemTime) -> String {
        let wait = self.next_attempt.duration_since(now).unwrap_or_default();
        format!(
            "ACME order failed at {} (failure {}, next try in {})",
            self.last_error,
            self.failures,
            whole_seconds(wait)
        )
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a Backoff serializes")
    }

    pub fn from_json(bytes: &[u8]) -> anyhow::Result<Backoff> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// What is ordered for a certificate, as a persisted record's `spec`: a record written
/// for other domains, another challenge, key type or CA is ignored, so a fixed config
/// is tried at once instead of after the old backoff.
pub fn spec_key(directory: &str, domains: &[String], challenge: &str, key_type: &str) -> String {
    format!("{directory} {challenge} {key_type} {}", domains.join(","))
}

/// The delay before retry number `failures` (1 = after the first failure): the base
/// doubled per earlier failure, capped at `max`, then "equal jitter": a uniformly
/// random point in the upper half, so that delays keep growing and many certificates
/// failing together spread out instead of retrying in step.
pub fn delay(policy: RetryPolicy, failures: u32, fraction: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(31);
    let full = policy.base.checked_mul(1u32 << exp).unwrap_or(policy.max).min(policy.max);
    let half = full / 2;
    half + half.mul_f64(fraction.clamp(0.0, 1.0))
}

/// `d` rounded to whole seconds, as humantime prints it ("7s", "4m 3s"): the
/// nanoseconds of a jittered delay are noise in a log line or status.
pub fn whole_seconds(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_secs(d.as_secs_f64().round() as u64))
}

mod unix_secs {
    use std::time::{Duration, SystemTime};

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(crate::unix_time::secs(*t).max(0) as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy { base: Duration::from_secs(2), max: Duration::from_secs(3600) };

    #[test]
    fn acme_backoff_doubles_with_jitter_and_is_capped() {
        assert_eq!(delay(POLICY, 1, 0.0), Duration::from_secs(1));
        assert_eq!(delay(POLICY, 1, 1.0), Duration::from_secs(2));
        assert_eq!(delay(POLICY, 2, 1.0), Duration::from_secs(4));
        assert_eq!(delay(POLICY, 4, 0.5), Duration::from_secs(12));
        for failures in [12, 13, 40, u32::MAX] {
            assert_eq!(delay(POLICY, failures, 1.0), POLICY.max, "capped after {failures} failures");
            assert!(delay(POLICY, failures, 0.0) >= POLICY.max / 2, "jitter never drops below half");
        }
        // Growth never stalls below the cap.
        let mut last = Duration::ZERO;
        for failures in 1..12 {
            let upper = delay(POLICY, failures, 1.0);
            assert!(upper >= last);
            last = upper;
        }
    }

    #[test]
    fn acme_backoff_counts_failures_of_the_same_spec_only() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let first = Backoff::after_failure(None, now, POLICY, 1.0, "account: refused".into(), "a");
        assert_eq!((first.failures, first.next_attempt), (1, now + Duration::from_secs(2)));
        let second = Backoff::after_failure(Some(&first), now, POLICY, 1.0, "x".into(), "a");
        assert_eq!((second.failures, second.next_attempt), (2, now + Duration::from_secs(4)));
        let other = Backoff::after_failure(Some(&second), now, POLICY, 1.0, "x".into(), "b");
        assert_eq!(other.failures, 1, "another config starts over");
    }

    #[test]
    fn acme_backoff_record_round_trips_as_json() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let b = Backoff::after_failure(None, now, POLICY, 0.5, "finalize: bad CSR".into(), "spec");
        let json = b.to_json();
        assert!(String::from_utf8_lossy(&json).contains("\"next_attempt_unix\":1700000002"), "{json:?}");
        assert_eq!(Backoff::from_json(&json).unwrap(), b);
        assert!(Backoff::from_json(b"{}").is_err());
    }

    /// The issue 13 case: "next try in 6.927320917s".
    #[test]
    fn acme_last_error_delay_in_whole_seconds() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut b = Backoff::after_failure(None, now, POLICY, 0.0, "new-order: refused".into(), "s");
        b.next_attempt = now + Duration::from_nanos(6_927_320_917);
        assert_eq!(b.status_message(now), "ACME order failed at new-order: refused (failure 1, next try in 7s)");
        b.next_attempt = now + Duration::from_millis(243_400);
        assert!(b.status_message(now).ends_with("next try in 4m 3s)"), "{}", b.status_message(now));
        assert_eq!(whole_seconds(Duration::from_millis(400)).to_string(), "0s");
    }
}
