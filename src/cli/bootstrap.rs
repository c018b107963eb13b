//! `certwire bootstrap`: a complete Envoy bootstrap whose TLS listener takes its
//! certificate (and, with --mtls, its client CA) from certwire over SDS. With
//! --sds-tls-dir, Envoy reaches certwire itself over mutual TLS with a client
//! certificate from `certwire certgen`.

use std::net::IpAddr;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct BootstrapArgs {
    /// certwire's SDS address: HOST:PORT (IP or DNS name) or unix:/path
    #[arg(long, default_value = crate::config::DEFAULT_LISTEN)]
    pub sds: String,
    /// Secret to serve on the listener (NAME-cacert is used for --mtls)
    #[arg(long, default_value = "localhost")]
    pub secret: String,
    /// Address of Envoy's TLS listener
    #[arg(long, default_value = "0.0.0.0")]
    pub listen_address: IpAddr,
    /// Port of Envoy's TLS listener
    #[arg(long, default_value_t = 10443)]
    pub listen_port: u16,
    /// Port of Envoy's admin interface (bound on 127.0.0.1)
    #[arg(long, default_value_t = 9901)]
    pub admin_port: u16,
    /// Use the incremental (Delta) SDS protocol
    #[arg(long)]
    pub delta: bool,
    /// Require client certificates validated against the NAME-cacert secret
    #[arg(long)]
    pub mtls: bool,
    /// Take the listener's TLS session ticket keys from this secret (a `[[tickets]]` name, or
    /// a secret with tls.session-ticket-keys), so every Envoy of a fleet resumes the others' sessions
    #[arg(long, value_name = "NAME")]
    pub session_ticket_keys: Option<String>,
    /// Envoy's ocsp_staple_policy for the listener: lenient (staple when there is one), strict
    /// (a stale staple fails the handshake), must-staple (a certificate without a staple is
    /// refused; match it with certwire's [ocsp] mode = "must-staple")
    #[arg(long, value_name = "POLICY", value_parser = ["lenient", "strict", "must-staple"])]
    pub ocsp_staple_policy: Option<String>,
    /// Envoy node id (shown in `certwire status`)
    #[arg(long, default_value = "edge-envoy")]
    pub node_id: String,
    /// Envoy node cluster
    #[arg(long, default_value = "edge")]
    pub node_cluster: String,
    /// Reach certwire over mutual TLS with the client certificate in DIR, a client directory (or mounted
    /// certwire-client-LABEL Secret) from `certwire certgen`; reloaded when DIR's ..data is swapped
    #[arg(long, value_name = "DIR")]
    pub sds_tls_dir: Option<String>,
    /// Name certwire's server certificate must carry (and SNI sent) with --sds-tls-dir [default: the host of
    /// --sds if it is a DNS name, else localhost]
    #[arg(long, value_name = "NAME", requires = "sds_tls_dir")]
    pub sds_server_name: Option<String>,
}

pub fn run(args: &BootstrapArgs) -> anyhow::Result<ExitCode> {
    print!("{}", render(args)?);
    Ok(ExitCode::SUCCESS)
}

/// Where Envoy finds certwire, as a cluster type and an endpoint address block.
fn endpoint(sds: &str) -> anyhow::Result<(&'static str, String)> {
    if let Some(path) = sds.strip_prefix("unix:") {
        return Ok(("STATIC", format!("pipe: {{ path: \"{path}\" }}")));
    }
    let (host, port) = host_port(sds)?;
    // A DNS name (a Kubernetes Service) needs STRICT_DNS to be resolved.
    let kind = if host.parse::<IpAddr>().is_ok() { "STATIC" } else { "STRICT_DNS" };
    Ok((kind, format!("socket_address: {{ address: \"{host}\", port_value: {port} }}")))
}

fn host_port(sds: &str) -> anyhow::Result<(&str, u16)> {
    let (host, port) =
        sds.rsplit_once(':').ok_or_else(|| anyhow::anyhow!("--sds {sds:?}: expected HOST:PORT or unix:/path"))?;
    let port: u16 = port.parse().map_err(|_| anyhow::anyhow!("--sds {sds:?}: bad port"))?;
    Ok((host.trim_start_matches('[').trim_end_matches(']'), port))
}

