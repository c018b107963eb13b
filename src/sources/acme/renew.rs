//! One task per configured certificate: serve what the state directory holds at once,
//! then order when it is missing, no longer matches the config, or is due (2/3 of its
//! lifetime, the CA's ARI window, or `renew_before`), retrying failures with jittered
//! exponential backoff. The served certificate changes only when a new one has been
//! issued and passed the same checks as any other secret.
//!
//! With a Lease (`[acme] lease`), a task orders only while its replica holds it;
//! otherwise it watches the certificate's Kubernetes Secret and serves each version
//! the holder writes there, and takes over the schedule when the Lease comes to it.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use instant_acme::CertificateIdentifier;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::account::Accounts;
use super::challenge::Solvers;
use super::config::{CertificateConfig, normalize_domain};
use super::k8s_store::KubeStore;
use super::lease::Leadership;
use super::order::{self, Issued, OrderError, Step, fail};
use super::schedule::{self, Basis, Validity, Window};
use super::store::{StateDir, Stored};
use crate::health::Health;
use crate::ingest::Sink;
use crate::metrics::{AcmeCertificateLabel, AcmeOrderLabel, Metrics};
use crate::pki::{self, CheckOptions, KeyBytes, Material};
use crate::store::{Rank, Store};

/// The longest single sleep: the plan is re-checked against the wall clock after it,
/// so a suspended machine or a clock jump is noticed.
const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// How long writing the issued certificate to its Kubernetes Secret may take.
const KUBE_STORE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds on how often the CA's ARI answer is fetched again.
const ARI_RECHECK_MIN: Duration = Duration::from_secs(60);
const ARI_RECHECK_MAX: Duration = Duration::from_secs(24 * 3600);

/// What every certificate task shares.
pub struct Shared {
    pub sink: Sink,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub accounts: Arc<Accounts>,
    pub solvers: Arc<Solvers>,
    pub state: StateDir,
    pub status: OrderStatus,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Orders in flight at once, across certificates.
    pub orders: Semaphore,
    pub shutdown: CancellationToken,
    /// The Kubernetes Secrets store, when configured.
    pub kube: Option<KubeStore>,
    /// Whether this replica holds the ACME Lease; `None`: no Lease, always order.
    pub leader: Option<Leadership>,
}

/// Why a wait ended.
enum Wake {
    Due,
    Shutdown,
    /// The Lease went to another replica.
    Lost,
}

/// Order failures shown in `/status/secrets` as `last_error` of the certificate's
/// name: recorded under a status-only source rank that never offers content, so
/// whatever is served is untouched and a success clears the error.
pub struct OrderStatus {
    pub store: Arc<Store>,
    pub rank: Rank,
    pub source: Arc<str>,
}

impl OrderStatus {
    fn failed(&self, name: &str, message: String) {
        self.store.reject(self.rank, &self.source, name, message);
    }

    fn cleared(&self, name: &str) {
        // This rank never holds content: remove() only drops its error.
        self.store.remove(self.rank, name);
    }
}

/// The certificate being served, as far as scheduling cares.
#[derive(Debug, Clone)]
struct Current {
    validity: Validity,
    leaf_der: Vec<u8>,
    serial: String,
    /// Its SANs include every configured domain.
    covers_config: bool,
}

enum Failure {
    Cancelled,
    Order(OrderError),
}

impl From<OrderError> for Failure {
    fn from(e: OrderError) -> Self {
        Failure::Order(e)
    }
}

pub struct Task {
    shared: Arc<Shared>,
    spec: CertificateConfig,
    component: String,
    /// The ARI window last seen and the point chosen inside it: a re-check that finds
    /// the same window keeps the point instead of drawing again.
    ari_choice: Option<(Window, SystemTime)>,
}

impl Task {
    pub fn new(shared: Arc<Shared>, spec: CertificateConfig) -> Self {
        let component = format!("acme:{}", spec.name);
        shared.health.not_ready(&component, "loading the stored certificate");
        Self { shared, spec, component, ari_choice: None }
    }

