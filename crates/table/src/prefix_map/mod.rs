//! [`PrefixMap`]: a persistent longest-prefix-match map over 256-bit serviceID prefixes.
//!
//! # Structure
//!
//! A multibit trie with an 8-bit stride, path compression and adaptive nodes, in the spirit of
//! ART (Leis et al., ICDE 2013), made persistent by sharing nodes through [`Arc`]:
//!
//! * A **node** sits at a bit depth `D` that is a multiple of 8 and stores its key, the first `D`
//!   bits every ID below it shares. Path compression: a child may sit any number of bytes deeper
//!   than its parent; the bytes it skips are verified on arrival by one masked compare of the
//!   node's four key words with the ID's (no per-byte loop, no separate skip buffer).
//! * A node holds the prefixes of lengths `D ..= D + 7` under its key: a 255-bit presence bitmap
//!   inline and the values out of line (see `prefixes.rs`). The longest of them that contains the
//!   ID's byte at `D` is one AND, one leading-zero count and one popcount away, and only the
//!   value's address is computed, so the value array is never touched on the way down. A lookup
//!   remembers the best match so far and never backtracks.
//! * **Children** are keyed by the ID's byte at `D` through a 256-bit bitmap with per-word
//!   popcount bases, and live in the node's own allocation, in the smallest of 17 size classes
//!   (0, 1, 2, 3, 4, 6, 8 … 192, 256) that holds them (see `node.rs`). One dependent load per
//!   level reaches both the header and the child pointer, and a sparse node costs a few slots,
//!   not 256.
//! * A prefix with nothing else beneath it is a **leaf** (its full key, length and value) hung
//!   directly in its parent's child slot and checked by one masked compare. Name-derived rule sets
//!   are dominated by such leaves: an exact `/256` ID or a domain `/64` with no sub-rules costs one
//!   small allocation, not a chain of nodes. Nodes exist only where two items diverge, so there
//!   are fewer nodes than prefixes.
//!
//! Every non-root node holds at least two items (prefixes or children) and sits in the size
//! class its child count calls for; removals collapse or shrink nodes to keep that, so the shape
//! stays canonical and a lookup takes at most 33 steps.
//!
//! # Persistence
//!
//! [`Clone`] copies one [`Arc`]. A mutation walks down its path and copies each node it finds
//! shared with another clone (its header, its values, and one reference-count increment per
//! child); a node owned by this map alone is changed in place. An insert or remove therefore
//! copies at most the O(depth) nodes on its path and leaves every other clone unchanged, which is
//! what lets the service table publish a new version while readers keep the old one. Values are
//! cloned when the node holding them is copied, so `V` should be cheap to clone (an `Arc`, an
//! index, a small `Copy` type).
//!
//! # Lookups
//!
//! [`PrefixMap::longest_match`] allocates nothing, never recurses and makes one dependent load
//! per level. [`PrefixMap::longest_match_batch`] interleaves 16 lookups (AMAC): each step of a
//! lookup ends by issuing a prefetch of what its next step reads (a node's header, the child
//! slot it picks, the child; the one `unsafe` instruction lives in `serval_sys::prefetch`) and
//! hands over to the next lookup, so the misses of 16 lookups are in flight together, and a
//! lookup that finishes makes room for the next ID at once. (An earlier lockstep version, with
//! plain loads as touches, measured ~25% slower at 1M rules.)
//!
//! # Anchor index (opt-in)
//!
//! [`PrefixMap::with_anchor_index`] adds a flat hash table from the first 64 bits of an ID (its
//! anchor) to the first trie item on its path at or below bit 64 (see `anchor_index.rs`). Only
//! prefixes shorter than 64 bits lie above that item, so any match found under it is the longest
//! one: a lookup probes the table once and walks from there, skipping the levels above (four or
//! five dependent misses at 1M name-like rules), and walks from the root only when that finds
//! nothing. The table is never changed in place, so clones share it for free: a change marks its
//! anchor in a shared bit filter (those lookups walk from the root), and the map builds a new
//! table once as many anchors are marked as it held prefixes at the last build, or at the end of
//! a batch ([`PrefixMap::begin_batch`]) that marked more than that. Batched lookups through it
//! are software-pipelined: one group of IDs checks its leaves while the next probes its slots
//! and the one after hashes its anchors, so each load starts a round before it is needed. It costs about 65 bytes per
//! anchor, which is why the service table does not use it by default (BENCHMARKS.md, issue 14).
//! (It replaces an earlier leaf index, a persistent hash table of the trie's leaves, which was
//! slower to look up and made every change about twice as dear.)

mod anchor_index;
mod node;
mod prefixes;

use std::fmt;
use std::sync::Arc;

use serval_wire::{ServiceId, ServicePrefix};

use anchor_index::{ANCHOR, AnchorIndex, MIN_PREFIXES, Start};
use node::{Builder, Child, DynNode, Head, Leaf, Slot, View, class_for};
use prefixes::{next_set, slot_prefix};

/// A serviceID or prefix as four big-endian words (word 0 holds bits 0..64).
type Key = [u64; 4];

/// A longest match found by [`PrefixMap::longest_match_batch`]: the matching prefix's length
/// (its bits are the looked-up ID's first ones) and its value.
pub type Match<'a, V> = (u16, &'a V);

/// Walks interleaved by [`PrefixMap::longest_match_batch`].
const LANES: usize = 16;

