//! The embedded default: an in-memory dev CA that mints a short-lived certificate for any
//! name a proxy asks for (`NAME-cacert` gets the CA bundle) and re-mints all of them on an
//! interval, so hot rotation can be tried with nothing but certwire and Envoy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::shutdown::Shutdown;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::{Instant, MissedTickBehavior};

use crate::ingest::Intake;
use crate::metrics::Metrics;
use crate::pki::{KeyBytes, Material};

/// Clock skew allowance for freshly minted certificates.
const BACKDATE: Duration = Duration::from_secs(60);

pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    lifetime: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("dev CA: {0}")]
pub struct DevError(#[from] rcgen::Error);

impl DevCa {
    pub fn new(lifetime: Duration) -> Result<Self, DevError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "certwire dev CA");
        dn.push(DnType::OrganizationName, "certwire (development only)");
        params.distinguished_name = dn;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::from_secs(365 * 24 * 3600);
        let ca_pem = params.self_signed(&key)?.pem();
        Ok(Self { issuer: Issuer::new(params, key), ca_pem, lifetime })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// What the dev CA serves for `name`.
    pub fn material(&self, name: &str) -> Result<Material, DevError> {
        if name.ends_with("-cacert") {
            return Ok(Material::Validation { ca_pem: self.ca_pem.clone().into_bytes(), crl_pem: None });
        }
        let key = KeyPair::generate()?;
        let host = host_part(name);
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::DnsName(host.try_into()?)];
        if host != "localhost" {
            params.subject_alt_names.push(SanType::DnsName("localhost".try_into()?));
        }
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, host);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + self.lifetime;
        let cert = params.signed_by(&key, &self.issuer)?;
        let chain = format!("{}{}", cert.pem(), self.ca_pem);
        Ok(Material::Tls {
            cert_chain_pem: chain.into_bytes(),
            key_pem: KeyBytes::new(key.serialize_pem().into_bytes()),
            ocsp_staple: None,
        })
    }
}

/// The DNS name to put in the certificate: `kubernetes://ns/web-tls` -> `web-tls`; names
/// that are not hostnames fall back to `localhost`.
fn host_part(name: &str) -> &str {
    let last = name.rsplit('/').next().unwrap_or(name);
    let ok = !last.is_empty()
        && last.len() <= 253
        && last.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '*')
        && !last.starts_with('-');
    if ok { last } else { "localhost" }
}

/// Default of how long the dev CA keeps minting a name nobody subscribes to any more.
pub const FORGET_AFTER: Duration = Duration::from_secs(10 * 60);

/// Default of the most names the dev CA mints at once.
pub const MAX_NAMES: usize = 1_000;

/// How the dev CA runs.
#[derive(Debug, Clone)]
pub struct DevSettings {
    /// Every certificate is minted again this often.
    pub rotate_every: Duration,
    /// A name nobody subscribes to is withdrawn after this long (checked every quarter of
    /// it, so between this and 1.5 times this after its last subscriber went).
    pub forget_after: Duration,
    /// The most names minted at once; further names wait, unanswered, for a place.
    pub max_names: usize,
}

impl DevSettings {
    pub fn new(rotate_every: Duration) -> Self {
        Self { rotate_every, forget_after: FORGET_AFTER, max_names: MAX_NAMES }
    }
}

/// Runs the dev source with the default [`DevSettings`] and its own metrics (refusals
/// are logged but not exported): [`start_with`] is the full form.
pub fn start(
    intake: Intake,
    rotate_every: Duration,
    shutdown: Shutdown,
) -> Result<tokio::task::JoinHandle<()>, DevError> {
    start_with(intake, DevSettings::new(rotate_every), Arc::new(Metrics::new()), shutdown)
}

