//! [`PrefixMap`]: a persistent longest-prefix-match map over 256-bit serviceID prefixes.
//!
//! # Structure: one hash probe per populated chunk level
//!
//! Name-derived serviceIDs are 32-bit label chunks, TLD first (see `serval_wire::id`), so real
//! rule sets sit at lengths that are multiples of 32 (`/32` … `/224` for domain prefixes, `/256`
//! for exact names), with a few rules at other lengths. The map is built around that:
//!
//! * Every rule is one **node** in a hash table keyed by `(length, masked prefix)`.
//! * The nine **chunk levels** `0, 32, … 256` are probed longest first; a bitmap says which
//!   levels hold any node, so empty levels cost nothing.
//! * A rule of an *odd* length `32k + r` (`0 < r < 32`) also needs a node at `(32k, its first
//!   32k bits)`: the rule there, or a value-less **marker**. That node's `odd` mask says which
//!   relative lengths `r` have rules beneath it, and those are probed (longest first) before
//!   the node's own rule. So the odd lengths cost probes only under the prefixes that have them.
//! * The table is split into **shards** by the top bits of the key's hash; a shard is a small
//!   open-addressed array (linear probing, load at most 0.8) in its own allocation. The
//!   **directory** of shards holds, beside each shard's pointer, a 256-bit Bloom filter of the
//!   shard's keys (two bits per key in one of four words): 48 bytes per 16–64 nodes, ~1 MB at
//!   a million rules, small enough to stay in the last-level cache. A probe for an absent key
//!   almost never goes past its filter; a present key costs one more miss, for the slot (key,
//!   length and value together). The misses that remain are the filter reads (L2 or L3) and
//!   the slot (DRAM, often with a TLB miss): measured in `BENCHMARKS.md`, issue 14.
//! * Keys are hashed with a folded multiply keyed by a per-map random seed (std's
//!   `RandomState`), so crafted IDs cannot aim at one shard; shards grow with their contents
//!   and the directory doubles when shards average more than 64 nodes.
//!
//! # Persistence
//!
//! [`Clone`] copies one [`Arc`] and a few counters. The directory is two levels of `Arc`ed
//! arrays (about √shards groups of √shards entries); a change copies the top array, one group
//! and one shard when they are shared with a clone, and changes them in place when this map
//! owns them.
//! So the service table can publish a new version while readers keep the old one. Values are
//! cloned when their shard is copied, so `V` should be cheap to clone.
//!
//! # Lookups
//!
//! [`PrefixMap::longest_match`] allocates nothing and never recurses. The hash of every chunk
//! level comes from one chain of four folded multiplies over the ID's words.
//! [`PrefixMap::longest_match_batch`] first, for every lookup of a group of 16, checks the
//! filters and touches the slot of the longest level that may hold a match, so those cache
//! misses are in flight together; then it finishes each lookup, whose memory is by then cached.
//!
//! # Costs
//!
//! Per node: one slot (`48 + size_of::<V>()` bytes, rounded to 8) at a load of 0.67–0.8, plus a
//! share of the directory (~1 byte). An insert into a shard this map owns and that has room is
//! done in place; otherwise (a shared shard, a full one, a removal) the shard (≤ ~100 slots) is
//! copied or rebuilt. A directory resize (when the node count doubles or falls by 4×) rebuilds
//! the map, which amortizes to O(1) per change.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use serval_wire::{ServiceId, ServicePrefix};

/// A serviceID or prefix as four big-endian words (word 0 holds bits 0..64).
type Key = [u64; 4];

/// A shard: open-addressed slots in one shared allocation.
type Shard<V> = Arc<[Node<V>]>;

/// The directory: groups of entries, each group and the whole shared between clones.
type Dir<V> = Arc<[Arc<[DirEntry<V>]>]>;

/// Lookups advanced together by [`PrefixMap::longest_match_batch`].
const LANES: usize = 16;

/// The directory doubles when shards average more nodes than this.
const GROW_AT: usize = 64;
/// The directory halves when shards average fewer nodes than this.
const SHRINK_AT: usize = 16;
/// Shards per directory group (bits) when there are `2^shard_bits` shards: about the square
/// root, so that a change copies two small arrays (the top one and one group).
fn group_bits(shard_bits: u32) -> u32 {
    shard_bits.div_ceil(2)
}

/// `len` of an empty slot.
const EMPTY: u16 = u16::MAX;

/// Mask of the bits of word `i` that lie below bit `len`.
#[inline(always)]
fn word_mask(len: u16, i: usize) -> u64 {
    let bits = (i32::from(len) - 64 * i as i32).clamp(0, 64) as u32;
    u64::MAX.checked_shl(64 - bits).unwrap_or(0)
}

/// `k` with every bit from `len` on cleared.
#[inline(always)]
fn masked(k: &Key, len: u16) -> Key {
    let mut out = *k;
    for (i, w) in out.iter_mut().enumerate() {
        *w &= word_mask(len, i);
    }
    out
}

