"""`twistd routeproxy-lrp`: options and the service tree of a Local Route Proxy."""
from twisted.application import internet
from twisted.application.service import MultiService
from twisted.python import usage

from routeproxy import tls
from routeproxy.config import ConfigOptions, text, parse_cidr, parse_hostport


class Options(ConfigOptions):
    section = "lrp"
    synopsis = "[options]"
    longdesc = (
        "Serve PPTP clients on --pptp-listen and carry their sessions to the RRP "
        "at --rrp over mutually authenticated TLS."
    )
    required = ("rrp", "rrp-name", "cert", "key", "ca")
    settings = (
        ("pptp-listen", ("0.0.0.0", 1723), "HOST:PORT where PPTP clients connect [default: 0.0.0.0:1723]",
         lambda v: parse_hostport(v, 1723, "--pptp-listen"), False),
        ("rrp", None, "HOST:PORT of the RRP's TLS listener (required)",
         lambda v: parse_hostport(v, None, "--rrp"), False),
        ("rrp-name", None, "name the RRP's certificate must carry (required)", text, False),
        ("cert", None, "this LRP's certificate (PEM) (required)", text, False),
        ("key", None, "this LRP's private key (PEM) (required)", text, False),
        ("ca", None, "CA certificate that signed the RRP's certificate (required)", text, False),
        ("allow", None, "CIDR of clients allowed to connect; repeatable [default: any]", parse_cidr, True),
        ("profile", "default", "upstream profile the RRP maps to a PPTP server [default: default]",
         text, False),
        ("gre-interface", "any", "interface GRE from clients is captured on [default: any]",
         text, False),
        ("status", None, "HOST:PORT for the status/metrics HTTP endpoint, loopback recommended [default: off]",
         lambda v: parse_hostport(v, None, "--status"), False),
    )

    def check(self):
        try:
            self["tls"] = tls.clientCreator(self["rrp-name"], self["cert"], self["key"], self["ca"])
        except tls.TLSConfigError as e:
            raise usage.UsageError(str(e))


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    from routeproxy.greio import GREPort
    from routeproxy.lrp import LinkFactory, LinkShutdown, LocalRouteProxy, PPTPServerFactory
    from routeproxy.service import GREPortService, local_ipv4_addresses

    top = MultiService()
    host, port = options["pptp-listen"]
    lrp = LocalRouteProxy(reactor, profile=options["profile"], allow=options["allow"])
    local = local_ipv4_addresses() if host == "0.0.0.0" else [host]
    lrp.gre_port = GREPort(lrp, local, interface=options["gre-interface"], reactor=reactor)
    GREPortService(lrp.gre_port, reactor).setServiceParent(top)

    rrp_host, rrp_port = options["rrp"]
    # No prepareConnection: a refused handshake would fail it before the disconnect, which
    # ClientService cannot take (NoTransition); LinkFactory tells the LRP when a link is ready.
    link = tls.rrpClientService(reactor, rrp_host, rrp_port, options["tls"], LinkFactory(lrp, reactor))
    link.setServiceParent(top)
    LinkShutdown(lrp).setServiceParent(top)   # stops before the ClientService
    internet.TCPServer(port, PPTPServerFactory(lrp), interface=host, reactor=reactor).setServiceParent(top)
    if options["status"]:
        from routeproxy.status import StatusResource, StatusSite
        status_host, status_port = options["status"]
        internet.TCPServer(status_port, StatusSite(StatusResource(lrp)), interface=status_host,
                           reactor=reactor).setServiceParent(top)
    top.lrp = lrp
    return top
