"""The loop (docs/fastpath.md step 5; routeproxy/native/loop.c, routeproxy.native.loop) on the
real reactor: a native GREPort capturing real GRE on ``lo`` (sent by a raw socket of the
test's), framing it for a real mutual-TLS mux link on loopback, once with ``--data-plane
pump`` (Twisted's dispatch, one C pump call per wake-up) and once with ``loop`` (the
reactor's poll in C).  The same traffic through both must give the far end the same GRE in
the same order, the Python path the same handed-back frames, and every counter the same;
timers and other fds must still be served while C loops; the link's loss under a stream must
not crash it.  Needs root (pcap, raw sockets) and the built module; skips otherwise (except
under CI for the module).
"""
import dataclasses
import os
import socket
import struct
import threading
import time

from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest

from routeproxy import gre, native
from routeproxy.flows import LinkFlows
from routeproxy.greport import GREPort
from routeproxy.mux.connection import MuxConfig
from tests.support.links import loopbackLink
from tests.support.native import requireNative
from tests.support.packets import ip_fragments, ipv4
from tests.unit.test_native_tls import OrderReceiver

MODULE, REASON = native.load()
RRP, LRP = "rrp.mux.test", "lrp.mux.test"
# on lo, and no other test's nor another trial worker's (--jobs): the pcap sees all of lo.
# The pid's low 15 bits, one to one (never .0): trial's workers have neighbouring pids, and
# "pid & 255 or 1" gave a pid ending in 0x00 the address of the next one (its worker's GRE
# then reached this one's far end: the differential tests failed, in runs where a worker's
# pid ends in 0x00, about 1 in 256)
LOCAL, CLIENT, STRANGER = (f"127.{n}.{os.getpid() >> 7 & 255}.{(os.getpid() & 127) + 1}"
                           for n in (77, 78, 79))
KEY, OTHER_KEY, TAG, CLIENT_KEY = 7, 9, 0x4242, 0x77   # CLIENT_KEY: the client's own ID


def skipUnlessUsable():
    requireNative("pcap and raw sockets")
    if not hasattr(reactor, "_poller"):
        raise unittest.SkipTest(f"needs the epoll reactor, not {type(reactor).__name__}")


def packet(src, data, ident, proto=47):
    """IPv4 to LOCAL with IP ID *ident* (the kernel fills in a zero one: no copy would match)."""
    ip = ipv4(src, LOCAL, data, proto=proto)
    return ip[:4] + struct.pack("!H", ident) + ip[6:]


def greData(key, seq, size=200):
    return gre.build_gre(key, bytes([seq % 251]) * size, seq=seq)


@dataclasses.dataclass
class RelayCounters:
    """What the flow tables need of the relay's session and call (their counters and keys;
    one object is both): FlowTable's (GRE from the client) and LinkFlows' (GRE to it)."""
    mux: object
    peerAddress: str = CLIENT
    localAddress: str = LOCAL
    greIn: int = 0
    greOut: int = 0
    greDropped: int = 0
    local_id: int = KEY
    pns_id: int = TAG
    gre_in: int = 0
    bytes_in: int = 0
    gre_out: int = 0
    bytes_out: int = 0

    @property
    def book(self):
        return self

    def gre_key(self, call):
        return CLIENT_KEY


class Demux:
    """The port's receiver as the relay's is for these calls: GRE of the flow's call from its
    client goes to the mux session (the Python path), any other is recorded."""

    def __init__(self, mux):
        self.mux, self.others = mux, []

    def greReceived(self, src, dst, data):
        key, seq, ack, payload = gre.split_gre(data)
        if key == KEY and src == CLIENT:
            self.mux.sendGRE(TAG, seq, ack, payload)
        else:
            self.others.append((src, dst, key, seq))

    def acceptsFragment(self, src, dst, head):
        return True