/// 64×64→128-bit multiply, folded: the mixing step of the key hash.
#[inline(always)]
fn fold(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

/// The per-map hash key: random words, odd so that no multiplier is zero, and the final
/// multiplier of each chunk level.
#[derive(Clone, Copy, Debug)]
struct Seeds([u64; 6], [u64; 9]);

impl Seeds {
    fn random() -> Seeds {
        let s = RandomState::new();
        let mut k = [0u64; 6];
        for (i, w) in k.iter_mut().enumerate() {
            *w = s.hash_one(i as u64 ^ 0x5e7a_1a11) | 1;
        }
        let mut f = [0u64; 9];
        for (i, w) in f.iter_mut().enumerate() {
            *w = Self::fin(&k, 32 * i as u16);
        }
        Seeds(k, f)
    }

    /// The final multiplier for length `len`.
    #[inline(always)]
    fn fin(k: &[u64; 6], len: u16) -> u64 {
        k[5].wrapping_add(u64::from(len).wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// Hash of the chunk-level prefix of length `32 * k` (`k <= 8`): [`at`](Self::at) for
    /// that length, with less work.
    #[inline(always)]
    fn level(&self, acc: &[u64; 5], w: &Key, k: usize) -> u64 {
        let i = (k >> 1) & 3;
        let last = if k & 1 == 1 {
            w[i] & 0xffff_ffff_0000_0000
        } else {
            0
        };
        fold(acc[(k >> 1).min(4)] ^ last, self.1[k.min(8)])
    }

    /// The chain of partial hashes: `acc[i]` covers words `0..i` of `w`.
    #[inline(always)]
    fn chain(&self, w: &Key) -> [u64; 5] {
        let mut acc = [0u64; 5];
        acc[0] = self.0[0];
        for i in 0..4 {
            acc[i + 1] = fold(acc[i] ^ w[i], self.0[i + 1]);
        }
        acc
    }

    /// Hash of the prefix of length `len` of the ID whose chain is `acc` and words `w`.
    #[inline(always)]
    fn at(&self, acc: &[u64; 5], w: &Key, len: u16) -> u64 {
        let i = usize::from(len >> 6) & 7;
        let last = if i < 4 { w[i] & word_mask(len, i) } else { 0 };
        fold(acc[i.min(4)] ^ last, Self::fin(&self.0, len))
    }

    /// Hash of a stored `(key, len)`.
    fn of(&self, key: &Key, len: u16) -> u64 {
        self.at(&self.chain(key), key, len)
    }
}

/// The Bloom word index and bit pair of hash `h`.
#[inline(always)]
fn bloom_bits(h: u64) -> (usize, u64) {
    let word = (h >> 20) as usize & 3;
    let bits = (1u64 << ((h >> 8) & 63)) | (1u64 << ((h >> 14) & 63));
    (word, bits)
}

/// Start slot of hash `h` in a shard of `cap` slots.
#[inline(always)]
fn home(h: u64, cap: usize) -> usize {
    (((h & 0xffff_ffff) * cap as u64) >> 32) as usize
}

/// Slots for a shard that is to hold `n` nodes: a load of about 2/3.
fn cap_for(n: usize) -> usize {
    n + n / 2 + 1
}

/// Whether a shard of `cap` slots may hold `n` nodes (load at most 0.8, one slot empty).
fn fits(n: usize, cap: usize) -> bool {
    n * 5 <= cap * 4 && n < cap
}

/// One slot: a rule, a marker, or nothing (`len == EMPTY`).
struct Node<V> {
    /// The prefix's bits; bits past `len` are zero.
    key: Key,
    /// Prefix length, or [`EMPTY`].
    len: u16,
    /// For a node at a multiple of 32: bit `r` set if rules of length `len + r` may lie
    /// beneath it (exact while no rule under it was removed; never missing one).
    odd: u32,
    /// Rules beneath this node at lengths `len + 1 ..= len + 31`.
    odd_count: u32,
    /// The rule's value; `None` for a marker (or an empty slot).
    value: Option<V>,
}

impl<V> Node<V> {
    const fn empty() -> Self {
        Node {
            key: [0; 4],
            len: EMPTY,
            odd: 0,
            odd_count: 0,
            value: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.len == EMPTY
    }
}

impl<V: Clone> Clone for Node<V> {
    fn clone(&self) -> Self {
        Node {
            key: self.key,
            len: self.len,
            odd: self.odd,
            odd_count: self.odd_count,
            value: self.value.clone(),
        }
    }
}

/// One directory slot: a shard and the Bloom filter of its keys.
struct DirEntry<V> {
    bloom: [u64; 4],
    shard: Option<Shard<V>>,
}

impl<V> Clone for DirEntry<V> {
    fn clone(&self) -> Self {
        DirEntry {
            bloom: self.bloom,
            shard: self.shard.clone(),
        }
    }
}

impl<V> DirEntry<V> {
    const fn empty() -> Self {
        DirEntry {
            bloom: [0; 4],
            shard: None,
        }
    }

    /// The node for `(key, len)` with hash `h`, if present.
    #[inline(always)]
    fn find(&self, h: u64, key: &Key, len: u16) -> Option<&Node<V>> {
        let (word, bits) = bloom_bits(h);
        if self.bloom[word] & bits != bits {
            return None;
        }
        let shard = self.shard.as_deref()?;
        let cap = shard.len();
        let mut i = home(h, cap);
        for _ in 0..cap {
            let n = shard.get(i)?;
            if n.len == len && n.key == *key {
                return Some(n);
            }
            if n.is_empty() {
                return None;
            }
            i += 1;
            if i == cap {
                i = 0;
            }
        }
        None
    }

    /// The slot a probe for hash `h` starts at.
    #[inline(always)]
    fn home_slot(&self, h: u64) -> Option<&Node<V>> {
        let shard = self.shard.as_deref()?;
        shard.get(home(h, shard.len()))
    }
}

/// Places `nodes` in a fresh shard of `cap` slots; returns it with its Bloom filter.
fn build_shard<V>(
    seeds: &Seeds,
    nodes: impl Iterator<Item = Node<V>>,
    cap: usize,
) -> (Option<Shard<V>>, [u64; 4]) {
    let mut slots: Vec<Node<V>> = (0..cap).map(|_| Node::empty()).collect();
    let mut bloom = [0u64; 4];
    let mut any = false;
    for n in nodes {
        let h = seeds.of(&n.key, n.len);
        let (word, bits) = bloom_bits(h);
        bloom[word] |= bits;
        let mut i = home(h, cap);
        while !slots[i].is_empty() {
            i = if i + 1 == cap { 0 } else { i + 1 };
        }
        slots[i] = n;
        any = true;
    }
    if any {
        (Some(slots.into()), bloom)
    } else {
        (None, [0; 4])
    }
}

/// Moves the nodes out of `shard` (cloning them only if a clone of the map shares it).
fn take_nodes<V: Clone>(shard: Option<Shard<V>>) -> Vec<Node<V>> {
    let Some(mut arc) = shard else {
        return Vec::new();
    };
    match Arc::get_mut(&mut arc) {
        Some(slots) => slots
            .iter_mut()
            .filter(|n| !n.is_empty())
            .map(|n| std::mem::replace(n, Node::empty()))
            .collect(),
        None => arc.iter().filter(|n| !n.is_empty()).cloned().collect(),
    }
}

/// A map from [`ServicePrefix`] to `V` with longest-prefix-match lookup.
///
/// Persistent: [`Clone`] is O(1) and shares all storage; a mutation copies only the parts it
/// changes that are shared, so clones never observe each other's changes. See the
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
    /// `2^top_bits` groups of `2^group_bits` directory entries; empty iff the map holds no
    /// node.
    dir: Option<Dir<V>>,
    /// Shards: `2^shard_bits`.
    shard_bits: u32,
    seeds: Option<Seeds>,
    /// Rules (nodes with a value).
    len: usize,
    /// Nodes, markers included.
    nodes: usize,
    /// Nodes at each chunk level (length `32k`).
    level_nodes: [u32; 9],
    /// Bit `k` set iff `level_nodes[k] > 0`.
    levels: u16,
}

impl<V> Clone for PrefixMap<V> {
    /// O(1): shares all storage with `self`.
    fn clone(&self) -> Self {
        PrefixMap {
            dir: self.dir.clone(),
            shard_bits: self.shard_bits,
            seeds: self.seeds,
            len: self.len,
            nodes: self.nodes,
            level_nodes: self.level_nodes,
            levels: self.levels,
        }
    }
}

impl<V> Default for PrefixMap<V> {
    fn default() -> Self {
        PrefixMap {
            dir: None,
            shard_bits: 0,
            seeds: None,
            len: 0,
            nodes: 0,
            level_nodes: [0; 9],
            levels: 0,
        }
    }
}

impl<V> PrefixMap<V> {
    /// An empty map. Allocates nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of prefixes in the map.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the map holds no prefix.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn group_bits(&self) -> u32 {
        group_bits(self.shard_bits)
    }

    /// The directory entry of hash `h`.
    #[inline(always)]
    fn entry(&self, h: u64) -> Option<&DirEntry<V>> {
        let dir = self.dir.as_deref()?;
        let s = h.checked_shr(64 - self.shard_bits).unwrap_or(0) as usize;
        let g = self.group_bits();
        dir.get(s >> g)?.get(s & ((1 << g) - 1))
    }

    /// The node for `(key, len)` (`key` masked to `len`).
    #[inline(always)]
    fn find(&self, seeds: &Seeds, acc: &[u64; 5], w: &Key, len: u16) -> Option<&Node<V>> {
        let h = seeds.at(acc, w, len);
        let key = masked(w, len);
        self.entry(h)?.find(h, &key, len)
    }

    /// The value stored for exactly `p`.
    pub fn get(&self, p: &ServicePrefix) -> Option<&V> {
        let seeds = self.seeds.as_ref()?;
        let key = p.id().words();
        let h = seeds.of(&key, p.len());
        self.entry(h)?.find(h, &key, p.len())?.value.as_ref()
    }

    /// Whether exactly `p` is in the map.
    pub fn contains_key(&self, p: &ServicePrefix) -> bool {
        self.get(p).is_some()
    }

    /// The directory entry of hash `h` in `dir` (this map's directory).
    #[inline(always)]
    fn entry_in<'a>(&self, dir: &'a [Arc<[DirEntry<V>]>], h: u64) -> Option<&'a DirEntry<V>> {
        // `(h >> 1) >> (63 - bits)` is the top `bits` bits of `h`, and 0 when `bits` is 0.
        let s = ((h >> 1) >> (63 - self.shard_bits)) as usize;
        let g = self.group_bits();
        dir.get(s >> g)?.get(s & ((1 << g) - 1))
    }

    /// Whether `h`'s filter lets it through.
    #[inline(always)]
    fn passes(&self, dir: &[Arc<[DirEntry<V>]>], h: u64) -> bool {
        let (word, bits) = bloom_bits(h);
        self.entry_in(dir, h)
            .is_some_and(|e| e.bloom[word] & bits == bits)
    }

    /// Bit `r` set for each `r` in `odd` whose filter lets `(id, len + r)` through. Every
    /// filter is read, without branching on any of them, so the loads overlap.
    #[inline(always)]
    fn odd_candidates(
        &self,
        dir: &[Arc<[DirEntry<V>]>],
        seeds: &Seeds,
        acc: &[u64; 5],
        w: &Key,
        len: u16,
        odd: u32,
    ) -> u32 {
        let mut out = 0;
        let mut rest = odd;
        while rest != 0 {
            let r = rest.trailing_zeros();
            rest &= rest - 1;
            let h = seeds.at(acc, w, len + r as u16);
            out |= u32::from(self.passes(dir, h)) << r;
        }
        out
    }

    /// The hashes of the ID's prefixes at every populated chunk level, and which of them
    /// their filters let through. Every filter is read before any is acted on, so the loads
    /// overlap.
    #[inline(always)]
    fn levels(
        &self,
        dir: &[Arc<[DirEntry<V>]>],
        seeds: &Seeds,
        acc: &[u64; 5],
        w: &Key,
    ) -> ([u64; 9], u32) {
        let mut hs = [0u64; 9];
        let mut levels = 0u32;
        for (k, h) in hs.iter_mut().enumerate() {
            if self.levels & (1 << k) != 0 {
                *h = seeds.level(acc, w, k);
                levels |= u32::from(self.passes(dir, *h)) << k;
            }
        }
        (hs, levels)
    }

    /// Longest match of the ID with words `w` and hash chain `acc`, given its chunk-level
    /// hashes `hs` and the levels `levels` the filters let through: its length and value.
    /// Probes those levels longest first, and under a node with rules of odd lengths beneath,
    /// those lengths (longest first) before the node's own rule.
    #[inline(always)]
    fn lpm_from<'a>(
        &'a self,
        dir: &'a [Arc<[DirEntry<V>]>],
        seeds: &Seeds,
        acc: &[u64; 5],
        w: &Key,
        hs: &[u64; 9],
        mut levels: u32,
    ) -> Option<(u16, &'a V)> {
        while levels != 0 {
            let k = 31 - levels.leading_zeros() as usize;
            levels &= !(1 << k);
            let len = 32 * k as u16;
            let h = hs[k.min(8)];
            let key = masked(w, len);
            let Some(n) = self.entry_in(dir, h).and_then(|e| e.find(h, &key, len)) else {
                continue;
            };
            let mut odd = if n.odd != 0 {
                self.odd_candidates(dir, seeds, acc, w, len, n.odd)
            } else {
                0
            };
            while odd != 0 {
                let r = 31 - odd.leading_zeros() as u16;
                odd &= !(1 << r);
                if let Some(v) = self
                    .find(seeds, acc, w, len + r)
                    .and_then(|m| m.value.as_ref())
                {
                    return Some((len + r, v));
                }
            }
            if let Some(v) = &n.value {
                return Some((len, v));
            }
        }
        None
    }

    /// The longest prefix in the map that contains `id`, with its value.
    ///
    /// No allocation, no recursion; one hash probe per populated chunk level from the longest
    /// down to the first match (plus the odd lengths under a node that has them), most of them
    /// answered by the in-cache filters.
    #[inline]
    pub fn longest_match(&self, id: &ServiceId) -> Option<(ServicePrefix, &V)> {
        let seeds = self.seeds.as_ref()?;
        let dir = self.dir.as_deref()?;
        let w = id.words();
        let acc = seeds.chain(&w);
        let (hs, levels) = self.levels(dir, seeds, &acc, &w);
        self.lpm_from(dir, seeds, &acc, &w, &hs, levels)
            .map(|(len, v)| (ServicePrefix::new(*id, len), v))
    }

    /// Longest-prefix-match values for many IDs: `out[i]` is the value of the longest prefix
    /// containing `ids[i]`, as [`longest_match`](Self::longest_match) would give.
    ///
    /// Lookups run in groups of 16: first every lookup's filters are checked and the slot of
    /// its longest candidate level is touched, so that those cache misses overlap instead of
    /// queueing one after another; then each lookup is finished from cache.
    ///
    /// # Panics
    /// If `out.len() != ids.len()`.
    pub fn longest_match_batch<'a>(&'a self, ids: &[ServiceId], out: &mut [Option<&'a V>]) {
        assert_eq!(
            ids.len(),
            out.len(),
            "longest_match_batch: ids and out differ in length"
        );
        let (Some(seeds), Some(dir)) = (self.seeds.as_ref(), self.dir.as_deref()) else {
            out.fill(None);
            return;
        };
        for (ids, out) in ids.chunks(LANES).zip(out.chunks_mut(LANES)) {
            let n = ids.len().min(LANES);
            let mut words = [[0u64; 4]; LANES];
            let mut accs = [[0u64; 5]; LANES];
            let mut hs = [[0u64; 9]; LANES];
            // 1. Hash every lane's chunk levels and note where their filter words are...
            let mut filters: [&u64; LANES * 9] = [&0; LANES * 9];
            let mut nf = 0;
            for i in 0..n {
                words[i] = ids[i].words();
                accs[i] = seeds.chain(&words[i]);
                for (k, hk) in hs[i].iter_mut().enumerate() {
                    if self.levels & (1 << k) != 0 {
                        let h = seeds.level(&accs[i], &words[i], k);
                        *hk = h;
                        if let (Some(e), Some(f)) = (self.entry_in(dir, h), filters.get_mut(nf)) {
                            *f = &e.bloom[bloom_bits(h).0];
                            nf += 1;
                        }
                    }
                }
            }
            // ...then load them all in a tight loop, so that their misses are in flight
            // together.
            let mut sink = 0u64;
            for f in &filters[..nf] {
                sink ^= **f;
            }
            // 2. Read the filters (now cached) and find the slot of each lane's longest
            //    candidate level; then load those slots the same way.
            let mut cands = [0u32; LANES];
            let mut slots: [Option<&Node<V>>; LANES] = [None; LANES];
            for i in 0..n {
                let mut c = 0u32;
                for (k, h) in hs[i].iter().enumerate() {
                    if self.levels & (1 << k) != 0 {
                        c |= u32::from(self.passes(dir, *h)) << k;
                    }
                }
                cands[i] = c;
                if c != 0 {
                    let h = hs[i][(31 - c.leading_zeros() as usize).min(8)];
                    slots[i] = self.entry_in(dir, h).and_then(|e| e.home_slot(h));
                }
            }
            for n in slots[..n].iter().flatten() {
                sink ^= n.key[0] ^ u64::from(n.len);
            }
            std::hint::black_box(sink);
            // 3. Finish each lookup from cache.
            for i in 0..n {
                out[i] = self
                    .lpm_from(dir, seeds, &accs[i], &words[i], &hs[i], cands[i])
                    .map(|(_, v)| v);
            }
        }
    }

    /// Every prefix with its value, in ascending [`ServicePrefix`] order (ID bits, then length),
    /// so a prefix comes before the longer prefixes under it.
    ///
    /// Collects and sorts the entries first: O(n log n) and one allocation.
    pub fn iter(&self) -> Iter<'_, V> {
        let mut items: Vec<(ServicePrefix, &V)> = Vec::with_capacity(self.len);
        for n in self.all_nodes() {
            if let Some(v) = &n.value {
                items.push((to_prefix(&n.key, n.len), v));
            }
        }
        items.sort_unstable_by_key(|(p, _)| *p);
        Iter {
            inner: items.into_iter(),
        }
    }

    /// Every occupied slot.
    fn all_nodes(&self) -> impl Iterator<Item = &Node<V>> {
        self.dir
            .iter()
            .flat_map(|d| d.iter())
            .flat_map(|g| g.iter())
            .flat_map(|e| e.shard.iter())
            .flat_map(|s| s.iter())
            .filter(|n| !n.is_empty())
    }

    /// Estimated heap memory owned by the map, in bytes.
    ///
    /// Counts the directory and every shard, each charged as a glibc-style allocator would (the
    /// request plus an 8-byte header, rounded up to 16 bytes, at least 32). Storage shared with
    /// clones is counted in full for each map. Memory owned by the values themselves (behind a
    /// `V` that is a pointer) is not counted.
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
        let Some(dir) = &self.dir else { return 0 };
        let mut total = arc(dir.len() * core::mem::size_of::<Arc<[DirEntry<V>]>>());
        for g in dir.iter() {
            total += arc(g.len() * core::mem::size_of::<DirEntry<V>>());
            for s in g.iter().flat_map(|e| e.shard.iter()) {
                total += arc(s.len() * core::mem::size_of::<Node<V>>());
            }
        }
        total
    }

    /// Checks the map's structural invariants; for tests.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<(), String> {
        let Some(seeds) = &self.seeds else {
            return if self.len == 0 && self.nodes == 0 && self.dir.is_none() {
                Ok(())
            } else {
                Err("no seeds but not empty".into())
            };
        };
        let Some(dir) = &self.dir else {
            return if self.len == 0 && self.nodes == 0 && self.levels == 0 {
                Ok(())
            } else {
                Err("no directory but not empty".into())
            };
        };
        let g = self.group_bits();
        if dir.len() != 1 << (self.shard_bits - g) || dir.iter().any(|x| x.len() != 1 << g) {
            return Err("directory has the wrong shape".into());
        }
        let (mut rules, mut nodes, mut level_nodes) = (0, 0, [0u32; 9]);
        let mut odd_rules = Vec::new();
        for (s, e) in dir.iter().flat_map(|x| x.iter()).enumerate() {
            let Some(shard) = &e.shard else {
                if e.bloom != [0; 4] {
                    return Err(format!("shard {s}: empty with a filter"));
                }
                continue;
            };
            let used = shard.iter().filter(|n| !n.is_empty()).count();
            if used == 0 || !fits(used, shard.len()) {
                return Err(format!("shard {s}: {used} nodes in {} slots", shard.len()));
            }
            for n in shard.iter().filter(|n| !n.is_empty()) {
                let at = to_prefix(&n.key, n.len);
                if n.len > 256 || masked(&n.key, n.len) != n.key {
                    return Err(format!("{at}: bad key or length"));
                }
                let h = seeds.of(&n.key, n.len);
                let home_shard = h.checked_shr(64 - self.shard_bits).unwrap_or(0) as usize;
                if home_shard != s {
                    return Err(format!("{at}: in shard {s}, hashes to {home_shard}"));
                }
                if !e.find(h, &n.key, n.len).is_some_and(|m| std::ptr::eq(m, n)) {
                    return Err(format!("{at}: not found by a probe"));
                }
                nodes += 1;
                rules += usize::from(n.value.is_some());
                if n.len % 32 == 0 {
                    level_nodes[usize::from(n.len / 32)] += 1;
                    if n.value.is_none() && n.odd_count == 0 {
                        return Err(format!("{at}: a marker with nothing beneath"));
                    }
                    if (n.odd_count == 0) != (n.odd == 0) || n.odd & 1 != 0 {
                        return Err(format!("{at}: odd mask {:#x} for {}", n.odd, n.odd_count));
                    }
                } else {
                    if n.value.is_none() || n.odd != 0 || n.odd_count != 0 {
                        return Err(format!("{at}: odd-length node without a value or with odd"));
                    }
                    odd_rules.push((n.key, n.len));
                }
            }
        }
        let mut counts = std::collections::HashMap::<(Key, u16), u32>::new();
        for (key, len) in odd_rules {
            let plen = len & !31;
            let pkey = masked(&key, plen);
            let h = seeds.of(&pkey, plen);
            let parent = self.entry(h).and_then(|e| e.find(h, &pkey, plen));
            match parent {
                Some(p) if p.odd & (1 << (len % 32)) != 0 => {
                    *counts.entry((pkey, plen)).or_default() += 1;
                }
                _ => return Err(format!("{}: no marker above", to_prefix(&key, len))),
            }
        }
        for n in self.all_nodes().filter(|n| n.len % 32 == 0) {
            let c = counts.get(&(n.key, n.len)).copied().unwrap_or(0);
            if c != n.odd_count {
                return Err(format!(
                    "{}: odd_count {} but {c} rules beneath",
                    to_prefix(&n.key, n.len),
                    n.odd_count
                ));
            }
        }
        let levels = (0..9)
            .filter(|k| level_nodes[*k] > 0)
            .fold(0, |m, k| m | 1 << k);
        if (rules, nodes, level_nodes, levels)
            != (self.len, self.nodes, self.level_nodes, self.levels)
        {
            return Err(format!(
                "counts: {rules} rules, {nodes} nodes, levels {levels:#x}; map says {}, {}, {:#x}",
                self.len, self.nodes, self.levels
            ));
        }
        if self.nodes == 0 {
            return Err("an empty map kept its directory".into());
        }
        if self.shard_bits > 0 && self.nodes < SHRINK_AT << self.shard_bits
            || self.nodes > GROW_AT << self.shard_bits
        {
            return Err(format!(
                "{} nodes in 2^{} shards",
                self.nodes, self.shard_bits
            ));
        }
        Ok(())
    }
}

