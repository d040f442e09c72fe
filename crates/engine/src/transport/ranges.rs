//! [`RangeSet`]: a bounded set of disjoint, half-open `u64` ranges.
//!
//! One type serves three jobs in the transport:
//!
//! - **received packet numbers**, from which ACK frames are built (RFC 9000 §13.2.3 lets a
//!   receiver stop acknowledging old ranges: "receivers SHOULD limit the number of ACK
//!   Ranges");
//! - **acknowledged packet numbers** decoded from a peer's ACK frame;
//! - **stream byte ranges**: what a sender must retransmit or has had acknowledged, and what a
//!   receiver already holds.
//!
//! Ranges are half-open (`start..end`, `end` excluded) and kept *coalesced*: no two stored
//! ranges overlap or touch, so `0..3` and `3..5` are stored as `0..5`. A consequence is that
//! the value `u64::MAX` can never be a member; packet numbers (< 2^62) and stream offsets
//! (< 2^62, RFC 9000 §19.8) never reach it.
//!
//! # Bounded size
//!
//! Values in these sets are chosen by the peer (which packets arrive, which ones it
//! acknowledges, which stream segments it sends), so a hostile peer could otherwise make a set
//! grow without bound by leaving a gap between every value. Every set therefore has a cap on
//! the number of stored ranges ([`RangeSet::max_ranges`]). Two ways of respecting it are
//! offered:
//!
//! - [`RangeSet::insert`] and [`RangeSet::remove`] keep the cap by **dropping the lowest
//!   ranges** once it is exceeded. That is right for packet-number sets: forgetting the oldest
//!   packets only means they are no longer acknowledged (or, on the sending side, that they
//!   will eventually be declared lost and their data retransmitted).
//! - [`RangeSet::try_insert`] **refuses** an insertion that would exceed the cap and leaves the
//!   set unchanged. That is right where forgetting would lose information that cannot be
//!   recovered, such as which stream bytes a receiver holds.
//!
//! # Memory
//!
//! The ranges are kept in order in a ring buffer (a [`VecDeque`]): the lowest and highest
//! ranges, where sets change most (a new highest packet number, the lowest retransmission),
//! are added and removed in constant time, a value is found by binary search, and a range in
//! the middle costs a shift of the shorter side. The ring is boxed, so that a set takes 16
//! bytes inline; a set owns no memory until its first insertion, and
//! [`shrink_to_fit`](RangeSet::shrink_to_fit) gives back what it no longer needs.

use core::fmt;
use core::ops::Range;
use std::collections::VecDeque;
use std::collections::vec_deque;

use crate::snapshot::{BlockReader, BlockWriter, SnapshotError};

/// The default cap on stored ranges used by [`RangeSet::new`].
///
/// 256 ranges cost 4 KiB at most and exceed the number of ACK ranges any sensible peer sends
/// (quinn keeps 64 per ACK frame).
pub const DEFAULT_MAX_RANGES: usize = 256;

/// A set of `u64` values stored as disjoint, coalesced, half-open ranges, with a cap on the
/// number of ranges (see the [module documentation](self)).
///
/// Empty or inverted ranges (`start >= end`) given to any method are treated as empty: they
/// never panic and never change the set.
#[derive(Clone, Eq)]
pub struct RangeSet {
    /// `(start, end)` of every stored range, ascending; ranges are disjoint, non-adjacent and
    /// never empty. Boxed so that the many sets that are mostly empty (retransmissions,
    /// out-of-order data, losses) take 8 bytes inline; `None` until the first insertion.
    #[allow(clippy::box_collection)] // Deliberate, as said.
    ranges: Option<Box<VecDeque<(u64, u64)>>>,
    /// Cap on the number of ranges; at least 1.
    max_ranges: u32,
}

/// What a set without storage holds.
static NO_RANGES: VecDeque<(u64, u64)> = VecDeque::new();

impl PartialEq for RangeSet {
    fn eq(&self, other: &RangeSet) -> bool {
        self.max_ranges == other.max_ranges && self.r() == other.r()
    }
}

/// Returned by [`RangeSet::try_insert`] when inserting would exceed the cap on stored ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("range set is full ({max_ranges} ranges)")]
pub struct CapacityExceeded {
    /// The cap that would have been exceeded.
    pub max_ranges: usize,
}

