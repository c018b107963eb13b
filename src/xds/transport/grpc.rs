//! gRPC over HTTP/2, the little of it SDS needs: length-prefixed messages in DATA
//! frames, `grpc-status` in trailers. Served on `h2` directly rather than through
//! hyper and tonic so that a connection and all its streams are one task: a rotation
//! pushed to ten thousand proxies wakes ten thousand tasks, not twice that, and an idle
//! proxy holds no per-stream task, body adapter or codec buffer. Requests are cut into
//! messages in [`super::inbound`].

use std::io::IoSlice;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Context;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::task::AtomicWaker;

use super::parts::Parts;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use tonic::Status;

pub(super) const PREFIX: usize = 5;

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
        // gRPC: a message encoding the server does not support is UNIMPLEMENTED, and the
        // response says which it accepts.
        let encoding = req.headers().get("grpc-encoding").map(|v| v.as_bytes());
        if let Some(encoding) = encoding.filter(|e| *e != b"identity") {
            let shown = super::limits::truncate(&String::from_utf8_lossy(encoding), 64).into_owned();
            let mut response =
                trailers_only(&Status::unimplemented(format!("grpc-encoding {shown} is not supported: send identity")));
            response.headers_mut().insert("grpc-accept-encoding", HeaderValue::from_static("identity"));
            return Some(response);
        }
        return None;
    };
    let mut response = Response::new(());
    *response.status_mut() = status;
    Some(response)
}

/// The call's `grpc-timeout` (gRPC over HTTP/2: up to 8 digits and a unit, H M S m u
/// n). A value that does not parse is ignored, as gRPC servers do.
pub fn timeout<T>(req: &Request<T>) -> Option<std::time::Duration> {
    use std::time::Duration;
    let value = req.headers().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
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

/// One gRPC message for DATA frames: the 5-byte prefix (uncompressed, length) and the
/// body, as parts. The parts a response shares with every other stream (the encoded
/// secrets) are handles, not copies: h2 hands them to the kernel as they are (`writev`),
/// so a push to ten thousand streams copies no secret in user space, and no copy of a
/// key is left behind in a send buffer.
#[derive(Debug)]
pub struct Frame {
    parts: Parts<Vec<Bytes>>,
    /// Told when h2 drops the frame, see [`Frame::departing`].
    departed: Option<Arc<Departed>>,
}

impl Frame {
    /// Makes `departed` report this frame gone when h2 drops it: once it is written out
    /// (for the socket), or its stream is gone.
    pub fn departing(mut self, departed: &Arc<Departed>) -> Self {
        departed.gone.store(false, Ordering::Release);
        self.departed = Some(departed.clone());
        self
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        if let Some(departed) = self.departed.take() {
            departed.gone.store(true, Ordering::Release);
            departed.waker.wake();
        }
    }
}

/// Whether the last frame a stream handed to h2 has left it. A stream hands over its
/// next response only then, so a proxy that does not read holds one response in
/// certwire, whatever its flow-control window; later changes wait in the store, where
/// only the latest is kept.
#[derive(Debug)]
pub struct Departed {
    gone: AtomicBool,
    waker: AtomicWaker,
}

impl Departed {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { gone: AtomicBool::new(true), waker: AtomicWaker::new() })
    }

    /// Whether the last frame is gone; if not, the task of `cx` is woken when it is.
    pub fn poll_gone(&self, cx: &mut Context<'_>) -> bool {
        if self.gone.load(Ordering::Acquire) {
            return true;
        }
        // Registered before the second look: a drop in between is seen by one or the other.
        self.waker.register(cx.waker());
        self.gone.load(Ordering::Acquire)
    }
}

impl Buf for Frame {
    fn remaining(&self) -> usize {
        self.parts.remaining()
    }

    fn chunk(&self) -> &[u8] {
        self.parts.chunk()
    }

    fn advance(&mut self, cnt: usize) {
        self.parts.advance(cnt);
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        self.parts.chunks_vectored(dst)
    }
}

/// Writes one gRPC message whose body length is known up front: small fields go into
/// one buffer, shared and static bytes are appended as handles between them.
pub struct FrameBuilder {
    head: BytesMut,
    parts: Vec<Bytes>,
    /// The whole message, prefix included.
    total: usize,
}

impl FrameBuilder {
    /// For a body of exactly `len` bytes, of which `shared` come as `handles` handles
    /// (shared or static).
    pub fn new(len: usize, shared: usize, handles: usize) -> Self {
        let len32 = u32::try_from(len).expect("an SDS response is far below 4 GiB");
        let mut head = BytesMut::with_capacity(PREFIX + len - shared);
        head.put_u8(0);
        head.put_u32(len32);
        Self { head, parts: Vec::with_capacity(2 * handles + 1), total: PREFIX + len }
    }

    /// Where the small fields go.
    pub fn buf(&mut self) -> &mut BytesMut {
        &mut self.head
    }

