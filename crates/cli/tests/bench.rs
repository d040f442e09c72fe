//! `serval bench`, end to end on loopback with the real binary: throughput and latency
//! against an echo instance (JSON checked), charts in both formats, an instance that does not
//! echo, an unknown name, and bad flags. Every wait is bounded, and every process is killed
//! when the test ends, pass or fail.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::{Guard, instance, lines, router, serval, wait_line};

/// Runs `serval bench ARGS…` to its end (at most 60 s).
fn bench(args: &[&str]) -> Output {
    let mut cmd = serval();
    cmd.arg("bench")
        .args(args)
        .env_remove("SERVAL_VIA")
        .env_remove("SERVAL_ROUTER");
    support::output_within(cmd, b"", Duration::from_secs(60))
}

/// The one JSON object a successful `--json` run prints.
fn json(o: &Output) -> serde_json::Value {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let out = String::from_utf8(o.stdout.clone()).unwrap();
    assert_eq!(out.lines().count(), 1, "{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn f(v: &serde_json::Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn throughput_for_a_second_as_json() {
    let (_echo, addr) = instance("web.example.com", None, &["--echo"]);
    let o = bench(&[
        "web.example.com",
        "--via",
        &addr,
        "--duration",
        "1",
        "--json",
    ]);
    let v = json(&o);
    assert_eq!(v["service"], "web.example.com");
    assert_eq!(v["mode"], "throughput");
    assert_eq!(v["verified"], true);
    let sent = v["bytes_sent"].as_u64().unwrap();
    let echoed = v["bytes_echoed"].as_u64().unwrap();
    assert!(echoed > 0, "{v}");
    assert_eq!(echoed, sent, "everything sent came back");
    let secs = f(&v, "seconds");
    assert!((0.9..10.0).contains(&secs), "{secs}");
    let mbit = f(&v, "mbit_per_s");
    let expect = echoed as f64 * 8.0 / secs / 1e6;
    assert!(
        (mbit - expect).abs() <= expect * 0.01 + 0.01,
        "{mbit} vs {expect}"
    );
    assert_eq!(v["instances"], serde_json::json!([addr]));
    assert_eq!(v["connect_ms"].as_array().unwrap().len(), 1);
    assert!(v.get("latency_ms").is_none(), "{v}");

    // The series covers the run, in order, and adds up to the echoed bytes.
    let series = v["series"].as_array().unwrap();
    assert!(series.len() >= 5, "{} samples", series.len());
    let mut t = 0.0;
    let mut bytes = 0;
    for s in series {
        assert_eq!(f(s, "start_s"), t, "{s}");
        assert!(f(s, "end_s") > t, "{s}");
        t = f(s, "end_s");
        bytes += s["bytes"].as_u64().unwrap();
        assert_eq!(s["instances"], serde_json::json!([addr]), "{s}");
        assert_eq!(s["gap"], s["bytes"] == 0, "{s}");
    }
    assert_eq!(bytes, echoed);
    assert!((t - secs).abs() < 1e-3, "{t} vs {secs}");
    let spread = &v["interval_mbit_per_s"];
    assert!(f(spread, "min") <= f(spread, "median"), "{spread}");
    assert!(f(spread, "median") <= f(spread, "max"), "{spread}");

    // --bytes instead of a duration: exactly that much, split among the connections.
    let o = bench(&[
        "web.example.com",
        "--via",
        &addr,
        "--bytes",
        "3000001",
        "--connections",
        "3",
        "--json",
    ]);
    let v = json(&o);
    assert_eq!(v["bytes_sent"], 3_000_001);
    assert_eq!(v["bytes_echoed"], 3_000_001);
    assert_eq!(v["connections"], 3);
    assert_eq!(v["connect_ms"].as_array().unwrap().len(), 3);
    assert_eq!(v["instances"], serde_json::json!([addr]));
}

#[test]
fn latency_mode_reports_percentiles() {
    let (_echo, addr) = instance("web.example.com", None, &["--echo"]);
    let o = bench(&[
        "web.example.com",
        "--via",
        &addr,
        "--mode",
        "latency",
        "--duration",
        "0.5",
        "--size",
        "100",
        "--json",
    ]);
    let v = json(&o);
    assert_eq!(v["mode"], "latency");
    assert_eq!(v["request_bytes"], 100);
    let trips = v["round_trips"].as_u64().unwrap();
    assert!(trips > 0, "{v}");
    assert_eq!(v["bytes_echoed"].as_u64().unwrap(), trips * 100);
    let l = &v["latency_ms"];
    let (min, p50, p90, p99, max) = (
        f(l, "min"),
        f(l, "p50"),
        f(l, "p90"),
        f(l, "p99"),
        f(l, "max"),
    );
    assert!(
        0.0 < min && min <= p50 && p50 <= p90 && p90 <= p99 && p99 <= max,
        "{l}"
    );
    let series_trips: u64 = v["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["round_trips"].as_u64().unwrap())
        .sum();
    assert_eq!(series_trips, trips);
    assert!(v["connect_ms"][0].as_f64().unwrap() > 0.0, "{v}");
}

#[test]
fn text_summary_and_charts() {
    let (_echo, addr) = instance("web.example.com", None, &["--echo"]);
    let dir = std::env::temp_dir().join(format!("serval-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("x.svg");
    let png = dir.join("x.png");
    let o = bench(&[
        "web.example.com",
        "--via",
        &addr,
        "--duration",
        "0.5",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        format!("serval bench web.example.com: throughput over 1 connection to {addr}")
    );
    assert!(lines[1].starts_with("connect by name: "), "{out}");
    assert!(lines[2].contains(" echoed back and verified, in "), "{out}");
    assert!(lines[2].ends_with("bit/s"), "{out}");
    assert!(lines[3].starts_with("per 100 ms: min "), "{out}");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"), "{}", &text[..text.len().min(100)]);
    assert!(text.contains("time (s)"), "x axis label");
    assert!(text.contains("throughput (Mbit/s)"), "y axis label");

    let o = bench(&[
        "web.example.com",
        "--via",
        &addr,
        "--duration",
        "0.5",
        "--json",
        "--plot",
        png.to_str().unwrap(),
    ]);
    json(&o);
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.len() > 1000, "{} bytes", bytes.len());
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_instance_that_does_not_echo_fails_in_one_line() {
    let (_sink, addr) = instance("sink.example.com", None, &[]);
    for mode in ["throughput", "latency"] {
        let o = bench(&[
            "sink.example.com",
            "--via",
            &addr,
            "--mode",
            mode,
            "--duration",
            "0.3",
        ]);
        assert_eq!(o.status.code(), Some(1), "{mode}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "{mode}: {err}");
        assert!(err.starts_with("error: instance "), "{mode}: {err}");
        assert!(err.contains("is it an echo"), "{mode}: {err}");
        assert!(o.stdout.is_empty(), "{mode}");
    }

    // A name the instance does not serve.
    let o = bench(&["nobody.example.com", "--via", &addr, "--duration", "0.3"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("nobody.example.com"), "{err}");
}

#[test]
fn bad_bench_flags_are_one_line_and_exit_2() {
    let hop = ["web.example.com", "--via", "127.0.0.1:1"];
    for extra in [
        &["--plot", "x.jpg"][..],
        &["--plot", "x"],
        &["--plot", "/no/such/directory/x.svg"],
        &["--duration", "0"],
        &["--duration", "-1"],
        &["--bytes", "0"],
        &["--bytes", "10", "--duration", "1"],
        &["--connections", "0"],
        &["--size", "0"],
        &["--interval-ms", "0"],
        &["--mode", "fast"],
    ] {
        let o = bench(&[&hop[..], extra].concat());
        assert_eq!(o.status.code(), Some(2), "{extra:?}");
        assert!(o.stdout.is_empty(), "{extra:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "{extra:?}: {err}");
    }
}

/// `serval listen NAME --echo` registered with `router`, once registered.
fn registered(router: &str, priority: &str) -> (Guard, String) {
    let mut child = serval()
        .args([
            "listen",
            "web.example.com",
            "--echo",
            "--bind",
            "127.0.0.1:0",
        ])
        .args(["--router", router, "--priority", priority])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn listen");
    let err = lines(child.stderr.take().unwrap());
    let guard = Guard(child);
    let serving = wait_line(&err, "serving line", |l| l.contains("serving"));
    let addr = serving
        .split(" on ")
        .nth(1)
        .and_then(|rest| rest.split([' ', ',']).next())
        .unwrap()
        .to_owned();
    wait_line(&err, "registration", |l| l.contains("registered"));
    (guard, addr)
}

/// Spawns `serval bench ARGS…`, returning it and a receiver for its output.
fn spawn_bench(args: &[&str]) -> (u32, mpsc::Receiver<std::io::Result<Output>>) {
    let child = serval()
        .arg("bench")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bench");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    (pid, rx)
}

fn finish(pid: u32, rx: &mpsc::Receiver<std::io::Result<Output>>) -> Output {
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("serval bench did not finish within 60 s")
        })
        .unwrap()
}

#[test]
fn an_instance_dying_mid_run_fails_in_one_line() {
    let (mut echo, addr) = instance("web.example.com", None, &["--echo"]);
    let (pid, rx) = spawn_bench(&[
        "web.example.com",
        "--via",
        &addr,
        "--duration",
        "20",
        "--stall",
        "0.3",
    ]);
    std::thread::sleep(Duration::from_millis(500));
    echo.0.kill().unwrap();
    let o = finish(pid, &rx);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("error: instance {addr} stopped echoing: ")),
        "{err}"
    );
    assert!(o.stdout.is_empty());
}

#[test]
fn a_failover_with_reconnect_shows_the_gap_and_the_new_instance() {
    let (_router, r) = router(&["--max-ttl-ms", "1000"]);
    // Only the highest priority gets connections: the stream goes to `a` while it serves.
    let (mut a, a_addr) = registered(&r, "1");
    let (_b, b_addr) = registered(&r, "0");
    let (pid, rx) = spawn_bench(&[
        "web.example.com",
        "--router",
        &r,
        "--duration",
        "4.5",
        "--reconnect",
        "--stall",
        "1",
        "--json",
    ]);
    // `a` dies without a word; the router forgets it when its 1-s lease runs out, before the
    // stream counts as failed (1 s without an echo).
    std::thread::sleep(Duration::from_secs(1));
    a.0.kill().unwrap();
    let v = json(&finish(pid, &rx));
    // Once, unless a loaded machine stalled the new stream for a second too.
    assert!(v["reconnects"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["instances"], serde_json::json!([a_addr, b_addr]), "{v}");
    let changes = v["instance_changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{v}");
    assert_eq!(changes[0]["from"], serde_json::json!([a_addr]));
    assert_eq!(changes[0]["to"], serde_json::json!([b_addr]));
    let change_at = f(&changes[0], "at_s");
    // The dip: nothing echoed from about the kill until the new stream (at least --stall).
    let gaps = v["gaps"].as_array().unwrap();
    let dip = gaps
        .iter()
        .max_by(|x, y| {
            let len = |g| f(g, "end_s") - f(g, "start_s");
            len(x).total_cmp(&len(y))
        })
        .unwrap_or_else(|| panic!("no gap: {v}"));
    let (gap_start, gap_end) = (f(dip, "start_s"), f(dip, "end_s"));
    assert!(gap_end - gap_start >= 0.5, "{gaps:?}");
    assert!(gap_start < change_at, "{gap_start} vs {change_at}");
    // Bytes came back before and after it.
    let series = v["series"].as_array().unwrap();
    let before: u64 = series
        .iter()
        .filter(|s| f(s, "end_s") <= gap_start)
        .map(|s| s["bytes"].as_u64().unwrap())
        .sum();
    let after: u64 = series
        .iter()
        .filter(|s| f(s, "start_s") >= gap_end)
        .map(|s| s["bytes"].as_u64().unwrap())
        .sum();
    assert!(before > 0 && after > 0, "{before} {after}");
    assert!(
        series
            .iter()
            .filter(|s| f(s, "start_s") >= change_at)
            .all(|s| s["instances"] == serde_json::json!([b_addr])),
        "{v}"
    );
}