/// Mask of the bits of word `i` that lie below bit `len`.
#[inline(always)]
fn word_mask(len: u16, i: usize) -> u64 {
    let bits = (i32::from(len) - 64 * i as i32).clamp(0, 64) as u32;
    u64::MAX.checked_shl(64 - bits).unwrap_or(0)
}

/// Whether `a` and `b` agree on their first `len` bits.
#[inline(always)]
fn prefix_eq(a: &Key, b: &Key, len: u16) -> bool {
    let mut diff = 0;
    for i in 0..4 {
        diff |= (a[i] ^ b[i]) & word_mask(len, i);
    }
    diff == 0
}

/// `k` with every bit from `len` on cleared.
fn masked(k: &Key, len: u16) -> Key {
    let mut out = *k;
    for (i, w) in out.iter_mut().enumerate() {
        *w &= word_mask(len, i);
    }
    out
}

/// Number of leading bits `a` and `b` share.
fn common_len(a: &Key, b: &Key) -> u16 {
    for i in 0..4 {
        let x = a[i] ^ b[i];
        if x != 0 {
            return (i as u32 * 64 + x.leading_zeros()) as u16;
        }
    }
    256
}

/// The byte of `k` that starts at bit `depth` (a multiple of 8 below 256).
#[inline(always)]
fn byte_at(k: &Key, depth: u16) -> u8 {
    let d = usize::from(depth);
    (k[(d >> 6) & 3] >> (56 - (d & 56))) as u8
}

/// `k` with the byte at bit `depth` replaced by `b`.
fn with_byte(k: &Key, depth: u16, b: u8) -> Key {
    let d = usize::from(depth);
    let shift = 56 - (d & 56);
    let mut out = *k;
    out[(d >> 6) & 3] = (out[(d >> 6) & 3] & !(0xff << shift)) | (u64::from(b) << shift);
    out
}

fn to_prefix(k: &Key, len: u16) -> ServicePrefix {
    ServicePrefix::new(ServiceId::from_words(*k), len)
}

/// Examines node `n` for `w` on arrival: checks the bits it skipped, records the longest of
/// its own prefixes that contains `w` in `best`, and returns the slot to follow, if any.
#[inline(always)]
fn visit_node<'a, V>(
    n: &'a DynNode<V>,
    w: &Key,
    best: &mut Option<Match<'a, V>>,
) -> Option<&'a Slot<V>> {
    let h = &n.head;
    if !prefix_eq(&h.key, w, h.depth) {
        return None;
    }
    let b = byte_at(w, h.depth);
    if let Some((rel, v)) = h.prefixes.longest(b) {
        *best = Some((h.depth + rel, v));
    }
    n.slots.get(h.child_rank(b)?)
}

/// Examines leaf `l` for `w`: records it in `best` if it contains `w`.
#[inline(always)]
fn visit_leaf<'a, V>(l: &'a Leaf<V>, w: &Key, best: &mut Option<Match<'a, V>>) {
    if prefix_eq(&l.key, w, l.len) {
        *best = Some((l.len, &l.value));
    }
}

/// Walks from node `n` down the path of `w`, recording matches in `best`.
#[inline(always)]
fn walk<'a, V>(n: &'a DynNode<V>, w: &Key, best: &mut Option<Match<'a, V>>) {
    let mut n = n;
    loop {
        match visit_node(n, w, best) {
            Some(Some(Child::Node(c))) => n = c,
            Some(Some(Child::Leaf(l))) => {
                visit_leaf(l, w, best);
                return;
            }
            _ => return,
        }
    }
}

