"""The proxy path: client ns -> LRP ns -> (TLS) -> RRP ns -> server ns.

::

    client 10.81.0.2 ── 10.81.0.1 LRP 10.82.0.1 ══ TLS ══ 10.82.0.2 RRP 10.83.0.1 ── 10.83.0.2 server

The daemons are started the way a user starts them (``twistd -n routeproxy-lrp|rrp`` with
the options of issue 4, certificates from ``python -m routeproxy certs``).  The server
namespace runs the synthetic PAC (benchmarks.pptpctl) for the control connections and the
benchmark sink for GRE.  The client side opens M control connections with one call each
(SCCRQ, OCRQ; the Call ID in the OCRP is the LRP-owned ID, the GRE key to send with) and
then sends GRE to the LRP.

Besides throughput and latency (the same search as the kernel paths), this module reads each
daemon's CPU time (``/proc/PID/stat`` utime+stime) around a trial, for CPU per packet, and
its RSS (``/proc/PID/status``) as the session count grows, for RSS per session and the
session set-up rate.
"""
import asyncio
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import measure, pptpctl

RRP_NAME = "rrp.bench.test"
LRP_NAME = "lrp.bench.test"
RRP_PORT = 4443
PPTP_PORT = 1723
TWISTD = os.path.join(sys.prefix, "bin", "twistd")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class TopologyError(Exception):
    """The proxy path could not be built (a daemon missing, dead or not listening)."""


def daemons_missing():
    """Why the proxy path cannot run (a sentence), or None once both daemons exist."""
    here = measure.REPO
    for module in ("lrp", "rrp", "lrp_tap", "rrp_tap"):
        if not os.path.exists(os.path.join(here, "routeproxy", f"{module}.py")):
            return f"routeproxy/{module}.py does not exist yet (issue 4)"
    if not os.path.exists(TWISTD) and shutil.which("twistd") is None:
        return "twistd is not installed"
    return None


def _listening(lab, ns, port, state="-l"):
    out = lab.run(ns, ["ss", "-Htn", state, f"sport = :{port}"] if state == "-l"
                  else ["ss", "-Htn", "state", "established", f"dport = :{port}"], check=False).stdout
    return bool(out.strip())


