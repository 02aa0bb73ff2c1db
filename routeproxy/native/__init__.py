"""The native data plane (docs/fastpath.md): the per-packet functions in C, and the capture
pump (pump.c) and link read (link.c) built on them, which the daemons use through
routeproxy.flows with ``--gre-capture native`` (the default where the module loads).

``load()`` finds the compiled module (``python -m routeproxy.native.build``, or pip through
setup.py) or says in one line why not, so a daemon can fall back to Python.  The functions
below are thin wrappers with the signatures and errors of their Python twins
(``routeproxy.gre.split_gre``, ``build_gre``, ``routeproxy.mux.frames.encodeGRE`` and the
stateless IPv4 checks of ``GREPort._frameReceived``), so the differential tests call both
the same way.
"""
import collections
import functools
import importlib
import struct

from routeproxy import gre
from routeproxy.greport import DROP_BAD_HEADER, DROP_NOT_GRE, DROP_NOT_IPV4, DROP_TRUNCATED

__all__ = [
    "load", "NativeUnavailable", "split_gre", "build_gre", "mux_gre_frame", "ipv4_gre",
    "IPv4Fields", "GRE_REASONS", "IPV4_DROPS", "IPV4_GRE", "IPV4_FRAGMENT", "IPV4_EMPTY",
]

# gre.h's codes (tests/unit/test_native_gre.py checks they match the built module's).
GRE_REASONS = {
    -1: gre.TRUNCATED, -2: gre.NOT_VERSION_1, -3: gre.CHECKSUM_ROUTING, -4: gre.KEY_MISSING,
    -5: gre.SOURCE_ROUTE_RECURSION, -6: gre.RESERVED_FLAGS, -7: gre.NOT_PPP,
    -8: gre.PAYLOAD_TRUNCATED, -9: gre.PAYLOAD_WITHOUT_SEQUENCE, -10: gre.OUT_OF_RANGE,
}
NO_ROOM = -11

#: rp_ipv4_gre's results: GRE to deliver, a fragment to reassemble, no payload.
IPV4_GRE, IPV4_FRAGMENT, IPV4_EMPTY = 0, 1, 2
#: rp_ipv4_gre's code -> the port's drop reason.  IPV4_EMPTY is counted after the port's
#: local-address check (a packet to another address is "not_local" first), as greport does.
IPV4_DROPS = {
    -1: DROP_NOT_IPV4, -2: DROP_TRUNCATED, -3: DROP_BAD_HEADER, -4: DROP_NOT_GRE,
    IPV4_EMPTY: DROP_TRUNCATED,
}

#: What rp_ipv4_gre found in an IPv4 header; gre_start:gre_end is the IP payload in the frame.
IPv4Fields = collections.namedtuple(
    "IPv4Fields", "gre_start gre_end src dst total ident fragment checksum")

_INT64 = 1 << 63


class NativeUnavailable(RuntimeError):
    """The compiled module is missing or stale (the message is load()'s reason)."""


@functools.lru_cache(maxsize=None)
def load():
    """``(module, None)`` if ``routeproxy.native._gre`` is built from the sources here, else
    ``(None, reason)``, one line.  Never raises: the caller decides whether that is fatal."""
    try:
        _gre = importlib.import_module("routeproxy.native._gre")
    except ImportError as e:
        if e.name == "routeproxy.native._gre":
            return None, "routeproxy.native is not built (python -m routeproxy.native.build)"
        return None, f"routeproxy.native cannot be loaded: {_line(e)}"
    except Exception as e:
        return None, f"routeproxy.native cannot be loaded: {_line(e)}"
    try:
        from routeproxy.native.build import source_digest
        built = _gre.ffi.string(_gre.lib.rp_source_digest()).decode("ascii")
        current = source_digest()
    except OSError:  # installed without its C sources: nothing to compare with
        return _gre, None
    except Exception as e:
        return None, f"routeproxy.native cannot be loaded: {_line(e)}"
    if built != current:
        return None, ("routeproxy.native was built from other sources than its C files here "
                      "(python -m routeproxy.native.build)")
    return _gre, None


