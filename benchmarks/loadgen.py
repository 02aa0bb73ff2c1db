"""GRE load generator and sink: the measuring instruments of the benchmark.

Both ends run as separate processes (one per namespace, so they do not share a GIL with
each other or with the system under test) and speak JSON on stdout::

    python -m benchmarks.loadgen send --dst 10.0.0.2 --size 1400 --rate 100000 --duration 2 --keys 7 --run 5
    python -m benchmarks.loadgen sink --run 5 [--latency]  # drains, prints "ready", JSON on SIGUSR1/SIGTERM

Why these choices (measured, see docs/benchmarks.md):

* The sender keeps a batch of fully built packets in one ctypes buffer and hands them to the
  kernel with ``sendmmsg(2)`` on a raw ``IPPROTO_GRE`` socket: one system call per batch
  instead of one per packet (about 3x a ``sendto`` loop).  Per packet only one
  ``struct.pack_into`` writes the call ID, GRE sequence number and the probe.
* Across a veth the sender can go one step lower (``Link``): whole Ethernet frames on an
  ``AF_PACKET`` socket with the qdisc bypassed, which skips the sender's IP output path.
* The sink reads with ``recvmmsg(2)`` and takes each packet's arrival time from the kernel
  (``SO_TIMESTAMPNS``), so its own scheduling delay is not counted as network latency.
* The probe in each GRE payload (after the GRE header) is ``magic, run, flow, seq, stamp``:
  *run* is the trial's own number (``--run``), so the sink counts only this trial's packets
  and never the backlog of an earlier, overloaded one (counted apart as ``stale``); *stamp*
  is the sender's wall-clock time (``CLOCK_REALTIME``, the same clock ``SO_TIMESTAMPNS``
  uses; network namespaces share it), so the sink measures one-way latency and counts per flow.
* The sink first drains: it reads and discards until the path has been quiet for
  ``--quiet`` seconds, and only then says "ready"; asked to stop, it reads on until the path
  has been quiet again, so a trial's own late packets are counted in it.

Packet size means the IPv4 datagram (20-byte IP header + 12-byte GRE header + payload), what
a PPTP client puts on the wire; Mbit/s counts those bytes.

``benchmarks/loadgen.c`` is the same sender and sink in C (same options, probe and output),
what the benchmarks run by default: this module does its per-packet work in the interpreter,
on the CPUs the system under test needs (benchmarks/instrument.py chooses and builds).  This
one stays the reference (tests/unit/test_loadgen_engines.py runs each against the other) and
the fallback without a compiler.
"""
import argparse
import array
import ctypes
import ctypes.util
import errno
import json
import math
import os
import signal
import socket
import struct
import sys
import time

IPPROTO_GRE = 47
IP_HEADER = 20
GRE_HEADER = 12                  # K+S: flags, protocol, payload length, call ID, sequence
PROBE = struct.Struct("!4sIIQQ")  # magic, run, flow, sequence, send time (ns, CLOCK_REALTIME)
MAGIC = b"RPb1"
MIN_SIZE = IP_HEADER + GRE_HEADER + PROBE.size   # 60
# Above the 1500-byte MTU the sender's kernel sends two fragments, as a client at PPP MTU 1500
# does (the sink's raw socket gets the datagram reassembled, in its 2048-byte slots).
MAX_SIZE = 2000
LINK_MTU = 1500
# Rewritten per packet, from offset 6 of the GRE header: call ID, GRE sequence, then the probe.
_PER_PACKET = struct.Struct("!HI4sIIQQ")
_GRE_FIXED = struct.Struct("!HHH")               # flags+version 0x3001, 0x880B, payload length

SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
MSG_WAITFORONE = 0x10000
PR_SET_TIMERSLACK = 29
PR_SET_NAME = 15

__all__ = ["LoadgenError", "build_packet", "probe_of", "Link", "Sender", "Sink", "percentiles", "main"]


class LoadgenError(Exception):
    """The generator or sink cannot run as asked (bad size, no raw socket, bad arguments)."""


# --- the system calls --------------------------------------------------------------------

class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_IoVec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_sendmmsg.restype = ctypes.c_int
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
_recvmmsg.restype = ctypes.c_int


