//! The prefixes a node holds itself: lengths `D ..= D + 7` for a node at depth `D`.
//!
//! There are 255 such (relative length `r` in 0..=7, top `r` bits `x` of the node's byte) pairs.
//! Each gets a *slot* in `0..255`: the rank of `(x << (8 - r), r)` in lexicographic order. So
//!
//! * walking the slots in order yields the prefixes in [`ServicePrefix`] order (ID bits, then
//!   length), which keeps [`PrefixMap::iter`] sorted; and
//! * among the slots that match one key byte, the longest prefix has the highest slot (a longer
//!   match keeps more bits of the byte, so its left-aligned value is at least as large, and on a
//!   tie the longer length sorts later), so the longest match is simply the highest set bit of
//!   `present & MATCH[byte]`: an AND of four words, a leading-zero count and a popcount.
//!
//! The presence bitmap sits inline in the node; the values sit out of line in slot order. A
//! lookup only computes a value's *address*, so descending through a node never touches the
//! value array.
//!
//! [`ServicePrefix`]: serval_wire::ServicePrefix
//! [`PrefixMap::iter`]: super::PrefixMap::iter

/// Number of slots: `1 + 2 + 4 + ... + 128`.
pub(super) const SLOTS: usize = 255;

/// Heap code of a pair: `(1 << r) | x`, in `1..256`.
const fn code(r: usize, x: usize) -> usize {
    (1 << r) | x
}

/// Relative length of a heap code.
const fn code_rel(code: usize) -> usize {
    (usize::BITS - 1 - code.leading_zeros()) as usize
}

/// Sort key of a heap code: left-aligned bits, then length.
const fn sort_key(code: usize) -> usize {
    let r = code_rel(code);
    let x = code - (1 << r);
    ((x << (8 - r)) << 3) | r
}

/// Slot of each heap code (entry 0 unused).
const SLOT_OF_CODE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 1;
    while c < 256 {
        let k = sort_key(c);
        let mut rank = 0;
        let mut d = 1;
        while d < 256 {
            if sort_key(d) < k {
                rank += 1;
            }
            d += 1;
        }
        t[c] = rank as u8;
        c += 1;
    }
    t
};

/// Heap code of each slot.
const CODE_OF_SLOT: [u8; SLOTS] = {
    let mut t = [0u8; SLOTS];
    let mut c = 1;
    while c < 256 {
        t[SLOT_OF_CODE[c] as usize] = c as u8;
        c += 1;
    }
    t
};

/// For each key byte, the slots of the eight prefixes (lengths 0..=7) that contain it.
static MATCH: [[u64; 4]; 256] = {
    let mut t = [[0u64; 4]; 256];
    let mut b = 0;
    while b < 256 {
        let mut r = 0;
        while r < 8 {
            let i = SLOT_OF_CODE[code(r, b >> (8 - r))] as usize;
            t[b][i / 64] |= 1 << (i % 64);
            r += 1;
        }
        b += 1;
    }
    t
};

/// Slot of the prefix of relative length `rel` (0..=7) made of the top `rel` bits of `byte`.
#[inline]
pub(super) fn slot(rel: u16, byte: u8) -> usize {
    debug_assert!(rel < 8);
    let r = usize::from(rel) & 7;
    SLOT_OF_CODE[code(r, usize::from(byte) >> (8 - r))] as usize
}

/// Relative length and left-aligned bits of slot `i`.
#[inline]
pub(super) fn slot_prefix(i: usize) -> (u16, u8) {
    let c = usize::from(CODE_OF_SLOT[i % SLOTS]);
    let r = code_rel(c);
    (r as u16, ((c - (1 << r)) << (8 - r)) as u8)
}

/// Popcount of `bits` below bit `i` (`i < 256`).
#[inline]
pub(super) fn rank(bits: &[u64; 4], i: usize) -> usize {
    let w = (i >> 6) & 3;
    let mut r = (bits[w] & ((1u64 << (i & 63)) - 1)).count_ones() as usize;
    for word in &bits[..w] {
        r += word.count_ones() as usize;
    }
    r
}

/// Whether bit `i` of `bits` is set (`i < 256`).
#[inline]
pub(super) fn test(bits: &[u64; 4], i: usize) -> bool {
    bits[(i >> 6) & 3] >> (i & 63) & 1 == 1
}

/// Index of the first set bit at or after `from` (`from <= 256`).
#[inline]
pub(super) fn next_set(bits: &[u64; 4], from: usize) -> Option<usize> {
    let mut w = from >> 6;
    if w >= 4 {
        return None;
    }
    let mut cur = bits[w] & (u64::MAX << (from & 63));
    loop {
        if cur != 0 {
            return Some(w * 64 + cur.trailing_zeros() as usize);
        }
        w += 1;
        if w == 4 {
            return None;
        }
        cur = bits[w];
    }
}

/// The prefixes held by one node: a presence bitmap over the 255 slots and one value per
/// present slot, in slot order.
pub(super) struct Prefixes<V> {
    bits: [u64; 4],
    values: Box<[V]>,
}

impl<V: Clone> Clone for Prefixes<V> {
    fn clone(&self) -> Self {
        Prefixes {
            bits: self.bits,
            values: self.values.clone(),
        }
    }
}

impl<V> Default for Prefixes<V> {
    fn default() -> Self {
        Prefixes {
            bits: [0; 4],
            values: Box::default(),
        }
    }
}

impl<V> Prefixes<V> {
    /// The field a lookup reads last (the values' address and length), for prefetching.
    #[inline(always)]
    #[allow(clippy::borrowed_box)] // the field itself (in the node's header), not the values
    pub(super) fn tail(&self) -> &Box<[V]> {
        &self.values
    }

