//! The leaf index: a persistent hash table from a leaf's (prefix, length) to the trie's own leaf.
//!
//! # Why it answers a lookup alone
//!
//! A trie leaf is a prefix with nothing else beneath it (see the [module docs](super)). So if
//! some leaf contains an ID, no longer prefix in the map contains that ID — it would lie under
//! the leaf, which would then not be a leaf — and that leaf *is* the longest match. Two leaves
//! never contain the same ID for the same reason, so the lengths can be probed in any order, in
//! parallel, and the first hit is the answer. An ID under no indexed leaf (its longest match is
//! a prefix with more rules beneath it, or a leaf of a length not probed, or nothing) falls back
//! to the trie walk, which stays the reference.
//!
//! # Layout
//!
//! Open addressing with linear probing: a slot is the 64-bit hash of (prefix, length) and the
//! trie's `Arc<Leaf>` (16 bytes; the key and value are read from the leaf, which the caller
//! reads anyway for the value). A hit therefore costs one miss for the slot and one for the leaf,
//! against a dependent miss per trie level. Slots live in shards of [`SHARD`]; the hash's top
//! bits pick the shard, its low bits the home slot; a probe never leaves its shard and never runs
//! more than [`MAX_PROBE`] slots, for lookups and inserts alike. A leaf whose shard has no free
//! slot within that distance is not indexed (it is still found through the trie), or, when the
//! table is more than a quarter full, the table doubles first.
//!
//! # Persistence
//!
//! Shards hang from a two-level directory (`mids` of [`MID`] shards each), everything behind
//! [`Arc`]: a clone is one reference count, and a change copies the shard it touches, its mid and
//! the top array (at most 64 + `shards / 64` pointers), not the table.
//!
//! Only the lengths holding most leaves are probed (at most [`PROBES`]; each must hold at least
//! 1/[`MIN_SHARE`] of the indexed leaves), so rule sets with a few dominant lengths — exact
//! `/256` IDs, domain prefixes — pay one parallel round of probes, and rare lengths cost no probe.

use std::sync::Arc;

use super::node::Leaf;
use super::{Key, masked};

/// Slots per shard (a power of two).
const SHARD: usize = 256;
/// Shards per mid (a power of two).
const MID: usize = 64;
const MID_BITS: u32 = MID.trailing_zeros();
/// Longest probe sequence, for inserts and lookups.
const MAX_PROBE: usize = 32;
/// Lengths probed per lookup, at most.
pub(super) const PROBES: usize = 4;
/// A length is probed only if it holds at least 1/`MIN_SHARE` of the indexed leaves.
const MIN_SHARE: u32 = 32;
/// The index is built once the map holds this many leaves (a smaller trie stays in cache).
pub(super) const MIN_LEAVES: usize = 64;

/// One slot: the hash of its leaf's (prefix, length), and the leaf; empty if `leaf` is `None`.
struct Slot<V> {
    hash: u64,
    leaf: Option<Arc<Leaf<V>>>,
}

impl<V> Clone for Slot<V> {
    fn clone(&self) -> Self {
        Slot {
            hash: self.hash,
            leaf: self.leaf.clone(),
        }
    }
}

impl<V> Default for Slot<V> {
    fn default() -> Self {
        Slot {
            hash: 0,
            leaf: None,
        }
    }
}

type Shard<V> = Arc<[Slot<V>]>;
type Mid<V> = Arc<[Shard<V>]>;

