"""Tests for routeproxy.greio: GRE capture and send.

Two kinds:

* ``MemoryPortTests`` drive a GREPort through ``MemoryGRESystem`` (a fake OS: captures and
  raw sockets in memory, no network) with frames built by dpkt or by hand, so every
  datalink, every drop reason, the read budget and the send error paths are exercised
  without root.
* ``KernelTests`` use the real kernel: network namespaces and veth pairs (tests/support/netns.py),
  real raw sockets and pypcap handles opened inside the namespaces, the trial reactor
  delivering.  They skip, with the reason, when not root or without ``ip netns``.

``python -m tests.unit.test_greio`` measures receive (pcap vs raw socket) and send costs.
"""
import errno
import os
import socket
import struct
import subprocess
import sys
import time

import dpkt
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.trial import unittest

from routeproxy import greio
from routeproxy.greio import (
    DLT_EN10MB, DLT_IPV4, DLT_LINUX_SLL, DLT_LINUX_SLL2, DLT_LOOP, DLT_NULL, DLT_RAW,
    GREIOError, GREPort, MemoryGRESystem,
)
from tests.support import netns

SENDER, RECEIVER, OTHER = "10.0.0.1", "10.0.0.2", "10.0.0.3"


# -- building packets --------------------------------------------------------------------------


def enhanced_gre(call_id, payload=b"", seq=1):
    """An enhanced GRE data packet (0x3001), built by hand from RFC 2637 s4.1."""
    return struct.pack("!HHHHI", 0x3001, 0x880B, len(payload), call_id, seq) + payload


def ipv4(src, dst, payload, proto=47, off=0, opts=b""):
    """An IPv4 packet built by dpkt (an independent encoder)."""
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=proto, ttl=64,
                    hl=5 + len(opts) // 4, opts=opts, data=payload)
    ip.len = len(ip)
    packed = bytes(ip)
    return packed[:6] + struct.pack("!H", off) + packed[8:] if off else packed


def ip_fragments(src, dst, payload, size, ident=0x1234, proto=47):
    """*payload* as IPv4 fragments of *size* payload bytes each (built by dpkt, like a kernel)."""
    packets = []
    for start in range(0, len(payload), size):
        more = start + size < len(payload)
        ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=proto, ttl=64,
                        id=ident, _flags_offset=(0x2000 if more else 0) | start // 8,
                        data=payload[start:start + size])
        ip.len = len(ip)
        packets.append(bytes(ip))
    return packets


def frame(datalink, ip, ethertype=0x0800):
    """*ip* wrapped in the link-layer header of *datalink* (what pcap would hand over)."""
    if datalink == DLT_EN10MB:
        return bytes(dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, type=ethertype, data=ip))
    if datalink == DLT_LINUX_SLL:
        return bytes(dpkt.sll.SLL(type=0, hrd=1, hlen=6, hdr=b"\x02" * 6 + b"\0\0",
                                  ethtype=ethertype, data=ip))
    if datalink == DLT_LINUX_SLL2:
        return struct.pack("!HHIHBB8s", ethertype, 0, 2, 1, 0, 6, b"\x02" * 6 + b"\0\0") + ip
    if datalink == DLT_NULL:
        return struct.pack("=I", 2 if ethertype == 0x0800 else 24) + ip
    if datalink == DLT_LOOP:
        return struct.pack("!I", 2 if ethertype == 0x0800 else 24) + ip
    return ip


class Collector:
    """A receiver that records greReceived calls and can fire when enough have arrived."""

    def __init__(self, fail_on=None):
        self.packets = []
        self.fail_on = fail_on
        self._waiting = []

    def greReceived(self, src, dst, gre):
        if gre == self.fail_on:
            raise RuntimeError("receiver bug")
        self.packets.append((src, dst, gre))
        for count, d in list(self._waiting):
            if len(self.packets) >= count:
                self._waiting.remove((count, d))
                d.callback(self.packets)

    def waitFor(self, count, timeout=5.0):
        """A Deferred that fires when *count* packets arrived, or fails after *timeout* s."""
        if len(self.packets) >= count:
            return defer.succeed(self.packets)
        d = defer.Deferred()
        self._waiting.append((count, d))
        return d.addTimeout(timeout, reactor)


def settle(seconds=0.2):
    """Let the reactor run for a moment (to see that nothing more arrives)."""
    return task.deferLater(reactor, seconds, lambda: None)


# -- memory fake -------------------------------------------------------------------------------


