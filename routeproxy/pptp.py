"""PPTP control messages (RFC 2637 section 2): typed messages, parse and pack,
a reassembler for the TCP stream, and the one table that says which field of
which message carries whose call ID.

Every message is a frozen dataclass whose fields follow the RFC's wire order
(reserved fields included, so ``pack(parse(b)) == b``).  The wire layout of a
class is derived from its field declarations; nothing else in this module
repeats an offset.  RFC 2637 calls the client the PNS and the server (pptpd)
the PAC; so do we.

Bad input raises :class:`PPTPError` with a ``reason`` from :data:`REASONS`.
"""
import dataclasses
import enum
import struct
from typing import ClassVar, NamedTuple

PPTP_PORT = 1723
CONTROL_MESSAGE = 1         # "PPTP Message Type" of every message in RFC 2637 s.2
MANAGEMENT_MESSAGE = 2      # named by the RFC, never defined; rejected here
MAGIC_COOKIE = 0x1A2B3C4D
PROTOCOL_VERSION = 0x0100   # version 1, revision 0 (RFC 2637 s.2.1)
HEADER_LENGTH = 12          # Length, PPTP Message Type, Magic Cookie, Control Message Type, Reserved0

PNS = "pns"   # the client side: the call originator's ID space
PAC = "pac"   # the server side (pptpd)
_OTHER_SIDE = {PNS: PAC, PAC: PNS}


class ControlType(enum.IntEnum):
    """Control Message Type values (RFC 2637 s.1.4)."""
    START_CONTROL_CONNECTION_REQUEST = 1
    START_CONTROL_CONNECTION_REPLY = 2
    STOP_CONTROL_CONNECTION_REQUEST = 3
    STOP_CONTROL_CONNECTION_REPLY = 4
    ECHO_REQUEST = 5
    ECHO_REPLY = 6
    OUTGOING_CALL_REQUEST = 7
    OUTGOING_CALL_REPLY = 8
    INCOMING_CALL_REQUEST = 9
    INCOMING_CALL_REPLY = 10
    INCOMING_CALL_CONNECTED = 11
    CALL_CLEAR_REQUEST = 12
    CALL_DISCONNECT_NOTIFY = 13
    WAN_ERROR_NOTIFY = 14
    SET_LINK_INFO = 15


# Result and error codes, RFC 2637 s.2.2 - s.2.16.  Only the ones a proxy emits
# or tests for are likely to be used, but the full lists are short.
class StartResult(enum.IntEnum):
    """Start-Control-Connection-Reply Result Code (s.2.2)."""
    SUCCESS = 1
    GENERAL_ERROR = 2
    CHANNEL_EXISTS = 3
    NOT_AUTHORIZED = 4
    BAD_PROTOCOL_VERSION = 5


class StopReason(enum.IntEnum):
    """Stop-Control-Connection-Request Reason (s.2.3)."""
    NONE = 1
    STOP_PROTOCOL = 2
    STOP_LOCAL_SHUTDOWN = 3


class StopResult(enum.IntEnum):
    """Stop-Control-Connection-Reply Result Code (s.2.4)."""
    OK = 1
    GENERAL_ERROR = 2


class EchoResult(enum.IntEnum):
    """Echo-Reply Result Code (s.2.6)."""
    OK = 1
    GENERAL_ERROR = 2


class OutgoingCallResult(enum.IntEnum):
    """Outgoing-Call-Reply Result Code (s.2.8)."""
    CONNECTED = 1
    GENERAL_ERROR = 2
    NO_CARRIER = 3
    BUSY = 4
    NO_DIAL_TONE = 5
    TIME_OUT = 6
    DO_NOT_ACCEPT = 7


class IncomingCallResult(enum.IntEnum):
    """Incoming-Call-Reply Result Code (s.2.10)."""
    CONNECT = 1
    GENERAL_ERROR = 2
    DO_NOT_ACCEPT = 3


class DisconnectResult(enum.IntEnum):
    """Call-Disconnect-Notify Result Code (s.2.13)."""
    LOST_CARRIER = 1
    GENERAL_ERROR = 2
    ADMIN_SHUTDOWN = 3
    REQUEST = 4