class LoopTestCase(unittest.TestCase):
    """A mux link over real TLS, a native GREPort on lo whose flow table has the call, and,
    with ``dataPlane == "loop"``, the loop installed on the reactor."""

    timeout = 60
    capture = "native"   # or "native-raw"

    @defer.inlineCallbacks
    def start(self, dataPlane, maxSojourn=0, linkMaxSojourn=0.0):
        self.far = OrderReceiver()
        config = MuxConfig(pingInterval=60.0, deadTimeout=120.0,   # no PING mid-scenario
                           linkMaxSojourn=linkMaxSojourn)
        self.farSessions = []

        def sessionRequested(session, profile, info):
            self.farSessions.append(session)
            return self.far
        self.port = GREPort(None, [LOCAL], interface="lo", capture=self.capture, reactor=reactor,
                            maxSojourn=maxSojourn)

        def prepare(factory):   # the link read in C (useNativePlane)
            factory.linkFlows = LinkFlows(MODULE, self.port)
        self.lrp, self.server = yield loopbackLink(self, config, sessionRequested, RRP, LRP, prepare)
        server = self.server

        @defer.inlineCallbacks
        def closeLink():
            ends = [self.lrp] + list(server.connections)
            if not self.lrp.closed:
                self.lrp.goAway(0, "test over")
            yield defer.gatherResults([c.whenLinkLost() for c in ends])
        self.addCleanup(closeLink)
        yield self.lrp.whenReady()
        self.near = OrderReceiver()   # what the link read hands Python (control, other GRE)
        self.mux = self.lrp.openSession("office", "1", self.near)
        yield self.mux.whenOpen()
        self.port.receiver = self.demux = Demux(self.mux)
        self.port.startListening()
        self.addCleanup(self.port.stopListening)
        self.relay = RelayCounters(self.mux)
        self.port.flows.callReady(self.relay, self.relay)
        self.port.linkFlows.callReady(self.relay, self.relay)
        self.sink = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_GRE)
        self._clientGRE = []
        self.sink.setblocking(False)
        # every raw GRE socket on the host gets a copy of every GRE, other test processes'
        # too (trial -j): a large buffer (past rmem_max: FORCE, as root), drained per burst
        self.sink.setsockopt(socket.SOL_SOCKET, 33, 1 << 24)   # SO_RCVBUFFORCE
        self.addCleanup(self.sink.close)
        self.loop = None
        if dataPlane == "loop":
            from routeproxy.native.loop import CaptureLoop
            self.loop, reason = CaptureLoop.over(MODULE, reactor, self.port)
            self.assertIsNone(reason)
            self.loop.install()
            self.addCleanup(self.loop.uninstall)
            self.watchdog()
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.addCleanup(self.sender.close)
        yield task.deferLater(reactor, 0.05, lambda: None)   # the capture's filter in place

    def watchdog(self):
        """Wake the reactor from a thread every 0.25 s: a loop deaf to its timeout then shows
        as late timers, not as a test that hangs (trial's own timeout is a timer too)."""
        stop = threading.Event()

        def run():
            while not stop.wait(0.25):
                reactor.callFromThread(lambda: None)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.addCleanup(lambda: (stop.set(), thread.join()))

    def send(self, packets):
        for packet in packets:
            self.sender.sendto(packet, (LOCAL, 0))

    @defer.inlineCallbacks
    def settle(self, want, back=0):
        """Until the far end has *want* GRE frames and the client *back* (or 5 s), then a
        little longer."""
        for _ in range(500):
            if len(self.far.gre()) >= want and len(self.clientGRE()) >= back:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        yield task.deferLater(reactor, 0.05, lambda: None)

    def observed(self):
        """What the far end got, what went the Python path, and every counter but the
        wake-ups (how packets fall into wake-ups is the kernel's timing)."""
        port = self.port.snapshot()
        for name in ("reads", "capture_up", "loop"):
            port.pop(name, None)
        port["native_link"].pop("tls_reads")
        stats = self.lrp.stats
        return {"far": self.far.gre(), "others": self.demux.others, "port": port,
                "near": self.near.events, "client": self.clientGRE(),
                "mux": (stats.framesOut, stats.bytesOut, stats.framesIn, stats.bytesIn,
                        dict(stats.greDropped)),
                "session": (self.mux.greOut, self.mux.greIn, self.relay.greIn, self.relay.greOut,
                            self.relay.greDropped, self.relay.gre_in, self.relay.bytes_in,
                            self.relay.gre_out, self.relay.bytes_out)}

    def clientGRE(self):
        """The GRE the link read sent to the client so far: (key, seq, payload), in order."""
        got = self._clientGRE
        while True:
            try:
                packet = self.sink.recv(1 << 16)
            except BlockingIOError:
                break
            if socket.inet_ntoa(packet[16:20]) == CLIENT:
                key, seq, _, payload = gre.split_gre(packet[(packet[0] & 15) * 4:])
                got.append((key, seq, payload))
        return list(got)


