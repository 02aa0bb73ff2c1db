"""routeproxy.tls over real TLS on loopback sockets with the real reactor.

Each test writes its own certificates (routeproxy.certs, EC P-256: fast),
listens on 127.0.0.1, dials it, and lets a small echo protocol run until both
ends have lost the connection.  Refusals are checked by the log line the
refusing side writes (captured from twisted.logger's global publisher).
"""
import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from routeproxy import certs, tls

RRP = "rrp.example"
LRP = "lrp1"
PAST = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)


@implementer(IHandshakeListener)
class EchoSide(protocol.Protocol):
    """Client says hello; server echoes; client hangs up on the echo.

    Records the peer's name at handshake completion, what it received, and
    the reason the connection was lost.
    """

    def __init__(self, isClient):
        self.isClient = isClient
        self.received = b""
        self.peer = None
        self.reason = None
        self.lost = defer.Deferred()

    def connectionMade(self):
        if self.isClient:
            self.transport.write(b"hello\n")

    def handshakeCompleted(self):
        self.peer = tls.peerName(self.transport)

    def dataReceived(self, data):
        self.received += data
        if self.isClient:
            self.transport.loseConnection()
        else:
            self.transport.write(data)

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)



class Lab:
    """Certificates for one test, written under *base*: a CA with a good RRP
    and LRP, plus whatever odd ones a test asks for."""

    def __init__(self, base):
        self.base = base
        os.makedirs(base)
        self.ca = certs.make_ca("test CA")
        self.caPath = self.write("ca", self.ca)[0]

    def write(self, stem, issued):
        cert, key = os.path.join(self.base, stem + ".crt"), os.path.join(self.base, stem + ".key")
        certs.write_issued(issued, cert, key)
        return cert, key

    def leaf(self, stem, name, ca=None, **kw):
        return self.write(stem, certs.make_leaf(ca or self.ca, name, **kw))

    def server(self, stem="rrp", name=RRP, allowed_names=None, **kw):
        cert, key = self.leaf(stem, name, server=True, client=False, **kw)
        return tls.serverCreator(cert, key, self.caPath, allowed_names=allowed_names)

    def client(self, stem="lrp", name=LRP, rrpName=RRP, **kw):
        cert, key = self.leaf(stem, name, server=False, client=True, **kw)
        return tls.clientCreator(rrpName, cert, key, self.caPath)


