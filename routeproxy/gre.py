"""Enhanced GRE as PPTP uses it (RFC 2637 section 4.1): parse and pack.

::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    |C|R|K|S|s|Recur|A| Flags | Ver |   Protocol Type (0x880B PPP)  |
    |  Key (HW) Payload Length      |  Key (LW) Call ID (receiver's)|
    |                  Sequence Number (present if S)               |
    |               Acknowledgment Number (present if A)            |

C, R, s, Recur and Flags are zero, K is one, Ver is 1.  The header is 8, 12 or 16 bytes:
``0x3001`` is a data packet (K+S), ``0x3081`` data with a piggy-backed ack (K+S+A),
``0x2081`` an ack only (K+A, no payload).  The call ID in the key is the *receiver's*.

Decisions where the RFC leaves room (they match what pptpd and the Linux pptp module accept):

* A payload length larger than the bytes present is an error ("payload truncated").
* Bytes after the payload are not part of the GRE packet (Ethernet padding, for one); they
  are ignored, so ``parse_gre(data).pack()`` may be shorter than *data*.
* S clear means "acknowledgement only" (RFC 2637: S is set if and only if a payload is
  present), so a non-zero payload length without S is rejected.  A header with neither S
  nor A (8 bytes, nothing to say) is accepted, so that every ``GREPacket`` packs.

Why not ``dpkt.gre`` (1.9.8): for version 1 it reads the key words whether or not K is set
(it accepts 0x1001 and reports a call ID), never checks the protocol (its own tests use
0x880A), the C/R/s/Recur/reserved bits or the payload length against the data, and builds an
object graph per packet (old releases also packed it in native byte order).
The proxy forwards every datagram through here, so the codec is a few precompiled
``struct.Struct`` calls; dpkt is used in the tests as a second, independent decoder.

The per-packet helpers are :func:`split_gre` (validate and take apart), :func:`build_gre`
(put together) and :func:`with_call_id` (rewrite only the key's call ID).
"""
import struct

__all__ = [
    "GREError", "GREPacket", "parse_gre", "split_gre", "build_gre", "with_call_id",
    "PPP_PROTOCOL", "GRE_VERSION", "FLAG_K", "FLAG_S", "FLAG_A",
    "HEADER_MIN", "HEADER_MAX",
]

PPP_PROTOCOL = 0x880B
GRE_VERSION = 1

FLAG_C = 0x8000  # checksum present
FLAG_R = 0x4000  # routing present
FLAG_K = 0x2000  # key present
FLAG_S = 0x1000  # sequence number present
FLAG_SSR = 0x0800  # strict source route
RECUR_MASK = 0x0700  # recursion control
FLAG_A = 0x0080  # acknowledgment number present (PPTP's addition)
FLAGS_MASK = 0x0078  # reserved flags, must be zero
VERSION_MASK = 0x0007

HEADER_MIN = 8
HEADER_MAX = 16
MAX_PAYLOAD = 0xFFFF

# Reasons carried by GREError, so callers can count drops per reason.
TRUNCATED = "truncated"
NOT_VERSION_1 = "not version 1"
CHECKSUM_ROUTING = "checksum/routing bits set"
KEY_MISSING = "key bit missing"
SOURCE_ROUTE_RECURSION = "strict source route/recursion bits set"
RESERVED_FLAGS = "reserved flag bits set"
NOT_PPP = "protocol is not PPP 0x880B"
PAYLOAD_TRUNCATED = "payload length mismatch: longer than the data"
PAYLOAD_WITHOUT_SEQUENCE = "payload without sequence number"
OUT_OF_RANGE = "field out of range"  # building: a field does not fit its width

_HEAD = struct.Struct("!HHHH")  # flags+version, protocol, payload length, call ID
_WORD = struct.Struct("!I")
_TWO_WORDS = struct.Struct("!II")
_CALL_ID = struct.Struct("!H")
_HEAD_SEQ = struct.Struct("!HHHHI")    # a data packet's header: the fixed 8 bytes, seq
_DATA_HEAD = struct.Struct("!HHHHII")  # ... with a piggy-backed ack (also read as 16 bytes)

