"""The proxy path: client ns -> LRP ns -> (TLS) -> RRP ns -> server ns.

::

    client 10.81.0.2 ── 10.81.0.1 LRP 10.82.0.1 ══ TLS ══ 10.82.0.2 RRP 10.83.0.1 ── 10.83.0.2 server

The daemons are started the way a user starts them (``twistd -n routeproxy-lrp|rrp`` with
the options of issue 4, lab certificates; tests/support/daemons.py).  The server namespace
runs the scripted PAC (tests/support/pptppeers.py, control only) for the control connections
and the benchmark sink for GRE.  The client side opens M control connections with one call each
(SCCRQ, OCRQ; the Call ID in the OCRP is the LRP-owned ID, the GRE key to send with) and
then sends GRE to the LRP.

Besides throughput and latency (the same search as the kernel paths), this module reads each
daemon's CPU time (``/proc/PID/stat`` utime+stime) around a trial, for CPU per packet, and
its RSS (``/proc/PID/status``) as the session count grows, for RSS per session and the
session set-up rate.

``shards=N`` starts N LRPs and N RRPs (``--shard I/N``, docs/multiworker.md): the LRPs share
the PPTP port (SO_REUSEPORT) and LRP shard *i* dials RRP shard *i* on port 4443+*i* (the
pairing is fixed here so a run does not depend on how the kernel hashes two links; in a
deployment any RRP shard may take any LRP's link).  Counters and CPU are summed per role
(``lrp``, ``rrp``) besides each shard's own (``lrp0``, ``rrp1``, ...).  ``pin`` runs the
daemons under ``taskset`` (see :func:`parse_pin`).
"""
import asyncio
import os
import re
import resource
import shutil
import tempfile
import time

from benchmarks import measure
from routeproxy.shard import shard_index
from tests.support import daemons, netns, pptppeers
from tests.support.wait import HarnessError

RRP_NAME = "rrp.bench.test"
LRP_NAME = "lrp.bench.test"
RRP_PORT = 4443
PPTP_PORT = 1723
STATUS_PORT = 9723  # each daemon's --status on 127.0.0.1 of its own namespace: the drop counters


class TopologyError(Exception):
    """The proxy path could not be built (no call got through the proxies)."""


def parse_pin(text):
    """``"daemons=1,instruments=0"`` -> {"daemons": "1", "instruments": "0"}: CPU lists for
    taskset.  Keys: ``instruments`` (this process and the generators, sinks and PAC it starts),
    ``daemons``, ``lrp``, ``rrp``, ``shardI`` (LRP and RRP of shard I), ``lrpI``, ``rrpI``; a
    daemon takes its most specific key.  A CPU list may hold commas: ``daemons=0,1,instruments=0``."""
    pins, key = {}, None
    for part in (text or "").split(","):
        part = part.strip()
        if "=" in part:
            key, _, part = part.partition("=")
            key = key.strip()
            if not re.fullmatch(r"instruments|daemons|lrp|rrp|(shard|lrp|rrp)\d+", key):
                raise ValueError(f"--pin: unknown key {key!r}")
            pins[key] = part.strip()
        elif part and key is not None:
            pins[key] += "," + part
        elif part:
            raise ValueError(f"--pin {text!r}: expected KEY=CPUS[,KEY=CPUS...]")
    for key, cpus in pins.items():
        if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", cpus):
            raise ValueError(f"--pin {key}={cpus!r}: not a CPU list")
    return pins


def cpu_set(cpus):
    """A taskset CPU list ("0,2-3") as a set of ints."""
    out = set()
    for item in cpus.split(","):
        low, _, high = item.partition("-")
        out.update(range(int(low), int(high or low) + 1))
    return out


def pin_instruments(pins):
    """Move this process (and so every instrument it starts from now on) to the instruments' CPUs."""
    if pins.get("instruments"):
        os.sched_setaffinity(0, cpu_set(pins["instruments"]))


def daemon_cpus(pins, role, index):
    """The CPU list of daemon *role* (lrp/rrp) of shard *index*, or None (no --pin)."""
    for key in (f"{role}{index}", f"shard{index}", role, "daemons"):
        if key in pins:
            return pins[key]
    return f"0-{os.cpu_count() - 1}" if pins else None   # off the instruments' CPUs' limit