class MemoryPortTests(unittest.SynchronousTestCase):
    """GREPort driven through MemoryGRESystem: a fake OS, nothing touches a network."""

    def port(self, datalink=DLT_EN10MB, local=(RECEIVER,), receiver=None, **kwargs):
        self.system = MemoryGRESystem(datalink)
        self.receiver = receiver or Collector()
        port = GREPort(self.receiver, list(local), system=self.system, reactor=MemoryReactor(), **kwargs)
        port.startListening()
        self.capture = self.system.captures[0] if self.system.captures else None
        return port

    def feed(self, *frames):
        self.capture.frames.extend(frames)

    def test_every_datalink(self):
        """Each supported link layer is stripped and the same GRE comes out."""
        gre = enhanced_gre(0x1234, b"ppp-frame")
        for datalink in (DLT_EN10MB, DLT_LINUX_SLL, DLT_LINUX_SLL2, DLT_RAW, DLT_IPV4, DLT_NULL, DLT_LOOP):
            port = self.port(datalink)
            self.feed(frame(datalink, ipv4(SENDER, RECEIVER, gre)))
            port.doRead()
            self.assertEqual(self.receiver.packets, [(SENDER, RECEIVER, gre)], datalink)

    def test_non_ipv4_link_type(self):
        """An IPv6/ARP ethertype or family is dropped as not_ipv4, on every typed link."""
        for datalink in (DLT_EN10MB, DLT_LINUX_SLL, DLT_LINUX_SLL2, DLT_NULL, DLT_LOOP):
            port = self.port(datalink)
            self.feed(frame(datalink, ipv4(SENDER, RECEIVER, enhanced_gre(1)), ethertype=0x86DD))
            port.doRead()
            self.assertEqual((self.receiver.packets, port.stats.dropped), ([], {"not_ipv4": 1}), datalink)

    def test_ethernet_padding_is_not_gre(self):
        """A short frame padded to 60 bytes: the IP total length says where GRE ends."""
        gre = struct.pack("!HHHHI", 0x2081, 0x880B, 0, 7, 9)  # ack-only, 12 bytes
        raw = frame(DLT_EN10MB, ipv4(SENDER, RECEIVER, gre))
        self.assertLess(len(raw), 60)
        port = self.port()
        self.feed(raw + b"\0" * (60 - len(raw)))
        port.doRead()
        self.assertEqual(self.receiver.packets, [(SENDER, RECEIVER, gre)])

    def test_ip_options_skipped(self):
        """IHL > 5: GRE starts after the options."""
        gre = enhanced_gre(5, b"x")
        port = self.port()
        self.feed(frame(DLT_EN10MB, ipv4(SENDER, RECEIVER, gre, opts=b"\x01\x01\x01\x00")))
        port.doRead()
        self.assertEqual(self.receiver.packets, [(SENDER, RECEIVER, gre)])

    def test_parse_errors_counted_by_reason(self):
        """Every malformed packet is dropped under its own reason; the good one still arrives."""
        good = ipv4(SENDER, RECEIVER, enhanced_gre(1, b"ok"))
        ihl4 = bytes([0x44]) + good[1:]
        cases = {
            "truncated": [good[:19], good[:-1]],
            "not_ipv4": [bytes([0x65]) + good[1:]],
            "bad_header": [ihl4, good[:2] + struct.pack("!H", 12) + good[4:]],
            "not_gre": [ipv4(SENDER, RECEIVER, b"udp!", proto=17)],
            "fragment_invalid": [ipv4(SENDER, RECEIVER, b"frag", off=0x2000)],  # MF, not 8n bytes
            "not_local": [ipv4(SENDER, OTHER, enhanced_gre(1)), ipv4(SENDER, OTHER, b"frag", off=185)],
        }
        port = self.port(DLT_RAW)
        for frames in cases.values():
            self.feed(*frames)
        self.feed(ipv4(SENDER, RECEIVER, b"frag", off=185))  # a last fragment: held, not dropped
        self.feed(good)
        port.doRead()
        self.assertEqual(dict(port.stats.dropped), {reason: len(f) for reason, f in cases.items()})
        self.assertEqual(self.receiver.packets, [(SENDER, RECEIVER, enhanced_gre(1, b"ok"))])
        self.assertEqual(port.stats.received, sum(map(len, cases.values())) + 2)
        self.assertEqual(port.statistics()["reassembling"], 1)
        self.assertEqual(port.stats.delivered, 1)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=80), st.sampled_from([DLT_EN10MB, DLT_LINUX_SLL, DLT_RAW, DLT_NULL]))
    def test_random_bytes_never_raise(self, data, datalink):
        """Whatever arrives is either delivered or counted; nothing escapes doRead."""
        port = self.port(datalink)
        self.feed(data)
        self.assertIsNone(port.doRead())
        held = port.statistics()["reassembling"]  # a lone fragment waits for the rest
        self.assertEqual(port.stats.delivered + sum(port.stats.dropped.values()) + held, 1)

    def test_fragments_reassembled_and_delivered_whole(self):
        """A 1550-byte GRE in fragments, in any order, interleaved: delivered once, whole."""
        big = enhanced_gre(0x42, os.urandom(1538))
        small = enhanced_gre(0x43, b"between")
        for datalink in (DLT_EN10MB, DLT_LINUX_SLL, DLT_RAW):
            first, second = ip_fragments(SENDER, RECEIVER, big, 1480)
            port = self.port(datalink)
            self.feed(*[frame(datalink, ip) for ip in (second, ipv4(SENDER, RECEIVER, small), first)])
            port.doRead()
            self.assertEqual(self.receiver.packets, [(SENDER, RECEIVER, small), (SENDER, RECEIVER, big)])
            stats = port.statistics()
            self.assertEqual((stats["fragments"], stats["reassembled"], stats["delivered"],
                              stats["reassembling"], stats["dropped"]), (2, 1, 2, 0, {}), datalink)

    def test_fragments_of_two_datagrams_and_sources_kept_apart(self):
        one, two = enhanced_gre(1, os.urandom(300)), enhanced_gre(2, os.urandom(300))
        pieces = (ip_fragments(SENDER, RECEIVER, one, 104, ident=9)
                  + ip_fragments(OTHER, RECEIVER, two, 104, ident=9))
        port = self.port(DLT_RAW)
        self.feed(*pieces[::-1])
        port.doRead()
        self.assertEqual(self.receiver.packets, [(OTHER, RECEIVER, two), (SENDER, RECEIVER, one)])
        self.assertEqual(port.stats.reassembled, 2)

    def test_fragment_timeout_counted(self):
        """An incomplete datagram is dropped after reassemblyTimeout by the reactor's clock."""
        clock = MemoryReactorClock()
        self.system = MemoryGRESystem(DLT_RAW)
        receiver = Collector()
        port = GREPort(receiver, [RECEIVER], system=self.system, reactor=clock, reassemblyTimeout=5.0)
        port.startListening()
        first, second = ip_fragments(SENDER, RECEIVER, enhanced_gre(1, bytes(1538)), 1480)
        self.system.captures[0].frames.append(first)
        port.doRead()
        clock.advance(4.9)
        self.assertEqual(port.statistics()["reassembling"], 1)
        clock.advance(0.2)
        stats = port.statistics()
        self.assertEqual((stats["reassembling"], stats["dropped"]), (0, {"reassembly_timeout": 1}))
        self.system.captures[0].frames.append(second)  # too late: held on its own
        port.doRead()
        self.assertEqual(receiver.packets, [])

    def test_reassembly_table_bounded(self):
        port = self.port(DLT_RAW, maxReassemblies=8)
        self.feed(*[ip_fragments(SENDER, RECEIVER, bytes(64), 32, ident=i)[0] for i in range(20)])
        port.doRead()
        stats = port.statistics()
        self.assertEqual((stats["reassembling"], stats["dropped"]), (8, {"reassembly_evicted": 12}))

    def test_conflicting_fragments_dropped(self):
        first, second = ip_fragments(SENDER, RECEIVER, enhanced_gre(1, bytes(100)), 64)
        liar = ip_fragments(SENDER, RECEIVER, enhanced_gre(1, b"\xff" * 100), 64)[0]
        port = self.port(DLT_RAW)
        self.feed(first, liar, second)
        port.doRead()
        self.assertEqual(self.receiver.packets, [])
        self.assertEqual(port.stats.dropped, {"reassembly_overlap": 1})

    def test_read_budget(self):
        """One wake-up reads batch after batch until maxPacketsPerRead, then yields."""
        port = self.port()
        port.maxPacketsPerRead = 100
        self.capture.batch = 32
        self.feed(*[frame(DLT_EN10MB, ipv4(SENDER, RECEIVER, enhanced_gre(1, b"%d" % i)))
                    for i in range(250)])
        port.doRead()
        self.assertEqual((len(self.receiver.packets), self.capture.readCalls), (100, 4))  # 32+32+32+4
        port.doRead()
        self.assertEqual(len(self.receiver.packets), 200)
        port.doRead()  # 50 left: two full batches and a partial one, then an empty read ends it
        self.assertEqual((len(self.receiver.packets), self.capture.readCalls), (250, 4 + 4 + 3))
        self.assertEqual([p[2][12:] for p in self.receiver.packets], [b"%d" % i for i in range(250)])
        self.assertEqual(port.stats.reads, 3)

    def test_receiver_error_counted_and_reading_goes_on(self):
        bad = enhanced_gre(1, b"bad")
        port = self.port(receiver=Collector(fail_on=bad))
        self.feed(*[frame(DLT_EN10MB, ipv4(SENDER, RECEIVER, g)) for g in (bad, enhanced_gre(2), bad)])
        port.doRead()
        self.assertEqual(len(self.receiver.packets), 1)
        self.assertEqual(port.stats.dropped, {"receiver_error": 2})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_stop_from_inside_greReceived(self):
        """A receiver that stops the port mid-read: no more deliveries, capture closed after the read."""
        port = None

        class Stopper(Collector):
            def greReceived(self, src, dst, gre):
                Collector.greReceived(self, src, dst, gre)
                self.closedDuringRead = capture.closed
                port.stopListening()

        port = self.port(receiver=Stopper())
        capture = self.capture
        self.feed(*[frame(DLT_EN10MB, ipv4(SENDER, RECEIVER, enhanced_gre(i))) for i in range(5)])
        port.doRead()
        self.assertEqual(len(self.receiver.packets), 1)
        self.assertFalse(self.receiver.closedDuringRead)
        self.assertTrue(capture.closed)

    def test_capture_error_stops_reading(self):
        """An OSError from the capture is returned to the reactor (which then closes the port)."""
        port = self.port()
        self.capture.error = OSError(errno.ENETDOWN, "Network is down")
        self.assertIsInstance(port.doRead(), OSError)

    def test_filter_names_the_local_addresses(self):
        port = self.port(local=[RECEIVER])
        self.assertEqual(self.capture.filters, ["ip proto 47 and (dst host 10.0.0.2)"])
        port.addLocalAddress(OTHER)
        self.assertEqual(self.capture.filters[-1], "ip proto 47 and (dst host 10.0.0.2 or dst host 10.0.0.3)")
        self.feed(frame(DLT_EN10MB, ipv4(SENDER, OTHER, enhanced_gre(3))))
        port.doRead()
        self.assertEqual(self.receiver.packets, [(SENDER, OTHER, enhanced_gre(3))])
        port.addLocalAddress(OTHER)  # a second user of the same address
        port.removeLocalAddress(OTHER)
        self.assertEqual(port.localAddresses, [RECEIVER, OTHER])
        port.removeLocalAddress(OTHER)
        self.assertEqual(self.capture.filters[-1], "ip proto 47 and (dst host 10.0.0.2)")
        self.assertEqual(port.localAddresses, [RECEIVER])
        port.removeLocalAddress(RECEIVER)  # given to the constructor: stays
        port.removeLocalAddress("10.0.0.77")  # never added: nothing happens
        self.assertEqual(port.localAddresses, [RECEIVER])
        self.assertRaises(GREIOError, port.addLocalAddress, "not.an.address.x")

    def test_send_socket_drops_everything(self):
        """The socket that also stops ICMP protocol-unreachable carries the one-instruction drop filter."""
        port = self.port()
        sender = self.system.sockets[0]
        self.assertEqual(len(sender.options), 2)
        level, option, fprog = sender.options[0]
        self.assertEqual((level, option), (socket.SOL_SOCKET, 26))
        self.assertEqual(struct.unpack("HP", fprog)[0], 1)
        # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: DF clear, oversized GRE is fragmented
        self.assertEqual(sender.options[1], (socket.IPPROTO_IP, 10, 0))
        port.stopListening()
        self.assertTrue(sender.closed and self.capture.closed)

    def test_send_binds_one_socket_per_source(self):
        """One socket per local address, bound, non-blocking, drop-all filter, opened at start."""
        port = self.port(local=[RECEIVER, OTHER])
        senders = self.system.sockets
        self.assertEqual([s.bound for s in senders], [(RECEIVER, 0), (OTHER, 0)])
        self.assertTrue(port.sendGRE(RECEIVER, SENDER, b"a"))
        self.assertTrue(port.sendGRE(RECEIVER, "10.0.0.9", b"b"))
        self.assertTrue(port.sendGRE(OTHER, SENDER, b"c"))
        self.assertEqual(len(self.system.sockets), 2)
        self.assertEqual(senders[0].sent, [(b"a", (SENDER, 0)), (b"b", ("10.0.0.9", 0))])
        self.assertEqual(senders[1].sent, [(b"c", (SENDER, 0))])
        self.assertTrue(all(not s.blocking and s.options[0][1] == 26 for s in senders))
        self.assertEqual(port.stats.sent, 3)
        port.stopListening()
        self.assertTrue(all(s.closed for s in self.system.sockets))

    def test_send_errors_drop_and_count(self):
        port = self.port()
        sock = self.system.sockets[0]
        sock.errors.extend([BlockingIOError(errno.EAGAIN, "again"), OSError(errno.ENOBUFS, "nobufs"),
                            PermissionError(errno.EPERM, "netfilter"), OSError(errno.EHOSTUNREACH, "x")])
        results = [port.sendGRE(RECEIVER, SENDER, b"x") for _ in range(5)]
        self.assertEqual(results, [False, False, False, False, True])
        self.assertEqual(port.stats.dropped, {"send_busy": 2, "send_error": 2})
        self.assertEqual(port.stats.sent, 1)

    def test_send_only_from_local_addresses(self):
        """A source the port does not own is refused; one the host does not own fails at once."""
        self.system = MemoryGRESystem(hostAddresses={RECEIVER, OTHER})
        port = GREPort(Collector(), [RECEIVER], system=self.system, reactor=MemoryReactor())
        port.startListening()
        self.assertFalse(port.sendGRE(OTHER, SENDER, b"x"))
        self.assertEqual(port.stats.dropped, {"send_error": 1})
        port.addLocalAddress(OTHER)
        self.assertTrue(port.sendGRE(OTHER, SENDER, b"x"))
        error = self.assertRaises(GREIOError, port.addLocalAddress, "192.0.2.1")
        self.assertIn("cannot send GRE from 192.0.2.1", str(error))
        self.assertEqual(port.localAddresses, [RECEIVER, OTHER])
        port.removeLocalAddress(OTHER)
        self.assertFalse(port.sendGRE(OTHER, SENDER, b"x"))
        late = GREPort(Collector(), ["192.0.2.1"], system=self.system, reactor=MemoryReactor())
        self.assertRaises(GREIOError, late.startListening)

    def test_statistics_include_capture_drops(self):
        port = self.port()
        self.capture.kernelDrops = (3, 1)
        self.assertEqual(port.statistics()["dropped"], {"capture": 4})

    def test_raw_socket_capture(self):
        """capture='raw' reads IPv4 packets from a raw socket, header included."""
        port = self.port(capture="raw")
        self.assertEqual(self.system.captures, [])
        sock = self.system.sockets[0]
        sock.incoming.extend([ipv4(SENDER, RECEIVER, enhanced_gre(4)), ipv4(SENDER, OTHER, enhanced_gre(5))])
        port.doRead()
        self.assertEqual(self.receiver.packets, [(SENDER, RECEIVER, enhanced_gre(4))])
        self.assertEqual(port.stats.dropped, {"not_local": 1})

    def test_bad_configuration(self):
        self.assertRaises(GREIOError, GREPort, Collector(), [], system=MemoryGRESystem())
        self.assertRaises(GREIOError, GREPort, Collector(), ["10.0.0"], system=MemoryGRESystem())
        self.assertRaises(GREIOError, GREPort, Collector(), [RECEIVER], capture="udp",
                          system=MemoryGRESystem())
        port = GREPort(Collector(), [RECEIVER], system=MemoryGRESystem(datalink=9999),
                       reactor=MemoryReactor())
        error = self.assertRaises(GREIOError, port.startListening)
        self.assertIn("unsupported datalink 9999", str(error))
        self.assertTrue(all(s.closed for s in port._system.sockets))


