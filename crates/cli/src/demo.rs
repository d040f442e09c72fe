//! `serval demo`: a router, instances and clients on loopback, with a timeline.
//!
//! Eight steps, each judged PASS or FAIL from what actually happened:
//!
//! 1. connect by name: one connection to `web.demo` through the router;
//! 2. weighted spread: many connections over two instances of weights 3 and 1;
//! 3. swap under a stable name: `api.demo` pinged by name every 50 ms while a new instance
//!    (v2, higher priority) takes over and the old one (v1) withdraws gracefully — no ping may
//!    be lost, and v1's open connection must finish;
//! 4. kill and failover: instance A (a child process) is SIGKILLed, so it cannot unregister;
//!    new connections must land on B once its lease runs out;
//! 5. migration: a live stream moves from 127.0.0.1 to 127.0.0.2 mid-transfer; every byte must
//!    come back once, in order;
//! 6. stateful server move: a stream to the line-numbering service moves to another instance
//!    with its count (`demo/server_move.rs`); the numbering must continue, not restart;
//! 7. hot standby takeover: the primary P of the line-numbering service is SIGKILLed
//!    mid-stream and its hot standby S takes the stream over (`demo/standby.rs`); the client
//!    must not reconnect, and no line may be lost or answered twice;
//! 8. link dies mid-transfer: a multipath client bound to 127.0.0.1 and 127.0.0.2 loses
//!    127.0.0.2 in the middle of a transfer (`demo/multipath.rs`); the path from it goes, its
//!    data moves to the other path, and every byte must come back once, in order.
//!
//! The router, v1, v2, the migration instance, S1/S2 and the echo instance of step 8 run in
//! this process; A and B (`serval listen --echo`), P and S (`serval listen --number`) are
//! child processes of this same binary, killed when the demo ends, passes, fails or is
//! interrupted (and, should the demo itself be killed, by the kernel: `--exit-with-parent`).

mod instances;
mod multipath;
mod server_move;
mod standby;
mod steps;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serval::Locator;

/// Flags of `serval demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Print only the summary table, not the timeline.
    #[arg(long, conflicts_with = "json")]
    pub quiet: bool,
    /// Print the timeline and the results as one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Exit status when interrupted (as a shell reports SIGINT).
const EXIT_INTERRUPTED: u8 = 130;

/// Runs `serval demo`: exit 0 only if every step held.
pub fn run(args: DemoArgs) -> ExitCode {
    let Some(rt) = crate::runtime() else {
        return ExitCode::FAILURE;
    };
    let timeline = Arc::new(Timeline::new(!args.quiet && !args.json));
    let outcomes = rt.block_on(async {
        // Dropping the demo's future (on a signal) kills its child processes.
        tokio::select! {
            o = steps::all(timeline.clone()) => Some(o),
            () = crate::router::wait_for_stop() => None,
        }
    });
    // Do not wait for background tasks (pings, drains) still running.
    rt.shutdown_timeout(Duration::from_millis(200));
    let Some(outcomes) = outcomes else {
        note!("serval demo: interrupted");
        return ExitCode::from(EXIT_INTERRUPTED);
    };
    let passed = !outcomes.is_empty() && outcomes.iter().all(|o| o.pass);
    let seconds = timeline.elapsed().as_secs_f64();
    if args.json {
        print_json(&timeline, &outcomes, passed, seconds);
    } else {
        print_summary(&outcomes, passed, seconds);
    }
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// How one step ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The step's title.
    pub step: &'static str,
    /// Whether it held.
    pub pass: bool,
    /// The key number, or why it failed.
    pub detail: String,
}

impl Outcome {
    /// A step that held.
    fn pass(step: &'static str, detail: impl Into<String>) -> Outcome {
        Outcome {
            step,
            pass: true,
            detail: detail.into(),
        }
    }

    /// A step that did not hold.
    fn fail(step: &'static str, detail: impl Into<String>) -> Outcome {
        Outcome {
            step,
            pass: false,
            detail: detail.into(),
        }
    }
}

/// The demo's timeline: events printed as they happen (`[ 0.412 s] …`) and kept for `--json`.
#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    print: bool,
    events: Mutex<Vec<(f64, String)>>,
    labels: Mutex<HashMap<Locator, String>>,
}

impl Timeline {
    fn new(print: bool) -> Timeline {
        Timeline {
            start: Instant::now(),
            print,
            events: Mutex::new(Vec::new()),
            labels: Mutex::new(HashMap::new()),
        }
    }

    /// Time since the demo started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Records (and unless quiet, prints) one event.
    pub fn say(&self, what: impl Into<String>) {
        let what = what.into();
        let t = self.elapsed().as_secs_f64();
        if self.print {
            println!("[{t:6.3} s] {what}");
        }
        lock(&self.events).push((t, what));
    }

    /// Names a locator (an instance) for the rest of the timeline.
    pub fn label(&self, loc: Locator, name: &str) {
        lock(&self.labels).insert(loc, name.to_string());
    }

    /// `NAME (ADDR)` for a labelled locator, else the address.
    pub fn who(&self, loc: Locator) -> String {
        match lock(&self.labels).get(&loc) {
            Some(name) => format!("{name} ({loc})"),
            None => loc.to_string(),
        }
    }

    /// The label of a locator, else its address.
    pub fn short(&self, loc: Locator) -> String {
        lock(&self.labels)
            .get(&loc)
            .cloned()
            .unwrap_or_else(|| loc.to_string())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Prints the summary table.
fn print_summary(outcomes: &[Outcome], passed: bool, seconds: f64) {
    let width = outcomes
        .iter()
        .map(|o| o.step.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    println!();
    println!("  #  {:<width$}  result  key number", "step");
    println!("  -  {:-<width$}  ------  ----------", "");
    for (i, o) in outcomes.iter().enumerate() {
        println!(
            "  {}  {:<width$}  {:<6}  {}",
            i + 1,
            o.step,
            if o.pass { "PASS" } else { "FAIL" },
            o.detail
        );
    }
    println!();
    let held = outcomes.iter().filter(|o| o.pass).count();
    if passed {
        println!("all {} steps held in {seconds:.1} s", outcomes.len());
    } else {
        println!(
            "{held} of {} steps held ({seconds:.1} s): see FAIL above",
            outcomes.len()
        );
    }
}

/// Prints everything as one JSON document.
fn print_json(timeline: &Timeline, outcomes: &[Outcome], passed: bool, seconds: f64) {
    let events: Vec<serde_json::Value> = lock(&timeline.events)
        .iter()
        .map(|(t, e)| serde_json::json!({ "t": t, "event": e }))
        .collect();
    let steps: Vec<serde_json::Value> = outcomes
        .iter()
        .map(|o| serde_json::json!({ "step": o.step, "pass": o.pass, "detail": o.detail }))
        .collect();
    let doc = serde_json::json!({
        "passed": passed,
        "seconds": seconds,
        "steps": steps,
        "timeline": events,
    });
    println!("{doc:#}");
}

/// A loopback address with port 0.
fn loopback(last: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, last], 0))
}
