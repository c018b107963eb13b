//! StreamSecrets (state of the world). Each request carries the full list of wanted
//! names; a response carries the secrets that changed.

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use std::collections::HashSet;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::codec::Outgoing;
use super::fetch::sotw_version;
use super::session::{Change, Session};
use super::{ResponseStream, Shared, check_type_url};

/// A couple of responses in flight; beyond that the task waits, and the latest-wins
/// watch means it sends the newest version once the proxy reads again.
const OUTBOUND: usize = 2;

pub fn spawn(shared: Shared, peer: String, inbound: Streaming<DiscoveryRequest>) -> ResponseStream<Outgoing> {
    let (tx, rx) = mpsc::channel(OUTBOUND);
    let session = Session::open(shared, "sotw", peer);
    tokio::spawn(run(session, inbound, tx));
    Box::pin(ReceiverStream::new(rx))
}

async fn run(
    mut session: Session,
    mut inbound: Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<Result<Outgoing, Status>>,
) {
    let shutdown = session.shared().shutdown.clone();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            req = inbound.message() => match req {
                Ok(Some(req)) => {
                    if let Err(status) = on_request(&mut session, req) {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(stream = session.id, error = %status, "stream closed by peer");
                    break;
                }
            },
            change = session.next_change() => {
                // SotW cannot announce a removal of a named secret; Envoy keeps what it has.
                let Change::Send(served) = change else { continue };
                let resources = vec![served];
                let nonce = session.record_sent(&resources);
                let version_info = sotw_version(resources.iter().map(|s| s.version.as_str()));
                let response = Outgoing::Sotw { version_info, nonce, resources };
                if tx.send(Ok(response)).await.is_err() {
                    break;
                }
            }
        }
    }
    tracing::debug!(stream = session.id, "sotw stream ended");
}

fn on_request(session: &mut Session, req: DiscoveryRequest) -> Result<(), Status> {
    check_type_url(&req.type_url)?;
    session.identify(req.node.as_ref());
    session.acknowledge(&req.response_nonce, req.error_detail.as_ref());
    // The list is the full desired set: add new names, drop the ones no longer asked for.
    let wanted: HashSet<&str> = req.resource_names.iter().map(String::as_str).collect();
    let dropped: Vec<String> = session.subscribed().filter(|n| !wanted.contains(n.as_str())).cloned().collect();
    for name in dropped {
        session.unsubscribe(&name);
    }
    for name in &req.resource_names {
        session.subscribe(name);
    }
    Ok(())
}
