"""Version 2 "resume": sessions that outlive their link (docs/protocol.md s.10).

Two real MuxConnections (opener and acceptor) joined by an in-memory pipe that can be cut
with bytes in flight; time is a Clock.  Each test checks what a daemon relies on: the
control streams arrive whole, in order and once, across a cut; an unknown token, another
certificate name or the grace time running out close the sessions; a version 1 peer keeps
version 1 behaviour.
"""
import hashlib

from twisted.internet.task import Clock
from twisted.trial import unittest

from routeproxy.mux import frames as F
from routeproxy.mux.connection import MuxConfig, MuxConnection
from routeproxy.mux.frames import Reason
from routeproxy.mux.resume import ResumeTable, Resumer
from routeproxy.mux.session import CLOSED, DETACHED, OPEN
from routeproxy.testing import RecordingSessionReceiver

RESUME = MuxConfig(initialWindow=4096, capabilities=(F.RESUME_CAPABILITY,))


class PipeEnd:
    """One end's link: what it writes waits in ``outbox`` until the pipe delivers it."""

    def __init__(self):
        self.outbox = []
        self.lost = self.aborted = False

    def writeFrames(self, chunks):
        self.outbox.append(b"".join(chunks))

    def sendBufferSize(self):
        return 0

    def deliveryRate(self):
        return None

    def loseConnection(self):
        self.lost = True

    def abortConnection(self):
        self.aborted = True


class Pipe:
    def __init__(self, clock, opener, acceptor):
        self.clock, self.opener, self.acceptor = clock, opener, acceptor
        self.openerEnd, self.acceptorEnd = PipeEnd(), PipeEnd()
        opener.start(self.openerEnd)
        acceptor.start(self.acceptorEnd)
        self.pump()

    def pump(self, rounds=50):
        for _ in range(rounds):
            self.clock.advance(0)
            moved = False
            for end, peer in ((self.openerEnd, self.acceptor), (self.acceptorEnd, self.opener)):
                data, end.outbox = b"".join(end.outbox), []
                if data and not peer.closed:
                    peer.dataReceived(data)
                    moved = True
            if not moved:
                return

    def cut(self):
        """Both TCP ends reset: what was in flight is lost."""
        self.openerEnd.outbox = self.acceptorEnd.outbox = []
        self.opener.linkLost("connection reset")
        self.acceptor.linkLost("connection reset")


