//! Settings for `certwire serve`: a TOML file (`--config`) with flags on top.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use crate::logging::LogFormat;
use crate::xds::listen::ListenAddr;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:18000";
pub const DEFAULT_ADMIN: &str = "127.0.0.1:18001";

/// The config file. Every key is optional; see README "Configuration".
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<Vec<ListenAddr>>,
    pub admin: Option<SocketAddr>,
    pub files: Option<Vec<PathBuf>>,
    pub dev: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub dev_rotate_every: Option<Duration>,
    /// `true`, `false`, or a policy: `"never"`, `"when-nothing-else"` (default), `"always"`.
    pub allow_expired: Option<crate::policy::AllowExpired>,
    /// `"withhold"` (default) or `"serve-placeholder"`.
    pub on_invalid: Option<crate::policy::OnInvalid>,
    /// `"keep"` (default) or `"withdraw"`.
    pub on_delete: Option<crate::policy::OnDelete>,
    /// Permission bits of the Unix SDS sockets, octal (`"0660"`).
    pub unix_socket_mode: Option<String>,
    /// Group id given to the Unix SDS sockets.
    pub unix_socket_group: Option<u32>,
    pub log_format: Option<LogFormat>,
    #[serde(default, with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub files_rescan_every: Option<Duration>,
    /// Largest file the file source reads (certificate, key, CA bundle, CRL).
    pub files_max_file_bytes: Option<u64>,
    pub workers: Option<NonZeroUsize>,
    pub kubernetes: Option<KubeConfig>,
    /// `[acme]`: certificates certwire orders and renews itself.
    pub acme: Option<crate::sources::acme::AcmeConfig>,
    /// `[upstream]`: certwire as a forwarder to a central certwire.
    pub upstream: Option<crate::sources::upstream::UpstreamConfig>,
    /// `[sds]`: the SDS listeners' transport (`[sds.tls]`).
    pub sds: Option<SdsConfig>,
    /// `[authz]`: who may read which secret.
    pub authz: Option<AuthzConfig>,
    /// Serve every secret to anyone who reaches a non-loopback listener. Logged as a
    /// warning at start and every hour.
    pub insecure_open_sds: Option<bool>,
    /// Serve `/status/*` and the status gRPC API on this address instead of `admin`.
    pub status_addr: Option<SocketAddr>,
    /// `[limits]`: bounds on what peers can make certwire hold or compute.
    pub limits: Option<crate::xds::limits::Limits>,
    /// Rollout watches (`certwire status --watch`) served at once.
    pub status_max_watchers: Option<usize>,
    /// The dev CA withdraws a name nobody subscribed to for this long.
    #[serde(default, with = "humantime_serde")]
    pub dev_forget_after: Option<Duration>,
    /// The most names the dev CA mints.
    pub dev_max_names: Option<usize>,
    /// Requested name -> stored name (`[aliases]`), e.g. Istio's `sds://PROVIDER`.
    pub aliases: Option<std::collections::BTreeMap<String, String>>,
    /// `[ocsp]`: OCSP staples certwire fetches and keeps fresh (off by default).
    pub ocsp: Option<crate::stapling::OcspConfig>,
    /// `[[tickets]]`: session ticket keys certwire makes, rotates and shares.
    pub tickets: Option<Vec<crate::sources::tickets::TicketsConfig>>,
}

/// `[sds]` table.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdsConfig {
    pub tls: Option<TlsConfig>,
}

/// `[sds.tls]`: TLS on the TCP SDS listeners; client certificates are required when a
/// client CA is set.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// certwire's certificate from its own store, by secret name.
    pub cert_secret: Option<String>,
    pub client_ca: Option<PathBuf>,
    pub client_crl: Option<PathBuf>,
    /// The client CA from the store, by secret name (a `validation_context`).
    pub client_ca_secret: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub reload_every: Option<Duration>,
}

/// `[authz]` table.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzConfig {
    pub mode: Option<crate::authz::Mode>,
    /// `kubernetes` mode: the SubjectAccessReview verb, `list` (istiod's) or `get`.
    pub verb: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub allow_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub deny_ttl: Option<Duration>,
    #[serde(default)]
    pub rules: Vec<crate::authz::policy::Rule>,
}

/// `[kubernetes]` table of the config file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeConfig {
    pub enabled: Option<bool>,
    pub namespaces: Option<Vec<String>>,
    pub all_namespaces: Option<bool>,
    /// Also serve CA bundles of ConfigMaps as `configmap://NS/NAME`.
    pub configmaps: Option<bool>,
    /// Gateway API support: `kubernetes-gateway://NS/NAME`, ReferenceGrants watched.
    pub gateway_api: Option<bool>,
    /// Serve a Secret's `secret` key as an Envoy generic secret.
    pub generic_secrets: Option<bool>,
    pub label_selector: Option<String>,
    pub default_namespace: Option<String>,
    pub kubeconfig: Option<PathBuf>,
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
    }
}

