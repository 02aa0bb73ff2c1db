"""Smoke test of the benchmark suite: it runs and produces figures (no timing assertions).

The offline tests check the instruments' packet format; the namespace test runs
``python -m benchmarks --quick`` as a user would (root, real namespaces, raw sockets, the
daemons when they exist) and checks that every part produced numbers, not how large they are.
"""
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile

import dpkt
from twisted.trial import unittest

from benchmarks import loadgen
from routeproxy import gre
from tests.support import daemons, netns


class PacketFormatTests(unittest.SynchronousTestCase):
    def test_probe_round_trip_in_valid_gre(self):
        packet = loadgen.build_packet(512, call_id=4321, seq=77, flow=3, stamp=123456789)
        self.assertEqual(len(packet), 512 - 20)
        call_id, seq, ack, payload = gre.split_gre(packet)
        self.assertEqual((call_id, seq, ack), (4321, 77, None))
        self.assertEqual(loadgen.probe_of(packet), (3, 77, 123456789))

    def test_probe_of_another_run_is_not_counted(self):
        packet = loadgen.build_packet(64, call_id=1, seq=2, flow=0, stamp=3, run=11)
        self.assertEqual(loadgen.probe_of(packet, run=11), (0, 2, 3))
        self.assertIsNone(loadgen.probe_of(packet, run=12))

    def test_probe_found_after_an_ack_word(self):
        packet = gre.build_gre(9, loadgen.build_packet(64, 9, 5, flow=1, stamp=42)[12:], seq=5, ack=4)
        self.assertEqual(loadgen.probe_of(packet), (1, 5, 42))

    def test_foreign_gre_has_no_probe(self):
        self.assertIsNone(loadgen.probe_of(gre.build_gre(9, b"\xff\x03" + bytes(40), seq=1)))
        self.assertIsNone(loadgen.probe_of(b"\x30"))

    def test_sizes_outside_the_range_are_refused(self):
        for size in (loadgen.MIN_SIZE - 1, loadgen.MAX_SIZE + 1):   # above 1500: fragmented by the kernel
            self.assertRaises(loadgen.LoadgenError, loadgen.build_packet, size, 1, 1)

    def test_link_headers_are_a_valid_ipv4_frame(self):
        link = loadgen.Link("eth0", "10.1.2.3", "02:00:00:00:00:01", "02:00:00:00:00:02")
        body = loadgen.build_packet(1400, 7, 1)
        frame = dpkt.ethernet.Ethernet(link.headers("10.9.8.7", len(body)) + body)
        ip = frame.data
        self.assertEqual((socket.inet_ntoa(ip.src), socket.inet_ntoa(ip.dst), ip.p, ip.len),
                         ("10.1.2.3", "10.9.8.7", 47, 1400))
        header = link.headers("10.9.8.7", len(body))[14:]
        total = sum(struct.unpack("!10H", header))   # a correct checksum makes this 0xFFFF
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        self.assertEqual(total, 0xFFFF)
        self.assertRaises(loadgen.LoadgenError, loadgen.Link, "eth0", "10.1.2.3", "zz", "02:00:00:00:00:02")

    def test_percentiles(self):
        got = loadgen.percentiles(range(1, 1001))
        self.assertEqual((got["p50"], got["p99"], got["p99.9"], got["count"]), (500, 990, 999, 1000))
        self.assertEqual(loadgen.percentiles([]), {"count": 0})


class QuickRunTests(unittest.TestCase):
    """`python -m benchmarks --quick`: every part yields figures (or a stated skip)."""

    def test_quick_run_produces_figures(self):
        netns.skip_unless_available()
        out = os.path.join(tempfile.mkdtemp(prefix="bench-smoke-"), "results.json")
        done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", out],
                              capture_output=True, text=True, cwd=daemons.REPO, timeout=120, env=daemons.child_env())
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        with open(out) as f:
            results = json.load(f)
        self.assertIn("machine", results)
        for name in ("veth", "router", "nat"):
            self.assertNotIn("error", results[name], results[name])
            entry = results[name]["sizes"]["512"]
            self.assertIsNotNone(entry["max"], f"{name}: no loss-free rate")
            self.assertGreater(entry["max"]["delivered_pps"], 0)
            self.assertGreater(entry["latency"]["50%"]["latency_us"]["count"], 0)
        self.assertTrue(results["nat"]["note"])
        for name in ("router", "nat"):
            both = results[name]["directions"]["both"]["512"]["trials"][0]
            self.assertEqual(len(both["per_sink"]), 2)
            self.assertTrue(all(sink["received"] > 0 for sink in both["per_sink"]), both)
        proxy = results["proxy"]
        if "skipped" not in proxy:
            for part in ("throughput", "scale"):
                self.assertNotIn("error", proxy[part], proxy[part])
            trials = proxy["throughput"]["sizes"]["512"]["trials"]
            self.assertGreater(max(t["received"] for t in trials), 0)
            self.assertEqual(proxy["scale"]["rows"][-1]["sessions"], 100)
        reference = results["openvpn"]
        if "skipped" not in reference:
            for variant, got in reference.items():
                self.assertNotIn("error", got, got)
                self.assertGreater(max(t["received"] for t in got["sizes"]["512"]["trials"]), 0)
        self.assertIn("512-byte GRE", done.stdout)


