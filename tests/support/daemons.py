"""The twistd daemons under test, started as a user starts them, in a network namespace.

One launcher for the system tests and the benchmarks: ``twistd -n --pidfile= --logfile=LOG
routeproxy-lrp|rrp OPTIONS`` inside a namespace of a :class:`tests.support.netns.NetnsLab`,
with what a test needs around it (wait until it listens or logs a line, read /status.json,
stop it once, its log for a failure message) and what a benchmark needs (the real pid, CPU
time and RSS from /proc).  Processes die with the test process (PR_SET_PDEATHSIG), so a
killed run leaves no daemon behind.
"""
import contextlib
import ctypes
import json
import functools
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

from tests.support.netns import stop_process
from tests.support.wait import HarnessError, wait_until

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
# Another interpreter for the daemons (e.g. Debian's PGO-built /usr/bin/python3.11: the same
# ABI, so this venv's packages load in it); twistd runs as a module call, not a script.
DAEMON_PYTHON = os.environ.get("ROUTEPROXY_DAEMON_PYTHON")
TWISTD_MAIN = ["-c", "from twisted.scripts.twistd import run; run()"]
PR_SET_PDEATHSIG = 1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# Another checkout whose daemons to run (a baseline: the same tests against older code).
DAEMON_REPO = os.environ.get("ROUTEPROXY_DAEMON_REPO") or REPO


