//! `certwire certgen` and the mutual-TLS side of `certwire bootstrap`, as a user runs
//! them: the files checked with `openssl` (chains, SANs, key usages) and `certwire
//! check`, re-runs and CA rotation, Secrets written into the Kubernetes API emulator
//! (and read back with the real `kubectl`), and a real Envoy that validates the printed
//! bootstrap, completes a mutual-TLS handshake with a server holding certgen's server
//! certificate, and reloads its client certificate when certgen runs again.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::certwire::certwire_bin;
use common::envoy::{self, Envoy};
use common::kubeapi::{self, KubeApi};
use common::pki;
use common::util::{self, WAIT};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tokio::sync::mpsc;

const SPIFFE: &str = "spiffe://cluster.local/ns/gw/sa/ingress";
const LABEL: &str = "gw.ingress";

/// How long a refused handshake is watched to show that no handshake succeeds.
const HOLD: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

/// Runs `certwire certgen ARGS`; panics with its output unless it succeeds. Returns stdout.
fn certgen(args: &[&str]) -> String {
    let (ok, stdout, stderr) = certwire(&[&["certgen"], args].concat());
    assert!(ok, "certwire certgen {args:?} failed:\n{stdout}{stderr}");
    stdout
}

/// Runs `certwire certgen ARGS` expecting it to fail; returns stderr.
fn certgen_fails(args: &[&str]) -> String {
    let (ok, stdout, stderr) = certwire(&[&["certgen"], args].concat());
    assert!(!ok, "certwire certgen {args:?} succeeded:\n{stdout}");
    stderr
}

fn certwire(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(certwire_bin()).args(args).stdin(Stdio::null()).output().expect("run certwire");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Runs `openssl ARGS`; returns (success, stdout + stderr).
fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).stdin(Stdio::null()).output().expect("run openssl");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// `openssl verify -CAfile CA [-purpose PURPOSE] CERT` succeeds.
fn verifies(ca: &Path, cert: &Path, purpose: Option<&str>) -> bool {
    let (ca, cert) = (ca.to_str().unwrap(), cert.to_str().unwrap());
    let mut args = vec!["verify", "-CAfile", ca];
    if let Some(purpose) = purpose {
        args.extend(["-purpose", purpose]);
    }
    args.push(cert);
    openssl(&args).0
}

/// `openssl x509 -noout -ext EXT -in CERT` (the named extensions as text).
fn x509_ext(cert: &Path, ext: &str) -> String {
    let (ok, out) = openssl(&["x509", "-noout", "-ext", ext, "-in", cert.to_str().unwrap()]);
    assert!(ok, "openssl x509 -ext {ext} {}: {out}", cert.display());
    out
}

fn subject(cert: &Path) -> String {
    openssl(&["x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in", cert.to_str().unwrap()]).1
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The DER of every certificate in a PEM bundle, in order.
fn certs_of(pem: &str) -> Vec<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).map(|c| c.expect("valid PEM").to_vec()).collect()
}

fn serial_of(path: &Path) -> String {
    pki::serial_hex_of_pem(&read(path))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

/// Checks that `dir` is laid out as the kubelet lays out a mounted Secret: `..data`
/// pointing at a `..TIMESTAMP` directory holding exactly `files`, and each file a
/// symlink through `..data`. Returns the payload directory's name.
fn assert_kubelet_layout(dir: &Path, files: &[&str]) -> String {
    let payload = std::fs::read_link(dir.join("..data"))
        .unwrap_or_else(|e| panic!("{}/..data is not a symlink: {e}", dir.display()))
        .to_string_lossy()
        .into_owned();
    assert!(payload.starts_with("..2"), "{}: ..data -> {payload}", dir.display());
    for file in files {
        let target = std::fs::read_link(dir.join(file)).unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()));
        assert_eq!(target, Path::new("..data").join(file), "{}/{file}", dir.display());
    }
    let mut inside: Vec<String> = std::fs::read_dir(dir.join(&payload))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    inside.sort();
    let mut expected: Vec<String> = files.iter().map(|f| f.to_string()).collect();
    expected.sort();
    assert_eq!(inside, expected, "{}/{payload}", dir.display());
    let mut entries: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    entries.retain(|e| e.starts_with(".."));
    let mut expected = vec!["..data".to_string(), payload.clone()];
    expected.sort();
    entries.sort();
    assert_eq!(entries, expected, "{}: one payload directory", dir.display());
    payload
}

