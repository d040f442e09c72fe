//! The service table: serviceID prefix → prioritized, weighted targets (DESIGN.md §4).
//!
//! Each entry is a set of [`Target`]s. [`TableSnapshot::resolve`] finds the longest prefix that
//! contains the serviceID, keeps the targets of the highest priority present, and picks one of
//! them by weight, consistently per flow key (see [`crate::choice`]).
//!
//! Readers and the writer never wait for each other: the table is an immutable [`PrefixMap`]
//! behind an [`ArcSwap`]. [`ServiceTable::snapshot`] is an atomic load of an `Arc`; a writer
//! (writers are serialized by a mutex) clones the current map in O(1), changes the clone, which
//! copies only the paths it touches, and publishes it with one atomic store. A snapshot is
//! therefore always one consistent version of the table, and every change made in one
//! [`ServiceTable::update`] becomes visible at once.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use serval_wire::locator::{LOCATOR_V6_LEN, emit_locator};
use serval_wire::{Locator, ServiceId, ServicePrefix};
use sha2::{Digest, Sha256};

use crate::PrefixMap;
use crate::choice;

/// A local listener handle: which bound socket a DEMUX rule delivers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListenerId(pub u64);

/// What to do with a packet (the first packet of a flow) whose serviceID matched a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Send it on to this next hop (usually a service router or the instance itself).
    Forward(Locator),
    /// Deliver it to this local listener.
    Demux(ListenerId),
    /// Queue it and ask the controller for a verdict.
    Delay,
    /// Discard it.
    Drop,
}

/// Longest [`Action::encode`] output: a tag byte and an IPv6 locator.
const ACTION_ENCODED_MAX: usize = 1 + LOCATOR_V6_LEN;

/// Domain-separation tag of [`Action::identity`].
const IDENTITY_TAG: &[u8] = b"serval-target-v1\0";

impl Action {
    /// The canonical bytes of the action, as hashed by [`identity`](Self::identity).
    fn encode(&self) -> ([u8; ACTION_ENCODED_MAX], usize) {
        let mut buf = [0u8; ACTION_ENCODED_MAX];
        let len = match self {
            Action::Forward(loc) => {
                buf[0] = 1;
                1 + emit_locator(loc, &mut buf[1..])
            }
            Action::Demux(l) => {
                buf[0] = 2;
                buf[1..9].copy_from_slice(&l.0.to_be_bytes());
                9
            }
            Action::Delay => {
                buf[0] = 3;
                1
            }
            Action::Drop => {
                buf[0] = 4;
                1
            }
        };
        (buf, len)
    }

    /// The stable identity the consistent choice hashes: the first 8 bytes (big-endian) of
    /// `SHA-256("serval-target-v1\0" || encoding)`, where the encoding is a tag byte (1 FORWARD,
    /// 2 DEMUX, 3 DELAY, 4 DROP), then for FORWARD the locator as on the wire (family, port,
    /// address: an IPv6 flow label or scope ID is not part of it) and for DEMUX the listener ID,
    /// big-endian. It depends only on what the action is, so every router derives the same
    /// identity for the same next hop. Two actions with the same encoding are the same target of
    /// an entry.
    pub fn identity(&self) -> u64 {
        let (buf, len) = self.encode();
        let mut h = Sha256::new();
        h.update(IDENTITY_TAG);
        h.update(&buf[..len]);
        let d = h.finalize();
        u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
    }

    fn same(&self, other: &Action) -> bool {
        let (a, n) = self.encode();
        let (b, m) = other.encode();
        a[..n] == b[..m]
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Forward(loc) => write!(f, "forward {loc}"),
            Action::Demux(l) => write!(f, "demux {}", l.0),
            Action::Delay => f.write_str("delay"),
            Action::Drop => f.write_str("drop"),
        }
    }
}

/// One rule of an entry: an action, its priority and its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// What to do.
    pub action: Action,
    /// Larger is preferred: only the targets of an entry's highest priority are chosen from.
    pub priority: u32,
    /// Relative share among targets of the same priority; must be at least 1.
    pub weight: u32,
}

impl Target {
    /// A target with the given priority and weight.
    pub const fn new(action: Action, priority: u32, weight: u32) -> Target {
        Target {
            action,
            priority,
            weight,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} priority {} weight {}",
            self.action, self.priority, self.weight
        )
    }
}

/// Why a change to the table was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// A target's weight was 0; weights start at 1.
    #[error("target weight must be at least 1")]
    ZeroWeight,
}

