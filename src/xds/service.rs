//! The SDS gRPC service, routed by hand so that it can use [`SdsCodec`]: the generated
//! server of envoy-types always encodes responses with prost, per stream.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tonic::codegen::{Body, BoxFuture, StdError, http};
use tonic::server::{Grpc, NamedService, StreamingService, UnaryService};
use tonic::{Request, Response, Status, Streaming};

use super::codec::{Outgoing, SdsCodec};
use super::delta::Delta;
use super::sotw::Sotw;
use super::stream::{self, Protocol};
use super::{ResponseStream, Shared, fetch, peer_label};

const STREAM: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
const DELTA: &str = "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets";
const FETCH: &str = "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets";

/// `envoy.service.secret.v3.SecretDiscoveryService`. Cheap to clone.
#[derive(Clone)]
pub struct Sds {
    shared: Shared,
}

impl Sds {
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }
}

impl NamedService for Sds {
    const NAME: &'static str = "envoy.service.secret.v3.SecretDiscoveryService";
}

impl<B> tower::Service<http::Request<B>> for Sds
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let shared = self.shared.clone();
        match req.uri().path() {
            STREAM => Box::pin(async move {
                Ok(Grpc::new(SdsCodec::<DiscoveryRequest>::default())
                    .streaming(StreamMethod::<Sotw>(shared, PhantomData), req)
                    .await)
            }),
            DELTA => Box::pin(async move {
                Ok(Grpc::new(SdsCodec::<DeltaDiscoveryRequest>::default())
                    .streaming(StreamMethod::<Delta>(shared, PhantomData), req)
                    .await)
            }),
            FETCH => Box::pin(async move {
                Ok(Grpc::new(SdsCodec::<DiscoveryRequest>::default()).unary(FetchMethod(shared), req).await)
            }),
            other => {
                let status = Status::unimplemented(format!("{other} is not served: certwire serves SDS v3"));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// StreamSecrets or DeltaSecrets, by protocol.
struct StreamMethod<P>(Shared, PhantomData<fn() -> P>);

impl<P: Protocol> StreamingService<P::Request> for StreamMethod<P>
where
    Streaming<P::Request>: Send,
{
    type Response = Outgoing;
    type ResponseStream = ResponseStream<Outgoing>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<P::Request>>) -> Self::Future {
        let shared = self.0.clone();
        let peer = peer_label(&request);
        Box::pin(async move { Ok(Response::new(stream::spawn::<P>(shared, peer, request.into_inner()))) })
    }
}

struct FetchMethod(Shared);

impl UnaryService<DiscoveryRequest> for FetchMethod {
    type Response = Outgoing;
    type Future = BoxFuture<Response<Outgoing>, Status>;

    fn call(&mut self, request: Request<DiscoveryRequest>) -> Self::Future {
        let shared = self.0.clone();
        Box::pin(async move { fetch::fetch(&shared, request.into_inner()).map(Response::new) })
    }
}