impl Default for RangeSet {
    fn default() -> Self {
        RangeSet::new()
    }
}

impl fmt::Debug for RangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl RangeSet {
    /// An empty set holding at most [`DEFAULT_MAX_RANGES`] ranges.
    pub fn new() -> RangeSet {
        RangeSet::with_max_ranges(DEFAULT_MAX_RANGES)
    }

    /// An empty set holding at most `max_ranges` ranges (a cap of 0 is raised to 1, one
    /// beyond `u32::MAX` lowered to it).
    pub fn with_max_ranges(max_ranges: usize) -> RangeSet {
        RangeSet {
            ranges: None,
            max_ranges: u32::try_from(max_ranges).unwrap_or(u32::MAX).max(1),
        }
    }

    /// The cap on stored ranges.
    pub fn max_ranges(&self) -> usize {
        self.max_ranges as usize
    }

    /// The stored ranges.
    fn r(&self) -> &VecDeque<(u64, u64)> {
        self.ranges.as_deref().unwrap_or(&NO_RANGES)
    }

    /// Number of stored (disjoint, non-adjacent) ranges; not the number of values.
    pub fn len(&self) -> usize {
        self.r().len()
    }

    /// Whether the set holds no value.
    pub fn is_empty(&self) -> bool {
        self.r().is_empty()
    }

    /// Removes every value (keeping the memory; see [`shrink_to_fit`](Self::shrink_to_fit)).
    pub fn clear(&mut self) {
        if let Some(r) = &mut self.ranges {
            r.clear();
        }
    }

    /// Gives back memory the set does not need: all of it when empty.
    pub fn shrink_to_fit(&mut self) {
        match &mut self.ranges {
            Some(r) if r.is_empty() => self.ranges = None,
            Some(r) => r.shrink_to_fit(),
            None => {}
        }
    }

    /// Whether the set holds memory that [`shrink_to_fit`](Self::shrink_to_fit) would give
    /// back.
    pub fn has_spare_capacity(&self) -> bool {
        self.ranges
            .as_ref()
            .is_some_and(|r| r.is_empty() || r.capacity() > r.len())
    }

    /// Index of the first stored range starting above `value`; the range before it (if any)
    /// is the only one that may contain `value`.
    fn after(&self, value: u64) -> usize {
        self.r().partition_point(|&(s, _)| s <= value)
    }

    /// Whether `value` is in the set.
    pub fn contains(&self, value: u64) -> bool {
        let i = self.after(value);
        i > 0 && value < self.r()[i - 1].1
    }

    /// Whether every value of `range` is in the set (true for an empty range).
    pub fn contains_range(&self, range: Range<u64>) -> bool {
        if range.start >= range.end {
            return true;
        }
        let i = self.after(range.start);
        i > 0 && range.end <= self.r()[i - 1].1
    }

    /// The smallest value in the set.
    pub fn min(&self) -> Option<u64> {
        self.r().front().map(|&(s, _)| s)
    }

    /// The largest value in the set.
    pub fn max(&self) -> Option<u64> {
        // Stored ranges are never empty, so `end - 1` cannot underflow.
        self.r().back().map(|&(_, e)| e - 1)
    }

    /// The lowest stored range.
    pub fn first(&self) -> Option<Range<u64>> {
        self.r().front().map(|&(s, e)| s..e)
    }

    /// The highest stored range.
    pub fn last(&self) -> Option<Range<u64>> {
        self.r().back().map(|&(s, e)| s..e)
    }

