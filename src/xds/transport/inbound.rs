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

/// Reads the messages of a request stream. Window capacity goes back to the peer only
/// as whole messages are taken, so what a peer sends and nobody consumes is bounded by
/// its flow-control windows; the bytes of unfinished messages also count against the
/// process-wide [`Budget`] (see [`Reassembly`], which does the cutting).
pub struct Inbound {
    body: RecvStream,
    frames: Reassembly,
}

impl Inbound {
    pub fn new(body: RecvStream, budget: Arc<Budget>) -> Self {
        Self { body, frames: Reassembly::new(budget) }
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
            let next = self.frames.take_message();
            self.release();
            match next {
                Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(None) => {}
                Err(status) => return Poll::Ready(Some(Err(status))),
            }
            match self.body.poll_data(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let next = self.frames.frame(frame);
                    self.release();
                    match next {
                        Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                        Ok(None) => {}
                        Err(status) => return Poll::Ready(Some(Err(status))),
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "request stream broken");
                    return Poll::Ready(None);
                }
                Poll::Ready(None) => {
                    if self.frames.buffered() > 0 {
                        return Poll::Ready(Some(Err(Status::internal("request ended inside a message"))));
                    }
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Gives back the window of the messages the application has taken.
    fn release(&mut self) {
        let n = self.frames.take_release();
        if n > 0 {
            let _ = self.body.flow_control().release_capacity(n);
        }
    }
}

/// The queue of DATA frames of one request stream, cut into gRPC messages: what
/// [`Inbound`] does without h2, so that it can be driven with any split of frames
/// (property tests below, `fuzz/fuzz_targets/inbound.rs`).
///
/// It holds the bytes of unfinished messages, within the process-wide [`Budget`] (given
/// back as messages are taken, and on drop), and counts the window capacity owed to the
/// peer: the bytes of whole messages taken (prefix included), never those of a message
/// still unfinished. [`Inbound`] releases it after every call.
pub struct Reassembly {
    budget: Arc<Budget>,
    /// What is not yet part of a whole message, in order: `held`, then `copied`.
    /// Frames of at least [`HOLD_MIN`] bytes, as h2 handed them over (and the small
    /// frames copied before them, frozen).
    held: VecDeque<Bytes>,
    /// Smaller frames, copied.
    copied: BytesMut,
    buffered: usize,
    /// Bytes of whole messages taken whose window has not been given back yet.
    release: usize,
}

impl Reassembly {
    pub fn new(budget: Arc<Budget>) -> Self {
        Self { budget, held: VecDeque::new(), copied: BytesMut::new(), buffered: 0, release: 0 }
    }

    /// Bytes queued: the start of a message not yet whole.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// The window capacity to give back to the peer now (the bytes of the whole
    /// messages taken since the last call).
    pub fn take_release(&mut self) -> usize {
        std::mem::take(&mut self.release)
    }

    /// A DATA frame as it comes. The usual case, a message in one frame with nothing
    /// queued, gives the message without queueing it (what follows it in the frame is
    /// queued); otherwise the frame is queued and [`Reassembly::take_message`] says
    /// whether a message is whole.
    pub fn frame(&mut self, mut frame: Bytes) -> Result<Option<Message>, Status> {
        if self.buffered == 0
            && let Some(total) = whole(&frame, self.budget.max_request)
        {
            let message = message(smallvec::smallvec![frame.split_to(total)], total);
            self.release += total;
            self.push(frame)?;
            return Ok(Some(message));
        }
        self.push(frame)?;
        Ok(None)
    }

    /// Queues a frame of an unfinished message, within the process-wide budget.
    pub fn push(&mut self, frame: Bytes) -> Result<(), Status> {
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

    /// The first message queued, if it is whole; `Err` if its prefix is not one this
    /// server takes.
    pub fn take_message(&mut self) -> Result<Option<Message>, Status> {
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
        self.release += total;
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

impl Drop for Reassembly {
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

/// The lean request types ([`decode`] reads them), for `fuzz/` only: they are private
/// to `xds`.
#[doc(hidden)]
pub mod requests {
    pub use crate::xds::requests::{DeltaNode, DeltaRequest, NodeIdentity, NodeOf, SotwNode, SotwRequest, nonce};
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
        assert_eq!(
            (inbound.frames.held.capacity(), inbound.frames.copied.capacity(), inbound.frames.buffered),
            (0, 0, 0)
        );

        // A frame ending one message and starting the next: the rest waits.
        let (a, b) = (framed(&[1, 1, 1]), framed(&[2; 20_000]));
        send.send_data([&a[..], &b[..100]].concat().into(), false).unwrap();
        assert_eq!(bytes_of(next(&mut inbound).await), [1, 1, 1]);
        send.send_data(Bytes::copy_from_slice(&b[100..]), false).unwrap();
        assert_eq!(bytes_of(next(&mut inbound).await), [2; 20_000]);
        assert_eq!(inbound.frames.buffered, 0);
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
        assert!(inbound.frames.held.is_empty(), "the 50 bytes left are not held in h2's buffer");
        assert_eq!(inbound.frames.copied.len(), 50);
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

    /// Found by fuzz/fuzz_targets/inbound.rs (input `0000000000002b`, the budget 0): a
    /// frame holding a whole message, nothing queued, and the start of another that the
    /// budget refuses. The refusal wins and ends the stream; the whole message was taken
    /// off, so its window is given back, and nothing stays counted in the budget.
    #[test]
    fn a_whole_message_then_bytes_over_the_budget() {
        use crate::xds::limits::Limits;
        let limits = Limits { max_buffered_request_bytes: 0, ..Default::default() };
        let budget = Arc::new(Budget::new(&limits, &crate::metrics::Metrics::new()));
        let mut r = Reassembly::new(budget.clone());
        let frame = [&framed(&[])[..], &[0x2b]].concat();
        let status = r.frame(frame.into()).unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!((r.take_release(), r.buffered(), budget.used()), (PREFIX, 0, 0));
    }

    /// Reassembly without h2, driven with any split of frames: the properties the fuzz
    /// target `fuzz/fuzz_targets/inbound.rs` checks, kept in the normal suite.
    mod properties {
        use super::*;
        use crate::xds::limits::Limits;
        use proptest::prelude::*;

        fn reassembly(max_request: usize, max_buffered: usize) -> (Arc<Budget>, Reassembly) {
            let limits = Limits {
                max_request_bytes: max_request,
                max_buffered_request_bytes: max_buffered,
                ..Default::default()
            };
            let budget = Arc::new(Budget::new(&limits, &crate::metrics::Metrics::new()));
            (budget.clone(), Reassembly::new(budget))
        }

        /// What `buffered` counts is what is queued, in the budget; nothing is left of a
        /// held frame that would pin h2's buffer for a few bytes.
        fn consistent(r: &Reassembly, budget: &Budget) {
            let queued: usize = r.held.iter().map(Bytes::len).sum::<usize>() + r.copied.len();
            assert_eq!(r.buffered, queued);
            assert_eq!(budget.used(), r.buffered);
            assert!(r.held.iter().all(|b| !b.is_empty()), "an empty piece held");
        }

        /// Feeds `frames` as `Inbound` does: each frame, then every message it completes.
        /// Returns the messages, the window released, and the error that stopped it.
        fn feed(r: &mut Reassembly, budget: &Budget, frames: Vec<Bytes>) -> (Vec<Vec<u8>>, usize, Option<Status>) {
            let (mut got, mut released) = (Vec::new(), 0);
            for frame in frames {
                match r.frame(frame) {
                    Ok(Some(m)) => got.push(bytes_of(m)),
                    Ok(None) => {}
                    Err(status) => return (got, released + r.take_release(), Some(status)),
                }
                released += r.take_release();
                consistent(r, budget);
                loop {
                    match r.take_message() {
                        Ok(Some(m)) => got.push(bytes_of(m)),
                        Ok(None) => break,
                        Err(status) => return (got, released + r.take_release(), Some(status)),
                    }
                    released += r.take_release();
                    consistent(r, budget);
                    if r.held.len() == 1 {
                        assert!(r.held[0].len() >= HOLD_MIN, "a small leftover held");
                    }
                }
            }
            (got, released, None)
        }

        /// `stream` cut at the given lengths (the rest in a last frame).
        fn cut(stream: &[u8], lens: &[usize]) -> Vec<Bytes> {
            let mut frames = Vec::new();
            let mut at = 0;
            for len in lens {
                let len = (*len).min(stream.len() - at);
                frames.push(Bytes::copy_from_slice(&stream[at..at + len]));
                at += len;
            }
            frames.push(Bytes::copy_from_slice(&stream[at..]));
            frames
        }

        /// Bodies from empty to a few times [`HOLD_MIN`], so that frames are both held and
        /// copied.
        fn bodies() -> impl Strategy<Value = Vec<Vec<u8>>> {
            let body = prop_oneof![
                3 => proptest::collection::vec(any::<u8>(), 0..64),
                1 => (any::<u8>(), 0..3 * HOLD_MIN).prop_map(|(b, n)| vec![b; n]),
            ];
            proptest::collection::vec(body, 0..6)
        }

        fn frame_lens() -> impl Strategy<Value = Vec<usize>> {
            let len = prop_oneof![0..8usize, 0..200usize, 0..2 * HOLD_MIN];
            proptest::collection::vec(len, 0..24)
        }

        proptest! {
            // Failures are kept as unit tests here, not in proptest-regressions/.
            #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(256) })]

            /// Whatever the split, exactly the messages framed come out, the window comes
            /// back for them (and only once they are whole), and the budget returns to zero.
            #[test]
            fn reassembly_yields_exactly_the_messages_framed(bodies in bodies(), lens in frame_lens(), partial in 0..8usize) {
                let stream: Vec<u8> = bodies.iter().flat_map(|b| framed(b)).collect();
                // The start of one more message, never finished.
                let next = framed(&[9; 64]);
                let stream = [&stream[..], &next[..partial]].concat();
                let (budget, mut r) = reassembly(1 << 20, 256 << 20);
                let (got, released, error) = feed(&mut r, &budget, cut(&stream, &lens));
                prop_assert!(error.is_none(), "{error:?}");
                prop_assert_eq!(&got, &bodies);
                prop_assert_eq!(released, bodies.iter().map(|b| PREFIX + b.len()).sum::<usize>());
                prop_assert_eq!(r.buffered(), partial);
                drop(r);
                prop_assert_eq!(budget.used(), 0);
            }

            /// Any bytes at all: the messages a one-piece parse finds, then the refusal it
            /// makes, if any; a full budget refuses a frame, never more than it holds.
            #[test]
            fn reassembly_of_any_bytes_matches_a_plain_parse(
                bodies in bodies(),
                tail in proptest::collection::vec(any::<u8>(), 0..32),
                lens in frame_lens(),
                max_request in prop_oneof![Just(1usize << 20), 0..100usize],
                max_buffered in prop_oneof![Just(256usize << 20), 0..4 * HOLD_MIN],
            ) {
                let stream: Vec<u8> = bodies.iter().flat_map(|b| framed(b)).chain(tail).collect();
                let (budget, mut r) = reassembly(max_request, max_buffered);
                let (got, released, error) = feed(&mut r, &budget, cut(&stream, &lens));
                let (expected, refused) = plain_parse(&stream, max_request);
                prop_assert!(got.len() <= expected.len());
                prop_assert_eq!(&got[..], &expected[..got.len()]);
                let budget_refused = error.as_ref().is_some_and(|s| s.message().contains("max_buffered_request_bytes"));
                let taken = got.iter().map(|b| PREFIX + b.len()).sum::<usize>();
                // A whole message taken from a frame whose rest the budget refuses: the
                // refusal wins, the message's window was given back (see
                // `a_whole_message_then_bytes_over_the_budget`).
                let dropped = if budget_refused && released > taken { PREFIX + expected[got.len()].len() } else { 0 };
                prop_assert_eq!(released, taken + dropped);
                if !budget_refused {
                    prop_assert_eq!(got.len(), expected.len());
                    prop_assert_eq!(error.map(|s| s.code()), refused);
                }
                consistent(&r, &budget);
                drop(r);
                prop_assert_eq!(budget.used(), 0);
            }

            /// The lean decoders read a message in pieces as they read it in one slice.
            #[test]
            fn requests_decode_the_same_in_pieces(body in proptest::collection::vec(any::<u8>(), 0..256), lens in frame_lens()) {
                use crate::xds::requests::{DeltaNode, DeltaRequest, SotwNode, SotwRequest};
                fn same<M: prost::Message + Default + PartialEq>(message: &Message, body: &[u8]) -> bool {
                    match (decode::<M>(message.clone()), M::decode(body)) {
                        (Ok(a), Ok(b)) => a == b,
                        (Err(_), Err(_)) => true,
                        _ => false,
                    }
                }
                let (budget, mut r) = reassembly(1 << 20, 256 << 20);
                let mut message = None;
                for frame in cut(&framed(&body), &lens) {
                    if let Some(m) = r.frame(frame).unwrap() {
                        message = Some(m);
                    }
                    if let Some(m) = r.take_message().unwrap() {
                        message = Some(m);
                    }
                }
                let message = message.expect("whole");
                prop_assert!(same::<SotwRequest>(&message, &body));
                prop_assert!(same::<DeltaRequest>(&message, &body));
                prop_assert!(same::<SotwNode>(&message, &body));
                prop_assert!(same::<DeltaNode>(&message, &body));
                drop(r);
                prop_assert_eq!(budget.used(), 0);
            }
        }

        /// The messages of `stream` read in one piece, and the code of the refusal it
        /// ends with, if any.
        fn plain_parse(stream: &[u8], max_request: usize) -> (Vec<Vec<u8>>, Option<tonic::Code>) {
            let (mut messages, mut at) = (Vec::new(), 0);
            loop {
                let rest = &stream[at..];
                if rest.len() < PREFIX {
                    return (messages, None);
                }
                if rest[0] != 0 {
                    return (messages, Some(tonic::Code::Internal));
                }
                let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
                if len > max_request {
                    return (messages, Some(tonic::Code::ResourceExhausted));
                }
                if rest.len() < PREFIX + len {
                    return (messages, None);
                }
                messages.push(rest[PREFIX..PREFIX + len].to_vec());
                at += PREFIX + len;
            }
        }
    }
}
