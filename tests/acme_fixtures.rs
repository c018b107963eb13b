//! The real ACME test components on their own, before certwire meets them: knot
//! answers the test zone and takes TSIG-signed RFC 2136 updates, and acme2certifier
//! issues over dns-01 to a reference client (certbot's `acme` library) with the
//! shortened lifetime, ARI, and EAB when required.
//!
//! These tests bind 127.0.0.1:53 and run one at a time (nextest group `acme`).

mod common;

use std::process::Command;
use std::time::Duration;

use common::acme::ca::{AcmeCa, AcmeCaOptions};
use common::acme::client::RefClient;
use common::acme::dns::{self, Knot, NS, ZONE};
use common::http;
use common::util;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

#[tokio::test]
async fn knot_serves_the_zone_and_takes_signed_updates_only() {
    let dir = util::tempdir();
    let knot = Knot::start(dir.path()).await;

    // Any name resolves to loopback; the NS and its address lead back to this knot.
    assert_eq!(knot.query(&format!("anything.{ZONE}"), "A").await, ["127.0.0.1"]);
    assert_eq!(knot.query(ZONE, "NS").await, [format!("{NS}.")]);
    assert_eq!(knot.query(NS, "A").await, ["127.0.0.1"]);

    let name = format!("_acme-challenge.app.{ZONE}");
    assert_eq!(knot.txt(&name).await, Vec::<String>::new(), "no TXT before the update");

    let add = format!(r#"update add {name}. 1 TXT "first""#);
    let refused = dns::nsupdate(None, &[&add]).await.expect_err("an unsigned update is refused");
    assert!(refused.contains("NOTAUTH"), "{refused}");
    let mut wrong = knot.tsig().clone();
    wrong.secret = "c2VjcmV0IHRoYXQga25vdCBkb2VzIG5vdCBrbm93IGF0IGFsbCEh".into();
    let refused = dns::nsupdate(Some(&wrong), &[&add]).await.expect_err("another secret is refused");
    assert!(refused.contains("NOTAUTH") || refused.contains("BADSIG"), "{refused}");
    assert_eq!(knot.txt(&name).await, Vec::<String>::new(), "refused updates left nothing");

    knot.nsupdate(&[&add, &format!(r#"update add {name}. 1 TXT "second""#)]).await.expect("signed update");
    let mut records = knot.txt(&name).await;
    records.sort();
    assert_eq!(records, ["first", "second"]);

    knot.nsupdate(&[&format!(r#"update delete {name}. TXT "first""#)]).await.expect("delete one value");
    assert_eq!(knot.txt(&name).await, ["second"]);
    knot.nsupdate(&[&format!("update delete {name}. TXT")]).await.expect("delete the rest");
    assert_eq!(knot.txt(&name).await, Vec::<String>::new());
}

#[tokio::test]
async fn ca_issues_over_dns01_with_a_lifetime_of_minutes() {
    let dir = util::tempdir();
    let knot = Knot::start(dir.path()).await;
    let lifetime = Duration::from_secs(5 * 60);
    let options = AcmeCaOptions { cert_lifetime: lifetime, ari_window_start_percent: Some(50), ..Default::default() };
    let ca = AcmeCa::start(dir.path(), options).await;

    let directory = http::get(ca.addr(), "/directory").await.expect("GET /directory").json().expect("JSON");
    for key in ["newNonce", "newAccount", "newOrder", "renewalInfo"] {
        assert!(directory[key].is_string(), "directory has {key}: {directory}");
    }

    let domains = [format!("app.{ZONE}"), format!("*.app.{ZONE}")];
    let domains: Vec<&str> = domains.iter().map(String::as_str).collect();
    let client = RefClient::new(&ca, &dir.path().join("client"));
    let issued = client.order_dns01(&knot, &domains).await.unwrap_or_else(|e| {
        ca.dump_log();
        panic!("order failed: {e:?}")
    });

    // The wildcard shares `_acme-challenge.app` with the plain name.
    assert_eq!(issued.txt_records.len(), 2);
    for name in &issued.txt_records {
        assert_eq!(knot.txt(name).await, Vec::<String>::new(), "{name} removed after the order");
    }

    let chain: Vec<CertificateDer> =
        CertificateDer::pem_slice_iter(issued.fullchain_pem.as_bytes()).collect::<Result<_, _>>().expect("PEM chain");
    assert_eq!(chain.len(), 2, "leaf + CA");
    let ca_der = CertificateDer::from_pem_slice(ca.ca_cert_pem().as_bytes()).expect("CA PEM");
    assert_eq!(chain[1], ca_der, "the chain ends at the CA");
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(ca.ca_cert_path())
        .arg(&issued.fullchain_path)
        .output()
        .expect("run openssl verify");
    assert!(verify.status.success(), "openssl verify: {}", String::from_utf8_lossy(&verify.stdout));

    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).expect("parse leaf");
    let validity = leaf.validity();
    let lived = validity.not_after.timestamp() - validity.not_before.timestamp();
    assert!((lived - lifetime.as_secs() as i64).abs() <= 60, "lifetime {lived} s, wanted {lifetime:?}");
    assert_eq!(dns_names(&leaf), [format!("*.app.{ZONE}"), format!("app.{ZONE}")]);

    // ARI: the window starts halfway through the lifetime, as configured.
    // The CA computes it from its own issue time, a second or so off notBefore.
    let (start, end) = issued.renewal_window.expect("ARI window");
    let halfway = validity.not_before.timestamp() + lived / 2;
    assert!((unix_time(&start) - halfway).abs() <= 2, "window starts at half: {start} vs {halfway}");
    assert!((unix_time(&end) - validity.not_after.timestamp()).abs() <= 2, "window ends at expiry: {end}");
}

/// The DNS names of a certificate's SAN extension, sorted.
fn dns_names(cert: &X509Certificate) -> Vec<String> {
    let san = cert.subject_alternative_name().expect("SAN extension").expect("SAN present");
    let mut names: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| if let GeneralName::DNSName(d) = n { Some(d.to_string()) } else { None })
        .collect();
    names.sort();
    names
}

/// `YYYY-MM-DDTHH:MM:SSZ`, as acme2certifier writes ARI times, in Unix seconds.
fn unix_time(text: &str) -> i64 {
    let num = |range: std::ops::Range<usize>| -> i32 { text[range].parse().expect("digits") };
    assert!(text.len() == 20 && text.ends_with('Z'), "unexpected time {text}");
    let month = time::Month::try_from(num(5..7) as u8).expect("month");
    let date = time::Date::from_calendar_date(num(0..4), month, num(8..10) as u8).expect("date");
    let at = date.with_hms(num(11..13) as u8, num(14..16) as u8, num(17..19) as u8).expect("time");
    at.assume_utc().unix_timestamp()
}

#[tokio::test]
async fn ca_issues_over_http01_on_port_80_through_the_zone_wildcard() {
    let dir = util::tempdir();
    let _knot = Knot::start(dir.path()).await;
    let ca = AcmeCa::start(dir.path(), AcmeCaOptions::default()).await;

    let domain = format!("web.{ZONE}");
    let client = RefClient::new(&ca, &dir.path().join("client"));
    let issued = client.order_http01(&[&domain]).await.unwrap_or_else(|e| {
        ca.dump_log();
        panic!("order failed: {e:?}")
    });
    assert!(issued.txt_records.is_empty());
    let chain: Vec<CertificateDer> =
        CertificateDer::pem_slice_iter(issued.fullchain_pem.as_bytes()).collect::<Result<_, _>>().expect("PEM chain");
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).expect("parse leaf");
    assert_eq!(dns_names(&leaf), [domain]);
}

#[tokio::test]
async fn ca_fails_a_dns01_challenge_without_the_txt_record() {
    let dir = util::tempdir();
    let _knot = Knot::start(dir.path()).await;
    let ca = AcmeCa::start(dir.path(), AcmeCaOptions::default()).await;

    let client = RefClient::new(&ca, &dir.path().join("client"));
    let domain = format!("missing.{ZONE}");
    let err = client.order_dns01_unpublished(&[&domain]).await.expect_err("nothing published, nothing issued");
    assert_eq!(err.kind, "authorization-invalid", "{err:?}");
    assert!(err.detail.contains("dns-01=invalid"), "{err:?}");
    let issued = std::fs::read_dir(ca.issued_dir()).expect("read issued dir").count();
    assert_eq!(issued, 0, "the CA issued nothing");
}

#[tokio::test]
async fn eab_ca_refuses_an_account_without_binding() {
    let dir = util::tempdir();
    let knot = Knot::start(dir.path()).await;
    let options = AcmeCaOptions { eab: true, ari: false, ..Default::default() };
    let ca = AcmeCa::start(dir.path(), options).await;

    let directory = http::get(ca.addr(), "/directory").await.expect("GET /directory").json().expect("JSON");
    assert_eq!(directory["meta"]["externalAccountRequired"], true, "{directory}");
    assert!(directory.get("renewalInfo").is_none(), "ARI off: {directory}");

    let err = RefClient::new(&ca, &dir.path().join("plain")).without_eab().register().await.expect_err("refused");
    assert!(err.kind.ends_with(":externalAccountRequired"), "{err:?}");

    let client = RefClient::new(&ca, &dir.path().join("bound"));
    client.register().await.expect("an account with the CA's EAB credential");
    let issued = client.order_dns01(&knot, &[&format!("eab.{ZONE}")]).await.expect("order with EAB account");
    assert!(issued.renewal_window.is_none(), "no ARI window when ARI is off");
}

#[tokio::test]
async fn ca_stops_and_restarts_on_the_same_port() {
    let dir = util::tempdir();
    let knot = Knot::start(dir.path()).await;
    let mut ca = AcmeCa::start(dir.path(), AcmeCaOptions::default()).await;
    let url = ca.directory_url();

    ca.stop();
    assert!(!ca.is_running());
    assert!(http::get(ca.addr(), "/directory").await.is_err(), "a stopped CA refuses connections");

    ca.restart().await;
    assert_eq!(ca.directory_url(), url);
    let client = RefClient::new(&ca, &dir.path().join("client"));
    client.order_dns01(&knot, &[&format!("again.{ZONE}")]).await.expect("order after restart");
}
