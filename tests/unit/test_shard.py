"""--shard I/N (routeproxy/shard.py, docs/multiworker.md): the call-ID ranges, the capture
filter clause run through libpcap's own BPF compiler and interpreter on crafted packets, the
reassembler's handling of other shards' fragments, the options and the shared listener."""
import os
import socket

from twisted.internet import error, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest

from routeproxy import ipfrag, lrp_tap, rrp_tap
from routeproxy.capture import DLT_EN10MB, DLT_LINUX_SLL, DLT_RAW, GREIOError, greFilter
from routeproxy.fdbudget import PausingPort
from routeproxy.greport import GREPort
from routeproxy.shard import ID_SPACE, UNSHARDED, Shard, parse_shard, shard_index
from routeproxy.testing import MemoryGRESystem, RecordingGREReceiver
from tests.support.options import LRP_REQUIRED, RRP_REQUIRED, parse
from tests.support.packets import RECEIVER, SENDER, enhanced_gre, frame, ip_fragments, ipv4

try:
    import pcap
except ImportError:  # pragma: no cover
    pcap = None


class RangeTests(unittest.SynchronousTestCase):
    def test_ranges_cover_the_space_once(self):
        """For every N the N slices are contiguous, disjoint and cover 0..65535; 0 is never
        allocated; each shard owns exactly its allocatable IDs."""
        for count in (1, 2, 3, 7, 256):
            shards = [Shard(i, count) for i in range(count)]
            self.assertEqual([s.low for s in shards[1:]], [s.high for s in shards[:-1]])
            self.assertEqual((shards[0].low, shards[-1].high), (0, ID_SPACE))
            self.assertEqual(shards[0].first, 1)
            self.assertEqual(sum(s.last - s.first + 1 for s in shards), ID_SPACE - 1)
            for call_id in (1, 2, 21845, 21846, 32767, 32768, 40000, 65535):
                self.assertEqual([s for s in shards if s.owns(call_id)], [shards[shard_index(call_id, count)]],
                                 (count, call_id))
        self.assertEqual((Shard(1, 2).first, Shard(1, 2).last), (32768, 65535))

    def test_parse(self):
        self.assertEqual(parse_shard(" 1/2 "), Shard(1, 2))
        self.assertEqual(parse_shard("0/1"), UNSHARDED)
        for bad in ("2/2", "1", "-1/2", "a/b", "0/0", "0/257", "1/2/3"):
            self.assertRaises(ValueError, parse_shard, bad)
        self.assertIsNone(UNSHARDED.bpf_clause())

    def test_snapshot(self):
        self.assertEqual(Shard(1, 4).snapshot(), {"shard": "1/4", "first_id": 16384, "last_id": 32767})

    def test_status_table_and_metrics_name_the_shard(self):
        from routeproxy.metrics import format_metrics
        from routeproxy.statuscli import format_table
        snap = {"role": "lrp", "sessions": [], **Shard(1, 4).snapshot()}
        self.assertIn("LRP shard 1/4 (IDs 16384-32767):", format_table(snap))
        self.assertIn('routeproxy_shard_info{first_id="16384",last_id="32767",shard="1/4"} 1.0',
                      format_metrics(snap))
        self.assertIn("LRP: ", format_table(dict(snap, **UNSHARDED.snapshot())))


def greFrame(datalink, callID, opts=b"", off=0):
    return frame(datalink, ipv4(SENDER, RECEIVER, enhanced_gre(callID, b"ppp"), opts=opts, off=off))


