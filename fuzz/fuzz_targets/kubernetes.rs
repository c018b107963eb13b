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

const KNOWN: [&str; 10] =
    ["cert", "key", "cacert", "crl", "tls.crt", "tls.key", "ca.crt", "ca.crl", "Cert", "tls.ocsp-staple"];

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
    let has = |key: &str| data.as_ref().is_some_and(|d| d.contains_key(key));
    let value = |key: &str| data.as_ref().and_then(|d| d.get(key)).map(|b| b.0.clone()).filter(|v| !v.is_empty());
    let pairs = [("cert", "key"), ("tls.crt", "tls.key")];
    let pair = pairs.iter().find_map(|(c, k)| Some((value(c)?, value(k)?)));
    match (&extracted.tls, &pair) {
        (Some(Material::Tls { cert_chain_pem, key_pem, ocsp_staple }), Some((cert, key))) => {
            assert_eq!(cert_chain_pem, cert);
            assert_eq!(key_pem.as_slice(), key.as_slice());
            // The staple goes with whichever pair is chosen.
            assert_eq!(ocsp_staple, &value("tls.ocsp-staple"));
        }
        (None, None) => {}
        (tls, _) => panic!("tls {} while a whole pair is {}", tls.is_some(), pair.is_some()),
    }
    assert_eq!(extracted.problem.is_some(), pair.is_none() && pairs.iter().any(|(c, k)| has(c) && has(k)));
    let cas = [("cacert", "crl"), ("ca.crt", "ca.crl")];
    let ca = cas.iter().find_map(|(ca, crl)| Some((value(ca)?, value(crl))));
    match (&extracted.ca, &ca) {
        (Some(Material::Validation { ca_pem, crl_pem }), Some((want_ca, want_crl))) => {
            assert_eq!(ca_pem, want_ca);
            assert_eq!(crl_pem, want_crl);
        }
        (None, None) => {}
        (got, _) => panic!("ca {} while a CA key is {}", got.is_some(), ca.is_some()),
    }
    let _ = extracted.is_empty();

    let names = served_names(&input.ns, &input.name, &input.default_ns);
    assert_eq!(names[0], format!("kubernetes://{}/{}", input.ns, input.name));
    assert_eq!(names.len(), if input.ns == input.default_ns { 3 } else { 1 });
    for name in &names {
        assert!(cacert_name(name).ends_with("-cacert"));
    }
});
