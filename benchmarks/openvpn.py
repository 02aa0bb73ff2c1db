"""The OpenVPN-TCP reference: the same four namespaces as the proxy, OpenVPN in the middle two.

::

    client 10.81.0.2 ── 10.81.0.1 ovpn-l 10.82.0.1 ══ TLS/TCP ══ 10.82.0.2 ovpn-r 10.83.0.1 ── 10.83.0.2 server
                                  tun 10.89.0.1 ─────────────────── tun 10.89.0.2

What users compare routeproxy with: OpenVPN 2.6 in TCP mode carries IP packets between two
daemons over one TLS/TCP connection.  Point-to-point TLS mode (no ``--server``, so no pool
and no ``iroute``), ``--dev tun``, AES-256-GCM data channel, TLS 1.3 with the benchmark's own
lab certificates (``python -m routeproxy certs``), ``--disable-dco`` (user space, as
routeproxy is).  The two middle namespaces forward IPv4, so the client's GRE to the server's
address (the same probes, the same Ethernet-frame sender) goes through the tunnel.  Variants:
``default`` (OpenVPN's defaults: Nagle on) and ``nodelay`` (``--socket-flags TCP_NODELAY`` on
both ends: what ``--tcp-nodelay`` sets).

The measurement is the proxy's own (``topology.measure_throughput``): max loss-free rate,
latency at fractions of it, each daemon's CPU per delivered packet.  Needs ``openvpn`` on
PATH (``apt-get install openvpn``); skipped with that reason otherwise.
"""
import os
import shutil
import tempfile
import time

from benchmarks import measure
from benchmarks.topology import four_namespaces, measure_throughput, tear_down
from tests.support import daemons, netns
from tests.support.wait import HarnessError, wait_until

PORT = 1194
VARIANTS = {"default": [], "nodelay": ["--socket-flags", "TCP_NODELAY"]}
QUICK_VARIANTS = ("nodelay",)
COMMON = ["--dev", "tun", "--data-ciphers", "AES-256-GCM", "--cipher", "AES-256-GCM",
          "--tls-version-min", "1.3", "--disable-dco", "--verb", "3", "--ping", "0",
          "--persist-tun", "--persist-key", "--mute-replay-warnings"]


def missing():
    """Why the OpenVPN path cannot run here, or None."""
    if shutil.which("openvpn") is None:
        return "openvpn is not installed (apt-get install openvpn)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    return None


class OpenVPNPath:
    """The four namespaces and the two OpenVPN daemons; the interface topology.measure_throughput uses."""

    def __init__(self, lab, variant="default", workdir=None):
        self.lab, self.variant = lab, variant
        self.label = "openvpn" if variant == "default" else f"openvpn-{variant}"
        self.workdir = workdir or tempfile.mkdtemp(prefix="rp-bench-ovpn-")
        self.procs = {}
        (self.client, self.left_ns, self.right_ns, self.server,
         self.left, self.middle, self.right) = four_namespaces(lab, "ovpnl", "ovpnr")
        lab.route(self.client, "default", "via", self.left.ip_b)
        lab.route(self.server, "default", "via", self.right.ip_a)
        for ns in (self.left_ns, self.right_ns):
            lab.sysctl(ns, "net.ipv4.ip_forward", 1)
        self.link = measure.link_from(lab, self.left)

    def _openvpn(self, name, ns, options):
        log = os.path.join(self.workdir, f"{name}.log")
        argv = ["openvpn", "--log", log, *COMMON, *VARIANTS[self.variant], *options]
        self.procs[name] = (self.lab.spawn(ns, argv, logfile=log + ".out"), log)

    def _log(self, name):
        try:
            with open(self.procs[name][1], errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def start(self, timeout=30):
        """Both daemons; returns once both logged "Initialization Sequence Completed"."""
        c = daemons.make_certs(self.workdir, "ovpn-r.bench.test", ["ovpn-l.bench.test"])
        self._openvpn("ovpn-r", self.right_ns, [
            "--proto", "tcp-server", "--local", self.middle.ip_b, "--lport", str(PORT),
            "--ifconfig", "10.89.0.2", "10.89.0.1", "--route", "10.81.0.0", "255.255.255.0",
            "--tls-server", "--dh", "none", "--ca", c["ca"], "--cert", c["rrp_cert"], "--key", c["rrp_key"]])
        self._openvpn("ovpn-l", self.left_ns, [
            "--proto", "tcp-client", "--remote", self.middle.ip_b, str(PORT),
            "--ifconfig", "10.89.0.1", "10.89.0.2", "--route", "10.83.0.0", "255.255.255.0",
            "--tls-client", "--ca", c["ca"], "--cert", c["lrp_cert"], "--key", c["lrp_key"]])
        try:
            wait_until(lambda: all("Initialization Sequence Completed" in self._log(n) for n in self.procs),
                       timeout, "OpenVPN tunnel up",
                       alive=lambda: all(p.poll() is None for p, _ in self.procs.values()))
        except HarnessError as e:
            raise HarnessError(f"{e}\n" + "\n".join(f"--- {n}\n{self._log(n)[-1500:]}" for n in self.procs)) from None
        return self

    def describe(self):
        """The negotiated cipher and TLS lines of both logs (what the figures were measured with)."""
        lines = []
        for name in self.procs:
            lines += [f"{name}: {line.split(' ', 5)[-1]}" for line in self._log(name).splitlines()
                      if "Control Channel:" in line or "Data Channel:" in line]
        return lines

    def path(self):
        return measure.Path(self.label, [(self.client, self.right.ip_b, [7], self.link)], self.server)

    def paths(self):
        from benchmarks.kernel import directions
        s2c = measure.Path(self.label, [(self.server, self.left.ip_a, [8],
                                         measure.link_from(self.lab, self.right, "b"))], self.client)
        return directions(self.label, self.path(), s2c)

    def usage(self):
        """{daemon: (cpu seconds, rss KiB)} now (the openvpn processes themselves)."""
        return {name.replace("ovpn-l", "lrp").replace("ovpn-r", "rrp"): (daemons.cpu_seconds(proc.pid), daemons.rss_kib(proc.pid))
                for name, (proc, _) in self.procs.items()}

    def close(self):
        for proc, _ in self.procs.values():
            netns.stop_process(proc)


PARTS = ("openvpn",)


def run(settings, log=print, variants=None):
    """{variant: throughput result} for each OpenVPN variant; {"skipped": reason} without openvpn."""
    reason = missing()
    if reason:
        log(f"openvpn: skipped: {reason}")
        return {"skipped": reason}
    netns.skip_unless_available()
    netns.reap_stale()
    results = {}
    for variant in variants or (QUICK_VARIANTS if settings.quick else tuple(VARIANTS)):
        lab = netns.NetnsLab()
        ovpn = OpenVPNPath(lab, variant)
        started = time.monotonic()
        try:
            ovpn.start()
            results[variant] = measure_throughput(ovpn, settings, log)
            results[variant]["openvpn"] = ovpn.describe()
        except (HarnessError, measure.MeasureError, netns.NetnsError, OSError) as e:
            results[variant] = {"error": str(e)}
            log(f"openvpn {variant}: FAILED: {e}")
        finally:
            tear_down(ovpn, lab)
        results[variant]["seconds"] = time.monotonic() - started
    return results
