//! End to end for OCSP staples (`tls.ocsp-staple`, issue 14): a response made by the
//! `openssl ocsp` responder for the served certificate is stapled by a real Envoy, seen
//! in a real handshake by `openssl s_client -status`, from the files source and from a
//! Kubernetes Secret written with kubectl; a staple for another certificate is refused
//! (status, metric) and the previous good version, staple included, stays served.
//!
//! As in the other end-to-end tests nothing asserts on durations: waits poll with
//! generous timeouts, and "keeps serving" is held over a window.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::bootstrap::{SdsBootstrap, SdsTarget};
use common::certwire::Certwire;
use common::envoy::Envoy;
use common::files::{SecretDir, TLS_CRT, TLS_KEY};
use common::kubeapi::{self, KubeApi};
use common::openssl::{self, s_client_status};
use common::pki::{Ca, Issued};
use common::tls::{keeps_serving, wait_served_serial};
use common::util::{self, WAIT};
use serde_json::Value;

const SNI: &str = "ocsp.test";
const OCSP_STAPLE: &str = "tls.ocsp-staple";

/// How long a refused update is watched to show it is never served.
const HOLD: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------
// An OCSP responder and a client that asks for the staple: the openssl CLI.
// ---------------------------------------------------------------------------------

/// The DER OCSP response `ca`'s responder gives for `leaf`, good for a day: an OCSP
/// request made with `openssl ocsp -reqout`, answered by `openssl ocsp -index` signing
/// as the CA itself, as a user would make a staple by hand.
fn ocsp_response(ca: &Ca, leaf: &Issued) -> Vec<u8> {
    let dir = util::tempdir();
    let write = |name: &str, contents: &str| std::fs::write(dir.path().join(name), contents).expect("write");
    write("ca.pem", ca.cert_pem());
    write("ca.key", &ca.cert.key_pem);
    write("leaf.pem", &leaf.cert_pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf.der).expect("parse leaf");
    let expiry = cert.validity().not_after.to_datetime();
    let expiry = format!(
        "{:02}{:02}{:02}{:02}{:02}{:02}Z",
        expiry.year() % 100,
        u8::from(expiry.month()),
        expiry.day(),
        expiry.hour(),
        expiry.minute(),
        expiry.second()
    );
    let subject = format!("/CN={}", cert.subject().iter_common_name().next().unwrap().as_str().unwrap());
    // index.txt: status, expiry, revocation (none), serial (upper-case hex), file, subject.
    write("index.txt", &format!("V\t{expiry}\t\t{}\tunknown\t{subject}\n", leaf.serial_hex.to_uppercase()));
    openssl::run(dir.path(), &["ocsp", "-issuer", "ca.pem", "-cert", "leaf.pem", "-reqout", "req.der"]);
    openssl::run(
        dir.path(),
        &[
            "ocsp",
            "-index",
            "index.txt",
            "-rsigner",
            "ca.pem",
            "-rkey",
            "ca.key",
            "-CA",
            "ca.pem",
            "-reqin",
            "req.der",
            "-respout",
            "resp.der",
            "-ndays",
            "1",
        ],
    );
    std::fs::read(dir.path().join("resp.der")).expect("read resp.der")
}

/// Whether `s_client -status` output shows a successful staple saying `leaf` is good.
fn stapled_good(output: &str, leaf: &Issued) -> bool {
    output.contains("OCSP Response Status: successful")
        && output.contains("Cert Status: good")
        && output.contains(&format!("Serial Number: {}", leaf.serial_hex.to_uppercase()))
}

/// Polls handshakes until Envoy staples a good status of `leaf`; returns what
/// s_client printed.
async fn wait_stapled(addr: SocketAddr, leaf: &Issued) -> String {
    let what = format!("a handshake with {addr} stapling a good status of serial {}", leaf.serial_hex);
    util::wait_for(&what, WAIT, move || async move {
        let output = s_client_status(addr, SNI).await;
        stapled_good(&output, leaf).then_some(output)
    })
    .await
}

/// Holds for [`HOLD`] that handshakes present `leaf` and staple its good status.
async fn keeps_stapling(addr: SocketAddr, leaf: &Issued) {
    keeps_serving(addr, SNI, None, &leaf.serial_hex, HOLD).await;
    let output = s_client_status(addr, SNI).await;
    assert!(stapled_good(&output, leaf), "the good staple of {} is still stapled:\n{output}", leaf.serial_hex);
}