/// The targets of one prefix, highest priority first; within a priority, by identity (so the
/// order never depends on insertion order). Never empty.
///
/// Boxed slices of exactly the right length, not `Vec`s: an entry is copied on every change
/// anyway (the map is persistent), and a `Vec` grown by one insert keeps room for four. With
/// one target per prefix, as a router's registrations are, that room was most of the table's
/// memory.
///
/// The identities sit inside the entry for up to [`INLINE_IDENTS`] targets (a router's entry
/// holds one target per instance that registered with it): one allocation and, at a million
/// entries, one cache and TLB miss per lookup fewer than a second boxed slice. A single target
/// (a service with one instance, the commonest entry of a router's table) sits inside the entry
/// itself, with no box at all. Every form is 48 bytes (the other forms fit around the niche of
/// the inline target's action), so an entry's leaf requests 104 bytes: with one target, 32 fewer
/// than the leaf and a one-target box did together, and one heap block instead of two.
#[derive(Clone, Debug)]
enum Entry {
    /// One target, inline: no allocation of its own, and no miss to reach it.
    One { target: Target, ident: u64 },
    /// At most [`INLINE_IDENTS`] targets; `idents[..targets.len()]` are theirs.
    Few {
        targets: Box<[Target]>,
        idents: [u64; INLINE_IDENTS],
    },
    /// More targets, and their identities.
    Many {
        targets: Box<[Target]>,
        idents: Box<[u64]>,
    },
}

/// Targets whose identities an [`Entry`] holds without an allocation of their own.
const INLINE_IDENTS: usize = 3;

impl Default for Entry {
    fn default() -> Self {
        Entry::Few {
            targets: Box::default(),
            idents: [0; INLINE_IDENTS],
        }
    }
}

impl Entry {
    /// An entry of `targets`, whose identities are `idents` (same length).
    fn new(targets: Vec<Target>, idents: Vec<u64>) -> Entry {
        if let ([target], [ident]) = (&targets[..], &idents[..]) {
            Entry::One {
                target: *target,
                ident: *ident,
            }
        } else if idents.len() <= INLINE_IDENTS {
            let mut inline = [0; INLINE_IDENTS];
            for (d, s) in inline.iter_mut().zip(&idents) {
                *d = *s;
            }
            Entry::Few {
                targets: targets.into_boxed_slice(),
                idents: inline,
            }
        } else {
            Entry::Many {
                targets: targets.into_boxed_slice(),
                idents: idents.into_boxed_slice(),
            }
        }
    }

    /// The targets, highest priority first.
    fn targets(&self) -> &[Target] {
        match self {
            Entry::One { target, .. } => std::slice::from_ref(target),
            Entry::Few { targets, .. } | Entry::Many { targets, .. } => targets,
        }
    }

    /// `targets()[i].action.identity()` for each target, computed once.
    fn idents(&self) -> &[u64] {
        match self {
            Entry::One { ident, .. } => std::slice::from_ref(ident),
            Entry::Few { targets, idents } => idents.get(..targets.len()).unwrap_or(&[]),
            Entry::Many { idents, .. } => idents,
        }
    }

    /// Starts loading the targets, which [`Self::choose`] reads next.
    fn prefetch(&self) {
        if let Some(t) = self.targets().first() {
            serval_sys::prefetch(t);
        }
    }

    /// The resolution of an ID under `prefix` (this entry's) for `flow_key`.
    fn resolve(&self, prefix: ServicePrefix, flow_key: u64) -> Option<Resolution> {
        let t = self.choose(flow_key)?;
        Some(Resolution {
            prefix,
            action: t.action,
            priority: t.priority,
            weight: t.weight,
        })
    }

    /// Picks among the highest-priority targets by weighted rendezvous hashing.
    fn choose(&self, flow_key: u64) -> Option<&Target> {
        let top = self.targets().first()?.priority;
        let group = self
            .targets()
            .iter()
            .zip(self.idents())
            .take_while(|(t, _)| t.priority == top);
        let i = choice::choose(flow_key, group.map(|(t, id)| (*id, t.weight)))?;
        self.targets().get(i)
    }

    /// Adds `t`, or updates the priority and weight of the target with the same action.
    /// Returns whether anything changed.
    fn upsert(&mut self, t: Target) -> bool {
        let mut targets = self.targets().to_vec();
        let mut idents = self.idents().to_vec();
        if let Some(i) = targets.iter().position(|x| x.action.same(&t.action)) {
            if targets[i] == t {
                return false;
            }
            targets.remove(i);
            idents.remove(i);
        }
        let ident = t.action.identity();
        let key = |t: &Target, id: u64| (core::cmp::Reverse(t.priority), id, t.action.encode());
        let at = targets
            .iter()
            .zip(&idents)
            .position(|(x, xid)| key(x, *xid) > key(&t, ident))
            .unwrap_or(targets.len());
        targets.insert(at, t);
        idents.insert(at, ident);
        *self = Entry::new(targets, idents);
        true
    }