fn to_prefix(k: &Key, len: u16) -> ServicePrefix {
    ServicePrefix::new(ServiceId::from_words(*k), len)
}

/// What [`PrefixMap::upsert_node`] does to the node at a key.
enum Change<V> {
    /// Set the value (a new node if absent); the old value is returned.
    Value(V),
    /// Remove the value; the node goes if nothing lies beneath it.
    Unvalue,
    /// Count one more rule of relative length `r` beneath (a marker if absent).
    AddOdd(u16),
    /// Count one fewer rule beneath; the node goes if it is a marker left with none.
    RemoveOdd,
}

impl<V: Clone> PrefixMap<V> {
    /// Maps `p` to `v`; returns the value `p` had before.
    pub fn insert(&mut self, p: ServicePrefix, v: V) -> Option<V> {
        let key = p.id().words();
        let len = p.len();
        let (old, existed) = self.change(&key, len, Change::Value(v));
        if old.is_none() {
            self.len += 1;
            if !len.is_multiple_of(32) && !existed {
                let plen = len & !31;
                self.change(&masked(&key, plen), plen, Change::AddOdd(len % 32));
            }
        }
        self.resize_if_needed();
        old
    }

    /// Removes `p`; returns its value.
    ///
    /// Removing a prefix that is absent copies and changes nothing.
    pub fn remove(&mut self, p: &ServicePrefix) -> Option<V> {
        if !self.contains_key(p) {
            return None;
        }
        let key = p.id().words();
        let len = p.len();
        let (old, _) = self.change(&key, len, Change::Unvalue);
        if old.is_some() {
            self.len -= 1;
            if !len.is_multiple_of(32) {
                let plen = len & !31;
                self.change(&masked(&key, plen), plen, Change::RemoveOdd);
            }
        }
        self.resize_if_needed();
        old
    }