// ---------------------------------------------------------------------------------
// certwire's side.
// ---------------------------------------------------------------------------------

/// Waits until certwire counts `n` rejected updates with reason `bad_ocsp_staple`.
async fn wait_rejected_staple(certwire: &Certwire, n: f64) {
    let what = format!("certwire_updates_rejected_total{{reason=\"bad_ocsp_staple\"}} >= {n}");
    util::wait_for(&what, WAIT, move || async move {
        let count = certwire.metric_sum("certwire_updates_rejected_total", &[("reason", "bad_ocsp_staple")]).await;
        (count >= n).then_some(())
    })
    .await;
}

/// Waits until `/status/secrets` shows for `name` a last_error containing every `says`.
async fn wait_last_error(certwire: &Certwire, name: &str, says: &[&str]) -> Value {
    let what = format!("/status/secrets {name}: last_error saying {says:?}");
    util::wait_for(&what, WAIT, move || async move {
        let status = certwire.secret_status(name).await?;
        let error = status["last_error"].as_str()?;
        says.iter().all(|s| error.contains(s)).then_some(status)
    })
    .await
}

/// A secret directory's files as [`SecretDir`] takes them.
fn refs<'a>(files: &'a [(&'static str, Vec<u8>)]) -> Vec<(&'static str, &'a [u8])> {
    files.iter().map(|(name, contents)| (*name, contents.as_slice())).collect()
}

/// Lowercase hex without separators, whatever style certwire prints.
fn normalize_hex(text: &str) -> String {
    text.chars().filter(char::is_ascii_hexdigit).collect::<String>().to_lowercase()
}

/// A listener asking certwire at `sds` for `secret`, waiting for it however long.
async fn envoy(sds: SocketAddr, secret: &str) -> (Envoy, SocketAddr) {
    let bootstrap = SdsBootstrap::new(secret, SdsTarget::Tcp(sds), 0).initial_fetch_timeout(Duration::ZERO);
    let envoy = Envoy::start(&bootstrap.to_yaml()).await;
    let addr = envoy.listener_addr(secret);
    (envoy, addr)
}

// ---------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------

/// `ROOT/NAME/tls.ocsp-staple` next to the pair: stapled; a staple for another
/// certificate refused while the good one stays; a rotation with the new certificate's
/// own staple served.
#[tokio::test]
async fn the_files_source_staples_and_refuses_a_staple_for_another_certificate() {
    const NAME: &str = "stapled";
    let dir = util::tempdir();
    let root = dir.path().join("secrets");
    std::fs::create_dir(&root).expect("create secrets root");
    let ca = Ca::new("e2e OCSP CA");
    let leaf = ca.server(SNI);
    let files = |leaf: &Issued, staple: Vec<u8>| {
        vec![
            (TLS_CRT, leaf.cert_pem.clone().into_bytes()),
            (TLS_KEY, leaf.key_pem.clone().into_bytes()),
            (OCSP_STAPLE, staple),
        ]
    };
    let mut secret = SecretDir::create(&root, NAME, &refs(&files(&leaf, ocsp_response(&ca, &leaf))));

    let certwire = Certwire::serve(["--listen", "127.0.0.1:0", "--files", root.to_str().unwrap()]).await;
    let (_envoy, addr) = envoy(certwire.sds_addr(), NAME).await;
    wait_served_serial(addr, SNI, &leaf.serial_hex, WAIT).await;
    wait_stapled(addr, &leaf).await;

    // A staple the same CA's responder made for another of its certificates.
    let other = ca.server(SNI);
    secret.swap(&refs(&files(&leaf, ocsp_response(&ca, &other))));
    wait_rejected_staple(&certwire, 1.0).await;
    let status = wait_last_error(&certwire, NAME, &["bad OCSP staple", "another certificate"]).await;
    assert_eq!(normalize_hex(status["serial"].as_str().unwrap()), leaf.serial_hex, "{status}");
    keeps_stapling(addr, &leaf).await;
    let log = std::fs::read_to_string(certwire.log_path()).expect("read certwire log");
    assert!(
        log.lines().any(|l| l.contains(NAME) && l.contains("bad_ocsp_staple") && l.contains("ERROR")),
        "certwire's log has an error line naming {NAME} and bad_ocsp_staple:\n{}",
        util::log_tail(certwire.log_path(), 20)
    );

    // The other certificate with its own staple: a good update again.
    secret.swap(&refs(&files(&other, ocsp_response(&ca, &other))));
    wait_served_serial(addr, SNI, &other.serial_hex, WAIT).await;
    wait_stapled(addr, &other).await;
    let status = certwire.secret_status(NAME).await.expect("status");
    assert!(status["last_error"].is_null(), "a good version clears last_error: {status}");
}

/// A Secret with `tls.ocsp-staple` (Istio's key) written with kubectl: stapled; a
/// replaced Secret whose staple is for another certificate refused (status, metric,
/// Event on the Secret) while the good version and its staple stay.
#[tokio::test]
async fn a_kubernetes_secret_with_tls_ocsp_staple_is_stapled_and_a_wrong_one_refused() {
    const NS: &str = "ingress";
    const NAME: &str = "web";
    let api = KubeApi::start().await;
    let dir = util::tempdir();
    let kubeconfig = api.kubeconfig(dir.path());
    let kubectl = |args: Vec<String>| {
        let kubeconfig = kubeconfig.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            kubeapi::kubectl_ok(&kubeconfig, &args).await
        }
    };
    let ca = Ca::new("e2e OCSP CA");
    let (leaf, other) = (ca.server(SNI), ca.server(SNI));
    let write = |file: &str, contents: &[u8]| {
        let path = dir.path().join(file);
        std::fs::write(&path, contents).expect("write");
        path.to_str().unwrap().to_owned()
    };
    let (crt, key) = (write("tls.crt", leaf.cert_pem.as_bytes()), write("tls.key", leaf.key_pem.as_bytes()));
    let good = write("good.der", &ocsp_response(&ca, &leaf));
    let wrong = write("wrong.der", &ocsp_response(&ca, &other));
    // `kubectl create secret generic --type=kubernetes.io/tls`: `kubectl create secret
    // tls` takes no third file.
    let create = |staple: &str, extra: &[&str]| {
        let mut args: Vec<String> =
            ["create", "secret", "generic", NAME, "-n", NS, "--type=kubernetes.io/tls"].map(String::from).to_vec();
        args.push(format!("--from-file=tls.crt={crt}"));
        args.push(format!("--from-file=tls.key={key}"));
        args.push(format!("--from-file={OCSP_STAPLE}={staple}"));
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    kubectl(vec!["create".into(), "namespace".into(), NS.into()]).await;
    let out = kubectl(create(&good, &[])).await;
    assert_eq!(out.trim(), format!("secret/{NAME} created"));

    let certwire =
        Certwire::serve(["--listen", "127.0.0.1:0", "--kubeconfig", kubeconfig.to_str().unwrap(), "--namespace", NS])
            .await;
    let name = format!("kubernetes://{NS}/{NAME}");
    let (_envoy, addr) = envoy(certwire.sds_addr(), &name).await;
    wait_served_serial(addr, SNI, &leaf.serial_hex, WAIT).await;
    wait_stapled(addr, &leaf).await;

    // The same Secret, replaced with the staple of another certificate.
    let manifest = kubectl(create(&wrong, &["--dry-run=client", "-o", "yaml"])).await;
    let manifest = write("wrong.yaml", manifest.as_bytes());
    kubectl(vec!["replace".into(), "-f".into(), manifest]).await;
    wait_rejected_staple(&certwire, 1.0).await;
    let status = wait_last_error(&certwire, &name, &["bad OCSP staple", "another certificate"]).await;
    assert_eq!(normalize_hex(status["serial"].as_str().unwrap()), leaf.serial_hex, "{status}");
    keeps_stapling(addr, &leaf).await;
    let events = util::wait_for("a Warning Event naming bad_ocsp_staple", WAIT, || async {
        let events = kubectl(["events", "-n", NS, "--for", &format!("secret/{NAME}")].map(String::from).to_vec()).await;
        events.contains("bad_ocsp_staple").then_some(events)
    })
    .await;
    assert!(events.contains("another certificate"), "kubectl events:\n{events}");
}
