"""Tests for routeproxy.pptp: every message to the byte, the stream decoder, the call-ID table.

Expected wire layouts are written out here independently of the codec, from
RFC 2637 section 2, so a wrong field order or width in the codec fails a test.
"""
import dataclasses
import os
import random
import re
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from routeproxy import pptp
from routeproxy.pptp import PAC, PNS, PPTPError, PPTPStreamDecoder, parse_message

HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# RFC 2637 s.2.1 - s.2.15: (type, length, [(field, struct code), ...]) after the
# common header (Length, PPTP Message Type, Magic Cookie, Control Message Type).
RFC_LAYOUTS = {
    "StartControlConnectionRequest": (1, 156, [
        ("reserved0", "H"), ("protocol_version", "H"), ("reserved1", "H"),
        ("framing_capabilities", "I"), ("bearer_capabilities", "I"), ("maximum_channels", "H"),
        ("firmware_revision", "H"), ("host_name", "64s"), ("vendor_string", "64s")]),
    "StartControlConnectionReply": (2, 156, [
        ("reserved0", "H"), ("protocol_version", "H"), ("result_code", "B"), ("error_code", "B"),
        ("framing_capabilities", "I"), ("bearer_capabilities", "I"), ("maximum_channels", "H"),
        ("firmware_revision", "H"), ("host_name", "64s"), ("vendor_string", "64s")]),
    "StopControlConnectionRequest": (3, 16, [
        ("reserved0", "H"), ("reason", "B"), ("reserved1", "B"), ("reserved2", "H")]),
    "StopControlConnectionReply": (4, 16, [
        ("reserved0", "H"), ("result_code", "B"), ("error_code", "B"), ("reserved1", "H")]),
    "EchoRequest": (5, 16, [("reserved0", "H"), ("identifier", "I")]),
    "EchoReply": (6, 20, [
        ("reserved0", "H"), ("identifier", "I"), ("result_code", "B"), ("error_code", "B"),
        ("reserved1", "H")]),
    "OutgoingCallRequest": (7, 168, [
        ("reserved0", "H"), ("call_id", "H"), ("call_serial_number", "H"), ("minimum_bps", "I"),
        ("maximum_bps", "I"), ("bearer_type", "I"), ("framing_type", "I"),
        ("packet_recv_window_size", "H"), ("packet_processing_delay", "H"),
        ("phone_number_length", "H"), ("reserved1", "H"), ("phone_number", "64s"),
        ("subaddress", "64s")]),
    "OutgoingCallReply": (8, 32, [
        ("reserved0", "H"), ("call_id", "H"), ("peer_call_id", "H"), ("result_code", "B"),
        ("error_code", "B"), ("cause_code", "H"), ("connect_speed", "I"),
        ("packet_recv_window_size", "H"), ("packet_processing_delay", "H"),
        ("physical_channel_id", "I")]),
    "IncomingCallRequest": (9, 220, [
        ("reserved0", "H"), ("call_id", "H"), ("call_serial_number", "H"),
        ("call_bearer_type", "I"), ("physical_channel_id", "I"), ("dialed_number_length", "H"),
        ("dialing_number_length", "H"), ("dialed_number", "64s"), ("dialing_number", "64s"),
        ("subaddress", "64s")]),
    "IncomingCallReply": (10, 24, [
        ("reserved0", "H"), ("call_id", "H"), ("peer_call_id", "H"), ("result_code", "B"),
        ("error_code", "B"), ("packet_recv_window_size", "H"), ("packet_transmit_delay", "H"),
        ("reserved1", "H")]),
    "IncomingCallConnected": (11, 28, [
        ("reserved0", "H"), ("peer_call_id", "H"), ("reserved1", "H"), ("connect_speed", "I"),
        ("packet_recv_window_size", "H"), ("packet_transmit_delay", "H"), ("framing_type", "I")]),
    "CallClearRequest": (12, 16, [("reserved0", "H"), ("call_id", "H"), ("reserved1", "H")]),
    "CallDisconnectNotify": (13, 148, [
        ("reserved0", "H"), ("call_id", "H"), ("result_code", "B"), ("error_code", "B"),
        ("cause_code", "H"), ("reserved1", "H"), ("call_statistics", "128s")]),
    "WanErrorNotify": (14, 40, [
        ("reserved0", "H"), ("peer_call_id", "H"), ("reserved1", "H"), ("crc_errors", "I"),
        ("framing_errors", "I"), ("hardware_overruns", "I"), ("buffer_overruns", "I"),
        ("timeout_errors", "I"), ("alignment_errors", "I")]),
    "SetLinkInfo": (15, 24, [
        ("reserved0", "H"), ("peer_call_id", "H"), ("reserved1", "H"), ("send_accm", "I"),
        ("receive_accm", "I")]),
}