    /// Removes the target with `action`; returns whether there was one.
    fn remove(&mut self, action: &Action) -> bool {
        match self.targets().iter().position(|x| x.action.same(action)) {
            Some(i) => {
                let mut targets = self.targets().to_vec();
                let mut idents = self.idents().to_vec();
                targets.remove(i);
                idents.remove(i);
                *self = Entry::new(targets, idents);
                true
            }
            None => false,
        }
    }
}

/// The outcome of resolving a serviceID: the rule that matched and the target chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolution {
    /// The longest prefix in the table containing the serviceID.
    pub prefix: ServicePrefix,
    /// The chosen target's action.
    pub action: Action,
    /// The chosen target's priority (the highest in its entry).
    pub priority: u32,
    /// The chosen target's weight.
    pub weight: u32,
}

type Map = PrefixMap<Entry>;

/// The service table: a consistent, lock-free-to-read map from serviceID prefixes to targets.
///
/// ```
/// use serval_table::{Action, ServiceTable, Target};
/// use serval_wire::{ServiceId, ServicePrefix};
///
/// let table = ServiceTable::new();
/// let web = ServicePrefix::from_domain("web.example.com").unwrap();
/// table.update(|tx| {
///     tx.add_target(web, Target::new(Action::Forward("192.0.2.1:54324".parse().unwrap()), 1, 1))?;
///     tx.add_target(web, Target::new(Action::Forward("192.0.2.2:54324".parse().unwrap()), 1, 3))
/// })
/// .unwrap();
///
/// let snap = table.snapshot();
/// let id = ServiceId::from_name("web.example.com").unwrap();
/// let r = snap.resolve(&id, 0x1234).unwrap();
/// assert_eq!(r.prefix, web);
/// // The same flow key always resolves to the same target.
/// assert_eq!(snap.resolve(&id, 0x1234), Some(r));
/// ```
pub struct ServiceTable {
    current: ArcSwap<Map>,
    /// Serializes writers; readers never take it.
    writer: Mutex<()>,
}

impl Default for ServiceTable {
    fn default() -> Self {
        ServiceTable {
            current: ArcSwap::from_pointee(Map::new()),
            writer: Mutex::new(()),
        }
    }
}

impl fmt::Debug for ServiceTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.snapshot().fmt(f)
    }
}

impl ServiceTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty table whose map keeps an anchor index ([`PrefixMap::with_anchor_index`]):
    /// faster lookups in large tables for about 34 more bytes per entry. The router uses
    /// [`ServiceTable::new`] unless told otherwise (`serval router --anchor-index`).
    pub fn with_anchor_index() -> Self {
        ServiceTable {
            current: ArcSwap::from_pointee(Map::with_anchor_index()),
            writer: Mutex::new(()),
        }
    }

    /// Turns the map's anchor index on or off (see [`ServiceTable::with_anchor_index`]); one
    /// published change.
    pub fn set_anchor_index(&self, on: bool) {
        self.update(|tx| {
            tx.map.set_anchor_index(on);
            tx.changed = true;
        });
    }

    /// The current version of the table. Cheap (an atomic load and a reference count), never
    /// blocks, and stays valid and unchanged however the table changes afterwards.
    pub fn snapshot(&self) -> TableSnapshot {
        TableSnapshot {
            map: self.current.load_full(),
        }
    }

    /// Applies the changes `f` makes through its [`TableTx`] and publishes them together: a
    /// snapshot sees all of them or none. Writers run one at a time; readers are never blocked.
    /// Nothing is published if `f` changes nothing, or if it panics.
    ///
    /// `f` runs with the writer lock held: it may take snapshots, but calling a mutating method
    /// of the same table from inside it deadlocks.
    pub fn update<R>(&self, f: impl FnOnce(&mut TableTx) -> R) -> R {
        // The mutex guards no data (the map is behind the ArcSwap), so poisoning means nothing.
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut tx = TableTx {
            map: Map::clone(&self.current.load()),
            changed: false,
        };
        // One batch: a large update (a resync, a cold start) rebuilds the anchor index once.
        tx.map.begin_batch();
        let out = f(&mut tx);
        tx.map.end_batch();
        if tx.changed {
            self.current.store(Arc::new(tx.map));
        }
        out
    }

    /// Adds `target` to the entry for `prefix` (creating it), or, if the entry already has a
    /// target with the same action, updates that target's priority and weight.
    pub fn add_target(&self, prefix: ServicePrefix, target: Target) -> Result<(), TableError> {
        self.update(|tx| tx.add_target(prefix, target))
    }

    /// Removes the target with `action` from the entry for exactly `prefix` (and the entry, if
    /// that was its last target). Returns whether there was such a target.
    pub fn remove_target(&self, prefix: &ServicePrefix, action: &Action) -> bool {
        self.update(|tx| tx.remove_target(prefix, action))
    }

    /// Removes the entry for exactly `prefix`. Returns whether there was one.
    pub fn remove_prefix(&self, prefix: &ServicePrefix) -> bool {
        self.update(|tx| tx.remove_prefix(prefix))
    }
}