const CLIENT_FILES: [&str; 5] = ["tls.crt", "tls.key", "ca.crt", "envoy-sds-cert.yaml", "envoy-sds-ca.yaml"];
const SERVER_FILES: [&str; 3] = ["tls.crt", "tls.key", "ca.crt"];
const CA_FILES: [&str; 2] = ["ca.crt", "ca.key"];

// ---------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------

#[test]
fn files_have_the_kubelet_layout_the_identities_and_private_keys() {
    let tmp = util::tempdir();
    let out = tmp.path().join("pki");
    let out_s = out.to_str().unwrap();
    let stdout = certgen(&[
        "--out",
        out_s,
        "--client",
        SPIFFE,
        "--client",
        "edge=dns:edge.example.com",
        "--client",
        "cn:Legacy Proxy",
        "--server-san",
        "sds.example.com",
        "--server-san",
        "10.1.2.3",
        "--namespace",
        "infra",
    ]);
    assert!(!stdout.contains("PRIVATE KEY"), "keys are never printed:\n{stdout}");
    assert!(stdout.contains(SPIFFE) && stdout.contains("created") && stdout.contains("not after"), "{stdout}");

    let ca = out.join("ca");
    let server = out.join("server");
    let clients: Vec<PathBuf> = [LABEL, "edge", "legacy-proxy"].iter().map(|l| out.join("clients").join(l)).collect();
    assert_kubelet_layout(&ca, &CA_FILES);
    assert_kubelet_layout(&server, &SERVER_FILES);
    for dir in &clients {
        assert_kubelet_layout(dir, &CLIENT_FILES);
    }

    // Private keys (and the Envoy resource that holds one) are 0600, the rest 0644.
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
    assert_eq!(mode(&ca.join("ca.crt")), 0o644);
    assert_eq!(mode(&server.join("tls.key")), 0o600);
    assert_eq!(mode(&server.join("tls.crt")), 0o644);
    for dir in &clients {
        assert_eq!(mode(&dir.join("tls.key")), 0o600);
        assert_eq!(mode(&dir.join("envoy-sds-cert.yaml")), 0o600);
        assert_eq!(mode(&dir.join("envoy-sds-ca.yaml")), 0o644);
    }

    // The CA: a CA for signing certificates and CRLs only, one in the bundle.
    let ca_crt = ca.join("ca.crt");
    let ca_ext = x509_ext(&ca_crt, "basicConstraints,keyUsage");
    assert!(ca_ext.contains("CA:TRUE") && ca_ext.contains("Certificate Sign, CRL Sign"), "{ca_ext}");
    assert_eq!(certs_of(&read(&ca_crt)).len(), 1);
    // Every ca.crt is the same bundle.
    for dir in std::iter::once(&server).chain(&clients) {
        assert_eq!(read(&dir.join("ca.crt")), read(&ca_crt), "{}", dir.display());
    }

    // The server certificate: for TLS servers only, with the extra and default names.
    let server_crt = server.join("tls.crt");
    assert!(verifies(&ca_crt, &server_crt, Some("sslserver")));
    assert!(!verifies(&ca_crt, &server_crt, Some("sslclient")), "the server certificate is not a client one");
    let sans = x509_ext(&server_crt, "subjectAltName");
    for name in [
        "DNS:sds.example.com",
        "IP Address:10.1.2.3",
        "DNS:certwire,",
        "DNS:certwire.infra,",
        "DNS:certwire.infra.svc,",
        "DNS:certwire.infra.svc.cluster.local",
        "DNS:localhost",
        "IP Address:127.0.0.1",
    ] {
        assert!(sans.contains(name), "{name} missing in {sans}");
    }
    assert!(x509_ext(&server_crt, "basicConstraints").contains("CA:FALSE"));

    // Clients: for TLS clients only; the identity where certwire looks for it.
    for dir in &clients {
        let crt = dir.join("tls.crt");
        assert!(verifies(&ca_crt, &crt, Some("sslclient")), "{}", crt.display());
        assert!(!verifies(&ca_crt, &crt, Some("sslserver")), "{} is not a server certificate", crt.display());
    }
    assert!(x509_ext(&clients[0].join("tls.crt"), "subjectAltName").contains(&format!("URI:{SPIFFE}")));
    assert!(x509_ext(&clients[1].join("tls.crt"), "subjectAltName").contains("DNS:edge.example.com"));
    let legacy = clients[2].join("tls.crt");
    assert!(!x509_ext(&legacy, "subjectAltName").contains("Subject Alternative Name"), "cn: has no SAN");
    assert!(subject(&legacy).contains("CN=Legacy Proxy"), "{}", subject(&legacy));

    // certwire itself accepts what certgen wrote.
    for dir in std::iter::once(&server).chain(&clients) {
        let (ok, stdout, stderr) = certwire(&["check", dir.to_str().unwrap()]);
        assert!(ok, "certwire check {}:\n{stdout}{stderr}", dir.display());
    }

    // The Envoy resources hold the same certificate, key and bundle.
    let resource = read(&clients[0].join("envoy-sds-cert.yaml"));
    let first_line = read(&clients[0].join("tls.crt")).lines().nth(1).unwrap().to_owned();
    assert!(resource.contains("  name: certwire-client\n") && resource.contains(&first_line), "{resource}");
    assert!(resource.contains("BEGIN PRIVATE KEY"));
    let ca_resource = read(&clients[0].join("envoy-sds-ca.yaml"));
    assert!(ca_resource.contains("  name: certwire-ca\n") && ca_resource.contains("trusted_ca"));
}

