"""One mux session: its state machine and its CONTROL flow-control windows.

A Session is a plain object owned by a :class:`~routeproxy.mux.connection.MuxConnection`;
it never touches a transport.  States (docs/protocol.md, "Sessions")::

    OPENING  the opener sent OPEN and waits for OPEN_OK / OPEN_REFUSED
    PENDING  the acceptor got OPEN and its sessionRequested callback is deciding
    OPEN     CONTROL, WINDOW_UPDATE and GRE flow both ways
    DETACHED ("resume" only) the link was lost; the session waits for a RESUME on a new
             link: CONTROL is held, GRE is dropped
    CLOSED   final; the id is never used again on this connection

With the "resume" capability (docs/protocol.md s.10) the control stream is numbered by
byte offset: ``sentOffset`` (bytes sent), ``ackedOffset`` (bytes the peer acknowledged in
a WINDOW_UPDATE), ``recvOffset`` (bytes received); the bytes between ``ackedOffset`` and
``sentOffset`` are kept (at most one window) and sent again after a resume.

API for the daemons:

- ``whenOpen()`` -> Deferred firing with the session on OPEN_OK, failing with
  :class:`SessionRefused` on OPEN_REFUSED or a CLOSE before OPEN_OK, :class:`LinkDown` on
  link loss (both are :class:`SessionNotOpened`).
- ``sendControl(data)``: reliable, ordered; never dropped.  Bytes beyond the
  peer's window wait here, and the local producer (``setLocalProducer``) is
  paused until a WINDOW_UPDATE makes room.
- ``sendGRE(callTag, seq, ack, payload) -> bool``: False when dropped (counted
  by reason in ``connection.stats.greDropped``).
- ``close(reason=Reason.NORMAL, text="")``.
- ``pauseReading()`` / ``resumeReading()``: the local consumer (the daemon's TCP
  transport towards its PPTP peer) pushes back; while paused no CONTROL credit
  is returned, so the peer stops after one window.
- ``setLocalProducer(producer)``: an IPushProducer (the daemon's TCP transport)
  paused while this session cannot send.

The receiver (see :class:`ISessionReceiver`) gets ``controlReceived(data)``,
``datagramReceived(callTag, seq, ack, payload)`` and exactly one
``sessionClosed(reason)`` (also after a refusal, when it was known).
"""
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Interface

from routeproxy.mux import frames as F
from routeproxy.mux.frames import Reason, reasonName

OPENING = "OPENING"
PENDING = "PENDING"
OPEN = "OPEN"
DETACHED = "DETACHED"
CLOSED = "CLOSED"


class ISessionReceiver(Interface):
    """What a session delivers to the daemon (a duck type is enough)."""

    def controlReceived(data):
        """Control-stream bytes from the peer, in order."""

    def datagramReceived(callTag, seq, ack, payload):
        """One GRE datagram; seq/ack are None when absent."""

    def sessionClosed(reason):
        """The session ended (a Reason code); called once."""

    # Optional ("resume" links): sessionDetached() when the link is lost and the session
    # waits for a resume; sessionResumed() when it is attached to a new link.
    # Optional: datagramAged(n) for n GRE datagrams the link's receive gate dropped unsent
    # (they waited too long in the link's receive queue; docs/gre-io.md).


class SessionNotOpened(Exception):
    """The session never opened: *reason* is a Reason code, *text* the detail.

    Raise one of the two kinds, so that a caller can tell a peer's "no" from a missing link;
    :func:`notOpened` picks the kind for a Reason.
    """

    def __init__(self, reason, text=""):
        super().__init__(reason, text)
        self.reason = reason
        self.text = text

    def __str__(self):
        extra = f": {self.text}" if self.text else ""
        return f"session not opened ({reasonName(self.reason)}){extra}"


class SessionRefused(SessionNotOpened):
    """The acceptor said no (OPEN_REFUSED, or a CLOSE before OPEN_OK)."""

    def __str__(self):
        extra = f": {self.text}" if self.text else ""
        return f"session refused ({reasonName(self.reason)}){extra}"


