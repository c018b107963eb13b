//! Properties of the parsers that take outside input, kept fast for the normal suite:
//! the invariants the fuzz targets in fuzz/ check (see README "Fuzzing"), on generated
//! input. Request reassembly has its own, next to the code
//! (src/xds/transport/inbound.rs).
//!
//! - `pki::check` never panics, and never shows private key bytes (in its error, or in
//!   what it shows of a secret it accepts);
//! - `extract` (Kubernetes Secret -> material) never panics and follows its key rules;
//! - the config file: parsing any text, and resolving any file that parses, never panic.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use certwire::config::{FileConfig, ServeFlags, Settings};
use certwire::pki::{CheckOptions, KeyBytes, Material, check};
use certwire::sources::kubernetes::names::{extract, served_names};
use k8s_openapi::ByteString;
use proptest::prelude::*;

const CASES: u32 = 256;

/// Whether `shown` holds 24 bytes or more in a row of `secret` that `public` (what the
/// certificate input holds, which errors may quote) does not: windows of 16 bytes,
/// every 8.
fn leaked(shown: &str, secret: &[u8], public: &[u8]) -> bool {
    const W: usize = 16;
    let shown = shown.as_bytes();
    (0..secret.len().saturating_sub(W - 1))
        .step_by(8)
        .map(|i| &secret[i..i + W])
        .any(|w| shown.windows(W).any(|s| s == w) && !public.windows(W).any(|s| s == w))
}

/// A fixed Ed25519 key (PKCS#8 v1, as OpenSSL writes it), as DER.
fn fixed_key_der() -> Vec<u8> {
    [&[0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20][..], &[0x5a; 32]]
        .concat()
}

fn to_pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN {label}-----\n{b64}\n-----END {label}-----\n")
}

fn fixed_key_pem() -> String {
    to_pem("PRIVATE KEY", &fixed_key_der())
}

/// A self-signed certificate for the fixed key, valid 2024-2034 (Ed25519 signatures
/// are deterministic: the same bytes every run).
fn fixed_cert_der() -> &'static [u8] {
    static DER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    DER.get_or_init(|| {
        let key = rcgen::KeyPair::try_from(fixed_key_der().as_slice()).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["leaf.example.com".into()]).unwrap();
        params.not_before = time::OffsetDateTime::from_unix_timestamp(1_704_067_200).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(2_019_686_400).unwrap();
        params.serial_number = Some(rcgen::SerialNumber::from(vec![7]));
        params.self_signed(&key).unwrap().der().to_vec()
    })
}

/// The fixed certificate, with a byte changed or cut short, as PEM.
fn damaged_cert() -> impl Strategy<Value = Vec<u8>> {
    (any::<usize>(), any::<u8>(), any::<bool>()).prop_map(|(at, x, cut)| {
        let mut der = fixed_cert_der().to_vec();
        let at = at % der.len();
        if cut {
            der.truncate(at)
        } else {
            der[at] ^= x
        }
        to_pem("CERTIFICATE", &der).into_bytes()
    })
}

/// PEM-looking text: armour with any label and a body of base64 characters (and a few
/// others), or nothing like PEM at all.
fn pemish(labels: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    let armoured = (proptest::sample::select(labels), "[A-Za-z0-9+/=\n -]{0,200}")
        .prop_map(|(label, body)| format!("-----BEGIN {label}-----\n{body}\n-----END {label}-----\n").into_bytes());
    prop_oneof![armoured, proptest::collection::vec(any::<u8>(), 0..300)]
}

const CERT_LABELS: &[&str] = &["CERTIFICATE", "X509 CRL", "TRUSTED CERTIFICATE", "PRIVATE KEY"];
const KEY_LABELS: &[&str] = &[
    "PRIVATE KEY",
    "EC PRIVATE KEY",
    "RSA PRIVATE KEY",
    "ENCRYPTED PRIVATE KEY",
    "CERTIFICATE",
    "OPENSSH PRIVATE KEY",
];

