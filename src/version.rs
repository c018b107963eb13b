//! Content versions. A secret's version is a hash of what is served, so it is the same
//! across restarts and replicas, and a reconnecting proxy's claim means something.

use std::fmt;
use std::ops::Deref;

use ring::digest;

/// The first 16 bytes of the SHA-256 of the encoded resource, shown as 32 hex digits.
/// Held as bytes: every stored secret, and every stream for what it sent, acked or
/// refused, carries one; bytes are copied and compared without a shared refcount or an
/// allocation.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version([u8; 16]);

impl Version {
    /// Length of [`Version::text`].
    pub const TEXT_LEN: usize = 32;

    pub fn of(content: &[u8]) -> Self {
        let mut bytes = [0; 16];
        bytes.copy_from_slice(&digest::digest(&digest::SHA256, content).as_ref()[..16]);
        Self(bytes)
    }

    /// The version of a served resource of `kind`. A generic secret may be a password of
    /// little entropy, and versions are shown (status, logs, Envoy's config dump): its
    /// version is an HMAC under a key made at start, so it cannot be guessed back from
    /// the version offline. It then differs across restarts and replicas (a reconnecting
    /// proxy is sent the secret again). Every other kind holds a key or is public, and
    /// keeps the plain hash, the same everywhere.
    pub fn of_served(kind: crate::pki::SecretKind, content: &[u8]) -> Self {
        if kind != crate::pki::SecretKind::GenericSecret {
            return Self::of(content);
        }
        static KEY: std::sync::OnceLock<ring::hmac::Key> = std::sync::OnceLock::new();
        let key = KEY.get_or_init(|| {
            ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
                .expect("the system random number generator failed")
        });
        let mut bytes = [0; 16];
        bytes.copy_from_slice(&ring::hmac::sign(key, content).as_ref()[..16]);
        Self(bytes)
    }

    /// The 32 hex digits, without allocating.
    pub fn text(&self) -> VersionText {
        let mut hex = [0; Self::TEXT_LEN];
        hex::encode_to_slice(self.0, &mut hex).expect("32 hex digits for 16 bytes");
        VersionText(hex)
    }
}

/// The hex form of a [`Version`], as a `&str` or as bytes.
pub struct VersionText([u8; Version::TEXT_LEN]);

impl VersionText {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Deref for VersionText {
    type Target = str;
    fn deref(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

impl PartialEq<str> for Version {
    fn eq(&self, other: &str) -> bool {
        *self.text() == *other
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_as_the_hex_of_the_truncated_sha256() {
        let v = Version::of(b"abc");
        // SHA-256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
        assert_eq!(v.to_string(), "ba7816bf8f01cfea414140de5dae2223");
        assert!(v == *"ba7816bf8f01cfea414140de5dae2223");
        assert!(v != *"ba7816bf8f01cfea414140de5dae2224");
        assert_eq!(serde_json::to_string(&v).unwrap(), "\"ba7816bf8f01cfea414140de5dae2223\"");
        assert_ne!(Version::of(b"abd"), v);
    }

    #[test]
    fn a_generic_secret_version_is_keyed_so_it_cannot_be_guessed_back() {
        use crate::pki::SecretKind;
        let password = b"hunter2";
        let keyed = Version::of_served(SecretKind::GenericSecret, password);
        assert_ne!(keyed, Version::of(password), "not the plain hash an attacker can compute");
        assert_eq!(keyed, Version::of_served(SecretKind::GenericSecret, password), "stable within the process");
        assert_ne!(keyed, Version::of_served(SecretKind::GenericSecret, b"hunter3"));
        assert_eq!(Version::of_served(SecretKind::TlsCertificate, b"x"), Version::of(b"x"));
    }
}
