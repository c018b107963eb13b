//! The API verbs over the store, independent of HTTP: create, update, patch, delete,
//! get and list, with upstream's preconditions, conflicts and no-op detection.

use serde_json::{Value, json};

use super::b64;
use super::objects::{self, name_of, namespace_of, resource_version_of, uid_of};
use super::patch::{self, PatchError, PatchType};
use super::resources::{self, ResourceDef};
use super::status::{self, ApiError};
use super::store::{Filter, Key, ListAt, ListError, Page, Store, Txn};

#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// `dryRun=All`: validate and answer, store nothing.
    pub dry_run: bool,
    pub field_manager: Option<String>,
}

/// The resource a verb acts on and the namespace from the URL (ignored, and "", for
/// cluster-scoped kinds).
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub def: &'static ResourceDef,
    pub namespace: &'a str,
}

impl Target<'_> {
    fn namespace(&self) -> &str {
        if self.def.namespaced { self.namespace } else { "" }
    }
}

fn require_namespace(txn: &Txn<'_>, target: Target<'_>) -> Result<(), ApiError> {
    if !target.def.namespaced {
        return Ok(());
    }
    let namespaces = resources::namespaces();
    match txn.get(namespaces, "", target.namespace) {
        Some(_) => Ok(()),
        None => Err(ApiError::not_found(namespaces, target.namespace)),
    }
}

/// Puts the URL's namespace into the body, refusing a body that names another one.
fn place(target: Target<'_>, body: &mut Value) -> Result<(), ApiError> {
    let meta = objects::metadata_mut(body);
    if !target.def.namespaced {
        meta.remove("namespace");
        return Ok(());
    }
    match meta.get("namespace").and_then(Value::as_str) {
        Some(ns) if !ns.is_empty() && ns != target.namespace => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => {
            meta.insert("namespace".into(), json!(target.namespace));
            Ok(())
        }
    }
}

pub fn create(store: &Store, target: Target<'_>, mut body: Value, opts: &WriteOptions) -> Result<Value, ApiError> {
    objects::check_type(target.def, &body)?;
    place(target, &mut body)?;
    if !resource_version_of(&body).is_empty() {
        return Err(ApiError::bad_request("resourceVersion should not be set on objects to be created"));
    }
    store.write(|txn| create_in(txn, target, body, opts))
}

fn create_in(txn: &mut Txn<'_>, target: Target<'_>, mut body: Value, opts: &WriteOptions) -> Result<Value, ApiError> {
    let def = target.def;
    require_namespace(txn, target)?;
    if name_of(&body).is_empty() {
        let prefix = body.pointer("/metadata/generateName").and_then(Value::as_str).unwrap_or("").to_string();
        if prefix.is_empty() {
            let cause = (
                "metadata.name".to_string(),
                "FieldValueRequired",
                "Required value: name or generateName is required".to_string(),
            );
            return Err(ApiError::invalid(def, "", &[cause]));
        }
        let name = loop {
            let candidate = format!("{prefix}{}", objects::random_suffix());
            if txn.get(def, target.namespace(), &candidate).is_none() {
                break candidate;
            }
        };
        objects::metadata_mut(&mut body).insert("name".into(), json!(name));
    }
    let name = name_of(&body).to_string();
    if txn.get(def, target.namespace(), &name).is_some() {
        return Err(ApiError::already_exists(def, &name));
    }
    objects::admit(def, &mut body, None)?;
    if opts.dry_run {
        return Ok(body);
    }
    Ok(txn.put(def, body))
}

/// PUT. Returns the object and whether it was created.
pub fn update(
    store: &Store,
    target: Target<'_>,
    name: &str,
    mut body: Value,
    opts: &WriteOptions,
) -> Result<(Value, bool), ApiError> {
    objects::check_type(target.def, &body)?;
    place(target, &mut body)?;
    let given = name_of(&body);
    if given != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({given}) does not match the name on the URL ({name})"
        )));
    }
    store.write(|txn| match txn.get(target.def, target.namespace(), name) {
        None if target.def.create_on_update => {
            objects::metadata_mut(&mut body).remove("resourceVersion");
            create_in(txn, target, body, opts).map(|obj| (obj, true))
        }
        None => Err(ApiError::not_found(target.def, name)),
        Some(current) => replace(txn, target, current, body, opts).map(|obj| (obj, false)),
    })
}

