//! Issue 12's SYN-flood test: a SYN flood at a server and at a router from an attacker on the
//! same LAN while a legitimate client connects by name: at least 99% of the legitimate
//! connections succeed, the server answers the flood with stateless cookies and the router
//! limits the flooding address.
//!
//! Four namespaces on one bridge (10.86.0.0/24, a fifth namespace): client 10.86.0.1, router
//! 10.86.0.2 (`serval router`, admin API on its loopback), server 10.86.0.3 and attacker
//! 10.86.0.4. The server is `attack echo-server` (crates/bench/src/bin/attack.rs): an echo
//! instance like `serval listen --echo`, with the engine's default cookies (past 256 half-open
//! handshakes), registered with the router, whose endpoint counters (`cookies_sent`, …) and
//! resident memory it prints on request. Client, router and server route everything beyond the
//! subnet through the attacker's address (which forwards nothing), so that what they send to
//! spoofed addresses really leaves them, as it would on a real network.
//!
//! The legitimate client is `attack legit-clients`: one process, [`LEGIT`] connections by
//! name through the router, one started every [`LEGIT_INTERVAL_MS`] ms (at most 16 at once);
//! each must connect and echo 64 bytes within [`LEGIT_TIMEOUT_MS`] ms. It starts 1.5 s into
//! each flood and ends before it. Three runs:
//!
//! * baseline: no flood (the connect times to compare with);
//! * (a) `attack syn-flood` at the server, every SYN from a random address and port of
//!   198.18.0.0/15, at [`SERVER_FLOOD_RATE`] SYNs/s: the server must send cookies;
//! * (b) two floods at the router at once: from the attacker's own address at
//!   [`ROUTER_FLOOD_RATE`] SYNs/s (the router's per-address limit, 1000/s by default, must
//!   drop them: `router_syns_rate_limited`), and spoofed from 198.18.0.0/15 at
//!   [`ROUTER_SPOOF_RATE`] SYNs/s (no per-address limit stops those: the router forwards them
//!   and the server's cookies take them).
//!
//! Each phase asserts ≥ 99% legitimate success, the counters above, that the registration is
//! still held, and that neither the router's nor the server's memory grew by more than
//! [`MAX_GROWTH_KIB`]. The numbers are printed (`--nocapture`) and recorded in docs/testing.md.
//!
//! `SERVAL_SYNFLOOD_RATE=N` floods at N SYNs/s instead (phase (a) and the router's own-address
//! flood; the router's spoofed flood at N/2), `0` as fast as the tool goes: to find where a
//! build on a given machine stops keeping up.
//!
//! The attack binary is built by this test (same profile) unless `SERVAL_ATTACK_BIN` names
//! one. Needs root (CI runs as root); elsewhere it skips with one line
//! (`serval_testkit::require_netns`), and under `CI=true` fails instead.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::attack::{attack_binary, exit_within, json_line};
use support::{Guard, ip, lines, netns_usable, wait_line};

const SUBNET: &str = "10.86.0";
const CLIENT: usize = 0;
const ROUTER: usize = 1;
const SERVER: usize = 2;
const ATTACKER: usize = 3;
const SERVICE: &str = "echo.flood.test";
const PORT: u16 = 54324;
/// The router's admin API, on the router's own loopback.
const ADMIN_PORT: u16 = 9186;
/// Forged source addresses (RFC 2544's benchmarking range).
const SPOOF: &str = "198.18.0.0/15";
/// SYNs/s at the server in phase (a), spoofed (unless `SERVAL_SYNFLOOD_RATE` says).
const SERVER_FLOOD_RATE: u64 = 20_000;
/// SYNs/s at the router in phase (b) from the attacker's own address…
const ROUTER_FLOOD_RATE: u64 = 20_000;
/// …and spoofed, at the same time.
const ROUTER_SPOOF_RATE: u64 = 10_000;

