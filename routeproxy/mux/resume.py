"""Sessions that outlive their link: the "resume" capability of version 2 (docs/protocol.md s.10).

When a "resume" link is lost (not closed with GOAWAY), its open sessions are *detached*
(``Session.DETACHED``): they keep their ids, their numbered control streams and their
unacknowledged bytes for ``grace`` seconds.  The acceptor (the RRP) gave the link a random
token in a TOKEN frame; the opener (the LRP) reconnects and sends RESUME with that token and,
per session, how much of the acceptor's control stream it received.  The acceptor checks
the token and that the new link's certificate name is the old one's, answers RESUMED with
its own received offsets, and both ends move the sessions to the new link and send again
what the other lacks.  An unknown or expired token (another RRP, a restarted one) is
refused: the opener then closes every detached session, and the daemons end them in PPTP.

- :class:`ResumeTable`: the acceptor's tokens, live and detached links (one per factory).
- :class:`Resumer`: the opener's detached link and its session-id counter (one per factory).

Both are plain objects driven by :class:`~routeproxy.mux.connection.MuxConnection`:
``linkReady(conn)``, ``frameReceived(conn, frame)``, ``linkClosed(conn, detached)``;
both report ``snapshot()`` (docs/status.md).
"""
import itertools
import os

from twisted.logger import Logger

from routeproxy.mux import frames as F
from routeproxy.mux.frames import LinkError, Reason, ResumeResult
from routeproxy.mux.session import DETACHED

TOKEN_BYTES = 16       # 128 bits
MAX_GAPS = 1000        # gap durations kept for the status (the newest)


class _Detached:
    """A lost link whose sessions wait: since when, its grace timer, the resume under way."""

    def __init__(self, connection, since, timer):
        self.connection = connection
        self.since = since
        self.timer = timer
        self.attempt = None    # opener: the link the RESUME went out on

    def sessions(self):
        return [s for s in self.connection.sessions.values() if s.state == DETACHED]

    def cancel(self):
        if self.timer.active():
            self.timer.cancel()


class _ResumeState:
    """What both ends share: the grace time, the counters, ending a detached link."""

    log = Logger(namespace="routeproxy.mux")

    def __init__(self, clock, grace=30.0):
        if grace <= 0:
            raise ValueError("the resume grace time must be positive")
        self.clock = clock
        self.grace = grace
        self.resumesDone = 0
        self.resumesRefused = 0
        self.sessionsResumed = 0
        self.sessionsExpired = 0    # detached sessions that were never resumed
        self.gaps = []              # seconds from link loss to resume, newest last

    def _detach(self, connection, onExpiry):
        detached = _Detached(connection, self.clock.seconds(), None)
        detached.timer = self.clock.callLater(self.grace, onExpiry, detached)
        self.log.info("mux {peer}: link lost; {n} session(s) detached for up to {grace} s",
                      peer=connection.peerLabel, n=len(detached.sessions()), grace=self.grace)
        return detached

    def _end(self, detached, why):
        """Close every session of *detached* (the daemons end them in PPTP)."""
        detached.cancel()
        sessions = detached.sessions()
        self.sessionsExpired += len(sessions)
        if sessions:
            self.log.warn("mux {peer}: {n} detached session(s) closed: {why}",
                          peer=detached.connection.peerLabel, n=len(sessions), why=why)
        for session in sessions:
            session._terminate(Reason.LINK_LOST, why, byPeer=False)

    def _resumed(self, detached, connection, pairs):
        """Move each (session, peerReceived) of *detached* to *connection*; count the gap."""
        old = detached.connection
        for session, peerReceived in pairs:
            old.sessions.pop(session.id, None)
            connection.sessions[session.id] = session
            session._resume(connection, peerReceived)
        gap = self.clock.seconds() - detached.since
        self.gaps = (self.gaps + [gap])[-MAX_GAPS:]
        self.resumesDone += 1
        self.sessionsResumed += len(pairs)
        self.log.info("mux {peer}: link resumed after {gap:.2f} s: {n} session(s) re-attached",
                      peer=connection.peerLabel, gap=gap, n=len(pairs))

    def _detachedLinks(self):
        raise NotImplementedError

    def snapshot(self):
        """Counters as plain data (docs/status.md)."""
        gaps = self.gaps
        return {
            "grace_s": self.grace,
            "detached_links": len(self._detachedLinks()),
            "detached_sessions": sum(len(d.sessions()) for d in self._detachedLinks()),
            "resumes_done": self.resumesDone,
            "resumes_refused": self.resumesRefused,
            "sessions_resumed": self.sessionsResumed,
            "sessions_expired": self.sessionsExpired,
            "gap_last_s": round(gaps[-1], 3) if gaps else None,
            "gap_max_s": round(max(gaps), 3) if gaps else None,
        }


