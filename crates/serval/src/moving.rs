//! Streams that move between hosts: export and import of a live stream with the
//! application's state, and the cooperative hand-over an instance's migration agent
//! ([`Migrator`](crate::Migrator)) asks of an application (docs/moving-flows.md §3.2).
//!
//! The engine freezes and snapshots a connection (`Endpoint::export_with_app`); this module
//! gives that to applications as streams: [`Stream::export`] turns a stream into an
//! [`ExportedStream`] (its snapshot, to carry elsewhere), which is then either released (the
//! importer took over) or thawed (the move failed: the stream resumes here);
//! [`Endpoint::import`] turns a snapshot back into a stream and the state it carried.

use std::io;
use std::task::Poll;
use std::time::{Duration, Instant as StdInstant};

use serval_engine::endpoint::{ConnectionHandle, ConnectionInfo, ExportError};
use serval_engine::snapshot::SnapshotError;
use serval_wire::{FlowId, Locator};
use tokio::sync::oneshot;

use crate::endpoint::{ConnSlot, Endpoint};
use crate::stream::Stream;

/// A stream exported for a move: frozen here (it neither sends nor acknowledges; what the
/// peer sends meanwhile it sends again to the importer), with its snapshot. End it with
/// [`release`](Self::release) once the importer runs the stream, or [`thaw`](Self::thaw) if
/// the move failed. Dropped without either, it is released: a snapshot that may have been
/// imported must never also continue here (two hosts would send under one flow's keys).
#[derive(Debug)]
pub struct ExportedStream {
    stream: Option<Stream>,
    snapshot: Vec<u8>,
    took: Duration,
    /// How long the hand-over let the stream drain before the freeze.
    drained: Duration,
}

/// A hand-over freezes the stream once at most this much of what the application wrote is
/// unacknowledged (sent or not)...
///
/// Small: what is unacknowledged at the freeze travels in the snapshot and the importer sends
/// it again before anything new (the peer most likely has it already), from a fresh path's
/// initial window (14 720 bytes at the usual MTU). Kept below that window, it all goes in the
/// importer's first flight, right behind its RSYN, with new data after it.
pub const DRAIN_TARGET: usize = 8 << 10;
/// ...or after this long, whichever comes first...
pub const DRAIN_LIMIT: Duration = Duration::from_millis(50);
/// ...or once nothing was acknowledged for this long (a peer that stopped reading). Only a
/// bound for that case: the drain looks after every batch of packets, not on this timer.
pub const DRAIN_STALL: Duration = Duration::from_millis(10);

/// Longest a hand-over waits for the peer to acknowledge the removal of the stream's other
/// paths (a snapshot carries one path). Past it the stream moves anyway: the peer then finds
/// those paths silent and drops them.
pub const COLLAPSE_LIMIT: Duration = Duration::from_millis(500);

impl ExportedStream {
    /// The snapshot (docs/snapshot.md), for [`Endpoint::import`] on the importing host. It
    /// holds the flow's keys: carry it only over a protected channel.
    pub fn snapshot(&self) -> &[u8] {
        &self.snapshot
    }

    /// How long the freeze and export took.
    pub fn export_time(&self) -> Duration {
        self.took
    }

    /// How long the hand-over let the stream drain before the freeze ([`DRAIN_TARGET`]);
    /// zero for [`Stream::export`], which freezes at once.
    pub fn drain_time(&self) -> Duration {
        self.drained
    }

    /// The flowID of the exported connection at this end.
    pub fn flow(&self) -> Option<FlowId> {
        let s = self.stream.as_ref()?;
        let st = s.shared().lock();
        st.engine.connection_info(s.handle()).map(|c| c.local_flow)
    }

    /// The importer took over: forgets the flow here. Nothing is sent to the peer, and
    /// packets that still arrive for it are dropped like those of an unknown flow.
    pub fn release(mut self) {
        self.end_here();
    }

