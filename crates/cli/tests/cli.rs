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
