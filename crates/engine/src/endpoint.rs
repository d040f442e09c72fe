//! The endpoint: one host's SAL. It owns the flows, answers and forwards SYNs by serviceID, and
//! demultiplexes everything else by flowID.
//!
//! # Call order (sans-IO, as in quinn-proto)
//!
//! * Feed every received UDP datagram to [`Endpoint::handle_datagram`] with the local locator it
//!   arrived on and its source.
//! * After any input, drain [`Endpoint::poll_transmit`] until it returns `None` and send each
//!   [`Transmit`]; drain [`Endpoint::poll_event`] for the application.
//! * Arm a timer for [`Endpoint::poll_timeout`]; when it fires, call
//!   [`Endpoint::handle_timeout`].
//! * `now` must never go backwards between calls.
//!
//! # Bad input
//!
//! A datagram that does not parse is dropped and counted in [`EndpointStats`]; one for an
//! unknown flow is dropped without a reply (a reply there could amplify or confirm a scan). A SYN
//! no rule serves gets a NACK that is smaller than the SYN.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use serval_table::{Action, FlowTable, ListenerId, ServiceTable, Target};
use serval_wire::ext::{ControlFlags, ControlRepr};
use serval_wire::{FlowId, Locator, Nonce, Protocol, SalPacket, SalRepr, ServiceId, ServicePrefix};

use crate::Instant;
pub use crate::connection::CloseReason;
pub use crate::connection::ExportError;
pub use crate::connection::identity::{
    CERT_SYN_LEN, CertError, CertProblem, CertificateChain, IdentityError, PeerIdentity,
    RevocationLists, ServerName, TrustAnchors,
};
pub use crate::connection::multipath::{AddPathError, JOIN_TRIES, PathSummary};
pub use crate::connection::protect::{DEFAULT_KEY_UPDATE_INTERVAL, Protection};
pub use crate::connection::validation::PathStats;
use crate::registrar::{Registrar, RegistrarEvent};

mod batch;
mod commit;
mod cookie;
mod delay;
mod discovery;
mod failover;
mod inspect;
mod multipath;
mod ratelimit;
mod registration;
use crate::connection::{
    ConnEvent, ConnectError, Connection, ControlConfig, NewConnection, Role, State, Syn,
};
use crate::schedule::Schedule;
pub use crate::transport::conn::DatagramError as ConnDatagramError;
pub use crate::transport::conn::{MAX_PATHS, PathInfo, Scheduler, UnknownScheduler};
use crate::transport::conn::{ReadError, TransportConfig, TransportStats, WriteError};

/// How much longer an IPv6 header is than an IPv4 one (40 against 20 bytes).
const IPV6_EXTRA_HEADER: u16 = 20;
pub use batch::Datagram;
pub use commit::{Checkpoint, CommitMark, MAX_HELD_DATAGRAMS, STANDBY_PN_JUMP};
pub use cookie::{COOKIE_PERIOD, SynCookies};
pub use delay::{DEFAULT_DELAY_TIMEOUT, HeldSyn, HeldSynId, ReleaseError, Verdict};
pub use failover::STALE_PTOS;
pub use inspect::{ConnectionInfo, MAX_APP_STATE};
pub use ratelimit::SynRateLimit;
pub use registration::RegistrationRequest;

/// Handle of a connection inside its [`Endpoint`]: the connection's slot (low 32 bits) and
/// the slot's generation (high 32 bits), so that a handle kept after its connection was
/// forgotten never reaches the next connection in the same slot (every call with it finds
/// nothing, as for any closed connection). The first connection of an endpoint is
/// `ConnectionHandle(0)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionHandle(pub u64);

impl ConnectionHandle {
    fn new(index: usize, generation: u32) -> ConnectionHandle {
        ConnectionHandle(index as u64 | u64::from(generation) << 32)
    }

    /// The slot.
    fn index(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }

    fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The local locator to send from.
    pub src: Locator,
    /// Where to send it.
    pub dst: Locator,
    /// The UDP payload.
    pub payload: Vec<u8>,
}

/// What happened, for the application and the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A connect completed.
    Connected(ConnectionHandle),
    /// A connect failed.
    ConnectFailed(ConnectionHandle, ConnectError),
    /// A connection is waiting in the listener's accept queue.
    Incoming(ListenerId),
    /// The connection has bytes (or its end) to read.
    Readable(ConnectionHandle),
    /// The connection can take more bytes after having refused some.
    Writable(ConnectionHandle),
    /// The peer finished its direction.
    Finished(ConnectionHandle),
    /// A datagram arrived on the connection.
    Datagram(ConnectionHandle),
    /// A datagram by name is waiting for the listener ([`Endpoint::recv_datagram`]).
    NamedDatagram(ListenerId),
    /// This end moved to a new local locator.
    Migrated(ConnectionHandle, Locator),
    /// A path (its ID) joined the connection and was validated both ways: it carries
    /// traffic now ([`Endpoint::add_path`], or the peer joined it).
    PathUp(ConnectionHandle, u32),
    /// A path (its ID) left the connection: removed by either end, its join unanswered, or
    /// silent for the idle timeout while other paths worked.
    PathDown(ConnectionHandle, u32),
    /// A move to this local locator was given up before the peer confirmed it: the
    /// application moved the connection elsewhere meanwhile ([`Endpoint::migrate`] again),
    /// or the flow finished while the new path stayed silent (its FIN waits
    /// [`FIN_WAITS_FOR_RSYN`](crate::connection::FIN_WAITS_FOR_RSYN) RSYN timeouts, not
    /// for ever). The connection stays on its current locator unless the other move takes
    /// it.
    MoveAbandoned(ConnectionHandle, Locator),
    /// The peer moved to a new locator: by RSYN, or, seen at a new address (a NAT rebinding),
    /// once that address answered a path challenge (docs/protocol.md §4.2).
    PeerMigrated(ConnectionHandle, Locator),
    /// Packets of the peer came from this new address, but it never answered a path
    /// challenge (or sent too little to pay for one): the connection stays where it was.
    PathValidationFailed(ConnectionHandle, Locator),
    /// Server: the client asked, by a MOVE_REQUEST under the flow's keys, that this end of
    /// the connection move to the instance whose migration agent is at this locator
    /// ([`Endpoint::ask_move`]). Acting on it is the application's (its migration agent's).
    MoveAsked(ConnectionHandle, Locator),
    /// Client: the server will not move its end where this end's MOVE_REQUEST named (the
    /// locator), for this reason ([`Endpoint::refuse_move`]).
    MoveRefused(ConnectionHandle, Locator, crate::frame::MoveRefusal),
    /// The connection is gone; its handle is no longer valid.
    Closed(ConnectionHandle, CloseReason),
    /// A listener bound a service: the control plane should register it ("active sockets").
    Registered {
        /// The listener.
        listener: ListenerId,
        /// What it serves.
        prefix: ServicePrefix,
    },
    /// A listener closed: the control plane should unregister it.
    Unregistered {
        /// The listener.
        listener: ListenerId,
        /// What it served.
        prefix: ServicePrefix,
    },
    /// A REGISTER or UNREGISTER arrived at an endpoint that serves registrations
    /// ([`Endpoint::set_serve_registrations`]); answer it with
    /// [`Endpoint::answer_registration`].
    RegistrationRequest(RegistrationRequest),
    /// The registration of a prefix with this endpoint's router changed state
    /// ([`Endpoint::set_router`]).
    Registrar(RegistrarEvent),
    /// A SYN hit a DELAY rule and waits for [`Endpoint::release`] (or its deadline).
    SynHeld(HeldSyn),
}