    /// Applies `change` to the node at `(key, len)`; returns the value it replaced and whether
    /// the node existed.
    fn change(&mut self, key: &Key, len: u16, change: Change<V>) -> (Option<V>, bool) {
        let seeds = *self.seeds.get_or_insert_with(Seeds::random);
        if self.dir.is_none() {
            self.shard_bits = 0;
            let group: Arc<[DirEntry<V>]> = Arc::from(vec![DirEntry::empty()]);
            self.dir = Some(Arc::from(vec![group]));
        }
        let h = seeds.of(key, len);
        let s = h.checked_shr(64 - self.shard_bits).unwrap_or(0) as usize;
        let g = self.group_bits();
        let Some(dir) = self.dir.as_mut() else {
            return (None, false);
        };
        let Some(group) = make_mut_slice(dir).get_mut(s >> g) else {
            return (None, false);
        };
        let Some(e) = make_mut_slice(group).get_mut(s & ((1 << g) - 1)) else {
            return (None, false);
        };
        if matches!(change, Change::Value(_) | Change::AddOdd(_))
            && let Some(shard) = e.shard.as_mut()
        {
            // Shared with a clone: copy the slots as they are (no rehash) and insert there.
            make_mut_slice(shard);
        }
        let change = match in_place(e, h, key, len, change) {
            Ok((old, existed, added)) => {
                self.count(len, added, false);
                return (old, existed);
            }
            Err(change) => change,
        };
        let mut nodes = take_nodes(e.shard.take());
        let found = nodes.iter().position(|n| n.len == len && n.key == *key);
        let existed = found.is_some();
        let mut old = None;
        let (mut added, mut dropped) = (false, false);
        match (change, found) {
            (Change::Value(v), Some(i)) => old = nodes[i].value.replace(v),
            (Change::Value(v), None) => {
                nodes.push(Node {
                    key: *key,
                    len,
                    odd: 0,
                    odd_count: 0,
                    value: Some(v),
                });
                added = true;
            }
            (Change::Unvalue, Some(i)) => {
                old = nodes[i].value.take();
                if nodes[i].odd_count == 0 {
                    nodes.swap_remove(i);
                    dropped = true;
                }
            }
            (Change::AddOdd(r), Some(i)) => {
                nodes[i].odd |= 1 << r;
                nodes[i].odd_count += 1;
            }
            (Change::AddOdd(r), None) => {
                nodes.push(Node {
                    key: *key,
                    len,
                    odd: 1 << r,
                    odd_count: 1,
                    value: None,
                });
                added = true;
            }
            (Change::RemoveOdd, Some(i)) => {
                let n = &mut nodes[i];
                n.odd_count = n.odd_count.saturating_sub(1);
                if n.odd_count == 0 {
                    n.odd = 0;
                    if n.value.is_none() {
                        nodes.swap_remove(i);
                        dropped = true;
                    }
                }
            }
            (Change::Unvalue | Change::RemoveOdd, None) => {}
        }
        let cap = cap_for(nodes.len());
        let count = nodes.len();
        (e.shard, e.bloom) = build_shard(&seeds, nodes.into_iter(), cap);
        debug_assert!(count == 0 || e.shard.as_ref().is_some_and(|s| fits(count, s.len())));
        self.count(len, added, dropped);
        (old, existed)
    }

