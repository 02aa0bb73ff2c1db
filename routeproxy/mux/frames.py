"""The mux wire format: a 12-byte header, typed frames, encode/decode, limits.

Every frame is a fixed header followed by ``length`` payload bytes::

    offset  size  field
    0       1     type      frame type (0x80 bit: receivers may ignore unknown types)
    1       1     flags     per-type bits; unknown bits are ignored
    2       2     reserved  0 when sent, ignored when received
    4       4     session   session id (0 = the link itself)
    8       4     length    payload length, 0 .. the receiver's max payload

All integers are big-endian.  The header never changes between versions, so a
receiver can always skip or refuse a frame it does not understand.  The full
specification is docs/protocol.md.

Decoding raises :class:`FrameError` (or a subclass) with a reason and the
link-level error code the connection should send in GOAWAY; it never lets a
``struct.error`` or ``IndexError`` escape.  :class:`MalformedFrame` carries the
frame's session id, because some malformed frames only close their session.
"""
import struct

HEADER = struct.Struct("!BBHII")
HEADER_SIZE = HEADER.size  # 12

MAGIC = b"RPMX"
PROTOCOL_VERSIONS = (1, 2)
#: Version 2's capability: numbered control streams, resume tokens, RESUME (docs/protocol.md s.10).
RESUME_CAPABILITY = "resume"
#: Resume tokens: at least 128 bits, at most 64 bytes.
MIN_TOKEN, MAX_TOKEN = 16, 64

#: Largest payload every implementation must accept (HELLO must fit in it).
MIN_MAX_PAYLOAD = 16384
#: Largest payload anyone may advertise.
MAX_MAX_PAYLOAD = 1 << 24
#: Largest CONTROL window (as in SSH and HTTP/2).
MAX_WINDOW = (1 << 31) - 1
MAX_NAME = 255
PING_DATA_SIZE = 8

# Frame types.  Types with the IGNORABLE bit set may be ignored by a receiver
# that does not know them; unknown types without it close the link.
IGNORABLE = 0x80
HELLO = 0x01
GOAWAY = 0x02
PING = 0x03
PONG = 0x04
TOKEN = 0x05      # version 2 "resume": acceptor -> opener, the link's resume token
RESUME = 0x06     # version 2 "resume": opener -> acceptor, re-attach a lost link's sessions
RESUMED = 0x07    # version 2 "resume": acceptor -> opener, the answer to RESUME
OPEN = 0x10
OPEN_OK = 0x11
OPEN_REFUSED = 0x12
CLOSE = 0x13
CONTROL = 0x14
WINDOW_UPDATE = 0x15
GRE = 0x20

# GRE frame flags.
GRE_HAS_SEQ = 0x01
GRE_HAS_ACK = 0x02