# Whose ID each call-ID field holds, from the field descriptions of RFC 2637 s.2.
RFC_CALL_ID_OWNERS = {
    "OutgoingCallRequest": {"call_id": PNS},
    "OutgoingCallReply": {"call_id": PAC, "peer_call_id": PNS},
    "IncomingCallRequest": {"call_id": PAC},
    "IncomingCallReply": {"call_id": PNS, "peer_call_id": PAC},
    "IncomingCallConnected": {"peer_call_id": PNS},
    "CallClearRequest": {"call_id": PNS},
    "CallDisconnectNotify": {"call_id": PAC},
    "WanErrorNotify": {"peer_call_id": PNS},
    "SetLinkInfo": {"peer_call_id": PAC},
}


def sample_values(name, seed):
    """Distinct, non-zero, width-filling values for every field of message *name*."""
    rng = random.Random(f"{name}-{seed}")
    values = {}
    for field, code in RFC_LAYOUTS[name][2]:
        if code == "B":
            values[field] = rng.randrange(1, 1 << 8)
        elif code == "H":
            values[field] = rng.randrange(1, 1 << 16)
        elif code == "I":
            values[field] = rng.randrange(1 << 16, 1 << 32)
        else:
            size = int(code[:-1])
            values[field] = bytes(rng.randrange(1, 256) for _ in range(size))
    return values


def sample(name, seed=0):
    return getattr(pptp, name)(**sample_values(name, seed))


def expected_bytes(name, values):
    """The RFC wire bytes of message *name* with *values*, built without the codec."""
    control_type, _, layout = RFC_LAYOUTS[name]
    fmt = ">HHIH" + "".join(code for _, code in layout)
    length = struct.calcsize(fmt)
    return struct.pack(fmt, length, 1, 0x1A2B3C4D, control_type, *[values[f] for f, _ in layout])


def all_samples(seed=0):
    return [sample(name, seed) for name in RFC_LAYOUTS]