def _address(buffer):
    """The address of a bytearray's storage (it must never be resized afterwards)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def _quiet_timers():
    """Ask for 1 us timer slack so short sleeps between batches are not stretched to 50 us."""
    try:
        _libc.prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)
    except (AttributeError, OSError):  # pragma: no cover - prctl is always there on Linux
        pass


class Link:
    """Send whole Ethernet frames on *ifname* (AF_PACKET, qdisc bypassed) instead of raw IP.

    The kernel's IP output path (route lookup, header, neighbour) is then skipped; measured
    about 40 % more packets per second than the raw IP socket on a veth.  The frames carry
    *src_ip*, and go to *dst_mac* (the next hop: the peer veth end).
    """

    def __init__(self, ifname, src_ip, src_mac, dst_mac):
        self.ifname, self.src_ip = ifname, src_ip
        self.src_mac, self.dst_mac = _mac(src_mac), _mac(dst_mac)

    def headers(self, dst, gre_length):
        """Ethernet + IPv4 header (checksum included) for a GRE packet of *gre_length* bytes."""
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, IP_HEADER + gre_length, 0, 0x4000, 64,
                                   IPPROTO_GRE, 0, socket.inet_aton(self.src_ip), socket.inet_aton(dst)))
        total = sum(struct.unpack("!10H", ip))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        struct.pack_into("!H", ip, 10, ~total & 0xFFFF)
        return self.dst_mac + self.src_mac + b"\x08\x00" + bytes(ip)

    def argv(self):
        return ["--ifname", self.ifname, "--src", self.src_ip,
                "--src-mac", self.src_mac.hex(":"), "--dst-mac", self.dst_mac.hex(":")]


def _mac(text):
    try:
        value = bytes.fromhex(text.replace(":", ""))
    except ValueError:
        value = b""
    if len(value) != 6:
        raise LoadgenError(f"not a MAC address: {text!r}")
    return value


def _packet_socket(ifname):
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        sock.bind((ifname, 0))
    except PermissionError as e:
        raise LoadgenError(f"an AF_PACKET socket needs root/CAP_NET_RAW: {e}") from None
    except OSError as e:
        raise LoadgenError(f"cannot send on {ifname}: {e}") from None
    sock.setsockopt(263, 20, 1)  # SOL_PACKET, PACKET_QDISC_BYPASS
    return sock


def _raw_gre_socket():
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_GRE)
    except PermissionError as e:
        raise LoadgenError(f"a raw GRE socket needs root/CAP_NET_RAW: {e}") from None


# --- packets -----------------------------------------------------------------------------

def _check_size(size):
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise LoadgenError(f"packet size {size} outside {MIN_SIZE}..{MAX_SIZE} (IPv4 bytes)")


def build_packet(size, call_id, seq, flow=0, stamp=0, run=0):
    """One GRE packet (no IP header) that makes a *size*-byte IPv4 datagram, probe included."""
    _check_size(size)
    payload_length = size - IP_HEADER - GRE_HEADER
    buf = bytearray(size - IP_HEADER)
    _GRE_FIXED.pack_into(buf, 0, 0x3001, 0x880B, payload_length)
    _PER_PACKET.pack_into(buf, 6, call_id, seq & 0xFFFFFFFF, MAGIC, run, flow, seq, stamp)
    return bytes(buf)


def new_run_id():
    """A trial's own probe number: random, so no earlier trial (or run) shares it."""
    return int.from_bytes(os.urandom(4), "big") or 1


def probe_of(gre, run=None):
    """``(flow, seq, stamp)`` from a GRE packet (header with or without ack), or None.

    With *run*, a probe of another run is None too.
    """
    if len(gre) < 8:
        return None
    flags = gre[1]
    start = 8 + (4 if gre[0] & 0x10 else 0) + (4 if flags & 0x80 else 0)
    if len(gre) < start + PROBE.size:
        return None
    magic, probe_run, flow, seq, stamp = PROBE.unpack_from(gre, start)
    if magic != MAGIC or (run is not None and probe_run != run):
        return None
    return (flow, seq, stamp)


