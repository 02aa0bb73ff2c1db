"""The benchmark's instruments in C (benchmarks/loadgen.c) against the Python reference
(benchmarks/loadgen.py): the same constants, percentiles, errors, packets and counts.

The sink tests run both sinks at once in one namespace (a raw socket each, so each gets every
packet, with the same kernel receive time): their counts, and their latency percentiles,
must be equal, and equal to what the sender sent.  Each sender (C and Python) is run against
both, so C -> Python, Python -> C and C -> C are all covered.  Namespace tests need root and
``ip netns``; everything skips (saying why) only where no C compiler exists.
"""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time

from twisted.trial import unittest

from benchmarks import instrument, loadgen, measure
from routeproxy import gre
from tests.support import netns
from tests.support.daemons import REPO, child_env

ENGINES = ("c", "python")
COUNTS = ("received", "other", "stale", "bytes", "highest_seq", "flows", "per_flow_min", "flow_min", "flow_max")


def binary():
    """The C instrument, built now if need be (SkipTest only when there is no compiler)."""
    if instrument.compiler() is None:
        raise unittest.SkipTest("no C compiler (cc): benchmarks/loadgen.c cannot be built here")
    return instrument.build()


def run_loadgen(engine, *args, **kwargs):
    binary()
    return subprocess.run(instrument.argv(*args, engine_name=engine), capture_output=True, text=True,
                          env=child_env(), cwd=REPO, timeout=60, **kwargs)


class ConstantsTests(unittest.TestCase):
    """One source of truth: loadgen.c's constants are loadgen.py's."""

    def test_constants(self):
        got = json.loads(subprocess.run([binary(), "constants"], capture_output=True, text=True,
                                        check=True).stdout)
        self.assertEqual(got, {
            "magic": loadgen.MAGIC.decode(), "ip_header": loadgen.IP_HEADER, "gre_header": loadgen.GRE_HEADER,
            "probe_size": loadgen.PROBE.size, "min_size": loadgen.MIN_SIZE, "max_size": loadgen.MAX_SIZE,
            "link_mtu": loadgen.LINK_MTU, "sndbuf": 4 << 20, "rcvbuf": 64 << 20,
            "sink_slot": loadgen.Sink.SLOT, "sink_control": loadgen.Sink.CONTROL, "max_batch": 1024,
            "rcvtimeo_us": 50000, "probe_offset": loadgen.GRE_HEADER, "per_packet_offset": 6})

    def test_percentiles(self):
        """The sink's latency_us is loadgen.percentiles of the same samples, to the last bit."""
        rng = random.Random(5)
        for n in (1, 2, 3, 99, 100, 101, 999, 1000, 1001, 4567):
            samples = [rng.randrange(-5000, 10_000_000) for _ in range(n)]
            done = subprocess.run([binary(), "percentiles"], input="\n".join(map(str, samples)),
                                  capture_output=True, text=True, check=True)
            self.assertEqual(json.loads(done.stdout), loadgen.percentiles([s / 1000.0 for s in samples]), n)
        done = subprocess.run([binary(), "percentiles"], input="", capture_output=True, text=True, check=True)
        self.assertEqual(json.loads(done.stdout), {"count": 0})


