"""The link's TLS read in C (docs/fastpath.md step 3b: rp_link_read, linksocket.NativeTLSReader,
LinkReader.readTLS) against Twisted's read and TLS, stream by stream, over real mutual TLS on
real TCP sockets, GRE sent on real raw sockets.

The server is the RRP's mux end as the daemon builds it (MuxServerFactory over
``reactor.listenSSL`` with routeproxy.tls, a LinkFlows over a real GREPort whose raw socket
sends to "pptpd" on the loopback); the client is a TLS peer the test drives record by record
and segment by segment (pyOpenSSL on memory BIOs, or the system's own OpenSSL through ctypes
where a TLS 1.3 KeyUpdate is needed) over a plain TCP socket.  Each scenario runs twice, once
with the C read and once with Twisted's (``LinkReader.tlsRead = False``: step 3a, C below
Twisted's TLS), and compares the GRE that reached pptpd (bytes, source, destination), the
frames Python decoded in order (with the GRE count at each), every counter, what the client
got back (frames, close_notify, EOF) and how the link ended (the reason MuxProtocol got).
Needs root (raw sockets) and the built module; CI may not skip the module.
"""
import ctypes
import ctypes.util
import fcntl
import socket
import struct
import termios
import time

from OpenSSL import SSL
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from routeproxy import certs, native, tls
from routeproxy.calls import Call
from routeproxy.capture import DLT_EN10MB
from routeproxy.flows import Flow, LinkFlows, LinkReader
from routeproxy.greport import GREPort
from routeproxy.mux import frames as F
from routeproxy.mux.connection import MuxConfig
from routeproxy.mux.linksocket import NativeTLSReader, bufferingTransport
from routeproxy.mux.protocol import MuxProtocol, MuxServerFactory
from routeproxy.mux.session import OPEN
from routeproxy.relay import RelaySession
from tests.support.native import receivedGRE, requireNative
from tests.unit.test_native_link import RawSendSystem, addresses

MODULE, REASON = native.load()
RRP, LRP = "rrp.mux.test", "lrp.mux.test"
SID, TAG, KEY = 1, 0x4242, 0x5151


def skipUnlessUsable():
    requireNative("raw GRE sockets")


def turn():
    return task.deferLater(reactor, 0, lambda: None)


