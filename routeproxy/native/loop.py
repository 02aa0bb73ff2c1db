"""The loop (docs/fastpath.md step 5, ``--data-plane loop``): the reactor's poll in C, in the
reactor's own thread.

:class:`CaptureLoop` wraps the running EPollReactor's ``doIteration``: when the native
capture's wake-up could go to C whole (:meth:`CaptureLoop.usable`: the port reading, its
sojourn gate (if any) in C, the one link it frames for open, Twisted's TLS and the mux
holding nothing), one C call (``rp_loop_run``, loop.c) waits on Twisted's own epoll fd and
handles the capture's wake-ups itself, and the link socket's reads when they are C's
(``NativeTLSReader``), one after the other, until anything else needs Python; then the
counters are folded (before any status read can run) and Python goes on where C stopped:
Twisted's dispatch of the ready fds, the rest of a wake-up C handed back (``GREPort.
resumeRead``, ``NativeTLSReader.readDone``), the slow peer's drop.  Otherwise the iteration
is Twisted's own.  No second thread: the ``SSL*`` is only used in the reactor's thread,
while Python checked it alive.
"""
import sys
import time

from twisted.logger import Logger
from twisted.python import log

from routeproxy.capture import NativeCapture, NativeRawCapture
from routeproxy.greport import GREPort


