"""The mux state machines (MuxConnection + Session) driven frame by frame.

No network: the connection writes into a FakeLink (a recording stand-in for the
protocol), the peer is played by hand-written frames, time is a Clock.
"""
from hypothesis import given, settings, strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from routeproxy import turn
from routeproxy.mux import frames as F
from routeproxy.mux.connection import MuxConfig, MuxConnection
from routeproxy.mux.frames import LinkError, Reason
from routeproxy.mux.session import CLOSED, OPEN, PENDING, LinkDown, SessionRefused
from routeproxy.testing import RecordingMuxLink
from routeproxy.testing import RecordingProducer as Producer, RecordingSessionReceiver as Receiver


FakeLink = RecordingMuxLink


PEER_HELLO = F.Hello(initialWindow=1000)


class Base(unittest.SynchronousTestCase):
    isOpener = True

    def setUp(self):
        self.clock = Clock()
        self.link = FakeLink()
        self.requests = []
        self.cancelled = []
        self.conn = self.makeConnection()

    def makeConnection(self, config=None, hello=PEER_HELLO, sessionRequested=None):
        conn = MuxConnection(self.isOpener, self.clock,
                             config or MuxConfig(initialWindow=100, pingInterval=10, deadTimeout=30),
                             sessionRequested or self.sessionRequested, peerName="peer.test")
        self.link = FakeLink()
        conn.start(self.link)
        conn.flush()
        [ours] = self.link.frames()
        self.assertIsInstance(ours, F.Hello)
        if hello is not None:
            conn.dataReceived(hello.encode())
        return conn

    def sessionRequested(self, session, profile, clientInfo):
        d = defer.Deferred(lambda d: self.cancelled.append(session))
        self.requests.append((session, profile, clientInfo, d))
        return d

    def feed(self, *frames):
        self.conn.dataReceived(b"".join(f.encode() for f in frames))
        return self.link.frames()

    def sent(self):
        self.conn.flush()
        return self.link.frames()

    def openSession(self, receiver=None, producer=None):
        receiver = receiver or Receiver()
        session = self.conn.openSession("office", "192.0.2.1:5000", receiver)
        if producer is not None:
            session.setLocalProducer(producer)
        [frame] = self.sent()
        self.assertEqual(frame, F.Open(session.id, "office", "192.0.2.1:5000"))
        self.feed(F.OpenOk(session.id))
        return session, receiver


class HelloTests(Base):
    def test_nothingButHelloBeforeThePeersHello(self):
        conn = self.makeConnection(hello=None)
        session = conn.openSession("office", "", Receiver())
        conn.flush()
        self.assertEqual(self.link.frames(), [])
        conn.dataReceived(F.Hello(versions=(1, 9), capabilities=("x", "mine")).encode())
        conn.flush()
        self.assertEqual(self.link.frames(), [F.Open(session.id, "office", "")])
        self.assertEqual(conn.version, 1)
        self.assertEqual(conn.capabilities, frozenset())

    def test_capabilitiesIntersect(self):
        conn = self.makeConnection(MuxConfig(capabilities=("mine", "both")),
                                   hello=F.Hello(capabilities=("both", "theirs")))
        self.assertEqual(conn.capabilities, {"both"})

    def test_highestCommonVersion(self):
        conn = self.makeConnection(MuxConfig(versions=(1, 2, 3)), hello=F.Hello(versions=(2, 3, 4)))
        self.assertEqual(conn.version, 3)

    def test_noCommonVersionSendsGoAway(self):
        conn = self.makeConnection(hello=None)
        session = conn.openSession("office", "", Receiver())
        failures = []
        session.whenOpen().addErrback(failures.append)
        conn.dataReceived(F.Hello(versions=(3, 4)).encode())
        [goaway] = self.link.frames()
        self.assertEqual(goaway.code, LinkError.VERSION_MISMATCH)
        self.assertIn("[3, 4]", goaway.text)
        self.assertTrue(self.link.lost)
        self.assertEqual(failures[0].value.reason, Reason.LINK_LOST)
        self.assertIsInstance(failures[0].value, LinkDown)

    def test_otherFrameBeforeHello(self):
        conn = self.makeConnection(hello=None)
        conn.dataReceived(F.Ping(bytes(8)).encode())
        [goaway] = self.link.frames()
        self.assertEqual(goaway.code, LinkError.PROTOCOL_ERROR)
        self.assertTrue(conn.closed)

    def test_badHello(self):
        conn = self.makeConnection(hello=None)
        conn.dataReceived(F.encodeHeader(F.HELLO, 0, 0, 4) + b"HTTP")
        [goaway] = self.link.frames()
        self.assertEqual(goaway.code, LinkError.BAD_HELLO)
        self.assertIn("magic", goaway.text)

    def test_secondHello(self):
        [goaway] = self.feed(F.Hello())
        self.assertEqual(goaway.code, LinkError.PROTOCOL_ERROR)