def inQueue(sock):
    """Bytes waiting in *sock*'s receive queue (FIONREAD)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    except (OSError, ValueError):   # (closed)
        return 0


# -- the client's TLS: pyOpenSSL, or the system's OpenSSL (it can send a KeyUpdate) -------------

class SystemTLS:
    """A TLS client on memory BIOs in the system's libssl (ctypes), with pyOpenSSL's method
    names and exceptions for what the test uses; ``keyUpdate()`` sends a KeyUpdate that
    requests the peer's."""

    _lib = None

    @classmethod
    def lib(cls):
        if cls._lib is None:
            name = ctypes.util.find_library("ssl")
            if name is None:
                raise unittest.SkipTest("no system libssl")
            lib = ctypes.CDLL(name)
            p, i, c = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
            for fn, res, args in [
                    ("TLS_client_method", p, []), ("SSL_CTX_new", p, [p]),
                    ("SSL_CTX_use_certificate_chain_file", i, [p, c]),
                    ("SSL_CTX_use_PrivateKey_file", i, [p, c, i]),
                    ("SSL_CTX_load_verify_locations", i, [p, c, c]),
                    ("SSL_CTX_set_verify", None, [p, i, p]), ("SSL_new", p, [p]),
                    ("BIO_s_mem", p, []), ("BIO_new", p, [p]), ("SSL_set_bio", None, [p, p, p]),
                    ("SSL_set_connect_state", None, [p]), ("SSL_do_handshake", i, [p]),
                    ("SSL_get_error", i, [p, i]), ("SSL_write", i, [p, c, i]),
                    ("SSL_read", i, [p, p, i]), ("BIO_read", i, [p, p, i]),
                    ("BIO_write", i, [p, c, i]), ("SSL_key_update", i, [p, i]),
                    ("SSL_shutdown", i, [p]), ("SSL_free", None, [p]), ("SSL_CTX_free", None, [p])]:
                f = getattr(lib, fn)
                f.restype, f.argtypes = res, args
            cls._lib = lib
        return cls._lib

    def __init__(self, paths):
        lib = self.lib()
        self.ctx = lib.SSL_CTX_new(lib.TLS_client_method())
        assert lib.SSL_CTX_use_certificate_chain_file(self.ctx, paths["lrp_cert"].encode()) == 1
        assert lib.SSL_CTX_use_PrivateKey_file(self.ctx, paths["lrp_key"].encode(), 1) == 1
        assert lib.SSL_CTX_load_verify_locations(self.ctx, paths["ca"].encode(), None) == 1
        lib.SSL_CTX_set_verify(self.ctx, 1, None)
        self.ssl = lib.SSL_new(self.ctx)
        self.rbio, self.wbio = lib.BIO_new(lib.BIO_s_mem()), lib.BIO_new(lib.BIO_s_mem())
        lib.SSL_set_bio(self.ssl, self.rbio, self.wbio)
        lib.SSL_set_connect_state(self.ssl)
        self.buf = ctypes.create_string_buffer(1 << 16)

    def close(self):
        self._lib.SSL_free(self.ssl)
        self._lib.SSL_CTX_free(self.ctx)

    def _check(self, n):
        if n > 0:
            return n
        e = self._lib.SSL_get_error(self.ssl, n)
        if e == 2:
            raise SSL.WantReadError()
        if e == 6:
            raise SSL.ZeroReturnError()
        raise SSL.Error(f"system TLS error {e}")

    def do_handshake(self):
        self._check(self._lib.SSL_do_handshake(self.ssl))

    def send(self, data):
        return self._check(self._lib.SSL_write(self.ssl, data, len(data)))

    def recv(self, size):
        n = self._check(self._lib.SSL_read(self.ssl, self.buf, min(size, len(self.buf))))
        return self.buf.raw[:n]

    def bio_read(self, size):
        n = self._lib.BIO_read(self.wbio, self.buf, min(size, len(self.buf)))
        if n <= 0:
            raise SSL.WantReadError()
        return self.buf.raw[:n]

    def bio_write(self, data):
        return self._lib.BIO_write(self.rbio, data, len(data))

    def shutdown(self):
        self._lib.SSL_shutdown(self.ssl)

    def keyUpdate(self):
        assert self._lib.SSL_key_update(self.ssl, 1) == 1   # SSL_KEY_UPDATE_REQUESTED
        self._check(self._lib.SSL_do_handshake(self.ssl))   # sends it now


def pyOpenSSLClient(paths, tls12=False):
    options = tls.clientCreator(RRP, paths["lrp_cert"], paths["lrp_key"], paths["ca"]).options
    context = options.getContext()
    if tls12:
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
    connection = SSL.Connection(context, None)
    connection.set_connect_state()
    return connection


class Peer:
    """The LRP's end, driven by the test: *engine* (a TLS client on memory BIOs) over a TCP
    socket to the server; records cut where the test says, segments sent where it says."""

    def __init__(self, engine, port):
        self.engine = engine
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # each segment now
        self.sock.setblocking(False)
        self.decoder = F.FrameDecoder(F.MAX_MAX_PAYLOAD)
        self.frames = []        # what the server sent, decrypted: (type name, session, payload)
        self.end = None         # "close_notify", "eof", "reset", an SSL error: how the server ended
        self.bytesIn = 0        # what the socket received

    def _out(self):
        data = b""
        while True:
            try:
                data += self.engine.bio_read(1 << 16)
            except SSL.WantReadError:
                return data

    def receive(self):
        """What the server sent so far, through the client's TLS."""
        if self.sock.fileno() < 0:
            self.end = self.end or "closed here"
            return
        while self.end is None:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except ConnectionResetError:
                self.end = "reset"
                break
            if not data:
                self.end = "eof"
                break
            self.bytesIn += len(data)
            self.engine.bio_write(data)
        while True:
            try:
                plain = self.engine.recv(1 << 16)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self.end = self.end or "close_notify"
                self.engine.shutdown()   # answered, as Twisted's TLS answers it
                self.sock.sendall(self._out())
                break
            except SSL.Error as e:
                self.end = self.end or f"ssl error {e}"
                break
            self.decoder.feed(plain)
            while True:
                frame = self.decoder.nextFrame()
                if frame is None:
                    break
                self.frames.append((type(frame).__name__, frame.session,
                                    getattr(frame, "data", None) or getattr(frame, "text", None)))
        out = self._out()
        if out and self.end is None:
            self.sock.sendall(out)

    @defer.inlineCallbacks
    def handshake(self):
        for _ in range(1000):
            try:
                self.engine.do_handshake()
            except SSL.WantReadError:
                self.sock.sendall(self._out())
                yield turn()
                try:
                    data = self.sock.recv(1 << 16)
                except BlockingIOError:
                    continue
                self.engine.bio_write(data)
            else:
                self.sock.sendall(self._out())
                return
        raise AssertionError("no handshake")

    def records(self, plaintext, sizes=(16384,)):
        """*plaintext* as TLS records of *sizes* (cycled): the ciphertext."""
        out, at, i = b"", 0, 0
        while at < len(plaintext):
            size = sizes[i % len(sizes)]
            i += 1
            self.engine.send(plaintext[at:at + size])
            at += size
            out += self._out()
        return out


