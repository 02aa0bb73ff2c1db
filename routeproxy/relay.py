"""The relay core both daemons share: one relayed control connection, and the set of them.

A :class:`RelaySession` joins a PPTP control connection on this side (a client at the LRP,
pptpd at the RRP) to one mux session.  It parses both streams, rewrites the call IDs this
side owns (:mod:`routeproxy.calls`), passes GRE between the GRE port and the mux, and logs
one line when it closes.  It is one concrete class, composed (as twisted.names composes
resolvers) of:

* a :class:`Side`: the side's name, the ID space it owns, and what it answers when that
  space has no ID left;
* on the LRP only, an *opener* (:class:`routeproxy.upstream.UpstreamOpener`) that stands in
  for the mux session until the upstream is open, then hands it over through
  :meth:`RelaySession.muxOpened`.

:class:`Relay` is what a daemon keeps of its sessions: the live ones, the totals of those
that ended, drops by reason, the GRE port and the ID scopes; its
:class:`~routeproxy.gredemux.GREDemultiplexer` is the GRE port's receiver.

Echo-Request/-Reply pass through untouched: pptpd's keepalive then proves the whole path
(client, both proxies and the link) is alive, and a dead path ends the call as it would
without a proxy, instead of a proxy answering for a client that has gone.  The one
exception is a lost link waiting for a resume (:mod:`routeproxy.detach`).
"""
import collections
import dataclasses
from typing import Callable, Optional

from twisted.logger import Logger

from routeproxy import calls, gre, pptp, teardown
from routeproxy.callids import CallIDExhausted
from routeproxy.capture import GREIOError
from routeproxy.control import MuxReadingControl
from routeproxy.detach import DROP_MUX_DETACHED, Gap
from routeproxy.gredemux import GREDemultiplexer
from routeproxy.limits import DEFAULT as DEFAULT_LIMITS
from routeproxy.mux.frames import Reason, reasonName
from routeproxy.quota import CallQuota, answers_for_unanswered
from routeproxy.stats import DropCounter, LimitedLog, printable

DROP_MUX_GRE_NO_CALL = "mux_gre_no_call"   # a mux GRE frame names no call of its session
DROP_MUX_NOT_OPEN = "mux_not_open"         # GRE from the peer before the mux session opened
DROP_MUX_SEND = "mux_send"                 # the mux refused it (watermark: link congested)
DROP_LINK_SOJOURN = "link_sojourn"         # read from the link too old: its receive queue stood
DROP_CALL_NOT_READY = "gre_call_not_ready"  # GRE for a call the far side has not answered yet
IGNORED_UNKNOWN_CALL = "unknown_call_id"   # a control message naming no call of its connection
IGNORED_BAD_IDS = "bad_call_ids"           # a control message whose IDs cannot be translated


@dataclasses.dataclass(frozen=True)
class Side:
    """What differs between the LRP's and the RRP's sessions: data, not subclasses."""

    name: str                 # "LRP" or "RRP", the first word of its log lines
    peerRole: str             # what its facing peer is: "client" (LRP) or "server" (RRP)
    owner: str                # the ID space it rewrites: pptp.PAC (LRP) or pptp.PNS (RRP)
    localName: str            # what its own IDs are called: "L" or "R"
    # A message from the mux that needs a local ID when none is left -> what to send back
    # through the mux instead, or None to end the session.
    answerExhausted: Callable[[object], Optional[object]] = lambda message: None


