"""routeproxy.daemon.DaemonService over a tap's real service tree (memory reactor unless
stated): reload applies a changed file and refuses a broken one, settings that need a
restart say so, start-up failures become one line; the status endpoint on a unix socket
(real reactor, real socket) is mode 0600 and serves /metrics that prometheus_client parses;
a non-loopback TCP status address is warned about.
"""
import os
import socket
import stat
import tempfile

from twisted.application.service import MultiService
from twisted.internet import error, task, threads
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from routeproxy import lrp_tap
from routeproxy.daemon import DaemonService, StartupError, describeFailure
from routeproxy.service import addStatusEndpoint
from tests.support.options import LRP_REQUIRED, parse
from tests.unit.test_status import metric, parse_metrics


class Logged:
    def watchLog(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def logged(self, word):
        return [formatEvent(e) for e in self.events if word in formatEvent(e)]


class ReloadTests(Logged, unittest.SynchronousTestCase):
    def setUp(self):
        self.watchLog()
        self.ini = os.path.join(tempfile.mkdtemp(prefix="routeproxy-reload-"), "lrp.ini")
        self.write("allow = 10.0.0.0/8\n")
        options = parse(lrp_tap.Options, LRP_REQUIRED + ["--config", self.ini, "--pptp-listen", "127.0.0.1:11723"])
        self.top = lrp_tap.makeService(options, reactor=MemoryReactorClock())
        self.top.handleSignals = False
        self.top.running = True      # started as far as reload cares; nothing listens

    def write(self, body):
        with open(self.ini, "w") as f:
            f.write("[lrp]\n" + body)

    def test_changed_file_applies(self):
        self.write("allow = 10.1.0.0/16\nprofile = lab\ngre-interface = eth9\n")
        self.assertTrue(self.top.reload())
        [line] = self.logged("reloaded")
        self.assertIn("--allow now 10.1.0.0/16 (0 session(s) ended)", line)
        self.assertIn("--profile default -> lab (new sessions)", line)
        self.assertIn("--gre-interface changed: takes effect at the next restart", line)
        self.assertEqual(self.top.lrp.profile, "lab")
        self.assertEqual(self.top.options["gre-interface"], "eth9")
        self.assertEqual(self.top.snapshot()["reloads"], 1)

    def test_unchanged_file(self):
        self.assertTrue(self.top.reload())
        self.assertEqual(len(self.logged("nothing changed")), 1)

    def test_broken_file_keeps_the_running_configuration(self):
        self.write("allow = not-a-network\n")
        self.assertFalse(self.top.reload())
        [line] = self.logged("reload refused")
        self.assertIn("--allow 'not-a-network'", line)
        self.assertEqual([str(n) for n in self.top.lrp.allow], ["10.0.0.0/8"])
        self.assertEqual(self.top.snapshot()["reload_failures"], 1)

    def test_more_reloaders_plug_in(self):
        """Another component (a CRL) adds its own reloader and is told old and new options."""
        seen = []
        self.top.reloaders.append(lambda old, new: seen.append((old["config"], new["config"])) or ["CRL reread"])
        self.top.reload()
        self.assertEqual(seen, [(self.ini, self.ini)])
        self.assertIn("CRL reread", self.logged("reloaded")[0])


class StartupFailureTests(unittest.SynchronousTestCase):
    def test_failure_names_the_option(self):
        class Broken(MultiService):
            optionName = "--pptp-listen"

            def privilegedStartService(self):
                raise error.CannotListenError("0.0.0.0", 1723, OSError(98, "Address already in use"))

        top = DaemonService("LRP", None, None, MemoryReactorClock(), handleSignals=False)
        Broken().setServiceParent(top)
        e = self.assertRaises(StartupError, top.privilegedStartService)
        self.assertEqual(str(e), "--pptp-listen 0.0.0.0:1723: cannot listen (Address already in use); "
                                 "another process holds it: stop it or choose another port")
        denied = describeFailure(Broken(), error.CannotListenError("", 1723, OSError(13, "Permission denied")))
        self.assertIn("CAP_NET_BIND_SERVICE", denied)


class StatusEndpointTests(Logged, unittest.TestCase):
    def test_unix_socket_mode_0600_serves_metrics(self):
        from twisted.internet import reactor
        path = os.path.join(tempfile.mkdtemp(prefix="routeproxy-status-"), "status.sock")
        options = parse(lrp_tap.Options, LRP_REQUIRED + ["--pptp-listen", "127.0.0.1:11723"])
        top = lrp_tap.makeService(options, reactor=MemoryReactorClock())
        parent = MultiService()
        addStatusEndpoint(parent, reactor, ("unix", path), top)
        parent.privilegedStartService()
        parent.startService()
        self.addCleanup(parent.stopService)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

        def fetch():
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
                s.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            return data.split(b"\r\n\r\n", 1)[1].decode()

        def check(text):
            samples = parse_metrics(text)
            self.assertEqual(metric(samples, "routeproxy_info", role="lrp"), 1)
            self.assertIn(("routeproxy_certificate_expiry_seconds", frozenset()), samples)
            self.assertGreater(metric(samples, "process_open_fds"), 0)

        return threads.deferToThread(fetch).addCallback(check)

    def test_non_loopback_tcp_is_warned_about(self):
        self.watchLog()
        addStatusEndpoint(MultiService(), MemoryReactorClock(), ("0.0.0.0", 9723), None)
        self.assertEqual(len(self.logged("is not loopback")), 1)
        addStatusEndpoint(MultiService(), MemoryReactorClock(), ("127.0.0.1", 9723), None)
        self.assertEqual(len(self.logged("is not loopback")), 1)


class LinkFailureTests(Logged, unittest.TestCase):
    def test_failed_link_connection_says_why_in_one_line(self):
        """A refused TCP connection to the RRP (real reactor, a closed loopback port): the
        reason reaches the LRP's line and counter, and ClientService's own retry line is gone."""
        from twisted.internet import defer, reactor
        from twisted.internet.protocol import Factory

        from routeproxy import tls
        from routeproxy.lrp import LocalRouteProxy
        from routeproxy.testing import RecordingGREPort
        from tests.support.options import LRP_TLS

        self.watchLog()
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        lrp = LocalRouteProxy(reactor, RecordingGREPort)
        d = defer.Deferred()

        def failed(address, why):
            lrp.linkFailed(address, why)
            if not d.called:
                d.callback(None)

        creator = tls.clientCreator("rrp.test", *LRP_TLS[1::2])
        service = tls.rrpClientService(reactor, "127.0.0.1", port, creator, Factory.forProtocol(lambda: None),
                                       onFailure=failed)
        service.startService()
        self.addCleanup(service.stopService)

        def check(_):
            [line] = self.logged("cannot connect the link")
            self.assertIn(f"RRP 127.0.0.1:{port}: ", line)
            self.assertIn("refused", line)
            self.assertEqual(lrp.snapshot()["link_connect_failures"], 1)
            self.assertEqual(self.logged("Scheduling retry"), [])

        d.addCallback(lambda _: task.deferLater(reactor, 0.1, lambda: None))   # ClientService logs after us
        return d.addCallback(check)
