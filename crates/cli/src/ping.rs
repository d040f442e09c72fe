//! `serval ping`: request/response echoes by name.
//!
//! Every probe is a new connection resolved by name, so when the instance behind the name
//! changes (failover, a new weight, a migration of the service), the output shows it.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serval::{Endpoint, Locator, ServiceId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::net::NextHop;

/// Most probes in flight at once; past it, the next probe waits for one to finish.
const MAX_IN_FLIGHT: usize = 256;

/// Largest probe payload accepted by `-s`.
const MAX_SIZE: usize = 16 * 1024 * 1024;

/// Flags of `serval ping`.
#[derive(Debug, clap::Args)]
pub struct PingArgs {
    /// The service name or hex ID.
    pub service: String,
    #[command(flatten)]
    pub hop: crate::net::HopArgs,
    /// Stop after COUNT probes (default: until interrupted).
    #[arg(short = 'c', long = "count", value_name = "COUNT")]
    pub count: Option<u64>,
    /// Seconds between probes (a fraction is fine); a slow probe does not delay the next.
    #[arg(
        short = 'i',
        long = "interval",
        value_name = "SECONDS",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    pub interval: f64,
    /// Bytes each probe sends and expects echoed back.
    #[arg(short = 's', long = "size", value_name = "SIZE", default_value_t = 64)]
    pub size: usize,
    /// Seconds to wait for each probe's whole echo, from its SYN.
    #[arg(
        short = 'W',
        long = "timeout",
        value_name = "TIMEOUT",
        default_value_t = 2.0,
        allow_negative_numbers = true
    )]
    pub timeout: f64,
}

/// What `serval ping` was asked to do, checked.
struct Plan {
    name: String,
    service: ServiceId,
    count: Option<u64>,
    interval: Duration,
    size: usize,
    timeout: Duration,
    locals: crate::net::Locals,
    endpoint: serval::EndpointConfig,
    follow: serval::FollowHost,
}

