//! A service router and instances on separate hosts: each host is a network namespace with a
//! veth to a bridge (a LAN, 10.79.0.0/24). Instances register with `serval listen --router`,
//! clients connect by name with `serval cat --router`; the router forwards only the SYN.
//!
//! Needs root (CI runs as root). Everything is created here, used only inside these
//! namespaces, and removed when the test ends, pass or fail. Elsewhere they skip
//! with one line (`serval_testkit::require_netns`); under `CI=true` they fail instead.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::{Guard, Lan, count_lines, drain, lines, netns_usable, wait_line};

const PORT: u16 = 54324;

/// Starts `serval router` on host 0 (10.79.NET.1) and waits for its READY line.
fn start_router(lan: &Lan, net: u8) -> Guard {
    start_router_on(lan, 0, net, &[])
}

/// Starts `serval router` on `host` (10.79.NET.<host + 1>) with `extra` flags and waits for
/// its READY line.
fn start_router_on(lan: &Lan, host: usize, net: u8, extra: &[&str]) -> Guard {
    start_router_logged(lan, host, net, extra).0
}

/// [`start_router_on`], returning also the router's log lines (`RUST_LOG=info`: one line per
/// registration created, unregistered or expired).
fn start_router_logged(
    lan: &Lan,
    host: usize,
    net: u8,
    extra: &[&str],
) -> (Guard, mpsc::Receiver<String>) {
    let listen = format!("10.79.{net}.{}:{PORT}", host + 1);
    let mut args = vec!["router", "--listen", &listen];
    args.extend_from_slice(extra);
    let mut router = lan
        .serval(host, &args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn router");
    let out = lines(router.stdout.take().unwrap());
    let log = lines(router.stderr.take().unwrap());
    let router = Guard(router);
    wait_line(&out, "READY line from serval router", |l| {
        l.starts_with("READY")
    });
    (router, log)
}

/// An instance: `serval listen SERVICE --router R --weight W` printing what clients send.
/// Returns the process and a channel of its output lines.
fn instance(
    lan: &Lan,
    host: usize,
    net: u8,
    service: &str,
    weight: u32,
    echo: bool,
) -> (Guard, mpsc::Receiver<String>) {
    instance_of(lan, host, net, 0, service, weight, echo)
}

/// [`instance`] registering with the router on host `router_host`.
fn instance_of(
    lan: &Lan,
    host: usize,
    net: u8,
    router_host: usize,
    service: &str,
    weight: u32,
    echo: bool,
) -> (Guard, mpsc::Receiver<String>) {
    let router = format!("10.79.{net}.{}:{PORT}", router_host + 1);
    instance_via(lan, host, net, &router, service, weight, echo)
}

/// [`instance`] registering with `routers` (`--router`, one address or several, comma-separated).
fn instance_via(
    lan: &Lan,
    host: usize,
    net: u8,
    router: &str,
    service: &str,
    weight: u32,
    echo: bool,
) -> (Guard, mpsc::Receiver<String>) {
    let bind = format!("10.79.{net}.{}:{PORT}", host + 1);
    let w = weight.to_string();
    let mut args = vec![
        "listen", service, "--bind", &bind, "--router", &router, "--weight", &w,
    ];
    if echo {
        args.push("--echo");
    }
    let mut child = lan
        .serval(host, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn instance");
    let rx = lines(child.stdout.take().unwrap());
    (Guard(child), rx)
}

/// `serval cat SERVICE --router R` with `input`; returns (exit code, stdout, stderr).
fn cat(lan: &Lan, host: usize, net: u8, service: &str, input: &[u8]) -> (i32, Vec<u8>, String) {
    cat_via(lan, host, net, 0, service, input)
}

/// [`cat`] through the router on host `router_host`.
fn cat_via(
    lan: &Lan,
    host: usize,
    net: u8,
    router_host: usize,
    service: &str,
    input: &[u8],
) -> (i32, Vec<u8>, String) {
    let router = format!("10.79.{net}.{}:{PORT}", router_host + 1);
    let cmd = lan.serval(host, &["cat", service, "--router", &router]);
    support::run_with_input(cmd, input)
}

/// Connects `n` times, each sending one tagged line; returns how many each instance printed.
fn spread(
    lan: &Lan,
    net: u8,
    client: usize,
    n: usize,
    rxs: &[&mpsc::Receiver<String>],
) -> Vec<usize> {
    for i in 0..n {
        let (code, _, err) = cat(
            lan,
            client,
            net,
            "web.test",
            format!("req-{i}\n").as_bytes(),
        );
        assert_eq!(code, 0, "connect {i} failed: {err}");
    }
    count_lines(rxs, "req-", n, Duration::from_secs(10))
}

#[test]
fn connections_by_name_through_a_router_spread_by_weight_and_fail_over() {
    if !netns_usable("connections_by_name_through_a_router_spread_by_weight_and_fail_over") {
        return;
    }
    let net = 1;
    // Host 0: router; 1 and 2: instances of web.test (weights 1 and 3); 3: client.
    let lan = Lan::new("r", &format!("10.79.{net}"), 4);
    let (_router, log) = start_router_logged(&lan, 0, net, &[]);
    let (_a, a_rx) = instance(&lan, 1, net, "web.test", 1, false);
    let (b, b_rx) = instance(&lan, 2, net, "web.test", 3, false);

    // Until both instances have registered, connections may fail or all go to one; wait until
    // one connect reached each of them.
    let start = Instant::now();
    let (mut seen_a, mut seen_b) = (false, false);
    while !(seen_a && seen_b) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "instances never both received a connection"
        );
        let _ = cat(&lan, 3, net, "web.test", b"probe\n");
        std::thread::sleep(Duration::from_millis(100));
        seen_a |= drain(&a_rx).iter().any(|l| l == "probe");
        seen_b |= drain(&b_rx).iter().any(|l| l == "probe");
    }

    // 1:3 weights: out of 120 connections, A's share is binomial(120, 1/4), mean 30, sd 4.7.
    // Accept 12..=50 (about 4 sd either way): a fixed bound, not a timing.
    let counts = spread(&lan, net, 3, 120, &[&a_rx, &b_rx]);
    assert_eq!(
        counts[0] + counts[1],
        120,
        "every request reached one instance: {counts:?}"
    );
    assert!(
        (12..=50).contains(&counts[0]),
        "weight 1 vs 3 gave {counts:?} connections"
    );

    // A SYN for a name nobody registered is refused at once, with one clear line.
    let t = Instant::now();
    let (code, _, err) = cat(&lan, 3, net, "nobody.test", b"x");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no route to service"), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );

    // Kill B without letting it unregister: once its lease (3 s by default) has run out (the
    // router says so), every new connection goes to A.
    drop(b);
    let b_at = format!("at 10.79.{net}.3:{PORT}");
    let expired = wait_line(&log, "B's registration to expire", |l| {
        l.contains(&b_at) && (l.contains("registration expired") || l.contains("unregistered"))
    });
    assert!(expired.contains("registration expired"), "{expired}");
    let counts = spread(&lan, net, 3, 20, &[&a_rx]);
    assert_eq!(counts[0], 20, "after B died, A got {counts:?} of 20");
}

