"""`twistd routeproxy-rrp`: options and the service tree of a Remote Route Proxy."""
from twisted.python import usage

from routeproxy.config import ConfigOptions, parse_hostport, parse_profile


def _ident(value):
    return value.strip()


class Options(ConfigOptions):
    section = "rrp"
    synopsis = "[options]"
    longdesc = (
        "Accept LRPs on --listen over mutually authenticated TLS and, for each "
        "session, dial the PPTP server its profile names (and no other)."
    )
    settings = (
        ("listen", ("0.0.0.0", 4443), "HOST:PORT of the TLS listener for LRPs [default: 0.0.0.0:4443]",
         lambda v: parse_hostport(v, None, "--listen"), False),
        ("pptp-server", None, "HOST[:PORT] of the PPTP server of profile 'default'",
         lambda v: parse_hostport(v, 1723, "--pptp-server"), False),
        ("cert", None, "this RRP's certificate (PEM) (required)", _ident, False),
        ("key", None, "this RRP's private key (PEM) (required)", _ident, False),
        ("ca", None, "CA certificate that signed the LRPs' certificates (required)", _ident, False),
        ("profile", None, "NAME=HOST[:PORT]: another upstream PPTP server; repeatable",
         parse_profile, True),
    )

    def check(self):
        missing = [n for n in ("cert", "key", "ca") if self[n] is None]
        if missing:
            raise usage.UsageError("missing required option(s): " + ", ".join("--" + m for m in missing))
        profiles = dict(self["profile"] or ())
        if self["pptp-server"] is not None:
            profiles.setdefault("default", self["pptp-server"])
        if not profiles:
            raise usage.UsageError("no PPTP server: give --pptp-server or --profile NAME=HOST[:PORT]")
        self["profiles"] = profiles


def makeService(options):
    from routeproxy.rrp import makeRRPService

    return makeRRPService(options)
