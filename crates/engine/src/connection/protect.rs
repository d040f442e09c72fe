//! Packet protection: the key exchange, the key schedule, sealing and opening every packet of a
//! flow after its SYN, replay protection and key update.
//!
//! This module is the one place where a flow's packets are sealed (after the transport or the
//! control channel built them) and opened (before either looks at them). The design, with the
//! reasons, is in `docs/moving-flows.md` §1; the byte layout in `docs/wire.md` §12; what it
//! protects against in `docs/security.md`.
//!
//! # Handshake
//!
//! The SYN and the SYN-ACK each carry a KEYSHARE: an ephemeral X25519 public key. Both ends
//! compute the shared secret and derive, with HKDF-SHA256 (RFC 5869) in the shape of TLS 1.3's
//! `HKDF-Expand-Label`:
//!
//! ```text
//! th    = SHA-256("serval2 transcript" || serviceID || client flowID || client nonce ||
//!                 client KEYSHARE body || server flowID || server nonce || server KEYSHARE body)
//! prk   = HKDF-Extract(salt = "serval-v2", ikm = X25519 secret || client nonce || server nonce)
//! c_ts0 = Expand-Label(prk, "c traffic", th, 32)      client → server, key phase 0
//! s_ts0 = Expand-Label(prk, "s traffic", th, 32)      server → client
//! ctl   = Expand-Label(prk, "control", th, 32)        for proofs of later path joins and moves
//! key   = Expand-Label(ts, "key", "", 32);  iv = Expand-Label(ts, "iv", "", 12)
//! Expand-Label(s, label, ctx, n) = HKDF-Expand(s, n as u16 || "serval2 " || label || ctx, n)
//! ```
//!
//! The private keys and the shared secret live only as long as the handshake needs them (the
//! client keeps its private key until the server's first packet after the SYN-ACK, to answer a
//! second instance's SYN-ACK with an authenticated RST); [`FlowSecrets`] holds nothing a
//! passive observer of the handshake could compute, and is plain data, so that a connection
//! snapshot can carry it.
//!
//! # Packets
//!
//! Every packet after the SYN is `SAL header | packet number (8) | payload | tag (16)`. The
//! header and the packet number are associated data; the payload (the transport's frames, empty
//! in a control packet) is encrypted with AES-256-GCM under the sender's current traffic key,
//! with the nonce `iv XOR (space || path ID (31 bits) || packet number (8))`. Data packets
//! number in the transport's space (bit 31 of the second field 0); control packets (those with
//! a CONTROL extension) in a space of their own (bit 31 set), counted here, so that they leave
//! no gap in the transport's numbers. In plaintext mode (both ends
//! asked for it) the payload stays in clear and the tag is AES-256-GCM's over everything with
//! nothing encrypted (a GMAC): the same integrity, the same replay protection.
//!
//! The AES-256-GCM is aws-lc's (`aws-lc-rs`): its GHASH takes associated data in bulk, so the
//! plaintext mode's GMAC costs less than encrypting; ring's took it a block at a time, which
//! made plaintext slower than encrypted. The packets are standard AES-GCM either way.
//!
//! A receiver drops, before anything else looks at it, a packet whose tag does not verify or
//! whose packet number it has already opened (a sliding window of [`REPLAY_WINDOW`] below the
//! largest).
//!
//! # Key update
//!
//! After [`DEFAULT_KEY_UPDATE_INTERVAL`] packets in one key phase, a sender whose previous
//! update the peer has followed moves to `ts(n+1) = Expand-Label(ts(n), "ku", "", 32)` and flips
//! the KEY_PHASE bit of the header. A receiver that sees the other phase on a packet newer than
//! the current phase's first tries the next keys and, if they open it, moves its receiving phase
//! and its own sending phase to them. Older packets of the previous phase (reordered around the
//! update) still open with the previous keys.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce as AeadNonce, UnboundKey};
use serval_wire::header::KEY_PHASE;
use serval_wire::{FlowId, KeyShareRepr, Nonce, ServiceId};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::frame::PN_LEN;

/// Bytes of authentication tag at the end of every protected packet.
pub const TAG_LEN: usize = 16;

/// Packet numbers below the largest one opened that the replay window remembers; older ones
/// are refused.
pub const REPLAY_WINDOW: u64 = 1024;

/// The largest packet number a receiver opens (2^62 − 1, as QUIC's): larger ones are refused
/// as replays, so the replay window's arithmetic never overflows.
pub const MAX_PACKET_NUMBER: u64 = (1 << 62) - 1;

/// Packets sent in one key phase before the sender updates its keys: half of AES-GCM's
/// confidentiality limit of 2^23 full-size packets per key (RFC 9001 §6.6), so that the wait
/// for the peer's acknowledgment never takes a key past it, and long flows rekey without a
/// handshake.
pub const DEFAULT_KEY_UPDATE_INTERVAL: u64 = 1 << 22;

const SALT: &[u8] = b"serval-v2";
const LABEL_PREFIX: &[u8] = b"serval2 ";

/// How a flow's packets are protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protection {
    /// Encrypted and authenticated (AES-256-GCM). The default.
    #[default]
    Encrypted,
    /// Authenticated but readable on the wire (for measurements and debugging). A flow runs in
    /// plaintext only when the client asks for it in its SYN and the server is configured for it
    /// too; otherwise it is encrypted.
    Plaintext,
}

/// The packet-number space of a protected packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// Stream packets, numbered by the transport.
    Data = 0,
    /// Control packets (a CONTROL extension), numbered by the protector.
    Control = 1,
}

impl Space {
    /// The space of a packet, from whether it has a CONTROL extension.
    pub fn of(control: bool) -> Space {
        if control { Space::Control } else { Space::Data }
    }

    /// The nonce's path field: the path ID, with bit 31 set in the control space.
    fn nonce_path(self, path: u32) -> u32 {
        match self {
            Space::Data => path & 0x7fff_ffff,
            Space::Control => path | 0x8000_0000,
        }
    }
}

/// Why a packet was not opened. Every one of them drops the packet and counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// Shorter than a header, a packet number and a tag.
    TooShort,
    /// A packet number already opened, or older than the replay window.
    Replayed,
    /// The tag does not verify: forged, corrupted, or sealed under keys this end does not hold.
    Forged,
}

/// One end's ephemeral X25519 key for a handshake.
pub struct KeyExchange {
    secret: StaticSecret,
    public: [u8; 32],
}

impl core::fmt::Debug for KeyExchange {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("KeyExchange(..)")
    }
}

impl Clone for KeyExchange {
    fn clone(&self) -> Self {
        KeyExchange {
            secret: self.secret.clone(),
            public: self.public,
        }
    }
}

impl KeyExchange {
    /// A key pair from 32 random bytes (the endpoint's random source: deterministic in tests).
    pub fn new(random: [u8; 32]) -> KeyExchange {
        let secret = StaticSecret::from(random);
        let public = PublicKey::from(&secret).to_bytes();
        KeyExchange { secret, public }
    }

