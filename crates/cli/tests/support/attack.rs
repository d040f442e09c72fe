//! What the attack tests (attack_netns.rs, synflood_netns.rs) share: the `attack` binary of
//! serval-bench, and reading its children.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The attacker binary: `SERVAL_ATTACK_BIN`, or built now into the target directory (and
/// profile) of the `serval` binary under test.
pub fn attack_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("SERVAL_ATTACK_BIN") {
        return PathBuf::from(bin);
    }
    let serval = Path::new(env!("CARGO_BIN_EXE_serval"));
    let profile_dir = serval.parent().expect("binary directory");
    let profile = profile_dir
        .file_name()
        .and_then(|p| p.to_str())
        .expect("profile directory");
    let mut target_dir = profile_dir
        .parent()
        .expect("target directory")
        .to_path_buf();
    let mut cmd = Command::new(option_env!("CARGO").unwrap_or("cargo"));
    cmd.args(["build", "--quiet", "-p", "serval-bench", "--bin", "attack"]);
    // target/<triple>/<profile> when cross-building.
    if !target_dir.join("CACHEDIR.TAG").exists()
        && let Some(triple) = target_dir.file_name().and_then(|t| t.to_str())
        && let Some(parent) = target_dir.parent()
        && parent.join("CACHEDIR.TAG").exists()
    {
        cmd.args(["--target", triple]);
        target_dir = parent.to_path_buf();
    }
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    cmd.arg("--target-dir").arg(&target_dir);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = profile_dir.join("attack");
    assert!(bin.is_file(), "{} was not built", bin.display());
    bin
}

/// The one JSON line a child printed on stdout (waiting at most `limit`), parsed.
pub fn json_line(rx: &mpsc::Receiver<String>, what: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with('{') => {
                return serde_json::from_str(&l).unwrap_or_else(|e| panic!("{what}: {e}: {l}"));
            }
            Ok(_) => {}
            Err(_) => panic!("no report from {what} within {limit:?}"),
        }
    }
}

/// Waits (at most `limit`) for `child` to exit; its exit code.
pub fn exit_within(child: &mut Child, what: &str, limit: Duration) -> i32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st.code().unwrap_or(-1);
        }
        assert!(
            Instant::now() < deadline,
            "{what} still running after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
