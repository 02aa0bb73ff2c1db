"""The daemons run as a service would run them (issue 12's acceptance).

Both daemons start under ``setpriv`` as the unprivileged user nobody (uid/gid 65534, no
groups) with no capability but CAP_NET_RAW and CAP_NET_BIND_SERVICE (bounding, inheritable
and ambient sets): what etc/systemd/*.service grants.  The test checks /proc/PID/status: the
uid, and CapEff exactly those two.  This venv's interpreter may live where nobody cannot
read it (pyenv under /root, mode 0700); the daemons then run on the system's interpreter of
the same version with this checkout and this venv's packages on PYTHONPATH, which nobody
can read.  Where even that is not possible (a checkout nobody cannot read), uid 0 with
SECBIT_NOROOT and only those capabilities stands in, and the test says so in its log.
In one namespace on ``lo`` (tests/support/netns.py):

    server   127.0.0.20:1723   scripted pptpd (tests/support/pptppeers.py)
    rrp      127.0.0.10:4443   --source 127.0.0.11
    lrp      127.0.0.30:1723   --config lrp.ini (allow = 127.0.1.0/24), clients bind 127.0.N.M

A third daemon, lrp2 (127.0.0.31), is started as root and drops to nobody itself
(``twistd --uid 65534 --gid 65534``); it carries a session and, stopped, gives its client and
the server a PPTP teardown.  One session is carried (a call placed), SIGHUP with a changed allow-list keeps it and lets
the new rule apply (a client the new list admits connects, one it drops is refused, and a
live session whose permission went is ended with a PPTP teardown), SIGHUP with a broken file
is refused with one line; then stopping the RRP gives both peers a PPTP teardown (the client
Call-Disconnect-Notify + Stop-Control-Connection-Request through the LRP, the server
Call-Clear-Request + Stop-Control-Connection-Request), and both daemons exit 0.
"""
import os
import re
import signal
import subprocess
import sys
import tempfile

from twisted.logger import Logger
from twisted.trial import unittest

from routeproxy import pptp
from tests.support import daemons, netns, pptppeers
from tests.support.daemons import TWISTD_MAIN, Daemon
from tests.support.pptppeers import PPTPClient
from tests.support.wait import wait_until

SERVER = ("127.0.0.20", 1723)
RRP, RRP_SOURCE = ("127.0.0.10", 4443), "127.0.0.11"
LRP = ("127.0.0.30", 1723)
LRP2 = ("127.0.0.31", 1723)
RRP_NAME = "rrp.service.test"
# twistd ends by re-raising the signal that stopped it (systemd counts SIGTERM as clean).
STOPPED = (0, -signal.SIGTERM)
CAPS = "-all,+net_raw,+net_bind_service"
CAP_NET_BIND_SERVICE, CAP_NET_RAW = 10, 13
SETPRIV = ["setpriv", "--inh-caps", CAPS, "--ambient-caps", CAPS, "--bounding-set", CAPS,
           "--securebits", "+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked"]
NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             "--inh-caps", CAPS, "--ambient-caps", CAPS, "--bounding-set", CAPS]
# twistd on an interpreter nobody can run: the system's Python of this version.
SYSTEM_PYTHON = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"


