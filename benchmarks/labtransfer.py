"""`python -m benchmarks.labtransfer [--mb 4] [--rounds 3] [--clients 1] [--proxy-options OPTS]`:
real peers, side by side.

Issue 13's real-peer figure: the time real pptp-linux clients take to move *mb* MB each to a
real pptpd in the UML lab (docs/lab.md), through the NAT with the kernel's PPTP helper
(``nat-helper``: the kernel path, the baseline) and through LRP -> the same NAT -> RRP
(``proxy``), interleaved, *rounds* of each.  Prints each run's seconds (the slowest client's,
from its send to the sha256 check) and its ping round trip through the tunnel before the
transfer (the slowest client's mean of 3), for the proxy also the CPU time each daemon used
over the transfer (from /proc in the guest) and what the LRP's GRE port captured, took in C
and handed back to Python (its status), then the proxy's time and round trip as multiples
of the helper's (medians over the rounds).  Needs root and a UML the lab can boot.
"""
import argparse
import shlex
import statistics
import sys

from routeproxy.lab import cli, uml

MODES = ("nat-helper", "proxy")


# What a guest pays per trap, timed once per run in a guest of its own: a system call, and a
# round trip between two processes (two switches and four calls).  The daemons pay these per
# packet and the kernel's helper never does, so they set the ratio's floor (docs/lab.md).
TRAP_PROBE = r"""
"$PY" - <<'PROBE'
import os, socket, time
n = 20000
started = time.perf_counter()
for _ in range(n):
    os.getppid()
call = (time.perf_counter() - started) / n
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
if os.fork() == 0:
    for _ in range(n // 4):
        a.recv(64)
        a.send(b"y")
    os._exit(0)
started = time.perf_counter()
for _ in range(n // 4):
    b.send(b"x")
    b.recv(64)
trip = (time.perf_counter() - started) / (n // 4)
os.wait()
print(f"LAB-TRAP {call * 1e6:.1f} {trip * 1e6:.1f}")
PROBE
"""


def trap_costs(timeout=120):
    """(a guest system call, a guest process round trip) in us, or None if the probe failed."""
    script = f'PY={shlex.quote(sys.executable)}\n' + TRAP_PROBE
    try:
        output = uml.run_in_uml(script, timeout=timeout).output
    except uml.UMLError:
        return None
    text = output.decode(errors="replace") if isinstance(output, bytes) else output
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "LAB-TRAP":
            return float(parts[1]), float(parts[2])
    return None


def seconds_of(run):
    """The slowest intact transfer of *run*, or None when one did not arrive intact."""
    if len(run.transfers_ok()) != run.clients * run.calls_per_client:
        return None
    return max(float(t["seconds"]) for t in run.transfers.values())


def rtt_of(run):
    """The slowest client's mean ping round trip (ms) before the transfer, or None."""
    rtts = []
    for row in run.rows:
        try:
            rtts.append(float(row.get("rtt")))
        except (TypeError, ValueError):
            return None
    return max(rtts) if rtts else None


def gre_of(run):
    """The LRP's GRE port after the transfer, in a few words: what it captured, what its native
    pump took in C and handed back to Python, and the fragments among them ("" without status);
    and what either daemon's link receive gate dropped, or its mux did not send, if anything."""
    status = getattr(run, "status", {})
    port = (status.get("lrp") or {}).get("gre_port")
    if not port:
        return ""
    native = port.get("native") or {}
    dropped = {k: v for k, v in (port.get("dropped") or {}).items() if v}
    aged = {d: s["gre_port"]["native_link"]["sojourn_dropped"] for d, s in sorted(status.items())
            if ((s.get("gre_port") or {}).get("native_link") or {}).get("sojourn_dropped")}
    unsent = {d: {**link["gre_dropped"], **_limit(link.get("send_queue"))} for d, s in sorted(status.items())
              for link in s.get("links") or () if link.get("gre_dropped")}
    return (f"; LRP GRE captured {port.get('received', 0)}, fragments {port.get('fragments', 0)}"
            + (f", in C {native.get('framed', 0)}, handed back {native.get('handed_back', 0)}"
               if native else "")
            + (f", dropped {dropped}" if dropped else "")
            + (f"; link gate dropped {aged}" if aged else "")
            + (f"; the mux did not send {unsent}" if unsent else ""))


def _limit(queue):
    """The link's GRE limit beside its drops: bytes, and the delivery rate it came from."""
    if not queue:
        return {}
    rate = queue.get("delivery_rate")
    return {"limit": queue.get("limit"), "Mbit/s": None if rate is None else round(rate * 8e-6, 1)}


def loop_of(run):
    """Each daemon's loop over the transfer in a few words: its wake-ups in C (capture + link
    reads), its runs (returns to Python) and the clock reads it made ("" without status).  In
    UML a wake-up, and each system call in it, is what the proxy pays beside the kernel's path
    (docs/perf-path.md, rounds 4, 8 and 11)."""
    loops = {d: (s.get("gre_port") or {}).get("loop") for d, s in sorted(getattr(run, "status", {}).items())}
    words = [f"{d.upper()} {loop['wake_ups']}+{loop['link_reads']} in {loop['runs']} runs, "
             f"{loop.get('clock_reads', '-')} clock reads" for d, loop in loops.items() if loop]
    return f"; wake-ups {', '.join(words)}" if words else ""


