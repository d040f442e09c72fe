//! Real engines over the simulated network: a client connects to a service by name, sends a
//! seeded byte string, the server echoes it, both close. Swept over many seeds with loss,
//! reordering, duplication, jitter and asymmetric delays, with and without migrations in the
//! middle: the client moving once (with its old address usable until the move completes, or
//! vanishing as it moves), twice, or both ends at once.
//!
//! Each run checks: every byte arrives exactly once and in order (the echo matches what was
//! sent), both ends see a clean close, and the run finishes within a step budget (livelock
//! guard). `SERVAL_SIM_SEEDS=N` sweeps N seeds per configuration instead of the default;
//! `SERVAL_SIM_SEED=N SIM_TRACE=1` replays one seed printing every event.
#![allow(clippy::unwrap_used)] // test harness: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use serval_engine::Instant;
use serval_engine::endpoint::{CloseReason, ConnectionHandle, Endpoint, EndpointConfig, Event};
use serval_sim::{Datagram, LinkConfig, Network, Node, NodeId};
use serval_table::ServiceTable;
use serval_wire::{Locator, ServiceId, ServicePrefix};

const CLIENT: &str = "10.0.0.1:54324";
const CLIENT_NEW: &str = "10.0.9.1:54324";
const CLIENT_THIRD: &str = "10.0.8.1:54324";
const SERVER: &str = "10.0.0.2:54324";
const SERVER_NEW: &str = "10.0.9.2:54324";
/// The client's address as a NAT in front of it maps it, before and after a rebinding.
const NAT1: &str = "192.0.2.7:40000";
const NAT2: &str = "192.0.2.7:40001";

/// Who changes address during the transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Move {
    Nobody,
    /// The client moves once a third of the echo is back; its old address then disappears
    /// (make-before-break: the engine keeps the old path until the new one is validated).
    Client,
    /// The client moves at a third and again at two thirds of the echo, each old address
    /// disappearing once the move completed; it ends its stream only after both moves.
    ClientTwice,
    /// The client's address vanishes once a third of the echo is back (removed from the
    /// network and the endpoint in the same instant) and it moves: break-before-make.
    ClientBreak,
    /// Both ends move at the same instant; old addresses disappear once both have moved.
    Both,
    /// The client sits behind a NAT whose mapping changes once a third of the echo is back
    /// (a new public port); the client knows nothing of it. `keep_old`: the old mapping
    /// still delivers (otherwise it is gone, and so is everything sent to it).
    Rebind {
        keep_old: bool,
    },
}

/// A NAT in front of a host: its packets leave from `public`; packets to a mapping in
/// `alive` reach it at `inner`, others are dropped.
struct Nat {
    inner: Locator,
    public: Locator,
    alive: Vec<Locator>,
}

/// What an application on a node does.
enum App {
    Client {
        service: ServiceId,
        via: Locator,
        conn: Option<ConnectionHandle>,
        data: Vec<u8>,
        written: usize,
        finished: bool,
        echo: Vec<u8>,
        eof: bool,
        /// Migrate to each locator once that many echoed bytes arrived, in order; each move
        /// starts only once the previous one completed.
        migrate_at: Vec<(usize, Locator)>,
        /// Moves started.
        migrated: usize,
        /// Finish the stream only once every move of `migrate_at` completed (so that a late
        /// move still happens on an open flow).
        hold_finish: bool,
    },
    Server {
        conn: Option<ConnectionHandle>,
        /// Read but not yet echoed.
        pending: Vec<u8>,
        eof: bool,
        finished: bool,
    },
}

struct Host {
    ep: Endpoint,
    app: App,
    closed: Option<CloseReason>,
    connected: bool,
    failed: Option<String>,
    /// Migration events seen: this end moved / the peer moved.
    moved: u32,
    peer_moved: u32,
    /// The NAT in front of this host, if any.
    nat: Option<Nat>,
    /// An address of the peer's that this host has not validated yet, with the bytes sent to
    /// it and received from it until the peer moved there (the amplification limit's terms).
    watch: Option<(Locator, u64, u64)>,
}

