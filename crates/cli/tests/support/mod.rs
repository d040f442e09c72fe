//! What the CLI's integration tests share: the binary, child-process guards, line readers and
//! the namespace switch. Each test file includes it with `mod support;` and uses what it needs.
#![allow(dead_code)] // not every test file uses every helper

pub mod attack;
pub mod numbered;
pub mod programs;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The `serval` binary under test.
pub fn serval() -> Command {
    Command::new(env!("CARGO_BIN_EXE_serval"))
}

/// Kills the process when dropped, so no test leaves one behind, pass or fail.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of a child's pipe, read on a thread. The pipe is read to its end even after the
/// receiver is dropped, so the child never writes into a closed pipe.
///
/// With `SERVAL_TEST_LOGS=DIR` in the environment, every line also goes to a file of its own
/// in DIR (`<test process id>-<n>.log`), to read a failure's logs afterwards (with
/// `RUST_LOG=debug`, say).
pub fn lines(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let mut copy = std::env::var_os("SERVAL_TEST_LOGS").and_then(|dir| {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::path::Path::new(&dir).join(format!("{}-{n}.log", std::process::id()));
        std::fs::File::create(path).ok()
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if let Some(f) = copy.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            let _ = tx.send(line);
        }
    });
    rx
}

/// Waits (at most 20 s) for a line satisfying `f`.
pub fn wait_line(rx: &mpsc::Receiver<String>, what: &str, f: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if f(&l) => return l,
            Ok(_) => {}
            Err(_) => panic!("no {what} within 20 s"),
        }
    }
}

/// Runs `ip ARGS…`, which must succeed.
pub fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {args:?} failed");
}

/// Whether namespace test `test` can run (root, `ip`, a namespace can be created, and
/// `SERVAL_SKIP_NETNS` unset). If not, the skip is announced in one line, or under `CI=true`
/// the test fails (`serval_testkit::require_netns`).
pub fn netns_usable(test: &str) -> bool {
    serval_testkit::require_netns(test)
}

/// How many lines starting with `prefix` each of `rxs` has printed, waiting (at most `limit`)
/// until they add up to `n`, then collecting stragglers for 200 ms more, so that a line
/// printed twice or by two instances shows as a sum above `n`. Replaces a fixed sleep before
/// an exact count, which flakes on a loaded machine.
pub fn count_lines(
    rxs: &[&mpsc::Receiver<String>],
    prefix: &str,
    n: usize,
    limit: Duration,
) -> Vec<usize> {
    let tally = |counts: &mut [usize], wait: Duration| {
        for (c, rx) in counts.iter_mut().zip(rxs) {
            while let Ok(l) = rx.recv_timeout(wait) {
                *c += usize::from(l.starts_with(prefix));
            }
        }
    };
    let mut counts = vec![0; rxs.len()];
    let deadline = Instant::now() + limit;
    loop {
        tally(&mut counts, Duration::from_millis(10));
        if counts.iter().sum::<usize>() >= n || Instant::now() >= deadline {
            break;
        }
    }
    let stragglers = Instant::now() + Duration::from_millis(200);
    while Instant::now() < stragglers {
        tally(&mut counts, Duration::from_millis(20));
    }
    counts
}

/// Runs `cmd` with `input` on its stdin (written from a thread, so a large input cannot
/// deadlock against its output) and returns (exit code, stdout, stderr).
pub fn run_with_input(mut cmd: Command, input: &[u8]) -> (i32, Vec<u8>, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let w = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("child output");
    w.join().unwrap();
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The lines a reader has collected so far (waiting at most 50 ms for each).
pub fn drain(rx: &mpsc::Receiver<String>) -> Vec<String> {
    std::iter::from_fn(|| rx.recv_timeout(Duration::from_millis(50)).ok()).collect()
}

/// Spawns `cmd` (a `serval` command that prints `READY ADDR…` on stdout once serving) and
/// waits for that line. Returns the guard, the addresses after `READY`, and the lines of its
/// stderr.
pub fn spawn_ready(mut cmd: Command) -> (Guard, String, mpsc::Receiver<String>) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let out = lines(child.stdout.take().unwrap());
    let err = lines(child.stderr.take().unwrap());
    let guard = Guard(child);
    let ready = wait_line(&out, "READY line", |_| true);
    let addrs = ready
        .strip_prefix("READY ")
        .unwrap_or_else(|| panic!("first line {ready:?}"))
        .to_owned();
    (guard, addrs, err)
}

