//! Export and import of a whole connection (docs/moving-flows.md §3, layouts in
//! docs/snapshot.md §3.6–§3.7): the SAL block (0x0001) and the KEYS block (0x0002), written
//! here around the transport's own blocks ([`Transport::export`]).
//!
//! Only an established connection (or one in TIME-WAIT) is exported: a handshake's state (the
//! ephemeral private keys, the KEYSHARE to retransmit) never leaves the host. An imported
//! established connection re-binds at once: it sends an RSYN from the importer's locator (the
//! existing migration machinery) with the stream's data right behind it, its transport
//! restarted on the new path (what was in flight is resent without a congestion response, from
//! the initial window): see [`rebind`](super::rebind).

use std::collections::VecDeque;

use serval_table::ListenerId;
use serval_wire::{FlowId, Locator, Nonce, ServiceId};

use super::protect::{FlowSecrets, Protection, Protector, ProtectorParts, ReplayWindow};
use super::protect::{REPLAY_WINDOW, TrafficSecret};
use super::{
    Answer, Connection, ControlConfig, ControlTiming, Pending, Reliable, ReliableQueue, Role, State,
};
use crate::Instant;
use crate::snapshot::{
    BlockReader, BlockWriter, SnapshotError, SnapshotReader, SnapshotWriter, StreamCover, block,
};
use crate::transport::OptInstant;
use crate::transport::conn::{Transport, TransportConfig};

/// Why a connection could not be exported. Nothing changed: the connection runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The handle names no connection (closed and forgotten, or never there).
    #[error("no such connection")]
    UnknownConnection,
    /// The connection is in its handshake (or closed): only an established connection, or
    /// one in TIME-WAIT, can be exported.
    #[error("the connection is not established")]
    NotEstablished,
    /// The connection was exported already and is frozen (release or thaw it first).
    #[error("the connection is already exported")]
    AlreadyExported,
    /// The application's state is larger than a snapshot carries
    /// ([`MAX_APP_STATE`](crate::endpoint::MAX_APP_STATE)).
    #[error("the application state ({0} bytes) is larger than a snapshot carries")]
    AppStateTooLarge(usize),
    /// The connection runs several paths (multipath): a snapshot carries one. Remove the
    /// others first ([`Endpoint::remove_path`](crate::endpoint::Endpoint::remove_path)).
    #[error("the connection runs {0} paths; a snapshot carries one")]
    Multipath(usize),
    /// The snapshot could not be written (a block beyond the format's 32-bit lengths).
    #[error("snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
}

/// Most answers (ACK, RSYN-ACK, RST) a SAL block may queue: a connection queues one per
/// control packet received since it last sent, so a handful in practice.
const MAX_ANSWERS: usize = 64;

/// Cipher code of AES-256-GCM in the KEYS block (the only one in version 1).
const CIPHER_AES_256_GCM: u8 = 1;

/// What the importing endpoint supplies: its own addressing and policy.
pub(crate) struct ImportContext<'a> {
    pub now: Instant,
    /// The importer's locator, of the peer's family: replaces the exporter's.
    pub local: Locator,
    /// The importer's listener for the service.
    pub listener: ListenerId,
    pub ctl: &'a ControlConfig,
    pub transport: &'a TransportConfig,
}

/// The fields of the SAL block the endpoint checks before importing.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SalSummary {
    pub service: ServiceId,
    pub local_flow: FlowId,
    pub peer: Locator,
}

fn encode_locator(w: &mut BlockWriter, l: &Locator) {
    match l.ip() {
        std::net::IpAddr::V4(a) => {
            w.u8(4);
            w.raw(&a.octets());
        }
        std::net::IpAddr::V6(a) => {
            w.u8(6);
            w.raw(&a.octets());
        }
    }
    w.u16(l.port());
}

fn decode_locator(r: &mut BlockReader<'_>) -> Result<Locator, SnapshotError> {
    let ip = match r.u8()? {
        4 => {
            let mut a = [0u8; 4];
            a.copy_from_slice(r.raw(4)?);
            std::net::IpAddr::from(a)
        }
        6 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(r.raw(16)?);
            std::net::IpAddr::from(a)
        }
        _ => return Err(r.malformed("locator family")),
    };
    Ok(Locator::new(ip, r.u16()?))
}