/// Flags of `certwire serve` that can override the file.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeFlags {
    /// TOML config file; flags given on the command line override its keys.
    #[arg(long, env = "CERTWIRE_CONFIG")]
    pub config: Option<PathBuf>,
    /// SDS listen address, HOST:PORT or unix:/path (repeatable) [default: 127.0.0.1:18000]
    #[arg(long = "listen", value_name = "ADDR")]
    pub listen: Vec<ListenAddr>,
    /// Admin HTTP address: health, metrics, status [default: 127.0.0.1:18001]
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// Directory of secrets in the Kubernetes mounted-Secret layout (repeatable)
    #[arg(long = "files", value_name = "DIR")]
    pub files: Vec<PathBuf>,
    /// Serve Kubernetes Secrets (credentials: --kubeconfig, KUBECONFIG or in-cluster)
    #[arg(long)]
    pub kubernetes: bool,
    /// Namespace to watch (repeatable) [default: the kubeconfig's or pod's namespace]
    #[arg(long = "namespace", value_name = "NS")]
    pub namespaces: Vec<String>,
    /// Watch Secrets in every namespace (needs a ClusterRole)
    #[arg(long)]
    pub all_namespaces: bool,
    /// Also serve CA bundles from ConfigMaps (key cacert or ca.crt) as configmap://NS/NAME
    /// in the watched namespaces (needs list and watch on configmaps)
    #[arg(long)]
    pub configmaps: bool,
    /// Gateway API support: serve kubernetes-gateway://NS/NAME (Istio's name for a
    /// Gateway's certificateRef) and, with authorization, watch ReferenceGrants to
    /// decide cross-namespace ones (needs list and watch on referencegrants)
    #[arg(long)]
    pub gateway_api: bool,
    /// Serve the `secret` key of a Kubernetes Secret as an Envoy generic secret (OAuth2
    /// token and HMAC secrets, credential injector) under the Secret's names
    #[arg(long)]
    pub generic_secrets: bool,
    /// Only Secrets matching this label selector, e.g. certwire.io/serve=true
    #[arg(long, value_name = "SELECTOR")]
    pub label_selector: Option<String>,
    /// Namespace whose Secrets are also served as kubernetes://NAME and NAME
    /// [default: the first watched namespace]
    #[arg(long, value_name = "NS")]
    pub default_namespace: Option<String>,
    /// kubeconfig file [default: in-cluster service account, else KUBECONFIG or ~/.kube/config]
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Run the dev CA source (the default when no other source is configured)
    #[arg(long)]
    pub dev: bool,
    /// How often the dev CA re-mints every certificate [default: 5m]
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub dev_rotate_every: Option<Duration>,
    /// When an expired certificate is served: never, when-nothing-else (no valid version
    /// of the name exists) or always (also not-yet-valid ones); the bare flag is always
    /// [default: when-nothing-else]
    #[arg(long, value_name = "WHEN", num_args = 0..=1, default_missing_value = "always")]
    pub allow_expired: Option<crate::policy::AllowExpired>,
    /// A name whose every version was refused: withhold (no answer) or serve-placeholder
    /// (an untrusted certificate, so the rest of the listener works) [default: withhold]
    #[arg(long, value_name = "POLICY")]
    pub on_invalid: Option<crate::policy::OnInvalid>,
    /// A served secret deleted at every source: keep (SotW proxies keep it) or withdraw
    /// (SotW proxies get the placeholder); Delta proxies are told of the removal either
    /// way [default: keep]
    #[arg(long, value_name = "POLICY")]
    pub on_delete: Option<crate::policy::OnDelete>,
    /// How long SIGTERM waits for streams to close [default: 5s]
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub drain_timeout: Option<Duration>,
    /// Threads serving proxies and sources [default: one per CPU the process may use]
    #[arg(long, value_name = "N", env = "CERTWIRE_WORKERS")]
    pub workers: Option<NonZeroUsize>,
    /// TLS certificate chain (PEM) of the SDS listener, hot-reloaded
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of the SDS listener, hot-reloaded
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The SDS listener's certificate from certwire's own store, by secret name
    #[arg(long, value_name = "SECRET", conflicts_with_all = ["tls_cert", "tls_key"])]
    pub tls_cert_secret: Option<String>,
    /// CA bundle (PEM) that proxies' client certificates must chain to; required when set
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// The client CA from certwire's own store, by secret name (e.g. NAME-cacert)
    #[arg(long, value_name = "SECRET", conflicts_with = "tls_client_ca")]
    pub tls_client_ca_secret: Option<String>,
    /// Who may read which secret: open, policy or kubernetes [default: open on loopback
    /// and Unix sockets; required otherwise]
    #[arg(long, value_name = "MODE")]
    pub authz: Option<crate::authz::Mode>,
    /// Allow plaintext or open SDS on a non-loopback address (anyone who reaches the
    /// port gets every private key); warned about at start and every hour
    #[arg(long)]
    pub insecure_open_sds: bool,
    /// Serve /status/* and the status gRPC API on this address instead of --admin
    #[arg(long, value_name = "ADDR")]
    pub status_addr: Option<SocketAddr>,
    /// Permission bits of the unix: SDS sockets, octal, e.g. 0660; connecting needs
    /// write permission [default: from the umask: only certwire's user]
    #[arg(long, value_name = "MODE")]
    pub unix_socket_mode: Option<String>,
    /// Group id given to the unix: SDS sockets, e.g. the proxies' group with mode 0660
    #[arg(long, value_name = "GID")]
    pub unix_socket_group: Option<u32>,
    /// Once ready, write the addresses really bound (port 0 picks a free one) to this
    /// file as JSON: {"pid", "sds": [...], "admin", "status"}
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: Vec<ListenAddr>,
    /// Mode and group of the Unix SDS sockets.
    pub unix_socket: crate::xds::listen::UnixSocketAccess,
    pub admin: SocketAddr,
    pub files: Vec<PathBuf>,
    pub dev: bool,
    pub dev_rotate_every: Duration,
    pub allow_expired: crate::policy::AllowExpired,
    /// `on_invalid` and `on_delete`.
    pub policy: crate::policy::Policy,
    pub log_format: LogFormat,
    pub drain_timeout: Duration,
    pub files_rescan_every: Duration,
    pub files_max_file_bytes: u64,
    /// Runtime worker threads; `None`: one per CPU.
    pub workers: Option<NonZeroUsize>,
    /// `None` when the Kubernetes source is off.
    pub kubernetes: Option<crate::sources::kubernetes::Options>,
    /// `None` when the ACME source is off (no `[acme]` table).
    pub acme: Option<crate::sources::acme::AcmeConfig>,
    /// `None` unless `[upstream]` makes certwire a forwarder.
    pub upstream: Option<crate::sources::upstream::UpstreamConfig>,
    /// `None`: the TCP SDS listeners are plaintext.
    pub tls: Option<crate::tls::Settings>,
    pub authz: AuthzSettings,
    pub insecure_open_sds: bool,
    pub status_addr: Option<SocketAddr>,
    /// Where to write the bound addresses once ready (`--ready-file`).
    pub ready_file: Option<PathBuf>,
    pub limits: crate::xds::limits::Limits,
    pub status_max_watchers: usize,
    pub dev_forget_after: Duration,
    pub dev_max_names: usize,
    /// `[aliases]`: requested name -> stored name.
    pub aliases: std::collections::BTreeMap<String, String>,
    /// `[ocsp]`, checked; `mode = "off"` everywhere unless asked.
    pub ocsp: crate::stapling::OcspConfig,
    /// `[[tickets]]`, checked.
    pub tickets: Vec<crate::sources::tickets::Ticket>,
}