class Sender:
    """Sends sized GRE packets to *dst* at *rate* packets/s (0 = as fast as possible).

    *keys* are the GRE call IDs to cycle through (one per session); the flow number in the
    probe is ``flow_base + index`` of the key.  ``run(duration)`` returns a dict of what was
    offered.  Packets are built once; only their variable fields are rewritten.
    """

    def __init__(self, dst, size, keys=(0,), rate=0, batch=64, flow_base=0, link=None, run=0):
        _check_size(size)
        if not keys:
            raise LoadgenError("at least one call ID is needed")
        if batch < 1 or batch > 1024:
            raise LoadgenError(f"batch {batch} outside 1..1024")
        self.dst, self.size, self.rate, self.batch = dst, size, float(rate), batch
        self.keys = [int(k) for k in keys]
        self.flow_base = flow_base
        self.link = link
        self.run_id = run
        gre = build_packet(size, self.keys[0], 0)
        if size > LINK_MTU:
            link = self.link = None   # a frame cannot be fragmented: the kernel's IP output can
        if link is None:
            self.sock = _raw_gre_socket()
            prefix = b""
            name = (struct.pack("=H", socket.AF_INET) + struct.pack("!H", 0)
                    + socket.inet_aton(dst) + bytes(8))
        else:
            self.sock = _packet_socket(link.ifname)
            prefix = link.headers(dst, len(gre))
            name = None
        self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 << 20)
        self.slot = len(prefix) + len(gre)
        self.offset = len(prefix) + 6  # where the per-packet fields start in a slot
        self._buffer = bytearray((prefix + gre) * batch)
        self._name = ctypes.create_string_buffer(name, 16) if name else None
        self._iov = (_IoVec * batch)()
        self._msgs = (_MMsgHdr * batch)()
        base = _address(self._buffer)
        for i in range(batch):
            self._iov[i].iov_base = base + i * self.slot
            self._iov[i].iov_len = self.slot
            hdr = self._msgs[i].msg_hdr
            if self._name is not None:
                hdr.msg_name = ctypes.addressof(self._name)
                hdr.msg_namelen = 16
            hdr.msg_iov = ctypes.pointer(self._iov[i])
            hdr.msg_iovlen = 1

    def run(self, duration):
        """Send for *duration* seconds; returns {sent, errors, seconds, pps, mbps, ...}."""
        _quiet_timers()
        fd = self.sock.fileno()
        buf, slot, keys, nkeys, flow_base = self._buffer, self.slot, self.keys, len(self.keys), self.flow_base
        offset, run_id = self.offset, self.run_id
        pack = _PER_PACKET.pack_into
        msgs, batch, rate = self._msgs, self.batch, self.rate
        clock, wall, sleep = time.monotonic_ns, time.time_ns, time.sleep
        sent = errors = seq = calls = 0
        start = clock()
        end = start + int(duration * 1e9)
        while True:
            now = clock()
            if now >= end:
                break
            if rate:
                due = int((now - start) * rate / 1e9) + 1 - sent
                if due <= 0:
                    # Sleep until the next packet is due (the timer slack is 1 us).
                    wait = (sent / rate) - (now - start) / 1e9
                    if wait > 0:
                        sleep(wait)
                    continue
                n = due if due < batch else batch
            else:
                n = batch
            stamp = wall()
            for i in range(n):
                k = seq + i
                index = k % nkeys
                pack(buf, i * slot + offset, keys[index], k & 0xFFFFFFFF, MAGIC, run_id, flow_base + index, k, stamp)
            done = _sendmmsg(fd, msgs, n, 0)
            calls += 1
            if done < 0:
                err = ctypes.get_errno()
                if err in (errno.ENOBUFS, errno.EAGAIN, errno.EINTR):
                    errors += 1
                    continue
                raise LoadgenError(f"sendmmsg to {self.dst}: {os.strerror(err)}")
            sent += done
            seq += done
        seconds = (clock() - start) / 1e9
        return {"sent": sent, "errors": errors, "seconds": seconds, "calls": calls,
                "pps": sent / seconds if seconds else 0.0,
                "mbps": sent * self.size * 8 / seconds / 1e6 if seconds else 0.0,
                "size": self.size, "target_pps": rate, "flows": nkeys}

    def run_sendto(self, duration):
        """The naive loop (one ``sendto`` per packet), kept to show what batching buys."""
        if self.link is not None:
            raise LoadgenError("the sendto loop is for the raw IP socket only")
        payloads = [build_packet(self.size, self.keys[i % len(self.keys)], i, run=self.run_id)
                    for i in range(self.batch)]
        send, dst = self.sock.sendto, (self.dst, 0)
        clock = time.monotonic_ns
        sent = 0
        start = clock()
        end = start + int(duration * 1e9)
        while clock() < end:
            for p in payloads:
                send(p, dst)
            sent += len(payloads)
        seconds = (clock() - start) / 1e9
        return {"sent": sent, "errors": 0, "seconds": seconds, "pps": sent / seconds,
                "mbps": sent * self.size * 8 / seconds / 1e6, "size": self.size, "target_pps": 0}


def percentiles(samples, points=(50, 99, 99.9)):
    """{"p50": .., "p99": .., "p99.9": .., "min", "max", "mean", "count"} of *samples* (us)."""
    values = sorted(samples)
    if not values:
        return {"count": 0}
    result = {"count": len(values), "min": values[0], "max": values[-1],
              "mean": sum(values) / len(values)}
    for p in points:
        index = min(len(values) - 1, max(0, math.ceil(p * len(values) / 100.0 - 1e-9) - 1))  # nearest rank
        result[f"p{p:g}"] = values[index]
    return result


