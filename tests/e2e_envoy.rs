//! End to end with a real Envoy: certwire serves secrets over SDS, Envoy terminates
//! TLS with them, and every expectation is checked where a user would see it: on a
//! fresh TLS handshake, in Envoy's admin API, and in certwire's admin API.
//!
//! Each test starts its own certwire and Envoy on ports the kernel picks (port 0). Nothing here asserts
//! on durations: waits poll with generous timeouts, and "never happens" is checked
//! by holding an expectation over a window while the torn state is on disk.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::bootstrap::{SdsBootstrap, SdsTarget};
use common::certwire::{self, Certwire};
use common::envoy::{self, Envoy};
use common::files::{SecretDir, TLS_CRT, TLS_KEY, tls_files};
use common::pki::{Ca, Issued, LeafSpec};
use common::tls::{self, handshake, wait_served, wait_served_serial, wait_served_serial_with};
use common::util::{self, WAIT};
use serde_json::Value;
use tempfile::TempDir;

const NAME: &str = "app";
const SNI: &str = "app.test";

/// How long a torn or rejected state is watched to show it is never served. Long
/// enough for certwire's file watch to have reacted many times over.
const HOLD: Duration = Duration::from_secs(2);

/// One certwire serving `ROOT/app` from files, one Envoy using it.
struct Stack {
    envoy: Envoy,
    certwire: Certwire,
    secret: SecretDir,
    ca: Ca,
    /// The certificate on disk at start.
    first: Issued,
    tls_addr: SocketAddr,
    node_id: String,
    _dir: TempDir,
}

#[derive(Clone, Copy, PartialEq)]
enum Transport {
    Tcp,
    Unix,
}

struct Options {
    transport: Transport,
    delta: bool,
    /// With mutual TLS, `ca.crt` holds this CA's certificate.
    client_ca: Option<String>,
    /// Start with an expired certificate on disk.
    first_expired: bool,
    /// More `certwire serve` flags.
    extra_args: Vec<&'static str>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            transport: Transport::Tcp,
            delta: false,
            client_ca: None,
            first_expired: false,
            extra_args: Vec::new(),
        }
    }
}

/// Starts the stack and waits until Envoy serves the first certificate.
async fn stack(options: Options) -> Stack {
    let dir = util::tempdir();
    let root = dir.path().join("secrets");
    std::fs::create_dir(&root).expect("create secrets root");
    let ca = Ca::new("e2e server CA");
    let first = if options.first_expired { ca.issue(&LeafSpec::server(SNI).expired()) } else { ca.server(SNI) };
    let secret = SecretDir::create_tls(&root, NAME, &first, options.client_ca.as_deref());

    let listen = match options.transport {
        Transport::Tcp => "127.0.0.1:0".to_string(),
        Transport::Unix => format!("unix:{}", dir.path().join("sds.sock").display()),
    };
    let mut args = vec!["--listen".to_string(), listen, "--files".to_string(), root.display().to_string()];
    args.extend(options.extra_args.iter().map(|a| a.to_string()));
    let certwire = Certwire::serve(args).await;
    let sds = match options.transport {
        Transport::Tcp => SdsTarget::Tcp(certwire.sds_addr()),
        Transport::Unix => SdsTarget::Unix(dir.path().join("sds.sock")),
    };

    let mut bootstrap = SdsBootstrap::new(NAME, sds, 0);
    if options.delta {
        bootstrap = bootstrap.delta();
    }
    if options.client_ca.is_some() {
        bootstrap = bootstrap.mtls();
    }
    let node_id = bootstrap.node_id.clone();
    let envoy = Envoy::start(&bootstrap.to_yaml()).await;
    let tls_addr = envoy.listener_addr(NAME);

    let stack = Stack { envoy, certwire, secret, ca, first, tls_addr, node_id, _dir: dir };
    if options.client_ca.is_none() {
        wait_served_serial(stack.tls_addr, SNI, &stack.first.serial_hex, WAIT).await;
    }
    stack
}

/// Lowercase hex without separators, whatever style certwire prints.
fn normalize_hex(text: &str) -> String {
    text.chars().filter(char::is_ascii_hexdigit).collect::<String>().to_lowercase()
}

