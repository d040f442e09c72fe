//! A client of the line-numbering service (`serval listen --number`) for the tests that move
//! its stream between instances: `serval cat` fed numbered lines from a thread (no further than
//! a gate the test opens), its answers checked on another thread as they come.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::Guard;

/// The client's line `i`.
pub fn line(i: u64) -> String {
    let pad = (i.wrapping_mul(7919) % 150) as usize;
    format!("{i:09} {}\n", "abcdefghij".repeat(15).get(..pad).unwrap())
}

/// The client: `serval cat SERVICE` through the router, fed `total` lines from a thread (no
/// further than `gate`); a second thread checks every answer as it comes and counts them in
/// `progress`. Joining the reader gives the SHA-256 of what it received and of what it
/// expected, and how many answers.
pub struct Client {
    pub cat: Guard,
    reader: std::thread::JoinHandle<([u8; 32], [u8; 32], u64)>,
    /// Answers checked so far.
    pub progress: Arc<AtomicU64>,
    /// Lines the writer may send.
    pub gate: Arc<AtomicU64>,
}

pub fn client(mut cat: Command, total: u64, gate: u64) -> Client {
    let mut child: Child = cat
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn cat");
    let mut stdin = child.stdin.take().unwrap();
    let gate = Arc::new(AtomicU64::new(gate));
    let g = gate.clone();
    std::thread::spawn(move || {
        let mut out = std::io::BufWriter::with_capacity(1 << 16, &mut stdin);
        for i in 0..total {
            if i >= g.load(Ordering::Relaxed) {
                if out.flush().is_err() {
                    return;
                }
                while i >= g.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            if out.write_all(line(i).as_bytes()).is_err() {
                return;
            }
        }
        let _ = out.flush();
    });
    let stdout = child.stdout.take().unwrap();
    let progress = Arc::new(AtomicU64::new(0));
    let p = progress.clone();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::with_capacity(1 << 16, stdout);
        let (mut got, mut want) = (Sha256::new(), Sha256::new());
        let mut buf = String::new();
        let mut n = 0;
        while n < total {
            buf.clear();
            if r.read_line(&mut buf).unwrap_or(0) == 0 {
                break;
            }
            let expected = format!("{} {}", n + 1, line(n));
            assert_eq!(buf, expected, "answer {n}");
            got.update(buf.as_bytes());
            want.update(expected.as_bytes());
            n += 1;
            p.store(n, Ordering::Relaxed);
        }
        (got.finalize().into(), want.finalize().into(), n)
    });
    Client {
        cat: Guard(child),
        reader,
        progress,
        gate,
    }
}

pub fn wait_progress(c: &Client, at_least: u64, limit: Duration) {
    let start = Instant::now();
    while c.progress.load(Ordering::Relaxed) < at_least {
        assert!(
            start.elapsed() < limit,
            "the client got {} answers, not {at_least}, in {limit:?}",
            c.progress.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn finish(mut c: Client, total: u64) {
    let (got, want, n) = c.reader.join().expect("every answer checked");
    assert_eq!(n, total, "answers received");
    assert_eq!(got, want, "SHA-256 of the whole answer stream");
    let start = Instant::now();
    loop {
        if let Some(st) = c.cat.0.try_wait().unwrap() {
            assert!(st.success(), "cat exited with {st}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "cat did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
