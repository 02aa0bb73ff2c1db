"""Issue 14: three calls on one client control connection, to a server that takes one per connection.

pptp-linux puts every pppd of a host dialling the same server on one control connection;
pptpd (poptop) serves one call per control connection and closes it on a second
Outgoing-Call-Request.  Here the scripted server (tests/support/pptppeers.py) does the same
(``calls_per_connection=1``), and one scripted client opens three calls on one control
connection and sends GRE on each:

* straight to the server: 1 of 3 calls is connected (and carries GRE until the second
  request closes the connection);
* through LRP -> RRP (real twistd daemons, real sockets and raw GRE): 3 of 3, each on its
  own control connection from the RRP, GRE echoed on every call;
* hanging up one call leaves the others carrying GRE; the client's
  Stop-Control-Connection-Request ends every upstream connection; an upstream connection
  that dies ends only its own call, with a Call-Disconnect-Notify to the client (the
  primary's too: another connection takes its place).

Everything runs inside one network namespace on its ``lo``:

    client   127.0.1.N
    lrp      127.0.0.30:1723 -> rrp                       --gre-interface lo
    rrp      127.0.0.10:4443 --source 127.0.0.11 -> server (profile default: calls-per-connection 1)
    server   127.0.0.20:1723 (in this process, with a raw GRE socket: echoes GRE of its calls)

Needs root (namespaces, pcap, raw sockets); skipped with the reason otherwise.
"""
import itertools
import os

from twisted.trial import unittest

from routeproxy import pptp
from tests.support import daemons, netns, pptppeers
from tests.support.daemons import Daemon
from tests.support.pptppeers import PeerError, PPTPClient
from tests.support.wait import wait_until

SERVER = ("127.0.0.20", 1723)
RRP, RRP_SOURCE = ("127.0.0.10", 4443), "127.0.0.11"
LRP = ("127.0.0.30", 1723)
RRP_STATUS = 8095
RRP_NAME = "rrp.callsplit.test"
CALLS = 3
PACKETS = 5


def hostport(address):
    return f"{address[0]}:{address[1]}"


