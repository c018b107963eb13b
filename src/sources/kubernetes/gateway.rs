//! ReferenceGrants (gateway.networking.k8s.io/v1beta1), watched with `[kubernetes]
//! gateway_api = true` in the namespaces whose Secrets are watched (a grant lives in
//! the namespace of the Secrets it shares), for the authorizer's
//! [`ReferenceGrants`]. Only what concerns certwire's names is kept: the `from`
//! entries for Gateways and the `to` entries for Secrets.
//!
//! The Gateway API CRDs may not be installed. Then the list is answered 404: certwire
//! stays ready, /readyz says why, cross-namespace `kubernetes-gateway://` names are
//! denied (same-namespace ones are served), and the list is tried again with backoff
//! (at most [`RETRY_MAX`] apart), so CRDs installed later are picked up. A 403 (no RBAC
//! for ReferenceGrants) is handled the same way.
//!
//! [`GrantWatch`] is a plain loop fed the events of a kube-runtime watcher; unit tests
//! feed it events of their own.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Api, ResourceExt as _};
use serde::Deserialize;

use super::Options;
use crate::authz::gateway::{self as grants, ALL_NAMESPACES, Allowance, Known, ReferenceGrants};
use crate::health::Health;
use crate::shutdown::Shutdown;

pub const GROUP: &str = "gateway.networking.k8s.io";
pub const VERSION: &str = "v1beta1";
pub const PLURAL: &str = "referencegrants";

/// The first retry of a failed list or watch; doubled each time up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_millis(500);
/// How long a missing CRD goes unnoticed at most once installed.
pub const RETRY_MAX: Duration = Duration::from_secs(10);

