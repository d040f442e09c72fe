//! `serval expose`'s hand-over: a running translator gives every live connection to a new
//! `expose` process on the same host, so the translator can be upgraded or restarted with
//! nothing dropped (issue 10 item 5; docs/protocol.md §4.4).
//!
//! The old process serves a Unix socket (`--handover-socket PATH`); the new one is started
//! with `--take-over PATH`. Over that socket, for each connection, the old process freezes
//! and exports the Serval stream — its snapshot's APP block holding the splice's state: the
//! bytes read from one side and not yet written to the other, and which ends are finished —
//! and passes the backend TCP socket itself as a descriptor (`SCM_RIGHTS`). The new process
//! imports the stream (which re-binds toward the client by RSYN from the new process's own
//! UDP socket, as a host move does) and splices on where the old one stopped. A flow the new
//! process refuses is thawed and kept by the old one; one whose fate cannot be known is
//! reset at both ends, never left hanging.
//!
//! Frames on the socket: `type u8 | length u32 (big-endian) | body`.
//!
//! | Type | Frame | Direction | Body |
//! |------|-------|-----------|------|
//! | 1 | HELLO | new → old | version u16, the service prefix (text) |
//! | 2 | WELCOME | old → new | version u16 |
//! | 3 | REFUSE | old → new | why (text); the old process goes on serving |
//! | 4 | GO | new → old | nothing: the new process serves and is registered |
//! | 5 | FLOW | old → new | flowID u64, snapshot; the backend socket's descriptor attached |
//! | 6 | TAKEN | new → old | flowID u64 |
//! | 7 | REFUSED | new → old | flowID u64, why (text) |
//! | 8 | LOST | new → old | flowID u64, why (text): imported, then reset |
//! | 9 | DONE | old → new | handed u32, kept u32, lost u32 |

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use serval::{Endpoint, FlowId, MoveFailed, ServicePrefix, Stream};
use tokio::io::Interest;
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, mpsc, oneshot, watch};

use crate::translate::SpliceState;

/// The hand-over protocol's version; HELLO and WELCOME must carry the same. It covers the
/// frames above and the splice state's encoding ([`SpliceState::encode`]).
const VERSION: u16 = 1;

const HELLO: u8 = 1;
const WELCOME: u8 = 2;
const REFUSE: u8 = 3;
const GO: u8 = 4;
const FLOW: u8 = 5;
const TAKEN: u8 = 6;
const REFUSED: u8 = 7;
const LOST: u8 = 8;
const DONE: u8 = 9;

/// A frame longer than this is refused: a snapshot holds at most a stream's send and receive
/// buffers and the splice's two buffers.
const MAX_FRAME: usize = 64 << 20;

/// How long the old process waits for a connected process's HELLO, and then its GO.
const HELLO_LIMIT: Duration = Duration::from_secs(5);
const GO_LIMIT: Duration = Duration::from_secs(20);
/// How long the new process waits for its registration with the router before it says GO.
const REGISTER_LIMIT: Duration = Duration::from_secs(10);
/// How long the old process waits for the answer to one FLOW.
const REPLY_LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------------

/// One end of the hand-over socket: frames out, frames and the descriptors that came with
/// them in.
pub(crate) struct Channel {
    pub(crate) sock: UnixStream,
    /// Bytes received and not yet taken as frames.
    rbuf: Vec<u8>,
    /// Descriptors received, in order; a FLOW frame takes the oldest.
    fds: VecDeque<OwnedFd>,
    /// What each receive reads into.
    chunk: Box<[u8]>,
}

impl Channel {
    pub(crate) fn new(sock: UnixStream) -> Channel {
        Channel {
            sock,
            rbuf: Vec::new(),
            fds: VecDeque::new(),
            chunk: vec![0u8; 64 << 10].into_boxed_slice(),
        }
    }

