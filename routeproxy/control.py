"""The PPTP control connection (TCP 1723) at either end of the proxy: parse and emit only.

:class:`PPTPControlProtocol` cuts the byte stream into messages for its relay session and
writes the messages it is given.  :class:`MuxReadingControl` lets the peer's TCP send
buffer pause the mux session that feeds it (producer-driven backpressure, as
twisted.web._http2 does per stream).
"""
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from routeproxy import pptp
from routeproxy.mux.linksocket import noDelay


class PPTPControlProtocol(Protocol):
    """A PPTP control connection: parse and emit, nothing else; the session decides."""

    def __init__(self, session):
        self.session = session
        self.decoder = None

    def connectionMade(self):
        # PPTP control messages are small request/reply pairs: Nagle only adds delay.
        noDelay(self.transport)
        self.decoder = pptp.PPTPStreamDecoder()
        self.session.peerConnected(self)

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
class MuxReadingControl:
    """Pauses the mux session's delivery while the peer's TCP send buffer is full."""

    def __init__(self, muxSession):
        self.muxSession = muxSession

    def pauseProducing(self):
        self.muxSession.pauseReading()

    def resumeProducing(self):
        self.muxSession.resumeReading()

    def stopProducing(self):
        pass
