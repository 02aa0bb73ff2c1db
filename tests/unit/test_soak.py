"""The soak's judgement (benchmarks/soak.py): its checks fail on what they are meant to catch.

Synthetic reports of the shape ``python -m benchmarks.soak`` writes: a leaking RSS series, a
descriptor leak, flow entries left with no call, GRE lost without a counted drop, a dead
daemon; and ``--check`` on a saved report exits 1 with one FAIL line per finding.
"""
import io
import json
import os
import tempfile
from contextlib import redirect_stdout

from twisted.trial import unittest

from benchmarks import soak


def sample(t, rss=80_000, fds=15, phase="quiet", **more):
    entry = {"t": t, "phase": phase, "settled": True, "rss_kib": rss, "fds": fds, "calls": 0, "sessions": 0,
             "call_ids_in_use": 0, "native_entries": 0, "native_in_c": 0, "link_entries": 0, "link_in_c": 0,
             "drops": {}, "port_dropped": {}, "totals": {"gre_packets_in": 10, "gre_packets_out": 10,
                                                         "sessions_ended": 2}}
    entry.update(more)
    return entry


def incarnation(samples, started=0.0, pid=100):
    return {"pid": pid, "started": started, "samples": samples, "log_problems": 0, "log_first_problem": ""}


def flat(minutes=10, rss=80_000, growth_kib_per_min=0, fds=15, fd_growth=0):
    """Quiet samples every 30 s over *minutes*."""
    return [sample(t, rss=rss + int(growth_kib_per_min * t / 60), fds=fds + (fd_growth if t == minutes * 60 else 0))
            for t in range(0, minutes * 60 + 1, 30)]


def slice_(index=1, kind="native", clean_lost=0, counted_calm=0, clean_foreign=0, clean_errors=0, settled=True):
    return {"index": index, "kind": kind, "start": 0.0, "busy_end": 30.0, "end": 32.0, "settled": settled,
            "unsettled": None if settled else {"lrp": {"calls": 3}},
            "rounds": {"rounds": 10, "sessions": 10, "calls": 30, "cleared": 20, "clean_rounds": 8,
                       "clean_errors": clean_errors, "troubled_errors": 0, "endings": {},
                       "error_samples": ["PeerError: x"] if clean_errors else []},
            "gre": {"sent": 600, "echoed": 600 - clean_lost, "clean_sent": 500, "clean_lost": clean_lost,
                    "troubled_sent": 100, "troubled_lost": 0, "clean_foreign": clean_foreign, "troubled_foreign": 0,
                    "late": 0, "duplicates": 0, "counted_calm": counted_calm, "counted": counted_calm,
                    "server_dropped": 0},
            "cuts": [], "server": {}}


def report(lrp=None, rrp=None, slices=None, deaths=(), drift=0):
    """A report whose LRP counted every GRE the clients sent and got (off by *drift* in)."""
    slices = slices if slices is not None else [slice_()]
    lrp = lrp or [incarnation(flat())]
    totals = {"gre_packets_in": sum(s["gre"]["sent"] for s in slices) + drift,
              "gre_packets_out": sum(s["gre"]["echoed"] for s in slices), "sessions_ended": 10}
    for entry in lrp[-1]["samples"]:
        entry["totals"] = totals
    return {"options": {"minutes": 10}, "deaths": list(deaths), "harness_problems": [],
            "daemons": {"native": {"lrp": lrp, "rrp": rrp or [incarnation(flat())]}},
            "cuts": {"native": []}, "slices": slices}


LIMITS = soak.Limits(rss_growth=24, rss_slack=3, fd_slack=8, warmup=150, min_span=60)


class TrendTests(unittest.SynchronousTestCase):
    def test_slope_of_a_straight_line(self):
        rate, growth = soak.rss_trend([(0, 1000), (1800, 1000 + 512), (3600, 1000 + 1024)])
        self.assertAlmostEqual(rate, 1.0)
        self.assertAlmostEqual(growth, 1.0)

    def test_too_few_points(self):
        self.assertEqual(soak.rss_trend([(0, 1)]), (None, None))
        self.assertEqual(soak.rss_trend([(5, 1), (5, 2)]), (None, None))


