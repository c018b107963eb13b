//! When to order: a pure function of what a certificate task knows (the certificate it
//! serves, the CA's ARI window, the config, the persisted backoff), with the clock and
//! the randomness passed in so that tests pin them.
//!
//! The rules, in order:
//! - a failed order is retried at the backoff's next attempt, whatever else holds;
//! - no usable certificate, or one that lacks a configured domain: order now;
//! - else inside the CA's ARI window when it offers one (a random point, RFC 9773),
//!   otherwise at 2/3 of the lifetime (as cert-manager does);
//! - `renew_before` and the safety margin are deadlines: never later than that long
//!   before expiry, whatever the CA's window says (a window that runs to expiry would
//!   otherwise leave no time for one failure and its retry).

use std::time::{Duration, SystemTime};

use super::backoff::Backoff;
use crate::unix_time;

/// The ARI answer is fetched again no sooner and no later than this.
const ARI_RECHECK_MIN: Duration = Duration::from_secs(60);
const ARI_RECHECK_MAX: Duration = Duration::from_secs(24 * 3600);
/// How many first retry delays (`retry_base`) the safety margin leaves before expiry:
/// the last attempt, the retry after it, and the time both orders take.
const MARGIN_RETRIES: u32 = 3;

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

/// The CA's ARI answer for the served certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AriAnswer {
    pub window: Window,
    /// The CA's Retry-After: when to ask again.
    pub retry_after: Duration,
}

/// The served certificate, as far as planning cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertFacts {
    pub validity: Validity,
    /// Its SANs include every configured domain.
    pub covers_config: bool,
}

/// Everything the planner looks at.
#[derive(Debug, Clone, Copy)]
pub struct Situation<'a> {
    pub now: SystemTime,
    /// The certificate served now, if any.
    pub certificate: Option<CertFacts>,
    pub ari: Option<AriAnswer>,
    /// `[[acme.certificates]] renew_before`.
    pub renew_before: Option<Duration>,
    /// `[acme] retry_base`: the first retry delay, which the safety margin leaves room for.
    pub retry_base: Duration,
    /// Failed orders since the last success (persisted across restarts).
    pub backoff: Option<&'a Backoff>,
    /// Where in the ARI window to renew, in [0, 1): the task keeps it while the CA's
    /// window stays the same, so that a re-check does not draw again.
    pub ari_fraction: f64,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// When to order; now or earlier: at once.
    pub order_at: SystemTime,
    pub reason: Reason,
    /// When to ask the CA's ARI again first (before `order_at`): its window may move.
    pub recheck_at: Option<SystemTime>,
    /// The CA's ARI window taken into account, if any (also when a deadline won).
    pub ari_window: Option<Window>,
}

impl Plan {
    /// When the task should wake up next.
    pub fn wake_at(&self) -> SystemTime {
        self.recheck_at.map_or(self.order_at, |r| r.min(self.order_at))
    }

    /// The reason, with the CA's window when a deadline came before it, for logs.
    pub fn describe(&self) -> String {
        match (self.reason, self.ari_window) {
            (Reason::Ari(_), _) | (_, None) => self.reason.to_string(),
            (reason, Some(w)) => format!("{reason} (ARI window {} .. {})", rfc3339(w.start), rfc3339(w.end)),
        }
    }
}

/// Why the order is planned at that time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No usable certificate is stored.
    Missing,
    /// The configured domains are not all in the stored certificate.
    DomainsChanged,
    /// Retry number `failures` after failed orders.
    Retry { failures: u32 },
    /// Two thirds of the lifetime.
    TwoThirds,
    /// A random point inside the CA's ARI window.
    Ari(Window),
    /// `renew_before` ahead of expiry.
    RenewBefore,
    /// The safety margin ahead of expiry (see [`safety_margin`]).
    SafetyMargin,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Missing => f.write_str("no usable certificate stored"),
            Reason::DomainsChanged => f.write_str("the configured domains are not all in the stored certificate"),
            Reason::Retry { failures } => write!(f, "retry after {failures} failed order(s)"),
            Reason::TwoThirds => f.write_str("2/3 of the lifetime"),
            Reason::Ari(w) => write!(f, "ARI window {} .. {}", rfc3339(w.start), rfc3339(w.end)),
            Reason::RenewBefore => f.write_str("renew_before"),
            Reason::SafetyMargin => f.write_str("safety margin before expiry"),
        }
    }
}

/// The least time left before expiry when a renewal starts: a tenth of the lifetime,
/// and at least three first retry delays (`retry_base`) so that one failed order and
/// its retry still fit; but never more than a third of the lifetime, so the margin
/// alone never renews earlier than 2/3 of it. 90-day certificates: 9 days; 6-day
/// ones: 14.4 h; with the default 5 min `retry_base` at least 15 min.
pub fn safety_margin(lifetime: Duration, retry_base: Duration) -> Duration {
    (lifetime / 10).max(retry_base.saturating_mul(MARGIN_RETRIES)).min(lifetime / 3)
}

