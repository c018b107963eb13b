//! Prometheus metrics, one registry for the process. Labels never carry key material.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabel {
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabel {
    pub source: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretLabel {
    pub secret: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcmeOrderLabel {
    pub certificate: String,
    /// `issued` or `failed`.
    pub result: &'static str,
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
    pub secrets_served: Gauge,
    pub secret_expiry: Family<SecretLabel, Gauge<f64, AtomicU64>>,
    pub change_to_push: Histogram,
    pub acme_orders: Family<AcmeOrderLabel, Counter>,
    pub acme_next_renewal: Family<AcmeCertificateLabel, Gauge<f64, AtomicU64>>,
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
            secrets_served: Gauge::default(),
            secret_expiry: Family::default(),
            // 100 µs .. ~13 s: file watches are sub-millisecond, API servers are not.
            change_to_push: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 18)),
            acme_orders: Family::default(),
            acme_next_renewal: Family::default(),
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
        registry.register("secrets_served", "Secrets currently served", m.secrets_served.clone());
        registry.register(
            "secret_expiry_timestamp_seconds",
            "Unix time at which the served certificate (or CA bundle) expires first",
            m.secret_expiry.clone(),
        );
        registry.register(
            "change_to_push_seconds",
            "Time from a source noticing a change to the response being handed to a stream",
            m.change_to_push.clone(),
        );
        registry.register("acme_orders", "ACME orders by certificate and result", m.acme_orders.clone());
        registry.register(
            "acme_next_renewal_timestamp_seconds",
            "Unix time of the next ACME order (renewal or retry) per certificate",
            m.acme_next_renewal.clone(),
        );
        Self { registry, ..m }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encoding to a String cannot fail");
        out
    }
}
