"""`python -m benchmarks.fixedrate [--rate PPS ...] [--size B] [--duration S] [--py-spy DIR]
[--proxy-options OPTS] [--latency] [--shards N] [--pin KEY=CPUS,...]`

The proxy path of ``benchmarks.topology`` (real twistd daemons in namespaces) at fixed
offered rates, client -> server: per daemon the CPU per delivered packet (the scheduler's
own run time, ``/proc/PID/schedstat``), the GRE port's wake-ups per packet, what arrived and
every drop by reason.  Rate 0 is flat out.  ``--py-spy DIR`` samples each daemon with py-spy
during the first rate (``DIR/lrp.raw``, ``DIR/rrp.raw``, py-spy's raw format) — py-spy must
be on PATH or in this interpreter's bin directory.

Unlike the max-rate search this holds the rate, so a change is compared at equal load (the
CPU per packet of a daemon falls as the rate rises: each wake-up costs about the same and
carries more packets; docs/perf-path.md).  ``--shards N`` runs N LRPs and N RRPs
(``--shard I/N``; the figures per role are summed over them), ``--pin`` runs daemons and
instruments under taskset (``benchmarks.topology.parse_pin``).  Needs root.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys

from benchmarks import measure, topology
from tests.support import netns


def run_seconds(pid):
    """The process's CPU run time so far, in seconds (schedstat: nanoseconds, not ticks)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def counters(proxy):
    """{daemon: (run seconds, GRE port wake-ups, GRE port packets received)} now (and per
    role, summed over shards)."""
    got = {}
    for name, daemon in proxy.daemons.items():
        port = daemon.status().get("gre_port") or {}
        got[name] = (run_seconds(daemon.pid), port.get("reads", 0), port.get("received", 0))
    return topology.by_role(got)


def py_spy(proxy, directory, seconds):
    binary = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    os.makedirs(directory, exist_ok=True)
    return [subprocess.Popen([binary, "record", "-r", "250", "-f", "raw", "-d", str(int(seconds) + 1),
                              "-o", os.path.join(directory, f"{name}.raw"), "--pid", str(d.pid)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, d in proxy.daemons.items()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("--rate", type=int, action="append", help="offered packets/s (repeatable; 0: flat out)")
    p.add_argument("--size", type=int, default=1400)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--latency", action="store_true",
                   help="one-way latency too (batches of 8, as the latency trials)")
    p.add_argument("--py-spy", metavar="DIR")
    p.add_argument("--proxy-options", default="", help="extra options for both daemons (an A/B)")
    topology.add_shard_arguments(p)
    args = p.parse_args(argv)
    rates = args.rate or [5000, 20000]
    netns.skip_unless_available()
    netns.reap_stale()
    topology.raise_fd_limit()
    topology.pin_instruments(args.pin)
    lab = netns.NetnsLab()
    proxy = topology.ProxyPath(lab, options=shlex.split(args.proxy_options), shards=args.shards, pin=args.pin)
    try:
        proxy.start()
        if not proxy.open_sessions(args.sessions).calls:
            raise SystemExit("no call through the proxies")
        proxy.balance(max(1, args.sessions // args.shards))
        print(f"{args.shards} shard(s): {proxy.affinity()}", flush=True)
        path = proxy.path()
        measure.run_trial(lab, path, args.size, rates[0], 1.0)  # warm-up
        spies = py_spy(proxy, args.py_spy, args.duration) if args.py_spy else []
        for rate in rates:
            drops, before = proxy.drops(), counters(proxy)
            got = measure.run_trial(lab, path, args.size, rate, args.duration, latency=args.latency,
                                    batch=8 if args.latency else None)
            after, dropped = counters(proxy), proxy.drops()
            row = {"rate": rate, "size": args.size, "offered_pps": round(got["offered_pps"]),
                   "delivered_pps": round(got["delivered_pps"]), "received": got["received"],
                   **({"latency_us": {k: round(v) for k, v in (got.get("latency_us") or {}).items()}}
                      if args.latency else {}),
                   "daemon_drops": {k: v - drops.get(k, 0) for k, v in dropped.items() if v - drops.get(k, 0)}}
            for name in after:
                cpu = after[name][0] - before[name][0]
                row[f"{name}_us_per_packet"] = round(cpu * 1e6 / got["received"], 1) if got["received"] else None
                wakeUps, captured = after[name][1] - before[name][1], after[name][2] - before[name][2]
                if captured:
                    row[f"{name}_packets_per_wake_up"] = round(captured / wakeUps, 2)
            print(json.dumps(row), flush=True)
            for spy in spies:
                spy.wait()
            spies = []
    finally:
        topology.tear_down(proxy, lab)


if __name__ == "__main__":
    main()
