"""The native link read (routeproxy/native/link.c, routeproxy.flows.LinkFlows) against the
Python path, stream by stream, on either daemon.

An LRP and an RRP joined in memory (tests/support/relay.py), one of which (the "facing"
side: the RRP towards pptpd, or the LRP towards its client) has a real GREPort sending on
real raw GRE sockets on the loopback (the C path sends on the very descriptor sendGRE uses),
once as is and once with ``--gre-capture native``'s link read.  Each scenario writes the
same bytes, in the same reads, into that side's mux connection (what Twisted's TLS hands it
decrypted) and compares the GRE that reached the peer (byte for byte, with its source and
destination, so its key: ``S`` to pptpd, ``C`` to the client), the frames left for Python
(by their effects: the mux's, the sessions', the call's, the relay's and the port's
counters, the link's state) and, native only, that C sent the common frames.  Needs root
(raw sockets) and the built module; CI may not skip the module.
"""
import itertools
import os
import random
import socket
import time

from twisted.trial import unittest

from routeproxy import native, pptp
from routeproxy.capture import DLT_EN10MB
from routeproxy.flows import LinkFlows
from routeproxy.greport import GREPort
from routeproxy.mux import frames as F
from routeproxy.testing import MemoryGRESystem, RecordingGREReceiver
from tests.support import netns
from tests.support.relay import RelayHarness

MODULE, REASON = native.load()
_HARNESSES = itertools.count()


def addresses():
    """The facing side's source and its peer's address for one harness (a second source:
    .3): on the loopback (the raw sends arrive), of this process and harness only (trial -j
    runs tests side by side)."""
    net = f"127.{100 + os.getpid() % 150}.{next(_HARNESSES) % 250}"
    return f"{net}.1", f"{net}.2"


