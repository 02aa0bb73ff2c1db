"""The GRE port: captured GRE up to a receiver, GRE out from a chosen local address.

* **Receive**: a capture (:mod:`routeproxy.capture`) registered with the reactor as a
  FileDescriptor (modelled on ``twisted.pair.tuntap.TuntapPort``).  Each wake-up reads until
  nothing is left or ``maxPacketsPerRead`` packets were handled, strips the link-layer
  header, checks the IPv4 header and hands ``receiver.greReceived(src, dst, gre)`` upward.
* **Fragments**: real clients (pppd MTU 1500) send ~1550-byte GRE as two IPv4 fragments,
  which pcap sees before the kernel reassembles them.  GRE fragments for a local address go
  through a bounded ``ipfrag.Reassembler``; the whole datagram goes up like any other.
* **Send**: ``sendGRE(src, dst, gre)`` through one raw IPPROTO_GRE socket per local
  address, bound to it and opened at start: pptpd only accepts GRE from its control
  connection's peer address, so the source must be chosen, and a bound socket lets the
  kernel build the IP header (measured faster than IP_HDRINCL from Python).  A full socket
  buffer drops the packet and counts it; nothing is queued.  Each address's :class:`Sender`
  also holds a send-only IPPROTO_RAW socket, on which the native link read sends with the
  IPv4 header it writes itself (the kernel then does not sum every packet).  DF is clear
  (IP_PMTUDISC_DONT), as pptpd sends: GRE over the path MTU is fragmented, not refused.
* **The ICMP gotcha**: a host with no raw IPPROTO_GRE socket matching a GRE packet (and no
  kernel GRE module) answers it with ICMP protocol-unreachable; pcap does not count.  The
  bound send sockets are open for the port's whole life, so every local address has one.
  A raw socket also gets a copy of every GRE packet it matches and nobody reads them, so
  each carries a classic BPF program of one instruction, ``ret #0``, that drops the copy
  before it is queued.
* **Our own GRE**: each send socket carries ``SO_MARK`` ``capture.SELF_MARK`` and every
  capture's kernel filter drops packets with that mark, so GRE sent to a peer on this host
  (pptpd beside the RRP: the same addresses as its GRE to us) is never captured back.

Addresses are dotted-quad ``str`` both ways, as Twisted's ``getPeer().host`` gives them, so
the daemons compare them with no conversion (docs/gre-io.md has the numbers).

The operating system is injected (``system=``, an ``IGRESystem``), as in tuntap;
:mod:`routeproxy.testing` has the fakes.
"""
import collections
import errno
import os
import socket
import struct
import time

from twisted.internet import abstract, defer, error
from twisted.logger import Logger
from twisted.python import failure
from zope.interface import Interface, implementer

from routeproxy import ipfrag, sojourn, turn
from routeproxy.capture import (
    IP_MTU_DISCOVER, IP_PMTUDISC_DONT, IPPROTO_GRE, LINK_LAYERS, NATIVE_KINDS, GREIOError,
    RawSocketCapture, RealGRESystem, attachDropAll, greFilter, markSender, packedAddress,
)

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
DROP_FRAGMENT_NO_SESSION = "fragment_no_session"  # the receiver has no session for its sender
DROP_NOT_LOCAL = "not_local"  # destination is not one of our addresses
DROP_RECEIVER_ERROR = "receiver_error"  # greReceived raised
DROP_CAPTURE = "capture"  # dropped by the kernel/libpcap before we read (pcap stats)
DROP_SOJOURN = "sojourn"  # waited longer than maxSojourn while the queue stood (sojourn.py)
DROP_SEND_BUSY = "send_busy"  # socket buffer full (EAGAIN) or no buffers (ENOBUFS)
DROP_SEND_ERROR = "send_error"  # any other send failure (no route, netfilter EPERM, ...)


class IGREReceiver(Interface):
    """What a GREPort delivers to (the daemons' GRE demultiplexer)."""

    def greReceived(src, dst, gre):
        """GRE header + payload *gre* (bytes) arrived from *src* for local address *dst* (str).

        Called in the reactor thread, many times per wake-up: return quickly.  An exception
        is logged and counted (receiver_error); it does not stop the port.
        """

    def acceptsFragment(src, dst, head):
        """May a fragment from *src* to *dst* be held for reassembly?

        *head* is the first fragment's payload (the GRE header), or None for a later
        fragment.  Asked before anything is stored, so fragments from senders with no
        session cost one look-up each.
        """


