//! certwire.v1.Status: the gRPC view of the store and the streams, for `certwire status`.

use std::pin::Pin;

use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::Admin;
use crate::api::status_server::{Status as StatusService, StatusServer};
use crate::api::*;

pub fn server(admin: Admin) -> StatusServer<Admin> {
    StatusServer::new(admin)
}

#[tonic::async_trait]
impl StatusService for Admin {
    async fn list_secrets(&self, _: Request<ListSecretsRequest>) -> Result<Response<ListSecretsResponse>, Status> {
        let secrets = self
            .secrets_status()
            .await
            .into_iter()
            .map(|s| SecretStatus {
                name: s.name,
                kind: s.kind.map(|k| k.as_str().to_owned()).unwrap_or_default(),
                version: s.version.unwrap_or_default(),
                source: s.source.unwrap_or_default(),
                fingerprint_sha256: s.identity.fingerprint_sha256.unwrap_or_default(),
                sans: s.identity.sans,
                not_after_unix: s.meta.not_after_unix.unwrap_or_default(),
                deleted: s.deleted,
                last_error: s.last_error.unwrap_or_default(),
                shadowed_sources: s.shadowed_sources,
                updated_unix_ms: s.updated_unix_ms.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(ListSecretsResponse { secrets }))
    }

    async fn list_proxies(&self, _: Request<ListProxiesRequest>) -> Result<Response<ListProxiesResponse>, Status> {
        let proxies = self
            .proxies
            .status()
            .into_iter()
            .map(|p| ProxyStatus {
                stream_id: p.stream_id,
                node_id: p.node_id,
                cluster: p.cluster,
                address: p.address,
                protocol: p.protocol.to_owned(),
                connected_unix_ms: p.connected_unix_ms,
                secrets: p
                    .secrets
                    .into_iter()
                    .map(|n| ProxySecretStatus {
                        name: n.name.to_string(),
                        sent_version: n.sent_version.map(|v| v.to_string()).unwrap_or_default(),
                        acked_version: n.acked_version.map(|v| v.to_string()).unwrap_or_default(),
                        last_nack: n.last_nack.unwrap_or_default(),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(ListProxiesResponse { proxies }))
    }

    type WatchRolloutStream = Pin<Box<dyn Stream<Item = Result<RolloutProgress, Status>> + Send>>;

    async fn watch_rollout(
        &self,
        request: Request<WatchRolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        let name = request.into_inner().name;
        let (tx, rx) = mpsc::channel(1);
        let admin = self.clone();
        tokio::spawn(async move {
            let mut secret = admin.store.subscribe(&name);
            let mut last = None;
            'watch: loop {
                let version = secret.borrow_and_update().as_ref().map(|s| s.version);
                let (subscribed, acked, nacked) = admin.proxies.rollout(&name, version);
                let progress = RolloutProgress {
                    name: name.clone(),
                    version: version.map(|v| v.to_string()).unwrap_or_default(),
                    streams_subscribed: subscribed,
                    streams_acked: acked,
                    streams_nacked: nacked,
                };
                if last.as_ref() != Some(&progress) {
                    last = Some(progress.clone());
                    if tx.send(Ok(progress)).await.is_err() {
                        break 'watch;
                    }
                }
                // Streams do not wake watchers (a rollout is thousands of ACKs): look
                // again every 100 ms, and at once for a new version. Only changes are sent.
                tokio::select! {
                    _ = admin.shutdown.cancelled() => break 'watch,
                    _ = tx.closed() => break 'watch,
                    r = secret.changed() => if r.is_err() { break 'watch },
                    _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                }
            }
            drop(secret);
            admin.store.release(&name);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
