//! Real programs for the tests that run them (`programs.rs`, `expose_handover.rs`): finding
//! them (or skipping), scratch directories, servers on free loopback ports (nginx,
//! redis-server), curl, files of known content and their sha256.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{Guard, output_within};

/// The paths of `names` for `test`, or `None` when one is missing (the test then returns; one
/// line on stderr said why and how to install it). Under `CI=true` a missing program fails the
/// test instead: CI installs them all (`.ci/run`). See `serval_testkit::require_programs`.
pub fn programs<const N: usize>(test: &str, names: [&str; N]) -> Option<[PathBuf; N]> {
    serval_testkit::require_programs(test, names)
}

/// A temporary directory, removed (with everything in it) on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("serval-programs-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free loopback TCP port (bound and released; the server binds it right after).
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a server on a free loopback port: `spawn(port)` runs it, and it is ready once
/// something accepts TCP connections on the port (waiting at most 20 s). The port is free when
/// picked but another process may take it first, so a server that exits before listening is
/// tried again on a new port, three times in all; then the test fails, showing `log`.
pub fn start_server(
    what: &str,
    log: &Path,
    spawn: impl Fn(u16) -> std::process::Child,
) -> (Guard, u16) {
    for _ in 0..3 {
        let port = free_tcp_port();
        let mut child = Guard(spawn(port));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return (child, port);
            }
            if let Some(st) = child.0.try_wait().unwrap() {
                eprintln!("{what} exited ({st}) before listening on {port}; trying another port");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what} not listening within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let log = std::fs::read_to_string(log).unwrap_or_default();
    panic!("{what} never started:\n{log}");
}

/// Sends `SIG` (a name such as "TERM") to a process.
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -{sig} {pid}");
}

/// `sha256sum FILE`, the hex digest.
pub fn sha256(file: &Path) -> String {
    let o = Command::new("sha256sum").arg(file).output().unwrap();
    assert!(o.status.success(), "sha256sum {}", file.display());
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// Writes `len` pseudo-random bytes (xorshift, seeded) to `path`.
pub fn write_random_file(path: &Path, len: usize, seed: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = seed | 1;
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for word in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    f.flush().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Real servers
// ---------------------------------------------------------------------------------------------

/// One nginx process (no master, no daemon) serving `DIR/www` on a loopback port, with its
/// configuration, pid, error and access logs in its own temporary directory.
pub struct Nginx {
    _guard: Guard,
    /// The loopback port it serves.
    pub port: u16,
    /// Its directory (`www/` is the web root).
    pub dir: Scratch,
}

impl Nginx {
    /// Starts nginx serving `index.html` and whatever `before` writes into its web root (the
    /// directory it is given); `keepalive_requests` bounds the requests per connection.
    pub fn start(nginx: &Path, keepalive_requests: u32, before: impl FnOnce(&Path)) -> Nginx {
        let dir = Scratch::new("nginx");
        let d = dir.path().display().to_string();
        std::fs::create_dir_all(dir.path().join("www")).unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        std::fs::write(dir.path().join("www/index.html"), "hello from nginx\n").unwrap();
        before(&dir.path().join("www"));
        let conf = |port: u16| {
            format!(
                "daemon off;\n\
             master_process off;\n\
             worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
             \x20 default_type application/octet-stream;\n\
             \x20 access_log {d}/access.log;\n\
             \x20 client_body_temp_path {d}/tmp/body;\n\
             \x20 proxy_temp_path {d}/tmp/proxy;\n\
             \x20 fastcgi_temp_path {d}/tmp/fastcgi;\n\
             \x20 uwsgi_temp_path {d}/tmp/uwsgi;\n\
             \x20 scgi_temp_path {d}/tmp/scgi;\n\
             \x20 sendfile on;\n\
             \x20 keepalive_requests {keepalive_requests};\n\
             \x20 server {{\n\
             \x20   listen 127.0.0.1:{port};\n\
             \x20   root {d}/www;\n\
             \x20 }}\n\
             }}\n"
            )
        };
        let (guard, port) = start_server("nginx", &dir.path().join("error.log"), |port| {
            std::fs::write(dir.path().join("nginx.conf"), conf(port)).unwrap();
            Command::new(nginx)
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(dir.path().join("nginx.conf"))
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn nginx")
        });
        Nginx {
            _guard: guard,
            port,
            dir,
        }
    }

    /// Requests in its access log so far.
    pub fn requests(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }
}

/// `curl` fetching `url` into `out` (or /dev/null); bounded by `--max-time`. Returns
/// (success, the HTTP status curl saw, curl's stderr).
pub fn curl(
    curl: &Path,
    url: &str,
    out: Option<&Path>,
    max_time: u64,
    extra: &[&str],
) -> (bool, String, String) {
    let mut cmd = Command::new(curl);
    cmd.args(["-sS", "--fail", "--max-time", &max_time.to_string()])
        .args(extra)
        .args(["-w", "%{http_code}", "-o"])
        .arg(out.unwrap_or(Path::new("/dev/null")))
        .arg(url);
    let o = output_within(cmd, b"", Duration::from_secs(max_time + 10));
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).trim().to_owned(),
    )
}

/// `redis-server` on a free loopback port, with no persistence, its files in `dir`; returns
/// it and its port once it accepts connections.
pub fn redis_server(redis_server: &Path, dir: &Scratch) -> (Guard, u16) {
    let log = dir.path().join("redis.log");
    start_server("redis-server", &log, |port| {
        Command::new(redis_server)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server")
    })
}