class RawSendSystem(MemoryGRESystem):
    """Captures in memory, sends on real raw sockets (GRE, and IPPROTO_RAW for C's headers)."""

    def openRawSocket(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_GRE)
        self.sockets.append(sock)
        return sock

    def openHeaderSocket(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.headerSockets.append(sock)
        return sock


class LinkHarness(RelayHarness):
    native = False
    side = "rrp"   # whose link read: "rrp" (GRE to pptpd) or "lrp" (GRE to the client)

    def facingGREPort(self, receiver):
        port = GREPort(receiver, [self.source], reactor=self.reactor,
                       system=RawSendSystem(DLT_EN10MB), capture="pcap", maxSojourn=0)
        port.startListening()
        self.addCleanup(port.stopListening)
        return port

    def prepare(self):
        self.relay = (self.lrp if self.side == "lrp" else self.rrp).relay
        factory = self.client_factory if self.side == "lrp" else self.server_factory
        self.flows = None
        if self.native:
            self.flows = factory.linkFlows = LinkFlows(MODULE, self.relay.grePort)
            self.relay.addFlows(self.flows)

    def setUp(self):
        if MODULE is None:
            if os.environ.get("CI") == "true":
                self.fail(f"CI=true and {REASON}")
            raise unittest.SkipTest(REASON)
        if os.geteuid() != 0:
            raise unittest.SkipTest("raw GRE sockets need root")
        self.source, self.peerIP = addresses()
        self.source2 = self.source[:-1] + "3"
        self.names = {self.source: "source", self.peerIP: "peer", self.source2: "source2"}
        self.marks = []   # what a scenario's watch() saw as Python handled its frames
        clientIP = "10.0.0.5"
        if self.side == "lrp":
            self.lrpIP, clientIP, self.lrpGREPort = self.source, self.peerIP, self.facingGREPort
        else:
            self.rrpSource, self.serverIP, self.rrpGREPort = (self.source, self.peerIP,
                                                              self.facingGREPort)
        self.sink = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_GRE)
        self.sink.setblocking(False)
        self.sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.addCleanup(self.sink.close)
        RelayHarness.setUp(self)
        client, server = self.connect_client(clientIP)
        self.client, self.server = client, server
        self.server_call_id = 70
        self.dial(client, server, 7, self.server_call_id)
        if self.side == "lrp":
            self.connection, [self.far] = self.lrp.link, self.rrp.links
        else:
            [self.connection], self.far = self.rrp.links, self.lrp.link
        [self.session] = self.relay.sessions
        self.call = self.session.book.calls[0]
        self.sid, self.tag = self.session.mux.id, self.call.pns_id
        self.received()   # nothing of the set-up
        self.gre = []

    def received(self):
        """GRE that reached the peer from the facing side since the last call: (src, dst, gre,
        TTL, DF), from and to the harness's addresses (self.names) only."""
        out = []
        while True:
            try:
                packet = self.sink.recv(70000)
            except BlockingIOError:
                return out
            src, dst = socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20])
            if src in self.names and (dst in self.names or dst in self.peers):
                out.append((src, dst, packet[(packet[0] & 15) * 4:], packet[8], packet[6] & 0x40))

    peers = ()   # more destinations whose GRE is the harness's (a second client's)

    def watch(self, frameType):
        """At each *frameType* frame Python handles: the port's GRE sent and the GRE that
        reached the peers by then (C's GRE before it must be sent and counted, as Python's)."""
        connection = self.connection
        handle = connection._frameReceived

        def frameReceived(frame):
            if isinstance(frame, frameType):
                self.gre.extend(self.received())
                self.marks.append((self.relay.grePort.stats.sent, len(self.gre)))
            handle(frame)
        connection._frameReceived = frameReceived

    def write(self, reads):
        for data in reads:
            self.connection.dataReceived(data)
            self.gre.extend(self.received())
        self.flush()

    def observed(self):
        session, call, port = self.session, self.call, self.relay.grePort.snapshot()
        deadline = time.monotonic() + 5   # what the loopback has not delivered yet
        while len(self.gre) < port["sent"] and time.monotonic() < deadline:
            self.gre.extend(self.received())
        port.pop("native_link", None)
        mux = self.connection.snapshot()
        for key in ("rtt_last_ms", "rtt_smoothed_ms"):
            mux.pop(key)
        name = self.names.get
        # in send order per source and destination (C sends each socket's GRE in order, the
        # sockets one after the other)
        return {
            "gre": sorted([(name(src, src), name(dst, dst), *rest)
                           for src, dst, *rest in self.gre + self.received()],
                          key=lambda sent: sent[:2]),
            "marks": self.marks,
            "sessions": sorted((s.mux.id if s.mux else -1, s.greIn, s.greOut, s.greDropped,
                                [(c.gre_out, c.bytes_out) for c in s.book.calls])
                               for s in self.relay.sessions),
            "port": port,
            "drops": self.relay.drops.snapshot(),
            "session": (session.greIn, session.greOut, session.greDropped),
            "mux_session": None if session.mux is None else (session.mux.greIn, session.mux.state),
            "call": (call.gre_out, call.bytes_out, call.established),
            "mux": mux,
            "far": self.far.snapshot()["frames_in"] if self.far else None,
        }


class PythonPath(LinkHarness, unittest.TestCase):
    native = False


class NativePath(LinkHarness, unittest.TestCase):
    native = True


def run(scenario, side="rrp"):
    """*scenario(harness)* -> reads (a list of lists of bytes, run in turn); on both paths,
    on *side*'s link read: (Python's observations, native's, the GRE C took, its sendmmsg
    calls, the GRE it sent with its own IPv4 header)."""
    results = []
    lib = MODULE.lib
    for cls in (PythonPath, NativePath):
        h = cls("run")
        h.side = side
        h.setUp()
        try:
            calls = lib.rp_link_send_calls()
            for reads in scenario(h):
                h.write(reads)
            taken = h.flows.taken if h.native else None
            results.append((h.observed(), taken, lib.rp_link_send_calls() - calls,
                            h.flows.headerWritten if h.native else None))
        finally:
            h.doCleanups()
    (python, _, _, _), (nativeResult, taken, sendCalls, headerSends) = results
    return python, nativeResult, taken, sendCalls, headerSends


