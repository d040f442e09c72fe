//! Step 8 of `serval demo`: a link dies under a live transfer, and the connection carries on
//! over its other path.
//!
//! A client endpoint bound to 127.0.0.1 and 127.0.0.2 (both loopback on Linux) runs multipath
//! (what `serval cat --bind A --bind B` does): once connected by name to an echo instance of
//! `paths.demo` (path 0, from 127.0.0.1), it joins a second path from 127.0.0.2 by itself. It
//! streams a byte pattern and checks the echo; midway, 127.0.0.2 goes away as if its link
//! died (`Endpoint::remove_local`: the socket stays, the address is no longer the
//! endpoint's), which takes path 1 down at once, and what it carried goes on over path 0. The
//! stream must never break: every byte comes back once, in order.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serval::{Endpoint, EndpointConfig, Locator, PathEvent, PathSummary, ServiceId, Stream};
use serval_router::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast;

use super::instances::{LocalInstance, wait_table};
use super::{Outcome, Timeline, loopback};
use crate::net::NextHop;

/// The step's title.
pub const STEP: &str = "link dies mid-transfer";

const NAME: &str = "paths.demo";
/// The stream: 4 MiB in chunks of 64 KiB, with at most `WINDOW` bytes not yet echoed (more
/// than one path's first congestion window, so that both paths carry data).
const TOTAL: usize = 4 << 20;
const CHUNK: usize = 64 * 1024;
const WINDOW: usize = 1 << 20;
/// How long the second path may take to join, and the transfer to finish.
const JOIN_LIMIT: Duration = Duration::from_secs(5);
const TRANSFER_LIMIT: Duration = Duration::from_secs(20);

/// Runs the step.
pub async fn run(tl: &Arc<Timeline>, router: &Router, raddr: Locator, lease: Duration) -> Outcome {
    tl.say(format!(
        "── step 8: a link dies under a live transfer: a client with two addresses (multipath) \
         streams through an echo instance of {NAME}; midway one address goes away"
    ));
    match inner(tl, router, raddr, lease).await {
        Ok(o) => o,
        Err(e) => {
            tl.say(format!("link failure step failed: {e}"));
            Outcome::fail(STEP, e)
        }
    }
}

/// The byte at `offset` of the stream: 4-byte little-endian word counters, so a lost,
/// repeated or reordered chunk shows.
fn pattern(offset: usize) -> u8 {
    let word = (offset / 4) as u32;
    word.to_le_bytes()[offset % 4]
}