# what each scenario sends, in bursts: a list of lists of IPv4 packets
def common():
    return [[packet(CLIENT, greData(KEY, seq), seq + 1)] for seq in range(40)] + \
           [[packet(CLIENT, greData(KEY, seq), seq + 1) for seq in range(40 + 20 * b, 60 + 20 * b)]
            for b in range(10)]


def mixed():
    """The flow's GRE with what C hands back in between (another key, a fragmented datagram
    of the flow, a wrong source), not local and not GRE frames C drops itself, and a bridge's
    duplicate: the order of the flow's GRE at the far end says the hand-backs kept it."""
    bursts, seq = [], 0
    for b in range(12):
        burst = []
        for i in range(6):
            burst.append(packet(CLIENT, greData(KEY, seq), seq + 1))
            seq += 1
        kind = b % 6
        if kind == 0:
            burst.insert(3, packet(CLIENT, greData(OTHER_KEY, b), 5000 + b))
        elif kind == 1:
            burst[2:2] = ip_fragments(CLIENT, LOCAL, greData(KEY, seq, 600), 256, ident=0x100 + b)
            seq += 1
        elif kind == 2:
            burst.insert(1, packet(STRANGER, greData(KEY, 999), 6000 + b))
        elif kind == 3:
            burst.insert(4, packet(CLIENT, b"not gre", 7000 + b, proto=17))
        elif kind == 4:
            burst.insert(2, burst[1])   # the same packet again at once
        bursts.append(burst)
    return bursts


