//! The tokio endpoint: sockets, the driver task, and the glue to the sans-IO engine.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, UdpSocket as StdUdpSocket};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use quinn_udp::{RecvMeta, Transmit as UdpTransmit, UdpSocketState};
use serval_engine::Instant;
use serval_engine::connection::ConnectError;
use serval_engine::endpoint::{
    CloseReason, ConnectionHandle, Datagram, Endpoint as Engine, EndpointConfig, Event, ServerName,
};
use serval_engine::transport::conn::TransportConfig;
use serval_table::{Action, ListenerId, ServiceTable, Target};
use serval_wire::{Locator, ServiceId, ServicePrefix};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, broadcast, oneshot};

use crate::datagram::DatagramSocket;
use crate::netwatch::{FollowHost, PathEvent};
use crate::registration::Hub;
use crate::stream::Stream;

mod discovery;
pub use discovery::{
    DEFAULT_DISCOVERY_GROUP, DEFAULT_DISCOVERY_GROUP_V6, DEFAULT_DISCOVERY_PORT,
    DEFAULT_DISCOVERY_TIMEOUT, DiscoveryConfig,
};

/// A registration change, for the control plane ("active sockets"): a listener bound or
/// released a service on these locators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// A listener now serves `prefix`.
    Registered {
        /// The service prefix.
        prefix: ServicePrefix,
        /// The endpoint's locators.
        locators: Vec<Locator>,
    },
    /// A listener no longer serves `prefix`.
    Unregistered {
        /// The service prefix.
        prefix: ServicePrefix,
        /// The endpoint's locators.
        locators: Vec<Locator>,
    },
}

/// Per-connection state the runtime keeps beside the engine's.
#[derive(Default)]
pub(crate) struct ConnSlot {
    pub(crate) read: Option<Waker>,
    pub(crate) write: Option<Waker>,
    /// A task waiting in [`Stream::recv_datagram`](crate::Stream::recv_datagram).
    pub(crate) datagram: Option<Waker>,
    pub(crate) close: Option<Waker>,
    pub(crate) connect: Option<oneshot::Sender<Result<(), ConnectError>>>,
    pub(crate) closed: Option<CloseReason>,
    /// The application dropped every handle: events are no longer delivered.
    pub(crate) detached: bool,
    /// A move of this connection to another host was asked for (by the instance's
    /// migration agent): the application hands the stream over through it.
    pub(crate) move_request: Option<oneshot::Sender<crate::moving::Handover>>,
    /// A task waiting in [`Stream::move_requested`](crate::Stream::move_requested).
    pub(crate) move_waker: Option<Waker>,
    /// Exported and frozen here: its [`ExportedStream`](crate::ExportedStream) decides
    /// whether it is released or thawed; dropping the stream handle does nothing else.
    pub(crate) exported: bool,
    /// Told when this end next moves (the RSYN of a move, or of an import, was answered).
    pub(crate) migrated: Vec<oneshot::Sender<Locator>>,
    /// Told when the peer next moves, or refuses a move this end asked for
    /// ([`Stream::request_move`](crate::Stream::request_move)).
    pub(crate) move_waiters: Vec<oneshot::Sender<crate::asked_move::MoveOutcome>>,
    /// Its steps, for a hot standby ([`Stream::commit`](crate::Stream::commit)).
    pub(crate) replica: crate::standby::StreamReplica,
    /// [`State::collects`] at the application's last write, until its next: if nothing was
    /// collected in between, the next write first lets the endpoint send. Otherwise a writer
    /// that keeps its send buffer fed (a stream just moved here, or just connected, with a
    /// backlog to write) holds the thread for as long as it copies, and nothing it wrote goes
    /// out meanwhile: 1.3 ms for 2 MiB in the pause bench, with the client waiting.
    pub(crate) wrote_at: Option<u64>,
}

#[derive(Default)]
pub(crate) struct ListenerSlot {
    pub(crate) waker: Option<Waker>,
    /// Connections moved here from another host (imported), with the application state
    /// they carried, for [`ServiceListener::accept`].
    pub(crate) moved_in: std::collections::VecDeque<(ConnectionHandle, Option<Vec<u8>>)>,
}

pub(crate) struct State {
    pub(crate) engine: Engine,
    epoch: std::time::Instant,
    pub(crate) conns: HashMap<ConnectionHandle, ConnSlot>,
    pub(crate) listeners: HashMap<ListenerId, ListenerSlot>,
    registrations: broadcast::Sender<Registration>,
    /// Registrar events and registration requests, for the application.
    pub(crate) hub: Hub,
    /// SYNs held by DELAY rules, announced as they are held.
    pub(crate) held: broadcast::Sender<crate::delay::DelayedSyn>,
    closed: bool,
    /// The engine deadline the driver sleeps until (`None`: no timer). A receive task that
    /// moves the engine's deadline earlier wakes the driver; otherwise it need not.
    driver_deadline: Option<Instant>,
    /// Routerless mode: the discovery group and how long a connect through it waits.
    pub(crate) discovery: Option<(Locator, Duration)>,
    /// Path events (addresses, moves) for the application ([`Endpoint::path_events`]).
    pub(crate) path_events: broadcast::Sender<PathEvent>,
    /// Replication to a hot standby, while one is attached.
    pub(crate) primary: Option<crate::standby::Primary>,
    /// Hand-overs draining their stream before the freeze
    /// ([`Stream::hand_over`](crate::Stream::hand_over)): woken after every batch of engine
    /// work (acknowledgements received), to look whether their stream has drained.
    pub(crate) drains: Vec<Waker>,
    /// How many times the engine's output was collected for sending (by the driver or a
    /// receive task): a stream that wrote since the last collection yields once before it
    /// writes again ([`ConnSlot::wrote_at`]).
    pub(crate) collects: u64,
    /// Where clients' move requests go: the instance's migration agent, once it runs.
    pub(crate) move_asks: Option<tokio::sync::mpsc::Sender<crate::asked_move::MoveAsk>>,
}