class FixedRateTests(unittest.TestCase):
    """`python -m benchmarks.fixedrate --openvpn nodelay`: both paths at each rate, one table."""

    def test_side_by_side_table(self):
        from benchmarks import fixedrate

        rows = [{"path": "proxy", "rate": 2000, "delivered_pps": 2000, "lrp_us_per_packet": 97.1,
                 "rrp_us_per_packet": 90.0, "latency_us": {"min": 80, "p50": 190, "p99": 400}},
                {"path": "openvpn-nodelay", "rate": 1000, "delivered_pps": 999,
                 "lrp_us_per_packet": 30.2, "rrp_us_per_packet": None}]
        lines = fixedrate.side_by_side(rows).splitlines()
        self.assertEqual(len(lines), 3)
        self.assertEqual(lines[1].split(), ["1000", "openvpn-nodelay", "999", "30.2", "-", "-"])
        self.assertEqual(lines[2].split(), ["2000", "proxy", "2000", "97.1", "90.0", "80/190/400"])

    def test_proxy_and_openvpn_at_the_same_rates(self):
        netns.skip_unless_available()
        from benchmarks import openvpn
        if openvpn.missing():
            raise unittest.SkipTest(openvpn.missing())
        if daemons.daemons_missing():
            raise unittest.SkipTest(daemons.daemons_missing())
        done = subprocess.run([sys.executable, "-m", "benchmarks.fixedrate", "--rate", "1000",
                               "--rate", "3000", "--duration", "1", "--sessions", "2", "--latency",
                               "--openvpn", "nodelay"],
                              capture_output=True, text=True, cwd=daemons.REPO, timeout=180,
                              env=daemons.child_env())
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        self.assertEqual([(r["path"], r["rate"]) for r in rows],
                         [("proxy", 1000), ("openvpn-nodelay", 1000), ("proxy", 3000),
                          ("openvpn-nodelay", 3000)])
        for row in rows:
            self.assertGreater(row["received"], 0, row)
            self.assertGreater(row["lrp_us_per_packet"], 0, row)
            self.assertGreater(row["rrp_us_per_packet"], 0, row)
            self.assertGreater(row["latency_us"]["count"], 0, row)
        self.assertIn("openvpn-nodelay", done.stdout.splitlines()[-1] + done.stdout.splitlines()[-2])