    fn end_here(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        let shared = stream.shared().clone();
        let h = stream.handle();
        {
            let mut st = shared.lock();
            st.engine.release_exported(h);
            st.conns.remove(&h);
        }
        // The slot is gone, so dropping the handle resets nothing (the connection is unknown).
        drop(stream);
    }

    /// The move failed: the stream resumes here, as it was. Timers that fell due while it was
    /// frozen fire at once; the peer retransmits what it sent meanwhile.
    pub fn thaw(mut self) -> Stream {
        let stream = self
            .stream
            .take()
            .expect("an exported stream holds its stream");
        {
            let mut st = stream.shared().lock();
            st.engine.thaw(stream.handle());
            if let Some(c) = st.conns.get_mut(&stream.handle()) {
                c.exported = false;
            }
        }
        stream.shared().wake.notify_one();
        stream
    }
}

impl Drop for ExportedStream {
    fn drop(&mut self) {
        self.end_here();
    }
}

/// [`Stream::export`] or [`Stream::hand_over`] failed; the stream, if any, is the
/// application's again and runs as before.
#[derive(Debug)]
pub struct MoveFailed {
    /// The stream, still usable here (`None` if the move's end could not be known, in which
    /// case it was released rather than risk two hosts continuing it).
    pub stream: Option<Stream>,
    /// Why.
    pub error: io::Error,
}

impl std::fmt::Display for MoveFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the stream did not move: {}", self.error)
    }
}

impl std::error::Error for MoveFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// What an application hands its migration agent: the exported stream, and where to say
/// how the move ended (the stream comes back if it failed).
#[derive(Debug)]
pub(crate) struct Handover {
    pub(crate) exported: ExportedStream,
    pub(crate) reply: oneshot::Sender<Result<(), (Stream, io::Error)>>,
}