/// 64-bit hash of a masked prefix and its length. IDs are hash outputs already; this only
/// has to spread every word and the length over the bits used for shard and slot.
#[inline(always)]
pub(super) fn hash(k: &Key, len: u16) -> u64 {
    let mut h = (k[0] ^ u64::from(len)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ k[1].wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ k[2].wrapping_mul(0x1656_67B1_9E37_79F9)
        ^ k[3].wrapping_mul(0xD6E8_FEB8_6659_FD93);
    h ^= h >> 32;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^ (h >> 29)
}

/// See the [module docs](self).
pub(super) struct LeafIndex<V> {
    mids: Arc<[Mid<V>]>,
    /// log2 of the number of shards.
    bits: u32,
    /// Leaves indexed.
    len: usize,
    /// Indexed leaves per prefix length.
    counts: Arc<[u32; 257]>,
    /// Lengths probed by lookups, most populated first; `probe[..nprobe]` are used.
    probe: [u16; PROBES],
    nprobe: usize,
}

impl<V> Clone for LeafIndex<V> {
    fn clone(&self) -> Self {
        LeafIndex {
            mids: self.mids.clone(),
            bits: self.bits,
            len: self.len,
            counts: self.counts.clone(),
            probe: self.probe,
            nprobe: self.nprobe,
        }
    }
}

/// Where a probe for one (prefix, length) starts.
pub(super) struct Probe<'a, V> {
    hash: u64,
    shard: &'a [Slot<V>],
}

impl<V> Clone for Probe<'_, V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<V> Copy for Probe<'_, V> {}

impl<'a, V> Probe<'a, V> {
    /// Loads the home slot, so that its cache miss starts now.
    #[inline(always)]
    pub(super) fn touch(&self) {
        let i = self.hash as usize & (SHARD - 1);
        if let Some(s) = self.shard.get(i) {
            std::hint::black_box(s.hash);
        }
    }

    /// The first leaf in this probe's run whose slot records the probe's hash, without reading
    /// the leaf: the candidate that [`Probe::find`] verifies.
    #[inline(always)]
    pub(super) fn candidate(&self) -> Option<&'a Arc<Leaf<V>>> {
        let home = self.hash as usize;
        for k in 0..MAX_PROBE {
            let s = self.shard.get((home + k) & (SHARD - 1))?;
            let leaf = s.leaf.as_ref()?;
            if s.hash == self.hash {
                return Some(leaf);
            }
        }
        None
    }

    /// The indexed leaf for this probe's (prefix, length), if any. Compares hashes in the slots
    /// and the full key only of a slot whose hash matches.
    #[inline(always)]
    pub(super) fn find(&self, key: &Key, len: u16) -> Option<&'a Arc<Leaf<V>>> {
        let home = self.hash as usize;
        for k in 0..MAX_PROBE {
            let s = self.shard.get((home + k) & (SHARD - 1))?;
            let leaf = s.leaf.as_ref()?;
            if s.hash == self.hash && leaf.len == len && leaf.key == *key {
                return Some(leaf);
            }
        }
        None
    }
}

impl<V> LeafIndex<V> {
    /// An empty index of `2^bits` shards.
    fn with_bits(bits: u32) -> Self {
        let shards = 1usize << bits;
        let per_mid = shards.min(MID);
        let mids = (0..shards.div_ceil(MID))
            .map(|_| {
                (0..per_mid)
                    .map(|_| (0..SHARD).map(|_| Slot::default()).collect::<Shard<V>>())
                    .collect::<Mid<V>>()
            })
            .collect();
        LeafIndex {
            mids,
            bits,
            len: 0,
            counts: Arc::new([0; 257]),
            probe: [0; PROBES],
            nprobe: 0,
        }
    }

