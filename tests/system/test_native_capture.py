"""``--gre-capture native`` end to end (docs/fastpath.md step 3, docs/gre-io.md): the daemons
as users start them (tests/support/e2e.py), scripted clients and server, GRE through the C
pumps and link reads.  Needs root and the built routeproxy.native.
"""
import sys
import time

from routeproxy import native
from tests.support import e2e
from tests.support.wait import wait_until
from tests.system.test_e2e import E2ETestCase

CLIENTS = 4
PACKETS = 20
STATUS_PORT = 8094
NATIVE = ["--gre-capture", "native"]

SEND_GRE = """
import socket, struct, sys
src, dst, key, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
s.bind((src, 0))
for i in range(n):
    payload = b"late" * 10
    s.sendto(struct.pack("!HHHHI", 0x3001, 0x880B, len(payload), key, 1000 + i) + payload, (dst, 0))
"""


class NativeCaptureTests(E2ETestCase):
    timeout = 120

    def setUp(self):
        module, reason = native.load()
        if module is None:
            self.skipTest(reason)

    def startAll(self, topo):
        """The server, the RRP, and the LRP with the native capture: (server, rrp, lrp)."""
        e2e.make_certs(topo, ["lrp0"])
        daemons = [e2e.start_server(topo), e2e.start_rrp(topo, status_port=STATUS_PORT)]
        return (*daemons, e2e.start_lrp(topo, status_port=STATUS_PORT, extra=NATIVE))

    def test_gre_through_the_pump_and_a_link_loss(self):
        topo = self.topology(CLIENTS)
        with topo.logs_on_failure():
            server, rrp, lrp = self.startAll(topo)
            self.assertTrue(lrp.lines(r"GRE I/O on .* \(native, datalink"), lrp.log()[-2000:])
            target = f"{lrp.address}:{e2e.PPTP_PORT}"

            # every client's GRE echoed, framed by C, counted as the Python path counts it
            reports = e2e.run_clients(topo, target, call_id=1, packets=PACKETS)
            self.assertAllEchoed(reports, PACKETS)
            self.waitForCalls(topo, [rrp, lrp], 0)
            status = lrp.status()
            port, totals = status["gre_port"], status["totals"]
            self.assertEqual(totals["gre_packets_in"], CLIENTS * PACKETS, status)
            self.assertEqual(port["delivered"], CLIENTS * PACKETS, port)
            self.assertEqual(port["native"]["framed"], CLIENTS * PACKETS, port)
            self.assertEqual(port["native"]["entries"], 0, port)   # every call released
            # (step 3b) C wrote frames to the link's TLS itself, and the mux counted them
            written = port["native"]["written"]
            self.assertGreater(written, 0, port)
            self.assertLessEqual(written, CLIENTS * PACKETS, port)
            self.assertGreaterEqual(status["links"][0]["frames_out"], CLIENTS * PACKETS, status["links"])
            self.assertEqual(server.status()["gre_echoed"], CLIENTS * PACKETS)

            # a closed call's GRE no longer goes through: handed back, counted as unknown
            key = reports[0]["server_ids"][0][0]
            before = port["native"]["handed_back"]
            topo.lab.run(topo.clients_ns, [sys.executable, "-c", SEND_GRE,
                                           topo.client_addresses[0], lrp.address, str(key), "5"])
            wait_until(lambda: lrp.status()["drops"].get("gre_unknown_call_id", 0) >= 5, 5,
                       "the LRP to count the closed call's GRE")
            after = lrp.status()
            self.assertEqual(after["gre_port"]["native"]["handed_back"], before + 5, after["gre_port"])
            self.assertEqual(after["gre_port"]["native"]["framed"], CLIENTS * PACKETS)

            # the link lost and back: the LRP lives on and carries GRE again
            rrp.stop()
            wait_until(lambda: not lrp.status()["links"] or not lrp.status()["links"][0]["up"], 15,
                       "the LRP to see its link down")
            time.sleep(0.5)
            rrp = e2e.start_rrp(topo, status_port=STATUS_PORT)
            wait_until(lambda: any(link["up"] for link in lrp.status()["links"]), 30,
                       "the LRP's link back up")
            reports = e2e.run_clients(topo, target, call_id=1, packets=PACKETS)
            self.assertAllEchoed(reports, PACKETS)
            self.waitForCalls(topo, [rrp, lrp], 0)
            again = lrp.status()["gre_port"]["native"]
            self.assertEqual(again["framed"], 2 * CLIENTS * PACKETS)
            self.assertGreater(again["written"], written, again)   # through the new link's SSL*
            self.assertIsNone(lrp.proc.poll())


