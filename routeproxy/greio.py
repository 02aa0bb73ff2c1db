"""GRE I/O for the daemons: capture the GRE sent to our addresses, send GRE from a chosen one.

PPTP's data channel is GRE, IP protocol 47: no ports, so no ordinary socket receives it.

* **Receive** (default): a pypcap handle with the BPF filter
  ``ip proto 47 and (dst host A or ...)`` and direction "in", non-blocking, registered
  with the reactor as a FileDescriptor (modelled on ``twisted.pair.tuntap.TuntapPort``).
  Each wake-up reads until nothing is left or ``maxPacketsPerRead`` packets were handled,
  strips the link-layer header for the handle's datalink, checks the IPv4 header and hands
  ``receiver.greReceived(src, dst, gre)`` upward.  ``capture="raw"`` reads a raw
  IPPROTO_GRE socket instead (measured in docs/gre-io.md).
* **Fragments**: pcap sees IPv4 fragments before the kernel reassembles them, and real
  clients (pppd MTU 1500) send ~1550-byte GRE as two.  GRE fragments for a local address
  go through a bounded ``ipfrag.Reassembler``; the whole datagram goes up like any other.
* **Send**: ``sendGRE(src, dst, gre)`` through one raw IPPROTO_GRE socket per local
  address, bound to it and opened at start: pptpd only accepts GRE from its control
  connection's peer address, so the source must be chosen, and a bound socket lets the
  kernel build the IP header (measured faster than IP_HDRINCL from Python).  A full socket
  buffer drops the packet and counts it; nothing is queued.  DF is clear
  (IP_PMTUDISC_DONT), as pptpd sends: GRE over the path MTU is fragmented, not refused.
* **The ICMP gotcha**: a host with no raw IPPROTO_GRE socket matching a GRE packet (and no
  kernel GRE module) answers it with ICMP protocol-unreachable; pcap does not count.  The
  bound send sockets are open for the port's whole life, so every local address has one.
  A raw socket also gets a copy of every GRE packet it matches and nobody reads them, so
  each carries a classic BPF program of one instruction, ``ret #0``, that drops the copy
  before it is queued (a tiny SO_RCVBUF would also drop, but only after charging each copy
  to the socket, and a full queue is still a queue).

Addresses are dotted-quad ``str`` both ways, as Twisted's ``getPeer().host`` gives them, so
the daemons compare them with no conversion.  The port converts once per packet with two
dict look-ups (the destination against the local set, the source through a bounded cache),
~60 ns together; handing 4-byte ``bytes`` up would save that, but every caller would then
convert its own addresses instead (docs/gre-io.md has the numbers).

The operating system is injected (``system=``), as in tuntap: ``RealGRESystem`` opens pcap
handles and sockets; ``MemoryGRESystem`` (fake captures and sockets in memory, no network)
lets tests and the daemons' own tests drive a port without root.
"""
import collections
import ctypes
import errno
import socket
import struct
import time

from twisted.internet import abstract, defer, error
from twisted.logger import Logger
from twisted.python import failure
from zope.interface import Interface

from routeproxy import ipfrag

__all__ = [
    "GREPort", "IGREReceiver", "GREStats", "GREIOError", "attach_drop_all", "RealGRESystem",
    "MemoryGRESystem",
    "MemoryCapture", "MemoryRawSocket", "gre_filter", "DROP_ALL_FILTER", "LINK_LAYERS",
    "DLT_EN10MB", "DLT_LINUX_SLL", "DLT_LINUX_SLL2", "DLT_RAW", "DLT_IPV4", "DLT_NULL", "DLT_LOOP",
]

IPPROTO_GRE = 47
SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)  # Linux <linux/in.h>
IP_PMTUDISC_DONT = getattr(socket, "IP_PMTUDISC_DONT", 0)  # DF clear: the kernel fragments

# Datalink types (pcap-linktype.h).  DLT_RAW is 12 on Linux, 14 on OpenBSD, 101 as a
# LINKTYPE; DLT_NULL carries the address family in host order, DLT_LOOP in network order.
DLT_NULL, DLT_EN10MB, DLT_RAW, DLT_RAW_BSD, LINKTYPE_RAW = 0, 1, 12, 14, 101
DLT_LOOP, DLT_LINUX_SLL, DLT_IPV4, DLT_LINUX_SLL2 = 108, 113, 228, 276

