"""``--gre-capture native-raw`` (routeproxy/native/rawcap.c) against the Python path that reads
the same kind of socket (``--gre-capture raw``), on the real kernel.

Each harness gets a network namespace of its own with the test's addresses on its loopback;
its GRE port's capture socket is opened there, and the scenarios' packets are sent there
from a raw socket with IP_HDRINCL, so the kernel reassembles fragments and the capture reads
what a daemon would (tests/unit/test_native_pump.py's harness and comparisons otherwise:
the link bytes, the hand-backs in order, every counter).  Needs root and ``ip netns``.
"""
import select
import socket
import struct
import time

from twisted.trial import unittest

from routeproxy.capture import DLT_RAW, NativeRawCapture, greFilter
from routeproxy.shard import Shard
from routeproxy.testing import MemoryGRESystem, MemoryRawSocket
from tests.support import netns
from tests.support.native import runBoth
from tests.support.packets import ip_fragments, ipv4
from tests.support.relay import LRP_IP, RRP_SOURCE, SERVER_IP
from tests.unit.test_native_pump import CLIENT, MODULE, OTHER, REASON, PumpHarness, _Gate, gre

ADDRESSES = (CLIENT, OTHER, LRP_IP, RRP_SOURCE, SERVER_IP)


def packet(src, dst, payload, ident):
    """An IPv4 packet with its own IP ID (the kernel would pick one for a zero ID)."""
    data = ipv4(src, dst, payload)
    return data[:4] + struct.pack("!H", ident) + data[6:]


class Injector:
    """Sends whole IPv4 packets into the namespace (IP_HDRINCL); ``add`` is MemoryCapture's."""

    def __init__(self, lab, ns):
        with lab.inside(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)

    def add(self, data, timestamp=None):
        self.sock.sendto(data, (socket.inet_ntoa(data[16:20]), 0))

    def close(self):
        self.sock.close()


class NamespaceGRESystem(MemoryGRESystem):
    """The capture socket opened in *ns*; the port's send sockets stay fakes.
    ``captures[0]`` injects packets into *ns*; ``opened`` is the capture itself."""

    def __init__(self, lab, ns, module):
        super().__init__(DLT_RAW)
        self.lab, self.ns, self.module = lab, ns, module
        self.captures.append(Injector(lab, ns))
        self.opened = None

    def openRawSocket(self):
        if self.opened is not None:   # the capture is opened first (GREPort.startListening)
            return MemoryRawSocket()
        with self.lab.inside(self.ns):
            self.opened = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
        return self.opened

    def openNativeRawCapture(self, module, snaplen, bufferSize, bpf):
        with self.lab.inside(self.ns):
            self.opened = NativeRawCapture(module, snaplen, bufferSize, bpf)
        return self.opened


class SocketHarness(PumpHarness):
    def makeSystem(self):
        reason = netns.unavailable_reason()
        if reason:
            raise unittest.SkipTest(reason)
        lab = netns.lab_for(self)
        ns = lab.namespace("rawcap")
        for address in ADDRESSES:
            lab.address(ns, "lo", f"{address}/32")
        system = NamespaceGRESystem(lab, ns, MODULE)
        self.addCleanup(system.captures[0].close)
        return system

    def feed(self, frames):
        """Send the packets, wait until the capture socket has them, run one wake-up."""
        for item in frames:
            data, _ = item if isinstance(item, tuple) else (item, None)
            self.captured.add(data)
        select.select([self.port.fileno()], [], [], 1.0)
        self.writes.clear()
        self.port.doRead()
        written = list(self.writes)
        self.flush()
        return written


class RawPython(SocketHarness, unittest.TestCase):
    capture = "raw"


class RawNative(SocketHarness, unittest.TestCase):
    capture = "native-raw"


def run(scenario, side="lrp", check=None):
    """*scenario(harness, key)* yields wake-ups' packet lists; on both paths of *side*:
    (python observed, native observed, native hand-backs)."""
    return runBoth((RawPython, RawNative), scenario, side, check=check)


