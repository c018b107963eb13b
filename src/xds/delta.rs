//! DeltaSecrets (incremental): explicit subscribe/unsubscribe, per-resource versions and
//! removals announced in `removed_resources`.

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::codec::Outgoing;
use super::session::{Change, Session};
use super::{ResponseStream, Shared, check_type_url};

const OUTBOUND: usize = 2;

pub fn spawn(shared: Shared, peer: String, inbound: Streaming<DeltaDiscoveryRequest>) -> ResponseStream<Outgoing> {
    let (tx, rx) = mpsc::channel(OUTBOUND);
    let session = Session::open(shared, "delta", peer);
    tokio::spawn(run(session, inbound, tx));
    Box::pin(ReceiverStream::new(rx))
}

async fn run(
    mut session: Session,
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    tx: mpsc::Sender<Result<Outgoing, Status>>,
) {
    let shutdown = session.shared().shutdown.clone();
    loop {
        let response = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            req = inbound.message() => match req {
                Ok(Some(req)) => {
                    if let Err(status) = on_request(&mut session, req) {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                    continue;
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(stream = session.id, error = %status, "stream closed by peer");
                    break;
                }
            },
            change = session.next_change() => match change {
                Change::Send(served) => {
                    let resources = vec![served];
                    let nonce = session.record_sent(&resources);
                    Outgoing::Delta { nonce, resources, removed: Vec::new() }
                }
                Change::Gone(name) => Outgoing::Delta { nonce: session.next_nonce(), resources: Vec::new(), removed: vec![name] },
            },
        };
        if tx.send(Ok(response)).await.is_err() {
            break;
        }
    }
    tracing::debug!(stream = session.id, "delta stream ended");
}

fn on_request(session: &mut Session, req: DeltaDiscoveryRequest) -> Result<(), Status> {
    check_type_url(&req.type_url)?;
    session.identify(req.node.as_ref());
    session.acknowledge(&req.response_nonce, req.error_detail.as_ref());
    // `initial_resource_versions` is deliberately ignored: a new stream always gets the
    // current content, so a proxy that claims a version we never served still converges.
    for name in &req.resource_names_unsubscribe {
        session.unsubscribe(name);
    }
    for name in &req.resource_names_subscribe {
        session.subscribe(name);
    }
    Ok(())
}
