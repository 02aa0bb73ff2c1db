"""Prometheus metrics of a status snapshot, with prometheus_client.

:class:`SnapshotCollector` is a custom collector over a daemon's own ``snapshot()`` (each
object reports itself; this module only names the numbers): nothing is counted twice and
no instrument is updated on the packet path.  :func:`format_metrics` renders a registry with
that collector, the build info and, for a live daemon, prometheus_client's ``process_*`` and
``python_info`` collectors.  docs/status.md lists every metric.  The ``*_total`` metrics come
from the snapshot's totals, which add the ended sessions to the live ones, so they never go
down.
"""
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["METRICS_CONTENT_TYPE", "SnapshotCollector", "format_metrics", "number"]

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()


def number(value):
    """*value* if it is an int or float (not a bool), else 0: a snapshot count never breaks a page."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _unique_peers(links):
    """Peer labels made unique (a reconnecting LRP may briefly have two connections)."""
    seen = {}
    for link in links:
        peer = str(link.get("peer"))
        seen[peer] = seen.get(peer, 0) + 1
        yield (peer if seen[peer] == 1 else f"{peer}#{seen[peer]}"), link


def _family(kind, name, help_text, labels, samples):
    """A gauge or counter family; *samples* are (label values, value), None values left out."""
    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    family = cls(name, help_text, labels=labels)
    for values, value in samples:
        if value is not None:
            family.add_metric([str(v) for v in values], float(number(value) if not isinstance(value, bool) else value))
    return family


class SnapshotCollector:
    """A prometheus_client collector over ``snapshot()`` (a daemon's, or any callable's)."""

    def __init__(self, snapshot):
        self.snapshot = snapshot

    def collect(self):
        snap = self.snapshot()
        return list(families(snap))


def families(snap):
    sessions, totals = snap.get("sessions") or [], snap.get("totals") or {}
    links = list(_unique_peers(snap.get("links") or []))
    port = snap.get("gre_port") or {}
    spaces = snap.get("call_ids") or []
    build = snap.get("build") or {}
    yield _family("gauge", "routeproxy_info", "Always 1; the role label says which daemon this is.",
                  ["role"], [((snap.get("role", "?"),), 1)])
    if build:
        yield _family("gauge", "routeproxy_build_info",
                      "Always 1; the labels give routeproxy's, Twisted's and Python's versions.",
                      ["version", "twisted", "python"],
                      [((build.get("version"), build.get("twisted"), build.get("python")), 1)])
    if snap.get("shard"):
        yield _family("gauge", "routeproxy_shard_info",
                      "Always 1; the labels give this process's --shard I/N and the call IDs it allocates.",
                      ["shard", "first_id", "last_id"],
                      [((snap["shard"], snap.get("first_id"), snap.get("last_id")), 1)])
    yield _family("gauge", "routeproxy_sessions", "Relayed PPTP control connections now.", [],
                  [((), len(sessions))])
    yield _family("gauge", "routeproxy_calls", "Calls of those control connections now.", [],
                  [((), sum(len(s.get("calls") or ()) for s in sessions))])
    yield _family("counter", "routeproxy_sessions_ended", "Control connections that have ended since start.",
                  [], [((), totals.get("sessions_ended"))])
    yield _family("counter", "routeproxy_control_bytes",
                  "PPTP control bytes from (in) and to (out) the PPTP peers, all sessions.",
                  ["direction"], [(("in",), totals.get("control_bytes_in", 0)),
                                  (("out",), totals.get("control_bytes_out", 0))])
    yield _family("counter", "routeproxy_gre_packets",
                  "GRE packets from (in) and to (out) the PPTP peers, all sessions.",
                  ["direction"], [(("in",), totals.get("gre_packets_in", 0)),
                                  (("out",), totals.get("gre_packets_out", 0))])
    yield _family("counter", "routeproxy_gre_dropped", "GRE packets the daemon dropped, by reason.",
                  ["reason"], [((r,), n) for r, n in (snap.get("drops") or {}).items()])
    yield _family("counter", "routeproxy_refused",
                  "Clients, sessions or links refused, by reason (snake_case).",
                  ["reason"], [((r,), n) for r, n in sorted((snap.get("refusals") or {}).items())])
    yield _family("counter", "routeproxy_tls_handshake_failures",
                  "TLS handshakes of the link refused by this side or by the peer.", [],
                  [((), snap.get("tls_handshake_failures"))])
    yield _family("counter", "routeproxy_link_connect_failures",
                  "Failed attempts to connect the link to the RRP (LRP only).", [],
                  [((), snap.get("link_connect_failures"))])
    yield _family("counter", "routeproxy_link_reconnects",
                  "Links to the RRP that came up again after the first (LRP only).", [],
                  [((), snap.get("link_reconnects"))])
    yield _family("gauge", "routeproxy_links_up", "Mux links to the other proxy that are ready.", [],
                  [((), sum(1 for _, l in links if l.get("up")))])
    yield _family("gauge", "routeproxy_link_up", "1 if this mux link is ready, 0 if it is closing.",
                  ["peer"], [((p,), bool(l.get("up"))) for p, l in links])
    yield _family("gauge", "routeproxy_link_rtt_seconds", "Last PING round-trip time of the link.",
                  ["peer"], [((p,), None if l.get("rtt_last_ms") is None else l["rtt_last_ms"] / 1000.0)
                             for p, l in links])
    yield _family("gauge", "routeproxy_link_rtt_smoothed_seconds",
                  "Smoothed PING round-trip time of the link (like TCP's SRTT).",
                  ["peer"], [((p,), None if l.get("rtt_smoothed_ms") is None
                              else l["rtt_smoothed_ms"] / 1000.0) for p, l in links])
    yield _family("gauge", "routeproxy_link_sessions", "Mux sessions open on the link.",
                  ["peer"], [((p,), l.get("sessions", 0)) for p, l in links])
    yield _family("gauge", "routeproxy_link_gre_limit_bytes",
                  "Unsent link bytes above which GRE is dropped: the GRE watermark, lowered on a "
                  "slow link to --link-queue-delay of its delivery rate.",
                  ["peer"], [((p,), (l.get("send_queue") or {}).get("limit")) for p, l in links])
    yield _family("gauge", "routeproxy_link_delivery_rate_bytes",
                  "The link's TCP delivery rate as its GRE limit takes it, bytes/s (absent: not known).",
                  ["peer"], [((p,), (l.get("send_queue") or {}).get("delivery_rate")) for p, l in links])
    yield _family("counter", "routeproxy_link_frames", "Mux frames on the link, by direction.",
                  ["peer", "direction"], [((p, d), l.get(f"frames_{d}", 0))
                                          for p, l in links for d in ("in", "out")])
    yield _family("counter", "routeproxy_link_bytes", "Bytes on the link (under TLS), by direction.",
                  ["peer", "direction"], [((p, d), l.get(f"bytes_{d}", 0))
                                          for p, l in links for d in ("in", "out")])
    yield _family("counter", "routeproxy_link_gre_dropped",
                  "GRE the mux did not send on the link, by reason.", ["peer", "reason"],
                  [((p, r), n) for p, l in links for r, n in (l.get("gre_dropped") or {}).items()])
    yield _family("counter", "routeproxy_link_gre_ignored",
                  "GRE received on the link for a session that is not open, by reason.",
                  ["peer", "reason"],
                  [((p, r), n) for p, l in links for r, n in (l.get("gre_ignored") or {}).items()])
    yield _family("counter", "routeproxy_gre_port_packets",
                  "The GRE port's packets: captured (received), handed to the daemon (delivered), "
                  "sent on the raw socket (sent).", ["event"],
                  [((e,), port.get(e)) for e in ("received", "delivered", "sent")] if port else [])
    yield _family("counter", "routeproxy_gre_port_dropped",
                  "Packets the GRE port dropped before the daemon saw them, by reason.", ["reason"],
                  [((r,), n) for r, n in (port.get("dropped") or {}).items()] if port else [])
    yield _family("gauge", "routeproxy_capture_up",
                  "1 while GRE is being captured, 0 once the capture failed (restart the daemon).",
                  [], [((), bool(port.get("capture_up")))] if "capture_up" in port else [])
    yield _family("gauge", "routeproxy_call_ids_in_use", "Call IDs this side hands out, in use, per scope.",
                  ["scope"], [((s.get("scope"),), s.get("in_use")) for s in spaces])
    yield _family("gauge", "routeproxy_call_ids_capacity", "Call IDs a scope can hand out.",
                  ["scope"], [((s.get("scope"),), s.get("capacity")) for s in spaces])
    certificate = snap.get("certificate") or {}
    yield _family("gauge", "routeproxy_certificate_expiry_seconds",
                  "Seconds until this daemon's own certificate expires (negative: expired).", [],
                  [((), certificate.get("expires_in_seconds"))])
    yield _family("counter", "routeproxy_reloads", "Configuration reloads (SIGHUP), by result.",
                  ["result"], [(("ok",), snap.get("reloads")), (("refused",), snap.get("reload_failures"))])
    upstreams = snap.get("upstream_connections") or {}
    yield _family("gauge", "routeproxy_upstream_connections",
                  "Extra control connections to servers now, beyond each session's first (RRP).", [],
                  [((), upstreams.get("open"))] if upstreams else [])
    yield _family("counter", "routeproxy_upstream_connections",
                  "Extra control connections to servers opened, failed, lost with calls (RRP).",
                  ["event"], [((e,), upstreams.get(e)) for e in ("opened", "failed", "lost")]
                  if upstreams else [])
    resume = snap.get("resume") or {}
    yield _family("gauge", "routeproxy_detached_sessions",
                  "Sessions whose link is lost and that wait for a resume.", [],
                  [((), resume.get("detached_sessions"))] if resume else [])
    yield _family("counter", "routeproxy_resumes", "Resumes of a lost link, by result.", ["result"],
                  [((r,), resume.get(f"resumes_{r}")) for r in ("done", "refused")] if resume else [])
    yield _family("counter", "routeproxy_resumed_sessions",
                  "Detached sessions re-attached (resumed) or closed unresumed (expired).", ["result"],
                  [((r,), resume.get(f"sessions_{r}")) for r in ("resumed", "expired")] if resume else [])
    yield _family("gauge", "routeproxy_resume_gap_seconds",
                  "The last and the longest gap between a link loss and its resume.", ["which"],
                  [((w,), resume.get(f"gap_{w}_s")) for w in ("last", "max")] if resume else [])


def format_metrics(snap, process=False):
    """*snap* (a status snapshot) in the Prometheus text format; with *process*, also this
    process's ``process_*`` and ``python_info`` (prometheus_client's own collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snap))
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return generate_latest(registry).decode()