#[test]
fn re_runs_rotate_the_leaves_and_keep_the_ca_until_it_is_rotated_with_an_overlap() {
    let tmp = util::tempdir();
    let out = tmp.path().join("pki");
    let args = ["--out", out.to_str().unwrap(), "--client", SPIFFE];
    certgen(&args);
    let ca_dir = out.join("ca");
    let client = out.join("clients").join(LABEL);
    let server = out.join("server");
    let ca1 = read(&ca_dir.join("ca.crt"));
    let ca1_key = read(&ca_dir.join("ca.key"));
    let ca1_payload = assert_kubelet_layout(&ca_dir, &CA_FILES);
    let client1_payload = assert_kubelet_layout(&client, &CLIENT_FILES);
    let client1 = read(&client.join("tls.crt"));
    let client1_key = read(&client.join("tls.key"));
    let server1_serial = serial_of(&server.join("tls.crt"));
    // Kept for later: a proxy that has not picked up a new certificate yet.
    let old_client = tmp.path().join("old-client.crt");
    std::fs::write(&old_client, &client1).unwrap();

    // A plain re-run: new leaves and keys, the same CA (not even rewritten).
    let stdout = certgen(&args);
    assert!(stdout.contains("reused") && stdout.contains("(unchanged)"), "{stdout}");
    assert_eq!(read(&ca_dir.join("ca.crt")), ca1);
    assert_eq!(read(&ca_dir.join("ca.key")), ca1_key);
    assert_eq!(assert_kubelet_layout(&ca_dir, &CA_FILES), ca1_payload);
    let client2_payload = assert_kubelet_layout(&client, &CLIENT_FILES);
    assert_ne!(client2_payload, client1_payload, "a new payload directory, the old one removed");
    assert_ne!(read(&client.join("tls.crt")), client1);
    assert_ne!(read(&client.join("tls.key")), client1_key);
    assert_ne!(serial_of(&server.join("tls.crt")), server1_serial);
    assert!(verifies(&ca_dir.join("ca.crt"), &client.join("tls.crt"), Some("sslclient")));

    // --rotate-ca: a new CA first in every bundle, the old one after it, so certificates
    // the old CA issued stay valid until their holders have new ones.
    let stdout = certgen(&[&args[..], &["--rotate-ca"]].concat());
    assert!(stdout.contains("rotated") && stdout.contains("2 CAs"), "{stdout}");
    let bundle = read(&ca_dir.join("ca.crt"));
    let certs = certs_of(&bundle);
    assert_eq!(certs.len(), 2, "{bundle}");
    assert_ne!(certs[0], certs_of(&ca1)[0], "a new CA first");
    assert_eq!(certs[1], certs_of(&ca1)[0], "the old CA after it");
    assert_ne!(read(&ca_dir.join("ca.key")), ca1_key);
    for dir in [&server, &client] {
        assert_eq!(read(&dir.join("ca.crt")), bundle, "{}", dir.display());
    }
    let new_ca_only = tmp.path().join("new-ca.crt");
    std::fs::write(&new_ca_only, pem_of(&certs[0])).unwrap();
    assert!(verifies(&new_ca_only, &client.join("tls.crt"), Some("sslclient")), "issued by the new CA");
    assert!(verifies(&new_ca_only, &server.join("tls.crt"), Some("sslserver")), "issued by the new CA");
    assert!(verifies(&server.join("ca.crt"), &old_client, Some("sslclient")), "old client still trusted");

    // A plain re-run keeps the overlap; --drop-old-ca ends it.
    certgen(&args);
    assert_eq!(certs_of(&read(&ca_dir.join("ca.crt"))).len(), 2);
    let stdout = certgen(&[&args[..], &["--drop-old-ca"]].concat());
    assert!(stdout.contains("1 old CA(s) dropped"), "{stdout}");
    assert_eq!(certs_of(&read(&ca_dir.join("ca.crt"))), vec![certs[0].clone()]);
    assert_eq!(read(&server.join("ca.crt")), read(&ca_dir.join("ca.crt")));
    assert!(!verifies(&server.join("ca.crt"), &old_client, None), "the old CA is no longer trusted");
}

