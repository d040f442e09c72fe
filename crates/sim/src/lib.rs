//! A seeded, virtual-time network simulator that drives sans-IO nodes.
//!
//! The simulator owns a set of [`Node`]s, the addresses each one holds, and the links between
//! them. [`Network::step`] collects everything the nodes want to send, decides each datagram's
//! fate with the network's seeded random source (loss, duplication, reordering, delay, jitter,
//! bandwidth, MTU, partitions), then jumps virtual time to the next event — a delivery or a node's
//! timer — and hands it to the node. Nothing reads a clock and every random choice comes from the
//! seed, so a run is a pure function of (seed, nodes, script): a failing seed replays exactly.
//!
//! Call order, as for the engines it drives: time only moves forward; a node is polled for
//! transmits until it has none before time advances; timers fire at or after their deadline.
//!
//! [`Network::run_until`] bounds the number of steps, so a livelock (nodes exchanging packets
//! forever without progress) fails the test instead of hanging it.
#![deny(unsafe_code)]
#![warn(missing_docs)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serval_engine::Instant;
use serval_wire::Locator;

/// A datagram leaving or reaching a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// The sender's address (one the sending node holds).
    pub src: Locator,
    /// The destination address.
    pub dst: Locator,
    /// The UDP payload.
    pub payload: Vec<u8>,
}

/// Something the simulator drives: a sans-IO endpoint, router, or test harness around one.
pub trait Node {
    /// A datagram arrived at `dgram.dst`, one of this node's addresses.
    fn handle_datagram(&mut self, now: Instant, dgram: Datagram);
    /// The next datagram to send, if any. Called repeatedly until it returns `None`.
    fn poll_transmit(&mut self, now: Instant) -> Option<Datagram>;
    /// The earliest time [`Node::handle_timeout`] must be called, if any.
    fn poll_timeout(&self) -> Option<Instant>;
    /// A deadline from [`Node::poll_timeout`] has passed.
    fn handle_timeout(&mut self, now: Instant);
}

/// Index of a node in a [`Network`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub usize);

/// How a link treats the datagrams it carries. Probabilities are in `0.0..=1.0`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Extra delay drawn uniformly from `0..=jitter` per datagram (jitter alone can reorder).
    pub jitter: Duration,
    /// Probability a datagram is lost.
    pub loss: f64,
    /// Probability a datagram is delivered twice.
    pub duplicate: f64,
    /// Probability a datagram is held back by [`LinkConfig::reorder_delay`] more, so that later
    /// ones overtake it.
    pub reorder: f64,
    /// How long a reordered datagram is held back.
    pub reorder_delay: Duration,
    /// Serialization rate in bytes per second; `None` is unlimited.
    pub bandwidth: Option<u64>,
    /// Largest payload the link carries; larger datagrams are dropped (as an IP path drops
    /// packets too big for it when DF is set).
    pub mtu: usize,
    /// Most bytes queued for serialization before tail drop (only with a bandwidth limit).
    pub queue_bytes: usize,
}

impl Default for LinkConfig {
    /// A clean 10 ms link with a 1500-byte IP MTU (1472 bytes of UDP payload over IPv4).
    fn default() -> Self {
        LinkConfig {
            delay: Duration::from_millis(10),
            jitter: Duration::ZERO,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(5),
            bandwidth: None,
            mtu: 1472,
            queue_bytes: 256 * 1024,
        }
    }
}

/// What happened to the datagrams the network carried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Datagrams the nodes sent.
    pub sent: u64,
    /// Datagrams handed to a node (duplicates included).
    pub delivered: u64,
    /// Dropped by random loss.
    pub lost: u64,
    /// Extra copies made.
    pub duplicated: u64,
    /// Held back to be overtaken.
    pub reordered: u64,
    /// Dropped for exceeding the link MTU.
    pub too_big: u64,
    /// Dropped by a partition.
    pub partitioned: u64,
    /// Dropped because no node holds the destination address (at send or at arrival).
    pub unroutable: u64,
    /// Dropped because the sender does not hold the source address it used.
    pub spoofed: u64,
    /// Dropped by a full bandwidth queue.
    pub queue_full: u64,
}

/// The simulation failed to reach its goal within its step budget.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no progress after {steps} steps (virtual time {now:?}): livelock or a stuck node")]
pub struct StepLimit {
    /// Steps taken.
    pub steps: u64,
    /// Virtual time reached.
    pub now: Instant,
}

/// A datagram in flight.
#[derive(Debug)]
struct InFlight {
    at: Instant,
    seq: u64,
    dgram: Datagram,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// Whose bandwidth queue a datagram joins: the node pair's, or an address pair's own when
/// [`Network::set_path_link`] overrides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum QueueKey {
    Nodes(NodeId, NodeId),
    Path(IpAddr, IpAddr),
}

