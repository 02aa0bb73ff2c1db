"""The LRP's way to an upstream: wait for the link, open a mux session, answer if it can't.

A client connects before anything exists behind the LRP.  :class:`UpstreamOpener` stands in
for the mux session of one :class:`~routeproxy.relay.RelaySession` until the RRP has dialled
pptpd.  Nothing is opened upstream until the client has sent a valid
Start-Control-Connection-Request (within ``limits.startTimeout`` seconds, else it is closed),
so a connection that sends nothing costs one socket here and nothing at the RRP or pptpd.
Then it waits for the link, opens the mux session, holds the client's first messages, and
hands the open mux session to the relay session.  If the upstream cannot be had, the client
is told in PPTP (Start-Control-Connection-Reply, general error), not by a bare close.
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

    def __init__(self, lrp, profile):
        self.lrp = lrp
        self.profile = profile
        self.session = None       # the RelaySession this opener stands in for
        self.muxSession = None    # the mux session while it is OPENING
        self.early = []           # messages from the client before the session opens
        self.refusal = None       # why the mux session could not open
        self.started = False      # the client's Start-Control-Connection-Request came
        self._startTimer = None
        self._admitted = None     # the address counted in lrp.admission

    def start(self, session):
        """The client is connected: give it ``startTimeout`` s to send its Start request."""
        self.session = session
        self._admitted = session.peerAddress
        self.lrp.admission.connected(self._admitted)
        self._startTimer = self.lrp.reactor.callLater(
            self.lrp.limits.startTimeout, self._startTimedOut)

    def _startTimedOut(self):
        self._startTimer = None
        self.lrp.admission.refusals.add(
            "start_timeout", f"{self.session.peerLabel}: no Start-Control-Connection-Request "
            f"within {self.lrp.limits.startTimeout:g} s")
        self.session.close(f"no Start-Control-Connection-Request within "
                           f"{self.lrp.limits.startTimeout:g} s")

    def _begin(self):
        """The client sent its Start request: now the link, the mux session and pptpd."""
        self.started = True
        self._stopTimer()
        self.lrp.admission.started(self._admitted)
        self.lrp.whenLinkReady().addCallbacks(self._linkReady, self._failed)

    def state(self):
        if self.refusal is not None:
            return "refused"
        return "opening" if self.started else "unstarted"

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
        if not self.started:
            if not isinstance(message, pptp.StartControlConnectionRequest):
                self.lrp.admission.refusals.add(
                    "not_started", f"{self.session.peerLabel}: {message.NAME} before "
                    "Start-Control-Connection-Request")
                self.session.close(f"{message.NAME} before Start-Control-Connection-Request")
                return
            self._begin()
        if self.refusal is not None:
            self.session.close(f"upstream not available: {self.refusal}")
            return
        self.early.append(message)
        if len(self.early) > MAX_EARLY_MESSAGES:
            self.session.close(f"client sent {len(self.early)} messages before the upstream "
                               "answered")

    def refused(self, why):
        """The upstream cannot be had (only asked once the Start request came): answer it."""
        self.muxSession = None
        if self.session.closed or self.refusal is not None:
            return
        self.refusal = why
        self._answerStart()

    def _stopTimer(self):
        if self._startTimer is not None and self._startTimer.active():
            self._startTimer.cancel()
        self._startTimer = None

    def cancel(self):
        """The session is closing: no timer may outlive it, its admission is given back."""
        self._stopTimer()
        if self._admitted is not None:
            self.lrp.admission.ended(self._admitted, self.started)
            self._admitted = None

    def _answerStart(self):
        """Tell the client, in PPTP, that there is no server behind us; then hang up."""
        self.lrp.relay.peerLog.warn(
            "upstream", "LRP client {peer}: upstream not available ({why}); answering "
            "Start-Control-Connection-Reply with a general error",
            peer=self.session.peerLabel, why=self.refusal)
        self.session.sendToPeer(startRefusal(pptp.ErrorCode.PAC_ERROR))
        self.session.close(f"upstream not available: {self.refusal}")


def startRefusal(errorCode):
    """The Start-Control-Connection-Reply that tells a client there is no room or no server."""
    return pptp.StartControlConnectionReply(
        result_code=pptp.StartResult.GENERAL_ERROR, error_code=errorCode,
        host_name=b"routeproxy", vendor_string=b"routeproxy")
