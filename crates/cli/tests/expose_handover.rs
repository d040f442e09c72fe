//! `serval expose`'s hand-over to a new process (issue 10 item 5): real programs —
//! `curl` downloading from `nginx`, and a RESP client on one `redis-server` connection — run
//! through `serval proxy` → `serval router` → `serval expose` while the expose process hands
//! every live connection to a new one (`--handover-socket` / `--take-over`), twice in a row
//! for the downloads. Everything must complete byte-exact, the redis connection must be the
//! same one after (`CLIENT ID` unchanged, its state kept), and each old process must exit 0.
//! Then the failures: a take-over from a path nobody serves, from a process serving another
//! service, and a flow the new process refuses (it stays with the old one and completes).
//!
//! Every server runs on 127.0.0.1 in its own temporary directory; every child is killed when
//! its test ends; every wait is bounded. A missing program skips the test with one line
//! (`serval_testkit`), or fails it under `CI=true`. Nothing here asserts a speed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use support::programs::{Nginx, Scratch, curl, programs, redis_server, sha256, write_random_file};
use support::{Guard, drain, router, serval, wait_line};

/// Tests that move a lot of data take this, so that two of them never share the two cores.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running `serval expose`: its guard and its stderr lines.
struct Expose {
    guard: Guard,
    err: mpsc::Receiver<String>,
}

/// `serval expose SERVICE --to 127.0.0.1:PORT --router ROUTER --bind 127.0.0.1:0 EXTRA…`,
/// once it serves and is registered (a `--take-over` one registers before its READY line).
fn expose(service: &str, port: u16, router: &str, extra: &[&str]) -> Expose {
    let (guard, _addrs, _registered, err) =
        support::expose(service, &format!("127.0.0.1:{port}"), router, extra);
    Expose { guard, err }
}

