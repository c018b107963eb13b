//! OCSP stapling fetched by certwire: for every served TLS certificate whose issuer is
//! known and whose AIA names a responder, certwire asks the responder (RFC 6960 over
//! HTTP POST), verifies the answer (src/pki/ocsp.rs: signature by the issuer or its
//! delegated responder, CertID, status, thisUpdate/nextUpdate) and serves it as the
//! certificate's `ocsp_staple`, refreshed halfway to nextUpdate.
//!
//! It hooks into [`Intake`]: an update of TLS material without a staple of its own
//! asks [`Stapler::prepare`], which registers the certificate (one tracked entry per
//! source and first name, each with a task that fetches and sleeps) and attaches the
//! current verified staple. When a task gets a new response, or drops one that went
//! stale, it submits the registered material again through the same `Intake`: the
//! ordinary path checks it and the store pushes the new version to every proxy. A
//! source that supplies its own staple (`tls.ocsp-staple`) wins: nothing is fetched.
//!
//! A `revoked` answer is logged as an error, shown in status and counted; `on_revoked`
//! decides whether the certificate keeps being served (without a staple) or is
//! withdrawn and treated like an invalid secret (`on_invalid`).

pub mod config;
pub mod fetch;
mod schedule;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant as StdInstant};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;
use tokio::time::Instant;

pub use config::{Mode, OcspConfig, OnRevoked};
use fetch::Fetch;
use schedule::{Schedule, jitter};

use crate::ingest::Intake;
use crate::metrics::{LimitLabel, Metrics, OcspResultLabel, SecretLabel};
use crate::pki::ocsp::{self, OcspAnswer, OcspCertStatus, OcspTarget};
use crate::pki::{Material, PkiError};
use crate::unix_time;

/// What `/status/secrets` shows about OCSP for a secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OcspStatus {
    /// `fetch` or `must-staple`.
    pub mode: &'static str,
    /// `good` (a verified staple is served), `revoked`, `stale` (the last one expired
    /// and was dropped) or `none` (nothing yet, or the certificate cannot be asked about).
    pub state: &'static str,
    pub responder: Option<String>,
    pub this_update: Option<String>,
    pub next_update: Option<String>,
    pub revoked_at: Option<String>,
    pub revocation_reason: Option<String>,
    pub next_refresh: Option<String>,
    pub last_error: Option<String>,
}

/// What [`Stapler::prepare`] makes of an update.
pub enum Prepared {
    /// Check and store the material as the source gave it.
    AsIs,
    /// The material with the current verified staple attached.
    Stapled(Material),
    /// Refuse the update: `must-staple` without a staple yet, or a revoked certificate
    /// under `on_revoked = "withhold"`.
    Refuse(PkiError),
}

/// The stapler; cheap to clone, one per process.
#[derive(Clone)]
pub struct Stapler {
    inner: Arc<Inner>,
}

type Key = (Arc<str>, Arc<str>);

struct Inner {
    cfg: OcspConfig,
    metrics: Arc<Metrics>,
    fetcher: Arc<dyn Fetch>,
    permits: Semaphore,
    clock: Clock,
    tracked: Mutex<HashMap<Key, Arc<Tracked>>>,
    /// Told of every newly revoked certificate, with the names it is served under: the
    /// Kubernetes source posts an Event on the Secret ([`Stapler::on_revoked`]).
    revocation_sinks: Mutex<Vec<Arc<dyn RevocationSink>>>,
}

/// Something told loudly when a served certificate is found revoked.
pub trait RevocationSink: Send + Sync {
    /// `names`: every name the certificate is served under; `message` names the serial,
    /// the responder and the revocation time and reason (never key material).
    fn revoked(&self, names: &[Arc<str>], message: &str);
}

/// One certificate being kept stapled.
struct Tracked {
    target: OcspTarget,
    mode: Mode,
    intake: Intake,
    state: Mutex<State>,
    task: Mutex<Option<AbortHandle>>,
}

