"""Issue 13, more than one core: 2 LRP shards and 2 RRP shards (--shard I/2), real twistd
daemons sharing their listeners by SO_REUSEPORT and the GRE by the capture filter on the call ID.

Everything runs inside one network namespace on its ``lo``:

    clients  127.0.1.N, one control connection and one call each
    lrp 0/2, lrp 1/2   127.0.0.30:1723 (one port, SO_REUSEPORT) -> rrp   --gre-interface lo
    rrp 0/2, rrp 1/2   127.0.0.10:4443 (one port, SO_REUSEPORT) --source 127.0.0.11 -> server
    server   127.0.0.20:1723 (scripted, in this process: echoes GRE of its calls)

Clients connect until the kernel has handed each LRP shard some (at most MAX_CLIENTS).  Then
every call carries GRE both ways (the server echoes it), each shard's status lists only its
own calls with IDs in its range, and no shard counts GRE for a call it does not know: the
kernel gave each process only its own.

A second test sends, from a client, hand-built GRE through the kernel's real filter: a
1550-byte datagram in two IPv4 fragments (the first fragment reaches its shard only, the second
every shard; the owner reassembles it, the other passes it over without a drop or any state
held) and a packet with IP options (IHL 6: the filter finds the call ID after them).

Needs root (namespaces, pcap, raw sockets); skipped with the reason otherwise.
"""
import itertools
import os
import socket

from twisted.trial import unittest

from routeproxy import pptp
from routeproxy.shard import Shard, shard_index
from tests.support import daemons, netns, pptppeers
from tests.support.daemons import Daemon
from tests.support.packets import enhanced_gre, ip_fragments, ipv4
from tests.support.pptppeers import PPTPClient
from tests.support.wait import wait_until

SERVER = ("127.0.0.20", 1723)
RRP, RRP_SOURCE = ("127.0.0.10", 4443), "127.0.0.11"
LRP = ("127.0.0.30", 1723)
RRP_NAME = "rrp.shards.test"
SHARDS = 2
PER_SHARD = 2      # calls each LRP shard must get
MAX_CLIENTS = 24   # the chance that 24 hashed connections miss a shard: 2 * 2**-24
PACKETS = 5


def hostport(address):
    return f"{address[0]}:{address[1]}"