fn array<const N: usize>(r: &mut BlockReader<'_>) -> Result<[u8; N], SnapshotError> {
    let mut a = [0u8; N];
    a.copy_from_slice(r.raw(N)?);
    Ok(a)
}

fn reliable_code(k: Option<Reliable>) -> u8 {
    match k {
        None => 0,
        Some(Reliable::Syn) => 1,
        Some(Reliable::SynAck) => 2,
        Some(Reliable::Rsyn) => 3,
        Some(Reliable::Fin) => 4,
        // This host's addresses mean nothing where the snapshot goes, and a flow with other
        // paths is not exported: not carried.
        Some(Reliable::Addresses | Reliable::Priority | Reliable::Removal) => 0,
    }
}

/// Queued reliable control packets a snapshot has room for (one byte each).
const QUEUED_SLOTS: usize = 4;

fn decode_reliable(r: &BlockReader<'_>, code: u8) -> Result<Option<Reliable>, SnapshotError> {
    Ok(match code {
        0 => None,
        // An established connection never sends its handshake's packets again.
        3 => Some(Reliable::Rsyn),
        4 => Some(Reliable::Fin),
        _ => return Err(r.malformed("reliable control packet kind")),
    })
}

impl Connection {
    /// Whether this connection is exported and frozen.
    pub(crate) fn is_exported(&self) -> bool {
        self.export_freeze.is_some()
    }

    /// Freezes the connection for an export: it sends nothing (no data, no ACK, no control
    /// packet) and runs no timer; packets that arrive are still processed into its state, but
    /// nothing they call for goes out. Refused for a connection in its handshake or closed.
    pub(crate) fn freeze_for_export(&mut self) -> Result<(), ExportError> {
        self.exportable()?;
        self.export_freeze = Some(self.transport.is_frozen());
        self.transport.set_frozen(true);
        Ok(())
    }

    /// Whether the connection can be exported (or checkpointed) now: established or in
    /// TIME-WAIT, and not exported already.
    pub(crate) fn exportable(&self) -> Result<(), ExportError> {
        if self.export_freeze.is_some() {
            return Err(ExportError::AlreadyExported);
        }
        if !matches!(self.state, State::Established | State::TimeWait) || self.protect.is_none() {
            return Err(ExportError::NotEstablished);
        }
        match self.path_count() - 1 {
            0 => Ok(()),
            n => Err(ExportError::Multipath(n + 1)),
        }
    }

    /// Undoes [`freeze_for_export`](Self::freeze_for_export): the move was aborted and this
    /// connection continues. Timers that fell due while frozen fire at the next timeout.
    pub(crate) fn thaw_export(&mut self) -> bool {
        match self.export_freeze.take() {
            Some(was_frozen) => {
                self.transport.set_frozen(was_frozen);
                true
            }
            None => false,
        }
    }

    /// Makes an exported connection disappear without a word: no RST (a reset from here
    /// would end the flow the importer continues), nothing left to send.
    pub(crate) fn discard_exported(&mut self) {
        self.state = State::Closed;
        self.pending = None;
        self.queued.clear();
        self.answers.clear();
        self.events.clear();
        self.flush_transport = false;
        self.time_wait_until = OptInstant::NONE;
        self.held_ack = None;
    }

    /// How far a checkpoint taken now carries the stream's bytes.
    pub(crate) fn stream_cover(&self) -> StreamCover {
        self.transport.stream_cover()
    }

    /// Writes the SAL, KEYS and the transport's blocks into `w`, with `epoch` as the move
    /// epoch the importer takes.
    pub(crate) fn export_into(
        &self,
        w: &mut SnapshotWriter,
        epoch: u32,
    ) -> Result<(), ExportError> {
        let protect = self.protect.as_deref().ok_or(ExportError::NotEstablished)?;
        let mut b = w.body();
        self.encode_sal(&mut b, epoch);
        w.add(block::SAL, b)?;
        let mut b = w.body();
        encode_keys(&mut b, &protect.to_parts());
        w.add(block::KEYS, b)?;
        self.transport.export(w)?;
        Ok(())
    }

