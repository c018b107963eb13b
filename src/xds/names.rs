//! Names a proxy may ask for that stand for another name's secret. Istio's external
//! SDS routes ask for `sds://NAME`: on a gateway's credential socket
//! (`/var/run/secrets/credential-uds/socket`) Envoy asks for the full `sds://NAME` and
//! `sds://NAME-cacert`, and Istio 1.28-1.30 ask mesh extension providers for
//! `sds://PROVIDER`. certwire answers each with NAME's secret, renamed: the store,
//! authorization and sources only ever see NAME.

//!
//! The config's `[aliases]` table maps any other requested name to a stored one (e.g.
//! an extension provider's `sds://PROVIDER` to `kubernetes://NS/NAME`).
//!
//! With Gateway API support (`[kubernetes] gateway_api`), istiod's name for a Gateway's
//! certificateRef, `kubernetes-gateway://NS/NAME` (and `...-cacert`), stands for
//! `kubernetes://NS/NAME` the same way, resolved here when a proxy asks rather than
//! stored by the Kubernetes source under a second name: the store keeps one encoded
//! copy (key included) per stored name, so a second name for every Secret would double
//! the memory of every Secret, asked for that way or not. Resolved here, a Secret costs
//! the same with the support on, and only a name some proxy asks for gets its renamed
//! copy below (one per name and version, shared by every stream). Authorization sees
//! the Gateway API name ([`Names::subject`]): its rule (ReferenceGrants) is its own.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use dashmap::DashMap;

use crate::store::Served;

const SDS_PREFIX: &str = "sds://";

/// How requested names map to stored ones: the configured aliases, then `sds://`.
#[derive(Debug, Default)]
pub struct Names {
    aliases: HashMap<String, String>,
    /// `kubernetes-gateway://NS/NAME` is `kubernetes://NS/NAME`.
    gateway_api: bool,
    /// The stored secret under each requested name, renamed once and shared by every
    /// stream asking for it: a push to many proxies allocates one copy, not one per
    /// proxy. An entry exists only for a requested name whose stored secret was served,
    /// so there are at most as many as stored names (one `sds://` form each, and one
    /// `kubernetes-gateway://` form each with Gateway API support) plus the aliases; it
    /// is replaced with each new version and dropped when the name is gone.
    renamed: DashMap<Arc<str>, Arc<Served>>,
}

impl Names {
    /// Refuses an alias of nothing, of itself, or of another alias (one hop only, so a
    /// reader of the config sees where a name leads).
    pub fn new(aliases: &BTreeMap<String, String>) -> Result<Self, String> {
        for (from, to) in aliases {
            if from.is_empty() || to.is_empty() {
                return Err(format!("[aliases] {from:?} = {to:?}: names must not be empty"));
            }
            if from == to || aliases.contains_key(to) {
                return Err(format!("[aliases] {from:?} = {to:?}: {to:?} is an alias itself"));
            }
        }
        let aliases = aliases.iter().map(|(from, to)| (from.clone(), to.clone())).collect();
        Ok(Self { aliases, gateway_api: false, renamed: DashMap::new() })
    }

    /// Serves `kubernetes-gateway://NS/NAME` as `kubernetes://NS/NAME`.
    pub fn with_gateway_api(mut self, on: bool) -> Self {
        self.gateway_api = on;
        self
    }

    /// The name authorization judges for a requested one: the stored name, except that
    /// a Gateway API name stays one, since its rule is not that of `kubernetes://`.
    pub fn subject<'a>(&'a self, requested: &'a str) -> &'a str {
        match self.aliases.get(requested) {
            Some(stored) => stored,
            None => stored(requested),
        }
    }

    /// The stored name behind a requested one.
    pub fn stored<'a>(&'a self, requested: &'a str) -> Cow<'a, str> {
        let subject = self.subject(requested);
        match crate::authz::gateway::parse(subject).filter(|_| self.gateway_api) {
            Some(name) => Cow::Owned(format!("kubernetes://{}/{}", name.namespace, name.name)),
            None => Cow::Borrowed(subject),
        }
    }

    /// `served` (the stored secret behind `requested`) as sent to a proxy that asked for
    /// `requested`. `None` if it cannot be renamed (not a resource certwire encoded).
    pub fn serve_as(&self, requested: &str, served: Arc<Served>) -> Option<Arc<Served>> {
        if &*served.name == requested {
            return Some(served);
        }
        if let Some(hit) = self.renamed.get(requested)
            && hit.version == served.version
            && hit.updated == served.updated
        {
            return Some(hit.clone());
        }
        let renamed = Arc::new(served.renamed(requested)?);
        self.renamed.insert(Arc::from(requested), renamed.clone());
        Some(renamed)
    }