class RelaySession:
    """One relayed control connection (a plain object; tests drive it without a network).

    *relay* is the daemon's :class:`Relay`; *opener* stands in for the mux session until it
    is open (LRP), or is None when the mux session comes first (RRP).
    """

    log = Logger()

    def __init__(self, side, relay, opener=None, clientLabel="", holder=None):
        self.side = side
        self.relay = relay
        self.opener = opener
        self.upstreams = None             # RRP: a callsplit.CallSplitter, when calls are split
        self.clientLabel = clientLabel    # the RRP names the real client in its lines
        self.holder = holder              # whose share of the ID space its calls count in
        self._callTimer = None
        self.book = None                  # CallBook, once the peer's address is known
        self.peer = None                  # PPTPControlProtocol
        self.mux = None                   # the open mux session
        self.peerAddress = None
        self.localAddress = None
        self.peerLabel = "?"
        self.muxDecoder = pptp.PPTPStreamDecoder()
        self.closed = False
        self.closeReason = None
        self.controlIn = self.controlOut = 0   # bytes from / to the peer
        self.greIn = self.greOut = 0           # packets from / to the peer
        self.greDropped = 0
        self.callsEnded = 0
        self._greAddress = None   # the local address we asked the GRE port to serve
        self.gap = None           # a detach.Gap while the link is lost and may resume
        self.echoesPending = 0    # the peer's Echo-Requests the far side has not answered yet

    # --- the peer (client or pptpd) ----------------------------------------------------

    def peerConnected(self, protocol):
        self.peer = protocol
        peer, local = protocol.transport.getPeer(), protocol.transport.getHost()
        self.peerAddress, self.localAddress = peer.host, local.host
        self.peerLabel = f"{peer.host}:{peer.port}"
        self.relay.demux.peerAddresses[peer.host] += 1
        self.book = calls.CallBook(self.side.owner, self.relay.scopes.space_for(peer.host), self,
                                   clock=self.relay.clock.seconds, tally=self.relay.callTally,
                                   holder=self.holder if self.holder is not None else peer.host)
        try:
            self.relay.grePort.addLocalAddress(self.localAddress)   # capture GRE sent to it
        except GREIOError as e:
            self.log.error("{side} {peer}: cannot exchange GRE on {ip}: {error}",
                           side=self.side.name, peer=self.peerLabel, ip=self.localAddress,
                           error=str(e))
            self.close(f"no GRE on {self.localAddress}")
            return
        self._greAddress = self.localAddress
        if self.opener is not None:
            self.opener.start(self)

    def peerMessage(self, message):
        if self.closed:
            return
        self.controlIn += message.LENGTH
        if self.gap is not None and self.gap.answered(message):
            return
        refusal = self.relay.quota.refuse(self, message)
        if refusal is not None:
            self.sendToPeer(refusal)
            return
        message = self._translate(message, calls.TO_MUX, "")[0]
        if message is None:
            return
        if message.__class__ is pptp.EchoRequest:
            self.echoesPending += 1
        if self.mux is not None:
            self.mux.sendControl(message.pack())
            self._watchCalls()
        elif self.opener is not None:
            self.opener.hold(message)

    def _translate(self, message, direction, where):
        """(*message* translated, its call), or (None, None) when it names no call of ours
        (counted, logged)."""
        try:
            return self.book.translate_call(message, direction)
        except calls.UnknownCallID as e:
            self.relay.ignored.add(IGNORED_UNKNOWN_CALL,
                                   f"{self.side.name} {self.peerLabel}: {message.NAME}{where}: {e}")
        except (pptp.PPTPError, ValueError) as e:
            self.relay.ignored.add(IGNORED_BAD_IDS,
                                   f"{self.side.name} {self.peerLabel}: {message.NAME}{where}: {e}")
        return None, None

    def peerFailed(self, error):
        self.relay.peerLog.warn("bad_pptp", "{side} {peer}: bad PPTP from peer ({error}); "
                                "closing this session", side=self.side.name,
                                peer=self.peerLabel, error=printable(error))
        self.close(f"bad PPTP from peer: {error.reason}")

    def peerClosed(self, why):
        self.peer = None
        if self.upstreams is not None and self.upstreams.primaryLost(why):
            return
        self.close(why)

    def sendToPeerAbout(self, message, call):
        """*message* (about *call*, or None) to the peer: at the RRP, on the server
        connection that carries the call when calls are split (routeproxy.callsplit)."""
        if self.upstreams is None:
            self.sendToPeer(message)
        else:
            self.upstreams.sendToServer(message, call)

    def sendToPeer(self, message):
        if self.peer is not None:
            self.controlOut += message.LENGTH
            self.peer.sendMessage(message)

    def greFromPeer(self, call, seq, ack, payload):
        """A GRE packet from the peer for *call* (found by the GRE demultiplexer)."""
        self.greIn += 1
        if call.pns_id is None:   # an incoming call the client has not answered
            self.greDropped += 1
            self.relay.drops.add(DROP_CALL_NOT_READY)
            return
        call.gre_in += 1
        call.bytes_in += len(payload)
        mux = self.mux
        if mux is None or not mux.sendGRE(call.pns_id, seq, ack, payload):
            self.greDropped += 1
            if self.gap is not None:
                self.gap.greDropped += 1
                self.relay.drops.add(DROP_MUX_DETACHED)
            else:
                self.relay.drops.add(DROP_MUX_SEND if mux is not None else DROP_MUX_NOT_OPEN)

    # --- the mux session (ISessionReceiver) ---------------------------------------------

    def muxOpened(self, muxSession):
        """The mux session is open: control and GRE now flow through it."""
        self.mux = muxSession
        if self.peer is not None:
            muxSession.setLocalProducer(self.peer.transport)
            self.peer.transport.registerProducer(MuxReadingControl(muxSession), True)

    def controlReceived(self, data):
        """Bytes of the far side's control stream, with native call IDs."""
        if self.closed:
            return
        try:
            messages = self.muxDecoder.feed(data)
        except pptp.PPTPError as e:
            self.relay.peerLog.error("bad_pptp_mux", "{side} {peer}: bad PPTP from the mux "
                                     "({error}); closing this session", side=self.side.name,
                                     peer=self.peerLabel, error=printable(e))
            self.close(f"bad PPTP from the mux: {e.reason}")
            return
        for message in messages:
            if self.closed:
                return
            if message.__class__ is pptp.EchoReply and self.echoesPending:
                self.echoesPending -= 1
            refusal = self.relay.quota.refuse(self, message)
            if refusal is not None:
                self.mux.sendControl(refusal.pack())
                continue
            try:
                out, call = self._translate(message, calls.TO_PEER, " from the mux")
            except CallIDExhausted as e:
                self.relay.refusals.add("call_ids_exhausted", f"{self.side.name} "
                                        f"{self.peerLabel}: {e}")
                answer = self.side.answerExhausted(message)
                if answer is None:
                    self.close("call IDs exhausted")
                    return
                self.mux.sendControl(answer.pack())
                continue
            if out is None:
                continue
            self.sendToPeerAbout(out, call)
        self._watchCalls()

    def datagramReceived(self, callTag, seq, ack, payload):
        """A GRE datagram from the mux: rebuild its header with the peer's ID, send it."""
        call = self.book.by_tag(callTag)
        key = None if call is None else self.book.gre_key(call)
        if key is None:
            self.greDropped += 1
            self.relay.drops.add(DROP_MUX_GRE_NO_CALL)
            return
        self.greOut += 1
        call.gre_out += 1
        call.bytes_out += len(payload)
        self.relay.grePort.sendGRE(self.localAddress, self.peerAddress,
                                   gre.build_gre(key, payload, seq, ack))

    def datagramAged(self, n=1):
        """*n* GRE datagrams from the mux that the link's receive gate dropped unsent (they
        waited too long in the link's receive queue): counted as the C read counts its
        (flows.LinkReader._aged): one rate-limited line for them."""
        self.greDropped += n
        drops = self.relay.drops
        drops.counts[DROP_LINK_SOJOURN] += n - 1
        drops.add(DROP_LINK_SOJOURN)

    def sessionDetached(self):
        """The link is lost; the mux session waits for a resume (routeproxy.detach)."""
        if self.relay.flows is not None:
            self.relay.flows.sessionGone(self)   # GRE in the gap: the Python path counts it
        self.gap = Gap(self, self.relay.clock)

    def sessionResumed(self):
        gap, self.gap = self.gap, None
        if gap is not None:
            gap.resumed()
        if self.relay.flows is not None and self.book is not None:
            for call in self.book.calls:
                if call.established:
                    self.relay.flows.callReady(self, call)

    def sessionClosed(self, reason):
        """The mux session ended (the far side closed, refused, or the link went down)."""
        if self.relay.flows is not None:
            self.relay.flows.sessionGone(self)
        why = f"mux session closed ({reasonName(reason)})"
        if self.mux is None and self.opener is not None:
            self.opener.refused(why)   # never opened: the client still gets a PPTP answer
            return
        self.mux = None
        self.close(why)

    # --- calls (CallBook listener) ---------------------------------------------------------

    def describeCall(self, call):
        return f"C={call.pns_id} S={call.pac_id} {self.side.localName}={call.local_id}"

    def describeEnds(self):
        """``client A`` (LRP), ``client A via LRP, server B`` (RRP: pptpd sees only the RRP)."""
        if not self.clientLabel:
            return f"{self.side.peerRole} {self.peerLabel}"
        return f"client {self.clientLabel}, {self.side.peerRole} {self.peerLabel}"

    def callOpened(self, call):
        """One line per call, so pptpd's call (``S``, and ``R`` on the RRP) maps to a client."""
        self.log.info("{side} call opened: {ends}, {ids}", side=self.side.name,
                      ends=self.describeEnds(), ids=self.describeCall(call))
        if self.relay.flows is not None and self.gap is None:
            self.relay.flows.callReady(self, call)   # the native pump frames its GRE

    def callClosed(self, call):
        if self.relay.flows is not None:
            self.relay.flows.callGone(call)
        self.callsEnded += 1
        self.log.info("{side} call closed: {ends}, {ids}; GRE {gin}/{gout} packets, "
                      "{bin}/{bout} bytes in/out", side=self.side.name, ends=self.describeEnds(),
                      ids=self.describeCall(call), gin=call.gre_in, gout=call.gre_out,
                      bin=call.bytes_in, bout=call.bytes_out)

    # --- calls whose request is never answered -----------------------------------------

    def _watchCalls(self):
        """Arm the timer for the oldest unanswered call, if there is one and none is armed."""
        if self._callTimer is not None or self.closed or self.book is None:
            return
        waiting = self.book.unanswered(float("inf"))
        if waiting:
            due = waiting[0].started + self.relay.limits.callTimeout - self.relay.clock.seconds()
            self._callTimer = self.relay.clock.callLater(max(due, 0.0), self._callsTimedOut)

    def _callsTimedOut(self):
        """Clear every call whose request has waited ``callTimeout`` s; its IDs are freed."""
        self._callTimer = None
        if self.closed:
            return
        for call in self.book.unanswered(self.relay.clock.seconds() - self.relay.limits.callTimeout
                                         + 1e-6):
            toPeer, toMux = answers_for_unanswered(self.book, call)
            self.relay.refusals.add("call_timeout", f"{self.side.name} {self.peerLabel}: "
                                    f"{call!r} unanswered for {self.relay.limits.callTimeout:g} s")
            for message in toPeer:
                if self.upstreams is None:
                    self.sendToPeer(message)
                else:
                    self.upstreams.sendToServer(message, call)
            if self.mux is not None:
                for message in toMux:
                    self.mux.sendControl(message.pack())
            self.book.release(call)
        self._watchCalls()

    # --- ending ---------------------------------------------------------------------------

    def describeCalls(self):
        if self.book is None or not self.book.calls:
            return f"no calls open ({self.callsEnded} ended)"
        return ", ".join(self.describeCall(c) for c in self.book.calls)

    def shutDown(self, reason):
        """End this session as the peer's counterpart would: the calls cleared and the control
        connection stopped in PPTP, towards the peer and (in native IDs) through the mux, so
        both peers hear it; then close (routeproxy.teardown)."""
        if self.closed:
            return
        live = list(self.book.calls) if self.book is not None else []
        for message, call in teardown.to_peer(self.side.owner, live):
            self.sendToPeerAbout(message, call)
        if self.mux is not None:
            for message in teardown.to_mux(self.side.owner, live):
                self.mux.sendControl(message.pack())
        self.close(reason)

    def close(self, reason):
        """End this session only: the peer's connection, the mux session, the calls' IDs."""
        if self.closed:
            return
        self.closed = True
        self.closeReason = reason
        log = self.log.info if self.opener is None or self.opener.started else \
            lambda format, **kw: self.relay.peerLog.info("unstarted", format, **kw)
        log(
            "{side} session closed: peer {peer}, {calls}; control {cin}/{cout} bytes in/out, "
            "GRE {gin}/{gout} packets in/out, {gdrop} dropped{client}; reason: {reason}",
            side=self.side.name, peer=self.peerLabel, calls=self.describeCalls(),
            cin=self.controlIn, cout=self.controlOut, gin=self.greIn, gout=self.greOut,
            gdrop=self.greDropped, reason=reason,
            client=f"; client {self.clientLabel}" if self.clientLabel else "")
        if self.opener is not None:
            self.opener.cancel()
        if self._callTimer is not None and self._callTimer.active():
            self._callTimer.cancel()
        self._callTimer = None
        if self.gap is not None and self.peer is not None:
            self.gap.endInPPTP()   # before the calls' IDs are released
        if self.upstreams is not None:
            self.upstreams.closeAll()
        if self.book is not None:
            self.book.release_all()
        addresses = self.relay.demux.peerAddresses
        if self.peerAddress in addresses:
            addresses[self.peerAddress] -= 1
            if addresses[self.peerAddress] <= 0:
                del addresses[self.peerAddress]
        if self._greAddress is not None:
            self.relay.grePort.removeLocalAddress(self._greAddress)
            self._greAddress = None
        if self.mux is not None:
            self.mux.close(Reason.NORMAL, text=reason)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()
        self.relay.sessionEnded(self)

    # --- status ---------------------------------------------------------------------------

    def state(self):
        if self.closed:
            return "closed"
        if self.mux is not None:
            return str(self.mux.state).lower()
        if self.opener is not None:
            return self.opener.state()
        return "opening"

    def snapshot(self):
        """This session as plain data (docs/status.md)."""
        mux = self.mux if self.mux is not None else getattr(self.opener, "muxSession", None)
        connection = getattr(mux, "connection", None)
        calls_ = self.book.calls if self.book is not None else ()
        entry = {
            "peer": self.peerLabel,
            self.side.peerRole: self.peerLabel,
            "client": self.clientLabel or self.peerLabel,
            "profile": getattr(mux, "profile", None) or getattr(self.opener, "profile", None),
            "mux_session": getattr(mux, "id", None),
            "link": None if connection is None else str(connection.peerLabel),
            "rtt_ms": None if connection is None else connection.stats.rttMilliseconds(),
            "state": self.state(),
            "calls": [{"C": c.pns_id, "S": c.pac_id, self.side.localName: c.local_id,
                       "established": c.established} for c in calls_],
            "control_bytes_in": self.controlIn,
            "control_bytes_out": self.controlOut,
            "gre_packets_in": self.greIn,
            "gre_packets_out": self.greOut,
            "gre_dropped": self.greDropped,
            "close_reason": self.closeReason,
        }
        if self.upstreams is not None:
            entry["upstreams"] = self.upstreams.snapshot()
        return entry


