//! RFC 2136 dynamic updates signed with TSIG (RFC 8945, HMAC-SHA256/384/512): the
//! interface of BIND, knot and PowerDNS, and of cert-manager's rfc2136 solver.
//! Messages are hickory-proto's; the MACs are ring's (hickory's `dnssec-ring`).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use base64::Engine;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use hickory_proto::op::{Message, ResponseCode, update_message};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::rdata::tsig::TsigAlgorithm;
use hickory_proto::rr::{Name, RData, RecordSet, RecordType, TSigVerifier, TSigner};
use zeroize::Zeroizing;

use super::{DnsError, DnsProvider, wire};

/// TTL of published challenge records: short, so a removed record is gone quickly.
const TXT_TTL: u32 = 60;
/// Allowed clock difference between certwire and the server (RFC 8945 suggests 300 s).
const FUDGE: u16 = 300;

pub struct Rfc2136 {
    server: SocketAddr,
    zone: Name,
    signer: TSigner,
}

impl Rfc2136 {
    /// `secret_b64` is the TSIG secret in base64, as knot.conf and `nsupdate -y` take it.
    pub fn new(
        server: SocketAddr,
        zone: &str,
        key_name: &str,
        algorithm: &str,
        secret_b64: &str,
    ) -> Result<Self, DnsError> {
        let algorithm = match algorithm.trim_end_matches('.').to_ascii_lowercase().as_str() {
            "hmac-sha256" => TsigAlgorithm::HmacSha256,
            "hmac-sha384" => TsigAlgorithm::HmacSha384,
            "hmac-sha512" => TsigAlgorithm::HmacSha512,
            other => {
                return Err(DnsError::new(format!(
                    "TSIG algorithm {other:?} is not supported (hmac-sha256, hmac-sha384, hmac-sha512)"
                )));
            }
        };
        let key = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(secret_b64.trim())
                .map_err(|e| DnsError::new(format!("TSIG secret of key {key_name} is not base64: {e}")))?,
        );
        // hickory keeps its own copy of the key (not zeroized on drop).
        let signer = TSigner::new(key.to_vec(), algorithm, wire::fqdn(key_name)?, FUDGE)
            .map_err(|e| DnsError::new(format!("TSIG key {key_name}: {e}")))?;
        Ok(Self { server, zone: wire::fqdn(zone)?, signer })
    }

    /// The signed UPDATE adding (`add`) or removing one TXT value, and the verifier
    /// of its answer's signature.
    fn update_message(
        &self,
        fqdn: &str,
        value: &str,
        add: bool,
        now: u64,
    ) -> Result<(Message, TSigVerifier), DnsError> {
        let name = wire::fqdn(fqdn)?;
        if !self.zone.zone_of(&name) {
            return Err(DnsError::new(format!("{name} is not in zone {}", self.zone)));
        }
        let mut rrset = RecordSet::with_ttl(name, RecordType::TXT, TXT_TTL);
        rrset.add_rdata(RData::TXT(TXT::new(vec![value.to_owned()])));
        let mut message = if add {
            update_message::append(rrset, self.zone.clone(), false, false)
        } else {
            update_message::delete_by_rdata(rrset, self.zone.clone(), false)
        };
        let verifier = message
            .finalize(&self.signer, now)
            .map_err(|e| DnsError::new(format!("signing the update: {e}")))?
            .ok_or_else(|| DnsError::new("signing the update gave no verifier"))?;
        Ok((message, verifier))
    }

    async fn send(&self, fqdn: &str, value: &str, add: bool) -> Result<(), DnsError> {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs();
        let what = if add { "adding" } else { "removing" };
        let (message, mut verifier) = self.update_message(fqdn, value, add, now)?;
        let id = message.metadata.id;
        let bytes = message.to_vec().map_err(|e| DnsError::new(format!("encoding the update: {e}")))?;
        let answer = wire::exchange(self.server, &bytes, id)
            .await
            .map_err(|e| DnsError::new(format!("RFC 2136 update ({what} TXT {fqdn}) to {}: {e}", self.server)))?;
        let parsed = Message::from_vec(&answer)
            .map_err(|e| DnsError::new(format!("RFC 2136 update to {}: bad answer: {e}", self.server)))?;
        let code = parsed.metadata.response_code;
        if code != ResponseCode::NoError {
            let tsig_error = parsed.signature().and_then(|s| s.data.error);
            let tsig = match tsig_error {
                Some(e) => format!(", TSIG error {e:?}"),
                None => String::new(),
            };
            let hint = match code {
                ResponseCode::NotAuth => " (the server does not accept this TSIG key or secret for the zone)",
                ResponseCode::Refused => " (the server refuses updates to this zone from this key)",
                ResponseCode::NotZone => " (the name is not in the zone)",
                _ => "",
            };
            return Err(DnsError::new(format!(
                "RFC 2136 update ({what} TXT {fqdn}) refused by {}: {code}{tsig}{hint}",
                self.server
            )));
        }
        // A success must be signed by the same key, or anyone could fake one.
        verifier.verify(&answer).map_err(|e| {
            DnsError::new(format!(
                "RFC 2136 update to {}: the answer's TSIG signature does not verify: {e}",
                self.server
            ))
        })?;
        Ok(())
    }
}