class SendOnlyGREPort(GREPort):
    """A real GREPort sending on real raw sockets whose capture (in memory, RawSendSystem) the
    real reactor does not watch: only its sends are under test here."""

    def startReading(self):
        pass

    def stopReading(self):
        pass


# -- one link, on one path ----------------------------------------------------------------------

class OrderReceiver:
    """The session's frames Python decoded, in order, each with the GRE sent by then."""

    def __init__(self, run):
        self.run, self.events = run, []

    def _sent(self):
        return self.run.port.stats.sent + sum(self.run.port.stats.dropped.values())

    def controlReceived(self, data):
        self.events.append(("c", bytes(data), self._sent()))
        if data == b"lose the link":   # (the server closes its TLS, the mux still open)
            self.run.connection._link.loseConnection()

    def datagramReceived(self, callTag, seq, ack, payload):
        self.events.append(("g", callTag, seq, ack, bytes(payload), self._sent()))

    def sessionClosed(self, reason):
        self.events.append(("closed", reason, self._sent()))


class ObservedMuxProtocol(MuxProtocol):
    """MuxProtocol, with the reason Twisted gave its connectionLost kept."""

    def connectionLost(self, reason):
        self.lostWith = (reason.type.__name__, reason.getErrorMessage())
        MuxProtocol.connectionLost(self, reason)


class ServerEnd:
    """The server's end of a real link (``tcp``, ``tls``, ``connection``) read by the reactor,
    and the client ``peer`` that writes to it: what Run and test_mux_receivegate's Link do
    alike."""

    @defer.inlineCallbacks
    def accept(self, factory, paths, engine):
        """*factory* listening on loopback with the RRP's certificate and a Peer of *engine*
        connected to it: ``connection``, the server's end."""
        factory.protocol = ObservedMuxProtocol
        listening = reactor.listenSSL(
            0, factory, tls.serverCreator(paths["rrp_cert"], paths["rrp_key"], paths["ca"]),
            interface="127.0.0.1")
        self.case.addCleanup(listening.stopListening)
        self.peer = Peer(engine, listening.getHost().port)
        self.case.addCleanup(self.peer.sock.close)
        for _ in range(500):
            if factory.connections:
                break
            yield turn()
        [self.connection] = factory.connections

    def abort(self):
        if not self.connection.linkGone:
            self.tls.abortConnection()
            return self.connection.whenLinkLost()

    @defer.inlineCallbacks
    def until(self, condition, what, seconds=5):
        deadline = time.monotonic() + seconds
        while not condition():
            try:
                self.peer.receive()
            except OSError:   # (the server's end gone while the peer answered)
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"waited {seconds} s for {what}")
            yield turn()

    @defer.inlineCallbacks
    def send(self, data, cuts=()):
        """*data* (ciphertext) in segments cut at *cuts*, each read by the server before the
        next is sent."""
        edges = [0] + sorted(c for c in cuts if 0 < c < len(data)) + [len(data)]
        for a, b in zip(edges, edges[1:]):
            self.peer.sock.sendall(data[a:b])
            yield self.read()

    @defer.inlineCallbacks
    def read(self):
        """Until the server has read what was sent (or stopped reading)."""
        sock, deadline = self.tcp.socket, time.monotonic() + 5
        yield turn()
        while inQueue(sock) and self.tcp.connected and time.monotonic() < deadline:
            yield turn()

    def heldRead(self, data, wait):
        """*data* (ciphertext) sent while the server does not read, read *wait* s later."""
        self.tcp.stopReading()
        self.peer.sock.sendall(data)
        time.sleep(wait)   # (the reactor is here: nothing reads)
        self.tcp.startReading()
        return self.read()

    def behindRead(self, data, wait):
        """*data* sent, read *wait* s later by a server behind its link: reads of one buffer
        each, only while more than a buffer waits, so every read is full and a queue stands
        behind it (a read that empties the socket is young: RFC 8289)."""
        self.tcp.stopReading()
        self.peer.sock.sendall(data)
        time.sleep(wait)   # (the reactor is here: nothing reads)
        while inQueue(self.tcp.socket) > self.tcp.bufferSize:
            self.tcp.doRead()
        return turn()


