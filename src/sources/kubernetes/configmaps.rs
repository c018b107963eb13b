//! CA bundles from ConfigMaps, `configmap://NS/NAME` (Istio 1.28's name for a CA that
//! is not secret): key `cacert` or, without it, `ca.crt`, in `data` or `binaryData`.
//! Served also as `configmap://NS/NAME-cacert`, the name a proxy asks for the CA of a
//! credential. ConfigMaps without either key are not followed, so memory grows with the
//! bundles served, not with every ConfigMap of the namespace.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use futures_util::Stream;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt as _;
use kube::runtime::watcher::{self, Event};

use super::follow::{self, Follower};
use crate::health::Health;
use crate::ingest::Intake;
use crate::pki::Material;
use crate::shutdown::Shutdown;

/// The keys tried, in order (Istio's order for Secrets' CA keys).
const CA_KEYS: [&str; 2] = ["cacert", "ca.crt"];

/// The names a ConfigMap's bundle is served under.
pub fn served_names(ns: &str, name: &str) -> [String; 2] {
    [format!("configmap://{ns}/{name}"), format!("configmap://{ns}/{name}-cacert")]
}

/// The CA bundle a ConfigMap holds, if any.
pub fn extract(cm: &ConfigMap) -> Option<Vec<u8>> {
    CA_KEYS.iter().find_map(|key| {
        let text = cm.data.as_ref().and_then(|d| d.get(*key)).map(|v| v.as_bytes().to_vec());
        let binary = || cm.binary_data.as_ref().and_then(|d| d.get(*key)).map(|v| v.0.clone());
        text.or_else(binary).filter(|v| !v.is_empty())
    })
}

pub struct ConfigMaps {
    intake: Intake,
    /// The bundle served per `ns/name`; compared to skip unchanged ones on relists.
    served: HashMap<String, Vec<u8>>,
    health: Arc<Health>,
    component: String,
}

impl ConfigMaps {
    /// Not ready (`component` in /readyz) until its first list is complete.
    pub fn new(mut intake: Intake, health: Arc<Health>, component: String) -> Self {
        health.not_ready(&component, "waiting for the first list of ConfigMaps from the API server");
        intake.set_loading(true);
        Self { intake, served: HashMap::new(), health, component }
    }

    /// Follows `events` until `shutdown` or their end.
    pub async fn run<S>(mut self, events: S, shutdown: Shutdown)
    where
        S: Stream<Item = Result<Event<ConfigMap>, watcher::Error>> + Send,
    {
        let (health, component) = (self.health.clone(), self.component.clone());
        follow::run(&mut self, events, shutdown, health, &component).await;
    }
}

fn key_of(cm: &ConfigMap) -> String {
    format!("{}/{}", cm.namespace().unwrap_or_default(), cm.name_any())
}

impl Follower<ConfigMap> for ConfigMaps {
    fn apply(&mut self, cm: &ConfigMap) -> String {
        let key = key_of(cm);
        let Some(bundle) = extract(cm) else {
            self.withdraw(&key);
            return key;
        };
        if self.served.get(&key) == Some(&bundle) {
            return key;
        }
        let names = served_names(&cm.namespace().unwrap_or_default(), &cm.name_any());
        let material = Material::Validation { ca_pem: bundle.clone(), crl_pem: None };
        // A refused bundle is logged and shown in status by the intake; the last good
        // one stays served.
        if self.intake.update_aliases(&names, &material, Instant::now()).is_ok() {
            self.served.insert(key.clone(), bundle);
        }
        key
    }

    fn delete(&mut self, cm: &ConfigMap) {
        self.withdraw(&key_of(cm));
    }

    fn keys(&self) -> Vec<String> {
        self.served.keys().cloned().collect()
    }

    fn withdraw(&mut self, key: &str) {
        if self.served.remove(key).is_some()
            && let Some((ns, name)) = key.split_once('/')
        {
            for name in served_names(ns, name) {
                self.intake.remove(&name);
            }
        }
    }

