//! The translator between ordinary TCP programs and Serval services (DESIGN.md §4):
//! `serval proxy` takes TCP connections in and carries each over a Serval stream to a service
//! by name; `serval expose` takes Serval streams in and carries each to a TCP backend.
//!
//! Both splice the two byte streams with a fixed buffer per direction, so a slow side holds
//! the other back instead of being buffered without bound. A FIN on one side becomes a FIN
//! (half-close) on the other; an error or a reset on either side resets both, so neither
//! program is left waiting on a connection that is already broken.

use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serval::{ServiceId, ServicePrefix, Stream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinSet;

use crate::net::HopArgs;

/// Flags of `serval proxy`.
#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// The service every connection is carried to: a name or hex ID.
    pub service: String,
    /// TCP address to accept connections on (port 0 picks one; the `READY` line says which).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub hop: HopArgs,
    /// At most this many connections at once; further ones wait in the listen backlog.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// On SIGINT/SIGTERM, how long open connections may take to finish, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub drain: u64,
}

/// Flags of `serval expose`.
#[derive(Debug, clap::Args)]
pub struct ExposeArgs {
    /// The service to serve: a name, `NAME/*` for a whole domain, a hex ID or `HEX/LEN`.
    pub service: String,
    /// The TCP backend each stream is carried to (an IP or a host name, with the port;
    /// host names are looked up for each connection).
    #[arg(long, value_name = "HOST:PORT")]
    pub to: String,
    #[command(flatten)]
    pub instance: crate::net::InstanceArgs,
    /// At most this many connections at once; further streams wait to be accepted.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// How long to wait for the backend to accept a connection, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub connect_timeout: u64,
    /// On SIGINT/SIGTERM, how long open connections may take to finish, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub drain: u64,
    /// Serve a hand-over socket (a Unix socket, owner-only) at PATH: a new `serval expose`
    /// started with `--take-over PATH` receives every live connection — each Serval stream
    /// by export/import, each backend TCP connection as its descriptor — takes over the
    /// registration, and this process exits 0 once nothing is left to it. Upgrade or
    /// restart the translator with nothing dropped.
    #[arg(long, value_name = "PATH")]
    pub handover_socket: Option<std::path::PathBuf>,
    /// Take over the live connections of the `serval expose` serving the hand-over socket
    /// PATH (the same service; taken-over connections keep their backend connection, new
    /// ones go to --to), once this process serves and is registered. Bind another UDP port
    /// than the old process (e.g. `--bind 0.0.0.0:0`): the streams re-bind to this
    /// process's locator by RSYN, as in a move between hosts.
    #[arg(long, value_name = "PATH")]
    pub take_over: Option<std::path::PathBuf>,
    /// Serve a standby socket (a Unix socket, owner-only) at PATH, so that a `serval expose
    /// --standby-of` on this host can be this process's hot standby: it receives every
    /// backend connection's descriptor and a copy of every stream, and takes them all over
    /// if this process dies. Streams are then served in replicated steps (the backend's
    /// bytes are consumed from its socket only once the standby holds them).
    #[arg(long, value_name = "PATH", requires_all = ["admin", "key"],
          conflicts_with_all = ["handover_socket", "take_over"])]
    pub standby_socket: Option<std::path::PathBuf>,
}

/// Runs `serval proxy`.
pub fn proxy(args: ProxyArgs) -> ExitCode {
    match (ServiceId::parse(&args.service), args.hop.locals()) {
        (Ok(id), Ok(locals)) => crate::run_single(run_proxy(id, args, locals)),
        (Err(e), _) => crate::usage(&e),
        (_, Err(e)) => crate::usage(&e),
    }
}

/// Runs `serval expose`.
pub fn expose(args: ExposeArgs) -> ExitCode {
    let prefix = match ServicePrefix::parse(&args.service) {
        Ok(p) => p,
        Err(e) => return crate::usage(&e),
    };
    if !args.to.contains(':') {
        return crate::usage(&format!(
            "--to {}: expected HOST:PORT (the TCP backend)",
            args.to
        ));
    }
    if args.instance.standby_of.is_some() && args.take_over.is_some() {
        return crate::usage(
            &"--standby-of and --take-over: a standby takes its primary's connections over \
              only when the primary dies",
        );
    }
    crate::run_single(run_expose(prefix, args))
}

