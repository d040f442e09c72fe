//! A `Protector` pair from the public API, driven by the fuzz input: arbitrary bytes opened,
//! sealed packets mutated in flight, replayed, reflected, presented in the other packet-number
//! space, delivered out of order, with key updates at fuzz-chosen intervals, in both modes.
//!
//! Invariants (asserted):
//! * `open` never panics, whatever the bytes and the header length it is told;
//! * `open` returns `Ok` only for bytes the peer sealed, in the space it sealed them in, never
//!   twice for one packet number of one space, and then hands back exactly the payload sealed;
//! * a failed `open` leaves the flow's secrets as they were;
//! * in-order delivery, with losses but without reordering, always opens, whatever the key
//!   updates on either side (each end learning what the peer acknowledged at fuzz-chosen times) (whatever the key updates on either side).
#![no_main]

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serval_engine::connection::protect::{
    FlowSecrets, KeyExchange, Protection, Protector, Space, TAG_LEN, Transcript,
};
use serval_engine::frame::PN_LEN;
use serval_wire::ext::{ControlFlags, ControlRepr};
use serval_wire::{FlowId, Nonce, Protocol, SalRepr, ServiceId};

/// The secrets of both ends (client, server) in one mode: derived once per process, since the
/// X25519 exchange is not what this target is about.
fn secrets(protection: Protection) -> &'static (FlowSecrets, FlowSecrets) {
    static ENC: OnceLock<(FlowSecrets, FlowSecrets)> = OnceLock::new();
    static PLAIN: OnceLock<(FlowSecrets, FlowSecrets)> = OnceLock::new();
    let cell = match protection {
        Protection::Encrypted => &ENC,
        Protection::Plaintext => &PLAIN,
    };
    cell.get_or_init(|| {
        let c = KeyExchange::new([1; 32]);
        let s = KeyExchange::new([2; 32]);
        let (cs, ss) = (c.share(0), s.share(0));
        let service = ServiceId([3; 32]);
        let (cn, sn) = (Nonce([4; 16]), Nonce([5; 16]));
        let t = Transcript {
            service: &service,
            client_flow: FlowId(10),
            client_nonce: &cn,
            client_share: &cs,
            server_flow: FlowId(20),
            server_nonce: &sn,
            server_share: &ss,
        };
        let dc = c.agree(&ss).expect("contributory");
        let ds = s.agree(&cs).expect("contributory");
        assert_eq!(dc, ds);
        (
            FlowSecrets::derive(true, protection, &dc, &t),
            FlowSecrets::derive(false, protection, &ds, &t),
        )
    })
}

/// The headers each end puts on its packets: (data, control).
fn headers(side: usize) -> &'static (Vec<u8>, Vec<u8>) {
    static H: OnceLock<[(Vec<u8>, Vec<u8>); 2]> = OnceLock::new();
    &H.get_or_init(|| {
        let mk = |src: u64, dst: u64| {
            let data = SalRepr::new(Protocol::STREAM, FlowId(src), FlowId(dst))
                .to_bytes(&[])
                .expect("header");
            let mut r = SalRepr::new(Protocol::NONE, FlowId(src), FlowId(dst));
            r.control = Some(ControlRepr {
                flags: ControlFlags::ACK,
                verno: 7,
                ackno: 9,
            });
            (data, r.to_bytes(&[]).expect("header"))
        };
        [mk(10, 20), mk(20, 10)]
    })[side]
}

/// `PROTECT_TRACE=1`: print every step (for minimised crashes).
fn trace() -> bool {
    static T: OnceLock<bool> = OnceLock::new();
    *T.get_or_init(|| std::env::var_os("PROTECT_TRACE").is_some())
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
}

/// A packet one end sealed for the other.
struct Sent {
    bytes: Vec<u8>,
    space: Space,
    header_len: usize,
    pn: u64,
    payload: Vec<u8>,
    /// The peer opened it.
    opened: bool,
    /// Lost in flight (may still arrive late, out of order).
    lost: bool,
}

