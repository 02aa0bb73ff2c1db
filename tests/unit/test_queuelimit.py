"""The GRE limit of a link's unsent bytes from its delivery rate (routeproxy.mux.queuelimit,
``--link-queue-delay``): the law, the link that uses it, and the kernel's rate read through a
real bottleneck (a veth shaped by tc's tbf in namespaces)."""
import socket
import subprocess
import threading
import time

from twisted.internet.task import Clock
from twisted.trial import unittest

from routeproxy.mux import frames as F
from routeproxy.mux.connection import MuxConfig, MuxConnection
from routeproxy.mux.queuelimit import QueueLimit, deliveryRate
from routeproxy.testing import RecordingMuxLink
from tests.support import netns

WATERMARK = 262144
MBIT = 125000.0   # bytes/s


class LawTests(unittest.SynchronousTestCase):
    def test_unknown_rate_keeps_the_watermark(self):
        q = QueueLimit(0.010)
        self.assertEqual(q.of(WATERMARK), WATERMARK)
        q.observe(0.0, 0, False, WATERMARK)   # no sample yet (a kernel saying 0)
        self.assertEqual(q.of(WATERMARK), WATERMARK)
        self.assertIsNone(q.snapshot(WATERMARK)["delivery_rate"])

    def test_the_delay_in_bytes_between_floor_and_watermark(self):
        for mbit, want in ((20, QueueLimit.FLOOR), (50, 62500), (100, 125000), (1000, WATERMARK)):
            q = QueueLimit(0.010)
            q.observe(0.0, mbit * MBIT, False, WATERMARK)
            self.assertEqual(q.of(WATERMARK), want, mbit)
        q = QueueLimit(0.010)
        q.observe(0.0, 20 * MBIT, False, WATERMARK)
        self.assertEqual(q.of(16384), 16384)   # a watermark under the floor stays the bound

    def test_largest_sample_of_the_window(self):
        q, w = QueueLimit(0.010), QueueLimit.WINDOW
        q.observe(0.0, 100 * MBIT, False, WATERMARK)
        q.observe(w * 0.6, 50 * MBIT, False, WATERMARK)
        self.assertEqual(q.rate, 100 * MBIT)
        q.observe(w * 1.2, 50 * MBIT, False, WATERMARK)   # the 100 Mbit/s sample left the window
        self.assertEqual(q.rate, 50 * MBIT)
        self.assertEqual(q.of(WATERMARK), 62500)

    def test_app_limited_samples_only_raise_it(self):
        q = QueueLimit(0.010)
        q.observe(0.0, 10 * MBIT, True, WATERMARK)    # the first figure, though app limited
        self.assertEqual(q.rate, 10 * MBIT)
        q.observe(0.1, 50 * MBIT, False, WATERMARK)
        q.observe(0.2, 5 * MBIT, True, WATERMARK)     # TCP had nothing to send: not the path's
        q.observe(1.15, 5 * MBIT, True, WATERMARK)
        self.assertEqual(q.rate, 50 * MBIT)            # kept: no sample in the window, held
        q.observe(1.3, 80 * MBIT, True, WATERMARK)     # higher, but a busy figure is in force
        self.assertEqual(q.rate, 50 * MBIT)
        q.observe(1.4, 60 * MBIT, False, WATERMARK)    # busy samples raise it at once
        self.assertEqual(q.rate, 60 * MBIT)

    def test_busy_samples_outrank_idle_ones(self):
        """While the window holds a sample taken busy (an overload: the path's own rate), an
        idle one (a burst through the path's token bucket, measured at the line's) is not
        taken, however high."""
        q = QueueLimit(0.010)
        q.observe(0.0, 20 * MBIT, False, WATERMARK)
        q.observe(0.1, 1500 * MBIT, True, WATERMARK)
        self.assertEqual((q.rate, q.of(WATERMARK)), (20 * MBIT, QueueLimit.FLOOR))
        q.observe(0.1 + QueueLimit.WINDOW * 1.5, 1500 * MBIT, True, WATERMARK)   # idle since,
        self.assertEqual(q.of(WATERMARK), QueueLimit.FLOOR)   # the busy figure still holds
        q.observe(QueueLimit.HOLD + 0.5, 1500 * MBIT, True, WATERMARK)   # and after the hold
        self.assertEqual(q.of(WATERMARK), QueueLimit.FLOOR)

    def test_a_busy_figure_is_the_start_after_any_idle(self):
        """An overload after idle meets the limit of the last one: the pings' app-limited
        samples (the line's rate, not the path's) neither lift it nor make it forgotten."""
        q = QueueLimit(0.010)
        q.observe(0.0, 20 * MBIT, False, WATERMARK)
        for t in range(2, 3600, 2):   # an hour of pings
            q.observe(float(t), 300 * MBIT, True, WATERMARK)
        self.assertEqual((q.rate, q.of(WATERMARK)), (20 * MBIT, QueueLimit.FLOOR))
        q.observe(3600.0, 100 * MBIT, False, WATERMARK)   # a busy sample moves it at once
        self.assertEqual(q.of(WATERMARK), 125000)

    def test_an_app_limited_figure_is_held_then_forgotten(self):
        q = QueueLimit(0.010)
        q.observe(0.0, 20 * MBIT, True, WATERMARK)   # no busy sample yet: taken
        q.observe(5.0, 1 * MBIT, True, WATERMARK)
        self.assertEqual(q.rate, 20 * MBIT)
        q.observe(10.5, 1 * MBIT, True, WATERMARK)
        self.assertIsNone(q.rate)
        self.assertEqual(q.of(WATERMARK), WATERMARK)

    def test_the_first_busy_sample_replaces_the_app_limited_ones(self):
        """A new link's app-limited samples (its HELLO, an overload's first 10 ms through a
        token bucket: the line's rate) do not outlive the first busy one in the window."""
        q = QueueLimit(0.010)
        q.observe(0.0, 1500 * MBIT, True, WATERMARK)
        self.assertEqual(q.of(WATERMARK), WATERMARK)
        q.observe(0.02, 20 * MBIT, False, WATERMARK)
        self.assertEqual(q.of(WATERMARK), QueueLimit.FLOOR)

    def test_sampled_sooner_until_the_first_busy_sample(self):
        q = QueueLimit(0.010)
        self.assertTrue(q.seeking)
        self.assertEqual((q.interval(True), q.interval(False)),
                         (QueueLimit.SEEK_INTERVAL, QueueLimit.IDLE_INTERVAL))   # idle: not 50/s
        q.observe(0.0, 1500 * MBIT, True, WATERMARK)
        self.assertEqual(q.interval(True), QueueLimit.SEEK_INTERVAL)
        q.observe(0.1, 20 * MBIT, False, WATERMARK)
        self.assertFalse(q.seeking)
        self.assertEqual((q.interval(True), q.interval(False)),
                         (QueueLimit.INTERVAL, QueueLimit.IDLE_INTERVAL))

    def test_off(self):
        q = QueueLimit(0.0)
        q.observe(0.0, 1 * MBIT, False, WATERMARK)
        self.assertEqual((q.of(WATERMARK), q.samples), (WATERMARK, 0))

    def test_counters(self):
        q = QueueLimit(0.010)
        for i, mbit in enumerate((20, 20, 1000)):
            q.observe(i * 2.0, mbit * MBIT, False, WATERMARK)
        self.assertEqual(q.snapshot(WATERMARK), {
            "limit": WATERMARK, "watermark": WATERMARK, "delay_ms": 10.0,
            "delivery_rate": 1000 * 125000, "samples": 3, "lowered": 2})