class LayoutTests(unittest.SynchronousTestCase):
    def test_fifteen_messages(self):
        self.assertEqual(sorted(pptp.MESSAGE_CLASSES), list(range(1, 16)))
        self.assertEqual({cls.__name__ for cls in pptp.MESSAGE_CLASSES.values()}, set(RFC_LAYOUTS))

    def test_fields_lengths_and_types_follow_the_rfc(self):
        for name, (control_type, length, layout) in RFC_LAYOUTS.items():
            cls = getattr(pptp, name)
            self.assertEqual(cls.TYPE, control_type, name)
            self.assertEqual(cls.LENGTH, length, name)
            self.assertEqual([f.name for f in dataclasses.fields(cls)], [f for f, _ in layout], name)
            self.assertEqual(struct.calcsize(">HHIH" + "".join(c for _, c in layout)), length, name)

    def test_incoming_call_reply_is_24_bytes(self):
        """scapy's default ICRP length is 148; RFC 2637 s.2.10 makes it 24."""
        self.assertEqual(len(pptp.IncomingCallReply().pack()), 24)

    def test_pack_matches_independent_layout(self):
        for name in RFC_LAYOUTS:
            for seed in range(3):
                values = sample_values(name, seed)
                msg = getattr(pptp, name)(**values)
                self.assertEqual(msg.pack(), expected_bytes(name, values), name)

    def test_round_trip_every_message(self):
        for msg in all_samples(1):
            data = msg.pack()
            self.assertEqual(parse_message(data), msg)
            self.assertEqual(parse_message(data).pack(), data)
            self.assertIsInstance(parse_message(bytearray(data)), type(msg))
            self.assertEqual(parse_message(memoryview(data)), msg)

    def test_seed_outgoing_call_reply(self):
        """The Outgoing-Call-Reply from ../shared/seeds/002 (frame 8 of that capture)."""
        wire = struct.pack(">HHIHH" "HH" "BBH" "I" "HH" "I",
                           32, 1, 0x1A2B3C4D, 8, 0,
                           256, 57982,
                           1, 0, 0,
                           100000000,
                           64, 0,
                           0)
        msg = parse_message(wire)
        self.assertIsInstance(msg, pptp.OutgoingCallReply)
        self.assertEqual((msg.call_id, msg.peer_call_id), (256, 57982))
        self.assertEqual((msg.result_code, msg.error_code, msg.cause_code), (1, 0, 0))
        self.assertEqual(msg.result_code, pptp.OutgoingCallResult.CONNECTED)
        self.assertEqual(msg.connect_speed, 100000000)
        self.assertEqual((msg.packet_recv_window_size, msg.packet_processing_delay), (64, 0))
        self.assertEqual(msg.physical_channel_id, 0)
        built = pptp.OutgoingCallReply(call_id=256, peer_call_id=57982, result_code=1,
                                       connect_speed=100000000, packet_recv_window_size=64)
        self.assertEqual(built.pack(), wire)
        self.assertEqual(pptp.call_ids(msg), [
            pptp.CallIdField("call_id", PAC, 256, 12),
            pptp.CallIdField("peer_call_id", PNS, 57982, 14),
        ])

    def test_defaults(self):
        msg = pptp.StartControlConnectionRequest(host_name=b"lrp")
        self.assertEqual(msg.protocol_version, 0x0100)
        self.assertEqual(len(msg.host_name), 64)
        self.assertEqual(pptp.strip_nul(msg.host_name), b"lrp")
        self.assertEqual(parse_message(msg.pack()), msg)

    def test_enum_values_become_ints(self):
        msg = pptp.OutgoingCallReply(result_code=pptp.OutgoingCallResult.BUSY,
                                     error_code=pptp.ErrorCode.NONE)
        self.assertIs(type(msg.result_code), int)
        self.assertEqual(msg.pack()[16], 4)

    def test_constructor_rejects_values_that_do_not_fit(self):
        for kwargs in [dict(call_id=65536), dict(call_id=-1), dict(result_code=256),
                       dict(connect_speed=1 << 32), dict(call_id="1"), dict(call_id=True)]:
            e = self.assertRaises(PPTPError, pptp.OutgoingCallReply, **kwargs)
            self.assertEqual(e.reason, "bad value")
        e = self.assertRaises(PPTPError, pptp.StartControlConnectionRequest, host_name=b"x" * 65)
        self.assertEqual(e.reason, "bad value")
        e = self.assertRaises(PPTPError, pptp.StartControlConnectionRequest, host_name="text")
        self.assertEqual(e.reason, "bad value")

    def test_str_is_one_short_line(self):
        msg = pptp.StartControlConnectionRequest(host_name=b"client", maximum_channels=3)
        self.assertEqual(str(msg), "Start-Control-Connection-Request(protocol_version=256, "
                                   "maximum_channels=3, host_name=b'client')")
        self.assertEqual(str(pptp.EchoRequest()), "Echo-Request()")

    def test_base_class_is_not_a_message(self):
        self.assertRaises(TypeError, pptp.ControlMessage)

    def test_result_and_error_codes(self):
        self.assertEqual(pptp.StartResult.GENERAL_ERROR, 2)
        self.assertEqual(pptp.OutgoingCallResult.GENERAL_ERROR, 2)
        self.assertEqual(pptp.OutgoingCallResult.BUSY, 4)
        self.assertEqual(pptp.DisconnectResult.REQUEST, 4)
        self.assertEqual(pptp.ErrorCode.NO_RESOURCE, 4)
        self.assertEqual(pptp.ErrorCode.BAD_CALL_ID, 5)


def header(length, control_type, message_type=1, magic=0x1A2B3C4D):
    return struct.pack(">HHIHH", length, message_type, magic, control_type, 0)


