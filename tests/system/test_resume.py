"""Sessions survive a link loss (issue 11): clients -> LRP -> NAT -> RRP -> server, real daemons.

The topology is tests/support/e2e.py's (the NAT masquerades towards the RRP and drops GRE, so
GRE crosses only inside the link).  Three scripted clients each hold one call and, all the
time, send GRE (50 packets/s, echoed by the scripted server), a numbered Set-Link-Info every
0.1 s (the server records them: the client->server control stream is hash-checked) and an
Echo-Request every 0.5 s (the replies must come back in order, none missing).  Mid-traffic the
NAT breaks the link's TCP with iptables:

- ``reset``: REJECT --reject-with tcp-reset both ways for 3 s: every session goes on with
  the same call IDs and the same server connection; GRE is lost only around the gap;
- ``black hole``: DROP both ways for 20 s (set ROUTEPROXY_SLOW_TESTS=1): the same;
- a gap longer than ``--resume-grace``: every session ends in PPTP at both ends
  (Call-Disconnect-Notify + Stop-Control-Connection-Request to the clients, Call-Clear-Request
  + Stop-Control-Connection-Request to the server), no call ID stays in use, and a new
  session works afterwards.

The server runs in this process (in its namespace), so the test reads what it received.
A last test puts two RRPs behind HAProxy (TCP mode) and kills the one in use.

Needs root (and haproxy for the last test); skipped with the reason otherwise.
"""
import hashlib
import os
import selectors
import shutil
import signal
import struct
import threading
import time

from twisted.python import log
from twisted.trial import unittest

from routeproxy import gre, pptp
from tests.support import e2e, netns, packets, pptppeers
from tests.support.daemons import daemons_missing
from tests.support.wait import wait_until

CLIENTS = 3
RRP_STATUS, LRP_STATUS = 8093, 8094
GRE_INTERVAL = 0.02
LINK_INFO_INTERVAL = 0.1
ECHO_INTERVAL = 0.5


class TrafficClient:
    """One client with one call: GRE, numbered Set-Link-Info and Echo-Requests on a schedule."""

    def __init__(self, topo, index):
        self.name = f"resume{index}"
        address = topo.client_addresses[index]
        opener = lambda: topo.lab.inside(topo.clients_ns)  # noqa: E731
        self.control = pptppeers.PPTPClient((topo.lrps[0].address, e2e.PPTP_PORT), address,
                                            name=self.name, opener=opener, strict=False)
        self.raw = pptppeers.open_raw_gre(address, opener)
        self.raw.setblocking(False)
        assert self.control.start().result_code == pptp.StartResult.SUCCESS
        self.reply = self.control.call()
        assert self.reply.result_code == pptp.OutgoingCallResult.CONNECTED
        self.key = self.reply.call_id           # L: the LRP's ID for the call
        self.sentAt = {}                        # GRE seq -> when sent
        self.echoed = set()
        self.linkInfos = []                     # (send_accm, receive_accm) sent, in order
        self.echoesSent = 0
        self.echoReplies = []                   # identifiers, in arrival order
        self.others = []                        # any other control message received

    def sendGRE(self, now):
        seq = len(self.sentAt)
        self.sentAt[seq] = now
        packet = gre.build_gre(self.key, pptppeers.PPP_LIKE + struct.pack("!I", seq), seq=seq)
        self.raw.sendto(packet, (self.control.sock.getpeername()[0], 0))

    def sendLinkInfo(self):
        k = len(self.linkInfos)
        fields = (k, int.from_bytes(hashlib.sha256(f"{self.name}:{k}".encode()).digest()[:4], "big"))
        self.linkInfos.append(fields)
        self.control.send(pptp.SetLinkInfo(peer_call_id=self.key, send_accm=fields[0], receive_accm=fields[1]))

    def sendEcho(self):
        self.echoesSent += 1
        self.control.send(pptp.EchoRequest(identifier=self.echoesSent))

    def readGRE(self):
        while True:
            try:
                frame = self.raw.recv(65535)
            except BlockingIOError:
                return
            try:
                _, _, data = packets.parse_ipv4_gre(frame)
                _, _, _, payload = gre.split_gre(data)
            except gre.GREError:
                continue
            if payload.startswith(pptppeers.PPP_LIKE) and len(payload) == 8:
                self.echoed.add(struct.unpack("!I", payload[4:])[0])

    def readControl(self):
        if not self.control.receive():
            return
        while self.control.inbox:
            message = self.control.inbox.pop(0)
            if isinstance(message, pptp.EchoReply):
                self.echoReplies.append(message.identifier)
            else:
                self.others.append(message)

    def lost(self):
        return sorted(set(self.sentAt) - self.echoed)