/// Configuration of an [`Endpoint`].
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointConfig {
    /// The transport of each connection.
    pub transport: TransportConfig,
    /// The control channel's timers.
    pub control: ControlConfig,
    /// Hop limit of the SYNs this endpoint sends.
    pub hop_limit: u8,
    /// Most connections waiting in one listener's accept queue; SYNs beyond it are ignored.
    pub accept_backlog: usize,
    /// Largest UDP payload of a datagram sent by name (header included). Such datagrams have no
    /// path-MTU discovery, so the default, 1200 bytes, fits any IPv4 or IPv6 path.
    pub max_datagram_packet: usize,
    /// Most datagrams queued unread per listener; later ones are dropped and counted.
    pub datagram_queue: usize,
    /// Most datagrams the endpoint itself queues to send (forwarded SYNs and datagrams by
    /// name, NACKs, datagrams sent by name) before the caller drains them with
    /// [`Endpoint::poll_transmit`]; beyond it new ones are dropped and counted, so a flood
    /// arriving faster than it can be sent costs bounded memory.
    pub max_queued_transmits: usize,
    /// Most SYNs held by DELAY rules at once; more are dropped and counted.
    pub delay_queue: usize,
    /// How long a SYN held by a DELAY rule waits for a verdict before it is dropped (and the
    /// client NACKed).
    pub delay_timeout: std::time::Duration,
    /// Routerless mode: a SYN from the discovery group is answered after a random wait with
    /// mean `discovery_answer_scale / weight` (exponential; the listener's weight), so that
    /// among instances that all answer, the first to arrive — the one the client keeps — is
    /// each one in proportion to its weight. Default 10 ms; zero answers at once (the nearest
    /// instance wins).
    pub discovery_answer_scale: std::time::Duration,
    /// How this endpoint's flows are protected. [`Protection::Plaintext`] (authenticated, not
    /// encrypted) applies to a flow only when both of its ends are so configured; otherwise
    /// the flow is encrypted. Default encrypted.
    pub protection: Protection,
    /// Packets a flow seals in one key phase before it updates its keys. Default
    /// [`DEFAULT_KEY_UPDATE_INTERVAL`] (2^22).
    pub key_update_interval: u64,
    /// Server: the key this endpoint proves its identity with when a client asks (the
    /// instance's `--key`). Default none.
    pub identity: Option<serval_keys::PrivateKey>,
    /// Client: the server identity every connect requires (a pinned key, the key a
    /// self-certifying serviceID commits to, or a key certified for the name by a CA: then
    /// connect with [`Endpoint::connect_name`]). Default none: encrypted, but anyone
    /// answering the SYN is accepted.
    pub peer_identity: Option<PeerIdentity>,
    /// Server: the certificate chain (leaf first; the leaf certifies
    /// [`identity`](Self::identity)'s key) sent to clients that ask for it
    /// ([`PeerIdentity::Ca`]; `--cert`). Default none.
    pub certificate: Option<CertificateChain>,
    /// Wall-clock time at [`Instant::ZERO`], as a duration since the UNIX epoch: a client
    /// checks a server's certificate at this plus `now` (the engine reads no clock). Default
    /// none, under which every certificate check fails; the runtime sets it when it binds.
    pub unix_time_origin: Option<std::time::Duration>,
    /// When a connection's path goes silent — its probe timeout fires
    /// [`STALE_PTOS`] times in a row with nothing acknowledged,
    /// the link still up — move it (RSYN, make-before-break) to this endpoint's next local
    /// locator of the same family, if it has one. Also turns on each connection's
    /// [`silence_probe`](TransportConfig::silence_probe), so that an end that only receives
    /// has a probe timeout too. Default off; the runtime turns it on when it follows the
    /// host (`FollowHost::Flows`).
    pub path_failover: bool,
    /// Multipath (docs/moving-flows.md §2): a server announces its other local locators to
    /// each client (JOIN|SYN); a client joins a path from each of its other local locators to
    /// the peer locator that shares the longest prefix with it, once connected and again when
    /// the server's announcement arrives. Default off: one path per flow, unless the
    /// application adds paths ([`Endpoint::add_path`]).
    pub multipath: bool,
    /// Paths from or to these local locators are backups (data only while no other path
    /// works): those this end joins from them (with [`multipath`](Self::multipath)), and
    /// those the peer joins to them. A locator with port 0 stands for every port of its
    /// address (a socket bound to port 0 gets its port only when bound).
    pub backup_locals: Vec<Locator>,
    /// Per-source limit on the SYNs this endpoint handles (forwards, NACKs, holds or accepts);
    /// beyond it a source's SYNs are dropped silently and counted. Service routers set it
    /// (`RouterConfig`); default none.
    pub syn_rate_limit: Option<SynRateLimit>,
    /// When SYNs for local listeners must first echo a stateless cookie (a SYN flood from
    /// forged addresses then creates no state). Default: once 256 handshakes are half open.
    pub syn_cookies: SynCookies,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            transport: TransportConfig::default(),
            control: ControlConfig::default(),
            hop_limit: 16,
            accept_backlog: 1024,
            max_datagram_packet: 1200,
            datagram_queue: 1024,
            max_queued_transmits: 4096,
            delay_queue: 1024,
            delay_timeout: DEFAULT_DELAY_TIMEOUT,
            discovery_answer_scale: std::time::Duration::from_millis(10),
            protection: Protection::Encrypted,
            key_update_interval: DEFAULT_KEY_UPDATE_INTERVAL,
            syn_cookies: SynCookies::default(),
            syn_rate_limit: None,
            identity: None,
            peer_identity: None,
            certificate: None,
            unix_time_origin: None,
            path_failover: false,
            multipath: false,
            backup_locals: Vec::new(),
        }
    }
}

/// Counters of an endpoint, for logs and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Datagrams received.
    pub received: u64,
    /// Dropped: did not parse as a SAL packet.
    pub malformed: u64,
    /// Dropped: for no flow of ours.
    pub unknown_flow: u64,
    /// Dropped: failed authentication or arrived out of place.
    pub auth_failures: u64,
    /// SYNs answered with a NACK (no rule, or DROP).
    pub nacks_sent: u64,
    /// SYNs forwarded to a next hop.
    pub forwarded: u64,
    /// SYNs dropped: hop limit reached or a forwarding loop.
    pub hop_limit_drops: u64,
    /// SYNs dropped: the listener's accept queue was full.
    pub backlog_drops: u64,
    /// SYNs held by a DELAY rule (retransmissions of a held SYN not included).
    pub delayed: u64,
    /// Held SYNs released with [`Verdict::Resolve`] (looked up again).
    pub delay_resolved: u64,
    /// Held SYNs released with [`Verdict::Drop`] (client NACKed).
    pub delay_dropped: u64,
    /// Held SYNs that got no verdict in time (client NACKed).
    pub delay_timeouts: u64,
    /// SYNs a DELAY rule could not hold: the queue was full.
    pub delay_overflows: u64,
    /// Retransmissions of a SYN already held, ignored.
    pub delay_retransmits: u64,
    /// Connections accepted.
    pub accepted: u64,
    /// Datagrams by name delivered to a local listener.
    pub datagrams_received: u64,
    /// Datagrams by name dropped: no rule, DROP, a full queue, or a bad payload.
    pub datagrams_dropped: u64,
    /// Registration messages that did not parse (also counted in `malformed`).
    pub registrations_malformed: u64,
    /// Registration requests handed to the application (an endpoint serving registrations).
    pub registration_requests: u64,
    /// Registration answers sent by the application.
    pub registration_answers: u64,
    /// Registration messages dropped as out of place: a request at an endpoint that serves
    /// none, or an answer that matches no outstanding request of the registrar.
    pub registrations_unexpected: u64,
    /// Datagrams not queued because [`EndpointConfig::max_queued_transmits`] were waiting.
    pub transmit_queue_drops: u64,
    /// Datagrams a connection produced while holding its output for a standby, dropped
    /// because it held [`MAX_HELD_DATAGRAMS`] already (the standby stopped confirming).
    pub held_drops: u64,
    /// Paths the peer joined to a connection replicated to a standby, refused (JOIN|FIN): its
    /// checkpoints carry one path.
    pub joins_refused: u64,
    /// Datagrams received on the discovery group ([`Endpoint::handle_discovery_datagram`];
    /// also counted in `received`).
    pub discovery_received: u64,
    /// Discovery SYNs answered: a local listener serves the service (retransmissions not
    /// included).
    pub discovery_answered: u64,
    /// Discovery datagrams dropped without a reply: no local listener serves the service, or
    /// not a SYN.
    pub discovery_ignored: u64,
    /// SYN-ACKs dropped because the connection was already established with another instance
    /// (two endpoints answered the same discovery SYN; the first answer won).
    pub duplicate_syn_acks: u64,
    /// Authenticated RSTs sent for such SYN-ACKs, so the other instance frees its half-open
    /// flow.
    pub stray_resets: u64,
    /// Moves started because a connection's path went silent
    /// ([`EndpointConfig::path_failover`]).
    pub path_failovers: u64,
    /// Packets of live flows dropped as replays: a packet number already opened, or older than
    /// the replay window. (Packets that do not authenticate count in `auth_failures`.)
    pub replays: u64,
    /// SYNs without a usable key share (none, an unknown group, or a weak key): dropped.
    pub bad_key_shares: u64,
    /// Server: SYNs answered with a cookie (a retry NACK) instead of state.
    pub cookies_sent: u64,
    /// Server: SYNs whose cookie was valid (they then created a half-open flow).
    pub cookies_accepted: u64,
    /// Server: SYNs with a cookie that was forged, stale or for another SYN (answered with a
    /// fresh one).
    pub cookies_refused: u64,
    /// Client: SYNs sent again with a server's cookie.
    pub cookie_retries: u64,
    /// SYNs dropped because their source exceeded [`EndpointConfig::syn_rate_limit`].
    pub syns_rate_limited: u64,
    /// Validations of peers' new addresses (NAT rebindings, renumbered peers), summed over
    /// the flows (docs/protocol.md §4.2): started, validated, failed, challenges sent.
    pub paths: PathStats,
}

struct Listener {
    prefix: ServicePrefix,
    /// Its weight and priority, which the registrar registers (summed per prefix).
    weight: u32,
    priority: u32,
    /// Whether it takes connections (a datagram-only listener NACKs SYNs).
    streams: bool,
    queue: VecDeque<ConnectionHandle>,
    datagrams: VecDeque<NamedDatagram>,
}

/// A datagram received by service name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedDatagram {
    /// The serviceID it was sent to.
    pub to: ServiceId,
    /// The sender's serviceID, if it sent from a bound service.
    pub from: Option<ServiceId>,
    /// The sender's locator (the first entry of SOURCE, as the first hop saw it).
    pub from_locator: Locator,
    /// The application data.
    pub data: Vec<u8>,
}

/// Why a datagram by name could not be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// No rule serves the destination, or a DROP rule matched.
    #[error("no route to service {0}")]
    NoRoute(ServiceId),
    /// The packet would exceed [`EndpointConfig::max_datagram_packet`].
    #[error("datagram of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Bytes of application data offered.
        len: usize,
        /// Most application data that fits.
        max: usize,
    },
    /// The endpoint has no local address of the next hop's family.
    #[error("no local address to reach {0}")]
    NoLocalAddress(Locator),
    /// [`EndpointConfig::max_queued_transmits`] datagrams are already waiting to be sent.
    #[error("send queue full")]
    QueueFull,
}

/// Flags byte of a datagram-by-name payload: the sender's serviceID follows.
const DGRAM_HAS_SOURCE_SERVICE: u8 = 0x01;

