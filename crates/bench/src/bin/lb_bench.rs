//! Load balancing of HTTP between two nginx backends: Serval against HAProxy, on one machine
//! in one run (issue: translator, item 6).
//!
//! Starts two nginx processes on loopback (each one worker, no master, its files and logs in
//! a temporary directory), then both load balancers in front of them, side by side:
//!
//! * **serval**: `wrk → serval proxy → serval expose → nginx`, two exposes (one per nginx)
//!   registered under one name with a `serval router`. The router sees only each TCP
//!   connection's first packet (the SYN, forwarded by name to an instance chosen by weight);
//!   everything after flows proxy ↔ expose directly.
//! * **haproxy**: `wrk → haproxy → nginx`, TCP mode, `balance roundrobin` over the two.
//!
//! For each repetition, for each file (a small one for requests/s, a large one for bytes/s),
//! each balancer gets a 1 s warm-up and then a `wrk` run of `--duration`; the order of the two
//! balancers alternates between repetitions. Around each run the CPU time (utime + stime from
//! `/proc/PID/stat`, all threads) of every balancing process is read: HAProxy's process; for
//! Serval the router, the proxy and the two exposes, each reported. The backends' own CPU and
//! the share of requests each backend served (from its access log) are printed as well.
//! `--direct` adds wrk straight to one nginx, for scale.
//!
//! ```sh
//! cargo build --release -p serval-cli -p serval-bench --bins
//! target/release/lb-bench --serval target/release/serval --reps 3
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

#[path = "../procs.rs"]
mod procs;
use procs::{Proc, Result, free_port, program, serval_ready, wait_listening};

/// HTTP through Serval (proxy → router → expose) against HAProxy in TCP mode.
#[derive(Debug, Parser)]
struct Args {
    /// The serval binary (build it with `cargo build --release -p serval-cli`).
    #[arg(long, default_value = "target/release/serval")]
    serval: PathBuf,
    /// Repetitions; the two balancers alternate which goes first.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seconds of each measured wrk run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Concurrent connections (wrk -c): the clients.
    #[arg(long, default_value_t = 4)]
    connections: u32,
    /// wrk threads (wrk -t).
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// Size in bytes of the small file (requests/s).
    #[arg(long, default_value_t = 1024)]
    small: usize,
    /// Size in bytes of the large file (bytes/s); 0 skips it.
    #[arg(long, default_value_t = 1 << 20)]
    large: usize,
    /// nginx `keepalive_requests` (its default is 1000): requests per client connection, so
    /// also how often Serval resolves a new connection by name.
    #[arg(long, default_value_t = 1000)]
    keepalive_requests: u32,
    /// Only this balancer (`serval`, `haproxy` or `direct`); all by default.
    #[arg(long)]
    only: Option<String>,
    /// Also measure wrk straight to one nginx (no balancer, one backend), for scale.
    #[arg(long)]
    direct: bool,
    /// A new connection per request (wrk sends `Connection: close`): measures connection
    /// set-up and tear-down through each balancer rather than keep-alive requests.
    #[arg(long)]
    close: bool,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("lb-bench: {e}");
        std::process::exit(1);
    }
}

/// One nginx serving `small.bin` and `large.bin`.
struct Nginx {
    proc: Proc,
    port: u16,
    dir: PathBuf,
}