/// A batch of changes to a [`ServiceTable`], published together when
/// [`ServiceTable::update`]'s closure returns. Reads through it see the changes made so far.
pub struct TableTx {
    map: Map,
    changed: bool,
}

impl TableTx {
    /// As [`ServiceTable::add_target`]. A weight of 0 is refused and changes nothing.
    pub fn add_target(&mut self, prefix: ServicePrefix, target: Target) -> Result<(), TableError> {
        if target.weight == 0 {
            return Err(TableError::ZeroWeight);
        }
        let mut entry = match self.map.get(&prefix) {
            Some(e) => Entry::clone(e),
            None => Entry::default(),
        };
        if entry.upsert(target) {
            self.map.insert(prefix, entry);
            self.changed = true;
        }
        Ok(())
    }

    /// As [`ServiceTable::remove_target`].
    pub fn remove_target(&mut self, prefix: &ServicePrefix, action: &Action) -> bool {
        let Some(mut entry) = self.map.get(prefix).cloned() else {
            return false;
        };
        if !entry.remove(action) {
            return false;
        }
        if entry.targets().is_empty() {
            self.map.remove(prefix);
        } else {
            self.map.insert(*prefix, entry);
        }
        self.changed = true;
        true
    }

    /// As [`ServiceTable::remove_prefix`].
    pub fn remove_prefix(&mut self, prefix: &ServicePrefix) -> bool {
        let removed = self.map.remove(prefix).is_some();
        self.changed |= removed;
        removed
    }

    /// The targets of exactly `prefix`, as changed so far.
    pub fn targets(&self, prefix: &ServicePrefix) -> Option<&[Target]> {
        self.map.get(prefix).map(|e| e.targets())
    }

    /// Number of entries, as changed so far.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the table has no entry, as changed so far.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// One immutable version of a [`ServiceTable`].
#[derive(Clone)]
pub struct TableSnapshot {
    map: Arc<Map>,
}

impl TableSnapshot {
    /// Resolves `id` for the flow identified by `flow_key`: the longest matching prefix, then
    /// among its highest-priority targets one chosen by weight, the same one for every call
    /// with the same key on any table holding the same entry.
    ///
    /// `flow_key` should be a hash of something the flow carries from its first packet (the
    /// client's flowID and nonce, say). If clients must not be able to steer themselves to a
    /// chosen instance, make it a keyed hash with a secret the routers share.
    pub fn resolve(&self, id: &ServiceId, flow_key: u64) -> Option<Resolution> {
        let (prefix, entry) = self.map.longest_match(id)?;
        entry.resolve(prefix, flow_key)
    }

    /// Resolves many IDs at once: `out[i]` is what [`resolve`](Self::resolve) gives for
    /// `ids[i]` and `flow_keys[i]`.
    ///
    /// Cheaper than one call per ID in a large table: the lookups overlap their cache misses
    /// ([`PrefixMap::longest_match_batch`]), and every matched entry's targets are loaded
    /// before the first is chosen among, so those misses overlap too. A receiver resolves the
    /// SYNs of one receive batch this way.
    ///
    /// # Panics
    /// If `ids`, `flow_keys` and `out` differ in length.
    pub fn resolve_batch(
        &self,
        ids: &[ServiceId],
        flow_keys: &[u64],
        out: &mut [Option<Resolution>],
    ) {
        assert!(
            ids.len() == flow_keys.len() && ids.len() == out.len(),
            "resolve_batch: ids, flow_keys and out differ in length"
        );
        const CHUNK: usize = 64;
        let mut found = [None; CHUNK];
        for ((ids, keys), out) in ids
            .chunks(CHUNK)
            .zip(flow_keys.chunks(CHUNK))
            .zip(out.chunks_mut(CHUNK))
        {
            let found = &mut found[..ids.len()];
            self.map.longest_match_batch(ids, found);
            for (_, entry) in found.iter().flatten() {
                entry.prefetch();
            }
            for (((id, key), f), o) in ids.iter().zip(keys).zip(found.iter()).zip(out) {
                *o = f.and_then(|(len, entry)| entry.resolve(ServicePrefix::new(*id, len), *key));
            }
        }
    }

