//! What the API server does to an object on its way in: server-owned metadata, per-kind
//! defaults and validation. Only the rules a client of these kinds can observe.

use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::b64;
use super::rbac;
use super::resources::ResourceDef;
use super::status::ApiError;

pub fn name_of(obj: &Value) -> &str {
    obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("")
}

pub fn namespace_of(obj: &Value) -> &str {
    obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("")
}

pub fn resource_version_of(obj: &Value) -> &str {
    obj.pointer("/metadata/resourceVersion").and_then(Value::as_str).unwrap_or("")
}

pub fn uid_of(obj: &Value) -> &str {
    obj.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or("")
}

/// `metadata` as a map, created when missing.
pub fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    obj["metadata"].as_object_mut().expect("made an object above")
}

/// The body's apiVersion and kind, when present, must name this resource.
pub fn check_type(def: &ResourceDef, body: &Value) -> Result<(), ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request("the body of the request is not a JSON object"));
    }
    let api_version = def.api_version();
    if let Some(given) = body.get("apiVersion").and_then(Value::as_str).filter(|v| !v.is_empty())
        && given != api_version
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({given}) does not match the expected API version ({api_version})"
        )));
    }
    if let Some(given) = body.get("kind").and_then(Value::as_str).filter(|k| !k.is_empty())
        && given != def.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({given}) does not match the expected kind ({})",
            def.kind
        )));
    }
    Ok(())
}

pub fn now_rfc3339() -> String {
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).expect("zero nanoseconds is valid");
    now.format(&Rfc3339).expect("RFC 3339 formats any UTC time")
}

/// Seconds since the epoch of an RFC 3339 UTC time (`2024-05-01T10:00:00Z`, optionally
/// with fractional seconds, as MicroTime has), without pulling in `time`'s parser.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| text.get(range)?.parse::<i64>().ok();
    let month = time::Month::try_from(u8::try_from(num(5..7)?).ok()?).ok()?;
    let date =
        time::Date::from_calendar_date(i32::try_from(num(0..4)?).ok()?, month, u8::try_from(num(8..10)?).ok()?).ok()?;
    let clock = time::Time::from_hms(
        u8::try_from(num(11..13)?).ok()?,
        u8::try_from(num(14..16)?).ok()?,
        u8::try_from(num(17..19)?).ok()?,
    )
    .ok()?;
    Some(time::PrimitiveDateTime::new(date, clock).assume_utc().unix_timestamp())
}

pub fn random_uid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// The 5-character suffix `generateName` gets upstream, from the same alphabet
/// (no vowels, so no words).
pub fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    random_bytes::<5>().iter().map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char).collect()
}

fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; N];
    ring::rand::SystemRandom::new().fill(&mut bytes).expect("system randomness");
    bytes
}

/// RFC 1123 subdomain (most kinds) or label (namespaces); `None` when valid.
fn name_problem(def: &ResourceDef, name: &str) -> Option<String> {
    let label = def.plural == "namespaces";
    let max = if label { 63 } else { 253 };
    let part_ok = |part: &str| {
        !part.is_empty()
            && part.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            && !part.starts_with('-')
            && !part.ends_with('-')
    };
    let ok = name.len() <= max && if label { part_ok(name) } else { name.split('.').all(part_ok) };
    if ok {
        return None;
    }
    Some(if label {
        format!(
            "Invalid value: \"{name}\": a lowercase RFC 1123 label must consist of lower case alphanumeric \
             characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or \
             '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
        )
    } else {
        format!(
            "Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric \
             characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', \
             regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
        )
    })
}

/// Sets what the server owns and applies the kind's rules. `old` is the stored object
/// for an update, `None` for a create. The result is ready to store except for its
/// resourceVersion.
pub fn admit(def: &ResourceDef, obj: &mut Value, old: Option<&Value>) -> Result<(), ApiError> {
    obj["apiVersion"] = json!(def.api_version());
    obj["kind"] = json!(def.kind);
    let name = name_of(obj).to_string();
    if let Some(problem) = name_problem(def, &name) {
        return Err(ApiError::invalid(def, &name, &[("metadata.name".into(), "FieldValueInvalid", problem)]));
    }
    let meta = metadata_mut(obj);
    match old {
        None => {
            meta.insert("uid".into(), json!(random_uid()));
            meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
            if def.generation {
                meta.insert("generation".into(), json!(1));
            }
        }
        Some(old) => {
            for field in ["uid", "creationTimestamp", "generation"] {
                match old.pointer(&format!("/metadata/{field}")) {
                    Some(value) => meta.insert(field.into(), value.clone()),
                    None => meta.remove(field),
                };
            }
        }
    }
    meta.remove("resourceVersion");
    meta.remove("selfLink");
    match def.kind {
        "Secret" => admit_secret(def, obj, old)?,
        "Namespace" => admit_namespace(obj, old),
        "Role" | "ClusterRole" | "RoleBinding" | "ClusterRoleBinding" => rbac::admit(def, obj, old)?,
        "Event" if def.group == "events.k8s.io" => admit_event_v1(def, obj)?,
        _ => {}
    }
    if let (true, Some(old)) = (def.generation, old)
        && without_metadata(obj) != without_metadata(old)
    {
        let generation = old.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0) + 1;
        obj["metadata"]["generation"] = json!(generation);
    }
    Ok(())
}

