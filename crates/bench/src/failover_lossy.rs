//! `failover-bench lossy`: the delay of small writes over two paths when one of them loses
//! packets (issue 11's redundant scheduler), Serval against Linux MPTCP in the same run on the
//! same topology as the failover runs.
//!
//! The client sends [`MESSAGE`]-byte messages every [`EVERY`] for [`MESSAGES`] messages; the
//! server echoes each at once; the client times each message from its write to the end of its
//! echo. Both paths are up before the measurement (Serval's joined path over link 2, MPTCP's
//! second subflow, which joins after a first exchange of one message), and then nftables drops `--loss` percent of the packets on link 1, each
//! way, at random (`numgen random`), links and addresses up. Stacks: `serval-mp` (multipath,
//! lowest-RTT scheduler at both ends), `serval-red` (multipath, the redundant scheduler at
//! both ends), `mptcp` (two subflows, the kernel's default scheduler; `TCP_NODELAY`).
//!
//! ```sh
//! sudo target/release/failover-bench lossy --reps 5
//! ```

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    SERVER_LINKS, SERVICE, Topology, accept_mptcp, connect_mptcp, connect_serval_with, field,
    median, nft, run_pair,
};

/// Bytes per message.
pub const MESSAGE: usize = 300;
/// Time between two messages.
pub const EVERY: Duration = Duration::from_millis(10);
/// Messages per repetition.
pub const MESSAGES: usize = 500;
/// The message of the exchange before the measurement.
const WARMUP: [u8; MESSAGE] = [0xa5; MESSAGE];
/// Stacks of `lossy`, in the order they run in each repetition.
pub const STACKS: &str = "serval-mp,serval-red,mptcp";

/// What one repetition measured: each message's delay, sorted.
pub struct Delays(Vec<Duration>);

impl Delays {
    fn at(&self, q: f64) -> Duration {
        let i = ((self.0.len() as f64 - 1.0) * q).round() as usize;
        self.0[i.min(self.0.len() - 1)]
    }
}

/// The Serval endpoint configuration of a lossy run: multipath, with the redundant scheduler
/// if `redundant`.
fn config(redundant: bool) -> serval::EndpointConfig {
    let mut c = super::multipath_config();
    if redundant {
        c.transport.scheduler = serval::Scheduler::Redundant;
    }
    c
}

/// Serval's echo server (inside the server namespace), on an address on each link.
pub async fn serve_serval(redundant: bool) {
    let binds: Vec<SocketAddr> = SERVER_LINKS
        .iter()
        .map(|a| format!("{a}:54324").parse().unwrap())
        .collect();
    let ep = serval::Endpoint::bind_with(&binds, config(redundant))
        .await
        .unwrap();
    let service = serval::ServiceId::from_name(SERVICE).unwrap();
    let mut l = ep.listen(serval::ServicePrefix::exact(service)).unwrap();
    println!("ready");
    let mut s = l.accept().await.unwrap();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// MPTCP's echo server (inside the server namespace).
pub fn serve_mptcp() {
    let (_listener, mut c) = accept_mptcp();
    c.set_nodelay(true).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Drops `loss` percent of the packets on `link`, each way, at random (nftables, in this
/// namespace).
fn lose(link: &str, loss: u32) -> Result<(), String> {
    nft(&format!(
        "table inet lossy {{\n chain out {{ type filter hook output priority 0; oifname \
         \"{link}\" numgen random mod 100 < {loss} drop; }}\n chain in {{ type filter hook \
         input priority 0; iifname \"{link}\" numgen random mod 100 < {loss} drop; }}\n}}\n"
    ))
}

/// The message `i` (its bytes say which it is, so that the echo is checked).
fn message(i: usize) -> Vec<u8> {
    (0..MESSAGE).map(|j| (i * 31 + j) as u8).collect()
}

/// Takes echoed bytes: checks them and, when a message is complete, its delay from when it
/// was written (`sent[i]`).
struct Echoes {
    got: usize,
    sent: Arc<Mutex<Vec<Instant>>>,
    delays: Vec<Duration>,
}

impl Echoes {
    fn new(sent: Arc<Mutex<Vec<Instant>>>) -> Echoes {
        Echoes {
            got: 0,
            sent,
            delays: Vec::new(),
        }
    }

    /// Accounts for `data`; returns whether every message came back.
    fn take(&mut self, data: &[u8]) -> Result<bool, String> {
        let now = Instant::now();
        for b in data {
            let (i, j) = (self.got / MESSAGE, self.got % MESSAGE);
            if *b != (i * 31 + j) as u8 {
                return Err(format!("echoed byte {} differs", self.got));
            }
            self.got += 1;
            if j == MESSAGE - 1 {
                let at = self.sent.lock().unwrap().get(i).copied();
                let at = at.ok_or("an echo before its message was written")?;
                self.delays.push(now - at);
            }
        }
        Ok(self.delays.len() == MESSAGES)
    }

    fn report(mut self) -> String {
        self.delays.sort();
        let d = Delays(self.delays);
        format!(
            "p50_us={} p99_us={} max_us={}",
            d.at(0.5).as_micros(),
            d.at(0.99).as_micros(),
            d.at(1.0).as_micros()
        )
    }
}

/// The client (inside the client namespace): connects, starts the loss on `link1`, sends the
/// messages and times their echoes; prints the percentiles.
pub async fn client_serval(link1: &str, loss: u32, redundant: bool) -> Result<String, String> {
    let (_ep, mut s) = connect_serval_with(&[1, 2], config(redundant)).await?;
    // One exchange first, as for MPTCP (whose second subflow needs it).
    let mut echo = [0u8; MESSAGE];
    s.write_all(&WARMUP).await.map_err(|e| e.to_string())?;
    s.read_exact(&mut echo).await.map_err(|e| e.to_string())?;
    if echo != WARMUP {
        return Err("the warm-up echo differs".into());
    }
    lose(link1, loss)?;
    let (mut r, mut w) = s.into_split();
    let sent = Arc::new(Mutex::new(Vec::with_capacity(MESSAGES)));
    let writer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            for i in 0..MESSAGES {
                tick.tick().await;
                sent.lock().unwrap().push(Instant::now());
                if w.write_all(&message(i)).await.is_err() {
                    return;
                }
            }
        })
    };
    let mut echoes = Echoes::new(sent);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(20), r.read(&mut buf))
            .await
            .map_err(|_| "stalled 20 s".to_string())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("server ended".into());
        }
        if echoes.take(&buf[..n])? {
            writer.abort();
            return Ok(echoes.report());
        }
    }
}

