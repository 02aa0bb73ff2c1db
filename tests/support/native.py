"""The C functions of routeproxy.native beside their Python twins, as comparable outcomes.

Shared by the differential tests (tests/unit/test_native_gre.py) and the fuzz harness
(tests/fuzz/harnesses.py), so both compare the same way.  The IPv4 checks' twin is
``GREPort._frameReceived`` itself, run with its stateful checks out of the way.
"""
import os
import socket
import struct

from twisted.internet.testing import MemoryReactor
from twisted.trial import unittest

from routeproxy import gre, native
from routeproxy.greport import GREPort
from routeproxy.testing import MemoryGRESystem, RecordingGREReceiver


def requireNative(needs):
    """Skip unless routeproxy.native is built and we are root (*needs*: what for); under
    CI=true a missing module fails instead, so CI cannot pass by skipping."""
    module, reason = native.load()
    if module is None:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"CI=true and {reason}")
        raise unittest.SkipTest(reason)
    if os.geteuid() != 0:
        raise unittest.SkipTest(f"needs root: {needs}")


def outcome(function, *args):
    """What a call did: its result, or the kind and reason of its refusal."""
    try:
        return ("ok", function(*args))
    except gre.GREError as e:
        return ("GREError", e.reason)
    except struct.error:
        return ("struct.error",)


class _EveryAddress:
    """A port's local addresses that hold every address: the native check has none."""

    def get(self, address):
        return socket.inet_ntoa(address)


class PortProbe:
    """``GREPort._frameReceived`` with its stateful checks (copies, local addresses, the
    sojourn gate) out of the way, watched."""

    def __init__(self, datalink):
        self.seen = []
        self.port = GREPort(RecordingGREReceiver(), ["10.0.0.2"], system=MemoryGRESystem(datalink),
                            reactor=MemoryReactor(), maxSojourn=0)
        self.port.startListening()
        self.port._local = _EveryAddress()
        self.port._deliver = lambda srcName, dstName, data: self.seen.append(
            ("gre", bytes(data), srcName, dstName))
        self.port._fragmentReceived = lambda data, ident, fragment, src, dst, *names: self.seen.append(
            ("fragment", bytes(data), ident, fragment, src, dst))

    def outcome(self, data):
        """What the port did with one frame: ("drop", reason) or what it handed on, with the
        fields its duplicate check keeps."""
        self.seen, port = [], self.port
        port._lastCopy = port._lastFrame = None
        port.stats.dropped.clear()
        port._frameReceived(None, data)
        if port.stats.dropped:
            [reason] = port.stats.dropped
            return ("drop", reason)
        [handed] = self.seen
        return handed + (port._lastCopy,)


def native_outcome(data, link):
    """The same, from rp_ipv4_gre's result and the rule greport applies after its checks."""
    code, fields = native.ipv4_gre(data, link)
    if fields is None or code == native.IPV4_EMPTY:
        return ("drop", native.IPV4_DROPS[code])
    gre_bytes = data[fields.gre_start:fields.gre_end]
    copy = (fields.ident, fields.checksum, fields.src, fields.total)
    if code == native.IPV4_FRAGMENT:
        return ("fragment", gre_bytes, fields.ident, fields.fragment, fields.src, fields.dst, copy)
    return ("gre", gre_bytes, socket.inet_ntoa(fields.src), socket.inet_ntoa(fields.dst), copy)


def receivedGRE(sink, src, dst):
    """The GRE (headers and payload, no IP header) from *src* to *dst* waiting on *sink*, a
    non-blocking raw IPPROTO_GRE socket: what a native path sent, read off the wire."""
    out = []
    while True:
        try:
            packet = sink.recv(70000)
        except BlockingIOError:
            return out
        if (socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20])) == (src, dst):
            out.append(packet[(packet[0] & 15) * 4:])


def runPaths(paths, batches, prepare=None, check=None):
    """*batches(harness)* -> the wake-ups' frame lists, fed to a harness of each class of
    *paths* (the Python path's, then the native one's); *prepare(harness)* before its setUp,
    *check(harness)* after the frames: (python observed, native observed, native hand-backs).
    The differential tests of the capture pump share it."""
    results = []
    for cls in paths:
        harness = cls("run")
        if prepare is not None:
            prepare(harness)
        harness.setUp()
        try:
            written = [harness.feed(batch) for batch in batches(harness)]
            if check is not None:
                check(harness)
            results.append((harness.observed(written), list(harness.backs)))
        finally:
            harness.doCleanups()
    (python, _), (nativeResult, backs) = results
    return python, nativeResult, backs


def runBoth(paths, scenario, side="lrp", setup=None, check=None):
    """*scenario(harness, key)* -> the wake-ups' frame lists, through each harness class of
    *paths* on *side* (runPaths), with a call open and *setup(harness)* before the frames."""
    def batches(harness):
        key = harness.open_call()
        if setup is not None:
            setup(harness)
        return scenario(harness, key)

    def prepare(harness):
        harness.side = side

    return runPaths(paths, batches, prepare, check)
