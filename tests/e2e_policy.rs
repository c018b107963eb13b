//! End to end with a real Envoy: what certwire serves for a secret that is not valid or
//! no longer exists (`on_invalid`, `allow_expired`, `on_delete`), seen on real TLS
//! handshakes against one listener that serves two hostnames, one filter chain each.
//!
//! Envoy warms a listener until every filter chain has its secret: one broken Secret
//! holds every hostname of the listener until the initial fetch timeout (15 s by
//! default; 60 s here, so that the difference cannot come from it).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::bootstrap::{SdsBootstrap, SdsTarget};
use common::certwire::Certwire;
use common::envoy::Envoy;
use common::files::{SecretDir, TLS_CRT, TLS_KEY, tls_files};
use common::pki::{Ca, Issued, LeafSpec};
use common::tls::{handshake, wait_served_serial};
use common::util::{self, WAIT};
use tempfile::TempDir;

const GOOD: &str = "good.test";
const BROKEN: &str = "broken.test";
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the listener is watched to show it stays warming.
const HOLD: Duration = Duration::from_secs(3);

struct Stack {
    envoy: Envoy,
    certwire: Certwire,
    ca: Ca,
    good: Issued,
    broken: SecretDir,
    addr: SocketAddr,
    /// Envoy's start, for the time to its first good handshake.
    started: Instant,
    _dir: TempDir,
}