impl DnsProvider for Rfc2136 {
    fn describe(&self) -> String {
        format!("rfc2136 {} zone {}", self.server, self.zone)
    }

    fn add_txt<'a>(&'a self, fqdn: &'a str, value: &'a str) -> BoxFuture<'a, Result<(), DnsError>> {
        self.send(fqdn, value, true).boxed()
    }

    fn remove_txt<'a>(&'a self, fqdn: &'a str, value: &'a str) -> BoxFuture<'a, Result<(), DnsError>> {
        self.send(fqdn, value, false).boxed()
    }

    /// The update server itself, and every name server of the zone it lists (their
    /// addresses from the zone's own glue, else the system resolver), on port 53.
    fn authoritative_servers(&self) -> BoxFuture<'_, Result<Vec<SocketAddr>, DnsError>> {
        async move {
            let mut servers = vec![self.server];
            let names = match wire::ns(self.server, &self.zone).await {
                Ok(names) => names,
                Err(e) => {
                    tracing::warn!(zone = %self.zone, error = %e, "cannot list the zone's name servers; checking the update server only");
                    return Ok(servers);
                }
            };
            for ns in names {
                let mut addrs: Vec<SocketAddr> = match wire::addresses(self.server, &ns).await {
                    Ok(ips) => ips.into_iter().map(|ip| SocketAddr::new(ip, 53)).collect(),
                    Err(_) => Vec::new(),
                };
                if addrs.is_empty() {
                    let host = ns.to_ascii();
                    addrs = match tokio::net::lookup_host((host.trim_end_matches('.'), 53)).await {
                        Ok(found) => found.collect(),
                        Err(e) => {
                            tracing::warn!(zone = %self.zone, ns = %ns, error = %e, "name server has no address; not checked");
                            Vec::new()
                        }
                    };
                }
                for addr in addrs {
                    if !servers.contains(&addr) {
                        servers.push(addr);
                    }
                }
            }
            Ok(servers)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::OpCode;
    use hickory_proto::rr::DNSClass;

    const SECRET: &str = "c2VjcmV0IGtleSBmb3IgdGVzdHMgb25seSEhISEhISE="; // 32 bytes

    fn provider() -> Rfc2136 {
        Rfc2136::new("127.0.0.1:53".parse().unwrap(), "example.com", "certwire-key", "hmac-sha256", SECRET).unwrap()
    }

    #[test]
    fn add_is_a_signed_update_of_the_zone() {
        let p = provider();
        let (message, _) = p.update_message("_acme-challenge.www.example.com", "v4lue", true, 1_700_000_000).unwrap();
        let bytes = message.to_vec().unwrap();
        let parsed = Message::from_vec(&bytes).unwrap();
        assert_eq!(parsed.metadata.op_code, OpCode::Update);
        // Zone section (the query section of an UPDATE): the zone's SOA, class IN.
        assert_eq!(parsed.queries.len(), 1);
        assert_eq!(parsed.queries[0].name().to_ascii(), "example.com.");
        assert_eq!(parsed.queries[0].query_type(), RecordType::SOA);
        assert!(parsed.answers.is_empty(), "no prerequisites");
        // Update section (the authority section): one TXT record, class IN, with the value.
        assert_eq!(parsed.authorities.len(), 1);
        let record = &parsed.authorities[0];
        assert_eq!(record.name.to_ascii(), "_acme-challenge.www.example.com.");
        assert_eq!(record.dns_class, DNSClass::IN);
        assert_eq!(record.ttl, TXT_TTL);
        match &record.data {
            RData::TXT(txt) => assert_eq!(&*txt.txt_data[0], b"v4lue"),
            other => panic!("not TXT: {other:?}"),
        }
        // TSIG: key name, algorithm, time, and a MAC over the message that verifies.
        let sig = parsed.signature().expect("TSIG record");
        assert_eq!(sig.name.to_ascii(), "certwire-key.");
        assert_eq!(sig.data.algorithm, TsigAlgorithm::HmacSha256);
        assert_eq!(sig.data.time, 1_700_000_000);
        assert_eq!(sig.data.fudge, FUDGE);
        assert_eq!(sig.data.mac.len(), 32);
        p.signer.verify_message_byte(&bytes, None, true).expect("MAC verifies with the key");
        let other =
            Rfc2136::new("127.0.0.1:53".parse().unwrap(), "example.com", "certwire-key", "hmac-sha256", "b3RoZXI=")
                .unwrap();
        assert!(other.signer.verify_message_byte(&bytes, None, true).is_err(), "another secret does not verify");
    }

    #[test]
    fn mac_is_hmac_sha256_over_message_and_tsig_variables() {
        // RFC 8945 §4.3.3, computed by hand with ring: the message without the TSIG
        // record (ARCOUNT one less), then the TSIG variables.
        let p = provider();
        let (message, _) = p.update_message("_acme-challenge.example.com", "x", true, 1_700_000_123).unwrap();
        let bytes = message.to_vec().unwrap();
        let mac = message.signature().unwrap().data.mac.clone();
        let mut unsigned = message.clone();
        unsigned.signature = None;
        let mut tbs = unsigned.to_vec().unwrap();
        let mut vars = Vec::new();
        vars.extend_from_slice(b"\x0ccertwire-key\x00"); // key name, canonical
        vars.extend_from_slice(&255u16.to_be_bytes()); // class ANY
        vars.extend_from_slice(&0u32.to_be_bytes()); // TTL
        vars.extend_from_slice(b"\x0bhmac-sha256\x00"); // algorithm name
        vars.extend_from_slice(&[0, 0]); // time, high 16 bits
        vars.extend_from_slice(&1_700_000_123u32.to_be_bytes()); // time, low 32 bits
        vars.extend_from_slice(&FUDGE.to_be_bytes());
        vars.extend_from_slice(&0u16.to_be_bytes()); // error
        vars.extend_from_slice(&0u16.to_be_bytes()); // other len
        tbs.extend_from_slice(&vars);
        let key = base64::engine::general_purpose::STANDARD.decode(SECRET).unwrap();
        let expected = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key), &tbs);
        assert_eq!(mac, expected.as_ref());
        assert!(bytes.len() > tbs.len() - vars.len(), "the sent message carries the TSIG record");
    }

    #[test]
    fn remove_deletes_that_value_only() {
        let (message, _) = provider().update_message("_acme-challenge.example.com", "old", false, 1).unwrap();
        let parsed = Message::from_vec(&message.to_vec().unwrap()).unwrap();
        let record = &parsed.authorities[0];
        assert_eq!(record.dns_class, DNSClass::NONE, "class NONE deletes one RR (RFC 2136 §2.5.4)");
        assert_eq!(record.ttl, 0);
        assert!(matches!(&record.data, RData::TXT(t) if &*t.txt_data[0] == b"old"));
    }

    #[test]
    fn names_outside_the_zone_and_bad_keys_are_refused() {
        let err = provider().update_message("_acme-challenge.other.org", "x", true, 1).err().unwrap();
        assert!(err.to_string().contains("not in zone"), "{err}");
        let err = Rfc2136::new("127.0.0.1:53".parse().unwrap(), "example.com", "k", "hmac-md5", SECRET).err().unwrap();
        assert!(err.to_string().contains("not supported"), "{err}");
        let err =
            Rfc2136::new("127.0.0.1:53".parse().unwrap(), "example.com", "k", "hmac-sha256", "***").err().unwrap();
        assert!(err.to_string().contains("not base64"), "{err}");
    }

    #[tokio::test]
    async fn a_refusal_names_the_rcode() {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            let (n, from) = socket.recv_from(&mut buf).await.unwrap();
            let request = Message::from_vec(&buf[..n]).unwrap();
            let answer = Message::error_msg(request.metadata.id, request.metadata.op_code, ResponseCode::NotAuth);
            socket.send_to(&answer.to_vec().unwrap(), from).await.unwrap();
        });
        let p = Rfc2136::new(addr, "example.com", "certwire-key", "hmac-sha256", SECRET).unwrap();
        let err = p.add_txt("_acme-challenge.example.com", "v").await.unwrap_err().to_string();
        assert!(err.contains("Not authorized"), "{err}");
        assert!(err.contains("TSIG key or secret"), "{err}");
    }
}
