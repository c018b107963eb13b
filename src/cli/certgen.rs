//! `certwire certgen`: a CA, certwire's server certificate and client certificates for
//! the proxies that connect to certwire over mutual TLS, written as kubelet-style
//! secret directories (`--out`) and/or Kubernetes Secrets (`--kubernetes-namespace`).
//!
//! The CA is kept across runs; every run issues new leaves (new keys). `--rotate-ca`
//! replaces the CA and keeps the previous ones in the `ca.crt` bundles, after the new
//! one, so certificates issued by them stay trusted until `--drop-old-ca`.
//!
//! Directories are replaced the way the kubelet updates a mounted Secret: the files go
//! into a new `..TIMESTAMP` directory, the `..data` symlink is swapped to it in one
//! rename, and `tls.crt` etc. are symlinks through `..data`. A reader (certwire's file
//! watch, Envoy's `watched_directory`) never sees a certificate without its key.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{ErrorKind, Write as _};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use x509_parser::asn1_rs::Tag;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use zeroize::Zeroizing;

/// Envoy's file-based SDS resources in every client directory: the client certificate
/// and key, and the CA bundle, inline. `certwire bootstrap --sds-tls-dir` points the
/// SDS cluster at them (Envoy reloads file-based SDS on a `..data` swap; certificates
/// given inline in a static cluster are read once at start and never again).
pub(super) const ENVOY_CERT_FILE: &str = "envoy-sds-cert.yaml";
pub(super) const ENVOY_CA_FILE: &str = "envoy-sds-ca.yaml";
/// The resource names inside those files.
pub(super) const ENVOY_CERT_SECRET: &str = "certwire-client";
pub(super) const ENVOY_CA_SECRET: &str = "certwire-ca";

/// Kubernetes Secret names.
const CA_SECRET: &str = "certwire-ca";
const SERVER_SECRET: &str = "certwire-server";
const CLIENT_SECRET_PREFIX: &str = "certwire-client-";
const FIELD_MANAGER: &str = "certwire-certgen";

/// Clock skew allowance: certificates are valid from a little before they are made.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// RFC 5280's upper bound for a common name.
const MAX_CN: usize = 64;
/// `certwire-client-` + label must stay a valid Secret name (253 characters).
const MAX_LABEL: usize = 253 - CLIENT_SECRET_PREFIX.len();

#[derive(Debug, clap::Args)]
#[command(group(
    clap::ArgGroup::new("target").required(true).multiple(true).args(["out", "kubernetes_namespace"])
))]
pub struct CertgenArgs {
    /// Write DIR/ca, DIR/server and DIR/clients/LABEL (kubelet `..data` layout, swapped atomically)
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Write Secrets certwire-ca, certwire-server and certwire-client-LABEL (type kubernetes.io/tls) in NS
    #[arg(long, value_name = "NS")]
    pub kubernetes_namespace: Option<String>,
    /// Kubeconfig for --kubernetes-namespace (default: in-cluster, else KUBECONFIG or ~/.kube/config)
    #[arg(long, value_name = "FILE", requires = "kubernetes_namespace")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of certwire's Service, for the default server names [default: --kubernetes-namespace, else certwire]
    #[arg(long, value_name = "NS")]
    pub namespace: Option<String>,
    /// Another DNS name or IP address for certwire's server certificate (repeatable)
    #[arg(long = "server-san", value_name = "NAME", value_parser = parse_server_san)]
    pub server_sans: Vec<SanName>,
    /// A proxy identity to issue a client certificate for (repeatable): spiffe://TRUST_DOMAIN/PATH, dns:NAME or
    /// cn:NAME, optionally as LABEL=ID to name its directory and Secret
    #[arg(long = "client", value_name = "[LABEL=]ID", value_parser = parse_client)]
    pub clients: Vec<ClientSpec>,
    /// Lifetime of the server and client certificates
    #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = humantime::parse_duration)]
    pub validity: Duration,
    /// Lifetime of a new CA
    #[arg(long, value_name = "DURATION", default_value = "3650d", value_parser = humantime::parse_duration)]
    pub ca_validity: Duration,
    /// Make a new CA; the previous ones stay in the ca.crt bundles, after it, until --drop-old-ca
    #[arg(long)]
    pub rotate_ca: bool,
    /// Keep only the current CA in the ca.crt bundles (ends the overlap a --rotate-ca started)
    #[arg(long)]
    pub drop_old_ca: bool,
}

// ---------------------------------------------------------------------------------
// Identities and names
// ---------------------------------------------------------------------------------

/// Who a client certificate says the proxy is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientId {
    /// URI SAN `spiffe://TRUST_DOMAIN/PATH`.
    Spiffe(String),
    /// DNS SAN.
    Dns(String),
    /// Subject common name only.
    Cn(String),
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientId::Spiffe(id) => f.write_str(id),
            ClientId::Dns(name) => write!(f, "dns:{name}"),
            ClientId::Cn(name) => write!(f, "cn:{name}"),
        }
    }
}

/// One `--client`: the identity and the label naming its directory and Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSpec {
    pub label: String,
    pub id: ClientId,
}

/// A server certificate name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SanName {
    Dns(String),
    Ip(IpAddr),
}

impl std::fmt::Display for SanName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SanName::Dns(name) => write!(f, "DNS:{name}"),
            SanName::Ip(ip) => write!(f, "IP:{ip}"),
        }
    }
}

/// `[LABEL=]ID`. An argument starting with an ID scheme has no label, so `=` may appear
/// in a `cn:` name.
fn parse_client(arg: &str) -> Result<ClientSpec, String> {
    let has_scheme = ["spiffe://", "dns:", "cn:"].iter().any(|s| arg.starts_with(s));
    let (label, id) = match arg.split_once('=') {
        Some((label, id)) if !has_scheme => (Some(label), id),
        _ => (None, arg),
    };
    let id = parse_client_id(id)?;
    let label = match label {
        Some(label) => {
            check_label(label)?;
            label.to_owned()
        }
        None => derive_label(&id)?,
    };
    Ok(ClientSpec { label, id })
}

fn parse_client_id(id: &str) -> Result<ClientId, String> {
    if id.starts_with("spiffe://") {
        check_spiffe_id(id)?;
        Ok(ClientId::Spiffe(id.to_owned()))
    } else if let Some(name) = id.strip_prefix("dns:") {
        check_dns_name(name)?;
        Ok(ClientId::Dns(name.to_owned()))
    } else if let Some(name) = id.strip_prefix("cn:") {
        if name.is_empty() || name.chars().count() > MAX_CN || name.chars().any(char::is_control) {
            return Err(format!("cn:{name:?}: a common name has 1 to {MAX_CN} characters, no control characters"));
        }
        Ok(ClientId::Cn(name.to_owned()))
    } else {
        Err(format!("{id:?}: expected spiffe://TRUST_DOMAIN/PATH, dns:NAME or cn:NAME (optionally LABEL=ID)"))
    }
}

