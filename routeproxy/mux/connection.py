"""The link-level state of one mux connection, as a plain object.

A :class:`MuxConnection` knows nothing about sockets: it is fed bytes
(``dataReceived``), told about the transport's backpressure
(``pauseWriting``/``resumeWriting``) and loss (``linkLost``), and writes through a
*link* with four methods: ``writeFrames(listOfBytes)``, ``sendBufferSize()``,
``loseConnection()``, ``abortConnection()``.  The Twisted protocol in
:mod:`routeproxy.mux.protocol` is that link; tests can use any other.

What it does (docs/protocol.md):

- sends HELLO first and negotiates the version and capabilities; nothing else is
  sent before the peer's HELLO is accepted;
- keeps the session table (``sessions``); the opener (the LRP) calls
  ``openSession(profile, clientInfo, receiver)``; on the acceptor (the RRP) each
  OPEN calls ``sessionRequested(session, profile, clientInfo)``, which returns
  the receiver (or a Deferred of it) to accept, or raises / fails with
  :class:`~routeproxy.mux.session.SessionRefused` to refuse;
- schedules output: frames produced in one reactor turn are written together
  with one ``writeFrames``; control frames (everything but GRE) go first, are
  never dropped; GRE is written at once or dropped and counted
  (``stats.greDropped[reason]``) when the transport paused us or the send buffer
  is over ``config.greWatermark`` -- it is never queued;
- pings every ``config.pingInterval`` seconds, measures the RTT
  (``stats.rttLast`` / ``stats.rttSmoothed``), and aborts the link when nothing
  arrived for ``config.deadTimeout`` seconds; then every session closes with
  ``Reason.LINK_LOST``;
- applies the error rules: each event is one log line, and closes the session or
  the link exactly as the spec says.

Other calls for the daemons: ``whenReady()`` (Deferred: HELLO negotiated),
``whenLinkLost()`` (Deferred: the transport is gone), ``ping()`` (Deferred of
the RTT in seconds), ``goAway(code, text)`` (orderly shutdown), ``stats``
(:class:`MuxStats`), ``sessions`` (id -> Session).  ``peerName`` is set by
the TLS layer (the name in the peer's certificate).
"""
import collections
import dataclasses
import itertools

from twisted.internet import defer
from twisted.logger import Logger

from routeproxy import turn
from routeproxy.mux import frames as F
from routeproxy.mux.frames import Datagram, LinkError, Reason, linkErrorName
from routeproxy.mux.queuelimit import QueueLimit
from routeproxy.mux.session import OPEN, OPENING, PENDING, LinkDown, Session
from routeproxy.stats import LimitedLog, printable


class _Held:
    """``_flushCall`` while the flush waits for the end of a read (routeproxy.turn)."""

    def active(self):
        return False


_HELD = _Held()


@dataclasses.dataclass
class MuxConfig:
    """Tunables of one end; every field has a safe default."""

    maxPayload: int = F.MIN_MAX_PAYLOAD   # largest payload we accept
    initialWindow: int = 65536            # CONTROL credit we grant per session
    pingInterval: float = 2.0             # seconds between PINGs
    deadTimeout: float = 8.0              # seconds of silence before the link is dead
    greWatermark: int = 262144            # send-buffer + this turn's bytes above which GRE is dropped:
                                          # a full GRE wake-up (128 x 1400 B) fits, ~2 ms at 1 Gbit/s
    unsentLimit: int = 131072             # TCP_NOTSENT_LOWAT on the link: the kernel holds at most this
                                          # much unsent, the rest waits where greWatermark counts it
    maxSessions: int = 4096               # acceptor: concurrent sessions
    maxSendBuffer: int = 64 * 1024 * 1024  # unsent bytes before a peer that does not read is dropped
    stallTimeout: float = 60.0            # s the unsent bytes may stay above greWatermark, not shrinking
    linkMaxSojourn: float = 0.005         # the link's receive gate target (C's reads or Twisted's
                                          # stamped ones: linksocket.StampedRead; 0: off)
    linkQueueDelay: float = 0.010         # s of the link's delivery rate the GRE limit holds at most
                                          # (routeproxy.mux.queuelimit; 0: greWatermark only)
    versions: tuple = F.PROTOCOL_VERSIONS
    capabilities: tuple = ()

    def __post_init__(self):
        if not F.MIN_MAX_PAYLOAD <= self.maxPayload <= F.MAX_MAX_PAYLOAD:
            raise ValueError(f"maxPayload {self.maxPayload} outside "
                             f"{F.MIN_MAX_PAYLOAD}..{F.MAX_MAX_PAYLOAD}")
        if not 1 <= self.initialWindow <= F.MAX_WINDOW:
            raise ValueError(f"initialWindow {self.initialWindow} outside 1..{F.MAX_WINDOW}")
        if not 0 < self.pingInterval < self.deadTimeout:
            raise ValueError("need 0 < pingInterval < deadTimeout")


