"""The end-to-end topology of issue 4 on the host kernel, and launchers for what runs in it.

::

    clients ──10.1.j.0/24── lrp_j ──10.2.j.0/24── nat ──10.3.0.0/24── rrp ──10.4.k.0/24── server_k
    (one address per       (LRP j)               MASQUERADE out       (RRP)              (synthetic
     synthetic client)                           to the RRP, GRE                          pptpd)
                                                 dropped in FORWARD

Client i talks to LRP ``i % n_lrps``.  The LRPs reach the RRP only through the NAT (their one
route to 10.3.0.0/24 goes via the NAT; the RRP has no route back to 10.2/10.1), and the RRP
reaches the servers on its own links.  With ``routed=True`` (the baseline) the LRP and RRP
namespaces forward and every namespace routes end to end, so clients can dial a server
directly through the NAT, which is what fails without the proxies.

Everything runs as root in namespaces from tests/support/netns.py; 10.x addresses exist only there.
The daemons are started as a user starts them: ``twistd -n ... routeproxy-lrp|rrp OPTIONS``.
"""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from tests.support import netns

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWISTD = os.path.join(sys.prefix, "bin", "twistd")
RRP_PORT = 4443
PPTP_PORT = 1723
RRP_NAME = "rrp.e2e.test"


class E2EError(Exception):
    """The harness could not set something up (a daemon died, a port never opened)."""


