"""Accepting only while file descriptors are left for the work already accepted.

Every client costs the LRP a socket (and, once started, the RRP a socket towards pptpd).
When the process runs out (EMFILE), Twisted's listener accepts and at once closes what
arrives, and any other descriptor the daemon needs (a dial to pptpd, the capture, a status
request) fails too.  So the daemons' listeners are :class:`PausingPort`: while fewer than
``reserve`` descriptors are free they stop accepting for ``pauseFor`` seconds (the kernel's
backlog holds new connections meanwhile) and count it; honest work in progress keeps its
descriptors.  ``service.raiseFileLimit`` raises the soft limit to the hard one at start.

With ``reusePort`` the listener binds with SO_REUSEPORT, so the N processes of a sharded
daemon (``--shard I/N``, docs/multiworker.md) share one port and the kernel spreads new
connections over them.
"""
import os
import resource
import socket
import time

from twisted.application import internet
from twisted.internet import tcp
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger

from routeproxy.stats import LimitedLog


class FileBudget:
    """How many descriptors this process has left (the count is refreshed at most every
    *interval* seconds: listing /proc/self/fd costs one syscall per open descriptor)."""

    def __init__(self, reserve=64, clock=time.monotonic, interval=0.1, limit=None, count=None):
        self.reserve = reserve
        self.clock = clock
        self.interval = interval
        self._limit = limit or (lambda: resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self._count = count or (lambda: len(os.listdir("/proc/self/fd")))
        self._checked = None
        self._free = None
        self.pauses = 0

    def free(self):
        now = self.clock()
        if (self._checked is None or now - self._checked >= self.interval
                or self._free < 4 * self.reserve):   # close to the reserve: count every time
            self._checked, self._free = now, self._limit() - self._count()
        return self._free

    def low(self):
        return self.free() < self.reserve

    def snapshot(self):
        return {"free": self.free(), "reserve": self.reserve, "accept_pauses": self.pauses}


class PausingPort(tcp.Port):
    """A TCP listener that stops accepting while its :class:`FileBudget` is low."""

    pauseFor = 1.0
    log = Logger()

    def __init__(self, *args, budget=None, reusePort=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.budget = budget if budget is not None else FileBudget()
        self.reusePort = reusePort
        self.limitedLog = LimitedLog(self.log, burst=1)
        self._resumeCall = None

    def createInternetSocket(self):
        sock = super().createInternetSocket()
        if self.reusePort:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return sock

    def doRead(self):
        if self.budget.low():
            self.budget.pauses += 1
            self.limitedLog.warn("emfile", "{port}: only {free} file descriptors left "
                                 "(reserve {reserve}); not accepting for {pause:g} s",
                                 port=f"TCP port {self._realPortNumber}", free=self.budget.free(),
                                 reserve=self.budget.reserve, pause=self.pauseFor)
            self.stopReading()
            self._resumeCall = self.reactor.callLater(self.pauseFor, self._resume)
            return None
        # one wake-up accepts at most what the budget has above its reserve
        self.numberAccepts = max(1, min(self.numberAccepts, self.budget.free() - self.budget.reserve))
        return super().doRead()

    def _resume(self):
        self._resumeCall = None
        if self.connected:
            self.startReading()

    def connectionLost(self, reason):
        if self._resumeCall is not None and self._resumeCall.active():
            self._resumeCall.cancel()
        self._resumeCall = None
        return super().connectionLost(reason)


class PausingTCPServer(internet.TCPServer):
    """``internet.TCPServer`` whose port is a :class:`PausingPort` sharing *budget*."""

    def __init__(self, *args, budget=None, reusePort=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.budget = budget if budget is not None else FileBudget()
        self.reusePort = reusePort

    def _getPort(self):
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor
        if not isinstance(reactor, PosixReactorBase):   # a memory reactor in tests
            return super()._getPort()
        port = PausingPort(*self.args, reactor=reactor, budget=self.budget, reusePort=self.reusePort,
                           **self.kwargs)
        port.startListening()
        return port
