//! Fleet-wide TLS session ticket keys (`[[tickets]]`) with real Envoys and the real
//! `openssl s_client`: a TLS 1.2 session ticket issued by one Envoy is resumed by
//! another (`Reused`), a ticket stays resumable while its key is still served after a
//! rotation and not once the key is gone, and two certwire replicas on one state
//! directory serve the same keys.
//!
//! Which key sealed a ticket is read from the ticket itself (BoringSSL puts the key's
//! 16-byte name first), and every resumption is tried only once Envoy holds the keys
//! certwire serves (same `version_info`), so no outcome depends on timing.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::attack;
use common::bootstrap::{SdsBootstrap, SdsTarget};
use common::certwire::Certwire;
use common::envoy::Envoy;
use common::util::{self, WAIT};
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use prost::Message as _;

const TICKETS: &str = "gw-tickets";
/// The listener's certificate, minted by the dev CA (the same for every Envoy of one
/// certwire: resumption also needs the same certificate).
const CERT: &str = "web";

/// `[[tickets]]` for TICKETS in `state`, with `extra` lines.
fn config(dir: &Path, state: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("certwire.toml");
    let text = format!("[[tickets]]\nname = \"{TICKETS}\"\nstate = \"{}\"\n{extra}", state.display());
    std::fs::write(&path, text).unwrap();
    path
}

async fn certwire(config: &Path, dev: bool) -> Certwire {
    let mut args = vec!["--config".to_string(), config.display().to_string(), "--listen".into(), "127.0.0.1:0".into()];
    if dev {
        args.push("--dev".into());
    }
    Certwire::serve(args).await
}

/// The keys certwire serves for TICKETS (first encrypts) and the response version.
async fn served_keys(sds: SocketAddr) -> (String, Vec<Vec<u8>>) {
    let response = attack::fetch(sds, &[TICKETS.to_string()]).await.expect("fetch the ticket keys");
    let any = response.resources.first().expect("one resource");
    let secret = Secret::decode(&any.value[..]).expect("a Secret");
    assert_eq!(secret.name, TICKETS);
    let Some(secret::Type::SessionTicketKeys(keys)) = secret.r#type else { panic!("not session ticket keys") };
    let keys = keys
        .keys
        .into_iter()
        .map(|k| match k.specifier {
            Some(Specifier::InlineBytes(b)) => b,
            other => panic!("key not inline bytes: {other:?}"),
        })
        .collect::<Vec<_>>();
    assert!(keys.iter().all(|k| k.len() == 80), "80-byte keys");
    (response.version_info, keys)
}

/// The `version_info` of TICKETS as Envoy holds it.
async fn envoy_version(envoy: &Envoy) -> Option<String> {
    let dump = envoy.active_secrets().await;
    dump["configs"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == TICKETS)
        .and_then(|s| s["version_info"].as_str().map(str::to_owned))
}

/// Waits until every Envoy holds the keys certwire serves now; returns them.
async fn synced(sds: SocketAddr, envoys: &[&Envoy]) -> (String, Vec<Vec<u8>>) {
    util::wait_for("Envoys hold the ticket keys certwire serves", WAIT, || async {
        let (version, keys) = served_keys(sds).await;
        for envoy in envoys {
            if envoy_version(envoy).await.as_deref() != Some(version.as_str()) {
                return None;
            }
        }
        Some((version, keys))
    })
    .await
}

async fn envoy(sds: SocketAddr, tickets: bool) -> (Envoy, SocketAddr) {
    let mut bootstrap = SdsBootstrap::new(CERT, SdsTarget::Tcp(sds), 0);
    if tickets {
        bootstrap = bootstrap.session_ticket_keys(TICKETS);
    }
    let envoy = Envoy::start(&bootstrap.to_yaml()).await;
    let addr = envoy.wait_listener_addr(CERT).await;
    (envoy, addr)
}

