"""`twistd routeproxy-lrp`: options and the service tree of a Local Route Proxy."""
from twisted.python import usage

from routeproxy.config import ConfigOptions, parse_cidr, parse_hostport


def _ident(value):
    return value.strip()


class Options(ConfigOptions):
    section = "lrp"
    synopsis = "[options]"
    longdesc = (
        "Serve PPTP clients on --pptp-listen and carry their sessions to the RRP "
        "at --rrp over mutually authenticated TLS."
    )
    settings = (
        ("pptp-listen", ("0.0.0.0", 1723), "HOST:PORT where PPTP clients connect [default: 0.0.0.0:1723]",
         lambda v: parse_hostport(v, 1723, "--pptp-listen"), False),
        ("rrp", None, "HOST:PORT of the RRP's TLS listener (required)",
         lambda v: parse_hostport(v, None, "--rrp"), False),
        ("rrp-name", None, "name the RRP's certificate must carry (required)", _ident, False),
        ("cert", None, "this LRP's certificate (PEM) (required)", _ident, False),
        ("key", None, "this LRP's private key (PEM) (required)", _ident, False),
        ("ca", None, "CA certificate that signed the RRP's certificate (required)", _ident, False),
        ("allow", None, "CIDR of clients allowed to connect; repeatable [default: any]", parse_cidr, True),
        ("profile", "default", "upstream profile the RRP maps to a PPTP server [default: default]",
         _ident, False),
    )

    def check(self):
        missing = [n for n in ("rrp", "rrp-name", "cert", "key", "ca") if self[n] is None]
        if missing:
            raise usage.UsageError("missing required option(s): " + ", ".join("--" + m for m in missing))


def makeService(options):
    from routeproxy.lrp import makeLRPService

    return makeLRPService(options)