class LinkTests(unittest.SynchronousTestCase):
    """A MuxConnection asks its link's rate while it sends and drops GRE over the lowered limit."""

    def connection(self, rates, **config):
        clock = Clock()
        conn = MuxConnection(False, clock, MuxConfig(**config), sessionRequested=lambda *a: None)
        link = RecordingMuxLink(peerReads=False)
        link.deliveryRates = list(rates)
        conn.start(link)
        conn.dataReceived(F.Hello((1,), 16384, 65536, 10, 30, ()).encode())
        clock.advance(0)   # the HELLO is written: bytes out
        return conn, link, clock

    def gre(self, conn, n, size=1000):
        sent = [conn._queueGRE(1, 7, i, None, bytes(size)) for i in range(n)]
        conn.flush()
        return sum(sent)

    def test_slow_link_lowers_the_limit_and_drops_gre(self):
        conn, link, clock = self.connection([(20 * MBIT, False)])
        self.assertEqual(conn.greLimit, WATERMARK)
        clock.advance(QueueLimit.INTERVAL)
        self.assertEqual(link.rateAsked, 1)
        self.assertEqual(conn.greLimit, QueueLimit.FLOOR)
        sent = self.gre(conn, 100)   # 100 kB offered to a peer that reads nothing
        self.assertLess(link.buffered, QueueLimit.FLOOR + 2000)
        self.assertEqual(conn.stats.greDropped["watermark"], 100 - sent)
        self.assertGreater(100 - sent, 60)
        status = conn.snapshot()["send_queue"]
        self.assertEqual((status["limit"], status["delivery_rate"], status["lowered"]),
                         (QueueLimit.FLOOR, 20 * 125000, 1))

    def test_an_honest_session_beside_a_flood(self):
        """The limit is the link's, as the watermark was: while a flood holds the slow link's
        queue at the limit an honest session's frame is dropped too, counted; nothing closes,
        and once the queue drains the honest frame goes."""
        conn, link, clock = self.connection([(20 * MBIT, False)])
        clock.advance(QueueLimit.INTERVAL)
        flood = [conn._queueGRE(1, 7, i, None, bytes(1000)) for i in range(100)]
        honest = conn._queueGRE(2, 8, 0, None, bytes(100))
        conn.flush()
        self.assertFalse(honest)
        self.assertEqual(conn.stats.greDropped["watermark"], flood.count(False) + 1)
        link.buffered = 0   # the path drains what the link held
        clock.advance(QueueLimit.INTERVAL)
        self.assertTrue(conn._queueGRE(2, 8, 1, None, bytes(100)))
        conn.flush()
        self.assertFalse(conn.closed)
        self.assertFalse(link.aborted)

    def test_after_idle_the_limit_is_already_down(self):
        """An overload after a long idle (pings only, their samples app limited at the line's
        rate) meets the limit the last one measured, before any new sample."""
        conn, link, clock = self.connection([(20 * MBIT, False), (300 * MBIT, True)],
                                            deadTimeout=120.0)
        clock.advance(QueueLimit.SEEK_INTERVAL)
        self.assertEqual(conn.greLimit, QueueLimit.FLOOR)
        for _ in range(30):   # a minute, a ping every 2 s
            self.gre(conn, 1, size=40)
            link.buffered = 0
            clock.advance(2.0)
        self.assertFalse(conn.closed)
        self.assertGreater(link.rateAsked, 10)
        self.assertEqual(conn.greLimit, QueueLimit.FLOOR)
        self.assertLess(self.gre(conn, 100), 40)   # the overload's first turn

    def test_a_new_link_lowers_within_a_seek_interval(self):
        """A new link knows no rate: while it sends it samples every SEEK_INTERVAL, so an
        overload lowers the limit at its first busy sample; idle, it is looked at every
        IDLE_INTERVAL only (a daemon may hold many links), so the overload after an idle
        start waits for that look."""
        conn, link, clock = self.connection([(1500 * MBIT, True)])   # the HELLO: the line's
        clock.advance(1.0)   # idle
        self.assertEqual(conn.greLimit, WATERMARK)
        asked = link.rateAsked
        clock.advance(1.0)
        self.assertEqual(link.rateAsked, asked)   # idle: looked at, not asked
        link.deliveryRates = [(20 * MBIT, False)]
        self.gre(conn, 20)
        clock.advance(QueueLimit.IDLE_INTERVAL)   # the idle look that finds it sending
        self.assertEqual(conn.greLimit, QueueLimit.FLOOR)
        self.assertAlmostEqual(conn._queueSampler.getTime() - clock.seconds(), QueueLimit.INTERVAL)

    def test_fast_link_keeps_the_watermark(self):
        conn, link, clock = self.connection([(1000 * MBIT, False)])
        clock.advance(QueueLimit.INTERVAL)
        self.assertEqual(conn.greLimit, WATERMARK)
        self.assertEqual(self.gre(conn, 100), 100)

    def test_asked_only_after_sending(self):
        conn, link, clock = self.connection([(20 * MBIT, False)])
        clock.advance(QueueLimit.INTERVAL)
        clock.advance(QueueLimit.INTERVAL)   # nothing sent in between: a look, no question
        self.assertEqual(link.rateAsked, 1)
        self.gre(conn, 1)
        clock.advance(QueueLimit.INTERVAL)
        self.assertEqual(link.rateAsked, 1)   # idle, the next look is further off
        clock.advance(QueueLimit.IDLE_INTERVAL - QueueLimit.INTERVAL)
        self.assertEqual(link.rateAsked, 2)
        for _ in range(5):   # sending: every INTERVAL
            self.gre(conn, 1)
            clock.advance(QueueLimit.INTERVAL)
        self.assertEqual(link.rateAsked, 7)

    def test_off_never_asks(self):
        conn, link, clock = self.connection([(1 * MBIT, False)], linkQueueDelay=0.0)
        self.gre(conn, 1)
        clock.advance(1.0)
        self.assertEqual((link.rateAsked, conn.greLimit), (0, WATERMARK))

    def test_stops_with_the_link(self):
        conn, link, clock = self.connection([(20 * MBIT, False)])
        conn._shutdown("test")
        self.assertEqual([c for c in clock.getDelayedCalls()
                          if getattr(c.func, "__name__", "") == "_sampleQueue"], [])


