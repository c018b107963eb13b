//! The resources the emulator serves. Everything else (discovery, routing, storage,
//! printing) is derived from this table, so serving one more resource is one entry.

use std::sync::Arc;

use serde_json::Value;

use super::convert;
use super::table::{self, Printer};

/// One resource as the API server describes it in discovery.
#[derive(Debug)]
pub struct ResourceDef {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// The key its objects are stored under. Two resources sharing a key are two views
    /// of the same objects, as core `events` and `events.k8s.io` events are.
    pub storage: &'static str,
    /// Converts between this resource's form and the stored form, when they differ.
    pub codec: Option<&'static convert::Codec>,
    /// PUT of a missing object creates it (true for leases and events upstream).
    pub create_on_update: bool,
    /// Upstream sets `metadata.generation` only for resources with a spec that its
    /// controllers observe; none of the built-in kinds here do.
    pub generation: bool,
    /// A review (SubjectAccessReview): create only, answered and never stored.
    pub review: bool,
    /// A custom resource: served only while its CRD is installed
    /// ([`super::Config::crds_installed`]).
    pub crd: bool,
    pub printer: &'static Printer,
}

const fn def(
    group: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    printer: &'static Printer,
) -> ResourceDef {
    ResourceDef {
        group,
        version: "v1",
        plural,
        kind,
        namespaced,
        short_names: &[],
        storage: plural,
        codec: None,
        create_on_update: false,
        generation: false,
        review: false,
        crd: false,
        printer,
    }
}

impl ResourceDef {
    const fn short(mut self, names: &'static [&'static str]) -> Self {
        self.short_names = names;
        self
    }

    const fn create_on_update(mut self) -> Self {
        self.create_on_update = true;
        self
    }

    const fn review(mut self) -> Self {
        self.review = true;
        self
    }

    /// A custom resource of `version`: upstream sets `metadata.generation` on every one.
    const fn crd(mut self, version: &'static str) -> Self {
        self.crd = true;
        self.version = version;
        self.generation = true;
        self
    }

    /// Whether the API serves it: a custom resource only while its CRD is installed.
    pub fn served(&self, crds_installed: bool) -> bool {
        !self.crd || crds_installed
    }

    const fn stored_as(mut self, storage: &'static str, codec: &'static convert::Codec) -> Self {
        self.storage = storage;
        self.codec = Some(codec);
        self
    }

    /// `v1` for the core group, `GROUP/VERSION` otherwise.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_string() } else { format!("{}/{}", self.group, self.version) }
    }

    pub fn singular(&self) -> String {
        self.kind.to_ascii_lowercase()
    }

    pub fn verbs(&self) -> &'static [&'static str] {
        if self.review {
            return &["create"];
        }
        // Upstream has no deletecollection on namespaces.
        if self.plural == "namespaces" {
            &["create", "delete", "get", "list", "patch", "update", "watch"]
        } else {
            &["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
        }
    }

    /// The object in this resource's form, from its stored form.
    pub fn serve(&self, stored: &Arc<Value>) -> Arc<Value> {
        match self.codec {
            None => stored.clone(),
            Some(codec) => Arc::new((codec.from_storage)(stored)),
        }
    }

    /// The stored form of an object in this resource's form.
    pub fn store(&self, served: Value) -> Value {
        match self.codec {
            None => served,
            Some(codec) => (codec.to_storage)(&served),
        }
    }
}

pub static RESOURCES: &[ResourceDef] = &[
    def("", "namespaces", "Namespace", false, &table::NAMESPACE).short(&["ns"]),
    def("", "secrets", "Secret", true, &table::SECRET),
    def("", "configmaps", "ConfigMap", true, &table::CONFIGMAP).short(&["cm"]),
    def("", "serviceaccounts", "ServiceAccount", true, &table::SERVICEACCOUNT).short(&["sa"]),
    def("", "events", "Event", true, &table::EVENT).short(&["ev"]).create_on_update(),
    def("events.k8s.io", "events", "Event", true, &table::EVENT)
        .short(&["ev"])
        .create_on_update()
        .stored_as("events", &convert::EVENTS_V1),
    def("coordination.k8s.io", "leases", "Lease", true, &table::LEASE).create_on_update(),
    def(RBAC, "roles", "Role", true, &table::ROLE),
    def(RBAC, "rolebindings", "RoleBinding", true, &table::ROLEBINDING),
    def(RBAC, "clusterroles", "ClusterRole", false, &table::ROLE),
    def(RBAC, "clusterrolebindings", "ClusterRoleBinding", false, &table::ROLEBINDING),
    def("authorization.k8s.io", "subjectaccessreviews", "SubjectAccessReview", false, &table::DEFAULT).review(),
    // The Gateway API's, as its standard-channel CRDs install it.
    def(GATEWAY, "referencegrants", "ReferenceGrant", true, &table::DEFAULT).short(&["refgrant"]).crd("v1beta1"),
];

pub const GATEWAY: &str = "gateway.networking.k8s.io";

pub const RBAC: &str = "rbac.authorization.k8s.io";

/// Resources whose objects every namespaced resource lives in.
pub fn namespaces() -> &'static ResourceDef {
    &RESOURCES[0]
}

/// The resource at `/apis/GROUP/VERSION/PLURAL`, if the API serves it.
pub fn find(group: &str, version: &str, plural: &str, crds: bool) -> Option<&'static ResourceDef> {
    RESOURCES.iter().find(|r| r.group == group && r.version == version && r.plural == plural && r.served(crds))
}

pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static ResourceDef> {
    RESOURCES.iter().find(|r| r.kind == kind && r.api_version() == api_version)
}

/// Distinct (group, version) pairs served, in table order; the core group comes first.
pub fn group_versions(crds: bool) -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&'static str, &'static str)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.served(crds)) {
        if !out.contains(&(r.group, r.version)) {
            out.push((r.group, r.version));
        }
    }
    out
}

pub fn in_group_version(group: &str, version: &str, crds: bool) -> impl Iterator<Item = &'static ResourceDef> {
    let (group, version) = (group.to_string(), version.to_string());
    RESOURCES.iter().filter(move |r| r.group == group && r.version == version && r.served(crds))
}