impl Host {
    /// The application's connection, once it has one.
    fn conn(&self) -> Option<ConnectionHandle> {
        match &self.app {
            App::Client { conn, .. } | App::Server { conn, .. } => *conn,
        }
    }

    fn run_app(&mut self, now: Instant) {
        while let Some(ev) = self.ep.poll_event() {
            if std::env::var_os("SIM_TRACE").is_some() {
                eprintln!(
                    "{now:?} {} {ev:?}",
                    if matches!(self.app, App::Client { .. }) {
                        "client"
                    } else {
                        "server"
                    }
                );
            }
            match ev {
                Event::Connected(_) => self.connected = true,
                Event::ConnectFailed(_, e) => self.failed = Some(e.to_string()),
                Event::Incoming(l) => {
                    if let App::Server { conn, .. } = &mut self.app {
                        *conn = self.ep.accept(l);
                    }
                }
                // Only this application's connection: a delayed duplicate SYN can make the
                // server open (and the client reset) a second, stray flow.
                Event::Closed(h, r) if Some(h) == self.conn() => self.closed = Some(r),
                Event::Migrated(..) => self.moved += 1,
                Event::PeerMigrated(..) => self.peer_moved += 1,
                _ => {}
            }
        }
        let mut buf = [0u8; 4096];
        match &mut self.app {
            App::Client {
                service,
                via,
                conn,
                data,
                written,
                finished,
                echo,
                eof,
                migrate_at,
                migrated,
                hold_finish,
            } => {
                let h = match conn {
                    Some(h) => *h,
                    None => {
                        *conn = Some(self.ep.connect_via(now, *service, *via).unwrap());
                        return;
                    }
                };
                if !self.connected || self.closed.is_some() {
                    return;
                }
                while *written < data.len() {
                    match self.ep.write(h, &data[*written..]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => *written += n,
                    }
                }
                let moves_done = self.moved as usize >= migrate_at.len();
                if *written == data.len()
                    && !*finished
                    && (moves_done || !*hold_finish)
                    && self.ep.finish(h).is_ok()
                {
                    *finished = true;
                }
                while let Ok(Some(n)) = self.ep.read(h, &mut buf) {
                    if n == 0 {
                        *eof = true;
                        break;
                    }
                    echo.extend_from_slice(&buf[..n]);
                }
                // One move at a time: a second would give the first up.
                if let Some(&(at, to)) = migrate_at.get(*migrated)
                    && echo.len() >= at
                    && !self.ep.is_moving(h)
                    && self.ep.migrate(h, to)
                {
                    *migrated += 1;
                }
            }
            App::Server {
                conn,
                pending,
                eof,
                finished,
            } => {
                let Some(h) = *conn else { return };
                if self.closed.is_some() {
                    return;
                }
                while let Ok(Some(n)) = self.ep.read(h, &mut buf) {
                    if n == 0 {
                        *eof = true;
                        break;
                    }
                    pending.extend_from_slice(&buf[..n]);
                }
                while !pending.is_empty() {
                    match self.ep.write(h, pending) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            pending.drain(..n);
                        }
                    }
                }
                if *eof && pending.is_empty() && !*finished && self.ep.finish(h).is_ok() {
                    *finished = true;
                }
            }
        }
    }
}