impl Nginx {
    fn start(bin: &Path, dir: PathBuf, args: &Args) -> Result<Nginx> {
        std::fs::create_dir_all(dir.join("www"))?;
        std::fs::create_dir_all(dir.join("tmp"))?;
        std::fs::write(dir.join("www/small.bin"), pattern(args.small))?;
        std::fs::write(dir.join("www/large.bin"), pattern(args.large))?;
        let port = free_port()?;
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 4096; }}\n\
             http {{\n  default_type application/octet-stream;\n  access_log {d}/access.log;\n\
             \x20 client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n\
             \x20 fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n\
             \x20 scgi_temp_path {d}/tmp/scgi;\n  sendfile on;\n  tcp_nopush on;\n\
             \x20 keepalive_requests {};\n  server {{ listen 127.0.0.1:{port}; root {d}/www; }}\n}}\n",
            args.keepalive_requests
        );
        std::fs::write(dir.join("nginx.conf"), conf)?;
        let proc = Proc::spawn(
            "nginx",
            Command::new(bin)
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .arg("-e")
                .arg(dir.join("error.log"))
                .stdout(Stdio::null()),
            &dir.join("stderr.log"),
        )?;
        wait_listening(port, "nginx")?;
        Ok(Nginx { proc, port, dir })
    }

    /// Requests logged so far.
    fn requests(&self) -> usize {
        std::fs::read_to_string(self.dir.join("access.log"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }
}

/// `len` bytes of a fixed printable pattern.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

/// What one wrk run reported.
#[derive(Debug, Clone, Copy, Default)]
struct Wrk {
    requests_per_s: f64,
    bytes_per_s: f64,
    socket_errors: u64,
    non_2xx: u64,
}

/// Runs wrk against `url`.
fn wrk(bin: &Path, url: &str, args: &Args, secs: u64) -> Result<Wrk> {
    let o = Command::new(bin)
        .args(["-t", &args.threads.to_string(), "-c"])
        .arg(args.connections.to_string())
        .args(["-d", &format!("{secs}s"), "--timeout", "10s", url])
        .args(if args.close {
            &["-H", "Connection: close"][..]
        } else {
            &[]
        })
        .output()?;
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    if !o.status.success() {
        return Err(format!("wrk {url}: {text}{}", String::from_utf8_lossy(&o.stderr)).into());
    }
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim_start().strip_prefix(prefix).map(str::trim))
    };
    let requests_per_s = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
    let bytes_per_s = field("Transfer/sec:")
        .and_then(binary_size)
        .ok_or_else(|| format!("no Transfer/sec in wrk's output:\n{text}"))?;
    let socket_errors = field("Socket errors:").map_or(0, |l| {
        l.split(',')
            .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum()
    });
    let non_2xx = field("Non-2xx or 3xx responses:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(Wrk {
        requests_per_s,
        bytes_per_s,
        socket_errors,
        non_2xx,
    })
}

/// wrk's sizes: "19.11MB" is 19.11 × 2^20 bytes.
fn binary_size(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = text.split_at(split);
    let num: f64 = num.parse().ok()?;
    let scale = match unit {
        "B" => 1.0,
        "KB" => 1024.0,
        "MB" => 1024.0 * 1024.0,
        "GB" => 1024.0 * 1024.0 * 1024.0,
        "TB" => 1024f64.powi(4),
        _ => return None,
    };
    Some(num * scale)
}

/// One measured run: wrk's numbers, CPU seconds per process name, requests per backend.
#[derive(Debug, Clone)]
struct Sample {
    wrk: Wrk,
    cpu: BTreeMap<String, f64>,
    backends: (usize, usize),
    wall: f64,
}