/// A translator's open connections: at most `--max-connections` at once, each a task, counted
/// for the closing line.
struct Connections {
    /// `proxy` or `expose`, for log lines.
    role: &'static str,
    slots: Arc<tokio::sync::Semaphore>,
    tasks: JoinSet<()>,
    accepted: u64,
    failed: Arc<AtomicU64>,
}

impl Connections {
    fn new(role: &'static str, max: u32) -> Connections {
        Connections {
            role,
            slots: Arc::new(tokio::sync::Semaphore::new(max as usize)),
            tasks: JoinSet::new(),
            accepted: 0,
            failed: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Waits for a free slot (`None` never happens: the semaphore is never closed).
    fn slot(&self) -> impl Future<Output = Option<OwnedSemaphorePermit>> + use<> {
        let slots = self.slots.clone();
        async move { slots.acquire_owned().await.ok() }
    }

    /// Runs one connection in its slot; a failure is counted and logged as `what: error`
    /// (`what` is formatted only then: nothing is allocated for the label of a connection
    /// that goes well).
    fn spawn(
        &mut self,
        slot: OwnedSemaphorePermit,
        what: impl std::fmt::Display + Send + 'static,
        conn: impl Future<Output = Result<(), String>> + Send + 'static,
    ) {
        self.accepted += 1;
        let (role, failed) = (self.role, self.failed.clone());
        self.tasks.spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                failed.fetch_add(1, Ordering::Relaxed);
                note!("serval: {role}: {what}: {e}");
            }
        });
    }

    /// The slots, for connections taken over from another process.
    fn slots(&self) -> Arc<tokio::sync::Semaphore> {
        self.slots.clone()
    }

    /// Reaps finished tasks (for a `select!` branch; pending while none runs).
    async fn reap(&mut self) {
        if self.tasks.join_next().await.is_none() {
            std::future::pending::<()>().await;
        }
    }

    /// After a stop: lets open connections finish (see [`crate::net::drain`]), then says
    /// what was done.
    async fn finish(mut self, stopping: &str, limit: Duration) {
        crate::net::drain(&mut self.tasks, stopping, limit).await;
        note!(
            "serval: {} stopping: {} connections, {} failed",
            self.role,
            self.accepted,
            self.failed.load(Ordering::Relaxed)
        );
    }
}

