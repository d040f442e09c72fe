//! The SAL's side of multipath (issue 11; docs/moving-flows.md §2, wire.md §16): joining
//! paths to a flow, and which flowIDs and locators each path's packets carry.
//!
//! Path 0 is the flow itself (`Connection::local_flow`, `peer_flow`, `local`, `peer`). Every
//! other path has a flowID pair of its own, so that the endpoint still demultiplexes by
//! flowID alone and an observer cannot link the paths by their headers:
//!
//! ```text
//! joiner (new local locator L)                     responder
//!   JOIN     src = F_j (new), dst = peer's path-0 flowID, verno = path ID   --->
//!            (control packet sealed under the flow's keys: only a holder of the keys joins)
//!                                                  allocates F_r, adds the path (not usable)
//!   <---     JOIN|ACK  src = F_r, dst = F_j, verno = ackno = path ID, to the JOIN's source
//!   path usable; PING on the path (src = F_j, dst = F_r, sealed with the path's nonce)  --->
//!                                                  the first packet to F_r proves the joiner
//!                                                  receives at L: the path is usable
//! ```
//!
//! The JOIN|ACK is the same size as the JOIN and is sent once per JOIN received, so a
//! joiner naming a victim's address as its source gets nothing amplified toward it, and it
//! cannot learn `F_r` unless it receives there. The joiner retransmits its JOIN on its own
//! timer (not the control channel's: a join never holds up a FIN or an RSYN) and gives the
//! path up after [`JOIN_TRIES`] unanswered JOINs. The client numbers the paths it joins
//! odd, the server even, so the two never pick the same ID.

use std::time::Duration;

use serval_wire::ext::{ControlFlags, ControlRepr};
use serval_wire::{FlowId, Locator, Protocol, SalPacket, SalRepr};

use super::{ConnEvent, Connection, Role, State};
use crate::Instant;
use crate::frame::PN_LEN;

/// JOINs sent for one path before the join is given up.
pub const JOIN_TRIES: u8 = 6;

/// In a JOIN's `ackno`: the joiner asks that the path be a backup at both ends.
const JOIN_BACKUP: u32 = 1;

/// A JOIN|RSYN's `ackno`: the path ID in the low 31 bits, this bit set for a backup.
const PRIORITY_BACKUP: u32 = 1 << 31;

/// Path IDs stay below this (a JOIN|RSYN carries one in 31 bits).
const MAX_PATH_ID: u32 = PRIORITY_BACKUP - 1;

/// Where a path other than path 0 stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Joiner: JOIN sent (or due at `next`), waiting for the JOIN|ACK.
    Joining {
        next: Instant,
        rto: Duration,
        tries: u8,
    },
    /// Responder: the path exists, the JOIN|ACK was sent (or is due); waiting for the
    /// joiner's first packet on the path, which validates it. Given up at `until`.
    Answering { ack_due: bool, until: Instant },
    /// Validated both ways: carries traffic.
    Active,
}

/// A connection's multipath state (boxed: most connections have one path).
#[derive(Debug, Clone, Default)]
pub(crate) struct Paths {
    /// The paths other than path 0.
    list: Vec<SubPath>,
    /// FlowIDs of paths gone, for the endpoint to forget.
    retired: Vec<FlowId>,
    /// Paths this end removed, whose removal the peer is still to be told (JOIN|FIN,
    /// reliable, one at a time, the first in flight).
    abandoned: Vec<u32>,
    /// Our other locators, announced to the peer (JOIN|SYN).
    announce: Vec<Locator>,
    /// The peer's other locators, as it announced them.
    peer_addresses: Vec<Locator>,
    /// The route (our locator, the peer's) the peer's latest packet of path 0 came by, when
    /// that was another path's locators: the peer found path 0 failing, so our control
    /// packets go back that way too.
    control_via: Option<(Locator, Locator)>,
    /// The highest path ID this end has used, and the highest the peer has joined: an ID is
    /// never used twice in a flow (a path's packet numbers start from 0, and its nonces carry
    /// its ID: a second path with an old ID would repeat nonces under the same key).
    last_own_id: u32,
    last_peer_id: u32,
    /// Backup flags changed after the join, to tell the peer (JOIN|RSYN, reliable, one at a
    /// time, the first in flight): (path ID, backup). At most one entry per path besides the
    /// first.
    priorities: Vec<(u32, bool)>,
}