#[derive(Debug, Clone)]
pub struct AuthzSettings {
    pub mode: crate::authz::Mode,
    pub verb: String,
    pub ttls: crate::authz::review::Ttls,
    pub rules: Vec<crate::authz::policy::Rule>,
    /// Credentials for SubjectAccessReviews (`kubernetes` mode).
    pub kubeconfig: Option<PathBuf>,
}

impl Settings {
    /// Merges the file (if any) under the flags. `log_format` from flags wins when given.
    pub fn resolve(flags: &ServeFlags, log_format: Option<LogFormat>) -> anyhow::Result<Self> {
        let file = match &flags.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let listen = if !flags.listen.is_empty() {
            flags.listen.clone()
        } else {
            file.listen.unwrap_or_else(|| vec![DEFAULT_LISTEN.parse().expect("default listen address")])
        };
        let files = if !flags.files.is_empty() { flags.files.clone() } else { file.files.unwrap_or_default() };
        let file_kubeconfig = file.kubernetes.as_ref().and_then(|k| k.kubeconfig.clone());
        let kubernetes = kube_options(flags, file.kubernetes.unwrap_or_default());
        let mut acme = file.acme;
        // The ACME Kubernetes store and Lease use the same credentials as the
        // Kubernetes source unless `[acme] kubeconfig` says otherwise.
        if let Some(acme) = acme.as_mut()
            && acme.kubeconfig.is_none()
        {
            acme.kubeconfig = flags.kubeconfig.clone().or(file_kubeconfig.clone());
        }
        if let Some(acme) = &acme {
            acme.validate()?;
        }
        // The embedded default: with no source configured, the dev CA serves.
        let upstream = file.upstream.clone();
        if let Some(upstream) = &upstream {
            upstream.target().map_err(anyhow::Error::msg)?;
        }
        let tickets_file = file.tickets.clone().unwrap_or_default();
        let dev = flags.dev
            || file.dev.unwrap_or(
                files.is_empty()
                    && kubernetes.is_none()
                    && acme.is_none()
                    && upstream.is_none()
                    && tickets_file.is_empty(),
            );
        let tls = tls_settings(flags, file.sds.and_then(|s| s.tls))?;
        let insecure_open_sds = flags.insecure_open_sds || file.insecure_open_sds.unwrap_or(false);
        let authz_file = file.authz.unwrap_or_default();
        let mode = flags.authz.or(authz_file.mode).unwrap_or(crate::authz::Mode::Open);
        let authz = AuthzSettings {
            mode,
            verb: authz_file.verb.unwrap_or_else(|| "list".into()),
            ttls: crate::authz::review::Ttls {
                allow: authz_file.allow_ttl.unwrap_or(Duration::from_secs(300)),
                deny: authz_file.deny_ttl.unwrap_or(Duration::from_secs(60)),
            },
            rules: authz_file.rules,
            kubeconfig: flags.kubeconfig.clone().or(file_kubeconfig.clone()),
        };
        if !["list", "get"].contains(&authz.verb.as_str()) {
            anyhow::bail!("[authz] verb = {:?}: expected \"list\" (istiod's) or \"get\"", authz.verb);
        }
        crate::authz::policy::validate(&authz.rules).map_err(anyhow::Error::msg)?;
        let tickets = crate::sources::tickets::resolve(&tickets_file, mode).map_err(anyhow::Error::msg)?;
        secure_by_default(&listen, tls.as_ref(), mode, insecure_open_sds)?;
        let unix_socket = crate::xds::listen::UnixSocketAccess {
            mode: flags
                .unix_socket_mode
                .as_deref()
                .or(file.unix_socket_mode.as_deref())
                .map(crate::xds::listen::parse_socket_mode)
                .transpose()
                .map_err(anyhow::Error::msg)?,
            group: flags.unix_socket_group.or(file.unix_socket_group),
        };
        if unix_socket.world_writable() && mode == crate::authz::Mode::Open && !insecure_open_sds {
            anyhow::bail!(
                "refusing a unix socket mode that lets every local user connect with --authz open: any process on \
                 the host would get every private key. Choose --authz policy (e.g. allow uid:1337) or kubernetes, \
                 a mode without the others' write bit (0660 with --unix-socket-group), or pass --insecure-open-sds"
            );
        }
        let limits = file.limits.unwrap_or_default();
        limits.validate().map_err(anyhow::Error::msg)?;
        let aliases = file.aliases.clone().unwrap_or_default();
        let ocsp = file.ocsp.clone().unwrap_or_default();
        ocsp.validate().map_err(anyhow::Error::msg)?;
        crate::xds::names::Names::new(&aliases).map_err(anyhow::Error::msg)?;
        Ok(Self {
            listen,
            unix_socket,
            admin: flags.admin.or(file.admin).unwrap_or_else(|| DEFAULT_ADMIN.parse().expect("default admin address")),
            files,
            dev,
            dev_rotate_every: flags.dev_rotate_every.or(file.dev_rotate_every).unwrap_or(Duration::from_secs(300)),
            allow_expired: flags.allow_expired.or(file.allow_expired).unwrap_or_default(),
            policy: crate::policy::Policy {
                on_invalid: flags.on_invalid.or(file.on_invalid).unwrap_or_default(),
                on_delete: flags.on_delete.or(file.on_delete).unwrap_or_default(),
            },
            log_format: log_format.or(file.log_format).unwrap_or_default(),
            drain_timeout: flags.drain_timeout.or(file.drain_timeout).unwrap_or(Duration::from_secs(5)),
            files_rescan_every: file.files_rescan_every.unwrap_or(Duration::from_secs(30)),
            files_max_file_bytes: file.files_max_file_bytes.unwrap_or(crate::sources::files::DEFAULT_MAX_FILE_BYTES),
            workers: flags.workers.or(file.workers),
            kubernetes,
            acme,
            upstream,
            tls,
            authz,
            insecure_open_sds,
            status_addr: flags.status_addr.or(file.status_addr),
            ready_file: flags.ready_file.clone(),
            limits,
            status_max_watchers: file.status_max_watchers.unwrap_or(crate::xds::proxies::MAX_ROLLOUT_WATCHERS),
            dev_forget_after: file.dev_forget_after.unwrap_or(crate::sources::dev::FORGET_AFTER),
            dev_max_names: file.dev_max_names.unwrap_or(crate::sources::dev::MAX_NAMES),
            aliases,
            tickets,
            ocsp,
        })
    }
}

