//! `serval expose`'s hot standby (issue 10 item 4 for the translator; docs/moving-flows.md
//! §3.4): a second `expose` on the primary's host holds a copy of every stream and shares
//! every backend TCP connection, so that when the primary process dies (SIGKILL, a crash)
//! it takes each stream over and goes on with the same backend connection, nothing lost or
//! repeated on either side.
//!
//! **The Serval half** is the ordinary standby session (`serval::run_standby`): the primary
//! serves each stream in steps (`Stream::commit`), each carrying a [`Progress`] as its
//! state, and the client sees nothing the standby does not hold.
//!
//! **The TCP half.** The primary serves a Unix socket (`--standby-socket PATH`, owner-only);
//! the standby connects to it before its session starts and receives every backend socket's
//! descriptor (`SCM_RIGHTS`), then each new one before its stream's first step. The socket
//! therefore outlives the primary's process. What the primary did to it after its last step
//! is read from the kernel ([`serval_sys::tcpcount`]):
//!
//! * client → backend: the primary writes what it read, then records the count in a step.
//!   At takeover, the bytes the socket took (acknowledged + queued) say how many of the
//!   step's held bytes went out after it; the standby writes only the rest.
//! * backend → client: the primary *peeks* the backend's bytes, sends them as a step's
//!   output, and consumes them from the socket only once the standby confirmed that step
//!   (`Stream::replicated`). Bytes consumed are thus always held by the standby; at
//!   takeover the standby discards from the socket what the dead primary had sent but not
//!   yet consumed.
//!
//! A primary that is alive after all (its standby judged it dead) lets each stream go
//! without touching its backend connection and says so (RELEASED); the standby uses a
//! socket only once it was released or the primary's end of the channel closed.
//!
//! Frames on the socket, as the hand-over's (`type u8 | length u32 | body`):
//!
//! | Type | Frame | Direction | Body |
//! |------|-------|-----------|------|
//! | 11 | HELLO | standby → primary | version u16, the service prefix (text) |
//! | 12 | WELCOME | primary → standby | version u16 |
//! | 13 | REFUSE | primary → standby | why (text) |
//! | 14 | BACKEND | primary → standby | flowID u64; the backend socket's descriptor attached |
//! | 15 | FORGET | primary → standby | flowID u64: the connection ended, close your copy |
//! | 16 | RELEASED | primary → standby | flowID u64: taken over, this process lets it be |
//! | 17 | SYNCED | primary → standby | nothing: every live connection was sent |

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serval::{FlowId, ServicePrefix, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Notify;

use crate::handover::{Channel, flow_of, same_user, text};
use crate::translate::SpliceState;

/// The channel's version; HELLO and WELCOME must carry the same. It covers the frames above
/// and [`Progress`]'s encoding.
const VERSION: u16 = 1;

// Numbered apart from the hand-over's frames (1–9), so that a standby pointed at a hand-over
// socket, or a `--take-over` pointed at a standby socket, is refused at its first frame.
const HELLO: u8 = 11;
const WELCOME: u8 = 12;
const REFUSE: u8 = 13;
const BACKEND: u8 = 14;
const FORGET: u8 = 15;
const RELEASED: u8 = 16;
const SYNCED: u8 = 17;

/// How long either side waits for the other's greeting.
const HELLO_LIMIT: Duration = Duration::from_secs(5);
/// How long the primary waits for its standby to take one frame before it detaches it.
const SEND_LIMIT: Duration = Duration::from_secs(1);
/// How long a standby that took a stream over waits for the primary to let go of its
/// backend connection (RELEASED, or the primary's end of the channel closed): a primary
/// stalled rather than dead may still write to it.
const RELEASE_LIMIT: Duration = Duration::from_secs(2);
/// After a takeover, how long backend connections no stream claimed are kept before they are
/// reset.
const UNCLAIMED_LIMIT: Duration = Duration::from_secs(10);
/// At most this many backend bytes per step.
const CHUNK: usize = 256 * 1024;
/// At most this many backend bytes peeked (and sent toward the client) ahead of those the
/// standby confirmed.
const AHEAD: u64 = 4 << 20;
/// Client bytes read per step.
const READ_CHUNK: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// A stream's state at each step
// ---------------------------------------------------------------------------------------------

/// Where a replicated splice stands after a step: the state each `Stream::commit` carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Progress {
    /// The backend socket's [`serval_sys::tcpcount::Counts`] right after it connected
    /// (written, read): the kernel's counts start there.
    base: (u64, u64),
    /// Bytes of the client's stream written to the backend socket.
    to_backend: u64,
    /// Bytes of the client's stream read and not yet written to the backend (they follow
    /// `to_backend`).
    pending: Vec<u8>,
    /// The client's end was read.
    client_eof: bool,
    /// Bytes of the backend's stream sent toward the client as steps' output.
    from_backend: u64,
    /// The backend's end was read.
    backend_eof: bool,
}

