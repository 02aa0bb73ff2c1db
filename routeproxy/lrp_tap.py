"""`twistd routeproxy-lrp`: options and the service tree of a Local Route Proxy."""
from twisted.python import usage

from routeproxy import limits, logs, tls
from routeproxy.config import (
    LINK_SETTINGS, ConfigOptions, Setting, checkCapture, fileDigest, daemonSettings, parseCIDR,
    parseHostPort, parseListen,
)


class Options(ConfigOptions):
    section = "lrp"
    synopsis = "[options]"
    longdesc = (
        "Serve PPTP clients on --pptp-listen and carry their sessions to the RRP "
        "at --rrp over mutually authenticated TLS."
    )
    required = ("rrp", "rrp-name", "cert", "key", "ca")
    settings = (
        Setting("pptp-listen", ("0.0.0.0", 1723),
                "HOST:PORT where PPTP clients connect [default: 0.0.0.0:1723]",
                lambda v: parseListen(v, 1723, "--pptp-listen")),
        Setting("rrp", None, "HOST:PORT of the RRP's TLS listener (required); repeat it to "
                "fail over to the next RRP when one does not answer (tried in order)",
                lambda v: parseHostPort(v, None, "--rrp"), repeatable=True),
        Setting("rrp-name", None, "name the RRP's certificate must carry (required)"),
        Setting("cert", None, "this LRP's certificate (PEM) (required)"),
        Setting("key", None, "this LRP's private key (PEM) (required)"),
        Setting("ca", None, "CA certificate that signed the RRP's certificate (required)"),
        Setting("allow", None, "CIDR of clients allowed to connect; repeatable [default: any]",
                parseCIDR, repeatable=True),
        Setting("profile", "default",
                "upstream profile the RRP maps to a PPTP server [default: default]"),
        *daemonSettings("clients", "RRP"),
        *limits.settings("lrp"),
    ) + LINK_SETTINGS
    restartOnly = ("pptp-listen", "rrp", "gre-interface", "gre-max-sojourn", "status", "log-format",
                   "resume-grace", "dead-timeout", "mux-send-buffer", "mux-stall-timeout", "shard",
                   "gre-watermark", "link-max-sojourn", "link-queue-delay", "gre-capture-buffer", "gre-capture", "data-plane",
                   "gre-no-call-share")

    def check(self):
        checkCapture(self)
        self["limits"] = limits.fromOptions(self)
        try:
            self["tls"] = tls.clientCreator(self["rrp-name"], self["cert"], self["key"], self["ca"],
                                            crlPath=self["crl"])
        except tls.TLSConfigError as e:
            raise usage.UsageError(str(e))
        self["tls-files"] = fileDigest(self["cert"], self["key"], self["ca"])
        logs.useFormat(self)


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    from routeproxy.daemon import DaemonService, installExceptHook
    from routeproxy.callids import CallIDSpace
    from routeproxy.fdbudget import PausingTCPServer
    from routeproxy.lrp import LinkFactory, LocalRouteProxy, PPTPServerFactory
    from routeproxy.service import (addStatusEndpoint, greOpener, localIPv4Addresses,
                                    raiseFileLimit, useNativePlane)

    installExceptHook()
    raiseFileLimit()
    top = DaemonService("LRP", None, options, reactor, restartOnly=Options.restartOnly)
    bounds = options["limits"]
    host, port = options["pptp-listen"]
    local = localIPv4Addresses() if host == "0.0.0.0" else [host]
    shard = top.shard = options["shard"]
    lrp = LocalRouteProxy(reactor, greOpener(top, reactor, local, options["gre-interface"],
                                           options["gre-max-sojourn"], shard,
                                           captureBuffer=bounds.greCaptureBuffer,
                                           capture=options["gre-capture"],
                                           noCallShare=bounds.greNoCallShare),
                          profile=options["profile"], allow=options["allow"], limits=bounds,
                          space=CallIDSpace("LRP", shard.first, shard.last))
    lrp.tls = options["tls"]
    top.proxy = lrp
    top.reloaders.append(lrp.reconfigure)
    (rrpHost, rrpPort), *moreRRPs = options["rrp"]
    # No prepareConnection: a refused handshake would fail it before the disconnect, which
    # ClientService cannot take (NoTransition); LinkFactory tells the LRP when a link is ready.
    factory = LinkFactory(lrp, reactor, options["resume-grace"], options["dead-timeout"],
                          maxSendBuffer=bounds.muxSendBuffer, stallTimeout=bounds.muxStallTimeout,
                          greWatermark=bounds.greWatermark,
                          linkMaxSojourn=bounds.linkMaxSojourn,
                          linkQueueDelay=bounds.linkQueueDelay)
    useNativePlane(options, lrp.relay, factory)
    link = tls.rrpClientService(reactor, rrpHost, rrpPort, options["tls"], factory, more=moreRRPs,
                                retryDelay=lrp.resumer.retryDelay if lrp.resumer else None,
                                onFailure=lrp.linkFailed)
    link.setServiceParent(top)
    listener = PausingTCPServer(port, PPTPServerFactory(lrp), interface=host, reactor=reactor,
                                budget=lrp.files, reusePort=shard.sharded)
    listener.optionName = "--pptp-listen"
    listener.setServiceParent(top)
    addStatusEndpoint(top, reactor, options["status"], top)
    top.lrp = lrp
    return top
