"""The native capture pump (routeproxy/native/pump.c, routeproxy.flows) against the Python
path, frame sequence by frame sequence, on either daemon.

An LRP and an RRP joined in memory (tests/support/relay.py), twice: once the capturing side
(the LRP, GRE from its client keyed ``L``; or the RRP, GRE from pptpd keyed ``R``) has a GRE
port that reads ``--gre-capture pcap`` (GREPort._frameReceived for every frame), once
``native`` (the same frames through rp_pump_frame, fed from Python: :class:`routeproxy.
testing.MemoryNativeCapture`, which calls the C the pcap callback calls).  Each scenario
feeds both the same frames and compares what that side wrote on the link (byte for byte),
the port's, relay's, session's, call's and mux's counters, and (native only) which frames C
handed back and why.  Without the built module these skip with load()'s reason, except
under CI.
"""
import dataclasses
import os
import socket
import struct

from twisted.trial import unittest

from routeproxy import native
from routeproxy import sojourn as sojourn_
from routeproxy.capture import DLT_EN10MB
from routeproxy.greport import GREPort
from routeproxy.testing import MemoryGRESystem
from tests.support.native import runBoth, runPaths
from tests.support.packets import frame, ip_fragments, ipv4
from tests.support.relay import LRP_IP, RRP_SOURCE, SERVER_IP, RelayHarness

MODULE, REASON = native.load()
lib = MODULE.lib if MODULE is not None else None
CLIENT, OTHER = "10.0.0.5", "10.0.0.9"


def gre(key, payload=b"", seq=None, ack=None, version=1):
    """Enhanced GRE by hand (RFC 2637 s4.1)."""
    flags = 0x2000 | version | (0x1000 if seq is not None else 0) | (0x0080 if ack is not None else 0)
    head = struct.pack("!HHHH", flags, 0x880B, len(payload), key)
    if seq is not None:
        head += struct.pack("!I", seq)
    if ack is not None:
        head += struct.pack("!I", ack)
    return head + payload


def eth(ip, ethertype=0x0800):
    return frame(DLT_EN10MB, ip, ethertype)


class PumpHarness(RelayHarness):
    """RelayHarness whose *side* ("lrp" or "rrp") has a real GREPort on a MemoryGRESystem,
    of kind *capture*: ``peer`` is the address it captures GRE from, ``local`` its own."""

    capture = "pcap"
    side = "lrp"

    def capturingGREPort(self, receiver):
        port = GREPort(receiver, [self.local], reactor=self.reactor, system=self.system,
                       capture=self.capture, maxSojourn=0)
        self.ports.append(port)
        return port

    def makeSystem(self):
        """The OS the port captures from: frames added to ``system.captures[0]``."""
        return MemoryGRESystem(DLT_EN10MB)

    def setUp(self):
        if MODULE is None:
            if os.environ.get("CI") == "true":
                self.fail(f"CI=true and {REASON}")
            raise unittest.SkipTest(REASON)
        self.system = self.makeSystem()
        self.ports = []
        if self.side == "lrp":
            self.peer, self.local, self.lrpGREPort = CLIENT, LRP_IP, self.capturingGREPort
        else:
            self.peer, self.local, self.rrpGREPort = SERVER_IP, RRP_SOURCE, self.capturingGREPort
        RelayHarness.setUp(self)
        self.port = self.ports[0]
        self.port.startListening()
        self.captured = self.system.captures[0]
        self.relay, self.farRelay = ((self.lrp.relay, self.rrp.relay) if self.side == "lrp"
                                     else (self.rrp.relay, self.lrp.relay))
        self.link = self.lrp.link if self.side == "lrp" else next(iter(self.rrp.links))
        self.writes = []
        write = self.link._link.writeFrames
        self.link._link.writeFrames = lambda chunks: (self.writes.append(b"".join(chunks)),
                                                     write(chunks))
        self.backs = []
        if self.port.flows is not None:
            end, flows = self.port.flows.end, self.port.flows

            def recordingEnd():
                head = end()
                reason = flows.backReason()
                if reason is not None:
                    self.backs.append(reason)
                return head
            flows.end = recordingEnd

    def open_call(self, ip=CLIENT, call_id=7, server_call_id=70):
        """A call: the key its captured GRE carries (``L`` from the client, ``R`` from pptpd)."""
        client, server = self.connect_client(ip)
        pptpdSaw, clientSaw = self.dial(client, server, call_id, server_call_id)
        self.client, self.server = client, server
        return clientSaw if self.side == "lrp" else pptpdSaw

    def feed(self, frames):
        """Feed (frame, timestamp) pairs and run one wake-up; flush the link."""
        for item in frames:
            data, timestamp = item if isinstance(item, tuple) else (item, None)
            self.captured.add(data, timestamp)
        self.writes.clear()
        self.port.doRead()
        written = list(self.writes)
        self.flush()
        return written

    def observed(self, written):
        session = next(iter(self.relay.sessions))
        call = session.book.calls[0] if session.book.calls else None
        port = self.port.snapshot()
        port.pop("capture_up")
        port.pop("native", None)  # the native port's own section (what C took)
        return {
            "written": written,
            "port": port,
            "drops": self.relay.drops.snapshot(),
            "session": (session.greIn, session.greOut, session.greDropped,
                        session.mux.greOut if session.mux else None),
            "call": None if call is None else (call.gre_in, call.bytes_in),
            "mux": {k: v for k, v in self.link.snapshot().items() if k not in ("rtt_last_ms",
                                                                             "rtt_smoothed_ms")},
            "far": [(s.greIn, s.greOut) for s in self.farRelay.sessions],
            "far_gre": list(getattr(self.farRelay.grePort, "sent", [])),
        }


