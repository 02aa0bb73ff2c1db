"""benchmarks.measure.find_max_rate: the rate it reports held again when it was rerun."""
from twisted.trial import unittest

from benchmarks import measure


class FakePath:
    """A path that loses 1 % above *limit* pps (a stand-in for run_trial: no namespaces)."""

    def __init__(self, limit, generator=300000):
        self.limit, self.generator, self.rates = limit, generator, []

    def __call__(self, rate):
        self.rates.append(rate)
        offered = rate or self.generator
        holds = offered <= self.limit
        return {"target_pps": rate, "offered_pps": offered, "loss": 0.0 if holds else 0.01,
                "delivered_pps": offered if holds else self.limit}


class FindMaxRateTests(unittest.TestCase):
    def test_the_found_rate_is_run_again(self):
        path = FakePath(60000)
        best, trials = measure.find_max_rate(None, None, 64, 1.0, trial_runner=path)
        self.assertTrue(best["confirmed"])
        self.assertLessEqual(best["target_pps"], 60000)
        self.assertEqual(path.rates[-1], best["target_pps"])  # the rerun, last
        self.assertEqual(path.rates.count(best["target_pps"]), 2)  # found, then rerun
        self.assertEqual(len(trials), len(path.rates))

    def test_a_lucky_maximum_steps_down_to_one_that_holds(self):
        path = FakePath(50000)
        best = measure._confirmed({"target_pps": 55000, "loss": 0.0}, path, 3)
        self.assertEqual(path.rates, [55000, 49500])
        self.assertEqual((best["target_pps"], best["confirmed"]), (49500, True))

    def test_unconfirmed_when_no_rerun_holds(self):
        path = FakePath(1000)
        best = measure._confirmed({"target_pps": 100000, "loss": 0.0}, path, 3)
        self.assertEqual(len(path.rates), 3)
        self.assertEqual((best["target_pps"], best["confirmed"]), (100000, False))

    def test_flat_out_without_loss_needs_no_rerun(self):
        path = FakePath(10 ** 9)
        best, _ = measure.find_max_rate(None, None, 64, 1.0, trial_runner=path)
        self.assertEqual(path.rates, [0])
        self.assertNotIn("confirmed", best)