/// `0 127.0.0.1:5 → M (127.0.0.1:7) active, 12 KiB sent; 1 …` for the timeline.
fn describe(tl: &Timeline, paths: &[PathSummary]) -> String {
    paths
        .iter()
        .map(|p| {
            let state = match p.transport {
                None => "joining",
                Some(t) if t.failed => "failed",
                Some(t) if t.backup => "backup",
                Some(_) => "active",
            };
            format!(
                "{} {} → {} {state}, {} KiB sent",
                p.id,
                p.local,
                tl.who(p.remote),
                p.transport.map_or(0, |t| t.bytes_sent) / 1024
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Waits (until `limit`) for `PathUp` of a path of `stream` other than path 0.
async fn path_up(
    events: &mut broadcast::Receiver<PathEvent>,
    stream: &Stream,
    limit: Duration,
) -> Result<u32, String> {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(PathEvent::PathUp { stream: s, path }) if s == stream.id() && path != 0 => {
                    return Ok(path);
                }
                Ok(PathEvent::PathDown { stream: s, path }) if s == stream.id() => {
                    return Err(format!("path {path} went down while joining"));
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    return Err("the client's endpoint stopped".to_string());
                }
            }
        }
    };
    tokio::time::timeout(limit, wait).await.map_err(|_| {
        format!(
            "no second path within {:.0} s: {}",
            limit.as_secs_f64(),
            stream
                .paths()
                .iter()
                .map(|p| format!("{p:?}"))
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?
}

async fn inner(
    tl: &Arc<Timeline>,
    router: &Router,
    raddr: Locator,
    lease: Duration,
) -> Result<Outcome, String> {
    let id = ServiceId::from_name(NAME).map_err(|e| format!("bad name {NAME}: {e}"))?;
    let server = LocalInstance::start(
        loopback(1),
        raddr,
        serval::ServicePrefix::exact(id),
        0,
        1,
        lease,
    )
    .await?;
    tl.label(server.addr, "E");
    wait_table(router, id, server.addr, true, Duration::from_secs(5)).await?;
    // Two loopback addresses (any 127/8 address works on Linux); elsewhere, two ports.
    let config = EndpointConfig {
        multipath: true,
        ..EndpointConfig::default()
    };
    let client = match Endpoint::bind_with(&[loopback(1), loopback(2)], config.clone()).await {
        Ok(ep) => ep,
        Err(_) => Endpoint::bind_with(&[loopback(1), loopback(1)], config)
            .await
            .map_err(|e| format!("cannot bind the client: {e}"))?,
    };
    let mut events = client.path_events();
    let stream = crate::net::connect(&client, NAME, id, &NextHop::Via(raddr)).await?;
    let connected = Instant::now();
    let first = stream.local_locator().map_err(|e| e.to_string())?;
    let second = client
        .local_locators()
        .into_iter()
        .find(|l| *l != first)
        .ok_or("the client has one address only")?;
    let joined = path_up(&mut events, &stream, JOIN_LIMIT).await?;
    let before = stream.paths();
    tl.say(format!(
        "client bound to {first} and {second} connected by name to {} (path 0) and joined \
         a second path by itself {:.1} ms later; its paths: {}",
        tl.who(stream.peer_locator().map_err(|e| e.to_string())?),
        connected.elapsed().as_secs_f64() * 1e3,
        describe(tl, &before)
    ));
    tl.say(format!(
        "streaming {} KiB in {} KiB chunks, echoed back, at most {} KiB outstanding",
        TOTAL / 1024,
        CHUNK / 1024,
        WINDOW / 1024
    ));

    // The writer stays `WINDOW` ahead of the reader; midway the reader takes the second
    // address away, and measures the gaps between reads after that.
    let received = AtomicU64::new(0);
    let progress = tokio::sync::Notify::new();
    let (mut r, mut w) = (&stream, &stream);
    let write = async {
        for c in 0..TOTAL / CHUNK {
            while (c * CHUNK) as u64 > received.load(Ordering::Relaxed) + WINDOW as u64 {
                progress.notified().await;
            }
            let chunk: Vec<u8> = (c * CHUNK..(c + 1) * CHUNK).map(pattern).collect();
            w.write_all(&chunk)
                .await
                .map_err(|e| format!("writing: {e}"))?;
        }
        w.shutdown().await.map_err(|e| format!("closing: {e}"))
    };
    let read = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0usize;
        let mut intact = true;
        let mut last = Instant::now();
        let mut gap_after = Duration::ZERO;
        let mut removed: Option<(usize, Vec<PathSummary>)> = None;
        loop {
            let n = r
                .read(&mut buf)
                .await
                .map_err(|e| format!("reading: {e}"))?;
            if removed.is_some() {
                gap_after = gap_after.max(last.elapsed());
            }
            last = Instant::now();
            if n == 0 {
                break;
            }
            for (i, b) in buf[..n].iter().enumerate() {
                intact &= got + i < TOTAL && *b == pattern(got + i);
            }
            got += n;
            received.store(got as u64, Ordering::Relaxed);
            progress.notify_one();
            if removed.is_none() && got >= TOTAL / 2 {
                let at = stream.paths();
                if !client.remove_local(second) {
                    return Err(format!("{second} was not the client's to remove"));
                }
                removed = Some((got, at));
            }
        }
        Ok::<_, String>((got, intact, gap_after, removed))
    };
    let (wrote, read) = tokio::time::timeout(TRANSFER_LIMIT, async { tokio::join!(write, read) })
        .await
        .map_err(|_| {
            format!(
                "the stream stalled after {} of {TOTAL} bytes came back",
                received.load(Ordering::Relaxed)
            )
        })?;
    wrote?;
    let (got, intact, gap_after, removed) = read?;
    let Some((at, during)) = removed else {
        return Err(format!("the stream ended after {got} bytes, before midway"));
    };
    let on_second = during
        .iter()
        .find(|p| p.id == joined)
        .and_then(|p| p.transport)
        .map_or(0, |t| t.bytes_sent);
    tl.say(format!(
        "after {} KiB came back: {second} goes away, as if its link died; path {joined} from \
         it had sent {} KiB, and goes at once: what it carried goes on over path 0",
        at / 1024,
        on_second / 1024
    ));
    let down = async {
        loop {
            match events.recv().await {
                Ok(PathEvent::PathDown { stream: s, path }) if s == stream.id() => break path,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break u32::MAX,
            }
        }
    };
    let down = tokio::time::timeout(JOIN_LIMIT, down).await.ok();
    let after = stream.paths();
    tl.say(format!("the client's paths now: {}", describe(tl, &after)));
    let whole = intact && got == TOTAL;
    tl.say(format!(
        "{got} of {TOTAL} bytes came back across the link's death{}; longest receive gap \
         after it {:.1} ms; the stream never broke",
        if whole {
            ", each once and in order"
        } else {
            ", DAMAGED"
        },
        gap_after.as_secs_f64() * 1e3
    ));
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.closed()).await;
    drop(server);
    let detail = format!(
        "{} KiB intact, paths 2 → 1 when {} died, longest receive gap after it {:.1} ms",
        got / 1024,
        second.ip(),
        gap_after.as_secs_f64() * 1e3
    );
    let two_before = before.len() == 2 && before.iter().all(|p| p.active);
    let one_after = after.len() == 1 && after[0].id == 0;
    if whole && two_before && one_after && down == Some(joined) {
        Ok(Outcome::pass(STEP, detail))
    } else {
        Ok(Outcome::fail(
            STEP,
            format!(
                "{detail}; intact {whole}, paths before {}, after {}, path down {down:?}",
                before.len(),
                after.len()
            ),
        ))
    }
}
