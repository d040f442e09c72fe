//! A migration's RSYN round trip seeds the new path's RTT estimate.
#![allow(clippy::unwrap_used)] // test harness

mod support;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use serval_engine::Instant;
use serval_engine::endpoint::{Endpoint, EndpointConfig, Event};
use serval_table::ServiceTable;
use serval_wire::{Locator, ServiceId, ServicePrefix};
use support::loc;

/// Moves datagrams between `a` (at `a_locs`) and `b` with a fixed one-way delay, in virtual time,
/// until nothing is in flight or `until` is reached; returns the time reached.
fn run(
    a: &mut Endpoint,
    b: &mut Endpoint,
    a_locs: &[Locator],
    mut now: Instant,
    delay: Duration,
    until: Instant,
) -> Instant {
    let mut wire: VecDeque<(Instant, bool, Locator, Locator, Vec<u8>)> = VecDeque::new();
    loop {
        for (to_b, ep) in [(true, &mut *a), (false, &mut *b)] {
            while let Some(t) = ep.poll_transmit(now) {
                wire.push_back((now + delay, to_b, t.src, t.dst, t.payload));
            }
        }
        let next_timer = [a.poll_timeout(), b.poll_timeout()]
            .into_iter()
            .flatten()
            .min();
        let next_packet = wire.front().map(|w| w.0);
        let Some(t) = [next_timer, next_packet].into_iter().flatten().min() else {
            return now;
        };
        if t > until {
            return now;
        }
        now = now.max(t);
        if next_packet == Some(t) {
            let (_, to_b, src, dst, payload) = wire.pop_front().unwrap();
            if to_b {
                b.handle_datagram(now, dst, src, &payload);
            } else if a_locs.contains(&dst) {
                a.handle_datagram(now, dst, src, &payload);
            }
        } else {
            a.handle_timeout(now);
            b.handle_timeout(now);
        }
    }
}

#[test]
fn the_mover_starts_the_new_path_from_the_rsyn_round_trip() {
    let (a_old, a_new, b_loc) = (loc("10.0.0.1:1"), loc("10.0.1.1:1"), loc("10.0.0.2:1"));
    let table = || Arc::new(ServiceTable::new());
    let mut a = Endpoint::new(
        EndpointConfig::default(),
        [1; 32],
        table(),
        vec![a_old, a_new],
    );
    let mut b = Endpoint::new(EndpointConfig::default(), [2; 32], table(), vec![b_loc]);
    let svc = ServiceId::from_name("rtt.test").unwrap();
    b.listen(ServicePrefix::exact(svc), 0, 1);
    let h = a.connect_via(Instant::ZERO, svc, b_loc).unwrap();
    let locs = [a_old, a_new];
    // 10 ms each way on the old path.
    let now = run(
        &mut a,
        &mut b,
        &locs,
        Instant::ZERO,
        Duration::from_millis(10),
        Instant::from_nanos(200_000_000),
    );
    assert!(std::iter::from_fn(|| a.poll_event()).any(|e| e == Event::Connected(h)));
    assert_eq!(a.write(h, &[7u8; 1000]).unwrap(), 1000);
    let now = run(
        &mut a,
        &mut b,
        &locs,
        now,
        Duration::from_millis(10),
        now + Duration::from_millis(100),
    );
    // The new path is slower: 40 ms each way. The old estimate (~20 ms) must not carry over,
    // and neither should the 333 ms initial guess: the RSYN's 80 ms round trip is the sample.
    assert!(a.migrate(h, a_new));
    let end = now + Duration::from_millis(500);
    run(&mut a, &mut b, &locs, now, Duration::from_millis(40), end);
    assert_eq!(a.locators(h).unwrap().0, a_new);
    let srtt = a.connection_stats(h).unwrap().srtt;
    assert!(
        srtt >= Duration::from_millis(75) && srtt <= Duration::from_millis(120),
        "srtt after migration {srtt:?}"
    );
}