# -- real kernel -------------------------------------------------------------------------------


def icmp_counters(lab, ns):
    """The Icmp: line of /proc/net/snmp in *ns* as a dict."""
    snmp = lab.read_proc(ns, "/proc/net/snmp")
    lines = [line.split() for line in snmp.splitlines() if line.startswith("Icmp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


def ip_counters(lab, ns):
    """The Ip: line of /proc/net/snmp in *ns* as a dict (FragCreates, ReasmOKs, ...)."""
    snmp = lab.read_proc(ns, "/proc/net/snmp")
    lines = [line.split() for line in snmp.splitlines() if line.startswith("Ip:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


def raw_rx_queues(lab, ns):
    """rx_queue of every raw socket in *ns* (/proc/net/raw), in bytes."""
    rows = lab.read_proc(ns, "/proc/net/raw").splitlines()[1:]
    return [int(row.split()[4].split(":")[1], 16) for row in rows]


class KernelTests(unittest.TestCase):
    """Real kernel: namespaces a (sender, 10.0.0.1) and b (receiver, 10.0.0.2 and .3) on a veth."""

    timeout = 30

    def setUp(self):
        self.lab = netns.lab_for(self)
        self.a, self.b = self.lab.namespace("snd"), self.lab.namespace("rcv")
        self.link = self.lab.veth(self.a, self.b, f"{SENDER}/24", f"{RECEIVER}/24")
        self.lab.address(self.b, self.link.name_b, f"{OTHER}/24")

    def open_port(self, ns, local, interface="any", capture="pcap", receiver=None, **kwargs):
        receiver = receiver or Collector()
        port = GREPort(receiver, local, interface=interface, capture=capture, **kwargs)
        with self.lab.inside(ns):
            port.startListening()
        self.addCleanup(port.stopListening)
        return port, receiver

    def raw_socket(self, ns, bind=None, connect=None):
        """A plain raw GRE socket in *ns* (what pptpd has), for sending or receiving."""
        with self.lab.inside(ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
        self.addCleanup(sock.close)
        if bind:
            sock.bind((bind, 0))
        if connect:
            sock.connect((connect, 0))
        return sock

    def sender(self):
        sock = self.raw_socket(self.a, bind=SENDER)
        greio.attach_drop_all(sock)
        return sock

    @defer.inlineCallbacks
    def check_receives(self, capture):
        port, got = self.open_port(self.b, [RECEIVER], capture=capture)
        sock = self.sender()
        sent = [enhanced_gre(0x100 + i, os.urandom(20 + i)) for i in range(3)]
        for gre in sent:
            sock.sendto(gre, (RECEIVER, 0))
        packets = yield got.waitFor(3)
        self.assertEqual(packets, [(SENDER, RECEIVER, gre) for gre in sent])

    def test_receives_real_gre_pcap(self):
        return self.check_receives("pcap")

    def test_receives_real_gre_raw_socket(self):
        return self.check_receives("raw")

    @defer.inlineCallbacks
    def test_burst_read_several_per_wakeup(self):
        """200 packets queued before the reactor runs arrive in far fewer doRead calls."""
        port, got = self.open_port(self.b, [RECEIVER])
        sock = self.sender()
        n = 200
        for i in range(n):
            sock.sendto(enhanced_gre(7, struct.pack("!I", i) + bytes(1380)), (RECEIVER, 0))
        yield got.waitFor(n)
        self.assertEqual([struct.unpack("!I", p[2][12:16])[0] for p in got.packets], list(range(n)))
        self.assertLessEqual(port.stats.reads, n // 20, port.stats.asDict())
        self.assertEqual(port.statistics()["dropped"], {})

    @defer.inlineCallbacks
    def test_only_gre_to_the_local_address(self):
        """GRE to another address of the same host never reaches the port (the kernel filter)."""
        port, got = self.open_port(self.b, [RECEIVER])
        sock = self.sender()
        for i in range(10):
            sock.sendto(enhanced_gre(i), (OTHER if i % 2 else RECEIVER, 0))
        yield got.waitFor(5)
        yield settle()
        self.assertEqual([p[2] for p in got.packets], [enhanced_gre(i) for i in range(0, 10, 2)])
        self.assertEqual((port.stats.received, dict(port.stats.dropped)), (5, {}))

    @defer.inlineCallbacks
    def test_own_outgoing_gre_never_captured(self):
        """Direction "in": with a filter that names no destination, our own sends stay unseen."""
        port, got = self.open_port(self.b, [RECEIVER], interface=self.link.name_b, bpfFilter="ip proto 47")
        sock = self.sender()
        for i in range(5):
            self.assertTrue(port.sendGRE(RECEIVER, SENDER, enhanced_gre(i, b"out")))
            sock.sendto(enhanced_gre(i, b"in"), (RECEIVER, 0))
        yield got.waitFor(5)
        yield settle()
        self.assertEqual([p[2] for p in got.packets], [enhanced_gre(i, b"in") for i in range(5)])
        self.assertEqual((port.stats.received, port.stats.sent), (5, 5))

    @defer.inlineCallbacks
    def test_no_icmp_protocol_unreachable(self):
        """With the port open the receiver emits no ICMP and queues no copies; closed, it does."""
        port, got = self.open_port(self.b, [RECEIVER])
        sock = self.sender()
        before = icmp_counters(self.lab, self.b)["OutDestUnreachs"]
        for i in range(20):
            sock.sendto(enhanced_gre(i, b"x" * 100), (RECEIVER, 0))
        yield got.waitFor(20)
        yield settle()
        self.assertEqual(icmp_counters(self.lab, self.b)["OutDestUnreachs"], before)
        queues = raw_rx_queues(self.lab, self.b)
        self.assertEqual(len(queues), 1)  # the send socket bound to RECEIVER
        self.assertEqual(queues, [0])  # its drop-all filter kept the 20 copies out
        yield port.stopListening()
        sock.sendto(enhanced_gre(99), (RECEIVER, 0))
        yield settle()
        self.assertGreater(icmp_counters(self.lab, self.b)["OutDestUnreachs"], before)

    @defer.inlineCallbacks
    def test_send_leaves_from_the_chosen_source(self):
        port, _ = self.open_port(self.b, [RECEIVER, OTHER])
        listener = self.raw_socket(self.a)
        listener.settimeout(2)
        self.assertTrue(port.sendGRE(RECEIVER, SENDER, enhanced_gre(1, b"from .2")))
        self.assertTrue(port.sendGRE(OTHER, SENDER, enhanced_gre(2, b"from .3")))
        seen = []
        for _ in range(2):
            data = listener.recv(2048)  # raw IPv4: the header shows the source
            seen.append((socket.inet_ntoa(data[12:16]), data[20:]))
        self.assertEqual(seen, [(RECEIVER, enhanced_gre(1, b"from .2")),
                                (OTHER, enhanced_gre(2, b"from .3"))])
        self.assertEqual(port.stats.sent, 2)
        yield settle(0)

    @defer.inlineCallbacks
    def check_loopback_shared(self, interface):
        """An RRP (127.0.0.2) next to pptpd (127.0.0.1) on one host's loopback.

        Both a second port (as pptpd's host would see it through pcap) and a pptpd-like
        raw socket (bound 127.0.0.1, connected to 127.0.0.2) get exactly their own
        packets; the RRP port sees only GRE to 127.0.0.2 and none of its own.
        """
        host = self.lab.namespace("host")
        rrp, to_rrp = self.open_port(host, ["127.0.0.2"], interface=interface)
        pptpd_port, to_pptpd = self.open_port(host, ["127.0.0.1"], interface=interface)
        pptpd_sock = self.raw_socket(host, bind="127.0.0.1", connect="127.0.0.2")
        pptpd_sock.settimeout(2)
        n = 30
        for i in range(n):
            self.assertTrue(rrp.sendGRE("127.0.0.2", "127.0.0.1", enhanced_gre(1000 + i, b"up")))
            pptpd_sock.send(enhanced_gre(2000 + i, b"down"))
        yield to_rrp.waitFor(n)
        yield to_pptpd.waitFor(n)
        yield settle()
        self.assertEqual(to_rrp.packets,
                         [("127.0.0.1", "127.0.0.2", enhanced_gre(2000 + i, b"down")) for i in range(n)])
        self.assertEqual(to_pptpd.packets,
                         [("127.0.0.2", "127.0.0.1", enhanced_gre(1000 + i, b"up")) for i in range(n)])
        got = [pptpd_sock.recv(2048)[20:] for _ in range(n)]
        self.assertEqual(got, [enhanced_gre(1000 + i, b"up") for i in range(n)])
        self.assertEqual((dict(rrp.stats.dropped), dict(pptpd_port.stats.dropped)), ({}, {}))

    def test_loopback_rrp_next_to_pptpd_on_lo(self):
        return self.check_loopback_shared("lo")

    def test_loopback_rrp_next_to_pptpd_on_any(self):
        return self.check_loopback_shared("any")

    @defer.inlineCallbacks
    def check_receives_fragmented(self, interface):
        """A 1550-byte GRE over the 1500-MTU veth arrives as two fragments; the port delivers it whole."""
        port, got = self.open_port(self.b, [RECEIVER], interface=interface)
        sock = self.sender()
        sock.setsockopt(socket.IPPROTO_IP, greio.IP_MTU_DISCOVER, greio.IP_PMTUDISC_DONT)
        big = [enhanced_gre(0x200 + i, os.urandom(1538)) for i in range(3)]
        sent = []
        for gre in big:
            sent += [gre, enhanced_gre(0x300, b"small")]
            sock.sendto(gre, (RECEIVER, 0))
            sock.sendto(enhanced_gre(0x300, b"small"), (RECEIVER, 0))
        packets = yield got.waitFor(len(sent))
        self.assertEqual(packets, [(SENDER, RECEIVER, gre) for gre in sent])
        self.assertEqual([len(gre) for gre in big], [1550] * 3)
        stats = port.statistics()
        self.assertEqual((stats["fragments"], stats["reassembled"], stats["reassembling"], stats["dropped"]),
                         (6, 3, 0, {}))

    def test_receives_fragmented_gre_pcap_on_any(self):
        return self.check_receives_fragmented("any")

    def test_receives_fragmented_gre_pcap_on_the_veth(self):
        return self.check_receives_fragmented(self.link.name_b)

    @defer.inlineCallbacks
    def test_send_larger_than_mtu_is_fragmented_with_df_clear(self):
        """sendGRE of 1550 bytes on a 1500-MTU link: the kernel fragments it, the peer reassembles.

        Every packet also leaves with DF clear, as pptpd's do: a raw socket's default
        (IP_PMTUDISC_WANT) sets DF on packets that fit, and IP_PMTUDISC_DO refuses big ones
        with EMSGSIZE.
        """
        port, _ = self.open_port(self.b, [RECEIVER])
        listener = self.raw_socket(self.a)
        listener.settimeout(2)
        before_b, before_a = ip_counters(self.lab, self.b), ip_counters(self.lab, self.a)
        big, small = enhanced_gre(1, os.urandom(1538)), enhanced_gre(2, bytes(1380))
        self.assertTrue(port.sendGRE(RECEIVER, SENDER, big))
        self.assertTrue(port.sendGRE(RECEIVER, SENDER, small))
        seen = [listener.recv(4096) for _ in range(2)]
        self.assertEqual([data[20:] for data in seen], [big, small])
        self.assertEqual([data[6] & 0x40 for data in seen], [0, 0])  # DF clear
        after_b, after_a = ip_counters(self.lab, self.b), ip_counters(self.lab, self.a)
        self.assertEqual(after_b["FragCreates"] - before_b["FragCreates"], 2)
        self.assertEqual(after_a["ReasmOKs"] - before_a["ReasmOKs"], 1)
        self.assertEqual(port.statistics()["dropped"], {})
        yield settle(0)

    def test_capture_on_missing_interface(self):
        port = GREPort(Collector(), [RECEIVER], interface="nosuch0")
        with self.lab.inside(self.b):
            error = self.assertRaises(GREIOError, port.startListening)
        self.assertIn("nosuch0", str(error))


class NetnsHelperTests(unittest.TestCase):
    """tests/support/netns.py itself: processes die and names disappear at cleanup; leftovers are reaped."""

    def setUp(self):
        netns.skip_unless_available()

    def names(self):
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        return namespaces + links

    def test_cleanup_kills_processes_and_removes_names(self):
        lab = netns.NetnsLab()
        a, b = lab.namespace("one"), lab.namespace("two")
        root_end = lab.veth(None, b, str(lab.subnet()[1]) + "/24")
        inner = lab.veth(a, b, "10.9.0.1/24", "10.9.0.2/24")
        self.assertIn(inner.name_b, lab.run(b, ["ip", "-o", "link"]).stdout)
        self.assertEqual(lab.python(a, "import sys; print(sys.argv[1])", "hello").stdout, "hello\n")
        sleeper = lab.spawn(a, ["sh", "-c", "sleep 60 & sleep 60"])
        self.assertRaises(netns.NetnsError, lab.run, a, ["false"])
        self.assertEqual(lab.cleanup(), [])
        self.assertIsNotNone(sleeper.poll())
        listing = self.names()
        for name in (a, b, root_end.name_a):
            self.assertNotIn(name, listing)
        self.assertEqual(lab.cleanup(), [])  # idempotent

    def test_spawn_with_log_and_wait_tcp(self):
        lab = netns.lab_for(self)
        ns = lab.namespace("srv")
        log = self.mktemp()
        server = lab.spawn(ns, [sys.executable, "-c", (
            "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 8123)); s.listen();"
            "print('listening', flush=True); time.sleep(60)")], logfile=log)
        lab.wait_tcp(ns, "127.0.0.1", 8123, proc=server)
        with open(log) as f:
            self.assertEqual(f.read(), "listening\n")
        self.assertRaises(OSError, socket.create_connection, ("127.0.0.1", 8123), 0.5)  # not in root
        quitter = lab.spawn(ns, ["true"])
        error = self.assertRaises(netns.NetnsError, lab.wait_tcp, ns, "127.0.0.1", 8124, 5, quitter)
        self.assertIn("exited", str(error))

    def test_inside_returns_to_the_root_namespace(self):
        lab = netns.lab_for(self)
        ns = lab.namespace("in")
        home = os.readlink("/proc/thread-self/ns/net")
        with lab.inside(ns):
            self.assertNotEqual(os.readlink("/proc/thread-self/ns/net"), home)
            self.assertEqual([i[1] for i in socket.if_nameindex()], ["lo"])
        self.assertEqual(os.readlink("/proc/thread-self/ns/net"), home)

    def test_reap_stale_removes_names_of_dead_processes(self):
        dead = _dead_pid()
        name = f"{netns.NS_PREFIX}{dead}-0-stale"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", name], capture_output=True)
        netns.reap_stale()
        self.assertNotIn(name, self.names())


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- measurements (python -m tests.unit.test_greio) ---------------------------------------------------


def _drain(port, n, deadline=10.0):
    start = time.perf_counter()
    while port.stats.received < n and time.perf_counter() - start < deadline:
        port.doRead()
    return time.perf_counter() - start


def measure(n=50000, size=1400):
    """Receive: fill the capture with *n* GRE packets while not reading, then time the drain."""
    netns.skip_unless_available()
    lab = netns.NetnsLab()
    try:
        a, b = lab.namespace("snd"), lab.namespace("rcv")
        lab.veth(a, b, f"{SENDER}/24", f"{RECEIVER}/24")
        with lab.inside(a):
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
        sock.bind((SENDER, 0))
        greio.attach_drop_all(sock)
        gre = enhanced_gre(7, bytes(size - 16))

        class Null:
            def greReceived(self, src, dst, gre):
                pass

        for kind in ("pcap", "raw", "pcap", "raw"):
            port = GREPort(Null(), [RECEIVER], capture=kind, bufferSize=256 * 1024 * 1024)
            with lab.inside(b):
                port.startListening()
            port.stopReading()
            for _ in range(n):
                sock.sendto(gre, (RECEIVER, 0))
            took = _drain(port, n)
            stats = port.statistics()
            print(f"receive {kind:4s}: {stats['received']} of {n} in {took:.3f}s = "
                  f"{took / max(stats['received'], 1) * 1e9:.0f} ns/packet, "
                  f"{stats['received'] / took:,.0f} packets/s, reads {stats['reads']}, "
                  f"dropped {stats['dropped']}")
            port.stopListening()

        port = GREPort(Null(), [RECEIVER])
        with lab.inside(b):
            port.startListening()
        port.stopReading()
        for name, call in (("sendGRE (bound socket per source)", lambda: port.sendGRE(RECEIVER, SENDER, gre)),
                           ("IP_HDRINCL sendto, header built", _hdrincl(lab, b, gre))):
            for _ in range(2):
                start = time.perf_counter()
                for _ in range(n):
                    call()
                took = time.perf_counter() - start
                print(f"send {name}: {took / n * 1e9:.0f} ns/packet")
        print("send stats", port.statistics())
        port.stopListening()

        system = MemoryGRESystem()
        port = GREPort(Null(), [RECEIVER], system=system, reactor=MemoryReactor())
        port.startListening()
        port.maxPacketsPerRead = n
        system.captures[0].batch = n
        system.captures[0].frames.extend([frame(DLT_LINUX_SLL, ipv4(SENDER, RECEIVER, gre))] * n)
        start = time.perf_counter()
        port.doRead()
        print(f"parse+deliver only (memory capture): {(time.perf_counter() - start) / n * 1e9:.0f} ns/packet")
    finally:
        lab.cleanup()


def _hdrincl(lab, ns, gre):
    with lab.inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    greio.attach_drop_all(sock)
    sock.setblocking(False)
    head = struct.pack("!BBHHHBBH", 0x45, 0, 0, 0, 0x4000, 64, 47, 0)
    aton = socket.inet_aton

    def send():
        try:
            sock.sendto(head + aton(RECEIVER) + aton(SENDER) + gre, (SENDER, 0))
        except OSError:
            pass
    return send


if __name__ == "__main__":
    measure(*map(int, sys.argv[1:]))
