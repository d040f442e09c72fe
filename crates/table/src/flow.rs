//! The flow table: exact match on this host's flowIDs.
//!
//! Established traffic is demultiplexed by the destination flowID alone (DESIGN.md §1), so this
//! is a hash map keyed by [`FlowId`]. The IDs are this host's own, drawn by
//! [`FlowTable::allocate`] from the caller's RNG: unpredictable to an off-path host when that RNG
//! is a CSPRNG, never [`FlowId::NONE`], and never equal to a live one (the original used a
//! counter and did not check for collisions).

use std::collections::HashMap;
use std::collections::hash_map;
use std::hash::{BuildHasherDefault, Hasher};

use rand_core::Rng;
use serval_wire::FlowId;

/// How many draws [`FlowTable::try_allocate`] makes before giving up. With a working RNG and
/// even 2^32 live flows, 64 consecutive unusable draws have probability below 2^-2000.
pub const ALLOCATE_DRAWS: u32 = 64;

/// A cheap hasher for flowIDs, which are random already: one 64×64→128-bit multiply, folded.
///
/// Folding mixes the high bits into the low ones (which pick the bucket) and the low bits into
/// the high ones (which the map uses as tags), so even structured IDs spread well. It is not
/// meant to resist IDs chosen to collide; every ID in the table is drawn by this host.
#[derive(Default, Clone, Copy)]
struct FlowIdHasher(u64);

impl Hasher for FlowIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not used by `FlowId` (which hashes as one u64), but must be correct all the same.
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(w));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let p = u128::from(n ^ self.0) * u128::from(0x9e37_79b9_7f4a_7c15u64);
        self.0 = (p as u64) ^ ((p >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Flow state by this host's flowID, with collision-free random allocation of new IDs.
#[derive(Clone, Debug)]
pub struct FlowTable<V> {
    map: HashMap<FlowId, V, BuildHasherDefault<FlowIdHasher>>,
}

impl<V> Default for FlowTable<V> {
    fn default() -> Self {
        FlowTable {
            map: HashMap::default(),
        }
    }
}

impl<V> FlowTable<V> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `value` under a fresh flowID drawn from `rng` and returns the ID.
    ///
    /// The ID is the first value `rng.next_u64()` yields that is neither zero nor live, so it is
    /// as unpredictable as `rng`: pass a cryptographically secure generator (seeded, in tests
    /// and simulation) so that off-path hosts cannot guess flowIDs.
    ///
    /// # Panics
    /// If [`ALLOCATE_DRAWS`] draws in a row are all unusable, which means the RNG is broken
    /// (stuck, or returning values from a tiny set); see [`try_allocate`](Self::try_allocate).
    pub fn allocate<R: Rng + ?Sized>(&mut self, rng: &mut R, value: V) -> FlowId {
        match self.try_allocate(rng, value) {
            Ok(id) => id,
            Err(_) => panic!(
                "FlowTable::allocate: {ALLOCATE_DRAWS} draws in a row were zero or already live; \
                 the RNG is broken"
            ),
        }
    }

    /// As [`allocate`](Self::allocate), but gives `value` back instead of panicking when
    /// [`ALLOCATE_DRAWS`] draws in a row are all unusable.
    pub fn try_allocate<R: Rng + ?Sized>(&mut self, rng: &mut R, value: V) -> Result<FlowId, V> {
        for _ in 0..ALLOCATE_DRAWS {
            let id = FlowId(rng.next_u64());
            if id.is_none() {
                continue;
            }
            if let hash_map::Entry::Vacant(slot) = self.map.entry(id) {
                slot.insert(value);
                return Ok(id);
            }
        }
        Err(value)
    }

    /// Stores `value` under a given `id`, for a flow whose ID was allocated elsewhere (a flow
    /// migrated or failed over from another host of this service). Refuses, giving `value` back,
    /// if `id` is [`FlowId::NONE`] or live.
    pub fn adopt(&mut self, id: FlowId, value: V) -> Result<(), V> {
        if id.is_none() {
            return Err(value);
        }
        match self.map.entry(id) {
            hash_map::Entry::Vacant(slot) => {
                slot.insert(value);
                Ok(())
            }
            hash_map::Entry::Occupied(_) => Err(value),
        }
    }

    /// The state of flow `id`.
    pub fn get(&self, id: FlowId) -> Option<&V> {
        self.map.get(&id)
    }

    /// The state of flow `id`, mutably.
    pub fn get_mut(&mut self, id: FlowId) -> Option<&mut V> {
        self.map.get_mut(&id)
    }

    /// Whether `id` is live.
    pub fn contains(&self, id: FlowId) -> bool {
        self.map.contains_key(&id)
    }

    /// Removes flow `id`, returning its state. The ID may be allocated again afterwards.
    pub fn remove(&mut self, id: FlowId) -> Option<V> {
        self.map.remove(&id)
    }

    /// Number of live flows.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there is no live flow.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Every live flow, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (FlowId, &V)> {
        self.map.iter().map(|(id, v)| (*id, v))
    }

    /// Every live flow with mutable state, in no particular order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (FlowId, &mut V)> {
        self.map.iter_mut().map(|(id, v)| (*id, v))
    }

    /// Keeps only the flows for which `keep` returns true.
    pub fn retain(&mut self, mut keep: impl FnMut(FlowId, &mut V) -> bool) {
        self.map.retain(|id, v| keep(*id, v));
    }
}