/// [`Progress::encode`]'s format version.
const PROGRESS_V1: u8 = 1;

impl Progress {
    /// `version u8 (1) | flags u8 (bit 0 client's end read, bit 1 backend's end read) |
    /// base written u64 | base read u64 | to_backend u64 | from_backend u64 | pending bytes`
    /// (big-endian).
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(34 + self.pending.len());
        b.push(PROGRESS_V1);
        b.push(u8::from(self.client_eof) | u8::from(self.backend_eof) << 1);
        for v in [self.base.0, self.base.1, self.to_backend, self.from_backend] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(&self.pending);
        b
    }

    fn decode(b: &[u8]) -> Result<Progress, String> {
        let bad = || "malformed expose step state".to_owned();
        let (&[version, flags], rest) = b.split_first_chunk::<2>().ok_or_else(bad)?;
        if version != PROGRESS_V1 {
            return Err(format!(
                "expose step state version {version}, this process knows {PROGRESS_V1}"
            ));
        }
        let (nums, pending) = rest.split_first_chunk::<32>().ok_or_else(bad)?;
        if flags & !3 != 0 || pending.len() > READ_CHUNK {
            return Err(bad());
        }
        let n = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&nums[8 * i..8 * i + 8]);
            u64::from_be_bytes(w)
        };
        let p = Progress {
            base: (n(0), n(1)),
            to_backend: n(2),
            pending: pending.to_vec(),
            client_eof: flags & 1 != 0,
            from_backend: n(3),
            backend_eof: flags & 2 != 0,
        };
        if p.client_eof && !p.pending.is_empty() {
            return Err(bad());
        }
        Ok(p)
    }
}

/// A splice's progress, shared by its two directions (one task: never contended).
fn lock(p: &Mutex<Progress>) -> std::sync::MutexGuard<'_, Progress> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One step of `stream`, with the state `p` holds now and `output` to send.
async fn step(stream: &Stream, p: &Mutex<Progress>, output: &[u8]) -> Result<(), String> {
    // The state is encoded and recorded in one go (the commit records it before its first
    // await), so no read of the other direction falls between the two.
    let state = lock(p).encode();
    stream.commit(&state, output).await.map_err(serval_err)
}

fn serval_err(e: io::Error) -> String {
    format!("Serval side: {e}; reset the TCP connection")
}

fn tcp_err(e: io::Error) -> String {
    format!("TCP side: {e}; reset the stream")
}

// ---------------------------------------------------------------------------------------------
// The primary
// ---------------------------------------------------------------------------------------------

/// The primary's backend sockets (a descriptor of each, to share with a standby that
/// attaches later), and the attached standby's channel.
#[derive(Default)]
pub struct Backends {
    inner: tokio::sync::Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    live: HashMap<FlowId, OwnedFd>,
    standby: Option<Channel>,
}

impl Registry {
    /// Tells the standby, if one is attached, about `flow`; a standby that does not take the
    /// frame is detached.
    async fn tell(&mut self, ty: u8, flow: FlowId, fd: Option<BorrowedFd<'_>>) {
        let Some(chan) = &self.standby else { return };
        let sent = tokio::time::timeout(SEND_LIMIT, chan.send(ty, &flow.0.to_be_bytes(), fd)).await;
        let error = match sent {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("it took no frame for {} s", SEND_LIMIT.as_secs()),
        };
        note!(
            "serval: expose: the standby's channel broke ({error}): backend connections are \
             no longer shared with it"
        );
        self.standby = None;
    }
}

impl Backends {
    /// Shares `tcp`, the backend connection of stream `flow`, with the standby (now, or when
    /// one attaches). Returns once an attached standby holds the descriptor.
    async fn add(&self, flow: FlowId, tcp: &TcpStream) -> io::Result<()> {
        let fd = tcp.as_fd().try_clone_to_owned()?;
        let mut r = self.inner.lock().await;
        r.tell(BACKEND, flow, Some(fd.as_fd())).await;
        r.live.insert(flow, fd);
        Ok(())
    }

