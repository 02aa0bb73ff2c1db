"""MuxProtocol on in-memory transports: StringTransport, and two protocols joined by iosim.

iosim's FakeTransport stands in for TCP/TLS here (no sockets); the real-TLS
tests are in test_mux_tls.
"""
import hashlib

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from twisted.trial import unittest

from routeproxy.mux import frames as F
from routeproxy.mux.connection import MuxConfig
from routeproxy.mux.frames import LinkError, Reason
from routeproxy.mux.linksocket import bufferedBytes, bufferingTransport
from routeproxy.mux.protocol import MuxClientFactory, MuxServerFactory
from routeproxy.mux.session import OPEN, SessionRefused

from routeproxy.testing import RecordingProducer as Producer, RecordingSessionReceiver as Receiver


class Upstreams:
    """The RRP's decision: profiles it knows; each accepted session gets a Receiver."""

    def __init__(self, profiles=("office",)):
        self.profiles = profiles
        self.accepted = {}

    def sessionRequested(self, session, profile, clientInfo):
        if profile not in self.profiles:
            raise SessionRefused(Reason.UNKNOWN_PROFILE, f"no profile {profile!r}")
        receiver = Receiver()
        self.accepted[session.id] = (session, receiver)
        return defer.succeed(receiver)


class StringTransportTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.factory = MuxClientFactory(MuxConfig(), self.clock,
                                        peerNameOf=lambda t: "rrp.example")
        self.protocol = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def written(self):
        data = self.transport.value()
        self.transport.clear()
        return F.FrameDecoder().frames(data)

    def test_sendsHelloAndRegistersAsStreamingProducer(self):
        self.clock.advance(0)
        [hello] = self.written()
        self.assertIsInstance(hello, F.Hello)
        self.assertIs(self.transport.producer, self.protocol)
        self.assertTrue(self.transport.streaming)
        self.assertIn(self.protocol.connection, self.factory.connections)

    def test_transportPauseDropsGREAndResumeAdmitsIt(self):
        self.protocol.dataReceived(F.Hello().encode())
        self.assertEqual(self.protocol.connection.peerName, "rrp.example")
        session = self.protocol.connection.openSession("office", "", Receiver())
        self.protocol.dataReceived(F.OpenOk(session.id).encode())
        self.written()
        self.transport.producer.pauseProducing()  # what a full TCP buffer does
        self.assertFalse(session.sendGRE(1, 1, None, b"x"))
        session.sendControl(b"still sent")
        self.clock.advance(0)
        self.assertEqual(self.written(), [F.Control(session.id, b"still sent")])
        self.transport.producer.resumeProducing()
        self.assertTrue(session.sendGRE(1, 2, None, b"x"))
        self.assertEqual(self.protocol.connection.stats.greDropped, {"paused": 1})

    def test_oneWritePerTurn(self):
        self.protocol.dataReceived(F.Hello().encode())
        sessions = [self.protocol.connection.openSession("office", "", Receiver())
                    for _ in range(3)]
        self.protocol.dataReceived(b"".join(F.OpenOk(s.id).encode() for s in sessions))
        writes = []
        self.transport.writeSequence = lambda seq: writes.append(list(seq))
        for s in sessions:
            s.sendControl(b"c")
            s.sendGRE(1, None, None, b"g")
        self.clock.advance(0)
        self.assertEqual(len(writes), 1)
        types = [f.TYPE for f in F.FrameDecoder().frames(b"".join(writes[0]))]
        self.assertEqual(types, [F.CONTROL] * 3 + [F.GRE] * 3)

    def test_connectionLostClosesSessions(self):
        self.protocol.dataReceived(F.Hello().encode())
        receiver = Receiver()
        self.protocol.connection.openSession("office", "", receiver)
        self.protocol.connectionLost(iosim.Failure(ConnectionError("reset")))
        self.assertEqual(receiver.closed, [Reason.LINK_LOST])
        self.assertEqual(self.factory.connections, set())

    def test_bufferedBytesReadThroughWrappers(self):
        class Socketish:
            dataBuffer, offset, _tempDataLen = b"x" * 100, 30, 5

        class Wrapper:
            transport = Socketish()
        self.assertEqual(bufferedBytes(bufferingTransport(Wrapper())), 75)
        self.assertIsNone(bufferingTransport(StringTransport()))