    /// The stored ranges in ascending order; call `.rev()` for descending order (as an ACK
    /// frame lists them, RFC 9000 §19.3.1).
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            inner: self.r().iter(),
        }
    }

    /// Adds every value of `range`, merging with overlapping and adjacent ranges.
    ///
    /// Returns whether any value was new. If the set then holds more than
    /// [`max_ranges`](Self::max_ranges) ranges, the **lowest** ranges are dropped until it
    /// does not; this may drop values just inserted if they are the lowest.
    pub fn insert(&mut self, range: Range<u64>) -> bool {
        let changed = self.insert_unbounded(range);
        self.enforce_cap();
        changed
    }

    /// Adds every value of `range` unless that would leave more than
    /// [`max_ranges`](Self::max_ranges) ranges, in which case the set is left unchanged.
    ///
    /// Returns whether any value was new. An insertion that merges with existing ranges, or
    /// adds nothing, always succeeds.
    pub fn try_insert(&mut self, range: Range<u64>) -> Result<bool, CapacityExceeded> {
        if self.len_after_insert(range.clone()) > self.max_ranges() {
            return Err(CapacityExceeded {
                max_ranges: self.max_ranges(),
            });
        }
        Ok(self.insert_unbounded(range))
    }

    /// How many ranges the set would hold after inserting `range` (ignoring the cap).
    pub fn len_after_insert(&self, range: Range<u64>) -> usize {
        let Range { start, end } = range;
        if start >= end || self.contains_range(start..end) {
            return self.len();
        }
        let (lo, hi) = self.touching(start, end);
        self.len() + 1 - (hi - lo)
    }

    /// The indices `lo..hi` of the stored ranges that overlap or touch `start..end`: those
    /// ending at or after `start` and starting at or before `end`.
    fn touching(&self, start: u64, end: u64) -> (usize, usize) {
        let lo = self.r().partition_point(|&(_, e)| e < start);
        let hi = self.after(end);
        (lo, hi.max(lo))
    }

    /// Removes every value of `range`.
    ///
    /// Removing the middle of a stored range splits it in two; if that exceeds
    /// [`max_ranges`](Self::max_ranges), the lowest range is dropped (as in
    /// [`insert`](Self::insert)).
    pub fn remove(&mut self, range: Range<u64>) {
        let Range { start, end } = range;
        if start >= end {
            return;
        }
        let Some(ranges) = &mut self.ranges else {
            return;
        };
        // The overlapping ranges: those ending after `start` and starting before `end`.
        let lo = ranges.partition_point(|&(_, e)| e <= start);
        let hi = ranges.partition_point(|&(s, _)| s < end).max(lo);
        if lo == hi {
            return;
        }
        let (first_start, _) = ranges[lo];
        let (_, last_end) = ranges[hi - 1];
        ranges.drain(lo..hi);
        let mut at = lo;
        if first_start < start {
            ranges.insert(at, (first_start, start));
            at += 1;
        }
        if last_end > end {
            ranges.insert(at, (end, last_end));
        }
        self.enforce_cap();
    }

    /// Removes every value below `value` (used to forget packet numbers that no longer need
    /// acknowledging and stream offsets already delivered). Never increases the range count.
    pub fn remove_below(&mut self, value: u64) {
        let Some(ranges) = &mut self.ranges else {
            return;
        };
        let below = ranges.partition_point(|&(_, e)| e <= value);
        ranges.drain(..below);
        if let Some(first) = ranges.front_mut() {
            first.0 = first.0.max(value);
        }
    }

    /// Removes and returns the lowest stored range.
    pub fn pop_min(&mut self) -> Option<Range<u64>> {
        self.ranges.as_mut()?.pop_front().map(|(s, e)| s..e)
    }

    /// The parts of `within` that are *not* in the set, in ascending order.
    ///
    /// Used to find which bytes of an incoming segment are new, and which bytes of a lost
    /// segment still need retransmitting.
    pub fn gaps(&self, within: Range<u64>) -> Gaps<'_> {
        let Range { start, end } = within;
        // Begin from the first stored range ending after `start`.
        let from = self.r().partition_point(|&(_, e)| e <= start);
        Gaps {
            inner: self.r().range(from..),
            cursor: start,
            end,
        }
    }

    /// Inserts without looking at the cap. Returns whether any value was new.
    fn insert_unbounded(&mut self, range: Range<u64>) -> bool {
        let Range { start, end } = range;
        if start >= end {
            return false;
        }
        // The common case: above every stored range.
        let ranges = self.ranges.get_or_insert_with(Box::default);
        match ranges.back_mut() {
            None => {
                ranges.push_back((start, end));
                return true;
            }
            Some(last) if last.1 < start => {
                ranges.push_back((start, end));
                return true;
            }
            Some(last) if last.0 <= start => {
                if end <= last.1 {
                    return false;
                }
                last.1 = end;
                return true;
            }
            Some(_) => {}
        }
        if self.contains_range(start..end) {
            return false;
        }
        let (lo, hi) = self.touching(start, end);
        let Some(ranges) = &mut self.ranges else {
            return false; // Not reached: allocated above.
        };
        if lo == hi {
            ranges.insert(lo, (start, end));
        } else {
            // Stored ranges are disjoint and non-adjacent, so all of `lo..hi` merge into one.
            let merged = (start.min(ranges[lo].0), end.max(ranges[hi - 1].1));
            ranges[lo] = merged;
            ranges.drain(lo + 1..hi);
        }
        true
    }

    fn enforce_cap(&mut self) {
        let cap = self.max_ranges();
        if let Some(ranges) = &mut self.ranges
            && ranges.len() > cap
        {
            let excess = ranges.len() - cap;
            ranges.drain(..excess);
        }
    }
}

