//! `certwire::pki::check` on arbitrary material: it must never panic, and what it says
//! when it refuses (or shows of what it accepts) must never carry the private key.
//!
//! Input: byte 0 picks the material and options, byte 1 the clock; then either
//! - raw bytes: the certificate PEM and the key PEM (or CA and CRL), split at the first
//!   `0xff 0x00`, for the PEM and DER parsers at their most general; a canary is spliced
//!   into the secret, which must never be shown; or
//! - a recipe: real certificates (a root, an intermediate, a leaf, an unrelated one; a
//!   CRL) and keys, made once with fixed Ed25519 seeds so that every run makes the same
//!   bytes, picked, ordered and then damaged byte by byte, for the chain rules and
//!   the DER parser behind valid PEM (and, for a TLS recipe with bit 0x80, the OCSP
//!   decoder, given the damage bytes as the staple).

#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use certwire::pki::{CheckOptions, KeyBytes, Material, check};
use libfuzzer_sys::fuzz_target;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa, Issuer, KeyIdMethod, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use time::OffsetDateTime;

/// DER of the fixed material: certificates, then the CRL, then keys.
struct Fixed {
    /// leaf, intermediate, root, unrelated
    certs: [Vec<u8>; 4],
    crl: Vec<u8>,
    /// PKCS#8 of the leaf's, intermediate's, root's and unrelated certificate's keys.
    keys: [Vec<u8>; 4],
}

/// Ed25519 PKCS#8 v1, as OpenSSL writes it, from a seed.
fn pkcs8(seed: u8) -> Vec<u8> {
    const V1: [u8; 16] =
        [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
    [&V1[..], &[seed; 32]].concat()
}

fn at(unix: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(unix).unwrap()
}

/// 2024-01-01 to 2034-01-01.
const NOT_BEFORE: i64 = 1_704_067_200;
const NOT_AFTER: i64 = 2_019_686_400;

fn params(cn: &str, ca: bool, serial: u8) -> CertificateParams {
    let mut p = CertificateParams::new(if ca { vec![] } else { vec![cn.to_string(), "10.0.0.1".into()] }).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    }
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(SerialNumber::from(vec![serial]));
    (p.not_before, p.not_after) = (at(NOT_BEFORE), at(NOT_AFTER));
    p
}

fn fixed() -> &'static Fixed {
    static FIXED: OnceLock<Fixed> = OnceLock::new();
    FIXED.get_or_init(|| {
        let key = |seed| KeyPair::try_from(pkcs8(seed).as_slice()).expect("an Ed25519 key");
        let root_params = params("Fuzz Root", true, 1);
        let root_cert = root_params.self_signed(&key(1)).unwrap();
        let root = Issuer::new(root_params, key(1));
        let inter_params = params("Fuzz Intermediate", true, 2);
        let inter_cert = inter_params.signed_by(&key(2), &root).unwrap();
        let inter = Issuer::new(inter_params, key(2));
        let leaf = params("leaf.example.com", false, 3).signed_by(&key(3), &inter).unwrap();
        let other = params("other.example.com", false, 4).self_signed(&key(4)).unwrap();
        let crl = CertificateRevocationListParams {
            this_update: at(NOT_BEFORE),
            next_update: at(NOT_AFTER),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: vec![],
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&root)
        .unwrap();
        Fixed {
            certs: [leaf, inter_cert, root_cert, other].map(|c| c.der().to_vec()),
            crl: crl.der().to_vec(),
            keys: [3, 2, 1, 4].map(pkcs8),
        }
    })
}

fn pem(label: &str, der: &[u8]) -> Vec<u8> {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = format!("-----BEGIN {label}-----\n").into_bytes();
    for (i, chunk) in der.chunks(3).enumerate() {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for j in 0..4 {
            out.push(if j <= chunk.len() { B64[((n >> (18 - 6 * j)) & 63) as usize] } else { b'=' });
        }
        if i % 16 == 15 {
            out.push(b'\n');
        }
    }
    if !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    out.extend_from_slice(format!("-----END {label}-----\n").as_bytes());
    out
}

/// What to check, and the key bytes it must never show: the key's PEM and, for a
/// recipe, its DER (as hex, the way a careless error would print it).
struct Case {
    material: Material,
    secrets: Vec<Vec<u8>>,
    public: Vec<u8>,
}

/// Spliced into every secret in raw mode: text found in no certificate and in nothing
/// certwire writes, so that showing it can only come from the secret. (Checking for
/// the raw secret bytes instead lets libFuzzer, which watches comparisons, copy
/// certwire's own messages into the key and "find" them.)
const CANARY: &[u8] = b"Q2VydHdpcmVGdXp6Q2FuYXJ5S2V5Qnl0ZXM";

/// `secret` with the canary at a place its first byte picks.
fn with_canary(secret: &[u8]) -> Vec<u8> {
    let at = secret.first().map_or(0, |&b| b as usize % (secret.len() + 1));
    [&secret[..at], CANARY, &secret[at..]].concat()
}