/// A ReferenceGrant, the fields certwire reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ReferenceGrant {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ReferenceGrantSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ReferenceGrantSpec {
    #[serde(default)]
    pub from: Vec<GrantFrom>,
    #[serde(default)]
    pub to: Vec<GrantTo>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct GrantFrom {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub namespace: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct GrantTo {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    pub name: Option<String>,
}

impl kube::Resource for ReferenceGrant {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "ReferenceGrant".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        PLURAL.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// What a ReferenceGrant allows certwire's names: each `from` Gateway namespace with
/// each `to` Secret (by name, or all). Other kinds are for other controllers (routes
/// to Services, say) and are not kept, as istiod skips them.
pub fn allowances(grant: &ReferenceGrant) -> Vec<Allowance> {
    let froms = grant.spec.from.iter().filter(|f| f.group == grants::FROM_GROUP && f.kind == grants::FROM_KIND);
    let tos: Vec<&GrantTo> =
        grant.spec.to.iter().filter(|t| t.group == grants::TO_GROUP && t.kind == grants::TO_KIND).collect();
    froms
        .flat_map(|f| tos.iter().map(|t| Allowance { from_namespace: f.namespace.clone(), name: t.name.clone() }))
        .collect()
}

fn key_of(grant: &ReferenceGrant) -> String {
    format!("{}/{}", grant.namespace().unwrap_or_default(), grant.name_any())
}

/// One watch of ReferenceGrants (a namespace, or all), publishing to the index.
pub struct GrantWatch {
    index: Arc<ReferenceGrants>,
    /// The namespace watched, or [`ALL_NAMESPACES`].
    scope: String,
    health: Arc<Health>,
    component: String,
    /// The allowances of each ReferenceGrant that has any, by `ns/name`.
    grants: BTreeMap<String, Vec<Allowance>>,
    /// During a (re)list, what it listed so far: published whole when it ends, so a
    /// relist never withdraws a grant that is still there.
    relisting: Option<BTreeMap<String, Vec<Allowance>>>,
    known: Known,
}

impl GrantWatch {
    /// Not ready (`component` in /readyz) until the first list is complete or has found
    /// that ReferenceGrants cannot be read.
    pub fn new(index: Arc<ReferenceGrants>, scope: String, health: Arc<Health>, component: String) -> Self {
        health.not_ready(&component, "waiting for the first list of ReferenceGrants from the API server");
        let known = Known::Listing;
        index.publish(&scope, known.clone(), &BTreeMap::new());
        Self { index, scope, health, component, grants: BTreeMap::new(), relisting: None, known }
    }

    /// Follows `events` until `shutdown` or their end.
    pub async fn run<S>(mut self, events: S, shutdown: Shutdown)
    where
        S: Stream<Item = Result<Event<ReferenceGrant>, watcher::Error>> + Send,
    {
        let mut events = std::pin::pin!(events);
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                event = events.next() => match event {
                    Some(event) => event,
                    None => return,
                },
            };
            self.handle(event);
        }
    }

    /// One event of the watcher.
    pub fn handle(&mut self, event: Result<Event<ReferenceGrant>, watcher::Error>) {
        match event {
            Ok(Event::Init) => self.relisting = Some(BTreeMap::new()),
            Ok(Event::InitApply(grant)) => {
                let (key, allowed) = (key_of(&grant), allowances(&grant));
                match &mut self.relisting {
                    Some(listed) => {
                        if !allowed.is_empty() {
                            listed.insert(key, allowed);
                        }
                    }
                    None => self.set(key, allowed),
                }
            }
            Ok(Event::InitDone) => {
                if let Some(listed) = self.relisting.take() {
                    self.grants = listed;
                }
                if self.known != Known::Listed {
                    tracing::info!(scope = %self.component, grants = self.grants.len(), "ReferenceGrants listed");
                    self.known = Known::Listed;
                    self.health.ready(&self.component);
                }
                self.publish();
            }
            Ok(Event::Apply(grant)) => self.set(key_of(&grant), allowances(&grant)),
            Ok(Event::Delete(grant)) => {
                self.grants.remove(&key_of(&grant));
                self.publish();
            }
            Err(err) => self.failed(&err),
        }
    }

    fn set(&mut self, key: String, allowed: Vec<Allowance>) {
        if allowed.is_empty() {
            self.grants.remove(&key);
        } else {
            self.grants.insert(key, allowed);
        }
        self.publish();
    }

    fn publish(&self) {
        self.index.publish(&self.scope, self.known.clone(), &self.grants);
    }

    fn failed(&mut self, err: &watcher::Error) {
        let Some(why) = unreadable(err) else {
            tracing::warn!(scope = %self.component, error = %err, "ReferenceGrant watch error; retrying with backoff");
            // Until a first list, not ready; after one, what is known stays (an API
            // server restart must not withdraw grants), as does a known absence.
            if self.known == Known::Listing {
                self.health.not_ready(&self.component, format!("API server: {err}"));
            }
            return;
        };
        if !matches!(&self.known, Known::Unreadable(w) if **w == *why) {
            tracing::warn!(
                scope = %self.component,
                reason = %why,
                "ReferenceGrants cannot be read: cross-namespace kubernetes-gateway:// names are denied; retrying"
            );
        }
        // The resource is not there (or not for certwire): no grant is known to exist.
        self.relisting = None;
        self.grants.clear();
        self.known = Known::Unreadable(why.as_str().into());
        self.publish();
        self.health.degraded(
            &self.component,
            format!("{why}; kubernetes-gateway:// names are served within their own namespace only until then"),
        );
    }
}

/// Why ReferenceGrants cannot be read, when the API server says so for good: the
/// resource does not exist (404: the Gateway API CRDs are not installed) or certwire
/// may not list it (403).
fn unreadable(err: &watcher::Error) -> Option<String> {
    let status = match err {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::WatchError(s) => s,
        _ => return None,
    };
    match status.code {
        404 => Some(format!(
            "the ReferenceGrant CRD ({PLURAL}.{GROUP}, {VERSION}) is not installed (the API server answers 404)"
        )),
        403 => Some(format!(
            "certwire may not list ReferenceGrants (needs get, list and watch on {PLURAL}.{GROUP}): {}",
            status.message
        )),
        _ => None,
    }
}

