#!/usr/bin/env python3
"""What a hot standby of `serval expose` costs and what it saves (protocol.md §4.6), on
loopback, with a TCP client through `serval proxy --via PRIMARY` and a TCP backend.

Throughput: the backend streams SIZE MiB to each connection as fast as it goes; the client
downloads it. Three set-ups, in alternation, REPS times each:
  plain     `serval expose` (the splice of protocol.md §4.4);
  socket    `expose --standby-socket` with no standby attached: the replicated splice alone
            (the backend's bytes peeked, sent as a step's output, then consumed);
  standby   the same with a standby attached (`expose --standby-of`): every step waits for
            the standby's confirmation before the backend's bytes are consumed and before the
            client sees anything of it.
Printed per repetition: Mb/s of each; then the medians, spreads and ratios against plain.

Recovery: the backend sends 1 KiB every 0.5 ms (about 2 MB/s); the primary is SIGKILLed 1 s
into the download. Printed per repetition: the client's longest gap between two reads around
the kill (detection, import, re-bind, the takeover's reconciliation of the backend socket),
the longest gap in the second before (the pacing and the machine's jitter), and whether the
client received every byte exactly once, in order.

Latency: the paced download of Recovery (3 MiB), nobody killed, in each set-up of
Throughput: the client's longest gap between two reads.

Usage: contrib/expose-standby.py [SERVAL_BINARY] [REPS] [SIZE_MIB]
PARTS=throughput,latency,recovery (the default: all) chooses what runs.
"""
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

S = sys.argv[1] if len(sys.argv) > 1 else "./target/release/serval"
REPS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
SIZE = (int(sys.argv[3]) if len(sys.argv) > 3 else 200) << 20
PARTS = os.environ.get("PARTS", "throughput,latency,recovery").split(",")
SERVICE = "bench.standby.test"


