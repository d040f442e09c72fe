//! Reproducers of what the fuzz targets of `fuzz/` found (fuzz/README.md, "Finds"), one test
//! each, minimised by hand from the crashing inputs; all three were fixed in 72825bc.
#![allow(clippy::unwrap_used)] // test harness

mod support;

use serval_engine::Instant;
use serval_engine::connection::protect::{
    DEFAULT_KEY_UPDATE_INTERVAL, FlowSecrets, KeyExchange, OpenError, Protection, Protector,
    ReplayWindow, Space, Transcript,
};
use serval_engine::endpoint::{EndpointConfig, PeerIdentity};
use serval_engine::frame;
use serval_wire::ext::{ControlFlags, ControlRepr};
use serval_wire::{FlowId, Nonce, Protocol, SalPacket, SalRepr, ServiceId, ServicePrefix};
use support::{A, B, drain, endpoint, endpoint_with, loc, svc};

fn parse(bytes: &[u8]) -> SalRepr {
    SalRepr::parse(&SalPacket::new_checked(bytes).unwrap()).unwrap()
}

/// Found by the `handshake` target. A retransmission of a SYN is recognised by its (client
/// flowID, nonce) alone (`Endpoint::handle_syn`, `half_open`), and answered with the stored
/// SYN-ACK whatever its own length: a copy of the SYN stripped of its PAD (and of its KEYSHARE)
/// gets the full SYN-ACK, IDENTITY included. Anyone who saw the SYN can so make the server send
/// the client 210-byte SYN-ACKs for 95-byte packets (2.2 times), as often as it likes; without
/// IDENTITY, 110 bytes for 95. docs/wire.md §5 (answers to unauthenticated packets no larger
/// than them) and §4.8 (a client pads its SYN so that the SYN-ACK is never larger) say it
/// must not.
#[test]
fn a_retransmitted_syn_stripped_of_its_padding_is_not_answered_with_more_bytes() {
    let now = Instant::ZERO;
    let key = serval_keys::PrivateKey::generate(&ring::rand::SystemRandom::new()).unwrap();
    let mut b = endpoint_with(
        B,
        2,
        EndpointConfig {
            identity: Some(key.clone()),
            ..EndpointConfig::default()
        },
    );
    b.listen(ServicePrefix::exact(svc("echo.test")), 0, 1);
    let mut a = endpoint_with(
        A,
        1,
        EndpointConfig {
            peer_identity: Some(PeerIdentity::Key(key.public_key())),
            ..EndpointConfig::default()
        },
    );
    a.connect_via(now, svc("echo.test"), loc(B)).unwrap();
    let syn = drain(&mut a, now).remove(0).payload;
    b.handle_datagram(now, loc(B), loc(A), &syn);
    let synack = drain(&mut b, now);
    assert_eq!(synack.len(), 1);
    assert!(
        synack[0].payload.len() <= syn.len(),
        "the SYN pays for its SYN-ACK"
    );
    assert!(parse(&synack[0].payload).identity.is_some());

    // The same SYN, stripped.
    let mut stripped = parse(&syn);
    stripped.pad = 0;
    stripped.keyshare = None;
    let stripped = stripped.to_bytes(&[]).unwrap();
    assert!(stripped.len() < 100, "{}", stripped.len());
    b.handle_datagram(now, loc(B), loc(A), &stripped);
    for t in drain(&mut b, now) {
        assert!(
            t.payload.len() <= stripped.len(),
            "a {}-byte answer to a {}-byte SYN",
            t.payload.len(),
            stripped.len()
        );
    }
}

/// Both ends of a flow from `pair`: a client and a server `Protector` updating their keys every
/// `interval` packets.
fn pair(interval: u64) -> (Protector, Protector) {
    let c = KeyExchange::new([1; 32]);
    let s = KeyExchange::new([2; 32]);
    let (cs, ss) = (c.share(0), s.share(0));
    let service = ServiceId([3; 32]);
    let (cn, sn) = (Nonce([4; 16]), Nonce([5; 16]));
    let t = Transcript {
        service: &service,
        client_flow: FlowId(10),
        client_nonce: &cn,
        client_share: &cs,
        server_flow: FlowId(20),
        server_nonce: &sn,
        server_share: &ss,
    };
    let dh = c.agree(&ss).unwrap();
    (
        Protector::new(
            FlowSecrets::derive(true, Protection::Encrypted, &dh, &t),
            interval,
        ),
        Protector::new(
            FlowSecrets::derive(false, Protection::Encrypted, &dh, &t),
            interval,
        ),
    )
}

/// A sealed data packet `pn` from `p`.
fn packet(p: &mut Protector, pn: u64) -> Vec<u8> {
    sealed(p, pn, b"data")
}

/// A sealed data packet `pn` from `p`, carrying `payload`.
fn sealed(p: &mut Protector, pn: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = SalRepr::new(Protocol::STREAM, FlowId(10), FlowId(20))
        .to_bytes(&[])
        .unwrap();
    out.extend_from_slice(&pn.to_be_bytes());
    out.extend_from_slice(payload);
    p.seal(&mut out, 0, 20);
    out
}

fn open(p: &mut Protector, mut pkt: Vec<u8>) -> Result<(u64, usize), OpenError> {
    p.open(&mut pkt, 20, Space::Data)
}

