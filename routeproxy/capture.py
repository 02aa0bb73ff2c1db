"""Capturing GRE from the operating system: pcap or a raw socket, behind one small interface.

PPTP's data channel is GRE, IP protocol 47: no ports, so no ordinary socket receives it.

* :class:`PcapCapture`: a pypcap handle with the BPF filter ``ip proto 47 and (dst host A or
  ...)`` and direction "in", non-blocking.  pcap sees IPv4 fragments before the kernel
  reassembles them (the port puts them back together).
* :class:`RawSocketCapture`: an unbound raw IPPROTO_GRE socket (the kernel reassembles; the
  port checks destinations itself).  docs/gre-io.md measures the two.
* :class:`NativeCapture` (``--gre-capture native``, the LRP): a libpcap handle opened in C
  (routeproxy.native), read by ``pump``: one C call per wake-up that frames the common
  packet for the mux and hands the rest back (routeproxy.flows, docs/fastpath.md step 3a).
* :class:`NativeRawCapture` (``--gre-capture native-raw``): the raw socket read in C
  (recvmmsg, rawcap.c) and pumped as NativeCapture is: the kernel's reassembled datagrams,
  each with its receive time, so a real client's fragmented packet is framed in C too.
* :class:`RealGRESystem` is the operating system as a :class:`~routeproxy.greport.GREPort`
  sees it (``IGRESystem``): it opens captures and raw sockets.  Tests inject the fakes of
  :mod:`routeproxy.testing` instead, as twisted.pair's tuntap does.

Datalink types and their link-header lengths are here too: the port strips them.
"""
import ctypes
import os
import socket
import struct

from zope.interface import Attribute, Interface, implementer

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

SO_MARK = getattr(socket, "SO_MARK", 36)
SO_GET_FILTER = SO_ATTACH_FILTER  # <asm-generic/socket.h>: the same number, read back

#: The mark (SO_MARK) of every raw socket a GREPort sends from, native link read included;
#: every capture's kernel filter drops packets that carry it (docs/gre-io.md, "Our own GRE is
#: never received").  Where the peer is this host (pptpd beside the RRP), what we send is
#: delivered locally, keeps its mark through `lo`, and would otherwise be captured back.
#: routeproxy/native/pump.c's RP_SELF_MARK is the same value.  Fixed: 0x2f, GRE's protocol
#: number; the host's policy routing and netfilter see it too.
SELF_MARK = 0x2f
_SKF_AD_MARK = (-0x1000 + 20) & 0xFFFFFFFF  # SKF_AD_OFF + SKF_AD_MARK: load the skb's mark
_INSN = struct.Struct("HBBI")
#: Put before every capture's program: A = mark; if it is SELF_MARK drop (ret #0); A = 0.
SELF_MARK_CHECK = b"".join(_INSN.pack(*insn) for insn in (
    (0x20, 0, 0, _SKF_AD_MARK),   # BPF_LD|BPF_W|BPF_ABS
    (0x15, 0, 1, SELF_MARK),      # BPF_JMP|BPF_JEQ|BPF_K
    (0x06, 0, 0, 0),              # BPF_RET|BPF_K: drop
    (0x00, 0, 0, 0),              # BPF_LD|BPF_IMM: A = 0, as the kernel starts a program
))
ACCEPT_ALL_FILTER = _INSN.pack(0x06, 0, 0, 262144)  # a capture with no program of its own
BPF_MAXINSNS = 4096


#: the capture kinds whose GRE the native pump reads (with the native link read beside them)
NATIVE_KINDS = ("native", "native-raw")


class GREIOError(Exception):
    """The port cannot be set up as asked (bad address, interface, filter or datalink)."""


