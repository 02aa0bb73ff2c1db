"""routeproxy.stats.DropCounter: counting by reason, log lines that cannot flood, the snapshot.

The clock is a plain settable value; the log lines go to a Logger whose observer records them.
"""
import json

from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from routeproxy.stats import DropCounter


class DropCounterTests(SynchronousTestCase):
    def setUp(self):
        self.now = 100.0
        self.drops = DropCounter(clock=lambda: self.now, interval=10.0)
        self.lines = []
        self.drops.log = Logger(observer=lambda event: self.lines.append(formatEvent(event)))

    def test_counts_by_reason(self):
        for reason in ("bad GRE", "bad GRE", "no call"):
            self.drops.add(reason)
        self.assertEqual((self.drops["bad GRE"], self.drops["no call"], self.drops["other"]), (2, 1, 0))
        self.assertEqual(self.drops.total(), 3)

    def test_first_logged_at_once_then_summarised_per_interval(self):
        self.drops.add("no call", "key 7")
        self.assertEqual(self.lines, ["dropped: no call: key 7"])
        for _ in range(3):
            self.drops.add("no call", "key 8")
        self.assertEqual(len(self.lines), 1)   # within the interval: counted, not logged
        self.now += 10.0
        self.drops.add("no call")
        self.assertEqual(self.lines[1], "dropped: no call (3 more since the last report)")
        self.drops.add("bad GRE")               # another reason has its own interval
        self.assertEqual(self.lines[2], "dropped: bad GRE")
        self.assertEqual(self.drops["no call"], 5)

    def test_snapshot(self):
        self.assertEqual(self.drops.snapshot(), {})
        self.drops.add("no call")
        self.drops.add("bad GRE: truncated")
        self.drops.add("no call")
        snap = self.drops.snapshot()
        self.assertEqual(snap, {"bad GRE: truncated": 1, "no call": 2})
        self.assertEqual(list(snap), ["bad GRE: truncated", "no call"])
        self.assertEqual(json.loads(json.dumps(snap)), snap)
        self.drops.add("bad GRE: truncated")
        self.assertEqual(snap["bad GRE: truncated"], 1)  # a copy, not a live view