/// `[sds.tls]` with the flags on top, checked for a whole certificate source.
fn tls_settings(flags: &ServeFlags, file: Option<TlsConfig>) -> anyhow::Result<Option<crate::tls::Settings>> {
    use crate::tls::{CaFrom, CertFrom};
    let file = file.unwrap_or_default();
    let cert_path = flags.tls_cert.clone().or(file.cert);
    let key_path = flags.tls_key.clone().or(file.key);
    let cert_secret = flags.tls_cert_secret.clone().or(file.cert_secret);
    let ca_path = flags.tls_client_ca.clone().or(file.client_ca);
    let ca_secret = flags.tls_client_ca_secret.clone().or(file.client_ca_secret);
    let cert = match (cert_path, key_path, cert_secret) {
        (None, None, None) => {
            if ca_path.is_some() || ca_secret.is_some() {
                anyhow::bail!(
                    "a TLS client CA is set but no server certificate: set --tls-cert and --tls-key (or --tls-cert-secret)"
                );
            }
            return Ok(None);
        }
        (Some(cert), Some(key), None) => CertFrom::Files { cert, key },
        (None, None, Some(name)) => CertFrom::Secret(name),
        (Some(_), None, None) | (None, Some(_), None) => {
            anyhow::bail!("TLS needs both a certificate and its key: set --tls-cert and --tls-key together")
        }
        _ => anyhow::bail!("TLS certificate from files and from a secret: choose one (tls cert/key or cert_secret)"),
    };
    let client_ca = match (ca_path, ca_secret) {
        (Some(ca), None) => Some(CaFrom::File { ca, crl: file.client_crl }),
        (None, Some(name)) => Some(CaFrom::Secret(name)),
        (None, None) => None,
        (Some(_), Some(_)) => anyhow::bail!("TLS client CA from a file and from a secret: choose one"),
    };
    Ok(Some(crate::tls::Settings {
        cert,
        client_ca,
        reload_every: file.reload_every.unwrap_or(Duration::from_secs(5)),
    }))
}

