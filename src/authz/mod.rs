//! Who may read which secret. The identity comes from the transport
//! ([`identity::Identity`]); a decision is made when a stream subscribes to a name and
//! again only when a grant changes, never per push.
//!
//! Modes (`[authz] mode`):
//! - `open`: everyone reads everything (loopback, Unix sockets, or
//!   `--insecure-open-sds`).
//! - `policy`: `[[authz.rules]]`, first match, default deny.
//! - `kubernetes`: Istio's rule ([`review`]), with the rules first as an explicit
//!   allow-list (or deny-list) for what that rule does not grant.
//!
//! Gateway API names (`kubernetes-gateway://NS/NAME`, with `[kubernetes] gateway_api`)
//! carry the Gateway API's own rule in both `policy` and `kubernetes` mode
//! ([`gateway`]): same namespace, or a ReferenceGrant.

pub mod gateway;
pub mod identity;
pub mod policy;
pub mod review;

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::{Stream, StreamExt as _};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;

use crate::metrics::{Metrics, ReasonLabel};
pub use identity::Identity;
use policy::{Action, Rule};
use review::Reviews;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Open,
    Policy,
    Kubernetes,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "open" => Ok(Mode::Open),
            "policy" => Ok(Mode::Policy),
            "kubernetes" => Ok(Mode::Kubernetes),
            other => Err(format!("authorization mode {other:?}: expected open, policy or kubernetes")),
        }
    }
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Open => "open",
            Mode::Policy => "policy",
            Mode::Kubernetes => "kubernetes",
        }
    }
}

/// Why a name is refused: `code` labels the metric, `detail` is for status and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    pub code: &'static str,
    pub detail: Arc<str>,
}

impl Reason {
    pub fn new(code: &'static str, detail: impl Into<Arc<str>>) -> Self {
        Self { code, detail: detail.into() }
    }
}

/// The state of a grant that can change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Being reviewed: nothing is sent yet.
    Pending,
    Allow,
    Deny(Reason),
}

/// What [`Authorizer::decide`] says of a name on a stream.
pub enum Verdict {
    Allow,
    Deny(Reason),
    /// Decided by a grant that may change (a SubjectAccessReview, a ReferenceGrant).
    Grant(Decisions),
}

/// The decisions of a grant that may change, the current one first, then each change:
/// a SubjectAccessReview's, a ReferenceGrant's, or both, allowed when both allow.
/// Nothing is decided per push: a stream polls this only when an input changed.
pub struct Decisions {
    reference: Option<gateway::ReferenceDecisions>,
    review: Option<WatchStream<Decision>>,
    /// The latest of each input, in the order above; `None` until it said anything.
    latest: [Option<Decision>; 2],
    /// The last combined decision handed out: only changes are.
    told: Option<Decision>,
}

impl Decisions {
    /// A SubjectAccessReview's grant alone.
    pub fn review(grant: watch::Receiver<Decision>) -> Self {
        Self::new(None, Some(grant))
    }

    fn new(reference: Option<gateway::ReferenceDecisions>, review: Option<watch::Receiver<Decision>>) -> Self {
        let latest = [
            if reference.is_some() { None } else { Some(Decision::Allow) },
            if review.is_some() { None } else { Some(Decision::Allow) },
        ];
        Self { reference, review: review.map(WatchStream::new), latest, told: None }
    }

    /// The first decision that is not [`Decision::Pending`]; `None` if the inputs end
    /// first.
    pub async fn settled(&mut self) -> Option<Decision> {
        while let Some(decision) = self.next().await {
            if decision != Decision::Pending {
                return Some(decision);
            }
        }
        None
    }

    /// Denied if an input denies (the ReferenceGrant's reason first), pending while one
    /// has not decided, else allowed.
    fn combined(&self) -> Decision {
        if let Some(deny) = self.latest.iter().flatten().find(|d| matches!(d, Decision::Deny(_))) {
            return deny.clone();
        }
        if self.latest.iter().any(|d| matches!(d, None | Some(Decision::Pending))) {
            return Decision::Pending;
        }
        Decision::Allow
    }
}