impl Stream {
    /// Freezes this stream and exports it with `app_state`, the application's state for it
    /// (at most [`MAX_APP_STATE`](serval_engine::endpoint::MAX_APP_STATE) bytes), which the
    /// importer's application gets from [`Stream::take_app_state`]. Needs the whole stream
    /// (no split half elsewhere) of an established connection; otherwise it fails and the
    /// stream is returned unchanged.
    pub fn export(self, app_state: &[u8]) -> Result<ExportedStream, MoveFailed> {
        if !self.is_whole() {
            return Err(MoveFailed {
                stream: Some(self),
                error: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a split half of the stream is still in use",
                ),
            });
        }
        let started = StdInstant::now();
        let result = {
            let mut st = self.shared().lock();
            let now = st.now();
            let r = st.engine.export_with_app(self.handle(), now, app_state);
            if r.is_ok()
                && let Some(c) = st.conns.get_mut(&self.handle())
            {
                c.exported = true;
                c.move_request = None;
            }
            r
        };
        match result {
            Ok(snapshot) => Ok(ExportedStream {
                stream: Some(self),
                snapshot,
                took: started.elapsed(),
                drained: Duration::ZERO,
            }),
            Err(e) => {
                let kind = match e {
                    ExportError::AppStateTooLarge(_) => io::ErrorKind::InvalidInput,
                    _ => io::ErrorKind::NotConnected,
                };
                Err(MoveFailed {
                    stream: Some(self),
                    error: io::Error::new(kind, e),
                })
            }
        }
    }

    /// Before a hand-over's freeze (pre-copy, as a live VM migration does): lets the
    /// connection send, and see acknowledged, what it holds while it still runs, so that the
    /// snapshot — whose transfer is the client's pause — is small. It stops once at most
    /// [`DRAIN_TARGET`] bytes of what the application wrote are unacknowledged, after
    /// [`DRAIN_LIMIT`], or once nothing was acknowledged for [`DRAIN_STALL`]. It looks after
    /// every batch of packets the endpoint handled, not on a timer: the freeze follows the
    /// acknowledgement that allows it at once (a timer's millisecond would be a millisecond
    /// of the client's pause: it has received everything by then). Bytes received and not
    /// read do not hold it up: the application reads nothing meanwhile (it is in
    /// `hand_over`), and they travel in the snapshot. Returns how long it took.
    async fn drain_before_freeze(&self) -> Duration {
        let started = StdInstant::now();
        let limit = tokio::time::sleep(DRAIN_LIMIT);
        let stall = tokio::time::sleep(DRAIN_STALL);
        tokio::pin!(limit, stall);
        let mut before = usize::MAX;
        loop {
            // Ready(true): it shrank; Ready(false): drained (or gone); else woken by the
            // endpoint's next batch of work. Looked at and registered under one lock, so no
            // acknowledgement slips between the two.
            let shrank = std::future::poll_fn(|cx| {
                let mut st = self.shared().lock();
                match self.backlog_shrank(&st, &mut before) {
                    Some(true) => Poll::Ready(true),
                    Some(false) => {
                        st.drains.push(cx.waker().clone());
                        Poll::Pending
                    }
                    None => Poll::Ready(false),
                }
            });
            tokio::select! {
                biased;
                more = shrank => {
                    if !more {
                        return started.elapsed();
                    }
                    stall
                        .as_mut()
                        .reset(tokio::time::Instant::now() + DRAIN_STALL);
                }
                () = &mut limit => return started.elapsed(),
                () = &mut stall => {
                    // A thread that was not scheduled for that long may find the timer due
                    // before its receive task had the acknowledgements waiting: let it run
                    // once, then decide.
                    tokio::task::yield_now().await;
                    let st = self.shared().lock();
                    if self.backlog_shrank(&st, &mut before) != Some(true) {
                        return started.elapsed();
                    }
                    stall
                        .as_mut()
                        .reset(tokio::time::Instant::now() + DRAIN_STALL);
                }
            }
        }
    }

    /// Before a hand-over's freeze: a snapshot carries one path, so the stream's other paths
    /// are removed (what they had in flight goes out on path 0) and the peer is told, and this
    /// waits, up to [`COLLAPSE_LIMIT`], for it to acknowledge, so that it stops sending on
    /// them before the stream leaves this host. Looks after every batch of packets the
    /// endpoint handled, as the drain does.
    async fn collapse_paths(&self) {
        let others: Vec<u32> = self.paths().iter().skip(1).map(|p| p.id).collect();
        if others.is_empty() {
            return;
        }
        for id in others {
            self.remove_path(id);
        }
        let told = std::future::poll_fn(|cx| {
            let mut st = self.shared().lock();
            if st.engine.removals_pending(self.handle()) {
                st.drains.push(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        });
        let _ = tokio::time::timeout(COLLAPSE_LIMIT, told).await;
    }

    /// The drain's look at the send backlog: `None` once it is at most [`DRAIN_TARGET`] (or
    /// the connection is gone), `Some(true)` if it shrank below `before` (which then becomes
    /// it), `Some(false)` if it did not.
    fn backlog_shrank(&self, st: &crate::endpoint::State, before: &mut usize) -> Option<bool> {
        let n = st
            .engine
            .buffered(self.handle())
            .map(|(send, _)| send)
            .filter(|n| *n > DRAIN_TARGET)?;
        let shrank = n < *before;
        if shrank {
            *before = n;
        }
        Some(shrank)
    }

    /// Waits until this stream is asked to move to another host (by the instance's
    /// migration agent, e.g. `serval migrate`). The application then calls
    /// [`hand_over`](Self::hand_over) at a point where `app_state` describes everything it
    /// did with the bytes it read. Never completes for a stream that is not asked to move
    /// (and completes at once if the connection closes, so that a `select!` loop notices).
    pub async fn move_requested(&self) {
        std::future::poll_fn(|cx| {
            let mut st = self.shared().lock();
            match st.conns.get_mut(&self.handle()) {
                Some(c) if c.closed.is_none() && c.move_request.is_none() => {
                    c.move_waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                _ => Poll::Ready(()),
            }
        })
        .await;
    }

    /// Whether a move of this stream is waiting for [`hand_over`](Self::hand_over).
    pub fn is_move_requested(&self) -> bool {
        let st = self.shared().lock();
        st.conns
            .get(&self.handle())
            .is_some_and(|c| c.move_request.is_some())
    }

    /// Hands this stream, with `app_state`, to the migration agent that asked for it to move
    /// (see [`move_requested`](Self::move_requested)), and waits for the move to end. `Ok`:
    /// the stream runs at the other host, with `app_state`. `Err`: it did not move; if the
    /// error holds the stream, it runs here as before.
    pub async fn hand_over(self, app_state: &[u8]) -> Result<(), MoveFailed> {
        let request = {
            let mut st = self.shared().lock();
            st.conns
                .get_mut(&self.handle())
                .and_then(|c| c.move_request.take())
        };
        let Some(request) = request else {
            return Err(MoveFailed {
                stream: Some(self),
                error: io::Error::new(
                    io::ErrorKind::NotFound,
                    "no move of this stream was asked for (or it was called off)",
                ),
            });
        };
        self.collapse_paths().await;
        let drained = self.drain_before_freeze().await;
        let mut exported = self.export(app_state)?;
        exported.drained = drained;
        let (reply, outcome) = oneshot::channel();
        if let Err(Handover { exported, .. }) = request.send(Handover { exported, reply }) {
            // The agent gave up waiting: the move is off, nothing was sent anywhere.
            return Err(MoveFailed {
                stream: Some(exported.thaw()),
                error: io::Error::new(io::ErrorKind::TimedOut, "the move was called off"),
            });
        }
        match outcome.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err((stream, error))) => Err(MoveFailed {
                stream: Some(stream),
                error,
            }),
            Err(_) => Err(MoveFailed {
                stream: None,
                error: io::Error::other("the migration agent stopped during the move"),
            }),
        }
    }
}