/// [`client_serval`] for MPTCP.
pub fn client_mptcp(link1: &str, loss: u32) -> Result<String, String> {
    let mut c = connect_mptcp(Duration::from_secs(20))?;
    c.set_nodelay(true).map_err(|e| e.to_string())?;
    // The second subflow joins by itself (`ip mptcp endpoint`) once the connection is fully
    // established, which takes data: one exchange first. Then give it the time Serval's
    // client waits for its path at most, and start the loss when it is there.
    let mut echo = [0u8; MESSAGE];
    c.write_all(&WARMUP).map_err(|e| e.to_string())?;
    c.read_exact(&mut echo).map_err(|e| e.to_string())?;
    if echo != WARMUP {
        return Err("the warm-up echo differs".into());
    }
    wait_subflows(2, Duration::from_secs(5))?;
    lose(link1, loss)?;
    let sent = Arc::new(Mutex::new(Vec::with_capacity(MESSAGES)));
    let mut w = c.try_clone().map_err(|e| e.to_string())?;
    let writer = {
        let sent = sent.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            for i in 0..MESSAGES {
                let due = start + EVERY * i as u32;
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                sent.lock().unwrap().push(Instant::now());
                if w.write_all(&message(i)).is_err() {
                    return;
                }
            }
        })
    };
    let mut echoes = Echoes::new(sent);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = c.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("server ended".into());
        }
        if echoes.take(&buf[..n])? {
            let _ = writer.join();
            return Ok(echoes.report());
        }
    }
}

/// Waits until this namespace has `n` established TCP connections to the server's port
/// (MPTCP's subflows show as such), at most `limit`.
fn wait_subflows(n: usize, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        let out = Command::new("ss")
            .args(["-Htn", "state", "established", "dport", "5201"])
            .output()
            .map_err(|e| format!("ss: {e}"))?;
        let have = String::from_utf8_lossy(&out.stdout).lines().count();
        if have >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            let all = Command::new("ss")
                .args(["-tanM"])
                .output()
                .map_err(|e| e.to_string())?;
            return Err(format!(
                "{have} MPTCP subflows after {limit:?}, not {n}: {}",
                String::from_utf8_lossy(&all.stdout)
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One repetition of `stack`: the client's percentiles (p50, p99, max).
fn once(stack: &str, loss: u32) -> Result<[Duration; 3], String> {
    let t = Topology::new(stack == "mptcp", None);
    let serve: &[&str] = match stack {
        "serval-mp" => &["lossy-serve", "serval"],
        "serval-red" => &["lossy-serve", "serval", "--redundant"],
        _ => &["lossy-serve", "mptcp"],
    };
    let loss = loss.to_string();
    let text = run_pair(
        &t,
        serve,
        &["lossy-client", stack, &t.link1, "--loss", &loss],
    )?;
    let us = |k: &str| field(&text, k).map(|v| Duration::from_micros(v as u64));
    Ok([us("p50_us=")?, us("p99_us=")?, us("max_us=")?])
}

/// Every repetition of every stack, then the table.
pub fn run(reps: usize, loss: u32, stacks: &[String]) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut runs: Vec<(&str, Vec<[Duration; 3]>)> =
        stacks.iter().map(|s| (s.as_str(), Vec::new())).collect();
    for rep in 0..reps {
        for (stack, v) in runs.iter_mut() {
            match once(stack, loss) {
                Ok(p) => {
                    eprintln!(
                        "rep {rep} {stack}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                        ms(p[0]),
                        ms(p[1]),
                        ms(p[2])
                    );
                    v.push(p);
                }
                Err(e) => eprintln!("rep {rep} {stack}: {e}"),
            }
        }
    }
    let column = |v: &[[Duration; 3]], k: usize| {
        let mut c: Vec<f64> = v.iter().map(|p| ms(p[k])).collect();
        let m = median(&mut c);
        (m, c[0], c[c.len() - 1])
    };
    let mptcp = runs
        .iter()
        .find(|(s, v)| *s == "mptcp" && !v.is_empty())
        .map(|(_, v)| column(v, 1).0);
    println!(
        "| stack | reps | median p50 | median p99 (min–max) | p99 ÷ MPTCP's | median max \
         (min–max) |"
    );
    println!("|---|---|---|---|---|---|");
    for (stack, v) in &runs {
        if v.is_empty() {
            println!("| {stack} | 0 | – | – | – | – |");
            continue;
        }
        let (p50, _, _) = column(v, 0);
        let (p99, p99a, p99b) = column(v, 1);
        let (mx, mxa, mxb) = column(v, 2);
        let ratio = mptcp.map_or("–".to_string(), |m| format!("{:.3}×", p99 / m));
        println!(
            "| {stack} | {} | {p50:.2} ms | {p99:.2} ms ({p99a:.2}–{p99b:.2}) | {ratio} | \
             {mx:.2} ms ({mxa:.2}–{mxb:.2}) |",
            v.len()
        );
    }
}
