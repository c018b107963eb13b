//! DNS over the wire, just enough for dns-01: one request to one server over UDP
//! (TCP when the answer is truncated), and the few non-recursive queries the solver
//! needs (TXT to see a record, NS and A/AAAA to find a zone's authoritative servers).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::DnsError;

/// One try over UDP waits this long; there are [`UDP_TRIES`] of them.
const UDP_TIMEOUT: Duration = Duration::from_secs(2);
const UDP_TRIES: usize = 2;
const TCP_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `request` (an encoded message with id `id`) to `server` and returns the
/// answer's bytes: UDP first, TCP when the answer comes back truncated.
pub async fn exchange(server: SocketAddr, request: &[u8], id: u16) -> Result<Vec<u8>, DnsError> {
    let answer = exchange_udp(server, request, id).await?;
    if answer.len() > 2 && answer[2] & 0x02 != 0 {
        return exchange_tcp(server, request).await;
    }
    Ok(answer)
}

async fn exchange_udp(server: SocketAddr, request: &[u8], id: u16) -> Result<Vec<u8>, DnsError> {
    let local: SocketAddr = if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = UdpSocket::bind(local).await.map_err(|e| DnsError::new(format!("binding a UDP socket: {e}")))?;
    socket.connect(server).await.map_err(|e| DnsError::new(format!("{server}: {e}")))?;
    let mut buf = vec![0u8; 4096];
    for _ in 0..UDP_TRIES {
        socket.send(request).await.map_err(|e| DnsError::new(format!("{server}: sending: {e}")))?;
        let deadline = tokio::time::Instant::now() + UDP_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
                Err(_) => break,
                Ok(Err(e)) => return Err(DnsError::new(format!("{server}: {e}"))),
                // Anything not answering our id (a late answer to an earlier try) is skipped.
                Ok(Ok(n)) if n >= 12 && u16::from_be_bytes([buf[0], buf[1]]) == id => return Ok(buf[..n].to_vec()),
                Ok(Ok(_)) => continue,
            }
        }
    }
    Err(DnsError::new(format!("{server}: no answer over UDP after {UDP_TRIES} tries of {UDP_TIMEOUT:?}")))
}

async fn exchange_tcp(server: SocketAddr, request: &[u8]) -> Result<Vec<u8>, DnsError> {
    let io = async {
        let mut stream = TcpStream::connect(server).await?;
        let len = u16::try_from(request.len()).map_err(|_| std::io::Error::other("request too large"))?;
        let mut framed = Vec::with_capacity(request.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(request);
        stream.write_all(&framed).await?;
        let len = stream.read_u16().await? as usize;
        let mut answer = vec![0u8; len];
        stream.read_exact(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(TCP_TIMEOUT, io).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(DnsError::new(format!("{server} over TCP: {e}"))),
        Err(_) => Err(DnsError::new(format!("{server} over TCP: no answer within {TCP_TIMEOUT:?}"))),
    }
}

/// A non-recursive question to `server`; a non-NOERROR/NXDOMAIN answer is an error.
pub async fn query(server: SocketAddr, name: &Name, rtype: RecordType) -> Result<Message, DnsError> {
    let mut message = Message::query();
    message.metadata.recursion_desired = false;
    message.add_query(Query::query(name.clone(), rtype));
    let id = message.metadata.id;
    let bytes = message.to_vec().map_err(|e| DnsError::new(format!("encoding a query: {e}")))?;
    let answer = exchange(server, &bytes, id).await?;
    let answer = Message::from_vec(&answer).map_err(|e| DnsError::new(format!("{server}: bad answer: {e}")))?;
    if answer.metadata.message_type != MessageType::Response {
        return Err(DnsError::new(format!("{server}: answered with a query")));
    }
    match answer.metadata.response_code {
        ResponseCode::NoError | ResponseCode::NXDomain => Ok(answer),
        code => Err(DnsError::new(format!("{server}: {rtype} {name}: {code}"))),
    }
}

/// The TXT strings at `name` (one string per record, character-strings joined).
pub async fn txt(server: SocketAddr, name: &Name) -> Result<Vec<String>, DnsError> {
    let answer = query(server, name, RecordType::TXT).await?;
    Ok(answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::TXT(txt) => Some(txt.txt_data.iter().map(|s| String::from_utf8_lossy(s)).collect::<String>()),
            _ => None,
        })
        .collect())
}

/// The NS names of `zone` as `server` answers them.
pub async fn ns(server: SocketAddr, zone: &Name) -> Result<Vec<Name>, DnsError> {
    let answer = query(server, zone, RecordType::NS).await?;
    Ok(answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::NS(ns) => Some(ns.0.clone()),
            _ => None,
        })
        .collect())
}

/// The A and AAAA addresses of `name` as `server` answers them.
pub async fn addresses(server: SocketAddr, name: &Name) -> Result<Vec<IpAddr>, DnsError> {
    let mut out = Vec::new();
    for rtype in [RecordType::A, RecordType::AAAA] {
        let answer = query(server, name, rtype).await?;
        out.extend(answer.answers.iter().filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        }));
    }
    Ok(out)
}

/// `name` as an absolute DNS name.
pub fn fqdn(name: &str) -> Result<Name, DnsError> {
    let mut n = Name::from_ascii(name).map_err(|e| DnsError::new(format!("{name:?} is not a DNS name: {e}")))?;
    n.set_fqdn(true);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-shot UDP "server" answering with `reply(request)`.
    async fn fake_server(reply: impl Fn(&[u8]) -> Vec<u8> + Send + 'static) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            let (n, from) = socket.recv_from(&mut buf).await.unwrap();
            let answer = reply(&buf[..n]);
            socket.send_to(&answer, from).await.unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn txt_answers_are_read() {
        let server = fake_server(|request| {
            let request = Message::from_vec(request).unwrap();
            assert!(!request.metadata.recursion_desired, "authoritative servers are asked without recursion");
            let mut answer = Message::response(request.metadata.id, request.metadata.op_code);
            let name = request.queries[0].name().clone();
            let txt = hickory_proto::rr::rdata::TXT::new(vec!["abc".into(), "def".into()]);
            answer.add_answer(hickory_proto::rr::Record::from_rdata(name, 1, RData::TXT(txt)));
            answer.to_vec().unwrap()
        })
        .await;
        let records = txt(server, &fqdn("_acme-challenge.example.com").unwrap()).await.unwrap();
        assert_eq!(records, ["abcdef"]);
    }

    #[tokio::test]
    async fn refused_is_an_error_nxdomain_is_empty() {
        let server = fake_server(|request| {
            let request = Message::from_vec(request).unwrap();
            Message::error_msg(request.metadata.id, request.metadata.op_code, ResponseCode::Refused).to_vec().unwrap()
        })
        .await;
        let err = txt(server, &fqdn("x.example.com").unwrap()).await.unwrap_err();
        assert!(err.to_string().contains("Refused"), "{err}");

        let server = fake_server(|request| {
            let request = Message::from_vec(request).unwrap();
            Message::error_msg(request.metadata.id, request.metadata.op_code, ResponseCode::NXDomain).to_vec().unwrap()
        })
        .await;
        assert!(txt(server, &fqdn("x.example.com").unwrap()).await.unwrap().is_empty());
    }
}
