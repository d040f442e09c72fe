//! A client of the line-numbering service (`serval listen --number`) for the tests that move
//! its stream between instances: `serval cat` fed numbered lines from a thread (no further than
//! a gate the test opens), its answers checked on another thread as they come.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
/// expected, how many answers, and the first wrong one if any. `cat`'s stderr is kept so a
/// failure can say why it stopped.
pub struct Client {
    pub cat: Guard,
    reader: std::thread::JoinHandle<Answers>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// Answers checked so far.
    pub progress: Arc<AtomicU64>,
    /// Lines the writer may send.
    pub gate: Arc<AtomicU64>,
}

struct Answers {
    got: [u8; 32],
    want: [u8; 32],
    n: u64,
    wrong: Option<String>,
}

pub fn client(mut cat: Command, total: u64, gate: u64) -> Client {
    let mut child: Child = cat
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cat");
    let mut stdin = child.stdin.take().unwrap();
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let said = super::lines(child.stderr.take().unwrap());
    let kept = stderr.clone();
    std::thread::spawn(move || {
        for l in said {
            kept.lock().unwrap().push(l);
        }
    });
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
        let (mut n, mut wrong) = (0, None);
        while n < total {
            buf.clear();
            if r.read_line(&mut buf).unwrap_or(0) == 0 {
                break;
            }
            let expected = format!("{} {}", n + 1, line(n));
            if buf != expected {
                wrong = Some(format!(
                    "answer {n} is {buf:?}, not {expected:?}{}",
                    if buf.ends_with('\n') {
                        ""
                    } else {
                        " (the stream ended inside it)"
                    }
                ));
                break;
            }
            got.update(buf.as_bytes());
            want.update(expected.as_bytes());
            n += 1;
            p.store(n, Ordering::Relaxed);
        }
        Answers {
            got: got.finalize().into(),
            want: want.finalize().into(),
            n,
            wrong,
        }
    });
    Client {
        cat: Guard(child),
        reader,
        stderr,
        progress,
        gate,
    }
}

impl Client {
    /// Waits (up to `limit`) for `cat` to have printed a line on stderr containing `text`.
    pub fn wait_said(&self, text: &str, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(text))
            {
                return l.clone();
            }
            assert!(
                start.elapsed() < limit,
                "cat did not say {text:?} in {limit:?}; {}",
                cat_said(&self.stderr)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

pub fn wait_progress(c: &Client, at_least: u64, limit: Duration) {
    let start = Instant::now();
    while c.progress.load(Ordering::Relaxed) < at_least {
        assert!(
            start.elapsed() < limit,
            "the client got {} answers, not {at_least}, in {limit:?}; {}",
            c.progress.load(Ordering::Relaxed),
            cat_said(&c.stderr)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What `cat` printed on stderr so far, for a failure message.
fn cat_said(stderr: &Mutex<Vec<String>>) -> String {
    let lines = stderr.lock().unwrap();
    let tail = &lines[lines.len().saturating_sub(20)..];
    format!(
        "cat's stderr (last {} lines):\n{}",
        tail.len(),
        tail.join("\n")
    )
}

pub fn finish(c: Client, total: u64) {
    let st = finish_exit(c, total);
    assert!(st.success(), "cat exited with {st}");
}

/// [`finish`], returning how `cat` exited instead of requiring success.
pub fn finish_exit(c: Client, total: u64) -> std::process::ExitStatus {
    let Client {
        mut cat,
        reader,
        stderr,
        ..
    } = c;
    let a = reader.join().expect("every answer checked");
    if a.wrong.is_some() || a.n != total {
        // cat's stderr ends when it exits; give its last words a moment to arrive.
        let start = Instant::now();
        while cat.0.try_wait().ok().flatten().is_none() && start.elapsed() < Duration::from_secs(2)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        panic!(
            "{} after {} of {total} answers; cat {}\n{}",
            a.wrong.as_deref().unwrap_or("the stream ended"),
            a.n,
            match cat.0.try_wait() {
                Ok(Some(st)) => format!("exited with {st}"),
                _ => "was still running".to_string(),
            },
            cat_said(&stderr)
        );
    }
    assert_eq!(a.got, a.want, "SHA-256 of the whole answer stream");
    let start = Instant::now();
    loop {
        if let Some(st) = cat.0.try_wait().unwrap() {
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "cat did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