class DifferentialTests(LoopTestCase):
    """The same traffic through the pump and through the loop: the same result."""

    @defer.inlineCallbacks
    def through(self, dataPlane, bursts, want, replies):
        """*bursts* captured, and after each the far end's *replies* (a function of the
        burst's index: GRE seqs and control, sent back to the client through the link read)."""
        yield self.start(dataPlane)
        (far,) = self.farSessions
        back = 0
        for i, burst in enumerate(bursts):
            self.send(burst)
            for reply in replies(i):
                if isinstance(reply, bytes):
                    far.sendControl(reply)
                else:
                    far.sendGRE(TAG if reply >= 0 else TAG + 1, abs(reply), None,
                                bytes([abs(reply) % 251]) * 300)
                    back += reply >= 0
            yield task.deferLater(reactor, 0.003, lambda: None)
            self.clientGRE()   # drained as it goes (see start)
        yield self.settle(want, back)
        return self.observed()

    @defer.inlineCallbacks
    def compare(self, bursts, want, replies=lambda i: ()):
        skipUnlessUsable()
        pump = yield self.through("pump", bursts, want, replies)
        yield self.tearDownLink()
        loop = yield self.through("loop", bursts, want, replies)
        self.assertEqual(len(loop["far"]), want)
        self.assertEqual({k: (len(loop[k]), len(pump[k])) for k in loop if loop[k] != pump[k]}, {})
        self.assertEqual(loop, pump)
        self.assertGreater(self.port.flows.written, want // 2)   # C wrote them ...
        self.assertGreater(self.loop.wakeUps, 10)               # ... in the loop's wake-ups
        return loop

    @defer.inlineCallbacks
    def tearDownLink(self):
        """The first run's link, port and loop gone before the second starts."""
        calls, self._cleanups = self._cleanups, []
        for function, args, kwargs in reversed(calls):
            yield function(*args, **kwargs)

    def test_common(self):
        return self.compare(common(), 240)

    handedBack = 10   # the other call's, the strangers', the fragments (pcap sees 3 a datagram)

    @defer.inlineCallbacks
    def test_mixed(self):
        loop = yield self.compare(mixed(), 12 * 6 + 2)
        self.assertEqual([key for _, _, key, _ in loop["others"]], [OTHER_KEY, KEY] * 2)
        self.assertEqual(loop["port"]["native"]["handed_back"], self.handedBack)
        self.assertEqual(loop["port"]["duplicates"], 2)

    @defer.inlineCallbacks
    def test_bothWays(self):
        """GRE back from the far end between the captured bursts, for the call (sent to the
        client by the link read), for a call the link read does not know (Python's), and
        control frames: the same GRE at the client, the same frames to Python, in order."""
        def replies(i):
            out = [i * 4 + j for j in range(4)]
            if i % 3 == 0:
                out.insert(2, b"control %d" % i)
            if i % 5 == 1:
                out.insert(1, -(1000 + i))
            return out
        loop = yield self.compare(common(), 240, replies)
        self.assertEqual(len(loop["client"]), 50 * 4)
        self.assertEqual([e[0] for e in loop["near"]].count("g"), 10)
        self.assertGreater(self.loop.linkReads, 10)   # the link read in the loop's C


class RawDifferentialTests(DifferentialTests):
    """The same with --gre-capture native-raw (the raw socket read in C: the kernel has put
    the fragments together, so C frames those datagrams too)."""

    capture = "native-raw"
    handedBack = 4


class StreamTests(LoopTestCase):
    """The reactor's other work while C loops under a steady GRE stream (a thread sends)."""

    def stream(self, seconds, rate=4000):
        stop = threading.Event()

        def run():
            sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            seq, start = 0, time.monotonic()
            while not stop.is_set() and time.monotonic() - start < seconds:
                sender.sendto(ipv4(CLIENT, LOCAL, greData(KEY, seq, 1000)), (LOCAL, 0))
                seq += 1
                time.sleep(max(0.0, start + seq / rate - time.monotonic()))
            sender.close()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.addCleanup(lambda: (stop.set(), thread.join()))
        return thread

    def farEndInThread(self):
        """The far end's socket read (and discarded) by a thread, not the reactor: its reads
        would return control to Python with every frame and hide whether C alone honours the
        timeout or another fd.  The far end is reset at the end (its TLS stream is gone)."""
        from routeproxy.mux.linksocket import bufferingTransport
        stop = threading.Event()
        (connection,) = self.server.connections
        tcp = bufferingTransport(connection._link.transport)
        tcp.stopReading()
        sock = socket.socket(fileno=os.dup(tcp.socket.fileno()))
        sock.settimeout(0.05)

        def drain():
            while not stop.is_set():
                try:
                    sock.recv(1 << 16)
                except OSError:
                    pass
            sock.close()
        thread = threading.Thread(target=drain, daemon=True)
        thread.start()

        def end():
            stop.set()
            thread.join()
            tcp.abortConnection()
        self.addCleanup(end)

    @defer.inlineCallbacks
    def test_timersFireOnTime(self):
        """A callLater made while GRE streams runs on time: C returns at the reactor's timeout."""
        skipUnlessUsable()
        yield self.start("loop")
        self.farEndInThread()
        self.stream(1.5, rate=2000)
        yield task.deferLater(reactor, 0.2, lambda: None)
        late = []
        for delay in (0.05, 0.1, 0.02, 0.2):
            due = time.monotonic() + delay
            yield task.deferLater(reactor, delay, lambda: late.append(time.monotonic() - due))
        self.assertLess(max(late), 0.02, late)
        self.assertGreater(self.loop.wakeUps, 100)   # the stream went through the loop
        self.assertGreater(self.port.flows.written, 1000)

    @defer.inlineCallbacks
    def test_wakeUpsReadNoClock(self):
        """Wake-ups that empty the capture ask no clock (a system call where the clock has no
        vDSO, as in UML): the reactor's deadline is a timer in its epoll, and the gate's age
        is asked only of a read that may leave a queue behind."""
        skipUnlessUsable()
        yield self.start("loop", maxSojourn=0.005)
        self.farEndInThread()
        self.stream(1.0, rate=2000)
        yield task.deferLater(reactor, 1.1, lambda: None)
        snapshot = self.loop.snapshot()
        self.assertTrue(snapshot["timer"])
        self.assertGreater(snapshot["wake_ups"], 500)
        self.assertLess(snapshot["clock_reads"], snapshot["wake_ups"] / 10, snapshot)
        self.assertGreater(self.port.flows.written, 1500)

    @defer.inlineCallbacks
    def test_withoutTheTimerTheClockPerWakeUp(self):
        """Where the timer cannot be had, the deadline is the clock's again, read per wake-up,
        and timers still run on time."""
        skipUnlessUsable()
        yield self.start("loop")
        self.loop.uninstall()   # (closes the timer)
        self.loop._timerTried = True   # as if rp_loop_timer_open had failed
        self.loop.install()
        self.farEndInThread()
        self.stream(1.0, rate=2000)
        yield task.deferLater(reactor, 0.2, lambda: None)
        due = time.monotonic() + 0.05
        late = []
        yield task.deferLater(reactor, 0.05, lambda: late.append(time.monotonic() - due))
        yield task.deferLater(reactor, 0.9, lambda: None)
        snapshot = self.loop.snapshot()
        self.assertFalse(snapshot["timer"])
        self.assertLess(late[0], 0.02)
        self.assertGreaterEqual(snapshot["clock_reads"], snapshot["wake_ups"], snapshot)

    @defer.inlineCallbacks
    def test_otherFdPromptly(self):
        """A UDP datagram arriving while GRE streams is dispatched at once (C returns on a
        fd it does not handle)."""
        skipUnlessUsable()
        yield self.start("loop")
        got = []

        class Recorder(protocol.DatagramProtocol):
            def datagramReceived(self, data, address):
                got.append((time.monotonic(), float(data)))
        udp = reactor.listenUDP(0, Recorder(), interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        self.farEndInThread()
        self.stream(1.0, rate=2000)
        yield task.deferLater(reactor, 0.2, lambda: None)
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(peer.close)

        def ping():   # from a thread: the reactor's thread is in C meanwhile
            for _ in range(5):
                peer.sendto(repr(time.monotonic()).encode(), ("127.0.0.1", udp.getHost().port))
                time.sleep(0.05)
        thread = threading.Thread(target=ping)
        thread.start()
        yield task.deferLater(reactor, 0.4, thread.join)
        self.assertEqual(len(got), 5)
        self.assertLess(max(at - sent for at, sent in got), 0.01, got)
        self.assertGreater(self.loop.wakeUps, 100)

    @defer.inlineCallbacks
    def test_linkLostUnderStream(self):
        """The link reset while C loops: the loop stops writing to it (Python sees the loss
        first), the port goes on, nothing raises."""
        skipUnlessUsable()
        yield self.start("loop")
        self.stream(1.0)
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertGreater(self.port.flows.written, 100)
        for connection in self.server.connections:
            connection._link.transport.abortConnection()   # the far end resets the TCP
        yield self.lrp.whenLinkLost()
        self.port.flows.sessionGone(self.relay)   # as the relay does at the link's loss
        wakeUps, written = self.loop.wakeUps, self.port.flows.written
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertTrue(self.port.connected)
        self.assertGreater(self.loop.wakeUps, wakeUps)   # still looping, on the capture alone
        self.assertEqual(self.port.flows.written, written)
        self.assertEqual(self.flushLoggedErrors(), [])


class GateTests(LoopTestCase):
    """The sojourn gate in C (sojourn.NativeGate): the loop asks it in every state, as
    GREPort._wakeUp does, so a standing queue's wake-ups stay in C (they went to Twisted's
    Python path while the gate counted or dropped: the slower daemon kept the queue
    standing)."""

    @defer.inlineCallbacks
    def oldHead(self, budget, dataPlane="loop"):
        """GRE seq 0 read young, then seq 1 read 10 ms old by a wake-up of *budget*."""
        yield self.start(dataPlane, maxSojourn=0.005)
        self.send([ipv4(CLIENT, LOCAL, greData(KEY, 0))])
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertIsNone(self.port._gate.above_since)
        self.port.maxPacketsPerRead = budget
        self.port.stopReading()
        self.send([ipv4(CLIENT, LOCAL, greData(KEY, 1))])
        time.sleep(0.01)
        before = (self.port.stats.reads, self.loop.wakeUps, dict(self.loop.results),
                  self.loop.clockReads)
        self.port.startReading()
        yield task.deferLater(reactor, 0.05, lambda: None)
        return before

    @defer.inlineCallbacks
    def test_oldHeadStartsTheGateInC(self):
        """A full read (a queue may stand behind it) whose head is older than the target: C
        observes it (the gate starts counting) and goes on; nothing returns to Python."""
        skipUnlessUsable()
        reads, wakeUps, runs, _ = yield self.oldHead(1)
        self.assertIsNotNone(self.port._gate.above_since)
        self.assertEqual(self.port.stats.reads - reads, self.loop.wakeUps - wakeUps)
        self.assertGreater(self.loop.wakeUps, wakeUps)
        lib = MODULE.lib
        returned = {r for r, n in self.loop.results.items() if n != runs.get(r, 0)}
        self.assertEqual(returned - {lib.RP_LOOP_TIMEOUT, lib.RP_LOOP_OTHER, lib.RP_LOOP_SIGNAL},
                         set())   # (the old loop returned 4, for Python's gate to observe)
        yield self.settle(2)
        self.assertEqual([seq for seq, _ in self.far.gre()], [0, 1])

    @defer.inlineCallbacks
    def test_oldHeadOfAnEmptiedCaptureIsYoung(self):
        """The same old head, read by a wake-up that emptied the capture: no queue stands
        (RFC 8289), and C asks no clock for it."""
        skipUnlessUsable()
        reads, wakeUps, _, clocks = yield self.oldHead(64)
        self.assertIsNone(self.port._gate.above_since)
        self.assertEqual(self.port.stats.reads - reads, self.loop.wakeUps - wakeUps)
        self.assertEqual(self.loop.clockReads, clocks)
        yield self.settle(2)
        self.assertEqual([seq for seq, _ in self.far.gre()], [0, 1])

    @defer.inlineCallbacks
    def standing(self, dataPlane):
        """A gate already dropping meets 30 frames 120 ms old (past its ceiling), then 10
        young ones: what each plane dropped and delivered, and the wake-ups C made."""
        yield self.start(dataPlane, maxSojourn=0.005)
        self.send([ipv4(CLIENT, LOCAL, greData(KEY, 0))])
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.port.stopReading()
        self.send([packet(CLIENT, greData(KEY, seq), seq + 1) for seq in range(1, 31)])
        time.sleep(0.12)
        gate = self.port._gate.state
        gate.dropping, gate.above_since, gate.count = 1, time.time() - 1.0, 1
        gate.drop_next = time.time() + 10.0   # none due by the law: only the ceiling drops
        self.port.maxPacketsPerRead = 4       # full reads: the queue stands while it lasts
        reads, wakeUps = self.port.stats.reads, self.loop.wakeUps if self.loop else 0
        refused = []   # iterations the loop left to Twisted's dispatch meanwhile
        if self.loop:
            usable = self.loop.usable

            def counted():
                link = usable()
                if link is False:
                    refused.append(1)
                return link
            self.loop.usable = counted
        self.port.startReading()
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.send([packet(CLIENT, greData(KEY, seq), seq + 1) for seq in range(31, 41)])
        yield self.settle(11)
        inC = (self.loop.wakeUps - wakeUps) if self.loop else 0
        return (self.port.snapshot()["dropped"], [seq for seq, _ in self.far.gre()],
                bool(self.port._gate.dropping), len(refused), self.port.stats.reads - reads - inC,
                inC)

    @defer.inlineCallbacks
    def test_aStandingQueueIsDroppedInTheLoop(self):
        """The frames past the ceiling are dropped and counted, the young ones delivered, the
        episode ends, as through Twisted's dispatch (the pump), and C made the wake-ups."""
        skipUnlessUsable()
        pump = yield self.standing("pump")
        yield DifferentialTests.tearDownLink(self)
        loop = yield self.standing("loop")
        self.assertEqual(loop[:3], pump[:3])
        dropped, far, dropping, refused, inPython, inC = loop
        self.assertEqual(dropped.get("sojourn"), 30)
        self.assertEqual(far, [0] + list(range(31, 41)))
        self.assertFalse(dropping)
        self.assertEqual(refused, 0)
        self.assertGreater(inC, inPython)   # (Twisted's dispatch reads when another fd is ready)


class QueueLimitTests(LoopTestCase):
    """The link's GRE limit lowered to a slow path's (routeproxy.mux.queuelimit): the loop's C
    admits GRE up to it, not up to the watermark.  The path's rate is the one part given, not
    measured (a real slow path's, through tc: test_queuelimit.KernelRateTests)."""

    @defer.inlineCallbacks
    def unsentAfterFlood(self, rate):
        skipUnlessUsable()
        yield self.start("loop")
        if rate is not None:
            self.lrp._link.deliveryRate = lambda: (rate, False)
            self.lrp.queueLimit.observe(reactor.seconds(), rate, False, self.lrp.config.greWatermark)
        for far in self.server.connections:
            far._link.transport.pauseProducing()   # the far end reads nothing: unsent bytes grow
            self.addCleanup(far._link.transport.resumeProducing)
        written = self.port.flows.written
        for burst in range(60):   # 1.2 MB of GRE
            self.send([packet(CLIENT, greData(KEY, seq, 1000), seq + 1)
                       for seq in range(burst * 20, burst * 20 + 20)])
            yield task.deferLater(reactor, 0.005, lambda: None)
        yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertGreater(self.port.flows.written, written)   # C wrote GRE of the flood
        return self.lrp._link.sendBufferSize()

    @defer.inlineCallbacks
    def test_theLoopAdmitsGREToTheLoweredLimit(self):
        rate = 6.5e6   # bytes/s: 10 ms of it, 65 kB, is the limit
        unsent = yield self.unsentAfterFlood(rate)
        self.assertEqual(self.lrp.greLimit, 65000)
        self.assertGreater(self.loop.wakeUps, 30)   # C took the flood, under the limit
        self.assertGreater(unsent, 65000 // 2)
        self.assertLess(unsent, 65000 + 25000)   # the limit and one burst's frames at most
        self.assertGreater(self.lrp.queueLimit.snapshot(self.lrp.config.greWatermark)["lowered"], 0)

    @defer.inlineCallbacks
    def test_theWatermarkWithoutARate(self):
        unsent = yield self.unsentAfterFlood(None)
        self.assertEqual(self.lrp.greLimit, self.lrp.config.greWatermark)
        self.assertGreater(unsent, 200000)


class RoomAfterAskingTests(LoopTestCase):
    """A wake-up's frames pass the room the unsent ceiling carried over leaves: the link was
    not asked this turn, so the first frame past it is the pump's hand-back (RP_BACK_BUDGET).
    The loop asks the link itself, as MuxConnection._roomAfterAsking does, and goes on in C:
    at 30 k packets/s of 1400 bytes that hand-back sent a wake-up to Python 70 times a
    second, each with the turns after it."""

    @defer.inlineCallbacks
    def ceilingNearTheLimit(self, dataPlane):
        yield self.start(dataPlane)
        self.send([ipv4(CLIENT, LOCAL, greData(KEY, 0))])
        yield self.settle(1)
        captures = self.loop.results.get(MODULE.lib.RP_LOOP_CAPTURE, 0) if self.loop else 0
        self.lrp._unsentCeiling = self.lrp.greLimit - 3000   # two frames' room, by the ceiling
        self.send([packet(CLIENT, greData(KEY, seq, 1000), seq + 1) for seq in range(1, 21)])
        yield self.settle(21)
        observed = self.observed()
        if self.loop:
            observed["captures"] = self.loop.results.get(MODULE.lib.RP_LOOP_CAPTURE, 0) - captures
        return observed

    @defer.inlineCallbacks
    def test_theLoopAsksTheLinkItself(self):
        skipUnlessUsable()
        pump = yield self.ceilingNearTheLimit("pump")
        yield DifferentialTests.tearDownLink(self)
        loop = yield self.ceilingNearTheLimit("loop")
        self.assertEqual([seq for seq, _ in loop["far"]], list(range(21)))
        self.assertEqual(loop.pop("captures"), 0)
        # C framed and counted every frame (the pump plane's Python path took the one it
        # handed back: this test's Demux counts no relay's greIn); all else, what each end got
        # and every other counter, the same
        self.assertEqual(loop["port"].pop("native")["framed"], 21)
        self.assertEqual(loop.pop("session")[2], 21)
        pump["port"].pop("native"), pump.pop("session")
        self.assertEqual(loop, pump)

