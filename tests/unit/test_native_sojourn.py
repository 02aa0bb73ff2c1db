"""The link's receive-queue gate (routeproxy/native/sojourn.c inside rp_link_read;
docs/gre-io.md "The link's receive queue").

Three things are checked: the C gate takes every decision the Python gate
(routeproxy.sojourn.SojournGate, the capture's) takes on the same sequences; over real TLS on
real TCP, reads whose bytes waited in the kernel get their GRE dropped as CoDel says, and
every frame either reaches pptpd's raw socket or is counted; and the loop's reads (the
reactor's poll in C) meet the same gate.
"""
import random
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from routeproxy import native
from routeproxy.calls import Call
from routeproxy.flows import Flow
from routeproxy.mux import frames as F
from routeproxy.mux.session import OPEN
from routeproxy.relay import RelaySession
from routeproxy import sojourn
from routeproxy.mux.linksocket import bufferingTransport
from routeproxy.sojourn import SojournGate
from tests.support.native import requireNative
from tests.unit import test_native_loop as loopTests
from tests.unit.test_native_tlsread import KEY, SID, TAG, Run, TLSReadTests

MODULE, REASON = native.load()


class ControlLawTests(unittest.TestCase):
    """The C gate against the Python one, step by step, on random sequences."""

    def setUp(self):
        if MODULE is None:
            raise unittest.SkipTest(REASON)

    def state(self, c):
        return (bool(c.dropping), None if c.above_since < 0 else c.above_since, c.episodes,
                c.count, c.drop_next if c.dropping else None)

    def pythonState(self, g):
        return (g.dropping, g.above_since, g.episodes, g.count,
                g.drop_next if g.dropping else None)

    def test_sameDecisions(self):
        lib, ffi = MODULE.lib, MODULE.ffi
        rng = random.Random(1723)
        for trial in range(40):
            target = rng.choice((0.001, 0.005, 0.02))
            c = ffi.new("struct rp_gate *")
            lib.rp_gate_init(c, target, 0.1)
            g = SojournGate(target, 0.1)
            now, decisions = 1.7e9, 0
            for step in range(400):
                now += rng.choice((0.0005, 0.003, 0.02, 0.09))
                threshold = g.drop_before(now)
                self.assertEqual(lib.rp_gate_drop_before(c, now), threshold)
                ages = [rng.expovariate(1 / (target * rng.choice((0.3, 2, 15))))
                        for _ in range(rng.randint(0, 6))]
                for age in ages:   # as GREPort drops the packets of a wake-up
                    if now - age < threshold:
                        threshold = g.dropped()
                        self.assertEqual(lib.rp_gate_dropped(c), threshold)
                        decisions += 1
                head = (now - ages[-1]) if ages else rng.choice((0.0, now - target * 3))
                g.observe(now, head)
                lib.rp_gate_observe(c, now, head)
                self.assertEqual(self.state(c), self.pythonState(g), f"trial {trial} step {step}")
            self.assertEqual(c.episodes, g.episodes)
        self.assertGreater(decisions, 0)   # (the sequences did reach the dropping state)


def gre(i, size=200):
    return F.encodeGRE(SID, TAG, i, None, bytes([i & 255]) * size)


@defer.inlineCallbacks
def endAndCollect(run):
    """A last control frame through, then every GRE pptpd got: [(call ID, seq)] in order."""
    yield run.send(run.peer.records(F.Control(SID, b"the end").encode()))
    yield run.until(lambda: run.receiver.events[-1][:2] == ("c", b"the end"), "the end")
    got, deadline = [], time.monotonic() + 5
    while True:
        got += [(int.from_bytes(p[4:8], "big") & 0xFFFF, int.from_bytes(p[8:12], "big"))
                for p in run.gre()]   # (key and seq present)
        if len(got) >= run.port.stats.sent or time.monotonic() > deadline:
            return got
        yield task.deferLater(reactor, 0.01, lambda: None)