    /// `flow`'s connection ended here (`FORGET`) or was taken over (`RELEASED`).
    async fn remove(&self, flow: FlowId, how: u8) {
        let mut r = self.inner.lock().await;
        r.live.remove(&flow);
        r.tell(how, flow, None).await;
    }
}

/// Whether a standby's channel is still open (a standby sends nothing after its HELLO, so
/// anything but "nothing to read" means it is gone).
fn alive(chan: &Channel) -> bool {
    let mut b = [0u8; 1];
    match chan.sock.try_read(&mut b) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
    }
}

/// Serves the standby socket at `path` for `prefix` (`expose --standby-socket`): one
/// standby at a time attaches and receives every backend connection.
pub fn serve(
    path: &Path,
    prefix: ServicePrefix,
    backends: Arc<Backends>,
) -> Result<crate::handover::Socket, String> {
    let (listener, socket) = crate::handover::bind_private(path, "--standby-socket")?;
    let shown = path.display().to_string();
    tokio::spawn(async move {
        loop {
            let sock = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    note!("serval: expose: standby socket {shown}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let backends = backends.clone();
            tokio::spawn(async move {
                if let Err(e) = attach(sock, prefix, &backends).await {
                    note!("serval: expose: a standby was not attached: {e}");
                }
            });
        }
    });
    Ok(socket)
}

/// HELLO → WELCOME, every live backend connection, SYNCED; or REFUSE.
async fn attach(
    sock: UnixStream,
    prefix: ServicePrefix,
    backends: &Backends,
) -> Result<(), String> {
    let mut chan = Channel::new(sock);
    let refusal = match same_user(&chan.sock) {
        Err(e) => Some(e),
        Ok(()) => match tokio::time::timeout(HELLO_LIMIT, chan.recv()).await {
            Ok(Ok(Some((HELLO, body)))) => {
                crate::handover::hello_refusal(&body, "standby channel", VERSION, prefix)
            }
            Ok(Ok(Some((ty, _)))) => Some(format!("expected HELLO, got frame {ty}")),
            Ok(Ok(None)) => return Err("the standby closed the channel before HELLO".into()),
            Ok(Err(e)) => return Err(format!("standby socket: {e}")),
            Err(_) => return Err(format!("no HELLO within {} s", HELLO_LIMIT.as_secs())),
        },
    };
    let mut r = backends.inner.lock().await;
    let refusal = refusal.or_else(|| {
        r.standby
            .as_ref()
            .is_some_and(alive)
            .then(|| "this expose has a standby already".to_owned())
    });
    if let Some(why) = refusal {
        let _ = chan.send(REFUSE, why.as_bytes(), None).await;
        return Err(why);
    }
    let sync = async {
        chan.send(WELCOME, &VERSION.to_be_bytes(), None).await?;
        for (flow, fd) in &r.live {
            chan.send(BACKEND, &flow.0.to_be_bytes(), Some(fd.as_fd()))
                .await?;
        }
        chan.send(SYNCED, &[], None).await
    };
    tokio::time::timeout(HELLO_LIMIT, sync)
        .await
        .map_err(|_| "the standby took no frames".to_owned())?
        .map_err(|e| format!("standby socket: {e}"))?;
    note!(
        "serval: expose: a standby attached: {} backend connection(s) shared with it",
        r.live.len()
    );
    r.standby = Some(chan);
    Ok(())
}

/// Carries bytes between `tcp` and `stream` in replicated steps, until both directions
/// ended, as `translate::splice` does without a standby: a FIN on either side is passed on,
/// an error or reset on either resets both. The backend connection is shared with the
/// standby first; if the standby takes the stream over, it is left to it, untouched.
pub async fn splice(tcp: TcpStream, stream: Stream, backends: Arc<Backends>) -> Result<(), String> {
    let _ = tcp.set_nodelay(true);
    let start = stream.flow_id().map_err(serval_err).and_then(|flow| {
        let base = serval_sys::tcpcount::counts(tcp.as_fd()).map_err(tcp_err)?;
        Ok((flow, base))
    });
    let (flow, base) = match start {
        Ok(s) => s,
        Err(e) => {
            stream.abort();
            crate::translate::reset_tcp(tcp);
            return Err(e);
        }
    };
    if let Err(e) = backends.add(flow, &tcp).await {
        stream.abort();
        crate::translate::reset_tcp(tcp);
        return Err(format!("cannot share the backend connection: {e}"));
    }
    let p = Mutex::new(Progress {
        base: (base.written, base.read),
        ..Progress::default()
    });
    match run(&tcp, &stream, &p).await {
        Ok(()) => {
            backends.remove(flow, FORGET).await;
            crate::net::finish(&stream).await;
            Ok(())
        }
        Err(_) if stream.taken_over() => {
            drop(tcp);
            backends.remove(flow, RELEASED).await;
            Err("the standby took the stream over: its backend connection is left to it".into())
        }
        Err(e) => {
            // The standby closes its copy on FORGET: whichever copy closes last sends the
            // reset (the linger setting belongs to the socket).
            backends.remove(flow, FORGET).await;
            stream.abort();
            crate::translate::reset_tcp(tcp);
            Err(e)
        }
    }
}

/// Both directions, until both ended or either failed.
async fn run(tcp: &TcpStream, stream: &Stream, p: &Mutex<Progress>) -> Result<(), String> {
    // The first step comes before anything is read.
    step(stream, p, b"").await?;
    let to = to_backend(tcp, stream, p);
    let from = from_backend(tcp, stream, p);
    tokio::pin!(to, from);
    let (mut to_done, mut from_done, mut closed) = (false, false, false);
    loop {
        tokio::select! {
            r = &mut to, if !to_done => {
                r?;
                to_done = true;
            }
            r = &mut from, if !from_done => {
                r?;
                from_done = true;
            }
            // A direction waiting on the backend would not see the stream reset (or taken
            // over) under it.
            reason = stream.closed(), if !closed => {
                closed = true;
                if reason != serval::CloseReason::Finished {
                    return Err(format!("Serval side: {reason}; reset the TCP connection"));
                }
            }
        }
        if to_done && from_done {
            return Ok(());
        }
    }
}

/// Client → backend: each read is written at once as far as the socket takes it, and the
/// step records what was written and what is still held.
async fn to_backend(tcp: &TcpStream, stream: &Stream, p: &Mutex<Progress>) -> Result<(), String> {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        if !lock(p).pending.is_empty() {
            tcp.writable().await.map_err(tcp_err)?;
            let wrote = tcp.try_write(&lock(p).pending);
            match wrote {
                Ok(n) => {
                    let mut q = lock(p);
                    q.pending.drain(..n);
                    q.to_backend += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(tcp_err(e)),
            }
            step(stream, p, b"").await?;
            continue;
        }
        if lock(p).client_eof {
            socket2::SockRef::from(tcp)
                .shutdown(std::net::Shutdown::Write)
                .map_err(tcp_err)?;
            return Ok(());
        }
        let n = (&mut &*stream).read(&mut buf).await.map_err(serval_err)?;
        {
            let mut q = lock(p);
            if n == 0 {
                q.client_eof = true;
            } else {
                let wrote = match tcp.try_write(&buf[..n]) {
                    Ok(k) => k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) => return Err(tcp_err(e)),
                };
                q.to_backend += wrote as u64;
                q.pending.extend_from_slice(&buf[wrote..n]);
            }
        }
        step(stream, p, b"").await?;
    }
}