/// Anyone who reaches a listener must prove who they are before a key leaves:
/// a non-loopback TCP listener needs TLS with client certificates and an authorization
/// mode other than `open`, unless the operator says otherwise in so many words.
fn secure_by_default(
    listen: &[ListenAddr],
    tls: Option<&crate::tls::Settings>,
    mode: crate::authz::Mode,
    insecure_open_sds: bool,
) -> anyhow::Result<()> {
    let Some(exposed) = listen.iter().find(|l| !l.is_local()) else { return Ok(()) };
    if insecure_open_sds {
        return Ok(());
    }
    let mtls = tls.is_some_and(|t| t.client_ca.is_some());
    if !mtls {
        anyhow::bail!(
            "refusing to serve SDS on {exposed} without TLS client authentication: anyone who reaches it would get \
             every private key. Give certwire a certificate and the CA of your proxies' client certificates \
             (--tls-cert, --tls-key, --tls-client-ca, or [sds.tls]; `certwire certgen` makes all three) and an \
             authorization mode (--authz kubernetes or policy), listen on 127.0.0.1 or a unix: socket, or pass \
             --insecure-open-sds to accept the risk"
        );
    }
    if mode == crate::authz::Mode::Open {
        anyhow::bail!(
            "refusing to serve SDS on {exposed} with --authz open: every authenticated proxy would get every \
             private key. Choose --authz kubernetes (Istio's rule: own namespace and a SubjectAccessReview) or \
             --authz policy ([[authz.rules]]), or pass --insecure-open-sds to accept the risk"
        );
    }
    Ok(())
}