async fn run_proxy(
    service: ServiceId,
    args: ProxyArgs,
    locals: crate::net::Locals,
) -> Result<(), String> {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    let hop = args.hop.next_hop();
    let ep = Arc::new(
        crate::net::client(&hop, &locals, args.hop.endpoint_config(), args.hop.follow()).await?,
    );
    let hop = Arc::new(hop);
    let name: Arc<str> = args.service.into();
    note!("serval: proxy: TCP {local} → service {name} ({service})");
    ready(&local.to_string());

    let mut conns = Connections::new("proxy", args.max_connections);
    let stop = crate::router::wait_for_stop();
    tokio::pin!(stop);
    loop {
        // A free slot first, then a connection; a signal interrupts either wait.
        let slot = conns.slot();
        let next = async { (slot.await, listener.accept().await) };
        tokio::select! {
            (slot, accepted) = next => {
                let Some(slot) = slot else { break };
                let (tcp, client) = match accepted {
                    Ok(a) => a,
                    // Out of descriptors and the like: say so, back off, go on.
                    Err(e) => {
                        note!("serval: proxy: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (ep, hop, name) = (ep.clone(), hop.clone(), name.clone());
                conns.spawn(slot, Label("connection from", client), async move {
                    match crate::net::connect(&ep, &name, service, &hop).await {
                        Ok(stream) => splice(tcp, stream, SpliceState::new(), None).await,
                        Err(e) => {
                            reset_tcp(tcp);
                            Err(e)
                        }
                    }
                });
            }
            () = conns.reap() => {}
            () = &mut stop => break,
        }
    }
    drop(listener);
    let stopping = format!("serval: proxy stopping: no new connections on {local}");
    conns
        .finish(&stopping, Duration::from_secs(args.drain))
        .await;
    Ok(())
}

async fn run_expose(prefix: ServicePrefix, args: ExposeArgs) -> Result<(), String> {
    // A take-over asks the old process first, so that a wrong path or a refusal fails here
    // before this process registers anywhere.
    let taker = match &args.take_over {
        Some(path) => Some(crate::handover::connect(path, prefix).await?),
        None => None,
    };
    let ep = match args.instance.endpoint(None, None).await {
        Ok(ep) => ep,
        Err(e) if taker.is_some() && e.contains("in use") => {
            return Err(format!(
                "{e} (the process taken over holds that port: bind another, e.g. --bind \
                 0.0.0.0:0; the streams re-bind to it by RSYN)"
            ));
        }
        Err(e) => return Err(e),
    };
    const NO_MOVES: &str = "serval expose cannot move its flows to another host: each one's \
         TCP connection to the backend stays on this host (it hands them to a new process on \
         this host with --handover-socket / --take-over)";
    let _admin = crate::instance::start(
        &ep,
        &args.instance,
        &args.service,
        match &args.standby_socket {
            Some(_) => crate::instance::Moves::StandbyOnly(NO_MOVES),
            None => crate::instance::Moves::Unsupported(NO_MOVES),
        },
        args.standby_socket.as_deref(),
    )
    .await?;
    // As a primary: share each backend connection with a standby that attaches.
    let backends = args
        .standby_socket
        .as_ref()
        .map(|_| Arc::new(crate::expose_standby::Backends::default()));
    let _standby_socket = match (&args.standby_socket, &backends) {
        (Some(path), Some(b)) => Some(crate::expose_standby::serve(path, prefix, b.clone())?),
        _ => None,
    };
    // As a standby: the primary's backend connections first, then its streams.
    let (held, standby) = match args.instance.standby_of {
        Some(primary) => {
            let path = crate::expose_standby::socket_of(primary).await?;
            let held = crate::expose_standby::stand_by(&path, prefix).await?;
            let task = crate::instance::start_standby(&ep, &args.instance, primary).await?;
            (Some(held), Some(task))
        }
        None => (None, None),
    };
    let mut standing_by = standby.is_some();
    let standby = crate::instance::takeover(standby);
    tokio::pin!(standby);
    let mut events = ep.registrar_events();
    let mut listener = args.instance.listen(&ep, &args.service, prefix)?;
    let name = args.service.clone();
    note!(
        "serval: expose: service {name} ({prefix}) on {} → TCP {}{}",
        crate::net::list(&ep.local_locators()),
        args.to,
        args.instance.registering()
    );

    let mut conns = Connections::new("expose", args.max_connections);
    let handovers = crate::handover::Handovers::new();
    let (ho_tx, mut ho_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut socket = None;
    match taker {
        Some(taker) => {
            if !args.instance.router.is_empty() {
                crate::handover::registered(&mut events, &name).await?;
            }
            // Serves its own hand-over socket (perhaps at the same path) once the take-over
            // is over, for the next upgrade.
            let (ep, tx, path) = (ep.clone(), ho_tx.clone(), args.handover_socket.clone());
            tokio::spawn(async move {
                taker.take(ep, tx.clone()).await;
                if let Some(path) = path {
                    match crate::handover::serve(&path, prefix, tx.clone()) {
                        Ok(s) => {
                            let _ = tx.send(crate::handover::Event::Serving(s));
                        }
                        Err(e) => note!("serval: expose: {e}"),
                    }
                }
            });
        }
        None => {
            if let Some(path) = &args.handover_socket {
                socket = Some(crate::handover::serve(path, prefix, ho_tx.clone())?);
            }
        }
    }
    drop(ho_tx);
    ready(&crate::net::list(&ep.local_locators()));

    let backend: Arc<str> = args.to.into();
    let connect_timeout = Duration::from_millis(args.connect_timeout);
    let stop = crate::router::wait_for_stop();
    tokio::pin!(stop);
    let mut handing = None;
    loop {
        // A free slot first, then a stream; a signal or a registrar event interrupts either.
        let slot = conns.slot();
        let next = async { (slot.await, listener.accept().await) };
        tokio::select! {
            Ok(ev) = events.recv() => note!("{}", crate::net::describe_event(&name, &ev)),
            took = &mut standby, if standing_by => {
                standing_by = false;
                note!("{}", crate::instance::describe_takeover(&took?));
                args.instance.register(&ep, None);
                if let Some(h) = &held {
                    crate::expose_standby::after_takeover(h.clone());
                }
            }
            (slot, accepted) = next => {
                let Some(slot) = slot else { break };
                let stream = accepted.map_err(|e| format!("accept failed: {e}"))?;
                let client = stream.peer_locator().ok();
                let backend = backend.clone();
                let hook = handovers.hook();
                let (held, backends) = (held.clone(), backends.clone());
                conns.spawn(slot, Label("stream from", client), async move {
                    // A stream that arrives with state was taken over from the primary.
                    if let Some(state) = stream.take_app_state() {
                        let Some(held) = held else {
                            stream.abort();
                            return Err("a stream arrived with state, and this expose takes \
                                        none over"
                                .into());
                        };
                        let (tcp, state) =
                            crate::expose_standby::resume(&stream, &state, &held).await?;
                        return splice(tcp, stream, state, Some(hook)).await;
                    }
                    match connect_backend(&backend, connect_timeout).await {
                        Ok(tcp) => match backends {
                            Some(b) => crate::expose_standby::splice(tcp, stream, b).await,
                            None => splice(tcp, stream, SpliceState::new(), Some(hook)).await,
                        },
                        Err(e) => {
                            stream.abort();
                            Err(e)
                        }
                    }
                });
            }
            Some(ev) = ho_rx.recv() => match ev {
                crate::handover::Event::Adopted(a) => {
                    let client = a.stream.peer_locator().ok();
                    let hook = handovers.hook();
                    let conn = splice(a.tcp, a.stream, a.state, Some(hook));
                    conns.spawn(a.slot, Label("stream from", client), conn);
                }
                crate::handover::Event::Serving(s) => socket = Some(s),
                crate::handover::Event::Slot(reply) => {
                    let _ = reply.send(conns.slots().try_acquire_owned().ok());
                }
                crate::handover::Event::HandOver(giver) => {
                    handing = Some(giver);
                    break;
                }
            },
            () = conns.reap() => {}
            () = &mut stop => break,
        }
    }
    // Withdraw at once (the UNREGISTER leaves now, and is seen answered), then let open
    // connections finish — or hand them to the new process.
    drop(listener);
    ep.unregistered_within(crate::net::UNREGISTER_LIMIT).await;
    if let Some(s) = &socket {
        s.remove();
    }
    if let Some(giver) = handing {
        handovers.start(giver.clone());
        loop {
            tokio::select! {
                () = handovers.settled() => break,
                () = conns.reap() => {}
            }
        }
        let (handed, kept, lost) = giver.finish().await;
        note!(
            "serval: expose: handed {handed} connection(s) over to the new process ({kept} kept \
             here, {lost} lost; longest freeze {:.2} ms)",
            giver.longest_freeze().as_secs_f64() * 1e3
        );
        if !conns.tasks.is_empty() {
            note!(
                "serval: expose: waiting for the {} connection(s) kept here to finish (signal \
                 to stop waiting)",
                conns.tasks.len()
            );
            let all = async { while conns.tasks.join_next().await.is_some() {} };
            tokio::select! {
                () = all => {}
                () = &mut stop => {}
            }
        }
    }
    let stopping = format!("serval: expose stopping: {name} withdrawn, no new streams");
    conns
        .finish(&stopping, Duration::from_secs(args.drain))
        .await;
    Ok(())
}

/// A connection's label for log lines, formatted only if one is written.
struct Label<T>(&'static str, T);

impl std::fmt::Display for Label<SocketAddr> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.0, self.1)
    }
}

impl std::fmt::Display for Label<Option<serval::Locator>> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.1 {
            Some(l) => write!(f, "{} {l}", self.0),
            None => write!(f, "{} ?", self.0),
        }
    }
}

