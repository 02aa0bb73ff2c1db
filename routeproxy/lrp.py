"""The Local Route Proxy: the PPTP server its clients dial.

Each client control connection becomes one mux session towards the RRP.  The LRP owns the
call IDs its clients see for pptpd (``L``, one scope for all its calls), so GRE from clients
is demultiplexed by its key alone, then checked against the control connection's address.
"""
import ipaddress

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from routeproxy import gre, pptp, tls
from routeproxy.callids import CallIDSpace
from routeproxy.mux.frames import LinkError, Reason, reasonName
from routeproxy.mux.protocol import MuxClientFactory
from routeproxy.mux.session import SessionRefused
from routeproxy.relay import MAX_EARLY_MESSAGES, PPTPControlProtocol, RelayDaemon, RelaySession


class ClientSession(RelaySession):
    """One client's control connection, relayed through one mux session."""

    side = "LRP"
    OWNER = pptp.PAC      # we rewrite pptpd's IDs into ours
    LOCAL_NAME = "L"
    start_wait = 10.0   # seconds a refused client gets to send its Start-Control-Connection-Request

    def __init__(self, daemon):
        super().__init__(daemon)
        self.early = []           # packed messages from the client before the session opens
        self.refusal = None       # why the mux session could not open
        self.start_pending = False
        self.opened = False
        self._start_timer = None

    def peerConnected(self, protocol):
        super().peerConnected(protocol)
        self.daemon.whenLinkReady().addCallbacks(self._linkReady, self._refused)

    def _linkReady(self, link):
        if self.closed:
            return
        try:
            mux = link.openSession(self.daemon.profile, self.peer_label, self)
        except SessionRefused as e:
            self._refused(Failure(e))
            return
        mux.whenOpen().addCallbacks(self._opened, self._refused)

    def _opened(self, mux):
        if self.closed:
            mux.close(text="client already gone")
            return
        self.opened = True
        self.muxOpened(mux)
        self.log.info("LRP session opened: client {peer}, mux session {sid}, profile {profile}",
                      peer=self.peer_label, sid=mux.id, profile=self.daemon.profile)
        early, self.early = self.early, None
        for data in early:
            mux.sendControl(data)

    def _refused(self, failure):
        self._refusedBecause(str(failure.value))

    def _refusedBecause(self, why):
        if self.closed or self.refusal is not None:
            return
        self.refusal = why
        if self.start_pending:
            self._answerStart()
        else:
            # The client has not asked yet; answer its Start-Control-Connection-Request
            # when it comes, but do not hold the connection for ever.
            self._start_timer = self.daemon.reactor.callLater(
                self.start_wait, self.close, f"upstream not available ({why}); the client sent "
                "no Start-Control-Connection-Request")

    def sessionClosed(self, reason):
        if not self.opened:
            # Refused (or the link went) before the session opened: the client still gets
            # its answer in PPTP, not a bare close.
            self.mux = None
            self._refusedBecause(f"mux session closed ({reasonName(reason)})")
            return
        super().sessionClosed(reason)

    def peerMessage(self, message):
        if self.mux is None and not self.closed:
            if isinstance(message, pptp.StartControlConnectionRequest):
                self.start_pending = True
                if self.refusal is not None:
                    self._answerStart()
                    return
        super().peerMessage(message)

    def sendToMux(self, data):
        if self.mux is not None:
            self.mux.sendControl(data)
        elif self.refusal is not None:
            self.close(f"upstream not available: {self.refusal}")
        else:
            self.early.append(data)
            if len(self.early) > MAX_EARLY_MESSAGES:
                self.close(f"client sent {len(self.early)} messages before the upstream answered")

    def _answerStart(self):
        """Tell the client, in PPTP, that there is no server behind us; then hang up."""
        if self.closed:
            return
        if self._start_timer is not None and self._start_timer.active():
            self._start_timer.cancel()
        self.log.warn("LRP client {peer}: upstream not available ({why}); answering "
                      "Start-Control-Connection-Reply with a general error",
                      peer=self.peer_label, why=self.refusal)
        self.sendToPeer(pptp.StartControlConnectionReply(
            result_code=pptp.StartResult.GENERAL_ERROR, error_code=pptp.ErrorCode.PAC_ERROR,
            host_name=b"routeproxy", vendor_string=b"routeproxy"))
        self.close(f"upstream not available: {self.refusal}")

    def greKey(self, call):
        return call.pns_id    # the client's own ID for the call


