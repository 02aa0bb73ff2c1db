"""A relay session while its link is lost (routeproxy/detach.py), both daemons in memory.

The harness (tests/support/relay.py) joins an LRP and an RRP that speak "resume"; a cut is
both mux protocols losing their transport with nothing delivered.
"""
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.trial import unittest

from routeproxy import gre, metrics, pptp
from tests.support.relay import LRP_IP, RelayHarness
from tests.unit.test_status import metric, parse_metrics


class DetachTests(RelayHarness, unittest.SynchronousTestCase):
    resumeGrace = 30

    def setUp(self):
        super().setUp()
        self.client, self.server = self.connect_client("10.0.0.5")
        self.r_id, self.l_id = self.dial(self.client, self.server, call_id=1, server_call_id=70)

    def cut(self):
        server, client, _ = self.link_ends
        for protocol in (server, client):
            protocol.connectionLost(Failure(ConnectionLost("cut")))
        [session] = self.lrp.relay.sessions
        self.assertEqual(session.state(), "detached")
        return session

    def test_gapIsBridgedAndResumed(self):
        self.cut()
        self.client.send(pptp.EchoRequest(identifier=9))
        [reply] = self.client.received()
        self.assertEqual((type(reply), reply.identifier), (pptp.EchoReply, 9))
        self.lrp.relay.demux.greReceived("10.0.0.5", LRP_IP, gre.build_gre(self.l_id, b"\xff\x03a", seq=1))
        self.assertEqual(self.lrp.relay.drops.snapshot().get("mux_detached"), 1)
        self.client.send(pptp.SetLinkInfo(peer_call_id=self.l_id, send_accm=5))
        self.flush()
        self.assertEqual(self.server.received(), [])

        self.connectLink()
        [info] = self.server.received()
        self.assertEqual((type(info), info.send_accm), (pptp.SetLinkInfo, 5))
        self.server.send(pptp.EchoRequest(identifier=4))
        self.flush()
        [echo] = self.client.received()
        self.assertEqual(echo.identifier, 4)
        self.assertEqual(self.lrp.snapshot()["resume"]["resumes_done"], 1)
        samples = parse_metrics(metrics.format_metrics(self.rrp.snapshot()))
        self.assertEqual(metric(samples, "routeproxy_resumes_total", result="done"), 1)
        self.assertEqual(metric(samples, "routeproxy_resumed_sessions_total", result="resumed"), 1)
        self.assertEqual(metric(samples, "routeproxy_detached_sessions"), 0)
        [session] = self.lrp.relay.sessions
        self.assertEqual(session.state(), "open")

    def test_echoWaitingForTheFarSideIsNotAnsweredLocally(self):
        self.client.send(pptp.EchoRequest(identifier=1))   # sent, never answered before the cut
        self.flush()
        [request] = self.server.received()
        self.cut()
        self.client.send(pptp.EchoRequest(identifier=2))
        self.assertEqual(self.client.received(), [], "a local reply would overtake the far side's")
        self.connectLink()
        self.assertEqual([m.identifier for m in self.server.received()], [2])
        self.server.send(pptp.EchoReply(identifier=1))
        self.server.send(pptp.EchoReply(identifier=2))
        self.flush()
        self.assertEqual([m.identifier for m in self.client.received()], [1, 2])

    def test_graceExpiryEndsBothSidesInPPTP(self):
        self.cut()
        self.reactor.advance(31)
        self.flush()
        disconnect, stop = self.client.received()
        self.assertEqual((type(disconnect), disconnect.call_id), (pptp.CallDisconnectNotify, self.l_id))
        self.assertIsInstance(stop, pptp.StopControlConnectionRequest)
        clear, stop = self.server.received()
        self.assertEqual((type(clear), clear.call_id), (pptp.CallClearRequest, self.r_id))
        self.assertIsInstance(stop, pptp.StopControlConnectionRequest)
        self.assertTrue(self.client.transport.disconnecting and self.server.transport.disconnecting)
        self.assertEqual((self.lrp.relay.sessions, self.rrp.relay.sessions), (set(), set()))
        self.assertEqual(self.lrp.space.snapshot()["in_use"], 0)
        self.assertEqual(sum(s["in_use"] for s in self.rrp.scopes.snapshot()), 0)
