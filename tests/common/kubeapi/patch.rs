//! The PATCH body formats: JSON merge patch (RFC 7386), strategic merge patch reduced
//! to a merge patch (enough for kinds without merge-keyed lists, like Secrets and
//! Leases), and JSON patch (RFC 6902).

use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Strategic,
    Json,
    Apply,
}

impl PatchType {
    pub fn from_content_type(content_type: &str) -> Option<PatchType> {
        let media = content_type.split(';').next().unwrap_or("").trim();
        match media {
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/json-patch+json" => Some(PatchType::Json),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(PatchType::Apply),
            _ => None,
        }
    }
}

/// Why a patch could not be applied; the caller picks the HTTP status.
#[derive(Debug)]
pub enum PatchError {
    /// The patch document itself is malformed (400 upstream).
    Malformed(String),
    /// A well-formed patch that does not apply, like a failed `test` (422 upstream).
    Failed(String),
}

pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let object = target.as_object_mut().expect("made an object above");
    for (key, value) in fields {
        if value.is_null() {
            object.remove(key);
        } else {
            merge(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// A strategic merge patch without the list-merge directives: `$patch: delete` and
/// `$patch: replace` on maps are honoured, every other `$` directive is dropped.
pub fn strategic(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    match fields.get("$patch").and_then(Value::as_str) {
        Some("delete") => {
            *target = Value::Null;
            return;
        }
        Some("replace") => {
            *target = Value::Object(Map::new());
        }
        _ => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let object = target.as_object_mut().expect("made an object above");
    for (key, value) in fields.iter().filter(|(k, _)| !k.starts_with('$')) {
        if value.is_null() {
            object.remove(key);
            continue;
        }
        let slot = object.entry(key.clone()).or_insert(Value::Null);
        strategic(slot, value);
        if slot.is_null() {
            object.remove(key);
        }
    }
}

pub fn json_patch(target: &mut Value, ops: &Value) -> Result<(), PatchError> {
    let ops = ops.as_array().ok_or_else(|| PatchError::Malformed("a JSON patch must be an array".into()))?;
    for op in ops {
        let field = |name: &str| {
            op.get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| PatchError::Malformed(format!("operation {op} has no string {name:?}")))
        };
        let value = || op.get("value").cloned().ok_or_else(|| PatchError::Malformed(format!("{op} has no value")));
        let path = pointer(field("path")?)?;
        match field("op")? {
            "add" => add(target, &path, value()?)?,
            "remove" => {
                remove(target, &path)?;
            }
            "replace" => {
                remove(target, &path)?;
                add(target, &path, value()?)?;
            }
            "move" => {
                let moved = remove(target, &pointer(field("from")?)?)?;
                add(target, &path, moved)?;
            }
            "copy" => {
                let copied = get(target, &pointer(field("from")?)?)?.clone();
                add(target, &path, copied)?;
            }
            "test" => {
                if *get(target, &path)? != value()? {
                    return Err(PatchError::Failed(format!("testing value {} failed", field("path")?)));
                }
            }
            other => return Err(PatchError::Malformed(format!("unexpected operation {other:?}"))),
        }
    }
    Ok(())
}

fn pointer(text: &str) -> Result<Vec<String>, PatchError> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let rest = text.strip_prefix('/').ok_or_else(|| PatchError::Malformed(format!("invalid JSON pointer {text:?}")))?;
    Ok(rest.split('/').map(|t| t.replace("~1", "/").replace("~0", "~")).collect())
}

fn missing(path: &[String]) -> PatchError {
    PatchError::Failed(format!("path /{} does not exist", path.join("/")))
}

fn get<'a>(target: &'a Value, path: &[String]) -> Result<&'a Value, PatchError> {
    let mut node = target;
    for token in path {
        node = match node {
            Value::Object(map) => map.get(token),
            Value::Array(items) => token.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        }
        .ok_or_else(|| missing(path))?;
    }
    Ok(node)
}

fn parent<'a>(target: &'a mut Value, path: &[String]) -> Result<&'a mut Value, PatchError> {
    let mut node = target;
    for token in &path[..path.len() - 1] {
        node = match node {
            Value::Object(map) => map.get_mut(token),
            Value::Array(items) => token.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| missing(path))?;
    }
    Ok(node)
}

fn add(target: &mut Value, path: &[String], value: Value) -> Result<(), PatchError> {
    let Some(last) = path.last() else {
        *target = value;
        return Ok(());
    };
    match parent(target, path)? {
        Value::Object(map) => {
            map.insert(last.clone(), value);
        }
        Value::Array(items) => {
            let index = if last == "-" { items.len() } else { last.parse::<usize>().map_err(|_| missing(path))? };
            if index > items.len() {
                return Err(missing(path));
            }
            items.insert(index, value);
        }
        _ => return Err(missing(path)),
    }
    Ok(())
}

fn remove(target: &mut Value, path: &[String]) -> Result<Value, PatchError> {
    let last = path.last().ok_or_else(|| PatchError::Failed("cannot remove the whole document".into()))?;
    match parent(target, path)? {
        Value::Object(map) => map.remove(last).ok_or_else(|| missing(path)),
        Value::Array(items) => match last.parse::<usize>() {
            Ok(index) if index < items.len() => Ok(items.remove(index)),
            _ => Err(missing(path)),
        },
        _ => Err(missing(path)),
    }
}