class CallSplitTests(unittest.TestCase):

    def setUp(self):
        self.lab = netns.lab_for(self)
        self.ns = self.lab.namespace("split")
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.addresses = (f"127.0.1.{n}" for n in itertools.count(1))
        inside = self.inside
        self.server = pptppeers.ScriptedServer(*SERVER, first_call_id=100, calls_per_connection=1)
        raw = pptppeers.open_raw_gre(SERVER[0], inside)
        self.addCleanup(raw.close)
        self.server.start(pptppeers.listen(*SERVER, opener=inside, backlog=16), raw)
        self.addCleanup(self.server.stop)
        c = daemons.make_certs(self.workdir, RRP_NAME, ["lrp1"])
        self.rrp = Daemon(self.lab, self.ns, self.workdir, "rrp", "routeproxy-rrp", [
            "--listen", hostport(RRP), "--pptp-server", hostport(SERVER), "--source", RRP_SOURCE,
            "--status", f"127.0.0.1:{RRP_STATUS}", "--cert", c["rrp_cert"], "--key", c["rrp_key"],
            "--ca", c["ca"], "--gre-interface", "lo"])
        self.lrp = Daemon(self.lab, self.ns, self.workdir, "lrp", "routeproxy-lrp", [
            "--pptp-listen", hostport(LRP), "--rrp", hostport(RRP), "--rrp-name", RRP_NAME,
            "--cert", c["lrp_cert"], "--key", c["lrp_key"], "--ca", c["ca"], "--gre-interface", "lo"])
        self.rrp.status_port = RRP_STATUS
        self.rrp.start()
        self.addCleanup(daemons.stop_all, [self.lrp, self.rrp])
        self.rrp.wait_ready(listen=RRP, status_port=RRP_STATUS)
        self.lrp.start()
        self.lrp.wait_ready(listen=LRP, link_port=RRP[1])

    def inside(self):
        return self.lab.inside(self.ns)

    def diagnosis(self):
        return (f"\n{self.lrp.describe()}\n{self.rrp.describe()}\nserver: {self.server.status()}")

    def client(self, target):
        """A client on its own address with its raw GRE socket: (control connection, raw, address)."""
        bind = next(self.addresses)
        client = PPTPClient(target, bind, name=f"pns-{bind}", opener=self.inside, answer_echoes=True,
                            strict=False)
        raw = pptppeers.open_raw_gre(bind, self.inside)
        self.addCleanup(client.close)
        self.addCleanup(raw.close)
        self.assertEqual(client.start().result_code, pptp.StartResult.SUCCESS)
        return client, raw, bind

    def three_calls(self, target):
        """Place 3 calls on one control connection, each proven with GRE as it comes up.

        Returns {our call ID: (the ID we were given, echoes when placed)} for the connected ones.
        """
        client, raw, bind = self.client(target)
        up = {}
        for call_id in range(1, CALLS + 1):
            try:
                reply = client.call(call_id=call_id, timeout=3)
            except (PeerError, OSError):
                continue
            if reply.result_code != pptp.OutgoingCallResult.CONNECTED:
                continue
            echoes = pptppeers.echo_calls(raw, target, bind, [(call_id, reply.call_id)], PACKETS,
                                          round_no=call_id)
            up[call_id] = (reply.call_id, echoes[call_id])
        return client, raw, bind, up

    def echo(self, raw, bind, up, round_no, target=LRP):
        """GRE on every call of *up* at once; {our call ID: echoes}."""
        return pptppeers.echo_calls(raw, target, bind, [(c, up[c][0]) for c in sorted(up)], PACKETS,
                                    round_no=round_no)

    def rrp_session(self):
        sessions = self.rrp.status()["sessions"]
        self.assertEqual(len(sessions), 1, sessions)
        return sessions[0]

    def upstream_connections(self):
        """The server's control connections from the RRP, in order."""
        return [c for c in self.server.connections if c.peer[0] == RRP_SOURCE]

    def test_baseline_one_of_three_then_three_of_three_through_the_proxy(self):
        # Straight to the one-call server: the second request closes the connection.
        client, raw, bind, up = self.three_calls(SERVER)
        self.assertEqual(sorted(up), [1], f"direct: {up}")
        self.assertEqual(up[1][1], PACKETS)
        self.assertTrue(client.wait_closed(3), "the server kept the connection after a second call")
        self.assertEqual(self.server.closed_on_extra_call, 1)
        baseline = len(up)

        # Through the proxies: every call gets its own control connection to the server.
        client, raw, bind, up = self.three_calls(LRP)
        self.assertEqual({c: echoes for c, (_, echoes) in up.items()}, {1: PACKETS, 2: PACKETS, 3: PACKETS},
                         self.diagnosis())
        self.assertEqual(self.echo(raw, bind, up, 10), {1: PACKETS, 2: PACKETS, 3: PACKETS}, self.diagnosis())
        upstream = self.upstream_connections()
        self.assertEqual([len(c.calls) for c in upstream], [1, 1, 1])
        self.assertEqual(self.server.closed_on_extra_call, 1)   # only the baseline's
        session = self.rrp_session()
        self.assertEqual([(u["connection"], u["primary"], u["calls"]) for u in session["upstreams"]],
                         [(1, True, [1]), (2, False, [2]), (3, False, [3])])
        self.assertEqual(len({u["local"] for u in session["upstreams"]}), 3)
        self.assertEqual({u["local"].split(":")[0] for u in session["upstreams"]}, {RRP_SOURCE})
        print(f"\ntest_callsplit: direct to a one-call server {baseline} of {CALLS} calls connected; "
              f"through LRP/RRP {len(up)} of {CALLS}, each echoing {PACKETS} of {PACKETS} GRE")

        # Hang up call 2: the others carry on; its upstream connection is stopped.
        notify = client.clear(2, match=lambda m: m.call_id == up[2][0])
        self.assertEqual(notify.call_id, up[2][0])
        del up[2]
        self.assertTrue(upstream[1].closed.wait(5), "the RRP kept the hung-up call's connection")
        self.assertEqual(self.echo(raw, bind, up, 11), {1: PACKETS, 3: PACKETS}, self.diagnosis())
        self.assertEqual([u["calls"] for u in self.rrp_session()["upstreams"]], [[1], [3]])

        # Stop-Control-Connection-Request from the client ends every upstream connection.
        self.assertEqual(client.stop().result_code, pptp.StopResult.OK)
        for connection in upstream:
            self.assertTrue(connection.closed.wait(5), f"upstream connection {connection.number} still open"
                            + self.diagnosis())
        wait_until(lambda: not self.rrp.status()["sessions"], 5, "the RRP session to end")
        counters = self.rrp.status()["upstream_connections"]
        self.assertEqual(counters, {"open": 0, "opened": 2, "failed": 0, "lost": 0})

    def test_upstream_that_dies_ends_only_its_call(self):
        client, raw, bind, up = self.three_calls(LRP)
        self.assertEqual(sorted(up), [1, 2, 3], self.diagnosis())
        upstream = self.upstream_connections()

        upstream[2].vanish()   # the connection carrying call 3 dies with a reset
        notify = client.expect(pptp.CallDisconnectNotify, 5)
        self.assertEqual((notify.call_id, notify.result_code), (up[3][0], pptp.DisconnectResult.LOST_CARRIER))
        del up[3]
        self.assertEqual(self.echo(raw, bind, up, 20), {1: PACKETS, 2: PACKETS}, self.diagnosis())
        self.rrp.wait_line(r"RRP upstream connection 3 closed: .*calls ended: C=3 ")

        upstream[0].vanish()   # the primary: call 1 ends, connection 2 carries on as the primary
        notify = client.expect(pptp.CallDisconnectNotify, 5)
        self.assertEqual(notify.call_id, up[1][0])
        del up[1]
        self.assertEqual(self.echo(raw, bind, up, 21), {2: PACKETS}, self.diagnosis())
        client.echo()   # the client's own Echo-Request now goes over connection 2
        self.assertFalse(client.eof)
        self.assertEqual([(u["connection"], u["primary"]) for u in self.rrp_session()["upstreams"]],
                         [(2, True)])
        self.assertEqual(self.rrp.status()["upstream_connections"]["lost"], 2)