/// Key input: generated, or the fixed real key, whole or cut short or with a byte
/// changed.
fn key_bytes() -> impl Strategy<Value = Vec<u8>> {
    let real = (any::<usize>(), any::<u8>(), any::<bool>()).prop_map(|(at, x, cut)| {
        let mut key = fixed_key_pem().into_bytes();
        let at = at % key.len();
        if cut {
            key.truncate(at)
        } else {
            key[at] ^= x
        }
        key
    });
    prop_oneof![pemish(KEY_LABELS), real, Just(fixed_key_pem().into_bytes())]
}

fn options() -> impl Strategy<Value = CheckOptions> {
    (any::<bool>(), 0..2_000_000_000u64).prop_map(|(allow_expired, secs)| CheckOptions {
        allow_expired,
        now: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
    })
}

/// Keys the Secret rules read, and others.
fn secret_key() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(vec![
            "cert",
            "key",
            "cacert",
            "crl",
            "tls.crt",
            "tls.key",
            "tls.session-ticket-keys",
            "secret",
            "tls.ocsp-staple",
            "ca.crt",
            "ca.crl",
        ])
        .prop_map(String::from),
        ".{0,12}",
    ]
}

/// What a config value is, to generate mostly the right type (and sometimes not).
#[derive(Clone, Copy, Debug)]
enum Kind {
    Bool,
    Int,
    Duration,
    Addr,
    Addrs,
    Text,
    Texts,
}

/// The tables of the config file and their keys.
const TABLES: &[(&str, &[(&str, Kind)])] = {
    use Kind::*;
    &[
        (
            "",
            &[
                ("listen", Addrs),
                ("admin", Addr),
                ("files", Texts),
                ("dev", Bool),
                ("dev_rotate_every", Duration),
                ("allow_expired", Bool),
                ("log_format", Text),
                ("drain_timeout", Duration),
                ("files_rescan_every", Duration),
                ("files_max_file_bytes", Int),
                ("workers", Int),
                ("insecure_open_sds", Bool),
                ("status_addr", Addr),
                ("status_max_watchers", Int),
                ("dev_forget_after", Duration),
                ("dev_max_names", Int),
            ],
        ),
        (
            "[kubernetes]",
            &[
                ("enabled", Bool),
                ("namespaces", Texts),
                ("all_namespaces", Bool),
                ("label_selector", Text),
                ("default_namespace", Text),
                ("kubeconfig", Text),
            ],
        ),
        (
            "[sds.tls]",
            &[
                ("cert", Text),
                ("key", Text),
                ("cert_secret", Text),
                ("client_ca", Text),
                ("client_crl", Text),
                ("client_ca_secret", Text),
                ("reload_every", Duration),
            ],
        ),
        ("[authz]", &[("mode", Text), ("verb", Text), ("allow_ttl", Duration), ("deny_ttl", Duration)]),
        ("[[authz.rules]]", &[("identities", Texts), ("secrets", Texts), ("action", Text)]),
        (
            "[limits]",
            &[
                ("max_connections", Int),
                ("max_connections_per_ip", Int),
                ("max_streams_per_connection", Int),
                ("max_request_bytes", Int),
                ("connection_window_bytes", Int),
                ("max_buffered_request_bytes", Int),
                ("max_names_per_request", Int),
                ("max_names_per_stream", Int),
                ("max_fetch_response_bytes", Int),
                ("idle_timeout", Duration),
                ("handshake_timeout", Duration),
            ],
        ),
        (
            "[acme]",
            &[
                ("directory", Text),
                ("contact", Texts),
                ("state_dir", Text),
                ("ca_file", Text),
                ("insecure_http_directory", Bool),
                ("retry_base", Duration),
                ("retry_max", Duration),
                ("http01_listen", Addr),
                ("tls_alpn01_listen", Addr),
                ("dns_propagation_timeout", Duration),
                ("kubernetes_secret_namespace", Text),
                ("kubernetes_account_secret", Text),
                ("kubeconfig", Text),
            ],
        ),
        (
            "[[acme.certificates]]",
            &[("name", Text), ("domains", Texts), ("challenge", Text), ("key_type", Text), ("renew_before", Duration)],
        ),
        ("[acme.eab]", &[("kid", Text), ("hmac_key", Text), ("hmac_key_file", Text)]),
        (
            "[[acme.rfc2136]]",
            &[
                ("server", Addr),
                ("zone", Text),
                ("tsig_key_name", Text),
                ("tsig_algorithm", Text),
                ("tsig_secret", Text),
                ("tsig_secret_file", Text),
            ],
        ),
        ("[acme.lease]", &[("name", Text), ("namespace", Text), ("duration", Duration)]),
    ]
};