class ParseErrorTests(unittest.SynchronousTestCase):
    def assertReason(self, reason, data):
        e = self.assertRaises(PPTPError, parse_message, data)
        self.assertEqual(e.reason, reason)
        self.assertIn(reason, str(e))
        return e

    def test_bad_magic(self):
        data = bytearray(pptp.EchoRequest(identifier=7).pack())
        data[4] ^= 0xFF
        e = self.assertReason("bad magic", bytes(data))
        self.assertIn("0x1a2b3c4d", str(e))

    def test_not_a_control_message(self):
        self.assertReason("not a control message", header(16, 5, message_type=2) + bytes(4))

    def test_unknown_type(self):
        for control_type in (0, 16, 0xFFFF):
            self.assertReason("unknown type", header(16, control_type) + bytes(4))

    def test_bad_length(self):
        self.assertReason("bad length", header(15, 5) + bytes(3))
        self.assertReason("bad length", header(221, 9) + bytes(209))
        self.assertReason("bad length", header(33, 8) + bytes(21))        # OCRP is 32
        self.assertReason("bad length", header(148, 10) + bytes(136))     # scapy's ICRP length
        self.assertReason("bad length", pptp.EchoRequest().pack() + b"\0")  # trailing byte

    def test_truncated(self):
        data = pptp.CallDisconnectNotify(call_id=3).pack()
        for cut in range(len(data)):
            self.assertReason("truncated", data[:cut])


def stream_of(messages):
    return b"".join(m.pack() for m in messages)


class StreamDecoderTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.messages = all_samples(2)
        self.stream = stream_of(self.messages)

    def test_one_read(self):
        decoder = PPTPStreamDecoder()
        self.assertEqual(decoder.feed(self.stream), self.messages)
        self.assertEqual(decoder.pending, 0)
        decoder.finish()

    def test_split_at_every_offset(self):
        for cut in range(len(self.stream) + 1):
            decoder = PPTPStreamDecoder()
            got = decoder.feed(self.stream[:cut]) + decoder.feed(self.stream[cut:])
            self.assertEqual(got, self.messages, cut)
            self.assertEqual(decoder.pending, 0)

    def test_byte_at_a_time(self):
        decoder = PPTPStreamDecoder()
        got = []
        for i in range(len(self.stream)):
            got += decoder.feed(self.stream[i:i + 1])
            self.assertEqual(decoder.pending, (i + 1) - sum(m.LENGTH for m in got))
        self.assertEqual(got, self.messages)

    def test_accepts_bytearray_and_memoryview(self):
        decoder = PPTPStreamDecoder()
        got = decoder.feed(bytearray(self.stream[:100])) + decoder.feed(memoryview(self.stream)[100:])
        self.assertEqual(got, self.messages)

    def test_pending_and_truncated_close(self):
        decoder = PPTPStreamDecoder()
        self.assertEqual(decoder.feed(self.stream[:-5]), self.messages[:-1])
        self.assertEqual(decoder.pending, self.messages[-1].LENGTH - 5)
        e = self.assertRaises(PPTPError, decoder.finish)
        self.assertEqual(e.reason, "truncated")
        self.assertEqual(decoder.feed(self.stream[-5:]), self.messages[-1:])
        decoder.finish()

    def test_bad_magic_fails_as_soon_as_the_cookie_is_in(self):
        bad = bytearray(pptp.EchoRequest().pack())
        bad[7] ^= 1
        decoder = PPTPStreamDecoder()
        self.assertEqual(decoder.feed(bytes(bad[:7])), [])
        e = self.assertRaises(PPTPError, decoder.feed, bytes(bad[7:8]))
        self.assertEqual(e.reason, "bad magic")

    def test_error_keeps_earlier_messages_and_kills_the_decoder(self):
        decoder = PPTPStreamDecoder()
        good = self.messages[:3]
        e = self.assertRaises(PPTPError, decoder.feed, stream_of(good) + header(16, 99) + bytes(4))
        self.assertEqual(e.reason, "unknown type")
        self.assertEqual(e.decoded, good)
        self.assertTrue(decoder.failed)
        again = self.assertRaises(PPTPError, decoder.feed, self.stream)
        self.assertEqual(again.reason, "unknown type")
        self.assertEqual(self.assertRaises(PPTPError, decoder.finish).reason, "unknown type")

    def test_each_reason_from_the_stream(self):
        cases = {
            "bad length": header(300, 1),
            "not a control message": header(16, 5, message_type=2),
            "bad magic": header(16, 5, magic=0x1A2B3C4E),
            "unknown type": header(16, 16),
        }
        for reason, data in cases.items():
            decoder = PPTPStreamDecoder()
            prefix = self.messages[0].pack()
            e = self.assertRaises(PPTPError, decoder.feed, prefix + data)
            self.assertEqual(e.reason, reason)

    def test_large_read_is_linear(self):
        """10 000 messages in one read and in 1 KiB reads decode to the same list."""
        messages = self.messages * 667
        stream = stream_of(messages)
        self.assertEqual(PPTPStreamDecoder().feed(stream), messages)
        decoder = PPTPStreamDecoder()
        got = []
        for i in range(0, len(stream), 1024):
            got += decoder.feed(stream[i:i + 1024])
        self.assertEqual(got, messages)


