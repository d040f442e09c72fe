//! `serval router`, `serval listen --router` and `serval cat --router`, end to end on loopback
//! with the real binary; and their one-line usage errors. Every wait is bounded, and every
//! process is killed when the test ends, pass or fail.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{Etcd, Guard, instance, lines, router, serval, wait_line};

/// `serval cat SERVICE --router R` with `input`; bounded.
fn cat(service: &str, router: &str, input: &[u8]) -> Output {
    let mut cmd = serval();
    cmd.args(["cat", service, "--router", router]);
    support::output_within(cmd, input, Duration::from_secs(30))
}

#[test]
fn listen_and_cat_by_name_through_a_router() {
    let (_router, addr) = router(&[]);
    let mut listen = serval()
        .args([
            "listen",
            "echo.test",
            "--bind",
            "127.0.0.1:0",
            "--router",
            &addr,
            "--weight",
            "2",
            "--echo",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn listen");
    let err = lines(listen.stderr.take().unwrap());
    let pid = listen.id();
    let listen = Guard(listen);
    let line = wait_line(&err, "registration", |l| l.contains("registered"));
    assert!(line.contains(&addr), "{line}");

    // By name, through the router; the echo comes straight from the instance.
    let o = cat("echo.test", &addr, b"hello router\n");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout, b"hello router\n");

    // An unknown name: one line, exit 1, fast.
    let t = Instant::now();
    let o = cat("nobody.test", &addr, b"");
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.starts_with("error: no route to service nobody.test"),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // A stopped instance unregisters on its way out: the name is unknown at once, long
    // before its 3 s lease could have run out.
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let stopped = Instant::now();
    // Let it exit by itself (the guard's SIGKILL would cut the UNREGISTER short).
    let mut listen = listen;
    while listen.0.try_wait().unwrap().is_none() {
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "listen ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    loop {
        let o = cat("echo.test", &addr, b"");
        if o.status.code() == Some(1) {
            let e = String::from_utf8_lossy(&o.stderr);
            assert!(e.contains("no route to service echo.test"), "{e}");
            break;
        }
        assert!(stopped.elapsed() < Duration::from_secs(10), "still routed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        stopped.elapsed() < Duration::from_millis(2500),
        "{:?}",
        stopped.elapsed()
    );
}

#[test]
fn a_router_refuses_prefixes_it_does_not_accept() {
    let (_router, addr) = router(&["--accept", "example.com/*"]);
    let mut listen = serval()
        .args([
            "listen",
            "web.example.org",
            "--bind",
            "127.0.0.1:0",
            "--router",
            &addr,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn listen");
    let err = lines(listen.stderr.take().unwrap());
    let _listen = Guard(listen);
    let line = wait_line(&err, "rejection", |l| l.contains("rejected"));
    assert!(line.contains("not accepted"), "{line}");
}

#[test]
fn bad_router_flags_are_one_line_and_exit_2() {
    for args in [
        &["router", "--min-ttl-ms", "5000", "--max-ttl-ms", "1000"][..],
        &["router", "--min-ttl-ms", "0"],
        &["router", "--accept", "bad..name"],
        &["router", "--registry", "redis://localhost"],
        &["router", "--listen", "nonsense"],
        &["cat", "echo.test"],
        &[
            "cat",
            "echo.test",
            "--via",
            "127.0.0.1:1",
            "--router",
            "127.0.0.1:2",
        ],
        &["listen", "echo.test", "--weight", "0"],
        &["listen", "echo.test", "--router", "nowhere"],
        // A parent with nothing narrower than every name to announce.
        &["router", "--parent", "127.0.0.1:1"],
        &["router", "--parent", "127.0.0.1:1", "--announce", "*"],
        &["router", "--announce", "bad..name"],
        &["router", "--delay-timeout-ms", "0"],
        &["router", "--delay-queue", "0"],
    ] {
        let o = serval()
            .args(args)
            .env_remove("SERVAL_VIA")
            .env_remove("SERVAL_ROUTER")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(o.stdout.is_empty(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
    }
}

#[test]
fn a_router_that_cannot_bind_says_so_and_exits_1() {
    // Another router holds the port.
    let (_first, addr) = router(&[]);
    let o = serval()
        .args(["router", "--listen", &addr])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("error: cannot bind {addr}")),
        "{err}"
    );
}

/// A free loopback TCP port (bound and released; the router binds it right after).
fn free_tcp_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// `serval table --admin ADMIN ARGS…`; bounded.
fn table(admin: &str, args: &[&str]) -> Output {
    serval()
        .args(["table", "--admin", admin])
        .args(args)
        .output()
        .expect("run serval table")
}

/// The body of `GET path` on `admin`, by hand (HTTP/1.0, so the server closes when done).
fn http_get(admin: &str, path: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

#[test]
fn the_admin_api_shows_registrations_and_edits_static_rules() {
    let admin = free_tcp_port();
    let (_router, addr) = router(&["--admin", &admin]);
    let (_listen, _) = instance("web.test", Some(&addr), &["--weight", "3"]);

    // The registration, with its lease.
    let o = table(&admin, &[]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let web = serval_wire::ServicePrefix::parse("web.test")
        .unwrap()
        .to_string();
    let line = out
        .lines()
        .find(|l| l.starts_with(&web))
        .unwrap_or_else(|| panic!("no line for web.test in:\n{out}"));
    assert!(line.contains("forward 127.0.0.1:"), "{line}");
    assert!(line.contains("weight 3  priority 0  lease "), "{line}");

    // A static rule: added, listed, removed; removing it again is an error.
    let add = ["add", "api.test", "forward", "127.0.0.1:9", "--weight", "2"];
    let o = table(&admin, &add);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&table(&admin, &[]).stdout).to_string();
    assert!(
        out.contains("forward 127.0.0.1:9  weight 2  priority 0  static"),
        "{out}"
    );
    let del = ["del", "api.test", "forward", "127.0.0.1:9"];
    assert!(table(&admin, &del).status.success());
    let o = table(&admin, &del);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no such rule"));

    // A malformed rule is a usage error, caught before anything is sent: one line, exit 2.
    let o = table(&admin, &["add", "api.test", "forward"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("needs a locator"), "{e}");

    // Prometheus metrics count what happened.
    let metrics = http_get(&admin, "/metrics");
    assert!(metrics.starts_with("HTTP/1.0 200") || metrics.starts_with("HTTP/1.1 200"));
    assert!(
        metrics.contains("serval_router_registrations 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("serval_router_registrations_created_total 1"),
        "{metrics}"
    );
    assert!(http_get(&admin, "/health").contains("synced"));
}

#[test]
fn an_unreachable_admin_address_is_one_line_and_exit_1() {
    let admin = free_tcp_port();
    let o = table(&admin, &[]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.starts_with(&format!("error: admin API at {admin}:")),
        "{e}"
    );
}

#[test]
fn held_syns_are_listed_and_released_with_serval_table() {
    let admin = free_tcp_port();
    let (_router, addr) = router(&["--admin", &admin, "--delay-timeout-ms", "20000"]);
    let o = table(&admin, &["add", "example.test/*", "delay"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = table(&admin, &["delayed"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "(no held SYNs)\n");

    let waiting = std::thread::spawn(move || {
        let t = Instant::now();
        let o = cat("web.example.test", &addr, b"x");
        (o, t)
    });
    let id = serval_wire::ServiceId::from_name("web.example.test")
        .unwrap()
        .to_string();
    let start = Instant::now();
    let line = loop {
        let out = String::from_utf8_lossy(&table(&admin, &["delayed"]).stdout).to_string();
        if let Some(l) = out.lines().find(|l| l.contains(&id)) {
            break l.to_owned();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never held:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(line.contains("from 127.0.0.1:"), "{line}");
    let held = line.split_whitespace().next().unwrap().to_owned();

    // A bad verdict is a usage error; `drop` fails the client at once, with one clear line.
    let o = table(&admin, &["release", &held, "maybe"]);
    assert_eq!(o.status.code(), Some(2));
    let released = Instant::now();
    let o = table(&admin, &["release", &held, "drop"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (o, _) = waiting.join().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("no route to service"), "{err}");
    // Long before the 20 s deadline.
    assert!(released.elapsed() < Duration::from_secs(5));
    // Answered once.
    let o = table(&admin, &["release", &held, "drop"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("404"));
    let metrics = http_get(&admin, "/metrics");
    assert!(
        metrics.contains("serval_router_delay_dropped_total 1"),
        "{metrics}"
    );
}

/// Writes `text` to a fresh file in the temporary directory and returns its path.
fn config_file(name: &str, text: &str) -> String {
    let path = std::env::temp_dir().join(format!("serval-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn a_config_file_sets_what_flags_do_and_flags_win() {
    // The file's keys are the flags' names; this one turns the admin API on.
    let admin = free_tcp_port();
    let file = config_file(
        "ok",
        &format!(
            "# a router\nregistry = \"memory://\"\nadmin = \"{admin}\"\nmin-ttl-ms = 2000\naccept = [\"example.test/*\"]\n"
        ),
    );
    let (_router, _addr) = router(&["--config", &file]);
    let o = table(&admin, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // A flag given as well takes precedence: the file's bad registry URL is never used.
    let bad = config_file("bad-registry", "registry = \"redis://x\"\n");
    let (_router, _) = router(&["--config", &bad, "--registry", "memory://"]);
    let o = serval()
        .args(["router", "--listen", "127.0.0.1:0", "--config", &bad])
        .env_remove("SERVAL_REGISTRY")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("unsupported registry URL"), "{e}");
}

#[test]
fn a_bad_config_file_is_one_line_and_exit_2() {
    let cases = [
        ("typo", "registry = \"memory://\"\nmax-ttl = 5\n", "line 2"),
        ("type", "min-ttl-ms = \"soon\"\n", "line 1"),
        (
            "zero",
            "delay-queue = 0\n",
            "delay-queue must be at least 1",
        ),
        ("syntax", "listen = [\n", "--config"),
    ];
    for (name, text, want) in cases {
        let file = config_file(name, text);
        let o = serval()
            .args(["router", "--listen", "127.0.0.1:0", "--config", &file])
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{name}: {e}");
        assert_eq!(e.lines().count(), 1, "{name}: {e}");
        assert!(e.contains(want), "{name}: {e}");
    }
    let o = serval()
        .args(["router", "--config", "/nonexistent/serval.toml"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("cannot read --config /nonexistent/serval.toml"),
        "{e}"
    );
}

/// `serval router --listen LISTEN --registry URL --admin ADMIN`, returned once it printed READY
/// and its registry is synced with etcd (`/health` 200; at most 30 s: etcd may be starting).
fn router_on(listen: &str, registry: &str, admin: &str) -> Guard {
    let mut child = serval()
        .args(["router", "--listen", listen, "--registry", registry])
        .args(["--admin", admin])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn router");
    let out = lines(child.stdout.take().unwrap());
    let guard = Guard(child);
    let ready = wait_line(&out, "READY", |_| true);
    assert!(ready.starts_with("READY"), "{ready}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health = http_get(admin, "/health");
        if health.contains("synced") {
            return guard;
        }
        assert!(
            Instant::now() < deadline,
            "router on {registry} not synced within 30 s: {health}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_router_restarted_on_etcd_has_every_registration_and_streams_never_noticed() {
    let Some(etcd) =
        Etcd::start("a_router_restarted_on_etcd_has_every_registration_and_streams_never_noticed")
    else {
        return;
    };
    let listen = format!(
        "127.0.0.1:{}",
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let admin = free_tcp_port();
    let mut first = router_on(&listen, &etcd.url, &admin);
    let (_instance, _) = instance("echo.test", Some(&listen), &["--echo"]);

    // A stream by name, open across the restart.
    let mut stream = serval()
        .args(["cat", "echo.test", "--router", &listen])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn cat");
    let mut stdin = stream.stdin.take().unwrap();
    let echoed = lines(stream.stdout.take().unwrap());
    let stream = Guard(stream);
    writeln!(stdin, "before").unwrap();
    wait_line(&echoed, "echo before the restart", |l| l == "before");

    // The router dies without a word and a new process takes its place.
    let _ = first.0.kill();
    let _ = first.0.wait();
    let admin = free_tcp_port();
    let _second = router_on(&listen, &etcd.url, &admin);
    // It knows the registration from etcd: it never had to create it from a REGISTER.
    let out = String::from_utf8_lossy(&table(&admin, &[]).stdout).to_string();
    assert!(out.contains("forward 127.0.0.1:"), "{out}");
    let metrics = http_get(&admin, "/metrics");
    assert!(
        metrics.contains("serval_router_registrations_created_total 0"),
        "{metrics}"
    );

    // The stream never crossed the router; new connections go through the new one.
    writeln!(stdin, "after").unwrap();
    wait_line(&echoed, "echo after the restart", |l| l == "after");
    drop(stdin);
    drop(stream);
    let o = cat("echo.test", &listen, b"new\n");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout, b"new\n");
}

#[test]
fn a_router_started_while_etcd_is_down_is_ready_degraded_then_serves_once_etcd_starts() {
    const TEST: &str =
        "a_router_started_while_etcd_is_down_is_ready_degraded_then_serves_once_etcd_starts";
    if serval_testkit::require_etcd(TEST).is_none() {
        return;
    }
    // etcd's port is chosen now; etcd starts there only later.
    let etcd_port = support::free_port();
    let admin = free_tcp_port();
    let mut child = serval()
        .args(["router", "--listen", "127.0.0.1:0", "--admin", &admin])
        .args(["--registry", &format!("etcd://127.0.0.1:{etcd_port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn router");
    let out = lines(child.stdout.take().unwrap());
    let err = lines(child.stderr.take().unwrap());
    let _router = Guard(child);
    let ready = wait_line(&out, "READY with etcd down", |_| true);
    let addr = ready
        .strip_prefix("READY ")
        .unwrap_or_else(|| panic!("first line {ready:?}"))
        .to_owned();
    wait_line(&err, "the degraded start's warning", |l| {
        l.contains("etcd unreachable at start")
    });
    let health = http_get(&admin, "/health");
    assert!(
        health.starts_with("HTTP/1.0 503") || health.starts_with("HTTP/1.1 503"),
        "{health}"
    );
    assert!(health.contains("degraded"), "{health}");
    // A name nobody could register yet has no route.
    let o = cat("late.test", &addr, b"x\n");
    assert!(!o.status.success());

    // etcd starts; the same router process lists it, turns healthy and takes registrations.
    let Some(_etcd) = support::Etcd::start_on(TEST, etcd_port) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health = http_get(&admin, "/health");
        if health.contains("synced") {
            assert!(health.contains(" 200 "), "{health}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not synced within 30 s: {health}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_instance, _) = instance("late.test", Some(&addr), &["--echo"]);
    let o = cat("late.test", &addr, b"served\n");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout, b"served\n");
}

#[test]
fn an_instance_given_two_routers_outlives_the_one_it_registered_through() {
    const TEST: &str = "an_instance_given_two_routers_outlives_the_one_it_registered_through";
    let Some(etcd) = Etcd::start(TEST) else {
        return;
    };
    let free_udp = || {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .unwrap()
            .to_string()
    };
    let (a, b) = (free_udp(), free_udp());
    let (admin_a, admin_b) = (free_tcp_port(), free_tcp_port());
    let mut router_a = router_on(&a, &etcd.url, &admin_a);
    let _router_b = router_on(&b, &etcd.url, &admin_b);
    // Registered through A (the first), refreshed through A; B sees it through etcd.
    let (_instance, at) = instance("ha.test", Some(&format!("{a},{b}")), &["--echo"]);
    let o = cat("ha.test", &b, b"via b\n");
    assert_eq!(
        o.stdout,
        b"via b\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // A dies without a word. Past two leases (3 s each) the registration would be gone had
    // the instance kept asking A only; it moved to B within one lease instead.
    let _ = router_a.0.kill();
    let _ = router_a.0.wait();
    std::thread::sleep(Duration::from_millis(7000));
    let out = String::from_utf8_lossy(&table(&admin_b, &[]).stdout).to_string();
    assert!(out.contains(&format!("forward {at}")), "{out}");
    for i in 0..5 {
        let line = format!("after {i}\n");
        let o = cat("ha.test", &b, line.as_bytes());
        assert_eq!(
            o.stdout,
            line.as_bytes(),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // A client given both routers, the dead one first, gets through the second.
    let mut cmd = serval();
    cmd.args(["cat", "ha.test", "--router", &format!("{a},{b}")]);
    let o = support::output_within(cmd, b"either\n", Duration::from_secs(30));
    assert_eq!(
        o.stdout,
        b"either\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&format!("router {a} does not answer")),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // A comes back on the same address: it lists the one registration from etcd, and
    // nothing is duplicated (one key per prefix and locator).
    let admin_a = free_tcp_port();
    let _router_a = router_on(&a, &etcd.url, &admin_a);
    let out = String::from_utf8_lossy(&table(&admin_a, &[]).stdout).to_string();
    assert_eq!(
        out.matches("forward ").count(),
        1,
        "one registration, not two: {out}"
    );
    let o = cat("ha.test", &a, b"back\n");
    assert_eq!(
        o.stdout,
        b"back\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_router_whose_stderr_is_closed_keeps_serving() {
    // Its logs go to a pipe nobody reads from: every write fails with EPIPE.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = serval()
        .args(["router", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(writer)
        .spawn()
        .expect("spawn router");
    let out = lines(child.stdout.take().unwrap());
    let mut router = Guard(child);
    let ready = wait_line(&out, "READY line", |_| true);
    let addr = ready.strip_prefix("READY ").unwrap().to_owned();
    // Registrations and SYNs make it log; it must go on answering.
    let (_listen, _) = instance("closed.stderr.test", Some(&addr), &["--echo"]);
    let o = cat("closed.stderr.test", &addr, b"still here\n");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout, b"still here\n");
    assert!(router.0.try_wait().unwrap().is_none(), "the router died");
}
