//! Tests of the simulator itself, with two toy nodes: a sender that emits numbered datagrams on
//! a timer (on one or several address pairs), and a sink that records what arrives and when.
#![allow(clippy::unwrap_used)] // test harness: a failed unwrap is a failed test

use std::net::IpAddr;
use std::time::Duration;

use serval_engine::Instant;
use serval_sim::{Datagram, LinkConfig, Network, Node, NodeId};
use serval_wire::Locator;

/// Every `interval`, sends one datagram of `size` bytes on each of its `(from, to)` routes,
/// `count` times; records arrivals (for the sink role).
struct Toy {
    routes: Vec<(Locator, Locator)>,
    size: usize,
    interval: Duration,
    next: Option<Instant>,
    remaining: u32,
    sent: u32,
    outbox: Vec<Datagram>,
    received: Vec<(Instant, u32)>,
    /// The same arrivals as `received`, with the address each came in on.
    received_on: Vec<(Instant, Locator, u32)>,
}

impl Toy {
    fn sender(from: &str, to: &str, count: u32, size: usize, interval: Duration) -> Toy {
        Toy::multi(&[(from, to)], count, size, interval)
    }

    fn multi(routes: &[(&str, &str)], count: u32, size: usize, interval: Duration) -> Toy {
        Toy {
            routes: routes
                .iter()
                .map(|(f, t)| (f.parse().unwrap(), t.parse().unwrap()))
                .collect(),
            size,
            interval,
            next: (count > 0).then_some(Instant::ZERO),
            remaining: count,
            sent: 0,
            outbox: Vec::new(),
            received: Vec::new(),
            received_on: Vec::new(),
        }
    }

    fn sink() -> Toy {
        Toy::multi(&[], 0, 0, Duration::ZERO)
    }

    /// Arrival times of the datagrams that came in on `dst`, in arrival order.
    fn arrivals_on(&self, dst: &str) -> Vec<Instant> {
        let dst: Locator = dst.parse().unwrap();
        self.received_on
            .iter()
            .filter(|(_, d, _)| *d == dst)
            .map(|(t, _, _)| *t)
            .collect()
    }
}