class PairTests(unittest.SynchronousTestCase):
    """An LRP-end and an RRP-end protocol joined in memory."""

    config = MuxConfig(initialWindow=4096, pingInterval=5, deadTimeout=12)

    def setUp(self):
        self.clock = Clock()
        self.upstreams = Upstreams()
        server = MuxServerFactory(self.upstreams.sessionRequested, self.config, self.clock)
        client = MuxClientFactory(self.config, self.clock)
        self.lrp, self.rrp, self.pump = iosim.connectedServerAndClient(
            lambda: server.buildProtocol(None), lambda: client.buildProtocol(None),
            clock=self.clock)
        self.pump.flush()
        self.assertTrue(self.lrp.connection.ready and self.rrp.connection.ready)

    def open(self, profile="office"):
        receiver = Receiver()
        session = self.lrp.connection.openSession(profile, "203.0.113.5:40000", receiver)
        results = []
        session.whenOpen().addBoth(results.append)
        self.pump.flush()
        return session, receiver, results

    def test_openAcceptRefuse(self):
        session, receiver, results = self.open()
        self.assertEqual(results, [session])
        remote, remoteReceiver = self.upstreams.accepted[session.id]
        self.assertEqual((remote.profile, remote.clientInfo), ("office", "203.0.113.5:40000"))
        refused, _, results = self.open("elsewhere")
        self.assertEqual(results[0].value.reason, Reason.UNKNOWN_PROFILE)
        self.assertEqual(session.state, OPEN)

    def test_controlBytesInOrderBothWays(self):
        session, receiver, _ = self.open()
        remote, remoteReceiver = self.upstreams.accepted[session.id]
        sent = b"".join(bytes([i]) * (37 * i + 1) for i in range(200))  # 736k > window
        for i in range(0, len(sent), 1000):
            session.sendControl(sent[i:i + 1000])
        remote.sendControl(b"reply")
        self.pump.flush()
        self.assertEqual(hashlib.sha256(remoteReceiver.control).digest(),
                         hashlib.sha256(sent).digest())
        self.assertEqual(bytes(receiver.control), b"reply")

    def test_stalledConsumerPausesTheFarProducerOnly(self):
        stalled, _, _ = self.open()
        other, _, _ = self.open()
        producer = Producer()
        stalled.setLocalProducer(producer)
        remoteStalled = self.upstreams.accepted[stalled.id][0]
        remoteOther, otherReceiver = self.upstreams.accepted[other.id]
        remoteStalled.pauseReading()  # pptpd's socket is full
        stalled.sendControl(bytes(10000))
        self.pump.flush()
        self.assertTrue(producer.paused)
        self.assertEqual(len(self.upstreams.accepted[stalled.id][1].control), 4096)
        other.sendControl(b"not stuck")
        self.pump.flush()
        self.assertEqual(bytes(otherReceiver.control), b"not stuck")
        remoteStalled.resumeReading()
        self.pump.flush()
        self.assertEqual(len(self.upstreams.accepted[stalled.id][1].control), 10000)
        self.assertFalse(producer.paused)

    def test_greBothWays(self):
        session, receiver, _ = self.open()
        remote, remoteReceiver = self.upstreams.accepted[session.id]
        self.assertTrue(session.sendGRE(0x1234, 7, None, b"ppp-frame"))
        self.assertTrue(remote.sendGRE(0x1234, 1, 7, b""))
        self.pump.flush()
        self.assertEqual(remoteReceiver.gre, [(0x1234, 7, None, b"ppp-frame")])
        self.assertEqual(receiver.gre, [(0x1234, 1, 7, b"")])

    def test_pingRtt(self):
        d = self.lrp.connection.ping()
        self.pump.flush()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.lrp.connection.stats.rttLast, 0)

    def test_periodicPingsKeepAnIdleLinkAlive(self):
        session, receiver, _ = self.open()
        for _ in range(10):
            self.clock.advance(5)
            self.pump.flush()
        self.assertFalse(self.lrp.connection.closed)
        self.assertIsNotNone(self.rrp.connection.stats.rttLast)

    def test_deadPeerDetected(self):
        session, receiver, _ = self.open()
        # The RRP hangs: its socket still takes bytes, but it never answers.
        self.rrp.dataReceived = lambda data: None
        self.rrp.connection._timer.cancel()
        for _ in range(23):  # to 11.5 s
            self.clock.advance(0.5)
            self.pump.flush()
        self.assertFalse(self.lrp.connection.closed)
        self.assertIsNotNone(self.lrp.connection._pingOutstanding)  # it pinged, unanswered
        self.clock.advance(0.5)
        self.assertTrue(self.lrp.connection.closed)
        self.assertTrue(self.lrp.transport.disconnecting)
        self.assertEqual(receiver.closed, [Reason.LINK_LOST])

    def test_unknownMandatoryFrameTypeClosesTheLink(self):
        session, receiver, _ = self.open()
        self.lrp.transport.write(F.UnknownFrame(0x42, 0, 0, b"").encode())
        self.pump.flush()
        self.assertTrue(self.rrp.connection.closed)
        self.assertTrue(self.lrp.connection.closed)
        self.assertEqual(receiver.closed, [Reason.LINK_LOST])

    def test_oversizeLengthSendsGoAwayAndCloses(self):
        session, receiver, _ = self.open()
        goaways = []
        original = self.lrp.connection._onGoAway
        self.lrp.connection._handlers = dict(self.lrp.connection._handlers)
        self.lrp.connection._handlers[F.GoAway] = lambda c, f: (goaways.append(f), original(f))
        self.lrp.transport.write(F.encodeHeader(F.CONTROL, 0, session.id, 20000))
        self.pump.flush()
        self.assertEqual([g.code for g in goaways], [LinkError.FRAME_TOO_LARGE])
        self.assertTrue(self.lrp.transport.disconnected or self.lrp.transport.disconnecting)
        self.assertEqual(receiver.closed, [Reason.LINK_LOST])

    def test_dataForNonOpenSessionClosesOnlyThatSession(self):
        session, receiver, _ = self.open()
        self.lrp.transport.write(F.Control(999, b"stray").encode()
                                 + F.Datagram(998, 1, None, None, b"stray").encode())
        self.pump.flush()
        self.assertEqual(self.rrp.connection.stats.greIgnored["not_open"], 1)
        self.assertEqual(session.state, OPEN)
        session.sendControl(b"still fine")
        self.pump.flush()
        self.assertEqual(bytes(self.upstreams.accepted[session.id][1].control), b"still fine")

    def test_linkLossClosesAllSessionsOnBothEnds(self):
        opened = [self.open() for _ in range(5)]
        self.lrp.transport.loseConnection()
        self.pump.flush()
        self.assertEqual([r.closed for _, r, _ in opened], [[Reason.LINK_LOST]] * 5)
        self.assertEqual([r.closed for _, r in self.upstreams.accepted.values()],
                         [[Reason.LINK_LOST]] * 5)
