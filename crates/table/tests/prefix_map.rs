//! `PrefixMap` against the `BitTrie` oracle: random operation sequences over clustered and
//! random prefixes, plus hand-picked edge cases.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use proptest::prelude::*;
use serval_table::PrefixMap;
use serval_table::oracle::BitTrie;
use serval_wire::{ServiceId, ServicePrefix};

/// 32-bit chunks that share leading bits, so clustered IDs share whole chunks (like DNS labels
/// under one domain) and also diverge at every byte and bit position inside a chunk.
const POOL: [u32; 8] = [
    0x1122_3344,
    0x1122_3345,
    0x1122_33c4,
    0x1122_b344,
    0x11aa_0000,
    0x9100_0000,
    0xffff_ffff,
    0x0000_0001,
];

fn clustered_id() -> impl Strategy<Value = ServiceId> {
    (
        prop::collection::vec(0..POOL.len(), 0..=8),
        prop::option::weighted(0.3, 0..256u16),
    )
        .prop_map(|(chunks, flip)| {
            let mut b = [0u8; 32];
            for (i, c) in chunks.iter().enumerate() {
                b[i * 4..i * 4 + 4].copy_from_slice(&POOL[*c].to_be_bytes());
            }
            if let Some(bit) = flip {
                b[usize::from(bit / 8)] ^= 0x80 >> (bit % 8);
            }
            ServiceId(b)
        })
}

fn any_id() -> impl Strategy<Value = ServiceId> {
    prop_oneof![
        3 => clustered_id(),
        1 => any::<[u8; 32]>().prop_map(ServiceId),
    ]
}

fn any_len() -> impl Strategy<Value = u16> {
    prop_oneof![
        3 => (0..=8u16).prop_map(|c| c * 32),
        2 => (0..=32u16).prop_map(|c| c * 8),
        2 => 0..=256u16,
        1 => 250..=256u16,
        1 => Just(256u16),
    ]
}

fn any_prefix() -> impl Strategy<Value = ServicePrefix> {
    (any_id(), any_len()).prop_map(|(id, len)| ServicePrefix::new(id, len))
}

/// A map's contents in iteration order.
type Contents = Vec<(ServicePrefix, u32)>;

#[derive(Debug, Clone)]
enum Op {
    Insert(ServicePrefix, u32),
    /// Remove an arbitrary (probably absent) prefix.
    Remove(ServicePrefix),
    /// Remove the n-th stored prefix (modulo the count).
    RemoveStored(usize),
    /// Take a snapshot (a clone) to check later that it never changes.
    Snapshot,
}

fn any_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (any_prefix(), any::<u32>()).prop_map(|(p, v)| Op::Insert(p, v)),
        1 => any_prefix().prop_map(Op::Remove),
        4 => any::<usize>().prop_map(Op::RemoveStored),
        1 => Just(Op::Snapshot),
    ]
}

/// IDs to look up: random ones, and for each stored prefix one ID under it (random tail) and a
/// near miss (its last bit flipped) — chosen by `salt`.
fn probe_ids(stored: &[(ServicePrefix, u32)], extra: &[ServiceId], salt: u64) -> Vec<ServiceId> {
    let mut out: Vec<ServiceId> = extra.to_vec();
    let mut x = salt | 1;
    for (p, _) in stored {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut under = *p.id();
        for (i, b) in under.0.iter_mut().enumerate() {
            if i * 8 >= usize::from(p.len()) {
                *b = (x >> ((i % 8) * 8)) as u8;
            }
        }
        // Whole bytes past the prefix are random; fill the partial byte's tail too.
        let len = usize::from(p.len());
        if len % 8 != 0 {
            under.0[len / 8] |= (x as u8) >> (len % 8);
        }
        assert!(p.contains(&under));
        out.push(under);
        out.push(*p.id());
        if p.len() > 0 {
            let mut miss = *p.id();
            let bit = p.len() - 1;
            miss.0[usize::from(bit / 8)] ^= 0x80 >> (bit % 8);
            out.push(miss);
        }
    }
    out
}

