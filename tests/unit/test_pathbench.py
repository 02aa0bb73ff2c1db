"""benchmarks/pathbench.py still runs against the daemons as they are (a tiny run, in memory):
it drives them through their real APIs, so a change there must not break it silently."""
import os
import subprocess
import sys

from twisted.trial import unittest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PathbenchRunsTests(unittest.TestCase):
    def test_every_packet_crosses_both_ways(self):
        result = subprocess.run([sys.executable, "-m", "benchmarks.pathbench", "--packets", "200",
                                 "--repeat", "1", "--no-tls"], capture_output=True, text=True,
                                timeout=120, cwd=REPO)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        whole = [line for line in result.stdout.splitlines() if "whole path, in memory, " in line]
        self.assertEqual(len(whole), 2, result.stdout)
        for line in whole:
            self.assertIn("(200/200 delivered", line)
