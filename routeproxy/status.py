"""What a running daemon is doing, for operators and the lab: the snapshot and its HTTP endpoint.

* :func:`snapshot` is the daemon's state as plain data (dicts, lists, numbers, strings) that
  JSON can carry: the link(s), every session with its call IDs on each side and its
  counters, drops by reason, the GRE port's counters, call-ID usage.  Each object builds
  its own part (``snapshot()`` on the daemon, relay, session, link, port, ID space).
* :class:`StatusResource` serves it with twisted.web: ``/status.json`` (the snapshot) and
  ``/metrics`` (routeproxy.metrics renders it for Prometheus).

The table and ``python -m routeproxy status`` are in routeproxy.statuscli.  The endpoint shows
client addresses: bind it to loopback.
"""
import json
import time

from twisted.web import resource, server

from routeproxy.metrics import METRICS_CONTENT_TYPE, format_metrics

__all__ = ["snapshot", "StatusResource", "StatusSite"]


# --- snapshots ------------------------------------------------------------------------------


def snapshot(daemon):
    """*daemon*'s own ``snapshot()`` (a LocalRouteProxy or RemoteRouteProxy), stamped with
    the time: each object reports itself, this module only serves the result."""
    return dict(daemon.snapshot(), time=time.time())


# --- twisted.web ----------------------------------------------------------------------------


class _Page(resource.Resource):
    isLeaf = True

    def __init__(self, root):
        super().__init__()
        self.root = root

    def render_HEAD(self, request):
        return self.render_GET(request)


class _JSONPage(_Page):
    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.root.snapshot(), indent=1, sort_keys=True).encode() + b"\n"


class _MetricsPage(_Page):
    def render_GET(self, request):
        request.setHeader(b"content-type", METRICS_CONTENT_TYPE)
        return format_metrics(self.root.snapshot(), process=True).encode()


class _IndexPage(_Page):
    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"routeproxy status: /status.json (snapshot), /metrics (Prometheus)\n"


class StatusResource(resource.Resource):
    """The status tree of one daemon: ``/status.json``, ``/metrics``, ``/`` (an index).

    *daemon* is a LocalRouteProxy or a RemoteRouteProxy.
    """

    def __init__(self, daemon):
        super().__init__()
        self.daemon = daemon
        self.putChild(b"status.json", _JSONPage(self))
        self.putChild(b"metrics", _MetricsPage(self))
        self.putChild(b"", _IndexPage(self))

    def snapshot(self):
        return snapshot(self.daemon)

    def render_GET(self, request):
        return self.children[b""].render_GET(request)


class StatusSite(server.Site):
    """A Site that writes no access-log line per request (a scraper would flood the log)."""

    noisy = False

    def log(self, request):
        pass