/// Backend → client: peek, send as a step's output, consume from the socket once the
/// standby holds the step. Where the kernel has a peek offset, peeks run up to [`AHEAD`]
/// bytes ahead of what is consumed, so that the standby's confirmations do not stop the
/// stream; elsewhere each chunk waits for its own.
async fn from_backend(tcp: &TcpStream, stream: &Stream, p: &Mutex<Progress>) -> Result<(), String> {
    let mut buf = vec![0u8; CHUNK];
    // `SERVAL_NO_PEEK_OFFSET` takes the older kernels' way here too (for tests).
    let ahead = std::env::var_os("SERVAL_NO_PEEK_OFFSET").is_none()
        && serval_sys::tcpcount::set_peek_offset(tcp.as_fd(), 0).is_ok();
    // Steps not yet confirmed, with the backend position each one ends at.
    let mut steps: std::collections::VecDeque<(u64, u64)> = std::collections::VecDeque::new();
    let mut consumed = 0u64;
    loop {
        // Consume what the standby holds.
        let held = stream.replicated_steps();
        let mut upto = consumed;
        while let Some(&(step, end)) = steps.front() {
            if step > held {
                break;
            }
            upto = end;
            steps.pop_front();
        }
        if upto > consumed {
            discard(tcp, (upto - consumed) as usize)
                .await
                .map_err(tcp_err)?;
            consumed = upto;
        }
        let (taken, ended) = {
            let q = lock(p);
            (q.from_backend, q.backend_eof)
        };
        let first = steps.front().map(|&(step, _)| step);
        if let Some(step) = first
            && (ended || !ahead || taken - consumed >= AHEAD)
        {
            // Nothing more to peek (or no room to): wait for the oldest step's turn.
            stream.replicated(step).await.map_err(serval_err)?;
            continue;
        }
        if ended {
            // Everything sent is consumed: the socket closes with nothing unread.
            (&mut &*stream).shutdown().await.map_err(serval_err)?;
            return Ok(());
        }
        let peeked = match first {
            None => tcp.peek(&mut buf).await.map_err(tcp_err)?,
            Some(step) => tokio::select! {
                n = tcp.peek(&mut buf) => n.map_err(tcp_err)?,
                r = stream.replicated(step) => {
                    r.map_err(serval_err)?;
                    continue;
                }
            },
        };
        if peeked == 0 {
            lock(p).backend_eof = true;
            step(stream, p, b"").await?;
        } else {
            lock(p).from_backend += peeked as u64;
            step(stream, p, &buf[..peeked]).await?;
        }
        steps.push_back((stream.committed_steps(), lock(p).from_backend));
    }
}