class CaptureLoop:
    """The loop over one native GREPort's capture and its link's reads (see the module's
    docstring)."""

    log = Logger()

    def __init__(self, module, reactor, port):
        self._ffi, self._lib = module.ffi, module.lib
        self._module = module
        self.reactor, self.port = reactor, port
        self.state = self._ffi.new("struct rp_loop *")
        self.state.timer_fd = -1  # opened at the first run, in the running reactor's epoll
        self._timerTried = False
        self._tls = None          # the NativeTLSReader whose reads C makes in this run
        self._poll = None         # the reactor's own doIteration
        self.runs = 0             # rp_loop_run calls, and their results (the status)
        self.wakeUps = 0          # capture wake-ups handled in C
        self.linkReads = 0        # link socket wake-ups read in C
        self.clockReads = 0       # C's clock reads (a wake-up needs none in the common case)
        self.results = {}
        self._names = {getattr(self._lib, name): name[8:].lower() for name in dir(self._lib)
                       if name.startswith("RP_LOOP_")}

    @classmethod
    def over(cls, module, reactor, port):
        """The loop for *port* on *reactor*, or ``(None, why not)``."""
        poller = getattr(reactor, "_poller", None)
        if type(reactor).doIteration.__name__ != "doPoll" or not hasattr(poller, "fileno") \
                or not hasattr(poller, "poll"):
            return None, f"the reactor is not an epoll reactor ({type(reactor).__name__})"
        if not isinstance(port, GREPort) or port.flows is None:
            return None, "the GRE capture is not native (--gre-capture native or native-raw)"
        return cls(module, reactor, port), None

    def install(self):
        if self._poll is None:
            self._poll = self.reactor.doIteration
            self.reactor.doIteration = self.doIteration
            self.port.loop = self

    def uninstall(self):
        if self._poll is not None:
            del self.reactor.doIteration
            self._poll = None
            self.port.loop = None
        self._lib.rp_loop_timer_close(self.state)
        self._timerTried = False

    def doIteration(self, timeout):
        """The reactor's iteration: in C while only native fds are ready, else Twisted's."""
        link = self.usable()
        if link is False:
            return self._poll(timeout)
        state, lib = self.state, self._lib
        if not self._timerTried:   # (usable() set the epoll fd; without a timer C reads the
            self._timerTried = True   # clock at every wake-up for the deadline instead)
            lib.rp_loop_timer_open(state)
        result = lib.rp_loop_run(state, -1.0 if timeout is None else timeout)
        self.runs += 1
        self.results[result] = self.results.get(result, 0) + 1
        self._fold(link)
        if result == lib.RP_LOOP_OTHER:
            self._poll(0)
        elif result == lib.RP_LOOP_CAPTURE:
            log.callWithLogger(self.port, self._resume, link)
        elif result == lib.RP_LOOP_SLOW_PEER:
            if self.port._gate is not None:   # doRead's end
                self.port._gate.observe(state.turn.now, state.turn.head)
            connection = link[1]
            connection._dropSlowPeer(f"{state.link.ceiling} bytes unsent "
                                     f"(limit {connection.config.maxSendBuffer})")
        elif result == lib.RP_LOOP_LINK:
            log.callWithLogger(self._tls.tcp, self._linkRead)
        elif result == lib.RP_LOOP_ERROR:
            raise OSError(state.turn.error, "epoll_wait failed in the loop")

    def usable(self):
        """Whether a capture wake-up may run in C whole, and the state C needs set: the
        link (index, connection, writer) it frames for, None when no link is begun, False
        when C may not run."""
        port, reactor = self.port, self.reactor
        if not port.connected or port._capture is None or port._reading:
            return False
        fd = port.fileno()
        if reactor._selectables.get(fd) is not port or fd not in reactor._reads \
                or fd in reactor._writes:
            return False
        gate, gateState = port._gate, port._cGate()   # C asks a gate in C, in any state
        if gate is not None and (gateState is None or port._wallClock is not time.time):
            return False
        flows = port.flows
        if flows._waiting or len(flows._live) > 1:
            return False
        state, capture, null = self.state, port._capture, self._ffi.NULL
        if isinstance(capture, NativeRawCapture):   # (a NativeCapture too)
            state.pcap, state.rawcap = null, capture._handle
        elif isinstance(capture, NativeCapture):   # (not a test's capture in memory)
            state.pcap, state.rawcap = capture._handle, null
        else:
            return False
        self._tls = tls = self._reader()
        state.read.fd = -1 if tls is None else tls.tcp.fileno()
        if tls is not None:
            state.read.link, state.read.tls = tls.reader.state, tls._state
            state.read.max_payload = tls.mux._decoder.maxPayload
        state.epfd = reactor._poller.fileno()
        state.capture_fd = fd
        state.pump = flows.state
        state.budget = port.maxPacketsPerRead
        state.gate = null if gateState is None else gateState
        k = state.link
        k.calls, k.sweep_at, k.idle_calls = flows._calls, flows._sweepAt, flows.idleCalls
        if not flows._live:
            k.begun = 0
            return None
        index, connection = flows._live[0]
        writer = _writer(self._module, connection)
        if writer is None:
            return False
        k.begun, k.index, k.seen = 1, index, flows._seen[index]
        flows._reasons[index] = "watermark"   # what greRoom says of an open, unpaused link
        config = connection.config
        k.watermark, k.max_send_buffer = connection.greLimit, config.maxSendBuffer
        k.max_payload = connection.maxOutPayload
        ceiling = connection._unsentCeiling
        k.ceiling = -1 if ceiling is None else ceiling
        k.socket = writer.tcp.socket.fileno()
        k.tls = writer._state
        return index, connection, writer

    def _reader(self):
        """The NativeTLSReader of the one link the port's calls use, when its next read may
        be C's (as its doRead checks, and the mux holding nothing of its own), else None."""
        links = self.port.flows.links
        if len(links) != 1:
            return None
        (mux,) = links
        reader = getattr(mux, "nativeReader", None)
        tls = getattr(reader, "tls", None)
        if tls is None or mux.clock is not self.reactor or not tls.installed or not tls.usable() \
                or not mux.holdsNothing():
            return None
        tcp, reactor = tls.tcp, self.reactor
        fd = tcp.fileno()
        if reactor._selectables.get(fd) is not tcp or fd not in reactor._reads \
                or fd in reactor._writes:
            return None
        return tls

    def _fold(self, link):
        """C's counters and state into Python's: what the Python path would have counted."""
        state, port, flows = self.state, self.port, self.port.flows
        k, stats = state.link, state.stats
        tls = self._tls
        if tls is not None:
            tls.reader._fold()
            if stats.link_reads:
                self.linkReads += stats.link_reads
                tls.reads += stats.link_reads
                tls.totals.tlsReads += stats.link_reads
                tls.mux.stats.bytesIn += stats.plaintext
                tls.mux._lastReceived = stats.last_read
        port.stats.reads += stats.reads
        self.wakeUps += stats.reads
        self.clockReads += stats.clock_reads
        flows._calls, flows._sweepAt = k.calls, k.sweep_at
        if link is not None:
            index, connection, _ = link
            if not k.begun:
                flows._live = []
            connection.stats.framesOut += stats.frames_out
            connection.stats.bytesOut += stats.bytes_out
            connection._unsentCeiling = None if k.ceiling < 0 else k.ceiling
            flows.framed += stats.framed
            flows.written += stats.written
            flows.fold(seen=(index, k.seen))
        else:
            flows.fold()
        self._ffi.memmove(self._ffi.addressof(stats), bytes(self._ffi.sizeof(stats)),
                          self._ffi.sizeof(stats))

    def _linkRead(self):
        """A link read C made that needs Python (frames for the decoder, EOF, an error...):
        the rest as NativeTLSReader.doRead goes on; its end as the reactor meets doRead's."""
        tls, read = self._tls, self.state.read
        if read.flags & self._lib.RP_READ_NO_MEMORY:
            raise MemoryError("rp_link_read")
        n = read.out_length
        rest = self._ffi.buffer(read.out, n)[:] if n else b""
        try:
            why = tls.readDone(read.flags, read.info.plaintext, rest)
        except Exception:
            why = sys.exc_info()[1]
            log.err()
        if why:
            self.reactor._disconnectSelectable(tls.tcp, why, True)

    def _resume(self, link):
        """A wake-up C handed back part way: the mux's turn as C left it, then the rest by
        the port's own code; a capture error as the reactor meets doRead's."""
        turn, port = self.state.turn, self.port
        ffi = self._ffi

        def carried():
            if link is None:
                return
            _, connection, writer = link
            if turn.flush_held:
                connection._unsent, connection._unsentAsked = turn.unsent, bool(turn.asked)
                connection._wroteNative = bool(turn.wrote)
                connection._scheduleFlush()
            if turn.rest_length:
                writer._queue(ffi.buffer(turn.rest, turn.rest_length)[:])
            if turn.tls_failed:
                writer._drain()
            if turn.unwritten_length:
                connection.queueFrames(ffi.buffer(turn.unwritten, turn.unwritten_length)[:],
                                       turn.unwritten_frames)

        back = None
        if turn.back != ffi.NULL:
            back = (turn.back_ts, ffi.buffer(turn.back, turn.back_length)[:])
        error = None
        if turn.capture_error:
            error = OSError(ffi.string(turn.err).decode("utf-8", "replace"))
        try:
            why = port.resumeRead(turn.now, turn.head if turn.has_head else 0.0, turn.budget,
                                  back, carried, error)
        except Exception:
            why = sys.exc_info()[1]
            log.err()
        if why:
            self.reactor._disconnectSelectable(port, why, True)

    def snapshot(self):
        return {"runs": self.runs, "wake_ups": self.wakeUps, "link_reads": self.linkReads,
                "clock_reads": self.clockReads, "timer": self.state.timer_fd >= 0,
                "results": {self._names.get(r, str(r)): n for r, n in sorted(self.results.items())}}


def _writer(module, connection):
    """The NativeTLSWriter of *connection*'s link when a wake-up's frames may go to it in C
    as writeNative sends them (else None): the mux open with nothing of its own queued or
    held, its turn over, TLS idle."""
    if (connection.closed or connection._writePaused or connection.version is None
            or not connection.holdsNothing()):
        return None
    protocol = connection._link
    if protocol is None or getattr(protocol, "_lost", True):
        return None
    return protocol.idleNativeWriter(module)
