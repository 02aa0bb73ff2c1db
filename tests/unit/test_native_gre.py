"""routeproxy.native's C functions against their Python twins, byte for byte.

Differential: random bytes, packets built by the Python builders, and those packets with a
byte changed, a bit flipped or cut at every length go through both; the outcomes (accepted
or the same rejection, every field, the bytes) must be equal.  The IPv4 checks are compared
with ``GREPort._frameReceived`` itself, its stateful checks (copies, local addresses, the
sojourn gate) out of the way.  Without the built module these skip with load()'s reason,
except under CI, where its absence is a failure.
"""
import os
import struct
import sys

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.trial import unittest

from routeproxy import gre, native
from routeproxy.capture import DLT_EN10MB, LINK_LAYERS
from routeproxy.mux.frames import encodeGRE
from tests.support.native import PortProbe, native_outcome, outcome
from tests.support.packets import frame, ipv4

MODULE, REASON = native.load()
HYPOTHESIS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
# Around every field's range, and past int64 (the wrappers' own conversion)
ANY_INT = st.one_of(st.integers(-2, 0x10001), st.integers(0xFFFFFFFE, 0x100000001),
                    st.sampled_from([-(1 << 70), 1 << 63, 1 << 64]))
OPTIONAL_U32 = st.none() | U32


class BuiltTests(unittest.SynchronousTestCase):
    def test_built_under_ci(self):
        """CI cannot skip the differential tests unseen: there, a missing module fails."""
        if MODULE is None:
            if os.environ.get("CI") == "true":
                self.fail(f"CI=true and {REASON}")
            raise unittest.SkipTest(REASON)

    def test_not_built_is_one_line(self):
        """The reason a missing module gives, whether or not this checkout built it."""
        real = native.load.__wrapped__
        try:
            sys.modules["routeproxy.native._gre"] = None  # import fails as for a missing file
            self.assertEqual(real(), (None, "routeproxy.native is not built "
                                            "(python -m routeproxy.native.build)"))
        finally:
            del sys.modules["routeproxy.native._gre"]
            if MODULE is not None:
                sys.modules["routeproxy.native._gre"] = MODULE

    def test_a_missing_module_is_one_line(self):
        """load() never raises; its reason is one line naming the fix."""
        module, reason = native.load()
        if module is None:
            self.assertEqual(len(reason.splitlines()), 1)
            self.assertIn("routeproxy.native", reason)
        else:
            self.assertIsNone(reason)


class NativeTestCase(unittest.SynchronousTestCase):
    if MODULE is None:
        skip = REASON


class CodeTests(NativeTestCase):
    def test_python_tables_match_the_header(self):
        """The codes __init__.py maps are the ones gre.h defines."""
        lib = MODULE.lib
        header = {name: getattr(lib, name) for name in dir(lib) if name.startswith("RP_")}
        self.assertEqual({code: reason for code, reason in native.GRE_REASONS.items()},
                         {header["RP_GRE_TRUNCATED"]: gre.TRUNCATED,
                          header["RP_GRE_NOT_VERSION_1"]: gre.NOT_VERSION_1,
                          header["RP_GRE_CHECKSUM_ROUTING"]: gre.CHECKSUM_ROUTING,
                          header["RP_GRE_KEY_MISSING"]: gre.KEY_MISSING,
                          header["RP_GRE_SOURCE_ROUTE_RECURSION"]: gre.SOURCE_ROUTE_RECURSION,
                          header["RP_GRE_RESERVED_FLAGS"]: gre.RESERVED_FLAGS,
                          header["RP_GRE_NOT_PPP"]: gre.NOT_PPP,
                          header["RP_GRE_PAYLOAD_TRUNCATED"]: gre.PAYLOAD_TRUNCATED,
                          header["RP_GRE_PAYLOAD_WITHOUT_SEQUENCE"]: gre.PAYLOAD_WITHOUT_SEQUENCE,
                          header["RP_RANGE"]: gre.OUT_OF_RANGE})
        self.assertEqual(native.NO_ROOM, lib.RP_NO_ROOM)
        self.assertEqual((native.IPV4_GRE, native.IPV4_FRAGMENT, native.IPV4_EMPTY),
                         (lib.RP_IPV4_GRE, lib.RP_IPV4_FRAGMENT, lib.RP_IPV4_EMPTY))
        self.assertEqual(set(native.IPV4_DROPS),
                         {lib.RP_IPV4_NOT_IPV4, lib.RP_IPV4_TRUNCATED, lib.RP_IPV4_BAD_HEADER,
                          lib.RP_IPV4_NOT_GRE, lib.RP_IPV4_EMPTY})

    def test_no_room_is_refused(self):
        """The builders never write past the room they are given."""
        lib, ffi = MODULE.lib, MODULE.ffi
        out = ffi.new("uint8_t[]", 32)
        self.assertEqual(lib.rp_build_gre(out, 15, 7, ffi.NULL, 0, 1, 1, 1, 2), lib.RP_NO_ROOM)
        self.assertEqual(lib.rp_build_gre(out, 16, 7, b"x", 1, 1, 1, 1, 2), lib.RP_NO_ROOM)
        self.assertEqual(lib.rp_build_gre(out, 16, 7, ffi.NULL, 0, 1, 1, 1, 2), 16)
        self.assertEqual(lib.rp_mux_gre_frame(out, 23, 1, 7, 1, 1, 1, 2, b"ab", 2), lib.RP_NO_ROOM)
        self.assertEqual(lib.rp_mux_gre_frame(out, 24, 1, 7, 1, 1, 1, 2, b"ab", 2), 24)


