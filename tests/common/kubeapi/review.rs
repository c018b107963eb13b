//! `POST /apis/authorization.k8s.io/v1/subjectaccessreviews`: a question about someone
//! else's access, answered by the RBAC authorizer and never stored. The answer is the
//! review as sent plus `status` (201 Created, as upstream), so a client reads it with
//! the same type it wrote.
//!
//! Every answered review is kept for tests (what was asked, what was answered), and a
//! test can make reviews fail to exercise a caller's error path.

use serde_json::{Value, json};

use super::authorizer::{self, Attributes, Request};
use super::control::Shared;
use super::objects::{self, check_type};
use super::resources::ResourceDef;
use super::status::ApiError;

pub fn create(shared: &Shared, def: &ResourceDef, mut review: Value) -> Result<Value, ApiError> {
    if shared.reviews_fail() {
        return Err(ApiError::internal("injected failure for SubjectAccessReview (fail_reviews)"));
    }
    check_type(def, &review)?;
    let asked = attributes(def, &review)?;
    let decision = authorizer::authorize(&shared.store, &asked);
    review["apiVersion"] = json!(def.api_version());
    review["kind"] = json!(def.kind);
    // Upstream echoes the request's metadata, whose zero creationTimestamp shows as null.
    objects::metadata_mut(&mut review).entry("creationTimestamp").or_insert(Value::Null);
    let mut status = json!({"allowed": decision.allowed});
    if !decision.reason.is_empty() {
        status["reason"] = json!(decision.reason);
    }
    review["status"] = status;
    shared.record_review(review.clone());
    Ok(review)
}

/// ValidateSubjectAccessReviewSpec, then the spec as authorizer attributes.
fn attributes(def: &ResourceDef, review: &Value) -> Result<Attributes, ApiError> {
    let spec = review.get("spec").cloned().unwrap_or_else(|| json!({}));
    let text = |obj: &Value, field: &str| obj.get(field).and_then(Value::as_str).unwrap_or("").to_string();
    let user = text(&spec, "user");
    let groups: Vec<String> = spec
        .get("groups")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|g| g.as_str().map(String::from))
        .collect();
    let resource = spec.get("resourceAttributes").filter(|v| !v.is_null());
    let non_resource = spec.get("nonResourceAttributes").filter(|v| !v.is_null());
    let mut causes = Vec::new();
    match (resource, non_resource) {
        (Some(_), Some(n)) => causes.push((
            "spec.nonResourceAttributes".to_string(),
            "FieldValueInvalid",
            format!("Invalid value: {n}: cannot be specified in combination with resourceAttributes"),
        )),
        (None, None) => causes.push((
            "spec.resourceAttributes".to_string(),
            "FieldValueInvalid",
            "Invalid value: \"null\": exactly one of nonResourceAttributes or resourceAttributes must be specified"
                .to_string(),
        )),
        _ => {}
    }
    if user.is_empty() && groups.is_empty() {
        causes.push((
            "spec.user".to_string(),
            "FieldValueInvalid",
            "Invalid value: \"\": at least one of user or group must be specified".to_string(),
        ));
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid(def, "", &causes));
    }
    let request = match (resource, non_resource) {
        (Some(r), _) => Request::Resource {
            namespace: text(r, "namespace"),
            verb: text(r, "verb"),
            group: text(r, "group"),
            resource: text(r, "resource"),
            subresource: text(r, "subresource"),
            name: text(r, "name"),
        },
        (None, Some(n)) => Request::NonResource { path: text(n, "path"), verb: text(n, "verb") },
        (None, None) => unreachable!("refused above"),
    };
    Ok(Attributes { user, groups, request })
}
