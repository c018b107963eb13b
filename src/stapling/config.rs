//! `[ocsp]`: whether certwire fetches OCSP staples, for which secrets, and its bounds.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// What certwire does about OCSP for a TLS secret whose source supplies no staple.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Nothing: no request leaves certwire unless asked for (the default).
    #[default]
    Off,
    /// Fetch, verify and staple; the certificate is served without a staple meanwhile.
    Fetch,
    /// Like `fetch`, but a certificate is not served until a verified staple is at hand
    /// (for Envoy's `ocsp_staple_policy: MUST_STAPLE`, which refuses one without).
    MustStaple,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Fetch => "fetch",
            Mode::MustStaple => "must-staple",
        }
    }
}

/// What is served when the responder says the certificate is revoked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnRevoked {
    /// The certificate is treated as invalid: this source's version is withdrawn and
    /// `on_invalid` decides (nothing new, or the placeholder).
    #[default]
    Withhold,
    /// The certificate stays served, without a staple (stapling "revoked" would make
    /// every client refuse it anyway).
    Serve,
}

/// The `[ocsp]` table. Every key is optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OcspConfig {
    /// For every source and name not listed below.
    pub mode: Mode,
    pub on_revoked: OnRevoked,
    /// Refreshes happen halfway to nextUpdate, but not sooner than this...
    #[serde(with = "humantime_serde")]
    pub refresh_min: Duration,
    /// ...and not later than this.
    #[serde(with = "humantime_serde")]
    pub refresh_max: Duration,
    /// First retry after a failed fetch; doubled per failure, jittered.
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Whole fetch: connect, request, and the last byte of the response.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub max_response_bytes: usize,
    pub max_concurrent_fetches: usize,
    /// Certificates tracked at once (one per secret with OCSP on).
    pub max_certificates: usize,
    /// Distinct responder URLs tracked at once.
    pub max_responders: usize,
    /// When not empty, the only responder URLs certwire sends requests to (prefixes, e.g.
    /// `http://ocsp.corp.example/`): the URL comes from the certificate, so whoever may
    /// write a served certificate otherwise chooses where certwire sends a POST.
    pub responders: Vec<String>,
    /// Mode per source, by the name status shows (`files:/etc/certs`, `kubernetes`, `acme`).
    pub sources: BTreeMap<String, Mode>,
    /// Mode per secret name (any of its aliases); wins over `sources` and `mode`.
    pub names: BTreeMap<String, Mode>,
}

impl Default for OcspConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Off,
            on_revoked: OnRevoked::Withhold,
            refresh_min: Duration::from_secs(60),
            refresh_max: Duration::from_secs(12 * 3600),
            retry_min: Duration::from_secs(10),
            retry_max: Duration::from_secs(600),
            timeout: Duration::from_secs(10),
            max_response_bytes: 64 * 1024,
            max_concurrent_fetches: 8,
            max_certificates: 10_000,
            max_responders: 64,
            responders: Vec::new(),
            sources: BTreeMap::new(),
            names: BTreeMap::new(),
        }
    }
}

impl OcspConfig {
    /// Whether any source or name may have OCSP on: if not, no stapler runs.
    pub fn enabled(&self) -> bool {
        self.mode != Mode::Off || self.sources.values().chain(self.names.values()).any(|m| *m != Mode::Off)
    }

    /// The mode for a secret served under `names` by `source`: a name's entry, else the
    /// source's, else the global one.
    pub fn mode_for<N: AsRef<str>>(&self, source: &str, names: &[N]) -> Mode {
        names
            .iter()
            .find_map(|n| self.names.get(n.as_ref()).copied())
            .or_else(|| self.sources.get(source).copied())
            .unwrap_or(self.mode)
    }

    /// Whether certwire may send a request to `url` (see `responders`).
    pub fn responder_allowed(&self, url: &str) -> bool {
        self.responders.is_empty() || self.responders.iter().any(|prefix| url.starts_with(prefix.as_str()))
    }

    pub fn validate(&self) -> Result<(), String> {
        if let Some(bad) = self.responders.iter().find(|r| {
            let rest = r.strip_prefix("http://").or_else(|| r.strip_prefix("https://"));
            // A bare host prefix would also match `http://ocsp.example.com.attacker.net`.
            rest.is_none_or(|rest| !rest.contains('/'))
        }) {
            return Err(format!(
                "[ocsp] responders: {bad:?}: expected an http:// or https:// URL prefix that ends its host with a \
                 path, e.g. \"http://ocsp.example.com/\""
            ));
        }
        if self.refresh_min > self.refresh_max {
            return Err("[ocsp] refresh_min is larger than refresh_max".into());
        }
        if self.retry_min.is_zero() || self.retry_min > self.retry_max {
            return Err("[ocsp] retry_min must be above zero and at most retry_max".into());
        }
        if self.timeout.is_zero() {
            return Err("[ocsp] timeout must be above zero".into());
        }
        for (key, value) in [
            ("max_response_bytes", self.max_response_bytes),
            ("max_concurrent_fetches", self.max_concurrent_fetches),
            ("max_certificates", self.max_certificates),
            ("max_responders", self.max_responders),
        ] {
            if value == 0 {
                return Err(format!("[ocsp] {key} must be above zero"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_win_over_sources_over_the_global_mode() {
        let cfg: OcspConfig = toml::from_str(
            r#"
            mode = "fetch"
            on_revoked = "serve"
            refresh_min = "30s"
            [sources]
            kubernetes = "must-staple"
            [names]
            "kubernetes://ns/web" = "off"
            "#,
        )
        .unwrap();
        assert!(cfg.enabled());
        cfg.validate().unwrap();
        assert_eq!(cfg.on_revoked, OnRevoked::Serve);
        assert_eq!(cfg.refresh_min, Duration::from_secs(30));
        assert_eq!(cfg.mode_for("files:/x", &["web"]), Mode::Fetch);
        assert_eq!(cfg.mode_for("kubernetes", &["kubernetes://ns/api"]), Mode::MustStaple);
        assert_eq!(cfg.mode_for("kubernetes", &["web", "kubernetes://ns/web"]), Mode::Off);
        assert!(!OcspConfig::default().enabled(), "off unless asked");
        let bad: OcspConfig = toml::from_str("max_response_bytes = 0").unwrap();
        assert!(bad.validate().unwrap_err().contains("max_response_bytes"));
        assert!(toml::from_str::<OcspConfig>("mode = \"sometimes\"").is_err());
    }

    #[test]
    fn responders_restrict_where_requests_go() {
        let any = OcspConfig::default();
        assert!(any.responder_allowed("http://169.254.169.254/latest"), "no list: any responder");
        let cfg: OcspConfig = toml::from_str(r#"responders = ["http://ocsp.corp.example/"]"#).unwrap();
        cfg.validate().unwrap();
        assert!(cfg.responder_allowed("http://ocsp.corp.example/ca1"));
        assert!(!cfg.responder_allowed("http://ocsp.corp.example.evil.net/"));
        assert!(!cfg.responder_allowed("http://169.254.169.254/latest"));
        for bad in ["ocsp.corp.example", "http://ocsp.corp.example", "ftp://x/"] {
            let cfg: OcspConfig = toml::from_str(&format!("responders = [{bad:?}]")).unwrap();
            assert!(cfg.validate().unwrap_err().contains("responders"), "{bad}");
        }
    }
}