impl Node for Toy {
    fn handle_datagram(&mut self, now: Instant, d: Datagram) {
        let n = u32::from_be_bytes(d.payload[..4].try_into().unwrap());
        self.received.push((now, n));
        self.received_on.push((now, d.dst, n));
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
        // `poll_transmit` pops from the back: push in reverse so routes leave in order.
        for (from, to) in self.routes.iter().rev() {
            self.outbox.push(Datagram {
                src: *from,
                dst: *to,
                payload: payload.clone(),
            });
        }
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

// Multipath: the client holds 10.0.1.1 and 10.0.2.1, the server 10.0.1.2 and 10.0.2.2; path 1
// is 10.0.1.1 <-> 10.0.1.2, path 2 is 10.0.2.1 <-> 10.0.2.2.
const C1: &str = "10.0.1.1:1000";
const C2: &str = "10.0.2.1:1000";
const S1: &str = "10.0.1.2:2000";
const S2: &str = "10.0.2.2:2000";

fn ip(loc: &str) -> IpAddr {
    loc.parse::<Locator>().unwrap().ip()
}

/// A client sending on `client_routes` and a server sending on `server_routes`, `count` times
/// every `interval`, each holding both of its addresses.
fn multihomed(
    seed: u64,
    link: LinkConfig,
    client_routes: &[(&str, &str)],
    server_routes: &[(&str, &str)],
    count: u32,
    size: usize,
    interval: Duration,
) -> (Network<Toy>, NodeId, NodeId) {
    let mut net = Network::new(seed, link);
    let c = net.add_node(
        Toy::multi(client_routes, count, size, interval),
        &[C1.parse().unwrap(), C2.parse().unwrap()],
    );
    let s = net.add_node(
        Toy::multi(server_routes, count, size, interval),
        &[S1.parse().unwrap(), S2.parse().unwrap()],
    );
    (net, c, s)
}

fn ms(n: u64) -> Instant {
    Instant::ZERO + Duration::from_millis(n)
}

#[test]
fn path_link_delay_applies_only_to_its_address_pair_and_direction() {
    let (mut net, c, s) = multihomed(
        1,
        LinkConfig::default(),
        &[(C1, S1), (C2, S2)],
        &[(S1, C1)],
        10,
        100,
        Duration::from_millis(1),
    );
    net.set_path_link(
        ip(C1),
        ip(S1),
        LinkConfig {
            delay: Duration::from_millis(50),
            ..LinkConfig::default()
        },
    );
    drain(&mut net);
    // Path 1, client -> server: the override's 50 ms.
    let p1 = net.node(s).arrivals_on(S1);
    assert_eq!(p1, (0..10).map(|i| ms(i + 50)).collect::<Vec<_>>());
    // Path 2 between the same nodes: the node-pair link's 10 ms.
    let p2 = net.node(s).arrivals_on(S2);
    assert_eq!(p2, (0..10).map(|i| ms(i + 10)).collect::<Vec<_>>());
    // Path 1 in the other direction is not overridden.
    let back = net.node(c).arrivals_on(C1);
    assert_eq!(back, (0..10).map(|i| ms(i + 10)).collect::<Vec<_>>());
}

#[test]
fn clearing_a_path_link_restores_the_node_pair_link() {
    let (mut net, c, s) = multihomed(
        1,
        LinkConfig::default(),
        &[(C1, S1)],
        &[],
        10,
        100,
        Duration::from_millis(1),
    );
    net.set_path_link(
        ip(C1),
        ip(S1),
        LinkConfig {
            delay: Duration::from_millis(50),
            ..LinkConfig::default()
        },
    );
    // Datagrams 0..=3 leave under the override (the 5th is queued but not yet sent).
    net.run_until(1_000, |n| n.node(c).sent == 5).unwrap();
    net.clear_path_link(ip(C1), ip(S1));
    drain(&mut net);
    let got: Vec<(Instant, u32)> = net.node(s).received.clone();
    assert_eq!(got.len(), 10);
    for (t, n) in got {
        let delay = if n < 4 { 50 } else { 10 };
        assert_eq!(t, ms(u64::from(n) + delay), "datagram {n}");
    }
}

#[test]
fn path_cut_drops_one_direction_only_and_is_counted() {
    let (mut net, c, s) = multihomed(
        1,
        LinkConfig::default(),
        &[(C1, S1), (C2, S2)],
        &[(S1, C1)],
        10,
        100,
        Duration::from_millis(1),
    );
    net.set_path_cut(ip(C1), ip(S1), true);
    drain(&mut net);
    assert!(net.node(s).arrivals_on(S1).is_empty());
    assert_eq!(net.node(s).arrivals_on(S2).len(), 10);
    assert_eq!(net.node(c).arrivals_on(C1).len(), 10);
    assert_eq!(net.stats().partitioned, 10);
    assert_eq!(net.stats().delivered, 20);

    // Healed: everything gets through.
    let (mut net, _, s) = multihomed(
        1,
        LinkConfig::default(),
        &[(C1, S1)],
        &[],
        10,
        100,
        Duration::from_millis(1),
    );
    net.set_path_cut(ip(C1), ip(S1), true);
    net.set_path_cut(ip(C1), ip(S1), false);
    drain(&mut net);
    assert_eq!(net.node(s).arrivals_on(S1).len(), 10);
    assert_eq!(net.stats().partitioned, 0);
}

#[test]
fn path_links_serialize_independently() {
    // 1 MB/s: a 1000-byte datagram takes 1 ms. The client offers one datagram per path every
    // 0.1 ms, far faster than either path.
    let limited = LinkConfig {
        bandwidth: Some(1_000_000),
        queue_bytes: usize::MAX,
        ..LinkConfig::default()
    };
    let run = |override_paths: bool| {
        let (mut net, _, s) = multihomed(
            1,
            limited.clone(),
            &[(C1, S1), (C2, S2)],
            &[],
            50,
            1000,
            Duration::from_micros(100),
        );
        if override_paths {
            net.set_path_link(ip(C1), ip(S1), limited.clone());
            net.set_path_link(ip(C2), ip(S2), limited.clone());
        }
        drain(&mut net);
        let server = net.node(s);
        (server.arrivals_on(S1), server.arrivals_on(S2))
    };

    // Each path has its own 1 MB/s: each delivers one datagram per ms, side by side, so 100
    // datagrams are through by 50 ms of serialization plus 10 ms of delay.
    let (p1, p2) = run(true);
    assert_eq!(p1.len(), 50);
    assert_eq!(p1, p2);
    for w in p1.windows(2) {
        assert_eq!(w[1] - w[0], Duration::from_millis(1));
    }
    assert_eq!(*p1.last().unwrap(), ms(60));

    // Without overrides both share the node pair's one queue: 100 ms for the same traffic.
    let (p1, p2) = run(false);
    let last = p1.iter().chain(&p2).max().unwrap();
    assert_eq!(*last, ms(110));
}

#[test]
fn path_queue_limit_is_per_address_pair() {
    // Path 1 gets a tiny queue; path 2 keeps the node pair's unbounded one.
    let link = LinkConfig {
        bandwidth: Some(1_000_000),
        queue_bytes: usize::MAX,
        ..LinkConfig::default()
    };
    let (mut net, _, s) = multihomed(
        1,
        link.clone(),
        &[(C1, S1), (C2, S2)],
        &[],
        50,
        1000,
        Duration::from_micros(100),
    );
    net.set_path_link(
        ip(C1),
        ip(S1),
        LinkConfig {
            queue_bytes: 2_000,
            ..link
        },
    );
    drain(&mut net);
    let p1 = net.node(s).arrivals_on(S1).len() as u64;
    assert_eq!(net.node(s).arrivals_on(S2).len(), 50);
    assert!(p1 < 50, "{p1}");
    assert_eq!(net.stats().queue_full, 50 - p1);
}

#[test]
fn an_override_equal_to_the_link_draws_the_same_randomness() {
    let link = LinkConfig {
        loss: 0.2,
        jitter: Duration::from_millis(3),
        duplicate: 0.05,
        reorder: 0.05,
        ..LinkConfig::default()
    };
    let run = |override_path: bool| {
        let (mut net, _, b) = pair(42, link.clone(), 500, 10);
        if override_path {
            net.set_path_link(ip(A), ip(B), link.clone());
        }
        drain(&mut net);
        (net.node(b).received.clone(), net.stats().clone())
    };
    assert_eq!(run(false), run(true));
}
