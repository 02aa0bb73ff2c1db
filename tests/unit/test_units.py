"""etc/systemd units: `systemd-analyze verify` accepts them, and they grant only what the
daemons need (the system test tests/system/test_service.py runs the daemons with exactly
those capabilities)."""
import os
import shutil
import subprocess
import sys
import tempfile

from twisted.trial import unittest

UNITS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "etc", "systemd")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class UnitTests(unittest.TestCase):
    def units(self):
        return sorted(name for name in os.listdir(UNITS) if name.endswith(".service"))

    def test_systemd_analyze_verify(self):
        if shutil.which("systemd-analyze") is None:
            raise unittest.SkipTest("systemd-analyze is not installed (apt: systemd)")
        work = tempfile.mkdtemp(prefix="routeproxy-units-")
        paths = []
        for name in self.units():
            with open(os.path.join(UNITS, name)) as f:   # this checkout's twistd for /usr/bin's
                text = f.read().replace("/usr/bin/twistd", TWISTD)
            paths.append(os.path.join(work, name))
            with open(paths[-1], "w") as f:
                f.write(text)
        result = subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True, text=True,
                                timeout=60)
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    def test_only_the_needed_capabilities(self):
        self.assertEqual(self.units(), ["routeproxy-lrp.service", "routeproxy-lrp@.service",
                                         "routeproxy-rrp.service", "routeproxy-rrp@.service"])
        for name in self.units():
            with open(os.path.join(UNITS, name)) as f:
                lines = dict(line.split("=", 1) for line in f.read().splitlines()
                             if "=" in line and not line.startswith("#"))
            self.assertEqual(lines["AmbientCapabilities"], "CAP_NET_RAW CAP_NET_BIND_SERVICE")
            self.assertEqual(lines["CapabilityBoundingSet"], lines["AmbientCapabilities"])
            self.assertEqual(lines["User"], "routeproxy")
            self.assertEqual(lines["Restart"], "on-failure")
            self.assertIn("-HUP", lines["ExecReload"])
            self.assertIn("--check", lines["ExecStartPre"])
            self.assertIn("LimitNOFILE", lines)
            if "@" in name:   # a shard template (docs/multiworker.md): the instance is the shard
                self.assertIn("--shard %i/${SHARDS}", lines["ExecStart"])
                self.assertIn("--shard %i/${SHARDS}", lines["ExecStartPre"])
