//! Following the host's addresses and links: flows move off an address (or a link) that goes
//! away by themselves, and a new address is usable at once.
//!
//! Two halves. This module is the **sans-IO core**: [`HostView`] folds the kernel's address
//! and link messages ([`NetEvent`]) into the set of *usable* addresses (present, not
//! tentative, on a link that is up and has carrier) and says which addresses became usable
//! or unusable ([`Changes`]); [`plan`] turns that, with the endpoint's sockets, its engine's
//! local locators and its flows, into [`Action`]s (add or remove a local locator, bind a
//! socket, move a flow). Both are pure and unit-tested below without netlink. [`sys`] is the
//! thin Linux part: an rtnetlink socket subscribed to link and address changes, whose messages
//! become [`NetEvent`]s; the task here ([`start`]) runs the actions on the engine, under its
//! lock, and announces them as [`PathEvent`]s.
//!
//! An endpoint bound to the wildcard address (`0.0.0.0:p`, `[::]:p`) keeps the wildcard as
//! its first local locator (a client's SYN still leaves from the address the kernel's routes
//! choose) and gains one *concrete* locator `addr:p` per usable host address of its family:
//! datagrams that arrive at `addr` (the socket's `IP_PKTINFO`) are handed to the engine as
//! arriving at `addr:p`, and what the engine sends from `addr:p` leaves through the wildcard
//! socket with `addr` as its source. A server's flows so learn the address their client
//! reached, and a flow can be moved from one concrete address to another.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::{IpAddr, UdpSocket as StdUdpSocket};
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use serval_engine::connection::State;
use serval_engine::endpoint::ConnectionHandle;
use serval_wire::Locator;

use crate::endpoint::{Shared, Socket};

pub(crate) mod sys;

/// How an endpoint follows the host's address and link changes
/// ([`Endpoint::bind_following`](crate::Endpoint::bind_following)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FollowHost {
    /// Flows move off an address (or a link) that goes away, to a surviving address of the
    /// same family, by themselves; an address that comes (back) on a bound socket, or any
    /// address of a wildcard socket's family, is usable at once. The default.
    #[default]
    Flows,
    /// As [`FollowHost::Flows`], and a socket is bound on each new address of the host that no
    /// socket covers (on the port of the first socket bound; 0 picks one), so an endpoint
    /// bound to specific addresses gains the host's new ones.
    Addresses,
    /// The host's changes are ignored: flows move only by [`Stream::migrate`](crate::Stream::migrate).
    Off,
}

/// How many path events a slow [`Endpoint::path_events`](crate::Endpoint::path_events)
/// receiver may fall behind before it loses the oldest.
pub(crate) const PATH_EVENTS: usize = 512;

/// What happened to the endpoint's paths ([`Endpoint::path_events`](crate::Endpoint::path_events)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PathEvent {
    /// This local locator became usable (a new address, or its link came back up).
    AddressAdded(Locator),
    /// This local locator went away (its address was removed, or its link went down or lost
    /// carrier); flows on it are being moved.
    AddressRemoved(Locator),
    /// A flow started moving (an RSYN from `to`); until the peer confirms, it is frozen if
    /// `from` is gone.
    Moving {
        /// The flow ([`Stream::id`](crate::Stream::id)).
        stream: ConnectionHandle,
        /// Where it was.
        from: Locator,
        /// Where it goes.
        to: Locator,
    },
    /// A flow now sends from `to` (the peer confirmed the move), whether it moved by itself
    /// or by [`Stream::migrate`](crate::Stream::migrate).
    Moved {
        /// The flow.
        stream: ConnectionHandle,
        /// Its new local locator.
        to: Locator,
    },
    /// A move was given up before the peer confirmed it: the flow was moved elsewhere
    /// meanwhile ([`Stream::migrate`](crate::Stream::migrate) again), or it finished while
    /// the new path stayed silent. The flow stays where it was unless the other move takes
    /// it.
    MoveAbandoned {
        /// The flow.
        stream: ConnectionHandle,
        /// Where it was going.
        to: Locator,
    },
    /// A flow's address went away and it could not move: no usable local address reaches its
    /// peer, or a move was already under way. It moves when an address appears; otherwise
    /// it ends by its idle timeout.
    MoveFailed {
        /// The flow.
        stream: ConnectionHandle,
        /// Its (dead) local locator.
        from: Locator,
    },
    /// A path joined the flow and carries traffic (multipath).
    PathUp {
        /// The flow.
        stream: ConnectionHandle,
        /// The path's ID.
        path: u32,
    },
    /// A path left the flow: removed, its join unanswered, or silent for the idle timeout.
    PathDown {
        /// The flow.
        stream: ConnectionHandle,
        /// The path's ID.
        path: u32,
    },
}