class LinkError:
    """GOAWAY error codes: everything here closes the whole link."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    FRAME_TOO_LARGE = 2
    UNKNOWN_FRAME_TYPE = 3
    VERSION_MISMATCH = 4
    BAD_HELLO = 5
    INTERNAL_ERROR = 6
    LIVENESS_TIMEOUT = 7


class Reason:
    """Session reason codes (OPEN_REFUSED and CLOSE); these close one session."""

    NORMAL = 0
    UNKNOWN_PROFILE = 1
    UPSTREAM_UNREACHABLE = 2
    UPSTREAM_REFUSED = 3
    TOO_MANY_SESSIONS = 4
    MALFORMED_OPEN = 5
    NOT_ACCEPTING = 6
    FLOW_CONTROL_ERROR = 7
    NOT_OPEN = 8
    LINK_LOST = 9  # local only: never sent on the wire
    PROTOCOL_ERROR = 10
    INTERNAL_ERROR = 11
    NOT_PERMITTED = 12


class ResumeResult:
    """RESUMED codes."""

    OK = 0
    UNKNOWN_TOKEN = 1   # never issued here, expired, or issued by another acceptor
    WRONG_PEER = 2      # the token belongs to another certificate name


def _names(cls):
    return {v: k for k, v in vars(cls).items() if k.isupper()}


LINK_ERROR_NAMES = _names(LinkError)
REASON_NAMES = _names(Reason)
TYPE_NAMES = {
    HELLO: "HELLO", GOAWAY: "GOAWAY", PING: "PING", PONG: "PONG", OPEN: "OPEN",
    OPEN_OK: "OPEN_OK", OPEN_REFUSED: "OPEN_REFUSED", CLOSE: "CLOSE",
    CONTROL: "CONTROL", WINDOW_UPDATE: "WINDOW_UPDATE", GRE: "GRE",
    TOKEN: "TOKEN", RESUME: "RESUME", RESUMED: "RESUMED",
}
LINK_TYPES = frozenset((HELLO, GOAWAY, PING, PONG, TOKEN, RESUME, RESUMED))
RESUME_RESULT_NAMES = _names(ResumeResult)


def linkErrorName(code):
    return LINK_ERROR_NAMES.get(code, f"code {code}")


def reasonName(code):
    return REASON_NAMES.get(code, f"reason {code}")


class FrameError(Exception):
    """The byte stream broke a framing rule; *code* is the LinkError to send."""

    def __init__(self, reason, code=LinkError.PROTOCOL_ERROR):
        super().__init__(reason)
        self.reason = reason
        self.code = code


class FrameTooLarge(FrameError):
    def __init__(self, length, limit):
        super().__init__(
            f"frame payload length {length} exceeds the limit {limit}",
            LinkError.FRAME_TOO_LARGE)


class MalformedFrame(FrameError):
    """A frame whose header was fine but whose payload is not; framing is intact."""

    def __init__(self, reason, frameType, session, code=LinkError.PROTOCOL_ERROR):
        name = TYPE_NAMES.get(frameType, hex(frameType))
        super().__init__(f"malformed {name} on session {session}: {reason}", code)
        self.frameType = frameType
        self.session = session


def encodeHeader(frameType, flags, session, length):
    return HEADER.pack(frameType, flags, 0, session, length)


# --- frame objects ---------------------------------------------------------

class Frame:
    """Base: subclasses set TYPE and implement payload()/fromPayload()."""

    __slots__ = ("session",)
    TYPE = None
    flags = 0

    def payload(self):
        return b""

    def encode(self):
        body = self.payload()
        return encodeHeader(self.TYPE, self.flags, self.session, len(body)) + body

    def __eq__(self, other):
        return type(self) is type(other) and all(
            getattr(self, s) == getattr(other, s) for s in _allSlots(type(self)))

    def __repr__(self):
        fields = ", ".join(f"{s}={getattr(self, s)!r}" for s in _allSlots(type(self)))
        return f"{type(self).__name__}({fields})"


def _allSlots(cls):
    out = []
    for klass in reversed(cls.__mro__):
        out.extend(getattr(klass, "__slots__", ()))
    return out


class _Reader:
    """Bounds-checked reads from a payload, raising MalformedFrame."""

    def __init__(self, data, frameType, session, code=LinkError.PROTOCOL_ERROR):
        self.data, self.pos = data, 0
        self.frameType, self.session, self.code = frameType, session, code

    def fail(self, reason):
        raise MalformedFrame(reason, self.frameType, self.session, self.code)

    def take(self, n, what):
        if self.pos + n > len(self.data):
            self.fail(f"truncated {what} (needs {n} bytes at offset {self.pos},"
                      f" payload is {len(self.data)})")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u8(self, what):
        return self.take(1, what)[0]

    def u16(self, what):
        return int.from_bytes(self.take(2, what), "big")

    def u32(self, what):
        return int.from_bytes(self.take(4, what), "big")

    def text(self, what, minimum=0):
        n = self.u8(f"{what} length")
        if n < minimum:
            self.fail(f"empty {what}")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")

    def rest(self):
        chunk = self.data[self.pos:]
        self.pos = len(self.data)
        return bytes(chunk)


def _name(text, what):
    raw = text.encode("utf-8")
    if len(raw) > MAX_NAME:
        raise ValueError(f"{what} is longer than {MAX_NAME} bytes")
    return bytes((len(raw),)) + raw


class Hello(Frame):
    """First frame in each direction: versions, limits and capabilities."""

    __slots__ = ("versions", "maxPayload", "initialWindow", "pingInterval",
                 "deadTimeout", "capabilities")
    TYPE = HELLO

    def __init__(self, versions=PROTOCOL_VERSIONS, maxPayload=MIN_MAX_PAYLOAD,
                 initialWindow=65536, pingInterval=10, deadTimeout=30,
                 capabilities=(), session=0):
        self.session = session
        self.versions = tuple(versions)
        self.maxPayload = maxPayload
        self.initialWindow = initialWindow
        self.pingInterval = pingInterval
        self.deadTimeout = deadTimeout
        self.capabilities = tuple(capabilities)

    def payload(self):
        out = [MAGIC, bytes((len(self.versions),))]
        out += [v.to_bytes(2, "big") for v in self.versions]
        out.append(struct.pack("!IIHH", self.maxPayload, self.initialWindow,
                               int(self.pingInterval), int(self.deadTimeout)))
        out.append(bytes((len(self.capabilities),)))
        out += [_name(c, "capability") for c in self.capabilities]
        return b"".join(out)

    @classmethod
    def fromPayload(cls, session, flags, data):
        r = _Reader(data, HELLO, session, LinkError.BAD_HELLO)
        if r.take(4, "magic") != MAGIC:
            r.fail("bad magic (the peer does not speak this protocol)")
        count = r.u8("version count")
        if count == 0:
            r.fail("no versions offered")
        versions = tuple(r.u16("version") for _ in range(count))
        maxPayload = r.u32("max payload")
        initialWindow = r.u32("initial window")
        pingInterval = r.u16("ping interval")
        deadTimeout = r.u16("dead timeout")
        if not MIN_MAX_PAYLOAD <= maxPayload <= MAX_MAX_PAYLOAD:
            r.fail(f"max payload {maxPayload} outside {MIN_MAX_PAYLOAD}..{MAX_MAX_PAYLOAD}")
        if not 1 <= initialWindow <= MAX_WINDOW:
            r.fail(f"initial window {initialWindow} outside 1..{MAX_WINDOW}")
        ncaps = r.u8("capability count")
        caps = tuple(r.text("capability", 1) for _ in range(ncaps))
        r.rest()  # later versions may append fields
        return cls(versions, maxPayload, initialWindow, pingInterval,
                   deadTimeout, caps, session)


class _CodeText(Frame):
    """GOAWAY, OPEN_REFUSED and CLOSE: a 16-bit code and optional UTF-8 text."""

    __slots__ = ("code", "text")

    def __init__(self, session, code, text=""):
        self.session, self.code, self.text = session, code, text

    def payload(self):
        return self.code.to_bytes(2, "big") + self.text.encode("utf-8")

    @classmethod
    def fromPayload(cls, session, flags, data):
        r = _Reader(data, cls.TYPE, session)
        code = r.u16("code")
        frame = cls.__new__(cls)
        frame.session, frame.code = session, code
        frame.text = r.rest().decode("utf-8", "replace")
        return frame


class GoAway(_CodeText):
    __slots__ = ()
    TYPE = GOAWAY

    def __init__(self, code, text="", session=0):
        super().__init__(session, code, text)


class OpenRefused(_CodeText):
    __slots__ = ()
    TYPE = OPEN_REFUSED


class Close(_CodeText):
    __slots__ = ()
    TYPE = CLOSE


class _Opaque8(Frame):
    __slots__ = ("data",)

    def __init__(self, data, session=0):
        self.session, self.data = session, data

    def payload(self):
        return self.data

    @classmethod
    def fromPayload(cls, session, flags, data):
        if len(data) != PING_DATA_SIZE:
            raise MalformedFrame(f"{len(data)} bytes, expected {PING_DATA_SIZE}",
                                 cls.TYPE, session)
        return cls(bytes(data), session)


class Ping(_Opaque8):
    __slots__ = ()
    TYPE = PING


class Pong(_Opaque8):
    __slots__ = ()
    TYPE = PONG


class Open(Frame):
    """Ask the acceptor for a session to the upstream *profile* (a name only)."""

    __slots__ = ("profile", "clientInfo")
    TYPE = OPEN

    def __init__(self, session, profile, clientInfo=""):
        self.session, self.profile, self.clientInfo = session, profile, clientInfo

    def payload(self):
        if not self.profile:
            raise ValueError("empty profile name")
        return _name(self.profile, "profile") + _name(self.clientInfo, "client info")

    @classmethod
    def fromPayload(cls, session, flags, data):
        r = _Reader(data, OPEN, session)
        profile = r.text("profile", 1)
        clientInfo = r.text("client info")
        r.rest()
        return cls(session, profile, clientInfo)


class OpenOk(Frame):
    __slots__ = ()
    TYPE = OPEN_OK

    def __init__(self, session):
        self.session = session

    @classmethod
    def fromPayload(cls, session, flags, data):
        return cls(session)  # later versions may add fields


class Control(Frame):
    """Bytes of the session's PPTP control stream (reliable, ordered, windowed)."""

    __slots__ = ("data",)
    TYPE = CONTROL

    def __init__(self, session, data):
        self.session, self.data = session, data

    def payload(self):
        return self.data

    @classmethod
    def fromPayload(cls, session, flags, data):
        return cls(session, bytes(data))