/// A one-member etcd with a temporary data directory, killed and removed on drop: on free
/// loopback ports, or on 127.0.0.1:2379 inside network namespace `netns`. `None` when the
/// test skips (no `etcd` binary, or `SERVAL_SKIP_ETCD` set: one line says so); under
/// `CI=true` both fail the test instead (`serval_testkit::require_etcd`).
pub struct Etcd {
    child: Child,
    dir: std::path::PathBuf,
    /// The registry URL for `serval router --registry`.
    pub url: String,
}

impl Etcd {
    /// On free loopback ports of this namespace, for test `test`.
    pub fn start(test: &str) -> Option<Etcd> {
        Etcd::start_in(test, None)
    }

    /// On loopback inside `netns` (its own ports), or of this namespace, for test `test`.
    pub fn start_in(test: &str, netns: Option<&str>) -> Option<Etcd> {
        match netns {
            Some(_) => Etcd::launch(test, netns, 2379, 2380),
            None => Etcd::launch(test, None, free_port(), free_port()),
        }
    }

    /// On 127.0.0.1:`client` of this namespace (a port chosen earlier, for instance one a
    /// router was already told to use), for test `test`.
    pub fn start_on(test: &str, client: u16) -> Option<Etcd> {
        Etcd::launch(test, None, client, free_port())
    }

    fn launch(test: &str, netns: Option<&str>, client: u16, peer: u16) -> Option<Etcd> {
        let etcd = serval_testkit::require_etcd(test)?;
        // One directory per member: tests of one binary run in parallel, and two members on
        // one data directory fail (the second cannot lock it).
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "serval-cli-etcd-{}-{}-{}",
            std::process::id(),
            netns.unwrap_or("root"),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let c = format!("http://127.0.0.1:{client}");
        let p = format!("http://127.0.0.1:{peer}");
        let mut cmd = match netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                // `ip netns exec` execs etcd: the child is etcd itself, so kill() reaches it.
                cmd.args(["netns", "exec", ns]).arg(&etcd);
                cmd
            }
            None => Command::new(&etcd),
        };
        let child = cmd
            .args(["--name", "m0", "--data-dir"])
            .arg(&dir)
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args([
                "--listen-peer-urls",
                &p,
                "--initial-advertise-peer-urls",
                &p,
            ])
            .args(["--initial-cluster", &format!("m0={p}")])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run etcd ({e}): install etcd-server"));
        Some(Etcd {
            child,
            dir,
            url: format!("etcd://127.0.0.1:{client}"),
        })
    }
}

