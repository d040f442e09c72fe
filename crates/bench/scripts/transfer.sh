#!/usr/bin/env bash
# Runs the stream-transport benchmarks of BENCHMARKS.md ("Stream transport (issue: engine)"):
# bulk throughput and connect+echo latency (Serval, kernel TCP, quinn; loopback and two network
# namespaces joined by a veth pair), then heap per idle connection. Needs root (namespaces).
# Extra arguments go to `transfer-bench run` (e.g. --reps 5, --bytes 256M, --verify).
set -euo pipefail
cd "$(dirname "$0")/../../.."
cargo build --release -p serval-bench --bins
iperf=()
if command -v iperf3 >/dev/null; then iperf=(--iperf3); fi
target/release/transfer-bench run --topology loopback,veth --reps 3 "${iperf[@]}" "$@"
target/release/conn-mem-bench --conns 2000 --reps 3
