"""Call-ID translation across the whole chain, driven with messages and no network.

A client's message goes client -> LRP book (to mux) -> RRP book (to peer) -> pptpd, and
pptpd's the other way, exactly as the daemons pass them.
"""
from twisted.trial import unittest

from routeproxy import pptp
from routeproxy.callids import CallIDSpace
from routeproxy.calls import TO_MUX, TO_PEER, CallBook, UnknownCallID


class Chain:
    """One client's control connection through an LRP and an RRP."""

    def __init__(self, lrp_space, rrp_space):
        self.lrp = CallBook(pptp.PAC, lrp_space)
        self.rrp = CallBook(pptp.PNS, rrp_space)

    def up(self, message):
        """client -> pptpd"""
        return self.rrp.translate(self.lrp.translate(message, TO_MUX), TO_PEER)

    def down(self, message):
        """pptpd -> client"""
        return self.lrp.translate(self.rrp.translate(message, TO_MUX), TO_PEER)


def ocrq(call_id):
    return pptp.OutgoingCallRequest(call_id=call_id, call_serial_number=7)


def ocrp(call_id, peer, result=1):
    return pptp.OutgoingCallReply(call_id=call_id, peer_call_id=peer, result_code=result)


class OutgoingCallTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.lrp_space = CallIDSpace("lrp", start=500)
        self.rrp_space = CallIDSpace("pptpd", start=900)

    def dial(self, chain, client_id, server_id):
        """A whole outgoing call set-up; returns (ID pptpd saw, ID the client saw)."""
        at_server = chain.up(ocrq(client_id))
        at_client = chain.down(ocrp(server_id, at_server.call_id))
        self.assertEqual(at_client.peer_call_id, client_id)
        return at_server.call_id, at_client.call_id

    def test_colliding_clients_get_distinct_ids(self):
        chains = [Chain(self.lrp_space, self.rrp_space) for _ in range(3)]
        seen = [self.dial(chain, client_id=1, server_id=100 + i) for i, chain in enumerate(chains)]
        server_side = {s for s, _ in seen}
        client_side = {c for _, c in seen}
        self.assertEqual(len(server_side), 3)
        self.assertEqual(len(client_side), 3)
        self.assertNotIn(1, server_side)
        for chain, (r_id, l_id) in zip(chains, seen):
            call = chain.lrp.by_local(l_id)
            self.assertIs(call, chain.lrp.by_tag(1))
            self.assertEqual((call.pns_id, call.local_id), (1, l_id))
            self.assertIs(chain.rrp.by_local(r_id), chain.rrp.by_tag(1))

    def test_two_servers_same_server_id(self):
        # Two upstream servers hand out the same Call ID; the LRP's IDs still differ.
        a = Chain(self.lrp_space, CallIDSpace("a"))
        b = Chain(self.lrp_space, CallIDSpace("b"))
        _, l_a = self.dial(a, 5, server_id=256)
        _, l_b = self.dial(b, 5, server_id=256)
        self.assertNotEqual(l_a, l_b)

    def test_later_messages_translated_both_ways(self):
        chain = Chain(self.lrp_space, self.rrp_space)
        r_id, l_id = self.dial(chain, 1, 256)
        sli = chain.up(pptp.SetLinkInfo(peer_call_id=l_id, send_accm=0xFFFFFFFF))
        self.assertEqual(sli.peer_call_id, 256)
        wen = chain.down(pptp.WanErrorNotify(peer_call_id=r_id, crc_errors=3))
        self.assertEqual(wen.peer_call_id, 1)
        ccrq = chain.up(pptp.CallClearRequest(call_id=1))
        self.assertEqual(ccrq.call_id, r_id)

    def test_sli_from_pptpd(self):
        # pptpd sends Set-Link-Info too, though the RFC gives it to the PNS only.
        chain = Chain(self.lrp_space, self.rrp_space)
        r_id, l_id = self.dial(chain, 1, 256)
        sli = chain.rrp.translate(pptp.SetLinkInfo(peer_call_id=r_id), TO_MUX)
        self.assertEqual(sli.peer_call_id, 1)
        self.assertEqual(chain.lrp.translate(sli, TO_PEER).peer_call_id, 1)

    def test_disconnect_frees_and_ids_come_back(self):
        chain = Chain(CallIDSpace("lrp", first=1, last=2), CallIDSpace("s", first=1, last=2))
        for round_ in range(3):
            r_id, l_id = self.dial(chain, 1, 256)
            cdn = chain.down(pptp.CallDisconnectNotify(call_id=256, result_code=3))
            self.assertEqual(cdn.call_id, l_id)   # pptpd's own ID, as the client knows it
            self.assertEqual(len(chain.lrp), 0)
            self.assertEqual(len(chain.rrp), 0)
            self.assertEqual(len(chain.lrp.space), 0)
            self.assertEqual(len(chain.rrp.space), 0)

    def test_disconnect_with_client_id(self):
        # accel-ppp puts the client's ID in Call-Disconnect-Notify.
        chain = Chain(self.lrp_space, self.rrp_space)
        r_id, l_id = self.dial(chain, 9, 256)
        cdn = chain.down(pptp.CallDisconnectNotify(call_id=r_id))
        self.assertEqual(cdn.call_id, 9)
        self.assertEqual(len(self.lrp_space) + len(self.rrp_space), 0)

    def test_failed_reply_frees(self):
        chain = Chain(self.lrp_space, self.rrp_space)
        at_server = chain.up(ocrq(1))
        chain.down(ocrp(0, at_server.call_id, result=pptp.OutgoingCallResult.BUSY))
        self.assertEqual(len(self.lrp_space) + len(self.rrp_space), 0)
        self.assertEqual(len(chain.lrp) + len(chain.rrp), 0)

    def test_unknown_ids_refused(self):
        chain = Chain(self.lrp_space, self.rrp_space)
        _, l_id = self.dial(chain, 1, 256)
        e = self.assertRaises(UnknownCallID, chain.up, pptp.SetLinkInfo(peer_call_id=l_id + 1))
        self.assertIn("Set-Link-Info.peer_call_id", str(e))
        self.assertRaises(UnknownCallID, chain.down, pptp.CallDisconnectNotify(call_id=4242))

    def test_other_connections_ids_refused(self):
        # A client must not reach another client's call by guessing its LRP-owned ID.
        a, b = Chain(self.lrp_space, self.rrp_space), Chain(self.lrp_space, self.rrp_space)
        _, l_a = self.dial(a, 1, 256)
        self.dial(b, 1, 257)
        self.assertRaises(UnknownCallID, b.up, pptp.SetLinkInfo(peer_call_id=l_a))

    def test_several_calls_per_connection(self):
        chain = Chain(self.lrp_space, self.rrp_space)
        ids = [self.dial(chain, c, 300 + c) for c in (1, 2, 3)]
        self.assertEqual(len({r for r, _ in ids}), 3)
        self.assertEqual(len(chain.lrp.release_all()), 3)
        self.assertEqual((len(self.lrp_space), len(self.rrp_space)), (0, 3))
        chain.rrp.release_all()
        self.assertEqual(len(self.rrp_space), 0)

    def test_non_call_messages_pass(self):
        chain = Chain(self.lrp_space, self.rrp_space)
        echo = pptp.EchoRequest(identifier=5)
        self.assertIs(chain.up(echo), echo)


class IncomingCallTests(unittest.SynchronousTestCase):
    def test_incoming_call(self):
        chain = Chain(CallIDSpace("lrp"), CallIDSpace("s"))
        icrq = chain.down(pptp.IncomingCallRequest(call_id=77, call_serial_number=1))
        l_id = icrq.call_id
        self.assertNotEqual(l_id, 77)
        icrp = chain.up(pptp.IncomingCallReply(call_id=3, peer_call_id=l_id, result_code=1))
        self.assertEqual(icrp.peer_call_id, 77)
        r_id = icrp.call_id
        self.assertNotEqual(r_id, 3)
        iccn = chain.down(pptp.IncomingCallConnected(peer_call_id=r_id))
        self.assertEqual(iccn.peer_call_id, 3)
        call = chain.lrp.by_tag(3)
        self.assertEqual((call.pns_id, call.pac_id, call.local_id), (3, 77, l_id))
        self.assertTrue(call.established)
