"""The calls of one PPTP control connection, and the call IDs this side of the proxy owns.

Each proxy rewrites one ID space (docs/architecture.md):

* the LRP faces the clients and rewrites pptpd's IDs: ``S`` (native, on the mux) <-> ``L``
  (what the client sees), so it is a ``CallBook(owner=PAC)``;
* the RRP faces pptpd and rewrites the clients' IDs: ``C`` <-> ``R``, a ``CallBook(owner=PNS)``.

The rule is the same on both sides: a native ID of the owned space arrives from the mux in
the message that introduces it (Outgoing-Call-Request/-Reply, Incoming-Call-Request/-Reply);
a local ID is allocated for it from the shared :class:`~routeproxy.callids.CallIDSpace` and
the facing peer only ever sees the local one.  Messages from the facing peer carry local IDs
and are mapped back.  Which field carries whose ID is :data:`routeproxy.pptp.CALL_ID_FIELDS`.

A :class:`CallBook` is a plain object: it never touches the network, so tests drive it with
messages.  Each relayed control connection owns one (its ``session``), and the GRE path
goes from a local ID to the call (one look-up in the space) to that session.
"""
import collections
import dataclasses
import time

from routeproxy import pptp
from routeproxy.pptp import PAC, PNS

_OTHER = {PNS: PAC, PAC: PNS}

TO_PEER = "to-peer"   # from the mux towards the facing peer (client or pptpd)
TO_MUX = "to-mux"     # from the facing peer towards the mux

# Messages whose own Call ID is new: the side that sends it has just chosen it.
INTRODUCING = frozenset({
    pptp.OutgoingCallRequest, pptp.OutgoingCallReply,
    pptp.IncomingCallRequest, pptp.IncomingCallReply,
})

# Messages that start a call; the replies above only add the replier's ID to one.
REQUESTS = frozenset({pptp.OutgoingCallRequest, pptp.IncomingCallRequest})

# Replies whose failure ends the call they answer.
_REPLY_SUCCESS = {
    pptp.OutgoingCallReply: pptp.OutgoingCallResult.CONNECTED,
    pptp.IncomingCallReply: pptp.IncomingCallResult.CONNECT,
}

_SENDER_TOWARDS = {
    # (side this book owns, direction) -> who sent the message
    (PAC, TO_PEER): PAC, (PAC, TO_MUX): PNS,   # LRP: mux carries pptpd's messages to clients
    (PNS, TO_PEER): PNS, (PNS, TO_MUX): PAC,   # RRP: mux carries clients' messages to pptpd
}


class UnknownCallID(ValueError):
    """A message names a call this control connection does not have."""

    def __init__(self, message, field, value):
        self.field = field
        self.value = value
        super().__init__(f"{message.NAME}.{field}={value} names no call of this connection")


class Call:
    """One call: its IDs in both native spaces and the local ID this side handed out."""

    __slots__ = ("book", "pns_id", "pac_id", "local_id", "established", "started",
                 "gre_in", "gre_out", "bytes_in", "bytes_out")

    def __init__(self, book, started=0.0):
        self.book = book
        self.started = started  # when its request passed (the unanswered-call timeout)
        self.pns_id = None    # C: chosen by the client; also the call's tag on the mux
        self.pac_id = None    # S: chosen by pptpd
        self.local_id = None  # L on the LRP, R on the RRP
        self.gre_in = self.gre_out = 0     # GRE packets from / to the facing peer
        self.bytes_in = self.bytes_out = 0  # their payload bytes
        self.established = False

    def native(self, owner):
        return self.pns_id if owner == PNS else self.pac_id

    def __repr__(self):
        return f"<Call C={self.pns_id} S={self.pac_id} local={self.local_id}>"


