"""Which client connections the LRP takes: per-address and pending caps, answered in PPTP.

A TCP connection costs the LRP a socket before it has said anything, so two caps bound what
idle or slow clients can hold (as OpenSSH's MaxStartups bounds unauthenticated connections):

* ``maxPerAddress`` control connections from one client address, and
* ``maxPending`` connections, from all addresses, that have not yet sent their
  Start-Control-Connection-Request (each has ``startTimeout`` seconds to do so).

A client beyond a cap is not closed silently: it is sent a Start-Control-Connection-Reply
with result 2 (general error) and error 4 (no resource), then closed.  Each refusal is
counted by reason and logged at a bounded rate (``refusals``).
"""
import collections

from twisted.internet.protocol import Protocol

from routeproxy import pptp
from routeproxy.stats import DropCounter
from routeproxy.upstream import startRefusal

REFUSED_PER_ADDRESS = "per_address"
REFUSED_PENDING = "pending"


class ClientAdmission:
    """The LRP's count of client connections, by address and not yet started."""

    def __init__(self, limits, refusals=None):
        self.limits = limits
        self.refusals = refusals if refusals is not None else DropCounter(verb="refused")
        self.byAddress = collections.Counter()
        self.pending = 0

    def refusal(self, host):
        """Why a new connection from *host* may not be taken (a refusals reason), or None."""
        if self.byAddress[host] >= self.limits.maxPerAddress:
            return REFUSED_PER_ADDRESS
        if self.pending >= self.limits.maxPending:
            return REFUSED_PENDING
        return None

    def connected(self, host):
        self.byAddress[host] += 1
        self.pending += 1

    def started(self, host):
        self.pending -= 1

    def ended(self, host, started):
        if not started:
            self.pending -= 1
        self.byAddress[host] -= 1
        if self.byAddress[host] <= 0:
            del self.byAddress[host]

    def snapshot(self):
        return {"pending": self.pending, "addresses": len(self.byAddress),
                "busiest_address_connections": max(self.byAddress.values(), default=0)}


class RefusingProtocol(Protocol):
    """Tells a client there is no room (Start-Control-Connection-Reply, no resource), closes."""

    def connectionMade(self):
        self.transport.write(startRefusal(pptp.ErrorCode.NO_RESOURCE).pack())
        self.transport.loseConnection()
