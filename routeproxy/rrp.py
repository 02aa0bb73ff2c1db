"""The Remote Route Proxy: accepts LRPs over TLS and dials the configured PPTP servers.

Each mux session names a profile; the RRP alone maps it to a server (so no LRP can make it
dial anywhere else), dials that server on TCP, and relays.  The RRP owns the call IDs the
server sees for clients (``R``), one scope per server address, so GRE from a server is
demultiplexed by (source address, key).  A profile whose server takes few calls per control
connection (pptpd: one) gets its sessions' calls spread over more connections
(:mod:`routeproxy.callsplit`).
"""
import collections

from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from routeproxy import pptp
from routeproxy.callsplit import CallSplitter, UpstreamCounters
from routeproxy.config import Profile
from routeproxy.control import PPTPControlProtocol
from routeproxy.fdbudget import FileBudget
from routeproxy.limits import DEFAULT as DEFAULT_LIMITS, reconfigureLimits
from routeproxy.mux.frames import LinkError, Reason
from routeproxy.mux.session import SessionRefused
from routeproxy.relay import Relay, RelaySession, Side
from routeproxy.stats import printable
from routeproxy.scopes import PerServerScopes


def answerExhausted(message):
    """No ``R`` is left for a client's Outgoing-Call-Request: refuse the call as a server
    with no room would (result general error, error no resource); anything else ends the
    session."""
    if isinstance(message, pptp.OutgoingCallRequest):
        return pptp.OutgoingCallReply(
            call_id=0, peer_call_id=message.call_id,
            result_code=pptp.OutgoingCallResult.GENERAL_ERROR,
            error_code=pptp.ErrorCode.NO_RESOURCE)
    return None


#: The RRP rewrites the clients' IDs (``C`` <-> ``R``), one space per server address.
RRP = Side(name="RRP", peerRole="server", owner=pptp.PNS, localName="R",
           answerExhausted=answerExhausted)


