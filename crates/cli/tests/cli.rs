//! Runs the real `serval` binary.

use std::process::{Command, Output};

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
