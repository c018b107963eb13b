//! End to end: certwire as a forwarder (`[upstream]`). A central certwire serves
//! Secrets over mutual TLS with a policy; a second certwire, as in a gateway pod, asks it
//! for what its Envoy asks on a Unix socket (`sds://NAME`, Istio's credential socket
//! form), checks it, and serves it. Rotations reach Envoy through both; the central one
//! going away changes nothing that is served, and its return resumes the flow.

mod common;

use std::path::Path;
use std::time::Duration;

use common::bootstrap::{SdsBootstrap, SdsTarget};
use common::certwire::Certwire;
use common::envoy::Envoy;
use common::files::{SecretDir, tls_files};
use common::pki::{Ca, LeafSpec};
use common::tls::{handshake, wait_served_serial};
use common::util::{self, WAIT};

const SERVER_NAME: &str = "certwire.test";
const FORWARDER_ID: &str = "spiffe://e2e.test/ns/gw/sa/forwarder";
const NAME: &str = "web";
const SNI: &str = "web.test";
/// How long "keeps serving" and "never served" are watched.
const HOLD: Duration = Duration::from_secs(2);

fn write(path: &Path, contents: &str) -> String {
    std::fs::write(path, contents).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn a_forwarder_serves_what_the_central_certwire_allows_and_keeps_it_through_an_outage() {
    let dir = util::tempdir();
    let (server_ca, client_ca, served_ca) =
        (Ca::new("central server CA"), Ca::new("forwarder CA"), Ca::new("served CA"));
    let tls = SecretDir::create_tls(
        &dir.path().join("tls"),
        "central",
        &server_ca.server(SERVER_NAME),
        Some(client_ca.cert_pem()),
    );
    let root = dir.path().join("secrets");
    std::fs::create_dir(&root).unwrap();
    let first = served_ca.server(SNI);
    let mut web = SecretDir::create_tls(&root, NAME, &first, None);
    SecretDir::create_tls(&root, "other", &served_ca.server("other.test"), None);

    // The central certwire: mutual TLS, and the forwarder may read `web` only.
    let central_config = dir.path().join("central.toml");
    std::fs::write(
        &central_config,
        format!(
            "[authz]\nmode = \"policy\"\n[[authz.rules]]\nidentities = [\"{FORWARDER_ID}\"]\nsecrets = [\"{NAME}\"]\n"
        ),
    )
    .unwrap();
    let f = |n: &str| tls.file(n).display().to_string();
    let mut central = Certwire::serve([
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--files".into(),
        root.display().to_string(),
        "--config".into(),
        central_config.display().to_string(),
        "--tls-cert".into(),
        f("tls.crt"),
        "--tls-key".into(),
        f("tls.key"),
        "--tls-client-ca".into(),
        f("ca.crt"),
    ])
    .await;

    // The forwarder: its client certificate names it; it listens on a Unix socket.
    let client = client_ca.issue(&LeafSpec::spiffe(FORWARDER_ID));
    let socket = dir.path().join("credential.sock");
    let edge_config = dir.path().join("edge.toml");
    std::fs::write(
        &edge_config,
        format!(
            "listen = [\"unix:{socket}\"]\n\n[upstream]\naddress = \"https://127.0.0.1:{port}\"\nserver_name = \"{SERVER_NAME}\"\n\
             ca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\nnode_id = \"gateway-7f9c\"\n",
            socket = socket.display(),
            port = central.sds_addr().port(),
            ca = write(&dir.path().join("upstream-ca.crt"), server_ca.cert_pem()),
            cert = write(&dir.path().join("upstream.crt"), &client.cert_pem),
            key = write(&dir.path().join("upstream.key"), &client.key_pem),
        ),
    )
    .unwrap();
    let edge = Certwire::serve(["--config", edge_config.to_str().unwrap()]).await;

    let requested = format!("sds://{NAME}");
    let envoy = Envoy::start(&SdsBootstrap::new(&requested, SdsTarget::Unix(socket.clone()), 0).to_yaml()).await;
    // Another proxy on the socket asks for a name the central policy denies.
    let denied = Envoy::start(&SdsBootstrap::new("other", SdsTarget::Unix(socket.clone()), 0).to_yaml()).await;
    let addr = envoy.listener_addr(&requested);
    wait_served_serial(addr, SNI, &first.serial_hex, WAIT).await;

    // The central certwire sees the forwarder by its identity, and serves it `web` only.
    let proxies = central.get_json("/status/proxies").await.to_string();
    assert!(proxies.contains(FORWARDER_ID) && proxies.contains("gateway-7f9c"), "{proxies}");
    let other = denied.listener_addr("other");
    let held = util::holds_for(HOLD, || async {
        match handshake(other, "other.test", None).await {
            Ok(s) => Err(format!("`other` reached Envoy ({}) although the central policy denies it", s.serial_hex)),
            Err(_) => Ok(()),
        }
    })
    .await;
    held.unwrap();
    assert!(edge.secret_status("other").await.is_none(), "nothing of `other` reached the forwarder");

    // A rotation at the central certwire reaches Envoy through the forwarder.
    let second = served_ca.server(SNI);
    web.swap(&tls_files(&second, None));
    wait_served_serial(addr, SNI, &second.serial_hex, WAIT).await;

    // The central certwire goes away: the forwarder keeps serving and says why it is not ready.
    central.kill();
    let readyz = util::wait_for("the forwarder to report the outage", WAIT, || async {
        let r = edge.get("/readyz").await;
        (r.status == 503 && r.body.contains("upstream")).then_some(r.body)
    })
    .await;
    assert!(readyz.contains("127.0.0.1"), "{readyz}");
    common::tls::keeps_serving(addr, SNI, None, &second.serial_hex, HOLD).await;

    // Rotated while it was down; back, and the rotation flows through.
    let third = served_ca.server(SNI);
    web.swap(&tls_files(&third, None));
    central.restart().await;
    wait_served_serial(addr, SNI, &third.serial_hex, Duration::from_secs(60)).await;
    util::wait_for("the forwarder ready again", WAIT, || async {
        (edge.get("/readyz").await.status == 200).then_some(())
    })
    .await;
}

/// What the upstream sends is checked by the forwarder too: a bad pair is refused there
/// as anywhere (NACKed upstream, with the reason), and the last good version stays.
#[tokio::test]
async fn a_forwarder_refuses_what_fails_its_checks_and_tells_the_upstream() {
    let dir = util::tempdir();
    let served_ca = Ca::new("served CA");
    let root = dir.path().join("secrets");
    std::fs::create_dir(&root).unwrap();
    let first = served_ca.server(SNI);
    let mut web = SecretDir::create_tls(&root, NAME, &first, None);
    // A central certwire that serves expired certificates (`--allow-expired`): the
    // forwarder, with `allow_expired = "never"`, refuses what it forwards.
    let central =
        Certwire::serve(["--listen", "127.0.0.1:0", "--files", root.to_str().unwrap(), "--allow-expired"]).await;
    let edge_config = dir.path().join("edge.toml");
    let socket = dir.path().join("sds.sock");
    std::fs::write(
        &edge_config,
        format!(
            "listen = [\"unix:{}\"]\nallow_expired = \"never\"\n\n[upstream]\naddress = \"http://{}\"\n",
            socket.display(),
            central.sds_addr()
        ),
    )
    .unwrap();
    let edge = Certwire::serve(["--config", edge_config.to_str().unwrap()]).await;
    let envoy = Envoy::start(&SdsBootstrap::new(NAME, SdsTarget::Unix(socket), 0).to_yaml()).await;
    let addr = envoy.listener_addr(NAME);
    wait_served_serial(addr, SNI, &first.serial_hex, WAIT).await;

    let expired = served_ca.issue(&LeafSpec::server(SNI).expired());
    web.swap(&tls_files(&expired, None));
    let nack = util::wait_for("the central certwire to see the NACK", WAIT, || async {
        let proxies = central.get_json("/status/proxies").await.to_string();
        proxies.contains("expired").then_some(proxies)
    })
    .await;
    assert!(nack.contains(NAME), "{nack}");
    let status = edge.secret_status(NAME).await.unwrap();
    assert!(status["last_error"].as_str().unwrap().contains("expired"), "{status}");
    common::tls::keeps_serving(addr, SNI, None, &first.serial_hex, HOLD).await;
}
