//! Several paths at once (issue 11; docs/moving-flows.md §2).
//!
//! A transport starts with path 0. The SAL adds a path once it has joined it
//! ([`Transport::add_path`]) and marks it usable once it is validated in both directions
//! ([`Transport::set_path_usable`]). Each path has its own packet-number space (its packets'
//! numbers, the ACK frames they carry, and the nonce that seals them are of that path), RTT
//! estimator, congestion controller, pacer, MTU search and probe timer: everything in
//! [`Path`]. The stream, flow control and datagrams are the connection's.
//!
//! * **Where a packet goes** ([`Transport::poll_transmit`]): data goes to the usable path
//!   with the lowest smoothed RTT whose window and pacer allow a packet, then the next
//!   (lowest-RTT-first). A backup path carries data only while no other usable path works.
//!   A path that carries no data still sends what it owes: acknowledgements of what arrived on
//!   it, probes, PINGs.
//! * **Acknowledgements travel on their own path**: an ACK frame in a packet of path `p`
//!   acknowledges packet numbers of `p`. A path that stops carrying packets one way therefore
//!   stops being acknowledged, and is found out by its probe timer.
//! * **A failing path** ([`Transport::on_path_probe_timeout`]): when a path's probe timer
//!   fires while another path works, whatever stream data the path had in flight is queued
//!   again at once (it goes out on the others, without a congestion response there) and the
//!   path carries no new data until an acknowledgement arrives on it. Its probes are PINGs.
//!   The connection as a whole times out only when every path has been silent for the idle
//!   timeout.
//! * **Coupled congestion control**: while two or more paths carry data, each path's
//!   congestion-avoidance increase is limited by RFC 6356's linked increase
//!   ([`Coupling::lia`]), so that the connection takes no more than one flow's share of a
//!   bottleneck its paths share.
//!
//! The path being worked on sits in `Transport::path` (every single-path code path reads it
//! there, unchanged); the others wait in `Transport::others`, and [`Transport::focus`] swaps
//! the one a packet, timer or transmission concerns into place.

use super::path::Path;
use super::{Instant, Transport};
use crate::transport::cc::Coupling;
use core::time::Duration;

/// Most paths a connection runs at once.
pub const MAX_PATHS: usize = 8;

/// One path's state, as [`Transport::paths`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathInfo {
    /// The path's ID (0: the flow's first path).
    pub id: u32,
    /// Validated in both directions: data may be scheduled on it.
    pub usable: bool,
    /// Carries data only while no other usable path works.
    pub backup: bool,
    /// Its probe timer fired while another path worked; no data goes on it until it answers.
    pub failed: bool,
    /// Smoothed round-trip time.
    pub srtt: Duration,
    /// Congestion window, in bytes.
    pub cwnd: u64,
    /// Bytes in flight on the path.
    pub bytes_in_flight: u64,
    /// Current path MTU (UDP payload bytes).
    pub pmtu: u16,
    /// Probe timeouts in a row with nothing acknowledged on the path.
    pub pto_count: u32,
    /// When a packet last arrived on the path.
    pub last_received: Instant,
    /// Bytes sent on the path (UDP payload, SAL header included).
    pub bytes_sent: u64,
    /// Packets sent on the path that copied another path's data
    /// ([`Scheduler::Redundant`](super::Scheduler::Redundant)), while the connection had
    /// several paths.
    pub copies_sent: u64,
}

impl PathInfo {
    fn of(p: &Path, copies_sent: u64) -> PathInfo {
        PathInfo {
            id: p.id,
            usable: p.usable,
            backup: p.backup,
            failed: p.failed,
            srtt: p.rtt.smoothed(),
            cwnd: p.cc.window(),
            bytes_in_flight: p.sent.bytes_in_flight(),
            pmtu: p.mtu.current(),
            pto_count: p.sent.pto_count(),
            last_received: p.last_received,
            bytes_sent: p.bytes_sent,
            copies_sent,
        }
    }
}

impl Transport {
    /// Makes path `id` the one worked on (`self.path`); false if the transport has no such
    /// path.
    pub(super) fn focus(&mut self, id: u32) -> bool {
        if self.path.id == id {
            return true;
        }
        match self.others.iter().position(|p| p.id == id) {
            Some(i) => {
                core::mem::swap(&mut self.path, &mut self.others[i]);
                true
            }
            None => false,
        }
    }

