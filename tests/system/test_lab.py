"""The lab: real pptp-linux + pppd clients and real pptpd inside user-mode Linux.

Nothing here is faked: each UML test boots a kernel, builds the namespaces and
runs MS-CHAPv2 + MPPE-128 sessions.  The baselines show the problem the product
solves (through a MASQUERADE NAT that passes only TCP nobody connects; with the
kernel's pptp helper and GRE allowed everyone does); the proxy tests show the
LRP and RRP carrying the same clients through that same NAT.
Skipped where linux.uml (Debian's user-mode-linux) is not installed.
"""
import os
import time

from twisted.trial import unittest

from routeproxy.lab import cli, topology, uml

UML_MISSING = uml.uml_available()
CLIENTS = 4
TRANSFER_MB = 20      # the acceptance size, over the proxy
BASELINE_MB = 4       # enough to prove the measurement on the kernel path (20 MiB: docs/lab.md)


class ScriptTests(unittest.SynchronousTestCase):
    """The generated payload and the parsing of its output (no UML needed)."""

    def test_unknown_mode(self):
        e = self.assertRaises(topology.LabScriptError, topology.build_script, "bridge", 2)
        self.assertIn("unknown mode 'bridge'", str(e))

    def test_client_count_bounds(self):
        self.assertRaises(topology.LabScriptError, topology.build_script, "direct", 0)
        self.assertRaises(topology.LabScriptError, topology.build_script, "direct", 91)

    def test_nat_drops_gre_and_helper_only_where_asked(self):
        nat = topology.build_script("nat", 2)
        helper = topology.build_script("nat-helper", 2)
        direct = topology.build_script("direct", 2)
        self.assertIn("MASQUERADE", nat)
        self.assertIn("-p 47 -j DROP", nat)
        self.assertNotIn("--helper pptp", nat)
        self.assertIn("--helper pptp", helper)
        self.assertNotIn("-p 47 -j DROP", helper)
        self.assertNotIn("MASQUERADE", direct)
        self.assertNotIn("nf_nat_pptp", topology.lab_modules("nat"))
        self.assertIn("nf_nat_pptp", topology.lab_modules("nat-helper"))

    def test_proxy_clients_dial_the_lrp(self):
        script = topology.build_script("proxy", 2)
        self.assertIn(f'pty "pptp {topology.LRP_LAN} ', script)
        self.assertIn("routeproxy-lrp", script)
        self.assertIn("routeproxy-rrp", script)
        self.assertIn(f'pty "pptp {topology.SERVER} ', topology.build_script("nat", 2))

    def test_parse_results(self):
        output = ("noise\nLAB-TIME connected 8.22\n"
                  "LAB-RESULT client=c1 connected=yes addr=192.168.90.100 ping=yes rtt=0.874 tx=302 rx=302\n"
                  "LAB-RESULT client=c2 connected=no addr=- ping=no rtt=- tx=- rx=-\n"
                  "LAB-TRANSFER client=c1 bytes=20971520 seconds=20.6 sent=ab received=ab\n"
                  "LAB-TIME broken x\n")
        rows, transfers, times = topology.parse_results(output)
        self.assertEqual([r["connected"] for r in rows], ["yes", "no"])
        self.assertEqual(rows[0]["addr"], "192.168.90.100")
        self.assertEqual(transfers["c1"]["received"], "ab")
        self.assertEqual(times, {"connected": 8.22})

    def test_hangup_verdict(self):
        line = ("LAB-HANGUP client=c1 pptpd_calls_before=4 pptpd_calls_after=3 lrp_closed=1 "
                "others_ping=yes redial_addr=192.168.90.104 redial_ping=yes\n")
        result = uml.UMLResult(0, line, 1.0, 2.0, "")
        self.assertTrue(cli.LabRun("proxy", 4, result).hangup_ok())
        for bad in ("pptpd_calls_after=4", "lrp_closed=0", "others_ping=no", "redial_addr=-"):
            key = bad.split("=")[0]
            broken = " ".join(bad if w.startswith(key + "=") else w for w in line.split())
            self.assertFalse(cli.LabRun("proxy", 4, uml.UMLResult(0, broken, 1.0, 2.0, "")).hangup_ok(),
                             bad)
        self.assertIsNone(cli.LabRun("direct", 4, uml.UMLResult(0, "", 1.0, 2.0, "")).hangup)
        self.assertIn("kill $(pppd_pid 1)", topology.build_script("proxy", 2, hangup=True))

    def test_module_order_puts_dependencies_first(self):
        if uml.modules_version() is None:
            raise unittest.SkipTest("no UML modules installed")
        order = [os.path.basename(p) for p in uml.module_load_order(["ppp_mppe", "nf_nat_pptp"])]
        self.assertLess(order.index("ppp_generic.ko"), order.index("ppp_mppe.ko"))
        self.assertLess(order.index("nf_conntrack.ko"), order.index("nf_conntrack_pptp.ko"))
        self.assertLess(order.index("nf_conntrack_pptp.ko"), order.index("nf_nat_pptp.ko"))
        self.assertEqual(len(order), len(set(order)))
        self.assertRaises(uml.UMLError, uml.module_load_order, ["no_such_module"])


