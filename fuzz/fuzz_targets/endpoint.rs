//! Arbitrary datagrams into endpoints with live connections: nothing panics, and no reply to a
//! packet outside a live flow is larger than the packet (no amplification).
//!
//! A server endpoint (B) has two live flows: one with a real client endpoint (A, whose keys we
//! do not hold) and one with a hand-made client that holds its flow's keys (see
//! `common::LiveFlow`). The input is split into datagrams at 0xfe bytes, sent alternately to the
//! server and the real client. The first is spliced onto the base header of the key-holding
//! flow and sealed with that flow's keys — the header as the fuzzer wrote it, then the packet
//! number and payload — so that it passes the packet protection and reaches the per-flow paths
//! (control packets, transport frames), not only header validation and the tag check. (Before
//! packet protection the splice alone did that; since, a spliced packet fails authentication.)
#![no_main]

mod common;

use common::{A, B, LiveFlow, endpoint, loc};
use libfuzzer_sys::fuzz_target;
use serval_engine::connection::protect::{DEFAULT_KEY_UPDATE_INTERVAL, Protection};
use serval_engine::endpoint::EndpointConfig;
use serval_wire::{Protocol, SalRepr, ServiceId};

fuzz_target!(|data: &[u8]| {
    let (la, lb) = (loc(A), loc(B));
    let service = ServiceId::from_name("echo.fuzz").expect("valid name");
    let Some(mut flow) = LiveFlow::new(Protection::Encrypted, DEFAULT_KEY_UPDATE_INTERVAL) else {
        panic!("the handshake did not complete");
    };
    let mut a = endpoint(A, 1, EndpointConfig::default());
    let mut t = flow.now;
    let h = a.connect_via(t, service, lb).expect("connect");
    // Connect the real client too.
    for _ in 0..8 {
        let mut moved = false;
        while let Some(x) = a.poll_transmit(t) {
            moved = true;
            flow.server.handle_datagram(t, x.dst, x.src, &x.payload);
        }
        while let Some(x) = flow.server.poll_transmit(t) {
            moved = true;
            if x.dst == la {
                a.handle_datagram(t, x.dst, x.src, &x.payload);
            }
        }
        if !moved {
            break;
        }
    }
    let _ = a.write(h, b"hello");
    while a.poll_transmit(t).is_some() {}
    let header = SalRepr::new(Protocol::STREAM, flow.cflow, flow.sflow)
        .to_bytes(&[])
        .expect("header");

    for (i, chunk) in data.split(|w| *w == 0xfe).enumerate() {
        let mut dgram = chunk.to_vec();
        if i == 0 {
            // The live flow's flowIDs; the rest of the header (version, flags, protocol, header
            // length, extensions) and the packet from the fuzzer; sealed with the flow's keys.
            let mut spliced = header.clone();
            if chunk.len() >= 4 {
                spliced[..4].copy_from_slice(&chunk[..4]);
                spliced.extend_from_slice(&chunk[4..]);
            } else {
                spliced.extend_from_slice(chunk);
            }
            dgram = flow.seal_raw(spliced);
        }
        let server = i % 2 == 0;
        if server {
            flow.server.handle_datagram(t, lb, la, &dgram);
        } else {
            a.handle_datagram(t, la, lb, &dgram);
        }
        loop {
            let reply = if server {
                flow.server.poll_transmit(t)
            } else {
                a.poll_transmit(t)
            };
            let Some(reply) = reply else { break };
            // The sealed packet belongs to a live flow, which may answer with its own data;
            // anything else is at most a NACK, never larger than what prompted it.
            if i > 0 {
                assert!(reply.payload.len() <= dgram.len(), "reply amplifies");
            }
        }
        t += std::time::Duration::from_millis(7);
        a.handle_timeout(t);
        flow.server.handle_timeout(t);
        while a.poll_transmit(t).is_some() {}
        while flow.server.poll_transmit(t).is_some() {}
    }
});