class RemoteRouteProxy:
    """The RRP's state: the profiles it may dial, and its relay (sessions, a call-ID space
    per server)."""

    log = Logger()

    def __init__(self, reactor, openGREPort, profiles, source=None, connectTimeout=10,
                 limits=DEFAULT_LIMITS, permits=None):
        self.reactor = reactor
        self.profiles = {name: p if isinstance(p, Profile) else Profile(*p)
                         for name, p in dict(profiles).items()}
        self.source = source
        self.connectTimeout = connectTimeout
        self.limits = limits
        # LRP name -> the profiles it may use; an LRP not named may use every profile
        self.permits = {name: frozenset(names) for name, names in (permits or {}).items()}
        self.scopes = PerServerScopes("RRP")
        self.relay = Relay(RRP, self.scopes, openGREPort, limits=limits, clock=reactor)
        self.links = set()        # live MuxConnections (MuxServerFactory.connections)
        self.upstreamCounters = UpstreamCounters()
        self.resumeTable = None   # mux.resume.ResumeTable when --resume-grace is on
        self.tls = None           # the listener's tls.ServerTLS (the tap sets it; reload swaps it)
        self.refusals = self.relay.refusals     # sessions and calls refused, by reason
        self.linkDrops = {}       # links dropped by reason (MuxServerFactory.linkDrops)
        self.startups = None      # the listener's StartupGate (pre-TLS connections)
        self.files = FileBudget()   # the listener pauses while descriptors run low

    def sessionRequested(self, mux, profile, clientInfo):
        """A mux OPEN: dial the profile's server; accept once connected, refuse otherwise."""
        lrp = mux.connection.peerLabel
        clientInfo = printable(clientInfo, 64)
        target = self.profiles.get(profile)
        if target is None:
            self.refusals.count("unknown_profile")
            self.relay.peerLog.warn("profile", "RRP: LRP {lrp} asked for unknown profile "
                                    "{profile!r} (client {client}); refused", lrp=lrp,
                                    profile=profile, client=clientInfo)
            raise SessionRefused(Reason.UNKNOWN_PROFILE, f"no profile {profile!r}")
        if not self.permitted(mux.connection.peerName, profile):
            self.relay.refusals.add("not_permitted", f"LRP {lrp} may not use profile "
                                    f"{profile!r} (client {clientInfo})")
            raise SessionRefused(Reason.NOT_PERMITTED, f"profile {profile!r} not permitted")
        host, port = target.host, target.port
        # Counted among the relay's sessions once the server answers.
        session = RelaySession(RRP, self.relay, clientLabel=f"{clientInfo} via {lrp}",
                               holder=f"link {lrp}")   # one LRP's share of the ID space
        bind = (self.source, 0) if self.source else None
        endpoint = TCP4ClientEndpoint(self.reactor, host, port, timeout=self.connectTimeout,
                                      bindAddress=bind)
        d = endpoint.connect(_SessionFactory(session))

        def connected(protocol):
            self.relay.sessions.add(session)
            session.muxOpened(mux)
            if target.callsPerConnection:
                session.upstreams = CallSplitter(
                    session, target.callsPerConnection,
                    lambda upstream: self.dialAgain(session, port, upstream),
                    self.reactor, self.upstreamCounters)
            self.log.info("RRP session opened: client {client}, profile {profile} -> "
                          "server {server}, mux session {sid}", client=session.clientLabel,
                          profile=profile, server=session.peerLabel, sid=mux.id)
            return session

        def failed(failure):
            self.refusals.count("upstream_unreachable")
            why = failure.getErrorMessage()
            self.relay.peerLog.warn("dial", "RRP: cannot reach server {host}:{port} of profile "
                                    "{profile} for client {client}: {why}; refused", host=host,
                                    port=port, profile=profile, client=session.clientLabel,
                                    why=why)
            raise SessionRefused(Reason.UPSTREAM_UNREACHABLE, f"{host}:{port}: {why}")

        return d.addCallbacks(connected, failed)

    def dialAgain(self, session, port, receiver):
        """Another control connection to *session*'s server, from the same local address to
        the same server address (so its calls' GRE stays in the session's scope)."""
        endpoint = TCP4ClientEndpoint(self.reactor, session.peerAddress, port,
                                      timeout=self.connectTimeout,
                                      bindAddress=(session.localAddress, 0))
        return endpoint.connect(_SessionFactory(receiver))

    def reconfigure(self, old, new):
        """A reload: profiles for new sessions (sessions of a removed profile end with a PPTP
        teardown), and the TLS settings and --lrp-name for new links (links of an LRP whose
        name was removed get GOAWAY)."""
        changes = []
        profiles = {name: p if isinstance(p, Profile) else Profile(*p)
                    for name, p in dict(new["profiles"]).items()}
        if profiles != self.profiles:
            removed = set(self.profiles) - set(profiles)
            ended = self.relay.shutDown("its profile was removed",
                                        lambda s: getattr(s.mux, "profile", None) in removed)
            changed = sorted(n for n in profiles if n in self.profiles and profiles[n] != self.profiles[n])
            added = sorted(set(profiles) - set(self.profiles))
            self.profiles = profiles
            changes.append(f"profiles: added {added or 'none'}, changed {changed or 'none'} (new "
                           f"sessions), removed {sorted(removed) or 'none'} ({len(ended)} session(s) ended)")
        if self.tls is not None and (new["tls-files"], new["lrp-name"]) != (old["tls-files"], old["lrp-name"]):
            self.tls.replaceWith(new["tls"])
            changes.append("TLS certificate, key, CA or --lrp-name reread (new links)")
            names = self.tls.allowedNames
            for connection in list(self.links):
                if names is not None and connection.peerName not in names:
                    connection.goAway(LinkError.NO_ERROR, "LRP name no longer in --lrp-name")
                    changes.append(f"link of LRP {connection.peerLabel} closed (not in --lrp-name)")
        permits = {name: frozenset(names) for name, names in (new.get("permits") or {}).items()}
        if permits != self.permits:
            self.permits = permits
            changes.append("--permit (new sessions)")
        changes += reconfigureLimits(self, old, new)
        return changes

    def permitted(self, lrpName, profile):
        """May the LRP of certificate name *lrpName* use *profile* (``--permit``)?"""
        allowed = self.permits.get(lrpName)
        return allowed is None or profile in allowed

    def snapshot(self):
        """The RRP as plain data (docs/status.md); links include idle LRPs."""
        snapshot = dict(self.relay.snapshot(self.links),
                        tls_handshake_failures=getattr(self.tls, "handshakeFailures", 0),
                        profiles={name: str(p) for name, p in sorted(self.profiles.items())},
                        calls_per_connection={name: p.callsPerConnection
                                              for name, p in sorted(self.profiles.items())},
                        upstream_connections=self.upstreamCounters.snapshot(),
                        links_dropped=dict(self.linkDrops), files=self.files.snapshot(),
                        startups=self.startups.snapshot() if self.startups is not None else None)
        if self.resumeTable is not None:
            snapshot["resume"] = self.resumeTable.snapshot()
        return snapshot


class _SessionFactory(Factory):
    """Builds a control connection to the server for one session (or one of its upstreams)."""

    noisy = False  # one log line per session is ours to write

    def __init__(self, session):
        self.session = session

    def buildProtocol(self, addr):
        return PPTPControlProtocol(self.session)
