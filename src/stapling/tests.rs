//! The stapler against a canned responder, under a paused clock: halfway refresh,
//! jittered backoff, stale drop, must-staple, revocation, bounds.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ring::digest::SHA1_FOR_LEGACY_USE_ONLY as SHA1;
use x509_ocsp::SingleResponse;

use super::fetch::{Fetch, FetchError, FetchFuture};
use super::*;
use crate::ingest::Intake;
use crate::metrics::{LimitLabel, Metrics, OcspResultLabel, RejectLabel};
use crate::pki::KeyBytes;
use crate::pki::ocsp::signed::{Authority, Leaf, signed};
use crate::pki::ocsp_fixtures::{at, cert_id, good, revoked};
use crate::policy::{AllowExpired, OnDelete, OnInvalid, PlaceholderCause, Policy};
use crate::store::Store;

const URL: &str = "http://127.0.0.1:9/ocsp";
const SOURCE: &str = "files:/t";

type Respond = dyn Fn(&str, usize) -> Result<Vec<u8>, FetchError> + Send + Sync;

/// A responder that answers request number n with `respond(n)`, after `delay`, and
/// records when it was asked.
#[derive(Clone)]
struct Canned {
    calls: Arc<Mutex<Vec<Instant>>>,
    /// The URL of each request.
    urls: Arc<Mutex<Vec<String>>>,
    /// What it answered, by request number (ECDSA signatures differ each time).
    answered: Arc<Mutex<Vec<Option<Vec<u8>>>>>,
    respond: Arc<Respond>,
    delay: Duration,
}

impl Canned {
    fn new(respond: impl Fn(usize) -> Result<Vec<u8>, FetchError> + Send + Sync + 'static) -> Self {
        Self::by_url(move |_, n| respond(n))
    }

    /// Answers request number n (counted over all URLs) to `url` with `respond(url, n)`.
    fn by_url(respond: impl Fn(&str, usize) -> Result<Vec<u8>, FetchError> + Send + Sync + 'static) -> Self {
        Self {
            calls: Arc::default(),
            urls: Arc::default(),
            answered: Arc::default(),
            respond: Arc::new(respond),
            delay: Duration::ZERO,
        }
    }

    fn calls(&self) -> Vec<Instant> {
        self.calls.lock().unwrap().clone()
    }

    fn calls_to(&self, url: &str) -> usize {
        self.urls.lock().unwrap().iter().filter(|u| *u == url).count()
    }

    fn answer(&self, n: usize) -> Vec<u8> {
        self.answered.lock().unwrap()[n].clone().expect("a response")
    }
}

impl Fetch for Canned {
    fn fetch(&self, url: &str, _request: Vec<u8>) -> FetchFuture {
        self.urls.lock().unwrap().push(url.to_owned());
        let n = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Instant::now());
            calls.len() - 1
        };
        let (respond, delay, answered, url) = (self.respond.clone(), self.delay, self.answered.clone(), url.to_owned());
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            let answer = respond(&url, n);
            answered.lock().unwrap().push(answer.as_ref().ok().cloned());
            answer
        })
    }
}

struct Env {
    ca: Authority,
    leaf: Leaf,
    /// Wall time at the start: responses are dated from it, as the stapler's clock is.
    t0: SystemTime,
}

impl Env {
    fn new() -> Self {
        let ca = Authority::new("Stapling CA");
        let leaf = ca.leaf("web.example.com", Some(URL));
        Self { ca, leaf, t0: SystemTime::now() }
    }

    fn material(&self) -> Material {
        material(&self.leaf)
    }

    /// A response valid from a minute before the start for `valid` (plus `n` seconds,
    /// so that each one differs).
    fn response(&self, status: fn(x509_ocsp::CertId) -> SingleResponse, valid: Duration, n: usize) -> Vec<u8> {
        let mut single = status(cert_id(&self.leaf.der, &self.ca.der, &SHA1));
        single.this_update = at(self.t0 - Duration::from_secs(60));
        single.next_update = Some(at(self.t0 + valid + Duration::from_secs(n as u64)));
        signed(&self.ca, vec![single], &[])
    }