    /// Whether this snapshot is still `table`'s current version (no change was published
    /// since it was taken).
    pub fn is_current(&self, table: &ServiceTable) -> bool {
        Arc::ptr_eq(&self.map, &table.current.load())
    }

    /// The longest prefix containing `id` and all its targets.
    pub fn lookup(&self, id: &ServiceId) -> Option<(ServicePrefix, &[Target])> {
        self.map.longest_match(id).map(|(p, e)| (p, e.targets()))
    }

    /// The targets of exactly `prefix`.
    pub fn get(&self, prefix: &ServicePrefix) -> Option<&[Target]> {
        self.map.get(prefix).map(|e| e.targets())
    }

    /// Every entry in ascending prefix order, each with its targets, highest priority first.
    pub fn entries(&self) -> impl Iterator<Item = (ServicePrefix, &[Target])> {
        self.map.iter().map(|(p, e)| (p, e.targets()))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the table has no entry.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether this version's map has a built anchor index (see
    /// [`ServiceTable::set_anchor_index`]). For tests and diagnostics.
    pub fn has_anchor_index(&self) -> bool {
        self.map.unindexed_anchors().is_some()
    }
}

impl fmt::Debug for TableSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.entries()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_encoding_and_identity() {
        let loc: Locator = "10.1.2.3:258".parse().unwrap();
        let (b, n) = Action::Forward(loc).encode();
        assert_eq!(&b[..n], [1, 4, 0x01, 0x02, 10, 1, 2, 3]);
        let (b, n) = Action::Demux(ListenerId(0x0102)).encode();
        assert_eq!(&b[..n], [2, 0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(Action::Delay.encode().1, 1);
        assert_ne!(Action::Delay.identity(), Action::Drop.identity());
        // A scope ID is not part of a locator on the wire, so not part of the target either.
        let a: Locator = "[fe80::1%2]:9".parse().unwrap();
        let b: Locator = "[fe80::1%3]:9".parse().unwrap();
        assert!(Action::Forward(a).same(&Action::Forward(b)));
        assert_eq!(Action::Forward(a).identity(), Action::Forward(b).identity());
    }

    #[test]
    fn sizes_stay_small() {
        // Not a contract: the entry's layout is what keeps a registration within its budget.
        assert_eq!(core::mem::size_of::<Entry>(), 48);
    }

    #[test]
    fn entry_keeps_priority_then_identity_order() {
        let mut e = Entry::default();
        let acts: Vec<Action> = (0..6).map(|i| Action::Demux(ListenerId(i))).collect();
        for (i, a) in acts.iter().enumerate() {
            assert!(e.upsert(Target::new(*a, (i % 3) as u32, 1)));
        }
        assert!(!e.upsert(Target::new(acts[0], 0, 1)), "no-op update");
        let pr: Vec<u32> = e.targets().iter().map(|t| t.priority).collect();
        assert_eq!(pr, [2, 2, 1, 1, 0, 0]);
        assert!(e.idents().chunks(2).all(|c| c[0] < c[1]));
        assert!(e.remove(&acts[0]));
        assert!(!e.remove(&acts[0]));
        assert_eq!(e.targets().len(), 5);
        assert!(matches!(e, Entry::Many { .. }));
        for a in &acts[1..3] {
            assert!(e.remove(a));
        }
        assert!(matches!(e, Entry::Few { .. }));
        assert_eq!(e.idents().len(), e.targets().len());
        assert_eq!(e.idents().len(), 3);
        for a in &acts[3..5] {
            assert!(e.remove(a));
        }
        assert!(matches!(e, Entry::One { .. }));
        assert_eq!(e.targets(), [Target::new(acts[5], 2, 1)]);
        assert_eq!(e.idents(), [acts[5].identity()]);
        assert_eq!(e.choose(7), Some(&Target::new(acts[5], 2, 1)));
        assert!(e.upsert(Target::new(acts[5], 4, 2)), "an update in place");
        assert!(matches!(e, Entry::One { .. }));
        assert_eq!(e.targets(), [Target::new(acts[5], 4, 2)]);
        assert!(e.upsert(Target::new(acts[0], 4, 1)));
        assert!(matches!(e, Entry::Few { .. }));
        assert_eq!(e.targets().len(), 2);
        assert!(
            e.idents()
                .iter()
                .zip(e.targets())
                .all(|(id, t)| *id == t.action.identity())
        );
    }
}