/// Retries a failed list or watch after 0.5 s, 1 s, 2 s ... then every 10 s, until one
/// works (kube-runtime resets it on any event).
struct Retry {
    next: Duration,
}

impl Iterator for Retry {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(RETRY_MAX);
        Some(now)
    }
}

impl kube::runtime::utils::Backoff for Retry {
    fn reset(&mut self) {
        self.next = RETRY_MIN;
    }
}

/// Connects (without waiting for the API server to answer) and starts one watch per
/// namespace the Secrets source watches (or one of all namespaces).
pub async fn start(
    options: &Options,
    index: Arc<ReferenceGrants>,
    health: Arc<Health>,
    shutdown: Shutdown,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let crate::kube_client::Connected { client, default_namespace } =
        crate::kube_client::connect(options.kubeconfig.as_ref()).await?;
    let scopes: Vec<Option<String>> = if options.all_namespaces {
        vec![None]
    } else if options.namespaces.is_empty() {
        vec![Some(default_namespace)]
    } else {
        options.namespaces.iter().cloned().map(Some).collect()
    };
    let mut tasks = Vec::new();
    for scope in scopes {
        let api: Api<ReferenceGrant> = match &scope {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let scope = scope.unwrap_or_else(|| ALL_NAMESPACES.to_owned());
        let component = format!("kubernetes-referencegrants:{scope}");
        let watch = GrantWatch::new(index.clone(), scope, health.clone(), component);
        let events = watcher::watcher(api, watcher::Config::default()).backoff(Retry { next: RETRY_MIN });
        tasks.push(tokio::spawn(watch.run(events, shutdown.clone())));
    }
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::Decision;
    use crate::authz::gateway::parse;
    use futures_util::stream;

    fn grant(ns: &str, name: &str, from: &[(&str, &str, &str)], to: &[(&str, &str, Option<&str>)]) -> ReferenceGrant {
        ReferenceGrant {
            metadata: ObjectMeta { namespace: Some(ns.into()), name: Some(name.into()), ..Default::default() },
            spec: ReferenceGrantSpec {
                from: from
                    .iter()
                    .map(|(g, k, n)| GrantFrom { group: g.to_string(), kind: k.to_string(), namespace: n.to_string() })
                    .collect(),
                to: to
                    .iter()
                    .map(|(g, k, n)| GrantTo { group: g.to_string(), kind: k.to_string(), name: n.map(str::to_owned) })
                    .collect(),
            },
        }
    }

    /// A grant in `certs` to Gateways of `from` for Secret `to` (all when `None`).
    fn for_gateways(name: &str, from: &str, to: Option<&str>) -> ReferenceGrant {
        grant("certs", name, &[(GROUP, "Gateway", from)], &[("", "Secret", to)])
    }

    fn api_error(code: u16, message: &str) -> watcher::Error {
        let status = kube::core::Status { code, message: message.into(), ..Default::default() };
        watcher::Error::InitialListFailed(kube::Error::Api(Box::new(status)))
    }

    struct Fixture {
        index: Arc<ReferenceGrants>,
        health: Arc<Health>,
        watch: GrantWatch,
    }

    fn fixture() -> Fixture {
        let index = ReferenceGrants::new();
        let health = Arc::new(Health::default());
        let watch =
            GrantWatch::new(index.clone(), "certs".into(), health.clone(), "kubernetes-referencegrants:certs".into());
        Fixture { index, health, watch }
    }

    impl Fixture {
        fn decide(&self, from: &str, name: &str) -> &'static str {
            match self.index.snapshot().decide(from, &parse(name).unwrap()) {
                Decision::Allow => "allow",
                Decision::Pending => "pending",
                Decision::Deny(r) => r.code,
            }
        }

        fn list(&mut self, grants: Vec<ReferenceGrant>) {
            self.watch.handle(Ok(Event::Init));
            for g in grants {
                self.watch.handle(Ok(Event::InitApply(g)));
            }
            self.watch.handle(Ok(Event::InitDone));
        }
    }

    const WEB: &str = "kubernetes-gateway://certs/web";

    #[test]
    fn only_gateway_to_secret_entries_count() {
        let g = grant(
            "certs",
            "mixed",
            &[(GROUP, "Gateway", "gw"), (GROUP, "HTTPRoute", "apps"), ("other.example", "Gateway", "x")],
            &[("", "Secret", Some("web")), ("", "Service", None), ("", "Secret", None)],
        );
        assert_eq!(
            allowances(&g),
            [
                Allowance { from_namespace: "gw".into(), name: Some("web".into()) },
                Allowance { from_namespace: "gw".into(), name: None },
            ]
        );
        let json = serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
            "metadata": {"name": "g", "namespace": "certs"},
            "spec": {"from": [{"group": GROUP, "kind": "Gateway", "namespace": "gw"}], "to": [{"group": "", "kind": "Secret"}]},
        });
        let parsed: ReferenceGrant = serde_json::from_value(json).unwrap();
        assert_eq!(allowances(&parsed), [Allowance { from_namespace: "gw".into(), name: None }]);
    }

    #[test]
    fn list_then_changes_and_a_relist_that_withdraws_only_what_vanished() {
        let mut f = fixture();
        assert_eq!(f.decide("gw", WEB), "pending", "not listed yet");
        assert!(f.health.check().is_err(), "not ready until listed");
        f.list(vec![for_gateways("to-web", "gw", Some("web"))]);
        assert!(f.health.check().is_ok());
        assert_eq!(f.decide("gw", WEB), "allow");
        assert_eq!(f.decide("apps", WEB), "reference_grant");

        f.watch.handle(Ok(Event::Apply(for_gateways("apps-all", "apps", None))));
        assert_eq!(f.decide("apps", WEB), "allow");
        f.watch.handle(Ok(Event::Delete(for_gateways("to-web", "gw", Some("web")))));
        assert_eq!(f.decide("gw", WEB), "reference_grant", "deleted");
        // Changed to something certwire does not serve: gone too.
        f.watch.handle(Ok(Event::Apply(grant(
            "certs",
            "apps-all",
            &[(GROUP, "HTTPRoute", "apps")],
            &[("", "Service", None)],
        ))));
        assert_eq!(f.decide("apps", WEB), "reference_grant");

        // A relist (dropped watch, 410 Gone): the state during it is the old one.
        f.watch.handle(Ok(Event::Apply(for_gateways("gone-later", "gw", None))));
        f.watch.handle(Ok(Event::Init));
        f.watch.handle(Ok(Event::InitApply(for_gateways("new", "apps", Some("web")))));
        assert_eq!((f.decide("gw", WEB), f.decide("apps", WEB)), ("allow", "reference_grant"), "not half-listed");
        f.watch.handle(Ok(Event::InitDone));
        assert_eq!((f.decide("gw", WEB), f.decide("apps", WEB)), ("reference_grant", "allow"));
    }

    #[test]
    fn a_missing_crd_is_ready_degraded_and_denies_cross_namespace_until_installed() {
        let mut f = fixture();
        f.watch.handle(Err(api_error(404, "the server could not find the requested resource")));
        assert!(f.health.check().is_ok(), "ready: the rest of certwire works");
        let notes = f.health.notes();
        assert_eq!(notes.len(), 1);
        assert!(notes[0].starts_with("kubernetes-referencegrants:certs: the ReferenceGrant CRD"), "{notes:?}");
        assert!(notes[0].contains("not installed"), "{notes:?}");
        assert_eq!(f.decide("gw", WEB), "gateway_api");
        assert_eq!(f.decide("certs", WEB), "allow", "same namespace needs no grant");
        // Installed later: the next list works.
        f.list(vec![for_gateways("to-web", "gw", Some("web"))]);
        assert!(f.health.notes().is_empty() && f.health.check().is_ok());
        assert_eq!(f.decide("gw", WEB), "allow");
        // Uninstalled again (the CRD deleted takes its objects along).
        f.watch.handle(Err(api_error(404, "not found")));
        assert_eq!(f.decide("gw", WEB), "gateway_api");
        // Forbidden is as final.
        f.watch.handle(Err(api_error(403, "referencegrants is forbidden")));
        assert!(f.health.notes()[0].contains("referencegrants is forbidden"));
        assert!(f.health.check().is_ok());
    }

    #[test]
    fn other_errors_keep_what_is_known() {
        let mut f = fixture();
        f.watch.handle(Err(api_error(500, "etcd is down")));
        assert!(f.health.check().unwrap_err()[0].contains("etcd is down"), "not ready before a first list");
        assert_eq!(f.decide("gw", WEB), "pending");
        f.list(vec![for_gateways("to-web", "gw", Some("web"))]);
        f.watch.handle(Err(api_error(503, "unavailable")));
        f.watch.handle(Err(watcher::Error::NoResourceVersion));
        assert!(f.health.check().is_ok(), "ready once listed");
        assert_eq!(f.decide("gw", WEB), "allow", "an outage withdraws no grant");
    }

    #[test]
    fn retries_back_off_to_the_maximum_and_reset() {
        use kube::runtime::utils::Backoff as _;
        let mut retry = Retry { next: RETRY_MIN };
        let first: Vec<Duration> = retry.by_ref().take(7).collect();
        assert_eq!(first[..3], [RETRY_MIN, RETRY_MIN * 2, RETRY_MIN * 4]);
        assert_eq!(first[6], RETRY_MAX);
        retry.reset();
        assert_eq!(retry.next(), Some(RETRY_MIN));
    }

    /// The loop with a real backoff under a paused clock: the CRD is missing for the
    /// first lists, then installed; the grant is known within the maximum retry.
    #[tokio::test(start_paused = true)]
    async fn the_loop_retries_a_missing_crd_with_backoff() {
        use kube::runtime::utils::StreamBackoff;
        let index = ReferenceGrants::new();
        let health = Arc::new(Health::default());
        let watch = GrantWatch::new(index.clone(), "certs".into(), health.clone(), "grants".into());
        let mut events: Vec<Result<Event<ReferenceGrant>, watcher::Error>> =
            (0..5).map(|_| Err(api_error(404, "not found"))).collect();
        events.extend([
            Ok(Event::Init),
            Ok(Event::InitApply(for_gateways("to-web", "gw", Some("web")))),
            Ok(Event::InitDone),
        ]);
        let events = StreamBackoff::new(stream::iter(events).chain(stream::pending()), Retry { next: RETRY_MIN });
        let shutdown = Shutdown::new();
        let started = tokio::time::Instant::now();
        let task = tokio::spawn(watch.run(events, shutdown.clone()));
        let mut decisions = index.decisions("gw", &parse(WEB).unwrap());
        loop {
            match decisions.next().await {
                Some(Decision::Allow) => break,
                Some(Decision::Deny(r)) => {
                    assert_eq!(r.code, "gateway_api");
                    assert!(health.check().is_ok() && !health.notes().is_empty());
                }
                other => assert!(matches!(other, Some(Decision::Pending)), "{other:?}"),
            }
        }
        // 0.5 + 1 + 2 + 4 + 8 s of backoff after the five 404s.
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(15_500) && waited < Duration::from_secs(16), "{waited:?}");
        assert!(health.notes().is_empty());
        shutdown.trigger();
        task.await.unwrap();
    }
}