# -- GRE -------------------------------------------------------------------------------------


@st.composite
def gre_packets(draw):
    """A packet of gre.build_gre, any kind (data, data + ack, ack only, empty), maybe padded."""
    seq, ack = draw(OPTIONAL_U32), draw(OPTIONAL_U32)
    payload = draw(st.binary(max_size=40)) if seq is not None else b""
    return gre.build_gre(draw(U16), payload, seq, ack) + draw(st.binary(max_size=6))


@st.composite
def gre_headers(draw):
    """Any first word, a protocol near PPP's, any length: reaches every rejection."""
    flags = draw(U16 | st.sampled_from([0x3001, 0x3081, 0x2001, 0x2081, 0x1001, 0x3000]))
    protocol = draw(st.sampled_from([gre.PPP_PROTOCOL, 0x880A]) | U16)
    length = draw(st.integers(0, 24) | U16)
    return (struct.pack("!HHHH", flags, protocol, length, draw(U16))
            + draw(st.binary(max_size=30)))


def mutations(packet, index, value, bit):
    """*packet* with byte *index* replaced by *value*, and with one of its bits flipped."""
    index %= len(packet)
    flipped = packet[index] ^ (1 << bit)
    return [packet[:index] + bytes([value]) + packet[index + 1:],
            packet[:index] + bytes([flipped]) + packet[index + 1:]]


class SplitGRETests(NativeTestCase):
    def check(self, data):
        self.assertEqual(outcome(native.split_gre, data), outcome(gre.split_gre, data), data.hex())

    def checkCuts(self, data):
        for end in range(len(data) + 1):
            self.check(data[:end])

    @HYPOTHESIS
    @given(st.binary(max_size=64))
    def test_random_bytes(self, data):
        self.check(data)

    @HYPOTHESIS
    @given(gre_headers())
    def test_random_headers(self, data):
        self.checkCuts(data)

    @HYPOTHESIS
    @given(gre_packets())
    def test_valid_packets_cut_at_every_length(self, data):
        self.checkCuts(data)

    @HYPOTHESIS
    @given(gre_packets(), st.integers(0, 1000), st.integers(0, 255), st.integers(0, 7))
    def test_valid_packets_mutated(self, data, index, value, bit):
        for mutated in mutations(data, index, value, bit):
            self.checkCuts(mutated)

    def test_every_first_word(self):
        """Each of the 65 536 first words, on a header that is otherwise an ack's."""
        for flags in range(0x10000):
            self.check(struct.pack("!HHHHI", flags, gre.PPP_PROTOCOL, 0, 7, 9))

    def test_buffers_other_than_bytes(self):
        """A memoryview or bytearray gives the payload's type that split_gre gives."""
        packet = gre.build_gre(7, b"abc", 1, 2)
        for data in (memoryview(packet), bytearray(packet), memoryview(gre.build_gre(7, ack=2))):
            ours, theirs = native.split_gre(data), gre.split_gre(data)
            self.assertEqual(ours, theirs)
            self.assertIs(type(ours[3]), type(theirs[3]))