class Run(ServerEnd):
    """The RRP's end (a real mux server over routeproxy.tls with a native link read and a
    flow entry for (SID, TAG)) and a client Peer, with the C TLS read (*native*) or not."""

    def __init__(self, case, native, engine="pyopenssl", linkMaxSojourn=0.0, bufferSize=None):
        self.case, self.native, self.engineName = case, native, engine
        self.linkMaxSojourn = linkMaxSojourn   # the link read's gate (C's reads only)
        self.bufferSize = bufferSize   # the link socket's read size (None: Twisted's)
        self.notes = []   # what a scenario saw on the way

    @defer.inlineCallbacks
    def start(self):
        case = self.case
        self.source, self.pptpd = addresses()
        self.sink = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_GRE)
        self.sink.setblocking(False)
        self.sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        case.addCleanup(self.sink.close)
        self.port = SendOnlyGREPort(None, [self.source], reactor=reactor, capture="pcap",
                                    system=RawSendSystem(DLT_EN10MB), maxSojourn=0)
        self.port.startListening()
        case.addCleanup(self.port.stopListening)
        self.port.addLocalAddress(self.source)
        self.flows = LinkFlows(MODULE, self.port)
        self.receiver = OrderReceiver(self)
        paths = case.paths
        config = MuxConfig(pingInterval=60.0, deadTimeout=120.0, linkMaxSojourn=self.linkMaxSojourn)
        factory = MuxServerFactory(lambda *a: self.receiver, config, reactor,
                                   peerNameOf=tls.peerName)
        factory.linkFlows = self.flows
        engine = (SystemTLS(paths) if self.engineName == "system" else
                  pyOpenSSLClient(paths, self.engineName == "tls1.2"))
        if isinstance(engine, SystemTLS):
            case.addCleanup(engine.close)
        yield self.accept(factory, paths, engine)
        self.reader = self.connection.nativeReader
        self.reader.tlsRead = self.native
        case.addCleanup(self.abort)
        yield self.peer.handshake()
        self.tls = self.connection._link.transport
        self.tcp = bufferingTransport(self.tls)
        if self.bufferSize:   # (before the C read is made: it reads this much)
            self.tcp.bufferSize = self.bufferSize
        hello = F.Hello(F.PROTOCOL_VERSIONS, config.maxPayload, config.initialWindow, 60, 120, ())
        yield self.send(self.peer.records(hello.encode() + F.Open(SID, "office", "1").encode()))
        yield self.until(lambda: SID in self.connection.sessions
                         and self.connection.sessions[SID].state == OPEN, "the session open")
        self.session = self.connection.sessions[SID]
        self.relaySession = RelaySession(None, None)
        self.relaySession.peerAddress, self.relaySession.localAddress = self.pptpd, self.source
        self.call = Call(None)
        self.call.pns_id, self.call.pac_id, self.call.local_id = TAG, KEY, 7
        flow = Flow(self.relaySession, self.call, self.session)
        case.assertTrue(self.reader.install(flow, self.port.senderFileno(self.source), KEY))
        flow.installed = True
        # the first read after HELLO gives C the stream (3a), and the C read is installed
        yield self.send(self.peer.records(F.Control(SID, b"primer").encode()))
        case.assertEqual(self.reader.tls is not None and self.reader.tls.installed, self.native)
        self.peer.receive()
        self.mark = len(self.peer.frames)

    def gre(self):
        return receivedGRE(self.sink, self.source, self.pptpd)

    @defer.inlineCallbacks
    def observed(self):
        """Everything both paths must agree on (after the dust settles)."""
        yield turn()
        self.peer.receive()
        stats = self.port.stats
        gre, deadline = [], time.monotonic() + 5
        while len(gre) < stats.sent and time.monotonic() < deadline:
            gre += self.gre()
            yield turn()
        gre += self.gre()
        mux = self.connection.snapshot()
        for key in ("rtt_last_ms", "rtt_smoothed_ms", "send_queue"):   # timing: the samples
            mux.pop(key)
        port = self.port.snapshot()
        port.pop("native_link")
        return {
            "gre": gre,
            "events": self.receiver.events,
            "mux": mux,
            "flow": (self.relaySession.greOut, self.call.gre_out, self.call.bytes_out,
                     self.session.greIn, self.session.state),
            "port": port,
            "taken": self.flows.taken,
            "client": (self.peer.frames[self.mark:], self.peer.end),
            "lost": getattr(self.connection._link, "lostWith", None),
            "notes": self.notes,
        }


class TLSReadTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        skipUnlessUsable()
        self.paths = certs.write_lab_certs(self.mktemp(), RRP, [LRP])

    @defer.inlineCallbacks
    def compare(self, scenario, engine="pyopenssl", linkUp=True):
        """*scenario(run)* on both paths: the observations (Twisted's, C's), checked equal."""
        results, runs = [], []
        for nativeRead in (False, True):
            run = Run(self, nativeRead, engine)
            yield run.start()
            yield scenario(run)
            if linkUp:
                yield run.send(run.peer.records(F.Control(SID, b"the end").encode()))
                yield run.until(lambda: run.receiver.events[-1][:2] == ("c", b"the end"),
                                "the last frame")
            else:
                yield run.until(lambda: run.connection.linkGone and run.peer.end, "the link's end")
            results.append((yield run.observed()))
            runs.append(run)
        twisted, c = results
        for key in twisted:
            self.assertEqual(twisted[key], c[key], f"{key} differs: Twisted's read, then C's")
        self.assertIsNone(runs[0].reader.tls)
        self.assertGreater(runs[1].reader.tls.reads, 0)     # C did read
        totals = runs[1].reader.table.snapshot()              # and the status says so
        tls = runs[1].reader.tls
        self.assertEqual((totals["tls_reads"], totals["tls_handed_back"], totals["tls_flushed"]),
                         (tls.reads, tls.handedBack, tls.flushed))
        self.runs = runs
        return twisted, c


def gre(i, tag=TAG, seq=True, ack=None, size=None, session=SID):
    payload = bytes([i & 255]) * (size if size is not None else 40 + i)
    return F.encodeGRE(session, tag, i if seq else None, ack, payload)


def mixed(n=12):
    """GRE of the call (C's), control, GRE of another call and of no session (Python's),
    PING, an ignorable unknown frame, a malformed GRE, a GRE of the call without payload."""
    out = []
    for i in range(n):
        out += [gre(i), gre(i + 100, ack=i), F.Control(SID, b"ctl %d" % i).encode(), gre(i + 200)]
        if i % 3 == 0:
            out += [gre(i, tag=TAG + 1), gre(i, session=99), F.Ping(b"%08d" % i).encode()]
        if i % 4 == 1:
            out += [F.UnknownFrame(0x7f | F.IGNORABLE, 0, 0, b"xyz").encode(),
                    F.encodeHeader(F.GRE, 0, SID, 1) + b"\x00", gre(i, seq=False, ack=3, size=0)]
        if i % 5 == 2:
            out.append(gre(i, size=1400))
    return b"".join(out)