def _wait(predicate, timeout, what, handle=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if handle is not None and handle.proc.poll() is not None:
            raise TopologyError(f"{what}: the daemon exited\n{handle.tail()}")
        time.sleep(0.05)
    raise TopologyError(f"{what}: not within {timeout} s" + (f"\n{handle.tail()}" if handle else ""))


class Daemon:
    """A twistd daemon in a namespace, with its real pid for /proc accounting."""

    def __init__(self, name, ns, proc, log_path):
        self.name, self.ns, self.proc, self.log_path = name, ns, proc, log_path
        self._pid = None

    @property
    def pid(self):
        """The twistd process (``ip netns exec`` may have forked it)."""
        if self._pid is None:
            for candidate in [self.proc.pid] + _descendants(self.proc.pid):
                try:
                    with open(f"/proc/{candidate}/cmdline", "rb") as f:
                        if b"twistd" in f.read():
                            self._pid = candidate
                            break
                except OSError:
                    continue
        if self._pid is None:
            raise TopologyError(f"{self.name}: no twistd process under pid {self.proc.pid}")
        return self._pid

    def cpu_seconds(self):
        """utime + stime of the daemon so far, in seconds."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def rss_kib(self):
        """Resident set size in KiB (VmRSS)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def tail(self, limit=3000):
        try:
            with open(self.log_path, errors="replace") as f:
                return f"--- {self.name} log ---\n" + f.read()[-limit:]
        except OSError as e:
            return f"({self.log_path}: {e})"


def _descendants(pid):
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            children.append(int(entry))
            children += _descendants(int(entry))
    return children


def raise_fd_limit(want=65536):
    """Raise RLIMIT_NOFILE (inherited by the daemons) for the session-scale runs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else max(soft, min(want, hard))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target) if os.geteuid() == 0 else hard))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class ProxyPath:
    """The four namespaces, the certificates, the two daemons and the synthetic PAC."""

    def __init__(self, lab, workdir=None):
        self.lab = lab
        self.workdir = workdir or tempfile.mkdtemp(prefix="rp-bench-")
        self.daemons = {}
        self.loop = asyncio.new_event_loop()
        self.sessions = []
        self.pac = None
        self.client = lab.namespace("client")
        self.lrp_ns = lab.namespace("lrp")
        self.rrp_ns = lab.namespace("rrp")
        self.server = lab.namespace("server")
        self.left = lab.veth(self.client, self.lrp_ns, "10.81.0.2/24", "10.81.0.1/24")
        self.middle = lab.veth(self.lrp_ns, self.rrp_ns, "10.82.0.1/24", "10.82.0.2/24")
        self.right = lab.veth(self.rrp_ns, self.server, "10.83.0.1/24", "10.83.0.2/24")
        self.link = measure.link_from(lab, self.left)

    def _env(self):
        return dict(measure._env(), PYTHONUNBUFFERED="1")

    def certs(self):
        out = os.path.join(self.workdir, "certs")
        argv = [sys.executable, "-m", "routeproxy", "certs", "--out", out,
                "--rrp-name", RRP_NAME, "--lrp-name", LRP_NAME]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=measure.REPO, env=self._env())
        if done.returncode != 0:
            raise TopologyError(f"{' '.join(argv)}: {done.stderr.strip()}")
        return {"ca": os.path.join(out, "ca.crt"), "rrp": (os.path.join(out, "rrp.crt"), os.path.join(out, "rrp.key")),
                "lrp": (os.path.join(out, "lrp.crt"), os.path.join(out, "lrp.key"))}

    def _twistd(self, name, ns, plugin, options):
        log_path = os.path.join(self.workdir, f"{name}.log")
        argv = [TWISTD, "-n", "--pidfile=", f"--logfile={log_path}", plugin, *options]
        out = open(os.path.join(self.workdir, f"{name}.out"), "w")
        proc = self.lab.spawn(ns, argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir, env=self._env())
        out.close()
        daemon = Daemon(name, ns, proc, log_path)
        self.daemons[name] = daemon
        return daemon

    def start(self):
        """The synthetic PAC, the RRP, the LRP; returns once the TLS link is up."""
        try:
            self.pac = pptpctl.PacProcess(self.lab, self.server, self.right.ip_b, PPTP_PORT,
                                          self._env(), measure.REPO)
        except pptpctl.ControlError as e:
            raise TopologyError(str(e)) from None
        certs = self.certs()
        rrp = self._twistd("rrp", self.rrp_ns, "routeproxy-rrp", [
            "--listen", f"{self.middle.ip_b}:{RRP_PORT}", "--pptp-server", f"{self.right.ip_b}:{PPTP_PORT}",
            "--cert", certs["rrp"][0], "--key", certs["rrp"][1], "--ca", certs["ca"]])
        _wait(lambda: _listening(self.lab, self.rrp_ns, RRP_PORT), 20, "routeproxy-rrp listening", rrp)
        lrp = self._twistd("lrp", self.lrp_ns, "routeproxy-lrp", [
            "--pptp-listen", f"{self.left.ip_b}:{PPTP_PORT}", "--rrp", f"{self.middle.ip_b}:{RRP_PORT}",
            "--rrp-name", RRP_NAME, "--cert", certs["lrp"][0], "--key", certs["lrp"][1], "--ca", certs["ca"],
            "--allow", "10.81.0.0/24"])
        _wait(lambda: _listening(self.lab, self.lrp_ns, PPTP_PORT), 20, "routeproxy-lrp listening", lrp)
        _wait(lambda: _listening(self.lab, self.lrp_ns, RRP_PORT, state="established"), 20,
              "routeproxy-lrp connected to the RRP", lrp)
        return self

    def open_direct(self, count, concurrency=256):
        """*count* calls from the RRP's namespace straight to the PAC: the instruments' own
        set-up rate, without the proxies (closed again at once)."""
        def make_socket():
            with self.lab.inside(self.rrp_ns):
                return pptpctl.tcp_socket()

        got = pptpctl.open_sessions(self.loop, make_socket, (self.right.ip_b, PPTP_PORT), count,
                                    concurrency=concurrency, first_call_id=40000)
        got.close()
        return got

    def open_sessions(self, count, concurrency=64):
        """Open *count* more PPTP calls through the LRP; returns the pptpctl.Sessions."""
        def make_socket():
            with self.lab.inside(self.client):
                return pptpctl.tcp_socket()

        first = sum(len(s.calls) + len(s.failures) for s in self.sessions)
        got = pptpctl.open_sessions(self.loop, make_socket, (self.left.ip_b, PPTP_PORT), count,
                                    concurrency=concurrency, first_call_id=first)
        self.sessions.append(got)
        return got

    @property
    def keys(self):
        return [k for s in self.sessions for k in s.keys]

    def path(self, keys=None):
        """Client -> server: GRE to the LRP keyed with the LRP-owned IDs."""
        keys = keys or self.keys
        return measure.Path("proxy", [(self.client, self.left.ip_b, keys, self.link)], self.server)

    def paths(self):
        """{"c2s", "s2c", "both"}: server -> client is GRE to the RRP keyed with the IDs the
        PAC received in the Outgoing-Call-Requests (the RRP-owned IDs)."""
        from benchmarks.kernel import directions
        peers = self.pac.peer_ids(len(self.keys))
        s2c = measure.Path("proxy", [(self.server, self.right.ip_a, peers,
                                      measure.link_from(self.lab, self.right, "b"))], self.client)
        return directions("proxy", self.path(), s2c)

    def usage(self):
        """{daemon: (cpu seconds, rss KiB)} now."""
        return {name: (d.cpu_seconds(), d.rss_kib()) for name, d in self.daemons.items()}

    def close(self):
        for s in self.sessions:
            s.close()
        self.loop.close()


def trial_with_cpu(proxy, path, size, rate, duration):
    """A trial plus each daemon's CPU microseconds per delivered packet."""
    before = proxy.usage()
    got = measure.run_trial(proxy.lab, path, size, rate, duration)
    after = proxy.usage()
    got["cpu_us_per_packet"] = {
        name: ((after[name][0] - before[name][0]) * 1e6 / got["received"]) if got["received"] else None
        for name in after}
    got["cpu_percent"] = {name: (after[name][0] - before[name][0]) * 100 / got["duration"] for name in after}
    got["rss_kib"] = {name: after[name][1] for name in after}
    return got


def measure_throughput(proxy, settings, log=print):
    """Max loss-free rate per size, latency at fractions of it, CPU per packet at that rate."""
    from benchmarks.kernel import measure_path
    path = proxy.path()
    result = measure_path(proxy.lab, proxy.paths(), settings, log=log)
    for size, entry in result["sizes"].items():
        best = entry.get("max")
        rate = best["delivered_pps"] if best else 0
        entry["cpu"] = trial_with_cpu(proxy, path, int(size), rate, settings.duration)
        cpu = entry["cpu"]["cpu_us_per_packet"]
        log(f"  proxy {size}B @ {rate:.0f} pps: CPU us/packet " +
            ", ".join(f"{k} {v:.1f}" if v is not None else f"{k} -" for k, v in cpu.items()))
    return result


def measure_scale(proxy, counts, settings, log=print):
    """Sessions on one TLS link: set-up rate, RSS per session, throughput as sessions grow."""
    base = proxy.usage()
    rows = []
    opened = sum(len(s.calls) for s in proxy.sessions)
    for count in counts:
        want = count - opened
        if want > 0:
            got = proxy.open_sessions(want, concurrency=min(256, want))
            rate = len(got.calls) / got.setup_seconds if got.setup_seconds else 0.0
            opened += len(got.calls)
            failures = len(got.failures)
            examples = sorted(set(got.failures))[:3]
        else:
            rate, failures, examples = None, 0, []
        time.sleep(0.5)
        now = proxy.usage()
        row = {"sessions": opened, "target": count, "setup_per_second": rate, "failures": failures,
               "failure_examples": examples,
               "rss_kib": {k: v[1] for k, v in now.items()},
               "rss_kib_per_session": {k: (now[k][1] - base[k][1]) / opened if opened else None for k in now}}
        if opened and settings.scale_traffic:
            row["traffic"] = measure.run_trial(proxy.lab, proxy.path(), 512, 0, settings.duration)
        rows.append(row)
        log(f"  scale {opened} sessions: set-up {rate or 0:.0f}/s, failures {failures}, RSS/session " +
            ", ".join(f"{k} {v:.2f} KiB" for k, v in row["rss_kib_per_session"].items() if v is not None) +
            (f", e.g. {examples[0]}" if examples else "") +
            (f", 512B flat out {row['traffic']['delivered_pps']:.0f} pps loss {row['traffic']['loss']:.2%}"
             if "traffic" in row else ""))
        if failures and not len(proxy.sessions[-1].calls):
            row["error"] = proxy.sessions[-1].failures[:3]
            break
    return rows


def measure_direct_setup(proxy, count, log=print):
    """The synthetic peers' own set-up rate (no proxy), to show they are not the limit."""
    got = proxy.open_direct(count)
    rate = len(got.calls) / got.setup_seconds if got.setup_seconds else 0.0
    log(f"  instruments alone: {len(got.calls)} set-ups straight to the PAC at {rate:.0f}/s")
    return {"sessions": len(got.calls), "setup_per_second": rate, "failures": len(got.failures)}


PARTS = ("throughput", "scale")


def run(settings, log=print, parts=PARTS):
    """Throughput and scale through the proxies; {"skipped": reason} until the daemons exist."""
    reason = daemons_missing()
    if reason:
        log(f"proxy: skipped: {reason}")
        return {"skipped": reason}
    from tests.support import netns
    netns.skip_unless_available()
    netns.reap_stale()
    raise_fd_limit()
    results = {}
    for part in parts:
        lab = netns.NetnsLab()
        proxy = ProxyPath(lab)
        started = time.monotonic()
        try:
            proxy.start()
            if part == "throughput":
                got = proxy.open_sessions(settings.sessions)
                if not got.calls:
                    raise TopologyError(f"no call through the proxies: {got.failures[:3]}")
                results[part] = measure_throughput(proxy, settings, log)
                results[part]["sessions"] = len(got.calls)
            else:
                results[part] = {"direct": measure_direct_setup(proxy, min(1000, max(settings.scale_counts)), log),
                                 "rows": measure_scale(proxy, settings.scale_counts, settings, log)}
        except (TopologyError, measure.MeasureError, OSError) as e:
            results[part] = {"error": str(e)}
            log(f"proxy {part}: FAILED: {e}")
            for daemon in proxy.daemons.values():
                log(daemon.tail(1500))
        finally:
            proxy.close()
            lab.cleanup()
            shutil.rmtree(proxy.workdir, ignore_errors=True)
        results[part]["seconds"] = time.monotonic() - started
    return results