def _env():
    path = [REPO] + [p for p in sys.path if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1")


def _tail(path, limit=6000):
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError as e:
        return f"({path}: {e})"
    return text if limit is None or len(text) <= limit else "...\n" + text[-limit:]


def iptables(lab, ns, *args):
    """Run iptables in *ns*, with whichever of iptables / -legacy / -nft works on this kernel."""
    problems = []
    for binary in ("iptables", "iptables-legacy", "iptables-nft"):
        if shutil.which(binary) is None:
            continue
        done = lab.run(ns, [binary, *args], check=False)
        if done.returncode == 0:
            return binary
        problems.append(f"{binary}: {done.stderr.strip()}")
    raise E2EError(f"iptables {' '.join(args)} in {ns}: " + "; ".join(problems or ["no iptables installed"]))


class Side:
    """One namespace and its addresses (``address``: the one peers dial)."""

    def __init__(self, ns, address, **more):
        self.ns = ns
        self.address = address
        self.__dict__.update(more)

    def __repr__(self):
        return f"<{self.ns} {self.address}>"


class Topology:
    """The namespaces and addresses of one end-to-end test, and what has been started in them."""

    def __init__(self, lab, workdir, owns_lab):
        self.lab = lab
        self.workdir = workdir
        self._owns_lab = owns_lab
        self.clients_ns = None
        self.client_addresses = []   # one per synthetic client
        self.client_lrp = []         # index into self.lrps for each client
        self.lrps = []               # Side(ns, address=client-facing, uplink=towards the NAT)
        self.nat = None              # Side(ns, address=outside towards the RRP)
        self.rrp = None              # Side(ns, address=TLS listener address)
        self.servers = []            # Side(ns, address=pptpd address)
        self.handles = []            # ServerHandle / DaemonHandle, for logs
        self.certs = None

    def clients_of(self, lrp_index):
        """The client indexes that belong to LRP *lrp_index*."""
        return [i for i, j in enumerate(self.client_lrp) if j == lrp_index]

    def logs(self):
        """All daemon and server logs, for a failure message."""
        return "\n".join(h.describe() for h in self.handles)

    @contextlib.contextmanager
    def logs_on_failure(self):
        """Append every log to an assertion that fails in the block (print them for other errors)."""
        try:
            yield self
        except AssertionError as e:
            raise type(e)(f"{e}\n\n===== logs =====\n{self.logs()}") from None
        except Exception:
            sys.stderr.write(f"\n===== logs =====\n{self.logs()}\n")
            raise

    def cleanup(self):
        for handle in self.handles:
            handle.stop()
        problems = self.lab.cleanup() if self._owns_lab else []
        shutil.rmtree(self.workdir, ignore_errors=True)
        return problems


def build(n_clients, n_servers=1, n_lrps=1, routed=False, lab=None, workdir=None, drop_gre=True):
    """Namespaces, links, addresses, routes and NAT rules; returns a Topology.

    ``drop_gre=False`` leaves out the NAT's GRE drop rule (to show MASQUERADE alone breaks PPTP).
    Pass *lab* (``netns.lab_for(testcase)``) to tie cleanup to a test; otherwise a lab is made
    here and ``Topology.cleanup()`` removes it.  Needs root (netns.skip_unless_available()).
    """
    if not 1 <= n_lrps <= 200 or not 1 <= n_servers <= 200 or not 1 <= n_clients <= 200:
        raise ValueError("between 1 and 200 clients, LRPs and servers")
    owns_lab = lab is None
    if owns_lab:
        netns.skip_unless_available()
        netns.reap_stale()
        lab = netns.NetnsLab()
    topo = Topology(lab, workdir or tempfile.mkdtemp(prefix="routeproxy-e2e-"), owns_lab)
    try:
        _build(topo, lab, n_clients, n_servers, n_lrps, routed, drop_gre)
    except Exception:
        topo.cleanup()
        raise
    return topo


def _build(topo, lab, n_clients, n_servers, n_lrps, routed, drop_gre):
    topo.clients_ns = lab.namespace("clients")
    nat_ns = lab.namespace("nat")
    rrp_ns = lab.namespace("rrp")
    addresses = {}
    client_links = {}
    for j in range(n_lrps):
        lrp_ns = lab.namespace(f"lrp{j}")
        facing = lab.veth(lrp_ns, topo.clients_ns, f"10.1.{j}.1/24", f"10.1.{j}.254/24")
        client_links[j] = facing.name_b
        lab.veth(lrp_ns, nat_ns, f"10.2.{j}.2/24", f"10.2.{j}.1/24")
        lab.route(lrp_ns, "10.3.0.0/24", "via", f"10.2.{j}.1")
        topo.lrps.append(Side(lrp_ns, f"10.1.{j}.1", uplink=f"10.2.{j}.2", subnet=f"10.1.{j}.0/24"))
        addresses[j] = []
    for i in range(n_clients):
        j = i % n_lrps
        address = f"10.1.{j}.{11 + len(addresses[j])}"
        addresses[j].append(address)
        lab.address(topo.clients_ns, client_links[j], f"{address}/24")
        topo.client_addresses.append(address)
        topo.client_lrp.append(j)

    outside = lab.veth(nat_ns, rrp_ns, "10.3.0.1/24", "10.3.0.2/24")
    lab.sysctl(nat_ns, "net.ipv4.ip_forward", 1)
    iptables(lab, nat_ns, "-t", "nat", "-A", "POSTROUTING", "-o", outside.name_a, "-j", "MASQUERADE")
    if drop_gre:
        iptables(lab, nat_ns, "-A", "FORWARD", "-p", "gre", "-j", "DROP")
    topo.nat = Side(nat_ns, "10.3.0.1", outside_if=outside.name_a)
    topo.rrp = Side(rrp_ns, "10.3.0.2")

    for k in range(n_servers):
        server_ns = lab.namespace(f"server{k}")
        lab.veth(rrp_ns, server_ns, f"10.4.{k}.1/24", f"10.4.{k}.2/24")
        topo.servers.append(Side(server_ns, f"10.4.{k}.2", gateway=f"10.4.{k}.1"))

    if routed:
        for j, side in enumerate(topo.lrps):
            lab.sysctl(side.ns, "net.ipv4.ip_forward", 1)
            lab.route(side.ns, "10.4.0.0/16", "via", f"10.2.{j}.1")
            lab.route(nat_ns, side.subnet, "via", side.uplink)
        lab.route(topo.clients_ns, "10.4.0.0/16", "via", "10.1.0.1")
        lab.route(nat_ns, "10.4.0.0/16", "via", "10.3.0.2")
        lab.sysctl(rrp_ns, "net.ipv4.ip_forward", 1)
        for side in topo.servers:
            lab.route(side.ns, "10.3.0.0/24", "via", side.gateway)


# --------------------------------------------------------------------------------------------
# waiting for things


def terminate(proc, grace=5):
    """SIGTERM, then SIGKILL if *proc* is still there after *grace* seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until(predicate, timeout, what, alive=None):
    """Poll *predicate* every 50 ms; E2EError naming *what* on timeout or when *alive*() is false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if alive is not None and not alive():
            raise E2EError(f"{what}: the process exited")
        time.sleep(0.05)
    raise E2EError(f"{what}: not within {timeout} s")


def listening(lab, ns, address, port):
    """True when a TCP socket listens on address:port (or the wildcard) inside *ns*."""
    out = lab.run(ns, ["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
    return any(f"{address}:{port}" in line or f"0.0.0.0:{port}" in line or f"*:{port}" in line
               for line in out.splitlines())


def established_to(lab, ns, port):
    """True when a TCP connection to remote *port* is established inside *ns*."""
    out = lab.run(ns, ["ss", "-Htn", "state", "established", f"dport = :{port}"], check=False).stdout
    return bool(out.strip())


# --------------------------------------------------------------------------------------------
# the synthetic server


class ServerHandle:
    """A running synthetic server: its status file, log and process."""

    def __init__(self, topo, side, proc, status_path, log_path, name):
        self.topo, self.side, self.proc = topo, side, proc
        self.status_path, self.log_path, self.name = status_path, log_path, name
        self.address = side.address
        self.final = None

    def _read_status(self):
        try:
            with open(self.status_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def status(self, timeout=5.0):
        """A fresh status (asks the server with SIGUSR1 and waits for the file to change)."""
        if self.proc.poll() is not None:
            return self.final or self._read_status()
        before = (self._read_status() or {}).get("generation", 0)
        os.kill(self.proc.pid, signal.SIGUSR1)
        fresh = {}
        wait_until(lambda: fresh.update(self._read_status() or {}) or fresh.get("generation", 0) > before,
                   timeout, f"status of {self.name}", alive=lambda: self.proc.poll() is None)
        return fresh

    def stop(self):
        """SIGTERM; returns the final status."""
        terminate(self.proc)
        if self.final is None:
            self.final = self._read_status()
        return self.final

    def describe(self):
        status = self.final
        if status is None:
            with contextlib.suppress(Exception):
                status = self.status(timeout=2)
        status = status or self._read_status()
        return (f"--- {self.name} (synthetic server {self.address}, rc={self.proc.poll()}) ---\n"
                f"{_tail(self.log_path)}\nstatus: {json.dumps(status)}\n")


def concurrent_collisions(status):
    """Pairs of calls a server had open at the same time with the same peer address and peer call ID.

    The RRP must make these impossible: it is what "the server sees distinct call IDs" means
    for calls that overlap (IDs of calls that have ended may come back).
    """
    calls = status["calls_seen"]
    clashes = []
    for n, a in enumerate(calls):
        for b in calls[n + 1:]:
            if (a["peer"], a["peer_call_id"]) != (b["peer"], b["peer_call_id"]):
                continue
            a_end = a["closed"] if a["closed"] is not None else float("inf")
            b_end = b["closed"] if b["closed"] is not None else float("inf")
            if a["opened"] < b_end and b["opened"] < a_end:
                clashes.append((a, b))
    return clashes


def start_server(topo, index=0, first_call_id=1, port=PPTP_PORT, side=None, name=None, mirror=False):
    """Start the synthetic PPTP server in server namespace *index*; returns once it listens.

    *side* (a Side: namespace and address) puts it elsewhere, e.g. on the RRP's own host.
    *mirror* makes it answer with the peer's own call ID (``--mirror-call-ids``).
    """
    side = side or topo.servers[index]
    name = name or f"server{index}"
    status_path = os.path.join(topo.workdir, f"{name}.status.json")
    log_path = os.path.join(topo.workdir, f"{name}.log")
    with open(log_path, "w") as log:
        proc = topo.lab.spawn(side.ns, [sys.executable, "-m", "tests.support.synthetic_pptp", "server",
                                        "--listen", f"{side.address}:{port}", "--status", status_path,
                                        "--first-call-id", str(first_call_id)]
                                       + (["--mirror-call-ids"] if mirror else []),
                              stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=_env())
    handle = ServerHandle(topo, side, proc, status_path, log_path, name)
    topo.handles.append(handle)
    wait_until(lambda: os.path.exists(status_path), 10, f"{name} start", alive=lambda: proc.poll() is None)
    return handle


# --------------------------------------------------------------------------------------------
# clients


def start_clients(topo, targets, call_id=1, packets=10, calls=1, rounds=1, timeout=5.0,
                  indexes=None, hold=0.0, extra=()):
    """Start synthetic clients at once (one per address); ``.wait()`` on the result gives reports.

    *targets* is "HOST[:PORT]" for all, or a function client index -> "HOST[:PORT]".
    *indexes* selects clients (default: all).  *hold* keeps each client's calls up that many
    seconds after its echoes, so that the clients' calls overlap.
    """
    indexes = range(len(topo.client_addresses)) if indexes is None else indexes
    running = []
    for i in indexes:
        target = targets(i) if callable(targets) else targets
        argv = [sys.executable, "-m", "tests.support.synthetic_pptp", "client", "--server", target,
                "--bind", topo.client_addresses[i], "--name", f"client{i}@{topo.client_addresses[i]}",
                "--call-id", str(call_id), "--packets", str(packets), "--calls", str(calls),
                "--rounds", str(rounds), "--timeout", str(timeout), "--hold", str(hold), *extra]
        proc = topo.lab.spawn(topo.clients_ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=REPO, env=_env(), text=True)
        running.append((i, target, proc))
    return RunningClients(topo, running)


class RunningClients:
    """Client processes started by start_clients."""

    def __init__(self, topo, running):
        self.topo = topo
        self.running = running

    def wait(self, timeout=60):
        """Each client's JSON report, in start order; one that printed none gets ``ok`` false."""
        reports = []
        deadline = time.monotonic() + timeout
        for i, target, proc in self.running:
            try:
                out, err = proc.communicate(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                err = f"killed after {timeout} s\n{err}"
            report = None
            for line in reversed(out.splitlines()):
                with contextlib.suppress(ValueError):
                    report = json.loads(line)
                    break
            if report is None:
                report = {"client": f"client{i}", "bind": self.topo.client_addresses[i], "ok": False,
                          "echoed": 0, "foreign": 0, "missing": None, "errors": [f"no report: {err.strip()}"]}
            report["index"] = i
            report["target"] = target
            report["rc"] = proc.returncode
            report["stderr"] = err.strip()[-2000:]
            reports.append(report)
        return reports


def run_clients(topo, targets, wait=60, **options):
    """start_clients(...).wait(): run the clients to the end and return their reports."""
    return start_clients(topo, targets, **options).wait(wait)


def summarize(reports):
    """One line per client, for failure messages."""
    return "\n".join(
        f"client{r['index']} {r.get('bind')} -> {r.get('target')}: ok={r.get('ok')} rc={r.get('rc')} "
        f"sent={r.get('sent')} echoed={r.get('echoed')} foreign={r.get('foreign')} "
        f"missing={r.get('missing')} server_ids={r.get('server_ids')} errors={r.get('errors')}"
        + (f" stderr={r['stderr']!r}" if r.get("stderr") else "")
        for r in reports)


def baseline(topo, server, **client_options):
    """The clients dial *server* straight through the NAT (needs ``build(..., routed=True)``)."""
    return run_clients(topo, f"{server.address}:{PPTP_PORT}", **client_options)


# --------------------------------------------------------------------------------------------
# the daemons


class DaemonHandle:
    """A twistd daemon in a namespace: process, log file, command line."""

    def __init__(self, name, ns, proc, log_path, out_path, argv):
        self.name, self.ns, self.proc = name, ns, proc
        self.log_path, self.out_path, self.argv = log_path, out_path, argv

    def alive(self):
        return self.proc.poll() is None

    def log(self):
        """The whole log file (describe() shows only its end)."""
        return _tail(self.log_path, limit=None)

    def stop(self):
        terminate(self.proc)

    def describe(self):
        return (f"--- {self.name} in {self.ns} (rc={self.proc.poll()}) ---\n$ {' '.join(self.argv)}\n"
                f"{_tail(self.log_path)}\n{_tail(self.out_path, 2000)}\n")


def make_certs(topo, lrp_names):
    """`python -m routeproxy certs` into the work directory; returns {"ca", "rrp", "lrp:NAME"} paths."""
    out = os.path.join(topo.workdir, "certs")
    argv = [sys.executable, "-m", "routeproxy", "certs", "--out", out, "--rrp-name", RRP_NAME]
    for name in lrp_names:
        argv += ["--lrp-name", name]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=_env())
    if done.returncode != 0:
        raise E2EError(f"{' '.join(argv)}: rc={done.returncode} {done.stderr.strip()}")
    certs = {"ca": os.path.join(out, "ca.crt"),
             "rrp": (os.path.join(out, "rrp.crt"), os.path.join(out, "rrp.key"))}
    for i, name in enumerate(lrp_names):
        stem = "lrp" if i == 0 else f"lrp-{name}"
        certs[f"lrp:{name}"] = (os.path.join(out, f"{stem}.crt"), os.path.join(out, f"{stem}.key"))
    for key, value in certs.items():
        for path in (value,) if isinstance(value, str) else value:
            if not os.path.exists(path):
                raise E2EError(f"certs: {path} ({key}) was not written:\n{done.stdout}")
    topo.certs = certs
    return certs


def _spawn_twistd(topo, name, ns, plugin, options):
    log_path = os.path.join(topo.workdir, f"{name}.log")
    out_path = os.path.join(topo.workdir, f"{name}.out")
    argv = [TWISTD, "-n", "--pidfile=", f"--logfile={log_path}", plugin, *options]
    with open(out_path, "w") as out:
        proc = topo.lab.spawn(ns, argv, stdout=out, stderr=subprocess.STDOUT, cwd=topo.workdir, env=_env())
    handle = DaemonHandle(name, ns, proc, log_path, out_path, argv)
    topo.handles.append(handle)
    return handle


def fetch_status(topo, daemon, timeout=5):
    """GET the daemon's /status.json (started with status_port) from inside its namespace."""
    import urllib.request
    url = f"http://127.0.0.1:{daemon.status_port}/status.json"
    with topo.lab.inside(daemon.ns):
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return json.loads(reply.read())


def start_rrp(topo, profiles=None, port=RRP_PORT, extra=(), status_port=None):
    """`twistd -n routeproxy-rrp` in the RRP namespace; returns once its TLS port listens.

    *profiles* maps a profile name to a server index (or an address); "default" becomes
    --pptp-server, the others --profile NAME=HOST:PORT.  Default: {"default": 0}.
    """
    profiles = {"default": 0} if profiles is None else profiles
    cert, key = topo.certs["rrp"]
    options = ["--listen", f"{topo.rrp.address}:{port}", "--cert", cert, "--key", key, "--ca", topo.certs["ca"]]
    for name, index in profiles.items():
        server = index if isinstance(index, str) else topo.servers[index].address
        if name == "default":
            options += ["--pptp-server", f"{server}:{PPTP_PORT}"]
        else:
            options += ["--profile", f"{name}={server}:{PPTP_PORT}"]
    if status_port:
        options += ["--status", f"127.0.0.1:{status_port}"]
    handle = _spawn_twistd(topo, "rrp", topo.rrp.ns, "routeproxy-rrp", options + list(extra))
    handle.address, handle.port, handle.status_port = topo.rrp.address, port, status_port
    try:
        wait_until(lambda: listening(topo.lab, topo.rrp.ns, topo.rrp.address, port), 15,
                   "routeproxy-rrp listening", alive=handle.alive)
        if status_port:
            wait_until(lambda: listening(topo.lab, topo.rrp.ns, "127.0.0.1", status_port), 15,
                       "routeproxy-rrp status endpoint", alive=handle.alive)
    except E2EError as e:
        raise E2EError(f"{e}\n{handle.describe()}") from None
    return handle


def start_lrp(topo, index=0, lrp_name=None, profile=None, rrp_port=RRP_PORT, allow=True, extra=(),
              status_port=None, wait_link=True):
    """`twistd -n routeproxy-lrp` in LRP namespace *index*; returns once it listens (and, with
    *wait_link*, once its TLS link to the RRP is established)."""
    side = topo.lrps[index]
    lrp_name = lrp_name or f"lrp{index}"
    cert, key = topo.certs[f"lrp:{lrp_name}"]
    options = ["--pptp-listen", f"{side.address}:{PPTP_PORT}", "--rrp", f"{topo.rrp.address}:{rrp_port}",
               "--rrp-name", RRP_NAME, "--cert", cert, "--key", key, "--ca", topo.certs["ca"]]
    if allow:
        options += ["--allow", side.subnet]
    if profile:
        options += ["--profile", profile]
    if status_port:
        options += ["--status", f"127.0.0.1:{status_port}"]
    handle = _spawn_twistd(topo, f"lrp{index}", side.ns, "routeproxy-lrp", options + list(extra))
    handle.address, handle.status_port = side.address, status_port
    try:
        wait_until(lambda: listening(topo.lab, side.ns, side.address, PPTP_PORT), 15,
                   f"routeproxy-lrp {lrp_name} listening", alive=handle.alive)
        if wait_link:
            wait_until(lambda: established_to(topo.lab, side.ns, rrp_port), 15,
                       f"routeproxy-lrp {lrp_name} connected to the RRP", alive=handle.alive)
        if status_port:
            wait_until(lambda: listening(topo.lab, side.ns, "127.0.0.1", status_port), 15,
                       f"routeproxy-lrp {lrp_name} status endpoint", alive=handle.alive)
    except E2EError as e:
        raise E2EError(f"{e}\n{handle.describe()}") from None
    return handle
