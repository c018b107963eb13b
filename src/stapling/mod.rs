//! OCSP stapling fetched by certwire: for every served TLS certificate whose issuer is
//! known and whose AIA names a responder, certwire asks the responder (RFC 6960 over
//! HTTP POST), verifies the answer (src/pki/ocsp.rs: signature by the issuer or its
//! delegated responder, CertID, status, thisUpdate/nextUpdate) and serves it as the
//! certificate's `ocsp_staple`, refreshed halfway to nextUpdate.
//!
//! It hooks into [`Intake`] in two phases: an update of TLS material without a staple
//! of its own asks [`Stapler::prepare`], which finds or makes the certificate's tracker
//! (one per source and first name, with a task that fetches and sleeps) and attaches the
//! current verified staple; only once the store took the update does
//! [`Prepared::commit`] make that tracker the served certificate's (retiring the one
//! before), so a refused update never stops the refresh of what is served. Under
//! `must-staple` a new certificate's tracker starts at once and waits beside the served
//! one's until its first staple. When a task gets a new response, or drops one that went
//! stale, it submits the registered material again through the same `Intake`: the
//! ordinary path checks it and the store pushes the new version to every proxy. Each
//! secret has a turn (`Turn`) held from prepare to commit, and a resubmission runs in
//! it only while its tracker is still in place: a retired tracker never stores its
//! certificate over a newer one, nor withdraws it. A source that supplies its own
//! staple (`tls.ocsp-staple`) wins: nothing is fetched.
//!
//! A `revoked` answer is logged as an error, shown in status and counted; `on_revoked`
//! decides whether the certificate keeps being served (without a staple) or is
//! withdrawn and treated like an invalid secret (`on_invalid`). Revocation is final for
//! the certificate, and a response older than the held one is ignored.

pub mod config;
pub mod fetch;
mod schedule;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex};
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

/// What [`Stapler::prepare`] makes of an update: the material to check and store, and
/// what the stapler does once the store took it ([`Prepared::commit`]). Until then,
/// and while it lives, no other update or resubmission of the same secret runs.
pub struct Prepared {
    decision: Decision,
    on_commit: Commit,
    _turn: Option<Turn>,
}

enum Decision {
    /// Check and store the material as the source gave it.
    AsIs,
    /// The material with the current verified staple attached.
    Stapled(Material),
    /// Refuse the update: `must-staple` without a staple yet, or a revoked certificate
    /// withheld.
    Refuse(PkiError),
}

/// What happens once the store accepted an update; nothing happens to a refused one,
/// so a refused certificate never stops the refresh of the one still served.
enum Commit {
    Nothing,
    /// Stop tracking the secret (the source's own staple, `off`), or track nothing
    /// for it and say why in status (`untracked`).
    Forget {
        intake: Intake,
        names: Vec<Arc<str>>,
        untracked: Option<(Mode, Option<String>, String)>,
    },
    /// `t` is the served certificate's tracker from now on, with these names and material.
    Serve {
        t: Arc<Tracked>,
        names: Vec<Arc<str>>,
        material: Material,
        from_source: bool,
    },
}

impl Prepared {
    fn as_is() -> Self {
        Self { decision: Decision::AsIs, on_commit: Commit::Nothing, _turn: None }
    }

    /// The refusal, if the update is refused before any check.
    pub fn take_refusal(&mut self) -> Option<PkiError> {
        match std::mem::replace(&mut self.decision, Decision::AsIs) {
            Decision::Refuse(err) => Some(err),
            other => {
                self.decision = other;
                None
            }
        }
    }

    /// What to check and store: `given`, or `given` with the staple attached.
    pub fn material<'a>(&'a self, given: &'a Material) -> &'a Material {
        match &self.decision {
            Decision::Stapled(with) => with,
            _ => given,
        }
    }