class PythonPath(PumpHarness, unittest.TestCase):
    capture = "pcap"


class NativePath(PumpHarness, unittest.TestCase):
    capture = "native"


def run(case, scenario, side="lrp"):
    """*scenario(harness)* -> frames; on both paths of *side*; (python observed, native
    observed, backs)."""
    return runBoth((PythonPath, NativePath), scenario, side, setup=getattr(scenario, "setup", None))


# -- scenarios: each returns the wake-ups' frame lists ------------------------------------------


def common(h, key):
    data = [eth(ipv4(h.peer, h.local, gre(key, bytes([i]) * (100 + i), seq=i, ack=i if i % 2 else None)))
            for i in range(1, 6)]
    return [data, data[:2]]


def mixed(h, key):
    good = eth(ipv4(h.peer, h.local, gre(key, b"x" * 300, seq=1)))
    big = gre(key, b"F" * 1700, seq=2)
    frags = [eth(p) for p in ip_fragments(h.peer, h.local, big, 1000, ident=0x4242)]
    frames = [
        good, good,                                                   # a bridge's second copy
        eth(ipv4(h.peer, h.local, gre(key, b"y" * 50, seq=3, ack=9))),
        *frags,                                                       # handed back, reassembled
        eth(ipv4(OTHER, h.local, gre(key, b"w" * 20, seq=4))),         # wrong source
        eth(ipv4(h.peer, h.local, gre(key ^ 0x5555, b"u" * 20, seq=5))),  # unknown key
        eth(ipv4(h.peer, h.local, gre(key, b"v", seq=6)), ethertype=0x86DD),  # not IPv4
        eth(ipv4(h.peer, h.local, gre(key, b"t" * 40, seq=7)))[:40],   # truncated
        eth(ipv4(h.peer, h.local, b"\0" * 12, proto=17)),              # not GRE
        eth(ipv4(h.peer, "10.9.9.9", gre(key, b"n" * 10, seq=8))),    # not local
        eth(b"\x44" + ipv4(h.peer, h.local, gre(key, seq=9))[1:]),     # bad header (IHL 4)
        eth(ipv4(h.peer, h.local, b"")),                               # no GRE at all
        eth(ipv4(h.peer, h.local, gre(key, b"m" * 8, seq=10, version=0))),  # malformed GRE
        eth(ipv4(h.peer, h.local, gre(key, ack=11))),                  # an ack alone
        eth(ipv4(h.peer, h.local, gre(key, b"z" * 64, seq=12))),
    ]
    return [frames]


def watermark(h, key):
    return [[eth(ipv4(h.peer, h.local, gre(key, b"%c" % (i % 256) * 1000, seq=i)))
             for i in range(40)]] * 2


def set_watermark(h):
    h.link.config.greWatermark = 9000


watermark.setup = set_watermark


def too_large(h, key):
    return [[eth(ipv4(h.peer, h.local, gre(key, b"L" * n, seq=n))) for n in (100, 1500, 200)]]


def set_small_payload(h):
    h.link.maxOutPayload = 1200


too_large.setup = set_small_payload


class _Gate:
    """A sojourn gate that drops every frame captured before 100.0, as SojournGate would
    while the queue stands (its control law is sojourn.py's, tested there)."""

    def __init__(self):
        self.dropped_ = 0

    def drop_before(self, now):
        return 100.0

    def dropped(self):
        self.dropped_ += 1
        return 100.0

    def observe(self, now, head):
        self.head = head


def sojourn(h, key):
    frames = [(eth(ipv4(h.peer, h.local, gre(key, b"s" * 30, seq=i))), 99.0 if i in (1, 2, 5) else 101.0 + i)
              for i in range(8)]
    return [frames]


def set_gate(h):
    h.port._gate = h.gate = _Gate()


sojourn.setup = set_gate


def standing(h, key):
    """A queue that stands, through a real gate (SojournGate on the Python path, its C twin
    on the native one): each wake-up reads its whole budget, so none knows it emptied the
    capture; after an interval above its target the gate drops one frame older than the
    target when a drop is due and every frame older than its ceiling (10x)."""
    seq = iter(range(1, 1000))
    for wake in range(12):
        now = h.clock[0] = 1000.0 + 0.03 * wake
        yield [(eth(ipv4(h.peer, h.local, gre(key, b"q" * 40, seq=next(seq)))), now - age)
               for age in (0.03, 0.08, 0.02, 0.018)]


def set_real_gate(h):
    h.clock = [1000.0]
    h.port.maxPacketsPerRead = 4
    h.port._wallClock = lambda: h.clock[0]
    h.port._gate = (sojourn_.NativeGate(MODULE, 0.005) if h.port.flows is not None
                    else sojourn_.SojournGate(0.005))


standing.setup = set_real_gate