class Traffic(threading.Thread):
    """Drives every client's schedule until stopped (then drains for a moment)."""

    def __init__(self, clients):
        super().__init__(daemon=True)
        self.clients = clients
        self.stopping = threading.Event()
        self.sending = True
        self.error = None

    def run(self):
        selector = selectors.DefaultSelector()
        for client in self.clients:
            selector.register(client.control.sock, selectors.EVENT_READ, client.readControl)
            selector.register(client.raw, selectors.EVENT_READ, client.readGRE)
        nextGRE = nextInfo = nextEcho = time.monotonic()
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                if self.sending:
                    if now >= nextGRE:
                        for client in self.clients:
                            client.sendGRE(now)
                        nextGRE += GRE_INTERVAL
                    if now >= nextInfo:
                        for client in self.clients:
                            client.sendLinkInfo()
                        nextInfo += LINK_INFO_INTERVAL
                    if now >= nextEcho:
                        for client in self.clients:
                            client.sendEcho()
                        nextEcho += ECHO_INTERVAL
                for key, _ in selector.select(0.005):
                    key.data()
        except Exception as e:   # reported by the test
            self.error = e
        finally:
            selector.close()

    def finish(self, drain=3.0):
        self.sending = False
        time.sleep(drain)
        self.stopping.set()
        self.join(5)


class ResumeTestCase(unittest.TestCase):
    """The daemons, the in-process server and the NAT's cut; the tests are in the subclasses."""

    timeout = 150

    def setUp(self):
        netns.skip_unless_available()
        missing = daemons_missing()
        if missing:
            raise unittest.SkipTest(missing)

    def build(self, grace=30):
        topo = e2e.build(CLIENTS + 1, lab=netns.lab_for(self))
        self.addCleanup(topo.cleanup)
        server_ns = topo.servers[0]
        listener = pptppeers.listen(server_ns.address, opener=lambda: topo.lab.inside(server_ns.ns))
        raw = pptppeers.open_raw_gre(server_ns.address, lambda: topo.lab.inside(server_ns.ns))
        self.server = pptppeers.ScriptedServer(server_ns.address, first_call_id=200).start(listener, raw)
        self.addCleanup(self.server.stop)
        e2e.make_certs(topo, ["lrp0"])
        link = ["--resume-grace", str(grace)]
        self.rrp = e2e.start_rrp(topo, status_port=RRP_STATUS, extra=link)
        self.lrp = e2e.start_lrp(topo, status_port=LRP_STATUS, extra=link)
        self.lrp.wait_line(r"LRP: link to the RRP .* is up", timeout=15)
        self.topo = topo
        return topo

    def cut(self, target, seconds):
        """The NAT breaks the link's TCP (port 4443 both ways) for *seconds*."""
        rules = [("-p", "tcp", "--dport", str(e2e.RRP_PORT)), ("-p", "tcp", "--sport", str(e2e.RRP_PORT))]
        verdict = ("-j", "REJECT", "--reject-with", "tcp-reset") if target == "reset" else ("-j", "DROP")
        nat = self.topo.nat.ns
        for rule in rules:
            self.topo.lab.iptables(nat, "-I", "FORWARD", *rule, *verdict)
        started = time.monotonic()
        time.sleep(seconds)
        for rule in rules:
            self.topo.lab.iptables(nat, "-D", "FORWARD", *rule, *verdict)
        return started, time.monotonic()

    def clients(self):
        clients = [TrafficClient(self.topo, i) for i in range(CLIENTS)]
        self.addCleanup(lambda: [c.control.close() or c.raw.close() for c in clients])
        return clients

    def callIDsInUse(self, daemon, port):
        return sum(space["in_use"] for space in daemon.status(port)["call_ids"])

    def diagnose(self):
        return self.topo.logs()