class CallBook:
    """The calls of one control connection, translating the IDs of space *owner*.

    *space* is the :class:`~routeproxy.callids.CallIDSpace` shared by every control
    connection of the same scope; the owner recorded there for each local ID is the
    :class:`Call`, so the GRE path finds a call from a local ID in one lookup.
    """

    def __init__(self, owner, space, session=None, clock=time.monotonic, tally=None, holder=None):
        if owner not in (PNS, PAC):
            raise ValueError(f"owner must be {PNS!r} or {PAC!r}")
        self.owner = owner
        self.space = space
        self.session = session    # the relayed control connection the GRE path delivers to
        self.clock = clock
        # calls by (space, holder: a client address, a link), and by (space, "*") in all,
        # shared by the books of one daemon: what the share of an ID space one holder may
        # take is checked against (a call counts from its request, before it has an ID)
        self.tally = tally if tally is not None else collections.Counter()
        self.holder = holder
        self._keys = ((space.name, holder), (space.name, "*"))
        self._by_native = {PNS: {}, PAC: {}}   # native ID -> Call
        self.calls = []

    def __len__(self):
        return len(self.calls)

    def by_tag(self, pns_id):
        """The call a mux GRE datagram names (its tag is the client's call ID)."""
        return self._by_native[PNS].get(pns_id)

    def gre_key(self, call):
        """The key GRE to the facing peer carries for *call*: the peer's own ID for it.

        The LRP faces the client (``C``), the RRP faces pptpd (``S``).
        """
        return call.pns_id if self.owner == PAC else call.pac_id

    def by_local(self, local_id):
        call = self.space.owner_of(local_id)
        return call if call is not None and call.book is self else None

    def translate(self, message, direction):
        """*message* as it must leave in *direction*; updates the book.

        Raises :class:`UnknownCallID` for a message that names a call this connection does
        not have (the caller drops it and logs), and
        :class:`~routeproxy.callids.CallIDExhausted` when no local ID is left.
        """
        return self.translate_call(message, direction)[0]

    def translate_call(self, message, direction):
        """(:meth:`translate`'s message, the :class:`Call` it concerns or None for a message
        of the whole connection): for a caller that routes calls, e.g. over several control
        connections (:mod:`routeproxy.callsplit`)."""
        cls = type(message)
        if cls not in pptp.CALL_ID_FIELDS:
            return message, None
        fields = pptp.call_ids(message, _SENDER_TOWARDS[self.owner, direction])
        alternates = pptp.ALTERNATE_OWNERS.get(cls, ())
        resolved = [self._resolve(field, direction, field.field in alternates) for field in fields]
        call = next((found for _, found in resolved if found is not None), None)
        if call is None:
            if cls not in REQUESTS:   # a reply answers a call that must exist already
                raise UnknownCallID(message, fields[0].field, fields[0].value)
            call = Call(self, self.clock())
            self.calls.append(call)
            for key in self._keys:
                self.tally[key] += 1
        changes = {}
        for field, (owner, found) in zip(fields, resolved):
            if found is not None and found is not call:
                raise UnknownCallID(message, field.field, field.value)
            ours = owner == self.owner
            if not (ours and direction == TO_MUX) and call.native(owner) is None:
                self._set_native(call, owner, field.value)
            if not ours:
                continue
            if direction == TO_MUX:
                changes[field.field] = call.native(owner)
            else:
                if call.local_id is None:
                    if cls not in INTRODUCING or field.field != "call_id":
                        raise UnknownCallID(message, field.field, field.value)
                    call.local_id = self.space.allocate(call)
                changes[field.field] = call.local_id
        if changes:
            message = dataclasses.replace(message, **changes)
        self._after(message, call)
        return message, call

    def _resolve(self, field, direction, ambiguous):
        """(the space *field*'s value is really in, the call it names or None).

        An *ambiguous* field (:data:`routeproxy.pptp.ALTERNATE_OWNERS`: pptpd puts its own ID
        in Call-Disconnect-Notify, accel-ppp the client's) is looked up in both spaces, the
        RFC's first.
        """
        owners = (field.owner, _OTHER[field.owner]) if ambiguous else (field.owner,)
        for owner in owners:
            if owner == self.owner and direction == TO_MUX:
                found = self.by_local(field.value)
            else:
                found = self._by_native[owner].get(field.value)
            if found is not None:
                return owner, found
        return field.owner, None

    def _set_native(self, call, owner, value):
        if owner == PNS:
            call.pns_id = value
        else:
            call.pac_id = value
        self._by_native[owner][value] = call

    def _after(self, message, call):
        cls = type(message)
        if cls in _REPLY_SUCCESS:
            if message.result_code == _REPLY_SUCCESS[cls]:
                call.established = True
                self._tell("callOpened", call)
            else:
                self.release(call)
        elif cls is pptp.CallDisconnectNotify:
            self.release(call)

    def release(self, call):
        """Forget *call* and give its local ID back to the scope."""
        if call not in self.calls:
            return
        self.calls.remove(call)
        for key in self._keys:
            self.tally[key] -= 1
            if self.tally[key] <= 0:
                del self.tally[key]
        for owner in (PNS, PAC):
            native = call.native(owner)
            if native is not None and self._by_native[owner].get(native) is call:
                del self._by_native[owner][native]
        if call.local_id is not None:
            self.space.release(call.local_id)
        if call.established:
            self._tell("callClosed", call)

    def _tell(self, event, call):
        """Tell the session a call opened or closed (its log lines), if it listens."""
        listener = getattr(self.session, event, None)
        if listener is not None:
            listener(call)

    def held(self):
        """Calls this book's holder has in this book's space (all its control connections)."""
        return self.tally[self._keys[0]]

    def space_used(self):
        """IDs of the space in use or promised to calls whose reply will need one."""
        return max(len(self.space), self.tally[self._keys[1]])

    def unanswered(self, before):
        """Calls whose request passed before *before* and got no answer yet, oldest first."""
        return [call for call in self.calls if not call.established and call.started < before]

    def release_all(self):
        """Free every call: the control connection is gone.  Returns the calls freed."""
        calls = list(self.calls)
        for call in calls:
            self.release(call)
        return calls