/// Snapshot encoding (docs/snapshot.md, "Range set"): `count u32`, then `start u64 | end
/// u64` per range, ascending.
impl RangeSet {
    /// Writes the ranges (not the cap: the owner knows it).
    pub(crate) fn encode(&self, w: &mut BlockWriter) {
        w.u32(u32::try_from(self.len()).unwrap_or(u32::MAX));
        for r in self.iter() {
            w.u64(r.start);
            w.u64(r.end);
        }
    }

    /// Reads ranges written by [`encode`](Self::encode) into a set capped at `max_ranges`.
    /// Refused unless they are ascending, non-empty, neither overlapping nor touching, at
    /// most `max_ranges` of them, and all at or below `limit`.
    pub(crate) fn decode(
        r: &mut BlockReader<'_>,
        max_ranges: usize,
        limit: u64,
    ) -> Result<RangeSet, SnapshotError> {
        let n = r.count(16)?;
        r.check(n <= max_ranges, "too many ranges")?;
        let mut set = RangeSet::with_max_ranges(max_ranges);
        let mut prev_end: Option<u64> = None;
        for _ in 0..n {
            let (start, end) = (r.u64()?, r.u64()?);
            r.check(start < end && end <= limit, "range empty or out of bounds")?;
            r.check(
                prev_end.is_none_or(|p| start > p),
                "ranges not ascending and apart",
            )?;
            prev_end = Some(end);
            // Above every stored range and within the cap: appended, never refused.
            set.try_insert(start..end)
                .map_err(|_| r.malformed("too many ranges"))?;
        }
        Ok(set)
    }
}

impl<'a> IntoIterator for &'a RangeSet {
    type Item = Range<u64>;
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// Ascending (or, reversed, descending) iterator over the ranges of a [`RangeSet`].
#[derive(Clone, Debug)]
pub struct Iter<'a> {
    inner: vec_deque::Iter<'a, (u64, u64)>,
}

impl Iterator for Iter<'_> {
    type Item = Range<u64>;
    fn next(&mut self) -> Option<Range<u64>> {
        self.inner.next().map(|&(s, e)| s..e)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

impl DoubleEndedIterator for Iter<'_> {
    fn next_back(&mut self) -> Option<Range<u64>> {
        self.inner.next_back().map(|&(s, e)| s..e)
    }
}

impl ExactSizeIterator for Iter<'_> {}

/// Iterator over the parts of a range missing from a [`RangeSet`]; see [`RangeSet::gaps`].
#[derive(Clone, Debug)]
pub struct Gaps<'a> {
    inner: vec_deque::Iter<'a, (u64, u64)>,
    /// Everything below `cursor` has been either yielded or found in the set.
    cursor: u64,
    end: u64,
}

