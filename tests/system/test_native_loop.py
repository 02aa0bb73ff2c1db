"""``--data-plane loop`` end to end (docs/fastpath.md step 5): the daemons as users start them
(tests/support/e2e.py), scripted clients and server, GRE both ways through the reactor's poll
in C on both daemons, the link lost and back under it.  Needs root and the built
routeproxy.native.
"""
import time

from routeproxy import native
from tests.support import e2e
from tests.support.wait import wait_until
from tests.system.test_e2e import E2ETestCase

CLIENTS = 4
PACKETS = 20
STATUS_PORT = 8096
LOOP = ["--gre-capture", "native", "--data-plane", "loop"]


class LoopTests(E2ETestCase):
    timeout = 120

    def setUp(self):
        module, reason = native.load()
        if module is None:
            self.skipTest(reason)

    def test_gre_both_ways_in_the_loop_and_a_link_loss(self):
        topo = self.topology(CLIENTS)
        with topo.logs_on_failure():
            e2e.make_certs(topo, ["lrp0"])
            server = e2e.start_server(topo)
            rrp = e2e.start_rrp(topo, status_port=STATUS_PORT, extra=LOOP)
            lrp = e2e.start_lrp(topo, status_port=STATUS_PORT, extra=LOOP)
            target = f"{lrp.address}:{e2e.PPTP_PORT}"
            for round in (1, 2):
                reports = e2e.run_clients(topo, target, call_id=1, packets=PACKETS)
                self.assertAllEchoed(reports, PACKETS)   # intact both ways
                self.waitForCalls(topo, [rrp, lrp], 0)
                self.assertEqual(server.status()["gre_echoed"], round * CLIENTS * PACKETS)
                # counted as the Python path counts them; each daemon's wake-ups in C
                for daemon, rounds in ((lrp, round), (rrp, 1)):   # (the RRP restarted)
                    status = daemon.status()
                    port, totals = status["gre_port"], status["totals"]
                    self.assertEqual(port["delivered"], rounds * CLIENTS * PACKETS, port)
                    self.assertEqual(port["sent"], rounds * CLIENTS * PACKETS, port)
                    self.assertEqual(totals["gre_packets_in"], totals["gre_packets_out"])
                    self.assertEqual(port["native"]["entries"], 0, port)
                    self.assertGreater(port["loop"]["wake_ups"], 0, port["loop"])
                    self.assertIsNone(daemon.proc.poll())
                if round == 2:
                    break
                # the link lost and back: the loop stops with it and goes on over the new one
                rrp.stop()
                wait_until(lambda: not lrp.status()["links"] or not lrp.status()["links"][0]["up"],
                           15, "the LRP to see its link down")
                time.sleep(0.5)
                rrp = e2e.start_rrp(topo, status_port=STATUS_PORT, extra=LOOP)
                wait_until(lambda: any(link["up"] for link in lrp.status()["links"]), 30,
                           "the LRP's link back up")

    def test_the_default_is_the_loop_where_the_capture_is_native(self):
        """No option: the loop on both daemons (auto); with the Python capture (pcap) the
        default says nothing about the data plane, and GRE takes Python's path."""
        topo = self.topology(CLIENTS)
        with topo.logs_on_failure():
            e2e.make_certs(topo, ["lrp0"])
            e2e.start_server(topo)
            rrp = e2e.start_rrp(topo, status_port=STATUS_PORT)
            lrp = e2e.start_lrp(topo, status_port=STATUS_PORT, extra=["--gre-capture", "pcap"])
            reports = e2e.run_clients(topo, f"{lrp.address}:{e2e.PPTP_PORT}", call_id=1,
                                      packets=PACKETS)
            self.assertAllEchoed(reports, PACKETS)
            self.assertGreater(rrp.status()["gre_port"]["loop"]["wake_ups"], 0)
            self.assertNotIn("loop", lrp.status()["gre_port"])
            with open(lrp.log_path) as f:
                self.assertNotIn("data-plane", f.read())