    /// Counts a node of length `len` added or dropped.
    fn count(&mut self, len: u16, added: bool, dropped: bool) {
        if len.is_multiple_of(32) && (added || dropped) {
            let k = usize::from(len / 32);
            if added {
                self.level_nodes[k] += 1;
            } else {
                self.level_nodes[k] -= 1;
            }
            self.levels = (0..9)
                .filter(|k| self.level_nodes[*k] > 0)
                .fold(0, |m, k| m | 1 << k);
        }
        if added {
            self.nodes += 1;
        }
        if dropped {
            self.nodes -= 1;
        }
    }

    /// Rebuilds the directory with twice or half the shards when the node count calls for it;
    /// drops it when the map is empty.
    fn resize_if_needed(&mut self) {
        if self.nodes == 0 {
            self.dir = None;
            self.shard_bits = 0;
            return;
        }
        let mut bits = self.shard_bits;
        while self.nodes > GROW_AT << bits {
            bits += 1;
        }
        while bits > 0 && self.nodes < SHRINK_AT << bits {
            bits -= 1;
        }
        if bits == self.shard_bits {
            return;
        }
        let Some(seeds) = self.seeds else { return };
        let mut per_shard: Vec<Vec<Node<V>>> = (0..1usize << bits).map(|_| Vec::new()).collect();
        if let Some(dir) = self.dir.take() {
            for group in dir.iter() {
                for e in group.iter() {
                    for n in e.shard.iter().flat_map(|s| s.iter()) {
                        if !n.is_empty() {
                            let h = seeds.of(&n.key, n.len);
                            let s = h.checked_shr(64 - bits).unwrap_or(0) as usize;
                            per_shard[s].push(n.clone());
                        }
                    }
                }
            }
        }
        let g = group_bits(bits);
        let mut groups: Vec<Arc<[DirEntry<V>]>> = Vec::with_capacity(1 << (bits - g));
        let mut it = per_shard.into_iter();
        for _ in 0..1usize << (bits - g) {
            let group: Vec<DirEntry<V>> = it
                .by_ref()
                .take(1 << g)
                .map(|nodes| {
                    let cap = cap_for(nodes.len());
                    let (shard, bloom) = build_shard(&seeds, nodes.into_iter(), cap);
                    DirEntry { bloom, shard }
                })
                .collect();
            groups.push(group.into());
        }
        self.dir = Some(groups.into());
        self.shard_bits = bits;
    }
}