    fn listed(&mut self) {
        self.intake.set_loading(false);
        tracing::info!(scope = %self.component, bundles = self.served.len(), "kubernetes ConfigMaps listed");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use futures_util::stream;
    use k8s_openapi::ByteString;

    use super::*;
    use crate::metrics::Metrics;
    use crate::policy::AllowExpired;
    use crate::store::Store;

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    fn cm(ns: &str, name: &str, data: &[(&str, &str)]) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.namespace = Some(ns.into());
        cm.metadata.name = Some(name.into());
        cm.data = Some(data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        cm
    }

    #[test]
    fn cacert_wins_over_ca_crt_and_binary_data_counts() {
        assert_eq!(extract(&cm("a", "b", &[("ca.crt", "X"), ("cacert", "Y")])), Some(b"Y".to_vec()));
        assert_eq!(extract(&cm("a", "b", &[("ca.crt", "X"), ("cacert", "")])), Some(b"X".to_vec()));
        assert_eq!(extract(&cm("a", "b", &[("config", "X")])), None);
        let mut binary = cm("a", "b", &[]);
        binary.binary_data = Some(BTreeMap::from([("ca.crt".to_string(), ByteString(b"Z".to_vec()))]));
        assert_eq!(extract(&binary), Some(b"Z".to_vec()));
    }

    #[tokio::test]
    async fn bundles_are_served_updated_and_withdrawn() {
        let store = Arc::new(Store::new());
        let intake = Intake::new(store.clone(), Arc::new(Metrics::new()), "kubernetes", AllowExpired::Never);
        let health = Arc::new(Health::default());
        let watch = ConfigMaps::new(intake, health.clone(), "kubernetes-configmaps:a".into());
        let (first, second) = (ca_pem(), ca_pem());
        let events = vec![
            Event::Init,
            Event::InitApply(cm("a", "trust", &[("ca.crt", &first)])),
            Event::InitApply(cm("a", "kube-root-ca.crt.not", &[("other", "x")])),
            Event::InitApply(cm("a", "broken", &[("ca.crt", "not PEM")])),
            Event::InitDone,
        ];
        watch.run(stream::iter(events.into_iter().map(Ok)), Shutdown::new()).await;
        assert!(health.check().is_ok());
        let v1 = store.get("configmap://a/trust").expect("served").version;
        assert_eq!(store.get("configmap://a/trust-cacert").unwrap().version.to_string().len(), v1.to_string().len());
        assert!(store.get("configmap://a/broken").is_none(), "refused");
        assert!(store.status().iter().any(|s| s.name == "configmap://a/broken" && s.last_error.is_some()));

        let intake = Intake::new(store.clone(), Arc::new(Metrics::new()), "kubernetes2", AllowExpired::Never);
        let watch = ConfigMaps::new(intake, health.clone(), "kubernetes-configmaps:b".into());
        let events = vec![
            Event::Apply(cm("b", "trust", &[("cacert", &first)])),
            Event::Apply(cm("b", "trust", &[("cacert", &second)])),
        ];
        watch.run(stream::iter(events.into_iter().map(Ok)), Shutdown::new()).await;
        let updated = store.get("configmap://b/trust").unwrap();
        let subject = crate::pki::identity(&updated.resource).fingerprint_sha256;
        let second_only = crate::pki::check(
            "x",
            &Material::Validation { ca_pem: second.into_bytes(), crl_pem: None },
            &Default::default(),
        )
        .unwrap();
        assert_eq!(subject, second_only.identity.fingerprint_sha256, "the update is served");

        let intake = Intake::new(store.clone(), Arc::new(Metrics::new()), "kubernetes3", AllowExpired::Never);
        let watch = ConfigMaps::new(intake, health, "kubernetes-configmaps:c".into());
        let gone = cm("c", "trust", &[("ca.crt", &first)]);
        let events = vec![Event::Apply(gone.clone()), Event::Delete(gone)];
        watch.run(stream::iter(events.into_iter().map(Ok)), Shutdown::new()).await;
        assert!(store.get("configmap://c/trust").is_none() && store.get("configmap://c/trust-cacert").is_none());
    }
}
