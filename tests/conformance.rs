//! What other gRPC clients send, checked against the certwire binary with bytes written
//! by hand (not certwire's own code path, nor an HTTP/2 library that would refuse to
//! send them).

mod common;

use common::attack::{frame, literal};
use common::certwire::Certwire;
use common::util::{self, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// gRPC C-core (grpcio >= 1.57), grpc-java and grpc-swift send a percent-encoded
/// `:authority` over a Unix socket. HTTP/2 (h2) refuses the stream; certwire says so at
/// warn, with the client setting that avoids it.
#[tokio::test]
async fn a_percent_encoded_authority_is_refused_and_explained() {
    let dir = util::tempdir();
    let socket = dir.path().join("sds.sock");
    let certwire = Certwire::serve(["--listen".to_string(), format!("unix:{}", socket.display())]).await;
    let mut sock = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let mut headers = Vec::new();
    literal(&mut headers, ":method", "POST");
    literal(&mut headers, ":scheme", "http");
    literal(&mut headers, ":path", "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets");
    literal(&mut headers, ":authority", "%2Ftmp%2Fsds.sock");
    literal(&mut headers, "content-type", "application/grpc");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[]));
    out.extend(frame(1, 0x4, 1, &headers));
    sock.write_all(&out).await.unwrap();

    // Frames until RST_STREAM on stream 1.
    let mut reset = None;
    let deadline = tokio::time::Instant::now() + WAIT;
    while reset.is_none() && tokio::time::Instant::now() < deadline {
        let mut head = [0u8; 9];
        tokio::time::timeout(WAIT, sock.read_exact(&mut head)).await.unwrap().unwrap();
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        sock.read_exact(&mut payload).await.unwrap();
        if head[3] == 4 && head[4] & 1 == 0 {
            sock.write_all(&frame(4, 1, 0, &[])).await.unwrap();
        }
        if head[3] == 3 {
            reset = Some(u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]));
        }
    }
    assert_eq!(reset, Some(1), "RST_STREAM(PROTOCOL_ERROR)");
    util::wait_for("the warning in certwire's log", WAIT, || async {
        let log = std::fs::read_to_string(certwire.log_path()).unwrap_or_default();
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("grpc.default_authority") && l.contains("malformed authority"))
            .then_some(())
    })
    .await;
}
