"""Packets built independently of the code under test (dpkt, or by hand from RFC 2637 s4.1):
enhanced GRE, IPv4 (whole or fragmented) and the link-layer frames pcap hands over."""
import socket
import struct

import dpkt

from routeproxy.capture import DLT_EN10MB, DLT_LINUX_SLL, DLT_LINUX_SLL2, DLT_LOOP, DLT_NULL

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