impl Endpoint {
    /// Every live connection of this endpoint, as `serval flows` shows them.
    pub fn flows(&self) -> Vec<ConnectionInfo> {
        self.shared.lock().engine.connections()
    }

    /// Continues here the stream a snapshot holds ([`ExportedStream::snapshot`] from another
    /// host): returns it with the application state it carried. The connection re-binds
    /// toward its peer from this endpoint's locator with an authenticated RSYN; the peer sees
    /// only a locator change. Refused, with nothing changed, for a snapshot that is corrupt,
    /// truncated, foreign, replayed, for a service no listener here serves, or for a flow
    /// already live here (`InvalidData` / `AlreadyExists` / `NotFound`).
    pub fn import(&self, snapshot: &[u8]) -> io::Result<(Stream, Option<Vec<u8>>)> {
        let (h, app) = self.import_inner(snapshot).map_err(snapshot_error)?;
        {
            let mut st = self.shared.lock();
            st.conns.insert(h, ConnSlot::default());
        }
        self.shared.wake.notify_one();
        Ok((Stream::new(self.shared.clone(), h), app))
    }

    fn import_inner(
        &self,
        snapshot: &[u8],
    ) -> Result<(ConnectionHandle, Option<Vec<u8>>), SnapshotError> {
        let mut st = self.shared.lock();
        let now = st.now();
        st.engine.import_with_app(snapshot, now)
    }

    /// Whether [`import`](Self::import) would take `snapshot` now (changing nothing).
    pub(crate) fn check_import(&self, snapshot: &[u8]) -> io::Result<()> {
        let st = self.shared.lock();
        let now = st.now();
        st.engine
            .check_import(snapshot, now)
            .map_err(snapshot_error)
    }

    /// Imports a moved stream for the listener serving it: [`ServiceListener::accept`]
    /// returns it, with its state. Returns a receiver told when the re-bind completed.
    ///
    /// [`ServiceListener::accept`]: crate::ServiceListener::accept
    pub(crate) fn import_to_listener(
        &self,
        snapshot: &[u8],
    ) -> Result<(FlowId, oneshot::Receiver<Locator>), SnapshotError> {
        self.import_into_listener(snapshot, false)
    }

