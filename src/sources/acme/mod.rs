//! ACME source: certwire orders and renews its own certificates (RFC 8555, through
//! instant-acme) and serves each one by its configured name, its issuer chain as
//! `NAME-cacert`, like any other secret: checked first, the last good one kept.
//!
//! - `config`: the `[acme]` table and its checks;
//! - `account`: the account (created once, stored 0600) and the HTTP client;
//! - `order`: one order, start to finish; `challenge/`: http-01, dns-01, tls-alpn-01;
//! - `dns/`: the DNS provider trait, RFC 2136 with TSIG, direct DNS queries;
//! - `schedule`: when to renew and to retry; `renew`: the task per certificate;
//! - `store`: the state directory in the file-source layout;
//! - `k8s_store`: the account and the certificates as Kubernetes Secrets;
//! - `lease`: leader election over a Kubernetes Lease (only the holder orders).

pub mod account;
pub mod challenge;
pub mod config;
pub mod dns;
pub mod k8s_store;
pub mod lease;
pub mod order;
pub mod renew;
pub mod schedule;
pub mod store;

use std::sync::Arc;

use anyhow::Context;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use config::AcmeConfig;
use config::{ChallengeKind, normalize_domain, read_secret};
use dns::DnsProvider;

use crate::health::Health;
use crate::ingest::Sink;
use crate::metrics::Metrics;

/// Orders in flight at once across all certificates.
const CONCURRENT_ORDERS: usize = 4;

/// Checks the config, opens the state directory, binds the challenge responders
/// (a taken port fails the start) and starts one task per certificate. Each serves
/// its stored certificate at once; CA trouble never fails the start, it shows in
/// logs, metrics and status.
pub async fn start(
    config: AcmeConfig,
    sink: Sink,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    config.validate()?;
    let state = store::StateDir::open(&config.state_dir)?;
    // The Kubernetes client is built without asking the API server anything: an
    // unreachable one shows in logs and the state directory is used meanwhile.
    let client = match &config.kubernetes_secret_namespace {
        Some(_) => Some(k8s_store::client(config.kubeconfig.as_ref()).await.context("acme: Kubernetes store")?),
        None => None,
    };
    let kube = match (&client, &config.kubernetes_secret_namespace) {
        (Some(client), Some(ns)) => Some(k8s_store::KubeStore::new(client.clone(), ns, config.account_secret())),
        _ => None,
    };
    let leader = match (&client, &config.lease, &config.kubernetes_secret_namespace) {
        (Some(client), Some(lease), Some(ns)) => {
            let namespace = lease.namespace.as_deref().unwrap_or(ns);
            let duration = lease.duration.unwrap_or(config::DEFAULT_LEASE_DURATION);
            let (leader, _task) = lease::start(client.clone(), namespace, &lease.name, duration, shutdown.clone());
            Some(leader)
        }
        _ => None,
    };
    let accounts = Arc::new(account::Accounts::new(&config, state.clone(), kube.clone())?);

    let mut dns: Vec<(String, Arc<dyn DnsProvider>)> = Vec::new();
    for (i, r) in config.rfc2136.iter().enumerate() {
        let secret = read_secret(r.tsig_secret.as_ref(), r.tsig_secret_file.as_deref())
            .with_context(|| format!("acme.rfc2136[{i}] (zone {})", r.zone))?;
        let provider = dns::rfc2136::Rfc2136::new(r.server, &r.zone, &r.tsig_key_name, &r.tsig_algorithm, &secret)
            .with_context(|| format!("acme.rfc2136[{i}] (zone {})", r.zone))?;
        dns.push((normalize_domain(&r.zone), Arc::new(provider)));
    }

    let http01 = if config.uses(ChallengeKind::Http01) {
        let addr = config.http01_listen.unwrap_or_else(|| config::DEFAULT_HTTP01_LISTEN.parse().expect("default"));
        let responder = Arc::new(challenge::http01::Http01::default());
        responder.clone().serve(addr, shutdown.clone()).await?;
        Some(responder)
    } else {
        None
    };
    let tls_alpn01 = if config.uses(ChallengeKind::TlsAlpn01) {
        let addr =
            config.tls_alpn01_listen.unwrap_or_else(|| config::DEFAULT_TLS_ALPN01_LISTEN.parse().expect("default"));
        let responder = Arc::new(challenge::tlsalpn01::TlsAlpn01::default());
        responder.clone().serve(addr, shutdown.clone()).await?;
        Some(responder)
    } else {
        None
    };
    let solvers = Arc::new(challenge::Solvers {
        http01,
        tls_alpn01,
        dns,
        dns_propagation_timeout: config.dns_propagation_timeout.unwrap_or(config::DEFAULT_PROPAGATION_TIMEOUT),
    });

    // A second, status-only registration under the same source name: order failures
    // are recorded there as the certificate's last_error.
    let (rank, source) = sink.store().register_source(sink.source());
    let status = renew::OrderStatus { store: sink.store().clone(), rank, source };
    let shared = Arc::new(renew::Shared {
        sink,
        metrics,
        health,
        accounts,
        solvers,
        state,
        status,
        retry_base: config.retry_base.unwrap_or(config::DEFAULT_RETRY_BASE),
        retry_max: config.retry_max.unwrap_or(config::DEFAULT_RETRY_MAX),
        orders: Semaphore::new(CONCURRENT_ORDERS),
        shutdown,
        kube,
        leader,
    });
    tracing::info!(
        directory = %config.directory,
        certificates = config.certificates.len(),
        state_dir = %config.state_dir.display(),
        kubernetes_secret_namespace = config.kubernetes_secret_namespace.as_deref().unwrap_or("-"),
        lease = config.lease.as_ref().map(|l| l.name.as_str()).unwrap_or("-"),
        "ACME source started"
    );
    Ok(config.certificates.into_iter().map(|spec| tokio::spawn(renew::Task::new(shared.clone(), spec).run())).collect())
}