ETHERTYPE_IPV4 = b"\x08\x00"

#: datalink -> (link header length, offset of the protocol field, its value for IPv4)
LINK_LAYERS = {
    DLT_EN10MB: (14, 12, ETHERTYPE_IPV4),  # also Linux `lo` (zero MACs)
    DLT_LINUX_SLL: (16, 14, ETHERTYPE_IPV4),  # the "any" device
    DLT_LINUX_SLL2: (20, 0, ETHERTYPE_IPV4),
    DLT_RAW: (0, None, None),
    DLT_RAW_BSD: (0, None, None),
    LINKTYPE_RAW: (0, None, None),
    DLT_IPV4: (0, None, None),
    DLT_NULL: (4, 0, struct.pack("=I", 2)),  # AF_INET, host byte order
    DLT_LOOP: (4, 0, struct.pack("!I", 2)),
}

#: One classic BPF instruction, BPF_RET|BPF_K with k=0: accept 0 bytes = drop the packet.
DROP_ALL_FILTER = struct.pack("HBBI", 0x06, 0, 0, 0)

# version/IHL, TOS, total length, id, flags/fragment offset, TTL, protocol, checksum, src, dst
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV4_MIN = 20
_FRAGMENT_BITS = 0x3FFF  # MF flag + fragment offset
_MORE_FRAGMENTS = 0x2000
_FRAGMENT_OFFSET = 0x1FFF  # in units of 8 bytes
_SOURCE_CACHE_MAX = 65536

# Drop reasons (stats.dropped keys; routeproxy_gre_dropped_total{reason=...}).
DROP_NOT_IPV4 = "not_ipv4"  # link protocol or IP version is not IPv4
DROP_TRUNCATED = "truncated"  # shorter than its headers or its IP total length
DROP_BAD_HEADER = "bad_header"  # IHL < 5 or total length < IHL
DROP_NOT_GRE = "not_gre"
DROP_FRAGMENT_INVALID = ipfrag.DROP_FRAGMENT_INVALID  # no valid datagram has this fragment
DROP_REASSEMBLY_OVERLAP = ipfrag.DROP_REASSEMBLY_OVERLAP  # fragments disagree: datagram dropped
DROP_REASSEMBLY_TIMEOUT = ipfrag.DROP_REASSEMBLY_TIMEOUT  # incomplete after reassemblyTimeout
DROP_REASSEMBLY_EVICTED = ipfrag.DROP_REASSEMBLY_EVICTED  # too many datagrams in progress
DROP_NOT_LOCAL = "not_local"  # destination is not one of our addresses
DROP_RECEIVER_ERROR = "receiver_error"  # greReceived raised
DROP_CAPTURE = "capture"  # dropped by the kernel/libpcap before we read (pcap stats)
DROP_SEND_BUSY = "send_busy"  # socket buffer full (EAGAIN) or no buffers (ENOBUFS)
DROP_SEND_ERROR = "send_error"  # any other send failure (no route, netfilter EPERM, ...)


class GREIOError(Exception):
    """The port cannot be set up as asked (bad address, interface, filter or datalink)."""


class IGREReceiver(Interface):
    """What a GREPort delivers to (the LRP's or RRP's GRE demultiplexer)."""

    def greReceived(src, dst, gre):
        """GRE header + payload *gre* (bytes) arrived from *src* for local address *dst* (str).

        Called in the reactor thread, many times per wake-up: return quickly.  An exception
        is logged and counted (receiver_error); it does not stop the port.
        """


def gre_filter(local_addresses):
    """The BPF expression that captures GRE sent to any of *local_addresses*."""
    hosts = " or ".join(f"dst host {address}" for address in sorted(local_addresses))
    return f"ip proto {IPPROTO_GRE} and ({hosts})"


def _packed(address):
    try:
        return socket.inet_aton(address) if address.count(".") == 3 else None
    except (OSError, TypeError, AttributeError):
        return None