/// The Kubernetes source is on when asked for by flag or file, or implied by any of
/// its flags; flags override the `[kubernetes]` table key by key.
fn kube_options(flags: &ServeFlags, file: KubeConfig) -> Option<crate::sources::kubernetes::Options> {
    let implied =
        !flags.namespaces.is_empty() || flags.all_namespaces || flags.label_selector.is_some() || flags.configmaps;
    let implied = implied || flags.gateway_api || flags.generic_secrets;
    if !(flags.kubernetes || implied || file.enabled.unwrap_or(false)) {
        return None;
    }
    let namespaces =
        if flags.namespaces.is_empty() { file.namespaces.unwrap_or_default() } else { flags.namespaces.clone() };
    Some(crate::sources::kubernetes::Options {
        default_namespace: flags
            .default_namespace
            .clone()
            .or(file.default_namespace)
            .or_else(|| namespaces.first().cloned()),
        namespaces,
        all_namespaces: flags.all_namespaces || file.all_namespaces.unwrap_or(false),
        label_selector: flags.label_selector.clone().or(file.label_selector),
        kubeconfig: flags.kubeconfig.clone().or(file.kubeconfig),
        configmaps: flags.configmaps || file.configmaps.unwrap_or(false),
        gateway_api: flags.gateway_api || file.gateway_api.unwrap_or(false),
        generic_secrets: flags.generic_secrets || file.generic_secrets.unwrap_or(false),
    })
}