    /// The flow's primary path: path 0, or the lowest-numbered path once path 0 is gone.
    pub(super) fn primary(&self) -> &Path {
        if self.others.is_empty() {
            return &self.path;
        }
        core::iter::once(&self.path)
            .chain(self.others.iter())
            .min_by_key(|p| p.id)
            .unwrap_or(&self.path)
    }

    /// Where the primary path is: `None` in `self.path`, `Some(i)` in `self.others[i]`.
    pub(super) fn primary_index(&self) -> Option<usize> {
        if self.others.is_empty() {
            return None;
        }
        let id = self.primary().id;
        if self.path.id == id {
            return None;
        }
        self.others.iter().position(|p| p.id == id)
    }

    /// The primary path, mutably (without making it the one worked on).
    pub(super) fn primary_mut(&mut self) -> &mut Path {
        match self.primary_index() {
            Some(i) => &mut self.others[i],
            None => &mut self.path,
        }
    }

    /// Makes the primary path the one worked on.
    pub(super) fn focus_primary(&mut self) {
        if self.others.is_empty() {
            return;
        }
        let id = self.primary().id;
        self.focus(id);
    }

    /// Adds path `id` (joined by the SAL, not yet usable: nothing is sent on it until
    /// [`set_path_usable`](Self::set_path_usable)). False, changing nothing, if the path
    /// exists, the transport already has [`MAX_PATHS`] paths, or it is closed.
    pub fn add_path(&mut self, id: u32, now: Instant) -> bool {
        if self.is_closed() || self.has_path(id) || self.others.len() + 1 >= MAX_PATHS {
            return false;
        }
        let config = self.config();
        let mut p = Path::with_id(id, &config, now);
        // Start from what the flow knows of its paths' round trip rather than the 333 ms
        // guess (a second path to the same peer is most likely about as far), provisionally:
        // the path's own first sample replaces it.
        let prior = &self.primary().rtt;
        if prior.has_sample() {
            p.rtt.provisional(prior.smoothed());
        }
        if !prior.is_measured() {
            // The scheduler compares the paths' RTTs: a primary that has carried nothing yet
            // (its estimate is the handshake's, which includes the peer's key exchange, or
            // none) measures its own with a PING, or the new path, measured by a bare PING as
            // it comes up, would look faster whatever it is.
            self.primary_mut().ping_pending = true;
        }
        self.others.push(p);
        true
    }

    /// Removes path `id` (gone: its address or link disappeared, or the peer abandoned it):
    /// what it had in flight is queued again for the other paths, without a congestion
    /// response. The last path cannot be removed (false).
    pub fn remove_path(&mut self, id: u32) -> bool {
        if self.others.is_empty() || !self.focus(id) {
            return false;
        }
        for p in self.path.sent.drain() {
            self.requeue(&p.payload);
        }
        if let Some(extra) = self.others.extra() {
            extra.forget(id);
        }
        // Bring another path into place and drop this one.
        match self.others.swap_remove(0) {
            Some(next) => {
                self.path = next;
                true
            }
            None => false,
        }
    }

    /// Whether the transport has path `id`.
    pub fn has_path(&self, id: u32) -> bool {
        self.path.id == id || self.others.iter().any(|p| p.id == id)
    }

    /// Marks path `id` usable (validated both ways) or not; a path made usable sends a PING at
    /// once, so that the peer sees it work too.
    /// Made unusable (its SAL moves it), what it had in flight is queued again for the
    /// others.
    pub fn set_path_usable(&mut self, id: u32, usable: bool) {
        if self.focus(id) && self.path.usable != usable {
            self.path.usable = usable;
            if usable {
                self.path.ping_pending = true;
            } else {
                for p in self.path.sent.drain() {
                    self.requeue(&p.payload);
                }
                self.path.pto_probes = 0;
            }
        }
    }

    /// Marks path `id` as a backup (data only while no other usable path works) or not.
    pub fn set_path_backup(&mut self, id: u32, backup: bool) {
        if self.focus(id) {
            self.path.backup = backup;
        }
    }

    /// Every path's state, path 0 (or the lowest ID) first.
    pub fn paths(&self) -> Vec<PathInfo> {
        let mut v: Vec<PathInfo> = core::iter::once(&self.path)
            .chain(self.others.iter())
            .map(|p| PathInfo::of(p, self.others.copies_sent(p.id)))
            .collect();
        v.sort_by_key(|p| p.id);
        v
    }