class ResumeTests(unittest.SynchronousTestCase):

    def setUp(self):
        self.clock = Clock()
        self.resumer = Resumer(self.clock, grace=30)
        self.table = ResumeTable(self.clock, grace=30)
        self.accepted = []

    def sessionRequested(self, session, profile, clientInfo):
        receiver = RecordingSessionReceiver()
        self.accepted.append((session, receiver))
        return receiver

    def link(self, openerName="rrp", acceptorName="lrp1", openerConfig=RESUME,
             acceptorConfig=RESUME, table=None):
        opener = MuxConnection(True, self.clock, openerConfig, peerName=openerName,
                               resume=self.resumer)
        acceptor = MuxConnection(False, self.clock, acceptorConfig, self.sessionRequested,
                                 peerName=acceptorName, resume=table or self.table)
        return Pipe(self.clock, opener, acceptor)

    def openSessions(self, pipe, n):
        out = []
        for i in range(n):
            receiver = RecordingSessionReceiver()
            session = pipe.opener.openSession("office", f"client{i}", receiver)
            pipe.pump()
            self.assertEqual(session.state, OPEN)
            far, farReceiver = self.accepted[-1]
            out.append((session, receiver, far, farReceiver))
        return out

    def test_negotiatesResumeAndAToken(self):
        pipe = self.link()
        self.assertEqual(pipe.opener.version, 2)
        self.assertTrue(pipe.opener.resumable and pipe.acceptor.resumable)
        self.assertEqual(len(pipe.opener.resumeToken), 16)
        self.assertEqual(pipe.opener.resumeToken, pipe.acceptor.resumeToken)
        self.assertNotEqual(self.link().acceptor.resumeToken, pipe.acceptor.resumeToken)

    def test_streamsSurviveACutWithBytesInFlight(self):
        pipe = self.link()
        sessions = self.openSessions(pipe, 3)
        sentUp, sentDown = bytearray(), bytearray()
        for round_ in range(40):
            for i, (near, _, far, _) in enumerate(sessions):
                up = bytes([i, round_]) * 150
                down = bytes([round_, i, 7]) * 100
                near.sendControl(up)
                far.sendControl(down)
                if i == 0:
                    sentUp += up
                    sentDown += down
            if round_ % 3 == 1:   # the last two rounds are in flight at the cut
                pipe.pump()
        # The last turn's frames (and every unacknowledged byte before them) are lost.
        self.clock.advance(0)
        pipe.cut()
        self.assertLess(len(sessions[0][3].control), len(sentUp), "nothing was in flight")
        for near, receiver, far, farReceiver in sessions:
            self.assertEqual((near.state, far.state), (DETACHED, DETACHED))
            self.assertEqual((receiver.events, farReceiver.events), (["detached"], ["detached"]))
            self.assertLessEqual(len(near._unacked), RESUME.initialWindow)
        self.assertEqual(self.resumer.snapshot()["detached_sessions"], 3)
        self.assertEqual(self.table.snapshot()["detached_sessions"], 3)
        near0 = sessions[0][0]
        near0.sendControl(b"during the gap")   # held, sent after the resume
        sentUp += b"during the gap"
        self.clock.advance(2.5)

        again = self.link()
        for near, receiver, far, farReceiver in sessions:
            self.assertEqual((near.state, far.state), (OPEN, OPEN))
            self.assertIs(near.connection, again.opener)
            self.assertIs(far.connection, again.acceptor)
            self.assertEqual(receiver.events, ["detached", "resumed"])
        _, receiver0, _, farReceiver0 = sessions[0]
        self.assertEqual(hashlib.sha256(farReceiver0.control).hexdigest(),
                         hashlib.sha256(sentUp).hexdigest())
        self.assertEqual(hashlib.sha256(receiver0.control).hexdigest(),
                         hashlib.sha256(sentDown).hexdigest())
        self.assertEqual(self.resumer.resumesDone, 1)
        self.assertEqual(self.table.sessionsResumed, 3)
        self.assertEqual(self.resumer.snapshot()["gap_last_s"], 2.5)
        # New sessions go on with larger ids.
        [(newSession, _, _, _)] = self.openSessions(again, 1)
        self.assertGreater(newSession.id, max(s[0].id for s in sessions))

    def test_unknownTokenClosesEverySessionAndNewOnesWork(self):
        pipe = self.link()
        [(near, receiver, far, farReceiver)] = self.openSessions(pipe, 1)
        pipe.cut()
        other = ResumeTable(self.clock)   # a restarted RRP, or another one behind a balancer
        again = self.link(table=other)
        self.assertEqual(near.state, CLOSED)
        self.assertEqual(receiver.closed, [Reason.LINK_LOST])
        self.assertIn("UNKNOWN_TOKEN", near.closeText)
        self.assertEqual(self.resumer.resumesRefused, 1)
        self.assertEqual(other.resumesRefused, 1)
        self.openSessions(again, 1)
        self.clock.advance(31)   # the first RRP's copy expires
        self.assertEqual(farReceiver.closed, [Reason.LINK_LOST])
        self.assertEqual(self.table.snapshot()["detached_sessions"], 0)

    def test_tokenIsBoundToTheCertificateName(self):
        pipe = self.link()
        [(near, receiver, far, farReceiver)] = self.openSessions(pipe, 1)
        pipe.cut()
        self.link(acceptorName="lrp2")
        self.assertEqual(near.state, CLOSED)
        self.assertIn("WRONG_PEER", near.closeText)
        self.assertEqual(far.state, DETACHED, "a foreign LRP must not end another's sessions")

    def test_graceExpiryClosesBothEnds(self):
        pipe = self.link()
        [(near, receiver, far, farReceiver)] = self.openSessions(pipe, 1)
        pipe.cut()
        self.clock.advance(29.9)
        self.assertEqual((near.state, far.state), (DETACHED, DETACHED))
        self.clock.advance(0.2)
        self.assertEqual((near.state, far.state), (CLOSED, CLOSED))
        self.assertEqual((receiver.closed, farReceiver.closed), ([Reason.LINK_LOST], [Reason.LINK_LOST]))
        self.assertEqual(self.resumer.sessionsExpired, 1)

    def test_openerSawTheLossFirst(self):
        """The acceptor still thinks the old link is up: the RESUME ends it there first."""
        pipe = self.link()
        [(near, receiver, far, farReceiver)] = self.openSessions(pipe, 1)
        far.sendControl(b"in flight")
        self.clock.advance(0)
        pipe.acceptorEnd.outbox = []
        pipe.opener.linkLost("the LRP's side timed out")
        self.assertEqual(far.state, OPEN)
        again = self.link()
        self.assertTrue(pipe.acceptorEnd.aborted)
        self.assertEqual((near.state, far.state), (OPEN, OPEN))
        self.assertIs(far.connection, again.acceptor)
        self.assertEqual(bytes(receiver.control), b"in flight")

    def test_goAwayEndsSessionsAtOnce(self):
        pipe = self.link()
        [(near, receiver, far, farReceiver)] = self.openSessions(pipe, 1)
        pipe.acceptor.goAway(F.LinkError.NO_ERROR, "stopping")
        pipe.pump()
        self.assertEqual((near.state, far.state), (CLOSED, CLOSED))

    def test_sessionClosedDuringTheGapIsEndedAtTheOtherEnd(self):
        pipe = self.link()
        [(near, _, far, farReceiver)] = self.openSessions(pipe, 1)
        pipe.cut()
        near.close(Reason.NORMAL, "client hung up")
        self.link()
        self.assertEqual(far.state, CLOSED)
        self.assertEqual(farReceiver.closed, [Reason.LINK_LOST])

    def test_acknowledgmentsBoundWhatIsKept(self):
        pipe = self.link()
        [(near, _, far, farReceiver)] = self.openSessions(pipe, 1)
        for _ in range(100):
            near.sendControl(b"x" * 1000)
            pipe.pump()
        self.assertEqual(len(farReceiver.control), 100000)
        self.assertLessEqual(len(near._unacked), RESUME.initialWindow)
        self.assertEqual(near.sentOffset - near.ackedOffset, len(near._unacked))