fn raw(kind: u8, data: &[u8]) -> Case {
    let (a, b) = match data.windows(2).position(|w| w == [0xff, 0x00]) {
        Some(i) => (&data[..i], Some(&data[i + 2..])),
        None => (data, None),
    };
    match kind {
        0 => Case {
            material: Material::Tls {
                cert_chain_pem: a.to_vec(),
                key_pem: KeyBytes::new(with_canary(b.unwrap_or(&[]))),
                ocsp_staple: None,
            },
            secrets: vec![CANARY.to_vec()],
            public: a.to_vec(),
        },
        1 => Case {
            material: Material::Validation { ca_pem: a.to_vec(), crl_pem: b.map(<[u8]>::to_vec) },
            secrets: vec![],
            public: data.to_vec(),
        },
        2 => Case {
            material: Material::SessionTicketKeys(
                data.split(|&c| c == 0xff).map(|k| KeyBytes::new(with_canary(k))).collect(),
            ),
            secrets: vec![CANARY.to_vec()],
            public: vec![],
        },
        _ => Case {
            material: Material::Generic(KeyBytes::new(with_canary(data))),
            secrets: vec![CANARY.to_vec()],
            public: vec![],
        },
    }
}

fn recipe(kind: u8, data: &[u8]) -> Case {
    let f = fixed();
    let (&pick, rest) = data.split_first().unwrap_or((&0b0111, &[]));
    let (&key_pick, edits) = rest.split_first().unwrap_or((&0, &[]));
    // Blobs: 0-3 certificates, 4 the CRL, 5 the key.
    let mut blobs: Vec<Vec<u8>> = f.certs.iter().cloned().chain([f.crl.clone()]).collect();
    blobs.push(f.keys[(key_pick & 3) as usize].clone());
    // Damage: (blob, offset, xor) triples; xor 0 cuts the blob there.
    for edit in edits.chunks_exact(4) {
        let blob = &mut blobs[edit[0] as usize % 6];
        if blob.is_empty() {
            continue;
        }
        let offset = u16::from_le_bytes([edit[1], edit[2]]) as usize % blob.len();
        match edit[3] {
            0 => blob.truncate(offset),
            x => blob[offset] ^= x,
        }
    }
    let mut order: Vec<usize> = (0..4).filter(|i| pick & (1 << i) != 0).collect();
    if pick & 0x10 != 0 {
        order.reverse();
    }
    if pick & 0x20 != 0
        && let Some(&first) = order.first()
    {
        order.push(first);
    }
    let mut chain: Vec<u8> = order.iter().flat_map(|&i| pem("CERTIFICATE", &blobs[i])).collect();
    let label = match key_pick >> 2 & 3 {
        0 => "PRIVATE KEY",
        1 => "EC PRIVATE KEY",
        2 => "RSA PRIVATE KEY",
        _ => "ENCRYPTED PRIVATE KEY",
    };
    let key = pem(label, &blobs[5]);
    if pick & 0x40 != 0 {
        // A key pasted into the chain file.
        chain.extend_from_slice(&key);
    }
    let hex: String = blobs[5].iter().map(|b| format!("{b:02x}")).collect();
    let material = match kind {
        // With 0x80, the damage bytes double as an OCSP staple: a chain that passes puts
        // them before the OCSP decoder.
        0 | 2 | 3 => Material::Tls {
            cert_chain_pem: chain.clone(),
            key_pem: KeyBytes::new(key.clone()),
            ocsp_staple: (pick & 0x80 != 0).then(|| edits.to_vec()),
        },
        _ => Material::Validation {
            ca_pem: chain.clone(),
            crl_pem: (pick & 0x80 != 0).then(|| pem("X509 CRL", &blobs[4])),
        },
    };
    // The chain may hold the key on purpose (pick & 0x40): nothing to tell apart then.
    let secrets = if pick & 0x40 != 0 { vec![] } else { vec![key, blobs[5].clone(), hex.into_bytes()] };
    // What errors may quote: the certificates as given, in PEM and in DER.
    let public = [chain, blobs[..5].concat()].concat();
    Case { material, secrets, public }
}

/// Whether `shown` carries 24 bytes or more in a row of `secret` that `public` (what
/// the certificate input holds, which errors may quote) does not.
fn leaks(shown: &str, secret: &[u8], public: &[u8]) -> Option<String> {
    const W: usize = 16;
    let shown = shown.as_bytes();
    (0..secret.len().saturating_sub(W - 1)).step_by(8).map(|i| &secret[i..i + W]).find_map(|w| {
        let found = shown.windows(W).any(|s| s == w) && !public.windows(W).any(|s| s == w);
        found.then(|| String::from_utf8_lossy(w).into_owned())
    })
}

fuzz_target!(|data: &[u8]| {
    let [flags, clock, rest @ ..] = data else { return };
    let kind = flags & 3;
    let case = if flags & 4 != 0 { recipe(kind, rest) } else { raw(kind, rest) };
    // Monthly from 2020-01-01 to 2041.
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_577_836_800 + u64::from(*clock) * 30 * 86_400);
    let opts = CheckOptions { allow_expired: flags & 8 != 0, now };
    let shown = match check("fuzz", &case.material, &opts) {
        Ok(checked) => format!("{checked:?}"),
        Err(e) => {
            let _ = e.reason();
            format!("{e} {e:?}")
        }
    };
    // CERTWIRE_FUZZ_DEBUG=1: what each input came to (to check that recipes pass).
    static DEBUG: OnceLock<bool> = OnceLock::new();
    if *DEBUG.get_or_init(|| std::env::var_os("CERTWIRE_FUZZ_DEBUG").is_some()) {
        eprintln!("{shown}");
    }
    let shown = format!("{shown} {:?}", case.material);
    for secret in &case.secrets {
        if let Some(w) = leaks(&shown, secret, &case.public) {
            panic!("key bytes {w:?} shown: {shown}");
        }
    }
});
