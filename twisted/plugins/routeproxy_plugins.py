"""twistd plugins: `twistd routeproxy-lrp` and `twistd routeproxy-rrp`.

This folder has no __init__.py on purpose: twisted.plugins is a namespace that
Twisted scans on every sys.path entry.
"""
from twisted.application.service import ServiceMaker

routeproxyLRP = ServiceMaker(
    "routeproxy LRP",
    "routeproxy.lrp_tap",
    "Local Route Proxy: the PPTP server clients dial; relays to an RRP over TLS.",
    "routeproxy-lrp",
)

routeproxyRRP = ServiceMaker(
    "routeproxy RRP",
    "routeproxy.rrp_tap",
    "Remote Route Proxy: accepts LRPs over TLS and dials the configured pptpd.",
    "routeproxy-rrp",
)
