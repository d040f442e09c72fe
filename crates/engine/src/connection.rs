//! One flow's SAL state: handshake, the reliable control channel, migration and close.
//!
//! The transport above (the byte stream) lives in [`Transport`]; this module decides when it may
//! send, where packets go (the locators), and which control packets to exchange.
//!
//! # Control channel
//!
//! SYN, SYN-ACK, RSYN and FIN are *reliable*: each carries the sender's next control sequence
//! number (`verno`), is retransmitted on a timer with exponential backoff (stop-and-wait: one
//! outstanding at a time, later ones queue), and is answered by a packet whose `ackno` is that
//! `verno + 1`. Pure ACKs, RSYN-ACKs and RST are not retransmitted themselves; a lost answer is
//! repaired by the retransmission of what it answers.
//!
//! # Protection
//!
//! The SYN and SYN-ACK exchange ephemeral keys; every packet after the SYN, control or data, is
//! sealed with the flow's keys and carries a packet number from the transport's space (see
//! [`protect`]). A packet that does not open — forged, corrupted, replayed — is dropped and
//! counted before the control channel or the transport sees it.
//!
//! # States
//!
//! ```text
//! client: SynSent --SYN-ACK--> Established --drained, FIN acked, peer FIN--> TimeWait --> Closed
//! server: SynRcvd --ACK------> Established ---------------- " ------------> TimeWait --> Closed
//! ```
//!
//! The application sees the flow closed on entering TIME-WAIT; the engine keeps it a while
//! longer only to re-acknowledge a retransmitted FIN.
//!
//! # Migration
//!
//! The mover sends an RSYN from its new locator; the peer verifies it, records the packet's
//! source as the new peer locator, answers RSYN-ACK to it and resumes at once towards the new
//! locator; the mover, on the RSYN-ACK (or the peer's data arriving at the new locator),
//! switches its local locator. Both ends then call [`Transport::on_path_change`], which
//! retransmits whatever was in flight without treating it as congestion.
//!
//! Make-before-break: while the mover's old locator is still the endpoint's, its transport
//! keeps running on the old path (data out, the peer's data acknowledged) until the new path is
//! validated; only when the old locator is gone does the transport freeze. A live flow does not
//! die of backoff: while the old path shows signs of life the RSYN is retransmitted at least
//! every max(control RTO, 3 PTOs), each retransmission probes the old path with a PING, and the
//! RSYN gives up only after `retries` retransmissions without any sign of life. Both ends migrating at once works because each
//! end's retransmitted RSYN goes to the latest locator it has learnt; if both *lose* their old
//! locators at the same instant, neither RSYN can arrive, and only re-resolution through a
//! service router (a later layer) can save the flow.

pub mod identity;
mod move_ask;
pub mod multipath;
pub mod protect;
mod rebind;
mod snapshot;
pub mod validation;

pub use self::snapshot::ExportError;
pub(crate) use self::snapshot::{ImportContext, SalSummary};

use std::collections::VecDeque;
use std::time::Duration;

use serval_keys::PrivateKey;
use serval_table::ListenerId;
use serval_wire::ext::IDENTITY_LEN;
use serval_wire::ext::{COOKIE_TOKEN_LEN, ControlFlags, ControlRepr, ServiceRepr};
use serval_wire::header::BASE_HEADER_LEN;
use serval_wire::{
    FlowId, IdentityRepr, KeyShareRepr, Locator, Nonce, Protocol, SalPacket, SalRepr, ServiceId,
};

use self::identity::{
    CERT_SYN_LEN, CertCheck, CertificateChain, IdentityError, PeerIdentity, SYN_ACK_WITH_IDENTITY,
    ServerName,
};
use self::protect::{
    FlowSecrets, KeyExchange, OpenError, Protection, Protector, Space, TAG_LEN, Transcript,
};
use self::validation::{PathStats, PathValidator, Validated};
use crate::Instant;
use crate::frame::{PN_LEN, PathFrame};
use crate::transport::OptInstant;
use crate::transport::conn::{IDLE_RELEASE, Transport, TransportConfig, TransportEvent};

/// Cookie answers a client obliges for one connect; beyond them its SYN just times out.
const MAX_COOKIE_ROUNDS: u8 = 3;

/// Which end of the flow this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sent the SYN.
    Client,
    /// Answered it.
    Server,
}

/// Where the flow is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// SYN sent, waiting for the SYN-ACK.
    SynSent,
    /// SYN-ACK sent, waiting for the handshake's ACK.
    SynRcvd,
    /// Data flows.
    Established,
    /// Both FINs exchanged and acknowledged; lingering to answer retransmitted FINs.
    TimeWait,
    /// Gone; the endpoint removes it.
    Closed,
}

/// Why a flow ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    /// Both ends finished and the FIN exchange completed.
    #[error("closed")]
    Finished,
    /// The peer (or this end) reset the flow.
    #[error("connection reset")]
    Reset,
    /// A control packet went unanswered through every retransmission.
    #[error("control exchange timed out")]
    TimedOut,
    /// Nothing was received for the idle timeout.
    #[error("idle timeout")]
    IdleTimeout,
    /// The transport closed with a CLOSE frame.
    #[error("closed by {} with code {code}: {reason}", if *by_peer { "peer" } else { "application" })]
    Application {
        /// Whether the peer sent it.
        by_peer: bool,
        /// Application error code.
        code: u64,
        /// Reason text.
        reason: String,
    },
    /// The transport saw a protocol violation from the peer.
    #[error("protocol violation by the peer")]
    ProtocolViolation,
}

/// Why a connect failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// No rule matches the service, a DROP rule matched, or a router answered so (NACK).
    #[error("no route to service {0}")]
    NoRoute(ServiceId),
    /// The SYN went unanswered through every retransmission.
    #[error("connect to service {0} timed out")]
    TimedOut(ServiceId),
    /// The endpoint has no local address of the next hop's family.
    #[error("no local address to reach {0}")]
    NoLocalAddress(Locator),
    /// The server did not prove the identity the client requires.
    #[error("server identity refused: {error}")]
    PeerIdentity {
        /// The service connected to.
        service: ServiceId,
        /// What was wrong.
        error: IdentityError,
    },
}

/// Timing of the control channel.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlConfig {
    /// First retransmission timeout of a control packet (RFC 6298 §2.1 uses 1 s for TCP's SYN).
    pub rto: Duration,
    /// Retransmissions before giving up (so the last wait ends after rto × (2^(n+1) − 1)).
    pub retries: u32,
    /// How long a closed flow lingers to answer retransmitted FINs.
    pub time_wait: Duration,
    /// How long a client holds the handshake's ACK back, waiting for the application's first
    /// data: a stream packet names both flowIDs and so completes the server's handshake on its
    /// own, one packet (and one wake-up of the server) fewer than an ACK followed by data. The
    /// ACK goes at once when the application reads before writing, and at the latest after
    /// this delay. `None` (the default here) or zero sends it at once, always; the tokio
    /// runtime (`serval`) uses 1 ms unless told otherwise.
    pub handshake_ack_delay: Option<Duration>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            rto: Duration::from_secs(1),
            retries: 6,
            time_wait: Duration::from_secs(3),
            handshake_ack_delay: None,
        }
    }
}

/// A reliable control packet kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reliable {
    Syn,
    SynAck,
    Rsyn,
    Fin,
    /// JOIN|SYN: this end's other locators, for the peer to join paths to ([`multipath`]).
    Addresses,
    /// JOIN|RSYN: a path's backup flag, changed after its join ([`multipath`]).
    Priority,
    /// JOIN|FIN: a path this end removed ([`multipath`]).
    Removal,
}

/// The outstanding reliable control packet.
#[derive(Debug, Clone)]
struct Pending {
    kind: Reliable,
    verno: u32,
    /// When to (re)send; none until it has been sent once.
    deadline: OptInstant,
    /// The retransmission timeout, nanoseconds.
    rto: u64,
    /// Retransmissions so far (Karn's rule: no RTT sample once retransmitted).
    retries: u32,
    /// Retransmissions since the peer last showed life: the give-up count. Equal to
    /// `retries` except for an RSYN sent while the old path still works (see
    /// [`Connection::note_life_while_moving`]).
    quiet: u32,
}

/// How many timeouts of a make-before-break RSYN a flow's FIN waits behind before the move
/// is given up for the close (12: at one a second or more, a silent new path, not a lossy
/// one: twelve losses in a row at 20% loss is one chance in 244 million).
pub const FIN_WAITS_FOR_RSYN: u32 = 12;

/// The [`ControlConfig`] of a connection, compactly.
#[derive(Debug, Clone, Copy)]
struct ControlTiming {
    /// [`ControlConfig::rto`], nanoseconds (saturated).
    rto: u64,
    /// [`ControlConfig::time_wait`], nanoseconds (saturated).
    time_wait: u64,
    /// [`ControlConfig::handshake_ack_delay`], nanoseconds (saturated).
    handshake_ack_delay: u64,
    retries: u32,
}

impl ControlTiming {
    fn new(c: &ControlConfig) -> ControlTiming {
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        ControlTiming {
            rto: nanos(c.rto),
            time_wait: nanos(c.time_wait),
            handshake_ack_delay: c.handshake_ack_delay.map_or(0, nanos),
            retries: c.retries,
        }
    }
}