def attach_drop_all(sock):
    """Make *sock* drop every packet the kernel would queue on it (SO_ATTACH_FILTER)."""
    program = ctypes.create_string_buffer(DROP_ALL_FILTER)
    fprog = struct.pack("HP", 1, ctypes.addressof(program))  # struct sock_fprog; copied by the kernel
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class GREStats:
    """Counters of one port; ``dropped`` is by reason (the DROP_* names)."""

    def __init__(self):
        self.received = 0  # packets the capture handed us
        self.delivered = 0  # greReceived calls that returned
        self.sent = 0
        self.reads = 0  # doRead wake-ups
        self.fragments = 0  # fragments taken into reassembly (pcap sees them before the kernel)
        self.reassembled = 0  # datagrams put back together from them (and delivered as one)
        self.dropped = collections.Counter()

    def asDict(self):
        return {
            "received": self.received, "delivered": self.delivered, "sent": self.sent,
            "reads": self.reads, "fragments": self.fragments, "reassembled": self.reassembled,
            "dropped": dict(self.dropped),
        }


# -- the operating system ----------------------------------------------------------------------


class PcapCapture:
    """A non-blocking pypcap handle: ``read(budget, callback)`` -> packets handled (0: none left)."""

    def __init__(self, interface, snaplen, bufferSize, bpf):
        import pcap

        self._pcap = None
        try:
            self._pcap = pcap.pcap(
                name=interface, snaplen=snaplen, promisc=False, immediate=True,
                timeout_ms=1, buffer_size=bufferSize,
            )
            self._pcap.setfilter(bpf)
            self._pcap.setnonblock(True)
        except (OSError, TypeError, ValueError) as e:
            if self._pcap is not None:
                self._pcap.close()
            raise GREIOError(f"cannot capture GRE on {interface!r} with {bpf!r}: {e}") from None
        try:
            # Only what arrives; on `lo` libpcap already skips the outgoing copy.
            self._pcap.setdirection(pcap.PCAP_D_IN)
        except (OSError, AttributeError):
            pass
        self._dispatch = self._pcap.dispatch

    def fileno(self):
        return self._pcap.fileno()

    def datalink(self):
        return self._pcap.datalink()

    def read(self, budget, callback):
        # callback(timestamp, frame) is pcap's own signature: no wrapper per packet.
        return self._dispatch(budget, callback)

    def setFilter(self, bpf):
        try:
            self._pcap.setfilter(bpf)
        except OSError as e:
            raise GREIOError(f"bad capture filter {bpf!r}: {e}") from None

    def stats(self):
        """(received, dropped, dropped by the interface), cumulative, from libpcap."""
        return self._pcap.stats()

    def close(self):
        self._pcap.close()


class RawSocketCapture:
    """Receive from an unbound raw IPPROTO_GRE socket (datalink: raw IPv4, header included).

    The kernel hands it every GRE packet for any local address, reassembled; the port
    filters the destination itself.  It also keeps the kernel from answering ICMP.
    """

    def __init__(self, system, maxPacketSize, bufferSize):
        self._sock = system.openRawSocket()
        self._sock.setblocking(False)
        if bufferSize:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, bufferSize)
            except OSError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufferSize)
        self._recv = self._sock.recv
        self._size = maxPacketSize
        self._received = 0

    def fileno(self):
        return self._sock.fileno()

    def datalink(self):
        return DLT_RAW

    def read(self, budget, callback):
        recv, size = self._recv, self._size
        n = 0
        while n < budget:
            try:
                frame = recv(size)
            except (BlockingIOError, InterruptedError):
                break
            n += 1
            callback(None, frame)
        self._received += n
        return n

    def setFilter(self, bpf):
        pass  # destinations are checked by the port

    def stats(self):
        return (self._received, 0, 0)  # kernel drops of a raw socket are not reported here

    def close(self):
        self._sock.close()


class RealGRESystem:
    """The parts of the operating system a GREPort uses."""

    def openCapture(self, interface, snaplen, bufferSize, bpf):
        return PcapCapture(interface, snaplen, bufferSize, bpf)

    def openRawSocket(self):
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_GRE)
        except PermissionError as e:
            raise GREIOError(f"raw GRE sockets need root or CAP_NET_RAW: {e}") from None


