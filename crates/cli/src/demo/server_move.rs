//! Step 6 of `serval demo`: a live, stateful stream moves to another server instance.
//!
//! Two instances of `count.demo` (the line-numbering service of `serval listen --number`, in
//! this process) share one key and run migration agents. A client connects by name (the
//! router picks S1), streams lines and checks each answer's number; halfway, S1's agent moves
//! the stream to S2; at three quarters the client itself asks for it to go back to S1
//! (`Stream::request_move`, naming S1's agent). The client must never reconnect, and the
//! numbering must continue, not restart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serval::{
    Endpoint, FlowMove, Locator, MigrationConfig, Migrator, PrivateKey, ServiceId, ServicePrefix,
};
use serval_router::Router;
use serval_router::keys::SystemRandom;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::task::JoinHandle;

use super::instances::{lease_config, next_numbered, wait_table};
use super::{Outcome, Timeline, loopback};
use crate::net::NextHop;
use crate::serve::Mode;

/// The step's title.
pub const STEP: &str = "stateful server move";

const NAME: &str = "count.demo";
/// Lines the client sends, and how many may be unanswered at once.
const LINES: u64 = 4000;
const WINDOW: u64 = 200;

/// Where the client's request moved its stream, and how long it took.
type Moved = (Locator, Duration);

struct Server {
    ep: Endpoint,
    agent: Migrator,
}

async fn server(
    key: &PrivateKey,
    router: Option<Locator>,
    lease: Duration,
) -> Result<Server, String> {
    let ep = Endpoint::bind(&[loopback(1)])
        .await
        .map_err(|e| format!("cannot bind an instance: {e}"))?;
    if let Some(r) = router {
        ep.set_router_with(r, lease_config(lease));
    }
    let prefix = ServicePrefix::parse(NAME).map_err(|e| e.to_string())?;
    let mut listener = ep
        .listen(prefix)
        .map_err(|e| format!("cannot listen: {e}"))?;
    tokio::spawn(async move {
        while let Ok(s) = listener.accept().await {
            tokio::spawn(crate::serve::serve(s, Mode::Number));
        }
    });
    let agent = Migrator::start(
        &ep,
        MigrationConfig {
            key: key.clone(),
            allowed: Vec::new(),
            bind: loopback(1),
            refuse_moves_in: None,
        },
    )
    .await
    .map_err(|e| format!("cannot start a migration agent: {e}"))?;
    Ok(Server { ep, agent })
}

/// An instance's flows, for a failure's message: flowID, peer, state and bytes received.
fn held(ep: &Endpoint) -> String {
    let flows: Vec<String> = ep
        .flows()
        .iter()
        .map(|f| {
            format!(
                "{} from {} {:?}{} ({} B in)",
                f.local_flow,
                f.peer,
                f.state,
                if f.exported { " exported" } else { "" },
                f.stats.stream_bytes_received
            )
        })
        .collect();
    if flows.is_empty() {
        "no flow".into()
    } else {
        flows.join(", ")
    }
}

/// Runs the step.
pub async fn run(tl: &Arc<Timeline>, router: &Router, raddr: Locator, lease: Duration) -> Outcome {
    tl.say(format!(
        "── step 6: stateful server move: a stream to {NAME} (it numbers each line) moves to \
         another instance mid-stream, then back at the client's request"
    ));
    match inner(tl, router, raddr, lease).await {
        Ok(o) => o,
        Err(e) => {
            tl.say(format!("server move failed: {e}"));
            Outcome::fail(STEP, e)
        }
    }
}