/// Takes the acknowledged head off a queue of reliable JOIN packets' contents; whether another
/// waits to be sent.
fn next_after_ack<T>(queue: &mut Vec<T>) -> bool {
    if !queue.is_empty() {
        queue.remove(0);
    }
    !queue.is_empty()
}

/// Most locators one JOIN|SYN announces (and a peer's announcement keeps).
pub const MAX_ANNOUNCED: usize = 8;

/// One path other than path 0.
#[derive(Debug, Clone)]
pub(crate) struct SubPath {
    pub(crate) id: u32,
    /// Our flowID on this path (an alias of the flow in the endpoint's flow table).
    pub(crate) local_flow: FlowId,
    /// The peer's flowID on this path (none until the joiner hears the JOIN|ACK).
    pub(crate) peer_flow: FlowId,
    pub(crate) local: Locator,
    pub(crate) peer: Locator,
    backup: bool,
    stage: Stage,
}

/// A path of the flow, as [`Endpoint::paths`](crate::endpoint::Endpoint::paths) reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathSummary {
    /// The path's ID (0: the flow's first path).
    pub id: u32,
    /// Our locator on the path.
    pub local: Locator,
    /// The peer's locator on the path.
    pub remote: Locator,
    /// Joined and validated both ways (path 0 always is).
    pub active: bool,
    /// Transport state of the path, once active.
    pub transport: Option<crate::transport::conn::PathInfo>,
}

/// Why [`Endpoint::add_path`](crate::endpoint::Endpoint::add_path) refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddPathError {
    /// The connection is not established (or closing, or moving between hosts).
    #[error("the connection is not established")]
    NotEstablished,
    /// A path already runs between these two locators.
    #[error("a path already runs between these locators")]
    Exists,
    /// The connection already has as many paths as it may.
    #[error("the connection already has {0} paths")]
    TooMany(usize),
    /// The local locator is not one of the endpoint's.
    #[error("{0} is not a local locator of this endpoint")]
    NotLocal(Locator),
    /// The connection is copied to a hot standby, whose checkpoints carry one path.
    #[error("the connection is replicated to a standby, which mirrors one path")]
    Replicated,
}

impl Connection {
    /// The multipath state, allocated on first use.
    fn mp(&mut self) -> &mut Paths {
        self.subpaths.get_or_insert_default()
    }

    /// The paths other than path 0.
    fn sub(&self) -> &[SubPath] {
        self.subpaths.as_deref().map_or(&[], |m| &m.list)
    }

    fn sub_mut(&mut self) -> &mut [SubPath] {
        self.subpaths
            .as_deref_mut()
            .map_or(&mut [], |m| &mut m.list)
    }

    /// The flowIDs of paths gone, for the endpoint to forget.
    pub(crate) fn take_retired_flows(&mut self) -> Vec<FlowId> {
        self.subpaths
            .as_deref_mut()
            .map(|m| core::mem::take(&mut m.retired))
            .unwrap_or_default()
    }