/// (server, router, router spoofed) flood rates: the constants, or `SERVAL_SYNFLOOD_RATE`.
fn flood_rates() -> (u64, u64, u64) {
    match std::env::var("SERVAL_SYNFLOOD_RATE") {
        Ok(v) => {
            let n: u64 = v
                .parse()
                .unwrap_or_else(|e| panic!("SERVAL_SYNFLOOD_RATE={v:?}: {e}"));
            (n, n, n / 2)
        }
        Err(_) => (SERVER_FLOOD_RATE, ROUTER_FLOOD_RATE, ROUTER_SPOOF_RATE),
    }
}
/// How long each flood lasts.
const FLOOD_SECS: f64 = 15.0;
/// Legitimate connections per phase, and how often one starts (300 × 40 ms = 12 s).
const LEGIT: u64 = 300;
const LEGIT_INTERVAL_MS: u64 = 40;
/// A legitimate connection that has not connected and echoed by then failed: the 10 s of
/// `serval cat --connect-timeout`, which leaves room for three SYN retransmissions (1, 2, 4 s).
const LEGIT_TIMEOUT_MS: u64 = 10_000;
/// The most a process's resident memory may grow during one phase.
const MAX_GROWTH_KIB: u64 = 64 << 10;

/// The LAN: a bridge in a namespace of its own and four hosts. Deleted on drop, pass or fail.
struct Lan {
    bridge: String,
    hosts: Vec<String>,
}

impl Lan {
    fn new() -> Lan {
        let id = std::process::id();
        let lan = Lan {
            bridge: format!("svsfbr{id}"),
            hosts: ["c", "r", "s", "a"]
                .iter()
                .map(|h| format!("svsf{h}{id}"))
                .collect(),
        };
        let br = lan.bridge.as_str();
        ip(&["netns", "add", br]);
        ip(&["-n", br, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", br, "link", "set", "br0", "up"]);
        for (i, h) in lan.hosts.iter().enumerate() {
            ip(&["netns", "add", h]);
            let port = format!("p{i}");
            ip(&[
                "link", "add", &port, "netns", br, "type", "veth", "peer", "name", "eth0", "netns",
                h,
            ]);
            ip(&["-n", br, "link", "set", &port, "master", "br0"]);
            ip(&["-n", br, "link", "set", &port, "up"]);
            let cidr = format!("{SUBNET}.{}/24", i + 1);
            ip(&["-n", h, "addr", "add", &cidr, "dev", "eth0"]);
            ip(&["-n", h, "link", "set", "eth0", "up"]);
            ip(&["-n", h, "link", "set", "lo", "up"]);
        }
        // Answers to spoofed addresses leave through a gateway (the attacker, which forwards
        // nothing), as they would on a real network; and reverse-path filtering, where a
        // kernel turns it on, accepts the spoofed sources.
        let gateway = format!("{SUBNET}.{}", ATTACKER + 1);
        for h in [CLIENT, ROUTER, SERVER] {
            ip(&[
                "-n",
                &lan.hosts[h],
                "route",
                "add",
                "default",
                "via",
                &gateway,
            ]);
        }
        lan
    }

    /// `program ARGS…` in host `host`'s namespace (`ip netns exec` execs it: the child's pid
    /// is the program's).
    fn exec(&self, host: usize, program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[host]])
            .arg(program)
            .args(args);
        c
    }

