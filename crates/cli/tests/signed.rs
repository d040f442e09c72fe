//! `serval keygen`, `serval id --key`, `serval router --authorize` and `serval listen --key`,
//! end to end on loopback with the real binary (issue 12 item 4); their one-line usage errors;
//! and two routers sharing one etcd, where an authorisation given to one is enforced by both.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::io::Write as _;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use support::{Dir, Etcd, Guard, keygen, lines, router, serval, wait_line};

/// Exit code and stderr of `serval ARGS…` (which must end by itself).
fn fails(args: &[&str]) -> (Option<i32>, String) {
    let cmd = {
        let mut c = serval();
        c.args(args);
        c
    };
    let o: Output = support::output_within(cmd, b"", Duration::from_secs(20));
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `serval listen NAME --echo --bind 127.0.0.1:0 --router R EXTRA…`, with its stderr lines.
fn listen(name: &str, router: &str, extra: &[&str]) -> (Guard, std::sync::mpsc::Receiver<String>) {
    let mut child = serval()
        .args([
            "listen",
            name,
            "--echo",
            "--bind",
            "127.0.0.1:0",
            "--router",
            router,
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn listen");
    let err = lines(child.stderr.take().unwrap());
    (Guard(child), err)
}

/// `serval cat NAME --router R` with `input`; bounded.
fn cat(name: &str, router: &str, input: &[u8]) -> Output {
    let mut cmd = serval();
    cmd.args(["cat", name, "--router", router, "--connect-timeout", "5"]);
    support::output_within(cmd, input, Duration::from_secs(30))
}

#[test]
fn keygen_writes_a_private_file_once_and_prints_the_public_line() {
    let dir = Dir::new("keygen");
    let file = dir.path("k");
    let line = keygen(&file);
    assert!(line.starts_with("ed25519:"), "{line}");
    assert_eq!(line.len(), 8 + 43, "{line}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.starts_with("-----BEGIN SERVAL PRIVATE KEY-----\n"),
        "{text}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    // Never over an existing file: one line, exit 2, the key untouched.
    let (code, e) = fails(&["keygen", &file]);
    assert_eq!(code, Some(2), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);

    // `serval id --key`: the same ID from the public line and from the private file; its
    // first half is the name's.
    let pubfile = dir.path("k.pub");
    std::fs::write(&pubfile, format!("{line}\n")).unwrap();
    let id = |key: &str| {
        let o = serval()
            .args(["id", "--key", key, "web.example.com"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap().trim_end().to_owned()
    };
    let from_pub = id(&pubfile);
    assert_eq!(from_pub, id(&file));
    assert_eq!(from_pub.len(), 64);
    let plain = serval().args(["id", "web.example.com"]).output().unwrap();
    let plain = String::from_utf8(plain.stdout).unwrap();
    assert_eq!(from_pub[..32], plain[..32]);
    assert_ne!(from_pub[32..], plain[32..64]);
    // Another key, another ID.
    let other = keygen(&dir.path("k2"));
    std::fs::write(dir.path("k2.pub"), &other).unwrap();
    assert_ne!(id(&dir.path("k2.pub")), from_pub);
}

#[test]
fn bad_keys_and_authorizations_are_one_line_and_exit_2() {
    let dir = Dir::new("bad");
    let garbage = dir.path("garbage");
    std::fs::write(&garbage, "not a key\n").unwrap();
    let good = keygen(&dir.path("k"));
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["router".into(), "--authorize".into(), "nokey".into()],
            "PREFIX=PUBKEY",
        ),
        (
            vec![
                "router".into(),
                "--authorize".into(),
                "web.test=ed25519:short".into(),
            ],
            "43 base64url",
        ),
        (
            vec![
                "router".into(),
                "--authorize".into(),
                "web.test=AAAA".into(),
            ],
            "ed25519:",
        ),
        (
            vec![
                "router".into(),
                "--authorize".into(),
                format!("bad..name={good}"),
            ],
            "prefix",
        ),
        (
            vec![
                "listen".into(),
                "web.test".into(),
                "--key".into(),
                "/nonexistent/k".into(),
            ],
            "cannot read key file /nonexistent/k",
        ),
        (
            vec![
                "listen".into(),
                "web.test".into(),
                "--key".into(),
                garbage.clone(),
            ],
            "not a Serval private key file",
        ),
        (
            vec![
                "expose".into(),
                "web.test".into(),
                "--to".into(),
                "127.0.0.1:1".into(),
                "--key".into(),
                "/nonexistent/k".into(),
            ],
            "cannot read key file",
        ),
        (
            vec![
                "id".into(),
                "--key".into(),
                "/nonexistent/k".into(),
                "web.test".into(),
            ],
            "cannot read key file",
        ),
        (
            vec![
                "id".into(),
                "--key".into(),
                garbage.clone(),
                "web.test".into(),
            ],
            "ed25519:",
        ),
    ];
    let bad_config = dir.path("bad.toml");
    std::fs::write(&bad_config, "authorize = [\"web.test\"]\n").unwrap();
    let mut cases = cases;
    cases.push((
        vec!["router".into(), "--config".into(), bad_config.clone()],
        "authorize \"web.test\"",
    ));
    for (args, want) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, e) = fails(&args);
        assert_eq!(code, Some(2), "{args:?}: {e}");
        assert_eq!(e.lines().count(), 1, "{args:?}: {e}");
        assert!(e.contains(want), "{args:?}: {e}");
    }
}

#[test]
fn only_the_signed_instance_of_an_authorized_name_is_reachable() {
    let dir = Dir::new("e2e");
    let key = dir.path("web.key");
    let line = keygen(&key);
    let admin = free_tcp_port();
    let (_router, addr) = router(&[
        "--authorize",
        &format!("web.test={line}"),
        "--admin",
        &admin,
    ]);

    // Unsigned: one clear line, never routable.
    let (_unsigned, err) = listen("web.test", &addr, &[]);
    let refused = wait_line(&err, "refusal", |l| l.contains("refused"));
    assert_eq!(
        refused,
        format!(
            "serval: router {addr} refused the registration of web.test: not signed by the key \
             authorized for {} (or a prefix covering it; --key FILE signs)",
            serval_wire::ServicePrefix::parse("web.test").unwrap()
        )
    );
    let o = cat("web.test", &addr, b"x");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no route to service web.test"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Signed by another key: refused too.
    let other = dir.path("other.key");
    keygen(&other);
    let (_wrong, err) = listen("web.test", &addr, &["--key", &other]);
    wait_line(&err, "refusal", |l| l.contains("refused the registration"));

    // Signed by the authorised key: registered and reachable by name.
    let (_signed, err) = listen("web.test", &addr, &["--key", &key]);
    wait_line(&err, "registration", |l| l.contains("registered web.test"));
    let o = cat("web.test", &addr, b"signed hello\n");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout, b"signed hello\n");

    // Counted in the metrics; an open name needs no key.
    let metrics = http_get(&admin, "/metrics");
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("serval_router_registrations_rejected_unauthorized_total "))
        .expect("metric")
        .trim()
        .parse()
        .unwrap();
    assert!(refused >= 2, "{metrics}");
    let (_open, err) = listen("open.test", &addr, &[]);
    wait_line(&err, "registration", |l| l.contains("registered open.test"));
}