/// Reliable control packets waiting for the channel, in order; each kind at most once (one
/// queued twice would say nothing new: its content is taken when it is sent). Room for every
/// kind an established flow sends (RSYN, FIN, JOIN|SYN, JOIN|RSYN, JOIN|FIN).
#[derive(Debug, Clone, Copy, Default)]
struct ReliableQueue([Option<Reliable>; 5]);

impl ReliableQueue {
    fn push_back(&mut self, kind: Reliable) {
        if self.0.contains(&Some(kind)) {
            return;
        }
        if let Some(free) = self.0.iter_mut().find(|k| k.is_none()) {
            *free = Some(kind);
        }
    }

    /// Puts `kind` first (taking it out of where it was). There is always room: the queue
    /// holds each kind once, and the kind being sent is never queued.
    fn push_front(&mut self, kind: Reliable) {
        self.remove(kind);
        debug_assert!(self.0[self.0.len() - 1].is_none(), "a full reliable queue");
        self.0.rotate_right(1);
        self.0[0] = Some(kind);
    }

    fn pop_front(&mut self) -> Option<Reliable> {
        let first = self.0[0].take();
        self.0.rotate_left(1);
        first
    }

    fn clear(&mut self) {
        *self = ReliableQueue::default();
    }

    /// Takes `kind` out of the queue, keeping the others in order.
    fn remove(&mut self, kind: Reliable) {
        let mut rest = ReliableQueue::default();
        for k in self.0.into_iter().flatten().filter(|k| *k != kind) {
            rest.push_back(k);
        }
        *self = rest;
    }
}

/// An answer to send once, not retransmitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// A pure ACK of the peer's control packet `verno`.
    Ack(u32),
    /// RSYN-ACK of the peer's RSYN `verno`.
    RsynAck(u32),
    /// A NACK, before any flow exists, is the endpoint's; RST is ours.
    Rst,
}

/// What a connection tells the endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConnEvent {
    Connected,
    ConnectFailed(ConnectError),
    Accepted,
    Readable,
    Writable,
    Finished,
    Datagram,
    Migrated(Locator),
    /// The peer announced its other locators (multipath): the endpoint may join paths.
    PeerAddresses,
    /// A path joined the flow and was validated both ways (multipath).
    PathUp(u32),
    /// A path left the flow: removed, its join unanswered, or silent for the idle timeout.
    PathDown(u32),
    /// The move to this locator was given up (another move, or the close, came first).
    MoveAbandoned(Locator),
    PeerMigrated(Locator),
    PathValidationFailed(Locator),
    /// Server: the client asked for the flow to move to this migration agent.
    MoveAsked(Locator),
    /// Client: the server did not move the flow to this agent, for this reason.
    MoveRefused(Locator, crate::frame::MoveRefusal),
    Closed(CloseReason),
}

/// One flow.
#[derive(Debug, Clone)]
pub(crate) struct Connection {
    pub(crate) role: Role,
    pub(crate) state: State,
    pub(crate) service: ServiceId,
    pub(crate) local_flow: FlowId,
    pub(crate) peer_flow: FlowId,
    local_nonce: Nonce,
    peer_nonce: Nonce,
    /// The protection of every packet after the SYN: the server has it from the SYN on, the
    /// client from the SYN-ACK.
    protect: Option<Box<Protector>>,
    /// What only the handshake needs; dropped once it is over.
    hs: Option<Box<Handshake>>,
    pub(crate) local: Locator,
    pub(crate) peer: Locator,
    pub(crate) listener: Option<ListenerId>,
    hop_limit: u8,
    ctl: ControlTiming,
    next_verno: u32,
    pending: Option<Pending>,
    queued: ReliableQueue,
    answers: VecDeque<Answer>,
    /// Highest peer control verno processed (SYN included), to spot retransmissions.
    peer_verno: Option<u32>,
    /// Our migration in progress: the new local locator.
    moving_to: Option<Box<Locator>>,
    fin_queued: bool,
    fin_acked: bool,
    peer_fin: bool,
    time_wait_until: OptInstant,
    /// Client: the handshake's ACK (of this SYN-ACK verno) is held back until this deadline,
    /// for the first data packet to carry it (see [`ControlConfig::handshake_ack_delay`]).
    held_ack: Option<(u32, Instant)>,
    pub(crate) transport: Transport,
    pub(crate) events: VecDeque<ConnEvent>,
    /// Packets dropped because they did not open (forged, corrupted, under other keys) or were
    /// a control packet out of place. Replays are counted by the protector.
    pub(crate) auth_failures: u64,
    /// Stream packets dropped because their payload did not parse.
    pub(crate) malformed: u64,
    /// Closed, but the transport still has its CLOSE frame to send.
    flush_transport: bool,
    /// Exported (docs/moving-flows.md §3.2): frozen, sends nothing and runs no timer until
    /// released or thawed; holds whether the transport was frozen before the export.
    export_freeze: Option<bool>,
    /// Moves of this connection so far (the snapshot's move epoch).
    move_epoch: u32,
    /// Validation of the peer's new addresses (created when the peer first moves).
    paths: Option<Box<PathValidator>>,
    /// An imported connection whose transport restarted on the new path at the import and
    /// sends behind its RSYN ([`rebind`]): the RSYN's answer does not restart it again.
    rebinding_early: bool,
    /// A MOVE_REQUEST (client) or MOVE_REFUSED (server) to send ([`move_ask`]).
    move_frame: Option<Box<PathFrame>>,
    /// The flow's paths other than path 0 ([`multipath`]), once it has any.
    subpaths: Option<Box<multipath::Paths>>,
}

/// Everything a new connection needs from the endpoint.
pub(crate) struct NewConnection {
    pub role: Role,
    pub service: ServiceId,
    pub local_flow: FlowId,
    pub local_nonce: Nonce,
    pub local: Locator,
    pub peer: Locator,
    pub initial_verno: u32,
    pub hop_limit: u8,
    pub ctl: ControlConfig,
    pub transport: TransportConfig,
    /// Random bytes for this end's ephemeral key.
    pub kx_random: [u8; 32],
    pub protection: Protection,
    pub key_update_interval: u64,
    /// Server: the key it proves its identity with, when a SYN asks.
    pub identity: Option<PrivateKey>,
    /// Client: the server identity it requires.
    pub peer_identity: Option<PeerIdentity>,
    /// Server: the certificate chain it sends when a SYN asks (and pays) for it.
    pub certificate: Option<CertificateChain>,
    /// Client: the name connected to, when connecting by name (for a certificate check).
    pub server_name: Option<ServerName>,
    /// Client: wall-clock time at [`Instant::ZERO`], since the UNIX epoch (for a certificate
    /// check).
    pub unix_time_origin: Option<Duration>,
}

/// The state of a flow's handshake, kept apart (and boxed) because an established flow has no
/// use for it: the client drops it at its server's first packet after the SYN-ACK, the server
/// once the handshake completes.
#[derive(Debug, Clone)]
struct Handshake {
    /// The client's ephemeral key (to authenticate a second server's answer to the same SYN);
    /// the server never keeps its own.
    kx: Option<KeyExchange>,
    /// The KEYSHARE this end sent (or sends again, retransmitting its SYN or SYN-ACK).
    local_share: KeyShareRepr,
    /// What this end asked for (client) or granted (server).
    protection: Protection,
    key_update_interval: u64,
    /// Client: the server identity required.
    peer_identity: Option<PeerIdentity>,
    /// Server: the proof of identity its SYN-ACK carries (when the SYN asked for it).
    local_identity: Option<IdentityRepr>,
    /// Server: the certificate chain its SYN-ACK carries (when the SYN asked and paid for it).
    local_chain: Option<CertificateChain>,
    /// Client: the name connected to, and the wall clock, for a certificate check.
    server_name: Option<ServerName>,
    unix_time_origin: Option<Duration>,
    /// Client: the cookie a server asked our SYN to carry, and how many times one was asked.
    cookie: Option<[u8; COOKIE_TOKEN_LEN]>,
    cookie_rounds: u8,
}

/// What follows a handshake packet's header.
enum Body {
    /// Nothing (but a sealed packet's packet number and tag).
    Empty,
    /// A SYN: zeros up to this total length, paying for a larger answer.
    PadTo(usize),
    /// A SYN-ACK: the certificate chain, sealed.
    Sealed(CertificateChain),
}

/// What a server connection needs from the SYN it answers.
pub(crate) struct Syn<'a> {
    pub flow: FlowId,
    pub nonce: Nonce,
    pub share: &'a KeyShareRepr,
    pub verno: u32,
    /// Its length in bytes: what the SYN-ACK may not exceed.
    pub len: usize,
}

