//! `envoy.service.secret.v3.SecretDiscoveryService`: routes an accepted HTTP/2 request
//! to its method. Each call becomes a future run by its connection's task.

use std::future::Future;
use std::pin::Pin;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use futures_util::future::poll_fn;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::Request;
use tonic::Status;

use super::delta::Delta;
use super::grpc::{self, Frame};
use super::inbound::Inbound;
use super::sotw::Sotw;
use super::stream::{self, Protocol};
use super::{Peer, Shared, fetch};
use std::sync::Arc;

const STREAM: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
const DELTA: &str = "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets";
const FETCH: &str = "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets";

pub type Call = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The call for `req`, or `None` when it was answered at once (not gRPC, unknown method,
/// or the peer went away).
pub fn route(
    shared: &Shared,
    peer: &Arc<Peer>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Frame>,
) -> Option<Call> {
    if let Some(refusal) = grpc::refuse(&req) {
        let _ = respond.send_response(refusal, true);
        return None;
    }
    let shared = shared.clone();
    match req.uri().path() {
        STREAM => open::<Sotw>(shared, peer, req, respond),
        DELTA => open::<Delta>(shared, peer, req, respond),
        FETCH => {
            let deadline = grpc::timeout(&req);
            Some(Box::pin(unary(shared, peer.clone(), req.into_body(), respond, deadline)))
        }
        other => {
            let status = Status::unimplemented(format!("{other} is not served: certwire serves SDS v3"));
            let _ = respond.send_response(grpc::trailers_only(&status), true);
            None
        }
    }
}

fn open<P: Protocol>(
    shared: Shared,
    peer: &Arc<Peer>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Frame>,
) -> Option<Call> {
    let deadline = grpc::timeout(&req);
    let send: SendStream<Frame> = respond.send_response(grpc::response_headers(), false).ok()?;
    Some(Box::pin(stream::run::<P>(shared, peer.clone(), req.into_body(), send, deadline)))
}

/// FetchSecrets: one request message, one response (or a status).
/// Past the call's `grpc-timeout` (if it has one) the answer is DEADLINE_EXCEEDED.
async fn unary(
    shared: Shared,
    peer: Arc<Peer>,
    body: RecvStream,
    mut respond: SendResponse<Frame>,
    deadline: Option<std::time::Duration>,
) {
    let work = async {
        let mut inbound = Inbound::new(body, shared.budget.clone());
        match poll_fn(|cx| inbound.poll_request::<DiscoveryRequest>(cx)).await {
            Some(Ok(mut req)) => match fetch::check_names(&shared, &req) {
                Ok(()) => {
                    fetch::authorize(&shared, &peer, &mut req).await;
                    fetch::fetch(&shared, req)
                }
                Err(status) => Err(status),
            },
            Some(Err(status)) => Err(status),
            None => Err(Status::invalid_argument("FetchSecrets needs a request message")),
        }
    };
    let outcome = match deadline {
        None => work.await,
        Some(deadline) => tokio::time::timeout(deadline, work)
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("the call's grpc-timeout passed"))),
    };
    match outcome {
        Ok(response) => {
            let Ok(mut send) = respond.send_response(grpc::response_headers(), false) else { return };
            if send.send_data(response.frame(), false).is_ok() {
                let _ = send.send_trailers(grpc::trailers(&Status::ok("")));
            }
        }
        Err(status) => {
            let _ = respond.send_response(grpc::trailers_only(&status), true);
        }
    }
}