fn pem_of(der: &[u8]) -> String {
    let b64 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(der)
    };
    let body: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", body.join("\n"))
}

#[test]
fn bad_arguments_are_refused_with_the_reason() {
    let tmp = util::tempdir();
    let out = tmp.path().join("pki");
    let out = out.to_str().unwrap();
    let err = certgen_fails(&["--client", SPIFFE]);
    assert!(err.contains("--out") && err.contains("--kubernetes-namespace"), "{err}");
    let err = certgen_fails(&["--out", out, "--client", "ingress"]);
    assert!(err.contains("spiffe://"), "{err}");
    let err = certgen_fails(&["--out", out, "--client", "spiffe://cluster.local/ns/../sa/x"]);
    assert!(err.contains("SPIFFE"), "{err}");
    let err = certgen_fails(&["--out", out, "--client", "Bad_Label=cn:x"]);
    assert!(err.contains("label"), "{err}");
    let err = certgen_fails(&["--out", out, "--client", "cn:gw ingress", "--client", "dns:gw-ingress"]);
    assert!(err.contains("LABEL=ID"), "{err}");
    let err = certgen_fails(&["--out", out, "--validity", "soon"]);
    assert!(err.contains("--validity"), "{err}");
    assert!(!Path::new(out).exists(), "nothing written on a refused command line");
    // A CA directory with a certificate and no key is not silently replaced.
    certgen(&["--out", out]);
    std::fs::remove_file(Path::new(out).join("ca/ca.key")).unwrap();
    let err = certgen_fails(&["--out", out]);
    assert!(err.contains("ca.key"), "{err}");
}

// ---------------------------------------------------------------------------------
// Envoy
// ---------------------------------------------------------------------------------

/// What a TLS server saw of one connection attempt.
#[derive(Debug)]
struct Handshake {
    sni: Option<String>,
    alpn: Option<Vec<u8>>,
    client_serial: String,
    client_uri: Option<String>,
}