    /// The UDP counters of host `host` (`/proc/net/snmp` in its namespace): `InDatagrams`
    /// and `RcvbufErrors` (datagrams the kernel dropped on a full socket buffer).
    fn udp_counters(&self, host: usize) -> (u64, u64) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.hosts[host], "cat", "/proc/net/snmp"])
            .output()
            .expect("read /proc/net/snmp");
        let text = String::from_utf8_lossy(&out.stdout);
        let udp: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
        let [names, values] = udp[..] else {
            panic!("no Udp lines in {text}");
        };
        let get = |name: &str| {
            let i = names
                .split_whitespace()
                .position(|n| n == name)
                .unwrap_or_else(|| panic!("no {name} in {names}"));
            values.split_whitespace().nth(i).unwrap().parse().unwrap()
        };
        (get("InDatagrams"), get("RcvbufErrors"))
    }

    /// The router's Prometheus metrics (`GET /metrics` on its admin API, from inside its
    /// namespace with bash's /dev/tcp: no HTTP client needed).
    fn router_metrics(&self) -> Vec<(String, u64)> {
        let script = format!(
            "exec 3<>/dev/tcp/127.0.0.1/{ADMIN_PORT} && \
             printf 'GET /metrics HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n' >&3 && timeout 10 cat <&3"
        );
        let out = Command::new("ip")
            .args(["netns", "exec", &self.hosts[ROUTER], "bash", "-c", &script])
            .output()
            .expect("run bash");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with("HTTP/1."), "no metrics: {text}");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.split_once(' ')?;
                Some((name.to_owned(), value.trim().parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain([&self.bridge]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn addr(host: usize, port: u16) -> String {
    format!("{SUBNET}.{}:{port}", host + 1)
}

fn metric(m: &[(String, u64)], name: &str) -> u64 {
    m.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no metric {name} in {m:?}"))
}

/// Resident memory of process `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A spawned child with its stdout and stderr lines.
fn spawn(mut cmd: Command) -> (Guard, mpsc::Receiver<String>, mpsc::Receiver<String>) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let out = lines(child.stdout.take().unwrap());
    let err = lines(child.stderr.take().unwrap());
    (Guard(child), out, err)
}

/// The echo server: its stdin (a `STATS` line asks for its counters) and stdout lines.
struct Server {
    guard: Guard,
    stdin: ChildStdin,
    out: mpsc::Receiver<String>,
}

impl Server {
    fn stats(&mut self) -> Value {
        writeln!(self.stdin, "STATS").expect("write STATS");
        self.stdin.flush().expect("flush");
        json_line(&self.out, "the server's STATS", Duration::from_secs(10))
    }
}

/// What one phase measured.
struct Phase {
    name: &'static str,
    floods: Vec<Value>,
    legit: Value,
    /// Counter deltas of the server (`stats` JSON) and the router (metrics) over the phase.
    server: Vec<(String, i64)>,
    router: Vec<(String, i64)>,
    /// Datagrams the kernels dropped on full socket buffers during the phase.
    server_rcvbuf_drops: u64,
    router_rcvbuf_drops: u64,
    server_rss_kib: (u64, u64),
    router_rss_kib: (u64, u64),
}

impl Phase {
    fn server(&self, name: &str) -> i64 {
        self.server.iter().find(|(n, _)| n == name).unwrap().1
    }
    fn router(&self, name: &str) -> i64 {
        let full = format!("serval_router_{name}_total");
        self.router.iter().find(|(n, _)| *n == full).unwrap().1
    }
    fn success_pct(&self) -> f64 {
        self.legit["success_pct"].as_f64().unwrap()
    }
    fn report(&self) -> String {
        let floods: Vec<String> = self
            .floods
            .iter()
            .map(|f| {
                format!(
                    "{} SYNs at {} from {} ({:.0}/s achieved)",
                    f["sent"], f["target"], f["from"], f["rate"]
                )
            })
            .collect();
        let l = &self.legit;
        let c = &l["connect_ms"];
        format!(
            "{}: flood {}; legitimate {}/{} ok ({:.1}%), connect p50 {} ms p90 {} ms p99 {} ms \
             max {} ms, cookie retries {}, failures {}; server cookies_sent +{} \
             cookies_accepted +{} received +{} accepted +{} cpu +{:.2} s, kernel drops {} \
             (rss {}→{} KiB); router forwarded +{} rate-limited +{}, kernel drops {} \
             (rss {}→{} KiB)",
            self.name,
            if floods.is_empty() {
                "none".to_owned()
            } else {
                floods.join(" + ")
            },
            l["ok"],
            l["attempts"],
            self.success_pct(),
            c["p50"],
            c["p90"],
            c["p99"],
            c["max"],
            l["cookie_retries"],
            l["failures"],
            self.server("cookies_sent"),
            self.server("cookies_accepted"),
            self.server("received"),
            self.server("accepted"),
            self.server("cpu_cs") as f64 / 100.0,
            self.server_rcvbuf_drops,
            self.server_rss_kib.0,
            self.server_rss_kib.1,
            self.router("syns_forwarded"),
            self.router("syns_rate_limited"),
            self.router_rcvbuf_drops,
            self.router_rss_kib.0,
            self.router_rss_kib.1,
        )
    }
}

/// The server's counters as integers (CPU seconds in hundredths, as `cpu_cs`).
fn server_counters(v: &Value) -> Vec<(String, i64)> {
    let mut out: Vec<(String, i64)> = v
        .as_object()
        .unwrap()
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_i64()?)))
        .collect();
    out.push((
        "cpu_cs".to_owned(),
        (v["cpu_secs"].as_f64().unwrap() * 100.0).round() as i64,
    ));
    out
}

fn deltas(before: &[(String, i64)], after: &[(String, i64)]) -> Vec<(String, i64)> {
    after
        .iter()
        .map(|(n, a)| {
            let b = before.iter().find(|(m, _)| m == n).map_or(0, |(_, b)| *b);
            (n.clone(), a - b)
        })
        .collect()
}

