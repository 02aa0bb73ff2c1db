"""The native flow tables (docs/fastpath.md step 3): each daemon's capture pump
(:class:`FlowTable`: GRE from the facing peer, framed for the link in C) and link read
(:class:`LinkFlows`: the link's GRE frames sent to the facing peer in C), which share the
relay's side (:class:`_Entries`) and are kept together (:class:`RelayFlows`).

One :class:`FlowTable` per GRE port that captures with ``--gre-capture native``: the C pump's
state (routeproxy/native/pump.c) and, beside it, what Python needs to fold the pump's
counters back.  An entry per call that can carry GRE: its key is the call's local ID (``L``
on the LRP, ``R`` on the RRP: what the facing peer keys its GRE with), and it holds the
peer's address, the mux session's id and the call's tag ``C``.  The relay maintains it
through three calls (:class:`routeproxy.relay.RelaySession`): :meth:`callReady` when a call
is established on an open mux session (and again when a detached session resumes),
:meth:`callGone` when the call is released, :meth:`sessionGone` when the session closes, the
mux session goes away or the link is lost.

Around each pump call the port calls :meth:`begin` (the sojourn gate's threshold, the GRE
watermark's room) and :meth:`end`, which writes the frames C built to the link's TLS in C
when the link is idle (``MuxConnection.writeNative``, step 3b), else queues them on the mux
connection (``MuxConnection.queueFrames``), and folds the counters into the port's, the
sessions', the calls' and the mux's: the same ones the Python path updates, so the status
is the same.

A pump's entries go in C for every mux connection (the LRP has one link; an RRP frames the
GRE of each of its LRPs' links in the same C call, each link within its own budget, into its
own buffer, written to its own connection), up to ``RP_MAX_LINKS`` links: an entry of a link
beyond them stays in Python (its GRE is handed back) until an index is free.
"""
import dataclasses

from twisted.logger import Logger

#: rp_pump_back_reason's codes (pump.h), for tests and logs
BACK_REASONS = {1: "sojourn", 2: "fragment", 3: "malformed", 4: "unknown_key",
                5: "wrong_source", 6: "budget", 7: "no_room", 8: "no_link"}
_NO_LINK = 8

_DROP_REASONS = ("not_ipv4", "truncated", "bad_header", "not_gre", "not_local", "sojourn", "no_call")
_DELTAS = 256
_NO_LIMIT = 1 << 62


@dataclasses.dataclass
class Flow:
    session: object   # the RelaySession
    call: object      # its calls.Call
    mux: object       # the mux Session
    installed: bool = False
    reader: object = None   # the link read's: the LinkReader it is installed in


class _Entries:
    """What both daemons' tables share: an entry per call that can carry GRE, keyed by the
    call's local ID, kept through callReady / callGone / sessionGone (the relay's calls)."""

    log = Logger()

    def __init__(self, module):
        self._ffi, self._lib, self._module = module.ffi, module.lib, module
        self._entries = {}            # key (the call's local ID) -> Flow

    def __len__(self):
        return len(self._entries)

    def callReady(self, session, call):
        """*call* of *session* can carry GRE (established, its mux session open): its key."""
        key, mux = call.local_id, session.mux
        if key is None or call.pns_id is None or mux is None or session.peerAddress is None:
            return
        old = self._entries.get(key)
        if old is not None and old.installed:
            self._clear(key, old)
        flow = self._entries[key] = Flow(session, call, mux)
        self._hold(key, call)
        self._ready(key, flow)

    def callGone(self, call):
        """*call* is released: its entry, and its key."""
        self._unhold(call)
        self._removeEntry(call)

    def sessionGone(self, session):
        """Every call of *session* (its mux session detached or closed): their entries.  Their
        keys stay the calls' until each is released (callGone): a detached call's GRE goes the
        Python path, counted as the gap's, not as GRE of no call."""
        for flow in [f for f in self._entries.values() if f.session is session]:
            self._removeEntry(flow.call)

    def _removeEntry(self, call):
        """*call* can no longer carry GRE here: its entry goes."""
        key = call.local_id
        flow = self._entries.get(key)
        if flow is None or flow.call is not call:
            return
        del self._entries[key]
        if flow.installed:
            self._clear(key, flow)

    def _hold(self, key, call):
        """*key* is *call*'s (a table may tell C, for GRE of no call)."""

    def _unhold(self, call):
        """*call* is released: its key, if still its own, is no call's."""


