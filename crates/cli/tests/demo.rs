//! `serval demo`: the whole loopback demo runs, every step holds, and what it prints says so
//! with concrete numbers.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{Guard, lines, serval};

/// Runs `serval demo ARGS` (bounded by `limit`) and returns its exit code, stdout lines and
/// how long it took.
fn run_demo(args: &[&str], limit: Duration) -> (Option<i32>, Vec<String>, Duration) {
    let start = Instant::now();
    let mut child = serval()
        .arg("demo")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn serval demo");
    let out = lines(child.stdout.take().unwrap());
    let mut guard = Guard(child);
    let mut got = Vec::new();
    loop {
        let left = limit.saturating_sub(start.elapsed());
        match out.recv_timeout(left) {
            Ok(l) => got.push(l),
            // Stdout closed: the demo is ending.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!(
                    "serval demo still running after {limit:?}; output so far:\n{}",
                    got.join("\n")
                )
            }
        }
    }
    let code = loop {
        if let Some(st) = guard.0.try_wait().unwrap() {
            break st.code();
        }
        assert!(
            start.elapsed() < limit,
            "serval demo did not exit; output:\n{}",
            got.join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, got, start.elapsed())
}

/// The first line containing `needle`.
fn line_with<'a>(out: &'a [String], needle: &str) -> &'a str {
    out.iter()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{}", out.join("\n")))
}

/// The number right before `suffix` in `line` (`"A answered 44,"` → 44 for `" answered"`…).
fn number_after(line: &str, prefix: &str) -> u64 {
    let rest = &line[line
        .find(prefix)
        .unwrap_or_else(|| panic!("{prefix:?} not in {line:?}"))
        + prefix.len()..];
    rest.chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("no number after {prefix:?} in {line:?}"))
}

#[test]
fn demo_runs_every_step_and_every_step_holds() {
    let (code, out, took) = run_demo(&[], Duration::from_secs(60));
    let text = out.join("\n");
    assert_eq!(code, Some(0), "serval demo failed:\n{text}");
    assert!(took < Duration::from_secs(60), "took {took:?}");

    // The summary: one PASS row per step, and the closing line.
    for step in [
        "connect by name",
        "weighted spread",
        "swap under a stable name",
        "kill and failover",
        "migration",
        "stateful server move",
    ] {
        let row = out
            .iter()
            .find(|l| l.contains(step) && (l.contains("PASS") || l.contains("FAIL")))
            .unwrap_or_else(|| panic!("no summary row for {step}:\n{text}"));
        assert!(row.contains("PASS"), "{step} did not hold: {row}\n{text}");
    }
    assert!(
        out.iter().any(|l| l.starts_with("all 6 steps held in")),
        "{text}"
    );

    // Every timeline line has its time stamp.
    let timeline: Vec<&String> = out.iter().filter(|l| l.starts_with("[")).collect();
    assert!(timeline.len() > 15, "{text}");
    assert!(timeline.iter().all(|l| l.contains(" s] ")), "{text}");

    // 1: connected by name, through the router, which forwarded only the SYN.
    let connect = line_with(&out, "connect by name web.demo → instance");
    assert!(connect.contains("forwarded 1 SYN"), "{connect}");

    // 2: both instances got connections, A (weight 3) more than B (weight 1).
    let spread = line_with(&out, "A answered ");
    let a = number_after(spread, "A answered ");
    let b = number_after(spread, "B answered ");
    assert!(a > 0 && b > 0 && a > b, "{spread}");
    assert_eq!(a + b, 60, "{spread}");

    // 3: no ping lost, the instance changed exactly once, v1 → v2, and v1's open connection
    // finished after it withdrew.
    let pings = line_with(&out, " pings, ");
    let sent = number_after(pings, " s] ");
    assert!(sent >= 10, "{pings}");
    assert_eq!(number_after(pings, " pings, "), sent, "{pings}");
    assert!(pings.contains(" answered, 0 lost"), "{pings}");
    assert!(pings.contains("instance changed 1 time(s)"), "{pings}");
    assert_eq!(
        out.iter()
            .filter(|l| l.contains("← instance changed"))
            .count(),
        1,
        "{text}"
    );
    assert!(!text.contains("LOST"), "{text}");
    let drained = line_with(&out, "v1's open connection");
    assert!(drained.contains("finished cleanly"), "{drained}");

    // 4: after the kill, A leaves the table when its lease runs out, and from then on new
    // connections reach B with their first SYN (some before that may have been delayed or
    // failed: the demo counts them).
    line_with(&out, "killed; the router keeps routing to it");
    line_with(&out, "A's lease ran out");
    let failover = line_with(&out, "after the kill on, every new connection reached B");
    assert!(number_after(failover, "(all ") >= 5, "{failover}");

    // 5: every byte came back once, in order, and the instance saw the client move.
    let moved = line_with(&out, " bytes echoed back");
    assert!(moved.contains("1048576 of 1048576"), "{moved}");
    assert!(moved.contains("each once and in order"), "{moved}");
    assert!(moved.contains(" → "), "{moved}");
}

#[test]
fn quiet_and_json_are_exclusive() {
    let st = serval()
        .args(["demo", "--quiet", "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(2));
}
