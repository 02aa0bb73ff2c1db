"""The limits of routeproxy/limits.py, in memory: each cap refuses in PPTP, counts, and lets
others carry on; no message a peer can send raises.

The LRP and RRP are joined as in tests/support/relay.py (iosim link, StringTransport peers,
MemoryReactorClock); the mux connection's link is a recording fake with a settable send
buffer.  The system tests (tests/system/test_limits.py) run the same attacks on twistd.
"""
import dataclasses
import random

from hypothesis import given, settings, strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from routeproxy import gre, ipfrag, pptp
from routeproxy.admission import RefusingProtocol
from routeproxy.callids import CallIDSpace
from routeproxy.config import Profile
from routeproxy.limits import DEFAULT, Limits, fromOptions, parseStartups, settings as limitSettings
from routeproxy.lrp import LocalRouteProxy
from routeproxy.mux.connection import MuxConfig, MuxConnection
from routeproxy.mux import frames as F
from routeproxy.startups import StartupGate
from routeproxy.testing import RecordingMuxLink
from tests.support.relay import LRP_IP, SERVER_IP, RelayHarness


class LimitedHarness(RelayHarness):
    """The relay harness with its own limits (``limits``) and a fresh client port per call."""

    limits = DEFAULT

    def setUp(self):
        super().setUp()
        for proxy in (self.lrp, self.rrp):
            proxy.limits = proxy.relay.limits = self.limits
        # every call on the one connection to pptpd (no splitting, routeproxy/callsplit.py)
        self.rrp.profiles["default"] = Profile(SERVER_IP, 1723, callsPerConnection=0)
        self.lrp.admission.limits = self.limits

    def call_flood(self, last):
        """A client with one dialled call that then asks for calls 2..*last*."""
        client, server = self.connect_client("10.0.0.5")
        self.dial(client, server, 1, 300)
        for call_id in range(2, last + 1):
            client.send(pptp.OutgoingCallRequest(call_id=call_id))
        self.flush()
        return client, server


class AdmissionTests(LimitedHarness, unittest.TestCase):
    limits = Limits(maxPerAddress=3, maxPending=5)

    def assertRefusedWithNoResource(self, client):
        [reply] = client.received()
        self.assertIsInstance(reply, pptp.StartControlConnectionReply)
        self.assertEqual((reply.result_code, reply.error_code),
                         (pptp.StartResult.GENERAL_ERROR, pptp.ErrorCode.NO_RESOURCE))
        self.assertTrue(client.transport.disconnecting)

    def test_per_address_cap_answers_in_pptp(self):
        idle = [self.connect_only("10.0.0.5") for _ in range(3)]
        fourth = self.connect_only("10.0.0.5")
        self.assertIsInstance(fourth.protocol, RefusingProtocol)
        self.assertRefusedWithNoResource(fourth)
        self.assertEqual(self.lrp.relay.refusals["per_address"], 1)
        # another address carries on, all the way to pptpd
        client, server = self.connect_client("10.0.0.6")
        self.dial(client, server, 1, 300)
        self.assertTrue(all(not c.transport.disconnecting for c in idle))

    def test_pending_cap_and_release_on_start(self):
        idle = [self.connect_only(f"10.0.1.{n}") for n in range(5)]
        refused = self.connect_only("10.0.2.1")
        self.assertRefusedWithNoResource(refused)
        self.assertEqual(self.lrp.relay.refusals["pending"], 1)
        idle[0].send(pptp.StartControlConnectionRequest())   # one starts: room for another
        self.flush()
        self.assertEqual(self.lrp.admission.pending, 4)
        self.assertNotIsInstance(self.connect_only("10.0.2.2").protocol, RefusingProtocol)

    def test_idle_connections_open_nothing_upstream(self):
        for n in range(5):
            self.connect_only(f"10.0.1.{n}")
        self.flush()
        self.assertEqual(len(self.lrp.link.sessions), 0)
        self.assertEqual(self.reactor.tcpClients, [])
        self.reactor.advance(self.limits.startTimeout + 0.1)
        self.assertEqual(self.lrp.admission.snapshot(),
                         {"pending": 0, "addresses": 0, "busiest_address_connections": 0})
        self.assertEqual(self.lrp.relay.refusals["start_timeout"], 5)

    def test_first_message_not_a_start_request(self):
        client = self.connect_only()
        client.send(pptp.EchoRequest(identifier=1))
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(self.lrp.relay.refusals["not_started"], 1)
        self.flush()
        self.assertEqual(len(self.lrp.link.sessions), 0)


