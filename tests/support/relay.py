"""An LRP and an RRP joined in memory: no sockets, no TLS, no kernel.

Fakes, and why: the mux link is twisted.test.iosim (the TLS path has its own tests in
test_mux_tls), the PPTP clients and pptpd are StringTransports fed scripted messages, the
RRP's dials go to a MemoryReactorClock, and the GRE ports are
:class:`routeproxy.testing.RecordingGREPort`.  The system tests run the same code on real
sockets, raw GRE and twistd.  Mix :class:`RelayHarness` into a trial TestCase.
"""
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.test import iosim

from routeproxy import pptp
from routeproxy.lrp import LinkFactory, LocalRouteProxy, PPTPServerFactory, muxConfig
from routeproxy.mux.protocol import MuxServerFactory
from routeproxy.mux.resume import ResumeTable
from routeproxy.rrp import RemoteRouteProxy
from routeproxy.testing import RecordingGREPort

LRP_IP, RRP_SOURCE, SERVER_IP = "10.0.1.1", "10.0.3.1", "10.0.4.2"


class Peer:
    """A PPTP client or pptpd on the far end of a StringTransport."""

    def __init__(self, protocol, transport):
        self.protocol = protocol
        self.transport = transport
        self.decoder = pptp.PPTPStreamDecoder()

    def send(self, message):
        self.protocol.dataReceived(message.pack())

    def received(self):
        data = self.transport.value()
        self.transport.clear()
        return self.decoder.feed(data)


def client_of(lrp, ip, port, lrpIP=LRP_IP):
    """A PPTP client at *ip*:*port* connected to *lrp* (at *lrpIP*) over a StringTransport
    (its Peer), or None when the LRP's factory turns it away."""
    addr = IPv4Address("TCP", ip, port)
    protocol = PPTPServerFactory(lrp).buildProtocol(addr)
    if protocol is None:
        return None
    transport = StringTransport(hostAddress=IPv4Address("TCP", lrpIP, 1723), peerAddress=addr)
    protocol.makeConnection(transport)
    return Peer(protocol, transport)


class RelayHarness:
    """An LRP and an RRP joined in memory, and helpers to connect clients and dial calls."""

    resumeGrace = 0   # seconds; above 0 both ends speak "resume" (docs/protocol.md s.10)
    lrpGREPort = RecordingGREPort   # the LRP's openGREPort(receiver)
    rrpGREPort = RecordingGREPort   # the RRP's
    serverIP, rrpSource = SERVER_IP, RRP_SOURCE   # pptpd's address, the RRP's dial source
    lrpIP = LRP_IP                                # where the clients reach the LRP

    def prepare(self):
        """Before the link connects (a subclass sets up the factories)."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.lrp = LocalRouteProxy(self.reactor, self.lrpGREPort)
        self.lrp.relay.clock = self.reactor
        self.rrp = RemoteRouteProxy(self.reactor, self.rrpGREPort,
                                    {"default": (self.serverIP, 1723)})
        self.rrp.relay.clock = self.reactor
        grace = self.resumeGrace
        self.rrp.resumeTable = ResumeTable(self.reactor, grace) if grace else None
        self.server_factory = server_factory = MuxServerFactory(
            self.rrp.sessionRequested, clock=self.reactor, config=muxConfig(grace, 8.0),
            resume=self.rrp.resumeTable)
        self.client_factory = client_factory = LinkFactory(self.lrp, self.reactor, grace)
        client_factory.peerNameOf = server_factory.peerNameOf = None
        self.rrp.links = server_factory.connections
        self.more_pumps = []   # the links of LRPs beyond the first (addLRP)
        self.prepare()
        self.connectLink()

    def connectLink(self):
        """A (new) link between the two: one in-memory connection."""
        self.link_ends = iosim.connectedServerAndClient(
            lambda: self.server_factory.buildProtocol(None),
            lambda: self.client_factory.buildProtocol(None), greet=True)
        self.pump = self.link_ends[2]
        self.flush()
        self.assertIsNotNone(self.lrp.link)
        self.client_port = 40000

    def addLRP(self, greport=RecordingGREPort):
        """Another LRP with its own link to the RRP (an RRP serving several LRPs): returns
        (the LRP, the RRP's end of its link).  connect_client(..., lrp=) dials through it."""
        lrp = LocalRouteProxy(self.reactor, greport)
        lrp.relay.clock = self.reactor
        factory = LinkFactory(lrp, self.reactor, self.resumeGrace)
        factory.peerNameOf = None
        client, server, pump = iosim.connectedServerAndClient(
            lambda: self.server_factory.buildProtocol(None), lambda: factory.buildProtocol(None),
            greet=True)
        self.more_pumps.append(pump)
        self.flush()
        self.assertIsNotNone(lrp.link)
        return lrp, server.connection

    def flush(self):
        """Deliver everything: the mux batches writes to the end of the reactor turn."""
        for _ in range(5):
            self.reactor.advance(0)
            self.pump.flush()
            for pump in self.more_pumps:
                pump.flush()

    def connect_only(self, ip="10.0.0.5", lrp=None):
        """A client connects to the LRP (or *lrp*) and says nothing yet; returns its Peer."""
        self.client_port += 1
        return client_of(lrp or self.lrp, ip, self.client_port, self.lrpIP)

    def connect_client(self, ip, start=True, lrp=None):
        """A client connects to the LRP (or *lrp*) and sends *start* (a Start-Control-
        Connection-Request, by default an empty one); the RRP dials pptpd; returns (client,
        server)."""
        client = self.connect_only(ip, lrp)
        if start:   # nothing is dialled before the client's Start-Control-Connection-Request
            client.send(pptp.StartControlConnectionRequest() if start is True else start)
        self.flush()
        host, port, factory = self.reactor.tcpClients[-1][:3]
        self.assertEqual((host, port), (self.serverIP, 1723))
        sp = factory.buildProtocol(IPv4Address("TCP", host, port))
        st = StringTransport(hostAddress=IPv4Address("TCP", self.rrpSource, self.client_port),
                             peerAddress=IPv4Address("TCP", self.serverIP, 1723))
        sp.makeConnection(st)
        self.flush()
        return client, Peer(sp, st)

    def dial(self, client, server, call_id, server_call_id):
        """Control set-up of one call (connect_client sent the Start request); returns (ID
        pptpd saw for the client, ID the client saw)."""
        [sccrq] = server.received()
        self.assertIsInstance(sccrq, pptp.StartControlConnectionRequest)
        server.send(pptp.StartControlConnectionReply(result_code=1))
        self.flush()
        [sccrp] = client.received()
        self.assertEqual(sccrp.result_code, 1)
        client.send(pptp.OutgoingCallRequest(call_id=call_id))
        self.flush()
        [ocrq] = server.received()
        server.send(pptp.OutgoingCallReply(call_id=server_call_id, peer_call_id=ocrq.call_id,
                                           result_code=1))
        self.flush()
        [ocrp] = client.received()
        self.assertEqual(ocrp.peer_call_id, call_id)
        return ocrq.call_id, ocrp.call_id