impl Node for Host {
    fn handle_datagram(&mut self, now: Instant, d: Datagram) {
        if std::env::var_os("SIM_TRACE").is_some() {
            let who = if matches!(self.app, App::Client { .. }) {
                "client"
            } else {
                "server"
            };
            let what = serval_wire::SalPacket::new_checked(&d.payload[..])
                .ok()
                .and_then(|p| {
                    serval_wire::SalRepr::parse(&p)
                        .ok()
                        .map(|r| (r, p.payload().len()))
                })
                .map(|(r, n)| {
                    let pn = d
                        .payload
                        .get(20..28)
                        .map(|b| u64::from_be_bytes(b.try_into().unwrap()));
                    format!("{:?} payload {n} pn {pn:?}", r.control.map(|c| c.flags))
                });
            eprintln!("{now:?} {who} <- {} bytes {what:?}", d.payload.len());
        }
        if let Some((addr, _, received)) = &mut self.watch
            && d.src == *addr
            && self.peer_moved == 0
        {
            *received += d.payload.len() as u64;
        }
        let dst = match &self.nat {
            Some(nat) if nat.alive.contains(&d.dst) => nat.inner,
            // A mapping the NAT forgot: dropped there.
            Some(_) => return,
            None => d.dst,
        };
        self.ep.handle_datagram(now, dst, d.src, &d.payload);
        self.run_app(now);
    }
    fn poll_transmit(&mut self, now: Instant) -> Option<Datagram> {
        self.run_app(now);
        let mut d = self.poll_engine(now)?;
        if let Some(nat) = &self.nat {
            d.src = nat.public;
        }
        if let Some((addr, sent, _)) = &mut self.watch
            && d.dst == *addr
            && self.peer_moved == 0
        {
            *sent += d.payload.len() as u64;
        }
        Some(d)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.ep.poll_timeout()
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.ep.handle_timeout(now);
        if std::env::var_os("SIM_TRACE").is_some() {
            let who = if matches!(self.app, App::Client { .. }) {
                "client"
            } else {
                "server"
            };
            eprintln!("{now:?} {who} timeout; next {:?}", self.ep.poll_timeout());
        }
        self.run_app(now);
    }
}

impl Host {
    /// The engine's next datagram (before any NAT).
    fn poll_engine(&mut self, now: Instant) -> Option<Datagram> {
        if std::env::var_os("SIM_TRACE").is_some() {
            let who = if matches!(self.app, App::Client { .. }) {
                "client"
            } else {
                "server"
            };
            if let Some(t) = self.ep.poll_transmit(now) {
                eprintln!(
                    "{now:?} {who} -> {} bytes {} -> {}; next {:?}",
                    t.payload.len(),
                    t.src,
                    t.dst,
                    self.ep.poll_timeout()
                );
                return Some(Datagram {
                    src: t.src,
                    dst: t.dst,
                    payload: t.payload,
                });
            }
            return None;
        }
        self.ep.poll_transmit(now).map(|t| Datagram {
            src: t.src,
            dst: t.dst,
            payload: t.payload,
        })
    }
}

fn seeded_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn seed32(seed: u64, who: u8) -> [u8; 32] {
    let mut s = [who; 32];
    s[..8].copy_from_slice(&seed.to_be_bytes());
    s
}

struct Outcome {
    sent: Vec<u8>,
    echo: Vec<u8>,
    client_closed: Option<CloseReason>,
    server_closed: Option<CloseReason>,
    steps: u64,
    client_moved: u32,
    server_saw_move: u32,
    server_moved: u32,
    client_saw_move: u32,
    /// Path validations each end started (a peer seen at an address it did not move to by
    /// RSYN).
    validations: [u64; 2],
    /// What the server sent to the client's new public address, and received from it, until
    /// it moved there.
    unvalidated: Option<(u64, u64)>,
}

