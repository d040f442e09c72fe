//! The anchor index: a flat hash table from the first 64 bits of an ID (its *anchor*) to the
//! first trie item on that ID's path that lies at or below bit 64.
//!
//! # Why a lookup may start there
//!
//! Call an item (node or leaf) a *boundary item* if its depth (a node) or length (a leaf) is at
//! least [`ANCHOR`] bits while its parent's depth is below. Its key then fixes the first 64 bits,
//! so at most one boundary item has a given anchor, and the walk of any ID with that anchor
//! reaches it: every node above it sits at a depth below 64 and branches on bits the ID shares
//! with the item's key. Those nodes hold only prefixes shorter than 64 bits (a node at depth `D`
//! holds lengths `D ..= D + 7`), so any match found *under* the boundary item is longer than all
//! of them and is the longest match. A lookup therefore probes the table with its anchor and
//! walks from the boundary item; only when that finds nothing (or the anchor has no entry) does
//! it walk from the root, which stays the reference.
//!
//! # Keeping it exact without copying it
//!
//! The table is built from the trie in one pass and never changed afterwards: clones share it
//! through an [`Arc`], and a change copies nothing of it. Instead, a change of a prefix of 64
//! bits or more marks its anchor *dirty* in a bit filter, and lookups of a dirty anchor walk from
//! the root. Changes of shorter prefixes need no mark: they copy or create nodes above bit 64
//! only, and every boundary item keeps its place (the same `Arc`, perhaps under a new parent), so
//! the table's entries stay the trie's current items. The filter's bits are only ever set, never
//! cleared, and clones share the filter too, so a map may see marks its clones made: that costs
//! those lookups a walk from the root, never a wrong answer. The writer sets a mark before it
//! publishes the change (the service table's atomic swap orders them for readers). Once more
//! anchors are marked than the map held prefixes when the table was built, the map builds a new
//! table and a fresh filter (at once, or at the end of a batch of changes): an amortised O(1)
//! per change, and the filter (8 bits per tolerated mark) stays sparse enough that few unmarked
//! anchors share a marked bit.
//!
//! # Layout
//!
//! Open addressing with linear probing in one array of `(anchor, item)` slots (32 bytes), twice
//! as many slots as anchors, the home slot picked by a multiply-shift of a mix of the anchor (no
//! power-of-two rounding). IDs are hash outputs already; a crafted set of anchors can lengthen
//! probes but never change a result, and probes stop at [`MAX_PROBE`] slots, past which an
//! anchor is simply not indexed (its lookups walk the trie). The array is advised to use
//! transparent huge pages before it is first written (`serval_sys::advise_huge_pages`): it is
//! read at random, and at a million anchors its 64 MB would otherwise cost a TLB miss per probe.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::node::{Child, DynNode, Leaf, View};
use super::{Key, byte_at};

/// Bit depth of the anchor: the first word of an ID.
pub(super) const ANCHOR: u16 = 64;
/// The index is built once the map holds this many prefixes (a smaller trie stays in cache).
pub(super) const MIN_PREFIXES: usize = 256;
/// Longest probe sequence; an anchor that finds no free slot within it is left out.
const MAX_PROBE: usize = 64;
/// Bits of dirty filter per anchor the map may mark before it rebuilds.
const FILTER_BITS_PER_MARK: usize = 8;

/// A slot: an anchor and its boundary item, or empty (`item` is `None`). Aligned to its size
/// (32 bytes), so that no slot straddles two cache lines.
#[repr(align(32))]
struct Slot<V> {
    anchor: u64,
    item: Option<Child<V>>,
}

