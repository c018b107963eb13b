//! Kubernetes Events on a rejected Secret, so `kubectl events --for secret/NAME` shows
//! why certwire keeps serving the previous version.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};

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
    pub fn rejected(&self, secret: &Secret, key: &str, reason: &str, err: &str) {
        let key = key.to_owned();
        let note = truncate_note(format!(
            "certwire refused this Secret ({reason}): {err}; the last good version stays served"
        ));
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

/// A certificate found revoked by the OCSP stapler: a Warning Event `Revoked` on the
/// Secret it came from (`kubernetes://NS/NAME` among its names). The stapler says it once
/// per revocation, so no deduplication here.
impl crate::stapling::RevocationSink for Rejections {
    fn revoked(&self, names: &[Arc<str>], message: &str) {
        let Some((ns, name)) = names.iter().find_map(|n| n.strip_prefix("kubernetes://")?.split_once('/')) else {
            return;
        };
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Secret".into()),
            namespace: Some(ns.to_owned()),
            name: Some(name.to_owned()),
            ..Default::default()
        };
        let note = truncate_note(format!("certwire's OCSP check: {message}"));
        let (recorder, key) = (self.recorder.clone(), format!("{ns}/{name}"));
        tokio::spawn(async move {
            let event = Event {
                type_: EventType::Warning,
                reason: "Revoked".into(),
                note: Some(note),
                action: "OCSPCheck".into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!(secret = %key, error = %e, "could not publish a Kubernetes event");
            }
        });
    }
}

/// The API server refuses an Event whose note is over 1024 bytes (`NoteLengthLimit`),
/// and kube-rs sends it as it is: an error naming a long subject would leave no Event
/// at all. Cut as kube-scheduler does (`truncateMessage`: the limit, the last bytes
/// replaced by " ..."), on a character boundary.
fn truncate_note(note: String) -> String {
    const NOTE_LENGTH_LIMIT: usize = 1024;
    const SUFFIX: &str = " ...";
    if note.len() <= NOTE_LENGTH_LIMIT {
        return note;
    }
    let mut end = NOTE_LENGTH_LIMIT - SUFFIX.len();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{SUFFIX}", &note[..end])
}

#[cfg(test)]
mod tests {
    use super::truncate_note;

    #[test]
    fn notes_over_the_api_servers_limit_are_cut_like_kube_scheduler_does() {
        let short = "x".repeat(1024);
        assert_eq!(truncate_note(short.clone()), short, "at the limit: unchanged");
        let long = truncate_note("y".repeat(1072));
        assert_eq!(long.len(), 1024);
        assert!(long.ends_with("y ..."), "{long}");
        // Multi-byte characters straddling the cut are not split.
        let wide = truncate_note("é".repeat(600));
        assert!(wide.len() <= 1024 && wide.ends_with("é ..."), "{} bytes", wide.len());
    }
}