/// One run: `link` both ways, or from the server to the client `back` if given (asymmetric).
fn run(seed: u64, link: LinkConfig, back: Option<LinkConfig>, len: usize, moves: Move) -> Outcome {
    let migrate = matches!(
        moves,
        Move::Client | Move::ClientTwice | Move::ClientBreak | Move::Both
    );
    let rebind = matches!(moves, Move::Rebind { .. });
    let (nat1, nat2): (Locator, Locator) = (NAT1.parse().unwrap(), NAT2.parse().unwrap());
    let third_loc: Locator = CLIENT_THIRD.parse().unwrap();
    let server_new: Locator = SERVER_NEW.parse().unwrap();
    let service = ServiceId::from_name("echo.example.com").unwrap();
    let client_loc: Locator = CLIENT.parse().unwrap();
    let new_loc: Locator = CLIENT_NEW.parse().unwrap();
    let server_loc: Locator = SERVER.parse().unwrap();

    // Under 30% loss each way a handshake attempt fails half the time: give the control
    // channel more retransmissions than the default so the sweep tests data integrity, not the
    // give-up policy.
    let mut config = EndpointConfig::default();
    config.control.retries = 10;
    let server_table = Arc::new(ServiceTable::new());
    let mut server_ep = Endpoint::new(
        config.clone(),
        seed32(seed, 2),
        server_table,
        vec![server_loc],
    );
    server_ep.listen(ServicePrefix::exact(service), 0, 1);
    if moves == Move::Both {
        server_ep.add_local(server_new);
    }

    // Behind a NAT that may rebind, a client that only receives must not stay silent: if its
    // last packets before the rebinding are lost, nothing tells the server where it went, and
    // the server's data goes to the dead mapping until both ends time out (seed 871 of
    // `rebind-loss20` without this). As with QUIC, a keepalive is the client's remedy.
    if rebind {
        config.transport.keepalive = Some(Duration::from_secs(1));
    }
    let mut client_ep = Endpoint::new(
        config,
        seed32(seed, 1),
        Arc::new(ServiceTable::new()),
        vec![client_loc],
    );
    if migrate {
        client_ep.add_local(new_loc);
    }
    if moves == Move::ClientTwice {
        client_ep.add_local(third_loc);
    }
    let plan = match moves {
        Move::Client | Move::ClientBreak => vec![(len / 3, new_loc)],
        Move::ClientTwice => vec![(len / 3, new_loc), (2 * len / 3, third_loc)],
        Move::Nobody | Move::Both | Move::Rebind { .. } => Vec::new(),
    };
    let sent = seeded_bytes(seed, len);
    let client = Host {
        ep: client_ep,
        app: App::Client {
            service,
            via: server_loc,
            conn: None,
            data: sent.clone(),
            written: 0,
            finished: false,
            echo: Vec::new(),
            eof: false,
            migrate_at: plan.clone(),
            migrated: 0,
            hold_finish: moves == Move::ClientTwice,
        },
        closed: None,
        connected: false,
        failed: None,
        moved: 0,
        peer_moved: 0,
        nat: rebind.then(|| Nat {
            inner: client_loc,
            public: nat1,
            alive: vec![nat1],
        }),
        watch: None,
    };
    let server = Host {
        ep: server_ep,
        app: App::Server {
            conn: None,
            pending: Vec::new(),
            eof: false,
            finished: false,
        },
        closed: None,
        connected: false,
        failed: None,
        moved: 0,
        peer_moved: 0,
        nat: None,
        // The server watches what it sends to the client's next public address.
        watch: rebind.then_some((nat2, 0, 0)),
    };
    let mut net = Network::new(seed, link);
    let c: NodeId = net.add_node(client, &[if rebind { nat1 } else { client_loc }]);
    let s: NodeId = net.add_node(server, &[server_loc]);
    if let Some(back) = back {
        net.set_link(s, c, back);
    }
    if migrate {
        net.add_address(c, new_loc);
    }
    if moves == Move::ClientTwice {
        net.add_address(c, third_loc);
    }
    if moves == Move::Both {
        net.add_address(s, server_new);
    }
    let mut old_removed = false;
    // The client's address in use; the moves of `plan` done.
    let mut client_addr = client_loc;
    let mut moves_done = 0;
    let mut both_started = false;
    let mut rebound = false;
    let mut steps = 0;
    let budget = 2_000_000;
    while steps < budget {
        let done = net.node(c).closed.is_some() && net.node(s).closed.is_some();
        if done || net.node(c).failed.is_some() {
            break;
        }
        // Once the client has moved, its old address disappears from the network and the
        // endpoint.
        if matches!(moves, Move::Client | Move::ClientTwice)
            && let Some(&(_, to)) = plan.get(moves_done)
            && net.node(c).ep.locators(ConnectionHandle(0)).map(|l| l.0) == Some(to)
        {
            net.remove_address(&client_addr);
            net.node_mut(c).ep.remove_local(&client_addr);
            client_addr = to;
            moves_done += 1;
        }
        // Break-before-make: the address vanishes first, then the client moves (the move
        // starts in the same instant, as the application reacts to the address going).
        if moves == Move::ClientBreak
            && !old_removed
            && let App::Client { echo, .. } = &net.node(c).app
            && echo.len() >= len / 3
        {
            net.remove_address(&client_loc);
            net.node_mut(c).ep.remove_local(&client_loc);
            old_removed = true;
        }
        if moves == Move::Both {
            let echoed = match &net.node(c).app {
                App::Client { echo, .. } => echo.len(),
                App::Server { .. } => 0,
            };
            let server_conn = match &net.node(s).app {
                App::Server { conn, .. } => *conn,
                App::Client { .. } => None,
            };
            if !both_started
                && echoed >= len / 3
                && let Some(sh) = server_conn
            {
                // Both RSYNs leave in the same instant, each to the other's old locator.
                let a = net.node_mut(c).ep.migrate(ConnectionHandle(0), new_loc);
                let b = net.node_mut(s).ep.migrate(sh, server_new);
                assert!(a && b, "seed {seed}: migrate refused");
                both_started = true;
            }
            if both_started && !old_removed && net.node(c).moved == 1 && net.node(s).moved == 1 {
                net.remove_address(&client_loc);
                net.remove_address(&server_loc);
                old_removed = true;
            }
        }
        // The NAT's mapping changes under the client.
        if let Move::Rebind { keep_old } = moves
            && !rebound
            && let App::Client { echo, .. } = &net.node(c).app
            && echo.len() >= len / 3
        {
            net.add_address(c, nat2);
            if !keep_old {
                net.remove_address(&nat1);
            }
            let nat = net.node_mut(c).nat.as_mut().unwrap();
            nat.public = nat2;
            if !keep_old {
                nat.alive.clear();
            }
            nat.alive.push(nat2);
            rebound = true;
        }
        if !net.step() {
            break;
        }
        steps += 1;
    }
    if std::env::var_os("SIM_TRACE").is_some() {
        eprintln!("network: {:?}, now {:?}", net.stats(), net.now());
    }
    assert!(
        steps < budget,
        "seed {seed}: step budget exhausted (livelock?)"
    );
    let echo = match &net.node(c).app {
        App::Client { echo, .. } => echo.clone(),
        App::Server { .. } => unreachable!(),
    };
    if let Some(f) = &net.node(c).failed {
        panic!("seed {seed}: connect failed: {f}");
    }
    Outcome {
        sent,
        echo,
        client_closed: net.node(c).closed.clone(),
        server_closed: net.node(s).closed.clone(),
        steps,
        client_moved: net.node(c).moved,
        server_saw_move: net.node(s).peer_moved,
        server_moved: net.node(s).moved,
        client_saw_move: net.node(c).peer_moved,
        validations: [
            net.node(c).ep.stats().paths.started,
            net.node(s).ep.stats().paths.started,
        ],
        unvalidated: net
            .node(s)
            .watch
            .map(|(_, sent, received)| (sent, received)),
    }
}

