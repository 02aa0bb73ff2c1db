"""benchmarks.labtransfer's reading of a lab run: the slowest client's seconds and ping."""
from twisted.trial import unittest

from benchmarks.labtransfer import gre_of, loop_of, lossy, rtt_of, seconds_of, tcp_of


class FakeRun:
    def __init__(self, rows, transfers, ok=None):
        self.rows, self.transfers = rows, transfers
        self.clients, self.calls_per_client = len(rows), 1
        self._ok = list(transfers) if ok is None else ok

    def transfers_ok(self):
        return self._ok


class ReadingTests(unittest.SynchronousTestCase):
    def test_slowest_client_counts(self):
        run = FakeRun([{"client": "c1", "rtt": "2.1"}, {"client": "c2", "rtt": "3.4"}],
                      {"c1": {"seconds": "1.5"}, "c2": {"seconds": "2.5"}})
        self.assertEqual((seconds_of(run), rtt_of(run)), (2.5, 3.4))

    def test_a_failed_transfer_or_ping_is_no_figure(self):
        run = FakeRun([{"client": "c1", "rtt": "-"}], {"c1": {"seconds": "1.5"}}, ok=[])
        self.assertEqual((seconds_of(run), rtt_of(run)), (None, None))

    def test_the_lrps_gre_in_a_few_words(self):
        """What the LRP captured, took in C and handed back; nothing without its status."""
        run = FakeRun([], {})
        run.status = {"lrp": {"gre_port": {"received": 10, "fragments": 6, "dropped": {"capture": 0, "sojourn": 2},
                                           "native": {"framed": 3, "handed_back": 7}}}}
        self.assertEqual(gre_of(run), "; LRP GRE captured 10, fragments 6, in C 3, handed back 7, "
                                      "dropped {'sojourn': 2}")
        run.status = {"lrp": {"gre_port": {"received": 10}}}
        self.assertEqual(gre_of(run), "; LRP GRE captured 10, fragments 0")
        run.status["rrp"] = {"gre_port": {"native_link": {"sojourn_dropped": 4}}}
        self.assertEqual(gre_of(run), "; LRP GRE captured 10, fragments 0; link gate dropped {'rrp': 4}")
        run.status["lrp"]["links"] = [{"gre_dropped": {"watermark": 3}}, {"gre_dropped": {}}]
        self.assertEqual(gre_of(run), "; LRP GRE captured 10, fragments 0; link gate dropped {'rrp': 4}"
                                      "; the mux did not send {'lrp': {'watermark': 3}}")
        run.status["lrp"]["links"][0]["send_queue"] = {"limit": 32768, "delivery_rate": 2500000}
        self.assertEqual(gre_of(run), "; LRP GRE captured 10, fragments 0; link gate dropped {'rrp': 4}"
                                      "; the mux did not send {'lrp': {'watermark': 3, 'limit': 32768, "
                                      "'Mbit/s': 20.0}}")
        run.status = {}
        self.assertEqual(gre_of(run), "")

    def test_the_loops_wake_ups_in_a_few_words(self):
        """Each daemon's wake-ups in C, runs and clock reads; nothing without the loop."""
        run = FakeRun([], {})
        run.status = {"rrp": {"gre_port": {"loop": {"wake_ups": 375, "link_reads": 530, "runs": 38,
                                                     "clock_reads": 25}}},
                      "lrp": {"gre_port": {"loop": {"wake_ups": 862, "link_reads": 336, "runs": 60}}}}
        self.assertEqual(loop_of(run), "; wake-ups LRP 862+336 in 60 runs, - clock reads, "
                                       "RRP 375+530 in 38 runs, 25 clock reads")
        run.status = {"lrp": {"gre_port": {"loop": None}}}
        self.assertEqual(loop_of(run), "")

    def test_tcp_and_losses_in_a_few_words(self):
        """The senders' retransmissions and timeouts, the server's out-of-order arrivals, the
        raw sockets that dropped; a run lost packets when a client retransmitted or any raw
        socket dropped (the server's retransmissions, e.g. ACKs, do not count)."""
        run = FakeRun([], {})
        self.assertEqual((tcp_of(run), lossy(run)), ("", None))
        run.tcp = {"c1": {"RetransSegs": 0, "TCPTimeouts": 0}, "srv": {"TCPOFOQueue": 0, "RetransSegs": 3},
                   "lrp": {"RawDrops": 0}}
        run.gre_order = {"buffered": 0, "old": 0}
        self.assertFalse(lossy(run))
        self.assertEqual(tcp_of(run), "; TCP retrans 0, timeouts 0, loss probes 0, server out-of-order 0; "
                                      "pptp held 0, dropped old 0")
        run.tcp = {"c1": {"RetransSegs": 4, "TCPTimeouts": 1, "TCPLossProbes": 1},
                   "c2": {"RetransSegs": 2}, "srv": {"TCPOFOQueue": 9, "RawDrops": 6}}
        self.assertTrue(lossy(run))
        self.assertEqual(tcp_of(run), "; TCP retrans 6, timeouts 1, loss probes 1, server out-of-order 9; "
                                      "pptp held 0, dropped old 0; raw socket drops {'srv': 6}")
        run.tcp = {"c1": {}, "rrp": {"RawDrops": 1}}
        self.assertTrue(lossy(run))