class CallLimitTests(LimitedHarness, unittest.TestCase):
    limits = Limits(maxCalls=4, callTimeout=60.0)

    def test_calls_per_connection(self):
        client, server = self.call_flood(11)
        forwarded = server.received()
        self.assertEqual(len(forwarded), 3)          # 4 calls in all, the dialled one included
        refusals = client.received()
        self.assertEqual([(r.peer_call_id, r.result_code, r.error_code) for r in refusals],
                         [(c, pptp.OutgoingCallResult.GENERAL_ERROR, pptp.ErrorCode.NO_RESOURCE)
                          for c in range(5, 12)])
        self.assertEqual(self.lrp.relay.refusals["calls_per_connection"], 7)
        # another client on the same LRP still gets its call
        other, other_server = self.connect_client("10.0.0.6")
        self.dial(other, other_server, 1, 301)

    def test_unanswered_call_is_cleared_and_its_ids_freed(self):
        client, server = self.connect_client("10.0.0.5")
        self.dial(client, server, 1, 300)
        client.send(pptp.OutgoingCallRequest(call_id=2))
        self.flush()
        [ocrq] = server.received()
        rrp_space = self.rrp.scopes.lookup("10.0.4.2")
        self.assertEqual(len(rrp_space), 2)
        self.advance(59)
        self.assertEqual(client.received(), [])
        self.advance(1.5)
        received = client.received()
        [reply] = [m for m in received if isinstance(m, pptp.OutgoingCallReply)]
        self.assertEqual((reply.peer_call_id, reply.result_code),
                         (2, pptp.OutgoingCallResult.TIME_OUT))
        [clear] = server.received()
        self.assertIsInstance(clear, pptp.CallClearRequest)
        self.assertEqual(clear.call_id, ocrq.call_id)     # pptpd hears of the ID it knows
        self.assertEqual(len(rrp_space), 1)               # the dialled call keeps its ID
        self.assertEqual(len(self.lrp.space), 1)
        self.assertGreaterEqual(self.lrp.relay.refusals["call_timeout"], 1)


    def advance(self, seconds, step=5.0):
        """Let *seconds* pass, the link's PINGs answered on the way."""
        while seconds > 0:
            self.reactor.advance(min(step, seconds))
            self.flush()
            seconds -= step


class IDShareTests(LimitedHarness, unittest.TestCase):
    limits = Limits(idShare=0.5, maxCalls=16)

    def setUp(self):
        super().setUp()
        self.lrp.space = CallIDSpace("LRP", first=1, last=6)
        self.lrp.relay.scopes.space = self.lrp.space

    def test_one_address_holds_at_most_its_share(self):
        client, server = self.call_flood(5)
        self.assertEqual(len(server.received()), 2)       # 3 of 6 IDs: its share
        self.assertEqual(self.lrp.relay.refusals["id_share"], 2)
        other, other_server = self.connect_client("10.0.0.6")
        self.dial(other, other_server, 1, 310)            # the rest is there for others


class PermitTests(RelayHarness, unittest.TestCase):
    def test_profile_not_permitted_is_refused_in_pptp(self):
        self.rrp.permits = {None: frozenset({"other"})}   # this harness's link has no name
        client = self.connect_only()
        client.send(pptp.StartControlConnectionRequest())
        self.flush()
        [reply] = client.received()
        self.assertEqual(reply.result_code, pptp.StartResult.GENERAL_ERROR)
        self.assertEqual(self.rrp.relay.refusals["not_permitted"], 1)
        self.assertEqual(self.reactor.tcpClients, [])


