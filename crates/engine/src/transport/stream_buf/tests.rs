use super::*;
use proptest::prelude::*;

fn chunk(range: Range<u64>, fin: bool) -> Option<StreamChunk> {
    Some(StreamChunk { range, fin })
}

fn bytes(sb: &SendBuffer, r: Range<u64>) -> Vec<u8> {
    let (a, b) = sb.get(r).unwrap();
    [a, b].concat()
}

fn read_all(rb: &mut RecvBuffer) -> Vec<u8> {
    let mut out = vec![0; rb.readable() as usize];
    assert_eq!(rb.read(&mut out), out.len());
    out
}

// ---- SendBuffer ----

#[test]
fn write_applies_backpressure() {
    let mut sb = SendBuffer::new(10);
    assert_eq!(sb.write(b"hello world"), Ok(10));
    assert_eq!(sb.write(b"!"), Ok(0));
    assert_eq!(sb.free(), 0);
    assert_eq!(sb.poll_transmit(4), chunk(0..4, false));
    sb.on_acked(0..4, false);
    assert_eq!(sb.free(), 4);
    assert_eq!(sb.write(b"d!"), Ok(2));
    assert_eq!(sb.end(), 12);
    sb.finish();
    assert_eq!(sb.write(b"x"), Err(Finished));
}

#[test]
fn new_data_in_order_then_fin() {
    let mut sb = SendBuffer::new(100);
    sb.write(b"abcdefghij").unwrap();
    assert_eq!(sb.poll_transmit(4), chunk(0..4, false));
    assert_eq!(bytes(&sb, 0..4), b"abcd");
    sb.finish();
    assert_eq!(sb.poll_transmit(4), chunk(4..8, false));
    // The last chunk carries the FIN.
    assert_eq!(sb.poll_transmit(4), chunk(8..10, true));
    assert_eq!(sb.poll_transmit(4), None);
    assert!(!sb.has_pending());
}

#[test]
fn fin_alone_when_everything_was_sent() {
    let mut sb = SendBuffer::new(100);
    sb.write(b"abc").unwrap();
    assert_eq!(sb.poll_transmit(10), chunk(0..3, false));
    sb.finish();
    assert!(sb.has_pending());
    // A lone FIN fits even in zero bytes of room.
    assert_eq!(sb.poll_transmit(0), chunk(3..3, true));
    assert_eq!(sb.poll_transmit(10), None);
    // Lost, it is resent; acknowledged, it is done.
    sb.on_lost(3..3, true);
    assert_eq!(sb.poll_transmit(10), chunk(3..3, true));
    sb.on_acked(0..3, false);
    assert!(!sb.is_fully_acked());
    sb.on_acked(3..3, true);
    assert!(sb.is_fully_acked());
    sb.on_lost(3..3, true);
    assert_eq!(sb.poll_transmit(10), None);
}

#[test]
fn retransmissions_go_first_minus_what_was_acknowledged() {
    let mut sb = SendBuffer::new(100);
    sb.write(&[7; 30]).unwrap();
    for _ in 0..3 {
        sb.poll_transmit(10).unwrap();
    }
    sb.write(&[8; 10]).unwrap();
    // 0..10 and 10..20 were lost; then a retransmission of part of 10..20 got through
    // (an ACK for a packet re-cut differently is possible in general).
    sb.on_lost(0..10, false);
    sb.on_lost(10..20, false);
    sb.on_acked(12..15, false);
    assert_eq!(sb.poll_transmit(8), chunk(0..8, false));
    assert_eq!(sb.poll_transmit(8), chunk(8..12, false));
    assert_eq!(sb.poll_transmit(8), chunk(15..20, false));
    // Then new data.
    assert_eq!(sb.poll_transmit(8), chunk(30..38, false));
    // A loss reported after the bytes were acknowledged is ignored.
    sb.on_acked(20..30, false);
    sb.on_lost(20..30, false);
    assert_eq!(sb.poll_transmit(8), chunk(38..40, false));
    assert_eq!(sb.poll_transmit(8), None);
}

