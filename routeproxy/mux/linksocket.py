"""The TCP socket under a mux link, tuned for GRE: what Twisted's transport does by default
and the link cannot afford, and the unsent bytes the GRE watermark counts.

Twisted hides the socket behind its transport (and TLS behind another); the link needs from
below: Nagle off (:func:`noDelay`), the kernel's unsent bytes bounded and counted
(:func:`limitUnsent`, :func:`kernelUnsent`), a turn's frames encrypted and sent at once
(:func:`turnWriter`, :func:`sendAtOnce`), and the producer pause above the GRE watermark
(:func:`pauseAbove`), and where Twisted reads the link, its reads stamped for the receive
gate (:class:`StampedRead`).  These reach into Twisted's socket transport (``dataBuffer``,
``_tempDataLen``, ``_isSendBufferFull``) and its TLS (``_aggregator``, ``_aborted``), which
``tests/unit/test_mux_transport.py`` and ``test_mux_tls.py`` exercise against the installed
Twisted, over real sockets and real TLS.
"""
import fcntl
import inspect
import socket
import struct
import time
from errno import EWOULDBLOCK

from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol

from routeproxy import sojourn


def _owns(t, name):
    """*t* has *name* itself (instance or class), not through a forwarding ``__getattr__``."""
    try:
        inspect.getattr_static(t, name)
    except AttributeError:
        return False
    return True


def bufferingTransport(transport):
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


def bufferedBytes(t):
    return len(t.dataBuffer) - getattr(t, "offset", 0) + t._tempDataLen


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


def kernelUnsent(t):
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
    t = bufferingTransport(transport)
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
        tcp = bufferingTransport(transport)
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
    tcp._queueWrite = queue

    def write(data):
        if data and canSendNow(tcp, tlsProtocol):
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


def canSendNow(tcp, tlsProtocol=None):
    """Whether a write to *tcp* may go to its socket now: nothing queued in Twisted, connected,
    not closing or aborting (nor *tlsProtocol*, the TLS above it)."""
    return (not tcp._tempDataLen and len(tcp.dataBuffer) == tcp.offset and tcp.connected
            and not tcp.disconnecting and not tcp._writeDisconnecting and not tcp._aborting
            and not (tlsProtocol is not None and tlsProtocol._aborted))


class NativeTLSWriter:
    """The link's TLS write in C (docs/fastpath.md step 3b): a wake-up's mux frames, built by
    the native pump, SSL_write'n into the link's own ``SSL*`` and sent on its socket in the
    same call (``rp_tls_send``), with no Python bytes in between.

    Only while Twisted's TLS (*tls*, a BufferingTLSTransport) and the socket transport under
    it (*tcp*) hold nothing and are not closing (:meth:`idle`, checked by the caller in the
    same turn, in the reactor's thread: pyOpenSSL cannot free the ``SSL*`` under the call),
    so the bytes go out in the order Twisted would have sent them.  The records the socket
    does not take go to Twisted's queue (its writability machinery drains them, and its
    ``doWrite`` meets a send error and closes as usual).
    """

    def __init__(self, module, tls, tcp):
        from OpenSSL._util import ffi as sslFFI, lib as sslLib
        from OpenSSL.SSL import WantReadError
        self._ffi, self._lib, self._WantReadError = module.ffi, module.lib, WantReadError
        self.tls, self.tcp = tls, tcp
        self._connection = connection = tls._tlsConnection   # holds the SSL* alive

        def address(pointer):
            return int(sslFFI.cast("uintptr_t", pointer))
        state = module.lib.rp_tls_new(
            address(connection._ssl), address(connection._from_ssl),
            address(sslFFI.cast("void *", sslLib.SSL_write)),
            address(sslFFI.cast("void *", sslLib.BIO_read)), tcp.socket.fileno())
        if state == module.ffi.NULL:
            raise MemoryError("rp_tls_new")
        self._state = module.ffi.gc(state, module.lib.rp_tls_free)
        self._taken = module.ffi.new("size_t *")
        self._rest = module.ffi.new("uint8_t **")
        self._restLength = module.ffi.new("size_t *")
        self._errno = module.ffi.new("int *")

    @classmethod
    def over(cls, module, transport):
        """The writer for *transport* (the mux's), or None if it is not Twisted's buffering TLS
        over a socket transport."""
        if not isinstance(transport, BufferingTLSTransport):
            return None
        tcp = bufferingTransport(transport)
        if tcp is None or getattr(tcp, "socket", None) is None \
                or getattr(transport, "_tlsConnection", None) is None:
            return None
        return cls(module, transport, tcp)

    def idle(self):
        """The handshake done, TLS not closing and holding nothing (its aggregator, its
        ``_appSendBuffer``), the socket transport as :func:`sendAtOnce` sends at once."""
        tls = self.tls
        return (tls._handshakeDone and not tls._lostTLSConnection and not tls._aborted
                and not tls.disconnecting and not tls._appSendBuffer
                and not getattr(tls._aggregator, "_buffer", None)
                and canSendNow(self.tcp, tls))

    def write(self, data, length):
        """*length* bytes at the cdata *data* to the link: how many SSL_write took (the rest,
        on an SSL_write error, is the caller's to write through Twisted, after these)."""
        result = self._lib.rp_tls_send(self._state, data, length, self._taken, self._rest,
                                       self._restLength, self._errno)
        rest = self._restLength[0]
        if rest:
            self._queue(self._ffi.buffer(self._rest[0], rest)[:])
        if result != self._lib.RP_TLS_SENT:
            self._drain()   # records the C read could not take (no memory)
        return self._taken[0]

    def _queue(self, data):
        tcp = self.tcp
        getattr(tcp, "_queueWrite", tcp.write)(data)

    def _drain(self):
        while True:
            try:
                data = self._connection.bio_read(2 ** 15)
            except self._WantReadError:
                return
            self._queue(data)


