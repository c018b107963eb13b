//! Server-side printing: `kubectl get` asks for a `meta.k8s.io/v1` Table and prints
//! the server's columns (without one it falls back to NAME and AGE only). Columns
//! follow upstream's printers for each kind.

use serde_json::{Value, json};

use super::objects::{self, name_of};

#[derive(Debug)]
pub struct Column {
    pub name: &'static str,
    pub kind: &'static str,
    pub format: &'static str,
    pub description: &'static str,
    pub priority: u8,
}

const fn col(name: &'static str, kind: &'static str, description: &'static str) -> Column {
    Column { name, kind, format: "", description, priority: 0 }
}

#[derive(Debug)]
pub struct Printer {
    pub columns: &'static [Column],
    pub cells: fn(&Value, i64) -> Vec<Value>,
}

const NAME: Column = Column { format: "name", ..col("Name", "string", "Name must be unique within a namespace.") };
const AGE: Column =
    col("Age", "string", "CreationTimestamp is a timestamp representing the server time when this object was created.");

pub static SECRET: Printer = Printer {
    columns: &[
        NAME,
        col("Type", "string", "The type of the secret"),
        col("Data", "string", "The number of entries in the secret"),
        AGE,
    ],
    cells: |obj, now| {
        vec![
            json!(name_of(obj)),
            obj.get("type").cloned().unwrap_or(json!("")),
            json!(entries(obj, &["data"])),
            json!(age(obj, now)),
        ]
    },
};

pub static CONFIGMAP: Printer = Printer {
    columns: &[NAME, col("Data", "string", "The number of entries in the config map"), AGE],
    cells: |obj, now| vec![json!(name_of(obj)), json!(entries(obj, &["data", "binaryData"])), json!(age(obj, now))],
};

pub static NAMESPACE: Printer = Printer {
    columns: &[NAME, col("Status", "string", "The status of the namespace"), AGE],
    cells: |obj, now| {
        let phase = obj.pointer("/status/phase").cloned().unwrap_or(json!("Active"));
        vec![json!(name_of(obj)), phase, json!(age(obj, now))]
    },
};

pub static SERVICEACCOUNT: Printer = Printer {
    columns: &[NAME, col("Secrets", "string", "The number of secrets"), AGE],
    cells: |obj, now| vec![json!(name_of(obj)), json!(entries(obj, &["secrets"])), json!(age(obj, now))],
};

pub static LEASE: Printer = Printer {
    columns: &[NAME, col("Holder", "string", "The holder of the lease"), AGE],
    cells: |obj, now| {
        let holder = obj.pointer("/spec/holderIdentity").cloned().unwrap_or(json!(""));
        vec![json!(name_of(obj)), holder, json!(age(obj, now))]
    },
};

/// Role and ClusterRole: upstream prints the creation time itself, not an age.
pub static ROLE: Printer = Printer {
    columns: &[NAME, col("Created At", "date", "Time at which this role was created")],
    cells: |obj, _| {
        let created = obj.pointer("/metadata/creationTimestamp").cloned().unwrap_or(json!(""));
        vec![json!(name_of(obj)), created]
    },
};

/// RoleBinding and ClusterRoleBinding; the subject columns show with `-o wide` only.
pub static ROLEBINDING: Printer = Printer {
    columns: &[
        NAME,
        col("Role", "string", "Role referenced by this binding"),
        AGE,
        Column { priority: 1, ..col("Users", "string", "Users in this binding") },
        Column { priority: 1, ..col("Groups", "string", "Groups in this binding") },
        Column { priority: 1, ..col("ServiceAccounts", "string", "ServiceAccounts in this binding") },
    ],
    cells: |obj, now| {
        let field = |name: &str| obj.pointer(&format!("/roleRef/{name}")).and_then(Value::as_str).unwrap_or("");
        let subjects = obj.get("subjects").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        let of_kind = |kind: &str| {
            let names: Vec<String> = subjects
                .iter()
                .filter(|s| s.get("kind").and_then(Value::as_str) == Some(kind))
                .map(|s| {
                    let text = |f: &str| s.get(f).and_then(Value::as_str).unwrap_or("");
                    if kind == "ServiceAccount" {
                        format!("{}/{}", text("namespace"), text("name"))
                    } else {
                        text("name").to_string()
                    }
                })
                .collect();
            json!(names.join(", "))
        };
        vec![
            json!(name_of(obj)),
            json!(format!("{}/{}", field("kind"), field("name"))),
            json!(age(obj, now)),
            of_kind("User"),
            of_kind("Group"),
            of_kind("ServiceAccount"),
        ]
    },
};