#[test]
fn acknowledged_prefix_frees_memory() {
    let mut sb = SendBuffer::new(100);
    sb.write(&[1; 50]).unwrap();
    for _ in 0..5 {
        sb.poll_transmit(10).unwrap();
    }
    sb.on_acked(20..30, false);
    sb.on_acked(40..50, false);
    assert_eq!((sb.acked_offset(), sb.len()), (0, 50));
    sb.on_acked(0..10, false);
    assert_eq!((sb.acked_offset(), sb.len()), (10, 40));
    // Filling the gap releases everything up to the next gap.
    sb.on_acked(10..20, false);
    assert_eq!((sb.acked_offset(), sb.len()), (30, 20));
    assert!(sb.get(0..10).is_none());
    sb.on_acked(30..40, false);
    assert_eq!((sb.acked_offset(), sb.len()), (50, 0));
    // Acknowledgements of bytes never sent are ignored.
    sb.write(&[2; 10]).unwrap();
    sb.on_acked(50..60, false);
    assert_eq!(sb.acked_offset(), 50);
}

#[test]
fn flow_control_limits_new_data_only() {
    let mut sb = SendBuffer::new(100);
    sb.set_initial_flow_limit(15);
    sb.write(&[0; 40]).unwrap();
    assert_eq!(sb.poll_transmit(10), chunk(0..10, false));
    assert_eq!(sb.poll_transmit(10), chunk(10..15, false));
    assert_eq!(sb.poll_transmit(10), None);
    assert_eq!(sb.blocked(), Some(15));
    // Retransmissions are below the limit and not blocked.
    sb.on_lost(0..10, false);
    assert_eq!(sb.poll_transmit(10), chunk(0..10, false));
    sb.set_flow_limit(12); // lower: ignored
    assert_eq!(sb.flow_limit(), 15);
    sb.set_flow_limit(u64::MAX);
    assert_eq!(sb.flow_limit(), MAX_STREAM_OFFSET);
    assert_eq!(sb.blocked(), None);
    assert_eq!(sb.poll_transmit(100), chunk(15..40, false));
}

#[test]
fn get_spans_the_ring_and_rejects_ranges_not_held() {
    let mut sb = SendBuffer::new(8);
    sb.write(b"abcdefgh").unwrap();
    sb.poll_transmit(8);
    sb.on_acked(0..6, false);
    sb.write(b"ijklmn").unwrap();
    assert_eq!(bytes(&sb, 6..14), b"ghijklmn");
    assert_eq!(bytes(&sb, 9..9), b"");
    assert!(sb.get(5..8).is_none());
    assert!(sb.get(10..15).is_none());
    #[allow(clippy::reversed_empty_ranges)]
    let inverted = 9..7;
    assert!(sb.get(inverted).is_none());
}

#[test]
fn overflowing_range_sets_degrade_to_resending() {
    let mut sb = SendBuffer::new(10_000);
    sb.write(&[5; 10_000]).unwrap();
    while sb.poll_transmit(1).is_some() {}
    // Acknowledge every other byte: far more separate ranges than the sets hold.
    for i in (1..10_000).step_by(2) {
        sb.on_acked(i..i + 1, false);
    }
    // Lose everything else.
    for i in (0..10_000).step_by(2) {
        sb.on_lost(i..i + 1, false);
    }
    // Whatever was forgotten is resent; after resending and acknowledging everything the
    // stream completes.
    let mut rounds = 0;
    while sb.acked_offset() < 10_000 {
        rounds += 1;
        assert!(rounds < 100, "no progress");
        let mut sent = Vec::new();
        while let Some(c) = sb.poll_transmit(100) {
            sent.push(c);
        }
        for c in sent {
            sb.on_acked(c.range, c.fin);
        }
    }
    assert!(sb.is_empty());
}

// ---- RecvBuffer ----

#[test]
fn reassembles_out_of_order_and_ignores_duplicates() {
    let mut rb = RecvBuffer::new(100);
    assert_eq!(rb.write(5, b"fghij", false), Ok(5));
    assert_eq!(rb.readable(), 0);
    assert_eq!(rb.write(0, b"abc", false), Ok(3));
    assert_eq!(rb.readable(), 3);
    // Overlapping both sides: only "de" is new.
    assert_eq!(rb.write(2, b"cdefg", false), Ok(2));
    assert_eq!(rb.write(0, b"abcdefghij", false), Ok(0));
    assert_eq!(read_all(&mut rb), b"abcdefghij");
    // Data below the read offset is a duplicate too.
    assert_eq!(rb.write(3, b"de", false), Ok(0));
    assert_eq!(rb.readable(), 0);
}

