"""Fuzz harnesses: the codecs, a whole mux connection, CallBook.translate, the C parsers
of routeproxy.native against their Python twins, and the native capture's pump.

Each harness takes bytes and either returns or raises :class:`Finding`: the code under test
may reject the input only with its own error (PPTPError, GREError, FrameError, UnknownCallID,
CallIDExhausted); any other exception is a bug a peer could trigger.  They run under atheris
(``python -m tests.fuzz NAME [libFuzzer flags]``, docs/limits.md) and, without it, over seeds
and random bytes in tests/unit/test_fuzz.py (the short pass ``make test`` runs).
"""
import random

from twisted.internet.testing import MemoryReactorClock

from routeproxy import calls, gre, native, pptp
from routeproxy.capture import DLT_EN10MB, DLT_LINUX_SLL, LINK_LAYERS
from routeproxy.callids import CallIDExhausted, CallIDSpace
from routeproxy.mux import frames as F
from routeproxy.mux.connection import MuxConnection
from routeproxy.testing import RecordingMuxLink, memoryTLSPair
from tests.support.native import PortProbe, native_outcome, outcome
from tests.support.packets import frame, ip_fragments, ipv4


class Finding(AssertionError):
    """An exception the code under test should never raise for any input."""


def _guard(expected, run, data):
    try:
        run(data)
    except expected:
        pass
    except Exception as e:
        raise Finding(f"{type(e).__name__}: {e} for input {data[:64]!r}") from e


def pptp_stream(data):
    def run(data):
        decoder = pptp.PPTPStreamDecoder()
        cut = data[0] % (len(data) or 1) if data else 0
        decoder.feed(data[:cut])
        decoder.feed(data[cut:])
        decoder.finish()
    _guard(pptp.PPTPError, run, data)


def gre_codec(data):
    def run(data):
        call_id, seq, ack, payload = gre.split_gre(data)
        if seq is not None or not payload:
            gre.build_gre(call_id, payload, seq, ack)
    _guard(gre.GREError, run, data)


def mux_frames(data):
    def run(data):
        decoder = F.FrameDecoder(F.MIN_MAX_PAYLOAD)
        decoder.feed(data)
        for _ in range(10000):
            try:
                if decoder.nextFrame() is None:
                    return
            except F.MalformedFrame:
                continue
    _guard(F.FrameError, run, data)


_HELLO = F.Hello((1,), F.MIN_MAX_PAYLOAD, 65536, 10, 30, ()).encode()


def mux_connection(data):
    """Both ends of a link fed the bytes after a valid HELLO: nothing may escape."""
    def run(data):
        for opener in (False, True):
            conn = MuxConnection(opener, MemoryReactorClock(),
                                 sessionRequested=lambda session, profile, info: _Sink())
            conn.start(RecordingMuxLink())
            conn.dataReceived(_HELLO + data)
    _guard((), run, data)


class _Sink:
    def controlReceived(self, data):
        pass

    def datagramReceived(self, callTag, seq, ack, payload):
        pass

    def sessionClosed(self, reason):
        pass


def callbook(data):
    """Messages parsed from the bytes, translated in directions the bytes choose."""
    def run(data):
        if len(data) < 2:
            return
        owner = pptp.PNS if data[0] & 1 else pptp.PAC
        book = calls.CallBook(owner, CallIDSpace("fuzz", first=1, last=8, start=1))
        try:
            messages = pptp.PPTPStreamDecoder().feed(data[2:])
        except pptp.PPTPError as e:
            messages = getattr(e, "decoded", [])
        for n, message in enumerate(messages):
            direction = calls.TO_MUX if (data[1] >> (n % 8)) & 1 else calls.TO_PEER
            try:
                book.translate(message, direction)
            except (calls.UnknownCallID, CallIDExhausted):
                pass
        book.release_all()
    _guard((), run, data)


_DATALINKS = sorted(LINK_LAYERS)
_PROBES = {}  # one port per datalink: PortProbe.outcome starts each frame from a clean state


