//! Gateway API names and the ReferenceGrants that decide them.
//!
//! `kubernetes-gateway://NS/NAME` is the name istiod gives a Gateway's `certificateRef`
//! to Secret NS/NAME (pilot/pkg/model/credentials/resource.go), and
//! `kubernetes-gateway://NS/NAME-cacert` its CA. The Gateway API lets a Gateway
//! reference a Secret of its own namespace, and one of another namespace only where a
//! ReferenceGrant (gateway.networking.k8s.io/v1beta1) in the Secret's namespace allows
//! it: `from` names {group gateway.networking.k8s.io, kind Gateway, the Gateway's
//! namespace} and `to` names {group "", kind Secret} with no name or that Secret's.
//!
//! [`ReferenceGrants`] holds what the watches (`sources::kubernetes::gateway`) know of
//! them, as a snapshot every stream can follow: a grant created or deleted changes the
//! decision of the open streams it concerns, and only theirs report it.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_util::{Stream, StreamExt as _};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;

use super::{Decision, Reason};

pub const SCHEME: &str = "kubernetes-gateway://";

/// The `from` a ReferenceGrant must name for certwire's names: a Gateway.
pub const FROM_GROUP: &str = "gateway.networking.k8s.io";
pub const FROM_KIND: &str = "Gateway";
/// The `to`: a Secret of the core group.
pub const TO_GROUP: &str = "";
pub const TO_KIND: &str = "Secret";

/// The scope key of a watch of every namespace.
pub const ALL_NAMESPACES: &str = "*";

/// A `kubernetes-gateway://NS/NAME` name, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayName<'a> {
    pub namespace: &'a str,
    /// The name after the namespace, as asked (`web` or `web-cacert`).
    pub name: &'a str,
    /// The Secret whose certificate (or CA) it is: `name` without `-cacert`.
    pub secret: &'a str,
    /// `NAME-cacert`: the CA bundle only.
    pub ca_only: bool,
}

/// `kubernetes-gateway://NS/NAME`; both parts are required, as istiod requires them.
/// (istiod ignores anything after a second `/`; certwire refuses such a name.)
pub fn parse(name: &str) -> Option<GatewayName<'_>> {
    let (namespace, rest) = name.strip_prefix(SCHEME)?.split_once('/')?;
    if namespace.is_empty() || rest.is_empty() || rest.contains('/') {
        return None;
    }
    let (secret, ca_only) = match rest.strip_suffix("-cacert") {
        Some(base) if !base.is_empty() => (base, true),
        _ => (rest, false),
    };
    Some(GatewayName { namespace, name: rest, secret, ca_only })
}

/// What one ReferenceGrant allows, as far as certwire's names go: Gateways of
/// `from_namespace` may reference the Secret `name` (any Secret when `None`) of the
/// grant's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowance {
    pub from_namespace: String,
    pub name: Option<String>,
}

/// What a watch knows of the ReferenceGrants of its scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    /// Before the first list: decisions wait.
    Listing,
    /// ReferenceGrants cannot be read (the CRD is not installed, or certwire may not
    /// list them): no cross-namespace reference is allowed, and the reason says why.
    Unreadable(Arc<str>),
    /// Listed, and followed since.
    Listed,
}

#[derive(Debug, Clone)]
struct Scope {
    known: Known,
    /// The allowances of each ReferenceGrant of the scope, by `ns/name`.
    grants: Arc<BTreeMap<String, Vec<Allowance>>>,
}

/// Everything known of ReferenceGrants at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// By the namespace a watch covers, or [`ALL_NAMESPACES`].
    scopes: HashMap<String, Scope>,
}

impl Snapshot {
    /// May a Gateway of `from_namespace` reference what `name` names?
    pub fn decide(&self, from_namespace: &str, name: &GatewayName<'_>) -> Decision {
        if from_namespace == name.namespace {
            return Decision::Allow;
        }
        let Some(scope) = self.scopes.get(name.namespace).or_else(|| self.scopes.get(ALL_NAMESPACES)) else {
            return Decision::Deny(Reason::new(
                "reference_grant",
                format!("namespace {:?} is not watched, so neither are its ReferenceGrants", name.namespace),
            ));
        };
        match &scope.known {
            Known::Listing => Decision::Pending,
            Known::Unreadable(why) => Decision::Deny(Reason::new(
                "gateway_api",
                format!(
                    "a Gateway of namespace {from_namespace:?} may reference a Secret of namespace {:?} only through \
                     a ReferenceGrant, and ReferenceGrants cannot be read: {why}",
                    name.namespace
                ),
            )),
            Known::Listed if allows(&scope.grants, from_namespace, name) => Decision::Allow,
            Known::Listed => Decision::Deny(Reason::new(
                "reference_grant",
                format!(
                    "no ReferenceGrant in namespace {:?} lets Gateways of namespace {from_namespace:?} reference \
                     Secret {:?}",
                    name.namespace, name.secret
                ),
            )),
        }
    }
}