impl State {
    pub(crate) fn set_listener_waker(&mut self, id: ListenerId, waker: Waker) {
        if let Some(slot) = self.listeners.get_mut(&id) {
            slot.waker = Some(waker);
        }
    }

    pub(crate) fn now(&self) -> Instant {
        Instant::from_nanos(self.epoch.elapsed().as_nanos() as u64)
    }

    /// Delivers engine events to the tasks waiting on them.
    pub(crate) fn dispatch(&mut self) {
        for w in self.drains.drain(..) {
            w.wake();
        }
        while let Some(ev) = self.engine.poll_event() {
            match ev {
                Event::Connected(h) => {
                    if let Some(tx) = self.conns.get_mut(&h).and_then(|c| c.connect.take()) {
                        let _ = tx.send(Ok(()));
                    }
                }
                Event::ConnectFailed(h, e) => {
                    if let Some(c) = self.conns.remove(&h)
                        && let Some(tx) = c.connect
                    {
                        let _ = tx.send(Err(e));
                    }
                }
                Event::Incoming(l) | Event::NamedDatagram(l) => {
                    if let Some(w) = self.listeners.get_mut(&l).and_then(|s| s.waker.take()) {
                        w.wake();
                    }
                }
                Event::Readable(h) | Event::Finished(h) => {
                    if let Some(w) = self.conns.get_mut(&h).and_then(|c| c.read.take()) {
                        w.wake();
                    }
                }
                Event::Datagram(h) => {
                    if let Some(w) = self.conns.get_mut(&h).and_then(|c| c.datagram.take()) {
                        w.wake();
                    }
                }
                Event::Writable(h) => {
                    if let Some(c) = self.conns.get_mut(&h) {
                        // A step's output first, in order, then the writer.
                        c.replica.drain(&mut self.engine, h);
                        if let Some(w) = c.write.take() {
                            w.wake();
                        }
                    }
                }
                Event::Closed(h, reason) => {
                    if let Some(c) = self.conns.get_mut(&h) {
                        c.closed = Some(reason);
                        c.replica.wake_waiting();
                        if let Some(tx) = c.connect.take() {
                            let _ = tx.send(Err(ConnectError::TimedOut(ServiceId::ZERO)));
                        }
                        for w in [
                            c.read.take(),
                            c.write.take(),
                            c.close.take(),
                            c.datagram.take(),
                        ]
                        .into_iter()
                        .flatten()
                        {
                            w.wake();
                        }
                        c.migrated.clear();
                        c.move_waiters.clear();
                        c.move_request = None;
                        if let Some(w) = c.move_waker.take() {
                            w.wake();
                        }
                        if c.detached {
                            self.conns.remove(&h);
                        }
                    }
                }
                Event::Registered { prefix, .. } => {
                    let locators = self.engine.locals().to_vec();
                    let _ = self
                        .registrations
                        .send(Registration::Registered { prefix, locators });
                }
                Event::Unregistered { prefix, .. } => {
                    let locators = self.engine.locals().to_vec();
                    let _ = self
                        .registrations
                        .send(Registration::Unregistered { prefix, locators });
                }
                Event::RegistrationRequest(r) => self.hub.request(r),
                Event::Registrar(e) => self.hub.registrar_event(e),
                Event::PathValidationFailed(_, at) => {
                    tracing::debug!(%at, "the peer's new address did not answer its path challenge");
                }
                Event::SynHeld(h) => {
                    let d = crate::delay::DelayedSyn::new(&h, self.now());
                    tracing::debug!(id = %d.id, service = %d.service, client = %d.client, "SYN held by a DELAY rule");
                    let _ = self.held.send(d);
                }
                Event::Migrated(h, local) => {
                    if let Some(c) = self.conns.get_mut(&h) {
                        for tx in c.migrated.drain(..) {
                            let _ = tx.send(local);
                        }
                    }
                    let _ = self.path_events.send(PathEvent::Moved {
                        stream: h,
                        to: local,
                    });
                }
                Event::PathUp(stream, path) => {
                    let _ = self.path_events.send(PathEvent::PathUp { stream, path });
                }
                Event::PathDown(stream, path) => {
                    let _ = self.path_events.send(PathEvent::PathDown { stream, path });
                }
                Event::MoveAbandoned(h, to) => {
                    tracing::info!(%to, "a move was given up before the peer confirmed it");
                    let _ = self
                        .path_events
                        .send(PathEvent::MoveAbandoned { stream: h, to });
                }
                ev @ (Event::PeerMigrated(..) | Event::MoveAsked(..) | Event::MoveRefused(..)) => {
                    self.on_move_event(ev);
                }
            }
        }
    }
}

pub(crate) struct Socket {
    /// Registered with the runtime for *reading only*. Registered for writing as well (as
    /// `tokio::net::UdpSocket` always is), every send would come back as an edge-triggered
    /// "writable" event once the kernel frees the datagram — on loopback and veth during the
    /// send itself — costing an `epoll_wait` (or a wake-up) per send for nothing. Sends are
    /// tried directly; only a full socket buffer waits for writability (see [`send`]).
    io: AsyncFd<StdUdpSocket>,
    udp: UdpSocketState,
    pub(crate) local: Locator,
    /// Bound to the wildcard address: datagrams carry their destination address
    /// (`IP_PKTINFO`), and what leaves from one of the host's addresses names it as source.
    wildcard: bool,
    /// The same socket as a plain blocking-API handle (non-blocking), to send the last
    /// UNREGISTERs when the endpoint is dropped, with or without a runtime.
    last_words: StdUdpSocket,
}

pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    /// Wakes the driver: there may be something to send, or the timer changed.
    pub(crate) wake: Arc<Notify>,
    /// The UDP sockets, in binding order; an endpoint that follows the host's addresses
    /// appends one for each new address (never removes one: a socket whose address went
    /// comes back to life with it).
    pub(crate) sockets: arc_swap::ArcSwap<Vec<Arc<Socket>>>,
    table: Arc<ServiceTable>,
}

impl Shared {
    /// Closes a listener or datagram socket: its rule goes, the control plane hears of it.
    pub(crate) fn release_listener(&self, id: ListenerId) {
        let mut st = self.lock();
        st.engine.close_listener(id);
        st.listeners.remove(&id);
        st.dispatch();
        // The UNREGISTER goes out now, from here, rather than with the driver's next batch: a
        // listener is often dropped as the program exits, when the driver may never run
        // again. Its retransmissions, if any, are the driver's.
        let now = st.now();
        let unregisters: Vec<_> =
            std::iter::from_fn(|| st.engine.poll_registration_transmit(now)).collect();
        drop(st);
        self.send_now(&unregisters);
        self.wake.notify_one();
    }

    /// Sends datagrams at once through the sockets' plain handles (no runtime needed).
    fn send_now(&self, transmits: &[serval_engine::endpoint::Transmit]) {
        let sockets = self.sockets.load();
        for t in transmits {
            if let Some((s, _)) = socket_for(&sockets, t.src) {
                let _ = s.last_words.send_to(&t.payload, t.dst);
            }
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug in this crate; the state is still the
        // engine's own consistent data, so keep going rather than poison every caller.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Shared {
    /// The endpoint is gone (every handle, listener and stream dropped): the driver can no
    /// longer send, so send the registrar's UNREGISTERs once from here (best effort; the
    /// router's lease expires anyway).
    fn drop(&mut self) {
        let mut st = self.lock();
        let now = st.now();
        let last: Vec<_> = std::iter::from_fn(|| st.engine.poll_registration_transmit(now))
            .take(1024)
            .collect();
        drop(st);
        self.send_now(&last);
    }
}

/// A Serval endpoint: UDP sockets on one or more local addresses, and the protocol engine
/// driving every connection on them. Cloning gives another handle to the same endpoint; the
/// driver stops when every handle, stream and listener is gone.
#[derive(Clone)]
pub struct Endpoint {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("locals", &self.local_locators())
            .finish()
    }
}

impl Endpoint {
    /// Binds UDP sockets on `addrs` (IPv4 and/or IPv6; port 0 picks one) with the default
    /// configuration.
    pub async fn bind(addrs: &[Locator]) -> io::Result<Endpoint> {
        Endpoint::bind_with(addrs, EndpointConfig::default()).await
    }

    /// Binds with a configuration. The endpoint follows the host's address and link changes
    /// ([`FollowHost::Flows`]); see [`Endpoint::bind_following`].
    pub async fn bind_with(addrs: &[Locator], config: EndpointConfig) -> io::Result<Endpoint> {
        Endpoint::bind_following(addrs, config, FollowHost::default()).await
    }

