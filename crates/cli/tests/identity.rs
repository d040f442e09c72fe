//! Who the server is (issue 12 item 2), with the real binary on loopback: `serval cat
//! --peer-key` against an instance's `--key`, and a self-certifying serviceID from `serval id
//! --key` with `--self-certifying`. A right key connects; a wrong key, an instance without a
//! key, or an ID that does not commit to the instance's key fails the connect with one clear
//! line and a non-zero exit.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::time::Duration;

use support::{Dir, cat_hello, instance, keygen, one_line_failure, output_within, serval};

#[test]
fn a_pinned_key_connects_only_to_its_holder() {
    let dir = Dir::new("pinned");
    let (k1, k2) = (dir.path("k1"), dir.path("k2"));
    let (p1, p2) = (keygen(&k1), keygen(&k2));
    let (_i, addr) = instance("who.test", None, &["--echo", "--key", &k1]);
    let (code, out, err) = cat_hello("who.test", &addr, &["--peer-key", &p1]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "hello");
    one_line_failure(
        cat_hello("who.test", &addr, &["--peer-key", &p2]),
        "not the pinned",
    );
    // Without a key the instance cannot prove anything.
    let (_j, bare) = instance("who.test", None, &["--echo"]);
    one_line_failure(
        cat_hello("who.test", &bare, &["--peer-key", &p1]),
        "no proof",
    );
    // Not asking for a proof still works, encrypted.
    let (code, out, _) = cat_hello("who.test", &bare, &[]);
    assert_eq!((code, out.as_str()), (Some(0), "hello"));
    // A bad --peer-key is a usage error: one line, exit 2.
    let (code, _, err) = cat_hello("who.test", &addr, &["--peer-key", "ed25519:short"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--peer-key"), "{err}");
}

#[test]
fn a_self_certifying_id_needs_the_key_it_commits_to() {
    let dir = Dir::new("selfcert");
    let (k1, k2) = (dir.path("k1"), dir.path("k2"));
    keygen(&k1);
    keygen(&k2);
    let o = serval()
        .args(["id", "--key", &k1, "who.test"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let id = String::from_utf8(o.stdout).unwrap().trim().to_owned();
    // The holder of k1 serves the ID: a client connecting by it needs nothing else.
    let (_good, addr) = instance(&id, None, &["--echo", "--key", &k1]);
    let (code, out, err) = cat_hello(&id, &addr, &["--self-certifying"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "hello");
    // Someone else serving the same ID with another key is refused.
    let (_bad, other) = instance(&id, None, &["--echo", "--key", &k2]);
    one_line_failure(cat_hello(&id, &other, &["--self-certifying"]), "commits to");
}

/// Through a service router: the router forwards the client's padded SYN whole (it keeps the
/// PAD the client paid with), so the instance can still afford its proof.
#[test]
fn the_proof_survives_a_router_on_the_way() {
    let dir = Dir::new("routed");
    let k1 = dir.path("k1");
    let p1 = keygen(&k1);
    let (_r, router) = support::router(&[]);
    let (_i, _) = instance("routed.test", Some(&router), &["--echo", "--key", &k1]);
    let mut cmd = serval();
    cmd.args([
        "cat",
        "routed.test",
        "--router",
        &router,
        "--peer-key",
        &p1,
        "--connect-timeout",
        "5",
    ]);
    let o = output_within(cmd, b"hello", Duration::from_secs(30));
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.stdout, b"hello");
}