class LocalRouteProxy(RelayDaemon):
    """The LRP's state: the link, the sessions, the call-ID space its clients see."""

    log = Logger()
    # How long a client that arrives while the link is down waits for it before it is told
    # (in PPTP) that no server is available.
    link_wait = 5.0

    def __init__(self, reactor, profile="default", allow=None, space=None, gre_port=None):
        super().__init__(gre_port)
        self.reactor = reactor
        self.profile = profile
        self.allow = list(allow) if allow else None
        self.space = space if space is not None else CallIDSpace("LRP")
        self.links = set()        # MuxConnections (LinkFactory.connections)
        self._link_waiters = []

    # --- the link to the RRP ---------------------------------------------------------

    @property
    def link(self):
        """The ready mux connection to the RRP, or None."""
        return next((c for c in self.links if c.ready), None)

    def linkUp(self, connection):
        self.log.info("LRP: link to the RRP {peer} is up", peer=connection.peerLabel)
        waiters, self._link_waiters = self._link_waiters, []
        for d, timer in waiters:
            timer.cancel()
            d.callback(connection)
        return connection

    def whenLinkReady(self):
        """Deferred firing with the ready link, failing after ``link_wait`` seconds."""
        link = self.link
        if link is not None:
            return defer.succeed(link)
        d = defer.Deferred()

        def give_up():
            self._link_waiters.remove(entry)
            d.errback(SessionRefused(Reason.LINK_LOST, "no link to the RRP"))

        entry = (d, self.reactor.callLater(self.link_wait, give_up))
        self._link_waiters.append(entry)
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
        session = ClientSession(self)
        self.sessions.add(session)
        return session

    def spaceFor(self, peer_ip):
        return self.space

    # --- GRE from clients --------------------------------------------------------------

    def greReceived(self, src, dst, data):
        try:
            call_id, seq, ack, payload = gre.split_gre(data)
        except gre.GREError as e:
            self.drops.add(f"bad GRE: {e.reason}", f"from {src}: {e}")
            return
        call = self.space.owner_of(call_id)
        if call is None:
            self.drops.add("GRE for an unknown call ID", f"call ID {call_id} from {src}")
            return
        session = call.book.session
        if src != session.peer_ip:
            self.drops.add("GRE from the wrong address",
                           f"call ID {call_id} belongs to {session.peer_ip}, came from {src}")
            return
        session.greFromPeer(call, seq, ack, payload)


class LinkFactory(MuxClientFactory):
    """The LRP's end of the link: tells the LRP when each new connection is ready."""

    def __init__(self, lrp, clock):
        super().__init__(clock=clock, peerNameOf=tls.peerName)
        self.lrp = lrp
        lrp.links = self.connections

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        protocol.connection.whenReady().addCallbacks(self.lrp.linkUp, lambda f: None)
        return protocol


class LinkShutdown(Service):
    """Closes the links with GOAWAY when the LRP stops.

    ClientService would close the TLS transport itself, which waits for ever while the mux
    protocol is registered as its producer; the mux's own close unregisters first.
    """

    def __init__(self, lrp):
        self.lrp = lrp

    def stopService(self):
        super().stopService()
        for connection in list(self.lrp.links):
            connection.goAway(LinkError.NO_ERROR, "LRP shutting down")


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
        protocol = PPTPControlProtocol()
        protocol.session = self.lrp.newSession()
        return protocol