/// A grant naming the Secret, or none: `NAME-cacert` is the CA of `NAME` (or of a
/// Secret literally named `NAME-cacert`, which a grant may name too).
fn allows(grants: &BTreeMap<String, Vec<Allowance>>, from_namespace: &str, name: &GatewayName<'_>) -> bool {
    let prefix = format!("{}/", name.namespace);
    grants.range(prefix.clone()..).take_while(|(key, _)| key.starts_with(&prefix)).any(|(_, allowances)| {
        allowances.iter().any(|a| {
            a.from_namespace == from_namespace
                && a.name.as_deref().is_none_or(|n| n == name.secret || (name.ca_only && n == name.name))
        })
    })
}

/// The ReferenceGrants known to every stream: written by the watches, followed by the
/// streams that ask for a cross-namespace Gateway API name.
pub struct ReferenceGrants {
    tx: watch::Sender<Arc<Snapshot>>,
}

impl ReferenceGrants {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { tx: watch::channel(Arc::new(Snapshot::default())).0 })
    }

    /// The current decision for a Gateway of `from_namespace` and `name`, then each
    /// change (and some repeats: [`super::Decisions`] drops those).
    pub fn decisions(&self, from_namespace: &str, name: &GatewayName<'_>) -> ReferenceDecisions {
        ReferenceDecisions {
            snapshots: WatchStream::new(self.tx.subscribe()),
            from_namespace: from_namespace.into(),
            name: format!("{SCHEME}{}/{}", name.namespace, name.name).into(),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// A watch of `scope` (a namespace or [`ALL_NAMESPACES`]) publishes what it knows:
    /// all of it at once, so that a relist never shows a half-listed state.
    pub fn publish(&self, scope: &str, known: Known, grants: &BTreeMap<String, Vec<Allowance>>) {
        self.tx.send_if_modified(|snapshot| {
            let unchanged = snapshot.scopes.get(scope).is_some_and(|s| s.known == known && *s.grants == *grants);
            if unchanged {
                return false;
            }
            let scope_state = Scope { known, grants: Arc::new(grants.clone()) };
            Arc::make_mut(snapshot).scopes.insert(scope.to_owned(), scope_state);
            true
        });
    }
}

/// One stream's view of [`ReferenceGrants`] for one name.
pub struct ReferenceDecisions {
    snapshots: WatchStream<Arc<Snapshot>>,
    from_namespace: Box<str>,
    /// The whole `kubernetes-gateway://` name, parsed again on each (rare) change.
    name: Box<str>,
}

impl Stream for ReferenceDecisions {
    type Item = Decision;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Decision>> {
        let this = &mut *self;
        let Some(snapshot) = ready!(this.snapshots.poll_next_unpin(cx)) else { return Poll::Ready(None) };
        let name = parse(&this.name).expect("built from a parsed name");
        Poll::Ready(Some(snapshot.decide(&this.from_namespace, &name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw(name: &str) -> GatewayName<'_> {
        parse(name).unwrap()
    }

    fn grants(entries: &[(&str, &str, Option<&str>)]) -> BTreeMap<String, Vec<Allowance>> {
        let mut out: BTreeMap<String, Vec<Allowance>> = BTreeMap::new();
        for (key, from, name) in entries {
            out.entry(key.to_string())
                .or_default()
                .push(Allowance { from_namespace: from.to_string(), name: name.map(str::to_owned) });
        }
        out
    }

    fn code(d: Decision) -> &'static str {
        match d {
            Decision::Allow => "allow",
            Decision::Pending => "pending",
            Decision::Deny(r) => r.code,
        }
    }

    #[test]
    fn names_parse_as_istiod_writes_them() {
        let n = gw("kubernetes-gateway://certs/web");
        assert_eq!((n.namespace, n.name, n.secret, n.ca_only), ("certs", "web", "web", false));
        let n = gw("kubernetes-gateway://certs/web-cacert");
        assert_eq!((n.name, n.secret, n.ca_only), ("web-cacert", "web", true));
        assert!(!gw("kubernetes-gateway://certs/-cacert").ca_only);
        for bad in [
            "kubernetes-gateway://web",
            "kubernetes-gateway:///web",
            "kubernetes-gateway://certs/",
            "kubernetes-gateway://a/b/c",
            "kubernetes://certs/web",
            "web",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn same_namespace_always_other_namespaces_by_grant() {
        let index = ReferenceGrants::new();
        let decide = |from: &str, name: &str| code(index.snapshot().decide(from, &gw(name)));
        assert_eq!(decide("certs", "kubernetes-gateway://certs/web"), "allow", "no grant needed, nothing watched");
        assert_eq!(decide("gw", "kubernetes-gateway://certs/web"), "reference_grant", "namespace not watched");

        index.publish("certs", Known::Listing, &BTreeMap::new());
        assert_eq!(decide("gw", "kubernetes-gateway://certs/web"), "pending");
        index.publish("certs", Known::Listed, &BTreeMap::new());
        assert_eq!(decide("gw", "kubernetes-gateway://certs/web"), "reference_grant");

        index.publish("certs", Known::Listed, &grants(&[("certs/to-web", "gw", Some("web"))]));
        assert_eq!(decide("gw", "kubernetes-gateway://certs/web"), "allow");
        assert_eq!(decide("gw", "kubernetes-gateway://certs/web-cacert"), "allow", "the CA follows its Secret");
        assert_eq!(decide("gw", "kubernetes-gateway://certs/api"), "reference_grant", "another Secret");
        assert_eq!(decide("apps", "kubernetes-gateway://certs/web"), "reference_grant", "another namespace");

        index.publish("certs", Known::Listed, &grants(&[("certs/all", "apps", None)]));
        assert_eq!(decide("apps", "kubernetes-gateway://certs/anything"), "allow", "no name: every Secret");
        assert_eq!(decide("gw", "kubernetes-gateway://certs/web"), "reference_grant", "the first grant is gone");

        index.publish("certs", Known::Listed, &grants(&[("certs/ca", "gw", Some("web-cacert"))]));
        assert_eq!(decide("gw", "kubernetes-gateway://certs/web-cacert"), "allow", "a grant to Secret web-cacert");
        assert_eq!(decide("gw", "kubernetes-gateway://certs/web"), "reference_grant", "not to web's key");

        index.publish("certs", Known::Unreadable("the CRD is not installed".into()), &BTreeMap::new());
        let denied = index.snapshot().decide("gw", &gw("kubernetes-gateway://certs/web"));
        assert!(matches!(&denied, Decision::Deny(r) if r.code == "gateway_api" && r.detail.contains("not installed")));
        assert_eq!(decide("certs", "kubernetes-gateway://certs/web"), "allow", "same namespace still");
    }

    #[test]
    fn one_watch_of_all_namespaces_covers_each() {
        let index = ReferenceGrants::new();
        let g = grants(&[("certs/a", "gw", Some("web")), ("certsx/b", "gw", None), ("other/c", "gw", None)]);
        index.publish(ALL_NAMESPACES, Known::Listed, &g);
        let decide = |name: &str| code(index.snapshot().decide("gw", &gw(name)));
        assert_eq!(decide("kubernetes-gateway://certs/web"), "allow");
        assert_eq!(decide("kubernetes-gateway://certs/api"), "reference_grant", "certsx/b is another namespace's");
        assert_eq!(decide("kubernetes-gateway://other/api"), "allow");
    }

    #[tokio::test]
    async fn a_stream_sees_each_change_of_its_decision() {
        let index = ReferenceGrants::new();
        index.publish("certs", Known::Listing, &BTreeMap::new());
        let mut decisions = index.decisions("gw", &gw("kubernetes-gateway://certs/web"));
        assert_eq!(decisions.next().await, Some(Decision::Pending), "the current decision first");
        index.publish("certs", Known::Listed, &grants(&[("certs/g", "gw", Some("web"))]));
        assert_eq!(decisions.next().await, Some(Decision::Allow));
        // Publishing the same again wakes nobody.
        index.publish("certs", Known::Listed, &grants(&[("certs/g", "gw", Some("web"))]));
        index.publish("certs", Known::Listed, &BTreeMap::new());
        assert_eq!(decisions.next().await.map(code), Some("reference_grant"));
        drop(index);
        assert_eq!(decisions.next().await, None, "the index is gone");
    }
}