    /// The store accepted the update: the tracker it was prepared with becomes the
    /// served certificate's (the previous one retired), or tracking stops.
    pub fn commit(mut self) {
        let Some(turn) = &self._turn else { return };
        let inner = turn.inner.clone();
        let key = turn.key.clone();
        match std::mem::replace(&mut self.on_commit, Commit::Nothing) {
            Commit::Nothing => {}
            Commit::Forget { intake, names, untracked } => {
                inner.forget_key(&key, &intake);
                match untracked {
                    Some((mode, responder, why)) => inner.publish_untracked(&intake, &names, mode, responder, &why),
                    None => names.iter().for_each(|name| intake.store().set_ocsp(name, None)),
                }
            }
            Commit::Serve { t, names, material, from_source } => inner.serve(&key, &t, names, material, from_source),
        }
    }
}

/// The turn of one secret: updates from the source, resubmissions by its trackers and
/// forgetting it run one at a time, each from its decision to its commit, so that a
/// retired tracker cannot store its certificate over a newer one.
struct Turn {
    inner: Arc<Inner>,
    key: Key,
}

impl Drop for Turn {
    fn drop(&mut self) {
        // Never a panic in drop: a poisoned lock still frees the turn.
        self.inner.turns.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.key);
        self.inner.turn_freed.notify_all();
    }
}

/// The stapler; cheap to clone, one per process.
#[derive(Clone)]
pub struct Stapler {
    inner: Arc<Inner>,
}

type Key = (Arc<str>, Arc<str>);

/// A verified response: its DER and what it says.
type Staple = (Vec<u8>, OcspAnswer);

/// The trackers of one secret: the served certificate's, and (`must-staple`) the one of
/// a newer certificate that waits for its first staple before it can be served.
#[derive(Default)]
struct Slot {
    current: Option<Arc<Tracked>>,
    pending: Option<Arc<Tracked>>,
}

impl Slot {
    fn all(&self) -> impl Iterator<Item = &Arc<Tracked>> {
        self.current.iter().chain(self.pending.iter())
    }
}