class BuildTests(NativeTestCase):
    @HYPOTHESIS
    @given(ANY_INT, st.binary(max_size=40) | st.sampled_from([b"x" * 0xFFFF, b"x" * 0x10000]),
           st.none() | ANY_INT, st.none() | ANY_INT)
    def test_build_gre(self, call_id, payload, seq, ack):
        self.assertEqual(outcome(native.build_gre, call_id, payload, seq, ack),
                         outcome(gre.build_gre, call_id, payload, seq, ack))

    @HYPOTHESIS
    @given(ANY_INT, ANY_INT, st.none() | ANY_INT, st.none() | ANY_INT, st.binary(max_size=40))
    def test_mux_gre_frame(self, session, call_tag, seq, ack, data):
        self.assertEqual(outcome(native.mux_gre_frame, session, call_tag, seq, ack, data),
                         outcome(encodeGRE, session, call_tag, seq, ack, data))


# -- IPv4 ------------------------------------------------------------------------------------


ADDRESSES = st.sampled_from(["10.0.0.1", "10.0.0.2", "192.168.7.9"])


@st.composite
def ipv4_frames(draw, datalink):
    """A captured frame of GRE (or not), maybe fragmented, with options or padding."""
    ip = ipv4(draw(ADDRESSES), draw(ADDRESSES), draw(st.binary(max_size=24)),
              proto=draw(st.sampled_from([47, 47, 6, 17])),
              off=draw(st.sampled_from([0, 0, 0x2000, 0x0003, 0x4000, 0x2001])),
              opts=draw(st.sampled_from([b"", b"\x01\x01\x01\x00"])))
    return (frame(datalink, ip, draw(st.sampled_from([0x0800, 0x0800, 0x86DD])))
            + draw(st.binary(max_size=6)))


class IPv4Tests(NativeTestCase):
    probes = {}  # one port per datalink; each outcome() starts from a clean state

    def check(self, datalink, data):
        probe = self.probes.get(datalink) or self.probes.setdefault(datalink, PortProbe(datalink))
        self.assertEqual(native_outcome(data, LINK_LAYERS[datalink]), probe.outcome(data),
                         f"datalink {datalink}: {data.hex()}")

    def checkCuts(self, datalink, data):
        for end in range(len(data) + 1):
            self.check(datalink, data[:end])

    @HYPOTHESIS
    @given(st.sampled_from(sorted(LINK_LAYERS)), st.binary(max_size=80))
    def test_random_bytes(self, datalink, data):
        self.check(datalink, data)

    @HYPOTHESIS
    @given(st.data())
    def test_frames_cut_at_every_length(self, data):
        datalink = data.draw(st.sampled_from(sorted(LINK_LAYERS)))
        self.checkCuts(datalink, data.draw(ipv4_frames(datalink)))

    @HYPOTHESIS
    @given(st.data(), st.integers(0, 1000), st.integers(0, 255), st.integers(0, 7))
    def test_frames_mutated(self, data, index, value, bit):
        datalink = data.draw(st.sampled_from(sorted(LINK_LAYERS)))
        for mutated in mutations(data.draw(ipv4_frames(datalink)), index, value, bit):
            self.checkCuts(datalink, mutated)

    def test_each_outcome_is_reached(self):
        """Every result, one frame each, agreed (so agreeing is not agreeing on one drop)."""
        link = LINK_LAYERS[DLT_EN10MB]
        good = frame(DLT_EN10MB, ipv4("10.0.0.1", "10.0.0.2", gre.build_gre(7, b"ab", 1)))
        cases = {
            native.IPV4_GRE: good,
            native.IPV4_FRAGMENT: frame(DLT_EN10MB, ipv4("10.0.0.1", "10.0.0.2", b"abcdefgh", off=0x2000)),
            native.IPV4_EMPTY: frame(DLT_EN10MB, ipv4("10.0.0.1", "10.0.0.2", b"")),
            -1: frame(DLT_EN10MB, ipv4("10.0.0.1", "10.0.0.2", b"x"), 0x86DD),
            -2: good[:30],
            -3: good[:14] + b"\x44" + good[15:],
            -4: frame(DLT_EN10MB, ipv4("10.0.0.1", "10.0.0.2", b"x", proto=6)),
        }
        for code, data in cases.items():
            self.assertEqual(native.ipv4_gre(data, link)[0], code)
            self.check(DLT_EN10MB, data)