class StreamTests(TLSReadTests):

    @defer.inlineCallbacks
    def test_oneRecordOneRead(self):
        twisted, c = yield self.compare(lambda run: run.send(run.peer.records(mixed())))
        self.assertGreater(len(c["gre"]), 30)
        self.assertGreater(c["taken"], 30)   # C sent them (both paths: 3a or 3b)
        self.assertIn("Pong", [f[0] for f in c["client"][0]])

    @defer.inlineCallbacks
    def test_framesSplitAcrossRecordsAndReads(self):
        """Records of 1, 7, 100, 1500 and 16 KiB bytes; segments cut inside records and
        inside their headers: the frames, their order and the counters are the same."""
        def scenario(run):
            data = run.peer.records(mixed(30), sizes=(1, 7, 100, 1500, 16384, 13))
            return run.send(data, cuts=range(3, len(data), 997))
        twisted, c = yield self.compare(scenario)
        self.assertGreater(len(c["gre"]), 100)

    @defer.inlineCallbacks
    def test_partialFrameAcrossReads(self):
        """A 1400-byte GRE frame in records of 5 bytes, every segment a few bytes."""
        def scenario(run):
            data = run.peer.records(gre(1, size=1400) + gre(2) + F.Control(SID, b"x").encode(),
                                    sizes=(5,))
            return run.send(data, cuts=range(11, len(data), 11))
        twisted, c = yield self.compare(scenario)
        self.assertEqual(len(c["gre"]), 2)

    @defer.inlineCallbacks
    def test_manyRecordsInOneRead(self):
        """Hundreds of records in a few reads (64 KiB each): C reads them all per wake-up."""
        def scenario(run):
            return run.send(run.peer.records(mixed(60), sizes=(1400, 200)))
        twisted, c = yield self.compare(scenario)
        self.assertLess(self.runs[1].reader.tls.reads, 20)


