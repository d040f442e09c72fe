#!/usr/bin/env python3
"""What a hot standby costs and what it saves (protocol.md §4.3), on loopback.

Recovery: a primary `serval listen --number` and its standby (`--standby-of`); one client
(`serval cat --via PRIMARY`) sends a numbered line every 0.5 ms (about 35 kB/s each way) and
timestamps the answers; the primary is SIGKILLed after 1 s. Printed per repetition: the
client's longest gap between two answers around the kill (the recovery: detection, import,
re-bind), the longest gap in the second before (the pacing and the machine's jitter), and
whether every answer came exactly once, in order.

Bulk recovery: the same lines sent as fast as `serval cat` takes them (LINES of them), 1 s
after the standby attached; the primary is SIGKILLed once 10 MB of answers arrived; the client's longest gap between two reads
after the kill, and whether the answers are exact.

Stall: as Recovery, but the primary is stopped (SIGSTOP) for 0.1 s, then for 1 s, and continued
(SIGCONT) rather than killed: a live primary the standby takes for dead (a false takeover). The
client's longest gap around the stop, and whether every answer came exactly once: nothing may
wait for the stopped primary once the standby took over.

Standby stop: as Recovery, but it is the standby that is stopped (SIGSTOP) for 0.1 s, 0.5 s
in, then continued: its own stall must not look like the primary's silence. Printed: how many
repetitions ended in a (false) takeover, and whether every answer came exactly once.

Throughput: LINES lines of 64 bytes sent as fast as `serval cat` takes them, with and without
a standby, in alternation; the time until the last answer arrived.

Usage: contrib/standby-gap.py [SERVAL_BINARY] [REPS] [LINES]
PARTS=recovery,stall,standby-stop,bulk,throughput (the default: all) chooses what runs.
"""
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

S = sys.argv[1] if len(sys.argv) > 1 else "./target/release/serval"
REPS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
LINES = int(sys.argv[3]) if len(sys.argv) > 3 else 300_000


def line(i):
    return f"{i:09d} abcdefghijabcdefghijabcdefghijabcdefghijabcdefghijabcd\n".encode()


def start(cmd, want):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []

    def pump():
        for l in p.stderr:
            lines.append(l)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 10
    while not any(want in l for l in lines):
        assert time.monotonic() < deadline and p.poll() is None, f"{cmd}: {lines}"
        time.sleep(0.01)
    return p, lines


def instances(tmp, rep, standby):
    key = os.path.join(tmp, "k.key")
    if not os.path.exists(key):
        subprocess.run([S, "keygen", key], check=True, stdout=subprocess.DEVNULL)
    base = 20000 + rep * 10
    pa, pb = f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"
    aa, ab = f"127.0.0.1:{base + 2}", f"127.0.0.1:{base + 3}"
    primary, _ = start([S, "listen", "gap.test", "--number", "--bind", pa, "--admin", aa,
                        "--key", key], "serving")
    procs = [primary]
    log = []
    if standby:
        sb, log = start([S, "listen", "gap.test", "--number", "--bind", pb, "--admin", ab,
                         "--key", key, "--standby-of", aa], "hot standby of")
        procs.append(sb)
    return pa, primary, procs, log


def recovery(tmp, rep, stop=None):
    """The primary SIGKILLed 1 s in; or, with `stop` (seconds), SIGSTOPped that long."""
    pa, primary, procs, log = instances(tmp, rep, True)
    cat = subprocess.Popen([S, "cat", "gap.test", "--via", pa], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE)
    total = 6000
    stamps = []

    def writer():
        nxt = time.monotonic()
        for i in range(total):
            cat.stdin.write(line(i))
            cat.stdin.flush()
            nxt += 0.0005
            d = nxt - time.monotonic()
            if d > 0:
                time.sleep(d)
        cat.stdin.close()

    threading.Thread(target=writer, daemon=True).start()
    ok = True
    killed = None
    for i in range(total):
        got = cat.stdout.readline()
        stamps.append(time.monotonic())
        if got != f"{i + 1} ".encode() + line(i):
            ok = False
            break
        if killed is None and stamps[-1] - stamps[0] > 1.0:
            killed = time.monotonic()
            if stop is None:
                primary.kill()
            else:
                primary.send_signal(signal.SIGSTOP)
                threading.Timer(stop, primary.send_signal, (signal.SIGCONT,)).start()
    cat.wait(timeout=30)
    for p in procs:
        p.kill()
        p.wait()
    gap = lambda a, b: max((y - x for x, y in zip(stamps, stamps[1:]) if a <= x <= b), default=0)
    during = gap(killed - 0.01, killed + 2 + (stop or 0))
    before = gap(killed - 1, killed - 0.01)
    took = next((l.strip() for l in log if "took over" in l), "no takeover")
    return during, before, ok and len(stamps) == total, took


def standby_stop(tmp, rep):
    """The paced stream of `recovery`, its standby stopped for 0.1 s."""
    pa, _, procs, log = instances(tmp, rep, True)
    cat = subprocess.Popen([S, "cat", "gap.test", "--via", pa], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE)
    total = 3000

    def writer():
        for i in range(total):
            cat.stdin.write(line(i))
            cat.stdin.flush()
            time.sleep(0.0005)
        cat.stdin.close()

    threading.Thread(target=writer, daemon=True).start()
    ok, n, t0, stopped = True, 0, time.monotonic(), False
    while n < total:
        got = cat.stdout.readline()
        if got != f"{n + 1} ".encode() + line(n):
            ok = False
            break
        n += 1
        if not stopped and time.monotonic() - t0 > 0.5:
            procs[1].send_signal(signal.SIGSTOP)
            time.sleep(0.1)
            procs[1].send_signal(signal.SIGCONT)
            stopped = True
    cat.wait(timeout=30)
    time.sleep(0.3)
    for p in procs:
        p.kill()
        p.wait()
    return ok, next((l.strip() for l in log if "took over" in l), "no takeover")