/// Drops `n` bytes that are in `tcp`'s receive queue (peeked already), without copying
/// them. Straight from the socket: a peek that found nothing beyond the peek offset cleared
/// the reactor's readiness, though the queue is full of bytes to consume.
async fn discard(tcp: &TcpStream, mut n: usize) -> io::Result<()> {
    while n > 0 {
        match serval_sys::tcpcount::discard(tcp.as_fd(), n) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => n -= k,
            // Not there after all (only a wrong count could say so): let a caller's timeout
            // run rather than spin.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => tokio::task::yield_now().await,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The standby
// ---------------------------------------------------------------------------------------------

/// What a standby holds of its primary's backend connections.
#[derive(Default)]
pub struct Held {
    state: Mutex<HeldState>,
    changed: Notify,
    /// Ends the channel's reader: this process stands by no more.
    leave: Notify,
}

#[derive(Default)]
struct HeldState {
    fds: HashMap<FlowId, OwnedFd>,
    released: HashSet<FlowId>,
    /// The primary's end of the channel closed (it died, or stopped).
    ended: bool,
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HeldState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes `flow`'s backend socket once the primary cannot touch it any more: it let it
    /// go, or its end of the channel closed. Fails if it never shared one, or after
    /// [`RELEASE_LIMIT`].
    async fn claim(&self, flow: FlowId) -> Result<OwnedFd, String> {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                {
                    let mut st = self.lock();
                    if st.ended || st.released.contains(&flow) {
                        return st.fds.remove(&flow).ok_or_else(|| {
                            "the primary never shared this stream's backend connection".to_owned()
                        });
                    }
                }
                changed.await;
            }
        };
        tokio::time::timeout(RELEASE_LIMIT, wait)
            .await
            .map_err(|_| {
                format!(
                    "the primary did not let go of the backend connection within {} s",
                    RELEASE_LIMIT.as_secs()
                )
            })?
    }

    /// Lets go of every backend connection no stream claimed and leaves the channel. With
    /// the primary gone their streams are lost (not taken over): they are reset, and how
    /// many is returned. With the primary alive (it was taken for dead, and serves on) they
    /// are its own, and only this process's copies close (`None`).
    fn let_go_of_unclaimed(&self) -> Option<usize> {
        let (fds, ended) = {
            let mut st = self.lock();
            (
                st.fds.drain().map(|(_, fd)| fd).collect::<Vec<_>>(),
                st.ended,
            )
        };
        self.leave.notify_one();
        if !ended {
            return None;
        }
        for fd in &fds {
            let _ = socket2::SockRef::from(fd).set_linger(Some(Duration::ZERO));
        }
        Some(fds.len())
    }
}

/// Where the expose whose admin address is `primary` takes its standby's channel.
pub async fn socket_of(primary: SocketAddr) -> Result<PathBuf, String> {
    let view = tokio::task::spawn_blocking(move || serval_admin::Client::new(primary).instance())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot stand by for the instance at {primary}: {e}"))?;
    view.standby_socket.map(PathBuf::from).ok_or_else(|| {
        format!(
            "the instance at {primary} serves no standby socket: start its `serval expose` \
             with --standby-socket PATH (and --admin, --key)"
        )
    })
}