/// A SPIFFE ID as the SPIFFE spec defines it, with a path (a workload, not a trust
/// domain): lowercase trust domain of `[a-z0-9._-]`, path segments of `[a-zA-Z0-9._-]`,
/// none empty, `.` or `..`.
fn check_spiffe_id(id: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{id:?}: not a SPIFFE ID ({why})"));
    let rest = &id["spiffe://".len()..];
    let Some((domain, path)) = rest.split_once('/') else {
        return bad("expected spiffe://TRUST_DOMAIN/PATH");
    };
    if domain.is_empty() || !domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-_".contains(&b))
    {
        return bad("the trust domain is lowercase letters, digits, '.', '-' and '_'");
    }
    if id.len() > 2048 {
        return bad("longer than 2048 bytes");
    }
    for segment in path.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return bad("empty, '.' or '..' path segment");
        }
        if !segment.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b)) {
            return bad("path segments are letters, digits, '.', '-' and '_'");
        }
    }
    Ok(())
}

/// A DNS name for a certificate: labels of letters, digits and `-`, a leading `*.` allowed.
fn check_dns_name(name: &str) -> Result<(), String> {
    let host = name.strip_prefix("*.").unwrap_or(name);
    let ok = !host.is_empty()
        && name.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok { Ok(()) } else { Err(format!("{name:?}: not a DNS name")) }
}

fn parse_server_san(arg: &str) -> Result<SanName, String> {
    if let Ok(ip) = arg.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return Ok(SanName::Ip(ip));
    }
    check_dns_name(arg)?;
    Ok(SanName::Dns(arg.to_owned()))
}

/// A label is a directory name and the tail of a Secret name, so it follows the
/// Kubernetes object name rule (a DNS subdomain): dot-separated parts of lowercase
/// letters, digits and `-`, each starting and ending with a letter or digit.
fn check_label(label: &str) -> Result<(), String> {
    let ok = !label.is_empty()
        && label.len() <= MAX_LABEL
        && label.split('.').all(|part| {
            !part.is_empty()
                && !part.starts_with('-')
                && !part.ends_with('-')
                && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "label {label:?}: use lowercase letters, digits, '-' and '.', starting and ending with a letter or \
             digit (at most {MAX_LABEL} characters)"
        ))
    }
}

/// The label of an identity without an explicit one:
/// `spiffe://TD/ns/NS/sa/SA` -> `NS.SA`; another SPIFFE path -> its segments joined by
/// `.`; `dns:NAME` -> NAME (`*` as `wildcard`); `cn:NAME` -> NAME made safe.
fn derive_label(id: &ClientId) -> Result<String, String> {
    let raw = match id {
        ClientId::Spiffe(spiffe) => {
            let path = spiffe["spiffe://".len()..].split_once('/').map_or("", |(_, path)| path);
            let segments: Vec<&str> = path.split('/').collect();
            match segments.as_slice() {
                ["ns", ns, "sa", sa] => format!("{ns}.{sa}"),
                _ => segments.join("."),
            }
        }
        ClientId::Dns(name) => name.replace('*', "wildcard"),
        ClientId::Cn(name) => name.clone(),
    };
    let label = sanitize_label(&raw);
    check_label(&label).map_err(|_| format!("cannot make a label from {id}: give one as LABEL={id}"))?;
    Ok(label)
}

/// Lowercase; anything but letters, digits, `-` and `.` becomes `-`; runs of `-` are
/// folded; each dot-separated part is trimmed of `-` and empty parts dropped.
fn sanitize_label(raw: &str) -> String {
    let mut mapped = String::with_capacity(raw.len());
    for c in raw.chars().flat_map(char::to_lowercase) {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' { c } else { '-' };
        if !(c == '-' && mapped.ends_with('-')) {
            mapped.push(c);
        }
    }
    let parts: Vec<&str> = mapped.split('.').map(|p| p.trim_matches('-')).filter(|p| !p.is_empty()).collect();
    let mut label = parts.join(".");
    if label.len() > MAX_LABEL {
        label.truncate(MAX_LABEL);
        label = label.trim_end_matches(['-', '.']).to_owned();
    }
    label
}

/// A Kubernetes namespace name (a DNS label).
fn check_namespace(ns: &str) -> anyhow::Result<()> {
    let ok = !ns.is_empty()
        && ns.len() <= 63
        && !ns.starts_with('-')
        && !ns.ends_with('-')
        && ns.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok { Ok(()) } else { bail!("namespace {ns:?}: lowercase letters, digits and '-' (a DNS label)") }
}

/// The server certificate's names: `--server-san` first, then certwire's Service names in
/// `namespace`, `localhost` and `127.0.0.1`; duplicates dropped.
fn server_names(extra: &[SanName], namespace: &str) -> Vec<SanName> {
    let mut names: Vec<SanName> = extra.to_vec();
    let defaults = [
        "certwire".to_owned(),
        format!("certwire.{namespace}"),
        format!("certwire.{namespace}.svc"),
        format!("certwire.{namespace}.svc.cluster.local"),
        "localhost".to_owned(),
    ];
    names.extend(defaults.into_iter().map(SanName::Dns));
    names.push(SanName::Ip(IpAddr::from([127, 0, 0, 1])));
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.to_string().to_ascii_lowercase()));
    names
}

// ---------------------------------------------------------------------------------
// The CA
// ---------------------------------------------------------------------------------

/// One certificate of a CA bundle.
#[derive(Clone)]
struct CaCert {
    der: Vec<u8>,
    subject: String,
    not_after: i64,
}

impl CaCert {
    fn parse(der: &[u8]) -> anyhow::Result<CaCert> {
        let (_, x509) = x509_parser::parse_x509_certificate(der).map_err(|e| anyhow!("invalid certificate: {e}"))?;
        Ok(CaCert {
            der: der.to_vec(),
            subject: x509.subject().to_string(),
            not_after: x509.validity().not_after.timestamp(),
        })
    }

    fn pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.der)
    }
}

fn bundle_pem(bundle: &[CaCert]) -> String {
    bundle.iter().map(CaCert::pem).collect()
}

/// A CA as found on disk or in the cluster: its key and the trust bundle, the CA that
/// matches the key first.
struct StoredCa {
    key_pem: Zeroizing<String>,
    bundle: Vec<CaCert>,
    origin: String,
}

