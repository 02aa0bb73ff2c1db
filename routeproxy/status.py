"""What a running daemon is doing, for operators and the lab: snapshot, HTTP endpoint, table.

* :func:`snapshot_lrp` / :func:`snapshot_rrp` turn a daemon's state into plain data (dicts,
  lists, numbers, strings) that JSON can carry: the link(s), every session with its call IDs
  on each side and its counters, drops by reason, the GRE port's counters, call-ID usage.
* :class:`StatusResource` serves it with twisted.web: ``/status.json`` (the snapshot) and
  ``/metrics`` (Prometheus text exposition format 0.0.4, written by hand: no dependency).
* :func:`format_table` renders a snapshot's sessions as an aligned text table; ``python -m
  routeproxy status URL [--json]`` fetches a daemon's ``/status.json`` and prints it.

The ``*_total`` metrics add the daemon's totals of ended sessions
(``RelayDaemon.ended_totals``) to the live sessions' counters, so they never go down.  The endpoint shows client addresses: bind it to loopback.
"""
import argparse
import json
import math
import re
import sys
import time
import urllib.error
import urllib.request

from twisted.web import resource, server

__all__ = [
    "StatusError", "snapshot", "snapshot_lrp", "snapshot_rrp",
    "format_metrics", "format_table", "StatusResource", "StatusSite", "fetch_snapshot", "main",
]

METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class StatusError(Exception):
    """A status document or endpoint that cannot be used; the text says why."""


# --- snapshots ------------------------------------------------------------------------------


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 3)


def _counter(mapping):
    try:
        return {str(k): _number(v) for k, v in sorted(dict(mapping or {}).items(), key=lambda kv: str(kv[0]))}
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
        "control_bytes_in": _number(getattr(session, "control_in", 0)),
        "control_bytes_out": _number(getattr(session, "control_out", 0)),
        "gre_packets_in": _number(getattr(session, "gre_in", 0)),
        "gre_packets_out": _number(getattr(session, "gre_out", 0)),
        "gre_dropped": _number(getattr(session, "gre_dropped", 0)),
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


# --- Prometheus text exposition -------------------------------------------------------------

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


