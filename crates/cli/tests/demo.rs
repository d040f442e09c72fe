//! `serval demo`: the whole loopback demo runs, every step holds, and what it prints says so
//! with concrete numbers; no instance it started outlives it, interrupted or not.
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

/// The demo router's address, from its first line.
fn router_address(out: &[String]) -> String {
    let line = line_with(out, "service router listening on ");
    let rest = &line[line.find(" on ").unwrap() + 4..];
    rest.split(' ').next().unwrap().to_string()
}

/// The command lines of the live processes registering with the router at `router`: the
/// demo's child instances (`serval listen … --router ROUTER`), which no other demo shares.
fn instances_of(router: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        // Processes come and go while we look: a vanished one is simply not listed.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let registers_there = args
            .windows(2)
            .any(|w| w[0] == "--router" && w[1] == router);
        if args.iter().any(|a| a == "listen") && registers_there {
            found.push(args.join(" "));
        }
    }
    found
}

/// Waits (a bounded time) until no child instance of the demo whose router was `router` is
/// left.
fn assert_no_instance_left(router: &str) {
    let start = Instant::now();
    loop {
        let left = instances_of(router);
        if left.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the demo left instances running:\n{}",
            left.join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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
        "hot standby takeover",
        "link dies mid-transfer",
    ] {
        let row = out
            .iter()
            .find(|l| l.contains(step) && (l.contains("PASS") || l.contains("FAIL")))
            .unwrap_or_else(|| panic!("no summary row for {step}:\n{text}"));
        assert!(row.contains("PASS"), "{step} did not hold: {row}\n{text}");
    }
    assert!(
        out.iter().any(|l| l.starts_with("all 8 steps held in")),
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

    // 7: the primary is SIGKILLed mid-stream, its standby takes the stream over, and every
    // line is answered once with its number, on the stream the client opened.
    let at = |needle: &str| out.iter().position(|l| l.contains(needle)).unwrap();
    line_with(&out, "P is killed with SIGKILL");
    let took = line_with(&out, "S: took over 1 stream(s) from the primary");
    assert!(took.contains("checkpoints held"), "{took}");
    assert!(at("S: took over") > at("P is killed"), "{text}");
    let done = line_with(&out, "re-bound to S");
    assert!(
        done.contains("2000 lines answered, numbered 1..2000 without a gap or a repeat"),
        "{done}"
    );
    assert!(done.contains("now from S ("), "{done}");
    assert!(done.contains("which ended cleanly"), "{done}");

    // 8: the multipath client joined a second path by itself, lost it mid-transfer when its
    // address went away, and every byte came back once, in order, over the path left.
    let joined = line_with(&out, "joined a second path by itself");
    let second = &joined[joined.find("its paths: 0 ").unwrap()..];
    assert!(second.contains("; "), "one path: {joined}");
    assert!(second.contains(" 127.0.0.2:"), "{joined}");
    let died = line_with(&out, "as if its link died");
    assert!(died.contains("from it had sent"), "{died}");
    let now = line_with(&out, "the client's paths now: 0 ");
    assert!(!now.contains("; "), "the second path is still there: {now}");
    let across = line_with(&out, "bytes came back across the link's death");
    assert!(across.contains("4194304 of 4194304"), "{across}");
    assert!(across.contains("each once and in order"), "{across}");
    assert!(across.contains("longest receive gap after it "), "{across}");
    assert!(
        at("as if its link died") > at("joined a second path"),
        "{text}"
    );

    // Every child instance was killed and reaped before the demo exited.
    assert_no_instance_left(&router_address(&out));
}

#[test]
fn an_interrupted_demo_leaves_no_instance_behind() {
    let mut child = serval()
        .arg("demo")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn serval demo");
    let out = lines(child.stdout.take().unwrap());
    let mut guard = Guard(child);
    let mut got = Vec::new();
    // Step 2 runs while the instances A and B (child processes) serve, seconds before the
    // demo kills A.
    while !got.iter().any(|l: &String| l.contains("── step 2")) {
        got.push(
            out.recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("{e}; the demo said:\n{}", got.join("\n"))),
        );
    }
    let router = router_address(&got);
    assert_eq!(instances_of(&router).len(), 2, "A and B should be running");
    let st = std::process::Command::new("kill")
        .args(["-INT", &guard.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let start = Instant::now();
    let code = loop {
        if let Some(st) = guard.0.try_wait().unwrap() {
            break st.code();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "serval demo did not exit on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(130));
    assert_no_instance_left(&router);
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