struct Side {
    prot: Protector,
    next_data_pn: u64,
    /// What this end sealed, in order.
    sent: Vec<Sent>,
    /// Bytes sealed by this end, per space, to their index in `sent`.
    index: HashMap<(u8, Vec<u8>), usize>,
    /// Packet numbers of the peer's packets this end opened, per space.
    opened: HashSet<(u8, u64)>,
}

fn space_of(control: bool) -> Space {
    Space::of(control)
}

fn seal(side: &mut Side, who: usize, control: bool, payload: Vec<u8>, pn_gap: u64) {
    let (data_hdr, ctl_hdr) = headers(who);
    let (space, header_len, bytes, pn, payload) = if control {
        let mut out = vec![0xaa; 3];
        out.extend_from_slice(ctl_hdr);
        side.prot.seal_control(&mut out, 3, ctl_hdr.len());
        assert_eq!(&out[..3], &[0xaa; 3], "seal wrote before its base");
        let bytes = out.split_off(3);
        assert_eq!(bytes.len(), ctl_hdr.len() + PN_LEN + TAG_LEN);
        let mut pn = [0u8; PN_LEN];
        pn.copy_from_slice(&bytes[ctl_hdr.len()..][..PN_LEN]);
        (
            Space::Control,
            ctl_hdr.len(),
            bytes,
            u64::from_be_bytes(pn),
            Vec::new(),
        )
    } else {
        let Some(pn) = side.next_data_pn.checked_add(pn_gap) else {
            return;
        };
        if pn == u64::MAX {
            return;
        }
        side.next_data_pn = pn + 1;
        let mut out = data_hdr.clone();
        out.extend_from_slice(&pn.to_be_bytes());
        out.extend_from_slice(&payload);
        side.prot.seal(&mut out, 0, data_hdr.len());
        assert_eq!(out.len(), data_hdr.len() + PN_LEN + payload.len() + TAG_LEN);
        if side.prot.protection() == Protection::Encrypted && payload.len() >= 16 {
            // 16 bytes of payload left in clear by chance: 2^-128.
            assert_ne!(
                &out[data_hdr.len() + PN_LEN..][..payload.len()],
                &payload[..],
                "the payload went out in clear"
            );
        }
        (Space::Data, data_hdr.len(), out, pn, payload)
    };
    if trace() {
        eprintln!(
            "side {who} seals #{} {space:?} pn {pn} phase {} ({:?})",
            side.sent.len(),
            bytes[0] & 1,
            side.prot
        );
    }
    side.index
        .insert((space as u8, bytes.clone()), side.sent.len());
    side.sent.push(Sent {
        bytes,
        space,
        header_len,
        pn,
        payload,
        opened: false,
        lost: false,
    });
}

/// Opens `bytes` at `rx` (sent by `tx`) in `space` with `header_len`, checking the invariants.
/// `must_open`: the delivery is lossless and in order, so it has to succeed.
fn deliver(
    rx: &mut Side,
    tx: &mut Side,
    mut bytes: Vec<u8>,
    header_len: usize,
    space: Space,
    must_open: bool,
) {
    let original = bytes.clone();
    let before = rx.prot.secrets().clone();
    let stats = rx.prot.stats;
    let result = rx.prot.open(&mut bytes, header_len, space);
    if trace() {
        eprintln!(
            "  deliver {space:?} ({} bytes, phase {}, must_open {must_open}): {result:?} -> {:?}",
            original.len(),
            original.first().map_or(0, |b| b & 1),
            rx.prot
        );
    }
    match result {
        Ok((pn, len)) => {
            let Some(&i) = tx.index.get(&(space as u8, original)) else {
                panic!("opened bytes the peer never sealed (space {space:?}, header {header_len})");
            };
            let sent = &mut tx.sent[i];
            assert_eq!(
                sent.header_len, header_len,
                "opened with another header length"
            );
            assert_eq!(pn, sent.pn, "opened as another packet number");
            assert!(
                rx.opened.insert((space as u8, pn)),
                "packet {pn} of {space:?} opened twice"
            );
            assert_eq!(
                &bytes[header_len + PN_LEN..][..len],
                &sent.payload[..],
                "opened to another payload"
            );
            sent.opened = true;
            assert_eq!(rx.prot.stats.opened, stats.opened + 1);
        }
        Err(e) => {
            assert!(!must_open, "an in-order packet did not open: {e:?}");
            assert_eq!(
                rx.prot.secrets(),
                &before,
                "a packet that did not open changed the keys"
            );
            assert_eq!(rx.prot.stats.opened, stats.opened);
        }
    }
}