def proc_of(run):
    """Each daemon's CPU split and traps in a few words ("" without them): user / system
    seconds, page faults and context switches over the transfer."""
    proc = getattr(run, "proc", {}) or {}
    return "".join(f" ({d.upper()} user {p['user']:.2f} + sys {p['sys']:.2f} s, {p['faults']} faults, "
                   f"{p['switches']} switches)" for d, p in sorted(proc.items()))


def tcp_of(run):
    """TCP's view of the transfer in a few words: the senders' retransmissions and timeouts,
    the server's out-of-order arrivals, and the GRE packets pptp-linux held for a missing one
    ("" when the lab did not report them).  A stall shows here as timeouts."""
    tcp = getattr(run, "tcp", {}) or {}
    if not tcp:
        return ""
    clients = [v for ns, v in tcp.items() if ns.startswith("c")]
    total = lambda key: sum(c.get(key, 0) for c in clients)
    server = tcp.get("srv", {})
    order = getattr(run, "gre_order", {}) or {}
    drops = {ns: v["RawDrops"] for ns, v in sorted(tcp.items()) if v.get("RawDrops")}
    return (f"; TCP retrans {total('RetransSegs')}, timeouts {total('TCPTimeouts')}, "
            f"loss probes {total('TCPLossProbes')}, server out-of-order {server.get('TCPOFOQueue', 0)}"
            + (f"; pptp held {order.get('buffered', 0)}, dropped old {order.get('old', 0)}" if order else "")
            + (f"; raw socket drops {drops}" if drops else ""))


def lossy(run):
    """Whether the transfer lost packets on the way (a client retransmitted, or a raw socket
    dropped), or None when the lab did not report TCP's counters."""
    tcp = getattr(run, "tcp", {}) or {}
    if not tcp:
        return None
    return any(v.get("RawDrops") or (ns.startswith("c") and v.get("RetransSegs")) for ns, v in tcp.items())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--proxy-options", default="",
                        help='more options for both daemons, e.g. "--gre-capture raw"')
    parser.add_argument("--rmem-default", type=int, default=None, metavar="BYTES",
                        help="a tuned server: this receive buffer for every socket that sizes "
                             "none itself, pptpd's GRE socket among them (both paths)")
    args = parser.parse_args(argv)
    reason = uml.uml_available()
    if reason:
        print(f"labtransfer: {reason}", file=sys.stderr)
        return 2
    seccomp = bool(uml.seccomp_options())
    traps = trap_costs()
    print(f"UML {uml.UML_BINARY}, guests in {'seccomp' if seccomp else 'ptrace'} mode"
          + (f"; a guest system call {traps[0]:.1f} us, a round trip between two guest processes "
             f"{traps[1]:.1f} us" if traps else "") + " (docs/lab.md)", flush=True)
    if not seccomp:
        print("  (in ptrace mode a trap costs more than in seccomp mode: `make lab-kernel` builds a "
              "UML kernel that has it, which the lab then uses; docs/lab.md)", flush=True)
    times = {mode: [] for mode in MODES}
    rtts = {mode: [] for mode in MODES}
    losses = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in MODES:
            run = cli.run_lab(mode, args.clients, transfer_mb=args.mb,
                              proxy_options=shlex.split(args.proxy_options),
                              rmem_default=args.rmem_default)
            took, rtt = seconds_of(run), rtt_of(run)
            cpu = "".join(f", {d.upper()} CPU {s:.2f} s" for d, s in sorted(getattr(run, "cpu", {}).items()))
            cpu += proc_of(run)
            print(f"round {round_ + 1} {mode:10} {args.clients} client(s) x {args.mb} MB: "
                  + (f"{took:.2f} s, ping {rtt if rtt is not None else '-'} ms{cpu}{gre_of(run)}"
                     f"{loop_of(run)}{tcp_of(run)}"
                     if took is not None
                     else "FAILED\n" + cli.format_table(run)),
                  flush=True)
            if took is not None:
                times[mode].append(took)
            if rtt is not None:
                rtts[mode].append(rtt)
            lost = lossy(run)
            if lost is not None:
                losses[mode].append(lost)
    if all(times.values()):
        helper, proxy = (statistics.median(times[m]) for m in MODES)
        print(f"median: nat-helper {helper:.2f} s, proxy {proxy:.2f} s: proxy/helper x{proxy / helper:.2f} "
              f"(per round: {', '.join(f'{p / h:.2f}' for h, p in zip(*times.values()))})")
    if all(rtts.values()):
        helper, proxy = (statistics.median(rtts[m]) for m in MODES)
        print(f"median ping: nat-helper {helper:.2f} ms, proxy {proxy:.2f} ms: x{proxy / helper:.2f}")
    if any(losses.values()):
        print("runs that lost packets (retransmitted, or a raw socket dropped): "
              + ", ".join(f"{m} {sum(losses[m])} of {len(losses[m])}" for m in MODES)
              + " (pptpd's GRE socket, docs/lab.md: --rmem-default tunes it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