fn check_same(map: &PrefixMap<u32>, oracle: &BitTrie<u32>, probes: &[ServiceId]) {
    map.check_invariants().unwrap();
    assert_eq!(map.len(), oracle.len());
    assert_eq!(map.is_empty(), oracle.is_empty());
    let got: Vec<_> = map.iter().map(|(p, v)| (p, *v)).collect();
    let want: Vec<_> = oracle.iter().map(|(p, v)| (p, *v)).collect();
    assert_eq!(got, want, "iteration differs (order or contents)");
    assert_eq!(map.iter().len(), oracle.len());
    for (p, v) in &want {
        assert_eq!(map.get(p), Some(v), "exact get {p}");
    }
    let mut batch = vec![None; probes.len()];
    map.longest_match_batch(probes, &mut batch);
    for (id, b) in probes.iter().zip(&batch) {
        let want = oracle.longest_match(id).map(|(p, v)| (p, *v));
        assert_eq!(
            map.longest_match(id).map(|(p, v)| (p, *v)),
            want,
            "LPM of {id}"
        );
        assert_eq!(
            b.map(|(len, v)| (len, *v)),
            want.map(|(p, v)| (p.len(), v)),
            "batch LPM of {id}"
        );
        // Exact gets of near misses agree too.
        for len in [0, 8, 31, 32, 64, 255, 256] {
            let p = ServicePrefix::new(*id, len);
            assert_eq!(map.get(&p), oracle.get(&p), "exact get {p}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn matches_the_oracle(
        ops in prop::collection::vec(any_op(), 1..160),
        extra in prop::collection::vec(any_id(), 0..24),
        salt in any::<u64>(),
    ) {
        let mut map = PrefixMap::new();
        let mut oracle = BitTrie::new();
        let mut snapshots: Vec<(PrefixMap<u32>, Contents)> = Vec::new();
        for op in &ops {
            match op {
                Op::Insert(p, v) => prop_assert_eq!(map.insert(*p, *v), oracle.insert(*p, *v)),
                Op::Remove(p) => prop_assert_eq!(map.remove(p), oracle.remove(p)),
                Op::RemoveStored(n) => {
                    let stored: Vec<_> = oracle.iter().map(|(p, _)| p).collect();
                    if !stored.is_empty() {
                        let p = stored[n % stored.len()];
                        let want = oracle.remove(&p);
                        prop_assert!(want.is_some());
                        prop_assert_eq!(map.remove(&p), want);
                        prop_assert_eq!(map.remove(&p), None);
                    }
                }
                Op::Snapshot => {
                    snapshots.push((map.clone(), oracle.iter().map(|(p, v)| (p, *v)).collect()));
                }
            }
            map.check_invariants().map_err(TestCaseError::fail)?;
        }
        let stored: Vec<_> = oracle.iter().map(|(p, v)| (p, *v)).collect();
        check_same(&map, &oracle, &probe_ids(&stored, &extra, salt));

        // Every snapshot still shows exactly what it held when taken.
        for (snap, contents) in &snapshots {
            let mut o = BitTrie::new();
            for (p, v) in contents {
                o.insert(*p, *v);
            }
            check_same(snap, &o, &probe_ids(contents, &extra, salt));
        }

        // Emptying the map in a random order leaves an empty, canonical trie.
        for (p, v) in stored.iter().rev() {
            prop_assert_eq!(map.remove(p), Some(*v));
        }
        prop_assert!(map.is_empty());
        prop_assert_eq!(map.iter().count(), 0);
        map.check_invariants().map_err(TestCaseError::fail)?;
    }

    #[test]
    fn clone_then_mutate_leaves_the_original(
        base in prop::collection::vec((any_prefix(), any::<u32>()), 0..60),
        more in prop::collection::vec(any_op(), 1..60),
    ) {
        let map: PrefixMap<u32> = base.iter().copied().collect();
        let before: Vec<_> = map.iter().map(|(p, v)| (p, *v)).collect();
        let bytes = map.heap_bytes();
        let mut copy = map.clone();
        for op in &more {
            match op {
                Op::Insert(p, v) => { copy.insert(*p, *v); }
                Op::Remove(p) => { copy.remove(p); }
                Op::RemoveStored(n) => {
                    let keys: Vec<_> = copy.iter().map(|(p, _)| p).collect();
                    if !keys.is_empty() {
                        copy.remove(&keys[n % keys.len()]);
                    }
                }
                Op::Snapshot => { copy = copy.clone(); }
            }
        }
        prop_assert_eq!(map.iter().map(|(p, v)| (p, *v)).collect::<Vec<_>>(), before);
        prop_assert_eq!(map.heap_bytes(), bytes);
        map.check_invariants().map_err(TestCaseError::fail)?;
        copy.check_invariants().map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Maps large enough that the anchor index (when on) is built and rebuilt, with rules of every
    /// length (odd ones under shared chunk prefixes), the `/0` default, and removals in a random
    /// order,
    /// against the oracle at every stage, including a clone taken at the largest size; with and
    /// without the anchor index.
    #[test]
    fn large_maps_grow_shrink_and_agree(
        prefixes in prop::collection::vec(any_prefix(), 300..1500),
        order in any::<u64>(),
        salt in any::<u64>(),
        indexed in any::<bool>(),
    ) {
        let mut map = if indexed { PrefixMap::with_anchor_index() } else { PrefixMap::new() };
        let mut oracle = BitTrie::new();
        map.insert(ServicePrefix::DEFAULT, u32::MAX);
        oracle.insert(ServicePrefix::DEFAULT, u32::MAX);
        for (i, p) in prefixes.iter().enumerate() {
            prop_assert_eq!(map.insert(*p, i as u32), oracle.insert(*p, i as u32));
        }
        map.check_invariants().map_err(TestCaseError::fail)?;
        let full = map.clone();
        let stored: Vec<_> = oracle.iter().map(|(p, v)| (p, *v)).collect();
        check_same(&map, &oracle, &probe_ids(&stored, &[], salt));

        // Remove all but a few, in a scrambled order, checking along the way.
        let mut keys: Vec<ServicePrefix> = stored.iter().map(|(p, _)| *p).collect();
        let mut x = order | 1;
        for i in (1..keys.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            keys.swap(i, (x % (i as u64 + 1)) as usize);
        }
        for (i, k) in keys.iter().enumerate() {
            if i + 5 >= keys.len() {
                break;
            }
            prop_assert_eq!(map.remove(k), oracle.remove(k));
            if i % 97 == 0 {
                map.check_invariants().map_err(TestCaseError::fail)?;
            }
        }
        let left: Vec<_> = oracle.iter().map(|(p, v)| (p, *v)).collect();
        check_same(&map, &oracle, &probe_ids(&left, &[], salt));

        // The clone taken when full never changed.
        let mut o = BitTrie::new();
        for (p, v) in &stored {
            o.insert(*p, *v);
        }
        check_same(&full, &o, &probe_ids(&stored, &[], salt ^ 1));
    }
}

fn p(text: &str) -> ServicePrefix {
    ServicePrefix::parse(text).unwrap()
}

fn id(text: &str) -> ServiceId {
    ServiceId::parse(text).unwrap()
}

fn lpm(m: &PrefixMap<&'static str>, i: &ServiceId) -> Option<(u16, &'static str)> {
    m.longest_match(i).map(|(p, v)| (p.len(), *v))
}

#[test]
fn empty_map() {
    let m: PrefixMap<u8> = PrefixMap::default();
    assert!(m.is_empty());
    assert_eq!(m.longest_match(&ServiceId::ZERO), None);
    assert_eq!(m.get(&ServicePrefix::DEFAULT), None);
    assert_eq!(m.iter().next(), None);
    let mut out = [Some((0, &0u8))];
    m.longest_match_batch(&[ServiceId::ZERO], &mut out);
    assert_eq!(out, [None]);
    m.check_invariants().unwrap();
}

#[test]
fn default_rule_matches_everything() {
    let mut m = PrefixMap::new();
    assert_eq!(m.insert(ServicePrefix::DEFAULT, "default"), None);
    assert_eq!(m.insert(ServicePrefix::DEFAULT, "again"), Some("default"));
    for i in [
        ServiceId::ZERO,
        ServiceId([0xff; 32]),
        id("web.example.com"),
    ] {
        assert_eq!(lpm(&m, &i), Some((0, "again")));
    }
    assert_eq!(m.remove(&ServicePrefix::DEFAULT), Some("again"));
    assert!(m.is_empty());
}

#[test]
fn exact_256_and_last_bit_siblings() {
    let a = ServiceId([0xab; 32]);
    let mut b = a;
    b.0[31] ^= 1; // differs only in the last bit
    let mut m = PrefixMap::new();
    m.insert(ServicePrefix::exact(a), "a");
    m.insert(ServicePrefix::exact(b), "b");
    m.insert(ServicePrefix::new(a, 255), "a/255");
    m.check_invariants().unwrap();
    assert_eq!(lpm(&m, &a), Some((256, "a")));
    // `b` is under a/255 too, but its exact rule is longer.
    assert_eq!(lpm(&m, &b), Some((256, "b")));
    let mut c = a;
    c.0[31] ^= 2; // differs in bit 254, inside the /255 too
    assert_eq!(lpm(&m, &c), None);
    m.remove(&ServicePrefix::exact(a));
    assert_eq!(lpm(&m, &a), Some((255, "a/255")));
    assert_eq!(lpm(&m, &b), Some((256, "b")));
    m.check_invariants().unwrap();
}

#[test]
fn longest_wins_and_removing_a_parent_keeps_children() {
    let mut m = PrefixMap::new();
    m.insert(p("com/*"), "com");
    m.insert(p("example.com/*"), "example");
    m.insert(p("web.example.com"), "web");
    m.insert(ServicePrefix::new(id("example.com"), 37), "odd");
    let web = id("web.example.com");
    assert_eq!(lpm(&m, &web), Some((256, "web")));
    assert_eq!(lpm(&m, &id("mail.example.com")), Some((64, "example")));
    assert_eq!(lpm(&m, &id("other.com")).map(|x| x.1), Some("com"));
    // Remove prefixes that have longer ones under them.
    assert_eq!(m.remove(&p("example.com/*")), Some("example"));
    m.check_invariants().unwrap();
    assert_eq!(lpm(&m, &id("mail.example.com")), Some((37, "odd")));
    assert_eq!(lpm(&m, &web), Some((256, "web")));
    assert_eq!(m.remove(&p("com/*")), Some("com"));
    assert_eq!(m.remove(&p("com/*")), None);
    m.check_invariants().unwrap();
    assert_eq!(lpm(&m, &web), Some((256, "web")));
    assert_eq!(m.len(), 2);
}

#[test]
fn path_compression_splits() {
    // A long leaf, then prefixes that split its compressed path at a byte boundary, inside a
    // byte, at the very start and right at its end.
    let deep = ServiceId([0x5a; 32]);
    let mut m = PrefixMap::new();
    m.insert(ServicePrefix::exact(deep), 256u16);
    for len in [200u16, 137, 8, 9, 1, 255, 64, 63] {
        m.insert(ServicePrefix::new(deep, len), len);
        m.check_invariants().unwrap();
        assert_eq!(
            m.longest_match(&deep).map(|(p, v)| (p.len(), *v)),
            Some((256, 256))
        );
    }
    // A sibling that diverges in the middle of the compressed path.
    let mut other = deep;
    other.0[20] ^= 0x10;
    m.insert(ServicePrefix::exact(other), 1);
    m.check_invariants().unwrap();
    assert_eq!(m.longest_match(&other).map(|(_, v)| *v), Some(1));
    other.0[31] ^= 1;
    assert_eq!(m.longest_match(&other).map(|(p, _)| p.len()), Some(137));
    // Removing everything in another order collapses back to nothing.
    for len in [256u16, 1, 255, 63, 64, 137, 8, 200, 9] {
        m.remove(&ServicePrefix::new(deep, len)).unwrap();
        m.check_invariants().unwrap();
    }
    assert_eq!(m.len(), 1);
}

#[test]
fn dense_nodes_grow_and_shrink() {
    let mut m = PrefixMap::new();
    for b in 0..=255u8 {
        let mut i = [0u8; 32];
        i[0] = b;
        i[1] = 1;
        m.insert(ServicePrefix::new(ServiceId(i), 16), b);
        m.insert(ServicePrefix::new(ServiceId(i), 5), b);
        m.check_invariants().unwrap();
    }
    assert_eq!(m.len(), 256 + 32);
    for b in 0..=255u8 {
        let mut i = [0xffu8; 32];
        i[0] = b;
        i[1] = 1;
        assert_eq!(
            m.longest_match(&ServiceId(i)).map(|(p, v)| (p.len(), *v)),
            Some((16, b))
        );
    }
    // Shrink a clone through every size class; the original keeps its dense root.
    let full = m.clone();
    for b in (0..=255u8).rev() {
        let mut i = [0u8; 32];
        i[0] = b;
        i[1] = 1;
        assert_eq!(m.remove(&ServicePrefix::new(ServiceId(i), 16)), Some(b));
        m.check_invariants().unwrap();
    }
    assert_eq!(m.len(), 32);
    assert_eq!(full.len(), 256 + 32);
    full.check_invariants().unwrap();
    let mut i = [0u8; 32];
    i[0] = 0x42;
    i[1] = 1;
    assert_eq!(full.get(&ServicePrefix::new(ServiceId(i), 16)), Some(&0x42));
}

#[test]
fn batch_matches_single_for_odd_sizes() {
    // 400 rules (past the anchor index's threshold), plain and indexed, and batches of sizes
    // around the lane count, the probe group and the pending lanes (so that every pipeline
    // stage runs partly filled).
    let rules: Vec<(ServicePrefix, u32)> = (0..400u32)
        .map(|i| {
            let mut b = [0u8; 32];
            b[..4].copy_from_slice(&(i.wrapping_mul(0x9e37_79b9)).to_be_bytes());
            b[8] = i as u8;
            (
                ServicePrefix::new(ServiceId(b), [16, 24, 32, 256, 64, 72][i as usize % 6]),
                i,
            )
        })
        .collect();
    let plain: PrefixMap<u32> = rules.iter().copied().collect();
    let mut indexed = PrefixMap::with_anchor_index();
    indexed.extend(rules.iter().copied());
    assert_eq!(indexed.unindexed_anchors(), Some(0));
    for m in [&plain, &indexed] {
        for n in [0usize, 1, 15, 16, 17, 33, 64, 65, 200, 399] {
            let ids: Vec<ServiceId> = (0..n)
                .map(|i| {
                    let mut b = [0u8; 32];
                    b[..4].copy_from_slice(&((i as u32).wrapping_mul(0x9e37_79b9)).to_be_bytes());
                    b[8] = (i % 3) as u8;
                    ServiceId(b)
                })
                .collect();
            let mut out = vec![None; n];
            m.longest_match_batch(&ids, &mut out);
            for (i, o) in ids.iter().zip(&out) {
                assert_eq!(
                    *o,
                    plain.longest_match(i).map(|(p, v)| (p.len(), v)),
                    "{n}: {i}"
                );
            }
        }
    }
}

#[test]
#[should_panic(expected = "differ in length")]
fn batch_rejects_mismatched_output() {
    let m: PrefixMap<u8> = PrefixMap::new();
    m.longest_match_batch(&[ServiceId::ZERO], &mut []);
}

#[test]
fn heap_bytes_grows_with_content() {
    let mut m = PrefixMap::new();
    assert_eq!(m.heap_bytes(), 0, "an empty map allocates nothing");
    m.insert(ServicePrefix::DEFAULT, u32::MAX);
    let empty = m.heap_bytes();
    assert!(empty > 0);
    for i in 0..100u32 {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&i.to_be_bytes());
        b[31] = 1;
        m.insert(ServicePrefix::exact(ServiceId(b)), i);
    }
    let full = m.heap_bytes();
    assert!(full > empty + 100 * 48, "{full}");
    assert!(full < empty + 100 * 400, "{full}");
}

/// Prefixes that crowd a few anchors (first 64 bits): mostly name-like lengths (exact `/256`
/// IDs, whole 32-bit chunks), some of any length, and many shorter than 64 bits under the same
/// anchors, so that changes split and collapse nodes above, at and below bit 64, and boundary
/// items turn from leaves into nodes and back.
fn indexed_prefix() -> impl Strategy<Value = ServicePrefix> {
    const ANCHORS: [u64; 4] = [
        0x5e57_0000_0000_0000,
        0x5e57_0000_0000_0001,
        0x5e57_0000_8000_0000,
        0xa000_0000_0000_0000,
    ];
    let len = prop_oneof![
        4 => Just(256u16),
        3 => (1..=7u16).prop_map(|c| c * 32),
        2 => 0..=256u16,
        2 => 0..64u16,
    ];
    let anchor = prop_oneof![
        3 => (0..ANCHORS.len()).prop_map(|i| Some(ANCHORS[i])),
        1 => Just(None),
    ];
    (any_id(), anchor, len).prop_map(|(id, anchor, len)| {
        let mut w = id.words();
        if let Some(a) = anchor {
            w[0] = a;
        }
        ServicePrefix::new(ServiceId::from_words(w), len)
    })
}

#[derive(Debug, Clone)]
enum Step {
    Insert(ServicePrefix, u32),
    RemoveStored(usize),
    /// Look up IDs under, at and next to the n-th stored prefix, and a random ID.
    Lookup(usize, ServiceId),
    Snapshot,
}

fn any_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (indexed_prefix(), any::<u32>()).prop_map(|(p, v)| Step::Insert(p, v)),
        3 => any::<usize>().prop_map(Step::RemoveStored),
        6 => (any::<usize>(), any_id()).prop_map(|(n, id)| Step::Lookup(n, id)),
        1 => Just(Step::Snapshot),
    ]
}