#[test]
fn streams_never_cross_the_router_so_they_survive_its_death() {
    if !netns_usable("streams_never_cross_the_router_so_they_survive_its_death") {
        return;
    }
    let net = 2;
    // Host 0: router; 1: echo instance; 2: client.
    let lan = Lan::new("s", &format!("10.79.{net}"), 3);
    let mut router = start_router(&lan, net);
    let (_echo, _) = instance(&lan, 1, net, "echo.test", 1, true);

    // Connect (retrying until the instance has registered), send half, kill the router, send
    // the rest: all of it must come back.
    let router_addr = format!("10.79.{net}.1:{PORT}");
    let (child, mut stdin) = open_echo(&lan, 2, "echo.test", &router_addr, "first half\n");
    let _ = router.0.kill();
    let _ = router.0.wait();
    stdin.write_all(b"second half\n").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "second half\n");
}

/// Opens `serval cat SERVICE --router ROUTER` on `host` to an echo service and sends `first`,
/// retrying (at most 30 s) until it comes back — until the instance (and any router between)
/// has registered. Returns the running `cat` and its stdin, to go on with the stream.
fn open_echo(
    lan: &Lan,
    host: usize,
    service: &str,
    router: &str,
    first: &str,
) -> (std::process::Child, std::process::ChildStdin) {
    let start = Instant::now();
    loop {
        let mut child = lan
            .serval(host, &["cat", service, "--router", router])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cat");
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(first.as_bytes()).unwrap();
        stdin.flush().unwrap();
        // A connected cat echoes the first line back; a refused one exits.
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let _ = out.read_line(&mut line);
        if line == first {
            child.stdout = Some(out.into_inner());
            return (child, stdin);
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(start.elapsed() < Duration::from_secs(30), "never connected");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `cat` and checks it fails at once with "no route to service" (a NACK, no timeout).
fn refused_fast(lan: &Lan, host: usize, net: u8, router_host: usize, service: &str) {
    let t = Instant::now();
    let (code, _, err) = cat_via(lan, host, net, router_host, service, b"x");
    assert_eq!(code, 1, "{service}: {err}");
    assert!(err.contains("no route to service"), "{service}: {err}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "{service} took {:?}",
        t.elapsed()
    );
}

#[test]
fn a_syn_climbs_to_a_parent_router_and_descends_through_a_child() {
    if !netns_usable("a_syn_climbs_to_a_parent_router_and_descends_through_a_child") {
        return;
    }
    let net = 3;
    // Host 0: parent router; 1: child router announcing example.test/* to it; 2: echo instance
    // of web.example.test registered at the child; 3: client of the parent.
    let lan = Lan::new("h", &format!("10.79.{net}"), 4);
    let mut parent = start_router_on(&lan, 0, net, &[]);
    let parent_addr = format!("10.79.{net}.1:{PORT}");
    let mut child = start_router_on(
        &lan,
        1,
        net,
        &["--parent", &parent_addr, "--accept", "example.test/*"],
    );
    let (_echo, _) = instance_of(&lan, 2, net, 1, "web.example.test", 1, true);

    // Client → parent → child → instance; retried until both registrations are in place.
    let (client, mut stdin) = open_echo(
        &lan,
        3,
        "web.example.test",
        &parent_addr,
        "down two routers\n",
    );

    // Names nobody serves fail fast with a NACK from the router that has no route: under the
    // child's prefix from a client of the parent (the child NACKs), and elsewhere from a
    // client of the child (it climbs; the parent NACKs).
    refused_fast(&lan, 3, net, 0, "nobody.example.test");
    refused_fast(&lan, 3, net, 1, "nobody.other.test");
    refused_fast(&lan, 3, net, 1, "nobody.example.test");

    // The instance answered the client directly: with both routers gone the stream goes on.
    for r in [&mut parent, &mut child] {
        let _ = r.0.kill();
        let _ = r.0.wait();
    }
    stdin.write_all(b"routers gone\n").unwrap();
    drop(stdin);
    let out = client.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "routers gone\n");
}

/// `serval router` on `host` with the etcd registry inside that host's namespace. Returns it,
/// with its log lines, once it printed READY and logged its first list from etcd (at most 30 s:
/// etcd may still be starting, and a router starts before etcd answers).
fn etcd_router(lan: &Lan, host: usize, net: u8, extra: &[&str]) -> (Guard, mpsc::Receiver<String>) {
    let mut args = vec![
        "--registry",
        "etcd://127.0.0.1:2379",
        "--admin",
        "127.0.0.1:9090",
    ];
    args.extend_from_slice(extra);
    let (guard, log) = start_router_logged(lan, host, net, &args);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match log.recv_timeout(Duration::from_millis(200)) {
            Ok(l) if l.contains("registrations listed from etcd") => return (guard, log),
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("router on etcd exited"),
        }
        assert!(
            Instant::now() < deadline,
            "router never listed etcd within 30 s"
        );
    }
}

/// `serval table --admin 127.0.0.1:9090` inside `host`: the lines of the router's table.
fn table_lines(lan: &Lan, host: usize) -> Vec<String> {
    let out = lan
        .serval(host, &["table", "--admin", "127.0.0.1:9090"])
        .output()
        .expect("serval table");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Issue 4's whole topology: a client, a parent router, a child router on etcd and three
/// instances (plus an echo instance for a long-lived stream), each host its own namespace.
#[test]
fn two_routers_three_instances_and_etcd_lose_nothing_when_the_child_router_restarts() {
    if !netns_usable(
        "two_routers_three_instances_and_etcd_lose_nothing_when_the_child_router_restarts",
    ) {
        return;
    }
    let net = 4;
    // Host 0: parent router (in-memory); 1: child router on etcd (etcd in the same host),
    // announcing example.test/* to the parent; 2, 3, 4: instances of web.example.test with
    // weights 1, 1, 2; 5: echo.example.test; 6: client, using the parent only.
    let lan = Lan::new("e", &format!("10.79.{net}"), 7);
    let Some(_etcd) = support::Etcd::start_in(
        "two_routers_three_instances_and_etcd_lose_nothing_when_the_child_router_restarts",
        Some(&lan.hosts[1]),
    ) else {
        return;
    };
    let _parent = start_router_on(&lan, 0, net, &[]);
    let parent_addr = format!("10.79.{net}.1:{PORT}");
    let child_flags = ["--parent", &parent_addr, "--accept", "example.test/*"];
    let (mut child, first_log) = etcd_router(&lan, 1, net, &child_flags);
    let mut web: Vec<_> = [(2, 1), (3, 1), (4, 2)]
        .into_iter()
        .map(|(h, w)| instance_of(&lan, h, net, 1, "web.example.test", w, false))
        .collect();
    let (_echo, _) = instance_of(&lan, 5, net, 1, "echo.example.test", 1, true);

    // Through both routers: wait until each instance received a connection, then spread.
    let via_parent = |input: &[u8]| cat_via(&lan, 6, net, 0, "web.example.test", input);
    let start = Instant::now();
    let mut seen = [false; 3];
    while !seen.iter().all(|&s| s) {
        assert!(start.elapsed() < Duration::from_secs(30), "seen {seen:?}");
        let _ = via_parent(b"probe\n");
        std::thread::sleep(Duration::from_millis(100));
        for (i, (_, rx)) in web.iter().enumerate() {
            seen[i] |= drain(rx).iter().any(|l| l == "probe");
        }
    }
    let count = |web: &[(Guard, mpsc::Receiver<String>)], n: usize| {
        for i in 0..n {
            let (code, _, err) = via_parent(format!("req-{i}\n").as_bytes());
            assert_eq!(code, 0, "connect {i} failed: {err}");
        }
        let rxs: Vec<_> = web.iter().map(|(_, rx)| rx).collect();
        count_lines(&rxs, "req-", n, Duration::from_secs(10))
    };
    // Weights 1:1:2: the third's share of 80 is binomial(80, 1/2), mean 40, sd 4.5; accept
    // 22..=58 (4 sd). Each of the others gets binomial(80, 1/4): at least 5 (mean 20, sd 3.9).
    let counts = count(&web, 80);
    assert_eq!(counts.iter().sum::<usize>(), 80, "{counts:?}");
    assert!(
        (22..=58).contains(&counts[2]),
        "weights 1:1:2 gave {counts:?}"
    );
    assert!(
        counts[0] >= 5 && counts[1] >= 5,
        "weights 1:1:2 gave {counts:?}"
    );

    // A stream by name through both routers, open across the child router's death.
    let (stream, mut stdin) = open_echo(&lan, 6, "echo.example.test", &parent_addr, "before\n");

    // The child router dies without a word; a new process takes its place on the same etcd.
    let _ = child.0.kill();
    let _ = child.0.wait();
    let (_child, log) = etcd_router(&lan, 1, net, &child_flags);
    // Its table came from etcd before READY: all four instances, with no REGISTER needed.
    let table = table_lines(&lan, 1);
    let forwards = table
        .iter()
        .filter(|l| l.contains("forward 10.79.") && l.contains(" lease "))
        .count();
    assert_eq!(forwards, 4, "{table:#?}");
    // Refreshes arrive every second; none of them has to create a registration anew.
    std::thread::sleep(Duration::from_millis(2500));
    // (The first router logged one such line per instance: the filter matches real lines.)
    let created = |log: &mpsc::Receiver<String>| -> Vec<String> {
        drain(log)
            .into_iter()
            .filter(|l| l.contains("serval_router") && l.contains(" registered "))
            .collect()
    };
    // (On a loaded machine a lease may lapse and be created again: so each instance at
    // least once, not exactly four lines.)
    let first = created(&first_log);
    for h in 2..=5 {
        let at = format!("at 10.79.{net}.{}:{PORT}", h + 1);
        assert!(
            first.iter().any(|l| l.contains(&at)),
            "the first router never created {at}: {first:#?}"
        );
    }
    let again = created(&log);
    assert!(again.is_empty(), "the new router had to create {again:#?}");

    // The stream never crossed a router.
    stdin.write_all(b"after\n").unwrap();
    drop(stdin);
    let out = stream.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "after\n");

    // An explicit close (SIGTERM) unregisters at once. Without the UNREGISTER its last
    // refresh would keep it (3 s lease, refreshed every second) for at least 2 s, and a SYN
    // sent to it would still succeed later, re-resolved after the lease: so the router's own
    // "unregistered" line (not "expired") must come, and its table must have dropped the
    // instance, well inside the lease.
    let (mut stopped, _) = web.remove(2);
    let stopped_at = format!("at 10.79.{net}.5:{PORT}");
    let sigterm = Instant::now();
    let st = Command::new("kill")
        .args(["-TERM", &stopped.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let gone = wait_line(&log, "the stopped instance's unregistration", |l| {
        l.contains(&stopped_at) && (l.contains("unregistered") || l.contains("expired"))
    });
    let took = sigterm.elapsed();
    assert!(gone.contains("unregistered"), "{gone}");
    assert!(
        took < Duration::from_millis(1500),
        "unregistered {took:?} after SIGTERM: not well inside the 3 s lease"
    );
    let table = table_lines(&lan, 1);
    assert!(
        !table.iter().any(|l| l.contains(&stopped_at[3..])),
        "still in the table: {table:#?}"
    );
    let _ = stopped.0.wait();
    // And new connections all succeed, on the two left.
    let counts = count(&web, 20);
    assert_eq!(counts.iter().sum::<usize>(), 20, "{counts:?}");
}

/// Issue 14: instances that list two routers sharing one etcd outlive the router they
/// registered through. Host 0 runs etcd and both routers (A on PORT, B on PORT + 1, separate
/// processes); hosts 1–3 run instances of web.test given `--router A,B`; host 4 is a client.
#[test]
fn instances_given_two_routers_stay_reachable_when_the_one_they_used_is_killed() {
    const TEST: &str =
        "instances_given_two_routers_stay_reachable_when_the_one_they_used_is_killed";
    if !netns_usable(TEST) {
        return;
    }
    let net = 5;
    let lan = Lan::new("f", &format!("10.79.{net}"), 5);
    let Some(_etcd) = support::Etcd::start_in(TEST, Some(&lan.hosts[0])) else {
        return;
    };
    let (a, b) = (
        format!("10.79.{net}.1:{PORT}"),
        format!("10.79.{net}.1:{}", PORT + 1),
    );
    // A router on etcd at `listen`, admin on `admin` (inside host 0), once it has listed etcd.
    let router = |listen: &str, admin: &str| {
        let args = [
            "router",
            "--listen",
            listen,
            "--registry",
            "etcd://127.0.0.1:2379",
            "--admin",
            admin,
        ];
        let mut child = lan
            .serval(0, &args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn router");
        let out = lines(child.stdout.take().unwrap());
        let log = lines(child.stderr.take().unwrap());
        let guard = Guard(child);
        wait_line(&log, "the router's first list from etcd", |l| {
            l.contains("registrations listed from etcd")
        });
        // The list comes before the admin address is bound; READY after it.
        wait_line(&out, "READY line from serval router", |l| {
            l.starts_with("READY")
        });
        (guard, log)
    };
    let (mut router_a, _) = router(&a, "127.0.0.1:9090");
    let (_router_b, _) = router(&b, "127.0.0.1:9091");
    let both = format!("{a},{b}");
    let web: Vec<(Guard, mpsc::Receiver<String>)> = (1..=3)
        .map(|h| instance_via(&lan, h, net, &both, "web.test", 1, false))
        .collect();
    let rxs: Vec<&mpsc::Receiver<String>> = web.iter().map(|(_, rx)| rx).collect();
    let via_b = |tag: &str| {
        let cmd = lan.serval(4, &["cat", "web.test", "--router", &b]);
        support::run_with_input(cmd, format!("{tag}\n").as_bytes())
    };
    // Every instance reachable through B (registered through A, replicated by etcd). With
    // `all_succeed`, every connect must work; without, the instances may still be registering.
    let reach_all = |tag: &str, within: Duration, all_succeed: bool| {
        let start = Instant::now();
        let mut seen = [false; 3];
        let mut i = 0;
        while !seen.iter().all(|&s| s) {
            assert!(start.elapsed() < within, "{tag}: reached only {seen:?}");
            let (code, _, err) = via_b(&format!("{tag}-{i}"));
            assert!(
                code == 0 || !all_succeed,
                "{tag}: connect {i} through B failed: {err}"
            );
            i += 1;
            std::thread::sleep(Duration::from_millis(50));
            for (k, rx) in rxs.iter().enumerate() {
                seen[k] |= drain(rx).iter().any(|l| l.starts_with(tag));
            }
        }
    };
    reach_all("before", Duration::from_secs(30), false);

    // A is killed outright. Past two leases (3 s each) every registration is still there,
    // now refreshed through B, and every instance still gets connections through B.
    let _ = router_a.0.kill();
    let _ = router_a.0.wait();
    std::thread::sleep(Duration::from_millis(7000));
    reach_all("after", Duration::from_secs(10), true);

    // A comes back on the same address and lists etcd: one registration per instance, none
    // duplicated.
    let (_router_a, _) = router(&a, "127.0.0.1:9090");
    let table = table_lines(&lan, 0).join("\n");
    let forwards = table
        .lines()
        .filter(|l| l.contains("forward 10.79."))
        .count();
    assert_eq!(forwards, 3, "{table}");
}
