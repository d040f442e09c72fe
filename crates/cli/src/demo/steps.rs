//! The demo's first five steps (the sixth is in `server_move.rs`, the seventh in `standby.rs`,
//! the eighth in `multipath.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serval::{Endpoint, Locator, ServiceId, ServicePrefix};
use serval_router::{Router, RouterConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::instances::{ChildInstance, LocalInstance, wait_table};
use super::{Outcome, Timeline, loopback};
use crate::net::NextHop;

/// Lease of every instance: how long a dead one keeps receiving new connections.
const LEASE: Duration = Duration::from_millis(1000);
/// The most any single connection attempt may take before it counts as failed.
/// (4 s: a SYN is retransmitted after 1 s, then 2 s more, so it gets two retransmissions.)
const ATTEMPT_LIMIT: Duration = Duration::from_secs(4);
/// How long to wait for the router's table to reflect a registration or withdrawal.
const TABLE_LIMIT: Duration = Duration::from_secs(5);

const STEP_CONNECT: &str = "connect by name";
const STEP_SPREAD: &str = "weighted spread";
const STEP_SWAP: &str = "swap under a stable name";
const STEP_KILL: &str = "kill and failover";
const STEP_MIGRATE: &str = "migration";

/// The web service's two instances: A (weight 3) and B (weight 1), child processes.
struct Web {
    id: ServiceId,
    a: ChildInstance,
    b: ChildInstance,
}

/// Every step failed for one reason (the demo could not set up).
fn all_failed(why: &str) -> Vec<Outcome> {
    [
        STEP_CONNECT,
        STEP_SPREAD,
        STEP_SWAP,
        STEP_KILL,
        STEP_MIGRATE,
        super::server_move::STEP,
        super::standby::STEP,
        super::multipath::STEP,
    ]
    .into_iter()
    .map(|s| Outcome::fail(s, why))
    .collect()
}

/// Runs every step and returns their outcomes, in order.
pub async fn all(tl: Arc<Timeline>) -> Vec<Outcome> {
    let mut config = RouterConfig::new(vec![loopback(1)]);
    config.policy.min_ttl = Duration::from_millis(300);
    let router = match Router::bind(config).await {
        Ok(r) => r,
        Err(e) => {
            return all_failed(&format!("no router: {e}"));
        }
    };
    let Some(&raddr) = router.locators().first() else {
        return vec![Outcome::fail(STEP_CONNECT, "the router has no address")];
    };
    tl.say(format!(
        "service router listening on {raddr} (in this process, in-memory registry); \
         instances lease their names for {:.1} s",
        LEASE.as_secs_f64()
    ));
    let client = match Endpoint::bind(&[loopback(1)]).await {
        Ok(ep) => ep,
        Err(e) => {
            return all_failed(&format!("cannot bind a client: {e}"));
        }
    };
    let hop = NextHop::Via(raddr);

    let mut out = Vec::new();
    match start_web(&tl, &router, raddr).await {
        Ok(mut web) => {
            out.push(connect_by_name(&tl, &router, &client, &hop, &web).await);
            out.push(spread(&tl, &client, &hop, &web).await);
            out.push(swap(&tl, &router, raddr, &client, &hop).await);
            out.push(kill(&tl, &router, &client, &hop, &mut web).await);
        }
        Err(e) => {
            for s in [STEP_CONNECT, STEP_SPREAD] {
                out.push(Outcome::fail(s, e.clone()));
            }
            out.push(swap(&tl, &router, raddr, &client, &hop).await);
            out.push(Outcome::fail(STEP_KILL, e));
        }
    }
    out.push(migrate(&tl, &router, raddr).await);
    out.push(super::server_move::run(&tl, &router, raddr, LEASE).await);
    out.push(super::standby::run(&tl, &router, raddr, LEASE).await);
    out.push(super::multipath::run(&tl, &router, raddr, LEASE).await);
    out
}

/// Starts instances A and B of `web.demo` and waits until the router routes to both.
async fn start_web(tl: &Timeline, router: &Router, raddr: Locator) -> Result<Web, String> {
    let name = "web.demo";
    let id = ServiceId::from_name(name).map_err(|e| format!("bad name {name}: {e}"))?;
    let a = ChildInstance::spawn(name, raddr, 3, LEASE).await?;
    tl.label(a.addr, "A");
    let b = ChildInstance::spawn(name, raddr, 1, LEASE).await?;
    tl.label(b.addr, "B");
    for (inst, weight) in [(&a, 3), (&b, 1)] {
        let took = wait_table(router, id, inst.addr, true, TABLE_LIMIT).await?;
        tl.say(format!(
            "instance {} of {name} (a `serval listen --echo` process, weight {weight}) \
             registered; in the router's table {:.0} ms later",
            tl.who(inst.addr),
            took.as_secs_f64() * 1000.0
        ));
    }
    Ok(Web { id, a, b })
}

/// One probe with a bound on its time.
async fn probe(
    client: &Endpoint,
    name: &str,
    id: ServiceId,
    hop: &NextHop,
    payload: &[u8],
) -> Result<(Duration, Locator), String> {
    match tokio::time::timeout(
        ATTEMPT_LIMIT,
        crate::ping::probe(client, name, id, hop, payload),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no answer within {:.0} s",
            ATTEMPT_LIMIT.as_secs_f64()
        )),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Step 1: one connection by name.
async fn connect_by_name(
    tl: &Timeline,
    router: &Router,
    client: &Endpoint,
    hop: &NextHop,
    web: &Web,
) -> Outcome {
    tl.say("── step 1: connect by name");
    let hex = web.id.to_string();
    tl.say(format!(
        "web.demo names serviceID {}… (label by label from the top: see `serval id`)",
        hex.get(..16).unwrap_or(&hex)
    ));
    let before = router.stats().syns_forwarded;
    match probe(client, "web.demo", web.id, hop, b"hello, web.demo").await {
        Ok((rtt, instance)) => {
            let syns = router.stats().syns_forwarded - before;
            tl.say(format!(
                "connect by name web.demo → instance {} ({}); echo checked; the router \
                 forwarded {syns} SYN, the data went host to host",
                tl.who(instance),
                ms(rtt)
            ));
            if instance == web.a.addr || instance == web.b.addr {
                Outcome::pass(
                    STEP_CONNECT,
                    format!("web.demo → {} in {}", tl.short(instance), ms(rtt)),
                )
            } else {
                Outcome::fail(STEP_CONNECT, format!("answered by unknown {instance}"))
            }
        }
        Err(e) => {
            tl.say(format!("connect by name web.demo failed: {e}"));
            Outcome::fail(STEP_CONNECT, e)
        }
    }
}

/// Step 2: connections spread by weight.
async fn spread(tl: &Timeline, client: &Endpoint, hop: &NextHop, web: &Web) -> Outcome {
    const N: usize = 60;
    const BATCH: usize = 10;
    tl.say(format!(
        "── step 2: weighted spread: {N} new connections to web.demo (A weight 3, B weight 1)"
    ));
    let mut counts: BTreeMap<Locator, usize> = BTreeMap::new();
    let mut failed = Vec::new();
    for _ in 0..N / BATCH {
        let batch = (0..BATCH).map(|i| {
            let payload = format!("request {i}");
            async move { probe(client, "web.demo", web.id, hop, payload.as_bytes()).await }
        });
        for r in futures_util::future::join_all(batch).await {
            match r {
                Ok((_, instance)) => *counts.entry(instance).or_default() += 1,
                Err(e) => failed.push(e),
            }
        }
    }
    let a = counts.get(&web.a.addr).copied().unwrap_or(0);
    let b = counts.get(&web.b.addr).copied().unwrap_or(0);
    tl.say(format!(
        "A answered {a}, B answered {b} of {N} ({:.0}% / {:.0}%; weights ask for 75% / 25%){}",
        100.0 * a as f64 / N as f64,
        100.0 * b as f64 / N as f64,
        if failed.is_empty() {
            String::new()
        } else {
            format!("; {} failed: {}", failed.len(), failed[0])
        }
    ));
    let detail = format!("A {a} / B {b} of {N} (weights 3:1)");
    if failed.is_empty() && a > 0 && b > 0 && a > b && a + b == N {
        Outcome::pass(STEP_SPREAD, detail)
    } else {
        Outcome::fail(STEP_SPREAD, format!("{detail}, {} failed", failed.len()))
    }
}

/// One ping of the swap step.
struct Ping {
    seq: u32,
    result: Result<(Duration, Locator), String>,
}

/// Pings `name` every 50 ms until `stop` turns true; prints the first answer, every change
/// of instance, every loss and every 10th ping.
async fn ping_loop(
    tl: Arc<Timeline>,
    client: Endpoint,
    name: &'static str,
    id: ServiceId,
    hop: NextHop,
    mut stop: watch::Receiver<bool>,
    answered_by: watch::Sender<Option<Locator>>,
) -> Vec<Ping> {
    let mut pings = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<Locator> = None;
    let mut since = 1u32;
    let mut lost = 0usize;
    let mut seq = 0u32;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            break;
        }
        seq += 1;
        let payload = format!("ping {seq}");
        let result = probe(&client, name, id, &hop, payload.as_bytes()).await;
        match &result {
            Ok((rtt, instance)) => {
                if let Some(before) = last.filter(|l| l != instance) {
                    tl.say(format!(
                        "ping seq={seq} answered by {} ({}) ← instance changed (seq={since}–{} \
                         answered by {}){}",
                        tl.who(*instance),
                        ms(*rtt),
                        seq - 1,
                        tl.short(before),
                        if lost == 0 { "; no ping lost" } else { "" }
                    ));
                    since = seq;
                } else if last.is_none() || seq.is_multiple_of(10) {
                    tl.say(format!(
                        "ping seq={seq} answered by {} ({})",
                        tl.who(*instance),
                        ms(*rtt)
                    ));
                }
                last = Some(*instance);
                answered_by.send_replace(Some(*instance));
            }
            Err(e) => {
                lost += 1;
                tl.say(format!("ping seq={seq} LOST: {e}"));
            }
        }
        pings.push(Ping { seq, result });
    }
    pings
}