class ErrorTests(unittest.TestCase):
    """Bad arguments: one line on stderr and a non-zero exit, the same line from both engines."""

    def assertOneLine(self, engine, args, text):
        done = run_loadgen(engine, *args)
        self.assertNotEqual(done.returncode, 0, (engine, args))
        self.assertEqual(done.stdout, "", (engine, args))
        lines = done.stderr.splitlines()
        self.assertEqual(len(lines), 1, (engine, args, done.stderr))
        self.assertIn(text, lines[0], (engine, args))
        return lines[0]

    def test_bad_size(self):
        for size in (loadgen.MIN_SIZE - 1, loadgen.MAX_SIZE + 1):
            args = ("send", "--dst", "10.0.0.1", "--size", size)
            lines = {e: self.assertOneLine(e, args, f"packet size {size} outside") for e in ENGINES}
            self.assertEqual(lines["c"], lines["python"])

    def test_link_needs_addresses(self):
        args = ("send", "--dst", "10.0.0.1", "--ifname", "eth0")
        lines = {e: self.assertOneLine(e, args, "--ifname needs --src") for e in ENGINES}
        self.assertEqual(lines["c"], lines["python"])
        bad_mac = args + ("--src", "10.0.0.2", "--src-mac", "zz", "--dst-mac", "02:00:00:00:00:01")
        for engine in ENGINES:
            self.assertOneLine(engine, bad_mac, "not a MAC address: 'zz'")

    def test_c_arguments(self):
        for args, text in ((("send", "--size", "64"), "required: --dst"),
                           (("send", "--dst", "10.0.0.1", "--bogus"), "unrecognized argument: --bogus"),
                           (("send", "--dst", "10.0.0.1", "--size", "x"), "invalid int value: 'x'"),
                           (("send", "--dst", "10.0.0.1", "--keys", "7,,8"), "invalid int value: ''"),
                           (("send", "--dst", "10.0.0.1", "--batch", "0"), "batch 0 outside 1..1024"),
                           (("send", "--dst", "10.0.0.1", "--mode", "sendto"), "sendmmsg only"),
                           (("sink", "--quiet"), "expected one argument"),
                           (("sink", "--batch", "2000"), "batch 2000 outside"),
                           (("bogus",), "usage")):
            self.assertOneLine("c", args, text)

    def test_no_raw_socket(self):
        """Root without CAP_NET_RAW (setpriv): both engines say they need it, in one line."""
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            raise unittest.SkipTest("needs root and setpriv to take CAP_NET_RAW away")
        drop = ["setpriv", "--bounding-set", "-net_raw", "--inh-caps", "-net_raw", "--"]
        for engine in ENGINES:
            for args in (("send", "--dst", "10.0.0.1", "--size", "64"), ("sink",)):
                binary()
                done = subprocess.run(drop + instrument.argv(*args, engine_name=engine), capture_output=True,
                                      text=True, env=child_env(), cwd=REPO, timeout=60)
                self.assertEqual(done.returncode, 2, (engine, args, done.stderr))
                self.assertEqual(len(done.stderr.splitlines()), 1, (engine, args, done.stderr))
                self.assertIn("needs root/CAP_NET_RAW", done.stderr, (engine, args))


class EngineLab:
    """A sender namespace and a sink namespace joined by a veth (MTU 1500)."""

    def __init__(self, testcase):
        binary()
        self.lab = netns.lab_for(testcase)
        self.gen, self.sink_ns = self.lab.namespace("gen"), self.lab.namespace("sink")
        self.veth = self.lab.veth(self.gen, self.sink_ns, "10.77.0.1/24", "10.77.0.2/24")
        self.dst = self.veth.ip_b
        self.link = measure.link_from(self.lab, self.veth)

    def start_sinks(self, run, engines=ENGINES, latency=True):
        """{engine: sink process}, each drained and ready."""
        sinks = {}
        for engine in engines:
            argv = ["sink", "--run", run, "--quiet", 0.1] + (["--latency"] if latency else [])
            proc = self.lab.spawn(self.sink_ns, instrument.argv(*argv, engine_name=engine),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=child_env(), cwd=REPO)
            ready = proc.stdout.readline()
            if not ready.startswith("ready {"):
                raise AssertionError(f"{engine} sink: {ready!r} {proc.stderr.read()}")
            drain = json.loads(ready[len("ready "):])
            if set(drain) != {"drained", "seconds", "quiet"} or drain["quiet"] is not True:
                raise AssertionError(f"{engine} sink: {ready!r}")
            # Named for profiles; and ``ip netns exec`` exec'd it (measure charges the child's CPU to it).
            with open(f"/proc/{proc.pid}/comm") as f:
                if f.read().strip() != "loadgen-sink":
                    raise AssertionError(f"{engine} sink is not process {proc.pid}, or not named")
            sinks[engine] = proc
        return sinks

    def stop_sinks(self, sinks):
        """{engine: the sink's result} after SIGUSR1."""
        results = {}
        for engine, proc in sinks.items():
            proc.send_signal(signal.SIGUSR1)
            out, err = proc.communicate(timeout=30)
            if proc.returncode != 0:
                raise AssertionError(f"{engine} sink failed: {err}")
            results[engine] = measure._json_line(out, f"{engine} sink")
        return results

    def send(self, engine, run, size=64, rate=20000, duration=0.3, keys=(7, 8, 9), flow_base=4, link=False):
        argv = ["send", "--dst", self.dst, "--size", size, "--rate", rate, "--duration", duration,
                "--keys", ",".join(map(str, keys)), "--flow-base", flow_base, "--run", run]
        if link:
            argv += self.link.argv()
        done = self.lab.run(self.gen, instrument.argv(*argv, engine_name=engine), env=child_env(), cwd=REPO)
        return json.loads(done.stdout)

    def trial(self, sender, run=1234, sink_run=None, **options):
        """(the sender's result, {engine: sink result}) of one send into both sinks."""
        sinks = self.start_sinks(sink_run or run)
        try:
            sent = self.send(sender, run, **options)
            time.sleep(0.05)
            return sent, self.stop_sinks(sinks)
        finally:
            for proc in sinks.values():
                if proc.poll() is None:
                    proc.kill()