class KernelRateTests(unittest.TestCase):
    """tcpi_delivery_rate as the kernel measures it, through a real 20 Mbit/s bottleneck."""

    def test_not_a_tcp_socket(self):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            self.assertIsNone(deliveryRate(udp))

    def shapedSender(self):
        """A TCP socket (non-blocking) whose path is a 20 Mbit/s tbf, its peer drained."""
        lab = netns.lab_for(self)
        a, b = lab.namespace("qa"), lab.namespace("qb")
        veth = lab.veth(a, b, "10.97.0.1/24", "10.97.0.2/24")
        tc = subprocess.run(["tc", "-n", a, "qdisc", "add", "dev", veth.name_a, "root", "tbf",
                             "rate", "20mbit", "burst", "16kb", "limit", "64kb"],
                            capture_output=True, text=True)
        if tc.returncode != 0:
            raise unittest.SkipTest(f"tc tbf: {tc.stderr.strip()}")
        with lab.inside(b):
            server = socket.socket()
            server.bind(("10.97.0.2", 0))
            server.listen(1)
        self.addCleanup(server.close)
        with lab.inside(a):
            sender = socket.create_connection(server.getsockname(), timeout=5)
        self.addCleanup(sender.close)
        peer, _ = server.accept()
        self.addCleanup(peer.close)
        done = threading.Event()

        def drain():
            while not done.is_set():
                try:
                    if not peer.recv(1 << 16):
                        return
                except OSError:
                    return
        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        self.addCleanup(reader.join, 5)
        self.addCleanup(done.set)
        sender.setblocking(False)
        return sender

    @staticmethod
    def fill(sender, chunk=bytes(65536)):
        try:
            while True:
                sender.send(chunk)
        except BlockingIOError:
            pass

    def test_rate_through_a_shaped_veth(self):
        sender = self.shapedSender()
        q, start = QueueLimit(0.010), time.monotonic()
        while time.monotonic() - start < 1.5:   # TCP never runs dry: samples are the path's
            self.fill(sender)
            time.sleep(QueueLimit.INTERVAL)
            q.observe(time.monotonic(), *deliveryRate(sender), WATERMARK)
        self.assertGreater(q.rate, 0.5 * 20 * MBIT)
        self.assertLess(q.rate, 1.5 * 20 * MBIT)
        # 25 kB in 10 ms, the floor; the kernel's samples read up to 1.5x the bucket's rate
        # (its burst), and 10 ms of that is a little over the floor (35.6 kB seen)
        self.assertEqual(q.of(WATERMARK), max(QueueLimit.FLOOR, int(q.rate * 0.010)))
        self.assertLess(q.of(WATERMARK), int(1.5 * 20 * MBIT * 0.010) + 1)

    def test_a_new_connection_lowers_early_in_an_overload(self):
        """A new link's first samples are app limited at the line's rate (its first bytes go
        through the bucket's burst); sampled as a new link is, the limit is down within
        0.1 s of an overload's start all the same."""
        sender = self.shapedSender()
        q = QueueLimit(0.010)
        sender.send(bytes(300))   # a HELLO
        time.sleep(0.05)
        q.observe(time.monotonic(), *deliveryRate(sender), WATERMARK)
        start = time.monotonic()
        while time.monotonic() - start < 0.1:
            self.fill(sender)
            time.sleep(q.interval(True))
            q.observe(time.monotonic(), *deliveryRate(sender), WATERMARK)
        self.assertFalse(q.seeking)
        self.assertEqual(q.of(WATERMARK), QueueLimit.FLOOR)