class LinkDown(SessionNotOpened):
    """There is no link to open the session on, or it went away while the session opened."""

    def __init__(self, text=""):
        super().__init__(Reason.LINK_LOST, text)

    def __str__(self):
        return f"link down: {self.text}" if self.text else "link down"


def notOpened(reason, text=""):
    """The exception for a session that ended before it opened, for *reason*."""
    return LinkDown(text) if reason == Reason.LINK_LOST else SessionRefused(reason, text)


class Session:
    log = Logger(namespace="routeproxy.mux")

    def __init__(self, connection, sessionId, isOpener, profile, clientInfo="",
                 receiver=None):
        self.connection = connection
        self.id = sessionId
        self.isOpener = isOpener
        self.profile = profile
        self.clientInfo = clientInfo
        self.receiver = receiver
        self.state = OPENING if isOpener else PENDING
        self.closeReason = None
        self.closeText = ""
        self.closedByPeer = False
        # Credit we may still use (set by the peer's HELLO when the session opens).
        self.sendWindow = 0
        # Credit the peer may still use, and bytes delivered but not yet credited back.
        self.initialWindow = connection.config.initialWindow
        self.recvWindow = self.initialWindow
        self._creditThreshold = max(1, self.initialWindow // 2)
        self._unreturned = 0
        self._readingPaused = False
        self._outgoing = bytearray()
        self._producer = None
        self._producerPaused = False
        self._waiters = []
        self._decision = None  # the acceptor's pending sessionRequested Deferred
        self.controlBytesIn = self.controlBytesOut = 0
        self.greIn = self.greOut = 0
        # "resume": the numbered control stream (see the module docstring)
        self.sentOffset = self.ackedOffset = self.recvOffset = 0
        self._unacked = bytearray()

    def __repr__(self):
        return f"<Session {self.id} {self.profile!r} {self.state}>"

    # --- daemon API ----------------------------------------------------------

    def whenOpen(self):
        if self.state == OPEN:
            return defer.succeed(self)
        if self.state == CLOSED:
            return defer.fail(notOpened(self.closeReason, self.closeText))
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def sendControl(self, data):
        if self.state == CLOSED:
            return
        if not data:
            return
        conn = self.connection
        if (not self._outgoing and self.state == OPEN
                and len(data) <= self.sendWindow and len(data) <= conn.maxOutPayload):
            self._sent(data)
            conn._queueControl(F.encodeControl(self.id, bytes(data)))
        else:
            self._outgoing += data
            self._flushControl()
        self._updateProducer()

    def sendGRE(self, callTag, seq, ack, payload):
        if self.state != OPEN:
            self.connection.stats.countDrop("not_open")
            return False
        if self.connection._queueGRE(self.id, callTag, seq, ack, payload):
            self.greOut += 1
            return True
        return False

    def close(self, reason=Reason.NORMAL, text=""):
        if self.state == CLOSED:
            return
        if self.state == DETACHED:
            pass  # no link to tell; a resume leaves this session out and the peer ends it
        elif self.state == PENDING:
            self.connection._queueControl(F.OpenRefused(self.id, reason, text).encode())
        else:
            self.connection._queueControl(F.Close(self.id, reason, text).encode())
        self._terminate(reason, text, byPeer=False)

    def pauseReading(self):
        self._readingPaused = True

    def resumeReading(self):
        self._readingPaused = False
        self._returnCredit(force=True)

    def setLocalProducer(self, producer):
        self._producer = producer
        self._producerPaused = False
        self._updateProducer()

    # --- called by the connection --------------------------------------------

    def _opened(self, peerWindow):
        """OPEN_OK received (opener) or the acceptor's callback accepted."""
        self.state = OPEN
        self.sendWindow = peerWindow
        self._flushControl()
        self._updateProducer()
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self)

    def _accept(self, receiver):
        self._decision = None
        if self.state == CLOSED:
            # The peer closed (or the link died) while we were deciding: let the
            # daemon tear down what it built.
            if receiver is not None:
                self._notifyClosed(receiver)
            return
        if receiver is None:
            self.log.warn("mux {peer}: session {sid}: sessionRequested accepted"
                          " without a receiver; refusing",
                          peer=self.connection.peerLabel, sid=self.id)
            self.close(Reason.INTERNAL_ERROR, "no receiver")
            return
        self.receiver = receiver
        self.connection._queueControl(F.OpenOk(self.id).encode())
        self.connection.stats.sessionsOpened += 1
        self.log.info("mux {peer}: session {sid} to profile {profile!r} accepted"
                      " (client {client})", peer=self.connection.peerLabel,
                      sid=self.id, profile=self.profile, client=self.clientInfo)
        self._opened(self.connection.peerInitialWindow)

    def _refuse(self, failure):
        self._decision = None
        if self.state == CLOSED:
            return None  # cancelled by our own close, or the peer went away
        if failure.check(SessionNotOpened):
            reason, text = failure.value.reason, failure.value.text
        else:
            self.log.failure("mux {peer}: session {sid}: sessionRequested failed",
                             failure, peer=self.connection.peerLabel, sid=self.id)
            reason, text = Reason.INTERNAL_ERROR, "internal error"
        self.connection.stats.sessionsRefused += 1
        self.close(reason, text)
        return None

    def _controlReceived(self, data):
        if len(data) > self.recvWindow:
            self.connection.peerLog.warn(
                "window", "mux {peer}: session {sid}: CONTROL of {n} bytes exceeds the window of"
                " {w}; closing the session", peer=self.connection.peerLabel, sid=self.id,
                n=len(data), w=self.recvWindow)
            self.close(Reason.FLOW_CONTROL_ERROR, "window exceeded")
            return
        self.recvWindow -= len(data)
        self._unreturned += len(data)
        self.controlBytesIn += len(data)
        self.recvOffset += len(data)
        self._deliver("controlReceived", data)
        self._returnCredit()

    def _datagramReceived(self, frame):
        self.greIn += 1
        try:  # _deliver inlined: this runs once per packet
            self.receiver.datagramReceived(frame.callTag, frame.seq, frame.ack, frame.data)
        except Exception:
            self._receiverFailed("datagramReceived")

    def _datagramsAged(self, n):
        """*n* GRE datagrams of this session read from the link and dropped by its receive
        gate."""
        self.greIn += n
        aged = getattr(self.receiver, "datagramAged", None)
        if aged is not None:
            try:
                aged(n)
            except Exception:
                self._receiverFailed("datagramAged")

    def _windowUpdate(self, increment, ack=None):
        if ack is not None and not self._acked(ack):
            self.log.warn("mux {peer}: session {sid}: acknowledgment of offset {ack} outside"
                          " {low}..{high}; closing the session", peer=self.connection.peerLabel,
                          sid=self.id, ack=ack, low=self.ackedOffset, high=self.sentOffset)
            self.close(Reason.PROTOCOL_ERROR, "acknowledgment out of range")
            return
        if self.sendWindow + increment > F.MAX_WINDOW:
            self.connection.peerLog.warn(
                "window", "mux {peer}: session {sid}: WINDOW_UPDATE overflows the window; closing"
                " the session", peer=self.connection.peerLabel, sid=self.id)
            self.close(Reason.FLOW_CONTROL_ERROR, "window overflow")
            return
        self.sendWindow += increment
        self._flushControl()
        self._updateProducer()

    def _sent(self, chunk):
        """*chunk* goes out as CONTROL now: use the window, number it, keep it until acked."""
        n = len(chunk)
        self.sendWindow -= n
        self.controlBytesOut += n
        self.sentOffset += n
        if self.connection.resumable:
            self._unacked += chunk

    def _acked(self, offset):
        """The peer received the stream up to *offset*: forget what it has; False if absurd."""
        if not self.ackedOffset <= offset <= self.sentOffset:
            return False
        del self._unacked[:offset - self.ackedOffset]
        self.ackedOffset = offset
        return True

    def _detach(self):
        """The link is lost but may be resumed: hold CONTROL, drop GRE, tell the receiver."""
        self.state = DETACHED
        self._notify("sessionDetached")

    def _resume(self, connection, peerReceived):
        """Attach to *connection*; the peer has the stream up to *peerReceived*.

        Both windows start afresh (the new link's HELLO values); every byte the peer lacks
        is sent again ahead of what waited.  False (nothing changed) if *peerReceived* lies
        outside what we kept.
        """
        if not self.ackedOffset <= peerReceived <= self.sentOffset:
            return False
        self._acked(peerReceived)
        replay, self._unacked = self._unacked, bytearray()
        self.sentOffset = peerReceived
        self._outgoing = replay + self._outgoing
        self.connection = connection
        self.recvWindow = self.initialWindow
        self._unreturned = 0
        self.state = OPEN
        self.sendWindow = connection.peerInitialWindow
        self._flushControl()
        self._updateProducer()
        self._notify("sessionResumed")
        return True

    def _notify(self, method):
        if self.receiver is not None and hasattr(self.receiver, method):
            self._deliver(method)

    def _terminate(self, reason, text="", byPeer=True):
        if self.state == CLOSED:
            return
        wasOpen = self.state in (OPEN, DETACHED)
        self.state = CLOSED
        self.closeReason, self.closeText, self.closedByPeer = reason, text, byPeer
        self._outgoing = bytearray()
        self._unacked = bytearray()
        self.connection._forget(self)
        self.log.info(
            "mux {peer}: session {sid} ({profile!r}) {what} by {who}: {reason}{extra}",
            peer=self.connection.peerLabel, sid=self.id, profile=self.profile,
            what="closed" if wasOpen else "refused",
            who="peer" if byPeer else "us", reason=reasonName(reason),
            extra=f" ({text})" if text else "")
        if self._decision is not None:
            decision, self._decision = self._decision, None
            decision.cancel()
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(notOpened(reason, text))
        if self.receiver is not None:
            self._notifyClosed(self.receiver)

    # --- internals -----------------------------------------------------------

    def _flushControl(self):
        conn = self.connection
        out = self._outgoing
        while out and self.state == OPEN and self.sendWindow > 0:
            n = min(len(out), self.sendWindow, conn.maxOutPayload)
            chunk = bytes(out[:n])
            del out[:n]
            self._sent(chunk)
            conn._queueControl(F.encodeControl(self.id, chunk))

    def _updateProducer(self):
        if self._producer is None or self.state == CLOSED:
            return
        blocked = bool(self._outgoing) or self.sendWindow <= 0
        if blocked and not self._producerPaused:
            self._producerPaused = True
            self._producer.pauseProducing()
        elif not blocked and self._producerPaused:
            self._producerPaused = False
            self._producer.resumeProducing()

    def _returnCredit(self, force=False):
        if self.state != OPEN or self._readingPaused or not self._unreturned:
            return
        if force or self._unreturned >= self._creditThreshold:
            n, self._unreturned = self._unreturned, 0
            self.recvWindow += n
            ack = self.recvOffset if self.connection.resumable else None
            self.connection._queueControl(F.WindowUpdate(self.id, n, ack).encode())

    def _deliver(self, method, *args):
        try:
            getattr(self.receiver, method)(*args)
        except Exception:
            self._receiverFailed(method)

    def _receiverFailed(self, method):
        """Called from an except block: log the receiver's failure, close the session."""
        self.log.failure("mux {peer}: session {sid}: receiver.{method} failed;"
                         " closing the session", peer=self.connection.peerLabel,
                         sid=self.id, method=method)
        self.close(Reason.INTERNAL_ERROR, "receiver failed")

    def _notifyClosed(self, receiver):
        try:
            receiver.sessionClosed(self.closeReason)
        except Exception:
            self.log.failure("mux {peer}: session {sid}: receiver.sessionClosed failed",
                             peer=self.connection.peerLabel, sid=self.id)