def flood(h, key):
    """200 frames of no call (a key nobody holds) around the call's own, in one wake-up and
    one 50 ms window of capture time."""
    junk = [(eth(ipv4(h.peer, h.local, gre(key ^ 0x5555, b"j" * 20, seq=i))), 1000.0 + i * 1e-5)
            for i in range(200)]
    good = [(eth(ipv4(h.peer, h.local, gre(key, b"g" * 30, seq=i))), 1000.002 + i * 1e-5)
            for i in range(1, 6)]
    return [junk[:100] + good[:3] + junk[100:] + good[3:]]


def set_large_budget(h):
    h.port.maxPacketsPerRead = 1000


flood.setup = set_large_budget


def flood_unshared(h, key):
    return flood(h, key)


def set_no_share(h):
    set_large_budget(h)
    if h.port.flows is not None:
        h.port.flows.setNoCallShare(0)


flood_unshared.setup = set_no_share


def held(h, key):
    """The call's entry is Python's alone (as past RP_MAX_LINKS links): its frames go the
    Python path, however many."""
    lib.rp_pump_clear_flow(h.port.flows.state, key) if h.port.flows is not None else None
    return [[(eth(ipv4(h.peer, h.local, gre(key, b"h" * 30, seq=i))), 1000.0 + i * 1e-5)
             for i in range(1, 101)]]


held.setup = set_large_budget


def detached(h, key):
    """The call's session is detached (its link lost, a resume awaited): its GRE goes the
    Python path, which counts it as the gap's, however much of it comes."""
    next(iter(h.relay.sessions)).sessionDetached()
    return [[(eth(ipv4(h.peer, h.local, gre(key, b"d" * 30, seq=i))), 1000.0 + i * 1e-5)
             for i in range(1, 101)]]


detached.setup = set_large_budget


def closed(h, key):
    """The call is released between two wake-ups: its GRE goes the Python path (unknown)."""
    first = [eth(ipv4(h.peer, h.local, gre(key, b"a" * 10, seq=1)))]
    yield first
    session = next(iter(h.relay.sessions))
    session.book.release(session.book.calls[0])
    yield [eth(ipv4(h.peer, h.local, gre(key, b"b" * 10, seq=2)))]


class DifferentialTests(unittest.SynchronousTestCase):
    """The LRP's capture (GRE from the client)."""

    side = "lrp"

    def compare(self, scenario, backs):
        python, nativeResult, handedBack = run(self, scenario, self.side)
        self.assertEqual(nativeResult, python)
        self.assertEqual(handedBack, backs)
        return python

    def test_common(self):
        """Established GRE: C frames all of it, byte-identical to the Python path's."""
        seen = self.compare(common, [])
        self.assertEqual(seen["port"]["delivered"], 7)
        self.assertEqual(seen["call"], (7, sum(100 + i for i in range(1, 6)) + 101 + 102))
        self.assertEqual(len(seen["far_gre"]), 7)

    def test_mixed(self):
        """Duplicates, fragments, wrong source, unknown key, not IPv4, truncated, not GRE,
        not local, bad header, empty, malformed GRE: the same counters; only what Python
        must decide is handed back."""
        seen = self.compare(mixed, ["fragment", "fragment", "wrong_source", "unknown_key",
                                    "malformed"])
        self.assertEqual(seen["port"]["duplicates"], 1)
        self.assertEqual(seen["port"]["reassembled"], 1)
        for reason in ("not_ipv4", "truncated", "not_gre", "not_local", "bad_header"):
            self.assertIn(reason, seen["port"]["dropped"])
        # the RRP's demux knows its servers by address: another source is unknown there
        wrong = "gre_wrong_source" if self.side == "lrp" else "gre_unknown_source"
        for reason in (wrong, "gre_unknown_call_id", "gre_malformed"):
            self.assertIn(reason, seen["drops"])

    def test_watermark(self):
        """Over the GRE watermark: the first frame past the room is handed back so the
        mux asks the link once, as _queueGRE does; the rest are dropped in C and counted
        as the mux's watermark drops."""
        seen = self.compare(watermark, ["budget"])
        self.assertTrue(seen["mux"]["gre_dropped"].get("watermark"))
        self.assertTrue(seen["drops"].get("mux_send"))

    def test_too_large(self):
        seen = self.compare(too_large, [])
        self.assertEqual(seen["mux"]["gre_dropped"], {"too_large": 1})

    def test_sojourn(self):
        """Frames older than the gate's threshold are handed back one by one; Python's gate
        drops them and runs its control law."""
        seen = self.compare(sojourn, ["sojourn"] * 3)
        self.assertEqual(seen["port"]["dropped"], {"sojourn": 3})

    def test_standing_queue_dropped_in_c(self):
        """With the gate's state in C the pump drops what is too old itself, at the law's
        pace, frame for frame as the Python path's gate does; nothing is handed back (a
        hand-back per drop cost a Python turn each: an overload's full ring then took the
        daemon's time, 512 B at 150 k/s delivering 6.5 k)."""
        seen = self.compare(standing, [])
        # the gate stands from the 5th wake-up on; each of the 7 after it drops its frame over
        # the ceiling, and 3 of them the frame before it too, a drop being due (at 0.15,
        # 0.24 and 0.30 s: interval / sqrt(count) apart)
        self.assertEqual(seen["port"]["dropped"], {"sojourn": 7 + 3})
        self.assertEqual((seen["port"]["received"], seen["port"]["delivered"]), (48, 38))

    def test_a_flood_of_no_call_costs_c_not_python(self):
        """Frames of no call past RP_PUNT_BURST in a window are dropped in C, counted as
        no_call; the first ones go the Python path, which counts and logs each by its reason;
        the call's own frames are framed as before."""
        python, nativeResult, backs = run(self, flood, self.side)
        burst = MODULE.lib.RP_PUNT_BURST
        # (and the call's first frame, once: its link idle until then, "no_link")
        self.assertEqual([b for b in backs if b != "no_link"], ["unknown_key"] * burst)
        self.assertEqual(python["drops"], {"gre_unknown_call_id": 200})
        self.assertEqual(nativeResult["drops"], {"gre_unknown_call_id": burst})
        self.assertEqual(nativeResult["port"]["dropped"], {"no_call": 200 - burst})
        written = lambda seen: b"".join(b"".join(wake) for wake in seen["written"])  # noqa: E731
        self.assertEqual(written(nativeResult), written(python))
        self.assertTrue(written(python))
        for what in ("session", "call", "far", "far_gre"):
            self.assertEqual(nativeResult[what], python[what], what)
        self.assertEqual(nativeResult["port"]["received"], python["port"]["received"])

    def test_the_share_is_an_option(self):
        """--gre-no-call-share: 0 gives the Python path none of them, all counted in C."""
        python, nativeResult, backs = run(self, flood_unshared, self.side)
        self.assertEqual([b for b in backs if b != "no_link"], [])
        self.assertEqual(nativeResult["drops"], {})
        self.assertEqual(nativeResult["port"]["dropped"], {"no_call": 200})
        self.assertEqual(python["drops"], {"gre_unknown_call_id": 200})

    def test_a_detached_calls_key_is_still_its_own(self):
        """A detached session's calls keep their keys until released: 100 frames in a window,
        every one handed back and counted by the session, as on the Python path."""
        seen = self.compare(detached, ["unknown_key"] * 100)
        self.assertEqual(seen["session"][0], 100)
        self.assertNotIn("no_call", seen["port"]["dropped"])

    def test_a_held_key_is_never_taken_for_no_call(self):
        """A key Python holds an entry for but C does not: every frame goes the Python path,
        past any burst, and is delivered."""
        seen = self.compare(held, ["unknown_key"] * 100)
        self.assertEqual(seen["session"][0], 100)

    def test_released_call(self):
        """A released call's entry is gone: its later GRE is handed back and dropped as an
        unknown call, as the Python path does."""
        seen = self.compare(closed, ["unknown_key"])
        self.assertEqual(seen["drops"].get("gre_unknown_call_id"), 1)