    /// Binds with a configuration, following the host's address and link changes as `follow`
    /// says: with [`FollowHost::Flows`] (the default) or [`FollowHost::Addresses`], a flow whose
    /// local address or link goes away moves by itself (an RSYN) to a surviving address of
    /// the same family, and [`Endpoint::path_events`] reports it; [`FollowHost::Off`] leaves
    /// every move to [`Stream::migrate`]. Where the host's changes cannot be watched (no
    /// rtnetlink), the endpoint works as with `Off` and logs why. Following the host also
    /// moves a flow whose path went silent with its link up (nothing acknowledged through
    /// [`STALE_PTOS`](serval_engine::endpoint::STALE_PTOS) probe timeouts) to another local
    /// address of its family ([`EndpointConfig::path_failover`]).
    pub async fn bind_following(
        addrs: &[Locator],
        mut config: EndpointConfig,
        follow: FollowHost,
    ) -> io::Result<Endpoint> {
        if addrs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an endpoint needs at least one local address",
            ));
        }
        // Hold a client's handshake ACK for its first data to carry (one packet and one
        // wake-up of the server fewer per connection), unless the configuration says otherwise.
        config
            .control
            .handshake_ack_delay
            .get_or_insert(HANDSHAKE_ACK_DELAY);
        if follow != FollowHost::Off {
            config.path_failover = true;
        }
        let mut sockets = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let socket = Socket::open(*addr)?;
            if socket.local.ip().is_loopback() {
                // Loopback carries 64 KiB datagrams, always, so start there rather than search:
                // a search from 1200 B probes only during bulk sends whose window holds the
                // probe, so on a request/response connection it never ran, every 1.3 KB HTTP
                // response went as two packets, and the peer acknowledged each at once (two
                // ack-eliciting packets): one extra packet each way per request through the
                // translator (issue 13).
                config.transport.max_udp_payload = config.transport.max_udp_payload.max(65_000);
                config.transport.base_udp_payload = config.transport.max_udp_payload;
                // A loopback path's bandwidth-delay product is tiny (~60 µs of RTT: 0.5 MB
                // even at 64 Gbit/s), so a send buffer sized for long paths only queues data
                // in memory that has left the cache by the time it is copied into a packet.
                // Unless the configuration chose its own size. (The receive window stays:
                // peers assume each other's initial window is their own.)
                if config.transport.send_buffer == TransportConfig::default().send_buffer {
                    config.transport.send_buffer = LOOPBACK_SEND_BUFFER;
                }
            }
            sockets.push(Arc::new(socket));
        }
        let locals: Vec<Locator> = sockets.iter().map(|s| s.local).collect();
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| io::Error::other(e.to_string()))?;
        let table = Arc::new(ServiceTable::new());
        let epoch = std::time::Instant::now();
        // The engine reads no clock: certificates are checked against the wall clock at the
        // epoch plus the engine's `now` (a later step of the wall clock is not followed).
        if config.unix_time_origin.is_none() {
            config.unix_time_origin = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok();
        }
        let engine = Engine::new(config, seed, table.clone(), locals);
        let (registrations, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                engine,
                epoch,
                conns: HashMap::new(),
                listeners: HashMap::new(),
                registrations,
                hub: Hub::new(),
                held: broadcast::channel(crate::delay::HELD_EVENTS).0,
                closed: false,
                driver_deadline: None,
                discovery: None,
                path_events: broadcast::channel(crate::netwatch::PATH_EVENTS).0,
                primary: None,
                drains: Vec::new(),
                collects: 0,
                move_asks: None,
            }),
            wake: Arc::new(Notify::new()),
            sockets: arc_swap::ArcSwap::from_pointee(sockets),
            table,
        });
        for s in shared.sockets.load().iter() {
            tokio::spawn(receive(Arc::downgrade(&shared), s.clone()));
        }
        tokio::spawn(drive(Arc::downgrade(&shared)));
        crate::netwatch::start(&shared, follow).await;
        Ok(Endpoint { shared })
    }

    /// The locators the endpoint's sockets are bound to (a wildcard socket as bound:
    /// `0.0.0.0:port`), including those bound since for new host addresses
    /// ([`FollowHost::Addresses`]).
    pub fn local_locators(&self) -> Vec<Locator> {
        self.shared.sockets.load().iter().map(|s| s.local).collect()
    }

    /// The local locators flows can use right now: those of [`Endpoint::local_locators`]
    /// whose address is usable, and, for a wildcard socket of an endpoint that follows the
    /// host, each usable host address of its family with its port.
    pub fn usable_locators(&self) -> Vec<Locator> {
        self.shared.lock().engine.locals().to_vec()
    }

    /// Stops using the local locator `local`, as when its address leaves the host or its
    /// link goes down, while its socket stays bound: it leaves
    /// [`Endpoint::usable_locators`], the paths from it (multipath; not a flow's first path)
    /// are removed at once, what they carried going out on each flow's other paths and the
    /// peer told, and [`Endpoint::path_events`] reports
    /// [`PathEvent::AddressRemoved`] then a [`PathEvent::PathDown`] for each such path. A
    /// flow whose first path runs from `local` keeps it until it moves
    /// ([`Stream::migrate`]). For an application that knows of a dead link before the host
    /// does (and for demonstrations of one: `serval demo`). Returns whether `local` was
    /// usable.
    pub fn remove_local(&self, local: Locator) -> bool {
        let mut st = self.shared.lock();
        if !st.engine.locals().contains(&local) {
            return false;
        }
        st.engine.remove_local(&local);
        let _ = st.path_events.send(PathEvent::AddressRemoved(local));
        st.dispatch();
        drop(st);
        self.shared.wake.notify_one();
        true
    }

    /// The paths of flow `stream` ([`Stream::id`]; [`Endpoint::flows`] lists them), as
    /// [`Stream::paths`] shows them, for an observer that does not hold the stream (an admin
    /// API). Empty for a flow that is gone.
    pub fn flow_paths(&self, stream: ConnectionHandle) -> Vec<crate::PathSummary> {
        self.shared.lock().engine.paths(stream)
    }

    /// Path events of every flow of this endpoint: local addresses that became usable or
    /// went away, flows moving, moved, or left without a usable address. Nothing is required
    /// of the application: flows move by themselves; this is for those who want to know.
    /// A receiver that falls more than a few hundred events behind loses the oldest.
    pub fn path_events(&self) -> broadcast::Receiver<PathEvent> {
        self.shared.lock().path_events.subscribe()
    }

    /// Sends SYNs for services with no more specific rule to `router` (a `/0` FORWARD rule).
    /// It replaces routerless mode's rule to the discovery group, if any: a router always wins.
    pub fn set_default_route(&self, router: Locator) {
        if let Some((group, _)) = self.shared.lock().discovery {
            self.shared
                .table
                .remove_target(&ServicePrefix::DEFAULT, &Action::Forward(group));
        }
        let _ = self.shared.table.add_target(
            ServicePrefix::DEFAULT,
            Target::new(Action::Forward(router), 0, 1),
        );
    }

    /// Adds a rule to the endpoint's service table.
    pub fn add_rule(&self, prefix: ServicePrefix, target: Target) -> io::Result<()> {
        self.shared
            .table
            .add_target(prefix, target)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
    }

    /// The endpoint's service table.
    pub fn table(&self) -> &Arc<ServiceTable> {
        &self.shared.table
    }

    /// Registration changes of this endpoint's listeners, for the control plane.
    pub fn registrations(&self) -> broadcast::Receiver<Registration> {
        self.shared.lock().registrations.subscribe()
    }

    /// Connects to `service`, resolved through the endpoint's service table (see
    /// [`Endpoint::set_default_route`]).
    pub async fn connect(&self, service: ServiceId) -> io::Result<Stream> {
        self.connect_inner(service, None, None).await
    }

    /// Connects to `service` sending the SYN to `next_hop` (a router or an instance).
    pub async fn connect_via(&self, service: ServiceId, next_hop: Locator) -> io::Result<Stream> {
        self.connect_inner(service, Some(next_hop), None).await
    }

    /// Connects to the service named `name`, keeping the name for the check of the server's
    /// certificate that [`PeerIdentity::Ca`](crate::PeerIdentity::Ca) requires.
    pub async fn connect_name(&self, name: &ServerName) -> io::Result<Stream> {
        self.connect_inner(name.service(), None, Some(name)).await
    }

    /// Connects to the service named `name` sending the SYN to `next_hop`, keeping the name as
    /// [`connect_name`](Self::connect_name) does.
    pub async fn connect_name_via(
        &self,
        name: &ServerName,
        next_hop: Locator,
    ) -> io::Result<Stream> {
        self.connect_inner(name.service(), Some(next_hop), Some(name))
            .await
    }

    async fn connect_inner(
        &self,
        service: ServiceId,
        via: Option<Locator>,
        name: Option<&ServerName>,
    ) -> io::Result<Stream> {
        let (tx, rx) = oneshot::channel();
        let mut deadline = None;
        let h = {
            let mut st = self.shared.lock();
            let now = st.now();
            let h = match (via, name) {
                (Some(hop), Some(name)) => st.engine.connect_name_via(now, name, hop),
                (Some(hop), None) => st.engine.connect_via(now, service, hop),
                (None, Some(name)) => st.engine.connect_name(now, name),
                (None, None) => st.engine.connect(now, service),
            }
            .map_err(connect_error)?;
            // Through the discovery group, silence is the only "no": give up sooner.
            if let Some((group, wait)) = st.discovery
                && st.engine.locators(h).is_some_and(|(_, peer)| peer == group)
            {
                deadline = Some(wait);
            }
            st.conns.insert(
                h,
                ConnSlot {
                    connect: Some(tx),
                    ..ConnSlot::default()
                },
            );
            h
        };
        self.shared.wake.notify_one();
        let stream = Stream::new(self.shared.clone(), h);
        let answer = match deadline {
            Some(wait) => match tokio::time::timeout(wait, rx).await {
                Ok(answer) => answer,
                // Dropping the stream resets the half-open connection.
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::HostUnreachable,
                        format!(
                            "no route to service {service} (no instance answered on the local network)"
                        ),
                    ));
                }
            },
            None => rx.await,
        };
        match answer {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(e)) => Err(connect_error(e)),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "endpoint closed",
            )),
        }
    }

    /// Serves `prefix` on this endpoint: new connections to it are accepted from the returned
    /// listener. Emits a [`Registration::Registered`].
    pub fn listen(&self, prefix: ServicePrefix) -> io::Result<ServiceListener> {
        self.listen_weighted(prefix, 0, 1)
    }

    /// Binds a datagram socket to `prefix`: datagrams sent to it by name arrive there.
    /// Emits a [`Registration::Registered`].
    pub fn bind_datagram(&self, prefix: ServicePrefix) -> io::Result<DatagramSocket> {
        let mut st = self.shared.lock();
        let id = st.engine.listen_datagrams(prefix, 0, 1);
        st.listeners.insert(id, ListenerSlot::default());
        st.dispatch();
        Ok(DatagramSocket {
            shared: self.shared.clone(),
            id,
            prefix,
        })
    }

    /// Sends a datagram to `to` by name from no particular service.
    pub fn send_datagram(&self, to: ServiceId, data: &[u8]) -> io::Result<()> {
        let r = self.shared.lock().engine.send_datagram(None, to, data);
        self.shared.wake.notify_one();
        r.map_err(crate::datagram::datagram_error)
    }

    /// [`Endpoint::listen`] with a priority and weight for the service table.
    pub fn listen_weighted(
        &self,
        prefix: ServicePrefix,
        priority: u32,
        weight: u32,
    ) -> io::Result<ServiceListener> {
        let mut st = self.shared.lock();
        let id = st.engine.listen(prefix, priority, weight);
        st.listeners.insert(id, ListenerSlot::default());
        st.dispatch();
        drop(st);
        self.shared.wake.notify_one();
        Ok(ServiceListener {
            shared: self.shared.clone(),
            id,
            prefix,
        })
    }
}

