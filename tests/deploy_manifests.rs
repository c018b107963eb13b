//! The Kubernetes manifests under deploy/, checked against the real tools.
//!
//! - Every kustomization is rendered with the real `kubectl kustomize` (kustomize built
//!   into kubectl), and every YAML file of the examples is read as well.
//! - Every document is parsed strictly: core kinds into the k8s-openapi types, the CRDs
//!   (cert-manager, Istio) into the small structs below. k8s-openapi ignores fields it
//!   does not know, so each document is also serialized back to JSON and must equal the
//!   original: a misspelled, misplaced or unknown field disappears in that round trip
//!   and fails the test. The CRD structs deny unknown fields outright.
//! - Policy: every Deployment is non-root with a read-only root filesystem, probes,
//!   requests and limits; RBAC grants nothing but get/list/watch on Secrets and
//!   create/patch on Events; a ClusterRole appears only in the all-namespaces overlay;
//!   the namespaces in certwire.toml are exactly those with a Role.
//! - certwire.toml and the Deployment's args go through certwire's own config loader
//!   and command line parser.
//! - Every Envoy bootstrap of the examples passes the real `envoy --mode validate`
//!   ($CERTWIRE_ENVOY, else .tools/venv/bin/envoy from `bash tests/run.sh`). The Istio
//!   bootstrap override is merged the way pilot-agent applies it (`--config-yaml`).
//!
//! What no test here can show: that Istio's control plane accepts the Gateway and the
//! EnvoyFilter and generates the listener they are written for (no Istio runs here).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::Parser;
use k8s_openapi::Resource;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use certwire::cli::{Cli, Command as CertwireCommand};
use certwire::config::Settings;
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
/// A strategic merge patch for a Deployment that Istio's installer owns: not a complete
/// object, so it is checked by applying it (`istio_gateway_patch_...`), not parsed alone.
const ISTIO_GATEWAY_PATCH: &str = "deploy/examples/istio-ingressgateway/gateway-deployment-patch.yaml";

/// The label certwire's NetworkPolicy requires of pods that reach its SDS port.
const CLIENT_LABEL: (&str, &str) = ("certwire.io/client", "true");

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
    Service(Box<Service>),
    Deployment(Box<Deployment>),
    PodDisruptionBudget(Box<PodDisruptionBudget>),
    NetworkPolicy(Box<NetworkPolicy>),
    Role(Box<Role>),
    RoleBinding(Box<RoleBinding>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    Certificate(Box<Custom<CertificateSpec>>),
    Issuer(Box<Custom<IssuerSpec>>),
    Gateway(Box<Custom<GatewaySpec>>),
    VirtualService(Box<Custom<VirtualServiceSpec>>),
    EnvoyFilter(Box<Custom<EnvoyFilterSpec>>),
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
        Service,
        Deployment,
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
        ("networking.istio.io/v1", "Gateway") => Manifest::Gateway(Box::new(strict(doc, &origin))),
        ("networking.istio.io/v1", "VirtualService") => Manifest::VirtualService(Box::new(strict(doc, &origin))),
        // EnvoyFilter has no v1: v1alpha3 is its only version.
        ("networking.istio.io/v1alpha3", "EnvoyFilter") => Manifest::EnvoyFilter(Box::new(strict(doc, &origin))),
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

/// The data of the ConfigMap that a pod mounts at the directory of `file`, and the key.
fn mounted_file<'a>(
    deployment: &Deployment,
    container: &Container,
    file: &str,
    manifests: &'a [Manifest],
) -> (&'a BTreeMap<String, String>, String) {
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Path::new(file).parent() == Some(Path::new(&m.mount_path)))
        .unwrap_or_else(|| panic!("{}: nothing mounted where {file} is", name(&deployment.metadata)));
    let volume = pod_spec(deployment)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("no volume {}", mount.name));
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

