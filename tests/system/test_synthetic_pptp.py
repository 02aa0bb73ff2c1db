"""The scripted PPTP peers (tests/support/pptppeers.py) against each other, directly over a
veth (no proxy, no NAT).

If these pass, a failing end-to-end test points at the proxies, not at the peers.  The
namespace tests need root; the classification test feeds crafted frames through a Unix
datagram socket pair standing in for the raw GRE socket (faked: no kernel GRE there).
"""
import json
import os
import socket
import subprocess
import sys
import time

from twisted.trial import unittest

from routeproxy import gre, pptp
from tests.support import daemons, netns
from tests.support import pptppeers as peers
from tests.support.packets import ipv4, parse_ipv4_gre

SERVER = "10.9.0.1"
CLIENTS = ["10.9.0.11", "10.9.0.12"]
OUTSIDER = "10.9.0.99"


class ClassifyEchoesTests(unittest.SynchronousTestCase):
    """What the client counts as its own echo, a duplicate, foreign, or not for it."""

    def setUp(self):
        self.raw, self.feeder = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(self.raw.close)
        self.addCleanup(self.feeder.close)
        self.client = peers.EchoClient(("10.0.0.1", 1723), "10.0.0.5", call_id=7, name="me")
        self.mine = peers.payload_for("me", 1, 0, 0)
        self.pending = {self.mine: 7, peers.payload_for("me", 1, 0, 1): 7}
        self.received = set()
        self.result = peers.RoundResult(1)

    def feed(self, key, payload, dst="10.0.0.5", seq=0):
        self.feeder.send(ipv4("10.0.0.1", dst, gre.build_gre(key, payload, seq=seq)))

    def receive(self):
        self.client.collect(self.raw, self.pending, self.received, self.result, 0.05)

    def test_own_echo_then_duplicate(self):
        self.feed(7, self.mine)
        self.feed(7, self.mine)
        self.receive()
        self.assertEqual((self.result.echoed, self.result.duplicates, self.result.foreign), (1, 1, 0))
        self.assertEqual(self.received, {self.mine})

    def test_someone_elses_payload_is_foreign(self):
        self.feed(7, peers.payload_for("other", 1, 0, 0))
        self.receive()
        self.assertEqual((self.result.echoed, self.result.foreign), (0, 1))
        self.assertIn("other", self.result.foreign_samples[0])

    def test_own_payload_with_the_wrong_key_is_foreign(self):
        self.feed(8, self.mine)
        self.receive()
        self.assertEqual((self.result.echoed, self.result.foreign), (0, 1))

    def test_other_destination_ignored_and_acks_counted(self):
        self.feed(7, self.mine, dst="10.0.0.6")
        self.feeder.send(ipv4("10.0.0.1", "10.0.0.5", gre.build_gre(7, ack=3)))
        self.receive()
        self.assertEqual((self.result.echoed, self.result.foreign, self.result.acks), (0, 0, 1))

    def test_report_ok_only_when_complete_and_clean(self):
        complete = peers.RoundResult(1)
        complete.sent = complete.echoed = 10
        self.client.packets = 10
        self.assertTrue(peers.client_report(self.client, [complete], 0.0)["ok"])
        lossy = peers.RoundResult(1)
        lossy.sent, lossy.echoed, lossy.missing = 10, 9, 1
        self.assertFalse(peers.client_report(self.client, [lossy], 0.0)["ok"])
        self.assertTrue(peers.client_report(self.client, [lossy], 0.1)["ok"])
        complete.foreign = 1
        self.assertFalse(peers.client_report(self.client, [complete], 0.5)["ok"])


