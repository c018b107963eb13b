//! Content negotiation: which representation the client asked for in `Accept`, and
//! the object, list or watch event in that representation. JSON only: a client that
//! prefers protobuf (kubectl does for some calls) lists JSON as an alternative.

use std::sync::Arc;

use serde_json::{Value, json};

use super::resources::ResourceDef;
use super::table::{self, IncludeObject};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Render {
    /// The objects themselves.
    Plain,
    /// `as=PartialObjectMetadata[List]`: metadata only (kube-rs' metadata watcher).
    Metadata,
    /// `as=Table`: server-side printing for kubectl (`v1` or `v1beta1`).
    Table { v1beta1: bool, include: IncludeObject },
}

/// `Accept: a;p=v, b, ...`: the first representation the emulator can produce. Anything
/// unknown (protobuf, YAML) is skipped, and when nothing is left, JSON is answered.
pub fn negotiate(accept: Option<&str>, include_object: Option<&str>) -> Render {
    let include = match include_object {
        Some("None") => IncludeObject::None,
        Some("Object") => IncludeObject::Object,
        _ => IncludeObject::Metadata,
    };
    for entry in accept.unwrap_or("").split(',') {
        let mut parts = entry.split(';').map(str::trim);
        let media = parts.next().unwrap_or("");
        if !matches!(media, "application/json" | "*/*" | "application/*") {
            continue;
        }
        let params: Vec<(&str, &str)> = parts.filter_map(|p| p.split_once('=')).collect();
        let param = |name: &str| params.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        match (param("as"), param("g"), param("v")) {
            (None, _, _) => return Render::Plain,
            (Some("Table"), Some("meta.k8s.io"), Some(v @ ("v1" | "v1beta1"))) => {
                return Render::Table { v1beta1: v == "v1beta1", include };
            }
            (Some("PartialObjectMetadata" | "PartialObjectMetadataList"), Some("meta.k8s.io"), Some("v1")) => {
                return Render::Metadata;
            }
            _ => continue,
        }
    }
    Render::Plain
}

impl Render {
    pub fn content_type(self) -> &'static str {
        match self {
            Render::Plain => "application/json",
            Render::Metadata => "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1",
            Render::Table { v1beta1: false, .. } => "application/json;as=Table;g=meta.k8s.io;v=v1",
            Render::Table { v1beta1: true, .. } => "application/json;as=Table;g=meta.k8s.io;v=v1beta1",
        }
    }

    fn table_version(self) -> &'static str {
        match self {
            Render::Table { v1beta1: true, .. } => "meta.k8s.io/v1beta1",
            _ => "meta.k8s.io/v1",
        }
    }

    pub fn object(self, def: &ResourceDef, obj: &Value) -> Value {
        match self {
            Render::Plain => obj.clone(),
            Render::Metadata => table::partial_metadata(obj),
            Render::Table { include, .. } => {
                let meta =
                    json!({"resourceVersion": obj.pointer("/metadata/resourceVersion").cloned().unwrap_or(json!(""))});
                table::table(def.printer, self.table_version(), &[obj], meta, include, now())
            }
        }
    }

    /// `list_meta`: `resourceVersion`, and `continue` / `remainingItemCount` when paged.
    pub fn list(self, def: &ResourceDef, items: &[Arc<Value>], list_meta: Value) -> Value {
        match self {
            // Upstream leaves apiVersion and kind out of list items; clients fill them in.
            Render::Plain => {
                let items: Vec<Value> = items
                    .iter()
                    .map(|obj| {
                        let mut item = (**obj).clone();
                        if let Some(map) = item.as_object_mut() {
                            map.remove("apiVersion");
                            map.remove("kind");
                        }
                        item
                    })
                    .collect();
                let kind = format!("{}List", def.kind);
                json!({"kind": kind, "apiVersion": def.api_version(), "metadata": list_meta, "items": items})
            }
            Render::Metadata => {
                let items: Vec<Value> = items.iter().map(|obj| table::partial_metadata(obj)).collect();
                let (kind, api_version) = ("PartialObjectMetadataList", "meta.k8s.io/v1");
                json!({"kind": kind, "apiVersion": api_version, "metadata": list_meta, "items": items})
            }
            Render::Table { include, .. } => {
                let refs: Vec<&Value> = items.iter().map(|o| o.as_ref()).collect();
                table::table(def.printer, self.table_version(), &refs, list_meta, include, now())
            }
        }
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}
