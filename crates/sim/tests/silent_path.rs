//! A receive-only client whose path goes silent (issue 11): the server streams to a client
//! that only reads; the client holds two addresses and its endpoint fails over
//! (`EndpointConfig::path_failover`). Midway, everything to and from the client's first
//! address vanishes (the simulator drops it; the client's engine is not told: the link is
//! "up"). The client's silence probe must notice and the flow move to the second address,
//! every byte arriving once and in order. And the other side of the rule: a server that
//! merely stops writing (the path alive) must not make the client move, and costs it at
//! most one probe per pause; nor must a client whose own host stalls (timers late, arrivals
//! waiting in the socket).
//!
//! `SIM_TRACE=1` prints the endpoints' events.
#![allow(clippy::unwrap_used)] // test harness: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use serval_engine::Instant;
use serval_engine::endpoint::{CloseReason, ConnectionHandle, Endpoint, EndpointConfig, Event};
use serval_sim::{Datagram, LinkConfig, Network, Node, NodeId};
use serval_table::ServiceTable;
use serval_wire::{Locator, ServiceId, ServicePrefix};

const CLIENT1: &str = "10.0.1.1:54324";
const CLIENT2: &str = "10.0.2.1:54324";
const SERVER: &str = "10.0.0.2:54324";
const STEPS: u64 = 2_000_000;

/// What the node's application does.
enum App {
    /// Connects, reads everything, never writes; finishes its own direction at the end.
    Reader {
        service: ServiceId,
        conn: Option<ConnectionHandle>,
        got: Vec<u8>,
        eof: bool,
        finished: bool,
    },
    /// Accepts one connection and writes `data[..]` in `bursts`: burst `i` (its bytes up to
    /// `bursts[i].1`) is released at `bursts[i].0`; finishes after the last one if `finish`.
    Writer {
        conn: Option<ConnectionHandle>,
        data: Vec<u8>,
        written: usize,
        bursts: Vec<(Instant, usize)>,
        finish: bool,
        finished: bool,
        got_eof: bool,
    },
}

struct Host {
    name: &'static str,
    ep: Endpoint,
    app: App,
    connected: bool,
    closed: Option<CloseReason>,
    moved: u32,
    /// The last instant the node ran at.
    clock: Instant,
    /// A stretch of time the host is descheduled, if one is planned.
    stall: Option<Stall>,
}

/// The host does nothing from `from` until `until` (a busy machine, a descheduled process):
/// it sends nothing, its timers fire late, and what arrives waits in its socket. On waking
/// its timers run first and the socket is read [`READ_LAG`] later, as when a runtime's timer
/// task gets the engine before its receive task.
struct Stall {
    until: Instant,
    backlog: Vec<Datagram>,
}

/// How long after its timers a woken host reads what waited in its socket.
const READ_LAG: Duration = Duration::from_millis(1);

impl Host {
    fn conn(&self) -> Option<ConnectionHandle> {
        match &self.app {
            App::Reader { conn, .. } | App::Writer { conn, .. } => *conn,
        }
    }

