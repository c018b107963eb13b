//! Kubernetes Secret -> material: `extract` on any Secret data, and `served_names` on
//! any names. Neither may panic; what `extract` gives follows its documented rules.

#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use certwire::pki::Material;
use certwire::sources::kubernetes::names::{cacert_name, extract, served_names};
use k8s_openapi::ByteString;
use libfuzzer_sys::fuzz_target;

/// Keys mostly from those `extract` reads, so that the fuzzer meets them often.
#[derive(Arbitrary, Debug)]
enum Key {
    Known(u8),
    Other(String),
}

const KNOWN: [&str; 9] = ["cert", "key", "cacert", "crl", "tls.crt", "tls.key", "ca.crt", "ca.crl", "Cert"];

#[derive(Arbitrary, Debug)]
struct Input {
    data: Option<Vec<(Key, Vec<u8>)>>,
    ns: String,
    name: String,
    default_ns: String,
}

fuzz_target!(|input: Input| {
    let data: Option<BTreeMap<String, ByteString>> = input.data.map(|entries| {
        entries
            .into_iter()
            .map(|(k, v)| {
                let k = match k {
                    Key::Known(i) => KNOWN[i as usize % KNOWN.len()].to_string(),
                    Key::Other(s) => s,
                };
                (k, ByteString(v))
            })
            .collect()
    });
    let extracted = extract(data.as_ref());
    let get = |generic: &str, tls: &str| {
        data.as_ref().and_then(|d| d.get(generic).or_else(|| d.get(tls))).map(|b| b.0.clone())
    };
    match &extracted.tls {
        Some(Material::Tls { cert_chain_pem, key_pem }) => {
            assert_eq!(Some(cert_chain_pem), get("cert", "tls.crt").as_ref());
            assert!(!cert_chain_pem.is_empty());
            assert_eq!(Some(key_pem.as_slice()), get("key", "tls.key").as_deref());
        }
        Some(_) => panic!("tls is not a pair"),
        None => assert!(get("cert", "tls.crt").is_none_or(|c| c.is_empty()) || get("key", "tls.key").is_none()),
    }
    match &extracted.ca {
        Some(Material::Validation { ca_pem, crl_pem }) => {
            assert_eq!(Some(ca_pem), get("cacert", "ca.crt").as_ref());
            assert_eq!(crl_pem.as_ref(), get("crl", "ca.crl").filter(|c| !c.is_empty()).as_ref());
        }
        Some(_) => panic!("ca is not a validation context"),
        None => assert!(get("cacert", "ca.crt").is_none_or(|c| c.is_empty())),
    }
    let _ = extracted.is_empty();

    let names = served_names(&input.ns, &input.name, &input.default_ns);
    assert_eq!(names[0], format!("kubernetes://{}/{}", input.ns, input.name));
    assert_eq!(names.len(), if input.ns == input.default_ns { 3 } else { 1 });
    for name in &names {
        assert!(cacert_name(name).ends_with("-cacert"));
    }
});
