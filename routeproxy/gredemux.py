"""GRE from the facing peers to the call it belongs to: one demultiplexer for both daemons.

The GRE port hands every captured datagram here (``IGREReceiver``).  The key of enhanced GRE
is the receiver's call ID, which on this hop is an ID this side handed out, so one look-up in
the peer address's space (:mod:`routeproxy.scopes`) finds the call; the call's control
connection must come from the same address, or anyone could inject into a call by guessing
its ID.  What is not delivered is counted by reason (and logged, rate-limited).
"""
import collections

from zope.interface import implementer

from routeproxy import gre
from routeproxy.greport import IGREReceiver

DROP_UNKNOWN_SOURCE = "gre_unknown_source"     # no space serves that address (RRP: not a server)
DROP_BAD_GRE = "gre_malformed"
DROP_UNKNOWN_CALL = "gre_unknown_call_id"
DROP_WRONG_SOURCE = "gre_wrong_source"         # the call belongs to another address


@implementer(IGREReceiver)
class GREDemultiplexer:
    """Delivers ``greReceived(src, dst, data)`` to ``session.greFromPeer(call, seq, ack, payload)``."""

    def __init__(self, scopes, drops):
        self.scopes = scopes
        self.drops = drops
        self.peerAddresses = collections.Counter()   # addresses of live control connections

    def acceptsFragment(self, src, dst, head):
        """Fragments are held only from an address with a live session, and a first fragment
        only if its key names a call of that address."""
        if src not in self.peerAddresses:
            return False
        if head is None or len(head) < 8:
            return True
        space = self.scopes.lookup(src)
        call = space.owner_of(int.from_bytes(head[6:8], "big")) if space is not None else None
        return call is not None and call.book.session.peerAddress == src

    def greReceived(self, src, dst, data):
        space = self.scopes.lookup(src)
        if space is None:
            self.drops.add(DROP_UNKNOWN_SOURCE, f"from {src}")
            return
        try:
            callID, seq, ack, payload = gre.split_gre(data)
        except gre.GREError as e:
            self.drops.add(DROP_BAD_GRE, f"from {src}: {e}")
            return
        call = space.owner_of(callID)
        if call is None:
            self.drops.add(DROP_UNKNOWN_CALL, f"call ID {callID} from {src}")
            return
        session = call.book.session
        if src != session.peerAddress:
            self.drops.add(DROP_WRONG_SOURCE, f"call ID {callID} belongs to "
                           f"{session.peerAddress}, came from {src}")
            return
        session.greFromPeer(call, seq, ack, payload)