class ResumeTable(_ResumeState):
    """The acceptor's side: issues tokens, keeps detached links, answers RESUME."""

    sessionIds = None   # the acceptor allocates no session ids

    def __init__(self, clock, grace=30.0, randomBytes=os.urandom):
        super().__init__(clock, grace)
        self.randomBytes = randomBytes
        self.live = {}        # token -> MuxConnection
        self.detached = {}    # token -> _Detached

    def _detachedLinks(self):
        return list(self.detached.values())

    def linkReady(self, connection):
        if not connection.resumable:
            return
        token = self.randomBytes(TOKEN_BYTES)
        connection.resumeToken = token
        self.live[token] = connection
        connection._queue(F.Token(token).encode(), control=True)

    def linkClosed(self, connection, detached):
        token = connection.resumeToken
        if token is None or self.live.get(token) is not connection:
            return
        del self.live[token]
        if detached and any(s.state == DETACHED for s in connection.sessions.values()):
            self.detached[token] = self._detach(connection, self._expire)

    def _expire(self, detached):
        self.detached.pop(detached.connection.resumeToken, None)
        self._end(detached, f"not resumed within {self.grace:g} s")

    def frameReceived(self, connection, frame):
        if not isinstance(frame, F.Resume):
            connection.goAway(LinkError.PROTOCOL_ERROR,
                              f"{F.TYPE_NAMES[frame.TYPE]} sent to the acceptor")
            return
        self._resume(connection, frame)

    def _refuse(self, connection, code, why):
        self.resumesRefused += 1
        self.log.warn("mux {peer}: RESUME refused: {why}", peer=connection.peerLabel, why=why)
        connection._queue(F.Resumed(code, (), why).encode(), control=True)

    def _resume(self, connection, frame):
        token = frame.token
        stale = self.live.get(token)
        if stale is not None and stale is not connection and stale.peerName == connection.peerName:
            # The opener found the old link dead before we did.
            stale._shutdown("replaced by a resumed link", detach=True)
            if stale._link is not None:
                stale._link.abortConnection()
        detached = self.detached.get(token)
        if detached is None:
            self._refuse(connection, ResumeResult.UNKNOWN_TOKEN, "unknown or expired token")
            return
        if detached.connection.peerName != connection.peerName:
            self._refuse(connection, ResumeResult.WRONG_PEER,
                         f"the token belongs to {detached.connection.peerLabel}")
            return
        del self.detached[token]
        detached.cancel()
        wanted = dict(frame.offsets)
        answers, pairs = [], []
        for sid, session in sorted(detached.connection.sessions.items()):
            peerReceived = wanted.get(sid)
            if (session.state != DETACHED or peerReceived is None
                    or not session.ackedOffset <= peerReceived <= session.sentOffset):
                session._terminate(Reason.LINK_LOST, "not resumed", byPeer=False)
                continue
            answers.append((sid, session.recvOffset))
            pairs.append((session, peerReceived))
        # RESUMED goes before the replayed CONTROL of the sessions it re-attaches.
        connection._queue(F.Resumed(ResumeResult.OK, answers).encode(), control=True)
        connection._lastSessionId = max(connection._lastSessionId,
                                        detached.connection._lastSessionId)
        for sid in set(wanted) - {sid for sid, _ in answers}:
            connection._queue(F.Close(sid, Reason.LINK_LOST, "not resumed").encode(),
                              control=True)
        self._resumed(detached, connection, pairs)