def native_parsers(data):
    """rp_split_gre on the bytes, rp_ipv4_gre on the bytes after the first (which picks the
    datalink): each must do what split_gre and the port's IPv4 checks do.  Without the
    built module there is nothing to compare (tests/unit/test_native_gre.py says why)."""
    if native.load()[0] is None or not data:
        return

    def run(data):
        ours, theirs = outcome(native.split_gre, data), outcome(gre.split_gre, data)
        if ours != theirs:
            raise Finding(f"rp_split_gre {ours!r} != split_gre {theirs!r} for {data.hex()}")
        datalink, captured = _DATALINKS[data[0] % len(_DATALINKS)], data[1:]
        probe = _PROBES.get(datalink) or _PROBES.setdefault(datalink, PortProbe(datalink))
        ours, theirs = native_outcome(captured, LINK_LAYERS[datalink]), probe.outcome(captured)
        if ours != theirs:
            raise Finding(f"rp_ipv4_gre {ours!r} != GREPort {theirs!r} for datalink {datalink}, "
                          f"{captured.hex()}")
    _guard((), run, data)


_PUMP = []  # (module, state, link, out length, out frames): one pump for the whole run
_PUMP_LINKS = 3


def _pump():
    if not _PUMP:
        module = native.load()[0]
        ffi, lib = module.ffi, module.lib
        state = ffi.gc(lib.rp_pump_new(_PUMP_OUT), lib.rp_pump_free)
        link = LINK_LAYERS[DLT_EN10MB]
        lib.rp_pump_set_link(state, link[0], link[1], link[2], len(link[2]))
        lib.rp_pump_set_local(state, bytes([10, 0, 0, 2]), 1)
        for key in range(0, 65536, 3):  # a third of the keys have a flow, from 10.0.0.1,
            # on one of three links
            lib.rp_pump_set_flow(state, key, bytes([10, 0, 0, 1]), key, key,
                                 (key // 3) % _PUMP_LINKS)
        _PUMP.append((module, state, ffi.new("uint32_t *"), ffi.new("size_t *"),
                      ffi.new("uint32_t *")))
    return _PUMP[0]


_PUMP_OUT = 1 << 16


def native_pump(data):
    """rp_pump_frame (the native capture) on an Ethernet frame after two bytes that pick the
    byte budget, whether a frame over it is handed back, and which of the three links are
    not begun: it must never read or write out of bounds (a crash is the finding), never
    report more output than a link's buffer holds nor output for a link not begun.  Its
    agreement with the Python path is tests/unit/test_native_pump.py's."""
    if native.load()[0] is None or len(data) < 2:
        return
    module, state, link, length, frames = _pump()
    lib, ffi = module.lib, module.ffi
    lib.rp_pump_begin(state, 0.0, ffi.NULL)
    begun = [i for i in range(_PUMP_LINKS) if not data[1] >> (2 + i) & 1]
    for i in begun:
        lib.rp_pump_begin_link(state, i, (data[0] << 4) - 16, data[1] & 1, 1500)
    taken = lib.rp_pump_frame(state, data[2:], len(data) - 2, 1.0, data[1] & 2)
    if taken == lib.RP_PUMP_HAND_BACK and lib.rp_pump_back_reason(state) == lib.RP_BACK_NO_LINK:
        link_ = lib.rp_pump_back_link(state)   # as FlowTable.retry: begun, the frame again
        if link_ in begun or not 0 <= link_ < _PUMP_LINKS:
            raise Finding(f"no_link for link {link_}, begun {begun}: {data[:64].hex()}")
        begun.append(link_)
        lib.rp_pump_begin_link(state, link_, (data[0] << 4) - 16, data[1] & 1, 1500)
        taken = lib.rp_pump_frame_again(state, data[2:], len(data) - 2, 1.0, data[1] & 2)
    counts = ffi.new("struct rp_counts *")
    lib.rp_pump_take_counts(state, counts)
    lib.rp_pump_take_deltas(state, ffi.new("struct rp_flow_delta[]", 4), 4)
    outs = [(lib.rp_pump_out(state, i, link, length, frames), link[0], length[0])
            for i in range(counts.links + 1)]
    if (taken not in (lib.RP_PUMP_TAKEN, lib.RP_PUMP_HAND_BACK) or counts.links > 1
            or outs[-1][0] != ffi.NULL
            or any(n > _PUMP_OUT or i not in begun for _, i, n in outs[:-1])):
        raise Finding(f"rp_pump_frame {taken}, out {outs[:-1]} for {data[:64].hex()}")


_LINK = []  # (module, state, out, out length, deltas): one link read for the whole run


def _link():
    if not _LINK:
        module = native.load()[0]
        ffi, lib = module.ffi, module.lib
        state = ffi.gc(lib.rp_link_new(), lib.rp_link_free)
        for sid in range(1, 4):   # sessions 1-3, every third tag to 300; fd -1: sends fail
            for tag in range(0, 300, 3):
                lib.rp_link_set_flow(state, sid, tag, -1, -1, 0, bytes([127, 0, 0, 1]), tag ^ 0x5a5a)
        _LINK.append((module, state, ffi.new("uint8_t **"), ffi.new("size_t *"),
                      ffi.new("struct rp_link_delta[]", 64)))
    return _LINK[0]


def native_link(data):
    """rp_link_feed (the RRP's native link read) on a mux stream after a byte that picks where
    it is cut in two reads: no crash, and what it hands back is whole frames (until a frame
    too large, after which everything is handed back) that, with what it keeps and what it
    sent, are no more than it was fed.  Agreement with the Python path is
    tests/unit/test_native_link.py's.  A fresh link state when one has failed."""
    if native.load()[0] is None or not data:
        return
    module, state, out, outLength, deltas = _link()
    lib, ffi = module.lib, module.ffi
    held = lib.rp_link_buffered(state)
    cut = 1 + (data[0] * (len(data) - 1)) // 255
    handed, fed = 0, held + len(data) - 1
    for part in (data[1:cut], data[cut:]):
        more = True
        while more:
            code = lib.rp_link_feed(state, part, len(part), 1 << 14, out, outLength)
            part = b""
            if code not in (lib.RP_LINK_DONE, lib.RP_LINK_MORE):
                raise Finding(f"rp_link_feed {code} for {data[:64].hex()}")
            more = code == lib.RP_LINK_MORE
            chunk = ffi.buffer(out[0], outLength[0])[:] if outLength[0] else b""
            handed += len(chunk)
            failed = False
            while len(chunk) >= 12 and not failed:
                length = int.from_bytes(chunk[8:12], "big")
                failed = length > 1 << 14
                if not failed:
                    if len(chunk) < 12 + length:
                        raise Finding(f"a partial frame handed back for {data[:64].hex()}")
                    chunk = chunk[12 + length:]
            if chunk and not failed:
                raise Finding(f"{len(chunk)} stray bytes handed back for {data[:64].hex()}")
            if failed:   # the link would close: start again
                _LINK.clear()
                return
    for counts in _deltas(lib, state, deltas).values():
        if counts[0] != sum(counts[1:4]):   # the batch: each GRE taken sent or dropped by return
            raise Finding(f"rp_link_feed: {counts} GRE taken/sent/busy/errors for {data[:64].hex()}")
    if handed + lib.rp_link_buffered(state) > fed:
        raise Finding(f"rp_link_feed handed back more than it was fed for {data[:64].hex()}")


_TLSREAD = {}  # the TLS pair, the socket pair and both link states: kept while they agree


def _tlsread():
    """A server SSL* (pyOpenSSL, handshaken on memory BIOs with its client), a socket pair
    whose read end rp_link_read reads it from, and two link states with the same entries (fd
    -1: every send fails, counted): one read by rp_link_read, one fed by rp_link_feed."""
    if "tlsIn" not in _TLSREAD:
        import socket
        import tempfile
        from OpenSSL._util import ffi as sslFFI, lib as sslLib
        from routeproxy import certs, tls
        module = native.load()[0]
        ffi, lib = module.ffi, module.lib
        if "contexts" not in _TLSREAD:
            paths = certs.write_lab_certs(tempfile.mkdtemp(), "rrp.fuzz", ["lrp.fuzz"])
            _TLSREAD["contexts"] = (
                tls.serverCreator(paths["rrp_cert"], paths["rrp_key"], paths["ca"]).options.getContext(),
                tls.clientCreator("rrp.fuzz", paths["lrp_cert"], paths["lrp_key"], paths["ca"])
                .options.getContext())
        server, client = memoryTLSPair(*_TLSREAD["contexts"])
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)

        def address(pointer):
            return int(sslFFI.cast("uintptr_t", pointer))
        tlsIn = ffi.gc(lib.rp_tls_in_new(
            address(server._ssl), address(server._into_ssl), address(server._from_ssl),
            *(address(sslFFI.cast("void *", getattr(sslLib, name)))
              for name in ("SSL_read", "SSL_get_error", "BIO_write", "BIO_get_mem_data")),
            theirs.fileno(), 65536), lib.rp_tls_in_free)
        _TLSREAD.pop("states", None)
        _TLSREAD.update(module=module, server=server, client=client, ours=ours,
                        theirs=theirs, tlsIn=tlsIn, out=ffi.new("uint8_t **"),
                        outLength=ffi.new("size_t *"), info=ffi.new("struct rp_read_info *"),
                        deltas=ffi.new("struct rp_link_delta[]", 64), clear=sslLib.ERR_clear_error)
    if "states" not in _TLSREAD:
        ffi, lib = _TLSREAD["module"].ffi, _TLSREAD["module"].lib
        states = []
        for _ in range(2):
            state = ffi.gc(lib.rp_link_new(), lib.rp_link_free)
            for tag in range(0, 300, 3):
                lib.rp_link_set_flow(state, 1, tag, -1, -1, 0, bytes([127, 0, 0, 1]), tag)
            states.append(state)
        _TLSREAD["states"] = states
    return _TLSREAD


def _deltas(lib, state, deltas):
    """The entries' counts taken: {(session, tag): (packets, sent, busy, errors, bytes)}."""
    total = {}
    while True:
        n = lib.rp_link_take_deltas(state, deltas, 64)
        for i in range(n):
            d = deltas[i]
            key = (d.session, d.tag)
            total[key] = tuple(a + b for a, b in zip(total.get(key, (0,) * 5),
                                                     (d.packets, d.sent, d.busy, d.errors, d.bytes)))
        if n < 64:
            return total


def _counts(t, state):
    total = _deltas(t["module"].lib, state, t["deltas"])
    if any(counts[0] != sum(counts[1:4]) for counts in total.values()):
        raise Finding(f"GRE taken but neither sent nor dropped: {total}")
    return total


def native_tlsread(data):
    """rp_link_read (the link's TLS read in C) against rp_link_feed (3a, below Twisted's TLS)
    on the same plaintext: a mux stream (session 1, every third tag an entry) after two bytes
    that pick the TLS record size and where the ciphertext is cut in two reads (a first byte
    of 1 mod 8 also flips one ciphertext byte there: the read stops, RP_READ_SSL_ERROR).
    The frames handed back, the bytes kept and the entries' counts must be the same; nothing
    may crash.  A fresh pair after a flipped byte or a frame too large."""
    if native.load()[0] is None or len(data) < 2:
        return
    t = _tlsread()
    lib, ffi = t["module"].lib, t["module"].ffi
    out, outLength, info = t["out"], t["outLength"], t["info"]
    reading, feeding = t["states"]
    size, plaintext = 1 + data[0] * 64, data[2:]
    ciphertext = b""
    for at in range(0, len(plaintext), size):
        t["client"].send(plaintext[at:at + size])
        ciphertext += t["client"].bio_read(1 << 20)
    cut = (data[1] * len(ciphertext)) // 256
    corrupt = data[0] % 8 == 1 and ciphertext
    if corrupt:
        ciphertext = ciphertext[:cut] + bytes([ciphertext[cut] ^ 0x40]) + ciphertext[cut + 1:]
    read, failed = b"", False
    for part in (ciphertext[:cut], ciphertext[cut:]):
        t["ours"].sendall(part)
        recv = 1
        while True:
            flags = lib.rp_link_read(reading, t["tlsIn"], recv, data[1] & 1, 1 << 14, out,
                                     outLength, info, 0.0)
            recv = 0
            if flags & ~(lib.RP_READ_AGAIN | lib.RP_READ_SSL_ERROR | lib.RP_READ_TLS_OUT):
                raise Finding(f"rp_link_read {flags} for {data[:64].hex()}")
            read += ffi.buffer(out[0], outLength[0])[:] if outLength[0] else b""
            if flags & lib.RP_READ_SSL_ERROR:
                failed = True
                break
            if not flags & lib.RP_READ_AGAIN:
                break
        if failed:
            break
    if failed and not corrupt:
        raise Finding(f"rp_link_read: an SSL error on intact records for {data[:64].hex()}")
    fed, more, part = b"", True, plaintext
    while more and not corrupt:
        code = lib.rp_link_feed(feeding, part, len(part), 1 << 14, out, outLength)
        part, more = b"", code == lib.RP_LINK_MORE
        fed += ffi.buffer(out[0], outLength[0])[:] if outLength[0] else b""
    readCounts, fedCounts = _counts(t, reading), _counts(t, feeding)
    if not corrupt and (read != fed or readCounts != fedCounts or
                        lib.rp_link_buffered(reading) != lib.rp_link_buffered(feeding)):
        raise Finding(f"rp_link_read and rp_link_feed differ for {data[:64].hex()}")
    at, tooLarge = 0, False   # (handed back: whole frames, until one too large)
    while len(fed) - at >= 12 and not tooLarge:
        length = int.from_bytes(fed[at + 8:at + 12], "big")
        tooLarge, at = length > 1 << 14, at + 12 + length
    if corrupt or tooLarge:   # fresh link states (and a fresh TLS pair after a flipped byte)
        del _TLSREAD["states"]
    if corrupt:   # (a flipped length byte may leave the read waiting: no error)
        t["clear"]()   # (the error queue of the failed SSL*)
        t["ours"].close()
        t["theirs"].close()
        del _TLSREAD["tlsIn"]


HARNESSES = {"pptp": pptp_stream, "gre": gre_codec, "frames": mux_frames,
             "mux": mux_connection, "callbook": callbook, "native": native_parsers,
             "pump": native_pump, "link": native_link, "tlsread": native_tlsread}


def seeds():
    """Inputs that reach past the first checks: real messages and frames, and their cuts."""
    rng = random.Random(10)
    out = [b"", b"\x00", bytes(16), b"\xff" * 64]
    for cls in pptp.MESSAGE_CLASSES.values():
        fields = {name: rng.randrange(0, 4) for name, _ in pptp.CALL_ID_FIELDS.get(cls, ())}
        packed = cls(**fields).pack()
        out += [packed, packed[: len(packed) // 2], b"\x01\x03" + packed * 3]
    out += [gre.build_gre(7, b"\xff\x03ab", seq=1, ack=2), gre.build_gre(7, b"", ack=2)]
    # captured frames for the native harness: the first byte picks the datalink
    packet = ipv4("10.0.0.1", "10.0.0.2", gre.build_gre(7, b"\xff\x03" * 8, seq=1, ack=2))
    fragments = ip_fragments("10.0.0.1", "10.0.0.2", gre.build_gre(7, b"\xff\x03" * 20, seq=1), 24)
    out += [bytes([_DATALINKS.index(datalink)]) + frame(datalink, ip)
            for datalink in (DLT_EN10MB, DLT_LINUX_SLL) for ip in (packet, fragments[0], fragments[-1])]
    # for the pump: budget, hand-back and links-not-begun bytes, then an Ethernet frame of a
    # flow's GRE (key 9: link 0)
    flow = ipv4("10.0.0.1", "10.0.0.2", gre.build_gre(9, b"\xff\x03" * 30, seq=5, ack=4))
    out += [bytes([budget, flags]) + frame(DLT_EN10MB, flow) for budget in (0, 5, 255)
            for flags in (0, 1, 2, 3, 4, 7, 0x1F)]
    out += [F.Ping(b"12345678").encode(), F.Open(1, "default", "x").encode(),
            F.Close(1, 0, "").encode(), F.Datagram(1, 7, 1, None, b"ab").encode()]
    # for the link read: a cut byte, then GRE of flows (tags 3, 6), another tag, a PING
    stream = b"".join([F.encodeGRE(1, 3, 1, 2, b"\xff\x03" * 20), F.Ping(b"12345678").encode(),
                       F.encodeGRE(2, 6, 5, None, b"ab"), F.encodeGRE(1, 4, 1, None, b"x")])
    out += [bytes([cut]) + stream for cut in (0, 1, 100, 255)]
    # for the TLS read: a record size byte (1 mod 8: a flipped ciphertext byte), a cut, the stream
    out += [bytes([size, cut]) + stream for size in (0, 2, 255) for cut in (0, 100, 255)]
    out += [bytes([1, 128]) + stream]
    return out


def mutate(data, rng):
    """A cheap mutation for runs without atheris: flip, cut, splice, or fresh bytes."""
    choice = rng.randrange(4)
    if choice == 0 and data:
        i = rng.randrange(len(data))
        return data[:i] + bytes([rng.randrange(256)]) + data[i + 1:]
    if choice == 1 and data:
        return data[:rng.randrange(len(data))]
    if choice == 2:
        return data + rng.randbytes(rng.randrange(1, 40))
    return rng.randbytes(rng.randrange(0, 300))
