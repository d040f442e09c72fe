//! The skip policy shared by every test that needs something outside Rust: a program from a
//! Debian package (etcd, nginx, curl, …) or network namespaces (root and `ip`).
//!
//! On a machine without them a test *skips*: it writes one line to the real standard error
//! (not through `eprintln!`, which the test harness captures for passing tests, so the line
//! shows in plain `cargo test` output) naming the test, what is missing and the one
//! `apt-get install` line that provides everything the suite uses, then returns early. Under
//! `CI=true` nothing skips: the same text fails the test (CI installs every program and runs
//! as root).
//!
//! `SERVAL_SKIP_NETNS` and `SERVAL_SKIP_ETCD` still skip the namespace and etcd tests on
//! purpose (see [`skip_requested`]), but are refused under `CI=true`.
//!
//! ```no_run
//! #[test]
//! fn curl_through_the_proxy() {
//!     let Some(curl) = serval_testkit::require_program("curl_through_the_proxy", "curl") else {
//!         return; // skipped, and said so
//!     };
//!     // … std::process::Command::new(curl) …
//! }
//! ```
#![deny(missing_docs)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The one command that installs every program the tests use (Debian/Ubuntu package names).
pub const APT_GET: &str = "sudo apt-get install iproute2 etcd-server nginx curl wrk iperf3 \
                           redis-server redis-tools haproxy tshark nftables";

/// Directories searched after `PATH`: nginx, haproxy and `ip` live in sbin directories, which a
/// non-root `PATH` may lack.
const SBIN: [&str; 3] = ["/usr/sbin", "/sbin", "/usr/local/sbin"];

/// Whether this run is CI's (`CI=true`, any case), where nothing may skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// The Debian package that provides `program` (the program's own name when it is the same).
pub fn debian_package(program: &str) -> &str {
    match program {
        "ip" | "ss" | "tc" => "iproute2",
        "etcd" => "etcd-server",
        "redis-cli" => "redis-tools",
        "sha256sum" => "coreutils",
        "nft" => "nftables",
        other => other,
    }
}

/// Where `program` is installed: `PATH`, then `/usr/sbin`, `/sbin` and `/usr/local/sbin`.
/// An absolute or relative path (containing `/`) is taken as it is if it is a file.
pub fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN.map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Skips `test` because of `why` (e.g. "nginx is not installed"): writes
/// `SKIPPED <test>: <why>; to run it: <APT_GET>` as one line straight to standard error, or,
/// under `CI=true`, panics with the same text. The caller returns right after.
#[track_caller]
pub fn skip(test: &str, why: &str) {
    announce(test, &format!("{why}; to run it: {APT_GET}"));
}

/// [`skip`] for something no package provides (an IPv6 loopback, a kernel feature):
/// `SKIPPED <test>: <why>; to run it: <to_run>`, or under `CI=true` a panic with that text.
#[track_caller]
pub fn skip_with(test: &str, why: &str, to_run: &str) {
    announce(test, &format!("{why}; to run it: {to_run}"));
}

/// Writes `SKIPPED <test>: <text>` (or panics with it under `CI=true`).
#[track_caller]
fn announce(test: &str, text: &str) {
    let line = format!("SKIPPED {test}: {text}");
    if in_ci() {
        panic!("{line} (CI=true: nothing may be skipped)");
    }
    SKIPS.fetch_add(1, Ordering::Relaxed);
    // One write of the whole line, so that lines of concurrent tests do not interleave.
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(format!("{line}\n").as_bytes());
    let _ = err.flush();
}

/// How many skips this test binary has announced so far.
pub fn skips() -> usize {
    SKIPS.load(Ordering::Relaxed)
}

static SKIPS: AtomicUsize = AtomicUsize::new(0);

/// Whether the environment variable `var` (e.g. `SERVAL_SKIP_ETCD`) asks to skip `test`.
/// If it is set, the skip is announced (`SKIPPED <test>: <var> is set; unset it to run it`)
/// and `true` returned; under `CI=true` a set variable fails the test instead (CI must never
/// skip).
#[track_caller]
pub fn skip_requested(test: &str, var: &str) -> bool {
    if std::env::var_os(var).is_none() {
        return false;
    }
    if in_ci() {
        panic!("{test}: {var} is set, but CI=true runs every test: unset {var}");
    }
    announce(test, &format!("{var} is set; unset it to run it"));
    true
}

/// The path of `program`, or `None` after announcing that `test` skips because it is not
/// installed (see [`skip`]; under `CI=true` the test fails instead). Looks in `PATH` and the
/// sbin directories ([`find_program`]).
#[track_caller]
pub fn require_program(test: &str, program: &str) -> Option<PathBuf> {
    let found = find_program(program);
    if found.is_none() {
        skip(
            test,
            &format!(
                "{program} is not installed (Debian package {})",
                debian_package(program)
            ),
        );
    }
    found
}

