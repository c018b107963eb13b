//! Pure rules of the Kubernetes source: which secret names a Secret serves, and what
//! material its data holds. Istio credentialName conventions, so existing gateway
//! configs keep working.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;

use crate::pki::{KeyBytes, Material};

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

/// The pair and the CA bundle a Secret holds, if any. Generic keys (`cert`, `key`,
/// `cacert`, `crl`) win over `tls.crt`, `tls.key`, `ca.crt`, `ca.crl`.
pub struct Extracted {
    pub tls: Option<Material>,
    pub ca: Option<Material>,
}

impl Extracted {
    pub fn is_empty(&self) -> bool {
        self.tls.is_none() && self.ca.is_none()
    }
}

/// Reads a Secret's data (the `type` does not matter: cert-manager writes
/// `kubernetes.io/tls`, other tools Opaque secrets with the generic keys). Secrets with nothing servable give an empty result,
/// so memory grows with served Secrets only.
pub fn extract(data: Option<&BTreeMap<String, ByteString>>) -> Extracted {
    let Some(data) = data else { return Extracted { tls: None, ca: None } };
    let get = |generic: &str, tls: &str| data.get(generic).or_else(|| data.get(tls)).map(|b| b.0.as_slice());
    // Only a certificate makes a TLS secret: an Opaque secret with an unrelated `key`
    // entry (a password) is not served.
    let tls = match (get("cert", "tls.crt"), get("key", "tls.key")) {
        (Some(c), Some(k)) if !c.is_empty() => {
            Some(Material::Tls { cert_chain_pem: c.to_vec(), key_pem: KeyBytes::new(k.to_vec()) })
        }
        _ => None,
    };
    let ca = get("cacert", "ca.crt").filter(|c| !c.is_empty()).map(|ca| Material::Validation {
        ca_pem: ca.to_vec(),
        crl_pem: get("crl", "ca.crl").filter(|c| !c.is_empty()).map(<[u8]>::to_vec),
    });
    Extracted { tls, ca }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let e = extract(Some(&d));
        let Some(Material::Tls { cert_chain_pem, key_pem }) = e.tls else { panic!("tls") };
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
        let e = extract(Some(&d));
        let Some(Material::Tls { cert_chain_pem, key_pem }) = e.tls else { panic!("tls") };
        assert_eq!((cert_chain_pem.as_slice(), key_pem.as_slice()), (b"C2".as_slice(), b"K2".as_slice()));
        let Some(Material::Validation { ca_pem, .. }) = e.ca else { panic!("ca") };
        assert_eq!(ca_pem, b"CA2");
    }

    #[test]
    fn ca_only_and_unrelated_secrets() {
        let e = extract(Some(&data(&[("cacert", "CA")])));
        assert!(e.tls.is_none() && e.ca.is_some());
        // A password secret with a `key` entry is not a TLS secret.
        assert!(extract(Some(&data(&[("key", "hunter2"), ("user", "u")]))).is_empty());
        assert!(extract(Some(&data(&[(".dockerconfigjson", "{}")]))).is_empty());
        assert!(extract(None).is_empty());
    }
}
