"""The PPTP messages that end a session in order, when a proxy (not a peer) ends it.

A proxy that stops, or whose reload removed a session's permission or profile, ends each
session as the peer's own counterpart would: its calls are cleared, then the control
connection is stopped (RFC 2637 s.2.3, s.2.12, s.2.13).  Each side speaks to two parties:

* its facing peer, in the peer's IDs (the side's own ``L``/``R``): the LRP plays the PAC
  towards its client (Call-Disconnect-Notify), the RRP plays the PNS towards pptpd
  (Call-Clear-Request);
* the mux, in native IDs, as the far peer's counterpart would: the far proxy then rewrites
  and forwards them, so the far peer hears the same teardown.
"""
from routeproxy import pptp

__all__ = ["to_peer", "to_mux"]


SHUTDOWN = (pptp.DisconnectResult.ADMIN_SHUTDOWN, pptp.StopReason.STOP_LOCAL_SHUTDOWN)


def _clear(owner, call_id, result):
    """The message with which the role *owner* ends one call, carrying its own *call_id*:
    the PAC sends Call-Disconnect-Notify (with *result*), the PNS Call-Clear-Request."""
    if owner == pptp.PAC:
        return pptp.CallDisconnectNotify(call_id=call_id, result_code=result)
    return pptp.CallClearRequest(call_id=call_id)


def to_peer(owner, calls, why=SHUTDOWN):
    """What a side owning *owner*'s ID space sends its facing peer: each call ended with the
    ID the peer knows (``local_id``), then Stop-Control-Connection-Request; as (message,
    call) pairs, the call None for the Stop.  *why* is the (Call-Disconnect-Notify result,
    Stop reason) pair: an administrative shutdown unless said otherwise.

    The LRP owns PAC IDs and stands as the PAC to its client; the RRP owns PNS IDs and
    stands as the PNS to pptpd."""
    result, reason = why
    return ([(_clear(owner, call.local_id, result), call) for call in calls
             if call.local_id is not None]
            + [(pptp.StopControlConnectionRequest(reason=reason), None)])


def to_mux(owner, calls):
    """What the same side sends the far proxy through the mux, in native IDs, as the far
    peer's counterpart would: the LRP speaks as the PNS (Call-Clear-Request, ``C``), the
    RRP as the PAC (Call-Disconnect-Notify, ``S``)."""
    other = pptp.PNS if owner == pptp.PAC else pptp.PAC
    native = [call.native(other) for call in calls]
    result, reason = SHUTDOWN
    return ([_clear(other, n, result) for n in native if n is not None]
            + [pptp.StopControlConnectionRequest(reason=reason)])