def gre(h, i, seq=True, ack=None, tag=None, session=None, size=None):
    payload = bytes([i & 255]) * (size if size is not None else 50 + i)
    return F.encodeGRE(h.sid if session is None else session, h.tag if tag is None else tag, i if seq else None, ack, payload)


def stream(h):
    """GRE of the call (seq, seq and ack, ack only), of another tag, of no session, a
    PING, an ignorable unknown frame, a malformed GRE, a GRE without payload."""
    return b"".join([
        gre(h, 1), gre(h, 2, ack=9), F.Ping(b"12345678").encode(), gre(h, 3),
        gre(h, 4, tag=h.tag + 1), gre(h, 5, session=999), gre(h, 6, seq=False, ack=4, size=0),
        F.UnknownFrame(0x7f | F.IGNORABLE, 0, 0, b"xyz").encode(), gre(h, 7),
        F.encodeHeader(F.GRE, 0, h.sid, 1) + b"\x00", gre(h, 8), gre(h, 9, size=1400),
    ])


def same(case, python, nativeResult):
    """Both paths observed the same (a short message: the GRE lists can be long)."""
    for key in python:
        if python[key] != nativeResult[key]:
            a, b = python[key], nativeResult[key]
            if key == "gre":
                first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                case.fail(f"GRE sent differ: {len(a)} by Python, {len(b)} native, first at {first}")
            case.fail(f"{key}: Python {a!r} != native {b!r}")


