"""Fakes for tests and benchmarks, one per declared interface (as twisted.pair.testing).

Nothing here touches a network: captures are fed from lists, raw sockets record what they
are asked to send, and a GRE port records packets instead of sending them.  The daemons'
tests and benchmarks/pathbench.py use these same fakes.
"""
import collections
import errno
import socket

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from routeproxy import gre
from routeproxy.capture import DLT_EN10MB, ICapture, IGRESystem, IRawSocket, packedAddress
from routeproxy.greport import IGREPort, IGREReceiver
from routeproxy.mux import frames
from routeproxy.mux.session import ISessionReceiver



@implementer(ICapture)
class MemoryCapture:
    """A capture fed from a list in memory (fake: no kernel, no filter applied)."""

    def __init__(self, datalink=DLT_EN10MB, batch=32):
        self._datalink = datalink
        self.batch = batch  # frames one read() returns at most, like one pcap buffer; None: all
        self.frames = collections.deque()
        self.filters = []
        self.readCalls = 0
        self.kernelDrops = (0, 0)
        self.closed = False
        self.error = None  # an OSError to raise from the next read
        self.timestamp = 0.0  # what read() hands over as each frame's capture time (0: none)
        self.timestamps = collections.deque()  # frames' own times (add), in step with frames

    def add(self, frame, timestamp=None):
        """Queue *frame* with its own capture time (None: ``self.timestamp``)."""
        if len(self.timestamps) != len(self.frames):
            raise ValueError("frames were appended without add(): use one or the other")
        self.frames.append(frame)
        self.timestamps.append(timestamp)

    def _next(self):
        frame = self.frames.popleft()
        timestamp = self.timestamps.popleft() if self.timestamps else None
        return (self.timestamp if timestamp is None else timestamp), frame

    @property
    def drainsOnShortRead(self):
        return self.batch is None  # Linux's pcap ring; a batch models one buffer per read

    def fileno(self):
        return -1

    def datalink(self):
        return self._datalink

    def _startRead(self):
        """Count a read; raise the error set for it, once."""
        self.readCalls += 1
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def read(self, budget, callback):
        self._startRead()
        n = 0
        limit = budget if self.batch is None else min(budget, self.batch)
        while self.frames and n < limit:
            callback(*self._next())
            n += 1
        return n

    def setFilter(self, bpf):
        self.filters.append(bpf)

    def stats(self):
        return (self.readCalls, *self.kernelDrops)

    def close(self):
        self.closed = True


class MemoryNativeCapture(MemoryCapture):
    """A MemoryCapture that is pumped as NativeCapture is: each frame, from Python, through
    the same C (rp_pump_frame) that NativeCapture's pcap callback calls."""

    def __init__(self, module, datalink=DLT_EN10MB):
        super().__init__(datalink, batch=None)
        self._frame = module.lib.rp_pump_frame

    def pump(self, state, budget):
        self._startRead()
        n = 0
        while self.frames and n < budget:
            timestamp, frame = self._next()
            n += 1
            if self._frame(state, frame, len(frame), timestamp or 0.0, bool(timestamp)):
                return n, (timestamp, frame)
        return n, None


@implementer(IRawSocket)
class MemoryRawSocket:
    """A raw socket that records what it is asked to do (fake: nothing reaches a network)."""

    def __init__(self, hostAddresses=None):
        self.hostAddresses = hostAddresses  # addresses bind() accepts (None: any IPv4 address)
        self.sent = []  # (data, address)
        self.bound = None
        self.options = []
        self.blocking = True
        self.closed = False
        self.errors = collections.deque()  # OSErrors to raise from the next sendto calls
        self.incoming = collections.deque()  # frames recv() returns (raw IPv4)

    def setsockopt(self, level, option, value):
        self.options.append((level, option, value))

    def getsockopt(self, level, option):
        if (level, option) == (socket.IPPROTO_IP, socket.IP_TTL):
            return 64
        raise OSError(errno.ENOPROTOOPT, "Protocol not available")

    def setblocking(self, flag):
        self.blocking = flag

    def bind(self, address):
        if packedAddress(address[0]) is None or (self.hostAddresses is not None
                                            and address[0] not in self.hostAddresses):
            raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")
        self.bound = address

    def sendto(self, data, address):
        if self.errors:
            raise self.errors.popleft()
        self.sent.append((bytes(data), address))
        return len(data)

    def recv(self, size):
        if not self.incoming:
            raise BlockingIOError(errno.EAGAIN, "no data")
        return self.incoming.popleft()[:size]

    def fileno(self):
        return -1

    def close(self):
        self.closed = True


