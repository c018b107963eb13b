//! The Kubernetes store: every issued certificate as a Secret `NAME` of type
//! `kubernetes.io/tls` (`tls.crt` leaf + chain, `tls.key`, `ca.crt` issuer chain) and
//! the account credentials in one Opaque Secret (one key per directory URL, as the
//! state directory's file name), in `[acme] kubernetes_secret_namespace`.
//!
//! Other replicas, the Kubernetes source, ingress controllers and `kubectl` see them;
//! at start certwire loads from here before the state directory. A Secret of that
//! name that certwire did not create is never overwritten: the store step fails and
//! says so.
//!
//! Writes use the Secret's resourceVersion (optimistic concurrency): two writers never
//! interleave halves of a pair, the second one gets a conflict and retries on the
//! fresh object.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, anyhow, bail};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use kube::{Api, Client, Config};
use zeroize::Zeroizing;

use super::store::{CA_CRT, Stored, TLS_CRT, TLS_KEY};
use crate::pki::KeyBytes;

pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "certwire";
/// Label with the certificate's name (or `account`), on every Secret certwire writes.
pub const ACME_LABEL: &str = "certwire.io/acme";
/// Annotation listing the certificate's domains, comma-separated.
pub const DOMAINS_ANNOTATION: &str = "certwire.io/acme-domains";

/// A Kubernetes client from `kubeconfig`, else in-cluster, else `KUBECONFIG`.
pub async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => Config::infer().await.context("no Kubernetes credentials (in-cluster or KUBECONFIG)")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

#[derive(Clone)]
pub struct KubeStore {
    api: Api<Secret>,
    namespace: String,
    account_secret: String,
}