impl StoredCa {
    /// `bundle_pem`: the CA first, older CAs after it. `key_pem`: PKCS#8.
    fn parse(bundle_pem: &[u8], key_pem: &[u8], origin: String) -> anyhow::Result<StoredCa> {
        let mut bundle = Vec::new();
        for der in CertificateDer::pem_slice_iter(bundle_pem) {
            let der = der.map_err(|e| anyhow!("{origin}: invalid PEM: {e}"))?;
            bundle.push(CaCert::parse(&der).with_context(|| origin.clone())?);
        }
        if bundle.is_empty() {
            bail!("{origin}: no CA certificate");
        }
        let key_text = std::str::from_utf8(key_pem).map_err(|_| anyhow!("{origin}: the CA key is not PEM"))?;
        let key = KeyPair::from_pem(key_text).map_err(|e| {
            anyhow!("{origin}: unusable CA key ({e}); a PKCS#8 PEM key is needed (openssl pkcs8 -topk8 -nocrypt)")
        })?;
        let (_, first) = x509_parser::parse_x509_certificate(&bundle[0].der).map_err(|e| anyhow!("{origin}: {e}"))?;
        if first.public_key().raw != key.subject_public_key_info().as_slice() {
            bail!(
                "{origin}: the CA key does not belong to the first certificate of the bundle ({})",
                bundle[0].subject
            );
        }
        if !first.is_ca() {
            bail!("{origin}: {} is not a CA certificate", bundle[0].subject);
        }
        Ok(StoredCa { key_pem: Zeroizing::new(key_text.to_owned()), bundle, origin })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CaOutcome {
    Created,
    Reused,
    Rotated,
}

/// The CA this run issues with, and the bundle it publishes.
struct Authority {
    issuer: Issuer<'static, KeyPair>,
    key_pem: Zeroizing<String>,
    /// The CA first, then the previous CAs still trusted.
    bundle: Vec<CaCert>,
    outcome: CaOutcome,
    /// Older CAs left out of the bundle this run (expired, or --drop-old-ca).
    dropped: usize,
}

impl Authority {
    fn prepare(
        stored: Option<StoredCa>,
        rotate: bool,
        drop_old: bool,
        ca_validity: Duration,
        now: OffsetDateTime,
    ) -> anyhow::Result<Authority> {
        let now_unix = now.unix_timestamp();
        let Some(stored) = stored else {
            let (issuer, key_pem, cert) = new_ca(ca_validity, now)?;
            return Ok(Authority { issuer, key_pem, bundle: vec![cert], outcome: CaOutcome::Created, dropped: 0 });
        };
        // Expired CAs are of no use in a trust bundle; --drop-old-ca keeps only the
        // issuing CA.
        let previous = stored.bundle.len();
        if rotate {
            let (issuer, key_pem, cert) = new_ca(ca_validity, now)?;
            let mut bundle = vec![cert];
            if !drop_old {
                bundle.extend(stored.bundle.into_iter().filter(|c| c.not_after > now_unix));
            }
            let dropped = previous + 1 - bundle.len();
            return Ok(Authority { issuer, key_pem, bundle, outcome: CaOutcome::Rotated, dropped });
        }
        let current = &stored.bundle[0];
        if current.not_after <= now_unix {
            bail!(
                "the CA ({}, from {}) expired at {}: run with --rotate-ca",
                current.subject,
                stored.origin,
                crate::unix_time::rfc3339(current.not_after)
            );
        }
        let key = KeyPair::from_pem(&stored.key_pem).context("reading the CA key")?;
        let issuer =
            issuer_from_cert(&current.der, key).with_context(|| format!("using the CA from {}", stored.origin))?;
        let mut bundle = stored.bundle;
        let rest = bundle.split_off(1);
        if !drop_old {
            bundle.extend(rest.into_iter().filter(|c| c.not_after > now_unix));
        }
        let dropped = previous - bundle.len();
        Ok(Authority { issuer, key_pem: stored.key_pem, bundle, outcome: CaOutcome::Reused, dropped })
    }

    fn cert(&self) -> &CaCert {
        &self.bundle[0]
    }
}

/// A new self-signed CA: ECDSA P-256, may sign leaves only (path length 0).
fn new_ca(
    validity: Duration,
    now: OffsetDateTime,
) -> anyhow::Result<(Issuer<'static, KeyPair>, Zeroizing<String>, CaCert)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    // The creation time tells a rotated CA from the one before it, in `openssl x509`
    // output and in status pages.
    dn.push(DnType::CommonName, format!("certwire CA {}", crate::unix_time::rfc3339(now.unix_timestamp())));
    dn.push(DnType::OrganizationName, "certwire");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
    let cert = params.self_signed(&key)?;
    let key_pem = Zeroizing::new(key.serialize_pem());
    let cert = CaCert::parse(cert.der())?;
    Ok((Issuer::new(params, key), key_pem, cert))
}

/// An issuer for an existing CA certificate. rcgen writes a leaf's issuer name from the
/// attributes given here, so the subject is rebuilt attribute by attribute with the
/// same string types; [`issue`] checks the result byte for byte.
fn issuer_from_cert(der: &[u8], key: KeyPair) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let (_, x509) = x509_parser::parse_x509_certificate(der).map_err(|e| anyhow!("invalid CA certificate: {e}"))?;
    let mut dn = DistinguishedName::new();
    let mut attributes = 0;
    for rdn in x509.subject().iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            bail!("the CA subject has a multi-valued name component, which certgen cannot reproduce");
        };
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or_else(|| anyhow!("the CA subject has an attribute type out of range"))?
            .collect();
        let text = attr.as_str().map_err(|_| anyhow!("the CA subject has an attribute that is not a string"))?;
        let value = match attr.attr_value().tag() {
            Tag::Utf8String => DnValue::Utf8String(text.to_owned()),
            Tag::PrintableString => DnValue::PrintableString(text.try_into()?),
            Tag::Ia5String => DnValue::Ia5String(text.try_into()?),
            tag => bail!("the CA subject uses string type {tag:?}, which certgen cannot reproduce"),
        };
        dn.push(DnType::from_oid(&oid), value);
        attributes += 1;
    }
    if dn.iter().count() != attributes {
        bail!("the CA subject repeats an attribute type, which certgen cannot reproduce");
    }
    let ski = x509.extensions().iter().find_map(|ext| match ext.parsed_extension() {
        ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
        _ => None,
    });
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    // Leaves name the CA's key by the CA's own subject key identifier.
    params.key_identifier_method = match ski {
        Some(ski) => KeyIdMethod::PreSpecified(ski),
        None => KeyIdMethod::Sha256,
    };
    Ok(Issuer::new(params, key))
}

// ---------------------------------------------------------------------------------
// Leaves
// ---------------------------------------------------------------------------------

/// An issued server or client certificate.
struct Leaf {
    cert_pem: String,
    key_pem: Zeroizing<String>,
    names: Vec<String>,
    not_after: i64,
}

