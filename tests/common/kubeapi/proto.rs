//! Protobuf request bodies. kubectl's typed clients (`kubectl create secret`, `create
//! namespace`, `create configmap`, `create serviceaccount`, `create role`, `create
//! rolebinding`, `create clusterrole`, `create clusterrolebinding`) send built-in kinds as
//! protobuf and accept JSON back, and client-go does not fall back to JSON on a 415.
//! So the emulator reads those kinds' protobuf (the fields a client sets on create) and
//! answers JSON. Messages follow k8s.io/api's generated.proto; unknown fields are skipped.

use std::collections::BTreeMap;

use prost::Message;
use serde_json::{Map, Value, json};

use super::b64;
use super::resources::ResourceDef;
use super::status::ApiError;

/// Every protobuf body starts with this, then a `runtime.Unknown` envelope.
const MAGIC: &[u8] = b"k8s\0";

#[derive(Clone, PartialEq, Message)]
struct Unknown {
    #[prost(message, optional, tag = "1")]
    type_meta: Option<TypeMeta>,
    #[prost(bytes = "vec", optional, tag = "2")]
    raw: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
struct TypeMeta {
    #[prost(string, optional, tag = "1")]
    api_version: Option<String>,
    #[prost(string, optional, tag = "2")]
    kind: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct ObjectMeta {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    generate_name: Option<String>,
    #[prost(string, optional, tag = "3")]
    namespace: Option<String>,
    #[prost(string, optional, tag = "6")]
    resource_version: Option<String>,
    #[prost(btree_map = "string, string", tag = "11")]
    labels: BTreeMap<String, String>,
    #[prost(btree_map = "string, string", tag = "12")]
    annotations: BTreeMap<String, String>,
    #[prost(string, repeated, tag = "14")]
    finalizers: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
struct Secret {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(btree_map = "string, bytes", tag = "2")]
    data: BTreeMap<String, Vec<u8>>,
    #[prost(string, optional, tag = "3")]
    secret_type: Option<String>,
    #[prost(btree_map = "string, string", tag = "4")]
    string_data: BTreeMap<String, String>,
    #[prost(bool, optional, tag = "5")]
    immutable: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
struct ConfigMap {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(btree_map = "string, string", tag = "2")]
    data: BTreeMap<String, String>,
    #[prost(btree_map = "string, bytes", tag = "3")]
    binary_data: BTreeMap<String, Vec<u8>>,
    #[prost(bool, optional, tag = "4")]
    immutable: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
struct Namespace {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<NamespaceSpec>,
}

#[derive(Clone, PartialEq, Message)]
struct NamespaceSpec {
    #[prost(string, repeated, tag = "1")]
    finalizers: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
struct ServiceAccount {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(bool, optional, tag = "4")]
    automount_service_account_token: Option<bool>,
}

/// Role and ClusterRole (a ClusterRole's `aggregationRule`, field 3, is skipped).
#[derive(Clone, PartialEq, Message)]
struct Role {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, repeated, tag = "2")]
    rules: Vec<PolicyRule>,
}

#[derive(Clone, PartialEq, Message)]
struct PolicyRule {
    #[prost(string, repeated, tag = "1")]
    verbs: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    api_groups: Vec<String>,
    #[prost(string, repeated, tag = "3")]
    resources: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    resource_names: Vec<String>,
    #[prost(string, repeated, tag = "5")]
    non_resource_urls: Vec<String>,
}

/// RoleBinding and ClusterRoleBinding.
#[derive(Clone, PartialEq, Message)]
struct RoleBinding {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, repeated, tag = "2")]
    subjects: Vec<Subject>,
    #[prost(message, optional, tag = "3")]
    role_ref: Option<RoleRef>,
}

