//! The skip policy seen from outside: this binary runs itself as a child test process with and
//! without `CI=true` and checks what a user sees in plain `cargo test` output (libtest captures
//! `eprintln!` of passing tests, so the skip line must bypass the capture).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

use std::process::{Command, Output};

/// Run by the tests below in a child process only (`SERVAL_TESTKIT_CHILD` set): needs a
/// program nobody has.
#[test]
fn child_needs_a_missing_program() {
    if std::env::var_os("SERVAL_TESTKIT_CHILD").is_none() {
        return;
    }
    let Some(_) =
        serval_testkit::require_program("child_needs_a_missing_program", "serval-no-such-program")
    else {
        return;
    };
    panic!("found a program that does not exist");
}

/// Child only: asks to skip through `SERVAL_SKIP_NETNS`.
#[test]
fn child_skip_variable() {
    if std::env::var_os("SERVAL_TESTKIT_CHILD").is_none() {
        return;
    }
    assert!(!serval_testkit::require_netns("child_skip_variable"));
}

/// Runs the child test `name` of this binary, captured as `cargo test` does by default.
fn child(name: &str, ci: Option<&str>, skip_netns: bool) -> Output {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", name, "--test-threads", "1"])
        .env("SERVAL_TESTKIT_CHILD", "1")
        .env_remove("CI")
        .env_remove("SERVAL_SKIP_NETNS");
    if let Some(ci) = ci {
        cmd.env("CI", ci);
    }
    if skip_netns {
        cmd.env("SERVAL_SKIP_NETNS", "1");
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_missing_program_skips_with_one_visible_line_outside_ci() {
    let o = child("child_needs_a_missing_program", None, false);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    let skipped: Vec<&str> = out.lines().filter(|l| l.starts_with("SKIPPED")).collect();
    assert_eq!(
        skipped,
        [format!(
            "SKIPPED child_needs_a_missing_program: serval-no-such-program is not installed \
             (Debian package serval-no-such-program); to run it: {}",
            serval_testkit::APT_GET
        )],
        "{out}"
    );
}

#[test]
fn a_missing_program_fails_under_ci() {
    let o = child("child_needs_a_missing_program", Some("true"), false);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("CI=true: nothing may be skipped"), "{out}");
    assert!(out.contains(serval_testkit::APT_GET), "{out}");
}

#[test]
fn a_skip_variable_skips_outside_ci_and_fails_under_ci() {
    let o = child("child_skip_variable", None, true);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("SKIPPED child_skip_variable: SERVAL_SKIP_NETNS is set"),
        "{out}"
    );
    let o = child("child_skip_variable", Some("true"), true);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("SERVAL_SKIP_NETNS is set, but CI=true runs every test"),
        "{out}"
    );
}