#[test]
fn a_config_file_authorizes_like_the_flag() {
    let dir = Dir::new("config");
    let line = keygen(&dir.path("k"));
    let config = dir.path("router.toml");
    std::fs::write(&config, format!("authorize = [\"web.test={line}\"]\n")).unwrap();
    let (_router, addr) = router(&["--config", &config]);
    let (_unsigned, err) = listen("web.test", &addr, &[]);
    wait_line(&err, "refusal", |l| {
        l.contains("refused the registration of web.test")
    });
    let (_signed, err) = listen("web.test", &addr, &["--key", &dir.path("k")]);
    wait_line(&err, "registration", |l| l.contains("registered web.test"));
}

fn free_tcp_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn http_get(admin: &str, path: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

/// `serval router --listen 127.0.0.1:0 --registry URL --admin ADMIN EXTRA…`, once READY and
/// synced with etcd (at most 30 s). Returns it and its address.
fn router_on(registry: &str, admin: &str, extra: &[&str]) -> (Guard, String) {
    let mut child = serval()
        .args(["router", "--listen", "127.0.0.1:0", "--registry", registry])
        .args(["--admin", admin])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn router");
    let out = lines(child.stdout.take().unwrap());
    let guard = Guard(child);
    let ready = wait_line(&out, "READY", |_| true);
    let addr = ready.strip_prefix("READY ").unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health = http_get(admin, "/health");
        if health.contains("synced") {
            return (guard, addr);
        }
        assert!(
            Instant::now() < deadline,
            "router on {registry} not synced within 30 s: {health}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of gauge or counter `name` in `admin`'s metrics.
fn metric(admin: &str, name: &str) -> u64 {
    http_get(admin, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_owned))
        .unwrap_or_else(|| panic!("no metric {name}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn routers_sharing_etcd_enforce_an_authorization_given_to_one() {
    const TEST: &str = "routers_sharing_etcd_enforce_an_authorization_given_to_one";
    let Some(etcd) = Etcd::start(TEST) else {
        return;
    };
    let dir = Dir::new("etcd");
    let key = dir.path("web.key");
    let line = keygen(&key);
    let (admin_a, admin_b) = (free_tcp_port(), free_tcp_port());
    let (_a, _addr_a) = router_on(
        &etcd.url,
        &admin_a,
        &["--authorize", &format!("web.test={line}")],
    );
    let (_b, addr_b) = router_on(&etcd.url, &admin_b, &[]);
    // B learns A's authorisation through etcd (a watch: wait for it, bounded).
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&admin_b, "serval_router_authorizations") < 1 {
        assert!(
            Instant::now() < deadline,
            "router B never saw the authorisation"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // At B, which was given no --authorize: unsigned is refused, signed is registered.
    let (_unsigned, err) = listen("web.test", &addr_b, &[]);
    wait_line(&err, "refusal at B", |l| {
        l.contains("refused the registration of web.test")
    });
    let (_signed, err) = listen("web.test", &addr_b, &["--key", &key]);
    wait_line(&err, "registration at B", |l| {
        l.contains("registered web.test")
    });
    let o = cat("web.test", &addr_b, b"via b\n");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout, b"via b\n");
    assert!(
        metric(
            &admin_b,
            "serval_router_registrations_rejected_unauthorized_total"
        ) >= 1
    );
    // Exactly one registration of web.test in the shared registry: the signed one.
    let table = serval()
        .args(["table", "--admin", &admin_b])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    let web = serval_wire::ServicePrefix::parse("web.test")
        .unwrap()
        .to_string();
    assert_eq!(
        table.lines().filter(|l| l.starts_with(&web)).count(),
        1,
        "{table}"
    );
}