class OpenerTests(Base):
    def test_openAccepted(self):
        receiver = Receiver()
        session = self.conn.openSession("office", "192.0.2.1:5000", receiver)
        opened = []
        session.whenOpen().addCallback(opened.append)
        self.assertEqual(self.sent(), [F.Open(1, "office", "192.0.2.1:5000")])
        self.assertEqual(opened, [])
        self.feed(F.OpenOk(1))
        self.assertEqual(opened, [session])
        self.assertEqual(session.state, OPEN)
        self.assertEqual(session.sendWindow, PEER_HELLO.initialWindow)
        second = self.conn.openSession("office", "", Receiver())
        self.assertGreater(second.id, session.id)

    def test_openRefused(self):
        receiver = Receiver()
        session = self.conn.openSession("nosuch", "", receiver)
        failures = []
        session.whenOpen().addErrback(failures.append)
        self.feed(F.OpenRefused(session.id, Reason.UNKNOWN_PROFILE, "no profile 'nosuch'"))
        err = failures[0].value
        self.assertIsInstance(err, SessionRefused)
        self.assertEqual((err.reason, err.text), (Reason.UNKNOWN_PROFILE, "no profile 'nosuch'"))
        self.assertEqual(receiver.closed, [Reason.UNKNOWN_PROFILE])
        self.assertNotIn(session.id, self.conn.sessions)

    def test_controlBeforeOpenWaitsAndPausesProducer(self):
        producer = Producer()
        session = self.conn.openSession("office", "", Receiver())
        session.setLocalProducer(producer)
        self.assertTrue(producer.paused)
        session.sendControl(b"SCCRQ")
        self.assertEqual(self.sent(), [F.Open(session.id, "office", "")])
        self.assertEqual(self.feed(F.OpenOk(session.id)), [F.Control(session.id, b"SCCRQ")])
        self.assertFalse(producer.paused)

    def test_closeSendsCloseAndNotifiesOnce(self):
        session, receiver = self.openSession()
        session.close(Reason.NORMAL, "client hung up")
        session.close(Reason.NORMAL)
        self.assertEqual(self.sent(), [F.Close(session.id, Reason.NORMAL, "client hung up")])
        self.assertEqual(receiver.closed, [Reason.NORMAL])
        self.assertEqual(session.state, CLOSED)

    def test_peerClose(self):
        session, receiver = self.openSession()
        self.assertEqual(self.feed(F.Close(session.id, Reason.UPSTREAM_REFUSED, "x")), [])
        self.assertEqual(receiver.closed, [Reason.UPSTREAM_REFUSED])
        self.assertEqual(self.feed(F.Close(session.id, Reason.NORMAL)), [])  # crossed: ignored

    def test_openRequestedFromTheAcceptorIsRefused(self):
        [refused] = self.feed(F.Open(7, "office", ""))
        self.assertEqual((refused.session, refused.code), (7, Reason.NOT_ACCEPTING))

    def test_acceptorCannotOpen(self):
        conn = MuxConnection(False, self.clock)
        self.assertRaises(ValueError, conn.openSession, "x", "", Receiver())