    /// Paths the peer joined that wait for a flowID of ours (the endpoint allocates them,
    /// [`grant_flow`](Self::grant_flow)).
    pub(crate) fn paths_wanting_flow(&self) -> impl Iterator<Item = u32> + '_ {
        self.sub()
            .iter()
            .filter(|p| p.local_flow.is_none())
            .map(|p| p.id)
    }

    /// Our flowID for path `id`, which the peer joined: its JOIN|ACK goes out from it. Returns
    /// the path's local locator, `None` if there is no such path waiting.
    pub(crate) fn grant_flow(&mut self, id: u32, flow: FlowId) -> Option<Locator> {
        let p = self
            .sub_mut()
            .iter_mut()
            .find(|p| p.id == id && p.local_flow.is_none())?;
        p.local_flow = flow;
        Some(p.local)
    }

    /// Every flowID of ours the flow uses besides `local_flow` (the endpoint's aliases).
    pub(crate) fn alias_flows(&self) -> impl Iterator<Item = FlowId> + '_ {
        self.sub()
            .iter()
            .map(|p| p.local_flow)
            .filter(|f| !f.is_none())
    }

    /// Announces our other locators to the peer (JOIN|SYN, reliable), for it to join paths
    /// to them. Nothing if there are none.
    pub(crate) fn announce_addresses(&mut self, mut locals: Vec<Locator>) {
        locals.retain(|l| *l != self.local);
        locals.truncate(MAX_ANNOUNCED);
        if locals.is_empty() || self.state != State::Established {
            return;
        }
        self.mp().announce = locals;
        self.send_reliable(super::Reliable::Addresses);
    }

    /// What a JOIN|SYN of ours carries.
    pub(crate) fn announced_addresses(&self) -> Vec<Locator> {
        self.subpaths
            .as_deref()
            .map(|m| m.announce.clone())
            .unwrap_or_default()
    }

    /// The peer's locators: path 0's, then those it announced.
    pub(crate) fn peer_locators(&self) -> Vec<Locator> {
        let mut v = vec![self.peer];
        if let Some(m) = self.subpaths.as_deref() {
            v.extend(m.peer_addresses.iter().copied());
        }
        v
    }

    /// Gives up joins from `local` to a remote other than `remote` that are still unanswered
    /// (a better peer locator for that local one became known). Their flowIDs wait in
    /// `retired`.
    pub(crate) fn cancel_joins_from(&mut self, local: Locator, remote: Locator) {
        let stale: Vec<u32> = self
            .sub()
            .iter()
            .filter(|p| {
                p.local == local && p.peer != remote && matches!(p.stage, Stage::Joining { .. })
            })
            .map(|p| p.id)
            .collect();
        for id in stale {
            if let Some(flow) = self.drop_path(id) {
                self.mp().retired.push(flow);
            }
        }
    }

    /// Where a control packet of the flow goes (it always carries path 0's flowIDs): path 0's
    /// locators, unless path 0 is failing or paused and another path works — then that
    /// path's, so that a FIN or an announcement does not wait on a dead path.
    pub(crate) fn control_route(&self) -> (Locator, Locator) {
        let primary = (self.local, self.peer);
        if !self.has_active_subpath() {
            return primary;
        }
        if let Some(via) = self.subpaths.as_deref().and_then(|m| m.control_via) {
            return via;
        }
        if self.transport.path_works(0) {
            return primary;
        }
        self.sub()
            .iter()
            .find(|p| p.stage == Stage::Active && self.transport.path_works(p.id))
            .map_or(primary, |p| (p.local, p.peer))
    }

    /// A packet of path 0 arrived at `local` from `remote`: by path 0's own locators, or by
    /// another path's (the peer routes its control packets around a failing path 0, and so
    /// do we from now on, until one comes by path 0 again).
    pub(crate) fn note_control_route(&mut self, local: Locator, remote: Locator) {
        let Some(m) = self.subpaths.as_deref_mut() else {
            return;
        };
        if remote == self.peer {
            m.control_via = None;
        } else if m
            .list
            .iter()
            .any(|p| p.peer == remote && p.stage == Stage::Active)
        {
            m.control_via = Some((local, remote));
        }
    }

    /// Whether `remote` is the peer's locator on one of the flow's other paths.
    pub(crate) fn is_subpath_peer(&self, remote: Locator) -> bool {
        self.sub().iter().any(|p| p.peer == remote)
    }

    /// Whether a path other than path 0 is active and not failing.
    pub(crate) fn has_working_subpath(&self) -> bool {
        if !self.has_active_subpath() {
            return false;
        }
        self.sub()
            .iter()
            .any(|p| p.stage == Stage::Active && self.transport.path_works(p.id))
    }

    /// Whether a path other than path 0 carries traffic.
    pub(crate) fn has_active_subpath(&self) -> bool {
        self.sub().iter().any(|p| p.stage == Stage::Active)
    }

    /// The endpoint no longer holds `local`: the paths from it (not path 0, which moves by
    /// RSYN) are removed, what they carried going out on the others, and the peer is told.
    /// Returns their flowIDs for the endpoint to forget.
    pub(crate) fn local_gone(&mut self, local: Locator) -> Vec<FlowId> {
        let ids: Vec<u32> = self
            .sub()
            .iter()
            .filter(|p| p.local == local)
            .map(|p| p.id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.remove_path(id))
            .collect()
    }

    /// Whether a path (any stage) runs from `local` to `remote`.
    pub(crate) fn has_route(&self, local: Locator, remote: Locator) -> bool {
        (self.local == local && self.peer == remote)
            || self
                .sub()
                .iter()
                .any(|p| p.local == local && p.peer == remote)
    }

    /// How many paths the flow has (path 0 included).
    pub(crate) fn path_count(&self) -> usize {
        1 + self.sub().len()
    }

    /// The path a packet addressed to our flowID `dst` belongs to.
    pub(crate) fn path_of(&self, dst: FlowId) -> Option<u32> {
        if dst == self.local_flow {
            return Some(0);
        }
        self.sub()
            .iter()
            .find(|p| p.local_flow == dst)
            .map(|p| p.id)
    }

    /// Starts joining a path from `local` to `remote`, with our flowID `flow` on it (the
    /// endpoint allocated it as an alias of this flow). Returns the path's ID.
    pub(crate) fn join_path(
        &mut self,
        local: Locator,
        remote: Locator,
        flow: FlowId,
        backup: bool,
    ) -> Result<u32, AddPathError> {
        if self.state != State::Established || self.export_freeze.is_some() {
            return Err(AddPathError::NotEstablished);
        }
        let same = |l: Locator, r: Locator| l == local && r == remote;
        if same(self.local, self.peer) || self.sub().iter().any(|p| same(p.local, p.peer)) {
            return Err(AddPathError::Exists);
        }
        let max = crate::transport::conn::MAX_PATHS;
        if self.sub().len() + 1 >= max {
            return Err(AddPathError::TooMany(max));
        }
        // Client paths odd, server paths even (path 0 is the flow's own).
        let parity = match self.role {
            Role::Client => 1,
            Role::Server => 2,
        };
        let last = self.subpaths.as_deref().map_or(0, |m| m.last_own_id);
        let id = if last == 0 {
            parity
        } else {
            last.checked_add(2)
                .filter(|&id| id <= MAX_PATH_ID)
                .ok_or(AddPathError::TooMany(max))?
        };
        self.mp().last_own_id = id;
        let rto = self.transport.pto_period().max(Duration::from_millis(10));
        self.mp().list.push(SubPath {
            id,
            local_flow: flow,
            peer_flow: FlowId::NONE,
            local,
            peer: remote,
            backup,
            stage: Stage::Joining {
                // Due at once.
                next: Instant::ZERO,
                rto,
                tries: 0,
            },
        });
        Ok(id)
    }

    /// Removes path `id` (not path 0): its data goes out on the others. Returns its flowID
    /// for the endpoint to forget, `None` if there is no such path.
    pub(crate) fn remove_path(&mut self, id: u32) -> Option<FlowId> {
        let flow = self.drop_path(id)?;
        // An active or joining path: the peer has (or is about to have) it too.
        if self.state == State::Established {
            self.mp().abandoned.push(id);
            self.send_reliable(super::Reliable::Removal);
        }
        Some(flow)
    }

    /// The `ackno` of the JOIN|FIN in flight: the first removed path not yet acknowledged.
    pub(crate) fn removal_to_send(&self) -> Option<u32> {
        self.subpaths.as_deref()?.abandoned.first().copied()
    }

    /// The peer acknowledged our JOIN|FIN: the next removal, if any, goes out.
    pub(crate) fn removal_acked(&mut self) {
        if next_after_ack(&mut self.mp().abandoned) {
            self.send_reliable(super::Reliable::Removal);
        }
    }

    /// Removes path `id` without telling the peer (it told us, or it never answered).
    fn drop_path(&mut self, id: u32) -> Option<FlowId> {
        let paths = &mut self.subpaths.as_mut()?.list;
        let i = paths.iter().position(|p| p.id == id)?;
        let p = paths.swap_remove(i);
        self.transport.remove_path(id);
        if let Some(protect) = self.protect.as_deref_mut() {
            protect.remove_path(id);
        }
        // The application heard of the path if it asked for it or saw it come up; a join of
        // the peer's that never completed goes quietly.
        if !matches!(p.stage, Stage::Answering { .. }) {
            self.events.push_back(ConnEvent::PathDown(id));
        }
        Some(p.local_flow)
    }

    /// Marks path `id` as a backup (data only while no other path works) or not.
    pub(crate) fn set_path_backup(&mut self, id: u32, backup: bool) -> bool {
        let Some(p) = self.sub_mut().iter_mut().find(|p| p.id == id) else {
            return false;
        };
        let changed = p.backup != backup;
        // A JOIN not yet sent carries the flag itself; once the peer may know the path, it
        // is told (JOIN|RSYN).
        let peer_knows = !matches!(p.stage, Stage::Joining { tries: 0, .. });
        p.backup = backup;
        self.transport.set_path_backup(id, backup);
        if changed && peer_knows && self.state == State::Established {
            let queue = &mut self.mp().priorities;
            match queue.iter_mut().skip(1).find(|(q, _)| *q == id) {
                Some(entry) => entry.1 = backup,
                None => queue.push((id, backup)),
            }
            self.send_reliable(super::Reliable::Priority);
        }
        true
    }

    /// The `ackno` of the JOIN|RSYN in flight: the first change not yet acknowledged.
    pub(crate) fn priority_to_send(&self) -> Option<u32> {
        let &(id, backup) = self.subpaths.as_deref()?.priorities.first()?;
        Some(id | if backup { PRIORITY_BACKUP } else { 0 })
    }

    /// The peer acknowledged our JOIN|RSYN: the next change, if any, goes out.
    pub(crate) fn priority_acked(&mut self) {
        if next_after_ack(&mut self.mp().priorities) {
            self.send_reliable(super::Reliable::Priority);
        }
    }

    /// The peer changed a path's backup flag (JOIN|RSYN, `ackno` as
    /// [`priority_to_send`](Self::priority_to_send) makes it): so does our scheduler. A path
    /// we do not have (gone, or not yet joined here) is ignored.
    fn on_priority(&mut self, ackno: u32) {
        let (id, backup) = (ackno & MAX_PATH_ID, ackno & PRIORITY_BACKUP != 0);
        if let Some(p) = self.sub_mut().iter_mut().find(|p| p.id == id) {
            p.backup = backup;
            self.transport.set_path_backup(id, backup);
        }
    }

    /// The flow's paths, path 0 first.
    pub(crate) fn path_summaries(&self) -> Vec<PathSummary> {
        let info = self.transport.paths();
        let find = |id: u32| info.iter().find(|i| i.id == id).copied();
        let mut v = vec![PathSummary {
            id: 0,
            local: self.local,
            remote: self.peer,
            active: true,
            transport: find(0),
        }];
        for p in self.sub().iter() {
            let active = p.stage == Stage::Active;
            v.push(PathSummary {
                id: p.id,
                local: p.local,
                remote: p.peer,
                active,
                transport: find(p.id).filter(|_| active),
            });
        }
        v
    }

    /// A packet of the JOIN family, authentic: a JOIN (the peer joins a path: it gets our
    /// flowID once the endpoint grants one, [`grant_flow`](Self::grant_flow)), a JOIN|ACK
    /// (answering ours), a JOIN|FIN (the peer removed a path) or a JOIN|SYN (the peer's
    /// locators, in `source`). `dst` is the flowID it was sent to, `src` the sender's; it
    /// arrived at `local` from `remote`.
    pub(crate) fn on_join(
        &mut self,
        now: Instant,
        (local, remote): (Locator, Locator),
        (src, dst): (FlowId, FlowId),
        (ctl, source): (ControlRepr, &[Locator]),
    ) {
        if self.state != State::Established {
            return;
        }
        let flow_level = ctl
            .flags
            .intersects(ControlFlags::SYN | ControlFlags::FIN | ControlFlags::RSYN);
        if flow_level && (src != self.peer_flow || dst != self.local_flow) {
            // Announcements, priorities and removals travel on path 0's flowIDs.
            self.auth_failures += 1;
            return;
        }
        if ctl.flags.contains(ControlFlags::RSYN) {
            // A path's new backup flag, on the reliable control channel.
            if self.fresh(ctl.verno) {
                self.on_priority(ctl.ackno);
            }
            self.answers.push_back(super::Answer::Ack(ctl.verno));
            return;
        }
        if ctl.flags.contains(ControlFlags::FIN) {
            // The peer removed a path, on the reliable control channel: so do we (path 0 is
            // the flow's, never removed so).
            let id = ctl.ackno & MAX_PATH_ID;
            if self.fresh(ctl.verno)
                && id != 0
                && let Some(flow) = self.drop_path(id)
            {
                self.mp().retired.push(flow);
            }
            self.answers.push_back(super::Answer::Ack(ctl.verno));
            return;
        }
        if ctl.flags.contains(ControlFlags::SYN) {
            // An announcement of the peer's locators, on the reliable control channel.
            if self.fresh(ctl.verno) {
                let mut addrs: Vec<Locator> = source
                    .iter()
                    .filter(|l| **l != self.peer)
                    .take(MAX_ANNOUNCED)
                    .copied()
                    .collect();
                addrs.dedup();
                self.mp().peer_addresses = addrs;
                self.events.push_back(ConnEvent::PeerAddresses);
            }
            self.answers.push_back(super::Answer::Ack(ctl.verno));
            return;
        }
        let id = ctl.verno;
        if ctl.flags.contains(ControlFlags::ACK) {
            // Our join's answer: it came back over the path, to the flowID we chose for it.
            let Some(p) = self
                .sub_mut()
                .iter_mut()
                .find(|p| p.id == id && p.local_flow == dst)
            else {
                return;
            };
            if !matches!(p.stage, Stage::Joining { .. }) || src.is_none() {
                return;
            }
            p.peer_flow = src;
            p.stage = Stage::Active;
            let backup = p.backup;
            if let Some(protect) = self.protect.as_deref_mut() {
                protect.add_path(id);
            }
            self.transport.add_path(id, now);
            self.transport.set_path_backup(id, backup);
            self.transport.set_path_usable(id, true);
            self.events.push_back(ConnEvent::PathUp(id));
            return;
        }
        // The peer joins: its IDs have the other parity than ours.
        let theirs = match self.role {
            Role::Client => id.is_multiple_of(2),
            Role::Server => !id.is_multiple_of(2),
        };
        if !theirs || id == 0 || dst != self.local_flow || src.is_none() {
            return;
        }
        let idle = self.transport.idle_timeout();
        if let Some(p) = self.sub_mut().iter_mut().find(|p| p.id == id) {
            // A retransmitted JOIN (our answer was lost): answer again, from the same
            // path. Another flowID or source for a known path ID is not that.
            if p.peer_flow == src
                && p.peer == remote
                && p.local == local
                && let Stage::Answering { ack_due, .. } = &mut p.stage
            {
                *ack_due = true;
            }
            return;
        }
        let max = crate::transport::conn::MAX_PATHS;
        // A new path has a higher ID than any the peer joined before (IDs are never reused:
        // our packets on it would repeat the old path's nonces).
        let last = self.subpaths.as_deref().map_or(0, |m| m.last_peer_id);
        if self.sub().len() + 1 >= max || id <= last || id > MAX_PATH_ID {
            return;
        }
        self.mp().last_peer_id = id;
        if let Some(protect) = self.protect.as_deref_mut() {
            protect.add_path(id);
        }
        let backup = ctl.ackno & JOIN_BACKUP != 0;
        self.transport.add_path(id, now);
        self.transport.set_path_backup(id, backup);
        self.mp().list.push(SubPath {
            id,
            // Granted by the endpoint once this packet is handled.
            local_flow: FlowId::NONE,
            peer_flow: src,
            local,
            peer: remote,
            backup,
            stage: Stage::Answering {
                ack_due: true,
                until: now + idle,
            },
        });
    }

    /// An authentic packet of path `id` (not 0), opened in place in `packet` (a header of
    /// `header_len` bytes, the packet number, `body_len` bytes of payload): control packets
    /// other than JOIN travel on path 0, so this is a stream packet for the transport. The
    /// first one on a path the peer joined validates it (only a joiner that received our
    /// JOIN|ACK knows the flowID it is addressed to).
    pub(crate) fn on_subpath_packet(
        &mut self,
        now: Instant,
        id: u32,
        repr: &SalRepr,
        packet: &[u8],
        header_len: usize,
        body_len: usize,
    ) {
        let Some(p) = self.sub_mut().iter_mut().find(|p| p.id == id) else {
            return;
        };
        if matches!(p.stage, Stage::Answering { .. }) {
            p.stage = Stage::Active;
            self.transport.set_path_usable(id, true);
            self.events.push_back(ConnEvent::PathUp(id));
        }
        self.transport.on_peer_activity(now);
        let stream = repr.protocol == Protocol::STREAM && repr.control.is_none();
        if !stream || body_len == 0 || self.state != State::Established {
            return;
        }
        let payload = &packet[header_len..header_len + PN_LEN + body_len];
        if let Err(e) = self.transport.handle_packet_on(now, id, payload) {
            if e.is_fatal() {
                self.flush_transport = true;
                self.close_now(super::CloseReason::ProtocolViolation);
                return;
            }
            self.malformed += 1;
        }
        // Path-validation frames concern path 0's peer address; on another path they mean
        // nothing.
        while self.transport.poll_path_frame().is_some() {}
        self.pump_transport(now);
    }

    /// The source flowID a packet on path `id` must carry.
    pub(crate) fn peer_flow_on(&self, id: u32) -> Option<FlowId> {
        if id == 0 {
            return Some(self.peer_flow);
        }
        self.sub().iter().find(|p| p.id == id).map(|p| p.peer_flow)
    }

    /// Rewrites the stream packet at `out[base..]` (header written for path 0) for path `id`:
    /// its flowIDs. Returns its route.
    pub(crate) fn address_for_path(
        &self,
        id: u32,
        out: &mut [u8],
        base: usize,
    ) -> Option<(Locator, Locator)> {
        if id == 0 {
            return Some((self.local, self.peer));
        }
        let p = self.sub().iter().find(|p| p.id == id)?;
        let mut pkt = SalPacket::new_unchecked(&mut out[base..]);
        pkt.set_src_flow(p.local_flow);
        pkt.set_dst_flow(p.peer_flow);
        Some((p.local, p.peer))
    }

    /// The next JOIN or JOIN|ACK due, sealed, with its route.
    pub(crate) fn poll_join_transmit(
        &mut self,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Option<(Locator, Locator)> {
        if self.state != State::Established {
            return None;
        }
        let peer_flow = self.peer_flow;
        let p = self.sub_mut().iter_mut().find(|p| match p.stage {
            Stage::Joining { next, .. } => next <= now,
            Stage::Answering { ack_due, .. } => ack_due && !p.local_flow.is_none(),
            Stage::Active => false,
        })?;
        let (flags, dst) = match &mut p.stage {
            Stage::Joining { next, rto, tries } => {
                *tries += 1;
                *next = now + *rto;
                *rto = rto.saturating_mul(2);
                (ControlFlags::JOIN, peer_flow)
            }
            Stage::Answering { ack_due, .. } => {
                *ack_due = false;
                (ControlFlags::JOIN | ControlFlags::ACK, p.peer_flow)
            }
            Stage::Active => return None,
        };
        let mut repr = SalRepr::new(Protocol::NONE, p.local_flow, dst);
        repr.control = Some(ControlRepr {
            flags,
            verno: p.id,
            // A JOIN's ackno carries the joiner's wishes for the path: bit 0, backup.
            ackno: if flags.contains(ControlFlags::ACK) {
                p.id
            } else {
                if p.backup { JOIN_BACKUP } else { 0 }
            },
        });
        let route = (p.local, p.peer);
        self.emit_sealed(&repr, out).then_some(route)
    }

    /// Gives up joins that went unanswered [`JOIN_TRIES`] times and answered joins the
    /// joiner never used, and removes paths that failed for good (silent for the idle
    /// timeout). Their flowIDs wait in `retired` for the endpoint to forget.
    pub(crate) fn expire_paths(&mut self, now: Instant) {
        let idle = self.transport.idle_timeout();
        let dead: Vec<u32> = self
            .sub()
            .iter()
            .filter(|p| match p.stage {
                Stage::Joining { next, tries, .. } => tries >= JOIN_TRIES && next <= now,
                Stage::Answering { until, .. } => until <= now,
                Stage::Active => self
                    .transport
                    .path_info(p.id)
                    .is_some_and(|i| i.failed && i.last_received + idle <= now),
            })
            .map(|p| p.id)
            .collect();
        for id in dead {
            if let Some(flow) = self.drop_path(id) {
                self.mp().retired.push(flow);
            }
        }
    }

    /// The earliest JOIN retransmission or path expiry.
    pub(crate) fn paths_timeout(&self) -> Option<Instant> {
        self.sub()
            .iter()
            .filter_map(|p| match p.stage {
                Stage::Joining { next, .. } => Some(next),
                // A JOIN|ACK due goes with the next transmission, which follows the JOIN.
                Stage::Answering { until, .. } => Some(until),
                Stage::Active => None,
            })
            .min()
    }
}