# -- the port ----------------------------------------------------------------------------------


class GREPort(abstract.FileDescriptor):
    """Captured GRE towards *localAddresses* up to ``receiver.greReceived``; GRE out via sendGRE.

    ``receiver.greReceived(src: str, dst: str, gre: bytes)`` gets the GRE header and
    payload (no IP header); src/dst are dotted quads and dst is one of localAddresses.

    * ``localAddresses``: where GRE is captured for, and the only sources sendGRE uses
      (a socket bound to each is opened at start, so a foreign address fails then).
    * ``interface``: the pcap device; "any" (default) covers every interface, "lo" too.
    * ``capture``: "pcap" (default) or "raw" (read an unbound raw GRE socket instead;
      ``interface`` is then unused: the socket sees every interface).
    * ``snaplen``: bytes kept per packet.  libpcap's ring has fixed slots of about
      snaplen bytes, so 65535 would fit only 128 packets in 8 MiB; 2048 holds a full
      1500-byte packet plus link header, and 8 MiB ~3,900 packets.  Longer packets are
      counted as "truncated".  ``bufferSize``: the capture ring (or socket buffer), bytes.
    * ``bpfFilter``: replaces the generated ``ip proto 47 and (dst host ...)`` expression.
    * ``reassemblyTimeout``/``maxReassemblies``: IPv4 fragments of GRE to a local address
      (pcap sees them before the kernel reassembles) are put back together, at most
      ``maxReassemblies`` datagrams at a time, each for at most ``reassemblyTimeout`` s.
    * ``system``: the OS layer, RealGRESystem by default; MemoryGRESystem in tests.
    """

    log = Logger()
    maxPacketsPerRead = 128  # packets handled per reactor wake-up before yielding

    def __init__(self, receiver, localAddresses, interface="any", capture="pcap",
                 reactor=None, system=None, snaplen=2048, bufferSize=8 * 1024 * 1024,
                 bpfFilter=None, reassemblyTimeout=5.0, maxReassemblies=256):
        abstract.FileDescriptor.__init__(self, reactor)
        if capture not in ("pcap", "raw"):
            raise GREIOError(f"capture must be 'pcap' or 'raw', not {capture!r}")
        self.receiver = receiver
        self.interface = interface
        self.captureKind = capture
        self.snaplen = snaplen
        self.bufferSize = bufferSize
        self._customFilter = bpfFilter
        self._local = {}  # packed -> str: the destination check and its conversion in one look-up
        for address in localAddresses:
            self._addLocal(address)
        if not self._local:
            raise GREIOError("a GREPort needs at least one local address")
        self._permanent = frozenset(self._local)
        self._references = collections.Counter()
        self._system = system if system is not None else RealGRESystem()
        self.stats = GREStats()
        self._reassembler = ipfrag.Reassembler(reassemblyTimeout, maxReassemblies,
                                               dropped=self.stats.dropped)
        self._clock = getattr(self.reactor, "seconds", time.monotonic)
        self._sources = {}  # packed -> str cache for greReceived's src
        self._senders = {}  # local source address -> bound raw socket
        self._capture = None
        self._loggedErrors = set()
        self._link = None
        self._reading = False

    # -- addresses -----------------------------------------------------------------------------

    def _addLocal(self, address):
        packed = _packed(address)
        if packed is None:
            raise GREIOError(f"not an IPv4 address: {address!r}")
        self._local[packed] = socket.inet_ntoa(packed)

    @property
    def localAddresses(self):
        return sorted(self._local.values(), key=socket.inet_aton)

    @property
    def bpfFilter(self):
        return self._customFilter or gre_filter(self._local.values())

    def addLocalAddress(self, address):
        """Also capture GRE sent to *address* and send from it, until as many removes.

        For the RRP: call it with each pptpd connection's local address
        (``transport.getHost().host``) and removeLocalAddress when that connection ends;
        addresses are counted, so connections sharing one address do not disturb each other.
        """
        packed = _packed(address)
        if packed is None:
            raise GREIOError(f"not an IPv4 address: {address!r}")
        self._references[packed] += 1
        if packed in self._local:
            return
        self._addLocal(address)
        if self._capture is not None:
            try:
                self._openSender(self._local[packed])
                self._capture.setFilter(self.bpfFilter)
            except GREIOError:
                self._references[packed] = 1
                self.removeLocalAddress(address)
                raise

    def removeLocalAddress(self, address):
        """Undo one addLocalAddress; the last one stops capture and closes the sender.

        Addresses given to the constructor stay for the port's life (this is a no-op).
        """
        packed = _packed(address)
        if packed not in self._local or packed in self._permanent:
            return
        self._references[packed] -= 1
        if self._references[packed] > 0:
            return
        del self._references[packed]
        name = self._local.pop(packed)
        if self._capture is not None:
            self._capture.setFilter(self.bpfFilter)
        sender = self._senders.pop(name, None)
        if sender is not None:
            sender.close()

    # -- life cycle ----------------------------------------------------------------------------

    def startListening(self):
        """Open the capture and one bound send socket per local address, start reading."""
        capture = None
        try:
            if self.captureKind == "pcap":
                capture = self._system.openCapture(self.interface, self.snaplen, self.bufferSize,
                                                   self.bpfFilter)
            else:
                capture = RawSocketCapture(self._system, self.snaplen, self.bufferSize)
            datalink = capture.datalink()
            if datalink not in LINK_LAYERS:
                raise GREIOError(f"unsupported datalink {datalink} on {self.interface!r}")
            for address in self._local.values():
                self._openSender(address)
        except BaseException:
            for handle in [capture, *self._senders.values()]:
                if handle is not None:
                    handle.close()
            self._senders.clear()
            raise
        self._capture = capture
        offset, typeAt, ipv4Type = LINK_LAYERS[datalink]
        self._link = (offset, typeAt, typeAt + len(ipv4Type) if ipv4Type else None, ipv4Type)
        self.connected = 1
        self.log.info("GRE I/O on {interface} ({kind}, datalink {dlt}) for {bpf}",
                      interface=self.interface, kind=self.captureKind, dlt=datalink,
                      bpf=self.bpfFilter)
        self.startReading()

    def fileno(self):
        return self._capture.fileno() if self._capture is not None else -1

    def stopListening(self):
        """Stop reading and close every handle and socket; returns a Deferred."""
        if self.connected:
            self.stopReading()
            self.connectionLost(failure.Failure(error.ConnectionDone()))
        return defer.succeed(None)

    def connectionLost(self, reason):
        if reason is not None and not reason.check(error.ConnectionDone):
            self.log.failure("GRE capture on {interface} stopped", reason, interface=self.interface)
        abstract.FileDescriptor.connectionLost(self, reason)
        self.connected = 0
        for sock in self._senders.values():
            sock.close()
        self._senders.clear()
        if not self._reading:  # else doRead closes it once pcap's dispatch has returned
            self._closeCapture()

    def _closeCapture(self):
        if self._capture is not None:
            self._capture.close()
            self._capture = None

    def logPrefix(self):
        return f"GREPort({self.interface})"

    # -- receiving -----------------------------------------------------------------------------

    def doRead(self):
        """Handle packets until none are left or maxPacketsPerRead were handled."""
        self.stats.reads += 1
        budget = self.maxPacketsPerRead
        read, handle = self._capture.read, self._frameReceived
        self._reading = True  # a receiver may stop the port from inside greReceived
        try:
            while budget > 0 and self.connected:
                try:
                    n = read(budget, handle)
                except OSError as e:
                    return e  # the reactor stops reading and calls connectionLost
                if n <= 0:
                    break
                budget -= n
        finally:
            self._reading = False
            if not self.connected:
                self._closeCapture()

    def _frameReceived(self, timestamp, frame):
        """One captured frame: link header off, IPv4 checked, GRE up.  Never raises."""
        if not self.connected:
            return  # stopped from an earlier greReceived in this same dispatch
        stats = self.stats
        stats.received += 1
        offset, typeAt, typeEnd, ipv4Type = self._link
        if typeAt is not None and frame[typeAt:typeEnd] != ipv4Type:
            stats.dropped[DROP_NOT_IPV4] += 1
            return
        try:
            versionIHL, _, total, ident, fragment, _, protocol, _, src, dst = _IPV4.unpack_from(frame, offset)
        except struct.error:
            stats.dropped[DROP_TRUNCATED] += 1
            return
        headerLength = (versionIHL & 0x0F) * 4
        if versionIHL >> 4 != 4:
            stats.dropped[DROP_NOT_IPV4] += 1
            return
        if headerLength < _IPV4_MIN or total < headerLength:
            stats.dropped[DROP_BAD_HEADER] += 1
            return
        if protocol != IPPROTO_GRE:
            stats.dropped[DROP_NOT_GRE] += 1
            return
        if fragment & _FRAGMENT_BITS:  # the one test the unfragmented fast path pays
            self._fragmentReceived(frame, offset, headerLength, total, ident, fragment, src, dst)
            return
        end = offset + total  # Ethernet pads short frames: the IP length says where GRE ends
        if end > len(frame) or total == headerLength:
            stats.dropped[DROP_TRUNCATED] += 1
            return
        dstName = self._local.get(dst)
        if dstName is None:
            stats.dropped[DROP_NOT_LOCAL] += 1
            return
        srcName = self._sources.get(src)
        if srcName is None:
            if len(self._sources) >= _SOURCE_CACHE_MAX:
                self._sources.clear()
            srcName = self._sources[src] = socket.inet_ntoa(src)
        try:
            self.receiver.greReceived(srcName, dstName, frame[offset + headerLength:end])
        except Exception:
            stats.dropped[DROP_RECEIVER_ERROR] += 1
            self.log.failure("greReceived raised; packet dropped")
            return
        stats.delivered += 1

    def _fragmentReceived(self, frame, offset, headerLength, total, ident, fragment, src, dst):
        """A GRE fragment: held until its datagram is whole, which then goes up like any GRE."""
        stats = self.stats
        end = offset + total
        if end > len(frame):
            stats.dropped[DROP_TRUNCATED] += 1
            return
        dstName = self._local.get(dst)
        if dstName is None:
            stats.dropped[DROP_NOT_LOCAL] += 1
            return
        stats.fragments += 1
        gre = self._reassembler.add((src, dst, ident, IPPROTO_GRE), (fragment & _FRAGMENT_OFFSET) * 8,
                                    fragment & _MORE_FRAGMENTS, frame[offset + headerLength:end],
                                    self._clock())
        if gre is None:
            return
        stats.reassembled += 1
        if not gre:
            stats.dropped[DROP_TRUNCATED] += 1
            return
        srcName = socket.inet_ntoa(src)
        try:
            self.receiver.greReceived(srcName, dstName, gre)
        except Exception:
            stats.dropped[DROP_RECEIVER_ERROR] += 1
            self.log.failure("greReceived raised; packet dropped")
            return
        stats.delivered += 1

    # -- sending -------------------------------------------------------------------------------

    def sendGRE(self, src, dst, gre):
        """Send *gre* (GRE header + payload) from local address *src* to *dst*.

        Returns True if the kernel took it, False if it was dropped (counted in
        stats.dropped: send_busy when buffers are full, send_error otherwise).  Never raises
        for network conditions and never queues.
        """
        sock = self._senders.get(src)
        if sock is None:
            self._sendFailed(src, dst, "not a local address of this port (addLocalAddress first)")
            return False
        try:
            sock.sendto(gre, (dst, 0))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS):
                self.stats.dropped[DROP_SEND_BUSY] += 1
            else:
                self._sendFailed(src, dst, e)
            return False
        self.stats.sent += 1
        return True

    def _openSender(self, src):
        """A raw GRE socket bound to *src*, opened now so it lives in the port's namespace."""
        sock = None
        try:
            sock = self._system.openRawSocket()
            attach_drop_all(sock)  # it would otherwise queue a copy of all GRE sent to src
            # DF clear, as pptpd and the kernel's pptp module send: GRE longer than the path
            # MTU (a client's 1500-byte PPP frame) is fragmented, never refused or lost.
            sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
            sock.setblocking(False)
            sock.bind((src, 0))
        except OSError as e:
            if sock is not None:
                sock.close()
            raise GREIOError(f"cannot send GRE from {src}: {e.strerror or e}") from None
        self._senders[src] = sock

    def _sendFailed(self, src, dst, error):
        self.stats.dropped[DROP_SEND_ERROR] += 1
        key = (src, getattr(error, "errno", None) or str(error))
        if key not in self._loggedErrors:  # once per source and error, not per packet
            self._loggedErrors.add(key)
            self.log.warn("GRE from {src} to {dst} dropped: {error}", src=src, dst=dst, error=error)

    # -- statistics ----------------------------------------------------------------------------

    def statistics(self):
        """Counters as a dict, with the capture's own kernel drops under dropped['capture']."""
        self._reassembler.expire(self._clock())
        result = self.stats.asDict()
        result["reassembling"] = len(self._reassembler)  # datagrams waiting for fragments
        if self._capture is not None:
            try:
                _, drop, ifdrop = self._capture.stats()
            except OSError:
                drop = ifdrop = 0
            if drop or ifdrop:
                result["dropped"][DROP_CAPTURE] = drop + ifdrop
        return result


