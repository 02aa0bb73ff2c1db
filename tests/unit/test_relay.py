"""The LRP and the RRP together, in memory: no sockets, no TLS, no kernel.

Fakes, and why: the mux link is twisted.test.iosim (the TLS path has its own tests in
test_mux_tls), the PPTP clients and pptpd are StringTransports fed scripted messages, the
RRP's dials go to a MemoryReactorClock, and the GRE ports are a recorder.  The end-to-end
tests (test_e2e) run the same code on real sockets, raw GRE and twistd.
"""
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from routeproxy import gre, pptp
from routeproxy.lrp import LocalRouteProxy, PPTPServerFactory
from routeproxy.testing import RecordingGREPort
from tests.support.relay import LRP_IP, RRP_SOURCE, SERVER_IP, RelayHarness, client_of


class RelayTests(RelayHarness, unittest.TestCase):
    def test_two_clients_same_call_id(self):
        a, a_server = self.connect_client("10.0.0.5")
        b, b_server = self.connect_client("10.0.0.6")
        r_a, l_a = self.dial(a, a_server, 1, 256)
        r_b, l_b = self.dial(b, b_server, 1, 257)
        self.assertNotEqual(r_a, r_b)
        self.assertNotEqual(l_a, l_b)

        # client -> pptpd: the key becomes pptpd's own ID, seq/ack untouched
        self.lrp.relay.demux.greReceived("10.0.0.5", LRP_IP, gre.build_gre(l_a, b"\xff\x03a", seq=7, ack=3))
        self.lrp.relay.demux.greReceived("10.0.0.6", LRP_IP, gre.build_gre(l_b, b"\xff\x03b", seq=9))
        self.flush()
        self.assertEqual(self.rrp.relay.grePort.sent, [
            (RRP_SOURCE, SERVER_IP, gre.GREPacket(256, b"\xff\x03a", seq=7, ack=3)),
            (RRP_SOURCE, SERVER_IP, gre.GREPacket(257, b"\xff\x03b", seq=9)),
        ])
        # pptpd -> client: the key becomes the client's own ID, to the right client
        self.rrp.relay.demux.greReceived(SERVER_IP, RRP_SOURCE, gre.build_gre(r_b, b"\xff\x03B", seq=1, ack=9))
        self.rrp.relay.demux.greReceived(SERVER_IP, RRP_SOURCE, gre.build_gre(r_a, b"\xff\x03A", seq=1, ack=7))
        self.flush()
        self.assertEqual(self.lrp.relay.grePort.sent, [
            (LRP_IP, "10.0.0.6", gre.GREPacket(1, b"\xff\x03B", seq=1, ack=9)),
            (LRP_IP, "10.0.0.5", gre.GREPacket(1, b"\xff\x03A", seq=1, ack=7)),
        ])

    def test_gre_from_wrong_address_dropped(self):
        a, a_server = self.connect_client("10.0.0.5")
        _, l_a = self.dial(a, a_server, 1, 256)
        self.lrp.relay.demux.greReceived("10.0.0.99", LRP_IP, gre.build_gre(l_a, b"x", seq=1))
        unknown = l_a % 65535 + 1   # the next ID, 1 after 65535 (the space's random start)
        self.lrp.relay.demux.greReceived("10.0.0.5", LRP_IP, gre.build_gre(unknown, b"x", seq=1))
        self.lrp.relay.demux.greReceived("10.0.0.5", LRP_IP, b"junk")
        self.flush()
        self.assertEqual(self.rrp.relay.grePort.sent, [])
        self.assertEqual(self.lrp.relay.drops["gre_wrong_source"], 1)
        self.assertEqual(self.lrp.relay.drops["gre_unknown_call_id"], 1)
        self.assertEqual(self.lrp.relay.drops.total(), 3)

    def test_teardown_frees_ids(self):
        a, a_server = self.connect_client("10.0.0.5")
        r_a, l_a = self.dial(a, a_server, 1, 256)
        a.send(pptp.CallClearRequest(call_id=1))
        self.flush()
        [ccrq] = a_server.received()
        self.assertEqual(ccrq.call_id, r_a)
        a_server.send(pptp.CallDisconnectNotify(call_id=256, result_code=3))
        self.flush()
        [cdn] = a.received()
        self.assertEqual(cdn.call_id, l_a)
        self.assertEqual(len(self.lrp.space), 0)
        self.assertEqual(len(self.rrp.scopes.lookup(SERVER_IP)), 0)

    def test_client_hangup_closes_server_side(self):
        a, a_server = self.connect_client("10.0.0.5")
        b, b_server = self.connect_client("10.0.0.6")
        self.dial(a, a_server, 1, 256)
        self.dial(b, b_server, 1, 257)
        a.protocol.connectionLost(None)
        self.flush()
        self.assertTrue(a_server.transport.disconnecting)
        self.assertFalse(b_server.transport.disconnecting)
        self.assertEqual(len(self.lrp.space), 1)
        self.assertEqual(len(self.rrp.scopes.lookup(SERVER_IP)), 1)
        self.assertEqual(len(self.lrp.relay.sessions), 1)

    def test_server_unreachable_answers_in_pptp(self):
        client = self.connect_only()
        transport = client.transport
        client.send(pptp.StartControlConnectionRequest())
        self.flush()
        connector = self.reactor.connectors[-1]
        factory = self.reactor.tcpClients[-1][2]
        from twisted.internet.error import ConnectionRefusedError
        from twisted.python.failure import Failure
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        self.flush()
        [reply] = client.received()
        self.assertIsInstance(reply, pptp.StartControlConnectionReply)
        self.assertEqual(reply.result_code, pptp.StartResult.GENERAL_ERROR)
        self.assertTrue(transport.disconnecting)

    def test_allow_list(self):
        self.lrp.allow = [__import__("ipaddress").ip_network("10.0.0.0/30")]
        factory = PPTPServerFactory(self.lrp)
        self.assertIsNotNone(factory.buildProtocol(IPv4Address("TCP", "10.0.0.2", 1)))
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "10.0.0.5", 1)))


