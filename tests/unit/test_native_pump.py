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
import os
import socket
import struct

from twisted.internet.address import IPv4Address
from twisted.trial import unittest

from routeproxy import native
from routeproxy.capture import DLT_EN10MB
from routeproxy.greport import GREPort
from routeproxy.testing import MemoryGRESystem
from tests.support.packets import frame, ip_fragments, ipv4
from tests.support.relay import LRP_IP, RRP_SOURCE, SERVER_IP, RelayHarness

MODULE, REASON = native.load()
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

    def setUp(self):
        if MODULE is None:
            if os.environ.get("CI") == "true":
                self.fail(f"CI=true and {REASON}")
            raise unittest.SkipTest(REASON)
        self.system = MemoryGRESystem(DLT_EN10MB)
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
    results = []
    for cls in (PythonPath, NativePath):
        harness = cls("run")
        harness.side = side
        harness.setUp()
        try:
            local = harness.open_call()
            setup = getattr(scenario, "setup", None)
            if setup is not None:
                setup(harness)
            written = []
            for batch in scenario(harness, local):
                written.append(harness.feed(batch))
            results.append((harness.observed(written), list(harness.backs)))
        finally:
            harness.doCleanups()
    (python, _), (nativeResult, backs) = results
    return python, nativeResult, backs


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


def closed(h, key):
    """The call is released between two wake-ups: its GRE goes the Python path (unknown)."""
    first = [eth(ipv4(h.peer, h.local, gre(key, b"a" * 10, seq=1)))]
    yield first
    from routeproxy import pptp
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
        self.assertEqual(self.flows.snapshot(), {"entries": 1, "in_c": 1, "framed": 0,
                                                 "handed_back": 0, "written": 0})
        self.assertIs(self.flows.connection, self.h.link)

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
        self.assertIsNone(self.flows.connection)
        # GRE for it now: handed back, dropped as the Python path does, the port lives on
        self.h.feed([eth(ipv4(self.h.peer, self.h.local, gre(self.key, b"q", seq=1)))])
        self.assertEqual(self.h.backs, ["unknown_key"])


class RRPFlowTableTests(FlowTableTests):
    side = "rrp"
