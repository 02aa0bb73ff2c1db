"""The Local Route Proxy: the PPTP server its clients dial.

Each client control connection becomes one relay session and one mux session towards the
RRP, opened by an :class:`~routeproxy.upstream.UpstreamOpener`.  The LRP owns the call IDs
its clients see for pptpd (``L``, one scope for all its calls), so GRE from clients is
demultiplexed by its key alone, then checked against the control connection's address.
"""
import ipaddress

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from routeproxy import pptp, tls
from routeproxy.callids import CallIDSpace
from routeproxy.control import PPTPControlProtocol
from routeproxy.mux.connection import MuxConfig
from routeproxy.mux.frames import RESUME_CAPABILITY, LinkError
from routeproxy.mux.protocol import MuxClientFactory
from routeproxy.mux.resume import Resumer
from routeproxy.mux.session import LinkDown
from routeproxy.relay import Relay, Side
from routeproxy.scopes import SharedScope
from routeproxy.upstream import UpstreamOpener

#: The LRP rewrites pptpd's IDs (``S`` <-> ``L``); when no ``L`` is left for a call pptpd
#: answered, the session ends (its client cannot be handed an ID it could use).
LRP = Side(name="LRP", peerRole="client", owner=pptp.PAC, localName="L")


class LocalRouteProxy:
    """The LRP's state: the link, the allowed clients, and its relay (sessions, call IDs)."""

    log = Logger()
    # How long a client that arrives while the link is down waits for it before it is told
    # (in PPTP) that no server is available.
    linkWait = 5.0

    def __init__(self, reactor, openGREPort, profile="default", allow=None, space=None):
        self.reactor = reactor
        self.profile = profile
        self.allow = list(allow) if allow else None
        self.space = space if space is not None else CallIDSpace("LRP")
        self.relay = Relay(LRP, SharedScope(self.space), openGREPort)
        self.links = set()        # MuxConnections (LinkFactory.connections)
        self.resumer = None       # mux.resume.Resumer when --resume-grace is on
        self._linkWaiters = []

    # --- the link to the RRP ---------------------------------------------------------

    @property
    def link(self):
        """The ready mux connection to the RRP, or None."""
        return next((c for c in self.links if c.ready), None)

    def linkUp(self, connection):
        self.log.info("LRP: link to the RRP {peer} is up", peer=connection.peerLabel)
        waiters, self._linkWaiters = self._linkWaiters, []
        for d, timer in waiters:
            timer.cancel()
            d.callback(connection)
        return connection

    def whenLinkReady(self):
        """Deferred firing with the ready link, failing after ``linkWait`` seconds."""
        link = self.link
        if link is not None:
            return defer.succeed(link)
        d = defer.Deferred()

        def giveUp():
            self._linkWaiters.remove(entry)
            d.errback(LinkDown("no link to the RRP"))

        entry = (d, self.reactor.callLater(self.linkWait, giveUp))
        self._linkWaiters.append(entry)
        return d

    # --- clients ---------------------------------------------------------------------

    def allowed(self, host):
        if self.allow is None:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.allow)

    def newSession(self):
        """A relay session for a client that just connected."""
        return self.relay.newSession(UpstreamOpener(self, self.profile))

    def snapshot(self):
        """The LRP as plain data (docs/status.md)."""
        snapshot = dict(self.relay.snapshot(self.links), profile=self.profile)
        if self.resumer is not None:
            snapshot["resume"] = self.resumer.snapshot()
        return snapshot


class LinkFactory(MuxClientFactory):
    """The LRP's end of the link: tells the LRP when each new connection is ready."""

    def __init__(self, lrp, clock, resumeGrace=30.0, deadTimeout=8.0):
        resumer = Resumer(clock, resumeGrace) if resumeGrace else None
        super().__init__(config=muxConfig(resumeGrace, deadTimeout), clock=clock,
                         peerNameOf=tls.peerName, resume=resumer)
        self.lrp = lrp
        lrp.links = self.connections
        lrp.resumer = resumer

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        protocol.connection.whenReady().addCallbacks(self.lrp.linkUp, lambda f: None)
        return protocol


def muxConfig(resumeGrace, deadTimeout, **more):
    """Both daemons' link settings: "resume" when a grace time is set; a ping every quarter
    of the dead timeout."""
    return MuxConfig(pingInterval=deadTimeout / 4, deadTimeout=deadTimeout,
                     capabilities=(RESUME_CAPABILITY,) if resumeGrace else (), **more)


class LinkShutdown(Service):
    """Closes the links with GOAWAY when the daemon (*proxy*: the LRP or the RRP) stops.

    ClientService would close the TLS transport itself, which waits for ever while the mux
    protocol is registered as its producer; the mux's own close unregisters first.  A
    GOAWAY also tells the peer that this is a stop, not a loss: its sessions end at once
    instead of waiting for a resume (docs/protocol.md s.10).
    """

    def __init__(self, proxy, name="LRP"):
        self.lrp = proxy
        self.name = name

    def stopService(self):
        super().stopService()
        for connection in list(self.lrp.links):
            connection.goAway(LinkError.NO_ERROR, f"{self.name} shutting down")


class PPTPServerFactory(Factory):
    """Accepts client control connections from the allowed addresses only."""

    noisy = False  # one log line per session is ours to write

    log = Logger()

    def __init__(self, lrp):
        self.lrp = lrp

    def buildProtocol(self, addr):
        if not self.lrp.allowed(addr.host):
            self.log.warn("LRP: refused PPTP client {host}:{port}: not in --allow",
                          host=addr.host, port=addr.port)
            return None
        return PPTPControlProtocol(self.lrp.newSession())