/// The keys a table must have, with a value for them.
const REQUIRED: &[(&str, &[(&str, &str)])] = &[
    ("[acme]", &[("directory", "\"https://acme.example/dir\""), ("state_dir", "\"/tmp/acme\"")]),
    ("[[acme.certificates]]", &[("name", "\"web\""), ("domains", "[\"example.com\"]")]),
    ("[acme.eab]", &[("kid", "\"k\"")]),
    ("[[acme.rfc2136]]", &[("server", "\"127.0.0.1:53\""), ("zone", "\"example.com\""), ("tsig_key_name", "\"k\"")]),
    ("[[authz.rules]]", &[("identities", "[\"*\"]"), ("secrets", "[\"*\"]")]),
    ("[acme.lease]", &[("name", "\"l\"")]),
];

const DURATIONS: &[&str] =
    &["0s", "1ns", "5s", "1m", "10m", "100y", "99999999999999999999h", "18446744073709551615s", "x"];
const ADDRS: &[&str] =
    &["127.0.0.1:0", "127.0.0.1:18000", "0.0.0.0:1", "[::]:18000", "[::1]:1", "unix:/tmp/x.sock", "unix:", "x"];
const TEXTS: &[&str] = &[
    "",
    "list",
    "get",
    "open",
    "policy",
    "kubernetes",
    "json",
    "text",
    "allow",
    "deny",
    "http-01",
    "dns-01",
    "tls-alpn-01",
    "ecdsa-p256",
    "rsa-2048",
    "https://acme.example/dir",
    "http://127.0.0.1/dir",
    "/tmp/x",
    "web",
    "web-cacert",
    "a/b",
    ".x",
    "*",
    "spiffe://td/ns/*/sa/*",
    "kubernetes://{namespace}/*",
    "dns:x",
    "hmac-sha256",
    "example.com",
    "*.example.com",
    "aGVsbG8=",
];

fn value(kind: Kind) -> BoxedStrategy<String> {
    let quoted = |v: &'static [&'static str]| proptest::sample::select(v).prop_map(|s| format!("{s:?}"));
    let list = |v: &'static [&'static str]| {
        proptest::collection::vec(proptest::sample::select(v), 0..3).prop_map(|v| format!("{v:?}"))
    };
    let int = prop_oneof![Just(0i64), Just(1), Just(-1), Just(1 << 20), Just(1 << 31), Just(i64::MAX), any::<i64>()];
    let right = match kind {
        Kind::Bool => any::<bool>().prop_map(|b| b.to_string()).boxed(),
        Kind::Int => int.prop_map(|n| n.to_string()).boxed(),
        Kind::Duration => quoted(DURATIONS).boxed(),
        Kind::Addr => quoted(ADDRS).boxed(),
        Kind::Addrs => list(ADDRS).boxed(),
        Kind::Text => prop_oneof![quoted(TEXTS), "[a-z/:.*-]{0,12}".prop_map(|s| format!("{s:?}"))].boxed(),
        Kind::Texts => list(TEXTS).boxed(),
    };
    // Now and then a value of another type.
    let wrong = prop_oneof![quoted(TEXTS), Just("1".to_string()), Just("true".to_string()), list(ADDRS)];
    prop_oneof![6 => right, 1 => wrong].boxed()
}