class NativeLinkReadTests(E2ETestCase):
    """``--gre-capture native`` on both daemons, GRE both ways: each daemon's capture pump
    (routeproxy/native/pump.c: the client's GRE framed by the LRP, the echo by the RRP) and
    link read (routeproxy/native/link.c: the GRE to pptpd sent by the RRP, the echo to the
    client by the LRP)."""

    timeout = 120

    def setUp(self):
        module, reason = native.load()
        if module is None:
            self.skipTest(reason)

    def test_gre_both_ways_in_c(self):
        topo = self.topology(CLIENTS)
        with topo.logs_on_failure():
            e2e.make_certs(topo, ["lrp0"])
            server = e2e.start_server(topo)
            rrp = e2e.start_rrp(topo, status_port=STATUS_PORT, extra=NATIVE)
            lrp = e2e.start_lrp(topo, status_port=STATUS_PORT, extra=NATIVE)
            target = f"{lrp.address}:{e2e.PPTP_PORT}"
            reports = e2e.run_clients(topo, target, call_id=1, packets=PACKETS)
            self.assertAllEchoed(reports, PACKETS)   # intact both ways
            self.waitForCalls(topo, [rrp, lrp], 0)
            self.assertEqual(server.status()["gre_echoed"], CLIENTS * PACKETS)
            status = rrp.status()
            port, totals = status["gre_port"], status["totals"]
            # counted as the Python path counts them, most of them sent by C
            self.assertEqual(port["sent"], CLIENTS * PACKETS, port)
            self.assertEqual(totals["gre_packets_out"], CLIENTS * PACKETS, totals)
            link = port["native_link"]
            self.assertEqual(link["entries"], 0, link)   # every call released
            self.assertGreater(link["sent_by_c"], CLIENTS * PACKETS // 2, link)
            self.assertLessEqual(link["sent_by_c"], CLIENTS * PACKETS, link)
            self.assertGreaterEqual(status["links"][0]["frames_in"], CLIENTS * PACKETS,
                                    status["links"])
            # the echoes: captured and framed by the RRP's pump, sent to the clients by the
            # LRP's link read, counted as the Python path counts them
            self.assertTrue(rrp.lines(r"GRE I/O on .* \(native, datalink"), rrp.log()[-2000:])
            self.assertEqual(port["delivered"], CLIENTS * PACKETS, port)
            self.assertEqual(totals["gre_packets_in"], CLIENTS * PACKETS, totals)
            self.assertEqual(port["native"]["entries"], 0, port)
            self.assertGreater(port["native"]["framed"], CLIENTS * PACKETS // 2, port)
            self.assertLessEqual(port["native"]["framed"], CLIENTS * PACKETS, port)
            lrpStatus = lrp.status()
            lrpPort = lrpStatus["gre_port"]
            self.assertEqual(lrpPort["sent"], CLIENTS * PACKETS, lrpPort)
            self.assertEqual(lrpStatus["totals"]["gre_packets_out"], CLIENTS * PACKETS)
            self.assertGreater(lrpPort["native_link"]["sent_by_c"], CLIENTS * PACKETS // 2,
                               lrpPort)
            self.assertLessEqual(lrpPort["native_link"]["sent_by_c"], CLIENTS * PACKETS, lrpPort)
            self.assertEqual(lrpPort["native_link"]["entries"], 0, lrpPort)
            # the link's TLS read in C too (step 3b), on both daemons
            self.assertGreater(link["tls_reads"], 0, link)
            self.assertGreater(lrpPort["native_link"]["tls_reads"], 0, lrpPort)
            self.assertIsNone(rrp.proc.poll())
            self.assertIsNone(lrp.proc.poll())


class NativeTwoLRPsTests(E2ETestCase):
    """An RRP serving two LRPs, all three native: the RRP's capture pump frames the echoes of
    both links' calls in C (each link with its own index, buffer and budget), each to its
    own link."""

    timeout = 120

    def setUp(self):
        module, reason = native.load()
        if module is None:
            self.skipTest(reason)

    def test_both_links_framed_in_c(self):
        topo = self.topology(CLIENTS, n_lrps=2)
        with topo.logs_on_failure():
            e2e.make_certs(topo, ["lrp0", "lrp1"])
            server = e2e.start_server(topo)
            rrp = e2e.start_rrp(topo, status_port=STATUS_PORT, extra=NATIVE)
            lrps = [e2e.start_lrp(topo, i, status_port=STATUS_PORT + 1 + i, extra=NATIVE)
                    for i in (0, 1)]
            reports = e2e.run_clients(
                topo, lambda i: f"{lrps[topo.client_lrp[i]].address}:{e2e.PPTP_PORT}",
                call_id=1, packets=PACKETS, calls=2)
            self.assertAllEchoed(reports, 2 * PACKETS)
            self.waitForCalls(topo, [rrp, *lrps], 0)
            total = 2 * CLIENTS * PACKETS
            self.assertEqual(server.status()["gre_echoed"], total)
            status = rrp.status()
            port = status["gre_port"]
            self.assertEqual(port["delivered"], total, port)
            self.assertEqual(status["totals"]["gre_packets_in"], total, status["totals"])
            # both links had calls in C at once: the second link got an index of its own
            self.assertTrue(rrp.lines(r"framed in C \(link 1\)"), rrp.log()[-3000:])
            pump = port["native"]
            self.assertEqual((pump["entries"], pump["links_in_c"]), (0, 0), pump)
            self.assertGreater(pump["framed"], total * 3 // 4, pump)
            self.assertLessEqual(pump["framed"], total, pump)
            # each LRP's echoes went over its own link, and each LRP sent its clients theirs
            self.assertEqual(len(status["links"]), 2, status["links"])
            for link in status["links"]:
                self.assertGreaterEqual(link["frames_out"], total // 2, status["links"])
            for lrp in lrps:
                self.assertEqual(lrp.status()["gre_port"]["sent"], total // 2)
            self.assertIsNone(rrp.proc.poll())