fn connect_error(e: ConnectError) -> io::Error {
    let kind = match e {
        ConnectError::NoRoute(_) => io::ErrorKind::HostUnreachable,
        ConnectError::TimedOut(_) => io::ErrorKind::TimedOut,
        ConnectError::NoLocalAddress(_) => io::ErrorKind::AddrNotAvailable,
        ConnectError::PeerIdentity { .. } => io::ErrorKind::PermissionDenied,
    };
    io::Error::new(kind, e)
}

/// Accepts connections to a service, like `tokio::net::TcpListener`. Dropping it unregisters
/// the service.
pub struct ServiceListener {
    shared: Arc<Shared>,
    id: ListenerId,
    prefix: ServicePrefix,
}

impl std::fmt::Debug for ServiceListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceListener")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl ServiceListener {
    /// The service prefix served.
    pub fn prefix(&self) -> ServicePrefix {
        self.prefix
    }

    /// Waits for the next connection. Cancel-safe: a connection is taken from the queue only
    /// when this returns it.
    pub async fn accept(&mut self) -> io::Result<Stream> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Polls for the next connection.
    pub fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Stream>> {
        let mut st = self.shared.lock();
        if st.closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "endpoint closed",
            )));
        }
        let moved = st
            .listeners
            .get_mut(&self.id)
            .and_then(|l| l.moved_in.pop_front());
        if let Some((h, app)) = moved {
            drop(st);
            return Poll::Ready(Ok(Stream::moved_in(self.shared.clone(), h, app)));
        }
        match st.engine.accept(self.id) {
            Some(h) => {
                st.conns.insert(h, ConnSlot::default());
                drop(st);
                Poll::Ready(Ok(Stream::new(self.shared.clone(), h)))
            }
            None => {
                if let Some(slot) = st.listeners.get_mut(&self.id) {
                    slot.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for ServiceListener {
    fn drop(&mut self) {
        self.shared.release_listener(self.id);
    }
}

/// How long a client holds the handshake's ACK for its first data to carry, unless the
/// configuration sets [`serval_engine::connection::ControlConfig::handshake_ack_delay`]: long
/// enough for the application task to run after the connect completes, short enough not to
/// delay a server that speaks first by much (and a client that reads first sends it at once).
const HANDSHAKE_ACK_DELAY: Duration = Duration::from_millis(1);

/// The send buffer of an endpoint bound to a loopback address whose configuration left the
/// engine's default (4 MiB, for long paths): on loopback, with both directions busy, the
/// smaller buffer moved an echo about 1.5–2× faster, and one-way bulk no slower
/// (BENCHMARKS.md, issue 13).
const LOOPBACK_SEND_BUFFER: usize = 512 << 10;

/// Datagrams received per batch (GRO may pack several into one buffer).
const RECV_BATCH: usize = 16;

/// Receives on one socket and feeds the engine, until the endpoint is gone.
pub(crate) async fn receive(weak: std::sync::Weak<Shared>, sock: Arc<Socket>) {
    let Some(shared) = weak.upgrade() else { return };
    let gro = sock.udp.gro_segments().max(1);
    let buf_len = 65_536 * gro.min(4);
    let mut bufs: Vec<Vec<u8>> = (0..RECV_BATCH).map(|_| vec![0u8; buf_len]).collect();
    let mut meta = vec![RecvMeta::default(); RECV_BATCH];
    let mut out = SendQueue::new();
    drop(shared);
    // One liveness timer for the task's life, re-armed when it fires: a timer created per
    // receive would be registered (and often unpark the runtime) once per batch.
    let liveness = tokio::time::sleep(Duration::from_secs(1));
    tokio::pin!(liveness);
    loop {
        let Some(shared) = weak.upgrade() else { return };
        let readable = tokio::select! {
            r = sock.io.readable() => r,
            () = &mut liveness => {
                liveness
                    .as_mut()
                    .reset(tokio::time::Instant::now() + Duration::from_secs(1));
                continue;
            }
        };
        let Ok(mut guard) = readable else {
            return;
        };
        let res = {
            let mut slices: Vec<IoSliceMut<'_>> = bufs
                .iter_mut()
                .map(|b| IoSliceMut::new(&mut b[..]))
                .collect();
            sock.udp
                .recv(sock.io.get_ref().into(), &mut slices, &mut meta)
        };
        let n = match res {
            Ok(n) => {
                // A short batch drained the socket: clear the readiness now rather than by
                // another recvmmsg that would only find it empty (the edge-triggered poller
                // reports the next datagram anyway).
                if n < RECV_BATCH {
                    guard.clear_ready();
                }
                n
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                guard.clear_ready();
                continue;
            }
            Err(e) => {
                tracing::debug!(error = %e, "UDP receive failed");
                continue;
            }
        };
        drop(guard);
        let mut more = {
            let mut st = shared.lock();
            let now = st.now();
            // One batch for the engine, so that it resolves the SYNs among them together.
            // Opened in place: the buffers are refilled by the next receive anyway.
            let segments = meta[..n]
                .iter()
                .map(|m| m.len.div_ceil(m.stride.max(1)))
                .sum();
            let mut batch = Vec::with_capacity(segments);
            for (m, buf) in meta.iter().zip(&mut bufs).take(n) {
                let stride = m.stride.max(1);
                let local = sock.arrived_at(m, st.engine.locals());
                batch.extend(buf[..m.len].chunks_mut(stride).map(|data| Datagram {
                    local,
                    remote: m.addr,
                    data,
                }));
            }
            st.engine.handle_datagrams_mut(now, &mut batch);
            st.dispatch();
            // Answer at once from this task (ACKs, handshake replies, data the ACKs released)
            // rather than waking the driver for it: one task switch less per round trip.
            let more = out.collect(&mut st, now);
            let earlier = st
                .engine
                .poll_timeout()
                .is_some_and(|t| st.driver_deadline.is_none_or(|d| t < d));
            drop(st);
            if earlier {
                shared.wake.notify_one();
            }
            more
        };
        // Send all that these datagrams caused before reading more, so a flood (of SYNs to
        // forward, say) waits in the socket's buffer, where the kernel bounds and counts it,
        // rather than in the engine's queue.
        loop {
            out.send(&shared).await;
            if !more {
                break;
            }
            let mut st = shared.lock();
            let now = st.now();
            more = out.collect(&mut st, now);
            st.dispatch();
        }
    }
}

/// One datagram of a send batch: its route and where its bytes are in the batch buffer.
struct Outgoing {
    src: Locator,
    dst: Locator,
    start: usize,
    len: usize,
}

/// Most datagrams, and most bytes, collected under the lock before sending.
const SEND_BATCH: usize = 64;
const SEND_BATCH_BYTES: usize = 1 << 20;

/// A batch of datagrams to send, built by the engine straight into one buffer that is reused
/// for every batch; runs of same-route, same-size datagrams go out from it as single GSO sends.
struct SendQueue {
    buf: Vec<u8>,
    batch: Vec<Outgoing>,
    /// Where a batch with interleaved routes is regrouped by route.
    regrouped_buf: Vec<u8>,
    regrouped: Vec<Outgoing>,
}

impl SendQueue {
    fn new() -> SendQueue {
        SendQueue {
            buf: Vec::new(),
            batch: Vec::with_capacity(SEND_BATCH),
            regrouped_buf: Vec::new(),
            regrouped: Vec::with_capacity(SEND_BATCH),
        }
    }

    /// If datagrams to several routes are interleaved (a router forwarding SYNs to many
    /// instances, several busy connections), copies the batch grouped by route, keeping the
    /// order within each route, so that each route's datagrams go out in as few GSO sends as
    /// possible. Returns whether it did.
    fn regroup(&mut self) -> bool {
        let route = |o: &Outgoing| (o.src, o.dst);
        let mut changes = 0;
        for w in self.batch.windows(2) {
            if route(&w[0]) != route(&w[1]) {
                changes += 1;
            }
        }
        // Two runs, or fewer, cannot be improved by reordering.
        if changes < 2 {
            return false;
        }
        let mut order: Vec<usize> = (0..self.batch.len()).collect();
        order.sort_by_key(|&i| route(&self.batch[i]));
        let regroups = order
            .windows(2)
            .filter(|w| route(&self.batch[w[0]]) != route(&self.batch[w[1]]))
            .count();
        if regroups == changes {
            return false;
        }
        self.regrouped_buf.clear();
        self.regrouped.clear();
        for i in order {
            let o = &self.batch[i];
            self.regrouped.push(Outgoing {
                src: o.src,
                dst: o.dst,
                start: self.regrouped_buf.len(),
                len: o.len,
            });
            self.regrouped_buf
                .extend_from_slice(&self.buf[o.start..o.start + o.len]);
        }
        true
    }

    /// Takes datagrams from the engine until the batch is full; returns whether it filled
    /// (more may be waiting).
    fn collect(&mut self, st: &mut State, now: Instant) -> bool {
        st.collects = st.collects.wrapping_add(1);
        while self.batch.len() < SEND_BATCH && self.buf.len() < SEND_BATCH_BYTES {
            let start = self.buf.len();
            match st.engine.poll_transmit_into(now, &mut self.buf) {
                Some((src, dst)) => self.batch.push(Outgoing {
                    src,
                    dst,
                    start,
                    len: self.buf.len() - start,
                }),
                None => {
                    st.held_output_news();
                    return false;
                }
            }
        }
        st.held_output_news();
        true
    }

    /// Sends what was collected (outside the lock) and empties the queue.
    async fn send(&mut self, shared: &Shared) {
        if self.batch.is_empty() {
            return;
        }
        if self.regroup() {
            send_batch(shared, &self.regrouped_buf, &self.regrouped).await;
        } else {
            send_batch(shared, &self.buf, &self.batch).await;
        }
        self.buf.clear();
        self.batch.clear();
    }
}

/// Sends what the engine wants to send and runs its timers, until the endpoint is gone.
///
/// The engine's deadline moves on almost every packet (a delayed ACK is armed by a request
/// and cancelled by the response that carries it), so the driver keeps one timer and moves it
/// only *earlier*: a deadline that moved later lets the timer fire early, once, and the loop
/// re-arms it. Registering a fresh, earlier timer with tokio unparks the runtime (an eventfd
/// write and an extra `epoll_wait`); doing that once per request cost more than the spurious
/// wake-up per delayed-ACK period that replaces it.
async fn drive(weak: std::sync::Weak<Shared>) {
    let mut out = SendQueue::new();
    let timer = tokio::time::sleep(Duration::from_secs(1));
    tokio::pin!(timer);
    // The engine time the timer is armed for; `None` once it fired or when nothing is due.
    let mut armed: Option<Instant> = None;
    let liveness = tokio::time::sleep(Duration::from_secs(1));
    tokio::pin!(liveness);
    loop {
        let Some(shared) = weak.upgrade() else { return };
        // Collect under the lock, send outside it.
        let (full, sent_any) = {
            let mut st = shared.lock();
            let now = st.now();
            if st.engine.poll_timeout().is_some_and(|t| t <= now) {
                st.engine.handle_timeout(now);
            }
            let full = out.collect(&mut st, now);
            st.dispatch();
            if armed.is_some() && timer.is_elapsed() {
                armed = None;
            }
            if let Some(t) = st.engine.poll_timeout()
                && armed.is_none_or(|a| t < a)
            {
                armed = Some(t);
                let at = st.epoch + Duration::from_nanos(t.as_nanos());
                timer.as_mut().reset(at.into());
            }
            // The driver wakes at `armed` at the latest: receive tasks need to wake it only
            // for a deadline earlier than that.
            st.driver_deadline = armed;
            (full, !out.batch.is_empty())
        };
        out.send(&shared).await;
        if sent_any && full {
            // The batch filled: more may be waiting. Loop, letting other tasks run first.
            tokio::task::yield_now().await;
            continue;
        }
        // Anything that makes the engine want to send later notifies `wake` (a permit is kept
        // if it happens before we wait) or moves the deadline.
        let wake = shared.wake.clone();
        let notified = wake.notified();
        drop(shared);
        tokio::select! {
            () = &mut timer, if armed.is_some() => armed = None,
            () = notified => {}
            // Re-check liveness now and then so the task ends with the endpoint.
            () = &mut liveness => liveness
                .as_mut()
                .reset(tokio::time::Instant::now() + Duration::from_secs(1)),
        }
    }
}

/// Sends a batch: each run of consecutive same-route datagrams of one size (the last may be
/// shorter) as one GSO send, straight from the batch buffer.
async fn send_batch(shared: &Shared, buf: &[u8], batch: &[Outgoing]) {
    let sockets = shared.sockets.load();
    let mut i = 0;
    while i < batch.len() {
        let first = &batch[i];
        let Some((sock, src_ip)) = socket_for(&sockets, first.src) else {
            i += 1;
            continue;
        };
        let seg = first.len;
        let max_segments = sock.udp.max_gso_segments().max(1);
        let mut j = i + 1;
        while j < batch.len()
            && j - i < max_segments
            && batch[j].src == first.src
            && batch[j].dst == first.dst
            && batch[j].len <= seg
            && batch[j - 1].len == seg
            && (j - i + 1) * seg <= 65_000
        {
            j += 1;
        }
        // Datagrams lie back to back in `buf`, so the run is one slice.
        let end = batch[j - 1].start + batch[j - 1].len;
        let contents = &buf[first.start..end];
        let segment_size = (j - i > 1).then_some(seg);
        let tx = UdpTransmit {
            destination: first.dst,
            ecn: None,
            contents,
            segment_size,
            src_ip,
        };
        match send(sock, &tx).await {
            Ok(()) => {}
            Err(e) if segment_size.is_some() => {
                // One datagram of the run can fail the whole GSO send (a path-MTU probe
                // larger than the interface takes EMSGSIZE): send them one by one, so that
                // only that one is lost.
                tracing::debug!(error = %e, dst = %first.dst, "GSO send failed; sending the run one by one");
                for d in &batch[i..j] {
                    let one = UdpTransmit {
                        contents: &buf[d.start..d.start + d.len],
                        segment_size: None,
                        ..tx
                    };
                    if let Err(e) = send(sock, &one).await {
                        tracing::debug!(error = %e, dst = %d.dst, "UDP send failed");
                    }
                }
            }
            // UDP is unreliable anyway: the transport retransmits.
            Err(e) => tracing::debug!(error = %e, dst = %first.dst, "UDP send failed"),
        }
        i = j;
    }
}

/// Sends `tx`, waiting while the socket's buffer is full; an error other than "would block" is
/// returned (the datagrams are lost).
async fn send(sock: &Socket, tx: &UdpTransmit<'_>) -> io::Result<()> {
    loop {
        match sock.udp.try_send(sock.io.get_ref().into(), tx) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => writable(sock).await?,
            r => return r,
        }
    }
}

impl Socket {
    /// Binds a UDP socket on `addr`, non-blocking, with large buffers, registered with the
    /// runtime for reading.
    pub(crate) fn open(addr: Locator) -> io::Result<Socket> {
        let std = StdUdpSocket::bind(addr)?;
        let udp = UdpSocketState::new((&std).into())?;
        // Large socket buffers absorb bursts between driver wake-ups.
        let _ = udp.set_send_buffer_size((&std).into(), 4 << 20);
        let _ = udp.set_recv_buffer_size((&std).into(), 4 << 20);
        std.set_nonblocking(true)?;
        let local = std.local_addr()?;
        let last_words = std.try_clone()?;
        Ok(Socket {
            io: register(std, Interest::READABLE)?,
            udp,
            local,
            wildcard: local.ip().is_unspecified(),
            last_words,
        })
    }

    /// The local locator a datagram arrived at: the socket's own, or for a wildcard socket
    /// the address it was sent to with the socket's port, if the engine offers that locator
    /// (an endpoint following the host does; otherwise the wildcard, as bound).
    fn arrived_at(&self, meta: &RecvMeta, locals: &[Locator]) -> Locator {
        if self.wildcard
            && let Some(ip) = meta.dst_ip
        {
            let concrete = Locator::new(ip, self.local.port());
            if locals.contains(&concrete) {
                return concrete;
            }
        }
        self.local
    }
}

/// The socket to send from `src` through, and the source address to name: the socket bound
/// to `src` itself, or a wildcard socket of its family and port, naming `src`'s address
/// (`IP_PKTINFO`).
fn socket_for(sockets: &[Arc<Socket>], src: Locator) -> Option<(&Socket, Option<IpAddr>)> {
    if let Some(s) = sockets.iter().find(|s| s.local == src) {
        return Some((s, None));
    }
    sockets
        .iter()
        .find(|s| s.wildcard && s.local.port() == src.port() && s.local.is_ipv4() == src.is_ipv4())
        .map(|s| (&**s, Some(src.ip())))
}

/// Registers a UDP socket with the runtime for `interest` only.
///
/// `AsyncFd::with_interest` is deprecated for lack of I/O safety with arbitrary `AsRawFd`
/// types, whose descriptor could change or close under the registration; its replacement is
/// `unsafe`, which this crate does not allow outside a system module. A `std` UDP socket owned
/// by the `AsyncFd` keeps its descriptor open and unchanged until the registration is dropped,
/// which is what the safety contract asks.
#[allow(deprecated)]
fn register(socket: StdUdpSocket, interest: Interest) -> io::Result<AsyncFd<StdUdpSocket>> {
    AsyncFd::with_interest(socket, interest)
}

/// Waits until the socket can take a datagram again. The socket is registered for reading
/// only (see [`Socket::io`]), so a second handle to it is registered for writing just for the
/// wait: rare (the socket buffer holds megabytes) and never on the path of a packet that went.
async fn writable(sock: &Socket) -> io::Result<()> {
    let fd = register(sock.io.get_ref().try_clone()?, Interest::WRITABLE)?;
    fd.writable().await?.clear_ready();
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn queue(routes: &[(u16, u8)]) -> SendQueue {
        let mut q = SendQueue::new();
        let src: Locator = "127.0.0.1:1".parse().unwrap();
        for (i, &(port, len)) in routes.iter().enumerate() {
            let start = q.buf.len();
            q.buf.extend(std::iter::repeat_n(i as u8, usize::from(len)));
            q.batch.push(Outgoing {
                src,
                dst: Locator::from(([127, 0, 0, 1], port)),
                start,
                len: usize::from(len),
            });
        }
        q
    }

    #[test]
    fn interleaved_routes_are_regrouped_keeping_order_within_each() {
        let mut q = queue(&[(2, 3), (3, 3), (2, 3), (4, 1), (3, 2)]);
        assert!(q.regroup());
        let got: Vec<(u16, Vec<u8>)> = q
            .regrouped
            .iter()
            .map(|o| {
                (
                    o.dst.port(),
                    q.regrouped_buf[o.start..o.start + o.len].to_vec(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (2, vec![0; 3]),
                (2, vec![2; 3]),
                (3, vec![1; 3]),
                (3, vec![4; 2]),
                (4, vec![3; 1]),
            ]
        );
    }

    #[test]
    fn batches_already_grouped_are_left_alone() {
        assert!(!queue(&[(2, 3), (2, 3), (3, 1)]).regroup());
        assert!(!queue(&[(2, 3), (3, 3), (4, 3)]).regroup());
        assert!(!queue(&[]).regroup());
    }
}
