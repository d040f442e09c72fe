#!/usr/bin/env python3
"""Where a Serval move's pause goes, from the captures of `pause-bench --pcap DIR`.

For each DIR/serval-rep<N>.pcapng it prints, in ms from A's last data packet to the client
before the snapshot left: the client's last packet to A, the snapshot leaving A, every packet
between the two agents (READY, COMMIT, ...), B's RSYN to the client, B's first data packet,
and the client's first packet to B (its answer: it has woken up and read). Addresses are the
bench's: client 10.93.0.1, A 10.93.0.2, B 10.93.0.3, service port 7400. Needs tshark.
Usage: contrib/pause-pcap.py DIR [--packets]   (--packets also lists them)
"""
import glob
import subprocess
import sys

C, A, B, PORT = "10.93.0.1", "10.93.0.2", "10.93.0.3", "7400"


def packets(path):
    fields = ["frame.time_epoch", "ip.src", "udp.srcport", "ip.dst", "udp.dstport",
              "udp.length"]
    cmd = ["tshark", "-r", path, "-T", "fields", "-Y", "udp"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        t, src, sport, dst, dport, length = (line.split("\t") + [""] * 6)[:6]
        yield float(t), src, sport, dst, dport, int(length or 0)


def analyse(path, listing):
    pk = list(packets(path))
    # B's RSYN: its first packet from the service port to the client.
    r = next(i for i, p in enumerate(pk) if p[1] == B and p[2] == PORT and p[3] == C)
    # The snapshot: the last large agent packet from A to B before it.
    s = max(i for i, p in enumerate(pk[:r]) if p[1] == A and p[3] == B and p[5] > 1000)
    t0 = max(p[0] for p in pk[:s] if p[1] == A and p[2] == PORT and p[3] == C)
    ms = lambda t: (t - t0) * 1e3
    last_ack = max(p[0] for p in pk[:s] if p[1] == C and p[3] == A)
    agents = [ms(p[0]) for p in pk[s:r] if {p[1], p[3]} == {A, B}]
    data = next(p[0] for p in pk[r + 1:] if p[1] == B and p[2] == PORT and p[5] > 600)
    answer = next(p[0] for p in pk[r:] if p[1] == C and p[3] == B)
    print(f"{path.split('/')[-1]}: client's last ACK to A {ms(last_ack):.3f}, snapshot "
          f"{ms(pk[s][0]):.3f}, agents {' '.join('%.3f' % a for a in agents)}, RSYN "
          f"{ms(pk[r][0]):.3f}, B's first data {ms(data):.3f}, client's answer {ms(answer):.3f}")
    if listing:
        for p in pk:
            if pk[s][0] - 2e-4 <= p[0] <= max(data, answer) + 3e-4:
                print(f"   {ms(p[0]):8.3f} {p[1]}:{p[2]} > {p[3]}:{p[4]} {p[5]} B")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for path in sorted(glob.glob(sys.argv[1] + "/serval-rep*.pcapng")):
        analyse(path, "--packets" in sys.argv[2:])


if __name__ == "__main__":
    main()