class ErrorCode(enum.IntEnum):
    """General Error Codes (s.2.16), sent with a result of "general error"."""
    NONE = 0
    NOT_CONNECTED = 1
    BAD_FORMAT = 2
    BAD_VALUE = 3
    NO_RESOURCE = 4
    BAD_CALL_ID = 5
    PAC_ERROR = 6


FRAMING_ASYNC = 1   # Framing Capabilities / Framing Type bits (s.2.1, s.2.7)
FRAMING_SYNC = 2
BEARER_ANALOG = 1   # Bearer Capabilities / Bearer Type bits (s.2.1, s.2.7)
BEARER_DIGITAL = 2


REASONS = frozenset({
    "truncated",              # fewer bytes than the message's Length
    "bad length",             # Length outside 16..220, not the type's length, or bytes after it
    "not a control message",  # PPTP Message Type is not 1
    "bad magic",              # Magic Cookie is not 0x1A2B3C4D
    "unknown type",           # Control Message Type is not 1..15
    "bad value",              # a field given to a constructor does not fit its width
})


class PPTPError(ValueError):
    """Bad PPTP control bytes.  ``reason`` is one of :data:`REASONS`.

    When raised by :meth:`PPTPStreamDecoder.feed`, ``decoded`` holds the
    messages that were complete before the bad one.
    """

    def __init__(self, reason, detail=""):
        if reason not in REASONS:
            raise ValueError(f"unknown PPTPError reason {reason!r}")
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail
        self.decoded = []

    def __str__(self):
        return f"PPTP {self.reason}: {self.detail}" if self.detail else f"PPTP {self.reason}"


# --- field declarations -------------------------------------------------------

def _u8(default=0):
    return dataclasses.field(default=default, metadata={"fmt": "B"})


def _u16(default=0):
    return dataclasses.field(default=default, metadata={"fmt": "H"})


def _u32(default=0):
    return dataclasses.field(default=default, metadata={"fmt": "I"})


def _octets(size):
    """A fixed-size string field, kept as raw bytes (NUL padded on construction)."""
    return dataclasses.field(default=bytes(size), metadata={"fmt": f"{size}s"})


_HEAD_FMT = ">HHIH"            # Length, PPTP Message Type, Magic Cookie, Control Message Type
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_INT_LIMITS = {"B": 1 << 8, "H": 1 << 16, "I": 1 << 32}

MESSAGE_CLASSES = {}   # ControlType -> message class
_REGISTERED = set()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ControlMessage:
    """Base of the 15 control messages; ``reserved0`` is the header's last word."""

    TYPE: ClassVar[ControlType]
    NAME: ClassVar[str]                  # the RFC's name, e.g. "Outgoing-Call-Reply"
    LENGTH: ClassVar[int]                # the exact Length of this message
    FIELD_OFFSETS: ClassVar[dict]        # field name -> offset from the message start
    _STRUCT: ClassVar[struct.Struct]
    _NAMES: ClassVar[tuple]
    _CHECKS: ClassVar[tuple]

    reserved0: int = _u16()

    def __post_init__(self):
        if type(self) not in _REGISTERED:
            raise TypeError(f"{type(self).__name__} is not a registered PPTP control message")
        for name, fmt, limit in self._CHECKS:
            value = getattr(self, name)
            if limit:
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limit:
                    raise PPTPError("bad value", f"{self.NAME}.{name}={value!r} does not fit {fmt}")
                if type(value) is not int:
                    object.__setattr__(self, name, int(value))
            else:
                if not isinstance(value, (bytes, bytearray, memoryview)):
                    raise PPTPError("bad value", f"{self.NAME}.{name} must be bytes, not {type(value).__name__}")
                size = int(fmt[:-1])
                if len(value) > size:
                    raise PPTPError("bad value", f"{self.NAME}.{name} is {len(value)} bytes, at most {size}")
                if len(value) != size or type(value) is not bytes:
                    object.__setattr__(self, name, bytes(value).ljust(size, b"\0"))

    def __str__(self):
        """One log line: the RFC name and the fields that are not zero, strings trimmed."""
        parts = []
        for name in self._NAMES:
            value = getattr(self, name)
            if isinstance(value, bytes):
                value = strip_nul(value)
            if value:
                parts.append(f"{name}={value!r}" if isinstance(value, bytes) else f"{name}={value}")
        return f"{self.NAME}({', '.join(parts)})"

    def pack(self):
        """The message's wire bytes."""
        return self._STRUCT.pack(self.LENGTH, CONTROL_MESSAGE, MAGIC_COOKIE, self.TYPE,
                                 *[getattr(self, name) for name in self._NAMES])

    @classmethod
    def _unpack_from(cls, buf, offset):
        values = cls._STRUCT.unpack_from(buf, offset)
        return cls(**dict(zip(cls._NAMES, values[4:])))


