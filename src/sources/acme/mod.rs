//! ACME source: certwire orders and renews its own certificates (RFC 8555, through
//! instant-acme) and serves each one by its configured name, its issuer chain as
//! `NAME-cacert`, like any other secret: checked first, the last good one kept.
//!
//! - `config`: the `[acme]` table and its checks;
//! - `account`: the account (created once, stored 0600) and the HTTP client;
//! - `order`: one order, start to finish; `challenge/`: http-01, dns-01, tls-alpn-01;
//! - `dns/`: the DNS provider trait, RFC 2136 with TSIG, direct DNS queries;
//! - `schedule`: when to order, a pure function returning a `Plan`;
//! - `backoff`: retry delays after failures, and their record kept across restarts;
//! - `renew`: the control loop of one certificate; `issue`: one issuance;
//! - `serving`: the checks of a certificate and serving it through the intake;
//! - `persist`: the certificate and the backoff in the state directory and Kubernetes;
//! - `state_dir`: the state directory in the file-source layout;
//! - `kube_secrets`: the account, the backoff and the certificates as Kubernetes Secrets;
//! - `lease`: leader election over a Kubernetes Lease (only the holder orders);
//! - `follower`: a replica without the Lease serves what the holder stores.

pub mod account;
pub mod backoff;
pub mod challenge;
pub mod config;
pub mod dns;
#[cfg(test)]
mod fake_kube;
pub mod follower;
pub mod issue;
pub mod kube_secrets;
pub mod lease;
pub mod order;
pub mod persist;
pub mod renew;
pub mod schedule;
pub mod serving;
pub mod state_dir;

use std::sync::Arc;

use crate::shutdown::Shutdown;
use anyhow::Context;
use tokio::sync::Semaphore;

pub use config::AcmeConfig;
use config::{ChallengeKind, normalize_domain, read_secret};
use dns::DnsProvider;

use crate::health::Health;
use crate::ingest::Intake;
use crate::metrics::Metrics;

/// Orders in flight at once across all certificates.
const CONCURRENT_ORDERS: usize = 4;

/// Checks the config, opens the state directory, binds the challenge responders
/// (a taken port fails the start) and starts one task per certificate, plus the Lease
/// election when configured. Each task serves its stored certificate at once; CA
/// trouble never fails the start, it shows in logs, metrics and status. The handles
/// returned are the tasks whose shutdown does cleanup (withdrawing published
/// challenge answers, releasing the Lease): the drain awaits them.
pub async fn start(
    config: AcmeConfig,
    intake: Intake,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: Shutdown,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    config.validate()?;
    // The Kubernetes client is built without asking the API server anything: an
    // unreachable one shows in logs and the state directory is used meanwhile.
    let client = match &config.kubernetes_secret_namespace {
        Some(_) => Some(
            crate::kube_client::connect(config.kubeconfig.as_ref()).await.context("acme: Kubernetes store")?.client,
        ),
        None => None,
    };
    start_with_client(config, client, intake, metrics, health, shutdown).await
}

