"""Service pieces both daemons' makeService use: the GRE port as a service, local addresses."""
import fcntl
import socket
import struct

from twisted.application.service import Service
from twisted.logger import Logger

SIOCGIFADDR = 0x8915


def local_ipv4_addresses():
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
    """Starts and stops a :class:`~routeproxy.greio.GREPort` with the daemon.

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