#[test]
fn the_first_copy_of_a_byte_wins() {
    let mut rb = RecvBuffer::new(100);
    rb.write(2, b"CD", false).unwrap();
    rb.write(0, b"abcdef", false).unwrap();
    assert_eq!(read_all(&mut rb), b"abCDef");
}

#[test]
fn partial_reads() {
    let mut rb = RecvBuffer::new(100);
    rb.write(0, b"hello world", true).unwrap();
    let mut out = [0; 4];
    assert_eq!(rb.read(&mut out), 4);
    assert_eq!(&out, b"hell");
    assert_eq!(rb.read(&mut out), 4);
    assert_eq!(&out, b"o wo");
    assert!(!rb.is_finished());
    assert_eq!(rb.read(&mut out), 3);
    assert_eq!(&out[..3], b"rld");
    assert_eq!(rb.read(&mut out), 0);
    assert!(rb.is_finished());
}

#[test]
fn flow_control_violations() {
    let mut rb = RecvBuffer::new(10);
    assert_eq!(rb.write(8, b"abc", false), Err(RecvError::FlowControl));
    assert_eq!(rb.write(u64::MAX, b"a", false), Err(RecvError::FlowControl));
    assert_eq!(
        rb.write(u64::MAX - 1, b"", true),
        Err(RecvError::FlowControl)
    );
    assert_eq!(rb.write(7, b"abc", false), Ok(3));
    assert!(RecvError::FlowControl.is_protocol_violation());
}

#[test]
fn final_size_violations() {
    let mut rb = RecvBuffer::new(100);
    rb.write(10, b"xyz", false).unwrap();
    // A FIN below data already received.
    assert_eq!(rb.write(0, b"ab", true), Err(RecvError::FinalSize));
    assert_eq!(rb.write(13, b"", true), Ok(0));
    assert_eq!(rb.fin_offset(), Some(13));
    // The same FIN again is fine, data within it too.
    assert_eq!(rb.write(11, b"yz", true), Ok(0));
    assert_eq!(rb.write(0, b"0123456789", false), Ok(10));
    // A different final size, or data beyond it, is not.
    assert_eq!(rb.write(11, b"yzw", true), Err(RecvError::FinalSize));
    assert_eq!(rb.write(11, b"y", true), Err(RecvError::FinalSize));
    assert_eq!(rb.write(13, b"w", false), Err(RecvError::FinalSize));
    assert_eq!(read_all(&mut rb), b"0123456789xyz");
    assert!(rb.is_finished());
}

#[test]
fn too_many_gaps_are_refused_without_change() {
    let window = 4 * MAX_RECV_RANGES as u64;
    let mut rb = RecvBuffer::new(window);
    for i in 0..MAX_RECV_RANGES as u64 {
        assert_eq!(rb.write(2 * i + 1, b"x", false), Ok(1));
    }
    let before = rb.clone();
    assert_eq!(
        rb.write(window - 1, b"y", true),
        Err(RecvError::TooFragmented)
    );
    assert!(!RecvError::TooFragmented.is_protocol_violation());
    assert_eq!(rb, before);
    // Segments that extend ranges are still accepted; one that joins two ranges makes room
    // for the refused one.
    assert_eq!(rb.write(0, b"z", false), Ok(1));
    assert_eq!(
        rb.write(window - 1, b"y", true),
        Err(RecvError::TooFragmented)
    );
    assert_eq!(rb.write(2, b"z", false), Ok(1));
    assert_eq!(rb.write(window - 1, b"y", true), Ok(1));
}

#[test]
fn window_updates_after_half_a_window_is_read() {
    let mut rb = RecvBuffer::new(100);
    assert_eq!(rb.poll_window_update(), None);
    rb.write(0, &[1; 100], false).unwrap();
    let mut out = [0; 49];
    rb.read(&mut out);
    assert_eq!(rb.poll_window_update(), None);
    rb.read(&mut out[..1]);
    assert_eq!(rb.poll_window_update(), Some(150));
    assert_eq!(rb.max_offset(), 150);
    assert_eq!(rb.poll_window_update(), None);
    // The new limit admits the data.
    assert_eq!(rb.write(100, &[2; 50], false), Ok(50));
    assert_eq!(rb.write(150, &[2; 1], false), Err(RecvError::FlowControl));
    // Once the final size is known, no more updates.
    rb.write(150, &[], true).unwrap();
    read_all(&mut rb);
    assert_eq!(rb.poll_window_update(), None);
}