class RSSCheckTests(unittest.SynchronousTestCase):
    def test_flat_series_passes(self):
        rate, growth, warm, failure = soak.rss_verdict(incarnation(flat()), LIMITS)
        self.assertEqual((rate, growth, failure), (0.0, 0.0, None))
        self.assertEqual(warm["t"], 150)   # the first quiet sample after the warm-up

    def test_leak_fails(self):
        # 1 MiB a minute: 60 MiB/h, 7.5 MiB after the warm-up
        rate, growth, _, failure = soak.rss_verdict(incarnation(flat(growth_kib_per_min=1024)), LIMITS)
        self.assertAlmostEqual(rate, 60.0, places=3)
        self.assertIn("RSS grows 60.0 MiB/h", failure)

    def test_warmup_growth_is_not_judged(self):
        samples = flat()
        for s in samples:
            if s["t"] < 150:
                s["rss_kib"] = 40_000 + s["t"] * 200   # fast growth while warming up only
        self.assertIsNone(soak.rss_verdict(incarnation(samples), LIMITS)[3])

    def test_small_growth_within_slack_passes(self):
        # 2 MiB in total is under the 3 MiB slack even though the rate is above the limit
        samples = flat(minutes=4, growth_kib_per_min=600)
        self.assertIsNone(soak.rss_verdict(incarnation(samples), LIMITS)[3])

    def test_too_short_a_span_has_no_verdict(self):
        self.assertEqual(soak.rss_verdict(incarnation(flat(minutes=3)), LIMITS)[:2], (None, None))

    def test_a_restarted_daemon_warms_up_for_less(self):
        samples = [sample(300 + t, rss=80_000 + t * 40) for t in range(0, 181, 30)]
        inc = incarnation(samples, started=300)
        self.assertIsNone(soak.rss_verdict(inc, LIMITS, first=True)[0])   # 150 s warm-up leaves 30 s
        self.assertIsNotNone(soak.rss_verdict(inc, LIMITS, first=False)[3])

    def test_busy_samples_are_not_used(self):
        samples = flat() + [sample(t + 15, rss=200_000, phase="busy") for t in range(0, 600, 30)]
        self.assertIsNone(soak.rss_verdict(incarnation(sorted(samples, key=lambda s: s["t"])), LIMITS)[3])


class OtherCheckTests(unittest.SynchronousTestCase):
    def test_descriptor_leak(self):
        self.assertIsNone(soak.fd_verdict(incarnation(flat(fd_growth=8)), LIMITS))
        self.assertIn("15 -> 24", soak.fd_verdict(incarnation(flat(fd_growth=9)), LIMITS))

    def test_leftover_flow_entries_with_no_call(self):
        self.assertEqual(soak.leftovers(sample(1)), [])
        self.assertEqual(soak.leftovers(sample(1, native_entries=2, link_in_c=1)), ["native_entries=2", "link_in_c=1"])
        self.assertEqual(soak.leftovers(sample(1, calls=2, native_entries=2)), [])   # calls still open
        self.assertEqual(soak.leftovers(sample(1, settled=False, calls=1, sessions=1, call_ids_in_use=1)),
                         ["calls=1", "sessions=1", "call_ids_in_use=1"])
        self.assertEqual(soak.leftovers(sample(1, native_entries=None, link_entries=None)), [])   # pcap

    def test_overlaps(self):
        windows = [(10.0, 12.0)]
        self.assertTrue(soak.overlaps(5, 9.5, windows))     # within the margin
        self.assertFalse(soak.overlaps(5, 8.9, windows))
        self.assertTrue(soak.overlaps(11, 11.5, windows))
        self.assertFalse(soak.overlaps(13.1, 20, windows))

    def test_calm_drops_skip_trouble(self):
        samples = [sample(0, drops={}), sample(2, drops={"mux_detached": 5}),
                   sample(4, drops={"mux_detached": 5}, port_dropped={"not_local": 1}),
                   sample(6, drops={"mux_detached": 9}, port_dropped={"not_local": 1})]
        self.assertEqual(soak.calm_drops(samples, []), 10)
        self.assertEqual(soak.calm_drops(samples, [(1.5, 1.8)]), 4)   # 0-2 and 2-4 meet the window (1 s margin)

    def test_rounds_are_split_into_clean_and_troubled(self):
        rounds = [{"start": 0, "end": 1, "ending": "clear", "session": True, "calls": 3, "sent": 60, "echoed": 58,
                   "foreign": 0, "late": 0, "duplicates": 0, "cleared": 3, "errors": []},
                  {"start": 9, "end": 11, "ending": "reset", "session": True, "calls": 3, "sent": 60, "echoed": 40,
                   "foreign": 1, "late": 2, "duplicates": 0, "cleared": 0, "errors": ["x"]}]
        summary, gre = soak.summarize_rounds(rounds, [(10, 10.5)])
        self.assertEqual((summary["clean_rounds"], summary["clean_errors"], summary["troubled_errors"]), (1, 0, 1))
        self.assertEqual((gre["clean_lost"], gre["troubled_lost"], gre["troubled_foreign"], gre["late"]), (2, 20, 1, 2))


