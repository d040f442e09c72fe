//! Server certificates checked against a CA file (issue 12 item 2), with the real binary on
//! loopback: `serval listen --key K --cert CHAIN.pem` registered with a router, `serval cat
//! --ca CA.pem`. A chain from a trusted CA for the name connects; another CA, another name, or
//! an instance without a chain fails the connect with one clear line and a non-zero exit, and
//! so does a certificate on the CA's revocation list (`--crl`); a bad file is refused at start
//! in one line.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa,
    KeyIdMethod, KeyPair, KeyUsagePurpose, PKCS_ED25519, RevokedCertParams, SerialNumber,
    SignatureAlgorithm,
};
use support::{Dir, cat_hello, instance, keygen, one_line_failure, output_within, router, serval};

/// A CA: its certificate and key.
struct Ca(rcgen::Certificate, KeyPair);

impl Ca {
    fn new(name: &str) -> Ca {
        Ca::with_key(name, &PKCS_ED25519)
    }

    /// A CA whose own key is of `alg`.
    fn with_key(name: &str, alg: &'static SignatureAlgorithm) -> Ca {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ca(p.self_signed(&key).unwrap(), key)
    }

    /// Writes to `file` this CA's revocation list of the serial numbers `revoked`, valid
    /// from 2026 to 2100.
    fn revoke(&self, revoked: &[u64], file: &str) {
        let at = rcgen::date_time_ymd(2026, 1, 1);
        let crl = CertificateRevocationListParams {
            this_update: at,
            next_update: rcgen::date_time_ymd(2100, 1, 1),
            crl_number: SerialNumber::from(1),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|&n| RevokedCertParams {
                    serial_number: SerialNumber::from(n),
                    revocation_time: at,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.0, &self.1)
        .unwrap();
        std::fs::write(file, crl.pem().unwrap()).unwrap();
    }

    /// Writes this CA's certificate to `file`.
    fn write(&self, file: &str) {
        std::fs::write(file, self.0.pem()).unwrap();
    }

    /// Writes to `file` a certificate for `names` of the key in the `serval keygen` file `key`.
    fn issue(&self, key: &str, names: &[&str], file: &str) {
        self.issue_serial(key, names, 1, file);
    }

    /// [`issue`](Self::issue) with serial number `serial`.
    fn issue_serial(&self, key: &str, names: &[&str], serial: u64, file: &str) {
        // A serval key file is PKCS#8 under its own PEM label.
        let text = std::fs::read_to_string(key)
            .unwrap()
            .replace("SERVAL PRIVATE KEY", "PRIVATE KEY");
        let leaf_key = KeyPair::from_pem(&text).unwrap();
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let mut params = CertificateParams::new(names).unwrap();
        params.serial_number = Some(SerialNumber::from(serial));
        let cert = params.signed_by(&leaf_key, &self.0, &self.1).unwrap();
        std::fs::write(file, cert.pem()).unwrap();
    }
}

#[test]
fn a_certificate_from_the_trusted_ca_for_the_name_connects_and_nothing_else_does() {
    let dir = Dir::new("ca");
    let (key, ca_file, other_file) = (dir.path("k"), dir.path("ca.pem"), dir.path("other.pem"));
    let (good, wrong_name) = (dir.path("good.pem"), dir.path("wrong-name.pem"));
    keygen(&key);
    let (ca, other) = (Ca::new("test CA"), Ca::new("another CA"));
    ca.write(&ca_file);
    other.write(&other_file);
    ca.issue(&key, &["who.test"], &good);
    ca.issue(&key, &["somebody-else.test"], &wrong_name);

    let (_r, raddr) = router(&[]);
    let (_i, addr) = instance(
        "who.test",
        Some(&raddr),
        &["--echo", "--key", &key, "--cert", &good],
    );
    // Through the router, and straight to the instance.
    for via in [&raddr, &addr] {
        let (code, out, err) = cat_hello("who.test", via, &["--ca", &ca_file]);
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(out, "hello");
    }
    one_line_failure(
        cat_hello("who.test", &raddr, &["--ca", &other_file]),
        "not issued by a trusted CA",
    );
    // By serviceID there is no name to check.
    let id = serval_wire::ServiceId::from_name("who.test")
        .unwrap()
        .to_string();
    one_line_failure(
        cat_hello(&id, &addr, &["--ca", &ca_file]),
        "connect by name",
    );

    let (_w, waddr) = instance(
        "who.test",
        None,
        &["--echo", "--key", &key, "--cert", &wrong_name],
    );
    one_line_failure(
        cat_hello("who.test", &waddr, &["--ca", &ca_file]),
        "not valid for the name who.test",
    );
    // An instance with a key but no chain proves the key, which nothing certifies.
    let (_n, naddr) = instance("who.test", None, &["--echo", "--key", &key]);
    one_line_failure(
        cat_hello("who.test", &naddr, &["--ca", &ca_file]),
        "no certificate chain",
    );
}

#[test]
fn a_revoked_certificate_fails_the_connect_and_a_listed_other_does_not() {
    let dir = Dir::new("crl");
    let (key, ca_file, cert) = (dir.path("k"), dir.path("ca.pem"), dir.path("cert.pem"));
    let (revoking, sparing) = (dir.path("revoking.crl"), dir.path("sparing.crl"));
    keygen(&key);
    // A CA signing with ECDSA P-256, as most private CAs do.
    let ca = Ca::with_key("test CA", &rcgen::PKCS_ECDSA_P256_SHA256);
    ca.write(&ca_file);
    ca.issue_serial(&key, &["who.test"], 42, &cert);
    ca.revoke(&[41, 42], &revoking);
    ca.revoke(&[41, 43], &sparing);
    let (_i, addr) = instance(
        "who.test",
        None,
        &["--echo", "--key", &key, "--cert", &cert],
    );
    for extra in [&[][..], &["--crl", &sparing][..]] {
        let mut args = vec!["--ca", &ca_file];
        args.extend_from_slice(extra);
        let (code, out, err) = cat_hello("who.test", &addr, &args);
        assert_eq!(code, Some(0), "{extra:?}: {err}");
        assert_eq!(out, "hello");
    }
    one_line_failure(
        cat_hello("who.test", &addr, &["--ca", &ca_file, "--crl", &revoking]),
        "holds a revoked certificate",
    );
    // --crl needs --ca; a file without a list is a usage error naming --crl.
    let (code, _, err) = cat_hello("who.test", &addr, &["--crl", &revoking]);
    assert_eq!(code, Some(2), "{err}");
    let (code, _, err) = cat_hello("who.test", &addr, &["--ca", &ca_file, "--crl", &ca_file]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--crl") && err.contains("no revocation list"),
        "{err}"
    );
}

#[test]
fn bad_files_are_refused_in_one_line() {
    let dir = Dir::new("cabad");
    let (key, other_key, junk, cert) = (
        dir.path("k"),
        dir.path("k2"),
        dir.path("junk.pem"),
        dir.path("cert.pem"),
    );
    keygen(&key);
    keygen(&other_key);
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let ca = Ca::new("test CA");
    ca.issue(&other_key, &["who.test"], &cert);
    // A CA file with no certificate, or none at all: a usage error naming --ca.
    for file in [junk.as_str(), "/nonexistent/ca.pem"] {
        let (code, _, err) = cat_hello("who.test", "127.0.0.1:9", &["--ca", file]);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("--ca"), "{err}");
    }
    // A chain for another key than the instance's: the instance does not start.
    let mut cmd = serval();
    cmd.args(["listen", "who.test", "--bind", "127.0.0.1:0", "--echo"])
        .args(["--key", &key, "--cert", &cert]);
    let o = output_within(cmd, b"", Duration::from_secs(30));
    one_line_failure(
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        "is not the instance's key",
    );
    // --cert without --key: a usage error.
    let o = serval()
        .args([
            "listen",
            "who.test",
            "--bind",
            "127.0.0.1:0",
            "--cert",
            &cert,
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}
