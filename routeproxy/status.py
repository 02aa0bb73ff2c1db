"""What a running daemon is doing, for operators and the lab: the snapshot and its HTTP endpoint.

* :func:`snapshot_lrp` / :func:`snapshot_rrp` turn a daemon's state into plain data (dicts,
  lists, numbers, strings) that JSON can carry: the link(s), every session with its call IDs
  on each side and its counters, drops by reason, the GRE port's counters, call-ID usage.
* :class:`StatusResource` serves it with twisted.web: ``/status.json`` (the snapshot) and
  ``/metrics`` (routeproxy.metrics renders it for Prometheus).

The table and ``python -m routeproxy status`` are in routeproxy.statuscli.  The endpoint shows
client addresses: bind it to loopback.
"""
import json
import time

from twisted.web import resource, server

from routeproxy.metrics import METRICS_CONTENT_TYPE, format_metrics, number

__all__ = ["snapshot", "snapshot_lrp", "snapshot_rrp", "StatusResource", "StatusSite"]


# --- snapshots ------------------------------------------------------------------------------


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 3)


def _counter(mapping):
    try:
        return {str(k): number(v) for k, v in sorted(dict(mapping or {}).items(), key=lambda kv: str(kv[0]))}
    except (TypeError, ValueError):
        return {}


def _link(connection):
    """One mux connection (the link to the RRP, or one LRP's link to the RRP)."""
    stats = getattr(connection, "stats", None)
    get = lambda name, default=0: getattr(stats, name, default)  # noqa: E731
    return {
        "peer": str(getattr(connection, "peerLabel", "?")),
        "up": bool(getattr(connection, "ready", False)),
        "close_reason": getattr(connection, "closeReason", None),
        "rtt_last_ms": _ms(get("rttLast", None)),
        "rtt_smoothed_ms": _ms(get("rttSmoothed", None)),
        "frames_in": get("framesIn"), "frames_out": get("framesOut"),
        "bytes_in": get("bytesIn"), "bytes_out": get("bytesOut"),
        "sessions": len(getattr(connection, "sessions", None) or ()),
        "gre_dropped": _counter(get("greDropped", None)),
        "gre_ignored": _counter(get("greIgnored", None)),
    }


def _rtt_ms(connection):
    stats = getattr(connection, "stats", None)
    rtt = getattr(stats, "rttSmoothed", None)
    if rtt is None:
        rtt = getattr(stats, "rttLast", None)
    return _ms(rtt)


def _calls(session, local_name):
    book = getattr(session, "book", None)
    calls = getattr(book, "calls", None) or ()
    return [{"C": call.pns_id, "S": call.pac_id, local_name: call.local_id,
             "established": bool(getattr(call, "established", False))} for call in calls]


def _session(session, mux, local_name):
    """One relayed control connection.  *mux* is its mux session or None."""
    if getattr(session, "closed", False):
        state = "closed"
    elif mux is not None:
        state = str(getattr(mux, "state", "?")).lower()
    elif getattr(session, "refusal", None) is not None:
        state = "refused"
    else:
        state = "opening"
    connection = getattr(mux, "connection", None)
    return {
        "peer": getattr(session, "peer_label", "?"),
        "profile": getattr(mux, "profile", None),
        "mux_session": getattr(mux, "id", None),
        "link": None if connection is None else str(getattr(connection, "peerLabel", "?")),
        "rtt_ms": None if connection is None else _rtt_ms(connection),
        "state": state,
        "calls": _calls(session, local_name),
        "control_bytes_in": number(getattr(session, "control_in", 0)),
        "control_bytes_out": number(getattr(session, "control_out", 0)),
        "gre_packets_in": number(getattr(session, "gre_in", 0)),
        "gre_packets_out": number(getattr(session, "gre_out", 0)),
        "gre_dropped": number(getattr(session, "gre_dropped", 0)),
        "close_reason": getattr(session, "close_reason", None),
    }


def _space(scope, space):
    return {"scope": scope, "in_use": len(space), "capacity": getattr(space, "capacity", None)}


def _gre_port(port):
    statistics = getattr(port, "statistics", None)
    if statistics is None:
        return None
    try:
        stats = dict(statistics())
    except Exception:  # a port that cannot say is reported as such, not as a failed page
        return None
    stats["dropped"] = _counter(stats.get("dropped"))
    return stats


def _totals(daemon, sessions):
    """Cumulative counters: the daemon's ended sessions' plus the live ones'."""
    ended = getattr(daemon, "ended_totals", None) or {}
    result = {
        "sessions_ended": getattr(daemon, "sessions_ended", None),
        "control_bytes_in": ended.get("control_in", 0),
        "control_bytes_out": ended.get("control_out", 0),
        "gre_packets_in": ended.get("gre_in", 0),
        "gre_packets_out": ended.get("gre_out", 0),
        "gre_dropped": ended.get("gre_dropped", 0),
    }
    for s in sessions:
        for key in ("control_bytes_in", "control_bytes_out", "gre_packets_in",
                    "gre_packets_out", "gre_dropped"):
            result[key] += s[key]
    return result