/// [`require_program`] for several programs: all their paths, or `None` after announcing the
/// skip, naming every missing one.
#[track_caller]
pub fn require_programs<const N: usize>(test: &str, programs: [&str; N]) -> Option<[PathBuf; N]> {
    let found = programs.map(find_program);
    let missing: Vec<String> = programs
        .iter()
        .zip(&found)
        .filter(|(_, f)| f.is_none())
        .map(|(p, _)| format!("{p} ({})", debian_package(p)))
        .collect();
    if !missing.is_empty() {
        skip(test, &format!("not installed: {}", missing.join(", ")));
        return None;
    }
    Some(found.map(|p| p.unwrap_or_default()))
}

/// The `etcd` binary for `test`: `SERVAL_ETCD_BIN` if set, else `etcd` from `PATH` or the sbin
/// directories. `None` after announcing the skip when `SERVAL_SKIP_ETCD` is set or etcd is not
/// installed (Debian `etcd-server`); under `CI=true` both fail the test instead.
#[track_caller]
pub fn require_etcd(test: &str) -> Option<PathBuf> {
    if skip_requested(test, "SERVAL_SKIP_ETCD") {
        return None;
    }
    match std::env::var_os("SERVAL_ETCD_BIN") {
        Some(bin) => {
            let bin = PathBuf::from(bin);
            if find_program(&bin.to_string_lossy()).is_none() {
                skip(
                    test,
                    &format!("SERVAL_ETCD_BIN={} is not a file", bin.display()),
                );
                return None;
            }
            Some(bin)
        }
        None => require_program(test, "etcd"),
    }
}

/// Whether `test` can build hosts in network namespaces: `SERVAL_SKIP_NETNS` is not set,
/// `ip` (iproute2) is installed, and a namespace can really be created (root). Otherwise the
/// skip is announced and `false` returned (naming the apt-get line without `ip`, running as
/// root without the permission); under `CI=true` the test fails instead. The probe (creating
/// and deleting one namespace, `svtk<pid>`) runs once per test binary.
#[track_caller]
pub fn require_netns(test: &str) -> bool {
    if skip_requested(test, "SERVAL_SKIP_NETNS") {
        return false;
    }
    match netns_probe() {
        Ok(()) => true,
        Err(why) if find_program("ip").is_none() => {
            skip(test, why);
            false
        }
        Err(why) => {
            skip_with(
                test,
                why,
                "run the tests as root (sudo -E cargo test), as CI does",
            );
            false
        }
    }
}

/// Creates and deletes one namespace, once per process; the reason it cannot, if it cannot.
fn netns_probe() -> Result<(), &'static str> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    let r = PROBE.get_or_init(|| {
        let Some(ip) = find_program("ip") else {
            return Err("ip is not installed (Debian package iproute2)".to_owned());
        };
        let ns = format!("svtk{}", std::process::id());
        let add = Command::new(&ip)
            .args(["netns", "add", &ns])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match add {
            Ok(o) if o.status.success() => {
                let _ = Command::new(&ip)
                    .args(["netns", "del", &ns])
                    .stderr(Stdio::null())
                    .status();
                Ok(())
            }
            Ok(o) => Err(format!(
                "cannot create a network namespace: `ip netns add` said {:?}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!("cannot run {}: {e}", ip.display())),
        }
    });
    r.as_ref().map(|_| ()).map_err(|e| e.as_str())
}

/// Runs `nft -f -` inside network namespace `ns` with `script` on its standard input; panics
/// with nft's error and the script if it fails (a test's set-up step).
pub fn nft(ns: &str, script: &str) {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nft");
    child
        .stdin
        .take()
        .expect("nft's stdin")
        .write_all(script.as_bytes())
        .expect("write nft's script");
    let out = child.wait_with_output().expect("wait for nft");
    assert!(
        out.status.success(),
        "nft failed: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_program_on_path_and_not_a_missing_one() {
        assert!(find_program("sh").is_some());
        assert!(find_program("serval-no-such-program").is_none());
        assert!(find_program("/bin/sh").is_some());
    }

    #[test]
    fn packages() {
        assert_eq!(debian_package("redis-cli"), "redis-tools");
        assert_eq!(debian_package("etcd"), "etcd-server");
        assert_eq!(debian_package("nginx"), "nginx");
        for p in ["iproute2", "etcd-server", "nginx", "redis-tools", "tshark"] {
            assert!(APT_GET.split(' ').any(|w| w == p), "{p} in {APT_GET}");
        }
    }
}