class AcceptorTests(Base):
    isOpener = False

    def test_acceptWithDeferred(self):
        self.assertEqual(self.feed(F.Open(3, "office", "198.51.100.9:1234")), [])
        [(session, profile, client, d)] = self.requests
        self.assertEqual((session.state, profile, client), (PENDING, "office", "198.51.100.9:1234"))
        session.sendControl(b"early")  # waits for OPEN
        receiver = Receiver()
        d.callback(receiver)
        self.assertEqual(self.sent(), [F.OpenOk(3), F.Control(3, b"early")])
        self.feed(F.Control(3, b"SCCRQ"), F.Datagram(3, 77, 1, None, b"ppp"))
        self.assertEqual(bytes(receiver.control), b"SCCRQ")
        self.assertEqual(receiver.gre, [(77, 1, None, b"ppp")])

    def test_refuseWithReason(self):
        self.feed(F.Open(3, "nosuch", ""))
        self.requests[0][3].errback(SessionRefused(Reason.UNKNOWN_PROFILE, "nosuch"))
        self.assertEqual(self.sent(), [F.OpenRefused(3, Reason.UNKNOWN_PROFILE, "nosuch")])
        self.assertEqual(self.conn.sessions, {})

    def test_synchronousRaiseRefuses(self):
        def decide(session, profile, clientInfo):
            raise SessionRefused(Reason.NOT_PERMITTED, "not for you")
        self.conn = self.makeConnection(sessionRequested=decide)
        self.assertEqual(self.feed(F.Open(3, "office", "")),
                         [F.OpenRefused(3, Reason.NOT_PERMITTED, "not for you")])

    def test_unexpectedErrorRefusesAsInternal(self):
        def decide(session, profile, clientInfo):
            raise RuntimeError("boom")
        self.conn = self.makeConnection(sessionRequested=decide)
        [refused] = self.feed(F.Open(3, "office", ""))
        self.assertEqual(refused.code, Reason.INTERNAL_ERROR)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_peerClosesWhileDeciding(self):
        self.feed(F.Open(3, "office", ""))
        session, _, _, d = self.requests[0]
        self.feed(F.Close(3, Reason.NORMAL))
        self.assertEqual(self.cancelled, [session])  # so the RRP stops dialling
        self.assertEqual(session.state, CLOSED)

    def test_lateAcceptAfterCloseTellsTheReceiver(self):
        receiver = Receiver()

        def decide(session, profile, clientInfo):
            # The dial had already succeeded when the cancel came.
            return defer.Deferred(lambda d: d.callback(receiver))
        self.conn = self.makeConnection(sessionRequested=decide)
        self.feed(F.Open(3, "office", ""), F.Close(3, Reason.NORMAL))
        self.assertEqual(receiver.closed, [Reason.NORMAL])
        self.assertEqual(self.sent(), [])

    def test_tooManySessions(self):
        self.conn = self.makeConnection(MuxConfig(maxSessions=2))
        self.feed(F.Open(1, "a", ""), F.Open(2, "a", ""))
        [refused] = self.feed(F.Open(3, "a", ""))
        self.assertEqual((refused.session, refused.code), (3, Reason.TOO_MANY_SESSIONS))

    def test_malformedOpenRefusesOnlyThatSession(self):
        self.feed(F.Open(1, "a", ""))
        self.requests[0][3].callback(Receiver())
        self.sent()
        bad = F.encodeHeader(F.OPEN, 0, 2, 2) + b"\x05a"
        self.conn.dataReceived(bad)
        [refused] = self.link.frames()
        self.assertEqual((refused.session, refused.code), (2, Reason.MALFORMED_OPEN))
        self.assertEqual(self.conn.sessions[1].state, OPEN)
        self.assertFalse(self.conn.closed)

    def test_reusedSessionIdClosesTheLink(self):
        self.feed(F.Open(5, "a", ""))
        [goaway] = self.feed(F.Open(4, "a", ""))
        self.assertEqual(goaway.code, LinkError.PROTOCOL_ERROR)
        self.assertTrue(self.conn.closed)