/// Takes every decision `input` has ready into `latest`; returns whether it is still
/// open (an ended input keeps its last decision).
fn drain<S: Stream<Item = Decision> + Unpin>(
    input: &mut S,
    latest: &mut Option<Decision>,
    cx: &mut Context<'_>,
) -> bool {
    loop {
        match input.poll_next_unpin(cx) {
            Poll::Ready(Some(decision)) => *latest = Some(decision),
            Poll::Ready(None) => return false,
            Poll::Pending => return true,
        }
    }
}

impl Stream for Decisions {
    type Item = Decision;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Decision>> {
        let this = &mut *self;
        let [reference_latest, review_latest] = &mut this.latest;
        if let Some(reference) = &mut this.reference
            && !drain(reference, reference_latest, cx)
        {
            this.reference = None;
        }
        if let Some(review) = &mut this.review
            && !drain(review, review_latest, cx)
        {
            this.review = None;
        }
        let decision = this.combined();
        if this.told.as_ref() != Some(&decision) {
            this.told = Some(decision.clone());
            return Poll::Ready(Some(decision));
        }
        if this.reference.is_none() && this.review.is_none() { Poll::Ready(None) } else { Poll::Pending }
    }
}

pub struct Authorizer {
    mode: Mode,
    rules: Vec<Rule>,
    /// `kubernetes` mode: the namespace of bare and `kubernetes://NAME` names.
    default_namespace: String,
    reviews: Option<Arc<Reviews>>,
    /// `[kubernetes] gateway_api`: the ReferenceGrants that decide
    /// `kubernetes-gateway://` names; `None` when Gateway API support is off.
    references: Option<Arc<gateway::ReferenceGrants>>,
    metrics: Arc<Metrics>,
    /// (identity, name) pairs already logged: one warning each, not one per request or
    /// stream. Bounded: when full it starts over, so a flood of names costs at most this.
    warned: Mutex<HashSet<(String, String)>>,
}

/// Distinct denials remembered for logging once.
const WARNED_MAX: usize = 4096;

impl Authorizer {
    pub fn open(metrics: Arc<Metrics>) -> Self {
        Self::new(Mode::Open, Vec::new(), String::new(), None, metrics)
    }

    pub fn new(
        mode: Mode,
        rules: Vec<Rule>,
        default_namespace: String,
        reviews: Option<Arc<Reviews>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self { mode, rules, default_namespace, reviews, references: None, metrics, warned: Mutex::new(HashSet::new()) }
    }

