//! The flow table: random, collision-free flowID allocation and exact lookup.

use std::collections::HashSet;
use std::convert::Infallible;

use rand_core::TryRng;
use serval_table::FlowTable;
use serval_table::flow::ALLOCATE_DRAWS;
use serval_wire::FlowId;

/// SplitMix64: a small seeded generator, enough for tests.
struct SplitMix(u64);

impl TryRng for SplitMix {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        self.try_next_u64().map(|x| x as u32)
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Ok(z ^ (z >> 31))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        for chunk in dst.chunks_mut(8) {
            let v = self.try_next_u64()?.to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        Ok(())
    }
}

/// Replays a script of values, then repeats its last one forever: a deliberately bad RNG.
struct Script(Vec<u64>, usize);

impl TryRng for Script {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        self.try_next_u64().map(|x| x as u32)
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let v = self.0[self.1.min(self.0.len() - 1)];
        self.1 += 1;
        Ok(v)
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        dst.fill(0);
        Ok(())
    }
}

#[test]
fn allocates_distinct_nonzero_ids_and_finds_them() {
    let mut rng = SplitMix(7);
    let mut t = FlowTable::new();
    let ids: Vec<FlowId> = (0..1000u32).map(|i| t.allocate(&mut rng, i)).collect();
    assert_eq!(t.len(), 1000);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 1000);
    assert!(ids.iter().all(|id| !id.is_none()));
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(t.get(*id), Some(&(i as u32)));
    }
    *t.get_mut(ids[5]).unwrap() += 1000;
    assert_eq!(t.remove(ids[5]), Some(1005));
    assert_eq!(t.remove(ids[5]), None);
    assert!(!t.contains(ids[5]) && t.contains(ids[6]));
    assert_eq!(t.get(FlowId::NONE), None);
    let mut listed: Vec<u32> = t.iter().map(|(_, v)| *v).collect();
    listed.sort_unstable();
    assert_eq!(listed.len(), 999);
    assert!(!listed.contains(&5));
    t.retain(|_, v| *v % 2 == 0);
    assert_eq!(t.len(), 500);
    for (_, v) in t.iter_mut() {
        *v += 1;
    }
    assert!(t.iter().all(|(_, v)| v % 2 == 1));
}

#[test]
fn skips_zero_and_live_ids() {
    // 0 is reserved; 5 is handed out once and then skipped while live; after it is removed it
    // may be handed out again.
    let mut rng = Script(vec![0, 5, 5, 0, 5, 9, 5, 5, 11], 0);
    let mut t = FlowTable::new();
    assert_eq!(t.allocate(&mut rng, 'a'), FlowId(5));
    assert_eq!(t.allocate(&mut rng, 'b'), FlowId(9));
    assert_eq!(t.remove(FlowId(5)), Some('a'));
    assert_eq!(t.allocate(&mut rng, 'c'), FlowId(5));
    assert_eq!(t.allocate(&mut rng, 'd'), FlowId(11));
    assert_eq!(t.len(), 3);
}

#[test]
fn a_stuck_rng_is_reported_not_looped_on() {
    let mut rng = Script(vec![3], 0);
    let mut t = FlowTable::new();
    assert_eq!(t.try_allocate(&mut rng, 1), Ok(FlowId(3)));
    assert_eq!(t.try_allocate(&mut rng, 2), Err(2));
    assert_eq!(rng.1, 1 + ALLOCATE_DRAWS as usize);
    let mut zeros = Script(vec![0], 0);
    assert_eq!(t.try_allocate(&mut zeros, 4), Err(4));
    assert_eq!(t.len(), 1);
}

#[test]
#[should_panic(expected = "the RNG is broken")]
fn allocate_panics_on_a_stuck_rng() {
    let mut t = FlowTable::new();
    t.allocate(&mut Script(vec![0], 0), ());
}

#[test]
fn adopt_refuses_none_and_live_ids() {
    let mut t = FlowTable::new();
    assert_eq!(t.adopt(FlowId(42), "migrated"), Ok(()));
    assert_eq!(t.adopt(FlowId(42), "again"), Err("again"));
    assert_eq!(t.adopt(FlowId::NONE, "none"), Err("none"));
    assert_eq!(t.get(FlowId(42)), Some(&"migrated"));
    // Allocation never hands out an adopted ID.
    let mut rng = Script(vec![42, 43], 0);
    assert_eq!(t.allocate(&mut rng, "new"), FlowId(43));
}
