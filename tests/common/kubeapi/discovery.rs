//! Discovery documents, all derived from the resource table: `/version`, the legacy
//! `/api`, `/api/v1`, `/apis`, `/apis/G`, `/apis/G/V` documents, the aggregated form
//! (`apidiscovery.k8s.io/v2`) kubectl 1.32 asks for first, and the OpenAPI v3 index
//! kubectl reads to learn that the server validates fields itself. (An empty OpenAPI v2
//! document is served in routes.rs.) `crds`: whether the custom resources' CRDs are
//! installed; without them their groups are not served at all.

use serde_json::{Value, json};

use super::resources::{self, ResourceDef};

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0+certwire-emulator",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.23.4",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

pub fn api_versions(port: u16) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": format!("127.0.0.1:{port}")}],
    })
}

fn group_version(group: &str, version: &str) -> String {
    if group.is_empty() { version.to_string() } else { format!("{group}/{version}") }
}

fn api_resource(def: &ResourceDef) -> Value {
    let mut resource = json!({
        "name": def.plural,
        "singularName": def.singular(),
        "namespaced": def.namespaced,
        "kind": def.kind,
        "verbs": def.verbs(),
    });
    if !def.short_names.is_empty() {
        resource["shortNames"] = json!(def.short_names);
    }
    resource
}

/// `/api/v1` or `/apis/G/V`.
pub fn resource_list(group: &str, version: &str, crds: bool) -> Option<Value> {
    let resources: Vec<Value> = resources::in_group_version(group, version, crds).map(api_resource).collect();
    if resources.is_empty() {
        return None;
    }
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version(group, version),
        "resources": resources,
    }))
}

fn named_groups(crds: bool) -> Vec<(&'static str, Vec<&'static str>)> {
    let mut groups: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    for (group, version) in resources::group_versions(crds).into_iter().filter(|(g, _)| !g.is_empty()) {
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, versions)) => versions.push(version),
            None => groups.push((group, vec![version])),
        }
    }
    groups
}

fn api_group(name: &str, versions: &[&str]) -> Value {
    let versions: Vec<Value> =
        versions.iter().map(|v| json!({"groupVersion": group_version(name, v), "version": v})).collect();
    json!({"name": name, "versions": versions, "preferredVersion": versions[0]})
}

pub fn group_list(crds: bool) -> Value {
    let groups: Vec<Value> = named_groups(crds).iter().map(|(name, versions)| api_group(name, versions)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn group(name: &str, crds: bool) -> Option<Value> {
    let groups = named_groups(crds);
    let (name, versions) = groups.iter().find(|(g, _)| *g == name)?;
    let mut group = api_group(name, versions);
    group["kind"] = json!("APIGroup");
    group["apiVersion"] = json!("v1");
    Some(group)
}

/// The aggregated-discovery version asked for in `Accept`, if any (`v2` or `v2beta1`,
/// which share one schema).
pub fn aggregated_version(accept: Option<&str>) -> Option<&'static str> {
    for entry in accept.unwrap_or("").split(',') {
        let params: Vec<&str> = entry.split(';').map(str::trim).collect();
        if params.contains(&"g=apidiscovery.k8s.io") && params.contains(&"as=APIGroupDiscoveryList") {
            if params.contains(&"v=v2") {
                return Some("v2");
            }
            if params.contains(&"v=v2beta1") {
                return Some("v2beta1");
            }
        }
    }
    None
}

pub fn aggregated_content_type(version: &str) -> String {
    format!("application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList")
}

/// `/api` (`legacy`, the core group) or `/apis` (named groups) in aggregated form.
pub fn aggregated(legacy: bool, version: &str, crds: bool) -> Value {
    let groups: Vec<(&str, Vec<&str>)> = if legacy { vec![("", vec!["v1"])] } else { named_groups(crds) };
    let items: Vec<Value> = groups
        .iter()
        .map(|(group, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|v| {
                    let resources: Vec<Value> = resources::in_group_version(group, v, crds)
                        .map(|def| {
                            let mut r = json!({
                                "resource": def.plural,
                                "responseKind": {"group": def.group, "version": def.version, "kind": def.kind},
                                "scope": if def.namespaced { "Namespaced" } else { "Cluster" },
                                "singularResource": def.singular(),
                                "verbs": def.verbs(),
                            });
                            if !def.short_names.is_empty() {
                                r["shortNames"] = json!(def.short_names);
                            }
                            r
                        })
                        .collect();
                    json!({"version": v, "resources": resources, "freshness": "Current"})
                })
                .collect();
            json!({"metadata": {"name": group, "creationTimestamp": null}, "versions": versions})
        })
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": format!("apidiscovery.k8s.io/{version}"),
        "metadata": {},
        "items": items,
    })
}

fn openapi_path(group: &str, version: &str) -> String {
    if group.is_empty() { format!("api/{version}") } else { format!("apis/{group}/{version}") }
}

/// `/openapi/v3`: one entry per group version; the hash makes clients' caches fresh.
pub fn openapi_v3_index(crds: bool) -> Value {
    let mut paths = serde_json::Map::new();
    for (group, version) in resources::group_versions(crds) {
        let path = openapi_path(group, version);
        paths.insert(path.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash=CERTWIRE0EMULATOR")}));
    }
    json!({"paths": paths})
}

/// `/openapi/v3/api/v1` and the like: only the PATCH operations, each declaring the
/// `fieldValidation` parameter. kubectl checks exactly that to decide the server
/// validates (`--validate=strict`) instead of validating against a full schema client
/// side. No request bodies are declared, so kubectl's apply computes strategic merge
/// patches from its compiled-in types, as it does for built-in kinds anyway.
pub fn openapi_v3_group_version(path: &str, crds: bool) -> Option<Value> {
    let (group, version) = resources::group_versions(crds).into_iter().find(|(g, v)| openapi_path(g, v) == path)?;
    let mut paths = serde_json::Map::new();
    // Reviews have no PATCH upstream either (create only).
    for def in resources::in_group_version(group, version, crds).filter(|d| !d.review) {
        let prefix = format!("/{}", openapi_path(group, version));
        let url = if def.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", def.plural)
        } else {
            format!("{prefix}/{}/{{name}}", def.plural)
        };
        let operation = json!({
            "operationId": format!("patch{}", def.kind),
            "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": {"group": def.group, "version": def.version, "kind": def.kind},
            "parameters": [
                {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                {"name": "force", "in": "query", "schema": {"type": "boolean", "uniqueItems": true}},
            ],
            "responses": {"200": {"description": "OK"}},
        });
        paths.insert(url, json!({"patch": operation}));
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0+certwire-emulator"},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}