fn str_field<'a>(value: &'a Value, field: &str) -> &'a str {
    value[field].as_str().unwrap_or_else(|| panic!("no string field {field:?} in {value}"))
}

/// Holds for [`HOLD`] that fresh handshakes keep showing `serial_hex`.
async fn keeps_serving(addr: SocketAddr, serial_hex: &str) {
    tls::keeps_serving(addr, SNI, None, serial_hex, HOLD).await
}

/// Waits until certwire counts a rejected update with `reason`.
async fn wait_rejected(certwire: &Certwire, reason: &str) {
    let what = format!("certwire_updates_rejected_total{{reason=\"{reason}\"}} >= 1");
    util::wait_for(&what, WAIT, move || async move {
        let n = certwire.metric_sum("certwire_updates_rejected_total", &[("reason", reason)]).await;
        (n >= 1.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn sotw_over_tcp_serves_the_file_secret() {
    let s = stack(Options::default()).await;

    let served = handshake(s.tls_addr, SNI, None).await.expect("handshake");
    assert_eq!(served.sha256_hex, s.first.sha256_hex, "Envoy serves exactly the file's certificate");
    assert_eq!(served.http_status, 200);
    assert!(s.envoy.served_serials().await.contains(&s.first.serial_hex), "Envoy /certs shows the served serial");

    let status = s.certwire.secret_status(NAME).await.expect("/status/secrets lists the secret");
    assert_eq!(normalize_hex(str_field(&status, "fingerprint_sha256")), s.first.sha256_hex);
    assert_eq!(normalize_hex(str_field(&status, "serial")), s.first.serial_hex);
    assert_eq!(status["deleted"], Value::Bool(false));
}

#[tokio::test]
async fn delta_serves_the_file_secret() {
    let mut s = stack(Options { delta: true, ..Options::default() }).await;

    // Rotation goes over the same Delta stream.
    let next = s.ca.server(SNI);
    s.secret.swap_tls(&next, None);
    wait_served_serial(s.tls_addr, SNI, &next.serial_hex, WAIT).await;
}

#[tokio::test]
async fn unix_socket_serves_the_file_secret() {
    let mut s = stack(Options { transport: Transport::Unix, ..Options::default() }).await;

    let next = s.ca.server(SNI);
    s.secret.swap_tls(&next, None);
    wait_served_serial(s.tls_addr, SNI, &next.serial_hex, WAIT).await;
}

#[tokio::test]
async fn data_swap_rotation_is_served_without_restarting_envoy() {
    let mut s = stack(Options::default()).await;
    let stat = format!("sds.{NAME}.update_success");
    let before = s.envoy.wait_stat_at_least(&stat, 1, WAIT).await;

    for _ in 0..2 {
        let next = s.ca.server(SNI);
        s.secret.swap_tls(&next, None);
        let served = wait_served_serial(s.tls_addr, SNI, &next.serial_hex, WAIT).await;
        assert_eq!(served.sha256_hex, next.sha256_hex);
    }
    s.envoy.wait_stat_at_least(&stat, before + 2, WAIT).await;
    assert_eq!(s.envoy.stat(&format!("sds.{NAME}.update_rejected")).await, Some(0), "Envoy rejected an update");
}

#[tokio::test]
async fn half_written_pair_is_never_served() {
    let s = stack(Options::default()).await;
    let next = s.ca.server(SNI);

    // The new certificate lands next to the old key: a mismatched pair on disk.
    s.secret.write_in_place(TLS_CRT, next.cert_pem.as_bytes());
    keeps_serving(s.tls_addr, &s.first.serial_hex).await;

    s.secret.write_in_place(TLS_KEY, next.key_pem.as_bytes());
    wait_served_serial(s.tls_addr, SNI, &next.serial_hex, WAIT).await;

    // Envoy never had to refuse anything: certwire did not push the torn pair.
    assert_eq!(s.envoy.stat(&format!("sds.{NAME}.update_rejected")).await, Some(0));
    assert_eq!(s.certwire.metric_sum("certwire_nacks_total", &[]).await, 0.0);
}

#[tokio::test]
async fn mismatched_key_is_rejected_and_the_old_certificate_stays() {
    let mut s = stack(Options::default()).await;
    let next = s.ca.server(SNI);
    let stranger = s.ca.server(SNI);

    // An atomic swap to a pair that does not match: settled on disk, but wrong.
    s.secret.swap(&[(TLS_CRT, next.cert_pem.as_bytes()), (TLS_KEY, stranger.key_pem.as_bytes())]);

    wait_rejected(&s.certwire, "key_mismatch").await;
    let status = s.certwire.secret_status(NAME).await.expect("/status/secrets lists the secret");
    let last_error = status["last_error"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        last_error.contains("mismatch") || last_error.contains("does not match"),
        "last_error names the key mismatch: {status}"
    );
    assert_eq!(normalize_hex(str_field(&status, "serial")), s.first.serial_hex, "status keeps the last good version");

    keeps_serving(s.tls_addr, &s.first.serial_hex).await;
    assert_eq!(s.envoy.stat(&format!("sds.{NAME}.update_rejected")).await, Some(0));

    // A good pair afterwards goes through as usual.
    s.secret.swap_tls(&next, None);
    wait_served_serial(s.tls_addr, SNI, &next.serial_hex, WAIT).await;
}

/// certwire dies (SIGKILL, as in a crash), Envoy keeps serving; a rotation made
/// meanwhile reaches Envoy once certwire is back and Envoy's stream reconnects.
async fn survives_certwire_restart(options: Options) {
    let mut s = stack(options).await;

    s.certwire.kill();
    keeps_serving(s.tls_addr, &s.first.serial_hex).await;

    // Rotated while certwire is down: nobody can tell Envoy yet.
    let next = s.ca.server(SNI);
    s.secret.swap_tls(&next, None);
    keeps_serving(s.tls_addr, &s.first.serial_hex).await;

    s.certwire.start().await;
    wait_served_serial(s.tls_addr, SNI, &next.serial_hex, WAIT).await;
}

#[tokio::test]
async fn envoy_keeps_serving_while_certwire_is_down_and_catches_up_after() {
    survives_certwire_restart(Options::default()).await;
}

/// Over a Unix socket the crashed process leaves its socket file behind, and
/// Delta reconnects announce the version Envoy already has.
#[tokio::test]
async fn delta_over_unix_socket_catches_up_after_certwire_restart() {
    survives_certwire_restart(Options { transport: Transport::Unix, delta: true, ..Options::default() }).await;
}

#[tokio::test]
async fn mutual_tls_follows_the_ca_bundle() {
    let ca_a = Ca::new("client CA A");
    let ca_b = Ca::new("client CA B");
    let client_a = ca_a.client("client-a");
    let client_b = ca_b.client("client-b");
    let mut s = stack(Options { client_ca: Some(ca_a.cert_pem().to_string()), ..Options::default() }).await;

    wait_served_serial_with(s.tls_addr, SNI, Some(&client_a), &s.first.serial_hex, WAIT).await;
    let refused = handshake(s.tls_addr, SNI, Some(&client_b)).await;
    assert!(refused.is_err(), "a client certificate from another CA is refused: {refused:?}");
    assert!(handshake(s.tls_addr, SNI, None).await.is_err(), "no client certificate is refused");

    // Swap the bundle to CA B: now B passes and A is refused.
    s.secret.swap_tls(&s.first, Some(ca_b.cert_pem()));
    wait_served_serial_with(s.tls_addr, SNI, Some(&client_b), &s.first.serial_hex, WAIT).await;
    let refused = handshake(s.tls_addr, SNI, Some(&client_a)).await;
    assert!(refused.is_err(), "after the bundle rotation CA A's client is refused: {refused:?}");

    // The CA bundle is its own secret.
    let ca_secret = format!("{NAME}-cacert");
    let status = s.certwire.secret_status(&ca_secret).await.expect("/status/secrets lists NAME-cacert");
    let fingerprint = normalize_hex(str_field(&status, "fingerprint_sha256"));
    assert_eq!(fingerprint, ca_b.cert.sha256_hex, "{ca_secret} is CA B's certificate");
}

/// What Istio's gateway asks on its credential socket: the full `sds://NAME` and
/// `sds://NAME-cacert`, over a Unix socket, for a listener with mutual TLS. certwire
/// answers with NAME's files under the names asked, and a rotation reaches Envoy.
#[tokio::test]
async fn sds_names_on_a_unix_socket_serve_mutual_tls() {
    let dir = util::tempdir();
    let root = dir.path().join("secrets");
    std::fs::create_dir(&root).unwrap();
    let (ca, clients) = (Ca::new("e2e server CA"), Ca::new("client CA"));
    let (first, client) = (ca.server(SNI), clients.client("client"));
    let mut secret = SecretDir::create_tls(&root, NAME, &first, Some(clients.cert_pem()));
    let socket = dir.path().join("credential.sock");
    let listen = format!("unix:{}", socket.display());
    let _certwire = Certwire::serve(["--listen", listen.as_str(), "--files", root.to_str().unwrap()]).await;
    let requested = format!("sds://{NAME}");
    let envoy = Envoy::start(&SdsBootstrap::new(&requested, SdsTarget::Unix(socket), 0).mtls().to_yaml()).await;
    let addr = envoy.listener_addr(&requested);

    wait_served_serial_with(addr, SNI, Some(&client), &first.serial_hex, WAIT).await;
    assert!(handshake(addr, SNI, None).await.is_err(), "sds://NAME-cacert requires the client certificate");
    let active = envoy.active_secrets().await.to_string();
    assert!(
        active.contains(&format!("\"{requested}\"")) && active.contains(&format!("\"{requested}-cacert\"")),
        "{active}"
    );

    let next = ca.server(SNI);
    secret.swap_tls(&next, Some(clients.cert_pem()));
    wait_served_serial_with(addr, SNI, Some(&client), &next.serial_hex, WAIT).await;
}

/// Istio 1.28-1.30 ask an extension provider's SDS server for the whole
/// `sds://PROVIDER`; an `[aliases]` entry serves a stored secret under it. The proxy
/// runs under a uid of its own and reaches certwire's socket through its group
/// (`unix_socket_mode` and `unix_socket_group`), and the policy names that uid only.
#[tokio::test]
async fn an_aliased_name_is_served_over_a_group_socket_to_the_allowed_uid() {
    const PROXY_UID: u32 = 65532;
    let dir = util::tempdir();
    let root = dir.path().join("secrets");
    std::fs::create_dir(&root).unwrap();
    let ca = Ca::new("e2e server CA");
    let first = ca.server(SNI);
    let mut secret = SecretDir::create_tls(&root, NAME, &first, None);
    // The proxy must be able to reach the socket's directory.
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = run.join("sds.sock");
    let config = dir.path().join("certwire.toml");
    std::fs::write(
        &config,
        format!(
            "listen = [\"unix:{socket}\"]
files = [\"{root}\"]
unix_socket_mode = \"0660\"
unix_socket_group = {PROXY_UID}

[aliases]
\"sds://provider\" = \"{NAME}\"

[authz]
mode = \"policy\"
[[authz.rules]]
identities = [\"uid:{PROXY_UID}\"]
secrets = [\"{NAME}\"]
",
            socket = socket.display(),
            root = root.display()
        ),
    )
    .unwrap();
    let certwire = Certwire::serve(["--config", config.to_str().unwrap()]).await;
    let meta = std::fs::metadata(&socket).unwrap();
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, PROXY_UID), "the socket is the proxies' group's");

    let requested = "sds://provider";
    let envoy = Envoy::start_as(&SdsBootstrap::new(requested, SdsTarget::Unix(socket), 0).to_yaml(), PROXY_UID).await;
    let addr = envoy.listener_addr(requested);
    wait_served_serial(addr, SNI, &first.serial_hex, WAIT).await;
    let proxies = certwire.get_json("/status/proxies").await.to_string();
    assert!(proxies.contains(&format!("uid={PROXY_UID}")) && proxies.contains(requested), "{proxies}");

    let next = ca.server(SNI);
    secret.swap_tls(&next, None);
    wait_served_serial(addr, SNI, &next.serial_hex, WAIT).await;
}

#[tokio::test]
async fn dev_source_serves_and_rotates() {
    let certwire = Certwire::serve(["--listen", "127.0.0.1:0", "--dev", "--dev-rotate-every", "2s"]).await;
    let bootstrap = SdsBootstrap::new(NAME, SdsTarget::Tcp(certwire.sds_addr()), 0);
    let envoy = Envoy::start(&bootstrap.to_yaml()).await;
    let addr = envoy.listener_addr(NAME);

    let first = wait_served(addr, SNI, None).await;
    let rotated = tls::poll_handshakes(addr, SNI, None, WAIT, |served| served.serial_hex != first.serial_hex)
        .await
        .unwrap_or_else(|last| panic!("the dev certificate {} never rotated; last: {last}", first.serial_hex));
    assert_ne!(rotated.sha256_hex, first.sha256_hex);
}

#[tokio::test]
async fn printed_bootstrap_runs_in_envoy() {
    let server = Certwire::serve(["--listen", "127.0.0.1:0", "--dev"]).await;
    let sds = server.sds_addr().to_string();
    let yaml = certwire::run(&[
        "bootstrap",
        "--sds",
        &sds,
        "--secret",
        NAME,
        "--listen-address",
        "127.0.0.1",
        "--listen-port",
        "0",
        "--admin-port",
        "0",
    ]);
    assert!(yaml.contains("set_node_on_first_message_only: true"));
    let envoy = Envoy::start(&yaml).await;
    let served = wait_served(envoy.listener_addr("https"), SNI, None).await;
    assert_eq!(served.http_status, 200);
    assert!(envoy.served_serials().await.contains(&served.serial_hex));
    // The node comes with the first request only, and the proxy is still known by it.
    let server = &server;
    util::wait_for("/status/proxies to name the Envoy of the bootstrap", WAIT, move || async move {
        let proxies = server.get_json("/status/proxies").await;
        proxies.as_array()?.iter().any(|p| p["node_id"].as_str() == Some("edge-envoy")).then_some(())
    })
    .await;
}

#[test]
fn printed_bootstrap_variants_are_valid_envoy_config() {
    let socket = util::tempdir();
    let unix = format!("unix:{}", socket.path().join("sds.sock").display());
    let extras = [
        &["--delta"][..],
        &["--mtls"],
        &["--delta", "--mtls"],
        &["--sds", &unix],
        &["--session-ticket-keys", "tickets://gw", "--ocsp-staple-policy", "must-staple"],
        &["--mtls", "--delta", "--session-ticket-keys", "gw", "--ocsp-staple-policy", "strict"],
    ];
    for extra in extras {
        let mut args = vec!["bootstrap", "--secret", NAME];
        args.extend_from_slice(extra);
        let yaml = certwire::run(&args);
        if let Err(err) = envoy::validate(&yaml) {
            panic!("certwire {args:?} printed a bootstrap Envoy refuses:\n{err}");
        }
    }
}

#[tokio::test]
async fn status_proxies_shows_the_envoy_acked_version() {
    let mut s = stack(Options::default()).await;
    let next = s.ca.server(SNI);
    s.secret.swap_tls(&next, None);
    wait_served_serial(s.tls_addr, SNI, &next.serial_hex, WAIT).await;

    let certwire = &s.certwire;
    let node_id = s.node_id.as_str();
    let (version, proxy) =
        util::wait_for("/status/proxies to show the current version acked", WAIT, move || async move {
            let secret = certwire.secret_status(NAME).await?;
            let version = secret["version"].as_str()?.to_string();
            let proxies = certwire.get_json("/status/proxies").await;
            let proxy = proxies.as_array()?.iter().find(|p| {
                p["node_id"].as_str() == Some(node_id)
                    && p["secrets"].as_array().into_iter().flatten().any(|n| {
                        n["name"].as_str() == Some(NAME) && n["acked_version"].as_str() == Some(version.as_str())
                    })
            })?;
            Some((version, proxy.clone()))
        })
        .await;
    assert_eq!(str_field(&proxy, "cluster"), "e2e", "{proxy}");
    assert!(!version.is_empty());
    let entry = proxy["secrets"].as_array().unwrap().iter().find(|n| n["name"] == NAME).unwrap();
    assert!(entry["last_nack"].is_null(), "no NACK recorded: {proxy}");
}

#[tokio::test]
async fn expired_certificate_is_refused_and_the_old_one_stays() {
    let mut s = stack(Options::default()).await;
    let expired = s.ca.issue(&LeafSpec::server(SNI).expired());

    s.secret.swap_tls(&expired, None);
    wait_rejected(&s.certwire, "expired").await;
    keeps_serving(s.tls_addr, &s.first.serial_hex).await;
}

#[tokio::test]
async fn allow_expired_serves_an_expired_certificate() {
    // The escape hatch for an outage caused by a missed renewal: serving an expired
    // certificate beats serving none. `stack` waits until Envoy serves it.
    let s = stack(Options { first_expired: true, extra_args: vec!["--allow-expired"], ..Options::default() }).await;
    let status = s.certwire.secret_status(NAME).await.expect("/status/secrets lists the secret");
    assert_eq!(normalize_hex(str_field(&status, "serial")), s.first.serial_hex);
}

#[tokio::test]
async fn chain_reaches_envoy_leaf_first() {
    let mut s = stack(Options::default()).await;
    let intermediate = s.ca.intermediate("e2e intermediate CA");
    let leaf = intermediate.issue(&LeafSpec::server(SNI));

    // Issuer before leaf, as some tools write bundles: certwire puts the leaf first.
    let bundle = format!("{}{}", intermediate.cert.cert_pem, leaf.cert_pem);
    s.secret.swap(&[(TLS_CRT, bundle.as_bytes()), (TLS_KEY, leaf.key_pem.as_bytes())]);

    let served = wait_served_serial(s.tls_addr, SNI, &leaf.serial_hex, WAIT).await;
    assert_eq!(served.chain_len, 2, "Envoy presents leaf and intermediate");
}

#[tokio::test]
async fn secret_created_after_envoy_asked_is_pushed_at_once() {
    let dir = util::tempdir();
    let root = dir.path().join("secrets");
    std::fs::create_dir(&root).unwrap();
    let certwire = Certwire::serve(["--listen", "127.0.0.1:0", "--files", root.to_str().unwrap()]).await;
    // The listener must keep waiting for the secret however long this takes.
    let bootstrap =
        SdsBootstrap::new(NAME, SdsTarget::Tcp(certwire.sds_addr()), 0).initial_fetch_timeout(Duration::ZERO);
    let envoy = Envoy::start(&bootstrap.to_yaml()).await;
    let addr = envoy.listener_addr(NAME);

    let certwire_ref = &certwire;
    util::wait_for("certwire to see Envoy's subscription", WAIT, move || async move {
        let secret = certwire_ref.secret_status(NAME).await;
        let proxies = certwire_ref.get_json("/status/proxies").await;
        let asked = proxies
            .as_array()?
            .iter()
            .any(|p| p["secrets"].as_array().into_iter().flatten().any(|n| n["name"].as_str() == Some(NAME)));
        (asked || secret.is_some_and(|s| s["subscribers"].as_u64() > Some(0))).then_some(())
    })
    .await;
    assert!(handshake(addr, SNI, None).await.is_err(), "no certificate can be served before the secret exists");

    let ca = Ca::new("late CA");
    let leaf = ca.server(SNI);
    let _secret = SecretDir::create(&root, NAME, &tls_files(&leaf, None));
    wait_served_serial(addr, SNI, &leaf.serial_hex, WAIT).await;
}

#[tokio::test]
async fn deleted_secret_leaves_envoy_serving_until_it_returns() {
    let s = stack(Options::default()).await;
    let root = s.secret.path().parent().unwrap().to_path_buf();

    std::fs::remove_dir_all(s.secret.path()).unwrap();
    let certwire = &s.certwire;
    util::wait_for("/status/secrets to mark the secret deleted", WAIT, move || async move {
        let status = certwire.secret_status(NAME).await;
        status.is_none_or(|s| s["deleted"] == Value::Bool(true)).then_some(())
    })
    .await;
    keeps_serving(s.tls_addr, &s.first.serial_hex).await;

    let back = s.ca.server(SNI);
    let _secret = SecretDir::create_tls(&root, NAME, &back, None);
    wait_served_serial(s.tls_addr, SNI, &back.serial_hex, WAIT).await;
}