class Relay:
    """A daemon's relay sessions, their totals, its GRE port and its call-ID scopes.

    *scopes* is a :mod:`routeproxy.scopes` object; *openGREPort(receiver)* returns the
    ``IGREPort`` that delivers to *receiver* (this relay's demultiplexer): the port and the
    relay each need the other, so the relay is handed the means to open its port.
    """

    log = Logger()

    # session attribute -> total reported for ended sessions (status counters never go down)
    TOTALS = {"controlIn": "control_bytes_in", "controlOut": "control_bytes_out",
              "greIn": "gre_packets_in", "greOut": "gre_packets_out",
              "greDropped": "gre_dropped"}

    def __init__(self, side, scopes, openGREPort, drops=None, limits=DEFAULT_LIMITS, clock=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.side = side
        self.scopes = scopes
        self.limits = limits
        self.clock = clock
        self.drops = drops if drops is not None else DropCounter()
        self.refusals = DropCounter(verb="refused")        # clients and calls turned away
        self.ignored = DropCounter(verb="ignored")         # control messages not relayed
        self.peerLog = LimitedLog(self.log)                # lines a peer's input causes
        self.callTally = collections.Counter()             # calls by holder (address, link)
        self.quota = CallQuota(self)
        self.demux = GREDemultiplexer(scopes, self.drops)
        self.grePort = openGREPort(self.demux)
        # the native tables (routeproxy.flows.RelayFlows), kept by the sessions' calls: the
        # capture pump's (the port's) and the link read's (addFlows)
        self.flows = None
        if getattr(self.grePort, "flows", None) is not None:
            self.grePort.flows.drops = self.drops
            self.addFlows(self.grePort.flows)
        self.sessions = set()
        self.sessionsEnded = 0
        self.endedTotals = dict.fromkeys(self.TOTALS.values(), 0)

    def addFlows(self, table):
        """Keep the native *table* (routeproxy.flows) with the sessions' calls from now on."""
        if self.flows is None:
            from routeproxy.flows import RelayFlows
            self.flows = RelayFlows()
        self.flows.add(table)

    def shutDown(self, reason, which=None):
        """End every session (or those *which* selects) with a PPTP teardown; returns the
        peer transports being closed, for a caller that waits until they are flushed."""
        transports = []
        for session in list(self.sessions):
            if which is None or which(session):
                if session.peer is not None and session.peer.transport is not None:
                    transports.append(session.peer.transport)
                session.shutDown(reason)
        return transports

    def newSession(self, opener=None, clientLabel="", holder=None):
        session = RelaySession(self.side, self, opener, clientLabel, holder)
        self.sessions.add(session)
        return session

    def sessionEnded(self, session):
        self.sessions.discard(session)
        self.sessionsEnded += 1
        for attribute, total in self.TOTALS.items():
            self.endedTotals[total] += getattr(session, attribute)

    def snapshot(self, links):
        """Links, sessions, cumulative totals, drops, GRE port and call-ID usage as plain data.

        *links* are the daemon's mux connections (idle ones too).
        """
        sessions = sorted((s.snapshot() for s in self.sessions), key=_sessionOrder)
        totals = dict(self.endedTotals, sessions_ended=self.sessionsEnded)
        for entry in sessions:
            for total in self.TOTALS.values():
                totals[total] += entry[total]
        return {
            "role": self.side.name.lower(),
            "links": sorted((c.snapshot() for c in links), key=lambda l: (not l["up"], l["peer"])),
            "sessions": sessions,
            "calls": sum(len(s["calls"]) for s in sessions),
            "totals": totals,
            "drops": self.drops.snapshot(),
            "refusals": self.refusals.snapshot(),
            "ignored_messages": self.ignored.snapshot(),
            "limits": self.limits.snapshot(),
            "gre_port": self.grePort.snapshot(),
            "call_ids": self.scopes.snapshot(),
        }


def _sessionOrder(entry):
    sid = entry["mux_session"]
    return (sid is None, sid if sid is not None else 0, entry["peer"])
