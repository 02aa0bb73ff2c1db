"""How many calls one control connection, one client address or one link may hold.

Every call a client asks for takes a call ID from a space all clients share (the LRP's
``L``, the RRP's ``R`` per server).  So one control connection may hold ``maxCalls`` calls,
and one *holder* (a client address at the LRP, a link at the RRP) more than a share
``idShare`` of the space only while more than a share is still free for the others (so a
lone LRP may use most of a server's IDs, and a newcomer always finds room); a request beyond
either, or into a full space, is refused as a server with no room refuses it
(Outgoing-Call-Reply, general error, no resource), and counted.  Others carry on.

A call whose request is never answered holds its IDs until ``callTimeout``;
:func:`answers_for_unanswered` says what each side is then told so both forget it.
"""
from routeproxy import pptp
from routeproxy.pptp import PAC

REFUSED_CALLS_PER_CONNECTION = "calls_per_connection"
REFUSED_ID_SHARE = "id_share"
REFUSED_IDS_EXHAUSTED = "call_ids_exhausted"


def no_resource(request):
    """The Outgoing-Call-Reply refusing *request*: general error, no resource."""
    return pptp.OutgoingCallReply(
        call_id=0, peer_call_id=request.call_id,
        result_code=pptp.OutgoingCallResult.GENERAL_ERROR,
        error_code=pptp.ErrorCode.NO_RESOURCE)


class CallQuota:
    """The call limits of one relay (its ``limits``, its ``refusals`` counter)."""

    def __init__(self, relay):
        self.relay = relay

    def refuse(self, session, message):
        """The refusal to send back for *message*, or None to let it pass.

        Only an Outgoing-Call-Request for a call its connection does not have yet is checked.
        """
        book = session.book
        if type(message) is not pptp.OutgoingCallRequest or book is None:
            return None
        if book.by_tag(message.call_id) is not None:
            return None   # a repeat of a request already counted
        limits = self.relay.limits
        quota = limits.idQuota(book.space.capacity)
        if len(book) >= limits.maxCalls:
            reason = REFUSED_CALLS_PER_CONNECTION
        elif book.held() >= quota and book.space.capacity - book.space_used() <= quota:
            reason = REFUSED_ID_SHARE   # over its share while less than a share is left for others
        elif book.space_used() >= book.space.capacity:
            reason = REFUSED_IDS_EXHAUSTED
        else:
            return None
        self.relay.refusals.add(reason, f"{session.side.name} {session.peerLabel}: "
                                f"Outgoing-Call-Request for call ID {message.call_id}")
        return no_resource(message)


def answers_for_unanswered(book, call):
    """(to the facing peer, to the mux): what ends *call*, whose request got no answer.

    An outgoing call (the client asked, pptpd never answered) gets an Outgoing-Call-Reply
    failure on the client's side and a Call-Clear-Request on pptpd's; an incoming call
    (pptpd asked, the client never answered) an Incoming-Call-Reply failure on pptpd's side
    and a Call-Disconnect-Notify on the client's.  Each message carries the IDs the side it
    goes to knows (the facing peer sees this side's local IDs).
    """
    facing_pac = book.owner != PAC    # the RRP faces pptpd (the PAC); the LRP the client
    local = call.local_id
    if call.pac_id is None:           # outgoing: the PNS (client) is waiting
        pns_view = call.pns_id                                    # client's own ID
        pac_view = local if facing_pac else call.pns_id           # the ID pptpd knows for it
        to_pns = pptp.OutgoingCallReply(
            call_id=0, peer_call_id=pns_view,
            result_code=pptp.OutgoingCallResult.TIME_OUT, error_code=pptp.ErrorCode.NONE)
        to_pac = pptp.CallClearRequest(call_id=pac_view) if pac_view is not None else None
    else:                             # incoming: the PAC (pptpd) is waiting
        pac_view = call.pac_id
        pns_view = call.pac_id if facing_pac else local           # the ID the client knows
        to_pac = pptp.IncomingCallReply(
            call_id=0, peer_call_id=pac_view,
            result_code=pptp.IncomingCallResult.GENERAL_ERROR, error_code=pptp.ErrorCode.NONE)
        to_pns = pptp.CallDisconnectNotify(call_id=pns_view,
                                           result_code=pptp.DisconnectResult.GENERAL_ERROR) \
            if pns_view is not None else None
    to_peer, to_mux = (to_pac, to_pns) if facing_pac else (to_pns, to_pac)
    return [m for m in (to_peer,) if m is not None], [m for m in (to_mux,) if m is not None]
