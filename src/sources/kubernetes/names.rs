//! Pure rules of the Kubernetes source: which secret names a Secret serves, and what
//! material its data holds. Istio credentialName conventions, so existing gateway
//! configs keep working.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;

use crate::pki::{KeyBytes, Material};
use crate::sources::secret_keys;

/// Names under which Secret `ns/name` is served: `kubernetes://ns/name` always; in the
/// default namespace also `kubernetes://name` and bare `name`. The CA bundle of each is
/// the same name with `-cacert` appended.
pub fn served_names(ns: &str, name: &str, default_ns: &str) -> Vec<String> {
    let mut names = vec![format!("kubernetes://{ns}/{name}")];
    if ns == default_ns {
        names.push(format!("kubernetes://{name}"));
        names.push(name.to_owned());
    }
    names
}

pub fn cacert_name(name: &str) -> String {
    format!("{name}-cacert")
}

/// The pair and the CA bundle a Secret holds, if any, chosen as Istio chooses them
/// (pilot/pkg/credentials/kube/secrets.go): `cert`+`key` when both are non-empty, else
/// `tls.crt`+`tls.key` when both are; never one key from each pair. `tls.ocsp-staple`,
/// when non-empty, is the OCSP staple of whichever pair is chosen. The CA is `cacert`
/// (with `crl`) when non-empty, else `ca.crt` (with `ca.crl`).
///
/// Instead of a pair, a Secret may hold session ticket keys (`tls.session-ticket-keys`)
/// or, with generic secrets on, a generic secret (`secret`): see
/// [`crate::sources::secret_keys`].
pub struct Extracted {
    /// What the Secret serves under its own names: a pair, ticket keys or a generic secret.
    pub tls: Option<Material>,
    pub ca: Option<Material>,
    /// Both keys of a pair are there but one is empty, and no other pair can be served:
    /// a certificate Secret gone wrong, refused with this error rather than ignored.
    pub problem: Option<ExtractError>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    /// Istio's words for the same case.
    #[error("found keys {0:?} and {1:?}, but they were empty")]
    EmptyPair(&'static str, &'static str),
    #[error(transparent)]
    Ambiguous(#[from] secret_keys::Ambiguous),
}

impl ExtractError {
    /// The `reason` label of `certwire_updates_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            ExtractError::EmptyPair(..) => "empty_keys",
            ExtractError::Ambiguous(..) => secret_keys::Ambiguous::REASON,
        }
    }
}

impl Extracted {
    /// Nothing servable and nothing wrong: not a certificate Secret.
    pub fn is_empty(&self) -> bool {
        self.tls.is_none() && self.ca.is_none() && self.problem.is_none()
    }
}

/// The pairs, in the order they are tried.
const PAIRS: [(&str, &str); 2] = [("cert", "key"), ("tls.crt", "tls.key")];
/// The CA keys with their CRL, in the order they are tried.
const CAS: [(&str, &str); 2] = [("cacert", "crl"), ("ca.crt", "ca.crl")];
/// The OCSP response (DER) stapled with the pair, Istio's key for both pairs.
pub const OCSP_STAPLE: &str = "tls.ocsp-staple";