    fn run_app(&mut self, now: Instant) {
        self.clock = now;
        while let Some(ev) = self.ep.poll_event() {
            if std::env::var_os("SIM_TRACE").is_some() {
                eprintln!("{now:?} {} {ev:?}", self.name);
            }
            match ev {
                Event::Connected(_) => self.connected = true,
                Event::Incoming(l) => {
                    if let App::Writer { conn, .. } = &mut self.app {
                        *conn = self.ep.accept(l);
                        self.connected = conn.is_some();
                    }
                }
                Event::Closed(h, r) if Some(h) == self.conn() => self.closed = Some(r),
                Event::Migrated(..) => self.moved += 1,
                _ => {}
            }
        }
        if self.closed.is_some() {
            return;
        }
        let mut buf = [0u8; 4096];
        match &mut self.app {
            App::Reader {
                service,
                conn,
                got,
                eof,
                finished,
            } => {
                let Some(h) = *conn else {
                    let via: Locator = SERVER.parse().unwrap();
                    *conn = Some(self.ep.connect_via(now, *service, via).unwrap());
                    return;
                };
                if !self.connected {
                    return;
                }
                while let Ok(Some(n)) = self.ep.read(h, &mut buf) {
                    if n == 0 {
                        *eof = true;
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                if *eof && !*finished && self.ep.finish(h).is_ok() {
                    *finished = true;
                }
            }
            App::Writer {
                conn,
                data,
                written,
                bursts,
                finish,
                finished,
                got_eof,
            } => {
                let Some(h) = *conn else { return };
                let allowed = bursts
                    .iter()
                    .filter(|(at, _)| *at <= now)
                    .map(|&(_, upto)| upto)
                    .max()
                    .unwrap_or(0);
                while *written < allowed {
                    match self.ep.write(h, &data[*written..allowed]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => *written += n,
                    }
                }
                let all = bursts.iter().all(|(at, _)| *at <= now);
                if *finish
                    && all
                    && *written == data.len()
                    && !*finished
                    && self.ep.finish(h).is_ok()
                {
                    *finished = true;
                }
                while let Ok(Some(n)) = self.ep.read(h, &mut buf) {
                    if n == 0 {
                        *got_eof = true;
                        break;
                    }
                }
            }
        }
    }
}

impl Node for Host {
    fn handle_datagram(&mut self, now: Instant, d: Datagram) {
        if let Some(s) = &mut self.stall
            && now < s.until + READ_LAG
        {
            s.backlog.push(d);
            return;
        }
        self.ep.handle_datagram(now, d.dst, d.src, &d.payload);
        self.run_app(now);
    }
    fn poll_transmit(&mut self, now: Instant) -> Option<Datagram> {
        if self.stall.as_ref().is_some_and(|s| now < s.until) {
            self.clock = now;
            return None;
        }
        self.run_app(now);
        self.ep.poll_transmit(now).map(|t| Datagram {
            src: t.src,
            dst: t.dst,
            payload: t.payload,
        })
    }
    fn poll_timeout(&self) -> Option<Instant> {
        // The writer's next burst.
        let burst = match &self.app {
            App::Writer { bursts, .. } => {
                bursts.iter().map(|b| b.0).filter(|&t| t > self.clock).min()
            }
            App::Reader { .. } => None,
        };
        let next = [self.ep.poll_timeout(), burst].into_iter().flatten().min();
        match &self.stall {
            // Asleep: nothing runs before it wakes.
            Some(s) if self.clock < s.until => Some(next.map_or(s.until, |t| t.max(s.until))),
            // Awake, the socket not read yet.
            Some(s) => Some(next.map_or(s.until + READ_LAG, |t| t.min(s.until + READ_LAG))),
            None => next,
        }
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.clock = now;
        if let Some(s) = &self.stall {
            if now < s.until {
                return;
            }
            if now >= s.until + READ_LAG {
                let backlog = self.stall.take().map(|s| s.backlog).unwrap_or_default();
                for d in backlog {
                    self.ep.handle_datagram(now, d.dst, d.src, &d.payload);
                }
            }
        }
        self.ep.handle_timeout(now);
        self.run_app(now);
    }
}

fn seed32(seed: u64, who: u8) -> [u8; 32] {
    let mut s = [who; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s
}

fn seeded_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// A client endpoint holding both addresses, failing over, and a server streaming `data` in
/// `bursts`.
fn setup(
    seed: u64,
    link: LinkConfig,
    data: Vec<u8>,
    bursts: Vec<(Instant, usize)>,
    finish: bool,
) -> (Network<Host>, NodeId, NodeId) {
    let service = ServiceId::from_name("silent.sim").unwrap();
    let (c1, c2): (Locator, Locator) = (CLIENT1.parse().unwrap(), CLIENT2.parse().unwrap());
    let server_loc: Locator = SERVER.parse().unwrap();
    let mut config = EndpointConfig::default();
    config.transport.idle_timeout = Duration::from_secs(120);
    let mut server = Endpoint::new(
        config.clone(),
        seed32(seed, 2),
        Arc::new(ServiceTable::new()),
        vec![server_loc],
    );
    server.listen(ServicePrefix::exact(service), 0, 1);
    config.path_failover = true;
    let client = Endpoint::new(
        config,
        seed32(seed, 1),
        Arc::new(ServiceTable::new()),
        vec![c1, c2],
    );
    let mut net = Network::new(seed, link);
    let server = net.add_node(
        Host {
            name: "server",
            ep: server,
            app: App::Writer {
                conn: None,
                data,
                written: 0,
                bursts,
                finish,
                finished: false,
                got_eof: false,
            },
            connected: false,
            closed: None,
            moved: 0,
            clock: Instant::ZERO,
            stall: None,
        },
        &[server_loc],
    );
    let client = net.add_node(
        Host {
            name: "client",
            ep: client,
            app: App::Reader {
                service,
                conn: None,
                got: Vec::new(),
                eof: false,
                finished: false,
            },
            connected: false,
            closed: None,
            moved: 0,
            clock: Instant::ZERO,
            stall: None,
        },
        &[c1, c2],
    );
    (net, client, server)
}

fn received(net: &Network<Host>, client: NodeId) -> &[u8] {
    match &net.node(client).app {
        App::Reader { got, .. } => got,
        App::Writer { .. } => &[],
    }
}

fn link(seed: u64) -> LinkConfig {
    LinkConfig {
        delay: Duration::from_millis(5 + seed % 20),
        jitter: Duration::from_millis(seed % 3),
        loss: if seed.is_multiple_of(2) { 0.0 } else { 0.01 },
        ..LinkConfig::default()
    }
}

#[test]
fn a_receive_only_client_moves_off_a_silent_path_and_every_byte_arrives() {
    for seed in 0..24u64 {
        let len = 600_000;
        let data = seeded_bytes(seed, len);
        let (mut net, client, server) = setup(
            seed,
            link(seed),
            data.clone(),
            vec![(Instant::ZERO, len)],
            true,
        );
        // Let a third arrive, then silence the client's first address both ways.
        net.run_until(STEPS, |n| received(n, client).len() >= len / 3)
            .unwrap_or_else(|e| panic!("seed {seed}: {e:?}"));
        let c1: Locator = CLIENT1.parse().unwrap();
        net.remove_address(&c1);
        let silent_at = net.now();
        net.run_until(STEPS, |n| {
            n.node(client).closed.is_some() && n.node(server).closed.is_some()
        })
        .unwrap_or_else(|e| panic!("seed {seed}: {e:?}"));
        let (c, s) = (net.node(client), net.node(server));
        assert_eq!(c.closed, Some(CloseReason::Finished), "seed {seed}");
        assert_eq!(s.closed, Some(CloseReason::Finished), "seed {seed}");
        assert!(
            received(&net, client) == &data[..],
            "seed {seed}: bytes differ"
        );
        assert!(c.moved >= 1, "seed {seed}: never moved");
        let stats = c.ep.stats();
        assert!(stats.path_failovers >= 1, "seed {seed}: {stats:?}");
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!(
                "seed {seed}: silent at {silent_at:?}, done at {:?}",
                net.now()
            );
        }
    }
}

#[test]
fn a_server_that_pauses_does_not_move_the_client_and_costs_one_probe_per_pause() {
    for seed in 0..8u64 {
        // Five bursts of 100 kB, ten seconds apart; the stream stays open throughout.
        let len = 500_000;
        let data = seeded_bytes(seed, len);
        let at = |s: u64| Instant::ZERO + Duration::from_secs(s);
        let mut bursts: Vec<_> = (0..5u64)
            .map(|i| (at(10 * i), 100_000 * (i as usize + 1)))
            .collect();
        // Nothing more, but a timer at the end of the run (the network stops there).
        bursts.push((at(70), len));
        let clean = LinkConfig {
            loss: 0.0,
            ..link(seed)
        };
        let (mut net, client, _server) = setup(seed, clean, data.clone(), bursts, false);
        net.run_until(STEPS, |n| n.now() >= at(70))
            .unwrap_or_else(|e| panic!("seed {seed}: {e:?}"));
        let c = net.node(client);
        assert!(
            received(&net, client) == &data[..],
            "seed {seed}: bytes differ"
        );
        assert_eq!(c.moved, 0, "seed {seed}");
        assert_eq!(c.closed, None, "seed {seed}");
        let h = c.conn().unwrap();
        let t = c.ep.connection_stats(h).unwrap();
        assert_eq!(c.ep.stats().path_failovers, 0, "seed {seed}");
        // One probe after each burst, each answered at once: no probe timeout.
        assert_eq!(t.silence_probes, 5, "seed {seed}: {t:?}");
        assert_eq!(t.probe_timeouts, 0, "seed {seed}: {t:?}");
    }
}

#[test]
fn a_client_whose_host_stalls_does_not_move_off_a_live_path() {
    for seed in 0..12u64 {
        let len = 600_000;
        let data = seeded_bytes(seed, len);
        let (mut net, client, server) = setup(
            seed,
            link(seed),
            data.clone(),
            vec![(Instant::ZERO, len)],
            true,
        );
        net.run_until(STEPS, |n| received(n, client).len() >= len / 3)
            .unwrap_or_else(|e| panic!("seed {seed}: {e:?}"));
        // The client's host stalls for a second mid-stream; the path stays alive.
        let until = net.now() + Duration::from_secs(1);
        net.node_mut(client).stall = Some(Stall {
            until,
            backlog: Vec::new(),
        });
        net.run_until(STEPS, |n| {
            n.node(client).closed.is_some() && n.node(server).closed.is_some()
        })
        .unwrap_or_else(|e| panic!("seed {seed}: {e:?}"));
        let (c, s) = (net.node(client), net.node(server));
        assert!(
            received(&net, client) == &data[..],
            "seed {seed}: bytes differ"
        );
        assert_eq!(c.moved, 0, "seed {seed}: moved off a live path");
        assert_eq!(c.ep.stats().path_failovers, 0, "seed {seed}");
        assert_eq!(c.closed, Some(CloseReason::Finished), "seed {seed}");
        assert_eq!(s.closed, Some(CloseReason::Finished), "seed {seed}");
    }
}
