"""The thin Twisted side of the mux: a Protocol that only moves bytes, and factories.

:class:`MuxProtocol` feeds received bytes to its
:class:`~routeproxy.mux.connection.MuxConnection` (``protocol.connection``) and is
that connection's *link*: it writes the frames of one reactor turn with one
``writeSequence``, reports the transport's send-buffer size, and registers
itself as a streaming producer on its transport so that pauseProducing /
resumeProducing switch GRE dropping on and off (GRE is never queued; writes are
never retried in a loop).

Factories:

- ``MuxClientFactory(config=None, clock=None, peerNameOf=None)`` for the LRP
  (the opener; use it with ClientService; ``protocol.connection.openSession``).
- ``MuxServerFactory(sessionRequested, config=None, clock=None, peerNameOf=None)``
  for the RRP; ``sessionRequested(session, profile, clientInfo)`` returns the
  receiver (or a Deferred of it) to accept, or raises / fails with
  ``SessionRefused(reason, text)`` to refuse.

``peerNameOf(transport) -> str`` (e.g. ``routeproxy.tls.peerName``) is called
once the TLS handshake completes and names the peer in logs and in
``connection.peerName``.  ``factory.connections`` holds the live connections.
"""
import collections
import fcntl
import inspect
import socket
import struct

from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol
from twisted.logger import Logger
from zope.interface import implementer

from routeproxy.mux.connection import MuxConnection


def _owns(t, name):
    """*t* has *name* itself (instance or class), not through a forwarding ``__getattr__``."""
    try:
        inspect.getattr_static(t, name)
    except AttributeError:
        return False
    return True


def _bufferingTransport(transport):
    """The socket transport under *transport* (through TLS) that buffers writes, or None.

    The TLS wrapper (a ProtocolWrapper) forwards unknown attributes to the transport under
    it through ``__getattr__``; were it taken for the socket, every read of the buffer would
    pay a failed look-up and a forwarded one (measured: 13% of the whole path's time).
    """
    t = transport
    for _ in range(4):
        if t is None:
            return None
        if _owns(t, "_tempDataLen") and _owns(t, "dataBuffer"):
            return t
        t = getattr(t, "transport", None)
    return None


def _bufferedBytes(t):
    return len(t.dataBuffer) - getattr(t, "offset", 0) + t._tempDataLen


def _socketBufferSize(transport):
    """Bytes waiting in the socket transport under *transport* (through TLS), or 0."""
    t = _bufferingTransport(transport)
    return 0 if t is None else _bufferedBytes(t)


def noDelay(transport):
    """Turn Nagle off on the TCP connection under *transport* (through TLS), if there is one."""
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        try:
            setter(True)
        except OSError:
            pass


_INT = struct.Struct("i")
_INT_ZERO = bytes(_INT.size)
SIOCOUTQNSD = 0x894B  # Linux <linux/sockios.h>: bytes in the send queue not sent yet


def _kernelUnsent(t):
    """Bytes written to the TCP socket under the socket transport *t* and not sent yet
    (SIOCOUTQNSD; 0 without a socket or where the ioctl does not exist).

    TCP_NOTSENT_LOWAT only delays writability: a write made without waiting for it (the
    mux's sendAtOnce) is taken up to the whole send buffer, megabytes.  Counting these bytes
    keeps the GRE watermark a bound on all unsent bytes, ours and the kernel's.
    """
    sock = getattr(t, "socket", None)
    if sock is None:
        return 0
    try:
        return _INT.unpack(fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, _INT_ZERO))[0]
    except (OSError, ValueError):
        return 0


TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


def limitUnsent(transport, limit):
    """Let at most *limit* unsent bytes wait in the kernel under *transport* (TCP_NOTSENT_LOWAT).

    Past it the socket takes no more, so the backlog stays in Twisted's buffer, where the
    GRE watermark sees it and drops GRE (counted) instead of queueing seconds of it in the
    kernel's send buffer (autotuned up to megabytes).  0 leaves the kernel's default.
    """
    t = _bufferingTransport(transport)
    sock = getattr(t, "socket", None)
    if limit and sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, limit)
        except OSError:
            pass