/// One host's SAL; see the [module docs](self).
pub struct Endpoint {
    config: EndpointConfig,
    rng: ChaCha20Rng,
    table: Arc<ServiceTable>,
    locals: Vec<Locator>,
    flows: FlowTable<ConnectionHandle>,
    /// Connection slots, reused through `free`. Boxed: the slot vector keeps the length of
    /// the most connections ever open at once (TIME-WAIT flows included: a churn of short
    /// connections holds thousands), and a free slot should cost a pointer, not a whole
    /// connection's worth of memory for the life of the process.
    conns: Vec<Option<Box<Connection>>>,
    /// Each slot's generation, bumped when its connection is forgotten.
    generations: Vec<u32>,
    free: Vec<usize>,
    /// SYNs being answered, by (client flow, client nonce), so retransmitted SYNs find them.
    half_open: HashMap<(FlowId, Nonce), ConnectionHandle>,
    listeners: HashMap<ListenerId, Listener>,
    next_listener: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    stats: EndpointStats,
    /// Which connections may have something to send, and their timers.
    schedule: Schedule,
    /// Reused by [`Endpoint::handle_timeout`].
    due: Vec<usize>,
    /// Registers the listeners with a router, once one is set.
    registrar: Option<Registrar>,
    /// Whether registration requests go to the application (a router) or are dropped.
    serve_registrations: bool,
    /// SYNs held by DELAY rules.
    delay: delay::DelayQueue,
    /// Discovery SYNs waiting for their weighted answer time.
    answer_later: discovery::AnswerLater,
    /// Set while a held SYN is looked up again, so that DELAY does not hold it twice.
    resolving_held: bool,
    /// Answering a discovery SYN whose weighted wait is over (so it is not queued again).
    answering_discovery: bool,
    /// Prefixes registered with the router beside the listeners' (a child router announcing
    /// what it serves to its parent), with weight and priority.
    announced: HashMap<ServicePrefix, (u32, u32)>,
    /// Where [`Endpoint::handle_datagram`] copies a packet to open it.
    scratch: Vec<u8>,
    /// The key of this endpoint's SYN cookies.
    cookie_secret: [u8; 32],
    /// Token buckets of [`EndpointConfig::syn_rate_limit`].
    syn_limiter: ratelimit::SynLimiter,
    /// Export IDs of the snapshots imported here, oldest first (at most
    /// [`MAX_IMPORTED_IDS`]), so that one snapshot is never imported twice.
    imported: VecDeque<u128>,
    /// Output held for a standby (docs/moving-flows.md §3.3).
    hold: commit::OutputHold,
    /// The SYNs of the batch being handled, resolved ahead.
    ahead: batch::Ahead,
}

/// How many export IDs an endpoint remembers to refuse a snapshot imported twice
/// ([`SnapshotError::Replayed`](crate::snapshot::SnapshotError::Replayed)).
pub const MAX_IMPORTED_IDS: usize = 4096;

impl Endpoint {
    /// An endpoint on `locals` with its random choices (flowIDs, nonces, sequence numbers) drawn
    /// from `seed`, resolving services through `table` (which the caller may share and edit).
    pub fn new(
        config: EndpointConfig,
        seed: [u8; 32],
        table: Arc<ServiceTable>,
        locals: Vec<Locator>,
    ) -> Endpoint {
        let mut rng = ChaCha20Rng::from_seed(seed);
        let mut cookie_secret = [0u8; 32];
        rng.fill_bytes(&mut cookie_secret);
        Endpoint {
            config,
            rng,
            table,
            locals,
            flows: FlowTable::new(),
            conns: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            half_open: HashMap::new(),
            listeners: HashMap::new(),
            next_listener: 1,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: EndpointStats::default(),
            schedule: Schedule::default(),
            due: Vec::new(),
            registrar: None,
            serve_registrations: false,
            announced: HashMap::new(),
            delay: delay::DelayQueue::default(),
            answer_later: discovery::AnswerLater::default(),
            resolving_held: false,
            answering_discovery: false,
            scratch: Vec::new(),
            cookie_secret,
            syn_limiter: ratelimit::SynLimiter::default(),
            imported: VecDeque::new(),
            hold: commit::OutputHold::default(),
            ahead: batch::Ahead::default(),
        }
    }

    /// The service table this endpoint resolves through.
    pub fn table(&self) -> &Arc<ServiceTable> {
        &self.table
    }

    /// The local locators.
    pub fn locals(&self) -> &[Locator] {
        &self.locals
    }

    /// Adds a local locator.
    pub fn add_local(&mut self, loc: Locator) {
        if !self.locals.contains(&loc) {
            self.locals.push(loc);
            if self.config.multipath {
                self.join_from_new_local();
            }
        }
        self.locals_changed();
    }

    /// Removes a local locator; flows using it keep it until migrated. A flow already moving
    /// away from it stops sending on it and waits for its new path to be validated. With
    /// multipath, the paths from it (other than a flow's first) are removed at once, what they
    /// carried going out on the others.
    pub fn remove_local(&mut self, loc: &Locator) {
        self.locals.retain(|l| l != loc);
        let mut gone = Vec::new();
        for c in self.conns.iter_mut().flatten() {
            gone.extend(c.local_gone(*loc));
            if c.local == *loc {
                c.local_removed();
            }
        }
        for flow in gone {
            self.flows.remove(flow);
        }
        self.locals_changed();
    }

    /// Counters.
    pub fn stats(&self) -> EndpointStats {
        let mut s = self.stats.clone();
        for c in self.conns.iter().flatten() {
            s.auth_failures += c.auth_failures;
            s.replays += c.replays();
            s.malformed += c.malformed;
            s.paths.add(&c.path_stats());
        }
        s
    }

    /// A local locator of the same family as `dst`.
    fn local_for(&self, dst: &Locator) -> Option<Locator> {
        self.locals
            .iter()
            .find(|l| l.is_ipv4() == dst.is_ipv4())
            .copied()
    }

    fn nonce(&mut self) -> Nonce {
        let mut n = [0u8; 16];
        self.rng.fill_bytes(&mut n);
        Nonce(n)
    }

    fn insert_conn(&mut self, c: Connection) -> ConnectionHandle {
        let i = match self.free.pop() {
            Some(i) => {
                self.conns[i] = Some(Box::new(c));
                i
            }
            None => {
                self.conns.push(Some(Box::new(c)));
                self.generations.push(0);
                self.conns.len() - 1
            }
        };
        let h = self.handle_at(i);
        self.touch(h);
        h
    }

    /// The handle of the connection now in slot `i`.
    fn handle_at(&self, i: usize) -> ConnectionHandle {
        ConnectionHandle::new(i, self.generations.get(i).copied().unwrap_or(0))
    }

    /// The connection `h` names, if it is still there (not one that took its slot since).
    fn conn_ref(&self, h: ConnectionHandle) -> Option<&Connection> {
        slot(&self.conns, &self.generations, h)
    }

    /// After anything happened to a connection (a packet, a timer, an application call): hands
    /// its events on, forgets it if it is closed, and otherwise queues it for sending and
    /// re-arms its timer.
    fn touch(&mut self, h: ConnectionHandle) {
        if self.settle(h) {
            self.schedule.wake(h.index());
        }
    }

    /// Hands a connection's events on, forgets it if it is closed, and re-arms its timer.
    /// Returns whether it is still there.
    fn settle(&mut self, h: ConnectionHandle) -> bool {
        self.collect_events(h);
        match self.conn_ref(h) {
            Some(c) => {
                let deadline = c.poll_timeout();
                self.schedule.arm(h.index(), deadline);
                true
            }
            None => false,
        }
    }

    fn new_connection(
        &mut self,
        role: Role,
        service: ServiceId,
        local: Locator,
        peer: Locator,
    ) -> (FlowId, NewConnection) {
        // The handle is patched in once known; allocate the flowID against a placeholder.
        let flow = self
            .flows
            .allocate(&mut self.rng, ConnectionHandle(u64::MAX));
        let n = NewConnection {
            role,
            service,
            local_flow: flow,
            local_nonce: self.nonce(),
            local,
            peer,
            initial_verno: self.rng.next_u32(),
            hop_limit: self.config.hop_limit,
            ctl: self.config.control.clone(),
            transport: self.transport_for(local),
            kx_random: {
                let mut r = [0u8; 32];
                self.rng.fill_bytes(&mut r);
                r
            },
            protection: self.config.protection,
            key_update_interval: self.config.key_update_interval,
            identity: self.config.identity.clone(),
            peer_identity: self.config.peer_identity.clone(),
            certificate: self.config.certificate.clone(),
            server_name: None,
            unix_time_origin: self.config.unix_time_origin,
        };
        (flow, n)
    }

    /// The transport configuration of a connection from `local`. The path-MTU ceiling
    /// ([`TransportConfig::max_udp_payload`]) is an IPv4 figure; a non-loopback IPv6 path gets
    /// 20 bytes less, IPv6's header being 20 bytes longer (otherwise its first probe is one the
    /// sending kernel refuses).
    fn transport_for(&self, local: Locator) -> TransportConfig {
        let mut t = self.config.transport.clone();
        if local.is_ipv6() && !local.ip().is_loopback() {
            t.max_udp_payload = t.max_udp_payload.saturating_sub(IPV6_EXTRA_HEADER);
        }
        // An end that only receives probes a silent path, so that failover sees it too.
        t.silence_probe |= self.config.path_failover;
        t
    }

    fn register_flow(&mut self, flow: FlowId, h: ConnectionHandle) {
        if let Some(slot) = self.flows.get_mut(flow) {
            *slot = h;
        }
    }