class DifferentialTests(unittest.SynchronousTestCase):
    """The RRP's link read (GRE to pptpd, keyed ``S``)."""

    side = "rrp"

    def compare(self, scenario, minimumTaken=1):
        python, nativeResult, taken, self.sendCalls, self.headerSends = run(scenario, self.side)
        same(self, python, nativeResult)
        self.assertGreaterEqual(taken, minimumTaken)
        return python

    def test_stream_in_one_read(self):
        result = self.compare(lambda h: [[stream(h)]], minimumTaken=6)
        self.assertEqual(len(result["gre"]), 7)
        self.assertEqual(result["mux"]["gre_ignored"], {"malformed": 1, "not_open": 1})

    def test_headers_written_by_C(self):
        """C sent what it took with its own IPv4 header, and the peer got the same packets,
        TTL and DF (clear) as from the kernel's header (compare's "gre")."""
        result = self.compare(lambda h: [[stream(h)]], minimumTaken=6)
        self.assertEqual(self.headerSends, len(result["gre"]))
        with socket.socket() as probe:
            ttl = probe.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)
        self.assertEqual({(t, df) for *_, t, df in result["gre"]}, {(ttl, 0)})

    def test_split_at_every_offset(self):
        def scenario(h):
            data = stream(h)
            lengths.append(len(data))
            return [[data[:k], data[k:]] for k in range(len(data) + 1)]
        lengths = []
        python, nativeResult, taken, _, _ = run(scenario, self.side)
        same(self, python, nativeResult)
        reads = lengths[0] + 1
        self.assertEqual((python["port"]["sent"], len(python["gre"])), (7 * reads, 7 * reads))
        self.assertEqual(taken, 7 * reads)   # every GRE of the call by C

    def test_byte_by_byte(self):
        self.compare(lambda h: [[bytes([b]) for b in stream(h)]], minimumTaken=6)

    def test_released_call(self):
        def scenario(h):
            yield [gre(h, 1)]
            h.server.send(pptp.CallDisconnectNotify(call_id=h.server_call_id))
            h.flush()
            yield [gre(h, 2), gre(h, 3)]
        result = self.compare(scenario)
        self.assertEqual(len(result["gre"]), 1)
        self.assertEqual(result["session"][2], 2)

    def test_session_closed(self):
        def scenario(h):
            yield [gre(h, 1) + F.Close(h.sid, 0, "bye").encode() + gre(h, 2)]
            yield [gre(h, 3)]
        result = self.compare(scenario)
        self.assertEqual(len(result["gre"]), 1)

    def test_oversize_frame(self):
        def scenario(h):
            big = F.encodeHeader(F.GRE, 1, h.sid, 1 << 20)
            yield [gre(h, 1) + big + gre(h, 2), gre(h, 3)]
        result = self.compare(scenario)
        self.assertEqual(len(result["gre"]), 1)
        self.assertFalse(result["mux"]["up"])

    def test_garbage(self):
        def scenario(h):
            rng = random.Random(7)
            good = stream(h)
            yield [good[:100]]
            yield [good[100:] + bytes(rng.randrange(256) for _ in range(300))]
            yield [gre(h, 1)]
        self.compare(scenario)

    def test_payload_without_sequence(self):
        """build_gre refuses it: C leaves it to Python, whose receiver fails (the session
        closes); the GRE after it is not sent."""
        def scenario(h):
            yield [gre(h, 1) + gre(h, 2, seq=False) + gre(h, 3)]
        result = self.compare(scenario)
        self.assertEqual(len(result["gre"]), 1)
        self.assertEqual(len(self.flushLoggedErrors(native.gre.GREError)), 2)

    def test_send_errors(self):
        """A send that fails is counted as sendGRE counts it (send_error): the sender's
        descriptor becomes a UDP socket's, whose sendto to port 0 is EINVAL."""
        def scenario(h):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            h.addCleanup(udp.close)
            for source in h.relay.grePort._senders:
                replaceSender(h, source, udp)
            yield [gre(h, 1), gre(h, 2)]
            yield [gre(h, 3)]
        result = self.compare(scenario)
        self.assertEqual(result["port"]["dropped"], {"send_error": 3})
        self.assertEqual(result["session"][1], 3)


    # -- the batched sends (link.c's flush: one sendmmsg per socket, RP_LINK_BATCH at most)

    def test_many_in_one_read(self):
        """More than a batch in one read (three full and a partial one), a full batch, one:
        every packet sent, in order, one sendmmsg per batch."""
        batch = MODULE.lib.RP_LINK_BATCH

        def scenario(h):
            yield [b"".join(gre(h, i, size=i * 37 % 1401) for i in range(3 * batch + 5))]
            yield [b"".join(gre(h, i) for i in range(batch))]
            yield [gre(h, 1)]
        total = 4 * batch + 6
        result = self.compare(scenario, minimumTaken=total)
        self.assertEqual((len(result["gre"]), result["port"]["sent"]), (total, total))
        self.assertEqual(self.sendCalls, 4 + 1 + 1)

    def test_arena_full(self):
        """Packets of 16 000 bytes: the batch's bytes (256 KiB) fill before its count."""
        def scenario(h):
            yield [b"".join(gre(h, i, size=16000) for i in range(40))]
        result = self.compare(scenario, minimumTaken=40)
        self.assertEqual(len(result["gre"]), 40)
        self.assertEqual(self.sendCalls, 3)   # 16 + 16 + 8

    def test_order_with_python_frames(self):
        """GRE before a frame Python handles is sent and counted when Python handles it (C
        flushes before it returns): the port's sent and what reached the peer, at each PING."""
        batch = MODULE.lib.RP_LINK_BATCH

        def scenario(h):
            h.watch(F.Ping)
            ping = F.Ping(b"12345678").encode()
            yield [b"".join([gre(h, i) for i in range(batch + 3)] + [ping, gre(h, 1), gre(h, 2), ping]
                            + [gre(h, 3, tag=h.tag + 1)] + [gre(h, i) for i in range(5)] + [ping])]
        result = self.compare(scenario)
        n = batch + 3
        self.assertEqual(result["marks"], [(n, n), (n + 2, n + 2), (n + 7, n + 7)])

    def test_entries_and_sockets_interleaved(self):
        """Three entries on two sockets (a second session from the same source, a third
        from a second source), their frames interleaved over several batches with a PING
        among them: each socket's GRE in order, every counter per call and session."""
        def scenario(h):
            sid2, tag2 = addSession(h, h.source)
            sid3, tag3 = addSession(h, h.source2, callIDs=(9, 72))
            h.watch(F.Ping)
            frames = []
            for i in range(60):
                frames += [gre(h, i), gre(h, i, session=sid2, tag=tag2, size=i),
                           gre(h, i, session=sid3, tag=tag3)]
                if i == 30:
                    frames.append(F.Ping(b"12345678").encode())
            yield [b"".join(frames)]
        result = self.compare(scenario, minimumTaken=180)
        self.assertEqual(len(result["gre"]), 180)
        self.assertEqual({sent[:2] for sent in result["gre"]}, {("source", "peer"), ("source2", "peer")})
        self.assertEqual(len(result["sessions"]), 3)
        self.assertLessEqual(self.sendCalls, 10)

    def test_socket_error_mid_batch(self):
        """Every send on one of two sockets fails (EINVAL: a UDP socket's descriptor in its
        place) while the other's go, interleaved in one batch and beyond."""
        def scenario(h):
            sid2, tag2 = addSession(h, h.source2)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            h.addCleanup(udp.close)
            replaceSender(h, h.source2, udp)
            yield [b"".join(gre(h, i) + gre(h, i, session=sid2, tag=tag2) for i in range(100))]
        result = self.compare(scenario, minimumTaken=200)
        self.assertEqual(result["port"]["dropped"], {"send_error": 100})
        self.assertEqual((result["port"]["sent"], len(result["gre"])), (100, 100))