/// Starts following the host for `shared`, unless `follow` is off or rtnetlink cannot be
/// opened here (then the endpoint works without, and says so once in the log). The host's
/// addresses are read before this returns (at most [`FIRST_DUMP`]), so a wildcard endpoint
/// names the address of its very first datagram.
pub(crate) async fn start(shared: &Arc<Shared>, follow: FollowHost) {
    if follow == FollowHost::Off {
        return;
    }
    let watcher = match sys::Watcher::open() {
        Ok(w) => w,
        Err(e) => {
            tracing::info!(error = %e, "cannot watch the host's addresses (rtnetlink): flows move only when asked");
            return;
        }
    };
    let mut f = Follower {
        watcher,
        view: HostView::default(),
        memory: FlowMemory::default(),
        follow,
    };
    let first = tokio::time::timeout(FIRST_DUMP, async {
        loop {
            match f.read(Duration::from_secs(3600)).await {
                Ok(Some(events))
                    if events
                        .iter()
                        .any(|e| matches!(e, NetEvent::Snapshot { .. })) =>
                {
                    return Ok(events);
                }
                Ok(Some(_) | None) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    match first {
        Ok(Ok(events)) => f.apply(shared, events),
        Ok(Err(e)) => {
            tracing::info!(error = %e, "rtnetlink dump failed: flows move only when asked");
            return;
        }
        Err(_) => tracing::info!("no rtnetlink dump yet: following the host's changes from now on"),
    }
    tokio::spawn(f.run(Arc::downgrade(shared)));
}

/// How long [`start`] waits for the host's addresses.
const FIRST_DUMP: Duration = Duration::from_secs(1);

/// The watcher task's state.
struct Follower {
    watcher: sys::Watcher,
    view: HostView,
    memory: FlowMemory,
    follow: FollowHost,
}

impl Follower {
    /// Waits (at most `wait`) for the kernel's next message, then takes whatever else is
    /// already queued, so that a change made of several messages (`ip addr del` then `add`)
    /// is planned as one. `None`: nothing came in time.
    async fn read(&mut self, wait: Duration) -> io::Result<Option<Vec<NetEvent>>> {
        self.watcher.ensure_dump().await?;
        let first = match tokio::time::timeout(wait, self.watcher.recv()).await {
            Err(_) => return Ok(None),
            Ok(r) => r?,
        };
        let mut events = Vec::new();
        if let Some(bytes) = first {
            events.extend(self.watcher.handle(&bytes).await?);
        }
        loop {
            self.watcher.ensure_dump().await?;
            // One poll: what is queued now, without waiting (cancel-safe).
            let ready = {
                let mut recv = std::pin::pin!(self.watcher.recv());
                std::future::poll_fn(|cx| Poll::Ready(recv.as_mut().poll(cx))).await
            };
            match ready {
                Poll::Ready(Ok(Some(bytes))) => events.extend(self.watcher.handle(&bytes).await?),
                Poll::Ready(Ok(None)) => {}
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(Some(events)),
            }
        }
    }

    /// Folds `events` into the view and acts on the net change.
    fn apply(&mut self, shared: &Arc<Shared>, events: Vec<NetEvent>) {
        let before = self.view.usable();
        for ev in events {
            self.view.apply(ev);
        }
        let after = self.view.usable();
        let changes = Changes {
            up: after.difference(&before).copied().collect(),
            down: before.difference(&after).copied().collect(),
        };
        if !changes.is_empty() {
            tracing::debug!(up = ?changes.up, down = ?changes.down, "host addresses changed");
            act(
                shared,
                &changes,
                &after,
                self.follow,
                &mut self.memory,
                false,
            );
        }
    }

    /// Reads the kernel's messages and acts on the changes, until the endpoint is gone.
    async fn run(mut self, weak: Weak<Shared>) {
        loop {
            // Stranded flows are looked at again soon: the route of a new address can
            // follow its notification by a moment. Otherwise wake now and then to end with
            // the endpoint.
            let tick = if self.memory.stranded.is_empty() {
                Duration::from_secs(1)
            } else {
                RECHECK
            };
            let events = match self.read(tick).await {
                Ok(ev) => ev,
                Err(e) => {
                    tracing::info!(error = %e, "rtnetlink failed: no longer following the host");
                    return;
                }
            };
            let Some(shared) = weak.upgrade() else { return };
            match events {
                Some(events) => self.apply(&shared, events),
                None if !self.memory.stranded.is_empty() => act(
                    &shared,
                    &Changes::default(),
                    &self.view.usable(),
                    self.follow,
                    &mut self.memory,
                    true,
                ),
                None => {}
            }
        }
    }
}

/// The source address the kernel's routes pick towards `peer` now (a UDP `connect`, which
/// sends nothing).
fn route_src(peer: Locator) -> Option<IpAddr> {
    let any: Locator = if peer.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let probe = StdUdpSocket::bind(any).ok()?;
    probe.connect(peer).ok()?;
    Some(probe.local_addr().ok()?.ip())
}

/// Whether the host routes from `from` to `peer` now (a UDP `connect` from a socket bound
/// there, which sends nothing; source-address policy rules apply). From the unspecified
/// address: whether any route (and source) reaches `peer`.
fn reachable(from: IpAddr, peer: Locator) -> bool {
    StdUdpSocket::bind((from, 0)).is_ok_and(|s| s.connect(peer).is_ok())
}

/// What the watcher remembers of flows between changes.
#[derive(Debug, Default)]
struct FlowMemory {
    /// Flows that found nowhere to go, looked at again every [`RECHECK`].
    stranded: HashSet<ConnectionHandle>,
    /// Flows moving by our doing, and where to.
    moving: HashMap<ConnectionHandle, Locator>,
}

/// How often flows left without a usable address are looked at again.
const RECHECK: Duration = Duration::from_millis(100);

/// Plans what `changes` mean for the endpoint and does it: the engine's locators, new
/// sockets, flow moves, and the path events that tell of them. `memory` holds the flows
/// that found nowhere to go (looked at again on `recheck`) and those moving.
fn act(
    shared: &Arc<Shared>,
    changes: &Changes,
    usable: &BTreeSet<IpAddr>,
    follow: FollowHost,
    memory: &mut FlowMemory,
    recheck: bool,
) {
    let sockets: Vec<Locator> = shared.sockets.load().iter().map(|s| s.local).collect();
    let bind_new =
        (follow == FollowHost::Addresses).then(|| sockets.first().map_or(0, |s| s.port()));
    let (locals, mut flows) = {
        let st = shared.lock();
        let flows: Vec<FlowView> = st
            .engine
            .connections()
            .into_iter()
            .filter(|c| c.state == State::Established && !c.exported)
            .map(|c| FlowView {
                handle: c.handle,
                local: c.local,
                peer: c.peer,
                route_src: None,
                stranded: memory.stranded.contains(&c.handle),
            })
            .collect();
        (st.engine.locals().to_vec(), flows)
    };
    // Forget flows that are gone, and moves that completed (the flow is where it was sent).
    memory
        .stranded
        .retain(|h| flows.iter().any(|f| f.handle == *h));
    memory
        .moving
        .retain(|h, to| flows.iter().any(|f| f.handle == *h && f.local != *to));
    // A flow already moving is the engine's until its move ends.
    flows.retain(|f| !memory.moving.contains_key(&f.handle));
    // Route look-ups (a socket each) outside the lock, only for flows that may move.
    for f in flows
        .iter_mut()
        .filter(|f| f.local.ip().is_unspecified() || !usable.contains(&f.local.ip()))
    {
        f.route_src = route_src(f.peer);
    }
    // One route look-up per (source, peer address), however many flows share them.
    let routes = std::cell::RefCell::new(HashMap::new());
    let reachable = |from: IpAddr, peer: Locator| {
        *routes
            .borrow_mut()
            .entry((from, peer.ip()))
            .or_insert_with(|| reachable(from, peer))
    };
    let actions = plan(
        changes,
        &Situation {
            usable,
            sockets: &sockets,
            locals: &locals,
            flows: &flows,
            bind_new,
            reachable: &reachable,
        },
        recheck,
    );
    // A socket bound on port 0 gets its own port: moves planned to it go there.
    let mut bound: HashMap<Locator, Locator> = HashMap::new();
    for a in &actions {
        if let Action::Bind(at) = *a {
            match Socket::open(at) {
                Ok(s) => {
                    let s = Arc::new(s);
                    bound.insert(at, s.local);
                    shared.sockets.rcu(|v| {
                        let mut v = Vec::clone(v);
                        v.push(s.clone());
                        v
                    });
                    tokio::spawn(crate::endpoint::receive(Arc::downgrade(shared), s));
                }
                Err(e) => tracing::info!(error = %e, %at, "cannot bind a socket on a new address"),
            }
        }
    }
    let mut st = shared.lock();
    let mut events = Vec::new();
    for a in actions {
        match a {
            Action::RemoveLocal(l) => {
                st.engine.remove_local(&l);
                events.push(PathEvent::AddressRemoved(l));
            }
            Action::AddLocal(l) => {
                st.engine.add_local(l);
                events.push(PathEvent::AddressAdded(l));
            }
            Action::Bind(at) => {
                if let Some(&l) = bound.get(&at) {
                    st.engine.add_local(l);
                    events.push(PathEvent::AddressAdded(l));
                }
            }
            Action::Migrate { handle, from, to } => {
                let to = bound.get(&to).copied().unwrap_or(to);
                if st.engine.locals().contains(&to) && st.engine.migrate(handle, to) {
                    tracing::debug!(?handle, %from, %to, "flow moves by itself");
                    memory.stranded.remove(&handle);
                    memory.moving.insert(handle, to);
                    events.push(PathEvent::Moving {
                        stream: handle,
                        from,
                        to,
                    });
                } else {
                    events.push(PathEvent::MoveFailed {
                        stream: handle,
                        from,
                    });
                }
            }
            Action::Stranded { handle, from } => {
                memory.stranded.insert(handle);
                tracing::debug!(?handle, %from, "flow's address is gone and nothing can reach its peer");
                events.push(PathEvent::MoveFailed {
                    stream: handle,
                    from,
                });
            }
        }
    }
    for e in events {
        let _ = st.path_events.send(e);
    }
    st.dispatch();
    drop(st);
    shared.wake.notify_one();
}

/// What the kernel said about one address or link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NetEvent {
    /// Address `ip` is on interface `ifindex` (new, or its flags changed); `ready` is false
    /// while it is tentative (IPv6 duplicate address detection) or after DAD failed.
    Address {
        ip: IpAddr,
        ifindex: u32,
        ready: bool,
    },
    /// Address `ip` left interface `ifindex`.
    AddressGone { ip: IpAddr, ifindex: u32 },
    /// Interface `ifindex` is administratively `up` (IFF_UP) and has `carrier` (IFF_RUNNING).
    Link {
        ifindex: u32,
        up: bool,
        carrier: bool,
    },
    /// Interface `ifindex` was deleted.
    LinkGone { ifindex: u32 },
    /// The whole state at once (a dump, after start-up or after the kernel dropped
    /// notifications): replaces what was known.
    Snapshot {
        addresses: Vec<(IpAddr, u32, bool)>,
        links: Vec<(u32, bool, bool)>,
    },
}

/// Addresses that became usable and unusable with one event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Changes {
    pub(crate) up: Vec<IpAddr>,
    pub(crate) down: Vec<IpAddr>,
}

impl Changes {
    pub(crate) fn is_empty(&self) -> bool {
        self.up.is_empty() && self.down.is_empty()
    }
}

/// The host's addresses and links as the kernel reported them.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostView {
    /// (address, interface) → ready.
    addrs: BTreeMap<(IpAddr, u32), bool>,
    /// interface → (up, carrier).
    links: HashMap<u32, (bool, bool)>,
}

impl HostView {
    /// Addresses a flow can use now: present and ready, on an interface that is up and has
    /// carrier (an interface not heard of yet counts as up: its address came first).
    pub(crate) fn usable(&self) -> BTreeSet<IpAddr> {
        self.addrs
            .iter()
            .filter(|&(&(_, ifindex), &ready)| {
                ready
                    && self
                        .links
                        .get(&ifindex)
                        .is_none_or(|&(up, carrier)| up && carrier)
            })
            .map(|(&(ip, _), _)| ip)
            .collect()
    }

    /// Folds `ev` in; returns the addresses that became usable or unusable.
    pub(crate) fn apply(&mut self, ev: NetEvent) -> Changes {
        let before = self.usable();
        match ev {
            NetEvent::Address { ip, ifindex, ready } => {
                self.addrs.insert((ip, ifindex), ready);
            }
            NetEvent::AddressGone { ip, ifindex } => {
                self.addrs.remove(&(ip, ifindex));
            }
            NetEvent::Link {
                ifindex,
                up,
                carrier,
            } => {
                self.links.insert(ifindex, (up, carrier));
            }
            NetEvent::LinkGone { ifindex } => {
                self.links.remove(&ifindex);
                self.addrs.retain(|&(_, i), _| i != ifindex);
            }
            NetEvent::Snapshot { addresses, links } => {
                self.addrs = addresses
                    .into_iter()
                    .map(|(ip, i, ready)| ((ip, i), ready))
                    .collect();
                self.links = links.into_iter().map(|(i, u, c)| (i, (u, c))).collect();
            }
        }
        let after = self.usable();
        Changes {
            up: after.difference(&before).copied().collect(),
            down: before.difference(&after).copied().collect(),
        }
    }
}

/// One flow as [`plan`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FlowView {
    pub(crate) handle: ConnectionHandle,
    /// The local locator it sends from (the wildcard for a client of a wildcard endpoint).
    pub(crate) local: Locator,
    pub(crate) peer: Locator,
    /// The source address the kernel's routes choose towards `peer` now, if the runtime
    /// looked it up (only for flows on a wildcard locator).
    pub(crate) route_src: Option<IpAddr>,
    /// An earlier change left it with nowhere to go ([`Action::Stranded`]): any new address,
    /// or a re-check, is a chance to move it.
    pub(crate) stranded: bool,
}