struct State {
    names: Vec<Arc<str>>,
    /// What the source gave, key included (as `KeyBytes`, zeroized on drop), to submit
    /// again when the staple changes.
    material: Material,
    /// The last verified response: good and not stale, or revoked.
    staple: Option<(Vec<u8>, OcspAnswer)>,
    stale: bool,
    last_error: Option<String>,
    next_refresh: Option<i64>,
}

/// Wall-clock seconds read through tokio's clock, so that the refresh loop runs under
/// `tokio::time::pause` in tests; in production the two advance together.
#[derive(Clone, Copy)]
struct Clock {
    wall0: i64,
    mono0: Instant,
}

impl Clock {
    fn new() -> Self {
        Self { wall0: unix_time::secs(std::time::SystemTime::now()), mono0: Instant::now() }
    }

    fn now(&self) -> i64 {
        self.wall0 + i64::try_from(self.mono0.elapsed().as_secs()).unwrap_or(i64::MAX / 2)
    }

    fn instant_at(&self, unix: i64) -> Instant {
        self.mono0 + Duration::from_secs(u64::try_from(unix.saturating_sub(self.wall0)).unwrap_or(0))
    }
}

impl Stapler {
    pub fn new(cfg: OcspConfig, metrics: Arc<Metrics>) -> Self {
        tracing::info!(
            mode = cfg.mode.as_str(),
            sources = cfg.sources.len(),
            names = cfg.names.len(),
            on_revoked = ?cfg.on_revoked,
            "OCSP stapling on: certwire fetches staples from the responders its certificates name"
        );
        let http = fetch::Http::new(cfg.timeout, cfg.max_response_bytes);
        Self::with_fetcher(cfg, metrics, Arc::new(http))
    }

    pub fn with_fetcher(cfg: OcspConfig, metrics: Arc<Metrics>, fetcher: Arc<dyn Fetch>) -> Self {
        let permits = Semaphore::new(cfg.max_concurrent_fetches);
        let inner = Inner {
            cfg,
            metrics,
            fetcher,
            permits,
            clock: Clock::new(),
            tracked: Mutex::default(),
            revocation_sinks: Mutex::default(),
        };
        Self { inner: Arc::new(inner) }
    }

    /// Adds `sink`, told of each certificate found revoked from now on.
    pub fn on_revoked(&self, sink: Arc<dyn RevocationSink>) {
        self.inner.revocation_sinks.lock().expect("ocsp sinks lock").push(sink);
    }