def _message(control_type, name, length):
    """Make a message dataclass, derive its wire layout and check it is *length* bytes."""
    def register(cls):
        cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
        fields = dataclasses.fields(cls)
        fmt = _HEAD_FMT
        offsets = {}
        for field in fields:
            offsets[field.name] = struct.calcsize(fmt)
            fmt += field.metadata["fmt"]
        cls._STRUCT = struct.Struct(fmt)
        if cls._STRUCT.size != length:
            raise AssertionError(f"{name}: layout is {cls._STRUCT.size} bytes, RFC says {length}")
        cls.TYPE = ControlType(control_type)
        cls.NAME = name
        cls.LENGTH = length
        cls.FIELD_OFFSETS = offsets
        cls._NAMES = tuple(f.name for f in fields)
        cls._CHECKS = tuple((f.name, f.metadata["fmt"], _INT_LIMITS.get(f.metadata["fmt"], 0))
                            for f in fields)
        MESSAGE_CLASSES[cls.TYPE] = cls
        _REGISTERED.add(cls)
        return cls
    return register


# --- the 15 messages, RFC 2637 s.2.1 - s.2.15, fields in wire order -------------

@_message(1, "Start-Control-Connection-Request", 156)
class StartControlConnectionRequest(ControlMessage):
    protocol_version: int = _u16(PROTOCOL_VERSION)
    reserved1: int = _u16()
    framing_capabilities: int = _u32()
    bearer_capabilities: int = _u32()
    maximum_channels: int = _u16()
    firmware_revision: int = _u16()
    host_name: bytes = _octets(64)
    vendor_string: bytes = _octets(64)


@_message(2, "Start-Control-Connection-Reply", 156)
class StartControlConnectionReply(ControlMessage):
    protocol_version: int = _u16(PROTOCOL_VERSION)
    result_code: int = _u8()
    error_code: int = _u8()
    framing_capabilities: int = _u32()
    bearer_capabilities: int = _u32()
    maximum_channels: int = _u16()
    firmware_revision: int = _u16()
    host_name: bytes = _octets(64)
    vendor_string: bytes = _octets(64)


@_message(3, "Stop-Control-Connection-Request", 16)
class StopControlConnectionRequest(ControlMessage):
    reason: int = _u8()
    reserved1: int = _u8()
    reserved2: int = _u16()


@_message(4, "Stop-Control-Connection-Reply", 16)
class StopControlConnectionReply(ControlMessage):
    result_code: int = _u8()
    error_code: int = _u8()
    reserved1: int = _u16()


@_message(5, "Echo-Request", 16)
class EchoRequest(ControlMessage):
    identifier: int = _u32()


@_message(6, "Echo-Reply", 20)
class EchoReply(ControlMessage):
    identifier: int = _u32()
    result_code: int = _u8()
    error_code: int = _u8()
    reserved1: int = _u16()


@_message(7, "Outgoing-Call-Request", 168)
class OutgoingCallRequest(ControlMessage):
    call_id: int = _u16()
    call_serial_number: int = _u16()
    minimum_bps: int = _u32()
    maximum_bps: int = _u32()
    bearer_type: int = _u32()
    framing_type: int = _u32()
    packet_recv_window_size: int = _u16()
    packet_processing_delay: int = _u16()
    phone_number_length: int = _u16()
    reserved1: int = _u16()
    phone_number: bytes = _octets(64)
    subaddress: bytes = _octets(64)