/// The name certwire's certificate is checked for: --sds-server-name, else the host of
/// --sds when it is a DNS name, else `localhost` (an IP address or a Unix socket says
/// nothing about the certificate; `certwire certgen` always includes `localhost`).
fn server_name(a: &BootstrapArgs) -> anyhow::Result<String> {
    if let Some(name) = &a.sds_server_name {
        return Ok(name.clone());
    }
    if a.sds.starts_with("unix:") {
        return Ok("localhost".to_owned());
    }
    let (host, _) = host_port(&a.sds)?;
    Ok(if host.parse::<IpAddr>().is_ok() { "localhost".to_owned() } else { host.to_owned() })
}

/// A YAML double-quoted scalar (JSON string syntax is valid YAML).
fn quoted(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_default()
}

/// The SDS cluster's `transport_socket`: mutual TLS with the client certificate and CA
/// bundle from `dir`. They come through Envoy's file-based SDS with `watched_directory`,
/// the one way Envoy reloads files: inline `tls_certificates` are read once at start.
fn sds_tls(dir: &str, server_name: &str) -> String {
    use super::certgen::{ENVOY_CA_FILE, ENVOY_CA_SECRET, ENVOY_CERT_FILE, ENVOY_CERT_SECRET};
    let dir = dir.trim_end_matches('/');
    let dir = if dir.is_empty() { "/" } else { dir };
    let file = |name: &str| quoted(&format!("{}/{name}", dir.trim_end_matches('/')));
    // An IP address is matched as an IP SAN and never sent as SNI.
    let (san_type, sni) = match server_name.parse::<IpAddr>() {
        Ok(_) => ("IP_ADDRESS", String::new()),
        Err(_) => ("DNS", format!("\n        sni: {}", quoted(server_name))),
    };
    format!(
        "
    # Mutual TLS to certwire: client certificate and CA bundle from {comment_dir} (certwire certgen),
    # reloaded when its ..data symlink is swapped.
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext{sni}
        common_tls_context:
          alpn_protocols: [h2]
          tls_certificate_sds_secret_configs:
          - name: {ENVOY_CERT_SECRET}
            sds_config:
              resource_api_version: V3
              path_config_source:
                path: {cert_file}
                watched_directory: {{ path: {dir_q} }}
          combined_validation_context:
            default_validation_context:
              match_typed_subject_alt_names:
              - san_type: {san_type}
                matcher: {{ exact: {name} }}
            validation_context_sds_secret_config:
              name: {ENVOY_CA_SECRET}
              sds_config:
                resource_api_version: V3
                path_config_source:
                  path: {ca_file}
                  watched_directory: {{ path: {dir_q} }}",
        cert_file = file(ENVOY_CERT_FILE),
        ca_file = file(ENVOY_CA_FILE),
        dir_q = quoted(dir),
        comment_dir = dir.escape_debug(),
        name = quoted(server_name),
    )
}