/// Runs the dev source until `shutdown`: mints on demand, re-mints on `rotate_every`,
/// withdraws names nobody subscribes to after `forget_after`, and mints at most
/// `max_names` (counted in `dev_ca_names_refused_total` beyond).
pub fn start_with(
    intake: Intake,
    settings: DevSettings,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) -> Result<tokio::task::JoinHandle<()>, DevError> {
    // The certificate outlives two rotations so a slow proxy never holds an expired one.
    let ca = DevCa::new(settings.rotate_every * 2 + BACKDATE)?;
    let mut demand = intake.store().demand();
    let handle = tokio::spawn(async move {
        let mut dev = Minted { ca, intake, metrics, settings, names: HashMap::new(), waiting: false, told: false };
        let rotate_every = dev.settings.rotate_every;
        let mut rotate = tokio::time::interval_at(Instant::now() + rotate_every, rotate_every);
        let sweep_every = (dev.settings.forget_after / 4).max(Duration::from_secs(1));
        let mut sweep = tokio::time::interval_at(Instant::now() + sweep_every, sweep_every);
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        dev.mint_wanted();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                wanted = demand.recv() => match wanted {
                    Ok(name) => dev.demanded(name),
                    Err(RecvError::Lagged(_)) => dev.mint_wanted(),
                    Err(RecvError::Closed) => break,
                },
                _ = rotate.tick() => dev.rotate(),
                _ = sweep.tick() => dev.sweep(),
            }
        }
    });
    Ok(handle)
}

/// What the dev CA serves: per name, since when nobody subscribes to it (None: someone
/// does, as of the last sweep).
struct Minted {
    ca: DevCa,
    intake: Intake,
    metrics: Arc<Metrics>,
    settings: DevSettings,
    names: HashMap<String, Option<Instant>>,
    /// A name was refused for want of a place: the next sweep that frees one looks for it.
    waiting: bool,
    /// The limit was logged (once).
    told: bool,
}

impl Minted {
    fn demanded(&mut self, name: String) {
        if self.names.contains_key(&name) {
            return;
        }
        if self.names.len() >= self.settings.max_names {
            self.refuse(&name);
            return;
        }
        mint(&self.ca, &self.intake, &name);
        self.names.insert(name, None);
    }

    fn refuse(&mut self, name: &str) {
        self.metrics.dev_ca_names_refused.inc();
        self.waiting = true;
        if !self.told {
            self.told = true;
            tracing::warn!(
                max_names = self.settings.max_names,
                secret = name,
                "dev CA serves its maximum number of names: further names are not minted until one \
                 nobody subscribes to is forgotten (refusals counted in certwire_dev_ca_names_refused_total; \
                 logged once)"
            );
        } else {
            tracing::debug!(secret = name, "dev CA at its maximum number of names: not minted");
        }
    }

    /// Every name some stream waits for and no source serves, up to the limit.
    fn mint_wanted(&mut self) {
        self.waiting = false;
        for name in self.intake.store().wanted_unserved() {
            if self.names.contains_key(&name) {
                // Known but not in the store (withdrawn meanwhile): mint it again.
                mint(&self.ca, &self.intake, &name);
            } else {
                self.demanded(name);
            }
        }
    }

    fn rotate(&mut self) {
        tracing::info!(secrets = self.names.len(), "dev CA rotating all certificates");
        for name in self.names.keys() {
            mint(&self.ca, &self.intake, name);
        }
    }

    /// Withdraws the names nobody subscribed to for `forget_after`.
    fn sweep(&mut self) {
        let now = Instant::now();
        let store = self.intake.store().clone();
        let mut forget = Vec::new();
        for (name, idle_since) in &mut self.names {
            if store.subscribers(name) > 0 {
                *idle_since = None;
            } else {
                let since = *idle_since.get_or_insert(now);
                if now.duration_since(since) >= self.settings.forget_after {
                    forget.push(name.clone());
                }
            }
        }
        for name in &forget {
            self.names.remove(name);
            self.intake.remove(name);
            // A stream that subscribed just before the removal has been told the name is
            // gone and announces no demand: mint it again. One that subscribes after it
            // announces demand, and `purge` keeps the entry it waits on.
            if store.subscribers(name) > 0 {
                self.demanded(name.clone());
            } else {
                store.purge(name);
            }
        }
        if !forget.is_empty() {
            tracing::info!(
                forgotten = forget.len(),
                secrets = self.names.len(),
                "dev CA withdrew names nobody subscribes to"
            );
            if self.waiting {
                self.mint_wanted();
            }
        }
    }
}

