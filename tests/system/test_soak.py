"""Smoke test of ``python -m benchmarks.soak`` (docs/soak.md): a 20-second run through real
daemons, both capture kinds, with link trouble, as a user runs it; then its report judged
again with a leak and a leftover flow entry put in, which must fail.

Needs root (namespaces, raw sockets) and the built routeproxy.native; skipped otherwise.
"""
import copy
import json
import os
import subprocess
import sys
import tempfile

from twisted.trial import unittest

from routeproxy import native
from tests.support import daemons, netns

SECONDS = 20


class SoakSmokeTests(unittest.TestCase):
    timeout = 240

    def setUp(self):
        netns.skip_unless_available()
        missing = daemons.daemons_missing()
        if missing:
            raise unittest.SkipTest(missing)
        module, reason = native.load()
        if module is None:
            raise unittest.SkipTest(reason)
        self.dir = tempfile.mkdtemp(prefix="soak-smoke-")

    def soak(self, *args):
        return subprocess.run([sys.executable, "-m", "benchmarks.soak", *args], capture_output=True, text=True,
                              cwd=daemons.REPO, env=daemons.child_env(), timeout=200)

    def test_short_run_and_its_checks(self):
        out = os.path.join(self.dir, "soak.json")
        done = self.soak("--minutes", str(SECONDS / 60), "--clients", "2", "--slice", "10", "--cut-every", "4",
                         "--cuts", "reset,restart", "--out", out)
        self.assertIn(done.returncode, (0, 1), done.stderr[-3000:])
        with open(out) as f:
            report = json.load(f)
        # the report's structure: both kinds, slices in turn, samples, cuts, the table's figures
        self.assertEqual(sorted(report["daemons"]), ["native", "pcap"])
        self.assertEqual([s["kind"] for s in report["slices"]], ["native", "pcap"])
        for kind in ("native", "pcap"):
            self.assertEqual(sorted(report["daemons"][kind]), ["lrp", "rrp"])
            summary = report["summary"][kind]
            self.assertGreater(summary["sessions"], 0, summary)
            self.assertGreater(summary["echoed"], 0, summary)
            self.assertGreaterEqual(sum(summary["cuts"].values()), 1, summary)
            for name in ("lrp", "rrp"):
                figures = summary["daemons"][name]
                self.assertGreater(figures["rss_end"], 0)
                self.assertGreater(figures["fds_end"], 0)
            lrp_end = summary["daemons"]["lrp"]["entries_end"]
            self.assertEqual(lrp_end, 0 if kind == "native" else None, summary["daemons"]["lrp"])
        self.assertIn("| LRP flow entries left at the end", done.stdout)
        # the verdict and the exit status agree; no daemon died, nothing was left behind
        self.assertEqual(done.returncode, 0 if report["ok"] else 1, report["failures"])
        self.assertEqual(report["deaths"], [], done.stdout[-3000:])
        self.assertFalse([line for line in report["failures"] if "left after" in line], report["failures"])
        self.assertIn("soak: PASS" if report["ok"] else "check(s) failed", done.stdout)

        # the same report with a leaking LRP and a flow entry left: judged again, it fails
        bad = copy.deepcopy(report)
        lrp = bad["daemons"]["native"]["lrp"][0]
        quiet = [s for s in lrp["samples"] if s["phase"] == "quiet"]
        for n, s in enumerate(quiet):
            s["t"] = lrp["started"] + 40 * n           # quiet samples 40 s apart ...
            s["rss_kib"] = 80_000 + 4096 * n          # ... 4 MiB more each: 360 MiB/h
        quiet[-1]["native_entries"] = 2
        while len(quiet) < 4:   # enough quiet samples after the warm-up for a verdict
            extra = dict(quiet[-1], t=quiet[-1]["t"] + 40, rss_kib=quiet[-1]["rss_kib"] + 4096)
            lrp["samples"].append(extra)
            quiet.append(extra)
        path = os.path.join(self.dir, "bad.json")
        with open(path, "w") as f:
            json.dump(bad, f)
        judged = self.soak("--check", path, "--warmup", "0", "--min-span", "60")
        self.assertEqual(judged.returncode, 1, judged.stdout[-3000:])
        self.assertIn("FAIL native lrp: RSS grows", judged.stdout)
        self.assertIn("native_entries=2", judged.stdout)
