"""A GRE port never takes the GRE it sends as received (docs/gre-io.md, "Our own GRE is never
received"), on the real kernel, on every capture kind.

The RRP beside pptpd (`--pptp-server 127.0.0.1`) sends its GRE to 127.0.0.1 from 127.0.0.1,
the addresses of pptpd's GRE to it, with pptpd's call ID ``S`` as the key.  The host delivers
it locally, so every capture sees it (a raw GRE socket gets a copy of every GRE the host
receives, pcap on `lo` sees it arrive).  Before the mark, the demultiplexer looked ``S`` up
among the RRP's ``R``: usually a phantom ``gre_unknown_call_id`` drop per packet sent, and
where some call's ``R`` equalled ``S``, our copy went to that call's client.

Each test has a network namespace of its own (every raw GRE socket on a host gets a copy of
every GRE it receives, other test processes' too), with the port's capture and send sockets
and a stand-in for pptpd (a plain raw socket bound to 127.0.0.1, as pptpd's) opened there.
Needs root and ``ip netns``.
"""
import errno
import socket

from twisted.internet import reactor, task
from twisted.internet.testing import MemoryReactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from routeproxy import native
from routeproxy.capture import SELF_MARK, SO_MARK
from routeproxy.gredemux import DROP_UNKNOWN_CALL, GREDemultiplexer
from routeproxy.greport import GREPort
from routeproxy.scopes import PerServerScopes
from routeproxy.stats import DropCounter
from routeproxy.testing import MemoryGRESystem, MemoryRawSocket, RecordingGREReceiver
from tests.support import netns
from tests.support.packets import enhanced_gre

HOST = "127.0.0.1"   # the RRP's source and pptpd's address: the `proxy-colocated` lab's


def settle(seconds=0.2):
    return task.deferLater(reactor, seconds, lambda: None)


class _Session:
    def __init__(self, peer):
        self.peerAddress = peer
        self.received = RecordingGREReceiver()   # its waitFor, for what the demux delivers

    def greFromPeer(self, call, seq, ack, payload):
        self.received.greReceived(HOST, HOST, payload)


class _Book:
    def __init__(self, session):
        self.session = session


class _Call:
    def __init__(self, session):
        self.book = _Book(session)


