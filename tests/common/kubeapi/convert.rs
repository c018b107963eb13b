//! Two API versions of one stored object. Upstream keeps `events.k8s.io/v1` Events and
//! core `v1` Events in one table, so an Event that kube-rs' recorder writes through
//! `events.k8s.io` shows in `kubectl get events` (core) as well. Stored form: core v1.

use serde_json::{Map, Value};

#[derive(Debug)]
pub struct Codec {
    pub to_storage: fn(&Value) -> Value,
    pub from_storage: fn(&Value) -> Value,
}

pub static EVENTS_V1: Codec = Codec { to_storage: event_v1_to_core, from_storage: event_core_to_v1 };

/// (events.k8s.io/v1 field, core/v1 field) for the fields whose names differ.
const EVENT_RENAMES: &[(&str, &str)] = &[
    ("note", "message"),
    ("regarding", "involvedObject"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

fn event_v1_to_core(v1: &Value) -> Value {
    rename(v1, "v1", |field| EVENT_RENAMES.iter().find(|(v1, _)| *v1 == field).map(|(_, core)| *core))
}

fn event_core_to_v1(core: &Value) -> Value {
    rename(core, "events.k8s.io/v1", |field| EVENT_RENAMES.iter().find(|(_, c)| *c == field).map(|(v1, _)| *v1))
}

fn rename(obj: &Value, api_version: &str, map: impl Fn(&str) -> Option<&'static str>) -> Value {
    let Some(fields) = obj.as_object() else { return obj.clone() };
    let mut out = Map::new();
    for (key, value) in fields {
        let key = map(key).map(str::to_string).unwrap_or_else(|| key.clone());
        out.insert(key, value.clone());
    }
    out.insert("apiVersion".into(), Value::String(api_version.into()));
    Value::Object(out)
}
