//! Registration over a lossy simulated network: an instance's registrar against a minimal
//! router application (an engine endpoint serving registrations, with leases in virtual time),
//! and a client connecting by name through the router.
//!
//! Checked over many seeds: the registration reaches the router and, once there, does not
//! lapse while the instance lives; clients connect by name through it; closing the listener
//! removes it at once (or, if every UNREGISTER is lost, within the lease); an instance that
//! moves replaces its old locator; an instance that dies stops being a target within the lease.
//! Runs are pure functions of their seed.
#![allow(clippy::unwrap_used)] // test harness

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serval_engine::Instant;
use serval_engine::endpoint::{Endpoint, EndpointConfig, Event};
use serval_engine::registrar::{LeaseConfig, RegistrarEvent};
use serval_sim::{Datagram, LinkConfig, Network, Node, NodeId};
use serval_table::{Action, ServiceTable, Target};
use serval_wire::{Locator, MessageType, ServiceId, ServicePrefix};

const ROUTER: &str = "10.0.0.254:54324";
const INSTANCE: &str = "10.0.0.2:54324";
const INSTANCE_NEW: &str = "10.0.9.2:54324";
const CLIENT: &str = "10.0.0.1:54324";

fn loc(s: &str) -> Locator {
    s.parse().unwrap()
}

fn service() -> ServiceId {
    ServiceId::from_name("web.example.com").unwrap()
}

fn secs(s: f64) -> Instant {
    Instant::from_nanos((s * 1e9) as u64)
}

/// What a node's application does.
enum Role {
    /// Grants every REGISTER the TTL asked for, keeps leases, and forwards SYNs by its table.
    Router {
        /// (prefix, locator) → (expiry, instance token).
        leases: HashMap<(ServicePrefix, Locator), (Instant, u64)>,
        expired: u64,
        replaced: u64,
    },
    Instance {
        accepted: u64,
        /// Registrar events with their time.
        log: Vec<(Instant, RegistrarEvent)>,
    },
    Client {
        connected: u64,
        failed: u64,
    },
}

struct Host {
    ep: Endpoint,
    role: Role,
    /// A dead host neither sends nor receives.
    dead: bool,
}

impl Host {
    fn run_app(&mut self, now: Instant) {
        while let Some(ev) = self.ep.poll_event() {
            match (&mut self.role, ev) {
                (
                    Role::Router {
                        leases, replaced, ..
                    },
                    Event::RegistrationRequest(req),
                ) => {
                    let r = req.request;
                    let table = self.ep.table().clone();
                    let answer = match r.ty {
                        MessageType::Register => {
                            // The same instance from another locator: it moved.
                            let old: Vec<_> = leases
                                .iter()
                                .filter(|((p, l), (_, inst))| {
                                    *p == r.prefix && *l != req.from && *inst == r.instance
                                })
                                .map(|(k, _)| *k)
                                .collect();
                            for (p, l) in old {
                                leases.remove(&(p, l));
                                table.remove_target(&p, &Action::Forward(l));
                                *replaced += 1;
                            }
                            let ttl = Duration::from_millis(u64::from(r.ttl_ms.max(500)));
                            leases.insert((r.prefix, req.from), (now + ttl, r.instance));
                            table
                                .add_target(
                                    r.prefix,
                                    Target::new(Action::Forward(req.from), r.priority, r.weight),
                                )
                                .unwrap();
                            r.ack(ttl.as_millis() as u32)
                        }
                        _ => {
                            leases.remove(&(r.prefix, req.from));
                            table.remove_target(&r.prefix, &Action::Forward(req.from));
                            r.ack(0)
                        }
                    };
                    assert!(self.ep.answer_registration(&req, &answer));
                }
                (Role::Instance { accepted, .. }, Event::Incoming(l)) => {
                    while self.ep.accept(l).is_some() {
                        *accepted += 1;
                    }
                }
                (Role::Instance { log, .. }, Event::Registrar(e)) => log.push((now, e)),
                (Role::Client { connected, .. }, Event::Connected(_)) => *connected += 1,
                (Role::Client { failed, .. }, Event::ConnectFailed(..)) => *failed += 1,
                _ => {}
            }
        }
        if let Role::Router {
            leases, expired, ..
        } = &mut self.role
        {
            let table = self.ep.table().clone();
            leases.retain(|(p, l), (t, _)| {
                if *t <= now {
                    table.remove_target(p, &Action::Forward(*l));
                    *expired += 1;
                    false
                } else {
                    true
                }
            });
        }
    }

    fn lease_deadline(&self) -> Option<Instant> {
        match &self.role {
            Role::Router { leases, .. } => leases.values().map(|(t, _)| *t).min(),
            _ => None,
        }
    }
}