impl Iterator for Gaps<'_> {
    type Item = Range<u64>;
    fn next(&mut self) -> Option<Range<u64>> {
        while self.cursor < self.end {
            match self.inner.next() {
                Some(&(s, e)) => {
                    if e <= self.cursor {
                        continue;
                    }
                    if s > self.cursor {
                        let gap = self.cursor..s.min(self.end);
                        self.cursor = e;
                        return Some(gap);
                    }
                    self.cursor = e;
                }
                None => {
                    let gap = self.cursor..self.end;
                    self.cursor = self.end;
                    return Some(gap);
                }
            }
        }
        None
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // one-range sets are meant
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn set(ranges: &[Range<u64>]) -> RangeSet {
        let mut s = RangeSet::new();
        for r in ranges {
            s.insert(r.clone());
        }
        s
    }

    fn ranges(s: &RangeSet) -> Vec<Range<u64>> {
        s.iter().collect()
    }

    #[test]
    fn insert_merges_overlapping_and_adjacent() {
        let mut s = set(&[0..3, 5..7]);
        assert_eq!(ranges(&s), vec![0..3, 5..7]);
        assert!(s.insert(3..5));
        assert_eq!(ranges(&s), vec![0..7]);
        assert!(!s.insert(2..6));
        assert!(s.insert(10..12));
        assert!(s.insert(6..20));
        assert_eq!(ranges(&s), vec![0..20]);
        assert_eq!((s.min(), s.max()), (Some(0), Some(19)));
    }

    #[test]
    fn empty_and_inverted_ranges_are_ignored() {
        let mut s = set(&[4..8]);
        #[allow(clippy::reversed_empty_ranges)]
        let inverted = 9..3;
        assert!(!s.insert(inverted.clone()));
        assert!(!s.insert(5..5));
        s.remove(inverted.clone());
        assert_eq!(s.try_insert(inverted.clone()), Ok(false));
        assert_eq!(s.gaps(inverted).count(), 0);
        assert!(s.contains_range(7..7));
        assert_eq!(ranges(&s), vec![4..8]);
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        let mut s = RangeSet::new();
        s.insert(u64::MAX - 2..u64::MAX);
        s.insert(0..1);
        assert_eq!(s.max(), Some(u64::MAX - 1));
        assert!(!s.contains(u64::MAX));
        s.remove(u64::MAX - 1..u64::MAX);
        assert_eq!(ranges(&s), vec![0..1, u64::MAX - 2..u64::MAX - 1]);
        s.remove_below(u64::MAX);
        assert!(s.is_empty());
    }

    #[test]
    fn remove_splits_and_trims() {
        let mut s = set(&[0..10, 20..30]);
        s.remove(3..5);
        assert_eq!(ranges(&s), vec![0..3, 5..10, 20..30]);
        s.remove(8..25);
        assert_eq!(ranges(&s), vec![0..3, 5..8, 25..30]);
        s.remove_below(6);
        assert_eq!(ranges(&s), vec![6..8, 25..30]);
        s.remove_below(8);
        assert_eq!(ranges(&s), vec![25..30]);
    }

    #[test]
    fn descending_iteration() {
        let s = set(&[0..1, 4..6, 9..10]);
        assert_eq!(s.iter().rev().collect::<Vec<_>>(), vec![9..10, 4..6, 0..1]);
        assert_eq!(s.iter().len(), 3);
        assert_eq!(s.first(), Some(0..1));
        assert_eq!(s.last(), Some(9..10));
    }

    #[test]
    fn cap_drops_the_lowest_ranges() {
        let mut s = RangeSet::with_max_ranges(3);
        for i in 0..10 {
            s.insert(i * 10..i * 10 + 1);
        }
        assert_eq!(ranges(&s), vec![70..71, 80..81, 90..91]);
        // Splitting respects the cap too.
        s.insert(92..99);
        s.remove(95..96);
        assert_eq!(ranges(&s), vec![90..91, 92..95, 96..99]);
    }

    #[test]
    fn try_insert_refuses_instead_of_evicting() {
        let mut s = RangeSet::with_max_ranges(2);
        assert_eq!(s.try_insert(0..2), Ok(true));
        assert_eq!(s.try_insert(5..6), Ok(true));
        assert_eq!(
            s.try_insert(10..11),
            Err(CapacityExceeded { max_ranges: 2 })
        );
        // Merging inserts still fit, as do no-ops.
        assert_eq!(s.try_insert(6..8), Ok(true));
        assert_eq!(s.try_insert(1..2), Ok(false));
        assert_eq!(s.try_insert(2..5), Ok(true));
        assert_eq!(ranges(&s), vec![0..8]);
    }

    #[test]
    fn gaps_within() {
        let s = set(&[2..4, 6..8]);
        let g = |r: Range<u64>| s.gaps(r).collect::<Vec<_>>();
        assert_eq!(g(0..10), vec![0..2, 4..6, 8..10]);
        assert_eq!(g(3..7), vec![4..6]);
        assert_eq!(g(2..4), vec![]);
        assert_eq!(g(5..6), vec![5..6]);
        assert_eq!(g(7..9), vec![8..9]);
    }

    #[test]
    fn memory_is_given_back_and_does_not_affect_equality() {
        let mut s = RangeSet::new();
        assert!(!s.has_spare_capacity());
        for i in 0..10 {
            s.insert(i * 10..i * 10 + 5);
        }
        s.remove_below(82);
        assert!(s.has_spare_capacity());
        s.shrink_to_fit();
        assert!(!s.has_spare_capacity());
        assert_eq!(ranges(&s), vec![82..85, 90..95]);
        s.clear();
        // An emptied set equals a fresh one, and gives all its memory back.
        assert_eq!(s, RangeSet::new());
        assert!(s.has_spare_capacity());
        s.shrink_to_fit();
        assert!(!s.has_spare_capacity());
        assert_eq!(s.pop_min(), None);
        assert!(s.insert(3..4));
        assert_eq!(ranges(&s), vec![3..4]);
    }

    // ---- property tests against a BTreeSet<u64> oracle ----

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64, u64),
        TryInsert(u64, u64),
        Remove(u64, u64),
        RemoveBelow(u64),
        PopMin,
    }

    fn op() -> impl Strategy<Value = Op> {
        let r = (0u64..120, 0u64..12);
        prop_oneof![
            4 => r.clone().prop_map(|(s, l)| Op::Insert(s, s + l)),
            2 => r.clone().prop_map(|(s, l)| Op::TryInsert(s, s + l)),
            2 => r.prop_map(|(s, l)| Op::Remove(s, s + l)),
            1 => (0u64..120).prop_map(Op::RemoveBelow),
            1 => Just(Op::PopMin),
        ]
    }

    /// The maximal runs of consecutive values of `set`, ascending.
    fn runs(set: &BTreeSet<u64>) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for &v in set {
            match out.last_mut() {
                Some(r) if r.end == v => r.end = v + 1,
                _ => out.push(v..v + 1),
            }
        }
        out
    }

    fn evict(oracle: &mut BTreeSet<u64>, cap: usize) {
        let rs = runs(oracle);
        if rs.len() > cap {
            for r in &rs[..rs.len() - cap] {
                for v in r.clone() {
                    oracle.remove(&v);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn matches_oracle(ops in proptest::collection::vec(op(), 0..60), cap in 1usize..8) {
            let mut s = RangeSet::with_max_ranges(cap);
            let mut oracle = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Insert(a, b) => {
                        let new = (a..b).any(|v| !oracle.contains(&v));
                        oracle.extend(a..b);
                        evict(&mut oracle, cap);
                        prop_assert_eq!(s.insert(a..b), new);
                    }
                    Op::TryInsert(a, b) => {
                        let mut grown = oracle.clone();
                        grown.extend(a..b);
                        let new = grown.len() != oracle.len();
                        let got = s.try_insert(a..b);
                        if runs(&grown).len() > cap {
                            prop_assert!(got.is_err());
                        } else {
                            prop_assert_eq!(got, Ok(new));
                            oracle = grown;
                        }
                    }
                    Op::Remove(a, b) => {
                        for v in a..b {
                            oracle.remove(&v);
                        }
                        evict(&mut oracle, cap);
                        s.remove(a..b);
                    }
                    Op::RemoveBelow(x) => {
                        oracle.retain(|&v| v >= x);
                        s.remove_below(x);
                    }
                    Op::PopMin => {
                        let expect = runs(&oracle).first().cloned();
                        if let Some(r) = &expect {
                            for v in r.clone() {
                                oracle.remove(&v);
                            }
                        }
                        prop_assert_eq!(s.pop_min(), expect);
                    }
                }
                let expected = runs(&oracle);
                prop_assert_eq!(ranges(&s), expected.clone());
                prop_assert!(s.len() <= cap);
                prop_assert_eq!(s.min(), oracle.first().copied());
                prop_assert_eq!(s.max(), oracle.last().copied());
                let mut rev = expected.clone();
                rev.reverse();
                prop_assert_eq!(s.iter().rev().collect::<Vec<_>>(), rev);
                for v in 0..135 {
                    prop_assert_eq!(s.contains(v), oracle.contains(&v));
                }
                let gaps: Vec<u64> = s.gaps(10..100).flatten().collect();
                let missing: Vec<u64> = (10..100).filter(|v| !oracle.contains(v)).collect();
                prop_assert_eq!(gaps, missing);
            }
        }
    }
}