    /// Called by [`Intake`] before the check of every update: see [`Prepared`].
    pub fn prepare<N: AsRef<str>>(&self, intake: &Intake, names: &[N], material: &Material) -> Prepared {
        let inner = &self.inner;
        let Material::Tls { cert_chain_pem, ocsp_staple, .. } = material else { return Prepared::AsIs };
        let Some(first) = names.first() else { return Prepared::AsIs };
        let key: Key = (Arc::from(intake.source()), Arc::from(first.as_ref()));
        let mode = inner.cfg.mode_for(intake.source(), names);
        if mode == Mode::Off || ocsp_staple.is_some() {
            // The source's own staple wins; it is checked like any update.
            inner.forget_key(&key, intake);
            for name in names {
                intake.store().set_ocsp(name.as_ref(), None);
            }
            return Prepared::AsIs;
        }
        let names: Vec<Arc<str>> = names.iter().map(|n| Arc::from(n.as_ref())).collect();
        let target = match ocsp::target(cert_chain_pem, &[]) {
            Ok(target) if !inner.cfg.responder_allowed(&target.url) => {
                let why = format!(
                    "the certificate's OCSP responder {} is not in [ocsp] responders: nothing is sent there",
                    target.url
                );
                inner.forget_key(&key, intake);
                inner.publish_untracked(intake, &names, mode, Some(target.url.clone()), &why);
                return refuse_unless_fetch(mode, &why);
            }
            Ok(target) => target,
            Err(why) => {
                inner.forget_key(&key, intake);
                inner.publish_untracked(intake, &names, mode, None, &why);
                return refuse_unless_fetch(mode, &why);
            }
        };
        let tracked = match inner.track(&key, target, mode, intake, &names, material) {
            Ok(tracked) => tracked,
            Err((limit, why)) => {
                inner.metrics.limits_hit.get_or_create(&LimitLabel { limit }).inc();
                tracing::warn!(secret = %key.1, source = %key.0, limit, error = %why, "OCSP: certificate not tracked");
                inner.publish_untracked(intake, &names, mode, None, &why);
                return refuse_unless_fetch(mode, &why);
            }
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            self.start(&tracked);
        }
        let now = inner.clock.now();
        let state = tracked.state.lock().expect("ocsp state lock");
        let with = |der: &[u8]| match material {
            Material::Tls { cert_chain_pem, key_pem, .. } => Material::Tls {
                cert_chain_pem: cert_chain_pem.clone(),
                key_pem: key_pem.clone(),
                ocsp_staple: Some(der.to_vec()),
            },
            other => other.clone(),
        };
        match &state.staple {
            Some((der, answer)) if answer.status == OcspCertStatus::Good && now < answer.next_update => {
                Prepared::Stapled(with(der))
            }
            Some((_, answer)) if answer.status != OcspCertStatus::Good => {
                if withholds_revoked(inner.cfg.on_revoked, mode) {
                    let why = match inner.cfg.on_revoked {
                        OnRevoked::Withhold => "on_revoked = \"withhold\"",
                        OnRevoked::Serve => "must-staple cannot serve it without a staple",
                    };
                    Prepared::Refuse(PkiError::OcspRevoked(format!(
                        "{}; withheld ({why})",
                        revoked_message(&tracked.target, answer)
                    )))
                } else {
                    Prepared::AsIs
                }
            }
            _ if mode == Mode::MustStaple => Prepared::Refuse(PkiError::OcspStapleRequired(format!(
                "no current verified OCSP response yet for serial {} from {}{}; with must-staple the certificate is \
                 served once one is",
                tracked.target.serial_hex,
                tracked.target.url,
                state.last_error.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
            ))),
            _ => Prepared::AsIs,
        }
    }

    /// The source no longer has `name`: stop tracking what it was served with.
    pub fn forget(&self, intake: &Intake, name: &str) {
        let keys: Vec<Key> = {
            let tracked = self.inner.tracked.lock().expect("ocsp lock");
            tracked
                .iter()
                .filter(|((source, _), t)| {
                    **source == *intake.source()
                        && t.state.lock().expect("ocsp state lock").names.iter().any(|n| **n == *name)
                })
                .map(|(k, _)| k.clone())
                .collect()
        };
        for key in &keys {
            self.inner.forget_key(key, intake);
        }
        intake.store().set_ocsp(name, None);
    }

    /// Certificates tracked now.
    pub fn tracked(&self) -> usize {
        self.inner.tracked.lock().expect("ocsp lock").len()
    }

    fn start(&self, tracked: &Arc<Tracked>) {
        let mut task = tracked.task.lock().expect("ocsp task lock");
        if task.is_none() {
            let handle = tokio::spawn(run(Arc::downgrade(&self.inner), tracked.clone()));
            *task = Some(handle.abort_handle());
        }
    }
}

/// Whether a revoked certificate stops being served: `on_revoked = "withhold"`, or
/// `must-staple`, which cannot serve it bare (Envoy's MUST_STAPLE would refuse it).
fn withholds_revoked(on_revoked: OnRevoked, mode: Mode) -> bool {
    on_revoked == OnRevoked::Withhold || mode == Mode::MustStaple
}

fn refuse_unless_fetch(mode: Mode, why: &str) -> Prepared {
    match mode {
        Mode::MustStaple => Prepared::Refuse(PkiError::OcspStapleRequired(format!(
            "{why}; with must-staple a certificate without a staple is not served"
        ))),
        _ => Prepared::AsIs,
    }
}

fn revoked_message(target: &OcspTarget, answer: &OcspAnswer) -> String {
    let OcspCertStatus::Revoked { at, reason } = &answer.status else { return String::new() };
    format!(
        "the certificate (serial {}) is REVOKED: the responder {} says it was revoked at {}{}",
        target.serial_hex,
        target.url,
        unix_time::rfc3339(*at),
        reason.as_deref().map(|r| format!(", reason {r}")).unwrap_or_default()
    )
}