    /// The KEYSHARE this end sends.
    pub fn share(&self, flags: u8) -> KeyShareRepr {
        KeyShareRepr {
            group: KeyShareRepr::X25519,
            flags,
            key: self.public,
        }
    }

    /// The shared secret with the peer's share; `None` if the share is not in a group we know
    /// or is a point of small order (the secret would be all zeros, known to anyone).
    pub fn agree(&self, peer: &KeyShareRepr) -> Option<[u8; 32]> {
        if peer.group != KeyShareRepr::X25519 {
            return None;
        }
        let shared = self.secret.diffie_hellman(&PublicKey::from(peer.key));
        shared.was_contributory().then(|| shared.to_bytes())
    }
}

/// What both ends bind their keys to: the handshake as each saw it.
#[derive(Debug, Clone, Copy)]
pub struct Transcript<'a> {
    /// The serviceID the SYN asked for.
    pub service: &'a ServiceId,
    /// The client's flowID (the SYN's source flow).
    pub client_flow: FlowId,
    /// The SYN's NONCE.
    pub client_nonce: &'a Nonce,
    /// The SYN's KEYSHARE.
    pub client_share: &'a KeyShareRepr,
    /// The server's flowID (the SYN-ACK's source flow).
    pub server_flow: FlowId,
    /// The SYN-ACK's NONCE.
    pub server_nonce: &'a Nonce,
    /// The SYN-ACK's KEYSHARE.
    pub server_share: &'a KeyShareRepr,
}

impl Transcript<'_> {
    /// The transcript hash `th`.
    pub fn hash(&self) -> [u8; 32] {
        let share = |h: &mut Sha256, s: &KeyShareRepr| {
            h.update([s.group, s.flags]);
            h.update(s.key);
        };
        let mut h = Sha256::new();
        h.update(b"serval2 transcript");
        h.update(self.service.as_bytes());
        h.update(self.client_flow.0.to_be_bytes());
        h.update(self.client_nonce.0);
        share(&mut h, self.client_share);
        h.update(self.server_flow.0.to_be_bytes());
        h.update(self.server_nonce.0);
        share(&mut h, self.server_share);
        h.finalize().into()
    }
}

/// `HKDF-Expand-Label` of the module documentation: `out.len()` bytes of `secret` (a
/// pseudo-random key) for `label` and `context`.
fn expand_label(secret: &[u8; 32], label: &[u8], context: &[u8], out: &mut [u8]) {
    let Ok(hk) = hkdf::Hkdf::<Sha256>::from_prk(secret) else {
        unreachable!("a 32-byte PRK is always long enough for HKDF-SHA256");
    };
    let len = u16::try_from(out.len()).unwrap_or(u16::MAX).to_be_bytes();
    let info: [&[u8]; 4] = [&len, LABEL_PREFIX, label, context];
    if hk.expand_multi_info(&info, out).is_err() {
        unreachable!("outputs of at most 32 bytes are far below HKDF-SHA256's limit");
    }
}

fn expand32(secret: &[u8; 32], label: &[u8], context: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    expand_label(secret, label, context, &mut out);
    out
}

/// One direction's traffic secret and the key phase it belongs to.
#[derive(Clone, PartialEq, Eq)]
pub struct TrafficSecret {
    /// The secret (`c_ts`/`s_ts` of the module documentation, after any key updates).
    pub secret: [u8; 32],
    /// Its key phase: flips at every update.
    pub phase: bool,
}

impl TrafficSecret {
    fn next(&self) -> TrafficSecret {
        TrafficSecret {
            secret: expand32(&self.secret, b"ku", b""),
            phase: !self.phase,
        }
    }
}

impl core::fmt::Debug for TrafficSecret {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "TrafficSecret(phase {}, ..)", u8::from(self.phase))
    }
}

/// Everything secret about one end of a flow, as plain data: what a connection snapshot
/// carries to let another host continue the flow (never the handshake's private keys).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct FlowSecrets {
    /// Encrypted or plaintext.
    pub protection: Protection,
    /// What this end seals with.
    pub tx: TrafficSecret,
    /// What this end opens with.
    pub rx: TrafficSecret,
    /// The control secret (`ctl`), for proofs that only the flow's two ends can make.
    pub control: [u8; 32],
}

impl FlowSecrets {
    /// The secrets of one end (`client` says which) after a handshake with shared secret
    /// `dh`.
    pub fn derive(
        client: bool,
        protection: Protection,
        dh: &[u8; 32],
        transcript: &Transcript<'_>,
    ) -> FlowSecrets {
        let th = transcript.hash();
        let mut ikm = [0u8; 64];
        ikm[..32].copy_from_slice(dh);
        ikm[32..48].copy_from_slice(&transcript.client_nonce.0);
        ikm[48..].copy_from_slice(&transcript.server_nonce.0);
        let (prk, _) = hkdf::Hkdf::<Sha256>::extract(Some(SALT), &ikm);
        let prk: [u8; 32] = prk.into();
        let c = TrafficSecret {
            secret: expand32(&prk, b"c traffic", &th),
            phase: false,
        };
        let s = TrafficSecret {
            secret: expand32(&prk, b"s traffic", &th),
            phase: false,
        };
        let control = expand32(&prk, b"control", &th);
        let (tx, rx) = if client { (c, s) } else { (s, c) };
        FlowSecrets {
            protection,
            tx,
            rx,
            control,
        }
    }
}

/// An AEAD key and IV derived from one traffic secret.
struct PacketKey {
    aead: LessSafeKey,
    /// The key's bytes, to clone it (aws-lc's keys are not `Clone`).
    key: [u8; 32],
    iv: [u8; 12],
}

impl Clone for PacketKey {
    fn clone(&self) -> PacketKey {
        PacketKey::from_parts(self.key, self.iv)
    }
}

impl PacketKey {
    fn new(ts: &TrafficSecret) -> PacketKey {
        let key = expand32(&ts.secret, b"key", b"");
        let mut iv = [0u8; 12];
        expand_label(&ts.secret, b"iv", b"", &mut iv);
        PacketKey::from_parts(key, iv)
    }

    fn from_parts(key: [u8; 32], iv: [u8; 12]) -> PacketKey {
        let Ok(unbound) = UnboundKey::new(&AES_256_GCM, &key) else {
            unreachable!("AES-256-GCM takes a 32-byte key");
        };
        PacketKey {
            aead: LessSafeKey::new(unbound),
            key,
            iv,
        }
    }

    /// The nonce of packet `pn` on path `path`: the IV XOR (path ID || packet number).
    fn nonce(&self, path: u32, pn: u64) -> AeadNonce {
        let mut n = self.iv;
        for (b, x) in n
            .iter_mut()
            .zip(path.to_be_bytes().into_iter().chain(pn.to_be_bytes()))
        {
            *b ^= x;
        }
        AeadNonce::assume_unique_for_key(n)
    }
}