class FlowControlTests(Base):
    def test_windowExhaustionPausesProducerAndUpdateResumes(self):
        producer = Producer()
        session, _ = self.openSession(producer=producer)
        self.assertEqual(producer.calls, ["pause", "resume"])  # paused until OPEN_OK
        del producer.calls[:]
        session.sendControl(b"a" * 600)
        session.sendControl(b"b" * 600)
        frames = self.sent()
        self.assertEqual(b"".join(f.data for f in frames), b"a" * 600 + b"b" * 400)
        self.assertTrue(producer.paused)
        self.assertEqual(session.sendWindow, 0)
        self.assertEqual(self.feed(F.WindowUpdate(session.id, 150)), [F.Control(session.id, b"b" * 150)])
        self.assertTrue(producer.paused)
        self.assertEqual(self.feed(F.WindowUpdate(session.id, 500)), [F.Control(session.id, b"b" * 50)])
        self.assertFalse(producer.paused)
        self.assertEqual(producer.calls, ["pause", "resume"])

    def test_chunksRespectPeerMaxPayload(self):
        conn = self.conn = self.makeConnection(hello=F.Hello(initialWindow=100000))
        session, _ = self.openSession()
        session.sendControl(bytes(40000))
        sizes = [len(f.data) for f in self.sent()]
        self.assertEqual(sizes, [16384, 16384, 40000 - 32768])
        self.assertIs(conn, self.conn)

    def test_oneStalledSessionDoesNotStallAnother(self):
        stalled, _ = self.openSession(producer=Producer())
        other, _ = self.openSession()
        stalled.sendControl(bytes(5000))  # far beyond the peer's 1000-byte window
        other.sendControl(b"hello")
        sent = self.sent()
        self.assertEqual(sum(len(f.data) for f in sent if f.session == stalled.id), 1000)
        self.assertIn(F.Control(other.id, b"hello"), sent)

    def test_creditReturnedAfterHalfTheWindow(self):
        session, receiver = self.openSession()  # our window: 100
        self.assertEqual(self.feed(F.Control(session.id, b"x" * 49)), [])
        self.assertEqual(self.feed(F.Control(session.id, b"y")), [F.WindowUpdate(session.id, 50)])
        self.assertEqual(session.recvWindow, 100)
        self.assertEqual(bytes(receiver.control), b"x" * 49 + b"y")

    def test_pausedReadingWithholdsCredit(self):
        session, receiver = self.openSession()
        session.pauseReading()
        self.assertEqual(self.feed(F.Control(session.id, b"x" * 100)), [])
        self.assertEqual(session.recvWindow, 0)
        session.resumeReading()
        self.assertEqual(self.sent(), [F.WindowUpdate(session.id, 100)])

    def test_windowViolationClosesOnlyThatSession(self):
        session, receiver = self.openSession()
        other, otherReceiver = self.openSession()
        [close] = self.feed(F.Control(session.id, b"x" * 101))
        self.assertEqual((close.session, close.code), (session.id, Reason.FLOW_CONTROL_ERROR))
        self.assertEqual(receiver.closed, [Reason.FLOW_CONTROL_ERROR])
        self.assertEqual(bytes(receiver.control), b"")
        self.feed(F.Control(other.id, b"fine"))
        self.assertEqual(bytes(otherReceiver.control), b"fine")

    def test_windowOverflowClosesTheSession(self):
        session, _ = self.openSession()
        [close] = self.feed(F.WindowUpdate(session.id, F.MAX_WINDOW))
        self.assertEqual(close.code, Reason.FLOW_CONTROL_ERROR)


