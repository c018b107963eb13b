//! The keys of a secret that are not a certificate pair or a CA, shared by the files
//! source (one file per key) and the Kubernetes source (one Secret data key per key), so
//! the two cannot drift apart.
//!
//! Under a secret's own name, one thing is served: its certificate pair, or its session
//! ticket keys, or its generic secret. A secret that holds more than one of them is
//! refused as ambiguous (the last good version stays served) rather than one of them
//! picked silently: a proxy asking for a certificate would get ticket keys, or the reverse.

use crate::pki::{KeyBytes, Material};

/// Session ticket keys: the raw concatenation of 80-byte keys (16 bytes name, 32 bytes
/// HMAC secret, 32 bytes AES key, as Envoy and nginx read them), the first one encrypts
/// and all decrypt. No other control plane defines this key; `tls.` as Istio's
/// `tls.ocsp-staple` does.
pub const SESSION_TICKET_KEYS: &str = "tls.session-ticket-keys";

/// An opaque secret, served as Envoy's `generic_secret` (OAuth2 token and HMAC secrets,
/// credential injector).
pub const GENERIC_SECRET: &str = "secret";

/// Envoy's size of one session ticket key.
const TICKET_KEY_LEN: usize = 80;

/// Ticket keys as a source found them. A length that is not a multiple of 80 leaves a
/// short last key, which the pki check refuses with its position and size.
pub fn ticket_keys(bytes: &[u8]) -> Material {
    Material::SessionTicketKeys(bytes.chunks(TICKET_KEY_LEN).map(|k| KeyBytes::new(k.to_vec())).collect())
}

pub fn generic(bytes: &[u8]) -> Material {
    Material::Generic(KeyBytes::new(bytes.to_vec()))
}

/// Two kinds of material found under one name; the keys are named in the error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "holds both {0:?} and {1:?}; a secret serves one of a certificate pair, session ticket keys or a generic secret under its name"
)]
pub struct Ambiguous(pub &'static str, pub &'static str);

impl Ambiguous {
    /// The `reason` label of `certwire_updates_rejected_total`.
    pub const REASON: &'static str = "ambiguous_keys";
}

/// The one material of a secret out of what was found under each key (named for the
/// error), or none.
pub fn one_of(found: [(&'static str, Option<Material>); 3]) -> Result<Option<Material>, Ambiguous> {
    let mut present = found.into_iter().filter_map(|(key, m)| Some((key, m?)));
    let Some((first, material)) = present.next() else { return Ok(None) };
    match present.next() {
        Some((second, _)) => Err(Ambiguous(first, second)),
        None => Ok(Some(material)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticket_keys_are_cut_every_80_bytes_and_a_short_tail_is_kept_for_the_check() {
        let Material::SessionTicketKeys(keys) = ticket_keys(&[1u8; 160]) else { panic!() };
        assert_eq!(keys.iter().map(KeyBytes::len).collect::<Vec<_>>(), [80, 80]);
        let Material::SessionTicketKeys(keys) = ticket_keys(&[1u8; 100]) else { panic!() };
        assert_eq!(keys.iter().map(KeyBytes::len).collect::<Vec<_>>(), [80, 20]);
        let err = crate::pki::check("t", &ticket_keys(&[1u8; 100]), &Default::default()).unwrap_err();
        assert!(err.to_string().contains("key 2 is 20 bytes"), "{err}");
    }

    #[test]
    fn one_kind_per_name() {
        assert_eq!(one_of([("a", None), ("b", None), ("c", None)]), Ok(None));
        assert_eq!(one_of([("a", None), ("b", Some(generic(b"x"))), ("c", None)]), Ok(Some(generic(b"x"))));
        let err = one_of([("tls.crt", Some(generic(b"x"))), ("b", None), ("secret", Some(generic(b"y")))]).unwrap_err();
        assert_eq!(err, Ambiguous("tls.crt", "secret"));
        assert!(err.to_string().contains(r#""tls.crt" and "secret""#), "{err}");
    }
}