/// What the runtime does about a change, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// The address is gone: the engine stops offering this locator.
    RemoveLocal(Locator),
    /// A socket's address is back, or a wildcard socket gained an address.
    AddLocal(Locator),
    /// Bind a new socket here (an endpoint that follows addresses), then add it.
    Bind(Locator),
    /// Move the flow to `to` (an RSYN). Its old locator is already removed if it is gone,
    /// so the engine freezes the flow until the new path is validated.
    Migrate {
        handle: ConnectionHandle,
        from: Locator,
        to: Locator,
    },
    /// The flow's address is gone and no usable local locator can reach its peer: it stays
    /// where it is (and moves as soon as one appears, or dies of its idle timeout).
    Stranded {
        handle: ConnectionHandle,
        from: Locator,
    },
}

/// Addresses a flow can never use as its source: IPv6 link-local (it needs an interface
/// scope a locator does not carry) and the unspecified address.
fn addressable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => !a.is_unspecified(),
        IpAddr::V6(a) => !a.is_unspecified() && (a.segments()[0] & 0xffc0) != 0xfe80,
    }
}

fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

/// What [`plan`] decides from, besides the change itself.
#[derive(Clone, Copy)]
pub(crate) struct Situation<'a> {
    pub(crate) usable: &'a BTreeSet<IpAddr>,
    pub(crate) sockets: &'a [Locator],
    pub(crate) locals: &'a [Locator],
    pub(crate) flows: &'a [FlowView],
    pub(crate) bind_new: Option<u16>,
    pub(crate) reachable: &'a dyn Fn(IpAddr, Locator) -> bool,
}