    /// Sends one frame; `fd` goes with its first byte.
    pub(crate) async fn send(
        &self,
        ty: u8,
        body: &[u8],
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> io::Result<()> {
        let len = u32::try_from(body.len())
            .ok()
            .filter(|&l| l as usize <= MAX_FRAME)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too long"))?;
        let mut frame = Vec::with_capacity(5 + body.len());
        frame.push(ty);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(body);
        let mut off = 0;
        let mut fd = fd;
        while off < frame.len() {
            let n = self
                .sock
                .async_io(Interest::WRITABLE, || {
                    serval_sys::fdpass::send_with_fds(
                        self.sock.as_fd(),
                        &frame[off..],
                        fd.as_slice(),
                    )
                })
                .await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            fd = None;
            off += n;
        }
        Ok(())
    }

    /// The oldest descriptor received and not yet taken: the one that came with the frame
    /// just received, if it carried one.
    pub(crate) fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }

    /// The next frame, `None` at a clean end of the connection.
    pub(crate) async fn recv(&mut self) -> io::Result<Option<(u8, Vec<u8>)>> {
        loop {
            if self.rbuf.len() >= 5 {
                let len =
                    u32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]])
                        as usize;
                if len > MAX_FRAME {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "frame too long"));
                }
                if self.rbuf.len() >= 5 + len {
                    let ty = self.rbuf[0];
                    let body = self.rbuf[5..5 + len].to_vec();
                    self.rbuf.drain(..5 + len);
                    return Ok(Some((ty, body)));
                }
            }
            let (sock, chunk) = (&self.sock, &mut self.chunk);
            let (n, fds) = sock
                .async_io(Interest::READABLE, || {
                    serval_sys::fdpass::recv_with_fds(sock.as_fd(), chunk)
                })
                .await?;
            self.fds.extend(fds);
            if self.fds.len() > serval_sys::fdpass::MAX_FDS {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "descriptors sent without their frames",
                ));
            }
            if n == 0 {
                return if self.rbuf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
            self.rbuf.extend_from_slice(&self.chunk[..n]);
        }
    }

    /// The next frame within `limit`; an end, a timeout or an error is one readable line.
    async fn expect(&mut self, limit: Duration, what: &str) -> Result<(u8, Vec<u8>), String> {
        match tokio::time::timeout(limit, self.recv()).await {
            Ok(Ok(Some(f))) => Ok(f),
            Ok(Ok(None)) => Err(format!(
                "the other process closed the hand-over before {what}"
            )),
            Ok(Err(e)) => Err(format!("hand-over socket: {e}")),
            Err(_) => Err(format!("no {what} within {} s", limit.as_secs())),
        }
    }
}

pub(crate) fn flow_of(body: &[u8]) -> Option<(FlowId, &[u8])> {
    let id = u64::from_be_bytes(body.get(..8)?.try_into().ok()?);
    Some((FlowId(id), &body[8..]))
}

pub(crate) fn with_flow(flow: FlowId, rest: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + rest.len());
    b.extend_from_slice(&flow.0.to_be_bytes());
    b.extend_from_slice(rest);
    b
}

pub(crate) fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

