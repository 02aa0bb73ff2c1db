"""routeproxy.pptp judged by an independent decoder: our messages go into a pcap as TCP/1723,
tshark's PPTP dissector reads them, and every field it reports must equal ours.

PNS-sent messages travel client -> server:1723, PAC-sent ones server:1723 -> client, each
direction one TCP stream, so tshark sees them as a real control connection would carry them.
tshark 4.0's PPTP dissector does not reassemble TCP: it reads one message from the start of
each segment, so every message gets a segment of its own (stream framing is covered by
tests/unit/test_pptp.py).
"""
import dataclasses
import json
import struct
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from routeproxy import pptp
from tests.support import tshark

# tshark's name for each of our fields, where it is not simply "pptp.<field>".
TSHARK_NAMES = {
    "vendor_string": "pptp.vendor_name",
    "packet_recv_window_size": "pptp.packet_receive_window_size",
    "cause_code": "pptp.cause",
    "error_code": "pptp.error",
    "call_bearer_type": "pptp.bearer_type",
    "call_statistics": "pptp.call_Statistics",
    # tshark calls the RFC's "Packet Transmit Delay" of ICRP/ICCN a processing delay.
    "packet_transmit_delay": "pptp.packet_processing_delay",
}
RESULT_NAMES = {
    pptp.StartControlConnectionReply: "pptp.control_result",
    pptp.StopControlConnectionReply: "pptp.stop_result",
    pptp.EchoReply: "pptp.echo_result",
    pptp.OutgoingCallReply: "pptp.out_result",
    pptp.IncomingCallReply: "pptp.in_result",
    pptp.CallDisconnectNotify: "pptp.disc_result",
}


def tshark_name(cls, field):
    if field == "result_code":
        return RESULT_NAMES[cls]
    return TSHARK_NAMES.get(field, "pptp." + field)


def distinct_message(cls, seed):
    """One *cls* message whose every field is non-zero and differs from its neighbours."""
    values = {}
    for i, field in enumerate(dataclasses.fields(cls)):
        fmt = field.metadata["fmt"]
        n = seed * 97 + int(cls.TYPE) * 31 + i * 13 + 1
        if fmt == "B":
            values[field.name] = (n % 254) + 1
        elif fmt == "H":
            values[field.name] = (n * 257) % 0xFFFF + 1
        elif fmt == "I":
            values[field.name] = (n * 16777259) % 0xFFFFFFFF + 1
        else:
            values[field.name] = f"{cls.__name__[:20]}.{field.name}#{n}".encode("ascii")
    return cls(**values)


def decode_all(path):
    """tshark's PPTP layers, one list per frame (a frame may carry several messages).

    Written here rather than using tshark.decode() because several PDUs in one
    segment need --no-duplicate-keys to come out as a list instead of the last one.
    """
    out = subprocess.run(
        [tshark.TSHARK, "-r", path, "-T", "json", "--no-duplicate-keys", "-j", "pptp",
         "-o", "tcp.check_checksum:FALSE"],
        check=True, capture_output=True, text=True,
    ).stdout
    frames = []
    for pkt in json.loads(out):
        layer = pkt["_source"]["layers"].get("pptp", [])
        frames.append(layer if isinstance(layer, list) else [layer])
    return frames


def expected_text(cls, msg, field):
    value = getattr(msg, field)
    if isinstance(value, bytes):
        return pptp.strip_nul(value).decode("ascii")
    if cls is pptp.SetLinkInfo and field in ("send_accm", "receive_accm"):
        return f"0x{value:08x}"
    return str(value)