@functools.lru_cache(maxsize=None)
def _foreign(python):
    """True when *python* cannot load this interpreter's packages (another implementation or
    version, e.g. PyPy: it brings its own, in its own venv)."""
    try:
        tag = subprocess.run([python, "-c", "import sys; print(sys.implementation.cache_tag)"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return True
    return tag != sys.implementation.cache_tag


def child_env(**more):
    """The environment for a child Python (a daemon, a peer, a load generator): this
    checkout (or ``ROUTEPROXY_DAEMON_REPO``) and this interpreter's path first, output
    unbuffered so logs are current.  Under ``ROUTEPROXY_DAEMON_PYTHON`` not our standard
    library, and not our packages either when that Python cannot load them (children run
    with our own interpreter find them through its venv anyway)."""
    own = (sys.base_prefix, sys.prefix) if DAEMON_PYTHON and _foreign(DAEMON_PYTHON) else (
        (sys.base_prefix,) if DAEMON_PYTHON else ())
    path = [DAEMON_REPO] + [p for p in sys.path if p and not (own and p.startswith(own))]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1", **more)


def die_with_parent():
    """In the child before exec: get SIGTERM when the test process dies, so nothing lingers."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def tail(path, limit=6000):
    """The end of a log file (all of it with *limit* None), or why it cannot be read."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError as e:
        return f"({path}: {e})"
    return text if limit is None or len(text) <= limit else "...\n" + text[-limit:]


def listening(lab, ns, address, port):
    """True when a TCP socket listens on address:port (or the wildcard) inside *ns*."""
    out = lab.run(ns, ["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
    return any(f"{address}:{port}" in line or f"0.0.0.0:{port}" in line or f"*:{port}" in line
               for line in out.splitlines())


def established_to(lab, ns, port):
    """True when a TCP connection to remote *port* is established inside *ns*."""
    out = lab.run(ns, ["ss", "-Htn", "state", "established", f"dport = :{port}"], check=False).stdout
    return bool(out.strip())


def daemons_missing():
    """Why the daemons cannot be started (a sentence), or None."""
    import importlib
    for module in ("routeproxy.lrp", "routeproxy.rrp", "routeproxy.lrp_tap", "routeproxy.rrp_tap"):
        try:
            importlib.import_module(module)
        except Exception as e:  # ImportError, or a half-written module's SyntaxError/NameError
            return f"{module} is not importable yet: {type(e).__name__}: {e}"
    if not os.path.exists(TWISTD):
        return f"{TWISTD} is not installed"
    return None


def make_certs(workdir, rrp_name, lrp_names):
    """A private CA, the RRP's and the LRPs' certificates under *workdir*/certs.

    Returns routeproxy.certs.write_lab_certs' paths (``ca``, ``rrp_cert``, ``rrp_key``,
    ``lrp_cert:NAME``, ``lrp_key:NAME``, and ``lrp_cert``/``lrp_key`` for the first LRP).
    """
    from routeproxy.certs import write_lab_certs
    return write_lab_certs(os.path.join(workdir, "certs"), rrp_name, list(lrp_names))


class Daemon:
    """One ``twistd -n`` daemon in namespace *ns* of *lab*, logging to *workdir*/NAME.log.

    ``start()`` may be called again after ``stop()`` (a restart); the log grows on.
    """

    def __init__(self, lab, ns, workdir, name, plugin, options):
        self.lab, self.ns, self.workdir, self.name = lab, ns, workdir, name
        self.plugin, self.options = plugin, list(options)
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.out_path = os.path.join(workdir, f"{name}.out")
        self.proc = None
        self.status_port = None
        self._pid = None

    @property
    def argv(self):
        twistd = [DAEMON_PYTHON, *TWISTD_MAIN] if DAEMON_PYTHON else [TWISTD]
        return [*twistd, "-n", "--pidfile=", f"--logfile={self.log_path}", self.plugin, *self.options]

    def start(self):
        self._pid = None
        self.proc = self.lab.spawn(self.ns, self.argv, logfile=self.out_path, cwd=self.workdir,
                                   env=child_env(), preexec_fn=die_with_parent)
        return self

    def stop(self, sig=signal.SIGTERM, timeout=5.0):
        stop_process(self.proc, timeout, sig)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def exits_within(self, timeout):
        """True if the process has exited, or does within *timeout* seconds."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    # -- readiness -----------------------------------------------------------------------------

    def _wait(self, predicate, timeout, what):
        try:
            wait_until(predicate, timeout, f"{self.name}: {what}", alive=self.alive)
        except HarnessError as e:
            raise HarnessError(f"{e}\n{self.describe()}") from None

    def wait_ready(self, listen=None, link_port=None, status_port=None, timeout=15):
        """Until it listens on *listen* (address, port), has a TCP connection to *link_port*
        (the LRP's TLS link) and serves --status on 127.0.0.1:*status_port*, as given;
        HarnessError with its log if it exits or is not ready in time."""
        if listen:
            self._wait(lambda: listening(self.lab, self.ns, *listen), timeout, f"listening on {listen}")
        if link_port:
            self._wait(lambda: established_to(self.lab, self.ns, link_port), timeout,
                       f"connected to port {link_port}")
        if status_port:
            self._wait(lambda: listening(self.lab, self.ns, "127.0.0.1", status_port), timeout,
                       "status endpoint")
        return self

    # -- the log -------------------------------------------------------------------------------

    def log(self):
        """The whole log file (describe() shows only its end)."""
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def mark(self):
        """A position in the log: later waits look only at lines written after it."""
        return len(self.log())

    def lines(self, pattern, since=0):
        """Log lines after *since* that match the regular expression *pattern*."""
        return [line for line in self.log()[since:].splitlines() if re.search(pattern, line)]

    def wait_line(self, pattern, since=0, timeout=5.0):
        """The first line after *since* matching *pattern*; HarnessError (with the log) if none."""
        try:
            return wait_until(lambda: (self.lines(pattern, since) or [None])[0], timeout,
                              f"{self.name} to log /{pattern}/")
        except HarnessError as e:
            raise HarnessError(f"{e}\n{self.describe(since)}") from None

    def describe(self, since=0):
        """Command line, exit status and the ends of log and stdout: for a failure message."""
        rc = self.proc.poll() if self.proc else None
        text = self.log()[since:]
        return (f"--- {self.name} in {self.ns} (rc={rc}) ---\n$ {' '.join(self.argv)}\n{text[-6000:]}\n"
                f"{tail(self.out_path, 2000)}\n")

    def status(self, port=None, timeout=5.0):
        """GET /status.json from the --status endpoint on 127.0.0.1:*port* (default: status_port)."""
        with self.lab.inside(self.ns):
            url = f"http://127.0.0.1:{port or self.status_port}/status.json"
            with urllib.request.urlopen(url, timeout=timeout) as reply:
                return json.loads(reply.read())

    # -- resources (benchmarks) ----------------------------------------------------------------

    @property
    def pid(self):
        """The twistd process itself (``ip netns exec`` may have forked it)."""
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
            raise HarnessError(f"{self.name}: no twistd process under pid {self.proc.pid}")
        return self._pid

    def cpu_seconds(self):
        """utime + stime of the daemon so far, in seconds."""
        return cpu_seconds(self.pid)

    def rss_kib(self):
        """Resident set size in KiB (VmRSS)."""
        return rss_kib(self.pid)


def cpu_seconds(pid):
    """utime + stime of process *pid* so far, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kib(pid):
    """Resident set size of process *pid* in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


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


def stop_all(daemons, grace=3.0):
    """One SIGTERM to each daemon at once, then SIGKILL whichever is still there after *grace* s."""
    running = [d for d in daemons if d.alive()]
    for daemon in running:
        daemon.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for daemon in running:
        if not daemon.exits_within(max(0.0, deadline - time.monotonic())):
            daemon.proc.kill()
            daemon.proc.wait()
