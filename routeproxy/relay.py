"""What the LRP and the RRP share: one relayed control connection and its calls.

A :class:`RelaySession` joins a PPTP control connection on this side (a client at the LRP,
pptpd at the RRP) to one mux session.  It parses both streams, rewrites the call IDs this
side owns (:mod:`routeproxy.calls`), passes GRE between the GRE port and the mux, and logs
one line when it opens and one when it closes.  The daemons subclass it for what differs:
which GRE key goes to the peer, and what to tell a peer when the far side fails.

:class:`PPTPControlProtocol` is the thin TCP protocol for either end: it only cuts the byte
stream into messages and writes bytes.

Echo-Request/-Reply pass through untouched: pptpd's keepalive then proves the whole path
(client, both proxies and the link) is alive, and a dead path ends the call as it would
without a proxy, instead of a proxy answering for a client that has gone.
"""
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from routeproxy import calls, gre, pptp
from routeproxy.callids import CallIDExhausted
from routeproxy.greio import GREIOError
from routeproxy.mux.frames import Reason, reasonName
from routeproxy.mux.protocol import noDelay
from routeproxy.stats import DropCounter

# Control messages a peer may send before the mux session is open; a real client sends one
# (Start-Control-Connection-Request) and waits.
MAX_EARLY_MESSAGES = 16


class PPTPControlProtocol(Protocol):
    """A PPTP control connection (TCP 1723): parse and emit, nothing else."""

    session = None

    def dataReceived(self, data):
        try:
            messages = self.decoder.feed(data)
        except pptp.PPTPError as e:
            for message in getattr(e, "decoded", ()):
                self.session.peerMessage(message)
            self.session.peerFailed(e)
            return
        for message in messages:
            self.session.peerMessage(message)

    def connectionMade(self):
        # PPTP control messages are small request/reply pairs: Nagle only adds delay.
        noDelay(self.transport)
        self.decoder = pptp.PPTPStreamDecoder()
        self.session.peerConnected(self)

    def connectionLost(self, reason):
        try:
            self.decoder.finish()
        except pptp.PPTPError as e:
            self.session.peerClosed(f"peer closed the control connection inside a message ({e})")
            return
        self.session.peerClosed("peer closed the control connection")

    def sendMessage(self, message):
        self.transport.write(message.pack())


@implementer(IPushProducer)
class _MuxReadingControl:
    """Pauses the mux session's delivery while the peer's TCP send buffer is full."""

    def __init__(self, muxSession):
        self.muxSession = muxSession

    def pauseProducing(self):
        self.muxSession.pauseReading()

    def resumeProducing(self):
        self.muxSession.resumeReading()

    def stopProducing(self):
        pass