    /// Decides `kubernetes-gateway://` names by these ReferenceGrants (Gateway API
    /// support on).
    pub fn with_reference_grants(mut self, references: Arc<gateway::ReferenceGrants>) -> Self {
        self.references = Some(references);
        self
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// May `identity` read `name`?
    pub fn decide(&self, identity: &Identity, name: &str) -> Verdict {
        if self.mode == Mode::Open {
            return Verdict::Allow;
        }
        if let Identity::Invalid(why) = identity {
            return Verdict::Deny(Reason::new(
                "identity",
                format!("the client certificate names no usable identity: {why}"),
            ));
        }
        let rule = policy::evaluate(&self.rules, identity, name);
        if let Some(gateway_name) = gateway::parse(name) {
            return self.gateway_name(identity, &gateway_name, rule);
        }
        if let Some((action, i)) = rule {
            return match action {
                Action::Allow => Verdict::Allow,
                Action::Deny => Verdict::Deny(Reason::new("policy", format!("denied by authz rule {}", i + 1))),
            };
        }
        match (self.mode, &self.reviews) {
            (Mode::Kubernetes, Some(reviews)) => self.istio_rule(reviews, identity, name),
            _ => Verdict::Deny(Reason::new("policy", "no authz rule allows it")),
        }
    }

    /// A Gateway API name: served only where a Gateway of the proxy's namespace may
    /// reference its Secret (same namespace, or a ReferenceGrant), and only to a proxy
    /// that is a gateway: one a rule allows the name to (`policy`), or one whose service
    /// account may read the Secrets of its own namespace (`kubernetes`, the same
    /// SubjectAccessReview as `kubernetes://` names). istiod needs no review for these
    /// names: it serves a Gateway API name only to the proxy of a Gateway that references
    /// it (its `VerifiedCertificateReferences`). certwire does not follow Gateways, so
    /// the review stands in for that check; without it any workload of the namespace
    /// with a certificate could read every Secret there. A CA bundle needs no review.
    fn gateway_name(
        &self,
        identity: &Identity,
        name: &gateway::GatewayName<'_>,
        rule: Option<(Action, usize)>,
    ) -> Verdict {
        let review = match (rule, self.mode, &self.reviews) {
            (Some((Action::Deny, i)), _, _) => {
                return Verdict::Deny(Reason::new("policy", format!("denied by authz rule {}", i + 1)));
            }
            (Some((Action::Allow, _)), _, _) => None,
            (None, Mode::Kubernetes, Some(reviews)) => Some(reviews),
            (None, _, _) => return Verdict::Deny(Reason::new("policy", "no authz rule allows it")),
        };
        let Some(references) = &self.references else {
            return match rule {
                // Nothing serves the name; a rule allowed it, so it is not refused here.
                Some(_) => Verdict::Allow,
                None => Verdict::Deny(Reason::new(
                    "not_kubernetes",
                    "kubernetes-gateway:// names are served with Gateway API support only ([kubernetes] gateway_api = true)",
                )),
            };
        };
        let Some(workload) = identity.workload() else {
            return Verdict::Deny(Reason::new(
                "no_namespace",
                "the identity has no namespace, so no Gateway of it can reference a Secret (a SPIFFE ID spiffe://TD/ns/NS/sa/SA is needed)",
            ));
        };
        let reference = (workload.namespace != name.namespace).then(|| references.decisions(&workload.namespace, name));
        let review = review
            .filter(|_| !name.ca_only)
            .map(|reviews| reviews.grant(&workload.namespace, &workload.service_account));
        if reference.is_none() && review.is_none() {
            return Verdict::Allow;
        }
        Verdict::Grant(Decisions::new(reference, review))
    }

    fn istio_rule(&self, reviews: &Arc<Reviews>, identity: &Identity, name: &str) -> Verdict {
        let Some(secret) = resolve(name, &self.default_namespace) else {
            return Verdict::Deny(Reason::new(
                "not_kubernetes",
                "not a Kubernetes secret name (kubernetes://NS/NAME, kubernetes://NAME or NAME); allow it with an authz rule",
            ));
        };
        let Some(workload) = identity.workload() else {
            return Verdict::Deny(Reason::new(
                "no_namespace",
                "the identity has no namespace (a SPIFFE ID spiffe://TD/ns/NS/sa/SA is needed)",
            ));
        };
        if workload.namespace != secret.namespace {
            return Verdict::Deny(Reason::new(
                "namespace",
                format!(
                    "secret is in namespace {:?}, the proxy in {:?}; cross-namespace reads need an authz rule",
                    secret.namespace, workload.namespace
                ),
            ));
        }
        // A CA bundle is public material: Istio serves it without a review.
        if secret.ca_only {
            return Verdict::Allow;
        }
        Verdict::Grant(Decisions::review(reviews.grant(&workload.namespace, &workload.service_account)))
    }

    /// Counts a denial and logs it once per (identity, name).
    pub fn denied(&self, identity: &Identity, name: &str, reason: &Reason) {
        self.metrics.authz_denials.get_or_create(&ReasonLabel { reason: reason.code }).inc();
        let mut warned = self.warned.lock().expect("warned lock");
        if warned.len() >= WARNED_MAX {
            warned.clear();
        }
        if warned.insert((identity.to_string(), name.to_owned())) {
            tracing::warn!(identity = %identity, secret = name, reason = reason.code, detail = %reason.detail, "secret not served to this proxy");
        }
    }
}

/// A Kubernetes Secret a name refers to.
#[derive(Debug, PartialEq, Eq)]
pub struct SecretRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// `NAME-cacert`: the CA bundle only.
    pub ca_only: bool,
}