/// The seeds to run: `0..default`, or `0..SERVAL_SIM_SEEDS`, or just `SERVAL_SIM_SEED` to replay
/// one failing seed (with `SIM_TRACE=1` to print every event).
fn seeds(default: u64) -> std::ops::Range<u64> {
    let var = |name| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    match (var("SERVAL_SIM_SEED"), var("SERVAL_SIM_SEEDS")) {
        (Some(one), _) => one..one + 1,
        (None, Some(n)) => 0..n,
        (None, None) => 0..default,
    }
}

fn check(name: &str, link: LinkConfig, len: usize, moves: Move, seeds: std::ops::Range<u64>) {
    check_with(name, link, None, len, moves, seeds);
}

/// [`check`] with a different link from the server to the client (`back`).
fn check_with(
    name: &str,
    link: LinkConfig,
    back: Option<LinkConfig>,
    len: usize,
    moves: Move,
    seeds: impl Iterator<Item = u64> + Clone,
) {
    let mut max_steps = 0;
    let mut followed = 0;
    // Bytes the server sent to unvalidated addresses, over all seeds (the watch works).
    let mut unvalidated_sent = 0;
    let n = seeds.clone().count();
    for seed in seeds {
        let o = run(seed, link.clone(), back.clone(), len, moves);
        assert_eq!(o.echo.len(), o.sent.len(), "{name} seed {seed}: length");
        assert!(o.echo == o.sent, "{name} seed {seed}: bytes differ");
        assert_eq!(
            o.client_closed,
            Some(CloseReason::Finished),
            "{name} seed {seed}: client close"
        );
        assert_eq!(
            o.server_closed,
            Some(CloseReason::Finished),
            "{name} seed {seed}: server close"
        );
        if moves == Move::Both {
            assert_eq!(
                o.server_moved, 1,
                "{name} seed {seed}: server did not migrate"
            );
            assert!(
                o.client_saw_move >= 1,
                "{name} seed {seed}: client saw no migration"
            );
        }
        if let Move::Rebind { keep_old } = moves {
            assert_eq!(o.client_moved, 0, "{name} seed {seed}: the client moved");
            // With the old mapping gone the transfer cannot end unless the server followed;
            // with it alive, the transfer may end on the old path before a validation
            // succeeds (its challenges or answers lost): counted below instead.
            assert!(
                keep_old || o.server_saw_move >= 1,
                "{name} seed {seed}: the server did not follow the client"
            );
            followed += u64::from(o.server_saw_move >= 1);
            // No amplification towards the address before it was validated.
            let (sent, received) = o.unvalidated.unwrap_or_default();
            unvalidated_sent += sent;
            assert!(
                sent <= 3 * received,
                "{name} seed {seed}: sent {sent} bytes to the unvalidated address, received {received}"
            );
        } else {
            // Moves by RSYN (and no moves) never look like a new peer address: packets from a
            // mover's old locator, still in flight or sent make-before-break, start nothing.
            assert_eq!(
                o.validations,
                [0, 0],
                "{name} seed {seed}: a path validation started"
            );
        }
        if !matches!(moves, Move::Nobody | Move::Rebind { .. }) {
            let want = if moves == Move::ClientTwice { 2 } else { 1 };
            assert_eq!(
                o.client_moved, want,
                "{name} seed {seed}: client did not migrate"
            );
            assert!(
                o.server_saw_move >= want,
                "{name} seed {seed}: server saw no migration"
            );
        }
        max_steps = max_steps.max(o.steps);
    }
    if moves == (Move::Rebind { keep_old: true }) {
        assert!(
            followed * 10 >= n as u64 * 9,
            "{name}: the server followed the client in only {followed} of {n} seeds"
        );
    }
    if let Move::Rebind { .. } = moves {
        assert!(unvalidated_sent > 0, "{name}: no challenge was ever seen");
        eprintln!(
            "{name}: the server followed the client in {followed} of {n} seeds, sending \
             {unvalidated_sent} bytes to unvalidated addresses in all"
        );
    }
    eprintln!("{name}: {n} seeds ok, at most {max_steps} steps");
}