/// Where one lookup of a batch stands: the next memory it reads, whose load has been started.
enum Cursor<'a, V> {
    /// A node whose header is on its way.
    Node(&'a DynNode<V>),
    /// A child slot (in its parent's allocation) on its way.
    Slot(&'a Slot<V>),
    /// A leaf on its way.
    Leaf(&'a Leaf<V>),
    /// Finished (or never started).
    Done,
}

impl<V> Clone for Cursor<'_, V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<V> Copy for Cursor<'_, V> {}

/// Starts the loads of the cache lines of a node's header that [`visit_node`] reads.
#[inline(always)]
fn prefetch_node<V>(n: &DynNode<V>) {
    // The header spans up to three cache lines: key, child bitmap, prefix bitmap and values.
    serval_sys::prefetch(&n.head.key);
    serval_sys::prefetch(&n.head.cbits);
    serval_sys::prefetch(n.head.prefixes.tail());
}

/// Starts the loads of what [`visit_leaf`] reads, the key and length, and of the value that
/// the caller reads next: they may straddle two cache lines.
#[inline(always)]
fn prefetch_leaf<V>(l: &Leaf<V>) {
    serval_sys::prefetch(&l.key[0]);
    serval_sys::prefetch(&l.len);
    serval_sys::prefetch(&l.value);
}

/// One lookup of a batch: its index in the input, key, cursor and best match so far.
struct Lane<'a, V> {
    at: usize,
    words: Key,
    cur: Cursor<'a, V>,
    best: Option<Match<'a, V>>,
    /// Whether the walk started at a boundary item (and must go back to the root if it finds
    /// nothing there).
    anchored: bool,
}

impl<V> Clone for Lane<'_, V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<V> Copy for Lane<'_, V> {}

impl<'a, V> Lane<'a, V> {
    /// A lane with no lookup.
    const IDLE: Self = Lane {
        at: 0,
        words: [0; 4],
        cur: Cursor::Done,
        best: None,
        anchored: false,
    };

    /// A lookup of `words` (input `at`) that walks from `from`, whose load has been started.
    #[inline(always)]
    fn new(at: usize, words: Key, from: Cursor<'a, V>, anchored: bool) -> Self {
        Lane {
            at,
            words,
            cur: from,
            best: None,
            anchored,
        }
    }
}

/// IDs per stage of the anchor-index pipeline (see [`anchored_batch`]).
const PROBE_GROUP: usize = 16;

/// Longest-prefix-match values of `ids` into `out` (same length); see
/// [`PrefixMap::longest_match_batch`].
fn batch<'a, V>(
    root: &'a DynNode<V>,
    ix: Option<&'a AnchorIndex<V>>,
    ids: &[ServiceId],
    out: &mut [Option<Match<'a, V>>],
) {
    prefetch_node(root);
    match ix {
        Some(ix) => anchored_batch(root, ix, ids, out),
        None => walk_batch(
            root,
            ids.iter()
                .enumerate()
                .map(|(i, id)| Lane::new(i, id.words(), Cursor::Node(root), false)),
            out,
        ),
    }
}

/// Lanes the IDs that [`anchored_batch`] could not answer at their anchor wait in before they
/// walk together.
const PENDING: usize = 64;

/// [`batch`] through the anchor index, software-pipelined over groups of [`PROBE_GROUP`] IDs:
/// each round checks the leaves of one group, probes the slots of the next (prefetching the
/// items they hold) and hashes the one after (prefetching its filter words and home slots), so
/// every load was started a whole round before it is needed. The IDs left (a node item, a leaf
/// that does not contain them, no item) gather in [`PENDING`] lanes that walk together in
/// [`walk_batch`].
fn anchored_batch<'a, V>(
    root: &'a DynNode<V>,
    ix: &'a AnchorIndex<V>,
    ids: &[ServiceId],
    out: &mut [Option<Match<'a, V>>],
) {
    let groups = ids.len().div_ceil(PROBE_GROUP);
    let group = |g: usize| g * PROBE_GROUP..((g + 1) * PROBE_GROUP).min(ids.len());
    let mut words = [[[0u64; 4]; PROBE_GROUP]; 3];
    let mut hashes = [[0u64; PROBE_GROUP]; 3];
    let mut starts: [[Option<Start<'a, V>>; PROBE_GROUP]; 3] = [[None; PROBE_GROUP]; 3];
    let mut pending = [Lane::IDLE; PENDING];
    let mut waiting = 0;
    for round in 0..groups + 2 {
        if let Some(g) = round.checked_sub(2) {
            let (w, st) = (&words[g % 3], &starts[g % 3]);
            if waiting + PROBE_GROUP > PENDING {
                walk_batch(root, pending[..waiting].iter().copied(), out);
                waiting = 0;
            }
            for (i, at) in group(g).enumerate() {
                pending[waiting] = match st[i] {
                    Some(Start::Leaf(l)) if prefix_eq(&l.key, &w[i], l.len) => {
                        out[at] = Some((l.len, &l.value));
                        continue;
                    }
                    Some(Start::Node(n)) => Lane::new(at, w[i], Cursor::Node(n), true),
                    // No item, or a leaf item that does not contain the ID: only prefixes
                    // above bit 64 can.
                    _ => Lane::new(at, w[i], Cursor::Node(root), false),
                };
                waiting += 1;
            }
        }
        if let Some(g) = round.checked_sub(1).filter(|&g| g < groups) {
            let s = g % 3;
            for i in 0..group(g).len() {
                starts[s][i] = ix.get(words[s][i][0], hashes[s][i]);
                match starts[s][i] {
                    Some(Start::Node(n)) => prefetch_node(n),
                    Some(Start::Leaf(l)) => prefetch_leaf(l),
                    None => {}
                }
            }
        }
        if round < groups {
            let s = round % 3;
            for (i, at) in group(round).enumerate() {
                words[s][i] = ids[at].words();
                hashes[s][i] = anchor_index::hash(words[s][i][0]);
                ix.prefetch(hashes[s][i]);
            }
        }
    }
    walk_batch(root, pending[..waiting].iter().copied(), out);
}

/// Runs `jobs` (lanes whose first load has been started) to their end with [`LANES`] of them
/// interleaved (AMAC, Kocberber et al., VLDB 2015): every step of a walk ends by prefetching what
/// its next step reads (a node's header, the child slot it picks, the child) and moves on to the
/// next lane, so each lane's miss is in flight while the others work; a lane that finishes takes
/// the next job at once. Writes each result to `out[lane.at]`.
fn walk_batch<'a, V>(
    root: &'a DynNode<V>,
    mut jobs: impl Iterator<Item = Lane<'a, V>>,
    out: &mut [Option<Match<'a, V>>],
) {
    let mut lanes = [Lane::IDLE; LANES];
    let mut live = 0;
    for (lane, job) in lanes.iter_mut().zip(&mut jobs) {
        *lane = job;
        live += 1;
    }
    while live > 0 {
        for lane in lanes.iter_mut() {
            lane.cur = match lane.cur {
                Cursor::Done => continue,
                Cursor::Node(n) => match visit_node(n, &lane.words, &mut lane.best) {
                    Some(s) => {
                        serval_sys::prefetch(s);
                        Cursor::Slot(s)
                    }
                    None => Cursor::Done,
                },
                Cursor::Slot(Some(Child::Node(c))) => {
                    prefetch_node(c);
                    Cursor::Node(c)
                }
                Cursor::Slot(Some(Child::Leaf(l))) => {
                    prefetch_leaf(l);
                    Cursor::Leaf(l)
                }
                Cursor::Slot(None) => Cursor::Done,
                Cursor::Leaf(l) => {
                    visit_leaf(l, &lane.words, &mut lane.best);
                    Cursor::Done
                }
            };
            if let Cursor::Done = lane.cur {
                if lane.anchored && lane.best.is_none() {
                    // Nothing at or below bit 64: the match, if any, is above the boundary.
                    lane.anchored = false;
                    lane.cur = Cursor::Node(root);
                    continue;
                }
                out[lane.at] = lane.best;
                match jobs.next() {
                    Some(job) => *lane = job,
                    None => live -= 1,
                }
            }
        }
    }
}

/// A map from [`ServicePrefix`] to `V` with longest-prefix-match lookup.
///
/// Persistent: [`Clone`] is O(1) and shares all nodes; a mutation copies only the nodes on its
/// path that are shared, so clones never observe each other's changes. See the
/// [module docs](self) for the structure and costs.
///
/// ```
/// use serval_table::PrefixMap;
/// use serval_wire::{ServiceId, ServicePrefix};
///
/// let mut m = PrefixMap::new();
/// m.insert(ServicePrefix::DEFAULT, "default");
/// m.insert(ServicePrefix::from_domain("example.com").unwrap(), "example");
/// let old = m.clone();
/// m.insert(ServicePrefix::parse("web.example.com").unwrap(), "web");
///
/// let web = ServiceId::from_name("web.example.com").unwrap();
/// assert_eq!(m.longest_match(&web).map(|(_, v)| *v), Some("web"));
/// assert_eq!(old.longest_match(&web).map(|(p, v)| (p.len(), *v)), Some((64, "example")));
/// ```
pub struct PrefixMap<V> {
    /// A node at depth 0, present iff the map is non-empty.
    root: Option<Child<V>>,
    len: usize,
    /// Whether this map keeps an anchor index (see [`PrefixMap::with_anchor_index`]).
    indexed: bool,
    /// Boundary items by anchor, once the map holds [`MIN_PREFIXES`] prefixes (see
    /// `anchor_index.rs`); `None` below that, and while [`Extend`] runs.
    anchors: Option<AnchorIndex<V>>,
    /// Set between [`PrefixMap::begin_batch`] and [`PrefixMap::end_batch`]: changes mark the
    /// anchor index but never rebuild it.
    batching: bool,
}

impl<V> Clone for PrefixMap<V> {
    /// O(1): shares every node with `self`.
    fn clone(&self) -> Self {
        PrefixMap {
            root: self.root.clone(),
            len: self.len,
            indexed: self.indexed,
            anchors: self.anchors.clone(),
            batching: false,
        }
    }
}

impl<V> Default for PrefixMap<V> {
    fn default() -> Self {
        PrefixMap {
            root: None,
            len: 0,
            indexed: false,
            anchors: None,
            batching: false,
        }
    }
}

impl<V> PrefixMap<V> {
    /// An empty map. Allocates nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty map that keeps an *anchor index* once it holds 256 prefixes: a flat hash
    /// table from the first 64 bits of an ID to the first trie item on its path at or below bit
    /// 64, so that a lookup starts there (one probe) instead of walking the levels above. The
    /// table is built in one pass and shared by clones; a change only marks its anchor in a
    /// filter (those lookups walk from the root) and the table is rebuilt once a quarter of the
    /// map has changed. It costs about 34 bytes per rule (BENCHMARKS.md, issue 14), which is
    /// why it is not the default. See `anchor_index.rs`.
    pub fn with_anchor_index() -> Self {
        PrefixMap {
            indexed: true,
            ..Self::default()
        }
    }

    /// Turns the anchor index (see [`PrefixMap::with_anchor_index`]) on, building it now if the
    /// map is large enough, or off, dropping it.
    pub fn set_anchor_index(&mut self, on: bool) {
        self.indexed = on;
        self.anchors = None;
        self.settle_anchors();
    }

    /// Brings the anchor index in line with the map's size and marks: none below
    /// [`MIN_PREFIXES`] prefixes (or when off), a new one when there is none yet or more anchors
    /// are marked than it tolerates.
    fn settle_anchors(&mut self) {
        let want = self.indexed && self.len >= MIN_PREFIXES;
        let build = match &self.anchors {
            Some(ix) => want && ix.stale(),
            None => want,
        };
        if !want {
            self.anchors = None;
        } else if build {
            self.anchors = self.root.as_ref().map(|r| AnchorIndex::build(r, self.len));
        }
    }

    /// Number of prefixes in the map.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the map holds no prefix.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The value stored for exactly `p`.
    pub fn get(&self, p: &ServicePrefix) -> Option<&V> {
        let key = p.id().words();
        let len = p.len();
        let mut cur = self.root.as_ref()?.view();
        loop {
            match cur {
                View::Leaf(l) => return (l.len == len && l.key == key).then_some(&l.value),
                View::Node(h, slots) => {
                    if h.depth > len || !prefix_eq(&h.key, &key, h.depth) {
                        return None;
                    }
                    let rel = len - h.depth;
                    let b = byte_at(&key, h.depth);
                    if rel < 8 {
                        return h.prefixes.get(prefixes::slot(rel, b));
                    }
                    cur = slots.get(h.child_rank(b)?)?.as_ref()?.view();
                }
            }
        }
    }

    /// Whether exactly `p` is in the map.
    pub fn contains_key(&self, p: &ServicePrefix) -> bool {
        self.get(p).is_some()
    }

    /// The longest prefix in the map that contains `id`, with its value.
    ///
    /// No allocation, no recursion; at most 33 steps.
    #[inline]
    pub fn longest_match(&self, id: &ServiceId) -> Option<(ServicePrefix, &V)> {
        let Some(Child::Node(root)) = &self.root else {
            return None;
        };
        let w = id.words();
        let mut best = None;
        if let Some(start) = self
            .anchors
            .as_ref()
            .and_then(|ix| ix.get(w[0], anchor_index::hash(w[0])))
        {
            match start {
                Start::Node(n) => walk(n, &w, &mut best),
                Start::Leaf(l) => visit_leaf(l, &w, &mut best),
            }
        }
        if best.is_none() {
            walk(root, &w, &mut best);
        }
        best.map(|(len, v)| (ServicePrefix::new(*id, len), v))
    }

    /// Longest prefix matches for many IDs: `out[i]` is the length of the longest prefix
    /// containing `ids[i]` with its value, as [`longest_match`](Self::longest_match) would give.
    ///
    /// Sixteen lookups are interleaved, each issuing a prefetch for its next step before the
    /// next lookup takes a step, so that their cache misses overlap (see the
    /// [module docs](self)); with the anchor index, each starts with its anchor's probe.
    ///
    /// # Panics
    /// If `out.len() != ids.len()`.
    pub fn longest_match_batch<'a>(&'a self, ids: &[ServiceId], out: &mut [Option<Match<'a, V>>]) {
        assert_eq!(
            ids.len(),
            out.len(),
            "longest_match_batch: ids and out differ in length"
        );
        match &self.root {
            Some(Child::Node(root)) => batch(root, self.anchors.as_ref(), ids, out),
            _ => out.fill(None),
        }
    }

    /// Every prefix with its value, in ascending [`ServicePrefix`] order (ID bits, then length),
    /// so a prefix comes before the longer prefixes under it.
    pub fn iter(&self) -> Iter<'_, V> {
        let mut stack = Vec::new();
        if let Some(View::Node(head, slots)) = self.root.as_ref().map(Child::view) {
            stack.push(Frame::new(head, slots));
        }
        Iter {
            stack,
            remaining: self.len,
        }
    }

    /// Estimated heap memory owned by the map, in bytes.
    ///
    /// Counts every node, leaf and value array reachable from this map, each charged as a
    /// glibc-style allocator would (the request plus an 8-byte header, rounded up to 16 bytes, at
    /// least 32). Nodes shared with clones are counted in full for each map. Memory owned by the
    /// values themselves (behind a `V` that is a pointer) is not counted.
    pub fn heap_bytes(&self) -> usize {
        fn alloc(n: usize) -> usize {
            if n == 0 {
                0
            } else {
                ((n + 8 + 15) & !15).max(32)
            }
        }
        // An Arc allocation holds two counters before the value.
        let arc = |n: usize| alloc(n + 2 * core::mem::size_of::<usize>());
        let mut total = 0;
        let mut stack: Vec<&Child<V>> = self.root.iter().collect();
        while let Some(c) = stack.pop() {
            total += arc(c.alloc_size());
            if let View::Node(h, slots) = c.view() {
                total += alloc(h.prefixes.values_bytes());
                stack.extend(slots.iter().flatten());
            }
        }
        total + self.anchors.as_ref().map_or(0, |ix| ix.heap_bytes(alloc))
    }

    /// Checks the trie's structural invariants; for tests.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<(), String> {
        let Some(root) = &self.root else {
            return if self.len == 0 {
                Ok(())
            } else {
                Err("no root but non-zero len".into())
            };
        };
        let mut count = 0;
        /// A child's parent depth and key, and the byte it is filed under.
        type Parent = Option<(u16, Key, u8)>;
        let mut stack: Vec<(&Child<V>, Parent)> = vec![(root, None)];
        while let Some((c, parent)) = stack.pop() {
            let (key, len) = match c.view() {
                View::Node(h, _) => (h.key, h.depth),
                View::Leaf(l) => (l.key, l.len),
            };
            let at = format!("{} ({:?})", to_prefix(&key, len), parent.map(|p| p.0));
            match parent {
                None if len != 0 || key != [0; 4] => return Err("root is not at depth 0".into()),
                None if matches!(c.view(), View::Leaf(_)) => return Err("root is a leaf".into()),
                Some((pdepth, pkey, b)) => {
                    if len < pdepth + 8 || !prefix_eq(&key, &pkey, pdepth) {
                        return Err(format!("{at}: too short or off its parent's key"));
                    }
                    if byte_at(&key, pdepth) != b {
                        return Err(format!("{at}: filed under the wrong byte {b}"));
                    }
                }
                None => {}
            }
            if masked(&key, len) != key {
                return Err(format!("{at}: key has bits past its length"));
            }
            let (h, slots) = match c.view() {
                View::Leaf(_) => {
                    count += 1;
                    continue;
                }
                View::Node(h, slots) => (h, slots),
            };
            if h.depth % 8 != 0 || h.depth >= 256 {
                return Err(format!("{at}: bad depth"));
            }
            h.prefixes.check().map_err(|e| format!("{at}: {e}"))?;
            let n = h.child_count();
            if h.cbase != node::bases(&h.cbits) {
                return Err(format!("{at}: stale child rank bases"));
            }
            if slots.len() != class_for(n) {
                return Err(format!("{at}: {n} children in a node of {}", slots.len()));
            }
            if slots[..n].iter().any(Option::is_none) || slots[n..].iter().any(Option::is_some) {
                return Err(format!("{at}: children not packed at the front"));
            }
            if parent.is_none() && h.items() == 0 {
                return Err("empty root kept".into());
            }
            if parent.is_some() && h.items() < 2 {
                return Err(format!("{at}: non-root node with {} items", h.items()));
            }
            count += h.prefixes.len();
            let mut from = 0;
            for s in slots[..n].iter().flatten() {
                let b = next_set(&h.cbits, from).unwrap_or(256);
                from = b + 1;
                stack.push((s, Some((h.depth, h.key, b as u8))));
            }
        }
        if count != self.len {
            return Err(format!(
                "len is {} but {count} prefixes are stored",
                self.len
            ));
        }
        self.check_anchors()
    }

    /// Every entry of the anchor index whose anchor is not marked is the current boundary item
    /// of its anchor (the same allocation), and the index exists exactly when the map is large
    /// enough.
    fn check_anchors(&self) -> Result<(), String> {
        let (Some(ix), Some(root)) = (&self.anchors, &self.root) else {
            return if self.indexed && self.len >= MIN_PREFIXES {
                Err(format!("{} prefixes and no anchor index", self.len))
            } else {
                Ok(())
            };
        };
        if self.len < MIN_PREFIXES {
            return Err(format!("an anchor index with only {} prefixes", self.len));
        }
        for (a, item) in ix.entries() {
            if ix.is_marked(a) {
                continue;
            }
            if !anchor_index::boundary_of(root, &[a, 0, 0, 0]).is_some_and(|b| item.is(b)) {
                return Err(format!(
                    "anchor {a:016x} is unmarked but its entry is not the trie's boundary item"
                ));
            }
        }
        Ok(())
    }

    /// Boundary items of the trie (see `anchor_index.rs`) that a lookup through the anchor index
    /// does not reach: left out of the table, or behind a mark. `None` without an index. For
    /// tests.
    #[doc(hidden)]
    pub fn unindexed_anchors(&self) -> Option<usize> {
        let (ix, root) = (self.anchors.as_ref()?, self.root.as_ref()?);
        let mut items = Vec::new();
        anchor_index::collect(root, &mut items);
        Some(
            items
                .iter()
                .filter(|(a, item)| {
                    !ix.get(*a, anchor_index::hash(*a))
                        .is_some_and(|s| s.is(item))
                })
                .count(),
        )
    }
}

impl<V: Clone> PrefixMap<V> {
    /// Maps `p` to `v`; returns the value `p` had before.
    ///
    /// Copies the shared nodes on the path to `p` (at most 33).
    pub fn insert(&mut self, p: ServicePrefix, v: V) -> Option<V> {
        let key = p.id().words();
        if self.root.is_none() {
            self.root = Some(Child::build(Builder::new([0; 4], 0)));
        }
        let old = insert_in(&mut self.root, &key, p.len(), v);
        if old.is_none() {
            self.len += 1;
        }
        self.anchor_changed(&key, p.len());
        old
    }

    /// Starts a batch of changes: until [`PrefixMap::end_batch`], changes only mark the anchor
    /// index (lookups of their anchors walk the trie) and never rebuild it, so a bulk load or a
    /// resync builds it once. Without an anchor index, nothing changes.
    pub fn begin_batch(&mut self) {
        self.batching = true;
    }

    /// Ends a batch: builds the anchor index anew if the batch marked more anchors than it
    /// tolerates (or the map has grown large enough to have one).
    pub fn end_batch(&mut self) {
        self.batching = false;
        self.settle_anchors();
    }

    /// Keeps the anchor index exact after a change of the prefix (`key`, `len`): marks its anchor
    /// if the change could have moved a boundary item, and builds the table anew once enough
    /// anchors are marked (or the map first grows large enough to have one).
    fn anchor_changed(&mut self, key: &Key, len: u16) {
        if let Some(ix) = &mut self.anchors
            && len >= ANCHOR
        {
            ix.mark(key[0]);
        }
        if !self.batching || self.len < MIN_PREFIXES {
            self.settle_anchors();
        }
    }

    /// Removes `p`; returns its value.
    ///
    /// Removing a prefix that is absent copies and changes nothing.
    pub fn remove(&mut self, p: &ServicePrefix) -> Option<V> {
        if !self.contains_key(p) {
            return None;
        }
        let key = p.id().words();
        let old = remove_in(&mut self.root, &key, p.len());
        if old.is_some() {
            self.len -= 1;
        }
        self.anchor_changed(&key, p.len());
        old
    }
}

/// Inserts under the node in `slot`, whose key agrees with `key` on its first `depth` bits, with
/// `len >= depth`. Moves the node to a larger size class when it runs out of room.
fn insert_in<V: Clone>(slot: &mut Option<Child<V>>, key: &Key, len: u16, v: V) -> Option<V> {
    let Some((head, slots)) = slot.as_mut().and_then(Child::node_mut) else {
        debug_assert!(false, "insert_in called on a leaf");
        return None;
    };
    let rel = len - head.depth;
    let b = byte_at(key, head.depth);
    if rel < 8 {
        return head.prefixes.insert(prefixes::slot(rel, b), v);
    }
    if let Some(r) = head.child_rank(b) {
        let Some(child) = slots.get_mut(r) else {
            debug_assert!(false, "child bitmap and slots disagree");
            return None;
        };
        enum Found {
            Same,
            Below,
            Split(Key, u16),
        }
        let found = match child.as_ref().map(Child::view) {
            Some(View::Leaf(l)) if l.len == len && l.key == *key => Found::Same,
            Some(View::Leaf(l)) => Found::Split(l.key, l.len),
            Some(View::Node(h, _)) if h.depth <= len && prefix_eq(&h.key, key, h.depth) => {
                Found::Below
            }
            Some(View::Node(h, _)) => Found::Split(h.key, h.depth),
            None => return None,
        };
        let (other_key, other_len) = match found {
            Found::Same => {
                return match child {
                    Some(Child::Leaf(l)) => {
                        Some(core::mem::replace(&mut Arc::make_mut(l).value, v))
                    }
                    _ => None,
                };
            }
            Found::Below => return insert_in(child, key, len, v),
            Found::Split(k, l) => (k, l),
        };
        let existing = child.take()?;
        // Both share byte `b` and are at least 8 bits longer than this node, so they diverge (or
        // one ends) at or after `depth + 8`, and before bit 256 because they differ.
        let diverge = common_len(&other_key, key).min(other_len).min(len);
        let depth = diverge & !7;
        let mut mid = Builder::new(masked(key, depth), depth);
        add_to(&mut mid, existing);
        add_to(
            &mut mid,
            Child::Leaf(Arc::new(Leaf {
                key: *key,
                len,
                value: v,
            })),
        );
        *child = Some(Child::build(mid));
        return None;
    }
    let leaf = Child::Leaf(Arc::new(Leaf {
        key: *key,
        len,
        value: v,
    }));
    let n = head.child_count();
    if n < slots.len() {
        // Room in this size class: shift the tail right and fill the gap.
        let r = prefixes::rank(&head.cbits, usize::from(b));
        slots[n] = Some(leaf);
        slots[r..=n].rotate_right(1);
        head.cbits[usize::from(b >> 6)] |= 1 << (b & 63);
        head.cbase = node::bases(&head.cbits);
        return None;
    }
    if let Some(Ok(mut bigger)) = slot.take().map(Child::into_builder) {
        bigger.add_child(b, leaf);
        *slot = Some(Child::build(bigger));
    }
    None
}

/// Adds an existing child or a new leaf under the fresh node being built in `mid`, which lies
/// on its path: as a child if it reaches past `mid`'s stride, else as one of `mid`'s prefixes.
fn add_to<V: Clone>(mid: &mut Builder<V>, c: Child<V>) {
    let depth = mid.head.depth;
    match c.view() {
        View::Node(h, _) => {
            let b = byte_at(&h.key, depth);
            mid.add_child(b, c);
        }
        View::Leaf(l) if l.len >= depth + 8 => {
            let b = byte_at(&l.key, depth);
            mid.add_child(b, c);
        }
        View::Leaf(_) => {
            if let Err(l) = c.into_builder() {
                let l = Arc::unwrap_or_clone(l);
                let slot = prefixes::slot(l.len - depth, byte_at(&l.key, depth));
                mid.head.prefixes.insert(slot, l.value);
            }
        }
    }
}

/// Removes from under the node in `slot`, whose key agrees with `key` on its first `depth` bits,
/// with `len >= depth`; then restores the node's canonical form: a non-root node left with fewer
/// than two items is replaced by its only item (a leaf or its only child), an empty root is
/// dropped, and a node with fewer children moves to the size class that fits.
fn remove_in<V: Clone>(slot: &mut Option<Child<V>>, key: &Key, len: u16) -> Option<V> {
    let (head, slots) = slot.as_mut().and_then(Child::node_mut)?;
    let rel = len - head.depth;
    let b = byte_at(key, head.depth);
    let out = if rel < 8 {
        head.prefixes.remove(prefixes::slot(rel, b))?
    } else {
        let r = head.child_rank(b)?;
        let child = slots.get_mut(r)?;
        let out = match child.as_ref()?.view() {
            View::Leaf(l) if l.len == len && l.key == *key => match child.take() {
                Some(Child::Leaf(l)) => Arc::unwrap_or_clone(l).value,
                other => {
                    *child = other;
                    return None;
                }
            },
            View::Node(h, _) if h.depth <= len && prefix_eq(&h.key, key, h.depth) => {
                remove_in(child, key, len)?
            }
            _ => return None,
        };
        if child.is_none() {
            // Close the gap in the slots and the bitmap.
            let n = head.child_count();
            slots[r..n].rotate_left(1);
            head.cbits[usize::from(b >> 6)] &= !(1 << (b & 63));
            head.cbase = node::bases(&head.cbits);
        }
        out
    };
    let is_root = head.depth == 0;
    let items = head.items();
    let fits = slots.len() == class_for(head.child_count());
    if (is_root && items > 0 || !is_root && items >= 2) && fits {
        return Some(out);
    }
    let Some(Ok(b)) = slot.take().map(Child::into_builder) else {
        return Some(out);
    };
    *slot = if is_root && items > 0 || !is_root && items >= 2 {
        Some(Child::build(b))
    } else if b.head.prefixes.len() == 1 && b.children.is_empty() {
        let Builder { head, .. } = b;
        head.prefixes.drain().next().map(|(i, value)| {
            let (rel, bits) = slot_prefix(i);
            let key = with_byte(&head.key, head.depth, bits);
            Child::Leaf(Arc::new(Leaf {
                key,
                len: head.depth + rel,
                value,
            }))
        })
    } else if is_root {
        None
    } else {
        b.into_only_child()
    };
    Some(out)
}

/// One node being walked by [`Iter`].
struct Frame<'a, V> {
    head: &'a Head<V>,
    slots: &'a [Option<Child<V>>],
    /// Next prefix slot to consider.
    next_prefix: usize,
    /// Next child key byte to consider (256 when done) and the slot it will be in.
    next_byte: usize,
    next_rank: usize,
}