def _nobodyCanRun():
    """None if nobody can start the daemons' Python here, else why not (probed once)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"no {SYSTEM_PYTHON}"
    probe = subprocess.run(AS_NOBODY + [SYSTEM_PYTHON, "-c", "import routeproxy.lrp_tap, pcap"],
                           capture_output=True, text=True, env=daemons.child_env(), cwd="/",
                           timeout=60)
    if probe.returncode != 0:
        return f"nobody cannot import the daemons: {(probe.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


NOBODY_CANNOT_RUN = _nobodyCanRun()


def hostport(address):
    return f"{address[0]}:{address[1]}"


class ConfinedDaemon(Daemon):
    """A daemon started under setpriv as nobody with only the service's capabilities (or, where
    nobody cannot run the interpreter, as uid 0 with SECBIT_NOROOT: see the module)."""

    @property
    def argv(self):
        if NOBODY_CANNOT_RUN:
            return SETPRIV + super().argv
        return AS_NOBODY + [SYSTEM_PYTHON, *TWISTD_MAIN] + super().argv[1:]

    def status(self, field):
        with open(f"/proc/{self.pid}/status") as f:
            return re.search(rf"^{field}:\s*(\S+)", f.read(), re.M).group(1)

    def capabilities(self):
        return int(self.status("CapEff"), 16)


class DroppedDaemon(Daemon):
    """A daemon started as root that drops to nobody itself (``twistd --uid --gid``): the
    capture, raw sockets and port 1723 open before, in privilegedStartService."""

    @property
    def argv(self):
        argv = super().argv
        return argv[:3] + ["--uid", "65534", "--gid", "65534"] + argv[3:]


class ServiceTests(unittest.TestCase):
    log = Logger()

    def setUp(self):
        why = daemons.daemons_missing()
        if why:
            raise unittest.SkipTest(why)
        self.lab = netns.lab_for(self)
        self.ns = self.lab.namespace("service")
        self.workdir = tempfile.mkdtemp(prefix="routeproxy-service-")
        c = daemons.make_certs(self.workdir, RRP_NAME, ["lrp1"])
        if not NOBODY_CANNOT_RUN:   # nobody writes its logs here and reads its keys
            os.chmod(self.workdir, 0o755)
            os.chown(self.workdir, NOBODY, NOBODY)
            os.chmod(os.path.dirname(c["ca"]), 0o755)
            for name in ("lrp_key", "rrp_key"):
                os.chown(c[name], NOBODY, NOBODY)
        listener = pptppeers.listen(*SERVER, opener=self.inside, backlog=16)
        self.server = pptppeers.ScriptedServer(*SERVER, first_call_id=100).start(listener)
        self.addCleanup(self.server.stop)
        self.ini = os.path.join(self.workdir, "lrp.ini")
        self.writeINI("allow = 127.0.1.0/24\n")
        self.rrp = ConfinedDaemon(self.lab, self.ns, self.workdir, "rrp", "routeproxy-rrp", [
            "--listen", hostport(RRP), "--pptp-server", hostport(SERVER), "--source", RRP_SOURCE,
            "--cert", c["rrp_cert"], "--key", c["rrp_key"], "--ca", c["ca"], "--gre-interface", "lo"])
        self.lrp = ConfinedDaemon(self.lab, self.ns, self.workdir, "lrp", "routeproxy-lrp", [
            "--config", self.ini, "--pptp-listen", hostport(LRP), "--rrp", hostport(RRP),
            "--rrp-name", RRP_NAME, "--cert", c["lrp_cert"], "--key", c["lrp_key"], "--ca", c["ca"],
            "--gre-interface", "lo"])
        self.lrp2 = DroppedDaemon(self.lab, self.ns, self.workdir, "lrp2", "routeproxy-lrp", [
            "--pptp-listen", hostport(LRP2), "--rrp", hostport(RRP), "--rrp-name", RRP_NAME,
            "--cert", c["lrp_cert"], "--key", c["lrp_key"], "--ca", c["ca"], "--gre-interface", "lo"])
        for name in ("lrp_key", "rrp_key"):   # the key is read before the drop, the log opened
            os.chmod(c[name], 0o600)
        self.addCleanup(daemons.stop_all, [self.lrp, self.lrp2, self.rrp])
        self.rrp.start().wait_ready(listen=RRP)
        self.lrp.start().wait_ready(listen=LRP)
        self.lrp2.start().wait_ready(listen=LRP2)
        self.lrp.wait_line(r"LRP: link to the RRP .* is up", timeout=15)
        self.lrp2.wait_line(r"LRP: link to the RRP .* is up", timeout=15)

    def inside(self):
        return self.lab.inside(self.ns)

    def writeINI(self, body):
        with open(self.ini, "w") as f:
            f.write("[lrp]\n" + body)

    def client(self, bind, name, lrp=LRP):
        return PPTPClient(lrp, bind=bind, name=name, opener=self.inside, timeout=5.0)

    def refused(self, bind):
        """True if the LRP closes a client from *bind* without a word (not in --allow)."""
        client = self.client(bind, f"refused-{bind}")
        try:
            return client.wait_closed(5.0) and not client.inbox
        finally:
            client.close()

    def hangUp(self, daemon, pattern):
        mark = daemon.mark()
        os.kill(daemon.pid, signal.SIGHUP)
        return daemon.wait_line(pattern, since=mark, timeout=10)

    def test_confined_reload_and_graceful_stop(self):
        for daemon in (self.lrp, self.rrp):
            self.assertEqual(daemon.capabilities(), (1 << CAP_NET_RAW) | (1 << CAP_NET_BIND_SERVICE))
            if NOBODY_CANNOT_RUN:
                self.log.warn("test_service: uid 0 without capabilities stands in for nobody: "
                              "{why}", why=NOBODY_CANNOT_RUN)
            else:
                self.assertEqual(daemon.status("Uid").split()[:1], [str(NOBODY)])
        self.assertTrue(self.lrp.lines(r"routeproxy \S+ \(Twisted .*\) starting as the LRP"))

        # One session carried: a call placed through both proxies.
        a = self.client("127.0.1.1", "alice")
        self.addCleanup(a.close)
        a.start()
        reply = a.call()
        self.assertEqual(reply.result_code, pptp.OutgoingCallResult.CONNECTED)
        server_a = self.server.connection_named("alice")
        b = self.client("127.0.1.2", "bob")        # loses its permission at the reload
        self.addCleanup(b.close)
        b.start()
        self.assertTrue(self.refused("127.0.3.1"))
        self.lrp.wait_line(r"LRP call opened: client 127\.0\.1\.1:\d+, .*C=1 S=100 L=\d+")
        self.rrp.wait_line(r"RRP call opened: client 127\.0\.1\.1:\d+ via lrp1, server .*C=1 S=100 R=\d+")

        # SIGHUP with a changed allow-list: alice lives, bob is ended in PPTP, the new rule applies.
        self.writeINI("allow = 127.0.1.1/32, 127.0.3.0/24\n")
        line = self.hangUp(self.lrp, r"reloaded .*lrp\.ini")
        self.assertIn("1 session(s) ended", line)
        b.expect(pptp.StopControlConnectionRequest)
        self.assertTrue(b.wait_closed())
        c = self.client("127.0.3.1", "carol")
        self.addCleanup(c.close)
        c.start()
        self.assertTrue(self.refused("127.0.1.3"))
        a.echo()

        # A broken file is refused with one line; the running configuration stays.
        self.writeINI("allow = 127.0.1.1/32, 127.0.3.0/24\nnot a key\n")
        line = self.hangUp(self.lrp, r"reload refused")
        self.assertIn("line 3", line)
        a.echo()
        self.assertTrue(self.refused("127.0.1.4"))

        # An LRP that dropped to nobody (twistd --uid) carries a session; stopping it gives
        # its client and (through the RRP) the server a PPTP teardown.
        with open(f"/proc/{self.lrp2.pid}/status") as f:
            self.assertRegex(f.read(), r"Uid:\s+65534\s")
        d = self.client("127.0.1.9", "dave", lrp=LRP2)
        self.addCleanup(d.close)
        d.start()
        d_reply = d.call()
        server_d = self.server.connection_named("dave")
        self.lrp2.proc.send_signal(signal.SIGTERM)
        self.assertEqual(d.expect(pptp.CallDisconnectNotify).call_id, d_reply.call_id)
        d.expect(pptp.StopControlConnectionRequest)
        self.assertTrue(d.wait_closed())
        wait_until(lambda: [type(m).__name__ for m in server_d.received][-2:] ==
                   ["CallClearRequest", "StopControlConnectionRequest"], 5,
                   "the server to get Call-Clear-Request and Stop-Control-Connection-Request")
        self.assertTrue(self.lrp2.exits_within(10))
        self.assertIn(self.lrp2.proc.returncode, STOPPED)

        # Stop the RRP: GOAWAY, and each peer hears its PPTP teardown.
        mark = self.lrp.mark()
        self.rrp.proc.send_signal(signal.SIGTERM)
        a.strict = False
        notify = a.expect(pptp.CallDisconnectNotify)
        self.assertEqual(notify.call_id, reply.call_id)
        a.expect(pptp.StopControlConnectionRequest)
        self.assertTrue(a.wait_closed())
        wait_until(lambda: any(isinstance(m, pptp.StopControlConnectionRequest) for m in server_a.received),
                   5, "the server to get Stop-Control-Connection-Request")
        cleared = [m for m in server_a.received if isinstance(m, pptp.CallClearRequest)]
        self.assertEqual([m.call_id for m in cleared],
                         [call.peer_call_id for call in self.server.calls_seen
                          if call.connection == server_a.number])   # the R pptpd knows
        self.assertTrue(self.rrp.exits_within(10))
        self.assertIn(self.rrp.proc.returncode, STOPPED)
        self.lrp.wait_line(r"peer sent GOAWAY NO_ERROR", since=mark)

        self.lrp.proc.send_signal(signal.SIGTERM)
        self.assertTrue(self.lrp.exits_within(10))
        self.assertIn(self.lrp.proc.returncode, STOPPED)
        self.assertNotIn("Traceback", self.lrp.log() + self.lrp2.log() + self.rrp.log())


class CaptureLostTests(unittest.TestCase):
    """Deleting the capture interface (one end of a veth) under a running LRP: one log line, and /metrics (read
    with prometheus_client's parser) says routeproxy_capture_up 0."""

    def test_interface_deleted(self):
        import urllib.request

        from tests.unit.test_status import metric, parse_metrics

        why = daemons.daemons_missing()
        if why:
            raise unittest.SkipTest(why)
        lab = netns.lab_for(self)
        ns = lab.namespace("capture")
        link = lab.veth(ns, lab.namespace("far"), "10.77.0.1/24", "10.77.0.2/24")
        workdir = tempfile.mkdtemp(prefix="routeproxy-capture-")
        c = daemons.make_certs(workdir, RRP_NAME, ["lrp1"])
        lrp = Daemon(lab, ns, workdir, "lrp", "routeproxy-lrp", [
            "--pptp-listen", "10.77.0.1:1723", "--rrp", "127.0.0.1:9", "--rrp-name", RRP_NAME,
            "--cert", c["lrp_cert"], "--key", c["lrp_key"], "--ca", c["ca"],
            "--gre-interface", link.name_a, "--status", "127.0.0.1:8193"])
        self.addCleanup(daemons.stop_all, [lrp])
        lrp.start().wait_ready(listen=("10.77.0.1", 1723), status_port=8193)

        def capture_up():
            with lab.inside(ns):
                with urllib.request.urlopen("http://127.0.0.1:8193/metrics", timeout=5) as reply:
                    return metric(parse_metrics(reply.read().decode()), "routeproxy_capture_up")

        self.assertEqual(capture_up(), 1)
        lab.run(ns, ["ip", "link", "del", link.name_a])
        lrp.wait_line(rf"GRE capture on {link.name_a} failed: .*routeproxy_capture_up is 0", timeout=10)
        self.assertEqual(capture_up(), 0)
        self.assertTrue(lrp.alive())