def _line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _module():
    module, reason = load()
    if module is None:
        raise NativeUnavailable(reason)
    return module


def _int64(value):
    """*value* for an int64_t argument; out of that range -1, which C rejects as out of range
    (so the C checks, in their order, decide, as struct does in Python)."""
    if value is None:
        return 0
    return value if -_INT64 <= value < _INT64 else -1


def split_gre(data):
    """``routeproxy.gre.split_gre(data)`` by rp_split_gre."""
    m = _module()
    buf = m.ffi.from_buffer("uint8_t[]", data)
    out = m.ffi.new("struct rp_gre *")
    code = m.lib.rp_split_gre(buf, len(buf), out)
    if code:
        raise gre.GREError(GRE_REASONS[code])
    if not out.has_seq:
        return out.call_id, None, out.ack if out.has_ack else None, b""
    start = out.payload_offset
    return (out.call_id, out.seq, out.ack if out.has_ack else None,
            data[start:start + out.payload_length])


def build_gre(call_id, payload=b"", seq=None, ack=None):
    """``routeproxy.gre.build_gre(...)`` by rp_build_gre."""
    m = _module()
    size = gre.HEADER_MAX + len(payload)
    out = m.ffi.new("uint8_t[]", size)
    try:
        n = m.lib.rp_build_gre(out, size, _int64(call_id), m.ffi.from_buffer("uint8_t[]", payload),
                               len(payload), seq is not None, _int64(seq), ack is not None, _int64(ack))
    except TypeError as e:
        raise gre.GREError(gre.OUT_OF_RANGE, str(e)) from None
    if n < 0:
        raise gre.GREError(GRE_REASONS.get(n, f"native error {n}"))
    return m.ffi.buffer(out, n)[:]


def mux_gre_frame(session, call_tag, seq, ack, data):
    """``routeproxy.mux.frames.encodeGRE(...)`` (the head and *data*) by rp_mux_gre_frame;
    ``struct.error`` where that raises it."""
    m = _module()
    size = m.lib.RP_MUX_GRE_HEAD_MAX + len(data)
    out = m.ffi.new("uint8_t[]", size)
    try:
        n = m.lib.rp_mux_gre_frame(out, size, _int64(session), _int64(call_tag), seq is not None,
                                   _int64(seq), ack is not None, _int64(ack),
                                   m.ffi.from_buffer("uint8_t[]", data), len(data))
    except TypeError as e:
        raise struct.error(str(e)) from None
    if n < 0:
        raise struct.error("a field of the GRE frame is out of range" if n == m.lib.RP_RANGE
                           else f"native error {n}")
    return m.ffi.buffer(out, n)[:]


def ipv4_gre(frame, link):
    """The stateless IPv4 checks of ``GREPort._frameReceived`` by rp_ipv4_gre.

    *link* is a ``capture.LINK_LAYERS`` value.  Returns ``(code, fields)``: fields (an
    IPv4Fields) for IPV4_GRE, IPV4_FRAGMENT and IPV4_EMPTY, None for a drop (IPV4_DROPS).
    """
    m = _module()
    offset, type_at, ipv4_type = link
    buf = m.ffi.from_buffer("uint8_t[]", frame)
    value = ipv4_type or b""
    out = m.ffi.new("struct rp_ipv4 *")
    code = m.lib.rp_ipv4_gre(buf, len(buf), offset, -1 if type_at is None else type_at,
                             m.ffi.from_buffer("uint8_t[]", value), len(value), out)
    if code < 0:
        return code, None
    start = out.gre_offset
    return code, IPv4Fields(start, start + out.gre_length, bytes(out.src), bytes(out.dst),
                            out.total, out.ident, out.fragment, out.checksum)