class WindowUpdate(Frame):
    """CONTROL credit; with "resume" also the offset of control bytes received (*ack*)."""

    __slots__ = ("increment", "ack")
    TYPE = WINDOW_UPDATE

    def __init__(self, session, increment, ack=None):
        self.session, self.increment, self.ack = session, increment, ack

    def payload(self):
        out = self.increment.to_bytes(4, "big")
        return out if self.ack is None else out + self.ack.to_bytes(8, "big")

    @classmethod
    def fromPayload(cls, session, flags, data):
        if len(data) not in (4, 12):
            raise MalformedFrame(f"{len(data)} bytes, expected 4 or 12", WINDOW_UPDATE, session)
        increment = int.from_bytes(data[:4], "big")
        if not 1 <= increment <= MAX_WINDOW:
            raise MalformedFrame(f"increment {increment} outside 1..{MAX_WINDOW}",
                                 WINDOW_UPDATE, session)
        ack = int.from_bytes(data[4:], "big") if len(data) == 12 else None
        return cls(session, increment, ack)


class Token(Frame):
    """The acceptor's resume token for this link (version 2, "resume")."""

    __slots__ = ("token",)
    TYPE = TOKEN

    def __init__(self, token, session=0):
        self.session, self.token = session, bytes(token)

    def payload(self):
        return self.token

    @classmethod
    def fromPayload(cls, session, flags, data):
        if not MIN_TOKEN <= len(data) <= MAX_TOKEN:
            raise MalformedFrame(f"token of {len(data)} bytes, expected {MIN_TOKEN}..{MAX_TOKEN}",
                                 TOKEN, session)
        return cls(data, session)


