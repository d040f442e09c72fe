//! Output commit, for a hot standby (docs/moving-flows.md §3.3).
//!
//! A primary whose connections a standby replicates must never let the client see an effect
//! of state the standby does not hold: an acknowledgement of bytes the standby never got
//! (the client would not send them again, and they would be lost at a takeover), or bytes
//! sent from a position the standby does not know (it would send other bytes, or the same
//! ones twice, at those offsets). The engine keeps that rule at the only place every effect
//! passes through, its output: while holding is on, every datagram a connection produces
//! once it was first checkpointed is *held*, numbered per connection. A [`checkpoint`] snapshots the
//! connection as it is — which includes the effect of every datagram produced so far (packet
//! numbers used, data in flight, what is acknowledged) — and returns the number of datagrams
//! produced up to it (its [`CommitMark`]). Once the standby has confirmed that checkpoint,
//! [`commit`] releases the datagrams below the mark, and only those. Whatever state the
//! standby takes over from, then, is at least as far as anything the client saw: it sends
//! again what the client never acknowledged, and the client drops by stream offset what it
//! already had.
//!
//! A connection that has delivered everything both ways (its SAL FIN is queued only then)
//! stops holding and releases what it held: what is left is its teardown, which no state of
//! the standby's could contradict, and its application, done with it, takes no more
//! checkpoints to release it.
//!
//! Nothing changes for the transport: a held datagram counts as sent (its RTT sample, when
//! acknowledged, includes the hold: the trip to the standby is part of this connection's
//! round trip now), and a datagram held beyond [`MAX_HELD_DATAGRAMS`] is dropped and counted,
//! which the transport recovers from as from any loss.
//!
//! A primary that loses its standby without hearing that it took over (silence, a broken
//! session: it may have) must not release what it held, and must not seal anything with a
//! packet number the standby may use from its last checkpoint on: under the same keys that
//! would repeat an AES-GCM nonce. [`standby_lost`] drops what is held and moves every
//! replicated connection's packet numbers [`STANDBY_PN_JUMP`] ahead.
//!
//! [`checkpoint`]: Endpoint::checkpoint
//! [`commit`]: Endpoint::commit
//! [`standby_lost`]: Endpoint::standby_lost

use std::collections::{HashMap, HashSet, VecDeque};

use super::{ConnectionHandle, Endpoint, ExportError, Transmit};
use crate::Instant;
use crate::snapshot::{StreamCover, block};

/// Most datagrams one connection holds; beyond, new ones are dropped (and counted in
/// [`EndpointStats::held_drops`](super::EndpointStats::held_drops)) until a commit releases
/// some. The transport's congestion window bounds what it sends in one round trip, so this is
/// reached only when the standby stops confirming.
pub const MAX_HELD_DATAGRAMS: usize = 16_384;

/// How far a primary that lost its standby moves its replicated connections' packet numbers
/// ([`Endpoint::standby_lost`]), in both spaces: 2^40, more packets than a standby that took
/// over could send in years, far below the 2^62 a receiver accepts.
pub const STANDBY_PN_JUMP: u64 = 1 << 40;

/// How far a [`Checkpoint`] covers its connection's output: the number of datagrams the
/// connection had produced when it was taken. [`Endpoint::commit`] with it releases exactly
/// those.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct CommitMark(pub u64);

/// A connection's state at one instant, for its standby: the snapshot (docs/snapshot.md; the
/// same format an export produces, but the connection runs on), and the mark of the output it
/// covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The snapshot. A whole one is importable by the standby's
    /// [`Endpoint::import_with_app`] to take the connection over; a delta is applied to the
    /// checkpoint before it with a [`Replica`](crate::snapshot::delta::Replica). Holds the
    /// flow's keys.
    pub snapshot: Vec<u8>,
    /// Release the output it covers with [`Endpoint::commit`] once the standby holds it.
    pub mark: CommitMark,
    /// The stream bytes it carries, whole or with those before: the next checkpoint can be
    /// a delta since it.
    pub cover: StreamCover,
}

/// The held output of an endpoint's connections.
#[derive(Debug, Default)]
pub(crate) struct OutputHold {
    /// Whether established server connections hold their output.
    on: bool,
    holds: HashMap<ConnectionHandle, Held>,
    /// Released datagrams, sent before anything else.
    released: VecDeque<Transmit>,
    /// Connections that held a datagram since [`Endpoint::take_held`] last asked.
    news: Vec<ConnectionHandle>,
    /// Every connection checkpointed while holding, until it is forgotten: what a standby
    /// may take over.
    replicated: HashSet<ConnectionHandle>,
    held_now: usize,
}

