"""The status interface: snapshots (status), /metrics (metrics), /status.json over real HTTP,
the table and the CLI (statuscli).

Fakes, and why: the LRP, the RRP and the mux link between them run in memory as in
tests/unit/test_relay.py (iosim link, StringTransport peers, a MemoryReactorClock for the RRP's
dials, recording GRE ports).  The HTTP endpoint is real: a StatusSite on a loopback port of
the real reactor, fetched with twisted.web.client.Agent and by `python -m routeproxy status`
in a subprocess.
"""
import io
import json
import os
import sys
import urllib.error

from twisted.internet import defer, reactor, utils
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from routeproxy import gre, metrics, pptp, status, statuscli
from tests.support.relay import LRP_IP, RRP_SOURCE, SERVER_IP, RelayHarness

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

def parse_metrics(text):
    """{(sample name, frozenset(labels)): value}, read by prometheus_client's own parser
    (what a Prometheus server's client library accepts); fails on a duplicate series."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            if key in samples:
                raise AssertionError(f"duplicate series: {key}")
            samples[key] = sample.value
    return samples


def metric(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


class TwoClients(RelayHarness):
    """An LRP and an RRP joined by an in-memory mux link, with two clients of one call each.

    The harness is tests.support.relay's; its assertions go to the test case that builds this.
    """

    def build(self, case):
        self.case = case
        self.setUp()
        self.a, self.a_server = self.connect_client("10.0.0.5")
        self.b, self.b_server = self.connect_client("10.0.0.6")
        self.r_a, self.l_a = self.dial(self.a, self.a_server, 1, 256)
        self.r_b, self.l_b = self.dial(self.b, self.b_server, 1, 257)
        return self

    def __getattr__(self, name):
        if name.startswith("assert"):
            return getattr(self.case, name)
        raise AttributeError(name)

    def gre_both_ways(self):
        """3 packets from client a, 1 from client b, 2 from pptpd to a."""
        for seq in range(3):
            self.lrp.relay.demux.greReceived("10.0.0.5", LRP_IP, gre.build_gre(self.l_a, b"\xff\x03a", seq=seq))
        self.lrp.relay.demux.greReceived("10.0.0.6", LRP_IP, gre.build_gre(self.l_b, b"\xff\x03b", seq=0))
        for seq in range(2):
            self.rrp.relay.demux.greReceived(SERVER_IP, RRP_SOURCE, gre.build_gre(self.r_a, b"\xff\x03A", seq=seq))
        self.flush()


class SnapshotTests(unittest.TestCase):
    def setUp(self):
        self.lab = TwoClients().build(self)

    def by_client(self, snap):
        return {s["client"].split(":")[0]: s for s in snap["sessions"]}

    def test_lrp_sessions_and_ids(self):
        self.lab.gre_both_ways()
        snap = status.snapshot(self.lab.lrp)
        self.assertEqual(snap["role"], "lrp")
        self.assertEqual(len(snap["sessions"]), 2)
        self.assertEqual(snap["calls"], 2)
        a, b = self.by_client(snap)["10.0.0.5"], self.by_client(snap)["10.0.0.6"]
        self.assertEqual(a["calls"], [{"C": 1, "S": 256, "L": self.lab.l_a, "established": True}])
        self.assertEqual(b["calls"], [{"C": 1, "S": 257, "L": self.lab.l_b, "established": True}])
        self.assertEqual(a["client"], f"10.0.0.5:{40001}")
        self.assertEqual(a["state"], "open")
        self.assertEqual(a["profile"], "default")
        self.assertNotEqual(a["mux_session"], b["mux_session"])
        self.assertEqual((a["gre_packets_in"], a["gre_packets_out"]), (3, 2))
        self.assertEqual((b["gre_packets_in"], b["gre_packets_out"]), (1, 0))
        sent_by_client = len(pptp.StartControlConnectionRequest().pack()) + \
            len(pptp.OutgoingCallRequest(call_id=1).pack())
        self.assertEqual(a["control_bytes_in"], sent_by_client)
        self.assertGreater(a["control_bytes_out"], 0)
        [link] = snap["links"]
        self.assertTrue(link["up"])
        self.assertEqual(link["sessions"], 2)
        self.assertGreater(link["frames_out"], 0)
        self.assertEqual(snap["totals"]["gre_packets_in"], 4)
        self.assertEqual(snap["call_ids"][0]["in_use"], 2)
        self.assertEqual(snap["call_ids"][0]["capacity"], 65535)
        json.dumps(snap)   # plain data only

    def test_rrp_sessions_and_ids(self):
        self.lab.gre_both_ways()
        snap = status.snapshot(self.lab.rrp)
        self.assertEqual(snap["role"], "rrp")
        sessions = self.by_client(snap)
        self.assertEqual(set(sessions), {"10.0.0.5", "10.0.0.6"})
        a, b = sessions["10.0.0.5"], sessions["10.0.0.6"]
        self.assertEqual(a["calls"], [{"C": 1, "S": 256, "R": self.lab.r_a, "established": True}])
        self.assertEqual(b["calls"], [{"C": 1, "S": 257, "R": self.lab.r_b, "established": True}])
        self.assertEqual(a["server"], f"{SERVER_IP}:1723")
        self.assertEqual(a["link"], "peer")
        self.assertEqual((a["gre_packets_in"], a["gre_packets_out"]), (2, 3))
        self.assertEqual(snap["call_ids"], [{"scope": SERVER_IP, "in_use": 2, "capacity": 65535}])
        self.assertEqual(snap["profiles"], {"default": f"{SERVER_IP}:1723"})
        self.assertEqual(len(snap["links"]), 1)

    def test_lrp_and_rrp_agree(self):
        lrp = {s["mux_session"]: s for s in status.snapshot(self.lab.lrp)["sessions"]}
        rrp = {s["mux_session"]: s for s in status.snapshot(self.lab.rrp)["sessions"]}
        self.assertEqual(set(lrp), set(rrp))
        for sid in lrp:
            self.assertEqual([(c["C"], c["S"]) for c in lrp[sid]["calls"]],
                             [(c["C"], c["S"]) for c in rrp[sid]["calls"]])

    def test_odd_states(self):
        """A session with no book and no mux, one refused, a closed link: no exception."""
        bare = self.lab.lrp.newSession()           # nothing connected yet: book None, mux None
        refused = self.lab.lrp.newSession()
        refused.opener.refusal = "session refused (LINK_LOST)"
        snap = status.snapshot(self.lab.lrp)
        states = sorted(s["state"] for s in snap["sessions"])
        self.assertEqual(states, ["open", "open", "refused", "unstarted"])
        odd = [s for s in snap["sessions"] if s["mux_session"] is None]
        self.assertEqual([s["calls"] for s in odd], [[], []])
        self.assertIn("-", statuscli.format_table(snap))
        del bare
        self.lab.pump.server.transport.loseConnection()
        self.lab.flush()
        snap = status.snapshot(self.lab.lrp)
        self.assertEqual([s["state"] for s in snap["sessions"] if s["mux_session"] is not None], [])
        self.assertFalse(any(link["up"] for link in snap["links"]))

    def test_gre_port_statistics(self):
        self.lab.lrp.relay.grePort.counters = {"received": 5, "delivered": 4, "sent": 3, "reads": 2,
                                               "dropped": {"not_gre": 1}}
        snap = status.snapshot(self.lab.lrp)
        self.assertEqual(snap["gre_port"]["received"], 5)
        samples = parse_metrics(metrics.format_metrics(snap))
        self.assertEqual(metric(samples, "routeproxy_gre_port_packets_total", event="sent"), 3)
        self.assertEqual(metric(samples, "routeproxy_gre_port_dropped_total", reason="not_gre"), 1)


class MetricsTests(unittest.TestCase):
    def setUp(self):
        self.lab = TwoClients().build(self)
        self.resource = status.StatusResource(self.lab.lrp)

    def metrics(self):
        return parse_metrics(metrics.format_metrics(self.resource.snapshot()))

    def test_every_line_in_format_and_counters(self):
        self.lab.gre_both_ways()
        self.lab.lrp.relay.demux.greReceived("10.0.0.99", LRP_IP, gre.build_gre(self.lab.l_a, b"x", seq=1))
        self.lab.lrp.relay.demux.greReceived("10.0.0.5", LRP_IP, b"junk")
        samples = self.metrics()
        self.assertEqual(metric(samples, "routeproxy_sessions"), 2)
        self.assertEqual(metric(samples, "routeproxy_calls"), 2)
        self.assertEqual(metric(samples, "routeproxy_info", role="lrp"), 1)
        self.assertEqual(metric(samples, "routeproxy_gre_packets_total", direction="in"), 4)
        self.assertEqual(metric(samples, "routeproxy_gre_packets_total", direction="out"), 2)
        self.assertEqual(metric(samples, "routeproxy_gre_dropped_total",
                                reason="gre_wrong_source"), 1)
        self.assertEqual(sum(v for (name, _), v in samples.items()
                             if name == "routeproxy_gre_dropped_total"), 2)
        self.assertEqual(metric(samples, "routeproxy_links_up"), 1)
        self.assertEqual(metric(samples, "routeproxy_link_up", peer="peer"), 1)
        self.assertEqual(metric(samples, "routeproxy_call_ids_in_use", scope="LRP"), 2)
        self.assertGreater(metric(samples, "routeproxy_control_bytes_total", direction="in"), 0)
        self.assertGreater(metric(samples, "routeproxy_link_bytes_total", peer="peer", direction="out"), 0)
        self.assertEqual(metric(samples, "routeproxy_sessions_ended_total"), 0)
        self.assertEqual(metric(samples, "routeproxy_link_gre_limit_bytes", peer="peer"),
                         self.lab.lrp.link.config.greWatermark)   # no slow path here

    def test_rtt(self):
        link = self.lab.lrp.link
        d = link.ping()
        self.lab.reactor.advance(0.25)   # the pong waits in the pump for 250 ms of fake time
        self.lab.flush()
        self.assertTrue(d.called)
        samples = self.metrics()
        rtt = metric(samples, "routeproxy_link_rtt_seconds", peer="peer")
        self.assertAlmostEqual(rtt, link.stats.rttLast, places=6)
        self.assertGreater(rtt, 0.2)
        self.assertIn(("routeproxy_link_rtt_smoothed_seconds", frozenset({("peer", "peer")})), samples)

    def test_counters_survive_a_session_ending(self):
        self.lab.gre_both_ways()
        before = self.metrics()
        self.lab.a.protocol.connectionLost(None)
        self.lab.flush()
        after = self.metrics()
        self.assertEqual(metric(after, "routeproxy_sessions"), 1)
        self.assertEqual(metric(after, "routeproxy_sessions_ended_total"), 1)
        for name, labels in before:
            if name.endswith("_total") and not name.startswith("routeproxy_link_"):
                self.assertGreaterEqual(after.get((name, labels), 0), before[(name, labels)], name)
        self.assertEqual(metric(after, "routeproxy_gre_packets_total", direction="in"), 4)

    def test_label_values_escaped(self):
        weird = 'a "quoted" \\ back\nslash'
        self.lab.lrp.relay.drops.add(weird)
        text = metrics.format_metrics(self.resource.snapshot())
        self.assertIn(r'reason="a \"quoted\" \\ back\nslash"', text)
        samples = parse_metrics(text)
        self.assertEqual(metric(samples, "routeproxy_gre_dropped_total", reason=weird), 1)

    def test_two_links_from_one_peer_stay_distinct_series(self):
        snap = self.resource.snapshot()
        closing = dict(snap["links"][0], up=False)
        snap["links"].append(closing)
        samples = parse_metrics(metrics.format_metrics(snap))   # fails on a duplicate series
        self.assertEqual(metric(samples, "routeproxy_link_up", peer="peer"), 1)
        self.assertEqual(metric(samples, "routeproxy_link_up", peer="peer#2"), 0)
        self.assertEqual(metric(samples, "routeproxy_links_up"), 1)

    def test_parser_can_fail(self):
        for bad in ('x{a="b} 1\n', 'x 1\nx 2\n', 'x one\n'):
            self.assertRaises((AssertionError, ValueError), parse_metrics, bad)

    def test_process_and_build_info(self):
        """A live daemon's page: prometheus_client's process_* and the versions."""
        from routeproxy import __version__
        snap = dict(self.resource.snapshot(), build={"version": __version__, "twisted": "t", "python": "p"},
                    refusals={"not_allowed": 3}, gre_port={"capture_up": False})
        samples = parse_metrics(metrics.format_metrics(snap, process=True))
        self.assertEqual(metric(samples, "routeproxy_build_info", version=__version__, twisted="t",
                                python="p"), 1)
        self.assertEqual(metric(samples, "routeproxy_refused_total", reason="not_allowed"), 3)
        self.assertEqual(metric(samples, "routeproxy_capture_up"), 0)
        self.assertGreater(metric(samples, "process_resident_memory_bytes"), 0)


class TableTests(unittest.TestCase):
    def test_row_per_session(self):
        lab = TwoClients().build(self)
        snap = status.snapshot(lab.lrp)
        lines = statuscli.format_table(snap).splitlines()
        self.assertTrue(lines[0].startswith("LRP: links: peer up"))
        header, rows = lines[1], lines[2:]
        self.assertEqual(len(rows), 2)
        for row, l_id, client in zip(rows, (lab.l_a, lab.l_b), ("10.0.0.5", "10.0.0.6")):
            self.assertTrue(row.startswith(client))
            self.assertIn(f" {l_id} ", row)
        # aligned: the "L" column starts at the same offset as in the header
        column = header.index("  L  ") + 2
        self.assertEqual({row[column:].split()[0] for row in rows}, {str(lab.l_a), str(lab.l_b)})

    def test_rrp_table_has_server(self):
        lab = TwoClients().build(self)
        text = statuscli.format_table(status.snapshot(lab.rrp), summary=False)
        header, *rows = text.splitlines()
        self.assertIn("server", header)
        self.assertTrue(all(f"{SERVER_IP}:1723" in row for row in rows))
        self.assertEqual(len(rows), 2)

    def test_not_a_snapshot(self):
        self.assertRaises(statuscli.StatusError, statuscli.format_table, {"role": "lrp"})
        self.assertRaises(statuscli.StatusError, statuscli.format_table, [1, 2])
        self.assertRaises(statuscli.StatusError, statuscli.format_table, {"sessions": [3]})


class HTTPTests(unittest.TestCase):
    """The endpoint on a real loopback port of the real reactor."""

    def setUp(self):
        self.lab = TwoClients().build(self)
        self.port = reactor.listenTCP(0, status.StatusSite(status.StatusResource(self.lab.lrp)),
                                      interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    @defer.inlineCallbacks
    def get(self, path, method=b"GET"):
        response = yield Agent(reactor).request(method, (self.base + path).encode())
        body = yield readBody(response)
        return response, body

    @defer.inlineCallbacks
    def test_status_json(self):
        response, body = yield self.get("/status.json")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        snap = json.loads(body)
        self.assertEqual(sorted(c["L"] for s in snap["sessions"] for c in s["calls"]),
                         sorted([self.lab.l_a, self.lab.l_b]))

    @defer.inlineCallbacks
    def test_metrics_and_others(self):
        response, body = yield self.get("/metrics")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [metrics.METRICS_CONTENT_TYPE])
        self.assertEqual(metric(parse_metrics(body.decode()), "routeproxy_sessions"), 2)
        response, _ = yield self.get("/nothing")
        self.assertEqual(response.code, 404)
        response, _ = yield self.get("/metrics", method=b"POST")
        self.assertEqual(response.code, 405)
        response, body = yield self.get("/")
        self.assertIn(b"/metrics", body)

    @defer.inlineCallbacks
    def test_command_line_prints_table(self):
        """`python -m routeproxy status URL` in a subprocess, against this Site."""
        env = dict(os.environ, PYTHONPATH=ROOT)
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, ["-m", "routeproxy", "status", self.base], env=env, path=ROOT)
        self.assertEqual(code, 0, err)
        lines = out.decode().splitlines()
        self.assertEqual(len(lines), 4)      # summary, header, two sessions
        self.assertTrue(lines[2].startswith("10.0.0.5:"))
        self.assertIn(str(self.lab.l_b), lines[3])
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, ["-m", "routeproxy", "status", "--json", self.base + "/"], env=env, path=ROOT)
        self.assertEqual(code, 0, err)
        self.assertEqual(len(json.loads(out)["sessions"]), 2)


class CommandLineTests(unittest.SynchronousTestCase):
    """main() with a fake URL opener (no network)."""

    def setUp(self):
        self.lab = TwoClients().build(self)
        self.snap = json.loads(json.dumps(status.snapshot(self.lab.lrp)))
        self.urls = []

    def opener(self, body):
        def urlopen(url, timeout):
            self.urls.append(url)
            if isinstance(body, Exception):
                raise body
            return io.BytesIO(body)
        return urlopen

    def run_main(self, argv, body):
        out, err = io.StringIO(), io.StringIO()
        code = statuscli.main(argv, urlopen=self.opener(body), out=out, err=err)
        return code, out.getvalue(), err.getvalue()

    def test_table_and_json(self):
        body = json.dumps(self.snap).encode()
        code, out, _ = self.run_main(["127.0.0.1:9723"], body)
        self.assertEqual((code, out), (0, statuscli.format_table(self.snap)))
        code, out, _ = self.run_main(["--json", "http://h:1/status.json"], body)
        self.assertEqual(json.loads(out), self.snap)
        self.assertEqual(self.urls, ["http://127.0.0.1:9723/status.json", "http://h:1/status.json"])

    def test_errors_are_one_line(self):
        for body, why in ((urllib.error.URLError(ConnectionRefusedError(111, "refused")), "refused"),
                          (b"<html>", "not JSON"), (b'{"x": 1}', "not a routeproxy status")):
            code, out, err = self.run_main(["127.0.0.1:9"], body)
            self.assertEqual(code, 1)
            self.assertEqual(out, "")
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertIn(why, err)

    def test_bad_scheme(self):
        code, _, err = self.run_main(["ftp://x/"], b"")
        self.assertEqual(code, 1)
        self.assertIn("only http", err)


class TapTests(unittest.SynchronousTestCase):
    """--status adds an HTTP listener to each daemon's service tree (memory reactor)."""

    def test_both_daemons(self):
        from routeproxy import lrp_tap, rrp_tap
        from tests.support.options import LRP_REQUIRED, RRP_REQUIRED, parse

        options = parse(lrp_tap.Options, LRP_REQUIRED + ["--status", "127.0.0.1:9723"])
        top = lrp_tap.makeService(options, reactor=MemoryReactorClock())
        web = list(top)[-1]
        self.assertEqual((web.args[0], web.kwargs["interface"]), (9723, "127.0.0.1"))
        self.assertIs(web.args[1].resource.daemon, top)   # the DaemonService: its proxy and itself
        self.assertIs(top.proxy, top.lrp)

        options = parse(rrp_tap.Options, RRP_REQUIRED + ["--pptp-server", "10.0.0.1",
                                                         "--status", "127.0.0.1:9724"])
        top = rrp_tap.makeService(options, reactor=MemoryReactorClock())
        web = list(top)[-1]
        self.assertEqual(web.args[0], 9724)
        self.assertIs(web.args[1].resource.daemon, top)
        self.assertIs(top.proxy, top.rrp)
        tlsServer = [s for s in top if s.__class__.__name__ == "PausingTCPServer"][0]
        # the mux factory, under TLS, under the gate for connections not through TLS yet
        self.assertIs(top.rrp.links, tlsServer.args[1].wrappedFactory.wrappedFactory.connections)

        options = parse(rrp_tap.Options, RRP_REQUIRED + ["--pptp-server", "10.0.0.1"])
        self.assertEqual(len(list(rrp_tap.makeService(options, reactor=MemoryReactorClock()))), 2)

    def test_sample_ini_lines(self):
        for name in ("routeproxy-lrp.ini", "routeproxy-rrp.ini"):
            with open(os.path.join(ROOT, "etc", name)) as f:
                self.assertIn("# status = 127.0.0.1:9723", f.read().splitlines())
