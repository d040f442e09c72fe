#!/usr/bin/env bash
# Issue 12's benchmarks in one go (as root, from the workspace root, after
# `cargo build --release -p serval-bench --bins`): encrypted and plaintext Serval against
# tokio TCP, TCP + TLS 1.3 (tokio-rustls) and quinn, bulk and connect+echo, over veth and
# loopback; then the SYN flood. Records the load (uptime, vmstat every 5 s) beside the numbers:
# on a shared VM they mean little without it.
#
#   crates/bench/scripts/issue12.sh            # REPS=5 OUT=/tmp/issue12
set -euo pipefail
bin=${BIN_DIR:-target/release}
out=${OUT:-/tmp/issue12}
reps=${REPS:-5}
mkdir -p "$out"
vmstat -t 5 >"$out/vmstat.log" &
vm=$!
trap 'kill $vm 2>/dev/null || true' EXIT
{ date -u; uptime; } | tee "$out/load-start"
"$bin/transfer-bench" run --topology veth,loopback \
  --stacks serval,serval-plaintext,tcp,tcp-tls,tcp-tls-resume,quinn \
  --reps "$reps" >"$out/transfer.md" 2>"$out/transfer.log"
{ date -u; uptime; } | tee "$out/load-mid"
"$bin/syn-flood-bench" run --reps "$reps" >"$out/flood.md" 2>"$out/flood.log"
{ date -u; uptime; } | tee "$out/load-end"
cat "$out/transfer.md" "$out/flood.md"