/// Packet numbers already opened: the largest, and a bitmap of the [`REPLAY_WINDOW`] below it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    /// One more than the largest packet number opened (0: none yet).
    top: u64,
    /// Bit `i` set: packet `top - 1 - i` was opened.
    seen: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl ReplayWindow {
    /// Whether `pn` must be refused: opened already, too old to tell, or above
    /// [`MAX_PACKET_NUMBER`] (which no sender reaches, and the window could not track).
    pub fn is_replay(&self, pn: u64) -> bool {
        if pn > MAX_PACKET_NUMBER {
            return true;
        }
        if pn >= self.top {
            return false;
        }
        let age = self.top - 1 - pn;
        age >= REPLAY_WINDOW || self.seen[(age / 64) as usize] & (1 << (age % 64)) != 0
    }

    /// Records `pn` as opened (numbers above [`MAX_PACKET_NUMBER`] are never recorded: they
    /// are always refused).
    pub fn insert(&mut self, pn: u64) {
        if pn > MAX_PACKET_NUMBER {
            return;
        }
        if pn >= self.top {
            let shift = (pn - self.top).saturating_add(1);
            self.shift(shift);
            self.top = pn.saturating_add(1);
            self.seen[0] |= 1;
        } else {
            let age = self.top - 1 - pn;
            if age < REPLAY_WINDOW {
                self.seen[(age / 64) as usize] |= 1 << (age % 64);
            }
        }
    }

    /// Ages every bit by `n` packets.
    fn shift(&mut self, n: u64) {
        if n >= REPLAY_WINDOW {
            self.seen = Default::default();
            return;
        }
        let words = (n / 64) as usize;
        let bits = (n % 64) as u32;
        let len = self.seen.len();
        for i in (0..len).rev() {
            let hi = i.checked_sub(words).map_or(0, |j| self.seen[j]);
            let lo = i.checked_sub(words + 1).map_or(0, |j| self.seen[j]);
            self.seen[i] = if bits == 0 {
                hi
            } else {
                (hi << bits) | (lo >> (64 - bits))
            };
        }
    }

    /// The largest packet number opened, if any.
    pub fn largest(&self) -> Option<u64> {
        self.top.checked_sub(1)
    }
}

/// Counters of a flow's protection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProtectStats {
    /// Packets sealed.
    pub sealed: u64,
    /// Packets opened.
    pub opened: u64,
    /// Packets dropped because their tag did not verify.
    pub forged: u64,
    /// Packets dropped as replays (or too old for the window).
    pub replayed: u64,
    /// Key updates, both directions counted once each.
    pub key_updates: u64,
}

/// The live protection of one flow: its secrets, the keys derived from them, the replay window.
#[derive(Clone)]
pub struct Protector {
    secrets: FlowSecrets,
    tx_key: PacketKey,
    rx_key: PacketKey,
    /// The receiving keys of the next phase, ready for the peer's update.
    rx_next: PacketKey,
    /// The receiving keys of the previous phase, for packets reordered around an update.
    rx_prev: Option<PacketKey>,
    /// The secret `rx_prev` was derived from (for a snapshot: it cannot be derived back).
    rx_prev_secret: Option<[u8; 32]>,
    /// Per space: the first packet number of the current receiving phase.
    rx_phase_start: [u64; 2],
    /// Per space: the packet numbers opened.
    replay: [ReplayWindow; 2],
    /// The next control packet's number.
    control_pn: u64,
    /// Packets sealed in the current sending phase.
    tx_in_phase: u64,
    /// The first data packet number sealed in the current sending phase.
    tx_phase_first_pn: Option<u64>,
    /// The largest data packet number of ours the peer has acknowledged.
    peer_acked: Option<u64>,
    /// Key generations of each direction (the phase bit is their parity): they never differ
    /// by more than one.
    tx_gen: u64,
    rx_gen: u64,
    update_interval: u64,
    /// The data spaces of paths other than path 0 (multipath, docs/moving-flows.md §2): each
    /// numbers its packets from 0, so each has its own replay window and phase bookkeeping.
    extra: Vec<PathSpace>,
    /// Counters.
    pub stats: ProtectStats,
}

/// The protection state of one extra path's data space.
#[derive(Clone, Debug, Default)]
struct PathSpace {
    id: u32,
    replay: ReplayWindow,
    /// The first packet number of the current receiving phase on this path.
    rx_phase_start: u64,
    /// The first packet number sealed on this path in the current sending phase.
    tx_phase_first_pn: Option<u64>,
    /// The largest packet number of ours on this path the peer has acknowledged.
    peer_acked: Option<u64>,
}

