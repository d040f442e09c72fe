//! `serval ping`, end to end on loopback with the real binary: replies from an echo instance,
//! lost probes for a name nobody serves, the instance changing behind a router, and bad flags.
//! Every wait is bounded, and every process is killed when the test ends, pass or fail.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::{Guard, instance, lines, router, serval, wait_line};

/// Runs `cmd` to its end (at most 30 s).
fn output(cmd: Command) -> Output {
    support::output_within(cmd, b"", Duration::from_secs(30))
}

fn ping(args: &[&str]) -> Command {
    let mut cmd = serval();
    cmd.arg("ping")
        .args(args)
        .env_remove("SERVAL_VIA")
        .env_remove("SERVAL_ROUTER");
    cmd
}

#[test]
fn ping_an_echo_instance_by_name() {
    let (_echo, addr) = instance("web.example.com", None, &["--echo"]);
    let o = output(ping(&[
        "web.example.com",
        "--via",
        &addr,
        "-c",
        "3",
        "-i",
        "0.1",
    ]));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3 + 4, "{out}");
    for line in &lines[..3] {
        let prefix = format!("64 bytes from web.example.com via {addr}: seq=");
        assert!(line.starts_with(&prefix), "{line}");
        assert!(line.ends_with(" ms"), "{line}");
        assert!(line.contains(" time="), "{line}");
        assert!(!line.contains("instance changed"), "{line}");
    }
    // Every sequence number once (they may finish out of order).
    let mut seqs: Vec<&str> = lines[..3]
        .iter()
        .map(|l| l.split("seq=").nth(1).unwrap().split(' ').next().unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, ["1", "2", "3"]);
    assert_eq!(lines[3], "--- web.example.com ping statistics ---");
    assert_eq!(lines[4], "3 probes sent, 3 answered, 0% lost");
    let rtt = lines[5]
        .strip_prefix("rtt min/avg/max/mdev = ")
        .and_then(|r| r.strip_suffix(" ms"))
        .unwrap_or_else(|| panic!("{}", lines[5]));
    let v: Vec<f64> = rtt.split('/').map(|x| x.parse().unwrap()).collect();
    assert_eq!(v.len(), 4, "{rtt}");
    assert!(v[0] > 0.0 && v[0] <= v[1] && v[1] <= v[2], "{rtt}");
    assert_eq!(lines[6], format!("instance {addr} answered 3"));

    // The size flag sets the payload (the echo must match it whole).
    let o = output(ping(&[
        "web.example.com",
        "--via",
        &addr,
        "-c",
        "1",
        "-s",
        "100000",
    ]));
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with(&format!(
            "100000 bytes from web.example.com via {addr}: seq=1 "
        )),
        "{out}"
    );
}

#[test]
fn probes_to_a_name_nobody_serves_are_lost() {
    let (_router, r) = router(&[]);
    let o = output(ping(&[
        "nobody.example.com",
        "--router",
        &r,
        "-c",
        "2",
        "-i",
        "0.1",
    ]));
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    for line in &lines[..2] {
        assert!(line.starts_with("seq="), "{line}");
        assert!(
            line.contains(": no route to service nobody.example.com"),
            "{line}"
        );
    }
    assert_eq!(lines[2], "--- nobody.example.com ping statistics ---");
    assert_eq!(lines[3], "2 probes sent, 0 answered, 100% lost");

    // Nothing answers at all: each probe times out after -W.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let o = output(ping(&[
        "web.example.com",
        "--via",
        &addr,
        "-c",
        "2",
        "-i",
        "0.1",
        "-W",
        "0.3",
    ]));
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        out.lines()
            .filter(|l| l.ends_with(": no answer within 0.3 s"))
            .count(),
        2,
        "{out}"
    );
    assert!(
        out.contains("2 probes sent, 0 answered, 100% lost"),
        "{out}"
    );
}

#[test]
fn the_instance_changing_behind_a_router_shows() {
    let (_router, r) = router(&[]);
    // Only the highest priority gets connections: everything goes to `a` while it serves.
    let (a, a_addr) = instance("web.example.com", Some(&r), &["--echo", "--priority", "1"]);
    let (_b, b_addr) = instance("web.example.com", Some(&r), &["--echo"]);
    let mut child = ping(&["web.example.com", "--router", &r, "-i", "0.05", "-W", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = lines(child.stdout.take().unwrap());
    let pid = child.id();
    let mut ping = Guard(child);
    let first = wait_line(&out, "a reply", |l| l.contains(" bytes from "));
    assert!(first.contains(&format!("via {a_addr}: seq=")), "{first}");

    // Stop `a` (it unregisters on SIGTERM): the next replies come from `b`, flagged once.
    let st = Command::new("kill")
        .args(["-TERM", &a.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let changed = wait_line(&out, "a reply from b", |l| {
        l.contains(&format!("via {b_addr}"))
    });
    assert!(changed.ends_with(" (instance changed)"), "{changed}");
    let next = wait_line(&out, "another reply", |l| l.contains(" bytes from "));
    assert!(next.contains(&format!("via {b_addr}")), "{next}");
    assert!(!next.contains("instance changed"), "{next}");
    drop(a);

    // SIGTERM ends the run with the summary, which counts both instances.
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    wait_line(&out, "summary", |l| {
        l == "--- web.example.com ping statistics ---"
    });
    let sent = wait_line(&out, "counts", |l| l.contains("probes sent"));
    assert!(sent.contains(" answered, "), "{sent}");
    let _rtt = wait_line(&out, "rtt line", |l| l.starts_with("rtt "));
    let ia = wait_line(&out, "instance a", |l| l.starts_with("instance "));
    assert!(
        ia.starts_with(&format!("instance {a_addr} answered ")),
        "{ia}"
    );
    let ib = wait_line(&out, "instance b", |l| l.starts_with("instance "));
    assert!(
        ib.starts_with(&format!("instance {b_addr} answered ")),
        "{ib}"
    );
    // It exits by itself after the summary.
    for _ in 0..200 {
        if ping.0.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("ping did not exit after SIGTERM");
}

#[test]
fn bad_ping_flags_are_one_line_and_exit_2() {
    for args in [
        &["web.example.com", "--via", "127.0.0.1:1", "-c", "0"][..],
        &["web.example.com", "--via", "127.0.0.1:1", "-i", "-1"],
        &["web.example.com", "--via", "127.0.0.1:1", "-i", "0"],
        &["web.example.com", "--via", "127.0.0.1:1", "-i", "soon"],
        &["web.example.com", "--via", "127.0.0.1:1", "-W", "0"],
        &["web.example.com", "--via", "127.0.0.1:1", "-s", "-5"],
        &[
            "web.example.com",
            "--via",
            "127.0.0.1:1",
            "-s",
            "99999999999",
        ],
        &["bad..name", "--via", "127.0.0.1:1"],
        &["web.example.com"],
    ] {
        let o = output(ping(args));
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(o.stdout.is_empty(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
}
