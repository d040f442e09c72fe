//! The demo's service instances: child processes (`serval listen …`) that can be killed
//! for real, and in-process echo instances that can withdraw gracefully.

use std::io::{BufRead, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serval::{Action, Endpoint, LeaseConfig, Locator, ServiceId, ServicePrefix, Stream};
use serval_router::Router;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

/// A `serval listen …` child process of this binary; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct ChildInstance {
    child: Child,
    /// Where it serves.
    pub addr: Locator,
    /// Its stderr, line by line as it comes.
    lines: mpsc::UnboundedReceiver<String>,
    /// What it said so far.
    said: Vec<String>,
}

impl ChildInstance {
    /// Starts `serval listen service --echo --bind 127.0.0.1:0 --router R --weight W` with a
    /// lease of `lease`, and waits until it says where it serves.
    pub async fn spawn(
        service: &str,
        router: Locator,
        weight: u32,
        lease: Duration,
    ) -> Result<ChildInstance, String> {
        let args = [
            "listen",
            service,
            "--echo",
            "--bind",
            "127.0.0.1:0",
            "--router",
            &router.to_string(),
            "--weight",
            &weight.to_string(),
            "--lease-ms",
            &lease.as_millis().to_string(),
        ];
        ChildInstance::start(service, &args, None).await
    }

    /// Starts `serval ARGS --exit-with-parent` (a `serval listen`, named `what` in errors),
    /// writes `stdin` to it (then closes it; else it has none), and waits until it says where
    /// it serves.
    pub async fn start(
        what: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<ChildInstance, String> {
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find the serval binary to start instances: {e}"))?;
        let mut child = Command::new(&exe)
            .args(args)
            // Even a demo killed outright (SIGKILL) leaves no instance behind.
            .arg("--exit-with-parent")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(err) = child.stderr.take() {
            std::thread::spawn(move || {
                // Keep reading after the receiver is gone, so the child never blocks on a full
                // pipe.
                for line in std::io::BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    let _ = tx.send(line);
                }
            });
        }
        let input = child.stdin.take();
        // From here on, dropping `instance` kills the child, whatever goes wrong.
        let mut instance = ChildInstance {
            child,
            addr: Locator::from(([0, 0, 0, 0], 0)),
            lines: rx,
            said: Vec::new(),
        };
        if let (Some(mut input), Some(bytes)) = (input, stdin) {
            // A few hundred bytes into an empty pipe: this does not block. Dropping `input`
            // closes it, so the child reads to its end.
            input
                .write_all(bytes)
                .map_err(|e| format!("cannot write to {what}'s input: {e}"))?;
        }
        let serving = instance
            .wait_line(
                "where it serves",
                |l| serving_address(l).is_some(),
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| format!("instance of {what} {e}"))?;
        instance.addr = serving_address(&serving).ok_or("no serving address")?;
        Ok(instance)
    }

