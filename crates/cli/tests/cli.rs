//! Runs the real `serval` binary.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn serval(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_serval"))
        .args(args)
        .output()
        .expect("run serval")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("utf-8 stdout")
}

#[test]
fn id_of_a_name_is_64_hex_digits() {
    let o = serval(&["id", "web.example.com"]);
    assert!(o.status.success());
    let out = stdout(&o);
    let line = out.trim_end();
    assert_eq!(line.len(), 64);
    assert!(line.bytes().all(|b| b.is_ascii_hexdigit()));
    // The same name in other case and with a trailing dot is the same ID.
    assert_eq!(stdout(&serval(&["id", "WEB.example.com."])), out);
}

#[test]
fn domain_prefix_is_a_prefix_of_names_under_it() {
    let p = stdout(&serval(&["id", "example.com/*"]));
    let (hex, len) = p.trim_end().split_once('/').expect("HEX/LEN");
    assert_eq!(len, "64");
    assert_eq!(hex.len(), 64);
    let name = stdout(&serval(&["id", "a.b.example.com"]));
    assert_eq!(&name[..16], &hex[..16]);
    assert!(hex[16..].bytes().all(|b| b == b'0'));
    let other = stdout(&serval(&["id", "example.org"]));
    assert_ne!(&other[..16], &hex[..16]);
}

#[test]
fn hex_forms_are_canonicalised() {
    let o = serval(&["id", "AB/8", "*"]);
    assert!(o.status.success());
    let zeros = "0".repeat(62);
    assert_eq!(stdout(&o), format!("ab{zeros}/8\n00{zeros}/0\n"));
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    for args in [
        &["id", "bad..name"][..],
        &["id", "a.b.c.d.e.f.g.h.i"],
        &["id", "ff/4"],
        &["id", "zz/300"],
        &["id"],
        &["frobnicate"],
        &["id", "--nope", "x"],
    ] {
        let o = serval(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(o.stdout.is_empty(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
    }
}

#[test]
fn cat_to_a_hop_where_nothing_listens_fails_after_its_connect_timeout() {
    // A UDP port on loopback that nothing listens on: bound, then closed.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port")
        .port();
    let via = format!("127.0.0.1:{port}");
    let t0 = std::time::Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_serval"))
        .args([
            "cat",
            "web.example.com",
            "--via",
            &via,
            "--connect-timeout",
            "0.5",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run serval");
    let took = t0.elapsed();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        err.trim_end(),
        format!(
            "error: connect to service web.example.com via {via}: no answer within 500ms \
             (nothing listening there, or the instance died; --connect-timeout waits longer)"
        )
    );
    // It gave up at the timeout, not after the SYN's two-minute retransmission schedule.
    assert!(took >= std::time::Duration::from_millis(500), "{took:?}");
    assert!(took < std::time::Duration::from_secs(60), "{took:?}");
    // A timeout that is not a number of seconds is a usage error.
    let o = serval(&["cat", "x", "--via", &via, "--connect-timeout", "soon"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn cat_ends_on_a_reset_connection_while_its_input_is_still_open() {
    // An echo instance that will reset its streams: stopped with two signals (the second
    // closes open connections at once).
    let (mut listener, addr) = support::instance("reset.cat.test", None, &["--echo"]);
    let mut cat = support::Guard(
        support::serval()
            .args([
                "cat",
                "reset.cat.test",
                "--via",
                &addr,
                "--connect-timeout",
                "5",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cat"),
    );
    // Kept open for the whole test: cat never sees the end of its input.
    let mut input = cat.0.stdin.take().unwrap();
    input.write_all(b"hello\n").unwrap();
    let mut echoed = String::new();
    BufReader::new(cat.0.stdout.take().unwrap())
        .read_line(&mut echoed)
        .unwrap();
    assert_eq!(echoed, "hello\n");
    let err = support::lines(cat.0.stderr.take().unwrap());
    for _ in 0..2 {
        let pid = listener.0.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    listener.0.wait().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = cat.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "cat still runs with its connection reset (it waits for its input to end)"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1));
    let said = support::drain(&err).join("\n");
    assert!(said.contains("error: receiving:"), "{said:?}");
    drop(input);
}