impl core::fmt::Debug for Protector {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Protector")
            .field("protection", &self.secrets.protection)
            .field("tx_phase", &self.secrets.tx.phase)
            .field("rx_phase", &self.secrets.rx.phase)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Protector {
    /// Protection from `secrets`, updating keys every `update_interval` packets sent.
    pub fn new(secrets: FlowSecrets, update_interval: u64) -> Protector {
        Protector {
            tx_key: PacketKey::new(&secrets.tx),
            rx_key: PacketKey::new(&secrets.rx),
            rx_next: PacketKey::new(&secrets.rx.next()),
            rx_prev: None,
            rx_prev_secret: None,
            rx_phase_start: [0; 2],
            replay: Default::default(),
            control_pn: 0,
            tx_in_phase: 0,
            tx_phase_first_pn: None,
            peer_acked: None,
            tx_gen: 0,
            rx_gen: 0,
            update_interval: update_interval.max(1),
            extra: Vec::new(),
            secrets,
            stats: ProtectStats::default(),
        }
    }

    /// The flow's secrets as they are now.
    pub fn secrets(&self) -> &FlowSecrets {
        &self.secrets
    }

    /// Encrypted or plaintext.
    pub fn protection(&self) -> Protection {
        self.secrets.protection
    }

    /// Seals the data packet at `out[base..]`: a SAL header of `header_len` bytes, then the
    /// transport's packet number and payload. Sets the key phase bit, encrypts the payload in
    /// place (unless plaintext) and appends the tag.
    pub fn seal(&mut self, out: &mut Vec<u8>, base: usize, header_len: usize) {
        self.seal_in(Space::Data, 0, out, base, header_len);
    }

    /// [`seal`](Self::seal) for a data packet of path `path`, numbered in that path's space
    /// (the nonce carries the path ID). A path other than 0 must have been added
    /// ([`add_path`](Self::add_path)).
    pub fn seal_on(&mut self, path: u32, out: &mut Vec<u8>, base: usize, header_len: usize) {
        self.seal_in(Space::Data, path, out, base, header_len);
    }

    /// Opens a data space for path `path` (not 0, which always exists); nothing if it exists.
    pub fn add_path(&mut self, path: u32) {
        if path != 0 && !self.extra.iter().any(|p| p.id == path) {
            // Every packet of a new path is sent after it was added: one in the other phase
            // than ours can only be the peer's next (rx_phase_start 0).
            self.extra.push(PathSpace {
                id: path,
                ..PathSpace::default()
            });
        }
    }

    /// Forgets path `path`'s data space (path 0's stays): its packets no longer open.
    pub fn remove_path(&mut self, path: u32) {
        self.extra.retain(|p| p.id != path);
    }

    /// Whether path `path` has a data space.
    pub fn has_path(&self, path: u32) -> bool {
        path == 0 || self.extra.iter().any(|p| p.id == path)
    }

    /// Seals the control packet at `out[base..]`, a SAL header of `header_len` bytes (and
    /// nothing after it): appends its packet number in the control space, then the tag.
    pub fn seal_control(&mut self, out: &mut Vec<u8>, base: usize, header_len: usize) {
        self.seal_control_with(out, base, header_len, &[]);
    }

    /// Skips `n` numbers of the control space: the next control packet is sealed with one
    /// `n` higher than it would have been.
    pub(crate) fn skip_control_numbers(&mut self, n: u64) {
        self.control_pn = self.control_pn.saturating_add(n);
    }

    /// [`seal_control`](Self::seal_control) with `payload` after the packet number (the
    /// SYN-ACK's certificate chain).
    pub fn seal_control_with(
        &mut self,
        out: &mut Vec<u8>,
        base: usize,
        header_len: usize,
        payload: &[u8],
    ) {
        out.truncate(base + header_len);
        out.extend_from_slice(&self.control_pn.to_be_bytes());
        out.extend_from_slice(payload);
        self.control_pn = self.control_pn.saturating_add(1);
        self.seal_in(Space::Control, 0, out, base, header_len);
    }

    fn seal_in(
        &mut self,
        space: Space,
        path: u32,
        out: &mut Vec<u8>,
        base: usize,
        header_len: usize,
    ) {
        if space == Space::Data {
            self.maybe_update();
        }
        let ad_len = header_len + PN_LEN;
        let Some(packet) = out.get_mut(base..).filter(|p| p.len() >= ad_len) else {
            debug_assert!(false, "a packet to seal holds a header and a packet number");
            return;
        };
        packet[0] = (packet[0] & !KEY_PHASE) | if self.secrets.tx.phase { KEY_PHASE } else { 0 };
        let mut pn = [0u8; PN_LEN];
        pn.copy_from_slice(&packet[header_len..ad_len]);
        let pn = u64::from_be_bytes(pn);
        if space == Space::Data {
            let first = if path == 0 {
                &mut self.tx_phase_first_pn
            } else {
                match self.extra.iter_mut().find(|p| p.id == path) {
                    Some(p) => &mut p.tx_phase_first_pn,
                    None => {
                        debug_assert!(false, "sealing on a path without a space");
                        out.truncate(base);
                        return;
                    }
                }
            };
            if first.is_none() {
                *first = Some(pn);
            }
        }
        let nonce = self.tx_key.nonce(space.nonce_path(path), pn);
        let sealed = match self.secrets.protection {
            Protection::Encrypted => {
                let (ad, body) = packet.split_at_mut(ad_len);
                self.tx_key
                    .aead
                    .seal_in_place_separate_tag(nonce, Aad::from(&ad[..]), body)
            }
            Protection::Plaintext => {
                self.tx_key
                    .aead
                    .seal_in_place_separate_tag(nonce, Aad::from(&packet[..]), &mut [])
            }
        };
        match sealed {
            Ok(tag) => out.extend_from_slice(tag.as_ref()),
            // Only for inputs beyond AES-GCM's 64 GiB limit, which a packet never reaches.
            Err(_) => out.truncate(base),
        }
        // Saturating: a snapshot may carry any count (a mutated one was found to overflow).
        self.tx_in_phase = self.tx_in_phase.saturating_add(1);
        self.stats.sealed += 1;
    }

    /// Tells the protector the largest data packet number of ours the peer has acknowledged
    /// (the transport's view): a key update waits for the peer to have acknowledged a packet
    /// of the current phase.
    pub fn peer_acked(&mut self, largest: Option<u64>) {
        self.peer_acked = largest.max(self.peer_acked);
    }

    /// [`peer_acked`](Self::peer_acked) for path `path`'s space.
    pub fn peer_acked_on(&mut self, path: u32, largest: Option<u64>) {
        if path == 0 {
            self.peer_acked(largest);
        } else if let Some(p) = self.extra.iter_mut().find(|p| p.id == path) {
            p.peer_acked = largest.max(p.peer_acked);
        }
    }

    /// Starts a key update when the current phase has sealed enough packets and the peer has
    /// acknowledged one of them — proof it opened the phase (RFC 9001 §6.1's rule). Seeing the
    /// peer's packets in our phase is not enough: it may have reached that phase by an update
    /// of its own while ours was lost, and a second update of ours would then leave it two
    /// phases behind, unable to open anything we send.
    fn maybe_update(&mut self) {
        let acked = |first: Option<u64>, acked: Option<u64>| {
            first.is_some_and(|first| acked.is_some_and(|a| a >= first))
        };
        // On any path: a packet of this phase acknowledged proves the peer opened the phase.
        let confirmed = acked(self.tx_phase_first_pn, self.peer_acked)
            || self
                .extra
                .iter()
                .any(|p| acked(p.tx_phase_first_pn, p.peer_acked));
        // And both directions must be in the same generation: an update of the peer's that
        // we have not seen yet would otherwise put it two generations behind ours.
        if self.tx_in_phase >= self.update_interval && confirmed && self.tx_gen == self.rx_gen {
            self.update_tx();
        }
    }

    fn update_tx(&mut self) {
        self.secrets.tx = self.secrets.tx.next();
        self.tx_key = PacketKey::new(&self.secrets.tx);
        self.tx_in_phase = 0;
        self.tx_phase_first_pn = None;
        for p in &mut self.extra {
            p.tx_phase_first_pn = None;
        }
        self.tx_gen = self.tx_gen.wrapping_add(1);
        self.stats.key_updates += 1;
    }

    /// The largest packet number opened so far in `space`: a packet newer than it is the
    /// newest the peer has sent that arrived (what may move a flow to a new peer address).
    pub fn largest_opened(&self, space: Space) -> Option<u64> {
        self.replay[space as usize].largest()
    }

    /// [`largest_opened`](Self::largest_opened) of path `path`'s data space.
    pub fn largest_opened_on(&self, path: u32) -> Option<u64> {
        if path == 0 {
            return self.largest_opened(Space::Data);
        }
        self.extra
            .iter()
            .find(|p| p.id == path)
            .and_then(|p| p.replay.largest())
    }

    /// The data of a PATH_CHALLENGE: a pseudo-random function under the flow's `control`
    /// secret of `context` (which the caller never repeats in a connection). Nobody without
    /// the flow's keys can predict it, and deriving it needs no random source.
    pub fn path_challenge(&self, context: &[u8]) -> [u8; crate::frame::PATH_DATA_LEN] {
        let mut out = [0u8; crate::frame::PATH_DATA_LEN];
        expand_label(&self.secrets.control, b"path challenge", context, &mut out);
        out
    }

    /// Opens `packet` (a SAL header of `header_len` bytes, the packet number, the payload, the
    /// tag), numbered in `space`, in place. On success returns the packet number and the
    /// length of the payload, now in clear right after the packet number; on failure the
    /// packet must be dropped (its payload bytes may have been overwritten) and nothing about
    /// the flow has changed but the counters.
    pub fn open(
        &mut self,
        packet: &mut [u8],
        header_len: usize,
        space: Space,
    ) -> Result<(u64, usize), OpenError> {
        self.open_on(packet, header_len, space, 0)
    }

    /// [`open`](Self::open) for a packet of path `path` (data packets; the control space is
    /// one for every path, so `path` is ignored there). A data packet of a path without a space
    /// ([`add_path`](Self::add_path)) is refused as forged.
    pub fn open_on(
        &mut self,
        packet: &mut [u8],
        header_len: usize,
        space: Space,
        path: u32,
    ) -> Result<(u64, usize), OpenError> {
        let path = if space == Space::Control { 0 } else { path };
        let extra = if path == 0 {
            None
        } else {
            match self.extra.iter().position(|p| p.id == path) {
                Some(i) => Some(i),
                None => {
                    self.stats.forged += 1;
                    return Err(OpenError::Forged);
                }
            }
        };
        let s = space as usize;
        let ad_len = header_len + PN_LEN;
        if packet.len() < ad_len + TAG_LEN {
            self.stats.forged += 1;
            return Err(OpenError::TooShort);
        }
        let mut pn = [0u8; PN_LEN];
        pn.copy_from_slice(&packet[header_len..ad_len]);
        let pn = u64::from_be_bytes(pn);
        let (replay, phase_start) = match extra {
            None => (&self.replay[s], self.rx_phase_start[s]),
            Some(i) => (&self.extra[i].replay, self.extra[i].rx_phase_start),
        };
        if replay.is_replay(pn) {
            self.stats.replayed += 1;
            return Err(OpenError::Replayed);
        }
        let phase = packet[0] & KEY_PHASE != 0;
        // Which keys: the current phase's; the next phase's for a newer packet in the other
        // phase (the peer updated); the previous phase's for an older one (reordered).
        let next = phase != self.secrets.rx.phase && pn >= phase_start;
        let key = if phase == self.secrets.rx.phase {
            &self.rx_key
        } else if next {
            &self.rx_next
        } else {
            match &self.rx_prev {
                Some(k) => k,
                None => {
                    self.stats.forged += 1;
                    return Err(OpenError::Forged);
                }
            }
        };
        let nonce = key.nonce(space.nonce_path(path), pn);
        let body_len = packet.len() - ad_len - TAG_LEN;
        let ok = match self.secrets.protection {
            Protection::Encrypted => {
                let (ad, body) = packet.split_at_mut(ad_len);
                key.aead
                    .open_in_place(nonce, Aad::from(&ad[..]), body)
                    .is_ok()
            }
            Protection::Plaintext => {
                let (signed, tag) = packet.split_at_mut(ad_len + body_len);
                key.aead
                    .open_in_place_separate_tag(nonce, Aad::from(&signed[..]), tag, &mut [])
                    .is_ok()
            }
        };
        if !ok {
            self.stats.forged += 1;
            return Err(OpenError::Forged);
        }
        match extra {
            None => self.replay[s].insert(pn),
            Some(i) => self.extra[i].replay.insert(pn),
        }
        self.stats.opened += 1;
        if next {
            // The peer updated its keys: follow, and update ours too if it started it.
            self.rx_prev = Some(core::mem::replace(&mut self.rx_key, self.rx_next.clone()));
            self.rx_prev_secret = Some(self.secrets.rx.secret);
            self.secrets.rx = self.secrets.rx.next();
            self.rx_next = PacketKey::new(&self.secrets.rx.next());
            // The other space's next packet belongs to the new phase too (an older one of the
            // old phase arriving after it fails to open and is recovered like a loss).
            // Every space's next packet belongs to the new phase too, this packet's space from
            // this packet on.
            for o in 0..2 {
                self.rx_phase_start[o] =
                    self.replay[o].largest().map_or(0, |l| l.saturating_add(1));
            }
            for p in &mut self.extra {
                p.rx_phase_start = p.replay.largest().map_or(0, |l| l.saturating_add(1));
            }
            match extra {
                None => self.rx_phase_start[s] = pn,
                Some(i) => self.extra[i].rx_phase_start = pn,
            }
            self.stats.key_updates += 1;
            self.rx_gen = self.rx_gen.wrapping_add(1);
            if self.tx_gen < self.rx_gen {
                // The peer started it: follow with our own sending keys.
                self.update_tx();
            }
        }
        Ok((pn, body_len))
    }
}

/// A [`Protector`]'s state as plain data: what the connection snapshot's KEYS block carries
/// (docs/snapshot.md §3.7). The derived AEAD keys are not in it (they are recomputed from the
/// secrets), nor the counters.
#[derive(Clone, PartialEq, Eq, Debug)]
pub(crate) struct ProtectorParts {
    pub(crate) secrets: FlowSecrets,
    /// The previous receiving phase's secret, once the peer updated its keys (its phase is
    /// the other one): packets of that phase reordered around the update still open.
    pub(crate) rx_prev: Option<[u8; 32]>,
    /// Per space (data, control): the first packet number of the current receiving phase.
    pub(crate) rx_phase_start: [u64; 2],
    /// Per space: the replay window.
    pub(crate) replay: [ReplayWindow; 2],
    /// The next control packet's number.
    pub(crate) control_pn: u64,
    /// Packets sealed in the current sending phase.
    pub(crate) tx_in_phase: u64,
    /// Packets per sending phase (at least 1).
    pub(crate) update_interval: u64,
    /// The first data packet number sealed in the current sending phase.
    pub(crate) tx_phase_first_pn: Option<u64>,
    /// The largest data packet number of ours the peer has acknowledged.
    pub(crate) peer_acked: Option<u64>,
    /// Key generations of each direction.
    pub(crate) tx_gen: u64,
    pub(crate) rx_gen: u64,
}

impl ReplayWindow {
    /// The window as `(top, bitmap)`: one more than the largest packet number opened, and bit
    /// `i` of the bitmap (word `i / 64`, bit `i % 64`) set if `top - 1 - i` was opened.
    pub(crate) fn to_raw(&self) -> (u64, [u64; (REPLAY_WINDOW / 64) as usize]) {
        (self.top, self.seen)
    }