/// Prints the `READY` line scripts and tests wait for.
fn ready(addrs: &str) {
    use std::io::Write;
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "READY {addrs}");
    let _ = out.flush();
}

/// Connects to the backend, with a timeout; a failure is one readable line.
async fn connect_backend(backend: &str, limit: Duration) -> Result<TcpStream, String> {
    match tokio::time::timeout(limit, TcpStream::connect(backend)).await {
        Ok(Ok(tcp)) => Ok(tcp),
        Ok(Err(e)) => Err(format!("backend {backend}: {e}")),
        Err(_) => Err(format!(
            "backend {backend} did not accept within {} ms",
            limit.as_millis()
        )),
    }
}

/// Resets a TCP connection (RST rather than FIN), as the translator's answer to a Serval
/// side that failed or was reset.
pub(crate) fn reset_tcp(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

/// How one direction of a splice ended badly.
#[derive(Debug)]
enum Broken {
    /// The TCP side failed (reset, refused, …).
    Tcp(io::Error),
    /// The Serval side failed (reset, timed out, …).
    Serval(io::Error),
}

/// One direction of a splice: a fixed buffer, what of it is read and not yet written, and
/// how far the direction has ended. Every await in [`run`](Self::run) is cancel-safe and the
/// state is updated only after one completes, so a splice stopped at any point (for a
/// hand-over) knows exactly which bytes it holds.
pub(crate) struct Pump {
    buf: PooledBuf,
    /// `buf[start..end]` was read from one side and not yet written to the other.
    start: usize,
    end: usize,
    /// The reader ended (end of stream read).
    eof: bool,
    /// ...and the writer was shut down after it (the FIN passed on).
    shut: bool,
}

impl Pump {
    fn new() -> Pump {
        Pump {
            buf: PooledBuf::take(),
            start: 0,
            end: 0,
            eof: false,
            shut: false,
        }
    }

    /// Copies until end of stream, then half-closes the writer.
    async fn run<R, W>(
        &mut self,
        mut from: R,
        mut to: W,
        from_err: fn(io::Error) -> Broken,
        to_err: fn(io::Error) -> Broken,
    ) -> Result<(), Broken>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.start < self.end {
                let n = to
                    .write(&self.buf.0[self.start..self.end])
                    .await
                    .map_err(to_err)?;
                if n == 0 {
                    return Err(to_err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
            } else if self.eof {
                if !self.shut {
                    to.shutdown().await.map_err(to_err)?;
                    self.shut = true;
                }
                return Ok(());
            } else {
                let n = from.read(&mut self.buf.0).await.map_err(from_err)?;
                (self.start, self.end) = (0, n);
                self.eof = n == 0;
            }
        }
    }

    fn held(&self) -> &[u8] {
        &self.buf.0[self.start..self.end]
    }

    /// A pump holding `held`, in a buffer large enough for it.
    fn holding(held: &[u8], eof: bool, shut: bool) -> Pump {
        let mut buf = PooledBuf::take();
        if buf.0.len() < held.len() {
            buf.0 = vec![0u8; held.len()].into_boxed_slice();
        }
        buf.0[..held.len()].copy_from_slice(held);
        Pump {
            buf,
            start: 0,
            end: held.len(),
            eof,
            shut,
        }
    }
}

/// Where a splice stands: each direction's [`Pump`]. `serval expose`'s hand-over carries it
/// to the new process in the stream's snapshot (its APP block), so that the bytes the old
/// process read and had not yet written are written by the new one, once, in order.
pub struct SpliceState {
    /// TCP → Serval.
    up: Pump,
    /// Serval → TCP.
    down: Pump,
}

/// [`SpliceState::encode`]'s format version (covered by the hand-over's version too).
const SPLICE_STATE_V1: u8 = 1;

impl SpliceState {
    /// A splice that has not started.
    pub fn new() -> SpliceState {
        SpliceState {
            up: Pump::new(),
            down: Pump::new(),
        }
    }

    /// Where a hot standby resumes a splice it took over from a dead primary (`expose
    /// --standby-of`): nothing held toward the client (a step's output is in the stream),
    /// `backend_eof` if the backend's end was read (its FIN is passed on again, which the
    /// stream ignores if it went out already); `to_backend` still to write to the backend,
    /// `client_eof` if the client's end was read, `backend_shut` if the backend socket was
    /// shut down after it.
    pub(crate) fn resumed(
        backend_eof: bool,
        to_backend: &[u8],
        client_eof: bool,
        backend_shut: bool,
    ) -> Result<SpliceState, String> {
        if backend_shut && (!client_eof || !to_backend.is_empty()) {
            return Err(format!(
                "the backend socket was shut down with {} byte(s) of the client's still to                  write{}",
                to_backend.len(),
                if client_eof {
                    ""
                } else {
                    " and the client's end not read"
                }
            ));
        }
        Ok(SpliceState {
            up: Pump::holding(&[], backend_eof, false),
            down: Pump::holding(to_backend, client_eof, backend_shut),
        })
    }

    /// `version u8 (1) | flags u8 | up length u32 | up bytes | down length u32 | down bytes`
    /// (big-endian), flags bit 0 up reader ended, 1 up writer shut, 2 down reader ended,
    /// 3 down writer shut. "Up" is TCP → Serval, "down" Serval → TCP.
    pub fn encode(&self) -> Vec<u8> {
        let (up, down) = (self.up.held(), self.down.held());
        let flags = u8::from(self.up.eof)
            | u8::from(self.up.shut) << 1
            | u8::from(self.down.eof) << 2
            | u8::from(self.down.shut) << 3;
        let mut b = Vec::with_capacity(10 + up.len() + down.len());
        b.extend_from_slice(&[SPLICE_STATE_V1, flags]);
        for held in [up, down] {
            // At most a splice buffer each (64 KiB): far below u32::MAX.
            b.extend_from_slice(&(held.len() as u32).to_be_bytes());
            b.extend_from_slice(held);
        }
        b
    }

    /// Parses [`encode`](Self::encode)'s output; anything else is an error line.
    pub fn decode(b: &[u8]) -> Result<SpliceState, String> {
        let bad = || "malformed splice state".to_owned();
        let (&[version, flags], mut rest) = b.split_first_chunk::<2>().ok_or_else(bad)?;
        if version != SPLICE_STATE_V1 {
            return Err(format!(
                "splice state version {version}, this process knows {SPLICE_STATE_V1}"
            ));
        }
        if flags & 0xf0 != 0 {
            return Err(bad());
        }
        let mut held = [&[][..]; 2];
        for h in &mut held {
            let (len, r) = rest.split_first_chunk::<4>().ok_or_else(bad)?;
            let len = u32::from_be_bytes(*len) as usize;
            if r.len() < len || len > 4 * SPLICE_BUF {
                return Err(bad());
            }
            (*h, rest) = r.split_at(len);
        }
        if !rest.is_empty() {
            return Err(bad());
        }
        let bit = |n: u8| flags & (1 << n) != 0;
        // A writer shut before its reader ended, or bytes held after the writer was shut,
        // cannot come from a splice.
        if (bit(1) && (!bit(0) || !held[0].is_empty()))
            || (bit(3) && (!bit(2) || !held[1].is_empty()))
        {
            return Err(bad());
        }
        Ok(SpliceState {
            up: Pump::holding(held[0], bit(0), bit(1)),
            down: Pump::holding(held[1], bit(2), bit(3)),
        })
    }
}

/// Per-direction buffer: large enough to keep a bulk stream moving in few system calls,
/// small enough for thousands of connections.
const SPLICE_BUF: usize = 64 * 1024;

/// Splice buffers kept for reuse: at most this many (4 MiB) wait for the next connection.
const POOLED_BUFFERS: usize = 64;

/// Splice buffers of finished connections, reused by new ones: a short connection then costs
/// no 64 KiB allocation (and zeroing) per direction, and a churn of connections does not
/// walk the allocator through fresh memory.
static BUFFERS: std::sync::Mutex<Vec<Box<[u8]>>> = std::sync::Mutex::new(Vec::new());

/// A splice buffer from [`BUFFERS`], given back when dropped.
struct PooledBuf(Box<[u8]>);

impl PooledBuf {
    fn take() -> PooledBuf {
        let reused = BUFFERS.lock().ok().and_then(|mut pool| pool.pop());
        PooledBuf(reused.unwrap_or_else(|| vec![0u8; SPLICE_BUF].into_boxed_slice()))
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if self.0.len() == SPLICE_BUF
            && let Ok(mut pool) = BUFFERS.lock()
            && pool.len() < POOLED_BUFFERS
        {
            pool.push(std::mem::take(&mut self.0));
        }
    }
}

/// How [`pumps`] stopped.
enum Stopped<T> {
    /// Both directions ended.
    Done,
    /// One side failed.
    Broken(Broken),
    /// `pause` completed first, with this.
    Paused(T),
}

/// Runs both directions until both end, one fails, or `pause` completes.
async fn pumps<T>(
    tcp: &mut TcpStream,
    stream: &mut Stream,
    state: &mut SpliceState,
    pause: impl Future<Output = T>,
) -> Stopped<T> {
    let (tr, tw) = tcp.split();
    let (sr, sw) = stream.split();
    let up = state.up.run(tr, sw, Broken::Tcp, Broken::Serval);
    let down = state.down.run(sr, tw, Broken::Serval, Broken::Tcp);
    tokio::pin!(up, down, pause);
    let (mut up_done, mut down_done) = (false, false);
    loop {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(b) => return Stopped::Broken(b),
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(b) => return Stopped::Broken(b),
            },
            t = &mut pause => return Stopped::Paused(t),
        }
        if up_done && down_done {
            return Stopped::Done;
        }
    }
}

