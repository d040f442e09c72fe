//! What the CLI's integration tests share: the binary, child-process guards, line readers and
//! the namespace switch. Each test file includes it with `mod support;` and uses what it needs.
#![allow(dead_code)] // not every test file uses every helper

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

/// Lines of a child's pipe, read on a thread.
pub fn lines(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
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

/// Whether the namespace tests should run (`SERVAL_SKIP_NETNS` skips them, saying so).
pub fn netns_usable() -> bool {
    if std::env::var_os("SERVAL_SKIP_NETNS").is_some() {
        eprintln!("SKIPPED: SERVAL_SKIP_NETNS is set");
        return false;
    }
    true
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
