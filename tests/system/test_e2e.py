"""End to end on the host kernel (issue 4's acceptance): clients -> LRP -> NAT -> RRP -> server.

Scripted PPTP peers (tests/support/pptppeers.py) speak real control messages over TCP and real
GRE over raw sockets; the daemons are started as a user starts them, with
``twistd -n routeproxy-lrp|rrp`` and the documented options (tests/support/e2e.py,
tests/support/daemons.py).  The NAT
namespace masquerades towards the RRP and drops every GRE packet it would forward, so GRE
can only cross it inside the proxies' TLS link.

Needs root (namespaces, raw sockets, pcap); the proxy tests also need routeproxy.lrp and
routeproxy.rrp.  On a failed assertion the daemons' logs are appended to the message.
"""
import contextlib
import re
import time

from twisted.trial import unittest

from tests.support import e2e, netns, pptppeers
from tests.support.daemons import daemons_missing
from tests.support.wait import HarnessError, wait_until

CLIENTS = 8
PACKETS = 20
HOLD = 1.0          # seconds the first round's clients keep their calls up, so that all overlap
STATUS_PORT = 8090  # the daemons' --status endpoint, on loopback inside their namespaces


class E2ETestCase(unittest.TestCase):
    timeout = 90

    def topology(self, n_clients, **kwargs):
        topo = e2e.build(n_clients, lab=netns.lab_for(self), **kwargs)
        self.addCleanup(topo.cleanup)
        return topo

    def assertAllEchoed(self, reports, expected_each):
        """Every client got every one of its echoes and nothing foreign, without errors."""
        bad = [r for r in reports
               if not r.get("ok") or r.get("echoed") != expected_each or r.get("foreign") or r.get("errors")]
        self.assertEqual(bad, [], f"clients that failed:\n{e2e.summarize(bad)}\n\nall:\n{e2e.summarize(reports)}")

    def waitForCalls(self, topo, daemons, calls):
        """Wait until each daemon's /status.json shows *calls* calls and as many call IDs in use."""
        seen = {}

        def settled():
            for daemon in daemons:
                status = daemon.status()
                seen[daemon.name] = (status["calls"], [s["in_use"] for s in status["call_ids"]])
            return all(n == calls and sum(in_use) == calls for n, in_use in seen.values())

        try:
            wait_until(settled, 10, f"{calls} calls on {[d.name for d in daemons]}")
        except HarnessError as e:
            self.fail(f"{e}: (calls, call IDs in use) per daemon: {seen}")

    def assertSessionLines(self, daemon, sessions):
        """*daemon*'s log has one "session opened:" and one "session closed:" line per session."""
        def count(event):
            return len(re.findall(rf"session {event}:", daemon.log(), re.I))
        with contextlib.suppress(HarnessError):
            wait_until(lambda: count("closed") >= sessions, 5, f"{daemon.name} closing its sessions")
        self.assertEqual((count("opened"), count("closed")), (sessions, sessions),
                         f"{daemon.name}: 'session opened:' and 'session closed:' lines")

    def assertNoConcurrentCollisions(self, status, name):
        clashes = pptppeers.concurrent_collisions(status)
        self.assertEqual(clashes, [], f"{name} had calls open at once with the same peer and peer call ID")


class BaselineTests(E2ETestCase):
    """Without the proxies: the problem the proxies solve."""

    def test_clients_directly_through_the_nat_get_no_echoes(self):
        topo = self.topology(4, routed=True)
        with topo.logs_on_failure():
            server = e2e.start_server(topo)
            reports = e2e.baseline(topo, server, call_id=1, packets=5, timeout=1.0)
            status = server.stop()
            summary = e2e.summarize(reports)
            for report in reports:
                # Control crosses the NAT fine (TCP is masqueraded) ...
                self.assertEqual(report["errors"], [], summary)
                self.assertEqual(len(report["server_ids"][0]), 1, summary)
                # ... but not one GRE echo comes back.
                self.assertEqual((report["ok"], report["echoed"], report["missing"]), (False, 0, 5), summary)
            self.assertEqual(status["gre_echoed"], 0)
            # The server sees one address with the same peer call ID four times over.
            self.assertEqual({c["peer"] for c in status["calls_seen"]}, {topo.nat.address})
            self.assertEqual(status["peer_call_ids"], [1, 1, 1, 1])
            self.assertNotEqual(pptppeers.concurrent_collisions(status), [], status["calls_seen"])
            counters = topo.lab.run(topo.nat.ns, ["iptables", "-L", "FORWARD", "-v", "-n", "-x"], check=False).stdout
            gre_rule = [line.split() for line in counters.splitlines() if "DROP" in line and "47" in line]
            if gre_rule:  # iptables-nft and -legacy both print "pkts bytes target prot ..."
                self.assertGreaterEqual(int(gre_rule[0][0]), 4 * 5, counters)


    def test_masquerade_alone_breaks_gre_even_when_allowed(self):
        """Without the drop rule GRE reaches the server, but the echoes, keyed with the clients'
        call IDs, match no conntrack entry (no pptp helper): no client gets its echoes back."""
        topo = self.topology(4, routed=True, drop_gre=False)
        with topo.logs_on_failure():
            server = e2e.start_server(topo)
            reports = e2e.baseline(topo, server, call_id=1, packets=5, timeout=1.0)
            status = server.stop()
            self.assertEqual(status["gre_echoed"], 4 * 5, status)
            self.assertEqual([r for r in reports if r["ok"]], [], e2e.summarize(reports))