/// A stand-in for certwire's TLS listener: certgen's server certificate, client
/// certificates required and checked against certgen's bundle. Every attempt's
/// outcome goes to the returned channel; the connection is then dropped.
async fn mtls_server(server_dir: &Path) -> (SocketAddr, mpsc::UnboundedReceiver<Result<Handshake, String>>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(server_dir.join("ca.crt")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().unwrap();
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(server_dir.join("tls.crt")).unwrap().map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_file(server_dir.join("tls.key")).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let outcome = match acceptor.accept(tcp).await {
                Ok(tls) => {
                    let (_, conn) = tls.get_ref();
                    let leaf = conn.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default();
                    Ok(Handshake {
                        sni: conn.server_name().map(str::to_owned),
                        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                        client_serial: pki::serial_hex(&leaf),
                        client_uri: uri_san(&leaf),
                    })
                }
                Err(err) => Err(err.to_string()),
            };
            if tx.send(outcome).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

fn uri_san(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
        _ => None,
    })
}

/// `certwire bootstrap` for an Envoy whose SDS cluster is `sds` over mutual TLS with
/// the client directory `dir`; checked with `envoy --mode validate`.
fn tls_bootstrap(sds: SocketAddr, dir: &Path, extra: &[&str]) -> String {
    let sds = sds.to_string();
    let args = [
        &["bootstrap", "--sds", &sds, "--sds-tls-dir", dir.to_str().unwrap()][..],
        &["--admin-port", "0", "--listen-address", "127.0.0.1", "--listen-port", "0"],
        extra,
    ]
    .concat();
    let (ok, yaml, stderr) = certwire(&args);
    assert!(ok, "certwire {args:?}: {stderr}");
    envoy::validate(&yaml).unwrap_or_else(|err| panic!("Envoy refuses the bootstrap:\n{err}"));
    yaml
}

