"""Service pieces both daemons' makeService use: the GRE port and the status endpoint.

Each tap builds its daemon with constructor injection; these helpers are the parts that
would otherwise be written twice: a GRE port that starts and stops with the daemon, the
host's IPv4 addresses, and the optional status/metrics listener.
"""
import fcntl
import resource
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
    """Opens a :class:`~routeproxy.greport.GREPort` with the daemon, and closes it.

    The capture and raw sockets open in ``privilegedStartService``, before twistd drops
    privileges (``--uid``); a failure there is a fatal start-up error
    (:class:`routeproxy.daemon.StartupError`, one line, exit 1).
    """

    optionName = "--gre-interface"

    def __init__(self, port, reactor):
        self.port = port
        self.reactor = reactor

    def privilegedStartService(self):
        super().privilegedStartService()
        self.port.startListening()

    def stopService(self):
        super().stopService()
        return self.port.stopListening()


def greOpener(parent, reactor, localAddresses, interface, maxSojourn=0.005, shard=None,
              captureBuffer=8 * 1024 * 1024, capture="pcap", noCallShare=32):
    """An ``openGREPort(receiver)`` for a daemon: the port it opens runs under *parent*."""
    from routeproxy.greport import GREPort

    def openGREPort(receiver):
        port = GREPort(receiver, localAddresses, interface=interface, reactor=reactor, maxSojourn=maxSojourn,
                       shard=shard, bufferSize=captureBuffer, capture=capture,
                       noCallShare=noCallShare)
        GREPortService(port, reactor).setServiceParent(parent)
        return port

    return openGREPort


def useNativePlane(options, relay, factory):
    """With ``--gre-capture native`` or ``native-raw`` (or auto where it is built) the link's
    GRE frames are sent to the facing peer in C too (routeproxy.flows.LinkFlows: every mux
    connection *factory* builds reads in C); where auto fell back to pcap, one line says why.
    With ``--data-plane loop`` (or auto, the default) the reactor's poll goes to C too
    (routeproxy.native.loop); only an explicit ``loop`` that cannot be had is warned about."""
    if options.get("gre-capture-note"):
        Logger().warn("{note}; GRE takes the Python path (docs/fastpath.md)",
                      note=options["gre-capture-note"])
    from routeproxy.capture import NATIVE_KINDS
    plane = options.get("data-plane")
    if options["gre-capture"] not in NATIVE_KINDS:
        if plane == "loop":
            Logger().warn("--data-plane loop needs the native capture: Python's path instead")
        return
    from routeproxy import native
    from routeproxy.flows import LinkFlows
    module, _ = native.load()   # checkCapture refused the option where it is not built
    factory.linkFlows = LinkFlows(module, relay.grePort)
    factory.linkFlows.drops = relay.drops
    relay.addFlows(factory.linkFlows)
    if plane in ("loop", "auto"):
        from twisted.internet import reactor
        from routeproxy.native.loop import CaptureLoop
        loop, reason = CaptureLoop.over(module, reactor, relay.grePort)
        if loop is not None:
            loop.install()
        elif plane == "loop":
            Logger().warn("--data-plane loop: {reason}; the pump instead", reason=reason)
        else:
            Logger().info("--data-plane auto: the pump, as {reason}", reason=reason)


def addStatusEndpoint(parent, reactor, address, daemon):
    """Serve *daemon*'s ``snapshot()`` on *address* under *parent*, if given: ``("unix",
    PATH)`` (a socket of mode 0600: only its owner, and root, may read it) or (host, port),
    with a warning when that is not loopback (the snapshot names every client)."""
    if address is None:
        return
    import ipaddress
    from routeproxy.fdbudget import FileBudget, PausingTCPServer
    from routeproxy.status import StatusResource, StatusSite
    site = StatusSite(StatusResource(daemon))
    if address[0] == "unix":
        server = internet.UNIXServer(address[1], site, mode=0o600, wantPID=True, reactor=reactor)
    else:
        host, port = address
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            Logger().warn("--status {host}:{port} is not loopback: anyone who reaches it reads "
                          "every client's address; prefer 127.0.0.1 or unix:PATH",
                          host=host, port=port)
        # its own, smaller reserve: the status still answers while client listeners pause
        server = PausingTCPServer(port, site, interface=host, reactor=reactor,
                                  budget=FileBudget(reserve=8))
    server.optionName = "--status"
    server.setServiceParent(parent)


def raiseFileLimit(log=None):
    """Raise the soft RLIMIT_NOFILE to the hard limit (every client costs descriptors).

    Returns (soft, hard) in force afterwards, and logs them once.
    """
    log = log or Logger()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warn("cannot raise the open-file limit from {soft} to {hard}: {error}",
                     soft=soft, hard=hard, error=e)
    log.info("open-file limit: {soft} (hard {hard})", soft=soft, hard=hard)
    return soft, hard