def _fixedrate(*argv):
    """Run ``python -m benchmarks.fixedrate ARGV`` as a user would: (its JSON rows, stdout)."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.fixedrate", *argv],
                          capture_output=True, text=True, cwd=daemons.REPO, timeout=180,
                          env=daemons.child_env())
    if done.returncode != 0:
        raise AssertionError(f"fixedrate {argv} failed (rc={done.returncode}): {done.stderr[-2000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")], done.stdout


class FixedRateDirectionTests(unittest.TestCase):
    """`python -m benchmarks.fixedrate --direction reverse|both`: server -> client through the
    real daemons (the RRP captures, the LRP sends to the client) and both at once, per direction."""

    def setUp(self):
        netns.skip_unless_available()
        if daemons.daemons_missing():
            raise unittest.SkipTest(daemons.daemons_missing())

    def assertCarried(self, cells, what):
        """Most of what was offered arrived (1000 pps is far below either path's limit)."""
        self.assertGreater(cells["received"], 0, what)
        self.assertLess(cells["loss"], 0.1, what)

    def test_tables(self):
        from benchmarks import fixedrate

        both = {"path": "proxy", "direction": "both", "rate": 2000, "delivered_pps": 3990,
                "lrp_us_per_packet": 61.0, "rrp_us_per_packet": 70.5,
                "forward": {"delivered_pps": 2000, "loss": 0.0, "latency_us": {"min": 80, "p50": 190, "p99": 400}},
                "reverse": {"delivered_pps": 1990, "loss": 0.005, "latency_us": {"min": 90, "p50": 200, "p99": 500}}}
        lines = fixedrate.side_by_side([both], "both").splitlines()
        self.assertIn("rate offered per direction", lines[0])
        self.assertEqual(lines[2].split(), ["2000", "proxy", "2000", "0.00%", "1990", "0.50%", "61.0", "70.5",
                                            "80/190/400", "90/200/500"])
        reverse = {"path": "proxy", "direction": "reverse", "rate": 2000, "delivered_pps": 1990, "loss": 0.005,
                   "lrp_us_per_packet": 61.0, "rrp_us_per_packet": 70.5}
        lines = fixedrate.side_by_side([reverse], "reverse").splitlines()
        self.assertIn("server -> client", lines[0])
        self.assertEqual(lines[2].split(), ["2000", "proxy", "1990", "0.50%", "61.0", "70.5", "-"])

    def test_reverse_through_the_daemons(self):
        rows, out = _fixedrate("--rate", "1000", "--duration", "1", "--sessions", "2", "--latency",
                               "--direction", "reverse")
        self.assertEqual([(r["path"], r["direction"], r["rate"]) for r in rows], [("proxy", "reverse", 1000)])
        row = rows[0]
        self.assertCarried(row, row)
        self.assertGreater(row["latency_us"]["count"], 0, row)
        self.assertGreater(row["lrp_us_per_packet"], 0, row)
        self.assertGreater(row["rrp_us_per_packet"], 0, row)
        # The RRP captured it (its GRE port woke up for it) and the LRP's capture saw nothing.
        self.assertIn("rrp_packets_per_wake_up", row)
        self.assertNotIn("lrp_packets_per_wake_up", row)
        self.assertIn("server -> client", out)

    def test_both_beside_openvpn(self):
        from benchmarks import openvpn
        if openvpn.missing():
            raise unittest.SkipTest(openvpn.missing())
        rows, out = _fixedrate("--rate", "1000", "--duration", "1", "--sessions", "2", "--latency",
                               "--direction", "both", "--openvpn", "nodelay")
        self.assertEqual([(r["path"], r["direction"], r["rate"]) for r in rows],
                         [("proxy", "both", 1000), ("openvpn-nodelay", "both", 1000)])
        for row in rows:
            for leg in ("forward", "reverse"):
                self.assertCarried(row[leg], (leg, row))
                self.assertGreater(row[leg]["latency_us"]["count"], 0, (leg, row))
                self.assertLessEqual(row[leg]["received"], row[leg]["sent"], (leg, row))
            # --rate is per direction: each leg was offered it, the row counts both.
            self.assertEqual(row["received"], row["forward"]["received"] + row["reverse"]["received"], row)
            self.assertGreater(row["lrp_us_per_packet"], 0, row)
            self.assertGreater(row["rrp_us_per_packet"], 0, row)
        self.assertGreater(rows[0]["forward"]["offered_pps"], 800, rows[0])
        self.assertGreater(rows[0]["reverse"]["offered_pps"], 800, rows[0])
        self.assertIn("rate offered per direction", out)


class FloodTests(unittest.TestCase):
    """`python -m benchmarks.fixedrate --junk-rate`: GRE from the client with call IDs no call
    holds, beside the calls' own, through the real daemons."""

    def setUp(self):
        netns.skip_unless_available()
        if daemons.daemons_missing():
            raise unittest.SkipTest(daemons.daemons_missing())

    def test_the_calls_carry_on_and_every_junk_packet_is_counted(self):
        rows, _ = _fixedrate("--rate", "1000", "--duration", "1", "--sessions", "2",
                             "--junk-rate", "10000")
        [row] = rows
        junk, drops = row["junk"], row["daemon_drops"]
        self.assertGreater(junk["sent"], 5000, row)
        # the calls' GRE: all of it (its probes carry the trial's marker; the junk's do not)
        self.assertGreaterEqual(row["received"], 990, row)
        # the flood: dropped at the LRP, each packet counted (by the Python path's reason, or
        # past its share as C's no_call), none elsewhere
        counted = drops.get("lrp gre_unknown_call_id", 0) + drops.get("lrp port no_call", 0)
        self.assertGreaterEqual(counted, junk["sent"] * 0.99, row)
        self.assertFalse({k: v for k, v in drops.items() if k.startswith("rrp")}, row)


class RunSecondsTests(unittest.SynchronousTestCase):
    """fixedrate charges a daemon with every thread's CPU, not only its main thread's."""

    def test_a_busy_thread_counts(self):
        import threading
        import time

        from benchmarks import fixedrate

        def main_thread_only():
            with open(f"/proc/{os.getpid()}/schedstat") as f:
                return int(f.read().split()[0]) / 1e9

        spun, done = threading.Event(), threading.Event()

        def work():  # 0.15 s of this thread's own CPU, however long the machine takes to give it
            while time.thread_time() < 0.15:
                pass
            spun.set()
            done.wait()  # alive (a thread's CPU is counted while it lives, as a daemon's are)

        before, mainBefore = fixedrate.run_seconds(os.getpid()), main_thread_only()
        worker = threading.Thread(target=work)
        worker.start()
        spun.wait(60)
        spent = fixedrate.run_seconds(os.getpid()) - before
        mainSpent = main_thread_only() - mainBefore
        done.set()
        worker.join()
        self.assertGreaterEqual(spent, 0.15)
        self.assertLess(mainSpent, 0.15)