/// Warm-up, then one measured run of `url`, reading the CPU time of `procs` around it.
fn measure(
    wrk_bin: &Path,
    url: &str,
    args: &Args,
    procs: &[&Proc],
    backends: &[&Nginx; 2],
) -> Result<Sample> {
    wrk(wrk_bin, url, args, 1)?;
    let before: Vec<Duration> = procs.iter().map(|p| p.cpu()).collect::<Result<_>>()?;
    let logged = (backends[0].requests(), backends[1].requests());
    let t = Instant::now();
    let w = wrk(wrk_bin, url, args, args.duration)?;
    let wall = t.elapsed().as_secs_f64();
    let mut cpu = BTreeMap::new();
    for (p, b) in procs.iter().zip(before) {
        *cpu.entry(p.name.clone()).or_insert(0.0) += (p.cpu()? - b).as_secs_f64();
    }
    Ok(Sample {
        wrk: w,
        cpu,
        backends: (
            backends[0].requests() - logged.0,
            backends[1].requests() - logged.1,
        ),
        wall,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn run(args: &Args) -> Result<()> {
    let nginx_bin = program("nginx")?;
    let haproxy_bin = program("haproxy")?;
    let wrk_bin = program("wrk")?;
    procs::require_serval(&args.serval)?;
    let root = procs::Scratch::new("lb-bench")?;
    run_in(args, root.path(), &nginx_bin, &haproxy_bin, &wrk_bin)
}

fn run_in(
    args: &Args,
    root: &Path,
    nginx_bin: &Path,
    haproxy_bin: &Path,
    wrk_bin: &Path,
) -> Result<()> {
    let a = Nginx::start(nginx_bin, root.join("nginx-a"), args)?;
    let b = Nginx::start(nginx_bin, root.join("nginx-b"), args)?;

    // HAProxy, TCP mode, round robin over the two.
    let hport = free_port()?;
    let hconf = format!(
        "global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  \
         timeout server 60s\nfrontend fe\n  bind 127.0.0.1:{hport}\n  default_backend be\n\
         backend be\n  balance roundrobin\n  server a 127.0.0.1:{}\n  server b 127.0.0.1:{}\n",
        a.port, b.port
    );
    std::fs::write(root.join("haproxy.cfg"), hconf)?;
    let haproxy = Proc::spawn(
        "haproxy",
        Command::new(haproxy_bin)
            .arg("-f")
            .arg(root.join("haproxy.cfg"))
            .arg("-db")
            .stdout(Stdio::null()),
        &root.join("haproxy.log"),
    )?;
    wait_listening(hport, "haproxy")?;

    // Serval: a router, an expose per nginx under one name, a proxy.
    let s = &args.serval;
    let (router, raddr) = serval_ready(
        s,
        "serval router",
        &["router", "--listen", "127.0.0.1:0"],
        &root.join("router.log"),
    )?;
    let mut exposes = Vec::new();
    for (tag, n) in [("a", &a), ("b", &b)] {
        let to = format!("127.0.0.1:{}", n.port);
        let (p, _) = serval_ready(
            s,
            "serval expose",
            &[
                "expose",
                "web.bench",
                "--to",
                &to,
                "--router",
                &raddr,
                "--bind",
                "127.0.0.1:0",
            ],
            &root.join(format!("expose-{tag}.log")),
        )?;
        exposes.push(p);
    }
    let (proxy, paddr) = serval_ready(
        s,
        "serval proxy",
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "web.bench",
            "--router",
            &raddr,
            "--bind",
            "127.0.0.1:0",
        ],
        &root.join("proxy.log"),
    )?;
    // Give the registrations a moment to land in the router.
    std::thread::sleep(Duration::from_millis(500));

    let serval_procs: Vec<&Proc> = [&proxy, &router].into_iter().chain(&exposes).collect();
    let backend_procs = [&a.proc, &b.proc];
    let peers: Vec<(&str, String, Vec<&Proc>)> = [
        ("serval", paddr.clone(), serval_procs),
        ("haproxy", format!("127.0.0.1:{hport}"), vec![&haproxy]),
        ("direct", format!("127.0.0.1:{}", a.port), vec![]),
    ]
    .into_iter()
    .filter(|(name, _, _)| *name != "direct" || args.direct)
    .filter(|(name, _, _)| args.only.as_deref().is_none_or(|o| o == *name))
    .collect();
    let mut files = vec![("small", args.small)];
    if args.large > 0 {
        files.push(("large", args.large));
    }

    println!(
        "# lb-bench: wrk -t {} -c {} -d {}s{}; 2 nginx (1 worker each, keepalive_requests {}); \
         small {} B, large {} B; {} reps",
        args.threads,
        args.connections,
        args.duration,
        if args.close {
            " -H 'Connection: close'"
        } else {
            ""
        },
        args.keepalive_requests,
        args.small,
        args.large,
        args.reps
    );
    let mut samples: BTreeMap<(String, String), Vec<Sample>> = BTreeMap::new();
    for rep in 0..args.reps {
        for (file, _) in &files {
            let mut order: Vec<_> = peers.iter().collect();
            if rep % 2 == 1 {
                order.reverse();
            }
            for (peer, addr, procs) in order {
                let mut all = procs.clone();
                all.extend(backend_procs);
                let url = format!("http://{addr}/{file}.bin");
                let smp = measure(wrk_bin, &url, args, &all, &[&a, &b])?;
                let cpu: Vec<String> = smp
                    .cpu
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.2}s"))
                    .collect();
                println!(
                    "rep {rep} {peer:7} {file:5}: {:>9.0} req/s {:>8.1} MiB/s  errors {} non-2xx {}  \
                     backends {}/{}  cpu: {}",
                    smp.wrk.requests_per_s,
                    smp.wrk.bytes_per_s / (1 << 20) as f64,
                    smp.wrk.socket_errors,
                    smp.wrk.non_2xx,
                    smp.backends.0,
                    smp.backends.1,
                    cpu.join(", ")
                );
                samples
                    .entry(((*file).to_owned(), (*peer).to_owned()))
                    .or_default()
                    .push(smp);
            }
        }
    }

    println!();
    println!(
        "| file | balancer | req/s (min–max) | MiB/s | balancer CPU (s per s of run) | of which | balancer CPU per request | backends' CPU | socket errors / non-2xx |"
    );
    println!("|---|---|---:|---:|---:|---|---:|---:|---:|");
    let mut medians: BTreeMap<(String, String), (f64, f64)> = BTreeMap::new();
    for ((file, peer), v) in &samples {
        let rps = median(v.iter().map(|s| s.wrk.requests_per_s).collect());
        let (lo, hi) = v
            .iter()
            .map(|s| s.wrk.requests_per_s)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| {
                (lo.min(r), hi.max(r))
            });
        let bps = median(v.iter().map(|s| s.wrk.bytes_per_s).collect());
        medians.insert((file.clone(), peer.clone()), (rps, bps));
        let per_s = |name: &str| {
            median(
                v.iter()
                    .map(|s| s.cpu.get(name).copied().unwrap_or(0.0) / s.wall)
                    .collect(),
            )
        };
        let names: Vec<&String> = v[0].cpu.keys().filter(|k| *k != "nginx").collect();
        let total = median(
            v.iter()
                .map(|s| {
                    s.cpu
                        .iter()
                        .filter(|(k, _)| *k != "nginx")
                        .map(|(_, c)| c)
                        .sum::<f64>()
                        / s.wall
                })
                .collect(),
        );
        let parts: Vec<String> = names
            .iter()
            .map(|n| format!("{n} {:.2}", per_s(n)))
            .collect();
        // (A sum of no terms is -0.0; `direct` has no balancer.)
        let (total, per_request) = if parts.is_empty() {
            ("—".to_owned(), "—".to_owned())
        } else {
            (
                format!("{total:.2}"),
                format!("{:.1} µs", total / rps * 1e6),
            )
        };
        let errors: u64 = v.iter().map(|s| s.wrk.socket_errors).sum();
        let non_2xx: u64 = v.iter().map(|s| s.wrk.non_2xx).sum();
        println!(
            "| {file} | {peer} | {rps:.0} ({lo:.0}–{hi:.0}) | {:.1} | {total} | {} | {per_request} | {:.2} | {errors} / {non_2xx} |",
            bps / (1 << 20) as f64,
            parts.join(", "),
            per_s("nginx"),
        );
    }
    for (file, _) in &files {
        let get = |p: &str| medians.get(&((*file).to_owned(), p.to_owned())).copied();
        if let (Some(s), Some(h)) = (get("serval"), get("haproxy")) {
            let key = |p: &str| ((*file).to_owned(), p.to_owned());
            let per_rep: Vec<String> = samples[&key("serval")]
                .iter()
                .zip(&samples[&key("haproxy")])
                .map(|(s, h)| format!("{:.2}", s.wrk.requests_per_s / h.wrk.requests_per_s))
                .collect();
            // Balancer CPU per request, per repetition (the router, proxy and exposes summed).
            let cpu_per_request = |smp: &Sample| {
                let cpu: f64 = smp
                    .cpu
                    .iter()
                    .filter(|(k, _)| *k != "nginx")
                    .map(|(_, c)| c)
                    .sum();
                cpu / (smp.wrk.requests_per_s * smp.wall)
            };
            let cpu_ratio: Vec<f64> = samples[&key("serval")]
                .iter()
                .zip(&samples[&key("haproxy")])
                .map(|(s, h)| cpu_per_request(s) / cpu_per_request(h))
                .collect();
            println!(
                "ratio serval/haproxy, {file}: {:.2}x requests/s, {:.2}x bytes/s (medians); \
                 per repetition {}; balancer CPU per request {:.2}x (median; per repetition {})",
                s.0 / h.0,
                s.1 / h.1,
                per_rep.join(", "),
                median(cpu_ratio.clone()),
                cpu_ratio
                    .iter()
                    .map(|r| format!("{r:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(())
}