impl Node for Host {
    fn handle_datagram(&mut self, now: Instant, d: Datagram) {
        if self.dead {
            return;
        }
        self.ep.handle_datagram(now, d.dst, d.src, &d.payload);
        self.run_app(now);
    }
    fn poll_transmit(&mut self, now: Instant) -> Option<Datagram> {
        if self.dead {
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
        if self.dead {
            return None;
        }
        match (self.ep.poll_timeout(), self.lease_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.ep.handle_timeout(now);
        self.run_app(now);
    }
}

fn seed32(seed: u64, who: u8) -> [u8; 32] {
    let mut s = [who; 32];
    s[..8].copy_from_slice(&seed.to_be_bytes());
    s
}

struct World {
    net: Network<Host>,
    router: NodeId,
    instance: NodeId,
    client: NodeId,
    listener: Option<serval_table::ListenerId>,
}

fn world(seed: u64, loss: f64) -> World {
    let link = LinkConfig {
        loss,
        jitter: Duration::from_millis(5),
        ..LinkConfig::default()
    };
    let mut net = Network::new(seed, link);
    let mut config = EndpointConfig::default();
    config.control.retries = 10;
    let mut router_ep = Endpoint::new(
        config.clone(),
        seed32(seed, 3),
        Arc::new(ServiceTable::new()),
        vec![loc(ROUTER)],
    );
    router_ep.set_serve_registrations(true);
    let router = net.add_node(
        Host {
            ep: router_ep,
            role: Role::Router {
                leases: HashMap::new(),
                expired: 0,
                replaced: 0,
            },
            dead: false,
        },
        &[loc(ROUTER)],
    );
    let mut inst_ep = Endpoint::new(
        config.clone(),
        seed32(seed, 2),
        Arc::new(ServiceTable::new()),
        vec![loc(INSTANCE)],
    );
    inst_ep.set_router(Some(loc(ROUTER)), LeaseConfig::default());
    let listener = Some(inst_ep.listen(ServicePrefix::exact(service()), 0, 1));
    let instance = net.add_node(
        Host {
            ep: inst_ep,
            role: Role::Instance {
                accepted: 0,
                log: Vec::new(),
            },
            dead: false,
        },
        &[loc(INSTANCE)],
    );
    let client_ep = Endpoint::new(
        config,
        seed32(seed, 1),
        Arc::new(ServiceTable::new()),
        vec![loc(CLIENT)],
    );
    client_ep
        .table()
        .add_target(
            ServicePrefix::DEFAULT,
            Target::new(Action::Forward(loc(ROUTER)), 0, 1),
        )
        .unwrap();
    let client = net.add_node(
        Host {
            ep: client_ep,
            role: Role::Client {
                connected: 0,
                failed: 0,
            },
            dead: false,
        },
        &[loc(CLIENT)],
    );
    World {
        net,
        router,
        instance,
        client,
        listener,
    }
}

impl World {
    /// Runs until virtual time `t` (or until nothing is left to happen).
    fn run_to(&mut self, t: Instant) {
        const BUDGET: u64 = 2_000_000;
        if let Err(e) = self.net.run_until(BUDGET, |n| n.now() >= t) {
            assert!(e.steps < BUDGET, "livelock before {t:?}: {e:?}");
        }
    }

    /// The locators the router forwards the service to.
    fn targets(&self) -> Vec<Locator> {
        let snap = self.net.node(self.router).ep.table().snapshot();
        snap.get(&ServicePrefix::exact(service()))
            .unwrap_or(&[])
            .iter()
            .filter_map(|t| match t.action {
                Action::Forward(l) => Some(l),
                _ => None,
            })
            .collect()
    }

    /// Steps until `f` holds or virtual time passes `limit`; returns when it first held.
    fn until(&mut self, limit: Instant, mut f: impl FnMut(&World) -> bool) -> Option<Instant> {
        loop {
            if f(self) {
                return Some(self.net.now());
            }
            if self.net.now() > limit || !self.net.step() {
                return None;
            }
        }
    }

    fn router_counts(&self) -> (u64, u64) {
        match &self.net.node(self.router).role {
            Role::Router {
                expired, replaced, ..
            } => (*expired, *replaced),
            _ => unreachable!(),
        }
    }
}

const SEEDS: u64 = 40;

#[test]
fn registrations_reach_the_router_and_do_not_lapse_under_loss() {
    let mut false_alarms = 0;
    for seed in 0..SEEDS {
        let mut w = world(seed, 0.10);
        let t = w
            .until(secs(5.0), |w| !w.targets().is_empty())
            .unwrap_or_else(|| panic!("seed {seed}: never registered"));
        assert_eq!(w.targets(), [loc(INSTANCE)], "seed {seed}");
        assert!(t < secs(2.0), "seed {seed}: registered only at {t:?}");
        // A minute of refreshes over a 10% lossy link: the lease never lapses at the router.
        w.run_to(secs(60.0));
        assert_eq!(w.router_counts(), (0, 0), "seed {seed}");
        assert_eq!(w.targets(), [loc(INSTANCE)], "seed {seed}");
        // The instance's view is conservative (its lease estimate starts at the first send of
        // the acknowledged request): when four refresh round trips in a row fail, it reports
        // the router unreachable although a request got through, then Registered again.
        let Role::Instance { log, .. } = &w.net.node(w.instance).role else {
            unreachable!()
        };
        assert!(
            matches!(log.first(), Some((_, RegistrarEvent::Registered { .. }))),
            "seed {seed}: {log:?}"
        );
        assert!(
            matches!(log.last(), Some((_, RegistrarEvent::Registered { .. }))),
            "seed {seed}: {log:?}"
        );
        false_alarms += log.len() / 2;
    }
    // About 0.19^5 per refresh (a request or its ACK lost, five times in a row): less than one
    // in the 2400 refreshes of this sweep.
    assert!(false_alarms <= 10, "{false_alarms} unreachable reports");
}

#[test]
fn heavy_loss_costs_little_registered_time() {
    // 30% loss each way: lapses happen (five lost tries of one refresh, 0.3^5 per refresh, so
    // about 6 in the 2400 refreshes of this sweep), and the registrar recovers from each.
    let mut lapsed = 0;
    for seed in 0..SEEDS {
        let mut w = world(seed, 0.30);
        w.run_to(secs(60.0));
        let (expired, _) = w.router_counts();
        lapsed += expired;
        assert!(expired <= 3, "seed {seed}: {expired} lapses");
        // Registered again within a few seconds of any lapse: present at the end.
        let mut present = false;
        let end = secs(64.0);
        w.until(end, |w| {
            present = !w.targets().is_empty();
            present
        });
        assert!(present, "seed {seed}");
    }
    assert!(lapsed <= SEEDS / 4, "{lapsed} lapses in {SEEDS} minutes");
}

#[test]
fn clients_connect_by_name_through_the_router_under_loss() {
    for seed in 0..SEEDS / 2 {
        let mut w = world(seed, 0.10);
        w.until(secs(5.0), |w| !w.targets().is_empty()).unwrap();
        let now = w.net.now();
        for _ in 0..10 {
            w.net.node_mut(w.client).ep.connect(now, service()).unwrap();
        }
        w.run_to(now + Duration::from_secs(30));
        let (Role::Client { connected, failed }, Role::Instance { accepted, .. }) =
            (&w.net.node(w.client).role, &w.net.node(w.instance).role)
        else {
            unreachable!()
        };
        assert_eq!((*connected, *failed), (10, 0), "seed {seed}");
        assert_eq!(*accepted, 10, "seed {seed}");
    }
}

#[test]
fn closing_the_listener_unregisters_at_once_or_within_the_lease() {
    let mut at_once = 0;
    for seed in 0..SEEDS {
        let mut w = world(seed, 0.10);
        w.run_to(secs(10.0));
        assert!(!w.targets().is_empty(), "seed {seed}");
        let l = w.listener.take().unwrap();
        w.net.node_mut(w.instance).ep.close_listener(l);
        let closed = w.net.now();
        let gone = w
            .until(closed + Duration::from_secs(4), |w| w.targets().is_empty())
            .unwrap_or_else(|| panic!("seed {seed}: still registered 4 s after close"));
        let took = gone.saturating_duration_since(closed);
        assert!(took <= Duration::from_millis(3100), "seed {seed}: {took:?}");
        if took < Duration::from_millis(100) {
            at_once += 1;
        }
        // Nothing is registered again afterwards.
        w.run_to(gone + Duration::from_secs(10));
        assert!(w.targets().is_empty(), "seed {seed}");
    }
    // Lost UNREGISTERs are retransmitted: nearly always gone within one round trip or two.
    assert!(at_once >= SEEDS * 9 / 10, "{at_once}/{SEEDS} at once");
}

#[test]
fn a_moved_instance_replaces_its_old_locator() {
    for seed in 0..SEEDS / 2 {
        let mut w = world(seed, 0.10);
        w.run_to(secs(5.0));
        assert_eq!(w.targets(), [loc(INSTANCE)], "seed {seed}");
        // The instance's address changes.
        let inst = w.instance;
        w.net.add_address(inst, loc(INSTANCE_NEW));
        w.net.remove_address(&loc(INSTANCE));
        let ep = &mut w.net.node_mut(inst).ep;
        ep.add_local(loc(INSTANCE_NEW));
        ep.remove_local(&loc(INSTANCE));
        let moved = w.net.now();
        let t = w
            .until(moved + Duration::from_secs(3), |w| {
                w.targets() == [loc(INSTANCE_NEW)]
            })
            .unwrap_or_else(|| panic!("seed {seed}: {:?}", w.targets()));
        assert!(t.saturating_duration_since(moved) < Duration::from_secs(2));
        // Replaced, not expired.
        assert_eq!(w.router_counts(), (0, 1), "seed {seed}");
    }
}

#[test]
fn a_dead_instance_stops_being_a_target_within_its_lease() {
    for seed in 0..SEEDS / 2 {
        let mut w = world(seed, 0.10);
        w.run_to(secs(5.0));
        assert!(!w.targets().is_empty());
        // Crash: no UNREGISTER, no more refreshes.
        let inst = w.instance;
        w.net.node_mut(inst).dead = true;
        let died = w.net.now();
        let gone = w
            .until(died + Duration::from_secs(5), |w| w.targets().is_empty())
            .unwrap_or_else(|| panic!("seed {seed}: dead instance still a target"));
        assert!(gone.saturating_duration_since(died) <= Duration::from_secs(3));
        assert_eq!(w.router_counts(), (1, 0), "seed {seed}");
    }
}