class EndTests(TLSReadTests):
    """The link's end in the middle of a stream: what Twisted does, the same."""

    @defer.inlineCallbacks
    def test_peerCloseNotify(self):
        def scenario(run):
            data = run.peer.records(mixed(4))
            run.peer.engine.shutdown()
            return run.send(data + run.peer._out())
        twisted, c = yield self.compare(scenario, linkUp=False)
        self.assertEqual(c["client"][1], "close_notify")   # answered, then the TCP closed
        self.assertEqual(c["lost"], ("ConnectionDone", "Connection was closed cleanly."))

    @defer.inlineCallbacks
    def test_peerCloseNotifyInItsOwnRead(self):
        @defer.inlineCallbacks
        def scenario(run):
            yield run.send(run.peer.records(mixed(4)))
            run.peer.engine.shutdown()
            yield run.send(run.peer._out())
        twisted, c = yield self.compare(scenario, linkUp=False)
        self.assertEqual(self.runs[1].reader.tls.handedBack, 1)

    @defer.inlineCallbacks
    def test_tcpEOF(self):
        @defer.inlineCallbacks
        def scenario(run):
            data = run.peer.records(mixed(4))
            yield run.send(data[:-10])
            run.peer.sock.sendall(data[-10:])
            run.peer.sock.shutdown(socket.SHUT_WR)   # a partial record, then the FIN
            yield run.read()
        twisted, c = yield self.compare(scenario, linkUp=False)
        self.assertEqual(c["lost"][0], "ConnectionLost")

    @defer.inlineCallbacks
    def test_resetMidStream(self):
        @defer.inlineCallbacks
        def scenario(run):
            data = run.peer.records(mixed(4))
            yield run.send(data[:-10])
            run.peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            run.peer.sock.close()   # RST
            yield run.read()
        twisted, c = yield self.compare(scenario, linkUp=False)
        self.assertEqual(c["lost"][0], "ConnectionLost")

    @defer.inlineCallbacks
    def test_corruptRecord(self):
        """A record that does not decrypt (an SSL error): the frames before it count, the link
        fails as Twisted fails it (the alert, the reason)."""
        def scenario(run):
            good, bad = run.peer.records(mixed(4)), bytearray(run.peer.records(mixed(2)))
            bad[-5] ^= 1
            return run.send(good + bytes(bad) + run.peer.records(gre(1)))
        twisted, c = yield self.compare(scenario, linkUp=False)
        self.assertEqual(c["lost"][0], "Error")
        self.assertIn("bad record mac", c["lost"][1])

    @defer.inlineCallbacks
    def test_corruptRecordAfterQueuedOutput(self):
        """A frame the mux queued outside a read (a timer's: flushed on the next turn) and, in
        the wake-up before that turn, good records then a bad one: Twisted's read writes the
        frame after the first record, before the error; so does C's (it stops after the first
        record when the mux has output queued)."""
        def scenario(run):
            good = run.peer.records(gre(1) + gre(2)) + run.peer.records(gre(3))   # C's only
            bad = bytearray(run.peer.records(gre(4)))
            bad[-5] ^= 1
            run.peer.sock.sendall(good + bytes(bad))
            run.session.sendControl(b"queued by a timer")
            return run.read()
        twisted, c = yield self.compare(scenario, linkUp=False)
        self.assertIn(("Control", SID, b"queued by a timer"), c["client"][0])
        self.assertEqual(c["lost"][0], "Error")

    @defer.inlineCallbacks
    def test_oversizeFrame(self):
        """A frame longer than the link allows: GOAWAY, the link closes; nothing after it is
        sent, in the same read or later."""
        def scenario(run):
            big = F.encodeHeader(F.GRE, 1, SID, 1 << 20)
            return run.send(run.peer.records(gre(1) + F.Control(SID, b"a").encode() + big + gre(2))
                            + run.peer.records(gre(3)))
        twisted, c = yield self.compare(scenario, linkUp=False)
        self.assertEqual(len(c["gre"]), 1)
        self.assertIn("GoAway", [f[0] for f in c["client"][0]])

    @defer.inlineCallbacks
    def test_goAwayThenMore(self):
        """The peer's GOAWAY mid-record: the mux closes in Python; the GRE after it (same
        record, next records of the same read) is not sent; the rest is Twisted's."""
        def scenario(run):
            return run.send(run.peer.records(gre(1) + F.GoAway(0, "bye").encode() + gre(2))
                            + run.peer.records(gre(3)))
        twisted, c = yield self.compare(scenario, linkUp=False)
        self.assertEqual(len(c["gre"]), 1)
        self.assertEqual(self.runs[1].reader.tls.handedBack, 1)


    @defer.inlineCallbacks
    def test_tlsClosingMidRecord(self):
        """The server's TLS starts closing part way through a read, its mux still open: C's
        complete frames go the 3a path, the records after them Twisted's, all in order (the
        GRE after the close is sent on both paths), then the link ends as Twisted ends it."""
        @defer.inlineCallbacks
        def scenario(run):
            yield run.send(run.peer.records(gre(1) + F.Control(SID, b"lose the link").encode()
                                            + gre(2) + F.Control(SID, b"after").encode() + gre(3)))
            run.notes.append(("sent in that read", run.port.stats.sent))
            yield run.send(run.peer.records(gre(4) + gre(5)))
        twisted, c = yield self.compare(scenario, linkUp=False)
        self.assertEqual(c["notes"], [("sent in that read", 3)])
        self.assertEqual(len(c["gre"]), 5)
        self.assertEqual(self.runs[1].reader.tls.handedBack, 1)