/// Single and batched longest matches of `ids` agree with the oracle.
fn lookups_agree(map: &PrefixMap<u32>, oracle: &BitTrie<u32>, ids: &[ServiceId]) {
    let mut batch = vec![None; ids.len()];
    map.longest_match_batch(ids, &mut batch);
    for (id, b) in ids.iter().zip(&batch) {
        let want = oracle.longest_match(id).map(|(p, v)| (p, *v));
        assert_eq!(
            map.longest_match(id).map(|(p, v)| (p, *v)),
            want,
            "LPM of {id}"
        );
        assert_eq!(
            b.map(|(len, v)| (len, *v)),
            want.map(|(p, v)| (p.len(), v)),
            "batch LPM of {id}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// The anchor index in front of the trie: maps past the size where the index is built (and
    /// past its rebuilds), with lookups interleaved with inserts, value replacements and
    /// removals — each of which can move a boundary item or turn it from a leaf into a node and
    /// back — against the oracle at every step, and snapshots (which share the index and its
    /// marks) that must never change.
    #[test]
    fn anchor_index_agrees_with_interleaved_changes(
        base in prop::collection::vec(indexed_prefix(), 200..900),
        steps in prop::collection::vec(any_step(), 1..400),
        salt in any::<u64>(),
    ) {
        let mut map = PrefixMap::with_anchor_index();
        let mut oracle = BitTrie::new();
        for (i, p) in base.iter().enumerate() {
            prop_assert_eq!(map.insert(*p, i as u32), oracle.insert(*p, i as u32));
        }
        let mut snapshots: Vec<(PrefixMap<u32>, Contents)> = Vec::new();
        for (n, step) in steps.iter().enumerate() {
            match step {
                Step::Insert(p, v) => prop_assert_eq!(map.insert(*p, *v), oracle.insert(*p, *v)),
                Step::RemoveStored(k) => {
                    let stored: Vec<_> = oracle.iter().map(|(p, _)| p).collect();
                    if !stored.is_empty() {
                        let p = stored[k % stored.len()];
                        prop_assert_eq!(map.remove(&p), oracle.remove(&p));
                    }
                }
                Step::Lookup(k, id) => {
                    let stored: Vec<_> = oracle.iter().map(|(p, v)| (p, *v)).collect();
                    let near = if stored.is_empty() {
                        Vec::new()
                    } else {
                        vec![stored[k % stored.len()]]
                    };
                    lookups_agree(&map, &oracle, &probe_ids(&near, &[*id], salt ^ n as u64));
                }
                Step::Snapshot => {
                    snapshots.push((map.clone(), oracle.iter().map(|(p, v)| (p, *v)).collect()));
                }
            }
            if n % 16 == 0 {
                map.check_invariants().map_err(TestCaseError::fail)?;
            }
        }
        let stored: Vec<_> = oracle.iter().map(|(p, v)| (p, *v)).collect();
        check_same(&map, &oracle, &probe_ids(&stored, &[], salt));
        for (snap, contents) in &snapshots {
            let mut o = BitTrie::new();
            for (p, v) in contents {
                o.insert(*p, *v);
            }
            check_same(snap, &o, &probe_ids(contents, &[], salt));
        }
    }
}

#[test]
fn anchor_index_holds_every_boundary_item_of_a_name_like_table() {
    // 20 000 exact IDs and domain prefixes under a few top-level chunks, built in one pass:
    // every anchor indexed (no probe run overflowed), and lookups through the index agree with
    // the exact rules, singly and in batches; then a change marks its anchor only.
    let mut rules = vec![(ServicePrefix::DEFAULT, 0u32)];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut ids = Vec::new();
    for i in 1..20_000u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut w = [x, x.rotate_left(17), x.rotate_left(31), x.rotate_left(47)];
        w[0] = (w[0] & 0x0000_0003_ffff_ffff) | (0x5e57_0000_0000_0000 + (u64::from(i % 4) << 32));
        let id = ServiceId::from_words(w);
        let len = if i % 3 == 0 { 64 } else { 256 };
        rules.push((ServicePrefix::new(id, len), i));
        ids.push((id, len, i));
    }
    let mut m = PrefixMap::with_anchor_index();
    m.extend(rules);
    m.check_invariants().unwrap();
    assert_eq!(m.unindexed_anchors(), Some(0));
    let all: Vec<ServiceId> = ids.iter().map(|(id, _, _)| *id).collect();
    let mut batch = vec![None; all.len()];
    m.longest_match_batch(&all, &mut batch);
    for ((id, len, i), b) in ids.iter().zip(batch) {
        let (p, v) = m.longest_match(id).unwrap();
        assert_eq!((p.len(), *v), (*len, *i), "{id}");
        assert_eq!(b, Some((*len, i)), "batch {id}");
    }
    let (id, len, _) = ids[7];
    m.insert(ServicePrefix::new(id, len), 99);
    m.check_invariants().unwrap();
    assert_eq!(m.unindexed_anchors(), Some(1));
    assert_eq!(m.longest_match(&id).map(|(_, v)| *v), Some(99));
}
