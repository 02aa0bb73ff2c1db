"""Prometheus text exposition (format 0.0.4) of a status snapshot, written by hand: no dependency.

:func:`format_metrics` turns a snapshot (routeproxy.status) into the text ``/metrics`` serves;
docs/status.md lists every metric.  The ``*_total`` metrics come from the snapshot's totals,
which add the daemon's ended sessions (``RelayDaemon.ended_totals``) to the live ones, so they
never go down.
"""
import math
import re

__all__ = ["METRICS_CONTENT_TYPE", "escape_label_value", "format_metrics", "number"]

METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def number(value):
    """*value* if it is an int or float (not a bool), else 0: a snapshot count never breaks a page."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


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
    upstreams = snap.get("upstream_connections") or None
    out.family("routeproxy_upstream_connections", "gauge",
               "Extra control connections to servers now, beyond each session's first (RRP).",
               [({}, upstreams.get("open"))] if upstreams else [])
    out.family("routeproxy_upstream_connections_total", "counter",
               "Extra control connections to servers opened, failed, lost with calls (RRP).",
               [({"event": e}, upstreams.get(e)) for e in ("opened", "failed", "lost")]
               if upstreams else [])
    resume = snap.get("resume") or {}
    out.family("routeproxy_detached_sessions", "gauge",
               "Sessions whose link is lost and that wait for a resume.",
               [({}, resume.get("detached_sessions"))] if resume else [])
    out.family("routeproxy_resumes_total", "counter", "Resumes of a lost link, by result.",
               [({"result": r}, resume.get(f"resumes_{r}")) for r in ("done", "refused")]
               if resume else [])
    out.family("routeproxy_resumed_sessions_total", "counter",
               "Detached sessions re-attached (resumed) or closed unresumed (expired).",
               [({"result": r}, resume.get(f"sessions_{r}")) for r in ("resumed", "expired")]
               if resume else [])
    out.family("routeproxy_resume_gap_seconds", "gauge",
               "The last and the longest gap between a link loss and its resume.",
               [({"which": w}, resume.get(f"gap_{w}_s")) for w in ("last", "max")] if resume else [])
    return out.text()