class ReceiveQueueTests(TLSReadTests):
    """The RRP's end of a real link (test_native_tlsread's Run: C's TLS read, GRE sent to
    "pptpd" on a raw socket) whose reads are held back, so its bytes wait in the kernel."""

    BUFFER = 1024   # the link's read size here: a round's burst is ~4 reads

    @defer.inlineCallbacks
    def through(self, linkMaxSojourn, rounds, wait, perRound=20, native=True, behind=True):
        """*rounds* bursts of *perRound* GRE frames, each read *wait* s after it arrived
        (the socket not read meanwhile) by a daemon *behind* its link (a queue stands: see
        behindRead) or not (each round read whole): what reached pptpd, in order, and the
        Run."""
        run = Run(self, native, linkMaxSojourn=linkMaxSojourn, bufferSize=self.BUFFER)
        yield run.start()
        run.framesBefore = run.connection.stats.framesIn
        seq = 0
        for _ in range(rounds):
            data = run.peer.records(b"".join(gre(seq + i) for i in range(perRound)))
            yield (run.behindRead if behind else run.heldRead)(data, wait)
            seq += perRound
        run.tcp.startReading()
        got = yield endAndCollect(run)
        run.sent = seq
        run.seqs = [seqNo for _, seqNo in got]
        return run

    def counted(self, run):
        """Every frame reached pptpd or was counted as the gate's: nothing lost silently."""
        aged = run.connection.stats.greIgnored.get("sojourn", 0)
        self.assertEqual(len(run.seqs) + aged, run.sent)
        self.assertEqual(run.seqs, sorted(run.seqs))          # in order, none twice
        self.assertEqual(run.relaySession.greDropped, aged)
        self.assertEqual(run.connection.stats.framesIn - run.framesBefore, run.sent + 1)  # + end
        self.assertEqual(run.flows.snapshot()["sojourn_dropped"], aged)
        return aged

    def gate(self, run):
        return MODULE.lib.rp_link_gate(run.reader.state)

    @defer.inlineCallbacks
    def test_freshReadsDropNothing(self):
        run = yield self.through(0.005, rounds=15, wait=0)
        self.assertEqual(self.counted(run), 0)
        self.assertEqual(run.connection.snapshot()["receive_gate"],
                         {"target_ms": 5.0, "dropping": False, "episodes": 0})

    @defer.inlineCallbacks
    def test_standingQueueOverCeiling(self):
        """Reads 30 ms old against a 2 ms target (ceiling 20 ms): nothing goes for the first
        interval (100 ms: a burst), then every frame of such reads, counted; the episode
        ends with the first young read, after which everything goes again."""
        run = yield self.through(0.002, rounds=12, wait=0.03)
        aged = self.counted(run)
        gate = self.gate(run)
        self.assertEqual(gate.episodes, 1)
        self.assertFalse(gate.dropping)   # the last read (the end's) was young
        self.assertEqual(run.seqs[:20], list(range(20)))   # the first round: a burst, kept
        self.assertGreaterEqual(aged, 20 * 6)              # then whole rounds went
        self.assertEqual(run.connection.snapshot()["gre_ignored"], {"sojourn": aged})

    @defer.inlineCallbacks
    def test_readsThatEmptyTheQueueAreYoung(self):
        """The same old reads, but each round read whole: the queue empties every time, so
        none stands (RFC 8289: a queue left empty is under the target) and nothing goes."""
        run = yield self.through(0.002, rounds=12, wait=0.03, behind=False)
        self.assertEqual(self.counted(run), 0)
        self.assertEqual(len(run.seqs), run.sent)
        self.assertEqual(self.gate(run).episodes, 0)

    @defer.inlineCallbacks
    def test_standingQueueUnderCeiling(self):
        """Reads 20 ms old against a 10 ms target (ceiling 100 ms): one frame per due drop,
        interval/sqrt(count) apart (CoDel's law), not the whole read."""
        run = yield self.through(0.01, rounds=30, wait=0.02)
        aged = self.counted(run)
        gate = self.gate(run)
        self.assertEqual(gate.episodes, 1)
        self.assertEqual(aged, gate.count)   # each drop the one due
        self.assertGreater(aged, 0)
        self.assertLess(aged, 30)            # 600 frames, a handful dropped

    @defer.inlineCallbacks
    def test_honestCallBesideAFlood(self):
        """A call's flood makes the link's queue stand (reads 30 ms old, 2 ms target); a second
        call on the same link sends one frame a round.  The gate is per link: the honest
        call's frames in the flood's old reads go too, counted on its own session, and
        nothing closes; once the reads are young again every frame of it arrives."""
        run = Run(self, True, linkMaxSojourn=0.002, bufferSize=self.BUFFER)
        yield run.start()
        honest = RelaySession(None, None)
        honest.peerAddress, honest.localAddress = run.pptpd, run.source
        call = Call(None)
        call.pns_id, call.pac_id, call.local_id = TAG + 1, KEY + 1, 8
        flow = Flow(honest, call, run.session)
        self.assertTrue(run.reader.install(flow, run.port.senderFileno(run.source), KEY + 1))
        flow.installed = True
        sent = {KEY: 0, KEY + 1: 0}

        def burst(flood):
            frames = [gre(sent[KEY] + i) for i in range(flood)]
            frames.append(F.encodeGRE(SID, TAG + 1, sent[KEY + 1], None, b"honest"))
            sent[KEY] += flood
            sent[KEY + 1] += 1
            return run.peer.records(b"".join(frames))
        for _ in range(10):                     # the flood's standing queue
            yield run.behindRead(burst(40), 0.03)
        run.tcp.startReading()
        stood = sent[KEY + 1]
        for _ in range(10):                     # young reads: the honest call alone
            yield run.send(burst(0))
        got = {KEY: [], KEY + 1: []}
        for key, seqNo in (yield endAndCollect(run)):
            got[key].append(seqNo)
        self.assertGreater(run.relaySession.greDropped, 0)               # the flood thinned
        self.assertEqual(len(got[KEY]) + run.relaySession.greDropped, sent[KEY])
        self.assertEqual(len(got[KEY + 1]) + honest.greDropped, sent[KEY + 1])  # counted, its own
        self.assertEqual(got[KEY + 1][-10:], list(range(stood, stood + 10)))    # then all of it
        self.assertEqual(run.session.state, OPEN)
        self.assertFalse(run.connection.closed)

    @defer.inlineCallbacks
    def test_off(self):
        """--link-max-sojourn 0: old reads keep every frame; the socket stamps nothing."""
        run = yield self.through(0.0, rounds=8, wait=0.03)
        self.assertEqual(self.counted(run), 0)
        self.assertEqual(len(run.seqs), run.sent)
        self.assertIsNone(run.connection.snapshot()["receive_gate"])

    @defer.inlineCallbacks
    def test_twistedsReadHasNoGate(self):
        """Twisted's TLS read (no C read): no receive time, no gate, nothing dropped."""
        run = yield self.through(0.002, rounds=8, wait=0.03, native=False)
        self.assertEqual(self.counted(run), 0)
        self.assertEqual(len(run.seqs), run.sent)