    pub async fn run(mut self) {
        let name = self.spec.name.clone();
        let mut current = self.load_stored().await;
        self.shared.health.ready(&self.component);
        let mut failures = 0u32;
        let mut retry_at: Option<SystemTime> = None;
        loop {
            // Not the Lease holder: serve what the holder stores, until the Lease comes here.
            if !self.follow(&mut current).await {
                return;
            }
            // When to order, and when to wake up first (to ask the CA's ARI again).
            let (order_at, why, wake_at) = match (&retry_at, &current) {
                (Some(t), _) => (*t, "retry after a failed order".to_string(), *t),
                (None, None) => {
                    let now = SystemTime::now();
                    (now, "no usable certificate stored".into(), now)
                }
                (None, Some(c)) if !c.covers_config => {
                    let now = SystemTime::now();
                    (now, "the configured domains are not all in the stored certificate".into(), now)
                }
                (None, Some(c)) => {
                    let c = c.clone();
                    self.plan(&c).await
                }
            };
            self.shared
                .metrics
                .acme_next_renewal
                .get_or_create(&AcmeCertificateLabel { certificate: name.clone() })
                .set(unix_secs(order_at));
            if order_at > SystemTime::now() {
                tracing::info!(certificate = %name, at = %rfc3339(order_at), reason = %why, "next ACME order scheduled");
            }
            if wake_at > SystemTime::now() {
                if wake_at < order_at {
                    tracing::debug!(certificate = %name, at = %rfc3339(wake_at), "next ARI check scheduled");
                }
                match self.sleep_until(wake_at).await {
                    Wake::Due => {}
                    Wake::Shutdown => return,
                    Wake::Lost => continue,
                }
            }
            if wake_at < order_at {
                continue;
            }
            tracing::info!(certificate = %name, reason = %why, "ordering a certificate");
            match self.attempt().await {
                Ok(new) => {
                    failures = 0;
                    retry_at = None;
                    self.ari_choice = None;
                    self.count("issued");
                    current = Some(new);
                }
                Err(Failure::Cancelled) => return,
                Err(Failure::Order(err)) => {
                    failures = failures.saturating_add(1);
                    let delay = schedule::backoff(
                        self.shared.retry_base,
                        self.shared.retry_max,
                        failures,
                        schedule::random_fraction(),
                    );
                    retry_at = Some(SystemTime::now() + delay);
                    self.count("failed");
                    let serving = current.as_ref().map(|c| c.serial.as_str()).unwrap_or("nothing");
                    tracing::error!(
                        certificate = %name,
                        step = err.step.as_str(),
                        error = %err.message,
                        failures,
                        retry_in = ?delay,
                        still_serving = serving,
                        "ACME order failed"
                    );
                    self.shared.status.failed(
                        &name,
                        format!("ACME order failed at {err} (failure {failures}, next try in {delay:?})"),
                    );
                }
            }
        }
    }

    fn count(&self, result: &'static str) {
        let label = AcmeOrderLabel { certificate: self.spec.name.clone(), result };
        self.shared.metrics.acme_orders.get_or_create(&label).inc();
    }