/// Refuses a peer that is not this process's user: the snapshots that cross hold the flows'
/// keys. (The socket file is also made readable and writable by its owner only.)
pub(crate) fn same_user(sock: &UnixStream) -> Result<(), String> {
    let peer = sock
        .peer_cred()
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if peer.uid() == me {
        Ok(())
    } else {
        Err(format!(
            "a process of uid {} is not this process's user ({me})",
            peer.uid()
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// What the translator's main loop sees
// ---------------------------------------------------------------------------------------------

/// What the hand-over tasks tell `serval expose`'s main loop.
pub enum Event {
    /// The new process took this connection over: splice it here.
    Adopted(Adopted),
    /// A new process is registered and waits for every connection: hand them over.
    HandOver(Arc<Giver>),
    /// The take-over asks for a slot under `--max-connections` for a connection (`None`: at
    /// the limit). Asked of the main loop because its wait for the next stream holds a slot,
    /// which it gives back when another event interrupts that wait.
    Slot(oneshot::Sender<Option<OwnedSemaphorePermit>>),
    /// The new process, its take-over over, serves its own hand-over socket: keep it (the
    /// file goes when it is dropped).
    Serving(Socket),
}

/// A connection taken over from the old process, with its slot under `--max-connections`.
pub struct Adopted {
    /// Its slot under `--max-connections`, held while it runs.
    pub slot: OwnedSemaphorePermit,
    /// The backend connection, from the old process's descriptor.
    pub tcp: TcpStream,
    /// The imported stream (re-binding toward its client).
    pub stream: Stream,
    /// Where the old process's splice stopped.
    pub state: SpliceState,
}

/// Connections that may still be handed over, and the signal that starts it.
pub struct Handovers {
    start: watch::Sender<Option<Arc<Giver>>>,
    pending: Arc<Pending>,
}

struct Pending {
    count: AtomicUsize,
    changed: Notify,
}

/// A connection's part in a hand-over: it waits for the signal, and while it is held the
/// connection counts as one still to be handed over (dropping it — handed, kept or ended —
/// says it is settled).
pub struct Hook {
    start: watch::Receiver<Option<Arc<Giver>>>,
    pending: Arc<Pending>,
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.pending.count.fetch_sub(1, Ordering::AcqRel);
        self.pending.changed.notify_one();
    }
}

impl Hook {
    /// Completes once a hand-over has started and it is this connection's turn (one at a
    /// time: until then the connection runs on as before, so that its client's pause is its
    /// own transfer only, not the others' before it).
    pub async fn requested(&mut self) -> Turn {
        loop {
            let giver = self.start.borrow_and_update().clone();
            if let Some(giver) = giver {
                let chan = giver.chan.clone().lock_owned().await;
                return Turn { giver, chan };
            }
            if self.start.changed().await.is_err() {
                // No hand-over can start any more.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Handovers {
    /// No connection yet, no hand-over started.
    pub fn new() -> Handovers {
        Handovers {
            start: watch::Sender::new(None),
            pending: Arc::new(Pending {
                count: AtomicUsize::new(0),
                changed: Notify::new(),
            }),
        }
    }

    /// A hook for a new connection.
    pub fn hook(&self) -> Hook {
        self.pending.count.fetch_add(1, Ordering::AcqRel);
        Hook {
            start: self.start.subscribe(),
            pending: self.pending.clone(),
        }
    }

    /// Asks every connection to hand itself to `giver`.
    pub fn start(&self, giver: Arc<Giver>) {
        self.start.send_replace(Some(giver));
    }

    /// Waits until no connection is left to hand over.
    pub async fn settled(&self) {
        loop {
            if self.pending.count.load(Ordering::Acquire) == 0 {
                return;
            }
            self.pending.changed.notified().await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The old process: serving the socket, handing connections over
// ---------------------------------------------------------------------------------------------

/// The old process's side of one hand-over.
pub struct Giver {
    chan: Arc<tokio::sync::Mutex<Channel>>,
    handed: AtomicU32,
    kept: AtomicU32,
    lost: AtomicU32,
    /// The longest a handed connection was frozen here (export to the TAKEN answer), in µs.
    longest_freeze_us: std::sync::atomic::AtomicU64,
}

/// How handing one connection over ended.
pub enum Given {
    /// The new process runs it.
    Handed,
    /// It stays here (refused, or it could not be exported): splice on, with `why` logged.
    Kept(TcpStream, Stream, SpliceState, String),
    /// It could not be kept nor known to run there: it was reset at both ends.
    Lost(String),
}

/// A connection's turn to be handed over: the hand-over socket, held until its answer.
pub struct Turn {
    giver: Arc<Giver>,
    chan: tokio::sync::OwnedMutexGuard<Channel>,
}

impl Turn {
    /// Hands one connection over: exports the stream with the splice's state, sends it with
    /// the backend socket's descriptor, and releases it (taken) or thaws it (refused).
    pub async fn give(self, tcp: TcpStream, stream: Stream, state: SpliceState) -> Given {
        let Turn { giver, mut chan } = self;
        giver.give(&mut chan, tcp, stream, state).await
    }
}

impl Giver {
    async fn give(
        &self,
        chan: &mut Channel,
        tcp: TcpStream,
        stream: Stream,
        state: SpliceState,
    ) -> Given {
        let frozen = std::time::Instant::now();
        let exported = match stream.export(&state.encode()) {
            Ok(e) => e,
            Err(MoveFailed {
                stream: Some(s),
                error,
            }) => {
                self.kept.fetch_add(1, Ordering::Relaxed);
                return Given::Kept(tcp, s, state, format!("not exported: {error}"));
            }
            Err(MoveFailed {
                stream: None,
                error,
            }) => {
                crate::translate::reset_tcp(tcp);
                self.lost.fetch_add(1, Ordering::Relaxed);
                return Given::Lost(format!("export: {error}"));
            }
        };
        let flow = exported.flow().unwrap_or(FlowId(0));
        // Out of the reactor, so that nothing here polls it while the other process uses it.
        let tcp = match tcp.into_std() {
            Ok(t) => t,
            Err(e) => {
                exported.thaw().abort();
                self.lost.fetch_add(1, Ordering::Relaxed);
                return Given::Lost(format!("cannot take the backend socket out: {e}"));
            }
        };
        let body = with_flow(flow, exported.snapshot());
        if let Err(e) = chan.send(FLOW, &body, Some(tcp.as_fd())).await {
            // The new process has no whole FLOW frame, so it cannot have imported the flow.
            return self.keep(exported.thaw(), tcp, state, format!("not sent: {e}"));
        }
        let reply = chan.expect(REPLY_LIMIT, "answer to a flow").await;
        match reply {
            Ok((TAKEN, b)) if flow_of(&b).is_some_and(|(f, _)| f == flow) => {
                // Our copy of the descriptor closes; the socket lives on in the new process.
                exported.release();
                drop(tcp);
                self.handed.fetch_add(1, Ordering::Relaxed);
                self.longest_freeze_us
                    .fetch_max(frozen.elapsed().as_micros() as u64, Ordering::Relaxed);
                Given::Handed
            }
            Ok((REFUSED, b)) if flow_of(&b).is_some_and(|(f, _)| f == flow) => {
                let why = text(flow_of(&b).map_or(&[][..], |(_, r)| r));
                self.keep(exported.thaw(), tcp, state, format!("refused: {why}"))
            }
            Ok((LOST, b)) if flow_of(&b).is_some_and(|(f, _)| f == flow) => {
                exported.release();
                drop(tcp);
                self.lost.fetch_add(1, Ordering::Relaxed);
                Given::Lost(format!(
                    "the new process reset it: {}",
                    text(flow_of(&b).map_or(&[][..], |(_, r)| r))
                ))
            }
            other => {
                // Imported there or not, nobody can say: a clean reset at both ends rather
                // than two processes continuing one flow, or a client left waiting. The RST
                // (sealed under the flow's keys) ends the client's flow wherever it points;
                // shutdown acts on the socket itself, so the backend sees its end even if the
                // new process holds the descriptor too.
                let why = match other {
                    Ok((ty, _)) => format!("unexpected frame {ty}"),
                    Err(e) => e,
                };
                exported.thaw().abort();
                let _ = tcp.shutdown(std::net::Shutdown::Both);
                self.lost.fetch_add(1, Ordering::Relaxed);
                Given::Lost(format!("no answer ({why}): reset"))
            }
        }
    }

    fn keep(
        &self,
        stream: Stream,
        tcp: std::net::TcpStream,
        state: SpliceState,
        why: String,
    ) -> Given {
        match TcpStream::from_std(tcp) {
            Ok(tcp) => {
                self.kept.fetch_add(1, Ordering::Relaxed);
                Given::Kept(tcp, stream, state, why)
            }
            Err(e) => {
                stream.abort();
                self.lost.fetch_add(1, Ordering::Relaxed);
                Given::Lost(format!("{why}; cannot take the backend socket back: {e}"))
            }
        }
    }

    /// The longest a handed connection was frozen here: from its export to the new
    /// process's TAKEN (the client's pause, but for the RSYN's trip to it).
    pub fn longest_freeze(&self) -> Duration {
        Duration::from_micros(self.longest_freeze_us.load(Ordering::Relaxed))
    }

    /// Tells the new process the hand-over is over; returns (handed, kept, lost).
    pub async fn finish(&self) -> (u32, u32, u32) {
        let counts = (
            self.handed.load(Ordering::Relaxed),
            self.kept.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed),
        );
        let mut body = Vec::with_capacity(12);
        for c in [counts.0, counts.1, counts.2] {
            body.extend_from_slice(&c.to_be_bytes());
        }
        let chan = self.chan.lock().await;
        if let Err(e) = chan.send(DONE, &body, None).await {
            note!("serval: expose: hand-over: cannot tell the new process it is done: {e}");
        }
        counts
    }
}

/// The old process's hand-over socket: the file, removed when the hand-over starts or the
/// process stops (whichever is first), so that the new process can serve the same path.
pub struct Socket {
    path: PathBuf,
    removed: Arc<std::sync::atomic::AtomicBool>,
}

impl Socket {
    /// Removes the socket file (once).
    pub fn remove(&self) {
        if !self.removed.swap(true, Ordering::AcqRel) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Serves the hand-over socket at `path` for `prefix`: the first process that connects,
/// says HELLO for the same service, and then GO, is sent as [`Event::HandOver`]. A stale
/// socket file (nobody accepting) is replaced; a live one is an error.
pub fn serve(
    path: &Path,
    prefix: ServicePrefix,
    events: mpsc::UnboundedSender<Event>,
) -> Result<Socket, String> {
    let (listener, socket) = bind_private(path, "--handover-socket")?;
    let removed = socket.removed.clone();
    let shown = path.display().to_string();
    tokio::spawn(async move {
        loop {
            let sock = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    note!("serval: expose: hand-over socket {shown}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match greet(sock, prefix).await {
                Ok(giver) => {
                    // One hand-over per process: nobody else may connect now.
                    if !removed.swap(true, Ordering::AcqRel) {
                        let _ = std::fs::remove_file(&shown);
                    }
                    let _ = events.send(Event::HandOver(giver));
                    return;
                }
                Err(e) => note!("serval: expose: no hand-over: {e}; serving on"),
            }
        }
    });
    Ok(socket)
}

/// Binds a Unix socket at `path` that only this process's user may use (`flag` names it in
/// errors). A stale socket file (nobody accepting) is replaced; a live one is an error.
pub(crate) fn bind_private(path: &Path, flag: &str) -> Result<(UnixListener, Socket), String> {
    if std::fs::symlink_metadata(path).is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "{flag} {}: another process serves it",
                path.display()
            ));
        }
        std::fs::remove_file(path).map_err(|e| {
            format!(
                "{flag} {}: cannot remove the stale file: {e}",
                path.display()
            )
        })?;
    }
    let listener =
        UnixListener::bind(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    let socket = Socket {
        path: path.to_owned(),
        removed: Arc::default(),
    };
    Ok((listener, socket))
}

/// Why a HELLO's body (`version u16 | service prefix`) of the `what` protocol is refused
/// by a process speaking `version` for `prefix`; `None` if it is not.
pub(crate) fn hello_refusal(
    body: &[u8],
    what: &str,
    version: u16,
    prefix: ServicePrefix,
) -> Option<String> {
    let Some((v, service)) = body.split_first_chunk::<2>() else {
        return Some("a HELLO without its version".into());
    };
    let asked = u16::from_be_bytes(*v);
    if asked != version {
        return Some(format!(
            "{what} version {asked} asked, this process speaks {version}"
        ));
    }
    match ServicePrefix::parse(&text(service)) {
        Ok(p) if p == prefix => None,
        Ok(p) => Some(format!("this process serves {prefix}, not {p}")),
        Err(e) => Some(format!("bad service in HELLO: {e}")),
    }
}

/// HELLO → WELCOME (or REFUSE) → GO, on the old process's side.
async fn greet(sock: UnixStream, prefix: ServicePrefix) -> Result<Arc<Giver>, String> {
    let mut chan = Channel::new(sock);
    if let Err(e) = same_user(&chan.sock) {
        let _ = chan.send(REFUSE, e.as_bytes(), None).await;
        return Err(e);
    }
    let (ty, body) = chan.expect(HELLO_LIMIT, "HELLO").await?;
    let refusal = match ty {
        HELLO => hello_refusal(&body, "hand-over", VERSION, prefix),
        _ => Some(format!("expected HELLO, got frame {ty}")),
    };
    if let Some(why) = refusal {
        let _ = chan.send(REFUSE, why.as_bytes(), None).await;
        return Err(why);
    }
    chan.send(WELCOME, &VERSION.to_be_bytes(), None)
        .await
        .map_err(|e| format!("hand-over socket: {e}"))?;
    match chan.expect(GO_LIMIT, "GO").await? {
        (GO, _) => Ok(Arc::new(Giver {
            chan: Arc::new(tokio::sync::Mutex::new(chan)),
            handed: AtomicU32::new(0),
            kept: AtomicU32::new(0),
            lost: AtomicU32::new(0),
            longest_freeze_us: std::sync::atomic::AtomicU64::new(0),
        })),
        (ty, _) => Err(format!("expected GO, got frame {ty}")),
    }
}

// ---------------------------------------------------------------------------------------------
// The new process: taking connections over
// ---------------------------------------------------------------------------------------------

/// The new process's side, between its HELLO and its GO.
pub struct Taker {
    chan: Channel,
    path: PathBuf,
}

/// Connects to the old process at `path` and asks for `prefix`'s connections (HELLO);
/// returns once the old process has agreed (WELCOME). Fails, with nothing changed at the old
/// process, if nothing serves `path` or the old process refuses.
pub async fn connect(path: &Path, prefix: ServicePrefix) -> Result<Taker, String> {
    let sock = UnixStream::connect(path)
        .await
        .map_err(|e| format!("--take-over {}: {e}", path.display()))?;
    let mut chan = Channel::new(sock);
    same_user(&chan.sock)?;
    let mut hello = VERSION.to_be_bytes().to_vec();
    hello.extend_from_slice(prefix.to_string().as_bytes());
    chan.send(HELLO, &hello, None)
        .await
        .map_err(|e| format!("--take-over {}: {e}", path.display()))?;
    match chan.expect(HELLO_LIMIT, "WELCOME").await? {
        (WELCOME, _) => Ok(Taker {
            chan,
            path: path.to_owned(),
        }),
        (REFUSE, why) => Err(format!(
            "the process at {} refused the take-over: {}",
            path.display(),
            text(&why)
        )),
        (ty, _) => Err(format!("expected WELCOME, got frame {ty}")),
    }
}

/// Waits until the endpoint is registered for `prefix` (when it registers with routers at
/// all), so that new connections have somewhere to go once the old process withdraws.
pub async fn registered(
    events: &mut tokio::sync::broadcast::Receiver<serval::RegistrarEvent>,
    name: &str,
) -> Result<(), String> {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(ev @ serval::RegistrarEvent::Registered { .. }) => {
                    note!("{}", crate::net::describe_event(name, &ev));
                    return Ok(());
                }
                Ok(ev @ serval::RegistrarEvent::Rejected { .. }) => {
                    return Err(crate::net::describe_event(name, &ev));
                }
                Ok(ev) => note!("{}", crate::net::describe_event(name, &ev)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => return Err(format!("registration: {e}")),
            }
        }
    };
    tokio::time::timeout(REGISTER_LIMIT, wait)
        .await
        .map_err(|_| {
            format!(
                "not registered within {} s: the old process keeps serving",
                REGISTER_LIMIT.as_secs()
            )
        })?
}

impl Taker {
    /// Says GO and takes every connection the old process hands over, sending each to the
    /// main loop as [`Event::Adopted`]; returns when the old process is done (or gone).
    pub async fn take(mut self, ep: Endpoint, events: mpsc::UnboundedSender<Event>) {
        let shown = self.path.display().to_string();
        if let Err(e) = self.chan.send(GO, &[], None).await {
            note!("serval: expose: take-over from {shown}: {e}");
            return;
        }
        let (mut taken, mut refused, mut lost) = (0u32, 0u32, 0u32);
        loop {
            let (ty, body) = match self.chan.recv().await {
                Ok(Some(f)) => f,
                Ok(None) => {
                    note!("serval: expose: take-over: the old process left before it was done");
                    break;
                }
                Err(e) => {
                    note!("serval: expose: take-over: {e}");
                    break;
                }
            };
            match ty {
                FLOW => {
                    let fd = self.chan.take_fd();
                    let Some((flow, snapshot)) = flow_of(&body) else {
                        note!("serval: expose: take-over: a FLOW frame without a flowID");
                        break;
                    };
                    let (tx, rx) = oneshot::channel();
                    let _ = events.send(Event::Slot(tx));
                    let slot = rx.await.ok().flatten();
                    let (reply, why) = match adopt(&ep, slot, snapshot, fd) {
                        Ok(a) => {
                            let _ = events.send(Event::Adopted(a));
                            taken += 1;
                            (TAKEN, String::new())
                        }
                        Err(Refusal::Refused(why)) => {
                            refused += 1;
                            (REFUSED, why)
                        }
                        Err(Refusal::Lost(why)) => {
                            lost += 1;
                            (LOST, why)
                        }
                    };
                    if !why.is_empty() {
                        note!("serval: expose: take-over: flow {flow}: {why}");
                    }
                    if let Err(e) = self
                        .chan
                        .send(reply, &with_flow(flow, why.as_bytes()), None)
                        .await
                    {
                        note!("serval: expose: take-over: {e}");
                        break;
                    }
                }
                DONE => break,
                other => {
                    note!("serval: expose: take-over: unexpected frame {other}");
                    break;
                }
            }
        }
        note!(
            "serval: expose: took over {taken} connection(s) from {shown} ({refused} refused, \
             {lost} lost)"
        );
    }
}

enum Refusal {
    /// Nothing changed here: the old process keeps the flow.
    Refused(String),
    /// Imported, then reset (a clean reset to the client): the old process releases it.
    Lost(String),
}

/// Takes one flow: a slot, the backend socket, then the import (the last step: until it, a
/// refusal leaves the old process free to thaw the flow).
fn adopt(
    ep: &Endpoint,
    slot: Option<OwnedSemaphorePermit>,
    snapshot: &[u8],
    fd: Option<OwnedFd>,
) -> Result<Adopted, Refusal> {
    let Some(fd) = fd else {
        return Err(Refusal::Refused(
            "no backend descriptor came with it".into(),
        ));
    };
    let slot = slot.ok_or_else(|| Refusal::Refused("at --max-connections here".into()))?;
    let tcp = backend_socket(fd).map_err(Refusal::Refused)?;
    let (stream, app) = ep
        .import(snapshot)
        .map_err(|e| Refusal::Refused(format!("import: {e}")))?;
    match app.as_deref().map(SpliceState::decode) {
        Some(Ok(state)) => Ok(Adopted {
            slot,
            tcp,
            stream,
            state,
        }),
        other => {
            let why = match other {
                Some(Err(e)) => e,
                _ => "no splice state in the snapshot".into(),
            };
            stream.abort();
            crate::translate::reset_tcp(tcp);
            Err(Refusal::Lost(why))
        }
    }
}

/// The descriptor as a non-blocking TCP socket of this process's reactor; anything else is
/// refused.
pub(crate) fn backend_socket(fd: OwnedFd) -> Result<TcpStream, String> {
    let sock = socket2::Socket::from(fd);
    let is_tcp = sock.r#type().is_ok_and(|t| t == socket2::Type::STREAM)
        && sock
            .domain()
            .is_ok_and(|d| d == socket2::Domain::IPV4 || d == socket2::Domain::IPV6);
    if !is_tcp {
        return Err("the descriptor is not a TCP socket".into());
    }
    let std: std::net::TcpStream = sock.into();
    std.set_nonblocking(true)
        .map_err(|e| format!("backend socket: {e}"))?;
    TcpStream::from_std(std).map_err(|e| format!("backend socket: {e}"))
}
