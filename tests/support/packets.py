"""Packets built independently of the code under test (dpkt, or by hand from RFC 2637 s4.1):
enhanced GRE, IPv4 (whole or fragmented) and the link-layer frames pcap hands over; and
:func:`parse_ipv4_gre` for the scripted peers, which read whole IPv4 packets from raw sockets."""
import socket
import struct

import dpkt

from routeproxy.capture import DLT_EN10MB, DLT_LINUX_SLL, DLT_LINUX_SLL2, DLT_LOOP, DLT_NULL, IPPROTO_GRE
from routeproxy.gre import GREError

# Why parse_ipv4_gre refused a packet (GREError.reason)
IP_TRUNCATED = "IPv4 truncated"
IP_NOT_V4 = "not IPv4"
IP_BAD_IHL = "IPv4 header length invalid"
IP_BAD_TOTAL_LENGTH = "IPv4 total length invalid"
IP_FRAGMENT = "IPv4 fragment"
IP_NOT_GRE = "IPv4 protocol is not GRE (47)"
_IPV4 = struct.Struct("!BxH2xHxB2x4s4s")  # version+IHL, total length, flags+offset, protocol, src, dst

SENDER, RECEIVER, OTHER = "10.0.0.1", "10.0.0.2", "10.0.0.3"


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
    """*ip* wrapped in the link-layer header of *datalink* (what pcap would hand over).

    The header is packed by hand and *ip* follows it byte for byte: dpkt's Ethernet and SLL
    decode their data (IP, then GRE, then PPP) and pack it again, and PPP packs a protocol
    below 0x100 in one byte, so a GRE payload whose third byte was 0 (random payloads: 1 in
    256) lost a byte and the frame was shorter than its IP length (dropped as truncated)."""
    if datalink == DLT_EN10MB:
        return struct.pack("!6s6sH", b"\x04" * 6, b"\x02" * 6, ethertype) + ip
    if datalink == DLT_LINUX_SLL:
        return struct.pack("!HHH8sH", 0, 1, 6, b"\x02" * 6 + b"\0\0", ethertype) + ip
    if datalink == DLT_LINUX_SLL2:
        return struct.pack("!HHIHBB8s", ethertype, 0, 2, 1, 0, 6, b"\x02" * 6 + b"\0\0") + ip
    if datalink == DLT_NULL:
        return struct.pack("=I", 2 if ethertype == 0x0800 else 24) + ip
    if datalink == DLT_LOOP:
        return struct.pack("!I", 2 if ethertype == 0x0800 else 24) + ip
    return ip


def parse_ipv4_gre(frame):
    """``(src, dst, gre_bytes)`` from an IPv4 packet carrying GRE (protocol 47).

    *frame* starts at the IPv4 header (after pcap's link header, or as a raw socket reads it).
    Addresses are dotted strings.  Bytes past the IPv4 total length (Ethernet padding) are cut
    off.  Fragments are rejected: a GRE header cannot be read from a piece of a datagram.
    The header checksum is not verified: captures of locally sent packets carry checksums the
    NIC has not filled in yet, and the kernel has already checked what it delivers.
    """
    try:
        ver_ihl, total, frag, proto, src, dst = _IPV4.unpack_from(frame)
    except struct.error:
        raise GREError(IP_TRUNCATED, f"{len(frame)} bytes, header needs 20") from None
    if ver_ihl >> 4 != 4:
        raise GREError(IP_NOT_V4, f"version {ver_ihl >> 4}")
    header = (ver_ihl & 0x0F) * 4
    if header < 20 or header > len(frame):
        raise GREError(IP_BAD_IHL, f"{header} bytes, {len(frame)} present")
    if total < header or total > len(frame):
        raise GREError(IP_BAD_TOTAL_LENGTH, f"total length {total}, header {header}, {len(frame)} present")
    if frag & 0x3FFF:  # MF flag or a fragment offset
        raise GREError(IP_FRAGMENT, f"flags/offset 0x{frag:04x}")
    if proto != IPPROTO_GRE:
        raise GREError(IP_NOT_GRE, f"protocol {proto}")
    return socket.inet_ntoa(src), socket.inet_ntoa(dst), frame[header:total]