    /// The inverse of [`to_raw`](Self::to_raw). Every value is a valid window (bits for
    /// packet numbers below 0 are never consulted).
    pub(crate) fn from_raw(top: u64, seen: [u64; (REPLAY_WINDOW / 64) as usize]) -> ReplayWindow {
        ReplayWindow { top, seen }
    }
}

impl Protector {
    /// The state to export (see [`ProtectorParts`]).
    pub(crate) fn to_parts(&self) -> ProtectorParts {
        ProtectorParts {
            secrets: self.secrets.clone(),
            rx_prev: self.rx_prev_secret,
            rx_phase_start: self.rx_phase_start,
            replay: self.replay.clone(),
            control_pn: self.control_pn,
            tx_in_phase: self.tx_in_phase,
            update_interval: self.update_interval,
            tx_phase_first_pn: self.tx_phase_first_pn,
            peer_acked: self.peer_acked,
            tx_gen: self.tx_gen,
            rx_gen: self.rx_gen,
        }
    }

    /// A protector continuing exactly where [`to_parts`](Self::to_parts) left off, with
    /// fresh counters.
    pub(crate) fn from_parts(p: ProtectorParts) -> Protector {
        Protector {
            tx_key: PacketKey::new(&p.secrets.tx),
            rx_key: PacketKey::new(&p.secrets.rx),
            rx_next: PacketKey::new(&p.secrets.rx.next()),
            rx_prev: p.rx_prev.map(|secret| {
                PacketKey::new(&TrafficSecret {
                    secret,
                    phase: !p.secrets.rx.phase,
                })
            }),
            rx_prev_secret: p.rx_prev,
            rx_phase_start: p.rx_phase_start,
            replay: p.replay,
            control_pn: p.control_pn,
            tx_in_phase: p.tx_in_phase,
            tx_phase_first_pn: p.tx_phase_first_pn,
            peer_acked: p.peer_acked,
            tx_gen: p.tx_gen,
            rx_gen: p.rx_gen,
            update_interval: p.update_interval.max(1),
            extra: Vec::new(),
            secrets: p.secrets,
            stats: ProtectStats::default(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serval_wire::header::BASE_HEADER_LEN;
    use serval_wire::{Protocol, SalRepr};

    /// Both ends of one handshake (fixed keys, flows 10 and 20), as protectors updating their
    /// keys every `interval` packets. Also the snapshot tests' pair.
    pub(crate) fn pair(protection: Protection, interval: u64) -> (Protector, Protector) {
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
            Protector::new(FlowSecrets::derive(true, protection, &dc, &t), interval),
            Protector::new(FlowSecrets::derive(false, protection, &ds, &t), interval),
        )
    }

    fn packet(p: &mut Protector, pn: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0xee; 3]; // something before, as in a batch buffer
        let hdr = SalRepr::new(Protocol::STREAM, FlowId(10), FlowId(20))
            .to_bytes(&[])
            .expect("header");
        out.extend_from_slice(&hdr);
        out.extend_from_slice(&pn.to_be_bytes());
        out.extend_from_slice(payload);
        p.seal(&mut out, 3, BASE_HEADER_LEN);
        assert_eq!(&out[..3], &[0xee; 3]);
        out.split_off(3)
    }

    fn open(p: &mut Protector, mut pkt: Vec<u8>) -> Result<Vec<u8>, OpenError> {
        let (_, n) = p.open(&mut pkt, BASE_HEADER_LEN, Space::Data)?;
        Ok(pkt[BASE_HEADER_LEN + PN_LEN..][..n].to_vec())
    }

    /// A find of the snapshot proptest: a KEYS block may carry any counts, and sealing after
    /// restoring the largest ones overflowed.
    #[test]
    fn restored_counters_at_their_limits_never_overflow() {
        let (c, mut s) = pair(Protection::Encrypted, 4);
        let mut parts = c.to_parts();
        parts.tx_in_phase = u64::MAX;
        parts.tx_gen = u64::MAX;
        parts.rx_gen = u64::MAX;
        let mut c = Protector::from_parts(parts);
        for pn in 0..3 {
            let pkt = packet(&mut c, pn, b"x");
            let _ = open(&mut s, pkt);
        }
    }

    #[test]
    fn round_trip_both_modes_and_payload_hidden_only_when_encrypted() {
        for mode in [Protection::Encrypted, Protection::Plaintext] {
            let (mut c, mut s) = pair(mode, DEFAULT_KEY_UPDATE_INTERVAL);
            let msg = b"attack at dawn, attack at dawn!";
            let pkt = packet(&mut c, 7, msg);
            assert_eq!(pkt.len(), BASE_HEADER_LEN + PN_LEN + msg.len() + TAG_LEN);
            let visible = pkt.windows(msg.len()).any(|w| w == msg);
            assert_eq!(visible, mode == Protection::Plaintext, "{mode:?}");
            assert_eq!(open(&mut s, pkt).as_deref(), Ok(&msg[..]));
            // The other direction has its own keys: a packet cannot be reflected.
            let pkt = packet(&mut c, 8, msg);
            assert_eq!(open(&mut c, pkt), Err(OpenError::Forged));
        }
    }

    /// The wire format does not depend on which library seals: both modes' packets are what
    /// an independent AES-256-GCM (ring's) makes of the same key, nonce and bytes, so ends
    /// built before the switch to aws-lc (and any other implementation of wire.md §12) agree.
    #[test]
    fn packets_are_standard_aes_gcm_and_gmac() {
        use ring::aead as r;
        for mode in [Protection::Encrypted, Protection::Plaintext] {
            let (mut c, _) = pair(mode, DEFAULT_KEY_UPDATE_INTERVAL);
            let key = PacketKey::new(&c.secrets.tx);
            let ring_key = r::LessSafeKey::new(
                r::UnboundKey::new(&r::AES_256_GCM, &key.key).expect("32-byte key"),
            );
            let msg: Vec<u8> = (0..1400u32).map(|i| (i * 7) as u8).collect();
            let pkt = packet(&mut c, 41, &msg);
            let ad_len = BASE_HEADER_LEN + PN_LEN;
            let mut expect = pkt[..ad_len + msg.len()].to_vec();
            expect[ad_len..].copy_from_slice(&msg);
            let nonce = r::Nonce::assume_unique_for_key(key.nonce(0, 41).as_ref().to_owned());
            let tag = match mode {
                Protection::Encrypted => {
                    let (ad, body) = expect.split_at_mut(ad_len);
                    ring_key.seal_in_place_separate_tag(nonce, r::Aad::from(&ad[..]), body)
                }
                Protection::Plaintext => {
                    ring_key.seal_in_place_separate_tag(nonce, r::Aad::from(&expect[..]), &mut [])
                }
            }
            .expect("seal");
            expect.extend_from_slice(tag.as_ref());
            assert_eq!(pkt, expect, "{mode:?}");
        }
    }

    #[test]
    fn every_bit_flip_is_refused() {
        for mode in [Protection::Encrypted, Protection::Plaintext] {
            let (mut c, mut s) = pair(mode, DEFAULT_KEY_UPDATE_INTERVAL);
            let pkt = packet(&mut c, 1, b"0123456789");
            for i in 0..pkt.len() * 8 {
                let mut t = pkt.clone();
                t[i / 8] ^= 1 << (i % 8);
                assert!(open(&mut s, t).is_err(), "{mode:?} bit {i}");
            }
            assert!(open(&mut s, pkt).is_ok());
            assert_eq!(s.stats.opened, 1);
        }
    }

    #[test]
    fn replays_and_too_old_packets_are_refused() {
        let (mut c, mut s) = pair(Protection::Encrypted, DEFAULT_KEY_UPDATE_INTERVAL);
        let p5 = packet(&mut c, 5, b"x");
        assert!(open(&mut s, p5.clone()).is_ok());
        assert_eq!(open(&mut s, p5), Err(OpenError::Replayed));
        // Reordering inside the window is fine, once.
        let p3 = packet(&mut c, 3, b"x");
        assert!(open(&mut s, p3.clone()).is_ok());
        assert_eq!(open(&mut s, p3), Err(OpenError::Replayed));
        let far = packet(&mut c, 5000, b"x");
        assert!(open(&mut s, far).is_ok());
        let old = packet(&mut c, 5000 - REPLAY_WINDOW, b"x");
        assert_eq!(open(&mut s, old), Err(OpenError::Replayed));
        let edge = packet(&mut c, 5000 - REPLAY_WINDOW + 1, b"x");
        assert!(open(&mut s, edge).is_ok());
        assert_eq!(s.stats.replayed, 3);
    }

    /// Found by the `sealed_frames` and `endpoint` fuzz targets: packet number u64::MAX
    /// overflowed the window's arithmetic (a panic with overflow checks, and a window that
    /// never refused it again without). Numbers beyond 2^62 − 1 are refused outright.
    #[test]
    fn packet_numbers_beyond_the_limit_never_open() {
        let mut w = ReplayWindow::default();
        for pn in [MAX_PACKET_NUMBER + 1, u64::MAX] {
            assert!(w.is_replay(pn));
            w.insert(pn);
            assert_eq!(w, ReplayWindow::default(), "recorded {pn}");
        }
        w.insert(MAX_PACKET_NUMBER);
        assert!(w.is_replay(MAX_PACKET_NUMBER));
        let (mut c, mut s) = pair(Protection::Encrypted, DEFAULT_KEY_UPDATE_INTERVAL);
        let p = packet(&mut c, u64::MAX, b"x");
        assert_eq!(open(&mut s, p.clone()), Err(OpenError::Replayed));
        assert_eq!(open(&mut s, p), Err(OpenError::Replayed));
        assert_eq!(s.stats.opened, 0);
    }

    #[test]
    fn replay_window_matches_a_set() {
        use std::collections::BTreeSet;
        let mut w = ReplayWindow::default();
        let mut seen = BTreeSet::new();
        let mut x: u64 = 12345;
        for _ in 0..20_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let top = seen.last().copied().unwrap_or(0u64);
            let pn = (top + 40).saturating_sub((x >> 33) % 1200);
            let expect = seen.contains(&pn)
                || seen
                    .last()
                    .is_some_and(|&l| l >= REPLAY_WINDOW && pn <= l - REPLAY_WINDOW);
            assert_eq!(w.is_replay(pn), expect, "pn {pn}");
            if !expect {
                w.insert(pn);
                seen.insert(pn);
            }
        }
    }