def data(h, key, n, size=100, ident=None, src=None, **more):
    return packet(src or h.peer, h.local, gre(key, bytes([n % 256]) * size, seq=n, **more),
                  0x1000 + n if ident is None else ident)


def fragments(h, key, n, size=1700, each=1480):
    """GRE of *size* payload bytes in fragments of *each* bytes (1480: as the client's kernel
    sends it at MTU 1500); the capture socket gets the datagram the kernel put together."""
    return ip_fragments(h.peer, h.local, gre(key, b"F" * size, seq=n), each, ident=0x2000 + n)


def common(h, key):
    yield [data(h, key, n, 100 + n, ack=n if n % 2 else None) for n in range(1, 6)]
    yield [data(h, key, n) for n in range(6, 8)]


def mixed(h, key):
    yield [
        data(h, key, 1, 300), data(h, key, 1, 300),                  # a bridge's second copy
        *fragments(h, key, 2),                                       # reassembled: framed in C
        data(h, key, 3, 50, ack=9),
        data(h, key, 4, 20, src=OTHER),                              # wrong source
        data(h, key ^ 0x5555, 5, 20),                                # unknown key
        packet(h.peer, h.local, b"", 0x3006),                        # no GRE at all
        packet(h.peer, h.local, gre(key, b"m" * 8, seq=7, version=0), 0x3007),  # malformed
        packet(h.peer, h.local, gre(key, ack=11), 0x3008),           # an ack alone
        *fragments(h, key, 12, 1900, 800),                           # three fragments
        data(h, key, 13, 64),
    ]


def handed_back_in_between(h, key):
    """Hand-backs in the middle of one recvmmsg batch, packets after them: order kept."""
    yield [data(h, key, 1), data(h, key, 2), data(h, key ^ 0x5555, 3), data(h, key, 4),
           *fragments(h, key, 5), data(h, key, 6, src=OTHER), data(h, key, 7), data(h, key, 8)]


def watermark(h, key):
    h.link.config.greWatermark = 9000
    batch = [data(h, key, n, 1000) for n in range(40)]
    yield batch
    yield [data(h, key, n, 1000, ident=0x5000 + n) for n in range(40)]


class DifferentialTests(unittest.SynchronousTestCase):
    """The LRP's capture (GRE from the client)."""

    side = "lrp"

    def compare(self, scenario, backs, **more):
        python, nativeResult, handedBack = run(scenario, self.side, **more)
        self.assertEqual(nativeResult["written"], python["written"])
        self.assertEqual(nativeResult, python)
        self.assertEqual(handedBack, backs)
        return python

    def test_common(self):
        seen = self.compare(common, [])
        self.assertEqual(seen["port"]["delivered"], 7)
        self.assertEqual(len(seen["far_gre"]), 7)

    def test_mixed(self):
        """Fragmented GRE arrives whole and is framed in C (no hand-back, nothing for Python
        to reassemble); a duplicate, wrong source, unknown key, empty, malformed GRE: the
        same counters as the Python path's."""
        def check(h):
            if h.capture == "native-raw":
                self.assertEqual(h.port.flows.snapshot()["framed"], 6)
        seen = self.compare(mixed, ["wrong_source", "unknown_key", "malformed"], check=check)
        port = seen["port"]
        self.assertEqual((port["duplicates"], port["fragments"], port["reassembled"]), (1, 0, 0))
        self.assertEqual(port["dropped"], {"truncated": 1})
        self.assertEqual([(g.seq, len(g.payload)) for _, _, g in seen["far_gre"] if g.seq],
                         [(1, 300), (2, 1700), (3, 50), (12, 1900), (13, 64)])

    def test_handed_back_in_between(self):
        seen = self.compare(handed_back_in_between, ["unknown_key", "wrong_source"])
        self.assertEqual([g.seq for _, _, g in seen["far_gre"]], [1, 2, 4, 5, 7, 8])

    def test_watermark(self):
        seen = self.compare(watermark, ["budget"])
        self.assertTrue(seen["mux"]["gre_dropped"].get("watermark"))


