"""Start-up as an operator meets it, through the twistd command: one test per class of fatal
start-up error (non-zero exit, one line naming the option, no traceback), --check,
--version, ``--log-format json``, and ``routeproxy demo --help``.

Real processes: twistd with the plugins, as installed.  The classes that open the GRE
capture first (a port in use, a bad --gre-interface) give their own line only as root;
without root the capture fails first, which is itself one line, so those tests check the
line they can reach.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile

from twisted.trial import unittest

from tests.support.options import CA, LRP_REQUIRED, LRP_TLS, RRP_TLS

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
ROOT = os.geteuid() == 0


def twistd(*args, logfile=None, prefix=()):
    argv = [*prefix, TWISTD, "-n", "--pidfile="] + ([f"--logfile={logfile}"] if logfile else []) + list(args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


class StartupErrorTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="routeproxy-startup-")
        self.log = os.path.join(self.dir, "daemon.log")

    def assertOneLine(self, result, *fragments):
        """Exit status 1, exactly one line on stderr holding *fragments*, nothing on stdout,
        no traceback in the output or the log."""
        self.assertEqual(result.returncode, 1, result.stderr)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        for fragment in fragments:
            self.assertIn(fragment, lines[0])
        self.assertEqual(result.stdout, "")
        log = open(self.log).read() if os.path.exists(self.log) else ""
        self.assertNotIn("Traceback", result.stderr + log)
        return lines[0]

    def rrp(self, *more):
        return twistd("routeproxy-rrp", *RRP_TLS, "--pptp-server", "127.0.0.1", *more, logfile=self.log)

    def test_usage_error(self):
        line = self.assertOneLine(self.rrp("--listen", "nowhere"), "--listen 'nowhere'", "see --help")
        self.assertTrue(line.startswith("routeproxy-rrp: "))

    def test_name_or_ipv6_listen_address(self):
        for address in ("pptp.example:1723", "[::1]:1723"):
            self.assertOneLine(twistd("routeproxy-lrp", *LRP_REQUIRED, "--pptp-listen", address),
                               "--pptp-listen", "IPv4")

    def test_broken_config_file_names_the_line(self):
        path = os.path.join(self.dir, "bad.ini")
        with open(path, "w") as f:
            f.write("[rrp]\npptp-server = 127.0.0.1\nthis is not a key\n")
        self.assertOneLine(self.rrp("--config", path), f"--config {path} line 3")

    def test_unreadable_certificate(self):
        self.assertOneLine(twistd("routeproxy-rrp", "--cert", "/nonexistent.crt", "--key", "x",
                                  "--ca", CA, "--pptp-server", "127.0.0.1"), "/nonexistent.crt")

    def test_port_in_use(self):
        if not ROOT:
            raise unittest.SkipTest("the GRE capture opens first and needs root")
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        self.assertOneLine(self.rrp("--listen", f"127.0.0.1:{port}", "--source", "127.0.0.1",
                                    "--gre-interface", "lo"),
                           f"--listen 127.0.0.1:{port}", "Address already in use", "choose another port")

    def test_capture_cannot_open(self):
        """A missing interface as root; without root, the missing privilege: one line either way."""
        result = self.rrp("--listen", "127.0.0.1:1", "--source", "127.0.0.1", "--gre-interface", "nosuch0")
        self.assertOneLine(result, "cannot start: --gre-interface",
                           "no such interface" if ROOT else "CAP_NET_RAW")

    def test_without_capabilities(self):
        """Started with no capability at all (setpriv, SECBIT_NOROOT: uid 0 gains none), as a
        user without CAP_NET_RAW would be: one line naming the capability."""
        import shutil
        if not ROOT or shutil.which("setpriv") is None:
            raise unittest.SkipTest("needs root and setpriv to take the capabilities away")
        none = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all",
                "--securebits=+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked"]
        result = twistd("routeproxy-rrp", *RRP_TLS, "--pptp-server", "127.0.0.1", "--listen", "127.0.0.1:1",
                        "--source", "127.0.0.1", "--gre-interface", "lo", logfile=self.log, prefix=none)
        self.assertOneLine(result, "cannot start: --gre-interface", "CAP_NET_RAW")

    def test_check_config(self):
        ok = twistd("routeproxy-lrp", *LRP_REQUIRED, "--check")
        self.assertEqual((ok.returncode, ok.stdout), (0, "routeproxy-lrp: configuration OK\n"))
        bad = twistd("routeproxy-lrp", *LRP_TLS, "--check")
        self.assertEqual(bad.returncode, 1)
        self.assertIn("missing required option(s): --rrp, --rrp-name", bad.stderr)

    def test_version(self):
        from routeproxy import __version__
        result = twistd("routeproxy-lrp", "--version")
        self.assertEqual(result.returncode, 0)
        self.assertTrue(result.stdout.startswith(f"routeproxy {__version__} (Twisted "), result.stdout)

    def test_json_log(self):
        """--log-format json: every line of the log is a JSON event (twisted.logger's)."""
        result = twistd("--logfile", self.log, "routeproxy-rrp", *RRP_TLS, "--pptp-server", "127.0.0.1",
                        "--listen", "127.0.0.1:1", "--source", "127.0.0.1", "--gre-interface", "nosuch0",
                        "--log-format", "json")
        self.assertEqual(result.returncode, 1)
        with open(self.log) as f:
            events = [json.loads(line) for line in f if line.strip()]
        self.assertTrue(any(e.get("log_format", "").startswith("twistd ") for e in events), events)
        self.assertTrue(any(e.get("log_level", {}).get("name") == "critical" and "cannot start" in
                            e.get("log_format", "") for e in events), events)

    def test_demo_help_does_not_start_the_lab(self):
        result = subprocess.run([sys.executable, "-m", "routeproxy", "demo", "--help"],
                                capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 0)
        self.assertIn("usage: python -m routeproxy demo", result.stdout)
