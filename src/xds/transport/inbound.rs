//! Requests as they come: the DATA frames of a request stream cut into gRPC messages,
//! without copying them.
//!
//! Envoy's requests are big: its node lists every extension it was built with (61 KB,
//! four DATA frames, for Envoy 1.40) and comes with every ACK unless the bootstrap sets
//! `set_node_on_first_message_only`. A message here is the frames it came in, read as
//! one buffer; fields decoded from it are slices of those frames, and a field skipped
//! (the node, once the stream knows it) costs nothing. Small frames, and what is left
//! of a frame after a message, are copied (see [`HOLD_MIN`]). Between messages a
//! stream holds no buffer.

use std::collections::VecDeque;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use h2::RecvStream;
use smallvec::SmallVec;
use tonic::Status;

use super::grpc::{PREFIX, check_prefix, message_len};
use super::limits::Budget;
use super::parts::Parts;
use std::sync::Arc;

/// Frames at least this big are held as h2 handed them over; smaller ones are copied.
/// A held frame keeps h2's whole read buffer alive (16 KiB and more) until its message
/// is whole: holding small ones would let a peer pin that with a few bytes per stream,
/// and a flood of tiny frames would cost a handle each.
const HOLD_MIN: usize = 8 * 1024;

/// Reassembles messages from the DATA frames of a request stream. Window capacity goes
/// back to the peer only as whole messages are taken, so what a peer sends and nobody
/// consumes is bounded by its flow-control windows; the bytes of unfinished messages
/// also count against the process-wide [`Budget`].
pub struct Inbound {
    body: RecvStream,
    budget: Arc<Budget>,
    /// What is not yet part of a whole message, in order: `held`, then `copied`.
    /// Frames of at least [`HOLD_MIN`] bytes, as h2 handed them over (and the small
    /// frames copied before them, frozen).
    held: VecDeque<Bytes>,
    /// Smaller frames, copied.
    copied: BytesMut,
    buffered: usize,
}

impl Inbound {
    pub fn new(body: RecvStream, budget: Arc<Budget>) -> Self {
        Self { body, budget, held: VecDeque::new(), copied: BytesMut::new(), buffered: 0 }
    }

