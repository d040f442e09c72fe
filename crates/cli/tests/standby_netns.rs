//! Hot standby (issue 10), across network namespaces: a router, a client, a primary and its
//! standby on one bridge (10.87.0.0/24). The client streams lines to the primary's `serval
//! listen --number` by name and checks every answer (the line back, numbered from 1 over the
//! connection's whole life) and the SHA-256 of everything it received.
//!
//! - The primary is SIGKILLed mid-transfer: the standby (`--standby-of`) takes the stream over
//!   and it completes byte-exact, nothing lost and nothing twice; the client never reconnects.
//! - The standby is SIGKILLed mid-transfer: the primary stops waiting for it and the stream
//!   completes, unreplicated.
//!
//! Needs root (CI runs as root); everything is created here and removed when the test ends.
//! Elsewhere they skip with one line (`serval_testkit::require_netns`); under `CI=true` they
//! fail instead.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;
use support::numbered::{client, finish, wait_progress};
use support::{Dir, Guard, Lan, keygen, lines, netns_usable, wait_line};

const PORT: u16 = 54324;
const ADMIN: u16 = 9000;
const SERVICE: &str = "count.standby.test";
const ROUTER: usize = 0;
const CLIENT: usize = 1;
const PRIMARY: usize = 2;
const STANDBY: usize = 3;

/// `serval listen SERVICE --number` on `host` with its admin API up: registered, or (with
/// `standby_of`) standing by for the instance on that host.
fn instance(
    lan: &Lan,
    host: usize,
    key: &str,
    standby_of: Option<usize>,
) -> (Guard, mpsc::Receiver<String>) {
    let (bind, router, admin) = (
        lan.addr(host, PORT),
        lan.addr(ROUTER, PORT),
        lan.addr(host, ADMIN),
    );
    let mut args = vec![
        "listen", SERVICE, "--number", "--bind", &bind, "--router", &router, "--admin", &admin,
        "--key", key,
    ];
    let primary = standby_of.map(|p| lan.addr(p, ADMIN));
    if let Some(p) = &primary {
        // Generous against false takeovers on a loaded machine running debug builds, whose
        // checkpoints of a 4 MiB send buffer take milliseconds each (the default is 30 ms).
        args.extend(["--standby-of", p, "--standby-detect", "500"]);
    }
    let mut child = lan
        .serval(host, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn instance");
    let err = lines(child.stderr.take().unwrap());
    let guard = Guard(child);
    wait_line(&err, "the admin API", |l| l.contains("admin API on"));
    if standby_of.is_some() {
        wait_line(&err, "standing by", |l| l.contains("hot standby of"));
    } else {
        wait_line(&err, "the registration", |l| l.contains("registered"));
    }
    (guard, err)
}

fn router(lan: &Lan) -> Guard {
    support::router_on(lan, ROUTER, PORT)
}

fn cat(lan: &Lan) -> std::process::Command {
    lan.serval(
        CLIENT,
        &["cat", SERVICE, "--router", &lan.addr(ROUTER, PORT)],
    )
}

#[test]
fn a_primary_killed_mid_transfer_loses_nothing_its_standby_takes_the_stream_over() {
    if !netns_usable("a_primary_killed_mid_transfer_loses_nothing") {
        return;
    }
    let lan = Lan::new("sb", "10.87.0", 4);
    let dir = Dir::new("standby-netns");
    let key = dir.path("service.key");
    keygen(&key);
    let _router = router(&lan);
    let (primary, _) = instance(&lan, PRIMARY, &key, None);
    let (_standby, standby_err) = instance(&lan, STANDBY, &key, Some(PRIMARY));

    // About 40 MB each way; the first half before the kill, the rest after.
    let total: u64 = 400_000;
    let c = client(cat(&lan), total, total / 2);
    // Most of the first half answered; the rest is in flight both ways.
    wait_progress(&c, total / 2 - total / 100, Duration::from_secs(120));
    drop(primary); // SIGKILL
    c.gate.store(total, Ordering::Relaxed);
    wait_line(&standby_err, "the takeover", |l| {
        l.contains("took over 1 stream(s)")
    });
    finish(c, total);
}

#[test]
fn a_standby_killed_mid_transfer_leaves_the_primary_serving_alone() {
    if !netns_usable("a_standby_killed_mid_transfer") {
        return;
    }
    let lan = Lan::new("sk", "10.86.0", 4);
    let dir = Dir::new("standby-netns-kill");
    let key = dir.path("service.key");
    keygen(&key);
    let _router = router(&lan);
    let (_primary, _) = instance(&lan, PRIMARY, &key, None);
    let (standby, _) = instance(&lan, STANDBY, &key, Some(PRIMARY));

    let total: u64 = 200_000;
    let c = client(cat(&lan), total, total / 2);
    wait_progress(&c, total / 2 - total / 100, Duration::from_secs(120));
    drop(standby); // SIGKILL: the primary's held output waits for it, then goes alone
    c.gate.store(total, Ordering::Relaxed);
    finish(c, total);
}
