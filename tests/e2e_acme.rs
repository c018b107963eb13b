//! The ACME source end to end: certwire (a child process) orders from acme2certifier
//! on loopback, answers challenges over RFC 2136 (knot on 127.0.0.1:53, TSIG),
//! http-01 on 127.0.0.1:80 and tls-alpn-01 on 127.0.0.1:443, and serves what it got
//! over SDS, where a real Envoy picks it up by name.
//!
//! These tests bind ports 53, 80 and 443 and run one at a time (nextest group
//! `acme`). Lifetimes are minutes and retry bases seconds, so renewals and backoff
//! happen within the test; nothing asserts on durations beyond generous bounds.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use certwire::sources::acme::dns::DnsProvider;
use certwire::sources::acme::dns::rfc2136::Rfc2136;
use common::acme::ca::{AcmeCa, AcmeCaOptions};
use common::acme::dns::{Knot, ZONE};
use common::bootstrap::{SdsBootstrap, SdsTarget};
use common::certwire::Certwire;
use common::envoy::Envoy;
use common::kubeapi::{self, KubeApi};
use common::pki;
use common::tls::{handshake, wait_served_serial};
use common::util::{self, WAIT};
use serde_json::Value;
use tempfile::TempDir;

/// How long a certificate may take to be issued: account, order, challenge, DNS.
const ISSUE_WAIT: Duration = Duration::from_secs(60);

/// knot, the CA and a work directory.
struct Env {
    dir: TempDir,
    knot: Knot,
    ca: AcmeCa,
}

async fn env(options: AcmeCaOptions) -> Env {
    let dir = util::tempdir();
    let knot = Knot::start(dir.path()).await;
    let ca = AcmeCa::start(dir.path(), options).await;
    Env { dir, knot, ca }
}

/// One `[[acme.certificates]]` entry.
struct Cert {
    name: &'static str,
    domains: Vec<String>,
    challenge: &'static str,
    extra: &'static str,
}

impl Cert {
    fn new(name: &'static str, domains: &[&str], challenge: &'static str) -> Cert {
        Cert { name, domains: domains.iter().map(|d| d.to_string()).collect(), challenge, extra: "" }
    }

    fn with(mut self, extra: &'static str) -> Cert {
        self.extra = extra;
        self
    }
}

/// Knobs of the `[acme]` table that tests change.
struct Acme<'a> {
    state_dir: PathBuf,
    eab: bool,
    tsig_secret: Option<&'a str>,
    http01_listen: &'a str,
    retry_base: &'a str,
    retry_max: &'a str,
    /// More `[acme]` keys (the Kubernetes store, the Lease).
    extra: String,
}

impl Env {
    fn acme(&self, state: &str) -> Acme<'static> {
        Acme {
            state_dir: self.dir.path().join(state),
            eab: self.ca.eab().is_some(),
            tsig_secret: None,
            http01_listen: "127.0.0.1:80",
            retry_base: "1s",
            retry_max: "4s",
            extra: String::new(),
        }
    }

    /// Writes certwire's config file and returns its path.
    fn config(&self, acme: &Acme, certs: &[Cert]) -> PathBuf {
        let tsig = self.knot.tsig();
        let mut text = format!(
            r#"[acme]
directory = "{directory}"
insecure_http_directory = true
contact = ["test@certwire.test"]
state_dir = "{state}"
retry_base = "{retry_base}"
retry_max = "{retry_max}"
http01_listen = "{http01}"
tls_alpn01_listen = "127.0.0.1:443"
dns_propagation_timeout = "20s"
{extra}
[[acme.rfc2136]]
server = "127.0.0.1:53"
zone = "{ZONE}"
tsig_key_name = "{key}"
tsig_algorithm = "{alg}"
tsig_secret = "{secret}"
"#,
            directory = self.ca.directory_url(),
            state = acme.state_dir.display(),
            retry_base = acme.retry_base,
            retry_max = acme.retry_max,
            http01 = acme.http01_listen,
            key = tsig.name,
            alg = tsig.algorithm,
            secret = acme.tsig_secret.unwrap_or(&tsig.secret),
            extra = acme.extra,
        );
        if acme.eab {
            let eab = self.ca.eab().expect("the CA has an EAB credential");
            text.push_str(&format!("\n[acme.eab]\nkid = \"{}\"\nhmac_key = \"{}\"\n", eab.kid, eab.hmac_key));
        }
        for cert in certs {
            let domains: Vec<String> = cert.domains.iter().map(|d| format!("\"{d}\"")).collect();
            text.push_str(&format!(
                "\n[[acme.certificates]]\nname = \"{}\"\ndomains = [{}]\nchallenge = \"{}\"\n{}\n",
                cert.name,
                domains.join(", "),
                cert.challenge,
                cert.extra
            ));
        }
        let path = acme.state_dir.with_extension("toml");
        std::fs::write(&path, text).expect("write certwire config");
        path
    }
}