# --- hypothesis ---------------------------------------------------------------

def message_strategy(name):
    fields = {}
    for field, code in RFC_LAYOUTS[name][2]:
        if code in ("B", "H", "I"):
            fields[field] = st.integers(0, (1 << (8 * struct.calcsize(code))) - 1)
        else:
            fields[field] = st.binary(max_size=int(code[:-1]))
    return st.builds(getattr(pptp, name), **fields)


messages_strategy = st.one_of([message_strategy(name) for name in RFC_LAYOUTS])


class PropertyTests(unittest.SynchronousTestCase):
    @HYPOTHESIS
    @given(messages_strategy)
    def test_round_trip(self, msg):
        data = msg.pack()
        self.assertEqual(len(data), msg.LENGTH)
        self.assertEqual(parse_message(data), msg)
        self.assertEqual(parse_message(data).pack(), data)

    @HYPOTHESIS
    @given(st.lists(messages_strategy, max_size=12), st.data())
    def test_any_split_reassembles(self, messages, data):
        stream = stream_of(messages)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
        decoder = PPTPStreamDecoder()
        got = []
        start = 0
        for cut in cuts + [len(stream)]:
            got += decoder.feed(stream[start:cut])
            start = cut
        self.assertEqual(got, messages)
        self.assertEqual(decoder.pending, 0)

    @HYPOTHESIS
    @given(st.binary(max_size=400))
    def test_random_bytes_raise_only_pptp_error(self, data):
        try:
            msg = parse_message(data)
        except PPTPError as e:
            self.assertIn(e.reason, pptp.REASONS)
        else:
            self.assertEqual(msg.pack(), data)
        decoder = PPTPStreamDecoder()
        try:
            decoder.feed(data)
            decoder.finish()
        except PPTPError as e:
            self.assertIn(e.reason, pptp.REASONS)

    @HYPOTHESIS
    @given(st.lists(messages_strategy, min_size=1, max_size=6), st.data())
    def test_mutated_streams_raise_only_pptp_error(self, messages, data):
        stream = bytearray(stream_of(messages))
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(0, len(stream) - 1))
            action = data.draw(st.sampled_from(["flip", "delete", "insert"]))
            if action == "flip":
                stream[pos] ^= data.draw(st.integers(1, 255))
            elif action == "delete":
                del stream[pos]
            else:
                stream.insert(pos, data.draw(st.integers(0, 255)))
        stream = bytes(stream)
        decoder = PPTPStreamDecoder()
        try:
            got = decoder.feed(stream)
            decoder.finish()
        except PPTPError as e:
            self.assertIn(e.reason, pptp.REASONS)
        else:
            # Whatever is accepted re-packs to exactly the bytes that came in.
            self.assertEqual(stream_of(got), stream)
        for msg_bytes in (stream[:len(stream) // 2], stream):
            try:
                parse_message(msg_bytes)
            except PPTPError:
                pass


# --- call IDs -----------------------------------------------------------------

class CallIdTableTests(unittest.SynchronousTestCase):
    def test_table_matches_the_rfc(self):
        table = {cls.__name__: dict(entries) for cls, entries in pptp.CALL_ID_FIELDS.items()}
        self.assertEqual(table, RFC_CALL_ID_OWNERS)

    def test_every_call_id_field_is_in_the_table(self):
        for cls in pptp.MESSAGE_CLASSES.values():
            names = {f.name for f in dataclasses.fields(cls) if "call_id" in f.name}
            self.assertEqual(names, {n for n, _ in pptp.CALL_ID_FIELDS.get(cls, ())}, cls.NAME)

    def test_call_id_is_the_senders_peer_call_id_the_receivers(self):
        for cls, entries in pptp.CALL_ID_FIELDS.items():
            (sender,) = pptp.SENDER[cls]
            for name, owner in entries:
                self.assertEqual(owner == sender, name == "call_id", (cls.NAME, name))

    def test_senders(self):
        by_name = {cls.__name__: senders for cls, senders in pptp.SENDER.items()}
        self.assertEqual(set(by_name), set(RFC_LAYOUTS))
        self.assertEqual(by_name["OutgoingCallRequest"], {PNS})
        self.assertEqual(by_name["CallDisconnectNotify"], {PAC})
        self.assertEqual(by_name["EchoRequest"], {PNS, PAC})

    def test_alternate_owner_of_call_disconnect_notify(self):
        self.assertEqual({cls.__name__: alt for cls, alt in pptp.ALTERNATE_OWNERS.items()},
                         {"CallDisconnectNotify": {"call_id": PNS}})

    def test_call_id_offsets_are_the_bytes_a_rewrite_changes(self):
        """calls.py rewrites IDs by replacing the fields call_ids() names; exactly the bytes
        at their offsets change, and the message parses back with the new values."""
        for msg in all_samples(3):
            before = msg.pack()
            fields = pptp.call_ids(msg)
            after = dataclasses.replace(msg, **{f.field: f.value ^ 0xFFFF for f in fields}).pack()
            changed = {i for i in range(len(before)) if before[i] != after[i]}
            offsets = set()
            for field in fields:
                offsets |= {field.offset, field.offset + 1}
            self.assertEqual(changed, offsets, msg.NAME)
            rewritten = parse_message(after)
            for field in fields:
                self.assertEqual(getattr(rewritten, field.field), field.value ^ 0xFFFF)

    def test_backwards_set_link_info_carries_the_pns_id(self):
        sli = pptp.SetLinkInfo(peer_call_id=77)
        self.assertEqual(pptp.call_ids(sli)[0].owner, PAC)
        self.assertEqual(pptp.call_ids(sli, sender=PNS)[0].owner, PAC)
        self.assertEqual(pptp.call_ids(sli, sender=PAC)[0].owner, PNS)
        self.assertRaises(ValueError, pptp.call_ids, sli, sender="client")

    def test_a_translated_id_that_is_not_16_bit_is_refused(self):
        """The rebuilt message checks its fields, so a bad translation cannot reach the wire."""
        msg = pptp.CallClearRequest(call_id=1)
        for bad in (-1, 70000):
            e = self.assertRaises(PPTPError, dataclasses.replace, msg, call_id=bad)
            self.assertEqual(e.reason, "bad value")

    def test_docs_table_agrees_with_the_code(self):
        """docs/pptp-call-ids.md lists each message's type, length, sender and ID offsets."""
        path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "pptp-call-ids.md")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        rows = {}
        for line in text.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 5 and cells[0].isdigit():
                rows[int(cells[0])] = cells
        self.assertEqual(sorted(rows), list(range(1, 16)))
        for control_type, cells in rows.items():
            cls = pptp.MESSAGE_CLASSES[control_type]
            self.assertEqual(cells[1], cls.NAME)
            self.assertEqual(int(cells[2]), cls.LENGTH, cls.NAME)
            documented = set(re.findall(r"`(\w+)` @(\d+) \((PNS|PAC)\)", cells[4]))
            expected = {(f.field, str(f.offset), f.owner.upper())
                        for f in pptp.call_ids(cls())}
            self.assertEqual(documented, expected, cls.NAME)
