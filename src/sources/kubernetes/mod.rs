//! Kubernetes Secrets source: a watch (list + watch, relist on `410 Gone`, backoff on
//! errors) per configured namespace, or one for all namespaces. A Secret's new content
//! is reported the moment the API server announces it.
//!
//! Only digests of served Secrets are kept, never the Secret objects, so memory grows
//! with what is served, not with every Secret in the cluster.

pub mod configmaps;
mod events;
mod follow;
pub mod gateway;
pub mod names;
mod watch;

use std::path::PathBuf;
use std::sync::Arc;

use crate::shutdown::Shutdown;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;

use crate::health::Health;
use crate::ingest::Intake;
pub use names::{cacert_name, served_names};

/// What to watch. Empty `namespaces` without `all_namespaces`: the client's namespace.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub namespaces: Vec<String>,
    pub all_namespaces: bool,
    pub label_selector: Option<String>,
    /// Namespace whose Secrets are also served as `kubernetes://NAME` and `NAME`.
    pub default_namespace: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    /// Also serve CA bundles from ConfigMaps (`configmap://NS/NAME`).
    pub configmaps: bool,
    /// Serve a Secret's `secret` key as a generic secret (`--generic-secrets`).
    pub generic_secrets: bool,
    /// Gateway API support: `kubernetes-gateway://NS/NAME` names, decided by
    /// ReferenceGrants ([`gateway`]).
    pub gateway_api: bool,
}

/// Connects (without waiting for the API server to answer) and starts the watches.
/// Fails only on configuration errors; an unreachable API server shows in /readyz.
pub async fn start(
    options: Options,
    intake: Intake,
    health: Arc<Health>,
    shutdown: Shutdown,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let crate::kube_client::Connected { client, default_namespace: client_ns } =
        crate::kube_client::connect(options.kubeconfig.as_ref()).await?;
    let default_ns = options.default_namespace.clone().unwrap_or_else(|| client_ns.clone());
    let scopes: Vec<Option<String>> = if options.all_namespaces {
        vec![None]
    } else if options.namespaces.is_empty() {
        vec![Some(client_ns)]
    } else {
        options.namespaces.iter().cloned().map(Some).collect()
    };
    let recorder = events::Rejections::new(client.clone());
    if let Some(stapler) = intake.stapler() {
        stapler.on_revoked(Arc::new(recorder.clone()));
    }
    let mut tasks = Vec::new();
    for scope in scopes {
        let api: Api<Secret> = match &scope {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let component = format!("kubernetes:{}", scope.as_deref().unwrap_or("*"));
        let mut config = watcher::Config::default();
        if let Some(sel) = &options.label_selector {
            config = config.labels(sel);
        }
        let mut watch = watch::Watch::new(intake.clone(), default_ns.clone(), health.clone(), component);
        watch.report_rejections(recorder.clone());
        watch.serve_generic_secrets(options.generic_secrets);
        let events = watcher::watcher(api, config.clone()).default_backoff();
        tasks.push(tokio::spawn(watch.run(events, shutdown.clone())));
        if options.configmaps {
            let api: Api<ConfigMap> = match &scope {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            let component = format!("kubernetes-configmaps:{}", scope.as_deref().unwrap_or("*"));
            let watch = configmaps::ConfigMaps::new(intake.clone(), health.clone(), component);
            let events = watcher::watcher(api, config).default_backoff();
            tasks.push(tokio::spawn(watch.run(events, shutdown.clone())));
        }
    }
    Ok(tasks)
}
