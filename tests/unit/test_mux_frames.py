"""The mux wire format: round trips, byte layout, every decoding error, fuzzing."""
import struct

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from routeproxy.mux import frames as F

ALL_FRAMES = [
    F.Hello(),
    F.Hello(versions=(1, 2, 7), maxPayload=65536, initialWindow=1, pingInterval=3,
            deadTimeout=9, capabilities=("gre-batch", "zstd")),
    F.GoAway(F.LinkError.VERSION_MISMATCH, "no common version"),
    F.Ping(b"\x00\x01\x02\x03\x04\x05\x06\x07"),
    F.Pong(b"abcdefgh"),
    F.Open(5, "office", "198.51.100.7:51234"),
    F.Open(0xFFFFFFFF, "p\u00e9", ""),
    F.OpenOk(5),
    F.OpenRefused(5, F.Reason.UNKNOWN_PROFILE, "no such profile 'x'"),
    F.Close(9, F.Reason.NORMAL),
    F.Control(9, b"\x00\x9c\x00\x01" + bytes(152)),
    F.Control(9, b""),
    F.WindowUpdate(9, 1),
    F.WindowUpdate(9, F.MAX_WINDOW),
    F.Datagram(9, 0xBEEF, 1, 2, b"ppp"),
    F.Datagram(9, 1, None, 2, b""),
    F.Datagram(9, 1, 0xFFFFFFFF, None, bytes(1500)),
    F.Datagram(9, 0, None, None, b"x"),
]


def decodeAll(data, maxPayload=F.MIN_MAX_PAYLOAD):
    return F.FrameDecoder(maxPayload).frames(data)