class RRPDifferentialTests(DifferentialTests):
    """The RRP's capture (GRE from pptpd)."""

    side = "rrp"


class FlowTableTests(unittest.SynchronousTestCase):
    """The relay keeps the table: an entry per established call, gone with the call, the
    session, the mux session and the link."""

    side = "lrp"

    def setUp(self):
        self.h = NativePath("run")
        self.h.side = self.side
        self.h.setUp()
        self.addCleanup(self.h.doCleanups)
        self.key = self.h.open_call()
        self.flows = self.h.port.flows

    def test_entry_while_established(self):
        self.assertEqual(self.flows.snapshot(), {"entries": 1, "in_c": 1, "links_in_c": 1,
                                                 "links": 1, "links_begun": 1,
                                                 "begun_late": 0, "framed": 0,
                                                 "handed_back": 0, "written": 0})
        self.assertEqual(self.flows.links, {self.h.link: 0})

    def test_gone_with_the_call(self):
        from routeproxy import pptp
        session = next(iter(self.h.relay.sessions))
        self.h.client.send(pptp.CallClearRequest(call_id=self.h.client_call_id)
                           if hasattr(self.h, "client_call_id") else pptp.CallClearRequest(call_id=7))
        self.h.flush()
        [ccrq] = [m for m in self.h.server.received() if isinstance(m, pptp.CallClearRequest)]
        self.h.server.send(pptp.CallDisconnectNotify(call_id=70))
        self.h.flush()
        self.assertEqual(len(session.book.calls), 0)
        self.assertEqual(len(self.flows), 0)

    def test_gone_with_the_session(self):
        session = next(iter(self.h.relay.sessions))
        session.close("test")
        self.assertEqual(len(self.flows), 0)

    def test_gone_with_the_link(self):
        self.h.link.linkLost("test")
        self.assertEqual(len(self.flows), 0)
        self.assertEqual(self.flows.links, {})
        # GRE for it now: handed back, dropped as the Python path does, the port lives on
        self.h.feed([eth(ipv4(self.h.peer, self.h.local, gre(self.key, b"q", seq=1)))])
        self.assertEqual(self.h.backs, ["unknown_key"])


class RRPFlowTableTests(FlowTableTests):
    side = "rrp"


# -- an RRP serving several LRPs: every link's GRE framed in the same C call ---------------------


