//! The SDS v3 protocol: StreamSecrets (SotW), DeltaSecrets and FetchSecrets.
//! One task per stream; state per stream lives in [`session::Session`].

mod delta;
mod fetch;
pub mod listen;
pub mod proxies;
mod session;
mod sotw;

use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use futures_util::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::Metrics;
use crate::pki::SECRET_TYPE_URL;
use crate::store::Store;
use proxies::Proxies;

/// What every stream task needs. Cloned per stream (all `Arc`s).
#[derive(Clone)]
pub struct Shared {
    pub store: Arc<Store>,
    pub proxies: Arc<Proxies>,
    pub metrics: Arc<Metrics>,
    /// Cancelled on SIGTERM: streams end cleanly so proxies reconnect elsewhere.
    pub shutdown: CancellationToken,
}

/// The tonic service. Cheap to clone.
#[derive(Clone)]
pub struct Sds {
    shared: Shared,
}

impl Sds {
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }

    pub fn into_server(self) -> SecretDiscoveryServiceServer<Self> {
        // Secrets with long chains exceed tonic's 4 MiB default only in pathological
        // cases; requests are small, so keep defaults but accept any size we send.
        SecretDiscoveryServiceServer::new(self).max_encoding_message_size(usize::MAX)
    }
}

/// Refuses a type URL other than Secret (empty is allowed: only the first request of a
/// stream must carry it).
fn check_type_url(type_url: &str) -> Result<(), Status> {
    if type_url.is_empty() || type_url == SECRET_TYPE_URL {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!("this is an SDS server; type_url {type_url} is not served")))
    }
}

/// Who is on the other end, for status: `IP:PORT`, or for a Unix socket the peer's
/// process credentials (the kernel vouches for them; the proxy cannot fake them).
fn peer_label<T>(request: &Request<T>) -> String {
    if let Some(addr) = request.remote_addr() {
        return addr.to_string();
    }
    match request.extensions().get::<tonic::transport::server::UdsConnectInfo>().and_then(|i| i.peer_cred) {
        Some(cred) => match cred.pid() {
            Some(pid) => format!("unix:pid={pid},uid={}", cred.uid()),
            None => format!("unix:uid={}", cred.uid()),
        },
        None => "unix".to_owned(),
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type StreamSecretsStream = ResponseStream<DiscoveryResponse>;
    type DeltaSecretsStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let peer = peer_label(&request);
        Ok(Response::new(sotw::spawn(self.shared.clone(), peer, request.into_inner())))
    }

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let peer = peer_label(&request);
        Ok(Response::new(delta::spawn(self.shared.clone(), peer, request.into_inner())))
    }

    async fn fetch_secrets(&self, request: Request<DiscoveryRequest>) -> Result<Response<DiscoveryResponse>, Status> {
        fetch::fetch(&self.shared, request.into_inner()).map(Response::new)
    }
}

#[cfg(test)]
mod tests;
