//! Child processes of the process-level benchmarks (`lb-bench`, `soak-bench`): spawning
//! them, waiting for a serval command's `READY` line, and reading their CPU time and memory
//! from `/proc`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Errors of the benchmark drivers: reported as one line, then exit 1.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// [`std::result::Result`] with a [`BoxError`].
pub type Result<T, E = BoxError> = std::result::Result<T, E>;

/// A child process, killed on drop; its name for reports.
pub struct Proc {
    /// What reports call it.
    pub name: String,
    /// The process.
    pub child: Child,
}

impl Proc {
    /// Spawns `cmd` with stdin from /dev/null and stderr to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc> {
        let child = cmd
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .map_err(|e| format!("cannot run {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
        })
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time used so far, all threads (utime + stime).
    #[allow(dead_code)]
    pub fn cpu(&self) -> Result<Duration> {
        cpu_time(self.pid())
    }

    /// Resident set size now, in bytes (`VmRSS` of /proc/PID/status).
    #[allow(dead_code)]
    pub fn rss(&self) -> Result<u64> {
        rss(self.pid())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of a process from /proc/PID/stat.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = stat.rsplit_once(')').ok_or("bad /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let utime: u64 = fields[11].parse()?;
    let stime: u64 = fields[12].parse()?;
    Ok(Duration::from_secs_f64(
        (utime + stime) as f64 / clock_ticks()?,
    ))
}

/// `VmRSS` of a process from /proc/PID/status, in bytes.
pub fn rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .ok_or("no VmRSS in /proc status")?
        .parse()?;
    Ok(kib * 1024)
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`).
fn clock_ticks() -> Result<f64> {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    if let Some(t) = TICKS.get() {
        return Ok(*t);
    }
    let o = Command::new("getconf").arg("CLK_TCK").output()?;
    let t: f64 = String::from_utf8_lossy(&o.stdout).trim().parse()?;
    Ok(*TICKS.get_or_init(|| t))
}

/// A TCP port free right now on 127.0.0.1.
#[allow(dead_code)]
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Where an installed program is: `PATH`, then /usr/sbin and /sbin.
#[allow(dead_code)]
pub fn program(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{name} is not installed (apt-get install {name})").into())
}

/// Waits (at most 20 s) for something to accept TCP connections on `port`.
#[allow(dead_code)]
pub fn wait_listening(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("{what} not listening on {port} within 20 s").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Spawns a serval subcommand and waits (at most 20 s) for its `READY …` line; returns the
/// process and what follows `READY `. Later stdout lines are drained on a thread.
pub fn serval_ready(bin: &Path, name: &str, args: &[&str], log: &Path) -> Result<(Proc, String)> {
    let mut cmd = Command::new(bin);
    cmd.args(args).stdout(Stdio::piped());
    let mut proc = Proc::spawn(name, &mut cmd, log)?;
    let out = proc.child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .map_err(|_| format!("{name}: no READY line within 20 s (log: {})", log.display()))?;
    let rest = line
        .strip_prefix("READY ")
        .ok_or_else(|| format!("{name}: first line {line:?}"))?;
    Ok((proc, rest.to_owned()))
}

/// Fails with the build command to run if the `serval` binary under test is missing.
pub fn require_serval(bin: &Path) -> Result<()> {
    if bin.is_file() {
        Ok(())
    } else {
        Err(format!(
            "{} not found: cargo build --release -p serval-cli",
            bin.display()
        )
        .into())
    }
}

/// A fresh directory for a benchmark's configs and logs, removed when dropped (pass or fail).
pub struct Scratch(PathBuf);

impl Scratch {
    /// `$TMPDIR/<bench>-<pid>`, emptied first.
    pub fn new(bench: &str) -> Result<Scratch> {
        let root = std::env::temp_dir().join(format!("{bench}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        Ok(Scratch(root))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
