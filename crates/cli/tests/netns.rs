//! Two hosts in their own network namespaces, joined by a veth pair: `serval listen --echo` in
//! one, `serval cat` by name in the other, bytes compared end to end.
//!
//! Needs root (CI runs as root). The namespaces, the veth pair and the 10.77.x addresses are
//! created here, used only inside those namespaces, and removed when the test ends, pass or
//! fail. Without root or `ip` (or with `SERVAL_SKIP_NETNS=1`) each test skips with one line;
//! under `CI=true` it fails instead (`serval_testkit::require_netns`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{Guard, Netns, netns_usable, pattern};

#[test]
fn echo_by_name_across_namespaces() {
    if !netns_usable("echo_by_name_across_namespaces") {
        return;
    }
    let n = Netns::new("e", 1);
    let _server = Guard(
        n.spawn(
            &n.a,
            &["listen", "echo.test", "--bind", "10.77.1.1:54324", "--echo"],
        )
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn listener"),
    );
    let data = pattern(8 << 20);
    let start = Instant::now();
    // The listener needs a moment to bind; retry the connect rather than sleep blindly.
    let out = loop {
        let mut cat = n
            .spawn(&n.b, &["cat", "echo.test", "--via", "10.77.1.1:54324"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cat");
        let mut stdin = cat.stdin.take().unwrap();
        let to_send = data.clone();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&to_send);
        });
        let out = cat.wait_with_output().expect("cat output");
        writer.join().unwrap();
        if out.status.success() || start.elapsed() > Duration::from_secs(20) {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        out.status.success(),
        "cat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "echoed bytes differ");
}

#[test]
fn unknown_service_fails_fast_with_a_clear_error() {
    if !netns_usable("unknown_service_fails_fast_with_a_clear_error") {
        return;
    }
    let n = Netns::new("n", 2);
    let _server = Guard(
        n.spawn(
            &n.a,
            &["listen", "echo.test", "--bind", "10.77.2.1:54324", "--echo"],
        )
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn listener"),
    );
    let start = Instant::now();
    let out = loop {
        let out = n
            .spawn(&n.b, &["cat", "other.test", "--via", "10.77.2.1:54324"])
            .stdin(Stdio::null())
            .output()
            .expect("run cat");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        // Until the listener is up the SYN goes unanswered; once it is, the NACK comes back.
        if err.contains("no route") || start.elapsed() > Duration::from_secs(30) {
            break out;
        }
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no route to service"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
