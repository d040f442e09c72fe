//! A flow whose peer's address changes under it (issue 11 item 2, docs/protocol.md §4.2): a
//! client behind a NAT whose mapping changes mid-transfer, with the old mapping dead or still
//! alive; an attacker who copies or replays genuine packets from an address of its own; a
//! packet reordered from the old address after the move. Real endpoints, explicit virtual
//! time, a NAT in front of the client that this harness plays.
#![allow(clippy::unwrap_used)] // test harness

mod support;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Duration;

use serval_engine::Instant;
use serval_engine::endpoint::{ConnectionHandle, Endpoint, Event, PathStats, Transmit};
use serval_wire::{Locator, ServicePrefix};
use support::{A, B, drain, endpoint, loc, svc};

/// The client's address as the NAT first maps it, then after the rebinding.
const NAT1: &str = "192.0.2.7:40000";
const NAT2: &str = "192.0.2.7:40001";
/// An attacker's address.
const EVIL: &str = "198.51.100.66:6666";

/// One-way delay of the harness's links.
const DELAY: Duration = Duration::from_millis(10);

/// Which way a datagram travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Client to server (after the NAT rewrote its source).
    Up,
    /// Server to client (before the NAT maps it back).
    Down,
}

/// What the harness does with a datagram on the wire.
enum Fate {
    Deliver,
    Drop,
    /// Deliver it `Duration` later than the link would.
    Delay(Duration),
}

struct World {
    c: Endpoint,
    s: Endpoint,
    ch: ConnectionHandle,
    sh: ConnectionHandle,
    now: Instant,
    /// In flight: (arrival, sequence) -> (direction, datagram as it arrives).
    wire: BTreeMap<(Instant, u64), (Dir, Transmit)>,
    seq: u64,
    /// The NAT's current public address for the client, and the older mappings that still
    /// deliver to it.
    public: Locator,
    alive: Vec<Locator>,
    /// Every datagram the server sent or received, as the server saw it: (time, sent, datagram).
    server_log: Vec<(Instant, bool, Transmit)>,
    /// The server's events, as they came.
    server_events: Vec<(Instant, Event)>,
    /// Datagrams that reached a dead mapping.
    dead_drops: u64,
}

impl World {
    /// A client at A (behind the NAT, public address NAT1) connected to a server at B.
    fn new() -> World {
        let mut c = endpoint(A, 1);
        let mut s = endpoint(B, 2);
        let l = s.listen(ServicePrefix::exact(svc("echo.test")), 0, 1);
        let ch = c
            .connect_via(Instant::ZERO, svc("echo.test"), loc(B))
            .unwrap();
        let mut w = World {
            c,
            s,
            ch,
            sh: ConnectionHandle(u64::MAX),
            now: Instant::ZERO,
            wire: BTreeMap::new(),
            seq: 0,
            public: loc(NAT1),
            alive: vec![loc(NAT1)],
            server_log: Vec::new(),
            server_events: Vec::new(),
            dead_drops: 0,
        };
        let until = w.now + Duration::from_secs(2);
        let mut accepted = None;
        w.run(until, &mut |_, _| Fate::Deliver, &mut |w| {
            accepted = accepted.or_else(|| w.s.accept(l));
            accepted.is_some()
        });
        w.sh = accepted.expect("the handshake completed");
        assert_eq!(w.s.locators(w.sh).unwrap().1, loc(NAT1));
        w
    }

    /// The NAT forgets the current mapping and maps the client to `public` from now on;
    /// `keep_old`: the old mapping still delivers (a second mapping, not a replacement).
    fn rebind(&mut self, public: &str, keep_old: bool) {
        if !keep_old {
            self.alive.clear();
        }
        self.public = loc(public);
        self.alive.push(self.public);
    }

    fn put(&mut self, at: Instant, dir: Dir, t: Transmit) {
        self.seq += 1;
        self.wire.insert((at, self.seq), (dir, t));
    }