    /// Path `id`'s state, if the transport has it (as [`paths`](Self::paths) reports it,
    /// without building the list).
    pub fn path_info(&self, id: u32) -> Option<PathInfo> {
        core::iter::once(&self.path)
            .chain(self.others.iter())
            .find(|p| p.id == id)
            .map(|p| PathInfo::of(p, self.others.copies_sent(id)))
    }

    /// Whether path `id` is usable and not failing: data may go on it.
    pub fn path_works(&self, id: u32) -> bool {
        core::iter::once(&self.path)
            .chain(self.others.iter())
            .any(|p| p.id == id && p.carries_data())
    }

    /// The idle timeout in force.
    pub fn idle_timeout(&self) -> Duration {
        self.config.idle_timeout()
    }

    /// The path of the packet [`poll_transmit`](Self::poll_transmit) last built (or that
    /// arrived last): the SAL addresses and seals that packet for this path.
    pub fn current_path(&self) -> u32 {
        self.path.id
    }

    /// The largest of our packet numbers on path `id` the peer has acknowledged.
    pub fn largest_acked_on(&self, id: u32) -> Option<u64> {
        core::iter::once(&self.path)
            .chain(self.others.iter())
            .find(|p| p.id == id)
            .and_then(|p| p.sent.largest_acked())
    }

    /// Whether some path other than the one worked on carries data (usable and not failed).
    fn another_carries_data(&self) -> bool {
        self.others.iter().any(Path::carries_data)
    }

    /// The probe timer of the path worked on fired (`pto_probes` armed). With another path
    /// carrying data, this path is failing: what it had in flight goes out again on the
    /// others now, and it carries no new data until it is acknowledged again.
    pub(super) fn on_path_probe_timeout(&mut self) {
        if self.others.is_empty() || self.path.failed || !self.another_carries_data() {
            return;
        }
        self.path.failed = true;
        self.stats.path_failures = self.stats.path_failures.saturating_add(1);
        let payloads: Vec<_> = self
            .path
            .sent
            .outstanding()
            .filter(|(_, _, p)| p.n_chunks > 0 || p.max_data)
            .map(|(_, _, p)| *p)
            .collect();
        for p in &payloads {
            self.requeue(p);
        }
    }

    /// Multipath: when path `p` counts as stalled — the oldest packet it has in flight sent a
    /// probe period ago and still neither acknowledged nor declared lost — while another path
    /// carries data. Its probe timer cannot tell: that timer runs from the latest packet sent,
    /// and a sender that goes on scheduling data on a silent path (its RTT lowest, its window
    /// not yet full) keeps pushing it back. `None` with one path.
    pub(super) fn stall_deadline(&self, p: &Path) -> Option<Instant> {
        if self.others.is_empty() || !p.carries_data() {
            return None;
        }
        let other_works = core::iter::once(&self.path)
            .chain(self.others.iter())
            .any(|q| q.id != p.id && q.carries_data());
        if !other_works {
            return None;
        }
        let (_, oldest, _) = p.sent.outstanding().find(|(_, info, _)| info.in_flight)?;
        Some(oldest.time_sent + p.rtt.pto_period())
    }

    /// An acknowledgement arrived on the path worked on: if it was failing, it works again.
    pub(super) fn on_path_acked(&mut self) {
        if self.path.failed {
            self.path.failed = false;
            self.stats.path_recoveries = self.stats.path_recoveries.saturating_add(1);
        }
    }

    /// RFC 6356's coupling over the paths that carry data, if two or more do.
    pub(super) fn coupling(&self) -> Option<Coupling> {
        if self.others.is_empty() {
            return None;
        }
        Coupling::lia(
            core::iter::once(&self.path)
                .chain(self.others.iter())
                .filter(|p| p.carries_data() && p.rtt.has_sample())
                .map(|p| (p.cc.window(), p.rtt.smoothed())),
        )
    }

    /// [`handle_timeout`](Self::handle_timeout)'s per-path timers, for every path.
    pub(super) fn handle_timeout_multipath(&mut self, now: Instant) {
        let mut ids = [0u32; MAX_PATHS];
        let mut n = 0;
        for p in core::iter::once(&self.path).chain(self.others.iter()) {
            if n < MAX_PATHS {
                ids[n] = p.id;
                n += 1;
            }
        }
        for &id in &ids[..n] {
            if self.focus(id) {
                self.handle_path_timeout(now);
            }
        }
    }
}