class TLSCase(unittest.TestCase):
    timeout = 10

    def setUp(self):
        self.lab = Lab(self.mktemp())
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self):
        return [formatEvent(e) for e in self.events if e.get("log_namespace") == "routeproxy.tls"]

    def assertLogged(self, *fragments):
        matching = [line for line in self.lines() if all(f in line for f in fragments)]
        self.assertTrue(matching, f"no routeproxy.tls line with {fragments}; lines: {self.lines()}")
        return matching[0]

    @defer.inlineCallbacks
    def exchange(self, serverCreator, clientCreator):
        """Listen, dial, run the echo, wait for both ends to close."""
        server = EchoSide(isClient=False)
        client = EchoSide(isClient=True)
        port = reactor.listenSSL(0, protocol.Factory.forProtocol(lambda: server), serverCreator,
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = wrapClientTLS(clientCreator, TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        yield endpoint.connect(protocol.Factory.forProtocol(lambda: client))
        yield defer.gatherResults([server.lost, client.lost])
        self.port = port.getHost().port
        return server, client


class MutualTLSTests(TLSCase):
    @defer.inlineCallbacks
    def test_bothSidesSeeTheOtherName(self):
        server, client = yield self.exchange(self.lab.server(), self.lab.client())
        self.assertEqual(client.received, b"hello\n")
        self.assertEqual(server.peer, LRP)
        self.assertEqual(client.peer, RRP)
        self.assertEqual([line for line in self.lines() if "refused" in line], [])

    @defer.inlineCallbacks
    def test_allowedNameAccepted(self):
        server, client = yield self.exchange(self.lab.server(allowed_names=["lrp0", LRP]), self.lab.client())
        self.assertEqual(client.received, b"hello\n")
        self.assertEqual(server.peer, LRP)

    @defer.inlineCallbacks
    def test_allowedNamesAsText(self):
        server, client = yield self.exchange(self.lab.server(allowed_names="lrp0, lrp1"), self.lab.client())
        self.assertEqual(server.peer, LRP)

    @defer.inlineCallbacks
    def test_emptyAllowedNamesMeansAny(self):
        server, client = yield self.exchange(self.lab.server(allowed_names=[]), self.lab.client())
        self.assertEqual(client.received, b"hello\n")

    @defer.inlineCallbacks
    def test_ipAddressName(self):
        """An RRP dialled by address has an iPAddress SAN; service_identity checks it."""
        server, client = yield self.exchange(self.lab.server(name="127.0.0.1"),
                                             self.lab.client(rrpName="127.0.0.1"))
        self.assertEqual(client.received, b"hello\n")
        self.assertEqual(client.peer, "127.0.0.1")

    @defer.inlineCallbacks
    def test_negotiatesAtLeastTLS12(self):
        seen = []

        class Recorder(EchoSide):
            def handshakeCompleted(self):
                seen.append(self.transport.getHandle().get_protocol_version_name())

        server = Recorder(isClient=False)
        client = EchoSide(isClient=True)
        port = reactor.listenSSL(0, protocol.Factory.forProtocol(lambda: server), self.lab.server(),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = wrapClientTLS(self.lab.client(), TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        yield endpoint.connect(protocol.Factory.forProtocol(lambda: client))
        yield defer.gatherResults([server.lost, client.lost])
        self.assertEqual(len(seen), 1)
        self.assertIn(seen[0], ("TLSv1.2", "TLSv1.3"))


class ChainTests(TLSCase):
    """A real CA's layout: root -> intermediate -> leaf; the certificate
    files hold leaf + intermediate, --ca holds the root only."""

    @defer.inlineCallbacks
    def test_intermediates(self):
        root = certs.make_ca("root", path_length=1)
        intermediate = certs.make_ca("intermediate", issuer=root)
        rootPath = self.lab.write("root", root)[0]

        def chained(stem, issued):
            cert, key = self.lab.write(stem, issued)
            with open(cert, "ab") as f:
                f.write(intermediate.cert_pem())
            return cert, key

        rrpCert, rrpKey = chained("rrp-chain", certs.make_leaf(intermediate, RRP, client=False))
        lrpCert, lrpKey = chained("lrp-chain", certs.make_leaf(intermediate, LRP, server=False))
        server, client = yield self.exchange(tls.serverCreator(rrpCert, rrpKey, rootPath),
                                             tls.clientCreator(RRP, lrpCert, lrpKey, rootPath))
        self.assertEqual(client.received, b"hello\n")
        self.assertEqual((server.peer, client.peer), (LRP, RRP))


class RRPRefusesTests(TLSCase):
    """The RRP (server) refuses LRPs and says why, with the LRP's address."""

    @defer.inlineCallbacks
    def assertRefused(self, serverCreator, clientCreator, reason):
        server, client = yield self.exchange(serverCreator, clientCreator)
        self.assertEqual(client.received, b"")
        self.assertEqual(server.received, b"")
        line = self.assertLogged("refused LRP at 127.0.0.1:", reason)
        # the LRP learns it was refused, from the alert, and its backoff hears of it
        self.assertIn(f"RRP at 127.0.0.1:{self.port} refused us: TLS alert", clientCreator.lastRefusal)
        return line

    def test_otherCA(self):
        other = certs.make_ca("another CA")
        cert, key = self.lab.leaf("lrp-other", LRP, ca=other, server=False)
        return self.assertRefused(self.lab.server(), tls.clientCreator(RRP, cert, key, self.lab.caPath),
                                  "certificate verify failed: unable to get local issuer certificate")

    def test_expired(self):
        return self.assertRefused(self.lab.server(),
                                  self.lab.client(not_before=PAST, not_after=PAST + datetime.timedelta(days=1)),
                                  "certificate verify failed: certificate has expired")

    def test_notYetValid(self):
        soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
        return self.assertRefused(self.lab.server(), self.lab.client(not_before=soon),
                                  "certificate verify failed: certificate is not yet valid")

    def test_noClientCertificate(self):
        options = clientOptionsWithoutCertificate(self.lab.caPath)
        return self.assertRefused(self.lab.server(), tls.ClientTLS(RRP, options), "the peer sent no certificate")

    @defer.inlineCallbacks
    def test_nameNotAllowed(self):
        line = yield self.assertRefused(self.lab.server(allowed_names=["lrp2", "lrp3"]), self.lab.client(),
                                        "name 'lrp1' is not in allowed_names (lrp2, lrp3)")
        self.assertIn("CN=lrp1", line)

    @defer.inlineCallbacks
    def test_lrpLogsTheRefusal(self):
        """The refused LRP logs the alert (with TLS 1.3 it arrives after the
        LRP's own handshake has finished) and a hint at the reason."""
        yield self.assertRefused(self.lab.server(allowed_names=["lrp2"]), self.lab.client(), "allowed_names")
        self.assertLogged(f"RRP at 127.0.0.1:{self.port} refused the handshake with alert 'internal error'",
                          "refused the name in our certificate")

    def test_serverOnlyCertificateAsClient(self):
        """An RRP's certificate (serverAuth only) cannot log in as an LRP."""
        cert, key = self.lab.leaf("rrp-as-lrp", "rrp2.example", server=True, client=False)
        return self.assertRefused(self.lab.server(), tls.clientCreator(RRP, cert, key, self.lab.caPath),
                                  "unsuitable certificate purpose")

    def test_oneLinePerRefusal(self):
        d = self.test_otherCA()

        def count(_):
            refusals = [line for line in self.lines() if line.startswith("TLS: refused LRP")]
            self.assertEqual(len(refusals), 1, refusals)

        return d.addCallback(count)

    def test_olderVersionsDisabled(self):
        """Both ends switch off SSLv3, TLS 1.0 and 1.1 themselves (the wire
        test below would also pass on OpenSSL's security level alone)."""
        for creator in (self.lab.server(), self.lab.client()):
            options = creator.options.getContext().set_options(0)  # OR-ing 0 returns the options
            for flag in ("OP_NO_SSLv3", "OP_NO_TLSv1", "OP_NO_TLSv1_1"):
                self.assertTrue(options & getattr(SSL, flag), f"{flag} not set on {creator}")
            self.assertFalse(options & SSL.OP_NO_TLSv1_2)

    @defer.inlineCallbacks
    def test_tls11Refused(self):
        """A client offering only TLS 1.1 is refused with a clear line.  (Here
        OpenSSL's default security level would refuse it too; the flags test
        above is the one that pins our own setting.)"""
        try:
            creator = TLS11Client()
        except SSL.Error as e:
            raise unittest.SkipTest(f"this OpenSSL cannot make a TLS 1.1 client at all: {e}")
        server, client = yield self.exchange(self.lab.server(), creator)
        if "no protocols available" in str(client.reason.value):
            raise unittest.SkipTest(f"this OpenSSL cannot send a TLS 1.1 hello: {client.reason.value}")
        self.assertEqual(server.received, b"")
        self.assertLogged("refused LRP at 127.0.0.1:", "the peer offered no TLS version >= 1.2")


class RevocationTests(TLSCase):
    """--crl: a revoked LRP certificate is refused; reloadCRL takes a new list for new
    connections; a CRL from another CA is a configuration error."""

    @defer.inlineCallbacks
    def test_revokedThenReloaded(self):
        issued = certs.make_leaf(self.lab.ca, LRP, server=False, client=True)
        cert, key = self.lab.write("lrp-crl", issued)
        crlPath = os.path.join(self.lab.base, "ca.crl")
        with open(crlPath, "wb") as f:
            f.write(certs.make_crl(self.lab.ca, [issued.cert]))
        rrpCert, rrpKey = self.lab.leaf("rrp-crl", RRP, server=True, client=False)
        server = tls.serverCreator(rrpCert, rrpKey, self.lab.caPath, crlPath=crlPath)
        client = tls.clientCreator(RRP, cert, key, self.lab.caPath)
        s, c = yield self.exchange(server, client)
        self.assertEqual(s.received, b"")
        self.assertLogged("refused LRP at 127.0.0.1:", "is revoked (--crl)")
        with open(crlPath, "wb") as f:
            f.write(certs.make_crl(self.lab.ca, []))
        self.assertEqual(server.reloadCRL(), 0)
        s, c = yield self.exchange(server, tls.clientCreator(RRP, cert, key, self.lab.caPath))
        self.assertEqual(s.received, b"hello\n")

    def test_crlOfAnotherCA(self):
        crlPath = os.path.join(self.lab.base, "other.crl")
        with open(crlPath, "wb") as f:
            f.write(certs.make_crl(certs.make_ca("another CA")))
        cert, key = self.lab.leaf("lrp-x", LRP, server=False)
        e = self.assertRaises(tls.TLSConfigError, tls.clientCreator, RRP, cert, key,
                              self.lab.caPath, crlPath=crlPath)
        self.assertIn("not signed by the CA", str(e))


class LRPRefusesTests(TLSCase):
    """The LRP (client) refuses RRPs and says why, with the RRP's address."""

    @defer.inlineCallbacks
    def assertRefused(self, serverCreator, clientCreator, reason):
        server, client = yield self.exchange(serverCreator, clientCreator)
        self.assertEqual(client.received, b"")
        self.assertEqual(server.received, b"")
        line = self.assertLogged(f"refused RRP at 127.0.0.1:{self.port}:", reason)
        self.assertIn(reason, clientCreator.lastRefusal)  # what RefusalBackoff counts
        self.assertEqual(len([l for l in self.lines() if l.startswith("TLS: refused RRP")]), 1, self.lines())
        return line

    def test_otherCA(self):
        other = certs.make_ca("another CA")
        return self.assertRefused(self.lab.server(ca=other), self.lab.client(),
                                  "certificate verify failed: unable to get local issuer certificate")

    def test_expired(self):
        return self.assertRefused(self.lab.server(not_before=PAST, not_after=PAST + datetime.timedelta(days=1)),
                                  self.lab.client(), "certificate verify failed: certificate has expired")

    @defer.inlineCallbacks
    def test_wrongName(self):
        line = yield self.assertRefused(self.lab.server(name="other.example"), self.lab.client(),
                                        "peer name mismatch: expected rrp.example got other.example")
        self.assertIn("CN=other.example", line)

    def test_nameOnlyInCN(self):
        """The name must be in the SAN; a matching CN alone is not enough
        (service_identity, RFC 6125)."""
        return self.assertRefused(self.lab.server(san_name="other.example"), self.lab.client(),
                                  "peer name mismatch: expected rrp.example got other.example")

    def test_clientOnlyCertificateAsServer(self):
        """An LRP's certificate (clientAuth only) cannot pose as the RRP."""
        cert, key = self.lab.leaf("lrp-as-rrp", RRP, server=False, client=True)
        return self.assertRefused(tls.serverCreator(cert, key, self.lab.caPath), self.lab.client(),
                                  "unsuitable certificate purpose")

    @defer.inlineCallbacks
    def test_serverLogsTheAlert(self):
        """The refused RRP learns why from the LRP's alert."""
        yield self.assertRefused(self.lab.server(name="other.example"), self.lab.client(), "peer name mismatch")
        self.assertLogged("LRP at 127.0.0.1:", "refused the handshake with alert")


def clientOptionsWithoutCertificate(caPath):
    """CertificateOptions for a client that trusts the CA but has no certificate."""
    from twisted.internet import ssl

    cas = [ssl.Certificate(c) for c in tls.loadCA(caPath)]
    return ssl.CertificateOptions(trustRoot=ssl.trustRootFromCertificates(cas))


@implementer(IOpenSSLClientConnectionCreator)
class TLS11Client:
    """A raw pyOpenSSL client that offers only TLS 1.1 (security level 0, as
    OpenSSL 3 refuses TLS < 1.2 above it)."""

    def __init__(self):
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_1_VERSION)
        ctx.set_max_proto_version(SSL.TLS1_1_VERSION)
        ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        self.ctx = ctx

    def clientConnectionForTLS(self, tlsProtocol):
        return SSL.Connection(self.ctx, None)


class ReconnectTests(TLSCase):
    timeout = 15

    @defer.inlineCallbacks
    def test_reconnectsAfterServerDrops(self):
        """The RRP drops the first connection; the ClientService dials again
        (after a short backoff) and the second connection works."""
        serverSides = []

        class DropFirst(EchoSide):
            def dataReceived(self, data):
                if len(serverSides) == 1:
                    self.transport.loseConnection()
                else:
                    EchoSide.dataReceived(self, data)

        def buildServer():
            side = DropFirst(isClient=False)
            serverSides.append(side)
            return side

        port = reactor.listenSSL(0, protocol.Factory.forProtocol(buildServer), self.lab.server(),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        clientSides = []
        echoed = defer.Deferred()

        class Client(EchoSide):
            def dataReceived(self, data):
                self.received += data
                if not echoed.called:
                    echoed.callback(self)

        def buildClient():
            side = Client(isClient=True)
            clientSides.append(side)
            return side

        service = tls.rrpClientService(reactor, "127.0.0.1", port.getHost().port, self.lab.client(),
                                       protocol.Factory.forProtocol(buildClient),
                                       initialDelay=0.05, maxDelay=0.2, jitter=lambda: 0)
        started = reactor.seconds()
        service.startService()
        self.addCleanup(service.stopService)
        side = yield echoed
        self.assertEqual(side.received, b"hello\n")
        self.assertEqual(len(clientSides), 2)
        self.assertEqual(len(serverSides), 2)
        self.assertEqual(clientSides[0].received, b"")
        self.assertEqual(serverSides[1].peer, LRP)
        self.assertLess(reactor.seconds() - started, 5)


class RefusalBackoffTests(TLSCase):
    timeout = 15

    @defer.inlineCallbacks
    def test_backsOffWhileRefused(self):
        """ClientService resets its backoff whenever TCP connects; while the
        RRP refuses our certificate the delays must still grow."""
        port = reactor.listenSSL(0, protocol.Factory.forProtocol(lambda: EchoSide(isClient=False)),
                                 self.lab.server(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        expired = self.lab.client(not_before=PAST, not_after=PAST + datetime.timedelta(days=1))
        service = tls.rrpClientService(reactor, "127.0.0.1", port.getHost().port, expired,
                                       protocol.Factory.forProtocol(lambda: EchoSide(isClient=True)),
                                       initialDelay=0.02, maxDelay=0.5, factor=2, jitter=lambda: 0)
        delays = []
        fourth = defer.Deferred()

        def observe(event):
            if "delay" in event and "attempt" in event:
                delays.append(event["delay"])
                if len(delays) == 4:  # leave ClientService's state machine before stopping it
                    reactor.callLater(0, fourth.callback, None)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        service.startService()
        self.addCleanup(service.stopService)
        yield fourth
        # backoffPolicy: initialDelay * factor ** attempt; without RefusalBackoff all four would be 0.04
        self.assertEqual(delays, [0.04, 0.08, 0.16, 0.32])
        self.assertLogged("RRP at 127.0.0.1:", "refused the handshake with alert 'certificate expired'")

    def test_policyResetsAfterAGoodConnection(self):
        """Without the TLS machinery: the policy's own bookkeeping."""

        class Creator:
            lastRefusal = None

        creator = Creator()
        policy = tls.RefusalBackoff(creator, lambda attempt: attempt)
        seen = []
        for refused in (True, True, True, False, True):
            creator.lastRefusal = "refused" if refused else None
            seen.append(policy(1))  # ClientService says 1: the TCP connection "worked"
        seen.append(policy(2))  # then TCP itself fails: the larger count wins
        self.assertEqual(seen, [1, 2, 3, 1, 1, 2])


class RefusalFloodTests(TLSCase):
    """Bad handshakes are remote input: a flood of them costs a few lines, all counted."""

    timeout = 60

    @defer.inlineCallbacks
    def test_floodOfRefusalsIsRateLimited(self):
        other = certs.make_ca("another CA")
        cert, key = self.lab.leaf("lrp-other", LRP, ca=other, server=False)
        server = self.lab.server()
        attempts = 25
        for _ in range(attempts):
            yield self.exchange(server, tls.clientCreator(RRP, cert, key, self.lab.caPath))
        refusals = [line for line in self.lines() if line.startswith("TLS: refused LRP")]
        self.assertEqual(server.handshakeFailures, attempts)          # every one counted
        self.assertEqual(len(refusals), server.lines.burst)          # but only a burst logged
        self.assertEqual(server.lines.suppressed["refused"], attempts - server.lines.burst)


class ConfigErrorTests(unittest.SynchronousTestCase):
    """Unusable files give one TLSConfigError saying which file and why."""

    def setUp(self):
        self.lab = Lab(self.mktemp())
        self.cert, self.key = self.lab.leaf("rrp", RRP)

    def assertConfigError(self, fragment, *args):
        e = self.assertRaises(tls.TLSConfigError, tls.serverCreator, *args)
        self.assertIn(fragment, str(e))
        return str(e)

    def test_missingFile(self):
        missing = os.path.join(self.lab.base, "nope.crt")
        text = self.assertConfigError("cannot read", missing, self.key, self.lab.caPath)
        self.assertIn(missing, text)

    def test_badPEM(self):
        bad = os.path.join(self.lab.base, "bad.crt")
        with open(bad, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n")
        self.assertConfigError("not a PEM certificate", bad, self.key, self.lab.caPath)

    def test_emptyCA(self):
        empty = os.path.join(self.lab.base, "empty.crt")
        open(empty, "w").close()
        self.assertConfigError(f"CA file {empty}", self.cert, self.key, empty)

    def test_badKey(self):
        self.assertConfigError("not a PEM private key", self.cert, self.cert, self.lab.caPath)

    def test_keyDoesNotMatch(self):
        _, otherKey = self.lab.leaf("other", "other.example")
        text = self.assertConfigError("does not match certificate", self.cert, otherKey, self.lab.caPath)
        self.assertIn(RRP, text)

    def test_clientToo(self):
        e = self.assertRaises(tls.TLSConfigError, tls.clientCreator, RRP, self.cert, self.key,
                              os.path.join(self.lab.base, "missing-ca.crt"))
        self.assertIn("missing-ca.crt", str(e))


    def test_badRRPName(self):
        for name in ("", "  ", "x" * 70 + ".example"):
            e = self.assertRaises(tls.TLSConfigError, tls.clientCreator, name, self.cert, self.key, self.lab.caPath)
            self.assertIn("RRP name", str(e))


class NameTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.ca = certs.make_ca()

    def test_sanFirst(self):
        leaf = certs.make_leaf(self.ca, "cn.example", san_name="san.example")
        self.assertEqual(tls.certName(leaf.cert), "san.example")

    def test_ipSan(self):
        self.assertEqual(tls.certName(certs.make_leaf(self.ca, "10.0.0.1").cert), "10.0.0.1")

    def test_cnWhenNoSan(self):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "only-cn")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                .sign(key, hashes.SHA256()))
        self.assertEqual(tls.certName(cert), "only-cn")

    def test_peerName(self):
        class FakeTransport:
            """Stands in for a TLS transport: only getPeerCertificate."""

            def __init__(self, cert):
                self.cert = cert

            def getPeerCertificate(self):
                return self.cert

        from OpenSSL import crypto

        t = FakeTransport(crypto.X509.from_cryptography(certs.make_leaf(self.ca, "lrp7").cert))
        self.assertEqual(tls.peerName(t), "lrp7")
        self.assertRaises(tls.PeerRejected, tls.peerName, FakeTransport(None))

    def test_verifyErrorString(self):
        self.assertEqual(tls.verifyErrorString(10), "certificate has expired")
        self.assertEqual(tls.verifyErrorString(20), "unable to get local issuer certificate")
