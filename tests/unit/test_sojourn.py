"""routeproxy.sojourn.SojournGate alone: CoDel's states and control law, on a scripted clock."""
import math

from twisted.trial import unittest

from routeproxy.sojourn import SojournGate


class ControlLawTests(unittest.SynchronousTestCase):
    def standing(self, gate, at):
        """Make the head stand above the target from *at* for one interval."""
        gate.observe(at, at - 0.05)
        later = at + gate.interval + 1e-9
        gate.observe(later, later - 0.05)
        return later

    def test_drops_spaced_by_interval_over_sqrt_count(self):
        gate = SojournGate(0.005, 0.1)
        entered = self.standing(gate, 10.0)
        self.assertTrue(gate.dropping)
        due = [entered]
        for count in range(1, 6):
            due.append(due[-1] + 0.1 / math.sqrt(count))
        for when in due:
            self.assertAlmostEqual(gate.drop_before(when - 1e-6), when - 1e-6 - 0.05)   # the ceiling only
            self.assertAlmostEqual(gate.drop_before(when), when - 0.005)
            self.assertAlmostEqual(gate.dropped(), when - 0.05)   # one drop per due time
        self.assertEqual(gate.count, 6)

    def test_behind_schedule_several_drops_in_one_wake_up(self):
        gate = SojournGate(0.005, 0.1)
        entered = self.standing(gate, 10.0)
        now = entered + 0.1 + 0.1 / math.sqrt(2) + 1e-9   # three drops due by now
        threshold, drops = gate.drop_before(now), 0
        while threshold > now - 0.05:   # due drops (older than the target)
            drops += 1
            threshold = gate.dropped()
        self.assertEqual(drops, 3)

    def test_a_young_head_ends_it_and_a_quick_return_keeps_the_pace(self):
        gate = SojournGate(0.005, 0.1)
        entered = self.standing(gate, 10.0)
        for _ in range(5):
            gate.drop_before(gate.drop_next)
            gate.dropped()
        gate.observe(entered + 1.0, entered + 1.0 - 0.001)
        self.assertFalse(gate.dropping)
        self.assertEqual(gate.drop_before(entered + 5.0), 0.0)
        self.standing(gate, entered + 1.01)   # within 16 intervals: count 5 - 2
        self.assertEqual((gate.dropping, gate.count, gate.episodes), (True, 3, 2))
        gate.observe(entered + 1.2, entered + 1.2 - 0.001)
        self.standing(gate, entered + 10.0)   # long after: from the start
        self.assertEqual((gate.count, gate.episodes), (0, 3))

    def test_a_burst_shorter_than_the_interval_drops_nothing(self):
        gate = SojournGate(0.005, 0.1)
        gate.observe(10.0, 9.95)
        gate.observe(10.09, 10.04)
        self.assertFalse(gate.dropping)
        self.assertEqual(gate.drop_before(10.095), 0.0)

    def test_past_the_ceiling_everything_goes_while_dropping(self):
        """A flood that does not slow down: between due drops, packets that waited longer than
        the ceiling (10x the target) are dropped too, and do not speed the control law up."""
        gate = SojournGate(0.005, 0.1)
        entered = self.standing(gate, 10.0)
        gate.drop_before(entered)
        gate.dropped()   # the due one
        now = entered + 0.01
        threshold = gate.drop_before(now)
        self.assertAlmostEqual(threshold, now - 0.05)
        for _ in range(100):
            threshold = gate.dropped()   # a hundred packets past the ceiling
        self.assertAlmostEqual(threshold, now - 0.05)
        self.assertEqual(gate.count, 1)
        self.assertEqual(SojournGate(0.005, 0.1).drop_before(20.0), 0.0)   # not standing: nothing