struct Inner {
    cfg: OcspConfig,
    metrics: Arc<Metrics>,
    fetcher: Arc<dyn Fetch>,
    permits: Semaphore,
    clock: Clock,
    tracked: Mutex<HashMap<Key, Slot>>,
    /// Secrets whose turn is taken, by the thread that has it.
    turns: Mutex<HashMap<Key, std::thread::ThreadId>>,
    turn_freed: Condvar,
    /// Certificates found revoked (by leaf DER), with the response: revocation is final,
    /// a later "good" (a stale cache, a replayed answer) never brings one back, even
    /// after it was forgotten and sent again. At most `max_certificates` entries.
    revoked: Mutex<HashMap<Vec<u8>, Staple>>,
    /// Told of every newly revoked certificate, with the names it is served under: the
    /// Kubernetes source posts an Event on the Secret ([`Stapler::on_revoked`]).
    revocation_sinks: Mutex<Vec<Arc<dyn RevocationSink>>>,
    /// Tests: run once by the next resubmission, before it takes its turn.
    #[cfg(test)]
    before_resubmit: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

/// Something told loudly when a served certificate is found revoked.
pub trait RevocationSink: Send + Sync {
    /// `names`: every name the certificate is served under; `message` names the serial,
    /// the responder and the revocation time and reason (never key material).
    fn revoked(&self, names: &[Arc<str>], message: &str);
}

/// One certificate being kept stapled.
struct Tracked {
    key: Key,
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
    /// The last verified response: good and not stale, or revoked (then for good).
    staple: Option<Staple>,
    /// The newest thisUpdate accepted: an older response is refused (a stale cache).
    newest_this_update: Option<i64>,
    stale: bool,
    last_error: Option<String>,
    next_refresh: Option<i64>,
}

impl State {
    fn revoked(&self) -> bool {
        self.staple.as_ref().is_some_and(|(_, a)| a.status != OcspCertStatus::Good)
    }
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
            turns: Mutex::default(),
            turn_freed: Condvar::new(),
            revoked: Mutex::default(),
            revocation_sinks: Mutex::default(),
            #[cfg(test)]
            before_resubmit: Mutex::default(),
        };
        Self { inner: Arc::new(inner) }
    }

    /// Adds `sink`, told of each certificate found revoked from now on.
    pub fn on_revoked(&self, sink: Arc<dyn RevocationSink>) {
        self.inner.revocation_sinks.lock().expect("ocsp sinks lock").push(sink);
    }

    /// Called by [`Intake`] before the check of every update: see [`Prepared`]. Nothing
    /// the served certificate's tracker does changes until [`Prepared::commit`], so an
    /// update the store refuses leaves it refreshed. Under `must-staple` a new
    /// certificate (refused until it has a staple) gets a tracker of its own at once,
    /// next to the served one's, that serves it once its first staple is verified.
    pub fn prepare<N: AsRef<str>>(&self, intake: &Intake, names: &[N], material: &Material) -> Prepared {
        let inner = &self.inner;
        let Material::Tls { cert_chain_pem, ocsp_staple, .. } = material else { return Prepared::as_is() };
        let Some(first) = names.first() else { return Prepared::as_is() };
        let key: Key = (Arc::from(intake.source()), Arc::from(first.as_ref()));
        let turn = Some(inner.turn(&key));
        let mode = inner.cfg.mode_for(intake.source(), names);
        let names: Vec<Arc<str>> = names.iter().map(|n| Arc::from(n.as_ref())).collect();
        let forget = |untracked| Commit::Forget { intake: intake.clone(), names: names.clone(), untracked };
        if mode == Mode::Off || ocsp_staple.is_some() {
            // The source's own staple wins; it is checked like any update.
            return Prepared { decision: Decision::AsIs, on_commit: forget(None), _turn: turn };
        }
        let untracked = |responder: Option<String>, why: String| Prepared {
            decision: refuse_unless_fetch(mode, &why),
            on_commit: forget(Some((mode, responder, why))),
            _turn: None,
        };
        let target = match ocsp::target(cert_chain_pem, &[]) {
            Ok(target) if !inner.cfg.responder_allowed(&target.url) => {
                let why = format!(
                    "the certificate's OCSP responder {} is not in [ocsp] responders: nothing is sent there",
                    target.url
                );
                return Prepared { _turn: turn, ..untracked(Some(target.url.clone()), why) };
            }
            Ok(target) => target,
            Err(why) => return Prepared { _turn: turn, ..untracked(None, why) },
        };
        let t = match inner.candidate(&key, target, mode, intake, &names, material) {
            Ok(t) => t,
            Err((limit, why)) => {
                inner.metrics.limits_hit.get_or_create(&LimitLabel { limit }).inc();
                tracing::warn!(secret = %key.1, source = %key.0, limit, error = %why, "OCSP: certificate not tracked");
                return Prepared { _turn: turn, ..untracked(None, why) };
            }
        };
        Prepared {
            decision: inner.decide(&t, material),
            on_commit: Commit::Serve { t, names, material: material.clone(), from_source: true },
            _turn: turn,
        }
    }

    /// The source no longer has `name`: stop tracking what it was served with.
    pub fn forget(&self, intake: &Intake, name: &str) {
        let keys: Vec<Key> = {
            let tracked = self.inner.tracked.lock().expect("ocsp lock");
            tracked
                .iter()
                .filter(|((source, _), slot)| {
                    **source == *intake.source()
                        && slot
                            .all()
                            .any(|t| t.state.lock().expect("ocsp state lock").names.iter().any(|n| **n == *name))
                })
                .map(|(k, _)| k.clone())
                .collect()
        };
        for key in &keys {
            let _turn = self.inner.turn(key);
            self.inner.forget_key(key, intake);
        }
        intake.store().set_ocsp(name, None);
    }

    /// Certificates tracked now (served ones, and `must-staple` ones waiting for a staple).
    pub fn tracked(&self) -> usize {
        self.inner.tracked.lock().expect("ocsp lock").values().map(|s| s.all().count()).sum()
    }
}

/// Whether a revoked certificate stops being served: `on_revoked = "withhold"`, or
/// `must-staple`, which cannot serve it bare (Envoy's MUST_STAPLE would refuse it).
fn withholds_revoked(on_revoked: OnRevoked, mode: Mode) -> bool {
    on_revoked == OnRevoked::Withhold || mode == Mode::MustStaple
}

