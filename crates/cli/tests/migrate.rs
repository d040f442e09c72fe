//! `serval flows` and `serval migrate` on loopback: scale-out (`--share`) moves half of an
//! instance's live streams to a new instance and every stream completes byte-exact; the admin
//! API's metrics count the moves; bad flags get one line and exit 2; `serval expose` lists its
//! flows but refuses to move them, with the reason; `serval cat --move-to` moves its own stream
//! to the instance it names; a standby that cannot stand by (no primary
//! at the address, or `expose`) says why in one line. (Moves between hosts: `migrate_netns.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::time::Duration;

use support::numbered::{client, finish, finish_exit, wait_progress};
use support::{Dir, free_port, instance, keygen, output_within, serval};

const SERVICE: &str = "count.share.test";

fn admin_get(admin: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn run(args: &[&str]) -> (i32, String) {
    let mut cmd = serval();
    cmd.args(args);
    let out = output_within(cmd, b"", Duration::from_secs(60));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn flow_lines(admin: &str) -> Vec<String> {
    let (code, out) = run(&["flows", "--admin", admin]);
    assert_eq!(code, 0, "{out}");
    out.lines().skip(1).map(String::from).collect()
}

/// Two numbering instances of `SERVICE` sharing one key, each with an admin API (and so a
/// migration agent).
struct Pair {
    _dir: Dir,
    _guards: [support::Guard; 2],
    /// Where each serves, and its admin address.
    a: String,
    a_admin: String,
    b: String,
    b_admin: String,
}

fn pair(name: &str) -> Pair {
    let dir = Dir::new(name);
    let key = dir.path("k");
    keygen(&key);
    let (a_admin, b_admin) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let start = |admin: &str| {
        instance(
            SERVICE,
            None,
            &["--number", "--admin", admin, "--key", &key],
        )
    };
    let (ga, a) = start(&a_admin);
    let (gb, b) = start(&b_admin);
    Pair {
        _dir: dir,
        _guards: [ga, gb],
        a,
        a_admin,
        b,
        b_admin,
    }
}

#[test]
fn scale_out_moves_half_the_live_streams_and_every_one_completes() {
    let Pair {
        a,
        a_admin,
        b_admin,
        _dir,
        _guards,
        ..
    } = pair("migrate-share");
    let total = 100_000;
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let mut cat = serval();
            cat.args(["cat", SERVICE, "--via", &a]);
            client(cat, total, total / 2)
        })
        .collect();
    for c in &clients {
        wait_progress(c, 1000, Duration::from_secs(30));
    }
    assert_eq!(flow_lines(&a_admin).len(), 4);

    // Bad flags: one line, exit 2, nothing moved.
    let (code, out) = run(&[
        "migrate", "--admin", &a_admin, "--to", &b_admin, "--share", "0",
    ]);
    assert_eq!(code, 2, "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    let (code, out) = run(&[
        "migrate", "--admin", &a_admin, "--to", &b_admin, "--flow", "zz",
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not a flowID"), "{out}");

    let (code, out) = run(&[
        "migrate", "--admin", &a_admin, "--to", &b_admin, "--share", "0.5",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 of 2 flow(s) moved"), "{out}");
    assert_eq!(flow_lines(&a_admin).len(), 2);
    let at_b = flow_lines(&b_admin);
    assert_eq!(at_b.len(), 2, "{at_b:?}");
    assert!(
        at_b.iter()
            .all(|l| l.contains(SERVICE) && l.ends_with(" 1")),
        "{at_b:?}"
    );
    let metrics = admin_get(&a_admin, "/metrics");
    assert!(
        metrics.contains("serval_flows_moved_out_total 2"),
        "{metrics}"
    );
    // No standby here (the demo's standby step waits for this gauge to say 1).
    assert!(
        metrics.contains("\nserval_standby_attached 0\n"),
        "{metrics}"
    );
    let instance = admin_get(&b_admin, "/instance");
    assert!(
        instance.contains("\"agent\"") && instance.contains("ed25519:"),
        "{instance}"
    );

    for c in clients {
        c.gate.store(total, Ordering::Relaxed);
        finish(c, total);
    }
}

/// `serval cat --move-to AGENT`: the client names the instance its stream should move to,
/// part way through; the stateful numbering goes on there and every answer is exact.
#[test]
fn a_client_moves_its_stream_to_the_instance_it_names() {
    let Pair {
        a,
        a_admin,
        b,
        b_admin,
        _dir,
        _guards,
    } = pair("migrate-client");
    let b_instance = admin_get(&b_admin, "/instance");
    let agent = b_instance
        .split("\"agent\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no agent in {b_instance}"))
        .to_owned();

    // Bad flags: one line, exit 2.
    let (code, out) = run(&["cat", SERVICE, "--via", &a, "--move-after", "10"]);
    assert_eq!(code, 2, "{out}");

    let total = 60_000;
    let mut cat = serval();
    cat.args([
        "cat",
        SERVICE,
        "--via",
        &a,
        "--move-to",
        &agent,
        "--move-after",
        "100000",
    ]);
    let c = client(cat, total, total / 2);
    let moved = c.wait_said("the stream moved to", Duration::from_secs(30));
    assert!(moved.contains(&b), "moved to B's locator {b}: {moved}");
    wait_progress(&c, total / 2, Duration::from_secs(30));
    assert_eq!(flow_lines(&a_admin).len(), 0, "released at A");
    let at_b = flow_lines(&b_admin);
    assert_eq!(at_b.len(), 1, "{at_b:?}");
    assert!(at_b[0].ends_with(" 1"), "one move so far: {at_b:?}");
    let metrics = admin_get(&a_admin, "/metrics");
    assert!(
        metrics.contains("serval_flows_moved_at_client_request_total 1"),
        "{metrics}"
    );
    c.gate.store(total, Ordering::Relaxed);
    finish(c, total);

    // Naming something that is no migration agent: the server says why, the stream goes on
    // where it is, and cat exits 1 at its end.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let mut cat = serval();
    cat.args(["cat", SERVICE, "--via", &b, "--move-to", &nowhere]);
    let c = client(cat, total, total / 2);
    let said = c.wait_said("failed", Duration::from_secs(30));
    assert!(
        said.contains("no instance of the service answered"),
        "{said}"
    );
    c.gate.store(total, Ordering::Relaxed);
    let st = finish_exit(c, total);
    assert_eq!(st.code(), Some(1), "{st}");
}

#[test]
fn expose_lists_its_flows_but_refuses_to_move_them() {
    // A TCP echo backend.
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let to = backend.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in backend.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
            });
        }
    });
    let dir = Dir::new("migrate-expose");
    let key = dir.path("k");
    keygen(&key);
    let admin = format!("127.0.0.1:{}", free_port());
    let mut cmd = serval();
    cmd.args([
        "expose",
        "echo.share.test",
        "--to",
        &to,
        "--bind",
        "127.0.0.1:0",
    ])
    .args(["--admin", &admin, "--key", &key]);
    let (_expose, locators, _err) = support::spawn_ready(cmd);
    let mut cat = serval();
    cat.args(["cat", "echo.share.test", "--via", &locators])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut cat = support::Guard(cat.spawn().unwrap());
    let mut stdin = cat.0.stdin.take().unwrap();
    let mut stdout = cat.0.stdout.take().unwrap();
    stdin.write_all(b"hello\n").unwrap();
    let mut got = [0u8; 6];
    stdout.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello\n");
    assert_eq!(flow_lines(&admin).len(), 1);
    // A target that would take the flow: the refusal is expose's.
    let other = format!("127.0.0.1:{}", free_port());
    let (_other, _) = instance(
        "echo.share.test",
        None,
        &["--echo", "--admin", &other, "--key", &key],
    );
    let (code, out) = run(&["migrate", "--admin", &admin, "--to", &other]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("serval expose cannot move its flows"), "{out}");
    // The stream still works.
    stdin.write_all(b"again\n").unwrap();
    stdout.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"again\n");
}