pub fn render(a: &BootstrapArgs) -> anyhow::Result<String> {
    let (cluster_type, address) = endpoint(&a.sds)?;
    let tls = match &a.sds_tls_dir {
        Some(dir) => sds_tls(dir, &server_name(a)?),
        None => String::new(),
    };
    let api_type = if a.delta { "DELTA_GRPC" } else { "GRPC" };
    let sds_config = format!(
        "sds_config:
                  resource_api_version: V3
                  api_config_source:
                    api_type: {api_type}
                    transport_api_version: V3
                    grpc_services:
                    - envoy_grpc: {{ cluster_name: certwire }}
                    set_node_on_first_message_only: true"
    );
    let mut mtls = if a.mtls { "\n          require_client_certificate: true".to_owned() } else { String::new() };
    if let Some(policy) = &a.ocsp_staple_policy {
        let policy = match policy.as_str() {
            "strict" => "STRICT_STAPLING",
            "must-staple" => "MUST_STAPLE",
            _ => "LENIENT_STAPLING",
        };
        mtls.push_str(&format!("\n          ocsp_staple_policy: {policy}"));
    }
    if let Some(name) = &a.session_ticket_keys {
        mtls.push_str(&format!(
            "
          # Ticket keys shared by the fleet; sessions live no longer than the keys are served.
          session_ticket_keys_sds_secret_config:
            name: {}
            {}",
            quoted(name),
            sds_config.replace("\n                ", "\n              ")
        ));
    }
    let validation = if a.mtls {
        format!(
            "
            validation_context_sds_secret_config:
              name: \"{}-cacert\"
              {sds_config}",
            a.secret
        )
    } else {
        String::new()
    };
    Ok(format!(
        "# Envoy bootstrap generated by `certwire bootstrap`. TLS comes from certwire over SDS:
# rotations are pushed live, no restart, no mounted files.
# set_node_on_first_message_only: Envoy describes itself (every extension it was built
# with, about 60 KB) in the first request of each SDS stream instead of in every ACK.
node:
  id: \"{node_id}\"
  cluster: \"{node_cluster}\"
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}
static_resources:
  listeners:
  - name: https
    address:
      socket_address: {{ address: \"{listen_address}\", port_value: {listen_port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: https
          route_config:
            virtual_hosts:
            - name: all
              domains: [\"*\"]
              routes:
              - match: {{ prefix: \"/\" }}
                direct_response: {{ status: 200, body: {{ inline_string: \"hello from envoy, TLS by certwire\\n\" }} }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext{mtls}
          common_tls_context:
            tls_certificate_sds_secret_configs:
            - name: \"{secret}\"
              {sds_config}{validation}
  clusters:
  # certwire's SDS endpoint. SDS is gRPC: the cluster must speak HTTP/2.
  - name: certwire
    type: {cluster_type}
    connect_timeout: 1s
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
              {address}{tls}
",
        node_id = a.node_id,
        node_cluster = a.node_cluster,
        admin_port = a.admin_port,
        listen_address = a.listen_address,
        listen_port = a.listen_port,
        secret = a.secret,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(endpoint("127.0.0.1:18000").unwrap().0, "STATIC");
        assert_eq!(endpoint("certwire.certwire.svc:18000").unwrap().0, "STRICT_DNS");
        assert!(endpoint("unix:/run/sds.sock").unwrap().1.contains("pipe"));
        assert!(endpoint("nope").is_err());
    }

    fn args(sds: &str) -> BootstrapArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: BootstrapArgs,
        }
        Cli::parse_from(["bootstrap", "--sds", sds, "--sds-tls-dir", "/etc/certwire/tls/"]).args
    }

    #[test]
    fn the_server_name_defaults_to_a_dns_host_else_localhost() {
        assert_eq!(server_name(&args("certwire.infra.svc:18000")).unwrap(), "certwire.infra.svc");
        assert_eq!(server_name(&args("127.0.0.1:18000")).unwrap(), "localhost");
        assert_eq!(server_name(&args("[::1]:18000")).unwrap(), "localhost");
        assert_eq!(server_name(&args("unix:/run/certwire.sock")).unwrap(), "localhost");
        let mut named = args("127.0.0.1:18000");
        named.sds_server_name = Some("sds.example.com".into());
        assert_eq!(server_name(&named).unwrap(), "sds.example.com");
    }

    #[test]
    fn tls_is_added_to_the_sds_cluster_only_when_asked() {
        let yaml = render(&args("127.0.0.1:18000")).unwrap();
        assert!(yaml.contains("path: \"/etc/certwire/tls/envoy-sds-cert.yaml\""), "{yaml}");
        assert!(yaml.contains("watched_directory: { path: \"/etc/certwire/tls\" }"), "{yaml}");
        assert!(yaml.contains("sni: \"localhost\""), "{yaml}");
        let mut plain = args("127.0.0.1:18000");
        plain.sds_tls_dir = None;
        assert!(!render(&plain).unwrap().contains("UpstreamTlsContext"));
        let mut ip = args("127.0.0.1:18000");
        ip.sds_server_name = Some("127.0.0.1".into());
        let yaml = render(&ip).unwrap();
        assert!(yaml.contains("san_type: IP_ADDRESS") && !yaml.contains("sni:"), "{yaml}");
    }
}