    /// Waits up to `limit` for a line of its stderr (said before or after the call) for
    /// which `want` holds; `what` names it in the error.
    pub async fn wait_line(
        &mut self,
        what: &str,
        want: impl Fn(&str) -> bool,
        limit: Duration,
    ) -> Result<String, String> {
        if let Some(l) = self.said(&want) {
            return Ok(l);
        }
        let found = tokio::time::timeout(limit, async {
            while let Some(line) = self.lines.recv().await {
                let hit = want(&line);
                self.said.push(line.clone());
                if hit {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => Ok(line),
            Ok(None) => Err(format!(
                "exited before saying {what}: {}",
                self.said.join(" / ")
            )),
            Err(_) => Err(format!(
                "did not say {what} within {:.1} s: {}",
                limit.as_secs_f64(),
                self.said.join(" / ")
            )),
        }
    }

    /// The first line of its stderr so far (without waiting) for which `want` holds.
    pub fn said(&mut self, want: impl Fn(&str) -> bool) -> Option<String> {
        while let Ok(line) = self.lines.try_recv() {
            self.said.push(line);
        }
        self.said.iter().find(|l| want(l)).cloned()
    }

    /// Kills it with SIGKILL: it gets no chance to unregister, or to send anything at all.
    /// Returns once it is gone (reaped).
    pub fn kill(&mut self) -> Result<(), String> {
        self.child
            .kill()
            .map_err(|e| format!("cannot kill instance {}: {e}", self.addr))?;
        let _ = self.child.wait();
        Ok(())
    }
}

impl Drop for ChildInstance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address in `serval listen`'s line `serval: serving NAME (PREFIX) on ADDR…`.
fn serving_address(line: &str) -> Option<Locator> {
    let rest = line.strip_prefix("serval: serving ")?;
    let (_, after) = rest.split_once(" on ")?;
    let addr = after.split([',', ' ']).next()?;
    addr.parse().ok()
}

/// What an in-process instance reports when asked to withdraw.
#[derive(Debug)]
pub struct Withdrawn {
    /// Connections still open when it stopped accepting.
    pub open: usize,
    /// Resolves when every one of them has finished.
    pub drained: oneshot::Receiver<()>,
}

/// An echo instance in this process, registered with the router.
#[derive(Debug)]
pub struct LocalInstance {
    /// Its endpoint, kept alive until the instance is dropped.
    _endpoint: Endpoint,
    /// Where it serves.
    pub addr: Locator,
    /// The peer locators each connection was seen from, in order, deduplicated per connection.
    pub peers: Arc<Mutex<Vec<Vec<Locator>>>>,
    stop: Option<oneshot::Sender<oneshot::Sender<Withdrawn>>>,
}

impl LocalInstance {
    /// Binds `bind`, registers `prefix` with `router` (lease `lease`) at `priority`/`weight`,
    /// and echoes every connection.
    pub async fn start(
        bind: std::net::SocketAddr,
        router: Locator,
        prefix: ServicePrefix,
        priority: u32,
        weight: u32,
        lease: Duration,
    ) -> Result<LocalInstance, String> {
        let endpoint = Endpoint::bind(&[bind])
            .await
            .map_err(|e| format!("cannot bind {bind}: {e}"))?;
        endpoint.set_router_with(router, lease_config(lease));
        let listener = endpoint
            .listen_weighted(prefix, priority, weight)
            .map_err(|e| format!("cannot listen: {e}"))?;
        let addr = endpoint
            .local_locators()
            .first()
            .copied()
            .ok_or("the endpoint has no address")?;
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (stop, stop_rx) = oneshot::channel();
        tokio::spawn(serve(listener, stop_rx, peers.clone()));
        Ok(LocalInstance {
            _endpoint: endpoint,
            addr,
            peers,
            stop: Some(stop),
        })
    }

    /// Stops accepting (the listener is dropped, so the registration is withdrawn at once)
    /// and lets open connections finish.
    pub async fn withdraw(&mut self) -> Result<Withdrawn, String> {
        let stop = self.stop.take().ok_or("already withdrawn")?;
        let (tx, rx) = oneshot::channel();
        stop.send(tx).map_err(|_| "the instance already stopped")?;
        rx.await
            .map_err(|_| "the instance stopped without answering".to_string())
    }
}

/// A lease of `ttl`, refreshed three times per lease.
pub fn lease_config(ttl: Duration) -> LeaseConfig {
    LeaseConfig {
        ttl,
        refresh: ttl / 3,
        ..LeaseConfig::default()
    }
}

/// Accepts and echoes until told to stop; then drops the listener and drains.
async fn serve(
    mut listener: serval::ServiceListener,
    mut stop: oneshot::Receiver<oneshot::Sender<Withdrawn>>,
    peers: Arc<Mutex<Vec<Vec<Locator>>>>,
) {
    let mut open = JoinSet::new();
    let reply = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    let index = {
                        let mut p = super::lock(&peers);
                        p.push(Vec::new());
                        p.len() - 1
                    };
                    open.spawn(echo(stream, peers.clone(), index));
                }
                Err(_) => return,
            },
            Some(_) = open.join_next(), if !open.is_empty() => {}
            r = &mut stop => break r.ok(),
        }
    };
    drop(listener);
    let (done_tx, done_rx) = oneshot::channel();
    if let Some(reply) = reply {
        let _ = reply.send(Withdrawn {
            open: open.len(),
            drained: done_rx,
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while open.join_next().await.is_some() {}
    })
    .await;
    let _ = done_tx.send(());
}

/// Echoes one connection, noting each new peer locator it arrives from.
async fn echo(
    mut stream: Stream,
    peers: Arc<Mutex<Vec<Vec<Locator>>>>,
    index: usize,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if let Ok(peer) = stream.peer_locator() {
            let mut p = super::lock(&peers);
            if let Some(seen) = p.get_mut(index)
                && seen.last() != Some(&peer)
            {
                seen.push(peer);
            }
        }
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n]).await?;
    }
    stream.shutdown().await?;
    // Let the FIN exchange finish before the connection counts as done.
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.closed()).await;
    Ok(())
}

/// Waits until the router's table has (`present`) or no longer has a FORWARD target to `loc`
/// for `service`; returns how long that took.
pub async fn wait_table(
    router: &Router,
    service: ServiceId,
    loc: Locator,
    present: bool,
    limit: Duration,
) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let has = router
            .table()
            .lookup(&service)
            .is_some_and(|(_, targets)| targets.iter().any(|t| t.action == Action::Forward(loc)));
        if has == present {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(format!(
                "the router's table still {} {loc} after {:.1} s",
                if present { "lacks" } else { "has" },
                limit.as_secs_f64()
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads the next answer of the line-numbering service into `line` and checks it: the
/// demo's clients send `line N`, so answer `answered` must be `answered + 1` then that line.
pub async fn next_numbered(
    r: &mut (impl AsyncBufRead + Unpin),
    line: &mut String,
    answered: u64,
) -> Result<(), String> {
    line.clear();
    let n = r
        .read_line(line)
        .await
        .map_err(|e| format!("reading: {e}"))?;
    if n == 0 {
        return Err(format!("the stream ended after {answered} answers"));
    }
    let want = format!("{} line {answered}\n", answered + 1);
    if *line != want {
        return Err(format!("answer {answered} was {line:?}, not {want:?}"));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::serving_address;

    #[test]
    fn finds_the_address_in_the_serving_line() {
        let line = "serval: serving web.demo (9c3f/64) on 127.0.0.1:41234 (echo), registering \
                    with router 127.0.0.1:5 (weight 3)";
        assert_eq!(
            serving_address(line),
            Some("127.0.0.1:41234".parse().unwrap())
        );
        assert_eq!(serving_address("serval: registered web.demo"), None);
    }
}
