"""routeproxy.greport on the real kernel: network namespaces and veth pairs
(tests/support/netns.py), real raw sockets and pypcap handles opened inside the namespaces,
the trial reactor delivering.  They skip, with the reason, when not root or without
``ip netns``.

``python -m tests.system.test_greport_kernel`` measures receive (pcap vs raw socket) and
send costs.
"""
import os
import socket
import struct
import subprocess
import sys
import time

from twisted.internet import defer, reactor, task
from twisted.internet.testing import MemoryReactor
from twisted.trial import unittest

from routeproxy import capture as capturemod
from routeproxy.capture import DLT_LINUX_SLL, GREIOError
from routeproxy.greport import GREPort
from routeproxy.testing import MemoryGRESystem, RecordingGREReceiver as Collector
from tests.support import netns
from tests.support.packets import OTHER, RECEIVER, SENDER, enhanced_gre, frame, ipv4


def settle(seconds=0.2):
    """Let the reactor run for a moment (to see that nothing more arrives)."""
    return task.deferLater(reactor, seconds, lambda: None)


# -- real kernel -------------------------------------------------------------------------------


def icmp_counters(lab, ns):
    """The Icmp: line of /proc/net/snmp in *ns* as a dict."""
    snmp = lab.read_proc(ns, "/proc/net/snmp")
    lines = [line.split() for line in snmp.splitlines() if line.startswith("Icmp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


def ip_counters(lab, ns):
    """The Ip: line of /proc/net/snmp in *ns* as a dict (FragCreates, ReasmOKs, ...)."""
    snmp = lab.read_proc(ns, "/proc/net/snmp")
    lines = [line.split() for line in snmp.splitlines() if line.startswith("Ip:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


def raw_rx_queues(lab, ns, protocol=47):
    """rx_queue of every raw socket of *protocol* in *ns* (/proc/net/raw), in bytes (GRE: the
    port's IPPROTO_RAW send socket, which receives nothing, is not one)."""
    rows = [row.split() for row in lab.read_proc(ns, "/proc/net/raw").splitlines()[1:]]
    return [int(row[4].split(":")[1], 16) for row in rows
            if int(row[1].split(":")[1], 16) == protocol]


class KernelTests(unittest.TestCase):
    """Real kernel: namespaces a (sender, 10.0.0.1) and b (receiver, 10.0.0.2 and .3) on a veth."""

    timeout = 30

    def setUp(self):
        self.lab = netns.lab_for(self)
        self.a, self.b = self.lab.namespace("snd"), self.lab.namespace("rcv")
        self.link = self.lab.veth(self.a, self.b, f"{SENDER}/24", f"{RECEIVER}/24")
        self.lab.address(self.b, self.link.name_b, f"{OTHER}/24")

    def open_port(self, ns, local, interface="any", capture="pcap", receiver=None, **kwargs):
        receiver = receiver or Collector()
        port = GREPort(receiver, local, interface=interface, capture=capture, **kwargs)
        with self.lab.inside(ns):
            port.startListening()
        self.addCleanup(port.stopListening)
        return port, receiver

    def raw_socket(self, ns, bind=None, connect=None):
        """A plain raw GRE socket in *ns* (what pptpd has), for sending or receiving."""
        with self.lab.inside(ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
        self.addCleanup(sock.close)
        if bind:
            sock.bind((bind, 0))
        if connect:
            sock.connect((connect, 0))
        return sock

    def sender(self):
        sock = self.raw_socket(self.a, bind=SENDER)
        capturemod.attachDropAll(sock)
        return sock

    @defer.inlineCallbacks
    def check_receives(self, capture):
        port, got = self.open_port(self.b, [RECEIVER], capture=capture)
        sock = self.sender()
        sent = [enhanced_gre(0x100 + i, os.urandom(20 + i)) for i in range(3)]
        for gre in sent:
            sock.sendto(gre, (RECEIVER, 0))
        packets = yield got.waitFor(3)
        self.assertEqual(packets, [(SENDER, RECEIVER, gre) for gre in sent])

    def test_receives_real_gre_pcap(self):
        return self.check_receives("pcap")

    def test_receives_real_gre_raw_socket(self):
        return self.check_receives("raw")

    @defer.inlineCallbacks
    def test_burst_read_several_per_wakeup(self):
        """200 packets queued before the reactor runs arrive in far fewer doRead calls."""
        port, got = self.open_port(self.b, [RECEIVER])
        sock = self.sender()
        n = 200
        for i in range(n):
            sock.sendto(enhanced_gre(7, struct.pack("!I", i) + bytes(1380)), (RECEIVER, 0))
        yield got.waitFor(n)
        self.assertEqual([struct.unpack("!I", p[2][12:16])[0] for p in got.packets], list(range(n)))
        self.assertLessEqual(port.stats.reads, n // 20, port.stats.asDict())
        self.assertEqual(port.snapshot()["dropped"], {})

    @defer.inlineCallbacks
    def test_only_gre_to_the_local_address(self):
        """GRE to another address of the same host never reaches the port (the kernel filter)."""
        port, got = self.open_port(self.b, [RECEIVER])
        sock = self.sender()
        for i in range(10):
            sock.sendto(enhanced_gre(i), (OTHER if i % 2 else RECEIVER, 0))
        yield got.waitFor(5)
        yield settle()
        self.assertEqual([p[2] for p in got.packets], [enhanced_gre(i) for i in range(0, 10, 2)])
        self.assertEqual((port.stats.received, dict(port.stats.dropped)), (5, {}))

    @defer.inlineCallbacks
    def test_own_outgoing_gre_never_captured(self):
        """Direction "in": with a filter that names no destination, our own sends stay unseen."""
        port, got = self.open_port(self.b, [RECEIVER], interface=self.link.name_b, bpfFilter="ip proto 47")
        sock = self.sender()
        for i in range(5):
            self.assertTrue(port.sendGRE(RECEIVER, SENDER, enhanced_gre(i, b"out")))
            sock.sendto(enhanced_gre(i, b"in"), (RECEIVER, 0))
        yield got.waitFor(5)
        yield settle()
        self.assertEqual([p[2] for p in got.packets], [enhanced_gre(i, b"in") for i in range(5)])
        self.assertEqual((port.stats.received, port.stats.sent), (5, 5))

    @defer.inlineCallbacks
    def test_no_icmp_protocol_unreachable(self):
        """With the port open the receiver emits no ICMP and queues no copies; closed, it does."""
        port, got = self.open_port(self.b, [RECEIVER])
        sock = self.sender()
        before = icmp_counters(self.lab, self.b)["OutDestUnreachs"]
        for i in range(20):
            sock.sendto(enhanced_gre(i, b"x" * 100), (RECEIVER, 0))
        yield got.waitFor(20)
        yield settle()
        self.assertEqual(icmp_counters(self.lab, self.b)["OutDestUnreachs"], before)
        queues = raw_rx_queues(self.lab, self.b)
        self.assertEqual(len(queues), 1)  # the send socket bound to RECEIVER
        self.assertEqual(queues, [0])  # its drop-all filter kept the 20 copies out
        yield port.stopListening()
        sock.sendto(enhanced_gre(99), (RECEIVER, 0))
        yield settle()
        self.assertGreater(icmp_counters(self.lab, self.b)["OutDestUnreachs"], before)

    @defer.inlineCallbacks
    def test_send_leaves_from_the_chosen_source(self):
        port, _ = self.open_port(self.b, [RECEIVER, OTHER])
        listener = self.raw_socket(self.a)
        listener.settimeout(2)
        self.assertTrue(port.sendGRE(RECEIVER, SENDER, enhanced_gre(1, b"from .2")))
        self.assertTrue(port.sendGRE(OTHER, SENDER, enhanced_gre(2, b"from .3")))
        seen = []
        for _ in range(2):
            data = listener.recv(2048)  # raw IPv4: the header shows the source
            seen.append((socket.inet_ntoa(data[12:16]), data[20:]))
        self.assertEqual(seen, [(RECEIVER, enhanced_gre(1, b"from .2")),
                                (OTHER, enhanced_gre(2, b"from .3"))])
        self.assertEqual(port.stats.sent, 2)
        yield settle(0)

    @defer.inlineCallbacks
    def check_loopback_shared(self, interface):
        """An RRP (127.0.0.2) next to pptpd (127.0.0.1) on one host's loopback.

        Both a pcap handle for 127.0.0.1 (as pptpd's host sees the traffic; not a second
        port: a port never captures GRE a port sent, tests/unit/test_selfmark.py) and a
        pptpd-like raw socket (bound 127.0.0.1, connected to 127.0.0.2) get exactly their
        own packets; the RRP port sees only GRE to 127.0.0.2 and none of its own.
        """
        host = self.lab.namespace("host")
        rrp, to_rrp = self.open_port(host, ["127.0.0.2"], interface=interface)
        to_pptpd = Collector()
        import pcap
        with self.lab.inside(host):   # plain pypcap (a PcapCapture drops our GRE: its mark)
            pptpd_pcap = pcap.pcap(name=interface, snaplen=2048, promisc=False,
                                   immediate=True, timeout_ms=1)
        pptpd_pcap.setfilter(capturemod.greFilter(["127.0.0.1"]))
        pptpd_pcap.setdirection(pcap.PCAP_D_IN)
        pptpd_pcap.setnonblock(True)
        self.addCleanup(pptpd_pcap.close)
        pptpd_port = GREPort(to_pptpd, ["127.0.0.1"], reactor=MemoryReactor(),
                             system=MemoryGRESystem(pptpd_pcap.datalink()))
        pptpd_port.startListening()   # its parser, fed below from the real pcap handle
        self.addCleanup(pptpd_port.stopListening)
        pptpd_sock = self.raw_socket(host, bind="127.0.0.1", connect="127.0.0.2")
        pptpd_sock.settimeout(2)
        n = 30
        for i in range(n):
            self.assertTrue(rrp.sendGRE("127.0.0.2", "127.0.0.1", enhanced_gre(1000 + i, b"up")))
            pptpd_sock.send(enhanced_gre(2000 + i, b"down"))
        yield to_rrp.waitFor(n)
        yield settle()
        pptpd_pcap.dispatch(n + 1, pptpd_port._frameReceived)
        self.assertEqual(to_rrp.packets,
                         [("127.0.0.1", "127.0.0.2", enhanced_gre(2000 + i, b"down")) for i in range(n)])
        self.assertEqual(to_pptpd.packets,
                         [("127.0.0.2", "127.0.0.1", enhanced_gre(1000 + i, b"up")) for i in range(n)])
        got = [pptpd_sock.recv(2048)[20:] for _ in range(n)]
        self.assertEqual(got, [enhanced_gre(1000 + i, b"up") for i in range(n)])
        self.assertEqual((dict(rrp.stats.dropped), dict(pptpd_port.stats.dropped)), ({}, {}))

    def test_loopback_rrp_next_to_pptpd_on_lo(self):
        return self.check_loopback_shared("lo")

    def test_loopback_rrp_next_to_pptpd_on_any(self):
        return self.check_loopback_shared("any")

    @defer.inlineCallbacks
    def check_receives_fragmented(self, interface):
        """A 1550-byte GRE over the 1500-MTU veth arrives as two fragments; the port delivers it whole."""
        port, got = self.open_port(self.b, [RECEIVER], interface=interface)
        sock = self.sender()
        sock.setsockopt(socket.IPPROTO_IP, capturemod.IP_MTU_DISCOVER, capturemod.IP_PMTUDISC_DONT)
        big = [enhanced_gre(0x200 + i, os.urandom(1538)) for i in range(3)]
        sent = []
        for gre in big:
            sent += [gre, enhanced_gre(0x300, b"small")]
            sock.sendto(gre, (RECEIVER, 0))
            sock.sendto(enhanced_gre(0x300, b"small"), (RECEIVER, 0))
        packets = yield got.waitFor(len(sent))
        self.assertEqual(packets, [(SENDER, RECEIVER, gre) for gre in sent])
        self.assertEqual([len(gre) for gre in big], [1550] * 3)
        stats = port.snapshot()
        self.assertEqual((stats["fragments"], stats["reassembled"], stats["reassembling"], stats["dropped"]),
                         (6, 3, 0, {}))

    def test_receives_fragmented_gre_pcap_on_any(self):
        return self.check_receives_fragmented("any")

    def test_receives_fragmented_gre_pcap_on_the_veth(self):
        return self.check_receives_fragmented(self.link.name_b)

    @defer.inlineCallbacks
    def test_send_larger_than_mtu_is_fragmented_with_df_clear(self):
        """sendGRE of 1550 bytes on a 1500-MTU link: the kernel fragments it, the peer reassembles.

        Every packet also leaves with DF clear, as pptpd's do: a raw socket's default
        (IP_PMTUDISC_WANT) sets DF on packets that fit, and IP_PMTUDISC_DO refuses big ones
        with EMSGSIZE.
        """
        port, _ = self.open_port(self.b, [RECEIVER])
        listener = self.raw_socket(self.a)
        listener.settimeout(2)
        before_b, before_a = ip_counters(self.lab, self.b), ip_counters(self.lab, self.a)
        big, small = enhanced_gre(1, os.urandom(1538)), enhanced_gre(2, bytes(1380))
        self.assertTrue(port.sendGRE(RECEIVER, SENDER, big))
        self.assertTrue(port.sendGRE(RECEIVER, SENDER, small))
        seen = [listener.recv(4096) for _ in range(2)]
        self.assertEqual([data[20:] for data in seen], [big, small])
        self.assertEqual([data[6] & 0x40 for data in seen], [0, 0])  # DF clear
        after_b, after_a = ip_counters(self.lab, self.b), ip_counters(self.lab, self.a)
        self.assertEqual(after_b["FragCreates"] - before_b["FragCreates"], 2)
        self.assertEqual(after_a["ReasmOKs"] - before_a["ReasmOKs"], 1)
        self.assertEqual(port.snapshot()["dropped"], {})
        yield settle(0)

    def test_capture_on_missing_interface(self):
        port = GREPort(Collector(), [RECEIVER], interface="nosuch0")
        with self.lab.inside(self.b):
            error = self.assertRaises(GREIOError, port.startListening)
        self.assertIn("nosuch0", str(error))


class NetnsHelperTests(unittest.TestCase):
    """tests/support/netns.py itself: processes die and names disappear at cleanup; leftovers are reaped."""

    def setUp(self):
        netns.skip_unless_available()

    def names(self):
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        return namespaces + links

    def test_cleanup_kills_processes_and_removes_names(self):
        lab = netns.NetnsLab()
        a, b = lab.namespace("one"), lab.namespace("two")
        root_end = lab.veth(None, b, str(lab.subnet()[1]) + "/24")
        inner = lab.veth(a, b, "10.9.0.1/24", "10.9.0.2/24")
        self.assertIn(inner.name_b, lab.run(b, ["ip", "-o", "link"]).stdout)
        self.assertEqual(lab.python(a, "import sys; print(sys.argv[1])", "hello").stdout, "hello\n")
        sleeper = lab.spawn(a, ["sh", "-c", "sleep 60 & sleep 60"])
        self.assertRaises(netns.NetnsError, lab.run, a, ["false"])
        self.assertEqual(lab.cleanup(), [])
        self.assertIsNotNone(sleeper.poll())
        listing = self.names()
        for name in (a, b, root_end.name_a):
            self.assertNotIn(name, listing)
        self.assertEqual(lab.cleanup(), [])  # idempotent

    def test_spawn_with_log_and_wait_tcp(self):
        lab = netns.lab_for(self)
        ns = lab.namespace("srv")
        log = self.mktemp()
        server = lab.spawn(ns, [sys.executable, "-c", (
            "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 8123)); s.listen();"
            "print('listening', flush=True); time.sleep(60)")], logfile=log)
        lab.wait_tcp(ns, "127.0.0.1", 8123, proc=server)
        with open(log) as f:
            self.assertEqual(f.read(), "listening\n")
        self.assertRaises(OSError, socket.create_connection, ("127.0.0.1", 8123), 0.5)  # not in root
        quitter = lab.spawn(ns, ["true"])
        error = self.assertRaises(netns.NetnsError, lab.wait_tcp, ns, "127.0.0.1", 8124, 5, quitter)
        self.assertIn("exited", str(error))

    def test_inside_returns_to_the_root_namespace(self):
        lab = netns.lab_for(self)
        ns = lab.namespace("in")
        home = os.readlink("/proc/thread-self/ns/net")
        with lab.inside(ns):
            self.assertNotEqual(os.readlink("/proc/thread-self/ns/net"), home)
            self.assertEqual([i[1] for i in socket.if_nameindex()], ["lo"])
        self.assertEqual(os.readlink("/proc/thread-self/ns/net"), home)

    def test_reap_stale_removes_names_of_dead_processes(self):
        dead = _dead_pid()
        name = f"{netns.NS_PREFIX}{dead}-0-stale"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", name], capture_output=True)
        netns.reap_stale()
        self.assertNotIn(name, self.names())


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- measurements (python -m tests.system.test_greport_kernel) ---------------------------------------------------


def _drain(port, n, deadline=10.0):
    start = time.perf_counter()
    while port.stats.received < n and time.perf_counter() - start < deadline:
        port.doRead()
    return time.perf_counter() - start


def measure(n=50000, size=1400):
    """Receive: fill the capture with *n* GRE packets while not reading, then time the drain."""
    netns.skip_unless_available()
    lab = netns.NetnsLab()
    try:
        a, b = lab.namespace("snd"), lab.namespace("rcv")
        lab.veth(a, b, f"{SENDER}/24", f"{RECEIVER}/24")
        with lab.inside(a):
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
        sock.bind((SENDER, 0))
        capturemod.attachDropAll(sock)
        gre = enhanced_gre(7, bytes(size - 16))

        class Null:
            def greReceived(self, src, dst, gre):
                pass

        for kind in ("pcap", "raw", "pcap", "raw"):
            port = GREPort(Null(), [RECEIVER], capture=kind, bufferSize=256 * 1024 * 1024)
            with lab.inside(b):
                port.startListening()
            port.stopReading()
            for _ in range(n):
                sock.sendto(gre, (RECEIVER, 0))
            took = _drain(port, n)
            stats = port.snapshot()
            print(f"receive {kind:4s}: {stats['received']} of {n} in {took:.3f}s = "
                  f"{took / max(stats['received'], 1) * 1e9:.0f} ns/packet, "
                  f"{stats['received'] / took:,.0f} packets/s, reads {stats['reads']}, "
                  f"dropped {stats['dropped']}")
            port.stopListening()

        port = GREPort(Null(), [RECEIVER])
        with lab.inside(b):
            port.startListening()
        port.stopReading()
        for name, call in (("sendGRE (bound socket per source)", lambda: port.sendGRE(RECEIVER, SENDER, gre)),
                           ("IP_HDRINCL sendto, header built", _hdrincl(lab, b, gre))):
            for _ in range(2):
                start = time.perf_counter()
                for _ in range(n):
                    call()
                took = time.perf_counter() - start
                print(f"send {name}: {took / n * 1e9:.0f} ns/packet")
        print("send stats", port.snapshot())
        port.stopListening()

        system = MemoryGRESystem()
        port = GREPort(Null(), [RECEIVER], system=system, reactor=MemoryReactor())
        port.startListening()
        port.maxPacketsPerRead = n
        system.captures[0].batch = n
        system.captures[0].frames.extend([frame(DLT_LINUX_SLL, ipv4(SENDER, RECEIVER, gre))] * n)
        start = time.perf_counter()
        port.doRead()
        print(f"parse+deliver only (memory capture): {(time.perf_counter() - start) / n * 1e9:.0f} ns/packet")
    finally:
        lab.cleanup()


def _hdrincl(lab, ns, gre):
    with lab.inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    capturemod.attachDropAll(sock)
    sock.setblocking(False)
    head = struct.pack("!BBHHHBBH", 0x45, 0, 0, 0, 0x4000, 64, 47, 0)
    aton = socket.inet_aton

    def send():
        try:
            sock.sendto(head + aton(RECEIVER) + aton(SENDER) + gre, (SENDER, 0))
        except OSError:
            pass
    return send


if __name__ == "__main__":
    measure(*map(int, sys.argv[1:]))