@_message(8, "Outgoing-Call-Reply", 32)
class OutgoingCallReply(ControlMessage):
    call_id: int = _u16()
    peer_call_id: int = _u16()
    result_code: int = _u8()
    error_code: int = _u8()
    cause_code: int = _u16()
    connect_speed: int = _u32()
    packet_recv_window_size: int = _u16()
    packet_processing_delay: int = _u16()
    physical_channel_id: int = _u32()


@_message(9, "Incoming-Call-Request", 220)
class IncomingCallRequest(ControlMessage):
    call_id: int = _u16()
    call_serial_number: int = _u16()
    call_bearer_type: int = _u32()
    physical_channel_id: int = _u32()
    dialed_number_length: int = _u16()
    dialing_number_length: int = _u16()
    dialed_number: bytes = _octets(64)
    dialing_number: bytes = _octets(64)
    subaddress: bytes = _octets(64)


@_message(10, "Incoming-Call-Reply", 24)
class IncomingCallReply(ControlMessage):
    call_id: int = _u16()
    peer_call_id: int = _u16()
    result_code: int = _u8()
    error_code: int = _u8()
    packet_recv_window_size: int = _u16()
    packet_transmit_delay: int = _u16()
    reserved1: int = _u16()


@_message(11, "Incoming-Call-Connected", 28)
class IncomingCallConnected(ControlMessage):
    peer_call_id: int = _u16()
    reserved1: int = _u16()
    connect_speed: int = _u32()
    packet_recv_window_size: int = _u16()
    packet_transmit_delay: int = _u16()
    framing_type: int = _u32()


@_message(12, "Call-Clear-Request", 16)
class CallClearRequest(ControlMessage):
    call_id: int = _u16()
    reserved1: int = _u16()


@_message(13, "Call-Disconnect-Notify", 148)
class CallDisconnectNotify(ControlMessage):
    call_id: int = _u16()
    result_code: int = _u8()
    error_code: int = _u8()
    cause_code: int = _u16()
    reserved1: int = _u16()
    call_statistics: bytes = _octets(128)


@_message(14, "WAN-Error-Notify", 40)
class WanErrorNotify(ControlMessage):
    peer_call_id: int = _u16()
    reserved1: int = _u16()
    crc_errors: int = _u32()
    framing_errors: int = _u32()
    hardware_overruns: int = _u32()
    buffer_overruns: int = _u32()
    timeout_errors: int = _u32()
    alignment_errors: int = _u32()


@_message(15, "Set-Link-Info", 24)
class SetLinkInfo(ControlMessage):
    peer_call_id: int = _u16()
    reserved1: int = _u16()
    send_accm: int = _u32()
    receive_accm: int = _u32()


MIN_LENGTH = min(cls.LENGTH for cls in MESSAGE_CLASSES.values())   # 16
MAX_LENGTH = max(cls.LENGTH for cls in MESSAGE_CLASSES.values())   # 220


# --- who sends what, and whose call ID is where ---------------------------------

SENDER = {
    # RFC 2637 s.2: who sends each message.  Control-connection messages may come
    # from either side; the call messages have one sender each.
    StartControlConnectionRequest: frozenset({PNS, PAC}),
    StartControlConnectionReply: frozenset({PNS, PAC}),
    StopControlConnectionRequest: frozenset({PNS, PAC}),
    StopControlConnectionReply: frozenset({PNS, PAC}),
    EchoRequest: frozenset({PNS, PAC}),
    EchoReply: frozenset({PNS, PAC}),
    OutgoingCallRequest: frozenset({PNS}),
    OutgoingCallReply: frozenset({PAC}),
    IncomingCallRequest: frozenset({PAC}),
    IncomingCallReply: frozenset({PNS}),
    IncomingCallConnected: frozenset({PAC}),
    CallClearRequest: frozenset({PNS}),
    CallDisconnectNotify: frozenset({PAC}),
    WanErrorNotify: frozenset({PAC}),
    SetLinkInfo: frozenset({PNS}),
}