class LinkCutTests(ResumeTestCase):

    def survives(self, target, seconds):
        self.build()
        clients = self.clients()
        calls_before = {c.name: (c.key, c.reply.peer_call_id) for c in clients}
        server_calls_before = sorted(self.server.calls)
        traffic = Traffic(clients)
        traffic.start()
        time.sleep(2)
        since = self.lrp.mark()
        cut_start, cut_end = self.cut(target, seconds)
        resumed = self.lrp.wait_line(r"link resumed after", since, timeout=40)
        resumed_at = time.monotonic()
        time.sleep(3)
        traffic.finish()
        self.assertIsNone(traffic.error)

        lines = self.lrp.lines(r"link resumed after|detached|resume refused", since)
        status_lrp, status_rrp = self.lrp.status(), self.rrp.status()
        with self.topo.logs_on_failure():
            self.assertEqual(len(self.server.connections), CLIENTS, "a client's session was redialled")
            self.assertEqual(sorted(self.server.calls), server_calls_before, "the server's calls changed")
            for client in clients:
                self.assertEqual((client.key, client.reply.peer_call_id), calls_before[client.name])
                self.assertEqual(client.others, [], f"{client.name} got unexpected messages")
                # control, client -> server: every Set-Link-Info, in order, once
                [connection] = [c for c in self.server.connections if c.host_name == client.name.encode()]
                received = [(m.send_accm, m.receive_accm) for m in connection.received
                            if isinstance(m, pptp.SetLinkInfo)]
                self.assertEqual(hashlib.sha256(repr(received).encode()).hexdigest(),
                                 hashlib.sha256(repr(client.linkInfos).encode()).hexdigest(),
                                 f"{client.name}: {len(received)} of {len(client.linkInfos)} Set-Link-Info")
                # control, server -> client: every Echo-Reply, in order
                self.assertEqual(client.echoReplies, list(range(1, client.echoesSent + 1)))
                # GRE: lost only around the gap
                lost = client.lost()
                outside = [s for s in lost if not cut_start - 0.5 <= client.sentAt[s] <= resumed_at + 0.5]
                self.assertEqual(outside, [], f"{client.name}: GRE lost outside the gap "
                                 f"({len(lost)} lost of {len(client.sentAt)})")
                self.assertTrue(lost, f"{client.name}: no GRE lost: was the link cut at all?")
            self.assertEqual(status_lrp["resume"]["resumes_done"], 1, status_lrp["resume"])
            self.assertEqual(status_rrp["resume"]["sessions_resumed"], CLIENTS, status_rrp["resume"])
            self.assertGreater(status_lrp["drops"].get("mux_detached", 0), 0, status_lrp["drops"])
        gap = time.monotonic()
        log.msg(f"test_resume: {target} {seconds} s: {resumed.strip()}; cut {cut_end - cut_start:.1f} s, "
              f"GRE lost per client {[len(c.lost()) for c in clients]} of {[len(c.sentAt) for c in clients]}; "
              f"lines {len(lines)}; {gap - cut_start:.1f} s")

    def test_reset_for_3_seconds(self):
        self.survives("reset", 3)

    def test_black_hole_for_20_seconds(self):
        if not os.environ.get("ROUTEPROXY_SLOW_TESTS"):
            raise unittest.SkipTest("set ROUTEPROXY_SLOW_TESTS=1 (about 40 s)")
        self.survives("drop", 20)

    def test_gap_longer_than_the_grace_time(self):
        self.build(grace=3)
        clients = self.clients()
        rrp_before = self.callIDsInUse(self.rrp, RRP_STATUS)
        self.assertEqual(rrp_before, CLIENTS)
        since = self.lrp.mark()
        self.cut("reset", 7)
        with self.topo.logs_on_failure():
            self.lrp.wait_line(r"detached session\(s\) closed: not resumed within 3 s", since, timeout=5)
            for client in clients:
                disconnect = client.control.expect(pptp.CallDisconnectNotify, 5)
                self.assertEqual(disconnect.call_id, client.key)
                client.control.expect(pptp.StopControlConnectionRequest, 5)
                self.assertTrue(client.control.wait_closed(5))
            for connection in self.server.connections:
                self.assertTrue(connection.closed.wait(5))
                kinds = [type(m) for m in connection.received]
                self.assertIn(pptp.CallClearRequest, kinds)
                self.assertEqual(kinds[-1], pptp.StopControlConnectionRequest)
            self.assertEqual(self.server.calls, {})
            wait_until(lambda: self.callIDsInUse(self.rrp, RRP_STATUS) == 0, 5, "the RRP to free its call IDs")
            wait_until(lambda: self.callIDsInUse(self.lrp, LRP_STATUS) == 0, 5, "the LRP to free its call IDs")
            self.lrp.wait_line(r"LRP: link to the RRP .* is up", since, timeout=15)
            later = pptppeers.PPTPClient((self.topo.lrps[0].address, e2e.PPTP_PORT),
                                         self.topo.client_addresses[CLIENTS], name="later",
                                         opener=lambda: self.topo.lab.inside(self.topo.clients_ns))
            self.addCleanup(later.close)
            self.assertEqual(later.start().result_code, pptp.StartResult.SUCCESS)
            later.round_trip()


HAPROXY_CONFIG = """\
global
    maxconn 256
defaults
    mode tcp
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    retries 2
    option redispatch
frontend rrps
    bind {listen}:{port}
    default_backend rrps
backend rrps
    balance first
    server a {a}:{port} check inter 300 fall 2 rise 2
    server b {b}:{port} check inter 300 fall 2 rise 2
"""