    /// Connects to `service`, resolving it in the service table: a FORWARD rule sends the SYN to
    /// that next hop, a DEMUX rule to this endpoint's own listener; no rule or DROP fails at once
    /// with [`ConnectError::NoRoute`].
    pub fn connect(
        &mut self,
        now: Instant,
        service: ServiceId,
    ) -> Result<ConnectionHandle, ConnectError> {
        self.connect_to(now, service, None)
    }

    /// Connects to the service named `name`, as [`connect`](Self::connect), keeping the name
    /// for the check of the server's certificate that [`PeerIdentity::Ca`] requires (a
    /// serviceID, being a hash, names nothing a certificate can).
    pub fn connect_name(
        &mut self,
        now: Instant,
        name: &ServerName,
    ) -> Result<ConnectionHandle, ConnectError> {
        self.connect_to(now, name.service(), Some(name))
    }

    /// Connects to the service named `name` sending the SYN to `next_hop`, as
    /// [`connect_via`](Self::connect_via), keeping the name as
    /// [`connect_name`](Self::connect_name) does.
    pub fn connect_name_via(
        &mut self,
        now: Instant,
        name: &ServerName,
        next_hop: Locator,
    ) -> Result<ConnectionHandle, ConnectError> {
        self.connect_via_to(now, name.service(), next_hop, Some(name))
    }

    fn connect_to(
        &mut self,
        now: Instant,
        service: ServiceId,
        name: Option<&ServerName>,
    ) -> Result<ConnectionHandle, ConnectError> {
        let flow_key = self.rng.next_u64();
        let next_hop = match self.table.snapshot().resolve(&service, flow_key) {
            Some(r) => match r.action {
                Action::Forward(loc) => loc,
                Action::Demux(_) => *self.locals.first().ok_or(ConnectError::NoRoute(service))?,
                Action::Delay | Action::Drop => return Err(ConnectError::NoRoute(service)),
            },
            None => return Err(ConnectError::NoRoute(service)),
        };
        self.connect_via_to(now, service, next_hop, name)
    }

    /// Connects to `service` sending the SYN to `next_hop` (a router or the instance itself),
    /// without consulting the service table.
    pub fn connect_via(
        &mut self,
        now: Instant,
        service: ServiceId,
        next_hop: Locator,
    ) -> Result<ConnectionHandle, ConnectError> {
        self.connect_via_to(now, service, next_hop, None)
    }

    fn connect_via_to(
        &mut self,
        now: Instant,
        service: ServiceId,
        next_hop: Locator,
        name: Option<&ServerName>,
    ) -> Result<ConnectionHandle, ConnectError> {
        let local = self
            .local_for(&next_hop)
            .ok_or(ConnectError::NoLocalAddress(next_hop))?;
        let (flow, mut n) = self.new_connection(Role::Client, service, local, next_hop);
        n.server_name = name.cloned();
        let h = self.insert_conn(Connection::client(now, n));
        self.register_flow(flow, h);
        Ok(h)
    }

    /// Binds `prefix` to a new listener: adds a DEMUX rule (with `priority` and `weight`) to the
    /// service table and emits [`Event::Registered`].
    pub fn listen(&mut self, prefix: ServicePrefix, priority: u32, weight: u32) -> ListenerId {
        self.add_listener(prefix, priority, weight, true)
    }

    /// Like [`Endpoint::listen`], for datagrams by name only: SYNs that reach it are answered
    /// with a NACK.
    pub fn listen_datagrams(
        &mut self,
        prefix: ServicePrefix,
        priority: u32,
        weight: u32,
    ) -> ListenerId {
        self.add_listener(prefix, priority, weight, false)
    }

    fn add_listener(
        &mut self,
        prefix: ServicePrefix,
        priority: u32,
        weight: u32,
        streams: bool,
    ) -> ListenerId {
        let id = ListenerId(self.next_listener);
        self.next_listener += 1;
        // A zero weight is the only error the table can return; clamp it rather than fail.
        let _ = self.table.add_target(
            prefix,
            Target::new(Action::Demux(id), priority, weight.max(1)),
        );
        self.listeners.insert(
            id,
            Listener {
                prefix,
                weight: weight.max(1),
                priority,
                streams,
                queue: VecDeque::new(),
                datagrams: VecDeque::new(),
            },
        );
        self.events.push_back(Event::Registered {
            listener: id,
            prefix,
        });
        self.registration_changed(prefix);
        id
    }

    /// Closes a listener: removes its rule and emits [`Event::Unregistered`]. Connections it
    /// accepted live on; ones still in its queue are reset.
    pub fn close_listener(&mut self, id: ListenerId) {
        let Some(l) = self.listeners.remove(&id) else {
            return;
        };
        self.table.remove_target(&l.prefix, &Action::Demux(id));
        for h in l.queue {
            self.abort(h);
        }
        self.events.push_back(Event::Unregistered {
            listener: id,
            prefix: l.prefix,
        });
        self.registration_changed(l.prefix);
    }

    /// The next established connection of a listener.
    pub fn accept(&mut self, id: ListenerId) -> Option<ConnectionHandle> {
        self.listeners.get_mut(&id)?.queue.pop_front()
    }

    fn conn(&mut self, h: ConnectionHandle) -> Option<&mut Connection> {
        slot_mut(&mut self.conns, &self.generations, h)
    }

    /// Writes stream bytes; `Ok(0)` means the send buffer is full (wait for
    /// [`Event::Writable`]).
    pub fn write(&mut self, h: ConnectionHandle, data: &[u8]) -> Result<usize, WriteError> {
        let r = match self.conn(h) {
            // Frozen for a move: what it accepted now would be in no snapshot.
            Some(c) if c.is_exported() => Ok(0),
            Some(c) if c.state == State::Established => c.transport.write(data),
            Some(c) if matches!(c.state, State::SynSent | State::SynRcvd) => Ok(0),
            _ => Err(WriteError::Closed),
        };
        if matches!(r, Ok(n) if n > 0) {
            self.touch(h);
        }
        r
    }

    /// Ends this direction of the stream after what was written.
    pub fn finish(&mut self, h: ConnectionHandle) -> Result<(), WriteError> {
        let r = match self.conn(h) {
            Some(c) if c.is_exported() => Err(WriteError::Closed),
            Some(c) if c.state == State::Established => c.transport.finish(),
            _ => Err(WriteError::Closed),
        };
        if r.is_ok() {
            self.touch(h);
        }
        r
    }

    /// Reads stream bytes: `Ok(None)` would block, `Ok(Some(0))` is the end of the stream.
    pub fn read(
        &mut self,
        h: ConnectionHandle,
        buf: &mut [u8],
    ) -> Result<Option<usize>, ReadError> {
        let (r, released) = match self.conn(h) {
            // Frozen for a move: what is unread travels in the snapshot.
            Some(c) if c.is_exported() => (Ok(None), false),
            Some(c) => {
                let r = c.transport.read(buf);
                // Reading before writing: no data is coming soon to carry the handshake's ACK.
                let released = matches!(r, Ok(None)) && c.on_read_blocked();
                (r, released)
            }
            None => (Err(ReadError::Closed), false),
        };
        // Reading may open the flow-control window (MAX_DATA to send) or, at the end of the
        // stream, let the close proceed.
        if released || matches!(r, Ok(Some(_))) {
            self.touch(h);
        }
        r
    }

    /// Queues an unreliable datagram on connection `h` (a DATAGRAM frame): sent once, when
    /// the congestion window allows, never retransmitted. It may be queued before the
    /// handshake completes. At most [`TransportConfig::datagram_queue`] wait; beyond that,
    /// [`ConnDatagramError::QueueFull`].
    pub fn write_datagram(
        &mut self,
        h: ConnectionHandle,
        data: &[u8],
    ) -> Result<(), ConnDatagramError> {
        let r = match self.conn(h) {
            Some(c)
                if matches!(
                    c.state,
                    State::SynSent | State::SynRcvd | State::Established
                ) =>
            {
                c.transport.send_datagram(data)
            }
            _ => Err(ConnDatagramError::Closed),
        };
        if r.is_ok() {
            self.touch(h);
        }
        r
    }

    /// The next datagram the peer sent on connection `h`, if any ([`Event::Datagram`] says
    /// when some arrived). The receive queue holds at most
    /// [`TransportConfig::datagram_queue`] unread datagrams; those that arrive while it is
    /// full are dropped and counted in [`TransportStats::datagrams_dropped`].
    pub fn read_datagram(&mut self, h: ConnectionHandle) -> Option<Vec<u8>> {
        self.conn(h)?.transport.recv_datagram()
    }

    /// The largest datagram [`Endpoint::write_datagram`] accepts on `h`'s current path.
    pub fn max_datagram_size(&self, h: ConnectionHandle) -> Option<usize> {
        Some(self.conn_ref(h)?.transport.max_datagram_size())
    }

    /// Whether a connection has something to send now (for a runtime deciding whether a call
    /// that returned "would block" still needs a transmit pass).
    pub fn has_ready(&self) -> bool {
        !self.transmits.is_empty() || self.schedule.ready_len() > 0
    }

    /// Whether the peer's direction of the stream ended and the application read all of it.
    pub fn read_finished(&self, h: ConnectionHandle) -> bool {
        self.conn_ref(h)
            .is_some_and(|c| c.transport.read_finished())
    }