impl Connection {
    /// A client connection: queues the SYN towards `peer` (the next hop).
    pub(crate) fn client(now: Instant, n: NewConnection) -> Connection {
        let kx = KeyExchange::new(n.kx_random);
        let mut flags = match n.protection {
            Protection::Plaintext => KeyShareRepr::PLAINTEXT,
            Protection::Encrypted => 0,
        };
        if let Some(required) = &n.peer_identity {
            flags |= KeyShareRepr::IDENTITY;
            if required.wants_chain() {
                flags |= KeyShareRepr::CERTIFICATE;
            }
        }
        let share = kx.share(flags);
        let mut c = Connection::new(now, n, State::SynSent, share);
        if let Some(hs) = c.hs.as_deref_mut() {
            hs.kx = Some(kx);
        }
        c.send_reliable(Reliable::Syn);
        c
    }

    /// A server connection answering `syn`: derives the keys and queues the SYN-ACK (with a
    /// proof of identity if the SYN asked, paid for it, and the endpoint has a key). `None` if
    /// the SYN's share is unusable (a group we do not know, or a key that would give a secret
    /// everyone knows).
    pub(crate) fn server(
        now: Instant,
        n: NewConnection,
        syn: &Syn<'_>,
        listener: ListenerId,
    ) -> Option<Connection> {
        let (peer_flow, peer_nonce, peer_share) = (syn.flow, syn.nonce, syn.share);
        let kx = KeyExchange::new(n.kx_random);
        // Plaintext only when both ends want it.
        let protection = if peer_share.plaintext() && n.protection == Protection::Plaintext {
            Protection::Plaintext
        } else {
            Protection::Encrypted
        };
        let flags = match protection {
            Protection::Plaintext => KeyShareRepr::PLAINTEXT,
            Protection::Encrypted => 0,
        };
        let dh = kx.agree(peer_share)?;
        let identity = n.identity.clone().filter(|_| {
            peer_share.flags & KeyShareRepr::IDENTITY != 0 && syn.len >= SYN_ACK_WITH_IDENTITY
        });
        // The chain goes with the proof, to a SYN that asked for it and paid for its length.
        let chain = n.certificate.clone().filter(|chain| {
            identity.is_some()
                && peer_share.flags & KeyShareRepr::CERTIFICATE != 0
                && syn.len >= SYN_ACK_WITH_IDENTITY + chain.block().len()
        });
        let share = kx.share(flags);
        let interval = n.key_update_interval;
        let mut c = Connection::new(now, n, State::SynRcvd, share);
        let transcript = Transcript {
            service: &c.service,
            client_flow: peer_flow,
            client_nonce: &peer_nonce,
            client_share: peer_share,
            server_flow: c.local_flow,
            server_nonce: &c.local_nonce,
            server_share: &share,
        };
        let secrets = FlowSecrets::derive(false, protection, &dh, &transcript);
        let proof = identity.map(|key| identity::prove(&key, &transcript.hash()));
        if let Some(hs) = c.hs.as_deref_mut() {
            hs.protection = protection;
            hs.local_identity = proof;
            hs.local_chain = chain;
        }
        c.protect = Some(Box::new(Protector::new(secrets, interval)));
        c.peer_flow = peer_flow;
        c.peer_nonce = peer_nonce;
        c.peer_verno = Some(syn.verno);
        c.listener = Some(listener);
        c.send_reliable(Reliable::SynAck);
        Some(c)
    }

    fn new(now: Instant, n: NewConnection, state: State, local_share: KeyShareRepr) -> Connection {
        // Every packet after the SYN ends in an authentication tag: the transport leaves room.
        let mut transport = n.transport;
        transport.sal_overhead = transport.sal_overhead.saturating_add(TAG_LEN as u16);
        Connection {
            role: n.role,
            state,
            service: n.service,
            local_flow: n.local_flow,
            peer_flow: FlowId::NONE,
            local_nonce: n.local_nonce,
            peer_nonce: Nonce::default(),
            protect: None,
            hs: Some(Box::new(Handshake {
                kx: None,
                local_share,
                protection: n.protection,
                key_update_interval: n.key_update_interval,
                peer_identity: n.peer_identity,
                local_identity: None,
                local_chain: None,
                server_name: n.server_name,
                unix_time_origin: n.unix_time_origin,
                cookie: None,
                cookie_rounds: 0,
            })),
            local: n.local,
            peer: n.peer,
            listener: None,
            hop_limit: n.hop_limit,
            ctl: ControlTiming::new(&n.ctl),
            next_verno: n.initial_verno,
            pending: None,
            queued: ReliableQueue::default(),
            answers: VecDeque::new(),
            peer_verno: None,
            moving_to: None,
            fin_queued: false,
            fin_acked: false,
            peer_fin: false,
            time_wait_until: OptInstant::NONE,
            held_ack: None,
            transport: Transport::new(&transport, now),
            events: VecDeque::new(),
            auth_failures: 0,
            malformed: 0,
            flush_transport: false,
            export_freeze: None,
            move_epoch: 0,
            paths: None,
            move_frame: None,
            rebinding_early: false,
            subpaths: None,
        }
    }

    /// Packets dropped as replays (or too old to tell).
    pub(crate) fn replays(&self) -> u64 {
        self.protect.as_ref().map_or(0, |p| p.stats.replayed)
    }

    /// How this flow's packets are protected, once the handshake settled it.
    pub(crate) fn protection(&self) -> Option<Protection> {
        self.protect.as_ref().map(|p| p.protection())
    }

    /// The local nonce, which the endpoint uses to match a NACK to this connection.
    pub(crate) fn local_nonce(&self) -> &Nonce {
        &self.local_nonce
    }

    /// The peer's nonce (zero until known): with the peer's flowID, the key under which the
    /// endpoint finds a half-open server connection.
    pub(crate) fn peer_nonce_key(&self) -> &Nonce {
        &self.peer_nonce
    }

    /// A server answered our SYN with a cookie: send the SYN again at once, carrying it (not a
    /// retransmission: the timer is not backed off). Returns `false`, changing nothing, after
    /// [`MAX_COOKIE_ROUNDS`] such answers for one connect.
    pub(crate) fn retry_with_cookie(&mut self, cookie: [u8; COOKIE_TOKEN_LEN]) -> bool {
        let Some(hs) = self.hs.as_deref_mut() else {
            return false;
        };
        if self.state != State::SynSent || hs.cookie_rounds >= MAX_COOKIE_ROUNDS {
            return false;
        }
        hs.cookie_rounds += 1;
        hs.cookie = Some(cookie);
        self.resend_reliable();
        true
    }

    /// The length of this server connection's SYN-ACK (its IDENTITY included, if it carries
    /// one): a retransmitted SYN shorter than it is not answered.
    pub(crate) fn syn_ack_len(&self) -> usize {
        let Some(hs) = self.hs.as_deref() else {
            return SYN_ACK_WITH_IDENTITY - IDENTITY_LEN;
        };
        let chain = hs.local_chain.as_ref().map_or(0, |c| c.block().len());
        if hs.local_identity.is_some() {
            SYN_ACK_WITH_IDENTITY + chain
        } else {
            SYN_ACK_WITH_IDENTITY - IDENTITY_LEN
        }
    }

    /// Sends the outstanding reliable control packet again now (a retransmitted SYN arrived,
    /// so our SYN-ACK was probably lost). The retransmission timer is not backed off.
    pub(crate) fn resend_reliable(&mut self) {
        if let Some(p) = &mut self.pending {
            p.deadline = OptInstant::NONE;
        }
    }

    /// Queues a reliable control packet, sending it now if the channel is free.
    fn send_reliable(&mut self, kind: Reliable) {
        if let Some(p) = &self.pending {
            // A move never waits behind the multipath family's packets (one sent on a path
            // that just died would hold it until the channel gives up): the RSYN takes the
            // channel, and the packet it displaced goes out again right after it, with a new
            // verno (its content is taken when it is sent; the peer takes it twice harmlessly).
            if kind == Reliable::Rsyn
                && matches!(
                    p.kind,
                    Reliable::Addresses | Reliable::Priority | Reliable::Removal
                )
            {
                let displaced = p.kind;
                self.pending = None;
                self.queued.push_front(displaced);
            } else {
                self.queued.push_back(kind);
                return;
            }
        }
        let verno = self.next_verno;
        self.next_verno = self.next_verno.wrapping_add(1);
        self.pending = Some(Pending {
            kind,
            verno,
            deadline: OptInstant::NONE,
            rto: self.ctl.rto,
            retries: 0,
            quiet: 0,
        });
    }

    /// The pending packet of `kind` was acknowledged by `ackno`; frees the channel.
    /// How long ago the pending control packet of `kind` was sent, if it was sent once only
    /// (an answer to a retransmitted one may be to an earlier copy: Karn's rule): the round
    /// trip its answer, arriving `now`, measures.
    fn round_trip_of(&self, kind: Reliable, now: Instant) -> Option<Duration> {
        let p = self
            .pending
            .as_ref()
            .filter(|p| p.kind == kind && p.retries == 0)?;
        let sent = p.deadline.get()?.checked_sub(Duration::from_nanos(p.rto))?;
        (now >= sent).then(|| now - sent)
    }

    fn acked(&mut self, kind: Reliable, ackno: u32) -> bool {
        match &self.pending {
            Some(p) if p.kind == kind && p.verno.wrapping_add(1) == ackno => {
                self.pending = None;
                if let Some(next) = self.queued.pop_front() {
                    self.send_reliable(next);
                }
                true
            }
            _ => false,
        }
    }