#[tokio::test]
async fn envoy_connects_with_the_client_certificate_and_reloads_it_after_a_re_run() {
    let tmp = util::tempdir();
    let out = tmp.path().join("pki");
    let args = ["--out", out.to_str().unwrap(), "--client", SPIFFE];
    certgen(&args);
    let client_dir = out.join("clients").join(LABEL);
    let (addr, mut seen) = mtls_server(&out.join("server")).await;

    let yaml = tls_bootstrap(addr, &client_dir, &[]);
    // Not an IP address, so the default server name; what certgen always includes.
    assert!(yaml.contains("sni: \"localhost\"") && yaml.contains("exact: \"localhost\""), "{yaml}");
    let envoy = Envoy::start(&yaml).await;

    let first_serial = serial_of(&client_dir.join("tls.crt"));
    let handshake = tokio::time::timeout(WAIT, seen.recv())
        .await
        .expect("Envoy connected to the SDS address")
        .expect("server running")
        .unwrap_or_else(|err| panic!("Envoy's handshake failed on the server: {err}"));
    // The server's handshake ends with the client's last flight, which Envoy sends only
    // after accepting the server's certificate and name (TLS 1.2 and 1.3 alike).
    assert_eq!(handshake.sni.as_deref(), Some("localhost"));
    assert_eq!(handshake.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(handshake.client_serial, first_serial);
    assert_eq!(handshake.client_uri.as_deref(), Some(SPIFFE));

    // certgen again: Envoy picks up the new client certificate from the ..data swap.
    certgen(&args);
    let second_serial = serial_of(&client_dir.join("tls.crt"));
    assert_ne!(second_serial, first_serial);
    let envoy = &envoy;
    let (first, second) = (&first_serial, &second_serial);
    util::wait_for("Envoy to load the re-issued client certificate", WAIT, || async move {
        let serials = envoy.served_serials().await;
        (serials.contains(second) && !serials.contains(first)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn envoy_refuses_a_server_whose_certificate_lacks_the_expected_name() {
    let tmp = util::tempdir();
    let out = tmp.path().join("pki");
    certgen(&["--out", out.to_str().unwrap(), "--client", SPIFFE]);
    let (addr, mut seen) = mtls_server(&out.join("server")).await;
    let yaml = tls_bootstrap(addr, &out.join("clients").join(LABEL), &["--sds-server-name", "sds.elsewhere.test"]);
    assert!(yaml.contains("exact: \"sds.elsewhere.test\""), "{yaml}");
    let _envoy = Envoy::start(&yaml).await;
    let first = tokio::time::timeout(WAIT, seen.recv()).await.expect("Envoy tried to connect").expect("server running");
    assert!(first.is_err(), "Envoy accepted a certificate without sds.elsewhere.test: {first:?}");
    let held = tokio::time::timeout(HOLD, async {
        while let Some(outcome) = seen.recv().await {
            if outcome.is_ok() {
                return outcome;
            }
        }
        Err("server stopped".into())
    })
    .await;
    assert!(held.is_err(), "a handshake succeeded: {held:?}");
}

#[test]
fn bootstrap_server_name_defaults_and_ip_names() {
    let tmp = util::tempdir();
    let out = tmp.path().join("pki");
    certgen(&["--out", out.to_str().unwrap(), "--client", SPIFFE]);
    let dir = out.join("clients").join(LABEL);
    let dir = dir.to_str().unwrap();
    let render = |extra: &[&str]| {
        let (ok, yaml, stderr) = certwire(&[&["bootstrap", "--sds-tls-dir", dir][..], extra].concat());
        assert!(ok, "{stderr}");
        envoy::validate(&yaml).unwrap_or_else(|err| panic!("Envoy refuses the bootstrap:\n{err}"));
        yaml
    };
    let dns = render(&["--sds", "certwire.infra.svc:18000"]);
    assert!(dns.contains("sni: \"certwire.infra.svc\"") && dns.contains("exact: \"certwire.infra.svc\""), "{dns}");
    assert!(dns.contains(&format!("path: \"{dir}/envoy-sds-cert.yaml\"")), "{dns}");
    let uds = render(&["--sds", "unix:/run/certwire/sds.sock", "--delta"]);
    assert!(uds.contains("sni: \"localhost\""), "{uds}");
    let ip = render(&["--sds", "10.0.0.5:18000", "--sds-server-name", "10.0.0.5", "--mtls"]);
    assert!(ip.contains("san_type: IP_ADDRESS") && !ip.contains("sni:"), "{ip}");
    // Without the flag, the output is what it always was.
    let (_, plain, _) = certwire(&["bootstrap"]);
    assert!(!plain.contains("UpstreamTlsContext") && !plain.contains("--sds-tls-dir"), "{plain}");
    let (ok, _, err) = certwire(&["bootstrap", "--sds-server-name", "x"]);
    assert!(!ok && err.contains("--sds-tls-dir"), "{err}");
}

// ---------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------

const NS: &str = "certwire";

fn secret(api: &KubeApi, name: &str) -> Value {
    api.get_object("v1", "Secret", NS, name).unwrap_or_else(|| panic!("no Secret {NS}/{name}"))
}

fn data(secret: &Value, key: &str) -> String {
    String::from_utf8(kubeapi::secret_data(secret, key).unwrap_or_else(|| panic!("no {key} in {secret:#}"))).unwrap()
}

fn keys(secret: &Value) -> Vec<String> {
    let mut keys: Vec<String> = secret["data"].as_object().map(|d| d.keys().cloned().collect()).unwrap_or_default();
    keys.sort();
    keys
}

#[tokio::test]
async fn kubernetes_secrets_are_written_reused_and_rotated() {
    let api = KubeApi::start().await;
    api.create_namespace(NS);
    let tmp = util::tempdir();
    let kubeconfig = api.kubeconfig(tmp.path());
    let kc = kubeconfig.to_str().unwrap();
    let args = ["--kubernetes-namespace", NS, "--kubeconfig", kc, "--client", SPIFFE];
    let stdout = certgen(&args);
    assert!(stdout.contains("applied Secret certwire/certwire-client-gw.ingress"), "{stdout}");

    let ca = secret(&api, "certwire-ca");
    let server = secret(&api, "certwire-server");
    let client = secret(&api, "certwire-client-gw.ingress");
    for s in [&ca, &server, &client] {
        assert_eq!(s["type"], "kubernetes.io/tls", "{s:#}");
        assert_eq!(s["metadata"]["labels"]["app.kubernetes.io/managed-by"], "certwire-certgen");
    }
    assert_eq!(keys(&ca), ["ca.crt", "tls.crt", "tls.key"]);
    assert_eq!(keys(&server), ["ca.crt", "tls.crt", "tls.key"]);
    assert_eq!(keys(&client), ["ca.crt", "envoy-sds-ca.yaml", "envoy-sds-cert.yaml", "tls.crt", "tls.key"]);
    assert_eq!(data(&ca, "ca.crt"), data(&ca, "tls.crt"));
    assert_eq!(data(&server, "ca.crt"), data(&ca, "ca.crt"));

    // The real kubectl sees them, and what they hold verifies with openssl.
    let listed = kubeapi::kubectl_ok(&kubeconfig, &["get", "secrets", "-n", NS, "-o", "name"]).await;
    for name in ["secret/certwire-ca", "secret/certwire-server", "secret/certwire-client-gw.ingress"] {
        assert!(listed.contains(name), "{listed}");
    }
    let files = tmp.path().join("from-secrets");
    std::fs::create_dir(&files).unwrap();
    let write = |name: &str, text: String| {
        let path = files.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let bundle = write("ca.crt", data(&ca, "ca.crt"));
    assert!(verifies(&bundle, &write("server.crt", data(&server, "tls.crt")), Some("sslserver")));
    let client_crt = write("client.crt", data(&client, "tls.crt"));
    assert!(verifies(&bundle, &client_crt, Some("sslclient")));
    assert!(x509_ext(&client_crt, "subjectAltName").contains(&format!("URI:{SPIFFE}")));

    // Again: the CA Secret is read back and left alone, the leaves are re-issued.
    let stdout = certgen(&args);
    assert!(stdout.contains("reused") && stdout.contains("certwire-ca (unchanged)"), "{stdout}");
    let ca_again = secret(&api, "certwire-ca");
    assert_eq!(ca_again["metadata"]["resourceVersion"], ca["metadata"]["resourceVersion"]);
    assert_ne!(data(&secret(&api, "certwire-server"), "tls.crt"), data(&server, "tls.crt"));
    assert_ne!(data(&secret(&api, "certwire-client-gw.ingress"), "tls.key"), data(&client, "tls.key"));

    // Files and Secrets together: the cluster's CA is written to the files too.
    let out = tmp.path().join("pki");
    certgen(&[&args[..], &["--out", out.to_str().unwrap()]].concat());
    assert_eq!(read(&out.join("ca/ca.crt")), data(&ca, "ca.crt"));
    assert_eq!(
        read(&out.join("clients").join(LABEL).join("tls.crt")),
        data(&secret(&api, "certwire-client-gw.ingress"), "tls.crt")
    );
    // ...but two different CAs are never merged silently.
    let other = tmp.path().join("other");
    certgen(&["--out", other.to_str().unwrap()]);
    let err = certgen_fails(&[&args[..], &["--out", other.to_str().unwrap()]].concat());
    assert!(err.contains("two different CAs"), "{err}");

    // --rotate-ca: a new CA in tls.crt, the bundle new-then-old everywhere.
    certgen(&[&args[..], &["--rotate-ca"]].concat());
    let rotated = secret(&api, "certwire-ca");
    let bundle = certs_of(&data(&rotated, "ca.crt"));
    assert_eq!(bundle.len(), 2);
    assert_eq!(bundle[0], certs_of(&data(&rotated, "tls.crt"))[0]);
    assert_eq!(bundle[1], certs_of(&data(&ca, "tls.crt"))[0]);
    assert_eq!(data(&secret(&api, "certwire-client-gw.ingress"), "ca.crt"), data(&rotated, "ca.crt"));
}

#[test]
fn a_missing_namespace_is_an_error_not_a_hang() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let api = rt.block_on(KubeApi::start());
    let tmp = util::tempdir();
    let kubeconfig = api.kubeconfig(tmp.path());
    let err = certgen_fails(&["--kubernetes-namespace", "nowhere", "--kubeconfig", kubeconfig.to_str().unwrap()]);
    assert!(err.contains("nowhere"), "{err}");
}