/// The plan for `s`.
pub fn plan(s: &Situation) -> Plan {
    let now = s.now;
    if let Some(b) = s.backoff {
        let reason = Reason::Retry { failures: b.failures };
        return Plan { order_at: b.next_attempt, reason, recheck_at: None, ari_window: None };
    }
    let at_once = |reason| Plan { order_at: now, reason, recheck_at: None, ari_window: None };
    let Some(cert) = s.certificate else { return at_once(Reason::Missing) };
    if !cert.covers_config {
        return at_once(Reason::DomainsChanged);
    }
    let v = cert.validity;
    let (mut order_at, mut reason) = match s.ari {
        Some(AriAnswer { window: w, .. }) if w.end >= w.start => {
            let span = w.end.duration_since(w.start).unwrap_or_default();
            (w.start + span.mul_f64(s.ari_fraction.clamp(0.0, 1.0)), Reason::Ari(w))
        }
        _ => (v.not_before + v.lifetime() * 2 / 3, Reason::TwoThirds),
    };
    let deadlines = [
        (s.renew_before, Reason::RenewBefore),
        (Some(safety_margin(v.lifetime(), s.retry_base)), Reason::SafetyMargin),
    ];
    for (before, why) in deadlines {
        let Some(before) = before else { continue };
        // Not before notBefore: a margin longer than the lifetime means "at once".
        let deadline = v.not_after.checked_sub(before).unwrap_or(v.not_before).max(v.not_before);
        if deadline < order_at {
            (order_at, reason) = (deadline, why);
        }
    }
    let recheck_at =
        s.ari.map(|a| now + a.retry_after.clamp(ARI_RECHECK_MIN, ARI_RECHECK_MAX)).filter(|&at| at < order_at);
    let ari_window = s.ari.map(|a| a.window).filter(|w| w.end >= w.start);
    Plan { order_at, reason, recheck_at, ari_window }
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

/// `t` as RFC 3339 in whole seconds, for logs and status.
pub fn rfc3339(t: SystemTime) -> String {
    unix_time::rfc3339(unix_time::secs(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::acme::backoff::RetryPolicy;

    const DAY: Duration = Duration::from_secs(86400);
    const MIN: Duration = Duration::from_secs(60);
    const BASE: Duration = Duration::from_secs(300);

    fn validity(lifetime: Duration) -> Validity {
        let nb = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        Validity { not_before: nb, not_after: nb + lifetime }
    }

    fn situation(v: Validity) -> Situation<'static> {
        Situation {
            now: v.not_before + MIN,
            certificate: Some(CertFacts { validity: v, covers_config: true }),
            ari: None,
            renew_before: None,
            retry_base: BASE,
            backoff: None,
            ari_fraction: 0.5,
        }
    }

    fn ari(start: SystemTime, end: SystemTime) -> Option<AriAnswer> {
        Some(AriAnswer { window: Window { start, end }, retry_after: 6 * 3600 * Duration::from_secs(1) })
    }

    #[test]
    fn acme_plan_two_thirds_of_the_lifetime_by_default() {
        let v = validity(DAY * 90);
        let p = plan(&situation(v));
        assert_eq!((p.order_at, p.reason, p.recheck_at), (v.not_before + DAY * 60, Reason::TwoThirds, None));
        assert_eq!(p.wake_at(), p.order_at);
    }

    #[test]
    fn acme_plan_missing_or_incomplete_certificates_order_now() {
        let v = validity(DAY * 90);
        let mut s = situation(v);
        s.certificate = None;
        assert_eq!(plan(&s), Plan { order_at: s.now, reason: Reason::Missing, recheck_at: None, ari_window: None });
        s.certificate = Some(CertFacts { validity: v, covers_config: false });
        assert_eq!(plan(&s).reason, Reason::DomainsChanged);
        assert_eq!(plan(&s).order_at, s.now);
    }

    #[test]
    fn acme_plan_ari_window_gives_a_point_inside_it_and_a_recheck() {
        let v = validity(DAY * 90);
        let mut s = situation(v);
        s.ari = ari(v.not_before + DAY * 70, v.not_before + DAY * 72);
        let w = s.ari.unwrap().window;
        s.ari_fraction = 0.0;
        assert_eq!((plan(&s).order_at, plan(&s).reason), (w.start, Reason::Ari(w)));
        s.ari_fraction = 0.5;
        let p = plan(&s);
        assert_eq!(p.order_at, v.not_before + DAY * 71);
        assert_eq!(p.recheck_at, Some(s.now + Duration::from_secs(6 * 3600)), "the CA's Retry-After");
        assert_eq!(p.wake_at(), s.now + Duration::from_secs(6 * 3600));
        s.ari_fraction = 0.999_999;
        assert!(plan(&s).order_at < w.end);
        // An ARI window earlier than 2/3 (the CA wants early renewal, e.g. revocation).
        s.ari = ari(v.not_before + DAY, v.not_before + DAY * 2);
        assert!(plan(&s).order_at < v.not_before + DAY * 2);
        // A window that ends before it starts is ignored.
        s.ari = ari(w.end, w.start);
        assert_eq!(plan(&s).reason, Reason::TwoThirds);
        // Retry-After is bounded: at least a minute, at most a day.
        s.ari = Some(AriAnswer { window: w, retry_after: Duration::ZERO });
        assert_eq!(plan(&s).recheck_at, Some(s.now + MIN));
        s.ari = Some(AriAnswer { window: w, retry_after: DAY * 30 });
        assert_eq!(plan(&s).recheck_at, Some(s.now + DAY));
    }

    /// The issue 13 case: acme2certifier's window runs from 85 % of the lifetime to
    /// expiry; certwire renewed 6-10 s before expiry, and one failure let it lapse.
    #[test]
    fn acme_plan_ari_window_to_expiry_keeps_a_safety_margin() {
        // Three-minute certificates with the default 5 min retry_base: nothing but 2/3 fits.
        let v = validity(3 * MIN);
        let mut s = situation(v);
        s.now = v.not_before;
        s.ari = ari(v.not_before + Duration::from_secs(153), v.not_after);
        s.ari_fraction = 0.95;
        let p = plan(&s);
        assert_eq!((p.order_at, p.reason), (v.not_before + 2 * MIN, Reason::SafetyMargin));
        assert_eq!(
            p.describe(),
            "safety margin before expiry (ARI window 2023-11-14T22:15:53Z .. 2023-11-14T22:16:20Z)",
            "the log still names the CA's window"
        );
        // A short retry_base: a tenth of the lifetime.
        s.retry_base = Duration::from_secs(1);
        assert_eq!(plan(&s).order_at, v.not_after - Duration::from_secs(18));
        // 90 days, window to expiry: at least 9 days before.
        let v = validity(DAY * 90);
        let mut s = situation(v);
        s.ari = ari(v.not_before + DAY * 80, v.not_after);
        s.ari_fraction = 0.99;
        assert_eq!((plan(&s).order_at, plan(&s).reason), (v.not_after - DAY * 9, Reason::SafetyMargin));
        // A window well before the margin is taken as it is.
        s.ari = ari(v.not_before + DAY * 60, v.not_before + DAY * 62);
        assert_eq!(plan(&s).reason, Reason::Ari(s.ari.unwrap().window));
    }

    #[test]
    fn acme_plan_safety_margin_bounds() {
        assert_eq!(safety_margin(DAY * 90, BASE), DAY * 9);
        assert_eq!(safety_margin(DAY * 6, BASE), Duration::from_secs(6 * 86400 / 10));
        assert_eq!(safety_margin(2 * 3600 * Duration::from_secs(1), BASE), 15 * MIN, "three retry bases");
        assert_eq!(safety_margin(3 * MIN, BASE), MIN, "never more than a third");
        assert_eq!(safety_margin(Duration::ZERO, BASE), Duration::ZERO);
    }

    #[test]
    fn acme_plan_renew_before_is_a_deadline() {
        let v = validity(DAY * 90);
        let mut s = situation(v);
        s.renew_before = Some(DAY * 60);
        assert_eq!((plan(&s).order_at, plan(&s).reason), (v.not_before + DAY * 30, Reason::RenewBefore));
        // Later than 2/3: 2/3 stays.
        s.renew_before = Some(DAY * 10);
        assert_eq!(plan(&s).reason, Reason::TwoThirds);
        // Inside an ARI window: the deadline wins over a later random point.
        s.renew_before = Some(DAY * 15);
        s.ari = ari(v.not_before + DAY * 70, v.not_before + DAY * 80);
        s.ari_fraction = 0.9;
        assert_eq!((plan(&s).order_at, plan(&s).reason), (v.not_before + DAY * 75, Reason::RenewBefore));
        // Longer than the lifetime: renew at once (not before notBefore).
        s.renew_before = Some(DAY * 365);
        assert_eq!(plan(&s).order_at, v.not_before);
        assert_eq!(plan(&s).recheck_at, None, "ordering now: nothing to re-check first");
    }

    #[test]
    fn acme_plan_persisted_backoff_wins() {
        let v = validity(DAY * 90);
        let mut s = situation(v);
        let policy = RetryPolicy { base: BASE, max: Duration::from_secs(3600) };
        let backoff = Backoff::after_failure(None, s.now, policy, 1.0, "new-order: refused".into(), "spec");
        s.backoff = Some(&backoff);
        let p = plan(&s);
        assert_eq!((p.order_at, p.reason), (s.now + BASE, Reason::Retry { failures: 1 }));
        // Even with no certificate at all: a crash-looping replica waits as the last one did.
        s.certificate = None;
        assert_eq!(plan(&s).order_at, s.now + BASE);
        assert_eq!(plan(&s).reason.to_string(), "retry after 1 failed order(s)");
    }

    #[test]
    fn acme_random_fraction_is_in_range() {
        for _ in 0..1000 {
            let f = random_fraction();
            assert!((0.0..1.0).contains(&f), "{f}");
        }
    }

    #[test]
    fn acme_times_print_as_rfc3339() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(86_400_700)), "1970-01-02T00:00:00Z");
    }
}