/// A TLS 1.2 handshake with `openssl s_client`, saving the session to `out` or resuming
/// `resume`; true when the session was resumed.
async fn s_client(addr: SocketAddr, resume: Option<&Path>, out: Option<&Path>) -> bool {
    let mut cmd = tokio::process::Command::new("openssl");
    cmd.args(["s_client", "-connect", &addr.to_string(), "-servername", "localhost", "-tls1_2"]);
    if let Some(p) = resume {
        cmd.arg("-sess_in").arg(p);
    }
    if let Some(p) = out {
        cmd.arg("-sess_out").arg(p);
    }
    cmd.stdin(std::process::Stdio::null());
    let output = tokio::time::timeout(WAIT, cmd.output()).await.expect("s_client finished").expect("run openssl");
    let text = String::from_utf8_lossy(&output.stdout);
    let reused = text.lines().any(|l| l.starts_with("Reused,"));
    assert!(reused || text.lines().any(|l| l.starts_with("New,")), "no TLS session with {addr}: {text}");
    reused
}

/// A new session from `addr` saved to `path`, retried while the listener warms up;
/// returns the name (first 16 bytes) of the key that sealed its ticket.
async fn new_session(addr: SocketAddr, path: &Path) -> Vec<u8> {
    util::wait_for("a TLS 1.2 session with a ticket", WAIT, || async {
        let _ = std::fs::remove_file(path);
        let ok = tokio::process::Command::new("openssl")
            .args(["s_client", "-connect", &addr.to_string(), "-servername", "localhost", "-tls1_2", "-sess_out"])
            .arg(path)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("New,")));
        if !ok {
            return None;
        }
        ticket_key_name(path)
    })
    .await
}

/// The first 16 bytes of the session's ticket, from `openssl sess_id -text`.
fn ticket_key_name(session: &Path) -> Option<Vec<u8>> {
    let output =
        std::process::Command::new("openssl").args(["sess_id", "-noout", "-text", "-in"]).arg(session).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut lines = text.lines().skip_while(|l| !l.trim_start().starts_with("TLS session ticket:"));
    lines.next()?;
    // `    0000 - ed 16 63 4d e9 5f 71 58-fd bf 78 9d 4b 51 1c c7   ..cM._qX..x.KQ..`
    let first = lines.next()?.trim_start().strip_prefix("0000 - ")?;
    let hex: String = first.chars().take(47).filter(|c| c.is_ascii_hexdigit()).collect();
    let bytes = hex::decode(hex).ok()?;
    (bytes.len() == 16).then_some(bytes)
}

fn names(keys: &[Vec<u8>]) -> Vec<Vec<u8>> {
    keys.iter().map(|k| k[..16].to_vec()).collect()
}

#[tokio::test]
async fn a_session_from_one_envoy_resumes_on_another() {
    let dir = util::tempdir();
    let config = config(dir.path(), &dir.path().join("state"), "");
    let certwire = certwire(&config, true).await;
    let sds = certwire.sds_addr();
    let (a, a_addr) = envoy(sds, true).await;
    let (b, b_addr) = envoy(sds, true).await;
    // Control: an Envoy making its own keys, as without certwire.
    let (own, own_addr) = envoy(sds, false).await;
    let (_, keys) = synced(sds, &[&a, &b]).await;
    assert_eq!(keys.len(), 1);

    let session = dir.path().join("a.session");
    let sealed_by = new_session(a_addr, &session).await;
    assert_eq!(sealed_by, keys[0][..16], "Envoy A sealed the ticket with certwire's key");
    assert!(s_client(b_addr, Some(&session), None).await, "Envoy B resumed Envoy A's session");
    assert!(s_client(a_addr, Some(&session), None).await, "and A itself");
    util::wait_for("the control Envoy serves TLS", WAIT, || async {
        tokio::net::TcpStream::connect(own_addr).await.ok()
    })
    .await;
    assert!(!s_client(own_addr, Some(&session), None).await, "an Envoy with its own keys cannot resume it");

    // The name is in status like any secret, without key bytes.
    let status = certwire.secret_status(TICKETS).await.expect("status of the ticket keys");
    let text = status.to_string();
    assert!(!text.contains(&hex::encode(&keys[0][16..32])), "no key bytes in status: {text}");
    let metrics = certwire.metrics().await;
    assert!(!metrics.contains(&hex::encode(&keys[0][..8])));
    drop(own);
}