class MultiLinkHarness(PumpHarness):
    """PumpHarness on the RRP with *lrps* LRPs, each with its own link and one call: ``keys[i]``
    is the key (``R``) of LRP i's call, ``conns[i]`` the RRP's end of its link, whose writes
    are recorded per link."""

    side = "rrp"
    lrps = 3
    linksInC = None   # native: a smaller C maximum than RP_MAX_LINKS (those beyond stay in Python)

    def setUp(self):
        PumpHarness.setUp(self)
        if self.linksInC is not None and self.port.flows is not None:
            self.port.flows._linkConnections = [None] * self.linksInC
        self.farLRPs, self.conns, self.keys, self.linkWrites = [], [], [], {}
        self.addLinkAndCall(self.lrp, self.link, first=True)
        for _ in range(self.lrps - 1):
            self.addLinkAndCall()

    def addLinkAndCall(self, lrp=None, conn=None, first=False):
        """Another LRP and its link (or the first's), a call over it: the call's key."""
        if lrp is None:
            lrp, conn = self.addLRP()
        records = self.linkWrites[conn] = []
        write = conn._link.writeFrames
        if not first:   # PumpHarness.setUp wraps the first link's into self.writes
            conn._link.writeFrames = lambda chunks: (records.append(b"".join(chunks)),
                                                     write(chunks))
        n = len(self.farLRPs)
        client, server = self.connect_client(f"10.0.0.{20 + n}", lrp=lrp)
        pptpdSaw, _ = self.dial(client, server, 30 + n, 300 + n)
        self.farLRPs.append(lrp)
        self.conns.append(conn)
        self.keys.append(pptpdSaw)
        return pptpdSaw

    def loseLink(self, i):
        """LRP i's link goes (its TCP connection lost), and its calls with it."""
        conn = self.conns[i]
        conn._link.transport.loseConnection()
        self.flush()
        self.assertTrue(conn.closed)

    def feed(self, frames):
        for records in self.linkWrites.values():
            records.clear()
        written = PumpHarness.feed(self, frames)
        self.linkWrites[self.conns[0]][:] = self.writes_of_first = written
        return {i: list(self.linkWrites[conn]) for i, conn in enumerate(self.conns)}

    def observed(self, written):
        def link(conn):
            return {k: v for k, v in conn.snapshot().items() if k not in ("rtt_last_ms",
                                                                          "rtt_smoothed_ms")}
        sessions = sorted(((self.conns.index(s.mux.connection) if s.mux else None, s.mux.id if s.mux else None,
                            s.greIn, s.greOut, s.greDropped, s.mux.greOut if s.mux else None,
                            [(c.gre_in, c.bytes_in) for c in (s.book.calls if s.book else ())])
                           for s in self.relay.sessions), key=repr)
        port = self.port.snapshot()
        port.pop("capture_up")
        port.pop("native", None)
        return {
            "written": written,
            "port": port,
            "drops": self.relay.drops.snapshot(),
            "sessions": sessions,
            "links": [link(conn) for conn in self.conns],
            "far": [[(s.greIn, s.greOut) for s in lrp.relay.sessions] for lrp in self.farLRPs],
            "far_gre": [list(lrp.relay.grePort.sent) for lrp in self.farLRPs],
        }


class MultiPython(MultiLinkHarness, unittest.TestCase):
    capture = "pcap"


class MultiNative(MultiLinkHarness, unittest.TestCase):
    capture = "native"


def run_multi(scenario, lrps=3, linksInC=None, check=None):
    """*scenario(harness)* yields wake-ups' frame lists on an RRP with *lrps* LRPs, on both
    paths: (python observed, native observed, backs, native harness snapshots); *check(h)*
    runs on each harness before its cleanup."""
    def prepare(harness):
        harness.lrps, harness.linksInC = lrps, linksInC

    return runPaths((MultiPython, MultiNative), scenario, prepare, check)