_OFFSET_ENTRY = struct.Struct("!IQ")


def _offsets(r, what):
    count = r.u32(f"{what} count")
    if count * _OFFSET_ENTRY.size > len(r.data) - r.pos:
        r.fail(f"{count} {what} entries do not fit the payload")
    return tuple(_OFFSET_ENTRY.unpack(r.take(_OFFSET_ENTRY.size, what)) for _ in range(count))


def _packOffsets(entries):
    return len(entries).to_bytes(4, "big") + b"".join(_OFFSET_ENTRY.pack(s, o) for s, o in entries)


class Resume(Frame):
    """Re-attach the sessions of a lost link: its token, and per session the received offset."""

    __slots__ = ("token", "offsets")
    TYPE = RESUME

    def __init__(self, token, offsets=(), session=0):
        self.session, self.token, self.offsets = session, bytes(token), tuple(offsets)

    def payload(self):
        return bytes((len(self.token),)) + self.token + _packOffsets(self.offsets)

    @classmethod
    def fromPayload(cls, session, flags, data):
        r = _Reader(data, RESUME, session)
        n = r.u8("token length")
        if not MIN_TOKEN <= n <= MAX_TOKEN:
            r.fail(f"token of {n} bytes, expected {MIN_TOKEN}..{MAX_TOKEN}")
        token = bytes(r.take(n, "token"))
        offsets = _offsets(r, "session")
        r.rest()
        return cls(token, offsets, session)


class Resumed(Frame):
    """The answer to RESUME: a ResumeResult and, on OK, per session the received offset."""

    __slots__ = ("code", "offsets", "text")
    TYPE = RESUMED

    def __init__(self, code, offsets=(), text="", session=0):
        self.session, self.code, self.offsets, self.text = session, code, tuple(offsets), text

    def payload(self):
        return self.code.to_bytes(2, "big") + _packOffsets(self.offsets) + self.text.encode("utf-8")

    @classmethod
    def fromPayload(cls, session, flags, data):
        r = _Reader(data, RESUMED, session)
        code = r.u16("code")
        offsets = _offsets(r, "session")
        return cls(code, offsets, r.rest().decode("utf-8", "replace"), session)


