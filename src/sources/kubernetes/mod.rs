//! Kubernetes Secrets source: a watch (list + watch, relist on `410 Gone`, backoff on
//! errors) per configured namespace, or one for all namespaces. A Secret's new content
//! is reported the moment the API server announces it.
//!
//! Only digests of served Secrets are kept, never the Secret objects, so memory grows
//! with what is served, not with every Secret in the cluster.

mod events;
pub mod names;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Config, ResourceExt};
use ring::digest;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::ingest::Sink;
use crate::pki::{Material, PkiError};
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
}

/// Connects (without waiting for the API server to answer) and starts the watches.
/// Fails only on configuration errors; an unreachable API server shows in /readyz.
pub async fn start(
    options: Options,
    sink: Sink,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let config = client_config(options.kubeconfig.as_ref()).await?;
    let client_ns = config.default_namespace.clone();
    let client = Client::try_from(config).context("building the Kubernetes client")?;
    let default_ns = options.default_namespace.clone().unwrap_or_else(|| client_ns.clone());
    let scopes: Vec<Option<String>> = if options.all_namespaces {
        vec![None]
    } else if options.namespaces.is_empty() {
        vec![Some(client_ns)]
    } else {
        options.namespaces.iter().cloned().map(Some).collect()
    };
    let recorder = events::Rejections::new(client.clone());
    let mut tasks = Vec::new();
    for scope in scopes {
        let api: Api<Secret> = match &scope {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let component = format!("kubernetes:{}", scope.as_deref().unwrap_or("*"));
        health.not_ready(&component, "waiting for the first list from the API server");
        let mut config = watcher::Config::default();
        if let Some(sel) = &options.label_selector {
            config = config.labels(sel);
        }
        let watch = Watch {
            sink: sink.clone(),
            default_ns: default_ns.clone(),
            served: HashMap::new(),
            health: health.clone(),
            component,
            recorder: recorder.clone(),
        };
        tasks.push(tokio::spawn(watch.run(api, config, shutdown.clone())));
    }
    Ok(tasks)
}

pub(crate) async fn client_config(kubeconfig: Option<&PathBuf>) -> anyhow::Result<Config> {
    match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))
        }
        // In-cluster service account, else KUBECONFIG / ~/.kube/config.
        None => Config::infer().await.context("no Kubernetes credentials (in-cluster or KUBECONFIG)"),
    }
}

/// What one Secret currently contributes to the store.
struct Served {
    digest: [u8; 32],
    names: Vec<String>,
}

struct Watch {
    sink: Sink,
    default_ns: String,
    /// Keyed by `ns/name`.
    served: HashMap<String, Served>,
    health: Arc<Health>,
    component: String,
    recorder: events::Rejections,
}

impl Watch {
    async fn run(mut self, api: Api<Secret>, config: watcher::Config, shutdown: CancellationToken) {
        let mut stream = watcher::watcher(api, config).default_backoff().boxed();
        // Keys listed since the last (re)list started; the rest are gone at InitDone.
        let mut listed: Option<HashSet<String>> = None;
        let mut ready = false;
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                event = stream.next() => match event {
                    Some(e) => e,
                    None => return,
                },
            };
            match event {
                Ok(Event::Init) => listed = Some(HashSet::new()),
                Ok(Event::InitApply(secret)) => {
                    let key = self.apply(&secret);
                    if let Some(l) = listed.as_mut() {
                        l.insert(key);
                    }
                }
                Ok(Event::InitDone) => {
                    // A relist after a dropped watch or 410 Gone: only Secrets that
                    // really vanished are withdrawn; the rest were re-applied, which
                    // pushes nothing when unchanged.
                    if let Some(l) = listed.take() {
                        let gone: Vec<String> = self.served.keys().filter(|k| !l.contains(*k)).cloned().collect();
                        for key in gone {
                            self.withdraw(&key);
                        }
                    }
                    if !ready {
                        ready = true;
                        self.health.ready(&self.component);
                        tracing::info!(scope = %self.component, secrets = self.served.len(), "kubernetes source listed");
                    }
                }
                Ok(Event::Apply(secret)) => {
                    self.apply(&secret);
                }
                Ok(Event::Delete(secret)) => {
                    let key = key_of(&secret);
                    self.withdraw(&key);
                }
                Err(err) => {
                    tracing::warn!(scope = %self.component, error = %err, "kubernetes watch error; retrying with backoff");
                    if !ready {
                        self.health.not_ready(&self.component, format!("API server: {err}"));
                    }
                }
            }
        }
    }

    /// Reports a Secret's content; returns its key.
    fn apply(&mut self, secret: &Secret) -> String {
        let key = key_of(secret);
        let extracted = names::extract(secret.data.as_ref());
        if extracted.is_empty() {
            // Not (or no longer) a certificate secret.
            self.withdraw(&key);
            return key;
        }
        let digest = digest_of(&extracted);
        if self.served.get(&key).is_some_and(|s| s.digest == digest) {
            return key;
        }
        let detected = Instant::now();
        let ns = secret.namespace().unwrap_or_default();
        let bases = served_names(&ns, &secret.name_any(), &self.default_ns);
        let mut names = Vec::new();
        let mut error: Option<PkiError> = None;
        for (aliases, material) in
            [(bases.clone(), &extracted.tls), (bases.iter().map(|b| cacert_name(b)).collect::<Vec<_>>(), &extracted.ca)]
        {
            let Some(material) = material else { continue };
            let refs: Vec<&str> = aliases.iter().map(String::as_str).collect();
            if let Err(e) = self.sink.update_aliases(&refs, material, detected) {
                error.get_or_insert(e);
            }
            names.extend(aliases);
        }
        // Names this Secret no longer offers (ca.crt removed, say).
        if let Some(old) = self.served.get(&key) {
            for name in old.names.iter().filter(|n| !names.contains(n)) {
                self.sink.remove(name);
            }
        }
        match error {
            Some(err) => self.recorder.rejected(secret, &key, &err),
            None => self.recorder.forget(&key),
        }
        self.served.insert(key.clone(), Served { digest, names });
        key
    }

    fn withdraw(&mut self, key: &str) {
        self.recorder.forget(key);
        if let Some(old) = self.served.remove(key) {
            tracing::info!(secret = key, "kubernetes secret deleted; proxies keep what they have");
            for name in &old.names {
                self.sink.remove(name);
            }
        }
    }
}

fn key_of(secret: &Secret) -> String {
    format!("{}/{}", secret.namespace().unwrap_or_default(), secret.name_any())
}

/// Digest of what is served from a Secret, to skip re-checking unchanged ones on relists.
fn digest_of(e: &names::Extracted) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for m in [&e.tls, &e.ca] {
        match m {
            Some(Material::Tls { cert_chain_pem, key_pem }) => {
                ctx.update(b"tls");
                ctx.update(&(cert_chain_pem.len() as u64).to_be_bytes());
                ctx.update(cert_chain_pem);
                ctx.update(key_pem.as_slice());
            }
            Some(Material::Validation { ca_pem, crl_pem }) => {
                ctx.update(b"ca");
                ctx.update(&(ca_pem.len() as u64).to_be_bytes());
                ctx.update(ca_pem);
                ctx.update(crl_pem.as_deref().unwrap_or_default());
            }
            _ => ctx.update(b"-"),
        }
    }
    ctx.finish().as_ref().try_into().expect("SHA-256 is 32 bytes")
}
