//! The handshake's key exchange and the flood defences, end to end between real endpoints:
//! what a passive observer of the packets sees, plaintext only by agreement, key updates in a
//! long flow, and SYN cookies (no state for a SYN until its sender proves its address).
#![allow(clippy::unwrap_used)] // test harness

mod support;

use serval_engine::Instant;
use serval_engine::endpoint::{
    ConnectionHandle, Endpoint, EndpointConfig, Event, Protection, SynCookies, Transmit,
};
use serval_wire::ext::ControlFlags;
use serval_wire::{FlowId, KeyShareRepr, Locator, Nonce, SalPacket, SalRepr, ServicePrefix};
use support::{A, B, drain, endpoint_with, events, loc, svc};

fn parse(bytes: &[u8]) -> SalRepr {
    SalRepr::parse(&SalPacket::new_checked(bytes).unwrap()).unwrap()
}

/// Delivers everything both ends send, recording every packet, until neither has anything.
fn exchange(a: &mut Endpoint, b: &mut Endpoint, now: Instant, log: &mut Vec<Transmit>) {
    for _ in 0..10_000 {
        let from_a = drain(a, now);
        let from_b = drain(b, now);
        if from_a.is_empty() && from_b.is_empty() {
            return;
        }
        for t in from_a {
            b.handle_datagram(now, t.dst, t.src, &t.payload);
            log.push(t);
        }
        for t in from_b {
            a.handle_datagram(now, t.dst, t.src, &t.payload);
            log.push(t);
        }
    }
    panic!("the exchange did not settle");
}

/// A client at A and a server at B serving `echo.test`, connected, with the server's handle.
fn connected(
    ca: EndpointConfig,
    cb: EndpointConfig,
    log: &mut Vec<Transmit>,
) -> (Endpoint, Endpoint, ConnectionHandle, ConnectionHandle) {
    let now = Instant::ZERO;
    let mut a = endpoint_with(A, 1, ca);
    let mut b = endpoint_with(B, 2, cb);
    let l = b.listen(ServicePrefix::exact(svc("echo.test")), 0, 1);
    let h = a.connect_via(now, svc("echo.test"), loc(B)).unwrap();
    exchange(&mut a, &mut b, now, log);
    assert!(events(&mut a).contains(&Event::Connected(h)));
    let s = b.accept(l).expect("accepted");
    (a, b, h, s)
}