fn lossy(loss: f64) -> LinkConfig {
    LinkConfig {
        delay: Duration::from_millis(20),
        jitter: Duration::from_millis(5),
        loss,
        duplicate: 0.02,
        reorder: 0.05,
        reorder_delay: Duration::from_millis(15),
        ..LinkConfig::default()
    }
}

#[test]
fn clean_link() {
    check(
        "clean",
        LinkConfig::default(),
        200_000,
        Move::Nobody,
        seeds(20),
    );
}

#[test]
fn ten_percent_loss_with_reordering_and_duplication() {
    check("loss10", lossy(0.10), 100_000, Move::Nobody, seeds(100));
}

#[test]
fn thirty_percent_loss_with_reordering_and_duplication() {
    check("loss30", lossy(0.30), 30_000, Move::Nobody, seeds(100));
}

#[test]
fn migration_in_the_middle() {
    check("migrate", lossy(0.05), 100_000, Move::Client, seeds(100));
}

#[test]
fn migration_under_heavy_loss() {
    check(
        "migrate-loss20",
        lossy(0.20),
        40_000,
        Move::Client,
        seeds(60),
    );
}

#[test]
fn both_ends_migrate_at_once() {
    check("migrate-both", lossy(0.05), 60_000, Move::Both, seeds(60));
}

#[test]
fn bandwidth_limited_bulk() {
    let link = LinkConfig {
        bandwidth: Some(10_000_000),
        queue_bytes: 64 * 1024,
        ..LinkConfig::default()
    };
    check("bandwidth", link, 1_000_000, Move::Nobody, seeds(3));
}

