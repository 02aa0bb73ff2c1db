"""The reference paths, measured in the same run as the proxies.

* ``veth``: generator -> sink over one veth pair: the instruments alone (the generator must
  be faster than anything it measures).
* ``router``: client ns -> router ns (plain IPv4 forwarding) -> server ns: the most this
  kernel can forward between namespaces, the ceiling for any forwarder here.
* ``nat``: client ns -> NAT ns -> server ns with MASQUERADE and the kernel's PPTP helper
  (``CT --helper pptp``: nf_conntrack_pptp + nf_nat_pptp, built into this kernel) on a real
  control connection (scripted PNS and PAC, tests/support/pptppeers.py), GRE keyed by the PAC's
  call ID as a PPTP client sends it.  If the helper cannot be attached, MASQUERADE with plain
  GRE conntrack is measured instead and the result says so.

All send with the Ethernet-frame sender (loadgen.Link); router and nat also server -> client
and both directions at once (max rate only).
"""
import asyncio
import shutil
import tempfile
import time

from benchmarks import measure
from tests.support import netns, pptppeers
from tests.support.wait import HarnessError

CLIENT_NET, SERVER_NET = "10.71.0", "10.72.0"


class KernelError(Exception):
    """A reference path could not be built (the message says which command failed)."""


def build_veth(lab):
    """Generator and sink namespaces joined by one veth pair."""
    gen, sink = lab.namespace("gen"), lab.namespace("sink")
    link = lab.veth(gen, sink, "10.70.0.1/24", "10.70.0.2/24")
    return measure.Path("veth", [(gen, link.ip_b, [7], measure.link_from(lab, link))], sink)


def _three_namespaces(lab, middle_label):
    client, middle, server = lab.namespace("client"), lab.namespace(middle_label), lab.namespace("server")
    left = lab.veth(client, middle, f"{CLIENT_NET}.2/24", f"{CLIENT_NET}.1/24")
    right = lab.veth(middle, server, f"{SERVER_NET}.1/24", f"{SERVER_NET}.2/24")
    lab.route(client, "default", "via", f"{CLIENT_NET}.1")
    lab.route(server, "default", "via", f"{SERVER_NET}.1")
    lab.sysctl(middle, "net.ipv4.ip_forward", 1)
    return client, middle, server, left, right


def build_router(lab):
    """client -> router -> server, plain forwarding; returns {direction: Path}."""
    client, router, server, left, right = _three_namespaces(lab, "router")
    c2s = measure.Path("router", [(client, right.ip_b, [7], measure.link_from(lab, left))], server)
    s2c = measure.Path("router", [(server, left.ip_a, [8], measure.link_from(lab, right, "b"))], client)
    return directions("router", c2s, s2c)


def directions(label, c2s, s2c):
    """{"c2s", "s2c", "both"} Paths for one topology."""
    return {"c2s": c2s, "s2c": s2c, "both": measure.Path.both(label, c2s, s2c)}


class NatPath:
    """The NAT reference: the path, its control sessions and what the helper did."""

    def __init__(self, paths, sessions, helper, note, pac, workdir):
        self.paths, self.sessions, self.helper, self.note = paths, sessions, helper, note
        self.pac, self.workdir = pac, workdir

    def close(self):
        self.sessions.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def build_nat(lab, loop, sessions_count=1):
    """client -> NAT (MASQUERADE + pptp helper) -> server with *sessions_count* PPTP calls up."""
    client, nat, server, left, right = _three_namespaces(lab, "nat")
    helper, note = True, "MASQUERADE + CT --helper pptp (nf_conntrack_pptp, nf_nat_pptp)"
    try:
        lab.iptables(nat, "-t", "raw", "-A", "PREROUTING", "-p", "tcp", "--dport", "1723",
                     "-j", "CT", "--helper", "pptp")
    except netns.NetnsError as e:
        helper, note = False, f"pptp helper unavailable ({e}); MASQUERADE with GRE conntrack only"
    try:
        lab.iptables(nat, "-t", "nat", "-A", "POSTROUTING", "-o", right.name_a, "-j", "MASQUERADE")
    except netns.NetnsError as e:
        raise KernelError(f"MASQUERADE in {nat}: {e}") from None
    workdir = tempfile.mkdtemp(prefix="rp-bench-nat-")
    try:
        pac = pptppeers.ServerProcess(lab, server, right.ip_b, workdir, 1723, name="pac", gre=False)
    except HarnessError as e:
        shutil.rmtree(workdir, ignore_errors=True)
        raise KernelError(str(e)) from None
    make_socket = lambda: pptppeers.tcp_socket(lambda: lab.inside(client))  # noqa: E731
    sessions = pptppeers.open_sessions(loop, make_socket, (right.ip_b, 1723), sessions_count)
    if not sessions.calls:
        shutil.rmtree(workdir, ignore_errors=True)
        raise KernelError(f"no PPTP call through the NAT: {sessions.failures[:3]}")
    expectations = lab.run(nat, ["cat", "/proc/net/nf_conntrack_expect"], check=False).stdout
    if helper and expectations.strip() == "" and "pptp" not in expectations:
        note += " (no expectation visible in /proc/net/nf_conntrack_expect)"
    c2s = measure.Path("nat", [(client, right.ip_b, sessions.keys, measure.link_from(lab, left))], server)
    # Server -> client GRE goes to the NAT's address, keyed with the call ID the PAC saw
    # (the helper's rewritten client ID), which the helper maps back to the client's.
    peers = pac.peer_ids(len(sessions.calls))
    s2c = measure.Path("nat", [(server, right.ip_a, peers, measure.link_from(lab, right, "b"))], client)
    return NatPath(directions("nat", c2s, s2c), sessions, helper, note, pac, workdir)


