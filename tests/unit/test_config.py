"""Options and INI files of both daemons, and their registration with twistd."""
import ipaddress
import os
import subprocess
import sys

from twisted.python import usage
from twisted.trial import unittest

from routeproxy import lrp_tap, rrp_tap
from routeproxy.config import Profile, parseHostPort

from tests.support.options import CA, LRP_REQUIRED, LRP_TLS, RRP_REQUIRED, RRP_TLS, parse


class HostPortTests(unittest.SynchronousTestCase):
    def test_forms(self):
        self.assertEqual(parseHostPort("1.2.3.4:99"), ("1.2.3.4", 99))
        self.assertEqual(parseHostPort("[::1]:99"), ("::1", 99))
        self.assertEqual(parseHostPort("h", 1723), ("h", 1723))

    def test_errors(self):
        for bad in ("h", "h:0", "h:65536", "h:x", ":5"):
            self.assertRaises(usage.UsageError, parseHostPort, bad)


class LRPOptionsTests(unittest.SynchronousTestCase):
    def test_defaults(self):
        options = parse(lrp_tap.Options, LRP_REQUIRED)
        self.assertEqual(options["pptp-listen"], ("0.0.0.0", 1723))
        self.assertEqual(options["rrp"], [("rrp.test", 4443)])
        self.assertEqual(options["profile"], "default")
        self.assertIsNone(options["allow"])

    def test_several_rrps_and_link_settings(self):
        options = parse(lrp_tap.Options, LRP_REQUIRED + ["--rrp", "second.test:4443",
                                                         "--resume-grace", "12.5", "--dead-timeout", "6"])
        self.assertEqual(options["rrp"], [("rrp.test", 4443), ("second.test", 4443)])
        self.assertEqual((options["resume-grace"], options["dead-timeout"]), (12.5, 6.0))
        defaults = parse(lrp_tap.Options, LRP_REQUIRED)
        self.assertEqual((defaults["resume-grace"], defaults["dead-timeout"]), (30.0, 8.0))
        for bad in (["--resume-grace", "-1"], ["--dead-timeout", "1"], ["--resume-grace", "soon"]):
            self.assertRaises(usage.UsageError, parse, lrp_tap.Options, LRP_REQUIRED + bad)

    def test_allow_repeatable(self):
        options = parse(lrp_tap.Options, LRP_REQUIRED + ["--allow", "10.0.0.0/8", "--allow", "192.0.2.7"])
        self.assertEqual(options["allow"], [ipaddress.ip_network("10.0.0.0/8"),
                                            ipaddress.ip_network("192.0.2.7/32")])

    def test_missing_required(self):
        e = self.assertRaises(usage.UsageError, parse, lrp_tap.Options, ["--rrp", "x:1"])
        self.assertIn("--rrp-name", str(e))
        self.assertNotIn("--rrp,", str(e))

    def test_ini_and_precedence(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[lrp]\nrrp = file.test:1\nrrp-name = file.test\ncert = c\nkey = k\nca = a\n"
                    "allow = 10.0.0.0/8, 172.16.0.0/12\nprofile = fromfile\n")
        options = parse(lrp_tap.Options, ["--config", path, "--rrp", "cli.test:2"] + LRP_TLS)
        self.assertEqual(options["rrp"], [("cli.test", 2)])         # command line wins
        self.assertEqual(options["rrp-name"], "file.test")          # file fills the rest
        self.assertEqual(options["profile"], "fromfile")
        self.assertEqual(len(options["allow"]), 2)

    def test_unknown_ini_key(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[lrp]\nrpp = typo:1\n")
        e = self.assertRaises(usage.UsageError, parse, lrp_tap.Options, ["--config", path])
        self.assertIn("unknown key 'rpp'", str(e))

    def test_missing_file_and_section(self):
        e = self.assertRaises(usage.UsageError, parse, lrp_tap.Options, ["--config", "/nonexistent.ini"])
        self.assertIn("/nonexistent.ini", str(e))
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[rrp]\nlisten = x:1\n")
        e = self.assertRaises(usage.UsageError, parse, lrp_tap.Options, ["--config", path])
        self.assertIn("no [lrp] section", str(e))


class RRPOptionsTests(unittest.SynchronousTestCase):
    def test_profiles(self):
        options = parse(rrp_tap.Options, RRP_REQUIRED + [
            "--pptp-server", "10.0.0.1", "--profile", "b=10.0.0.2:1724", "--profile", "c=h"])
        self.assertEqual(options["profiles"], {
            "default": Profile("10.0.0.1", 1723), "b": Profile("10.0.0.2", 1724), "c": Profile("h", 1723)})
        self.assertEqual({p.callsPerConnection for p in options["profiles"].values()}, {1})

    def test_calls_per_connection(self):
        options = parse(rrp_tap.Options, RRP_REQUIRED + [
            "--profile", "pptpd=10.0.0.2,calls-per-connection=1",
            "--profile", "accel=10.0.0.3:1724, calls-per-connection = 0"])
        self.assertEqual(options["profiles"], {"pptpd": Profile("10.0.0.2", 1723, 1),
                                               "accel": Profile("10.0.0.3", 1724, 0)})
        for bad, text in (("a=h,calls-per-connection=-1", "must be at least 0"),
                          ("a=h,calls-per-connection=x", "not a whole number"),
                          ("a=h,calls=2", "unknown setting 'calls=2'")):
            e = self.assertRaises(usage.UsageError, parse, rrp_tap.Options, RRP_REQUIRED + ["--profile", bad])
            self.assertIn(text, str(e))

    def test_calls_per_connection_in_ini(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[rrp]\npptp-server = 10.0.0.1\nprofile = a=10.0.0.2,calls-per-connection=0, b=10.0.0.3\n"
                    "  c=10.0.0.4:1724,calls-per-connection=2\n")
        options = parse(rrp_tap.Options, ["--config", path] + RRP_REQUIRED)
        self.assertEqual(options["profiles"], {
            "default": Profile("10.0.0.1"), "a": Profile("10.0.0.2", 1723, 0),
            "b": Profile("10.0.0.3", 1723, 1), "c": Profile("10.0.0.4", 1724, 2)})

    def test_needs_a_server(self):
        e = self.assertRaises(usage.UsageError, parse, rrp_tap.Options, RRP_REQUIRED)
        self.assertIn("no PPTP server", str(e))

    def test_bad_tls_files_are_one_line(self):
        e = self.assertRaises(usage.UsageError, parse, rrp_tap.Options,
                              ["--pptp-server", "h", "--cert", "/nonexistent.crt", "--key", "k", "--ca", CA])
        self.assertIn("/nonexistent.crt", str(e))
        self.assertNotIn("\n", str(e))

    def test_max_sessions(self):
        options = parse(rrp_tap.Options, RRP_REQUIRED + ["--pptp-server", "h", "--max-sessions", "10000"])
        self.assertEqual(options["max-sessions"], 10000)
        self.assertRaises(usage.UsageError, parse, rrp_tap.Options,
                          RRP_REQUIRED + ["--pptp-server", "h", "--max-sessions", "many"])

    def test_gre_max_sojourn(self):
        base = RRP_REQUIRED + ["--pptp-server", "h"]
        self.assertEqual(parse(rrp_tap.Options, base)["gre-max-sojourn"], 0.005)
        self.assertEqual(parse(rrp_tap.Options, base + ["--gre-max-sojourn", "2.5"])["gre-max-sojourn"], 0.0025)
        self.assertEqual(parse(rrp_tap.Options, base + ["--gre-max-sojourn", "0"])["gre-max-sojourn"], 0.0)
        for bad in ("-1", "soon"):
            e = self.assertRaises(usage.UsageError, parse, rrp_tap.Options, base + ["--gre-max-sojourn", bad])
            self.assertIn("--gre-max-sojourn", str(e))

    def test_bad_profile(self):
        self.assertRaises(usage.UsageError, parse, rrp_tap.Options, RRP_REQUIRED + ["--profile", "nohost"])

    def test_sample_files_parse(self):
        etc = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "etc")
        lrp = parse(lrp_tap.Options, ["--config", os.path.join(etc, "routeproxy-lrp.ini")] + LRP_TLS)
        self.assertEqual(lrp["pptp-listen"], ("0.0.0.0", 1723))
        rrp = parse(rrp_tap.Options, ["--config", os.path.join(etc, "routeproxy-rrp.ini")] + RRP_TLS)
        self.assertIn("lab", rrp["profiles"])


