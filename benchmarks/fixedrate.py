"""`python -m benchmarks.fixedrate [--rate PPS ...] [--size B] [--duration S] [--py-spy DIR]
[--direction forward|reverse|both] [--proxy-options OPTS] [--lrp-options OPTS] [--latency]
[--openvpn default|nodelay ...] [--shards N] [--pin KEY=CPUS,...] [--instrument c|python ...]
[--idle S] [--warm-up S] [--junk-rate PPS]`

The proxy path of ``benchmarks.topology`` (real twistd daemons in namespaces) at fixed
offered rates, client -> server by default: per daemon the CPU per delivered packet (the
scheduler's own run time, ``/proc/PID/schedstat``), the GRE port's wake-ups per packet, what
arrived and every drop by reason.  Rate 0 is flat out.

``--direction reverse`` sends server -> client instead: from the server's namespace to the
RRP, keyed with the call IDs the PAC was given (as pptpd keys it), so the RRP captures it and
the LRP sends it to the client, where the sink counts it.  ``--direction both`` runs both at
once, each at the offered rate (``--rate`` is per direction), one trial marker for both:
delivered, loss and latency per direction, each daemon's CPU per packet over the packets of
both directions.

``--py-spy DIR`` samples each daemon with py-spy during the first rate (``DIR/lrp.raw``,
``DIR/rrp.raw``, py-spy's raw format) — py-spy must be on PATH or in this interpreter's bin
directory.

Unlike the max-rate search this holds the rate, so a change is compared at equal load (the
CPU per packet of a daemon falls as the rate rises: each wake-up costs about the same and
carries more packets; docs/perf-path.md).  ``--shards N`` runs N LRPs and N RRPs
(``--shard I/N``; the figures per role are summed over them), ``--pin`` runs daemons and
instruments under taskset (``benchmarks.topology.parse_pin``).  ``--openvpn VARIANT`` runs
the same rates through OpenVPN-TCP (``benchmarks.openvpn``) in the same run, rate by rate
after the proxy (``lrp``/``rrp`` are then the client's and the server's openvpn), and ends
with both side by side.  ``--instrument ENGINE`` runs the instruments (sender and sink) with
that engine (``benchmarks.instrument``: c, the default, or python); repeated, each rate is run
with each engine in turn against the same daemons, and a table of both ends the run (an A/B of
the instrument itself).  Every row names its engine and the instruments' own CPU per packet.
``--idle S`` leaves the link idle (no GRE) for S s before each trial, and ``--warm-up 0``
skips the warm-up trial (the first trial is then the first GRE of a new link): with a short
``--duration`` (0.5-1 s) and ``--latency``, a trial shows the onset of an overload, what an
idle or new link does before its send-queue limit has measured the path (docs/gre-io.md).
``--junk-rate PPS`` floods the LRP during each trial with GRE from the client's address
whose call IDs no call holds (a sender of its own, as an attacker's): what the calls' GRE
delivers beside it, and the drops by reason, show whether a flood of bad input costs more
than what it concerns.  Needs root.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from benchmarks import instrument, measure, openvpn, topology
from tests.support import netns


def run_seconds(pid):
    """The process's CPU run time so far, in seconds: every thread's (``/proc/PID/schedstat``
    is the main thread's alone), from schedstat (nanoseconds, not ticks)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended between the listing and the read
    return total / 1e9


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


def openvpn_counters(path):
    """{"lrp"|"rrp": (run seconds,)} of an OpenVPN path's client and server daemons."""
    return {name.replace("ovpn-l", "lrp").replace("ovpn-r", "rrp"): (run_seconds(proc.pid),)
            for name, (proc, _) in path.procs.items()}


DIRECTIONS = {"forward": "c2s", "reverse": "s2c", "both": "both"}  # -> topology/kernel's names
LEGS = ("forward", "reverse")   # the order of a "both" Path's legs (kernel.directions)


def directed(paths_of, direction):
    """The Path of *direction* from a {"c2s", "s2c", "both"} builder (ProxyPath.paths,
    OpenVPNPath.paths)."""
    return paths_of()[DIRECTIONS[direction]]


def offered(path, rate):
    """The total rate to give run_trial (which shares it over *path*'s senders) for *rate*
    in each direction: a ``Path.both`` has a leg per direction."""
    return rate * len(path.legs) if path.legs else rate


def _latency(got):
    return {k: round(v) for k, v in (got.get("latency_us") or {}).items()}


def _direction_cells(got, latency):
    return {"offered_pps": round(got["offered_pps"]), "delivered_pps": round(got["delivered_pps"]),
            "sent": got["sent"], "received": got["received"], "loss": round(got["loss"], 5),
            **({"latency_us": _latency(got)} if latency else {})}


def measure_rate(lab, label, path, rate, args, counters_of, drops_of=dict, junk=0):
    """One trial of *path* at *rate* (per direction): the row printed, with each daemon's CPU
    per packet (every packet delivered, both directions together with ``both``); *junk*: the
    flood's rate beside it (``--junk-rate``), its sender inside the counters' window."""
    direction = getattr(args, "direction", "forward")
    drops, before = drops_of(), counters_of()
    flood = start_junk(lab, path, args) if junk else None
    got = measure.run_trial(lab, path, args.size, offered(path, rate), args.duration, latency=args.latency,
                            batch=8 if args.latency else None)
    flooded = stop_junk(flood) if flood is not None else None
    after, dropped = counters_of(), drops_of()
    row = {"path": label, **({"direction": direction} if direction != "forward" else {}),
           "rate": rate, "size": args.size, "offered_pps": round(got["offered_pps"]),
           "delivered_pps": round(got["delivered_pps"]), "received": got["received"],
           **({"loss": round(got["loss"], 5)} if direction != "forward" else {}),
           **({"latency_us": _latency(got)} if args.latency and direction != "both" else {}),
           **{leg: _direction_cells(part, args.latency) for leg, part in zip(LEGS, got.get("legs", ()))},
           "daemon_drops": {k: v - drops.get(k, 0) for k, v in dropped.items() if v - drops.get(k, 0)},
           **instrument_cells(got), **({"junk": flooded} if flooded else {})}
    for name in after:
        cpu = after[name][0] - before[name][0]
        row[f"{name}_us_per_packet"] = round(cpu * 1e6 / got["received"], 1) if got["received"] else None
        if len(after[name]) > 2:
            wakeUps, captured = after[name][1] - before[name][1], after[name][2] - before[name][2]
            if captured:
                row[f"{name}_packets_per_wake_up"] = round(captured / wakeUps, 2)
    print(json.dumps(row), flush=True)
    return row


def instrument_cells(got):
    """The row's instrument: its engine and its sender's and sink's CPU per packet (us)."""
    cost = got.get("instrument") or {}
    return {"instrument": cost.get("engine"), "sender_us_per_packet": cost.get("send_us_per_packet"),
            "sink_us_per_packet": cost.get("sink_us_per_packet")}


def instruments_table(rows):
    """Each rate with each engine: what the A/B of ``--instrument c --instrument python`` shows."""
    lines = ["the instruments' engines side by side (us per packet: the sender's per packet sent, "
             "the sink's per packet received):",
             f"{'rate':>7} {'path':16} {'engine':>6} {'delivered':>9} {'LRP us/pkt':>10} {'RRP us/pkt':>10}"
             f" {'min/p50/p99 us':>18} {'sender us':>9} {'sink us':>8}"]
    for row in sorted(rows, key=lambda r: (r["rate"], r["path"])):
        lines.append(f"{row['rate']:>7} {row['path']:16} {row.get('instrument') or '-':>6} {row['delivered_pps']:>9} "
                     f"{row.get('lrp_us_per_packet') or '-':>10} {row.get('rrp_us_per_packet') or '-':>10}"
                     f" {_lat(row.get('latency_us')):>18} {row.get('sender_us_per_packet') or '-':>9}"
                     f" {row.get('sink_us_per_packet') or '-':>8}")
    return "\n".join(lines)


def _lat(latency):
    return "/".join(str(latency.get(k, "-")) for k in ("min", "p50", "p99")) if latency else "-"


def _loss(cells):
    return f"{cells['loss'] * 100:.2f}%" if "loss" in cells else "-"


def side_by_side(rows, direction="forward"):
    """The rows as one table, rate by rate (what the JSON lines say, for reading)."""
    ordered = sorted(rows, key=lambda r: r["rate"])
    if direction == "reverse":
        lines = ["server -> client (--direction reverse):",
                 f"{'rate':>7} {'path':16} {'delivered':>9} {'loss':>7} {'LRP us/pkt':>10} {'RRP us/pkt':>10}"
                 f" {'min/p50/p99 us':>18}"]
        for row in ordered:
            lines.append(f"{row['rate']:>7} {row['path']:16} {row['delivered_pps']:>9} {_loss(row):>7} "
                         f"{row.get('lrp_us_per_packet') or '-':>10} {row.get('rrp_us_per_packet') or '-':>10}"
                         f" {_lat(row.get('latency_us')):>18}")
        return "\n".join(lines)
    if direction == "both":
        lines = ["both directions at once (--direction both): rate offered per direction; "
                 "us/pkt over the packets of both",
                 f"{'rate':>7} {'path':16} {'fwd deliv':>9} {'fwd loss':>8} {'rev deliv':>9} {'rev loss':>8}"
                 f" {'LRP us/pkt':>10} {'RRP us/pkt':>10} {'fwd min/p50/p99':>18} {'rev min/p50/p99':>18}"]
        for row in ordered:
            fwd, rev = row.get("forward") or {}, row.get("reverse") or {}
            lines.append(f"{row['rate']:>7} {row['path']:16} {fwd.get('delivered_pps', '-'):>9} {_loss(fwd):>8} "
                         f"{rev.get('delivered_pps', '-'):>9} {_loss(rev):>8} "
                         f"{row.get('lrp_us_per_packet') or '-':>10} {row.get('rrp_us_per_packet') or '-':>10}"
                         f" {_lat(fwd.get('latency_us')):>18} {_lat(rev.get('latency_us')):>18}")
        return "\n".join(lines)
    lines = [f"{'rate':>7} {'path':16} {'delivered':>9} {'LRP us/pkt':>10} {'RRP us/pkt':>10}"
             f" {'min/p50/p99 us':>18}"]
    for row in sorted(rows, key=lambda r: r["rate"]):
        latency = row.get("latency_us") or {}
        lat = "/".join(str(latency.get(k, "-")) for k in ("min", "p50", "p99")) if latency else "-"
        lines.append(f"{row['rate']:>7} {row['path']:16} {row['delivered_pps']:>9} "
                     f"{row.get('lrp_us_per_packet') or '-':>10} {row.get('rrp_us_per_packet') or '-':>10}"
                     f" {lat:>18}")
    return "\n".join(lines)


def start_junk(lab, path, args):
    """A sender of GRE with call IDs no call holds, from the first sender's namespace and
    address to the same destination, at ``--junk-rate`` for as long as a trial."""
    if args.direction != "forward":
        raise SystemExit("fixedrate: --junk-rate floods the LRP: forward only")
    ns, dst, _, link = path.senders[0]
    used = {key for _, _, keys, _ in path.senders for key in keys}
    keys = [key for key in range(40000, 40100) if key not in used][:8]
    argv = ["send", "--dst", dst, "--size", args.size, "--rate", args.junk_rate,
            "--duration", args.duration, "--keys", ",".join(map(str, keys)), "--run", 0]
    if link is not None:
        argv += link.argv()
    return lab.spawn(ns, instrument.argv(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True, env=measure.child_env(), cwd=measure.REPO)


def stop_junk(proc):
    """The junk sender's own count: {"sent": packets, "pps": its rate}."""
    out, err = proc.communicate(timeout=60)
    got = next((json.loads(line) for line in out.splitlines() if line.startswith("{")), None)
    if got is None:
        raise SystemExit(f"fixedrate: the junk sender failed (rc={proc.returncode}): {err[-400:]}")
    return {"sent": got.get("sent"), "pps": round(got.get("pps") or 0)}


def shape_link(lab, proxy, mbit):
    """Both ends of the link's veth limited to *mbit* each way (tbf, 16 KB burst, 64 KB
    queue): the line that says so."""
    middle = proxy.middle
    for ns, device in ((middle.ns_a, middle.name_a), (middle.ns_b, middle.name_b)):
        lab.run(ns, ["tc", "qdisc", "add", "dev", device, "root", "tbf", "rate", f"{mbit:g}mbit",
                     "burst", "16kb", "limit", "64kb"])
    return f"link LRP <-> RRP shaped: {mbit:g} Mbit/s each way (tbf, 64 KB queue)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("--rate", type=int, action="append", help="offered packets/s (repeatable; 0: flat out)")
    p.add_argument("--size", type=int, default=1400)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--latency", action="store_true",
                   help="one-way latency too (batches of 8, as the latency trials)")
    p.add_argument("--py-spy", metavar="DIR")
    p.add_argument("--direction", choices=tuple(DIRECTIONS), default="forward",
                   help="forward: client -> server (default); reverse: server -> client (the RRP "
                        "captures, the LRP sends); both: the two at once, --rate per direction")
    p.add_argument("--proxy-options", default="", help="extra options for both daemons (an A/B)")
    p.add_argument("--lrp-options", default="", help="extra options for the LRP only "
                   "(e.g. --gre-capture native on the LRP alone)")
    p.add_argument("--openvpn", action="append", default=[], choices=sorted(openvpn.VARIANTS),
                   help="also run each rate through this OpenVPN-TCP variant (repeatable)")
    p.add_argument("--link-rate", type=float, metavar="MBIT",
                   help="shape the LRP <-> RRP link to this rate each way (tc tbf, a 64 KB queue): "
                        "a slow path between the daemons (--link-queue-delay)")
    p.add_argument("--idle", type=float, default=0.0, metavar="S",
                   help="seconds the link stays idle before each trial (the onset of an overload "
                        "after idle, with a short --duration)")
    p.add_argument("--junk-rate", type=int, default=0, metavar="PPS",
                   help="during each trial, GRE to the LRP at PPS from the client with call IDs "
                        "no call holds (forward only)")
    p.add_argument("--warm-up", type=float, default=1.0, metavar="S",
                   help="seconds of the warm-up trial (0: none, the first trial meets a new link)")
    topology.add_shard_arguments(p)
    instrument.add_argument(p, repeatable=True)
    args = p.parse_args(argv)
    rates = args.rate or [5000, 20000]
    engines = args.instrument or [instrument.selected()]
    if args.openvpn and openvpn.missing():
        raise SystemExit(f"fixedrate: --openvpn: {openvpn.missing()}")
    netns.skip_unless_available()
    netns.reap_stale()
    topology.raise_fd_limit()
    topology.pin_instruments(args.pin)
    lab = netns.NetnsLab()
    proxy = topology.ProxyPath(lab, options=shlex.split(args.proxy_options), shards=args.shards, pin=args.pin,
                               lrp_options=shlex.split(args.lrp_options))
    references = {}
    try:
        proxy.start()
        if args.link_rate:
            print(shape_link(lab, proxy, args.link_rate), flush=True)
        if not proxy.open_sessions(args.sessions).calls:
            raise SystemExit("no call through the proxies")
        proxy.balance(max(1, args.sessions // args.shards))
        print(f"{args.shards} shard(s): {proxy.affinity()}", flush=True)
        instrument.select(engines[0])
        print(f"instruments: {', '.join(engines)} (running: {instrument.engine()})", flush=True)
        for variant in args.openvpn:
            reference = references[variant] = openvpn.OpenVPNPath(lab, variant)
            reference.start()
        path = proxy.path() if args.direction == "forward" else directed(proxy.paths, args.direction)
        paths = {label: directed(reference.paths, args.direction) for label, reference in references.items()}
        if args.warm_up > 0:
            measure.run_trial(lab, path, args.size, offered(path, rates[0]), args.warm_up)
            for reference in paths.values():
                measure.run_trial(lab, reference, args.size, offered(reference, rates[0]), args.warm_up)
        spies = py_spy(proxy, args.py_spy, args.duration) if args.py_spy else []
        rows = []
        for rate in rates:
            for engine in engines:
                instrument.select(engine)
                if args.idle > 0:
                    time.sleep(args.idle)
                rows.append(measure_rate(lab, "proxy", path, rate, args, lambda: counters(proxy), proxy.drops,
                                         junk=args.junk_rate))
                for spy in spies:
                    spy.wait()
                spies = []
                for variant, reference in references.items():
                    rows.append(measure_rate(lab, reference.label, paths[variant], rate, args,
                                             lambda: openvpn_counters(reference)))
        if references or args.direction != "forward":
            print(side_by_side(rows, args.direction), flush=True)
        if len(engines) > 1:
            print(instruments_table(rows), flush=True)
    finally:
        for reference in references.values():
            reference.close()
            shutil.rmtree(reference.workdir, ignore_errors=True)
        topology.tear_down(proxy, lab)


if __name__ == "__main__":
    main()
