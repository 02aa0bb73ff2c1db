"""The mux over real mutual TLS on loopback (the reactor, real sockets, routeproxy.tls).

- 1,000 sessions on one connection; every session's control bytes arrive intact
  and in order, both ways (several chunks per session, checked by hash);
- a GRE flood on one session, as fast as the reactor allows, does not hold back
  CONTROL round trips on another session (each must finish within 2 s).
"""
import fcntl
import hashlib
import socket
import struct
import termios
import time

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport
from twisted.trial import unittest

from routeproxy import certs, tls
from routeproxy.mux.connection import MuxConfig
from routeproxy.mux import frames as F
from routeproxy.mux.linksocket import TCP_NOTSENT_LOWAT, bufferedBytes, bufferingTransport, kernelUnsent
from routeproxy.mux.protocol import MuxClientFactory, MuxServerFactory
from routeproxy.mux.session import SessionRefused
from routeproxy.testing import RecordingSessionReceiver

RRP, LRP = "rrp.mux.test", "lrp.mux.test"
log = Logger(namespace="tests.test_mux_tls")


def streamFor(sessionNumber, direction, chunks=4):
    """Deterministic, distinct chunks of varying size for one session and direction."""
    out = []
    for i in range(chunks):
        seed = hashlib.sha256(f"{direction}/{sessionNumber}/{i}".encode()).digest()
        size = 1 + (seed[0] << 4 | seed[1] >> 4) % 3000
        out.append((seed * (size // 32 + 1))[:size])
    return out


class TLSLinkTestCase(unittest.TestCase):
    """An LRP's mux connection (``self.lrp``) to an RRP's over real mutual TLS on loopback;
    the RRP's sessions go to ``self.sessionRequested``."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        paths = certs.write_lab_certs(self.mktemp(), RRP, [LRP])
        self.serverReceivers = {}
        self.config = MuxConfig()
        self.serverFactory = MuxServerFactory(self.sessionRequested, self.config, reactor,
                                              peerNameOf=tls.peerName)
        port = reactor.listenSSL(
            0, self.serverFactory,
            tls.serverCreator(paths["rrp_cert"], paths["rrp_key"], paths["ca"]),
            interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = wrapClientTLS(
            tls.clientCreator(RRP, paths["lrp_cert"], paths["lrp_key"], paths["ca"]),
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        protocol = yield endpoint.connect(MuxClientFactory(self.config, reactor,
                                                           peerNameOf=tls.peerName))
        self.lrp = protocol.connection
        self.addCleanup(self.closeLink)
        yield self.lrp.whenReady()
        self.assertEqual(self.lrp.peerName, RRP)

    @defer.inlineCallbacks
    def closeLink(self):
        server = list(self.serverFactory.connections)
        self.lrp.goAway(0, "test over")
        yield defer.gatherResults([c.whenLinkLost() for c in [self.lrp] + server])


class MuxOverTLSTests(TLSLinkTestCase):
    def sessionRequested(self, session, profile, clientInfo):
        if profile != "office":
            raise SessionRefused(1, "unknown")
        self.assertEqual(session.connection.peerName, LRP)
        number = int(clientInfo)
        receiver = self.serverReceivers[number] = RecordingSessionReceiver(record=False)
        if number < 0:  # the echo session of the flood test
            receiver.echo = session
        else:
            for chunk in streamFor(number, "down"):
                session.sendControl(chunk)
        return receiver

    def test_unsentBytesLimitedInTheKernelUnderTLS(self):
        """Both ends' TCP sockets under TLS carry TCP_NOTSENT_LOWAT = config.unsentLimit."""
        ends = [self.lrp] + list(self.serverFactory.connections)
        for connection in ends:
            sock = bufferingTransport(connection._link.transport).socket
            self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT), self.config.unsentLimit)

    def test_transportPausesOnlyAboveTheGREWatermark(self):
        """Twisted's producer pause (which drops every GRE frame until its buffer is empty) is
        above what the GRE watermark lets into the buffer, on both ends."""
        size = 4 * self.config.greWatermark
        for connection in [self.lrp] + list(self.serverFactory.connections):
            tcp = bufferingTransport(connection._link.transport)
            self.assertFalse(tcp._isSendBufferFull())
            tcp._tempDataLen += size   # (as if that much waited; put back at once)
            try:
                self.assertFalse(tcp._isSendBufferFull())
                tcp._tempDataLen += 1
                self.assertTrue(tcp._isSendBufferFull())
            finally:
                tcp._tempDataLen -= size + 1
            # and every read stays Twisted's 64 KiB, under malloc's mmap threshold
            self.assertLessEqual(tcp.bufferSize, 64 * 1024)

    @defer.inlineCallbacks
    def test_theWatermarkCountsTheKernelsUnsentBytes(self):
        """With the peer not reading, the bytes written and not sent pile up in the kernel
        (the mux writes without waiting for TCP_NOTSENT_LOWAT's writability): the GRE
        watermark counts them, so ours and the kernel's together stay near it, not at the
        socket's send buffer (megabytes)."""
        flood = self.lrp.openSession("office", "1", RecordingSessionReceiver(record=False))
        yield flood.whenOpen()
        server = list(self.serverFactory.connections)[0]
        serverTCP = bufferingTransport(server._link.transport)
        serverTCP.stopReading()
        tcp = bufferingTransport(self.lrp._link.transport)
        payload = bytes(1400)
        for turn in range(2000):
            for seq in range(32):
                flood.sendGRE(0x4242, seq, None, payload)
            yield task.deferLater(reactor, 0, lambda: None)
            if self.lrp.stats.greDropped["watermark"] > 100:
                break
        unsent = kernelUnsent(tcp)
        self.assertGreater(unsent, 0)
        self.assertEqual(self.lrp._link.sendBufferSize(), bufferedBytes(tcp) + unsent)
        self.assertLess(bufferedBytes(tcp) + unsent, 2 * self.config.greWatermark)
        serverTCP.startReading()

    def test_aTurnsFramesGoStraightIntoTLS(self):
        """The mux's one write per turn is encrypted at once, not held by Twisted's small-write
        aggregator for another reactor turn, and sent at once, not after the reactor's next
        poll: its bytes are in the peer's socket before the reactor runs again."""
        link = self.lrp._link
        self.assertIsInstance(link.transport, BufferingTLSTransport)
        tcp = bufferingTransport(link.transport)
        peer = bufferingTransport(list(self.serverFactory.connections)[0]._link.transport).socket
        arrived = lambda: struct.unpack("i", fcntl.ioctl(peer.fileno(), termios.FIONREAD, b"\0" * 4))[0]  # noqa: E731
        self.assertEqual(bufferedBytes(tcp), 0)
        before = arrived()
        link.writeFrames([F.Ping(b"12345678").encode()])  # the peer answers; nobody waits for it
        self.assertIsNone(link.transport._aggregator._scheduled)
        self.assertEqual(bufferedBytes(tcp), 0)
        self.assertGreater(arrived(), before)

    @defer.inlineCallbacks
    def test_thousandSessionsKeepTheirBytesInOrder(self):
        started = time.monotonic()
        sessions, receivers = [], []
        for n in range(1000):
            receiver = RecordingSessionReceiver(record=False)
            sessions.append(self.lrp.openSession("office", str(n), receiver))
            receivers.append(receiver)
        yield defer.gatherResults([s.whenOpen() for s in sessions])
        opened = time.monotonic()
        self.assertEqual(len(self.lrp.sessions), 1000)
        for n, session in enumerate(sessions):
            for chunk in streamFor(n, "up"):
                session.sendControl(chunk)
        yield defer.gatherResults(
            [r.whenControl(sum(map(len, streamFor(n, "down")))) for n, r in enumerate(receivers)]
            + [self.serverReceivers[n].whenControl(sum(map(len, streamFor(n, "up"))))
               for n in range(1000)])
        finished = time.monotonic()
        for n in range(1000):
            self.assertEqual(hashlib.sha256(self.serverReceivers[n].control).hexdigest(),
                             hashlib.sha256(b"".join(streamFor(n, "up"))).hexdigest(),
                             f"session {n} upstream")
            self.assertEqual(hashlib.sha256(receivers[n].control).hexdigest(),
                             hashlib.sha256(b"".join(streamFor(n, "down"))).hexdigest(),
                             f"session {n} downstream")
        total = sum(len(r.control) for r in receivers) + sum(
            len(r.control) for r in self.serverReceivers.values())
        log.info("1000 sessions: opened in {o:.2f} s, {mb:.1f} MB of control both ways"
                 " in {t:.2f} s", o=opened - started, mb=total / 1e6, t=finished - opened)

    @defer.inlineCallbacks
    def test_greFloodDoesNotHoldBackControl(self):
        flood = self.lrp.openSession("office", "1", RecordingSessionReceiver(record=False))
        echoReceiver = RecordingSessionReceiver()
        echo = self.lrp.openSession("office", "-1", echoReceiver)
        yield defer.gatherResults([flood.whenOpen(), echo.whenOpen()])
        floodServer = self.serverReceivers[1]

        sent = dropped = 0
        flooding = True
        payload = bytes(1400)

        def floodTurn():
            nonlocal sent, dropped
            for seq in range(256):  # 358 KB a turn: over the GRE watermark every turn
                if flood.sendGRE(0x4242, seq, None, payload):
                    sent += 1
                else:
                    dropped += 1
            if flooding:
                reactor.callLater(0, floodTurn)

        reactor.callLater(0, floodTurn)
        yield task.deferLater(reactor, 0.3, lambda: None)  # let the flood build up
        rtts = []
        try:
            for i in range(15):
                message = f"echo {i}".encode()
                before = len(echoReceiver.control)
                echoed = echoReceiver.whenControl(before + len(message))
                start = time.monotonic()
                echo.sendControl(message)
                yield echoed.addTimeout(2.0, reactor)
                rtts.append(time.monotonic() - start)
                self.assertEqual(bytes(echoReceiver.control[before:]), message)
                yield task.deferLater(reactor, 0.1, lambda: None)
            yield self.lrp.ping().addTimeout(2.0, reactor)  # link RTT under the flood
        finally:
            flooding = False
        stats = self.lrp.stats
        log.info("GRE flood: {sent} sent, {recv} received, {dropped} dropped {why};"
                 " control RTT max {mx:.1f} ms, mean {mean:.1f} ms; link RTT {rtt:.1f} ms",
                 sent=sent, recv=floodServer.greCount, dropped=dropped,
                 why=dict(stats.greDropped), mx=max(rtts) * 1000,
                 mean=sum(rtts) / len(rtts) * 1000, rtt=stats.rttLast * 1000)
        self.assertEqual(len(rtts), 15)
        self.assertGreater(sent, 1000)  # the flood really flowed ...
        self.assertGreater(floodServer.greCount, 1000)
        self.assertGreater(dropped, 0)  # ... and was really over capacity
        self.assertEqual(dropped, sum(stats.greDropped.values()))
