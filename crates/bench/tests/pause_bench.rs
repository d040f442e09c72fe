//! `pause-bench --quick` runs end to end: one small repetition of each peer (a Serval stream
//! moved between namespaces by its migrators, and a TCP connection moved with `TCP_REPAIR`),
//! every byte checked by the bench against its pattern; then again with `--serval-drain`. No
//! timing is asserted: this proves the benchmark still runs and still moves both connections
//! byte-exact.
//!
//! Needs root (network namespaces, `TCP_REPAIR`); elsewhere it skips with one line
//! (`serval_testkit::require_netns`), and fails instead under `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn pause_bench_quick_moves_both_connections_byte_exact() {
    if !serval_testkit::require_netns("pause_bench_quick_moves_both_connections_byte_exact") {
        return;
    }
    // As the library hands over, and with the application draining its send buffer first.
    run_quick(&[]);
    run_quick(&["--serval-drain"]);
}

fn run_quick(extra: &[&str]) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pause-bench"))
        .arg("--quick")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pause-bench");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).map(|_| s)
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).map(|_| s)
    });
    let limit = Duration::from_secs(240);
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pause-bench --quick did not end in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap().unwrap(), err.join().unwrap().unwrap());
    assert!(
        status.success(),
        "pause-bench failed ({status}):\n{out}\n{err}"
    );
    for row in ["| 0 | Serval |", "| 0 | TCP_REPAIR |"] {
        assert!(out.contains(row), "no row {row:?}:\n{out}");
    }
    assert!(out.contains("ratio Serval / TCP_REPAIR"), "{out}");
    assert!(out.contains("bytes exact"), "{out}");
}