/// [`start`] with the Kubernetes client given (tests pass one on a fake API server).
pub async fn start_with_client(
    config: AcmeConfig,
    client: Option<kube::Client>,
    intake: Intake,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: Shutdown,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    config.validate()?;
    let state = state_dir::StateDir::open(&config.state_dir)?;
    let kube = match (&client, &config.kubernetes_secret_namespace) {
        (Some(client), Some(ns)) => Some(kube_secrets::KubeSecrets::new(client.clone(), ns, config.account_secret())),
        _ => None,
    };
    let mut handles = Vec::new();
    let leader = match (&client, &config.lease, &config.kubernetes_secret_namespace) {
        (Some(client), Some(lease), Some(ns)) => {
            let namespace = lease.namespace.as_deref().unwrap_or(ns);
            let duration = lease.duration.unwrap_or(config::DEFAULT_LEASE_DURATION);
            let election = lease::start(client.clone(), namespace, &lease.name, duration, shutdown.clone());
            // Kept for the drain: dropped, the release on SIGTERM would be lost.
            handles.push(election.task);
            Some(election.leadership)
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

    let ctx = Arc::new(renew::TaskContext {
        intake,
        metrics,
        health,
        accounts,
        solvers,
        persist: persist::Persist { state, kube },
        retry: backoff::RetryPolicy {
            base: config.retry_base.unwrap_or(config::DEFAULT_RETRY_BASE),
            max: config.retry_max.unwrap_or(config::DEFAULT_RETRY_MAX),
        },
        orders: Semaphore::new(CONCURRENT_ORDERS),
        shutdown,
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
    handles.extend(config.certificates.into_iter().map(|spec| tokio::spawn(renew::Task::new(ctx.clone(), spec).run())));
    Ok(handles)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::Method;

    use super::*;
    use crate::sources::acme::fake_kube::{Action, FakeApi, lease_path};
    use crate::store::Store;

    fn config(state_dir: &std::path::Path) -> AcmeConfig {
        with_lease(state_dir, true)
    }

    fn with_lease(state_dir: &std::path::Path, lease: bool) -> AcmeConfig {
        // A CA that refuses connections: orders fail, which does not matter here.
        let text = format!(
            r#"directory = "http://127.0.0.1:9/directory"
insecure_http_directory = true
state_dir = "{}"
retry_base = "1m"
kubernetes_secret_namespace = "acme"
{}
[[rfc2136]]
server = "127.0.0.1:9"
zone = "example.test"
tsig_key_name = "certwire"
tsig_secret = "c2VjcmV0IHRoYXQgaXMgbG9uZyBlbm91Z2ggZm9yIHRzaWc="
[[certificates]]
name = "web"
domains = ["web.example.test"]
challenge = "dns-01"
"#,
            state_dir.display(),
            if lease { r#"lease = { name = "certwire-acme", duration = "10s" }"# } else { "" }
        );
        toml::from_str(&text).unwrap()
    }

    /// The issue 13 case: the Lease task's handle was dropped, so the drain never
    /// waited for the release on SIGTERM.
    #[tokio::test(start_paused = true)]
    async fn acme_lease_release_is_awaited_by_the_drain() {
        let tmp = tempfile::tempdir().unwrap();
        let api = FakeApi::default();
        let store = Arc::new(Store::new());
        let metrics = Arc::new(Metrics::default());
        let intake = Intake::new(store, metrics.clone(), "acme", crate::policy::AllowExpired::Never);
        let shutdown = Shutdown::new();
        let health = Arc::new(Health::default());
        let handles =
            start_with_client(config(tmp.path()), Some(api.client()), intake, metrics, health, shutdown.clone())
                .await
                .unwrap();
        let lease = lease_path("acme", "certwire-acme");
        while api.get(&lease).is_none_or(|l| l["spec"]["holderIdentity"].is_null()) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The release takes a moment, as a real API server's round trip does.
        api.fault(Method::PUT, "/leases/", Action::Delay(Duration::from_millis(500)), usize::MAX);
        shutdown.trigger();
        for handle in handles {
            tokio::time::timeout(Duration::from_secs(5), handle).await.expect("drained in time").unwrap();
        }
        assert!(api.get(&lease).unwrap()["spec"]["holderIdentity"].is_null(), "released before the drain ended");
    }

    fn failed_orders(metrics: &Metrics) -> u64 {
        let label = crate::metrics::AcmeOrderLabel { certificate: "web".into(), result: "failed" };
        metrics.acme_orders.get_or_create(&label).get()
    }

    /// The issue 13 case: a crash-looping certwire sent the CA one failing order per
    /// start; the backoff now outlives the process.
    #[tokio::test(start_paused = true)]
    async fn acme_restart_keeps_the_backoff_instead_of_ordering_again() {
        let tmp = tempfile::tempdir().unwrap();
        let api = FakeApi::default();
        let run = |api: &FakeApi| {
            let store = Arc::new(Store::new());
            let metrics = Arc::new(Metrics::default());
            let intake = Intake::new(store.clone(), metrics.clone(), "acme", crate::policy::AllowExpired::Never);
            let shutdown = Shutdown::new();
            let config = with_lease(tmp.path(), false);
            let started = start_with_client(
                config,
                Some(api.client()),
                intake,
                metrics.clone(),
                Default::default(),
                shutdown.clone(),
            );
            (store, metrics, shutdown, started)
        };
        let (_, metrics, shutdown, started) = run(&api);
        let handles = started.await.unwrap();
        while failed_orders(&metrics) == 0 || !tmp.path().join(".backoff/web.json").exists() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        shutdown.trigger();
        for handle in handles {
            handle.await.unwrap();
        }

        // Restarted (retry_base 1m): no order for the next 20 s, and status says why.
        let (store, metrics, shutdown, started) = run(&api);
        let handles = started.await.unwrap();
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(failed_orders(&metrics), 0, "a restart ordered again at once");
        let status = store.status().into_iter().find(|s| s.name == "web").expect("web in status");
        let error = status.last_error.unwrap_or_default();
        assert!(error.contains("ACME order failed at account") && error.contains("failure 1, next try in"), "{error}");
        assert!(error.split("next try in ").nth(1).is_some_and(|t| !t.contains('.')), "whole seconds: {error}");
        shutdown.trigger();
        for handle in handles {
            handle.await.unwrap();
        }
    }
}
