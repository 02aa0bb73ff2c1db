"""The RRP's listener before TLS: at most so many half-open links, each for a bounded time.

Anyone can open TCP connections to the RRP's TLS port and never finish the handshake.  As
OpenSSH bounds unauthenticated connections (MaxStartups, LoginGraceTime), the RRP:

* gives each connection ``handshakeTimeout`` seconds to finish TLS and the mux HELLO, then
  aborts it;
* keeps at most ``maxStartups = START:RATE:FULL`` such connections: beyond START it refuses
  a new one with probability RATE %, rising linearly to 100 % at FULL.  A refused one is
  closed at once, before any TLS state is made, so a flood costs a socket for a moment.

Refusals are counted (``max_startups``, ``handshake_timeout``) with rate-limited log lines.
An LRP that is refused reconnects with its backoff; an established link is never touched.
"""
import random

from twisted.protocols.policies import WrappingFactory

from routeproxy.stats import DropCounter


class StartupGate:
    """Counts connections not yet through TLS + HELLO and decides on new ones."""

    def __init__(self, limits, clock, refusals=None, chance=random.random):
        self.limits = limits
        self.clock = clock
        self.refusals = refusals if refusals is not None else DropCounter(verb="refused")
        self.chance = chance
        self.pending = 0

    def admit(self):
        start, rate, full = self.limits.maxStartups
        if self.pending < start:
            return True
        if self.pending >= full:
            return False
        share = rate / 100.0 + (1 - rate / 100.0) * (self.pending - start) / max(1, full - start)
        return self.chance() >= share

    def snapshot(self):
        return {"pending_handshakes": self.pending}


class StartupGateFactory(WrappingFactory):
    """Wraps the TLS factory of the RRP's listener; the mux connection says when it is up."""

    protocol = None   # buildProtocol hands out the wrapped factory's protocols themselves

    def __init__(self, tlsFactory, gate):
        WrappingFactory.__init__(self, tlsFactory)
        self.gate = gate

    def buildProtocol(self, addr):
        gate = self.gate
        host = getattr(addr, "host", "?")
        if not gate.admit():
            gate.refusals.add("max_startups", f"TLS connection from {host}: "
                              f"{gate.pending} not through TLS yet")
            return None
        protocol = self.wrappedFactory.buildProtocol(addr)
        if protocol is None:
            return None
        mux = getattr(protocol, "wrappedProtocol", None)
        connection = getattr(mux, "connection", None)
        if connection is None:
            return protocol
        gate.pending += 1
        state = {"done": False}

        def done(result):
            if not state["done"]:
                state["done"] = True
                gate.pending -= 1
                if timer.active():
                    timer.cancel()
            return None

        def expired():
            if state["done"]:
                return
            gate.refusals.add("handshake_timeout", f"TLS connection from {host}: no TLS and "
                              f"HELLO within {gate.limits.handshakeTimeout:g} s")
            done(None)
            if protocol.transport is not None:
                protocol.transport.abortConnection()

        timer = gate.clock.callLater(gate.limits.handshakeTimeout, expired)
        connection.whenReady().addBoth(done)
        return protocol
