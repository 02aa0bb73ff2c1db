"""The Local Route Proxy: the PPTP server its clients dial.

Each client control connection becomes one relay session and one mux session towards the
RRP, opened by an :class:`~routeproxy.upstream.UpstreamOpener`.  The LRP owns the call IDs
its clients see for pptpd (``L``, one scope for all its calls), so GRE from clients is
demultiplexed by its key alone, then checked against the control connection's address.
"""
import collections
import ipaddress

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from routeproxy import pptp, tls
from routeproxy.admission import ClientAdmission, RefusingProtocol
from routeproxy.callids import CallIDSpace
from routeproxy.control import PPTPControlProtocol
from routeproxy.fdbudget import FileBudget
from routeproxy.limits import DEFAULT as DEFAULT_LIMITS, reconfigureLimits
from routeproxy.mux.connection import MuxConfig
from routeproxy.mux.frames import RESUME_CAPABILITY
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

    def __init__(self, reactor, openGREPort, profile="default", allow=None, space=None,
                 limits=DEFAULT_LIMITS):
        self.reactor = reactor
        self.profile = profile
        self.limits = limits
        self.allow = list(allow) if allow else None
        self.space = space if space is not None else CallIDSpace("LRP")
        self.relay = Relay(LRP, SharedScope(self.space), openGREPort, limits=limits, clock=reactor)
        self.admission = ClientAdmission(limits, self.relay.refusals)
        self.files = FileBudget()   # the listener pauses while descriptors run low
        self.links = set()        # MuxConnections (LinkFactory.connections)
        self.resumer = None       # mux.resume.Resumer when --resume-grace is on
        self._linkWaiters = []
        self.tls = None           # the link's tls.ClientTLS (the tap sets it; reload swaps it)
        self.refusals = self.relay.refusals     # clients, sessions and calls refused, by reason
        self.linksUp = 0
        self.linkConnectFailures = 0

    # --- the link to the RRP ---------------------------------------------------------

    @property
    def link(self):
        """The ready mux connection to the RRP, or None."""
        return next((c for c in self.links if c.ready), None)

    def linkUp(self, connection):
        self.linksUp += 1
        self.log.info("LRP: link to the RRP {peer} is up", peer=connection.peerLabel)
        waiters, self._linkWaiters = self._linkWaiters, []
        for d, timer in waiters:
            timer.cancel()
            d.callback(connection)
        return connection

    def linkFailed(self, address, why):
        """A connection attempt to the RRP failed: one line with the reason (the
        reconnection backoff goes on)."""
        self.linkConnectFailures += 1
        self.log.warn("LRP: cannot connect the link to the RRP {address}: {why}; retrying",
                      address=address, why=why)

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

    def reconfigure(self, old, new):
        """A reload: the allow-list and profile for new clients, the TLS settings for new
        links; clients no longer allowed are ended with a PPTP teardown."""
        changes = []
        allow = list(new["allow"]) if new["allow"] else None
        if allow != self.allow:
            self.allow = allow
            ended = self.relay.shutDown("no longer in --allow",
                                        lambda s: s.peerAddress and not self.allowed(s.peerAddress))
            shown = ", ".join(map(str, allow)) if allow else "any"
            changes.append(f"--allow now {shown} ({len(ended)} session(s) ended)")
        if new["profile"] != self.profile:
            changes.append(f"--profile {self.profile} -> {new['profile']} (new sessions)")
            self.profile = new["profile"]
        if self.tls is not None and new["tls-files"] != old["tls-files"]:
            self.tls.replaceWith(new["tls"])
            changes.append("TLS certificate, key or CA reread (next link connection)")
        changes += reconfigureLimits(self, old, new)
        return changes

    def snapshot(self):
        """The LRP as plain data (docs/status.md)."""
        snapshot = dict(self.relay.snapshot(self.links), profile=self.profile,
                        admission=self.admission.snapshot(), files=self.files.snapshot(),
                        tls_handshake_failures=getattr(self.tls, "handshakeFailures", 0),
                        link_connect_failures=self.linkConnectFailures,
                        link_reconnects=max(0, self.linksUp - 1))
        if self.resumer is not None:
            snapshot["resume"] = self.resumer.snapshot()
        return snapshot


class LinkFactory(MuxClientFactory):
    """The LRP's end of the link: tells the LRP when each new connection is ready."""

    noisy = False  # no "Starting factory" line per reconnection

    def __init__(self, lrp, clock, resumeGrace=30.0, deadTimeout=8.0, **more):
        resumer = Resumer(clock, resumeGrace) if resumeGrace else None
        super().__init__(config=muxConfig(resumeGrace, deadTimeout, **more), clock=clock,
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


class PPTPServerFactory(Factory):
    """Accepts client control connections from the allowed addresses only."""

    noisy = False  # one log line per session is ours to write

    log = Logger()

    def __init__(self, lrp):
        self.lrp = lrp

    def buildProtocol(self, addr):
        if not self.lrp.allowed(addr.host):
            self.lrp.refusals.count("not_allowed")
            self.lrp.relay.peerLog.warn("allow", "LRP: refused PPTP client {host}:{port}: not "
                                        "in --allow", host=addr.host, port=addr.port)
            return None
        refusal = self.lrp.admission.refusal(addr.host)
        if refusal is not None:
            self.lrp.admission.refusals.add(refusal, f"PPTP client {addr.host}:{addr.port}")
            return RefusingProtocol()
        return PPTPControlProtocol(self.lrp.newSession())
