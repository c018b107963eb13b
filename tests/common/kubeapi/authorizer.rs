//! The RBAC authorizer, as upstream's (plugin/pkg/auth/authorizer/rbac): whether the
//! stored Roles, ClusterRoles and their bindings allow a request, read afresh on every
//! question so a grant or revocation counts at once (upstream reads informer caches,
//! which lag by moments).
//!
//! Order and wording follow upstream, because callers log the reason and tests may
//! compare it: ClusterRoleBindings first, then the RoleBindings of the request's
//! namespace; the first rule that allows decides; a binding whose role is missing adds
//! an error to the reason of a denial. A user's groups are the ones asked about and no
//! others: the implicit groups of a service account (`system:serviceaccounts`,
//! `system:serviceaccounts:NS`, `system:authenticated`) come from authentication
//! upstream, so a SubjectAccessReview that wants them must list them in `spec.groups`.

use serde_json::Value;

use super::objects::{name_of, namespace_of};
use super::resources::{self, ResourceDef};
use super::store::{Filter, Store, Txn};

/// Upstream's superuser group: its members are allowed everything before RBAC is asked.
const PRIVILEGED_GROUP: &str = "system:masters";

/// The request being authorized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Resource {
        /// Empty for a cluster-wide request: only ClusterRoleBindings apply.
        namespace: String,
        verb: String,
        group: String,
        resource: String,
        subresource: String,
        name: String,
    },
    NonResource {
        path: String,
        verb: String,
    },
}

#[derive(Debug, Clone)]
pub struct Attributes {
    pub user: String,
    pub groups: Vec<String>,
    pub request: Request,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Which binding allowed it, or why bindings could not be read; may be empty.
    pub reason: String,
}

fn text<'v>(obj: &'v Value, field: &str) -> &'v str {
    obj.get(field).and_then(Value::as_str).unwrap_or("")
}

fn strings<'v>(obj: &'v Value, field: &str) -> impl Iterator<Item = &'v str> {
    obj.get(field).and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str)
}

fn rbac(kind: &str) -> &'static ResourceDef {
    resources::by_kind("rbac.authorization.k8s.io/v1", kind).expect("the RBAC kinds are in the resource table")
}