    /// The longest prefix containing `byte`: its relative length and value.
    #[inline(always)]
    pub(super) fn longest(&self, byte: u8) -> Option<(u16, &V)> {
        if self.values.is_empty() {
            return None;
        }
        let m = &MATCH[usize::from(byte)];
        let mut w = 4;
        while w > 0 {
            w -= 1;
            let hit = self.bits[w] & m[w];
            if hit != 0 {
                let i = w * 64 + 63 - hit.leading_zeros() as usize;
                let (rel, _) = slot_prefix(i);
                return self.values.get(rank(&self.bits, i)).map(|v| (rel, v));
            }
        }
        None
    }

    /// The value in slot `i`.
    pub(super) fn get(&self, i: usize) -> Option<&V> {
        if test(&self.bits, i) {
            self.values.get(rank(&self.bits, i))
        } else {
            None
        }
    }

    /// Number of prefixes held.
    pub(super) fn len(&self) -> usize {
        self.values.len()
    }

    /// The first occupied slot at or after `from`, with its value; for in-order walks.
    pub(super) fn next_from(&self, from: usize) -> Option<(usize, &V)> {
        let i = next_set(&self.bits, from)?;
        self.values.get(rank(&self.bits, i)).map(|v| (i, v))
    }

    /// Takes every prefix out, in slot order.
    pub(super) fn drain(self) -> impl Iterator<Item = (usize, V)> {
        let bits = self.bits;
        let mut from = 0;
        self.values.into_vec().into_iter().filter_map(move |v| {
            let i = next_set(&bits, from)?;
            from = i + 1;
            Some((i, v))
        })
    }

    /// Heap bytes of the value array.
    pub(super) fn values_bytes(&self) -> usize {
        core::mem::size_of_val::<[V]>(&self.values)
    }

    /// Internal consistency: one value per set bit, no bit past the last slot.
    pub(super) fn check(&self) -> Result<(), String> {
        let ones: u32 = self.bits.iter().map(|w| w.count_ones()).sum();
        if ones as usize != self.values.len() {
            return Err(format!(
                "prefix bitmap has {ones} bits for {} values",
                self.values.len()
            ));
        }
        if self.bits[3] >> (SLOTS - 192) != 0 {
            return Err("prefix bitmap has a bit past the last slot".into());
        }
        Ok(())
    }
}

impl<V: Clone> Prefixes<V> {
    /// Puts `v` in slot `i`, returning the value it replaced.
    pub(super) fn insert(&mut self, i: usize, v: V) -> Option<V> {
        let r = rank(&self.bits, i);
        if test(&self.bits, i) {
            return self
                .values
                .get_mut(r)
                .map(|slot| core::mem::replace(slot, v));
        }
        self.bits[(i >> 6) & 3] |= 1 << (i & 63);
        let mut values = core::mem::take(&mut self.values).into_vec();
        values.insert(r, v);
        self.values = values.into_boxed_slice();
        None
    }

    /// Empties slot `i`, returning its value.
    pub(super) fn remove(&mut self, i: usize) -> Option<V> {
        if !test(&self.bits, i) {
            return None;
        }
        let r = rank(&self.bits, i);
        self.bits[(i >> 6) & 3] &= !(1 << (i & 63));
        let mut values = core::mem::take(&mut self.values).into_vec();
        let v = values.remove(r);
        self.values = values.into_boxed_slice();
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_a_bijection_in_prefix_order() {
        let mut prev: Option<(u8, u16)> = None;
        for i in 0..SLOTS {
            let (rel, bits) = slot_prefix(i);
            assert!(rel < 8);
            assert_eq!(slot(rel, bits), i, "each slot maps back to itself");
            if let Some(p) = prev {
                assert!(p < (bits, rel), "slot order is (bits, len) order");
            }
            prev = Some((bits, rel));
        }
        assert_eq!(slot(0, 0xff), 0);
    }

    #[test]
    fn longest_is_the_longest_matching_slot() {
        for b in 0..=255u8 {
            let mut s = Prefixes::default();
            assert_eq!(s.longest(b), None);
            for rel in 0..8u16 {
                s.insert(slot(rel, b), rel);
                assert_eq!(s.longest(b).map(|(r, v)| (r, *v)), Some((rel, rel)));
                // A longer prefix that differs from `b` in its last bit never matches.
                if rel < 7 {
                    let mut other = Prefixes::default();
                    other.insert(slot(rel + 1, b ^ (0x80 >> rel)), 0u16);
                    assert_eq!(other.longest(b), None);
                }
            }
        }
    }

    #[test]
    fn insert_remove_get_drain() {
        let mut s = Prefixes::default();
        assert_eq!(s.insert(slot(3, 0b1010_0000), 'a'), None);
        assert_eq!(s.insert(slot(3, 0b1010_0000), 'b'), Some('a'));
        assert_eq!(s.insert(slot(1, 0), 'c'), None);
        assert_eq!(s.insert(slot(0, 0), 'd'), None);
        assert_eq!(s.len(), 3);
        assert_eq!(s.get(slot(1, 0)), Some(&'c'));
        assert_eq!(
            s.next_from(1).map(|(i, v)| (slot_prefix(i), *v)),
            Some(((1, 0), 'c'))
        );
        assert_eq!(s.remove(slot(1, 0)), Some('c'));
        assert_eq!(s.remove(slot(1, 0)), None);
        assert!(s.check().is_ok());
        let all: Vec<_> = s.drain().map(|(i, v)| (slot_prefix(i), v)).collect();
        assert_eq!(all, [((0, 0), 'd'), ((3, 0b1010_0000), 'b')]);
    }
}