class Resumer(_ResumeState):
    """The opener's side: keeps its token, its detached link, and sends RESUME."""

    def __init__(self, clock, grace=30.0):
        super().__init__(clock, grace)
        self.sessionIds = itertools.count(1)   # shared by every link, so ids keep increasing
        self.detached = None

    def _detachedLinks(self):
        return [] if self.detached is None else [self.detached]

    def retryDelay(self, attempt, delay):
        """While sessions wait, reconnect at once, then after 0.25, 0.75, 1, 1, ... s (within
        the grace time only); otherwise the usual backoff *delay*."""
        if self.detached is None:
            return delay
        return min(delay, 0.25 * (2 ** min(attempt - 1, 3) - 1), 1.0)

    def linkReady(self, connection):
        detached = self.detached
        if detached is None or detached.attempt is not None:
            return
        if not connection.resumable:
            self.detached = None
            self._end(detached, "the new link cannot resume (the peer lacks \"resume\")")
            return
        detached.attempt = connection
        offsets = [(sid, s.recvOffset) for sid, s in sorted(detached.connection.sessions.items())]
        connection._queue(F.Resume(detached.connection.resumeToken, offsets).encode(),
                          control=True)

    def linkClosed(self, connection, detached):
        if self.detached is not None:
            if self.detached.attempt is connection:
                self.detached.attempt = None   # try again on the next link
            # A second lost link while one waits: its sessions are not kept.
            for session in list(connection.sessions.values()):
                session._terminate(Reason.LINK_LOST, "link lost during a resume", byPeer=False)
            return
        if detached and any(s.state == DETACHED for s in connection.sessions.values()):
            self.detached = self._detach(connection, self._expire)

    def _expire(self, detached):
        if self.detached is detached:
            self.detached = None
        self._end(detached, f"not resumed within {self.grace:g} s")

    def frameReceived(self, connection, frame):
        if isinstance(frame, F.Token):
            connection.resumeToken = frame.token
        elif isinstance(frame, F.Resumed):
            self._answer(connection, frame)
        else:
            connection.goAway(LinkError.PROTOCOL_ERROR,
                              f"{F.TYPE_NAMES[frame.TYPE]} sent to the opener")

    def _answer(self, connection, frame):
        detached = self.detached
        if detached is None or detached.attempt is not connection:
            # Our grace ran out while the RESUME was under way: end what the peer re-attached.
            for sid, _ in frame.offsets:
                connection._queue(F.Close(sid, Reason.LINK_LOST, "not resumed in time").encode(),
                                  control=True)
            return
        self.detached = None
        if frame.code != ResumeResult.OK:
            self.resumesRefused += 1
            name = F.RESUME_RESULT_NAMES.get(frame.code, f"code {frame.code}")
            self._end(detached, f"resume refused ({name}: {frame.text})")
            return
        detached.cancel()
        answers = dict(frame.offsets)
        pairs = []
        for sid, session in sorted(detached.connection.sessions.items()):
            peerReceived = answers.pop(sid, None)
            if peerReceived is None:
                session._terminate(Reason.LINK_LOST, "the peer no longer has it", byPeer=False)
            elif not session.ackedOffset <= peerReceived <= session.sentOffset:
                session._terminate(Reason.PROTOCOL_ERROR, "resume offset out of range", byPeer=False)
                answers[sid] = peerReceived   # the peer re-attached it: close it there
            else:
                pairs.append((session, peerReceived))
        for sid in answers:
            connection._queue(F.Close(sid, Reason.LINK_LOST, "not resumed").encode(), control=True)
        self._resumed(detached, connection, pairs)