/// Step 3: the instance behind a stable name is replaced while it is pinged.
async fn swap(
    tl: &Arc<Timeline>,
    router: &Router,
    raddr: Locator,
    client: &Endpoint,
    hop: &NextHop,
) -> Outcome {
    const NAME: &str = "api.demo";
    tl.say(format!(
        "── step 3: swap the instance under {NAME} while pinging it by name every 50 ms"
    ));
    match swap_inner(tl, router, raddr, client, hop, NAME).await {
        Ok(o) => o,
        Err(e) => {
            tl.say(format!("swap failed: {e}"));
            Outcome::fail(STEP_SWAP, e)
        }
    }
}

async fn swap_inner(
    tl: &Arc<Timeline>,
    router: &Router,
    raddr: Locator,
    client: &Endpoint,
    hop: &NextHop,
    name: &'static str,
) -> Result<Outcome, String> {
    let id = ServiceId::from_name(name).map_err(|e| format!("bad name {name}: {e}"))?;
    let prefix = ServicePrefix::exact(id);
    let mut v1 = LocalInstance::start(loopback(1), raddr, prefix, 0, 1, LEASE).await?;
    tl.label(v1.addr, "v1");
    wait_table(router, id, v1.addr, true, TABLE_LIMIT).await?;
    tl.say(format!(
        "instance v1 ({}, in this process) serves {name}",
        v1.addr
    ));

    // A long-lived connection to v1, open across the swap: it must finish normally.
    let mut session = crate::net::connect(client, name, id, hop).await?;
    session
        .write_all(b"first half, ")
        .await
        .map_err(|e| format!("session: {e}"))?;
    let mut first = [0u8; 12];
    tokio::time::timeout(ATTEMPT_LIMIT, session.read_exact(&mut first))
        .await
        .map_err(|_| "session: no echo".to_string())?
        .map_err(|e| format!("session: {e}"))?;
    let session_peer = session
        .peer_locator()
        .map_err(|e| format!("session: {e}"))?;
    tl.say(format!(
        "a long-lived connection is open to {} (it will outlive v1's withdrawal)",
        tl.who(session_peer)
    ));

    let (stop_tx, stop_rx) = watch::channel(false);
    let (by_tx, mut by_rx) = watch::channel(None);
    let pinger = tokio::spawn(ping_loop(
        tl.clone(),
        client.clone(),
        name,
        id,
        NextHop::Via(raddr),
        stop_rx,
        by_tx,
    ));
    // About ten pings on v1.
    let warmup = tokio::time::sleep(Duration::from_millis(500));
    warmup.await;

    let v2 = LocalInstance::start(loopback(1), raddr, prefix, 1, 1, LEASE).await?;
    tl.label(v2.addr, "v2");
    tl.say(format!(
        "instance v2 ({}) starts and registers {name} at priority 1 (preferred over v1's 0)",
        v2.addr
    ));
    let v2_addr = v2.addr;
    tokio::time::timeout(TABLE_LIMIT, by_rx.wait_for(|by| *by == Some(v2_addr)))
        .await
        .map_err(|_| "pings never reached v2".to_string())?
        .map_err(|_| "the pinger stopped".to_string())?;

    let withdrawn = v1.withdraw().await?;
    tl.say(format!(
        "v1 withdraws gracefully: stops accepting, its registration is removed at once; \
         {} open connection(s) left to finish",
        withdrawn.open
    ));
    let gone = wait_table(router, id, v1.addr, false, TABLE_LIMIT).await?;
    tl.say(format!(
        "router's table: {name} → v2 only ({} after the withdrawal)",
        ms(gone)
    ));

    // The open connection still works, then closes normally.
    session
        .write_all(b"second half")
        .await
        .map_err(|e| format!("session after the withdrawal: {e}"))?;
    session
        .shutdown()
        .await
        .map_err(|e| format!("session: {e}"))?;
    let mut rest = Vec::new();
    tokio::time::timeout(ATTEMPT_LIMIT, session.read_to_end(&mut rest))
        .await
        .map_err(|_| "session: the rest of the echo never came".to_string())?
        .map_err(|e| format!("session after the withdrawal: {e}"))?;
    let session_ok = &first == b"first half, " && rest == b"second half";
    let drained = tokio::time::timeout(ATTEMPT_LIMIT, withdrawn.drained)
        .await
        .is_ok();
    tl.say(format!(
        "v1's open connection {} after the withdrawal; v1 {}",
        if session_ok {
            "finished cleanly, every byte echoed,"
        } else {
            "got a wrong echo"
        },
        if drained {
            "has no connection left and is gone"
        } else {
            "did not drain"
        }
    ));
    drop(session);

    // Ten more pings on v2, then stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(true);
    let pings = pinger
        .await
        .map_err(|e| format!("the pinger failed: {e}"))?;
    drop(v1);
    drop(v2);

    let sent = pings.len();
    let lost: Vec<&Ping> = pings.iter().filter(|p| p.result.is_err()).collect();
    let order: Vec<Locator> = pings
        .iter()
        .filter_map(|p| p.result.as_ref().ok().map(|r| r.1))
        .collect();
    let changes = order.windows(2).filter(|w| w[0] != w[1]).count();
    let switched_at = pings
        .iter()
        .find(|p| p.result.as_ref().is_ok_and(|r| r.1 == v2_addr))
        .map_or(0, |p| p.seq);
    let first_is_v1 = order.first() == Some(&session_peer);
    let last_is_v2 = order.last() == Some(&v2_addr);
    tl.say(format!(
        "{sent} pings, {} answered, {} lost; instance changed {changes} time(s), v1 → v2 at \
         seq={switched_at}",
        sent - lost.len(),
        lost.len()
    ));
    let detail = format!(
        "{sent} pings, {} lost, v1 → v2 once at seq {switched_at}",
        lost.len()
    );
    let held = lost.is_empty()
        && sent >= 10
        && changes == 1
        && first_is_v1
        && last_is_v2
        && session_ok
        && drained;
    Ok(if held {
        Outcome::pass(STEP_SWAP, detail)
    } else {
        let mut why = vec![detail];
        if let Some(p) = lost.first() {
            why.push(format!(
                "first loss seq {}: {}",
                p.seq,
                p.result.as_ref().err().map_or("", String::as_str)
            ));
        }
        if changes != 1 || !first_is_v1 || !last_is_v2 {
            why.push(format!("{changes} changes"));
        }
        if !session_ok || !drained {
            why.push("open connection did not finish cleanly".into());
        }
        Outcome::fail(STEP_SWAP, why.join("; "))
    })
}