    /// Whether a peer control packet with `verno` is new (and records it).
    fn fresh(&mut self, verno: u32) -> bool {
        match self.peer_verno {
            // Serial-number comparison (RFC 1982): newer if ahead by less than half the space.
            Some(seen) if verno.wrapping_sub(seen) as i32 <= 0 => false,
            _ => {
                self.peer_verno = Some(verno);
                true
            }
        }
    }

    /// Handles a packet for this flow: `packet` is the whole SAL packet (validated, parsed
    /// into `repr`), opened here in place; `remote` is its UDP source.
    pub(crate) fn handle_packet(
        &mut self,
        now: Instant,
        local: Locator,
        remote: Locator,
        packet: &mut [u8],
        repr: &SalRepr,
    ) {
        if self.state == State::Closed {
            return;
        }
        let header_len = usize::from(SalPacket::new_unchecked(&*packet).header_len());
        let wire_len = packet.len();
        if self.state == State::SynSent {
            // Only the SYN-ACK can come now (a router's NACK is the endpoint's): it brings the
            // server's key share, and with it the keys to open it.
            match repr.control {
                Some(ctl) if ctl.flags.contains(ControlFlags::SYN | ControlFlags::ACK) => {
                    self.on_syn_ack(now, remote, packet, header_len, repr, ctl)
                }
                _ => self.auth_failures += 1,
            }
            return;
        }
        let Some(path) = self.path_of(repr.dst_flow) else {
            self.auth_failures += 1;
            return;
        };
        if path == 0 && self.fenced(now, remote, repr) {
            return;
        }
        let Some(protect) = self.protect.as_deref_mut() else {
            self.auth_failures += 1;
            return;
        };
        let space = Space::of(repr.control.is_some());
        let largest_before = protect.largest_opened(space);
        let (pn, body_len) = match protect.open_on(packet, header_len, space, path) {
            Ok(opened) => opened,
            Err(OpenError::Replayed) => return,
            Err(_) => {
                self.auth_failures += 1;
                return;
            }
        };
        if let Some(ctl) = repr.control
            && ctl.flags.contains(ControlFlags::JOIN)
        {
            // Only a client holding our SYN-ACK can seal a packet to our flowID: its JOIN
            // (from a new flowID of its own) completes the handshake if its ACK has not (held
            // for its first data, or lost).
            self.established_by_client(now);
            self.transport.on_peer_activity(now);
            self.on_join(
                now,
                (local, remote),
                (repr.src_flow, repr.dst_flow),
                (ctl, &repr.source),
            );
            return;
        }
        if Some(repr.src_flow) != self.peer_flow_on(path) {
            self.auth_failures += 1;
            return;
        }
        if path != 0 {
            self.on_subpath_packet(now, path, repr, packet, header_len, body_len);
            return;
        }
        let is_syn_ack = repr
            .control
            .is_some_and(|c| c.flags.contains(ControlFlags::SYN | ControlFlags::ACK));
        if !is_syn_ack {
            // The server has its keys: no second server can answer our SYN any more.
            self.hs = None;
        }
        if let Some(ctl) = repr.control {
            self.handle_control(now, remote, ctl);
        }
        let stream = repr.protocol == Protocol::STREAM;
        // The peer sends to our new locator only after it verified our RSYN, so its data
        // arriving there completes our migration even if its RSYN-ACK was lost.
        if self.moving_to.as_deref() == Some(&local) && stream {
            self.finish_migration(now, None);
        }
        // The client sends data only once it has our SYN-ACK, so data from it completes the
        // handshake even if its ACK was lost (as a QUIC server treats the client's first
        // 1-RTT packet). It has to name both flowIDs, which only the SYN-ACK carried.
        if stream {
            self.established_by_client(now);
        }
        // The packet number and the frames, now in clear.
        let payload = &packet[header_len..header_len + PN_LEN + body_len];
        if stream && matches!(self.state, State::Established | State::TimeWait) && body_len > 0 {
            if let Err(e) = self.transport.handle_packet(now, payload) {
                if e.is_fatal() {
                    // The transport has closed itself with a CLOSE frame for the peer; let it
                    // go out, then report the violation.
                    self.flush_transport = true;
                    self.close_now(CloseReason::ProtocolViolation);
                    return;
                }
                // A malformed payload changed nothing: drop and count it.
                self.malformed += 1;
            }
            self.pump_transport(now);
        }
        // Only the newest packet of the peer may move it (a reordered older one from an old
        // address must not pull it back).
        let newest = largest_before.is_none_or(|l| pn > l);
        let rsyn = repr
            .control
            .is_some_and(|c| c.flags.contains(ControlFlags::RSYN));
        self.on_path_packet(now, (local, remote), wire_len, newest && !rsyn);
        self.note_life_while_moving(now);
    }

    /// Path validation's share of an authentic packet of `wire_len` bytes that arrived at
    /// `local` from `remote` (see [`validation`]): a packet from a source other than the
    /// peer's credits or starts the validation of that source (`may_start`: the packet is
    /// the peer's newest, and not an RSYN, which moves the peer by itself); the PATH_CHALLENGE
    /// and PATH_RESPONSE frames it carried are acted on.
    fn on_path_packet(
        &mut self,
        now: Instant,
        (local, remote): (Locator, Locator),
        wire_len: usize,
        may_start: bool,
    ) {
        // A packet of path 0 (a control packet) may come over another path's locators when
        // path 0 fails at the peer: that is no new address of the peer's, and our control
        // packets follow it back that way.
        self.note_control_route(local, remote);
        if remote != self.peer && self.state == State::Established && !self.is_subpath_peer(remote)
        {
            let interval = self.transport.pto_period();
            self.paths
                .get_or_insert_default()
                .on_packet_from_new_source(remote, wire_len, may_start, interval);
        }
        while let Some(f) = self.transport.poll_path_frame() {
            match f {
                PathFrame::Challenge(d) => {
                    self.paths
                        .get_or_insert_default()
                        .on_challenge(d, local, remote);
                }
                PathFrame::Response(d) => {
                    let validated = self
                        .paths
                        .as_deref_mut()
                        .and_then(|p| p.on_response(now, d, remote));
                    if let Some(v) = validated {
                        self.peer_validated(now, v);
                    }
                }
                PathFrame::MoveRequest(to) => self.on_move_request(to),
                PathFrame::MoveRefused(to, why) => self.on_move_refused(to, why),
            }
        }
    }

    /// The peer answered our challenge from its new address: the flow follows it. A new
    /// address is a new path, which the transport starts afresh (from the challenge's round
    /// trip if there is one). A new port at the same address is a NAT rebinding on the same
    /// path (RFC 9000 §9.4 lets its congestion state stand): congestion control, RTT and MTU
    /// are kept. Either way what was in flight towards the old address is sent again.
    fn peer_validated(&mut self, now: Instant, v: Validated) {
        if v.target == self.peer || self.state != State::Established {
            return;
        }
        let same_host = v.target.ip() == self.peer.ip();
        self.peer = v.target;
        if same_host {
            self.transport.resend_in_flight();
        } else {
            self.transport.on_path_change_with_rtt(now, v.rtt);
        }
        self.events.push_back(ConnEvent::PeerMigrated(v.target));
    }

    /// This connection's path-validation counters.
    pub(crate) fn path_stats(&self) -> PathStats {
        self.paths
            .as_deref()
            .map_or_else(PathStats::default, |p| p.stats)
    }