class RRPDifferentialTests(DifferentialTests):
    """The RRP's capture (GRE from pptpd)."""

    side = "rrp"


class NativeRawPortTests(unittest.SynchronousTestCase):
    """What the Python raw path has no twin for: wake-ups, receive times, the kernel filter."""

    def setUp(self):
        self.h = RawNative("run")
        self.h.setUp()
        self.addCleanup(self.h.doCleanups)
        self.key = self.h.open_call()
        self.capture = self.h.system.opened

    def send(self, packets):
        for p in packets:
            self.h.captured.add(p)
        select.select([self.capture.fileno()], [], [], 1.0)

    def test_nothing_left_in_c(self):
        """Small budgets, hand-backs in the middle of recvmmsg batches: after every wake-up
        nothing read stays in C (the reactor would not wake the port for it), and everything
        goes out in order."""
        h, key = self.h, self.key
        h.port.maxPacketsPerRead = 4
        backsAt = {3, 7, 8, 13}
        self.send([data(h, key ^ 0x5555 if n in backsAt else key, n) for n in range(1, 16)])
        for _ in range(10):
            h.port.doRead()
            self.assertEqual(self.capture.pending(), 0)
        h.flush()
        self.assertEqual([g.seq for _, _, g in h.farRelay.grePort.sent],
                         [n for n in range(1, 16) if n not in backsAt])
        self.assertEqual(h.backs, ["unknown_key"] * 4)

    def test_one_read_per_short_batch(self):
        """A wake-up whose read comes back short (the socket emptied) makes no second read
        only to find EAGAIN; what arrives after it is the next wake-up's."""
        h, key = self.h, self.key
        self.send([data(h, key, n) for n in range(1, 4)])
        before = self.capture.reads()
        h.port.doRead()
        self.assertEqual(self.capture.reads() - before, 1)
        self.send([data(h, key, n) for n in range(4, 6)])
        h.port.doRead()
        self.assertEqual(self.capture.reads() - before, 2)
        h.flush()
        self.assertEqual([g.seq for _, _, g in h.farRelay.grePort.sent], [1, 2, 3, 4, 5])

    def test_pump_keeps_what_follows_a_hand_back(self):
        """rp_rawcap_pump itself: a hand-back stops the call; what recvmmsg read after it is
        pumped first by the next; a batch never reads more than the budget left."""
        lib, ffi = MODULE.lib, MODULE.ffi
        state = ffi.gc(lib.rp_pump_new(1 << 16), lib.rp_pump_free)
        lib.rp_pump_set_link(state, 0, -1, b"", 0)
        lib.rp_pump_set_local(state, socket.inet_aton(self.h.local), 1)
        lib.rp_pump_begin(state, 0.0, MODULE.ffi.NULL)
        h = self.h
        self.send([data(h, 900 + n, n) for n in range(1, 6)])   # no flow: each handed back
        n, back = self.capture.pump(state, 128)
        self.assertEqual((n, self.capture.pending()), (1, 4))
        self.assertEqual(struct.unpack_from("!H", back[1], 26)[0], 901)
        n, back = self.capture.pump(state, 1)
        self.assertEqual((n, struct.unpack_from("!H", back[1], 26)[0]), (1, 902))
        for key in (903, 904, 905):
            lib.rp_pump_set_flow(state, key, socket.inet_aton(h.peer), 1, 1, 0)
        lib.rp_pump_begin_link(state, 0, 1 << 20, 0, 4000)
        n, back = self.capture.pump(state, 128)
        self.assertEqual((n, back, self.capture.pending()), (3, None, 0))
        self.send([data(h, 903, n) for n in range(10, 15)])
        n, back = self.capture.pump(state, 3)
        self.assertEqual((n, back, self.capture.pending()), (3, None, 0))  # two left unread
        self.assertEqual(self.capture.pump(state, 128), (2, None))
        self.assertEqual(self.capture.stats(), (10, 0, 0))

    def test_receive_times(self):
        """Each packet carries its kernel receive time: the sojourn gate drops those that
        waited, the younger ones are framed, and the port's head is a wall-clock time."""
        h, key = self.h, self.key
        h.port._gate = gate = _Gate()
        self.send([data(h, key, n) for n in range(1, 4)])
        time.sleep(0.05)
        between = time.time()
        time.sleep(0.05)
        self.send([data(h, key, n) for n in range(4, 6)])
        gate.drop_before = lambda now: between
        gate.dropped = lambda: between
        h.port.doRead()
        h.flush()
        self.assertEqual(h.port.stats.dropped, {"sojourn": 3})
        self.assertEqual(h.backs, ["sojourn"] * 3)
        self.assertEqual([g.seq for _, _, g in h.farRelay.grePort.sent], [4, 5])
        self.assertLess(abs(gate.head - time.time()), 1.0)
        self.assertGreater(gate.head, between)

    def test_filter_in_the_kernel(self):
        """GRE to another local address never reaches the port (the raw Python path counts
        it as not_local); after addLocalAddress it does."""
        h, key = self.h, self.key
        self.send([packet(h.peer, OTHER, gre(key, b"o", seq=1), 0x10),
                   data(h, key, 2)])
        h.port.doRead()
        self.assertEqual((h.port.stats.received, h.port.stats.dropped), (1, {}))
        h.port.addLocalAddress(OTHER)
        self.send([packet(h.peer, OTHER, gre(key, b"o", seq=3), 0x11)])
        h.port.doRead()
        self.assertEqual(h.port.stats.received, 2)