    /// Moves a connection's local end to `new_local` (one of this endpoint's locators) with an
    /// authenticated RSYN. Returns `false` if the connection is not established, already
    /// moving to `new_local`, or re-binding after an import. A move under way toward another
    /// locator is given up for this one ([`Event::MoveAbandoned`]).
    ///
    /// While the current local locator is still one of [`Endpoint::locals`], the move is
    /// make-before-break: the stream keeps flowing on the old path until the new one is
    /// validated. Remove the old locator ([`Endpoint::remove_local`]) when it is gone.
    pub fn migrate(&mut self, h: ConnectionHandle, new_local: Locator) -> bool {
        let Some(old) = self.conn_ref(h).map(|c| c.local) else {
            return false;
        };
        let old_path_usable = self.locals.contains(&old);
        let started = self
            .conn(h)
            .is_some_and(|c| c.migrate(new_local, old_path_usable));
        if started {
            self.touch(h);
        }
        started
    }

    /// Whether a move of `h`'s local end (its RSYN) is under way.
    pub fn is_moving(&self, h: ConnectionHandle) -> bool {
        self.conn_ref(h).is_some_and(Connection::is_moving)
    }

    /// Client: asks the server to move its end of `h` to the instance whose migration agent
    /// is at `to` (one MOVE_REQUEST, sealed under the flow's keys; docs/protocol.md §4.5). The
    /// server reports it as [`Event::MoveAsked`]; nothing here retransmits it, and the flow
    /// moves when the new instance's RSYN arrives ([`Event::PeerMigrated`]). Errors with the
    /// reason when `h` is not the client end of an established flow.
    pub fn ask_move(&mut self, h: ConnectionHandle, to: Locator) -> Result<(), &'static str> {
        let c = self.conn(h).ok_or("no such connection")?;
        c.ask_move(to)?;
        self.touch(h);
        Ok(())
    }

    /// Server: tells the client of `h` that its MOVE_REQUEST naming `to` will not be served,
    /// and why (one MOVE_REFUSED, sealed; docs/protocol.md §4.5). The client reports it as
    /// [`Event::MoveRefused`]. Errors with the reason when `h` is not the server end of an
    /// established flow.
    pub fn refuse_move(
        &mut self,
        h: ConnectionHandle,
        to: Locator,
        why: crate::frame::MoveRefusal,
    ) -> Result<(), &'static str> {
        let c = self.conn(h).ok_or("no such connection")?;
        c.refuse_move(to, why)?;
        self.touch(h);
        Ok(())
    }

    /// Resets a connection (one authenticated RST) and forgets it.
    pub fn abort(&mut self, h: ConnectionHandle) {
        if let Some(c) = self.conn(h) {
            c.abort();
            self.touch(h);
        }
    }

    /// A connection's current local and peer locators.
    pub fn locators(&self, h: ConnectionHandle) -> Option<(Locator, Locator)> {
        let c = self.conn_ref(h)?;
        Some((c.local, c.peer))
    }

    /// How a connection's packets are protected, once its handshake has settled it (`None`
    /// before, or for a handle that is gone).
    pub fn protection(&self, h: ConnectionHandle) -> Option<Protection> {
        self.conn_ref(h)?.protection()
    }

    /// A connection's path-validation counters: how often its peer's address changed and
    /// whether each new address was validated.
    pub fn path_stats(&self, h: ConnectionHandle) -> Option<PathStats> {
        Some(self.conn_ref(h)?.path_stats())
    }

    /// A connection's transport counters.
    pub fn connection_stats(&self, h: ConnectionHandle) -> Option<TransportStats> {
        Some(self.conn_ref(h)?.transport.stats())
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events
            .pop_front()
            .or_else(|| self.poll_registrar_event())
    }

    /// Handles one received UDP datagram. Packets of live flows are opened in a copy; a
    /// caller that can give up its buffer calls [`handle_datagram_mut`](Self::handle_datagram_mut)
    /// and saves that copy.
    pub fn handle_datagram(&mut self, now: Instant, local: Locator, remote: Locator, data: &[u8]) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.extend_from_slice(data);
        self.handle_datagram_mut(now, local, remote, &mut scratch);
        self.scratch = scratch;
    }

    /// Handles one received UDP datagram, opening a protected packet in place: `data` holds
    /// garbage afterwards. A receiver with several datagrams at once hands them over together
    /// with [`handle_datagrams_mut`](Self::handle_datagrams_mut).
    pub fn handle_datagram_mut(
        &mut self,
        now: Instant,
        local: Locator,
        remote: Locator,
        data: &mut [u8],
    ) {
        self.stats.received += 1;
        // The base header here; the extensions are validated by `SalRepr::parse` below, in the
        // walk that reads them (a packet without extensions has none to validate).
        let pkt = SalPacket::new_unchecked(&data[..]);
        if pkt.check_base().is_err() {
            self.stats.malformed += 1;
            return;
        }
        if pkt.protocol() == Protocol::REGISTRATION {
            if pkt.validate().is_err() {
                self.stats.malformed += 1;
                return;
            }
            self.handle_registration(now, local, remote, &pkt);
            return;
        }
        let dst = pkt.dst_flow();
        if dst.is_none() {
            // Only a SYN or a datagram by name travels without a destination flow.
            match SalRepr::parse(&pkt) {
                Ok(repr) if repr.protocol == Protocol::DATAGRAM && repr.control.is_none() => {
                    self.handle_named_datagram(local, remote, &pkt, repr)
                }
                Ok(repr) => self.handle_syn(now, local, remote, data, repr, false),
                Err(_) => self.stats.malformed += 1,
            }
            return;
        }
        // Parsed (so validated) before the flow is looked up: a malformed packet counts as
        // malformed whichever flow it names.
        let Ok(repr) = (if pkt.has_extensions() {
            SalRepr::parse(&pkt)
        } else {
            Ok(SalRepr::new(pkt.protocol(), pkt.src_flow(), dst))
        }) else {
            self.stats.malformed += 1;
            return;
        };
        let Some(&h) = self.flows.get(dst) else {
            self.stats.unknown_flow += 1;
            return;
        };
        let Some(c) = slot_mut(&mut self.conns, &self.generations, h) else {
            self.stats.unknown_flow += 1;
            return;
        };
        // A SYN-ACK from a flow other than our peer's, once established: a second instance
        // answered the same (multicast) SYN. The first answer won; this one is dropped and,
        // if it is authentic, answered with an authenticated RST so that instance frees its
        // half-open flow now rather than retransmitting its SYN-ACK until it gives up.
        if let Some(ctl) = repr.control
            && ctl.flags.contains(ControlFlags::SYN | ControlFlags::ACK)
            && c.role == Role::Client
            && c.state != State::SynSent
            && repr.src_flow != c.peer_flow
        {
            self.stats.duplicate_syn_acks += 1;
            if let Some(payload) = c.reset_for_stray_syn_ack(data, &repr)
                && self.queue_transmit(Transmit {
                    src: local,
                    dst: remote,
                    payload,
                })
            {
                self.stats.stray_resets += 1;
            }
            return;
        }
        // A NACK answers our SYN before the peer has a flow: it proves itself by echoing our nonce.
        if let Some(ctl) = repr.control
            && ctl.flags.contains(ControlFlags::NACK)
        {
            let ours = c.state == State::SynSent && repr.nonce.as_ref() == Some(c.local_nonce());
            // A NACK with a cookie asks for the SYN again, with the cookie (a server under a
            // SYN flood); after a few such rounds the client stops obliging and lets its SYN
            // time out instead.
            if ours && let Some(cookie) = repr.cookie {
                if c.retry_with_cookie(cookie) {
                    self.stats.cookie_retries += 1;
                    self.touch(h);
                }
                return;
            }
            if ours {
                let service = c.service;
                c.close_now(CloseReason::Reset);
                c.events.clear();
                self.events
                    .push_back(Event::ConnectFailed(h, ConnectError::NoRoute(service)));
                self.reap(h);
            } else {
                self.stats.auth_failures += 1;
            }
            return;
        }
        c.handle_packet(now, local, remote, data, &repr);
        self.touch(h);
    }

    fn handle_syn(
        &mut self,
        now: Instant,
        local: Locator,
        remote: Locator,
        data: &[u8],
        mut repr: SalRepr,
        discovery: bool,
    ) {
        let (Some(ctl), Some(service), Some(nonce)) = (repr.control, repr.service, repr.nonce)
        else {
            self.stats.malformed += 1;
            return;
        };
        if ctl.flags != ControlFlags::SYN || repr.source.is_empty() || repr.src_flow.is_none() {
            self.stats.malformed += 1;
            return;
        }
        // The client's locator: as the first hop saw it. A SYN straight from the client has a
        // one-entry SOURCE whose claim we replace by what we observe (it may be behind a NAT).
        if repr.source.len() == 1 {
            repr.source[0] = remote;
        }
        let client = repr.source[0];
        // (A held SYN being released was counted when it arrived.)
        if let Some(limit) = &self.config.syn_rate_limit
            && !discovery
            && !self.resolving_held
            && !self.syn_limiter.allow(limit, client.ip(), now)
        {
            self.stats.syns_rate_limited += 1;
            return;
        }
        if let Some(&h) = self.half_open.get(&(repr.src_flow, nonce)) {
            // A retransmitted SYN: answer again — if it pays for the answer. Anyone who saw the
            // SYN can send a copy stripped of its padding; it must not buy a larger SYN-ACK.
            if let Some(c) = self.conn(h) {
                if c.syn_ack_len() <= data.len() {
                    c.resend_reliable();
                    self.touch(h);
                } else {
                    self.stats.malformed += 1;
                }
            }
            return;
        }
        if !discovery && !self.resolving_held && self.syn_is_held(&(repr.src_flow, nonce)) {
            return;
        }
        // The flow key makes every router (and retransmission) choose the same instance.
        let flow_key = flow_key(repr.src_flow, &nonce);
        let resolved = self.resolve_syn(&service.id, flow_key);
        let action = resolved.as_ref().map(|r| r.action);
        match action {
            Some(Action::Demux(listener))
                if self.listeners.get(&listener).is_some_and(|l| l.streams) =>
            {
                if discovery {
                    let weight = resolved.map_or(1, |r| r.weight);
                    if self.answer_discovery_later(now, local, remote, data, &repr, weight) {
                        return;
                    }
                    self.stats.discovery_answered += 1;
                } else if let cookie::CookieCheck::Retry =
                    self.check_cookie(now, client, &repr, &nonce)
                {
                    self.send_cookie(now, local, client, &repr, data.len());
                    return;
                }
                let syn_len = data.len();
                self.accept_syn(now, local, client, &repr, syn_len, service.id, listener)
            }
            // A SYN from the discovery group that no local listener serves: silence (a NACK
            // from every host of the LAN would flood the client; forwarding would loop the
            // SYN back into the group).
            _ if discovery => self.stats.discovery_ignored += 1,
            Some(Action::Forward(next)) => self.forward_by_name(local, next, data, repr, service),
            Some(Action::Delay) if !self.resolving_held => {
                let key = (repr.src_flow, nonce);
                self.hold_syn(now, local, remote, data, service.id, client, key)
            }
            Some(Action::Delay) => self.nack(local, client, &repr, ctl, nonce, data.len()),
            Some(Action::Drop | Action::Demux(_)) | None => {
                self.nack(local, client, &repr, ctl, nonce, data.len())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn accept_syn(
        &mut self,
        now: Instant,
        local: Locator,
        client: Locator,
        repr: &SalRepr,
        syn_len: usize,
        service: ServiceId,
        listener: ListenerId,
    ) {
        let (Some(ctl), Some(nonce)) = (repr.control, repr.nonce) else {
            return;
        };
        let backlog = self.config.accept_backlog;
        match self.listeners.get(&listener) {
            Some(l) if l.queue.len() < backlog => {}
            Some(_) => {
                self.stats.backlog_drops += 1;
                return;
            }
            None => {
                self.stats.unknown_flow += 1;
                return;
            }
        }
        let Some(share) = repr.keyshare.as_ref() else {
            self.stats.bad_key_shares += 1;
            return;
        };
        let (flow, n) = self.new_connection(Role::Server, service, local, client);
        let syn = Syn {
            flow: repr.src_flow,
            nonce,
            share,
            verno: ctl.verno,
            len: syn_len,
        };
        let Some(c) = Connection::server(now, n, &syn, listener) else {
            self.flows.remove(flow);
            self.stats.bad_key_shares += 1;
            return;
        };
        let h = self.insert_conn(c);
        self.register_flow(flow, h);
        self.half_open.insert((repr.src_flow, nonce), h);
    }

    fn forward_by_name(
        &mut self,
        local: Locator,
        next: Locator,
        data: &[u8],
        mut repr: SalRepr,
        mut service: serval_wire::ServiceRepr,
    ) {
        if service.hop_limit == 0 || repr.source.contains(&local) {
            self.stats.hop_limit_drops += 1;
            return;
        }
        service.hop_limit -= 1;
        repr.service = Some(service);
        repr.source.push(local);
        // `data` was validated when it arrived; its payload is all this needs.
        let pkt = SalPacket::new_unchecked(data);
        if pkt.check_len().is_err() {
            return;
        }
        match repr.to_bytes(pkt.payload()) {
            Ok(payload) => {
                let src = self.local_for(&next).unwrap_or(local);
                if self.queue_transmit(Transmit {
                    src,
                    dst: next,
                    payload,
                }) {
                    self.stats.forwarded += 1;
                }
            }
            // SOURCE full: the path is too long.
            Err(_) => self.stats.hop_limit_drops += 1,
        }
    }

    /// Answers a SYN no rule serves. The NACK echoes the client's nonce (so an off-path host
    /// cannot forge one) and is never larger than the SYN (so it cannot amplify).
    fn nack(
        &mut self,
        local: Locator,
        client: Locator,
        repr: &SalRepr,
        ctl: ControlRepr,
        nonce: Nonce,
        syn_len: usize,
    ) {
        let mut r = SalRepr::new(Protocol::NONE, FlowId::NONE, repr.src_flow);
        r.control = Some(ControlRepr {
            flags: ControlFlags::NACK,
            verno: 0,
            ackno: ctl.verno.wrapping_add(1),
        });
        r.nonce = Some(nonce);
        // The NACK goes to the client (SOURCE[0], as the first hop observed it), like the
        // SYN-ACK would: a router several hops up has no way back through the hops below
        // (they keep no state for the SYN), and the client accepts it from anywhere since it
        // echoes the nonce. For a SYN straight from the client that is the UDP source.
        if let Ok(payload) = r.to_bytes(&[])
            && payload.len() <= syn_len
            && self.queue_transmit(Transmit {
                src: local,
                dst: client,
                payload,
            })
        {
            self.stats.nacks_sent += 1;
        }
    }

    /// Sends a datagram to `to` by name, resolved through the service table like a SYN:
    /// FORWARD sends it to the next hop, DEMUX delivers it to a local listener. `from` is the
    /// sender's own serviceID, if it has one, so the receiver can answer by name.
    pub fn send_datagram(
        &mut self,
        from: Option<ServiceId>,
        to: ServiceId,
        data: &[u8],
    ) -> Result<(), DatagramError> {
        let flow_key = self.rng.next_u64();
        let next_hop = match self
            .table
            .snapshot()
            .resolve(&to, flow_key)
            .map(|r| r.action)
        {
            Some(Action::Forward(hop)) => hop,
            Some(Action::Demux(_)) => *self.locals.first().ok_or(DatagramError::NoRoute(to))?,
            _ => return Err(DatagramError::NoRoute(to)),
        };
        self.send_datagram_via(from, to, next_hop, data)
    }

    /// Sends a datagram to `to` by name through `next_hop`, without consulting the table.
    pub fn send_datagram_via(
        &mut self,
        from: Option<ServiceId>,
        to: ServiceId,
        next_hop: Locator,
        data: &[u8],
    ) -> Result<(), DatagramError> {
        let local = self
            .local_for(&next_hop)
            .ok_or(DatagramError::NoLocalAddress(next_hop))?;
        let mut repr = SalRepr::new(Protocol::DATAGRAM, FlowId::NONE, FlowId::NONE);
        repr.service = Some(serval_wire::ServiceRepr {
            hop_limit: self.config.hop_limit,
            id: to,
        });
        repr.source = vec![local];
        let mut payload = Vec::with_capacity(1 + 32 + data.len());
        match from {
            Some(id) => {
                payload.push(DGRAM_HAS_SOURCE_SERVICE);
                payload.extend_from_slice(id.as_bytes());
            }
            None => payload.push(0),
        }
        let overhead = repr.buffer_len() + payload.len();
        let max = self.config.max_datagram_packet.saturating_sub(overhead);
        if data.len() > max {
            return Err(DatagramError::TooLarge {
                len: data.len(),
                max,
            });
        }
        payload.extend_from_slice(data);
        let bytes = repr
            .to_bytes(&payload)
            .map_err(|_| DatagramError::TooLarge {
                len: data.len(),
                max,
            })?;
        if !self.queue_transmit(Transmit {
            src: local,
            dst: next_hop,
            payload: bytes,
        }) {
            return Err(DatagramError::QueueFull);
        }
        Ok(())
    }

    /// The next datagram received by name for listener `id`.
    pub fn recv_datagram(&mut self, id: ListenerId) -> Option<NamedDatagram> {
        self.listeners.get_mut(&id)?.datagrams.pop_front()
    }

    fn handle_named_datagram(
        &mut self,
        local: Locator,
        remote: Locator,
        pkt: &SalPacket<&[u8]>,
        mut repr: SalRepr,
    ) {
        let Some(service) = repr.service else {
            self.stats.malformed += 1;
            return;
        };
        if repr.source.is_empty() {
            self.stats.malformed += 1;
            return;
        }
        if repr.source.len() == 1 {
            repr.source[0] = remote;
        }
        let flow_key = self.rng.next_u64();
        let action = self
            .table
            .snapshot()
            .resolve(&service.id, flow_key)
            .map(|r| r.action);
        match action {
            Some(Action::Demux(listener)) => {
                let payload = pkt.payload();
                let parsed = match payload.split_first() {
                    Some((&0, data)) => Some((None, data)),
                    Some((&DGRAM_HAS_SOURCE_SERVICE, rest)) if rest.len() >= 32 => {
                        let mut id = [0u8; 32];
                        id.copy_from_slice(&rest[..32]);
                        Some((Some(ServiceId(id)), &rest[32..]))
                    }
                    _ => None,
                };
                let limit = self.config.datagram_queue;
                match (parsed, self.listeners.get_mut(&listener)) {
                    (Some((from, data)), Some(l)) if l.datagrams.len() < limit => {
                        l.datagrams.push_back(NamedDatagram {
                            to: service.id,
                            from,
                            from_locator: repr.source[0],
                            data: data.to_vec(),
                        });
                        self.stats.datagrams_received += 1;
                        self.events.push_back(Event::NamedDatagram(listener));
                    }
                    _ => self.stats.datagrams_dropped += 1,
                }
            }
            Some(Action::Forward(next)) => {
                let data = pkt.as_ref().to_vec();
                self.forward_by_name(local, next, &data, repr, service)
            }
            _ => self.stats.datagrams_dropped += 1,
        }
    }

    fn collect_events(&mut self, h: ConnectionHandle) {
        self.settle_flows(h);
        let Some(c) = slot_mut(&mut self.conns, &self.generations, h) else {
            return;
        };
        let mut accepted = None;
        let mut auto_join = false;
        while let Some(ev) = c.events.pop_front() {
            let ev = match ev {
                ConnEvent::Connected => {
                    auto_join = true;
                    Event::Connected(h)
                }
                ConnEvent::ConnectFailed(e) => Event::ConnectFailed(h, e),
                ConnEvent::Accepted => {
                    accepted = c.listener;
                    continue;
                }
                ConnEvent::Readable => Event::Readable(h),
                ConnEvent::Writable => Event::Writable(h),
                ConnEvent::Finished => Event::Finished(h),
                ConnEvent::Datagram => Event::Datagram(h),
                ConnEvent::Migrated(l) => Event::Migrated(h, l),
                ConnEvent::PeerAddresses => {
                    auto_join = true;
                    continue;
                }
                ConnEvent::PathUp(id) => Event::PathUp(h, id),
                ConnEvent::PathDown(id) => Event::PathDown(h, id),
                ConnEvent::MoveAbandoned(l) => Event::MoveAbandoned(h, l),
                ConnEvent::PeerMigrated(l) => Event::PeerMigrated(h, l),
                ConnEvent::PathValidationFailed(l) => Event::PathValidationFailed(h, l),
                ConnEvent::MoveAsked(l) => Event::MoveAsked(h, l),
                ConnEvent::MoveRefused(l, why) => Event::MoveRefused(h, l, why),
                ConnEvent::Closed(r) => Event::Closed(h, r),
            };
            self.events.push_back(ev);
        }
        let key = (c.peer_flow, *c.peer_nonce_key());
        if let Some(l) = accepted {
            self.half_open.remove(&key);
            self.stats.accepted += 1;
            if let Some(listener) = self.listeners.get_mut(&l) {
                listener.queue.push_back(h);
                self.events.push_back(Event::Incoming(l));
            }
        }
        if self.config.multipath {
            if accepted.is_some() {
                self.announce_locals(h);
            }
            if auto_join {
                self.auto_join(h);
            }
        }
        self.reap(h);
    }

    /// Forgets a closed connection once it has nothing left to send.
    fn reap(&mut self, h: ConnectionHandle) {
        let Some(c) = slot(&self.conns, &self.generations, h) else {
            return;
        };
        if !c.is_closed() {
            return;
        }
        let (flow, key) = (c.local_flow, (c.peer_flow, *c.peer_nonce_key()));
        // Keep the closed flow's drop counters in the endpoint's totals.
        self.stats.auth_failures += c.auth_failures;
        self.stats.malformed += c.malformed;
        self.stats.replays += c.replays();
        let paths = c.path_stats();
        let exported = c.is_exported();
        let aliases: Vec<_> = c.alias_flows().collect();
        self.stats.paths.add(&paths);
        self.forget_held(h, exported);
        for alias in aliases {
            self.flows.remove(alias);
        }
        self.flows.remove(flow);
        self.half_open.remove(&key);
        let i = h.index();
        self.conns[i] = None;
        // Handles of the forgotten connection must not reach the slot's next one.
        self.generations[i] = self.generations[i].wrapping_add(1);
        self.schedule.forget(i);
        self.free.push(i);
    }

    /// Queues a datagram of the endpoint's own (not a connection's); `false` if the queue is
    /// full and it was dropped.
    fn queue_transmit(&mut self, t: Transmit) -> bool {
        if self.transmits.len() >= self.config.max_queued_transmits {
            self.stats.transmit_queue_drops += 1;
            return false;
        }
        self.transmits.push_back(t);
        true
    }

    /// The next datagram to send, in a new buffer (a convenience over
    /// [`Endpoint::poll_transmit_into`], which does not allocate).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        let mut payload = Vec::new();
        let (src, dst) = self.poll_transmit_into(now, &mut payload)?;
        Some(Transmit { src, dst, payload })
    }

    /// Appends the next datagram to send to `out` and returns its source and destination
    /// locators; the datagram is what was appended. A caller can so build a batch of datagrams
    /// in one reused buffer (for segmentation offload) without an allocation per packet.
    ///
    /// Connections take turns, one packet each, so one busy flow cannot starve the others;
    /// only connections that something happened to since they last had nothing to send are
    /// asked, so the cost does not grow with idle connections.
    pub fn poll_transmit_into(
        &mut self,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Option<(Locator, Locator)> {
        if let Some(t) = self.transmits.pop_front() {
            out.extend_from_slice(&t.payload);
            return Some((t.src, t.dst));
        }
        if let Some(route) = self.poll_released(out) {
            return Some(route);
        }
        if let Some(route) = self.poll_registrar_transmit(now, out) {
            return Some(route);
        }
        while let Some(i) = self.schedule.pop_ready() {
            let Some(c) = self.conns.get_mut(i).and_then(Option::as_deref_mut) else {
                continue;
            };
            // Straight into the caller's batch buffer: no copy per packet.
            let start = out.len();
            let route = c.poll_transmit(now, out);
            let h = self.handle_at(i);
            if let Some(route) = route {
                // It may have more: back of the queue.
                self.touch(h);
                if self.hold_output(h, route, out, start) {
                    continue;
                }
                return Some(route);
            }
            // Nothing to send: it stays out of the queue until something happens to it.
            self.settle(h);
        }
        None
    }

    /// The earliest time [`Endpoint::handle_timeout`] must run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.schedule.next_deadline(),
            self.registrar_timeout(),
            self.delay.next_deadline(),
            self.answer_later.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs every timer that is due at `now` (each connection's once per call, even if its
    /// handling leaves a deadline at or before `now`, as a pacing release does until the next
    /// [`Endpoint::poll_transmit`]).
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut due = std::mem::take(&mut self.due);
        self.schedule.pop_due(now, &mut due);
        for &i in &due {
            if let Some(c) = self.conns.get_mut(i).and_then(Option::as_deref_mut) {
                c.handle_timeout(now);
                let h = self.handle_at(i);
                self.fail_over_if_silent(h);
                self.touch(h);
            }
        }
        due.clear();
        self.due = due;
        self.registrar_handle_timeout(now);
        self.expire_held(now);
        self.answer_discovery_due(now);
    }
}

/// Moving a connection to another endpoint (docs/moving-flows.md §3.2): export, import,
/// release or thaw.
impl Endpoint {
    /// Freezes connection `h` and returns its snapshot (docs/snapshot.md) for another
    /// endpoint's [`import`](Self::import): a fresh export ID, and the move epoch one past
    /// the connection's. From now on the connection sends nothing — no data, no ACK, no
    /// control packet — and runs no timer; packets that arrive for it are still processed
    /// (never acknowledged, so the peer sends them again to the importer). It stays here,
    /// frozen, until [`release_exported`](Self::release_exported) (the importer took over)
    /// or [`thaw`](Self::thaw) (the move was aborted). While frozen, `write` takes nothing,
    /// `read` gives nothing and `finish` fails.
    ///
    /// Only an established connection (or one in TIME-WAIT) is exported; one in its
    /// handshake is refused with [`ExportError::NotEstablished`], and nothing changes.
    pub fn export(&mut self, h: ConnectionHandle, now: Instant) -> Result<Vec<u8>, ExportError> {
        self.export_blocks(h, now, |_| Ok(()))
    }

    /// [`export`](Self::export), with `extra` writing the blocks the engine does not own
    /// (the application's) after the connection's own.
    fn export_blocks(
        &mut self,
        h: ConnectionHandle,
        now: Instant,
        extra: impl FnOnce(
            &mut crate::snapshot::SnapshotWriter,
        ) -> Result<(), crate::snapshot::SnapshotError>,
    ) -> Result<Vec<u8>, ExportError> {
        self.conn(h)
            .ok_or(ExportError::UnknownConnection)?
            .freeze_for_export()?;
        let bytes = self.write_snapshot(h, now, None, extra);
        if bytes.is_err()
            && let Some(c) = self.conn(h)
        {
            c.thaw_export();
        }
        // Re-arm its timer: none while frozen.
        self.touch(h);
        bytes
    }

    /// The snapshot of connection `h` as it is now (frozen or not): a fresh export ID, the
    /// move epoch one past the connection's, the engine's blocks, then `extra`'s; a delta
    /// since `since` if given.
    fn write_snapshot(
        &mut self,
        h: ConnectionHandle,
        now: Instant,
        since: Option<crate::snapshot::StreamCover>,
        extra: impl FnOnce(
            &mut crate::snapshot::SnapshotWriter,
        ) -> Result<(), crate::snapshot::SnapshotError>,
    ) -> Result<Vec<u8>, ExportError> {
        let export_id = u128::from(self.rng.next_u64()) << 64 | u128::from(self.rng.next_u64());
        let c = self.conn_ref(h).ok_or(ExportError::UnknownConnection)?;
        let epoch = c.move_epoch().wrapping_add(1);
        let mut w = crate::snapshot::SnapshotWriter::new(export_id, epoch, now);
        if let Some(cover) = since {
            w.set_delta(cover);
        }
        c.export_into(&mut w, epoch)
            .and_then(|()| extra(&mut w).map_err(ExportError::from))?;
        Ok(w.finish()?)
    }

    /// Whether connection `h` is exported and frozen.
    pub fn is_exported(&self, h: ConnectionHandle) -> bool {
        self.conn_ref(h).is_some_and(Connection::is_exported)
    }

    /// Forgets an exported connection once its importer has taken over: nothing is sent
    /// (no RST: it would be a valid-looking reset of the flow the importer continues), and
    /// packets that still arrive for it are dropped as for an unknown flow. Returns `false`
    /// (changing nothing) if `h` is not an exported connection.
    pub fn release_exported(&mut self, h: ConnectionHandle) -> bool {
        match self.conn(h) {
            Some(c) if c.is_exported() => c.discard_exported(),
            _ => return false,
        }
        self.reap(h);
        true
    }

    /// Resumes an exported connection here: the move was aborted (its snapshot must then
    /// never be imported anywhere, or two hosts would send under the same keys and packet
    /// numbers). Timers that fell due while it was frozen fire at the next timeout; the peer
    /// retransmits what arrived unacknowledged. Returns `false` if `h` is not exported.
    pub fn thaw(&mut self, h: ConnectionHandle) -> bool {
        let thawed = self.conn(h).is_some_and(Connection::thaw_export);
        if thawed {
            self.touch(h);
        }
        thawed
    }

    /// Continues the connection a snapshot holds (another endpoint's
    /// [`export`](Self::export)): the flow is registered under its flowID, attached to this
    /// endpoint's listener for the service, and takes this endpoint's locator of the peer's
    /// family. An established connection re-binds at once with an authenticated RSYN from
    /// that locator (the peer records it when the RSYN opens under the flow's keys); once
    /// the peer answers it retransmits whatever was in flight, without a congestion
    /// response. The handle returned is the application's, as [`accept`](Self::accept)'s
    /// would be (no [`Event::Incoming`]).
    ///
    /// Refused, with nothing changed: everything [`SnapshotReader::parse`] refuses
    /// (`Foreign`, `Version`, `Truncated`, `Corrupt`, ...), `Replayed` (this endpoint
    /// imported a snapshot with the same export ID, among its last [`MAX_IMPORTED_IDS`]),
    /// `NotServed` (no listener here serves the service, or no local locator of the peer's
    /// family), `FlowInUse` (the flowID is live here), and `Malformed` for any block that
    /// does not decode to a consistent state.
    ///
    /// [`SnapshotReader::parse`]: crate::snapshot::SnapshotReader::parse
    /// A snapshot with an APP block (the application's state) is refused here as
    /// `Malformed`: the block is critical, and only
    /// [`import_with_app`](Self::import_with_app) hands it on.
    pub fn import(
        &mut self,
        bytes: &[u8],
        now: Instant,
    ) -> Result<ConnectionHandle, crate::snapshot::SnapshotError> {
        use crate::snapshot::{SnapshotError, SnapshotReader, block};
        if SnapshotReader::parse(bytes)?
            .block(block::APP, now)
            .is_some()
        {
            return Err(SnapshotError::Malformed {
                block: block::APP,
                reason: "application state that only import_with_app hands on",
            });
        }
        self.import_any(bytes, now)
    }

    /// Everything [`import`](Self::import) checks and builds, without changing the endpoint:
    /// the connection, what the snapshot says of it, and its export ID.
    fn prepare_import(
        &self,
        bytes: &[u8],
        now: Instant,
    ) -> Result<(Connection, crate::connection::SalSummary, u128), crate::snapshot::SnapshotError>
    {
        use crate::snapshot::{SnapshotError, SnapshotReader};
        let r = SnapshotReader::parse(bytes)?;
        let id = r.export_id();
        if self.imported.contains(&id) {
            return Err(SnapshotError::Replayed);
        }
        let summary = Connection::summary(&r, now)?;
        let listener = self
            .listeners
            .iter()
            .filter(|(_, l)| l.streams && l.prefix.contains(&summary.service))
            .min_by_key(|(id, _)| **id)
            .map(|(id, _)| *id)
            .ok_or(SnapshotError::NotServed)?;
        let local = self
            .local_for(&summary.peer)
            .ok_or(SnapshotError::NotServed)?;
        if self.flows.contains(summary.local_flow) {
            return Err(SnapshotError::FlowInUse);
        }
        let transport = self.transport_for(local);
        let cx = crate::connection::ImportContext {
            now,
            local,
            listener,
            ctl: &self.config.control,
            transport: &transport,
        };
        let c = Connection::import(&r, &cx)?;
        Ok((c, summary, id))
    }

    /// [`import`](Self::import), whatever blocks beyond the engine's the snapshot holds.
    fn import_any(
        &mut self,
        bytes: &[u8],
        now: Instant,
    ) -> Result<ConnectionHandle, crate::snapshot::SnapshotError> {
        use crate::snapshot::SnapshotError;
        let (c, summary, id) = self.prepare_import(bytes, now)?;
        if self
            .flows
            .adopt(summary.local_flow, ConnectionHandle(u64::MAX))
            .is_err()
        {
            return Err(SnapshotError::FlowInUse);
        }
        let h = self.insert_conn(c);
        self.register_flow(summary.local_flow, h);
        if self.imported.len() >= MAX_IMPORTED_IDS {
            self.imported.pop_front();
        }
        self.imported.push_back(id);
        Ok(h)
    }
}

/// The connection `h` names in `conns`, if its slot still has `h`'s generation.
fn slot<'a>(
    conns: &'a [Option<Box<Connection>>],
    generations: &[u32],
    h: ConnectionHandle,
) -> Option<&'a Connection> {
    if generations.get(h.index()) != Some(&h.generation()) {
        return None;
    }
    conns.get(h.index())?.as_deref()
}