class FilterTests(unittest.SynchronousTestCase):
    """The generated expression compiled by libpcap and run by its BPF interpreter."""

    def setUp(self):
        if pcap is None:
            raise unittest.SkipTest("pypcap is not installed")

    def matches(self, shard, datalink, packet):
        return bool(pcap.bpf(greFilter([RECEIVER], shard.bpf_clause()).encode(), datalink).filter(packet))

    def test_each_call_id_reaches_exactly_its_shard(self):
        for datalink in (DLT_RAW, DLT_EN10MB, DLT_LINUX_SLL):
            for count in (2, 3):
                shards = [Shard(i, count) for i in range(count)]
                for callID in (1, 100, 21845, 21846, 32767, 32768, 43690, 65535):
                    for opts in (b"", b"\x01\x01\x01\x00", b"\x01" * 12):   # IHL 5, 6, 8
                        got = [s for s in shards if self.matches(s, datalink, greFrame(datalink, callID, opts))]
                        self.assertEqual(got, [s for s in shards if s.owns(callID)],
                                         (datalink, count, callID, len(opts)))

    def test_fragments(self):
        """A first fragment goes by its call ID; a later one (no GRE header) reaches every shard."""
        shards = [Shard(0, 2), Shard(1, 2)]
        for callID in (5, 40000):
            first, second = ip_fragments(SENDER, RECEIVER, enhanced_gre(callID, bytes(1538)), 1480)
            self.assertEqual([self.matches(s, DLT_RAW, first) for s in shards],
                             [s.owns(callID) for s in shards])
            self.assertEqual([self.matches(s, DLT_RAW, second) for s in shards], [True, True])

    def test_unsharded_filter_unchanged(self):
        self.assertEqual(greFilter(["10.0.0.2"]), greFilter(["10.0.0.2"], UNSHARDED.bpf_clause()))
        self.assertTrue(self.matches(UNSHARDED, DLT_RAW, greFrame(DLT_RAW, 40000)))
        self.assertFalse(self.matches(Shard(0, 2), DLT_RAW, frame(DLT_RAW, ipv4(SENDER, "10.9.9.9", enhanced_gre(5)))))


class ReassemblyTests(unittest.SynchronousTestCase):
    def test_tails_open_false(self):
        """Only a first fragment opens a datagram; a tail alone is passed over, holding nothing."""
        r = ipfrag.Reassembler(tails_open=False)
        self.assertIsNone(r.add("a", 8, False, b"tail", 0.0))
        self.assertEqual((len(r), r.foreign, dict(r.dropped)), (0, 1, {}))
        self.assertIsNone(r.add("b", 0, True, b"headhead", 0.0))
        self.assertEqual(r.add("b", 8, False, b"tail", 0.0), b"headheadtail")
        self.assertEqual(r.foreign, 1)
        held = ipfrag.Reassembler()
        self.assertIsNone(held.add("a", 8, False, b"tail", 0.0))
        self.assertEqual((len(held), held.foreign), (1, 0))   # unsharded: a tail may come first

    def test_port_of_a_shard(self):
        """A shard's port: the filter carries the clause; its own fragmented GRE is delivered
        whole; another shard's tails are counted apart, not as drops, and hold nothing."""
        receiver = RecordingGREReceiver()
        system = MemoryGRESystem(DLT_EN10MB)
        port = GREPort(receiver, [RECEIVER], system=system, reactor=MemoryReactor(), shard=Shard(1, 2))
        port.startListening()
        self.assertTrue(system.captures[0].filters[0].endswith(" and " + Shard(1, 2).bpf_clause()))
        ours = enhanced_gre(40000, os.urandom(1538))
        first, second = ip_fragments(SENDER, RECEIVER, ours, 1480, ident=1)
        theirs = ip_fragments(SENDER, RECEIVER, enhanced_gre(5, bytes(1538)), 1480, ident=2)[1]
        system.captures[0].frames.extend(frame(DLT_EN10MB, p) for p in (theirs, first, second, theirs))
        port.doRead()
        snap = port.snapshot()
        self.assertEqual(receiver.packets, [(SENDER, RECEIVER, ours)])
        self.assertEqual((snap["fragments_other_shard"], snap["reassembling"], snap["dropped"]), (2, 0, {}))
        self.assertNotIn("fragments_other_shard", GREPort(receiver, [RECEIVER], system=system).snapshot())
        self.assertRaises(GREIOError, GREPort, receiver, [RECEIVER], capture="raw", system=system,
                          shard=Shard(0, 2))