enum LeafKind<'a> {
    Server(&'a [SanName]),
    Client(&'a ClientSpec),
}

fn issue(ca: &Authority, kind: LeafKind<'_>, not_after: OffsetDateTime, now: OffsetDateTime) -> anyhow::Result<Leaf> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - BACKDATE;
    params.not_after = not_after;
    let common_name = match kind {
        LeafKind::Server(names) => {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            for name in names {
                params.subject_alt_names.push(match name {
                    SanName::Dns(dns) => SanType::DnsName(dns.as_str().try_into()?),
                    SanName::Ip(ip) => SanType::IpAddress(*ip),
                });
            }
            "certwire".to_owned()
        }
        LeafKind::Client(client) => {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            match &client.id {
                ClientId::Spiffe(id) => {
                    params.subject_alt_names.push(SanType::URI(id.as_str().try_into()?));
                    client.label.clone()
                }
                ClientId::Dns(name) => {
                    params.subject_alt_names.push(SanType::DnsName(name.as_str().try_into()?));
                    name.clone()
                }
                ClientId::Cn(name) => name.clone(),
            }
        }
    };
    // A name longer than X.509 allows for a CN stays in the SAN only.
    if common_name.chars().count() <= MAX_CN {
        params.distinguished_name.push(DnType::CommonName, common_name);
    }
    let cert = params.signed_by(&key, &ca.issuer)?;
    let (_, x509) = x509_parser::parse_x509_certificate(cert.der()).map_err(|e| anyhow!("issued certificate: {e}"))?;
    let (_, ca_x509) = x509_parser::parse_x509_certificate(&ca.cert().der).map_err(|e| anyhow!("CA: {e}"))?;
    if x509.issuer().as_raw() != ca_x509.subject().as_raw() {
        bail!("the issued certificate does not name its CA exactly ({}); the CA cannot be used", ca.cert().subject);
    }
    let mut names = Vec::new();
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for name in &san.value.general_names {
            names.push(match name {
                GeneralName::DNSName(n) => format!("DNS:{n}"),
                GeneralName::URI(u) => format!("URI:{u}"),
                GeneralName::IPAddress(octets) => format!("IP:{}", ip_from_octets(octets)),
                other => other.to_string(),
            });
        }
    }
    if names.is_empty() {
        names.push(x509.subject().to_string());
    }
    Ok(Leaf {
        cert_pem: cert.pem(),
        key_pem: Zeroizing::new(key.serialize_pem()),
        names,
        not_after: x509.validity().not_after.timestamp(),
    })
}

fn ip_from_octets(octets: &[u8]) -> String {
    if let Ok(v4) = <[u8; 4]>::try_from(octets) {
        IpAddr::from(v4).to_string()
    } else if let Ok(v6) = <[u8; 16]>::try_from(octets) {
        IpAddr::from(v6).to_string()
    } else {
        format!("{octets:02x?}")
    }
}