/// [`slot`], mutably.
fn slot_mut<'a>(
    conns: &'a mut [Option<Box<Connection>>],
    generations: &[u32],
    h: ConnectionHandle,
) -> Option<&'a mut Connection> {
    if generations.get(h.index()) != Some(&h.generation()) {
        return None;
    }
    conns.get_mut(h.index())?.as_deref_mut()
}

/// The key a SYN's instance choice is made with: the same for every router on the path and for
/// every retransmission of the SYN.
fn flow_key(client_flow: FlowId, nonce: &Nonce) -> u64 {
    let mut k = client_flow.0;
    for chunk in nonce.0.chunks_exact(8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        k = (k ^ u64::from_be_bytes(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        k ^= k >> 29;
    }
    k
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn loc(s: &str) -> Locator {
        s.parse().unwrap()
    }

    fn endpoint(addr: &str, seed: u8) -> Endpoint {
        Endpoint::new(
            EndpointConfig::default(),
            [seed; 32],
            Arc::new(ServiceTable::new()),
            vec![loc(addr)],
        )
    }

    /// Delivers everything between `a` and `b` until both are quiet.
    fn pump(a: &mut Endpoint, b: &mut Endpoint, now: Instant) {
        fn deliver(from: &mut Endpoint, to: &mut Endpoint, now: Instant) -> bool {
            let mut moved = false;
            while let Some(t) = from.poll_transmit(now) {
                moved = true;
                to.handle_datagram(now, t.dst, t.src, &t.payload);
            }
            moved
        }
        while deliver(a, b, now) | deliver(b, a, now) {}
    }

    #[test]
    fn a_syn_flood_faster_than_the_caller_sends_costs_bounded_memory() {
        let now = Instant::ZERO;
        let config = EndpointConfig {
            max_queued_transmits: 10,
            ..EndpointConfig::default()
        };
        let router_loc = loc("10.0.0.3:1");
        let mut router = Endpoint::new(
            config,
            [3; 32],
            Arc::new(ServiceTable::new()),
            vec![router_loc],
        );
        let svc = ServiceId::from_name("flood.test").unwrap();
        router
            .table()
            .add_target(
                ServicePrefix::exact(svc),
                Target::new(Action::Forward(loc("10.0.0.2:1")), 0, 1),
            )
            .unwrap();
        let mut client = endpoint("10.0.0.1:1", 1);
        for _ in 0..25 {
            client.connect_via(now, svc, router_loc).unwrap();
        }
        while let Some(t) = client.poll_transmit(now) {
            router.handle_datagram(now, t.dst, t.src, &t.payload);
        }
        let st = router.stats();
        assert_eq!((st.forwarded, st.transmit_queue_drops), (10, 15));
        assert_eq!(std::iter::from_fn(|| router.poll_transmit(now)).count(), 10);
    }

    #[test]
    fn idle_connections_are_not_asked_to_send() {
        let now = Instant::ZERO;
        let (mut a, mut b) = (endpoint("10.0.0.1:1", 1), endpoint("10.0.0.2:1", 2));
        let svc = ServiceId::from_name("idle.test").unwrap();
        b.listen(ServicePrefix::exact(svc), 0, 1);
        let hs: Vec<_> = (0..200)
            .map(|_| a.connect_via(now, svc, loc("10.0.0.2:1")).unwrap())
            .collect();
        pump(&mut a, &mut b, now);
        while a.poll_event().is_some() {}
        assert_eq!(a.conns.iter().flatten().count(), 200);
        // Established and quiet: nobody is queued, but every timer (idle, keepalive) is armed.
        assert_eq!(a.schedule.ready_len(), 0);
        assert_eq!(b.schedule.ready_len(), 0);
        let earliest = a
            .conns
            .iter()
            .flatten()
            .filter_map(|c| c.poll_timeout())
            .min();
        assert_eq!(a.poll_timeout(), earliest);
        // Writing on one connection queues that one only.
        assert_eq!(a.write(hs[7], b"x").unwrap(), 1);
        assert_eq!(a.schedule.ready_len(), 1);
        let t = a.poll_transmit(now).unwrap();
        assert_eq!(a.locators(hs[7]).unwrap(), (t.src, t.dst));
        b.handle_datagram(now, t.dst, t.src, &t.payload);
        pump(&mut a, &mut b, now);
        assert_eq!(a.schedule.ready_len(), 0);
    }
}