class FragmentTests(unittest.SynchronousTestCase):
    def test_no_session_no_reassembly(self):
        reactor = MemoryReactorClock()
        from routeproxy.testing import RecordingGREPort
        lrp = LocalRouteProxy(reactor, RecordingGREPort)
        demux = lrp.relay.demux
        head = gre.build_gre(7, b"\xff\x03" + bytes(30), seq=1)[:16]
        self.assertFalse(demux.acceptsFragment("10.9.9.9", LRP_IP, head))
        self.assertFalse(demux.acceptsFragment("10.9.9.9", LRP_IP, None))
        demux.peerAddresses["10.9.9.9"] += 1   # a live control connection from it
        self.assertTrue(demux.acceptsFragment("10.9.9.9", LRP_IP, None))
        self.assertFalse(demux.acceptsFragment("10.9.9.9", LRP_IP, head))   # no call 7

    def test_one_datagram_flood_is_bounded(self):
        """8,000 8-byte fragments of one datagram: at most max_fragments are stored."""
        r = ipfrag.Reassembler(max_fragments=64)
        for n in range(8000):
            r.add(("a", "b", 1, 47), 8 * (2 * n + 1), True, bytes(8), 0.0, source="a")
        self.assertLessEqual(sum(len(p.pieces) for p in r._partials.values()), 64)
        self.assertGreater(r.dropped[ipfrag.DROP_TOO_MANY_FRAGMENTS], 50)

    def test_per_source_bound(self):
        r = ipfrag.Reassembler(max_per_source=4)
        for ident in range(10):
            r.add(("a", "b", ident, 47), 0, True, bytes(8), 0.0, source="a")
        r.add(("c", "b", 1, 47), 0, True, bytes(8), 0.0, source="c")
        self.assertEqual(len(r), 5)
        self.assertEqual(r.dropped[ipfrag.DROP_SOURCE_LIMIT], 6)
        # the source kept its newest four: the oldest went, not the new ones
        self.assertEqual(sorted(k[2] for k in r._partials if k[0] == "a"), [6, 7, 8, 9])

    def test_a_source_with_leftovers_is_not_shut_out(self):
        """A client whose second fragments were lost under load (a full capture ring, the
        gate) leaves datagrams that never complete.  Its next whole datagrams must still be
        put back together, not refused until the leftovers time out (5 s: at 30 k packets/s
        the old rule delivered 1 k of them)."""
        r = ipfrag.Reassembler(max_per_source=4)
        for ident in range(10):   # first fragments only: their second ones were lost
            r.add(("a", "b", ident, 47), 0, True, bytes(8), 0.0, source="a")
        whole = [r.add(("a", "b", ident, 47), offset, more, bytes(8), 0.1, source="a")
                 for ident in range(10, 20) for offset, more in ((0, True), (8, False))]
        self.assertEqual(sum(1 for w in whole if w is not None), 10)
        self.assertEqual(len(r), 3)   # one leftover made room; the source stays within its share


class SlowPeerTests(unittest.SynchronousTestCase):
    def connection(self, **config):
        clock = MemoryReactorClock()
        conn = MuxConnection(False, clock, MuxConfig(**config), sessionRequested=lambda *a: None)
        link = RecordingMuxLink(peerReads=False)
        conn.start(link)
        conn.dataReceived(F.Hello((1,), 16384, 65536, 10, 30, ()).encode())
        return conn, link, clock

    def test_pings_unanswered_while_the_buffer_is_full(self):
        conn, link, _ = self.connection(greWatermark=4096)
        ping = F.Ping(b"12345678").encode()
        conn.dataReceived(ping * 5000)
        self.assertLess(link.buffered, 4096 + 1024)
        self.assertGreater(conn.stats.pongsSkipped, 4000)

    def test_buffer_cap_drops_the_link(self):
        conn, link, _ = self.connection(greWatermark=1 << 30, maxSendBuffer=100000)
        conn.dataReceived(F.Ping(b"12345678").encode() * 20000)
        self.assertTrue(link.aborted)
        self.assertEqual(conn.linkDrops["not_reading"], 1)
        self.assertIn("not reading", conn.closeReason)

    def test_stall_timer_drops_the_link(self):
        conn, link, clock = self.connection(greWatermark=1000, stallTimeout=30.0)
        link.buffered = 5000
        for _ in range(20):   # 40 s in ping-sized steps: past the stall timeout, never dead
            clock.advance(conn.config.pingInterval)
            conn.dataReceived(F.Pong(b"\0" * 8).encode())   # alive, but reads nothing
        self.assertTrue(link.aborted)
        self.assertEqual(conn.linkDrops["not_reading"], 1)   # the stall check, not the dead one

    def test_a_reading_peer_at_the_watermark_is_not_stalled(self):
        """Under a GRE overload the buffer sits at the watermark, refilled as fast as the peer
        reads: bytes leave it every tick, so the link stays (issue 13: the watermark, not
        Twisted's 64 KiB pause, bounds GRE now)."""
        conn, link, clock = self.connection(greWatermark=1000, stallTimeout=30.0)
        link.peerReads = True
        link.buffered = 5000
        for _ in range(40):   # 80 s, over the stall timeout and never silent past the dead one
            clock.advance(conn.config.pingInterval)   # a tick writes a PING; the peer reads it ...
            clock.advance(0)
            pings = [f for f in link.frames() if isinstance(f, F.Ping)]
            conn.dataReceived(b"".join(F.Pong(p.data).encode() for p in pings))   # ... and answers
        self.assertGreater(conn.stats.bytesOut, 30 * 8)
        self.assertFalse(link.aborted)
        self.assertEqual(conn.linkDrops["not_reading"], 0)


