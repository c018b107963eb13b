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

type Respond = dyn Fn(usize) -> Result<Vec<u8>, FetchError> + Send + Sync;

/// A responder that answers request number n with `respond(n)`, after `delay`, and
/// records when it was asked.
#[derive(Clone)]
struct Canned {
    calls: Arc<Mutex<Vec<Instant>>>,
    /// What it answered, by request number (ECDSA signatures differ each time).
    answered: Arc<Mutex<Vec<Option<Vec<u8>>>>>,
    respond: Arc<Respond>,
    delay: Duration,
}

impl Canned {
    fn new(respond: impl Fn(usize) -> Result<Vec<u8>, FetchError> + Send + Sync + 'static) -> Self {
        Self { calls: Arc::default(), answered: Arc::default(), respond: Arc::new(respond), delay: Duration::ZERO }
    }

    fn calls(&self) -> Vec<Instant> {
        self.calls.lock().unwrap().clone()
    }

    fn answer(&self, n: usize) -> Vec<u8> {
        self.answered.lock().unwrap()[n].clone().expect("a response")
    }
}

impl Fetch for Canned {
    fn fetch(&self, url: &str, _request: Vec<u8>) -> FetchFuture {
        assert_eq!(url, URL);
        let n = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Instant::now());
            calls.len() - 1
        };
        let (respond, delay, answered) = (self.respond.clone(), self.delay, self.answered.clone());
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            let answer = respond(n);
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
