//! Who a proxy is, as the transport proves it: a verified client certificate or the
//! kernel's credentials for a Unix socket peer. The node a proxy declares in its
//! requests is never an identity: any client can write any node id.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The identity of the peer of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A client certificate with a SPIFFE ID. `ns/NS/sa/SA` paths (Istio, cert-manager
    /// csi-driver-spiffe) give a Kubernetes namespace and service account.
    Spiffe { id: String, workload: Option<Workload> },
    /// A client certificate without a SPIFFE ID: its first DNS SAN.
    Dns(String),
    /// A client certificate with neither: its subject common name.
    Cn(String),
    /// The peer process of a Unix socket (SO_PEERCRED).
    Unix { uid: u32, gid: u32, pid: Option<i32> },
    /// No proof of anything: plaintext TCP.
    Anonymous,
    /// A certificate that verified but whose identity cannot be read unambiguously
    /// (two SPIFFE IDs, a SPIFFE ID that is not a URI, nothing at all). Nothing is
    /// granted to it.
    Invalid(String),
}

/// A Kubernetes workload, from a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    /// The identity a verified client certificate (DER) carries: a SPIFFE URI SAN, else
    /// the first DNS SAN, else the subject CN.
    pub fn from_certificate(der: &[u8]) -> Identity {
        let cert = match X509Certificate::from_der(der) {
            Ok((_, cert)) => cert,
            Err(e) => return Identity::Invalid(format!("client certificate does not parse: {e}")),
        };
        let mut uris = Vec::new();
        let mut dns = None;
        match cert.subject_alternative_name() {
            Ok(Some(san)) => {
                for name in &san.value.general_names {
                    match name {
                        GeneralName::URI(uri) if uri.len() >= 9 && uri[..9].eq_ignore_ascii_case("spiffe://") => {
                            uris.push(*uri)
                        }
                        GeneralName::DNSName(name) if dns.is_none() => dns = Some(name.to_string()),
                        _ => {}
                    }
                }
            }
            Ok(None) => {}
            Err(e) => return Identity::Invalid(format!("subjectAltName does not parse: {e}")),
        }
        match uris.as_slice() {
            [] => {}
            [one] => return spiffe(one),
            // The SPIFFE X.509-SVID spec: exactly one URI SAN. Picking one would let an
            // issuer's mistake choose the identity.
            _ => return Identity::Invalid(format!("{} SPIFFE IDs in one certificate", uris.len())),
        }
        if let Some(dns) = dns {
            return Identity::Dns(dns);
        }
        match cert.subject().iter_common_name().next().map(|cn| cn.as_str()) {
            Some(Ok(cn)) if !cn.is_empty() => Identity::Cn(cn.to_owned()),
            _ => Identity::Invalid("client certificate names nobody: no SPIFFE ID, DNS SAN or CN".into()),
        }
    }

    pub fn workload(&self) -> Option<&Workload> {
        match self {
            Identity::Spiffe { workload, .. } => workload.as_ref(),
            _ => None,
        }
    }

    /// The strings rule patterns are matched against.
    pub fn match_keys(&self) -> Vec<String> {
        match self {
            Identity::Unix { uid, gid, .. } => vec![format!("uid:{uid}"), format!("gid:{gid}")],
            Identity::Invalid(_) => Vec::new(),
            other => vec![other.to_string()],
        }
    }
}