impl Inner {
    /// The entry for `key`, made (within the bounds) or updated with the latest names
    /// and material; a new certificate under the same key replaces the entry.
    fn track(
        &self,
        key: &Key,
        target: OcspTarget,
        mode: Mode,
        intake: &Intake,
        names: &[Arc<str>],
        material: &Material,
    ) -> Result<Arc<Tracked>, (&'static str, String)> {
        let mut tracked = self.tracked.lock().expect("ocsp lock");
        if let Some(t) = tracked.get(key)
            && t.target == target
            && t.mode == mode
        {
            let mut state = t.state.lock().expect("ocsp state lock");
            state.names = names.to_vec();
            state.material = material.clone();
            return Ok(t.clone());
        }
        if let Some(old) = tracked.remove(key) {
            self.retire(key, &old);
        }
        if tracked.len() >= self.cfg.max_certificates {
            return Err((
                "ocsp_max_certificates",
                format!("certwire already tracks max_certificates ({}) certificates", self.cfg.max_certificates),
            ));
        }
        if !tracked.values().any(|t| t.target.url == target.url) {
            let mut urls: Vec<&str> = tracked.values().map(|t| t.target.url.as_str()).collect();
            urls.sort_unstable();
            urls.dedup();
            if urls.len() >= self.cfg.max_responders {
                return Err((
                    "ocsp_max_responders",
                    format!(
                        "certwire already asks max_responders ({}) distinct responders; {} is not asked",
                        self.cfg.max_responders, target.url
                    ),
                ));
            }
        }
        let t = Arc::new(Tracked {
            target,
            mode,
            intake: intake.clone(),
            state: Mutex::new(State {
                names: names.to_vec(),
                material: material.clone(),
                staple: None,
                stale: false,
                last_error: None,
                next_refresh: None,
            }),
            task: Mutex::new(None),
        });
        tracked.insert(key.clone(), t.clone());
        drop(tracked);
        self.publish(&t);
        Ok(t)
    }

    fn forget_key(&self, key: &Key, intake: &Intake) {
        let removed = self.tracked.lock().expect("ocsp lock").remove(key);
        if let Some(old) = removed {
            self.retire(key, &old);
            for name in &old.state.lock().expect("ocsp state lock").names {
                intake.store().set_ocsp(name, None);
            }
        }
    }

    /// Stops an entry's task and takes its metrics away.
    fn retire(&self, key: &Key, old: &Tracked) {
        if let Some(task) = old.task.lock().expect("ocsp task lock").take() {
            task.abort();
        }
        let state = old.state.lock().expect("ocsp state lock");
        if state.staple.as_ref().is_some_and(|(_, a)| a.status != OcspCertStatus::Good) {
            self.metrics.ocsp_revoked.dec();
        }
        let label = SecretLabel { secret: key.1.clone() };
        self.metrics.ocsp_this_update.remove(&label);
        self.metrics.ocsp_next_update.remove(&label);
        self.metrics.ocsp_next_refresh.remove(&label);
    }

    /// Status of a secret whose certificate is not tracked (no responder, no issuer,
    /// a bound reached).
    fn publish_untracked(&self, intake: &Intake, names: &[Arc<str>], mode: Mode, responder: Option<String>, why: &str) {
        let status = OcspStatus {
            mode: mode.as_str(),
            state: "none",
            responder,
            this_update: None,
            next_update: None,
            revoked_at: None,
            revocation_reason: None,
            next_refresh: None,
            last_error: Some(why.to_owned()),
        };
        for name in names {
            intake.store().set_ocsp(name, Some(status.clone()));
        }
    }