def _sort_key(entry):
    sid = entry.get("mux_session")
    return (sid is None, sid if sid is not None else 0, str(entry.get("peer")))


def _finish(role, daemon, links, sessions, spaces, extra):
    sessions.sort(key=_sort_key)
    drops = getattr(daemon, "drops", None)
    result = {
        "role": role,
        "time": time.time(),
        "links": sorted((_link(c) for c in links), key=lambda l: (not l["up"], l["peer"])),
        "sessions": sessions,
        "calls": sum(len(s["calls"]) for s in sessions),
        "totals": _totals(daemon, sessions),
        "drops": _counter(getattr(drops, "counts", None)),
        "gre_port": _gre_port(getattr(daemon, "gre_port", None)),
        "call_ids": spaces,
    }
    result.update(extra)
    return result


def snapshot_lrp(lrp):
    """A :class:`~routeproxy.lrp.LocalRouteProxy` as plain data (docs/status.md)."""
    links = list(getattr(lrp, "links", None) or ())
    # A client whose mux session is still OPENING is its receiver, not yet its .mux.
    pending = {}
    for connection in links:
        for mux in list((getattr(connection, "sessions", None) or {}).values()):
            receiver = getattr(mux, "receiver", None)
            if receiver is not None:
                pending[id(receiver)] = mux
    sessions = []
    for session in list(getattr(lrp, "sessions", ()) or ()):
        mux = getattr(session, "mux", None) or pending.get(id(session))
        entry = _session(session, mux, "L")
        entry["client"] = entry["peer"]
        if entry["profile"] is None:
            entry["profile"] = getattr(lrp, "profile", None)
        sessions.append(entry)
    space = getattr(lrp, "space", None)
    spaces = [_space(getattr(space, "name", "") or "LRP", space)] if space is not None else []
    return _finish("lrp", lrp, links, sessions, spaces, {"profile": getattr(lrp, "profile", None)})


def snapshot_rrp(rrp, links=None):
    """A :class:`~routeproxy.rrp.RemoteRouteProxy` as plain data (docs/status.md).

    *links* is the live mux connections (the ``MuxServerFactory.connections`` set); without
    it the links are those the sessions use, so an idle LRP is missing.
    """
    if links is None:
        links = getattr(rrp, "links", None)
    sessions, seen = [], {}
    for session in list(getattr(rrp, "sessions", ()) or ()):
        mux = getattr(session, "mux", None)
        entry = _session(session, mux, "R")
        entry["server"] = entry["peer"]
        entry["client"] = (getattr(mux, "clientInfo", None) if mux is not None else None) or \
            getattr(session, "client_label", "?")
        if entry["profile"] is None:
            entry["profile"] = getattr(session, "profile", None)
        connection = getattr(mux, "connection", None)
        if connection is not None:
            seen[id(connection)] = connection
        sessions.append(entry)
    links = list(links) if links is not None else list(seen.values())
    spaces = [_space(str(ip), space) for ip, space in sorted((getattr(rrp, "spaces", None) or {}).items())]
    profiles = {name: f"{host}:{port}" for name, (host, port) in
                sorted((getattr(rrp, "profiles", None) or {}).items())}
    return _finish("rrp", rrp, links, sessions, spaces, {"profiles": profiles})


def snapshot(daemon, links=None):
    """:func:`snapshot_lrp` or :func:`snapshot_rrp`, whichever *daemon* is."""
    from routeproxy.lrp import LocalRouteProxy

    if isinstance(daemon, LocalRouteProxy):
        return snapshot_lrp(daemon)
    return snapshot_rrp(daemon, links)


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
        return format_metrics(self.root.snapshot()).encode()


class _IndexPage(_Page):
    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"routeproxy status: /status.json (snapshot), /metrics (Prometheus)\n"


class StatusResource(resource.Resource):
    """The status tree of one daemon: ``/status.json``, ``/metrics``, ``/`` (an index).

    *daemon* is a LocalRouteProxy or a RemoteRouteProxy; for the RRP pass *links* (the mux
    server factory's ``connections``) so idle LRP links show too.
    """

    def __init__(self, daemon, links=None):
        super().__init__()
        self.daemon = daemon
        self.links = links
        self.putChild(b"status.json", _JSONPage(self))
        self.putChild(b"metrics", _MetricsPage(self))
        self.putChild(b"", _IndexPage(self))

    def snapshot(self):
        return snapshot(self.daemon, self.links)

    def render_GET(self, request):
        return self.children[b""].render_GET(request)


class StatusSite(server.Site):
    """A Site that writes no access-log line per request (a scraper would flood the log)."""

    noisy = False

    def log(self, request):
        pass

