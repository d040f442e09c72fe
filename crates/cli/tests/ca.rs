//! Server certificates checked against a CA file (issue 12 item 2), with the real binary on
//! loopback: `serval listen --key K --cert CHAIN.pem` registered with a router, `serval cat
//! --ca CA.pem`. A chain from a trusted CA for the name connects; another CA, another name, or
//! an instance without a chain fails the connect with one clear line and a non-zero exit; a
//! bad file is refused at start in one line.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, PKCS_ED25519};
use support::{Dir, cat_hello, instance, keygen, one_line_failure, output_within, router, serval};

/// A CA: its certificate and key.
struct Ca(rcgen::Certificate, KeyPair);

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        Ca(p.self_signed(&key).unwrap(), key)
    }

    /// Writes this CA's certificate to `file`.
    fn write(&self, file: &str) {
        std::fs::write(file, self.0.pem()).unwrap();
    }

    /// Writes to `file` a certificate for `names` of the key in the `serval keygen` file `key`.
    fn issue(&self, key: &str, names: &[&str], file: &str) {
        // A serval key file is PKCS#8 under its own PEM label.
        let text = std::fs::read_to_string(key)
            .unwrap()
            .replace("SERVAL PRIVATE KEY", "PRIVATE KEY");
        let leaf_key = KeyPair::from_pem(&text).unwrap();
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&leaf_key, &self.0, &self.1)
            .unwrap();
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