/// Config text: tables certwire reads, each once and the top level first, with their
/// keys, each once, mostly with values of the right type; or any text.
fn config_text() -> impl Strategy<Value = String> {
    let table = (0..TABLES.len()).prop_flat_map(|t| {
        let (name, keys) = TABLES[t];
        let line = (0..keys.len()).prop_flat_map(move |k| value(keys[k].1).prop_map(move |v| (k, v)));
        proptest::collection::vec(line, 0..6).prop_map(move |lines| {
            let lines: BTreeMap<usize, String> = lines.into_iter().collect();
            let mut body: String = lines.iter().map(|(k, v)| format!("{} = {v}\n", keys[*k].0)).collect();
            // Keys the table cannot go without, when not generated.
            for (key, default) in REQUIRED.iter().filter(|(table, ..)| *table == name).flat_map(|(_, keys)| *keys) {
                if !lines.keys().any(|k| keys[*k].0 == *key) {
                    body.push_str(&format!("{key} = {default}\n"));
                }
            }
            (t, format!("{name}\n{body}"))
        })
    });
    let document = proptest::collection::vec(table, 0..5).prop_map(|tables| {
        let mut tables: BTreeMap<usize, String> = tables.into_iter().collect();
        // `[acme.*]` tables need `[acme]`'s own required keys.
        let acme = TABLES.iter().position(|(name, _)| *name == "[acme]").unwrap();
        if tables.keys().any(|t| TABLES[*t].0.contains("acme.")) && !tables.contains_key(&acme) {
            let required = REQUIRED.iter().find(|(table, _)| *table == "[acme]").unwrap().1;
            let body: String = required.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
            tables.insert(acme, format!("[acme]\n{body}"));
        }
        tables.into_values().collect::<String>()
    });
    prop_oneof![8 => document, 1 => ".{0,80}"]
}

