"""The end-to-end topology of issue 4 on the host kernel, and what runs in it.

::

    clients ──10.1.j.0/24── lrp_j ──10.2.j.0/24── nat ──10.3.0.0/24── rrp ──10.4.k.0/24── server_k
    (one address per       (LRP j)               MASQUERADE out       (RRP)              (scripted
     echo client)                                to the RRP, GRE                          pptpd)
                                                 dropped in FORWARD

Client i talks to LRP ``i % n_lrps``.  The LRPs reach the RRP only through the NAT (their one
route to 10.3.0.0/24 goes via the NAT; the RRP has no route back to 10.2/10.1), and the RRP
reaches the servers on its own links.  With ``routed=True`` (the baseline) the LRP and RRP
namespaces forward and every namespace routes end to end, so clients can dial a server
directly through the NAT, which is what fails without the proxies.

Everything runs as root in namespaces (tests/support/netns.py); 10.x addresses exist only there.
The daemons come from tests/support/daemons.py, the peers from tests/support/pptppeers.py.
"""
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time

from tests.support import daemons, netns, pptppeers

RRP_PORT = 4443
PPTP_PORT = 1723
RRP_NAME = "rrp.e2e.test"


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
        self.handles = []            # ServerProcess / Daemon, for logs
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
    lab.iptables(nat_ns, "-t", "nat", "-A", "POSTROUTING", "-o", outside.name_a, "-j", "MASQUERADE")
    if drop_gre:
        lab.iptables(nat_ns, "-A", "FORWARD", "-p", "gre", "-j", "DROP")
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
# the scripted server


def start_server(topo, index=0, first_call_id=1, port=PPTP_PORT, side=None, name=None, mirror=False):
    """Start the scripted PPTP server in server namespace *index*; returns once it listens.

    *side* (a Side: namespace and address) puts it elsewhere, e.g. on the RRP's own host.
    *mirror* makes it answer with the peer's own call ID (``--mirror-call-ids``).
    """
    side = side or topo.servers[index]
    server = pptppeers.ServerProcess(topo.lab, side.ns, side.address, topo.workdir, port=port,
                                     name=name or f"server{index}", first_call_id=first_call_id, mirror=mirror)
    topo.handles.append(server)
    return server


# --------------------------------------------------------------------------------------------
# clients


def start_clients(topo, targets, call_id=1, packets=10, calls=1, rounds=1, timeout=5.0,
                  indexes=None, hold=0.0, extra=()):
    """Start echo clients at once (one per address); ``.wait()`` on the result gives reports.

    *targets* is "HOST[:PORT]" for all, or a function client index -> "HOST[:PORT]".
    *indexes* selects clients (default: all).  *hold* keeps each client's calls up that many
    seconds after its echoes, so that the clients' calls overlap.
    """
    indexes = range(len(topo.client_addresses)) if indexes is None else indexes
    running = []
    for i in indexes:
        target = targets(i) if callable(targets) else targets
        argv = [sys.executable, "-m", "tests.support.pptppeers", "client", "--server", target,
                "--bind", topo.client_addresses[i], "--name", f"client{i}@{topo.client_addresses[i]}",
                "--call-id", str(call_id), "--packets", str(packets), "--calls", str(calls),
                "--rounds", str(rounds), "--timeout", str(timeout), "--hold", str(hold), *extra]
        proc = topo.lab.spawn(topo.clients_ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=daemons.REPO, env=daemons.child_env(), text=True)
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


def make_certs(topo, lrp_names):
    """Lab certificates in the work directory (daemons.make_certs); kept as ``topo.certs``."""
    topo.certs = daemons.make_certs(topo.workdir, RRP_NAME, lrp_names)
    return topo.certs


def _start(topo, name, ns, plugin, options):
    daemon = daemons.Daemon(topo.lab, ns, topo.workdir, name, plugin, options).start()
    topo.handles.append(daemon)
    return daemon


def start_rrp(topo, profiles=None, port=RRP_PORT, extra=(), status_port=None):
    """`twistd -n routeproxy-rrp` in the RRP namespace; returns once its TLS port listens.

    *profiles* maps a profile name to a server index (or an address); "default" becomes
    --pptp-server, the others --profile NAME=HOST:PORT.  Default: {"default": 0}.
    """
    profiles = {"default": 0} if profiles is None else profiles
    c = topo.certs
    options = ["--listen", f"{topo.rrp.address}:{port}", "--cert", c["rrp_cert"], "--key", c["rrp_key"],
               "--ca", c["ca"]]
    for name, index in profiles.items():
        server = index if isinstance(index, str) else topo.servers[index].address
        if name == "default":
            options += ["--pptp-server", f"{server}:{PPTP_PORT}"]
        else:
            options += ["--profile", f"{name}={server}:{PPTP_PORT}"]
    if status_port:
        options += ["--status", f"127.0.0.1:{status_port}"]
    daemon = _start(topo, "rrp", topo.rrp.ns, "routeproxy-rrp", options + list(extra))
    daemon.address, daemon.port, daemon.status_port = topo.rrp.address, port, status_port
    return daemon.wait_ready(listen=(topo.rrp.address, port), status_port=status_port)


def start_lrp(topo, index=0, lrp_name=None, profile=None, rrp_port=RRP_PORT, allow=True, extra=(),
              status_port=None, wait_link=True):
    """`twistd -n routeproxy-lrp` in LRP namespace *index*; returns once it listens (and, with
    *wait_link*, once its TLS link to the RRP is established)."""
    side = topo.lrps[index]
    lrp_name = lrp_name or f"lrp{index}"
    c = topo.certs
    options = ["--pptp-listen", f"{side.address}:{PPTP_PORT}", "--rrp", f"{topo.rrp.address}:{rrp_port}",
               "--rrp-name", RRP_NAME, "--cert", c[f"lrp_cert:{lrp_name}"], "--key", c[f"lrp_key:{lrp_name}"],
               "--ca", c["ca"]]
    if allow:
        options += ["--allow", side.subnet]
    if profile:
        options += ["--profile", profile]
    if status_port:
        options += ["--status", f"127.0.0.1:{status_port}"]
    daemon = _start(topo, f"lrp{index}", side.ns, "routeproxy-lrp", options + list(extra))
    daemon.address, daemon.status_port = side.address, status_port
    return daemon.wait_ready(listen=(side.address, PPTP_PORT), link_port=rrp_port if wait_link else None,
                             status_port=status_port)