def pptpd_gre(h, i, n, size=100, **more):
    """GRE from pptpd for LRP i's call: payload bytes naming the link and the frame."""
    return eth(ipv4(h.peer, h.local, gre(h.keys[i], bytes([0x40 + i, n % 256]) * (size // 2),
                                         seq=n, **more)))


def link1GoesIdle(h):
    """Wake-ups in which links 0 and 1 carry GRE, then link 0 alone for longer than the
    native table's idleCalls (4 here): link 1 is no longer begun."""
    if h.capture == "native":
        h.port.flows.idleCalls = h.port.flows._sweepAt = 4
    yield [pptpd_gre(h, n % 2, n) for n in range(4)]
    for n in range(10, 20):
        yield [pptpd_gre(h, 0, n)]


class MultiLinkTests(unittest.SynchronousTestCase):
    """An RRP serving several LRPs frames every link's GRE in the same C call, each to its own
    connection, within its own budget; the same link bytes per connection, counters and
    hand-backs as the Python path."""

    def compare(self, scenario, backs, **more):
        python, nativeResult, handedBack = run_multi(scenario, **more)
        self.assertEqual(nativeResult["written"], python["written"])
        self.assertEqual(nativeResult, python)
        self.assertEqual(handedBack, backs)
        return python

    def test_interleaved(self):
        """GRE of three calls on three links interleaved in one wake-up: C frames all of it,
        each link's in capture order on its own connection."""
        def scenario(h):
            yield [pptpd_gre(h, n % 3, n, 100 + 2 * n, ack=n if n % 2 else None)
                   for n in range(12)]
            yield [pptpd_gre(h, i, 20 + k) for k, i in enumerate((2, 0, 2, 1))]

        def check(h):
            if h.capture == "native":
                flows = h.port.flows
                self.assertEqual(flows.links, {h.conns[0]: 0, h.conns[1]: 1, h.conns[2]: 2})
                self.assertEqual(flows.framed, 16)
                self.assertEqual(flows.snapshot()["links_in_c"], 3)
        seen = self.compare(scenario, [], check=check)
        self.assertEqual(len(set(seen["written"][0][i][0] for i in range(3))), 3)
        for i, sent in enumerate(seen["far_gre"]):
            self.assertEqual([g.payload[0] for _, _, g in sent], [0x40 + i] * len(sent))
            self.assertEqual(len(sent), [5, 5, 6][i])
        # each far LRP got its own call's frames, in order
        self.assertEqual([g.seq for _, _, g in seen["far_gre"][2]], [2, 5, 8, 11, 20, 22])

    def test_handed_back_in_between(self):
        """A fragment of link 1's call in the middle of a wake-up: handed back, the pump stops;
        the frames before it (of every link) go out first, those after it wait, each link's
        order is capture order."""
        def scenario(h):
            big = gre(h.keys[1], b"F" * 1700, seq=50)
            frags = [eth(p) for p in ip_fragments(h.peer, h.local, big, 1000, ident=0x4343)]
            yield [pptpd_gre(h, 0, 1), pptpd_gre(h, 1, 2), pptpd_gre(h, 2, 3), frags[0],
                   pptpd_gre(h, 1, 4), frags[1], pptpd_gre(h, 0, 5), pptpd_gre(h, 2, 6),
                   eth(ipv4(OTHER, h.local, gre(h.keys[2], b"w" * 20, seq=7))),
                   pptpd_gre(h, 2, 8)]
        seen = self.compare(scenario, ["fragment", "fragment", "wrong_source"])
        self.assertEqual([g.seq for _, _, g in seen["far_gre"][1]], [2, 4, 50])
        self.assertEqual([g.seq for _, _, g in seen["far_gre"][2]], [3, 6, 8])

    def test_watermark_per_link(self):
        """Link 0 over its GRE watermark, the others not: link 0's first frame past its room is
        handed back (the mux asks the link once), its later ones dropped in C as its
        watermark drops; the other links' frames are all framed."""
        def setup(h):
            conn = h.conns[0]
            conn.config = dataclasses.replace(conn.config, greWatermark=9000)

        def scenario(h):
            setup(h)
            batch = [pptpd_gre(h, n % 3, n, 1000) for n in range(60)]
            yield batch
            yield batch
        seen = self.compare(scenario, ["budget"])
        dropped = [link["gre_dropped"].get("watermark", 0) for link in seen["links"]]
        self.assertTrue(dropped[0])
        self.assertEqual(dropped[1:], [0, 0])
        self.assertEqual([len(sent) for sent in seen["far_gre"][1:]], [40, 40])

    def test_drop_reason_per_link(self):
        """Link 2's writes paused, link 0 over its watermark, link 1 neither: each link's drops
        are counted under its own reason."""
        def scenario(h):
            conn = h.conns[0]
            conn.config = dataclasses.replace(conn.config, greWatermark=3000)
            h.conns[2].pauseWriting()
            yield [pptpd_gre(h, n % 3, n, 1000) for n in range(30)]
        seen = self.compare(scenario, ["budget"])
        self.assertEqual([link["gre_dropped"] for link in seen["links"]],
                         [{"watermark": 7}, {}, {"paused": 10}])

    def test_too_large_per_link(self):
        """maxOutPayload is each link's own."""
        def scenario(h):
            h.conns[1].maxOutPayload = 1200
            yield [pptpd_gre(h, n % 3, n, 1500 if n < 6 else 200) for n in range(9)]
        seen = self.compare(scenario, [])
        self.assertEqual([link["gre_dropped"] for link in seen["links"]],
                         [{}, {"too_large": 2}, {}])

    def test_link_lost_index_reused(self):
        """Link 1 goes mid-way: its entries go, its index is free; a new LRP's link takes it,
        and its call's GRE goes to the new connection only; GRE for the lost link's call is
        handed back and dropped as the Python path drops it."""
        def scenario(h):
            yield [pptpd_gre(h, n % 3, n) for n in range(6)]
            lostKey = h.keys[1]
            h.loseLink(1)
            if h.capture == "native":
                self.assertEqual(h.port.flows.links, {h.conns[0]: 0, h.conns[2]: 2})
                self.assertEqual(h.port.flows.snapshot()["in_c"], 2)
            newKey = h.addLinkAndCall()
            if h.capture == "native":
                self.assertEqual(h.port.flows.links[h.conns[3]], 1)  # the lost link's index
            yield [pptpd_gre(h, 3, 10), eth(ipv4(h.peer, h.local, gre(lostKey, b"o" * 10, seq=11)))
                   if lostKey != newKey else pptpd_gre(h, 3, 11),
                   pptpd_gre(h, 0, 12), pptpd_gre(h, 3, 13), pptpd_gre(h, 2, 14)]
        python, nativeResult, backs = run_multi(scenario)
        self.assertEqual(nativeResult, python)
        self.assertIn(backs, (["unknown_key"], []))
        written = python["written"][1]
        self.assertEqual(written[1], [])        # nothing to the lost link
        self.assertTrue(written[3])
        self.assertEqual([g.seq for _, _, g in python["far_gre"][3]],
                         [10, 13] if backs else [10, 11, 13])
        self.assertEqual([g.seq for _, _, g in python["far_gre"][1]], [1, 4])

    def test_links_beyond_the_maximum(self):
        """With room in C for two links, the third link's GRE is handed back and takes the
        Python path (identical results); when a link goes, the waiting one gets its index."""
        def scenario(h):
            if h.capture == "native":
                snapshot = h.port.flows.snapshot()
                self.assertEqual((snapshot["links_in_c"], snapshot["links"], snapshot["in_c"]),
                                 (2, 3, 2))
            yield [pptpd_gre(h, n % 3, n) for n in range(6)]
            h.loseLink(0)
            yield [pptpd_gre(h, 1 + n % 2, n) for n in range(10, 14)]
            if h.capture == "native":
                self.assertEqual(h.port.flows.links, {h.conns[1]: 1, h.conns[2]: 0})
        python, nativeResult, backs = run_multi(scenario, linksInC=2)
        self.assertEqual(nativeResult, python)
        self.assertEqual(backs, ["unknown_key"] * 2)

    def test_idle_link_not_begun(self):
        """A link without a frame for idleCalls pump calls is no longer begun (its budget not
        asked); its next frame is handed back ("no_link"), takes the Python path, and the
        link is begun again from the next call."""
        def scenario(h):
            if h.capture == "native":
                h.port.flows.idleCalls = h.port.flows._sweepAt = 4
            yield [pptpd_gre(h, n % 3, n) for n in range(6)]
            for n in range(10, 18):
                yield [pptpd_gre(h, 0, n)]
            if h.capture == "native":
                self.assertEqual([index for index, _ in h.port.flows._live], [0])
            yield [pptpd_gre(h, 1, 20), pptpd_gre(h, 0, 21), pptpd_gre(h, 1, 22)]
            yield [pptpd_gre(h, 1, 23), pptpd_gre(h, 2, 24), pptpd_gre(h, 2, 25)]
            if h.capture == "native":
                self.assertEqual([index for index, _ in h.port.flows._live], [0, 1, 2])
                snapshot = h.port.flows.snapshot()   # C framed them all after all
                self.assertEqual((snapshot["framed"], snapshot["handed_back"],
                                  snapshot["begun_late"]), (20, 0, 2))
        seen = self.compare(scenario, ["no_link", "no_link"])
        self.assertEqual([g.seq for _, _, g in seen["far_gre"][1]], [1, 4, 20, 22, 23])
        self.assertEqual([g.seq for _, _, g in seen["far_gre"][2]], [2, 5, 24, 25])

    def test_idle_link_over_its_watermark(self):
        """An idle link's frame given to C again meets that link's budget, asked afresh:
        no room, dropped as its watermark drops."""
        def scenario(h):
            yield from link1GoesIdle(h)
            conn = h.conns[1]
            conn.config = dataclasses.replace(conn.config, greWatermark=0)
            yield [pptpd_gre(h, 1, 20), pptpd_gre(h, 0, 21), pptpd_gre(h, 1, 22),
                   pptpd_gre(h, 2, 23)]
        seen = self.compare(scenario, ["no_link", "no_link"])
        self.assertEqual(seen["links"][1]["gre_dropped"], {"watermark": 2})
        self.assertEqual([g.seq for _, _, g in seen["far_gre"][2]], [23])

    def test_retry_handed_back(self):
        """A frame C hands back again when given it again (its link still not begun) takes
        the Python path, before anything after it."""
        def scenario(h):
            yield from link1GoesIdle(h)
            if h.capture == "native":
                h.port.flows._activate = lambda index: None   # never begun again
            yield [pptpd_gre(h, 1, 20), pptpd_gre(h, 0, 21), pptpd_gre(h, 1, 22)]
        seen = self.compare(scenario, ["no_link"] * 4)
        self.assertEqual([g.seq for _, _, g in seen["far_gre"][1]], [1, 3, 20, 22])

    def test_many_links(self):
        """Eight links, their GRE interleaved over two wake-ups."""
        def scenario(h):
            yield [pptpd_gre(h, n % 8, n, 60 + n) for n in range(40)]
            yield [pptpd_gre(h, 7 - n % 8, n) for n in range(40, 56)]
        seen = self.compare(scenario, [], lrps=8)
        self.assertEqual([len(sent) for sent in seen["far_gre"]], [7] * 8)


class PumpLinksCTests(unittest.SynchronousTestCase):
    """pump.c's links directly: what Python never asks of it but C must still get right."""

    def setUp(self):
        if MODULE is None:
            raise unittest.SkipTest(REASON)
        ffi, lib = self.ffi, self.lib = MODULE.ffi, MODULE.lib
        self.state = ffi.gc(lib.rp_pump_new(1 << 16), lib.rp_pump_free)
        lib.rp_pump_set_link(self.state, 14, 12, b"\x08\x00", 2)
        lib.rp_pump_set_local(self.state, socket.inet_aton("10.0.3.1"), 1)
        self.src = socket.inet_aton("10.0.4.2")

    def frame(self, key, n):
        data = eth(ipv4("10.0.4.2", "10.0.3.1", gre(key, bytes([n]) * 20, seq=n)))
        return self.lib.rp_pump_frame(self.state, data, len(data), 0.0, 0)

    def outs(self):
        lib, ffi = self.lib, self.ffi
        counts = ffi.new("struct rp_counts *")
        lib.rp_pump_take_counts(self.state, counts)
        link, length, frames = ffi.new("uint32_t *"), ffi.new("size_t *"), ffi.new("uint32_t *")
        result = []
        for i in range(counts.links):
            out = lib.rp_pump_out(self.state, i, link, length, frames)
            result.append((link[0], frames[0], ffi.buffer(out, length[0])[:]))
        self.assertEqual(lib.rp_pump_out(self.state, counts.links, link, length, frames), ffi.NULL)
        return result

    def test_bounds(self):
        lib = self.lib
        self.assertEqual(lib.rp_pump_set_flow(self.state, 5, self.src, 1, 1, lib.RP_MAX_LINKS), -1)
        self.assertEqual(lib.rp_pump_begin_link(self.state, lib.RP_MAX_LINKS, 0, 0, 0), -1)
        self.assertEqual(lib.rp_pump_set_flow(self.state, 5, self.src, 1, 1,
                                              lib.RP_MAX_LINKS - 1), 0)

    def test_link_not_begun_hands_back(self):
        """A flow whose link was not begun for this call (the last call's budget is stale)."""
        lib = self.lib
        lib.rp_pump_set_flow(self.state, 5, self.src, 1, 11, 0)
        lib.rp_pump_set_flow(self.state, 6, self.src, 2, 12, 3)
        lib.rp_pump_begin(self.state, 0.0, self.ffi.NULL)
        lib.rp_pump_begin_link(self.state, 3, 1 << 20, 0, 4000)
        self.assertEqual(self.frame(6, 1), lib.RP_PUMP_TAKEN)
        self.assertEqual(self.frame(5, 2), lib.RP_PUMP_HAND_BACK)
        self.assertEqual(lib.rp_pump_back_reason(self.state), lib.RP_BACK_NO_LINK)
        self.assertEqual(lib.rp_pump_back_link(self.state), 0)
        [(link, frames, _)] = self.outs()
        self.assertEqual((link, frames), (3, 1))
        # the next call: link 3 begun again, link 0 not: its budget from before does not count
        lib.rp_pump_begin(self.state, 0.0, self.ffi.NULL)
        lib.rp_pump_begin_link(self.state, 0, 1 << 20, 0, 4000)
        self.assertEqual(self.frame(6, 3), lib.RP_PUMP_HAND_BACK)
        self.assertEqual(self.frame(5, 4), lib.RP_PUMP_TAKEN)
        self.assertEqual([(link, frames) for link, frames, _ in self.outs()], [(0, 1)])

    def test_links_in_order_of_first_frame(self):
        """Each link's frames in capture order in its own buffer; begun twice in a call, a
        link keeps what it has."""
        lib = self.lib
        for key, link in ((5, 7), (6, 2), (8, 7)):
            lib.rp_pump_set_flow(self.state, key, self.src, key, key, link)
        lib.rp_pump_begin(self.state, 0.0, self.ffi.NULL)
        for link in (2, 7):
            lib.rp_pump_begin_link(self.state, link, 1 << 20, 0, 4000)
        self.frame(8, 1)
        self.frame(6, 2)
        lib.rp_pump_begin_link(self.state, 7, 1 << 20, 0, 4000)
        self.frame(5, 3)
        self.frame(6, 4)
        outs = self.outs()
        self.assertEqual([(link, frames) for link, frames, _ in outs], [(7, 2), (2, 2)])
        from routeproxy.mux import frames as F
        decoded = []
        for _, _, data in outs:
            decoder = F.FrameDecoder(65535)
            decoder.feed(data)
            decoded.append([(frame.session, frame.seq) for frame in iter(decoder.nextFrame, None)])
        self.assertEqual(decoded, [[(8, 1), (5, 3)], [(6, 2), (6, 4)]])

    def test_many_local_addresses(self):
        """A host with hundreds of addresses (--pptp-listen 0.0.0.0 takes them all): each is
        local to C, any other is not_local; set again, the old set is gone."""
        lib, ffi = self.lib, self.ffi
        addresses = [socket.inet_aton(f"10.1.{i // 250}.{i % 250 + 1}") for i in range(700)]
        self.assertEqual(lib.rp_pump_set_local(self.state, b"".join(addresses), len(addresses)), 0)
        lib.rp_pump_set_flow(self.state, 5, self.src, 1, 1, 0)
        lib.rp_pump_begin(self.state, 0.0, self.ffi.NULL)
        lib.rp_pump_begin_link(self.state, 0, 1 << 20, 0, 4000)
        counts = ffi.new("struct rp_counts *")

        def send(dst, n):
            data = eth(ipv4("10.0.4.2", dst, gre(5, bytes([n]) * 20, seq=n)))
            self.assertEqual(lib.rp_pump_frame(self.state, data, len(data), 0.0, 0),
                             lib.RP_PUMP_TAKEN)
            lib.rp_pump_take_counts(self.state, counts)
            return counts.delivered, counts.not_local
        self.assertEqual(send("10.1.2.200", 1), (1, 0))     # the 700th
        self.assertEqual(send("10.1.0.1", 2), (1, 0))       # the first
        self.assertEqual(send("10.0.3.1", 3), (0, 1))       # not among them
        lib.rp_pump_set_local(self.state, socket.inet_aton("10.0.3.1"), 1)
        self.assertEqual(send("10.0.3.1", 4), (1, 0))
        self.assertEqual(send("10.1.2.200", 5), (0, 1))