/// One connection attempt of the kill step.
struct Attempt {
    /// When it started, after the kill.
    at: Duration,
    took: Duration,
    result: Result<Locator, String>,
}

/// Step 4: A is SIGKILLed; new connections must land on B within about the lease.
async fn kill(
    tl: &Arc<Timeline>,
    router: &Router,
    client: &Endpoint,
    hop: &NextHop,
    web: &mut Web,
) -> Outcome {
    /// Connection attempts: one every 100 ms for the lease and 1.5 s more.
    const EVERY: Duration = Duration::from_millis(100);
    /// What a connection that needed no retransmitted SYN takes, at most (the SYN's
    /// retransmission timeout is 1 s).
    const FAST: Duration = Duration::from_millis(500);
    tl.say(format!(
        "── step 4: kill instance A with SIGKILL (it cannot unregister); new connections every \
         {} ms",
        EVERY.as_millis()
    ));
    let dead = web.a.addr;
    let survivor = web.b.addr;
    if let Err(e) = web.a.kill() {
        return Outcome::fail(STEP_KILL, e);
    }
    let killed = Instant::now();
    tl.say(format!(
        "instance A ({dead}) killed; the router keeps routing to it until its lease ({:.1} s) \
         runs out",
        LEASE.as_secs_f64()
    ));
    let expiry = async {
        let r = wait_table(router, web.id, dead, false, LEASE * 4).await;
        if r.is_ok() {
            tl.say(format!(
                "router: A's lease ran out {:.2} s after the kill; A left the table",
                killed.elapsed().as_secs_f64()
            ));
        }
        r.map(|_| killed.elapsed())
    };
    let n = ((LEASE + Duration::from_millis(1500)).as_millis() / EVERY.as_millis()) as u32;
    let attempts = async {
        let mut tick = tokio::time::interval(EVERY);
        let mut running = Vec::new();
        for i in 0..n {
            tick.tick().await;
            let at = killed.elapsed();
            let client = client.clone();
            let hop = hop.clone();
            let id = web.id;
            let tl = tl.clone();
            running.push(tokio::spawn(async move {
                let payload = format!("attempt {i}");
                let start = Instant::now();
                let result = probe(&client, "web.demo", id, &hop, payload.as_bytes())
                    .await
                    .map(|r| r.1);
                let took = start.elapsed();
                if let Err(e) = &result {
                    tl.say(format!(
                        "connection #{} (started {:.2} s after the kill) FAILED after {:.2} s: {e}",
                        i + 1,
                        at.as_secs_f64(),
                        took.as_secs_f64()
                    ));
                }
                Attempt { at, took, result }
            }));
        }
        let mut done = Vec::new();
        for h in running {
            if let Ok(a) = h.await {
                done.push(a);
            }
        }
        done
    };
    let (expired, attempts) = tokio::join!(expiry, attempts);
    let fast = |a: &Attempt| a.took <= FAST && a.result.as_ref().is_ok_and(|i| *i == survivor);
    let failed = attempts.iter().filter(|a| a.result.is_err()).count();
    let slow = attempts
        .iter()
        .filter(|a| a.result.is_ok() && !fast(a))
        .count();
    let on_dead = attempts
        .iter()
        .filter(|a| a.result.as_ref().is_ok_and(|i| *i == dead))
        .count();
    // The final run of attempts that reached B at the first SYN.
    let tail = attempts.iter().rev().take_while(|a| fast(a)).count();
    let failover = attempts
        .len()
        .checked_sub(tail)
        .and_then(|i| attempts.get(i))
        .map(|a| a.at);
    let lost = attempts.len() != n as usize;
    let delayed: Vec<(usize, &Attempt)> = attempts
        .iter()
        .enumerate()
        .filter(|(_, a)| a.result.is_ok() && !fast(a))
        .collect();
    if !delayed.is_empty() {
        let span = |f: fn(&Attempt) -> Duration| {
            let (lo, hi) = delayed
                .iter()
                .map(|(_, a)| f(a))
                .fold((Duration::MAX, Duration::ZERO), |(lo, hi), d| {
                    (lo.min(d), hi.max(d))
                });
            let (lo, hi) = (
                format!("{:.2}", lo.as_secs_f64()),
                format!("{:.2}", hi.as_secs_f64()),
            );
            if lo == hi {
                format!("{lo} s")
            } else {
                format!("{lo}–{hi} s")
            }
        };
        tl.say(format!(
            "connection{} {} (started {} after the kill) reached B in {}: the first SYN went \
             to the dead A, the retransmitted one was resolved again once A's lease ran out",
            if delayed.len() > 1 { "s" } else { "" },
            delayed
                .iter()
                .map(|(i, _)| format!("#{}", i + 1))
                .collect::<Vec<_>>()
                .join(", "),
            span(|a| a.at),
            span(|a| a.took),
        ));
    }
    if let Some(f) = failover {
        tl.say(format!(
            "from {:.2} s after the kill on, every new connection reached B with its first SYN \
             (all {tail} later ones); before that {slow} were delayed by a SYN retransmission and \
             {failed} failed, of {} attempts",
            f.as_secs_f64(),
            attempts.len()
        ));
    }
    let detail = match failover {
        Some(f) => format!(
            "failover {:.2} s; of {} connections {slow} delayed, {failed} failed",
            f.as_secs_f64(),
            attempts.len()
        ),
        None => format!(
            "no failover: last connections did not reach B at once ({slow} delayed, {failed} \
             failed)"
        ),
    };
    let expired_ok = expired.is_ok();
    if failover.is_some() && tail >= 5 && on_dead == 0 && !lost && expired_ok {
        Outcome::pass(STEP_KILL, detail)
    } else if !expired_ok {
        Outcome::fail(STEP_KILL, format!("{detail}; A never left the table"))
    } else {
        Outcome::fail(STEP_KILL, detail)
    }
}