/// A TCP port on 127.0.0.1 that is free when this returns and stays out of other sockets'
/// way: it lies below the kernel's ephemeral range (32768 and up by default), so no outgoing
/// connection can be given it as its source port while a server is yet to listen there (a
/// router may be told etcd's port seconds before etcd starts). Never the same twice in one
/// process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Each test binary starts at its own place in 20000..32000.
    let base = 20_000 + std::process::id() % 12_000;
    loop {
        let port = 20_000 + (base - 20_000 + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        let port = port as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Hosts on one bridged LAN, each a network namespace with a veth to the bridge (which has a
/// namespace of its own); everything is deleted on drop, pass or fail. Namespaces are named
/// `sv<tag>br<pid>` and `sv<tag>h<i>x<pid>`, so concurrent tests and runs never collide.
pub struct Lan {
    bridge_ns: String,
    /// The hosts' namespaces.
    pub hosts: Vec<String>,
    subnet: String,
}

impl Lan {
    /// `n` hosts; host `i` gets `<subnet>.<i + 1>/24` (`subnet` like `10.79.1`).
    pub fn new(tag: &str, subnet: &str, n: usize) -> Lan {
        Lan::build(tag, subnet, None, n)
    }

    /// [`Lan::new`], and host `i` also gets `<v6>::<i + 1>/64` (`v6` like `fd80`, usable at
    /// once: no duplicate address detection); the bridge floods multicast to every port (no
    /// IGMP snooping).
    pub fn dual_stack(tag: &str, subnet: &str, v6: &str, n: usize) -> Lan {
        Lan::build(tag, subnet, Some(v6), n)
    }

    fn build(tag: &str, subnet: &str, v6: Option<&str>, n: usize) -> Lan {
        let id = std::process::id();
        let lan = Lan {
            bridge_ns: format!("sv{tag}br{id}"),
            hosts: (0..n).map(|i| format!("sv{tag}h{i}x{id}")).collect(),
            subnet: subnet.to_owned(),
        };
        let br = lan.bridge_ns.as_str();
        ip(&["netns", "add", br]);
        let mut bridge = vec!["-n", br, "link", "add", "br0", "type", "bridge"];
        if v6.is_some() {
            bridge.extend(["mcast_snooping", "0"]);
        }
        ip(&bridge);
        ip(&["-n", br, "link", "set", "br0", "up"]);
        for (i, h) in lan.hosts.iter().enumerate() {
            ip(&["netns", "add", h]);
            // Each end of the pair is created in its namespace: nothing is ever left in the
            // root namespace.
            let port = format!("p{i}");
            ip(&[
                "link", "add", &port, "netns", br, "type", "veth", "peer", "name", "eth0", "netns",
                h,
            ]);
            ip(&["-n", br, "link", "set", &port, "master", "br0"]);
            ip(&["-n", br, "link", "set", &port, "up"]);
            let cidr = format!("{subnet}.{}/24", i + 1);
            ip(&["-n", h, "addr", "add", &cidr, "dev", "eth0"]);
            if let Some(v6) = v6 {
                let cidr6 = format!("{v6}::{}/64", i + 1);
                ip(&["-n", h, "addr", "add", &cidr6, "dev", "eth0", "nodad"]);
            }
            ip(&["-n", h, "link", "set", "eth0", "multicast", "on", "up"]);
            ip(&["-n", h, "link", "set", "lo", "up"]);
        }
        lan
    }

    /// `serval ARGS…` on `host` (`ip netns exec` execs it, so the child's pid is serval's).
    pub fn serval(&self, host: usize, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &self.hosts[host],
            env!("CARGO_BIN_EXE_serval"),
        ]);
        c.args(args);
        c
    }

    /// Host `host`'s IPv4 address with `port`.
    pub fn addr(&self, host: usize, port: u16) -> String {
        format!("{}.{}:{port}", self.subnet, host + 1)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain([&self.bridge_ns]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// `serval router --listen 127.0.0.1:0 EXTRA…`; returns it and its address from the READY
/// line.
pub fn router(extra: &[&str]) -> (Guard, String) {
    let mut cmd = serval();
    cmd.args(["router", "--listen", "127.0.0.1:0"]).args(extra);
    let (guard, addr, _) = spawn_ready(cmd);
    assert!(!addr.contains(' '), "one locator: {addr}");
    (guard, addr)
}

/// `serval listen NAME --bind 127.0.0.1:0 EXTRA…` (add `--echo` to `extra` for an echo
/// instance), registered with `router` if given and then returned only once registered;
/// returns it and its locator.
pub fn instance(name: &str, router: Option<&str>, extra: &[&str]) -> (Guard, String) {
    let mut cmd = serval();
    cmd.args(["listen", name, "--bind", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(r) = router {
        cmd.args(["--router", r]);
    }
    let mut child = cmd.spawn().expect("spawn listen");
    let err = lines(child.stderr.take().unwrap());
    let guard = Guard(child);
    let serving = wait_line(&err, "serving line", |l| l.contains("serving"));
    let addr = serving
        .split(" on ")
        .nth(1)
        .and_then(|rest| rest.split([' ', ',']).next())
        .unwrap_or_else(|| panic!("no locator in {serving:?}"))
        .to_owned();
    if router.is_some() {
        wait_line(&err, "registration", |l| l.contains("registered"));
    }
    (guard, addr)
}

/// Runs `cmd` with `input` on its stdin (written from a thread, so a large input cannot
/// deadlock against its output) and returns its output; kills it and fails the test if it
/// takes longer than `limit`.
pub fn output_within(mut cmd: Command, input: &[u8], limit: Duration) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{cmd:?} did not finish within {limit:?}")
        }
    }
}

/// `serval expose SERVICE --to TO --router ROUTER --bind 127.0.0.1:0 EXTRA…`, once it is
/// serving and registered. Returns it, its locators (the READY line), the registration line
/// and the rest of its stderr.
pub fn expose(
    service: &str,
    to: &str,
    router: &str,
    extra: &[&str],
) -> (Guard, String, String, mpsc::Receiver<String>) {
    let mut cmd = serval();
    cmd.args(["expose", service, "--to", to])
        .args(["--router", router, "--bind", "127.0.0.1:0"])
        .args(extra);
    let (guard, addrs, err) = spawn_ready(cmd);
    let registered = wait_line(&err, "expose registration", |l| l.contains("registered"));
    (guard, addrs, registered, err)
}

/// `serval proxy SERVICE --listen 127.0.0.1:0 --router ROUTER EXTRA…`, once it is listening.
/// Returns it, the TCP address it accepts on, and its stderr.
pub fn proxy(
    service: &str,
    router: &str,
    extra: &[&str],
) -> (Guard, String, mpsc::Receiver<String>) {
    let mut cmd = serval();
    cmd.args(["proxy", service, "--listen", "127.0.0.1:0"])
        .args(["--router", router])
        .args(extra);
    spawn_ready(cmd)
}

/// A scratch directory, removed on drop.
pub struct Dir(std::path::PathBuf);

impl Dir {
    /// A new, empty directory named after `tag`, the process and a counter.
    pub fn new(tag: &str) -> Dir {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "serval-test-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    /// The path of `name` in it.
    pub fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `serval keygen FILE`: the public key line it printed.
pub fn keygen(file: &str) -> String {
    let o = serval().args(["keygen", file]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    assert_eq!(out.lines().count(), 1, "{out}");
    out.trim_end().to_owned()
}

/// Two hosts: a pair of namespaces joined by veth (10.77.<net>.0/24, `sv<tag><a|b><pid>`);
/// deleted on drop.
pub struct Netns {
    /// The first namespace (10.77.<net>.1).
    pub a: String,
    /// The second namespace (10.77.<net>.2).
    pub b: String,
    /// The veth ends in `a` and in `b`.
    pub dev_a: String,
    pub dev_b: String,
}

impl Netns {
    /// `a` gets 10.77.<net>.1/24 and `b` 10.77.<net>.2/24.
    pub fn new(tag: &str, net: u8) -> Netns {
        let id = std::process::id();
        let (va, vb) = (format!("v{tag}a{id}"), format!("v{tag}b{id}"));
        let n = Netns {
            a: format!("sv{tag}a{id}"),
            b: format!("sv{tag}b{id}"),
            dev_a: va.clone(),
            dev_b: vb.clone(),
        };
        ip(&["netns", "add", &n.a]);
        ip(&["netns", "add", &n.b]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &n.a]);
        ip(&["link", "set", &vb, "netns", &n.b]);
        for (ns, dev, addr) in [(&n.a, &va, 1), (&n.b, &vb, 2)] {
            let cidr = format!("10.77.{net}.{addr}/24");
            ip(&["-n", ns, "addr", "add", &cidr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        n
    }

    /// The `serval` binary, run in namespace `ns` with `args`.
    pub fn spawn(&self, ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_serval")]);
        c.args(args);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth, which deletes the pair.
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// `len` bytes of a fixed pseudo-random pattern.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Serves `l` as an echo backend, a thread per connection: everything back, then FIN.
pub fn echo_backend(l: std::net::TcpListener) {
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { break };
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

/// `serval router` on `host` of `lan`, listening on `port`, once it printed READY.
pub fn router_on(lan: &Lan, host: usize, port: u16) -> Guard {
    let mut child = lan
        .serval(host, &["router", "--listen", &lan.addr(host, port)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn router");
    let out = lines(child.stdout.take().expect("piped stdout"));
    let guard = Guard(child);
    wait_line(&out, "READY", |l| l.starts_with("READY"));
    guard
}

/// `serval cat SERVICE --via ADDR EXTRA…` sending `hello`: (exit code, stdout, stderr).
pub fn cat_hello(service: &str, via: &str, extra: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = serval();
    cmd.args(["cat", service, "--via", via, "--connect-timeout", "5"])
        .args(extra);
    let o = output_within(cmd, b"hello", Duration::from_secs(30));
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Checks that a [`cat_hello`] failed in one line of stderr containing `expect`, with no
/// data through and a non-zero exit.
pub fn one_line_failure((code, out, err): (Option<i32>, String, String), expect: &str) {
    assert_ne!(code, Some(0), "it succeeded: {out:?} {err:?}");
    assert!(out.is_empty(), "data went through: {out:?}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {err:?}");
    assert!(lines[0].contains(expect), "{:?} lacks {expect:?}", lines[0]);
}