/// Issue 11: seed 5809 of `migrate-loss20` lost all six RSYNs while the old path worked, and
/// the flow died of backoff (the client ignored the server on the old path and the RSYN waited
/// 16 s, then 32 s). Seed 461 failed the first fix (the transfer ended on the old path, the
/// quiet flow let the RSYN back off again). Both, with neighbours, on every `cargo test`.
#[test]
fn issue_11_regression_seeds() {
    check_with(
        "migrate-loss20 (regressions)",
        lossy(0.20),
        None,
        40_000,
        Move::Client,
        [461, 5808, 5809, 5810].into_iter(),
    );
    // Seed 27252 of `migrate-both` (found by a 50 000-seed sweep): the client's RSYN-ACK to
    // the server's new address was lost three times and the server's next RSYN once. The
    // client, following the server, dropped everything from the server's old locator, where
    // the server (moving make-before-break) still spoke, so the server heard nothing, backed
    // its RSYN off and never moved. A packet from the old locator now draws the RSYN-ACK
    // again.
    check_with(
        "migrate-both (regressions)",
        lossy(0.05),
        None,
        60_000,
        Move::Both,
        [27251, 27252, 27253].into_iter(),
    );
}

/// A move under heavy reordering: a fifth of the datagrams overtaken by 40 ms, with jitter
/// and 10% loss, so that RSYN, RSYN-ACK and data on both paths arrive out of order.
#[test]
fn migration_with_loss_and_reordering() {
    let link = LinkConfig {
        jitter: Duration::from_millis(15),
        reorder: 0.20,
        reorder_delay: Duration::from_millis(40),
        ..lossy(0.10)
    };
    check("migrate-reorder", link, 60_000, Move::Client, seeds(60));
}

/// The client moves twice (at a third and two thirds of the echo) under 10% loss.
#[test]
fn client_moves_twice() {
    check(
        "migrate-twice",
        lossy(0.10),
        60_000,
        Move::ClientTwice,
        seeds(60),
    );
}

/// Asymmetric delays: 5 ms from the client, 80 ms (with 30 ms jitter) back, 5% loss each
/// way, and a client move in the middle.
#[test]
fn migration_over_asymmetric_delays() {
    let up = LinkConfig {
        delay: Duration::from_millis(5),
        jitter: Duration::from_millis(2),
        ..lossy(0.05)
    };
    let down = LinkConfig {
        delay: Duration::from_millis(80),
        jitter: Duration::from_millis(30),
        ..lossy(0.05)
    };
    check_with(
        "migrate-asym",
        up,
        Some(down),
        60_000,
        Move::Client,
        seeds(60),
    );
}

/// Break-before-make: the client's address vanishes (network and endpoint) as it moves, so
/// the flow is frozen until the RSYN gets through; 3% loss.
#[test]
fn migration_after_the_old_address_vanished() {
    check(
        "migrate-break",
        lossy(0.03),
        60_000,
        Move::ClientBreak,
        seeds(60),
    );
}

/// Issue 11 item 2: the client's NAT changes its public port once a third of the echo is
/// back, and forgets the old mapping (what the server sends there is lost until it validates
/// the new one); 5% loss, reordering, duplication, data in flight both ways.
#[test]
fn nat_rebinding_with_the_old_mapping_gone() {
    check(
        "rebind",
        lossy(0.05),
        100_000,
        Move::Rebind { keep_old: false },
        seeds(100),
    );
}

/// The rebinding under 20% loss each way: challenges and responses are lost too.
#[test]
fn nat_rebinding_under_heavy_loss() {
    check(
        "rebind-loss20",
        lossy(0.20),
        40_000,
        Move::Rebind { keep_old: false },
        seeds(60),
    );
}

/// A second mapping while the first still delivers (make before break: the old path keeps
/// working until the new one is validated), with heavy reordering.
#[test]
fn nat_rebinding_with_the_old_mapping_alive_and_reordering() {
    let link = LinkConfig {
        jitter: Duration::from_millis(15),
        reorder: 0.20,
        reorder_delay: Duration::from_millis(40),
        ..lossy(0.10)
    };
    check(
        "rebind-keep-reorder",
        link,
        60_000,
        Move::Rebind { keep_old: true },
        seeds(60),
    );
}
