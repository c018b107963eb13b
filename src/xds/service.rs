//! `envoy.service.secret.v3.SecretDiscoveryService`: routes an accepted call to its
//! method. Each call becomes a future run by its connection's task.

use std::sync::Arc;

use tonic::Status;

use super::delta::Delta;
use super::sotw::Sotw;
use super::stream::{self, Protocol};
use super::transport::{CallFuture, Incoming};
use super::{Peer, ServerState, fetch};

const STREAM: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
const DELTA: &str = "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets";
const FETCH: &str = "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets";

/// The call for `incoming`, or `None` when it was answered at once (unknown method, or
/// the peer went away).
pub fn route(shared: &ServerState, peer: &Arc<Peer>, incoming: Incoming) -> Option<CallFuture> {
    let shared = shared.clone();
    match incoming.path() {
        STREAM => open::<Sotw>(shared, peer, incoming),
        DELTA => open::<Delta>(shared, peer, incoming),
        FETCH => Some(Box::pin(fetch::serve(shared, peer.clone(), incoming.unary()))),
        other => {
            let status = Status::unimplemented(format!(
                "{} is not served: certwire serves SDS v3",
                super::limits::truncate(other, 256)
            ));
            incoming.refuse(&status);
            None
        }
    }
}

fn open<P: Protocol>(shared: ServerState, peer: &Arc<Peer>, incoming: Incoming) -> Option<CallFuture> {
    let call = incoming.stream()?;
    Some(Box::pin(stream::run::<P>(shared, peer.clone(), call)))
}