class DataForSessionsNotOpenTests(Base):
    def test_controlForUnknownSessionIsAnsweredWithClose(self):
        session, receiver = self.openSession()
        [close] = self.feed(F.Control(99, b"x"))
        self.assertEqual((close.session, close.code), (99, Reason.NOT_OPEN))
        self.assertEqual(session.state, OPEN)

    def test_controlWhileOpeningClosesThatSession(self):
        receiver = Receiver()
        session = self.conn.openSession("office", "", receiver)
        self.sent()
        [close] = self.feed(F.Control(session.id, b"x"))
        self.assertEqual((close.session, close.code), (session.id, Reason.NOT_OPEN))
        self.assertEqual(receiver.closed, [Reason.NOT_OPEN])

    def test_greForUnknownSessionIsIgnoredAndCounted(self):
        session, receiver = self.openSession()
        self.assertEqual(self.feed(F.Datagram(99, 1, 1, None, b"x"), F.Datagram(99, 1, 2, None, b"x")), [])
        self.assertEqual(self.conn.stats.greIgnored["not_open"], 2)
        self.assertEqual(receiver.gre, [])

    def test_windowUpdateAndCloseForUnknownSessionIgnored(self):
        self.assertEqual(self.feed(F.WindowUpdate(42, 10), F.Close(42, 0)), [])
        self.assertFalse(self.conn.closed)

    def test_malformedGREDroppedSessionSurvives(self):
        session, receiver = self.openSession()
        self.conn.dataReceived(F.encodeHeader(F.GRE, F.GRE_HAS_SEQ, session.id, 3) + b"\x00\x01\x02")
        self.assertEqual(self.conn.stats.greIgnored["malformed"], 1)
        self.assertEqual(session.state, OPEN)

    def test_malformedWindowUpdateClosesTheSession(self):
        session, receiver = self.openSession()
        self.conn.dataReceived(F.encodeHeader(F.WINDOW_UPDATE, 0, session.id, 2) + b"\x00\x01")
        [close] = self.link.frames()
        self.assertEqual(close.code, Reason.PROTOCOL_ERROR)
        self.assertFalse(self.conn.closed)


class LinkErrorTests(Base):
    def test_unknownMandatoryTypeClosesTheLink(self):
        session, receiver = self.openSession()
        [goaway] = self.feed(F.UnknownFrame(0x33, 0, 0, b"?"))
        self.assertEqual(goaway.code, LinkError.UNKNOWN_FRAME_TYPE)
        self.assertIn("0x33", goaway.text)
        self.assertTrue(self.link.lost)
        self.assertEqual(receiver.closed, [Reason.LINK_LOST])

    def test_unknownIgnorableTypeIsIgnored(self):
        session, receiver = self.openSession()
        self.assertEqual(self.feed(F.UnknownFrame(0xC1, 0, session.id, b"?"),
                                   F.Control(session.id, b"after")), [])
        self.assertEqual(self.conn.stats.unknownFrames, 1)
        self.assertEqual(bytes(receiver.control), b"after")

    def test_oversizeLengthClosesTheLink(self):
        session, receiver = self.openSession()
        self.conn.dataReceived(F.encodeHeader(F.CONTROL, 0, session.id, 1 << 20))
        [goaway] = self.link.frames()
        self.assertEqual(goaway.code, LinkError.FRAME_TOO_LARGE)
        self.assertEqual(receiver.closed, [Reason.LINK_LOST])
        self.conn.dataReceived(F.Control(session.id, b"ignored").encode())
        self.assertEqual(self.link.frames(), [])

    def test_peerGoAway(self):
        session, receiver = self.openSession()
        self.assertEqual(self.feed(F.GoAway(LinkError.NO_ERROR, "restarting")), [])
        self.assertTrue(self.link.lost)
        self.assertEqual(receiver.closed, [Reason.LINK_LOST])

    def test_linkLostClosesAllSessions(self):
        receivers = [self.openSession()[1] for _ in range(3)]
        pending = self.conn.openSession("office", "", Receiver())
        failures = []
        pending.whenOpen().addErrback(failures.append)
        self.conn.linkLost("connection reset")
        self.assertEqual([r.closed for r in receivers], [[Reason.LINK_LOST]] * 3)
        self.assertEqual(failures[0].value.reason, Reason.LINK_LOST)
        self.assertIsInstance(failures[0].value, LinkDown)
        self.assertEqual(self.conn.sessions, {})
        self.assertRaises(LinkDown, self.conn.openSession, "office", "", Receiver())


