"""An independent decoder for the tests: write packets to a pcap, let tshark read them.

Control messages go out as TCP segments to port 1723 and GRE as IP protocol 47,
each in Ethernet + IPv4, so tshark's own PPTP and GRE dissectors judge our bytes.
"""
import json
import shutil
import subprocess

import dpkt

from routeproxy.capture import DLT_EN10MB
from tests.support.packets import frame, ipv4

TSHARK = shutil.which("tshark")
CLIENT = "192.0.2.10"
SERVER = "192.0.2.20"


def _ether(ip):
    """*ip* in an Ethernet frame, byte for byte (packets.frame: dpkt would pack it again)."""
    return frame(DLT_EN10MB, ip)


def tcp_frames(payloads, src=CLIENT, dst=SERVER, sport=40000, dport=1723):
    """One Ethernet frame per payload, as consecutive segments of one TCP stream."""
    seq = 1000
    frames = []
    for payload in payloads:
        tcp = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq, ack=1, flags=dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH,
                           win=65535, data=payload)
        frames.append(_ether(ipv4(src, dst, bytes(tcp), proto=dpkt.ip.IP_PROTO_TCP)))
        seq += len(payload)
    return frames


def gre_frames(gre_packets, src=CLIENT, dst=SERVER):
    """One Ethernet frame per raw GRE packet (IP protocol 47)."""
    return [_ether(ipv4(src, dst, pkt, proto=dpkt.ip.IP_PROTO_GRE)) for pkt in gre_packets]


def write_pcap(path, frames):
    with open(path, "wb") as f:
        writer = dpkt.pcap.Writer(f, linktype=dpkt.pcap.DLT_EN10MB)
        for i, frame in enumerate(frames):
            writer.writepkt(frame, ts=1700000000 + i * 0.001)


def decode(path):
    """tshark's JSON for every packet in *path*: a list of ``_source.layers`` dicts."""
    out = subprocess.run(
        [TSHARK, "-r", path, "-T", "json", "-o", "tcp.check_checksum:FALSE"],
        check=True, capture_output=True, text=True,
    ).stdout
    return [pkt["_source"]["layers"] for pkt in json.loads(out)]


def problems(path):
    """Lines for every packet tshark flags as malformed or with an expert warning/error."""
    out = subprocess.run(
        [TSHARK, "-r", path, "-Y", "_ws.malformed || _ws.expert.severity >= 6291456"],
        check=True, capture_output=True, text=True,
    ).stdout
    return [line for line in out.splitlines() if line.strip()]
