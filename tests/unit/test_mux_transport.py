"""The link's socket transport, tuned by routeproxy.mux.linksocket: writes sent at once when
nothing waits (sendAtOnce), the producer paused only above its own limit (pauseAbove).

A real socket pair under a real Twisted transport where the kernel's behaviour is the point;
a recording socket where an error or a partial send must be forced."""
import errno
import socket

from twisted.internet import abstract, defer, reactor, task, tcp as twisted_tcp
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.trial import unittest

from routeproxy.mux.connection import MuxConfig
from routeproxy.mux.linksocket import pauseAbove, sendAtOnce
from tests.support.links import loopbackLink


class ScriptedSocket:
    """``send`` takes at most *take* bytes per call, or raises *error*; records the calls."""

    def __init__(self, take=None, error=None):
        self.take, self.error, self.sent = take, error, []

    def send(self, data):
        if self.error is not None:
            raise OSError(self.error, "scripted")
        n = len(data) if self.take is None else min(self.take, len(data))
        self.sent.append(bytes(data[:n]))
        return n


class QueueingTransport(abstract.FileDescriptor):
    """A Twisted transport with its real write queue and a scripted socket; ``startWriting``
    (Twisted's poll for writability) recorded."""

    def __init__(self, sock):
        abstract.FileDescriptor.__init__(self, reactor=MemoryReactor())
        self.socket = sock
        self.connected = True
        self.writers = None   # the times startWriting was called, once it was

    _aborting = False   # (tcp.Connection's)

    def startWriting(self):
        self.writers = (self.writers or []) + [self]

    def queued(self):
        return b"".join([self.dataBuffer[self.offset:]] + self._tempDataBuffer)


class SendAtOnceTests(unittest.SynchronousTestCase):
    def transport(self, **script):
        t = QueueingTransport(ScriptedSocket(**script))
        sendAtOnce(t)
        return t

    def test_idleWriteGoesToTheSocketNow(self):
        t = self.transport()
        t.write(b"hello")
        self.assertEqual((t.socket.sent, t.queued(), t.writers), ([b"hello"], b"", None))

    def test_whatTheSocketDoesNotTakeIsQueued(self):
        t = self.transport(take=2)
        t.write(b"hello")
        self.assertEqual((t.socket.sent, t.queued(), len(t.writers)), ([b"he"], b"llo", 1))

    def test_writesBehindQueuedBytesWaitTheirTurn(self):
        """Order: while anything is queued, a new write is queued behind it, never sent."""
        t = self.transport(take=2)
        t.write(b"first")
        t.socket.take = None
        t.write(b"second")
        self.assertEqual((t.socket.sent, t.queued()), ([b"fi"], b"rstsecond"))

    def test_errorsAreLeftToTheReactorsDoWrite(self):
        """A send error queues the bytes: the reactor's doWrite meets the error again and
        closes the connection as it always does."""
        for code in (errno.EAGAIN, errno.EPIPE, errno.ECONNRESET):
            t = self.transport(error=code)
            t.write(b"hello")
            self.assertEqual((t.queued(), len(t.writers)), (b"hello", 1))

    def test_closingTransportQueues(self):
        t = self.transport()
        t.disconnecting = True
        t.write(b"bye")
        self.assertEqual((t.socket.sent, t.queued()), ([], b"bye"))

    def test_appliedOnce(self):
        t = self.transport()
        sendAtOnce(t)
        t.write(b"x")
        self.assertEqual(t.socket.sent, [b"x"])

    def test_realSocketNoPollForWritability(self):
        """Over a real socket pair under Twisted's TCP transport, an idle write reaches the
        peer before any reactor iteration and leaves nothing registered for writing."""
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        a.setblocking(False)
        reactor = MemoryReactor()
        conn = twisted_tcp.Connection(a, None, reactor)
        conn.connected = True
        sendAtOnce(conn)
        conn.write(b"frames")
        self.assertEqual(b.recv(100), b"frames")
        self.assertEqual(reactor.getWriters(), [])


    def test_nothingSentOnceAborting(self):
        """An aborted transport sends nothing more (Twisted queues the write and the abort
        throws it away): the reset is not preceded by late bytes."""
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        a.setblocking(False)
        b.setblocking(False)
        conn = twisted_tcp.Connection(a, None, MemoryReactorClock())
        conn.connected = True
        sendAtOnce(conn)
        conn.abortConnection()
        conn.write(b"after the abort")
        self.assertRaises(BlockingIOError, b.recv, 100)


class AbortOverTLSTests(unittest.TestCase):
    """Over real mutual TLS: a link the mux aborts (dead or slow peer, a stale link on resume)
    is reset, not closed in order: TLS's close_notify, written as TLS aborts, must not reach
    the peer before the reset."""

    timeout = 20

    @defer.inlineCallbacks
    def test_anAbortedLinkSendsNoCloseNotify(self):
        lrp, server = yield loopbackLink(self, MuxConfig(), lambda *a: None)
        yield lrp.whenReady()
        yield task.deferLater(reactor, 0.05, lambda: None)
        [rrp] = list(server.connections)
        lrp.ping()   # a write through the link's writer, so sendAtOnce is in place
        yield task.deferLater(reactor, 0.05, lambda: None)
        serverTLS = rrp._link.transport
        arrived = []
        received = serverTLS.dataReceived
        serverTLS.dataReceived = lambda data: (arrived.append(len(data)), received(data))[1]
        lrp._dropSlowPeer("test")   # aborts the link
        yield rrp.whenLinkLost()
        yield lrp.whenLinkLost()
        self.assertEqual(arrived, [])


class PauseAboveTests(unittest.SynchronousTestCase):
    def test_pauseLimitIsItsOwnAndTheReadSizeStays(self):
        t = QueueingTransport(ScriptedSocket())
        readSize = t.bufferSize
        pauseAbove(t, 1 << 20)
        self.assertEqual(t.bufferSize, readSize)
        t._tempDataLen = 1 << 20
        self.assertFalse(t._isSendBufferFull())
        t._tempDataLen += 1
        self.assertTrue(t._isSendBufferFull())

    def test_aLimitBelowTwistedsOwnLeavesTwistedsOwn(self):
        t = QueueingTransport(ScriptedSocket())
        pauseAbove(t, 10)
        t._tempDataLen = 11
        self.assertFalse(t._isSendBufferFull())
        t._tempDataLen = t.bufferSize + 1
        self.assertTrue(t._isSendBufferFull())