def turnWriter(transport):
    """``write(chunks)`` for one reactor turn's frames: straight into TLS, not aggregated.

    Twisted's TLS transport (``BufferingTLSTransport``) gathers small writes and encrypts them
    on the next reactor turn: the mux already writes one turn's frames at once, so that adds a
    turn of latency and copies every byte twice more (``b"".join``, then ``data + b""``, then
    another join); py-spy put 19% of the LRP's samples at 1400 bytes under it.  Anything the
    aggregator still holds goes first, so the byte order is kept.  None for other transports
    (they get ``writeSequence``).  The socket under it sends at once (:func:`sendAtOnce`).
    """
    if isinstance(transport, BufferingTLSTransport):
        tcp = _bufferingTransport(transport)
        if tcp is not None:
            sendAtOnce(tcp, transport)

        def write(chunks):
            transport._aggregator.flush()
            TLSMemoryBIOProtocol.write(transport, b"".join(chunks))
        return write
    return None


def sendAtOnce(tcp, tlsProtocol=None):
    """Make *tcp* (a Twisted socket transport) send a write at once when nothing waits.

    Twisted queues every write and sends it on the reactor's next iteration, after asking the
    poller for writability and then taking it back: two ``epoll_ctl`` and one more iteration
    (its clock reads and context wrappers) per write.  With nothing queued, the bytes go to
    the socket now; what it does not take (a full buffer, an error) is queued as before, so
    the order is kept and the reactor's own ``doWrite`` meets any error and closes the usual
    way.  An abort is silent as before: once *tlsProtocol* (the TLS above *tcp*) or the socket
    is aborting, writes go to Twisted's queue, which the abort throws away, so the
    close_notify TLS writes as it aborts never precedes the reset.
    """
    if getattr(tcp, "_sendsAtOnce", False):
        return
    queue = tcp.write   # Twisted's own (bound) write
    sock = tcp.socket

    def write(data):
        if (not tcp._tempDataLen and len(tcp.dataBuffer) == tcp.offset and tcp.connected
                and not tcp.disconnecting and not tcp._writeDisconnecting and not tcp._aborting
                and not (tlsProtocol is not None and tlsProtocol._aborted) and data):
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0  # (EAGAIN, or an error doWrite will meet again)
            if sent == len(data):
                return
            data = data[sent:]
        queue(data)
    tcp.write = write
    tcp._sendsAtOnce = True


def pauseAbove(transport, size):
    """Let the socket transport under *transport* pause its producer only above *size* bytes.

    Its pause drops every GRE frame (``paused``) until the buffer is empty again; at Twisted's
    64 KiB, below the GRE watermark, one slow read at the far end dropped milliseconds of GRE
    at 1400 bytes.  Above the watermark the watermark decides frame by frame.  Twisted counts
    the bytes already sent from its current block too (up to ``SEND_LIMIT`` plus what was
    joined to it), hence a multiple of the watermark, not the watermark itself.

    Twisted's ``bufferSize`` is also the size of every socket read: raised to a megabyte, each
    read allocated (mmap), shrank (mremap) and freed (munmap) a fresh megabyte, three system
    calls and a page fault per read.  So the pause test is given its own limit and the read
    size stays Twisted's.
    """
    t = _bufferingTransport(transport)
    if t is not None and size > t.bufferSize:
        t._isSendBufferFull = lambda: len(t.dataBuffer) + t._tempDataLen > size


