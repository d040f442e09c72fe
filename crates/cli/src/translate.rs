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
}

/// Runs `serval proxy`.
pub fn proxy(args: ProxyArgs) -> ExitCode {
    match ServiceId::parse(&args.service) {
        Ok(id) => crate::run_single(run_proxy(id, args)),
        Err(e) => crate::usage(&e),
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

async fn run_proxy(service: ServiceId, args: ProxyArgs) -> Result<(), String> {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    let hop = args.hop.next_hop();
    let ep = Arc::new(
        crate::net::client(
            &hop,
            args.hop.bind,
            args.hop.endpoint_config(),
            args.hop.follow(),
        )
        .await?,
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
                        Ok(stream) => splice(tcp, stream).await,
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
    let ep = args.instance.endpoint(None).await?;
    let _admin = crate::instance::start(
        &ep,
        &args.instance,
        &args.service,
        crate::instance::Moves::Unsupported(
            "serval expose cannot move its flows to another host: each one's TCP connection \
             to the backend stays on this host",
        ),
    )
    .await?;
    let mut events = ep.registrar_events();
    let mut listener = args.instance.listen(&ep, &args.service, prefix)?;
    let name = args.service.clone();
    note!(
        "serval: expose: service {name} ({prefix}) on {} → TCP {}{}",
        crate::net::list(&ep.local_locators()),
        args.to,
        args.instance.registering()
    );
    ready(&crate::net::list(&ep.local_locators()));

    let backend: Arc<str> = args.to.into();
    let connect_timeout = Duration::from_millis(args.connect_timeout);
    let mut conns = Connections::new("expose", args.max_connections);
    let stop = crate::router::wait_for_stop();
    tokio::pin!(stop);
    loop {
        // A free slot first, then a stream; a signal or a registrar event interrupts either.
        let slot = conns.slot();
        let next = async { (slot.await, listener.accept().await) };
        tokio::select! {
            Ok(ev) = events.recv() => note!("{}", crate::net::describe_event(&name, &ev)),
            (slot, accepted) = next => {
                let Some(slot) = slot else { break };
                let stream = accepted.map_err(|e| format!("accept failed: {e}"))?;
                let client = stream.peer_locator().ok();
                let backend = backend.clone();
                conns.spawn(slot, Label("stream from", client), async move {
                    match connect_backend(&backend, connect_timeout).await {
                        Ok(tcp) => splice(tcp, stream).await,
                        Err(e) => {
                            stream.abort();
                            Err(e)
                        }
                    }
                });
            }
            () = conns.reap() => {}
            () = &mut stop => break,
        }
    }
    // Withdraw at once (the UNREGISTER leaves now, and is seen answered), then let open
    // connections finish.
    drop(listener);
    ep.unregistered_within(crate::net::UNREGISTER_LIMIT).await;
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
fn reset_tcp(tcp: TcpStream) {
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

/// Copies one direction until end of stream, then half-closes the writer. Reads into one
/// fixed buffer, so at most `buf.len()` bytes are held here.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    buf: &mut [u8],
    from_err: fn(io::Error) -> Broken,
    to_err: fn(io::Error) -> Broken,
) -> Result<u64, Broken>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    loop {
        let n = from.read(buf).await.map_err(from_err)?;
        if n == 0 {
            to.shutdown().await.map_err(to_err)?;
            return Ok(total);
        }
        to.write_all(&buf[..n]).await.map_err(to_err)?;
        total += n as u64;
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
        if let Ok(mut pool) = BUFFERS.lock()
            && pool.len() < POOLED_BUFFERS
        {
            pool.push(std::mem::take(&mut self.0));
        }
    }
}

/// Carries bytes between a TCP connection and a Serval stream until both directions have
/// ended. A FIN on either side is passed on as a FIN; an error or reset on either side resets
/// both and is returned.
async fn splice(tcp: TcpStream, mut stream: Stream) -> Result<(), String> {
    let _ = tcp.set_nodelay(true);
    let mut tcp = tcp;
    let outcome = {
        let (tr, tw) = tcp.split();
        let (sr, sw) = stream.split();
        let (mut up_buf, mut down_buf) = (PooledBuf::take(), PooledBuf::take());
        let up = pump(tr, sw, &mut up_buf.0, Broken::Tcp, Broken::Serval);
        let down = pump(sr, tw, &mut down_buf.0, Broken::Serval, Broken::Tcp);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(_) => up_done = true,
                    Err(b) => break Err(b),
                },
                r = &mut down, if !down_done => match r {
                    Ok(_) => down_done = true,
                    Err(b) => break Err(b),
                },
            }
            if up_done && down_done {
                break Ok(());
            }
        }
    };
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