def payload(n):
    """A pattern that shows a byte lost, repeated or out of place."""
    block = bytes((i * 7 + i // 251) & 0xFF for i in range(1 << 16))
    return (block * (n // len(block) + 1))[:n]


class Backend:
    """Serves each connection `data`, paced (`chunk` bytes every `pace` s) or at full speed,
    with TCP_NODELAY (Nagle's algorithm against the translator's delayed ACKs holds small
    paced writes back by ~33 ms, plain expose or not)."""

    def __init__(self, data, chunk=1 << 16, pace=0.0):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.data, self.chunk, self.pace = data, chunk, pace
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            c, _ = self.sock.accept()
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self.send, args=(c,), daemon=True).start()

    def send(self, c):
        view = memoryview(self.data)
        nxt = time.monotonic()
        try:
            for off in range(0, len(view), self.chunk):
                c.sendall(view[off:off + self.chunk])
                if self.pace:
                    nxt += self.pace
                    d = nxt - time.monotonic()
                    if d > 0:
                        time.sleep(d)
            c.shutdown(socket.SHUT_WR)
            while c.recv(1 << 16):
                pass
        except OSError:
            pass
        c.close()


def start(cmd, want, stream="stderr"):
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []

    def pump(f):
        for l in f:
            lines.append(l)

    threading.Thread(target=pump, args=(p.stdout,), daemon=True).start()
    threading.Thread(target=pump, args=(p.stderr,), daemon=True).start()
    deadline = time.monotonic() + 15
    while not any(want in l for l in lines):
        assert time.monotonic() < deadline and p.poll() is None, f"{cmd}: {lines}"
        time.sleep(0.01)
    return p, lines


def free_port():
    """A port nothing listens on now (the system's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(tmp, rep, backend, mode):
    """The primary (and standby) and the proxy; the proxy's TCP address and the processes."""
    key = os.path.join(tmp, "k.key")
    if not os.path.exists(key):
        subprocess.run([S, "keygen", key], check=True, stdout=subprocess.DEVNULL)
    pa, pb, aa, ab, listen = (f"127.0.0.1:{free_port()}" for _ in range(5))
    to = f"127.0.0.1:{backend.port}"
    cmd = [S, "expose", SERVICE, "--to", to, "--bind", pa, "--admin", aa, "--key", key]
    if mode != "plain":
        cmd += ["--standby-socket", os.path.join(tmp, f"sb{rep}.sock")]
    primary, plog = start(cmd, "READY")
    procs = [primary]
    slog = []
    if mode == "standby":
        sb, slog = start([S, "expose", SERVICE, "--to", to, "--bind", pb, "--admin", ab,
                          "--key", key, "--standby-of", aa], "READY")
        procs.append(sb)
        deadline = time.monotonic() + 10
        while not any("a standby attached" in l for l in plog):
            assert time.monotonic() < deadline, plog
            time.sleep(0.01)
    proxy, _ = start([S, "proxy", SERVICE, "--listen", listen, "--via", pa], "READY")
    procs.append(proxy)
    return listen, primary, procs, slog


def stop(procs):
    for p in procs:
        p.kill()
        p.wait()


def download(addr, on_read=None):
    """Reads everything; (bytes, seconds, the bytes themselves if kept)."""
    host, port = addr.rsplit(":", 1)
    c = socket.create_connection((host, int(port)))
    c.shutdown(socket.SHUT_WR)
    buf = bytearray(1 << 20)
    got = bytearray() if on_read else None
    n = 0
    t0 = time.monotonic()
    while True:
        k = c.recv_into(buf)
        if k == 0:
            break
        n += k
        if on_read:
            got += buf[:k]
            on_read(n)
    took = time.monotonic() - t0
    c.close()
    return n, took, got


def throughput(tmp):
    data = payload(SIZE)
    backend = Backend(data)
    rows = {m: [] for m in ("plain", "socket", "standby")}
    for rep in range(REPS):
        line = []
        for mode in rows:
            listen, _, procs, _ = setup(tmp, rep * 3 + len(line), backend, mode)
            n, took, _ = download(listen)
            stop(procs)
            assert n == SIZE, f"{mode}: {n} of {SIZE} bytes"
            mbps = n * 8 / took / 1e6
            rows[mode].append(mbps)
            line.append(f"{mode} {mbps:7.1f} Mb/s")
        print(f"rep {rep + 1}: " + ", ".join(line), flush=True)
    print(f"\nthroughput, {SIZE >> 20} MiB download, {REPS} repetitions each (alternating)")
    print("| set-up | median Mb/s | min | max | ratio to plain, median (min–max of per-rep ratios) |")
    print("|---|---|---|---|---|")
    for mode, v in rows.items():
        ratios = [a / b for a, b in zip(v, rows["plain"])]
        print(f"| {mode} | {statistics.median(v):.1f} | {min(v):.1f} | {max(v):.1f} | "
              f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}) |")


def recovery(tmp):
    total = 6 << 20
    data = payload(total)
    backend = Backend(data, chunk=1024, pace=0.0005)
    results = []
    for rep in range(REPS):
        listen, primary, procs, slog = setup(tmp, 500 + rep, backend, "standby")
        stamps = []
        killed = []

        def on_read(n):
            stamps.append(time.monotonic())
            if not killed and stamps[-1] - stamps[0] > 1.0:
                killed.append(time.monotonic())
                primary.kill()

        n, _, got = download(listen, on_read)
        stop(procs)
        k = killed[0] if killed else stamps[-1]
        gap = lambda a, b: max((y - x for x, y in zip(stamps, stamps[1:]) if a <= x <= b),
                               default=0)
        during = gap(k - 0.01, k + 2)
        before = gap(k - 1, k - 0.01)
        exact = n == total and bytes(got) == data
        took = next((l.strip() for l in slog if "took over" in l), "no takeover")
        results.append((during, before, exact))
        print(f"rep {rep + 1}: longest gap around the kill {during * 1e3:.1f} ms, before "
              f"{before * 1e3:.1f} ms, exact {exact}; {took}", flush=True)
    d = [r[0] * 1e3 for r in results]
    b = [r[1] * 1e3 for r in results]
    print(f"\nrecovery, {REPS} repetitions: gap around the kill median {statistics.median(d):.1f} ms "
          f"({min(d):.1f}–{max(d):.1f}); gap before median {statistics.median(b):.1f} ms "
          f"({min(b):.1f}–{max(b):.1f}); exact in {sum(r[2] for r in results)} of {REPS}")


def latency(tmp):
    """The paced download of `recovery`, nobody killed: the longest gap in each set-up."""
    total = 3 << 20
    data = payload(total)
    backend = Backend(data, chunk=1024, pace=0.0005)
    rows = {m: [] for m in ("plain", "socket", "standby")}
    for rep in range(REPS):
        line = []
        for mode in rows:
            listen, _, procs, _ = setup(tmp, 900 + rep, backend, mode)
            stamps = []
            n, _, got = download(listen, lambda _n: stamps.append(time.monotonic()))
            stop(procs)
            assert n == total and bytes(got) == data, mode
            g = max(y - x for x, y in zip(stamps, stamps[1:])) * 1e3
            rows[mode].append(g)
            line.append(f"{mode} {g:5.1f} ms")
        print(f"rep {rep + 1}: longest gap " + ", ".join(line), flush=True)
    print(f"\nlongest gap of a paced download (1 KiB / 0.5 ms, 3 MiB), {REPS} repetitions")
    for mode, v in rows.items():
        print(f"| {mode} | {statistics.median(v):.1f} ms | {min(v):.1f} | {max(v):.1f} |")


with tempfile.TemporaryDirectory() as tmp:
    if "latency" in PARTS:
        latency(tmp)
    if "throughput" in PARTS:
        throughput(tmp)
    if "recovery" in PARTS:
        recovery(tmp)
