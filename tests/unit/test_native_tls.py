"""The link's TLS write in C (docs/fastpath.md step 3b; rp_tls_send, linksocket.
NativeTLSWriter, MuxConnection.writeNative) over real mutual TLS and real sockets: what C
writes reaches a real pyOpenSSL/Twisted TLS peer intact and in order with the control frames
Python writes before and after it; each condition under which it must not touch the link
takes the Python path (nothing written by C); what the socket does not take is queued in
Twisted and arrives in order; an SSL_write error leaves its records to be sent and the rest
to Python.  Without the built module these skip with load()'s reason, except under CI.
"""
import os
import socket

from OpenSSL import SSL
from twisted.internet import defer, reactor, task
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial import unittest

from routeproxy import native
from routeproxy.mux import frames as F
from routeproxy.mux.linksocket import NativeTLSWriter, bufferedBytes, bufferingTransport
from tests.unit.test_mux_tls import TLSLinkTestCase

MODULE, REASON = native.load()
TAG = 0x4242


def skipWithoutModule():
    if MODULE is None:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"CI=true and {REASON}")
        raise unittest.SkipTest(REASON)


class OrderReceiver:
    """A session's control bytes and GRE in the order they arrived: ("c", bytes), ("g", seq)."""

    def __init__(self):
        self.events = []

    def controlReceived(self, data):
        self.events.append(("c", bytes(data)))

    def datagramReceived(self, callTag, seq, ack, payload):
        self.events.append(("g", seq, payload))

    def sessionClosed(self, reason):
        pass

    def control(self):
        return b"".join(e[1] for e in self.events if e[0] == "c")

    def gre(self):
        return [e[1:] for e in self.events if e[0] == "g"]


