//! When to ask the responder again: a plain type, fed with results.

use std::time::Duration;

use super::config::OcspConfig;

/// Refresh and retry times of one certificate.
#[derive(Debug, Clone)]
pub struct Schedule {
    refresh_min: Duration,
    refresh_max: Duration,
    retry_min: Duration,
    retry_max: Duration,
    /// Failures since the last verified response.
    failures: u32,
}

impl Schedule {
    pub fn new(cfg: &OcspConfig) -> Self {
        Self {
            refresh_min: cfg.refresh_min,
            refresh_max: cfg.refresh_max,
            retry_min: cfg.retry_min,
            retry_max: cfg.retry_max,
            failures: 0,
        }
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The wait after a verified response at `now` valid until `next_update` (unix
    /// seconds): halfway there, so a response outlives a responder outage as long as
    /// possible while the retries run, within `refresh_min..=refresh_max`.
    pub fn after_success(&mut self, now: i64, next_update: i64) -> Duration {
        self.failures = 0;
        let half = Duration::from_secs(u64::try_from(next_update.saturating_sub(now)).unwrap_or(0) / 2);
        half.clamp(self.refresh_min, self.refresh_max)
    }

    /// The wait after a failed fetch: `retry_min` doubled per earlier failure, capped at
    /// `retry_max`, then "equal jitter" (a point in the upper half chosen by `fraction`
    /// in [0, 1)) so that certificates of one responder that failed together spread out.
    pub fn after_failure(&mut self, fraction: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let exp = (self.failures - 1).min(31);
        let full = self.retry_min.checked_mul(1u32 << exp).unwrap_or(self.retry_max).min(self.retry_max);
        let half = full / 2;
        half + half.mul_f64(fraction.clamp(0.0, 1.0))
    }
}

/// A uniformly random fraction in [0, 1) for the jitter.
pub fn jitter() -> f64 {
    let mut bytes = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> Schedule {
        let cfg = OcspConfig {
            refresh_min: Duration::from_secs(60),
            refresh_max: Duration::from_secs(3600),
            retry_min: Duration::from_secs(10),
            retry_max: Duration::from_secs(300),
            ..OcspConfig::default()
        };
        Schedule::new(&cfg)
    }

    #[test]
    fn refresh_is_halfway_to_next_update_within_bounds() {
        let mut s = schedule();
        assert_eq!(s.after_success(1000, 1000 + 1200), Duration::from_secs(600));
        assert_eq!(s.after_success(1000, 1000 + 7 * 86400), Duration::from_secs(3600), "capped by refresh_max");
        assert_eq!(s.after_success(1000, 1000 + 30), Duration::from_secs(60), "at least refresh_min");
        assert_eq!(s.after_success(1000, 900), Duration::from_secs(60), "already stale: refresh_min");
    }

    #[test]
    fn failures_back_off_exponentially_with_jitter_in_the_upper_half_and_reset_on_success() {
        let mut s = schedule();
        let mut lows = Vec::new();
        for failure in 1..=8u32 {
            let full = (Duration::from_secs(10) * 2u32.pow(failure - 1)).min(Duration::from_secs(300));
            let mut low = s.clone();
            let mut high = s.clone();
            let lo = low.after_failure(0.0);
            let hi = high.after_failure(0.999_999);
            let mid = s.after_failure(jitter());
            assert_eq!(lo, full / 2, "failure {failure}");
            assert!(hi <= full && hi > full.mul_f64(0.99), "failure {failure}: {hi:?} of {full:?}");
            assert!(mid >= lo && mid <= hi, "failure {failure}: {mid:?} within [{lo:?}, {hi:?}]");
            lows.push(lo);
        }
        assert!(lows.windows(2).all(|w| w[0] <= w[1]), "non-decreasing: {lows:?}");
        assert_eq!(*lows.last().unwrap(), Duration::from_secs(150), "capped at retry_max");
        assert_eq!(s.failures(), 8);
        s.after_success(0, 1200);
        assert_eq!(s.failures(), 0);
        assert_eq!(s.after_failure(0.0), Duration::from_secs(5), "back to retry_min");
    }

    #[test]
    fn jitter_is_a_fraction() {
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }
}
