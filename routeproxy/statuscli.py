"""``python -m routeproxy status URL [--json]``: a daemon's ``/status.json`` as a text table.

:func:`fetch_snapshot` GETs the snapshot (docs/status.md), :func:`format_table` renders its
sessions one row each.  Plain urllib and no twisted, so the tool starts fast.
"""
import argparse
import json
import sys
import urllib.error
import urllib.request

from routeproxy.metrics import number

__all__ = ["StatusError", "build_parser", "fetch_snapshot", "format_table", "main", "status_url"]


class StatusError(Exception):
    """A status document or endpoint that cannot be used; the text says why."""


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
        "link", "profile", "mux", "state", "C", "S", local] + (["upstreams"] if role == "rrp" else []) + [
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
                _cell(s.get("state")), _ids(calls, "C"), _ids(calls, "S"), _ids(calls, local)]
        if role == "rrp":
            row.append(_upstreams(s.get("upstreams")))
        row += [                f"{s.get('control_bytes_in', 0)}/{s.get('control_bytes_out', 0)}",
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


def _upstreams(upstreams):
    """The session's control connections to the server: ``N: C,C`` each, ``*`` the primary."""
    if not isinstance(upstreams, list) or not upstreams:
        return "-"
    return " ".join(f"{u.get('connection')}{'*' if u.get('primary') else ''}:"
                    + (",".join(str(c) for c in u.get("calls") or ()) or "-")
                    for u in upstreams if isinstance(u, dict))


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
    drops = sum(number(n) for n in (snap.get("drops") or {}).values())
    sessions = snap["sessions"]
    calls = sum(len(s.get("calls") or ()) for s in sessions if isinstance(s, dict))
    shard = snap.get("shard")
    name = role.upper() + (f" shard {shard} (IDs {snap.get('first_id')}-{snap.get('last_id')})"
                           if shard and shard != "0/1" else "")
    return f"{name}: {link_text}; {len(sessions)} sessions, {calls} calls, {drops} GRE dropped"



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