SENDER_KEYS = ["sent", "errors", "seconds", "calls", "pps", "mbps", "size", "target_pps", "flows"]
SINK_KEYS = COUNTS + ("tail_seconds", "seconds", "latency_us", "drain")


class DifferentialTests(unittest.TestCase):
    """Each sender into both sinks at once, on real sockets across a veth."""

    def setUp(self):
        self.env = EngineLab(self)

    def assertSinksAgree(self, sinks):
        c, python = sinks["c"], sinks["python"]
        self.assertEqual(list(c), list(SINK_KEYS))
        self.assertEqual(list(python), list(SINK_KEYS))
        self.assertEqual({k: c[k] for k in COUNTS}, {k: python[k] for k in COUNTS})
        # Same packets, same kernel receive times, same probes: the same percentiles exactly.
        self.assertEqual(c["latency_us"], python["latency_us"])

    def assertDelivered(self, sent, sink, size, keys=3, flow_base=4):
        """*sink* counted exactly what the sender sent, every flow, with plausible latency."""
        n = sent["sent"]
        self.assertGreater(n, 100)
        expected = {"received": n, "other": 0, "stale": 0, "bytes": n * size, "highest_seq": n - 1,
                    "flows": keys, "per_flow_min": n // keys, "flow_min": flow_base, "flow_max": flow_base + keys - 1}
        self.assertEqual({k: sink[k] for k in COUNTS}, expected)
        latency = sink["latency_us"]
        self.assertEqual(latency["count"], n)
        self.assertTrue(0 < latency["min"] <= latency["p50"] <= latency["p99"] <= latency["p99.9"]
                        <= latency["max"] < 1e6, latency)
        self.assertTrue(latency["min"] <= latency["mean"] <= latency["max"], latency)
        self.assertGreater(sink["seconds"], 0)

    def check(self, sender, size=64, **options):
        sent, sinks = self.env.trial(sender, size=size, **options)
        self.assertEqual(list(sent), SENDER_KEYS)
        self.assertEqual((sent["errors"], sent["size"], sent["flows"]), (0, size, 3))
        self.assertEqual(sent["target_pps"], float(options.get("rate", 20000)))
        self.assertAlmostEqual(sent["pps"], sent["sent"] / sent["seconds"], places=3)
        self.assertAlmostEqual(sent["mbps"], sent["sent"] * size * 8 / sent["seconds"] / 1e6, places=3)
        self.assertSinksAgree(sinks)
        for engine in ENGINES:
            self.assertDelivered(sent, sinks[engine], size)
        return sent, sinks

    def test_c_sender(self):
        sent, _ = self.check("c")
        self.assertLess(abs(sent["pps"] - 20000), 2000, sent)   # the same pacing as loadgen.py

    def test_python_sender(self):
        self.check("python")

    def test_c_sender_link(self):
        """Ethernet frames on AF_PACKET (loadgen.Link) from C."""
        self.check("c", link=True, size=512)

    def test_python_sender_link(self):
        self.check("python", link=True, size=512)

    def test_fragmented(self):
        """Above the 1500-byte MTU: two fragments, reassembled for the sinks (a Link falls back to
        the raw IP socket, which can fragment)."""
        for sender, link in (("c", False), ("c", True), ("python", False)):
            self.check(sender, size=1800, rate=5000, link=link)

    def test_flat_out(self):
        """Rate 0: flat out, batches of 64; the sinks still agree with each other."""
        sent, sinks = self.env.trial("c", rate=0, duration=0.03, size=512)   # well within 64 MiB
        self.assertGreater(sent["sent"], 1000)
        self.assertEqual(sent["target_pps"], 0.0)
        self.assertSinksAgree(sinks)
        for engine in ENGINES:
            self.assertLessEqual(sinks[engine]["received"], sent["sent"])

    def test_stale(self):
        """A sink of another run counts every probe as stale, and nothing else."""
        for sender in ENGINES:
            sent, sinks = self.env.trial(sender, run=77, sink_run=78)
            self.assertSinksAgree(sinks)
            for engine in ENGINES:
                got = sinks[engine]
                self.assertEqual({k: got[k] for k in COUNTS},
                                 {"received": 0, "other": 0, "stale": sent["sent"], "bytes": 0, "highest_seq": 0,
                                  "flows": 0, "per_flow_min": 0, "flow_min": None, "flow_max": None}, engine)
                self.assertEqual(got["latency_us"], {"count": 0})
                self.assertGreater(got["seconds"], 0)


class PacketTests(unittest.TestCase):
    """What each sender puts on the wire, read on a raw socket at the far end, is
    loadgen.build_packet's packet (and, as Ethernet frames, Link.headers' IP header)."""

    def setUp(self):
        self.env = EngineLab(self)

    def received(self, engine, link, size=100, keys=(5, 6)):
        with self.env.lab.inside(self.env.sink_ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, loadgen.IPPROTO_GRE)
        sock.settimeout(0.5)
        self.addCleanup(sock.close)
        before = time.time_ns()
        sent = self.env.send(engine, 4321, size=size, rate=400, duration=0.05, keys=keys, flow_base=10, link=link)
        after = time.time_ns()
        packets = []
        while len(packets) < sent["sent"]:
            packets.append(sock.recv(4096))
        return sent, packets, before, after

    def check(self, engine, link):
        size, keys = 100, (5, 6)
        sent, packets, before, after = self.received(engine, link, size, keys)
        self.assertGreater(sent["sent"], 5)
        headers = self.env.link.headers(self.env.dst, size - loadgen.IP_HEADER)[14:]
        for seq, packet in enumerate(packets):
            self.assertEqual(len(packet), size)
            ip, body = packet[:loadgen.IP_HEADER], packet[loadgen.IP_HEADER:]
            if link:
                self.assertEqual(ip, headers)
            else:
                self.assertEqual((ip[9], ip[16:20]), (47, socket.inet_aton(self.env.dst)))
            stamp = int.from_bytes(body[32:40], "big")
            self.assertTrue(before <= stamp <= after, (before, stamp, after))
            self.assertEqual(body, loadgen.build_packet(size, keys[seq % 2], seq, flow=10 + seq % 2,
                                                        stamp=stamp, run=4321))

    def test_c_raw(self):
        self.check("c", link=False)

    def test_c_link(self):
        self.check("c", link=True)

    def test_python_raw(self):
        self.check("python", link=False)

    def test_python_link(self):
        self.check("python", link=True)


class SinkParsingTests(unittest.TestCase):
    """GRE the senders never send: with the ack field, without a probe, too short for one."""

    def test_ack_other_and_short(self):
        env = EngineLab(self)
        with env.lab.inside(env.gen):
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, loadgen.IPPROTO_GRE)
        self.addCleanup(sock.close)
        sinks = env.start_sinks(99)
        try:
            packets = []
            for seq in range(5):   # probes (K+S), then GRE too short to hold one at the same offset
                packets.append(loadgen.build_packet(100, 9, seq, flow=1, stamp=time.time_ns(), run=99))
            packets += [gre.build_gre(9, b"", seq=s) for s in range(2)]          # the header alone
            packets += [gre.build_gre(9, b"\xff\x03", seq=s) for s in range(2)]
            packets += [gre.build_gre(9, b"\xff\x03" + bytes(60), seq=s) for s in range(3)]  # no probe
            packets += [gre.build_gre(9, ack=1)]                                                  # ack only
            for seq in range(5, 8):   # probes after a GRE header with the ack field
                probe = loadgen.build_packet(100, 9, seq, flow=2, stamp=time.time_ns(), run=99)
                packets.append(gre.build_gre(9, probe[loadgen.GRE_HEADER:], seq=seq, ack=seq - 1))
            for packet in packets:
                sock.sendto(packet, (env.dst, 0))
                time.sleep(0.005)   # one recvmmsg each: the short ones land in a probe's slot
            time.sleep(0.05)
            got = env.stop_sinks(sinks)
        finally:
            for proc in sinks.values():
                if proc.poll() is None:
                    proc.kill()
        for engine in ENGINES:
            self.assertEqual({k: got[engine][k] for k in COUNTS},
                             {"received": 8, "other": 8, "stale": 0, "bytes": 5 * 100 + 3 * 104, "highest_seq": 7,
                              "flows": 2, "per_flow_min": 3, "flow_min": 1, "flow_max": 2}, engine)
            self.assertEqual(got[engine]["latency_us"]["count"], 8)
        self.assertEqual(got["c"]["latency_us"], got["python"]["latency_us"])


