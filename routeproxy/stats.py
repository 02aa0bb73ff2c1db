"""Counters for what the daemons drop, with log lines that cannot flood.

Nothing is dropped silently: every drop is counted by reason, the first of each reason is
logged with its detail at once, and later ones are summarised at most once per *interval*
seconds ("... 1234 more since the last report").
"""
import time
from collections import Counter

from twisted.logger import Logger


class DropCounter:
    log = Logger()

    def __init__(self, clock=time.monotonic, interval=10.0):
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
        self.log.warn("dropped: {reason}{detail}{suffix}", reason=reason,
                      detail=f": {detail}" if detail else "", suffix=suffix)

    def __getitem__(self, reason):
        return self.counts[reason]

    def total(self):
        return sum(self.counts.values())

    def snapshot(self):
        """Drops by reason as plain data (reason text -> count), sorted by reason."""
        return {str(reason): count for reason, count in sorted(self.counts.items(), key=lambda kv: str(kv[0]))}