/// A simulated network of nodes; see the [crate docs](crate).
pub struct Network<N> {
    now: Instant,
    nodes: Vec<N>,
    owner: HashMap<Locator, NodeId>,
    default_link: LinkConfig,
    links: HashMap<(NodeId, NodeId), LinkConfig>,
    partitioned: HashSet<(NodeId, NodeId)>,
    /// Per-(source IP, destination IP) link overrides.
    path_links: HashMap<(IpAddr, IpAddr), LinkConfig>,
    /// Cut (source IP, destination IP) pairs.
    path_cuts: HashSet<(IpAddr, IpAddr)>,
    busy_until: HashMap<QueueKey, Instant>,
    in_flight: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    rng: ChaCha8Rng,
    stats: SimStats,
}

impl<N: Node> Network<N> {
    /// An empty network whose random choices all come from `seed`, with `link` between every
    /// pair of nodes unless [`Network::set_link`] says otherwise.
    pub fn new(seed: u64, link: LinkConfig) -> Self {
        Network {
            now: Instant::ZERO,
            nodes: Vec::new(),
            owner: HashMap::new(),
            default_link: link,
            links: HashMap::new(),
            partitioned: HashSet::new(),
            path_links: HashMap::new(),
            path_cuts: HashSet::new(),
            busy_until: HashMap::new(),
            in_flight: BinaryHeap::new(),
            seq: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
            stats: SimStats::default(),
        }
    }

    /// Adds a node holding `addrs`; an address already held moves to the new node.
    pub fn add_node(&mut self, node: N, addrs: &[Locator]) -> NodeId {
        let id = NodeId(self.nodes.len());
        self.nodes.push(node);
        for a in addrs {
            self.owner.insert(*a, id);
        }
        id
    }

    /// Gives `addr` to `node` (taking it from any node that held it).
    pub fn add_address(&mut self, node: NodeId, addr: Locator) {
        self.owner.insert(addr, node);
    }

    /// Takes `addr` away: datagrams to it are dropped from now on, and the node can no longer
    /// send from it. The node itself is not told; tell it through [`Network::node_mut`].
    pub fn remove_address(&mut self, addr: &Locator) {
        self.owner.remove(addr);
    }

    /// Sets the link from `from` to `to` (one direction).
    pub fn set_link(&mut self, from: NodeId, to: NodeId, link: LinkConfig) {
        self.links.insert((from, to), link);
    }

    /// Cuts (`true`) or heals (`false`) both directions between `a` and `b`.
    pub fn set_partition(&mut self, a: NodeId, b: NodeId, cut: bool) {
        for pair in [(a, b), (b, a)] {
            if cut {
                self.partitioned.insert(pair);
            } else {
                self.partitioned.remove(&pair);
            }
        }
    }

    /// Sets the link for datagrams from IP address `src` to IP address `dst` (one direction;
    /// ports are ignored), overriding the node-pair link ([`Network::set_link`] or the default)
    /// for them.
    ///
    /// This models one path between multi-homed nodes: with client addresses 10.0.1.1 and
    /// 10.0.2.1 and server addresses 10.0.1.2 and 10.0.2.2, the path 10.0.1.1 → 10.0.1.2 can
    /// get its own delay, loss, MTU and bandwidth while 10.0.2.1 → 10.0.2.2 keeps another.
    ///
    /// Every [`LinkConfig`] field applies to the address pair as a whole. An overridden address
    /// pair has its own bandwidth queue (serialization state and [`LinkConfig::queue_bytes`]
    /// limit), separate from the node pair's and from every other address pair's, so two paths
    /// limited to 100 Mbit/s each carry 200 Mbit/s together. A node-pair partition
    /// ([`Network::set_partition`]) still drops these datagrams. Replaces any earlier override for
    /// the same pair; datagrams already in flight keep the fate they were given.
    pub fn set_path_link(&mut self, src: IpAddr, dst: IpAddr, link: LinkConfig) {
        self.path_links.insert((src, dst), link);
    }

    /// Removes the [`Network::set_path_link`] override from `src` to `dst` (one direction), so
    /// those datagrams use the node-pair link again. Does not heal a [`Network::set_path_cut`].
    pub fn clear_path_link(&mut self, src: IpAddr, dst: IpAddr) {
        self.path_links.remove(&(src, dst));
    }

    /// Cuts (`true`) or heals (`false`) the path from IP address `src` to IP address `dst` (one
    /// direction; ports are ignored): while cut, every datagram from `src` to `dst` is silently
    /// dropped and counted in [`SimStats::partitioned`]. Other address pairs between the same
    /// nodes, and the reverse direction, are unaffected. Independent of
    /// [`Network::set_path_link`]: a cut takes precedence over an override, and clearing the
    /// override does not heal the cut.
    pub fn set_path_cut(&mut self, src: IpAddr, dst: IpAddr, cut: bool) {
        if cut {
            self.path_cuts.insert((src, dst));
        } else {
            self.path_cuts.remove(&(src, dst));
        }
    }

    /// The current virtual time.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// A node.
    pub fn node(&self, id: NodeId) -> &N {
        &self.nodes[id.0]
    }

    /// A node, mutably (to issue application commands between steps).
    pub fn node_mut(&mut self, id: NodeId) -> &mut N {
        &mut self.nodes[id.0]
    }

    /// What happened to the datagrams so far.
    pub fn stats(&self) -> &SimStats {
        &self.stats
    }