class PostHandshakeTests(TLSReadTests):

    @defer.inlineCallbacks
    def test_keyUpdate(self):
        """A TLS 1.3 KeyUpdate from the peer (the system's OpenSSL: pyOpenSSL's binding has no
        SSL_key_update) requesting ours: read in C, ours sent as Twisted sends it; the link
        goes on both ways with the new keys."""
        @defer.inlineCallbacks
        def scenario(run):
            yield run.send(run.peer.records(mixed(2)))
            run.peer.engine.keyUpdate()
            yield run.send(run.peer._out() + run.peer.records(mixed(2) + F.Ping(b"afterkey").encode()))
            yield run.until(lambda: (run.peer.receive() or True) and
                            ("Pong", 0, b"afterkey") in run.peer.frames, "the PONG")
        twisted, c = yield self.compare(scenario, engine="system")
        self.assertGreater(c["taken"], 10)

    @defer.inlineCallbacks
    def test_keyUpdateAlone(self):
        """Only the KeyUpdate in a wake-up: OpenSSL answers it with the next write (nothing
        is sent at once, on either path); the PING's PONG carries it."""
        @defer.inlineCallbacks
        def scenario(run):
            run.peer.engine.keyUpdate()
            before = run.peer.bytesIn
            yield run.send(run.peer._out())
            run.peer.receive()
            run.notes.append(("answered alone", run.peer.bytesIn - before))
            yield run.send(run.peer.records(F.Ping(b"afterkey").encode()))
            yield run.until(lambda: ("Pong", 0, b"afterkey") in run.peer.frames, "the PONG")
        twisted, c = yield self.compare(scenario, engine="system")
        self.assertEqual(c["notes"], [("answered alone", 0)])

    @defer.inlineCallbacks
    def test_renegotiationRefused(self):
        """A TLS 1.2 peer asks to renegotiate: the server's SSL_read refuses it with an alert
        it leaves in the write BIO (RP_READ_TLS_OUT), sent at once as Twisted's
        _flushReceiveBIO sends it; the peer gives up on the link, which fails the same way."""
        @defer.inlineCallbacks
        def scenario(run):
            yield run.send(run.peer.records(mixed(2)))
            run.peer.engine.renegotiate()
            try:
                run.peer.engine.do_handshake()
            except SSL.WantReadError:
                pass
            before = run.peer.bytesIn
            yield run.send(run.peer._out())
            run.peer.receive()
            run.notes.append(("answered alone", run.peer.bytesIn > before, run.peer.end))
            run.peer.sock.close()   # (the peer's TLS failed: it drops the link)
        twisted, c = yield self.compare(scenario, engine="tls1.2", linkUp=False)
        self.assertEqual(c["notes"][0][:2], ("answered alone", True))
        self.assertEqual(self.runs[1].reader.tls.flushed, 1)


class ConditionTests(TLSReadTests):
    """Each condition under which C must not read takes Twisted's path, and the C read comes
    back once it holds again."""

    @defer.inlineCallbacks
    def test_closingLinkIsTwisteds(self):
        run = Run(self, True)
        yield run.start()
        tlsReader = run.reader.tls
        self.assertTrue(tlsReader.installed)
        run.connection.goAway(0, "going")   # the server closes: TLS disconnecting
        self.assertTrue(run.tls.disconnecting)
        reads = tlsReader.reads
        yield run.send(run.peer.records(gre(1)))
        self.assertFalse(tlsReader.installed)
        self.assertEqual(tlsReader.reads, reads)

    @defer.inlineCallbacks
    def test_appSendBufferIsTwisteds(self):
        """Writes Twisted's TLS holds until a read (as in a renegotiation): its read first."""
        run = Run(self, True)
        yield run.start()
        tlsReader = run.reader.tls
        run.tls._appSendBuffer.append(F.Ping(b"held1234").encode())
        reads = tlsReader.reads
        yield run.send(run.peer.records(gre(1) + F.Control(SID, b"y").encode()))
        self.assertEqual(tlsReader.reads, reads)
        self.assertTrue(tlsReader.installed)    # back: its dataReceived unbuffered it
        yield run.send(run.peer.records(gre(2)))
        self.assertEqual(tlsReader.reads, reads + 1)
        yield run.until(lambda: (run.peer.receive() or True) and
                        ("Ping", 0, b"held1234") in run.peer.frames, "the held PING")
        self.assertEqual(len(run.gre()), 2)

    @defer.inlineCallbacks
    def test_abortedLinkIsTwisteds(self):
        run = Run(self, True)
        yield run.start()
        tlsReader = run.reader.tls
        run.tls.abortConnection()
        self.assertFalse(tlsReader.usable())
        yield run.connection.whenLinkLost()
        self.assertIsNot(run.tcp.__dict__.get("doRead"), tlsReader._doRead)

    @defer.inlineCallbacks
    def test_notTLSNoReader(self):
        """A link that is not Twisted's TLS over a socket gets no C read."""
        run = Run(self, True)
        yield run.start()
        self.assertIsNone(NativeTLSReader.over(MODULE, run.tcp, run.reader))
        self.assertIsNone(NativeTLSReader.over(MODULE, None, run.reader))
        self.assertIsNotNone(NativeTLSReader.over(MODULE, run.tls, run.reader))

    def test_switch(self):
        self.assertTrue(LinkReader.tlsRead)