def escape_label_value(value):
    """A label value as the exposition format quotes it: \\ \" and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _value(value):
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class _Exposition:
    """Families in order, each with HELP, TYPE and its samples."""

    def __init__(self):
        self.lines = []

    def family(self, name, kind, help_text, samples):
        """*samples*: iterable of (labels dict, value); a None value is left out."""
        assert _METRIC_NAME.match(name), name
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if value is None:
                continue
            if labels:
                assert all(_LABEL_NAME.match(k) for k in labels), labels
                text = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels.items())
                self.lines.append(f"{name}{{{text}}} {_value(value)}")
            else:
                self.lines.append(f"{name} {_value(value)}")

    def text(self):
        return "\n".join(self.lines) + "\n"


def _unique_peers(links):
    """Peer labels made unique (a reconnecting LRP may briefly have two connections)."""
    seen = {}
    for link in links:
        peer = link["peer"]
        seen[peer] = seen.get(peer, 0) + 1
        yield (peer if seen[peer] == 1 else f"{peer}#{seen[peer]}"), link


def format_metrics(snap):
    """A snapshot in the Prometheus text format (docs/status.md lists every metric)."""
    out = _Exposition()
    sessions, totals = snap.get("sessions") or [], snap.get("totals") or {}
    links = list(_unique_peers(snap.get("links") or []))
    out.family("routeproxy_info", "gauge", "Always 1; the role label says which daemon this is.",
               [({"role": snap.get("role", "?")}, 1)])
    out.family("routeproxy_sessions", "gauge", "Relayed PPTP control connections now.",
               [({}, len(sessions))])
    out.family("routeproxy_calls", "gauge", "Calls of those control connections now.",
               [({}, sum(len(s.get("calls") or ()) for s in sessions))])
    out.family("routeproxy_sessions_ended_total", "counter",
               "Control connections that have ended since start.",
               [({}, totals.get("sessions_ended"))])
    out.family("routeproxy_control_bytes_total", "counter",
               "PPTP control bytes from (in) and to (out) the PPTP peers, all sessions.",
               [({"direction": "in"}, totals.get("control_bytes_in", 0)),
                ({"direction": "out"}, totals.get("control_bytes_out", 0))])
    out.family("routeproxy_gre_packets_total", "counter",
               "GRE packets from (in) and to (out) the PPTP peers, all sessions.",
               [({"direction": "in"}, totals.get("gre_packets_in", 0)),
                ({"direction": "out"}, totals.get("gre_packets_out", 0))])
    out.family("routeproxy_gre_dropped_total", "counter",
               "GRE packets the daemon dropped, by reason.",
               [({"reason": r}, n) for r, n in (snap.get("drops") or {}).items()])
    out.family("routeproxy_links_up", "gauge", "Mux links to the other proxy that are ready.",
               [({}, sum(1 for _, l in links if l.get("up")))])
    out.family("routeproxy_link_up", "gauge", "1 if this mux link is ready, 0 if it is closing.",
               [({"peer": p}, bool(l.get("up"))) for p, l in links])
    out.family("routeproxy_link_rtt_seconds", "gauge", "Last PING round-trip time of the link.",
               [({"peer": p}, None if l.get("rtt_last_ms") is None else l["rtt_last_ms"] / 1000.0)
                for p, l in links])
    out.family("routeproxy_link_rtt_smoothed_seconds", "gauge",
               "Smoothed PING round-trip time of the link (like TCP's SRTT).",
               [({"peer": p}, None if l.get("rtt_smoothed_ms") is None
                 else l["rtt_smoothed_ms"] / 1000.0) for p, l in links])
    out.family("routeproxy_link_sessions", "gauge", "Mux sessions open on the link.",
               [({"peer": p}, l.get("sessions", 0)) for p, l in links])
    out.family("routeproxy_link_frames_total", "counter", "Mux frames on the link, by direction.",
               [({"peer": p, "direction": d}, l.get(f"frames_{d}", 0))
                for p, l in links for d in ("in", "out")])
    out.family("routeproxy_link_bytes_total", "counter", "Bytes on the link (under TLS), by direction.",
               [({"peer": p, "direction": d}, l.get(f"bytes_{d}", 0))
                for p, l in links for d in ("in", "out")])
    out.family("routeproxy_link_gre_dropped_total", "counter",
               "GRE the mux did not send on the link, by reason.",
               [({"peer": p, "reason": r}, n) for p, l in links
                for r, n in (l.get("gre_dropped") or {}).items()])
    out.family("routeproxy_link_gre_ignored_total", "counter",
               "GRE received on the link for a session that is not open, by reason.",
               [({"peer": p, "reason": r}, n) for p, l in links
                for r, n in (l.get("gre_ignored") or {}).items()])
    port = snap.get("gre_port") or None
    out.family("routeproxy_gre_port_packets_total", "counter",
               "The GRE port's packets: captured (received), handed to the daemon (delivered), "
               "sent on the raw socket (sent).",
               [({"event": e}, port.get(e)) for e in ("received", "delivered", "sent")]
               if port else [])
    out.family("routeproxy_gre_port_dropped_total", "counter",
               "Packets the GRE port dropped before the daemon saw them, by reason.",
               [({"reason": r}, n) for r, n in (port.get("dropped") or {}).items()] if port else [])
    spaces = snap.get("call_ids") or []
    out.family("routeproxy_call_ids_in_use", "gauge", "Call IDs this side hands out, in use, per scope.",
               [({"scope": s.get("scope")}, s.get("in_use")) for s in spaces])
    out.family("routeproxy_call_ids_capacity", "gauge", "Call IDs a scope can hand out.",
               [({"scope": s.get("scope")}, s.get("capacity")) for s in spaces])
    return out.text()


# --- the table ------------------------------------------------------------------------------


def _ids(calls, key):
    values = [c.get(key) for c in calls]
    return ",".join("-" if v is None else str(v) for v in values) or "-"


def _cell(value):
    return "-" if value is None else str(value)


def format_table(snap, summary=True):
    """The sessions of a snapshot as an aligned text table, one row per session.

    Raises :class:`StatusError` for something that is not a snapshot.
    """
    if not isinstance(snap, dict) or not isinstance(snap.get("sessions"), list):
        raise StatusError("not a routeproxy status snapshot (no 'sessions' list)")
    role = str(snap.get("role", "?"))
    local = "R" if role == "rrp" else "L"
    header = ["client"] + (["server"] if role == "rrp" else []) + [
        "link", "profile", "mux", "state", "C", "S", local,
        "ctl in/out B", "GRE in/out pkts", "drop", "rtt ms"]
    rows = []
    for s in snap["sessions"]:
        if not isinstance(s, dict):
            raise StatusError("not a routeproxy status snapshot (a session is not an object)")
        calls = [c for c in (s.get("calls") or []) if isinstance(c, dict)]
        row = [_cell(s.get("client", s.get("peer")))]
        if role == "rrp":
            row.append(_cell(s.get("server", s.get("peer"))))
        row += [_cell(s.get("link")), _cell(s.get("profile")), _cell(s.get("mux_session")),
                _cell(s.get("state")), _ids(calls, "C"), _ids(calls, "S"), _ids(calls, local),
                f"{s.get('control_bytes_in', 0)}/{s.get('control_bytes_out', 0)}",
                f"{s.get('gre_packets_in', 0)}/{s.get('gre_packets_out', 0)}",
                _cell(s.get("gre_dropped", 0)), _cell(s.get("rtt_ms"))]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    numeric = {i for i, h in enumerate(header) if h in ("mux", "drop", "rtt ms")}

    def line(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = []
    if summary:
        lines.append(_summary(snap, role))
    lines.append(line(header))
    lines.extend(line(r) for r in rows)
    return "\n".join(lines) + "\n"


def _summary(snap, role):
    links = [l for l in (snap.get("links") or []) if isinstance(l, dict)]
    if links:
        parts = []
        for l in links:
            rtt = l.get("rtt_smoothed_ms")
            parts.append(f"{l.get('peer')} {'up' if l.get('up') else 'down'}"
                         + (f" rtt {rtt} ms" if rtt is not None else ""))
        link_text = "links: " + ", ".join(parts)
    else:
        link_text = "links: none"
    drops = sum(_number(n) for n in (snap.get("drops") or {}).values())
    sessions = snap["sessions"]
    calls = sum(len(s.get("calls") or ()) for s in sessions if isinstance(s, dict))
    return f"{role.upper()}: {link_text}; {len(sessions)} sessions, {calls} calls, {drops} GRE dropped"


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


# --- python -m routeproxy status ------------------------------------------------------------


def status_url(url):
    """``HOST:PORT`` or ``http://HOST:PORT[/]`` -> the URL of its ``/status.json``."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")):
        raise StatusError(f"{url!r}: only http:// and https:// URLs are supported")
    if url.endswith("/status.json"):
        return url
    return url.rstrip("/") + "/status.json"