fn refuse_unless_fetch(mode: Mode, why: &str) -> Decision {
    match mode {
        Mode::MustStaple => Decision::Refuse(PkiError::OcspStapleRequired(format!(
            "{why}; with must-staple a certificate without a staple is not served"
        ))),
        _ => Decision::AsIs,
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

/// What `max_responders` counts: scheme, host and port of a responder URL (path
/// variants of one host are one responder).
fn responder_of(url: &str) -> String {
    match url.parse::<http::Uri>() {
        Ok(uri) if uri.host().is_some() => {
            let scheme = uri.scheme_str().unwrap_or("http").to_ascii_lowercase();
            let port = uri.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
            let host = uri.host().unwrap_or_default().to_ascii_lowercase();
            format!("{scheme}://{host}:{port}")
        }
        _ => url.to_owned(),
    }
}

/// What a verified response did to a tracker's state.
enum Applied {
    /// The tracker was retired meanwhile: its task ends.
    Retired,
    /// Older than the held one, or "good" after "revoked": ignored, retried.
    Ignored {
        wait: Duration,
        why: String,
    },
    Taken {
        wait: Duration,
        changed: bool,
        revoked: bool,
    },
}

impl Inner {
    /// Takes the turn of `key`, waiting for whoever has it (see [`Turn`]).
    fn turn(self: &Arc<Self>, key: &Key) -> Turn {
        let me = std::thread::current().id();
        let mut turns = self.turns.lock().expect("ocsp turns lock");
        while let Some(holder) = turns.get(key) {
            assert!(*holder != me, "OCSP: the turn of {} taken twice by one thread", key.1);
            turns = self.turn_freed.wait(turns).expect("ocsp turns lock");
        }
        turns.insert(key.clone(), me);
        Turn { inner: self.clone(), key: key.clone() }
    }

    /// The tracker for `target` under `key`: the served one or the waiting one if it is
    /// about the same certificate, else a new one within the bounds. A new one is
    /// registered (and started) now only under `must-staple`, as the waiting one;
    /// otherwise by the commit.
    fn candidate(
        self: &Arc<Self>,
        key: &Key,
        target: OcspTarget,
        mode: Mode,
        intake: &Intake,
        names: &[Arc<str>],
        material: &Material,
    ) -> Result<Arc<Tracked>, (&'static str, String)> {
        let mut tracked = self.tracked.lock().expect("ocsp lock");
        if let Some(t) = tracked.get(key).and_then(|s| s.all().find(|t| t.target == target && t.mode == mode)) {
            return Ok(t.clone());
        }
        let others: Vec<&Arc<Tracked>> = tracked.iter().filter(|(k, _)| *k != key).flat_map(|(_, s)| s.all()).collect();
        if others.len() >= self.cfg.max_certificates {
            return Err((
                "ocsp_max_certificates",
                format!("certwire already tracks max_certificates ({}) certificates", self.cfg.max_certificates),
            ));
        }
        let responder = responder_of(&target.url);
        let responders: std::collections::HashSet<String> =
            others.iter().map(|t| responder_of(&t.target.url)).collect();
        if !responders.contains(&responder) && responders.len() >= self.cfg.max_responders {
            return Err((
                "ocsp_max_responders",
                format!(
                    "certwire already asks max_responders ({}) distinct responders (scheme, host and port); {} is not \
                     asked",
                    self.cfg.max_responders, target.url
                ),
            ));
        }
        let seeded = self.revoked.lock().expect("ocsp revoked lock").get(&target.leaf_der).cloned();
        let t = Arc::new(Tracked {
            key: key.clone(),
            target,
            mode,
            intake: intake.clone(),
            state: Mutex::new(State {
                names: names.to_vec(),
                material: material.clone(),
                newest_this_update: seeded.as_ref().map(|(_, a)| a.this_update),
                staple: seeded,
                stale: false,
                last_error: None,
                next_refresh: None,
            }),
            task: Mutex::new(None),
        });
        if mode != Mode::MustStaple {
            return Ok(t);
        }
        let slot = tracked.entry(key.clone()).or_default();
        if let Some(old) = slot.pending.replace(t.clone()) {
            self.retire(&old, slot.current.is_none());
        }
        if t.state.lock().expect("ocsp state lock").revoked() {
            self.metrics.ocsp_revoked.inc();
        }
        drop(tracked);
        self.start(&t);
        self.publish(&t);
        Ok(t)
    }

    /// What to do with an update of `t`'s certificate, from `t`'s state.
    fn decide(&self, t: &Tracked, material: &Material) -> Decision {
        let now = self.clock.now();
        let state = t.state.lock().expect("ocsp state lock");
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
                Decision::Stapled(with(der))
            }
            Some((_, answer)) if answer.status != OcspCertStatus::Good => {
                if withholds_revoked(self.cfg.on_revoked, t.mode) {
                    let why = match self.cfg.on_revoked {
                        OnRevoked::Withhold => "on_revoked = \"withhold\"",
                        OnRevoked::Serve => "must-staple cannot serve it without a staple",
                    };
                    Decision::Refuse(PkiError::OcspRevoked(format!(
                        "{}; withheld ({why})",
                        revoked_message(&t.target, answer)
                    )))
                } else {
                    Decision::AsIs
                }
            }
            // No fetch error here: this text reaches whoever wrote the secret (the
            // Kubernetes source makes it an Event on the Secret), and connect refused vs
            // timeout vs an HTTP status would tell them what listens where.
            _ if t.mode == Mode::MustStaple => Decision::Refuse(PkiError::OcspStapleRequired(format!(
                "no current verified OCSP response yet for serial {} from {}; with must-staple the certificate is \
                 served once one is (why not yet: certwire's status, ocsp.last_error)",
                t.target.serial_hex, t.target.url,
            ))),
            _ => Decision::AsIs,
        }
    }

    /// The store took `t`'s certificate for `key`: `t` is the served one's tracker now.
    /// `from_source`: an update of the source (not a resubmission), which abandons a
    /// certificate still waiting for its first staple.
    fn serve(
        self: &Arc<Self>,
        key: &Key,
        t: &Arc<Tracked>,
        names: Vec<Arc<str>>,
        material: Material,
        from_source: bool,
    ) {
        {
            let mut state = t.state.lock().expect("ocsp state lock");
            state.names = names;
            state.material = material;
        }
        let mut tracked = self.tracked.lock().expect("ocsp lock");
        let slot = tracked.entry(key.clone()).or_default();
        let mut retired: Vec<(Arc<Tracked>, bool)> = Vec::new();
        if !slot.current.as_ref().is_some_and(|c| Arc::ptr_eq(c, t)) {
            let was_pending = slot.pending.as_ref().is_some_and(|p| Arc::ptr_eq(p, t));
            if was_pending {
                slot.pending = None;
            } else if t.state.lock().expect("ocsp state lock").revoked() {
                self.metrics.ocsp_revoked.inc();
            }
            retired.extend(slot.current.replace(t.clone()).map(|old| (old, true)));
            // A waiting tracker of another certificate: the source has moved on.
            retired.extend(slot.pending.take().map(|old| (old, true)));
        } else if from_source {
            // The source sent the served certificate again: the one waiting is abandoned.
            retired.extend(slot.pending.take().map(|old| (old, false)));
        }
        for (old, shown) in &retired {
            self.retire(old, *shown);
        }
        drop(tracked);
        let keep = t.state.lock().expect("ocsp state lock").names.clone();
        for (old, _) in &retired {
            for name in old.state.lock().expect("ocsp state lock").names.iter().filter(|n| !keep.contains(n)) {
                t.intake.store().set_ocsp(name, None);
            }
        }
        self.start(t);
        self.publish(t);
    }

    fn start(self: &Arc<Self>, t: &Arc<Tracked>) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let mut task = t.task.lock().expect("ocsp task lock");
        if task.is_none() {
            let handle = tokio::spawn(run(Arc::downgrade(self), t.clone()));
            *task = Some(handle.abort_handle());
        }
    }

    fn forget_key(&self, key: &Key, intake: &Intake) {
        let mut tracked = self.tracked.lock().expect("ocsp lock");
        let Some(slot) = tracked.remove(key) else { return };
        let mut names = Vec::new();
        for old in slot.all() {
            self.retire(old, true);
            names.extend(old.state.lock().expect("ocsp state lock").names.iter().cloned());
        }
        drop(tracked);
        for name in &names {
            intake.store().set_ocsp(name, None);
        }
    }

    /// Stops an entry's task and takes its metrics away (the gauges if it is the
    /// `shown` one). Called with `tracked` locked, as it leaves its slot.
    fn retire(&self, old: &Tracked, shown: bool) {
        if let Some(task) = old.task.lock().expect("ocsp task lock").take() {
            task.abort();
        }
        if old.state.lock().expect("ocsp state lock").revoked() {
            self.metrics.ocsp_revoked.dec();
        }
        if shown {
            let label = SecretLabel { secret: old.key.1.clone() };
            self.metrics.ocsp_this_update.remove(&label);
            self.metrics.ocsp_next_update.remove(&label);
            self.metrics.ocsp_next_refresh.remove(&label);
        }
    }

    /// Whether `t` is still in its slot: `Some(true)` as the served one's tracker,
    /// `Some(false)` as the waiting one, `None` retired.
    fn role(&self, t: &Tracked) -> Option<bool> {
        let tracked = self.tracked.lock().expect("ocsp lock");
        let slot = tracked.get(&t.key)?;
        let is = |x: &Option<Arc<Tracked>>| x.as_ref().is_some_and(|x| std::ptr::eq(Arc::as_ptr(x), t));
        if is(&slot.current) {
            Some(true)
        } else if is(&slot.pending) {
            Some(false)
        } else {
            None
        }
    }

    /// A verified response of `t`'s responder, applied to `t`'s state unless `t` was
    /// retired, it is older than the one held, or the certificate is already revoked.
    fn apply(&self, t: &Tracked, der: Vec<u8>, answer: &OcspAnswer, now: i64, schedule: &mut Schedule) -> Applied {
        let revoked = answer.status != OcspCertStatus::Good;
        if revoked {
            let mut known = self.revoked.lock().expect("ocsp revoked lock");
            if known.len() >= self.cfg.max_certificates
                && !known.contains_key(&t.target.leaf_der)
                && let Some(evict) = known.keys().next().cloned()
            {
                known.remove(&evict);
            }
            known.insert(t.target.leaf_der.clone(), (der.clone(), answer.clone()));
        }
        let count = |result: &'static str| self.metrics.ocsp_fetches.get_or_create(&OcspResultLabel { result }).inc();
        // Under `tracked`, as `retire` runs: the revoked gauge stays exact.
        let tracked = self.tracked.lock().expect("ocsp lock");
        let live = tracked.get(&t.key).is_some_and(|s| s.all().any(|x| std::ptr::eq(Arc::as_ptr(x), t)));
        let mut state = t.state.lock().expect("ocsp state lock");
        let older = state.newest_this_update.filter(|newest| answer.this_update < *newest);
        let why = if state.revoked() && !revoked {
            Some(format!(
                "the response of {} says good (thisUpdate {}), but the certificate was found revoked: revocation is \
                 final, the response is ignored",
                t.target.url,
                unix_time::rfc3339(answer.this_update)
            ))
        } else {
            older.map(|newest| {
                format!(
                    "the response of {} (thisUpdate {}) is older than the one held (thisUpdate {}): ignored, the held \
                     one is kept (a stale cache or a replayed answer?)",
                    t.target.url,
                    unix_time::rfc3339(answer.this_update),
                    unix_time::rfc3339(newest)
                )
            })
        };
        if let Some(why) = why {
            count("outdated");
            let wait = schedule.after_failure(jitter());
            state.last_error = Some(why.clone());
            state.next_refresh = Some(now + wait.as_secs() as i64);
            return if live { Applied::Ignored { wait, why } } else { Applied::Retired };
        }
        count(if revoked { "revoked" } else { "good" });
        if !live {
            return Applied::Retired;
        }
        let wait = schedule.after_success(now, answer.next_update);
        let changed = state.staple.as_ref().map(|(d, _)| d) != Some(&der);
        let newly_revoked = revoked && !state.revoked();
        state.staple = Some((der, answer.clone()));
        state.newest_this_update = Some(answer.this_update);
        state.stale = false;
        state.last_error = None;
        // Revocation is final: nothing more is asked.
        state.next_refresh = (!revoked).then(|| now + wait.as_secs() as i64);
        if newly_revoked {
            self.metrics.ocsp_revoked.inc();
        }
        Applied::Taken { wait, changed, revoked: newly_revoked }
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
        // Only the tracker whose certificate is served (or, with none served yet, the
        // waiting one) speaks for the secret.
        let shown = match self.tracked.lock().expect("ocsp lock").get(&t.key) {
            Some(Slot { current: Some(c), .. }) => std::ptr::eq(Arc::as_ptr(c), t),
            Some(Slot { current: None, pending: Some(p) }) => std::ptr::eq(Arc::as_ptr(p), t),
            _ => false,
        };
        if !shown {
            return;
        }
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
        // Counted as good, revoked or outdated by `apply`.
        ocsp::verify(&der, target, self.clock.now()).map(|answer| (der, answer)).map_err(|e| {
            count("invalid");
            format!("the response of {} is refused: {e}", target.url)
        })
    }
}

