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
//! per level. [`PrefixMap::longest_match_batch`] advances groups of 16 lookups in lockstep: each
//! round first touches every lane's next node (one load per cache line of its header, in a tight
//! loop, so that those independent misses are in flight together), then advances every lane one
//! level. (Interleaving lanes asynchronously, AMAC-style, measured slower: without a prefetch
//! instruction, which safe Rust lacks, its touches are loads spread among the work and overlap
//! less.)
//!
//! # Leaf index (opt-in)
//!
//! [`PrefixMap::with_leaf_index`] adds a persistent hash table from each leaf's (prefix, length)
//! to the leaf itself (see `leaf_index.rs`). A leaf has nothing beneath it, so a leaf that
//! contains an ID is that ID's longest match: a lookup first probes the most populated leaf
//! lengths in parallel (one slot and then the leaf, instead of a dependent miss per level) and
//! walks the trie only when no indexed leaf contains the ID. Every change keeps the index exact
//! (a leaf that a change turns into a node's prefix, or a node that collapses into a leaf, is
//! re-indexed), which is what it costs: measured at 1M rules, single lookups ~1.3× faster, but
//! registrations ~2× slower and ~35 B more per rule, because each published change copies an
//! index shard whose slots each hold a reference-counted leaf. The service table therefore does
//! not use it (BENCHMARKS.md, issue 14).

mod leaf_index;
mod node;
mod prefixes;

use std::fmt;
use std::sync::Arc;

use serval_wire::{ServiceId, ServicePrefix};

use leaf_index::{LeafIndex, MIN_LEAVES, PROBES, Probe};
use node::{Builder, Child, DynNode, Head, Leaf, Slot, View, class_for};
use prefixes::{next_set, slot_prefix};

/// A serviceID or prefix as four big-endian words (word 0 holds bits 0..64).
type Key = [u64; 4];

