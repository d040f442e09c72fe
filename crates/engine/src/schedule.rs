//! Which connections of an endpoint may have something to send, and when each one's timer is
//! due, so that sending and timer handling cost O(connections that are busy), not O(all
//! connections): an endpoint with 100 000 idle flows and one busy one should not look at the
//! idle ones on every packet.
//!
//! Connections are named by their slot index. The endpoint [`wake`](Schedule::wake)s a slot
//! whenever something happened to it (a packet, a timer, an application call) and
//! [`arm`](Schedule::arm)s its current deadline; a slot leaves the ready queue when it is
//! popped, and the endpoint wakes it again only if it sent something (it may have more).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use crate::Instant;

/// Ready queue and timer heap over connection slots; see the [module docs](self).
#[derive(Debug, Default)]
pub(crate) struct Schedule {
    /// Slots that may have something to send, in round-robin order.
    ready: VecDeque<usize>,
    /// `queued[i]`: slot `i` is in `ready`.
    queued: Vec<bool>,
    /// Deadlines as a min-heap. An entry is current only while it equals `armed[i]`; entries
    /// are not removed when a deadline moves, stale ones are skipped (and pruned from the top,
    /// so the top is always current).
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// `armed[i]`: slot `i`'s current deadline.
    armed: Vec<Option<Instant>>,
}

impl Schedule {
    fn grow(&mut self, slot: usize) {
        if slot >= self.queued.len() {
            self.queued.resize(slot + 1, false);
            self.armed.resize(slot + 1, None);
        }
    }

    /// Queues `slot` for sending (at the back; no-op if already queued).
    pub(crate) fn wake(&mut self, slot: usize) {
        self.grow(slot);
        if !self.queued[slot] {
            self.queued[slot] = true;
            self.ready.push_back(slot);
        }
    }

    /// The next slot to ask for a packet, taken out of the queue.
    pub(crate) fn pop_ready(&mut self) -> Option<usize> {
        let slot = self.ready.pop_front()?;
        self.queued[slot] = false;
        Some(slot)
    }

    /// Sets `slot`'s deadline (`None` disarms it).
    pub(crate) fn arm(&mut self, slot: usize, deadline: Option<Instant>) {
        self.grow(slot);
        if self.armed[slot] == deadline {
            return;
        }
        self.armed[slot] = deadline;
        if let Some(t) = deadline {
            self.timers.push(Reverse((t, slot)));
        }
        self.prune();
    }

    /// Forgets `slot`'s deadline (the slot was freed). A queued entry stays and is harmless: a
    /// freed slot has nothing to send, a reused one is simply asked once more.
    pub(crate) fn forget(&mut self, slot: usize) {
        self.arm(slot, None);
    }

    /// How many slots are queued for sending.
    pub(crate) fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// The earliest armed deadline.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Disarms and appends to `out` every slot whose deadline is at or before `now`, each once.
    pub(crate) fn pop_due(&mut self, now: Instant, out: &mut Vec<usize>) {
        while let Some(&Reverse((t, slot))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            if self.armed[slot] == Some(t) {
                self.armed[slot] = None;
                out.push(slot);
            }
        }
        self.prune();
    }

    /// Drops stale entries from the top of the heap, and rebuilds the heap when stale entries
    /// (deadlines that moved later) make up most of it, so it stays O(slots) in size.
    fn prune(&mut self) {
        while let Some(&Reverse((t, slot))) = self.timers.peek() {
            if self.armed[slot] == Some(t) {
                break;
            }
            self.timers.pop();
        }
        if self.timers.len() > 2 * self.armed.len() + 64 {
            self.timers = self
                .armed
                .iter()
                .enumerate()
                .filter_map(|(slot, t)| t.map(|t| Reverse((t, slot))))
                .collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Instant {
        Instant::from_nanos(ms * 1_000_000)
    }

    #[test]
    fn ready_queue_is_round_robin_without_duplicates() {
        let mut s = Schedule::default();
        s.wake(3);
        s.wake(1);
        s.wake(3);
        assert_eq!(s.pop_ready(), Some(3));
        s.wake(3);
        assert_eq!(s.pop_ready(), Some(1));
        assert_eq!(s.pop_ready(), Some(3));
        assert_eq!(s.pop_ready(), None);
    }

    #[test]
    fn moved_and_disarmed_deadlines_are_not_reported() {
        let mut s = Schedule::default();
        s.arm(0, Some(at(10)));
        s.arm(1, Some(at(20)));
        s.arm(0, Some(at(30))); // moved later: the 10 ms entry is stale
        assert_eq!(s.next_deadline(), Some(at(20)));
        s.arm(1, None);
        assert_eq!(s.next_deadline(), Some(at(30)));
        let mut due = Vec::new();
        s.pop_due(at(25), &mut due);
        assert!(due.is_empty());
        s.pop_due(at(30), &mut due);
        assert_eq!(due, [0]);
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn a_slot_is_due_once_even_if_armed_twice_at_the_same_time() {
        let mut s = Schedule::default();
        s.arm(2, Some(at(5)));
        s.arm(2, Some(at(7)));
        s.arm(2, Some(at(5)));
        let mut due = Vec::new();
        s.pop_due(at(100), &mut due);
        assert_eq!(due, [2]);
    }

    #[test]
    fn heap_stays_bounded_when_deadlines_keep_moving_later() {
        let mut s = Schedule::default();
        s.arm(0, Some(at(1)));
        for i in 0..10_000 {
            // Slot 1's deadline moves later each time while slot 0 stays earliest, so slot 1's
            // stale entries are never at the top.
            s.arm(1, Some(at(1_000_000 - i)));
        }
        assert!(s.timers.len() <= 2 * 2 + 64 + 1, "{}", s.timers.len());
        assert_eq!(s.next_deadline(), Some(at(1)));
        let mut due = Vec::new();
        s.pop_due(at(2_000_000), &mut due);
        due.sort_unstable();
        assert_eq!(due, [0, 1]);
    }

    #[test]
    fn matches_a_linear_scan_over_random_operations() {
        // A tiny xorshift so the test needs no RNG crate.
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut s = Schedule::default();
        let mut model: Vec<Option<Instant>> = vec![None; 16];
        let mut now = 0;
        for _ in 0..20_000 {
            let slot = (next() % 16) as usize;
            match next() % 4 {
                0 | 1 => {
                    let t = Some(at(now + next() % 50));
                    s.arm(slot, t);
                    model[slot] = t;
                }
                2 => {
                    s.forget(slot);
                    model[slot] = None;
                }
                _ => {
                    now += next() % 20;
                    let mut due = Vec::new();
                    s.pop_due(at(now), &mut due);
                    due.sort_unstable();
                    let mut want = Vec::new();
                    for (i, t) in model.iter_mut().enumerate() {
                        if t.is_some_and(|t| t <= at(now)) {
                            *t = None;
                            want.push(i);
                        }
                    }
                    assert_eq!(due, want);
                }
            }
            assert_eq!(s.next_deadline(), model.iter().flatten().min().copied());
        }
    }
}
