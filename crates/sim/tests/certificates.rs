//! Certificate-checked handshakes (`PeerIdentity::Ca`) over the seeded lossy network: the
//! 1200-byte SYN, the SYN-ACK carrying the sealed chain, and their retransmissions, lost,
//! duplicated and reordered. With the right CA every seed connects, and the one server flow
//! is the client's; with another CA every seed fails with "not issued by a trusted CA" and
//! the server is left with no flow (the client's RST, or the server giving up on its
//! SYN-ACK). `SERVAL_SIM_SEEDS=N` sweeps N seeds instead of the default.
#![allow(clippy::unwrap_used)] // test harness: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PKCS_ED25519};
use serval_engine::Instant;
use serval_engine::connection::ConnectError;
use serval_engine::endpoint::{
    CertProblem, CertificateChain, Endpoint, EndpointConfig, Event, IdentityError, PeerIdentity,
    ServerName, TrustAnchors,
};
use serval_keys::PrivateKey;
use serval_sim::{Datagram, LinkConfig, Network, Node};
use serval_table::ServiceTable;
use serval_wire::{Locator, ServicePrefix};

const CLIENT: &str = "10.0.0.1:54324";
const SERVER: &str = "10.0.0.2:54324";
const NAME: &str = "echo.example.com";

/// An endpoint and the events it reported.
struct Host {
    ep: Endpoint,
    events: Vec<Event>,
}

impl Node for Host {
    fn handle_datagram(&mut self, now: Instant, d: Datagram) {
        self.ep.handle_datagram(now, d.dst, d.src, &d.payload);
        self.events
            .extend(std::iter::from_fn(|| self.ep.poll_event()));
    }
    fn poll_transmit(&mut self, now: Instant) -> Option<Datagram> {
        let t = self.ep.poll_transmit(now)?;
        Some(Datagram {
            src: t.src,
            dst: t.dst,
            payload: t.payload,
        })
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.ep.poll_timeout()
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.ep.handle_timeout(now);
        self.events
            .extend(std::iter::from_fn(|| self.ep.poll_event()));
    }
}

/// A CA, and a server key with a chain from it for [`NAME`].
struct Pki {
    anchors: TrustAnchors,
    other: TrustAnchors,
    key: PrivateKey,
    chain: CertificateChain,
}

fn pki() -> Pki {
    let root = |cn: &str| {
        let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        (p.self_signed(&key).unwrap(), key)
    };
    let (ca, ca_key) = root("sim CA");
    let (other, _) = root("another CA");
    let key = PrivateKey::generate(&ring::rand::SystemRandom::new()).unwrap();
    let leaf = CertificateParams::new(vec![NAME.to_owned()])
        .unwrap()
        .signed_by(&KeyPair::from_pem(&key.to_pem()).unwrap(), &ca, &ca_key)
        .unwrap();
    Pki {
        anchors: TrustAnchors::from_der(&[ca.der().to_vec()]).unwrap(),
        other: TrustAnchors::from_der(&[other.der().to_vec()]).unwrap(),
        chain: CertificateChain::from_der(&[leaf.der().to_vec()], &key.public_key()).unwrap(),
        key,
    }
}

fn seed32(seed: u64, who: u8) -> [u8; 32] {
    let mut s = [who; 32];
    s[..8].copy_from_slice(&seed.to_be_bytes());
    s
}