class NoLinkTests(unittest.SynchronousTestCase):
    def test_client_told_when_link_stays_down(self):
        reactor = MemoryReactorClock()
        lrp = LocalRouteProxy(reactor, RecordingGREPort)
        client = client_of(lrp, "10.0.0.5", 40000)
        transport = client.transport
        client.send(pptp.StartControlConnectionRequest())
        reactor.advance(lrp.linkWait - 0.1)
        self.assertEqual(client.received(), [])          # still waiting for the link
        reactor.advance(0.2)
        [reply] = client.received()
        self.assertEqual(reply.result_code, pptp.StartResult.GENERAL_ERROR)
        self.assertEqual(reply.error_code, pptp.ErrorCode.PAC_ERROR)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(lrp.relay.sessions, set())


class RefusalTests(RelayHarness, unittest.TestCase):
    """Refusals that reach the LRP before the client has said anything."""

    def test_unknown_profile(self):
        self.lrp.profile = "nosuch"
        client = self.connect_only()
        client.send(pptp.StartControlConnectionRequest())
        self.flush()                                    # the RRP refuses the mux session
        [reply] = client.received()
        self.assertEqual(reply.result_code, pptp.StartResult.GENERAL_ERROR)
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(self.reactor.tcpClients, [])   # nothing was dialled

    def test_nothing_upstream_before_the_start_request(self):
        """A client that sends nothing opens no mux session, and is closed after startTimeout."""
        client = self.connect_only()
        self.flush()
        self.assertEqual(len(self.lrp.link.sessions), 0)
        self.reactor.advance(self.lrp.limits.startTimeout - 0.5)
        self.assertFalse(client.transport.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(client.received(), [])
        self.assertEqual(self.lrp.relay.refusals["start_timeout"], 1)
        self.assertEqual(self.lrp.admission.snapshot()["pending"], 0)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_cut_off_message_is_named(self):
        client, _ = self.connect_client("10.0.0.5")
        session = client.protocol.session
        client.protocol.dataReceived(pptp.StartControlConnectionRequest().pack()[:40])
        client.protocol.connectionLost(None)
        self.assertIn("inside a message", session.closeReason)
        self.assertIn("truncated", session.closeReason)
