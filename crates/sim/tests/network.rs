//! Tests of the simulator itself, with two toy nodes: a sender that emits numbered datagrams on
//! a timer, and a sink that records what arrives and when.
#![allow(clippy::unwrap_used)] // test harness: a failed unwrap is a failed test

use std::time::Duration;

use serval_engine::Instant;
use serval_sim::{Datagram, LinkConfig, Network, Node, NodeId};
use serval_wire::Locator;

/// Sends `count` datagrams of `size` bytes from `from` to `to`, one every `interval`; records
/// arrivals (for the sink role).
struct Toy {
    from: Locator,
    to: Locator,
    size: usize,
    interval: Duration,
    next: Option<Instant>,
    remaining: u32,
    sent: u32,
    outbox: Vec<Datagram>,
    received: Vec<(Instant, u32)>,
}

impl Toy {
    fn sender(from: &str, to: &str, count: u32, size: usize, interval: Duration) -> Toy {
        Toy {
            from: from.parse().unwrap(),
            to: to.parse().unwrap(),
            size,
            interval,
            next: Some(Instant::ZERO),
            remaining: count,
            sent: 0,
            outbox: Vec::new(),
            received: Vec::new(),
        }
    }

    fn sink() -> Toy {
        Toy {
            next: None,
            remaining: 0,
            ..Toy::sender("0.0.0.0:0", "0.0.0.0:0", 0, 0, Duration::ZERO)
        }
    }
}

impl Node for Toy {
    fn handle_datagram(&mut self, now: Instant, d: Datagram) {
        let n = u32::from_be_bytes(d.payload[..4].try_into().unwrap());
        self.received.push((now, n));
    }
    fn poll_transmit(&mut self, _now: Instant) -> Option<Datagram> {
        self.outbox.pop()
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.next
    }
    fn handle_timeout(&mut self, now: Instant) {
        let mut payload = vec![0u8; self.size.max(4)];
        payload[..4].copy_from_slice(&self.sent.to_be_bytes());
        self.outbox.push(Datagram {
            src: self.from,
            dst: self.to,
            payload,
        });
        self.sent += 1;
        self.remaining -= 1;
        self.next = (self.remaining > 0).then(|| now + self.interval);
    }
}

const A: &str = "10.0.0.1:1000";
const B: &str = "10.0.0.2:2000";

fn pair(seed: u64, link: LinkConfig, count: u32, size: usize) -> (Network<Toy>, NodeId, NodeId) {
    let mut net = Network::new(seed, link);
    let a = net.add_node(
        Toy::sender(A, B, count, size, Duration::from_millis(1)),
        &[A.parse().unwrap()],
    );
    let b = net.add_node(Toy::sink(), &[B.parse().unwrap()]);
    (net, a, b)
}

fn drain(net: &mut Network<Toy>) {
    net.run_until(1_000_000, |_| false).unwrap_err();
}

#[test]
fn clean_link_delivers_in_order_after_the_delay() {
    let (mut net, _, b) = pair(1, LinkConfig::default(), 100, 100);
    drain(&mut net);
    let got = &net.node(b).received;
    assert_eq!(got.len(), 100);
    for (i, (t, n)) in got.iter().enumerate() {
        assert_eq!(*n, i as u32);
        // Sent at i ms, 10 ms of delay.
        assert_eq!(*t, Instant::ZERO + Duration::from_millis(i as u64 + 10));
    }
}

#[test]
fn loss_rate_matches_configuration() {
    let link = LinkConfig {
        loss: 0.3,
        ..LinkConfig::default()
    };
    let (mut net, _, b) = pair(7, link, 10_000, 10);
    drain(&mut net);
    let got = net.node(b).received.len() as f64;
    // 10k Bernoulli(0.7) trials: the standard deviation is about 46.
    assert!((6_800.0..=7_200.0).contains(&got), "{got}");
    assert_eq!(net.stats().lost + net.stats().delivered, 10_000);
}

#[test]
fn duplication_and_reordering_happen_and_are_counted() {
    let link = LinkConfig {
        duplicate: 0.1,
        reorder: 0.1,
        reorder_delay: Duration::from_millis(5),
        ..LinkConfig::default()
    };
    let (mut net, _, b) = pair(3, link, 2_000, 10);
    drain(&mut net);
    let got: Vec<u32> = net.node(b).received.iter().map(|(_, n)| *n).collect();
    let s = net.stats();
    assert_eq!(got.len() as u64, 2_000 + s.duplicated);
    assert!(s.duplicated > 100 && s.reordered > 100, "{s:?}");
    assert!(
        got.windows(2).any(|w| w[1] < w[0]),
        "nothing arrived out of order"
    );
    let mut unique = got.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), 2_000);
}

#[test]
fn bandwidth_limit_spaces_arrivals() {
    let link = LinkConfig {
        bandwidth: Some(1_000_000), // 1 MB/s: a 1000-byte datagram takes 1 ms
        queue_bytes: usize::MAX,
        ..LinkConfig::default()
    };
    let mut net = Network::new(1, link);
    // Sender emits every 0.1 ms: faster than the link.
    net.add_node(
        Toy::sender(A, B, 50, 1000, Duration::from_micros(100)),
        &[A.parse().unwrap()],
    );
    let b = net.add_node(Toy::sink(), &[B.parse().unwrap()]);
    drain(&mut net);
    let got = &net.node(b).received;
    assert_eq!(got.len(), 50);
    for w in got.windows(2) {
        assert_eq!(w[1].0 - w[0].0, Duration::from_millis(1));
    }
}

#[test]
fn mtu_partition_and_address_removal_drop() {
    let link = LinkConfig {
        mtu: 500,
        ..LinkConfig::default()
    };
    let (mut net, _, b) = pair(1, link, 10, 600);
    drain(&mut net);
    assert_eq!(net.stats().too_big, 10);
    assert!(net.node(b).received.is_empty());

    let (mut net, a2, b2) = pair(1, LinkConfig::default(), 10, 100);
    net.set_partition(a2, b2, true);
    drain(&mut net);
    assert_eq!(net.stats().partitioned, 10);

    let (mut net, _, _) = pair(1, LinkConfig::default(), 10, 100);
    net.remove_address(&B.parse().unwrap());
    drain(&mut net);
    assert_eq!(net.stats().unroutable, 10);
}

#[test]
fn sending_from_an_address_not_held_is_dropped() {
    let (mut net, _, _) = pair(1, LinkConfig::default(), 5, 100);
    net.remove_address(&A.parse().unwrap());
    drain(&mut net);
    assert_eq!(net.stats().spoofed, 5);
}

#[test]
fn same_seed_same_run_other_seed_other_run() {
    let link = LinkConfig {
        loss: 0.2,
        jitter: Duration::from_millis(3),
        duplicate: 0.05,
        ..LinkConfig::default()
    };
    let run = |seed| {
        let (mut net, _, b) = pair(seed, link.clone(), 500, 10);
        drain(&mut net);
        net.node(b).received.clone()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
}

#[test]
fn run_until_reports_the_step_limit() {
    let (mut net, _, b) = pair(1, LinkConfig::default(), 1_000, 10);
    let err = net.run_until(50, |_| false).unwrap_err();
    assert_eq!(err.steps, 50);
    let steps = net
        .run_until(1_000_000, |n| n.node(b).received.len() == 1_000)
        .unwrap();
    assert!(steps > 0);
}
