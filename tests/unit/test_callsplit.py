"""Calls of one client control connection spread over control connections to a one-call server.

In memory (tests/support/relay.py: iosim link, StringTransport peers, the RRP's dials on a
MemoryReactorClock, recording GRE ports).  tests/system/test_callsplit.py runs the same with
twistd, real sockets and a scripted pptpd that closes on a second call.
"""
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from routeproxy import gre, metrics, pptp, status, statuscli
from routeproxy.config import Profile
from tests.support.relay import LRP_IP, RRP_SOURCE, SERVER_IP, Peer, RelayHarness
from tests.unit.test_status import metric, parse_metrics

CLIENT = "10.0.0.5"


class CallSplitTests(RelayHarness, unittest.TestCase):

    def setUp(self):
        super().setUp()
        self.local_port = 50000

    def accept_dial(self):
        """The RRP's latest dial connects; returns the server's end of it."""
        host, port, factory, timeout, bind = self.reactor.tcpClients[-1]
        self.assertEqual((host, port, bind), (SERVER_IP, 1723, (RRP_SOURCE, 0)))
        self.local_port += 1
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport(hostAddress=IPv4Address("TCP", RRP_SOURCE, self.local_port),
                                    peerAddress=IPv4Address("TCP", SERVER_IP, 1723))
        protocol.makeConnection(transport)
        self.flush()
        return Peer(protocol, transport)

    def second_call(self, client, call_id, server_call_id):
        """The client's next Outgoing-Call-Request makes the RRP dial again; the new connection
        starts with the client's own SCCRQ, then carries the call.  Returns (server, R, L)."""
        dials = len(self.reactor.tcpClients)
        client.send(pptp.OutgoingCallRequest(call_id=call_id))
        self.flush()
        self.assertEqual(len(self.reactor.tcpClients), dials + 1)
        server = self.accept_dial()
        [sccrq] = server.received()
        self.assertIsInstance(sccrq, pptp.StartControlConnectionRequest)
        self.assertEqual(pptp.strip_nul(sccrq.host_name), b"pns")
        server.send(pptp.StartControlConnectionReply(result_code=1))
        self.flush()
        [ocrq] = server.received()
        self.assertIsInstance(ocrq, pptp.OutgoingCallRequest)
        server.send(pptp.OutgoingCallReply(call_id=server_call_id, peer_call_id=ocrq.call_id, result_code=1))
        self.flush()
        [ocrp] = client.received()
        self.assertEqual((ocrp.peer_call_id, ocrp.result_code), (call_id, 1))
        return server, ocrq.call_id, ocrp.call_id

    def three_calls(self):
        client, first = self.connect_client(
            CLIENT, start=pptp.StartControlConnectionRequest(host_name=b"pns"))
        [sccrq] = first.received()
        first.send(pptp.StartControlConnectionReply(result_code=1))
        self.flush()
        client.received()
        client.send(pptp.OutgoingCallRequest(call_id=1))
        self.flush()
        [ocrq] = first.received()
        first.send(pptp.OutgoingCallReply(call_id=256, peer_call_id=ocrq.call_id, result_code=1))
        self.flush()
        [ocrp] = client.received()
        calls = [(first, ocrq.call_id, ocrp.call_id)]
        calls.append(self.second_call(client, 2, 257))
        calls.append(self.second_call(client, 3, 258))
        return client, calls

    def session(self):
        [session] = self.rrp.relay.sessions
        return session

    def test_each_call_on_its_own_connection_with_gre_both_ways(self):
        client, calls = self.three_calls()
        self.assertEqual(len({r for _, r, _ in calls}), 3)
        self.assertEqual([len(server.received()) for server, _, _ in calls], [0, 0, 0])
        # client -> server: each call's GRE leaves with that server connection's S, from the
        # RRP's one source address
        for (_, _, local), seq in zip(calls, (1, 2, 3)):
            self.lrp.relay.demux.greReceived(CLIENT, LRP_IP, gre.build_gre(local, b"\xff\x03x", seq=seq))
        self.flush()
        self.assertEqual([(src, dst, p.call_id, p.seq) for src, dst, p in self.rrp.relay.grePort.sent],
                         [(RRP_SOURCE, SERVER_IP, 256, 1), (RRP_SOURCE, SERVER_IP, 257, 2),
                          (RRP_SOURCE, SERVER_IP, 258, 3)])
        # server -> client: found by (server address, R), to the client's own call ID
        for (_, r, _), seq in zip(calls, (7, 8, 9)):
            self.rrp.relay.demux.greReceived(SERVER_IP, RRP_SOURCE, gre.build_gre(r, b"\xff\x03y", seq=seq))
        self.flush()
        self.assertEqual([(dst, p.call_id, p.seq) for _, dst, p in self.lrp.relay.grePort.sent],
                         [(CLIENT, 1, 7), (CLIENT, 2, 8), (CLIENT, 3, 9)])
        upstreams = self.rrp.snapshot()["sessions"][0]["upstreams"]
        self.assertEqual([(u["connection"], u["primary"], u["state"], u["calls"]) for u in upstreams],
                         [(1, True, "ready", [1]), (2, False, "ready", [2]), (3, False, "ready", [3])])
        self.assertEqual(self.rrp.snapshot()["upstream_connections"],
                         {"open": 2, "opened": 2, "failed": 0, "lost": 0})

    def test_status_shows_each_sessions_upstream_connections(self):
        self.three_calls()
        snap = status.snapshot(self.rrp)
        header, row = statuscli.format_table(snap, summary=False).splitlines()
        self.assertIn("upstreams", header)
        self.assertIn(" 1*:1 2:2 3:3 ", row)
        samples = parse_metrics(metrics.format_metrics(snap))
        self.assertEqual(metric(samples, "routeproxy_upstream_connections"), 2)
        self.assertEqual(metric(samples, "routeproxy_upstream_connections_total", event="opened"), 2)
        self.assertEqual(snap["calls_per_connection"], {"default": 1})

    def test_extra_connections_answer_echo_themselves(self):
        client, calls = self.three_calls()
        second = calls[1][0]
        second.send(pptp.EchoRequest(identifier=9))
        self.flush()
        self.assertEqual(second.received(), [pptp.EchoReply(identifier=9, result_code=1)])
        self.assertEqual(client.received(), [])
        client.send(pptp.EchoRequest(identifier=4))   # the client's own echo: the primary's
        self.flush()
        self.assertEqual(calls[0][0].received(), [pptp.EchoRequest(identifier=4)])
        self.assertEqual([second.received(), calls[2][0].received()], [[], []])

    def test_hang_up_one_call_stops_its_connection_only(self):
        client, calls = self.three_calls()
        second, r2, l2 = calls[1]
        client.send(pptp.CallClearRequest(call_id=2))
        self.flush()
        self.assertEqual(second.received(), [pptp.CallClearRequest(call_id=r2)])
        second.send(pptp.CallDisconnectNotify(call_id=257, result_code=pptp.DisconnectResult.REQUEST))
        self.flush()
        [cdn] = client.received()
        self.assertEqual(cdn.call_id, l2)
        self.assertEqual(second.received(), [pptp.StopControlConnectionRequest(reason=1)])
        second.send(pptp.StopControlConnectionReply(result_code=1))
        self.flush()
        self.assertTrue(second.transport.disconnecting)
        second.protocol.connectionLost(None)
        self.assertFalse(calls[0][0].transport.disconnecting or calls[2][0].transport.disconnecting)
        self.assertEqual([u["calls"] for u in self.session().snapshot()["upstreams"]], [[1], [3]])
        self.assertEqual(len(self.rrp.scopes.lookup(SERVER_IP)), 2)
        # a new call takes a new connection again
        fourth, r4, l4 = self.second_call(client, 4, 259)
        self.assertEqual(self.rrp.upstreamCounters.snapshot(),
                         {"open": 2, "opened": 3, "failed": 0, "lost": 0})

    def test_client_stop_stops_every_upstream_connection(self):
        client, calls = self.three_calls()
        client.send(pptp.StopControlConnectionRequest(reason=1))
        self.flush()
        for server, _, _ in calls:
            self.assertEqual(server.received(), [pptp.StopControlConnectionRequest(reason=1)])
        for server, _, _ in calls[1:]:
            server.send(pptp.StopControlConnectionReply(result_code=1))
        calls[0][0].send(pptp.StopControlConnectionReply(result_code=1))
        self.flush()
        self.assertEqual(client.received(), [pptp.StopControlConnectionReply(result_code=1)])
        self.assertTrue(all(server.transport.disconnecting for server, _, _ in calls[1:]))
        client.protocol.connectionLost(None)
        self.flush()
        self.assertTrue(calls[0][0].transport.disconnecting)
        self.assertEqual(len(self.rrp.scopes.lookup(SERVER_IP)), 0)
        self.assertEqual(self.rrp.upstreamCounters.snapshot()["lost"], 0)

    def test_upstream_that_dies_ends_only_its_call(self):
        client, calls = self.three_calls()
        third, r3, l3 = calls[2]
        third.protocol.connectionLost(None)
        self.flush()
        [cdn] = client.received()
        self.assertIsInstance(cdn, pptp.CallDisconnectNotify)
        self.assertEqual((cdn.call_id, cdn.result_code), (l3, pptp.DisconnectResult.LOST_CARRIER))
        self.assertFalse(client.transport.disconnecting)
        self.assertEqual(len(self.rrp.scopes.lookup(SERVER_IP)), 2)
        self.assertEqual(len(self.lrp.space), 2)
        self.rrp.relay.demux.greReceived(SERVER_IP, RRP_SOURCE, gre.build_gre(r3, b"late", seq=1))
        self.assertEqual(self.rrp.relay.drops["gre_unknown_call_id"], 1)
        self.assertEqual(self.rrp.upstreamCounters.snapshot(), {"open": 1, "opened": 2, "failed": 0, "lost": 1})

    def test_primary_that_dies_hands_over_to_another(self):
        client, calls = self.three_calls()
        first, r1, l1 = calls[0]
        first.protocol.connectionLost(None)
        self.flush()
        [cdn] = client.received()
        self.assertEqual(cdn.call_id, l1)
        self.assertFalse(client.transport.disconnecting)
        client.send(pptp.EchoRequest(identifier=5))
        self.flush()
        self.assertEqual(calls[1][0].received(), [pptp.EchoRequest(identifier=5)])
        calls[1][0].send(pptp.EchoReply(identifier=5, result_code=1))
        self.flush()
        self.assertEqual(client.received(), [pptp.EchoReply(identifier=5, result_code=1)])
        # the last connection going closes the client's session, as a server crash would
        calls[1][0].protocol.connectionLost(None)
        calls[2][0].protocol.connectionLost(None)
        self.flush()
        self.assertTrue(client.transport.disconnecting)

    def test_connection_that_cannot_be_made_fails_the_call(self):
        client, first = self.connect_client(CLIENT)
        self.dial(client, first, 1, 256)
        client.send(pptp.OutgoingCallRequest(call_id=2))
        self.flush()
        connector = self.reactor.connectors[-1]
        self.reactor.tcpClients[-1][2].clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        self.flush()
        [ocrp] = client.received()
        self.assertEqual((ocrp.peer_call_id, ocrp.result_code, ocrp.error_code),
                         (2, pptp.OutgoingCallResult.GENERAL_ERROR, pptp.ErrorCode.PAC_ERROR))
        self.assertFalse(client.transport.disconnecting)
        self.assertEqual(len(self.rrp.scopes.lookup(SERVER_IP)), 1)
        self.assertEqual(self.rrp.upstreamCounters.snapshot()["failed"], 1)

    def test_no_limit_keeps_every_call_on_one_connection(self):
        self.rrp.profiles["default"] = Profile(SERVER_IP, 1723, 0)
        client, first = self.connect_client(CLIENT)
        self.dial(client, first, 1, 256)
        dials = len(self.reactor.tcpClients)
        client.send(pptp.OutgoingCallRequest(call_id=2))
        self.flush()
        self.assertEqual(len(self.reactor.tcpClients), dials)
        [ocrq] = first.received()
        self.assertEqual(type(ocrq), pptp.OutgoingCallRequest)
        self.assertNotIn("upstreams", self.session().snapshot())