class StartupGateTests(unittest.SynchronousTestCase):
    def test_maxstartups_curve(self):
        gate = StartupGate(Limits(maxStartups=(10, 30, 100)), MemoryReactorClock(),
                           chance=random.Random(1).random)
        gate.pending = 5
        self.assertTrue(all(gate.admit() for _ in range(100)))
        gate.pending = 10
        admitted = sum(gate.admit() for _ in range(1000))
        self.assertTrue(600 < admitted < 800, admitted)   # 30 % refused
        gate.pending = 100
        self.assertFalse(any(gate.admit() for _ in range(100)))


class OptionTests(unittest.SynchronousTestCase):
    def test_every_field_is_an_option(self):
        names = {s.name for s in limitSettings("lrp")} | {s.name for s in limitSettings("rrp")}
        self.assertEqual(len(names), len(dataclasses.fields(Limits)))

    def test_from_options(self):
        options = {s.name: s.default for s in limitSettings("rrp")}
        options["max-calls"] = 3
        self.assertEqual(fromOptions(options).maxCalls, 3)
        self.assertEqual(parseStartups("5:50:20"), (5, 50, 20))

    def test_capture_buffer_reaches_the_gre_port(self):
        """--gre-capture-buffer is the size the GRE port asks its capture for, and
        --gre-capture its kind (both daemons open their port through service.greOpener)."""
        from twisted.application.service import MultiService
        from twisted.internet.testing import MemoryReactor
        from routeproxy.service import greOpener
        from routeproxy.testing import RecordingGREReceiver
        for role in ("lrp", "rrp"):
            [setting] = [s for s in limitSettings(role) if s.name == "gre-capture-buffer"]
            options = {s.name: s.default for s in limitSettings(role)}
            options["gre-capture-buffer"] = setting.parse("3145728")
            bounds = fromOptions(options)
            opener = greOpener(MultiService(), MemoryReactor(), ["192.0.2.1"], "any",
                               captureBuffer=bounds.greCaptureBuffer, capture="raw")
            port = opener(RecordingGREReceiver())
            self.assertEqual((port.bufferSize, port.captureKind), (3 * 1024 * 1024, "raw"), role)
        self.assertEqual(Limits().greCaptureBuffer, 8 * 1024 * 1024)

    def test_no_call_share_reaches_the_pump(self):
        """--gre-no-call-share is what the native capture's pump hands back per window (both
        daemons open their port through service.greOpener)."""
        from twisted.application.service import MultiService
        from twisted.internet.testing import MemoryReactor
        from routeproxy import native
        from routeproxy.service import greOpener
        from routeproxy.testing import MemoryGRESystem, RecordingGREReceiver
        module, reason = native.load()
        if module is None:
            raise unittest.SkipTest(reason)
        self.assertEqual(Limits().greNoCallShare, module.lib.RP_PUNT_BURST)
        for role in ("lrp", "rrp"):
            [setting] = [s for s in limitSettings(role) if s.name == "gre-no-call-share"]
            options = {s.name: s.default for s in limitSettings(role)}
            options["gre-no-call-share"] = setting.parse("5")
            bounds = fromOptions(options)
            seen = []
            opener = greOpener(MultiService(), MemoryReactor(), ["192.0.2.1"], "any",
                               capture="native", noCallShare=bounds.greNoCallShare)
            from routeproxy import flows
            original = flows.FlowTable.setNoCallShare
            flows.FlowTable.setNoCallShare = lambda table, n: (seen.append(n), original(table, n))
            try:
                opener(RecordingGREReceiver())
            finally:
                flows.FlowTable.setNoCallShare = original
            self.assertEqual(seen, [5], role)

    def test_permits_from_option_and_ini(self):
        from twisted.python import usage
        from routeproxy.rrp_tap import parsePermits
        profiles = {"default": 1, "lab": 2}
        expected = {"lrp1": {"default", "lab"}, "lrp2": {"default"}}
        self.assertEqual(parsePermits(["lrp1=default,lab", "lrp2=default"], profiles), expected)
        # an INI value split at commas and newlines, as config.py splits repeatable keys
        self.assertEqual(parsePermits(["lrp1=default", "lab", "lrp2=default"], profiles), expected)
        self.assertRaises(usage.UsageError, parsePermits, ["lrp1=nosuch"], profiles)
        self.assertRaises(usage.UsageError, parsePermits, ["default"], profiles)

    def test_sample_ini_limit_keys_parse(self):
        """Every commented limit key of etc/*.ini, uncommented, is a valid setting."""
        import os
        from routeproxy import lrp_tap, rrp_tap
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        for daemon, options in (("lrp", lrp_tap.Options), ("rrp", rrp_tap.Options)):
            known = {s.name: s for s in options.settings}
            with open(os.path.join(root, "etc", f"routeproxy-{daemon}.ini")) as f:
                for line in f:
                    key, sep, value = line.lstrip("# ").partition(" = ")
                    if sep and key in {s.name for s in limitSettings(daemon)}:
                        known[key].parse(value.strip())


