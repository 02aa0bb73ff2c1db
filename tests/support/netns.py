"""Network namespaces, veth pairs and processes inside them, for tests on the real kernel.

Typical use in a trial test::

    from tests.support import netns

    def test_something(self):
        lab = netns.lab_for(self)            # skips unless root + `ip netns`; cleaned up by addCleanup
        a, b = lab.namespace("a"), lab.namespace("b")
        link = lab.veth(a, b, "10.0.0.1/24", "10.0.0.2/24")
        lab.run(b, ["ping", "-c1", "10.0.0.1"])
        server = lab.spawn(a, ["some-server", ...], logfile=self.mktemp())  # killed at cleanup
        lab.wait_tcp(a, "10.0.0.1", 1723, proc=server)   # until it listens (or fails if it died)
        with lab.inside(a):                   # sockets/pcap handles opened here live in `a`
            sock = socket.socket(...)

Every name carries this process's pid, so parallel trial workers never collide, and
namespaces or links left behind by a run that was killed are removed (`reap_stale`) the
next time a lab is made.  Cleanup is best effort and never raises half-way: processes
first, then links, then namespaces.
"""
import atexit
import contextlib
import ctypes
import ipaddress
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import unittest

from tests.support.wait import HarnessError, wait_until

NS_PREFIX = "rpt"  # namespaces: rpt<pid>-<n>-<label>
LINK_PREFIX = "rv"  # veth ends:  rv<pid>x<n>a / rv<pid>x<n>b  (<= 15 characters)
CLONE_NEWNET = 0x40000000
SUBNET_POOL = ipaddress.IPv4Network("100.64.0.0/10")  # shared address space: unlikely on a test host

_availability = None


class NetnsError(Exception):
    """A command that sets up the lab failed; the message carries its stderr."""


def unavailable_reason():
    """Why namespace tests cannot run here (a sentence), or None when they can."""
    global _availability
    if _availability is None:
        _availability = _probe()
    return _availability or None


def _probe():
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, raw sockets)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"{NS_PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def skip_unless_available():
    """Raise unittest.SkipTest (trial honours it) with the reason namespaces are unusable."""
    reason = unavailable_reason()
    if reason:
        raise unittest.SkipTest(reason)


def lab_for(testcase):
    """A fresh NetnsLab whose cleanup is registered on *testcase* (skips when unavailable)."""
    skip_unless_available()
    reap_stale()
    lab = NetnsLab()
    testcase.addCleanup(lab.cleanup)
    return lab


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale():
    """Delete namespaces and root links that carry the pid of a process that no longer exists."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.match(rf"{NS_PREFIX}(\d+)-", name)
        if match and not _pid_alive(int(match.group(1))):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for match in re.finditer(rf"^\d+: ({LINK_PREFIX}(\d+)x\d+[ab])[@:]", links, re.M):
        if not _pid_alive(int(match.group(2))):
            subprocess.run(["ip", "link", "del", match.group(1)], capture_output=True)


class Veth:
    """One veth pair: each end's namespace (None = the root namespace), name and address."""

    def __init__(self, ns_a, name_a, addr_a, ns_b, name_b, addr_b):
        self.ns_a, self.name_a, self.addr_a = ns_a, name_a, addr_a
        self.ns_b, self.name_b, self.addr_b = ns_b, name_b, addr_b

    @property
    def ip_a(self):
        """End a's address without the prefix length (or None)."""
        return self.addr_a.split("/")[0] if self.addr_a else None

    @property
    def ip_b(self):
        """End b's address without the prefix length (or None)."""
        return self.addr_b.split("/")[0] if self.addr_b else None

    def __repr__(self):
        return f"<Veth {self.ns_a}:{self.name_a}={self.addr_a} <-> {self.ns_b}:{self.name_b}={self.addr_b}>"