impl<'a, V> Frame<'a, V> {
    fn new(head: &'a Head<V>, slots: &'a [Option<Child<V>>]) -> Self {
        Frame {
            head,
            slots,
            next_prefix: 0,
            next_byte: 0,
            next_rank: 0,
        }
    }
}

/// Iterator over a [`PrefixMap`] in ascending prefix order; see [`PrefixMap::iter`].
pub struct Iter<'a, V> {
    stack: Vec<Frame<'a, V>>,
    remaining: usize,
}

impl<'a, V> Iterator for Iter<'a, V> {
    type Item = (ServicePrefix, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let f = self.stack.last_mut()?;
            let h = f.head;
            let prefix = h.prefixes.next_from(f.next_prefix);
            let child = next_set(&h.cbits, f.next_byte);
            // A prefix of this node sorts before the subtree under the byte its bits start.
            match (prefix, child) {
                (Some((i, v)), c) if c.is_none_or(|b| usize::from(slot_prefix(i).1) <= b) => {
                    f.next_prefix = i + 1;
                    let (rel, bits) = slot_prefix(i);
                    self.remaining -= 1;
                    let key = with_byte(&h.key, h.depth, bits);
                    return Some((to_prefix(&key, h.depth + rel), v));
                }
                (_, Some(b)) => {
                    f.next_byte = b + 1;
                    let slot = f.slots.get(f.next_rank).and_then(Option::as_ref);
                    f.next_rank += 1;
                    match slot.map(Child::view) {
                        Some(View::Leaf(l)) => {
                            self.remaining -= 1;
                            return Some((to_prefix(&l.key, l.len), &l.value));
                        }
                        Some(View::Node(h, s)) => self.stack.push(Frame::new(h, s)),
                        None => {}
                    }
                }
                _ => {
                    self.stack.pop();
                }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl<V> ExactSizeIterator for Iter<'_, V> {}

impl<'a, V> IntoIterator for &'a PrefixMap<V> {
    type Item = (ServicePrefix, &'a V);
    type IntoIter = Iter<'a, V>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<V: Clone> FromIterator<(ServicePrefix, V)> for PrefixMap<V> {
    fn from_iter<I: IntoIterator<Item = (ServicePrefix, V)>>(iter: I) -> Self {
        let mut m = PrefixMap::new();
        m.extend(iter);
        m
    }
}

impl<V: Clone> Extend<(ServicePrefix, V)> for PrefixMap<V> {
    /// Inserts every pair, as one batch ([`PrefixMap::begin_batch`]).
    fn extend<I: IntoIterator<Item = (ServicePrefix, V)>>(&mut self, iter: I) {
        self.begin_batch();
        for (p, v) in iter {
            self.insert(p, v);
        }
        self.end_batch();
    }
}

impl<V: fmt::Debug> fmt::Debug for PrefixMap<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_helpers() {
        let k = [u64::MAX; 4];
        assert_eq!(masked(&k, 0), [0; 4]);
        assert_eq!(masked(&k, 256), k);
        assert_eq!(masked(&k, 65), [u64::MAX, 1 << 63, 0, 0]);
        assert_eq!(common_len(&k, &k), 256);
        assert_eq!(common_len(&[0; 4], &[0, 0, 1, 0]), 191);
        let id = ServiceId::from_words([0x0102_0304_0506_0708, 0, 0, 0x1122_3344_5566_7788]);
        let w = id.words();
        assert_eq!(byte_at(&w, 0), 1);
        assert_eq!(byte_at(&w, 56), 8);
        assert_eq!(byte_at(&w, 248), 0x88);
        assert_eq!(byte_at(&with_byte(&w, 248, 0xaa), 248), 0xaa);
        assert!(prefix_eq(&w, &[0x0102_0304_0506_0708, 0, 0, 0], 195));
        assert!(!prefix_eq(&w, &[0x0102_0304_0506_0708, 0, 0, 0], 196));
    }

    #[test]
    fn sizes_stay_small() {
        // Not a contract; guards against an accidental blow-up of the hot structures.
        assert!(core::mem::size_of::<Child<u64>>() <= 16);
        assert!(core::mem::size_of::<Option<Child<u64>>>() <= 24);
        assert!(core::mem::size_of::<Head<u64>>() <= 120);
        assert!(core::mem::size_of::<Leaf<u64>>() <= 48);
    }
}
