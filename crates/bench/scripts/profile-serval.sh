#!/usr/bin/env bash
# Profiles one Serval bulk transfer with `perf record` (cpu-clock sampling; this VM has no
# hardware counters) on the server (receiver) and the client (sender), and prints the top
# symbols of each. Usage (as root, from the workspace root, after
# `cargo build --release -p serval-bench --bins`):
#
#   crates/bench/scripts/profile-serval.sh loopback [BYTES]
#   crates/bench/scripts/profile-serval.sh veth [BYTES]      # two namespaces, MTU 1500
#
# Add CALLGRAPH=1 for DWARF call graphs (much larger files, slower); STACK=serval-plaintext
# profiles the authenticated-only variant (default: serval, encrypted).
set -euo pipefail
topo=${1:-loopback}
bytes=${2:-2G}
bin=${BIN:-target/release/transfer-bench}
stack=${STACK:-serval}
out=${OUT:-/tmp/serval-profile}
mkdir -p "$out"
cg=()
if [[ "${CALLGRAPH:-0}" == 1 ]]; then cg=(--call-graph dwarf,32768); fi

srv_ns=() cli_ns=() srv_ip=127.0.0.1 cli_ip=127.0.0.1
cleanup() {
  [[ -n "${perf_pid:-}" ]] && kill -INT "$perf_pid" 2>/dev/null || true
  [[ -n "${perf_pid:-}" ]] && { timeout 20 tail --pid="$perf_pid" -f /dev/null || true; }
  if [[ "$topo" == veth ]]; then
    ip netns del sprof-srv 2>/dev/null || true
    ip netns del sprof-cli 2>/dev/null || true
  fi
}
trap cleanup EXIT
if [[ "$topo" == veth ]]; then
  ip netns del sprof-srv 2>/dev/null || true
  ip netns del sprof-cli 2>/dev/null || true
  timeout 10 ip netns add sprof-srv
  timeout 10 ip netns add sprof-cli
  timeout 10 ip link add spv-srv netns sprof-srv mtu 1500 type veth peer name spv-cli netns sprof-cli mtu 1500
  timeout 10 ip -n sprof-srv addr add 10.88.0.1/24 dev spv-srv
  timeout 10 ip -n sprof-cli addr add 10.88.0.2/24 dev spv-cli
  for ns in sprof-srv sprof-cli; do
    timeout 10 ip -n $ns link set lo up
  done
  timeout 10 ip -n sprof-srv link set spv-srv up
  timeout 10 ip -n sprof-cli link set spv-cli up
  srv_ns=(ip netns exec sprof-srv) cli_ns=(ip netns exec sprof-cli)
  srv_ip=10.88.0.1 cli_ip=10.88.0.2
fi
port=$((30000 + $$ % 20000))
# The server exits when its stdin closes; keep it open with a sleeping writer.
sleep 600 | "${srv_ns[@]}" perf record -q -e cpu-clock -F 2000 "${cg[@]}" -o "$out/server.data" \
  "$bin" server --stack "$stack" --mode bulk --bind "$srv_ip:$port" >"$out/server.log" 2>&1 &
perf_pid=$(pgrep -n -f "perf record -q -e cpu-clock -F 2000 .*-o $out/server.data")
for _ in $(seq 100); do grep -q READY "$out/server.log" 2>/dev/null && break; sleep 0.1; done
timeout 300 "${cli_ns[@]}" perf record -q -e cpu-clock -F 2000 "${cg[@]}" -o "$out/client.data" \
  "$bin" client --stack "$stack" --mode bulk --connect "$srv_ip:$port" --bind "$cli_ip:0" --bytes "$bytes"
cleanup
perf_pid=
for side in client server; do
  echo "== $side ($topo): top symbols, % of samples"
  perf report -i "$out/$side.data" --stdio --no-children --sort sym 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | head -25
done