fn without_metadata(obj: &Value) -> Value {
    let mut copy = obj.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    copy
}

/// True when `new` (admitted) differs from `old` in more than its resourceVersion: an
/// update that changes nothing is not a write upstream (no new version, no event).
pub fn changed(new: &Value, old: &Value) -> bool {
    let mut old = old.clone();
    metadata_mut(&mut old).remove("resourceVersion");
    *new != old
}

/// Upstream's `NoteLengthLimit`: an `events.k8s.io/v1` Event's note is at most 1024
/// bytes (apis/core/validation/events.go), and a longer one is refused, not cut.
fn admit_event_v1(def: &ResourceDef, obj: &Value) -> Result<(), ApiError> {
    const NOTE_LENGTH_LIMIT: usize = 1024;
    let note = obj.get("note").and_then(Value::as_str).unwrap_or_default();
    if note.len() <= NOTE_LENGTH_LIMIT {
        return Ok(());
    }
    let problem = format!("Too long: may not be more than {NOTE_LENGTH_LIMIT} bytes");
    Err(ApiError::invalid(def, name_of(obj), &[("note".into(), "FieldValueTooLong", problem)]))
}

fn admit_secret(def: &ResourceDef, obj: &mut Value, old: Option<&Value>) -> Result<(), ApiError> {
    let name = name_of(obj).to_string();
    let map = obj.as_object_mut().expect("checked by check_type");
    let mut data = match map.remove("data") {
        Some(Value::Object(data)) => data,
        Some(Value::Null) | None => Map::new(),
        Some(_) => return Err(ApiError::bad_request("Secret.data must be an object of base64 strings")),
    };
    for (key, value) in &data {
        let text = value.as_str().ok_or_else(|| {
            ApiError::bad_request(format!(
                "Secret in version \"v1\" cannot be handled as a Secret: data[{key}] is not a string"
            ))
        })?;
        b64::decode(text).map_err(|e| {
            ApiError::bad_request(format!("Secret in version \"v1\" cannot be handled as a Secret: {e}"))
        })?;
    }
    // Upstream converts write-only stringData into data on the way in; it wins over data.
    if let Some(string_data) = map.remove("stringData") {
        for (key, value) in string_data.as_object().into_iter().flatten() {
            let text = value.as_str().unwrap_or_default();
            data.insert(key.clone(), json!(b64::encode(text.as_bytes())));
        }
    }
    let secret_type = map.get("type").and_then(Value::as_str).filter(|t| !t.is_empty()).unwrap_or("Opaque").to_string();
    map.insert("type".into(), json!(secret_type));
    let mut causes = Vec::new();
    if secret_type == "kubernetes.io/tls" {
        for key in ["tls.crt", "tls.key"] {
            if !data.contains_key(key) {
                causes.push((format!("data[{key}]"), "FieldValueRequired", "Required value".to_string()));
            }
        }
    }
    if let Some(old) = old {
        let old_type = old.get("type").and_then(Value::as_str).unwrap_or("Opaque");
        if old_type != secret_type {
            causes.push((
                "type".into(),
                "FieldValueInvalid",
                format!("Invalid value: \"{secret_type}\": field is immutable"),
            ));
        }
        let old_data = old.get("data").cloned().unwrap_or_else(|| json!({}));
        if old.get("immutable") == Some(&json!(true)) && old_data != Value::Object(data.clone()) {
            causes.push((
                "data".into(),
                "FieldValueForbidden",
                "Forbidden: field is immutable when `immutable` is set".into(),
            ));
        }
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid(def, &name, &causes));
    }
    if !data.is_empty() {
        map.insert("data".into(), Value::Object(data));
    }
    Ok(())
}

fn admit_namespace(obj: &mut Value, old: Option<&Value>) {
    match old {
        // Status belongs to the status subresource: a plain update cannot change it.
        Some(old) => obj["status"] = old.get("status").cloned().unwrap_or_else(|| json!({"phase": "Active"})),
        None => {
            if obj.pointer("/spec/finalizers").is_none() {
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
            }
            obj["status"] = json!({"phase": "Active"});
        }
    }
}
