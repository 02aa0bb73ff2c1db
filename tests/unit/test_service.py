"""The service behaviour of the relay, in memory (tests/support/relay.py's harness): a proxy
that ends a session itself (stop, reload) tells both peers in PPTP; a reload applies the
allow-list and profiles to new sessions and ends those whose permission or profile went;
one line per call opened and closed; the capture gauge after a run-time failure.
"""
import ipaddress

from twisted.internet.address import IPv4Address
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from routeproxy import pptp, teardown
from routeproxy.calls import Call
from routeproxy.config import Profile
from routeproxy.lrp import PPTPServerFactory
from tests.support.relay import RelayHarness


def names(messages):
    return [type(m).__name__ for m in messages]


class TeardownMessagesTests(unittest.SynchronousTestCase):
    def call(self, c, s, local):
        call = Call(None)
        call.pns_id, call.pac_id, call.local_id = c, s, local
        return call

    def test_lrp_speaks_pac_to_client_and_pns_to_mux(self):
        calls = [self.call(1, 100, 7)]
        pairs = teardown.to_peer(pptp.PAC, calls)
        self.assertEqual([call for _, call in pairs], [calls[0], None])   # routed by call
        peer = [message for message, _ in pairs]
        self.assertEqual(names(peer), ["CallDisconnectNotify", "StopControlConnectionRequest"])
        self.assertEqual(peer[0].call_id, 7)        # L: what the client knows
        mux = teardown.to_mux(pptp.PAC, calls)
        self.assertEqual(names(mux), ["CallClearRequest", "StopControlConnectionRequest"])
        self.assertEqual(mux[0].call_id, 1)         # C, native

    def test_rrp_speaks_pns_to_server_and_pac_to_mux(self):
        calls = [self.call(1, 100, 9), self.call(2, None, 10)]   # the second not answered yet
        peer = [message for message, _ in teardown.to_peer(pptp.PNS, calls)]
        self.assertEqual([(type(m).__name__, getattr(m, "call_id", None)) for m in peer],
                         [("CallClearRequest", 9), ("CallClearRequest", 10),
                          ("StopControlConnectionRequest", None)])
        mux = teardown.to_mux(pptp.PNS, calls)
        self.assertEqual([getattr(m, "call_id", None) for m in mux], [100, None])   # S only where known


class Options(dict):
    """What reconfigure reads of a parsed options object."""