class FailoverTests(ResumeTestCase):
    """Two RRPs behind HAProxy in TCP mode (Debian's package), run by the test in the NAT
    namespace: SIGKILL the RRP in use; the LRP reconnects through HAProxy to the other one,
    whose refusal of the RESUME ends the old sessions cleanly, and new sessions work."""

    def setUp(self):
        super().setUp()
        if shutil.which("haproxy") is None:
            raise unittest.SkipTest("haproxy is not installed (make apt)")

    def interface(self, ns, address):
        """The interface of *ns* that carries *address*."""
        for line in self.topo.lab.run(ns, ["ip", "-o", "-4", "addr"]).stdout.splitlines():
            if f" {address}/" in line:
                return line.split()[1]
        raise AssertionError(f"no interface with {address} in {ns}")

    def test_rrp_behind_haproxy_fails_over(self):
        topo = e2e.build(2, lab=netns.lab_for(self))
        self.addCleanup(topo.cleanup)
        self.topo = topo
        lab, rrp_ns, nat_ns = topo.lab, topo.rrp.ns, topo.nat.ns
        server_side = topo.servers[0]
        lab.address(rrp_ns, self.interface(rrp_ns, "10.3.0.2"), "10.3.0.3/24")
        lab.address(rrp_ns, self.interface(rrp_ns, server_side.gateway), "10.4.0.3/24")
        listener = pptppeers.listen(server_side.address, opener=lambda: lab.inside(server_side.ns))
        self.server = pptppeers.ScriptedServer(server_side.address, first_call_id=300).start(listener)
        self.addCleanup(self.server.stop)
        e2e.make_certs(topo, ["lrp0"])
        rrps = {}
        for name, address, source, status in (("a", "10.3.0.2", "10.4.0.1", RRP_STATUS),
                                              ("b", "10.3.0.3", "10.4.0.3", RRP_STATUS + 10)):
            topo.rrp = e2e.Side(rrp_ns, address)
            rrps[name] = e2e.start_rrp(topo, status_port=status, extra=["--source", source])
            rrps[name].name = f"rrp-{name}"
        config = os.path.join(topo.workdir, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(HAPROXY_CONFIG.format(listen="10.2.0.1", port=e2e.RRP_PORT, a="10.3.0.2", b="10.3.0.3"))
        haproxy = lab.spawn(nat_ns, ["haproxy", "-db", "-f", config],
                            logfile=os.path.join(topo.workdir, "haproxy.log"))
        self.addCleanup(netns.stop_process, haproxy)
        lab.wait_tcp(nat_ns, "10.2.0.1", e2e.RRP_PORT, proc=haproxy)
        topo.rrp = e2e.Side(nat_ns, "10.2.0.1")          # the LRP dials HAProxy
        self.lrp = e2e.start_lrp(topo, status_port=LRP_STATUS)
        self.lrp.wait_line(r"LRP: link to the RRP .* is up", timeout=15)
        opener = lambda: lab.inside(topo.clients_ns)  # noqa: E731

        with topo.logs_on_failure():
            before = pptppeers.PPTPClient((topo.lrps[0].address, e2e.PPTP_PORT), topo.client_addresses[0],
                                          name="before", opener=opener, strict=False)
            self.addCleanup(before.close)
            self.assertEqual(before.start().result_code, pptp.StartResult.SUCCESS)
            call = before.call()
            self.assertEqual(self.server.connection_named("before").peer[0], "10.4.0.1", "not through RRP a")
            since = self.lrp.mark()
            rrps["a"].stop(signal.SIGKILL)
            self.lrp.wait_line(r"resume refused \(UNKNOWN_TOKEN", since, timeout=20)
            disconnect = before.expect(pptp.CallDisconnectNotify, 5)
            self.assertEqual(disconnect.call_id, call.call_id)
            before.expect(pptp.StopControlConnectionRequest, 5)
            self.assertTrue(before.wait_closed(5))
            self.assertEqual(self.callIDsInUse(self.lrp, LRP_STATUS), 0)

            after = pptppeers.PPTPClient((topo.lrps[0].address, e2e.PPTP_PORT), topo.client_addresses[1],
                                         name="after", opener=opener)
            self.addCleanup(after.close)
            self.assertEqual(after.start().result_code, pptp.StartResult.SUCCESS)
            after.round_trip()
            self.assertEqual(self.server.connection_named("after").peer[0], "10.4.0.3", "not through RRP b")
            self.assertEqual(self.lrp.status()["resume"]["resumes_refused"], 1)