@implementer(IGRESystem)
class MemoryGRESystem:
    """Hands out MemoryCapture/MemoryRawSocket objects and remembers them (fake OS)."""

    def __init__(self, datalink=DLT_EN10MB, hostAddresses=None):
        self.datalink = datalink
        self.hostAddresses = hostAddresses
        self.captures = []
        self.sockets = []
        self.headerSockets = []   # openHeaderSocket's (apart: tests count self.sockets)

    def openCapture(self, interface, snaplen, bufferSize, bpf):
        capture = MemoryCapture(self.datalink)
        capture.interface = interface
        capture.filters.append(bpf)
        self.captures.append(capture)
        return capture

    def openNativeCapture(self, module, interface, snaplen, bufferSize, bpf):
        capture = MemoryNativeCapture(module, self.datalink)
        capture.interface = interface
        capture.filters.append(bpf)
        self.captures.append(capture)
        return capture

    def openRawSocket(self):
        sock = MemoryRawSocket(self.hostAddresses)
        self.sockets.append(sock)
        return sock

    def openHeaderSocket(self):
        sock = MemoryRawSocket(self.hostAddresses)
        self.headerSockets.append(sock)
        return sock


@implementer(IGREPort)
class RecordingGREPort:
    """A GRE port that sends nothing: it parses and records each packet (or only counts
    them, with ``record=False``, for benchmarks that must not grow a list)."""

    def __init__(self, receiver=None, record=True):
        self.receiver = receiver  # what a real port would deliver captured GRE to
        self.record = record
        self.sent = []            # (src, dst, GREPacket)
        self.sentCount = 0
        self.last = None          # the last packet's bytes
        self.local = collections.Counter()
        self.counters = {}        # what snapshot() reports (a test may fill it)

    def sendGRE(self, src, dst, data):
        self.sentCount += 1
        self.last = data
        if self.record:
            self.sent.append((src, dst, gre.parse_gre(data)))
        return True

    def addLocalAddress(self, address):
        self.local[address] += 1

    def removeLocalAddress(self, address):
        self.local[address] -= 1
        if self.local[address] <= 0:
            del self.local[address]

    def snapshot(self):
        return dict(self.counters)


@implementer(IGREReceiver)
class RecordingGREReceiver:
    """Records ``greReceived`` calls; ``waitFor(n)`` fires once *n* have arrived (for tests
    on the real reactor).  ``failOn``: a packet on which it raises, as a buggy receiver."""

    def __init__(self, failOn=None, clock=None):
        self.packets = []         # (src, dst, gre)
        self.failOn = failOn
        self._clock = clock
        self._waiting = []

    def acceptsFragment(self, src, dst, head):
        return True

    def greReceived(self, src, dst, data):
        if data == self.failOn:
            raise RuntimeError("receiver bug")
        self.packets.append((src, dst, data))
        for count, d in list(self._waiting):
            if len(self.packets) >= count:
                self._waiting.remove((count, d))
                d.callback(self.packets)

    def waitFor(self, count, timeout=5.0):
        """A Deferred that fires when *count* packets arrived, or fails after *timeout* s."""
        if len(self.packets) >= count:
            return defer.succeed(self.packets)
        d = defer.Deferred()
        self._waiting.append((count, d))
        if self._clock is None:
            from twisted.internet import reactor as clock
        else:
            clock = self._clock
        return d.addTimeout(timeout, clock)


