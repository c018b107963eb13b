//! Fleet-wide TLS session ticket keys (`[[tickets]]`) with real Envoys and the real
//! `openssl s_client`: a TLS 1.2 session ticket issued by one Envoy is resumed by
//! another (`Reused`), a ticket stays resumable while its key is still served after a
//! rotation and not once the key is gone, and two certwire replicas on one state
//! directory (or Kubernetes Secret) serve the same keys. Ticket keys an operator keeps
//! in a Secret or a directory are served by the Kubernetes and files sources.
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
use common::kubeapi::{self, KubeApi};
use common::util::{self, WAIT};
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
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
    let (name, keys) = ticket_keys(&response).expect("one session_ticket_keys resource of inline keys");
    assert_eq!(name, TICKETS);
    assert!(keys.iter().all(|k| k.len() == 80), "80-byte keys");
    (response.version_info, keys)
}

/// The name and keys of the first resource of `response`, if it is session ticket keys
/// given inline.
fn ticket_keys(response: &DiscoveryResponse) -> Option<(String, Vec<Vec<u8>>)> {
    let secret = Secret::decode(&response.resources.first()?.value[..]).ok()?;
    let Some(secret::Type::SessionTicketKeys(keys)) = secret.r#type else { return None };
    let keys = keys.keys.into_iter().map(|k| match k.specifier {
        Some(Specifier::InlineBytes(b)) => Some(b),
        _ => None,
    });
    Some((secret.name, keys.collect::<Option<_>>()?))
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
    envoy_with(sds, tickets.then_some(TICKETS)).await
}

/// An Envoy whose listener takes its ticket keys from the secret `tickets`, if any.
async fn envoy_with(sds: SocketAddr, tickets: Option<&str>) -> (Envoy, SocketAddr) {
    let mut bootstrap = SdsBootstrap::new(CERT, SdsTarget::Tcp(sds), 0);
    if let Some(name) = tickets {
        bootstrap = bootstrap.session_ticket_keys(name);
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
    assert_eq!(status["kind"], "session_ticket_keys");
    assert_eq!(status["source"], "tickets");
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

/// Two replicas with `config` (and `args`) serve the same keys through three rotations.
async fn replicas_agree(config: &Path, args: &[&str]) -> (Certwire, Certwire) {
    let start = || async {
        let mut all = vec!["--config", config.to_str().unwrap(), "--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        Certwire::serve(all.iter().map(|a| a.to_string())).await
    };
    let one = start().await;
    let two = start().await;
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
    let rotations = one.metric_sum("certwire_ticket_key_rotations_total", &[("secret", TICKETS)]).await
        + two.metric_sum("certwire_ticket_key_rotations_total", &[("secret", TICKETS)]).await;
    assert!(rotations >= 2.0, "rotations written by the fleet: {rotations}");
    (one, two)
}

const FAST: &str = "rotate_every = \"3s\"\nkeep = 1\npropagation = \"1s\"\n";

#[tokio::test]
async fn two_replicas_sharing_a_state_directory_serve_identical_keys() {
    let dir = util::tempdir();
    let state = dir.path().join("state");
    let config = config(dir.path(), &state, FAST);
    let (one, _two) = replicas_agree(&config, &[]).await;
    // The keys file on the volume is what they serve.
    util::wait_for("the keys file holds the served keys", WAIT, || async {
        let (_, keys) = served_keys(one.sds_addr()).await;
        (std::fs::read(state.join("tls.session-ticket-keys")).ok()? == keys.concat()).then_some(())
    })
    .await;
}

#[tokio::test]
async fn two_replicas_sharing_a_kubernetes_secret_serve_identical_keys() {
    let api = KubeApi::start().await;
    let dir = util::tempdir();
    let kubeconfig = api.kubeconfig(dir.path());
    let kc = kubeconfig.to_str().unwrap();
    let path = dir.path().join("certwire.toml");
    std::fs::write(
        &path,
        format!("[[tickets]]\nname = \"{TICKETS}\"\nstate = \"kubernetes://default/tickets\"\n{FAST}"),
    )
    .unwrap();
    let (one, _two) = replicas_agree(&path, &["--kubeconfig", kc]).await;
    // kubectl shows the keys Envoy gets, in the shared format.
    util::wait_for("the Secret holds the served keys", WAIT, || async {
        let (_, keys) = served_keys(one.sds_addr()).await;
        let out = kubeapi::kubectl_ok(
            &kubeconfig,
            &["get", "secret", "tickets", "-n", "default", "-o", "jsonpath={.data.tls\\.session-ticket-keys}"],
        )
        .await;
        use base64::Engine as _;
        let on_api = base64::engine::general_purpose::STANDARD.decode(out.trim()).ok()?;
        (on_api == keys.concat()).then_some(())
    })
    .await;

    // A Secret of that name that certwire did not write: reported, untouched, and
    // certwire starts anyway (a broken shared state must not keep every replica down).
    api.put_object(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "foreign", "namespace": "default"},
        "data": {"tls.session-ticket-keys": "AAAA"},
    }));
    let foreign = dir.path().join("foreign.toml");
    std::fs::write(&foreign, format!("[[tickets]]\nname = \"{TICKETS}\"\nstate = \"kubernetes://default/foreign\"\n"))
        .unwrap();
    let started =
        Certwire::serve(["--config", foreign.to_str().unwrap(), "--kubeconfig", kc, "--listen", "127.0.0.1:0"]).await;
    let status = started.secret_status(TICKETS).await.expect("the name is in /status/secrets");
    let last_error = status["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.contains("kubernetes://default/foreign") && last_error.contains("not written by certwire"),
        "{status}"
    );
    assert!(attack::fetch(started.sds_addr(), &[TICKETS.to_string()]).await.map_or(true, |r| r.resources.is_empty()));
    let kept = api.get_object("v1", "Secret", "default", "foreign").unwrap();
    assert_eq!(kept["data"]["tls.session-ticket-keys"], "AAAA", "not overwritten");
}