@implementer(IPushProducer, IHandshakeListener)
class MuxProtocol(Protocol):
    log = Logger(namespace="routeproxy.mux")

    def __init__(self, connection, peerNameOf=None):
        self.connection = connection
        self.peerNameOf = peerNameOf
        self._lost = False
        self._registered = False

    def connectionMade(self):
        # Frames of one turn already go out in one write; Nagle would only hold them back.
        noDelay(self.transport)
        limitUnsent(self.transport, self.connection.config.unsentLimit)
        pauseAbove(self.transport, 4 * self.connection.config.greWatermark)
        self.transport.registerProducer(self, True)
        self._registered = True
        if self.factory is not None and hasattr(self.factory, "connections"):
            self.factory.connections.add(self.connection)
        self.connection.start(self)

    def handshakeCompleted(self):
        self._namePeer()

    def _namePeer(self):
        if self.connection.peerName is None and self.peerNameOf is not None:
            try:
                self.connection.peerName = self.peerNameOf(self.transport)
            except Exception:
                self.log.failure("mux: cannot name the peer")

    def dataReceived(self, data):
        if self.connection.peerName is None:
            self._namePeer()
        self.connection.dataReceived(data)

    def connectionLost(self, reason):
        self._lost = True
        if self.factory is not None and hasattr(self.factory, "connections"):
            self.factory.connections.discard(self.connection)
        self.connection.linkLost(reason.getErrorMessage())

    # --- the link the connection writes through -------------------------------

    def writeFrames(self, chunks):
        if not self._lost:
            transport = self.transport
            if transport is not self._writerOf:
                self._writerOf, self._writer = transport, turnWriter(transport)
            if self._writer is None:
                transport.writeSequence(chunks)
            else:
                self._writer(chunks)

    _writerOf = None      # the transport _writer writes to
    _writer = None

    _bufferOf = None      # the transport _buffering was found under
    _buffering = None     # the transport that holds our unsent bytes, or None

    def sendBufferSize(self):
        # Asked once per turn: the transport chain is walked once per transport.
        transport = self.transport
        if transport is not self._bufferOf:
            self._bufferOf = transport
            self._buffering = _bufferingTransport(transport)
        t = self._buffering
        return 0 if t is None else _bufferedBytes(t) + _kernelUnsent(t)

    def loseConnection(self):
        # A registered producer would make TLS wait for ever before close_notify.
        if self._registered and not self._lost:
            self._registered = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    def abortConnection(self):
        self.transport.abortConnection()

    # --- IPushProducer: the transport's backpressure -------------------------

    def pauseProducing(self):
        self.connection.pauseWriting()

    def resumeProducing(self):
        self.connection.resumeWriting()

    def stopProducing(self):
        pass  # connectionLost follows


class MuxFactory(Factory):
    protocol = MuxProtocol
    isOpener = None

    def __init__(self, config=None, clock=None, sessionRequested=None, peerNameOf=None,
                 resume=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.config = config
        self.resume = resume   # routeproxy.mux.resume: ResumeTable / Resumer, or None
        self.clock = clock
        self.sessionRequested = sessionRequested
        self.peerNameOf = peerNameOf
        self.connections = set()
        self.linkDrops = collections.Counter()   # links dropped by reason, all connections

    def buildProtocol(self, addr):
        connection = MuxConnection(self.isOpener, self.clock, self.config,
                                   self.sessionRequested, resume=self.resume)
        connection.linkDrops = self.linkDrops
        protocol = self.protocol(connection, self.peerNameOf)
        protocol.factory = self
        return protocol


class MuxClientFactory(MuxFactory):
    """The LRP end: opens sessions."""

    isOpener = True

    def __init__(self, config=None, clock=None, peerNameOf=None, resume=None):
        super().__init__(config, clock, None, peerNameOf, resume)


class MuxServerFactory(MuxFactory):
    """The RRP end: accepts sessions through *sessionRequested*."""

    isOpener = False

    def __init__(self, sessionRequested, config=None, clock=None, peerNameOf=None, resume=None):
        super().__init__(config, clock, sessionRequested, peerNameOf, resume)
