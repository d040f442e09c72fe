//! Real, unmodified programs through the translator: `curl`, `wrk`, `iperf3` and `redis-cli`
//! as clients of `serval proxy`, and `nginx`, `iperf3 -s` and `redis-server` as backends of
//! `serval expose`, with a `serval router` resolving each connection's SYN by name in between
//! (issue: translator, item 5). Then the bad inputs: a backend refusing connections, a name
//! with no instance, a proxy port already taken and a client that leaves mid-stream.
//!
//! Every server runs on 127.0.0.1 with its configuration, pid and log files in a temporary
//! directory; every child process is killed when its test ends, pass or fail; every wait is
//! bounded. `.ci/run` installs the programs from Debian packages. Without one of them a test
//! skips with one line naming it and the `apt-get install` line, unless `CI=true`, where a
//! missing program fails it (`serval_testkit`). Nothing here asserts
//! a speed: the machine may be a busy 2-core VM and the binary a debug build.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use support::programs::{
    Nginx, Scratch, curl, free_tcp_port, programs, sha256, signal, start_server, write_random_file,
};
use support::{Guard, drain, output_within, router, serval};

// ---------------------------------------------------------------------------------------------
// Programs, directories, ports
// ---------------------------------------------------------------------------------------------

/// Tests that move a lot of data take this, so that two of them never share the two cores.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Serval processes
// ---------------------------------------------------------------------------------------------

/// A running `serval expose`, registered with the router.
struct Expose {
    guard: Guard,
    /// Its stderr, from after the registration line.
    err: mpsc::Receiver<String>,
    /// The lease the router granted.
    lease: Duration,
}