/// A `[[tickets]]` name wins over any other source: a files directory (or a Secret) of
/// the same name, which whoever writes there controls, does not replace the keys the
/// operator configured.
#[tokio::test]
async fn a_tickets_name_wins_over_a_files_directory_of_the_same_name() {
    let dir = util::tempdir();
    let root = dir.path().join("secrets");
    std::fs::create_dir_all(root.join(TICKETS)).unwrap();
    let planted = vec![0x42u8; 80];
    std::fs::write(root.join(TICKETS).join("tls.session-ticket-keys"), &planted).unwrap();
    let state = dir.path().join("state");
    let config = config(dir.path(), &state, "");
    let certwire = Certwire::serve([
        "--config",
        config.to_str().unwrap(),
        "--files",
        root.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    let (_, keys) = served_keys(certwire.sds_addr()).await;
    assert!(!keys.contains(&planted), "the files directory's keys are not served");
    assert_eq!(keys.concat(), std::fs::read(state.join("tls.session-ticket-keys")).unwrap(), "the fleet's keys");
}

/// The state directory is a secret directory in the format the files source reads: an
/// operator can serve (or copy) it with `--files`, and gets the same keys.
#[tokio::test]
async fn the_state_directory_is_served_as_is_by_the_files_source() {
    let dir = util::tempdir();
    let root = dir.path().join("secrets");
    std::fs::create_dir(&root).unwrap();
    let config = config(dir.path(), &root.join("copy"), "");
    let certwire = Certwire::serve([
        "--config",
        config.to_str().unwrap(),
        "--files",
        root.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    let sds = certwire.sds_addr();
    let (_, keys) = served_keys(sds).await;
    util::wait_for("the files source serves the state directory", WAIT, || async {
        let response = attack::fetch(sds, &["copy".to_string()]).await.ok()?;
        let (_, from_files) = ticket_keys(&response)?;
        (from_files == keys).then_some(())
    })
    .await;
}

/// Ticket keys an operator keeps in a Secret (`tls.session-ticket-keys`, written with
/// kubectl) are served by the Kubernetes source: two Envoys resume each other's
/// sessions with them, and a replaced Secret's new first key seals the next tickets.
#[tokio::test]
async fn ticket_keys_from_a_kubernetes_secret_are_shared_by_envoys() {
    const NS: &str = "gateway";
    let api = KubeApi::start().await;
    let dir = util::tempdir();
    let kubeconfig = api.kubeconfig(dir.path());
    let keys_file = |first: u8| {
        let path = dir.path().join(format!("keys-{first}.bin"));
        let keys: Vec<u8> = (0..160u8).map(|i| if i < 80 { first ^ i } else { i }).collect();
        std::fs::write(&path, &keys).unwrap();
        (path.to_str().unwrap().to_owned(), keys[..16].to_vec())
    };
    let secret = |keys: &str, extra: &[&str]| {
        let mut args = vec!["create".to_owned(), "secret".into(), "generic".into(), "gw-tickets".into()];
        args.extend(["-n".into(), NS.into(), format!("--from-file=tls.session-ticket-keys={keys}")]);
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let kubectl = |args: Vec<String>| {
        let kubeconfig = kubeconfig.clone();
        async move { kubeapi::kubectl_ok(&kubeconfig, &args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    kubectl(["create", "namespace", NS].map(String::from).to_vec()).await;
    let (first_keys, first_name) = keys_file(1);
    kubectl(secret(&first_keys, &[])).await;

    let kubeconfig_arg = kubeconfig.to_str().unwrap().to_owned();
    let certwire =
        Certwire::serve(["--listen", "127.0.0.1:0", "--dev", "--kubeconfig", &kubeconfig_arg, "--namespace", NS]).await;
    let sds = certwire.sds_addr();
    let name = format!("kubernetes://{NS}/gw-tickets");
    let (_a, a_addr) = envoy_with(sds, Some(&name)).await;
    let (_b, b_addr) = envoy_with(sds, Some(&name)).await;

    let session = dir.path().join("k.session");
    util::wait_for("a ticket sealed with the Secret's first key", WAIT, || async {
        (new_session(a_addr, &session).await == first_name).then_some(())
    })
    .await;
    assert!(s_client(b_addr, Some(&session), None).await, "Envoy B resumed Envoy A's session");

    // The Secret replaced with other keys: the next tickets are sealed with its first.
    let (second_keys, second_name) = keys_file(2);
    let manifest = kubectl(secret(&second_keys, &["--dry-run=client", "-o", "yaml"])).await;
    let path = dir.path().join("replaced.yaml");
    std::fs::write(&path, manifest).unwrap();
    kubectl(vec!["replace".into(), "-f".into(), path.to_str().unwrap().into()]).await;
    util::wait_for("a ticket sealed with the replaced Secret's first key", WAIT, || async {
        (new_session(b_addr, &session).await == second_name).then_some(())
    })
    .await;
    assert!(s_client(a_addr, Some(&session), None).await, "Envoy A resumed Envoy B's new session");
}
