"""`python -m benchmarks [--quick] [--out results.json] [--only PART ...] [--repeat N]`: the whole suite.

Parts: generators (sendto vs sendmmsg vs AF_PACKET vs tcpreplay), veth (generator -> sink), router and nat (the kernel references), throughput and
scale (through twistd routeproxy-lrp/rrp; skipped with a reason until the daemons exist),
openvpn (OpenVPN 2.6 over TCP, default and TCP_NODELAY, in the same topology as the proxy).
``--repeat N`` runs the chosen parts N times in turn (interleaved: proxy, openvpn, proxy, ...)
and adds medians and spreads over the rounds.  ``--instrument c|python`` chooses the
instruments' engine (benchmarks.instrument; C by default): the results name the one that ran.
Needs root (namespaces, raw sockets).  Prints progress and a summary table with ratios
against the kernel router; writes every trial to the JSON file.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

from benchmarks import generators, instrument, kernel, openvpn, topology

ALL_PARTS = ("generators",) + kernel.PARTS + topology.PARTS + openvpn.PARTS


def machine():
    """nproc, CPU model, kernel and Python: the context every figure needs."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "load_before": os.getloadavg(), "commit": _commit(),
            "instrument": instrument.engine()}


def _commit():
    """The checkout's commit (and "+dirty"), since the daemons' figures change with it."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no", "routeproxy"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def _fmt(value, spec=".0f", missing="-"):
    return missing if value is None else format(value, spec)


def _max_of(result, size):
    entry = (result or {}).get("sizes", {}).get(str(size)) or {}
    return entry.get("max"), entry


def table(results, settings):
    """The summary: one block per packet size, one line per path."""
    lines = []
    gens = results.get("generators") or {}
    if gens and "error" not in gens:
        lines.append("generators alone (flat out into a veth, nothing listening), packets/s:")
        for size, row in gens.items():
            lines.append(f"  {size:>5}B " + "  ".join(f"{m} {v['pps']:.0f}" for m, v in row.items() if "pps" in v))
    paths = [(name, results.get(name)) for name in ("veth", "router", "nat")]
    proxy = (results.get("proxy") or {}).get("throughput")
    if proxy and "sizes" in proxy:
        paths.append(("proxy", proxy))
    paths += _openvpn_paths(results)
    for size in settings.sizes if any(result for _, result in paths) else ():
        router_best, _ = _max_of(results.get("router"), size)
        lines.append(f"\n{size}-byte GRE (IPv4 bytes); max rate with < 0.1% loss; one-way latency at 10/50/90% of it")
        lines.append(f"{'path':16} {'pps':>9} {'Mbit/s':>8} {'x router':>8}  "
                     f"{'latency p50/p99/p99.9 us @10%':>30} {'@50%':>20} {'@90%':>20}")
        for name, result in paths:
            if result is None:
                continue
            if "error" in result:
                lines.append(f"{name:16} FAILED: {result['error'][:100]}")
                continue
            best, entry = _max_of(result, size)
            if best is None:
                lines.append(f"{name:16} {'(no loss-free rate found)':>30}")
                continue
            ratio = (best["delivered_pps"] / router_best["delivered_pps"]) if router_best else None
            cells = []
            for fraction in ("10%", "50%", "90%"):
                lat = ((entry.get("latency") or {}).get(fraction) or {}).get("latency_us") or {}
                cells.append("/".join(_fmt(lat.get(k), ".0f") for k in ("p50", "p99", "p99.9")) if lat else "-")
            mark = "*" if best.get("target_pps") == 0 else "?" if best.get("confirmed") is False else " "
            lines.append(f"{name:15}{mark} {best['delivered_pps']:9.0f} {best['mbps']:8.1f} {_fmt(ratio, '8.2f'):>8}  "
                         f"{cells[0]:>30} {cells[1]:>20} {cells[2]:>20}")
        other = []
        for name, result in paths:
            for direction, per_size in ((result or {}).get("directions") or {}).items():
                best = (per_size.get(str(size)) or {}).get("max")
                mark = "*" if best and best.get("target_pps") == 0 else ""
                other.append(f"{name} {direction} {_fmt(best and best['delivered_pps'])}{mark}")
        if other:
            lines.append("other directions (max pps, s2c = server->client, both = sum of both at once): "
                         + "; ".join(other))
        for name, result in paths:
            cpu = ((result or {}).get("sizes", {}).get(str(size)) or {}).get("cpu") or {}
            per = cpu.get("cpu_us_per_packet") or {}
            if per:
                lines.append(f"{name} CPU us/packet: " + ", ".join(f"{k} {_fmt(v, '.1f')}" for k, v in per.items())
                             + "; CPU %: " + ", ".join(f"{k} {v:.0f}" for k, v in (cpu.get("cpu_percent") or {}).items()))
    if any(result for _, result in paths):
        lines.append("* no loss flat out: the path kept up with the generator, its own limit is higher")
        lines.append("? unconfirmed: the rate found lost > 0.1 % when run again, and so did 10 % and 19 % less")
    scale = (results.get("proxy") or {}).get("scale") or {}
    if scale.get("rows"):
        direct = scale.get("direct") or {}
        lines.append(f"\nsessions on one TLS link: set-up/s, RSS KiB per session (lrp, rrp), 512B flat-out pps"
                     f" (the synthetic peers alone: {_fmt(direct.get('setup_per_second'))} set-ups/s)")
        for row in scale["rows"]:
            per = row["rss_kib_per_session"]
            traffic = row.get("traffic") or {}
            lines.append(f"{row['sessions']:>6} {_fmt(row['setup_per_second']):>8} "
                         f"{_fmt(per.get('lrp'), '.2f'):>8} {_fmt(per.get('rrp'), '.2f'):>8} "
                         f"{_fmt(traffic.get('delivered_pps')):>9}")
    elif scale.get("error") or (results.get("proxy") or {}).get("skipped"):
        lines.append(f"\nproxy: {scale.get('error') or results['proxy']['skipped']}")
    return "\n".join(lines)


def _openvpn_paths(results):
    """[(label, throughput result)] of the OpenVPN variants measured (lrp/rrp = the two openvpn)."""
    got = results.get("openvpn") or {}
    return [("openvpn" if v == "default" else f"openvpn-{v}", r) for v, r in got.items()
            if isinstance(r, dict) and "sizes" in r]


def _figures(results):
    """{(path, size): {"pps", "p50", "p99", "cpu", "flat", "share"}} of one round: what --repeat
    summarises; "flat" is the flat-out trial's delivered rate (the proxy's), "share" the
    loss-free maximum as a percentage of it (issue 13's goal: at least 80)."""
    paths = [("proxy", (results.get("proxy") or {}).get("throughput") or {})] + _openvpn_paths(results)
    out = {}
    for name, result in paths:
        for size, entry in (result.get("sizes") or {}).items():
            best = entry.get("max")
            lat = (((entry.get("latency") or {}).get("50%") or {}).get("latency_us")) or {}
            cpu = ((entry.get("cpu") or {}).get("cpu_us_per_packet")) or {}
            flat = (entry.get("overload") or {}).get("delivered_pps")
            pps = best and best["delivered_pps"]
            out[(name, int(size))] = {"pps": pps, "p50": lat.get("p50"),
                                      "p99": lat.get("p99"), "lrp_us": cpu.get("lrp"), "rrp_us": cpu.get("rrp"),
                                      "flat": flat, "share": 100.0 * pps / flat if pps and flat else None}
    return out


def summary(rounds):
    """Median [min-max] over the rounds of each figure, one line per path and size."""
    per = {}
    for results in rounds:
        for key, figures in _figures(results).items():
            for what, value in figures.items():
                if value is not None:
                    per.setdefault(key, {}).setdefault(what, []).append(value)
    lines = [f"\nmedian [min-max] over {len(rounds)} interleaved rounds (loads "
             + ", ".join(f"{r['machine']['load_before'][0]:.1f}" for r in rounds) + "):",
             f"{'path':16} {'size':>5} {'max pps <0.1% loss':>26} {'p50 us @50%':>22} {'p99 us @50%':>24}"
             f" {'LRP us/pkt':>18} {'RRP us/pkt':>18} {'flat out delivered':>26} {'max/flat %':>16}"]
    for (name, size) in sorted(per, key=lambda k: (k[1], k[0])):
        row = per[(name, size)]

        def cell(what, spec=".0f"):
            values = sorted(row.get(what) or [])
            if not values:
                return "-"
            median = values[len(values) // 2] if len(values) % 2 else sum(values[len(values) // 2 - 1:][:2]) / 2
            return f"{median:{spec}} [{values[0]:{spec}}-{values[-1]:{spec}}]"
        lines.append(f"{name:16} {size:>5} {cell('pps'):>26} {cell('p50'):>22} {cell('p99'):>24}"
                     f" {cell('lrp_us', '.1f'):>18} {cell('rrp_us', '.1f'):>18} {cell('flat'):>26}"
                     f" {cell('share'):>16}")
    return "\n".join(lines)


def run_round(parts, settings, log):
    """Every chosen part once: one round's results."""
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine()}
    if "generators" in parts:
        results["generators"] = generators.run(settings, log)
    kernel_parts = [p for p in parts if p in kernel.PARTS]
    if kernel_parts:
        results.update(kernel.run(settings, log, kernel_parts))
    proxy_parts = [p for p in parts if p in topology.PARTS]
    if proxy_parts:
        results["proxy"] = topology.run(settings, log, proxy_parts)
    if "openvpn" in parts:
        results["openvpn"] = openvpn.run(settings, log)
    results["load_after"] = os.getloadavg()
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (a few seconds per part)")
    parser.add_argument("--out", help="write all results as JSON here")
    parser.add_argument("--only", action="append", choices=ALL_PARTS, help="run only this part (repeatable)")
    parser.add_argument("--repeat", type=int, default=1, help="run the parts this many times, interleaved")
    parser.add_argument("--size", type=int, action="append", help="measure only this packet size (repeatable)")
    parser.add_argument("--c2s-only", action="store_true", help="skip the server->client and both-ways searches")
    parser.add_argument("--proxy-options", default="",
                        help="extra options for both routeproxy daemons, e.g. '--gre-max-sojourn 0' (an A/B)")
    topology.add_shard_arguments(parser)
    instrument.add_argument(parser)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.stderr.write("benchmarks: needs root (network namespaces, raw sockets)\n")
        return 2
    parts = args.only or list(ALL_PARTS)
    settings = kernel.Settings(quick=args.quick)
    if args.size:
        settings.sizes = settings.latency_sizes = tuple(args.size)
    if args.c2s_only:
        settings.directions = ()
    settings.proxy_options = args.proxy_options.split()
    settings.shards, settings.pin = args.shards, args.pin
    topology.pin_instruments(args.pin)
    if args.instrument:
        instrument.select(args.instrument)
    log = lambda text: print(text, flush=True)  # noqa: E731
    log(f"instruments: {instrument.engine()} engine (benchmarks.instrument)")
    started = time.monotonic()
    rounds = []
    for index in range(max(1, args.repeat)):
        if args.repeat > 1:
            log(f"round {index + 1} of {args.repeat} (load {os.getloadavg()[0]:.1f})")
        rounds.append(run_round(parts, settings, log))
        if args.repeat > 1:
            print(table(rounds[-1], settings))
    results = dict(rounds[0], quick=args.quick, settings={k: v for k, v in vars(settings).items()})
    if len(rounds) > 1:
        results["rounds"] = rounds
    results["seconds"] = time.monotonic() - started
    if args.repeat == 1:
        print(table(results, settings))
    if any(_figures(r) for r in rounds):
        print(summary(rounds))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