class GRESendTests(Base):
    def test_sentAfterControlInOneWrite(self):
        session, _ = self.openSession()
        self.assertTrue(session.sendGRE(5, 1, None, b"g1"))
        session.sendControl(b"c1")
        self.conn.flush()
        [write] = self.link.writes
        self.assertEqual(F.FrameDecoder().frames(b"".join(write)),
                         [F.Control(session.id, b"c1"), F.Datagram(session.id, 5, 1, None, b"g1")])

    def test_flushedByTheClockOutsideDataReceived(self):
        session, _ = self.openSession()
        session.sendGRE(5, 1, None, b"g1")
        session.sendGRE(5, 2, None, b"g2")
        self.assertEqual(self.link.writes, [])
        self.clock.advance(0)
        self.assertEqual(len(self.link.writes), 1)

    def test_flushedAsAMarkedReadEnds(self):
        """Inside a read marked with routeproxy.turn (the GRE port's wake-up) nothing waits for
        the clock: the read's frames go out in one write as it ends, and then the clock has
        nothing left to flush."""
        session, _ = self.openSession()
        timers = list(self.clock.getDelayedCalls())  # the ping timer
        read = turn.of(self.clock)
        read.begin()
        try:
            session.sendGRE(5, 1, None, b"g1")
            session.sendGRE(5, 2, None, b"g2")
            self.assertEqual((self.link.writes, self.clock.getDelayedCalls()), ([], timers))
        finally:
            read.end()
        [write] = self.link.writes
        self.assertEqual(F.FrameDecoder().frames(b"".join(write)),
                         [F.Datagram(session.id, 5, 1, None, b"g1"), F.Datagram(session.id, 5, 2, None, b"g2")])
        session.sendGRE(5, 3, None, b"g3")  # outside a read: the clock again
        self.clock.advance(0)
        self.assertEqual(len(self.link.writes), 2)

    def test_droppedWhilePaused(self):
        session, _ = self.openSession()
        self.conn.pauseWriting()
        self.assertFalse(session.sendGRE(5, 1, None, b"x"))
        session.sendControl(b"never dropped")
        self.assertEqual(self.sent(), [F.Control(session.id, b"never dropped")])
        self.conn.resumeWriting()
        self.assertTrue(session.sendGRE(5, 2, None, b"x"))
        self.assertEqual(self.conn.stats.greDropped, {"paused": 1})

    def holdUnsent(self, size):
        """An open session, and the link holding *size* unsent bytes, written as the
        connection writes (unsent bytes grow only by its writes: the ceiling it keeps relies
        on it).  The bytes are not frames: the link only keeps them."""
        session, _ = self.openSession()
        self.clock.advance(0)
        self.link.peerReads = False
        self.conn._queue(bytes(size), control=True)
        self.clock.advance(0)
        self.link.peerReads = True
        return session

    def test_droppedOverWatermark(self):
        self.conn = self.makeConnection(MuxConfig(greWatermark=4000))
        session = self.holdUnsent(3000)
        self.assertEqual(self.link.buffered, 3000)
        results = [session.sendGRE(5, i, None, bytes(400)) for i in range(5)]
        self.assertEqual(results, [True, True, True, False, False])
        self.assertEqual(self.conn.stats.greDropped["watermark"], 2)
        self.link.buffered = 0
        self.conn.flush()
        self.assertTrue(session.sendGRE(5, 9, None, bytes(400)))

    def test_sendBufferCapSeenThroughGRETurns(self):
        """A flush asks the link only when the turn's sample plus what it wrote could be over
        maxSendBuffer: a peer that stops reading is still dropped once GRE fills its buffer."""
        self.conn = self.makeConnection(MuxConfig(greWatermark=1 << 30, maxSendBuffer=20000))
        session, _ = self.openSession()
        self.link.peerReads = False
        for turn in range(20):
            for seq in range(4):
                session.sendGRE(5, seq, None, bytes(400))
            self.clock.advance(0)
            if self.link.aborted:
                break
        self.assertTrue(self.link.aborted)
        self.assertEqual(self.conn.linkDrops["not_reading"], 1)
        self.assertGreater(self.link.buffered, 20000)
        self.assertLess(self.link.buffered, 20000 + 4 * 420)  # the turn that crossed it

    def test_watermarkSeesTheBufferDrainWithoutAFlush(self):
        """The send buffer is asked at most once per turn, not per packet nor per drop (issue
        13): a turn whose GRE was all dropped queues nothing, yet its end forgets the sample,
        so once the reactor has drained the buffer the next turn's packet goes."""
        self.conn = self.makeConnection(MuxConfig(greWatermark=4000))
        session = self.holdUnsent(5000)
        asked = self.link.asked
        self.assertFalse(session.sendGRE(5, 1, None, bytes(400)))
        self.link.buffered = 0  # the reactor wrote it out
        self.assertFalse(session.sendGRE(5, 2, None, bytes(400)))  # the turn's sample stands
        self.assertEqual(self.link.asked, asked + 1)
        self.assertEqual(self.link.writes[1:], [])
        self.clock.advance(0)  # the turn ends: nothing to write, the sample is forgotten
        self.assertEqual(self.link.writes[1:], [])
        self.assertTrue(session.sendGRE(5, 3, None, bytes(400)))
        self.assertTrue(session.sendGRE(5, 4, None, bytes(400)))
        self.assertEqual(self.link.asked, asked + 2)
        self.clock.advance(0)  # the flush
        self.assertEqual(self.conn.stats.greDropped["watermark"], 2)

    def test_theCeilingStartsAfreshOnceTheLinkIsReady(self):
        """TLS writes its handshake and tickets on its own, unseen by the ceiling: the peer's
        HELLO (the link is ready) forgets it, and the next turn asks the link."""
        self.conn = self.makeConnection(MuxConfig(greWatermark=8000), hello=None)
        self.assertIsNotNone(self.conn._unsentCeiling)   # our HELLO's flush asked the link
        self.conn.dataReceived(PEER_HELLO.encode())
        self.assertIsNone(self.conn._unsentCeiling)
        session, _ = self.openSession()
        self.clock.advance(0)
        asked = self.link.asked
        for seq in range(3):   # the light turns after it go by the fresh ceiling
            self.assertTrue(session.sendGRE(5, seq, None, bytes(400)))
            self.clock.advance(0)
        self.assertEqual(self.link.asked, asked)

    def test_watermarkNotAskedWhileTheCeilingLeavesRoom(self):
        """Unsent bytes grow only by the connection's writes: the last answer plus what was
        written since bounds them, and while that bound leaves the watermark room no turn asks
        the link (a system call per wake-up).  Near the watermark it asks again, and a drained
        buffer lets the packet through."""
        self.conn = self.makeConnection(MuxConfig(greWatermark=8000))
        session, _ = self.openSession()
        self.clock.advance(0)
        asked = self.link.asked
        for seq in range(4):   # four light turns of 420 bytes: 1 700 bytes, far below 8 000
            self.assertTrue(session.sendGRE(5, seq, None, bytes(400)))
            self.clock.advance(0)
        self.assertEqual(self.link.asked, asked)
        for seq in range(4, 30):   # the bound grows with every turn's writes until it nears
            self.assertTrue(session.sendGRE(5, seq, None, bytes(400)))   # the watermark
            self.clock.advance(0)
        self.assertGreater(self.link.asked, asked)
        self.assertLess(self.link.asked - asked, 26)
        self.link.peerReads = False   # now the peer stops reading: the bytes stay, and count
        sent = sum(session.sendGRE(5, seq, None, bytes(400)) for seq in range(30, 60)
                   if not self.clock.advance(0))
        self.assertGreater(self.conn.stats.greDropped["watermark"], 0)
        self.assertLess(self.link.buffered, 8000 + 500)
        self.assertEqual(sent, 30 - self.conn.stats.greDropped["watermark"])

    def test_droppedWhenNotOpenOrTooLarge(self):
        session = self.conn.openSession("office", "", Receiver())
        self.assertFalse(session.sendGRE(1, None, None, b"x"))
        self.feed(F.OpenOk(session.id))
        self.assertFalse(session.sendGRE(1, None, None, bytes(16384)))
        self.assertEqual(self.conn.stats.greDropped, {"not_open": 1, "too_large": 1})