/// The byte at `offset` of the migration stream: 4-byte little-endian word counters, so a
/// lost, repeated or reordered chunk shows.
fn pattern(offset: usize) -> u8 {
    let word = (offset / 4) as u32;
    word.to_le_bytes()[offset % 4]
}

/// Step 5: a live stream moves to the client's other address.
async fn migrate(tl: &Arc<Timeline>, router: &Router, raddr: Locator) -> Outcome {
    const NAME: &str = "stream.demo";
    tl.say(format!(
        "── step 5: migration: a client streams through an echo instance of {NAME}, and moves \
         to another address mid-stream"
    ));
    match migrate_inner(tl, router, raddr, NAME).await {
        Ok(o) => o,
        Err(e) => {
            tl.say(format!("migration failed: {e}"));
            Outcome::fail(STEP_MIGRATE, e)
        }
    }
}

async fn migrate_inner(
    tl: &Arc<Timeline>,
    router: &Router,
    raddr: Locator,
    name: &'static str,
) -> Result<Outcome, String> {
    /// Chunks of the stream, and their size: 1 MiB in all.
    const CHUNKS: usize = 64;
    const CHUNK: usize = 16 * 1024;
    /// Chunks sent ahead of what came back.
    const WINDOW: usize = 4;
    let id = ServiceId::from_name(name).map_err(|e| format!("bad name {name}: {e}"))?;
    let server =
        LocalInstance::start(loopback(1), raddr, ServicePrefix::exact(id), 0, 1, LEASE).await?;
    tl.label(server.addr, "M");
    wait_table(router, id, server.addr, true, TABLE_LIMIT).await?;
    // Two loopback addresses (any 127/8 address works on Linux); elsewhere, two ports.
    let client = match Endpoint::bind(&[loopback(1), loopback(2)]).await {
        Ok(ep) => ep,
        Err(_) => Endpoint::bind(&[loopback(1), loopback(1)])
            .await
            .map_err(|e| format!("cannot bind the client: {e}"))?,
    };
    let locals = client.local_locators();
    let mut stream = crate::net::connect(&client, name, id, &NextHop::Via(raddr)).await?;
    let from = stream.local_locator().map_err(|e| e.to_string())?;
    let to = locals
        .iter()
        .copied()
        .find(|l| *l != from)
        .ok_or("the client has one address only")?;
    tl.say(format!(
        "client at {from} (also bound to {to}) connected by name to {}; streaming {} KiB \
         in {} KiB chunks, echoed back",
        tl.who(stream.peer_locator().map_err(|e| e.to_string())?),
        CHUNKS * CHUNK / 1024,
        CHUNK / 1024
    ));

    let mut received = 0usize;
    let mut intact = true;
    let mut buf = vec![0u8; 64 * 1024];
    let mut migrated_at = None;
    let mut gap_after = Duration::ZERO;
    let mut last_read = Instant::now();
    let total = CHUNKS * CHUNK;
    let work = async {
        for c in 0..CHUNKS {
            let chunk: Vec<u8> = (c * CHUNK..(c + 1) * CHUNK).map(pattern).collect();
            stream
                .write_all(&chunk)
                .await
                .map_err(|e| format!("writing: {e}"))?;
            if c == CHUNKS / 2 {
                stream
                    .migrate(to)
                    .map_err(|e| format!("migrate to {to}: {e}"))?;
                migrated_at = Some(Instant::now());
                tl.say(format!(
                    "after {} KiB: client moves the live stream {from} → {to} (RSYN)",
                    (c + 1) * CHUNK / 1024
                ));
            }
            while (c + 1) * CHUNK - received > WINDOW * CHUNK {
                let n = stream
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("reading: {e}"))?;
                if n == 0 {
                    return Err("the echo ended early".to_string());
                }
                let gap = last_read.elapsed();
                last_read = Instant::now();
                if migrated_at.is_some() {
                    gap_after = gap_after.max(gap);
                }
                for (i, b) in buf[..n].iter().enumerate() {
                    intact &= *b == pattern(received + i);
                }
                received += n;
            }
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
        stream
            .shutdown()
            .await
            .map_err(|e| format!("closing: {e}"))?;
        loop {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("reading: {e}"))?;
            if n == 0 {
                break;
            }
            gap_after = gap_after.max(last_read.elapsed());
            last_read = Instant::now();
            for (i, b) in buf[..n].iter().enumerate() {
                intact &= received + i < total && *b == pattern(received + i);
            }
            received += n;
        }
        Ok::<(), String>(())
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| format!("the stream stalled after {received} bytes"))??;
    let now_local = stream.local_locator().ok();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.closed()).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let seen: Vec<Locator> = super::lock(&server.peers)
        .first()
        .cloned()
        .unwrap_or_default();
    let instance_saw_move = seen.first() == Some(&from) && seen.last() == Some(&to);
    tl.say(format!(
        "{} of {} bytes echoed back{}; the client now sends from {}; the instance saw its \
         peer as {}",
        received,
        total,
        if intact && received == total {
            ", each once and in order"
        } else {
            ", DAMAGED"
        },
        now_local.map_or_else(|| "?".to_string(), |l| l.to_string()),
        seen.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" → ")
    ));
    let detail = format!(
        "{} KiB intact across {from} → {to}, longest echo gap after the move {}",
        received / 1024,
        ms(gap_after)
    );
    if intact && received == total && now_local == Some(to) && instance_saw_move {
        Ok(Outcome::pass(STEP_MIGRATE, detail))
    } else {
        Ok(Outcome::fail(
            STEP_MIGRATE,
            format!(
                "{detail}; intact {}, client now at {now_local:?}, instance saw {seen:?}",
                intact && received == total
            ),
        ))
    }
}
