//! One task per stream, shared by SotW and Delta: read requests, wait for changes,
//! send responses. The protocols differ only in how they read a request and shape a
//! response ([`Protocol`]).

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::codec::Outgoing;
use super::session::{Change, Session};
use super::{ResponseStream, Shared};

/// A couple of responses in flight; beyond that the task waits, and the latest-wins
/// watch means it sends the newest version once the proxy reads again.
const OUTBOUND: usize = 2;

pub trait Protocol: Send + 'static {
    type Request: Send + 'static;
    /// Label in metrics and status.
    const NAME: &'static str;
    /// Applies a request (subscriptions, ACK/NACK) to the session.
    fn on_request(session: &mut Session, req: Self::Request) -> Result<(), Status>;
    /// The response for a change, if the protocol can express it.
    fn response(session: &mut Session, change: Change) -> Option<Outgoing>;
}

pub fn spawn<P: Protocol>(shared: Shared, peer: String, inbound: Streaming<P::Request>) -> ResponseStream<Outgoing>
where
    Streaming<P::Request>: Send,
{
    let (tx, rx) = mpsc::channel(OUTBOUND);
    let session = Session::open(shared, P::NAME, peer);
    tokio::spawn(run::<P>(session, inbound, tx));
    Box::pin(ReceiverStream::new(rx))
}

async fn run<P: Protocol>(
    mut session: Session,
    mut inbound: Streaming<P::Request>,
    tx: mpsc::Sender<Result<Outgoing, Status>>,
) {
    let shutdown = session.shared().shutdown.clone();
    loop {
        let response = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            req = inbound.message() => match req {
                Ok(Some(req)) => match P::on_request(&mut session, req) {
                    Ok(()) => continue,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                },
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(stream = session.id, error = %status, "stream closed by peer");
                    break;
                }
            },
            change = session.next_change() => match P::response(&mut session, change) {
                Some(response) => response,
                None => continue,
            },
        };
        if tx.send(Ok(response)).await.is_err() {
            break;
        }
    }
    tracing::debug!(stream = session.id, protocol = P::NAME, "stream ended");
}
