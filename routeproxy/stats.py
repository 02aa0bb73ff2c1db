"""Counters for what the daemons drop, with log lines that cannot flood.

Nothing is dropped silently: every drop is counted by reason, the first of each reason is
logged with its detail at once, and later ones are summarised at most once per *interval*
seconds ("... 1234 more since the last report").
"""
import time
from collections import Counter

from twisted.logger import Logger


def printable(text, limit=200):
    """Text a peer chose (a name, a reason, bytes), safe for one log line: escaped, bounded."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("latin-1")
    text = str(text).encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


class DropCounter:
    """*verb* names what is counted: "dropped" (packets) or "refused" (clients, calls)."""

    log = Logger()

    def __init__(self, clock=time.monotonic, interval=10.0, verb="dropped"):
        self.verb = verb
        self.counts = Counter()
        self._clock = clock
        self._interval = interval
        self._nextReport = {}
        self._unreported = Counter()

    def add(self, reason, detail=""):
        self.counts[reason] += 1
        now = self._clock()
        due = self._nextReport.get(reason)
        if due is not None and now < due:
            self._unreported[reason] += 1
            return
        more = self._unreported.pop(reason, 0)
        self._nextReport[reason] = now + self._interval
        suffix = f" ({more} more since the last report)" if more else ""
        self.log.warn("{verb}: {reason}{detail}{suffix}", verb=self.verb, reason=reason,
                      detail=f": {printable(detail)}" if detail else "", suffix=suffix)

    def count(self, reason):
        """Count one without a line: the caller logs its own (rate-limited) line."""
        self.counts[reason] += 1

    def __getitem__(self, reason):
        return self.counts[reason]

    def total(self):
        return sum(self.counts.values())

    def snapshot(self):
        """Drops by reason as plain data (reason text -> count), sorted by reason."""
        return {str(reason): count for reason, count in sorted(self.counts.items(), key=lambda kv: str(kv[0]))}


class LimitedLog:
    """Log lines a peer can cause, at most *burst* per kind per *interval* seconds.

    Lines keep their own format; past the burst they are only counted, and the next line
    of that kind that gets through says how many were left out.  So a handful of events
    are all logged, and a flood costs a few lines per interval, not one per packet.
    """

    def __init__(self, log, clock=time.monotonic, burst=10, interval=10.0):
        self.log = log
        self._clock = clock
        self.burst = burst
        self.interval = interval
        self._windows = {}          # kind -> (window start, lines logged in it)
        self.suppressed = Counter()

    def emit(self, level, kind, format, **kw):
        now = self._clock()
        start, used = self._windows.get(kind, (now, 0))
        if now - start >= self.interval:
            start, used = now, 0
        if used >= self.burst:
            self._windows[kind] = (start, used)
            self.suppressed[kind] += 1
            return
        self._windows[kind] = (start, used + 1)
        more = self.suppressed.pop(kind, 0)
        if more:
            format += " ({more} similar lines left out)"
            kw["more"] = more
        getattr(self.log, level)(format, **kw)

    def warn(self, kind, format, **kw):
        self.emit("warn", kind, format, **kw)

    def info(self, kind, format, **kw):
        self.emit("info", kind, format, **kw)

    def error(self, kind, format, **kw):
        self.emit("error", kind, format, **kw)