    /// `requested` is gone from the store: its renamed copy (and key) goes too.
    pub fn forget(&self, requested: &str) {
        self.renamed.remove(requested);
    }
}

/// The stored name behind a requested one, without aliases.
pub fn stored(requested: &str) -> &str {
    requested.strip_prefix(SDS_PREFIX).filter(|name| !name.is_empty()).unwrap_or(requested)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_first_then_the_sds_prefix() {
        let table = BTreeMap::from([("sds://provider".to_string(), "kubernetes://certs/gw".to_string())]);
        let names = Names::new(&table).unwrap();
        assert_eq!(names.stored("sds://provider"), "kubernetes://certs/gw");
        assert_eq!(names.stored("sds://web"), "web");
        assert_eq!(names.stored("web"), "web");
        let chained = BTreeMap::from([("a".to_string(), "b".to_string()), ("b".to_string(), "c".to_string())]);
        assert!(Names::new(&chained).unwrap_err().contains("alias itself"));
        assert!(Names::new(&BTreeMap::from([("a".to_string(), "a".to_string())])).is_err());
        assert!(Names::new(&BTreeMap::from([("a".to_string(), String::new())])).is_err());
    }

    #[test]
    fn gateway_api_names_are_kubernetes_names_when_the_support_is_on() {
        let table = BTreeMap::from([("sds://provider".to_string(), "kubernetes-gateway://certs/gw".to_string())]);
        let off = Names::new(&table).unwrap();
        assert_eq!(off.stored("kubernetes-gateway://certs/web"), "kubernetes-gateway://certs/web", "a name of its own");
        let on = Names::new(&table).unwrap().with_gateway_api(true);
        assert_eq!(on.stored("kubernetes-gateway://certs/web"), "kubernetes://certs/web");
        assert_eq!(on.stored("kubernetes-gateway://certs/web-cacert"), "kubernetes://certs/web-cacert");
        assert_eq!(on.stored("sds://kubernetes-gateway://certs/web"), "kubernetes://certs/web");
        assert_eq!(on.stored("sds://provider"), "kubernetes://certs/gw", "an alias of a Gateway API name");
        assert_eq!(on.stored("kubernetes-gateway://web"), "kubernetes-gateway://web", "no namespace: not one");
        // Authorization judges the Gateway API name itself.
        assert_eq!(on.subject("kubernetes-gateway://certs/web"), "kubernetes-gateway://certs/web");
        assert_eq!(on.subject("sds://provider"), "kubernetes-gateway://certs/gw");
        assert_eq!(on.subject("sds://web"), "web");
    }

    #[test]
    fn one_renamed_copy_per_name_and_version_shared_by_every_stream() {
        let store = crate::store::Store::new();
        let intake = crate::ingest::Intake::new(
            Arc::new(store),
            Arc::new(crate::metrics::Metrics::new()),
            "test",
            crate::policy::AllowExpired::Never,
        );
        let material = |s: &str| crate::pki::Material::Generic(crate::pki::KeyBytes::new(s.as_bytes().to_vec()));
        intake.update("web", &material("one"), std::time::Instant::now()).unwrap();
        let names = Names::default();
        let first = intake.store().get("web").unwrap();
        assert!(Arc::ptr_eq(&names.serve_as("web", first.clone()).unwrap(), &first), "no rename needed");
        let a = names.serve_as("sds://web", first.clone()).unwrap();
        let b = names.serve_as("sds://web", first.clone()).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "the second stream gets the same copy");
        assert_eq!(&*a.name, "sds://web");

        intake.update("web", &material("two"), std::time::Instant::now()).unwrap();
        let second = intake.store().get("web").unwrap();
        let c = names.serve_as("sds://web", second.clone()).unwrap();
        assert_eq!(c.version, second.version, "a new version is renamed anew");
        names.forget("sds://web");
        assert!(names.renamed.is_empty());
    }

    #[test]
    fn sds_names_stand_for_the_name_after_the_prefix() {
        assert_eq!(stored("sds://web"), "web");
        assert_eq!(stored("sds://kubernetes://ns/web-cacert"), "kubernetes://ns/web-cacert");
        assert_eq!(stored("web"), "web");
        assert_eq!(stored("sds://"), "sds://", "nothing after the prefix: a name of its own");
        assert_eq!(stored("kubernetes://web"), "kubernetes://web");
    }
}
