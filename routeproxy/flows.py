"""The LRP's flow table for the native capture pump (docs/fastpath.md step 3a).

One :class:`FlowTable` per GRE port that captures with ``--gre-capture native``: the C pump's
state (routeproxy/native/pump.c) and, beside it, what Python needs to fold the pump's
counters back.  An entry per call that can carry GRE: its key is the LRP's call ID ``L``
(what the client keys GRE with), and it holds the client's address, the mux session's id and
the call's tag ``C``.  The relay maintains it through four calls (:class:`routeproxy.relay.
RelaySession`): :meth:`callReady` when a call is established on an open mux session (and
again when a detached session resumes), :meth:`callGone` when the call is released, the
session closes, the mux session goes away or the link is lost (every one of which releases
the call or detaches the session first).

Around each pump call the port calls :meth:`begin` (the sojourn gate's threshold, the GRE
watermark's room) and :meth:`end`, which writes the frames C built to the link's TLS in C
when the link is idle (``MuxConnection.writeNative``, step 3b), else queues them on the mux
connection (``MuxConnection.queueFrames``), and folds the counters into the port's, the sessions', the
calls' and the mux's: the same ones the Python path updates, so the status is the same.

Entries go in C only for the one mux connection the first live entry names (the LRP has one
link at a time); an entry on another connection stays in Python and its GRE is handed back.
"""
import dataclasses

from twisted.logger import Logger

#: rp_pump_back_reason's codes (pump.h), for tests and logs
BACK_REASONS = {1: "sojourn", 2: "fragment", 3: "malformed", 4: "unknown_key",
                5: "wrong_source", 6: "budget", 7: "no_room"}

_DROP_REASONS = ("not_ipv4", "truncated", "bad_header", "not_gre", "not_local")
_DELTAS = 256
_NO_LIMIT = 1 << 62


@dataclasses.dataclass
class Flow:
    session: object   # the RelaySession
    call: object      # its calls.Call
    mux: object       # the mux Session
    installed: bool = False


class FlowTable:
    """The pump's C state and the entries behind it (see the module's docstring)."""

    log = Logger()

    def __init__(self, module, outCapacity, drops=None):
        ffi, lib = self._ffi, self._lib = module.ffi, module.lib
        self._module = module
        state = lib.rp_pump_new(outCapacity)
        if state == ffi.NULL:
            raise MemoryError("rp_pump_new")
        self.state = ffi.gc(state, lib.rp_pump_free)
        self.drops = drops            # the relay's DropCounter (attach)
        self.stats = None             # the port's GREStats (the port sets it)
        self.connection = None        # the mux connection whose entries are in C
        self._entries = {}            # key L -> Flow
        self._reason = "watermark"    # what a frame over this pump call's budget is dropped as
        self._counts = ffi.new("struct rp_counts *")
        self._deltas = ffi.new("struct rp_flow_delta[]", _DELTAS)
        self._outLength = ffi.new("size_t *")
        self._outFrames = ffi.new("uint32_t *")
        self._head = ffi.new("double *")
        self.framed = 0               # frames C built for the mux (totals for the status)
        self.handedBack = 0           # frames C handed to the Python path
        self.written = 0              # frames C wrote to the link's TLS itself (step 3b)

    def __len__(self):
        return len(self._entries)

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
            raise ValueError(f"more than {self._lib.RP_MAX_LOCAL} local addresses")

    def begin(self, dropBefore):
        """Before a pump call: the gate's threshold and the watermark's room."""
        connection = self.connection
        if connection is None:
            room, handBack, self._reason, maxPayload = 0, 0, "watermark", _NO_LIMIT
        else:
            room, handBack, self._reason = connection.greRoom()
            maxPayload = connection.maxOutPayload if self._reason == "watermark" else _NO_LIMIT
        self._lib.rp_pump_begin(self.state, dropBefore, room, handBack, maxPayload)

    def end(self):
        """After a pump call: its frames to the mux, its counters folded.  Returns the
        capture time of the last frame C took, or None."""
        lib, state = self._lib, self.state
        out = lib.rp_pump_out(state, self._outLength, self._outFrames)
        frames = self._outFrames[0]
        if frames:
            self.framed += frames
            length, connection = self._outLength[0], self.connection
            # to the link in C now when it is idle (step 3b), else (or the rest) at the turn's end
            written = connection.writeNative(self._module, out, length, frames)
            if written == length:
                self.written += frames
            else:
                connection.queueFrames(self._ffi.buffer(out + written, length - written)[:], frames)
        counts = self._counts
        lib.rp_pump_take_counts(state, counts)
        stats = self.stats
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
                self._foldFlows()
        return self._head[0] if lib.rp_pump_head(state, self._head) else None

    def backReason(self):
        return BACK_REASONS.get(self._lib.rp_pump_back_reason(self.state))

    def _foldFlows(self):
        deltas, entries = self._deltas, self._entries
        while True:
            n = self._lib.rp_pump_take_deltas(self.state, deltas, _DELTAS)
            for i in range(n):
                delta = deltas[i]
                flow = entries[delta.key]
                packets = delta.packets
                flow.session.greIn += packets
                call = flow.call
                call.gre_in += packets
                call.bytes_in += delta.bytes
                dropped, tooLarge = delta.dropped, delta.too_large
                flow.mux.greOut += packets - dropped - tooLarge
                if dropped or tooLarge:
                    self._dropped(flow, self._reason, dropped)
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

    def callReady(self, session, call):
        """*call* of *session* can carry GRE (established, its mux session open): its key."""
        key, mux = call.local_id, session.mux
        if key is None or call.pns_id is None or mux is None or session.peerAddress is None:
            return
        old = self._entries.get(key)
        if old is not None and old.installed:
            self._lib.rp_pump_clear_flow(self.state, key)
        flow = self._entries[key] = Flow(session, call, mux)
        connection = mux.connection
        if self.connection is not connection:
            if self.connection is not None and not self.connection.closed:
                return   # another link's: its GRE goes the Python path
            self._switch(connection)
        self._install(key, flow)

    def callGone(self, call):
        """*call* can no longer carry GRE (released, or its session detached or closed)."""
        key = call.local_id
        flow = self._entries.get(key)
        if flow is None or flow.call is not call:
            return
        del self._entries[key]
        if flow.installed:
            self._lib.rp_pump_clear_flow(self.state, key)
        if not self._entries:
            self.connection = None

    def sessionGone(self, session):
        """Every call of *session* (its mux session detached or closed)."""
        for flow in [f for f in self._entries.values() if f.session is session]:
            self.callGone(flow.call)

    def _install(self, key, flow):
        from routeproxy.capture import packedAddress
        self._lib.rp_pump_set_flow(self.state, key, packedAddress(flow.session.peerAddress),
                                   flow.mux.id, flow.call.pns_id)
        flow.installed = True

    def _switch(self, connection):
        """C's entries become *connection*'s (the last link is gone)."""
        self._lib.rp_pump_clear_flows(self.state)
        if self.connection is not None:
            self.log.info("native GRE pump: calls of link {peer} now framed in C",
                          peer=connection.peerLabel)
        self.connection = connection
        for key, flow in self._entries.items():
            flow.installed = False
            if flow.mux.connection is connection:
                self._install(key, flow)

    def snapshot(self):
        return {"entries": len(self._entries),
                "in_c": sum(1 for f in self._entries.values() if f.installed),
                "framed": self.framed, "handed_back": self.handedBack, "written": self.written}