class LivenessTests(Base):
    def test_pingMeasuresRtt(self):
        self.clock.advance(10)
        [ping] = self.sent()
        self.assertIsInstance(ping, F.Ping)
        self.clock.advance(0.25)
        self.feed(F.Pong(ping.data))
        self.assertEqual(self.conn.stats.rttLast, 0.25)
        self.assertEqual(self.conn.stats.rttSmoothed, 0.25)
        d = self.conn.ping()
        [ping2] = self.sent()
        self.clock.advance(1.25)
        rtts = []
        d.addCallback(rtts.append)
        self.feed(F.Pong(F.Pong(b"whatever").data), F.Pong(ping2.data))
        self.assertEqual(rtts, [1.25])
        self.assertEqual(self.conn.stats.rttSmoothed, 0.25 + (1.25 - 0.25) / 8)

    def test_answersPings(self):
        self.assertEqual(self.feed(F.Ping(b"12345678")), [F.Pong(b"12345678")])

    def test_deadPeerDetectedAfterTheTimeout(self):
        session, receiver = self.openSession()
        self.clock.advance(29)
        self.assertFalse(self.link.aborted)
        self.feed(F.Pong(b"xxxxxxxx"))  # any frame proves life
        self.clock.advance(29.5)
        self.assertFalse(self.link.aborted)
        self.clock.advance(0.5)
        self.assertTrue(self.link.aborted)
        self.assertEqual(receiver.closed, [Reason.LINK_LOST])

    def test_silentPeerWithoutHelloIsDead(self):
        self.makeConnection(MuxConfig(pingInterval=1, deadTimeout=3), hello=None)
        self.clock.advance(2.9)
        self.assertFalse(self.link.aborted)
        self.clock.advance(0.1)
        self.assertTrue(self.link.aborted)