fn mint(ca: &DevCa, intake: &Intake, name: &str) {
    let detected = std::time::Instant::now();
    match ca.material(name) {
        // Rejections are logged and counted by the intake.
        Ok(material) => {
            let _ = intake.update(name, &material, detected);
        }
        Err(err) => tracing::error!(secret = name, error = %err, "dev CA could not mint a certificate"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{CheckOptions, check};

    #[test]
    fn minted_material_passes_the_checks() {
        let ca = DevCa::new(Duration::from_secs(600)).unwrap();
        for name in ["web", "kubernetes://default/web-tls", "weird name!"] {
            let m = ca.material(name).unwrap();
            let checked = check(name, &m, &CheckOptions::default()).unwrap();
            assert_eq!(checked.meta.certificates, 2, "{name}: leaf + CA");
        }
        let checked = check("web-cacert", &ca.material("web-cacert").unwrap(), &CheckOptions::default()).unwrap();
        assert_eq!(checked.kind, crate::pki::SecretKind::ValidationContext);
    }

    #[test]
    fn host_part_extracts_a_hostname() {
        assert_eq!(host_part("kubernetes://ns/web-tls"), "web-tls");
        assert_eq!(host_part("example.com"), "example.com");
        assert_eq!(host_part("has space"), "localhost");
    }
}

#[cfg(test)]
mod lifecycle_tests {
    use super::*;
    use crate::store::Store;

    fn dev_sink() -> (Arc<Store>, Arc<Metrics>, Intake) {
        let store = Arc::new(Store::new());
        let metrics = Arc::new(Metrics::new());
        let intake = Intake::new(store.clone(), metrics.clone(), "dev", crate::policy::AllowExpired::Never);
        (store, metrics, intake)
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..1000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never: {what}");
    }

    fn listed(store: &Store, name: &str) -> bool {
        store.status().iter().any(|s| s.name == name)
    }

    #[tokio::test(start_paused = true)]
    async fn names_nobody_subscribes_to_are_withdrawn_after_the_grace_period() {
        let (store, _, intake) = dev_sink();
        let shutdown = Shutdown::new();
        let _kept = store.subscribe("kept");
        let dropped = store.subscribe("dropped");
        start(intake, Duration::from_secs(300), shutdown.clone()).unwrap();
        until("both minted", || store.get("kept").is_some() && store.get("dropped").is_some()).await;

        drop(dropped);
        store.release("dropped");
        tokio::time::sleep(FORGET_AFTER - Duration::from_secs(60)).await;
        assert!(store.get("dropped").is_some(), "kept during the grace period");
        // Checked every quarter of the period: gone by 1.5 times it.
        tokio::time::sleep(FORGET_AFTER / 2 + Duration::from_secs(61)).await;
        assert!(store.get("dropped").is_none(), "withdrawn once nobody subscribed for the grace period");
        assert!(!listed(&store, "dropped"), "and not kept as a deleted entry either");
        assert!(store.get("kept").is_some(), "a subscribed name stays");

        // Asked for again, it is minted again.
        let _again = store.subscribe("dropped");
        until("minted again", || store.get("dropped").is_some()).await;
        shutdown.trigger();
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_max_names_are_minted_by_default() {
        let (store, _, intake) = dev_sink();
        let shutdown = Shutdown::new();
        start(intake, Duration::from_secs(300), shutdown.clone()).unwrap();
        // CA bundles: no key to generate, so a thousand are quick.
        let subs: Vec<_> = (0..=MAX_NAMES).map(|i| store.subscribe(&format!("n{i}-cacert"))).collect();
        until("the first thousand minted", || store.served_count() >= MAX_NAMES).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(store.served_count(), MAX_NAMES, "one name over the limit is not minted");
        drop(subs);
        shutdown.trigger();
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_name_is_counted_and_minted_once_a_place_is_free() {
        let (store, metrics, intake) = dev_sink();
        let shutdown = Shutdown::new();
        let settings =
            DevSettings { rotate_every: Duration::from_secs(300), forget_after: Duration::from_secs(60), max_names: 2 };
        start_with(intake, settings, metrics.clone(), shutdown.clone()).unwrap();
        let a = store.subscribe("a-cacert");
        let _b = store.subscribe("b-cacert");
        until("a and b minted", || store.served_count() == 2).await;
        let _c = store.subscribe("c-cacert");
        until("c refused", || metrics.dev_ca_names_refused.get() == 1).await;
        assert!(store.get("c-cacert").is_none());
        assert!(metrics.encode().contains("certwire_dev_ca_names_refused_total 1\n"));

        drop(a);
        store.release("a-cacert");
        tokio::time::sleep(Duration::from_secs(91)).await;
        assert!(store.get("a-cacert").is_none() && !listed(&store, "a-cacert"), "a withdrawn");
        assert!(store.get("c-cacert").is_some(), "c minted in a's place");
        assert_eq!(store.served_count(), 2);
        shutdown.trigger();
    }
}
