//! The SDS v3 protocol: StreamSecrets (SotW), DeltaSecrets and FetchSecrets.
//! One task per stream; state per stream lives in [`session::Session`].

mod codec;
mod delta;
mod fetch;
pub mod listen;
pub mod proxies;
mod service;
mod session;
mod sotw;
mod stream;

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tonic::{Request, Status};

use crate::metrics::Metrics;
use crate::pki::SECRET_TYPE_URL;
use crate::shutdown::Shutdown;
use crate::store::Store;
use proxies::Proxies;
pub use service::Sds;

/// What every stream task needs. Cloned per stream (all `Arc`s).
#[derive(Clone)]
pub struct Shared {
    pub store: Arc<Store>,
    pub proxies: Arc<Proxies>,
    pub metrics: Arc<Metrics>,
    /// SIGTERM: streams end cleanly so proxies reconnect elsewhere.
    pub shutdown: Shutdown,
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

#[cfg(test)]
mod tests;