    pub fn put_shared(&mut self, bytes: Bytes) {
        self.flush();
        if !bytes.is_empty() {
            self.parts.push(bytes);
        }
    }

    pub fn put_static(&mut self, bytes: &'static [u8]) {
        self.put_shared(Bytes::from_static(bytes));
    }

    pub fn finish(mut self) -> Frame {
        self.flush();
        Frame { parts: Parts::new(self.parts, self.total), departed: None }
    }

    fn flush(&mut self) {
        if self.head.is_empty() {
            return;
        }
        let part = if self.head.len() == self.head.capacity() {
            // All the small fields are written (the usual response, one secret): the
            // buffer becomes the part as it is, with no shared header to allocate.
            std::mem::take(&mut self.head).freeze()
        } else {
            // Splits off what was written; the rest of the allocation stays for what follows.
            self.head.split().freeze()
        };
        self.parts.push(part);
    }
}

pub(super) fn message_len(buf: &[u8]) -> usize {
    u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize
}

/// Checks a message prefix: uncompressed (gRPC: a compressed flag on a call whose
/// `grpc-encoding` is identity or absent is INTERNAL; other encodings were refused with
/// the call) and at most `max` bytes (`[limits] max_request_bytes`).
pub(super) fn check_prefix(buf: &[u8], max: usize) -> Result<(), Status> {
    match buf[0] {
        0 => {}
        1 => return Err(Status::internal("compressed message flag set but the call has no grpc-encoding")),
        flag => return Err(Status::internal(format!("invalid gRPC message flag {flag}"))),
    }
    let len = message_len(buf);
    if len > max {
        return Err(Status::resource_exhausted(format!("request of {len} bytes is over the limit of {max} bytes")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(mut f: Frame) -> Vec<u8> {
        let mut out = Vec::new();
        while f.has_remaining() {
            let n = f.chunk().len();
            out.extend_from_slice(f.chunk());
            f.advance(n);
        }
        out
    }

    #[test]
    fn frames_carry_the_length_and_share_what_is_shared() {
        let shared = Bytes::from_static(b"SECRET");
        let mut b = FrameBuilder::new(10, shared.len(), 1);
        b.buf().put_slice(b"ab");
        b.put_shared(shared.clone());
        b.buf().put_slice(b"cd");
        let f = b.finish();
        assert_eq!(f.remaining(), 15);
        let mut slices = [IoSlice::new(&[]); 8];
        assert_eq!(f.chunks_vectored(&mut slices), 3);
        assert_eq!(slices[1].as_ptr(), shared.as_ptr(), "the shared part is not copied");
        assert_eq!(collect(f), b"\0\0\0\0\x0aabSECRETcd");
    }

    #[test]
    fn frames_advance_across_parts() {
        let mut b = FrameBuilder::new(4, 2, 1);
        b.buf().put_slice(b"a");
        b.put_shared(Bytes::from_static(b"bc"));
        b.buf().put_slice(b"d");
        let mut f = b.finish();
        f.advance(7);
        assert_eq!(f.remaining(), 2);
        assert_eq!(f.chunk(), b"c", "the prefix, `a` and half the shared part are consumed");
        f.advance(1);
        assert_eq!(collect(f), b"d");
    }

    #[test]
    fn prefix_checks_name_the_problem() {
        const MAX: usize = 1 << 20;
        assert!(check_prefix(&[0, 0, 0, 0, 1], MAX).is_ok());
        let compressed = check_prefix(&[1, 0, 0, 0, 1], MAX).unwrap_err();
        assert_eq!(compressed.code(), tonic::Code::Internal);
        let big = (MAX as u32 + 1).to_be_bytes();
        let too_big = check_prefix(&[0, big[0], big[1], big[2], big[3]], MAX).unwrap_err();
        assert_eq!(too_big.code(), tonic::Code::ResourceExhausted);
        assert!(too_big.message().contains("limit"));
    }

    #[test]
    fn grpc_timeouts_parse_as_the_spec_says() {
        use std::time::Duration;
        let req = |v: &str| Request::builder().header("grpc-timeout", v).body(()).unwrap();
        assert_eq!(timeout(&req("100m")), Some(Duration::from_millis(100)));
        assert_eq!(timeout(&req("2S")), Some(Duration::from_secs(2)));
        assert_eq!(timeout(&req("1H")), Some(Duration::from_secs(3600)));
        assert_eq!(timeout(&req("99999999n")), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "123456789S", "10x", "-1S", "1.5S"] {
            assert_eq!(timeout(&req(bad)), None, "{bad:?}");
        }
        assert_eq!(timeout(&Request::new(())), None);
    }

    #[test]
    fn status_goes_into_trailers() {
        let t = trailers(&Status::not_found("no secret named \"web\""));
        assert_eq!(t.get("grpc-status").unwrap(), "5");
        assert!(t.get("grpc-message").is_some());
        assert_eq!(trailers(&Status::ok("")).get("grpc-status").unwrap(), "0");
    }
}