def add_shard_arguments(parser):
    """--shards and --pin, for python -m benchmarks and benchmarks.fixedrate."""
    parser.add_argument("--shards", type=int, default=1,
                        help="run N LRPs and N RRPs (--shard I/N; docs/multiworker.md) [default: 1]")
    parser.add_argument("--pin", type=_pin_argument, default={}, metavar="KEY=CPUS,...",
                        help="taskset CPU lists: instruments=0,daemons=1 or shard0=0,shard1=1 "
                             "(keys: instruments, daemons, lrp, rrp, shardI, lrpI, rrpI)")


def _pin_argument(text):
    import argparse
    try:
        return parse_pin(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class PinnedDaemon(daemons.Daemon):
    """A daemon started under ``taskset -c CPUS`` (taskset execs twistd: the same process)."""

    cpus = None

    @property
    def argv(self):
        argv = super().argv
        return ["taskset", "-c", self.cpus, *argv] if self.cpus else argv


def by_role(values):
    """{"lrp0": (a, b), "lrp1": (c, d), ...} plus {"lrp": (a+c, b+d), ...} when sharded."""
    out = dict(values)
    for role in ("lrp", "rrp"):
        shards = [v for k, v in values.items() if k.startswith(role) and k[len(role):].isdigit()]
        if shards:
            out[role] = tuple(map(sum, zip(*shards)))
    return out


def tear_down(path, lab):
    """Stop what a path started (daemons, peers), its namespaces and its work directory."""
    path.close()
    lab.cleanup()
    shutil.rmtree(path.workdir, ignore_errors=True)


def raise_fd_limit(want=65536):
    """Raise RLIMIT_NOFILE (inherited by the daemons) for the session-scale runs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else max(soft, min(want, hard))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target) if os.geteuid() == 0 else hard))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def four_namespaces(lab, left_label, right_label):
    """client - LEFT - RIGHT - server joined by three veth pairs (the addresses in the module
    docstring): (client, left, right, server, left veth, middle veth, right veth)."""
    client, left_ns, right_ns, server = (lab.namespace(label) for label in
                                         ("client", left_label, right_label, "server"))
    left = lab.veth(client, left_ns, "10.81.0.2/24", "10.81.0.1/24")
    middle = lab.veth(left_ns, right_ns, "10.82.0.1/24", "10.82.0.2/24")
    right = lab.veth(right_ns, server, "10.83.0.1/24", "10.83.0.2/24")
    return client, left_ns, right_ns, server, left, middle, right


class ProxyPath:
    """The four namespaces, the certificates, the two daemons and the synthetic PAC."""

    def __init__(self, lab, workdir=None, options=(), shards=1, pin=None, lrp_options=()):
        self.lab = lab
        self.options = list(options)  # extra options for both daemons
        self.lrp_options = list(lrp_options)  # and for the LRPs only (e.g. --gre-capture native)
        self.shards = shards
        self.pin = dict(pin or {})
        self.selected = None          # a key set balanced over the shards (balance())
        self.workdir = workdir or tempfile.mkdtemp(prefix="rp-bench-")
        self.daemons = {}
        self.loop = asyncio.new_event_loop()
        self.sessions = []
        self.pac = None
        (self.client, self.lrp_ns, self.rrp_ns, self.server,
         self.left, self.middle, self.right) = four_namespaces(lab, "lrp", "rrp")
        self.link = measure.link_from(lab, self.left)

    def _daemon(self, role, index, ns, plugin, options):
        name = role if self.shards == 1 else f"{role}{index}"
        daemon = PinnedDaemon(self.lab, ns, self.workdir, name, plugin, options)
        daemon.cpus = daemon_cpus(self.pin, role, index)
        daemon.status_port = STATUS_PORT + index   # one namespace per role: ports by shard
        self.daemons[name] = daemon.start()
        return daemon

    def start(self):
        """The scripted PAC, the RRPs, the LRPs; returns once every TLS link is up."""
        self.pac = pptppeers.ServerProcess(self.lab, self.server, self.right.ip_b, self.workdir, PPTP_PORT,
                                           name="pac", gre=False)
        c = daemons.make_certs(self.workdir, RRP_NAME, [LRP_NAME])
        for i in range(self.shards):
            shard = ["--shard", f"{i}/{self.shards}"] if self.shards > 1 else []
            self._daemon("rrp", i, self.rrp_ns, "routeproxy-rrp", [
                "--listen", f"{self.middle.ip_b}:{RRP_PORT + i}", "--pptp-server", f"{self.right.ip_b}:{PPTP_PORT}",
                "--cert", c["rrp_cert"], "--key", c["rrp_key"], "--ca", c["ca"],
                "--status", f"127.0.0.1:{STATUS_PORT + i}", *shard, *self.options]
            ).wait_ready(listen=(self.middle.ip_b, RRP_PORT + i), status_port=STATUS_PORT + i, timeout=20)
        for i in range(self.shards):
            shard = ["--shard", f"{i}/{self.shards}"] if self.shards > 1 else []
            self._daemon("lrp", i, self.lrp_ns, "routeproxy-lrp", [
                "--pptp-listen", f"{self.left.ip_b}:{PPTP_PORT}", "--rrp", f"{self.middle.ip_b}:{RRP_PORT + i}",
                "--rrp-name", RRP_NAME, "--cert", c["lrp_cert"], "--key", c["lrp_key"], "--ca", c["ca"],
                "--allow", "10.81.0.0/24", "--status", f"127.0.0.1:{STATUS_PORT + i}",
                # every session comes from one address here: the per-address limits would bind
                "--max-per-address", "1000000", "--id-share", "1", *shard, *self.options,
                *self.lrp_options]
            ).wait_ready(listen=(self.left.ip_b, PPTP_PORT), link_port=RRP_PORT + i,
                         status_port=STATUS_PORT + i, timeout=20)
        return self

    def shard_of(self, key):
        """The LRP shard that owns GRE key *key* (routeproxy.shard's ranges)."""
        return shard_index(key, self.shards)

    def balance(self, per_shard, log=print, tries=4):
        """Open more sessions until every LRP shard holds *per_shard* of them (the kernel spreads
        the control connections by hash), then measure with *per_shard* keys of each."""
        if self.shards == 1:
            return
        for _ in range(tries):
            spread = [[k for k in self._all_keys if self.shard_of(k) == i] for i in range(self.shards)]
            if min(map(len, spread)) >= per_shard:
                break
            self.open_sessions(per_shard * self.shards)
        spread = [[k for k in self._all_keys if self.shard_of(k) == i] for i in range(self.shards)]
        log(f"  calls per LRP shard: {[len(keys) for keys in spread]}; measured with "
            f"{[min(per_shard, len(keys)) for keys in spread]}")
        self.selected = [k for keys in spread for k in keys[:per_shard]]

    def open_direct(self, count, concurrency=256):
        """*count* calls from the RRP's namespace straight to the PAC: the instruments' own
        set-up rate, without the proxies (closed again at once)."""
        make_socket = lambda: pptppeers.tcp_socket(lambda: self.lab.inside(self.rrp_ns))  # noqa: E731
        got = pptppeers.open_sessions(self.loop, make_socket, (self.right.ip_b, PPTP_PORT), count,
                                      concurrency=concurrency, first_call_id=40000)
        got.close()
        return got

    def open_sessions(self, count, concurrency=64):
        """Open *count* more PPTP calls through the LRP; returns the pptppeers.Sessions."""
        make_socket = lambda: pptppeers.tcp_socket(lambda: self.lab.inside(self.client))  # noqa: E731
        first = sum(len(s.calls) + len(s.failures) for s in self.sessions)
        got = pptppeers.open_sessions(self.loop, make_socket, (self.left.ip_b, PPTP_PORT), count,
                                      concurrency=concurrency, first_call_id=first)
        self.sessions.append(got)
        return got

    @property
    def _all_keys(self):
        return [k for s in self.sessions for k in s.keys]

    @property
    def keys(self):
        return self.selected if self.selected is not None else self._all_keys

    def path(self, keys=None):
        """Client -> server: GRE to the LRP keyed with the LRP-owned IDs."""
        keys = keys or self.keys
        return measure.Path("proxy", [(self.client, self.left.ip_b, keys, self.link)], self.server)

    def paths(self):
        """{"c2s", "s2c", "both"}: server -> client is GRE to the RRP keyed with the IDs the
        PAC received in the Outgoing-Call-Requests (the RRP-owned IDs)."""
        from benchmarks.kernel import directions
        peers = self.pac.peer_ids(len(self._all_keys))
        if self.selected is not None:  # as many per shard as client -> server uses (balance())
            # LRP shard i dials RRP shard i, whose IDs (the PAC's peers) are in range i.
            per = [sum(1 for k in self.selected if self.shard_of(k) == i) for i in range(self.shards)]
            peers = [p for i in range(self.shards) for p in [p for p in peers if self.shard_of(p) == i][:per[i]]]
        s2c = measure.Path("proxy", [(self.server, self.right.ip_a, peers,
                                      measure.link_from(self.lab, self.right, "b"))], self.client)
        return directions("proxy", self.path(), s2c)

    def affinity(self):
        """"lrp0 CPUs 0, ..., instruments CPUs 0-1": where each process may run, read back from
        the kernel (/proc/PID/status), so a --pin that did not take shows."""
        cpus = {}
        for name, daemon in self.daemons.items():
            with open(f"/proc/{daemon.pid}/status") as f:
                cpus[name] = next(line.split()[1] for line in f if line.startswith("Cpus_allowed_list"))
        cpus["instruments"] = ",".join(map(str, sorted(os.sched_getaffinity(0))))
        return ", ".join(f"{name} CPUs {value}" for name, value in cpus.items())

    def usage(self):
        """{daemon: (cpu seconds, rss KiB)} now (and per role, summed over shards)."""
        return by_role({name: (d.cpu_seconds(), d.rss_kib()) for name, d in self.daemons.items()})

    def drops(self):
        """{"lrp port sojourn": n, "rrp mux watermark": n, ...}: every drop counter of both daemons."""
        counters = {}
        for name, daemon in self.daemons.items():
            snap = daemon.status()
            for reason, n in (snap.get("gre_port") or {}).get("dropped", {}).items():
                counters[f"{name} port {reason}"] = n
            for link in snap.get("links") or []:
                for reason, n in (link.get("gre_dropped") or {}).items():
                    counters[f"{name} mux {reason}"] = counters.get(f"{name} mux {reason}", 0) + n
            for reason, n in (snap.get("drops") or {}).items():
                counters[f"{name} {reason}"] = n
        return counters

    def close(self):
        for s in self.sessions:
            s.close()
        self.loop.close()


def trial_with_cpu(proxy, path, size, rate, duration):
    """A trial plus each daemon's CPU microseconds per delivered packet (and the daemons' drops
    by reason during it, where they have counters)."""
    counters = getattr(proxy, "drops", None)
    dropped = counters() if counters else {}
    before = proxy.usage()
    got = measure.run_trial(proxy.lab, path, size, rate, duration)
    after = proxy.usage()
    if counters:
        got["daemon_drops"] = {k: v - dropped.get(k, 0) for k, v in counters().items() if v - dropped.get(k, 0)}
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
        log(f"  {path.label} {size}B @ {rate:.0f} pps: CPU us/packet " +
            ", ".join(f"{k} {v:.1f}" if v is not None else f"{k} -" for k, v in cpu.items()) +
            f"; daemon drops {entry['cpu'].get('daemon_drops', '-')}")
        if hasattr(proxy, "drops"):  # where an overload is dropped: one flat-out trial
            flat = entry["overload"] = trial_with_cpu(proxy, path, int(size), 0, settings.duration)
            log(f"  {path.label} {size}B flat out: offered {flat['offered_pps']:.0f} delivered "
                f"{flat['delivered_pps']:.0f} pps, tail {flat['tail_seconds']:.2f} s, "
                f"daemon drops {flat.get('daemon_drops')}")
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
    reason = daemons.daemons_missing()
    if reason:
        log(f"proxy: skipped: {reason}")
        return {"skipped": reason}
    netns.skip_unless_available()
    netns.reap_stale()
    raise_fd_limit()
    results = {}
    for part in parts:
        lab = netns.NetnsLab()
        proxy = ProxyPath(lab, options=settings.proxy_options, shards=getattr(settings, "shards", 1),
                          pin=getattr(settings, "pin", None))
        started = time.monotonic()
        try:
            proxy.start()
            if part == "throughput":
                got = proxy.open_sessions(settings.sessions)
                if not got.calls:
                    raise TopologyError(f"no call through the proxies: {got.failures[:3]}")
                proxy.balance(max(1, settings.sessions // proxy.shards), log)
                log(f"  {proxy.shards} shard(s): {proxy.affinity()}")
                results[part] = measure_throughput(proxy, settings, log)
                results[part]["sessions"] = len(got.calls)
            else:
                results[part] = {"direct": measure_direct_setup(proxy, min(1000, max(settings.scale_counts)), log),
                                 "rows": measure_scale(proxy, settings.scale_counts, settings, log)}
        except (TopologyError, HarnessError, measure.MeasureError, OSError) as e:
            results[part] = {"error": str(e)}
            log(f"proxy {part}: FAILED: {e}")
            for daemon in proxy.daemons.values():
                log(daemon.describe()[-1500:])
        finally:
            tear_down(proxy, lab)
        results[part]["seconds"] = time.monotonic() - started
    return results