class InstrumentTests(unittest.TestCase):
    """benchmarks.instrument: the choice, the cached build, the fallback without a compiler."""

    def setUp(self):
        saved = {k: os.environ.get(k) for k in (instrument.ENV, "CC", "XDG_CACHE_HOME")}
        self.addCleanup(self._restore, saved)
        self.patch(instrument, "_built", {})
        self.patch(instrument, "_warned", set())
        self.cache = os.path.abspath(self.mktemp())
        os.environ["XDG_CACHE_HOME"] = self.cache
        os.environ.pop(instrument.ENV, None)

    @staticmethod
    def _restore(saved):
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def test_built_once_into_the_cache(self):
        path = binary()
        self.assertEqual(os.path.dirname(path), os.path.join(self.cache, "routeproxy-bench"))
        self.assertTrue(os.path.basename(path).startswith("loadgen-"))
        self.assertEqual(os.listdir(os.path.dirname(path)), [os.path.basename(path)])   # no temporary left
        self.assertEqual(instrument.engine(), "c")
        self.assertEqual(instrument.argv("sink", "--run", 5), [path, "sink", "--run", "5"])
        os.environ["CC"] = "/nonexistent/cc"   # a binary in the cache needs no compiler
        instrument._built.clear()
        self.assertEqual(instrument.build(), path)

    def test_python_when_asked(self):
        instrument.select("python")
        self.assertEqual(instrument.engine(), "python")
        self.assertEqual(instrument.argv("sink")[1:], ["-m", "benchmarks.loadgen", "sink"])
        self.assertRaises(ValueError, instrument.select, "rust")

    def test_python_without_a_compiler(self):
        for cc, reason in (("/nonexistent/cc", "no C compiler"), ("false", "failed")):
            os.environ["CC"] = cc
            instrument._built.clear()
            errors = []
            self.patch(instrument.sys, "stderr", type("Err", (), {"write": lambda self, text: errors.append(text)})())
            self.assertEqual([instrument.engine(), instrument.engine()], ["python", "python"])
            self.assertEqual(len(errors), 1, errors)   # said once
            self.assertIn(reason, errors[0])
            self.assertIn("using the Python engine", errors[0])
            self.assertEqual(instrument.argv("sink")[1:3], ["-m", "benchmarks.loadgen"])

    def test_the_trial_records_the_engine(self):
        from tests.unit.test_bench_directions import FakeLab, sink
        for engine in ENGINES:
            if engine == "c":
                binary()
            instrument.select(engine)
            lab = FakeLab({"server": sink(1000, [0])})
            got = measure.run_trial(lab, measure.Path("p", [("client", "10.0.0.1", [7], None)], "server"), 64, 0, 1.0)
            self.assertEqual(got["instrument"]["engine"], engine)
            self.assertEqual(set(got["instrument"]), {"engine", "send_cpu_s", "sink_cpu_s", "send_us_per_packet",
                                                      "sink_us_per_packet"})
            heads = {argv[0] for _, argv in lab.spawned}
            self.assertEqual(heads, {instrument.build()} if engine == "c" else {instrument.sys.executable})

    def test_fixedrate_table(self):
        from benchmarks import fixedrate
        rows = [{"path": "proxy", "rate": 1000, "delivered_pps": 999, "lrp_us_per_packet": 9.5,
                 "rrp_us_per_packet": 9.0, "latency_us": {"min": 15, "p50": 40, "p99": 200},
                 **fixedrate.instrument_cells({"instrument": {
                     "engine": engine, "send_us_per_packet": 12.5, "sink_us_per_packet": 5.0}})} for engine in ENGINES]
        lines = fixedrate.instruments_table(rows).splitlines()
        self.assertEqual([line.split() for line in lines[2:]],
                         [["1000", "proxy", engine, "999", "9.5", "9.0", "15/40/200", "12.5", "5.0"]
                          for engine in ENGINES])