class RelayFlows:
    """The relay's native tables, kept through one set of calls: the GRE port's capture pump
    (:class:`FlowTable`, GRE from the facing peer) and the link read (:class:`LinkFlows`,
    GRE to it); a daemon with ``--gre-capture native`` has both."""

    def __init__(self):
        self.tables = []

    def add(self, table):
        self.tables.append(table)

    def callReady(self, session, call):
        for table in self.tables:
            table.callReady(session, call)

    def callGone(self, call):
        for table in self.tables:
            table.callGone(call)

    def sessionGone(self, session):
        for table in self.tables:
            table.sessionGone(session)


class FlowTable(_Entries):
    """The pump's C state and the entries behind it (see the module's docstring).

    Each live mux connection with an entry has a link index in C (:attr:`links`, at most
    ``RP_MAX_LINKS``; the lowest free one, reused once its last entry goes); each pump call
    frames for every active one, each within its own connection's budget (:meth:`begin`),
    into its own buffer, written or queued to that connection (:meth:`end`).

    Active: the links begun for each pump call, whose budget (``greRoom``, about 2 us a link
    with its flush) is asked before it.  A link is active from its entry's install; one
    without a frame in C for :attr:`idleCalls` pump calls stops being begun, so a wake-up
    costs only the links that carry GRE.  C hands back the next frame of such a link
    (``no_link``): the link is active again, and :meth:`retry` gives C the frame again in a
    call of its own, before anything after it is read."""

    idleCalls = 8   # pump calls without a frame after which a link is no longer begun

    def __init__(self, module, outCapacity, drops=None):
        super().__init__(module)
        ffi, lib = self._ffi, self._lib
        state = lib.rp_pump_new(outCapacity)
        if state == ffi.NULL:
            raise MemoryError("rp_pump_new")
        self.state = ffi.gc(state, lib.rp_pump_free)
        self.drops = drops            # the relay's DropCounter (attach)
        self.stats = None             # the port's GREStats (the port sets it)
        self.maxLinks = lib.RP_MAX_LINKS
        self.links = {}               # mux connection -> its link index in C
        self._holders = {}            # key -> the call it is held for in C (rp_pump_hold)
        self._linkConnections = [None] * self.maxLinks   # index -> mux connection
        self._live = []               # (index, connection) of the links in C, by index
        self._linkOf = {}             # key of an entry in C -> its link index
        self._inLink = [0] * self.maxLinks   # entries in C per link index
        self._calls = 0               # pump calls so far
        self._seen = [0] * self.maxLinks     # per link index: the last call with a frame of it
        self._sweepAt = self.idleCalls
        self.linkBegun = False        # the last call handed back a frame of an idle link
        self.begunLate = 0            # such frames (for the status: not handed back)
        self._waiting = False         # an entry waits in Python for a free link index
        self._reasons = ["watermark"] * self.maxLinks   # what a frame over a link's budget
        # of this pump call is dropped as
        self._counts = ffi.new("struct rp_counts *")
        self._deltas = ffi.new("struct rp_flow_delta[]", _DELTAS)
        self._outLink = ffi.new("uint32_t *")
        self._outLength = ffi.new("size_t *")
        self._outFrames = ffi.new("uint32_t *")
        self._head = ffi.new("double *")
        self.framed = 0               # frames C built for the mux (totals for the status)
        self.handedBack = 0           # frames C handed to the Python path
        self.written = 0              # frames C wrote to the link's TLS itself (step 3b)

    # -- the port ------------------------------------------------------------------------------

    def setLink(self, link):
        """*link*: a ``capture.LINK_LAYERS`` value (the capture's datalink)."""
        offset, typeAt, ipv4Type = link
        value = ipv4Type or b""
        self._lib.rp_pump_set_link(self.state, offset, -1 if typeAt is None else typeAt,
                                   value, len(value))

    def setLocal(self, packedAddresses):
        """The port's local addresses (4 bytes each): GRE to any other is "not_local"."""
        addresses = list(packedAddresses)
        if self._lib.rp_pump_set_local(self.state, b"".join(addresses), len(addresses)) < 0:
            raise MemoryError("rp_pump_set_local")

    def setNoCallShare(self, frames):
        """Frames of no call per window the pump hands back (``--gre-no-call-share``)."""
        self._lib.rp_pump_set_punt(self.state, frames)

    def begin(self, dropBefore, gate=None):
        """Before a pump call: the gate's threshold (and the gate, a sojourn.NativeGate's
        state, when C is to drop what is older itself), and each link's watermark room."""
        if self._waiting:
            self._admitWaiting()
        self._calls = calls = self._calls + 1
        if calls >= self._sweepAt:
            self._sweep()
        lib, state, reasons = self._lib, self.state, self._reasons
        lib.rp_pump_begin(state, dropBefore, self._ffi.NULL if gate is None else gate)
        for index, connection in self._live:
            room, handBack, reason = connection.greRoom()
            reasons[index] = reason
            maxPayload = connection.maxOutPayload if reason == "watermark" else _NO_LIMIT
            lib.rp_pump_begin_link(state, index, room, handBack, maxPayload)

    def end(self):
        """After a pump call: each link's frames to its mux connection, the counters folded.
        Returns the capture time of the last frame C took, or None."""
        lib, state, counts = self._lib, self.state, self._counts
        lib.rp_pump_take_counts(state, counts)
        links = counts.links
        for i in range(links) if links else ():
            out = lib.rp_pump_out(state, i, self._outLink, self._outLength, self._outFrames)
            frames, length = self._outFrames[0], self._outLength[0]
            connection = self._linkConnections[self._outLink[0]]
            self.framed += frames
            # to the link in C now when it is idle (step 3b), else (or the rest) at the turn's end
            written = connection.writeNative(self._module, out, length, frames)
            if written == length:
                self.written += frames
            else:
                connection.queueFrames(self._ffi.buffer(out + written, length - written)[:], frames)
        self._foldCounts(counts)
        return self._head[0] if lib.rp_pump_head(state, self._head) else None

    def fold(self, seen=None):
        """The counters of pump calls C made on its own (routeproxy.native.loop), folded as
        end folds one call's; *seen*: ``(link index, the last call with a frame of it)``,
        which C kept per call."""
        self._lib.rp_pump_take_counts(self.state, self._counts)
        self._foldCounts(self._counts, seen)

    def _foldCounts(self, counts, seen=None):
        lib, state, stats = self._lib, self.state, self.stats
        if seen is not None:
            self._seen[seen[0]] = seen[1]
        self.linkBegun = False
        if counts.handed_back:
            if lib.rp_pump_back_reason(state) == _NO_LINK:   # an idle link's: active again
                self._activate(lib.rp_pump_back_link(state))
                self.linkBegun = True
                self.begunLate += 1
                self.handedBack -= 1   # not to Python: retry gives it to C again
            self.handedBack += counts.handed_back
        if counts.received:
            stats.received += counts.received
            stats.delivered += counts.delivered
            stats.duplicates += counts.duplicates
            for reason in _DROP_REASONS:
                n = getattr(counts, reason)
                if n:
                    stats.dropped[reason] += n
            if counts.delivered:
                self._foldFlows(seen is None)

    def dropBefore(self):
        """The gate's threshold after a pump call: C's gate moves it as it drops."""
        return self._lib.rp_pump_drop_before(self.state)

    def retry(self, dropBefore, back, gate=None):
        """*back* (timestamp, frame), handed back by the last call because its link was not
        begun (:attr:`linkBegun`): through C again in a call of its own, now that it is.
        Returns None when C took it, else *back* for the Python path (its budget, say)."""
        self.begin(dropBefore, gate)
        timestamp, frame = back
        try:
            taken = self._lib.rp_pump_frame_again(self.state, frame, len(frame),
                                                  timestamp or 0.0, bool(timestamp))
        finally:
            head = self.end()
        return (None if taken == self._lib.RP_PUMP_TAKEN else back), head

    def backReason(self):
        return BACK_REASONS.get(self._lib.rp_pump_back_reason(self.state))

    def _foldFlows(self, markSeen=True):
        deltas, entries, reasons = self._deltas, self._entries, self._reasons
        seen, calls = self._seen, self._calls
        while True:
            n = self._lib.rp_pump_take_deltas(self.state, deltas, _DELTAS)
            for i in range(n):
                delta = deltas[i]
                if markSeen:
                    seen[delta.link] = calls
                flow = entries[delta.key]
                packets = delta.packets
                flow.session.greIn += packets
                call = flow.call
                call.gre_in += packets
                call.bytes_in += delta.bytes
                dropped, tooLarge = delta.dropped, delta.too_large
                flow.mux.greOut += packets - dropped - tooLarge
                if dropped or tooLarge:
                    self._dropped(flow, reasons[delta.link], dropped)
                    self._dropped(flow, "too_large", tooLarge)
            if n < _DELTAS:
                return

    def _dropped(self, flow, reason, n):
        """*n* GRE the mux refused, counted as RelaySession.greFromPeer and the mux count one."""
        if not n:
            return
        from routeproxy.relay import DROP_MUX_SEND
        flow.session.greDropped += n
        flow.mux.connection.stats.greDropped[reason] += n
        if self.drops is not None:
            self.drops.counts[DROP_MUX_SEND] += n - 1
            self.drops.add(DROP_MUX_SEND)

    # -- the relay ----------------------------------------------------------------------------

    def _ready(self, key, flow):
        index = self._linkIndex(flow.mux.connection)
        if index is not None:
            self._install(key, flow, index)
        # else more live links than C frames for: its GRE goes the Python path until an index
        # is free (_release)

    def _hold(self, key, call):
        self._holders[key] = call
        self._lib.rp_pump_hold(self.state, key, 1)   # a call's: never taken for GRE of no call

    def _unhold(self, call):
        key = call.local_id
        if key is not None and self._holders.get(key) is call:
            del self._holders[key]
            self._lib.rp_pump_hold(self.state, key, 0)

    def _clear(self, key, flow):
        self._lib.rp_pump_clear_flow(self.state, key)
        flow.installed = False
        index = self._linkOf.pop(key)
        self._inLink[index] -= 1
        if not self._inLink[index]:
            self._release(index)

    def _install(self, key, flow, index):
        from routeproxy.capture import packedAddress
        self._lib.rp_pump_set_flow(self.state, key, packedAddress(flow.session.peerAddress),
                                   flow.mux.id, flow.call.pns_id, index)
        flow.installed = True
        self._linkOf[key] = index
        self._inLink[index] += 1
        self._activate(index)

    def _linkIndex(self, connection):
        """*connection*'s link index, a free one if it has none (None: it is closed, or every
        index is taken)."""
        index = self.links.get(connection)
        if index is not None or connection.closed:
            return index
        try:
            index = self._linkConnections.index(None)
        except ValueError:
            return None
        self.links[connection] = index
        self._linkConnections[index] = connection
        if index:
            self.log.info("native GRE pump: calls of link {peer} framed in C (link {index})",
                          peer=connection.peerLabel, index=index)
        return index

    def _release(self, index):
        """No entry names link *index* any more: it is free for the next link."""
        connection = self._linkConnections[index]
        self._linkConnections[index] = None
        del self.links[connection]
        self._live = [live for live in self._live if live[0] != index]   # no longer begun
        if len(self._entries) > len(self._linkOf):
            self._waiting = True   # admitted before the next pump call, not in the relay's call

    def _activate(self, index):
        """Link *index* is begun for each pump call from the next on (a call, or a frame of
        it handed back because it was idle)."""
        self._seen[index] = self._calls
        connection = self._linkConnections[index]
        if connection is not None and all(live[0] != index for live in self._live):
            self._live = sorted(self._live + [(index, connection)], key=lambda live: live[0])

    def _sweep(self):
        """Every idleCalls pump calls: the links without a frame since the last sweep are no
        longer begun."""
        since, seen = self._calls - self.idleCalls, self._seen
        self._live = [live for live in self._live if seen[live[0]] > since]
        self._sweepAt = self._calls + self.idleCalls

    def _admitWaiting(self):
        """Entries that waited in Python for a link index get one while any is free."""
        self._waiting = False
        for key, flow in list(self._entries.items()):
            if not flow.installed:
                index = self._linkIndex(flow.mux.connection)
                if index is not None:
                    self._install(key, flow, index)

    def snapshot(self):
        return {"entries": len(self._entries),
                "in_c": len(self._linkOf),
                "links_in_c": len(self.links),
                "links": len({f.mux.connection for f in self._entries.values()}),
                "links_begun": len(self._live), "begun_late": self.begunLate,
                "framed": self.framed, "handed_back": self.handedBack, "written": self.written}


