"""A real mux link on loopback, mutual TLS with lab certificates: the LRP's end dialled
through a client endpoint, the RRP's accepted by a listening factory (the tests that need
both ends as the daemons make them)."""
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS

from routeproxy import certs, tls
from routeproxy.mux.protocol import MuxClientFactory, MuxServerFactory


@defer.inlineCallbacks
def loopbackLink(case, config, sessionRequested, rrp="rrp.mux.test", lrp="lrp.mux.test",
                 prepare=None):
    """``(the LRP's MuxConnection, the RRP's MuxServerFactory)``, the listener stopped at
    *case*'s cleanup; *sessionRequested* answers the RRP's session requests, *prepare* is
    given the LRP's factory before it dials (its linkFlows, say)."""
    paths = certs.write_lab_certs(case.mktemp(), rrp, [lrp])
    server = MuxServerFactory(sessionRequested, config, reactor, peerNameOf=tls.peerName)
    port = reactor.listenSSL(0, server, tls.serverCreator(paths["rrp_cert"], paths["rrp_key"],
                                                          paths["ca"]), interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    endpoint = wrapClientTLS(tls.clientCreator(rrp, paths["lrp_cert"], paths["lrp_key"], paths["ca"]),
                             TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
    factory = MuxClientFactory(config, reactor, peerNameOf=tls.peerName)
    if prepare is not None:
        prepare(factory)
    protocol = yield endpoint.connect(factory)
    return protocol.connection, server