    /// The next path-validation packet (a PATH_RESPONSE owed, or a PATH_CHALLENGE due), sealed
    /// like any data packet, with its route.
    fn poll_path_transmit(
        &mut self,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Option<(Locator, Locator)> {
        if !matches!(self.state, State::Established | State::TimeWait) {
            return None;
        }
        let paths = self.paths.as_deref_mut()?;
        let protect = self.protect.as_deref_mut()?;
        let role = match self.role {
            Role::Client => 0u8,
            Role::Server => 1,
        };
        let epoch = self.move_epoch;
        let t = paths.poll_transmit(now, |n| {
            // (role, move epoch, counter): never the same twice in a connection, and the
            // two ends' challenges differ.
            let mut context = [0u8; 13];
            context[0] = role;
            context[1..5].copy_from_slice(&epoch.to_be_bytes());
            context[5..].copy_from_slice(&n.to_be_bytes());
            protect.path_challenge(&context)
        })?;
        if !self.emit_path_frame(now, out, t.frame) {
            // The transport closed under it: nothing more to validate.
            if let Some(p) = self.paths.as_deref_mut() {
                p.clear();
            }
            return None;
        }
        Some((t.local.unwrap_or(self.local), t.remote))
    }

    /// Appends a sealed stream packet carrying only `frame` (see
    /// [`Transport::emit_path_frames`]); false, with nothing appended, once the transport or
    /// the protection is gone.
    fn emit_path_frame(&mut self, now: Instant, out: &mut Vec<u8>, frame: PathFrame) -> bool {
        let Some(protect) = self.protect.as_deref_mut() else {
            return false;
        };
        let header = SalRepr::new(Protocol::STREAM, self.local_flow, self.peer_flow);
        let base = out.len();
        out.resize(base + BASE_HEADER_LEN, 0);
        if header
            .emit(&mut SalPacket::new_unchecked(&mut out[base..]))
            .is_err()
            || self.transport.emit_path_frames(now, out, &[frame]) == 0
        {
            out.truncate(base);
            return false;
        }
        protect.seal(out, base, BASE_HEADER_LEN);
        true
    }

    /// The protector of the flow a SYN-ACK proposes to this client: its keys from the
    /// SYN-ACK's share and ours. `None` if the SYN-ACK lacks a share or nonce, offers one we
    /// cannot use, or grants plaintext we did not ask for (a downgrade).
    fn protector_for_syn_ack(&self, repr: &SalRepr) -> Option<(Protector, Nonce, [u8; 32])> {
        let hs = self.hs.as_deref()?;
        let (kx, share, peer_nonce) = (hs.kx.as_ref()?, repr.keyshare?, repr.nonce?);
        let protection = match (share.plaintext(), hs.protection) {
            (false, _) => Protection::Encrypted,
            (true, Protection::Plaintext) => Protection::Plaintext,
            (true, Protection::Encrypted) => return None,
        };
        let dh = kx.agree(&share)?;
        let transcript = Transcript {
            service: &self.service,
            client_flow: self.local_flow,
            client_nonce: &self.local_nonce,
            client_share: &hs.local_share,
            server_flow: repr.src_flow,
            server_nonce: &peer_nonce,
            server_share: &share,
        };
        let secrets = FlowSecrets::derive(true, protection, &dh, &transcript);
        let protector = Protector::new(secrets, hs.key_update_interval);
        Some((protector, peer_nonce, transcript.hash()))
    }

    /// The SYN-ACK, the first packet the client can authenticate: derives the keys from it,
    /// opens it with them, and establishes the flow.
    fn on_syn_ack(
        &mut self,
        now: Instant,
        remote: Locator,
        packet: &mut [u8],
        header_len: usize,
        repr: &SalRepr,
        ctl: ControlRepr,
    ) {
        let Some((mut protect, peer_nonce, th)) = self.protector_for_syn_ack(repr) else {
            self.auth_failures += 1;
            return;
        };
        let handshake_rtt = self.round_trip_of(Reliable::Syn, now);
        let payload_len = match protect.open(packet, header_len, Space::Control) {
            Ok((_, len)) if self.acked(Reliable::Syn, ctl.ackno) => len,
            _ => {
                self.auth_failures += 1;
                return;
            }
        };
        // The SYN-ACK's payload: the server's certificate chain, if it sent one.
        let payload_start = header_len + PN_LEN;
        let chain = packet
            .get(payload_start..payload_start + payload_len)
            .unwrap_or_default();
        self.protect = Some(Box::new(protect));
        self.peer_nonce = peer_nonce;
        self.peer_flow = repr.src_flow;
        self.peer = remote;
        self.peer_verno = Some(ctl.verno);
        let verdict = self.hs.as_deref().and_then(|hs| {
            let required = hs.peer_identity.as_ref()?;
            let cert = CertCheck {
                name: hs.server_name.as_ref(),
                unix_now: hs
                    .unix_time_origin
                    .map(|origin| origin + Duration::from_nanos(now.as_nanos())),
                chain,
            };
            identity::check(required, &self.service, &th, repr.identity.as_ref(), cert).err()
        });
        if let Some(error) = verdict {
            // Not who we wanted: reset the server's half-open flow and fail now.
            self.answers.push_back(Answer::Rst);
            self.state = State::Closed;
            self.pending = None;
            self.queued.clear();
            self.events
                .push_back(ConnEvent::ConnectFailed(ConnectError::PeerIdentity {
                    service: self.service,
                    error,
                }));
            return;
        }
        self.state = State::Established;
        // The handshake may have taken several retransmissions: start the idle clock now.
        self.transport.on_peer_activity(now);
        if let Some(rtt) = handshake_rtt {
            self.transport.on_handshake_rtt(rtt);
        }
        if self.ctl.handshake_ack_delay == 0 {
            self.answers.push_back(Answer::Ack(ctl.verno));
        } else {
            let due = now + Duration::from_nanos(self.ctl.handshake_ack_delay);
            self.held_ack = Some((ctl.verno, due));
        }
        self.events.push_back(ConnEvent::Connected);
    }

    /// A control packet of this flow, already opened (so authentic and not a replay).
    fn handle_control(&mut self, now: Instant, remote: Locator, ctl: ControlRepr) {
        let f = ctl.flags;
        self.transport.on_peer_activity(now);
        if f.contains(ControlFlags::RST) {
            self.close_now(CloseReason::Reset);
            return;
        }
        if f.contains(ControlFlags::SYN | ControlFlags::ACK) {
            // A retransmitted SYN-ACK: our ACK was lost (or never sent: answer now).
            if self.role == Role::Client {
                self.held_ack = None;
                self.answers.push_back(Answer::Ack(ctl.verno));
            }
            return;
        }
        if f.contains(ControlFlags::RSYN) {
            if f.contains(ControlFlags::ACK) {
                self.on_rsyn_ack(now, ctl);
            } else {
                // A client that moves at once may have its RSYN, sent from the new path,
                // arrive before the ACK or data that completes the handshake on the old one:
                // ignored, it waited a whole RSYN timeout (1 s).
                self.established_by_client(now);
                self.on_rsyn(now, remote, ctl);
            }
            return;
        }
        if f.contains(ControlFlags::FIN) {
            if self.fresh(ctl.verno) {
                self.peer_fin = true;
                // The peer sends its FIN only once its transport is drained, which includes
                // having received everything we sent: nothing of ours is left to acknowledge.
                if self.state == State::Established {
                    self.transport.on_peer_drained();
                }
            }
            // FIN|ACK: the peer's FIN also answers ours.
            if f.contains(ControlFlags::ACK)
                && self
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.kind == Reliable::Fin)
                && self.acked(Reliable::Fin, ctl.ackno)
            {
                self.fin_acked = true;
            }
            self.answers.push_back(Answer::Ack(ctl.verno));
            if self.state == State::Established {
                // Our own FIN may be due now (the peer's acknowledged our stream end).
                self.pump_transport(now);
            }
            self.maybe_time_wait(now);
            return;
        }
        if f.contains(ControlFlags::ACK) {
            match self.pending.as_ref().map(|p| p.kind) {
                Some(Reliable::SynAck) => {
                    let rtt = self.round_trip_of(Reliable::SynAck, now);
                    if self.acked(Reliable::SynAck, ctl.ackno) {
                        if let Some(rtt) = rtt {
                            self.transport.on_handshake_rtt(rtt);
                        }
                        self.server_established(now);
                    }
                }
                Some(Reliable::Fin) if self.acked(Reliable::Fin, ctl.ackno) => {
                    self.fin_acked = true;
                    self.maybe_time_wait(now);
                }
                Some(Reliable::Addresses) => {
                    self.acked(Reliable::Addresses, ctl.ackno);
                }
                Some(Reliable::Priority) if self.acked(Reliable::Priority, ctl.ackno) => {
                    self.priority_acked();
                }
                Some(Reliable::Removal) if self.acked(Reliable::Removal, ctl.ackno) => {
                    self.removal_acked();
                }
                _ => {}
            }
        }
    }

    /// Server: a packet of the client's that only a client holding our SYN-ACK can send
    /// (sealed under the flow's keys, naming both flowIDs: data, or an RSYN) completes the
    /// handshake if its ACK has not (lost, held for data, or overtaken on another path).
    fn established_by_client(&mut self, now: Instant) {
        if self.state == State::SynRcvd
            && let Some(p) = &self.pending
            && p.kind == Reliable::SynAck
        {
            let ackno = p.verno.wrapping_add(1);
            self.acked(Reliable::SynAck, ackno);
            self.server_established(now);
        }
    }

    /// The server's handshake completed (by the ACK, or by the client's first data).
    fn server_established(&mut self, now: Instant) {
        self.state = State::Established;
        // No SYN-ACK will be sent again: the handshake's state is no longer needed.
        self.hs = None;
        // The handshake may have taken several retransmissions: start the idle clock now.
        self.transport.on_peer_activity(now);
        self.events.push_back(ConnEvent::Accepted);
    }

    /// Client: whether a packet from `remote` comes from a locator the server left by RSYN
    /// (one of its last four) and is not an RSYN (which may bring the flow back there): dropped unopened and
    /// counted. The host there let the flow go — it answers nothing once released — unless
    /// it never heard that it lost the flow: a primary cut off from its standby, which took
    /// the flow over, keeps serving it. Fencing it off here keeps its bytes out of the stream
    /// (they would fill offsets the new host fills too) and its packets out of the replay
    /// window. A server never fences its client's old locator: a client moving make-before-
    /// break keeps sending there until its RSYN is answered.
    fn fenced(&mut self, now: Instant, remote: Locator, repr: &SalRepr) -> bool {
        if self.role != Role::Client || remote == self.peer {
            return false;
        }
        let rsyn = repr
            .control
            .is_some_and(|c| c.flags.contains(ControlFlags::RSYN));
        match self.paths.as_deref_mut() {
            Some(p) if p.is_left(remote) && !rsyn => {
                p.stats.from_left_locator += 1;
                // The server may still be waiting for our RSYN-ACK: answer it again.
                if let Some(verno) = p.reanswer(now) {
                    self.answers.push_back(Answer::RsynAck(verno));
                }
                true
            }
            _ => false,
        }
    }

