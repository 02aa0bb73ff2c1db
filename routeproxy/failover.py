"""The LRP's way to several RRPs: each connection attempt tries the addresses in order.

``--rrp`` may be given several times.  Every (re)connection starts with the first address and
falls through to the next when one does not answer (refused, unreachable, timed out), so the
LRP uses the first RRP that is up and comes back to it only when its current link is lost.
A link that lands on another RRP cannot resume the old one's sessions: the new RRP does not
know the token, refuses the RESUME, and the LRP ends those sessions cleanly
(docs/protocol.md s.10).  Several RRPs behind one TCP load balancer (HAProxy in TCP mode) need
no list: the LRP dials the balancer's one address.
"""
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer


@implementer(IStreamClientEndpoint)
class FailoverEndpoint:
    """Connects through the first of *endpoints* that answers; *labels* name them in logs."""

    log = Logger()

    def __init__(self, endpoints, labels):
        if not endpoints or len(endpoints) != len(labels):
            raise ValueError("one label per endpoint, at least one endpoint")
        self.endpoints = list(endpoints)
        self.labels = list(labels)
        self.current = None   # the label of the endpoint the last connection went through

    def connect(self, factory):
        return self._attempt(factory, 0)

    def _attempt(self, factory, index):
        def connected(protocol):
            if self.current != self.labels[index]:
                self.log.info("LRP: connected to the RRP at {rrp}", rrp=self.labels[index])
            self.current = self.labels[index]
            return protocol

        def failed(failure):
            if index + 1 >= len(self.endpoints):
                return failure
            self.log.info("LRP: the RRP at {rrp} did not answer ({why}); trying {next}",
                          rrp=self.labels[index], why=failure.getErrorMessage(),
                          next=self.labels[index + 1])
            return self._attempt(factory, index + 1)

        return self.endpoints[index].connect(factory).addCallbacks(connected, failed)