/// `serval expose SERVICE --to 127.0.0.1:PORT --router ROUTER --bind 127.0.0.1:0 EXTRA…`,
/// once it is serving and registered.
fn expose(service: &str, port: u16, router: &str, extra: &[&str]) -> Expose {
    let to = format!("127.0.0.1:{port}");
    let (guard, addrs, line, err) = support::expose(service, &to, router, extra);
    assert!(addrs.starts_with("127.0.0.1:"), "READY {addrs}");
    assert!(
        line.contains(&format!("registered {service} with router {router}")),
        "{line}"
    );
    let lease = line
        .split("(lease ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or_else(|| panic!("no lease in {line:?}"));
    Expose { guard, err, lease }
}

/// A running `serval proxy` and the TCP address it accepts on.
struct Proxy {
    guard: Guard,
    addr: String,
    err: mpsc::Receiver<String>,
}

/// `serval proxy --listen 127.0.0.1:0 SERVICE --router ROUTER --bind 127.0.0.1:0`, once it
/// is listening.
fn proxy(service: &str, router: &str) -> Proxy {
    let (guard, addr, err) = support::proxy(service, router, &["--bind", "127.0.0.1:0"]);
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    Proxy { guard, addr, err }
}

// ---------------------------------------------------------------------------------------------
// Real programs through proxy → router → expose
// ---------------------------------------------------------------------------------------------

#[test]
fn a_100_mb_download_through_proxy_and_expose_has_the_files_sha256() {
    let Some([nginx, curl_bin, _]) = programs(
        "a_100_mb_download_through_proxy_and_expose_has_the_files_sha256",
        ["nginx", "curl", "sha256sum"],
    ) else {
        return;
    };
    let _heavy = heavy();
    const SIZE: usize = 100 * 1000 * 1000;
    let web = Nginx::start(&nginx, 100, |www| {
        write_random_file(&www.join("big.bin"), SIZE, 0x5e4a_1b00_c0ff_ee11);
    });
    let want = sha256(&web.dir.path().join("www/big.bin"));
    let (_router, raddr) = router(&[]);
    let _expose = expose("files.test", web.port, &raddr, &[]);
    let p = proxy("files.test", &raddr);

    let scratch = Scratch::new("download");
    let got_file = scratch.path().join("big.bin");
    let started = Instant::now();
    let (ok, code, err) = curl(
        &curl_bin,
        &format!("http://{}/big.bin", p.addr),
        Some(&got_file),
        300,
        &[],
    );
    let took = started.elapsed();
    assert!(ok, "curl failed (HTTP {code}): {err}");
    assert_eq!(code, "200");
    assert_eq!(std::fs::metadata(&got_file).unwrap().len(), SIZE as u64);
    assert_eq!(sha256(&got_file), want, "downloaded bytes differ");
    eprintln!(
        "100 MB in {:.1} s ({:.0} MB/s, debug or release as built)",
        took.as_secs_f64(),
        SIZE as f64 / 1e6 / took.as_secs_f64()
    );
    assert_eq!(web.requests(), 1);
}

/// wrk's summary: (requests, socket errors of every kind, non-2xx/3xx responses).
fn wrk_summary(text: &str) -> (u64, u64, u64) {
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk's output:\n{text}"));
    // "Socket errors: connect 0, read 1, write 0, timeout 0" appears only when one is non-zero.
    let socket_errors = text
        .lines()
        .find(|l| l.trim_start().starts_with("Socket errors:"))
        .map_or(0, |l| {
            l.split([',', ':'])
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum()
        });
    let non_2xx = text
        .lines()
        .find(|l| l.trim_start().starts_with("Non-2xx or 3xx responses:"))
        .and_then(|l| l.split(':').nth(1)?.trim().parse().ok())
        .unwrap_or(0);
    (requests, socket_errors, non_2xx)
}

#[test]
fn wrk_through_two_nginx_behind_one_name_reaches_both() {
    let Some([nginx, wrk]) = programs(
        "wrk_through_two_nginx_behind_one_name_reaches_both",
        ["nginx", "wrk"],
    ) else {
        return;
    };
    let _heavy = heavy();
    // nginx ends each keep-alive connection after 20 requests with "Connection: close"; wrk
    // then opens a new one, whose SYN the router resolves again. So 8 connections become
    // hundreds over the run, and both instances get some: with one resolution per connection
    // and only 8, all 8 would land on one instance once in 128 runs.
    let a = Nginx::start(&nginx, 20, |_| {});
    let b = Nginx::start(&nginx, 20, |_| {});
    let (_router, raddr) = router(&[]);
    let _ea = expose("web.test", a.port, &raddr, &[]);
    let _eb = expose("web.test", b.port, &raddr, &[]);
    let p = proxy("web.test", &raddr);

    let mut cmd = Command::new(&wrk);
    cmd.args(["-t", "2", "-c", "8", "-d", "2s", "--timeout", "10s"])
        .arg(format!("http://{}/index.html", p.addr));
    let o = output_within(cmd, b"", Duration::from_secs(60));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "wrk: {text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (requests, socket_errors, non_2xx) = wrk_summary(&text);
    eprintln!("{text}");
    let (ra, rb) = (a.requests(), b.requests());
    eprintln!("nginx a served {ra}, nginx b served {rb}");
    assert!(requests > 0, "{text}");
    assert!(ra > 0 && rb > 0, "a {ra}, b {rb}: one instance got nothing");
    // Every request answered, every response 2xx: nginx closes connections cleanly (after
    // announcing it), so the only errors would be the translator's. wrk's own shutdown at the
    // deadline is not counted as an error.
    assert_eq!(non_2xx, 0, "{text}");
    assert_eq!(socket_errors, 0, "{text}");
    // What nginx logged is what wrk counted, give or take the requests cut off at the deadline.
    assert!((ra + rb) as u64 >= requests, "{ra} + {rb} < {requests}");
}

/// One request of a [`CurlLoop`]: when it started, how long it took, whether it succeeded,
/// and what curl said.
#[derive(Debug, Clone)]
struct Request {
    start: Instant,
    took: Duration,
    ok: bool,
    what: String,
}

/// Requests in a loop from a thread, one at a time.
struct CurlLoop {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<Vec<Request>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CurlLoop {
    fn start(curl_bin: PathBuf, url: String, max_time: u64) -> CurlLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (stop.clone(), results.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let start = Instant::now();
                let (ok, code, err) = curl(&curl_bin, &url, None, max_time, &[]);
                let took = start.elapsed();
                r.lock().unwrap().push(Request {
                    start,
                    took,
                    ok,
                    what: format!("HTTP {code} {err} after {took:?}"),
                });
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        CurlLoop {
            stop,
            results,
            thread: Some(thread),
        }
    }

    /// How many requests started at or after `t` have finished.
    fn since(&self, t: Instant) -> usize {
        let r = self.results.lock().unwrap();
        r.iter().filter(|q| q.start >= t).count()
    }

    /// Waits (at most `limit`) until `n` requests started at or after `t` have finished.
    fn wait_for(&self, t: Instant, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.since(t) < n {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} requests in {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn finish(mut self) -> Vec<Request> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.results.lock().unwrap())
    }
}

/// The size of `slow.bin`: 8 s at `curl --limit-rate 6M`, and far more than the socket
/// buffers and stream windows between nginx and curl hold, so a download really is in flight.
const SLOW_LEN: usize = 48 << 20;

/// Lines of nginx's access log with `what` in them.
fn logged(web: &Nginx, what: &str) -> usize {
    std::fs::read_to_string(web.dir.path().join("access.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(what))
        .count()
}

#[test]
fn an_instance_stopped_with_sigterm_drains_its_downloads_and_loses_no_request() {
    let Some([nginx, curl_bin]) = programs(
        "an_instance_stopped_with_sigterm_drains_its_downloads_and_loses_no_request",
        ["nginx", "curl"],
    ) else {
        return;
    };
    let _heavy = heavy();
    let slow = |www: &Path| write_random_file(&www.join("slow.bin"), SLOW_LEN, 7);
    let a = Nginx::start(&nginx, 100, slow);
    let b = Nginx::start(&nginx, 100, slow);
    let (_router, raddr) = router(&[]);
    // A may take 30 s to drain (more than the downloads need), so the drain is never cut.
    let ea = expose("web.test", a.port, &raddr, &["--drain", "30"]);
    let p = proxy("web.test", &raddr);

    // Four rate-limited downloads (8 s each), started while A is the only instance: all four
    // go through the expose that will be stopped, and are still running at the stop.
    let scratch = Scratch::new("slow");
    let files: Vec<PathBuf> = (0..4)
        .map(|i| scratch.path().join(format!("{i}.bin")))
        .collect();
    let downloads: Vec<_> = files
        .iter()
        .map(|out| {
            let (curl_bin, out) = (curl_bin.clone(), out.clone());
            let url = format!("http://{}/slow.bin", p.addr);
            std::thread::spawn(move || {
                let r = curl(&curl_bin, &url, Some(&out), 60, &["--limit-rate", "6M"]);
                (r, Instant::now(), std::fs::read(&out).unwrap_or_default())
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !files
        .iter()
        .all(|f| std::fs::metadata(f).is_ok_and(|m| m.len() > 0))
    {
        assert!(Instant::now() < deadline, "downloads never started");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Now B, and requests in a loop until both instances have answered some.
    let _eb = expose("web.test", b.port, &raddr, &[]);
    let lp = CurlLoop::start(
        curl_bin.clone(),
        format!("http://{}/index.html", p.addr),
        20,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while logged(&a, "index.html") == 0 || logged(&b, "index.html") == 0 {
        assert!(Instant::now() < deadline, "both instances never answered");
        std::thread::sleep(Duration::from_millis(20));
    }

    // SIGTERM: expose stops accepting and unregisters at once, and lets open connections
    // finish.
    let a_before = logged(&a, "index.html");
    let stopped = Instant::now();
    signal(ea.guard.0.id(), "TERM");
    let mut ea = ea;
    let exited = loop {
        if ea.guard.0.try_wait().unwrap().is_some() {
            break stopped.elapsed();
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(40),
            "expose did not exit within 40 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let during_drain = lp.since(stopped);
    lp.wait_for(Instant::now(), 10, Duration::from_secs(60));
    let results = lp.finish();
    let log: Vec<String> = drain(&ea.err);
    eprintln!(
        "{} requests, {during_drain} started between SIGTERM and expose's exit {exited:?} \
         after it; expose said: {log:#?}",
        results.len()
    );

    // The downloads were open at the stop, and expose waited for every one of them.
    let waiting = log
        .iter()
        .find_map(|l| {
            l.split("waiting for ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .unwrap_or_else(|| panic!("expose did not wait for open connections: {log:#?}"));
    assert!(waiting >= 4, "{waiting} open at the stop: {log:#?}");
    assert!(
        log.iter().any(|l| l.contains("every connection finished")),
        "the drain was cut: {log:#?}"
    );
    // In-flight downloads through the stopped expose complete, byte for byte, and it exited
    // only as the last one ended.
    let want = std::fs::read(a.dir.path().join("www/slow.bin")).unwrap();
    for (i, d) in downloads.into_iter().enumerate() {
        let ((ok, code, err), done, got) = d.join().unwrap();
        assert!(ok, "download {i} across the stop: HTTP {code} {err}");
        assert!(
            got == want,
            "download {i}: {} bytes, not the file",
            got.len()
        );
        assert!(done >= stopped, "download {i} ended before the stop");
        // curl returns (and the thread takes the time) a little after expose delivered the
        // last byte and closed; a cut drain would leave seconds of download behind.
        assert!(
            done <= stopped + exited + Duration::from_secs(1),
            "expose exited {:?} before download {i} ended",
            done - (stopped + exited)
        );
    }
    assert_eq!(logged(&a, "slow.bin"), 4, "the downloads were A's");
    assert_eq!(logged(&b, "slow.bin"), 0);
    // Every request succeeded: before the stop, across it, and after it.
    let failed: Vec<_> = results.iter().filter(|q| !q.ok).map(|q| &q.what).collect();
    assert!(failed.is_empty(), "failed requests: {failed:#?}");
    // While A drained, new requests went to B: A answered at most the one in flight at the
    // SIGTERM, and the window saw real traffic.
    assert!(
        during_drain >= 5,
        "only {during_drain} requests during the drain"
    );
    let a_after = logged(&a, "index.html") - a_before;
    assert!(a_after <= 1, "A answered {a_after} requests after SIGTERM");
}

#[test]
fn a_killed_instance_is_routed_around_once_its_lease_runs_out() {
    let Some([nginx, curl_bin]) = programs(
        "a_killed_instance_is_routed_around_once_its_lease_runs_out",
        ["nginx", "curl"],
    ) else {
        return;
    };
    let _heavy = heavy();
    let a = Nginx::start(&nginx, 100, |_| {});
    let b = Nginx::start(&nginx, 100, |_| {});
    let (_router, raddr) = router(&[]);
    let ea = expose("web.test", a.port, &raddr, &[]);
    let _eb = expose("web.test", b.port, &raddr, &[]);
    let p = proxy("web.test", &raddr);
    let lease = ea.lease;
    // Each request is bounded by curl's --max-time, well past the longest wait the design
    // allows (below): a request that reaches it hung.
    const MAX_TIME: u64 = 20;
    let lp = CurlLoop::start(curl_bin, format!("http://{}/index.html", p.addr), MAX_TIME);
    lp.wait_for(Instant::now(), 10, Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(30);
    while logged(&a, "index.html") == 0 || logged(&b, "index.html") == 0 {
        assert!(Instant::now() < deadline, "both instances never answered");
        std::thread::sleep(Duration::from_millis(20));
    }

    // SIGKILL: no unregistration; the router forwards SYNs to the dead locator until the lease
    // runs out. A SYN sent there is retransmitted 1, 3 and 7 s after it was first sent
    // (doubling RTO), and each retransmission is resolved again at the router; the third comes
    // after the lease has run out. So no request may fail, none may take longer than that
    // (plus slack for a loaded machine), and every request started from one second past the
    // lease on succeeds.
    let killed = Instant::now();
    signal(ea.guard.0.id(), "KILL");
    let settled = killed + lease + Duration::from_secs(1);
    while Instant::now() < settled {
        std::thread::sleep(Duration::from_millis(50));
    }
    lp.wait_for(settled, 20, Duration::from_secs(120));
    let results = lp.finish();
    let window: Vec<_> = results
        .iter()
        .filter(|q| q.start >= killed && q.start < settled)
        .collect();
    // The request in flight at the kill, which may have been on the killed instance.
    let at_kill = results.iter().rfind(|q| q.start < killed).unwrap();
    let longest = results
        .iter()
        .filter(|q| !std::ptr::eq(*q, at_kill))
        .map(|q| q.took)
        .max()
        .unwrap_or_default();
    eprintln!(
        "lease {lease:?}; in flight at the kill: {at_kill:?}; {} requests between the kill and \
         lease + 1 s; the longest request took {longest:?}",
        window.len()
    );
    // Every request but the one in flight at the kill must succeed: that one may have had
    // its connection on the killed instance mid-answer (an `expose` has no standby to take
    // it over), which nothing can save; any other failure is the routing's fault.
    let failed: Vec<_> = results
        .iter()
        .filter(|q| !q.ok && !std::ptr::eq(*q, at_kill))
        .map(|q| &q.what)
        .collect();
    assert!(failed.is_empty(), "failed requests: {failed:#?}");
    let slow_limit = Duration::from_secs(7) + Duration::from_secs(5);
    assert!(
        longest < slow_limit,
        "a request took {longest:?} (more than the 7 s retransmission that must reach B, plus \
         5 s): {:#?}",
        results
            .iter()
            .filter(|q| q.took >= slow_limit && !std::ptr::eq(*q, at_kill))
            .collect::<Vec<_>>()
    );
    let after = results.iter().filter(|q| q.start >= settled).count();
    assert!(after >= 20);
}

#[test]
fn iperf3_runs_through_proxy_and_expose() {
    let Some([iperf3]) = programs("iperf3_runs_through_proxy_and_expose", ["iperf3"]) else {
        return;
    };
    let _heavy = heavy();
    let dir = Scratch::new("iperf3");
    let log = dir.path().join("server.log");
    let (_server, port) = start_server("iperf3 -s", &log, |port| {
        Command::new(&iperf3)
            .args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()])
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn iperf3 -s")
    });
    let (_router, raddr) = router(&[]);
    let _e = expose("iperf.test", port, &raddr, &[]);
    let p = proxy("iperf.test", &raddr);
    let (host, pport) = p.addr.rsplit_once(':').unwrap();

    let mut cmd = Command::new(&iperf3);
    cmd.args(["-c", host, "-p", pport, "-t", "2", "-J"]);
    let o = output_within(cmd, b"", Duration::from_secs(90));
    let text = String::from_utf8_lossy(&o.stdout);
    let report: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("iperf3 -J output is not JSON ({e}):\n{text}"));
    assert!(
        o.status.success() && report.get("error").is_none(),
        "iperf3 failed: {}\n{}",
        report["error"],
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let sent = report["end"]["sum_sent"]["bytes"].as_u64().unwrap();
    let received = report["end"]["sum_received"]["bytes"].as_u64().unwrap();
    let secs = report["end"]["sum_received"]["seconds"].as_f64().unwrap();
    eprintln!(
        "iperf3: sent {sent} B, server received {received} B in {secs:.1} s ({:.0} Mbit/s)",
        received as f64 * 8.0 / 1e6 / secs
    );
    assert!(received > 0 && sent > 0, "{text}");
    assert!(received <= sent);
}

#[test]
fn redis_cli_sets_and_gets_a_large_value_through_proxy_and_expose() {
    let Some([redis_server, redis_cli]) = programs(
        "redis_cli_sets_and_gets_a_large_value_through_proxy_and_expose",
        ["redis-server", "redis-cli"],
    ) else {
        return;
    };
    let dir = Scratch::new("redis");
    let (_server, port) = support::programs::redis_server(&redis_server, &dir);
    let (_router, raddr) = router(&[]);
    let _e = expose("kv.test", port, &raddr, &[]);
    let p = proxy("kv.test", &raddr);
    let (host, pport) = p.addr.rsplit_once(':').unwrap();
    let cli = |args: &[&str], input: &[u8]| {
        let mut cmd = Command::new(&redis_cli);
        cmd.args(["-h", host, "-p", pport]).args(args);
        let o = output_within(cmd, input, Duration::from_secs(60));
        assert!(
            o.status.success(),
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    };

    // 400 KB of printable bytes, no newline (`-x` takes stdin as the last argument, as is).
    let value: Vec<u8> = (0..400_000u32)
        .map(|i| b'a' + (i.wrapping_mul(2_654_435_761) >> 27) as u8 % 26)
        .collect();
    assert_eq!(cli(&["-x", "SET", "big"], &value), b"OK\n");
    assert_eq!(cli(&["STRLEN", "big"], b""), b"400000\n");
    let got = cli(&["GET", "big"], b"");
    assert_eq!(
        got.len(),
        value.len() + 1,
        "GET returned {} bytes",
        got.len()
    );
    assert!(got[..value.len()] == value[..], "GET returned other bytes");
}

// ---------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------

/// Connects to `addr`, sends a request, and returns how the connection ended (`Ok(bytes
/// read)` at EOF, or the error) and how long it took; at most 10 s.
fn connect_and_wait_for_close(addr: &str) -> (std::io::Result<usize>, Duration) {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut buf = Vec::new();
    let r = s.read_to_end(&mut buf);
    (r, t.elapsed())
}

/// Asserts the connection was closed (EOF or reset) with no bytes and no read timeout, well
/// within the 10 s the reader waits.
fn assert_closed_promptly(r: &std::io::Result<usize>, took: Duration, what: &str) {
    match r {
        Ok(0) => {}
        Ok(n) => panic!("{what}: {n} bytes came back"),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{what}: the connection hung ({e})"
        ),
    }
    assert!(
        took < Duration::from_secs(8),
        "{what}: closed after {took:?}"
    );
}

/// Lines on `rx` for up to `first` until the first one, then any more within 1 s.
fn new_lines(rx: &mpsc::Receiver<String>, first: Duration) -> Vec<String> {
    let mut v = Vec::new();
    if let Ok(l) = rx.recv_timeout(first) {
        v.push(l);
        while let Ok(l) = rx.recv_timeout(Duration::from_secs(1)) {
            v.push(l);
        }
    }
    v
}

#[test]
fn a_backend_refusing_connections_closes_the_client_and_expose_carries_on() {
    // Nothing listens on this port.
    let closed = free_tcp_port();
    let (_router, raddr) = router(&[]);
    let mut e = expose("refused.test", closed, &raddr, &[]);
    let p = proxy("refused.test", &raddr);
    drain(&e.err);
    for round in 0..2 {
        let (r, took) = connect_and_wait_for_close(&p.addr);
        assert_closed_promptly(&r, took, &format!("round {round}"));
        let logged = new_lines(&e.err, Duration::from_secs(5));
        assert_eq!(logged.len(), 1, "round {round}: expose logged {logged:?}");
        assert!(
            logged[0].contains(&format!("127.0.0.1:{closed}")),
            "{logged:?}"
        );
        assert!(e.guard.0.try_wait().unwrap().is_none(), "expose exited");
    }
}

#[test]
fn a_name_with_no_instance_closes_the_client_and_the_proxy_carries_on() {
    let (_router, raddr) = router(&[]);
    let mut p = proxy("nobody.test", &raddr);
    drain(&p.err); // its start-up line
    for round in 0..2 {
        let (r, took) = connect_and_wait_for_close(&p.addr);
        assert_closed_promptly(&r, took, &format!("round {round}"));
        let logged = new_lines(&p.err, Duration::from_secs(5));
        assert_eq!(logged.len(), 1, "round {round}: proxy logged {logged:?}");
        assert!(logged[0].contains("nobody.test"), "{logged:?}");
        assert!(p.guard.0.try_wait().unwrap().is_none(), "proxy exited");
    }
}

#[test]
fn a_proxy_port_already_in_use_is_one_line_and_a_failure() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut cmd = serval();
    cmd.args(["proxy", "--listen", &addr, "web.test"]).args([
        "--via",
        "127.0.0.1:9",
        "--bind",
        "127.0.0.1:0",
    ]);
    let o = output_within(cmd, b"", Duration::from_secs(20));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "exit {:?}: {err}", o.status);
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(&addr), "{err}");
}

/// TCP sockets (any state but TIME-WAIT) with `port` as source or destination, per `ss`.
fn open_sockets(ss: &Path, port: u16) -> Vec<String> {
    let filter = format!("( sport = :{port} or dport = :{port} )");
    let o = Command::new(ss)
        .args(["-tanH", "state", "all", &filter])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| !l.starts_with("TIME-WAIT") && !l.starts_with("LISTEN"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_client_leaving_mid_stream_closes_the_backend_connection() {
    let Some([ss]) = programs(
        "a_client_leaving_mid_stream_closes_the_backend_connection",
        ["ss"],
    ) else {
        return;
    };
    // The backend: sends without end to whoever connects, and reports how that ended.
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let bport = backend.local_addr().unwrap().port();
    let (tx, ended) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = backend.accept().unwrap();
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0usize;
        let r = loop {
            if let Err(e) = s.write_all(&chunk) {
                break e;
            }
            sent += chunk.len();
        };
        let _ = tx.send((r.kind(), sent));
    });
    let (_router, raddr) = router(&[]);
    let _e = expose("stream.test", bport, &raddr, &[]);
    let p = proxy("stream.test", &raddr);
    let pport: u16 = p.addr.rsplit_once(':').unwrap().1.parse().unwrap();

    // The client reads 1 MB of the endless stream, then goes away without a word (its
    // unread data makes the kernel reset the connection).
    let mut client = TcpStream::connect(&p.addr).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < 1 << 20 {
        let n = client.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended after {got} bytes");
        got += n;
    }
    let _ = client.shutdown(Shutdown::Both);
    drop(client);
    let left = Instant::now();

    // The backend's writes fail: expose closed or reset its connection.
    let (kind, sent) = ended
        .recv_timeout(Duration::from_secs(20))
        .expect("the backend connection stayed open 20 s after the client left");
    eprintln!(
        "backend: {kind:?} after {sent} bytes, {:?} after the client left",
        left.elapsed()
    );
    // And nothing is left open on either side of the translator.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open: Vec<_> = [open_sockets(&ss, bport), open_sockets(&ss, pport)].concat();
        if open.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still open: {open:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
