"""The Remote Route Proxy: accepts LRPs over TLS and dials the configured PPTP servers.

Each mux session names a profile; the RRP alone maps it to a server (so no LRP can make it
dial anywhere else), dials that server on TCP, and relays.  The RRP owns the call IDs the
server sees for clients (``R``), one scope per server address, so GRE from a server is
demultiplexed by (source address, key).
"""
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from routeproxy import gre, pptp
from routeproxy.callids import CallIDSpace
from routeproxy.mux.frames import Reason
from routeproxy.mux.session import SessionRefused
from routeproxy.relay import PPTPControlProtocol, RelayDaemon, RelaySession


class ServerSession(RelaySession):
    """One client's control connection as the PPTP server sees it: dialled by the RRP."""

    side = "RRP"
    OWNER = pptp.PNS      # we rewrite the clients' IDs into ours
    LOCAL_NAME = "R"

    def __init__(self, daemon, profile, client_label):
        super().__init__(daemon)
        self.profile = profile
        self.client_label = client_label

    def closeDetail(self):
        return f"; client {self.client_label}"

    def greKey(self, call):
        return call.pac_id    # the server's own ID for the call

    def callIDsExhausted(self, message):
        if isinstance(message, pptp.OutgoingCallRequest):
            # Answer for the server, as the server would when it has no room.
            reply = pptp.OutgoingCallReply(
                call_id=0, peer_call_id=message.call_id,
                result_code=pptp.OutgoingCallResult.GENERAL_ERROR,
                error_code=pptp.ErrorCode.NO_RESOURCE)
            self.sendToMux(reply.pack())
        else:
            super().callIDsExhausted(message)


class RemoteRouteProxy(RelayDaemon):
    """The RRP's state: the profiles it may dial, the sessions, a call-ID space per server."""

    log = Logger()

    def __init__(self, reactor, profiles, source=None, gre_port=None, connect_timeout=10):
        super().__init__(gre_port)
        self.reactor = reactor
        self.profiles = dict(profiles)
        self.source = source
        self.connect_timeout = connect_timeout
        self.spaces = {}          # server IP -> CallIDSpace (servers are few and configured)

    def spaceFor(self, server_ip):
        space = self.spaces.get(server_ip)
        if space is None:
            space = self.spaces[server_ip] = CallIDSpace(f"RRP towards {server_ip}")
        return space

    def sessionRequested(self, mux, profile, clientInfo):
        """A mux OPEN: dial the profile's server; accept once connected, refuse otherwise."""
        lrp = mux.connection.peerLabel
        target = self.profiles.get(profile)
        if target is None:
            self.log.warn("RRP: LRP {lrp} asked for unknown profile {profile!r} (client {client}); "
                          "refused", lrp=lrp, profile=profile, client=clientInfo)
            raise SessionRefused(Reason.UNKNOWN_PROFILE, f"no profile {profile!r}")
        host, port = target
        session = ServerSession(self, profile, f"{clientInfo} via {lrp}")
        bind = (self.source, 0) if self.source else None
        endpoint = TCP4ClientEndpoint(self.reactor, host, port, timeout=self.connect_timeout,
                                      bindAddress=bind)
        d = endpoint.connect(_SessionFactory(session))

        def connected(protocol):
            self.sessions.add(session)
            session.muxOpened(mux)
            self.log.info("RRP session opened: client {client}, profile {profile} -> "
                          "server {server}, mux session {sid}", client=session.client_label,
                          profile=profile, server=session.peer_label, sid=mux.id)
            return session

        def failed(failure):
            why = failure.getErrorMessage()
            self.log.warn("RRP: cannot reach server {host}:{port} of profile {profile} for "
                          "client {client}: {why}; refused", host=host, port=port,
                          profile=profile, client=session.client_label, why=why)
            raise SessionRefused(Reason.UPSTREAM_UNREACHABLE, f"{host}:{port}: {why}")

        return d.addCallbacks(connected, failed)

    def greReceived(self, src, dst, data):
        space = self.spaces.get(src)
        if space is None:
            self.drops.add("GRE from an address that is no server of ours", f"from {src}")
            return
        try:
            call_id, seq, ack, payload = gre.split_gre(data)
        except gre.GREError as e:
            self.drops.add(f"bad GRE: {e.reason}", f"from {src}: {e}")
            return
        call = space.owner_of(call_id)
        if call is None:
            self.drops.add("GRE for an unknown call ID", f"call ID {call_id} from {src}")
            return
        call.book.session.greFromPeer(call, seq, ack, payload)


class _SessionFactory(Factory):
    """Builds the control connection to the server for one session."""

    noisy = False  # one log line per session is ours to write

    def __init__(self, session):
        self.session = session

    def buildProtocol(self, addr):
        protocol = PPTPControlProtocol()
        protocol.session = self.session
        return protocol