    #[test]
    fn key_updates_follow_and_reordered_packets_still_open() {
        let (mut c, mut s) = pair(Protection::Encrypted, 4);
        let mut pn_c = 0;
        let mut held = Vec::new();
        for round in 0..20u64 {
            for _ in 0..3 {
                let p = packet(&mut c, pn_c, b"data");
                pn_c += 1;
                // Hold one packet back per round and deliver it after the next ones.
                if round % 2 == 0 && held.is_empty() {
                    held.push(p);
                } else {
                    assert!(open(&mut s, p).is_ok(), "round {round}");
                }
            }
            for p in held.drain(..) {
                assert!(open(&mut s, p).is_ok(), "held, round {round}");
            }
            // The server acknowledges everything so far.
            c.peer_acked(pn_c.checked_sub(1));
            let p = packet(&mut s, round, b"ack");
            assert!(open(&mut c, p).is_ok(), "reverse, round {round}");
        }
        assert!(c.stats.key_updates >= 6, "{:?}", c.stats);
        assert_eq!(c.secrets().tx, s.secrets().rx);
        assert_eq!(c.secrets().rx, s.secrets().tx);
    }

    /// Both ends update on their own at once and the client's first packet of its new phase
    /// is lost: the client must not take the server's new phase for a sign that the server
    /// followed it (found by the `protect` fuzz target). Each end updates again only once the
    /// other acknowledged its current phase, so no direction ever falls two phases behind.
    #[test]
    fn concurrent_updates_with_a_lost_phase_leave_both_directions_open() {
        let (mut c, mut s) = pair(Protection::Encrypted, 1);
        let (mut c_acked, mut s_acked) = (None, None);
        let mut opened = 0;
        for pn in 0..200u64 {
            c.peer_acked(c_acked);
            s.peer_acked(s_acked);
            let from_c = packet(&mut c, pn, b"c");
            let from_s = packet(&mut s, pn, b"s");
            // Every third client packet is lost; the rest open, and are acknowledged.
            if pn % 3 != 1 {
                assert!(open(&mut s, from_c).is_ok(), "client packet {pn}");
                c_acked = Some(pn);
                opened += 1;
            }
            assert!(open(&mut c, from_s).is_ok(), "server packet {pn}");
            s_acked = Some(pn);
        }
        assert!(opened > 100);
        assert!(c.stats.key_updates > 20, "{:?}", c.stats);
        // Whatever was lost last, the next packets each way open and the ends agree.
        for pn in 200..204u64 {
            c.peer_acked(c_acked);
            assert!(
                open(&mut s, packet(&mut c, pn, b"c")).is_ok(),
                "client packet {pn}"
            );
            c_acked = Some(pn);
            assert!(
                open(&mut c, packet(&mut s, pn, b"s")).is_ok(),
                "server packet {pn}"
            );
        }
        assert_eq!(c.secrets().tx, s.secrets().rx);
        assert_eq!(s.secrets().tx, c.secrets().rx);
    }