@implementer(ISessionReceiver)
class RecordingSessionReceiver:
    """Records what a mux session delivers.

    ``control`` gathers the control bytes, ``gre`` the datagrams (``record=False`` only
    counts them in ``greCount``, for benchmarks), ``closed`` the close reasons.  ``echo``: a
    session to send each control chunk back on.  ``whenControl(n)`` fires with the control
    bytes once *n* have arrived.  ``events`` lists "detached" / "resumed" (a "resume" link).
    """

    def __init__(self, echo=None, record=True):
        self.control = bytearray()
        self.events = []
        self.gre = []             # (callTag, seq, ack, payload)
        self.greCount = 0
        self.closed = []
        self.echo = echo
        self.record = record
        self._waiting = []        # (count, Deferred)

    def controlReceived(self, data):
        self.control += data
        if self.echo is not None:
            self.echo.sendControl(data)
        for entry in list(self._waiting):
            if len(self.control) >= entry[0]:
                self._waiting.remove(entry)
                entry[1].callback(bytes(self.control))

    def datagramReceived(self, callTag, seq, ack, payload):
        self.greCount += 1
        if self.record:
            self.gre.append((callTag, seq, ack, payload))

    def sessionClosed(self, reason):
        self.closed.append(reason)

    def sessionDetached(self):
        self.events.append("detached")

    def sessionResumed(self):
        self.events.append("resumed")

    def whenControl(self, count):
        """A Deferred firing with all control bytes once *count* have arrived."""
        if len(self.control) >= count:
            return defer.succeed(bytes(self.control))
        d = defer.Deferred()
        self._waiting.append((count, d))
        return d


@implementer(IPushProducer)
class RecordingProducer:
    """A push producer that records being paused and resumed (``calls``)."""

    def __init__(self):
        self.paused = False
        self.calls = []

    def pauseProducing(self):
        self.paused = True
        self.calls.append("pause")

    def resumeProducing(self):
        self.paused = False
        self.calls.append("resume")

    def stopProducing(self):
        self.calls.append("stop")


class RecordingMuxLink:
    """The link a ``MuxConnection`` writes through (docs/protocol.md section 10), recorded.

    ``buffered`` is the send buffer the connection sees; with ``peerReads`` False every
    write stays in it, as with a peer that stops reading.
    """

    def __init__(self, peerReads=True):
        self.writes = []
        self.buffered = 0
        self.asked = 0  # times sendBufferSize was called
        self.peerReads = peerReads
        self.deliveryRates = []  # (bytes/s, app limited) deliveryRate answers, oldest first
        self.rateAsked = 0
        self.lost = self.aborted = False
        self.decoder = frames.FrameDecoder(frames.MAX_MAX_PAYLOAD)

    def writeFrames(self, chunks):
        self.writes.append(list(chunks))
        if not self.peerReads:
            self.buffered += sum(len(c) for c in chunks)

    def sendBufferSize(self):
        self.asked += 1
        return self.buffered

    def deliveryRate(self):
        """The next of ``deliveryRates`` (the last one again once they run out; None if none)."""
        self.rateAsked += 1
        if not self.deliveryRates:
            return None
        return self.deliveryRates.pop(0) if len(self.deliveryRates) > 1 else self.deliveryRates[0]

    def loseConnection(self):
        self.lost = True

    def abortConnection(self):
        self.aborted = True

    def frames(self):
        """Every frame written since the last call, decoded."""
        data = b"".join(b"".join(w) for w in self.writes)
        self.writes = []
        return self.decoder.frames(data)


def memoryTLSPair(serverContext, clientContext):
    """A pyOpenSSL server and client handshaken over memory BIOs (no socket): the benchmarks'
    and fuzz harnesses' TLS peers, each pumping the other's output until both are done."""
    from OpenSSL import SSL
    server, client = SSL.Connection(serverContext, None), SSL.Connection(clientContext, None)
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(20):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                data = a.bio_read(1 << 20)
            except SSL.WantReadError:
                data = b""
            if data:
                b.bio_write(data)
    return server, client