def bulk_recovery(tmp, rep):
    pa, primary, procs, log = instances(tmp, rep, True)
    # A standby attached a while ago: its detection threshold has seen the primary's pace.
    time.sleep(1.0)
    data = b"".join(line(i) for i in range(LINES))
    cat = subprocess.Popen([S, "cat", "gap.test", "--via", pa], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE)

    def writer():
        try:
            cat.stdin.write(data)
            cat.stdin.close()
        except BrokenPipeError:
            pass

    threading.Thread(target=writer, daemon=True).start()
    stamps, out, killed = [], [], None
    while True:
        b = cat.stdout.read1(65536)
        if not b:
            break
        out.append(b)
        stamps.append(time.monotonic())
        if killed is None and sum(map(len, out)) > 10_000_000:
            primary.kill()
            killed = time.monotonic()
    cat.wait(timeout=30)
    for p in procs:
        p.kill()
        p.wait()
    expect = b"".join(f"{i + 1} ".encode() + line(i) for i in range(LINES))
    gap = max((y - x for x, y in zip(stamps, stamps[1:]) if x >= killed - 0.01), default=0)
    took = next((l.strip() for l in log if "took over" in l), "no takeover")
    return gap, b"".join(out) == expect, took


def throughput(tmp, rep, standby):
    pa, _, procs, _ = instances(tmp, rep, standby)
    data = b"".join(line(i) for i in range(LINES))
    t0 = time.monotonic()
    out = subprocess.run([S, "cat", "gap.test", "--via", pa], input=data,
                         stdout=subprocess.PIPE, timeout=120).stdout
    took = time.monotonic() - t0
    for p in procs:
        p.kill()
        p.wait()
    expect = b"".join(f"{i + 1} ".encode() + line(i) for i in range(LINES))
    return took, out == expect


def summary(xs, digits=1):
    return (f"median {statistics.median(xs):.{digits}f}, min {min(xs):.{digits}f}, "
            f"max {max(xs):.{digits}f}")


def main():
    tmp = tempfile.mkdtemp(prefix="standby-gap-")
    parts = os.environ.get("PARTS", "recovery,stall,standby-stop,bulk,throughput").split(",")
    if "recovery" in parts:
        recoveries(tmp)
    if "stall" in parts:
        for stop in (0.1, 1.0):
            gaps = []
            for r in range(REPS):
                during, before, ok, took = recovery(tmp, 200 + r + int(stop * 10), stop)
                print(f"stall {stop} s {r}: gap {during * 1000:.1f} ms (before "
                      f"{before * 1000:.1f} ms), exact {ok}; {took}", flush=True)
                assert ok, "an answer was lost, doubled or out of order"
                gaps.append(during * 1000)
            print(f"gap ms around a {stop} s stop: {summary(gaps)}")
    if "standby-stop" in parts:
        taken = 0
        for r in range(REPS):
            ok, took = standby_stop(tmp, 300 + r)
            print(f"standby stop {r}: exact {ok}; {took}", flush=True)
            assert ok, "an answer was lost, doubled or out of order"
            taken += took != "no takeover"
        print(f"standby stopped 0.1 s: {taken} takeover(s) in {REPS}")
    if "bulk" in parts:
        bulk_recoveries(tmp)
    if "throughput" in parts:
        throughputs(tmp)


def recoveries(tmp):
    gaps, befores = [], []
    for r in range(REPS):
        during, before, ok, took = recovery(tmp, r)
        print(f"recovery {r}: gap {during * 1000:.1f} ms (before {before * 1000:.1f} ms), "
              f"exact {ok}; {took}", flush=True)
        assert ok, "an answer was lost, doubled or out of order"
        gaps.append(during * 1000)
        befores.append(before * 1000)
    print(f"recovery gap ms: {summary(gaps)}; before: {summary(befores)}")


def bulk_recoveries(tmp):
    bulk = []
    for r in range(REPS):
        gap, ok, took = bulk_recovery(tmp, 50 + r)
        print(f"bulk recovery {r}: gap {gap * 1000:.1f} ms, exact {ok}; {took}", flush=True)
        assert ok, "an answer was lost, doubled or out of order"
        bulk.append(gap * 1000)
    print(f"bulk recovery gap ms: {summary(bulk)}")


def throughputs(tmp):
    with_sb, without = [], []
    for r in range(REPS):
        for standby, xs in ((False, without), (True, with_sb)):
            took, ok = throughput(tmp, 100 + 2 * r + standby, standby)
            assert ok, "the numbered answers were wrong"
            xs.append(LINES * 64 * 8 / took / 1e6)
        print(f"throughput {r}: without {without[-1]:.1f} Mb/s, with standby {with_sb[-1]:.1f} Mb/s",
              flush=True)
    ratios = [w / o for w, o in zip(with_sb, without)]
    print(f"throughput Mb/s without: {summary(without)}; with: {summary(with_sb)}; "
          f"ratio {summary(ratios, 2)}")


if __name__ == "__main__":
    main()