#[derive(Clone, PartialEq, Message)]
struct Subject {
    #[prost(string, optional, tag = "1")]
    kind: Option<String>,
    #[prost(string, optional, tag = "2")]
    api_group: Option<String>,
    #[prost(string, optional, tag = "3")]
    name: Option<String>,
    #[prost(string, optional, tag = "4")]
    namespace: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct RoleRef {
    #[prost(string, optional, tag = "1")]
    api_group: Option<String>,
    #[prost(string, optional, tag = "2")]
    kind: Option<String>,
    #[prost(string, optional, tag = "3")]
    name: Option<String>,
}

/// Decodes a protobuf body for `def` into its JSON form.
pub fn decode(def: &ResourceDef, body: &[u8]) -> Result<Value, ApiError> {
    let bad = |what: &dyn std::fmt::Display| ApiError::bad_request(format!("cannot decode the protobuf body: {what}"));
    let envelope = body.strip_prefix(MAGIC).ok_or_else(|| bad(&"no k8s protobuf magic prefix"))?;
    let unknown = Unknown::decode(envelope).map_err(|e| bad(&e))?;
    let raw = unknown.raw.unwrap_or_default();
    let type_meta = unknown.type_meta.unwrap_or_default();
    let mut obj = match def.kind {
        "Secret" => {
            let s = Secret::decode(raw.as_slice()).map_err(|e| bad(&e))?;
            let mut obj = json!({"metadata": metadata(s.metadata)});
            put_map(&mut obj, "data", s.data.iter().map(|(k, v)| (k, json!(b64::encode(v)))));
            put_map(&mut obj, "stringData", s.string_data.iter().map(|(k, v)| (k, json!(v))));
            put(&mut obj, "type", s.secret_type.map(Value::String));
            put(&mut obj, "immutable", s.immutable.map(Value::Bool));
            obj
        }
        "ConfigMap" => {
            let c = ConfigMap::decode(raw.as_slice()).map_err(|e| bad(&e))?;
            let mut obj = json!({"metadata": metadata(c.metadata)});
            put_map(&mut obj, "data", c.data.iter().map(|(k, v)| (k, json!(v))));
            put_map(&mut obj, "binaryData", c.binary_data.iter().map(|(k, v)| (k, json!(b64::encode(v)))));
            put(&mut obj, "immutable", c.immutable.map(Value::Bool));
            obj
        }
        "Namespace" => {
            let n = Namespace::decode(raw.as_slice()).map_err(|e| bad(&e))?;
            let mut obj = json!({"metadata": metadata(n.metadata)});
            if let Some(spec) = n.spec.filter(|s| !s.finalizers.is_empty()) {
                obj["spec"] = json!({"finalizers": spec.finalizers});
            }
            obj
        }
        "ServiceAccount" => {
            let sa = ServiceAccount::decode(raw.as_slice()).map_err(|e| bad(&e))?;
            let mut obj = json!({"metadata": metadata(sa.metadata)});
            put(&mut obj, "automountServiceAccountToken", sa.automount_service_account_token.map(Value::Bool));
            obj
        }
        "Role" | "ClusterRole" => {
            let role = Role::decode(raw.as_slice()).map_err(|e| bad(&e))?;
            let rules: Vec<Value> = role.rules.into_iter().map(policy_rule).collect();
            json!({"metadata": metadata(role.metadata), "rules": rules})
        }
        "RoleBinding" | "ClusterRoleBinding" => {
            let binding = RoleBinding::decode(raw.as_slice()).map_err(|e| bad(&e))?;
            let mut obj = json!({"metadata": metadata(binding.metadata)});
            if !binding.subjects.is_empty() {
                let subjects: Vec<Value> = binding
                    .subjects
                    .into_iter()
                    .map(|s| {
                        strings(&[
                            ("kind", s.kind),
                            ("apiGroup", s.api_group),
                            ("name", s.name),
                            ("namespace", s.namespace),
                        ])
                    })
                    .collect();
                obj["subjects"] = json!(subjects);
            }
            if let Some(r) = binding.role_ref {
                obj["roleRef"] = strings(&[("apiGroup", r.api_group), ("kind", r.kind), ("name", r.name)]);
            }
            obj
        }
        _ => return Err(ApiError::unsupported_media_type("application/vnd.kubernetes.protobuf")),
    };
    put(&mut obj, "apiVersion", type_meta.api_version.map(Value::String));
    put(&mut obj, "kind", type_meta.kind.map(Value::String));
    Ok(obj)
}

fn put(obj: &mut Value, field: &str, value: Option<Value>) {
    if let Some(value) = value {
        obj[field] = value;
    }
}

fn put_map<'a>(obj: &mut Value, field: &str, entries: impl Iterator<Item = (&'a String, Value)>) {
    let map: Map<String, Value> = entries.map(|(k, v)| (k.clone(), v)).collect();
    if !map.is_empty() {
        obj[field] = Value::Object(map);
    }
}

/// JSON lists of a rule; as in upstream's JSON, empty lists are left out (`omitempty`).
fn policy_rule(rule: PolicyRule) -> Value {
    let mut out = json!({});
    let lists = [
        ("verbs", rule.verbs),
        ("apiGroups", rule.api_groups),
        ("resources", rule.resources),
        ("resourceNames", rule.resource_names),
        ("nonResourceURLs", rule.non_resource_urls),
    ];
    for (field, list) in lists {
        // `verbs` is required, so upstream always writes it.
        if !list.is_empty() || field == "verbs" {
            out[field] = json!(list);
        }
    }
    out
}

/// An object of the string fields that are set and not empty (`omitempty`).
fn strings(fields: &[(&str, Option<String>)]) -> Value {
    let mut out = json!({});
    for (field, value) in fields {
        put(&mut out, field, value.clone().filter(|v| !v.is_empty()).map(Value::String));
    }
    out
}

fn metadata(meta: Option<ObjectMeta>) -> Value {
    let meta = meta.unwrap_or_default();
    let mut out = json!({});
    put(&mut out, "name", meta.name.filter(|n| !n.is_empty()).map(Value::String));
    put(&mut out, "generateName", meta.generate_name.filter(|n| !n.is_empty()).map(Value::String));
    put(&mut out, "namespace", meta.namespace.filter(|n| !n.is_empty()).map(Value::String));
    put(&mut out, "resourceVersion", meta.resource_version.filter(|n| !n.is_empty()).map(Value::String));
    put_map(&mut out, "labels", meta.labels.iter().map(|(k, v)| (k, json!(v))));
    put_map(&mut out, "annotations", meta.annotations.iter().map(|(k, v)| (k, json!(v))));
    if !meta.finalizers.is_empty() {
        out["finalizers"] = json!(meta.finalizers);
    }
    out
}
