//! Requests as they come: the DATA frames of a request stream cut into gRPC messages,
//! without copying them.
//!
//! Envoy's requests are big: its node lists every extension it was built with (61 KB,
//! four DATA frames, for Envoy 1.40) and comes with every ACK unless the bootstrap sets
//! `set_node_on_first_message_only`. A message here is the frames it came in, read as
//! one buffer; fields decoded from it are slices of those frames, and a field skipped
//! (the node, once the stream knows it) costs nothing. Between messages a stream holds
//! no buffer.

use std::collections::VecDeque;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::RecvStream;
use smallvec::SmallVec;
use tonic::Status;

use super::grpc::{PREFIX, check_prefix, message_len};

/// Reassembles messages from the DATA frames of a request stream, returning window
/// capacity to the peer as bytes are read.
pub struct Inbound {
    body: RecvStream,
    /// Frames (or their ends) not yet part of a whole message, as h2 handed them over.
    frames: VecDeque<Bytes>,
    buffered: usize,
}

impl Inbound {
    pub fn new(body: RecvStream) -> Self {
        Self { body, frames: VecDeque::new(), buffered: 0 }
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
                    let _ = self.body.flow_control().release_capacity(frame.len());
                    if self.frames.is_empty()
                        && let Some(total) = whole(&frame)
                    {
                        // The usual case, a message in one frame: nothing queued.
                        let message = Message::new(smallvec::smallvec![frame.split_to(total)], total);
                        if !frame.is_empty() {
                            self.buffered = frame.len();
                            self.frames.push_back(frame);
                        }
                        return Poll::Ready(Some(Ok(message)));
                    }
                    if !frame.is_empty() {
                        self.buffered += frame.len();
                        self.frames.push_back(frame);
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

    fn take_message(&mut self) -> Result<Option<Message>, Status> {
        if self.buffered < PREFIX {
            return Ok(None);
        }
        let mut prefix = [0u8; PREFIX];
        let mut at = 0;
        for frame in &self.frames {
            let n = frame.len().min(PREFIX - at);
            prefix[at..at + n].copy_from_slice(&frame[..n]);
            at += n;
            if at == PREFIX {
                break;
            }
        }
        check_prefix(&prefix)?;
        let total = PREFIX + message_len(&prefix);
        if self.buffered < total {
            return Ok(None);
        }
        let mut parts = SmallVec::new();
        let mut need = total;
        while need > 0 {
            let front = self.frames.front_mut().expect("buffered counts these bytes");
            if front.len() <= need {
                need -= front.len();
                parts.push(self.frames.pop_front().expect("just seen"));
            } else {
                parts.push(front.split_to(need));
                need = 0;
            }
        }
        self.buffered -= total;
        if self.frames.is_empty() {
            // Its capacity would stay with an idle stream.
            self.frames = VecDeque::new();
        }
        Ok(Some(Message::new(parts, total)))
    }
}

/// The length of the message `frame` starts with, prefix included, when it is all there.
fn whole(frame: &[u8]) -> Option<usize> {
    let prefix = frame.get(..PREFIX)?;
    check_prefix(prefix).ok()?;
    let total = PREFIX + message_len(prefix);
    (total <= frame.len()).then_some(total)
}

/// Decodes a request; what does not decode is an INVALID_ARGUMENT for the peer.
pub fn decode<M: prost::Message + Default>(message: Message) -> Result<M, Status> {
    M::decode(message).map_err(|e| Status::invalid_argument(format!("malformed request: {e}")))
}

/// One request message: the frames it came in, read as one buffer. Cloning it clones
/// handles, not bytes.
#[derive(Clone, Debug)]
pub struct Message {
    /// One for most messages; Envoy's with their node, four.
    parts: SmallVec<[Bytes; 1]>,
    /// Index of the first part not yet consumed.
    at: usize,
    remaining: usize,
}

impl Message {
    /// The message framed by `parts` (`total` bytes, prefix included).
    fn new(parts: SmallVec<[Bytes; 1]>, total: usize) -> Self {
        let mut message = Message { parts, at: 0, remaining: total };
        message.advance(PREFIX);
        message
    }
}

impl Buf for Message {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.parts.get(self.at).map_or(&[], |p| &p[..])
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advance past the end of a message");
        self.remaining -= cnt;
        while cnt > 0 {
            let part = &mut self.parts[self.at];
            let n = cnt.min(part.len());
            part.advance(n);
            cnt -= n;
            if part.is_empty() {
                self.at += 1;
            }
        }
    }

    /// A slice of the frame when the bytes are all in one (prost reads `bytes` fields
    /// this way); copied only when they straddle two.
    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        if let Some(part) = self.parts.get_mut(self.at)
            && len <= part.len()
        {
            let bytes = part.split_to(len);
            self.remaining -= len;
            if part.is_empty() {
                self.at += 1;
            }
            return bytes;
        }
        assert!(len <= self.remaining, "copy past the end of a message");
        let mut out = BytesMut::with_capacity(len);
        out.put((&mut *self).take(len));
        out.freeze()
    }
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
        (send, Inbound::new(body), respond)
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
        assert!(message.parts.len() > 1, "several frames, not copied into one");
        assert_eq!(bytes_of(message), body);
        assert_eq!((inbound.frames.len(), inbound.frames.capacity(), inbound.buffered), (0, 0, 0));

        // A frame ending one message and starting the next: the rest waits.
        let (a, b) = (framed(&[1, 1, 1]), framed(&[2; 20_000]));
        send.send_data([&a[..], &b[..100]].concat().into(), false).unwrap();
        assert_eq!(bytes_of(next(&mut inbound).await), [1, 1, 1]);
        send.send_data(Bytes::copy_from_slice(&b[100..]), false).unwrap();
        assert_eq!(bytes_of(next(&mut inbound).await), [2; 20_000]);
        assert_eq!(inbound.buffered, 0);
    }

    fn message(parts: &[&'static [u8]]) -> Message {
        let parts: SmallVec<[Bytes; 1]> = parts.iter().map(|p| Bytes::from_static(p)).collect();
        let remaining = parts.iter().map(Bytes::len).sum();
        Message { parts, at: 0, remaining }
    }

    #[test]
    fn bytes_within_a_frame_are_sliced_and_across_frames_copied() {
        let mut m = message(&[b"abcd", b"efgh"]);
        let first = m.parts[0].clone();
        let ab = m.copy_to_bytes(2);
        assert_eq!(ab.as_ptr(), first.as_ptr(), "a slice of the frame");
        assert_eq!(&m.copy_to_bytes(4)[..], b"cdef");
        assert_eq!(m.remaining(), 2);
        assert_eq!(m.chunk(), b"gh");
        m.advance(2);
        assert_eq!((m.remaining(), m.chunk()), (0, &b""[..]));
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
            assert_eq!(decode::<DiscoveryRequest>(message(&[a, b])).unwrap(), full, "cut at {cut}");
        }
    }
}