/// What upstream prints for a kind without a printer of its own.
pub static DEFAULT: Printer =
    Printer { columns: &[NAME, AGE], cells: |obj, now| vec![json!(name_of(obj)), json!(age(obj, now))] };

/// Both Event forms: core (`involvedObject`, `message`) and events.k8s.io (`regarding`, `note`).
pub static EVENT: Printer = Printer {
    columns: &[
        col("Last Seen", "string", "Time when this Event was last seen"),
        col("Type", "string", "Type of this event (Normal, Warning)"),
        col("Reason", "string", "Reason why this event was generated"),
        col("Object", "string", "The object that this event is about"),
        col("Message", "string", "A human-readable description of the status of this operation"),
    ],
    cells: |obj, now| {
        let field = |names: &[&str]| names.iter().find_map(|n| obj.get(*n)).cloned().unwrap_or(Value::Null);
        let subject = field(&["involvedObject", "regarding"]);
        let object = format!(
            "{}/{}",
            subject.get("kind").and_then(Value::as_str).unwrap_or("").to_ascii_lowercase(),
            subject.get("name").and_then(Value::as_str).unwrap_or("")
        );
        let seen = ["lastTimestamp", "deprecatedLastTimestamp", "eventTime"]
            .iter()
            .find_map(|f| obj.get(*f).and_then(Value::as_str))
            .or_else(|| obj.pointer("/metadata/creationTimestamp").and_then(Value::as_str))
            .and_then(objects::parse_rfc3339)
            .map_or_else(|| "<unknown>".to_string(), |t| human_duration(now - t));
        let text = |v: Value| if v.is_null() { json!("") } else { v };
        vec![
            json!(seen),
            text(field(&["type"])),
            text(field(&["reason"])),
            json!(object),
            text(field(&["message", "note"])),
        ]
    },
};

fn entries(obj: &Value, fields: &[&str]) -> usize {
    fields
        .iter()
        .map(|f| match obj.get(*f) {
            Some(Value::Object(map)) => map.len(),
            Some(Value::Array(items)) => items.len(),
            _ => 0,
        })
        .sum()
}

fn age(obj: &Value, now: i64) -> String {
    obj.pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(objects::parse_rfc3339)
        .map_or_else(|| "<unknown>".to_string(), |t| human_duration(now - t))
}

/// kubectl's `duration.HumanDuration`: "5s", "3m2s", "10m", "5h", "2d3h", "45d".
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    let s = seconds.max(0);
    let (m, h) = (s / 60, s / 3600);
    let (d, y) = (h / 24, h / (24 * 365));
    let pair = |a: i64, ua: &str, b: i64, ub: &str| if b == 0 { format!("{a}{ua}") } else { format!("{a}{ua}{b}{ub}") };
    match () {
        _ if s < 120 => format!("{s}s"),
        _ if m < 10 => pair(m, "m", s % 60, "s"),
        _ if m < 180 => format!("{m}m"),
        _ if h < 8 => pair(h, "h", m % 60, "m"),
        _ if h < 48 => format!("{h}h"),
        _ if h < 24 * 8 => pair(d, "d", h % 24, "h"),
        _ if h < 24 * 365 * 2 => format!("{d}d"),
        _ if h < 24 * 365 * 8 => pair(y, "y", d % 365, "d"),
        _ => format!("{y}y"),
    }
}

/// What each row carries besides its cells (`includeObject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

pub fn partial_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
    })
}

pub fn table(
    printer: &Printer,
    api_version: &str,
    objects: &[&Value],
    list_meta: Value,
    include: IncludeObject,
    now: i64,
) -> Value {
    let columns: Vec<Value> = printer
        .columns
        .iter()
        .map(|c| {
            json!({
                "name": c.name, "type": c.kind, "format": c.format,
                "description": c.description, "priority": c.priority,
            })
        })
        .collect();
    let rows: Vec<Value> = objects
        .iter()
        .map(|obj| {
            let mut row = json!({"cells": (printer.cells)(obj, now)});
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => row["object"] = partial_metadata(obj),
                IncludeObject::Object => row["object"] = (*obj).clone(),
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": api_version,
        "metadata": list_meta,
        "columnDefinitions": columns,
        "rows": rows,
    })
}