#[derive(Debug, Default)]
struct Held {
    /// Datagrams produced while held (the next one's number).
    produced: u64,
    /// Held, oldest first; the first is number `produced - queue.len()`.
    queue: VecDeque<Transmit>,
    /// Listed in `news` since the last [`Endpoint::take_held`].
    announced: bool,
}

impl OutputHold {
    /// Releases everything `held` holds.
    fn release_all(&mut self, held: Held) {
        self.held_now -= held.queue.len();
        self.released.extend(held.queue);
    }
}

/// Output commit (module docs): hold, checkpoint, commit.
impl Endpoint {
    /// Whether connection `h` is replicated to a standby (checkpointed while holding is on).
    pub(super) fn is_replicated(&self, h: ConnectionHandle) -> bool {
        self.hold.on && self.hold.replicated.contains(&h)
    }

    /// Turns holding on or off. On: from its next [`checkpoint`](Self::checkpoint) on, a
    /// connection holds what it sends until a [`commit`](Self::commit) releases it (a
    /// connection never checkpointed is not replicated, and holds nothing). Off: everything held is
    /// released, and nothing is held any more (the standby is gone; the connections continue
    /// unreplicated).
    pub fn set_output_hold(&mut self, on: bool) {
        self.hold.on = on;
        if !on {
            self.hold.replicated.clear();
            for (_, held) in std::mem::take(&mut self.hold.holds) {
                self.hold.release_all(held);
            }
            self.hold.news.clear();
        }
    }

    /// Turns holding off after losing the standby without knowing whether it took the
    /// connections over (it went silent, or its session broke). Unlike
    /// [`set_output_hold(false)`](Self::set_output_hold), nothing held is released: the
    /// standby's state never produced it, and it was sealed with packet numbers the standby
    /// uses after a takeover. It is dropped (counted in
    /// [`EndpointStats::held_drops`](super::EndpointStats::held_drops)), and what was in
    /// flight is sent again at once. Every connection checkpointed while holding moves both its
    /// packet-number spaces [`STANDBY_PN_JUMP`] ahead, so that nothing it seals from now on
    /// repeats a (key, nonce) pair the standby may use: if both serve on (a partition
    /// between them), the client follows one (protocol.md §4.3) and the other's packets stay
    /// secret.
    pub fn standby_lost(&mut self) {
        self.hold.on = false;
        self.hold.news.clear();
        let mut renumber = std::mem::take(&mut self.hold.replicated);
        for (h, held) in std::mem::take(&mut self.hold.holds) {
            self.hold.held_now -= held.queue.len();
            self.stats.held_drops += held.queue.len() as u64;
            renumber.insert(h);
        }
        for h in renumber {
            if let Some(c) = self.conn(h) {
                c.go_on_without_standby(STANDBY_PN_JUMP);
                self.touch(h);
            }
        }
    }

    /// Whether holding is on ([`set_output_hold`](Self::set_output_hold)).
    pub fn output_hold(&self) -> bool {
        self.hold.on
    }

    /// Snapshots connection `h` as it is now, with `app` (the application's state for it, at
    /// most [`MAX_APP_STATE`](super::MAX_APP_STATE) bytes) in the APP block, without
    /// freezing it: it runs on. The snapshot is what [`export_with_app`](Self::export_with_app)
    /// would give (a fresh export ID, the move epoch one past the connection's), so the
    /// standby takes the connection over with [`import_with_app`](Self::import_with_app).
    /// With holding on, the connection holds its output from now on if it did not already:
    /// take the first checkpoint before the application reads anything, so that nothing it
    /// acknowledged unheld is missing from the standby's state.
    ///
    /// `app` must describe what the application did with every byte it read from the
    /// connection so far, and nothing it did not send: the standby's application resumes
    /// from it at the stream positions of this snapshot.
    ///
    /// With `since` (the [`cover`](Checkpoint::cover) of the last checkpoint the standby
    /// got of this connection) the snapshot is a *delta* (docs/snapshot.md §5): it leaves
    /// out the stream bytes that one carried, which is most of a bulk stream's snapshot.
    pub fn checkpoint(
        &mut self,
        h: ConnectionHandle,
        now: Instant,
        app: &[u8],
        since: Option<StreamCover>,
    ) -> Result<Checkpoint, ExportError> {
        if app.len() > super::MAX_APP_STATE {
            return Err(ExportError::AppStateTooLarge(app.len()));
        }
        let c = self.conn_ref(h).ok_or(ExportError::UnknownConnection)?;
        c.exportable()?;
        let cover = c.stream_cover();
        // A connection that delivered everything holds nothing more (`hold_output`).
        let holds = self.hold.on && !c.all_delivered();
        let snapshot =
            self.write_snapshot(h, now, since, |w| w.add_bytes(block::APP, app.to_vec()))?;
        let mark = if holds {
            self.hold.replicated.insert(h);
            CommitMark(self.hold.holds.entry(h).or_default().produced)
        } else {
            CommitMark(self.hold.holds.get(&h).map_or(0, |held| held.produced))
        };
        Ok(Checkpoint {
            snapshot,
            mark,
            cover,
        })
    }

