"""Service pieces both daemons' makeService use: the GRE port and the status endpoint.

Each tap builds its daemon with constructor injection; these helpers are the parts that
would otherwise be written twice: a GRE port that starts and stops with the daemon, the
host's IPv4 addresses, and the optional status/metrics listener.
"""
import fcntl
import socket
import struct

from twisted.application import internet
from twisted.application.service import Service
from twisted.logger import Logger

SIOCGIFADDR = 0x8915


def localIPv4Addresses():
    """Every IPv4 address configured on this host's (or namespace's) interfaces."""
    addresses = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            addresses.append(socket.inet_ntoa(raw[20:24]))
    return addresses or ["127.0.0.1"]


class GREPortService(Service):
    """Starts and stops a :class:`~routeproxy.greport.GREPort` with the daemon.

    If GRE cannot be captured (not root, no such interface) the daemon cannot work: one clear
    log line, then the reactor stops.
    """

    log = Logger()

    def __init__(self, port, reactor):
        self.port = port
        self.reactor = reactor

    def startService(self):
        super().startService()
        try:
            self.port.startListening()
        except Exception as e:
            self.log.critical("cannot capture GRE on {iface}: {error} (capturing needs root or "
                              "CAP_NET_RAW); stopping", iface=self.port.interface, error=e)
            self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self):
        super().stopService()
        return self.port.stopListening()


def greOpener(parent, reactor, localAddresses, interface):
    """An ``openGREPort(receiver)`` for a daemon: the port it opens runs under *parent*."""
    from routeproxy.greport import GREPort

    def openGREPort(receiver):
        port = GREPort(receiver, localAddresses, interface=interface, reactor=reactor)
        GREPortService(port, reactor).setServiceParent(parent)
        return port

    return openGREPort


def addStatusEndpoint(parent, reactor, address, daemon):
    """Serve *daemon*'s ``snapshot()`` on *address* (host, port) under *parent*, if given."""
    if address is None:
        return
    from routeproxy.status import StatusResource, StatusSite
    host, port = address
    internet.TCPServer(port, StatusSite(StatusResource(daemon)), interface=host,
                       reactor=reactor).setServiceParent(parent)