class Datagram(Frame):
    """One GRE datagram without its GRE header: call tag, optional seq/ack, payload."""

    __slots__ = ("callTag", "seq", "ack", "data")
    TYPE = GRE

    def __init__(self, session, callTag, seq, ack, data):
        self.session, self.callTag, self.seq, self.ack, self.data = (
            session, callTag, seq, ack, data)

    @property
    def flags(self):
        return (GRE_HAS_SEQ if self.seq is not None else 0) | (
            GRE_HAS_ACK if self.ack is not None else 0)

    def payload(self):
        return encodeGREPayload(self.callTag, self.seq, self.ack, self.data)

    @classmethod
    def fromPayload(cls, session, flags, data):
        r = _Reader(data, GRE, session)
        callTag = r.u16("call tag")
        seq = r.u32("sequence number") if flags & GRE_HAS_SEQ else None
        ack = r.u32("acknowledgment number") if flags & GRE_HAS_ACK else None
        return cls(session, callTag, seq, ack, r.rest())


# GRE frame fields by (flags & (GRE_HAS_SEQ | GRE_HAS_ACK)): call tag, [seq], [ack].
_GRE_FIELDS = (struct.Struct("!H"), struct.Struct("!HI"), struct.Struct("!HI"),
               struct.Struct("!HII"))


def encodeGREPayload(callTag, seq, ack, data):
    head = callTag.to_bytes(2, "big")
    if seq is not None:
        head += seq.to_bytes(4, "big")
    if ack is not None:
        head += ack.to_bytes(4, "big")
    return head + data


# The frame header and the GRE fields in one pack, by flags (seq, ack or both present).
_GRE_HEAD_TAG = struct.Struct("!BBHIIH")
_GRE_HEAD_TAG_ONE = struct.Struct("!BBHIIHI")
_GRE_HEAD_TAG_SEQ_ACK = struct.Struct("!BBHIIHII")


def encodeGREHead(session, callTag, seq, ack, dataLength):
    """A GRE frame up to its payload (header and fields in one pack): the hot path.

    The frame is this followed by *dataLength* payload bytes, so a sender can hand both
    to one writeSequence without copying the payload into a new frame.
    """
    if seq is not None:
        if ack is not None:
            return _GRE_HEAD_TAG_SEQ_ACK.pack(GRE, GRE_HAS_SEQ | GRE_HAS_ACK, 0, session,
                                              dataLength + 10, callTag, seq, ack)
        return _GRE_HEAD_TAG_ONE.pack(GRE, GRE_HAS_SEQ, 0, session, dataLength + 6,
                                      callTag, seq)
    if ack is not None:
        return _GRE_HEAD_TAG_ONE.pack(GRE, GRE_HAS_ACK, 0, session, dataLength + 6,
                                      callTag, ack)
    return _GRE_HEAD_TAG.pack(GRE, 0, 0, session, dataLength + 2, callTag)


def encodeGRE(session, callTag, seq, ack, data):
    """The whole GRE frame, without building a Datagram object."""
    return encodeGREHead(session, callTag, seq, ack, len(data)) + data


def encodeControl(session, data):
    return HEADER.pack(CONTROL, 0, 0, session, len(data)) + data


class UnknownFrame(Frame):
    """A frame of a type this implementation does not know."""

    __slots__ = ("frameType", "rawFlags", "data")

    def __init__(self, frameType, flags, session, data):
        self.frameType, self.rawFlags, self.session, self.data = (
            frameType, flags, session, data)

    @property
    def ignorable(self):
        return bool(self.frameType & IGNORABLE)

    def encode(self):
        return encodeHeader(self.frameType, self.rawFlags, self.session,
                            len(self.data)) + self.data


FRAME_CLASSES = {cls.TYPE: cls for cls in (
    Hello, GoAway, Ping, Pong, Open, OpenOk, OpenRefused, Close, Control,
    WindowUpdate, Datagram, Token, Resume, Resumed)}