def fetch_snapshot(url, timeout=5.0, urlopen=urllib.request.urlopen):
    """GET a daemon's ``/status.json``; :class:`StatusError` with a reason when that fails."""
    url = status_url(url)
    try:
        with urlopen(url, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        raise StatusError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise StatusError(f"{url}: {getattr(e, 'reason', e)}") from None
    try:
        snap = json.loads(body)
    except ValueError as e:
        raise StatusError(f"{url}: not JSON ({e})") from None
    if not isinstance(snap, dict) or not isinstance(snap.get("sessions"), list):
        raise StatusError(f"{url}: not a routeproxy status snapshot")
    return snap


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m routeproxy status",
        description="Print the sessions of a running LRP or RRP from its --status endpoint.")
    parser.add_argument("url", help="the daemon's --status address: HOST:PORT or http://HOST:PORT")
    parser.add_argument("--json", action="store_true", help="print the whole snapshot as JSON")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait [default: 5]")
    return parser


def main(argv=None, urlopen=urllib.request.urlopen, out=None, err=None):
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    args = build_parser().parse_args(argv)
    try:
        snap = fetch_snapshot(args.url, args.timeout, urlopen)
        text = (json.dumps(snap, indent=1, sort_keys=True) + "\n") if args.json else format_table(snap)
    except StatusError as e:
        err.write(f"routeproxy status: {e}\n")
        return 1
    out.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
