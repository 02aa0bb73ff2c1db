"""The short fuzz pass of ``make test``: each harness of tests/fuzz over its seeds and
mutations of them (no atheris needed), and, when atheris is installed, a few thousand
coverage-guided runs of each.  Longer runs: docs/limits.md."""
import importlib.util
import random
import subprocess
import sys

from twisted.trial import unittest

from tests.fuzz.harnesses import HARNESSES, Finding, mutate, seeds
from tests.support.daemons import REPO, child_env

ROUNDS = 600


class FuzzPassTests(unittest.SynchronousTestCase):
    def test_harnesses_over_seeds_and_mutations(self):
        rng = random.Random(2026)
        corpus = seeds()
        for name, harness in HARNESSES.items():
            for n in range(ROUNDS):
                data = corpus[n % len(corpus)] if n < len(corpus) else mutate(rng.choice(corpus), rng)
                harness(data)

    def test_a_finding_is_reported(self):
        """The guard fails on an exception the code under test should not raise."""
        from tests.fuzz.harnesses import _guard
        self.assertRaises(Finding, _guard, (ValueError,), lambda data: data.nope, b"x")

    def test_atheris_short_run(self):
        if importlib.util.find_spec("atheris") is None:
            raise unittest.SkipTest("atheris is not installed (pip install atheris)")
        for name in HARNESSES:
            result = subprocess.run([sys.executable, "-m", "tests.fuzz", name, "-atheris_runs=1000"],
                                    cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
            self.assertEqual(result.returncode, 0, f"{name}: {result.stderr[-3000:]}")