    /// A response with thisUpdate `this_update` seconds after the start (negative:
    /// before), valid until `valid` after the start.
    fn dated(&self, status: fn(x509_ocsp::CertId) -> SingleResponse, this_update: i64, valid: Duration) -> Vec<u8> {
        let mut single = status(cert_id(&self.leaf.der, &self.ca.der, &SHA1));
        let offset = Duration::from_secs(this_update.unsigned_abs());
        single.this_update = at(if this_update < 0 { self.t0 - offset } else { self.t0 + offset });
        single.next_update = Some(at(self.t0 + valid));
        signed(&self.ca, vec![single], &[])
    }
}

fn material(leaf: &Leaf) -> Material {
    Material::Tls {
        cert_chain_pem: leaf.chain_pem.clone().into_bytes(),
        key_pem: KeyBytes::new(leaf.key_pem.clone().into_bytes()),
        ocsp_staple: None,
    }
}

fn config(mode: Mode) -> OcspConfig {
    OcspConfig {
        mode,
        refresh_min: Duration::from_secs(60),
        refresh_max: Duration::from_secs(12 * 3600),
        retry_min: Duration::from_secs(10),
        retry_max: Duration::from_secs(80),
        ..OcspConfig::default()
    }
}

fn start(cfg: OcspConfig, policy: Policy, fetcher: &Canned) -> (Intake, Stapler, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let stapler = Stapler::with_fetcher(cfg, metrics.clone(), Arc::new(fetcher.clone()));
    let intake = Intake::new(Arc::new(Store::with_policy(policy)), metrics.clone(), SOURCE, AllowExpired::Never)
        .with_stapler(Some(stapler.clone()));
    (intake, stapler, metrics)
}

/// Whether the served resource of `name` holds `staple` (the DER is inline in it).
fn serves_staple(intake: &Intake, name: &str, staple: &[u8]) -> bool {
    intake
        .store()
        .get(name)
        .is_some_and(|s| s.placeholder.is_none() && s.resource.windows(staple.len()).any(|w| w == staple))
}

fn ocsp_state(intake: &Intake, name: &str) -> OcspStatus {
    intake.store().status().into_iter().find(|s| s.name == name).and_then(|s| s.ocsp).expect("ocsp status")
}

fn fetches(metrics: &Metrics, result: &'static str) -> u64 {
    metrics.ocsp_fetches.get_or_create(&OcspResultLabel { result }).get()
}

async fn advance(d: Duration) {
    tokio::time::sleep(d).await;
}

