//! Kubernetes Events on a rejected Secret, so `kubectl describe secret` shows why
//! certwire keeps serving the previous version.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};

use crate::pki::PkiError;

#[derive(Clone)]
pub struct Rejections {
    recorder: Arc<Recorder>,
    /// Last note published per Secret (`ns/name`): the same rejection is reported once.
    published: Arc<Mutex<HashMap<String, String>>>,
}

impl Rejections {
    pub fn new(client: Client) -> Self {
        let instance = std::env::var("POD_NAME").ok().or_else(|| std::env::var("HOSTNAME").ok());
        let reporter = Reporter { controller: "certwire".into(), instance };
        Self { recorder: Arc::new(Recorder::new(client, reporter)), published: Default::default() }
    }

    /// Forgets a Secret's last rejection once it is accepted or deleted, so a relapse
    /// is reported and the map does not grow with deleted Secrets.
    pub fn forget(&self, key: &str) {
        self.published.lock().expect("events lock").remove(key);
    }

    /// Publishes a Warning event in the background; never blocks the watch.
    /// `key` is the Secret's `ns/name`.
    pub fn rejected(&self, secret: &Secret, key: &str, err: &PkiError) {
        let key = key.to_owned();
        let note =
            format!("certwire refused this Secret ({}): {err}; the last good version stays served", err.reason());
        {
            let mut published = self.published.lock().expect("events lock");
            if published.get(&key) == Some(&note) {
                return;
            }
            published.insert(key.clone(), note.clone());
        }
        let recorder = self.recorder.clone();
        // The Recorder merges events about the same reference into one (a count);
        // naming the rejected resourceVersion gives each bad version its own Event,
        // with its own reason.
        let mut reference = secret.object_ref(&());
        reference.resource_version = secret.metadata.resource_version.clone();
        tokio::spawn(async move {
            let event = Event {
                type_: EventType::Warning,
                reason: "Rejected".into(),
                note: Some(note),
                action: "Validate".into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!(secret = %key, error = %e, "could not publish a Kubernetes event");
            }
        });
    }
}