class RetryTests(unittest.SynchronousTestCase):

    def test_fastWhileSessionsWait(self):
        clock = Clock()
        resumer = Resumer(clock)
        self.assertEqual(resumer.retryDelay(1, 1.5), 1.5)
        resumer.detached = object()
        self.assertEqual([resumer.retryDelay(a, 9.0) for a in (1, 2, 3, 4, 9)], [0, 0.25, 0.75, 1.0, 1.0])
        self.assertEqual(resumer.retryDelay(3, 0.1), 0.1)


class FailoverTests(unittest.SynchronousTestCase):
    """FailoverEndpoint: the addresses in order, the first that answers."""

    def endpoint(self, outcome, tried, label):
        from twisted.internet import defer

        class Endpoint:
            def connect(self, factory):
                tried.append(label)
                return defer.succeed(label) if outcome else defer.fail(ConnectionRefusedError(label))
        return Endpoint()

    def test_triesInOrder(self):
        from routeproxy.failover import FailoverEndpoint
        tried, results = [], []
        endpoint = FailoverEndpoint([self.endpoint(False, tried, "a"), self.endpoint(True, tried, "b"),
                                     self.endpoint(True, tried, "c")], ["a", "b", "c"])
        endpoint.connect(None).addCallback(results.append)
        self.assertEqual((tried, results, endpoint.current), (["a", "b"], ["b"], "b"))

    def test_allFail(self):
        from routeproxy.failover import FailoverEndpoint
        tried, failures = [], []
        endpoint = FailoverEndpoint([self.endpoint(False, tried, "a"), self.endpoint(False, tried, "b")],
                                    ["a", "b"])
        endpoint.connect(None).addErrback(failures.append)
        self.assertEqual(tried, ["a", "b"])
        self.assertTrue(failures[0].check(ConnectionRefusedError))


