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
    /// Last reason published per Secret uid: the same rejection is reported once.
    published: Arc<Mutex<HashMap<String, String>>>,
}

impl Rejections {
    pub fn new(client: Client) -> Self {
        let instance = std::env::var("POD_NAME").ok().or_else(|| std::env::var("HOSTNAME").ok());
        let reporter = Reporter { controller: "certwire".into(), instance };
        Self { recorder: Arc::new(Recorder::new(client, reporter)), published: Default::default() }
    }

    /// Forgets a Secret's last rejection once it is accepted, so a relapse is reported.
    pub fn accepted(&self, secret: &Secret) {
        if let Some(uid) = &secret.metadata.uid {
            self.published.lock().expect("events lock").remove(uid);
        }
    }

    /// Publishes a Warning event in the background; never blocks the watch.
    pub fn rejected(&self, secret: &Secret, err: &PkiError) {
        let uid = secret.metadata.uid.clone().unwrap_or_default();
        let note =
            format!("certwire refused this Secret ({}): {err}; the last good version stays served", err.reason());
        {
            let mut published = self.published.lock().expect("events lock");
            if published.get(&uid) == Some(&note) {
                return;
            }
            published.insert(uid, note.clone());
        }
        let recorder = self.recorder.clone();
        let reference = secret.object_ref(&());
        let name = format!(
            "{}/{}",
            secret.metadata.namespace.as_deref().unwrap_or(""),
            secret.metadata.name.as_deref().unwrap_or("")
        );
        tokio::spawn(async move {
            let event = Event {
                type_: EventType::Warning,
                reason: "Rejected".into(),
                note: Some(note),
                action: "Validate".into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!(secret = %name, error = %e, "could not publish a Kubernetes event");
            }
        });
    }
}
