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

from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from routeproxy.mux import queuelimit
from routeproxy.mux.connection import MuxConnection
from routeproxy.mux.linksocket import (
    NativeTLSWriter, StampedRead, bufferedBytes, bufferingTransport, kernelUnsent, limitUnsent, noDelay,
    pauseAbove, turnWriter,
)


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
        connection = self.connection
        if connection.nativeReader is None:   # (else C reads the link, with its own gate)
            # the link's receive gate on Twisted's read: its reads stamped by the kernel
            connection.stampedRead = StampedRead.over(self.transport, connection,
                                                      connection.config.linkMaxSojourn)
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

    def writeNative(self, module, data, length):
        """*length* bytes of frames at the cdata *data*, written to the link in C now
        (linksocket.NativeTLSWriter): how many its TLS took, or None when the link is not
        idle Twisted TLS over a socket (nothing was written: the caller takes the Python path)."""
        native = self.idleNativeWriter(module)
        return None if native is None else native.write(data, length)

    def idleNativeWriter(self, module):
        """The link's NativeTLSWriter when C may write to it now (idle Twisted TLS over a
        socket), else None; made once per transport."""
        if self._lost:
            return None
        transport = self.transport
        if transport is not self._nativeOf:
            self._nativeOf, self._native = transport, NativeTLSWriter.over(module, transport)
        native = self._native
        return native if native is not None and native.idle() else None

    _nativeOf = None      # the transport _native writes to
    _native = None

    _bufferOf = None      # the transport _buffering was found under
    _buffering = None     # the transport that holds our unsent bytes, or None

    def sendBufferSize(self):
        # Asked once per turn: the transport chain is walked once per transport.
        transport = self.transport
        if transport is not self._bufferOf:
            self._bufferOf = transport
            self._buffering = bufferingTransport(transport)
        t = self._buffering
        return 0 if t is None else bufferedBytes(t) + kernelUnsent(t)

    def deliveryRate(self):
        """The TCP socket's latest delivery rate sample (routeproxy.mux.queuelimit), or None."""
        if self.transport is not self._bufferOf:
            self.sendBufferSize()   # finds the socket transport
        sock = getattr(self._buffering, "socket", None)
        return None if sock is None else queuelimit.deliveryRate(sock)

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
    linkFlows = None   # routeproxy.flows.LinkFlows: each connection's link read in C

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
        if self.linkFlows is not None:   # --gre-capture native
            connection.nativeReader = self.linkFlows.reader(connection)
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
