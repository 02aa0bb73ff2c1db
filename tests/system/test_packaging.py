"""`pip install .` and `pip install -e .` (setuptools' default editable mode, no
--config-settings) each give twistd both plugins, and the native data plane built
(setup.py's cffi_modules: the daemons' default capture is native where it loads).  Each builds a fresh venv from the
package index pip is configured with here (about 25 s each); no root needed.
"""
import os
import shutil
import subprocess
import sys
import tempfile

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class InstallTests(unittest.TestCase):
    timeout = 300

    def install(self, *spec):
        venv = tempfile.mkdtemp(prefix="routeproxy-pip-")
        self.addCleanup(shutil.rmtree, venv, True)
        python = getattr(sys, "_base_executable", None) or sys.executable
        # Nothing of this process's environment may show the checkout or its venv.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        subprocess.run([python, "-m", "venv", venv], check=True, timeout=120, env=env)
        result = subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", *spec],
                                capture_output=True, text=True, timeout=240, env=env)
        if result.returncode != 0:
            raise unittest.SkipTest(f"pip cannot install here: {result.stderr.strip()[-300:]}")
        # Elsewhere than the checkout, so only what was installed can be found.
        native = subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                                 "from routeproxy import native; print(native.load()[1] or 'loaded')"],
                                capture_output=True, text=True, timeout=60, cwd=venv, env=env)
        self.assertEqual((native.returncode, native.stdout.strip()), (0, "loaded"), native.stderr)
        return subprocess.run([os.path.join(venv, "bin", "twistd"), "--help"], capture_output=True,
                              text=True, timeout=60, cwd=venv, env=env)

    def assertPlugins(self, result):
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("routeproxy-lrp", result.stdout)
        self.assertIn("routeproxy-rrp", result.stdout)

    def test_install(self):
        self.assertPlugins(self.install(ROOT))

    def test_editable_install(self):
        self.assertPlugins(self.install("-e", ROOT))