def replaceSender(h, source, sock):
    """The facing port's sockets that send from *source* (both: Python's and C's) become
    *sock*'s descriptor."""
    sender = h.relay.grePort._senders[source]
    for own in (sender.socket, sender.headerSocket):
        os.dup2(sock.fileno(), own.fileno())


def addSession(h, source, clientIP=None, callIDs=(8, 71)):
    """Another session with a call, sent from *source* on h's facing side (h.source2:
    another raw socket) to h's peer (or, on the LRP, to a client at *clientIP*): its mux id
    and tag."""
    before = set(h.relay.sessions)
    if h.side == "lrp":
        h.lrpIP = source
    else:
        h.rrpSource = source
    client, server = h.connect_client(clientIP or (h.peerIP if h.side == "lrp" else "10.0.0.6"))
    h.dial(client, server, *callIDs)
    [session] = set(h.relay.sessions) - before
    return session.mux.id, session.book.calls[0].pns_id


class LRPDifferentialTests(DifferentialTests):
    """The LRP's link read (GRE to the client, keyed ``C``)."""

    side = "lrp"

    def test_destination_refused_mid_batch(self):
        """One socket, two clients, one of which (a broadcast address) the kernel refuses
        (EACCES): sendmmsg stops at each of its packets, which are counted as send_error,
        and the rest are sent, in order."""
        def scenario(h):
            sid2, tag2 = addSession(h, h.source, clientIP="255.255.255.255")
            yield [b"".join(gre(h, i) + gre(h, i, session=sid2, tag=tag2) * (i % 3)
                            for i in range(90))]
        result = self.compare(scenario, minimumTaken=180)
        self.assertEqual(result["port"]["dropped"], {"send_error": 90})
        self.assertEqual((result["port"]["sent"], len(result["gre"])), (90, 90))
        self.assertEqual([s[2] for s in result["sessions"]], [90, 90])