/// Attaches to the primary's standby socket at `path` and receives every backend connection
/// it has; then keeps receiving new ones. Fails, with nothing changed at the primary, if
/// nothing serves `path` (an expose standby runs on its primary's host) or it refuses.
pub async fn stand_by(path: &Path, prefix: ServicePrefix) -> Result<Arc<Held>, String> {
    let sock = UnixStream::connect(path).await.map_err(|e| {
        format!(
            "cannot reach the primary's standby socket {}: {e} (an expose standby runs on its \
             primary's host)",
            path.display()
        )
    })?;
    let mut chan = Channel::new(sock);
    same_user(&chan.sock)?;
    let mut hello = VERSION.to_be_bytes().to_vec();
    hello.extend_from_slice(prefix.to_string().as_bytes());
    chan.send(HELLO, &hello, None)
        .await
        .map_err(|e| format!("standby socket {}: {e}", path.display()))?;
    let held = Arc::new(Held::default());
    let greeted = async {
        loop {
            match chan.recv().await {
                Ok(Some((WELCOME, _))) => {}
                Ok(Some((REFUSE, why))) => {
                    return Err(format!("the primary refused this standby: {}", text(&why)));
                }
                Ok(Some((SYNCED, _))) => return Ok(()),
                Ok(Some((ty @ (BACKEND | FORGET | RELEASED), body))) => {
                    apply(&held, &mut chan, ty, &body)?;
                }
                Ok(Some((ty, _))) => {
                    return Err(format!(
                        "frame {ty} on the standby socket {} (a hand-over socket?)",
                        path.display()
                    ));
                }
                Ok(None) => return Err("the primary closed the standby channel".to_owned()),
                Err(e) => return Err(format!("standby socket: {e}")),
            }
        }
    };
    tokio::time::timeout(HELLO_LIMIT, greeted)
        .await
        .map_err(|_| {
            format!(
                "the primary did not answer within {} s",
                HELLO_LIMIT.as_secs()
            )
        })??;
    let kept = held.clone();
    tokio::spawn(async move {
        loop {
            let r = tokio::select! {
                r = chan.recv() => match r {
                    Ok(Some((ty, body))) => apply(&kept, &mut chan, ty, &body),
                    Ok(None) => Err("closed".to_owned()),
                    Err(e) => Err(e.to_string()),
                },
                // Taken over, and every stream claimed what it could: nothing more to hold
                // (a primary that serves on sees its standby go).
                () = kept.leave.notified() => return,
            };
            if let Err(e) = r {
                note!("serval: expose: the primary's standby channel ended ({e})");
                kept.lock().ended = true;
                kept.changed.notify_waiters();
                return;
            }
        }
    });
    Ok(held)
}

/// One frame from the primary.
fn apply(held: &Held, chan: &mut Channel, ty: u8, body: &[u8]) -> Result<(), String> {
    let flow = flow_of(body)
        .map(|(f, _)| f)
        .ok_or_else(|| format!("frame {ty} without a flowID"))?;
    {
        let mut st = held.lock();
        match ty {
            BACKEND => {
                let fd = chan
                    .take_fd()
                    .ok_or("a BACKEND frame without its descriptor")?;
                st.fds.insert(flow, fd);
            }
            FORGET => {
                st.fds.remove(&flow);
            }
            RELEASED => {
                st.released.insert(flow);
            }
            _ => return Err(format!("unexpected frame {ty}")),
        }
    }
    held.changed.notify_waiters();
    Ok(())
}

/// After a takeover: a while later, lets go of the backend connections no stream claimed
/// (resetting them if the primary is gone) and leaves the channel.
pub fn after_takeover(held: Arc<Held>) {
    tokio::spawn(async move {
        tokio::time::sleep(UNCLAIMED_LIMIT).await;
        match held.let_go_of_unclaimed() {
            None => note!(
                "serval: expose: left the standby channel (the primary serves on: its other \
                 backend connections are its own)"
            ),
            Some(n) => note!(
                "serval: expose: left the standby channel; reset {n} backend connection(s) \
                 whose stream was not taken over"
            ),
        }
    });
}

/// A stream this standby took over, with its last step's `state`: the backend connection
/// the primary shared, and where the splice resumes — the client's bytes the dead primary
/// read and did not write, once, and the backend's bytes it sent and did not consume
/// dropped from the socket. On failure both ends are reset.
pub async fn resume(
    stream: &Stream,
    state: &[u8],
    held: &Held,
) -> Result<(TcpStream, SpliceState), String> {
    let claimed = async {
        let flow = stream.flow_id().map_err(serval_err)?;
        let p = Progress::decode(state)?;
        let fd = held.claim(flow).await?;
        let tcp = crate::handover::backend_socket(fd)?;
        Ok::<_, String>((p, tcp))
    };
    let (p, tcp) = match claimed.await {
        Ok(c) => c,
        Err(e) => {
            stream.abort();
            return Err(e);
        }
    };
    let resumed = async {
        let r = reconcile(&p, &tcp).await?;
        skip_client_bytes(stream, r.client_written, r.client_ended).await?;
        Ok::<_, String>(r.state)
    };
    match resumed.await {
        Ok(state) => Ok((tcp, state)),
        Err(e) => {
            stream.abort();
            crate::translate::reset_tcp(tcp);
            Err(e)
        }
    }
}

