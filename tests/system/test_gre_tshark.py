"""routeproxy.gre judged by an independent decoder: our packets go into a pcap, tshark reads them.

Each packet carries a well-formed PPP frame, so tshark's PPP/LCP dissectors also check that the
payload length we write delimits the payload correctly.
"""
import random
import struct

from twisted.trial.unittest import SynchronousTestCase

from routeproxy.gre import GREPacket, parse_gre
from tests.support import tshark

PPP_LCP = b"\xff\x03\xc0\x21"  # address, control, protocol 0xC021


def lcp(code, ident, data):
    """A PPP LCP packet with a correct length field."""
    return PPP_LCP + struct.pack("!BBH", code, ident, 4 + len(data)) + data


# Configure-Request: MRU 1500, magic number.
CONFIGURE_REQUEST = lcp(1, 1, b"\x01\x04\x05\xdc" + b"\x05\x06\x12\x34\x56\x78")
# 29 bytes, as in the seed capture's frame 12 (Configure-Ack: MRU, ACCM, CHAP/MS-CHAPv2, magic).
CONFIGURE_ACK_29 = lcp(2, 1, b"\x01\x04\x05\xdc" + b"\x02\x06\x00\x00\x00\x00" + b"\x03\x05\xc2\x23\x81"
                       + b"\x05\x06\x0a\x0b\x0c\x0d")
# 11 bytes, as in frame 13 (Configure-Reject of the callback option).
CONFIGURE_REJECT_11 = lcp(4, 1, b"\x0d\x03\x06")


def echo_request(rng, ident):
    return lcp(9, ident, rng.randbytes(4) + rng.randbytes(rng.randint(0, 200)))


class TsharkGRETests(SynchronousTestCase):
    if tshark.TSHARK is None:
        skip = "tshark is not installed (apt-get install tshark); the GRE cross-check needs it"

    def packets(self):
        rng = random.Random(2637)
        pkts = [
            GREPacket(256, CONFIGURE_ACK_29, seq=1, ack=0),  # seed vector, client -> server
            GREPacket(57982, CONFIGURE_REJECT_11, seq=1, ack=0),  # seed vector, server -> client
            GREPacket(1, CONFIGURE_REQUEST, seq=0),  # data, no ack (0x3001)
            GREPacket(65535, CONFIGURE_REQUEST, seq=0xFFFFFFFF, ack=0xFFFFFFFE),
            GREPacket(0, ack=12345),  # ack only (0x2081)
        ]
        for i in range(40):
            seq = rng.getrandbits(32)
            pkts.append(GREPacket(rng.randint(0, 0xFFFF), echo_request(rng, i), seq,
                                  rng.choice([None, rng.getrandbits(32)])))
        return pkts

    def test_fields_match(self):
        self.assertEqual(len(CONFIGURE_ACK_29), 29)
        self.assertEqual(len(CONFIGURE_REJECT_11), 11)
        pkts = self.packets()
        path = self.mktemp()
        tshark.write_pcap(path, tshark.gre_frames([p.pack() for p in pkts]))
        layers = tshark.decode(path)
        self.assertEqual(len(layers), len(pkts))
        for pkt, layer in zip(pkts, layers):
            fields = layer["gre"]
            seen = {
                "flags_and_version": int(fields["gre.flags_and_version"], 16),
                "proto": int(fields["gre.proto"], 16),
                "payload_length": int(fields["gre.key.payload_length"]),
                "call_id": int(fields["gre.key.call_id"]),
                "seq": int(fields["gre.sequence_number"]) if "gre.sequence_number" in fields else None,
                "ack": int(fields["gre.ack_number"]) if "gre.ack_number" in fields else None,
            }
            ours = {
                "flags_and_version": pkt.flags_and_version, "proto": 0x880B,
                "payload_length": len(pkt.payload), "call_id": pkt.call_id, "seq": pkt.seq, "ack": pkt.ack,
            }
            self.assertEqual(seen, ours, f"tshark disagrees on {pkt!r}")
            tree = fields["gre.flags_and_version_tree"]
            self.assertEqual(tree["gre.flags.version"], "1")
            self.assertEqual(tree["gre.flags.key"], "1")
            if pkt.payload:
                self.assertIn("lcp", layer, f"tshark found no LCP in {pkt!r}")
            else:
                self.assertNotIn("ppp", layer)
            # And our own parser reads back what it wrote.
            self.assertEqual(parse_gre(pkt.pack()), pkt)
        self.assertEqual(tshark.problems(path), [])

    def test_problems_can_fail(self):
        """A negative control: an LCP length that overruns the payload is flagged by tshark."""
        broken = PPP_LCP + struct.pack("!BBH", 1, 1, 32) + b"\x01\x04\x05\xdc"
        path = self.mktemp()
        tshark.write_pcap(path, tshark.gre_frames([GREPacket(1, broken, 1).pack()]))
        self.assertNotEqual(tshark.problems(path), [])
