"""Which way of generating GRE is fastest here: the evidence behind loadgen's design.

Each candidate sends flat out for a fixed time over one veth pair with nothing listening
(the receiving side drops the packets, so only the sending path is measured):

* ``sendto``: one ``sendto`` per packet on a raw IPPROTO_GRE socket (the naive loop);
* ``sendmmsg``: loadgen.Sender on the raw IP socket (batches of 64 per system call);
* ``sendmmsg-packet``: loadgen.Sender with a Link (Ethernet frames, AF_PACKET, no qdisc);
* ``c-sendmmsg``, ``c-packet``: the same two in C (benchmarks/loadgen.c, what the benchmarks
  run by default: benchmarks.instrument), when it can be built;
* ``tcpreplay``: ``tcpreplay --topspeed`` of a pcap of the same frames (if installed).
"""
import os
import re
import shutil
import socket
import tempfile

from benchmarks import instrument, loadgen, measure
from tests.support import netns, tshark
from tests.support.daemons import REPO, child_env


def _send(lab, ns, argv, engine="python"):
    done = lab.run(ns, instrument.argv("send", *argv, engine_name=engine), env=child_env(), cwd=REPO, timeout=60)
    return measure._json_line(done.stdout, "sender")


def compare(lab, sizes=(64, 512, 1400), duration=1.0, log=print):
    """{size: {method: {"pps", "mbps"}}} for each candidate generator."""
    gen, sink = lab.namespace("gen"), lab.namespace("drop")
    veth = lab.veth(gen, sink, "10.74.0.1/24", "10.74.0.2/24")
    link = measure.link_from(lab, veth)
    results = {}
    for size in sizes:
        row = {}
        base = ["--dst", veth.ip_b, "--size", size, "--duration", duration, "--keys", 7]
        methods = [("sendto", ["--mode", "sendto"], "python"), ("sendmmsg", [], "python"),
                   ("sendmmsg-packet", link.argv(), "python")]
        if instrument.engine() == "c":
            methods += [("c-sendmmsg", [], "c"), ("c-packet", link.argv(), "c")]
        for method, extra, engine in methods:
            got = _send(lab, gen, base + extra, engine)
            row[method] = {"pps": got["pps"], "mbps": got["mbps"]}
        if shutil.which("tcpreplay"):
            body = loadgen.build_packet(size, 7, 1)
            frame = link.headers(veth.ip_b, len(body)) + body
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "gre.pcap")
                tshark.write_pcap(path, [frame] * 1000)
                loops = max(1, int(400_000 * duration / 1000))
                done = lab.run(gen, ["tcpreplay", "-q", "-i", veth.name_a, "--topspeed", f"--loop={loops}", path],
                               check=False, timeout=120)
                rated = re.search(r"Rated:.*?([\d.]+) Mbps, ([\d.]+) pps", done.stdout)
                if rated:
                    row["tcpreplay"] = {"pps": float(rated.group(2)), "mbps": float(rated.group(1))}
                else:
                    row["tcpreplay"] = {"error": (done.stdout + done.stderr)[-300:]}
        results[str(size)] = row
        log(f"  generators {size}B: " + ", ".join(
            f"{m} {v['pps']:.0f} pps" for m, v in row.items() if "pps" in v))
    return results


def run(settings, log=print):
    netns.skip_unless_available()
    netns.reap_stale()
    lab = netns.NetnsLab()
    try:
        return compare(lab, settings.sizes, settings.duration, log)
    except (measure.MeasureError, netns.NetnsError, socket.error) as e:
        log(f"generators: FAILED: {e}")
        return {"error": str(e)}
    finally:
        lab.cleanup()