class ICapture(Interface):
    """A source of captured frames that the reactor can watch."""

    def fileno():
        """The descriptor the reactor polls."""

    def datalink():
        """The DLT_* of the frames read() hands over."""

    def read(budget, callback):
        """Call ``callback(timestamp, frame)`` for up to *budget* frames; return how many."""

    drainsOnShortRead = Attribute(
        "True if read() returning fewer than *budget* frames means none are left (so the "
        "port need not ask again); False for a capture that hands over one buffer at a time.")

    def setFilter(bpf):
        """Capture only what the BPF expression *bpf* matches (GREIOError if it is bad)."""

    def stats():
        """(received, dropped, dropped by the interface), cumulative."""

    def close():
        """Release the handle."""


class IRawSocket(Interface):
    """The calls a port makes on a raw IPPROTO_GRE socket (a subset of ``socket.socket``)."""

    def setsockopt(level, option, value):
        pass

    def getsockopt(level, option):
        pass

    def setblocking(flag):
        pass

    def bind(address):
        pass

    def sendto(data, address):
        pass

    def recv(size):
        pass

    def fileno():
        pass

    def close():
        pass


class IGRESystem(Interface):
    """The operating system as a GRE port uses it."""

    def openCapture(interface, snaplen, bufferSize, bpf):
        """An :class:`ICapture` on *interface* (GREIOError if it cannot be opened)."""

    def openRawSocket():
        """An :class:`IRawSocket` (GREIOError without the privilege)."""

    def openHeaderSocket():
        """A send-only :class:`IRawSocket` whose sender writes the IPv4 header (OSError if it
        cannot be opened)."""


def greFilter(localAddresses, shardClause=None):
    """The BPF expression that captures GRE sent to any of *localAddresses* (and, for a
    shard, only what *shardClause* keeps: :meth:`routeproxy.shard.Shard.bpf_clause`)."""
    hosts = " or ".join(f"dst host {address}" for address in sorted(localAddresses))
    expression = f"ip proto {IPPROTO_GRE} and ({hosts})"
    return f"{expression} and {shardClause}" if shardClause else expression


def packedAddress(address):
    """*address* (a dotted quad) as 4 bytes, or None if it is not one."""
    try:
        return socket.inet_aton(address) if address.count(".") == 3 else None
    except (OSError, TypeError, AttributeError):
        return None


def attachDropAll(sock):
    """Make *sock* drop every packet the kernel would queue on it (SO_ATTACH_FILTER)."""
    attachFilter(sock, DROP_ALL_FILTER)


def attachFilter(sock, program):
    """Attach classic BPF *program* (struct sock_filter array, bytes) to *sock*."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HP", len(program) // _INSN.size, ctypes.addressof(buffer))  # struct sock_fprog; copied by the kernel
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def markSender(sock):
    """Mark *sock*'s packets as ours (SO_MARK SELF_MARK); None, or the OSError that refused
    it (Linux before 5.17 asks CAP_NET_ADMIN, later CAP_NET_RAW is enough)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, SELF_MARK)
    except OSError as e:
        return e
    return None


def withoutOwn(program):
    """*program* (classic BPF, bytes; empty: none) behind SELF_MARK_CHECK."""
    program = program or ACCEPT_ALL_FILTER
    if (len(SELF_MARK_CHECK) + len(program)) // _INSN.size > BPF_MAXINSNS:
        raise GREIOError(f"bad capture filter: {len(program) // _INSN.size} instructions, "
                         f"at most {BPF_MAXINSNS - len(SELF_MARK_CHECK) // _INSN.size}")
    return SELF_MARK_CHECK + program


_libc = None


