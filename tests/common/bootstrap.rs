//! Envoy bootstrap YAML for tests: one TLS listener answering every request with a
//! direct `200 ok`, its certificate (and for mutual TLS its CA bundle) coming either
//! from certwire over SDS or from Envoy's own file watch (the benchmark baseline).
//!
//! The admin listener is always `127.0.0.1:0`; [`super::envoy::Envoy`] learns the
//! real port from `--admin-address-path`, which cannot race with other tests. The TLS
//! listeners are named after their secret and take port 0 unless told otherwise:
//! [`super::envoy::Envoy::listener_addr`] gives the address Envoy bound.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Where Envoy reaches certwire's SDS.
#[derive(Debug, Clone)]
pub enum SdsTarget {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl SdsTarget {
    /// certwire's `--listen` spelling of this address.
    pub fn listen_arg(&self) -> String {
        match self {
            SdsTarget::Tcp(addr) => addr.to_string(),
            SdsTarget::Unix(path) => format!("unix:{}", path.display()),
        }
    }
}

/// A bootstrap whose listener takes its secrets from certwire over gRPC.
#[derive(Debug, Clone)]
pub struct SdsBootstrap {
    pub node_id: String,
    pub node_cluster: String,
    /// 0: Envoy binds a free port, see [`super::envoy::Envoy::listener_addr`].
    pub listen_port: u16,
    pub secret: String,
    pub sds: SdsTarget,
    /// DELTA_GRPC instead of GRPC (state of the world).
    pub delta: bool,
    /// Require a client certificate checked against the secret `SECRET-cacert`.
    pub mtls: bool,
    /// Envoy's default is 15 s, after which the listener goes live without a
    /// certificate. `Some(ZERO)` waits forever.
    pub initial_fetch_timeout: Option<Duration>,
    /// TLS to certwire: Envoy's client certificate and the CA it checks certwire with.
    pub upstream_tls: Option<UpstreamTls>,
    /// More listeners on the same SDS cluster, one per secret, each on a free port.
    pub more_listeners: Vec<String>,
    /// When set, the main listener has one filter chain per (SNI, secret) instead of
    /// one for `secret`: a gateway serving several hostnames on one port.
    pub sni_chains: Vec<(String, String)>,
    /// With `mtls`, the CA bundle's secret name instead of `SECRET-cacert`.
    pub ca_secret: Option<String>,
    /// The main listener's `session_ticket_keys_sds_secret_config`, by secret name.
    pub session_ticket_keys: Option<String>,
}

/// The SDS cluster's `UpstreamTlsContext`: files in a directory (`tls.crt`, `tls.key`,
/// `ca.crt`), reloaded by Envoy's `watched_directory`, and the SAN certwire must have.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub dir: PathBuf,
    pub server_name: String,
}

impl SdsBootstrap {
    /// A listener named `secret` serving it on 127.0.0.1:`listen_port`; pass 0 and ask
    /// [`super::envoy::Envoy::listener_addr`] which port Envoy bound.
    pub fn new(secret: &str, sds: SdsTarget, listen_port: u16) -> SdsBootstrap {
        SdsBootstrap {
            node_id: unique_node_id(secret),
            node_cluster: "e2e".to_string(),
            listen_port,
            secret: secret.to_string(),
            sds,
            delta: false,
            mtls: false,
            initial_fetch_timeout: None,
            upstream_tls: None,
            more_listeners: Vec::new(),
            sni_chains: Vec::new(),
            ca_secret: None,
            session_ticket_keys: None,
        }
    }

    /// The main listener's TLS session ticket keys from certwire, secret `name`.
    pub fn session_ticket_keys(mut self, name: &str) -> SdsBootstrap {
        self.session_ticket_keys = Some(name.to_string());
        self
    }

    /// Mutual TLS with the client CA from secret `name` (e.g. `configmap://NS/NAME`).
    pub fn ca_secret(mut self, name: &str) -> SdsBootstrap {
        self.mtls = true;
        self.ca_secret = Some(name.to_string());
        self
    }

    /// A filter chain on the main listener for hostname `sni`, serving `secret`.
    pub fn sni_chain(mut self, sni: &str, secret: &str) -> SdsBootstrap {
        self.sni_chains.push((sni.to_string(), secret.to_string()));
        self
    }

    pub fn upstream_tls(mut self, dir: &Path, server_name: &str) -> SdsBootstrap {
        self.upstream_tls = Some(UpstreamTls { dir: dir.to_path_buf(), server_name: server_name.to_string() });
        self
    }

    /// One more listener, named `secret` and serving it, on a free port.
    pub fn listener(mut self, secret: &str) -> SdsBootstrap {
        self.more_listeners.push(secret.to_string());
        self
    }

    pub fn delta(mut self) -> SdsBootstrap {
        self.delta = true;
        self
    }