    /// Status and gauges of a tracked entry, from its state.
    fn publish(&self, t: &Tracked) {
        let state = t.state.lock().expect("ocsp state lock");
        let (this_update, next_update) = state.staple.as_ref().map(|(_, a)| (a.this_update, a.next_update)).unzip();
        let (revoked_at, revocation_reason) = match state.staple.as_ref().map(|(_, a)| &a.status) {
            Some(OcspCertStatus::Revoked { at, reason }) => (Some(unix_time::rfc3339(*at)), reason.clone()),
            _ => (None, None),
        };
        let status = OcspStatus {
            mode: t.mode.as_str(),
            state: match (&state.staple, state.stale) {
                (Some((_, a)), _) if a.status == OcspCertStatus::Good => "good",
                (Some(_), _) => "revoked",
                (None, true) => "stale",
                (None, false) => "none",
            },
            responder: Some(t.target.url.clone()),
            this_update: this_update.map(unix_time::rfc3339),
            next_update: next_update.map(unix_time::rfc3339),
            revoked_at,
            revocation_reason,
            next_refresh: state.next_refresh.map(unix_time::rfc3339),
            last_error: state.last_error.clone(),
        };
        for name in &state.names {
            t.intake.store().set_ocsp(name, Some(status.clone()));
        }
        if let Some(first) = state.names.first() {
            let label = SecretLabel { secret: first.clone() };
            type Family = prometheus_client::metrics::family::Family<SecretLabel, Gauge<f64, AtomicU64>>;
            let set = |family: &Family, v: Option<i64>| match v {
                Some(v) => {
                    family.get_or_create(&label).set(v as f64);
                }
                None => {
                    family.remove(&label);
                }
            };
            set(&self.metrics.ocsp_this_update, this_update);
            set(&self.metrics.ocsp_next_update, next_update);
            set(&self.metrics.ocsp_next_refresh, state.next_refresh);
        }
    }

    /// One request to the responder, within the concurrency bound, and its verification.
    async fn fetch_verified(&self, target: &OcspTarget, request: &[u8]) -> Result<(Vec<u8>, OcspAnswer), String> {
        let permit = match self.permits.try_acquire() {
            Ok(permit) => permit,
            Err(_) => {
                self.metrics.limits_hit.get_or_create(&LimitLabel { limit: "ocsp_max_concurrent_fetches" }).inc();
                self.permits.acquire().await.map_err(|e| e.to_string())?
            }
        };
        let fetched = self.fetcher.fetch(&target.url, request.to_vec()).await;
        drop(permit);
        let count = |result: &'static str| self.metrics.ocsp_fetches.get_or_create(&OcspResultLabel { result }).inc();
        let der = fetched.map_err(|e| {
            if let Some(limit) = e.limit() {
                self.metrics.limits_hit.get_or_create(&LimitLabel { limit }).inc();
            }
            count(e.result());
            format!("fetching from {}: {e}", target.url)
        })?;
        match ocsp::verify(&der, target, self.clock.now()) {
            Ok(answer) => {
                count(if answer.status == OcspCertStatus::Good { "good" } else { "revoked" });
                Ok((der, answer))
            }
            Err(e) => {
                count("invalid");
                Err(format!("the response of {} is refused: {e}", target.url))
            }
        }
    }
}

/// Submits the entry's material again; the hook attaches what the state says.
fn resubmit(t: &Tracked, withdraw: bool) {
    let (names, material) = {
        let state = t.state.lock().expect("ocsp state lock");
        (state.names.clone(), state.material.clone())
    };
    if withdraw {
        t.intake.withdraw(&names);
    }
    // A refusal is logged, counted and recorded by the intake like any update's.
    let _ = t.intake.update_aliases(&names, &material, StdInstant::now());
}