/// Runs `serval ping`: exit status 0 if every probe answered, 1 if any was lost (or the
/// client could not start), 2 for bad input.
pub fn run(args: PingArgs) -> ExitCode {
    let plan = match check(&args) {
        Ok(p) => p,
        Err(e) => return crate::usage(&e),
    };
    let hop = args.hop.next_hop();
    let Some(rt) = crate::runtime() else {
        return ExitCode::FAILURE;
    };
    match rt.block_on(ping(plan, hop)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            note!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Checks the flags; an error is one line for [`crate::usage`].
fn check(args: &PingArgs) -> Result<Plan, String> {
    let service = ServiceId::parse(&args.service).map_err(|e| e.to_string())?;
    if args.count == Some(0) {
        return Err("-c COUNT must be at least 1".into());
    }
    let interval = seconds(args.interval)
        .filter(|d| *d >= Duration::from_millis(1))
        .ok_or_else(|| format!("-i SECONDS must be at least 0.001 (got {})", args.interval))?;
    let timeout = seconds(args.timeout)
        .filter(|d| *d >= Duration::from_millis(1))
        .ok_or_else(|| format!("-W TIMEOUT must be at least 0.001 (got {})", args.timeout))?;
    if args.size > MAX_SIZE {
        return Err(format!(
            "-s SIZE must be at most {MAX_SIZE} bytes (got {})",
            args.size
        ));
    }
    Ok(Plan {
        name: args.service.clone(),
        service,
        count: args.count,
        interval,
        size: args.size,
        timeout,
        locals: args.hop.locals()?,
        endpoint: args.hop.endpoint_config(),
        follow: args.hop.follow(),
    })
}

/// `s` seconds as a duration, if finite, not negative and not absurdly large.
fn seconds(s: f64) -> Option<Duration> {
    if s.is_finite() && (0.0..=1e9).contains(&s) {
        Duration::try_from_secs_f64(s).ok()
    } else {
        None
    }
}

/// The outcome of one probe.
struct Outcome {
    seq: u64,
    result: Result<(Duration, Locator), String>,
}

/// What the summary needs.
#[derive(Default)]
struct Tally {
    sent: u64,
    rtts: Vec<Duration>,
    /// Instances in the order they first answered, with their answer counts.
    instances: Vec<(Locator, u64)>,
    last_instance: Option<Locator>,
}

impl Tally {
    /// Prints one probe's line and counts it.
    fn record(&mut self, name: &str, size: usize, o: Outcome) {
        self.sent += 1;
        let line = match o.result {
            Ok((rtt, instance)) => {
                self.rtts.push(rtt);
                match self.instances.iter_mut().find(|(l, _)| *l == instance) {
                    Some((_, n)) => *n += 1,
                    None => self.instances.push((instance, 1)),
                }
                let changed = self.last_instance.is_some_and(|l| l != instance);
                self.last_instance = Some(instance);
                format!(
                    "{size} bytes from {name} via {instance}: seq={} time={} ms{}",
                    o.seq,
                    ms(rtt),
                    if changed { " (instance changed)" } else { "" }
                )
            }
            Err(e) => format!("seq={}: {e}", o.seq),
        };
        println!("{line}");
        let _ = std::io::stdout().flush();
    }

    /// Prints the summary; returns whether every probe answered.
    fn summary(&self, name: &str) -> bool {
        let answered = self.rtts.len() as u64;
        println!("--- {name} ping statistics ---");
        println!(
            "{} probes sent, {answered} answered, {}% lost",
            self.sent,
            loss_percent(self.sent, answered)
        );
        if let Some(s) = rtt_stats(&self.rtts) {
            println!(
                "rtt min/avg/max/mdev = {:.3}/{:.3}/{:.3}/{:.3} ms",
                s.min, s.avg, s.max, s.mdev
            );
        }
        for (instance, n) in &self.instances {
            println!("instance {instance} answered {n}");
        }
        let _ = std::io::stdout().flush();
        self.sent > 0 && answered == self.sent
    }
}

/// Sends the probes on schedule, prints each outcome as it comes and the summary at the end
/// (after COUNT probes or on SIGINT/SIGTERM). Returns whether every probe answered.
async fn ping(plan: Plan, hop: NextHop) -> Result<bool, String> {
    let ep = crate::net::client(&hop, &plan.locals, plan.endpoint.clone(), plan.follow).await?;
    let hop = Arc::new(hop);
    let name: Arc<str> = plan.name.as_str().into();
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks: JoinSet<Outcome> = JoinSet::new();
    let mut tally = Tally::default();
    let mut ticks = tokio::time::interval(plan.interval);
    // A late tick (only when MAX_IN_FLIGHT probes are pending) shifts the schedule rather
    // than sending a burst.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = crate::router::wait_for_stop();
    tokio::pin!(stop);
    let mut seq = 0u64;
    let mut sending = true;
    loop {
        if plan.count.is_some_and(|c| seq >= c) {
            sending = false;
        }
        if !sending && tasks.is_empty() {
            break;
        }
        tokio::select! {
            _ = ticks.tick(), if sending => {
                let permit = tokio::select! {
                    p = slots.clone().acquire_owned() => p.map_err(|e| e.to_string())?,
                    () = &mut stop => break,
                };
                seq += 1;
                tasks.spawn(one_probe(
                    ep.clone(),
                    name.clone(),
                    plan.service,
                    hop.clone(),
                    seq,
                    plan.size,
                    plan.timeout,
                    permit,
                ));
            }
            Some(done) = tasks.join_next() => match done {
                Ok(o) => tally.record(&plan.name, plan.size, o),
                Err(e) => return Err(format!("probe task failed: {e}")),
            },
            // Interrupted: probes still in flight are neither answered nor lost; they are
            // left out of the count.
            () = &mut stop => break,
        }
    }
    tasks.abort_all();
    Ok(tally.summary(&plan.name))
}

/// One probe with its payload and time limit.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
async fn one_probe(
    ep: Endpoint,
    name: Arc<str>,
    service: ServiceId,
    hop: Arc<NextHop>,
    seq: u64,
    size: usize,
    timeout: Duration,
    _permit: tokio::sync::OwnedSemaphorePermit,
) -> Outcome {
    let payload = pattern(seq, size);
    let result =
        match tokio::time::timeout(timeout, probe(&ep, &name, service, &hop, &payload)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no answer within {} s",
                trim(timeout.as_secs_f64())
            )),
        };
    Outcome { seq, result }
}

/// A payload that differs from probe to probe, so a stale or foreign echo cannot pass.
fn pattern(seq: u64, size: usize) -> Vec<u8> {
    let seed = seq.to_le_bytes();
    (0..size).map(|i| seed[i % 8] ^ (i % 251) as u8).collect()
}

