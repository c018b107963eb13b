//! Readiness: each component says whether it is ready and, if not, why. /readyz shows it.
//! A component can also be ready but degraded (an optional part unavailable, e.g. the
//! Gateway API CRDs not installed): /readyz stays 200 and shows why.

use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct Health {
    components: Mutex<BTreeMap<String, Option<String>>>,
    /// Ready components with something to say ([`Health::degraded`]).
    notes: Mutex<BTreeMap<String, String>>,
}

impl Health {
    /// Marks `component` not ready, with the reason shown by /readyz.
    pub fn not_ready(&self, component: &str, reason: impl Into<String>) {
        self.notes.lock().expect("health lock").remove(component);
        self.components.lock().expect("health lock").insert(component.to_owned(), Some(reason.into()));
    }

    pub fn ready(&self, component: &str) {
        self.notes.lock().expect("health lock").remove(component);
        self.components.lock().expect("health lock").insert(component.to_owned(), None);
    }

    /// Marks `component` ready, with a reason /readyz shows all the same: it works, with
    /// less than it was configured for.
    pub fn degraded(&self, component: &str, reason: impl Into<String>) {
        self.components.lock().expect("health lock").insert(component.to_owned(), None);
        self.notes.lock().expect("health lock").insert(component.to_owned(), reason.into());
    }

    /// The reasons of degraded components, one per component.
    pub fn notes(&self) -> Vec<String> {
        self.notes.lock().expect("health lock").iter().map(|(c, why)| format!("{c}: {why}")).collect()
    }

    /// `Ok` when every component is ready, else the reasons, one per component.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let reasons: Vec<String> = self
            .components
            .lock()
            .expect("health lock")
            .iter()
            .filter_map(|(c, why)| why.as_ref().map(|w| format!("{c}: {w}")))
            .collect();
        if reasons.is_empty() { Ok(()) } else { Err(reasons) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_all_components_are() {
        let h = Health::default();
        assert!(h.check().is_ok());
        h.not_ready("sds", "not listening yet");
        h.not_ready("files:/x", "initial load");
        assert_eq!(h.check().unwrap_err().len(), 2);
        h.ready("sds");
        assert_eq!(h.check().unwrap_err(), vec!["files:/x: initial load".to_string()]);
        h.ready("files:/x");
        assert!(h.check().is_ok());
    }

    #[test]
    fn degraded_is_ready_with_a_reason() {
        let h = Health::default();
        h.not_ready("grants", "waiting for the first list");
        h.degraded("grants", "the CRD is not installed");
        assert!(h.check().is_ok());
        assert_eq!(h.notes(), vec!["grants: the CRD is not installed".to_string()]);
        h.ready("grants");
        assert!(h.notes().is_empty());
        h.degraded("grants", "again");
        h.not_ready("grants", "API server: down");
        assert!(h.notes().is_empty() && h.check().is_err());
    }
}