/// Where a taken-over splice resumes.
struct Resumed {
    state: SpliceState,
    /// Client bytes beyond the last step's that the dead primary wrote to the backend:
    /// the stream delivers them again (their acknowledgement never left the primary), to
    /// be dropped.
    client_written: u64,
    /// ... and the primary had read the client's end and shut the backend socket after.
    client_ended: bool,
}

/// The kernel's counts against the last step the standby holds (the primary may have made
/// more whose checkpoints died with it).
async fn reconcile(p: &Progress, tcp: &TcpStream) -> Result<Resumed, String> {
    let c = serval_sys::tcpcount::counts(tcp.as_fd())
        .map_err(|e| format!("the backend connection: {e}"))?;
    let (written, read) = (
        c.written.wrapping_sub(p.base.0),
        c.read.wrapping_sub(p.base.1),
    );
    // Client → backend: the socket took `written`; the step wrote `to_backend` and held
    // `pending` after it; the primary may have read and written more since.
    let beyond = written.checked_sub(p.to_backend).ok_or_else(|| {
        format!(
            "the backend took {written} byte(s) of the client's, the last step wrote {}",
            p.to_backend
        )
    })?;
    let skip = beyond.min(p.pending.len() as u64) as usize;
    let client_written = beyond - skip as u64;
    // Backend → client: the primary consumed `read`, only ever bytes of steps the standby
    // confirmed (`from_backend` at least).
    let unconsumed = p.from_backend.checked_sub(read).ok_or_else(|| {
        format!(
            "the primary consumed {read} backend byte(s), the last step sent only {}",
            p.from_backend
        )
    })? as usize;
    tokio::time::timeout(RELEASE_LIMIT, discard(tcp, unconsumed))
        .await
        .map_err(|_| "the backend bytes already sent were not in the socket".to_owned())?
        .map_err(|e| format!("the backend connection: {e}"))?;
    let client_ended = c.fin_sent && !p.client_eof;
    note!(
        "serval: expose: took a stream over at client byte {} and backend byte {}: {} held \
         byte(s) of the client's to write ({} written already{}), {unconsumed} of the \
         backend's dropped from the socket (sent already)",
        p.to_backend + beyond,
        p.from_backend,
        p.pending.len() - skip,
        beyond,
        if client_written > 0 {
            format!(", {client_written} of them after the last step")
        } else {
            String::new()
        },
    );
    let state = SpliceState::resumed(
        p.backend_eof,
        &p.pending[skip..],
        p.client_eof || client_ended,
        c.fin_sent,
    )?;
    Ok(Resumed {
        state,
        client_written,
        client_ended,
    })
}