# -- a memory fake for tests -------------------------------------------------------------------


class MemoryCapture:
    """A capture fed from a list in memory (fake: no kernel, no filter applied)."""

    def __init__(self, datalink=DLT_EN10MB, batch=32):
        self._datalink = datalink
        self.batch = batch  # frames one read() returns at most, like one pcap buffer
        self.frames = collections.deque()
        self.filters = []
        self.readCalls = 0
        self.kernelDrops = (0, 0)
        self.closed = False
        self.error = None  # an OSError to raise from the next read

    def fileno(self):
        return -1

    def datalink(self):
        return self._datalink

    def read(self, budget, callback):
        self.readCalls += 1
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        n = 0
        while self.frames and n < min(budget, self.batch):
            callback(0.0, self.frames.popleft())
            n += 1
        return n

    def setFilter(self, bpf):
        self.filters.append(bpf)

    def stats(self):
        return (self.readCalls, *self.kernelDrops)

    def close(self):
        self.closed = True


class MemoryRawSocket:
    """A raw socket that records what it is asked to do (fake: nothing reaches a network)."""

    def __init__(self, hostAddresses=None):
        self.hostAddresses = hostAddresses  # addresses bind() accepts (None: any IPv4 address)
        self.sent = []  # (data, address)
        self.bound = None
        self.options = []
        self.blocking = True
        self.closed = False
        self.errors = collections.deque()  # OSErrors to raise from the next sendto calls
        self.incoming = collections.deque()  # frames recv() returns (raw IPv4)

    def setsockopt(self, level, option, value):
        self.options.append((level, option, value))

    def setblocking(self, flag):
        self.blocking = flag

    def bind(self, address):
        if _packed(address[0]) is None or (self.hostAddresses is not None
                                            and address[0] not in self.hostAddresses):
            raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")
        self.bound = address

    def sendto(self, data, address):
        if self.errors:
            raise self.errors.popleft()
        self.sent.append((bytes(data), address))
        return len(data)

    def recv(self, size):
        if not self.incoming:
            raise BlockingIOError(errno.EAGAIN, "no data")
        return self.incoming.popleft()[:size]

    def fileno(self):
        return -1

    def close(self):
        self.closed = True


class MemoryGRESystem:
    """Hands out MemoryCapture/MemoryRawSocket objects and remembers them (fake OS)."""

    def __init__(self, datalink=DLT_EN10MB, hostAddresses=None):
        self.datalink = datalink
        self.hostAddresses = hostAddresses
        self.captures = []
        self.sockets = []

    def openCapture(self, interface, snaplen, bufferSize, bpf):
        capture = MemoryCapture(self.datalink)
        capture.interface = interface
        capture.filters.append(bpf)
        self.captures.append(capture)
        return capture

    def openRawSocket(self):
        sock = MemoryRawSocket(self.hostAddresses)
        self.sockets.append(sock)
        return sock