class TwistdTests(unittest.TestCase):
    """The plugins as a user meets them: through the twistd command."""

    def twistd(self, *args):
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        return subprocess.run([twistd, *args], capture_output=True, text=True, timeout=60)

    def test_help_lists_both(self):
        out = self.twistd("--help").stdout
        self.assertIn("routeproxy-lrp", out)
        self.assertIn("routeproxy-rrp", out)

    def test_bad_option_is_one_line(self):
        result = self.twistd("-n", "routeproxy-rrp", "--listen", "nowhere")
        text = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("--listen 'nowhere': expected HOST:PORT", text)
        self.assertNotIn("Traceback", text)


class MakeServiceTests(unittest.SynchronousTestCase):
    """The service trees twistd builds, on a memory reactor (nothing is started)."""

    def test_lrp(self):
        from twisted.internet.testing import MemoryReactorClock

        options = parse(lrp_tap.Options, LRP_REQUIRED + ["--pptp-listen", "127.0.0.1:11723"])
        top = lrp_tap.makeService(options, reactor=MemoryReactorClock())
        self.assertEqual(len(list(top)), 3)   # GRE port, link to the RRP, PPTP listener (the top stops the link)
        self.assertEqual(top.lrp.relay.grePort.localAddresses, ["127.0.0.1"])

    def test_rrp(self):
        from twisted.internet.testing import MemoryReactorClock

        options = parse(rrp_tap.Options, RRP_REQUIRED + ["--pptp-server", "10.0.0.1", "--source", "127.0.0.2"])
        top = rrp_tap.makeService(options, reactor=MemoryReactorClock())
        self.assertEqual(len(list(top)), 2)   # GRE port, TLS listener (the top stops the links)
        self.assertEqual(top.rrp.profiles, {"default": Profile("10.0.0.1", 1723)})
        tls_server = [s for s in top if s.__class__.__name__ == "PausingTCPServer"][0]
        # the mux factory, under TLS, under the gate for connections not through TLS yet
        config = tls_server.args[1].wrappedFactory.wrappedFactory.config
        self.assertEqual(config.maxSessions, 20000)
        self.assertEqual(config.linkMaxSojourn, 0.005)   # the links' receive gate, by default
        self.assertEqual(top.rrp.relay.grePort.localAddresses, ["127.0.0.2"])

    def test_link_gate_option(self):
        """--link-max-sojourn MS reaches the links' config in seconds (0: off) on both."""
        from twisted.internet.testing import MemoryReactorClock

        for ms, seconds in (("7", 0.007), ("0", 0.0)):
            options = parse(rrp_tap.Options, RRP_REQUIRED + ["--pptp-server", "10.0.0.1",
                                                             "--link-max-sojourn", ms])
            top = rrp_tap.makeService(options, reactor=MemoryReactorClock())
            tls_server = [s for s in top if s.__class__.__name__ == "PausingTCPServer"][0]
            self.assertEqual(tls_server.args[1].wrappedFactory.wrappedFactory.config.linkMaxSojourn,
                             seconds)
            lrp = parse(lrp_tap.Options, LRP_REQUIRED + ["--link-max-sojourn", ms])
            self.assertEqual(lrp["limits"].linkMaxSojourn, seconds)
        with self.assertRaises(usage.UsageError):
            parse(rrp_tap.Options, RRP_REQUIRED + ["--link-max-sojourn", "-1"])


class SamplesTests(unittest.SynchronousTestCase):
    def test_every_setting_in_the_samples_and_docs(self):
        """etc/*.ini shows every key (set or commented) and docs/daemons.md every option."""
        import re
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(os.path.join(root, "docs", "daemons.md")) as f:
            docs = f.read()
        for tap, name in ((lrp_tap, "routeproxy-lrp.ini"), (rrp_tap, "routeproxy-rrp.ini")):
            with open(os.path.join(root, "etc", name)) as f:
                keys = set(re.findall(r"^#? ?([a-z-]+) =", f.read(), re.M))
            for setting in tap.Options.settings:
                self.assertIn(setting.name, keys, name)
                self.assertIn(f"`--{setting.name}", docs)
