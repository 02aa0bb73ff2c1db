"""The LRP's way to an upstream: wait for the link, open a mux session, answer if it can't.

A client connects before anything exists behind the LRP.  :class:`UpstreamOpener` stands in
for the mux session of one :class:`~routeproxy.relay.RelaySession` until the RRP has dialled
pptpd: it waits for the link, opens the mux session, holds the client's first messages
(a real client sends one Start-Control-Connection-Request and waits), and hands the open
mux session to the relay session.  If the upstream cannot be had, the client is told in
PPTP (Start-Control-Connection-Reply, general error), not by a bare close.
"""
from twisted.logger import Logger
from twisted.python.failure import Failure

from routeproxy import pptp
from routeproxy.mux.session import SessionNotOpened

# Control messages a client may send before the mux session is open.
MAX_EARLY_MESSAGES = 16


class UpstreamOpener:
    """Opens one client's mux session through *lrp*'s link to the RRP (see the module)."""

    log = Logger()
    startWait = 10.0   # seconds a refused client gets to send its Start-Control-Connection-Request

    def __init__(self, lrp, profile):
        self.lrp = lrp
        self.profile = profile
        self.session = None       # the RelaySession this opener stands in for
        self.muxSession = None    # the mux session while it is OPENING
        self.early = []           # messages from the client before the session opens
        self.refusal = None       # why the mux session could not open
        self.startPending = False
        self._startTimer = None

    def start(self, session):
        """The client is connected: find the link."""
        self.session = session
        self.lrp.whenLinkReady().addCallbacks(self._linkReady, self._failed)

    def state(self):
        return "refused" if self.refusal is not None else "opening"

    def _linkReady(self, link):
        if self.session.closed:
            return
        try:
            self.muxSession = link.openSession(self.profile, self.session.peerLabel, self.session)
        except SessionNotOpened as e:
            self._failed(Failure(e))
            return
        self.muxSession.whenOpen().addCallbacks(self._opened, self._failed)

    def _opened(self, mux):
        self.muxSession = None
        if self.session.closed:
            mux.close(text="client already gone")
            return
        self.session.muxOpened(mux)
        self.log.info("LRP session opened: client {peer}, mux session {sid}, profile {profile}",
                      peer=self.session.peerLabel, sid=mux.id, profile=self.profile)
        early, self.early = self.early, []
        for message in early:
            mux.sendControl(message.pack())

    def _failed(self, failure):
        self.refused(str(failure.value))

    def hold(self, message):
        """A client message (IDs already translated) before the mux session is open."""
        if isinstance(message, pptp.StartControlConnectionRequest):
            self.startPending = True
            if self.refusal is not None:
                self._answerStart()
                return
        if self.refusal is not None:
            self.session.close(f"upstream not available: {self.refusal}")
            return
        self.early.append(message)
        if len(self.early) > MAX_EARLY_MESSAGES:
            self.session.close(f"client sent {len(self.early)} messages before the upstream "
                               "answered")

    def refused(self, why):
        """The upstream cannot be had: answer the client's Start request, now or when it comes."""
        self.muxSession = None
        if self.session.closed or self.refusal is not None:
            return
        self.refusal = why
        if self.startPending:
            self._answerStart()
        else:
            # Answer the client's Start-Control-Connection-Request when it comes, but do not
            # hold the connection for ever.
            self._startTimer = self.lrp.reactor.callLater(
                self.startWait, self.session.close, f"upstream not available ({why}); the "
                "client sent no Start-Control-Connection-Request")

    def cancel(self):
        """The session is closing: no timer may outlive it."""
        if self._startTimer is not None and self._startTimer.active():
            self._startTimer.cancel()
        self._startTimer = None

    def _answerStart(self):
        """Tell the client, in PPTP, that there is no server behind us; then hang up."""
        self.log.warn("LRP client {peer}: upstream not available ({why}); answering "
                      "Start-Control-Connection-Reply with a general error",
                      peer=self.session.peerLabel, why=self.refusal)
        self.session.sendToPeer(pptp.StartControlConnectionReply(
            result_code=pptp.StartResult.GENERAL_ERROR, error_code=pptp.ErrorCode.PAC_ERROR,
            host_name=b"routeproxy", vendor_string=b"routeproxy"))
        self.session.close(f"upstream not available: {self.refusal}")