/// Where an anchor's lookup starts: the boundary item, borrowed from the table.
pub(super) enum Start<'a, V> {
    /// A node at depth 64 or more.
    Node(&'a DynNode<V>),
    /// A leaf of length 64 or more.
    Leaf(&'a Leaf<V>),
}

impl<V> Clone for Start<'_, V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<V> Copy for Start<'_, V> {}

impl<'a, V> Start<'a, V> {
    /// A lookup's start at `c`.
    fn of(c: &'a Child<V>) -> Self {
        match c {
            Child::Node(n) => Start::Node(n),
            Child::Leaf(l) => Start::Leaf(l),
        }
    }

    /// Whether this is `c` itself (the same allocation).
    pub(super) fn is(self, c: &Child<V>) -> bool {
        match (self, c) {
            (Start::Node(x), Child::Node(y)) => std::ptr::eq(x, &**y),
            (Start::Leaf(x), Child::Leaf(y)) => std::ptr::eq(x, &**y),
            _ => false,
        }
    }
}

/// The built table and the marks of anchors changed since.
pub(super) struct AnchorIndex<V> {
    /// Boxed (not an `Arc<[_]>`) so that the slots stay in the allocation that was advised to
    /// use huge pages before it was written (see [`place`]).
    slots: Arc<Box<[Slot<V>]>>,
    dirty: Arc<[AtomicU64]>,
    /// Anchors this map marked since the table was built (an upper bound on the distinct ones).
    marked: usize,
    /// Marks allowed before a rebuild.
    budget: usize,
}

impl<V> Clone for AnchorIndex<V> {
    fn clone(&self) -> Self {
        AnchorIndex {
            slots: Arc::clone(&self.slots),
            dirty: Arc::clone(&self.dirty),
            marked: self.marked,
            budget: self.budget,
        }
    }
}

/// The hash of an anchor that places it in the table and the filter (the finaliser of
/// SplitMix64).
#[inline(always)]
pub(super) fn hash(a: u64) -> u64 {
    let mut z = a ^ (a >> 30);
    z = z.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^= z >> 27;
    z = z.wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl<V> AnchorIndex<V> {
    /// Indexes the boundary items of the trie under `root`. `prefixes` (the map's size) sets
    /// how many marks the table tolerates before the map should rebuild it.
    pub(super) fn build(root: &Child<V>, prefixes: usize) -> Self {
        let mut items = Vec::new();
        collect(root, &mut items);
        // A load of at most 1/2 (at 2/3, batched lookups at 1M rules measured 15% slower for
        // 16 fewer bytes per anchor). An anchor that finds no free slot within MAX_PROBE (rare
        // at this load) is left out and found through the trie.
        let (slots, _) = place(&items, (items.len() * 2).max(8));
        let budget = prefixes.max(MIN_PREFIXES);
        let words = (budget * FILTER_BITS_PER_MARK).next_power_of_two() / 64;
        AnchorIndex {
            slots: Arc::new(slots),
            dirty: (0..words).map(|_| AtomicU64::new(0)).collect(),
            marked: 0,
            budget,
        }
    }

    /// Marks `anchor` changed.
    pub(super) fn mark(&mut self, anchor: u64) {
        let (w, bit) = self.filter_bit(hash(anchor));
        // Relaxed: the change this mark covers reaches other threads only through the map's
        // publication (an atomic swap with release and acquire), which orders this store too.
        self.dirty[w].fetch_or(bit, Ordering::Relaxed);
        self.marked += 1;
    }

    /// Whether more anchors are marked than the table tolerates.
    pub(super) fn stale(&self) -> bool {
        self.marked > self.budget
    }

    #[inline(always)]
    fn filter_bit(&self, hash: u64) -> (usize, u64) {
        let h = hash.rotate_left(32);
        let w = (h as usize >> 6) & (self.dirty.len() - 1);
        (w, 1u64 << (h & 63))
    }

    /// Starts the loads of what [`Self::get`] reads for an anchor of this [`hash`].
    #[inline(always)]
    pub(super) fn prefetch(&self, hash: u64) {
        let (w, _) = self.filter_bit(hash);
        serval_sys::prefetch(&self.dirty[w]);
        serval_sys::prefetch(&self.slots[home(hash, self.slots.len())]);
    }

    /// The boundary item of `anchor` (whose [`hash`] is given), if the table holds it and the
    /// anchor is not marked.
    #[inline(always)]
    pub(super) fn get(&self, anchor: u64, hash: u64) -> Option<Start<'_, V>> {
        let (w, bit) = self.filter_bit(hash);
        if self.dirty[w].load(Ordering::Relaxed) & bit != 0 {
            return None;
        }
        let cap = self.slots.len();
        let mut i = home(hash, cap);
        for _ in 0..MAX_PROBE {
            let s = &self.slots[i];
            match &s.item {
                None => return None,
                Some(c) if s.anchor == anchor => return Some(Start::of(c)),
                Some(_) => {}
            }
            i += 1;
            if i == cap {
                i = 0;
            }
        }
        None
    }

    /// Every indexed anchor with where its lookups start, for invariant checks.
    pub(super) fn entries(&self) -> impl Iterator<Item = (u64, Start<'_, V>)> {
        self.slots
            .iter()
            .filter_map(|s| s.item.as_ref().map(|c| (s.anchor, Start::of(c))))
    }

    /// Whether `anchor` is marked (or shares a filter bit with a marked anchor).
    pub(super) fn is_marked(&self, anchor: u64) -> bool {
        let (w, bit) = self.filter_bit(hash(anchor));
        self.dirty[w].load(Ordering::Relaxed) & bit != 0
    }

    /// Heap bytes of the table and filter, charged by `alloc` per allocation.
    pub(super) fn heap_bytes(&self, alloc: impl Fn(usize) -> usize) -> usize {
        let arc = 2 * core::mem::size_of::<usize>();
        alloc(arc + core::mem::size_of::<Box<[Slot<V>]>>())
            + alloc(core::mem::size_of_val::<[Slot<V>]>(&self.slots))
            + alloc(arc + core::mem::size_of_val::<[AtomicU64]>(&self.dirty))
    }
}

/// A table of `cap` slots holding `items` by linear probing, and how many found no slot. The
/// table's memory is advised to use huge pages before it is first written: it is read at random,
/// and at a million anchors (64 MB) nearly every probe would otherwise miss the TLB.
fn place<V>(items: &[(u64, &Child<V>)], cap: usize) -> (Box<[Slot<V>]>, usize) {
    let mut slots: Vec<Slot<V>> = Vec::with_capacity(cap);
    serval_sys::advise_huge_pages(slots.spare_capacity_mut());
    slots.extend((0..cap).map(|_| Slot {
        anchor: 0,
        item: None,
    }));
    let mut slots = slots.into_boxed_slice();
    let mut left_out = 0;
    for &(anchor, item) in items {
        let home = home(hash(anchor), cap);
        match (0..MAX_PROBE)
            .map(|i| (home + i) % cap)
            .find(|&i| slots[i].item.is_none())
        {
            Some(s) => {
                slots[s] = Slot {
                    anchor,
                    item: Some(item.clone()),
                }
            }
            None => left_out += 1,
        }
    }
    (slots, left_out)
}

/// Home slot of an anchor of this [`hash`] in a table of `cap` slots.
#[inline(always)]
fn home(hash: u64, cap: usize) -> usize {
    ((u128::from(hash) * cap as u128) >> 64) as usize
}

/// Collects the boundary items under `c` with their anchors.
pub(super) fn collect<'a, V>(c: &'a Child<V>, out: &mut Vec<(u64, &'a Child<V>)>) {
    match c.view() {
        View::Leaf(l) if l.len >= ANCHOR => out.push((l.key[0], c)),
        View::Leaf(_) => {}
        View::Node(h, _) if h.depth >= ANCHOR => out.push((h.key[0], c)),
        View::Node(_, slots) => {
            for s in slots.iter().flatten() {
                collect(s, out);
            }
        }
    }
}

/// The boundary item on the path of `w` under `c` (the root), if there is one.
pub(super) fn boundary_of<'a, V>(c: &'a Child<V>, w: &Key) -> Option<&'a Child<V>> {
    let mut c = c;
    loop {
        match c.view() {
            View::Leaf(l) => return (l.len >= ANCHOR && l.key[0] == w[0]).then_some(c),
            View::Node(h, _) if h.depth >= ANCHOR => return (h.key[0] == w[0]).then_some(c),
            View::Node(h, slots) => {
                if super::prefix_eq(&h.key, w, h.depth) {
                    c = slots.get(h.child_rank(byte_at(w, h.depth))?)?.as_ref()?;
                } else {
                    return None;
                }
            }
        }
    }
}
