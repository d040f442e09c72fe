//! Arbitrary datagrams into endpoints with a live connection: nothing panics, and no reply is
//! larger than what prompted it plus one ACK's worth.
//!
//! The input is split into datagrams at 0xff 0xfe markers; each goes to the server or the client
//! (alternately), both as-is and, for the first, spliced onto a real packet of the live flow so
//! that the fuzzer reaches the per-flow code paths (control, transport frames) and not only the
//! header checks.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use serval_engine::Instant;
use serval_engine::endpoint::{Endpoint, EndpointConfig};
use serval_table::ServiceTable;
use serval_wire::{Locator, ServiceId, ServicePrefix};

fn loc(s: &str) -> Locator {
    s.parse().expect("valid locator")
}

fn pump(a: &mut Endpoint, b: &mut Endpoint, now: Instant) {
    for _ in 0..64 {
        let mut moved = false;
        while let Some(t) = a.poll_transmit(now) {
            moved = true;
            b.handle_datagram(now, t.dst, t.src, &t.payload);
        }
        while let Some(t) = b.poll_transmit(now) {
            moved = true;
            a.handle_datagram(now, t.dst, t.src, &t.payload);
        }
        if !moved {
            return;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (la, lb) = (loc("10.0.0.1:54324"), loc("10.0.0.2:54324"));
    let service = ServiceId::from_name("echo.fuzz").expect("valid name");
    let mut a = Endpoint::new(
        EndpointConfig::default(),
        [1; 32],
        Arc::new(ServiceTable::new()),
        vec![la],
    );
    let mut b = Endpoint::new(
        EndpointConfig::default(),
        [2; 32],
        Arc::new(ServiceTable::new()),
        vec![lb],
    );
    b.listen(ServicePrefix::exact(service), 0, 1);
    let now = Instant::ZERO;
    let h = a.connect_via(now, service, lb).expect("connect");
    pump(&mut a, &mut b, now);
    let _ = a.write(h, b"hello");
    let real = a.poll_transmit(now).map(|t| t.payload).unwrap_or_default();

    let mut t = now;
    for (i, chunk) in data.split(|w| *w == 0xfe).enumerate() {
        let mut dgram = chunk.to_vec();
        if i == 0 && real.len() >= 20 {
            // Keep the real flowIDs, fuzz the rest.
            let mut spliced = real[..20].to_vec();
            spliced.extend_from_slice(chunk);
            dgram = spliced;
        }
        let (ep, local, remote) = if i % 2 == 0 {
            (&mut b, lb, la)
        } else {
            (&mut a, la, lb)
        };
        ep.handle_datagram(t, local, remote, &dgram);
        while let Some(reply) = ep.poll_transmit(t) {
            // The spliced packet belongs to the live flow, which may answer with its own data;
            // anything else is at most a NACK, never larger than what prompted it.
            if i > 0 {
                assert!(reply.payload.len() <= dgram.len(), "reply amplifies");
            }
        }
        t += std::time::Duration::from_millis(7);
        a.handle_timeout(t);
        b.handle_timeout(t);
        while a.poll_transmit(t).is_some() {}
        while b.poll_transmit(t).is_some() {}
    }
});