# -- the link read (docs/fastpath.md step 3a) ----------------------------------------------------


class LinkFlows(_Entries):
    """The link read's flow table: an entry per established call of an open mux session, in
    the C state (:class:`LinkReader`, routeproxy/native/link.c) of that session's mux
    connection: (mux session id, call tag ``C``) -> the port's raw socket for the session's
    local address, the facing peer's address and the GRE key the peer expects (``C`` from the
    LRP to the client, ``S`` from the RRP to pptpd: ``CallBook.gre_key``).  Kept by the relay
    as :class:`FlowTable` is (callReady / callGone / sessionGone); an entry also goes when the mux connection
    forgets its session (:meth:`LinkReader.sessionForgotten`) and when the port closes the
    sender it names (``GREPort.removeLocalAddress``)."""

    def __init__(self, module, port):
        super().__init__(module)
        self.port = port
        port.linkFlows = self
        self.taken = 0                # GRE frames C sent (or dropped sending), all links
        self.tlsReads = 0             # link socket wake-ups read in C (step 3b), all links
        self.tlsHandedBack = 0        # of them, left to Twisted's TLS part way
        self.tlsFlushed = 0           # of them, whose SSL_read left TLS records to send
        self.aged = 0                 # GRE frames read and dropped unsent: too old (sojourn)
        self.headerWritten = 0        # of the GRE C sent, with the IPv4 header C wrote
        self.headerRefused = 0        # refused there as over the MTU, sent on the GRE socket
        self.drops = None             # the relay's DropCounter (service.useNativePlane)

    def reader(self, connection):
        """A :class:`LinkReader` for *connection* (MuxConnection.nativeReader)."""
        return LinkReader(self, connection)

    def _ready(self, key, flow):
        reader = getattr(flow.mux.connection, "nativeReader", None)
        greKey = flow.session.book.gre_key(flow.call)
        if reader is None or greKey is None:
            return
        source = flow.session.localAddress
        fd = self.port.senderFileno(source)
        if fd is not None and reader.install(flow, fd, greKey, *self.port.headerSender(source)):
            flow.installed = True

    def _clear(self, key, flow):
        flow.installed = False
        flow.reader.clear(flow)

    def senderClosing(self, address):
        """The port closes its socket for *address*: no entry may send on it."""
        for key, flow in list(self._entries.items()):
            if flow.installed and flow.session.localAddress == address:
                self._clear(key, flow)

    def snapshot(self):
        return {"entries": len(self._entries),
                "in_c": sum(1 for f in self._entries.values() if f.installed),
                "sent_by_c": self.taken, "tls_reads": self.tlsReads,
                "tls_handed_back": self.tlsHandedBack, "tls_flushed": self.tlsFlushed,
                "sojourn_dropped": self.aged, "header_written": self.headerWritten,
                "header_refused": self.headerRefused}