    fn on_rsyn(&mut self, now: Instant, remote: Locator, ctl: ControlRepr) {
        if self.state != State::Established {
            return;
        }
        let fresh = self.fresh(ctl.verno);
        // A repeat of the latest RSYN from another address (its retransmission, rebound by a
        // NAT) moves the peer too; an older one (delayed or replayed) never moves it back.
        let latest = self.peer_verno == Some(ctl.verno);
        if fresh || (latest && self.peer != remote) {
            let old = self.peer;
            self.paths
                .get_or_insert_default()
                .on_rsyn_move(old, ctl.verno);
            self.peer = remote;
            self.transport.on_peer_moved(now);
            self.events.push_back(ConnEvent::PeerMigrated(remote));
        }
        self.answers.push_back(Answer::RsynAck(ctl.verno));
    }

    fn on_rsyn_ack(&mut self, now: Instant, ctl: ControlRepr) {
        if self.moving_to.is_none() {
            return;
        }
        // The RSYN's round trip is a sample of the new path.
        let rtt_sample = self.round_trip_of(Reliable::Rsyn, now);
        if !self.acked(Reliable::Rsyn, ctl.ackno) {
            return;
        }
        self.finish_migration(now, rtt_sample);
    }

    /// Our RSYN reached the peer: switch to the new locator and resume, starting the new
    /// path's RTT estimate from `rtt_sample` if there is one.
    fn finish_migration(&mut self, now: Instant, rtt_sample: Option<Duration>) {
        let Some(&new_local) = self.moving_to.take().as_deref() else {
            return;
        };
        self.end_pending_rsyn();
        self.local = new_local;
        self.transport.set_frozen(false);
        self.transport.set_path_usable(0, true);
        if !self.take_early_rebind() {
            self.transport.on_path_change_with_rtt(now, rtt_sample);
        }
        self.events.push_back(ConnEvent::Migrated(new_local));
    }

    /// Starts moving this end to `new_local` (an RSYN from there). `old_path_usable` says
    /// whether the current local locator is still one of the endpoint's: if so the move is
    /// make-before-break — the transport keeps running on the old path (sending data and
    /// acknowledging the peer's) until the RSYN-ACK, or the peer's data at `new_local`,
    /// validates the new one. Otherwise the transport freezes until then.
    ///
    /// A move already under way toward another locator is given up for this one
    /// ([`ConnEvent::MoveAbandoned`]): a target that never answers (its path is dead) does
    /// not pin the flow. The new RSYN has a higher verno, so it wins at the peer even if the
    /// abandoned one got there.
    pub(crate) fn migrate(&mut self, new_local: Locator, old_path_usable: bool) -> bool {
        if self.state != State::Established
            || self.rebinding_early
            || self.moving_to.as_deref() == Some(&new_local)
        {
            return false;
        }
        self.abandon_move();
        self.moving_to = Some(Box::new(new_local));
        self.hold_primary(!old_path_usable);
        self.send_reliable(Reliable::Rsyn);
        true
    }

    /// Stops (or resumes) sending on path 0 while it moves: with another path working, only
    /// path 0 pauses (its data goes out on the others); alone, the whole transport freezes.
    fn hold_primary(&mut self, hold: bool) {
        if self.has_active_subpath() {
            self.transport.set_frozen(false);
            self.transport.set_path_usable(0, !hold);
        } else {
            self.transport.set_frozen(hold);
        }
    }

    /// The endpoint no longer holds our current local locator. Mid-move, nothing more can go
    /// out on the old path: freeze the transport until the new path is validated (the
    /// break-before-make move of a vanished address). Otherwise nothing changes: the flow
    /// keeps its locator until the application migrates it.
    pub(crate) fn local_removed(&mut self) {
        if self.moving_to.is_some() {
            self.hold_primary(true);
        }
    }

    /// A flow that is done does not need a new path: once its FIN waits behind an RSYN that
    /// timed out [`FIN_WAITS_FOR_RSYN`] times unanswered while the old path works,
    /// the move is given up and the FIN goes (it would wait as long as the old path lives).
    /// Not an imported flow's re-bind: that RSYN is how the peer learns where the flow is.
    /// Returns whether it gave the move up.
    fn maybe_close_before_move(&mut self) -> bool {
        let stuck = self
            .pending
            .as_ref()
            .is_some_and(|p| p.kind == Reliable::Rsyn && p.retries >= FIN_WAITS_FOR_RSYN);
        if stuck && self.fin_queued && !self.transport.is_frozen() && !self.rebinding_early {
            self.abandon_move();
            return true;
        }
        false
    }

    /// Gives up the move under way: its RSYN stops (the next queued control packet goes) and
    /// the flow stays on its current locator, for a FIN or another move to take over.
    fn abandon_move(&mut self) {
        let Some(to) = self.moving_to.take() else {
            return;
        };
        self.queued.remove(Reliable::Rsyn);
        self.end_pending_rsyn();
        self.events.push_back(ConnEvent::MoveAbandoned(*to));
    }