    fn encode_sal(&self, b: &mut BlockWriter, epoch: u32) {
        b.u8(match self.role {
            Role::Client => 0,
            Role::Server => 1,
        });
        b.u8(match self.state {
            State::TimeWait => 1,
            _ => 0,
        });
        b.raw(self.service.as_bytes());
        b.u64(self.local_flow.0);
        b.u64(self.peer_flow.0);
        b.raw(&self.local_nonce.0);
        b.raw(&self.peer_nonce.0);
        encode_locator(b, &self.local);
        encode_locator(b, &self.peer);
        b.u64(self.listener.map_or(0, |l| l.0));
        b.u8(self.hop_limit);
        b.u32(self.next_verno);
        b.bool(self.peer_verno.is_some());
        b.u32(self.peer_verno.unwrap_or(0));
        b.u8(u8::from(self.fin_queued)
            | u8::from(self.fin_acked) << 1
            | u8::from(self.peer_fin) << 2
            | u8::from(self.flush_transport) << 3);
        match &self.pending {
            None => b.u8(0),
            Some(p)
                if matches!(
                    p.kind,
                    Reliable::Addresses | Reliable::Priority | Reliable::Removal
                ) =>
            {
                b.u8(0)
            }
            Some(p) => {
                b.u8(reliable_code(Some(p.kind)));
                b.u32(p.verno);
                b.opt_instant(p.deadline.get());
                b.u64(p.rto);
                b.u32(p.retries);
                b.u32(p.quiet);
            }
        }
        // Packed at the front, without what is not carried.
        let mut queued = self.queued;
        queued.remove(Reliable::Addresses);
        queued.remove(Reliable::Priority);
        queued.remove(Reliable::Removal);
        // What is left is at most an RSYN and a FIN.
        for k in queued.0.into_iter().take(QUEUED_SLOTS) {
            b.u8(reliable_code(k));
        }
        let answers = self.answers.len().min(MAX_ANSWERS);
        b.u32(answers as u32);
        for a in self.answers.iter().take(answers) {
            let (code, verno) = match *a {
                Answer::Ack(v) => (1, v),
                Answer::RsynAck(v) => (2, v),
                Answer::Rst => (3, 0),
            };
            b.u8(code);
            b.u32(verno);
        }
        match self.moving_to.as_deref() {
            None => b.bool(false),
            Some(l) => {
                b.bool(true);
                encode_locator(b, l);
            }
        }
        b.opt_instant(self.time_wait_until.get());
        match self.held_ack {
            None => b.bool(false),
            Some((verno, due)) => {
                b.bool(true);
                b.u32(verno);
                b.instant(due);
            }
        }
        b.u64(self.auth_failures);
        b.u64(self.malformed);
        b.u32(epoch);
    }

    /// The SAL block's service, local flowID and peer locator, for the endpoint's checks
    /// (served here? flowID free?) before the whole snapshot is decoded.
    pub(crate) fn summary(
        r: &SnapshotReader<'_>,
        now: Instant,
    ) -> Result<SalSummary, SnapshotError> {
        let mut b = r.require(block::SAL, now)?;
        let _role = b.u8()?;
        let _state = b.u8()?;
        let service = ServiceId(array::<32>(&mut b)?);
        let local_flow = FlowId(b.u64()?);
        let _peer_flow = b.u64()?;
        let _nonces = b.raw(32)?;
        let _local = decode_locator(&mut b)?;
        let peer = decode_locator(&mut b)?;
        b.check(!local_flow.is_none(), "no local flowID")?;
        Ok(SalSummary {
            service,
            local_flow,
            peer,
        })
    }

