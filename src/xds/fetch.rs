//! FetchSecrets: one request, the current content of the names that exist.

use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use tonic::Status;

use super::codec::Outgoing;
use super::transport::Unary;
use super::{Peer, ServerState, check_type_url};
use crate::authz::{Decision, Verdict};
use crate::metrics::ProtocolLabel;
use crate::store::Served;
use crate::version::Version;

/// Names a NOT_FOUND message lists; the rest are counted.
const NAMES_SHOWN: usize = 4;

/// Checks the names of a FetchSecrets before anything is looked up: at most
/// `[limits] max_names_per_request`, none twice (the xDS protocol calls a duplicate an
/// error; served twice, one name could multiply a response).
pub fn check_names(shared: &ServerState, req: &DiscoveryRequest) -> Result<(), Status> {
    let max = shared.limits.max_names_per_request;
    if req.resource_names.len() > max {
        super::limits::hit(&shared.metrics, "max_names_per_request");
        return Err(Status::resource_exhausted(format!(
            "{} names in one request; at most {max} ([limits] max_names_per_request)",
            req.resource_names.len()
        )));
    }
    let mut seen = std::collections::HashSet::with_capacity(req.resource_names.len());
    if let Some(twice) = req.resource_names.iter().find(|n| !seen.insert(n.as_str())) {
        return Err(Status::invalid_argument(format!(
            "resource name {:?} is requested twice",
            super::limits::truncate(twice, 256)
        )));
    }
    Ok(())
}

/// FetchSecrets: one request, the current content of the names the peer may read.
pub async fn serve(shared: ServerState, peer: Arc<Peer>, call: Unary) {
    call.answer(|mut req: DiscoveryRequest| async move {
        check_names(&shared, &req)?;
        authorize(&shared, &peer, &mut req).await;
        fetch(&shared, req).map(|response| response.frame())
    })
    .await
}

pub fn fetch(shared: &ServerState, req: DiscoveryRequest) -> Result<Outgoing, Status> {
    check_type_url(req.type_url.as_bytes())?;
    let found: super::codec::Resources = req.resource_names.iter().filter_map(|n| lookup(shared, n)).collect();
    if found.is_empty() {
        return Err(Status::not_found(not_found(&req.resource_names)));
    }
    let bytes: usize = found.iter().map(|s| s.resource.len()).sum();
    let max = shared.limits.max_fetch_response_bytes;
    if bytes > max {
        super::limits::hit(&shared.metrics, "max_fetch_response_bytes");
        return Err(Status::resource_exhausted(format!(
            "the response would be {bytes} bytes; at most {max} ([limits] max_fetch_response_bytes): fetch fewer names at once"
        )));
    }
    let version = sotw_version(&found);
    if !req.version_info.is_empty() && version == *req.version_info {
        // Same contract as other xDS servers: nothing new for a caller that is current.
        return Err(Status::already_exists(format!("version {version} is current")));
    }
    shared.metrics.pushes.get_or_create(&ProtocolLabel { protocol: "fetch" }).inc();
    Ok(Outgoing::Sotw { version_info: version, nonce: 0, resources: found })
}

/// What is served for `requested`, under that name (see [`super::names`]).
fn lookup(shared: &ServerState, requested: &str) -> Option<Arc<crate::store::Served>> {
    let served = shared.store.get(&shared.names.stored(requested))?;
    shared.names.serve_as(requested, served)
}

/// How long FetchSecrets waits for a SubjectAccessReview before treating a name as
/// denied.
const REVIEW_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Leaves in `req` only the names `peer` may read; the others look absent, as on a
/// stream.
pub async fn authorize(shared: &ServerState, peer: &Peer, req: &mut DiscoveryRequest) {
    let mut allowed = Vec::with_capacity(req.resource_names.len());
    for name in std::mem::take(&mut req.resource_names) {
        let reason = match shared.authz.decide(&peer.identity, shared.names.subject(&name)) {
            Verdict::Allow => None,
            Verdict::Deny(reason) => Some(reason),
            Verdict::Grant(mut grant) => {
                let settled = tokio::time::timeout(REVIEW_WAIT, grant.settled()).await;
                match settled.ok().flatten() {
                    Some(Decision::Allow) => None,
                    Some(Decision::Deny(reason)) => Some(reason),
                    _ => Some(crate::authz::Reason::new(
                        "review_timeout",
                        "no answer in time (a SubjectAccessReview, or the first list of ReferenceGrants)",
                    )),
                }
            }
        };
        match reason {
            None => allowed.push(name),
            Some(reason) => shared.authz.denied(&peer.identity, &name, &reason),
        }
    }
    req.resource_names = allowed;
}

/// "no secret named ...", naming a few of the names, however many were asked.
fn not_found(names: &[String]) -> String {
    let shown: Vec<String> =
        names.iter().take(NAMES_SHOWN).map(|n| format!("{:?}", super::limits::truncate(n, 256))).collect();
    match names.len() {
        n if n <= NAMES_SHOWN => format!("no secret named {}", shown.join(", ")),
        n => format!("no secret named {} or any of the {} other names asked for", shown.join(", "), n - NAMES_SHOWN),
    }
}

/// Version of a SotW response: the secret's own content hash when it carries one
/// resource (what Envoy does: one stream per secret), else a hash of the versions.
pub fn sotw_version(resources: &[Arc<Served>]) -> Version {
    match resources {
        [one] => one.version,
        many => {
            let joined: Vec<String> = many.iter().map(|s| s.version.to_string()).collect();
            Version::of(joined.join(",").as_bytes())
        }
    }
}
