"""The link's receive gate where Twisted reads the link (routeproxy.mux.linksocket.StampedRead,
docs/gre-io.md "The link's receive queue"): no native module, ``--gre-capture pcap`` or ``raw``.

Over real mutual TLS on real TCP on the loopback: the receiving end is the mux server as the
daemon builds it (MuxServerFactory over ``reactor.listenSSL`` with routeproxy.tls, no native
link read), the sending end a TLS peer the test drives record by record and segment by
segment (test_native_tlsread's Peer: pyOpenSSL on memory BIOs over a plain TCP socket).  A
daemon that cannot keep up is played by the reactor not reading the link's socket for a
while (``stopReading``, a sleep, ``startReading``), so the bytes wait in the kernel's receive
queue with their receive stamps.  The session's receiver is a recording fake with the relay
session's ``datagramAged`` count; RelaySession's own is checked on its own.
"""
import socket
import struct
import time

from twisted.internet import defer, reactor
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.tcp import Connection
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from routeproxy import certs, tls
from routeproxy.mux import frames as F
from routeproxy.mux.connection import MuxConfig
from routeproxy.mux.linksocket import SO_TIMESTAMPNS, StampedRead, bufferingTransport
from routeproxy.mux.protocol import MuxServerFactory
from routeproxy.mux.session import OPEN
from routeproxy.relay import DROP_LINK_SOJOURN, RelaySession
from routeproxy.stats import DropCounter
from routeproxy.testing import RecordingSessionReceiver
from tests.support.links import loopbackLink
from tests.unit.test_native_tlsread import ServerEnd, pyOpenSSLClient

RRP, LRP = "rrp.mux.test", "lrp.mux.test"
SID, TAG = 1, 0x4242


class AgeCountingReceiver(RecordingSessionReceiver):
    """The session's frames in order (``order``: ("g", seq) / ("c", bytes)), and the GRE the
    gate dropped (``aged``, as RelaySession.datagramAged counts its ``greDropped``)."""

    def __init__(self):
        super().__init__()
        self.order = []
        self.aged = 0

    def controlReceived(self, data):
        self.order.append(("c", bytes(data)))
        super().controlReceived(data)

    def datagramReceived(self, callTag, seq, ack, payload):
        self.order.append(("g", seq))
        super().datagramReceived(callTag, seq, ack, payload)

    def datagramAged(self, n):
        self.aged += n


def gre(i, size=200):
    return F.encodeGRE(SID, TAG, i, None, bytes([i & 255]) * size)


class Link(ServerEnd):
    """The receiving end (the server, Twisted's read and TLS, *linkMaxSojourn*) and the Peer."""

    def __init__(self, case, linkMaxSojourn, bufferSize=None):
        self.case, self.linkMaxSojourn = case, linkMaxSojourn
        self.bufferSize = bufferSize   # the socket's read size (None: Twisted's)

    @defer.inlineCallbacks
    def start(self):
        case = self.case
        paths = certs.write_lab_certs(case.mktemp(), RRP, [LRP])
        self.receiver = AgeCountingReceiver()
        self.config = config = MuxConfig(pingInterval=60.0, deadTimeout=120.0,
                                         linkMaxSojourn=self.linkMaxSojourn)
        factory = MuxServerFactory(lambda *a: self.receiver, config, reactor,
                                   peerNameOf=tls.peerName)
        yield self.accept(factory, paths, pyOpenSSLClient(paths))
        case.addCleanup(self.abort)
        self.tls = self.connection._link.transport
        self.tcp = bufferingTransport(self.tls)
        if self.bufferSize:
            self.tcp.bufferSize = self.bufferSize
        yield self.peer.handshake()
        hello = F.Hello(F.PROTOCOL_VERSIONS, config.maxPayload, config.initialWindow, 60, 120, ())
        yield self.send(self.peer.records(hello.encode() + F.Open(SID, "office", "1").encode()))
        yield self.until(lambda: SID in self.connection.sessions
                         and self.connection.sessions[SID].state == OPEN, "the session open")
        self.session = self.connection.sessions[SID]
        self.framesBefore = self.connection.stats.framesIn


class ReceiveGateTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def through(self, linkMaxSojourn, rounds, wait, perRound=20, behind=True):
        """*rounds* rounds of *perRound* GRE frames and one control frame each, read *wait* s
        after their bytes arrived by a server *behind* its link (reads of 1 KB, a queue
        standing behind each: Link.behindRead) or not (each round read whole); then one
        young control frame.  The Link."""
        link = Link(self, linkMaxSojourn, bufferSize=1024)
        yield link.start()
        seq = 0
        for r in range(rounds):
            frames = [gre(seq + i) for i in range(perRound)]
            frames.insert(perRound // 2, F.Control(SID, b"round %d" % r).encode())
            yield (link.behindRead if behind else link.heldRead)(link.peer.records(b"".join(frames)),
                                                                 wait)
            seq += perRound
        link.tcp.startReading()
        yield link.send(link.peer.records(F.Control(SID, b"the end").encode()))
        yield link.until(lambda: link.receiver.control.endswith(b"the end"), "the end")
        link.sent, link.rounds = seq, rounds
        link.seqs = [s for kind, s in link.receiver.order if kind == "g"]
        return link

    def counted(self, link):
        """Every GRE frame reached the receiver or was counted as the gate's, every control
        frame arrived in order and the session and link stayed up: the frames the gate
        dropped."""
        connection, receiver = link.connection, link.receiver
        aged = connection.stats.greIgnored.get("sojourn", 0)
        self.assertEqual(len(link.seqs) + aged, link.sent)
        self.assertEqual(link.seqs, sorted(set(link.seqs)))           # in order, none twice
        self.assertEqual(receiver.aged, aged)                          # the session's count
        self.assertEqual(link.session.greIn, link.sent)                # read, all of them
        self.assertEqual(connection.stats.framesIn - link.framesBefore,
                         link.sent + link.rounds + 1)
        controls = [data for kind, data in receiver.order if kind == "c"]
        self.assertEqual(controls, [b"round %d" % r for r in range(link.rounds)] + [b"the end"])
        self.assertEqual(link.session.state, OPEN)
        self.assertFalse(connection.closed)
        self.assertEqual(receiver.closed, [])
        return aged

    @defer.inlineCallbacks
    def test_standingQueueOverCeiling(self):
        """Reads 30 ms old against a 2 ms target (ceiling 20 ms): nothing goes for the first
        interval (a burst), then every GRE frame of such reads, counted, the control frames
        among them delivered; the first young read ends the episode."""
        link = yield self.through(0.002, rounds=12, wait=0.03)
        aged = self.counted(link)
        gate = link.connection.stampedRead.gate
        self.assertEqual(gate.episodes, 1)
        self.assertFalse(gate.dropping)                    # the end's read was young
        self.assertEqual(link.seqs[:20], list(range(20)))  # the first read: a burst, kept
        self.assertGreaterEqual(aged, 20 * 6)              # then whole reads went
        snapshot = link.connection.snapshot()
        self.assertEqual(snapshot["gre_ignored"], {"sojourn": aged})
        self.assertEqual(snapshot["receive_gate"],
                         {"target_ms": 2.0, "dropping": False, "episodes": 1})
        self.assertGreater(link.connection.stampedRead.reads, link.rounds)

    @defer.inlineCallbacks
    def test_standingQueueUnderCeiling(self):
        """Reads 20 ms old against a 10 ms target (ceiling 100 ms): one frame per due drop,
        interval/sqrt(count) apart (CoDel's law), not whole reads."""
        link = yield self.through(0.01, rounds=30, wait=0.02)
        aged = self.counted(link)
        gate = link.connection.stampedRead.gate
        self.assertEqual(gate.episodes, 1)
        self.assertEqual(aged, gate.count)   # each drop the one due
        self.assertGreater(aged, 0)
        self.assertLess(aged, 30)            # of 600 frames, a handful

    @defer.inlineCallbacks
    def test_readsThatEmptyTheQueueAreYoung(self):
        """The same old rounds, each read whole: the queue empties every time, none stands
        (RFC 8289), nothing goes."""
        link = yield self.through(0.002, rounds=12, wait=0.03, behind=False)
        self.assertEqual(self.counted(link), 0)
        self.assertEqual(link.connection.stampedRead.gate.episodes, 0)

    @defer.inlineCallbacks
    def test_freshReadsDropNothing(self):
        link = yield self.through(0.005, rounds=15, wait=0)
        self.assertEqual(self.counted(link), 0)
        self.assertEqual(link.connection.snapshot()["receive_gate"],
                         {"target_ms": 5.0, "dropping": False, "episodes": 0})
        self.assertTrue(link.connection.stampedRead.installed)

    @defer.inlineCallbacks
    def test_off(self):
        """--link-max-sojourn 0: Twisted's own read, no stamps asked, old reads keep every
        frame."""
        link = yield self.through(0.0, rounds=8, wait=0.03)
        self.assertEqual(self.counted(link), 0)
        self.assertEqual(len(link.seqs), link.sent)
        self.assertIsNone(link.connection.stampedRead)
        self.assertNotIn("doRead", link.tcp.__dict__)
        self.assertEqual(link.tcp.socket.getsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS), 0)
        self.assertIsNone(link.connection.snapshot()["receive_gate"])