/// One probe: a new connection to `service` resolved by name through `hop`, `payload` sent
/// and read back whole. Returns the time from the SYN to the last echoed byte, and the
/// locator of the instance that answered.
pub async fn probe(
    ep: &Endpoint,
    name: &str,
    service: ServiceId,
    hop: &NextHop,
    payload: &[u8],
) -> Result<(Duration, Locator), String> {
    let start = Instant::now();
    let mut stream = crate::net::connect(ep, name, service, hop).await?;
    let instance = stream
        .peer_locator()
        .map_err(|e| format!("connection to {name} closed at once: {e}"))?;
    let (mut r, mut w) = stream.split();
    let send = async {
        w.write_all(payload).await?;
        w.shutdown().await
    };
    let mut echoed = Vec::with_capacity(payload.len());
    let receive = r.read_to_end(&mut echoed);
    let (s, r) = tokio::join!(send, receive);
    s.map_err(|e| format!("sending to {instance}: {e}"))?;
    r.map_err(|e| format!("reading from {instance}: {e}"))?;
    if echoed != payload {
        return Err(format!(
            "instance {instance} answered {} bytes that differ from the {} sent (is it an echo?)",
            echoed.len(),
            payload.len()
        ));
    }
    Ok((start.elapsed(), instance))
}

/// Milliseconds with three decimals.
fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// A number of seconds without trailing zeros (`2`, `0.5`).
fn trim(s: f64) -> String {
    let t = format!("{s:.3}");
    t.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// The share of `sent` not `answered`, in percent with at most one decimal; never shown as
/// 0 when something was lost, nor as 100 when something answered.
fn loss_percent(sent: u64, answered: u64) -> String {
    if sent == 0 {
        return "0".into();
    }
    let lost = sent.saturating_sub(answered);
    let mut tenths = (lost * 1000 + sent / 2) / sent;
    if lost > 0 && tenths == 0 {
        tenths = 1;
    }
    if lost < sent && tenths == 1000 {
        tenths = 999;
    }
    if tenths.is_multiple_of(10) {
        format!("{}", tenths / 10)
    } else {
        format!("{}.{}", tenths / 10, tenths % 10)
    }
}

/// Round-trip statistics in milliseconds.
#[derive(Debug, PartialEq)]
struct RttStats {
    min: f64,
    avg: f64,
    max: f64,
    /// Standard deviation, as ping's mdev.
    mdev: f64,
}

fn rtt_stats(rtts: &[Duration]) -> Option<RttStats> {
    if rtts.is_empty() {
        return None;
    }
    let v: Vec<f64> = rtts.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    let n = v.len() as f64;
    let avg = v.iter().sum::<f64>() / n;
    let sq = v.iter().map(|x| x * x).sum::<f64>() / n;
    Some(RttStats {
        min: v.iter().copied().fold(f64::INFINITY, f64::min),
        avg,
        max: v.iter().copied().fold(0.0, f64::max),
        mdev: (sq - avg * avg).max(0.0).sqrt(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_is_rounded_but_never_hides_a_loss_or_an_answer() {
        assert_eq!(loss_percent(5, 5), "0");
        assert_eq!(loss_percent(4, 2), "50");
        assert_eq!(loss_percent(3, 2), "33.3");
        assert_eq!(loss_percent(3, 0), "100");
        assert_eq!(loss_percent(10_000, 9_999), "0.1");
        assert_eq!(loss_percent(10_000, 1), "99.9");
        assert_eq!(loss_percent(0, 0), "0");
    }

    #[test]
    fn rtt_stats_are_those_of_ping() {
        assert_eq!(rtt_stats(&[]), None);
        let s = rtt_stats(&[Duration::from_millis(1), Duration::from_millis(3)]);
        assert_eq!(
            s,
            Some(RttStats {
                min: 1.0,
                avg: 2.0,
                max: 3.0,
                mdev: 1.0
            })
        );
    }

    #[test]
    fn payloads_differ_between_probes() {
        assert_eq!(pattern(1, 64).len(), 64);
        assert_ne!(pattern(1, 64), pattern(2, 64));
        assert!(pattern(7, 0).is_empty());
    }

    #[test]
    fn durations_in_text() {
        assert_eq!(trim(2.0), "2");
        assert_eq!(trim(0.5), "0.5");
        assert_eq!(ms(Duration::from_micros(512)), "0.512");
        assert_eq!(seconds(-1.0), None);
        assert_eq!(seconds(f64::NAN), None);
        assert_eq!(seconds(0.25), Some(Duration::from_millis(250)));
    }
}