    /// Sleeps until `at` by the wall clock, or until shutdown or the Lease is lost.
    async fn sleep_until(&self, at: SystemTime) -> Wake {
        let mut leader = self.shared.leader.clone();
        loop {
            let Ok(left) = at.duration_since(SystemTime::now()) else { return Wake::Due };
            if left.is_zero() {
                return Wake::Due;
            }
            let lost = async {
                match leader.as_mut() {
                    Some(rx) => {
                        let _ = rx.wait_for(|holding| !holding).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.shared.shutdown.cancelled() => return Wake::Shutdown,
                _ = lost => return Wake::Lost,
                _ = tokio::time::sleep(left.min(MAX_SLEEP)) => {}
            }
        }
    }

    /// Returns at once without a Lease or while holding it; else serves each version
    /// of the certificate's Secret until the Lease comes here (true) or shutdown
    /// (false). On taking over, the Secret is read once more: the schedule starts
    /// from what the last holder stored.
    async fn follow(&self, current: &mut Option<Current>) -> bool {
        let Some(mut leader) = self.shared.leader.clone() else { return true };
        if *leader.borrow_and_update() {
            return true;
        }
        let name = &self.spec.name;
        let Some(kube) = self.shared.kube.clone() else { return true };
        tracing::info!(certificate = %name, secret = %kube.describe(name), "not the ACME lease holder: serving what the holder stores, ordering nothing");
        let mut versions = kube.watch_cert(name);
        loop {
            tokio::select! {
                _ = self.shared.shutdown.cancelled() => return false,
                changed = leader.changed() => {
                    if changed.is_err() {
                        return false;
                    }
                    if *leader.borrow_and_update() {
                        break;
                    }
                }
                version = versions.next() => match version {
                    Some(Ok(Some(stored))) => self.adopt(&stored, current, "the lease holder's stored certificate served"),
                    Some(Ok(None)) => {}
                    Some(Err(e)) => tracing::warn!(certificate = %name, error = %e, "watching the stored certificate failed; retrying"),
                    None => return false,
                },
            }
        }
        match kube.load_cert(name).await {
            Ok(Some(stored)) => self.adopt(&stored, current, "stored certificate served on taking over the lease"),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(certificate = %name, error = format!("{e:#}"), "could not re-read the stored certificate on taking over")
            }
        }
        true
    }

    /// Serves `stored` when it is another certificate than `current` and passes the checks.
    fn adopt(&self, stored: &Stored, current: &mut Option<Current>, what: &str) {
        let name = &self.spec.name;
        match self.check(&stored.chain_pem, &stored.key_pem) {
            Ok(new) => {
                if current.as_ref().is_some_and(|c| c.leaf_der == new.leaf_der) {
                    return;
                }
                if self.serve(stored, Instant::now()).is_ok() {
                    tracing::info!(certificate = %name, serial = %new.serial, not_after = %rfc3339(new.validity.not_after), "{what}");
                    *current = Some(new);
                }
            }
            Err(e) => {
                tracing::warn!(certificate = %name, error = %e.message, "stored certificate not usable; keeping the current one")
            }
        }
    }

    /// When to renew `current`: (time, reason, when to wake up first: earlier than
    /// the renewal when the CA's ARI answer should be fetched again meanwhile).
    async fn plan(&mut self, current: &Current) -> (SystemTime, String, SystemTime) {
        let ari = self.ari(current).await;
        let window = ari.map(|(w, _)| w);
        let (mut at, basis) =
            schedule::renewal_time(current.validity, window, self.spec.renew_before, schedule::random_fraction());
        if basis == Basis::Ari
            && let Some(w) = window
        {
            match self.ari_choice {
                Some((seen, chosen)) if seen == w => at = chosen,
                _ => self.ari_choice = Some((w, at)),
            }
        }
        let why = match window {
            Some(w) => format!("{} (ARI window {} .. {})", basis.as_str(), rfc3339(w.start), rfc3339(w.end)),
            None => basis.as_str().to_string(),
        };
        let wake = match ari {
            Some((_, retry_after)) => at.min(SystemTime::now() + retry_after.clamp(ARI_RECHECK_MIN, ARI_RECHECK_MAX)),
            None => at,
        };
        (at, why, wake)
    }

    /// The CA's ARI window for `current` and when to ask again; `None` when the CA
    /// offers no ARI or cannot be asked now (then 2/3 of the lifetime applies).
    async fn ari(&self, current: &Current) -> Option<(Window, Duration)> {
        let name = &self.spec.name;
        let leaf = CertificateDer::from(current.leaf_der.as_slice());
        let id = match CertificateIdentifier::try_from(&leaf) {
            Ok(id) => id,
            Err(e) => {
                tracing::debug!(certificate = %name, error = %e, "no ARI identifier for the certificate");
                return None;
            }
        };
        let account = match self.shared.accounts.get().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(certificate = %name, error = format!("{e:#}"), "cannot reach the CA for its ARI window; renewing at 2/3 of the lifetime");
                return None;
            }
        };
        match account.renewal_info(&id).await {
            Ok((info, retry_after)) => {
                let w = info.suggested_window;
                Some((Window { start: w.start.into(), end: w.end.into() }, retry_after))
            }
            Err(instant_acme::Error::Unsupported(_)) => None,
            Err(e) => {
                tracing::warn!(certificate = %name, error = %e, "ARI request failed; renewing at 2/3 of the lifetime");
                None
            }
        }
    }

    /// The certificate's Kubernetes Secret, when configured and readable.
    async fn load_from_kube(&self) -> Option<Stored> {
        let name = &self.spec.name;
        let kube = self.shared.kube.as_ref()?;
        let loaded = tokio::select! {
            _ = self.shared.shutdown.cancelled() => return None,
            loaded = tokio::time::timeout(KUBE_STORE_TIMEOUT / 3, kube.load_cert(name)) => loaded
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer from the API server within {:?}", KUBE_STORE_TIMEOUT / 3))),
        };
        match loaded {
            Ok(Some(stored)) => Some(stored),
            Ok(None) => {
                tracing::info!(certificate = %name, secret = %kube.describe(name), "no stored certificate in Kubernetes");
                None
            }
            Err(e) => {
                tracing::warn!(certificate = %name, error = format!("{e:#}"), "stored certificate unreadable from Kubernetes; trying the state directory");
                None
            }
        }
    }

    /// The stored certificate (the Kubernetes Secret first, then the state
    /// directory), served at once when it passes the checks.
    async fn load_stored(&self) -> Option<Current> {
        let name = &self.spec.name;
        if let Some(stored) = self.load_from_kube().await {
            match self.check(&stored.chain_pem, &stored.key_pem) {
                Ok(current) if self.serve(&stored, Instant::now()).is_ok() => {
                    tracing::info!(
                        certificate = %name,
                        serial = %current.serial,
                        not_after = %rfc3339(current.validity.not_after),
                        "stored certificate served from its Kubernetes Secret"
                    );
                    return Some(current);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(certificate = %name, error = %e.message, "certificate in the Kubernetes Secret not usable; trying the state directory");
                }
            }
        }
        let stored = match self.shared.state.load_cert(name) {
            Ok(Some(stored)) => stored,
            Ok(None) => {
                tracing::info!(certificate = %name, dir = %self.shared.state.cert_dir(name).display(), "no stored certificate");
                return None;
            }
            Err(e) => {
                tracing::warn!(certificate = %name, error = format!("{e:#}"), "stored certificate unreadable");
                return None;
            }
        };
        match self.check(&stored.chain_pem, &stored.key_pem) {
            Ok(current) => {
                self.serve(&stored, Instant::now()).ok()?;
                tracing::info!(
                    certificate = %name,
                    serial = %current.serial,
                    not_after = %rfc3339(current.validity.not_after),
                    "stored certificate served"
                );
                Some(current)
            }
            Err(e) => {
                tracing::warn!(certificate = %name, error = %e.message, "stored certificate not usable; ordering a new one");
                None
            }
        }
    }

    /// One order: account, challenges, issuance; then the checks, the state
    /// directory and the sink. Published answers are withdrawn whatever happens.
    async fn attempt(&self) -> Result<Current, Failure> {
        let _permit = tokio::select! {
            _ = self.shared.shutdown.cancelled() => return Err(Failure::Cancelled),
            permit = self.shared.orders.acquire() => permit.map_err(|_| Failure::Cancelled)?,
        };
        let account = tokio::select! {
            _ = self.shared.shutdown.cancelled() => return Err(Failure::Cancelled),
            account = self.shared.accounts.get() => account.map_err(|e| fail(Step::Account, format!("{e:#}")))?,
        };
        let mut published = Vec::new();
        let result = tokio::select! {
            _ = self.shared.shutdown.cancelled() => None,
            result = order::run(&account, &self.spec, &self.shared.solvers, &mut published) => Some(result),
        };
        self.shared.solvers.withdraw(&self.spec.name, published).await;
        let issued = result.ok_or(Failure::Cancelled)??;
        Ok(self.accept(issued).await?)
    }

    /// Checks the new certificate, stores it, serves it.
    async fn accept(&self, issued: Issued) -> Result<Current, OrderError> {
        let detected = Instant::now();
        let name = &self.spec.name;
        let current = self.check(issued.chain_pem.as_bytes(), &issued.key_pem)?;
        if !current.covers_config {
            return Err(fail(Step::Check, format!("the issued certificate does not name every domain of {name}")));
        }
        let certs = split_pem_certificates(&issued.chain_pem);
        let stored = Stored {
            ca_pem: certs.iter().skip(1).map(String::as_str).collect::<String>().into_bytes(),
            chain_pem: issued.chain_pem.into_bytes(),
            key_pem: issued.key_pem,
        };
        // Cleared before the Kubernetes store, whose failure is shown there.
        self.shared.status.cleared(name);
        if let Err(e) = self.shared.state.save_cert(name, &stored) {
            // Served all the same: it is valid. A restart orders again.
            tracing::error!(certificate = %name, error = format!("{e:#}"), "could not store the issued certificate");
        }
        self.serve(&stored, detected)?;
        tracing::info!(
            certificate = %name,
            serial = %current.serial,
            not_after = %rfc3339(current.validity.not_after),
            "ACME certificate issued and served"
        );
        if let Some(kube) = &self.shared.kube
            && let Err(e) = tokio::time::timeout(KUBE_STORE_TIMEOUT, kube.save_cert(name, &stored, &self.spec.domains))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer from the API server within {KUBE_STORE_TIMEOUT:?}")))
        {
            // Served here all the same; other replicas keep the previous one until
            // the next issuance.
            tracing::error!(
                certificate = %name,
                step = Step::Store.as_str(),
                error = format!("{e:#}"),
                "could not store the issued certificate in its Kubernetes Secret"
            );
            self.shared.status.failed(
                name,
                format!("certificate issued and served, but not stored in Kubernetes: {}: {e:#}", Step::Store.as_str()),
            );
        }
        Ok(current)
    }

    /// The same checks the sink runs, plus the facts scheduling needs.
    fn check(&self, chain_pem: &[u8], key_pem: &KeyBytes) -> Result<Current, OrderError> {
        let material = Material::Tls { cert_chain_pem: chain_pem.to_vec(), key_pem: key_pem.clone() };
        let opts = CheckOptions { allow_expired: false, now: SystemTime::now() };
        let checked = pki::check(&self.spec.name, &material, &opts).map_err(|e| fail(Step::Check, e))?;
        let (meta, identity) = (checked.meta, checked.identity);
        let (Some(nb), Some(na)) = (meta.not_before_unix, meta.not_after_unix) else {
            return Err(fail(Step::Check, "certificate has no validity window"));
        };
        let leaf_der = CertificateDer::pem_slice_iter(chain_pem)
            .next()
            .and_then(Result::ok)
            .map(|c| c.to_vec())
            .ok_or_else(|| fail(Step::Check, "no certificate in the chain"))?;
        let sans: Vec<String> = identity.sans.iter().map(|s| normalize_domain(s)).collect();
        let covers_config = self.spec.domains.iter().all(|d| sans.contains(&normalize_domain(d)));
        Ok(Current {
            validity: Validity::from_unix(nb, na),
            leaf_der,
            serial: identity.serial.unwrap_or_default(),
            covers_config,
        })
    }

    /// `NAME` (leaf + chain) and `NAME-cacert` (the issuer chain) through the sink.
    fn serve(&self, stored: &Stored, detected: Instant) -> Result<(), OrderError> {
        let name = &self.spec.name;
        let tls = Material::Tls { cert_chain_pem: stored.chain_pem.clone(), key_pem: stored.key_pem.clone() };
        // A rejection is logged and counted by the sink.
        self.shared.sink.update(name.as_str(), &tls, detected).map_err(|e| fail(Step::Check, e))?;
        if !stored.ca_pem.is_empty() {
            let ca = Material::Validation { ca_pem: stored.ca_pem.clone(), crl_pem: None };
            let _ = self.shared.sink.update(format!("{name}-cacert"), &ca, detected);
        }
        Ok(())
    }
}

/// The PEM blocks of the certificates in `pem`, each with its END line and a newline.
pub fn split_pem_certificates(pem: &str) -> Vec<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let Some(end) = rest[start..].find(END) else { break };
        let stop = start + end + END.len();
        out.push(format!("{}\n", &rest[start..stop]));
        rest = &rest[stop..];
    }
    out
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{:.0}", unix_secs(t)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_chains_split_into_certificates() {
        let pem = "junk\n-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n\n-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----";
        let certs = split_pem_certificates(pem);
        assert_eq!(certs.len(), 2);
        assert_eq!(certs[1], "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n");
        assert!(split_pem_certificates("none").is_empty());
    }

    #[test]
    fn times_print_as_rfc3339() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(86400)), "1970-01-02T00:00:00Z");
    }
}
