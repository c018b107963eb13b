//! Prometheus metrics, one registry for the process. Labels never carry key material.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::store::Store;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabel {
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabel {
    pub source: String,
    pub reason: &'static str,
}

/// A bound of `[limits]` (or another documented limit) that was reached.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    pub limit: &'static str,
}

/// Why something was refused (authorization, TLS), as a fixed code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretLabel {
    pub secret: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcmeOrderLabel {
    pub certificate: String,
    /// `issued` or `failed`.
    pub result: &'static str,
}

/// How an OCSP fetch ended: good, revoked, invalid, error, too_large, timeout.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OcspResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabel {
    pub cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcmeCertificateLabel {
    pub certificate: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub proxies_connected: Gauge,
    pub streams_connected: Family<ProtocolLabel, Gauge>,
    pub pushes: Family<ProtocolLabel, Counter>,
    pub acks: Family<ProtocolLabel, Counter>,
    pub nacks: Family<ProtocolLabel, Counter>,
    pub updates_applied: Family<SourceLabel, Counter>,
    pub updates_rejected: Family<RejectLabel, Counter>,
    pub change_to_push: Histogram,
    /// Names the dev CA did not mint: it already serves its maximum (`dev_max_names`).
    pub dev_ca_names_refused: Counter,
    /// Rollout watches refused: the most allowed were open (`status_max_watchers`).
    pub rollout_watchers_refused: Counter,
    pub acme_orders: Family<AcmeOrderLabel, Counter>,
    pub acme_next_renewal: Family<AcmeCertificateLabel, Gauge<f64, AtomicU64>>,
    pub authz_denials: Family<ReasonLabel, Counter>,
    pub tls_handshake_failures: Family<ReasonLabel, Counter>,
    pub tls_reloads: Family<ReasonLabel, Counter>,
    pub limits_hit: Family<LimitLabel, Counter>,
    /// OCSP fetches by result (src/stapling).
    pub ocsp_fetches: Family<OcspResultLabel, Counter>,
    /// Tracked certificates whose responder says they are revoked.
    pub ocsp_revoked: Gauge,
    pub ocsp_this_update: Family<SecretLabel, Gauge<f64, AtomicU64>>,
    pub ocsp_next_update: Family<SecretLabel, Gauge<f64, AtomicU64>>,
    pub ocsp_next_refresh: Family<SecretLabel, Gauge<f64, AtomicU64>>,
    /// Expired certificates stored because nothing valid was (`allow_expired`).
    pub expired_served: Family<SourceLabel, Counter>,
    /// Session ticket key promotions this replica wrote to the shared state.
    pub ticket_key_rotations: Family<SecretLabel, Counter>,
    /// Times a session ticket state could not be read or written.
    pub ticket_state_errors: Family<SecretLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("certwire");
        let m = Self {
            proxies_connected: Gauge::default(),
            streams_connected: Family::default(),
            pushes: Family::default(),
            acks: Family::default(),
            nacks: Family::default(),
            updates_applied: Family::default(),
            updates_rejected: Family::default(),
            // 100 µs .. ~13 s: file watches are sub-millisecond, API servers are not.
            change_to_push: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 18)),
            dev_ca_names_refused: Counter::default(),
            rollout_watchers_refused: Counter::default(),
            acme_orders: Family::default(),
            acme_next_renewal: Family::default(),
            authz_denials: Family::default(),
            tls_handshake_failures: Family::default(),
            tls_reloads: Family::default(),
            limits_hit: Family::default(),
            ocsp_fetches: Family::default(),
            ocsp_revoked: Gauge::default(),
            ocsp_this_update: Family::default(),
            ocsp_next_update: Family::default(),
            ocsp_next_refresh: Family::default(),
            expired_served: Family::default(),
            ticket_key_rotations: Family::default(),
            ticket_state_errors: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "proxies_connected",
            "Distinct proxy node ids with an open stream",
            m.proxies_connected.clone(),
        );
        registry.register("streams_connected", "Open SDS streams", m.streams_connected.clone());
        registry.register("pushes", "Secret responses sent to proxies", m.pushes.clone());
        registry.register("acks", "Responses acknowledged by proxies", m.acks.clone());
        registry.register("nacks", "Responses rejected by proxies", m.nacks.clone());
        registry.register("updates_applied", "Secret updates accepted from sources", m.updates_applied.clone());
        registry.register(
            "updates_rejected",
            "Secret updates rejected by checks, by reason",
            m.updates_rejected.clone(),
        );
        registry.register(
            "change_to_push_seconds",
            "Time from a source noticing a change to the response being handed to a stream",
            m.change_to_push.clone(),
        );
        registry.register(
            "dev_ca_names_refused",
            "Names the dev CA did not mint because it already serves its maximum number of names",
            m.dev_ca_names_refused.clone(),
        );
        registry.register(
            "rollout_watchers_refused",
            "Rollout watches (certwire status --watch) refused because the most allowed were open",
            m.rollout_watchers_refused.clone(),
        );
        registry.register("acme_orders", "ACME orders by certificate and result", m.acme_orders.clone());
        registry.register(
            "acme_next_renewal_timestamp_seconds",
            "Unix time of the next ACME order (renewal or retry) per certificate",
            m.acme_next_renewal.clone(),
        );
        registry.register(
            "authz_denials",
            "Secret names refused to a stream by authorization, by reason",
            m.authz_denials.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "SDS connections closed before TLS was established, by reason",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "tls_reloads",
            "Reloads of the SDS listener's certificate and client CA (reason: loaded or the error)",
            m.tls_reloads.clone(),
        );
        registry.register(
            "limits_hit",
            "Times a bound on what peers may make certwire hold or compute was reached, by limit",
            m.limits_hit.clone(),
        );
        registry.register(
            "expired_served",
            "Expired certificates served because no valid version of the name existed (allow_expired = when-nothing-else)",
            m.expired_served.clone(),
        );
        registry.register(
            "ticket_key_rotations",
            "Session ticket keys promoted to encrypting by this replica (the fleet's rotations are the sum)",
            m.ticket_key_rotations.clone(),
        );
        registry.register(
            "ticket_state_errors",
            "Times a session ticket state could not be read or written (the last good keys stay served)",
            m.ticket_state_errors.clone(),
        );
        registry.register("ocsp_fetches", "OCSP responses fetched by certwire, by result", m.ocsp_fetches.clone());
        registry.register(
            "ocsp_revoked_certificates",
            "Served certificates whose OCSP responder says they are revoked",
            m.ocsp_revoked.clone(),
        );
        registry.register(
            "ocsp_this_update_timestamp_seconds",
            "Unix time of the thisUpdate of the OCSP staple served per secret (its age is now minus this)",
            m.ocsp_this_update.clone(),
        );
        registry.register(
            "ocsp_next_update_timestamp_seconds",
            "Unix time at which the OCSP staple served per secret goes stale and is dropped",
            m.ocsp_next_update.clone(),
        );
        registry.register(
            "ocsp_next_refresh_timestamp_seconds",
            "Unix time of the next OCSP fetch (refresh or retry) per secret",
            m.ocsp_next_refresh.clone(),
        );
        Self { registry, ..m }
    }

    /// Like [`Metrics::new`], with what the store holds read from it at each scrape.
    pub fn with_store(store: Arc<Store>) -> Self {
        let mut m = Self::new();
        m.registry.register_collector(Box::new(FromStore(store)));
        m
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encoding to a String cannot fail");
        out
    }
}

