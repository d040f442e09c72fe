//! The orchestrator's swap, across hosts: a stable name whose instance is replaced underneath
//! while a client pings it by name, with no ping lost. Each host is a network namespace with a
//! veth to one bridge (a LAN, 10.81.0.0/24): a router, a client, and instances v1 and v2.
//!
//! The swap is what a rolling deployment does: start v2 (at a higher priority, so it takes
//! new connections as soon as it registers), wait until it answers, then stop v1 with SIGTERM:
//! `serval listen` withdraws its registration at once and lets its open connections finish
//! before exiting 0.
//!
//! Needs root (CI runs as root). Everything is created here, used only inside these
//! namespaces, and removed when the test ends, pass or fail. Elsewhere they skip
//! with one line (`serval_testkit::require_netns`); under `CI=true` they fail instead.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::{Guard, Lan, drain, lines, netns_usable, wait_line};

const PORT: u16 = 54324;
const SERVICE: &str = "web.example.com";
/// Pings sent, one every 50 ms.
const PINGS: usize = 120;

/// The address of host `i`, at the serval port.
fn addr(host: usize) -> String {
    format!("10.81.0.{}:{PORT}", host + 1)
}

/// Starts an echo instance of SERVICE on `host` at `priority`; waits until it registered.
/// Returns it and its stderr lines.
fn instance(lan: &Lan, host: usize, priority: u32) -> (Guard, mpsc::Receiver<String>) {
    let (bind, router, prio) = (addr(host), addr(0), priority.to_string());
    let mut child = lan
        .serval(
            host,
            &[
                "listen",
                SERVICE,
                "--echo",
                "--bind",
                &bind,
                "--router",
                &router,
                "--priority",
                &prio,
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn instance");
    let err = lines(child.stderr.take().unwrap());
    let child = Guard(child);
    wait_line(&err, "registration of the instance", |l| {
        l.contains("registered")
    });
    (child, err)
}

/// Waits (at most `limit`) for the child to exit; returns its exit code.
fn wait_exit(child: &mut Guard, what: &str, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            return st.code();
        }
        assert!(
            start.elapsed() < limit,
            "{what} still running after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The instance address in a ping line `64 bytes from NAME via ADDR: seq=K time=X ms`.
fn via(line: &str) -> Option<&str> {
    let rest = &line[line.find(" via ")? + 5..];
    rest.split(':').next()
}

/// The sequence number in a ping line.
fn seq(line: &str) -> Option<usize> {
    let rest = &line[line.find(" seq=")? + 5..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn swapping_the_instance_under_a_name_loses_no_ping() {
    if !netns_usable("swapping_the_instance_under_a_name_loses_no_ping") {
        return;
    }
    // Host 0: router; 1: client; 2: v1; 3: v2.
    let lan = Lan::new("sw", "10.81.0", 4);
    let router_addr = addr(0);
    let mut router = lan
        .serval(0, &["router", "--listen", &router_addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn router");
    let ready = lines(router.stdout.take().unwrap());
    let _router = Guard(router);
    wait_line(&ready, "READY line from serval router", |l| {
        l.starts_with("READY")
    });

    let (mut v1, v1_err) = instance(&lan, 2, 0);

    // A long-lived connection to v1, open across the swap: the drain must let it finish.
    let mut session = lan
        .serval(1, &["cat", SERVICE, "--router", &router_addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cat");
    let mut session_in = session.stdin.take().unwrap();
    let session_out = lines(session.stdout.take().unwrap());
    let session_err = lines(session.stderr.take().unwrap());
    let mut session = Guard(session);
    session_in.write_all(b"before the swap\n").unwrap();
    session_in.flush().unwrap();
    wait_line(&session_out, "echo on the long-lived connection", |l| {
        l == "before the swap"
    });

    // Ping by name every 50 ms throughout.
    let count = PINGS.to_string();
    let mut ping = lan
        .serval(
            1,
            &[
                "ping",
                SERVICE,
                "--router",
                &router_addr,
                "-i",
                "0.05",
                "-c",
                &count,
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ping");
    let ping_out = lines(ping.stdout.take().unwrap());
    let ping_err = lines(ping.stderr.take().unwrap());
    let mut ping = Guard(ping);
    let mut seen = Vec::new();
    let v1_ip = "10.81.0.3";
    let v2_ip = "10.81.0.4";
    // A few pings answered by v1 first.
    while seen
        .iter()
        .filter(|l: &&String| via(l) == Some(v1_ip))
        .count()
        < 5
    {
        seen.push(wait_line(&ping_out, "ping answered by v1", |l| {
            l.contains(" via ")
        }));
    }

    // v2 starts at a higher priority; wait until it answers pings.
    let (mut v2, _v2_err) = instance(&lan, 3, 1);
    loop {
        let l = wait_line(&ping_out, "ping answered by v2", |l| l.contains(" via "));
        let on_v2 = via(&l) == Some(v2_ip);
        seen.push(l);
        if on_v2 {
            break;
        }
    }

    // Stop v1 as an orchestrator does: SIGTERM. It withdraws at once, then drains.
    let st = Command::new("kill")
        .args(["-TERM", &v1.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -TERM v1");
    let withdrawn = wait_line(&v1_err, "v1 withdrawing", |l| l.contains("withdrawn"));
    let sigterm_at = seen.len();
    // Still draining: the long-lived connection is open, and v1 says it waits for it.
    assert!(
        withdrawn.contains("waiting for 1 open connection(s)"),
        "{withdrawn}"
    );
    assert!(
        v1.0.try_wait().unwrap().is_none(),
        "v1 exited with a connection still open: {:?}",
        drain(&v1_err)
    );
    session_in.write_all(b"after the swap\n").unwrap();
    drop(session_in);
    wait_line(&session_out, "echo after the withdrawal", |l| {
        l == "after the swap"
    });
    assert_eq!(
        wait_exit(&mut session, "cat", Duration::from_secs(20)),
        Some(0),
        "the long-lived connection did not end cleanly: {:?}",
        drain(&session_err)
    );
    assert_eq!(
        wait_exit(&mut v1, "v1", Duration::from_secs(20)),
        Some(0),
        "v1 did not exit cleanly: {:?}",
        drain(&v1_err)
    );

    // Let ping finish.
    let code = wait_exit(&mut ping, "ping", Duration::from_secs(60));
    // Stdout is closed now: whatever is left is in the channel.
    seen.extend(drain(&ping_out));
    let err = drain(&ping_err).join("\n");
    let text = seen.join("\n");
    assert_eq!(code, Some(0), "ping lost probes:\n{text}\n{err}");
    let summary = format!("{PINGS} probes sent, {PINGS} answered, 0% lost");
    assert!(
        seen.iter().any(|l| l.contains(&summary)),
        "no {summary:?} in:\n{text}"
    );
    // Probes overlap (one starts every 50 ms whatever the last one does), so replies may
    // print out of order on a busy machine: judge the change in the order the probes left.
    let mut by_seq: Vec<(usize, &str)> = seen
        .iter()
        .filter_map(|l| Some((seq(l)?, via(l)?)))
        .collect();
    by_seq.sort_unstable();
    let seqs: Vec<usize> = by_seq.iter().map(|p| p.0).collect();
    assert_eq!(seqs, (1..=PINGS).collect::<Vec<_>>(), "{text}");
    let answers: Vec<&str> = by_seq.iter().map(|p| p.1).collect();
    assert!(
        answers.contains(&v1_ip) && answers.contains(&v2_ip),
        "{text}"
    );
    let changes = answers.windows(2).filter(|w| w[0] != w[1]).count();
    assert_eq!(
        changes, 1,
        "the answering instance changed {changes} times:\n{text}"
    );
    assert_eq!(answers.first(), Some(&v1_ip), "{text}");
    assert_eq!(answers.last(), Some(&v2_ip), "{text}");
    assert!(
        answers.len() > sigterm_at + 10,
        "too few pings after v1 was stopped:\n{text}"
    );
    v2.0.kill().unwrap();
    let _ = v2.0.wait();
}
