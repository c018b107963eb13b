//! What the API server does to Roles, ClusterRoles, RoleBindings and ClusterRoleBindings
//! on their way in: upstream's defaults and validation (k8s.io/kubernetes
//! pkg/apis/rbac/validation), so a test that grants with a malformed object is refused
//! as it would be by a real cluster instead of silently granting nothing.
//!
//! Not emulated: the escalation check (a writer may only grant what it holds itself);
//! every request here is unauthenticated and may do anything.

use serde_json::{Value, json};

use super::objects::name_of;
use super::resources::{RBAC, ResourceDef};
use super::status::ApiError;

type Cause = (String, &'static str, String);

fn required(field: String, detail: &str) -> Cause {
    let message = if detail.is_empty() { "Required value".to_string() } else { format!("Required value: {detail}") };
    (field, "FieldValueRequired", message)
}

fn invalid(field: String, value: &Value, detail: &str) -> Cause {
    (field, "FieldValueInvalid", format!("Invalid value: {value}: {detail}"))
}

fn not_supported(field: String, value: &str, supported: &[&str]) -> Cause {
    let supported: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
    (
        field,
        "FieldValueNotSupported",
        format!("Unsupported value: {value:?}: supported values: {}", supported.join(", ")),
    )
}

fn text<'v>(obj: &'v Value, field: &str) -> &'v str {
    obj.get(field).and_then(Value::as_str).unwrap_or("")
}

fn list_len(obj: &Value, field: &str) -> usize {
    obj.get(field).and_then(Value::as_array).map_or(0, Vec::len)
}

/// Defaults, then validation, for the four RBAC kinds; `old` is the stored object on update.
pub fn admit(def: &ResourceDef, obj: &mut Value, old: Option<&Value>) -> Result<(), ApiError> {
    let causes = match def.kind {
        "Role" => rules(obj, true),
        "ClusterRole" => rules(obj, false),
        "RoleBinding" | "ClusterRoleBinding" => {
            default_binding(obj);
            binding(def, obj, old)
        }
        _ => Vec::new(),
    };
    if causes.is_empty() { Ok(()) } else { Err(ApiError::invalid(def, name_of(obj), &causes)) }
}

/// ValidatePolicyRule: every rule names verbs, and either resources (with their API
/// groups) or, in a ClusterRole only, non-resource URLs.
fn rules(obj: &Value, namespaced: bool) -> Vec<Cause> {
    let mut causes = Vec::new();
    let Some(rules) = obj.get("rules").and_then(Value::as_array) else { return causes };
    for (i, rule) in rules.iter().enumerate() {
        let field = |name: &str| format!("rules[{i}].{name}");
        if list_len(rule, "verbs") == 0 {
            causes.push(required(field("verbs"), "verbs must contain at least one value"));
        }
        if list_len(rule, "nonResourceURLs") > 0 {
            let urls = &rule["nonResourceURLs"];
            if namespaced {
                causes.push(invalid(
                    field("nonResourceURLs"),
                    urls,
                    "namespaced rules cannot apply to non-resource URLs",
                ));
            }
            if ["apiGroups", "resources", "resourceNames"].iter().any(|f| list_len(rule, f) > 0) {
                causes.push(invalid(
                    field("nonResourceURLs"),
                    urls,
                    "rules cannot apply to both regular resources and non-resource URLs",
                ));
            }
            continue;
        }
        if list_len(rule, "apiGroups") == 0 {
            causes.push(required(field("apiGroups"), "resource rules must supply at least one api group"));
        }
        if list_len(rule, "resources") == 0 {
            causes.push(required(field("resources"), "resource rules must supply at least one resource"));
        }
    }
    causes
}

/// SetDefaults_RoleBinding / _Subject: the API groups a client may leave out.
fn default_binding(obj: &mut Value) {
    if let Some(role_ref) = obj.get_mut("roleRef").and_then(Value::as_object_mut)
        && role_ref.get("apiGroup").and_then(Value::as_str).is_none_or(str::is_empty)
    {
        role_ref.insert("apiGroup".into(), json!(RBAC));
    }
    for subject in obj.get_mut("subjects").and_then(Value::as_array_mut).into_iter().flatten() {
        let kind = text(subject, "kind");
        if matches!(kind, "User" | "Group") && text(subject, "apiGroup").is_empty() {
            subject["apiGroup"] = json!(RBAC);
        }
    }
}

/// ValidateRoleBinding / ValidateClusterRoleBinding, and the update rule that a
/// binding's roleRef never changes (delete and create the binding instead).
fn binding(def: &ResourceDef, obj: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = Vec::new();
    let namespaced = def.namespaced;
    let role_ref = obj.get("roleRef").cloned().unwrap_or_else(|| json!({}));
    let api_group = text(&role_ref, "apiGroup");
    if api_group != RBAC {
        causes.push(not_supported("roleRef.apiGroup".into(), api_group, &[RBAC]));
    }
    let kinds: &[&str] = if namespaced { &["Role", "ClusterRole"] } else { &["ClusterRole"] };
    let kind = text(&role_ref, "kind");
    if !kinds.contains(&kind) {
        causes.push(not_supported("roleRef.kind".into(), kind, kinds));
    }
    if text(&role_ref, "name").is_empty() {
        causes.push(required("roleRef.name".into(), ""));
    }
    for (i, subject) in obj.get("subjects").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let field = |name: &str| format!("subjects[{i}].{name}");
        if text(subject, "name").is_empty() {
            causes.push(required(field("name"), ""));
        }
        let api_group = text(subject, "apiGroup");
        match text(subject, "kind") {
            "ServiceAccount" => {
                if !api_group.is_empty() {
                    causes.push(not_supported(field("apiGroup"), api_group, &[""]));
                }
                // A RoleBinding's service account defaults to the binding's namespace.
                if !namespaced && text(subject, "namespace").is_empty() {
                    causes.push(required(field("namespace"), ""));
                }
            }
            "User" | "Group" => {
                if api_group != RBAC {
                    causes.push(not_supported(field("apiGroup"), api_group, &[RBAC]));
                }
            }
            other => causes.push(not_supported(field("kind"), other, &["ServiceAccount", "User", "Group"])),
        }
    }
    if let Some(old) = old
        && old.get("roleRef") != obj.get("roleRef")
    {
        causes.push(invalid("roleRef".into(), &role_ref, "cannot change roleRef"));
    }
    causes
}
