"""The calls of one client control connection, spread over several control connections to pptpd.

RFC 2637 lets one control connection carry many calls, and pptp-linux puts every pppd of a
host dialling the same server on one (its call manager).  pptpd (poptop) serves one call per
control connection and ends the connection on a second Outgoing-Call-Request.  The RRP makes
them meet: a :class:`CallSplitter`, composed into an RRP
:class:`~routeproxy.relay.RelaySession` when the profile's ``calls-per-connection`` is set,
keeps the session's own control connection to the server (the *primary* upstream, which
carries the client's Start-Control-Connection and Echo exchanges) and opens another
(:class:`Upstream`: its own Start-Control-Connection, the server's Echo-Requests answered
here) for each call the open ones have no room for.

Teardown maps both ways: the client's Stop-Control-Connection-Request stops every upstream
connection; an upstream connection that ends takes only its own calls, each answered to the
client with a Call-Disconnect-Notify (or a failed Outgoing-Call-Reply if it was not yet
connected); when the primary ends while another is up, that one becomes the primary.

The calls stay in the session's one :class:`~routeproxy.calls.CallBook`, their ``R`` drawn
from the server address's space, and every upstream connection is dialled from the session's
own local address to the same server address.  So the per-packet GRE path does not change:
GRE from the server is found by (server address, ``R``) in one look-up, the source check
against the session's server address still holds, and GRE to the server leaves from the
address pptpd bound each call's GRE to (the control connection's local address).
"""
import itertools

from twisted.logger import Logger

from routeproxy import pptp

CONNECTING, STARTING, READY, STOPPING, CLOSED = "connecting", "starting", "ready", "stopping", "closed"


class UpstreamCounters:
    """The RRP's extra upstream connections (beyond each session's first), for its snapshot."""

    def __init__(self):
        self.opened = 0      # dialled and answered the Start-Control-Connection
        self.failed = 0      # could not be dialled, or the server refused the start
        self.lost = 0        # ended by the server or the network while carrying calls
        self.open = 0

    def snapshot(self):
        return {"open": self.open, "opened": self.opened, "failed": self.failed, "lost": self.lost}


class Upstream:
    """One control connection to the server and the calls routed over it.

    A secondary one is the receiver of its own ``PPTPControlProtocol``; the primary's
    protocol reports to the session, as when nothing is split.
    """

    def __init__(self, splitter, number, primary=False):
        self.splitter = splitter
        self.number = number
        self.primary = primary
        self.protocol = None
        self.state = READY if primary else CONNECTING
        self.calls = []         # the session's Calls routed here (pruned when they end)
        self.held = []          # messages waiting for the server's Start-Control-Connection-Reply
        self.label = "?"        # local address:port
        self.stopTimer = None

    def liveCalls(self):
        book = self.splitter.session.book
        self.calls = [c for c in self.calls if c.local_id is not None and book.by_local(c.local_id) is c]
        return self.calls

    def send(self, message):
        if self.state in (CONNECTING, STARTING):
            self.held.append(message)
        elif self.primary:
            self.splitter.session.sendToPeer(message)
        elif self.protocol is not None:
            self.splitter.session.controlOut += message.LENGTH
            self.protocol.sendMessage(message)

    # --- PPTPControlProtocol's receiver (secondary upstreams) ----------------------------

    def peerConnected(self, protocol):
        self.protocol = protocol
        session = self.splitter.session
        if self.state == CLOSED or self.splitter.stopping:   # dialled, then not needed
            protocol.transport.loseConnection()
            return
        peer, local = protocol.transport.getPeer(), protocol.transport.getHost()
        self.label = f"{local.host}:{local.port}"
        if (peer.host, local.host) != (session.peerAddress, session.localAddress):
            # GRE of its calls would come from, or have to leave from, another address.
            self.splitter.ended(self, f"connected {local.host} -> {peer.host}, not "
                                      f"{session.localAddress} -> {session.peerAddress}")
            protocol.transport.loseConnection()
            return
        self.state = STARTING
        protocol.sendMessage(self.splitter.startRequest())

    def peerMessage(self, message):
        self.splitter.fromSecondary(self, message)

    def peerFailed(self, error):
        self.splitter.ended(self, f"bad PPTP from the server: {error.reason}")
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.loseConnection()

    def peerClosed(self, why):
        self.protocol = None
        self.splitter.ended(self, why)

    def stop(self, reason=pptp.StopReason.NONE):
        """Stop-Control-Connection-Request, and close after the reply (or the time-out)."""
        if self.state in (STOPPING, CLOSED) or self.protocol is None:
            return
        self.state = STOPPING
        self.protocol.sendMessage(pptp.StopControlConnectionRequest(reason=reason))
        self.stopTimer = self.splitter.clock.callLater(self.splitter.stopTimeout, self.hangUp)

    def hangUp(self):
        self.stopTimer = None
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.loseConnection()

    def snapshot(self):
        peer = self.splitter.session.peer
        if self.primary and peer is not None and peer.transport is not None:
            local = peer.transport.getHost()
            self.label = f"{local.host}:{local.port}"
        return {"connection": self.number, "primary": self.primary, "state": self.state,
                "local": self.label, "calls": [c.pns_id for c in self.liveCalls()]}