/// Writes `data` from `from` and reads it all at `to`, recording the packets.
fn transfer(
    (a, ha): (&mut Endpoint, ConnectionHandle),
    (b, hb): (&mut Endpoint, ConnectionHandle),
    data: &[u8],
    log: &mut Vec<Transmit>,
) -> Vec<u8> {
    let mut got = Vec::new();
    let mut written = 0;
    let mut now = Instant::ZERO;
    let mut buf = vec![0u8; 1 << 16];
    for _ in 0..100_000 {
        if written < data.len() {
            written += a.write(ha, &data[written..]).unwrap_or(0);
        }
        exchange(a, b, now, log);
        while let Ok(Some(n)) = b.read(hb, &mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        if got.len() >= data.len() {
            return got;
        }
        now += std::time::Duration::from_millis(1);
        a.handle_timeout(now);
        b.handle_timeout(now);
    }
    panic!("transfer did not finish: {} of {}", got.len(), data.len());
}

fn config(protection: Protection) -> EndpointConfig {
    EndpointConfig {
        protection,
        ..EndpointConfig::default()
    }
}

const MARKER: &[u8] = b"--the secret marker of this test--";

fn marked(len: usize) -> Vec<u8> {
    MARKER.iter().copied().cycle().take(len).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn an_observer_of_every_packet_reads_nothing_and_every_packet_after_the_syn_is_tagged() {
    let mut log = Vec::new();
    let (mut a, mut b, h, s) = connected(
        EndpointConfig::default(),
        EndpointConfig::default(),
        &mut log,
    );
    let data = marked(200_000);
    let got = transfer((&mut a, h), (&mut b, s), &data, &mut log);
    assert_eq!(got, data);
    assert_eq!(a.protection(h), Some(Protection::Encrypted));
    assert!(log.len() > 100);
    for t in &log {
        assert!(!contains(&t.payload, MARKER), "the payload showed in clear");
        let r = parse(&t.payload);
        let syn = r.control.is_some_and(|c| c.flags == ControlFlags::SYN);
        if !syn {
            // Header, packet number, and at least the 16-byte tag.
            let header = SalPacket::new_checked(&t.payload[..]).unwrap().header_len();
            assert!(t.payload.len() >= usize::from(header) + 8 + 16, "{r}");
        }
        assert!(r.auth.is_none(), "flows no longer use AUTH");
    }
    // The SYN and the SYN-ACK carry the two key shares, and nothing else of the keys.
    let shares: Vec<KeyShareRepr> = log
        .iter()
        .filter_map(|t| parse(&t.payload).keyshare)
        .collect();
    assert_eq!(shares.len(), 2);
    assert_ne!(shares[0].key, shares[1].key);
    assert!(
        shares
            .iter()
            .all(|k| k.group == KeyShareRepr::X25519 && !k.plaintext())
    );
}

#[test]
fn plaintext_only_when_both_ends_ask_and_still_authenticated() {
    for (client, server, expect) in [
        (
            Protection::Plaintext,
            Protection::Plaintext,
            Protection::Plaintext,
        ),
        (
            Protection::Plaintext,
            Protection::Encrypted,
            Protection::Encrypted,
        ),
        (
            Protection::Encrypted,
            Protection::Plaintext,
            Protection::Encrypted,
        ),
    ] {
        let mut log = Vec::new();
        let (mut a, mut b, h, s) = connected(config(client), config(server), &mut log);
        assert_eq!(a.protection(h), Some(expect), "{client:?} {server:?}");
        assert_eq!(b.protection(s), Some(expect));
        let data = marked(20_000);
        assert_eq!(transfer((&mut a, h), (&mut b, s), &data, &mut log), data);
        let visible = log.iter().any(|t| contains(&t.payload, MARKER));
        assert_eq!(visible, expect == Protection::Plaintext);
    }
    // In plaintext, changing one payload byte of a data packet in flight gets it dropped.
    let mut log = Vec::new();
    let (mut a, mut b, h, s) = connected(
        config(Protection::Plaintext),
        config(Protection::Plaintext),
        &mut log,
    );
    a.write(h, MARKER).unwrap();
    let mut out = drain(&mut a, Instant::ZERO);
    let data = out
        .iter_mut()
        .find(|t| contains(&t.payload, MARKER))
        .unwrap();
    let at = data
        .payload
        .windows(MARKER.len())
        .position(|w| w == MARKER)
        .unwrap();
    data.payload[at] ^= 0x20;
    let before = b.stats().auth_failures;
    b.handle_datagram(Instant::ZERO, data.dst, data.src, &data.payload);
    assert_eq!(b.stats().auth_failures, before + 1);
    let mut buf = [0u8; 64];
    assert_eq!(
        b.read(s, &mut buf).unwrap(),
        None,
        "a tampered packet was delivered"
    );
}

#[test]
fn a_server_never_grants_plaintext_unasked() {
    // A SYN-ACK that grants plaintext when the client asked for encryption is refused: the
    // client checks the grant, and the transcript binds both shares' flags besides, so an
    // attacker flipping the bit in the SYN gets nowhere.
    let now = Instant::ZERO;
    let mut a = endpoint_with(A, 1, EndpointConfig::default());
    let mut b = endpoint_with(B, 2, config(Protection::Plaintext));
    b.listen(ServicePrefix::exact(svc("echo.test")), 0, 1);
    let h = a.connect_via(now, svc("echo.test"), loc(B)).unwrap();
    // The attacker flips the SYN's plaintext bit on the way to the server.
    let mut syn = parse(&drain(&mut a, now)[0].payload);
    syn.keyshare.as_mut().unwrap().flags |= KeyShareRepr::PLAINTEXT;
    b.handle_datagram(now, loc(B), loc(A), &syn.to_bytes(&[]).unwrap());
    let synack = drain(&mut b, now);
    assert!(parse(&synack[0].payload).keyshare.unwrap().plaintext());
    let failures = a.stats().auth_failures;
    a.handle_datagram(now, loc(A), loc(B), &synack[0].payload);
    assert_eq!(a.stats().auth_failures, failures + 1);
    assert!(!events(&mut a).contains(&Event::Connected(h)));
}

#[test]
fn long_flows_update_their_keys_and_lose_nothing() {
    let small = EndpointConfig {
        key_update_interval: 16,
        ..EndpointConfig::default()
    };
    let mut log = Vec::new();
    let (mut a, mut b, h, s) = connected(small.clone(), small, &mut log);
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let got = transfer((&mut a, h), (&mut b, s), &data, &mut log);
    assert_eq!(got, data);
    // Both phases were used many times over.
    let phases = log
        .iter()
        .filter(|t| SalPacket::new_checked(&t.payload[..]).unwrap().key_phase())
        .count();
    assert!(
        phases > 100 && phases < log.len() - 100,
        "{phases} of {}",
        log.len()
    );
    assert_eq!(a.stats().auth_failures + b.stats().auth_failures, 0);
}

/// A SYN flood from forged sources: with cookies the server answers each with one small
/// packet and keeps nothing; a real client still connects, one round trip later.
#[test]
fn syn_cookies_keep_no_state_for_a_flood_and_let_real_clients_in() {
    let now = Instant::ZERO;
    let cookies = EndpointConfig {
        syn_cookies: SynCookies::Above(4),
        ..EndpointConfig::default()
    };
    let mut b = endpoint_with(B, 2, cookies);
    let l = b.listen(ServicePrefix::exact(svc("echo.test")), 0, 1);
    // A real SYN to copy the flood from.
    let mut a = endpoint_with(A, 1, EndpointConfig::default());
    a.connect_via(now, svc("echo.test"), loc(B)).unwrap();
    let template = parse(&drain(&mut a, now)[0].payload);
    let mut answered = 0usize;
    for i in 0..10_000u32 {
        let mut syn = template.clone();
        syn.src_flow = FlowId(u64::from(i) + 1000);
        syn.nonce = Some(Nonce([i as u8; 16]));
        let forged: Locator = format!("198.51.100.{}:{}", i % 250 + 1, 1024 + i % 60_000)
            .parse()
            .unwrap();
        syn.source = vec![forged];
        let bytes = syn.to_bytes(&[]).unwrap();
        b.handle_datagram(now, loc(B), forged, &bytes);
        for t in drain(&mut b, now) {
            assert!(
                t.payload.len() <= bytes.len(),
                "an answer larger than the SYN"
            );
            assert_eq!(t.dst, forged);
            answered += 1;
        }
    }
    let st = b.stats();
    // The first four made half-open flows; every later one got a cookie and left nothing.
    assert_eq!(answered, 10_000);
    assert_eq!(st.cookies_sent, 10_000 - 4);
    assert_eq!(st.accepted, 0);
    // A SYN that echoes a cookie issued to someone else is refused.
    let mut stolen = template.clone();
    stolen.cookie = Some([9; 20]);
    b.handle_datagram(now, loc(B), loc(A), &stolen.to_bytes(&[]).unwrap());
    assert_eq!(b.stats().cookies_refused, 1);
    drain(&mut b, now);

    // A real client gets through: SYN, cookie, SYN with the cookie, SYN-ACK.
    let mut c = endpoint_with("10.0.0.9:54324", 3, EndpointConfig::default());
    let h = c.connect_via(now, svc("echo.test"), loc(B)).unwrap();
    let mut log = Vec::new();
    exchange(&mut c, &mut b, now, &mut log);
    assert!(events(&mut c).contains(&Event::Connected(h)));
    assert!(b.accept(l).is_some());
    assert_eq!(c.stats().cookie_retries, 1);
    assert_eq!(b.stats().cookies_accepted, 1);
    let syns = log
        .iter()
        .filter(|t| {
            parse(&t.payload)
                .control
                .is_some_and(|c| c.flags == ControlFlags::SYN)
        })
        .count();
    assert_eq!(syns, 2);
}