    /// An RSYN occupying the control channel leaves it (answered, or its move given up):
    /// the next queued control packet goes.
    fn end_pending_rsyn(&mut self) {
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.kind == Reliable::Rsyn)
        {
            self.pending = None;
            if let Some(next) = self.queued.pop_front() {
                self.send_reliable(next);
            }
        }
    }

    /// The longest wait between retransmissions of an RSYN while the flow is otherwise
    /// alive: three of the old path's probe timeouts, and never below the control channel's
    /// first timeout (1 s by default).
    fn rsyn_backoff_cap(&self) -> u64 {
        let pto = u64::try_from(self.transport.pto_period().as_nanos()).unwrap_or(u64::MAX);
        pto.saturating_mul(3).max(self.ctl.rto)
    }

    /// A live path should not die of backoff. While our RSYN is outstanding and the old path
    /// is still in use (make-before-break), a packet that just advanced the transport's
    /// receive clock — an authentic control packet, or a valid stream packet of this flow —
    /// shows that the flow is alive and only the new path is (so far) silent. Then the RSYN
    /// is retransmitted at least every [`rsyn_backoff_cap`](Self::rsyn_backoff_cap) (a
    /// backed-off deadline is pulled in), and its give-up count restarts: a move fails only
    /// after `retries` retransmissions *without* any sign of life. With the old path gone
    /// (transport frozen) nothing changes: plain exponential backoff, then failure.
    fn note_life_while_moving(&mut self, now: Instant) {
        if self.transport.is_frozen() || self.transport.last_received() < now {
            return;
        }
        let cap = self.rsyn_backoff_cap();
        let Some(p) = self.pending.as_mut().filter(|p| p.kind == Reliable::Rsyn) else {
            return;
        };
        p.quiet = 0;
        if p.rto > cap {
            // Only a retransmitted RSYN can have backed off beyond the cap (the cap is at
            // least the first timeout), so moving its send time seen by Karn's rule in
            // `on_rsyn_ack` does not matter.
            if let Some(deadline) = p.deadline.get() {
                let sent = deadline
                    .checked_sub(Duration::from_nanos(p.rto))
                    .unwrap_or(now);
                p.deadline = (sent + Duration::from_nanos(cap)).max(now).into();
            }
            p.rto = cap;
        }
    }

    /// The application reads: if nothing it wrote is waiting to carry a held handshake ACK,
    /// sends the ACK now (the server speaks first, or the client waits for something).
    /// Returns whether it did.
    pub(crate) fn on_read_blocked(&mut self) -> bool {
        !self.transport.has_stream_to_send() && self.release_held_ack()
    }

    /// Sends a held handshake ACK now. Returns whether one was held.
    fn release_held_ack(&mut self) -> bool {
        match self.held_ack.take() {
            Some((verno, _)) => {
                self.answers.push_back(Answer::Ack(verno));
                true
            }
            None => false,
        }
    }

    /// Aborts the flow: one RST, then gone.
    pub(crate) fn abort(&mut self) {
        if self.protect.is_some() && self.peer_flow != FlowId::NONE {
            self.answers.push_back(Answer::Rst);
        }
        self.close_now(CloseReason::Reset);
    }

    /// Closes at once (no FIN exchange) and reports why.
    pub(crate) fn close_now(&mut self, reason: CloseReason) {
        if self.state == State::TimeWait {
            // Closed for the application already; just stop lingering.
            self.state = State::Closed;
            self.time_wait_until = OptInstant::NONE;
            return;
        }
        if self.state == State::Closed {
            return;
        }
        self.state = State::Closed;
        self.pending = None;
        self.queued.clear();
        self.events.push_back(ConnEvent::Closed(reason));
    }

    /// Its held output was dropped (its standby is lost, and may hold it too): moves both
    /// packet-number spaces `jump` ahead (the transport's, which numbers stream packets, and
    /// the control channel's), so that nothing sealed from now on uses a number another
    /// holder of these keys may use, and sends again at once what was in flight.
    pub(crate) fn go_on_without_standby(&mut self, jump: u64) {
        self.transport.skip_packet_numbers(jump);
        self.transport.resend_in_flight();
        if let Some(p) = self.protect.as_mut() {
            p.skip_control_numbers(jump);
        }
    }

    /// Whether both directions are complete. Our SAL FIN is queued only once the transport is
    /// drained — our data and stream end acknowledged, the peer's stream end received and
    /// everything read — so from then on only the SAL teardown (the FINs and their ACKs) can be
    /// missing, and losing it loses no data.
    pub(crate) fn all_delivered(&self) -> bool {
        self.fin_queued
    }

    /// Both FINs exchanged: the flow is closed for the application now; it lingers in
    /// TIME-WAIT only to answer a retransmitted FIN (our ACK may have been lost).
    fn maybe_time_wait(&mut self, now: Instant) {
        if self.state == State::Established && self.fin_acked && self.peer_fin {
            self.state = State::TimeWait;
            self.time_wait_until = (now + Duration::from_nanos(self.ctl.time_wait)).into();
            // Nothing more will be sent or received on the stream: give its buffers back now
            // rather than after the idle delay, since a churn of short connections keeps
            // thousands of flows in TIME-WAIT.
            self.transport.release_memory();
            self.events
                .push_back(ConnEvent::Closed(CloseReason::Finished));
        }
    }

    /// Moves transport events up and starts the FIN exchange once the stream is drained.
    pub(crate) fn pump_transport(&mut self, now: Instant) {
        while let Some(ev) = self.transport.poll_event() {
            let mapped = match ev {
                TransportEvent::Readable => ConnEvent::Readable,
                TransportEvent::Writable => ConnEvent::Writable,
                TransportEvent::Finished => ConnEvent::Finished,
                TransportEvent::DatagramReceived => ConnEvent::Datagram,
                TransportEvent::AllAcked => continue,
                TransportEvent::Closed {
                    by_peer,
                    code,
                    reason,
                } => {
                    self.flush_transport = !by_peer;
                    self.close_now(CloseReason::Application {
                        by_peer,
                        code,
                        reason,
                    });
                    return;
                }
                TransportEvent::IdleTimeout => {
                    let reason = if self.all_delivered() {
                        CloseReason::Finished
                    } else {
                        CloseReason::IdleTimeout
                    };
                    self.close_now(reason);
                    return;
                }
            };
            self.events.push_back(mapped);
        }
        if self.state == State::Established && !self.fin_queued && self.transport.is_drained() {
            self.fin_queued = true;
            // The FIN says everything arrived: no separate delayed ACK for the peer's data.
            self.transport.cancel_pending_ack();
            self.send_reliable(Reliable::Fin);
            self.maybe_close_before_move();
        }
        self.maybe_time_wait(now);
    }

    /// The earliest time [`Connection::handle_timeout`] must run.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        if self.state == State::Closed || self.export_freeze.is_some() {
            return None;
        }
        let ctl = self.pending.as_ref().and_then(|p| p.deadline.get());
        let transport = match self.state {
            State::Established | State::TimeWait => self.transport.poll_timeout(),
            _ => None,
        };
        let (paths, joins) = match self.state {
            State::Established => (
                self.paths.as_deref().and_then(PathValidator::poll_timeout),
                self.paths_timeout(),
            ),
            _ => (None, None),
        };
        [
            ctl,
            transport,
            paths,
            joins,
            self.time_wait_until.get(),
            self.release_deadline(),
            self.held_ack.map(|(_, due)| due),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// When to give back the memory of the empty control and event queues: once the flow has
    /// been idle for [`IDLE_RELEASE`], as the transport does with its own.
    fn release_deadline(&self) -> Option<Instant> {
        let spare = |cap: usize, len: usize| len == 0 && cap > 0;
        let any = spare(self.events.capacity(), self.events.len())
            || spare(self.answers.capacity(), self.answers.len());
        (any && self.state == State::Established)
            .then(|| self.transport.last_activity() + IDLE_RELEASE)
    }

    fn release_memory(&mut self) {
        if self.events.is_empty() {
            self.events = VecDeque::new();
        }
        if self.answers.is_empty() {
            self.answers = VecDeque::new();
        }
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if self.export_freeze.is_some() {
            return;
        }
        if self.time_wait_until.get().is_some_and(|t| t <= now) {
            // Already reported closed on entering TIME-WAIT.
            self.time_wait_until = OptInstant::NONE;
            self.state = State::Closed;
            self.pending = None;
            self.queued.clear();
            return;
        }
        if self.held_ack.is_some_and(|(_, due)| due <= now) {
            self.release_held_ack();
        }
        if let Some(p) = &mut self.pending
            && p.deadline.get().is_some_and(|d| d <= now)
        {
            if p.quiet >= self.ctl.retries {
                let kind = p.kind;
                self.pending = None;
                match kind {
                    Reliable::Syn => {
                        self.state = State::Closed;
                        self.events
                            .push_back(ConnEvent::ConnectFailed(ConnectError::TimedOut(
                                self.service,
                            )));
                    }
                    // Our FIN went unacknowledged (the peer may have left TIME-WAIT already),
                    // but every byte each way was delivered: that is a clean close.
                    _ if self.all_delivered() => self.close_now(CloseReason::Finished),
                    _ => self.close_now(CloseReason::TimedOut),
                }
                return;
            }
            p.retries += 1;
            p.quiet += 1;
            if !self.maybe_close_before_move()
                && let Some(p) = self.pending.as_mut()
            {
                p.rto = p.rto.saturating_mul(2);
                p.deadline = OptInstant::NONE; // send again on the next poll_transmit
                if p.kind == Reliable::Rsyn && !self.transport.is_frozen() {
                    // Make-before-break: the new path is still silent. A PING on the old
                    // path asks the peer for an immediate answer, a sign of life that keeps
                    // this RSYN's backoff bounded (see `note_life_while_moving`) even when
                    // neither end has data to send.
                    self.transport.ping();
                }
            }
        }
        if self.state == State::Established
            && let Some(p) = self.paths.as_deref_mut()
        {
            // A validation whose challenges all went unanswered ends; the flow stays put.
            if let Some(failed) = p.handle_timeout(now) {
                self.events
                    .push_back(ConnEvent::PathValidationFailed(failed));
            }
        }
        if self.state == State::Established {
            self.expire_paths(now);
        }
        if matches!(self.state, State::Established | State::TimeWait) {
            self.transport.handle_timeout(now);
            self.pump_transport(now);
        }
        if self.release_deadline().is_some_and(|t| t <= now) {
            self.release_memory();
        }
    }

    /// Appends the next packet for this flow to `out` (a batch buffer: what is already there is
    /// kept) and returns its source and destination locators; `out` is unchanged if there is
    /// nothing to send.
    pub(crate) fn poll_transmit(
        &mut self,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Option<(Locator, Locator)> {
        if self.export_freeze.is_some() {
            return None;
        }
        if matches!(self.state, State::Established | State::TimeWait) {
            // Reading or writing since the last call may have drained the stream (FIN due) or
            // raised events.
            self.pump_transport(now);
        }
        // Our FIN about to go out answers the peer's FIN as well (FIN|ACK): one packet less
        // in every close where the peer finished first.
        if let (Some(Answer::Ack(peer_verno)), Some(p)) =
            (self.answers.front().copied(), &self.pending)
            && p.kind == Reliable::Fin
            && p.deadline.is_none()
            && self.peer_verno == Some(peer_verno)
        {
            self.answers.pop_front();
            let (verno, rto) = (p.verno, p.rto);
            let repr = self.control_repr(
                ControlFlags::FIN | ControlFlags::ACK,
                verno,
                peer_verno.wrapping_add(1),
            );
            let route = self.emit_sealed(&repr, out).then_some(self.control_route());
            if let Some(p) = &mut self.pending {
                p.deadline = (now + Duration::from_nanos(rto)).into();
            }
            return route;
        }
        if let Some(a) = self.answers.pop_front() {
            return self.emit_answer(a, out);
        }
        if let Some(route) = self.poll_path_transmit(now, out) {
            return Some(route);
        }
        if let Some(route) = self.poll_move_ask(now, out) {
            return Some(route);
        }
        if let Some(p) = &self.pending
            && p.deadline.is_none()
        {
            let (kind, verno, rto) = (p.kind, p.verno, p.rto);
            let route = self.emit_reliable(kind, verno, out);
            if let Some(p) = &mut self.pending {
                p.deadline = (now + Duration::from_nanos(rto)).into();
            }
            return route;
        }
        if let Some(route) = self.poll_join_transmit(now, out) {
            return Some(route);
        }
        let flushing = self.state == State::Closed && self.flush_transport;
        if self.state == State::Closed && !flushing {
            return None;
        }
        // Mid-move the transport runs on the old path unless it is frozen (old path gone).
        if (flushing || matches!(self.state, State::Established | State::TimeWait))
            && !self.transport.is_frozen()
        {
            let header = SalRepr::new(Protocol::STREAM, self.local_flow, self.peer_flow);
            let base = out.len();
            out.resize(base + BASE_HEADER_LEN, 0);
            if header
                .emit(&mut SalPacket::new_unchecked(&mut out[base..]))
                .is_err()
            {
                out.truncate(base);
                return None;
            }
            if self.transport.poll_transmit(now, out) > 0 {
                let path = self.transport.current_path();
                let route = self.address_for_path(path, out, base);
                let (Some(route), Some(protect)) = (route, self.protect.as_deref_mut()) else {
                    // Unreachable: a flow sends stream packets only once it has its keys, and
                    // the transport has no path the SAL does not.
                    out.truncate(base);
                    return None;
                };
                // A key update waits for the peer to acknowledge the current phase.
                protect.peer_acked_on(path, self.transport.largest_acked_on(path));
                protect.seal_on(path, out, base, BASE_HEADER_LEN);
                // A stream packet completes the server's handshake: the held ACK is not needed.
                self.held_ack = None;
                return Some(route);
            }
            out.truncate(base);
            self.flush_transport = false;
        }
        None
    }

    fn control_repr(&self, flags: ControlFlags, verno: u32, ackno: u32) -> SalRepr {
        let mut r = SalRepr::new(Protocol::NONE, self.local_flow, self.peer_flow);
        r.control = Some(ControlRepr {
            flags,
            verno,
            ackno,
        });
        r
    }

    /// Appends `repr` to `out` with a packet number and sealed (the SYN, which no key protects
    /// yet, goes as it is); on failure `out` is left as it was.
    fn emit_sealed(&mut self, repr: &SalRepr, out: &mut Vec<u8>) -> bool {
        self.emit_sealed_with(repr, Body::Empty, out)
    }

    /// [`emit_sealed`](Self::emit_sealed) with a payload: a SYN padded with zeros to a length,
    /// or a sealed payload (the SYN-ACK's certificate chain).
    fn emit_sealed_with(&mut self, repr: &SalRepr, body: Body, out: &mut Vec<u8>) -> bool {
        let base = out.len();
        let header_len = repr.buffer_len();
        out.resize(base + header_len, 0);
        if repr
            .emit(&mut SalPacket::new_unchecked(&mut out[base..]))
            .is_err()
        {
            out.truncate(base);
            return false;
        }
        if repr.control.is_some_and(|c| c.flags == ControlFlags::SYN) {
            if let Body::PadTo(len) = body {
                out.resize(base + len.max(header_len), 0);
            }
            return true;
        }
        let Some(protect) = self.protect.as_deref_mut() else {
            out.truncate(base);
            return false;
        };
        match body {
            Body::Sealed(chain) => protect.seal_control_with(out, base, header_len, chain.block()),
            Body::Empty | Body::PadTo(_) => protect.seal_control(out, base, header_len),
        }
        true
    }

    fn emit_reliable(
        &mut self,
        kind: Reliable,
        verno: u32,
        out: &mut Vec<u8>,
    ) -> Option<(Locator, Locator)> {
        let peer_verno_next = self.peer_verno.map_or(0, |v| v.wrapping_add(1));
        let mut body = Body::Empty;
        let (repr, src) = match kind {
            Reliable::Syn => {
                let mut r = SalRepr::new(Protocol::NONE, self.local_flow, FlowId::NONE);
                r.control = Some(ControlRepr {
                    flags: ControlFlags::SYN,
                    verno,
                    ackno: 0,
                });
                r.service = Some(ServiceRepr {
                    hop_limit: self.hop_limit,
                    id: self.service,
                });
                r.nonce = Some(self.local_nonce);
                let hs = self.hs.as_deref()?;
                r.keyshare = Some(hs.local_share);
                r.cookie = hs.cookie;
                if hs.peer_identity.is_some() {
                    // Pays for the proof the SYN-ACK will carry: the answer is never larger.
                    r.pad = IDENTITY_LEN;
                }
                if hs
                    .peer_identity
                    .as_ref()
                    .is_some_and(PeerIdentity::wants_chain)
                {
                    // Pays for the certificate chain too.
                    body = Body::PadTo(CERT_SYN_LEN);
                }
                r.source = vec![self.local];
                (r, self.local)
            }
            Reliable::SynAck => {
                let mut r = self.control_repr(
                    ControlFlags::SYN | ControlFlags::ACK,
                    verno,
                    peer_verno_next,
                );
                r.nonce = Some(self.local_nonce);
                let hs = self.hs.as_deref()?;
                r.keyshare = Some(hs.local_share);
                r.identity = hs.local_identity;
                if let Some(chain) = &hs.local_chain {
                    body = Body::Sealed(chain.clone());
                }
                (r, self.local)
            }
            Reliable::Rsyn => (
                self.control_repr(ControlFlags::RSYN, verno, 0),
                self.moving_to.as_deref().copied().unwrap_or(self.local),
            ),
            Reliable::Fin => (self.control_repr(ControlFlags::FIN, verno, 0), self.local),
            Reliable::Addresses => {
                let mut r = self.control_repr(ControlFlags::JOIN | ControlFlags::SYN, verno, 0);
                r.source = self.announced_addresses();
                (r, self.local)
            }
            Reliable::Priority => {
                let ackno = self.priority_to_send()?;
                let flags = ControlFlags::JOIN | ControlFlags::RSYN;
                (self.control_repr(flags, verno, ackno), self.local)
            }
            Reliable::Removal => {
                let ackno = self.removal_to_send()?;
                let flags = ControlFlags::JOIN | ControlFlags::FIN;
                (self.control_repr(flags, verno, ackno), self.local)
            }
        };
        let route = if src == self.local {
            self.control_route()
        } else {
            (src, self.peer)
        };
        self.emit_sealed_with(&repr, body, out).then_some(route)
    }

    fn emit_answer(&mut self, a: Answer, out: &mut Vec<u8>) -> Option<(Locator, Locator)> {
        let repr = match a {
            Answer::Ack(v) => self.control_repr(ControlFlags::ACK, 0, v.wrapping_add(1)),
            Answer::RsynAck(v) => {
                self.control_repr(ControlFlags::RSYN | ControlFlags::ACK, 0, v.wrapping_add(1))
            }
            Answer::Rst => self.control_repr(ControlFlags::RST, 0, 0),
        };
        self.emit_sealed(&repr, out).then_some(self.control_route())
    }

    /// An RST for a SYN-ACK that another server sent to this client connection's SYN (a SYN
    /// multicast to several instances, after this connection settled on the first answer), so
    /// that server frees its half-open flow at once. It is sealed with the keys of the flow the
    /// SYN-ACK proposed (our key share and its own), as that server requires of any RST;
    /// `None` if the SYN-ACK itself does not open with them, or once our ephemeral key is gone.
    pub(crate) fn reset_for_stray_syn_ack(&self, packet: &[u8], repr: &SalRepr) -> Option<Vec<u8>> {
        if self.role != Role::Client {
            return None;
        }
        let (mut protect, _, _) = self.protector_for_syn_ack(repr)?;
        let mut copy = packet.to_vec();
        let header_len = usize::from(SalPacket::new_unchecked(&copy[..]).header_len());
        protect.open(&mut copy, header_len, Space::Control).ok()?;
        let mut r = SalRepr::new(Protocol::NONE, self.local_flow, repr.src_flow);
        r.control = Some(ControlRepr {
            flags: ControlFlags::RST,
            verno: 0,
            ackno: 0,
        });
        let header_len = r.buffer_len();
        let mut out = vec![0u8; header_len];
        r.emit(&mut SalPacket::new_unchecked(&mut out[..])).ok()?;
        protect.seal_control(&mut out, 0, header_len);
        Some(out)
    }

    /// Whether a move of this end (an RSYN) is under way.
    pub(crate) fn is_moving(&self) -> bool {
        self.moving_to.is_some()
    }

    /// Whether the endpoint may forget this flow.
    pub(crate) fn is_closed(&self) -> bool {
        self.state == State::Closed && self.answers.is_empty() && !self.flush_transport
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_displaced_packet_goes_first_once() {
        let mut q = ReliableQueue::default();
        q.push_back(Reliable::Fin);
        q.push_back(Reliable::Priority);
        q.push_front(Reliable::Removal);
        q.push_front(Reliable::Priority);
        assert_eq!(q.pop_front(), Some(Reliable::Priority));
        assert_eq!(q.pop_front(), Some(Reliable::Removal));
        assert_eq!(q.pop_front(), Some(Reliable::Fin));
        assert_eq!(q.pop_front(), None);
    }

    #[test]
    fn reliable_queue_is_in_order_and_holds_each_kind_once() {
        let mut q = ReliableQueue::default();
        assert_eq!(q.pop_front(), None);
        q.push_back(Reliable::Rsyn);
        q.push_back(Reliable::Fin);
        q.push_back(Reliable::Rsyn);
        assert_eq!(q.pop_front(), Some(Reliable::Rsyn));
        q.push_back(Reliable::Rsyn);
        assert_eq!(q.pop_front(), Some(Reliable::Fin));
        assert_eq!(q.pop_front(), Some(Reliable::Rsyn));
        assert_eq!(q.pop_front(), None);
        for k in [
            Reliable::Syn,
            Reliable::SynAck,
            Reliable::Rsyn,
            Reliable::Fin,
        ] {
            q.push_back(k);
        }
        q.clear();
        assert_eq!(q.pop_front(), None);
    }
}
