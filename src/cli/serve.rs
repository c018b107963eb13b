//! `certwire serve`: wires sources -> ingest -> store -> SDS listeners, plus admin.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tokio::task::JoinSet;

use crate::admin::Admin;
use crate::authz::review::{KubeReviewer, Reviews};
use crate::authz::{Authorizer, Mode};
use crate::config::Settings;
use crate::health::Health;
use crate::ingest::Intake;
use crate::logging;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::sources;
use crate::store::Store;
use crate::xds::listen::ListenAddr;
use crate::xds::proxies::Proxies;
use crate::xds::{ServerState, listen};

pub async fn run(settings: Settings) -> anyhow::Result<ExitCode> {
    logging::init(settings.log_format);

    let store = Arc::new(Store::with_policy(settings.policy));
    let metrics = Arc::new(Metrics::with_store(store.clone()));
    let health = Arc::new(Health::default());
    let proxies = Arc::new(Proxies::new(metrics.clone()).with_max_rollout_watchers(settings.status_max_watchers));
    let stop = Shutdown::new();
    let shutdown = stop.clone();

    if let Some(path) = &settings.ready_file {
        super::ready_file::clear(path)?;
    }
    // Bind everything first: a taken port fails the start with a clear message.
    let mut bound = Vec::new();
    for addr in &settings.listen {
        bound.push((addr.clone(), listen::bind(addr, settings.unix_socket).await?));
    }
    let admin_listener = crate::admin::bind(settings.admin).await?;
    let status_listener = match settings.status_addr {
        Some(addr) => Some(crate::admin::bind(addr).await?),
        None => None,
    };
    let ready = super::ready_file::Ready {
        pid: std::process::id(),
        sds: bound.iter().map(|(_, b)| b.local_addr().to_string()).collect(),
        admin: local_addr(&admin_listener),
        status: status_listener.as_ref().map(local_addr),
    };
    let admin = Admin {
        store: store.clone(),
        proxies: proxies.clone(),
        metrics: metrics.clone(),
        health: health.clone(),
        shutdown: shutdown.clone(),
    };
    let mut tasks = JoinSet::new();
    tasks.spawn(async move { admin.serve(admin_listener, status_listener).await });

    // `[ocsp]`: one stapler shared by every source's intake, only when asked for.
    let stapler =
        settings.ocsp.enabled().then(|| crate::stapling::Stapler::new(settings.ocsp.clone(), metrics.clone()));
    // Sources in precedence order: the first registered wins a name. `[[tickets]]` first:
    // keys the operator configured are never replaced by a Secret or a files directory
    // of the same name (its start stays below, after the others).
    let tickets_intake = (!settings.tickets.is_empty())
        .then(|| Intake::new(store.clone(), metrics.clone(), "tickets", settings.allow_expired));
    for root in &settings.files {
        let name = format!("files:{}", root.display());
        health.not_ready(&name, "initial load");
        let intake =
            Intake::new(store.clone(), metrics.clone(), &name, settings.allow_expired).with_stapler(stapler.clone());
        let options = sources::files::Options {
            rescan: settings.files_rescan_every,
            max_file_bytes: settings.files_max_file_bytes,
            ..Default::default()
        };
        sources::files::start_with(root.clone(), intake, shutdown.clone(), options)
            .await
            .with_context(|| format!("starting file source {}", root.display()))?;
        health.ready(&name);
    }
    if let Some(options) = settings.kubernetes.clone() {
        let intake = Intake::new(store.clone(), metrics.clone(), "kubernetes", settings.allow_expired)
            .with_stapler(stapler.clone());
        sources::kubernetes::start(options, intake, health.clone(), shutdown.clone())
            .await
            .context("starting the Kubernetes source")?;
    }
    // `[kubernetes] gateway_api`: ReferenceGrants decide cross-namespace Gateway API
    // names; with `open` authorization nothing is decided, so nothing is watched.
    let gateway_api = settings.kubernetes.as_ref().is_some_and(|k| k.gateway_api);
    let reference_grants = match settings.kubernetes.as_ref() {
        Some(options) if gateway_api && settings.authz.mode != Mode::Open => {
            let grants = crate::authz::gateway::ReferenceGrants::new();
            sources::kubernetes::gateway::start(options, grants.clone(), health.clone(), shutdown.clone())
                .await
                .context("watching ReferenceGrants")?;
            Some(grants)
        }
        _ => None,
    };
    // Source tasks whose shutdown does cleanup (ACME removes published challenge answers
    // and releases its Lease): drained with the servers on SIGTERM.
    let mut background = Vec::new();
    if let Some(acme) = settings.acme.clone() {
        let intake =
            Intake::new(store.clone(), metrics.clone(), "acme", settings.allow_expired).with_stapler(stapler.clone());
        background.extend(
            sources::acme::start(acme, intake, metrics.clone(), health.clone(), shutdown.clone())
                .await
                .context("starting the ACME source")?,
        );
    }
    if let Some(upstream) = settings.upstream.clone() {
        let intake = Intake::new(store.clone(), metrics.clone(), "upstream", settings.allow_expired)
            .with_stapler(stapler.clone());
        sources::upstream::start(upstream, intake, metrics.clone(), health.clone(), shutdown.clone())
            .context("starting the upstream source")?;
    }
    if let Some(intake) = tickets_intake {
        let kubeconfig = settings.authz.kubeconfig.clone();
        sources::tickets::start(settings.tickets.clone(), intake, metrics.clone(), kubeconfig, shutdown.clone())
            .await
            .context("starting the session ticket keys source")?;
    }
    if settings.dev {
        let intake =
            Intake::new(store.clone(), metrics.clone(), "dev", settings.allow_expired).with_stapler(stapler.clone());
        let dev = sources::dev::DevSettings {
            rotate_every: settings.dev_rotate_every,
            forget_after: settings.dev_forget_after,
            max_names: settings.dev_max_names,
        };
        sources::dev::start_with(intake, dev, metrics.clone(), shutdown.clone())?;
        tracing::warn!(rotate_every = ?settings.dev_rotate_every, "dev CA source enabled: certificates are for testing only");
    }

    let tls = match settings.tls.clone() {
        Some(tls) => Some(
            crate::tls::start(tls, store.clone(), metrics.clone(), health.clone(), shutdown.clone())
                .await
                .context("SDS TLS")?,
        ),
        None => None,
    };
    let mut authz = authorizer(&settings, metrics.clone(), shutdown.clone()).await?;
    if let Some(grants) = reference_grants {
        authz = authz.with_reference_grants(grants);
    }
    let authz = Arc::new(authz);
    if settings.insecure_open_sds && settings.listen.iter().any(|l| !l.is_local()) {
        tokio::spawn(warn_insecure(settings.clone(), tls.is_some(), shutdown.clone()));
    }

    // The initial load parsed every secret once; its temporaries are garbage now.
    crate::memory::release_free_pages();
    let names =
        crate::xds::names::Names::new(&settings.aliases).map_err(anyhow::Error::msg)?.with_gateway_api(gateway_api);
    let shared = ServerState::new(store.clone(), proxies, metrics, stop.clone(), authz, settings.limits.clone())
        .with_names(names);
    tokio::spawn(crate::memory::trim_after_churn(shared.connections.clone(), shared.budget.clone(), shutdown.clone()));
    for (_, b) in bound {
        // As bound: with port 0, the port the kernel chose.
        let addr = b.local_addr();
        let shared = shared.clone();
        let token = shutdown.clone();
        let tls = tls.clone();
        let security = match (&addr, &tls) {
            (ListenAddr::Tcp(_), Some(t)) if t.client_auth => "mtls",
            (ListenAddr::Tcp(_), Some(_)) => "tls",
            (ListenAddr::Tcp(_), None) => "plaintext",
            (ListenAddr::Unix(_), _) => "unix peer credentials",
        };
        tracing::info!(%addr, transport = security, authz = settings.authz.mode.as_str(), "SDS listening");
        tasks
            .spawn(async move { listen::serve(b, shared, tls, token).await.with_context(|| format!("SDS on {addr}")) });
    }

    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(
        secrets = store.served_count(),
        workers,
        sds = ready.sds.join(" "),
        admin = ready.admin,
        status = ready.status.as_deref(),
        "certwire ready"
    );
    if let Some(path) = &settings.ready_file {
        super::ready_file::write(path, &ready)?;
    }
    let failed = tokio::select! {
        _ = terminated() => None,
        Some(res) = tasks.join_next() => Some(res),
    };
    stop.trigger();
    if let Some(res) = failed {
        // A listener died: report it and still drain the rest.
        let err = match res {
            Ok(Ok(())) => anyhow::anyhow!("a server stopped unexpectedly"),
            Ok(Err(e)) => e,
            Err(e) => anyhow::anyhow!("a server task panicked: {e}"),
        };
        tracing::error!(error = format!("{err:#}"), "shutting down");
        crate::shutdown::drain(&mut tasks, background, settings.drain_timeout).await;
        return Err(err);
    }
    tracing::info!(timeout = ?settings.drain_timeout, "draining streams");
    crate::shutdown::drain(&mut tasks, background, settings.drain_timeout).await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

fn local_addr(listener: &tokio::net::TcpListener) -> String {
    listener.local_addr().map(|a| a.to_string()).unwrap_or_default()
}

/// The authorizer of `settings.authz`; `kubernetes` mode connects to the API server
/// (without waiting for it) and runs the grant refresher.
async fn authorizer(
    settings: &Settings,
    metrics: Arc<Metrics>,
    shutdown: crate::shutdown::Shutdown,
) -> anyhow::Result<Authorizer> {
    let a = &settings.authz;
    let (reviews, default_namespace) = match a.mode {
        Mode::Kubernetes => {
            let connected = crate::kube_client::connect(a.kubeconfig.as_ref())
                .await
                .context("--authz kubernetes needs Kubernetes credentials")?;
            let default_namespace = settings
                .kubernetes
                .as_ref()
                .and_then(|k| k.default_namespace.clone())
                .unwrap_or(connected.default_namespace);
            let client = connected.client;
            let reviewer = Arc::new(KubeReviewer { client, verb: a.verb.clone() });
            let reviews = Reviews::new(reviewer, a.ttls.clone());
            tokio::spawn(reviews.clone().run(shutdown));
            (Some(reviews), default_namespace)
        }
        _ => (None, String::new()),
    };
    if a.mode == Mode::Policy && a.rules.is_empty() {
        tracing::warn!("--authz policy with no [[authz.rules]]: every name is denied");
    }
    Ok(Authorizer::new(a.mode, a.rules.clone(), default_namespace, reviews, metrics))
}

/// `--insecure-open-sds` on an exposed address: said at start and every hour, so that
/// nobody runs it by accident for long.
async fn warn_insecure(settings: Settings, tls: bool, shutdown: crate::shutdown::Shutdown) {
    let exposed: Vec<String> = settings.listen.iter().filter(|l| !l.is_local()).map(|l| l.to_string()).collect();
    let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => tracing::warn!(
                listen = ?exposed,
                tls,
                authz = settings.authz.mode.as_str(),
                "--insecure-open-sds: SDS is reachable from the network without the protection certwire requires by default; anyone who reaches it may get private keys"
            ),
        }
    }
}

async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
    }
}
