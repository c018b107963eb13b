//! `[[authz.rules]]`: identity patterns -> secret-name patterns, first match decides,
//! default deny. Used alone (`mode = "policy"`) and, in `kubernetes` mode, as the
//! explicit allow-list for names Istio's rule does not grant (other namespaces, secrets
//! from files or ACME).

use serde::Deserialize;

use super::identity::Identity;

/// One rule of the config file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Identity patterns: `spiffe://TD/ns/NS/sa/SA`, `dns:NAME`, `cn:NAME`, `uid:N`,
    /// `gid:N`; `*` matches any run of characters.
    pub identities: Vec<String>,
    /// Secret-name patterns; `*` as above, `{namespace}` and `{service_account}` stand
    /// for the identity's own (a SPIFFE ID with `ns/NS/sa/SA`; no match otherwise).
    pub secrets: Vec<String>,
    #[serde(default)]
    pub action: Action,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

/// What the rules say of (identity, name): the action and the index of the rule.
pub fn evaluate(rules: &[Rule], identity: &Identity, name: &str) -> Option<(Action, usize)> {
    let keys = identity.match_keys();
    rules.iter().enumerate().find_map(|(i, rule)| {
        let who = rule.identities.iter().any(|p| keys.iter().any(|k| glob(p, k)));
        let what = who && rule.secrets.iter().any(|p| expand(p, identity).is_some_and(|p| glob(&p, name)));
        what.then_some((rule.action, i))
    })
}

/// Checks patterns at start: a rule that can never match is a config error.
pub fn validate(rules: &[Rule]) -> Result<(), String> {
    for (i, rule) in rules.iter().enumerate() {
        if rule.identities.is_empty() || rule.secrets.is_empty() {
            return Err(format!("authz rule {}: needs at least one identity and one secret pattern", i + 1));
        }
        for p in &rule.secrets {
            let unknown = p
                .match_indices('{')
                .any(|(at, _)| !p[at..].starts_with("{namespace}") && !p[at..].starts_with("{service_account}"));
            if unknown {
                return Err(format!(
                    "authz rule {}: secret pattern {p:?}: only {{namespace}} and {{service_account}} may be substituted",
                    i + 1
                ));
            }
        }
    }
    Ok(())
}

fn expand(pattern: &str, identity: &Identity) -> Option<String> {
    if !pattern.contains('{') {
        return Some(pattern.to_owned());
    }
    let w = identity.workload()?;
    Some(pattern.replace("{namespace}", &w.namespace).replace("{service_account}", &w.service_account))
}

/// `*` matches any run of characters (slashes included); everything else literally.
/// Linear in the input for one star; patterns come from the operator, names from
/// authenticated peers, both short.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if text.len() < first.len() + last.len() || !text.starts_with(first) || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::identity::Workload;

    fn spiffe(ns: &str, sa: &str) -> Identity {
        Identity::Spiffe {
            id: format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"),
            workload: Some(Workload { namespace: ns.into(), service_account: sa.into() }),
        }
    }

    fn rule(identities: &[&str], secrets: &[&str], action: Action) -> Rule {
        Rule {
            identities: identities.iter().map(|s| s.to_string()).collect(),
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            action,
        }
    }

    #[test]
    fn globs() {
        assert!(glob("a", "a"));
        assert!(!glob("a", "ab"));
        assert!(glob("*", ""));
        assert!(glob("kubernetes://gw/*", "kubernetes://gw/web"));
        assert!(glob("kubernetes://gw/*", "kubernetes://gw/a/b"));
        assert!(!glob("kubernetes://gw/*", "kubernetes://gwx/web"));
        assert!(glob("*-cacert", "web-cacert"));
        assert!(!glob("*-cacert", "web"));
        assert!(glob("a*b*c", "a-b-b-c"));
        assert!(!glob("a*b*c", "a-c-b"));
        assert!(!glob("ab*ba", "aba"), "prefix and suffix may not overlap");
    }

    #[test]
    fn first_match_decides_and_default_is_none() {
        let rules = vec![
            rule(&["spiffe://cluster.local/ns/gw/sa/*"], &["internal-*"], Action::Deny),
            rule(&["spiffe://cluster.local/ns/gw/sa/*"], &["*"], Action::Allow),
            rule(&["uid:1000", "dns:edge-*.example.com"], &["edge"], Action::Allow),
        ];
        let gw = spiffe("gw", "ingress");
        assert_eq!(evaluate(&rules, &gw, "internal-db"), Some((Action::Deny, 0)));
        assert_eq!(evaluate(&rules, &gw, "web"), Some((Action::Allow, 1)));
        assert_eq!(evaluate(&rules, &spiffe("other", "ingress"), "web"), None);
        let unix = Identity::Unix { uid: 1000, gid: 5, pid: None };
        assert_eq!(evaluate(&rules, &unix, "edge"), Some((Action::Allow, 2)));
        assert_eq!(evaluate(&rules, &unix, "web"), None);
        assert_eq!(evaluate(&rules, &Identity::Dns("edge-1.example.com".into()), "edge"), Some((Action::Allow, 2)));
        assert_eq!(evaluate(&rules, &Identity::Cn("edge-1.example.com".into()), "edge"), None, "cn is not dns");
        assert_eq!(evaluate(&rules, &Identity::Anonymous, "edge"), None);
    }

    #[test]
    fn own_namespace_placeholders() {
        let rules = vec![rule(&["spiffe://*"], &["kubernetes://{namespace}/*"], Action::Allow)];
        assert!(evaluate(&rules, &spiffe("gw", "a"), "kubernetes://gw/web").is_some());
        assert!(evaluate(&rules, &spiffe("gw", "a"), "kubernetes://other/web").is_none());
        let no_workload = Identity::Spiffe { id: "spiffe://td/edge".into(), workload: None };
        assert!(evaluate(&rules, &no_workload, "kubernetes://{namespace}/web").is_none());
        assert!(validate(&rules).is_ok());
        assert!(validate(&[rule(&["*"], &["{ns}/x"], Action::Allow)]).unwrap_err().contains("{ns}/x"));
        assert!(validate(&[rule(&[], &["x"], Action::Allow)]).is_err());
    }
}