/// The actions that follow `changes`, for an endpoint with `sockets` (the locators they are
/// bound to, wildcards included), whose engine offers `locals`, carrying `flows`, given the
/// host's `usable` addresses *after* the change. `bind_new`: bind a socket on each new usable
/// address no socket covers, on this port. `reachable(from, peer)`: whether the host has a
/// route from address `from` (unspecified: from any) to `peer` now (a move to a locator
/// that cannot reach the peer would be stuck until it fails). `recheck`: nothing changed, but stranded flows are
/// looked at again (a route can follow its address by a moment).
///
/// Rules: a locator whose address went is removed; one whose address came (back) is added,
/// and a wildcard socket gains `addr:port` for each usable address of its family. A flow
/// whose concrete locator is no longer usable moves to another usable locator of its peer's
/// family (loopback only towards loopback), preferring the kernel's route choice
/// (`route_src`), then its own port (the same socket), then the endpoint's order; a flow on a
/// wildcard locator moves to a concrete one when an address of its family went (it may have
/// been the one the kernel used). A flow with nowhere to go is `Stranded` once, when its
/// address goes; a later new address moves it.
pub(crate) fn plan(changes: &Changes, at: &Situation<'_>, recheck: bool) -> Vec<Action> {
    let Situation {
        usable,
        sockets,
        locals,
        flows,
        bind_new,
        reachable,
    } = *at;
    let mut actions = Vec::new();
    let mut offered: Vec<Locator> = locals.to_vec();
    for &ip in &changes.down {
        for l in locals.iter().filter(|l| l.ip() == ip) {
            actions.push(Action::RemoveLocal(*l));
            offered.retain(|o| o != l);
        }
    }
    for &ip in &changes.up {
        let mut covered = false;
        for s in sockets {
            let loc = if s.ip() == ip {
                *s
            } else if s.ip().is_unspecified() && same_family(s.ip(), ip) && addressable(ip) {
                Locator::new(ip, s.port())
            } else {
                continue;
            };
            covered = true;
            if !offered.contains(&loc) {
                actions.push(Action::AddLocal(loc));
                offered.push(loc);
            }
        }
        if !covered
            && let Some(port) = bind_new
            && addressable(ip)
            && !ip.is_loopback()
        {
            let loc = Locator::new(ip, port);
            actions.push(Action::Bind(loc));
            offered.push(loc);
        }
    }
    let is_usable = |l: &Locator| l.ip().is_unspecified() || usable.contains(&l.ip());
    for f in flows {
        let wildcard = f.local.ip().is_unspecified();
        let lost = !wildcard && !usable.contains(&f.local.ip());
        let maybe_lost = wildcard
            && changes.down.iter().any(|&ip| {
                same_family(ip, f.local.ip()) && ip.is_loopback() == f.peer.ip().is_loopback()
            });
        let newly = changes.down.contains(&f.local.ip()) || maybe_lost;
        let again = f.stranded && (recheck || !changes.up.is_empty());
        // A lost flow that found nowhere to go before gets another chance with each new
        // address (or a re-check once stranded).
        let retry = lost && !changes.up.is_empty();
        if !(newly || again || retry) {
            continue;
        }
        let candidates = offered.iter().filter(|l| {
            **l != f.local
                && is_usable(l)
                && same_family(l.ip(), f.peer.ip())
                && (l.ip().is_unspecified() || addressable(l.ip()))
                && (l.ip().is_unspecified() || l.ip().is_loopback() == f.peer.ip().is_loopback())
                && reachable(l.ip(), f.peer)
        });
        // Concrete locators first (the engine then knows its real source), then: the
        // kernel's route choice, the flow's own port, the endpoint's order.
        let best = candidates.min_by_key(|l| {
            (
                l.ip().is_unspecified(),
                Some(l.ip()) != f.route_src,
                l.port() != f.local.port(),
            )
        });
        match best {
            Some(&to) => actions.push(Action::Migrate {
                handle: f.handle,
                from: f.local,
                to,
            }),
            None if newly => actions.push(Action::Stranded {
                handle: f.handle,
                from: f.local,
            }),
            None => {}
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn loc(s: &str) -> Locator {
        s.parse().unwrap()
    }
    fn flow(h: u64, local: &str, peer: &str) -> FlowView {
        FlowView {
            handle: ConnectionHandle(h),
            local: loc(local),
            peer: loc(peer),
            route_src: None,
            stranded: false,
        }
    }

    /// [`plan`] with every address reachable and no re-check.
    fn plan_simple(
        changes: &Changes,
        usable: &BTreeSet<IpAddr>,
        sockets: &[Locator],
        locals: &[Locator],
        flows: &[FlowView],
        bind_new: Option<u16>,
    ) -> Vec<Action> {
        let at = Situation {
            usable,
            sockets,
            locals,
            flows,
            bind_new,
            reachable: &|_, _| true,
        };
        plan(changes, &at, false)
    }

    /// Two links, an address on each, both up.
    fn two_links() -> HostView {
        let mut v = HostView::default();
        v.apply(NetEvent::Snapshot {
            addresses: vec![(ip("10.1.0.1"), 2, true), (ip("10.2.0.1"), 3, true)],
            links: vec![(2, true, true), (3, true, true)],
        });
        v
    }

    #[test]
    fn link_down_or_carrier_lost_makes_its_addresses_unusable_and_up_again_usable() {
        let mut v = two_links();
        let c = v.apply(NetEvent::Link {
            ifindex: 2,
            up: false,
            carrier: false,
        });
        assert_eq!(
            c,
            Changes {
                up: vec![],
                down: vec![ip("10.1.0.1")]
            }
        );
        assert_eq!(v.usable(), [ip("10.2.0.1")].into());
        // Up again but no carrier yet (the peer's end is still down): still unusable.
        let c = v.apply(NetEvent::Link {
            ifindex: 2,
            up: true,
            carrier: false,
        });
        assert!(c.is_empty());
        let c = v.apply(NetEvent::Link {
            ifindex: 2,
            up: true,
            carrier: true,
        });
        assert_eq!(
            c,
            Changes {
                up: vec![ip("10.1.0.1")],
                down: vec![]
            }
        );
        // A repeated message changes nothing.
        assert!(
            v.apply(NetEvent::Link {
                ifindex: 2,
                up: true,
                carrier: true
            })
            .is_empty()
        );
    }

    #[test]
    fn addresses_come_and_go_and_tentative_ones_wait() {
        let mut v = two_links();
        let c = v.apply(NetEvent::Address {
            ip: ip("fd00::1"),
            ifindex: 3,
            ready: false,
        });
        assert!(c.is_empty(), "a tentative address is not usable yet");
        let c = v.apply(NetEvent::Address {
            ip: ip("fd00::1"),
            ifindex: 3,
            ready: true,
        });
        assert_eq!(c.up, vec![ip("fd00::1")]);
        let c = v.apply(NetEvent::AddressGone {
            ip: ip("10.1.0.1"),
            ifindex: 2,
        });
        assert_eq!(c.down, vec![ip("10.1.0.1")]);
        let c = v.apply(NetEvent::LinkGone { ifindex: 3 });
        assert_eq!(c.down, vec![ip("10.2.0.1"), ip("fd00::1")]);
        assert!(v.usable().is_empty());
    }

    #[test]
    fn an_address_heard_before_its_link_counts_as_up() {
        let mut v = HostView::default();
        let c = v.apply(NetEvent::Address {
            ip: ip("10.9.0.1"),
            ifindex: 7,
            ready: true,
        });
        assert_eq!(c.up, vec![ip("10.9.0.1")]);
    }

    #[test]
    fn a_snapshot_replaces_the_view_and_reports_the_difference() {
        let mut v = two_links();
        let c = v.apply(NetEvent::Snapshot {
            addresses: vec![(ip("10.2.0.1"), 3, true), (ip("10.3.0.1"), 4, true)],
            links: vec![(3, true, true), (4, true, true)],
        });
        assert_eq!(
            c,
            Changes {
                up: vec![ip("10.3.0.1")],
                down: vec![ip("10.1.0.1")]
            }
        );
    }

    #[test]
    fn flows_on_a_lost_address_move_to_a_survivor_of_their_family() {
        let sockets = [
            loc("10.1.0.1:5000"),
            loc("10.2.0.1:5001"),
            loc("[fd00::1]:5002"),
        ];
        let flows = [
            flow(1, "10.1.0.1:5000", "10.9.0.1:80"),
            flow(2, "10.2.0.1:5001", "10.9.0.1:80"),
            flow(3, "[fd00::1]:5002", "[fd09::1]:80"),
        ];
        let changes = Changes {
            up: vec![],
            down: vec![ip("10.1.0.1")],
        };
        let usable = [ip("10.2.0.1"), ip("fd00::1")].into();
        let a = plan(
            &changes,
            &Situation {
                usable: &usable,
                sockets: &sockets,
                locals: &sockets,
                flows: &flows,
                bind_new: None,
                reachable: &|_, _| true,
            },
            false,
        );
        assert_eq!(
            a,
            vec![
                Action::RemoveLocal(loc("10.1.0.1:5000")),
                Action::Migrate {
                    handle: ConnectionHandle(1),
                    from: loc("10.1.0.1:5000"),
                    to: loc("10.2.0.1:5001")
                },
            ]
        );
    }

    #[test]
    fn a_flow_with_nowhere_to_go_is_stranded_once_and_moves_when_an_address_comes() {
        let sockets = [loc("10.1.0.1:5000"), loc("[fd00::1]:5002")];
        let flows = [flow(1, "10.1.0.1:5000", "10.9.0.1:80")];
        let down = Changes {
            up: vec![],
            down: vec![ip("10.1.0.1")],
        };
        let usable: BTreeSet<IpAddr> = [ip("fd00::1")].into();
        let a = plan(
            &down,
            &Situation {
                usable: &usable,
                sockets: &sockets,
                locals: &sockets,
                flows: &flows,
                bind_new: None,
                reachable: &|_, _| true,
            },
            false,
        );
        assert_eq!(
            a,
            vec![
                Action::RemoveLocal(loc("10.1.0.1:5000")),
                Action::Stranded {
                    handle: ConnectionHandle(1),
                    from: loc("10.1.0.1:5000")
                },
            ]
        );
        let locals = [loc("[fd00::1]:5002")];
        // An unrelated IPv6 change: nothing new to say about the stranded flow.
        let other = Changes {
            up: vec![ip("fd00::2")],
            down: vec![],
        };
        let a = plan(
            &other,
            &Situation {
                usable: &usable,
                sockets: &sockets,
                locals: &locals,
                flows: &flows,
                bind_new: None,
                reachable: &|_, _| true,
            },
            false,
        );
        assert!(a.is_empty(), "{a:?}");
        // The endpoint follows addresses: a new IPv4 address is bound, and the flow goes there.
        let up = Changes {
            up: vec![ip("10.3.0.1")],
            down: vec![],
        };
        let usable: BTreeSet<IpAddr> = [ip("fd00::1"), ip("10.3.0.1")].into();
        let a = plan_simple(&up, &usable, &sockets, &locals, &flows, Some(5000));
        assert_eq!(
            a,
            vec![
                Action::Bind(loc("10.3.0.1:5000")),
                Action::Migrate {
                    handle: ConnectionHandle(1),
                    from: loc("10.1.0.1:5000"),
                    to: loc("10.3.0.1:5000")
                },
            ]
        );
    }

    #[test]
    fn an_address_coming_back_is_offered_again_on_its_socket() {
        let sockets = [loc("10.1.0.1:5000"), loc("10.2.0.1:5001")];
        let locals = [loc("10.2.0.1:5001")];
        let up = Changes {
            up: vec![ip("10.1.0.1")],
            down: vec![],
        };
        let usable = [ip("10.1.0.1"), ip("10.2.0.1")].into();
        let a = plan(
            &up,
            &Situation {
                usable: &usable,
                sockets: &sockets,
                locals: &locals,
                flows: &[],
                bind_new: None,
                reachable: &|_, _| true,
            },
            false,
        );
        assert_eq!(a, vec![Action::AddLocal(loc("10.1.0.1:5000"))]);
    }

    #[test]
    fn a_wildcard_endpoint_gains_concrete_locators_and_follows_a_renumbering() {
        let sockets = [loc("0.0.0.0:7000")];
        // Start-up: every usable address of the family becomes a locator of the socket,
        // IPv6 link-local never does.
        let start = Changes {
            up: vec![ip("10.1.0.1"), ip("127.0.0.1"), ip("fe80::1")],
            down: vec![],
        };
        let usable: BTreeSet<IpAddr> = start.up.iter().copied().collect();
        let a = plan_simple(&start, &usable, &sockets, &sockets, &[], Some(7000));
        assert_eq!(
            a,
            vec![
                Action::AddLocal(loc("10.1.0.1:7000")),
                Action::AddLocal(loc("127.0.0.1:7000")),
            ]
        );
        let locals = [
            loc("0.0.0.0:7000"),
            loc("10.1.0.1:7000"),
            loc("127.0.0.1:7000"),
        ];
        // 10.1.0.1 is replaced by 10.1.0.7: the server's flow on the concrete address and the
        // client's flow on the wildcard (whose route now leaves from 10.1.0.7) both move
        // there; a flow to a loopback peer stays.
        let flows = [
            flow(1, "10.1.0.1:7000", "10.9.0.1:80"),
            FlowView {
                route_src: Some(ip("10.1.0.7")),
                ..flow(2, "0.0.0.0:7000", "10.9.0.1:81")
            },
            flow(3, "127.0.0.1:7000", "127.0.0.1:82"),
        ];
        let renumber = Changes {
            up: vec![ip("10.1.0.7")],
            down: vec![ip("10.1.0.1")],
        };
        let usable = [ip("10.1.0.7"), ip("127.0.0.1")].into();
        let a = plan_simple(&renumber, &usable, &sockets, &locals, &flows, Some(7000));
        assert_eq!(
            a,
            vec![
                Action::RemoveLocal(loc("10.1.0.1:7000")),
                Action::AddLocal(loc("10.1.0.7:7000")),
                Action::Migrate {
                    handle: ConnectionHandle(1),
                    from: loc("10.1.0.1:7000"),
                    to: loc("10.1.0.7:7000")
                },
                Action::Migrate {
                    handle: ConnectionHandle(2),
                    from: loc("0.0.0.0:7000"),
                    to: loc("10.1.0.7:7000")
                },
            ]
        );
    }

    #[test]
    fn the_route_choice_and_the_flows_own_socket_are_preferred() {
        let sockets = [loc("10.1.0.1:1"), loc("10.2.0.1:2"), loc("10.3.0.1:1")];
        let mut f = flow(1, "10.1.0.1:1", "10.9.0.1:80");
        let down = Changes {
            up: vec![],
            down: vec![ip("10.1.0.1")],
        };
        let usable = [ip("10.2.0.1"), ip("10.3.0.1")].into();
        let to = |a: Vec<Action>| match a.last() {
            Some(Action::Migrate { to, .. }) => *to,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            to(plan(
                &down,
                &Situation {
                    usable: &usable,
                    sockets: &sockets,
                    locals: &sockets,
                    flows: &[f],
                    bind_new: None,
                    reachable: &|_, _| true
                },
                false
            )),
            loc("10.3.0.1:1"),
            "same port first"
        );
        f.route_src = Some(ip("10.2.0.1"));
        assert_eq!(
            to(plan(
                &down,
                &Situation {
                    usable: &usable,
                    sockets: &sockets,
                    locals: &sockets,
                    flows: &[f],
                    bind_new: None,
                    reachable: &|_, _| true
                },
                false
            )),
            loc("10.2.0.1:2"),
            "the kernel's route choice first"
        );
    }

    #[test]
    fn no_loopback_source_towards_a_remote_peer() {
        let sockets = [loc("10.1.0.1:1"), loc("127.0.0.1:1")];
        let f = flow(1, "10.1.0.1:1", "10.9.0.1:80");
        let down = Changes {
            up: vec![],
            down: vec![ip("10.1.0.1")],
        };
        let usable = [ip("127.0.0.1")].into();
        let a = plan(
            &down,
            &Situation {
                usable: &usable,
                sockets: &sockets,
                locals: &sockets,
                flows: &[f],
                bind_new: None,
                reachable: &|_, _| true,
            },
            false,
        );
        assert!(matches!(a.last(), Some(Action::Stranded { .. })), "{a:?}");
    }

    #[test]
    fn unreachable_survivors_are_skipped_and_a_stranded_flow_moves_when_a_route_appears() {
        // A wildcard client renumbered by `ip addr del` then `ip addr add`: between the two,
        // its other link's address cannot reach the peer, so the flow waits rather than
        // start a move that could only fail.
        let sockets = [loc("0.0.0.0:7000")];
        let locals = [
            loc("0.0.0.0:7000"),
            loc("10.1.0.1:7000"),
            loc("10.2.0.1:7000"),
        ];
        let mut f = flow(2, "0.0.0.0:7000", "10.1.0.2:80");
        let only_link1 = |from: IpAddr, _: Locator| from != ip("10.2.0.1");
        let down = Changes {
            up: vec![],
            down: vec![ip("10.1.0.1")],
        };
        let usable: BTreeSet<IpAddr> = [ip("10.2.0.1")].into();
        let at = Situation {
            usable: &usable,
            sockets: &sockets,
            locals: &locals,
            flows: &[f],
            bind_new: None,
            reachable: &only_link1,
        };
        let a = plan(&down, &at, false);
        assert_eq!(
            a.last(),
            Some(&Action::Stranded {
                handle: ConnectionHandle(2),
                from: loc("0.0.0.0:7000")
            })
        );
        // Still nothing on a re-check.
        f.stranded = true;
        let locals = [loc("0.0.0.0:7000"), loc("10.2.0.1:7000")];
        let at = Situation {
            flows: &[f],
            locals: &locals,
            ..at
        };
        assert!(plan(&Changes::default(), &at, true).is_empty());
        // The new address comes: the stranded flow moves there.
        let up = Changes {
            up: vec![ip("10.1.0.7")],
            down: vec![],
        };
        let usable: BTreeSet<IpAddr> = [ip("10.1.0.7"), ip("10.2.0.1")].into();
        let at = Situation {
            usable: &usable,
            ..at
        };
        assert_eq!(
            plan(&up, &at, false),
            vec![
                Action::AddLocal(loc("10.1.0.7:7000")),
                Action::Migrate {
                    handle: ConnectionHandle(2),
                    from: loc("0.0.0.0:7000"),
                    to: loc("10.1.0.7:7000")
                },
            ]
        );
    }
}