/// serde adapter for optional humantime durations ("30s", "5m").
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_run_the_dev_source() {
        let s = Settings::resolve(&ServeFlags::default(), None).unwrap();
        assert!(s.dev);
        assert_eq!(s.listen, vec![DEFAULT_LISTEN.parse().unwrap()]);
        assert_eq!(s.admin, DEFAULT_ADMIN.parse().unwrap());
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("certwire.toml");
        std::fs::write(
            &path,
            "listen = [\"127.0.0.1:1\", \"unix:/tmp/s.sock\"]\nfiles = [\"/etc/certs\"]\ndev_rotate_every = \"1m\"\nlog_format = \"json\"\n",
        )
        .unwrap();
        let flags = ServeFlags { config: Some(path.clone()), ..Default::default() };
        let s = Settings::resolve(&flags, None).unwrap();
        assert_eq!(s.listen.len(), 2);
        assert!(!s.dev, "files configured: no dev CA unless asked");
        assert_eq!(s.dev_rotate_every, Duration::from_secs(60));
        assert_eq!(s.log_format, LogFormat::Json);
        let flags = ServeFlags {
            config: Some(path),
            listen: vec!["127.0.0.1:2".parse().unwrap()],
            dev: true,
            ..Default::default()
        };
        let s = Settings::resolve(&flags, Some(LogFormat::Text)).unwrap();
        assert_eq!(s.listen, vec!["127.0.0.1:2".parse().unwrap()]);
        assert!(s.dev);
        assert_eq!(s.log_format, LogFormat::Text);
    }

    /// The config examples in README.md are what users copy: each whole one must parse
    /// (fragments say "as above").
    #[test]
    fn readme_config_examples_parse() {
        let readme = include_str!("../README.md");
        let blocks: Vec<&str> = readme
            .split("```toml\n")
            .skip(1)
            .map(|rest| rest.split("```").next().unwrap_or_default())
            .filter(|block| !block.contains("as above"))
            .collect();
        assert!(blocks.len() >= 2, "README has its config examples");
        for block in blocks {
            let parsed: Result<FileConfig, _> = toml::from_str(block);
            assert!(parsed.is_ok(), "README example does not parse: {parsed:?}\n{block}");
        }
    }

    #[test]
    fn workers_from_file_or_flag_and_never_zero() {
        assert_eq!(Settings::resolve(&ServeFlags::default(), None).unwrap().workers, None, "one per CPU");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "workers = 3\n").unwrap();
        let flags = ServeFlags { config: Some(path.clone()), ..Default::default() };
        assert_eq!(Settings::resolve(&flags, None).unwrap().workers, NonZeroUsize::new(3));
        let flags = ServeFlags { config: Some(path.clone()), workers: NonZeroUsize::new(1), ..Default::default() };
        assert_eq!(Settings::resolve(&flags, None).unwrap().workers, NonZeroUsize::new(1));
        std::fs::write(&path, "workers = 0\n").unwrap();
        let flags = ServeFlags { config: Some(path.clone()), ..Default::default() };
        let err = format!("{:#}", Settings::resolve(&flags, None).unwrap_err());
        assert!(err.contains("c.toml") && err.contains("workers") && err.contains("nonzero"), "{err}");
    }

    #[test]
    fn gateway_api_implies_the_kubernetes_source() {
        let flags = ServeFlags { gateway_api: true, ..Default::default() };
        assert!(Settings::resolve(&flags, None).unwrap().kubernetes.is_some_and(|k| k.gateway_api));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[kubernetes]\nenabled = true\ngateway_api = true\n").unwrap();
        let flags = ServeFlags { config: Some(path), ..Default::default() };
        assert!(Settings::resolve(&flags, None).unwrap().kubernetes.unwrap().gateway_api);
    }

    #[test]
    fn kubernetes_options() {
        assert!(Settings::resolve(&ServeFlags::default(), None).unwrap().kubernetes.is_none());
        let flags = ServeFlags { namespaces: vec!["gw".into(), "apps".into()], ..Default::default() };
        let s = Settings::resolve(&flags, None).unwrap();
        let k = s.kubernetes.unwrap();
        assert_eq!(k.namespaces, ["gw", "apps"]);
        assert_eq!(k.default_namespace.as_deref(), Some("gw"));
        assert!(!s.dev, "a configured source turns the dev CA off");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[kubernetes]\nenabled = true\nall_namespaces = true\nlabel_selector = \"a=b\"\n")
            .unwrap();
        let flags = ServeFlags { config: Some(path), label_selector: Some("c=d".into()), ..Default::default() };
        let k = Settings::resolve(&flags, None).unwrap().kubernetes.unwrap();
        assert!(k.all_namespaces);
        assert_eq!(k.label_selector.as_deref(), Some("c=d"));
    }

    #[test]
    fn acme_table_turns_the_dev_ca_off_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let acme = "[acme]\ndirectory = \"https://acme.example/dir\"\nstate_dir = \"/tmp/acme\"\n\
                    [[acme.certificates]]\nname = \"web\"\ndomains = [\"www.example.com\"]\n";
        std::fs::write(&path, acme).unwrap();
        let flags = ServeFlags { config: Some(path.clone()), ..Default::default() };
        let s = Settings::resolve(&flags, None).unwrap();
        assert!(!s.dev, "a configured ACME source turns the dev CA off");
        assert_eq!(s.acme.unwrap().certificates[0].name, "web");
        std::fs::write(&path, acme.replace("www.example.com", "*.example.com")).unwrap();
        let err = Settings::resolve(&flags, None).unwrap_err();
        assert!(format!("{err:#}").contains("dns-01"), "{err:#}");
    }

    #[test]
    fn acme_uses_the_kubernetes_kubeconfig_unless_it_has_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let acme = "[acme]\ndirectory = \"https://acme.example/dir\"\nstate_dir = \"/tmp/acme\"\n\
                    [[acme.certificates]]\nname = \"web\"\ndomains = [\"www.example.com\"]\n\
                    [kubernetes]\nkubeconfig = \"/file/kc\"\n";
        std::fs::write(&path, acme).unwrap();
        let flags = ServeFlags { config: Some(path.clone()), ..Default::default() };
        let s = Settings::resolve(&flags, None).unwrap();
        assert_eq!(s.acme.unwrap().kubeconfig, Some(PathBuf::from("/file/kc")));
        let flags =
            ServeFlags { config: Some(path.clone()), kubeconfig: Some("/flag/kc".into()), ..Default::default() };
        assert_eq!(Settings::resolve(&flags, None).unwrap().acme.unwrap().kubeconfig, Some(PathBuf::from("/flag/kc")));
        std::fs::write(&path, acme.replace("state_dir", "kubeconfig = \"/acme/kc\"\nstate_dir")).unwrap();
        assert_eq!(Settings::resolve(&flags, None).unwrap().acme.unwrap().kubeconfig, Some(PathBuf::from("/acme/kc")));
    }

    #[test]
    fn exposed_listeners_need_mtls_and_an_authorization_mode() {
        let exposed = |extra: &[&str]| {
            let mut args = vec!["serve", "--listen", "0.0.0.0:18000"];
            args.extend_from_slice(extra);
            let cli =
                <crate::cli::Cli as clap::Parser>::try_parse_from(std::iter::once("certwire").chain(args)).unwrap();
            let crate::cli::Command::Serve(flags) = cli.command else { unreachable!() };
            Settings::resolve(&flags, None).map_err(|e| format!("{e:#}"))
        };
        let err = exposed(&[]).unwrap_err();
        assert!(
            err.contains("0.0.0.0:18000") && err.contains("--tls-client-ca") && err.contains("--insecure-open-sds"),
            "{err}"
        );
        let err = exposed(&["--tls-cert", "c", "--tls-key", "k"]).unwrap_err();
        assert!(err.contains("client authentication"), "TLS without client certificates is not enough: {err}");
        let err = exposed(&["--tls-cert", "c", "--tls-key", "k", "--tls-client-ca", "ca"]).unwrap_err();
        assert!(err.contains("--authz open"), "{err}");
        let ok = exposed(&["--tls-cert", "c", "--tls-key", "k", "--tls-client-ca", "ca", "--authz", "policy"]).unwrap();
        assert_eq!(ok.authz.mode, crate::authz::Mode::Policy);
        assert!(ok.tls.unwrap().client_ca.is_some());
        assert!(exposed(&["--insecure-open-sds"]).unwrap().insecure_open_sds);
        let local = Settings::resolve(&ServeFlags::default(), None).unwrap();
        assert_eq!(local.authz.mode, crate::authz::Mode::Open, "the dev default needs no setup");
        assert!(local.tls.is_none());
    }

    #[test]
    fn policies_and_socket_access_from_flags() {
        let serve = |extra: &[&str]| {
            let args = ["certwire", "serve", "--listen", "unix:/run/certwire/sds.sock"]
                .into_iter()
                .chain(extra.iter().copied());
            let cli = <crate::cli::Cli as clap::Parser>::try_parse_from(args).unwrap();
            let crate::cli::Command::Serve(flags) = cli.command else { unreachable!() };
            Settings::resolve(&flags, None).map_err(|e| format!("{e:#}"))
        };
        let defaults = serve(&[]).unwrap();
        assert_eq!(defaults.allow_expired, crate::policy::AllowExpired::WhenNothingElse);
        assert_eq!(defaults.policy, crate::policy::Policy::default());
        assert_eq!(defaults.unix_socket, crate::xds::listen::UnixSocketAccess::default());
        assert_eq!(serve(&["--allow-expired"]).unwrap().allow_expired, crate::policy::AllowExpired::Always);
        assert_eq!(serve(&["--allow-expired=never"]).unwrap().allow_expired, crate::policy::AllowExpired::Never);
        let set = serve(&["--on-invalid", "serve-placeholder", "--on-delete", "withdraw"]).unwrap();
        assert!(set.policy.uses_placeholder());
        let set = serve(&["--unix-socket-mode", "0660", "--unix-socket-group", "1337"]).unwrap();
        assert_eq!(set.unix_socket, crate::xds::listen::UnixSocketAccess { mode: Some(0o660), group: Some(1337) });
        // Every local user could connect, and open authorization would give them every key.
        let err = serve(&["--unix-socket-mode", "0666"]).unwrap_err();
        assert!(err.contains("--authz policy"), "{err}");
        assert!(serve(&["--unix-socket-mode", "0666", "--authz", "policy"]).is_ok());
        assert!(serve(&["--unix-socket-mode", "rw"]).unwrap_err().contains("octal"));
    }

    #[test]
    fn tls_needs_a_whole_certificate_source() {
        let flags = ServeFlags { tls_cert: Some("c".into()), ..Default::default() };
        assert!(format!("{:#}", Settings::resolve(&flags, None).unwrap_err()).contains("--tls-key"));
        let flags = ServeFlags { tls_client_ca: Some("ca".into()), ..Default::default() };
        assert!(format!("{:#}", Settings::resolve(&flags, None).unwrap_err()).contains("no server certificate"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[sds.tls]\ncert_secret = \"kubernetes://certwire/sds\"\nclient_ca_secret = \"kubernetes://certwire/sds-cacert\"\nreload_every = \"2s\"\n\
             [authz]\nmode = \"kubernetes\"\nallow_ttl = \"10s\"\n[[authz.rules]]\nidentities = [\"uid:0\"]\nsecrets = [\"*\"]\n",
        )
        .unwrap();
        let s = Settings::resolve(&ServeFlags { config: Some(path.clone()), ..Default::default() }, None).unwrap();
        let tls = s.tls.unwrap();
        assert_eq!(tls.cert, crate::tls::CertFrom::Secret("kubernetes://certwire/sds".into()));
        assert_eq!(tls.reload_every, Duration::from_secs(2));
        assert_eq!(s.authz.mode, crate::authz::Mode::Kubernetes);
        assert_eq!(s.authz.ttls.allow, Duration::from_secs(10));
        assert_eq!(s.authz.ttls.deny, Duration::from_secs(60));
        assert_eq!(s.authz.rules.len(), 1);
        std::fs::write(&path, "[authz]\nverb = \"delete\"\n").unwrap();
        let err = Settings::resolve(&ServeFlags { config: Some(path), ..Default::default() }, None).unwrap_err();
        assert!(format!("{err:#}").contains("delete"));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "lisen = []\n").unwrap();
        let err = FileConfig::load(&path).unwrap_err();
        assert!(format!("{err:#}").contains("lisen"), "{err:#}");
    }
}