class EvaluateTests(unittest.SynchronousTestCase):
    def test_a_clean_report_passes(self):
        self.assertEqual(soak.evaluate(report(), LIMITS), [])

    def test_every_finding_is_one_fail_line(self):
        leaking = incarnation(flat(growth_kib_per_min=1024, fd_growth=20))
        leaking["samples"][-1].update(native_entries=3)
        broken = report(lrp=[leaking], slices=[slice_(clean_lost=5, counted_calm=2), slice_(2, clean_foreign=1),
                                               slice_(3, clean_errors=1), slice_(4, settled=False)],
                        deaths=[{"kind": "native", "daemon": "rrp", "rc": -11, "t": 42.0, "log": "Segmentation"}])
        failures = soak.evaluate(broken, LIMITS)
        self.assertTrue(all(line.startswith("FAIL ") for line in failures), failures)
        text = "\n".join(failures)
        for expected in ("rrp: died unexpectedly (rc=-11)", "native_entries=3", "descriptors grow",
                         "RSS grows", "5 GRE lost in rounds without link trouble, only 2 counted",
                         "not its echo", "control error(s)", "did not settle"):
            self.assertIn(expected, text)
        self.assertEqual(len(failures), 8, text)

    def test_counter_drift_at_the_lrp_fails(self):
        failures = soak.evaluate(report(drift=-3), LIMITS)
        self.assertEqual(len(failures), 1, failures)
        self.assertIn("counters drift: the clients sent 600 GRE, the LRP counted 597 in and 0 dropped before a "
                      "session (+3)", failures[0])
        # dropped before a session (unknown call ID, the GRE port's reasons) is counted too
        ok = report(drift=-3)
        ok["daemons"]["native"]["lrp"][0]["samples"][-1].update(drops={"gre_unknown_call_id": 2, "mux_detached": 9},
                                                                port_dropped={"not_local": 1})
        self.assertEqual(soak.evaluate(ok, LIMITS), [])

    def test_lost_gre_counted_as_drops_passes(self):
        self.assertEqual(soak.evaluate(report(slices=[slice_(clean_lost=5, counted_calm=5)]), LIMITS), [])

    def test_log_tracebacks_fail(self):
        inc = incarnation(flat())
        inc.update(log_problems=2, log_first_problem="Traceback (most recent call last): boom")
        self.assertIn("2 traceback(s)", "\n".join(soak.evaluate(report(rrp=[inc]), LIMITS)))


class CommandTests(unittest.SynchronousTestCase):
    def check(self, data, *args):
        path = os.path.join(tempfile.mkdtemp(prefix="soak-test-"), "report.json")
        with open(path, "w") as f:
            json.dump(data, f)
        out = io.StringIO()
        with redirect_stdout(out):
            rc = soak.main(["--check", path, *args])
        return rc, out.getvalue()

    def test_check_passes_a_clean_report_and_prints_the_table(self):
        rc, out = self.check(report())
        self.assertEqual(rc, 0, out)
        self.assertIn("| native |", out)
        self.assertIn("LRP RSS growth after warm-up", out)
        self.assertIn("soak: PASS", out)

    def test_check_fails_a_leaking_report_and_thresholds_are_options(self):
        leaking = report(lrp=[incarnation(flat(growth_kib_per_min=1024))])
        rc, out = self.check(leaking)
        self.assertEqual(rc, 1, out)
        self.assertIn("FAIL native lrp: RSS grows 60.0 MiB/h", out)
        rc, out = self.check(leaking, "--rss-growth", "100")
        self.assertEqual(rc, 0, out)


class ProcTests(unittest.SynchronousTestCase):
    def test_memory_split_and_descriptors_of_this_process(self):
        heap, anon = soak.memory_split(os.getpid())
        self.assertGreater(heap + anon, 0)
        self.assertLess(heap + anon, soak.daemons.rss_kib(os.getpid()) + 1)
        self.assertGreater(soak.fd_count(os.getpid()), 2)
        self.assertEqual(soak.memory_split(2 ** 22 + 1), (None, None))   # no such process