class IGREPort(Interface):
    """What the relay sessions use of a GRE port."""

    def sendGRE(src, dst, gre):
        """Send *gre* from local address *src* to *dst*; False if it was dropped (counted)."""

    def addLocalAddress(address):
        """Also capture GRE sent to *address* and send from it (counted references)."""

    def removeLocalAddress(address):
        """Undo one addLocalAddress."""

    def snapshot():
        """The port's counters as plain data (docs/status.md)."""


class GREStats:
    """Counters of one port; ``dropped`` is by reason (the DROP_* names)."""

    def __init__(self):
        self.received = 0  # packets the capture handed us
        self.delivered = 0  # greReceived calls that returned
        self.sent = 0
        self.reads = 0  # doRead wake-ups
        self.fragments = 0  # fragments taken into reassembly (pcap sees them before the kernel)
        self.captureFailures = 0  # captures lost while running (interface gone, read error)
        self.reassembled = 0  # datagrams put back together from them (and delivered as one)
        self.duplicates = 0  # the same packet captured again at once (a bridge's second copy)
        self.dropped = collections.Counter()

    def asDict(self):
        return {
            "received": self.received, "delivered": self.delivered, "sent": self.sent,
            "reads": self.reads, "fragments": self.fragments, "reassembled": self.reassembled,
            "duplicates": self.duplicates, "dropped": dict(self.dropped),
        }


@implementer(IGREReceiver)
class ShardReceiver:
    """A shard's receiver: later fragments reach every shard (they carry no call ID), so
    they are taken without asking *receiver*; the shard's reassembler keeps only those whose
    first fragment it holds (``Reassembler(tails_open=False)``).  GRE goes straight through."""

    def __init__(self, receiver):
        self.greReceived = receiver.greReceived   # the bound method itself: no hop per packet
        self._acceptsFragment = receiver.acceptsFragment

    def acceptsFragment(self, src, dst, head):
        return head is None or self._acceptsFragment(src, dst, head)


# -- the port ----------------------------------------------------------------------------------