#[derive(Debug, Deserialize, Serialize)]
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
    assert!(dirs.len() >= 7, "found only {} kustomizations under deploy/", dirs.len());
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
        if file.file_name().is_some_and(|n| n == "kustomization.yaml") || rel == ISTIO_GATEWAY_PATCH {
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
fn deployments_run_non_root_read_only_with_probes_and_limits() {
    let mut checked = 0;
    for dir in VARIANTS.iter().chain(&[EDGE_ENVOY]) {
        for deployment in deployments(&render(dir)) {
            assert_hardened(deployment, &format!("{dir}: Deployment {}", name(&deployment.metadata)));
            checked += 1;
        }
    }
    assert_eq!(checked, 4, "expected certwire in three variants and the edge Envoy");
}

fn assert_hardened(deployment: &Deployment, origin: &str) {
    let pod = pod_spec(deployment);
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
        if !pod.init_containers.iter().flatten().any(|c| c.name == container.name) {
            assert!(container.readiness_probe.is_some(), "{origin}: no readinessProbe");
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

/// (API group, resource, verbs): all that certwire may do, and all that it needs.
const GRANTS: [(&str, &str, &[&str]); 3] = [
    ("", "secrets", &["get", "list", "watch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
    ("", "events", &["create", "patch"]),
];

fn assert_least_privilege(rules: &[PolicyRule], origin: &str) {
    let mut granted = BTreeSet::new();
    for rule in rules {
        assert!(rule.non_resource_urls.is_none(), "{origin}: grants non-resource URLs");
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    let allowed =
                        GRANTS.iter().any(|(g, r, verbs)| g == group && r == resource && verbs.contains(&&**verb));
                    assert!(allowed, "{origin}: grants `{verb}` on `{resource}` of API group `{group}`");
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    for (group, resource, verbs) in GRANTS {
        for verb in verbs {
            assert!(
                granted.contains(&(group.to_owned(), resource.to_owned(), (*verb).to_owned())),
                "{origin}: certwire needs `{verb}` on `{resource}` of API group `{group}`"
            );
        }
    }
}

/// Namespaces where certwire's ServiceAccount is bound to a least-privilege Role.
fn role_namespaces(manifests: &[Manifest], origin: &str) -> BTreeSet<String> {
    let roles: BTreeMap<(String, String), &Role> = manifests
        .iter()
        .filter_map(|m| if let Manifest::Role(r) = m { Some(r) } else { None })
        .map(|r| ((namespace(&r.metadata).to_owned(), name(&r.metadata).to_owned()), &**r))
        .collect();
    let mut namespaces = BTreeSet::new();
    for manifest in manifests {
        let Manifest::RoleBinding(binding) = manifest else { continue };
        let ns = namespace(&binding.metadata).to_owned();
        let origin = format!("{origin}: RoleBinding {ns}/{}", name(&binding.metadata));
        assert_eq!(binding.role_ref.kind, "Role", "{origin}: binds a {}", binding.role_ref.kind);
        let role = roles
            .get(&(ns.clone(), binding.role_ref.name.clone()))
            .unwrap_or_else(|| panic!("{origin}: no Role {} in {ns}", binding.role_ref.name));
        assert_least_privilege(role.rules.as_deref().unwrap_or_default(), &origin);
        assert_certwire_subject(binding.subjects.as_deref().unwrap_or_default(), &origin);
        namespaces.insert(ns);
    }
    assert_eq!(roles.len(), namespaces.len(), "{origin}: a Role without a RoleBinding");
    namespaces
}

fn assert_certwire_subject(subjects: &[k8s_openapi::api::rbac::v1::Subject], origin: &str) {
    assert_eq!(subjects.len(), 1, "{origin}: expected certwire's ServiceAccount alone");
    let subject = &subjects[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str(), subject.namespace.as_deref()),
        ("ServiceAccount", "certwire", Some("certwire")),
        "{origin}: not bound to certwire's ServiceAccount"
    );
}

#[test]
fn rbac_grants_only_secret_reads_and_event_writes_and_a_cluster_role_only_for_all_namespaces() {
    for dir in VARIANTS.iter().chain(&[EDGE_ENVOY, ISTIO, CERT_MANAGER]) {
        let manifests = render(dir);
        role_namespaces(&manifests, dir);
        let cluster_roles: Vec<&ClusterRole> =
            manifests.iter().filter_map(|m| if let Manifest::ClusterRole(r) = m { Some(&**r) } else { None }).collect();
        let bindings: Vec<&ClusterRoleBinding> = manifests
            .iter()
            .filter_map(|m| if let Manifest::ClusterRoleBinding(b) = m { Some(&**b) } else { None })
            .collect();
        if *dir != ALL_NAMESPACES {
            assert!(cluster_roles.is_empty() && bindings.is_empty(), "{dir}: a ClusterRole outside all-namespaces");
            continue;
        }
        let role = only(cluster_roles, "ClusterRole", dir);
        assert_least_privilege(role.rules.as_deref().unwrap_or_default(), dir);
        let binding = only(bindings, "ClusterRoleBinding", dir);
        assert_eq!(
            (binding.role_ref.kind.as_str(), binding.role_ref.name.as_str()),
            ("ClusterRole", name(&role.metadata)),
            "{dir}: the ClusterRoleBinding binds something else"
        );
        assert_certwire_subject(binding.subjects.as_deref().unwrap_or_default(), dir);
    }
}

/// certwire's settings as certwire itself reads them: the Deployment's args through the
/// real command line parser, the mounted certwire.toml through the real config loader.
fn certwire_settings(manifests: &[Manifest], origin: &str) -> (Settings, Vec<String>) {
    let deployment = only(deployments(manifests), "Deployment", origin);
    let container = only(pod_spec(deployment).containers.iter().collect(), "container", origin);
    let args = container.args.clone().unwrap_or_default();
    let cli = Cli::try_parse_from(std::iter::once("certwire".to_owned()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("{origin}: certwire does not accept the args {args:?}: {e}"));
    let CertwireCommand::Serve(mut flags) = cli.command else { panic!("{origin}: the args do not run `serve`") };
    let config = flags.config.clone().unwrap_or_else(|| panic!("{origin}: no --config"));
    let (data, key) = mounted_file(deployment, container, config.to_str().unwrap(), manifests);
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join(&key);
    std::fs::write(&local, &data[&key]).unwrap();
    flags.config = Some(local);
    let settings = Settings::resolve(&flags, cli.log_format)
        .unwrap_or_else(|e| panic!("{origin}: certwire refuses its config {}: {e:#}", config.display()));
    (settings, args)
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
// Envoy bootstraps, checked by Envoy

#[test]
fn edge_envoy_bootstrap_and_command_line_validate_with_the_real_envoy() {
    let manifests = render(EDGE_ENVOY);
    let deployment = only(deployments(&manifests), "Deployment", EDGE_ENVOY);
    let container = &pod_spec(deployment).containers[0];
    let dir = tempfile::tempdir().unwrap();
    // The container's own args, with the mounted ConfigMap files written out and
    // $(VAR) expanded as the kubelet does it.
    let mut args = Vec::new();
    let mut bootstrap = None;
    for arg in container.args.iter().flatten() {
        let mut arg = arg.clone();
        for env in container.env.iter().flatten() {
            arg = arg.replace(&format!("$({})", env.name), &format!("{}-value", env.name.to_lowercase()));
        }
        if arg.starts_with('/') && arg.ends_with(".yaml") {
            let (data, key) = mounted_file(deployment, container, &arg, &manifests);
            let local = dir.path().join(&key);
            std::fs::write(&local, &data[&key]).unwrap();
            bootstrap = Some(data[&key].clone());
            arg = local.display().to_string();
        }
        args.push(arg);
    }
    let bootstrap = bootstrap.expect("a bootstrap file among the args");
    if let Err(envoy) = envoy_validate(&args) {
        panic!("{EDGE_ENVOY}: envoy --mode validate {args:?} refuses the bootstrap:\n{envoy}");
    }

    // What validation does not look at: the SDS cluster must speak HTTP/2 and point at
    // certwire's Service, and the secret must be the one cert-manager writes.
    let bootstrap: Value = serde_saphyr::from_str(&bootstrap).unwrap();
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

    // The container and Service ports are the TLS listener's.
    let https = container.ports.iter().flatten().find(|p| p.name.as_deref() == Some("https")).unwrap();
    assert_eq!(https.container_port as u64, port, "{EDGE_ENVOY}: container port https");
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
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.json");
    std::fs::write(&path, serde_json::to_string_pretty(&base).unwrap()).unwrap();
    let base_args = vec!["-c".to_owned(), path.display().to_string()];
    // pilot-agent passes the override file's content as `--config-yaml` (Istio's
    // pkg/envoy/proxy.go); Envoy merges it into the bootstrap.
    let merged = [base_args.clone(), vec!["--config-yaml".to_owned(), override_json.clone()]].concat();
    if let Err(envoy) = envoy_validate(&merged) {
        panic!("{ISTIO}: envoy --mode validate refuses the override merged with the EnvoyFilter's TLS:\n{envoy}");
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
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.yaml"), LEGACY_GATEWAY).unwrap();
    std::fs::copy(repo().join(ISTIO_GATEWAY_PATCH), dir.path().join("patch.yaml")).unwrap();
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [gateway.yaml]\npatches:\n- path: patch.yaml\n",
    )
    .unwrap();
    let rendered = kustomize(dir.path());
    let docs = documents(&rendered, ISTIO_GATEWAY_PATCH);
    let [doc] = docs.as_slice() else { panic!("{ISTIO_GATEWAY_PATCH}: expected one Deployment") };
    match parse(doc, ISTIO_GATEWAY_PATCH) {
        Manifest::Deployment(d) => *d,
        other => panic!("{ISTIO_GATEWAY_PATCH}: patched into {other:?}"),
    }
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
