//! When to renew and when to retry: pure arithmetic on times, with the randomness
//! passed in so that it can be tested.

use std::time::{Duration, SystemTime};

/// A certificate's validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    pub fn from_unix(not_before: i64, not_after: i64) -> Self {
        let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
        Self { not_before: at(not_before), not_after: at(not_after) }
    }

    pub fn lifetime(&self) -> Duration {
        self.not_after.duration_since(self.not_before).unwrap_or_default()
    }
}

/// The CA's ARI suggested window (RFC 9773).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: SystemTime,
    pub end: SystemTime,
}

/// Where a renewal time came from, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// Two thirds of the lifetime.
    TwoThirds,
    /// `renew_before` ahead of expiry.
    RenewBefore,
    /// A random point inside the CA's ARI window.
    Ari,
}

impl Basis {
    pub fn as_str(self) -> &'static str {
        match self {
            Basis::TwoThirds => "2/3 of the lifetime",
            Basis::RenewBefore => "renew_before",
            Basis::Ari => "ARI window",
        }
    }
}

/// When to renew a certificate valid for `validity`.
///
/// - With an ARI window: a uniformly random point inside it (`fraction` in [0, 1)),
///   as RFC 9773 asks, so that many clients do not renew at once.
/// - Else two thirds into the lifetime.
/// - `renew_before`, when configured, is a deadline either way: never later than that
///   long before expiry.
pub fn renewal_time(
    validity: Validity,
    window: Option<Window>,
    renew_before: Option<Duration>,
    fraction: f64,
) -> (SystemTime, Basis) {
    let (mut at, mut basis) = match window {
        Some(w) if w.end >= w.start => {
            let span = w.end.duration_since(w.start).unwrap_or_default();
            (w.start + span.mul_f64(fraction.clamp(0.0, 1.0)), Basis::Ari)
        }
        _ => (validity.not_before + validity.lifetime() * 2 / 3, Basis::TwoThirds),
    };
    if let Some(before) = renew_before {
        let deadline = validity.not_after.checked_sub(before).unwrap_or(validity.not_before).max(validity.not_before);
        if deadline < at {
            at = deadline;
            basis = Basis::RenewBefore;
        }
    }
    (at, basis)
}

/// The delay before retry number `failures` (1 = after the first failure): the base
/// doubled per earlier failure, capped at `max`, then "equal jitter": a uniformly
/// random point in the upper half, so that delays keep growing and many certificates
/// failing together spread out instead of retrying in step.
pub fn backoff(base: Duration, max: Duration, failures: u32, fraction: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(32);
    let full = base.checked_mul(1u32 << exp.min(31)).unwrap_or(max).min(max);
    let half = full / 2;
    half + half.mul_f64(fraction.clamp(0.0, 1.0))
}

/// A random fraction in [0, 1) from the system's CSPRNG (ring).
pub fn random_fraction() -> f64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        return 0.5;
    }
    // 53 random bits: every value exactly representable in an f64.
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86400);

    fn validity(days: u64) -> Validity {
        let nb = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        Validity { not_before: nb, not_after: nb + DAY * days as u32 }
    }

    #[test]
    fn two_thirds_of_the_lifetime_by_default() {
        let v = validity(90);
        let (at, basis) = renewal_time(v, None, None, 0.3);
        assert_eq!(at, v.not_before + DAY * 60);
        assert_eq!(basis, Basis::TwoThirds);
    }

    #[test]
    fn ari_window_gives_a_point_inside_it() {
        let v = validity(90);
        let w = Window { start: v.not_before + DAY * 70, end: v.not_before + DAY * 72 };
        assert_eq!(renewal_time(v, Some(w), None, 0.0), (w.start, Basis::Ari));
        assert_eq!(renewal_time(v, Some(w), None, 0.5).0, v.not_before + DAY * 71);
        assert!(renewal_time(v, Some(w), None, 0.999_999).0 < w.end);
        // An ARI window earlier than 2/3 (the CA wants early renewal, e.g. revocation).
        let early = Window { start: v.not_before + DAY, end: v.not_before + DAY * 2 };
        assert!(renewal_time(v, Some(early), None, 0.5).0 < v.not_before + DAY * 2);
        // A window that ends before it starts is ignored.
        let bad = Window { start: w.end, end: w.start };
        assert_eq!(renewal_time(v, Some(bad), None, 0.5).1, Basis::TwoThirds);
    }

    #[test]
    fn renew_before_is_a_deadline() {
        let v = validity(90);
        let (at, basis) = renewal_time(v, None, Some(DAY * 60), 0.5);
        assert_eq!((at, basis), (v.not_before + DAY * 30, Basis::RenewBefore));
        // Later than 2/3: 2/3 stays.
        assert_eq!(renewal_time(v, None, Some(DAY * 10), 0.5).1, Basis::TwoThirds);
        // Inside an ARI window: the deadline wins over a later random point.
        let w = Window { start: v.not_before + DAY * 70, end: v.not_before + DAY * 80 };
        assert_eq!(renewal_time(v, Some(w), Some(DAY * 15), 0.9).0, v.not_before + DAY * 75);
        // Longer than the lifetime: renew at once (not before notBefore).
        assert_eq!(renewal_time(v, None, Some(DAY * 365), 0.5).0, v.not_before);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let base = Duration::from_secs(2);
        let max = Duration::from_secs(3600);
        assert_eq!(backoff(base, max, 1, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(base, max, 1, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(base, max, 2, 1.0), Duration::from_secs(4));
        assert_eq!(backoff(base, max, 4, 0.5), Duration::from_secs(12));
        for failures in [12, 13, 40, u32::MAX] {
            let d = backoff(base, max, failures, 1.0);
            assert_eq!(d, max, "capped after {failures} failures");
            assert!(backoff(base, max, failures, 0.0) >= max / 2, "jitter never drops below half");
        }
        // Growth never stalls below the cap.
        let mut last = Duration::ZERO;
        for failures in 1..12 {
            let upper = backoff(base, max, failures, 1.0);
            assert!(upper >= last);
            last = upper;
        }
    }

    #[test]
    fn random_fraction_is_in_range() {
        for _ in 0..1000 {
            let f = random_fraction();
            assert!((0.0..1.0).contains(&f), "{f}");
        }
    }
}
