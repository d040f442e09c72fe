//! The transport and the control channel behind the packet protection: a live flow between a
//! real server `Endpoint` and a hand-made client holding the flow's keys (as
//! `crates/engine/tests/edges.rs` builds it), and fuzz-chosen packets sealed with those keys —
//! stream packets of fuzz-built frames (STREAM, ACK, PING, MAX_DATA, DATAGRAM, CLOSE, PADDING,
//! raw bytes) at fuzz-chosen packet numbers, control packets with any flags, vernos and acknos,
//! raw headers sealed as they come, replays — with the server's application writing, reading
//! and finishing in between, time passing, and the client's keys updating at fuzz-chosen
//! intervals.
//!
//! Checks:
//! * nothing panics;
//! * every packet the server sends on the flow opens with the client's keys (it never seals
//!   with keys its peer does not hold, never reuses a packet number);
//! * a replayed packet is dropped and counted, and answered with nothing;
//! * every byte the server's application reads is a byte the client sent at that offset of
//!   the stream, and the stream ends (if it does) where a FIN said it ends.
#![no_main]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{A, Input, LiveFlow, loc};
use libfuzzer_sys::fuzz_target;
use serval_engine::connection::protect::{DEFAULT_KEY_UPDATE_INTERVAL, Protection};
use serval_engine::endpoint::{EndpointStats, Event};
use serval_engine::frame::{self, AckFrame};
use serval_wire::ext::ControlFlags;

/// Bytes sent on the stream: every value sent at each offset, and the FIN offsets.
#[derive(Default)]
struct Sent {
    bytes: HashMap<u64, [u64; 4]>,
    fins: Vec<u64>,
}

impl Sent {
    /// Records the STREAM frames of a packet's payload (after the packet number) as the
    /// transport's own parser reads them: raw bytes and fuzz-written headers can hold STREAM
    /// frames too.
    fn record_frames(&mut self, payload: &[u8]) {
        for f in frame::Frames::new(payload) {
            match f {
                Ok(frame::Frame::Stream { offset, data, fin }) => self.record(offset, data, fin),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }

    fn record(&mut self, offset: u64, data: &[u8], fin: bool) {
        for (i, b) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i as u64) else {
                return;
            };
            self.bytes.entry(o).or_default()[usize::from(*b >> 6)] |= 1 << (b & 63);
        }
        if fin {
            self.fins.push(offset.saturating_add(data.len() as u64));
        }
    }
    fn was_sent(&self, offset: u64, b: u8) -> bool {
        self.bytes
            .get(&offset)
            .is_some_and(|s| s[usize::from(b >> 6)] & (1 << (b & 63)) != 0)
    }
}

fn dropped(s: &EndpointStats) -> u64 {
    s.replays + s.auth_failures + s.unknown_flow + s.malformed
}

fn varint(input: &mut Input<'_>) -> u64 {
    match input.u8() % 4 {
        0 => u64::from(input.u8()),
        1 => u64::from(input.u16()),
        2 => u64::from(input.u32()),
        _ => input.u64() & frame::VARINT_MAX,
    }
}

/// A stream packet's frames, built from the input.
fn frames(input: &mut Input<'_>, sent: &mut Sent, next_offset: &mut u64) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..=(input.u8() % 4) {
        match input.u8() % 9 {
            0 | 1 => {
                // STREAM: mostly where the stream is, sometimes anywhere.
                let offset = match input.u8() % 4 {
                    0 => varint(input),
                    1 => next_offset.saturating_sub(u64::from(input.u8())),
                    _ => *next_offset,
                };
                let n = usize::from(input.u8());
                let data = input.bytes(n);
                let fin = input.u8() % 8 == 0;
                frame::write_stream(&mut out, offset, &data, fin);
                sent.record(offset, &data, fin);
                *next_offset = (*next_offset).max(offset.saturating_add(data.len() as u64));
            }
            2 => frame::write_ping(&mut out),
            3 => {
                let mut ranges = Vec::new();
                let mut hi = varint(input);
                for _ in 0..=(input.u8() % 4) {
                    let lo = hi.saturating_sub(u64::from(input.u8()));
                    ranges.push((lo, hi));
                    let gap = u64::from(input.u8()) + 2;
                    match lo.checked_sub(gap) {
                        Some(h) => hi = h,
                        None => break,
                    }
                }
                AckFrame {
                    ranges,
                    delay_micros: varint(input),
                }
                .write(&mut out);
            }
            4 => frame::write_max_data(&mut out, varint(input)),
            5 => {
                let n = usize::from(input.u8());
                let d = input.bytes(n);
                frame::write_datagram(&mut out, &d);
            }
            6 => {
                let n = usize::from(input.u8() % 32);
                let r = String::from_utf8_lossy(&input.bytes(n)).into_owned();
                frame::write_close(&mut out, varint(input), &r);
            }
            7 => frame::write_padding(&mut out, usize::from(input.u8())),
            _ => {
                let n = usize::from(input.u8() % 64);
                out.extend_from_slice(&input.bytes(n));
            }
        }
    }
    out
}

struct State {
    flow: LiveFlow,
    sent: Sent,
    read: u64,
    ended: bool,
    /// Sealed packets already delivered, for replays.
    delivered: Vec<Vec<u8>>,
}

impl State {
    /// Whatever the server has to send: each packet of the flow must open at the client.
    fn drain(&mut self) {
        let now = self.flow.now;
        while let Some(t) = self.flow.server.poll_transmit(now) {
            assert_eq!(t.dst, loc(A), "the server sent somewhere else");
            let Some(r) = common::parse(&t.payload) else {
                panic!("the server sent a malformed packet");
            };
            if r.dst_flow == self.flow.cflow {
                assert!(
                    self.flow.open(&t.payload).is_some(),
                    "a packet of the server's does not open with the client's keys: {r}"
                );
            }
        }
    }