/// Reads and drops the first `n` bytes the taken-over stream delivers (written to the
/// backend already), then, if `ended`, its end (the backend socket was shut after it).
async fn skip_client_bytes(stream: &Stream, mut n: u64, ended: bool) -> Result<(), String> {
    let mut buf = vec![0u8; READ_CHUNK];
    let skip = async {
        while n > 0 {
            let want = (n as usize).min(buf.len());
            match (&mut &*stream).read(&mut buf[..want]).await? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                k => n -= k as u64,
            }
        }
        if ended && (&mut &*stream).read(&mut buf).await? != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the client sent bytes after the end the primary read",
            ));
        }
        io::Result::Ok(())
    };
    tokio::time::timeout(RELEASE_LIMIT, skip)
        .await
        .map_err(|_| "the client did not send again what the primary had written".to_owned())?
        .map_err(|e| format!("Serval side, skipping what the primary wrote: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A takeover's arithmetic on a real socket: the dead primary wrote part of the bytes
    /// its last step held, and sent backend bytes it had not consumed yet.
    #[tokio::test]
    async fn reconcile_writes_only_the_unwritten_and_drops_only_the_sent() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let primary = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut backend, _) = l.accept().unwrap();
        let base = serval_sys::tcpcount::counts(primary.as_fd()).unwrap();
        // The last step: 100 client bytes written, 1500 held; 3000 backend bytes sent, of
        // which the primary had consumed 1000 when it died, after writing 1000 held bytes.
        let held: Vec<u8> = (0..1500u32).map(|i| i as u8).collect();
        let p = Progress {
            base: (base.written, base.read),
            to_backend: 100,
            pending: held.clone(),
            client_eof: false,
            from_backend: 3000,
            backend_eof: false,
        };
        let mut primary_w = &primary;
        std::io::Write::write_all(&mut primary_w, &[7u8; 100]).unwrap();
        std::io::Write::write_all(&mut primary_w, &held[..1000]).unwrap();
        let backend_out: Vec<u8> = (0..3500u32).map(|i| (i * 7) as u8).collect();
        std::io::Write::write_all(&mut backend, &backend_out).unwrap();
        let mut sink = [0u8; 1000];
        let mut primary_r = &primary;
        std::io::Read::read_exact(&mut primary_r, &mut sink).unwrap();
        // Everything has arrived before the standby looks (loopback: at once, or nearly).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while serval_sys::tcpcount::counts(primary.as_fd())
            .unwrap()
            .written
            - base.written
            < 1100
        {
            assert!(std::time::Instant::now() < deadline);
        }
        primary.set_nonblocking(true).unwrap();
        let tcp = TcpStream::from_std(primary).unwrap();
        let r = loop {
            // Until the backend's 3500 bytes are all in the socket.
            let mut peek = [0u8; 4096];
            if tcp.peek(&mut peek).await.unwrap() >= 2500 {
                break reconcile(&p, &tcp).await.unwrap();
            }
            assert!(std::time::Instant::now() < deadline);
        };
        assert_eq!((r.client_written, r.client_ended), (0, false));
        let state = r.state;
        // 500 held bytes are left to write, after the 1000 the primary wrote.
        let enc = state.encode();
        let down_len = u32::from_be_bytes(enc[6..10].try_into().unwrap()) as usize;
        assert_eq!(&enc[10..10 + down_len], &held[1000..]);
        // The 2000 sent and unconsumed bytes are gone from the socket; the next one is the
        // first the client has not received.
        let mut next = [0u8; 1];
        tcp.peek(&mut next).await.unwrap();
        assert_eq!(next[0], backend_out[3000]);
        // An older step, with 700 held: the primary wrote all of them and 300 more it read
        // after it (the stream delivers those again), then shut the socket.
        let older = Progress {
            to_backend: 100,
            pending: held[..700].to_vec(),
            ..p.clone()
        };
        socket2::SockRef::from(&tcp)
            .shutdown(std::net::Shutdown::Write)
            .unwrap();
        let r = reconcile(&older, &tcp).await.unwrap();
        assert_eq!((r.client_written, r.client_ended), (300, true));
        let enc = r.state.encode();
        assert_eq!(
            enc[1] & 0b1100,
            0b1100,
            "the client's end read, the socket shut"
        );
        // A step claiming more written than the socket took, or more backend bytes
        // consumed than sent, cannot be the primary's.
        let ahead = Progress {
            to_backend: 5000,
            ..p.clone()
        };
        assert!(reconcile(&ahead, &tcp).await.is_err());
        let short = Progress {
            from_backend: 10,
            ..p
        };
        assert!(reconcile(&short, &tcp).await.is_err());
    }

    #[test]
    fn a_step_state_round_trips_and_malformed_ones_are_refused() {
        let p = Progress {
            base: (1, 0),
            to_backend: 70_000,
            pending: b"GET / HTTP/1.1\r\n".to_vec(),
            client_eof: false,
            from_backend: 5 << 30,
            backend_eof: true,
        };
        assert_eq!(Progress::decode(&p.encode()), Ok(p.clone()));
        let done = Progress {
            pending: Vec::new(),
            client_eof: true,
            ..p.clone()
        };
        assert_eq!(Progress::decode(&done.encode()), Ok(done));
        let enc = p.encode();
        for cut in 0..34 {
            assert!(Progress::decode(&enc[..cut]).is_err(), "cut at {cut}");
        }
        let mut v2 = enc.clone();
        v2[0] = 2;
        assert!(Progress::decode(&v2).unwrap_err().contains("version 2"));
        let mut flags = enc.clone();
        flags[1] = 4;
        assert!(Progress::decode(&flags).is_err());
        // Bytes held after the client's end was read cannot come from a splice.
        let mut held_after_eof = enc;
        held_after_eof[1] |= 1;
        assert!(Progress::decode(&held_after_eof).is_err());
    }
}