/// certwire serving SDS on a free port with `config`.
async fn certwire(config: &Path) -> (Certwire, SocketAddr) {
    let certwire = Certwire::serve([
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--config".into(),
        config.display().to_string(),
    ])
    .await;
    let sds = certwire.sds_addr();
    (certwire, sds)
}

fn domain(host: &str) -> String {
    format!("{host}.{ZONE}")
}

/// Lowercase hex without separators.
fn normalize_hex(text: &str) -> String {
    text.chars().filter(char::is_ascii_hexdigit).collect::<String>().to_lowercase()
}

/// The serial certwire serves for `name`, once it serves one other than `not`.
async fn wait_serial(certwire: &Certwire, name: &str, not: Option<&str>, timeout: Duration) -> String {
    let what = format!("certwire serves {name} (other than {not:?})");
    util::wait_for(&what, timeout, move || async move {
        let status = certwire.secret_status(name).await?;
        let serial = normalize_hex(status["serial"].as_str()?);
        (Some(serial.as_str()) != not).then_some(serial)
    })
    .await
}

/// Waits until `state_dir/NAME/tls.crt`'s leaf has `serial`: certwire serves a new
/// certificate first and stores it right after, so the file may lag what is served.
async fn wait_stored(state_dir: &Path, name: &str, serial: &str, why: &str) {
    let path = state_dir.join(name).join("tls.crt");
    let stored = || std::fs::read_to_string(&path).ok().map(|pem| pki::serial_hex_of_pem(&pem));
    let found = util::poll_until(WAIT, || async { (stored().as_deref() == Some(serial)).then_some(()) }).await;
    assert!(found.is_some(), "{why}: {} holds {:?}, not serial {serial}", path.display(), stored());
}

async fn orders(certwire: &Certwire, name: &str, result: &str) -> f64 {
    certwire.metric_sum("certwire_acme_orders_total", &[("certificate", name), ("result", result)]).await
}

async fn wait_orders(certwire: &Certwire, name: &str, result: &str, at_least: f64, timeout: Duration) -> f64 {
    let what = format!("certwire_acme_orders_total{{certificate={name},result={result}}} >= {at_least}");
    util::wait_for(&what, timeout, move || async move {
        let n = orders(certwire, name, result).await;
        (n >= at_least).then_some(n)
    })
    .await
}

fn log_of(certwire: &Certwire) -> String {
    std::fs::read_to_string(certwire.log_path()).expect("read certwire log")
}