class LoopGateTests(loopTests.LoopTestCase):
    """The link reads the loop makes in C (the LRP's, GRE to the client) meet the gate."""

    @defer.inlineCallbacks
    def rounds(self, frames, readSize=None):
        """5 rounds of *frames* GRE frames of 300 bytes from the far end, each waiting 30 ms
        in the LRP's socket before the loop reads it (in reads of *readSize*): (frames the
        client got, frames the gate dropped)."""
        yield self.start("loop", linkMaxSojourn=0.002)
        reader = self.lrp.nativeReader
        if readSize:   # the C read made again, reading this much
            bufferingTransport(self.lrp._link.transport).bufferSize = readSize
            reader.tls.uninstall()
            reader._tlsOf = None
            reader.watchTLS()
        (far,) = self.farSessions
        for i in range(5):
            for j in range(frames):
                far.sendGRE(loopTests.TAG, i * frames + j, None, b"x" * 300)
            # the mux sends a turn's frames at the turn's end (a call at once): after it, in
            # the same pass of the reactor's calls, the bytes wait in the LRP's socket
            yield task.deferLater(reactor, 0, time.sleep, 0.03)
            yield task.deferLater(reactor, 0.005, lambda: None)
            self.clientGRE()
        yield task.deferLater(reactor, 0.1, lambda: None)
        got = self.clientGRE()
        self.assertGreater(self.loop.linkReads, 0)    # the loop's C read the link
        return len(got), self.lrp.stats.greIgnored.get("sojourn", 0)

    @defer.inlineCallbacks
    def test_loopReadsDrop(self):
        """Reads that leave a queue behind (1 KB each, 45 KB a round) and 30 ms old, the
        gate's interval cut to 0.2 ms so that one round's drain outlasts it: the gate drops,
        each frame counted."""
        loopTests.skipUnlessUsable()
        self.patch(sojourn, "INTERVAL", 0.0002)
        got, aged = yield self.rounds(150, readSize=1024)
        self.assertGreater(aged, 0)
        self.assertEqual(got + aged, 750)
        self.assertGreaterEqual(MODULE.lib.rp_link_gate(self.lrp.nativeReader.state).episodes, 1)

    @defer.inlineCallbacks
    def test_loopReadsThatEmptyTheQueueAreYoung(self):
        """The same old rounds, each taken by one read that empties the socket: no queue
        stands, nothing is dropped, and the loop asked the clock for none of them."""
        loopTests.skipUnlessUsable()
        self.patch(sojourn, "INTERVAL", 0.0002)
        got, aged = yield self.rounds(10)
        self.assertEqual((got, aged), (50, 0))
        self.assertEqual(MODULE.lib.rp_link_gate(self.lrp.nativeReader.state).episodes, 0)