/// Applies an insertion (`Value` or `AddOdd`) in place when `e`'s shard is owned by this map
/// alone and has room: no copy, no rehash. Returns the replaced value, whether the node existed
/// and whether one was added; or gives `change` back when the shard must be rebuilt.
fn in_place<V>(
    e: &mut DirEntry<V>,
    h: u64,
    key: &Key,
    len: u16,
    change: Change<V>,
) -> Result<(Option<V>, bool, bool), Change<V>> {
    if !matches!(change, Change::Value(_) | Change::AddOdd(_)) {
        return Err(change);
    }
    let Some(slots) = e.shard.as_mut().and_then(Arc::get_mut) else {
        return Err(change);
    };
    let cap = slots.len();
    let mut i = home(h, cap);
    let mut found = false;
    for _ in 0..cap {
        let n = &slots[i];
        if n.is_empty() {
            break;
        }
        if n.len == len && n.key == *key {
            found = true;
            break;
        }
        i = if i + 1 == cap { 0 } else { i + 1 };
    }
    if !found {
        let used = slots.iter().filter(|n| !n.is_empty()).count();
        if !fits(used + 1, cap) || !slots[i].is_empty() {
            return Err(change);
        }
    }
    let n = &mut slots[i];
    match change {
        Change::Value(v) if found => Ok((n.value.replace(v), true, false)),
        Change::AddOdd(r) if found => {
            n.odd |= 1 << r;
            n.odd_count += 1;
            Ok((None, true, false))
        }
        change => {
            let (odd, odd_count, value) = match change {
                Change::Value(v) => (0, 0, Some(v)),
                Change::AddOdd(r) => (1 << r, 1, None),
                other => return Err(other),
            };
            *n = Node {
                key: *key,
                len,
                odd,
                odd_count,
                value,
            };
            let (word, bits) = bloom_bits(h);
            e.bloom[word] |= bits;
            Ok((None, false, true))
        }
    }
}