/// The same check certwire applies to every secret it serves, so certgen never writes
/// what `certwire serve` would refuse.
fn self_check(what: &str, leaf: &Leaf, bundle: &str) -> anyhow::Result<()> {
    use crate::pki::{CheckOptions, KeyBytes, Material, check};
    let tls = Material::Tls {
        cert_chain_pem: leaf.cert_pem.clone().into_bytes(),
        key_pem: KeyBytes::new(leaf.key_pem.as_bytes().to_vec()),
        ocsp_staple: None,
    };
    check(what, &tls, &CheckOptions::default()).with_context(|| format!("{what}: self-check failed"))?;
    let ca = Material::Validation { ca_pem: bundle.as_bytes().to_vec(), crl_pem: None };
    check(what, &ca, &CheckOptions::default()).with_context(|| format!("{what}: CA bundle self-check failed"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// What gets written
// ---------------------------------------------------------------------------------

/// One file of a secret directory, or one key of a Secret.
struct OutFile {
    name: &'static str,
    contents: Zeroizing<Vec<u8>>,
    /// Private key material: mode 0600.
    private: bool,
}

impl OutFile {
    fn public(name: &'static str, contents: &str) -> OutFile {
        OutFile { name, contents: Zeroizing::new(contents.as_bytes().to_vec()), private: false }
    }

    fn private(name: &'static str, contents: &str) -> OutFile {
        OutFile { name, contents: Zeroizing::new(contents.as_bytes().to_vec()), private: true }
    }
}

fn ca_files(ca: &Authority) -> Vec<OutFile> {
    vec![OutFile::public("ca.crt", &bundle_pem(&ca.bundle)), OutFile::private("ca.key", &ca.key_pem)]
}

/// The CA Secret: the issuing CA as the TLS pair, the trust bundle as `ca.crt`.
fn ca_secret_files(ca: &Authority) -> Vec<OutFile> {
    vec![
        OutFile::public("tls.crt", &ca.cert().pem()),
        OutFile::private("tls.key", &ca.key_pem),
        OutFile::public("ca.crt", &bundle_pem(&ca.bundle)),
    ]
}

fn leaf_files(leaf: &Leaf, bundle: &str, envoy: bool) -> Vec<OutFile> {
    let mut files = vec![
        OutFile::public("tls.crt", &leaf.cert_pem),
        OutFile::private("tls.key", &leaf.key_pem),
        OutFile::public("ca.crt", bundle),
    ];
    if envoy {
        let cert = envoy_cert_resource(&leaf.cert_pem, &leaf.key_pem);
        files.push(OutFile::private(ENVOY_CERT_FILE, &cert));
        files.push(OutFile::public(ENVOY_CA_FILE, &envoy_ca_resource(bundle)));
    }
    files
}

const ENVOY_RESOURCE_HEADER: &str =
    "# Envoy file-based SDS resource, written by `certwire certgen` (see `certwire bootstrap --sds-tls-dir`).
resources:
- \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
";

/// The client certificate and key as an Envoy `Secret` resource, inline: one file
/// holds the pair, so Envoy can never read a certificate with another one's key.
fn envoy_cert_resource(cert_pem: &str, key_pem: &str) -> Zeroizing<String> {
    // Sized up front: growing would leave copies of the key in freed memory.
    let lines = cert_pem.lines().count() + key_pem.lines().count();
    let mut out = Zeroizing::new(String::with_capacity(512 + cert_pem.len() + key_pem.len() + lines * 8));
    out.push_str(ENVOY_RESOURCE_HEADER);
    let _ = writeln!(out, "  name: {ENVOY_CERT_SECRET}");
    out.push_str("  tls_certificate:\n    certificate_chain:\n      inline_string: |\n");
    push_indented(&mut out, cert_pem, 8);
    out.push_str("    private_key:\n      inline_string: |\n");
    push_indented(&mut out, key_pem, 8);
    out
}

/// The CA bundle as an Envoy `Secret` resource (a validation context), inline.
fn envoy_ca_resource(bundle: &str) -> String {
    let mut out = String::from(ENVOY_RESOURCE_HEADER);
    let _ = writeln!(out, "  name: {ENVOY_CA_SECRET}");
    out.push_str("  validation_context:\n    trusted_ca:\n      inline_string: |\n");
    push_indented(&mut out, bundle, 8);
    out
}

fn push_indented(out: &mut String, text: &str, spaces: usize) {
    for line in text.lines() {
        for _ in 0..spaces {
            out.push(' ');
        }
        out.push_str(line);
        out.push('\n');
    }
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    let _ = writeln!(out, "-----END {label}-----");
    out
}

// ---------------------------------------------------------------------------------
// Secret directories, kubelet style
// ---------------------------------------------------------------------------------

/// Reads the CA from `DIR/ca` (`ca.crt`, `ca.key`); `None` when neither exists.
fn read_ca_dir(dir: &Path) -> anyhow::Result<Option<StoredCa>> {
    let cert = read_optional(&dir.join("ca.crt"))?;
    let key = read_optional(&dir.join("ca.key"))?.map(Zeroizing::new);
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => StoredCa::parse(&cert, &key, dir.display().to_string()).map(Some),
        _ => bail!("{}: ca.crt and ca.key must both exist or both be absent", dir.display()),
    }
}

fn read_optional(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Whether `dir` already holds exactly `files` (through its symlinks).
fn dir_holds(dir: &Path, files: &[OutFile]) -> bool {
    files.iter().all(|f| fs::read(dir.join(f.name)).map(Zeroizing::new).is_ok_and(|bytes| *bytes == *f.contents))
}

/// Replaces the contents of `dir` with `files` as the kubelet updates a mounted Secret:
/// a new `..YYYY_MM_DD_HH_MM_SS.NANOS` directory with the files, `..data` swapped to it
/// in one rename, and `NAME -> ..data/NAME` symlinks. Older payload directories, and
/// links to files no longer written, are removed afterwards.
fn write_secret_dir(dir: &Path, files: &[OutFile], now: OffsetDateTime) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let payload = create_payload_dir(dir, now)?;
    let payload_path = dir.join(&payload);
    for file in files {
        let path = payload_path.join(file.name);
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if file.private { 0o600 } else { 0o644 })
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        out.write_all(&file.contents)
            .and_then(|()| out.sync_all())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    sync_dir(&payload_path)?;

    let tmp = dir.join("..data_tmp");
    remove_symlink(&tmp)?;
    std::os::unix::fs::symlink(&payload, &tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let data = dir.join("..data");
    fs::rename(&tmp, &data).with_context(|| format!("swapping {}", data.display()))?;
    for file in files {
        link_into_data(dir, file.name)?;
    }
    sync_dir(dir)?;

    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let file_type = entry.file_type()?;
        if file_type.is_dir() && name != payload && is_payload_name(&name) {
            fs::remove_dir_all(entry.path()).with_context(|| format!("removing {}", entry.path().display()))?;
        } else if file_type.is_symlink()
            && !name.starts_with("..")
            && !files.iter().any(|f| f.name == name)
            && fs::read_link(entry.path()).is_ok_and(|target| target.starts_with("..data"))
        {
            fs::remove_file(entry.path()).with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    sync_dir(dir)
}

/// `..` followed by a digit: the kubelet's (and certgen's) timestamped payload names.
fn is_payload_name(name: &str) -> bool {
    name.strip_prefix("..").is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
}

fn create_payload_dir(dir: &Path, now: OffsetDateTime) -> anyhow::Result<String> {
    let base = format!(
        "..{:04}_{:02}_{:02}_{:02}_{:02}_{:02}.{:09}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.nanosecond()
    );
    for attempt in 0..100 {
        let name = if attempt == 0 { base.clone() } else { format!("{base}_{attempt}") };
        match fs::DirBuilder::new().mode(0o755).create(dir.join(&name)) {
            Ok(()) => return Ok(name),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.join(&name).display())),
        }
    }
    bail!("{}: could not create a new payload directory", dir.display())
}

/// Makes `dir/name` the symlink `..data/name`, replacing a regular file in one rename.
fn link_into_data(dir: &Path, name: &str) -> anyhow::Result<()> {
    let link = dir.join(name);
    let target = Path::new("..data").join(name);
    if fs::read_link(&link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let tmp = dir.join(format!("..{name}.tmp"));
    remove_symlink(&tmp)?;
    std::os::unix::fs::symlink(&target, &tmp).with_context(|| format!("creating {}", tmp.display()))?;
    fs::rename(&tmp, &link).with_context(|| format!("replacing {} with a symlink", link.display()))
}

fn remove_symlink(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e).with_context(|| format!("removing {}", path.display())),
        _ => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))
}

// ---------------------------------------------------------------------------------
// Kubernetes Secrets
// ---------------------------------------------------------------------------------

struct Kube {
    api: kube::Api<k8s_openapi::api::core::v1::Secret>,
    namespace: String,
}

impl Kube {
    async fn connect(namespace: &str, kubeconfig: Option<&PathBuf>) -> anyhow::Result<Kube> {
        let client = crate::kube_client::connect(kubeconfig).await?.client;
        Ok(Kube { api: kube::Api::namespaced(client, namespace), namespace: namespace.to_owned() })
    }

    /// The Secret's data, if the Secret exists.
    async fn read(&self, name: &str) -> anyhow::Result<Option<BTreeMap<String, Vec<u8>>>> {
        let secret =
            self.api.get_opt(name).await.with_context(|| format!("reading Secret {}/{name}", self.namespace))?;
        Ok(secret.map(|s| s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect()))
    }

    async fn read_ca(&self) -> anyhow::Result<Option<StoredCa>> {
        let Some(data) = self.read(CA_SECRET).await? else {
            return Ok(None);
        };
        let origin = format!("Secret {}/{CA_SECRET}", self.namespace);
        let (Some(cert), Some(key)) = (data.get("tls.crt"), data.get("tls.key")) else {
            bail!("{origin} has no tls.crt and tls.key");
        };
        // The bundle when there is one: it starts with tls.crt.
        let bundle = data.get("ca.crt").filter(|b| !b.is_empty()).unwrap_or(cert);
        let stored = StoredCa::parse(bundle, key, origin.clone())?;
        if CertificateDer::pem_slice_iter(cert)
            .next()
            .and_then(Result::ok)
            .is_none_or(|der| *der != *stored.bundle[0].der)
        {
            bail!("{origin}: ca.crt does not start with the CA in tls.crt");
        }
        Ok(Some(stored))
    }

