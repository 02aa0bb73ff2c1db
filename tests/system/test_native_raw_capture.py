"""``--gre-capture native-raw`` end to end (docs/gre-io.md): the daemons as users start them
(tests/support/e2e.py), scripted clients and server, GRE captured on raw sockets read in C
(routeproxy/native/rawcap.c) and framed by the pump, both ways, and GRE the clients' kernel
fragmented arriving whole.  Needs root and the built routeproxy.native.
"""
import sys

from routeproxy import native
from tests.support import e2e
from tests.support.wait import wait_until
from tests.system.test_e2e import E2ETestCase

CLIENTS = 4
PACKETS = 20
STATUS_PORT = 8096
NATIVE_RAW = ["--gre-capture", "native-raw"]

# GRE of 1700 payload bytes: the client's kernel sends it as two fragments (MTU 1500)
SEND_BIG_GRE = """
import socket, struct, sys
src, dst, key, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
s.setsockopt(socket.IPPROTO_IP, 10, 0)   # IP_MTU_DISCOVER: IP_PMTUDISC_DONT
s.bind((src, 0))
for i in range(n):
    payload = b"big!" * 425
    s.sendto(struct.pack("!HHHHI", 0x3001, 0x880B, len(payload), key, 1000 + i) + payload, (dst, 0))
"""


class NativeRawCaptureTests(E2ETestCase):
    timeout = 120

    def setUp(self):
        module, reason = native.load()
        if module is None:
            self.skipTest(reason)

    def test_gre_both_ways_from_raw_sockets(self):
        topo = self.topology(CLIENTS)
        with topo.logs_on_failure():
            e2e.make_certs(topo, ["lrp0"])
            server = e2e.start_server(topo)
            rrp = e2e.start_rrp(topo, status_port=STATUS_PORT, extra=NATIVE_RAW)
            lrp = e2e.start_lrp(topo, status_port=STATUS_PORT, extra=NATIVE_RAW)
            for daemon in (lrp, rrp):
                self.assertTrue(daemon.lines(r"GRE I/O on .* \(native-raw, datalink 12\)"),
                                daemon.log()[-2000:])
            target = f"{lrp.address}:{e2e.PPTP_PORT}"
            reports = e2e.run_clients(topo, target, call_id=1, packets=PACKETS)
            self.assertAllEchoed(reports, PACKETS)
            self.waitForCalls(topo, [rrp, lrp], 0)
            total = CLIENTS * PACKETS
            self.assertEqual(server.status()["gre_echoed"], total)
            for daemon in (lrp, rrp):
                status = daemon.status()
                port = status["gre_port"]
                # counted as the Python path counts them, framed by the pump, sent by the link read
                self.assertEqual(port["delivered"], total, port)
                self.assertEqual(status["totals"]["gre_packets_in"], total, status["totals"])
                self.assertEqual(port["sent"], total, port)
                self.assertGreater(port["native"]["framed"], total // 2, port)
                self.assertLessEqual(port["native"]["framed"], total, port)
                self.assertEqual(port["native"]["entries"], 0, port)
                self.assertGreater(port["native_link"]["sent_by_c"], total // 2, port)
                # a raw socket reads nothing of its own: the bound senders' GRE is not seen
                self.assertEqual(port["duplicates"], 0, port)

            # a closed call's GRE, fragmented by the client's kernel: the LRP's socket gets it
            # whole (no fragment for Python to reassemble), handed back, counted as unknown
            key = reports[0]["server_ids"][0][0]
            before = lrp.status()["gre_port"]
            topo.lab.run(topo.clients_ns, [sys.executable, "-c", SEND_BIG_GRE,
                                           topo.client_addresses[0], lrp.address, str(key), "5"])
            wait_until(lambda: lrp.status()["drops"].get("gre_unknown_call_id", 0) >= 5, 5,
                       "the LRP to count the closed call's GRE")
            after = lrp.status()["gre_port"]
            self.assertEqual(after["native"]["handed_back"], before["native"]["handed_back"] + 5,
                             after)
            self.assertEqual(after["received"], before["received"] + 5, after)
            self.assertEqual((after["fragments"], after["reassembled"]), (0, 0), after)
            self.assertIsNone(rrp.proc.poll())
            self.assertIsNone(lrp.proc.poll())