    /// Recreates a connection from a snapshot (every block checked; nothing it holds can
    /// make the connection panic later), continuing at the importer: `cx.local` replaces the
    /// exporter's locator and, for an established connection, an RSYN from it is queued at
    /// once (any reliable control packet the exporter had outstanding is sent after it).
    pub(crate) fn import(
        r: &SnapshotReader<'_>,
        cx: &ImportContext<'_>,
    ) -> Result<Connection, SnapshotError> {
        let now = cx.now;
        let mut b = r.require(block::SAL, now)?;
        let role = match b.u8()? {
            0 => Role::Client,
            1 => Role::Server,
            _ => return Err(b.malformed("role")),
        };
        let state = match b.u8()? {
            0 => State::Established,
            1 => State::TimeWait,
            _ => return Err(b.malformed("state")),
        };
        let service = ServiceId(array::<32>(&mut b)?);
        let local_flow = FlowId(b.u64()?);
        let peer_flow = FlowId(b.u64()?);
        b.check(
            !local_flow.is_none() && !peer_flow.is_none(),
            "flowID of an established flow is zero",
        )?;
        let local_nonce = Nonce(array::<16>(&mut b)?);
        let peer_nonce = Nonce(array::<16>(&mut b)?);
        let _exporter_local = decode_locator(&mut b)?;
        let peer = decode_locator(&mut b)?;
        b.check(
            peer.is_ipv4() == cx.local.is_ipv4(),
            "peer locator of another family",
        )?;
        let _exporter_listener = b.u64()?;
        let hop_limit = b.u8()?;
        let next_verno = b.u32()?;
        let has_peer_verno = b.bool()?;
        let peer_verno = b.u32()?;
        let peer_verno = has_peer_verno.then_some(peer_verno);
        let flags = b.u8()?;
        b.check(flags & !0x0f == 0, "SAL flags")?;
        let code = b.u8()?;
        let pending = match decode_reliable(&b, code)? {
            None => None,
            Some(kind) => {
                let verno = b.u32()?;
                let deadline = OptInstant::new(b.opt_instant()?);
                let rto = b.u64()?;
                let retries = b.u32()?;
                let quiet = b.u32()?;
                b.check(rto > 0, "control retransmission timeout of zero")?;
                b.check(
                    quiet <= retries,
                    "more quiet retransmissions than retransmissions",
                )?;
                Some(Pending {
                    kind,
                    verno,
                    deadline,
                    rto,
                    retries,
                    quiet,
                })
            }
        };
        let mut queued = ReliableQueue::default();
        for slot in 0..QUEUED_SLOTS {
            let code = b.u8()?;
            let k = decode_reliable(&b, code)?;
            b.check(
                k.is_none() || !queued.0.contains(&k),
                "control packet queued twice",
            )?;
            if let Some(s) = queued.0.get_mut(slot) {
                *s = k;
            }
        }
        // Queued kinds are packed at the front.
        b.check(
            queued
                .0
                .windows(2)
                .all(|p| p[0].is_some() || p[1].is_none()),
            "gap in the control queue",
        )?;
        let n = b.count(5)?;
        b.check(n <= MAX_ANSWERS, "too many answers")?;
        let mut answers = VecDeque::with_capacity(n);
        for _ in 0..n {
            let code = b.u8()?;
            let v = b.u32()?;
            answers.push_back(match code {
                1 => Answer::Ack(v),
                2 => Answer::RsynAck(v),
                3 => Answer::Rst,
                _ => return Err(b.malformed("answer kind")),
            });
        }
        let _exporter_moving_to = if b.bool()? {
            Some(decode_locator(&mut b)?)
        } else {
            None
        };
        let time_wait_until = b.opt_instant()?;
        b.check(
            time_wait_until.is_some() == (state == State::TimeWait),
            "TIME-WAIT deadline without TIME-WAIT",
        )?;
        let held_ack = if b.bool()? {
            Some((b.u32()?, b.instant()?))
        } else {
            None
        };
        let auth_failures = b.u64()?;
        let malformed = b.u64()?;
        let epoch = b.u32()?;

        let mut k = r.require(block::KEYS, now)?;
        let parts = decode_keys(&mut k)?;
        let transport = Transport::import(r, now, cx.transport)?;

        let mut c = Connection {
            role,
            state,
            service,
            local_flow,
            peer_flow,
            local_nonce,
            peer_nonce,
            protect: Some(Box::new(Protector::from_parts(parts))),
            hs: None,
            local: cx.local,
            peer,
            listener: Some(cx.listener),
            hop_limit,
            ctl: ControlTiming::new(cx.ctl),
            next_verno,
            pending,
            queued,
            answers,
            peer_verno,
            moving_to: None,
            fin_queued: flags & 1 != 0,
            fin_acked: flags & 2 != 0,
            peer_fin: flags & 4 != 0,
            time_wait_until: OptInstant::new(time_wait_until),
            held_ack,
            transport,
            events: VecDeque::new(),
            auth_failures,
            malformed,
            flush_transport: flags & 8 != 0,
            export_freeze: None,
            move_epoch: epoch,
            // A validation in progress is not carried: the importer's first packet from the
            // peer's new source (if any) starts one again.
            paths: None,
            rebinding_early: false,
            move_frame: None,
            subpaths: None,
        };
        if c.state == State::Established {
            c.rebind(now);
        } else {
            // TIME-WAIT: nothing moves any more; it only answers a retransmitted FIN.
            c.transport.set_frozen(false);
        }
        Ok(c)
    }