    /// An index of `leaves`, sized for them.
    pub(super) fn build<'a>(leaves: impl ExactSizeIterator<Item = &'a Arc<Leaf<V>>>) -> Self
    where
        V: 'a,
    {
        let mut bits = 0;
        while (SHARD << bits) * 3 / 4 < leaves.len() * 2 {
            bits += 1;
        }
        let mut ix = Self::with_bits(bits);
        for l in leaves {
            ix.place(l.clone());
        }
        ix.reprobe();
        ix
    }

    /// Leaves indexed.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Slots in the table.
    fn capacity(&self) -> usize {
        SHARD << self.bits
    }

    /// The lengths lookups probe.
    #[inline(always)]
    pub(super) fn probe_lengths(&self) -> &[u16] {
        &self.probe[..self.nprobe]
    }

    /// Where the probe for `key` (masked to `len`) starts.
    #[inline(always)]
    pub(super) fn probe(&self, key: &Key, len: u16) -> Probe<'_, V> {
        let h = hash(key, len);
        let s = (h >> 1 >> (63 - self.bits)) as usize;
        let shard = self
            .mids
            .get(s >> MID_BITS)
            .and_then(|m| m.get(s & (MID - 1)))
            .map_or(&[][..], |s| &s[..]);
        Probe { hash: h, shard }
    }

    /// The leaf containing `id`, among the probed lengths.
    #[inline(always)]
    pub(super) fn lookup(&self, id: &Key) -> Option<&Arc<Leaf<V>>> {
        let lens = self.probe_lengths();
        let mut keys = [[0u64; 4]; PROBES];
        let mut probes: [Option<Probe<'_, V>>; PROBES] = [None; PROBES];
        for (i, &len) in lens.iter().enumerate() {
            keys[i] = masked(id, len);
            let p = self.probe(&keys[i], len);
            p.touch();
            probes[i] = Some(p);
        }
        for (i, &len) in lens.iter().enumerate() {
            if let Some(l) = probes[i].and_then(|p| p.find(&keys[i], len)) {
                return Some(l);
            }
        }
        None
    }

    /// Recomputes which lengths lookups probe.
    fn reprobe(&mut self) {
        let min = (self.len as u64 / u64::from(MIN_SHARE)).max(1);
        let mut best: [(u32, u16); PROBES] = [(0, 0); PROBES];
        for (len, &c) in self.counts.iter().enumerate() {
            if u64::from(c) < min || c <= best[PROBES - 1].0 {
                continue;
            }
            best[PROBES - 1] = (c, len as u16);
            best.sort_by_key(|b| core::cmp::Reverse(b.0));
        }
        self.nprobe = best.iter().take_while(|b| b.0 > 0).count();
        for (p, b) in self.probe.iter_mut().zip(best) {
            *p = b.1;
        }
    }

    /// Mutable access to the shard for hash `h`, copying it (and its mid, and the top array)
    /// first if shared.
    fn shard_mut(&mut self, h: u64) -> &mut [Slot<V>] {
        let s = (h >> 1 >> (63 - self.bits)) as usize;
        let mid = &mut Arc::make_mut(&mut self.mids)[s >> MID_BITS];
        let shard = &mut Arc::make_mut(mid)[s & (MID - 1)];
        Arc::make_mut(shard)
    }

    /// Puts `leaf` in its slot (replacing a leaf of the same prefix). Returns false, changing
    /// nothing, if no slot within [`MAX_PROBE`] of its home is free.
    fn place(&mut self, leaf: Arc<Leaf<V>>) -> bool {
        let h = hash(&leaf.key, leaf.len);
        let shard = self.shard_mut(h);
        let mut i = h as usize;
        for _ in 0..MAX_PROBE {
            let Some(s) = shard.get_mut(i & (SHARD - 1)) else {
                return false;
            };
            match &s.leaf {
                Some(l) if s.hash == h && l.len == leaf.len && l.key == leaf.key => {
                    s.leaf = Some(leaf);
                    return true;
                }
                Some(_) => i += 1,
                None => {
                    let len = usize::from(leaf.len);
                    *s = Slot {
                        hash: h,
                        leaf: Some(leaf),
                    };
                    self.len += 1;
                    if let Some(c) = Arc::make_mut(&mut self.counts).get_mut(len) {
                        *c += 1;
                    }
                    return true;
                }
            }
        }
        false
    }

    /// Indexes `leaf` (or replaces the leaf indexed for its prefix), doubling the table first
    /// when it is three quarters full, or when the leaf's probe sequence is full and the table is
    /// more than a quarter full. Otherwise a leaf that finds no slot is left to the trie.
    pub(super) fn insert(&mut self, leaf: Arc<Leaf<V>>) {
        if (self.len + 1) * 4 > self.capacity() * 3 {
            self.grow();
        }
        if !self.place(leaf.clone()) && self.len * 4 > self.capacity() {
            self.grow();
            self.place(leaf);
        }
        self.reprobe();
    }

    /// Removes the leaf indexed for (`key`, `len`), if any.
    pub(super) fn remove(&mut self, key: &Key, len: u16) {
        let h = hash(key, len);
        if self.probe(key, len).find(key, len).is_none() {
            return;
        }
        let shard = self.shard_mut(h);
        let mut hole = h as usize & (SHARD - 1);
        while shard[hole]
            .leaf
            .as_ref()
            .is_none_or(|l| shard[hole].hash != h || l.len != len || l.key != *key)
        {
            hole = (hole + 1) & (SHARD - 1);
        }
        shard[hole].leaf = None;
        // Backward-shift deletion: move later members of the run into the hole when their home
        // is not after it, so that no probe sequence crosses an empty slot.
        let mut j = hole;
        for _ in 1..SHARD {
            j = (j + 1) & (SHARD - 1);
            if shard[j].leaf.is_none() {
                break;
            }
            let home = shard[j].hash as usize & (SHARD - 1);
            // Cyclic distances from the member's home to it and to the hole.
            let dj = j.wrapping_sub(home) & (SHARD - 1);
            let dh = hole.wrapping_sub(home) & (SHARD - 1);
            if dh <= dj {
                shard[hole] = core::mem::take(&mut shard[j]);
                hole = j;
            }
        }
        self.len -= 1;
        if let Some(c) = Arc::make_mut(&mut self.counts).get_mut(usize::from(len)) {
            *c = c.saturating_sub(1);
        }
        self.reprobe();
    }

    /// Doubles the number of shards and re-places every leaf.
    fn grow(&mut self) {
        let mut bigger = Self::with_bits(self.bits + 1);
        for m in self.mids.iter() {
            for s in m.iter() {
                for slot in s.iter() {
                    if let Some(l) = &slot.leaf {
                        bigger.place(l.clone());
                    }
                }
            }
        }
        bigger.reprobe();
        *self = bigger;
    }

    /// Every indexed leaf.
    pub(super) fn leaves(&self) -> impl Iterator<Item = &Arc<Leaf<V>>> {
        self.mids
            .iter()
            .flat_map(|m| m.iter())
            .flat_map(|s| s.iter())
            .filter_map(|s| s.leaf.as_ref())
    }

    /// Heap bytes of the table (slots, directory and counts), charged as
    /// [`PrefixMap::heap_bytes`](super::PrefixMap::heap_bytes) charges the trie.
    pub(super) fn heap_bytes(&self, alloc: impl Fn(usize) -> usize) -> usize {
        let arc = |n: usize| alloc(n + 2 * core::mem::size_of::<usize>());
        let shard = arc(SHARD * core::mem::size_of::<Slot<V>>());
        let shards = 1usize << self.bits;
        shards * shard
            + self
                .mids
                .iter()
                .map(|m| arc(m.len() * core::mem::size_of::<Shard<V>>()))
                .sum::<usize>()
            + arc(self.mids.len() * core::mem::size_of::<Mid<V>>())
            + arc(core::mem::size_of::<[u32; 257]>())
    }

    /// Checks that every slot is reachable from its home and holds a leaf whose hash it
    /// records; for tests.
    pub(super) fn check(&self) -> Result<(), String> {
        let mut n = 0;
        let mut counts = [0u32; 257];
        for (si, s) in self.mids.iter().flat_map(|m| m.iter()).enumerate() {
            for (i, slot) in s.iter().enumerate() {
                let Some(l) = &slot.leaf else { continue };
                n += 1;
                counts[usize::from(l.len)] += 1;
                if slot.hash != hash(&l.key, l.len) {
                    return Err(format!("index slot {si}/{i}: stale hash"));
                }
                if (slot.hash >> 1 >> (63 - self.bits)) as usize != si {
                    return Err(format!("index slot {si}/{i}: in the wrong shard"));
                }
                let home = slot.hash as usize & (SHARD - 1);
                let d = i.wrapping_sub(home) & (SHARD - 1);
                if d >= MAX_PROBE {
                    return Err(format!("index slot {si}/{i}: {d} slots from home"));
                }
                if (0..d).any(|k| s[(home + k) & (SHARD - 1)].leaf.is_none()) {
                    return Err(format!("index slot {si}/{i}: a hole before it"));
                }
            }
        }
        if n != self.len || counts != *self.counts {
            return Err(format!("index counts {} leaves, holds {n}", self.len));
        }
        Ok(())
    }
}