/// Carries bytes between a TCP connection and a Serval stream, from `state`, until both
/// directions have ended. A FIN on either side is passed on as a FIN; an error or reset on
/// either side resets both and is returned. With a `hook`, the connection is handed to a new
/// process when a hand-over starts (and splices on here if that one refuses it).
pub(crate) async fn splice(
    tcp: TcpStream,
    stream: Stream,
    state: SpliceState,
    hook: Option<crate::handover::Hook>,
) -> Result<(), String> {
    let _ = tcp.set_nodelay(true);
    let (mut tcp, mut stream, mut state, mut hook) = (tcp, stream, state, hook);
    let outcome = loop {
        let pause = async {
            match &mut hook {
                Some(h) => h.requested().await,
                None => std::future::pending().await,
            }
        };
        match pumps(&mut tcp, &mut stream, &mut state, pause).await {
            Stopped::Done => break Ok(()),
            Stopped::Broken(b) => break Err(b),
            Stopped::Paused(turn) => {
                // Settled either way once this returns: the hook goes.
                let _hook = hook.take();
                match turn.give(tcp, stream, state).await {
                    crate::handover::Given::Handed => return Ok(()),
                    crate::handover::Given::Lost(why) => return Err(format!("hand-over: {why}")),
                    crate::handover::Given::Kept(t, s, st, why) => {
                        note!("serval: expose: kept a connection here: {why}");
                        (tcp, stream, state) = (t, s, st);
                    }
                }
            }
        }
    };
    drop(hook);
    match outcome {
        Ok(()) => {
            // Both directions ended: let the FIN exchange complete before the stream goes.
            crate::net::finish(&stream).await;
            Ok(())
        }
        Err(broken) => {
            stream.abort();
            reset_tcp(tcp);
            Err(match broken {
                Broken::Tcp(e) => format!("TCP side: {e}; reset the stream"),
                Broken::Serval(e) => format!("Serval side: {e}; reset the TCP connection"),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn state(up: &[u8], down: &[u8], flags: [bool; 4]) -> SpliceState {
        SpliceState {
            up: Pump::holding(up, flags[0], flags[1]),
            down: Pump::holding(down, flags[2], flags[3]),
        }
    }

    #[test]
    fn a_splice_state_round_trips_with_its_held_bytes_and_ends() {
        for (up, down, flags) in [
            (&b""[..], &b""[..], [false; 4]),
            (b"GET / HTTP/1.1\r\n", b"", [false; 4]),
            (b"", b"partial response", [true, true, false, false]),
            (b"tail", b"", [true, false, true, true]),
        ] {
            let s = SpliceState::decode(&state(up, down, flags).encode()).unwrap();
            assert_eq!((s.up.held(), s.down.held()), (up, down));
            assert_eq!(
                [s.up.eof, s.up.shut, s.down.eof, s.down.shut],
                flags,
                "{up:?} {down:?}"
            );
        }
    }

    #[test]
    fn a_full_buffer_round_trips() {
        let big = vec![7u8; SPLICE_BUF];
        let s = SpliceState::decode(&state(&big, &big, [false; 4]).encode()).unwrap();
        assert_eq!(s.up.held(), &big[..]);
        assert_eq!(s.down.held(), &big[..]);
    }

    #[test]
    fn malformed_splice_states_are_refused_never_a_panic() {
        let good = state(b"abc", b"defg", [true, false, false, false]).encode();
        // Every truncation, every extension and every single-byte change either parses to
        // something well-formed or is refused.
        for n in 0..good.len() {
            assert!(SpliceState::decode(&good[..n]).is_err(), "truncated at {n}");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(SpliceState::decode(&longer).is_err());
        for i in 0..good.len() {
            for v in [0u8, 1, 0x0f, 0x10, 0xff] {
                let mut b = good.clone();
                b[i] = v;
                let _ = SpliceState::decode(&b);
            }
        }
        // A writer shut with bytes still held, or before its reader ended.
        assert!(
            SpliceState::decode(&state(b"x", b"", [true, true, false, false]).encode()).is_err()
        );
        assert!(
            SpliceState::decode(&state(b"", b"", [false, true, false, false]).encode()).is_err()
        );
        assert!(SpliceState::decode(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }
}