@implementer(IGREPort)
class GREPort(abstract.FileDescriptor):
    """Captured GRE towards *localAddresses* up to ``receiver.greReceived``; GRE out via sendGRE.

    ``receiver.greReceived(src: str, dst: str, gre: bytes)`` gets the GRE header and
    payload (no IP header); src/dst are dotted quads and dst is one of localAddresses.

    * ``localAddresses``: where GRE is captured for, and the only sources sendGRE uses
      (a socket bound to each is opened at start, so a foreign address fails then).
    * ``interface``: the pcap device; "any" (default) covers every interface, "lo" too.
    * ``capture``: "pcap" (default) or "raw" (read an unbound raw GRE socket instead;
      ``interface`` is then unused: the socket sees every interface), or "native" (pcap
      opened and read in C, the common packet framed for the mux there: ``flows``, a
      :class:`routeproxy.flows.FlowTable` the relay maintains; GREIOError with
      ``native.load()``'s reason where the module is not built), or "native-raw" (the raw
      socket read in C and pumped as "native" is: the kernel's reassembled datagrams).
    * ``snaplen``: bytes kept per packet.  libpcap's ring has fixed slots of about
      snaplen bytes, so 65535 would fit only 128 packets in 8 MiB; 2048 holds a full
      1500-byte packet plus link header, and 8 MiB ~3,900 packets.  Longer packets are
      counted as "truncated".  ``bufferSize``: the capture ring (or socket buffer), bytes.
    * ``bpfFilter``: replaces the generated ``ip proto 47 and (dst host ...)`` expression.
    * ``reassemblyTimeout``/``maxReassemblies``: IPv4 fragments of GRE to a local address
      (pcap sees them before the kernel reassembles) are put back together, at most
      ``maxReassemblies`` datagrams at a time, each for at most ``reassemblyTimeout`` s.
    * ``maxSojourn``: the target of a CoDel-like gate (:mod:`routeproxy.sojourn`): once the
      capture ring's head has waited longer than this for ``sojournInterval`` s, packets
      older than it are dropped unread (counted as "sojourn") until the head is younger, so
      an overload leaves no standing queue while a short stall drops nothing.  0 turns it
      off.  The capture's own timestamp (the kernel's receive time) is the packet's age.
    * ``system``: the OS layer, RealGRESystem by default; MemoryGRESystem in tests.
    * ``shard``: a :class:`routeproxy.shard.Shard` of N > 1: capture only its call IDs'
      GRE, and take later fragments only for first fragments it holds (docs/multiworker.md).
    """

    log = Logger()
    maxPacketsPerRead = 128  # packets handled per reactor wake-up before yielding

    def __init__(self, receiver, localAddresses, interface="any", capture="pcap",
                 reactor=None, system=None, snaplen=2048, bufferSize=8 * 1024 * 1024,
                 bpfFilter=None, reassemblyTimeout=5.0, maxReassemblies=256, maxSojourn=0.005,
                 sojournInterval=sojourn.INTERVAL, wallClock=time.time, shard=None,
                 noCallShare=32):
        abstract.FileDescriptor.__init__(self, reactor)
        if capture not in ("pcap", "raw", *NATIVE_KINDS):
            raise GREIOError(f"capture must be 'pcap', 'raw', 'native' or 'native-raw', "
                             f"not {capture!r}")
        sharded = shard is not None and shard.sharded
        if sharded and capture == "raw":
            raise GREIOError("a shard captures with pcap: its filter picks the shard's call IDs")
        self.flows = None  # native: the pump's flow table (routeproxy.flows), the relay's too
        self._native = None
        if capture in NATIVE_KINDS:
            from routeproxy import native
            from routeproxy.flows import FlowTable
            self._native, reason = native.load()
            if self._native is None:
                raise GREIOError(reason)
            self.flows = FlowTable(self._native, self.maxPacketsPerRead * (snaplen + 32))
            self.flows.setNoCallShare(noCallShare)
        self.receiver = ShardReceiver(receiver) if sharded else receiver
        self._shardClause = shard.bpf_clause() if sharded else None
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
        if self.flows is not None:
            self.flows.stats = self.stats
            self.flows.setLocal(self._local)
        self._reassembler = ipfrag.Reassembler(reassemblyTimeout, maxReassemblies,
                                               dropped=self.stats.dropped, tails_open=not sharded)
        self._clock = getattr(self.reactor, "seconds", time.monotonic)
        self._turn = turn.of(self.reactor)  # the mux connections' flushes wait for our reads
        self.maxSojourn = maxSojourn
        if not maxSojourn:
            self._gate = None
        elif self.flows is not None:   # C reads the frames: C drops the old ones too
            self._gate = sojourn.NativeGate(self._native, maxSojourn, sojournInterval)
        else:
            self._gate = sojourn.SojournGate(maxSojourn, sojournInterval)
        self._wallClock = wallClock  # the capture's timestamps are wall-clock time
        self._dropBefore = 0.0  # captured before this: dropped (set per wake-up by the gate)
        self._head = 0.0  # capture time of the last packet read
        self._emptied = False  # this wake-up emptied the capture (the gate: no queue stands)
        self._lastCopy, self._lastFrame = None, b""  # the packet before, for duplicates
        self._sources = {}  # packed -> str cache for greReceived's src
        self._senders = {}  # local source address -> its Sender
        self.linkFlows = None  # the native link read's table (routeproxy.flows.LinkFlows)
        self.loop = None  # --data-plane loop: the reactor's poll in C (routeproxy.native.loop)
        self._capture = None
        self._loggedErrors = set()
        self._link = None
        self._reading = False
        self._readTime = None  # the clock as this wake-up's first fragment read it
        self._stopping = False

    # -- addresses -----------------------------------------------------------------------------

    def _addLocal(self, address):
        packed = packedAddress(address)
        if packed is None:
            raise GREIOError(f"not an IPv4 address: {address!r}")
        self._local[packed] = socket.inet_ntoa(packed)

    @property
    def localAddresses(self):
        return sorted(self._local.values(), key=socket.inet_aton)

    @property
    def bpfFilter(self):
        return self._customFilter or greFilter(self._local.values(), self._shardClause)

    def addLocalAddress(self, address):
        """Also capture GRE sent to *address* and send from it, until as many removes.

        For the RRP: call it with each pptpd connection's local address
        (``transport.getHost().host``) and removeLocalAddress when that connection ends;
        addresses are counted, so connections sharing one address do not disturb each other.
        """
        packed = packedAddress(address)
        if packed is None:
            raise GREIOError(f"not an IPv4 address: {address!r}")
        self._references[packed] += 1
        if packed in self._local:
            return
        self._addLocal(address)
        if self.flows is not None:
            self.flows.setLocal(self._local)
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
        packed = packedAddress(address)
        if packed not in self._local or packed in self._permanent:
            return
        self._references[packed] -= 1
        if self._references[packed] > 0:
            return
        del self._references[packed]
        name = self._local.pop(packed)
        if self.flows is not None:
            self.flows.setLocal(self._local)
        if self._capture is not None:
            self._capture.setFilter(self.bpfFilter)
        sender = self._senders.pop(name, None)
        if sender is not None:
            if self.linkFlows is not None:
                self.linkFlows.senderClosing(name)
            sender.close()

    # -- life cycle ----------------------------------------------------------------------------

    def startListening(self):
        """Open the capture and one bound send socket per local address, start reading."""
        capture = None
        try:
            if self.captureKind == "pcap":
                capture = self._system.openCapture(self.interface, self.snaplen, self.bufferSize,
                                                   self.bpfFilter)
            elif self.captureKind == "native":
                capture = self._system.openNativeCapture(self._native, self.interface,
                                                         self.snaplen, self.bufferSize,
                                                         self.bpfFilter)
            elif self.captureKind == "native-raw":
                capture = self._system.openNativeRawCapture(self._native, self.snaplen,
                                                            self.bufferSize, self.bpfFilter)
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
        if self.flows is not None:
            self.flows.setLink(LINK_LAYERS[datalink])
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
            self._stopping = True
            self.stopReading()
            self.connectionLost(failure.Failure(error.ConnectionDone()))
        return defer.succeed(None)

    def connectionLost(self, reason):
        if not self._stopping:   # not stopListening: the capture failed under us
            self.stats.captureFailures += 1
            why = (reason.getErrorMessage() if reason is not None and not reason.check(error.ConnectionDone)
                   else "the capture socket reported an error (interface deleted or down)")
            self.log.error("GRE capture on {interface} failed: {error}; no GRE is received until "
                           "the daemon restarts (routeproxy_capture_up is 0)",
                           interface=self.interface, error=why)
        abstract.FileDescriptor.connectionLost(self, reason)
        self.connected = 0
        for name, sender in self._senders.items():
            if self.linkFlows is not None:
                self.linkFlows.senderClosing(name)
            sender.close()
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
        return self._wakeUp(self.maxPacketsPerRead, None)

    def resumeRead(self, now, head, budget, back, carried, error):
        """The rest of a wake-up the loop began in C (routeproxy.native.loop) and stopped at
        *back* (a frame handed back, or None) or *error* (the capture's): *carried* restores,
        inside the turn, what the mux was left with; then as _pump goes on after that pump
        call, with *budget* left.  *now* and *head*: the wake-up's clock and head so far."""
        return self._wakeUp(budget, (now, head, back, carried, error))

    def _wakeUp(self, budget, resumed):
        """doRead's body, from its start or (*resumed*) from where the loop's C stopped."""
        gate = self._gate
        if gate is not None:
            now = self._wallClock() if resumed is None else resumed[0]
            self._dropBefore = gate.drop_before(now)
            self._head = 0.0 if resumed is None else resumed[1]
        self._emptied = False
        read, handle = self._capture.read, self._frameReceived
        drained = self._capture.drainsOnShortRead
        self._reading = True  # a receiver may stop the port from inside greReceived
        self._turn.begin()  # the mux writes this wake-up's frames as it ends, not a turn later
        try:
            if resumed is not None:
                _, _, back, carried, error = resumed
                carried()
                if error is not None:
                    return error
                if back is not None:
                    self._handBack(back)
                return self._pump(budget)
            if self.flows is not None:
                return self._pump(budget)
            while budget > 0 and self.connected:
                try:
                    n = read(budget, handle)
                except OSError as e:
                    return e  # the reactor stops reading and calls connectionLost
                if n <= 0 or (n < budget and drained):
                    self._emptied = True
                    break  # empty: asking again would cost a call (and pcap a poll())
                budget -= n
        finally:
            self._reading = False
            self._readTime = None
            if gate is not None:   # an emptied capture stands no more (CoDel): young
                gate.observe(now, now if self._emptied and self._head else self._head)
            if not self.connected:
                self._closeCapture()
            try:
                self._turn.end()
            except Exception:
                self.log.failure("a flush held for the end of a read raised")

    def _pump(self, budget):
        """doRead with the native capture: one C call takes the wake-up's common packets
        (routeproxy.flows); each frame it hands back goes through _frameReceived, in order,
        and the pump goes on after it (one of a mux link not begun for the call goes through
        C again first, in a call of its own: FlowTable.retry)."""
        flows, pump = self.flows, self._capture.pump
        state, gate = flows.state, self._cGate()
        while budget > 0 and self.connected:
            flows.begin(self._dropBefore, gate)
            try:
                n, back = pump(state, budget)
            except OSError as e:
                return e  # the reactor stops reading and calls connectionLost
            finally:
                head = flows.end()  # the frames C built go out before a handed-back one
                if gate is not None:
                    self._dropBefore = flows.dropBefore()   # C's gate moved it as it dropped
            if head is not None:
                self._head = head
            if back is not None:
                self._handBack(back)
            elif n < budget:
                self._emptied = True
                break
            budget -= n

    def _handBack(self, back):
        """A frame the pump handed back: through C again if its link was idle and is begun
        now (FlowTable.retry), else the Python path's."""
        flows = self.flows
        if flows.linkBegun:  # its link was idle: begun now, C takes the frame after all
            back, head = flows.retry(self._dropBefore, back, self._cGate())
            if head is not None:
                self._head = head
        if back is not None:
            self._lastCopy = None  # C checked it against the last frame, and keeps it
            self._frameReceived(*back)

    def _cGate(self):
        """The gate's state in C (a sojourn.NativeGate's), which the pump drops with, or None:
        C hands each old frame back to _frameReceived."""
        return getattr(self._gate, "state", None)

    def _frameReceived(self, timestamp, frame):
        """One captured frame: link header off, IPv4 checked, GRE up.  Never raises."""
        if not self.connected:
            return  # stopped from an earlier greReceived in this same dispatch
        stats = self.stats
        stats.received += 1
        if timestamp:  # None from a raw socket: no age, no gate
            self._head = timestamp
            if timestamp < self._dropBefore:
                stats.dropped[DROP_SOJOURN] += 1
                self._dropBefore = self._gate.dropped()  # the next one is due later
                return
        offset, typeAt, typeEnd, ipv4Type = self._link
        if typeAt is not None and frame[typeAt:typeEnd] != ipv4Type:
            stats.dropped[DROP_NOT_IPV4] += 1
            return
        try:
            versionIHL, _, total, ident, fragment, _, protocol, checksum, src, dst = _IPV4.unpack_from(frame, offset)
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
        end = offset + total  # Ethernet pads short frames: the IP length says where GRE ends
        if end > len(frame):
            stats.dropped[DROP_TRUNCATED] += 1
            return
        # pcap on "any" sees a packet that crosses a bridge twice, on the port and then on the
        # bridge, one right after the other: the second copy is not sent on (it would double
        # the link's traffic).  Header fields first; the bytes only when they match.
        copy = (ident, checksum, src, total)
        if copy == self._lastCopy and frame[offset:end] == self._lastFrame[offset:end]:
            stats.duplicates += 1  # (the link header's length is the port's: one offset)
            return
        self._lastCopy, self._lastFrame = copy, frame
        dstName = self._local.get(dst)
        if dstName is None:
            stats.dropped[DROP_NOT_LOCAL] += 1
            return
        srcName = self._sources.get(src) or self._sourceName(src)
        if fragment & _FRAGMENT_BITS:  # the one test the unfragmented fast path pays
            self._fragmentReceived(frame[offset + headerLength:end], ident, fragment, src, dst,
                                   srcName, dstName)
            return
        if total == headerLength:
            stats.dropped[DROP_TRUNCATED] += 1
            return
        self._deliver(srcName, dstName, frame[offset + headerLength:end])

    def _sourceName(self, src):
        """*src* (4 bytes) as a dotted quad, remembered in a bounded cache."""
        if len(self._sources) >= _SOURCE_CACHE_MAX:
            self._sources.clear()
        name = self._sources[src] = socket.inet_ntoa(src)
        return name

    def _deliver(self, srcName, dstName, gre):
        """Hand *gre* up; a receiver that raises costs the packet, never the port."""
        try:
            self.receiver.greReceived(srcName, dstName, gre)
        except Exception:
            self.stats.dropped[DROP_RECEIVER_ERROR] += 1
            self.log.failure("greReceived raised; packet dropped")
            return
        self.stats.delivered += 1

    def _fragmentReceived(self, data, ident, fragment, src, dst, srcName, dstName):
        """A GRE fragment (*data*, its IP payload): held until its datagram is whole, which
        then goes up like any GRE."""
        stats = self.stats
        fragmentOffset = (fragment & _FRAGMENT_OFFSET) * 8
        head = data if fragmentOffset == 0 else None
        if not self.receiver.acceptsFragment(srcName, dstName, head):
            stats.dropped[DROP_FRAGMENT_NO_SESSION] += 1   # checked before anything is stored
            return
        stats.fragments += 1
        now = self._readTime  # one clock read per wake-up: a fragment's timeout is seconds
        if now is None:
            now = self._clock()
            if self._reading:
                self._readTime = now
        gre = self._reassembler.add((src, dst, ident, IPPROTO_GRE), fragmentOffset,
                                    fragment & _MORE_FRAGMENTS, data, now, source=src)
        if gre is None:
            return
        stats.reassembled += 1
        if not gre:
            stats.dropped[DROP_TRUNCATED] += 1
            return
        self._deliver(srcName, dstName, gre)

    # -- sending -------------------------------------------------------------------------------

    def sendGRE(self, src, dst, gre):
        """Send *gre* (GRE header + payload) from local address *src* to *dst*.

        Returns True if the kernel took it, False if it was dropped (counted in
        stats.dropped: send_busy when buffers are full, send_error otherwise).  Never raises
        for network conditions and never queues.
        """
        sender = self._senders.get(src)
        if sender is None:
            self._sendFailed(src, dst, "not a local address of this port (addLocalAddress first)")
            return False
        try:
            sender.socket.sendto(gre, (dst, 0))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS):
                self.stats.dropped[DROP_SEND_BUSY] += 1
            else:
                self._sendFailed(src, dst, e)
            return False
        self.stats.sent += 1
        return True

    def senderFileno(self, src):
        """The raw socket sendGRE uses for *src* (its descriptor), or None."""
        sender = self._senders.get(src)
        return None if sender is None else sender.socket.fileno()

    def headerSender(self, src):
        """For GRE sent elsewhere from *src* (the native link read): ``(descriptor, TTL)`` of
        the socket to which the sender writes the IPv4 header itself, or ``(-1, 0)``."""
        sender = self._senders.get(src)
        if sender is None or sender.headerSocket is None:
            return -1, 0
        return sender.headerSocket.fileno(), sender.ttl

    def countSent(self, src, dst, sent, busy, errors, lastErrno):
        """What sendGRE would have counted for GRE sent elsewhere (the native link read)
        on senderFileno(src): *sent* taken, *busy* and *errors* dropped."""
        stats = self.stats
        stats.sent += sent
        if busy:
            stats.dropped[DROP_SEND_BUSY] += busy
        if errors:
            stats.dropped[DROP_SEND_ERROR] += errors - 1
            self._sendFailed(src, dst, OSError(lastErrno, os.strerror(lastErrno)))

    def _openSender(self, src):
        """The Sender of *src*, opened now so its sockets live in the port's namespace."""
        sock = None
        try:
            sock = self._system.openRawSocket()
            attachDropAll(sock)  # it would otherwise queue a copy of all GRE sent to src
            # DF clear, as pptpd and the kernel's pptp module send: GRE longer than the path
            # MTU (a client's 1500-byte PPP frame) is fragmented, never refused or lost.
            sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
            refused = markSender(sock)  # SELF_MARK: our captures never take what we send
            if refused is not None and "mark" not in self._loggedErrors:
                self._loggedErrors.add("mark")
                self.log.warn("GRE from {src} is not marked as ours ({error}): where a peer "
                              "is on this host (pptpd beside the RRP) the capture takes what "
                              "we send to it back, counted as dropped (docs/gre-io.md); "
                              "Linux before 5.17 asks CAP_NET_ADMIN for SO_MARK",
                              src=src, error=refused)
            sock.setblocking(False)
            sock.bind((src, 0))
        except OSError as e:
            if sock is not None:
                sock.close()
            raise GREIOError(f"cannot send GRE from {src}: {e.strerror or e}") from None
        self._senders[src] = Sender(sock, self._openHeaderSocket(src))

    def _openHeaderSocket(self, src):
        """A send-only raw socket bound to *src* whose sender writes the IPv4 header (for the
        native link read), or None: then that read sends on the other socket, as sendGRE."""
        sock = None
        try:
            sock = self._system.openHeaderSocket()
            markSender(sock)  # refused: logged for the other socket, the same address
            sock.setblocking(False)
            sock.bind((src, 0))
            return sock
        except OSError as e:
            if sock is not None:
                sock.close()
            if "header" not in self._loggedErrors:
                self._loggedErrors.add("header")
                self.log.warn("GRE from {src} is sent with the kernel's IPv4 header ({error}): "
                              "the native link read sums every packet it sends",
                              src=src, error=e)
            return None

    def _sendFailed(self, src, dst, error):
        self.stats.dropped[DROP_SEND_ERROR] += 1
        key = (src, getattr(error, "errno", None) or str(error))
        if key not in self._loggedErrors:  # once per source and error, not per packet
            self._loggedErrors.add(key)
            self.log.warn("GRE from {src} to {dst} dropped: {error}", src=src, dst=dst, error=error)

    # -- statistics ----------------------------------------------------------------------------

    def snapshot(self):
        """Counters as a dict, with the capture's own kernel drops under dropped['capture']."""
        self._reassembler.expire(self._clock())
        result = self.stats.asDict()
        result["reassembling"] = len(self._reassembler)  # datagrams waiting for fragments
        result["capture_up"] = bool(self.connected)
        result["capture_failures"] = self.stats.captureFailures
        result["fragments_duplicate"] = self._reassembler.duplicates  # a bridge's second copy
        if self._shardClause:
            result["fragments_other_shard"] = self._reassembler.foreign
        if self.flows is not None:  # --gre-capture native: what C took (docs/gre-io.md)
            result["native"] = self.flows.snapshot()
        if self.linkFlows is not None:  # --gre-capture native: what C sent
            result["native_link"] = self.linkFlows.snapshot()
        if self.loop is not None:  # --data-plane loop: how often C returned, and why
            result["loop"] = self.loop.snapshot()
        if self._capture is not None:
            try:
                _, drop, ifdrop = self._capture.stats()
            except OSError:
                drop = ifdrop = 0
            if drop or ifdrop:
                result["dropped"][DROP_CAPTURE] = drop + ifdrop
        return result


class Sender:
    """The sockets that send GRE from one local address, both bound to it and marked.

    ``socket`` (raw IPPROTO_GRE): the kernel writes the IPv4 header, and fragments what is
    longer than the path (sendGRE, and what the other refuses).  ``headerSocket`` (raw
    IPPROTO_RAW, send only), or None: the native link read writes the header itself
    (docs/gre-io.md "Batched sends"), so the kernel copies the packet without summing it,
    which the other socket does for every packet."""

    def __init__(self, sock, headerSocket):
        self.socket, self.headerSocket = sock, headerSocket
        self.ttl = sock.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)  # the kernel's default

    def close(self):
        self.socket.close()
        if self.headerSocket is not None:
            self.headerSocket.close()
