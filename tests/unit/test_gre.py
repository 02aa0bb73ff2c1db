"""routeproxy.gre: enhanced GRE (RFC 2637 s.4.1) bytes built by hand with struct; and the scripted
peers' IPv4 reader (tests.support.packets.parse_ipv4_gre)."""
import socket
import struct

import dpkt
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from routeproxy import gre
from routeproxy.gre import GREError, GREPacket, build_gre, parse_gre, split_gre, with_call_id
from tests.support import packets as support_packets
from tests.support.packets import parse_ipv4_gre


def header(flags, length, call_id, *words, protocol=0x880B):
    """Hand-built GRE header: first word, protocol, key (length, call ID), then seq/ack words."""
    return struct.pack("!HHHH", flags, protocol, length, call_id) + b"".join(struct.pack("!I", w) for w in words)


def ipv4(payload, src="192.0.2.10", dst="192.0.2.20", proto=47, ihl=5, total=None, frag=0, version=4):
    options = b"\x01" * (ihl * 4 - 20) if ihl >= 5 else b""
    total = 20 + len(options) + len(payload) if total is None else total
    hdr = struct.pack("!BBHHHBBH4s4s", (version << 4) | ihl, 0, total, 1, frag, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr + options + payload


class SeedVectorTests(SynchronousTestCase):
    """The two GRE packets of the captured session (../shared/seeds/002_6f7243f55cf0b842.txt)."""

    def test_client_to_server(self):
        # Frame 12, WinXP -> Linux: flags 0x3081, PPP, payload length 29, call ID 256, seq 1, ack 0.
        payload = bytes(range(29))
        wire = header(0x3081, 29, 256, 1, 0) + payload
        self.assertEqual(GREPacket(256, payload, seq=1, ack=0).pack(), wire)
        self.assertEqual(parse_gre(wire), GREPacket(256, payload, 1, 0))
        self.assertEqual(split_gre(wire), (256, 1, 0, payload))
        # 14 (Ethernet) + 20 (IPv4) + 16 (GRE) + 29 = 79, the captured frame length.
        self.assertEqual(14 + 20 + len(wire), 79)

    def test_server_to_client(self):
        # Frame 13, Linux -> WinXP: flags 0x3081, payload length 11, call ID 57982, seq 1, ack 0.
        payload = b"\xff\x03\xc0\x21\x04\x01\x00\x07\x0d\x03\x06"
        wire = header(0x3081, 11, 57982, 1, 0) + payload
        pkt = parse_gre(wire)
        self.assertEqual((pkt.call_id, pkt.seq, pkt.ack, pkt.payload), (57982, 1, 0, payload))
        self.assertEqual(pkt.flags_and_version, 0x3081)
        self.assertEqual(pkt.pack(), wire)
        self.assertEqual(14 + 20 + len(wire), 61)


class RoundTripTests(SynchronousTestCase):
    def test_data_with_ack(self):
        pkt = GREPacket(7, b"hello", seq=0xFFFFFFFF, ack=0x01020304)
        wire = pkt.pack()
        self.assertEqual(wire, header(0x3081, 5, 7, 0xFFFFFFFF, 0x01020304) + b"hello")
        self.assertEqual(pkt.header_length, 16)
        self.assertEqual(parse_gre(wire), pkt)

    def test_data_without_ack(self):
        pkt = GREPacket(65535, b"x" * 1400, seq=42)
        wire = pkt.pack()
        self.assertEqual(wire, header(0x3001, 1400, 65535, 42) + b"x" * 1400)
        self.assertEqual(pkt.flags_and_version, 0x3001)
        self.assertEqual(pkt.header_length, 12)
        self.assertEqual(parse_gre(wire), pkt)

    def test_ack_only(self):
        pkt = GREPacket(0, ack=99)
        wire = pkt.pack()
        self.assertEqual(wire, header(0x2081, 0, 0, 99))
        self.assertEqual(parse_gre(wire), pkt)
        self.assertEqual(split_gre(wire), (0, None, 99, b""))

    def test_key_only(self):
        """Neither S nor A: legal but empty, 8 bytes, so every GREPacket packs."""
        wire = GREPacket(12).pack()
        self.assertEqual(wire, header(0x2001, 0, 12))
        self.assertEqual(parse_gre(wire), GREPacket(12))

    def test_empty_payload_with_sequence(self):
        pkt = GREPacket(3, b"", seq=5)
        self.assertEqual(pkt.pack(), header(0x3001, 0, 3, 5))
        self.assertEqual(parse_gre(pkt.pack()), pkt)

    def test_trailing_bytes_ignored(self):
        """Bytes past the payload length (e.g. Ethernet padding) are not part of the packet."""
        wire = header(0x3001, 3, 9, 1) + b"abc" + b"\x00" * 10
        pkt = parse_gre(wire)
        self.assertEqual(pkt.payload, b"abc")
        self.assertEqual(pkt.pack(), wire[:-10])
        wire = header(0x2081, 0, 9, 4) + b"\x00" * 6
        self.assertEqual(split_gre(wire), (9, None, 4, b""))

    def test_build_matches_pack(self):
        for args in [(1, b"ab", 2, 3), (1, b"ab", 2, None), (1, b"", None, 3), (1, b"", None, None)]:
            self.assertEqual(build_gre(*args), GREPacket(*args).pack())

    def test_accepts_bytes_like(self):
        wire = header(0x3081, 2, 5, 1, 2) + b"hi"
        self.assertEqual(parse_gre(bytearray(wire)), parse_gre(wire))
        self.assertEqual(parse_gre(memoryview(wire)), parse_gre(wire))

    def test_dpkt_agrees(self):
        """dpkt as a second decoder of what we pack (version 1, protocol 0x880B, network order)."""
        for pkt in [GREPacket(256, b"p" * 29, 1, 0), GREPacket(4, b"q", 9), GREPacket(65000, ack=77)]:
            d = dpkt.gre.GRE(pkt.pack())
            self.assertEqual((d.flags, d.p, d.len, d.callid), (pkt.flags_and_version, 0x880B, len(pkt.payload), pkt.call_id))
            self.assertEqual(getattr(d, "seq", None), pkt.seq)
            self.assertEqual(getattr(d, "ack", None), pkt.ack)


class WithCallIDTests(SynchronousTestCase):
    def test_rewrites_only_the_call_id(self):
        for wire in [header(0x3081, 3, 256, 1, 0) + b"abc", header(0x3001, 1, 1, 7) + b"z", header(0x2081, 0, 2, 8)]:
            out = with_call_id(wire, 57982)
            self.assertEqual(len(out), len(wire))
            self.assertEqual(out[:6] + out[8:], wire[:6] + wire[8:])
            self.assertEqual(struct.unpack("!H", out[6:8])[0], 57982)
            self.assertEqual(parse_gre(out), parse_gre(wire).replace(call_id=57982))

    def test_rejects(self):
        e = self.assertRaises(GREError, with_call_id, b"\x30\x01\x88", 1)
        self.assertEqual(e.reason, gre.TRUNCATED)
        e = self.assertRaises(GREError, with_call_id, header(0x3001, 0, 1, 1), 70000)
        self.assertEqual(e.reason, "field out of range")


class RejectTests(SynchronousTestCase):
    """Every reason a datagram is not PPTP-GRE."""

    def reason(self, data):
        e = self.assertRaises(GREError, parse_gre, data)
        self.assertIsInstance(e, ValueError)
        self.assertIn(e.reason, str(e))
        return e.reason

    def test_truncated_header(self):
        for n in range(8):
            self.assertEqual(self.reason(header(0x3001, 0, 1, 1)[:n]), gre.TRUNCATED)
        self.assertEqual(self.reason(header(0x3001, 0, 1)), gre.TRUNCATED)  # no seq word
        self.assertEqual(self.reason(header(0x3081, 0, 1, 1)), gre.TRUNCATED)  # no ack word
        self.assertEqual(self.reason(header(0x2081, 0, 1)), gre.TRUNCATED)  # ack only, no ack word

    def test_not_version_1(self):
        for version in (0, 2, 7):
            self.assertEqual(self.reason(header(0x3080 | version, 0, 1, 1, 1)), gre.NOT_VERSION_1)
        # Plain GRE (RFC 2784) carrying IPv4.
        self.assertEqual(self.reason(struct.pack("!HH", 0, 0x0800) + b"\x45" + b"\x00" * 19), gre.NOT_VERSION_1)

    def test_checksum_or_routing(self):
        self.assertEqual(self.reason(header(0xB001, 0, 1, 1)), gre.CHECKSUM_ROUTING)
        self.assertEqual(self.reason(header(0x7001, 0, 1, 1)), gre.CHECKSUM_ROUTING)

    def test_key_missing(self):
        self.assertEqual(self.reason(header(0x1001, 0, 1, 1)), gre.KEY_MISSING)

    def test_strict_source_route_or_recursion(self):
        self.assertEqual(self.reason(header(0x3801, 0, 1, 1)), gre.SOURCE_ROUTE_RECURSION)
        for recur in (1, 4, 7):
            self.assertEqual(self.reason(header(0x3001 | recur << 8, 0, 1, 1)), gre.SOURCE_ROUTE_RECURSION)

    def test_reserved_flags(self):
        for bit in (0x08, 0x10, 0x20, 0x40):
            self.assertEqual(self.reason(header(0x3001 | bit, 0, 1, 1)), gre.RESERVED_FLAGS)

    def test_not_ppp(self):
        # 0x880A is what dpkt's own GRE tests use; 0x0800 is IPv4.
        for protocol in (0x880A, 0x0800, 0x0B88):
            self.assertEqual(self.reason(header(0x3001, 0, 1, 1, protocol=protocol)), gre.NOT_PPP)

    def test_payload_longer_than_data(self):
        self.assertEqual(self.reason(header(0x3001, 5, 1, 1) + b"abcd"), gre.PAYLOAD_TRUNCATED)
        self.assertEqual(self.reason(header(0x3081, 1, 1, 1, 2)), gre.PAYLOAD_TRUNCATED)

    def test_payload_without_sequence(self):
        self.assertEqual(self.reason(header(0x2081, 3, 1, 5) + b"abc"), gre.PAYLOAD_WITHOUT_SEQUENCE)
        self.assertEqual(self.reason(header(0x2001, 1, 1) + b"a"), gre.PAYLOAD_WITHOUT_SEQUENCE)

    def test_constructor_checks(self):
        for kwargs in [dict(call_id=-1), dict(call_id=65536), dict(call_id=1, seq=-1),
                       dict(call_id=1, seq=1, ack=2 ** 32), dict(call_id=1, payload=b"x" * 65536, seq=1)]:
            self.assertRaises(GREError, GREPacket, **kwargs)
        e = self.assertRaises(GREError, GREPacket, 1, b"data")
        self.assertEqual(e.reason, gre.PAYLOAD_WITHOUT_SEQUENCE)
        self.assertRaises(GREError, build_gre, 1, b"data")
        self.assertRaises(GREError, build_gre, 1 << 16, b"", 1)

    def test_immutable(self):
        pkt = GREPacket(1, b"a", 1)
        self.assertRaises(AttributeError, setattr, pkt, "call_id", 2)
        self.assertRaises(AttributeError, delattr, pkt, "seq")
        self.assertEqual(pkt.call_id, 1)
        self.assertEqual(len({pkt, GREPacket(1, b"a", 1)}), 1)


class IPv4Tests(SynchronousTestCase):
    def test_extracts_gre(self):
        g = GREPacket(256, b"abc", 1, 0).pack()
        self.assertEqual(parse_ipv4_gre(ipv4(g)), ("192.0.2.10", "192.0.2.20", g))

    def test_options_and_padding(self):
        g = GREPacket(5, ack=1).pack()
        frame = ipv4(g, ihl=7, src="10.0.0.1", dst="10.0.0.2") + b"\x00" * 6  # Ethernet padding
        self.assertEqual(parse_ipv4_gre(frame), ("10.0.0.1", "10.0.0.2", g))

    def test_dpkt_built_frame(self):
        g = GREPacket(9, b"z", 3).pack()
        ip = dpkt.ip.IP(src=socket.inet_aton("198.51.100.1"), dst=socket.inet_aton("198.51.100.2"), p=47, data=g)
        ip.len = len(ip)
        self.assertEqual(parse_ipv4_gre(bytes(ip)), ("198.51.100.1", "198.51.100.2", g))

    def reason(self, frame):
        return self.assertRaises(GREError, parse_ipv4_gre, frame).reason

    def test_rejects(self):
        g = GREPacket(1, b"a", 1).pack()
        self.assertEqual(self.reason(ipv4(g)[:19]), support_packets.IP_TRUNCATED)
        self.assertEqual(self.reason(b""), support_packets.IP_TRUNCATED)
        self.assertEqual(self.reason(ipv4(g, version=6)), support_packets.IP_NOT_V4)
        self.assertEqual(self.reason(ipv4(g, ihl=4)), support_packets.IP_BAD_IHL)
        self.assertEqual(self.reason(ipv4(b"", ihl=15)[:40]), support_packets.IP_BAD_IHL)
        self.assertEqual(self.reason(ipv4(g, total=19)), support_packets.IP_BAD_TOTAL_LENGTH)
        self.assertEqual(self.reason(ipv4(g, total=20 + len(g) + 1)), support_packets.IP_BAD_TOTAL_LENGTH)
        self.assertEqual(self.reason(ipv4(g, frag=0x2000)), support_packets.IP_FRAGMENT)  # more fragments
        self.assertEqual(self.reason(ipv4(g, frag=0x0010)), support_packets.IP_FRAGMENT)  # offset
        self.assertEqual(self.reason(ipv4(g, proto=6)), support_packets.IP_NOT_GRE)
        # Don't Fragment is fine.
        self.assertEqual(parse_ipv4_gre(ipv4(g, frag=0x4000))[2], g)


call_ids = st.integers(0, 0xFFFF)
words = st.integers(0, 0xFFFFFFFF)


@st.composite
def packets(draw):
    seq = draw(st.none() | words)
    payload = draw(st.binary(max_size=300)) if seq is not None else b""
    return GREPacket(draw(call_ids), payload, seq, draw(st.none() | words))


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(packets())
    def test_round_trip(self, pkt):
        wire = pkt.pack()
        self.assertEqual(len(wire), pkt.header_length + len(pkt.payload))
        self.assertEqual(parse_gre(wire), pkt)
        self.assertEqual(split_gre(wire), (pkt.call_id, pkt.seq, pkt.ack, pkt.payload))

    @settings(max_examples=300, deadline=None)
    @given(packets(), call_ids)
    def test_with_call_id(self, pkt, new_id):
        self.assertEqual(parse_gre(with_call_id(pkt.pack(), new_id)), pkt.replace(call_id=new_id))

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=64))
    def test_random_bytes(self, data):
        for parse in (parse_gre, parse_ipv4_gre):
            try:
                parse(data)
            except GREError:
                pass

    @settings(max_examples=500, deadline=None)
    @given(packets(), st.data())
    def test_mutated_packets(self, pkt, data):
        wire = bytearray(pkt.pack())
        for _ in range(data.draw(st.integers(1, 4))):
            action = data.draw(st.sampled_from(["flip", "cut", "extend"]))
            if action == "flip" and wire:
                i = data.draw(st.integers(0, len(wire) - 1))
                wire[i] ^= data.draw(st.integers(1, 255))
            elif action == "cut":
                del wire[data.draw(st.integers(0, len(wire))):]
            else:
                wire += data.draw(st.binary(min_size=1, max_size=8))
        wire = bytes(wire)
        try:
            parse_ipv4_gre(ipv4(wire))
        except GREError:
            pass
        try:
            result = parse_gre(wire)
        except GREError:
            return
        # Whatever parses packs back to a prefix of the input (trailing bytes are dropped).
        self.assertTrue(wire.startswith(result.pack()))