class ShardFilterTests(unittest.SynchronousTestCase):
    """A shard's filter attached to the socket: only its call IDs' GRE is read, fragmented
    or not (the kernel filters the datagram it reassembled)."""

    def test_shard_clause(self):
        if MODULE is None:
            raise unittest.SkipTest(REASON)
        reason = netns.unavailable_reason()
        if reason:
            raise unittest.SkipTest(reason)
        lab = netns.lab_for(self)
        ns = lab.namespace("rawshard")
        for address in ADDRESSES:
            lab.address(ns, "lo", f"{address}/32")
        shard = Shard(1, 2)
        with lab.inside(ns):
            capture = NativeRawCapture(MODULE, 2048, 0, greFilter([LRP_IP], shard.bpf_clause()))
        self.addCleanup(capture.close)
        injector = Injector(lab, ns)
        self.addCleanup(injector.close)
        mine, other = shard.low + 5, shard.low - 5
        for n, key in enumerate((mine, other, mine, other)):
            injector.add(packet(CLIENT, LRP_IP, gre(key, b"s" * 40, seq=n), 0x100 + n))
        for n, key in enumerate((other, mine)):
            for p in ip_fragments(CLIENT, LRP_IP, gre(key, b"F" * 1700, seq=10 + n), 1480,
                                  ident=0x200 + n):
                injector.add(p)
        select.select([capture.fileno()], [], [], 1.0)
        state = MODULE.ffi.gc(MODULE.lib.rp_pump_new(1 << 16), MODULE.lib.rp_pump_free)
        MODULE.lib.rp_pump_set_link(state, 0, -1, b"", 0)
        MODULE.lib.rp_pump_set_local(state, socket.inet_aton(LRP_IP), 1)
        MODULE.lib.rp_pump_begin(state, 0.0, MODULE.ffi.NULL)
        keys = []
        while True:
            n, back = capture.pump(state, 128)
            if back is None:
                break
            keys.append((struct.unpack_from("!H", back[1], 26)[0], len(back[1])))
        self.assertEqual(keys, [(mine, 20 + 12 + 40), (mine, 20 + 12 + 40),
                                (mine, 20 + 12 + 1700)])
