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
//! fresh object. The account Secret also holds each certificate's backoff record
//! (`backoff.NAME.json`), so a new Lease holder or a restarted replica keeps it.

use std::collections::BTreeMap;

use anyhow::{Context, anyhow, bail};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::entry::{CommitError, Entry};
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use kube::{Api, Client};
use zeroize::Zeroizing;

use super::state_dir::{CA_CRT, Stored, TLS_CRT, TLS_KEY};
use crate::pki::KeyBytes;

pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "certwire";
/// Label with the certificate's name (or `account`), on every Secret certwire writes.
pub const ACME_LABEL: &str = "certwire.io/acme";
/// Annotation listing the certificate's domains, comma-separated.
pub const DOMAINS_ANNOTATION: &str = "certwire.io/acme-domains";
/// A write that keeps conflicting with other writers gives up after this many tries.
const WRITE_ATTEMPTS: u32 = 3;

#[derive(Clone)]
pub struct KubeSecrets {
    api: Api<Secret>,
    namespace: String,
    account_secret: String,
}

impl KubeSecrets {
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
        self.write(name, "kubernetes.io/tls", name, Some(annotations), Change::Replace(data)).await
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
        let name = self.account_secret.clone();
        self.write(&name, "Opaque", "account", None, Change::Merge(key, json)).await
    }

    /// The backoff record of certificate `name`, kept in the account Secret (the
    /// certificate's own Secret may not exist yet: no order has succeeded).
    pub async fn load_backoff(&self, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let secret = &self.account_secret;
        let found =
            self.api.get_opt(secret).await.with_context(|| format!("reading Secret {}", self.describe(secret)))?;
        Ok(found.and_then(|s| s.data).and_then(|mut d| d.remove(&backoff_key(name))).map(|b| b.0))
    }

    pub async fn save_backoff(&self, name: &str, json: &[u8]) -> anyhow::Result<()> {
        let secret = self.account_secret.clone();
        self.write(&secret, "Opaque", "account", None, Change::Merge(&backoff_key(name), json)).await
    }

    /// Drops the backoff record of `name`; writes nothing when there is none.
    pub async fn remove_backoff(&self, name: &str) -> anyhow::Result<()> {
        let secret = self.account_secret.clone();
        self.write(&secret, "Opaque", "account", None, Change::Remove(&backoff_key(name))).await
    }

    /// Creates or updates Secret `name` through kube's entry API: the replace carries
    /// the resourceVersion read, so a concurrent write is a 409, after which the Secret
    /// is read again and the change applied anew (`WRITE_ATTEMPTS` in all).
    async fn write(
        &self,
        name: &str,
        type_: &str,
        label: &str,
        annotations: Option<BTreeMap<String, String>>,
        change: Change<'_>,
    ) -> anyhow::Result<()> {
        let what = self.describe(name);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let entry = self.api.entry(name).await.with_context(|| format!("reading Secret {what}"))?;
            let mut entry = match entry {
                Entry::Occupied(existing) => {
                    let secret = existing.get();
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
                    if !change.alters(secret.data.as_ref()) {
                        return Ok(());
                    }
                    existing.and_modify(|secret| {
                        secret.metadata.labels.get_or_insert_with(Default::default).extend(labels(label));
                        if let Some(a) = &annotations {
                            secret.metadata.annotations.get_or_insert_with(Default::default).extend(a.clone());
                        }
                        change.apply(secret.data.get_or_insert_with(Default::default));
                        secret.string_data = None;
                    })
                }
                Entry::Vacant(_) if matches!(change, Change::Remove(_)) => return Ok(()),
                Entry::Vacant(vacant) => {
                    let mut data = BTreeMap::new();
                    change.apply(&mut data);
                    vacant.insert(Secret {
                        metadata: ObjectMeta {
                            name: Some(name.to_string()),
                            namespace: Some(self.namespace.clone()),
                            labels: Some(labels(label)),
                            annotations: annotations.clone(),
                            ..Default::default()
                        },
                        type_: Some(type_.to_string()),
                        data: Some(data),
                        ..Default::default()
                    })
                }
            };
            match entry.commit(&PostParams::default()).await {
                Ok(()) => return Ok(()),
                // 409: written since we read it (Conflict), or created meanwhile (AlreadyExists).
                Err(CommitError::Save(kube::Error::Api(e))) if e.code == 409 && attempt < WRITE_ATTEMPTS => {
                    tracing::debug!(secret = %what, reason = %e.reason, attempt, "Secret write conflict; retrying");
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

/// How a write changes a Secret's data.
enum Change<'a> {
    /// The data becomes exactly this (a certificate: no stale key left behind).
    Replace(BTreeMap<String, ByteString>),
    /// One key added or replaced, the others kept (the account Secret).
    Merge(&'a str, &'a [u8]),
    /// One key removed, the others kept.
    Remove(&'a str),
}

impl Change<'_> {
    /// Whether applying it to `data` changes anything: a removal of a missing key does not.
    fn alters(&self, data: Option<&BTreeMap<String, ByteString>>) -> bool {
        match self {
            Change::Remove(key) => data.is_some_and(|d| d.contains_key(*key)),
            _ => true,
        }
    }

    fn apply(&self, data: &mut BTreeMap<String, ByteString>) {
        match self {
            Change::Replace(new) => *data = new.clone(),
            Change::Merge(key, value) => {
                data.insert(key.to_string(), ByteString(value.to_vec()));
            }
            Change::Remove(key) => {
                data.remove(*key);
            }
        }
    }
}

/// The account Secret's key for certificate `name`'s backoff record (account keys
/// are `<16 hex>.json`: no clash).
fn backoff_key(name: &str) -> String {
    format!("backoff.{name}.json")
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

#[cfg(test)]
mod tests {
    use http::Method;
    use serde_json::json;

    use super::*;
    use crate::sources::acme::fake_kube::{Action, FakeApi, secret_path};

    fn stored(tag: &str) -> Stored {
        Stored::sample(tag)
    }

    fn store(api: &FakeApi) -> KubeSecrets {
        KubeSecrets::new(api.client(), "acme", "certwire-acme-account")
    }

    fn data(api: &FakeApi, name: &str, key: &str) -> Option<String> {
        let secret = api.get(&secret_path("acme", name))?;
        let text = secret["data"][key].as_str()?;
        use base64::Engine;
        Some(String::from_utf8(base64::engine::general_purpose::STANDARD.decode(text).unwrap()).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn acme_kube_store_creates_then_replaces_and_reads_back() {
        let api = FakeApi::default();
        let kube = store(&api);
        assert!(kube.load_cert("web").await.unwrap().is_none());
        kube.save_cert("web", &stored("one"), &["a.example".into()]).await.unwrap();
        kube.save_cert("web", &stored("two"), &["a.example".into(), "b.example".into()]).await.unwrap();
        let back = kube.load_cert("web").await.unwrap().unwrap();
        assert_eq!(back.chain_pem, b"chain two");
        assert_eq!(back.key_pem.as_slice(), b"key two");
        let secret = api.get(&secret_path("acme", "web")).unwrap();
        assert_eq!(secret["type"], "kubernetes.io/tls");
        assert_eq!(secret["metadata"]["labels"][MANAGED_BY], MANAGED_BY_VALUE);
        assert_eq!(secret["metadata"]["annotations"][DOMAINS_ANNOTATION], "a.example,b.example");
    }

    #[tokio::test(start_paused = true)]
    async fn acme_kube_store_retries_a_conflict_on_the_fresh_object() {
        let api = FakeApi::default();
        let kube = store(&api);
        kube.save_cert("web", &stored("one"), &[]).await.unwrap();
        // Another writer updates the Secret between our read and our write, twice.
        api.fault(Method::PUT, "/secrets/web", Action::ConcurrentWrite, 2);
        kube.save_cert("web", &stored("two"), &[]).await.unwrap();
        assert_eq!(data(&api, "web", TLS_CRT).as_deref(), Some("chain two"));
        let gets = api.requests().iter().filter(|r| *r == "GET /api/v1/namespaces/acme/secrets/web").count();
        assert_eq!(gets, 4, "read again after each conflict: {:?}", api.requests());

        // A writer that always wins: given up after WRITE_ATTEMPTS, with the reason.
        api.fault(Method::PUT, "/secrets/web", Action::ConcurrentWrite, usize::MAX);
        let err = kube.save_cert("web", &stored("three"), &[]).await.unwrap_err();
        assert!(format!("{err:#}").contains("modified"), "{err:#}");
        assert_eq!(data(&api, "web", TLS_CRT).as_deref(), Some("chain two"));
    }

    #[tokio::test(start_paused = true)]
    async fn acme_kube_store_create_race_becomes_a_replace() {
        let api = FakeApi::default();
        let kube = store(&api);
        // Someone creates the Secret (as certwire) between our read and our create.
        let other = api.clone();
        api.fault(Method::POST, "/secrets", Action::Delay(std::time::Duration::from_secs(1)), 1);
        let racer = async {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            other.put(&secret_path("acme", "web"), json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": {"name": "web", "namespace": "acme", "labels": {MANAGED_BY: MANAGED_BY_VALUE}}, "data": {}}));
        };
        let mine = stored("mine");
        let (saved, ()) = tokio::join!(kube.save_cert("web", &mine, &[]), racer);
        saved.unwrap();
        assert_eq!(data(&api, "web", TLS_CRT).as_deref(), Some("chain mine"));
        assert!(api.requests().iter().any(|r| r.starts_with("PUT")), "{:?}", api.requests());
    }

    #[tokio::test(start_paused = true)]
    async fn acme_kube_store_never_overwrites_a_foreign_secret() {
        let api = FakeApi::default();
        api.put(
            &secret_path("acme", "web"),
            json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": "web", "namespace": "acme"}, "data": {}}),
        );
        let err = store(&api).save_cert("web", &stored("x"), &[]).await.unwrap_err();
        assert!(err.to_string().contains("not written by certwire"), "{err}");
        assert!(!api.requests().iter().any(|r| r.starts_with("PUT")));
    }

    #[tokio::test(start_paused = true)]
    async fn acme_kube_store_keeps_backoff_next_to_the_account() {
        let api = FakeApi::default();
        let kube = store(&api);
        kube.save_account("0123456789abcdef.json", b"{\"account\":1}").await.unwrap();
        assert!(kube.load_backoff("web").await.unwrap().is_none());
        kube.save_backoff("web", b"{\"failures\":1}").await.unwrap();
        kube.save_backoff("web", b"{\"failures\":2}").await.unwrap();
        assert_eq!(kube.load_backoff("web").await.unwrap().unwrap(), b"{\"failures\":2}");
        assert_eq!(kube.load_account("0123456789abcdef.json").await.unwrap().unwrap().as_str(), "{\"account\":1}");
        kube.remove_backoff("web").await.unwrap();
        assert!(kube.load_backoff("web").await.unwrap().is_none());
        assert!(kube.load_account("0123456789abcdef.json").await.unwrap().is_some(), "the account stays");
        // Nothing to remove: nothing written.
        let writes = |api: &FakeApi| api.requests().iter().filter(|r| !r.starts_with("GET")).count();
        let before = writes(&api);
        kube.remove_backoff("web").await.unwrap();
        kube.remove_backoff("api").await.unwrap();
        assert_eq!(writes(&api), before);
        let account = api.get(&secret_path("acme", "certwire-acme-account")).unwrap();
        assert_eq!(account["type"], "Opaque");
    }

    #[tokio::test(start_paused = true)]
    async fn acme_kube_store_errors_name_the_secret() {
        let api = FakeApi::default();
        api.fault(Method::GET, "/secrets/web", Action::Status(503), 1);
        let err = store(&api).load_cert("web").await.unwrap_err();
        assert!(format!("{err:#}").contains("acme/web"), "{err:#}");
    }
}