    /// Everything both ends want to send now, through `fate`, onto the wire.
    fn flush(&mut self, fate: &mut dyn FnMut(Dir, &Transmit) -> Fate) {
        let now = self.now;
        for mut t in drain(&mut self.c, now) {
            // The NAT rewrites the client's source.
            t.src = self.public;
            match fate(Dir::Up, &t) {
                Fate::Deliver => self.put(now + DELAY, Dir::Up, t),
                Fate::Delay(d) => self.put(now + DELAY + d, Dir::Up, t),
                Fate::Drop => {}
            }
        }
        for t in drain(&mut self.s, now) {
            self.server_log.push((now, true, t.clone()));
            match fate(Dir::Down, &t) {
                Fate::Deliver => self.put(now + DELAY, Dir::Down, t),
                Fate::Delay(d) => self.put(now + DELAY + d, Dir::Down, t),
                Fate::Drop => {}
            }
        }
        while let Some(e) = self.s.poll_event() {
            self.server_events.push((now, e));
        }
    }

    /// Runs until `until` or until `done` holds, delivering per `fate`.
    fn run(
        &mut self,
        until: Instant,
        fate: &mut dyn FnMut(Dir, &Transmit) -> Fate,
        done: &mut dyn FnMut(&mut World) -> bool,
    ) {
        for _ in 0..2_000_000 {
            self.flush(fate);
            if done(self) {
                return;
            }
            let next_wire = self.wire.keys().next().map(|k| k.0);
            let next = [next_wire, self.c.poll_timeout(), self.s.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            let Some(next) = next.filter(|&t| t <= until) else {
                self.now = until;
                return;
            };
            self.now = self.now.max(next);
            let now = self.now;
            while let Some(entry) = self.wire.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let (dir, t) = entry.remove();
                match dir {
                    Dir::Up => {
                        self.server_log.push((now, false, t.clone()));
                        self.s.handle_datagram(now, t.dst, t.src, &t.payload);
                    }
                    Dir::Down => {
                        if self.alive.contains(&t.dst) {
                            self.c.handle_datagram(now, loc(A), t.src, &t.payload);
                        } else {
                            self.dead_drops += 1;
                        }
                    }
                }
            }
            self.c.handle_timeout(now);
            self.s.handle_timeout(now);
        }
        panic!("the run did not settle");
    }

    fn server_paths(&self) -> PathStats {
        self.s.path_stats(self.sh).unwrap()
    }

    /// Bytes the server sent to `to`, and received from it, up to (and not after) `until`.
    fn bytes_with(&self, to: Locator, until: Instant) -> (u64, u64) {
        let mut sent = 0;
        let mut received = 0;
        for (at, out, t) in &self.server_log {
            if *at > until {
                continue;
            }
            let n = t.payload.len() as u64;
            match (*out, t.dst == to, t.src == to) {
                (true, true, _) => sent += n,
                (false, _, true) => received += n,
                _ => {}
            }
        }
        (sent, received)
    }

    /// When the server saw its peer move to `to`.
    fn peer_moved_at(&self, to: Locator) -> Option<Instant> {
        self.server_events
            .iter()
            .find(|(_, e)| *e == Event::PeerMigrated(self.sh, to))
            .map(|(at, _)| *at)
    }
}