#[tokio::test(start_paused = true)]
async fn a_fetched_staple_is_served_and_refreshed_halfway_to_next_update() {
    let env = Arc::new(Env::new());
    let valid = Duration::from_secs(2 * 3600);
    let e = env.clone();
    let canned = Canned::new(move |n| Ok(e.response(good, valid, n)));
    let (intake, stapler, metrics) = start(config(Mode::Fetch), Policy::default(), &canned);
    let started = Instant::now();

    // Served at once without a staple (fetch mode), then with the fetched one.
    intake.update("web", &env.material(), StdInstant::now()).unwrap();
    assert!(intake.store().get("web").is_some());
    advance(Duration::from_secs(1)).await;
    assert_eq!(canned.calls().len(), 1);
    assert!(serves_staple(&intake, "web", &canned.answer(0)), "the first staple is served");
    let st = ocsp_state(&intake, "web");
    assert_eq!((st.mode, st.state, st.responder.as_deref()), ("fetch", "good", Some(URL)), "{st:?}");
    assert!(st.next_update.is_some() && st.last_error.is_none(), "{st:?}");
    assert_eq!(stapler.tracked(), 1);

    // Nothing more until halfway to nextUpdate (an hour), then a new staple.
    advance(Duration::from_secs(3500)).await;
    assert_eq!(canned.calls().len(), 1, "no fetch before halfway");
    advance(Duration::from_secs(200)).await;
    let calls = canned.calls();
    assert_eq!(calls.len(), 2);
    let gap = (calls[1] - started).as_secs_f64();
    assert!((3598.0..=3602.0).contains(&gap), "refreshed halfway to nextUpdate: after {gap} s");
    assert!(serves_staple(&intake, "web", &canned.answer(1)), "the refreshed staple is served");
    assert_eq!(fetches(&metrics, "good"), 2);
    let label = crate::metrics::SecretLabel { secret: Arc::from("web") };
    assert!(metrics.ocsp_next_update.get_or_create(&label).get() > 0.0);

    // The source's update of the same certificate keeps the staple (attached by the hook).
    intake.update("web", &env.material(), StdInstant::now()).unwrap();
    assert!(serves_staple(&intake, "web", &canned.answer(1)));
    assert_eq!(canned.calls().len(), 2, "no new fetch for the same certificate");

    // Removed at the source: forgotten, no more fetches.
    intake.remove("web");
    assert_eq!(stapler.tracked(), 0);
    advance(Duration::from_secs(5 * 3600)).await;
    assert_eq!(canned.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_with_jitter_and_a_stale_staple_is_dropped() {
    let env = Arc::new(Env::new());
    let valid = Duration::from_secs(600);
    let e = env.clone();
    let canned = Canned::new(move |n| match n {
        0 => Ok(e.response(good, valid, 0)),
        _ => Err(FetchError::Failed("connection refused".into())),
    });
    let (intake, _stapler, metrics) = start(config(Mode::Fetch), Policy::default(), &canned);
    intake.update("web", &env.material(), StdInstant::now()).unwrap();
    advance(Duration::from_secs(1)).await;
    let staple = canned.answer(0);
    assert!(serves_staple(&intake, "web", &staple));

    // Refresh at ~300 s (halfway) fails; retries back off: [5, 10], [10, 20], [20, 40], [40, 80], ...
    advance(Duration::from_secs(302)).await;
    assert!(serves_staple(&intake, "web", &staple), "kept while the responder is down and it is fresh");
    let st = ocsp_state(&intake, "web");
    assert_eq!(st.state, "good");
    assert!(st.last_error.as_deref().unwrap().contains("connection refused"), "{st:?}");
    // Stale at ~600 s: dropped, the certificate served without a staple.
    advance(Duration::from_secs(310)).await;
    assert!(!serves_staple(&intake, "web", &staple), "a stale staple is not served");
    let served = intake.store().get("web").expect("still served");
    assert!(served.placeholder.is_none());
    assert_eq!(ocsp_state(&intake, "web").state, "stale");

    advance(Duration::from_secs(600)).await;
    let calls = canned.calls();
    assert!(calls.len() >= 8, "{}", calls.len());
    let bounds = [(5.0, 10.0), (10.0, 20.0), (20.0, 40.0), (40.0, 80.0), (40.0, 80.0), (40.0, 80.0)];
    let gaps: Vec<f64> = calls[1..].windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
    for (gap, (lo, hi)) in gaps.iter().zip(bounds) {
        assert!(*gap >= lo - 0.01 && *gap <= hi + 0.01, "gap {gap} outside [{lo}, {hi}]: {gaps:?}");
    }
    assert!(gaps.windows(2).any(|w| (w[0] - w[1]).abs() > 0.01), "jittered: {gaps:?}");
    assert_eq!(fetches(&metrics, "error") as usize, calls.len() - 1);
}

#[tokio::test(start_paused = true)]
async fn must_staple_serves_the_certificate_only_with_a_current_staple() {
    let env = Arc::new(Env::new());
    let valid = Duration::from_secs(600);
    let e = env.clone();
    let canned = Canned::new(move |n| match n {
        0 => Ok(e.response(good, valid, 0)),
        _ => Err(FetchError::Timeout(Duration::from_secs(10))),
    });
    let policy = Policy { on_invalid: OnInvalid::ServePlaceholder, on_delete: OnDelete::Keep };
    let (intake, _stapler, metrics) = start(config(Mode::MustStaple), policy, &canned);

    let err = intake.update("web", &env.material(), StdInstant::now()).unwrap_err();
    assert_eq!(err.reason(), "ocsp_staple_required");
    assert!(err.to_string().contains(URL), "{err}");
    assert_eq!(intake.store().get("web").unwrap().placeholder, Some(PlaceholderCause::Invalid));
    advance(Duration::from_secs(1)).await;
    assert!(serves_staple(&intake, "web", &canned.answer(0)), "served once stapled");
    assert!(intake.store().status()[0].last_error.is_none());

    // Responder down past nextUpdate: the certificate is withdrawn, not served bare.
    advance(Duration::from_secs(700)).await;
    let served = intake.store().get("web").unwrap();
    assert_eq!(served.placeholder, Some(PlaceholderCause::Invalid), "on_invalid applies");
    let st = intake.store().status().into_iter().next().unwrap();
    assert!(st.last_error.as_deref().unwrap().contains("OCSP staple required"), "{st:?}");
    assert_eq!(st.ocsp.unwrap().state, "stale");
    let rejected = RejectLabel { source: SOURCE.into(), reason: "ocsp_staple_required" };
    assert!(metrics.updates_rejected.get_or_create(&rejected).get() >= 2);
    assert!(metrics.limits_hit.get_or_create(&LimitLabel { limit: "ocsp_timeout" }).get() >= 1);
}

#[tokio::test(start_paused = true)]
async fn a_revoked_certificate_is_withheld_or_served_bare_as_on_revoked_says() {
    for on_revoked in [OnRevoked::Withhold, OnRevoked::Serve] {
        let env = Arc::new(Env::new());
        let valid = Duration::from_secs(3600);
        let e = env.clone();
        let canned = Canned::new(move |n| match n {
            0 => Ok(e.response(good, valid, 0)),
            n => Ok(e.response(revoked, valid, n)),
        });
        let policy = Policy { on_invalid: OnInvalid::ServePlaceholder, on_delete: OnDelete::Keep };
        let cfg = OcspConfig { on_revoked, ..config(Mode::Fetch) };
        let (intake, _stapler, metrics) = start(cfg, policy, &canned);
        intake.update("web", &env.material(), StdInstant::now()).unwrap();
        advance(Duration::from_secs(1)).await;
        assert!(serves_staple(&intake, "web", &canned.answer(0)));
        advance(Duration::from_secs(1801)).await;
        assert_eq!(canned.calls().len(), 2);
        let st = intake.store().status().into_iter().next().unwrap();
        let ocsp = st.ocsp.clone().unwrap();
        assert_eq!(ocsp.state, "revoked", "{on_revoked:?}");
        assert_eq!(ocsp.revocation_reason.as_deref(), Some("KeyCompromise"));
        assert!(ocsp.revoked_at.is_some());
        assert_eq!(metrics.ocsp_revoked.get(), 1);
        assert_eq!(fetches(&metrics, "revoked"), 1);
        let served = intake.store().get("web").unwrap();
        match on_revoked {
            OnRevoked::Withhold => {
                assert_eq!(served.placeholder, Some(PlaceholderCause::Invalid));
                assert!(st.last_error.as_deref().unwrap().contains("REVOKED"), "{st:?}");
                // The source sending it again does not bring it back.
                let err = intake.update("web", &env.material(), StdInstant::now()).unwrap_err();
                assert_eq!(err.reason(), "ocsp_revoked");
            }
            OnRevoked::Serve => {
                assert!(served.placeholder.is_none());
                assert!(!serves_staple(&intake, "web", &canned.answer(0)), "no staple served");
                assert!(!serves_staple(&intake, "web", &canned.answer(1)), "nor the revoked one");
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_staple_from_the_source_wins_and_off_fetches_nothing() {
    let env = Arc::new(Env::new());
    let e = env.clone();
    let canned = Canned::new(move |n| Ok(e.response(good, Duration::from_secs(3600), n)));
    let mut cfg = config(Mode::Fetch);
    cfg.names.insert("plain".into(), Mode::Off);
    let (intake, stapler, _) = start(cfg, Policy::default(), &canned);
    let own = env.response(good, Duration::from_secs(7200), 99);
    let mut with_own = env.material();
    if let Material::Tls { ocsp_staple, .. } = &mut with_own {
        *ocsp_staple = Some(own.clone());
    }
    intake.update("web", &with_own, StdInstant::now()).unwrap();
    intake.update("plain", &env.material(), StdInstant::now()).unwrap();
    advance(Duration::from_secs(3600)).await;
    assert!(canned.calls().is_empty());
    assert_eq!(stapler.tracked(), 0);
    assert!(serves_staple(&intake, "web", &own));
    assert!(intake.store().status().iter().all(|s| s.ocsp.is_none()));
}

#[tokio::test(start_paused = true)]
async fn a_responder_outside_the_allowed_list_is_never_asked() {
    let env = Env::new();
    let canned = Canned::new(|_| Err(FetchError::Failed("must not be asked".into())));
    let mut cfg = config(Mode::Fetch);
    cfg.responders = vec!["http://ocsp.corp.example/".into()];
    let (intake, stapler, _) = start(cfg.clone(), Policy::default(), &canned);
    intake.update("web", &env.material(), StdInstant::now()).unwrap();
    advance(Duration::from_secs(3600)).await;
    assert!(canned.calls().is_empty(), "no request to {URL}");
    assert_eq!(stapler.tracked(), 0);
    let state = ocsp_state(&intake, "web");
    assert_eq!(state.state, "none");
    assert!(state.last_error.as_deref().is_some_and(|e| e.contains("not in [ocsp] responders")), "{state:?}");
    assert!(intake.store().get("web").is_some(), "fetch: served without a staple");

    // must-staple: not served at all.
    cfg.mode = Mode::MustStaple;
    let (intake, _, _) = start(cfg, Policy::default(), &canned);
    let err = intake.update("web", &env.material(), StdInstant::now()).unwrap_err();
    assert_eq!(err.reason(), "ocsp_staple_required", "{err}");
    assert!(canned.calls().is_empty());
}

#[tokio::test(start_paused = true)]
async fn bounds_on_certificates_responders_and_concurrent_fetches_are_counted() {
    let ca = Authority::new("Bounds CA");
    let ca = Arc::new(ca);
    let mut canned = Canned::new(|_| Err(FetchError::Failed("down".into())));
    canned.delay = Duration::from_secs(5);
    let cfg = OcspConfig { max_certificates: 2, max_concurrent_fetches: 1, ..config(Mode::Fetch) };
    let (intake, stapler, metrics) = start(cfg, Policy::default(), &canned);
    for name in ["a", "b", "c"] {
        intake.update(name, &material(&ca.leaf(&format!("{name}.example.com"), Some(URL))), StdInstant::now()).unwrap();
    }
    assert_eq!(stapler.tracked(), 2);
    let hit = |limit| metrics.limits_hit.get_or_create(&LimitLabel { limit }).get();
    assert_eq!(hit("ocsp_max_certificates"), 1);
    let st = ocsp_state(&intake, "c");
    assert_eq!(st.state, "none");
    assert!(st.last_error.as_deref().unwrap().contains("max_certificates (2)"), "{st:?}");
    advance(Duration::from_secs(1)).await;
    assert_eq!(canned.calls().len(), 1, "one fetch at a time");
    assert!(hit("ocsp_max_concurrent_fetches") >= 1);
    advance(Duration::from_secs(5)).await;
    assert_eq!(canned.calls().len(), 2);

    // Distinct responders.
    let canned = Canned::new(|_| Err(FetchError::Failed("down".into())));
    let cfg = OcspConfig { max_responders: 1, ..config(Mode::Fetch) };
    let (intake, stapler, metrics) = start(cfg, Policy::default(), &canned);
    intake.update("a", &material(&ca.leaf("a.example.com", Some(URL))), StdInstant::now()).unwrap();
    intake.update("b", &material(&ca.leaf("b.example.com", Some("http://127.0.0.2/ocsp"))), StdInstant::now()).unwrap();
    assert_eq!(stapler.tracked(), 1);
    assert_eq!(metrics.limits_hit.get_or_create(&LimitLabel { limit: "ocsp_max_responders" }).get(), 1);
    assert!(ocsp_state(&intake, "b").last_error.unwrap().contains("127.0.0.2"));
}

/// Whether the served resource of `name` holds `chain_pem` (the certificate chain).
fn serves_chain(intake: &Intake, name: &str, chain_pem: &str) -> bool {
    let chain = chain_pem.as_bytes();
    intake
        .store()
        .get(name)
        .is_some_and(|s| s.placeholder.is_none() && s.resource.windows(chain.len()).any(|w| w == chain))
}

#[tokio::test(start_paused = true)]
async fn a_retired_tracker_never_resubmits_nor_withdraws_over_a_newer_certificate() {
    // The old certificate's tracker gets an answer (good, or revoked under withhold, which
    // withdraws) and decides to resubmit; the source's newer certificate arrives just
    // before the resubmission runs (the test hook).
    for old_revoked in [false, true] {
        let env = Arc::new(Env::new());
        let newer = env.ca.leaf("web.example.com", Some(URL));
        let e = env.clone();
        let valid = Duration::from_secs(3600);
        let canned = Canned::new(move |n| match n {
            0 if old_revoked => Ok(e.response(revoked, valid, 0)),
            0 => Ok(e.response(good, valid, 0)),
            _ => Err(FetchError::Failed("down".into())),
        });
        let policy = Policy { on_invalid: OnInvalid::ServePlaceholder, on_delete: OnDelete::Keep };
        let (intake, stapler, metrics) = start(config(Mode::Fetch), policy, &canned);
        intake.update("web", &env.material(), StdInstant::now()).unwrap();
        let (source, newer_material) = (intake.clone(), material(&newer));
        *stapler.inner.before_resubmit.lock().unwrap() = Some(Box::new(move || {
            source.update("web", &newer_material, StdInstant::now()).unwrap();
        }));
        advance(Duration::from_secs(1)).await;
        assert!(stapler.inner.before_resubmit.lock().unwrap().is_none(), "the hook ran");

        assert!(serves_chain(&intake, "web", &newer.chain_pem), "the newer certificate stays served ({old_revoked})");
        assert!(!serves_chain(&intake, "web", &env.leaf.chain_pem), "the old one is not stored over it");
        assert_eq!(stapler.tracked(), 1);
        let current = stapler.inner.tracked.lock().unwrap().values().next().and_then(|s| s.current.clone()).unwrap();
        assert_eq!(current.target.leaf_der, newer.der, "the newer certificate's tracker is kept");
        assert!(current.task.lock().unwrap().is_some(), "and runs");
        assert_eq!(metrics.ocsp_revoked.get(), 0, "no served certificate is revoked");
        advance(Duration::from_secs(30)).await;
        assert!(canned.calls().len() >= 2, "the newer certificate is asked about");
        assert!(serves_chain(&intake, "web", &newer.chain_pem));
    }
}

#[tokio::test(start_paused = true)]
async fn an_older_answer_is_ignored_and_revocation_is_final() {
    let env = Arc::new(Env::new());
    let valid = Duration::from_secs(3600);
    let e = env.clone();
    let canned = Canned::new(move |n| match n {
        0 => Ok(e.dated(good, -60, valid)),
        // A stale cache: good, and older than what is held.
        1 => Ok(e.dated(good, -600, valid)),
        2 => Ok(e.dated(revoked, 1000, valid)),
        // A responder path or cache that says good again, newer.
        _ => Ok(e.dated(good, 2000, valid + Duration::from_secs(3600))),
    });
    let e2 = env.clone();
    let policy = Policy { on_invalid: OnInvalid::ServePlaceholder, on_delete: OnDelete::Keep };
    let (intake, stapler, metrics) = start(config(Mode::Fetch), policy, &canned);
    intake.update("web", &env.material(), StdInstant::now()).unwrap();
    advance(Duration::from_secs(1)).await;
    let first = canned.answer(0);
    assert!(serves_staple(&intake, "web", &first));

    // The refresh at ~1800 s gets the older answer: ignored, the held one kept, retried.
    advance(Duration::from_secs(1801)).await;
    assert_eq!(canned.calls().len(), 2);
    assert!(serves_staple(&intake, "web", &first), "the held (newer) staple stays");
    assert!(!serves_staple(&intake, "web", &canned.answer(1)));
    assert_eq!(fetches(&metrics, "outdated"), 1);
    let st = ocsp_state(&intake, "web");
    assert_eq!(st.state, "good");
    assert!(st.last_error.as_deref().is_some_and(|e| e.contains("older than the one held")), "{st:?}");

    // The retry says revoked: withheld, and nothing more is asked.
    advance(Duration::from_secs(11)).await;
    assert_eq!(canned.calls().len(), 3);
    assert_eq!(ocsp_state(&intake, "web").state, "revoked");
    assert_eq!(intake.store().get("web").unwrap().placeholder, Some(PlaceholderCause::Invalid));
    advance(Duration::from_secs(4 * 3600)).await;
    assert_eq!(canned.calls().len(), 3, "revocation is final: no request that could say good again");

    // Its tracker, handed a newer good answer (a plain-http path, a cache), ignores it.
    let t = stapler.inner.tracked.lock().unwrap().values().find_map(|s| s.current.clone()).unwrap();
    let good_again = e2.dated(good, 3000, valid + Duration::from_secs(10 * 3600));
    let answer = ocsp::verify(&good_again, &t.target, stapler.inner.clock.now()).unwrap();
    let mut schedule = Schedule::new(&config(Mode::Fetch));
    let applied = stapler.inner.apply(&t, good_again, &answer, stapler.inner.clock.now(), &mut schedule);
    assert!(matches!(applied, Applied::Ignored { .. }));
    assert!(t.state.lock().unwrap().revoked());
    assert_eq!(ocsp_state(&intake, "web").state, "revoked");

    // Removed and sent again (a new tracker): still revoked, refused, nothing asked.
    intake.remove("web");
    assert_eq!(metrics.ocsp_revoked.get(), 0);
    let err = intake.update("web", &env.material(), StdInstant::now()).unwrap_err();
    assert_eq!(err.reason(), "ocsp_revoked", "{err}");
    advance(Duration::from_secs(3600)).await;
    assert_eq!(canned.calls().len(), 3);
    assert!(intake.store().get("web").is_none_or(|s| s.placeholder.is_some()));
}

#[tokio::test(start_paused = true)]
async fn a_refused_update_leaves_the_served_certificate_refreshed_and_dropped_at_next_update() {
    for mode in [Mode::Fetch, Mode::MustStaple] {
        let env = Arc::new(Env::new());
        let valid = Duration::from_secs(600);
        let e = env.clone();
        let canned = Canned::new(move |n| match n {
            0 | 1 => Ok(e.response(good, valid, n)),
            _ => Err(FetchError::Failed("down".into())),
        });
        let policy = Policy { on_invalid: OnInvalid::ServePlaceholder, on_delete: OnDelete::Keep };
        let (intake, _stapler, _) = start(config(mode), policy, &canned);
        let _ = intake.update("web", &env.material(), StdInstant::now());
        advance(Duration::from_secs(1)).await;
        assert!(serves_staple(&intake, "web", &canned.answer(0)), "{mode:?}");

        // The source sends a certificate the store refuses: one with another key (fetch),
        // one without an OCSP URL (must-staple).
        let refused = match mode {
            Mode::MustStaple => material(&env.ca.leaf("web.example.com", None)),
            _ => match (material(&env.ca.leaf("web.example.com", Some(URL))), env.material()) {
                (Material::Tls { cert_chain_pem, .. }, Material::Tls { key_pem, .. }) => {
                    Material::Tls { cert_chain_pem, key_pem, ocsp_staple: None }
                }
                _ => unreachable!(),
            },
        };
        intake.update("web", &refused, StdInstant::now()).unwrap_err();
        assert!(serves_staple(&intake, "web", &canned.answer(0)), "{mode:?}: the served version stays");

        // The served certificate is still refreshed halfway (~300 s)...
        advance(Duration::from_secs(301)).await;
        assert_eq!(canned.calls().len(), 2, "{mode:?}");
        assert!(serves_staple(&intake, "web", &canned.answer(1)), "{mode:?}: refreshed");
        // ...and its staple dropped at nextUpdate (~601 s) when the responder is down.
        advance(Duration::from_secs(310)).await;
        assert!(!serves_staple(&intake, "web", &canned.answer(1)), "{mode:?}: not served past nextUpdate");
        assert_eq!(ocsp_state(&intake, "web").state, "stale", "{mode:?}");
        let placeholder = intake.store().get("web").unwrap().placeholder;
        match mode {
            Mode::MustStaple => assert_eq!(placeholder, Some(PlaceholderCause::Invalid), "withdrawn"),
            _ => assert!(placeholder.is_none(), "served bare"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn responders_are_counted_by_scheme_host_and_port() {
    let ca = Authority::new("Responders CA");
    let canned = Canned::new(|_| Err(FetchError::Failed("down".into())));
    let cfg = OcspConfig { max_responders: 1, ..config(Mode::Fetch) };
    let (intake, stapler, metrics) = start(cfg, Policy::default(), &canned);
    let leaf = |name: &str, url: &str| material(&ca.leaf(&format!("{name}.example.com"), Some(url)));
    intake.update("a", &leaf("a", URL), StdInstant::now()).unwrap();
    // Path variants of one responder: one responder.
    for (name, url) in [("b", "http://127.0.0.1:9/other"), ("c", "http://127.0.0.1:9/ocsp/c?x=1")] {
        intake.update(name, &leaf(name, url), StdInstant::now()).unwrap();
    }
    assert_eq!(stapler.tracked(), 3);
    // Another port is another responder.
    intake.update("d", &leaf("d", "http://127.0.0.1:10/ocsp"), StdInstant::now()).unwrap();
    assert_eq!(stapler.tracked(), 3);
    assert_eq!(metrics.limits_hit.get_or_create(&LimitLabel { limit: "ocsp_max_responders" }).get(), 1);
    assert_eq!(responder_of("http://Ocsp.Example:80/x"), responder_of("http://ocsp.example/y"));
    assert_ne!(responder_of("http://ocsp.example/"), responder_of("https://ocsp.example/"));
}

#[tokio::test(start_paused = true)]
async fn must_staple_refusals_carry_no_fetch_error() {
    // What a tenant would scan with: a responder URL pointing at an internal service.
    let env = Env::new();
    let canned = Canned::new(|_| Err(FetchError::Failed("connecting to 10.1.2.3:5432: Connection refused".into())));
    let (intake, _, _) = start(config(Mode::MustStaple), Policy::default(), &canned);
    intake.update("web", &env.material(), StdInstant::now()).unwrap_err();
    advance(Duration::from_secs(1)).await;
    assert_eq!(canned.calls().len(), 1);
    let err = intake.update("web", &env.material(), StdInstant::now()).unwrap_err();
    assert_eq!(err.reason(), "ocsp_staple_required");
    let text = err.to_string();
    assert!(!text.contains("Connection refused") && !text.contains("10.1.2.3"), "{text}");
    let st = intake.store().status().into_iter().next().unwrap();
    assert!(st.last_error.as_deref().is_some_and(|e| !e.contains("Connection refused")), "{st:?}");
    // Operators still see it.
    let ocsp = st.ocsp.unwrap();
    assert!(ocsp.last_error.as_deref().is_some_and(|e| e.contains("Connection refused")), "{ocsp:?}");
}

#[tokio::test(start_paused = true)]
async fn must_staple_serves_a_new_certificate_once_stapled_and_the_old_one_meanwhile() {
    const URL_B: &str = "http://127.0.0.1:9/b";
    const URL_C: &str = "http://127.0.0.1:9/c";
    let env = Arc::new(Env::new());
    let b = env.ca.leaf("web.example.com", Some(URL_B));
    let c = Arc::new(env.ca.leaf("web.example.com", Some(URL_C)));
    let (e, c2) = (env.clone(), c.clone());
    let canned = Canned::by_url(move |url, n| match url {
        URL => Ok(e.response(good, Duration::from_secs(3600), n)),
        URL_C => {
            let mut single = good(cert_id(&c2.der, &e.ca.der, &SHA1));
            single.this_update = at(e.t0 - Duration::from_secs(60));
            single.next_update = Some(at(e.t0 + Duration::from_secs(3600)));
            Ok(signed(&e.ca, vec![single], &[]))
        }
        _ => Err(FetchError::Failed("down".into())),
    });
    let policy = Policy { on_invalid: OnInvalid::ServePlaceholder, on_delete: OnDelete::Keep };
    let (intake, stapler, _) = start(config(Mode::MustStaple), policy, &canned);
    intake.update("web", &env.material(), StdInstant::now()).unwrap_err();
    advance(Duration::from_secs(1)).await;
    assert!(serves_chain(&intake, "web", &env.leaf.chain_pem));

    // B waits for a staple that never comes; the source goes back to A: B is abandoned.
    intake.update("web", &material(&b), StdInstant::now()).unwrap_err();
    assert_eq!(stapler.tracked(), 2, "A's tracker and B's waiting one");
    advance(Duration::from_secs(1)).await;
    assert_eq!(canned.calls_to(URL_B), 1);
    assert_eq!(ocsp_state(&intake, "web").responder.as_deref(), Some(URL), "status is the served certificate's");
    intake.update("web", &env.material(), StdInstant::now()).unwrap();
    assert_eq!(stapler.tracked(), 1);
    advance(Duration::from_secs(600)).await;
    assert_eq!(canned.calls_to(URL_B), 1, "B is no longer asked about");
    assert!(serves_chain(&intake, "web", &env.leaf.chain_pem), "A stays");

    // C gets its staple: served, and A's tracker retired.
    intake.update("web", &material(&c), StdInstant::now()).unwrap_err();
    assert!(serves_chain(&intake, "web", &env.leaf.chain_pem), "A until C is stapled");
    advance(Duration::from_secs(1)).await;
    assert!(serves_chain(&intake, "web", &c.chain_pem), "C once stapled");
    assert_eq!(stapler.tracked(), 1);
    let a_calls = canned.calls_to(URL);
    advance(Duration::from_secs(4 * 3600)).await;
    assert_eq!(canned.calls_to(URL), a_calls, "A's tracker is retired");
    assert!(canned.calls_to(URL_C) >= 2, "C's is refreshed");
    assert_eq!(ocsp_state(&intake, "web").responder.as_deref(), Some(URL_C));
}