fn router_counters(m: &[(String, u64)]) -> Vec<(String, i64)> {
    m.iter().map(|(n, v)| (n.clone(), *v as i64)).collect()
}

/// One phase: the floods (target, rate, spoofed?) start, then the legitimate client; the
/// counters are read before and after.
fn phase(
    name: &'static str,
    lan: &Lan,
    attack: &Path,
    server: &mut Server,
    router_pid: u32,
    floods: &[(usize, u64, bool)],
) -> Phase {
    let server_before = server_counters(&server.stats());
    let router_before = router_counters(&lan.router_metrics());
    let (_, server_drops_before) = lan.udp_counters(SERVER);
    let (_, router_drops_before) = lan.udp_counters(ROUTER);
    let rss_before = (rss_kib(server.guard.0.id()), rss_kib(router_pid));

    let duration = FLOOD_SECS.to_string();
    let mut flooders = Vec::new();
    for &(target, rate, spoofed) in floods {
        let target = addr(target, PORT);
        let rate = rate.to_string();
        let mut args = vec![
            "syn-flood",
            "--target",
            &target,
            "--service",
            SERVICE,
            "--rate",
            &rate,
            "--duration",
            &duration,
        ];
        if spoofed {
            args.extend(["--spoof", SPOOF]);
        }
        flooders.push(spawn(lan.exec(ATTACKER, attack, &args)));
    }
    if !floods.is_empty() {
        std::thread::sleep(Duration::from_millis(1500));
    }
    let (count, interval, timeout) = (
        LEGIT.to_string(),
        LEGIT_INTERVAL_MS.to_string(),
        LEGIT_TIMEOUT_MS.to_string(),
    );
    let via = addr(ROUTER, PORT);
    let bind = addr(CLIENT, 0);
    let (mut legit, legit_out, legit_err) = spawn(lan.exec(
        CLIENT,
        attack,
        &[
            "legit-clients",
            "--via",
            &via,
            "--bind",
            &bind,
            "--service",
            SERVICE,
            "--count",
            &count,
            "--interval-ms",
            &interval,
            "--concurrency",
            "16",
            "--timeout-ms",
            &timeout,
        ],
    ));
    let limit = Duration::from_secs(LEGIT * LEGIT_INTERVAL_MS / 1000 + 60);
    let legit_report = json_line(&legit_out, "the legitimate clients", limit);
    let code = exit_within(&mut legit.0, "legit-clients", Duration::from_secs(10));
    let errors: Vec<String> = std::iter::from_fn(|| legit_err.try_recv().ok()).collect();
    assert_eq!(code, 0, "legit-clients failed: {errors:?}");
    let mut flood_reports = Vec::new();
    for (mut g, out, err) in flooders {
        let limit = Duration::from_secs_f64(FLOOD_SECS + 30.0);
        let report = json_line(&out, "the flooder", limit);
        let code = exit_within(&mut g.0, "syn-flood", Duration::from_secs(10));
        let errors: Vec<String> = std::iter::from_fn(|| err.try_recv().ok()).collect();
        assert_eq!(code, 0, "syn-flood failed: {errors:?}");
        flood_reports.push(report);
    }
    // Let the last answers drain before the counters are read.
    std::thread::sleep(Duration::from_millis(500));
    let server_after = server_counters(&server.stats());
    let router_after = router_counters(&lan.router_metrics());
    let (_, server_drops_after) = lan.udp_counters(SERVER);
    let (_, router_drops_after) = lan.udp_counters(ROUTER);
    let rss_after = (rss_kib(server.guard.0.id()), rss_kib(router_pid));
    Phase {
        name,
        floods: flood_reports,
        legit: legit_report,
        server: deltas(&server_before, &server_after),
        router: deltas(&router_before, &router_after),
        server_rcvbuf_drops: server_drops_after - server_drops_before,
        router_rcvbuf_drops: router_drops_after - router_drops_before,
        server_rss_kib: (rss_before.0, rss_after.0),
        router_rss_kib: (rss_before.1, rss_after.1),
    }
}