/// certwire serving `good` (valid) and `broken` (`broken_files`) from files with `args`,
/// and an Envoy whose one listener serves `good.test` and `broken.test`.
async fn stack(args: &[&str], broken_files: impl FnOnce(&Ca) -> Vec<(&'static str, Vec<u8>)>) -> Stack {
    let dir = util::tempdir();
    let root = dir.path().join("secrets");
    std::fs::create_dir(&root).unwrap();
    let ca = Ca::new("policy CA");
    let good = ca.server(GOOD);
    SecretDir::create_tls(&root, "good", &good, None);
    let files = broken_files(&ca);
    let files: Vec<(&str, &[u8])> = files.iter().map(|(n, c)| (*n, c.as_slice())).collect();
    let broken = SecretDir::create(&root, "broken", &files);
    let mut all = vec!["--listen".to_string(), "127.0.0.1:0".into(), "--files".into(), root.display().to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    let certwire = Certwire::serve(all).await;
    let bootstrap = SdsBootstrap::new("gateway", SdsTarget::Tcp(certwire.sds_addr()), 0)
        .sni_chain(GOOD, "good")
        .sni_chain(BROKEN, "broken")
        .initial_fetch_timeout(FETCH_TIMEOUT);
    let started = Instant::now();
    let envoy = Envoy::start(&bootstrap.to_yaml()).await;
    let addr = envoy.listener_addr("gateway");
    Stack { envoy, certwire, ca, good, broken, addr, started, _dir: dir }
}

/// A pair whose key belongs to another certificate.
fn mismatched(ca: &Ca) -> Vec<(&'static str, Vec<u8>)> {
    let (cert, other) = (ca.server(BROKEN), ca.server(BROKEN));
    vec![(TLS_CRT, cert.cert_pem.into_bytes()), (TLS_KEY, other.key_pem.into_bytes())]
}

fn subject(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("a certificate");
    cert.subject().to_string()
}

#[tokio::test]
async fn serve_placeholder_lets_the_good_hostname_serve_while_the_other_secret_is_broken() {
    let mut s = stack(&["--on-invalid", "serve-placeholder"], mismatched).await;
    let good = wait_served_serial(s.addr, GOOD, &s.good.serial_hex, WAIT).await;
    let first_good = s.started.elapsed();
    eprintln!("serve-placeholder: first good handshake {first_good:?} after Envoy's start");
    assert!(first_good < FETCH_TIMEOUT, "served before the initial fetch timeout could have let the listener go");
    assert_eq!(good.http_status, 200);

    // The broken hostname fails on a certificate nobody trusts and that says what it is.
    let placeholder = handshake(s.addr, BROKEN, None).await.expect("a handshake with the placeholder");
    assert!(subject(&placeholder.leaf_der).contains("certwire placeholder"), "{}", subject(&placeholder.leaf_der));
    let status = s.certwire.secret_status("broken").await.expect("broken in status");
    assert_eq!(status["placeholder"], "invalid", "{status}");
    assert!(status["last_error"].as_str().unwrap_or_default().contains("does not match"), "{status}");
    assert_eq!(s.certwire.metric_sum("certwire_placeholders_served", &[("cause", "invalid")]).await, 1.0);

    // Fixed: the real certificate replaces the placeholder, without a restart.
    let fixed = s.ca.server(BROKEN);
    s.broken.swap(&tls_files(&fixed, None));
    wait_served_serial(s.addr, BROKEN, &fixed.serial_hex, WAIT).await;
    let status = s.certwire.secret_status("broken").await.unwrap();
    assert!(status["placeholder"].is_null() && status["last_error"].is_null(), "{status}");
    assert_eq!(s.certwire.metric_sum("certwire_placeholders_served", &[("cause", "invalid")]).await, 0.0);
    s.envoy.kill();
}

#[tokio::test]
async fn withhold_keeps_every_hostname_of_the_listener_waiting() {
    let s = stack(&[], mismatched).await;
    // The good secret is sent at once, but the listener waits for the broken one.
    util::wait_for("the broken secret refused", WAIT, || async {
        s.certwire.secret_status("broken").await?["last_error"].as_str().map(|_| ())
    })
    .await;
    let held = util::holds_for(HOLD, || async {
        match handshake(s.addr, GOOD, None).await {
            Ok(served) => Err(format!("good.test served {} while the listener should be warming", served.serial_hex)),
            Err(_) => Ok(()),
        }
    })
    .await;
    held.unwrap();
    eprintln!("withhold: no handshake on either hostname {:?} after Envoy's start", s.started.elapsed());
    assert!(s.certwire.secret_status("broken").await.unwrap()["placeholder"].is_null());
}

#[tokio::test]
async fn an_expired_certificate_is_served_when_nothing_else_is_and_said_loudly() {
    let s = stack(&[], |ca| {
        let expired = ca.issue(&LeafSpec::server(BROKEN).expired());
        vec![(TLS_CRT, expired.cert_pem.into_bytes()), (TLS_KEY, expired.key_pem.into_bytes())]
    })
    .await;
    wait_served_serial(s.addr, GOOD, &s.good.serial_hex, WAIT).await;
    let expired = handshake(s.addr, BROKEN, None).await.expect("the expired certificate is served");
    assert!(!subject(&expired.leaf_der).contains("placeholder"));
    let status = s.certwire.secret_status("broken").await.unwrap();
    assert_eq!(status["expired"], true, "{status}");
    assert!(status["last_error"].as_str().unwrap().contains("when-nothing-else"), "{status}");
    assert_eq!(s.certwire.metric_sum("certwire_expired_served_total", &[]).await, 1.0);
}

#[tokio::test]
async fn withdraw_replaces_a_deleted_secret_with_the_placeholder_on_sotw() {
    let mut s = stack(&["--on-delete", "withdraw"], |ca| {
        let real = ca.server(BROKEN);
        vec![(TLS_CRT, real.cert_pem.into_bytes()), (TLS_KEY, real.key_pem.into_bytes())]
    })
    .await;
    wait_served_serial(s.addr, GOOD, &s.good.serial_hex, WAIT).await;
    let before = handshake(s.addr, BROKEN, None).await.unwrap();
    std::fs::remove_dir_all(s.broken.path()).unwrap();
    let after = util::wait_for("the placeholder on broken.test", WAIT, || async {
        let served = handshake(s.addr, BROKEN, None).await.ok()?;
        subject(&served.leaf_der).contains("certwire placeholder").then_some(served)
    })
    .await;
    assert_ne!(after.serial_hex, before.serial_hex);
    let status = s.certwire.secret_status("broken").await.unwrap();
    assert_eq!(
        (status["deleted"].as_bool(), status["placeholder"].as_str()),
        (Some(true), Some("deleted")),
        "{status}"
    );
    // The other hostname is untouched.
    assert_eq!(handshake(s.addr, GOOD, None).await.unwrap().serial_hex, s.good.serial_hex);
    s.envoy.kill();
}
