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
                placeholder: s.placeholder.map(|p| p.as_str().to_owned()).unwrap_or_default(),
                expired: s.expired,
                ocsp: s.ocsp.map(|o| crate::api::OcspStatus {
                    mode: o.mode.to_owned(),
                    state: o.state.to_owned(),
                    responder: o.responder.unwrap_or_default(),
                    this_update: o.this_update.unwrap_or_default(),
                    next_update: o.next_update.unwrap_or_default(),
                    revoked_at: o.revoked_at.unwrap_or_default(),
                    revocation_reason: o.revocation_reason.unwrap_or_default(),
                    next_refresh: o.next_refresh.unwrap_or_default(),
                    last_error: o.last_error.unwrap_or_default(),
                }),
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

    /// Follows one name's rollout. At most `status_max_watchers` at once (RESOURCE_EXHAUSTED
    /// beyond); each look is O(1) (counts the streams keep), and a name nobody serves or
    /// subscribes is polled, never subscribed in the store: asking makes nothing minted.
    async fn watch_rollout(
        &self,
        request: Request<WatchRolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        let slot = self.proxies.watch_rollout().map_err(|e| Status::resource_exhausted(e.to_string()))?;
        let name = request.into_inner().name;
        let (tx, rx) = mpsc::channel(1);
        let admin = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut secret = admin.store.watch_known(&name);
            let mut last = None;
            'watch: loop {
                if secret.is_none() {
                    secret = admin.store.watch_known(&name);
                }
                let version = secret.as_mut().and_then(|s| s.borrow_and_update().as_ref().map(|s| s.version));
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
                let changed = async {
                    match secret.as_mut() {
                        Some(s) => s.changed().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = admin.shutdown.cancelled() => break 'watch,
                    _ = tx.closed() => break 'watch,
                    r = changed => if r.is_err() { break 'watch },
                    _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                }
            }
            if secret.take().is_some() {
                admin.store.release(&name);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use futures_util::StreamExt;

    use super::*;
    use crate::admin::tests::admin;
    use crate::ingest::Intake;
    use crate::sources::dev::DevCa;
    use crate::xds::proxies::MAX_ROLLOUT_WATCHERS;

    fn watch(name: &str) -> Request<WatchRolloutRequest> {
        Request::new(WatchRolloutRequest { name: name.to_owned() })
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn watches_over_the_limit_are_refused_until_one_ends() {
        let a = admin();
        let mut open = Vec::new();
        for _ in 0..MAX_ROLLOUT_WATCHERS {
            open.push(a.watch_rollout(watch("web")).await.expect("under the limit").into_inner());
        }
        let refused = a.watch_rollout(watch("web")).await.err().expect("one over the limit is refused");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("64 rollout watches are open"), "{}", refused.message());
        assert!(a.metrics.encode().contains("certwire_rollout_watchers_refused_total 1\n"));

        // A client that goes away gives its place back.
        open.pop();
        let mut admitted = None;
        until("a place given back", || {
            admitted = futures_util::FutureExt::now_or_never(a.watch_rollout(watch("web"))).and_then(Result::ok);
            admitted.is_some()
        })
        .await;
        a.shutdown.trigger();
    }

    #[tokio::test]
    async fn watching_a_name_nobody_serves_subscribes_and_mints_nothing() {
        let a = admin();
        let mut demand = a.store.demand();
        let mut progress = a.watch_rollout(watch("made-up")).await.unwrap().into_inner();
        let first = progress.next().await.unwrap().unwrap();
        assert_eq!((first.version.as_str(), first.streams_subscribed), ("", 0));
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(demand.try_recv().is_err(), "no source is asked to mint a name only a watch asked about");
        assert_eq!(a.store.subscribers("made-up"), 0, "no store subscription for it");
        a.shutdown.trigger();
    }

    #[tokio::test]
    async fn a_watch_follows_the_acks_of_the_current_version() {
        let a = admin();
        let intake = Intake::new(a.store.clone(), a.metrics.clone(), "dev", crate::policy::AllowExpired::Never);
        let ca = DevCa::new(Duration::from_secs(600)).unwrap();
        intake.update("web", &ca.material("web").unwrap(), Instant::now()).unwrap();
        let v1 = a.store.get("web").unwrap().version;
        let peer = crate::xds::Peer { address: "test".into(), identity: crate::authz::Identity::Anonymous };
        let stream = a.proxies.open("sotw", &peer);
        stream.with_name("web", |n| n.acked_version = Some(v1));

        let mut progress = a.watch_rollout(watch("web")).await.unwrap().into_inner();
        let p = progress.next().await.unwrap().unwrap();
        assert_eq!((p.version, p.streams_subscribed, p.streams_acked), (v1.to_string(), 1, 1));
        assert_eq!(a.store.subscribers("web"), 1, "a served name is followed in the store");

        intake.update("web", &ca.material("web").unwrap(), Instant::now()).unwrap();
        let v2 = a.store.get("web").unwrap().version;
        let p = progress.next().await.unwrap().unwrap();
        assert_eq!((p.version, p.streams_subscribed, p.streams_acked), (v2.to_string(), 1, 0));
        stream.with_name("web", |n| n.acked_version = Some(v2));
        let p = progress.next().await.unwrap().unwrap();
        assert_eq!((p.streams_subscribed, p.streams_acked), (1, 1));

        drop(progress);
        until("the watch lets go of the store", || a.store.subscribers("web") == 0).await;
    }
}