    /// Creates or replaces Secret `name` (server-side apply, certgen owning its keys).
    async fn apply(&self, name: &str, files: &[OutFile]) -> anyhow::Result<()> {
        use k8s_openapi::ByteString;
        use k8s_openapi::api::core::v1::Secret;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
        let data: BTreeMap<String, ByteString> =
            files.iter().map(|f| (f.name.to_owned(), ByteString(f.contents.to_vec()))).collect();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([("app.kubernetes.io/managed-by".to_owned(), FIELD_MANAGER.to_owned())])),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".to_owned()),
            data: Some(data),
            ..Secret::default()
        };
        let params = kube::api::PatchParams::apply(FIELD_MANAGER).force();
        self.api
            .patch(name, &params, &kube::api::Patch::Apply(&secret))
            .await
            .with_context(|| format!("writing Secret {}/{name}", self.namespace))?;
        Ok(())
    }

    async fn holds(&self, name: &str, files: &[OutFile]) -> anyhow::Result<bool> {
        let Some(data) = self.read(name).await? else {
            return Ok(false);
        };
        Ok(files.iter().all(|f| data.get(f.name).is_some_and(|v| **v == **f.contents)))
    }
}

// ---------------------------------------------------------------------------------
// The command
// ---------------------------------------------------------------------------------

pub fn run(args: &CertgenArgs) -> anyhow::Result<ExitCode> {
    if args.validity.is_zero() || args.ca_validity.is_zero() {
        bail!("--validity and --ca-validity must be longer than zero");
    }
    let namespace = args.namespace.as_deref().or(args.kubernetes_namespace.as_deref()).unwrap_or("certwire");
    check_namespace(namespace)?;
    if let Some(ns) = &args.kubernetes_namespace {
        check_namespace(ns)?;
    }
    let mut labels = std::collections::HashSet::new();
    for client in &args.clients {
        if !labels.insert(client.label.as_str()) {
            bail!("two --client identities use the label {:?}: name one as LABEL=ID", client.label);
        }
    }

    let runtime = match &args.kubernetes_namespace {
        Some(_) => Some(super::runtime(tokio::runtime::Builder::new_current_thread())?),
        None => None,
    };
    let kube = match (&runtime, &args.kubernetes_namespace) {
        (Some(rt), Some(ns)) => Some(rt.block_on(Kube::connect(ns, args.kubeconfig.as_ref()))?),
        _ => None,
    };

    // The CA: from the files, from the cluster, or new.
    let from_files = args.out.as_ref().map(|out| read_ca_dir(&out.join("ca"))).transpose()?.flatten();
    let from_kube = match (&runtime, &kube) {
        (Some(rt), Some(k)) => rt.block_on(k.read_ca())?,
        _ => None,
    };
    let stored = match (from_files, from_kube) {
        (Some(f), Some(k)) if f.bundle[0].der != k.bundle[0].der => bail!(
            "two different CAs: {} ({}) and {} ({}); remove one of them and run again",
            f.origin,
            f.bundle[0].subject,
            k.origin,
            k.bundle[0].subject
        ),
        (Some(f), _) => Some(f),
        (None, k) => k,
    };
    let now = OffsetDateTime::now_utc();
    let ca = Authority::prepare(stored, args.rotate_ca, args.drop_old_ca, args.ca_validity, now)?;

    // Leaves never outlive their CA.
    let ca_not_after = OffsetDateTime::from_unix_timestamp(ca.cert().not_after)?;
    let wanted = now + args.validity;
    let not_after = wanted.min(ca_not_after);
    if not_after < wanted {
        eprintln!(
            "certwire certgen: warning: the CA expires at {}, before --validity ends; the certificates end with it \
             (--rotate-ca makes a new CA)",
            crate::unix_time::rfc3339(ca.cert().not_after)
        );
    }
    let bundle = bundle_pem(&ca.bundle);
    let server = issue(&ca, LeafKind::Server(&server_names(&args.server_sans, namespace)), not_after, now)?;
    self_check("server certificate", &server, &bundle)?;
    let mut clients = Vec::new();
    for client in &args.clients {
        let leaf = issue(&ca, LeafKind::Client(client), not_after, now)?;
        self_check(&format!("client certificate {}", client.label), &leaf, &bundle)?;
        clients.push((client, leaf));
    }

    // Written CA first: a leaf must never be out there without its CA.
    let mut written = Vec::new();
    if let Some(out) = &args.out {
        let files = ca_files(&ca);
        let ca_dir = out.join("ca");
        if dir_holds(&ca_dir, &files) {
            written.push(format!("{} (unchanged)", ca_dir.display()));
        } else {
            write_secret_dir(&ca_dir, &files, now)?;
            written.push(ca_dir.display().to_string());
        }
        let dir = out.join("server");
        write_secret_dir(&dir, &leaf_files(&server, &bundle, false), now)?;
        written.push(dir.display().to_string());
        for (client, leaf) in &clients {
            let dir = out.join("clients").join(&client.label);
            write_secret_dir(&dir, &leaf_files(leaf, &bundle, true), now)?;
            written.push(dir.display().to_string());
        }
    }
    let mut applied = Vec::new();
    if let (Some(rt), Some(k)) = (&runtime, &kube) {
        rt.block_on(async {
            let files = ca_secret_files(&ca);
            if k.holds(CA_SECRET, &files).await? {
                applied.push(format!("{CA_SECRET} (unchanged)"));
            } else {
                k.apply(CA_SECRET, &files).await?;
                applied.push(CA_SECRET.to_owned());
            }
            k.apply(SERVER_SECRET, &leaf_files(&server, &bundle, false)).await?;
            applied.push(SERVER_SECRET.to_owned());
            for (client, leaf) in &clients {
                let name = format!("{CLIENT_SECRET_PREFIX}{}", client.label);
                k.apply(&name, &leaf_files(leaf, &bundle, true)).await?;
                applied.push(name);
            }
            anyhow::Ok(())
        })?;
    }

    print!("{}", summary(&ca, &server, &clients, &written, &applied, args.kubernetes_namespace.as_deref()));
    Ok(ExitCode::SUCCESS)
}