#[test]
fn a_stopping_instance_moves_its_open_streams_instead_of_waiting_for_them() {
    let dir = Dir::new("migrate-on-stop");
    let key = dir.path("k");
    keygen(&key);
    let (a_admin, b_admin) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let (_b, _) = instance(
        SERVICE,
        None,
        &["--number", "--admin", &b_admin, "--key", &key],
    );
    let mut cmd = serval();
    cmd.args(["listen", SERVICE, "--number", "--bind", "127.0.0.1:0"])
        .args([
            "--admin",
            &a_admin,
            "--key",
            &key,
            "--move-on-stop",
            &b_admin,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut a = support::Guard(cmd.spawn().unwrap());
    let err = support::lines(a.0.stderr.take().unwrap());
    let serving = support::wait_line(&err, "serving line", |l| l.contains("serving"));
    let a_addr = serving
        .split(" on ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap()
        .to_owned();
    let total = 100_000;
    let mut cat = serval();
    cat.args(["cat", SERVICE, "--via", &a_addr]);
    let c = client(cat, total, total / 2);
    wait_progress(&c, 1000, Duration::from_secs(30));

    let pid = a.0.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    support::wait_line(&err, "the move", |l| l.contains("1 stream(s) moved to"));
    let started = std::time::Instant::now();
    loop {
        if let Some(st) = a.0.try_wait().unwrap() {
            assert!(st.success(), "{st}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "A did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let at_b = flow_lines(&b_admin);
    assert_eq!(at_b.len(), 1, "{at_b:?}");
    c.gate.store(total, Ordering::Relaxed);
    finish(c, total);
}

#[test]
fn a_standby_that_cannot_stand_by_says_why_in_one_line() {
    let dir = Dir::new("standby-refused");
    let key = dir.path("k.key");
    keygen(&key);
    // Nothing answers at the primary's admin address.
    let dead = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let bind = format!("127.0.0.1:{}", free_port());
    let (code, out) = run(&[
        "listen",
        SERVICE,
        "--number",
        "--bind",
        &bind,
        "--admin",
        &admin,
        "--key",
        &key,
        "--standby-of",
        &dead,
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("cannot stand by for the instance at"), "{out}");
    // Nor can an expose.
    let (code, out) = run(&[
        "expose",
        SERVICE,
        "--to",
        "127.0.0.1:1",
        "--bind",
        &bind,
        "--admin",
        &admin,
        "--key",
        &key,
        "--standby-of",
        &dead,
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("cannot stand by for the instance at"), "{out}");
    // --standby-of needs --admin and --key.
    let (code, out) = run(&["listen", SERVICE, "--standby-of", &dead]);
    assert_eq!(code, 2, "{out}");
}