def decodeFrame(frameType, flags, session, payload):
    """One frame object from its header fields and payload.

    Unknown types come back as UnknownFrame (the caller decides by
    ``.ignorable``); link frames on a session, or session frames on session 0,
    raise FrameError (the link cannot be trusted).
    """
    cls = FRAME_CLASSES.get(frameType)
    if cls is None:
        return UnknownFrame(frameType, flags, session, bytes(payload))
    if frameType in LINK_TYPES:
        if session != 0:
            raise FrameError(f"{TYPE_NAMES[frameType]} on session {session}"
                             " (link frames use session 0)")
    elif session == 0:
        raise FrameError(f"{TYPE_NAMES[frameType]} on session 0 (reserved for the link)")
    return cls.fromPayload(session, flags, payload)


class FrameDecoder:
    """Splits a byte stream into frames.

    ``feed(data)`` buffers bytes; ``nextFrame()`` returns the next complete
    frame or None.  A length over *maxPayload* raises FrameTooLarge as soon as
    the header is seen, before its payload is buffered.  After any other
    FrameError the decoder is unusable (the link must close).  MalformedFrame
    is raised after its frame was consumed, so a caller that only closes the
    session (or ignores the frame) may go on calling ``nextFrame()``.
    """

    def __init__(self, maxPayload=MIN_MAX_PAYLOAD):
        self.maxPayload = maxPayload
        # Received bytes are kept as bytes (a payload is then one slice, no second copy):
        # _buffer[_pos:] is what is joined so far; _parts waits, unjoined, until it completes
        # the frame being awaited (_need more bytes), so each byte is joined at most twice
        # however small the reads are.
        self._buffer = b""
        self._pos = 0
        self._parts = []
        self._partsLen = 0
        self._need = 0
        self._failed = None

    @property
    def buffered(self):
        return len(self._buffer) - self._pos + self._partsLen

    def feed(self, data):
        if not data:
            return
        self._parts.append(data)
        self._partsLen += len(data)

    def _join(self):
        parts = self._parts
        if len(self._buffer) > self._pos:
            parts.insert(0, self._buffer[self._pos:])
        self._buffer = parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts)
        self._pos = 0
        self._parts, self._partsLen = [], 0

    def nextFrame(self):
        if self._failed is not None:
            raise FrameError(f"decoder already failed: {self._failed}")
        buf, pos = self._buffer, self._pos
        available = len(buf) - pos
        if available < HEADER_SIZE or (self._need and available < self._need):
            if available + self._partsLen < max(HEADER_SIZE, self._need):
                return None
            self._join()
            buf, pos = self._buffer, 0
        frameType, flags, _reserved, session, length = HEADER.unpack_from(buf, pos)
        if length > self.maxPayload:
            self._failed = f"length {length}"
            raise FrameTooLarge(length, self.maxPayload)
        end = pos + HEADER_SIZE + length
        if len(buf) < end:
            if len(buf) + self._partsLen < end:
                self._need = end - pos  # wait, unjoined, until the whole frame is here
                return None
            self._join()
            buf, pos, end = self._buffer, 0, end - pos
        self._need = 0
        if frameType == GRE and session:
            # The hot path: the GRE fields straight from the buffer with one precompiled
            # unpack, the payload copied once; a short payload takes the general path below,
            # which raises MalformedFrame with the exact reason.
            start = pos + HEADER_SIZE
            fields = _GRE_FIELDS[flags & 3]
            if length >= fields.size:
                if flags & 3 == 3:
                    callTag, seq, ack = fields.unpack_from(buf, start)
                elif flags & 1:
                    callTag, seq = fields.unpack_from(buf, start)
                    ack = None
                elif flags & 2:
                    callTag, ack = fields.unpack_from(buf, start)
                    seq = None
                else:
                    callTag, = fields.unpack_from(buf, start)
                    seq = ack = None
                self._pos = end
                return Datagram(session, callTag, seq, ack, buf[start + fields.size:end])
        payload = buf[pos + HEADER_SIZE:end]
        self._pos = end
        try:
            return decodeFrame(frameType, flags, session, payload)
        except MalformedFrame:
            raise
        except FrameError as e:
            self._failed = e.reason
            raise

    def frames(self, data=b""):
        """Feed *data* and return every complete frame (errors propagate)."""
        self.feed(data)
        out = []
        while (frame := self.nextFrame()) is not None:
            out.append(frame)
        return out