/// The refresh loop of one certificate: fetch, apply, sleep until halfway to
/// nextUpdate (or the retry), dropping the staple if it goes stale meanwhile.
async fn run(inner: std::sync::Weak<Inner>, t: Arc<Tracked>) {
    let Some(cfg) = inner.upgrade().map(|i| i.cfg.clone()) else { return };
    let mut schedule = Schedule::new(&cfg);
    let request = match ocsp::request_der(&t.target) {
        Ok(request) => request,
        Err(e) => {
            t.state.lock().expect("ocsp state lock").last_error = Some(e);
            if let Some(inner) = inner.upgrade() {
                inner.publish(&t);
            }
            return;
        }
    };
    loop {
        let Some(this) = inner.upgrade() else { return };
        let result = this.fetch_verified(&t.target, &request).await;
        let now = this.clock.now();
        let secret = t.state.lock().expect("ocsp state lock").names.first().cloned().unwrap_or_else(|| Arc::from(""));
        let wait = match result {
            Ok((der, answer)) => {
                let wait = schedule.after_success(now, answer.next_update);
                let (changed, newly_revoked) = {
                    let mut state = t.state.lock().expect("ocsp state lock");
                    let was_revoked = state.staple.as_ref().is_some_and(|(_, a)| a.status != OcspCertStatus::Good);
                    let revoked = answer.status != OcspCertStatus::Good;
                    let changed = state.staple.as_ref().map(|(d, _)| d) != Some(&der);
                    if was_revoked && !revoked {
                        this.metrics.ocsp_revoked.dec();
                    }
                    state.staple = Some((der, answer.clone()));
                    state.stale = false;
                    state.last_error = None;
                    state.next_refresh = Some(now + wait.as_secs() as i64);
                    (changed, revoked && !was_revoked)
                };
                if newly_revoked {
                    this.metrics.ocsp_revoked.inc();
                    tracing::error!(
                        secret = %secret,
                        source = %t.intake.source(),
                        serial = %t.target.serial_hex,
                        responder = %t.target.url,
                        error = %revoked_message(&t.target, &answer),
                        on_revoked = ?cfg.on_revoked,
                        "OCSP: the served certificate is REVOKED"
                    );
                    let names = t.state.lock().expect("ocsp state lock").names.clone();
                    let sinks = this.revocation_sinks.lock().expect("ocsp sinks lock").clone();
                    let message = revoked_message(&t.target, &answer);
                    for sink in sinks {
                        sink.revoked(&names, &message);
                    }
                } else if answer.status == OcspCertStatus::Good {
                    tracing::info!(
                        secret = %secret,
                        serial = %t.target.serial_hex,
                        this_update = %unix_time::rfc3339(answer.this_update),
                        next_update = %unix_time::rfc3339(answer.next_update),
                        refresh_in = %humantime::format_duration(wait),
                        signer = %answer.signer,
                        "OCSP staple fetched"
                    );
                }
                this.publish(&t);
                if changed {
                    resubmit(&t, newly_revoked && withholds_revoked(cfg.on_revoked, t.mode));
                }
                wait
            }
            Err(error) => {
                let wait = schedule.after_failure(jitter());
                tracing::warn!(
                    secret = %secret,
                    serial = %t.target.serial_hex,
                    failures = schedule.failures(),
                    retry_in = %humantime::format_duration(Duration::from_secs(wait.as_secs())),
                    error = %error,
                    "OCSP fetch failed; the current staple (if any) is kept until it goes stale"
                );
                {
                    let mut state = t.state.lock().expect("ocsp state lock");
                    state.last_error = Some(error);
                    state.next_refresh = Some(now + wait.as_secs() as i64);
                }
                this.publish(&t);
                wait
            }
        };
        let clock = this.clock;
        drop(this);
        let deadline = Instant::now() + wait;
        loop {
            let stale_at = t
                .state
                .lock()
                .expect("ocsp state lock")
                .staple
                .as_ref()
                .filter(|(_, a)| a.status == OcspCertStatus::Good)
                .map(|(_, a)| clock.instant_at(a.next_update));
            match stale_at {
                Some(at) if at <= deadline => {
                    tokio::time::sleep_until(at).await;
                    let Some(this) = inner.upgrade() else { return };
                    let dropped = {
                        let mut state = t.state.lock().expect("ocsp state lock");
                        let dropped = state.staple.take();
                        state.stale = dropped.is_some();
                        dropped
                    };
                    if let Some((_, answer)) = dropped {
                        tracing::warn!(
                            secret = %secret,
                            serial = %t.target.serial_hex,
                            next_update = %unix_time::rfc3339(answer.next_update),
                            "OCSP staple went stale and is dropped: no fresh response from the responder"
                        );
                        this.publish(&t);
                        resubmit(&t, t.mode == Mode::MustStaple);
                    }
                }
                _ => {
                    tokio::time::sleep_until(deadline).await;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