class NetnsLab:
    """Namespaces, veth pairs and processes that one test owns, and their removal."""

    def __init__(self):
        self.pid = os.getpid()
        self._counter = itertools.count()
        self.namespaces = []
        self.root_links = []
        self.processes = []
        self._closed = False
        atexit.register(self.cleanup)

    # -- building ----------------------------------------------------------------------------

    def _ip(self, ns, *args):
        argv = ["ip"] + (["-n", ns] if ns else []) + list(args)
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise NetnsError(f"{' '.join(argv)}: {done.stderr.strip()}")
        return done.stdout

    def namespace(self, label="ns"):
        """Create a namespace with its loopback up; returns its name (unique to this process)."""
        label = re.sub(r"[^A-Za-z0-9_.-]", "_", label)[:20]
        name = f"{NS_PREFIX}{self.pid}-{next(self._counter)}-{label}"
        self._ip(None, "netns", "add", name)
        self.namespaces.append(name)
        self._ip(name, "link", "set", "lo", "up")
        return name

    def veth(self, ns_a, ns_b, addr_a=None, addr_b=None, up=True, mtu=None):
        """A veth pair with end a in *ns_a* and end b in *ns_b* (None: root namespace).

        Addresses are CIDR strings like "10.0.0.1/24" (optional).  Returns a Veth.
        """
        n = next(self._counter)
        name_a, name_b = f"{LINK_PREFIX}{self.pid}x{n}a", f"{LINK_PREFIX}{self.pid}x{n}b"
        self._ip(None, "link", "add", name_a, "type", "veth", "peer", "name", name_b)
        if ns_a is None or ns_b is None:
            self.root_links.append(name_a if ns_a is None else name_b)
        try:
            for ns, name, addr in ((ns_a, name_a, addr_a), (ns_b, name_b, addr_b)):
                if ns is not None:
                    self._ip(None, "link", "set", name, "netns", ns)
                if mtu:
                    self._ip(ns, "link", "set", name, "mtu", str(mtu))
                if addr:
                    self._ip(ns, "addr", "add", addr, "dev", name)
                if up:
                    self._ip(ns, "link", "set", name, "up")
        except NetnsError:
            if ns_a is not None and ns_b is not None:
                subprocess.run(["ip", "link", "del", name_a], capture_output=True)
            raise
        return Veth(ns_a, name_a, addr_a, ns_b, name_b, addr_b)

    def address(self, ns, ifname, cidr):
        """Add another address (CIDR) to an interface, e.g. 127.0.0.2/8 on lo."""
        self._ip(ns, "addr", "add", cidr, "dev", ifname)

    def route(self, ns, *args):
        """`ip route add ARGS` in *ns*, e.g. lab.route(ns, "default", "via", "10.0.0.1")."""
        self._ip(ns, "route", "add", *args)

    def sysctl(self, ns, key, value):
        """Set a sysctl inside *ns* (e.g. net.ipv4.ip_forward 1)."""
        self.run(ns, ["sysctl", "-q", "-w", f"{key}={value}"])

    def iptables(self, ns, *args):
        """iptables ARGS in *ns* with whichever of iptables / -legacy / -nft works on this kernel;
        returns the binary that did, NetnsError naming each one's complaint if none did."""
        problems = []
        for binary in ("iptables", "iptables-legacy", "iptables-nft"):
            if shutil.which(binary) is None:
                continue
            done = self.run(ns, [binary, *args], check=False)
            if done.returncode == 0:
                return binary
            problems.append(f"{binary}: {done.stderr.strip()}")
        raise NetnsError(f"iptables {' '.join(args)} in {ns}: " + "; ".join(problems or ["no iptables installed"]))

    def subnet(self):
        """A /24 from 100.64.0.0/10 derived from the pid, for ends in the root namespace.

        Inside namespaces any addresses are private to the test; only root-side ends can
        clash with another worker, so take those from here.
        """
        count = SUBNET_POOL.num_addresses // 256
        index = (self.pid * 37 + next(self._counter)) % count
        return ipaddress.IPv4Network((int(SUBNET_POOL.network_address) + index * 256, 24))

    # -- running -----------------------------------------------------------------------------

    @staticmethod
    def _wrap(ns, argv):
        return (["ip", "netns", "exec", ns] if ns else []) + list(argv)

    def run(self, ns, argv, check=True, timeout=30, **kwargs):
        """Run *argv* inside *ns* to completion; returns CompletedProcess (text, captured)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        done = subprocess.run(self._wrap(ns, argv), timeout=timeout, **kwargs)
        if check and done.returncode != 0:
            raise NetnsError(f"{' '.join(argv)} in {ns}: rc={done.returncode} {done.stderr!s:.2000}")
        return done

    def python(self, ns, code, *args, **kwargs):
        """Run a Python snippet (this interpreter, same sys.path) inside *ns*."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        return self.run(ns, [sys.executable, "-c", code, *map(str, args)], env=env, **kwargs)

    def spawn(self, ns, argv, logfile=None, **popen_kwargs):
        """Start a long-running process inside *ns* in its own process group; killed at cleanup.

        *logfile*: a path that receives its stdout and stderr (read it when a test fails).
        """
        popen_kwargs.setdefault("start_new_session", True)
        if logfile is not None:
            log = open(logfile, "ab")
            popen_kwargs.setdefault("stdout", log)
            popen_kwargs.setdefault("stderr", subprocess.STDOUT)
        try:
            proc = subprocess.Popen(self._wrap(ns, argv), **popen_kwargs)
        finally:
            if logfile is not None:
                log.close()  # the child has its own copy
        self.processes.append(proc)
        return proc

    def wait_tcp(self, ns, host, port, timeout=10.0, proc=None):
        """Block until something accepts TCP connections on host:port inside *ns*.

        Raises NetnsError after *timeout* seconds, or as soon as *proc* (the process
        expected to listen) has exited.
        """
        def accepts():
            with self.inside(ns):
                sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sock.settimeout(0.5)
            with sock:
                return sock.connect_ex((host, port)) == 0

        alive = (lambda: proc.poll() is None) if proc is not None else None
        try:
            wait_until(accepts, timeout, f"{host}:{port} in {ns} to accept connections", alive=alive)
        except HarnessError as e:
            raise NetnsError(f"{e} (rc={proc.returncode if proc else None})") from None

    def read_proc(self, ns, path):
        """A /proc file as seen from inside *ns* (e.g. /proc/net/snmp)."""
        return self.run(ns, ["cat", path]).stdout

    @contextlib.contextmanager
    def inside(self, ns):
        """Move this thread into *ns* for the block: sockets opened there stay in *ns*."""
        libc = ctypes.CDLL(None, use_errno=True)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise NetnsError(f"setns({ns}): {os.strerror(err)}")
            try:
                yield ns
            finally:
                if libc.setns(home, CLONE_NEWNET) != 0:  # pragma: no cover - would be fatal
                    raise NetnsError(f"cannot return from {ns}: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(target)
            os.close(home)

    # -- teardown ----------------------------------------------------------------------------

    def cleanup(self):
        """Kill the processes, delete the links and namespaces; returns a list of problems."""
        if self._closed:
            return []
        self._closed = True
        problems = []
        for proc in self.processes:
            problems += _stop(proc)
        for link in self.root_links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        for ns in reversed(self.namespaces):
            # Anything still running in the namespace (not spawned by us) is killed too.
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            done = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if done.returncode != 0:
                problems.append(f"ip netns del {ns}: {done.stderr.strip()}")
        with contextlib.suppress(Exception):
            atexit.unregister(self.cleanup)
        return problems


def _stop(proc, grace=3.0):
    """SIGTERM the process group, then SIGKILL it after *grace* seconds; close its pipes."""
    try:
        return stop_process(proc, grace)
    finally:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()


def stop_process(proc, grace=3.0, sig=signal.SIGTERM):
    """*sig* to *proc*'s process group, then SIGKILL after *grace* seconds; a list of problems.

    One signal each time, to the group (``ip netns exec`` children, shells' children) or,
    when the process is not in a group of its own, to it: twistd logs a traceback when it is
    told to stop twice.
    """
    if proc is None or proc.poll() is not None:
        return []
    for sig, wait in ((sig, grace), (signal.SIGKILL, grace)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return []
            time.sleep(0.02)
    return [f"process {proc.pid} ({proc.args!r}) did not die"]


def shared(build):
    """A function that returns one object *build()* makes on first use, for every test of a
    module (trial has no setUpClass); a failure to build is remembered and raised again.
    Skips without namespaces."""
    state = {}

    def get():
        skip_unless_available()
        if "error" in state:
            raise state["error"]
        if "value" not in state:
            try:
                state["value"] = build()
            except Exception as e:
                state["error"] = e
                raise
        return state["value"]

    return get
