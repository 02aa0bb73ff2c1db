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
from routeproxy.testing import MemoryGRESystem
from tests.support.native import receivedGRE
from tests.support.relay import RelayHarness

MODULE, REASON = native.load()
_HARNESSES = itertools.count()


def addresses():
    """The facing side's source and its peer's address for one harness: on the loopback
    (the raw sends arrive), of this process and harness only (trial -j runs tests side by
    side)."""
    net = f"127.{100 + os.getpid() % 150}.{next(_HARNESSES) % 250}"
    return f"{net}.1", f"{net}.2"


class RawSendSystem(MemoryGRESystem):
    """Captures in memory, sends on real raw GRE sockets."""

    def openRawSocket(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_GRE)
        self.sockets.append(sock)
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
        """GRE that reached the peer from the facing side since the last call: (src, dst, gre)."""
        return [(self.source, self.peerIP, data)
                for data in receivedGRE(self.sink, self.source, self.peerIP)]

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
        return {
            "gre": [(src == self.source, dst == self.peerIP, data)
                    for src, dst, data in self.gre + self.received()],
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
    on *side*'s link read."""
    results = []
    for cls in (PythonPath, NativePath):
        h = cls("run")
        h.side = side
        h.setUp()
        try:
            for reads in scenario(h):
                h.write(reads)
            taken = h.flows.taken if h.native else None
            results.append((h.observed(), taken))
        finally:
            h.doCleanups()
    (python, _), (nativeResult, taken) = results
    return python, nativeResult, taken


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
        python, nativeResult, taken = run(scenario, self.side)
        same(self, python, nativeResult)
        self.assertGreaterEqual(taken, minimumTaken)
        return python

    def test_stream_in_one_read(self):
        result = self.compare(lambda h: [[stream(h)]], minimumTaken=6)
        self.assertEqual(len(result["gre"]), 7)
        self.assertEqual(result["mux"]["gre_ignored"], {"malformed": 1, "not_open": 1})

    def test_split_at_every_offset(self):
        def scenario(h):
            data = stream(h)
            lengths.append(len(data))
            return [[data[:k], data[k:]] for k in range(len(data) + 1)]
        lengths = []
        python, nativeResult, taken = run(scenario, self.side)
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
            for sock in h.relay.grePort._senders.values():
                os.dup2(udp.fileno(), sock.fileno())
            yield [gre(h, 1), gre(h, 2)]
            yield [gre(h, 3)]
        result = self.compare(scenario)
        self.assertEqual(result["port"]["dropped"], {"send_error": 3})
        self.assertEqual(result["session"][1], 3)


class LRPDifferentialTests(DifferentialTests):
    """The LRP's link read (GRE to the client, keyed ``C``)."""

    side = "lrp"


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
                                                 "tls_flushed": 0})
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
