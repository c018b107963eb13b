//! Readiness: each component says whether it is ready and, if not, why. /readyz shows it.

use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct Health {
    components: Mutex<BTreeMap<String, Option<String>>>,
}

impl Health {
    /// Marks `component` not ready, with the reason shown by /readyz.
    pub fn not_ready(&self, component: &str, reason: impl Into<String>) {
        self.components.lock().expect("health lock").insert(component.to_owned(), Some(reason.into()));
    }

    pub fn ready(&self, component: &str) {
        self.components.lock().expect("health lock").insert(component.to_owned(), None);
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
}
