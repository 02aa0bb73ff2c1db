"""benchmarks.measure with both directions at once: one marker, each direction's own figures.

The sinks and senders are stand-ins (no namespaces): a fake lab hands out processes whose
output is what the real loadgen prints, chosen per namespace.
"""
import io
import json

from twisted.trial import unittest

from benchmarks import fixedrate, measure


class FakeProc:
    def __init__(self, lines, result):
        self.stdout, self.result, self.returncode, self.argv = io.StringIO(lines), result, 0, None

    def communicate(self, timeout=None):
        return json.dumps(self.result) + "\n", ""

    def send_signal(self, signum):
        pass

    def poll(self):
        return 0

    def kill(self):
        pass


class FakeLab:
    """Each sink in namespace NS reports *sinks[NS]* (a dict or a list, one per attempt);
    each sender 1000 packets in 1 s.  Records every argv with its namespace."""

    def __init__(self, sinks):
        self.sinks, self.spawned = sinks, []

    def spawn(self, ns, argv, **kwargs):
        self.spawned.append((ns, argv))
        if "sink" in argv:
            got = self.sinks[ns]
            got = got.pop(0) if isinstance(got, list) else got
            return FakeProc("ready {}\n", dict({"other": 0, "stale": 0, "bytes": 0, "per_flow_min": 0,
                                                "tail_seconds": 0.1, "drain": {"drained": 0}}, **got))
        return FakeProc("", {"sent": 1000, "errors": 0, "seconds": 1.0})


def sink(received, flows, latency=None):
    got = {"received": received, "flows": len(flows), "flow_min": min(flows), "flow_max": max(flows)}
    return dict(got, latency_us=latency) if latency else got


def both():
    forward = measure.Path("p", [("client", "10.0.0.1", [7, 8], None)], "server")
    reverse = measure.Path("p", [("server", "10.0.0.2", [20, 21], None)], "client")
    return measure.Path.both("p", forward, reverse)


class LegTests(unittest.SynchronousTestCase):
    def test_each_direction_apart_one_marker(self):
        lab = FakeLab({"server": sink(990, [0, 1], {"count": 990, "p50": 5.0}),
                       "client": sink(1000, [2, 3], {"count": 1000, "p50": 9.0})})
        got = measure.run_trial(lab, both(), 512, 2000, 1.0, latency=True)
        forward, reverse = got["legs"]
        self.assertEqual((got["sent"], got["received"]), (2000, 1990))
        self.assertEqual((forward["sent"], forward["received"], forward["latency_us"]["p50"]), (1000, 990, 5.0))
        self.assertEqual((reverse["sent"], reverse["received"], reverse["latency_us"]["p50"]), (1000, 1000, 9.0))
        self.assertAlmostEqual(forward["loss"], 0.01)
        runs = {argv[argv.index("--run") + 1] for _, argv in lab.spawned}
        self.assertEqual(len(runs), 1)   # one marker for the trial, both directions
        bases = [argv[argv.index("--flow-base") + 1] for _, argv in lab.spawned if "send" in argv]
        self.assertEqual(bases, ["0", "2"])
        rates = [argv[argv.index("--rate") + 1] for _, argv in lab.spawned if "send" in argv]
        self.assertEqual(rates, ["1000.0", "1000.0"])

    def test_a_direction_that_received_more_than_it_sent_is_run_again(self):
        # The whole received less than it sent, the reverse direction more: rejected.
        lab = FakeLab({"server": [sink(100, [0, 1]), sink(1000, [0, 1])],
                       "client": [sink(1200, [2, 3]), sink(1000, [2, 3])]})
        got = measure.run_trial(lab, both(), 512, 2000, 1.0)
        self.assertEqual([leg["received"] for leg in got["legs"]], [1000, 1000])
        self.assertEqual(got["rejected"][0]["received"], 1300)

    def test_a_sink_counting_the_other_directions_probes_is_an_error(self):
        lab = FakeLab({"server": sink(1000, [0, 2]), "client": sink(1000, [2, 3])})
        self.assertRaises(measure.MeasureError, measure.run_trial, lab, both(), 512, 2000, 1.0)

    def test_one_direction_has_no_legs(self):
        lab = FakeLab({"server": sink(1000, [0, 1])})
        got = measure.run_trial(lab, both().legs[0], 512, 1000, 1.0)
        self.assertNotIn("legs", got)


class FixedRateDirectionTests(unittest.SynchronousTestCase):
    def test_rate_is_per_direction(self):
        self.assertEqual(fixedrate.offered(both(), 3000), 6000)
        self.assertEqual(fixedrate.offered(both().legs[1], 3000), 3000)
        self.assertEqual(fixedrate.offered(both(), 0), 0)

    def test_directions_name_the_builders_paths(self):
        paths = {"c2s": "f", "s2c": "r", "both": "b"}
        self.assertEqual([fixedrate.directed(lambda: paths, d) for d in ("forward", "reverse", "both")],
                         ["f", "r", "b"])

    def test_a_both_row_per_direction(self):
        class Args:
            size, duration, latency, direction = 512, 1.0, True, "both"
        lab = FakeLab({"server": sink(990, [0, 1], {"count": 990, "min": 1.0, "p50": 5.0}),
                       "client": sink(1000, [2, 3], {"count": 1000, "min": 2.0, "p50": 9.0})})
        cpu = iter([{"lrp": (1.0,), "rrp": (2.0,)}, {"lrp": (1.199, ), "rrp": (2.0995,)}])
        row = fixedrate.measure_rate(lab, "p", both(), 1000, Args, lambda: next(cpu))
        self.assertEqual((row["direction"], row["rate"], row["received"]), ("both", 1000, 1990))
        self.assertEqual((row["forward"]["received"], row["forward"]["loss"]), (990, 0.01))
        self.assertEqual(row["reverse"]["latency_us"]["p50"], 9)
        self.assertNotIn("latency_us", row)   # no figure of the two mixed
        self.assertEqual((row["lrp_us_per_packet"], row["rrp_us_per_packet"]), (100.0, 50.0))