    /// Moves the network forward by one event: first every node's pending transmits enter the
    /// network, then time jumps to the earliest delivery or node timer and that event runs.
    /// Returns `false` when nothing is left to happen (no datagram in flight, no timer).
    pub fn step(&mut self) -> bool {
        self.collect_transmits();
        let next_delivery = self.in_flight.peek().map(|Reverse(f)| f.at);
        let next_timer = self
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.poll_timeout().map(|t| (t, i)))
            .min();
        let deliver = match (next_delivery, next_timer) {
            (None, None) => return false,
            (Some(d), Some((t, _))) => d <= t,
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        if deliver {
            if let Some(Reverse(f)) = self.in_flight.pop() {
                self.now = self.now.max(f.at);
                match self.owner.get(&f.dgram.dst) {
                    Some(&to) => {
                        self.stats.delivered += 1;
                        self.nodes[to.0].handle_datagram(self.now, f.dgram);
                    }
                    None => self.stats.unroutable += 1,
                }
            }
        } else if let Some((t, i)) = next_timer {
            self.now = self.now.max(t);
            self.nodes[i].handle_timeout(self.now);
        }
        true
    }

    /// Steps until `done` holds, at most `max_steps` steps.
    ///
    /// Returns the steps taken, or [`StepLimit`] if the budget ran out or the network went quiet
    /// (nothing in flight, no timers) with `done` still false.
    pub fn run_until(
        &mut self,
        max_steps: u64,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Result<u64, StepLimit> {
        for steps in 0..max_steps {
            if done(self) {
                return Ok(steps);
            }
            if !self.step() {
                self.collect_transmits();
                if done(self) {
                    return Ok(steps);
                }
                return Err(StepLimit {
                    steps,
                    now: self.now,
                });
            }
        }
        if done(self) {
            return Ok(max_steps);
        }
        Err(StepLimit {
            steps: max_steps,
            now: self.now,
        })
    }

    /// Drains every node's transmits into the network.
    fn collect_transmits(&mut self) {
        for i in 0..self.nodes.len() {
            while let Some(d) = self.nodes[i].poll_transmit(self.now) {
                self.send(NodeId(i), d);
            }
        }
    }

    /// Decides one datagram's fate.
    fn send(&mut self, from: NodeId, dgram: Datagram) {
        self.stats.sent += 1;
        if self.owner.get(&dgram.src) != Some(&from) {
            self.stats.spoofed += 1;
            return;
        }
        let Some(&to) = self.owner.get(&dgram.dst) else {
            self.stats.unroutable += 1;
            return;
        };
        if self.partitioned.contains(&(from, to)) {
            self.stats.partitioned += 1;
            return;
        }
        let path = (dgram.src.ip(), dgram.dst.ip());
        if self.path_cuts.contains(&path) {
            self.stats.partitioned += 1;
            return;
        }
        // An address-pair override replaces the node-pair link and brings its own queue; either
        // way the random draws below happen in the same order.
        let (link, queue) = match self.path_links.get(&path) {
            Some(link) => (link.clone(), QueueKey::Path(path.0, path.1)),
            None => (
                self.links
                    .get(&(from, to))
                    .unwrap_or(&self.default_link)
                    .clone(),
                QueueKey::Nodes(from, to),
            ),
        };
        if dgram.payload.len() > link.mtu {
            self.stats.too_big += 1;
            return;
        }
        if self.rng.random_bool(link.loss.clamp(0.0, 1.0)) {
            self.stats.lost += 1;
            return;
        }
        // Serialization: a datagram leaves when the link has finished the ones before it.
        let mut depart = self.now;
        if let Some(rate) = link.bandwidth.filter(|r| *r > 0) {
            let busy = self.busy_until.entry(queue).or_insert(self.now);
            let start = (*busy).max(self.now);
            let backlog = u128::from(rate) * (start - self.now).as_nanos() / 1_000_000_000;
            if backlog > link.queue_bytes as u128 {
                self.stats.queue_full += 1;
                return;
            }
            let tx = Duration::from_nanos(
                (dgram.payload.len() as u64).saturating_mul(1_000_000_000) / rate,
            );
            *busy = start + tx;
            depart = *busy;
        }
        let copies = if self.rng.random_bool(link.duplicate.clamp(0.0, 1.0)) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        let mut arrivals = [Instant::ZERO; 2];
        for at in arrivals.iter_mut().take(copies) {
            *at = depart + link.delay;
            if !link.jitter.is_zero() {
                let j = self.rng.random_range(0..=link.jitter.as_nanos() as u64);
                *at += Duration::from_nanos(j);
            }
            if self.rng.random_bool(link.reorder.clamp(0.0, 1.0)) {
                self.stats.reordered += 1;
                *at += link.reorder_delay;
            }
        }
        if copies == 2 {
            self.push(arrivals[1], dgram.clone());
        }
        self.push(arrivals[0], dgram);
    }

    fn push(&mut self, at: Instant, dgram: Datagram) {
        self.seq += 1;
        self.in_flight.push(Reverse(InFlight {
            at,
            seq: self.seq,
            dgram,
        }));
    }
}