fn summary(
    ca: &Authority,
    server: &Leaf,
    clients: &[(&ClientSpec, Leaf)],
    written: &[String],
    applied: &[String],
    namespace: Option<&str>,
) -> String {
    let mut out = String::new();
    let how = match ca.outcome {
        CaOutcome::Created => "created",
        CaOutcome::Reused => "reused",
        CaOutcome::Rotated => "rotated: new CA",
    };
    let _ = writeln!(
        out,
        "CA      {} ({how}; not after {}; ca.crt bundle: {} CA{}{})",
        ca.cert().subject,
        crate::unix_time::rfc3339(ca.cert().not_after),
        ca.bundle.len(),
        if ca.bundle.len() == 1 { "" } else { "s, newest first" },
        if ca.dropped > 0 { format!("; {} old CA(s) dropped", ca.dropped) } else { String::new() },
    );
    let _ = writeln!(
        out,
        "server  {} (not after {})",
        server.names.join(", "),
        crate::unix_time::rfc3339(server.not_after)
    );
    for (client, leaf) in clients {
        let _ = writeln!(
            out,
            "client  {}: {} (not after {})",
            client.label,
            leaf.names.join(", "),
            crate::unix_time::rfc3339(leaf.not_after)
        );
    }
    for dir in written {
        let _ = writeln!(out, "wrote   {dir}");
    }
    if let Some(ns) = namespace {
        for name in applied {
            let _ = writeln!(out, "applied Secret {ns}/{name}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(arg: &str) -> ClientSpec {
        parse_client(arg).unwrap_or_else(|e| panic!("{arg}: {e}"))
    }

    #[test]
    fn client_ids_and_their_labels() {
        let s = spec("spiffe://cluster.local/ns/gw/sa/ingress");
        assert_eq!(s.id, ClientId::Spiffe("spiffe://cluster.local/ns/gw/sa/ingress".into()));
        assert_eq!(s.label, "gw.ingress");
        assert_eq!(spec("spiffe://example.org/edge/eu_west/proxy-1").label, "edge.eu-west.proxy-1");
        assert_eq!(spec("spiffe://example.org/Edge").label, "edge");

        let s = spec("dns:edge.example.com");
        assert_eq!(s.id, ClientId::Dns("edge.example.com".into()));
        assert_eq!(s.label, "edge.example.com");
        assert_eq!(spec("dns:*.Edge.example.com").label, "wildcard.edge.example.com");

        let s = spec("cn:Edge Proxy #1");
        assert_eq!(s.id, ClientId::Cn("Edge Proxy #1".into()));
        assert_eq!(s.label, "edge-proxy-1");
        // A scheme first: '=' belongs to the name, there is no label.
        let s = spec("cn:team=edge");
        assert_eq!(s.id, ClientId::Cn("team=edge".into()));
        assert_eq!(s.label, "team-edge");
    }

    #[test]
    fn explicit_labels() {
        let s = spec("edge=spiffe://cluster.local/ns/gw/sa/ingress");
        assert_eq!(s.label, "edge");
        assert_eq!(s.id, ClientId::Spiffe("spiffe://cluster.local/ns/gw/sa/ingress".into()));
        assert_eq!(spec("eu.edge-1=cn:x").label, "eu.edge-1");
        for bad in ["Edge=cn:x", "../x=cn:x", "=cn:x", "-a=cn:x", "a..b=cn:x", "a/b=cn:x", ".a=cn:x"] {
            assert!(parse_client(bad).is_err(), "{bad} accepted");
        }
        // A label for a CN made only of symbols has to be given.
        assert!(parse_client("cn:***").unwrap_err().contains("LABEL="));
        assert_eq!(spec("stars=cn:***").label, "stars");
    }

    #[test]
    fn bad_ids_are_refused_with_the_reason() {
        for bad in [
            "ingress",
            "spiffe://",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe://Cluster.local/ns/gw",
            "spiffe://cluster.local/ns//gw",
            "spiffe://cluster.local/ns/../gw",
            "spiffe://cluster.local/ns/g w",
            "spiffe://cluster.local/ns/gw?x=1",
            "dns:",
            "dns:-bad.example.com",
            "dns:a..b",
            "dns:under_score.example",
            "cn:",
            "uri:spiffe://x/y",
        ] {
            assert!(parse_client(bad).is_err(), "{bad} accepted");
        }
        assert!(parse_client(&format!("cn:{}", "x".repeat(65))).is_err());
        assert!(parse_client("ingress").unwrap_err().contains("spiffe://"));
    }

    #[test]
    fn server_names_put_extra_names_first_and_drop_duplicates() {
        let extra = vec![parse_server_san("sds.example.com").unwrap(), parse_server_san("10.0.0.7").unwrap()];
        let names: Vec<String> = server_names(&extra, "infra").iter().map(ToString::to_string).collect();
        assert_eq!(
            names,
            [
                "DNS:sds.example.com",
                "IP:10.0.0.7",
                "DNS:certwire",
                "DNS:certwire.infra",
                "DNS:certwire.infra.svc",
                "DNS:certwire.infra.svc.cluster.local",
                "DNS:localhost",
                "IP:127.0.0.1"
            ]
        );
        let dup = vec![parse_server_san("LOCALHOST").unwrap(), parse_server_san("[::1]").unwrap()];
        let names: Vec<String> = server_names(&dup, "certwire").iter().map(ToString::to_string).collect();
        assert_eq!(names.iter().filter(|n| n.eq_ignore_ascii_case("DNS:localhost")).count(), 1);
        assert!(names.contains(&"IP:::1".to_owned()));
        assert!(parse_server_san("bad name").is_err());
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    const DAY: Duration = Duration::from_secs(86_400);

    fn stored(ca: &Authority, origin: &str) -> StoredCa {
        StoredCa::parse(bundle_pem(&ca.bundle).as_bytes(), ca.key_pem.as_bytes(), origin.into()).unwrap()
    }

    #[test]
    fn a_reloaded_ca_issues_certificates_that_name_it_exactly() {
        let first = Authority::prepare(None, false, false, DAY * 365, now()).unwrap();
        assert_eq!(first.outcome, CaOutcome::Created);
        let again = Authority::prepare(Some(stored(&first, "test")), false, false, DAY, now()).unwrap();
        assert_eq!(again.outcome, CaOutcome::Reused);
        assert_eq!(again.cert().der, first.cert().der);
        let client = spec("spiffe://cluster.local/ns/gw/sa/ingress");
        let leaf = issue(&again, LeafKind::Client(&client), now() + DAY, now()).unwrap();
        assert_eq!(leaf.names, ["URI:spiffe://cluster.local/ns/gw/sa/ingress"]);
        self_check("client", &leaf, &bundle_pem(&again.bundle)).unwrap();
        // The leaf's authority key identifier is the CA's subject key identifier.
        let der = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&first.cert().der).unwrap();
        let aki = x509.extensions().iter().find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => a.key_identifier.as_ref().map(|k| k.0.to_vec()),
            _ => None,
        });
        let ski = ca.extensions().iter().find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        });
        assert!(aki.is_some());
        assert_eq!(aki, ski);
        assert!(!x509.is_ca());
    }

    #[test]
    fn rotation_keeps_previous_cas_after_the_new_one_until_dropped() {
        let first = Authority::prepare(None, false, false, DAY * 365, now()).unwrap();
        let rotated = Authority::prepare(Some(stored(&first, "t")), true, false, DAY * 365, now()).unwrap();
        assert_eq!(rotated.outcome, CaOutcome::Rotated);
        assert_eq!(rotated.bundle.len(), 2);
        assert_ne!(rotated.bundle[0].der, first.cert().der);
        assert_eq!(rotated.bundle[1].der, first.cert().der);
        // A plain re-run keeps the overlap; --drop-old-ca ends it.
        let reused = Authority::prepare(Some(stored(&rotated, "t")), false, false, DAY, now()).unwrap();
        assert_eq!(reused.bundle.len(), 2);
        assert_eq!(reused.bundle[0].der, rotated.bundle[0].der);
        let dropped = Authority::prepare(Some(stored(&rotated, "t")), false, true, DAY, now()).unwrap();
        assert_eq!(dropped.bundle.len(), 1);
        assert_eq!(dropped.dropped, 1);
        assert_eq!(dropped.bundle[0].der, rotated.bundle[0].der);
        // A hard cut: rotate and drop at once.
        let cut = Authority::prepare(Some(stored(&rotated, "t")), true, true, DAY, now()).unwrap();
        assert_eq!(cut.bundle.len(), 1);
        assert_eq!(cut.dropped, 2);
    }

    #[test]
    fn expired_cas_leave_the_bundle_and_an_expired_current_ca_is_refused() {
        let long_ago = now() - DAY * 30;
        let old = Authority::prepare(None, false, false, DAY, long_ago).unwrap();
        let rotated = Authority::prepare(Some(stored(&old, "t")), true, false, DAY * 365, now()).unwrap();
        assert_eq!(rotated.bundle.len(), 1, "the expired CA is not kept");
        let err = Authority::prepare(Some(stored(&old, "t")), false, false, DAY, now()).err().unwrap();
        assert!(format!("{err:#}").contains("--rotate-ca"), "{err:#}");
    }

    #[test]
    fn a_key_that_does_not_match_the_ca_is_refused() {
        let a = Authority::prepare(None, false, false, DAY, now()).unwrap();
        let b = Authority::prepare(None, false, false, DAY, now()).unwrap();
        let err = StoredCa::parse(bundle_pem(&a.bundle).as_bytes(), b.key_pem.as_bytes(), "t".into()).err().unwrap();
        assert!(err.to_string().contains("does not belong"), "{err}");
        // A leaf is not a CA.
        let leaf = issue(&a, LeafKind::Server(&server_names(&[], "x")), now() + DAY, now()).unwrap();
        let err = StoredCa::parse(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes(), "t".into()).err().unwrap();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    #[test]
    fn a_ca_from_elsewhere_is_reproduced_or_refused() {
        // PrintableString attributes (as openssl writes them), reproduced exactly.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CountryName, DnValue::PrintableString("DE".try_into().unwrap()));
        dn.push(DnType::OrganizationName, DnValue::PrintableString("Example".try_into().unwrap()));
        dn.push(DnType::CommonName, "Example Root");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params.not_after = now() + DAY;
        let cert = params.self_signed(&key).unwrap();
        let stored = StoredCa::parse(cert.pem().as_bytes(), key.serialize_pem().as_bytes(), "own".into()).unwrap();
        let ca = Authority::prepare(Some(stored), false, false, DAY, now()).unwrap();
        let leaf = issue(&ca, LeafKind::Client(&spec("cn:edge")), now() + DAY, now()).unwrap();
        self_check("client", &leaf, &bundle_pem(&ca.bundle)).unwrap();
    }

    #[test]
    fn envoy_resources_hold_the_pem_as_literal_blocks() {
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let key = "-----BEGIN PRIVATE KEY-----\nBBBB\n-----END PRIVATE KEY-----\n";
        let text = envoy_cert_resource(cert, key);
        assert!(text.contains(&format!("  name: {ENVOY_CERT_SECRET}\n")));
        assert!(text.contains("      inline_string: |\n        -----BEGIN CERTIFICATE-----\n        AAAA\n"));
        assert!(text.contains("    private_key:\n      inline_string: |\n        -----BEGIN PRIVATE KEY-----\n"));
        let ca = envoy_ca_resource(cert);
        assert!(ca.contains(&format!("  name: {ENVOY_CA_SECRET}\n  validation_context:\n    trusted_ca:\n")));
    }

    fn read_link(path: &Path) -> String {
        fs::read_link(path).unwrap().to_string_lossy().into_owned()
    }

    #[test]
    fn secret_dirs_are_swapped_atomically_kubelet_style() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("leaf");
        let files = |v: &str| vec![OutFile::public("tls.crt", v), OutFile::private("tls.key", &format!("key {v}"))];
        write_secret_dir(&dir, &files("one"), now()).unwrap();
        let first = read_link(&dir.join("..data"));
        assert!(is_payload_name(&first), "{first}");
        assert_eq!(read_link(&dir.join("tls.crt")), "..data/tls.crt");
        assert_eq!(fs::read_to_string(dir.join("tls.key")).unwrap(), "key one");
        assert_eq!(fs::metadata(dir.join("tls.key")).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(dir.join("tls.crt")).unwrap().permissions().mode() & 0o777, 0o644);
        assert!(dir_holds(&dir, &files("one")));
        assert!(!dir_holds(&dir, &files("two")));

        // A plain file in the way is replaced by the link; the old payload goes away,
        // and so does a link to a file no longer written.
        std::os::unix::fs::symlink("..data/extra", dir.join("extra")).unwrap();
        fs::write(dir.join("unrelated"), "kept").unwrap();
        write_secret_dir(&dir, &files("two"), now()).unwrap();
        let second = read_link(&dir.join("..data"));
        assert_ne!(first, second);
        assert!(!dir.join(&first).exists());
        assert_eq!(fs::read_to_string(dir.join("tls.crt")).unwrap(), "two");
        assert!(fs::symlink_metadata(dir.join("extra")).is_err());
        assert!(dir.join("unrelated").exists());
        let mut names: Vec<String> =
            fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        let mut expected = ["..data", second.as_str(), "tls.crt", "tls.key", "unrelated"];
        expected.sort_unstable();
        assert_eq!(names, expected);

        // A CA directory made by hand with plain files becomes the same layout.
        let own = tmp.path().join("own");
        fs::create_dir(&own).unwrap();
        fs::write(own.join("tls.crt"), "mine").unwrap();
        write_secret_dir(&own, &files("three"), now()).unwrap();
        assert_eq!(read_link(&own.join("tls.crt")), "..data/tls.crt");
    }

    #[test]
    fn the_same_instant_gets_distinct_payload_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let at = now();
        let a = create_payload_dir(tmp.path(), at).unwrap();
        let b = create_payload_dir(tmp.path(), at).unwrap();
        assert_ne!(a, b);
        assert!(is_payload_name(&a) && is_payload_name(&b));
        assert!(!is_payload_name("..data") && !is_payload_name("..data_tmp") && !is_payload_name("tls.crt"));
    }
}
