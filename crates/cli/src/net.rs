//! `serval listen` and `serval cat`.

use std::net::SocketAddr;

use serval::{Endpoint, RegistrarEvent, ServiceId, ServicePrefix, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How `serval listen` serves.
pub struct ListenOptions {
    /// Echo streams back instead of printing them.
    pub echo: bool,
    /// Register with this router.
    pub router: Option<SocketAddr>,
    /// Weight and priority of the registration (and of the local rule).
    pub weight: u32,
    /// See `weight`.
    pub priority: u32,
    /// Routerless mode: answer SYNs multicast on the local network.
    pub discover: Option<serval::DiscoveryConfig>,
}

/// Where `serval cat` sends its SYN.
pub enum NextHop {
    /// A router or the instance.
    Via(SocketAddr),
    /// The discovery group: whichever instance on the local network answers first.
    Discover(serval::DiscoveryConfig),
}

/// Serves `prefix` (typed by the user as `name`) on `bind` until interrupted.
pub async fn listen(
    name: &str,
    prefix: ServicePrefix,
    bind: Vec<SocketAddr>,
    opts: ListenOptions,
) -> Result<(), String> {
    let echo = opts.echo;
    let ep = Endpoint::bind(&bind)
        .await
        .map_err(|e| format!("cannot bind {}: {e}", list(&bind)))?;
    let mut events = ep.registrar_events();
    if let Some(router) = opts.router {
        ep.set_router(router);
    }
    if let Some(d) = &opts.discover {
        ep.enable_discovery(d.clone())
            .map_err(|e| format!("cannot join the discovery group: {e}"))?;
    }
    let mut listener = ep
        .listen_weighted(prefix, opts.priority, opts.weight)
        .map_err(|e| format!("cannot listen on {name}: {e}"))?;
    eprintln!(
        "serval: serving {name} ({prefix}) on {}{}{}",
        list(&ep.local_locators()),
        if echo { " (echo)" } else { "" },
        opts.router
            .map(|r| format!(", registering with router {r} (weight {})", opts.weight))
            .unwrap_or_default()
            + &opts
                .discover
                .as_ref()
                .map(|d| {
                    format!(
                        ", answering discovery on {} and {}",
                        d.locator(),
                        d.locator_v6()
                    )
                })
                .unwrap_or_default()
    );
    let stop = crate::router::wait_for_stop();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            Ok(ev) = events.recv() => match ev {
                RegistrarEvent::Registered { router, ttl, .. } => eprintln!(
                    "serval: registered {name} with router {router} (lease {} ms)",
                    ttl.as_millis()
                ),
                RegistrarEvent::Rejected { router, reason, .. } => {
                    eprintln!("serval: router {router} rejected {name}: {reason}")
                }
                RegistrarEvent::Unreachable { router, .. } => {
                    eprintln!("serval: router {router} does not answer; still trying")
                }
            },
            accepted = listener.accept() => {
                let stream = accepted.map_err(|e| format!("accept failed: {e}"))?;
                tokio::spawn(async move {
                    let peer = stream.peer_locator().map_or_else(|_| "?".into(), |p| p.to_string());
                    let r = if echo { serve_echo(stream).await } else { serve_print(stream).await };
                    if let Err(e) = r {
                        eprintln!("serval: connection from {peer}: {e}");
                    }
                });
            }
            () = &mut stop => return Ok(()),
        }
    }
}

/// Copies the stream back to itself, then closes our direction.
async fn serve_echo(mut stream: Stream) -> std::io::Result<()> {
    let (mut r, mut w) = stream.split();
    tokio::io::copy(&mut r, &mut w).await?;
    w.shutdown().await
}

/// Copies the stream to stdout; sends nothing and closes our direction at the client's end.
async fn serve_print(mut stream: Stream) -> std::io::Result<()> {
    let mut out = tokio::io::stdout();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).await?;
    }
    out.flush().await?;
    stream.shutdown().await
}

/// Connects to `service` (typed by the user as `name`) through `hop`, sends stdin, prints
/// what comes back.
pub async fn cat(
    name: &str,
    service: ServiceId,
    hop: NextHop,
    bind: Option<SocketAddr>,
) -> Result<(), String> {
    let v4 = match &hop {
        NextHop::Via(via) => via.is_ipv4(),
        NextHop::Discover(_) => true,
    };
    let local = bind.unwrap_or_else(|| {
        if v4 {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        }
    });
    let ep = Endpoint::bind(&[local])
        .await
        .map_err(|e| format!("cannot bind {local}: {e}"))?;
    let connected = match &hop {
        NextHop::Via(via) => ep.connect_via(service, *via).await,
        NextHop::Discover(d) => {
            ep.enable_discovery(d.clone())
                .map_err(|e| format!("cannot join the discovery group: {e}"))?;
            ep.connect(service).await
        }
    };
    let mut stream = connected.map_err(|e| match (&hop, e.kind()) {
        (NextHop::Discover(_), std::io::ErrorKind::HostUnreachable) => {
            format!("no route to service {name} (no instance answered on the local network)")
        }
        (NextHop::Discover(d), _) => format!(
            "connect to service {name} through discovery group {}: {e}",
            d.locator()
        ),
        (NextHop::Via(via), std::io::ErrorKind::HostUnreachable) => {
            format!("no route to service {name} (via {via})")
        }
        (NextHop::Via(via), std::io::ErrorKind::TimedOut) => {
            format!("connect to service {name} via {via} timed out")
        }
        (NextHop::Via(via), _) => format!("connect to service {name} via {via}: {e}"),
    })?;
    {
        let (mut r, mut w) = stream.split();
        let send = async {
            let mut stdin = tokio::io::stdin();
            tokio::io::copy(&mut stdin, &mut w).await?;
            w.shutdown().await
        };
        let receive = async {
            let mut stdout = tokio::io::stdout();
            tokio::io::copy(&mut r, &mut stdout).await?;
            stdout.flush().await
        };
        let (s, r) = tokio::join!(send, receive);
        s.map_err(|e| format!("sending: {e}"))?;
        r.map_err(|e| format!("receiving: {e}"))?;
    }
    // Both directions ended: let the FIN exchange finish so the peer sees a clean close.
    match tokio::time::timeout(CLOSE_WAIT, stream.closed()).await {
        Ok(serval::CloseReason::Finished) | Err(_) => Ok(()),
        Ok(other) => Err(format!("connection ended badly: {other}")),
    }
}

/// How long `cat` waits for the FIN exchange after both directions ended.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