    /// The next request, decoded; a message that does not decode is an INVALID_ARGUMENT
    /// for the peer.
    pub fn poll_request<M: prost::Message + Default>(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<M, Status>>> {
        self.poll_message(cx).map(|next| next.map(|message| decode(message?)))
    }

    /// The next whole message; `Ready(None)` when the peer has ended the stream.
    /// `Err` carries what the peer should be told; a reset or broken connection comes
    /// back as `Ready(None)` too, since nobody is left to tell.
    pub fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, Status>>> {
        loop {
            match self.take_message() {
                Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(None) => {}
                Err(status) => return Poll::Ready(Some(Err(status))),
            }
            match self.body.poll_data(cx) {
                Poll::Ready(Some(Ok(mut frame))) => {
                    if self.buffered == 0
                        && let Some(total) = whole(&frame, self.budget.max_request)
                    {
                        // The usual case, a message in one frame: nothing queued.
                        let message = message(smallvec::smallvec![frame.split_to(total)], total);
                        self.consumed(total);
                        if let Err(status) = self.push(frame) {
                            return Poll::Ready(Some(Err(status)));
                        }
                        return Poll::Ready(Some(Ok(message)));
                    }
                    if let Err(status) = self.push(frame) {
                        return Poll::Ready(Some(Err(status)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "request stream broken");
                    return Poll::Ready(None);
                }
                Poll::Ready(None) => {
                    if self.buffered > 0 {
                        return Poll::Ready(Some(Err(Status::internal("request ended inside a message"))));
                    }
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Gives back the window of `n` bytes the application has taken.
    fn consumed(&mut self, n: usize) {
        let _ = self.body.flow_control().release_capacity(n);
    }

    /// Queues a frame of an unfinished message, within the process-wide budget.
    fn push(&mut self, frame: Bytes) -> Result<(), Status> {
        if frame.is_empty() {
            return Ok(());
        }
        if !self.budget.take(frame.len()) {
            self.budget.buffered_hits.inc();
            return Err(Status::resource_exhausted(
                "the server holds too many unfinished requests; try again later ([limits] max_buffered_request_bytes)",
            ));
        }
        self.buffered += frame.len();
        if frame.len() >= HOLD_MIN {
            if !self.copied.is_empty() {
                self.held.push_back(self.copied.split().freeze());
            }
            self.held.push_back(frame);
        } else {
            self.copied.extend_from_slice(&frame);
        }
        Ok(())
    }

    fn take_message(&mut self) -> Result<Option<Message>, Status> {
        if self.buffered < PREFIX {
            return Ok(None);
        }
        let mut prefix = [0u8; PREFIX];
        let mut at = 0;
        for piece in self.held.iter().map(|b| &b[..]).chain([&self.copied[..]]) {
            let n = piece.len().min(PREFIX - at);
            prefix[at..at + n].copy_from_slice(&piece[..n]);
            at += n;
            if at == PREFIX {
                break;
            }
        }
        if let Err(status) = check_prefix(&prefix, self.budget.max_request) {
            if status.code() == tonic::Code::ResourceExhausted {
                self.budget.size_hits.inc();
            }
            return Err(status);
        }
        let total = PREFIX + message_len(&prefix);
        if self.buffered < total {
            return Ok(None);
        }
        let mut parts = SmallVec::new();
        let mut need = total;
        while need > 0 {
            let Some(front) = self.held.front_mut() else {
                parts.push(self.copied.split_to(need).freeze());
                break;
            };
            if front.len() <= need {
                need -= front.len();
                parts.push(self.held.pop_front().expect("just seen"));
            } else {
                parts.push(front.split_to(need));
                need = 0;
            }
        }
        self.buffered -= total;
        self.budget.give(total);
        self.consumed(total);
        if self.held.len() == 1 && self.held[0].len() < HOLD_MIN {
            // What is left of a held frame, the start of the next message: copied, so
            // that it does not keep h2's read buffer alive.
            let rest = self.held.pop_front().expect("just seen");
            let mut copied = BytesMut::with_capacity(rest.len() + self.copied.len());
            copied.extend_from_slice(&rest);
            copied.extend_from_slice(&self.copied);
            self.copied = copied;
        }
        // Their capacity would otherwise stay with an idle stream.
        if self.held.is_empty() {
            self.held = VecDeque::new();
        }
        if self.copied.is_empty() {
            self.copied = BytesMut::new();
        }
        Ok(Some(message(parts, total)))
    }
}

impl Drop for Inbound {
    fn drop(&mut self) {
        self.budget.give(self.buffered);
    }
}

/// The length of the message `frame` starts with, prefix included, when it is all there.
fn whole(frame: &[u8], max_request: usize) -> Option<usize> {
    let prefix = frame.get(..PREFIX)?;
    check_prefix(prefix, max_request).ok()?;
    let total = PREFIX + message_len(prefix);
    (total <= frame.len()).then_some(total)
}

/// Decodes a request; what does not decode is an INVALID_ARGUMENT for the peer.
pub fn decode<M: prost::Message + Default>(message: Message) -> Result<M, Status> {
    M::decode(message).map_err(|e| Status::invalid_argument(format!("malformed request: {e}")))
}

/// One request message: the frames it came in, read as one buffer. Cloning it clones
/// handles, not bytes. One piece for most messages; Envoy's with their node, four.
pub type Message = Parts<SmallVec<[Bytes; 1]>>;

/// The message framed by `parts` (`total` bytes, prefix included).
fn message(parts: SmallVec<[Bytes; 1]>, total: usize) -> Message {
    let mut message = Parts::new(parts, total);
    message.advance(PREFIX);
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `Inbound` on a real h2 stream, the client side that feeds it, and the
    /// server's response handle (dropping it would reset the stream).
    async fn inbound() -> (h2::SendStream<Bytes>, Inbound, h2::server::SendResponse<Bytes>) {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            let (req, respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            (req.into_body(), respond)
        });
        let (mut client, conn) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::post("http://x/m").body(()).unwrap();
        let (_response, send) = client.send_request(req, false).unwrap();
        let (body, respond) = server.await.unwrap();
        let budget = Arc::new(Budget::new(&Default::default(), &crate::metrics::Metrics::new()));
        (send, Inbound::new(body, budget), respond)
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&(message.len() as u32).to_be_bytes());
        m.extend_from_slice(message);
        m
    }

    async fn next(inbound: &mut Inbound) -> Message {
        std::future::poll_fn(|cx| inbound.poll_message(cx)).await.unwrap().unwrap()
    }

    fn bytes_of(mut message: Message) -> Vec<u8> {
        message.copy_to_bytes(message.remaining()).to_vec()
    }

    /// Envoy's requests come in several DATA frames: they are read where they are, and
    /// nothing is kept between messages.
    #[tokio::test]
    async fn a_message_in_several_frames_is_read_in_place_then_let_go() {
        let (mut send, mut inbound, _respond) = inbound().await;
        let body: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        // The prefix itself split across two frames.
        let whole = framed(&body);
        for part in [&whole[..3], &whole[3..10_000], &whole[10_000..30_000], &whole[30_000..]] {
            send.send_data(Bytes::copy_from_slice(part), false).unwrap();
        }
        let message = next(&mut inbound).await;
        assert!(message.pieces() > 1, "several frames, not copied into one");
        assert_eq!(bytes_of(message), body);
        assert_eq!((inbound.held.capacity(), inbound.copied.capacity(), inbound.buffered), (0, 0, 0));

        // A frame ending one message and starting the next: the rest waits.
        let (a, b) = (framed(&[1, 1, 1]), framed(&[2; 20_000]));
        send.send_data([&a[..], &b[..100]].concat().into(), false).unwrap();
        assert_eq!(bytes_of(next(&mut inbound).await), [1, 1, 1]);
        send.send_data(Bytes::copy_from_slice(&b[100..]), false).unwrap();
        assert_eq!(bytes_of(next(&mut inbound).await), [2; 20_000]);
        assert_eq!(inbound.buffered, 0);
    }

    /// Small frames are copied, so that neither a handle per frame nor h2's read buffer
    /// behind each is kept; so is what is left of a held frame once its message is out.
    #[tokio::test]
    async fn small_frames_and_leftovers_are_copied() {
        let (mut send, mut inbound, _respond) = inbound().await;
        let whole = framed(&[5; 1000]);
        for byte in whole.chunks(10) {
            send.send_data(Bytes::copy_from_slice(byte), false).unwrap();
        }
        let message = next(&mut inbound).await;
        assert_eq!(message.pieces(), 1, "copied into one buffer");
        assert_eq!(bytes_of(message), [5; 1000]);

        // A message over two held frames, the second with the start of the next one.
        let (a, b) = (framed(&[6; 20_000]), framed(&[7; 100]));
        send.send_data(Bytes::copy_from_slice(&a[..10_000]), false).unwrap();
        send.send_data([&a[10_000..], &b[..50]].concat().into(), false).unwrap();
        assert_eq!(bytes_of(next(&mut inbound).await), [6; 20_000]);
        assert!(inbound.held.is_empty(), "the 50 bytes left are not held in h2's buffer");
        assert_eq!(inbound.copied.len(), 50);
        send.send_data(Bytes::copy_from_slice(&b[50..]), false).unwrap();
        assert_eq!(bytes_of(next(&mut inbound).await), [7; 100]);
    }

    fn pieces(pieces: &[&'static [u8]]) -> Message {
        let pieces: SmallVec<[Bytes; 1]> = pieces.iter().map(|p| Bytes::from_static(p)).collect();
        let remaining = pieces.iter().map(Bytes::len).sum();
        Parts::new(pieces, remaining)
    }

    /// prost reads a message spread over frames, skipping fields without copying them.
    #[test]
    fn prost_decodes_across_frames() {
        use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
        use prost::Message as _;
        let full = DiscoveryRequest {
            version_info: "v1".into(),
            resource_names: vec!["web".into(); 50],
            response_nonce: "7".into(),
            ..Default::default()
        };
        let encoded: &'static [u8] = full.encode_to_vec().leak();
        for cut in [1, 3, 10, encoded.len() / 2, encoded.len() - 1] {
            let (a, b) = encoded.split_at(cut);
            assert_eq!(decode::<DiscoveryRequest>(pieces(&[a, b])).unwrap(), full, "cut at {cut}");
        }
    }
}