class RelaySession:
    """One relayed control connection (a plain object; tests drive it without a network).

    *daemon* gives ``gre_port``, ``spaceFor(peer_ip)`` (the call-ID space of the peer's
    scope), ``countDrop(reason)`` and ``sessionEnded(session)``.  Subclasses name the ID
    space they rewrite (``OWNER``) and what they call their local IDs (``LOCAL_NAME``).
    """

    log = Logger()
    side = "?"
    OWNER = None
    LOCAL_NAME = "local"

    def __init__(self, daemon):
        self.daemon = daemon
        self.book = None          # CallBook, once the peer's address is known
        self.peer = None          # PPTPControlProtocol
        self.mux = None           # mux session, once opened
        self.peer_ip = None
        self.local_ip = None
        self._gre_address = None  # the local address we asked the GRE port to serve
        self.peer_label = "?"
        self.mux_decoder = pptp.PPTPStreamDecoder()
        self.closed = False
        self.close_reason = None
        self.control_in = self.control_out = 0   # bytes from / to the peer
        self.gre_in = self.gre_out = 0           # packets from / to the peer
        self.gre_dropped = 0

    # --- the peer (client or pptpd) ----------------------------------------------

    def peerConnected(self, protocol):
        self.peer = protocol
        peer, local = protocol.transport.getPeer(), protocol.transport.getHost()
        self.peer_ip, self.local_ip = peer.host, local.host
        self.peer_label = f"{peer.host}:{peer.port}"
        self.book = calls.CallBook(self.OWNER, self.daemon.spaceFor(peer.host))
        self.book.session = self
        self._gre_address = None
        if self.daemon.gre_port is not None:
            try:
                self.daemon.gre_port.addLocalAddress(self.local_ip)   # capture GRE sent to it
            except GREIOError as e:
                self.log.error("{side} {peer}: cannot exchange GRE on {ip}: {error}", side=self.side,
                               peer=self.peer_label, ip=self.local_ip, error=str(e))
                self.close(f"no GRE on {self.local_ip}")
                return
            self._gre_address = self.local_ip

    def peerMessage(self, message):
        if self.closed:
            return
        self.control_in += message.LENGTH
        try:
            message = self.book.translate(message, calls.TO_MUX)
        except calls.UnknownCallID as e:
            self.log.warn("{side} {peer}: dropped {name}: {error}", side=self.side,
                          peer=self.peer_label, name=message.NAME, error=str(e))
            return
        self.sendToMux(message.pack())

    def peerFailed(self, error):
        self.log.warn("{side} {peer}: bad PPTP from peer ({error}); closing this session",
                      side=self.side, peer=self.peer_label, error=str(error))
        self.close(f"bad PPTP from peer: {error.reason}")

    def peerClosed(self, why):
        self.peer = None
        self.close(why)

    def sendToPeer(self, message):
        if self.peer is not None:
            self.control_out += message.LENGTH
            self.peer.sendMessage(message)

    # --- the mux session -----------------------------------------------------------

    def muxOpened(self, muxSession):
        self.mux = muxSession
        if self.peer is not None:
            muxSession.setLocalProducer(self.peer.transport)
            self.peer.transport.registerProducer(_MuxReadingControl(muxSession), True)

    def sendToMux(self, data):
        self.mux.sendControl(data)

    def controlReceived(self, data):
        """Bytes of the far side's control stream, with native call IDs."""
        if self.closed:
            return
        try:
            messages = self.mux_decoder.feed(data)
        except pptp.PPTPError as e:
            self.log.error("{side} {peer}: bad PPTP from the mux ({error}); closing this session",
                           side=self.side, peer=self.peer_label, error=str(e))
            self.close(f"bad PPTP from the mux: {e.reason}")
            return
        for message in messages:
            try:
                out = self.book.translate(message, calls.TO_PEER)
            except calls.UnknownCallID as e:
                self.log.warn("{side} {peer}: dropped {name} from the mux: {error}",
                              side=self.side, peer=self.peer_label, name=message.NAME, error=str(e))
                continue
            except CallIDExhausted as e:
                self.log.error("{side} {peer}: {error}", side=self.side, peer=self.peer_label,
                               error=str(e))
                self.callIDsExhausted(message)
                continue
            self.sendToPeer(out)

    def greReceived(self, tag, seq, ack, payload):
        """A GRE datagram from the mux: rebuild its header with our IDs, send to the peer."""
        call = self.book.by_tag(tag) if self.book is not None else None
        key = None if call is None else self.greKey(call)
        if key is None or self.peer_ip is None:
            self.gre_dropped += 1
            self.daemon.countDrop("no call for mux GRE")
            return
        self.gre_out += 1
        self.daemon.gre_port.sendGRE(self.local_ip, self.peer_ip, gre.build_gre(key, payload, seq, ack))

    def greFromPeer(self, call, seq, ack, payload):
        """A GRE packet from the peer for *call* (already demultiplexed by the daemon)."""
        self.gre_in += 1
        if self.mux is None or not self.mux.sendGRE(call.pns_id, seq, ack, payload):
            self.gre_dropped += 1
            self.daemon.countDrop("mux send" if self.mux else "mux not open")

    def sessionClosed(self, reason):
        """The mux session ended (the far side closed, refused, or the link went down)."""
        self.mux = None
        self.close(f"mux session closed ({reasonName(reason)})")

    # --- for subclasses -----------------------------------------------------------------

    def greKey(self, call):
        """The GRE key the peer expects for *call* (its own ID for the call)."""
        raise NotImplementedError

    def callIDsExhausted(self, message):
        """No local call ID is left for *message* (from the mux); answer it somehow."""
        self.close("call IDs exhausted")

    # --- ending -------------------------------------------------------------------------

    def closeDetail(self):
        """More for the closing log line (the RRP names the client there)."""
        return ""

    def describeCalls(self):
        if self.book is None:
            return "no calls"
        return ", ".join(
            f"C={c.pns_id} S={c.pac_id} {self.LOCAL_NAME}={c.local_id}" for c in self.book.calls
        ) or "no calls"

    def close(self, reason):
        """End this session only: the peer's connection, the mux session, the calls' IDs."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self.log.info(
            "{side} session closed: peer {peer}, {calls}; control {cin}/{cout} bytes in/out, "
            "GRE {gin}/{gout} packets in/out, {gdrop} dropped{extra}; reason: {reason}",
            side=self.side, peer=self.peer_label, calls=self.describeCalls(),
            cin=self.control_in, cout=self.control_out, gin=self.gre_in, gout=self.gre_out,
            gdrop=self.gre_dropped, extra=self.closeDetail(), reason=reason)
        if self.book is not None:
            self.book.release_all()
        if self._gre_address is not None:
            self.daemon.gre_port.removeLocalAddress(self._gre_address)
            self._gre_address = None
        if self.mux is not None:
            self.mux.close(Reason.NORMAL, text=reason)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()
        self.daemon.sessionEnded(self)


class RelayDaemon:
    """What both daemons keep: the live sessions, drops by reason, and the totals of the
    sessions that have ended (so counters reported as totals never go down)."""

    TOTALS = ("control_in", "control_out", "gre_in", "gre_out", "gre_dropped")

    def __init__(self, gre_port=None):
        self.gre_port = gre_port
        self.sessions = set()
        self.drops = DropCounter()
        self.sessions_ended = 0
        self.ended_totals = dict.fromkeys(self.TOTALS, 0)

    def sessionEnded(self, session):
        self.sessions.discard(session)
        self.sessions_ended += 1
        for name in self.TOTALS:
            self.ended_totals[name] += getattr(session, name)

    def countDrop(self, reason):
        self.drops.add(reason)