#[test]
fn buffered_memory_is_bounded_by_the_window() {
    let mut rb = RecvBuffer::new(1000);
    rb.write(999, b"x", false).unwrap();
    assert!(rb.buf.len() <= 1000);
    rb.write(0, &[0; 999], false).unwrap();
    let mut out = vec![0; 600];
    rb.read(&mut out);
    rb.poll_window_update();
    rb.write(1599, b"y", false).unwrap();
    assert!(rb.buf.len() <= 1000);
}

// ---- property tests ----

/// A small deterministic generator so that one proptest `u64` drives a long scenario.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Random segmentation, reordering and duplication of a byte string, with reads of random
    /// sizes interleaved, reassembles it exactly.
    #[test]
    fn reassembly_is_exact(
        data in proptest::collection::vec(any::<u8>(), 0..3000),
        cuts in proptest::collection::vec(0usize..3000, 0..40),
        extra in proptest::collection::vec((0usize..3000, 1usize..400), 0..20),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed | 1);
        let len = data.len();
        let mut bounds: Vec<usize> = cuts.into_iter().filter(|&c| c < len).collect();
        bounds.push(0);
        bounds.push(len);
        bounds.sort_unstable();
        bounds.dedup();
        let mut segments: Vec<(usize, usize)> = bounds.windows(2).map(|w| (w[0], w[1])).collect();
        if len == 0 {
            segments.push((0, 0));
        }
        // Overlapping duplicates cut differently.
        for (start, l) in extra {
            if start < len {
                segments.push((start, (start + l).min(len)));
            }
        }
        // Shuffle.
        for i in (1..segments.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            segments.swap(i, j);
        }
        let mut rb = RecvBuffer::new(len as u64);
        let mut out = Vec::new();
        for &(s, e) in &segments {
            let fin = e == len;
            rb.write(s as u64, &data[s..e], fin).unwrap();
            let mut buf = vec![0; rng.below(500) as usize];
            let n = rb.read(&mut buf);
            out.extend_from_slice(&buf[..n]);
        }
        out.extend(read_all(&mut rb));
        prop_assert_eq!(out, data);
        prop_assert!(rb.is_finished());
    }

    /// A sender and a receiver over a channel that loses, duplicates and reorders packets,
    /// with random packet sizes, application writes, reads and flow-control updates: every
    /// byte arrives exactly once and in order, and both ends finish.
    #[test]
    fn send_and_receive_over_a_lossy_channel(
        data in proptest::collection::vec(any::<u8>(), 0..4000),
        seed in any::<u64>(),
        loss_percent in 0u64..50,
    ) {
        let mut rng = Rng(seed | 1);
        let mut sb = SendBuffer::new(16 + rng.below(1500) as usize);
        let window = 16 + rng.below(2000);
        sb.set_initial_flow_limit(window);
        let mut rb = RecvBuffer::new(window);
        let mut written = 0;
        let mut out = Vec::new();
        // Packets in flight: (chunk, bytes).
        let mut in_flight: Vec<(StreamChunk, Vec<u8>)> = Vec::new();
        for step in 0..100_000 {
            prop_assert!(step < 99_999, "no progress");
            if written < data.len() {
                let n = rng.below(700) as usize + 1;
                written += sb.write(&data[written..(written + n).min(data.len())]).unwrap();
            }
            if written == data.len() {
                sb.finish();
            }
            prop_assert_eq!(sb.has_pending(), sb.clone().poll_transmit(usize::MAX).is_some());
            for _ in 0..rng.below(4) {
                let Some(c) = sb.poll_transmit(rng.below(300) as usize) else { break };
                let (a, b) = sb.get(c.range.clone()).unwrap();
                in_flight.push((c, [a, b].concat()));
            }
            // Deliver, lose or keep each packet; reorder by picking at random.
            for _ in 0..rng.below(in_flight.len() as u64 + 1) {
                let i = rng.below(in_flight.len() as u64) as usize;
                let (c, payload) = in_flight.swap_remove(i);
                if rng.below(100) < loss_percent {
                    sb.on_lost(c.range, c.fin);
                    continue;
                }
                match rb.write(c.range.start, &payload, c.fin) {
                    Ok(_) => {}
                    Err(e) => prop_assert!(false, "receiver rejected {:?}: {}", c, e),
                }
                if rng.below(10) == 0 {
                    // A duplicate that arrives later.
                    in_flight.push((c.clone(), payload));
                } else if rng.below(100) < loss_percent {
                    // The ACK is lost: the sender eventually declares the packet lost.
                    sb.on_lost(c.range, c.fin);
                } else {
                    sb.on_acked(c.range, c.fin);
                }
            }
            let mut buf = vec![0; rng.below(800) as usize];
            let n = rb.read(&mut buf);
            out.extend_from_slice(&buf[..n]);
            if let Some(limit) = rb.poll_window_update() {
                sb.set_flow_limit(limit);
            }
            if sb.is_fully_acked() && rb.is_finished() && written == data.len() {
                break;
            }
        }
        prop_assert_eq!(out, data);
        prop_assert!(sb.is_empty());
    }
}