/// Lookups advanced in lockstep by [`PrefixMap::longest_match_batch`].
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
    best: &mut Option<(u16, &'a V)>,
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
fn visit_leaf<'a, V>(l: &'a Leaf<V>, w: &Key, best: &mut Option<(u16, &'a V)>) {
    if prefix_eq(&l.key, w, l.len) {
        *best = Some((l.len, &l.value));
    }
}

/// Loads one word from each cache line of a node's header that [`visit_node`] will read, so
/// that those misses start now.
#[inline(always)]
fn touch_node<V>(n: &DynNode<V>) {
    std::hint::black_box(n.head.key[0]);
    std::hint::black_box(n.head.cbits[3]);
    std::hint::black_box(n.head.prefixes.len());
}

/// Where one lookup of a batch stands: the next node or leaf to examine, or nothing.
enum Cursor<'a, V> {
    Node(&'a DynNode<V>),
    Leaf(&'a Leaf<V>),
    Done,
}

impl<V> Clone for Cursor<'_, V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<V> Copy for Cursor<'_, V> {}

/// Longest-prefix-match values of `ids` into `out` (same length), in groups of [`LANES`]
/// lookups advanced in lockstep. Each round first touches the memory every lane will read next
/// (a tight loop of independent loads, so their misses are in flight together), then advances
/// every lane one level.
fn batch<'a, V>(root: &'a DynNode<V>, ids: &[ServiceId], out: &mut [Option<&'a V>]) {
    for (ids, out) in ids.chunks(LANES).zip(out.chunks_mut(LANES)) {
        let n = ids.len().min(LANES);
        let mut words = [[0u64; 4]; LANES];
        let mut cur = [Cursor::Done; LANES];
        let mut best: [Option<(u16, &'a V)>; LANES] = [None; LANES];
        for i in 0..n {
            words[i] = ids[i].words();
            cur[i] = Cursor::Node(root);
        }
        let mut live = n;
        while live > 0 {
            for c in &cur[..n] {
                match *c {
                    Cursor::Node(node) => touch_node(node),
                    Cursor::Leaf(l) => {
                        std::hint::black_box(l.len);
                    }
                    Cursor::Done => {}
                }
            }
            live = 0;
            for i in 0..n {
                cur[i] = match cur[i] {
                    Cursor::Node(node) => match visit_node(node, &words[i], &mut best[i]) {
                        Some(Some(Child::Node(c))) => Cursor::Node(c),
                        Some(Some(Child::Leaf(l))) => Cursor::Leaf(l),
                        _ => Cursor::Done,
                    },
                    Cursor::Leaf(l) => {
                        visit_leaf(l, &words[i], &mut best[i]);
                        Cursor::Done
                    }
                    Cursor::Done => Cursor::Done,
                };
                live += usize::from(!matches!(cur[i], Cursor::Done));
            }
        }
        for (o, b) in out.iter_mut().zip(&best[..n]) {
            *o = b.map(|(_, v)| v);
        }
    }
}

/// The leaves of a trie, collected (see [`PrefixMap::leaves`]).
struct Leaves<'a, V>(std::vec::IntoIter<&'a Arc<Leaf<V>>>);

impl<'a, V> Iterator for Leaves<'a, V> {
    type Item = &'a Arc<Leaf<V>>;
    fn next(&mut self) -> Option<Self::Item> {
        self.0.next()
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl<V> ExactSizeIterator for Leaves<'_, V> {}

/// [`batch`] with the leaf index in front: in groups of [`LANES`], first every lane's hash slots
/// are touched (one load each, independent, so their misses overlap), then every lane's
/// candidate leaf, then the candidates are verified; the lanes left unanswered walk the trie
/// together.
fn indexed_batch<'a, V>(
    root: &'a DynNode<V>,
    ix: &'a LeafIndex<V>,
    ids: &[ServiceId],
    out: &mut [Option<&'a V>],
) {
    let lens = ix.probe_lengths();
    for (ids, out) in ids.chunks(LANES).zip(out.chunks_mut(LANES)) {
        let n = ids.len().min(LANES);
        let mut probes: [[Option<Probe<'a, V>>; PROBES]; LANES] = [[None; PROBES]; LANES];
        for (i, id) in ids.iter().enumerate().take(n) {
            let w = id.words();
            for (p, &len) in probes[i].iter_mut().zip(lens) {
                *p = Some(ix.probe(&masked(&w, len), len));
            }
        }
        // A tight loop of independent loads, so that the misses are in flight together.
        for p in probes[..n].iter().flatten().flatten() {
            p.touch();
        }
        let mut cand: [[Option<&'a Arc<Leaf<V>>>; PROBES]; LANES] = [[None; PROBES]; LANES];
        for i in 0..n {
            for (c, p) in cand[i].iter_mut().zip(&probes[i]) {
                *c = p.and_then(|p| p.candidate());
                if let Some(l) = c {
                    std::hint::black_box(l.len);
                }
            }
        }
        let mut miss_ids = [ServiceId([0; 32]); LANES];
        let mut miss_at = [0usize; LANES];
        let mut misses = 0;
        for i in 0..n {
            let w = ids[i].words();
            let hit = cand[i]
                .iter()
                .flatten()
                // Any leaf containing the ID is its longest match (nothing lies beneath a leaf).
                .find(|l| prefix_eq(&l.key, &w, l.len));
            match hit {
                Some(l) => out[i] = Some(&l.value),
                None => {
                    miss_ids[misses] = ids[i];
                    miss_at[misses] = i;
                    misses += 1;
                }
            }
        }
        if misses > 0 {
            let mut miss_out: [Option<&'a V>; LANES] = [None; LANES];
            batch(root, &miss_ids[..misses], &mut miss_out[..misses]);
            for (&i, v) in miss_at[..misses].iter().zip(miss_out) {
                out[i] = v;
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
    /// The trie's leaves by (prefix, length), once the map holds [`MIN_LEAVES`] prefixes:
    /// every entry is a current leaf of `root` (the same `Arc`), see `leaf_index.rs`.
    index: Option<LeafIndex<V>>,
    /// Whether this map keeps a leaf index (see [`PrefixMap::with_leaf_index`]).
    indexed: bool,
}

impl<V> Clone for PrefixMap<V> {
    /// O(1): shares every node with `self`.
    fn clone(&self) -> Self {
        PrefixMap {
            root: self.root.clone(),
            len: self.len,
            index: self.index.clone(),
            indexed: self.indexed,
        }
    }
}

impl<V> Default for PrefixMap<V> {
    fn default() -> Self {
        PrefixMap {
            root: None,
            len: 0,
            index: None,
            indexed: false,
        }
    }
}

impl<V> PrefixMap<V> {
    /// An empty map. Allocates nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty map that keeps a *leaf index* once it holds 64 prefixes: a persistent hash
    /// table from each trie leaf's prefix to the leaf, probed at the (at most four) most
    /// populated leaf lengths before the trie is walked. Lookups whose longest match is a leaf
    /// of such a length take one round of parallel hash probes and the leaf instead of a walk of
    /// dependent misses; every change also updates the index, which (at 1M rules) costs about
    /// as much again as the change to the trie, and about 35 bytes per rule. See
    /// `leaf_index.rs` and BENCHMARKS.md (issue 14) for the measured trade.
    pub fn with_leaf_index() -> Self {
        PrefixMap {
            indexed: true,
            ..Self::default()
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

    /// The trie's leaf for exactly (`key`, `len`), if that prefix is held as a leaf.
    fn leaf(&self, key: &Key, len: u16) -> Option<&Arc<Leaf<V>>> {
        let mut cur = self.root.as_ref()?;
        loop {
            match cur {
                Child::Leaf(l) => return (l.len == len && l.key == *key).then_some(l),
                Child::Node(n) => {
                    let h = &n.head;
                    if h.depth + 8 > len || !prefix_eq(&h.key, key, h.depth) {
                        return None;
                    }
                    cur = n
                        .slots
                        .get(h.child_rank(byte_at(key, h.depth))?)?
                        .as_ref()?;
                }
            }
        }
    }

    /// Every leaf of the trie.
    fn leaves(&self) -> Leaves<'_, V> {
        let mut stack: Vec<&Child<V>> = self.root.iter().collect();
        let mut all = Vec::new();
        while let Some(c) = stack.pop() {
            match c {
                Child::Leaf(l) => all.push(l),
                Child::Node(n) => stack.extend(n.slots.iter().flatten()),
            }
        }
        Leaves(all.into_iter())
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
        if let Some(l) = self.index.as_ref().and_then(|ix| ix.lookup(&w)) {
            return Some((ServicePrefix::new(*id, l.len), &l.value));
        }
        let mut n: &DynNode<V> = root;
        let mut best = None;
        loop {
            match visit_node(n, &w, &mut best) {
                Some(Some(Child::Node(c))) => n = c,
                Some(Some(Child::Leaf(l))) => {
                    visit_leaf(l, &w, &mut best);
                    break;
                }
                _ => break,
            }
        }
        best.map(|(len, v)| (ServicePrefix::new(*id, len), v))
    }

    /// Longest-prefix-match values for many IDs: `out[i]` is the value of the longest prefix
    /// containing `ids[i]`, as [`longest_match`](Self::longest_match) would give.
    ///
    /// Lookups run in groups of 16. With the leaf index, each group first starts the loads of
    /// every lane's hash slots, then of every candidate leaf, then verifies them, so that the
    /// cache misses of independent lookups overlap; the lanes the index does not answer walk the
    /// trie together, one level per round, each round starting with the loads of every lane.
    ///
    /// # Panics
    /// If `out.len() != ids.len()`.
    pub fn longest_match_batch<'a>(&'a self, ids: &[ServiceId], out: &mut [Option<&'a V>]) {
        assert_eq!(
            ids.len(),
            out.len(),
            "longest_match_batch: ids and out differ in length"
        );
        match (&self.root, &self.index) {
            (Some(Child::Node(root)), Some(ix)) => indexed_batch(root, ix, ids, out),
            (Some(Child::Node(root)), None) => batch(root, ids, out),
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
        total + self.index.as_ref().map_or(0, |ix| ix.heap_bytes(alloc))
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
        self.check_index()
    }

    /// The leaf index holds only current leaves of the trie (the same allocation, so the same
    /// value), and exists once the map is large enough.
    fn check_index(&self) -> Result<(), String> {
        let Some(ix) = &self.index else {
            return if self.indexed && self.len >= MIN_LEAVES {
                Err(format!("{} prefixes and no leaf index", self.len))
            } else {
                Ok(())
            };
        };
        ix.check()?;
        for l in ix.leaves() {
            match self.leaf(&l.key, l.len) {
                Some(t) if Arc::ptr_eq(t, l) => {}
                _ => {
                    return Err(format!(
                        "index holds {}, which is not a current leaf",
                        to_prefix(&l.key, l.len)
                    ));
                }
            }
        }
        Ok(())
    }

    /// Leaves of the trie that the leaf index does not hold (it may skip a leaf whose hash
    /// slots are full; lookups of it then walk the trie). `None` without an index. For tests.
    #[doc(hidden)]
    pub fn unindexed_leaves(&self) -> Option<usize> {
        let ix = self.index.as_ref()?;
        Some(self.leaves().len() - ix.len())
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
        let mut displaced = None;
        let old = insert_in(&mut self.root, &key, p.len(), v, &mut displaced);
        if old.is_none() {
            self.len += 1;
        }
        if self.indexed && self.index.is_none() && self.len >= MIN_LEAVES {
            self.index = Some(LeafIndex::build(self.leaves()));
        } else if self.index.is_some() {
            if let Some((k, len)) = displaced {
                self.reindex(&k, len);
            }
            self.reindex(&key, p.len());
        }
        old
    }

    /// Brings the index entry of (`key`, `len`) in line with the trie: the prefix's leaf if it
    /// is one, nothing otherwise.
    fn reindex(&mut self, key: &Key, len: u16) {
        let leaf = self.leaf(key, len).cloned();
        if let Some(ix) = &mut self.index {
            match leaf {
                Some(l) => ix.insert(l),
                None => ix.remove(key, len),
            }
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
        let mut created = None;
        let old = remove_in(&mut self.root, &key, p.len(), &mut created);
        if old.is_some() {
            self.len -= 1;
        }
        if self.len == 0 {
            self.index = None;
        } else if self.index.is_some() {
            self.reindex(&key, p.len());
            if let Some((k, len)) = created {
                self.reindex(&k, len);
            }
        }
        old
    }
}

/// Inserts under the node in `slot`, whose key agrees with `key` on its first `depth` bits, with
/// `len >= depth`. Moves the node to a larger size class when it runs out of room.
///
/// A leaf that becomes one of a new node's prefixes is reported in `displaced`.
fn insert_in<V: Clone>(
    slot: &mut Option<Child<V>>,
    key: &Key,
    len: u16,
    v: V,
    displaced: &mut Option<(Key, u16)>,
) -> Option<V> {
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
            Found::Below => return insert_in(child, key, len, v, displaced),
            Found::Split(k, l) => (k, l),
        };
        let existing = child.take()?;
        // Both share byte `b` and are at least 8 bits longer than this node, so they diverge (or
        // one ends) at or after `depth + 8`, and before bit 256 because they differ.
        let diverge = common_len(&other_key, key).min(other_len).min(len);
        let depth = diverge & !7;
        let mut mid = Builder::new(masked(key, depth), depth);
        if other_len < depth + 8 && matches!(existing, Child::Leaf(_)) {
            *displaced = Some((other_key, other_len));
        }
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
///
/// A leaf made of a collapsed node's last prefix is reported in `created`.
fn remove_in<V: Clone>(
    slot: &mut Option<Child<V>>,
    key: &Key,
    len: u16,
    created: &mut Option<(Key, u16)>,
) -> Option<V> {
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
                remove_in(child, key, len, created)?
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
            *created = Some((key, head.depth + rel));
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
    fn extend<I: IntoIterator<Item = (ServicePrefix, V)>>(&mut self, iter: I) {
        for (p, v) in iter {
            self.insert(p, v);
        }
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