impl KubeStore {
    pub fn new(client: Client, namespace: &str, account_secret: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            account_secret: account_secret.to_string(),
        }
    }

    /// `NAMESPACE/NAME`, for logs.
    pub fn describe(&self, name: &str) -> String {
        format!("{}/{name}", self.namespace)
    }

    /// The stored certificate of `name`; `None` when there is no Secret (or it lacks
    /// the pair).
    pub async fn load_cert(&self, name: &str) -> anyhow::Result<Option<Stored>> {
        let secret = self.api.get_opt(name).await.with_context(|| format!("reading Secret {}", self.describe(name)))?;
        Ok(secret.as_ref().and_then(stored_of))
    }

    /// Creates or replaces Secret `name` with `stored`. Refuses to replace a Secret
    /// certwire did not write.
    pub async fn save_cert(&self, name: &str, stored: &Stored, domains: &[String]) -> anyhow::Result<()> {
        let mut data = BTreeMap::new();
        data.insert(TLS_CRT.to_string(), ByteString(stored.chain_pem.clone()));
        data.insert(TLS_KEY.to_string(), ByteString(stored.key_pem.as_slice().to_vec()));
        if !stored.ca_pem.is_empty() {
            data.insert(CA_CRT.to_string(), ByteString(stored.ca_pem.clone()));
        }
        let annotations = BTreeMap::from([(DOMAINS_ANNOTATION.to_string(), domains.join(","))]);
        self.write(name, "kubernetes.io/tls", name, data, Some(annotations), true).await
    }

    /// The account JSON stored under `key` of the account Secret, if any.
    pub async fn load_account(&self, key: &str) -> anyhow::Result<Option<Zeroizing<String>>> {
        let name = &self.account_secret;
        let secret = self.api.get_opt(name).await.with_context(|| format!("reading Secret {}", self.describe(name)))?;
        let Some(bytes) = secret.and_then(|s| s.data).and_then(|mut d| d.remove(key)) else { return Ok(None) };
        let text =
            String::from_utf8(bytes.0).map_err(|_| anyhow!("Secret {} key {key} is not UTF-8", self.describe(name)))?;
        Ok(Some(Zeroizing::new(text)))
    }

    /// Adds (or replaces) `key` of the account Secret, keeping its other keys.
    pub async fn save_account(&self, key: &str, json: &[u8]) -> anyhow::Result<()> {
        let data = BTreeMap::from([(key.to_string(), ByteString(json.to_vec()))]);
        let name = self.account_secret.clone();
        self.write(&name, "Opaque", "account", data, None, false).await
    }

    /// Create, or replace at the read resourceVersion (`replace_data`: the data is
    /// exactly `data`; else `data` is merged into it); one retry after a conflict.
    async fn write(
        &self,
        name: &str,
        type_: &str,
        label: &str,
        data: BTreeMap<String, ByteString>,
        annotations: Option<BTreeMap<String, String>>,
        replace_data: bool,
    ) -> anyhow::Result<()> {
        let what = self.describe(name);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let existing = self.api.get_opt(name).await.with_context(|| format!("reading Secret {what}"))?;
            let result = match existing {
                None => {
                    let secret = Secret {
                        metadata: ObjectMeta {
                            name: Some(name.to_string()),
                            namespace: Some(self.namespace.clone()),
                            labels: Some(labels(label)),
                            annotations: annotations.clone(),
                            ..Default::default()
                        },
                        type_: Some(type_.to_string()),
                        data: Some(data.clone()),
                        ..Default::default()
                    };
                    self.api.create(&PostParams::default(), &secret).await.map(drop)
                }
                Some(mut secret) => {
                    let managed = secret
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(MANAGED_BY))
                        .is_some_and(|v| v == MANAGED_BY_VALUE);
                    if !managed {
                        bail!(
                            "Secret {what} exists and was not written by certwire (no label \
                             {MANAGED_BY}={MANAGED_BY_VALUE}): not overwriting it"
                        );
                    }
                    if secret.type_.as_deref().unwrap_or("Opaque") != type_ {
                        bail!("Secret {what} has type {:?}, not {type_}", secret.type_);
                    }
                    secret.metadata.labels.get_or_insert_with(Default::default).extend(labels(label));
                    if let Some(a) = &annotations {
                        secret.metadata.annotations.get_or_insert_with(Default::default).extend(a.clone());
                    }
                    if replace_data {
                        secret.data = Some(data.clone());
                    } else {
                        secret.data.get_or_insert_with(Default::default).extend(data.clone());
                    }
                    secret.string_data = None;
                    // metadata.resourceVersion as read: a concurrent write is a 409.
                    self.api.replace(name, &PostParams::default(), &secret).await.map(drop)
                }
            };
            match result {
                Ok(()) => return Ok(()),
                Err(kube::Error::Api(e)) if (e.code == 409) && attempts < 3 => {
                    tracing::debug!(secret = %what, reason = %e.reason, "Secret write conflict; retrying");
                }
                Err(e) => return Err(e).with_context(|| format!("writing Secret {what}")),
            }
        }
    }

    /// Watches Secret `name`: each version as it is written (after a (re)list, the
    /// current one). Errors are retried with backoff by the watcher.
    pub fn watch_cert(&self, name: &str) -> BoxStream<'static, Result<Option<Stored>, watcher::Error>> {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        watcher::watcher(self.api.clone(), config)
            .default_backoff()
            .filter_map(|event| async move {
                match event {
                    Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => Some(Ok(stored_of(&s))),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                }
            })
            .boxed()
    }
}

fn labels(value: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.to_string(), MANAGED_BY_VALUE.to_string()),
        (ACME_LABEL.to_string(), value.to_string()),
    ])
}

/// `tls.crt`, `tls.key` and `ca.crt` of a Secret; `None` without the pair.
fn stored_of(secret: &Secret) -> Option<Stored> {
    let data = secret.data.as_ref()?;
    let chain_pem = data.get(TLS_CRT)?.0.clone();
    let key = data.get(TLS_KEY)?.0.clone();
    let ca_pem = data.get(CA_CRT).map(|b| b.0.clone()).unwrap_or_default();
    Some(Stored { chain_pem, key_pem: KeyBytes::new(key), ca_pem })
}