class NativeTLSReader:
    """The link's TLS read in C (docs/fastpath.md step 3b): each readable wake-up of the link's
    socket is one C call (``rp_link_read``: recv, BIO_write into the link's own ``SSL*``,
    SSL_read until WANT_READ, the plaintext split and the GRE of the flow entries sent as
    ``rp_link_feed`` does), not Twisted's ``doRead``, its TLS and Python bytes per record.

    Installed as the socket transport's ``doRead`` (on the instance, as Twisted's own
    ``abortConnection`` does; never over another) by the connection's :class:`routeproxy.flows.
    LinkReader` while C has its plaintext stream, and only while :meth:`usable`: the
    handshake done, TLS not closing, nothing it must do first (``_appSendBuffer``); checked
    in the reactor's thread before every C call, so pyOpenSSL has not freed the ``SSL*``.
    Anything unusual is Twisted's: EOF and socket errors return what its ``doRead`` returns,
    an SSL error (close_notify, an alert, a bad record) leaves OpenSSL's error queue as it is
    and Twisted's ``_flushReceiveBIO`` meets the same again (SSL_read repeats it), conditions
    failing mid-wake-up hand C's held frames to the 3a path and the rest of the records to
    Twisted's TLS; then ``doRead`` is Twisted's until the connection installs it again.

    Its sojourn gate (the mux config's ``linkMaxSojourn``; docs/gre-io.md): the kernel stamps
    the link's bytes as they arrive (SO_TIMESTAMPNS), a read's age is what its youngest bytes
    waited in the receive queue, and once reads stay older than the target for an interval,
    CoDel's drops are made in C on the GRE the reads would send (routeproxy/native/sojourn.c,
    the control law of :class:`routeproxy.sojourn.SojournGate`, inside the read: a gate
    that sent such reads to Python slowed the daemon and kept the queue standing).  A daemon
    that cannot keep up with its link would otherwise let TCP's autotuned receive buffer (up
    to ``tcp_rmem``'s maximum, 32 MiB here) queue hundreds of milliseconds of every
    session's GRE.
    """

    def __init__(self, module, tls, tcp, reader):
        from OpenSSL._util import ffi as sslFFI, lib as sslLib
        lib = self._lib = module.lib
        self.tls, self.tcp, self.reader, self.mux = tls, tcp, reader, reader.connection
        self._connection = connection = tls._tlsConnection   # holds the SSL* alive

        def address(pointer):
            return int(sslFFI.cast("uintptr_t", pointer))

        def function(name):
            return address(sslFFI.cast("void *", getattr(sslLib, name)))
        state = lib.rp_tls_in_new(
            address(connection._ssl), address(connection._into_ssl),
            address(connection._from_ssl), function("SSL_read"), function("SSL_get_error"),
            function("BIO_write"), function("BIO_get_mem_data"), tcp.socket.fileno(),
            tcp.bufferSize)
        if state == module.ffi.NULL:
            raise MemoryError("rp_tls_in_new")
        self._state = module.ffi.gc(state, lib.rp_tls_in_free)
        self._doRead = self.doRead   # the bound method installed (identity for uninstall)
        self._ends = lib.RP_READ_EOF | lib.RP_READ_SOCKET_ERROR
        self.reads = 0        # wake-ups read in C
        self.handedBack = 0   # wake-ups left to Twisted's TLS part way (SSL errors, conditions)
        self.flushed = 0      # wake-ups whose SSL_read left TLS records to send (KeyUpdate...)
        self.totals = reader.table   # the same, all links (LinkFlows: the status's native_link)
        target = getattr(self.mux.config, "linkMaxSojourn", 0.0)
        if target and _stampReads(tcp.socket):
            reader.gateOn(target, sojourn.INTERVAL)

    @classmethod
    def over(cls, module, transport, reader):
        """The reader for *transport* (the mux's), or None if it is not Twisted's TLS over a
        TCP socket transport whose reads go straight to it."""
        from twisted.internet.tcp import Connection
        if not isinstance(transport, TLSMemoryBIOProtocol) \
                or getattr(transport, "_tlsConnection", None) is None:
            return None
        tcp = bufferingTransport(transport)
        if not isinstance(tcp, Connection) or type(tcp).doRead is not Connection.doRead \
                or getattr(tcp, "socket", None) is None:
            return None
        protocol = getattr(tcp, "protocol", None)   # (a client endpoint's _WrappingProtocol)
        if protocol is not transport and getattr(protocol, "_wrappedProtocol", None) is not transport:
            return None
        return cls(module, transport, tcp, reader)

    @property
    def installed(self):
        return self.tcp.__dict__.get("doRead") is self._doRead

    def usable(self):
        """The handshake done, TLS not closing nor holding writes for a read, the socket
        transport reading, C holding the mux's plaintext stream, the mux open."""
        tls, tcp, mux = self.tls, self.tcp, self.mux
        return (tls._handshakeDone and not tls._lostTLSConnection and not tls._aborted
                and not tls.disconnecting and not tls._appSendBuffer
                and tls._tlsConnection is self._connection
                and tcp.connected and not tcp.disconnecting and not tcp._aborting
                and mux._readingNative and not mux.closed)

    def install(self):
        tcp = self.tcp
        if "doRead" not in tcp.__dict__ and self.usable():
            tcp.doRead = self._doRead

    def uninstall(self):
        if self.installed:
            del self.tcp.doRead

    def doRead(self):
        """The reactor's read of the link socket (what tcp.Connection.doRead returns)."""
        if not self.usable():
            self.uninstall()
            return self.tcp.doRead()
        flags, plaintext, rest = self.reader.readTLS(self._state, 1)
        return self.readDone(flags, plaintext, rest)

    def readDone(self, flags, plaintext, rest):
        """The rest of a wake-up after its first rp_link_read (*flags*, *plaintext* bytes
        taken, *rest* for the decoder): doRead's, or the loop's (routeproxy.native.loop),
        whose C made that read.  What tcp.Connection.doRead returns."""
        lib, reader, mux, state = self._lib, self.reader, self.mux, self._state
        if flags & self._ends:
            self.uninstall()
            return CONNECTION_DONE if flags & lib.RP_READ_EOF else CONNECTION_LOST
        self.reads += 1
        self.totals.tlsReads += 1
        while True:
            if plaintext or rest:
                mux.nativeReceived(plaintext, rest)
            if flags & lib.RP_READ_SSL_ERROR:
                self._handBack(held=False)
                return None
            if not flags & lib.RP_READ_AGAIN:
                break
            if not self.usable():   # Python's frames closed or changed the link
                self._handBack(held=True)
                return None
            flags, plaintext, rest = reader.readTLS(state, 0)
        if flags & lib.RP_READ_TLS_OUT:
            self.flushed += 1
            self.totals.tlsFlushed += 1
            self.tls._flushSendBIO()   # as Twisted's _flushReceiveBIO ends
        return None

    def _handBack(self, held):
        """The rest of this wake-up, and the next ones, Twisted's: C's complete frames
        (*held*: after RP_READ_AGAIN) through the 3a path first, then the records still in
        the SSL through Twisted's TLS, which ends by flushing its write BIO."""
        self.uninstall()
        self.handedBack += 1
        self.totals.tlsHandedBack += 1
        if held and not self.mux.closed:
            self.mux.dataReceived(b"")
        self.tls._flushReceiveBIO()


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def _stampReads(sock):
    """Ask the kernel to stamp what *sock* receives (the gate's ages); False if it cannot."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    return True


SCM_TIMESTAMPNS = SO_TIMESTAMPNS
_TIMESPEC = struct.Struct("@qq")   # struct timespec on LP64 Linux
_STAMP_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)


class StampedRead:
    """Twisted's read of the link's socket with the kernel's receive stamp: the link's receive
    gate (``linkMaxSojourn``; docs/gre-io.md) where Twisted's TLS reads the link (no native
    module, ``--gre-capture pcap`` or ``raw``).

    ``tcp.Connection.doRead`` with ``recvmsg`` for ``recv``: the same read size, and what
    Twisted's returns for EAGAIN (None), a socket error (``CONNECTION_LOST``) and EOF
    (``CONNECTION_DONE``, through Twisted's own ``_dataReceived``).  A read that carries the
    stamp (SO_TIMESTAMPNS: the receive time of the last segment it took, so of its youngest
    bytes) has an age, now minus that stamp, which *gate* (a
    :class:`routeproxy.sojourn.SojournGate`, CoDel's law, the C read's twin) turns into a
    threshold before the bytes go up through Twisted's TLS; the mux connection (*mux*, its
    ``_readAt`` and ``_dropBefore``) drops the GRE frames of a read older than it as it
    decodes them (:meth:`routeproxy.mux.connection.MuxConnection._aged`), before they are
    sent on; then the gate observes the read's age, as ``rp_link_read`` does.

    Installed as the socket transport's ``doRead`` on the instance (as NativeTLSReader, as
    Twisted's ``abortConnection`` sets its own), never over another, and only for a link
    whose reads C does not make (the mux connection has no native reader).
    """

    def __init__(self, tcp, mux, gate):
        self.tcp, self.mux, self.gate = tcp, mux, gate
        self._recvmsg = tcp.socket.recvmsg
        self._doRead = self.doRead   # the bound method installed (identity for the tests)
        self.reads = 0        # reads with a stamp

    @classmethod
    def over(cls, transport, mux, target):
        """Installed under *transport* (the mux's, Twisted's TLS over a TCP socket transport
        whose ``doRead`` is Twisted's own and not overridden), its socket asked to stamp what
        it receives, with a gate of *target* seconds: the reader, or None."""
        from twisted.internet.tcp import Connection

        from routeproxy.sojourn import SojournGate
        tcp = bufferingTransport(transport)
        if not target or not isinstance(tcp, Connection) \
                or type(tcp).doRead is not Connection.doRead or "doRead" in tcp.__dict__ \
                or getattr(tcp, "socket", None) is None or not _stampReads(tcp.socket):
            return None
        reader = cls(tcp, mux, SojournGate(target, sojourn.INTERVAL))
        tcp.doRead = reader._doRead
        return reader

    @property
    def installed(self):
        return self.tcp.__dict__.get("doRead") is self._doRead

    def doRead(self):
        """The reactor's read of the link socket (what tcp.Connection.doRead returns)."""
        tcp = self.tcp
        try:
            data, ancillary, _, _ = self._recvmsg(tcp.bufferSize, _STAMP_SPACE)
        except OSError as se:
            if se.args[0] == EWOULDBLOCK:
                return None
            return CONNECTION_LOST
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS \
                    and len(value) >= _TIMESPEC.size:
                seconds, nanoseconds = _TIMESPEC.unpack_from(value)
                return self._gated(data, seconds + nanoseconds * 1e-9)
        return tcp._dataReceived(data)

    def _gated(self, data, stamp):
        """*data*, received at *stamp*, up through Twisted's TLS to the mux under the gate.  A
        read that emptied the socket (shorter than the read size) leaves no queue: young, as
        in ``rp_link_read`` (RFC 8289), and no clock read."""
        self.reads += 1
        gate, mux = self.gate, self.mux
        now = stamp if len(data) < self.tcp.bufferSize and not gate.dropping else time.time()
        mux._readAt, mux._dropBefore = stamp, gate.drop_before(now)
        try:
            return self.tcp._dataReceived(data)
        finally:
            mux._readAt = mux._dropBefore = 0.0
            gate.observe(now, stamp)


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
    t = bufferingTransport(transport)
    if t is not None and size > t.bufferSize:
        t._isSendBufferFull = lambda: len(t.dataBuffer) + t._tempDataLen > size