/// Reads a Secret's data (the `type` does not matter: cert-manager writes
/// `kubernetes.io/tls`, other tools Opaque secrets with the generic keys). Secrets with
/// nothing servable give an empty result, so memory grows with served Secrets only; an
/// Opaque Secret with an unrelated `key` entry (a password) is not a TLS secret.
///
/// `generic`: a `secret` key is a generic secret (opt-in: many Opaque Secrets that are
/// not meant for proxies have such a key).
pub fn extract(data: Option<&BTreeMap<String, ByteString>>, generic: bool) -> Extracted {
    let Some(data) = data else { return Extracted { tls: None, ca: None, problem: None } };
    let value = |key: &str| data.get(key).map(|b| b.0.as_slice()).filter(|v| !v.is_empty());
    let pair = PAIRS.iter().find_map(|(cert, key)| {
        let (cert_pem, key_pem) = (value(cert)?, value(key)?);
        let material = Material::Tls {
            cert_chain_pem: cert_pem.to_vec(),
            key_pem: KeyBytes::new(key_pem.to_vec()),
            ocsp_staple: value(OCSP_STAPLE).map(<[u8]>::to_vec),
        };
        Some((*cert, material))
    });
    let pair_key = pair.as_ref().map_or("tls.crt", |(cert, _)| *cert);
    let own = secret_keys::one_of([
        (pair_key, pair.map(|(_, m)| m)),
        (secret_keys::SESSION_TICKET_KEYS, value(secret_keys::SESSION_TICKET_KEYS).map(secret_keys::ticket_keys)),
        (secret_keys::GENERIC_SECRET, value(secret_keys::GENERIC_SECRET).filter(|_| generic).map(secret_keys::generic)),
    ]);
    let (tls, problem) = match own {
        Ok(Some(material)) => (Some(material), None),
        Ok(None) => (
            None,
            PAIRS
                .iter()
                .find(|(cert, key)| data.contains_key(*cert) && data.contains_key(*key))
                .map(|(cert, key)| ExtractError::EmptyPair(cert, key)),
        ),
        Err(ambiguous) => (None, Some(ambiguous.into())),
    };
    let ca = CAS.iter().find_map(|(ca, crl)| {
        Some(Material::Validation { ca_pem: value(ca)?.to_vec(), crl_pem: value(crl).map(<[u8]>::to_vec) })
    });
    Extracted { tls, ca, problem }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extract_tls(data: Option<&BTreeMap<String, ByteString>>) -> Extracted {
        extract(data, false)
    }

    fn data(entries: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
        entries.iter().map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec()))).collect()
    }

    #[test]
    fn names_follow_istio_conventions() {
        assert_eq!(served_names("istio-system", "gw", "default"), ["kubernetes://istio-system/gw"]);
        assert_eq!(served_names("default", "gw", "default"), ["kubernetes://default/gw", "kubernetes://gw", "gw"]);
        assert_eq!(cacert_name("kubernetes://default/gw"), "kubernetes://default/gw-cacert");
    }

    #[test]
    fn tls_secret_with_ca() {
        let d = data(&[("tls.crt", "C"), ("tls.key", "K"), ("ca.crt", "CA"), ("ca.crl", "CRL")]);
        let e = extract_tls(Some(&d));
        let Some(Material::Tls { cert_chain_pem, key_pem, .. }) = e.tls else { panic!("tls") };
        assert_eq!((cert_chain_pem.as_slice(), key_pem.as_slice()), (b"C".as_slice(), b"K".as_slice()));
        let Some(Material::Validation { ca_pem, crl_pem }) = e.ca else { panic!("ca") };
        assert_eq!(ca_pem, b"CA");
        assert_eq!(crl_pem.as_deref(), Some(b"CRL".as_slice()));
    }

    #[test]
    fn generic_keys_win_over_tls_keys() {
        let d = data(&[
            ("tls.crt", "C1"),
            ("tls.key", "K1"),
            ("cert", "C2"),
            ("key", "K2"),
            ("cacert", "CA2"),
            ("ca.crt", "CA1"),
        ]);
        let e = extract_tls(Some(&d));
        let Some(Material::Tls { cert_chain_pem, key_pem, .. }) = e.tls else { panic!("tls") };
        assert_eq!((cert_chain_pem.as_slice(), key_pem.as_slice()), (b"C2".as_slice(), b"K2".as_slice()));
        let Some(Material::Validation { ca_pem, .. }) = e.ca else { panic!("ca") };
        assert_eq!(ca_pem, b"CA2");
    }

    #[test]
    fn pairs_are_never_mixed() {
        // `cert` empty: the whole tls.* pair, not `tls.crt` with `key`.
        let d = data(&[("cert", ""), ("key", "K2"), ("tls.crt", "C1"), ("tls.key", "K1")]);
        let Some(Material::Tls { cert_chain_pem, key_pem, .. }) = extract_tls(Some(&d)).tls else { panic!("tls") };
        assert_eq!((cert_chain_pem.as_slice(), key_pem.as_slice()), (b"C1".as_slice(), b"K1".as_slice()));
        // Half of each pair: nothing to serve, and said so.
        let d = data(&[("cert", "C2"), ("key", ""), ("tls.crt", "C1")]);
        let e = extract_tls(Some(&d));
        assert!(e.tls.is_none());
        assert_eq!(e.problem, Some(ExtractError::EmptyPair("cert", "key")));
        assert_eq!(e.problem.unwrap().to_string(), r#"found keys "cert" and "key", but they were empty"#);
        let e = extract_tls(Some(&data(&[("tls.crt", ""), ("tls.key", ""), ("ca.crt", "CA")])));
        assert_eq!(e.problem, Some(ExtractError::EmptyPair("tls.crt", "tls.key")));
        assert!(e.ca.is_some() && !e.is_empty(), "the CA is still served");
    }

    #[test]
    fn the_crl_comes_with_its_ca_key() {
        let d = data(&[("cacert", "CA2"), ("ca.crl", "CRL1"), ("ca.crt", "CA1")]);
        let Some(Material::Validation { ca_pem, crl_pem }) = extract_tls(Some(&d)).ca else { panic!("ca") };
        assert_eq!((ca_pem.as_slice(), crl_pem), (b"CA2".as_slice(), None));
        let d = data(&[("cacert", ""), ("crl", "CRL2"), ("ca.crt", "CA1"), ("ca.crl", "CRL1")]);
        let Some(Material::Validation { ca_pem, crl_pem }) = extract_tls(Some(&d)).ca else { panic!("ca") };
        assert_eq!((ca_pem.as_slice(), crl_pem.as_deref()), (b"CA1".as_slice(), Some(b"CRL1".as_slice())));
    }

    #[test]
    fn the_ocsp_staple_goes_with_the_chosen_pair() {
        let staple = |d: &BTreeMap<String, ByteString>| match extract_tls(Some(d)).tls {
            Some(Material::Tls { cert_chain_pem, ocsp_staple, .. }) => (cert_chain_pem, ocsp_staple),
            other => panic!("tls: {other:?}"),
        };
        let d = data(&[("tls.crt", "C1"), ("tls.key", "K1"), ("tls.ocsp-staple", "S")]);
        assert_eq!(staple(&d), (b"C1".to_vec(), Some(b"S".to_vec())));
        // Istio reads the same key with the generic pair.
        let d = data(&[("cert", "C2"), ("key", "K2"), ("tls.crt", "C1"), ("tls.key", "K1"), ("tls.ocsp-staple", "S")]);
        assert_eq!(staple(&d), (b"C2".to_vec(), Some(b"S".to_vec())));
        // Absent or empty: no staple.
        assert_eq!(staple(&data(&[("tls.crt", "C1"), ("tls.key", "K1")])), (b"C1".to_vec(), None));
        let d = data(&[("tls.crt", "C1"), ("tls.key", "K1"), ("tls.ocsp-staple", "")]);
        assert_eq!(staple(&d), (b"C1".to_vec(), None));
        // A staple alone is not a TLS secret.
        assert!(extract_tls(Some(&data(&[("tls.ocsp-staple", "S")]))).is_empty());
        // Binary, as it is: DER, not text.
        let mut d = data(&[("tls.crt", "C1"), ("tls.key", "K1")]);
        d.insert("tls.ocsp-staple".into(), ByteString(vec![0x30, 0x82, 0xff, 0x00]));
        assert_eq!(staple(&d).1, Some(vec![0x30, 0x82, 0xff, 0x00]));
    }

    #[test]
    fn ticket_keys_always_and_generic_secrets_only_when_asked() {
        let keys = "k".repeat(160);
        let d = data(&[("tls.session-ticket-keys", &keys), ("ca.crt", "CA")]);
        let e = extract_tls(Some(&d));
        let Some(Material::SessionTicketKeys(k)) = e.tls else { panic!("ticket keys") };
        assert_eq!(k.len(), 2);
        assert!(e.ca.is_some(), "a CA beside ticket keys is still served as NAME-cacert");

        let d = data(&[("secret", "hmac"), ("user", "u")]);
        assert!(extract(Some(&d), false).is_empty(), "an Opaque Secret with `secret` is not served unless asked");
        let Some(Material::Generic(s)) = extract(Some(&d), true).tls else { panic!("generic") };
        assert_eq!(s.as_slice(), b"hmac");
        assert!(extract(Some(&data(&[("secret", "")])), true).is_empty(), "empty is absent");
    }

    #[test]
    fn two_kinds_under_one_name_are_refused_naming_both_keys() {
        let d = data(&[("cert", "C"), ("key", "K"), ("tls.session-ticket-keys", "T")]);
        let e = extract_tls(Some(&d));
        assert!(e.tls.is_none());
        let problem = e.problem.expect("ambiguous");
        assert_eq!(problem.reason(), "ambiguous_keys");
        assert!(problem.to_string().contains(r#""cert" and "tls.session-ticket-keys""#), "{problem}");
        // `secret` beside a pair is only a conflict when generic secrets are on.
        let d = data(&[("tls.crt", "C"), ("tls.key", "K"), ("secret", "S")]);
        assert!(matches!(extract(Some(&d), false).tls, Some(Material::Tls { .. })));
        assert!(extract(Some(&d), true).problem.is_some());
    }

    #[test]
    fn ca_only_and_unrelated_secrets() {
        let e = extract_tls(Some(&data(&[("cacert", "CA")])));
        assert!(e.tls.is_none() && e.ca.is_some());
        // A password secret with a `key` entry is not a TLS secret.
        assert!(extract_tls(Some(&data(&[("key", "hunter2"), ("user", "u")]))).is_empty());
        assert!(extract_tls(Some(&data(&[(".dockerconfigjson", "{}")]))).is_empty());
        assert!(extract_tls(None).is_empty());
    }
}