class Sink:
    """Counts this run's probe packets arriving on a raw GRE socket; optionally their latency.

    ``drain(quiet, limit)`` discards whatever the path still carries (an earlier trial's
    backlog) until nothing arrived for *quiet* seconds.  ``run(until, quiet)`` reads until
    the callable *until* returns true (checked after every batch and at least every 100 ms)
    and then until nothing arrived for *quiet* seconds, and returns a dict: received, bytes,
    per-flow counts, the highest sequence seen, latency percentiles in microseconds when
    *latency* is set.  Only probes of *run* count as received: probes of other runs are
    ``stale``, GRE without a probe ``other``.
    """

    SLOT = 2048
    CONTROL = 64

    def __init__(self, batch=256, latency=False, sock=None, run=0):
        self.batch, self.latency, self.run_id = batch, latency, run
        self.sock = sock or _raw_gre_socket()
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 50000))
        if latency:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self._buffer = bytearray(self.SLOT * batch)
        self._control = bytearray(self.CONTROL * batch)
        self._iov = (_IoVec * batch)()
        self._msgs = (_MMsgHdr * batch)()
        for i in range(batch):
            self._iov[i].iov_base = _address(self._buffer) + i * self.SLOT
            self._iov[i].iov_len = self.SLOT
            hdr = self._msgs[i].msg_hdr
            hdr.msg_iov = ctypes.pointer(self._iov[i])
            hdr.msg_iovlen = 1

        if latency:
            for i in range(batch):
                hdr = self._msgs[i].msg_hdr
                hdr.msg_control = _address(self._control) + i * self.CONTROL
                hdr.msg_controllen = self.CONTROL
        # recvmmsg overwrites msg_controllen; one memmove of this copy restores every header.
        self._pristine = bytes(self._msgs)

    def _receive(self):
        """One recvmmsg: the number of packets now in the buffer (0 after the 50 ms timeout)."""
        n = _recvmmsg(self.sock.fileno(), self._msgs, self.batch, MSG_WAITFORONE, None)
        if n < 0:
            err = ctypes.get_errno()
            if err not in (errno.EAGAIN, errno.EINTR):
                raise LoadgenError(f"recvmmsg: {os.strerror(err)}")
            return 0
        return n

    def drain(self, quiet, limit):
        """Discard packets until none came for *quiet* s (at most *limit* s): {drained, seconds}."""
        start = last = time.monotonic()
        drained = 0
        while True:
            n = self._receive()
            now = time.monotonic()
            if n:
                drained += n
                last = now
                if self.latency:
                    ctypes.memmove(self._msgs, self._pristine, n * ctypes.sizeof(_MMsgHdr))
            if now - last >= quiet or now - start >= limit:
                return {"drained": drained, "seconds": now - start, "quiet": now - last >= quiet}

    def run(self, until, quiet=0.0, limit=30.0):
        buf, slot, msgs = self._buffer, self.SLOT, self._msgs
        latency, run_id = self.latency, self.run_id
        unpack_probe, probe_size = PROBE.unpack_from, PROBE.size
        unpack_stamp = struct.Struct("qq").unpack_from
        control, cslot = self._control, self.CONTROL
        pristine, entry = self._pristine, ctypes.sizeof(_MMsgHdr)
        receive, monotonic = self._receive, time.monotonic
        counts = {}
        samples = array.array("q")
        received = other = stale = size_sum = highest = 0
        first = last = None
        stopping = None
        heard = monotonic()
        while True:
            if stopping is None and until():
                stopping = monotonic()
            if stopping is not None:
                now = monotonic()
                if now - heard >= quiet or now - stopping >= limit:
                    break
            n = receive()
            if not n:
                continue
            heard = monotonic()
            now = time.time_ns()
            if first is None:
                first = now
            last = now
            raw, craw = buf, control
            for i in range(n):
                off = i * slot
                ihl = (raw[off] & 0x0F) * 4
                g = off + ihl
                start = g + 8 + (4 if raw[g] & 0x10 else 0) + (4 if raw[g + 1] & 0x80 else 0)
                if start + probe_size > off + msgs[i].msg_len:
                    other += 1  # too short for a probe (what the slot holds after it is an older packet's)
                    continue
                magic, probe_run, flow, seq, stamp = unpack_probe(raw, start)
                if magic != MAGIC:
                    other += 1
                    continue
                if probe_run != run_id:
                    stale += 1
                    continue
                received += 1
                size_sum += (raw[off + 2] << 8) | raw[off + 3]
                counts[flow] = counts.get(flow, 0) + 1
                if seq > highest:
                    highest = seq
                if latency:
                    sec, nsec = unpack_stamp(craw, i * cslot + 16)
                    samples.append(sec * 1_000_000_000 + nsec - stamp)
            if latency:
                ctypes.memmove(msgs, pristine, n * entry)
        result = {"received": received, "other": other, "stale": stale, "bytes": size_sum,
                  "highest_seq": highest, "flows": len(counts),
                  "per_flow_min": min(counts.values()) if counts else 0,
                  "flow_min": min(counts) if counts else None, "flow_max": max(counts) if counts else None,
                  "tail_seconds": monotonic() - stopping if stopping is not None else 0.0,
                  "seconds": (last - first) / 1e9 if first is not None and last != first else 0.0}
        if latency:
            result["latency_us"] = percentiles([s / 1000.0 for s in samples])
        return result