CALL_ID_FIELDS = {
    # The one table of call-ID fields: message class -> ((field, owner), ...).
    # The owner is the side that chose the ID (RFC 2637 s.3.2.2).  Throughout the
    # RFC "Call ID" is the sender's own ID and "Peer's Call ID" the receiver's;
    # the owners below are for the RFC's direction (see SENDER).
    OutgoingCallRequest: (("call_id", PNS),),                          # s.2.7
    OutgoingCallReply: (("call_id", PAC), ("peer_call_id", PNS)),      # s.2.8
    IncomingCallRequest: (("call_id", PAC),),                          # s.2.9
    IncomingCallReply: (("call_id", PNS), ("peer_call_id", PAC)),      # s.2.10
    IncomingCallConnected: (("peer_call_id", PNS),),                   # s.2.11
    CallClearRequest: (("call_id", PNS),),                             # s.2.12
    CallDisconnectNotify: (("call_id", PAC),),  # s.2.13; accel-ppp puts the PNS's ID here
    WanErrorNotify: (("peer_call_id", PNS),),                          # s.2.14
    SetLinkInfo: (("peer_call_id", PAC),),                             # s.2.15
}


# Fields some implementations fill with the other side's ID.  accel-ppp sends its
# Call-Disconnect-Notify with the PNS's ID where RFC 2637 s.2.13 (and pptpd) put
# the PAC's.  A translator that does not know the value under the owner from
# CALL_ID_FIELDS may try it under the owner given here before refusing it.
ALTERNATE_OWNERS = {
    CallDisconnectNotify: {"call_id": PNS},
}


def _check_tables():
    for cls in MESSAGE_CLASSES.values():
        if cls not in SENDER:
            raise AssertionError(f"{cls.NAME} has no SENDER entry")
        id_fields = {n for n in cls._NAMES if n in ("call_id", "peer_call_id")}
        if id_fields != {name for name, _ in CALL_ID_FIELDS.get(cls, ())}:
            raise AssertionError(f"{cls.NAME}: CALL_ID_FIELDS does not name its call-ID fields")
    for cls, alternates in ALTERNATE_OWNERS.items():
        for name, owner in alternates.items():
            if (name, _OTHER_SIDE[owner]) not in CALL_ID_FIELDS[cls]:
                raise AssertionError(f"{cls.NAME}.{name}: bad ALTERNATE_OWNERS entry")
    for cls, entries in CALL_ID_FIELDS.items():
        for name, owner in entries:
            if owner not in (PNS, PAC) or dict((n, f) for n, f, _ in cls._CHECKS)[name] != "H":
                raise AssertionError(f"{cls.NAME}.{name}: bad CALL_ID_FIELDS entry")


_check_tables()


class CallIdField(NamedTuple):
    field: str     # the dataclass field name
    owner: str     # PNS or PAC: whose ID space the value is in
    value: int
    offset: int    # from the start of the message (the Length field)


def _id_fields(cls, sender):
    """(field, owner) pairs of *cls*, with owners swapped if *sender* is not the RFC's.

    A message sent "backwards" (pptpd and some PACs send Set-Link-Info, which the
    RFC has only the PNS send) still carries the receiver's ID as the peer's
    Call ID, so its owners flip with the direction.
    """
    entries = CALL_ID_FIELDS.get(cls, ())
    if sender is None or sender in SENDER[cls]:
        return entries
    if sender not in _OTHER_SIDE:
        raise ValueError(f"sender must be {PNS!r} or {PAC!r}, not {sender!r}")
    return tuple((name, _OTHER_SIDE[owner]) for name, owner in entries)


def call_ids(msg, sender=None):
    """The call IDs *msg* carries: a list of :class:`CallIdField` (empty for most).

    *sender* (PNS or PAC), when given, is who actually sent the message.
    """
    cls = type(msg)
    return [CallIdField(name, owner, getattr(msg, name), cls.FIELD_OFFSETS[name])
            for name, owner in _id_fields(cls, sender)]


# --- parsing ----------------------------------------------------------------

