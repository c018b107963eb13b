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

pub mod identity;
pub mod policy;
pub mod review;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

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
    /// Decided by a grant that may change (a SubjectAccessReview).
    Grant(watch::Receiver<Decision>),
}

pub struct Authorizer {
    mode: Mode,
    rules: Vec<Rule>,
    /// `kubernetes` mode: the namespace of bare and `kubernetes://NAME` names.
    default_namespace: String,
    reviews: Option<Arc<Reviews>>,
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
        Self { mode, rules, default_namespace, reviews, metrics, warned: Mutex::new(HashSet::new()) }
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
        if let Some((action, i)) = policy::evaluate(&self.rules, identity, name) {
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
        Verdict::Grant(reviews.grant(&workload.namespace, &workload.service_account))
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
}