/// Writes `new` over `current`, honouring a resourceVersion or uid precondition in `new`.
fn replace(
    txn: &mut Txn<'_>,
    target: Target<'_>,
    current: Value,
    mut new: Value,
    opts: &WriteOptions,
) -> Result<Value, ApiError> {
    let def = target.def;
    let name = name_of(&current).to_string();
    let asked = resource_version_of(&new);
    if !asked.is_empty() && asked != resource_version_of(&current) {
        return Err(ApiError::conflict(def, &name));
    }
    let uid = uid_of(&new);
    if !uid.is_empty() && uid != uid_of(&current) {
        let why = format!("Precondition failed: UID in precondition: {}, UID in object meta: {uid}", uid_of(&current));
        return Err(ApiError::conflict_because(def, &name, &why));
    }
    objects::admit(def, &mut new, Some(&current))?;
    if !objects::changed(&new, &current) || opts.dry_run {
        return Ok(if opts.dry_run { new } else { current });
    }
    Ok(txn.put(def, new))
}

pub fn patch(
    store: &Store,
    target: Target<'_>,
    name: &str,
    patch_type: PatchType,
    body: &[u8],
    opts: &WriteOptions,
) -> Result<(Value, bool), ApiError> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| match patch_type {
        // kubectl and kube-rs send JSON (a subset of YAML) for server-side apply.
        PatchType::Apply => ApiError::bad_request(format!(
            "the emulator reads apply patches in their JSON form only (YAML flow style): {e}"
        )),
        _ => ApiError::bad_request(format!("error decoding patch: {e}")),
    })?;
    if patch_type == PatchType::Apply {
        if opts.field_manager.as_deref().is_none_or(str::is_empty) {
            let cause = (
                "fieldManager".to_string(),
                "FieldValueRequired",
                "Required value: is required for apply patch".to_string(),
            );
            return Err(ApiError::invalid(target.def, name, &[cause]));
        }
        objects::check_type(target.def, &doc)?;
    }
    store.write(|txn| {
        let Some(current) = txn.get(target.def, target.namespace(), name) else {
            if patch_type != PatchType::Apply {
                return Err(ApiError::not_found(target.def, name));
            }
            let mut body = doc.clone();
            place(target, &mut body)?;
            objects::metadata_mut(&mut body).insert("name".into(), json!(name));
            return create_in(txn, target, body, opts).map(|obj| (obj, true));
        };
        let mut new = current.clone();
        match patch_type {
            PatchType::Merge => patch::merge(&mut new, &doc),
            PatchType::Strategic => patch::strategic(&mut new, &doc),
            // Server-side apply reduced to "the applied fields win": no field ownership.
            PatchType::Apply => {
                let mut applied = doc.clone();
                objects::metadata_mut(&mut applied).remove("resourceVersion");
                patch::merge(&mut new, &applied)
            }
            PatchType::Json => patch::json_patch(&mut new, &doc).map_err(|e| match e {
                PatchError::Malformed(m) => ApiError::bad_request(m),
                PatchError::Failed(m) => ApiError::unprocessable(m),
            })?,
        }
        // Identity is not patchable; upstream rejects, keeping it is as good for tests.
        let meta = objects::metadata_mut(&mut new);
        meta.insert("name".into(), json!(name));
        if target.def.namespaced {
            meta.insert("namespace".into(), json!(target.namespace));
        }
        // A resourceVersion the patch did not set is the current one (no precondition).
        if patch_type == PatchType::Apply || !has_rv(&doc) {
            meta.remove("resourceVersion");
        }
        replace(txn, target, current, new, opts).map(|obj| (obj, false))
    })
}

fn has_rv(doc: &Value) -> bool {
    match doc {
        Value::Object(_) => doc.pointer("/metadata/resourceVersion").is_some_and(|v| !v.is_null()),
        // A JSON patch touching /metadata/resourceVersion sets a precondition too.
        Value::Array(ops) => {
            ops.iter().any(|op| op.get("path").and_then(Value::as_str) == Some("/metadata/resourceVersion"))
        }
        _ => false,
    }
}

/// DeleteOptions preconditions, from the request body.
#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub dry_run: bool,
}

impl DeleteOptions {
    pub fn from_body(body: &Value, dry_run: bool) -> DeleteOptions {
        let pre =
            |field: &str| body.pointer(&format!("/preconditions/{field}")).and_then(Value::as_str).map(String::from);
        let dry_run = dry_run || body.get("dryRun").and_then(Value::as_array).is_some_and(|a| !a.is_empty());
        DeleteOptions { uid: pre("uid"), resource_version: pre("resourceVersion"), dry_run }
    }
}