/// Submits the entry's material again, in the secret's turn and only if `t` is still
/// in its slot: a retired tracker never resubmits nor withdraws (a newer certificate
/// from the source, or the source's removal, wins). The hook attaches what the state says.
fn resubmit(inner: &Arc<Inner>, t: &Arc<Tracked>, withdraw: bool) {
    #[cfg(test)]
    if let Some(hook) = inner.before_resubmit.lock().expect("ocsp hook lock").take() {
        hook();
    }
    let turn = inner.turn(&t.key);
    let Some(current) = inner.role(t) else {
        tracing::debug!(secret = %t.key.1, serial = %t.target.serial_hex, "OCSP: retired tracker, nothing resubmitted");
        return;
    };
    let (names, material) = {
        let state = t.state.lock().expect("ocsp state lock");
        (state.names.clone(), state.material.clone())
    };
    // A waiting tracker's certificate is not the one served: nothing to withdraw.
    if withdraw && current {
        t.intake.withdraw(&names);
    }
    let prepared = Prepared {
        decision: inner.decide(t, &material),
        on_commit: Commit::Serve { t: t.clone(), names: names.clone(), material: material.clone(), from_source: false },
        _turn: Some(turn),
    };
    // A refusal is logged, counted and recorded by the intake like any update's.
    let _ = t.intake.submit(&names, &material, StdInstant::now(), Some(prepared));
}