class LinkFlowsTests(unittest.SynchronousTestCase):
    """Entries: in C while the call is established and its session open."""

    side = "rrp"

    def setUp(self):
        self.h = NativePath("run")
        self.h.side = self.side
        self.h.setUp()
        self.addCleanup(self.h.doCleanups)
        self.flows = self.h.flows

    def inC(self):
        return native.load()[0].lib.rp_link_flows(self.h.connection.nativeReader.state)

    def test_entry_while_established(self):
        self.assertEqual(self.flows.snapshot(), {"entries": 1, "in_c": 1, "sent_by_c": 0,
                                                 "tls_reads": 0, "tls_handed_back": 0,
                                                 "tls_flushed": 0, "sojourn_dropped": 0,
                                                 "header_written": 0, "header_refused": 0})
        self.assertEqual(self.inC(), 1)
        self.h.write([gre(self.h, 1)])
        self.assertEqual(self.h.relay.grePort.snapshot()["native_link"]["sent_by_c"], 1)

    def test_gone_with_the_call(self):
        self.h.server.send(pptp.CallDisconnectNotify(call_id=self.h.server_call_id))
        self.h.flush()
        self.assertEqual((len(self.flows), self.inC()), (0, 0))

    def test_gone_with_the_session(self):
        self.h.write([F.Close(self.h.sid, 0, "bye").encode()])
        self.assertEqual((len(self.flows), self.inC()), (0, 0))

    def test_gone_with_the_link(self):
        self.h.connection.linkLost("test")
        self.assertEqual(len(self.flows), 0)

    def test_gone_with_the_sender(self):
        self.h.relay.grePort.linkFlows.senderClosing(self.h.source)
        self.assertEqual((len(self.flows), self.inC()), (1, 0))


class LRPLinkFlowsTests(LinkFlowsTests):
    side = "lrp"


class HeaderRefusedTests(unittest.SynchronousTestCase):
    """GRE longer than the device's MTU: C's header socket (IP_HDRINCL never fragments)
    refuses it, and C sends it on the port's other socket, which fragments it, DF clear, as
    sendGRE would (a real client's 1500-byte PPP frame is ~1550 bytes of GRE), and the
    entry's packets as long after it go there first: refused once, not each time."""

    def setUp(self):
        if MODULE is None:
            raise unittest.SkipTest(REASON)
        lab = netns.lab_for(self)
        ns = lab.namespace("header")
        lab.run(ns, ["ip", "link", "set", "lo", "mtu", "1500"])
        port = GREPort(RecordingGREReceiver(), ["127.0.0.1"], capture="raw")
        with lab.inside(ns):
            port.startListening()
            self.sink = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_GRE)
        self.addCleanup(port.stopListening)
        self.addCleanup(self.sink.close)
        self.sink.settimeout(2)
        lib, ffi = self.lib, self.ffi = MODULE.lib, MODULE.ffi
        self.state = ffi.gc(lib.rp_link_new(), lib.rp_link_free)
        lib.rp_link_set_flow(self.state, 1, 7, port.senderFileno("127.0.0.1"),
                             *port.headerSender("127.0.0.1"), socket.inet_aton("127.0.0.2"), 0x1234)

    def test_too_long_is_fragmented(self):
        lib, ffi = self.lib, self.ffi
        sizes = (1000, 3000, 1400, 3000, 3000, 1400)   # two calls of three
        out, outLength = ffi.new("uint8_t **"), ffi.new("size_t *")
        for first in (0, 3):
            data = b"".join(F.encodeGRE(1, 7, i, None, bytes([i]) * sizes[i])
                            for i in range(first, first + 3))
            self.assertEqual(lib.rp_link_feed(self.state, data, len(data), 1 << 14, out,
                                              outLength), lib.RP_LINK_DONE)
        arrived = []
        while len(arrived) < len(sizes):
            packet = self.sink.recv(70000)   # reassembled: a raw socket's datagrams are whole
            if packet[16:20] == socket.inet_aton("127.0.0.2"):
                arrived.append(packet)
        self.assertEqual([(len(p) - 20 - 12, p[32], p[6] & 0x40) for p in arrived],
                         [(size, i, 0) for i, size in enumerate(sizes)])
        deltas = ffi.new("struct rp_link_delta[]", 4)
        self.assertEqual(lib.rp_link_take_deltas(self.state, deltas, 4), 1)
        self.assertEqual((deltas[0].packets, deltas[0].sent, deltas[0].errors,
                          deltas[0].header_written, deltas[0].header_refused), (6, 6, 0, 3, 1))