/// Bytes of a test stream.
fn bytes(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A transfer both ways at once: the client sends `up`, the server `down`, each reads the
/// other's, rebinding the NAT (`rebind`) once the server has received `at` bytes.
struct Transfer {
    up: Vec<u8>,
    down: Vec<u8>,
    up_written: usize,
    down_written: usize,
    got_up: Vec<u8>,
    got_down: Vec<u8>,
}

impl Transfer {
    fn new(len: usize) -> Transfer {
        Transfer {
            up: bytes(1, len),
            down: bytes(2, len),
            up_written: 0,
            down_written: 0,
            got_up: Vec::new(),
            got_down: Vec::new(),
        }
    }

    /// Writes and reads what it can; whether both directions are complete.
    fn pump(&mut self, w: &mut World) -> bool {
        let mut buf = vec![0u8; 1 << 16];
        if self.up_written < self.up.len() {
            self.up_written += w.c.write(w.ch, &self.up[self.up_written..]).unwrap_or(0);
        }
        if self.down_written < self.down.len() {
            self.down_written +=
                w.s.write(w.sh, &self.down[self.down_written..])
                    .unwrap_or(0);
        }
        while let Ok(Some(n)) = w.s.read(w.sh, &mut buf) {
            if n == 0 {
                break;
            }
            self.got_up.extend_from_slice(&buf[..n]);
        }
        while let Ok(Some(n)) = w.c.read(w.ch, &mut buf) {
            if n == 0 {
                break;
            }
            self.got_down.extend_from_slice(&buf[..n]);
        }
        self.got_up.len() >= self.up.len() && self.got_down.len() >= self.down.len()
    }

    fn assert_exact(&self) {
        assert_eq!(self.got_up.len(), self.up.len(), "upstream length");
        assert!(self.got_up == self.up, "upstream bytes differ");
        assert_eq!(self.got_down.len(), self.down.len(), "downstream length");
        assert!(self.got_down == self.down, "downstream bytes differ");
    }
}

/// Runs a transfer of `len` bytes each way, rebinding the NAT to NAT2 once the server has
/// `len / 3` bytes; returns the world afterwards and when the rebinding happened.
fn rebinding_transfer(len: usize, keep_old: bool) -> (World, Transfer, Instant) {
    let mut w = World::new();
    let mut x = Transfer::new(len);
    let mut rebound = None;
    let until = w.now + Duration::from_secs(60);
    w.run(until, &mut |_, _| Fate::Deliver, &mut |w| {
        let done = x.pump(w);
        if rebound.is_none() && x.got_up.len() >= len / 3 {
            w.rebind(NAT2, keep_old);
            rebound = Some(w.now);
        }
        done
    });
    x.assert_exact();
    (w, x, rebound.unwrap())
}

#[test]
fn a_nat_rebinding_mid_transfer_moves_the_flow_once_the_new_address_answers() {
    let (w, _, rebound) = rebinding_transfer(600_000, false);
    // The old mapping died: what the server sent there until the move was lost.
    assert!(w.dead_drops > 0);
    let moved = w
        .peer_moved_at(loc(NAT2))
        .expect("the server followed the client");
    assert!(moved > rebound);
    assert_eq!(w.s.locators(w.sh).unwrap().1, loc(NAT2));
    // The client itself did not move: its own locators are unchanged.
    assert_eq!(w.c.locators(w.ch).unwrap(), (loc(A), loc(B)));
    let p = w.server_paths();
    assert_eq!((p.started, p.validated, p.failed), (1, 1, 0), "{p:?}");
    assert!(p.challenges_sent >= 1);
    // No amplification: until the move, the server sent the new address at most three times
    // what it received from there — and only challenges.
    let before = moved - Duration::from_nanos(1);
    let (sent, received) = w.bytes_with(loc(NAT2), before);
    assert!(
        sent > 0 && sent <= 3 * received,
        "sent {sent}, received {received}"
    );
    assert_eq!(sent, p.unvalidated_bytes_sent);
    assert_eq!(w.s.stats().paths, p);
}

/// A NAT rebinding changes the client's port, not its address: the server keeps its
/// congestion window and RTT (the path is the same) instead of starting over from the
/// initial window and the 333 ms guess.
#[test]
fn a_port_only_rebinding_keeps_the_congestion_state() {
    let mut w = World::new();
    let mut x = Transfer::new(2_000_000);
    let mut rebound = false;
    let mut before = None;
    let mut after = None;
    let until = w.now + Duration::from_secs(60);
    w.run(until, &mut |_, _| Fate::Deliver, &mut |w| {
        let done = x.pump(w);
        let stats = w.s.connection_stats(w.sh).unwrap();
        if w.s.locators(w.sh).unwrap().1 == loc(NAT1) {
            before = Some(stats);
        } else if after.is_none() {
            after = Some(stats);
        }
        if !rebound && x.got_up.len() >= 600_000 {
            w.rebind(NAT2, false);
            rebound = true;
        }
        done
    });
    x.assert_exact();
    let (before, after) = (
        before.unwrap(),
        after.expect("the server followed the client"),
    );
    assert!(
        after.cwnd >= before.cwnd / 2 && after.cwnd > 4 * 12_000,
        "cwnd {} before the move, {} after",
        before.cwnd,
        after.cwnd
    );
    assert_eq!(after.srtt, before.srtt);
}

#[test]
fn with_the_old_mapping_alive_the_flow_moves_too_and_nothing_is_lost() {
    let (w, _, _) = rebinding_transfer(400_000, true);
    assert_eq!(w.dead_drops, 0);
    assert_eq!(w.s.locators(w.sh).unwrap().1, loc(NAT2));
    let p = w.server_paths();
    assert_eq!((p.started, p.validated, p.failed), (1, 1, 0), "{p:?}");
}

#[test]
fn a_lost_challenge_is_sent_again_and_the_move_completes() {
    let mut w = World::new();
    let mut x = Transfer::new(300_000);
    let mut rebound = false;
    // The first two challenges (the server's first two packets to NAT2) are lost.
    let mut to_new = 0;
    let mut fate = |d: Dir, t: &Transmit| {
        if d == Dir::Down && t.dst == loc(NAT2) {
            to_new += 1;
            if to_new <= 2 {
                return Fate::Drop;
            }
        }
        Fate::Deliver
    };
    let until = w.now + Duration::from_secs(60);
    w.run(until, &mut fate, &mut |w| {
        let done = x.pump(w);
        if !rebound && x.got_up.len() >= 100_000 {
            w.rebind(NAT2, false);
            rebound = true;
        }
        done
    });
    x.assert_exact();
    let p = w.server_paths();
    assert_eq!((p.validated, p.failed), (1, 0), "{p:?}");
    assert!(p.challenges_sent >= 3, "{p:?}");
}

/// A genuine packet replayed from an attacker's address is refused by the replay window: no
/// challenge, no move. A genuine packet the attacker *copies* and gets there first (it
/// holds back the original) opens, so its data is taken and a challenge goes to the
/// attacker — who cannot answer it: the flow stays on its path, the attacker received at
/// most three times what it sent, and the transfer goes on.
#[test]
fn an_attacker_replaying_or_racing_genuine_packets_cannot_move_the_flow() {
    let mut w = World::new();
    let mut x = Transfer::new(200_000);
    let until = w.now + Duration::from_secs(60);
    w.run(until, &mut |_, _| Fate::Deliver, &mut |w| {
        x.pump(w);
        x.got_up.len() >= 50_000
    });
    // A genuine packet that arrived: replayed from the attacker's address.
    let genuine = w
        .server_log
        .iter()
        .rev()
        .find(|(_, sent, t)| !sent && t.payload.len() > 1000)
        .map(|(_, _, t)| t.clone())
        .unwrap();
    let replays = w.s.stats().replays;
    let now = w.now;
    w.s.handle_datagram(now, loc(B), loc(EVIL), &genuine.payload);
    assert_eq!(w.s.stats().replays, replays + 1);
    let out = drain(&mut w.s, now);
    assert!(out.iter().all(|t| t.dst != loc(EVIL)), "answered a replay");
    for t in out {
        w.put(now + DELAY, Dir::Down, t);
    }
    assert_eq!(w.server_paths().started, 0);

    // The race: the attacker holds back the next small upstream packet (an acknowledgement:
    // the least the attacker can pay for the challenges it draws) and sends a copy of it
    // first, from its own address.
    let raced: RefCell<Option<Transmit>> = RefCell::new(None);
    let mut fate = |d: Dir, t: &Transmit| {
        let mut r = raced.borrow_mut();
        if d == Dir::Up && r.is_none() && t.payload.len() < 100 {
            *r = Some(t.clone());
            return Fate::Delay(Duration::from_millis(30));
        }
        Fate::Deliver
    };
    let until = w.now + Duration::from_secs(5);
    w.run(until, &mut fate, &mut |w| {
        x.pump(w);
        raced.borrow().is_some()
    });
    let copy = raced.borrow().clone().unwrap();
    let now = w.now;
    w.s.handle_datagram(now, loc(B), loc(EVIL), &copy.payload);
    w.server_log.push((
        now,
        false,
        Transmit {
            src: loc(EVIL),
            ..copy.clone()
        },
    ));
    assert_eq!(
        w.server_paths().started,
        1,
        "the copy opened and started a validation"
    );
    // The attacker never answers the challenges; it sends the server's own packets back
    // (they name a flow the server does not own) and a forged answer (a genuine packet with
    // another packet number): nothing of it opens.
    let mut to_evil = 0;
    let mut fate = |d: Dir, t: &Transmit| {
        if d == Dir::Down && t.dst == loc(EVIL) {
            to_evil += 1;
            return Fate::Drop;
        }
        Fate::Deliver
    };
    let until = w.now + Duration::from_secs(60);
    w.run(until, &mut fate, &mut |w| {
        x.pump(w) && w.server_paths().failed == 1
    });
    assert!(to_evil >= 1);
    x.assert_exact();
    let (unknown, auth) = (w.s.stats().unknown_flow, w.s.stats().auth_failures);
    let challenges: Vec<Transmit> = w
        .server_log
        .iter()
        .filter(|(_, sent, t)| *sent && t.dst == loc(EVIL))
        .map(|(_, _, t)| t.clone())
        .collect();
    let now = w.now;
    for t in &challenges {
        w.s.handle_datagram(now, loc(B), loc(EVIL), &t.payload);
    }
    // A packet number never used (the copy's own would be refused as a replay first), under
    // a tag the attacker cannot compute.
    let mut forged = copy.payload.clone();
    forged[20..28].copy_from_slice(&(1u64 << 40).to_be_bytes());
    w.s.handle_datagram(now, loc(B), loc(EVIL), &forged);
    assert_eq!(w.s.stats().unknown_flow, unknown + challenges.len() as u64);
    assert_eq!(w.s.stats().auth_failures, auth + 1);
    let p = w.server_paths();
    assert_eq!((p.started, p.validated, p.failed), (1, 0, 1), "{p:?}");
    assert_eq!(w.s.locators(w.sh).unwrap().1, loc(NAT1), "the flow moved");
    assert!(w.peer_moved_at(loc(EVIL)).is_none());
    assert!(
        w.server_events
            .iter()
            .any(|(_, e)| *e == Event::PathValidationFailed(w.sh, loc(EVIL))),
        "no event said the attacker's address failed"
    );
    let (sent, received) = w.bytes_with(loc(EVIL), w.now);
    assert!(
        sent > 0 && sent <= 3 * received,
        "amplified: sent {sent}, received {received}"
    );
    assert!(p.amplification_limited >= 1, "{p:?}");
}

/// After the move to NAT2, a packet the client sent from NAT1 before the rebinding arrives
/// late: it is older than what came from NAT2, so it starts no validation back.
#[test]
fn a_reordered_packet_from_the_old_address_does_not_pull_the_flow_back() {
    let mut w = World::new();
    let mut x = Transfer::new(300_000);
    let mut late: Option<Transmit> = None;
    let mut rebound = false;
    let mut fate = |d: Dir, t: &Transmit| {
        if d == Dir::Up && t.src == loc(NAT1) && late.is_none() && t.payload.len() > 1000 {
            late = Some(t.clone());
            return Fate::Drop;
        }
        Fate::Deliver
    };
    let until = w.now + Duration::from_secs(60);
    w.run(until, &mut fate, &mut |w| {
        let done = x.pump(w);
        if !rebound && x.got_up.len() >= 100_000 {
            w.rebind(NAT2, true);
            rebound = true;
        }
        // Held from before the rebinding: taken only once 100 kB arrived.
        done
    });
    x.assert_exact();
    assert_eq!(w.s.locators(w.sh).unwrap().1, loc(NAT2));
    let started = w.server_paths().started;
    let late = late.unwrap();
    let now = w.now;
    let (replays, auth) = (w.s.stats().replays, w.s.stats().auth_failures);
    w.s.handle_datagram(now, loc(B), loc(NAT1), &late.payload);
    // It opened (it was never delivered before) ...
    assert_eq!(w.s.stats().replays, replays);
    assert_eq!(w.s.stats().auth_failures, auth);
    // ... but it is not the client's newest: no validation back to NAT1.
    assert_eq!(
        w.server_paths().started,
        started,
        "an older packet started a validation"
    );
    assert!(drain(&mut w.s, now).iter().all(|t| t.dst != loc(NAT1)));
    assert_eq!(w.s.locators(w.sh).unwrap().1, loc(NAT2));
}