    /// The move epoch: how many times this connection moved.
    pub(crate) fn move_epoch(&self) -> u32 {
        self.move_epoch
    }
}

/// The KEYS block (docs/snapshot.md §3.7).
fn encode_keys(b: &mut BlockWriter, p: &ProtectorParts) {
    b.u8(match p.secrets.protection {
        Protection::Encrypted => 0,
        Protection::Plaintext => 1,
    });
    b.u8(CIPHER_AES_256_GCM);
    for ts in [&p.secrets.tx, &p.secrets.rx] {
        b.raw(&ts.secret);
        b.bool(ts.phase);
    }
    b.raw(&p.secrets.control);
    for (start, window) in p.rx_phase_start.iter().zip(&p.replay) {
        b.u64(*start);
        let (top, seen) = window.to_raw();
        b.u64(top);
        for word in seen {
            b.u64(word);
        }
    }
    b.u64(p.control_pn);
    b.u64(p.tx_in_phase);
    b.u64(p.update_interval);
    b.bool(p.rx_prev.is_some());
    if let Some(prev) = &p.rx_prev {
        b.raw(prev);
    }
    for v in [p.tx_phase_first_pn, p.peer_acked] {
        b.bool(v.is_some());
        b.u64(v.unwrap_or(0));
    }
    b.u64(p.tx_gen);
    b.u64(p.rx_gen);
}