async fn inner(
    tl: &Arc<Timeline>,
    router: &Router,
    raddr: Locator,
    lease: Duration,
) -> Result<Outcome, String> {
    let key = PrivateKey::generate(&SystemRandom::new()).map_err(|e| e.to_string())?;
    let id = ServiceId::from_name(NAME).map_err(|e| e.to_string())?;
    // S1 registers with the router; S2 only takes moved streams.
    let s1 = server(&key, Some(raddr), lease).await?;
    let s2 = server(&key, None, lease).await?;
    let (a1, a2) = (s1.ep.local_locators()[0], s2.ep.local_locators()[0]);
    tl.label(a1, "S1");
    tl.label(a2, "S2");
    wait_table(router, id, a1, true, Duration::from_secs(5)).await?;
    let client = Endpoint::bind(&[loopback(1)])
        .await
        .map_err(|e| format!("cannot bind the client: {e}"))?;
    let stream = crate::net::connect(&client, NAME, id, &NextHop::Via(raddr)).await?;
    let first_peer = stream.peer_locator().map_err(|e| e.to_string())?;
    let client_at = stream.local_locator().ok();
    tl.say(format!(
        "client connected by name to {}; sending {LINES} lines, each answered with its number",
        tl.who(first_peer)
    ));
    let stream = Arc::new(stream);
    let mut w = &*stream;
    let mut r = BufReader::new(&*stream);
    let mut line = String::new();
    let mut answered = 0u64;
    // The move's task, and how many lines were answered when it started.
    let mut moving: Option<(u64, JoinHandle<std::io::Result<Vec<FlowMove>>>)> = None;
    let mut moved_at: Option<Instant> = None;
    // The client's own request to move back to S1, and when it started.
    let mut asking: Option<(u64, JoinHandle<std::io::Result<Moved>>)> = None;
    let back_to = s1.agent.locator();
    let mut gap_after = Duration::ZERO;
    let mut last = Instant::now();
    let work = async {
        for i in 0..LINES {
            if i + 1 == LINES {
                // A client this fast can end the stream before S1's agent even asked for it
                // (about once in 40 release runs), leaving nothing to move: the last line
                // waits until the stream is frozen for the move, or the move ended.
                let start = Instant::now();
                while (!s1.agent.movable_flows().is_empty()
                    && !moving.as_ref().is_some_and(|(_, t)| t.is_finished()))
                    || asking.as_ref().is_some_and(|(_, t)| !t.is_finished())
                {
                    if start.elapsed() > Duration::from_secs(10) {
                        return Err("S1's agent never asked for the stream".into());
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            w.write_all(format!("line {i}\n").as_bytes())
                .await
                .map_err(|e| format!("writing: {e}"))?;
            if i == LINES / 2 {
                // The move runs beside the client, which keeps writing and reading.
                let (from, to, key) = (s1.agent.clone(), s2.agent.locator(), s2.agent.public_key());
                moving = Some((
                    answered,
                    tokio::spawn(async move { from.move_flows(&[], to, key).await }),
                ));
                moved_at = Some(Instant::now());
            }
            if i >= LINES * 3 / 4
                && asking.is_none()
                && moving.as_ref().is_some_and(|(_, t)| t.is_finished())
            {
                // The client's choice now: back to S1, named by its migration agent.
                let s = stream.clone();
                asking = Some((
                    answered,
                    tokio::spawn(async move {
                        let asked = Instant::now();
                        let at = s.request_move(back_to).await?;
                        Ok((at, asked.elapsed()))
                    }),
                ));
            }
            while i + 1 - answered > WINDOW || (i + 1 == LINES && answered < LINES) {
                next_numbered(&mut r, &mut line, answered).await?;
                if moved_at.is_some() {
                    gap_after = gap_after.max(last.elapsed());
                }
                last = Instant::now();
                answered += 1;
            }
        }
        w.shutdown().await.map_err(|e| format!("closing: {e}"))?;
        Ok::<(), String>(())
    };
    tokio::time::timeout(Duration::from_secs(20), work)
        .await
        .map_err(|_| format!("the stream stalled after {answered} answers"))??;
    let (answered_then, task) = moving.ok_or("no move happened")?;
    let moved = task
        .await
        .map_err(|e| format!("the move task failed: {e}"))?
        .map_err(|e| format!("the move failed: {e}"))?;
    let phases = moved
        .first()
        .ok_or("S1 had no flow to move")?
        .result
        .clone()
        .map_err(|e| {
            format!(
                "the move failed: {e} (S1 held {}; the client is at {})",
                held(&s1.ep),
                client_at.map_or_else(|| "?".to_string(), |l| l.to_string())
            )
        })?;
    tl.say(format!(
        "at line {} ({answered_then} answered) S1 handed the stream and its count to S2: frozen \
         {:.2} ms (hand-over {:.2}, transfer {:.2}, import {:.2}, re-bind {:.2} ms)",
        LINES / 2 + 1,
        phases.frozen.as_secs_f64() * 1e3,
        phases.handover.as_secs_f64() * 1e3,
        phases.transfer.as_secs_f64() * 1e3,
        phases.import.as_secs_f64() * 1e3,
        phases.rebind.as_secs_f64() * 1e3,
    ));
    let (asked_then, asked) = asking.ok_or("the client never asked to move back")?;
    let (back, took) = asked
        .await
        .map_err(|e| format!("the client's move task failed: {e}"))?
        .map_err(|e| format!("the client's move back to S1 failed: {e}"))?;
    tl.say(format!(
        "at {asked_then} answered the client asked for the stream to go back to S1 (naming S1's \
         migration agent): it runs at {} again, {:.2} ms after the request",
        tl.who(back),
        took.as_secs_f64() * 1e3
    ));
    let s1_holds = s1.ep.flows().iter().any(|f| f.moves == 2);
    let s2_empty = s2.agent.movable_flows().is_empty();
    tl.say(format!(
        "{answered} lines answered, numbered 1..{answered} without a break; S1 holds the flow \
         after two moves ({}), S2 none ({})",
        if s1_holds { "yes" } else { "NO" },
        if s2_empty { "yes" } else { "NO" }
    ));
    let detail = format!(
        "S1 → S2 frozen {:.2} ms, longest answer gap after it {:.2} ms, back to S1 at the \
         client's request, count continued",
        phases.frozen.as_secs_f64() * 1e3,
        gap_after.as_secs_f64() * 1e3
    );
    Ok(if answered == LINES && s1_holds && s2_empty && back == a1 {
        Outcome::pass(STEP, detail)
    } else {
        Outcome::fail(STEP, detail)
    })
}