class DirectTests(unittest.TestCase):
    """Clients and server in two namespaces joined by one veth."""

    def setUp(self):
        self.lab = netns.lab_for(self)
        self.clients_ns = self.lab.namespace("clients")
        self.server_ns = self.lab.namespace("server")
        link = self.lab.veth(self.server_ns, self.clients_ns, f"{SERVER}/24", f"{CLIENTS[0]}/24")
        for address in CLIENTS[1:] + [OUTSIDER]:
            self.lab.address(self.clients_ns, link.name_b, f"{address}/24")
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.server = peers.ServerProcess(self.lab, self.server_ns, SERVER, self.workdir, first_call_id=500)

    def status(self):
        """The server's last status, after it has been stopped."""
        status = self.server.stop()
        self.assertIsNotNone(status, self.server.describe())
        return status

    def client(self, bind, *options):
        argv = [sys.executable, "-m", "tests.support.pptppeers", "client", "--server", SERVER,
                "--bind", bind, *options]
        return self.lab.spawn(self.clients_ns, argv, cwd=daemons.REPO, env=daemons.child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def report(self, proc):
        out, err = proc.communicate(timeout=30)
        self.assertTrue(out.strip(), f"no report; stderr: {err}")
        return proc.returncode, json.loads(out.splitlines()[-1])

    def test_all_echoes_return_over_rounds_and_calls(self):
        rc, report = self.report(self.client(CLIENTS[0], "--call-id", "7", "--calls", "3",
                                             "--packets", "20", "--rounds", "2"))
        self.assertEqual((rc, report["ok"], report["errors"]), (0, True, []), report)
        self.assertEqual((report["sent"], report["echoed"], report["foreign"], report["missing"]),
                         (120, 120, 0, 0))
        self.assertEqual(report["server_ids"], [[500, 501, 502], [503, 504, 505]])
        self.assertEqual([r["call_ids"] for r in report["rounds"]], [[7, 8, 9], [7, 8, 9]])
        status = self.status()
        self.assertEqual(status["peer_call_ids"], [7, 8, 9, 7, 8, 9])
        self.assertEqual(status["gre_echoed"], 120)
        self.assertEqual(status["active_calls"], [])
        self.assertEqual(status["dropped"], {})
        self.assertEqual(status["control"]["Call-Clear-Request"], 6)

    def test_two_clients_same_call_id_on_different_connections(self):
        procs = [self.client(address, "--call-id", "1", "--packets", "30") for address in CLIENTS]
        reports = [self.report(proc) for proc in procs]
        for rc, report in reports:
            self.assertEqual((rc, report["echoed"], report["foreign"], report["missing"]), (0, 30, 0, 0), report)
        self.assertEqual(sorted(r["server_ids"][0][0] for _, r in reports), [500, 501])
        status = self.status()
        self.assertEqual(status["peer_call_ids"], [1, 1])
        self.assertEqual({c["peer"] for c in status["calls_seen"]}, set(CLIENTS))

    def test_server_drops_gre_like_pptpd(self):
        """GRE from another address than the control connection's, or with an unknown ID, is dropped."""
        inside = lambda: self.lab.inside(self.clients_ns)  # noqa: E731
        control = peers.PPTPClient((SERVER, 1723), CLIENTS[0], opener=inside)
        raw_mine, raw_outsider = peers.open_raw_gre(CLIENTS[0], inside), peers.open_raw_gre(OUTSIDER, inside)
        self.addCleanup(control.close)
        self.addCleanup(raw_mine.close)
        self.addCleanup(raw_outsider.close)
        self.assertEqual(control.start().result_code, pptp.StartResult.SUCCESS)
        reply = control.call(call_id=42)
        self.assertEqual((reply.peer_call_id, reply.result_code), (42, pptp.OutgoingCallResult.CONNECTED))
        payload = peers.PPP_LIKE + b"probe"
        raw_outsider.sendto(gre.build_gre(reply.call_id, payload, seq=0), (SERVER, 0))
        raw_mine.sendto(gre.build_gre(reply.call_id + 1000, payload, seq=1), (SERVER, 0))
        raw_mine.sendto(gre.build_gre(reply.call_id, payload, seq=2), (SERVER, 0))
        raw_mine.settimeout(5)
        src, dst, data = parse_ipv4_gre(raw_mine.recv(65535))
        key, seq, ack, echoed = gre.split_gre(data)
        self.assertEqual((src, dst, key, ack, echoed), (SERVER, CLIENTS[0], 42, 2, payload))
        time.sleep(0.1)
        status = self.status()
        self.assertEqual(status["dropped"], {"source is not the control connection's peer": 1,
                                             "unknown call ID": 1})
        self.assertEqual(status["gre_echoed"], 1)

    def test_client_fails_when_gre_is_lost(self):
        self.lab.iptables(self.server_ns, "-A", "INPUT", "-p", "gre", "-j", "DROP")
        rc, report = self.report(self.client(CLIENTS[0], "--packets", "5", "--timeout", "0.5"))
        self.assertEqual((rc, report["ok"], report["echoed"], report["missing"]), (1, False, 0, 5), report)
        self.assertEqual(report["errors"], [])  # control still worked: only GRE was lost


class ServerCallIdTests(unittest.SynchronousTestCase):
    """The scripted server's own call IDs (no network)."""

    def test_counter_from_first_call_id_skips_ids_in_use_and_wraps(self):
        server = peers.ScriptedServer("10.0.0.1", first_call_id=0xFFFE)
        ids = [server.allocate(1, "10.0.0.2", 1).call_id for _ in range(3)]
        self.assertEqual(ids, [0xFFFE, 0xFFFF, 1])
        server.release(server.calls[0xFFFF])
        server.next_call_id = 0xFFFE
        self.assertEqual(server.allocate(1, "10.0.0.2", 1).call_id, 0xFFFF)  # 0xFFFE is taken
        self.assertEqual(server.status()["active_calls"], [1, 0xFFFE, 0xFFFF])
        self.assertEqual(server.status()["peer_call_ids"], [1, 1, 1, 1])

    def test_mirror_answers_with_the_peer_id_when_free(self):
        server = peers.ScriptedServer("10.0.0.1", first_call_id=100, mirror=True)
        self.assertEqual(server.allocate(7, "10.0.0.2", 1).call_id, 7)
        self.assertEqual(server.allocate(7, "10.0.0.3", 2).call_id, 100)  # 7 is in use
        self.assertIsNotNone(server.calls[7].opened)
        self.assertIsNone(server.calls[7].closed)
