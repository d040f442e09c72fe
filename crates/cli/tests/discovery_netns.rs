//! Routerless mode across hosts: each host is a network namespace with a veth to one bridge
//! (a LAN, 10.80.0.0/24) and no router anywhere. Instances answer with
//! `serval listen --discover`, clients connect by name with `serval cat --discover`: the SYN is
//! multicast to 239.255.86.76:54323, an instance answers from its own address, the rest of the
//! connection is unicast.
//!
//! Needs root (CI runs as root). Everything is created here, used only inside these
//! namespaces, and removed when the test ends, pass or fail. Elsewhere they skip
//! with one line (`serval_testkit::require_netns`); under `CI=true` they fail instead.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::{Guard, Lan, count_lines, lines, netns_usable, wait_line};

/// `serval listen SERVICE --discover` on `host`, bound to its LAN address; waits until it
/// serves. Returns the process and its stdout lines (what clients sent, unless `echo`).
fn instance(
    lan: &Lan,
    host: usize,
    port: u16,
    service: &str,
    echo: bool,
    weight: u32,
) -> (Guard, mpsc::Receiver<String>) {
    // Both families: the instance joins both groups.
    let bind = format!("{},{}", lan.addr(host, port), addr6(host, port));
    let weight = weight.to_string();
    let mut args = vec!["listen", service, "--bind", &bind, "--discover"];
    args.extend_from_slice(&["--weight", &weight]);
    if echo {
        args.push("--echo");
    }
    let mut child = lan
        .serval(host, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn instance");
    let out = lines(child.stdout.take().unwrap());
    let err = lines(child.stderr.take().unwrap());
    let child = Guard(child);
    wait_line(&err, "serving line", |l| l.contains("serving"));
    (child, out)
}

/// `serval cat SERVICE --discover` from `host` with `input`; returns (exit code, stdout,
/// stderr).
fn cat(lan: &Lan, host: usize, service: &str, input: &[u8]) -> (i32, Vec<u8>, String) {
    cat_from(lan, &lan.addr(host, 0), host, service, input)
}

/// [`cat`] bound to `bind` (an IPv6 address sends the SYN to the IPv6 group).
fn cat_from(
    lan: &Lan,
    bind: &str,
    host: usize,
    service: &str,
    input: &[u8],
) -> (i32, Vec<u8>, String) {
    let cmd = lan.serval(
        host,
        &[
            "cat",
            service,
            "--discover",
            "--bind",
            bind,
            "--discover-timeout",
            "2000",
        ],
    );
    support::run_with_input(cmd, input)
}

#[test]
fn two_instances_and_a_client_find_each_other_with_no_router() {
    if !netns_usable("two_instances_and_a_client_find_each_other_with_no_router") {
        return;
    }
    // Hosts 0 and 1: instances of web.test (printing what they get); host 1 also serves
    // echo.test; host 2: the client.
    let lan = Lan::dual_stack("d", "10.80.0", "fd80", 3);
    // Weights 3 and 1: instances race to answer each SYN by weight.
    let (_a, a_rx) = instance(&lan, 0, 54324, "web.test", false, 3);
    let (_b, b_rx) = instance(&lan, 1, 54324, "web.test", false, 1);
    let (_e, _) = instance(&lan, 1, 54325, "echo.test", true, 1);

    // Content echoed, by name, with no router and no address given.
    let (code, out, err) = cat(&lan, 2, "echo.test", b"hello over the LAN\n");
    assert_eq!(code, 0, "cat echo.test failed: {err}");
    assert_eq!(out, b"hello over the LAN\n");
    // The same over IPv6: the SYN goes to ff02::5653.
    let t6 = Instant::now();
    let (code, out, err) = cat_from(&lan, &addr6(2, 0), 2, "echo.test", b"and over v6\n");
    assert_eq!(code, 0, "cat echo.test over IPv6 failed: {err}");
    assert_eq!(out, b"and over v6\n");
    eprintln!("IPv6 echo by discovery took {:?}", t6.elapsed());

    // Both instances answer every SYN, each after a random wait of mean 10 ms / weight: the
    // first SYN-ACK wins, the connection never fails, each request reaches exactly one
    // instance, and the weight-3 instance wins about 3 in 4.
    let n = 80;
    for i in 0..n {
        let (code, _, err) = cat(&lan, 2, "web.test", format!("req-{i}\n").as_bytes());
        assert_eq!(code, 0, "connect {i} failed: {err}");
    }
    let counts = count_lines(&[&a_rx, &b_rx], "req-", n, Duration::from_secs(10));
    let (ca, cb) = (counts[0], counts[1]);
    eprintln!("discovery spread over two instances (weights 3 and 1): {ca} / {cb}");
    assert_eq!(ca + cb, n, "every request reached exactly one instance");
    // Binomial(80, 3/4): mean 60, sd 3.9; accept ±4 sd (timer granularity and the LAN's
    // own delays blur the race a little).
    assert!((44..=76).contains(&ca), "weights 3:1 gave {ca} / {cb}");

    // An unknown name: silence from the LAN, so the client gives up after its discovery
    // timeout (2 s here) with one clear line, well before the SYN's own budget.
    let t = Instant::now();
    let (code, _, err) = cat(&lan, 2, "nobody.test", b"x");
    let took = t.elapsed();
    assert_ne!(code, 0);
    assert!(
        err.contains("no route to service nobody.test (no instance answered on the local network)"),
        "unexpected error: {err}"
    );
    assert!(took < Duration::from_secs(8), "took {took:?}");

    // Bound to 0.0.0.0 on a host with no route to the group: a clear error at once, not a
    // silent timeout.
    let mut child = lan
        .serval(2, &["cat", "web.test", "--discover"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cat");
    let err = lines(child.stderr.take().unwrap());
    let child = Guard(child);
    let line = wait_line(&err, "error line", |l| l.contains("discovery group"));
    assert!(line.contains("no route to the discovery group"), "{line}");
    drop(child);
}

/// Host `host`'s IPv6 address (`fd80::<host + 1>`) with `port`.
fn addr6(host: usize, port: u16) -> String {
    format!("[fd80::{}]:{port}", host + 1)
}
