//! Set-up shared by the network-namespace tests of this crate: two hosts joined by two veth
//! links, a thread per host inside its namespace, and a seeded byte pattern.
//!
//! ```text
//!   client ns                                    server ns
//!   10.78.1.1/24  vm1c<pid> ==== link 1 ==== vm1s<pid>  10.78.1.2/24
//!   10.78.2.1/24  vm2c<pid> ==== link 2 ==== vm2s<pid>  10.78.2.2/24
//!                                                      lo: 10.78.0.1/32 (the service's address)
//! ```
//!
//! The client routes by source address (`ip rule from 10.78.N.1 table 10N`), as a multihomed
//! host does: what its link-N socket sends goes over link N only.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // test harness; not every file uses all

use std::fs::File;
use std::future::Future;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;

use nix::sched::{CloneFlags, setns};

/// Runs `ip ARGS`, panicking with its error output if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The two hosts and the links between them; deleted on drop.
pub struct Hosts {
    pub client: String,
    pub server: String,
    /// The client's end of link 1.
    pub link1: String,
    /// The server's end of link 1, whose transmit drops count what the server sent into the
    /// dead link.
    pub server_link1: String,
    /// The client's end of link 2.
    pub link2: String,
}

impl Hosts {
    /// The two hosts, named `svm<tag><c|s><pid>` so that the tests of this file can run
    /// side by side. Link 1 also carries IPv6 (`fd78:1::1` and `fd78:1::2`).
    pub fn new(tag: &str) -> Hosts {
        let id = std::process::id();
        let hosts = Hosts {
            client: format!("svm{tag}c{id}"),
            server: format!("svm{tag}s{id}"),
            link1: format!("vm1c{id}"),
            server_link1: format!("vm1s{id}"),
            link2: format!("vm2c{id}"),
        };
        // `hosts` exists before the first `ip` call: a step failing part-way panics, which drops
        // it and deletes whatever was made.
        ip(&["netns", "add", &hosts.client]);
        ip(&["netns", "add", &hosts.server]);
        let (c, s) = (hosts.client.as_str(), hosts.server.as_str());
        for ns in [c, s] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&["-n", s, "addr", "add", "10.78.0.1/32", "dev", "lo"]);
        for link in 1..=2 {
            let (vc, vs) = (format!("vm{link}c{id}"), format!("vm{link}s{id}"));
            // Both ends born inside the namespaces: nothing is ever left in the root namespace.
            ip(&[
                "link", "add", &vc, "netns", c, "type", "veth", "peer", "name", &vs, "netns", s,
            ]);
            let (ac, as_) = (format!("10.78.{link}.1"), format!("10.78.{link}.2"));
            ip(&["-n", c, "addr", "add", &format!("{ac}/24"), "dev", &vc]);
            ip(&["-n", s, "addr", "add", &format!("{as_}/24"), "dev", &vs]);
            if link == 1 {
                // Usable at once: no duplicate address detection.
                ip(&["-n", c, "addr", "add", "fd78:1::1/64", "dev", &vc, "nodad"]);
                ip(&["-n", s, "addr", "add", "fd78:1::2/64", "dev", &vs, "nodad"]);
            }
            ip(&["-n", c, "link", "set", &vc, "up"]);
            ip(&["-n", s, "link", "set", &vs, "up"]);
            // Source routing on the client: each address reaches the server over its own link.
            let table = format!("10{link}");
            ip(&["-n", c, "rule", "add", "from", &ac, "table", &table]);
            ip(&[
                "-n",
                c,
                "route",
                "add",
                "10.78.0.1/32",
                "via",
                &as_,
                "dev",
                &vc,
                "table",
                &table,
            ]);
        }
        hosts
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        delete_netns(&[&self.client, &self.server]);
    }
}

/// Deletes the namespaces `names`, ignoring any that is gone: their ends of veth pairs go with
/// them, which deletes the pairs.
pub fn delete_netns(names: &[&str]) {
    for ns in names {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
}

/// Waits, at most `limit`, until every one of `want` is a usable locator of `ep`.
pub async fn usable(
    ep: &serval::Endpoint,
    want: &[std::net::SocketAddr],
    limit: std::time::Duration,
) -> Result<(), String> {
    let deadline = std::time::Instant::now() + limit;
    while !want.iter().all(|w| ep.usable_locators().contains(w)) {
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "{want:?} never all usable: {:?}",
                ep.usable_locators()
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Packets `dev` in namespace `ns` dropped on transmit (a veth drops what it sends while its
/// peer is down).
pub fn tx_dropped(ns: &str, dev: &str) -> u64 {
    let out = Command::new("ip")
        .args(["-n", ns, "-j", "-s", "link", "show", dev])
        .output()
        .expect("run ip");
    let json = String::from_utf8_lossy(&out.stdout);
    let tx = &json[json.find("\"tx\":{").expect("tx statistics")..];
    let n = &tx[tx.find("\"dropped\":").expect("tx dropped") + "\"dropped\":".len()..];
    n[..n.find(|c: char| !c.is_ascii_digit()).unwrap_or(n.len())]
        .parse()
        .expect("a count")
}

/// Runs `task` on a new thread inside network namespace `ns`, on a current-thread runtime of
/// its own: every socket it opens belongs to that namespace.
pub fn in_netns<T, F, Fut>(ns: &str, task: F) -> JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    let path = format!("/run/netns/{ns}");
    std::thread::Builder::new()
        .name(ns.to_string())
        .spawn(move || {
            let f = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // setns(CLONE_NEWNET) moves only the calling thread.
            setns(f, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(task())
        })
        .unwrap()
}

pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Index of the first byte of `got` that differs from `want`.
pub fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    got.iter().zip(want).position(|(a, b)| a != b)
}