# The only variable bits of a valid first word are S and A; everything else is fixed.
_VARIABLE = FLAG_S | FLAG_A
_FIXED = FLAG_K | GRE_VERSION


class GREError(ValueError):
    """A datagram that is not a well-formed PPTP enhanced-GRE (or IPv4/GRE) packet."""

    def __init__(self, reason, detail=None):
        self.reason = reason
        self.detail = detail
        super().__init__(reason if detail is None else f"{reason} ({detail})")


def _diagnose(flags_version):
    """Name the first thing wrong with a first word that failed the fast check."""
    if flags_version & VERSION_MASK != GRE_VERSION:
        return NOT_VERSION_1
    if flags_version & (FLAG_C | FLAG_R):
        return CHECKSUM_ROUTING
    if not flags_version & FLAG_K:
        return KEY_MISSING
    if flags_version & (FLAG_SSR | RECUR_MASK):
        return SOURCE_ROUTE_RECURSION
    if flags_version & FLAGS_MASK:
        return RESERVED_FLAGS
    return RESERVED_FLAGS  # pragma: no cover - unreachable: the checks above cover every bit


def split_gre(data):
    """Validate *data* and return ``(call_id, seq, ack, payload)``; seq/ack are None if absent.

    The per-packet path: a data packet (0x3001 or 0x3081, PPP) whose payload is all there is
    taken apart with one unpack; anything else with one unpack for the fixed 8 bytes and one
    for seq/ack, and the reason of a rejection named.  Bytes after the payload length are
    dropped (see the module docstring).
    """
    size = len(data)
    if size >= 16:
        flags_version, protocol, length, call_id, seq, ack = _DATA_HEAD.unpack_from(data)
        if protocol == PPP_PROTOCOL:
            if flags_version == 0x3081 and 16 + length <= size:
                return call_id, seq, ack, data[16:16 + length]
            if flags_version == 0x3001 and 12 + length <= size:
                return call_id, seq, None, data[12:12 + length]
    try:
        flags_version, protocol, length, call_id = _HEAD.unpack_from(data)
    except struct.error:
        raise GREError(TRUNCATED, f"{len(data)} bytes, header needs at least {HEADER_MIN}") from None
    if flags_version & ~_VARIABLE != _FIXED:
        raise GREError(_diagnose(flags_version), f"flags and version 0x{flags_version:04x}")
    if protocol != PPP_PROTOCOL:
        raise GREError(NOT_PPP, f"0x{protocol:04x}")
    seq = ack = None
    if flags_version & FLAG_S:
        if flags_version & FLAG_A:
            if len(data) < 16:
                raise GREError(TRUNCATED, f"{len(data)} bytes, header needs 16")
            seq, ack = _TWO_WORDS.unpack_from(data, 8)
            start = 16
        else:
            if len(data) < 12:
                raise GREError(TRUNCATED, f"{len(data)} bytes, header needs 12")
            (seq,) = _WORD.unpack_from(data, 8)
            start = 12
    else:
        if length:
            raise GREError(PAYLOAD_WITHOUT_SEQUENCE, f"payload length {length}")
        if flags_version & FLAG_A:
            if len(data) < 12:
                raise GREError(TRUNCATED, f"{len(data)} bytes, header needs 12")
            (ack,) = _WORD.unpack_from(data, 8)
        return call_id, None, ack, b""
    end = start + length
    if end > len(data):
        raise GREError(PAYLOAD_TRUNCATED, f"payload length {length}, {len(data) - start} bytes present")
    return call_id, seq, ack, data[start:end]


