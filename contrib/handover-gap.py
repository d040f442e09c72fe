#!/usr/bin/env python3
"""The longest receive gap a client sees across `serval expose` hand-overs (protocol.md §4.4).

A backend streams 16 KiB every 2 ms (8 MB/s) to one client connection through
`serval proxy` → `serval router` → `serval expose`; the expose process is handed over to a new
one REPS times in a chain (each new process takes over from the previous one at the same
socket path). For each hand-over it prints the client's longest gap between two reads during
the hand-over (from the new process's start to 300 ms after the old one exited) and, as the
peer in the same run, the longest gap in the second before it (the pacing's 2 ms plus the
machine's jitter), and how long the old process had the connection frozen (export to the new
process's TAKEN, from its last line). Usage: contrib/handover-gap.py [SERVAL_BINARY] [REPS]
"""
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

S = sys.argv[1] if len(sys.argv) > 1 else "./target/release/serval"
REPS = int(sys.argv[2]) if len(sys.argv) > 2 else 7


def ready(cmd):
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.startswith("READY "), f"{cmd}: {line!r} {p.stderr.read() if p.poll() is not None else ''}"
    return p, line.split()[1]


def backend(ls):
    c, _ = ls.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    chunk = b"x" * 16384
    nxt = time.monotonic()
    try:
        while True:
            c.sendall(chunk)
            nxt += 0.002
            d = nxt - time.monotonic()
            if d > 0:
                time.sleep(d)
    except OSError:
        pass


def main():
    procs = []
    tmp = tempfile.mkdtemp(prefix="handover-gap-")
    path = os.path.join(tmp, "expose.sock")
    try:
        router, raddr = ready([S, "router", "--listen", "127.0.0.1:0"])
        procs.append(router)
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(4)
        threading.Thread(target=backend, args=(ls,), daemon=True).start()
        to = f"127.0.0.1:{ls.getsockname()[1]}"
        base = [S, "expose", "gap.test", "--to", to, "--router", raddr, "--bind", "127.0.0.1:0",
                "--handover-socket", path]
        old, _ = ready(base)
        procs.append(old)
        proxy, paddr = ready([S, "proxy", "gap.test", "--listen", "127.0.0.1:0", "--router", raddr,
                              "--bind", "127.0.0.1:0"])
        procs.append(proxy)
        host, port = paddr.rsplit(":", 1)
        c = socket.create_connection((host, int(port)))
        stamps = []
        total = [0]

        def reader():
            while True:
                b = c.recv(1 << 16)
                if not b:
                    return
                total[0] += len(b)
                stamps.append(time.monotonic())

        threading.Thread(target=reader, daemon=True).start()
        time.sleep(1.5)

        def max_gap(a, b):
            ts = [t for t in stamps if a <= t <= b]
            return max((y - x for x, y in zip(ts, ts[1:])), default=float("inf"))

        rows = []
        for i in range(REPS):
            t0 = time.monotonic()
            new, _ = ready(base + ["--take-over", path])
            procs.append(new)
            rc = old.wait(timeout=30)
            summary = [l for l in old.stderr.read().splitlines() if "handed" in l]
            assert rc == 0 and summary and "handed 1 connection(s)" in summary[0], (rc, summary)
            time.sleep(0.3)
            t1 = time.monotonic()
            freeze = float(summary[0].split("longest freeze ")[1].split(" ms")[0])
            rows.append((max_gap(t0 - 1.0, t0) * 1e3, max_gap(t0, t1) * 1e3, freeze))
            print(f"hand-over {i + 1}: longest gap {rows[-1][1]:.2f} ms "
                  f"(second before: {rows[-1][0]:.2f} ms; frozen at the old process "
                  f"{freeze:.2f} ms)", flush=True)
            old = new
            time.sleep(1.0)
        print(f"received {total[0] / 1e6:.1f} MB on one connection across {REPS} hand-overs")
        for name, col in (("before (peer)", 0), ("hand-over", 1), ("frozen", 2)):
            v = [r[col] for r in rows]
            print(f"{name:14} median {statistics.median(v):.2f} ms, min {min(v):.2f}, max {max(v):.2f}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        try:
            os.remove(path)
        except OSError:
            pass
        os.rmdir(tmp)


main()