class CallSplitter:
    """The upstream connections of one RRP session, at most *limit* calls on each.

    *dial(receiver)* connects a new control connection to the server from the session's
    local address and returns a Deferred; *counters* is the RRP's :class:`UpstreamCounters`.
    """

    log = Logger()

    def __init__(self, session, limit, dial, clock, counters, stopTimeout=5.0):
        self.session = session
        self.limit = limit
        self.dial = dial
        self.clock = clock
        self.counters = counters
        self.stopTimeout = stopTimeout
        self.primary = Upstream(self, 1, primary=True)
        self.upstreams = [self.primary]
        self.carrier = {}             # Call -> Upstream
        self.clientStart = None       # the client's Start-Control-Connection-Request
        self.stopping = False         # the client asked to stop, or the session is closing
        self._numbers = itertools.count(2)

    def startRequest(self):
        """What a new upstream connection opens with: the client's own request, as pptpd
        saw it on the primary (its host name and vendor)."""
        return self.clientStart or pptp.StartControlConnectionRequest()

    # --- from the client -----------------------------------------------------------------

    def sendToServer(self, message, call):
        """A message from the client (call IDs already rewritten) to the connection it concerns."""
        if call is None:
            if isinstance(message, pptp.StartControlConnectionRequest):
                self.clientStart = message
            elif isinstance(message, pptp.StopControlConnectionRequest):
                self.stopping = True
                for upstream in self.upstreams[1:]:
                    if upstream.state == READY:
                        upstream.stop(message.reason)
                    else:
                        upstream.hangUp()
            self.primary.send(message)
            return
        upstream = self.carrier.get(call)
        if upstream is None:
            # A new outgoing call goes where there is room; anything else the client says
            # about a call we have not routed (an incoming call) belongs to the primary.
            isNew = isinstance(message, pptp.OutgoingCallRequest)
            upstream = self._room() if isNew else self.primary
            upstream.calls.append(call)
            self.carrier[call] = upstream
        upstream.send(message)

    def _room(self):
        for upstream in self.upstreams:
            if upstream.state not in (STOPPING, CLOSED) and (
                    not self.limit or len(upstream.liveCalls()) < self.limit):
                return upstream
        return self._open()

    def _open(self):
        upstream = Upstream(self, next(self._numbers))
        self.upstreams.append(upstream)
        d = self.dial(upstream)

        def failed(failure):
            self.counters.failed += 1
            self.ended(upstream, f"cannot connect: {failure.getErrorMessage()}")

        d.addErrback(failed)
        return upstream

    # --- from a secondary upstream -------------------------------------------------------

    def fromSecondary(self, upstream, message):
        """A message from a secondary connection: its own start, echo and stop are answered
        here; what concerns its calls goes to the client."""
        if upstream.state == CLOSED:
            return
        if isinstance(message, pptp.StartControlConnectionReply):
            if message.result_code != pptp.StartResult.SUCCESS:
                self.counters.failed += 1
                self.ended(upstream, f"server refused the start (result {message.result_code}, "
                                     f"error {message.error_code})")
                upstream.hangUp()
                return
            if upstream.state == STARTING:
                self._ready(upstream)
        elif isinstance(message, pptp.EchoRequest):
            upstream.protocol.sendMessage(pptp.EchoReply(identifier=message.identifier,
                                                         result_code=pptp.EchoResult.OK))
        elif isinstance(message, pptp.StopControlConnectionRequest):
            upstream.protocol.sendMessage(pptp.StopControlConnectionReply(result_code=pptp.StopResult.OK))
            upstream.state = STOPPING
            if self._endCalls(upstream, "the server stopped the connection"):
                self.counters.lost += 1
        elif isinstance(message, pptp.StopControlConnectionReply):
            upstream.hangUp()
        elif not isinstance(message, (pptp.EchoReply, pptp.StartControlConnectionRequest)):
            self.session.peerMessage(message)
            if upstream.state == READY and not upstream.liveCalls():
                upstream.stop()   # its last call has ended

    def _ready(self, upstream):
        upstream.state = READY
        self.counters.opened += 1
        self.counters.open += 1
        self.log.info("RRP upstream connection {n} opened: client {client}, server {server} "
                      "from {local}", n=upstream.number, client=self.session.clientLabel,
                      server=self.session.peerLabel, local=upstream.label)
        held, upstream.held = upstream.held, []
        for message in held:
            upstream.send(message)

    # --- ends ------------------------------------------------------------------------------

    def ended(self, upstream, why):
        """*upstream* is gone: end its calls towards the client; the session carries on."""
        if upstream.state == CLOSED:
            return
        wasOpen = upstream.state in (READY, STOPPING)
        ending = self._endCalls(upstream, why)
        if upstream.stopTimer is not None and upstream.stopTimer.active():
            upstream.stopTimer.cancel()
        upstream.state = CLOSED
        if upstream in self.upstreams:
            self.upstreams.remove(upstream)
        if wasOpen:
            self.counters.open -= 1
        if ending and not self.stopping:
            self.counters.lost += 1
        self.log.info("RRP upstream connection {n} closed: client {client}, server {server} from "
                      "{local}; calls ended: {calls}; reason: {why}", n=upstream.number,
                      client=self.session.clientLabel, server=self.session.peerLabel,
                      local=upstream.label, calls=ending or "none", why=why)

    def _endCalls(self, upstream, why):
        """Tell the client its calls on *upstream* are over; returns them as text."""
        calls = list(upstream.liveCalls())
        upstream.calls = []
        upstream.held = []
        mux = self.session.mux
        for call in calls:
            self.carrier.pop(call, None)
            if call.pac_id is None:     # not answered yet: the call fails
                answer = pptp.OutgoingCallReply(call_id=0, peer_call_id=call.pns_id,
                                                result_code=pptp.OutgoingCallResult.GENERAL_ERROR,
                                                error_code=pptp.ErrorCode.PAC_ERROR)
            else:
                answer = pptp.CallDisconnectNotify(call_id=call.pac_id,
                                                   result_code=pptp.DisconnectResult.LOST_CARRIER,
                                                   call_statistics=why.encode()[:128])
            if mux is not None and not self.stopping:
                mux.sendControl(answer.pack())
            self.session.book.release(call)
        return ", ".join(f"C={c.pns_id} S={c.pac_id} R={c.local_id}" for c in calls)

    def primaryLost(self, why):
        """The primary connection ended.  True if another took its place (its calls ended,
        the session carries on); False when the session must close."""
        ready = [u for u in self.upstreams[1:] if u.state == READY]
        if self.stopping or not ready:
            return False
        old, new = self.primary, ready[0]
        ending = self._endCalls(old, why)
        old.state = CLOSED
        self.upstreams.remove(old)
        self.counters.lost += 1 if ending else 0
        self.counters.open -= 1       # the new primary no longer counts as an extra one
        new.primary = True
        self.primary = new
        self.session.peer = new.protocol
        new.protocol.session = self.session
        self.log.info("RRP primary connection to {server} of client {client} lost ({why}); calls "
                      "ended: {calls}; upstream connection {n} carries on as the primary",
                      server=self.session.peerLabel, client=self.session.clientLabel, why=why,
                      calls=ending or "none", n=new.number)
        return True

    def closeAll(self):
        """The session is closing: stop and close every secondary connection."""
        self.stopping = True
        for upstream in list(self.upstreams[1:]):
            if upstream.protocol is not None:
                if upstream.state == READY:
                    upstream.protocol.sendMessage(pptp.StopControlConnectionRequest(
                        reason=pptp.StopReason.NONE))
                upstream.hangUp()
            self.ended(upstream, "the session closed")

    def snapshot(self):
        return [u.snapshot() for u in self.upstreams]