class NativeTLSWriteTests(TLSLinkTestCase):

    @defer.inlineCallbacks
    def setUp(self):
        skipWithoutModule()
        yield TLSLinkTestCase.setUp(self)
        self.receiver = None
        self.session = self.lrp.openSession("office", "1", OrderReceiver())
        yield self.session.whenOpen()
        self.link = self.lrp._link
        self.tls = self.link.transport
        self.tcp = bufferingTransport(self.tls)
        self.seq = 0
        self.sent = []    # what the server must receive, in order: ("c", bytes) / ("g", seq, payload)

    def sessionRequested(self, session, profile, clientInfo):
        self.receiver = OrderReceiver()
        return self.receiver

    def frames(self, n, size=1400):
        """n GRE frames of the session, as the pump builds them: (cdata, length, n)."""
        data = b""
        for _ in range(n):
            payload = bytes([self.seq % 251]) * size
            data += F.encodeGRE(self.session.id, TAG, self.seq, None, payload)
            self.sent.append(("g", self.seq, payload))
            self.seq += 1
        return MODULE.ffi.from_buffer("uint8_t[]", data), len(data), n

    def writeNative(self, n, size=1400):
        """As FlowTable.end: greRoom (the turn's sample), then writeNative; the rest queued."""
        self.lrp.greRoom()
        data, length, frames = self.frames(n, size)
        written = self.lrp.writeNative(MODULE, data, length, frames)
        if written < length:
            self.lrp.queueFrames(MODULE.ffi.buffer(data + written, length - written)[:], frames)
        return written, length

    def control(self, text):
        self.session.sendControl(text)
        self.sent.append(("c", text))

    @defer.inlineCallbacks
    def arrived(self):
        """Everything sent has reached the server's session; its events, in order."""
        want = len(self.sent)
        for _ in range(500):
            if self.receiver is not None and len(self.receiver.events) >= want:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        # control chunks may arrive coalesced or split: compare the byte stream between GRE
        got, expected = self.squash(self.receiver.events), self.squash(self.sent)
        self.assertEqual(len(got), len(expected))
        self.assertEqual(got, expected)

    @staticmethod
    def squash(events):
        out = []
        for e in events:
            if e[0] == "c" and out and out[-1][0] == "c":
                out[-1] = ("c", out[-1][1] + e[1])
            else:
                out.append(tuple(e))
        return out

    def assertPythonPath(self, n=4):
        before = (self.lrp.stats.framesOut, self.lrp.stats.bytesOut)
        written, length = self.writeNative(n)
        self.assertEqual(written, 0)
        self.assertEqual((self.lrp.stats.framesOut, self.lrp.stats.bytesOut), before)
        self.assertEqual(self.lrp._greFrames, n)  # queued for the turn's end

    # -- the C path ---------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_framesArriveInOrderBetweenControl(self):
        """Control written by Python, GRE written by C, control again: in order, intact, and
        counted as the Python path counts its own."""
        self.control(b"before")
        self.lrp.flush()
        framesOut, bytesOut = self.lrp.stats.framesOut, self.lrp.stats.bytesOut
        written, length = self.writeNative(10)
        self.assertEqual(written, length)            # all by C ...
        self.assertEqual(self.lrp._greFrames, 0)     # ... nothing queued for Python
        self.assertEqual(bufferedBytes(self.tcp), 0)  # ... and on the socket at once
        self.assertEqual(self.lrp.stats.framesOut, framesOut + 10)
        self.assertEqual(self.lrp.stats.bytesOut, bytesOut + length)
        written2, length2 = self.writeNative(3, size=7)   # a second pump call in the turn
        self.assertEqual(written2, length2)
        self.control(b"after")
        self.lrp.flush()
        yield self.arrived()

    @defer.inlineCallbacks
    def test_theTurnsSampleGrowsByWhatCWrote(self):
        """The watermark's unsent ceiling counts C's bytes as flush counts the mux's own."""
        self.lrp.greRoom()
        sample = self.lrp._unsent
        written, length = self.writeNative(20)
        self.assertEqual(written, length)
        self.assertGreaterEqual(self.lrp._unsent, sample + length)
        room, _, _ = self.lrp.greRoom()
        self.assertLessEqual(room, self.config.greWatermark - sample - length)
        self.lrp.flush()
        self.assertGreaterEqual(self.lrp._unsentCeiling, sample + length)
        yield self.arrived()

    @defer.inlineCallbacks
    def test_partialSendQueuedInTwistedInOrder(self):
        """With the peer not reading, what the socket does not take of C's records goes to
        Twisted's queue; later writes wait behind it (Python path) and all arrive in order."""
        serverTCP = bufferingTransport(list(self.serverFactory.connections)[0]._link.transport)
        serverTCP.stopReading()
        serverTCP.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.config.greWatermark = 1 << 40    # (so greRoom does not matter here)
        self.config.maxSendBuffer = 1 << 40
        for _ in range(200):
            written, length = self.writeNative(16)
            self.assertEqual(written, length)     # SSL_write took it all: C wrote it
            if bufferedBytes(self.tcp):
                break
            self.lrp.flush()
        self.assertGreater(bufferedBytes(self.tcp), 0, "the socket took everything")
        self.lrp.flush()
        self.control(b"behind the queue")
        self.assertPythonPath()       # Twisted holds bytes: the next pump call queues
        self.lrp.flush()
        serverTCP.startReading()
        yield self.arrived()

    # -- the fallbacks: nothing written by C ---------------------------------------------------

    @defer.inlineCallbacks
    def test_pendingMuxFramesTakeThePythonPath(self):
        self.control(b"queued first")
        self.assertPythonPath()
        self.lrp.flush()
        yield self.arrived()

    @defer.inlineCallbacks
    def test_aggregatorHoldingBytesTakesThePythonPath(self):
        ping = F.Ping(b"12345678").encode()
        self.tls.write(ping)               # BufferingTLSTransport's aggregator holds it
        self.assertTrue(self.tls._aggregator._buffer)
        self.assertPythonPath()
        self.lrp.flush()
        yield self.arrived()

    @defer.inlineCallbacks
    def test_twistedsBufferTakesThePythonPath(self):
        """Bytes in Twisted's socket buffer (not sent yet) go first: the Python path."""
        write = self.tcp.write
        self.tcp.write = self.tcp._queueWrite    # Twisted's own: queued, sent on doWrite
        try:
            TLSMemoryBIOProtocol.write(self.tls, F.Ping(b"abcdefgh").encode())
        finally:
            self.tcp.write = write
        self.assertGreater(bufferedBytes(self.tcp), 0)
        self.assertPythonPath()
        self.lrp.flush()
        yield self.arrived()

    def test_closingLinkTakesThePythonPath(self):
        self.tls.loseConnection()
        self.assertTrue(self.tls.disconnecting)
        self.assertEqual(self.link.writeNative(MODULE, *self.frames(2)[:2]), None)

    def test_abortedLinkTakesThePythonPath(self):
        self.tls.abortConnection()
        self.assertTrue(self.tls._aborted)
        self.assertEqual(self.link.writeNative(MODULE, *self.frames(2)[:2]), None)

    def test_lostTLSTakesThePythonPath(self):
        self.tls._lostTLSConnection = True   # (as after a TLS error, before the close)
        try:
            self.assertEqual(self.link.writeNative(MODULE, *self.frames(2)[:2]), None)
        finally:
            self.tls._lostTLSConnection = False
        self.sent.clear()


class SSLWriteErrorTests(unittest.TestCase):
    """SSL_write refusing (here: a client SSL* not through its handshake, which wants to read
    the server's answer first): C says so, takes nothing, and still sends the records the
    write left in the BIO (the ClientHello) rather than losing them."""

    def setUp(self):
        skipWithoutModule()

    def test_refusedWriteSendsTheBIOAndTakesNothing(self):
        context = SSL.Context(SSL.TLS_METHOD)
        connection = SSL.Connection(context, None)
        connection.set_connect_state()
        ours, peer = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(peer.close)
        ours.setblocking(False)

        class TLS:
            _tlsConnection = connection

        class TCP:
            socket = ours
            queued = []

            def write(self, data):
                self.queued.append(data)

        writer = NativeTLSWriter(MODULE, TLS(), TCP())
        data = b"x" * 100
        self.assertEqual(writer.write(MODULE.ffi.from_buffer("uint8_t[]", data), len(data)), 0)
        hello = peer.recv(65536)
        self.assertEqual(hello[0], 0x16)          # a TLS handshake record: the ClientHello
        self.assertEqual(TCP.queued, [])