pub fn authorize(store: &Store, asked: &Attributes) -> Decision {
    if asked.groups.iter().any(|g| g == PRIVILEGED_GROUP) {
        return Decision { allowed: true, reason: String::new() };
    }
    let namespace = match &asked.request {
        Request::Resource { namespace, .. } => namespace.as_str(),
        Request::NonResource { .. } => "",
    };
    store.write(|txn| {
        let mut bindings = txn.list(&Filter::all(rbac("ClusterRoleBinding")));
        if !namespace.is_empty() {
            let filter = Filter { namespace: Some(namespace.to_string()), ..Filter::all(rbac("RoleBinding")) };
            bindings.extend(txn.list(&filter));
        }
        let mut errors = Vec::new();
        for binding in &bindings {
            // Empty for a ClusterRoleBinding.
            let binding_namespace = namespace_of(binding);
            let Some(subject) = subjects(binding).find(|s| applies(s, asked, binding_namespace)) else {
                continue;
            };
            let rules = match role_rules(txn, binding, binding_namespace) {
                Ok(rules) => rules,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            if rules.iter().any(|rule| allows(rule, &asked.request)) {
                return Decision { allowed: true, reason: format!("RBAC: allowed by {}", describe(binding, subject)) };
            }
        }
        // RBAC has no opinion on a denial; only errors make a reason (an aggregate upstream).
        let reason = match errors.as_slice() {
            [] => String::new(),
            [one] => format!("RBAC: {one}"),
            many => format!("RBAC: [{}]", many.join(", ")),
        };
        Decision { allowed: false, reason }
    })
}

fn subjects(binding: &Value) -> impl Iterator<Item = &Value> {
    binding.get("subjects").and_then(Value::as_array).into_iter().flatten()
}

/// appliesToUser: a ServiceAccount subject is its `system:serviceaccount:NS:NAME` user
/// (NS defaulting to the binding's), a User its name, a Group one of the user's groups.
fn applies(subject: &Value, asked: &Attributes, binding_namespace: &str) -> bool {
    let name = text(subject, "name");
    match text(subject, "kind") {
        "User" => asked.user == name,
        "Group" => asked.groups.iter().any(|g| g == name),
        "ServiceAccount" => {
            let namespace = Some(text(subject, "namespace")).filter(|ns| !ns.is_empty()).unwrap_or(binding_namespace);
            !namespace.is_empty() && asked.user == format!("system:serviceaccount:{namespace}:{name}")
        }
        _ => false,
    }
}

/// The rules of the binding's role: a Role of the binding's namespace or a ClusterRole.
/// The error reads like upstream's lister's NotFound.
fn role_rules(txn: &Txn<'_>, binding: &Value, binding_namespace: &str) -> Result<Vec<Value>, String> {
    let role_ref = binding.get("roleRef").cloned().unwrap_or(Value::Null);
    let (kind, name) = (text(&role_ref, "kind"), text(&role_ref, "name"));
    let role = match kind {
        "Role" => txn.get(rbac("Role"), binding_namespace, name),
        "ClusterRole" => txn.get(rbac("ClusterRole"), "", name),
        other => return Err(format!("unsupported role reference kind: {other:?}")),
    };
    let role =
        role.ok_or_else(|| format!("{}.rbac.authorization.k8s.io {name:?} not found", kind.to_ascii_lowercase()))?;
    Ok(role.get("rules").and_then(Value::as_array).cloned().unwrap_or_default())
}

/// RuleAllows, with upstream's `*` wildcards for verbs, API groups, resources (and
/// `*/SUBRESOURCE`) and non-resource URLs (`/prefix/*`); resource names are exact.
pub fn allows(rule: &Value, request: &Request) -> bool {
    match request {
        Request::Resource { verb, group, resource, subresource, name, .. } => {
            let combined = if subresource.is_empty() { resource.clone() } else { format!("{resource}/{subresource}") };
            let resource_matches = strings(rule, "resources").any(|r| {
                r == "*"
                    || r == combined
                    || (!subresource.is_empty() && r.strip_prefix("*/") == Some(subresource.as_str()))
            });
            let mut names = strings(rule, "resourceNames").peekable();
            let name_matches = names.peek().is_none() || names.any(|n| n == name);
            matches_or_star(strings(rule, "verbs"), verb)
                && matches_or_star(strings(rule, "apiGroups"), group)
                && resource_matches
                && name_matches
        }
        Request::NonResource { path, verb } => {
            let url_matches = strings(rule, "nonResourceURLs")
                .any(|u| u == "*" || u == path || u.strip_suffix('*').is_some_and(|prefix| path.starts_with(prefix)));
            matches_or_star(strings(rule, "verbs"), verb) && url_matches
        }
    }
}

fn matches_or_star<'v>(mut values: impl Iterator<Item = &'v str>, wanted: &str) -> bool {
    values.any(|v| v == "*" || v == wanted)
}

/// `RoleBinding "NAME/NS" of Role "ROLE" to ServiceAccount "SA/NS"` and the like.
fn describe(binding: &Value, subject: &Value) -> String {
    let role_ref = binding.get("roleRef").cloned().unwrap_or(Value::Null);
    let namespace = namespace_of(binding);
    let (source, binding_name) = if namespace.is_empty() {
        ("ClusterRoleBinding", name_of(binding).to_string())
    } else {
        ("RoleBinding", format!("{}/{namespace}", name_of(binding)))
    };
    let subject_kind = text(subject, "kind");
    let subject_name = match subject_kind {
        "ServiceAccount" => {
            let sa_namespace = Some(text(subject, "namespace")).filter(|ns| !ns.is_empty()).unwrap_or(namespace);
            format!("{}/{sa_namespace}", text(subject, "name"))
        }
        _ => text(subject, "name").to_string(),
    };
    format!(
        "{source} {binding_name:?} of {} {:?} to {subject_kind} {subject_name:?}",
        text(&role_ref, "kind"),
        text(&role_ref, "name")
    )
}