# --- no input a peer can send raises ----------------------------------------------------

def every_message(draw_ids):
    """One instance of every PPTP control message type, its call-ID fields from *draw_ids*."""
    out = []
    for cls in pptp.MESSAGE_CLASSES.values():
        fields = {name: draw_ids() for name, _ in pptp.CALL_ID_FIELDS.get(cls, ())}
        out.append(cls(**fields))
    return out


class NoTracebackTests(LimitedHarness, unittest.TestCase):
    """Every message type, in every direction, at both daemons, in several states."""

    def setUp(self):
        self.failures = []

        def observer(event):
            if event.get("log_failure") is not None or event.get("log_level").name == "critical":
                self.failures.append(event)

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def exercise(self, ids):
        LimitedHarness.setUp(self)   # a fresh pair of daemons for every example
        client, server = self.connect_client("10.0.0.5")
        self.dial(client, server, 1, 300)
        rng = iter(ids)
        draw = lambda: next(rng, 1)   # noqa: E731
        for sender in (client, server):
            for message in every_message(draw):
                sender.send(message)
                self.flush()
        # GRE for every call ID in use, both ways, and after an incoming call
        server.send(pptp.IncomingCallRequest(call_id=77))
        self.flush()
        for local in list(self.lrp.space._owners) + [0, 1, 0xFFFF]:
            self.lrp.relay.demux.greReceived("10.0.0.5", LRP_IP, gre.build_gre(local, b"x", seq=1))
        for local in list(self.rrp.scopes.lookup("10.0.4.2")._owners) + [0, 0xFFFF]:
            self.rrp.relay.demux.greReceived("10.0.4.2", "10.0.3.1", gre.build_gre(local, b"y", seq=1))
        self.flush()

    def test_every_message_both_directions(self):
        for ids in ([0, 1, 300, 0xFFFF] * 10, list(range(40))):
            self.exercise(ids)
        self.assertEqual(self.failures, [])

    @settings(max_examples=25, deadline=None)
    @given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=60))
    def test_random_ids(self, ids):
        self.exercise(ids)
        self.assertEqual(self.failures, [])


class FileBudgetTests(unittest.SynchronousTestCase):
    def test_low_budget_pauses_accepting(self):
        from routeproxy.fdbudget import FileBudget, PausingPort
        open_files = [1000]
        budget = FileBudget(reserve=64, limit=lambda: 1024, count=lambda: open_files[0],
                            clock=lambda: 0.0, interval=0.0)
        self.assertTrue(budget.low())
        reactor = MemoryReactorClock()
        port = PausingPort.__new__(PausingPort)    # no socket: only doRead's decision
        port.budget, port.reactor, port.pauseFor = budget, reactor, 1.0
        port.limitedLog = __import__("routeproxy.stats", fromlist=["LimitedLog"]).LimitedLog(
            PausingPort.log, burst=1)
        port._realPortNumber, port.connected, port._resumeCall = 1723, 1, None
        reading = []
        port.stopReading = lambda: reading.append("stop")
        port.startReading = lambda: reading.append("start")
        port.doRead()
        self.assertEqual((reading, budget.pauses), (["stop"], 1))
        open_files[0] = 100
        reactor.advance(1.0)
        self.assertEqual(reading, ["stop", "start"])
        self.assertFalse(budget.low())


class ReloadTests(LimitedHarness, unittest.TestCase):
    def test_reload_applies_new_limits_and_permits(self):
        new = Limits(maxPerAddress=1)
        changes = self.lrp.reconfigure({"allow": None, "profile": "default", "tls-files": "x",
                                        "limits": DEFAULT},
                                       {"allow": None, "profile": "default", "tls-files": "x",
                                        "limits": new})
        self.assertIn("limits (docs/limits.md) for new connections and calls", changes)
        self.assertIs(self.lrp.admission.limits, new)
        self.connect_only("10.0.0.5")
        self.assertIsInstance(self.connect_only("10.0.0.5").protocol, RefusingProtocol)
        changes = self.rrp.reconfigure({"tls-files": "x", "lrp-name": None},
                                       {"tls-files": "x", "lrp-name": None,
                                        "profiles": self.rrp.profiles,
                                        "permits": {"lrp9": {"default"}}})
        self.assertEqual(changes, ["--permit (new sessions)"])
        self.assertFalse(self.rrp.permitted("lrp9", "other"))
