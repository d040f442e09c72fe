//! Step 7 of `serval demo`: the primary of a stateful service is killed mid-stream and its hot
//! standby takes the stream over.
//!
//! `tally.demo` (the line-numbering service of `serval listen --number`) runs as two child
//! processes of this binary holding one key: the primary P, registered with the router, and
//! its hot standby S (`--standby-of`), which holds a copy of each of P's streams and registers
//! only once it took them over. A client connects by name (to P), streams lines and checks each
//! answer's number; halfway, P is SIGKILLed: a crash, after which it sends nothing at all, not
//! even a reset. S hears P fall silent and takes the stream over by RSYN. The client must never
//! reconnect, and the numbering must continue with no line lost or answered twice.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serval::{Endpoint, PrivateKey, ServiceId};
use serval_router::Router;
use serval_router::keys::SystemRandom;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::instances::{ChildInstance, next_numbered, wait_table};
use super::{Outcome, Timeline, loopback};
use crate::net::NextHop;

/// The step's title.
pub const STEP: &str = "hot standby takeover";

const NAME: &str = "tally.demo";
/// Lines the client sends (P is killed after half of them), and how many may be unanswered
/// at once.
const LINES: u64 = 2000;
const WINDOW: u64 = 100;
/// How long S waits without a word from P before taking over (the default of
/// `--standby-detect`).
const DETECT: Duration = serval::DEFAULT_DETECT;
/// How long to wait for an instance to say something, the router's table, the standby's
/// session, and the takeover.
const LIMIT: Duration = Duration::from_secs(10);
/// What P's admin API shows while S holds a copy of its streams.
const ATTACHED: &str = "serval_standby_attached 1";

/// Runs the step.
pub async fn run(
    tl: &Arc<Timeline>,
    router: &Router,
    raddr: serval::Locator,
    lease: Duration,
) -> Outcome {
    tl.say(format!(
        "── step 7: hot standby: the primary of {NAME} (it numbers each line) is killed \
         mid-stream; its standby takes the stream over"
    ));
    match inner(tl, router, raddr, lease).await {
        Ok(o) => o,
        Err(e) => {
            tl.say(format!("hot standby failed: {e}"));
            Outcome::fail(STEP, e)
        }
    }
}

/// The admin address in `serval listen`'s line `serval: admin API on http://ADDR…`.
fn admin_address(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once("admin API on http://")?;
    rest.split(' ').next()?.parse().ok()
}

/// Starts `serval listen NAME --number` with the key in `pem` (given on its stdin, so that it
/// is never on disk) and an admin API on a port of the system's choosing; as the standby of
/// the instance at `primary` if given. Returns it with its admin address.
async fn instance(
    raddr: serval::Locator,
    lease: Duration,
    pem: &str,
    primary: Option<SocketAddr>,
) -> Result<(ChildInstance, SocketAddr), String> {
    let (router, lease) = (raddr.to_string(), lease.as_millis().to_string());
    let mut args = vec![
        "listen",
        NAME,
        "--number",
        "--bind",
        "127.0.0.1:0",
        "--router",
        &router,
        "--lease-ms",
        &lease,
        "--admin",
        "127.0.0.1:0",
        "--key",
        "/dev/stdin",
    ];
    let (of, detect) = (
        primary.map(|p| p.to_string()).unwrap_or_default(),
        DETECT.as_millis().to_string(),
    );
    if primary.is_some() {
        args.extend(["--standby-of", &of, "--standby-detect", &detect]);
    }
    let mut child = ChildInstance::start(NAME, &args, Some(pem.as_bytes())).await?;
    let line = child
        .wait_line("its admin address", |l| admin_address(l).is_some(), LIMIT)
        .await?;
    let admin = admin_address(&line).ok_or("no admin address")?;
    if primary.is_some() {
        child
            .wait_line("that it stands by", |l| l.contains("hot standby of"), LIMIT)
            .await
            .map_err(|e| format!("the standby {e}"))?;
    }
    Ok((child, admin))
}