def _check_header(buf, pos, available):
    """Check as much of the header at *buf[pos:]* as *available* bytes allow.

    Returns the message class once the Control Message Type is in and agrees
    with Length, None if more bytes are needed; raises PPTPError otherwise.
    Checks go in wire order, so a stream fails as early as a byte tells.
    """
    if available < 2:
        return None
    (length,) = _U16.unpack_from(buf, pos)
    if not MIN_LENGTH <= length <= MAX_LENGTH:
        raise PPTPError("bad length", f"Length {length} is outside {MIN_LENGTH}..{MAX_LENGTH}")
    if available < 4:
        return None
    (message_type,) = _U16.unpack_from(buf, pos + 2)
    if message_type != CONTROL_MESSAGE:
        raise PPTPError("not a control message", f"PPTP Message Type {message_type}, expected 1")
    if available < 8:
        return None
    (magic,) = _U32.unpack_from(buf, pos + 4)
    if magic != MAGIC_COOKIE:
        raise PPTPError("bad magic", f"Magic Cookie 0x{magic:08x}, expected 0x{MAGIC_COOKIE:08x}")
    if available < 10:
        return None
    (control_type,) = _U16.unpack_from(buf, pos + 8)
    cls = MESSAGE_CLASSES.get(control_type)
    if cls is None:
        raise PPTPError("unknown type", f"Control Message Type {control_type}")
    if length != cls.LENGTH:
        raise PPTPError("bad length", f"{cls.NAME} with Length {length}, expected {cls.LENGTH}")
    return cls


def _whole_message_class(data):
    available = len(data)
    cls = _check_header(data, 0, available)
    if cls is None or available < cls.LENGTH:
        need = cls.LENGTH if cls is not None else HEADER_LENGTH
        raise PPTPError("truncated", f"{available} bytes, a message needs {need}")
    if available > cls.LENGTH:
        raise PPTPError("bad length", f"{available} bytes for a {cls.LENGTH}-byte {cls.NAME}")
    return cls


def parse_message(data):
    """Parse exactly one whole control message from *data* (bytes-like)."""
    return _whole_message_class(data)._unpack_from(data, 0)


def strip_nul(octets):
    """A fixed-size string field without its NUL padding (for logs)."""
    return bytes(octets).split(b"\0", 1)[0]


class PPTPStreamDecoder:
    """Cuts a TCP byte stream into control messages.

    ``feed(data)`` returns the messages completed by *data* (possibly none,
    possibly several).  A bad header raises :class:`PPTPError`; TCP framing is
    then lost, so the decoder stays failed and every later ``feed`` raises the
    same reason.  ``pending`` counts buffered bytes of an unfinished message, so
    a caller seeing the connection close can call ``finish()`` to learn whether
    it ended mid-message.

    Bytes are never copied more than once: a read with no leftover is parsed
    in place, and only an unfinished tail is kept.
    """

    def __init__(self):
        self._buffer = bytearray()
        self._failure = None

    @property
    def pending(self):
        return len(self._buffer)

    @property
    def failed(self):
        return self._failure is not None

    def feed(self, data):
        if self._failure is not None:
            raise PPTPError(self._failure.reason, f"stream already failed ({self._failure.detail})")
        if self._buffer:
            self._buffer += data
            buf = self._buffer
        else:
            buf = data
        end = len(buf)
        pos = 0
        messages = []
        try:
            while True:
                cls = _check_header(buf, pos, end - pos)
                if cls is None or end - pos < cls.LENGTH:
                    break
                messages.append(cls._unpack_from(buf, pos))
                pos += cls.LENGTH
        except PPTPError as e:
            e.decoded = messages
            self._failure = e
            self._buffer = bytearray()
            raise
        if buf is self._buffer:
            del self._buffer[:pos]
        elif pos < end:
            self._buffer = bytearray(buf[pos:])
        return messages

    def finish(self):
        """Call when the stream ends; raises PPTPError("truncated") if a message was cut off."""
        if self._failure is not None:
            raise PPTPError(self._failure.reason, f"stream already failed ({self._failure.detail})")
        if self._buffer:
            raise PPTPError("truncated", f"stream ended inside a message ({len(self._buffer)} bytes pending)")