class RoundTripTests(unittest.SynchronousTestCase):
    def test_eachFrame(self):
        for frame in ALL_FRAMES:
            self.assertEqual(decodeAll(frame.encode()), [frame])

    def test_concatenatedAndSplitAnywhere(self):
        wire = b"".join(f.encode() for f in ALL_FRAMES)
        for cut in (1, 5, 11, 12, 13, len(wire) // 2, len(wire) - 1):
            decoder = F.FrameDecoder()
            got = decoder.frames(wire[:cut]) + decoder.frames(wire[cut:])
            self.assertEqual(got, ALL_FRAMES, f"cut at {cut}")
        decoder = F.FrameDecoder()
        got = []
        for i in range(len(wire)):
            got += decoder.frames(wire[i:i + 1])
        self.assertEqual(got, ALL_FRAMES)
        self.assertEqual(decoder.buffered, 0)

    def test_fastPathEncodersMatchObjects(self):
        self.assertEqual(F.encodeGRE(3, 7, 1, None, b"abc"), F.Datagram(3, 7, 1, None, b"abc").encode())
        self.assertEqual(F.encodeGRE(3, 7, None, 9, b""), F.Datagram(3, 7, None, 9, b"").encode())
        self.assertEqual(F.encodeControl(3, b"abc"), F.Control(3, b"abc").encode())


class LayoutTests(unittest.SynchronousTestCase):
    """Byte offsets as written in docs/protocol.md."""

    def test_header(self):
        wire = F.Control(0x01020304, b"xyz").encode()
        self.assertEqual(wire[:12], bytes([0x14, 0, 0, 0, 1, 2, 3, 4, 0, 0, 0, 3]))
        self.assertEqual(wire[12:], b"xyz")

    def test_gre(self):
        wire = F.Datagram(1, 0x1234, 0x01020304, 0x05060708, b"P").encode()
        self.assertEqual(wire[0], F.GRE)
        self.assertEqual(wire[1], F.GRE_HAS_SEQ | F.GRE_HAS_ACK)
        self.assertEqual(wire[12:], bytes([0x12, 0x34, 1, 2, 3, 4, 5, 6, 7, 8]) + b"P")
        wire = F.Datagram(1, 0x1234, None, 0x05060708, b"").encode()
        self.assertEqual(wire[1], F.GRE_HAS_ACK)
        self.assertEqual(wire[12:], bytes([0x12, 0x34, 5, 6, 7, 8]))

    def test_hello(self):
        wire = F.Hello(versions=(1, 2), maxPayload=16384, initialWindow=65536,
                       pingInterval=10, deadTimeout=30, capabilities=("ab",)).encode()
        self.assertEqual(wire[:12], bytes([1, 0, 0, 0, 0, 0, 0, 0]) + struct.pack("!I", 25))
        self.assertEqual(wire[12:], b"RPMX\x02\x00\x01\x00\x02" + struct.pack(
            "!IIHH", 16384, 65536, 10, 30) + b"\x01\x02ab")

    def test_open(self):
        wire = F.Open(7, "ab", "c").encode()
        self.assertEqual(wire[12:], b"\x02ab\x01c")

    def test_codeText(self):
        self.assertEqual(F.Close(7, 3, "hi").encode()[12:], b"\x00\x03hi")
        self.assertEqual(F.GoAway(2).encode()[:12], bytes([2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]))


class DecodingErrorTests(unittest.SynchronousTestCase):
    def header(self, frameType, session, payload, flags=0):
        return F.encodeHeader(frameType, flags, session, len(payload)) + payload

    def assertMalformed(self, wire, frameType, session):
        err = self.assertRaises(F.MalformedFrame, decodeAll, wire)
        self.assertEqual((err.frameType, err.session), (frameType, session))
        return err

    def test_oversizeLengthRaisedAtHeader(self):
        decoder = F.FrameDecoder(16384)
        decoder.feed(F.encodeHeader(F.CONTROL, 0, 1, 16385))  # no payload yet
        err = self.assertRaises(F.FrameTooLarge, decoder.nextFrame)
        self.assertEqual(err.code, F.LinkError.FRAME_TOO_LARGE)
        self.assertIn("16385", str(err))
        self.assertRaises(F.FrameError, decoder.nextFrame)  # unusable afterwards

    def test_maxPayloadExactlyAccepted(self):
        self.assertEqual(decodeAll(F.Control(1, bytes(16384)).encode()),
                         [F.Control(1, bytes(16384))])

    def test_unknownTypesComeBackForTheCaller(self):
        ignorable, mandatory = decodeAll(self.header(0x85, 3, b"??") + self.header(0x40, 0, b""))
        self.assertTrue(ignorable.ignorable)
        self.assertEqual((ignorable.frameType, ignorable.session, ignorable.data), (0x85, 3, b"??"))
        self.assertFalse(mandatory.ignorable)

    def test_linkFrameOnSession(self):
        err = self.assertRaises(F.FrameError, decodeAll, self.header(F.PING, 4, bytes(8)))
        self.assertEqual(err.code, F.LinkError.PROTOCOL_ERROR)

    def test_sessionFrameOnSessionZero(self):
        err = self.assertRaises(F.FrameError, decodeAll, self.header(F.CONTROL, 0, b"x"))
        self.assertIn("session 0", str(err))

    def test_helloErrors(self):
        good = F.Hello().payload()
        for payload, why in [
            (b"", "truncated"),
            (b"XXXX" + good[4:], "magic"),
            (b"RPMX\x00" + good[7:], "no versions"),
            (good[:-1], "truncated"),
            (good[:-1] + b"\x01", "truncated"),
            (F.Hello(maxPayload=100).payload(), "max payload"),
            (F.Hello(initialWindow=0).payload(), "initial window"),
            (good[:-1] + b"\x01\x00", "empty capability"),
            (good[:-1] + b"\x01\x02\xff\xfe", "not UTF-8"),
        ]:
            err = self.assertMalformed(self.header(F.HELLO, 0, payload), F.HELLO, 0)
            self.assertEqual(err.code, F.LinkError.BAD_HELLO)
            self.assertIn(why, str(err))

    def test_helloTrailingBytesIgnored(self):
        [hello] = decodeAll(self.header(F.HELLO, 0, F.Hello().payload() + b"future"))
        self.assertEqual(hello, F.Hello())

    def test_openErrors(self):
        for payload in [b"", b"\x00\x00", b"\x05ab", b"\x02ab", b"\x02ab\x03c", b"\x02\xff\xfe\x00"]:
            self.assertMalformed(self.header(F.OPEN, 9, payload), F.OPEN, 9)

    def test_pingPongLength(self):
        for frameType in (F.PING, F.PONG):
            for n in (0, 7, 9):
                self.assertMalformed(self.header(frameType, 0, bytes(n)), frameType, 0)

    def test_windowUpdateErrors(self):
        for payload in (b"", b"\x00\x00\x01", b"\x00\x00\x00\x00\x01",
                        b"\x00\x00\x00\x00", b"\x80\x00\x00\x00"):
            self.assertMalformed(self.header(F.WINDOW_UPDATE, 2, payload), F.WINDOW_UPDATE, 2)

    def test_greErrors(self):
        self.assertMalformed(self.header(F.GRE, 2, b"\x01"), F.GRE, 2)
        self.assertMalformed(self.header(F.GRE, 2, b"\x00\x01\x00\x00\x00", F.GRE_HAS_SEQ),
                             F.GRE, 2)
        self.assertMalformed(self.header(F.GRE, 2, b"\x00\x01" + bytes(7),
                                         F.GRE_HAS_SEQ | F.GRE_HAS_ACK), F.GRE, 2)

    def test_codeTextErrors(self):
        for frameType, session in ((F.CLOSE, 3), (F.OPEN_REFUSED, 3), (F.GOAWAY, 0)):
            self.assertMalformed(self.header(frameType, session, b"\x01"), frameType, session)

    def test_malformedFrameDoesNotStopTheDecoder(self):
        decoder = F.FrameDecoder()
        decoder.feed(self.header(F.GRE, 2, b"\x01") + F.Control(2, b"after").encode())
        self.assertRaises(F.MalformedFrame, decoder.nextFrame)
        self.assertEqual(decoder.nextFrame(), F.Control(2, b"after"))
        self.assertIsNone(decoder.nextFrame())

    def test_encodeRefusesBadNames(self):
        self.assertRaises(ValueError, F.Open(1, "").encode)
        self.assertRaises(ValueError, F.Open(1, "x" * 256).encode)


class FuzzTests(unittest.SynchronousTestCase):
    @settings(max_examples=400, deadline=None)
    @given(st.binary(max_size=300))
    def test_decoderRaisesOnlyFrameError(self, data):
        decoder = F.FrameDecoder(1024)
        decoder.feed(data)
        try:
            while True:
                try:
                    if decoder.nextFrame() is None:
                        break
                except F.MalformedFrame:
                    continue
        except F.FrameError:
            pass

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(sorted(F.FRAME_CLASSES)), st.integers(0, 255),
           st.integers(0, 2**32 - 1), st.binary(max_size=80))
    def test_structuredHeadersWithRandomPayloads(self, frameType, flags, session, payload):
        wire = F.encodeHeader(frameType, flags, session, len(payload)) + payload
        try:
            frames = decodeAll(wire)
        except F.FrameError:
            return
        [frame] = frames
        # Whatever decodes re-encodes to a frame that decodes to the same thing.
        self.assertEqual(decodeAll(frame.encode()), [frame])