/// `arc`'s contents, copied first if shared.
fn make_mut_slice<T: Clone>(arc: &mut Arc<[T]>) -> &mut [T] {
    if Arc::get_mut(arc).is_none() {
        *arc = Arc::from(arc.to_vec());
    }
    Arc::get_mut(arc).unwrap_or(&mut [])
}

/// Iterator over a [`PrefixMap`] in ascending prefix order; see [`PrefixMap::iter`].
pub struct Iter<'a, V> {
    inner: std::vec::IntoIter<(ServicePrefix, &'a V)>,
}

impl<'a, V> Iterator for Iter<'a, V> {
    type Item = (ServicePrefix, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
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
    }

    #[test]
    fn hash_covers_exactly_the_prefix() {
        let s = Seeds::random();
        let a = [1, 2, 3, 4];
        let acc = s.chain(&a);
        for len in 0..=256u16 {
            // The chained hash of an ID at `len` is the hash of the stored prefix.
            assert_eq!(
                s.at(&acc, &a, len),
                s.of(&masked(&a, len), len),
                "len {len}"
            );
        }
        // Bits past the length do not matter; bits before it and the length do.
        assert_eq!(
            s.of(&masked(&[1, 9, 9, 9], 64), 64),
            s.of(&[1, 0, 0, 0], 64)
        );
        assert_ne!(s.of(&[1, 0, 0, 0], 64), s.of(&[1, 0, 0, 0], 63));
        assert_ne!(s.of(&[1, 0, 0, 0], 64), s.of(&[2, 0, 0, 0], 64));
    }

    #[test]
    fn shard_capacity_keeps_the_load_bounded() {
        for n in 0..1000 {
            assert!(fits(n, cap_for(n)), "{n}");
        }
    }

    #[test]
    fn sizes_stay_small() {
        // Not a contract; guards against an accidental blow-up of the hot structures.
        assert!(core::mem::size_of::<Node<u32>>() <= 56);
        assert!(core::mem::size_of::<DirEntry<u32>>() <= 48);
    }
}