class VersionOnePeerTests(unittest.SynchronousTestCase):
    """A peer that offers only version 1 gets version 1: no token, sessions end with the link."""

    def setUp(self):
        self.clock = Clock()
        self.accepted = []

    def sessionRequested(self, session, profile, clientInfo):
        receiver = RecordingSessionReceiver()
        self.accepted.append(receiver)
        return receiver

    def check(self, openerConfig, acceptorConfig):
        resumer = Resumer(self.clock)
        opener = MuxConnection(True, self.clock, openerConfig, peerName="rrp", resume=resumer)
        acceptor = MuxConnection(False, self.clock, acceptorConfig, self.sessionRequested,
                                 peerName="lrp1", resume=ResumeTable(self.clock))
        pipe = Pipe(self.clock, opener, acceptor)
        self.assertEqual(opener.version, 1)
        self.assertFalse(opener.resumable or acceptor.resumable)
        self.assertIsNone(opener.resumeToken)
        receiver = RecordingSessionReceiver()
        session = opener.openSession("office", "", receiver)
        pipe.pump()
        session.sendControl(b"x" * 3000)
        pipe.pump()
        self.assertEqual(len(self.accepted[0].control), 3000)
        self.assertEqual(session._unacked, b"", "a version 1 link keeps no replay buffer")
        pipe.cut()
        self.assertEqual(session.state, CLOSED)
        self.assertEqual((receiver.closed, self.accepted[0].closed), ([Reason.LINK_LOST], [Reason.LINK_LOST]))
        self.assertIsNone(resumer.detached)

    def test_versionOneAcceptor(self):
        self.check(RESUME, MuxConfig(versions=(1,), initialWindow=4096))

    def test_versionOneOpener(self):
        self.check(MuxConfig(versions=(1,), initialWindow=4096), RESUME)

    def test_windowUpdateOfVersionOneHasNoAck(self):
        frame = F.WindowUpdate(1, 100)
        self.assertEqual(len(frame.payload()), 4)
        self.assertEqual(F.FrameDecoder().frames(frame.encode()), [frame])
        acked = F.WindowUpdate(1, 100, 123456789012)
        self.assertEqual(F.FrameDecoder().frames(acked.encode()), [acked])


class FrameTests(unittest.SynchronousTestCase):

    def test_roundTrips(self):
        for frame in (F.Token(bytes(range(16))), F.Resume(b"t" * 16, [(1, 5), (7, 2 ** 40)]),
                      F.Resumed(F.ResumeResult.OK, [(1, 0)]),
                      F.Resumed(F.ResumeResult.UNKNOWN_TOKEN, (), "expired")):
            self.assertEqual(F.FrameDecoder().frames(frame.encode()), [frame])

    def test_shortTokenIsALinkError(self):
        with self.assertRaises(F.MalformedFrame):
            F.FrameDecoder().frames(F.Token(b"short").encode())

    def test_resumeFrameWithoutTheCapabilityClosesTheLink(self):
        clock = Clock()
        conn = MuxConnection(False, clock, MuxConfig(), lambda *a: RecordingSessionReceiver(), resume=ResumeTable(clock))
        end = PipeEnd()
        conn.start(end)
        conn.dataReceived(F.Hello(versions=(1, 2)).encode() + F.Resume(b"t" * 16).encode())
        self.assertTrue(conn.closed)
        self.assertTrue(end.lost)