class UMLTests(unittest.SynchronousTestCase):
    """Booting UML itself: exit code, output, timeout."""

    skip = UML_MISSING

    def test_exit_code_and_output(self):
        code, output = uml.run_in_uml("echo inside $(uname -r); exit 7", timeout=60)
        self.assertEqual(code, 7)
        self.assertIn("inside " + uml.modules_version(), output)

    def test_hung_uml_is_killed(self):
        started = time.monotonic()
        self.assertRaises(uml.UMLTimeout, uml.run_in_uml, "sleep 600", timeout=8)
        self.assertLess(time.monotonic() - started, 30)


class LabTests(unittest.SynchronousTestCase):
    """Each mode once, K clients dialling at the same moment."""

    skip = UML_MISSING

    def lab(self, mode, clients=CLIENTS, **kw):
        started = time.monotonic()
        run = cli.run_lab(mode, clients, **kw)
        # the table is the product's output: print it into the test log with the time
        print(f"\n{cli.format_table(run)}\n[{mode}: {time.monotonic() - started:.1f} s]")
        self.assertEqual(len(run.rows), clients, run.result.output)
        return run

    def assertAllUp(self, run):
        self.assertEqual(run.connected, run.clients, cli.format_table(run))
        self.assertEqual(run.pinged, run.clients, cli.format_table(run))
        addrs = [r["addr"] for r in run.rows]
        self.assertEqual(len(set(addrs)), run.clients)
        for addr in addrs:
            self.assertTrue(addr.startswith("192.168.90."), addr)

    def assertTransfers(self, run):
        self.assertEqual(run.transfers_ok(), sorted(r["client"] for r in run.rows),
                         cli.format_table(run))
        for t in run.transfers.values():
            self.assertEqual(t["bytes"], t["received_bytes"])
            self.assertEqual(t["bytes"], t["sent_bytes"])

    def test_direct(self):
        self.assertAllUp(self.lab("direct"))

    def test_nat_without_helper_fails(self):
        """The problem: only TCP crosses a plain NAT, so no client gets a link."""
        run = self.lab("nat", connect_timeout=10)
        self.assertEqual(run.connected, 0, cli.format_table(run))
        self.assertEqual(run.pinged, 0)

    def test_nat_with_helper(self):
        run = self.lab("nat-helper", transfer_mb=BASELINE_MB)
        self.assertAllUp(run)
        self.assertTransfers(run)

    def test_proxy_through_the_same_nat(self):
        """The product: LRP -> TLS through the TCP-only NAT -> RRP -> pptpd.

        The clients keep pppd's default MTU of 1500, so every full GRE packet (~1550 bytes)
        reaches the LRP as two IP fragments, which it must reassemble (routeproxy/ipfrag.py).
        """
        run = self.lab("proxy", transfer_mb=TRANSFER_MB, hangup=True)
        self.assertAllUp(run)
        self.assertTrue(run.hangup_ok(), cli.format_table(run))
        self.assertTransfers(run)   # c1's second call carries its 20 MiB too
        self.assertEqual(len(run.sessions), CLIENTS, "the LRP did not log one closed session per client")

    def test_proxy_rrp_next_to_pptpd(self):
        """The RRP in pptpd's namespace, dialling it on 127.0.0.1; and a hang-up:
        pptpd and the LRP free c1's call, the others keep pinging, c1 dials again."""
        run = self.lab("proxy-colocated", hangup=True)
        self.assertAllUp(run)
        self.assertTrue(run.hangup_ok(), cli.format_table(run))
        self.assertEqual(run.hangup["pptpd_calls_before"], str(CLIENTS))


class KeepVisibleTests(unittest.SynchronousTestCase):
    """A checkout under /tmp (a CI clone) must stay visible under the guest's tmpfs."""

    def test_paths_under_covered_directories_are_bound_back(self):
        from routeproxy.lab.uml import _keep_visible

        before, after = _keep_visible(["/tmp/clone", "/tmp/clone/.venv", "/root/.pyenv"])
        self.assertEqual(before, "mkdir -p /run/keep/0 && mount --bind /tmp/clone /run/keep/0\n")
        self.assertEqual(after, "mkdir -p /tmp/clone && mount --bind /run/keep/0 /tmp/clone\n")
        self.assertEqual(_keep_visible(["/work/main", "/root/.pyenv"]), ("", ""))