class ShardTests(unittest.TestCase):

    def setUp(self):
        self.lab = netns.lab_for(self)
        self.ns = self.lab.namespace("shards")
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.addresses = (f"127.0.1.{n}" for n in itertools.count(1))
        self.server = pptppeers.ScriptedServer(*SERVER, first_call_id=100)
        raw = pptppeers.open_raw_gre(SERVER[0], self.inside)
        self.addCleanup(raw.close)
        self.server.start(pptppeers.listen(*SERVER, opener=self.inside, backlog=64), raw)
        self.addCleanup(self.server.stop)
        c = daemons.make_certs(self.workdir, RRP_NAME, ["lrp1"])
        self.rrps, self.lrps = [], []
        for i in range(SHARDS):
            rrp = Daemon(self.lab, self.ns, self.workdir, f"rrp{i}", "routeproxy-rrp", [
                "--listen", hostport(RRP), "--pptp-server", hostport(SERVER), "--source", RRP_SOURCE,
                "--status", f"127.0.0.1:{8190 + i}", "--cert", c["rrp_cert"], "--key", c["rrp_key"],
                "--ca", c["ca"], "--gre-interface", "lo", "--shard", f"{i}/{SHARDS}"])
            rrp.status_port = 8190 + i
            lrp = Daemon(self.lab, self.ns, self.workdir, f"lrp{i}", "routeproxy-lrp", [
                "--pptp-listen", hostport(LRP), "--rrp", hostport(RRP), "--rrp-name", RRP_NAME,
                "--status", f"127.0.0.1:{8195 + i}", "--cert", c["lrp_cert"], "--key", c["lrp_key"],
                "--ca", c["ca"], "--gre-interface", "lo", "--shard", f"{i}/{SHARDS}"])
            lrp.status_port = 8195 + i
            self.rrps.append(rrp)
            self.lrps.append(lrp)
        self.addCleanup(daemons.stop_all, self.lrps + self.rrps)
        for rrp in self.rrps:
            rrp.start()
        for rrp in self.rrps:
            rrp.wait_ready(listen=RRP, status_port=rrp.status_port)
        for lrp in self.lrps:
            lrp.start()
        for lrp in self.lrps:
            lrp.wait_ready(listen=LRP, status_port=lrp.status_port)
        for lrp in self.lrps:   # each shard's own link is up
            lrp._wait(lambda lrp=lrp: any(link.get("up") for link in lrp.status()["links"]), 15, "link up")

    def inside(self):
        return self.lab.inside(self.ns)

    def diagnosis(self):
        return "\n" + "\n".join(d.describe() for d in self.lrps + self.rrps) + f"\nserver: {self.server.status()}"

    def open_call(self):
        bind = next(self.addresses)
        client = PPTPClient(LRP, bind, name=f"pns-{bind}", opener=self.inside, answer_echoes=True,
                            strict=False)
        raw = pptppeers.open_raw_gre(bind, self.inside)
        self.addCleanup(client.close)
        self.addCleanup(raw.close)
        self.assertEqual(client.start().result_code, pptp.StartResult.SUCCESS, self.diagnosis())
        reply = client.call(call_id=7, timeout=5)
        self.assertEqual(reply.result_code, pptp.OutgoingCallResult.CONNECTED, self.diagnosis())
        return bind, raw, reply.call_id

    def test_two_shards_each_carry_their_own_calls(self):
        calls = []
        for _ in range(MAX_CLIENTS):
            calls.append(self.open_call())
            per_shard = [lrp.status()["calls"] for lrp in self.lrps]
            if min(per_shard) >= PER_SHARD:
                break
        self.assertGreaterEqual(min(per_shard), PER_SHARD, f"the kernel gave the shards {per_shard}")

        # GRE both ways on every call: client -> LRP shard -> RRP shard -> server and back
        for round_no in (1, 2):
            echoes = {bind: pptppeers.echo_calls(raw, LRP, bind, [(7, lrp_id)], PACKETS, round_no=round_no)[7]
                      for bind, raw, lrp_id in calls}
            self.assertEqual(echoes, {bind: PACKETS for bind, _, _ in calls}, self.diagnosis())

        # Each shard lists only its own calls, with IDs from its range, and saw no other's GRE.
        seen_l, seen_r = [], []
        for daemon, key, seen in [(d, "L", seen_l) for d in self.lrps] + [(d, "R", seen_r) for d in self.rrps]:
            snap = daemon.status()
            shard = Shard(*map(int, snap["shard"].split("/")))
            self.assertEqual(shard.count, SHARDS)
            ids = [c[key] for session in snap["sessions"] for c in session["calls"]]
            self.assertTrue(all(shard.owns(i) for i in ids), f"{daemon.name} {shard}: {ids}")
            self.assertEqual((snap["first_id"], snap["last_id"]), (shard.first, shard.last))
            self.assertEqual(snap["drops"], {}, f"{daemon.name} dropped GRE" + self.diagnosis())
            self.assertEqual(snap["gre_port"]["dropped"], {}, daemon.name)
            seen.extend(ids)
        self.assertEqual(len(seen_l), len(calls))
        self.assertEqual(len(seen_r), len(calls))
        self.assertEqual(sorted(lrp_id for _, _, lrp_id in calls), sorted(seen_l))
        per_rrp = [d.status()["calls"] for d in self.rrps]
        print(f"\ntest_shards: {len(calls)} calls; LRP shards {per_shard}, RRP shards {per_rrp} "
              f"(the LRPs' links landed by SO_REUSEPORT); {PACKETS} of {PACKETS} GRE echoed on every "
              "call, twice; no shard dropped GRE")

    def port(self, index):
        return self.lrps[index].status()["gre_port"]

    def test_fragments_and_ip_options_through_the_kernel_filter(self):
        calls = {}
        for _ in range(MAX_CLIENTS):
            bind, raw, lrp_id = self.open_call()
            calls.setdefault(shard_index(lrp_id, SHARDS), (bind, lrp_id))
            if len(calls) == SHARDS:
                break
        self.assertEqual(sorted(calls), [0, 1], "the kernel gave every connection to one shard")
        with self.inside():
            sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)   # IP_HDRINCL
        self.addCleanup(sender.close)
        before = [self.port(i) for i in range(SHARDS)]

        bind, lrp_id = calls[0]   # shard 0's call: a datagram in two fragments
        for fragment in ip_fragments(bind, LRP[0], enhanced_gre(lrp_id, os.urandom(1538), seq=100), 1480,
                                     ident=0x4242):
            sender.sendto(fragment, (LRP[0], 0))
        wait_until(lambda: self.port(0)["reassembled"] > before[0]["reassembled"], 5,
                   "shard 0 to reassemble its datagram")
        owner, other = self.port(0), self.port(1)
        self.assertEqual(other["fragments_other_shard"] - before[1]["fragments_other_shard"], 1)
        self.assertEqual((other["received"] - before[1]["received"], other["reassembling"], other["dropped"]),
                         (1, 0, {}), "shard 1: the later fragment only, passed over")
        self.assertEqual((owner["delivered"] - before[0]["delivered"], owner["dropped"]), (1, {}))

        bind, lrp_id = calls[1]   # shard 1's call: IHL 6
        sender.sendto(ipv4(bind, LRP[0], enhanced_gre(lrp_id, b"options", seq=101), opts=b"\x01\x01\x01\x00"),
                      (LRP[0], 0))
        wait_until(lambda: self.port(1)["delivered"] > other["delivered"], 5, "shard 1 to take the packet with options")
        self.assertEqual(self.port(0)["received"], owner["received"], "shard 0 saw shard 1's packet")
        for i in range(SHARDS):
            self.assertEqual(self.lrps[i].status()["drops"], {}, f"lrp{i}" + self.diagnosis())
        print(f"\ntest_shards: a 2-fragment datagram reassembled by its shard, the other passed its "
              f"later fragment over ({other['fragments_other_shard']}); IHL 6 GRE to its shard only")