/// Waits until the instance with admin address `admin` has its standby attached.
async fn wait_attached(admin: SocketAddr) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let metrics =
            tokio::task::spawn_blocking(move || serval_admin::Client::new(admin).metrics())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        if metrics.lines().any(|l| l == ATTACHED) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > LIMIT {
            return Err(format!(
                "the standby did not attach to P within {:.0} s",
                LIMIT.as_secs_f64()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn is_takeover(line: &str) -> bool {
    line.contains("took over")
}

async fn inner(
    tl: &Arc<Timeline>,
    router: &Router,
    raddr: serval::Locator,
    lease: Duration,
) -> Result<Outcome, String> {
    let key = PrivateKey::generate(&SystemRandom::new()).map_err(|e| e.to_string())?;
    let pem = key.to_pem();
    let id = ServiceId::from_name(NAME).map_err(|e| e.to_string())?;
    // Dropping either (any error below, or the demo interrupted) kills it.
    let (mut p, p_admin) = instance(raddr, lease, &pem, None).await?;
    tl.label(p.addr, "P");
    wait_table(router, id, p.addr, true, LIMIT).await?;
    // S only now, so that it stands by for as short a time as it can before the kill: on a
    // loaded machine, a standby starved of the CPU for its detection time takes over a live
    // primary (which then lets its streams go: nothing is lost, but the step would not show
    // a crash).
    let (mut s, _) = instance(raddr, lease, &pem, Some(p_admin)).await?;
    tl.label(s.addr, "S");
    wait_attached(p_admin).await?;
    tl.say(format!(
        "two `serval listen --number` processes: the primary {} registered {NAME}; its hot \
         standby {} holds a copy of each of its streams (P sends a client nothing before S \
         confirmed the state behind it) and takes them over after {} ms of silence",
        tl.who(p.addr),
        tl.who(s.addr),
        DETECT.as_millis()
    ));

    let client = Endpoint::bind(&[loopback(1)])
        .await
        .map_err(|e| format!("cannot bind the client: {e}"))?;
    let stream = crate::net::connect(&client, NAME, id, &NextHop::Via(raddr)).await?;
    let first_peer = stream.peer_locator().map_err(|e| e.to_string())?;
    tl.say(format!(
        "client connected by name to {}; sending {LINES} lines, each answered with its number",
        tl.who(first_peer)
    ));
    let mut r = BufReader::new(&stream);
    let mut line = String::new();
    let mut answered = 0u64;
    // When P was killed, and whether S had taken over already then.
    let mut killed: Option<(Instant, bool)> = None;
    // The first answer after the stream re-bound to S: how long after the kill, and its number.
    let mut from_s: Option<(Duration, u64)> = None;
    let s_addr = s.addr;
    let mut gap = Duration::ZERO;
    let mut last = Instant::now();
    let work = async {
        for i in 0..LINES {
            (&stream)
                .write_all(format!("line {i}\n").as_bytes())
                .await
                .map_err(|e| format!("writing: {e}"))?;
            if i == LINES / 2 {
                let early = s.said(is_takeover).is_some();
                p.kill()?;
                killed = Some((Instant::now(), early));
                tl.say(format!(
                    "at line {} ({answered} answered) P is killed with SIGKILL: it sends \
                     nothing more, not even a reset",
                    i + 1
                ));
            }
            while i + 1 - answered > WINDOW || (i + 1 == LINES && answered < LINES) {
                next_numbered(&mut r, &mut line, answered).await?;
                if let Some((at, _)) = killed {
                    gap = gap.max(last.elapsed());
                    // The stream re-binds to S (its RSYN) before S sends anything.
                    if from_s.is_none() && stream.peer_locator().ok() == Some(s_addr) {
                        from_s = Some((at.elapsed(), answered + 1));
                    }
                }
                last = Instant::now();
                answered += 1;
            }
        }
        // The end of the stream, at S: nothing more comes, then its FIN.
        (&stream)
            .shutdown()
            .await
            .map_err(|e| format!("closing: {e}"))?;
        line.clear();
        match r.read_line(&mut line).await {
            Ok(0) => Ok(()),
            Ok(_) => Err(format!("an answer after the last: {line:?}")),
            Err(e) => Err(format!("reading the end of the stream: {e}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(20), work)
        .await
        .map_err(|_| format!("the stream stalled after {answered} answers"))??;
    let (_, early) = killed.ok_or("P was never killed")?;
    let took = s
        .wait_line("that it took over", is_takeover, LIMIT)
        .await
        .map_err(|e| format!("the standby {e}"))?;
    tl.say(format!(
        "S: {}",
        took.strip_prefix("serval: ").unwrap_or(&took)
    ));
    let now_peer = stream.peer_locator().map_err(|e| e.to_string())?;
    let (first_after, first_number) = from_s.ok_or("no answer came after a re-bind to S")?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    tl.say(format!(
        "{answered} lines answered, numbered 1..{answered} without a gap or a repeat; the first \
         answer after the stream re-bound to S (line {first_number}) came {:.1} ms after the \
         kill, the longest time between two answers around it was {:.1} ms; the client kept its \
         one stream, now from {}, which ended cleanly",
        ms(first_after),
        ms(gap),
        tl.who(now_peer)
    ));
    let detail = format!(
        "P killed at line {}, S took over: longest answer gap {:.1} ms, count continued",
        LINES / 2 + 1,
        ms(gap)
    );
    let took_one = took.contains("took over 1 stream(s)");
    Ok(
        if answered == LINES && first_peer == p.addr && now_peer == s.addr && took_one && !early {
            Outcome::pass(STEP, detail)
        } else {
            let mut why = vec![detail];
            if early {
                why.push("S took over before P was killed".into());
            }
            if !took_one {
                why.push(format!("S: {took}"));
            }
            if first_peer != p.addr || now_peer != s.addr {
                why.push(format!(
                    "the client talked to {first_peer}, then {now_peer}"
                ));
            }
            Outcome::fail(STEP, why.join("; "))
        },
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::admin_address;

    #[test]
    fn finds_the_admin_address() {
        let line = "serval: admin API on http://127.0.0.1:40123 (migration agent on \
                    127.0.0.1:5)";
        assert_eq!(
            admin_address(line),
            Some("127.0.0.1:40123".parse().unwrap())
        );
        assert_eq!(
            admin_address("serval: admin API on http://127.0.0.1:9"),
            Some("127.0.0.1:9".parse().unwrap())
        );
        assert_eq!(admin_address("serval: serving tally.demo"), None);
    }
}