class LinkReader:
    """One mux connection's C link read: :meth:`feed` takes the decrypted bytes, sends the GRE
    frames of its entries and returns the rest for the Python decoder (see link.h).

    And its TLS read (step 3b): once the C state has the stream (the connection's
    ``_readingNative``), :meth:`watchTLS` lets the link socket's readable wake-ups run
    :meth:`readTLS` (recv, decrypt, split, send, one C call) instead of Twisted's read and TLS
    (routeproxy.mux.linksocket.NativeTLSReader, which falls back to them for anything
    unusual).  ``tlsRead = False`` keeps the reads Twisted's (3a only)."""

    tlsRead = True

    def __init__(self, table, connection):
        module = table._module
        ffi, lib = self._ffi, self._lib = module.ffi, module.lib
        state = lib.rp_link_new()
        if state == ffi.NULL:
            raise MemoryError("rp_link_new")
        self.state = ffi.gc(state, lib.rp_link_free)
        self.table, self.connection = table, connection
        self._flows = {}              # (mux session id, tag C) -> Flow
        self._out = ffi.new("uint8_t **")
        self._outLength = ffi.new("size_t *")
        self._deltas = ffi.new("struct rp_link_delta[]", _DELTAS)
        self._info = ffi.new("struct rp_read_info *")
        self.tls = None               # the NativeTLSReader of the link's transport, or None
        self._tlsOf = False           # the transport self.tls was made for

    def install(self, flow, fd, greKey, headerFd=-1, ttl=0):
        """*flow*'s GRE to be sent on *fd*, keyed *greKey* (the facing peer's ID for the call);
        on *headerFd* with an IPv4 header of *ttl* where there is one (GREPort.headerSender)."""
        from routeproxy.capture import packedAddress
        key = (flow.mux.id, flow.call.pns_id)
        if self._lib.rp_link_set_flow(self.state, key[0], key[1], fd, headerFd, ttl,
                                      packedAddress(flow.session.peerAddress), greKey) < 0:
            return False
        self._flows[key] = flow
        flow.reader = self
        return True

    def clear(self, flow):
        key = (flow.mux.id, flow.call.pns_id)
        if self._flows.get(key) is flow:
            del self._flows[key]
            self._lib.rp_link_clear_flow(self.state, key[0], key[1])

    def sessionForgotten(self, sid):
        """The mux session *sid* is no longer open here (MuxConnection._forget)."""
        for key, flow in [(k, f) for k, f in self._flows.items() if k[0] == sid]:
            flow.installed = False
            self.clear(flow)

    def feed(self, data, maxPayload):
        """*data* (b"" to go on after RP_LINK_MORE): ``(bytes for the decoder, more)``."""
        lib = self._lib
        code = lib.rp_link_feed(self.state, data, len(data), maxPayload, self._out,
                                self._outLength)
        if code < 0:
            raise MemoryError("rp_link_feed")
        self._fold()
        n = self._outLength[0]
        return (self._ffi.buffer(self._out[0], n)[:] if n else b""), code == lib.RP_LINK_MORE

    @property
    def buffered(self):
        return self._lib.rp_link_buffered(self.state)

    def watchTLS(self):
        """The link socket's next reads in C, when its transport is Twisted's TLS over a
        socket and idle for reading (called by the connection while C has the stream)."""
        if not self.tlsRead:
            return
        transport = getattr(self.connection._link, "transport", None)
        if transport is not self._tlsOf:
            from routeproxy.mux.linksocket import NativeTLSReader
            self._tlsOf = transport
            self.tls = NativeTLSReader.over(self.table._module, transport, self)
        if self.tls is not None:
            self.tls.install()

    def readTLS(self, tlsIn, recv):
        """One rp_link_read (*recv*: a wake-up's, else its continuation after RP_READ_AGAIN):
        ``(flags, plaintext length, bytes for the decoder)``, C's counters folded.  With
        frames of the mux queued (a timer's, flushed on the next turn), C stops after the
        first record, as the mux writes them after Twisted's first record and before its
        next (so a later record's TLS error finds them written, as there)."""
        lib, info, connection = self._lib, self._info, self.connection
        flags = lib.rp_link_read(self.state, tlsIn, recv, bool(connection._control or connection._gre),
                                 connection._decoder.maxPayload, self._out, self._outLength, info,
                                 0.0)   # (C reads the clock if the gate needs it)
        self._fold()
        if flags & lib.RP_READ_NO_MEMORY:
            raise MemoryError("rp_link_read")
        n = self._outLength[0]
        return flags, info.plaintext, self._ffi.buffer(self._out[0], n)[:] if n else b""

    def _fold(self):
        """The counters the Python path updates per frame (RelaySession.datagramReceived,
        Session._datagramReceived, MuxConnection.dataReceived, GREPort.sendGRE)."""
        deltas, flows = self._deltas, self._flows
        while True:
            n = self._lib.rp_link_take_deltas(self.state, deltas, _DELTAS)
            for i in range(n):
                delta = deltas[i]
                flow = flows[(delta.session, delta.tag)]
                packets = delta.packets
                self.connection.stats.framesIn += packets
                self.table.taken += packets
                flow.mux.greIn += packets
                session, call = flow.session, flow.call
                session.greOut += packets
                call.gre_out += packets
                call.bytes_out += delta.bytes
                self.table.port.countSent(session.localAddress, session.peerAddress, delta.sent,
                                          delta.busy, delta.errors, delta.last_errno)
                if delta.aged:
                    self._aged(flow, delta.aged)
                self.table.headerWritten += delta.header_written
                self.table.headerRefused += delta.header_refused
            if n < _DELTAS:
                return

    def _aged(self, flow, n):
        """*n* GRE frames of *flow* read from the link and dropped unsent by the sojourn gate:
        received (framesIn, greIn), not sent, counted as the link's ``gre_ignored.sojourn``."""
        from routeproxy.relay import DROP_LINK_SOJOURN
        self.connection.stats.framesIn += n
        self.connection.stats.greIgnored["sojourn"] += n
        flow.mux.greIn += n
        flow.session.greDropped += n
        self.table.aged += n
        drops = self.table.drops
        if drops is not None:
            drops.counts[DROP_LINK_SOJOURN] += n - 1
            drops.add(DROP_LINK_SOJOURN)

    def gateOn(self, target, interval):
        """The sojourn gate on this link's receive queue (rp_link_set_gate; its reads' socket
        must stamp what it receives)."""
        self._lib.rp_link_set_gate(self.state, target, interval)

    def gate(self):
        """The gate's state (None when off), for the status."""
        g = self._lib.rp_link_gate(self.state)
        if not g.target:
            return None
        return {"target_ms": round(g.target * 1000.0, 3), "dropping": bool(g.dropping),
                "episodes": g.episodes}
