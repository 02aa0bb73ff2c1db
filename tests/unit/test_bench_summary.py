"""The --repeat summary of ``python -m benchmarks``: every figure's median [min-max] over the
rounds, with the flat-out rate and the loss-free share of it (issue 13's 80 % goal)."""
from twisted.trial import unittest

from benchmarks.__main__ import _figures, summary


def round_(pps, flat, load=1.0):
    entry = {"max": {"delivered_pps": pps},
             "latency": {"50%": {"latency_us": {"p50": 40, "p99": 300}}},
             "cpu": {"cpu_us_per_packet": {"lrp": 5.0, "rrp": 4.0}},
             "overload": {"delivered_pps": flat}}
    return {"machine": {"load_before": [load]},
            "proxy": {"throughput": {"sizes": {"512": entry}}}}


class SummaryTests(unittest.SynchronousTestCase):

    def test_flat_out_and_share(self):
        self.assertEqual(_figures(round_(80, 100))[("proxy", 512)]["share"], 80.0)
        text = summary([round_(80, 100), round_(60, 120), round_(90, 100)])
        header, line = text.splitlines()[-2:]
        self.assertIn("max/flat %", header)
        # max 60/80/90 -> 80; flat 100/100/120 -> 100; share 80/50/90 -> 80
        self.assertEqual(line.split()[2:4], ["80", "[60-90]"])
        self.assertEqual(line.split()[-4:], ["100", "[100-120]", "80", "[50-90]"])

    def test_no_flat_out_trial(self):
        rnd = round_(80, None)
        self.assertIsNone(_figures(rnd)[("proxy", 512)]["share"])
        self.assertEqual(summary([rnd]).splitlines()[-1].split()[-2:], ["-", "-"])
