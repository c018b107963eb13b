//! Errors as the API server sends them: a `Status` object whose `reason` and `code`
//! clients branch on (kube-rs relists on 410, client-go retries on 409 Conflict...).

use serde_json::{Value, json};

use super::resources::ResourceDef;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { code, reason, message: message.into(), details: None }
    }

    fn with_details(mut self, details: Value) -> ApiError {
        self.details = Some(details);
        self
    }

    fn resource_details(def: &ResourceDef, name: &str) -> Value {
        let mut details = json!({"name": name, "kind": def.plural});
        if !def.group.is_empty() {
            details["group"] = json!(def.group);
        }
        details
    }

    fn qualified(def: &ResourceDef) -> String {
        if def.group.is_empty() { def.plural.to_string() } else { format!("{}.{}", def.plural, def.group) }
    }

    pub fn not_found(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", Self::qualified(def)))
            .with_details(Self::resource_details(def, name))
    }

    pub fn already_exists(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", Self::qualified(def)))
            .with_details(Self::resource_details(def, name))
    }

    /// The optimistic-concurrency failure every client-go retry loop knows.
    pub fn conflict(def: &ResourceDef, name: &str) -> ApiError {
        Self::conflict_because(
            def,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    pub fn conflict_because(def: &ResourceDef, name: &str, why: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {} \"{name}\": {why}", Self::qualified(def)),
        )
        .with_details(Self::resource_details(def, name))
    }

    /// `causes`: (field, reason, message), e.g. ("data[tls.crt]", "FieldValueRequired", "Required value").
    pub fn invalid(def: &ResourceDef, name: &str, causes: &[(String, &str, String)]) -> ApiError {
        let texts: Vec<String> = causes.iter().map(|(field, _, msg)| format!("{field}: {msg}")).collect();
        let summary = if texts.len() == 1 { texts[0].clone() } else { format!("[{}]", texts.join(", ")) };
        let causes: Vec<Value> = causes
            .iter()
            .map(|(field, reason, msg)| json!({"reason": reason, "message": msg, "field": field}))
            .collect();
        let mut details = json!({"name": name, "kind": def.kind, "causes": causes});
        if !def.group.is_empty() {
            details["group"] = json!(def.group);
        }
        ApiError::new(422, "Invalid", format!("{} \"{name}\" is invalid: {summary}", def.kind)).with_details(details)
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    /// 422 without field causes, as upstream answers a JSON patch `test` that fails.
    pub fn unprocessable(message: impl Into<String>) -> ApiError {
        ApiError::new(422, "Invalid", message)
    }

    pub fn expired(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    pub fn not_found_path() -> ApiError {
        ApiError::new(404, "NotFound", "the server could not find the requested resource")
            .with_details(json!({"causes": [{"reason": "UnexpectedServerResponse", "message": "404 page not found"}]}))
    }

    pub fn method_not_allowed(method: &str) -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )
    }

    pub fn unsupported_media_type(content_type: &str) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: \
                 application/json, application/merge-patch+json, application/strategic-merge-patch+json, \
                 application/json-patch+json, application/apply-patch+yaml (got {content_type:?})"
            ),
        )
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "InternalError", message)
    }

    pub fn unavailable() -> ApiError {
        ApiError::new(503, "ServiceUnavailable", "the server is currently unable to handle the request")
    }

    /// A list at a resourceVersion the server has not reached yet.
    pub fn too_large_resource_version(asked: u64, current: u64) -> ApiError {
        ApiError::new(504, "Timeout", format!("Timeout: Too large resource version: {asked}, current: {current}"))
            .with_details(json!({
                "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                "retryAfterSeconds": 1,
            }))
    }

    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

/// The Status a successful DELETE answers with.
pub fn deleted(def: &ResourceDef, name: &str, uid: &str) -> Value {
    let mut details = ApiError::resource_details(def, name);
    details["uid"] = json!(uid);
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details})
}