class SelfCaptureMixin:
    """The RRP's port and demultiplexer beside a pptpd on the same host."""

    capture = None
    interface = "any"
    timeout = 30

    def setUp(self):
        if self.capture in ("native", "native-raw") and native.load()[0] is None:
            raise unittest.SkipTest(native.load()[1])
        self.lab = netns.lab_for(self)
        self.ns = self.lab.namespace("selfmark")
        self.drops = DropCounter()
        scopes = PerServerScopes()
        self.space = scopes.space_for(HOST)
        self.session = _Session(HOST)
        self.demux = GREDemultiplexer(scopes, self.drops)
        self.demux.peerAddresses[HOST] += 1
        self.port = GREPort(self.demux, [HOST], interface=self.interface, capture=self.capture)
        with self.lab.inside(self.ns):
            self.port.startListening()
            self.pptpd = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
        self.addCleanup(self.port.stopListening)
        self.addCleanup(self.pptpd.close)
        self.pptpd.bind((HOST, 0))

    def call(self):
        """A call of the RRP towards pptpd: its ID R."""
        return self.space.allocate(_Call(self.session))

    def test_send_sockets_marked(self):
        """Every send socket (the native link read's too: senderFileno, and headerSender's,
        where C writes the IPv4 header) carries the mark."""
        for fd in (self.port.senderFileno(HOST), self.port.headerSender(HOST)[0]):
            sock = socket.socket(fileno=fd)
            try:
                self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, SO_MARK), SELF_MARK)
            finally:
                sock.detach()

    async def test_own_gre_not_captured(self):
        """What the port sends to pptpd on this host is not captured back: no phantom drop,
        nothing received, and a call whose R equals the key we send (pptpd's S) gets only
        pptpd's GRE, never our own copy; pptpd's GRE with the same addresses gets through."""
        r = self.call()
        other = self.call()                 # an R no pptpd GRE is sent to
        unknown = (r + 1000) % 65535 + 1    # an S that is no call's R here
        for _ in range(5):
            self.assertTrue(self.port.sendGRE(HOST, HOST, enhanced_gre(r, b"ours, S == R")))
            self.assertTrue(self.port.sendGRE(HOST, HOST, enhanced_gre(unknown, b"ours")))
            self.assertTrue(self.port.sendGRE(HOST, HOST, enhanced_gre(other, b"ours too")))
        await settle(0.1)
        self.pptpd.sendto(enhanced_gre(r, b"from pptpd"), (HOST, 0))   # same addresses, key R
        await self.session.received.waitFor(1)
        await settle()
        self.assertEqual([p for _, _, p in self.session.received.packets], [b"from pptpd"])
        self.assertEqual(self.drops.snapshot(), {})
        self.assertEqual(self.drops[DROP_UNKNOWN_CALL], 0)
        stats = self.port.snapshot()
        self.assertEqual((stats["sent"], stats["received"], stats["delivered"]), (15, 1, 1))
        self.assertEqual(stats["dropped"], {})

    async def test_own_gre_after_new_filter(self):
        """The check survives the filter being replaced (addLocalAddress)."""
        r = self.call()
        self.lab.address(self.ns, "lo", "127.0.0.2/8")
        self.port.addLocalAddress("127.0.0.2")
        for _ in range(5):
            self.port.sendGRE(HOST, HOST, enhanced_gre(r, b"ours"))
            self.port.sendGRE("127.0.0.2", HOST, enhanced_gre(r, b"ours"))
        await settle(0.1)
        self.pptpd.sendto(enhanced_gre(r, b"from pptpd"), (HOST, 0))
        await self.session.received.waitFor(1)
        await settle()
        self.assertEqual([p for _, _, p in self.session.received.packets], [b"from pptpd"])
        self.assertEqual(self.drops.snapshot(), {})
        self.assertEqual(self.port.snapshot()["received"], 1)


class PcapAnyTests(SelfCaptureMixin, unittest.TestCase):
    capture, interface = "pcap", "any"      # a cooked handle: libpcap moves its offsets


class PcapLoTests(SelfCaptureMixin, unittest.TestCase):
    capture, interface = "pcap", "lo"


class RawTests(SelfCaptureMixin, unittest.TestCase):
    capture = "raw"


class NativeAnyTests(SelfCaptureMixin, unittest.TestCase):
    capture, interface = "native", "any"


class NativeLoTests(SelfCaptureMixin, unittest.TestCase):
    capture, interface = "native", "lo"


class NativeRawTests(SelfCaptureMixin, unittest.TestCase):
    capture = "native-raw"


class _NoMarkSocket(MemoryRawSocket):
    """A kernel before 5.17 without CAP_NET_ADMIN: SO_MARK refused."""

    def setsockopt(self, level, option, value):
        if (level, option) == (socket.SOL_SOCKET, SO_MARK):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        super().setsockopt(level, option, value)


class _NoMarkSystem(MemoryGRESystem):
    def openRawSocket(self):
        sock = _NoMarkSocket(self.hostAddresses)
        self.sockets.append(sock)
        return sock


class MarkRefusedTests(unittest.TestCase):
    """Where SO_MARK is refused the port starts and sends anyway, with one warning."""

    def test_starts_and_warns_once(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        system = _NoMarkSystem()
        port = GREPort(RecordingGREReceiver(), ["192.0.2.1", "192.0.2.2"], system=system,
                       reactor=MemoryReactor())
        port.startListening()
        self.addCleanup(port.stopListening)
        self.assertTrue(port.sendGRE("192.0.2.1", "198.51.100.7", b"gre"))
        self.assertEqual(len(system.sockets), 2)
        warnings = [e for e in events if "not marked as ours" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