// ---- RecvBuffer against a byte-level model ----

/// The receive side specified byte by byte, the slow and obvious way: which offsets arrived
/// (with the first copy's value), the read offset, the limits. The rules it encodes are
/// those documented on [`RecvBuffer::write`] and [`MAX_RECV_RANGES`].
#[derive(Clone, Debug)]
struct RecvModel {
    /// Received bytes at offsets at or above `read`.
    bytes: std::collections::BTreeMap<u64, u8>,
    read: u64,
    max_offset: u64,
    window: u64,
    fin: Option<u64>,
    highest: u64,
    max_ranges: usize,
}

impl RecvModel {
    fn new(window: u64, max_ranges: usize) -> RecvModel {
        RecvModel {
            bytes: Default::default(),
            read: 0,
            max_offset: window,
            window,
            fin: None,
            highest: 0,
            max_ranges,
        }
    }

    fn contiguous(&self) -> u64 {
        let mut c = self.read;
        while self.bytes.contains_key(&c) {
            c += 1;
        }
        c
    }

    /// Runs of consecutive received offsets, with `extra` added.
    fn runs_with(&self, extra: Range<u64>) -> usize {
        let mut all: Vec<u64> = self.bytes.keys().copied().chain(extra).collect();
        all.sort_unstable();
        all.dedup();
        all.windows(2).filter(|w| w[1] != w[0] + 1).count() + usize::from(!all.is_empty())
    }

    fn write(&mut self, offset: u64, data: &[u8], fin: bool) -> Result<usize, RecvError> {
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(RecvError::FlowControl)?;
        if end > self.max_offset {
            return Err(RecvError::FlowControl);
        }
        match self.fin {
            Some(size) if end > size || (fin && end != size) => return Err(RecvError::FinalSize),
            None if fin && end < self.highest => return Err(RecvError::FinalSize),
            _ => {}
        }
        let contiguous = self.contiguous();
        if offset > contiguous && offset < end {
            let before = self.runs_with(0..0);
            let after = self.runs_with(offset..end);
            if after > before && after > self.max_ranges {
                return Err(RecvError::TooFragmented);
            }
        }
        let mut new = 0;
        for (i, &b) in data.iter().enumerate() {
            let o = offset + i as u64;
            if o >= self.read && !self.bytes.contains_key(&o) {
                self.bytes.insert(o, b);
                new += 1;
            }
        }
        if fin {
            self.fin = Some(end);
        }
        self.highest = self.highest.max(end);
        Ok(new)
    }

    fn read(&mut self, max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while out.len() < max {
            match self.bytes.remove(&self.read) {
                Some(b) => {
                    out.push(b);
                    self.read += 1;
                }
                None => break,
            }
        }
        out
    }