/// `kubernetes://NS/NAME`, `kubernetes://NAME` and bare `NAME` (the default namespace),
/// as the Kubernetes source serves them. Other schemes are not Secrets.
pub fn resolve<'a>(name: &'a str, default_namespace: &'a str) -> Option<SecretRef<'a>> {
    // A ConfigMap holds a CA bundle only: public, read within the proxy's namespace.
    if let Some((namespace, rest)) = name.strip_prefix("configmap://").and_then(|r| r.split_once('/')) {
        let name = rest.strip_suffix("-cacert").filter(|b| !b.is_empty()).unwrap_or(rest);
        if namespace.is_empty() || name.is_empty() || name.contains('/') {
            return None;
        }
        return Some(SecretRef { namespace, name, ca_only: true });
    }
    let (namespace, rest) = match name.strip_prefix("kubernetes://") {
        Some(rest) => match rest.split_once('/') {
            Some((ns, n)) => (ns, n),
            None => (default_namespace, rest),
        },
        None if name.contains("://") => return None,
        None => (default_namespace, name),
    };
    if namespace.is_empty() || rest.is_empty() || rest.contains('/') {
        return None;
    }
    let (name, ca_only) = match rest.strip_suffix("-cacert") {
        Some(base) if !base.is_empty() => (base, true),
        _ => (rest, false),
    };
    Some(SecretRef { namespace, name, ca_only })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::identity::Workload;
    use super::review::{ReviewFuture, Reviewer, Ttls};
    use super::*;

    #[test]
    fn names_resolve_as_the_kubernetes_source_serves_them() {
        let r = |n| resolve(n, "gw");
        assert_eq!(r("kubernetes://apps/web"), Some(SecretRef { namespace: "apps", name: "web", ca_only: false }));
        assert_eq!(r("kubernetes://web"), Some(SecretRef { namespace: "gw", name: "web", ca_only: false }));
        assert_eq!(r("web-cacert"), Some(SecretRef { namespace: "gw", name: "web", ca_only: true }));
        assert!(r("kubernetes://a/web-cacert").unwrap().ca_only);
        assert_eq!(r("-cacert"), Some(SecretRef { namespace: "gw", name: "-cacert", ca_only: false }));
        assert_eq!(r("sds://web"), None);
        assert_eq!(r("kubernetes://a/b/c"), None);
        assert_eq!(r("configmap://a/ca"), Some(SecretRef { namespace: "a", name: "ca", ca_only: true }));
        assert_eq!(r("configmap://a/ca-cacert"), Some(SecretRef { namespace: "a", name: "ca", ca_only: true }));
        assert_eq!(r("configmap://ca"), None);
        assert_eq!(r("kubernetes:///web"), None);
        assert_eq!(r(""), None);
    }

    struct AllowAll;
    impl Reviewer for AllowAll {
        fn review(&self, _: &str, _: &str) -> ReviewFuture {
            Box::pin(async { Ok(None) })
        }
    }

    fn spiffe(ns: &str, sa: &str) -> Identity {
        Identity::Spiffe {
            id: format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"),
            workload: Some(Workload { namespace: ns.into(), service_account: sa.into() }),
        }
    }

    fn kubernetes(rules: Vec<Rule>) -> Authorizer {
        let reviews =
            Reviews::new(Arc::new(AllowAll), Ttls { allow: Duration::from_secs(300), deny: Duration::from_secs(60) });
        Authorizer::new(Mode::Kubernetes, rules, "gw".into(), Some(reviews), Arc::new(Metrics::new()))
    }

    fn denied(v: Verdict) -> &'static str {
        match v {
            Verdict::Deny(r) => r.code,
            Verdict::Allow => "allowed",
            Verdict::Grant(_) => "grant",
        }
    }

    #[tokio::test]
    async fn istio_rule_own_namespace_only_and_cacert_without_review() {
        let a = kubernetes(Vec::new());
        let gw = spiffe("gw", "ingress");
        assert_eq!(denied(a.decide(&gw, "kubernetes://gw/web")), "grant");
        assert_eq!(denied(a.decide(&gw, "web")), "grant", "bare names are in the default namespace");
        assert_eq!(denied(a.decide(&gw, "kubernetes://apps/web")), "namespace");
        assert_eq!(denied(a.decide(&gw, "kubernetes://apps/web-cacert")), "namespace");
        assert_eq!(denied(a.decide(&gw, "web-cacert")), "allowed");
        assert_eq!(denied(a.decide(&gw, "sds://web")), "not_kubernetes");
        assert_eq!(denied(a.decide(&Identity::Dns("gw.example".into()), "web")), "no_namespace");
        assert_eq!(denied(a.decide(&Identity::Anonymous, "web")), "no_namespace");
        assert_eq!(denied(a.decide(&Identity::Invalid("x".into()), "web-cacert")), "identity");
    }

    #[tokio::test]
    async fn rules_come_first_in_kubernetes_mode() {
        let rules: Vec<Rule> = toml::from_str::<toml::Table>(
            r#"rules = [
                { identities = ["spiffe://cluster.local/ns/gw/sa/*"], secrets = ["kubernetes://shared/*"] },
                { identities = ["*"], secrets = ["kubernetes://gw/blocked"], action = "deny" },
            ]"#,
        )
        .unwrap()["rules"]
            .clone()
            .try_into()
            .unwrap();
        let a = kubernetes(rules);
        let gw = spiffe("gw", "ingress");
        assert_eq!(denied(a.decide(&gw, "kubernetes://shared/wildcard")), "allowed");
        assert_eq!(denied(a.decide(&gw, "kubernetes://gw/blocked")), "policy");
        assert_eq!(denied(a.decide(&spiffe("apps", "x"), "kubernetes://shared/wildcard")), "namespace");
    }

    #[test]
    fn open_allows_and_policy_denies_by_default() {
        let m = Arc::new(Metrics::new());
        assert_eq!(denied(Authorizer::open(m.clone()).decide(&Identity::Anonymous, "x")), "allowed");
        let p = Authorizer::new(Mode::Policy, Vec::new(), String::new(), None, m);
        assert_eq!(denied(p.decide(&spiffe("gw", "a"), "x")), "policy");
    }

    #[test]
    fn a_denial_is_counted_each_time_and_logged_once() {
        let m = Arc::new(Metrics::new());
        let a = Authorizer::new(Mode::Policy, Vec::new(), String::new(), None, m.clone());
        let reason = Reason::new("policy", "no rule");
        for _ in 0..3 {
            a.denied(&Identity::Anonymous, "web", &reason);
        }
        assert_eq!(m.authz_denials.get_or_create(&ReasonLabel { reason: "policy" }).get(), 3);
        assert_eq!(a.warned.lock().unwrap().len(), 1);
    }

    mod gateway_names {
        use std::collections::BTreeMap;

        use super::*;
        use crate::authz::gateway::{Allowance, Known, ReferenceGrants};
        use crate::authz::review::{ReviewFuture, Reviewer, Ttls};

        const WEB: &str = "kubernetes-gateway://certs/web";

        /// Allows the service accounts listed.
        #[derive(Default)]
        struct Bound(Mutex<Vec<String>>);
        impl Reviewer for Arc<Bound> {
            fn review(&self, namespace: &str, service_account: &str) -> ReviewFuture {
                let allowed = self.0.lock().unwrap().contains(&format!("{namespace}/{service_account}"));
                Box::pin(async move { Ok(if allowed { None } else { Some("not bound".into()) }) })
            }
        }

        fn rules(toml: &str) -> Vec<Rule> {
            toml::from_str::<toml::Table>(toml).unwrap()["rules"].clone().try_into().unwrap()
        }

        fn grant_to(index: &ReferenceGrants, from: &str, name: Option<&str>) {
            let grants = BTreeMap::from([(
                "certs/g".to_string(),
                vec![Allowance { from_namespace: from.into(), name: name.map(str::to_owned) }],
            )]);
            index.publish("certs", Known::Listed, &grants);
        }

        fn revoke(index: &ReferenceGrants) {
            index.publish("certs", Known::Listed, &BTreeMap::new());
        }

        async fn settle(v: Verdict) -> &'static str {
            match v {
                Verdict::Allow => "allowed",
                Verdict::Deny(r) => r.code,
                Verdict::Grant(mut g) => match g.settled().await {
                    Some(Decision::Allow) => "granted",
                    Some(Decision::Deny(r)) => r.code,
                    other => panic!("{other:?}"),
                },
            }
        }

        /// `kubernetes` mode whose reviews allow the service accounts `bound`.
        fn kubernetes_mode(bound: &[&str]) -> (Authorizer, Arc<ReferenceGrants>) {
            let bound = Arc::new(Bound(Mutex::new(bound.iter().map(|b| b.to_string()).collect())));
            let ttls = Ttls { allow: Duration::from_secs(300), deny: Duration::from_secs(60) };
            let reviews = Reviews::new(Arc::new(bound.clone()), ttls);
            let index = ReferenceGrants::new();
            index.publish("certs", Known::Listed, &BTreeMap::new());
            let a = Authorizer::new(Mode::Kubernetes, Vec::new(), "gw".into(), Some(reviews), Arc::new(Metrics::new()))
                .with_reference_grants(index.clone());
            (a, index)
        }

        #[tokio::test]
        async fn kubernetes_mode_needs_the_reference_and_the_review() {
            let (gw, certs) = (spiffe("gw", "gateway"), spiffe("certs", "gateway"));
            // Same namespace: no grant needed, the review is.
            assert_eq!(settle(kubernetes_mode(&[]).0.decide(&certs, WEB)).await, "review");
            let (a, index) = kubernetes_mode(&["certs/gateway", "gw/gateway"]);
            assert_eq!(settle(a.decide(&certs, WEB)).await, "granted");
            assert_eq!(
                settle(a.decide(&certs, "kubernetes-gateway://certs/web-cacert")).await,
                "allowed",
                "a CA: no review"
            );
            // Another namespace: a ReferenceGrant as well.
            assert_eq!(settle(a.decide(&gw, WEB)).await, "reference_grant");
            assert_eq!(settle(a.decide(&gw, "kubernetes-gateway://certs/web-cacert")).await, "reference_grant");
            grant_to(&index, "gw", Some("web"));
            assert_eq!(settle(a.decide(&gw, WEB)).await, "granted");
            assert_eq!(settle(a.decide(&gw, "kubernetes-gateway://certs/web-cacert")).await, "granted");
            assert_eq!(settle(a.decide(&gw, "kubernetes-gateway://certs/api")).await, "reference_grant");
            // The grant without the review: still no.
            assert_eq!(settle(a.decide(&spiffe("gw", "other"), WEB)).await, "review");
            // No namespace to reference from.
            assert_eq!(settle(a.decide(&Identity::Unix { uid: 1, gid: 1, pid: None }, WEB)).await, "no_namespace");
            // kubernetes:// names keep Istio's rule: never across namespaces.
            assert_eq!(settle(a.decide(&gw, "kubernetes://certs/web")).await, "namespace");
        }

        #[tokio::test]
        async fn policy_mode_rules_say_who_the_grants_say_what() {
            let index = ReferenceGrants::new();
            index.publish("certs", Known::Listed, &BTreeMap::new());
            let rules = rules(
                r#"rules = [
                    { identities = ["*"], secrets = ["kubernetes-gateway://certs/blocked"], action = "deny" },
                    { identities = ["spiffe://cluster.local/ns/*/sa/gateway"], secrets = ["kubernetes-gateway://*"] },
                ]"#,
            );
            let a = Authorizer::new(Mode::Policy, rules, String::new(), None, Arc::new(Metrics::new()))
                .with_reference_grants(index.clone());
            let (gw, certs) = (spiffe("gw", "gateway"), spiffe("certs", "gateway"));
            assert_eq!(settle(a.decide(&certs, WEB)).await, "allowed", "same namespace, allowed by a rule");
            assert_eq!(settle(a.decide(&gw, WEB)).await, "reference_grant", "a rule does not replace the grant");
            grant_to(&index, "gw", None);
            assert_eq!(settle(a.decide(&gw, WEB)).await, "granted");
            assert_eq!(settle(a.decide(&spiffe("gw", "app"), WEB)).await, "policy", "no rule for this identity");
            assert_eq!(settle(a.decide(&certs, "kubernetes-gateway://certs/blocked")).await, "policy");
        }

        #[tokio::test]
        async fn without_gateway_api_support_the_names_are_not_kubernetes_names() {
            let m = Arc::new(Metrics::new());
            let ttls = Ttls { allow: Duration::from_secs(300), deny: Duration::from_secs(60) };
            let reviews = Reviews::new(Arc::new(Arc::new(Bound::default())), ttls);
            let a = Authorizer::new(Mode::Kubernetes, Vec::new(), "gw".into(), Some(reviews), m.clone());
            assert_eq!(settle(a.decide(&spiffe("certs", "gateway"), WEB)).await, "not_kubernetes");
            let rules = rules(r#"rules = [{ identities = ["*"], secrets = ["kubernetes-gateway://*"] }]"#);
            let p = Authorizer::new(Mode::Policy, rules, String::new(), None, m);
            assert_eq!(settle(p.decide(&spiffe("gw", "gateway"), WEB)).await, "allowed", "served by nothing anyway");
        }

        /// What a stream sees: one decision per change of either input, the current one
        /// first; a revoked ReferenceGrant denies, a new one allows again.
        #[tokio::test(start_paused = true)]
        async fn a_grant_follows_reference_grants_and_reviews() {
            let (a, index) = kubernetes_mode(&["gw/gateway"]);
            grant_to(&index, "gw", Some("web"));
            let Verdict::Grant(mut decisions) = a.decide(&spiffe("gw", "gateway"), WEB) else { panic!("a grant") };
            assert_eq!(decisions.next().await, Some(Decision::Pending), "the review is under way");
            assert_eq!(decisions.next().await, Some(Decision::Allow));
            revoke(&index);
            assert!(matches!(decisions.next().await, Some(Decision::Deny(r)) if r.code == "reference_grant"));
            grant_to(&index, "gw", Some("web"));
            assert_eq!(decisions.next().await, Some(Decision::Allow));
            // A change that does not touch this name is not a decision.
            let mut other = BTreeMap::new();
            other.insert(
                "certs/g".to_string(),
                vec![Allowance { from_namespace: "gw".into(), name: Some("web".into()) }],
            );
            other.insert("certs/h".to_string(), vec![Allowance { from_namespace: "apps".into(), name: None }]);
            index.publish("certs", Known::Listed, &other);
            tokio::task::yield_now().await;
            assert!(futures_util::poll!(decisions.next()).is_pending());
            // Unreadable ReferenceGrants (the CRD deleted): denied with that reason.
            index.publish("certs", Known::Unreadable("gone".into()), &BTreeMap::new());
            assert!(matches!(decisions.next().await, Some(Decision::Deny(r)) if r.code == "gateway_api"));
        }
    }
}
