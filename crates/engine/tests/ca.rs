//! Server certificates checked against the client's CAs (`PeerIdentity::Ca`), through two
//! endpoints: the SYN pays for the chain, the chain travels sealed in the SYN-ACK, a good
//! chain connects, a bad one fails the connect and resets the server's half-open flow.
#![allow(clippy::unwrap_used)] // test harness

mod support;

use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PKCS_ED25519};
use serval_engine::Instant;
use serval_engine::connection::ConnectError;
use serval_engine::endpoint::{
    CERT_SYN_LEN, CertProblem, CertificateChain, EndpointConfig, Event, IdentityError,
    PeerIdentity, ServerName, TrustAnchors,
};
use serval_keys::PrivateKey;
use serval_wire::{SalPacket, SalRepr, ServicePrefix};
use support::{A, B, drain, endpoint_with, events, loc, svc};

/// 2026-12-06 (inside rcgen's default validity).
const UNIX_NOW: Duration = Duration::from_secs(1_796_515_200);

/// A self-signed Ed25519 root: its certificate and key.
fn root() -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    (p.self_signed(&key).unwrap(), key)
}

/// A server for "echo.test" whose key `root` certifies for `names`.
fn server(
    root: &(rcgen::Certificate, KeyPair),
    names: &[&str],
) -> serval_engine::endpoint::Endpoint {
    let key = PrivateKey::generate(&ring::rand::SystemRandom::new()).unwrap();
    let leaf_key = KeyPair::from_pem(&key.to_pem()).unwrap();
    let leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .unwrap()
        .signed_by(&leaf_key, &root.0, &root.1)
        .unwrap();
    let chain = CertificateChain::from_der(&[leaf.der().to_vec()], &key.public_key()).unwrap();
    let mut b = endpoint_with(
        B,
        2,
        EndpointConfig {
            identity: Some(key),
            certificate: Some(chain),
            ..EndpointConfig::default()
        },
    );
    b.listen(ServicePrefix::exact(svc("echo.test")), 0, 1);
    b
}

fn client(trusted: &(rcgen::Certificate, KeyPair)) -> serval_engine::endpoint::Endpoint {
    let anchors = TrustAnchors::from_der(&[trusted.0.der().to_vec()]).unwrap();
    endpoint_with(
        A,
        1,
        EndpointConfig {
            peer_identity: Some(PeerIdentity::Ca(anchors)),
            unix_time_origin: Some(UNIX_NOW),
            ..EndpointConfig::default()
        },
    )
}

/// Runs the handshake from `a` to `b` at time zero; returns the SYN's and SYN-ACK's lengths.
fn handshake(
    a: &mut serval_engine::endpoint::Endpoint,
    b: &mut serval_engine::endpoint::Endpoint,
    name: &str,
) -> (usize, Vec<u8>) {
    let now = Instant::ZERO;
    let name = ServerName::new(name).unwrap();
    a.connect_name_via(now, &name, loc(B)).unwrap();
    let syn = drain(a, now);
    assert_eq!(syn.len(), 1);
    b.handle_datagram(now, loc(B), loc(A), &syn[0].payload);
    let synack = drain(b, now);
    assert_eq!(synack.len(), 1);
    a.handle_datagram(now, loc(A), loc(B), &synack[0].payload);
    (syn[0].payload.len(), synack[0].payload.clone())
}

#[test]
fn a_certified_server_is_accepted_and_its_chain_travels_sealed() {
    let ca = root();
    let mut b = server(&ca, &["echo.test"]);
    let mut a = client(&ca);
    let (syn_len, synack) = handshake(&mut a, &mut b, "echo.test");
    assert_eq!(syn_len, CERT_SYN_LEN, "the SYN pays for the chain");
    assert!(
        synack.len() <= syn_len,
        "the SYN-ACK is no larger than the SYN"
    );
    let repr = SalRepr::parse(&SalPacket::new_checked(&synack[..]).unwrap()).unwrap();
    assert!(repr.identity.is_some());
    assert!(
        !synack
            .windows(b"echo.test".len())
            .any(|w| w == b"echo.test"),
        "the certificate (which names the service) is encrypted"
    );
    assert!(
        events(&mut a)
            .iter()
            .any(|e| matches!(e, Event::Connected(_))),
    );
}

/// Connects `a` to `b` as `name`, expecting the connect to fail with `problem`, and the
/// server's half-open flow to be reset by the client's RST.
fn refused(
    mut a: serval_engine::endpoint::Endpoint,
    mut b: serval_engine::endpoint::Endpoint,
    name: &str,
    problem: CertProblem,
) {
    handshake(&mut a, &mut b, name);
    let failed: Vec<_> = events(&mut a)
        .into_iter()
        .filter_map(|e| match e {
            Event::ConnectFailed(_, e) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(
        failed,
        vec![ConnectError::PeerIdentity {
            service: svc(name),
            error: IdentityError::Certificate(problem),
        }]
    );
    assert_eq!(b.connections().len(), 1, "half open at the server");
    let now = Instant::ZERO;
    for t in drain(&mut a, now) {
        b.handle_datagram(now, loc(B), loc(A), &t.payload);
    }
    let _ = drain(&mut b, now);
    assert!(
        b.connections().is_empty(),
        "the RST freed the server's flow"
    );
}

#[test]
fn an_untrusted_issuer_fails_the_connect_and_resets_the_server() {
    let ca = root();
    refused(
        client(&root()),
        server(&ca, &["echo.test"]),
        "echo.test",
        CertProblem::UntrustedIssuer,
    );
}

#[test]
fn a_certificate_for_another_name_fails_the_connect() {
    let ca = root();
    refused(
        client(&ca),
        server(&ca, &["other.test"]),
        "echo.test",
        CertProblem::WrongName("echo.test".into()),
    );
}

#[test]
fn a_server_without_a_chain_fails_the_connect() {
    let ca = root();
    // A server that proves its key, but has no chain to certify it.
    let mut plain = endpoint_with(
        B,
        2,
        EndpointConfig {
            identity: Some(PrivateKey::generate(&ring::rand::SystemRandom::new()).unwrap()),
            ..EndpointConfig::default()
        },
    );
    plain.listen(ServicePrefix::exact(svc("echo.test")), 0, 1);
    refused(client(&ca), plain, "echo.test", CertProblem::Missing);
}

#[test]
fn a_connect_by_service_id_has_no_name_to_check() {
    let ca = root();
    let mut a = client(&ca);
    let mut b = server(&ca, &["echo.test"]);
    let now = Instant::ZERO;
    a.connect_via(now, svc("echo.test"), loc(B)).unwrap();
    for t in drain(&mut a, now) {
        b.handle_datagram(now, loc(B), loc(A), &t.payload);
    }
    for t in drain(&mut b, now) {
        a.handle_datagram(now, loc(A), loc(B), &t.payload);
    }
    assert!(events(&mut a).iter().any(|e| matches!(
        e,
        Event::ConnectFailed(
            _,
            ConnectError::PeerIdentity {
                error: IdentityError::Certificate(CertProblem::NoName),
                ..
            }
        )
    )));
}