fn decode_keys(b: &mut BlockReader<'_>) -> Result<ProtectorParts, SnapshotError> {
    let protection = match b.u8()? {
        0 => Protection::Encrypted,
        1 => Protection::Plaintext,
        _ => return Err(b.malformed("protection mode")),
    };
    let cipher = b.u8()?;
    b.check(cipher == CIPHER_AES_256_GCM, "unknown cipher")?;
    let mut secret = || -> Result<TrafficSecret, SnapshotError> {
        Ok(TrafficSecret {
            secret: array::<32>(b)?,
            phase: b.bool()?,
        })
    };
    let tx = secret()?;
    let rx = secret()?;
    let control = array::<32>(b)?;
    let mut rx_phase_start = [0u64; 2];
    let mut replay: [ReplayWindow; 2] = Default::default();
    for (start, window) in rx_phase_start.iter_mut().zip(&mut replay) {
        *start = b.u64()?;
        let top = b.u64()?;
        let mut seen = [0u64; (REPLAY_WINDOW / 64) as usize];
        for w in &mut seen {
            *w = b.u64()?;
        }
        *window = ReplayWindow::from_raw(top, seen);
    }
    let control_pn = b.u64()?;
    let tx_in_phase = b.u64()?;
    let update_interval = b.u64()?;
    b.check(update_interval >= 1, "key update interval of zero")?;
    let rx_prev = if b.bool()? {
        Some(array::<32>(b)?)
    } else {
        None
    };
    let mut opt_u64 = || -> Result<Option<u64>, SnapshotError> {
        let some = b.bool()?;
        let v = b.u64()?;
        Ok(some.then_some(v))
    };
    let tx_phase_first_pn = opt_u64()?;
    let peer_acked = opt_u64()?;
    let tx_gen = b.u64()?;
    let rx_gen = b.u64()?;
    b.check(
        tx_gen.abs_diff(rx_gen) <= 1
            && tx_gen & 1 == u64::from(tx.phase)
            && rx_gen & 1 == u64::from(rx.phase),
        "key generations apart by more than one, or not matching the phases",
    )?;
    Ok(ProtectorParts {
        tx_gen,
        rx_gen,
        tx_phase_first_pn,
        peer_acked,
        rx_prev,
        secrets: FlowSecrets {
            protection,
            tx,
            rx,
            control,
        },
        rx_phase_start,
        replay,
        control_pn,
        tx_in_phase,
        update_interval,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::connection::protect::Space;
    use crate::frame::PN_LEN;
    use serval_wire::header::BASE_HEADER_LEN;
    use serval_wire::{Protocol, SalRepr};

    fn pair(interval: u64) -> (Protector, Protector) {
        crate::connection::protect::tests::pair(Protection::Encrypted, interval)
    }

    /// Data packet `pn` from `p`, the peer having acknowledged everything before it (so key
    /// updates are allowed to happen).
    fn data(p: &mut Protector, pn: u64) -> Vec<u8> {
        let mut out = SalRepr::new(Protocol::STREAM, FlowId(20), FlowId(10))
            .to_bytes(&[])
            .unwrap();
        out.extend_from_slice(&pn.to_be_bytes());
        out.extend_from_slice(b"payload");
        p.peer_acked(pn.checked_sub(1));
        p.seal(&mut out, 0, BASE_HEADER_LEN);
        out
    }

    fn control(p: &mut Protector) -> Vec<u8> {
        let mut out = SalRepr::new(Protocol::NONE, FlowId(20), FlowId(10))
            .to_bytes(&[])
            .unwrap();
        p.seal_control(&mut out, 0, BASE_HEADER_LEN);
        out
    }

    fn open(p: &mut Protector, mut pkt: Vec<u8>, space: Space) -> bool {
        p.open(&mut pkt, BASE_HEADER_LEN, space).is_ok()
            && (space == Space::Control || &pkt[BASE_HEADER_LEN + PN_LEN..][..7] == b"payload")
    }

    /// Through the KEYS block and back.
    fn round_trip(p: &Protector) -> Protector {
        let mut w = BlockWriter::new(Instant::ZERO);
        encode_keys(&mut w, &p.to_parts());
        let bytes = w.into_bytes();
        assert_eq!(
            bytes.len(),
            if p.to_parts().rx_prev.is_some() {
                479
            } else {
                447
            }
        );
        let mut r = BlockReader::new(block::KEYS, &bytes, Instant::ZERO);
        let q = Protector::from_parts(decode_keys(&mut r).unwrap());
        assert_eq!(r.remaining(), 0);
        assert_eq!(q.to_parts(), p.to_parts());
        q
    }

    #[test]
    fn keys_continue_exactly_after_a_round_trip_across_key_updates() {
        // A small update interval: the round trip happens in the middle of several phases.
        let (mut c, mut s) = pair(8);
        let mut pn = 0;
        for _ in 0..30 {
            assert!(open(&mut s, data(&mut c, pn), Space::Data));
            assert!(open(&mut c, data(&mut s, pn), Space::Data));
            pn += 1;
        }
        assert!(open(&mut c, control(&mut s), Space::Control));
        let held = data(&mut c, pn); // in flight across the move
        let mut moved = round_trip(&s);
        // The importer opens what the peer sends next, and refuses what the exporter opened.
        assert!(open(&mut moved, held, Space::Data));
        assert!(!open(&mut moved, data(&mut c, 3), Space::Data));
        for _ in 0..30 {
            pn += 1;
            assert!(open(&mut moved, data(&mut c, pn), Space::Data));
            assert!(open(&mut c, data(&mut moved, pn), Space::Data));
        }
        // The control space continues where the exporter stopped: the peer's window takes it.
        assert!(open(&mut c, control(&mut moved), Space::Control));
        assert!(moved.stats.key_updates > 0 && s.stats.key_updates > 0);
    }

    #[test]
    fn a_packet_of_the_previous_phase_reordered_across_the_move_still_opens() {
        let (mut c, mut s) = pair(8);
        for pn in 0..7 {
            assert!(open(&mut s, data(&mut c, pn), Space::Data));
        }
        let late = data(&mut c, 7); // the last of phase 0, delayed
        assert!(open(&mut s, data(&mut c, 8), Space::Data)); // phase 1: s follows
        assert!(s.to_parts().rx_prev.is_some());
        let mut moved = round_trip(&s);
        assert!(open(&mut moved, late, Space::Data));
        assert!(open(&mut moved, data(&mut c, 9), Space::Data));
    }

    #[test]
    fn skipped_control_numbers_stay_clear_of_an_importers() {
        let (mut c, mut s) = pair(1 << 20);
        let exported = s.to_parts();
        // A standby took over from this state and seals control packets.
        let mut standby = Protector::from_parts(exported.clone());
        for _ in 0..5 {
            assert!(open(&mut c, control(&mut standby), Space::Control));
        }
        // The primary, going on from the same state, would use the same numbers (and
        // nonces): the peer refuses them as replays.
        let mut unskipped = Protector::from_parts(exported);
        assert!(
            !open(&mut c, control(&mut unskipped), Space::Control),
            "a replay"
        );
        // Once it skipped (`Endpoint::standby_lost`), its numbers are new.
        s.skip_control_numbers(crate::endpoint::STANDBY_PN_JUMP);
        assert!(open(&mut c, control(&mut s), Space::Control));
    }
}