/// `spiffe://TRUST_DOMAIN/PATH`; `/ns/NS/sa/SA` names a workload.
fn spiffe(uri: &str) -> Identity {
    let rest = &uri[9..];
    let Some((trust_domain, path)) = rest.split_once('/') else {
        return Identity::Invalid(format!("SPIFFE ID {uri:?} has no path"));
    };
    let valid = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    if !valid(trust_domain) {
        return Identity::Invalid(format!("SPIFFE ID {uri:?} has an invalid trust domain"));
    }
    let segments: Vec<&str> = path.split('/').collect();
    if segments.iter().any(|s| !valid(s) || *s == "." || *s == "..") {
        return Identity::Invalid(format!("SPIFFE ID {uri:?} has an invalid path"));
    }
    let workload = match segments.as_slice() {
        ["ns", ns, "sa", sa] => Some(Workload { namespace: (*ns).to_owned(), service_account: (*sa).to_owned() }),
        _ => None,
    };
    // Scheme and trust domain are case-insensitive; the path is not.
    let id = format!("spiffe://{}/{path}", trust_domain.to_ascii_lowercase());
    Identity::Spiffe { id, workload }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Spiffe { id, .. } => f.write_str(id),
            Identity::Dns(name) => write!(f, "dns:{name}"),
            Identity::Cn(name) => write!(f, "cn:{name}"),
            Identity::Unix { uid, gid, pid: Some(pid) } => write!(f, "unix:uid={uid},gid={gid},pid={pid}"),
            Identity::Unix { uid, gid, pid: None } => write!(f, "unix:uid={uid},gid={gid}"),
            Identity::Anonymous => f.write_str("anonymous"),
            Identity::Invalid(why) => write!(f, "invalid ({why})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    use super::*;

    fn cert(sans: Vec<SanType>, cn: Option<&str>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn dns(s: &str) -> SanType {
        SanType::DnsName(s.try_into().unwrap())
    }

    #[test]
    fn spiffe_id_gives_namespace_and_service_account() {
        let id = Identity::from_certificate(&cert(
            vec![dns("gw.example.com"), uri("spiffe://Cluster.Local/ns/gw/sa/ingress")],
            Some("x"),
        ));
        assert_eq!(
            id,
            Identity::Spiffe {
                id: "spiffe://cluster.local/ns/gw/sa/ingress".into(),
                workload: Some(Workload { namespace: "gw".into(), service_account: "ingress".into() })
            }
        );
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/gw/sa/ingress");
    }

    #[test]
    fn other_spiffe_paths_have_no_workload() {
        let id = Identity::from_certificate(&cert(vec![uri("spiffe://example.org/edge/eu-1")], None));
        assert_eq!(id, Identity::Spiffe { id: "spiffe://example.org/edge/eu-1".into(), workload: None });
        let id = Identity::from_certificate(&cert(vec![uri("spiffe://example.org/ns/gw/sa/x/extra")], None));
        assert!(id.workload().is_none(), "{id:?}");
    }

    #[test]
    fn malformed_spiffe_ids_are_invalid() {
        for bad in
            ["spiffe://example.org", "spiffe:///ns/a/sa/b", "spiffe://ex ample/ns/a/sa/b", "spiffe://e/ns/../sa/b"]
        {
            let id = Identity::from_certificate(&cert(vec![uri(bad)], Some("cn")));
            assert!(matches!(id, Identity::Invalid(_)), "{bad}: {id:?}");
            assert!(id.match_keys().is_empty(), "an invalid identity matches no rule");
        }
        let two = cert(vec![uri("spiffe://a/ns/x/sa/y"), uri("spiffe://a/ns/z/sa/y")], None);
        assert!(matches!(Identity::from_certificate(&two), Identity::Invalid(why) if why.contains("2 SPIFFE")));
    }

    #[test]
    fn dns_san_then_common_name() {
        assert_eq!(
            Identity::from_certificate(&cert(vec![uri("https://x/y"), dns("a.example"), dns("b.example")], Some("c"))),
            Identity::Dns("a.example".into())
        );
        assert_eq!(Identity::from_certificate(&cert(vec![], Some("envoy-1"))), Identity::Cn("envoy-1".into()));
        assert!(matches!(Identity::from_certificate(&cert(vec![], None)), Identity::Invalid(_)));
        assert!(matches!(Identity::from_certificate(b"not a certificate"), Identity::Invalid(_)));
    }

    #[test]
    fn unix_peers_match_by_uid_and_gid() {
        let id = Identity::Unix { uid: 1000, gid: 101, pid: Some(7) };
        assert_eq!(id.match_keys(), ["uid:1000", "gid:101"]);
        assert_eq!(id.to_string(), "unix:uid=1000,gid=101,pid=7");
    }
}
