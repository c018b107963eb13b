//! Names a proxy may ask for that stand for another name's secret. Istio's external
//! SDS routes ask for `sds://NAME`: on a gateway's credential socket
//! (`/var/run/secrets/credential-uds/socket`) Envoy asks for the full `sds://NAME` and
//! `sds://NAME-cacert`, and Istio 1.28-1.30 ask mesh extension providers for
//! `sds://PROVIDER`. certwire answers each with NAME's secret, renamed: the store,
//! authorization and sources only ever see NAME.

const SDS_PREFIX: &str = "sds://";

/// The stored name behind a requested one.
pub fn stored(requested: &str) -> &str {
    requested.strip_prefix(SDS_PREFIX).filter(|name| !name.is_empty()).unwrap_or(requested)
}

#[cfg(test)]
mod tests {
    use super::stored;

    #[test]
    fn sds_names_stand_for_the_name_after_the_prefix() {
        assert_eq!(stored("sds://web"), "web");
        assert_eq!(stored("sds://kubernetes://ns/web-cacert"), "kubernetes://ns/web-cacert");
        assert_eq!(stored("web"), "web");
        assert_eq!(stored("sds://"), "sds://", "nothing after the prefix: a name of its own");
        assert_eq!(stored("kubernetes://web"), "kubernetes://web");
    }
}