/// `secrets_served` and `secret_expiry_timestamp_seconds`, read from the store when
/// scraped: they cannot drift from what is served, whichever path changed it, and a gauge
/// per secret kept up to date by every source would cost a label and a map entry per
/// stored secret.
struct FromStore(Arc<Store>);

impl std::fmt::Debug for FromStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FromStore")
    }
}

impl Collector for FromStore {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let served =
            encoder.encode_descriptor("secrets_served", "Secrets currently served", None, MetricType::Gauge)?;
        ConstGauge::new(self.0.served_count() as i64).encode(served)?;
        let mut placeholders = encoder.encode_descriptor(
            "placeholders_served",
            "Names served the placeholder certificate instead of their secret, by cause (invalid or deleted)",
            None,
            MetricType::Gauge,
        )?;
        for (cause, count) in self.0.placeholders() {
            ConstGauge::new(count as i64).encode(placeholders.encode_family(&CauseLabel { cause: cause.as_str() })?)?;
        }
        let expiries = self.0.expiries();
        if expiries.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "secret_expiry_timestamp_seconds",
            "Unix time at which the served certificate (or CA bundle) expires first",
            None,
            MetricType::Gauge,
        )?;
        for (secret, not_after) in expiries {
            ConstGauge::new(not_after as f64).encode(family.encode_family(&SecretLabel { secret })?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::pki::{CertIdentity, Checked, KeyBytes, SecretKind, SecretMeta};

    fn expiring(not_after_unix: Option<i64>) -> Checked {
        Checked {
            kind: SecretKind::TlsCertificate,
            resource: KeyBytes::new(format!("{not_after_unix:?}").into_bytes()),
            meta: SecretMeta { not_after_unix, ..SecretMeta::default() },
            identity: CertIdentity::default(),
        }
    }

    #[test]
    fn served_and_expiry_follow_the_store() {
        let store = Arc::new(Store::new());
        let metrics = Metrics::with_store(store.clone());
        let text = metrics.encode();
        assert!(!text.contains("secret_expiry"), "no family without secrets");
        assert!(text.contains("certwire_secrets_served 0\n"), "{text}");

        let (rank, source) = store.register_source("files:/a");
        store.upsert(rank, &source, "web", expiring(Some(1_800_000_000)), Instant::now());
        store.upsert(rank, &source, "token", expiring(None), Instant::now());
        let text = metrics.encode();
        assert!(text.contains("# TYPE certwire_secret_expiry_timestamp_seconds gauge"), "{text}");
        assert!(text.contains("certwire_secret_expiry_timestamp_seconds{secret=\"web\"} 1800000000.0"), "{text}");
        assert!(!text.contains("secret=\"token\""), "nothing that does not expire: {text}");
        assert!(text.contains("certwire_secrets_served 2\n"), "{text}");

        store.remove(rank, "web");
        let text = metrics.encode();
        assert!(!text.contains("secret=\"web\""));
        assert!(text.contains("certwire_secrets_served 1\n"), "{text}");
    }
}