/// The SAN DNS names of the PEM's first certificate, sorted.
fn dns_names(pem: &str) -> Vec<String> {
    let der = pki::pem_decode_first(pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse leaf");
    let san = cert.subject_alternative_name().expect("SAN").expect("SAN present");
    let mut names: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect();
    names.sort();
    names
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64()
}

#[tokio::test]
async fn rfc2136_updates_from_certwire_are_taken_by_knot() {
    let dir = util::tempdir();
    let knot = Knot::start(dir.path()).await;
    let tsig = knot.tsig();
    let provider = Rfc2136::new(knot.addr(), ZONE, &tsig.name, &tsig.algorithm, &tsig.secret).expect("provider");
    let name = format!("_acme-challenge.rfc.{ZONE}");

    provider.add_txt(&name, "first").await.expect("signed add accepted");
    provider.add_txt(&name, "second").await.expect("a second value is added, not replaced");
    let mut records = knot.txt(&name).await;
    records.sort();
    assert_eq!(records, ["first", "second"]);

    provider.remove_txt(&name, "first").await.expect("signed delete accepted");
    assert_eq!(knot.txt(&name).await, ["second"], "only that value is removed");
    provider.remove_txt(&name, "second").await.expect("signed delete accepted");
    assert_eq!(knot.txt(&name).await, Vec::<String>::new());

    // The servers to check: the update server, and the zone's NS (the same knot).
    let servers = provider.authoritative_servers().await.expect("NS lookup");
    assert_eq!(servers, [knot.addr()]);

    // Another secret: knot refuses, and certwire says so.
    let wrong = Rfc2136::new(
        knot.addr(),
        ZONE,
        &tsig.name,
        &tsig.algorithm,
        "c2VjcmV0IHRoYXQga25vdCBkb2VzIG5vdCBrbm93IGF0IGFsbCEh",
    )
    .unwrap();
    let err = wrong.add_txt(&name, "forged").await.expect_err("a wrong secret is refused").to_string();
    assert!(err.contains("Not authorized") && err.contains("BadSig"), "{err}");
    assert_eq!(knot.txt(&name).await, Vec::<String>::new(), "nothing published");
}

#[tokio::test]
async fn dns01_wildcard_is_issued_served_to_envoy_and_reloaded_after_restart() {
    let env = env(AcmeCaOptions::default()).await;
    let acme = env.acme("state");
    let wild = Cert::new("wild", &[&domain("app"), &format!("*.{}", domain("app"))], "dns-01");
    let config = env.config(&acme, &[wild]);
    let (mut certwire, sds) = certwire(&config).await;

    let serial = wait_serial(&certwire, "wild", None, ISSUE_WAIT).await;
    wait_stored(&acme.state_dir, "wild", &serial, "the served certificate is the stored one").await;
    let chain = std::fs::read_to_string(acme.state_dir.join("wild/tls.crt")).unwrap();
    assert_eq!(dns_names(&chain), [format!("*.{}", domain("app")), domain("app")]);
    let cacert = certwire.secret_status("wild-cacert").await.expect("the issuer chain is served as NAME-cacert");
    assert_eq!(cacert["kind"], "validation_context", "{cacert}");
    let ca_crt = std::fs::read_to_string(acme.state_dir.join("wild/ca.crt")).unwrap();
    assert_eq!(ca_crt.trim(), env.ca.ca_cert_pem().trim(), "ca.crt is the issuer chain");

    // The challenge records are gone again.
    assert_eq!(env.knot.txt(&format!("_acme-challenge.{}", domain("app"))).await, Vec::<String>::new());
    // Private files are private.
    let key_mode = std::fs::metadata(acme.state_dir.join("wild/tls.key")).unwrap().mode() & 0o777;
    assert_eq!(key_mode, 0o600);
    let accounts: Vec<_> =
        std::fs::read_dir(acme.state_dir.join(".account")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(accounts.len(), 1, "{accounts:?}");
    assert_eq!(std::fs::metadata(&accounts[0]).unwrap().mode() & 0o777, 0o600);
    let log = log_of(&certwire);
    let account_json = std::fs::read_to_string(&accounts[0]).unwrap();
    let key: Value = serde_json::from_str(&account_json).unwrap();
    assert!(!log.contains(key["key_pkcs8"].as_str().unwrap()), "the account key is never logged");

    // Metrics: one order issued; the next renewal comes from the CA's ARI window
    // (85% to 100% of 90 days here), not the 2/3 default.
    assert_eq!(wait_orders(&certwire, "wild", "issued", 1.0, WAIT).await, 1.0);
    let next = certwire.metric_sum("certwire_acme_next_renewal_timestamp_seconds", &[("certificate", "wild")]).await;
    let day = 86400.0;
    assert!(next > unix_now() + 75.0 * day && next < unix_now() + 91.0 * day, "next renewal {next}");
    // Logged when the renewal is planned, which may come after the metric above.
    util::wait_for("the renewal time naming its basis (ARI window) in the log", WAIT, || async {
        log_of(&certwire).contains("ARI window").then_some(())
    })
    .await;

    // A real Envoy takes it by name, for any name under the wildcard.
    let envoy = Envoy::start(&SdsBootstrap::new("wild", SdsTarget::Tcp(sds), 0).to_yaml()).await;
    let tls_addr = envoy.listener_addr("wild");
    let served = wait_served_serial(tls_addr, &format!("x.{}", domain("app")), &serial, WAIT).await;
    assert_eq!(served.chain_len, 2, "leaf and issuer");

    // A restart serves the stored certificate at once and orders nothing.
    certwire.restart().await;
    assert_eq!(wait_serial(&certwire, "wild", None, WAIT).await, serial);
    util::holds_for(Duration::from_secs(3), || async {
        match orders(&certwire, "wild", "issued").await + orders(&certwire, "wild", "failed").await {
            0.0 => Ok(()),
            n => Err(format!("{n} orders after a restart with a valid stored certificate")),
        }
    })
    .await
    .unwrap();
    assert_eq!(std::fs::read_dir(env.ca.issued_dir()).unwrap().count(), 1, "the CA issued once");
    wait_served_serial(tls_addr, &domain("app"), &serial, WAIT).await;
    drop(envoy);
}

#[tokio::test]
async fn http01_is_answered_on_port_80() {
    let env = env(AcmeCaOptions::default()).await;
    let acme = env.acme("state");
    let config = env.config(&acme, &[Cert::new("web", &[&domain("web")], "http-01").with("key_type = \"ecdsa-p384\"")]);
    let (certwire, _) = certwire(&config).await;

    let serial = wait_serial(&certwire, "web", None, ISSUE_WAIT).await;
    // Served first, stored right after: read the state directory once it holds it.
    wait_stored(&acme.state_dir, "web", &serial, "stored as served").await;
    let chain = std::fs::read_to_string(acme.state_dir.join("web/tls.crt")).unwrap();
    assert_eq!(dns_names(&chain), [domain("web")]);
    let key = std::fs::read_to_string(acme.state_dir.join("web/tls.key")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8 key");
    let leaf_der = pki::pem_decode_first(&chain);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    let curve = leaf.public_key().algorithm.parameters.as_ref().unwrap().as_oid().unwrap().to_id_string();
    assert_eq!(curve, "1.3.132.0.34", "key_type = ecdsa-p384");
    assert!(log_of(&certwire).contains("ACME http-01 challenge fetched"), "the CA fetched the token");
}

#[tokio::test]
async fn rsa_keys_are_issued_on_request() {
    let env = env(AcmeCaOptions::default()).await;
    let acme = env.acme("state");
    let config = env.config(
        &acme,
        &[
            Cert::new("rsa2k", &[&domain("rsa2k")], "dns-01").with("key_type = \"rsa-2048\""),
            Cert::new("rsa3k", &[&domain("rsa3k")], "dns-01").with("key_type = \"rsa-3072\""),
        ],
    );
    let (certwire, _) = certwire(&config).await;
    for (name, bits) in [("rsa2k", 2048), ("rsa3k", 3072)] {
        let serial = wait_serial(&certwire, name, None, ISSUE_WAIT).await;
        wait_stored(&acme.state_dir, name, &serial, "stored as served").await;
        let chain = std::fs::read_to_string(acme.state_dir.join(format!("{name}/tls.crt"))).unwrap();
        let leaf_der = pki::pem_decode_first(&chain);
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
        let x509_parser::public_key::PublicKey::RSA(rsa) = leaf.public_key().parsed().unwrap() else {
            panic!("{name}: an RSA certificate")
        };
        assert_eq!(rsa.key_size(), bits, "{name}");
    }
}

#[tokio::test]
async fn tls_alpn01_is_answered_on_port_443() {
    let env = env(AcmeCaOptions::default()).await;
    let acme = env.acme("state");
    let config = env.config(&acme, &[Cert::new("alpn", &[&domain("alpn")], "tls-alpn-01")]);
    let (certwire, _) = certwire(&config).await;

    let serial = wait_serial(&certwire, "alpn", None, ISSUE_WAIT).await;
    wait_stored(&acme.state_dir, "alpn", &serial, "stored as served").await;
    let chain = std::fs::read_to_string(acme.state_dir.join("alpn/tls.crt")).unwrap();
    assert_eq!(dns_names(&chain), [domain("alpn")]);
    assert!(log_of(&certwire).contains("ACME tls-alpn-01 challenge presented"), "the CA shook hands");
    // An ordinary TLS client gets nothing from the responder.
    assert!(handshake("127.0.0.1:443".parse().unwrap(), &domain("alpn"), None).await.is_err());
}

#[tokio::test]
async fn short_lived_certificate_is_renewed_and_served_without_restart() {
    // 3-minute certificates; renew_before 150 s renews 30 s after issuance (the
    // ARI window, from 90%, starts later: the configured deadline wins).
    let options = AcmeCaOptions {
        cert_lifetime: Duration::from_secs(180),
        ari_window_start_percent: Some(90),
        ..Default::default()
    };
    let env = env(options).await;
    let acme = env.acme("state");
    let cert = Cert::new("short", &[&domain("short")], "dns-01").with("renew_before = \"150s\"");
    let config = env.config(&acme, &[cert]);
    let (certwire, sds) = certwire(&config).await;
    let first = wait_serial(&certwire, "short", None, ISSUE_WAIT).await;

    let envoy = Envoy::start(&SdsBootstrap::new("short", SdsTarget::Tcp(sds), 0).to_yaml()).await;
    let tls_addr = envoy.listener_addr("short");
    wait_served_serial(tls_addr, &domain("short"), &first, WAIT).await;
    let next = certwire.metric_sum("certwire_acme_next_renewal_timestamp_seconds", &[("certificate", "short")]).await;
    assert!(next < unix_now() + 40.0, "renewal planned within 30 s of issuance: {next} vs now {}", unix_now());

    let second = wait_serial(&certwire, "short", Some(&first), Duration::from_secs(90)).await;
    let served = wait_served_serial(tls_addr, &domain("short"), &second, WAIT).await;
    assert_eq!(served.http_status, 200);
    wait_stored(&acme.state_dir, "short", &second, "the renewal is stored too").await;
    assert_eq!(wait_orders(&certwire, "short", "issued", 2.0, WAIT).await, 2.0);
    assert_eq!(orders(&certwire, "short", "failed").await, 0.0);
    envoy.wait_stat_at_least("sds.short.update_success", 2, WAIT).await;
    assert_eq!(envoy.stat("sds.short.update_rejected").await, Some(0));
}

#[tokio::test]
async fn ca_down_during_renewal_backs_off_keeps_serving_and_recovers() {
    let options = AcmeCaOptions { cert_lifetime: Duration::from_secs(180), ari: false, ..Default::default() };
    let mut env = env(options).await;
    let acme = env.acme("state");
    let cert = Cert::new("down", &[&domain("down")], "dns-01").with("renew_before = \"160s\"");
    let config = env.config(&acme, &[cert]);
    let (certwire, _) = certwire(&config).await;
    let first = wait_serial(&certwire, "down", None, ISSUE_WAIT).await;

    // The renewal is due 20 s after issuance; the CA is gone by then.
    env.ca.stop();
    wait_orders(&certwire, "down", "failed", 3.0, Duration::from_secs(60)).await;
    // Backoff (1 s base, 4 s cap, jittered): a handful of tries, not a storm.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let failed = orders(&certwire, "down", "failed").await;
    assert!(failed <= 8.0, "{failed} failed orders in a few seconds: a retry storm");
    assert_eq!(wait_serial(&certwire, "down", None, WAIT).await, first, "the old certificate is still served");
    let status = certwire.secret_status("down").await.unwrap();
    let last_error = status["last_error"].as_str().unwrap_or_default();
    assert!(last_error.contains("ACME order failed"), "status shows the failure: {status}");
    let log = log_of(&certwire);
    assert!(log.contains("ACME order failed") && log.contains("Connection refused"), "the log says why");

    env.ca.restart().await;
    let second = wait_serial(&certwire, "down", Some(&first), Duration::from_secs(60)).await;
    wait_stored(&acme.state_dir, "down", &second, "stored as served").await;
    let status = certwire.secret_status("down").await.unwrap();
    assert!(status["last_error"].is_null(), "a success clears the error: {status}");
}

#[tokio::test]
async fn failed_challenges_are_clear_and_nothing_is_served() {
    let env = env(AcmeCaOptions::default()).await;
    let mut acme = env.acme("state");
    // dns-01 with a TSIG secret knot does not know: the update is refused.
    acme.tsig_secret = Some("c2VjcmV0IHRoYXQga25vdCBkb2VzIG5vdCBrbm93IGF0IGFsbCEh");
    // http-01 answered on 8080 while the CA asks port 80: the CA fails the challenge.
    acme.http01_listen = "127.0.0.1:8080";
    acme.retry_base = "1m";
    acme.retry_max = "1h";
    let certs =
        [Cert::new("badtsig", &[&domain("badtsig")], "dns-01"), Cert::new("badhttp", &[&domain("badhttp")], "http-01")];
    let config = env.config(&acme, &certs);
    let (certwire, _) = certwire(&config).await;

    wait_orders(&certwire, "badtsig", "failed", 1.0, ISSUE_WAIT).await;
    wait_orders(&certwire, "badhttp", "failed", 1.0, ISSUE_WAIT).await;

    let status = certwire.secret_status("badtsig").await.expect("the failure is listed");
    let error = status["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("challenge-publish") && error.contains("Not authorized"), "{status}");
    assert!(status["version"].is_null(), "nothing served: {status}");

    let status = certwire.secret_status("badhttp").await.expect("the failure is listed");
    let error = status["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("challenge-validation") && error.contains("http-01 challenge Invalid"),
        "the CA's refusal, read from the authorization: {status}"
    );
    assert!(status["version"].is_null(), "nothing served: {status}");

    assert_eq!(std::fs::read_dir(env.ca.issued_dir()).unwrap().count(), 0, "the CA issued nothing");
    assert!(!acme.state_dir.join("badtsig/tls.crt").exists());
    let log = log_of(&certwire);
    let line = log.lines().find(|l| l.contains("ACME order failed") && l.contains("badtsig")).expect("an error line");
    assert!(line.contains("challenge-publish") && line.contains("ERROR"), "{line}");
}

#[tokio::test]
async fn eab_only_ca_needs_the_binding() {
    let options = AcmeCaOptions { eab: true, ari: false, ..Default::default() };
    let env = env(options).await;

    // Without the binding: the account step fails with the CA's reason.
    let mut acme = env.acme("plain");
    acme.eab = false;
    acme.retry_base = "1m";
    acme.retry_max = "1h";
    let config = env.config(&acme, &[Cert::new("eab", &[&domain("eab")], "dns-01")]);
    let (certwire_plain, _) = certwire(&config).await;
    wait_orders(&certwire_plain, "eab", "failed", 1.0, ISSUE_WAIT).await;
    let status = certwire_plain.secret_status("eab").await.unwrap();
    assert!(status["last_error"].as_str().unwrap_or_default().contains("externalAccountRequired"), "{status}");
    drop(certwire_plain);

    // With it: issued.
    let acme = env.acme("bound");
    let config = env.config(&acme, &[Cert::new("eab", &[&domain("eab")], "dns-01")]);
    let (certwire, _) = certwire(&config).await;
    let serial = wait_serial(&certwire, "eab", None, ISSUE_WAIT).await;
    wait_stored(&acme.state_dir, "eab", &serial, "stored as served").await;
}

/// The namespace of the ACME Secrets and Lease in the Kubernetes tests.
const ACME_NS: &str = "acme";

/// An emulated API server with the `acme` namespace, and the `[acme]` keys that
/// store into it (plus `lease` when given).
async fn kube_store(env: &Env, lease: Option<&str>) -> (KubeApi, String) {
    let api = KubeApi::start().await;
    api.create_namespace(ACME_NS);
    let kubeconfig = api.kubeconfig(env.dir.path());
    let mut extra = format!("kubernetes_secret_namespace = \"{ACME_NS}\"\nkubeconfig = \"{}\"\n", kubeconfig.display());
    if let Some(lease) = lease {
        extra.push_str(&format!("lease = {lease}\n"));
    }
    (api, extra)
}

/// A data key of a Secret object as the API returns it, decoded.
fn secret_data(secret: &Value, key: &str) -> Option<String> {
    use base64::Engine;
    let text = secret["data"][key].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(text).expect("Secret data is base64");
    Some(String::from_utf8(bytes).expect("PEM is UTF-8"))
}

fn get_secret(api: &KubeApi, name: &str) -> Option<Value> {
    api.get_object("v1", "Secret", ACME_NS, name)
}

/// The serial in the certificate Secret `name`, once it is there and other than `not`.
async fn wait_secret_serial(api: &KubeApi, name: &str, not: Option<&str>, timeout: Duration) -> String {
    let what = format!("Secret {ACME_NS}/{name} holds a certificate other than {not:?}");
    util::wait_for(&what, timeout, move || async move {
        let serial = pki::serial_hex_of_pem(&secret_data(&get_secret(api, name)?, "tls.crt")?);
        (Some(serial.as_str()) != not).then_some(serial)
    })
    .await
}

/// The certificate orders a replica made, whatever their result.
async fn all_orders(certwire: &Certwire, name: &str) -> f64 {
    orders(certwire, name, "issued").await + orders(certwire, name, "failed").await
}

#[tokio::test]
async fn kubernetes_secret_store_holds_the_certificate_and_a_restart_loads_it() {
    let env = env(AcmeCaOptions::default()).await;
    let (api, extra) = kube_store(&env, None).await;
    let mut acme = env.acme("state");
    acme.extra = extra;
    // A Secret someone else owns, with the name of a certificate: never overwritten.
    let foreign = kubeapi::tls_secret(ACME_NS, "foreign", "not a certificate", "not a key");
    let foreign_rv = api.put_object(foreign)["metadata"]["resourceVersion"].clone();
    let stored = || Cert::new("stored", &[&domain("stored")], "dns-01");
    let config = env.config(&acme, &[stored(), Cert::new("foreign", &[&domain("foreign")], "dns-01")]);
    let (mut certwire, _) = certwire(&config).await;

    let serial = wait_serial(&certwire, "stored", None, ISSUE_WAIT).await;
    wait_serial(&certwire, "foreign", None, ISSUE_WAIT).await;
    // Served first, then stored: the refusal to write the foreign Secret comes after.
    let error = util::wait_for("the certificate-store error of \"foreign\"", WAIT, || async {
        let status = certwire.secret_status("foreign").await?;
        let error = status["last_error"].as_str()?.to_owned();
        error.contains("certificate-store").then_some(error)
    })
    .await;
    assert!(error.contains("not written by certwire"), "{error}");
    let foreign = get_secret(&api, "foreign").unwrap();
    assert_eq!(foreign["metadata"]["resourceVersion"], foreign_rv, "left alone: {foreign}");
    assert_eq!(wait_secret_serial(&api, "stored", None, WAIT).await, serial, "the served certificate is in the Secret");
    let secret = get_secret(&api, "stored").unwrap();
    assert_eq!(secret["type"], "kubernetes.io/tls", "{secret}");
    assert_eq!(secret["metadata"]["labels"]["app.kubernetes.io/managed-by"], "certwire", "{secret}");
    let chain = secret_data(&secret, "tls.crt").unwrap();
    let key = secret_data(&secret, "tls.key").unwrap();
    let ca = secret_data(&secret, "ca.crt").expect("ca.crt: the issuer chain");
    assert_eq!(certs_der(&chain).len(), 2, "leaf and issuer");
    assert_eq!(certs_der(&chain)[1], certs_der(env.ca.ca_cert_pem())[0], "the chain ends with the issuer");
    assert_eq!(ca.trim(), env.ca.ca_cert_pem().trim(), "ca.crt is the issuer chain");
    assert_eq!(dns_names(&chain), [domain("stored")]);
    // The key is the leaf's: the same public key.
    let leaf_der = pki::pem_decode_first(&chain);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    let pair = rcgen::KeyPair::from_pem(&key).expect("tls.key parses");
    assert_eq!(rcgen::PublicKeyData::subject_public_key_info(&pair), leaf.public_key().raw, "tls.key matches tls.crt");
    assert_eq!(std::fs::read_to_string(acme.state_dir.join("stored/tls.crt")).unwrap(), chain, "and the state dir");

    // The account, in its own Opaque Secret.
    let account = get_secret(&api, "certwire-acme-account").expect("the account Secret");
    assert_eq!(account["type"], "Opaque", "{account}");
    let keys: Vec<&String> = account["data"].as_object().unwrap().keys().collect();
    assert!(keys.len() == 1 && keys[0].ends_with(".json"), "{keys:?}");
    let log = log_of(&certwire);
    assert!(!log.contains(&key.lines().nth(1).unwrap().to_string()), "the certificate key is never logged");

    // A restart with an empty state directory loads from the Secrets, orders nothing.
    std::fs::remove_dir_all(&acme.state_dir).unwrap();
    env.config(&acme, &[stored()]);
    certwire.restart().await;
    assert_eq!(wait_serial(&certwire, "stored", None, WAIT).await, serial);
    util::holds_for(Duration::from_secs(3), || async {
        match all_orders(&certwire, "stored").await {
            0.0 => Ok(()),
            n => Err(format!("{n} orders after a restart with a valid certificate in its Secret")),
        }
    })
    .await
    .unwrap();
    let issued = std::fs::read_dir(env.ca.issued_dir()).unwrap().count();
    assert_eq!(issued, 2, "the CA issued once per certificate");
    assert!(log_of(&certwire).contains("stored certificate served from its Kubernetes Secret"));
}

#[tokio::test]
async fn replicas_share_a_lease_only_the_holder_orders_and_the_other_takes_over() {
    // 2-minute certificates renewed 30 s after issuance; a 10 s lease: long enough that
    // a loaded CI machine does not lose it between renewals (which would be a handover).
    let options = AcmeCaOptions { cert_lifetime: Duration::from_secs(120), ari: false, ..Default::default() };
    let env = env(options).await;
    let (api, extra) = kube_store(&env, Some("{ name = \"certwire-acme\", duration = \"10s\" }")).await;
    let cert = || [Cert::new("shared", &[&domain("shared")], "dns-01").with("renew_before = \"90s\"")];
    let mut acme_a = env.acme("state-a");
    acme_a.extra = extra.clone();
    let mut acme_b = env.acme("state-b");
    acme_b.extra = extra;
    let (a, _) = certwire(&env.config(&acme_a, &cert())).await;
    let (b, _) = certwire(&env.config(&acme_b, &cert())).await;

    // Both serve the one certificate; one replica ordered it.
    let first = wait_serial(&a, "shared", None, ISSUE_WAIT).await;
    assert_eq!(wait_serial(&b, "shared", None, WAIT).await, first, "both replicas serve the same certificate");
    assert_eq!(wait_secret_serial(&api, "shared", None, WAIT).await, first);
    // The order is counted once its certificate is stored (served, then written to the
    // Secret): wait for the count rather than racing it.
    util::wait_for("one order counted", WAIT, || async {
        (all_orders(&a, "shared").await + all_orders(&b, "shared").await >= 1.0).then_some(())
    })
    .await;
    let (a_orders, b_orders) = (all_orders(&a, "shared").await, all_orders(&b, "shared").await);
    assert_eq!(a_orders + b_orders, 1.0, "one order in all: a {a_orders}, b {b_orders}");
    assert_eq!(std::fs::read_dir(env.ca.issued_dir()).unwrap().count(), 1, "the CA issued once");
    let lease = api.get_object("coordination.k8s.io/v1", "Lease", ACME_NS, "certwire-acme").expect("the Lease");
    let first_holder = lease["spec"]["holderIdentity"].as_str().unwrap().to_string();
    let (mut leader, mut follower) = if a_orders == 1.0 { (a, b) } else { (b, a) };
    assert!(log_of(&follower).contains("not the ACME lease holder"));

    // The holder dies without releasing the Lease: the other takes over once it
    // expires, and renews when the certificate is due.
    leader.kill();
    let second = wait_serial(&follower, "shared", Some(&first), Duration::from_secs(60)).await;
    assert_eq!(wait_orders(&follower, "shared", "issued", 1.0, WAIT).await, 1.0, "the new holder renewed");
    assert_eq!(wait_secret_serial(&api, "shared", Some(&first), WAIT).await, second, "and stored the renewal");
    assert_eq!(std::fs::read_dir(env.ca.issued_dir()).unwrap().count(), 2);
    let lease = api.get_object("coordination.k8s.io/v1", "Lease", ACME_NS, "certwire-acme").unwrap();
    assert_ne!(lease["spec"]["holderIdentity"].as_str().unwrap(), first_holder, "{lease}");
    assert!(lease["spec"]["leaseTransitions"].as_i64().unwrap() >= 1, "{lease}");
    let log = log_of(&follower);
    assert!(log.contains("ACME lease acquired") && log.contains("ACME lease expired or free"), "the log tells");

    // The old holder comes back as a follower and serves the renewal from the Secret.
    leader.start().await;
    assert_eq!(wait_serial(&leader, "shared", None, WAIT).await, second);
    util::holds_for(Duration::from_secs(3), || async {
        match all_orders(&leader, "shared").await {
            0.0 => Ok(()),
            n => Err(format!("{n} orders by a replica without the lease")),
        }
    })
    .await
    .unwrap();

    // SIGTERM to the holder: the drain waits for the release (no holder once the
    // process is gone), and the other replica takes over without waiting the 10 s.
    let holder = |api: &KubeApi| {
        let lease = api.get_object("coordination.k8s.io/v1", "Lease", ACME_NS, "certwire-acme").unwrap();
        lease["spec"]["holderIdentity"].as_str().map(str::to_string)
    };
    let released_by = holder(&api).expect("a holder");
    follower.terminate(WAIT).await.expect("exits on SIGTERM");
    assert_eq!(holder(&api), None, "released before the process exited");
    assert!(log_of(&follower).contains("ACME lease released"));
    let taken = std::time::Instant::now();
    util::wait_for("the other replica holding the Lease", Duration::from_secs(8), || async {
        holder(&api).filter(|h| *h != released_by).map(drop)
    })
    .await;
    assert!(taken.elapsed() < Duration::from_secs(8), "handed over in {:?}", taken.elapsed());
    util::wait_for("the new holder saying so", WAIT, || async {
        log_of(&leader).contains("ACME lease acquired").then_some(())
    })
    .await;
}

/// The DER of each certificate in `pem`.
fn certs_der(pem: &str) -> Vec<Vec<u8>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes()).map(|c| c.expect("PEM certificate").to_vec()).collect()
}