# --- command line ------------------------------------------------------------------------

def _name(name):
    """Name this process (``comm``) so a profile tells the instruments from the daemons, which
    are "python" too; loadgen.c takes the same names."""
    try:
        _libc.prctl(PR_SET_NAME, name.encode(), 0, 0, 0)
    except (AttributeError, OSError):  # pragma: no cover - prctl is always there on Linux
        pass


def _sink_main(args):
    stop = {"now": False}

    def request_stop(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGUSR1, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    signal.siginterrupt(signal.SIGUSR1, True)
    sink = Sink(batch=args.batch, latency=args.latency, run=args.run)
    drained = sink.drain(args.quiet, args.drain_max)
    print("ready " + json.dumps(drained), flush=True)
    deadline = time.monotonic() + args.max_seconds
    result = sink.run(lambda: stop["now"] or time.monotonic() > deadline, args.quiet, args.drain_max)
    result["drain"] = drained
    print(json.dumps(result), flush=True)
    return 0


def _send_main(args):
    keys = [int(k) for k in args.keys.split(",")] if args.keys else [0]
    link = None
    if args.ifname:
        if not (args.src and args.src_mac and args.dst_mac):
            raise LoadgenError("--ifname needs --src, --src-mac and --dst-mac")
        link = Link(args.ifname, args.src, args.src_mac, args.dst_mac)
    sender = Sender(args.dst, args.size, keys=keys, rate=args.rate, batch=args.batch,
                    flow_base=args.flow_base, link=link, run=args.run)
    if args.mode == "sendto":
        result = sender.run_sendto(args.duration)
    else:
        result = sender.run(args.duration)
    print(json.dumps(result), flush=True)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    send = sub.add_parser("send", help="send GRE probes")
    send.add_argument("--dst", required=True)
    send.add_argument("--size", type=int, default=1400)
    send.add_argument("--rate", type=float, default=0, help="packets/s, 0 = flat out")
    send.add_argument("--duration", type=float, default=1.0)
    send.add_argument("--keys", default="0", help="comma-separated GRE call IDs, one per session")
    send.add_argument("--flow-base", type=int, default=0)
    send.add_argument("--run", type=int, default=0, help="this trial's number, carried in every probe")
    send.add_argument("--batch", type=int, default=64)
    send.add_argument("--mode", choices=("sendmmsg", "sendto"), default="sendmmsg")
    send.add_argument("--ifname", help="send Ethernet frames on this interface (AF_PACKET)")
    send.add_argument("--src", help="source IPv4 address of the frames (with --ifname)")
    send.add_argument("--src-mac")
    send.add_argument("--dst-mac", help="the next hop's MAC address (with --ifname)")
    sink = sub.add_parser("sink", help="count GRE probes until SIGUSR1/SIGTERM")
    sink.add_argument("--latency", action="store_true")
    sink.add_argument("--batch", type=int, default=256)
    sink.add_argument("--max-seconds", type=float, default=600)
    sink.add_argument("--run", type=int, default=0, help="count only probes of this trial")
    sink.add_argument("--quiet", type=float, default=0.2,
                      help="drain until nothing arrived for this long, before and after the trial (s)")
    sink.add_argument("--drain-max", type=float, default=10.0, help="give up draining after this long (s)")
    args = parser.parse_args(argv)
    _name(f"loadgen-{args.command}")
    try:
        return _send_main(args) if args.command == "send" else _sink_main(args)
    except LoadgenError as e:
        sys.stderr.write(f"loadgen: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
