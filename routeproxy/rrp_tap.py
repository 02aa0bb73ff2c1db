"""`twistd routeproxy-rrp`: options and the service tree of a Remote Route Proxy."""
from twisted.python import usage

from routeproxy import limits, logs, tls
from routeproxy.config import (
    LINK_SETTINGS, ConfigOptions, Profile, Setting, checkCapture, fileDigest, daemonSettings,
    parseCount, parseHostPort, parseIPv4, parseListen, parseProfile, splitProfiles,
)


def parsePermits(entries, profiles):
    """``NAME=P1,P2`` entries -> {NAME: {P1, P2}}.  An INI value split at its commas comes
    as ``NAME=P1``, ``P2``: a bare profile belongs to the name before it."""
    permits, name = {}, None
    for entry in entries:
        for part in entry.split(","):
            part = part.strip()
            if not part:
                continue
            if "=" in part:
                name, _, part = part.partition("=")
                name = name.strip()
                permits.setdefault(name, set())
                part = part.strip()
                if not part:
                    continue
            if name is None or not name:
                raise usage.UsageError(f"--permit {entry!r}: expected NAME=PROFILE[,PROFILE...]")
            if part not in profiles:
                raise usage.UsageError(f"--permit {entry!r}: no profile {part!r}")
            permits[name].add(part)
    return permits


class Options(ConfigOptions):
    section = "rrp"
    synopsis = "[options]"
    longdesc = (
        "Accept LRPs on --listen over mutually authenticated TLS and, for each "
        "session, dial the PPTP server its profile names (and no other)."
    )
    required = ("cert", "key", "ca")
    settings = (
        Setting("listen", ("0.0.0.0", 4443),
                "HOST:PORT of the TLS listener for LRPs [default: 0.0.0.0:4443]",
                lambda v: parseListen(v, None, "--listen")),
        Setting("pptp-server", None, "HOST[:PORT] of the PPTP server of profile 'default'",
                lambda v: parseHostPort(v, 1723, "--pptp-server")),
        Setting("cert", None, "this RRP's certificate (PEM) (required)"),
        Setting("key", None, "this RRP's private key (PEM) (required)"),
        Setting("ca", None, "CA certificate that signed the LRPs' certificates (required)"),
        Setting("profile", None, "NAME=HOST[:PORT][,calls-per-connection=N]: another upstream "
                "PPTP server, and how many calls one control connection to it may carry (more "
                "are spread over further connections; 0: no limit) [default: 1, as pptpd]; "
                "repeatable", parseProfile, repeatable=True, split=splitProfiles),
        Setting("lrp-name", None, "accept only LRPs whose certificate carries this name; "
                "repeatable [default: any LRP the CA signed]", repeatable=True),
        Setting("max-sessions", 20000, "sessions one LRP's link may carry at once "
                "[default: 20000]", lambda v: parseCount(v, "--max-sessions")),
        Setting("source", None, "local address to dial PPTP servers from (and send their GRE "
                "from); use one pptpd does not listen on when both share a host [default: the "
                "kernel's choice]", lambda v: parseIPv4(v, "--source")),
        *daemonSettings("servers", "LRP"),
        Setting("permit", None, "NAME=PROFILE[,PROFILE...]: the LRP whose certificate carries "
                "NAME may use only these profiles; repeatable [default: every LRP every profile]",
                str.strip, repeatable=True),
        *limits.settings("rrp"),
    ) + LINK_SETTINGS
    restartOnly = ("listen", "source", "gre-interface", "gre-max-sojourn", "status", "max-sessions",
                   "log-format", "resume-grace", "dead-timeout", "mux-send-buffer", "mux-stall-timeout",
                   "shard", "gre-watermark", "link-max-sojourn", "link-queue-delay", "gre-capture-buffer", "gre-capture", "data-plane",
                   "gre-no-call-share")

    def check(self):
        checkCapture(self)
        profiles = dict(self["profile"] or ())
        if self["pptp-server"] is not None:
            profiles.setdefault("default", Profile(*self["pptp-server"]))
        if not profiles:
            raise usage.UsageError("no PPTP server: give --pptp-server or --profile NAME=HOST[:PORT]")
        self["profiles"] = profiles
        self["permits"] = parsePermits(self["permit"] or (), profiles)
        self["limits"] = limits.fromOptions(self)
        try:
            self["tls"] = tls.serverCreator(self["cert"], self["key"], self["ca"],
                                            allowed_names=self["lrp-name"], crlPath=self["crl"])
        except tls.TLSConfigError as e:
            raise usage.UsageError(str(e))
        self["tls-files"] = fileDigest(self["cert"], self["key"], self["ca"])
        logs.useFormat(self)


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from routeproxy.daemon import DaemonService, installExceptHook
    from routeproxy.fdbudget import PausingTCPServer
    from routeproxy.lrp import muxConfig
    from routeproxy.mux.protocol import MuxServerFactory
    from routeproxy.mux.resume import ResumeTable
    from routeproxy.rrp import RemoteRouteProxy
    from routeproxy.service import (addStatusEndpoint, greOpener, localIPv4Addresses,
                                    raiseFileLimit, useNativePlane)
    from routeproxy.startups import StartupGate, StartupGateFactory

    installExceptHook()
    raiseFileLimit()
    top = DaemonService("RRP", None, options, reactor, restartOnly=Options.restartOnly)
    local = [options["source"]] if options["source"] else localIPv4Addresses()
    bounds = options["limits"]
    shard = top.shard = options["shard"]
    rrp = RemoteRouteProxy(reactor, greOpener(top, reactor, local, options["gre-interface"],
                                           options["gre-max-sojourn"], shard,
                                           captureBuffer=bounds.greCaptureBuffer,
                                           capture=options["gre-capture"],
                                           noCallShare=bounds.greNoCallShare),
                           options["profiles"], source=options["source"], limits=bounds,
                           permits=options["permits"])
    rrp.scopes.first, rrp.scopes.last = shard.first, shard.last
    rrp.tls = options["tls"]
    top.proxy = rrp
    top.reloaders.append(rrp.reconfigure)
    host, port = options["listen"]
    grace = options["resume-grace"]
    rrp.resumeTable = ResumeTable(reactor, grace) if grace else None
    factory = MuxServerFactory(rrp.sessionRequested, clock=reactor, peerNameOf=tls.peerName,
                               config=muxConfig(grace, options["dead-timeout"],
                                                maxSessions=options["max-sessions"],
                                                maxSendBuffer=bounds.muxSendBuffer,
                                                stallTimeout=bounds.muxStallTimeout,
                                                greWatermark=bounds.greWatermark,
                                                linkMaxSojourn=bounds.linkMaxSojourn,
                                                linkQueueDelay=bounds.linkQueueDelay),
                               resume=rrp.resumeTable)
    rrp.links, rrp.linkDrops = factory.connections, factory.linkDrops
    useNativePlane(options, rrp.relay, factory)
    rrp.startups = StartupGate(bounds, reactor, rrp.relay.refusals)
    # TLS under a gate that bounds connections not through TLS yet (MaxStartups)
    gated = StartupGateFactory(TLSMemoryBIOFactory(options["tls"], False, factory), rrp.startups)
    listener = PausingTCPServer(port, gated, interface=host, reactor=reactor, budget=rrp.files,
                                reusePort=shard.sharded)
    listener.optionName = "--listen"
    listener.setServiceParent(top)
    addStatusEndpoint(top, reactor, options["status"], top)
    top.rrp = rrp
    return top