class DaemonTestCase(E2ETestCase):
    """Tests that start the daemons: skipped with the reason when they cannot run."""

    def setUp(self):
        netns.skip_unless_available()
        reason = daemons_missing()
        if reason:
            raise unittest.SkipTest(reason)


class ProxyTests(DaemonTestCase):
    """The daemons between the clients and the server(s)."""

    def test_same_call_id_clients_through_one_lrp(self):
        topo = self.topology(CLIENTS)
        with topo.logs_on_failure():
            e2e.make_certs(topo, ["lrp0"])
            server = e2e.start_server(topo)
            rrp = e2e.start_rrp(topo, status_port=STATUS_PORT)
            lrp = e2e.start_lrp(topo, status_port=STATUS_PORT)
            target = f"{lrp.address}:{e2e.PPTP_PORT}"

            # Round one, all calls held up at once: both daemons own one ID per call.
            clients = e2e.start_clients(topo, target, call_id=1, packets=PACKETS, hold=HOLD)
            self.waitForCalls(topo, [rrp, lrp], CLIENTS)
            during = server.status()
            self.assertEqual(sorted(during["active_calls"]), list(range(1, CLIENTS + 1)))
            active = [c for c in during["calls_seen"] if c["closed"] is None]
            self.assertEqual(len({c["peer_call_id"] for c in active}), CLIENTS,
                             f"the server must see distinct call IDs: {active}")
            reports = clients.wait()
            self.assertAllEchoed(reports, PACKETS)

            # Tear-down freed every ID on both daemons ...
            self.waitForCalls(topo, [rrp, lrp], 0)
            # ... and the same clients, with the same call ID, work again (two more rounds).
            reports = e2e.run_clients(topo, target, call_id=1, packets=PACKETS, rounds=2)
            self.assertAllEchoed(reports, 2 * PACKETS)
            self.waitForCalls(topo, [rrp, lrp], 0)

            status = server.status()
            self.assertEqual(len(status["calls_seen"]), 3 * CLIENTS, status["calls_seen"])
            self.assertNoConcurrentCollisions(status, "server0")
            self.assertEqual(status["active_calls"], [])
            self.assertEqual(status["control"].get("Call-Clear-Request"), 3 * CLIENTS, status["control"])
            self.assertEqual(status["gre_echoed"], 3 * CLIENTS * PACKETS)
            self.assertEqual(status["dropped"], {})
            # The clients saw LRP-owned IDs: distinct among the calls of one round.
            for round_index in range(2):
                ids = [r["server_ids"][round_index][0] for r in reports]
                self.assertEqual(len(set(ids)), CLIENTS, ids)
            # One line per session opened and closed on each daemon (issue 4, "Both").
            self.assertSessionLines(lrp, 3 * CLIENTS)
            self.assertSessionLines(rrp, 3 * CLIENTS)

    def test_two_lrps_on_one_rrp(self):
        topo = self.topology(CLIENTS, n_lrps=2)
        with topo.logs_on_failure():
            e2e.make_certs(topo, ["lrp0", "lrp1"])
            server = e2e.start_server(topo)
            e2e.start_rrp(topo)
            lrps = [e2e.start_lrp(topo, 0), e2e.start_lrp(topo, 1)]
            reports = e2e.run_clients(
                topo, lambda i: f"{lrps[topo.client_lrp[i]].address}:{e2e.PPTP_PORT}",
                call_id=1, packets=PACKETS, calls=2)
            self.assertAllEchoed(reports, 2 * PACKETS)
            status = server.status()
            self.assertEqual(len(status["calls_seen"]), 2 * CLIENTS)
            self.assertNoConcurrentCollisions(status, "server0")
            self.assertEqual(status["dropped"], {})

    def test_two_servers_handing_out_the_same_call_ids(self):
        topo = self.topology(CLIENTS, n_servers=2, n_lrps=2)
        with topo.logs_on_failure():
            e2e.make_certs(topo, ["lrp0", "lrp1"])
            servers = [e2e.start_server(topo, 0, first_call_id=1), e2e.start_server(topo, 1, first_call_id=1)]
            e2e.start_rrp(topo, profiles={"default": 0, "second": 1})
            lrps = [e2e.start_lrp(topo, 0, profile="default"), e2e.start_lrp(topo, 1, profile="second")]
            reports = e2e.run_clients(
                topo, lambda i: f"{lrps[topo.client_lrp[i]].address}:{e2e.PPTP_PORT}",
                call_id=1, packets=PACKETS, rounds=2)
            self.assertAllEchoed(reports, 2 * PACKETS)
            per_lrp = CLIENTS // 2
            statuses = [server.status() for server in servers]
            for index, status in enumerate(statuses):
                self.assertEqual(len(status["calls_seen"]), 2 * per_lrp, f"server{index}: {status['calls_seen']}")
                self.assertNoConcurrentCollisions(status, f"server{index}")
                self.assertEqual(status["dropped"], {}, f"server{index}")
                self.assertEqual(status["active_calls"], [], f"server{index}")
            handed_out = [{c["call_id"] for c in status["calls_seen"]} for status in statuses]
            self.assertEqual(handed_out[0], handed_out[1])  # the very same IDs on both servers