    /// Releases the datagrams connection `h` held before `mark` (a [`Checkpoint`]'s, once
    /// the standby holds it); returns how many. A mark older than an earlier commit's
    /// releases nothing more.
    pub fn commit(&mut self, h: ConnectionHandle, mark: CommitMark) -> usize {
        let Some(held) = self.hold.holds.get_mut(&h) else {
            return 0;
        };
        let first = held.produced - held.queue.len() as u64;
        let n = mark.0.saturating_sub(first).min(held.queue.len() as u64) as usize;
        self.hold.released.extend(held.queue.drain(..n));
        self.hold.held_now -= n;
        n
    }

    /// Appends to `out` the connections that held a datagram since the last call, each
    /// once: those waiting for a checkpoint.
    pub fn take_held(&mut self, out: &mut Vec<ConnectionHandle>) {
        for h in self.hold.news.drain(..) {
            if let Some(held) = self.hold.holds.get_mut(&h) {
                held.announced = false;
                out.push(h);
            }
        }
    }

    /// Whether a connection held a datagram since the last [`take_held`](Self::take_held).
    pub fn has_new_held(&self) -> bool {
        !self.hold.news.is_empty()
    }

    /// How many datagrams connection `h` holds.
    pub fn held(&self, h: ConnectionHandle) -> usize {
        self.hold.holds.get(&h).map_or(0, |held| held.queue.len())
    }

    /// How many datagrams all connections hold.
    pub fn held_total(&self) -> usize {
        self.hold.held_now
    }

    /// The next released datagram, if any: [`poll_transmit_into`](Self::poll_transmit_into)
    /// sends these first.
    pub(super) fn poll_released(
        &mut self,
        out: &mut Vec<u8>,
    ) -> Option<(super::Locator, super::Locator)> {
        let t = self.hold.released.pop_front()?;
        out.extend_from_slice(&t.payload);
        Some((t.src, t.dst))
    }

    /// Called with each datagram connection `h` produced (appended to `out` from `start`):
    /// holds it if `h` holds its output, and then takes it back out of `out`. Returns
    /// whether it did.
    pub(super) fn hold_output(
        &mut self,
        h: ConnectionHandle,
        route: (super::Locator, super::Locator),
        out: &mut Vec<u8>,
        start: usize,
    ) -> bool {
        if !self.hold.on {
            return false;
        }
        // Every byte delivered both ways (the SAL FIN is queued only then): what is left is
        // the teardown, which no standby's state could contradict — the client has all it
        // will ever get. Holding it until the next checkpoint would hold it until TIME-WAIT
        // ends, since a stream whose application is done takes none.
        if self.conn_ref(h).is_some_and(|c| c.all_delivered()) {
            if let Some(held) = self.hold.holds.remove(&h) {
                self.hold.release_all(held);
            }
            return false;
        }
        let Some(held) = self.hold.holds.get_mut(&h) else {
            return false;
        };
        held.produced += 1;
        if held.queue.len() >= MAX_HELD_DATAGRAMS {
            self.stats.held_drops += 1;
        } else {
            held.queue.push_back(Transmit {
                src: route.0,
                dst: route.1,
                payload: out[start..].to_vec(),
            });
            self.hold.held_now += 1;
        }
        if !held.announced {
            held.announced = true;
            self.hold.news.push(h);
        }
        out.truncate(start);
        true
    }

    /// Connection `h` is being forgotten: what it held is released if it closed normally
    /// (its last ACKs and close), dropped if it moved away (`exported`: the importer, or the
    /// standby that took it over, continues from a state that never produced them).
    pub(super) fn forget_held(&mut self, h: ConnectionHandle, exported: bool) {
        self.hold.replicated.remove(&h);
        if let Some(held) = self.hold.holds.remove(&h) {
            if exported {
                self.hold.held_now -= held.queue.len();
            } else {
                self.hold.release_all(held);
            }
        }
    }
}