class Settings:
    """How much to measure: sizes, trial length, search steps, latency fractions, sessions."""

    def __init__(self, quick=False):
        self.quick = quick
        self.sizes = (512,) if quick else (64, 512, 1400)
        self.duration = 0.3 if quick else 1.0
        self.steps = 3 if quick else 6
        self.fractions = (0.5,) if quick else (0.1, 0.5, 0.9)
        self.latency_sizes = (512,) if quick else (64, 512, 1400)
        self.sessions = 2 if quick else 8             # proxy throughput: M sessions on one link
        self.scale_counts = (10, 100) if quick else (10, 100, 1000, 10000)
        self.scale_traffic = not quick               # a flat-out trial at each session count
        # Directions besides client->server, measured for the max rate only (no latency).
        self.directions = ("both",) if quick else ("s2c", "both")
        self.proxy_options = []                      # extra options for both routeproxy daemons


def measure_path(lab, path, settings, log=print, others=None):
    """Max loss-free rate per size and the latency profile: a dict for the JSON results.

    *path* is client->server; *others* ({direction: Path}) are measured for the max rate only.
    """
    if isinstance(path, dict):
        others = {d: p for d, p in path.items() if d != "c2s" and d in settings.directions}
        path = path["c2s"]
    result = {"label": path.label, "sizes": {}, "directions": {}}
    for direction, other in (others or {}).items():
        per_size = result["directions"][direction] = {}
        for size in settings.sizes:
            best, trials = measure.find_max_rate(lab, other, size, settings.duration, settings.steps,
                                                 log=lambda text: log(f"{text} [{direction}]"))
            per_size[str(size)] = {"max": best, "trials": trials}
    for size in settings.sizes:
        best, trials = measure.find_max_rate(lab, path, size, settings.duration, settings.steps, log=log)
        entry = {"max": best, "trials": trials}
        if best and size in settings.latency_sizes:
            entry["latency"] = measure.latency_profile(lab, path, size, best["delivered_pps"],
                                                       settings.duration, settings.fractions, log=log)
        result["sizes"][str(size)] = entry
    return result


PARTS = ("veth", "router", "nat")


def run(settings, log=print, parts=PARTS):
    """Build and measure veth, router and nat; returns {"veth": .., "router": .., "nat": ..}."""
    netns.skip_unless_available()
    netns.reap_stale()
    results = {}
    loop = asyncio.new_event_loop()
    for name in parts:
        lab = netns.NetnsLab()
        started = time.monotonic()
        try:
            if name == "nat":
                nat = build_nat(lab, loop)
                try:
                    results[name] = measure_path(lab, nat.paths, settings, log)
                    results[name]["note"] = nat.note
                    results[name]["pptp_helper"] = nat.helper
                finally:
                    nat.close()
            else:
                paths = build_veth(lab) if name == "veth" else build_router(lab)
                results[name] = measure_path(lab, paths, settings, log)
        except (KernelError, measure.MeasureError) as e:
            results[name] = {"label": name, "error": str(e)}
            log(f"{name}: FAILED: {e}")
        finally:
            lab.cleanup()
        results.setdefault(name, {})["seconds"] = time.monotonic() - started
    loop.close()
    return results