class RelayCountTests(unittest.TestCase):
    def test_datagramAged(self):
        """The relay session counts a frame the gate dropped as the C read's drops are
        counted (flows.LinkReader._aged): its gre_dropped, the relay's link_sojourn drops and
        their rate-limited line."""
        lines = []
        globalLogPublisher.addObserver(lines.append)
        self.addCleanup(globalLogPublisher.removeObserver, lines.append)
        relay = type("Relay", (), {})()
        relay.drops = DropCounter()
        session = RelaySession(None, relay)
        session.datagramAged()
        session.datagramAged(40)
        self.assertEqual(session.greDropped, 41)
        self.assertEqual(relay.drops[DROP_LINK_SOJOURN], 41)
        said = [e for e in lines if e.get("reason") == DROP_LINK_SOJOURN]
        self.assertEqual(len(said), 1)   # (rate-limited: one line for them all)
        self.assertEqual(said[0]["verb"], "dropped")


class StampedReadTests(unittest.TestCase):
    """The stamped read against Twisted's own: the same bytes up, the same end."""

    timeout = 60

    @defer.inlineCallbacks
    def both(self, scenario):
        """*scenario(link)* with the stamped read (a gate that never drops: young reads) and
        with Twisted's: ``(stamped, twisted)`` of what it returned, the frames delivered and
        how the link ended."""
        results = []
        for target in (0.005, 0.0):
            link = Link(self, target)
            yield link.start()
            self.assertEqual(link.connection.stampedRead is not None, bool(target))
            outcome = yield scenario(link)
            yield link.until(lambda: link.connection.linkGone or link.receiver.control.endswith(
                b"the end"), "the end")
            results.append((outcome, link.receiver.order, link.connection.stats.framesIn,
                            link.connection.stats.bytesIn, link.connection.closeReason,
                            getattr(link.connection._link, "lostWith", None)))
            self.assertEqual(link.connection.stats.greIgnored, {})
        stamped, twisted = results
        self.assertEqual(stamped, twisted)
        return stamped

    @defer.inlineCallbacks
    def test_partialRecordsAndLargeReads(self):
        """Records cut across segments anywhere and more than one read's worth (64 KiB) at
        once: the same frames, in the same order."""
        @defer.inlineCallbacks
        def scenario(link):
            frames = b"".join(gre(i, size=1400) for i in range(120))
            frames += F.Control(SID, b"the end").encode()
            data = link.peer.records(frames, sizes=(5000, 777, 16384))
            yield link.send(data[:50000], cuts=(1, 7, 300, 4321, 20000))
            yield link.heldRead(data[50000:], 0.001)   # the rest in one go: several reads
            return len(data)
        self.assertGreater((yield self.both(scenario))[0], 2 * 65536)

    @defer.inlineCallbacks
    def test_eof(self):
        """FIN from the peer (no close_notify): CONNECTION_DONE, as Twisted's read says."""
        @defer.inlineCallbacks
        def scenario(link):
            yield link.send(link.peer.records(F.Control(SID, b"before").encode()))
            link.peer.sock.shutdown(socket.SHUT_WR)
            yield link.until(lambda: link.connection.linkGone, "the link's end")
        yield self.both(scenario)

    @defer.inlineCallbacks
    def test_reset(self):
        """RST from the peer: CONNECTION_LOST, as Twisted's read says."""
        @defer.inlineCallbacks
        def scenario(link):
            yield link.send(link.peer.records(F.Control(SID, b"before").encode()))
            link.peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                      struct.pack("ii", 1, 0))
            link.peer.sock.close()
            yield link.until(lambda: link.connection.linkGone, "the link's end")
        yield self.both(scenario)

    @defer.inlineCallbacks
    def test_closeNotify(self):
        """close_notify, then FIN: the TLS end Twisted's TLS makes of it, unchanged."""
        @defer.inlineCallbacks
        def scenario(link):
            yield link.send(link.peer.records(F.Control(SID, b"before").encode()))
            link.peer.engine.shutdown()
            link.peer.sock.sendall(link.peer._out())
            yield link.read()
            link.peer.sock.shutdown(socket.SHUT_WR)
            yield link.until(lambda: link.connection.linkGone, "the link's end")
        yield self.both(scenario)

    @defer.inlineCallbacks
    def test_returns(self):
        """What doRead returns called directly: nothing queued (EAGAIN) None, EOF
        CONNECTION_DONE, a reset CONNECTION_LOST; Twisted's doRead the same."""
        @defer.inlineCallbacks
        def scenario(link):
            link.tcp.stopReading()
            returned = [link.tcp.doRead()]                              # nothing queued
            link.peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                      struct.pack("ii", 1, 0))
            link.peer.sock.close()
            time.sleep(0.05)
            returned.append(link.tcp.doRead())                          # the reset
            returned.append(link.tcp.doRead())                          # then: EOF
            link.tcp.startReading()
            yield link.until(lambda: link.connection.linkGone, "the link's end")
            return returned
        returned = (yield self.both(scenario))[0]
        self.assertEqual(returned, [None, CONNECTION_LOST, CONNECTION_DONE])

    @defer.inlineCallbacks
    def test_fin(self):
        """EOF read straight: CONNECTION_DONE."""
        @defer.inlineCallbacks
        def scenario(link):
            link.tcp.stopReading()
            link.peer.sock.shutdown(socket.SHUT_WR)
            time.sleep(0.02)
            returned = link.tcp.doRead()
            link.tcp.startReading()
            yield link.until(lambda: link.connection.linkGone, "the link's end")
            return returned
        self.assertEqual((yield self.both(scenario))[0], CONNECTION_DONE)


class InstallTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_bothEnds(self):
        """The LRP's end (a client endpoint: a wrapping protocol under TLS) and the RRP's get
        the stamped read, on the instance, over Twisted's own doRead; not over another."""
        lrp, server = yield loopbackLink(self, MuxConfig(), lambda *a: RecordingSessionReceiver(),
                                         RRP, LRP)
        ends = [lrp]

        def over():
            lrp.goAway(0, "test over")
            return defer.gatherResults([c.whenLinkLost() for c in ends])
        self.addCleanup(over)
        yield lrp.whenReady()
        ends += list(server.connections)
        self.assertEqual(len(ends), 2)
        for connection in ends:
            read = connection.stampedRead
            self.assertTrue(read is not None and read.installed)
            tcp = bufferingTransport(connection._link.transport)
            self.assertIs(type(tcp).doRead, Connection.doRead)
            self.assertEqual(tcp.socket.getsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS), 1)
            self.assertIsNone(StampedRead.over(connection._link.transport, connection, 0.005))
        session = lrp.openSession("office", "1", RecordingSessionReceiver())
        yield session.whenOpen()
        session.sendControl(b"up")
        yield ends[1].sessions[session.id].receiver.whenControl(2)
        self.assertGreater(ends[1].stampedRead.reads, 0)