/// Found by the `protect` target. When both ends update their keys on their own at about the
/// same time, the client takes the server's new phase as the sign that the server followed its
/// update ("the peer's packets arrive in our sending phase") and may update again; if every
/// packet of its phase 1 was lost, the server, still in phase 0, cannot open the client's phase
/// 2 (it has phase 0's bit, so the server tries phase 0's keys), nor any later packet: the
/// client-to-server direction is dead for good, and the transport times out. With the default
/// interval (2^23) it takes 2^23 packets lost in a row; with a small
/// `EndpointConfig::key_update_interval`, as few as the interval.
#[test]
fn a_lost_key_phase_during_concurrent_updates_does_not_kill_the_flow() {
    let (mut c, mut s) = pair(1);
    let c0 = packet(&mut c, 0); // phase 0
    let s0 = packet(&mut s, 0); // phase 0
    let c1 = packet(&mut c, 1); // the client updates: phase 1
    let s1 = packet(&mut s, 1); // the server updates on its own: phase 1
    assert!(open(&mut s, c0).is_ok());
    assert!(open(&mut c, s0).is_ok());
    assert!(open(&mut c, s1).is_ok()); // the client follows the server to phase 1
    drop(c1); // lost: the server never sees the client's phase 1
    // The client takes the server's phase 1 for a sign it followed, and updates again.
    for pn in 2..10 {
        let p = packet(&mut c, pn);
        assert_eq!(
            open(&mut s, p),
            Ok((pn, 4)),
            "client packet {pn}, sent in order after one lost packet, does not open"
        );
    }
}

/// Found by the `sealed_frames` and `endpoint` targets (the same crash). `ReplayWindow::insert`
/// computes `pn - self.top + 1`, which overflows for packet number `u64::MAX` in an empty window
/// (`top` 0): with overflow checks (debug builds, `cargo test`) the receiver panics, and any
/// client that completes a handshake can send such a packet, so it takes down a server built
/// that way. Without overflow checks (release) nothing panics, but the window's top saturates at
/// `u64::MAX`, so packet `u64::MAX` is never a replay of itself: the same packet opens any
/// number of times (and every packet below it is then refused as too old).
#[test]
fn packet_number_u64_max_neither_panics_nor_opens_twice() {
    let mut w = ReplayWindow::default();
    w.insert(u64::MAX);
    assert!(w.is_replay(u64::MAX), "packet u64::MAX can be opened again");

    let (mut c, mut s) = pair(DEFAULT_KEY_UPDATE_INTERVAL);
    let p = packet(&mut c, u64::MAX);
    let first = open(&mut s, p.clone());
    assert_eq!(open(&mut s, p), Err(OpenError::Replayed), "after {first:?}");
}

/// The same crash through a real server endpoint: a client (here hand-made, holding its keys,
/// as in edges.rs) completes the handshake, then sends one stream packet numbered `u64::MAX`.
#[test]
fn a_client_sending_packet_number_u64_max_does_not_crash_the_server() {
    let now = Instant::ZERO;
    let service = svc("echo.test");
    let mut b = endpoint(B, 2);
    let l = b.listen(ServicePrefix::exact(service), 0, 1);
    let mut a = endpoint(A, 1);
    a.connect_via(now, service, loc(B)).unwrap();
    let mut syn = parse(&drain(&mut a, now)[0].payload);
    let kx = KeyExchange::new([9; 32]);
    syn.keyshare = Some(kx.share(0));
    let (cflow, cnonce, cshare) = (syn.src_flow, syn.nonce.unwrap(), syn.keyshare.unwrap());
    b.handle_datagram(now, loc(B), loc(A), &syn.to_bytes(&[]).unwrap());
    let synack = parse(&drain(&mut b, now)[0].payload);
    let (sflow, snonce, sshare) = (
        synack.src_flow,
        synack.nonce.unwrap(),
        synack.keyshare.unwrap(),
    );
    let transcript = Transcript {
        service: &service,
        client_flow: cflow,
        client_nonce: &cnonce,
        client_share: &cshare,
        server_flow: sflow,
        server_nonce: &snonce,
        server_share: &sshare,
    };
    let dh = kx.agree(&sshare).unwrap();
    let mut keys = Protector::new(
        FlowSecrets::derive(true, Protection::Encrypted, &dh, &transcript),
        DEFAULT_KEY_UPDATE_INTERVAL,
    );
    let mut ack = SalRepr::new(Protocol::NONE, cflow, sflow);
    ack.control = Some(ControlRepr {
        flags: ControlFlags::ACK,
        verno: syn.control.unwrap().verno.wrapping_add(1),
        ackno: synack.control.unwrap().verno.wrapping_add(1),
    });
    let mut bytes = ack.to_bytes(&[]).unwrap();
    keys.seal_control(&mut bytes, 0, ack.buffer_len());
    b.handle_datagram(now, loc(B), loc(A), &bytes);
    assert!(b.accept(l).is_some(), "the ACK completed the handshake");

    let mut ping = Vec::new();
    frame::write_ping(&mut ping);
    let mut data = SalRepr::new(Protocol::STREAM, cflow, sflow)
        .to_bytes(&[])
        .unwrap();
    data.extend_from_slice(&u64::MAX.to_be_bytes());
    data.extend_from_slice(&ping);
    keys.seal(&mut data, 0, 20);
    b.handle_datagram(now, loc(B), loc(A), &data); // panics with overflow checks
    drain(&mut b, now);
    // The replay is refused.
    let replays = b.stats().replays;
    b.handle_datagram(now, loc(B), loc(A), &data);
    assert_eq!(
        b.stats().replays,
        replays + 1,
        "packet u64::MAX opened twice"
    );
}