    /// Delivers a sealed packet; `replayable`: a well-formed stream or control packet, which a
    /// replay of must be dropped as one.
    fn deliver(&mut self, bytes: Vec<u8>, replayable: bool) {
        self.flow.deliver(&bytes);
        if replayable {
            self.delivered.push(bytes);
        }
        self.drain();
    }

    /// Reads what the application can, checking every byte against what was sent.
    fn read(&mut self) {
        let mut buf = [0u8; 512];
        loop {
            match self.flow.server.read(self.flow.sh, &mut buf) {
                Ok(Some(0)) => {
                    if !self.ended {
                        assert!(
                            self.sent.fins.contains(&self.read),
                            "the stream ended at {} where no FIN said so",
                            self.read
                        );
                        self.ended = true;
                    }
                    break;
                }
                Ok(Some(n)) => {
                    assert!(!self.ended, "bytes after the end of the stream");
                    for (i, b) in buf[..n].iter().enumerate() {
                        let o = self.read + i as u64;
                        assert!(
                            self.sent.was_sent(o, *b),
                            "byte {o} read as {b}, never sent so"
                        );
                    }
                    self.read += n as u64;
                }
                _ => break,
            }
        }
        self.drain();
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let cfg = input.u8();
    let protection = if cfg & 1 == 0 {
        Protection::Encrypted
    } else {
        Protection::Plaintext
    };
    let interval = match cfg >> 1 {
        0 => DEFAULT_KEY_UPDATE_INTERVAL,
        n => u64::from(n % 8) + 1,
    };
    let Some(flow) = LiveFlow::new(protection, interval) else {
        panic!("the handshake did not complete");
    };
    let mut st = State {
        flow,
        sent: Sent::default(),
        read: 0,
        ended: false,
        delivered: Vec::new(),
    };
    st.drain();
    let mut pn: u64 = 0;
    let mut next_offset = 0u64;
    let mut steps = 0;
    while !input.is_empty() && steps < 48 {
        steps += 1;
        match input.u8() % 12 {
            0..=4 => {
                pn = match input.u8() % 8 {
                    0 => pn.saturating_sub(u64::from(input.u8())),
                    1 => input.u64(),
                    2 => pn.saturating_add(u64::from(input.u16())),
                    _ => pn.saturating_add(1),
                };
                let f = frames(&mut input, &mut st.sent, &mut next_offset);
                st.sent.record_frames(&f);
                let p = st.flow.stream(pn, &f);
                st.deliver(p, true);
            }
            5 | 6 => {
                let flags = match input.u8() % 6 {
                    0 => ControlFlags::from_bits_truncate(input.u16()),
                    1 => ControlFlags::ACK,
                    2 => ControlFlags::FIN,
                    3 => ControlFlags::RSYN,
                    4 => ControlFlags::RST,
                    _ => ControlFlags::FIN | ControlFlags::ACK,
                };
                let ackno = match input.u8() % 3 {
                    0 => input.u32(),
                    _ => st.flow.server_verno.wrapping_add(1),
                };
                let verno = match input.u8() % 3 {
                    0 => Some(input.u32()),
                    _ => None,
                };
                let p = st.flow.control(flags, ackno, verno);
                st.deliver(p, true);
            }
            7 => {
                // A header as the fuzz writes it, on the flow's flowIDs, sealed as it comes.
                let n = usize::from(input.u8());
                let mut raw = input.bytes(n);
                let mut base = serval_wire::SalRepr::new(
                    serval_wire::Protocol::STREAM,
                    st.flow.cflow,
                    st.flow.sflow,
                )
                .to_bytes(&[])
                .expect("header");
                if raw.len() >= 4 {
                    // Version, flags, protocol and header length from the input.
                    base[..4].copy_from_slice(&raw[..4]);
                    raw.drain(..4);
                }
                base.extend_from_slice(&raw);
                if let Some(hl) = common::header_len(&base) {
                    if let Some(payload) = base.get(hl + 8..) {
                        let payload = payload.to_vec();
                        st.sent.record_frames(&payload);
                    }
                }
                let p = st.flow.seal_raw(base);
                st.deliver(p, false);
            }
            8 => {
                if !st.delivered.is_empty() {
                    let i = usize::from(input.u16()) % st.delivered.len();
                    let p = st.delivered[i].clone();
                    let before = dropped(&st.flow.server.stats());
                    st.flow.deliver(&p);
                    assert_eq!(
                        dropped(&st.flow.server.stats()),
                        before + 1,
                        "a replayed packet was not dropped"
                    );
                    st.drain();
                }
            }
            9 => {
                let ms = u64::from(input.u16() % 3000);
                st.flow.now += Duration::from_millis(ms);
                let now = st.flow.now;
                st.flow.server.handle_timeout(now);
                st.drain();
            }
            10 => {
                let n = usize::from(input.u8()) * 16;
                let _ = st.flow.server.write(st.flow.sh, &vec![0x5a; n]);
                if input.u8() % 4 == 0 {
                    let _ = st.flow.server.finish(st.flow.sh);
                }
                st.drain();
            }
            _ => st.read(),
        }
        for e in common::events(&mut st.flow.server) {
            if let Event::Closed(h, _) = e {
                assert_eq!(h, st.flow.sh, "another connection closed");
            }
        }
    }
    st.read();
});