    /// [`import_to_listener`](Self::import_to_listener) for a standby's checkpoint, whose
    /// APP block holds the application's state and its last step's unsent output
    /// ([`Stream::commit`]): the output is sent first, and the stream stays replicable.
    pub(crate) fn import_standby_to_listener(
        &self,
        snapshot: &[u8],
    ) -> Result<(FlowId, oneshot::Receiver<Locator>), SnapshotError> {
        self.import_into_listener(snapshot, true)
    }

    fn import_into_listener(
        &self,
        snapshot: &[u8],
        standby: bool,
    ) -> Result<(FlowId, oneshot::Receiver<Locator>), SnapshotError> {
        let (rebound, rx) = oneshot::channel();
        let mut st = self.shared.lock();
        let now = st.now();
        let (h, app) = st.engine.import_with_app(snapshot, now)?;
        let info = st.engine.connection_info(h);
        let flow = info.as_ref().map_or(FlowId(0), |c| c.local_flow);
        let mut replica = crate::standby::StreamReplica::default();
        let app = match app {
            Some(blob) if standby => match crate::standby::split_app_blob(&blob) {
                Some((state, out)) => {
                    replica.state = Some(state.clone());
                    replica.out = out;
                    replica.drain(&mut st.engine, h);
                    Some(state)
                }
                None => {
                    st.engine.abort(h);
                    return Err(SnapshotError::Malformed {
                        block: serval_engine::snapshot::block::APP,
                        reason: "not a standby checkpoint's application block",
                    });
                }
            },
            app => app,
        };
        st.conns.insert(
            h,
            ConnSlot {
                migrated: vec![rebound],
                replica,
                ..ConnSlot::default()
            },
        );
        match info
            .and_then(|c| c.listener)
            .and_then(|l| st.listeners.get_mut(&l))
        {
            Some(l) => {
                l.moved_in.push_back((h, app));
                if let Some(w) = l.waker.take() {
                    w.wake();
                }
            }
            None => {
                // No listener left to take it (closed meanwhile): a clean reset, not a hang.
                st.engine.abort(h);
                st.conns.remove(&h);
                drop(st);
                self.shared.wake.notify_one();
                return Err(SnapshotError::NotServed);
            }
        }
        drop(st);
        self.shared.wake.notify_one();
        Ok((flow, rx))
    }

    /// Asks the application holding connection `flow` to hand it over (it sees
    /// [`Stream::move_requested`]); the receiver gets the exported stream.
    pub(crate) fn request_move(&self, flow: FlowId) -> io::Result<oneshot::Receiver<Handover>> {
        let mut st = self.shared.lock();
        let h = st
            .engine
            .find_flow(flow)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no flow {flow}")))?;
        let slot = st
            .conns
            .get_mut(&h)
            .filter(|c| !c.detached)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("flow {flow} is not held by an application here"),
                )
            })?;
        if slot.exported || slot.move_request.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("flow {flow} is already moving"),
            ));
        }
        let (tx, rx) = oneshot::channel();
        slot.move_request = Some(tx);
        if let Some(w) = slot.move_waker.take() {
            w.wake();
        }
        Ok(rx)
    }

    /// Calls off a move asked for with [`request_move`](Self::request_move) that the
    /// application has not answered.
    pub(crate) fn cancel_move(&self, flow: FlowId) {
        let mut st = self.shared.lock();
        if let Some(h) = st.engine.find_flow(flow)
            && let Some(c) = st.conns.get_mut(&h)
        {
            c.move_request = None;
        }
    }
}

/// A refused snapshot as an I/O error of the matching kind.
pub(crate) fn snapshot_error(e: SnapshotError) -> io::Error {
    let kind = match e {
        SnapshotError::NotServed => io::ErrorKind::NotFound,
        SnapshotError::FlowInUse | SnapshotError::Replayed => io::ErrorKind::AlreadyExists,
        _ => io::ErrorKind::InvalidData,
    };
    io::Error::new(kind, e)
}