class RelayServiceTests(RelayHarness, unittest.TestCase):
    def setUp(self):
        RelayHarness.setUp(self)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self, word):
        return [formatEvent(e) for e in self.events if word in formatEvent(e)]

    def test_stopping_side_tells_both_peers(self):
        """The LRP ends a session: its client hears CDN + StopCCRQ with its IDs, pptpd hears
        CCR + StopCCRQ with the IDs it knows (forwarded by the RRP)."""
        client, server = self.connect_client("10.0.0.5")
        r_id, l_id = self.dial(client, server, call_id=1, server_call_id=100)
        transports = self.lrp.relay.shutDown("LRP stopping")
        self.flush()
        self.assertEqual(len(transports), 1)
        to_client = client.received()
        self.assertEqual(names(to_client), ["CallDisconnectNotify", "StopControlConnectionRequest"])
        self.assertEqual(to_client[0].call_id, l_id)
        self.assertTrue(client.transport.disconnecting)
        to_server = server.received()
        self.assertEqual(names(to_server), ["CallClearRequest", "StopControlConnectionRequest"])
        self.assertEqual(to_server[0].call_id, r_id)
        self.assertEqual(self.lrp.relay.sessions, set())

    def test_rrp_stopping_tells_both_peers(self):
        client, server = self.connect_client("10.0.0.5")
        r_id, l_id = self.dial(client, server, call_id=1, server_call_id=100)
        self.rrp.relay.shutDown("RRP stopping")
        self.flush()
        self.assertEqual([(type(m).__name__, getattr(m, "call_id", None)) for m in server.received()],
                         [("CallClearRequest", r_id), ("StopControlConnectionRequest", None)])
        self.assertEqual([(type(m).__name__, getattr(m, "call_id", None)) for m in client.received()],
                         [("CallDisconnectNotify", l_id), ("StopControlConnectionRequest", None)])

    def test_call_lines_name_the_client_on_both_sides(self):
        client, server = self.connect_client("10.0.0.5")
        r_id, l_id = self.dial(client, server, call_id=1, server_call_id=100)
        [lrp_open] = self.lines("LRP call opened")
        [rrp_open] = self.lines("RRP call opened")
        self.assertIn(f"client 10.0.0.5:{self.client_port}, C=1 S=100 L={l_id}", lrp_open)
        self.assertIn(f"client 10.0.0.5:{self.client_port}", rrp_open)
        self.assertIn(f"C=1 S=100 R={r_id}", rrp_open)
        client.send(pptp.CallClearRequest(call_id=1))
        self.flush()
        server.send(pptp.CallDisconnectNotify(call_id=100, result_code=pptp.DisconnectResult.REQUEST))
        self.flush()
        self.assertEqual(len(self.lines("LRP call closed")), 1)
        self.assertEqual(len(self.lines("RRP call closed")), 1)
        client.protocol.connectionLost(None)
        self.flush()
        [closed] = self.lines("LRP session closed")
        self.assertIn("no calls open (1 ended)", closed)

    def test_reload_allow_list(self):
        a, a_server = self.connect_client("10.0.0.5")
        self.dial(a, a_server, call_id=1, server_call_id=100)
        b, b_server = self.connect_client("10.0.1.7")
        old = Options(allow=None, profile="default", **{"tls-files": "x"})
        new = Options(allow=[ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("10.9.0.0/16")],
                      profile="other", **{"tls-files": "x"})
        changes = self.lrp.reconfigure(old, new)
        self.flush()
        self.assertEqual(changes, ["--allow now 10.0.0.0/24, 10.9.0.0/16 (1 session(s) ended)",
                                   "--profile default -> other (new sessions)"])
        self.assertEqual(names(b.received()), ["StopControlConnectionRequest"])   # no calls
        self.assertEqual(len(self.lrp.relay.sessions), 1)                          # a lives
        a.send(pptp.EchoRequest(identifier=5))
        self.flush()
        self.assertEqual(names(a_server.received()), ["EchoRequest"])
        factory = PPTPServerFactory(self.lrp)
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "10.0.1.8", 1)))
        self.assertIsNotNone(factory.buildProtocol(IPv4Address("TCP", "10.9.3.3", 1)))
        self.assertEqual(self.lrp.refusals["not_allowed"], 1)
        self.assertEqual(self.lrp.profile, "other")

    def test_reload_profiles(self):
        client, server = self.connect_client("10.0.0.5")
        self.dial(client, server, call_id=1, server_call_id=100)
        changes = self.rrp.reconfigure(Options(**{"tls-files": "x", "lrp-name": None}),
                                       Options(profiles={"lab": ("10.0.4.9", 1723)},
                                               **{"tls-files": "x", "lrp-name": None}))
        self.flush()
        self.assertEqual(changes, ["profiles: added ['lab'], changed none (new sessions), "
                                   "removed ['default'] (1 session(s) ended)"])
        self.assertEqual(names(server.received()), ["CallClearRequest", "StopControlConnectionRequest"])
        self.assertEqual(names(client.received()), ["CallDisconnectNotify", "StopControlConnectionRequest"])
        self.assertEqual(self.rrp.profiles, {"lab": Profile("10.0.4.9", 1723)})


class CaptureGaugeTests(unittest.SynchronousTestCase):
    def test_runtime_capture_failure_is_logged_and_reported(self):
        """A capture that fails while running (its interface deleted) logs one line and turns
        capture_up to 0 (routeproxy_capture_up)."""
        from twisted.internet.testing import MemoryReactorClock
        from routeproxy.greport import GREPort
        from routeproxy.testing import MemoryGRESystem

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        port = GREPort(None, ["10.0.0.1"], interface="gone0", reactor=MemoryReactorClock(),
                       system=MemoryGRESystem())
        port.startListening()
        self.assertTrue(port.snapshot()["capture_up"])
        port.connectionLost(Failure(OSError(19, "No such device")))
        snap = port.snapshot()
        self.assertEqual((snap["capture_up"], snap["capture_failures"]), (False, 1))
        [line] = [e for e in events if e.get("log_level") == LogLevel.error]
        self.assertIn("GRE capture on {interface} failed", line["log_format"])