fn seeds(default: u64) -> std::ops::Range<u64> {
    let n = std::env::var("SERVAL_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    0..n
}

fn lossy() -> LinkConfig {
    LinkConfig {
        delay: Duration::from_millis(20),
        jitter: Duration::from_millis(5),
        loss: 0.2,
        duplicate: 0.05,
        reorder: 0.1,
        reorder_delay: Duration::from_millis(15),
        ..LinkConfig::default()
    }
}

/// One handshake under `seed`, the client trusting `anchors`: the client's outcome (`None`:
/// connected) and whether the server still holds a flow at the end.
fn run(seed: u64, pki: &Pki, anchors: &TrustAnchors) -> (Option<ConnectError>, usize) {
    let server: Locator = SERVER.parse().unwrap();
    let mut config = EndpointConfig::default();
    // Under 20% loss each way, let the handshake retry more than the default.
    config.control.retries = 10;
    let mut server_ep = Endpoint::new(
        EndpointConfig {
            identity: Some(pki.key.clone()),
            certificate: Some(pki.chain.clone()),
            ..config.clone()
        },
        seed32(seed, 2),
        Arc::new(ServiceTable::new()),
        vec![server],
    );
    let listener = server_ep.listen(
        ServicePrefix::exact(ServerName::new(NAME).unwrap().service()),
        0,
        1,
    );
    let client_ep = Endpoint::new(
        EndpointConfig {
            peer_identity: Some(PeerIdentity::Ca(anchors.clone())),
            unix_time_origin: Some(Duration::from_secs(1_796_515_200)),
            ..config
        },
        seed32(seed, 1),
        Arc::new(ServiceTable::new()),
        vec![CLIENT.parse().unwrap()],
    );
    let mut net = Network::new(seed, lossy());
    let c = net.add_node(
        Host {
            ep: client_ep,
            events: Vec::new(),
        },
        &[CLIENT.parse().unwrap()],
    );
    let s = net.add_node(
        Host {
            ep: server_ep,
            events: Vec::new(),
        },
        &[server],
    );
    let name = ServerName::new(NAME).unwrap();
    let h = net
        .node_mut(c)
        .ep
        .connect_name_via(Instant::ZERO, &name, server)
        .unwrap();
    let outcome = |net: &Network<Host>| {
        net.node(c).events.iter().find_map(|e| match e {
            Event::Connected(x) if *x == h => Some(None),
            Event::ConnectFailed(x, e) if *x == h => Some(Some(e.clone())),
            _ => None,
        })
    };
    net.run_until(1_000_000, |n| outcome(n).is_some())
        .unwrap_or_else(|e| panic!("seed {seed}: no outcome: {e:?}"));
    let result = outcome(&net).unwrap();
    if result.is_none() {
        // Connected: the server completes its side once the client's ACK (or first data)
        // arrives; a lost ACK is recovered by the server's SYN-ACK retransmission.
        net.node_mut(c).ep.write(h, b"x").unwrap();
        net.run_until(1_000_000, |n| {
            !n.node(s).ep.connections().is_empty()
                && n.node(s)
                    .events
                    .iter()
                    .any(|e| matches!(e, Event::Incoming(l) if *l == listener))
        })
        .unwrap_or_else(|e| panic!("seed {seed}: the server never accepted: {e:?}"));
    } else {
        // Refused: run until the server holds no flow (the RST, or its SYN-ACK given up).
        net.run_until(10_000_000, |n| n.node(s).ep.connections().is_empty())
            .unwrap_or_else(|e| panic!("seed {seed}: the server kept its flow: {e:?}"));
    }
    (result, net.node(s).ep.connections().len())
}

#[test]
fn a_trusted_chain_connects_under_loss_duplication_and_reordering() {
    let pki = pki();
    for seed in seeds(60) {
        let (result, server_flows) = run(seed, &pki, &pki.anchors);
        assert_eq!(result, None, "seed {seed}");
        assert_eq!(server_flows, 1, "seed {seed}: one server flow");
    }
}

#[test]
fn an_untrusted_chain_fails_every_seed_and_frees_the_server() {
    let pki = pki();
    for seed in seeds(30) {
        let (result, server_flows) = run(seed, &pki, &pki.other);
        assert!(
            matches!(
                &result,
                Some(ConnectError::PeerIdentity {
                    error: IdentityError::Certificate(CertProblem::UntrustedIssuer),
                    ..
                })
            ),
            "seed {seed}: {result:?}"
        );
        assert_eq!(server_flows, 0, "seed {seed}");
    }
}