class FuzzTests(unittest.SynchronousTestCase):
    """Random frame sequences never raise out of the connection and keep its table sane."""

    frame = st.one_of(
        st.builds(F.Open, st.integers(1, 6), st.sampled_from(["office", "x"]), st.just("c")),
        st.builds(F.OpenOk, st.integers(1, 6)),
        st.builds(F.OpenRefused, st.integers(1, 6), st.integers(0, 20), st.text(max_size=5)),
        st.builds(F.Close, st.integers(1, 6), st.integers(0, 20), st.just("")),
        st.builds(F.Control, st.integers(1, 6), st.binary(max_size=300)),
        st.builds(F.WindowUpdate, st.integers(1, 6), st.integers(1, F.MAX_WINDOW)),
        st.builds(F.Datagram, st.integers(1, 6), st.integers(0, 65535),
                  st.none() | st.integers(0, 2**32 - 1), st.none(), st.binary(max_size=20)),
        st.builds(F.Ping, st.binary(min_size=8, max_size=8)),
        st.builds(F.Pong, st.binary(min_size=8, max_size=8)),
        st.builds(F.UnknownFrame, st.integers(0x21, 0xFF), st.just(0), st.integers(0, 6),
                  st.binary(max_size=8)),
    )

    @settings(max_examples=200, deadline=None)
    @given(st.booleans(), st.lists(frame, max_size=30), st.binary(max_size=40))
    def test_randomFrames(self, isOpener, frames, garbage):
        clock = Clock()
        link = FakeLink()
        conn = MuxConnection(isOpener, clock, MuxConfig(initialWindow=500),
                             lambda s, p, c: Receiver())
        conn.start(link)
        conn.dataReceived(F.Hello().encode())
        if isOpener:
            for _ in range(3):
                conn.openSession("office", "", Receiver()).sendControl(b"x" * 700)
        for frame in frames:
            conn.dataReceived(frame.encode())
            clock.advance(1)
        conn.dataReceived(garbage)
        conn.flush()
        link.frames()  # what it wrote is well-formed
        if conn.closed:
            self.assertTrue(link.lost or link.aborted)
            self.assertEqual(conn.sessions, {})
        for session in conn.sessions.values():
            self.assertNotEqual(session.state, CLOSED)
            self.assertGreaterEqual(session.recvWindow, 0)
            self.assertGreaterEqual(session.sendWindow, 0)
