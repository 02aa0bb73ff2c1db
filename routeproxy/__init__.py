"""routeproxy: carries PPTP sessions across networks that break PPTP.

An LRP (Local Route Proxy) is the PPTP server its clients dial; an RRP (Remote
Route Proxy) dials the real pptpd.  Between them one mutually authenticated TLS
connection multiplexes every session's control bytes and GRE packets, and each
side rewrites the PPTP call IDs it owns.  See docs/architecture.md.
"""

__version__ = "0.1.0"