    fn poll_window_update(&mut self) -> Option<u64> {
        if self.fin.is_some() {
            return None;
        }
        let limit = self.read + self.window;
        if limit - self.max_offset >= self.window.div_ceil(2).max(1) {
            self.max_offset = limit;
            Some(limit)
        } else {
            None
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random writes (in order, just ahead, overlapping the contiguous end, far ahead, beyond
    /// the limit, duplicates with different bytes, FINs), reads and window updates: the
    /// buffer (fast path and general path alike) returns exactly what the model does, byte
    /// for byte, and an error leaves it unchanged.
    #[test]
    fn recv_buffer_matches_the_model(
        seed in any::<u64>(),
        window in 1u64..600,
        max_ranges in prop_oneof![1usize..6, Just(MAX_RECV_RANGES)],
        steps in 1usize..300,
    ) {
        let mut rng = Rng(seed | 1);
        let mut rb = RecvBuffer::with_max_ranges(window, max_ranges);
        let mut model = RecvModel::new(window, max_ranges);
        for _ in 0..steps {
            match rng.below(10) {
                0..=6 => {
                    let contiguous = model.contiguous();
                    let offset = match rng.below(8) {
                        // At the contiguous end (the fast path when nothing is out of order).
                        0..=2 => contiguous,
                        // Straddling it.
                        3 => contiguous.saturating_sub(rng.below(20)),
                        // Just ahead, leaving a gap.
                        4 | 5 => contiguous + 1 + rng.below(40),
                        // Anywhere in (or past) the window, or already read.
                        6 => rng.below(model.max_offset + 20),
                        _ => model.read.saturating_sub(rng.below(30)),
                    };
                    let len = match rng.below(6) {
                        0 => 0,
                        1 => 1 + rng.below(3),
                        _ => rng.below(80),
                    };
                    // A FIN: sometimes at the limit, sometimes wherever the segment ends.
                    let (offset, len, fin) = match rng.below(20) {
                        0 => (offset, model.max_offset.saturating_sub(offset), true),
                        1 => (offset, len, true),
                        _ => (offset, len, false),
                    };
                    // The byte at offset o of copy c: duplicates carry different bytes, so the
                    // model sees which copy won.
                    let copy = rng.below(256);
                    let data: Vec<u8> =
                        (offset..offset + len).map(|o| (o.wrapping_mul(31) ^ copy) as u8).collect();
                    let before = rb.clone();
                    let got = rb.write(offset, &data, fin);
                    prop_assert_eq!(got, model.write(offset, &data, fin));
                    if got.is_err() {
                        prop_assert_eq!(&rb, &before);
                    }
                }
                7 | 8 => {
                    let mut out = vec![0; rng.below(120) as usize];
                    let n = rb.read(&mut out);
                    prop_assert_eq!(&out[..n], &model.read(out.len())[..]);
                }
                _ => prop_assert_eq!(rb.poll_window_update(), model.poll_window_update()),
            }
            prop_assert_eq!(rb.readable(), model.contiguous() - model.read);
            prop_assert_eq!(rb.read_offset(), model.read);
            prop_assert_eq!(rb.fin_offset(), model.fin);
            prop_assert_eq!(rb.is_finished(), model.fin == Some(model.read));
            prop_assert_eq!(rb.max_offset(), model.max_offset);
            // Never more out-of-order ranges than the bound, and the buffer within a window.
            prop_assert!(rb.out_of_order.len() <= max_ranges);
            prop_assert!(rb.buf.len() as u64 <= rb.max_offset - rb.read);
        }
    }
}

#[test]
fn in_order_data_is_accepted_even_when_fragmented() {
    // Two out-of-order ranges fill a bound of two; the application has read everything, so
    // the next bytes in order start a new range. They are accepted (refusing them would
    // stall the stream), and the ranges they reach are absorbed.
    let mut rb = RecvBuffer::with_max_ranges(100, 2);
    rb.write(0, b"ab", false).unwrap();
    read_all(&mut rb);
    assert_eq!(rb.write(10, b"k", false), Ok(1));
    assert_eq!(rb.write(20, b"u", false), Ok(1));
    assert_eq!(rb.write(30, b"!", false), Err(RecvError::TooFragmented));
    assert_eq!(rb.write(2, b"cd", false), Ok(2));
    // Prefix plus two ranges: out-of-order segments that add a range are refused, ones that
    // merge are not.
    assert_eq!(rb.write(30, b"!", false), Err(RecvError::TooFragmented));
    assert_eq!(rb.write(11, b"l", false), Ok(1));
    assert_eq!(rb.write(4, b"efghij", false), Ok(6));
    assert_eq!(read_all(&mut rb), b"cdefghijkl");
    assert_eq!(rb.write(30, b"!", false), Ok(1));
}