    pub fn mtls(mut self) -> SdsBootstrap {
        self.mtls = true;
        self
    }

    pub fn node(mut self, id: &str, cluster: &str) -> SdsBootstrap {
        self.node_id = id.to_string();
        self.node_cluster = cluster.to_string();
        self
    }

    pub fn initial_fetch_timeout(mut self, timeout: Duration) -> SdsBootstrap {
        self.initial_fetch_timeout = Some(timeout);
        self
    }

    pub fn to_yaml(&self) -> String {
        let api_type = if self.delta { "DELTA_GRPC" } else { "GRPC" };
        let mut sds_config = format!(
            "resource_api_version: V3
api_config_source:
  api_type: {api_type}
  transport_api_version: V3
  grpc_services:
  - envoy_grpc:
      cluster_name: certwire
      # Reconnect quickly: tests restart certwire and must not wait out Envoy's
      # default backoff (up to 30 s).
      retry_policy:
        retry_back_off: {{base_interval: 0.1s, max_interval: 1s}}
"
        );
        if let Some(timeout) = self.initial_fetch_timeout {
            let _ = writeln!(sds_config, "initial_fetch_timeout: {}s", timeout.as_secs_f64());
        }
        let mut listeners = if self.sni_chains.is_empty() {
            let mut tls = tls_context(&self.secret, &sds_config, self.mtls.then_some(sds_config.as_str()));
            if let Some(ca) = &self.ca_secret {
                tls = tls.replace(&format!("name: \"{}-cacert\"", self.secret), &format!("name: \"{ca}\""));
            }
            if let Some(keys) = &self.session_ticket_keys {
                let sds = indent(&sds_config, 4);
                let _ = write!(tls, "session_ticket_keys_sds_secret_config:\n  name: \"{keys}\"\n  sds_config:\n{sds}");
            }
            listener(&self.secret, self.listen_port, &tls)
        } else {
            let chains: Vec<(Option<&str>, String)> = self
                .sni_chains
                .iter()
                .map(|(sni, secret)| {
                    (Some(sni.as_str()), tls_context(secret, &sds_config, self.mtls.then_some(sds_config.as_str())))
                })
                .collect();
            listener_chains(&self.secret, self.listen_port, &chains)
        };
        for secret in &self.more_listeners {
            let tls = tls_context(secret, &sds_config, self.mtls.then_some(sds_config.as_str()));
            listeners.push_str(&listener(secret, 0, &tls));
        }
        let transport = match &self.upstream_tls {
            None => String::new(),
            Some(t) => {
                let dir = t.dir.display();
                format!(
                    "    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: \"{name}\"
        common_tls_context:
          alpn_protocols: [h2]
          tls_certificates:
          - certificate_chain: {{filename: \"{dir}/tls.crt\"}}
            private_key: {{filename: \"{dir}/tls.key\"}}
            watched_directory: {{path: \"{dir}\"}}
          validation_context:
            trusted_ca: {{filename: \"{dir}/ca.crt\"}}
            watched_directory: {{path: \"{dir}\"}}
            match_typed_subject_alt_names:
            - san_type: DNS
              matcher: {{exact: \"{name}\"}}
",
                    name = t.server_name
                )
            }
        };
        format!(
            "node: {{id: \"{node_id}\", cluster: \"{node_cluster}\"}}
{admin}
static_resources:
  listeners:
{listener}
  clusters:
{cluster}{transport}",
            node_id = self.node_id,
            node_cluster = self.node_cluster,
            admin = ADMIN,
            listener = listeners,
            cluster = certwire_cluster(&self.sds),
        )
    }
}

/// The static cluster `certwire` that reaches certwire at `sds`, as an item of
/// `static_resources.clusters` (a `transport_socket` may follow it).
pub fn certwire_cluster(sds: &SdsTarget) -> String {
    let endpoint = match sds {
        SdsTarget::Tcp(addr) => format!("socket_address: {{address: \"{}\", port_value: {}}}", addr.ip(), addr.port()),
        SdsTarget::Unix(path) => format!("pipe: {{path: \"{}\"}}", path.display()),
    };
    format!(
        "  - name: certwire
    type: STATIC
    connect_timeout: 1s
    # SDS is gRPC: without HTTP/2 the stream fails at run time, although
    # `--mode validate` accepts the config.
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: certwire
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              {endpoint}
"
    )
}

/// A bootstrap that reads `secret_dir` (kubelet layout: `tls.crt`, `tls.key`,
/// `ca.crt` symlinks) through Envoy's own file-based SDS with `watched_directory`,
/// so an atomic `..data` swap reloads the pair. This is what certwire is measured
/// against. The SDS resource files are written into `work_dir`.
pub fn file_watch_bootstrap(work_dir: &Path, secret: &str, secret_dir: &Path, listen_port: u16, mtls: bool) -> String {
    let dir = secret_dir.display();
    let cert_file = work_dir.join(format!("sds-{secret}.yaml"));
    write_file(
        &cert_file,
        &format!(
            "resources:
- \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
  name: \"{secret}\"
  tls_certificate:
    certificate_chain: {{filename: \"{dir}/tls.crt\"}}
    private_key: {{filename: \"{dir}/tls.key\"}}
    watched_directory: {{path: \"{dir}\"}}
"
        ),
    );
    let ca_file = work_dir.join(format!("sds-{secret}-cacert.yaml"));
    if mtls {
        write_file(
            &ca_file,
            &format!(
                "resources:
- \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
  name: \"{secret}-cacert\"
  validation_context:
    trusted_ca: {{filename: \"{dir}/ca.crt\"}}
    watched_directory: {{path: \"{dir}\"}}
"
            ),
        );
    }
    // Each secret needs its own file: Envoy's file-based SDS expects exactly one
    // resource per subscription.
    let cert_sds = path_sds_config(&cert_file);
    let ca_sds = path_sds_config(&ca_file);
    let tls = tls_context(secret, &cert_sds, mtls.then_some(ca_sds.as_str()));
    format!(
        "node: {{id: \"{node_id}\", cluster: \"e2e\"}}
{ADMIN}
static_resources:
  listeners:
{listener}",
        node_id = unique_node_id(&format!("filewatch-{secret}")),
        listener = listener(secret, listen_port, &tls)
    )
}

/// `e2e-SECRET-N`, N counting the bootstraps of this test process (each test starts
/// its own certwire), with the characters of a secret such as `kubernetes://ns/name`
/// that do not belong in an id replaced by `-`.
fn unique_node_id(secret: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let secret: String =
        secret.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '-' }).collect();
    format!("e2e-{secret}-{n}")
}

const ADMIN: &str = "admin:
  address: {socket_address: {address: \"127.0.0.1\", port_value: 0}}";

fn path_sds_config(file: &Path) -> String {
    format!("resource_api_version: V3\npath_config_source: {{path: \"{}\"}}\n", file.display())
}

/// The DownstreamTlsContext body (without `@type`): the certificate from `cert_sds`,
/// and with `ca_sds` a required client certificate checked against `SECRET-cacert`.
fn tls_context(secret: &str, cert_sds: &str, ca_sds: Option<&str>) -> String {
    let mut tls = format!(
        "common_tls_context:
  tls_certificate_sds_secret_configs:
  - name: \"{secret}\"
    sds_config:
{sds}",
        sds = indent(cert_sds, 6)
    );
    if let Some(ca_sds) = ca_sds {
        let _ = write!(
            tls,
            "  validation_context_sds_secret_config:
    name: \"{secret}-cacert\"
    sds_config:
{sds}require_client_certificate: true
",
            sds = indent(ca_sds, 6)
        );
    }
    tls
}

/// A static listener `name` on 127.0.0.1:`port` (0: any free port) with the given
/// DownstreamTlsContext body.
fn listener(name: &str, port: u16, tls_context: &str) -> String {
    listener_chains(name, port, &[(None, tls_context.to_string())])
}

/// A static listener with one filter chain per DownstreamTlsContext body, matched on
/// its SNI when one is given.
fn listener_chains(name: &str, port: u16, chains: &[(Option<&str>, String)]) -> String {
    let mut out = format!(
        "  - name: \"{name}\"
    address: {{socket_address: {{address: \"127.0.0.1\", port_value: {port}}}}}
"
    );
    if chains.iter().any(|(sni, _)| sni.is_some()) {
        // Matching on SNI needs the ClientHello read first.
        out.push_str(
            "    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config:
        \"@type\": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector
",
        );
    }
    out.push_str("    filter_chains:\n");
    for (sni, tls) in chains {
        if let Some(sni) = sni {
            let _ = writeln!(out, "    - filter_chain_match: {{server_names: [\"{sni}\"]}}");
            out.push_str(&filter_chain(tls).replacen("    - filters:", "      filters:", 1));
        } else {
            out.push_str(&filter_chain(tls));
        }
    }
    out
}

fn filter_chain(tls_context: &str) -> String {
    format!(
        "    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: e2e
          route_config:
            virtual_hosts:
            - name: all
              domains: [\"*\"]
              routes:
              - match: {{prefix: \"/\"}}
                direct_response: {{status: 200, body: {{inline_string: \"ok\\n\"}}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
{tls}",
        tls = indent(tls_context, 10)
    )
}

fn indent(text: &str, spaces: usize) -> String {
    let pad = " ".repeat(spaces);
    text.lines().map(|line| if line.is_empty() { "\n".to_string() } else { format!("{pad}{line}\n") }).collect()
}

fn write_file(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