/// Whether delivering `tx.sent[i]` now is in order: every packet before it opened or lost, none
/// after it opened, and not opened itself. (Before 72825bc a loss could kill a direction: see
/// fuzz/README.md, "Finds", 2.)
fn in_order(tx: &Side, i: usize) -> bool {
    tx.sent[..i].iter().all(|s| s.opened || s.lost) && tx.sent[i..].iter().all(|s| !s.opened)
}

fn mutate(input: &mut Input<'_>, p: &mut Vec<u8>, other: &[u8]) {
    let len = p.len().max(1);
    match input.u8() % 9 {
        0 => {
            let bit = usize::from(input.u16()) % (p.len() * 8).max(1);
            if let Some(b) = p.get_mut(bit / 8) {
                *b ^= 1 << (bit % 8);
            }
        }
        1 => {
            let at = usize::from(input.u16()) % len;
            let v = input.u8();
            if let Some(b) = p.get_mut(at) {
                *b = v;
            }
        }
        2 => p.truncate(usize::from(input.u16()) % len),
        3 => {
            let n = usize::from(input.u8() % 17);
            let extra = input.bytes(n);
            p.extend_from_slice(&extra);
        }
        4 => {
            let at = usize::from(input.u16()) % (p.len() + 1);
            let n = usize::from(input.u8() % 17);
            let extra = input.bytes(n);
            p.splice(at..at, extra);
        }
        5 => {
            let at = usize::from(input.u16()) % len;
            let n = usize::from(input.u8() % 17);
            let end = (at + n).min(p.len());
            if at < end {
                p.drain(at..end);
            }
        }
        6 => {
            // Another packet's tag.
            if p.len() >= TAG_LEN && other.len() >= TAG_LEN {
                let n = p.len();
                p[n - TAG_LEN..].copy_from_slice(&other[other.len() - TAG_LEN..]);
            }
        }
        7 => {
            // Another packet's packet number (its tag stays ours).
            let at = 20;
            if p.len() >= at + PN_LEN && other.len() >= at + PN_LEN {
                p[at..at + PN_LEN].copy_from_slice(&other[at..at + PN_LEN]);
            }
        }
        _ => {
            // The key phase bit.
            if let Some(b) = p.first_mut() {
                *b ^= 0x01;
            }
        }
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
    let interval = |b: u8| {
        if b == 0 {
            u64::MAX
        } else {
            u64::from(b % 16) + 1
        }
    };
    let (cs, ss) = secrets(protection);
    let mut sides = [
        Side {
            prot: Protector::new(cs.clone(), interval(input.u8())),
            next_data_pn: 0,
            sent: Vec::new(),
            index: HashMap::new(),
            opened: HashSet::new(),
        },
        Side {
            prot: Protector::new(ss.clone(), interval(input.u8())),
            next_data_pn: 0,
            sent: Vec::new(),
            index: HashMap::new(),
            opened: HashSet::new(),
        },
    ];
    let mut ops = 0;
    while !input.0.is_empty() && ops < 256 {
        ops += 1;
        let op = input.u8();
        let who = usize::from(op >> 7);
        let [c, s] = &mut sides;
        let (me, peer) = if who == 0 { (c, s) } else { (s, c) };
        match op & 0x7f {
            // Seal a data packet, with a fuzz-chosen gap in the packet numbers.
            0..=29 => {
                let gap = match input.u8() {
                    255 => u64::from(input.u16()) << 16,
                    g => u64::from(g % 4),
                };
                let n = usize::from(input.u8() % 48);
                let payload = input.bytes(n);
                seal(me, who, false, payload, gap);
            }
            // Seal a control packet.
            30..=44 => seal(me, who, true, Vec::new(), 0),
            // Deliver the first packet not yet delivered (in order unless something was lost or
            // reordered before).
            45..=69 => {
                if let Some(i) = me.sent.iter().position(|s| !s.opened && !s.lost) {
                    let must = in_order(me, i);
                    let s = &me.sent[i];
                    let (b, h, sp) = (s.bytes.clone(), s.header_len, s.space);
                    deliver(peer, me, b, h, sp, must);
                }
            }
            // Deliver any packet (again, or out of order).
            70..=84 => {
                if !me.sent.is_empty() {
                    let i = usize::from(input.u16()) % me.sent.len();
                    let must = in_order(me, i);
                    let s = &me.sent[i];
                    let (b, h, sp) = (s.bytes.clone(), s.header_len, s.space);
                    deliver(peer, me, b, h, sp, must);
                }
            }
            // Drop (lose) the first packet not yet delivered.
            85..=89 => {
                if let Some(s) = me.sent.iter_mut().find(|s| !s.opened && !s.lost) {
                    s.lost = true;
                    if trace() {
                        eprintln!("  side {who}: {:?} pn {} lost", s.space, s.pn);
                    }
                }
            }
            // A mutated packet: must not open unless the mutation is the identity (or, by
            // chance, turned it into another packet the peer sealed).
            90..=109 => {
                if !me.sent.is_empty() {
                    let i = usize::from(input.u16()) % me.sent.len();
                    let j = usize::from(input.u8()) % me.sent.len();
                    let other = me.sent[j].bytes.clone();
                    let s = &me.sent[i];
                    let (mut b, h, sp) = (s.bytes.clone(), s.header_len, s.space);
                    mutate(&mut input, &mut b, &other);
                    let must = b == s.bytes && in_order(me, i);
                    deliver(peer, me, b, h, sp, must);
                }
            }
            // Reflected back to its sender: the directions' keys differ.
            110..=114 => {
                if !me.sent.is_empty() {
                    let i = usize::from(input.u16()) % me.sent.len();
                    let s = &me.sent[i];
                    let mut b = s.bytes.clone();
                    let before = me.prot.stats.opened;
                    assert!(
                        me.prot.open(&mut b, s.header_len, s.space).is_err(),
                        "a packet opened at its own sender"
                    );
                    assert_eq!(me.prot.stats.opened, before);
                }
            }
            // In the other space: another nonce, never opens.
            115..=119 => {
                if !me.sent.is_empty() {
                    let i = usize::from(input.u16()) % me.sent.len();
                    let s = &me.sent[i];
                    let other = match s.space {
                        Space::Data => Space::Control,
                        Space::Control => Space::Data,
                    };
                    let (b, h) = (s.bytes.clone(), s.header_len);
                    deliver(peer, me, b, h, other, false);
                }
            }
            // The transport's acknowledgments: this end learns the largest of its data packets
            // the peer opened (a key update waits for one of the current phase).
            120..=122 => {
                let acked = me
                    .sent
                    .iter()
                    .filter(|s| s.opened && s.space == Space::Data)
                    .map(|s| s.pn)
                    .max();
                me.prot.peer_acked(acked);
            }
            // Arbitrary bytes with an arbitrary header length, in either space.
            _ => {
                let n = usize::from(input.u8());
                let b = input.bytes(n);
                let h = usize::from(input.u8()) % (b.len() + 8);
                let sp = space_of(op & 1 == 1);
                deliver(peer, me, b, h, sp, false);
            }
        }
    }
});