class MuxStats:
    """Counters of one connection (read by the daemons' metrics)."""

    def __init__(self):
        self.framesIn = self.framesOut = 0
        self.bytesIn = self.bytesOut = 0
        self.greDropped = collections.Counter()   # outgoing, by reason
        self.greIgnored = collections.Counter()   # incoming, by reason
        self.unknownFrames = 0
        self.pongsSkipped = 0   # PINGs not answered while the send buffer was full
        self.sessionsOpened = self.sessionsRefused = 0
        self.rttLast = None
        self.rttSmoothed = None

    def countDrop(self, reason):
        self.greDropped[reason] += 1

    def rttMilliseconds(self):
        """The smoothed round-trip time (the last one before smoothing starts), in ms."""
        rtt = self.rttSmoothed if self.rttSmoothed is not None else self.rttLast
        return None if rtt is None else round(rtt * 1000.0, 3)

    def addRtt(self, rtt):
        self.rttLast = rtt
        if self.rttSmoothed is None:
            self.rttSmoothed = rtt
        else:
            self.rttSmoothed += (rtt - self.rttSmoothed) / 8  # like TCP's SRTT


class MuxConnection:
    log = Logger(namespace="routeproxy.mux")

    def __init__(self, isOpener, clock, config=None, sessionRequested=None, peerName=None,
                 resume=None):
        self.isOpener = isOpener
        # "resume" (docs/protocol.md s.10): a routeproxy.mux.resume ResumeTable (acceptor)
        # or Resumer (opener), shared by a factory's connections; None: sessions end with
        # their link, as in version 1.
        self.resume = resume
        self.resumeToken = None
        self.clock = clock
        self._turn = turn.of(clock)  # the GRE port's reads on this reactor hold our flush
        self.config = config or MuxConfig()
        self.sessionRequested = sessionRequested
        self.peerName = peerName
        self.stats = MuxStats()
        self.sessions = {}
        self.version = None
        self.capabilities = frozenset()
        self.peerHello = None
        self.maxOutPayload = F.MIN_MAX_PAYLOAD
        self.peerInitialWindow = 0
        self.closed = False
        self.closeReason = None
        self._link = None
        self._decoder = F.FrameDecoder(self.config.maxPayload)
        self._readyWaiters = []
        self._control = []       # encoded control frames of this turn
        self._gre = []           # GRE frames of this turn, each as two chunks: head, payload
        self._greFrames = 0
        self._pendingBytes = 0
        self._unsent = None  # the link's unsent bytes as this turn's first GRE frame saw them
        self._unsentAsked = False  # _unsent was asked of the link (else it is _unsentCeiling)
        self._unsentCeiling = None  # no fewer unsent bytes than the link holds (None: unknown)
        self._wroteNative = False  # writeNative wrote this turn (its bytes are in _unsent)
        self._heldUntilReady = []
        self._flushCall = None
        self._inBatch = False
        self._writePaused = False
        # the native link read (routeproxy.flows.LinkReader; MuxFactory.linkFlows), and
        # whether it has the stream (from the first read after HELLO with nothing buffered)
        self.nativeReader = None
        self._readingNative = False
        # the receive gate where Twisted reads the link (linksocket.StampedRead, installed by
        # the protocol): the kernel's receive time of the read being decoded, and the gate's
        # threshold for it; GRE of a read older than that is dropped (_aged).  Both 0.0
        # outside a stamped read, so the per-frame test is one comparison that fails.
        self.stampedRead = None
        self._readAt = self._dropBefore = 0.0
        self._agedIn = {}   # session -> its GRE frames the gate dropped in this decode
        # a resumed link goes on with the ids of the one it replaces
        self._nextSessionId = resume.sessionIds if resume is not None else itertools.count(1)
        self._lastSessionId = 0  # acceptor: highest id opened so far
        self._lastReceived = clock.seconds()
        self._pingCounter = itertools.count(1)
        self._pingOutstanding = None  # (data, sentAt)
        self._pingWaiters = []
        self._timer = None
        self._logged = set()
        self._lostWaiters = []
        self.linkGone = False
        self._stalledSince = None
        # the GRE limit from the link's delivery rate, sampled while the link sends
        self.queueLimit = QueueLimit(self.config.linkQueueDelay)
        self._lowered = None   # greLimit when under the watermark (the per-packet check's copy)
        self._queueSampler = None
        self._sampledBytes = 0
        self._lastLeft = 0
        self.linkDrops = collections.Counter()   # links dropped by reason (the factory's, shared)
        self.peerLog = LimitedLog(self.log, clock.seconds)   # lines the peer's frames cause

    @property
    def resumable(self):
        """Version 2 with "resume" on both ends: control streams are numbered and acked."""
        return F.RESUME_CAPABILITY in self.capabilities

    @property
    def ready(self):
        return self.version is not None and not self.closed

    def snapshot(self):
        """This link as plain data (docs/status.md)."""
        stats = self.stats
        ms = lambda seconds: None if seconds is None else round(seconds * 1000.0, 3)  # noqa: E731
        if self.nativeReader is not None:
            gate = self.nativeReader.gate()
        elif self.stampedRead is not None:
            g = self.stampedRead.gate
            gate = {"target_ms": round(g.target * 1000.0, 3), "dropping": g.dropping,
                    "episodes": g.episodes}
        else:
            gate = None
        return {
            "peer": str(self.peerLabel), "up": bool(self.ready), "close_reason": self.closeReason,
            "rtt_last_ms": ms(stats.rttLast), "rtt_smoothed_ms": ms(stats.rttSmoothed),
            "frames_in": stats.framesIn, "frames_out": stats.framesOut,
            "bytes_in": stats.bytesIn, "bytes_out": stats.bytesOut,
            "sessions": len(self.sessions),
            "gre_dropped": dict(sorted(stats.greDropped.items())),
            "gre_ignored": dict(sorted(stats.greIgnored.items())),
            "pongs_skipped": stats.pongsSkipped,
            "receive_gate": gate,
            "send_queue": self.queueLimit.snapshot(self.config.greWatermark),
        }

    @property
    def greLimit(self):
        """Unsent link bytes above which GRE is dropped: the watermark, lowered on a slow link
        (routeproxy.mux.queuelimit)."""
        return self.queueLimit.of(self.config.greWatermark)

    @property
    def peerLabel(self):
        return self.peerName or "peer"

    # --- link side (called by the protocol) ----------------------------------

    def start(self, link):
        """The transport is up: send HELLO and start the liveness timer."""
        self._link = link
        self._lastReceived = self.clock.seconds()
        c = self.config
        hello = F.Hello(c.versions, c.maxPayload, c.initialWindow,
                        min(65535, max(1, round(c.pingInterval))),
                        min(65535, max(1, round(c.deadTimeout))), c.capabilities)
        self._queue(hello.encode(), control=True, beforeReady=True)
        self._schedule(self.config.pingInterval)
        if self.queueLimit.delay > 0:
            self._queueSampler = self.clock.callLater(self.queueLimit.interval(True), self._sampleQueue)

    def _sampleQueue(self):
        """The link's delivery rate into its GRE limit, when it sent since the last sample;
        the next sample as soon as the law says (QueueLimit.interval)."""
        self._queueSampler = None
        if self.closed or self._link is None:
            return
        sent = self.stats.bytesOut != self._sampledBytes
        if sent:
            self._sampledBytes = self.stats.bytesOut
            sample = self._link.deliveryRate()
            if sample is not None:
                self.queueLimit.observe(self.clock.seconds(), *sample, self.config.greWatermark)
                limit = self.greLimit
                self._lowered = limit if limit < self.config.greWatermark else None
        self._queueSampler = self.clock.callLater(self.queueLimit.interval(sent), self._sampleQueue)

    def dataReceived(self, data):
        if self.closed:
            return
        self._lastReceived = self.clock.seconds()
        self.stats.bytesIn += len(data)
        self._inBatch = True
        try:
            reader = self.nativeReader
            if reader is not None and (self._readingNative or (
                    self.version is not None and not self._decoder.buffered)):
                # the native link read (routeproxy.flows.LinkReader): C sends the GRE
                # frames of its entries and hands the rest back, in order
                self._readingNative = True
                maxPayload = self._decoder.maxPayload
                while True:
                    rest, more = reader.feed(data, maxPayload)
                    if rest:
                        self._decode(rest)
                    if not more or self.closed:
                        break
                    data = b""
                reader.watchTLS()   # the next reads in C (step 3b), where it can
            else:
                self._decode(data)
        finally:
            self._inBatch = False
            self.flush()

    def nativeReceived(self, length, rest):
        """*length* plaintext bytes the link's TLS read in C took (step 3b: linksocket.
        NativeTLSReader), whose GRE frames of flow entries C sent; *rest*, bytes for the
        decoder: counted and decoded as dataReceived does Twisted's plaintext."""
        if self.closed:
            return
        if length:
            self._lastReceived = self.clock.seconds()
            self.stats.bytesIn += length
        self._inBatch = True
        try:
            if rest:
                self._decode(rest)
        finally:
            self._inBatch = False
            self.flush()

    def _decode(self, data):
        stats, sessions = self.stats, self.sessions
        nextFrame = self._decoder.nextFrame
        readAt, dropBefore = self._readAt, self._dropBefore   # the receive gate's (0.0: off)
        self._decoder.feed(data)
        while not self.closed:
            try:
                frame = nextFrame()
            except F.MalformedFrame as e:
                stats.framesIn += 1
                self._malformed(e)
                continue
            except F.FrameError as e:
                self.goAway(e.code, e.reason)
                break
            if frame is None:
                break
            stats.framesIn += 1
            if frame.__class__ is Datagram and self.version is not None:
                # the per-packet frame: no handler table; _onGRE when it is not for
                # an open session
                session = sessions.get(frame.session)
                if session is not None and session.state == OPEN:
                    if readAt < dropBefore:
                        dropBefore = self._aged(session)
                        continue
                    session._datagramReceived(frame)
                else:
                    self._onGRE(frame)
            else:
                self._frameReceived(frame)
        if self._agedIn:
            self._foldAged()

    def pauseWriting(self):
        self._writePaused = True

    def resumeWriting(self):
        self._writePaused = False

    def linkLost(self, why="connection lost"):
        """The transport is gone: every session closes with LINK_LOST (or detaches)."""
        if not self.closed:
            self.log.info("mux {peer}: link lost: {why}", peer=self.peerLabel, why=why)
        self._shutdown(why, detach=True)
        self.linkGone = True
        waiters, self._lostWaiters = self._lostWaiters, []
        for d in waiters:
            d.callback(why)

    # --- API for the daemons -------------------------------------------------

    def whenReady(self):
        """Deferred firing with this connection once HELLO was negotiated."""
        if self.ready:
            return defer.succeed(self)
        if self.closed:
            return defer.fail(LinkDown(self.closeReason or ""))
        d = defer.Deferred()
        self._readyWaiters.append(d)
        return d

    def whenLinkLost(self):
        """Deferred firing (with a reason text) once the transport is gone."""
        if self.linkGone:
            return defer.succeed(self.closeReason)
        d = defer.Deferred()
        self._lostWaiters.append(d)
        return d

    def openSession(self, profile, clientInfo, receiver):
        """Opener only: ask the peer for a session to *profile* (a name, never an address)."""
        if self.closed:
            raise LinkDown("the link is down")
        if not self.isOpener:
            raise ValueError("only the opener (the LRP end) opens sessions")
        sid = next(self._nextSessionId)
        if sid > 0xFFFFFFFF:
            raise LinkDown("session ids exhausted; reconnect")
        frame = F.Open(sid, profile, clientInfo).encode()  # ValueError on a bad name
        session = Session(self, sid, True, profile, clientInfo, receiver)
        self.sessions[sid] = session
        self._queue(frame, control=True)
        return session

    def ping(self):
        """Send a PING now (unless one is outstanding); Deferred fires with the RTT."""
        d = defer.Deferred()
        self._pingWaiters.append(d)
        self._sendPing()
        return d

    def goAway(self, code=LinkError.NO_ERROR, text=""):
        """Send GOAWAY, close the link gracefully, close every session."""
        if self.closed:
            return
        log = self.log.info if code == LinkError.NO_ERROR else self.log.warn
        log("mux {peer}: closing the link with GOAWAY {code}: {text}",
            peer=self.peerLabel, code=linkErrorName(code), text=text)
        self._queue(F.GoAway(code, text).encode(), control=True, beforeReady=True)
        self.flush()
        self._shutdown(f"GOAWAY {linkErrorName(code)} sent: {text}")
        if self._link is not None:
            self._link.loseConnection()

    def flush(self):
        """Write this turn's frames: control first, then GRE."""
        if self._flushCall is not None:
            if self._flushCall.active():
                self._flushCall.cancel()
            self._flushCall = None
        # the turn is over: the reactor may send some before the next one, so sample again
        sample, self._unsent, self._unsentAsked = self._unsent, None, False
        if sample is None:
            sample = self._unsentCeiling
        wroteNative, self._wroteNative = self._wroteNative, False
        if not (self._control or self._gre or wroteNative) or self._link is None:
            self._unsentCeiling = sample
            return
        written = self._pendingBytes
        if self._control or self._gre:
            chunks = self._control + self._gre if self._gre else self._control
            # a GRE frame is two chunks (head, payload): see _queueGRE
            self.stats.framesOut += len(self._control) + self._greFrames
            self.stats.bytesOut += written
            self._control, self._gre, self._pendingBytes, self._greFrames = [], [], 0, 0
            self._link.writeFrames(chunks)
        # The turn's sample plus what it wrote (and TLS's few bytes per record) bounds the
        # unsent bytes now: they only shrink otherwise.  The link is asked only when that
        # bound is over the limit, and the bound carries over to the next turns.
        self._unsentCeiling = ceiling = (None if sample is None else
                                         sample + written + written // 512 + 64)
        if ceiling is None or ceiling > self.config.maxSendBuffer:
            self._unsentCeiling = unsent = self._link.sendBufferSize()
            if unsent > self.config.maxSendBuffer:
                self._dropSlowPeer(f"{unsent} bytes unsent (limit {self.config.maxSendBuffer})")

    def _dropSlowPeer(self, why):
        """The peer does not read what we send: its buffer would grow without bound."""
        self.linkDrops["not_reading"] += 1
        self.log.warn("mux {peer}: the peer is not reading ({why}); dropping the link",
                      peer=self.peerLabel, why=why)
        self._shutdown(f"peer not reading: {why}")
        if self._link is not None:
            self._link.abortConnection()

    # --- output scheduling (used by Session) ---------------------------------

    def _queue(self, encoded, control, beforeReady=False):
        if self.closed:
            return
        if self.version is None and not beforeReady:
            self._heldUntilReady.append(encoded)
            return
        (self._control if control else self._gre).append(encoded)
        self._pendingBytes += len(encoded)
        if not self._inBatch and self._flushCall is None:
            self._scheduleFlush()

    def _scheduleFlush(self):
        # inside a marked read (the GRE port's wake-up) the flush runs as the read ends, not
        # one reactor iteration later (routeproxy.turn)
        self._flushCall = _HELD if self._turn.hold(self.flush) else self.clock.callLater(0, self.flush)

    def _queueControl(self, encoded):
        self._queue(encoded, control=True)

    def _queueGRE(self, sid, callTag, seq, ack, payload):
        if self.closed:
            reason = "link_down"
        elif self._writePaused:
            reason = "paused"
        elif len(payload) + 10 > self.maxOutPayload:
            reason = "too_large"
        elif self._pendingBytes + (self._unsent if self._unsent is not None else
                                   self._turnUnsent()) >= (self.config.greWatermark if self._lowered is None
                                                           else self._lowered) \
                and not self._roomAfterAsking():
            reason = "watermark"
            if not self._inBatch and self._flushCall is None:
                self._scheduleFlush()  # nothing queued, but the turn's end must forget the sample
        else:
            # _queue inlined for the per-packet frame (a session is only open once the
            # link is ready, so nothing is held).  The payload is not copied into a new
            # frame: the head and the payload go to the link as two chunks.
            if payload.__class__ is not bytes:
                payload = bytes(payload)  # it must not change before flush()
            head = F.encodeGREHead(sid, callTag, seq, ack, len(payload))
            gre = self._gre
            gre.append(head)
            gre.append(payload)
            self._greFrames += 1
            self._pendingBytes += len(head) + len(payload)
            if not self._inBatch and self._flushCall is None:
                self._scheduleFlush()
            return True
        self.stats.countDrop(reason)
        return False

    def greRoom(self):
        """For the native capture pump (routeproxy.flows): ``(room, handBack, reason)``, the
        bytes of GRE frames this turn may still queue before _queueGRE would drop for
        *reason*, and whether a frame past them must be handed back to the Python path
        (the link was not asked yet: _queueGRE would ask it once) rather than dropped."""
        if self.closed:
            return 0, False, "link_down"
        if self._writePaused:
            return 0, False, "paused"
        unsent = self._unsent if self._unsent is not None else self._turnUnsent()
        if not self._inBatch and self._flushCall is None:
            self._scheduleFlush()  # the turn's end must forget the sample, as _queueGRE's
        return (self.greLimit - self._pendingBytes - unsent, not self._unsentAsked,
                "watermark")

    def queueFrames(self, data, frames):
        """*frames* mux GRE frames built by the native pump (*data*, bytes), for this turn:
        counted in _pendingBytes and written at its end as _queueGRE's are."""
        self._gre.append(data)
        self._greFrames += frames
        self._pendingBytes += len(data)
        if not self._inBatch and self._flushCall is None:
            self._scheduleFlush()

    def holdsNothing(self):
        """No frame of its own queued or held and no turn open: the loop (routeproxy.native.
        loop) may take the link's I/O in C from here, as the Python path would go on."""
        return not (self._control or self._gre or self._pendingBytes or self._inBatch
                    or self._unsent is not None or self._flushCall is not None
                    or self._wroteNative)

    def writeNative(self, module, data, length, frames):
        """*frames* mux GRE frames built by the native pump (*length* bytes at the cdata
        *data*), written to the link in C now (docs/fastpath.md step 3b) if nothing of this
        turn is queued before them and the link is idle Twisted TLS (MuxProtocol.writeNative).
        Returns how many bytes were written: the caller queues the rest (queueFrames), which
        then goes out after them.  Counted as flush counts its own: frames and bytes out, and
        this turn's unsent sample (then the ceiling flush carries over) grows by them."""
        write = getattr(self._link, "writeNative", None)   # (links in memory have none)
        if self._control or self._gre or self.closed or write is None or self.version is None:
            return 0
        if self._unsent is None:
            self._turnUnsent()   # before the write: asked after it, the link counts it twice
        taken = write(module, data, length)
        if not taken:
            return 0
        if taken == length:
            self.stats.framesOut += frames   # else queueFrames counts them with the rest
        self.stats.bytesOut += taken
        self._unsent += taken + taken // 512
        self._wroteNative = True
        if not self._inBatch and self._flushCall is None:
            self._scheduleFlush()   # the turn's end checks the ceiling and forgets the sample
        return taken

    def _turnUnsent(self):
        """The link's unsent bytes for this turn: asked at most once per turn, not per packet
        (nor per dropped packet: an overload must not cost a system call per drop), and not
        at all while the ceiling carried over from earlier turns leaves the watermark room
        (a system call per wake-up is most of a light load's cost where they are dear, as
        under UML).  Until the turn's flush, which forgets it, only the frames counted in
        _pendingBytes add to them, and a drain by the reactor in between only errs towards
        dropping."""
        ceiling = self._unsentCeiling
        if ceiling is None or self._pendingBytes + ceiling >= self.greLimit:
            self._unsent, self._unsentAsked = self._link.sendBufferSize(), True
        else:
            self._unsent = ceiling
        return self._unsent

    def _roomAfterAsking(self):
        """Over the watermark by the ceiling alone: ask the link once, and say whether the
        frame fits after all."""
        if self._unsentAsked:
            return False
        self._unsent, self._unsentAsked = self._link.sendBufferSize(), True
        return self._pendingBytes + self._unsent < self.greLimit

    def _forget(self, session):
        self.sessions.pop(session.id, None)
        if self.nativeReader is not None:
            self.nativeReader.sessionForgotten(session.id)

    # --- incoming frames -----------------------------------------------------

    def _aged(self, session):
        """A GRE frame of *session* in a read the receive gate condemns (linksocket.
        StampedRead): received, not sent on, counted when the decode ends (_foldAged).
        The gate's threshold for the rest of the read."""
        agedIn = self._agedIn
        agedIn[session] = agedIn.get(session, 0) + 1
        self._dropBefore = dropBefore = self.stampedRead.gate.dropped()
        return dropBefore

    def _foldAged(self):
        """The gate's drops of one decode, counted per session as the C read folds its
        (flows.LinkReader._aged): the link's ``gre_ignored.sojourn``, the mux session's GRE
        in, the receiver's ``datagramAged(n)`` (the relay session's ``gre_dropped`` and the
        rate-limited line "dropped: link_sojourn")."""
        agedIn, self._agedIn = self._agedIn, {}
        self.stats.greIgnored["sojourn"] += sum(agedIn.values())
        for session, n in agedIn.items():
            session._datagramsAged(n)

    def _frameReceived(self, frame):
        if self.version is None:
            if isinstance(frame, F.Hello):
                self._helloReceived(frame)
            else:
                self.goAway(LinkError.PROTOCOL_ERROR,
                            f"expected HELLO first, got {type(frame).__name__}")
            return
        handler = self._handlers.get(type(frame))
        if handler is None:
            self._unknownReceived(frame)
        else:
            handler(self, frame)

    def _helloReceived(self, hello):
        common = set(hello.versions) & set(self.config.versions)
        if not common:
            self.goAway(LinkError.VERSION_MISMATCH,
                        f"no common version: we speak {sorted(self.config.versions)},"
                        f" the peer offers {sorted(hello.versions)}")
            return
        self.peerHello = hello
        # TLS wrote its own handshake and tickets since the ceiling began, unseen by it: the
        # first flush of the ready link asks the link afresh
        self._unsentCeiling = None
        self.version = max(common)
        self.capabilities = frozenset(hello.capabilities) & frozenset(self.config.capabilities)
        self.maxOutPayload = hello.maxPayload
        self.peerInitialWindow = hello.initialWindow
        if self.version < 2:
            self.capabilities = frozenset()   # version 1 defines none
        self.log.info("mux {peer}: link up, version {version}, capabilities {caps},"
                      " peer window {window}", peer=self.peerLabel, version=self.version,
                      caps=sorted(self.capabilities) or "none", window=hello.initialWindow)
        if self.resume is not None:
            self.resume.linkReady(self)
        held, self._heldUntilReady = self._heldUntilReady, []
        for encoded in held:
            self._queue(encoded, control=True)
        waiters, self._readyWaiters = self._readyWaiters, []
        for d in waiters:
            d.callback(self)

    def _onHello(self, frame):
        self.goAway(LinkError.PROTOCOL_ERROR, "second HELLO")

    def _onGoAway(self, frame):
        self.log.info("mux {peer}: peer sent GOAWAY {code}: {text}", peer=self.peerLabel,
                      code=linkErrorName(frame.code), text=printable(frame.text))
        self._shutdown(f"peer sent GOAWAY {linkErrorName(frame.code)}: {frame.text}")
        if self._link is not None:
            self._link.loseConnection()

    def _onPing(self, frame):
        # A peer that pings and does not read would fill our send buffer with PONGs: while
        # the buffer is over the GRE watermark, PINGs go unanswered (counted).  Any frame
        # proves us alive to the peer, so a busy link loses nothing by it.
        if self._pendingBytes + self._link.sendBufferSize() >= self.config.greWatermark:
            self.stats.pongsSkipped += 1
            return
        self._queue(F.Pong(frame.data).encode(), control=True)

    def _onPong(self, frame):
        if self._pingOutstanding is None or self._pingOutstanding[0] != frame.data:
            return  # not ours (or late): harmless
        rtt = self.clock.seconds() - self._pingOutstanding[1]
        self._pingOutstanding = None
        self.stats.addRtt(rtt)
        waiters, self._pingWaiters = self._pingWaiters, []
        for d in waiters:
            d.callback(rtt)

    def _onOpen(self, frame):
        sid = frame.session
        if sid in self.sessions or sid <= self._lastSessionId:
            self.goAway(LinkError.PROTOCOL_ERROR,
                        f"OPEN reuses session id {sid} (ids must increase)")
            return
        if self.isOpener or self.sessionRequested is None:
            self._refuse(sid, Reason.NOT_ACCEPTING, "this end does not accept sessions")
            return
        self._lastSessionId = sid
        if len(self.sessions) >= self.config.maxSessions:
            self._refuse(sid, Reason.TOO_MANY_SESSIONS,
                         f"limit of {self.config.maxSessions} sessions reached")
            return
        session = Session(self, sid, False, frame.profile, frame.clientInfo)
        self.sessions[sid] = session
        d = defer.maybeDeferred(self.sessionRequested, session, frame.profile,
                                frame.clientInfo)
        if session.state == PENDING:
            session._decision = d
        d.addCallbacks(session._accept, session._refuse)

    def _refuse(self, sid, reason, text):
        self.stats.sessionsRefused += 1
        self.peerLog.warn("refused", "mux {peer}: session {sid} refused: {reason} ({text})",
                          peer=self.peerLabel, sid=sid, reason=F.reasonName(reason), text=text)
        self._queue(F.OpenRefused(sid, reason, text).encode(), control=True)

    def _onOpenOk(self, frame):
        session = self.sessions.get(frame.session)
        if session is None or session.state != OPENING:
            self.peerLog.info("open_ok", "mux {peer}: ignoring OPEN_OK for session {sid}, which"
                              " is not opening", peer=self.peerLabel, sid=frame.session)
            return
        self.stats.sessionsOpened += 1
        session._opened(self.peerInitialWindow)

    def _onOpenRefused(self, frame):
        session = self.sessions.get(frame.session)
        if session is None or session.state != OPENING:
            self.peerLog.info("open_refused", "mux {peer}: ignoring OPEN_REFUSED for session"
                              " {sid}, which is not opening", peer=self.peerLabel,
                              sid=frame.session)
            return
        self.stats.sessionsRefused += 1
        session._terminate(frame.code, frame.text, byPeer=True)

    def _onClose(self, frame):
        session = self.sessions.get(frame.session)
        if session is not None:  # unknown: it crossed our own CLOSE
            session._terminate(frame.code, frame.text, byPeer=True)

    def _onControl(self, frame):
        session = self.sessions.get(frame.session)
        if session is None or session.state != OPEN:
            self.peerLog.warn("control_not_open", "mux {peer}: CONTROL for session {sid}, which"
                              " is not open; closing it", peer=self.peerLabel, sid=frame.session)
            if session is not None:
                session.close(Reason.NOT_OPEN, "CONTROL before the session was open")
            else:
                self._queue(F.Close(frame.session, Reason.NOT_OPEN,
                                    "no such session").encode(), control=True)
            return
        session._controlReceived(frame.data)

    def _onWindowUpdate(self, frame):
        session = self.sessions.get(frame.session)
        if session is not None and session.state == OPEN:
            session._windowUpdate(frame.increment, frame.ack if self.resumable else None)
        # otherwise it crossed a CLOSE: ignore

    def _onGRE(self, frame):
        session = self.sessions.get(frame.session)
        if session is None or session.state != OPEN:
            self.stats.greIgnored["not_open"] += 1
            self._logOnce(("gre", frame.session),
                          "mux {peer}: ignoring GRE for session {sid}, which is not open"
                          " (further ones are only counted)", sid=frame.session)
            return
        session._datagramReceived(frame)

    _handlers = {
        F.Hello: _onHello, F.GoAway: _onGoAway, F.Ping: _onPing, F.Pong: _onPong,
        F.Open: _onOpen, F.OpenOk: _onOpenOk, F.OpenRefused: _onOpenRefused,
        F.Close: _onClose, F.Control: _onControl, F.WindowUpdate: _onWindowUpdate,
        F.Datagram: _onGRE,
    }

    def _onResumeFrame(self, frame):
        """TOKEN, RESUME, RESUMED: only on a link that negotiated "resume"."""
        if not self.resumable or self.resume is None:
            self.goAway(LinkError.PROTOCOL_ERROR,
                        f"{F.TYPE_NAMES[frame.TYPE]} without the resume capability")
            return
        self.resume.frameReceived(self, frame)

    for _type in (F.Token, F.Resume, F.Resumed):
        _handlers[_type] = _onResumeFrame
    del _type

    def _unknownReceived(self, frame):
        if not frame.ignorable:
            self.goAway(LinkError.UNKNOWN_FRAME_TYPE,
                        f"unknown mandatory frame type 0x{frame.frameType:02x}")
            return
        self.stats.unknownFrames += 1
        self._logOnce(("type", frame.frameType),
                      "mux {peer}: ignoring frames of unknown type 0x{t:02x}"
                      " (may-ignore bit set)", t=frame.frameType)

    def _logOnce(self, key, format, **kw):
        """Log an event a peer could repeat at line rate only the first time."""
        if key in self._logged or len(self._logged) >= 1024:
            return
        self._logged.add(key)
        self.log.info(format, peer=self.peerLabel, **kw)

    def _malformed(self, e):
        """A frame whose framing was fine but whose payload is not."""
        if e.frameType in F.LINK_TYPES or self.version is None:
            self.goAway(e.code, e.reason)
        elif e.frameType == F.GRE:
            self.stats.greIgnored["malformed"] += 1
            self._logOnce(("malformed", e.session), "mux {peer}: dropping {reason}"
                          " (further ones are only counted)", reason=e.reason)
        elif e.frameType == F.OPEN:
            if e.session in self.sessions or e.session <= self._lastSessionId:
                self.goAway(LinkError.PROTOCOL_ERROR, e.reason)
                return
            self._lastSessionId = e.session
            self._refuse(e.session, Reason.MALFORMED_OPEN, e.reason)
        else:
            session = self.sessions.get(e.session)
            self.peerLog.warn("malformed", "mux {peer}: {reason}; closing the session",
                              peer=self.peerLabel, reason=e.reason)
            if session is not None:
                if e.frameType in (F.CLOSE, F.OPEN_REFUSED):
                    session._terminate(Reason.PROTOCOL_ERROR, e.reason, byPeer=True)
                else:
                    session.close(Reason.PROTOCOL_ERROR, e.reason)

    # --- liveness -------------------------------------------------------------

    def _schedule(self, delay):
        self._timer = self.clock.callLater(max(delay, 0.001), self._tick)

    def _tick(self):
        self._timer = None
        if self.closed:
            return
        now = self.clock.seconds()
        silent = now - self._lastReceived
        if silent >= self.config.deadTimeout:
            self.log.warn("mux {peer}: nothing received for {silent:.1f} s (dead timeout"
                          " {limit} s); aborting the link", peer=self.peerLabel,
                          silent=silent, limit=self.config.deadTimeout)
            self._shutdown(f"dead peer: nothing received for {silent:.1f} s", detach=True)
            if self._link is not None:
                self._link.abortConnection()
            return
        unsent = self._link.sendBufferSize() if self._link is not None else 0
        if self._unsent is None:
            self._unsentCeiling = unsent
        # Stalled: nothing left the buffer since the last tick (written minus waiting did not
        # grow).  Not "unsent did not shrink": under a GRE overload a reading peer keeps the
        # buffer at the GRE watermark, refilled as fast as it drains.
        left = self.stats.bytesOut - unsent
        if unsent > self.greLimit and left <= self._lastLeft:
            if self._stalledSince is None:
                self._stalledSince = now
            elif now - self._stalledSince >= self.config.stallTimeout:
                self._dropSlowPeer(f"over {self.greLimit} bytes unsent and not "
                                   f"shrinking for {now - self._stalledSince:.0f} s")
                return
        else:
            self._stalledSince = None
        self._lastLeft = left
        if self.ready:
            self._sendPing()
        self._schedule(min(self.config.pingInterval,
                           self._lastReceived + self.config.deadTimeout - now))

    def _sendPing(self):
        if not self.ready or self._pingOutstanding is not None:
            return
        data = next(self._pingCounter).to_bytes(8, "big")
        self._pingOutstanding = (data, self.clock.seconds())
        self._queue(F.Ping(data).encode(), control=True)

    # --- teardown --------------------------------------------------------------

    def _shutdown(self, why, detach=False):
        """The link is over.  With *detach* (lost, not closed on purpose) a "resume" link's
        open sessions wait for a resume (``resume.linkDetached``); the others close."""
        if self.closed:
            return
        self.closed = True
        self.closeReason = why
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._queueSampler is not None and self._queueSampler.active():
            self._queueSampler.cancel()
        self._queueSampler = None
        self._heldUntilReady = []
        detach = detach and self.resume is not None and self.resumable and (
            self.resumeToken is not None)
        for session in list(self.sessions.values()):
            if detach and session.state == OPEN:
                session._detach()
            else:
                session._terminate(Reason.LINK_LOST, why, byPeer=False)
        if self.resume is not None:
            self.resume.linkClosed(self, detached=detach)
        waiters, self._readyWaiters = self._readyWaiters, []
        for d in waiters:
            d.errback(LinkDown(why))
        pings, self._pingWaiters = self._pingWaiters, []
        for d in pings:
            d.errback(LinkDown(why))