/// The refresh loop of one certificate: fetch, apply, sleep until halfway to
/// nextUpdate (or the retry), dropping the staple if it goes stale meanwhile. It ends
/// once the certificate is found revoked (final) or its tracker retired.
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
        if t.state.lock().expect("ocsp state lock").revoked() {
            return;
        }
        let Some(this) = inner.upgrade() else { return };
        let result = this.fetch_verified(&t.target, &request).await;
        let now = this.clock.now();
        let secret = t.key.1.clone();
        let wait = match result {
            Ok((der, answer)) => match this.apply(&t, der, &answer, now, &mut schedule) {
                Applied::Retired => return,
                Applied::Ignored { wait, why } => {
                    tracing::warn!(
                        secret = %secret,
                        serial = %t.target.serial_hex,
                        retry_in = %humantime::format_duration(Duration::from_secs(wait.as_secs())),
                        error = %why,
                        "OCSP response ignored; the held one (if any) is kept"
                    );
                    this.publish(&t);
                    wait
                }
                Applied::Taken { wait, changed, revoked } => {
                    if revoked {
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
                    } else {
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
                        resubmit(&this, &t, revoked && withholds_revoked(cfg.on_revoked, t.mode));
                    }
                    if revoked {
                        return;
                    }
                    wait
                }
            },
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
                        resubmit(&this, &t, t.mode == Mode::MustStaple);
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