def _getsockopt(fd, option, buffer, length):
    """libc's getsockopt (Python's own would size SO_GET_FILTER's buffer in bytes, the kernel
    counts instructions); *length* is a ctypes c_uint32, updated."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.getsockopt(fd, socket.SOL_SOCKET, option, buffer, ctypes.byref(length)) < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def rejectOwn(fd):
    """Put SELF_MARK_CHECK before the filter libpcap attached to its socket *fd*: read back
    what the kernel holds (libpcap rewrote a cooked handle's offsets) and attach it again
    behind the check.  libpcap's own copy stays without it: libpcap runs that copy in user
    space too (the frames the ring held when the filter changed), where a mark cannot be
    loaded and every frame would be dropped; pypcap takes only an expression anyway."""
    count = ctypes.c_uint32(0)
    try:
        _getsockopt(fd, SO_GET_FILTER, None, count)   # count: the program's instructions
        program = b""
        if count.value:
            buffer = ctypes.create_string_buffer(count.value * _INSN.size)
            _getsockopt(fd, SO_GET_FILTER, buffer, count)
            program = buffer.raw[:count.value * _INSN.size]
        with socket.socket(fileno=os.dup(fd)) as sock:  # the same socket, for setsockopt
            attachFilter(sock, withoutOwn(program))
    except OSError as e:
        raise GREIOError(f"cannot keep our own GRE out of the capture: {e}") from None



@implementer(ICapture)
class PcapCapture:
    """A non-blocking pypcap handle: ``read(budget, callback)`` -> packets handled (0: none left)."""

    # Linux's mmap ring: pcap_dispatch hands over every frame up to its count, and a call on
    # an empty ring still costs a poll().
    drainsOnShortRead = True

    def __init__(self, interface, snaplen, bufferSize, bpf):
        import pcap

        self._pcap = None
        try:
            self._pcap = pcap.pcap(
                name=interface, snaplen=snaplen, promisc=False, immediate=True,
                timeout_ms=1, buffer_size=bufferSize,
            )
            self._pcap.setfilter(bpf)
            rejectOwn(self._pcap.fileno())
            self._pcap.setnonblock(True)
        except (OSError, TypeError, ValueError, OverflowError, GREIOError) as e:
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
        rejectOwn(self._pcap.fileno())

    def stats(self):
        """(received, dropped, dropped by the interface), cumulative, from libpcap."""
        return self._pcap.stats()

    def close(self):
        self._pcap.close()


@implementer(ICapture)
class RawSocketCapture:
    """Receive from an unbound raw IPPROTO_GRE socket (datalink: raw IPv4, header included).

    The kernel hands it every GRE packet for any local address, reassembled; the port
    filters the destination itself.  It also keeps the kernel from answering ICMP.
    """

    drainsOnShortRead = True  # read() stops early only at EAGAIN

    def __init__(self, system, maxPacketSize, bufferSize):
        self._sock = system.openRawSocket()
        try:   # no program of its own (the port checks destinations), only our GRE kept out
            attachFilter(self._sock, withoutOwn(b""))
        except OSError as e:
            self._sock.close()
            raise GREIOError(f"cannot keep our own GRE out of the capture: {e}") from None
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


@implementer(ICapture)
class NativeCapture:
    """libpcap opened and read in C (routeproxy.native's rp_pcap_*), as PcapCapture opens it.

    ``pump(state, budget)`` reads up to *budget* frames through ``rp_pump_frame`` with the
    pump *state* (a :class:`routeproxy.flows.FlowTable`'s) and stops after the first frame
    it hands back: ``(frames read, (timestamp, frame) or None)``.  ``read`` (the Python path,
    for a port without a flow table) is not offered: the port always pumps this capture.
    """

    drainsOnShortRead = True

    def __init__(self, module, interface, snaplen, bufferSize, bpf):
        lib = module.lib
        self._open(module, lambda err: lib.rp_pcap_open(interface.encode(), snaplen, bufferSize,
                                                        bpf.encode(), err),
                   lib.rp_pcap_pump, f"on {interface!r} with {bpf!r}")

    def _open(self, module, opener, pump, where):
        """The C handle *opener(err)* gives (GREIOError naming *where* if none), pumped by
        *pump*; the buffers a hand-back comes back in."""
        self._ffi, self._lib = module.ffi, module.lib
        self._err = self._ffi.new("char[]", 256)
        handle = opener(self._err)
        if handle == self._ffi.NULL:
            raise GREIOError(f"cannot capture GRE {where}: {self._error()}")
        self._handle = handle
        self._back = self._ffi.new("const uint8_t **")
        self._backLength = self._ffi.new("size_t *")
        self._backTime = self._ffi.new("double *")
        self._pump = pump

    def _error(self):
        return self._ffi.string(self._err).decode("utf-8", "replace")

    def fileno(self):
        return self._lib.rp_pcap_fileno(self._handle)

    def datalink(self):
        return self._lib.rp_pcap_datalink(self._handle)

    def read(self, budget, callback):
        raise NotImplementedError("a native capture is pumped (GREPort with its flow table)")

    def pump(self, state, budget):
        n = self._pump(self._handle, state, budget, self._back, self._backLength,
                       self._backTime, self._err)
        if n < 0:
            raise OSError(self._error())
        back = self._back[0]
        if back == self._ffi.NULL:
            return n, None
        return n, (self._backTime[0], self._ffi.buffer(back, self._backLength[0])[:])

    def setFilter(self, bpf):
        if self._lib.rp_pcap_set_filter(self._handle, bpf.encode(), self._err) < 0:
            raise GREIOError(f"bad capture filter {bpf!r}: {self._error()}")

    def stats(self):
        counts = self._ffi.new("uint64_t[3]")
        if self._lib.rp_pcap_stats(self._handle, counts, counts + 1, counts + 2) < 0:
            raise OSError("pcap_stats failed")
        return (counts[0], counts[1], counts[2])

    def close(self):
        if self._handle is not None:
            self._lib.rp_pcap_close(self._handle)
            self._handle = None


@implementer(ICapture)
class NativeRawCapture(NativeCapture):
    """An unbound raw IPPROTO_GRE socket opened and read in C (rawcap.c): pumped as
    NativeCapture is (the same ``pump(state, budget)``, the same hand-backs), its packets
    the kernel's (fragments reassembled, nothing captured twice), with their receive times
    (the sojourn gate works) and the port's filter attached in the kernel (shards work)."""

    def __init__(self, module, snaplen, bufferSize, bpf):
        lib = module.lib
        self._open(module, lambda err: lib.rp_rawcap_open(snaplen, bufferSize, bpf.encode(), err),
                   lib.rp_rawcap_pump, f"on a raw socket with {bpf!r}")

    def fileno(self):
        return self._lib.rp_rawcap_fileno(self._handle)

    def datalink(self):
        return DLT_RAW

    def pending(self):
        """Packets read from the socket that the pump has not taken yet (after a hand-back)."""
        return self._lib.rp_rawcap_pending(self._handle)

    def reads(self):
        """recvmmsg calls made so far: each is a system call."""
        return self._lib.rp_rawcap_reads(self._handle)

    def setFilter(self, bpf):
        if self._lib.rp_rawcap_set_filter(self._handle, bpf.encode(), self._err) < 0:
            raise GREIOError(f"bad capture filter {bpf!r}: {self._error()}")

    def stats(self):
        counts = self._ffi.new("uint64_t[2]")
        self._lib.rp_rawcap_stats(self._handle, counts, counts + 1)
        return (counts[0], counts[1], 0)

    def close(self):
        if self._handle is not None:
            self._lib.rp_rawcap_close(self._handle)
            self._handle = None


@implementer(IGRESystem)
class RealGRESystem:
    """The parts of the operating system a GREPort uses."""

    def openCapture(self, interface, snaplen, bufferSize, bpf):
        return PcapCapture(interface, snaplen, bufferSize, bpf)

    def openNativeCapture(self, module, interface, snaplen, bufferSize, bpf):
        return NativeCapture(module, interface, snaplen, bufferSize, bpf)

    def openNativeRawCapture(self, module, snaplen, bufferSize, bpf):
        return NativeRawCapture(module, snaplen, bufferSize, bpf)

    def openRawSocket(self):
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_GRE)
        except PermissionError as e:
            raise GREIOError(f"raw GRE sockets need root or CAP_NET_RAW: {e}") from None

    def openHeaderSocket(self):
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