    #[test]
    fn keys_bind_the_transcript() {
        let c = KeyExchange::new([1; 32]);
        let s = KeyExchange::new([2; 32]);
        let (cs, ss) = (c.share(0), s.share(0));
        let dh = c.agree(&ss).expect("dh");
        let service = ServiceId([3; 32]);
        let (cn, sn) = (Nonce([4; 16]), Nonce([5; 16]));
        let base = Transcript {
            service: &service,
            client_flow: FlowId(10),
            client_nonce: &cn,
            client_share: &cs,
            server_flow: FlowId(20),
            server_nonce: &sn,
            server_share: &ss,
        };
        let k0 = FlowSecrets::derive(true, Protection::Encrypted, &dh, &base);
        let other_service = ServiceId([9; 32]);
        let plain_share = s.share(KeyShareRepr::PLAINTEXT);
        let variants = [
            Transcript {
                service: &other_service,
                ..base
            },
            Transcript {
                client_flow: FlowId(11),
                ..base
            },
            Transcript {
                server_flow: FlowId(21),
                ..base
            },
            Transcript {
                server_share: &plain_share,
                ..base
            },
        ];
        for t in &variants {
            let k = FlowSecrets::derive(true, Protection::Encrypted, &dh, t);
            assert_ne!(k.tx, k0.tx);
            assert_ne!(k.control, k0.control);
        }
    }