/// What every phase must show: the legitimate connections got through, the registration is
/// still held, nothing grew without bound.
fn check_common(p: &Phase, lan: &Lan) {
    assert!(
        p.success_pct() >= 99.0,
        "{}: only {:.1}% of the legitimate connections succeeded: {}",
        p.name,
        p.success_pct(),
        p.report()
    );
    assert_eq!(
        metric(&lan.router_metrics(), "serval_router_registrations"),
        1,
        "{}: the router lost the registration",
        p.name
    );
    for (what, (before, after)) in [("server", p.server_rss_kib), ("router", p.router_rss_kib)] {
        assert!(
            after <= before + MAX_GROWTH_KIB,
            "{}: the {what}'s memory grew from {before} to {after} KiB: {}",
            p.name,
            p.report()
        );
    }
}

#[test]
fn legitimate_clients_get_through_a_syn_flood_at_the_server_and_at_the_router() {
    let test = "legitimate_clients_get_through_a_syn_flood_at_the_server_and_at_the_router";
    if !netns_usable(test) {
        return;
    }
    let attack = attack_binary();
    let serval = PathBuf::from(env!("CARGO_BIN_EXE_serval"));
    let lan = Lan::new();

    // The router, with the default per-address SYN limit (1000/s).
    let admin = format!("127.0.0.1:{ADMIN_PORT}");
    let (router, router_out, _router_err) = spawn(lan.exec(
        ROUTER,
        &serval,
        &["router", "--listen", &addr(ROUTER, PORT), "--admin", &admin],
    ));
    wait_line(&router_out, "router READY", |l| l.starts_with("READY"));
    let router_pid = router.0.id();

    // The server, registered with it.
    let router_addr = addr(ROUTER, PORT);
    let mut cmd = lan.exec(
        SERVER,
        &attack,
        &[
            "echo-server",
            "--bind",
            &addr(SERVER, PORT),
            "--service",
            SERVICE,
            "--router",
            &router_addr,
        ],
    );
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn echo-server");
    let stdin = child.stdin.take().unwrap();
    let out = lines(child.stdout.take().unwrap());
    let _server_err = lines(child.stderr.take().unwrap());
    let mut server = Server {
        guard: Guard(child),
        stdin,
        out,
    };
    wait_line(&server.out, "echo-server READY", |l| l.starts_with("READY"));
    wait_line(&server.out, "echo-server REGISTERED", |l| {
        l.starts_with("REGISTERED")
    });
    assert_eq!(
        metric(&lan.router_metrics(), "serval_router_registrations"),
        1
    );

    let (server_rate, router_rate, router_spoof_rate) = flood_rates();
    let t0 = Instant::now();
    let baseline = phase("baseline", &lan, &attack, &mut server, router_pid, &[]);
    println!("{}", baseline.report());
    check_common(&baseline, &lan);

    let a = phase(
        "(a) flood at the server, spoofed",
        &lan,
        &attack,
        &mut server,
        router_pid,
        &[(SERVER, server_rate, true)],
    );
    println!("{}", a.report());
    check_common(&a, &lan);
    assert!(
        a.server("cookies_sent") > 0,
        "(a): the server sent no cookie: {}",
        a.report()
    );
    assert!(
        a.server("cookies_accepted") > 0 && a.legit["cookie_retries"].as_u64().unwrap() > 0,
        "(a): the legitimate clients never used a cookie: {}",
        a.report()
    );

    let b = phase(
        "(b) flood at the router, own address + spoofed",
        &lan,
        &attack,
        &mut server,
        router_pid,
        &[
            (ROUTER, router_rate, false),
            (ROUTER, router_spoof_rate, true),
        ],
    );
    println!("{}", b.report());
    check_common(&b, &lan);
    assert!(
        b.router("syns_rate_limited") > 0,
        "(b): the router limited nothing: {}",
        b.report()
    );
    assert!(
        b.server("cookies_sent") > 0,
        "(b): the server sent no cookie: {}",
        b.report()
    );

    // Every flood really ran (the rates achieved are printed).
    for p in [&a, &b] {
        for f in &p.floods {
            let rate = f["rate"].as_f64().unwrap();
            assert!(
                rate >= 2500.0,
                "{}: a flood of only {rate:.0}/s: {f}",
                p.name
            );
        }
    }
    println!("three phases in {:.1} s", t0.elapsed().as_secs_f64());
    drop(server.stdin);
    assert_eq!(
        exit_within(&mut server.guard.0, "echo-server", Duration::from_secs(10)),
        0
    );
}
