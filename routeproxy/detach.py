"""A relay session while its link is lost and its mux session waits for a resume.

The mux session is DETACHED (docs/protocol.md s.10) for up to ``--resume-grace`` seconds.
Meanwhile the PPTP peer (client at the LRP, pptpd at the RRP) keeps its TCP connection:

- an Echo-Request from it is answered here, so its keepalive does not end the call, unless
  an earlier one still waits for the far side's reply (the replies then keep their order);
- any other message is held by the mux session, which then pauses reading the peer's
  connection until the resume (the control window bounds what is held);
- GRE from it is dropped and counted (``mux_detached``): PPP tolerates loss, and there is
  nowhere to send it.

If the session ends instead of resuming (grace expired, resume refused, another RRP), the
peer is told in PPTP before its connection closes: each call is ended (Call-Disconnect-Notify
to a client, Call-Clear-Request to pptpd: each in the direction RFC 2637 allows) and then
Stop-Control-Connection-Request, so both PPTP ends free their calls at once.
"""
from twisted.logger import Logger

from routeproxy import pptp, teardown

# How a session the link took with it ends in PPTP: as a lost carrier, no stop reason.
LINK_GONE = (pptp.DisconnectResult.LOST_CARRIER, pptp.StopReason.NONE)

DROP_MUX_DETACHED = "mux_detached"   # GRE from the peer while the link is lost


class Gap:
    """One detached period of one relay session (*session*: a RelaySession)."""

    log = Logger()

    def __init__(self, session, clock):
        self.session = session
        self.clock = clock
        self.since = clock.seconds()
        self.echoesAnswered = 0
        self.greDropped = 0
        self.log.info("{side} {peer}: link lost; session detached, waiting for a resume",
                      side=session.side.name, peer=session.peerLabel)

    def seconds(self):
        return self.clock.seconds() - self.since

    def answered(self, message):
        """True if *message* from the peer was dealt with here (an Echo-Request)."""
        if not isinstance(message, pptp.EchoRequest) or self.session.echoesPending:
            return False
        self.echoesAnswered += 1
        self.session.sendToPeer(pptp.EchoReply(identifier=message.identifier,
                                               result_code=pptp.EchoResult.OK))
        return True

    def resumed(self):
        self.log.info("{side} {peer}: session resumed after {gap:.2f} s ({echoes} Echo-Request(s)"
                      " answered, {gre} GRE packet(s) dropped meanwhile)",
                      side=self.session.side.name, peer=self.session.peerLabel, gap=self.seconds(),
                      echoes=self.echoesAnswered, gre=self.greDropped)

    def endInPPTP(self):
        """The session ends without a resume: end its calls and the control connection in PPTP."""
        session = self.session
        calls = list(session.book.calls) if session.book is not None else []
        for message, call in teardown.to_peer(session.side.owner, calls, why=LINK_GONE):
            session.sendToPeerAbout(message, call)