/// Waits (at most `limit`) for the process to exit; its status.
fn exit_within(guard: &mut Guard, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = guard.0.try_wait().unwrap() {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "process {} still running after {limit:?}",
            guard.0.id()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The line of an old process that says what it handed over, once it has exited 0.
fn handed_over(old: &mut Expose, limit: Duration) -> String {
    let st = exit_within(&mut old.guard, limit);
    let lines = drain(&old.err);
    assert!(
        st.success(),
        "the old expose exited {st}:\n{}",
        lines.join("\n")
    );
    lines
        .iter()
        .find(|l| l.contains("handed "))
        .unwrap_or_else(|| panic!("no hand-over line:\n{}", lines.join("\n")))
        .clone()
}

/// A download's file and its curl (success, HTTP status, stderr).
type Download = (PathBuf, std::thread::JoinHandle<(bool, String, String)>);

/// Starts `n` downloads of `url` into `dir` with curl (rate-limited, so that they are in
/// flight across the hand-overs), and returns once each has received some bytes.
fn downloads(curl_bin: &Path, url: &str, dir: &Path, n: usize, rate: &str) -> Vec<Download> {
    let all: Vec<_> = (0..n)
        .map(|i| {
            let out = dir.join(format!("{i}.bin"));
            let (curl_bin, url, o, rate) = (
                curl_bin.to_owned(),
                url.to_owned(),
                out.clone(),
                rate.to_owned(),
            );
            let t = std::thread::spawn(move || {
                curl(&curl_bin, &url, Some(&o), 120, &["--limit-rate", &rate])
            });
            (out, t)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !all
        .iter()
        .all(|(f, _)| std::fs::metadata(f).is_ok_and(|m| m.len() > 0))
    {
        assert!(Instant::now() < deadline, "downloads never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    all
}

/// Waits (at most 20 s) until every file has grown by `by` bytes beyond its size now:
/// the downloads are still moving.
fn grown(files: &[PathBuf], by: u64) {
    let size = |f: &PathBuf| std::fs::metadata(f).map_or(0, |m| m.len());
    let start: Vec<u64> = files.iter().map(size).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while files.iter().zip(&start).any(|(f, s)| size(f) < s + by) {
        assert!(Instant::now() < deadline, "the downloads stopped moving");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A minimal RESP client on one TCP connection (to `serval proxy`).
struct Resp {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Resp {
    fn connect(addr: &str) -> Resp {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Resp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    /// Sends one command; returns the reply as text (`+OK`, `:5`, a bulk string's bytes, an
    /// array's elements joined by spaces).
    fn cmd(&mut self, args: &[&str]) -> String {
        self.send(args);
        self.reply()
    }

    /// Sends one command without waiting for its reply.
    fn send(&mut self, args: &[&str]) {
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req += &format!("${}\r\n{a}\r\n", a.len());
        }
        self.w.write_all(req.as_bytes()).unwrap();
    }

    /// The next reply.
    fn reply(&mut self) -> String {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        let line = line.trim_end().to_owned();
        if let Some(n) = line.strip_prefix('*').filter(|n| *n != "-1") {
            let n: usize = n.parse().unwrap();
            return (0..n).map(|_| self.reply()).collect::<Vec<_>>().join(" ");
        }
        match line.strip_prefix('$') {
            Some(n) if n != "-1" => {
                let n: usize = n.parse().unwrap();
                let mut buf = vec![0u8; n + 2];
                std::io::Read::read_exact(&mut self.r, &mut buf).unwrap();
                String::from_utf8(buf[..n].to_vec()).unwrap()
            }
            _ => line,
        }
    }
}

#[test]
fn curl_downloads_and_a_redis_connection_go_on_across_two_expose_hand_overs() {
    let test = "curl_downloads_and_a_redis_connection_go_on_across_two_expose_hand_overs";
    let Some([nginx, curl_bin, redis_bin, _]) =
        programs(test, ["nginx", "curl", "redis-server", "sha256sum"])
    else {
        return;
    };
    let _heavy = heavy();
    const SIZE: usize = 24 << 20;
    let web = Nginx::start(&nginx, 100, |www| {
        write_random_file(&www.join("big.bin"), SIZE, 0x4a4d_0ff0_7e11_5eed);
    });
    let want = sha256(&web.dir.path().join("www/big.bin"));
    let kv_dir = Scratch::new("redis");
    let (_redis, kv_port) = redis_server(&redis_bin, &kv_dir);
    let (_router, raddr) = router(&[]);
    let sock = Scratch::new("sockets");
    let web_sock = sock.path().join("web.sock").display().to_string();
    let kv_sock = sock.path().join("kv.sock").display().to_string();
    let mut web1 = expose(
        "files.test",
        web.port,
        &raddr,
        &["--handover-socket", &web_sock],
    );
    let mut kv1 = expose("kv.test", kv_port, &raddr, &["--handover-socket", &kv_sock]);
    let (_pw, web_proxy, _) = support::proxy("files.test", &raddr, &["--bind", "127.0.0.1:0"]);
    let (_pk, kv_proxy, _) = support::proxy("kv.test", &raddr, &["--bind", "127.0.0.1:0"]);

    // A redis connection with state on the server side (its client ID, a key, a counter).
    let mut kv = Resp::connect(&kv_proxy);
    let id = kv.cmd(&["CLIENT", "ID"]);
    assert!(id.starts_with(':'), "CLIENT ID: {id}");
    assert_eq!(kv.cmd(&["CLIENT", "SETNAME", "across-handovers"]), "+OK");
    assert_eq!(kv.cmd(&["SET", "greeting", "hello"]), "+OK");
    assert_eq!(kv.cmd(&["INCR", "n"]), ":1");
    // ...and a command in flight across the hand-over: BLPOP blocks on an empty list until
    // another connection pushes to it, after the hand-over.
    kv.send(&["BLPOP", "queue", "0"]);

    // Three downloads of 24 MiB at 4 MB/s each: about 6 s, so both hand-overs happen while
    // every one of them is in flight.
    let files = Scratch::new("downloads");
    let dl = downloads(
        &curl_bin,
        &format!("http://{web_proxy}/big.bin"),
        files.path(),
        3,
        "4M",
    );
    let paths: Vec<PathBuf> = dl.iter().map(|(p, _)| p.clone()).collect();
    grown(&paths, 1 << 20);

    // First hand-over, both services at once; each new process serves its own hand-over
    // socket at the same path afterwards.
    let mut web2 = expose(
        "files.test",
        web.port,
        &raddr,
        &["--take-over", &web_sock, "--handover-socket", &web_sock],
    );
    let mut kv2 = expose("kv.test", kv_port, &raddr, &["--take-over", &kv_sock]);
    let line = handed_over(&mut web1, Duration::from_secs(30));
    assert!(
        line.contains("handed 3 connection(s) over") && line.contains("(0 kept here, 0 lost;"),
        "{line}"
    );
    let line = handed_over(&mut kv1, Duration::from_secs(30));
    assert!(
        line.contains("handed 1 connection(s) over") && line.contains("(0 kept here, 0 lost;"),
        "{line}"
    );
    wait_line(&web2.err, "the take-over's summary", |l| {
        l.contains("took over 3 connection(s)")
    });
    wait_line(&kv2.err, "the take-over's summary", |l| {
        l.contains("took over 1 connection(s)")
    });

    // The same redis connection, at the new process: the blocked BLPOP's answer comes
    // through it once another connection pushes.
    let mut pusher = Resp::connect(&kv_proxy);
    assert_eq!(pusher.cmd(&["RPUSH", "queue", "after"]), ":1");
    assert_eq!(kv.reply(), "queue after");
    assert_eq!(kv.cmd(&["CLIENT", "ID"]), id, "a new redis connection");
    assert_eq!(kv.cmd(&["CLIENT", "GETNAME"]), "across-handovers");
    assert_eq!(kv.cmd(&["GET", "greeting"]), "hello");
    assert_eq!(kv.cmd(&["INCR", "n"]), ":2");

    // The downloads still move, and go through a second hand-over (from the new process).
    grown(&paths, 1 << 20);
    let mut web3 = expose("files.test", web.port, &raddr, &["--take-over", &web_sock]);
    let line = handed_over(&mut web2, Duration::from_secs(30));
    assert!(
        line.contains("handed 3 connection(s) over") && line.contains("(0 kept here, 0 lost;"),
        "{line}"
    );
    wait_line(&web3.err, "the second take-over's summary", |l| {
        l.contains("took over 3 connection(s)")
    });

    for (path, t) in dl {
        let (ok, code, err) = t.join().unwrap();
        assert!(ok, "curl failed (HTTP {code}): {err}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE as u64);
        assert_eq!(sha256(&path), want, "downloaded bytes differ");
    }
    assert_eq!(web.requests(), 3, "a download was requested again");

    // New connections reach the new processes (the old ones are gone and withdrawn).
    let (ok, code, err) = curl(
        &curl_bin,
        &format!("http://{web_proxy}/index.html"),
        None,
        30,
        &[],
    );
    assert!(ok, "a new request after the hand-overs: HTTP {code}: {err}");
    assert_ne!(pusher.cmd(&["CLIENT", "ID"]), id);
    assert_eq!(pusher.cmd(&["INCR", "n"]), ":3");
    assert_eq!(kv.cmd(&["QUIT"]), "+OK");
    let _ = (&mut web3, &mut kv2);
}

#[test]
fn a_flow_the_new_process_refuses_stays_with_the_old_one_and_completes() {
    let test = "a_flow_the_new_process_refuses_stays_with_the_old_one_and_completes";
    let Some([nginx, curl_bin, _]) = programs(test, ["nginx", "curl", "sha256sum"]) else {
        return;
    };
    let _heavy = heavy();
    const SIZE: usize = 12 << 20;
    let web = Nginx::start(&nginx, 100, |www| {
        write_random_file(&www.join("big.bin"), SIZE, 0x0dd_ba11);
    });
    let want = sha256(&web.dir.path().join("www/big.bin"));
    let (_router, raddr) = router(&[]);
    let sock = Scratch::new("sockets");
    let path = sock.path().join("web.sock").display().to_string();
    let mut old = expose(
        "files.test",
        web.port,
        &raddr,
        &["--handover-socket", &path],
    );
    let (_p, proxy, _) = support::proxy("files.test", &raddr, &["--bind", "127.0.0.1:0"]);
    let files = Scratch::new("downloads");
    let dl = downloads(
        &curl_bin,
        &format!("http://{proxy}/big.bin"),
        files.path(),
        2,
        "3M",
    );

    // Room for one connection only: the other is refused, thawed, and spliced on by the old
    // process, which exits once it is done.
    let mut new = expose(
        "files.test",
        web.port,
        &raddr,
        &["--take-over", &path, "--max-connections", "1"],
    );
    let line = handed_over(&mut old, Duration::from_secs(60));
    assert!(
        line.contains("handed 1 connection(s) over") && line.contains("(1 kept here, 0 lost;"),
        "{line}"
    );
    let refused = wait_line(&new.err, "the take-over's summary", |l| {
        l.contains("took over 1 connection(s)")
    });
    assert!(refused.contains("1 refused"), "{refused}");
    for (path, t) in dl {
        let (ok, code, err) = t.join().unwrap();
        assert!(ok, "curl failed (HTTP {code}): {err}");
        assert_eq!(sha256(&path), want, "downloaded bytes differ");
    }
    let _ = &mut new;
}

#[test]
fn a_take_over_from_nobody_or_from_another_service_fails_and_changes_nothing() {
    let test = "a_take_over_from_nobody_or_from_another_service_fails_and_changes_nothing";
    let Some([curl_bin, nginx]) = programs(test, ["curl", "nginx"]) else {
        return;
    };
    let web = Nginx::start(&nginx, 100, |_| {});
    let (_router, raddr) = router(&[]);
    let sock = Scratch::new("sockets");
    let to = format!("127.0.0.1:{}", web.port);

    // Nothing at the path, and a stale file nobody accepts on: the new process exits 1 at
    // once, before it registers anywhere.
    let missing = sock.path().join("nobody.sock");
    let stale = sock.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    for path in [&missing, &stale] {
        let mut cmd = serval();
        cmd.args(["expose", "files.test", "--to", &to, "--router", &raddr])
            .args(["--bind", "127.0.0.1:0", "--take-over"])
            .arg(path);
        let o = support::output_within(cmd, b"", Duration::from_secs(20));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("--take-over"), "{err}");
        assert!(!err.contains("registered"), "{err}");
    }

    // A process serving another service is refused; the old one goes on serving.
    let path = sock.path().join("web.sock").display().to_string();
    let mut old = expose(
        "files.test",
        web.port,
        &raddr,
        &["--handover-socket", &path],
    );
    let mut cmd = serval();
    cmd.args(["expose", "other.test", "--to", &to, "--router", &raddr])
        .args(["--bind", "127.0.0.1:0", "--take-over", &path]);
    let o = support::output_within(cmd, b"", Duration::from_secs(20));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("refused the take-over"), "{err}");
    assert!(
        old.guard.0.try_wait().unwrap().is_none(),
        "the old process stopped"
    );
    let (_p, proxy, _) = support::proxy("files.test", &raddr, &["--bind", "127.0.0.1:0"]);
    let (ok, code, err) = curl(
        &curl_bin,
        &format!("http://{proxy}/index.html"),
        None,
        30,
        &[],
    );
    assert!(ok, "HTTP {code}: {err}");
    // ...and still takes a proper hand-over afterwards.
    let _new = expose("files.test", web.port, &raddr, &["--take-over", &path]);
    let line = handed_over(&mut old, Duration::from_secs(30));
    assert!(line.contains("handed 0 connection(s) over"), "{line}");
}

/// One frame of the hand-over protocol (protocol.md §4.4): `type u8 | length u32 | body`.
fn frame(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![ty];
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// Reads one frame (its descriptor, if any, is dropped by the kernel: no ancillary buffer).
fn read_frame(s: &mut std::os::unix::net::UnixStream) -> (u8, Vec<u8>) {
    use std::io::Read;
    let mut head = [0u8; 5];
    s.read_exact(&mut head).unwrap();
    let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (head[0], body)
}

#[test]
fn a_new_process_that_dies_holding_a_flow_leaves_a_clean_reset_not_a_hang() {
    let test = "a_new_process_that_dies_holding_a_flow_leaves_a_clean_reset_not_a_hang";
    let Some([nginx, curl_bin]) = programs(test, ["nginx", "curl"]) else {
        return;
    };
    let _heavy = heavy();
    let web = Nginx::start(&nginx, 100, |www| {
        write_random_file(&www.join("big.bin"), 8 << 20, 0xdead);
    });
    let (_router, raddr) = router(&[]);
    let sock = Scratch::new("sockets");
    let path = sock.path().join("web.sock");
    let shown = path.display().to_string();
    let mut old = expose(
        "files.test",
        web.port,
        &raddr,
        &["--handover-socket", &shown],
    );
    let (_p, proxy, _) = support::proxy("files.test", &raddr, &["--bind", "127.0.0.1:0"]);
    let files = Scratch::new("downloads");
    let mut dl = downloads(
        &curl_bin,
        &format!("http://{proxy}/big.bin"),
        files.path(),
        1,
        "1M",
    );

    // A "new process" that speaks the protocol up to the FLOW, then dies without answering:
    // nobody can tell whether it imported the flow.
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut hello = 1u16.to_be_bytes().to_vec();
    hello.extend_from_slice(b"files.test");
    s.write_all(&frame(1, &hello)).unwrap();
    assert_eq!(read_frame(&mut s).0, 2, "WELCOME");
    s.write_all(&frame(4, &[])).unwrap();
    let (ty, body) = read_frame(&mut s);
    assert_eq!(ty, 5, "FLOW");
    assert!(body.len() > 8 + 32, "a snapshot: {} bytes", body.len());
    let dropped = Instant::now();
    drop(s);

    // The old process resets the flow at both ends and exits 0, counting it lost; the client
    // sees its download fail promptly (it would otherwise wait out curl's 120 s).
    let line = handed_over(&mut old, Duration::from_secs(30));
    assert!(
        line.contains("handed 0 connection(s) over") && line.contains("0 kept here, 1 lost"),
        "{line}"
    );
    let (_, t) = dl.pop().unwrap();
    let (ok, code, err) = t.join().unwrap();
    assert!(!ok, "the download completed (HTTP {code})?");
    eprintln!("curl: {err} after {:?}", dropped.elapsed());
    assert!(
        dropped.elapsed() < Duration::from_secs(30),
        "the client noticed only after {:?}: {err}",
        dropped.elapsed()
    );
}

#[test]
fn a_half_closed_connection_is_handed_over_with_its_ends_and_held_bytes() {
    // No program needed: the client and the backend are this test's std sockets, so the
    // test decides when each side half-closes. The client sends a 1 MiB request and its FIN;
    // the backend reads it to the end, then answers 8 MiB slowly; the hand-over happens
    // mid-answer, after the FIN went through (expose has passed it on to the backend). The
    // client must get every byte of the answer and then the end of stream.
    let _heavy = heavy();
    const REQUEST: usize = 1 << 20;
    const ANSWER: usize = 8 << 20;
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = backend.local_addr().unwrap().port();
    let (fin_seen, fin_rx) = mpsc::channel();
    let server = std::thread::spawn(move || {
        use std::io::Read;
        let (mut c, _) = backend.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        fin_seen.send(()).unwrap();
        assert!(
            got == support::pattern(REQUEST),
            "the request arrived changed"
        );
        // 8 MiB in 64 KiB pieces, about 4 s.
        for piece in support::pattern(ANSWER).chunks(64 << 10) {
            c.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_millis(30));
        }
    });
    let (_router, raddr) = router(&[]);
    let sock = Scratch::new("sockets");
    let path = sock.path().join("half.sock").display().to_string();
    let mut old = expose("half.test", port, &raddr, &["--handover-socket", &path]);
    let (_p, proxy, _) = support::proxy("half.test", &raddr, &["--bind", "127.0.0.1:0"]);

    let mut c = TcpStream::connect(&proxy).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    c.write_all(&support::pattern(REQUEST)).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    fin_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the backend never saw the client's FIN");
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = received.clone();
    let client = std::thread::spawn(move || {
        use std::io::Read;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = c.read(&mut buf).unwrap();
            if n == 0 {
                return got;
            }
            got.extend_from_slice(&buf[..n]);
            counter.store(got.len(), std::sync::atomic::Ordering::Relaxed);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while received.load(std::sync::atomic::Ordering::Relaxed) < 1 << 20 {
        assert!(Instant::now() < deadline, "the answer never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut new = expose("half.test", port, &raddr, &["--take-over", &path]);
    let line = handed_over(&mut old, Duration::from_secs(30));
    assert!(
        line.contains("handed 1 connection(s) over") && line.contains("(0 kept here, 0 lost;"),
        "{line}"
    );
    let got = client.join().unwrap();
    server.join().unwrap();
    assert_eq!(got.len(), ANSWER);
    assert!(
        got == support::pattern(ANSWER),
        "the answer arrived changed"
    );
    let _ = &mut new;
}

#[test]
fn forty_echo_connections_are_handed_over_and_each_keeps_its_own_bytes() {
    // Std sockets at both ends (an echo backend, 40 clients through the proxy): each client's
    // bytes before and after the hand-over come back to it, in order, then its end of stream.
    const N: usize = 40;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    support::echo_backend(l);
    let (_router, raddr) = router(&[]);
    let sock = Scratch::new("sockets");
    let path = sock.path().join("echo.sock").display().to_string();
    let mut old = expose("echo.test", port, &raddr, &["--handover-socket", &path]);
    let (_p, proxy, _) = support::proxy("echo.test", &raddr, &["--bind", "127.0.0.1:0"]);
    let echo = |c: &mut TcpStream, msg: &[u8]| {
        use std::io::Read;
        c.write_all(msg).unwrap();
        let mut got = vec![0u8; msg.len()];
        c.read_exact(&mut got).unwrap();
        assert!(got == msg, "another connection's bytes came back");
    };
    let msg = |i: usize, round: u8| -> Vec<u8> {
        let mut m = support::pattern(4096 + i * 97);
        m.push(round);
        m.extend_from_slice(&(i as u64).to_be_bytes());
        m
    };
    let mut clients: Vec<TcpStream> = (0..N)
        .map(|i| {
            let mut c = TcpStream::connect(&proxy).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            echo(&mut c, &msg(i, 1));
            c
        })
        .collect();
    let mut new = expose("echo.test", port, &raddr, &["--take-over", &path]);
    let line = handed_over(&mut old, Duration::from_secs(60));
    assert!(
        line.contains(&format!("handed {N} connection(s) over"))
            && line.contains("0 kept here, 0 lost"),
        "{line}"
    );
    for (i, c) in clients.iter_mut().enumerate() {
        echo(c, &msg(i, 2));
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        std::io::Read::read_to_end(c, &mut rest).unwrap();
        assert!(rest.is_empty(), "{} bytes after the echo", rest.len());
    }
    let _ = &mut new;
}