/// DELETE of one object: answers a Success Status, as upstream does for kinds without
/// graceful deletion. Deleting a namespace deletes everything in it at once (upstream
/// passes through Terminating first).
pub fn delete(store: &Store, target: Target<'_>, name: &str, opts: &DeleteOptions) -> Result<Value, ApiError> {
    let def = target.def;
    store.write(|txn| {
        let current = txn.get(def, target.namespace(), name).ok_or_else(|| ApiError::not_found(def, name))?;
        if opts.uid.as_deref().is_some_and(|uid| uid != uid_of(&current)) {
            let why = format!(
                "Precondition failed: UID in precondition: {}, UID in object meta: {}",
                opts.uid.as_deref().unwrap_or(""),
                uid_of(&current)
            );
            return Err(ApiError::conflict_because(def, name, &why));
        }
        if opts.resource_version.as_deref().is_some_and(|rv| rv != resource_version_of(&current)) {
            return Err(ApiError::conflict(def, name));
        }
        if !opts.dry_run {
            if def.plural == "namespaces" {
                for key in txn.keys_in_namespace(name) {
                    txn.delete_key(&key);
                }
            }
            txn.delete(def, target.namespace(), name);
        }
        Ok(status::deleted(def, name, uid_of(&current)))
    })
}

/// DELETE on a collection: removes what the selectors match, answers the removed list.
pub fn delete_collection(store: &Store, filter: &Filter, dry_run: bool) -> Vec<Value> {
    store.write(|txn| {
        let doomed: Vec<Value> = txn.list(filter).into_iter().filter(|o| filter.matches(o)).collect();
        if !dry_run {
            for obj in &doomed {
                txn.delete(filter.def, namespace_of(obj), name_of(obj));
            }
        }
        doomed
    })
}

pub fn get(store: &Store, target: Target<'_>, name: &str) -> Result<Value, ApiError> {
    store
        .write(|txn| txn.get(target.def, target.namespace(), name))
        .ok_or_else(|| ApiError::not_found(target.def, name))
}

#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
}

pub struct ListResult {
    pub items: Vec<std::sync::Arc<Value>>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
    pub remaining: Option<usize>,
}

pub fn list(store: &Store, filter: &Filter, opts: &ListOptions) -> Result<ListResult, ApiError> {
    let parse_rv = |text: &str| {
        text.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid resource version: {text:?}")))
    };
    let asked = opts.resource_version.as_deref().filter(|rv| !rv.is_empty());
    let (at, after) = if let Some(token) = &opts.continue_token {
        let (rv, key) = decode_continue(token, filter)?;
        (ListAt::Exact(rv), Some(key))
    } else {
        let at = match (opts.resource_version_match.as_deref().filter(|m| !m.is_empty()), asked) {
            (Some("Exact"), Some(rv)) if rv != "0" => ListAt::Exact(parse_rv(rv)?),
            (Some("Exact"), _) => {
                return Err(ApiError::bad_request("resourceVersionMatch=Exact needs a non-zero resourceVersion"));
            }
            (Some("NotOlderThan") | None, Some(rv)) => {
                let rv = parse_rv(rv)?;
                let current = store.current_rv();
                if rv > current {
                    return Err(ApiError::too_large_resource_version(rv, current));
                }
                ListAt::Latest
            }
            (None, None) => ListAt::Latest,
            (Some("NotOlderThan"), None) => {
                return Err(ApiError::bad_request(
                    "resourceVersionMatch is forbidden unless resourceVersion is provided",
                ));
            }
            (Some(other), _) => {
                return Err(ApiError::bad_request(format!("unsupported resourceVersionMatch {other:?}")));
            }
        };
        (at, None)
    };
    let page: Page = store.list(filter, at, after.as_ref(), opts.limit.filter(|l| *l > 0)).map_err(|e| match e {
        ListError::Expired { asked, oldest } if opts.continue_token.is_some() => ApiError::expired(format!(
            "The provided continue parameter is too old to display a consistent list result. You can start a \
             new list without the continue parameter. (resourceVersion {asked} is older than {oldest})"
        )),
        ListError::Expired { asked, oldest } => {
            ApiError::expired(format!("too old resource version: {asked} ({oldest})"))
        }
        ListError::TooLarge { asked, current } => ApiError::too_large_resource_version(asked, current),
    })?;
    let continue_token = page.last.as_ref().map(|key| encode_continue(page.rv, key));
    let remaining = continue_token.as_ref().map(|_| page.remaining);
    Ok(ListResult { items: page.items, resource_version: page.rv, continue_token, remaining })
}

/// Opaque to clients; like upstream's, it carries the list's resourceVersion and the
/// key to resume after.
fn encode_continue(rv: u64, key: &Key) -> String {
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "ns": key.namespace, "name": key.name});
    b64::encode(token.to_string().as_bytes())
}

fn decode_continue(token: &str, filter: &Filter) -> Result<(u64, Key), ApiError> {
    let bad = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
    let raw = b64::decode(token).map_err(|_| bad())?;
    let doc: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rv = doc.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
    let field = |name: &str| doc.get(name).and_then(Value::as_str).map(String::from).ok_or_else(bad);
    Ok((rv, Key { storage: filter.def.storage, namespace: field("ns")?, name: field("name")? }))
}