proptest! {
    // Failures are kept as unit tests here, not in proptest-regressions/.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(CASES) })]

    /// A certificate and key pair of any bytes: checked or refused, never a panic, and
    /// the key never shown.
    #[test]
    fn pki_check_never_panics_nor_shows_the_key(
        cert in prop_oneof![pemish(CERT_LABELS), damaged_cert()],
        key in key_bytes(),
        opts in options(),
    ) {
        let material =
            Material::Tls { cert_chain_pem: cert.clone(), key_pem: KeyBytes::new(key.clone()), ocsp_staple: None };
        let shown = match check("p", &material, &opts) {
            Ok(checked) => format!("{checked:?}"),
            Err(e) => format!("{e} {e:?} {}", e.reason()),
        };
        let shown = format!("{shown} {material:?}");
        prop_assert!(!leaked(&shown, &key, &cert), "key bytes shown: {shown}");
    }

    /// CA bundles, CRLs, ticket keys and generic secrets of any bytes.
    #[test]
    fn pki_check_of_other_kinds_never_panics(a in pemish(CERT_LABELS), b in proptest::option::of(pemish(CERT_LABELS)), opts in options(), kind in 0..3u8) {
        let material = match kind {
            0 => Material::Validation { ca_pem: a.clone(), crl_pem: b },
            1 => Material::SessionTicketKeys(a.chunks(80).map(|k| KeyBytes::new(k.to_vec())).collect()),
            _ => Material::Generic(KeyBytes::new(a.clone())),
        };
        let shown = match check("p", &material, &opts) {
            Ok(checked) => format!("{checked:?}"),
            Err(e) => format!("{e} {e:?}"),
        };
        if kind != 0 {
            prop_assert!(!leaked(&format!("{shown} {material:?}"), &a, &[]), "secret bytes shown: {shown}");
        }
    }

    /// Secret data of any keys and values: a pair is both keys of one family non-empty
    /// (`cert`+`key` first), never one key of each; both keys there but one empty, with
    /// no pair to serve, is a problem said; the CA likewise; nothing panics.
    #[test]
    fn extract_never_panics(
        data in proptest::option::of(proptest::collection::btree_map(secret_key(), proptest::collection::vec(any::<u8>(), 0..8), 0..10)),
        ns in ".{0,8}", name in ".{0,8}", default_ns in ".{0,8}", generic in any::<bool>(),
    ) {
        let data: Option<BTreeMap<String, ByteString>> =
            data.map(|d| d.into_iter().map(|(k, v)| (k, ByteString(v))).collect());
        let has = |key: &str| data.as_ref().is_some_and(|d| d.contains_key(key));
        let value = |key: &str| data.as_ref().and_then(|d| d.get(key)).map(|b| b.0.clone()).filter(|v| !v.is_empty());
        let pairs = [("cert", "key"), ("tls.crt", "tls.key")];
        let pair = pairs.iter().find_map(|(c, k)| Some((value(c)?, value(k)?)));
        // Under its own name a Secret serves one of a pair, ticket keys, a generic secret.
        let tickets = value("tls.session-ticket-keys");
        let secret = value("secret").filter(|_| generic);
        let kinds = usize::from(pair.is_some()) + usize::from(tickets.is_some()) + usize::from(secret.is_some());
        let e = extract(data.as_ref(), generic);
        prop_assert_eq!(e.tls.is_some(), kinds == 1);
        match (&e.tls, &pair) {
            (Some(Material::Tls { cert_chain_pem, key_pem, ocsp_staple }), Some((cert, key))) => {
                prop_assert_eq!(cert_chain_pem, cert);
                prop_assert_eq!(key_pem.as_slice(), key.as_slice());
                // The staple goes with whichever pair is chosen.
                prop_assert_eq!(ocsp_staple, &value("tls.ocsp-staple"));
            }
            (Some(Material::SessionTicketKeys(keys)), None) => {
                let joined: Vec<u8> = keys.iter().flat_map(|k| k.as_slice().to_vec()).collect();
                prop_assert_eq!(Some(joined), tickets);
            }
            (Some(Material::Generic(s)), None) => prop_assert_eq!(Some(s.as_slice().to_vec()), secret),
            (None, _) => {}
            (Some(other), _) => prop_assert!(false, "unexpected {other:?} for {data:?}"),
        }
        let empty_pair = kinds == 0 && pairs.iter().any(|(c, k)| has(c) && has(k));
        prop_assert_eq!(e.problem.is_some(), kinds > 1 || empty_pair);
        prop_assert_eq!(e.ca.is_some(), value("cacert").or_else(|| value("ca.crt")).is_some());
        let names = served_names(&ns, &name, &default_ns);
        prop_assert_eq!(names.len(), if ns == default_ns { 3 } else { 1 });
    }

    /// Any config text parses or is refused, and any file that parses resolves or is
    /// refused, with any of the boolean flags on top.
    #[test]
    fn config_parse_and_resolve_never_panic(text in config_text(), flags in any::<u8>()) {
        let Ok(parsed) = toml::from_str::<FileConfig>(&text) else { return Ok(()) };
        let _ = format!("{parsed:?}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("certwire.toml");
        std::fs::write(&path, &text).unwrap();
        let flags = ServeFlags {
            config: Some(path),
            kubernetes: flags & 1 != 0,
            dev: flags & 2 != 0,
            insecure_open_sds: flags & 4 != 0,
            all_namespaces: flags & 8 != 0,
            ..Default::default()
        };
        let _ = Settings::resolve(&flags, None).map(|s| format!("{s:?}"));
    }
}

/// The fixed key and certificate are a pair `check` accepts: the property above reaches
/// past the PEM layer, to the key match, the chain and validity.
#[test]
fn the_fixed_pair_passes() {
    let material = Material::Tls {
        cert_chain_pem: to_pem("CERTIFICATE", fixed_cert_der()).into_bytes(),
        key_pem: KeyBytes::new(fixed_key_pem().into_bytes()),
        ocsp_staple: None,
    };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let checked = check("p", &material, &CheckOptions { allow_expired: false, now }).unwrap();
    assert_eq!(checked.meta.certificates, 1);
}