#[tokio::test]
async fn rotation_keeps_tickets_within_the_overlap_and_drops_older_ones() {
    let dir = util::tempdir();
    let extra = "rotate_every = \"6s\"\nkeep = 1\npropagation = \"2s\"\n";
    let config = config(dir.path(), &dir.path().join("state"), extra);
    let certwire = certwire(&config, true).await;
    let sds = certwire.sds_addr();
    let (envoy, addr) = envoy(sds, true).await;
    let session = dir.path().join("s.session");

    // A ticket sealed by the key that encrypts now.
    let sealed_by = util::wait_for("a ticket sealed by the first key Envoy holds", WAIT, || async {
        let (version, keys) = synced(sds, &[&envoy]).await;
        let name = new_session(addr, &session).await;
        let (after, _) = served_keys(sds).await;
        (after == version && name == keys[0][..16]).then_some(name)
    })
    .await;

    // Rotated: the key is decrypt-only now; the ticket still resumes. Tried only while
    // Envoy holds one version from before the attempt to after it.
    let mut resumed = None;
    for _ in 0..20 {
        let (version, keys) = util::wait_for("the ticket's key demoted", WAIT, || async {
            let (version, keys) = synced(sds, &[&envoy]).await;
            let names = names(&keys);
            (names.contains(&sealed_by) && names[0] != sealed_by).then_some((version, keys))
        })
        .await;
        let outcome = s_client(addr, Some(&session), None).await;
        if envoy_version(&envoy).await.as_deref() == Some(version.as_str()) {
            resumed = Some((outcome, keys.len()));
            break;
        }
    }
    let (outcome, held) = resumed.expect("a resumption attempt within one version");
    assert!(outcome, "a ticket whose key is still served after a rotation resumes ({held} keys held)");

    // Older than the overlap: the key is gone from what Envoy holds; not resumed.
    util::wait_for("the ticket's key dropped", WAIT, || async {
        let (_, keys) = synced(sds, &[&envoy]).await;
        (!names(&keys).contains(&sealed_by)).then_some(())
    })
    .await;
    assert!(!s_client(addr, Some(&session), None).await, "a ticket older than the overlap is not resumed");
    assert!(certwire.metric_sum("certwire_ticket_key_rotations_total", &[("secret", TICKETS)]).await >= 2.0);
}

#[tokio::test]
async fn two_replicas_sharing_a_state_directory_serve_identical_keys() {
    let dir = util::tempdir();
    let extra = "rotate_every = \"3s\"\nkeep = 1\npropagation = \"1s\"\n";
    let config = config(dir.path(), &dir.path().join("state"), extra);
    let one = certwire(&config, false).await;
    let two = certwire(&config, false).await;
    let (a, b) = (one.sds_addr(), two.sds_addr());

    let mut seen_first = Vec::new();
    for round in 0..3 {
        let keys = util::wait_for("both replicas serve the same keys", WAIT, || async {
            let (_, ka) = served_keys(a).await;
            let (_, kb) = served_keys(b).await;
            (ka == kb && !seen_first.contains(&ka[0])).then_some(ka)
        })
        .await;
        if round > 0 {
            assert!(keys.len() >= 2, "after a rotation the previous key is still served: {} keys", keys.len());
        }
        seen_first.push(keys[0].clone());
    }
    // Both wrote to the one state; the keys file is what they serve.
    let on_disk = std::fs::read(dir.path().join("state/tls.session-ticket-keys")).unwrap();
    assert_eq!(on_disk.len() % 80, 0);
    let rotations = one.metric_sum("certwire_ticket_key_rotations_total", &[("secret", TICKETS)]).await
        + two.metric_sum("certwire_ticket_key_rotations_total", &[("secret", TICKETS)]).await;
    assert!(rotations >= 2.0, "rotations written by the fleet: {rotations}");
}