class SharedHostTests(DaemonTestCase):
    """Issue 4: pptpd on the RRP's own host.  Both see the GRE of the host's loopback."""

    def test_pptpd_on_the_rrp_host_with_a_distinct_source_address(self):
        """The worst case for a loop: the server answers each call with the RRP's own ID (S = R).
        With --source 127.0.0.2 neither side takes the other's packets for its own."""
        topo = self.topology(4)
        with topo.logs_on_failure():
            e2e.make_certs(topo, ["lrp0"])
            server = e2e.start_server(topo, side=e2e.Side(topo.rrp.ns, "127.0.0.1"), name="local-pptpd",
                                      mirror=True)
            e2e.start_rrp(topo, profiles={"default": "127.0.0.1"}, extra=["--source", "127.0.0.2"])
            lrp = e2e.start_lrp(topo)
            reports = e2e.run_clients(topo, f"{lrp.address}:{e2e.PPTP_PORT}", packets=PACKETS, calls=2)
            self.assertAllEchoed(reports, 2 * PACKETS)
            status = server.stop()
            self.assertEqual(status["gre_echoed"], 4 * 2 * PACKETS, status)  # no packet went round twice
            self.assertEqual(status["dropped"], {})
            self.assertEqual({c["peer"] for c in status["calls_seen"]}, {"127.0.0.2"})
            self.assertEqual([c["call_id"] for c in status["calls_seen"]],
                             [c["peer_call_id"] for c in status["calls_seen"]])  # S = R indeed


class UnavailableUpstreamTests(DaemonTestCase):
    """Issue 4: with the link or pptpd down, clients get a PPTP answer, not a hang or a bare close."""

    def assertStartRefused(self, reports):
        summary = e2e.summarize(reports)
        for report in reports:
            self.assertFalse(report["ok"], summary)
            start = report["rounds"][0]["start_reply"] if report.get("rounds") else None
            self.assertEqual(start, [2, 6], f"client{report['index']}: expected a Start-Control-Connection-"
                             f"Reply with result 2 (general error), error 6 (PAC error)\n{summary}")

    def test_link_down(self):
        topo = self.topology(2)
        with topo.logs_on_failure():
            e2e.make_certs(topo, ["lrp0"])
            lrp = e2e.start_lrp(topo, wait_link=False)  # no RRP at all
            started = time.monotonic()
            reports = e2e.run_clients(topo, f"{lrp.address}:{e2e.PPTP_PORT}", packets=1, timeout=10)
            self.assertStartRefused(reports)
            self.assertLess(time.monotonic() - started, 10)

    def test_pptp_server_unreachable(self):
        """Half the clients wait 0.5 s before their Start-Control-Connection-Request: the RRP's
        refusal then reaches the LRP first, and the LRP must still answer the request."""
        topo = self.topology(4, n_servers=2)
        with topo.logs_on_failure():
            e2e.make_certs(topo, ["lrp0"])
            e2e.start_rrp(topo, profiles={"default": 1})  # server1 never started: connection refused
            lrp = e2e.start_lrp(topo)
            target = f"{lrp.address}:{e2e.PPTP_PORT}"
            prompt = e2e.start_clients(topo, target, packets=1, timeout=5, indexes=[0, 1])
            slow = e2e.start_clients(topo, target, packets=1, timeout=5, indexes=[2, 3],
                                     extra=["--start-delay", "0.5"])
            self.assertStartRefused(prompt.wait() + slow.wait())
