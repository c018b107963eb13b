//! gRPC over HTTP/2, the little of it SDS needs: length-prefixed messages in DATA
//! frames, `grpc-status` in trailers. Served on `h2` directly rather than through
//! hyper and tonic so that a connection and all its streams are one task: a rotation
//! pushed to ten thousand proxies wakes ten thousand tasks, not twice that, and an idle
//! proxy holds no per-stream task, body adapter or codec buffer.

use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::RecvStream;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use tonic::Status;

/// Largest request accepted, as tonic's default: Envoy's requests are a few hundred
/// bytes, its node metadata at most some kilobytes.
pub const MAX_REQUEST: usize = 4 * 1024 * 1024;
const PREFIX: usize = 5;

/// Why a request is not a gRPC call this server takes; answered without a stream.
pub fn refuse<T>(req: &Request<T>) -> Option<Response<()>> {
    let is_grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct == "application/grpc" || ct.starts_with("application/grpc+proto"));
    let status = if req.method() != http::Method::POST {
        StatusCode::METHOD_NOT_ALLOWED
    } else if !is_grpc {
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    } else {
        return None;
    };
    let mut response = Response::new(());
    *response.status_mut() = status;
    Some(response)
}

/// Headers that open a gRPC response.
pub fn response_headers() -> Response<()> {
    let mut response = Response::new(());
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

/// A response that is only a status (an error before any message): headers and
/// `grpc-status` in one HEADERS frame, as gRPC's "trailers-only" form.
pub fn trailers_only(status: &Status) -> Response<()> {
    let mut response = response_headers();
    add_status(status, response.headers_mut());
    response
}

/// The trailers that end a stream with `status`.
pub fn trailers(status: &Status) -> HeaderMap {
    let mut map = HeaderMap::new();
    add_status(status, &mut map);
    map
}

fn add_status(status: &Status, map: &mut HeaderMap) {
    // Fails only for a message that cannot be percent-encoded into a header, which tonic
    // never produces; the code alone still goes out.
    if status.add_header(map).is_err() {
        map.insert("grpc-status", HeaderValue::from(status.code() as i32));
    }
}

/// One message framed for a DATA frame: the 5-byte prefix (uncompressed, length) and
/// the body `write` produces, in a single allocation of `size_hint` bytes or more.
pub fn frame(size_hint: usize, write: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut buf = BytesMut::with_capacity(PREFIX + size_hint);
    buf.put_bytes(0, PREFIX);
    write(&mut buf);
    let len = u32::try_from(buf.len() - PREFIX).expect("an SDS response is far below 4 GiB");
    buf[1..PREFIX].copy_from_slice(&len.to_be_bytes());
    buf.freeze()
}

/// Reassembles messages from the DATA frames of a request stream, returning window
/// capacity to the peer as bytes are read.
pub struct Inbound {
    body: RecvStream,
    buf: BytesMut,
}

impl Inbound {
    pub fn new(body: RecvStream) -> Self {
        Self { body, buf: BytesMut::new() }
    }

    /// The next whole message; `Ready(None)` when the peer has ended the stream.
    /// `Err` carries what the peer should be told; a reset or broken connection comes
    /// back as `Ready(None)` too, since nobody is left to tell.
    pub fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Status>>> {
        loop {
            match self.take_message() {
                Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(None) => {}
                Err(status) => return Poll::Ready(Some(Err(status))),
            }
            match self.body.poll_data(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    let _ = self.body.flow_control().release_capacity(chunk.len());
                    if self.buf.is_empty() && chunk.len() >= PREFIX && whole(&chunk) == Some(chunk.len()) {
                        // The usual case, one message per frame: no copy.
                        let mut chunk = chunk;
                        chunk.advance(PREFIX);
                        return Poll::Ready(Some(Ok(chunk)));
                    }
                    self.buf.extend_from_slice(&chunk);
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "request stream broken");
                    return Poll::Ready(None);
                }
                Poll::Ready(None) => {
                    if !self.buf.is_empty() {
                        return Poll::Ready(Some(Err(Status::internal("request ended inside a message"))));
                    }
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn take_message(&mut self) -> Result<Option<Bytes>, Status> {
        if self.buf.len() < PREFIX {
            return Ok(None);
        }
        check_prefix(&self.buf)?;
        let len = message_len(&self.buf);
        if self.buf.len() < PREFIX + len {
            self.buf.reserve(PREFIX + len - self.buf.len());
            return Ok(None);
        }
        let mut message = self.buf.split_to(PREFIX + len);
        message.advance(PREFIX);
        Ok(Some(message.freeze()))
    }
}

fn message_len(buf: &[u8]) -> usize {
    u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize
}

fn check_prefix(buf: &[u8]) -> Result<(), Status> {
    match buf[0] {
        0 => {}
        1 => return Err(Status::unimplemented("compressed messages are not supported: send them uncompressed")),
        flag => return Err(Status::internal(format!("invalid gRPC message flag {flag}"))),
    }
    let len = message_len(buf);
    if len > MAX_REQUEST {
        return Err(Status::resource_exhausted(format!(
            "request of {len} bytes is over the limit of {MAX_REQUEST} bytes"
        )));
    }
    Ok(())
}

/// `Some(total)` when `chunk` starts with a valid prefix: the frame's full length.
fn whole(chunk: &[u8]) -> Option<usize> {
    check_prefix(chunk).ok().map(|()| PREFIX + message_len(chunk))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_the_length() {
        let f = frame(3, |b| b.put_slice(b"abc"));
        assert_eq!(&f[..], &[0, 0, 0, 0, 3, b'a', b'b', b'c']);
    }

    #[test]
    fn prefix_checks_name_the_problem() {
        assert!(check_prefix(&[0, 0, 0, 0, 1]).is_ok());
        let compressed = check_prefix(&[1, 0, 0, 0, 1]).unwrap_err();
        assert_eq!(compressed.code(), tonic::Code::Unimplemented);
        let big = (MAX_REQUEST as u32 + 1).to_be_bytes();
        let too_big = check_prefix(&[0, big[0], big[1], big[2], big[3]]).unwrap_err();
        assert_eq!(too_big.code(), tonic::Code::ResourceExhausted);
        assert!(too_big.message().contains("limit"));
    }

    #[test]
    fn status_goes_into_trailers() {
        let t = trailers(&Status::not_found("no secret named \"web\""));
        assert_eq!(t.get("grpc-status").unwrap(), "5");
        assert!(t.get("grpc-message").is_some());
        assert_eq!(trailers(&Status::ok("")).get("grpc-status").unwrap(), "0");
    }
}
