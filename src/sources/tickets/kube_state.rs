//! The state of one ticket name in a Kubernetes Secret (`state = "kubernetes://NS/NAME"`),
//! for fleets without a shared volume:
//!
//! - `data["tls.session-ticket-keys"]`: the raw 80-byte keys, first encrypts (the format
//!   the files and Kubernetes sources read, so `kubectl get secret -o
//!   jsonpath='{.data.tls\.session-ticket-keys}'` shows what Envoy gets);
//! - annotation `certwire.io/session-ticket-keys-meta`: the rotation times (no key bytes),
//!   in the same object, so keys and times change together;
//! - label `app.kubernetes.io/managed-by=certwire`: a Secret of that name without it is
//!   someone else's and is never overwritten.
//!
//! Writes use optimistic concurrency on `resourceVersion` rather than the ACME Lease:
//! every replica already computes the same step from the same stored times, so it does
//! not matter who writes, only that two writers do not both win. The loser of a race
//! gets a 409, reads again, and finds the step done. No Lease means no election delay
//! and no single replica whose loss stalls rotation. Followers poll (`reread_every`).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

use super::dir::{Bad, KEYS_FILE, MAX_META_BYTES, StateError, Updated, encode, parse};
use super::schedule::{Plan, State};

pub const META_ANNOTATION: &str = "certwire.io/session-ticket-keys-meta";
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
const MANAGED_BY_VALUE: &str = "certwire";
/// A write that keeps conflicting gives up until the next re-read.
const WRITE_ATTEMPTS: usize = 3;

#[derive(Clone)]
pub struct KubeState {
    api: Api<Secret>,
    secret: String,
    /// `kubernetes://NS/NAME`, for errors and logs.
    describe: String,
    name: String,
}

impl KubeState {
    pub fn new(client: kube::Client, namespace: &str, secret: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            secret: secret.to_owned(),
            describe: format!("kubernetes://{namespace}/{secret}"),
            name: name.to_owned(),
        }
    }

    fn kube(&self, op: &'static str) -> impl FnOnce(kube::Error) -> StateError {
        let path = self.describe.clone();
        move |source| StateError::Kube { path, op, source }
    }

    fn corrupt(&self, reason: impl Into<String>) -> StateError {
        StateError::Corrupt { path: self.describe.clone(), reason: reason.into() }
    }

    pub async fn read(&self) -> Result<Option<State>, StateError> {
        let secret = self.api.get_opt(&self.secret).await.map_err(self.kube("reading"))?;
        let state = secret.as_ref().map(|s| self.parse(s)).transpose();
        if let Some(secret) = secret {
            scrub(secret);
        }
        state
    }

    fn parse(&self, secret: &Secret) -> Result<State, StateError> {
        let labels = secret.metadata.labels.as_ref();
        let ours = labels.and_then(|l| l.get(MANAGED_BY)).is_some_and(|v| v == MANAGED_BY_VALUE);
        let meta = secret.metadata.annotations.as_ref().and_then(|a| a.get(META_ANNOTATION));
        let (true, Some(meta)) = (ours, meta) else {
            return Err(self.corrupt(format!(
                "not written by certwire's tickets source (no {MANAGED_BY}={MANAGED_BY_VALUE} label or no \
                 {META_ANNOTATION} annotation)"
            )));
        };
        if meta.len() as u64 > MAX_META_BYTES {
            return Err(StateError::TooLarge {
                path: self.describe.clone(),
                max: MAX_META_BYTES,
                what: "ticket state metadata",
            });
        }
        let keys = secret.data.as_ref().and_then(|d| d.get(KEYS_FILE)).map(|b| b.0.as_slice()).unwrap_or_default();
        parse(&self.name, keys, meta.as_bytes()).map_err(|bad| match bad {
            Bad::Keys(reason) => self.corrupt(format!("key {KEYS_FILE}: {reason}")),
            Bad::Meta(reason) => self.corrupt(format!("annotation {META_ANNOTATION}: {reason}")),
        })
    }

    /// Reads, asks `plan`, and writes with the resourceVersion read: a 409 (another
    /// replica wrote first) starts over on the fresh object.
    pub async fn update(&self, plan: impl Fn(Option<&State>) -> Plan) -> Result<Updated, StateError> {
        for _ in 0..WRITE_ATTEMPTS {
            let mut existing = self.api.get_opt(&self.secret).await.map_err(self.kube("reading"))?;
            let current = existing.as_ref().map(|s| self.parse(s)).transpose();
            let resource_version = existing.as_mut().and_then(|s| s.metadata.resource_version.take());
            if let Some(existing) = existing {
                scrub(existing);
            }
            let current = current?;
            let (state, step) = match (plan(current.as_ref()), current) {
                (Plan::Write(state, step), _) => (state, step),
                (Plan::Wait { .. }, Some(state)) => return Ok(Updated { state, step: None }),
                (Plan::Wait { .. }, None) => return Err(self.corrupt("no state and nothing planned")),
            };
            let (keys, meta) = encode(&self.name, &state);
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(self.secret.clone()),
                    resource_version: resource_version.clone(),
                    labels: Some(BTreeMap::from([(MANAGED_BY.to_owned(), MANAGED_BY_VALUE.to_owned())])),
                    annotations: Some(BTreeMap::from([(
                        META_ANNOTATION.to_owned(),
                        String::from_utf8(meta).expect("JSON is UTF-8"),
                    )])),
                    ..Default::default()
                },
                type_: Some("Opaque".to_owned()),
                // The request body is built from this copy; kube's types do not zeroize.
                data: Some(BTreeMap::from([(KEYS_FILE.to_owned(), ByteString(keys.to_vec()))])),
                ..Default::default()
            };
            let written = match resource_version {
                None => self.api.create(&PostParams::default(), &secret).await,
                Some(_) => self.api.replace(&self.secret, &PostParams::default(), &secret).await,
            };
            scrub(secret);
            match written {
                Ok(echoed) => {
                    scrub(echoed);
                    return Ok(Updated { state, step: Some(step) });
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    tracing::debug!(state = %self.describe, "another replica wrote the ticket state first; reading it again");
                }
                Err(e) => return Err(self.kube("writing")(e)),
            }
        }
        Err(StateError::Conflict { path: self.describe.clone() })
    }
}

/// Zeroizes the key bytes of a Secret certwire held (kube's types do not on drop).
fn scrub(mut secret: Secret) {
    for value in secret.data.iter_mut().flat_map(|d| d.values_mut()) {
        zeroize::Zeroize::zeroize(&mut value.0);
    }
}
