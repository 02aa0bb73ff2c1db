"""The benchmark's --shards/--pin plumbing (benchmarks/topology.py): the pin syntax, which
CPUs each daemon gets, the per-role sums and the shard a key belongs to."""
from twisted.trial import unittest

from benchmarks import topology
from routeproxy.shard import Shard


class PinTests(unittest.SynchronousTestCase):
    def test_parse(self):
        self.assertEqual(topology.parse_pin("daemons=1,instruments=0"), {"daemons": "1", "instruments": "0"})
        self.assertEqual(topology.parse_pin("daemons=0,1,instruments=2-3"), {"daemons": "0,1", "instruments": "2-3"})
        self.assertEqual(topology.parse_pin(""), {})
        for bad in ("cores=1", "daemons=x", "1,2", "shard=1"):
            self.assertRaises(ValueError, topology.parse_pin, bad)
        self.assertEqual(topology.cpu_set("0,2-3"), {0, 2, 3})

    def test_most_specific_key(self):
        pins = topology.parse_pin("daemons=1,shard1=0,rrp1=1,instruments=0")
        self.assertEqual([topology.daemon_cpus(pins, role, i) for role in ("lrp", "rrp") for i in (0, 1)],
                         ["1", "0", "1", "1"])
        self.assertIsNone(topology.daemon_cpus({}, "lrp", 0))
        self.assertRegex(topology.daemon_cpus({"instruments": "0"}, "lrp", 0), r"^0-\d+$")

    def test_pinned_argv(self):
        daemon = topology.PinnedDaemon(None, "ns", "/tmp", "lrp0", "routeproxy-lrp", ["--x"])
        self.assertNotEqual(daemon.argv[0], "taskset")
        daemon.cpus = "1"
        self.assertEqual(daemon.argv[:3], ["taskset", "-c", "1"])
        self.assertIn("routeproxy-lrp", daemon.argv)


class SumTests(unittest.SynchronousTestCase):
    def test_by_role(self):
        got = topology.by_role({"lrp0": (1.0, 10), "lrp1": (2.0, 20), "rrp0": (4.0, 1)})
        self.assertEqual((got["lrp"], got["rrp"], got["lrp1"]), ((3.0, 30), (4.0, 1), (2.0, 20)))
        self.assertEqual(topology.by_role({"lrp": (1, 2)}), {"lrp": (1, 2)})

    def test_shard_of_matches_routeproxy(self):
        path = topology.ProxyPath.__new__(topology.ProxyPath)
        for count in (1, 2, 3):
            path.shards = count
            for key in (1, 21845, 21846, 32767, 32768, 65535):
                self.assertTrue(Shard(path.shard_of(key), count).owns(key), (count, key))
