//! The baseline: a plain tonic SDS server with default settings, written the way a
//! first implementation would be. Every stream task holds a `watch` receiver of the
//! whole secret set and, on each change, builds and prost-encodes its own
//! `DiscoveryResponse`. Only StreamSecrets (SotW) is served.
//!
//! Secrets come from `--files ROOT` (`ROOT/NAME/tls.crt` + `tls.key`). The coordinator
//! drives it over stdin: `reload` re-reads the directory and answers
//! `reloaded UNIX_US` (the moment the reload began, the analogue of certwire noticing
//! a change). It prints `listening` once it accepts connections and exits at the end of
//! its input.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, TlsCertificate, secret::Type};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message as _;
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::client::SECRET_TYPE_URL;
use crate::proc::unix_us;

struct Snapshot {
    version: u64,
    secrets: HashMap<String, Secret>,
}

struct Naive {
    state: watch::Receiver<Arc<Snapshot>>,
    nonces: Arc<AtomicU64>,
}

pub fn main(listen: SocketAddr, files: &Path) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    if let Err(err) = runtime.block_on(run(listen, files)) {
        eprintln!("naive-server: {err:#}");
        std::process::exit(1);
    }
    std::process::exit(0);
}

async fn run(listen: SocketAddr, files: &Path) -> anyhow::Result<()> {
    let mut version = 1;
    let (tx, rx) = watch::channel(Arc::new(Snapshot { version, secrets: load(files)? }));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let service = Naive { state: rx, nonces: Arc::new(AtomicU64::new(0)) };
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(SecretDiscoveryServiceServer::new(service))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
        if let Err(err) = served {
            eprintln!("naive-server: {err}");
            std::process::exit(1);
        }
    });
    say("listening");
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim() == "reload" {
            let began = unix_us();
            version += 1;
            tx.send_replace(Arc::new(Snapshot { version, secrets: load(files)? }));
            say(&format!("reloaded {began}"));
        }
    }
    Ok(())
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Every `ROOT/NAME` holding `tls.crt` and `tls.key` (names starting with `.` skipped).
fn load(root: &Path) -> anyhow::Result<HashMap<String, Secret>> {
    let mut secrets = HashMap::new();
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let (Ok(cert), Ok(key)) =
            (std::fs::read(entry.path().join("tls.crt")), std::fs::read(entry.path().join("tls.key")))
        else {
            continue;
        };
        let inline = |bytes| DataSource { specifier: Some(Specifier::InlineBytes(bytes)), ..Default::default() };
        let tls = TlsCertificate {
            certificate_chain: Some(inline(cert)),
            private_key: Some(inline(key)),
            ..Default::default()
        };
        secrets.insert(name.clone(), Secret { name, r#type: Some(Type::TlsCertificate(tls)) });
    }
    Ok(secrets)
}

type Boxed<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for Naive {
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaSecretsStream = Boxed<DeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(stream_task(request.into_inner(), self.state.clone(), self.nonces.clone(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented("the baseline serves SotW only"))
    }

    async fn fetch_secrets(&self, _request: Request<DiscoveryRequest>) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("the baseline serves SotW only"))
    }
}

async fn stream_task(
    mut inbound: Streaming<DiscoveryRequest>,
    mut state: watch::Receiver<Arc<Snapshot>>,
    nonces: Arc<AtomicU64>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
) {
    let mut names: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            req = inbound.message() => match req {
                Ok(Some(req)) => {
                    // A changed name list is a new subscription; an ACK changes nothing.
                    if req.resource_names != names {
                        names = req.resource_names;
                        let snapshot = state.borrow_and_update().clone();
                        if tx.send(Ok(respond(&snapshot, &names, &nonces))).await.is_err() {
                            break;
                        }
                    }
                }
                _ => break,
            },
            changed = state.changed() => {
                if changed.is_err() {
                    break;
                }
                if names.is_empty() {
                    continue;
                }
                let snapshot = state.borrow_and_update().clone();
                if tx.send(Ok(respond(&snapshot, &names, &nonces))).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// The naive part: every stream encodes its own copy of every secret it watches.
fn respond(snapshot: &Snapshot, names: &[String], nonces: &AtomicU64) -> DiscoveryResponse {
    let resources = names
        .iter()
        .filter_map(|n| snapshot.secrets.get(n))
        .map(|secret| Any { type_url: SECRET_TYPE_URL.to_owned(), value: secret.encode_to_vec() })
        .collect();
    DiscoveryResponse {
        version_info: snapshot.version.to_string(),
        resources,
        type_url: SECRET_TYPE_URL.to_owned(),
        nonce: nonces.fetch_add(1, Ordering::Relaxed).to_string(),
        ..Default::default()
    }
}