    #[test]
    fn control_packets_number_in_their_own_space() {
        let (mut c, mut s) = pair(Protection::Encrypted, DEFAULT_KEY_UPDATE_INTERVAL);
        let hdr = SalRepr::new(Protocol::NONE, FlowId(10), FlowId(20))
            .to_bytes(&[])
            .expect("header");
        let mut ctl = Vec::new();
        for _ in 0..2 {
            let mut out = hdr.clone();
            c.seal_control(&mut out, 0, hdr.len());
            assert_eq!(out.len(), hdr.len() + PN_LEN + TAG_LEN);
            ctl.push(out);
        }
        // Data packet 0 and control packet 0 coexist: different nonces, different windows.
        let data = packet(&mut c, 0, b"d");
        assert!(open(&mut s, data).is_ok());
        for (i, p) in ctl.iter().enumerate() {
            let mut p = p.clone();
            assert_eq!(s.open(&mut p, hdr.len(), Space::Control), Ok((i as u64, 0)));
        }
        // A control packet presented as data does not open (control packet 1 is a data
        // packet number not yet seen); one opened already is a replay.
        let mut p = ctl[1].clone();
        assert_eq!(
            s.open(&mut p, hdr.len(), Space::Data),
            Err(OpenError::Forged)
        );
        let mut p = ctl[0].clone();
        assert_eq!(
            s.open(&mut p, hdr.len(), Space::Control),
            Err(OpenError::Replayed)
        );
    }

    /// Each path numbers its packets in a space of its own: the same packet number opens
    /// once on each path, a replay on one path is refused there only, a packet sealed for one
    /// path does not open as another's (the nonce carries the path ID), and a path without a
    /// space (never added, or removed) opens nothing.
    #[test]
    fn paths_have_spaces_of_their_own() {
        let (mut a, mut b) = pair(Protection::Encrypted, 1 << 20);
        let sealed_on = |p: &mut Protector, path: u32, pn: u64| {
            let mut out = SalRepr::new(Protocol::STREAM, FlowId(10), FlowId(20))
                .to_bytes(&[])
                .expect("header");
            out.extend_from_slice(&pn.to_be_bytes());
            out.extend_from_slice(b"payload");
            p.seal_on(path, &mut out, 0, BASE_HEADER_LEN);
            out
        };
        let open_on = |p: &mut Protector, path: u32, mut pkt: Vec<u8>| {
            p.open_on(&mut pkt, BASE_HEADER_LEN, Space::Data, path)
                .map(|(pn, _)| pn)
        };
        a.add_path(3);
        b.add_path(3);
        let on0 = sealed_on(&mut a, 0, 7);
        let on3 = sealed_on(&mut a, 3, 7);
        assert_ne!(on0, on3);
        assert_eq!(open_on(&mut b, 3, on0.clone()), Err(OpenError::Forged));
        assert_eq!(open_on(&mut b, 0, on3.clone()), Err(OpenError::Forged));
        assert_eq!(open_on(&mut b, 0, on0.clone()), Ok(7));
        assert_eq!(open_on(&mut b, 3, on3.clone()), Ok(7));
        assert_eq!(open_on(&mut b, 3, on3.clone()), Err(OpenError::Replayed));
        assert_eq!(open_on(&mut b, 0, on0), Err(OpenError::Replayed));
        assert_eq!(b.largest_opened_on(3), Some(7));
        assert_eq!(
            open_on(&mut b, 5, sealed_on(&mut a, 3, 8)),
            Err(OpenError::Forged)
        );
        b.remove_path(3);
        assert!(!b.has_path(3) && b.has_path(0));
        assert_eq!(
            open_on(&mut b, 3, sealed_on(&mut a, 3, 9)),
            Err(OpenError::Forged)
        );
    }

    /// A key update is confirmed by an acknowledgement on any path, and the receiver follows
    /// it on every path.
    #[test]
    fn key_updates_span_paths() {
        let (mut a, mut b) = pair(Protection::Encrypted, 4);
        a.add_path(1);
        b.add_path(1);
        let seal = |p: &mut Protector, path: u32, pn: u64| {
            let mut out = SalRepr::new(Protocol::STREAM, FlowId(10), FlowId(20))
                .to_bytes(&[])
                .expect("header");
            out.extend_from_slice(&pn.to_be_bytes());
            p.seal_on(path, &mut out, 0, BASE_HEADER_LEN);
            out
        };
        // Four packets on path 1, acknowledged there: the next seal updates.
        for pn in 0..4 {
            let mut pkt = seal(&mut a, 1, pn);
            b.open_on(&mut pkt, BASE_HEADER_LEN, Space::Data, 1)
                .expect("opens");
        }
        a.peer_acked_on(1, Some(3));
        let mut pkt = seal(&mut a, 1, 4);
        assert_eq!(a.stats.key_updates, 1);
        b.open_on(&mut pkt, BASE_HEADER_LEN, Space::Data, 1)
            .expect("opens");
        // Its receiving keys followed, and its sending keys with them.
        assert_eq!(b.stats.key_updates, 2);
        // Path 0 of the new phase opens too.
        let mut pkt = seal(&mut a, 0, 0);
        b.open_on(&mut pkt, BASE_HEADER_LEN, Space::Data, 0)
            .expect("opens");
    }

    #[test]
    fn small_order_shares_are_refused() {
        let k = KeyExchange::new([1; 32]);
        let zero = KeyShareRepr {
            group: KeyShareRepr::X25519,
            flags: 0,
            key: [0; 32],
        };
        assert_eq!(k.agree(&zero), None);
        let other_group = KeyShareRepr {
            group: 2,
            ..k.share(0)
        };
        assert_eq!(k.agree(&other_group), None);
    }
}
