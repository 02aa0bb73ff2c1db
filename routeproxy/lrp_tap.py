"""`twistd routeproxy-lrp`: options and the service tree of a Local Route Proxy."""
from twisted.application import internet
from twisted.application.service import MultiService
from twisted.python import usage

from routeproxy import tls
from routeproxy.config import LINK_SETTINGS, ConfigOptions, Setting, parseCIDR, parseHostPort


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
                lambda v: parseHostPort(v, 1723, "--pptp-listen")),
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
        Setting("gre-interface", "any", "interface GRE from clients is captured on [default: any]"),
        Setting("status", None, "HOST:PORT for the status/metrics HTTP endpoint, loopback "
                "recommended [default: off]", lambda v: parseHostPort(v, None, "--status")),
    ) + LINK_SETTINGS

    def check(self):
        try:
            self["tls"] = tls.clientCreator(self["rrp-name"], self["cert"], self["key"], self["ca"])
        except tls.TLSConfigError as e:
            raise usage.UsageError(str(e))


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    from routeproxy.lrp import LinkFactory, LinkShutdown, LocalRouteProxy, PPTPServerFactory
    from routeproxy.service import addStatusEndpoint, greOpener, localIPv4Addresses

    top = MultiService()
    host, port = options["pptp-listen"]
    local = localIPv4Addresses() if host == "0.0.0.0" else [host]
    lrp = LocalRouteProxy(reactor, greOpener(top, reactor, local, options["gre-interface"]),
                          profile=options["profile"], allow=options["allow"])
    (rrpHost, rrpPort), *moreRRPs = options["rrp"]
    # No prepareConnection: a refused handshake would fail it before the disconnect, which
    # ClientService cannot take (NoTransition); LinkFactory tells the LRP when a link is ready.
    factory = LinkFactory(lrp, reactor, options["resume-grace"], options["dead-timeout"])
    link = tls.rrpClientService(reactor, rrpHost, rrpPort, options["tls"], factory, more=moreRRPs,
                                retryDelay=lrp.resumer.retryDelay if lrp.resumer else None)
    link.setServiceParent(top)
    LinkShutdown(lrp).setServiceParent(top)   # stops before the ClientService
    internet.TCPServer(port, PPTPServerFactory(lrp), interface=host, reactor=reactor).setServiceParent(top)
    addStatusEndpoint(top, reactor, options["status"], lrp)
    top.lrp = lrp
    return top