class TsharkPPTPTests(SynchronousTestCase):
    if tshark.TSHARK is None:
        skip = "tshark is not installed (apt-get install tshark); the PPTP cross-check needs it"

    def messages(self, seed=1):
        return [distinct_message(cls, seed) for cls in pptp.MESSAGE_CLASSES.values()]

    def frames_for(self, client_payloads, server_payloads):
        return (tshark.tcp_frames(client_payloads)
                + tshark.tcp_frames(server_payloads, src=tshark.SERVER, dst=tshark.CLIENT,
                                    sport=1723, dport=40000))

    def split_by_sender(self, messages):
        """PNS-sent (and either-side requests) from the client, the rest from the server."""
        client, server = [], []
        for msg in messages:
            senders = pptp.SENDER[type(msg)]
            if senders == {pptp.PNS} or (len(senders) == 2 and msg.NAME.endswith("Request")):
                client.append(msg)
            else:
                server.append(msg)
        return client, server

    def assertTsharkAgrees(self, msg, layer):
        cls = type(msg)
        expected = {
            "pptp.length": str(cls.LENGTH),
            "pptp.type": "1",
            "pptp.magic_cookie": "0x1a2b3c4d",
            "pptp.control_message_type": str(int(cls.TYPE)),
        }
        reserved = []
        for field in dataclasses.fields(cls):
            if field.name.startswith("reserved"):
                # tshark shows every reserved field as "pptp.reserved", in hex bytes.
                size = struct.calcsize(field.metadata["fmt"])
                reserved.append(getattr(msg, field.name).to_bytes(size, "big").hex(":"))
            else:
                expected[tshark_name(cls, field.name)] = expected_text(cls, msg, field.name)
        expected["pptp.reserved"] = reserved if len(reserved) > 1 else reserved[0]
        self.assertEqual(dict(layer), expected, msg.NAME)

    def test_one_of_each_message(self):
        client, server = self.split_by_sender(self.messages())
        self.assertEqual(len(client) + len(server), 15)
        self.assertTrue(all(pptp.PAC in pptp.SENDER[type(m)] for m in server))
        path = self.mktemp()
        tshark.write_pcap(path, self.frames_for([m.pack() for m in client],
                                                [m.pack() for m in server]))
        frames = decode_all(path)
        self.assertEqual([len(f) for f in frames], [1] * 15)
        for msg, (layer,) in zip(client + server, frames):
            self.assertTsharkAgrees(msg, layer)
        self.assertEqual(tshark.problems(path), [])

    def test_seed_outgoing_call_reply(self):
        msg = pptp.OutgoingCallReply(call_id=256, peer_call_id=57982, result_code=1,
                                     connect_speed=100000000, packet_recv_window_size=64)
        path = self.mktemp()
        tshark.write_pcap(path, self.frames_for([], [msg.pack()]))
        ((layer,),) = decode_all(path)
        self.assertEqual((layer["pptp.call_id"], layer["pptp.peer_call_id"]), ("256", "57982"))
        self.assertEqual(layer["pptp.out_result"], "1")
        self.assertTsharkAgrees(msg, layer)
        self.assertEqual(tshark.problems(path), [])

    def test_rewritten_ids_are_what_tshark_reads(self):
        messages = self.messages(seed=3)
        # As calls.py rewrites: replace the fields call_ids() names, then pack.
        rewritten = [dataclasses.replace(m, **{f.field: 1000 if f.owner == pptp.PNS else 2000
                                              for f in pptp.call_ids(m)}).pack() for m in messages]
        path = self.mktemp()
        tshark.write_pcap(path, tshark.tcp_frames(rewritten))
        for msg, (layer,) in zip(messages, decode_all(path)):
            for field in pptp.call_ids(msg):
                self.assertEqual(layer[tshark_name(type(msg), field.field)],
                                 "1000" if field.owner == pptp.PNS else "2000", msg.NAME)

    def test_the_malformed_check_can_fire(self):
        """A control for the checks above: tshark does flag a cut message and a bad cookie."""
        good = pptp.OutgoingCallReply(call_id=1, peer_call_id=2).pack()
        broken = [good[:20], good[:4] + bytes(4) + good[8:]]
        path = self.mktemp()
        tshark.write_pcap(path, tshark.tcp_frames(broken))
        self.assertEqual(len(tshark.problems(path)), 2)