class OptionTests(unittest.SynchronousTestCase):
    def test_both_daemons(self):
        for tap, required in ((lrp_tap, LRP_REQUIRED), (rrp_tap, RRP_REQUIRED + ["--pptp-server", "10.0.0.1"])):
            self.assertEqual(parse(tap.Options, required)["shard"], UNSHARDED)
            self.assertEqual(parse(tap.Options, required + ["--shard", "1/2"])["shard"], Shard(1, 2))
            with self.assertRaises(usage.UsageError) as caught:
                parse(tap.Options, required + ["--shard", "2/2"])
            self.assertEqual(str(caught.exception).count("\n"), 0)
            self.assertIn("--shard '2/2'", str(caught.exception))

    def test_raw_capture_does_not_shard(self):
        """--gre-capture raw parses alone and is refused with --shard, in one line."""
        for tap, required in ((lrp_tap, LRP_REQUIRED), (rrp_tap, RRP_REQUIRED + ["--pptp-server", "10.0.0.1"])):
            self.assertEqual(parse(tap.Options, required + ["--gre-capture", "pcap"])
                             ["gre-capture"], "pcap")
            self.assertEqual(parse(tap.Options, required + ["--gre-capture", "raw"])["gre-capture"], "raw")
            with self.assertRaises(usage.UsageError) as caught:
                parse(tap.Options, required + ["--gre-capture", "raw", "--shard", "0/2"])
            self.assertIn("--gre-capture raw cannot be sharded", str(caught.exception))
            self.assertEqual(str(caught.exception).count("\n"), 0)

    def test_native_raw_capture_on_both_daemons(self):
        """--gre-capture native-raw: both daemons take it, with --shard too (its filter is
        attached to the socket), and get the native link read as native does; where the
        module cannot load, refused with load()'s reason, in one line."""
        from routeproxy import native
        rrpArgs = RRP_REQUIRED + ["--pptp-server", "10.0.0.1", "--source", "127.0.0.2"]
        kind = ["--gre-capture", "native-raw"]
        if native.load()[0] is not None:
            for tap, args in ((lrp_tap, LRP_REQUIRED), (rrp_tap, rrpArgs)):
                options = parse(tap.Options, args + kind + ["--shard", "1/2"])
                self.assertEqual((options["gre-capture"], options["shard"]),
                                 ("native-raw", Shard(1, 2)))
                top = tap.makeService(options, reactor=MemoryReactorClock())
                relay = top.proxy.relay
                self.assertEqual(relay.grePort.captureKind, "native-raw")
                self.assertEqual(relay.flows.tables,
                                 [relay.grePort.flows, relay.grePort.linkFlows])
        self.patch(native, "load", lambda: (None, "routeproxy.native is not built (why)"))
        for tap, args in ((lrp_tap, LRP_REQUIRED), (rrp_tap, rrpArgs)):
            with self.assertRaises(usage.UsageError) as caught:
                parse(tap.Options, args + kind)
            self.assertEqual(str(caught.exception),
                             "--gre-capture native-raw: routeproxy.native is not built (why)")

    def test_native_capture_on_both_daemons(self):
        """--gre-capture native: both daemons take it (and shards: the native handle compiles
        the same filter): the capture read in C and each link connection gets a C reader,
        both tables kept by the relay; where the module cannot load, both refuse it with
        load()'s reason, in one line.  auto (the default) is native-raw where it loads (native
        with an interface named), else pcap with the reason."""
        from routeproxy import native
        rrpArgs = RRP_REQUIRED + ["--pptp-server", "10.0.0.1", "--source", "127.0.0.2",
                                  "--gre-capture", "native"]
        if native.load()[0] is not None:
            for tap, args in ((lrp_tap, LRP_REQUIRED + ["--gre-capture", "native"]),
                              (rrp_tap, rrpArgs)):
                options = parse(tap.Options, args)
                self.assertEqual(options["gre-capture"], "native")
                top = tap.makeService(options, reactor=MemoryReactorClock())
                relay = top.proxy.relay
                self.assertEqual(relay.grePort.captureKind, "native")
                self.assertEqual(relay.flows.tables,
                                 [relay.grePort.flows, relay.grePort.linkFlows])
                self.assertEqual(relay.grePort.snapshot()["native_link"],
                                 {"entries": 0, "in_c": 0, "sent_by_c": 0, "tls_reads": 0,
                                  "tls_handed_back": 0, "tls_flushed": 0,
                                  "sojourn_dropped": 0, "header_written": 0,
                                  "header_refused": 0})
            for tap, args in ((lrp_tap, LRP_REQUIRED), (rrp_tap, rrpArgs[:-2])):
                self.assertEqual(parse(tap.Options, args)["gre-capture"], "native-raw")   # auto
                # an interface named: the ring, the one capture that reads a given interface
                self.assertEqual(parse(tap.Options, args + ["--gre-interface", "lo"])["gre-capture"],
                                 "native")
        self.patch(native, "load", lambda: (None, "routeproxy.native is not built (why)"))
        for tap, args in ((lrp_tap, LRP_REQUIRED + ["--gre-capture", "native"]),
                          (rrp_tap, rrpArgs)):
            with self.assertRaises(usage.UsageError) as caught:
                parse(tap.Options, args)
            self.assertEqual(str(caught.exception),
                             "--gre-capture native: routeproxy.native is not built (why)")
            # the default, auto, falls back to pcap with the reason for the start-up line
            options = parse(tap.Options, args[:-2])
            self.assertEqual((options["gre-capture"], options["gre-capture-note"]),
                             ("pcap", "--gre-capture auto: pcap, as routeproxy.native is not "
                                      "built (why)"))
            events = []
            globalLogPublisher.addObserver(events.append)
            try:
                top = tap.makeService(options, reactor=MemoryReactorClock())
            finally:
                globalLogPublisher.removeObserver(events.append)
            self.assertIsNone(top.proxy.relay.flows)
            self.assertIn("--gre-capture auto: pcap, as routeproxy.native is not built (why); "
                          "GRE takes the Python path (docs/fastpath.md)",
                          [formatEvent(e) for e in events])

    def test_services_allocate_in_range(self):
        """The taps give the LRP's space and the RRP's scopes the shard's range, and the
        snapshot names the shard."""
        options = parse(lrp_tap.Options, LRP_REQUIRED + ["--pptp-listen", "127.0.0.1:11723", "--shard", "1/2"])
        top = lrp_tap.makeService(options, reactor=MemoryReactorClock())
        ids = {top.lrp.space.allocate(n) for n in range(50)}
        self.assertTrue(all(Shard(1, 2).owns(i) for i in ids), ids)
        self.assertEqual(top.snapshot()["shard"], "1/2")
        self.assertTrue(top.lrp.relay.grePort.bpfFilter.endswith(Shard(1, 2).bpf_clause()))
        options = parse(rrp_tap.Options, RRP_REQUIRED + ["--pptp-server", "10.0.0.1", "--source", "127.0.0.2",
                                                         "--shard", "0/3"])
        top = rrp_tap.makeService(options, reactor=MemoryReactorClock())
        space = top.rrp.scopes.space_for("10.0.0.1")
        ids = {space.allocate(n) for n in range(50)}
        self.assertTrue(all(1 <= i <= Shard(0, 3).last for i in ids), ids)
        self.assertEqual((top.snapshot()["first_id"], top.snapshot()["last_id"]), (1, 21844))


class ReusePortTests(unittest.TestCase):
    """Real listeners on 127.0.0.1: with reusePort two processes' ports share one number."""

    def listen(self, portNumber, reusePort):
        port = PausingPort(portNumber, Factory.forProtocol(Protocol), interface="127.0.0.1",
                           reactor=reactor, reusePort=reusePort)
        port.startListening()
        self.addCleanup(port.stopListening)
        return port

    def test_shared_only_with_reuseport(self):
        first = self.listen(0, True)
        number = first.getHost().port
        second = self.listen(number, True)
        self.assertEqual(second.getHost().port, number)
        self.assertEqual(second.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), 1)
        self.assertRaises(error.CannotListenError, self.listen, number, False)
        plain = self.listen(0, False)
        self.assertEqual(plain.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), 0)
        self.assertRaises(error.CannotListenError, self.listen, plain.getHost().port, True)