def build_gre(call_id, payload=b"", seq=None, ack=None):
    """Bytes of an enhanced-GRE packet; the per-packet counterpart of :func:`split_gre`.

    Fields are assumed to be in range (``struct.error`` is turned into GREError if not).
    A payload needs a sequence number.
    """
    try:
        if seq is not None:
            if ack is None:
                return _HEAD_SEQ.pack(0x3001, PPP_PROTOCOL, len(payload), call_id, seq) + payload
            return _DATA_HEAD.pack(0x3081, PPP_PROTOCOL, len(payload), call_id, seq, ack) + payload
        if payload:
            raise GREError(PAYLOAD_WITHOUT_SEQUENCE, f"payload length {len(payload)}")
        if ack is None:
            return _HEAD.pack(0x2001, PPP_PROTOCOL, 0, call_id)
        return _HEAD.pack(0x2081, PPP_PROTOCOL, 0, call_id) + _WORD.pack(ack)
    except struct.error as e:
        raise GREError(OUT_OF_RANGE, str(e)) from None


def with_call_id(data, call_id):
    """*data* (an already validated GRE packet) with only the key's call ID replaced."""
    if len(data) < HEADER_MIN:
        raise GREError(TRUNCATED, f"{len(data)} bytes, header needs at least {HEADER_MIN}")
    try:
        return b"".join((data[:6], _CALL_ID.pack(call_id), data[8:]))
    except struct.error as e:
        raise GREError(OUT_OF_RANGE, str(e)) from None


class GREPacket:
    """One enhanced-GRE packet: immutable, compared and hashed by value."""

    __slots__ = ("call_id", "payload", "seq", "ack")

    def __init__(self, call_id, payload=b"", seq=None, ack=None):
        if not 0 <= call_id <= 0xFFFF:
            raise GREError(OUT_OF_RANGE, f"call ID {call_id}")
        payload = bytes(payload)
        if len(payload) > MAX_PAYLOAD:
            raise GREError(OUT_OF_RANGE, f"payload of {len(payload)} bytes")
        for name, value in (("sequence number", seq), ("acknowledgment number", ack)):
            if value is not None and not 0 <= value <= 0xFFFFFFFF:
                raise GREError(OUT_OF_RANGE, f"{name} {value}")
        if payload and seq is None:
            raise GREError(PAYLOAD_WITHOUT_SEQUENCE, f"payload length {len(payload)}")
        set_ = object.__setattr__
        set_(self, "call_id", call_id)
        set_(self, "payload", payload)
        set_(self, "seq", seq)
        set_(self, "ack", ack)

    def __setattr__(self, name, value):
        raise AttributeError("GREPacket is immutable; use replace() for a changed copy")

    def __delattr__(self, name):
        raise AttributeError("GREPacket is immutable")

    def _key(self):
        return (self.call_id, self.payload, self.seq, self.ack)

    def __eq__(self, other):
        if not isinstance(other, GREPacket):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return (f"GREPacket(call_id={self.call_id}, payload=<{len(self.payload)} bytes>, "
                f"seq={self.seq}, ack={self.ack})")

    def replace(self, **changes):
        """A copy with some fields changed (``pkt.replace(call_id=7)``)."""
        fields = dict(call_id=self.call_id, payload=self.payload, seq=self.seq, ack=self.ack)
        fields.update(changes)
        return GREPacket(**fields)

    @property
    def flags_and_version(self):
        """The first 16 bits as they go on the wire (0x3001, 0x3081, 0x2081 or 0x2001)."""
        return _FIXED | (FLAG_S if self.seq is not None else 0) | (FLAG_A if self.ack is not None else 0)

    @property
    def header_length(self):
        return HEADER_MIN + (4 if self.seq is not None else 0) + (4 if self.ack is not None else 0)

    def pack(self):
        return build_gre(self.call_id, self.payload, self.seq, self.ack)


def parse_gre(data):
    """Parse *data* into a GREPacket, or raise GREError with a reason."""
    call_id, seq, ack, payload = split_gre(data)
    # split_gre has checked every field, so skip the constructor's checks.
    pkt = object.__new__(GREPacket)
    set_ = object.__setattr__
    set_(pkt, "call_id", call_id)
    set_(pkt, "payload", bytes(payload))
    set_(pkt, "seq", seq)
    set_(pkt, "ack", ack)
    return pkt
