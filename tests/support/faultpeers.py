"""Scripted PPTP peers and daemon launchers for the fault-injection tests (tests/system/test_faults.py).

Everything here uses plain blocking sockets so that a synchronous trial test can drive it
step by step; the daemons under test are real ``twistd -n routeproxy-lrp|rrp`` processes.
All sockets are opened inside one network namespace (:mod:`tests.support.netns`), where the whole
127.0.0.0/8 is on ``lo`` and no other test can take our ports.

* :class:`ScriptedServer` -- a control-only PPTP server (a thread): answers SCCRQ with SCCRP,
  OCRQ with OCRP (its own call IDs from a counter), CCRQ with CDN, Echo-Request with
  Echo-Reply, StopCCRQ with StopCCRP.  It records every connection (:class:`ServerConnection`)
  so a test can see EOF, or make a connection vanish with a TCP reset.
* :class:`PPTPClient` -- a scripted client: one control connection, typed messages, raw bytes,
  reset-on-close.
* :class:`Daemon` -- one twistd process, its log file and a way to wait for log lines.
"""
import contextlib
import ctypes
import json
import os
import re
import select
import signal
import socket
import struct
import sys
import threading
import time
import urllib.request

from routeproxy import gre, pptp

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
PR_SET_PDEATHSIG = 1


class FaultPeerError(Exception):
    """A scripted peer did not see what it waited for."""


def wait_until(predicate, timeout, what):
    """Poll *predicate* until it is true; FaultPeerError naming *what* after *timeout* s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise FaultPeerError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def reset_close(sock):
    """Close *sock* with a TCP RST (SO_LINGER 0), as a peer that crashed or vanished."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# --------------------------------------------------------------------------------------------
# control connections


class ControlConnection:
    """A blocking PPTP control connection: send messages or bytes, read typed messages."""

    def __init__(self, sock):
        self.sock = sock
        self.decoder = pptp.PPTPStreamDecoder()
        self.inbox = []
        self.eof = False
        self.reset = False

    def send(self, message):
        self.sock.sendall(message.pack())

    def send_bytes(self, data):
        self.sock.sendall(data)

    def _read(self, timeout):
        ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not ready:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data, self.reset = b"", True
        if not data:
            self.eof = True
            return False
        self.inbox.extend(self.decoder.feed(data))
        return True

    def expect(self, cls, timeout=5.0):
        """The next message; FaultPeerError unless it is a *cls* arriving within *timeout* s."""
        deadline = time.monotonic() + timeout
        while not self.inbox:
            if self.eof:
                raise FaultPeerError(f"connection closed while waiting for {cls.__name__}")
            if not self._read(deadline - time.monotonic()) and not self.eof:
                if time.monotonic() >= deadline:
                    raise FaultPeerError(f"no {cls.__name__} within {timeout} s")
        message = self.inbox.pop(0)
        if not isinstance(message, cls):
            raise FaultPeerError(f"expected {cls.__name__}, got {message!r}")
        return message

    def wait_closed(self, timeout=5.0):
        """True once the far end has closed (FIN or RST) within *timeout* s; False otherwise.

        Messages that arrive meanwhile are kept in ``inbox``.
        """
        deadline = time.monotonic() + timeout
        while not self.eof:
            if time.monotonic() >= deadline:
                return False
            self._read(deadline - time.monotonic())
        return True

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()

    def vanish(self):
        """Disappear without a word: a TCP reset."""
        reset_close(self.sock)


class PPTPClient(ControlConnection):
    """A scripted PPTP client (the PNS) with its own source address.

    *opener* is a context manager factory that puts the calling thread where the socket
    must live (``lambda: lab.inside(ns)``).
    """

    def __init__(self, opener, server, bind, name="client", timeout=5.0):
        with opener():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((bind, 0))
        sock.settimeout(timeout)
        try:
            sock.connect(server)
        except OSError:
            sock.close()
            raise
        sock.settimeout(None)
        super().__init__(sock)
        self.name = name
        self.address = sock.getsockname()
        self.next_call_id = 1
        self.next_echo = 1

    def start_request(self):
        """Send Start-Control-Connection-Request (host name = this client's name)."""
        self.send(pptp.StartControlConnectionRequest(
            framing_capabilities=pptp.FRAMING_ASYNC, bearer_capabilities=pptp.BEARER_ANALOG,
            maximum_channels=1, host_name=self.name.encode(), vendor_string=b"faultpeers"))

    def start(self, timeout=5.0):
        """Start-Control-Connection-Request; returns the reply."""
        self.start_request()
        return self.expect(pptp.StartControlConnectionReply, timeout)

    def call(self, timeout=5.0):
        """Outgoing-Call-Request with the next call ID; returns the reply (its call_id is L)."""
        call_id, self.next_call_id = self.next_call_id, self.next_call_id + 1
        self.send(pptp.OutgoingCallRequest(call_id=call_id, call_serial_number=call_id,
                                           minimum_bps=2400, maximum_bps=10000000,
                                           bearer_type=3, framing_type=3,
                                           packet_recv_window_size=64))
        return self.expect(pptp.OutgoingCallReply, timeout)

    def clear(self, call_id, timeout=5.0):
        """Call-Clear-Request for our *call_id*; returns the Call-Disconnect-Notify."""
        self.send(pptp.CallClearRequest(call_id=call_id))
        return self.expect(pptp.CallDisconnectNotify, timeout)

    def echo(self, timeout=5.0):
        """Echo-Request; returns the Echo-Reply (which must carry the same identifier)."""
        identifier, self.next_echo = self.next_echo, self.next_echo + 1
        self.send(pptp.EchoRequest(identifier=identifier))
        reply = self.expect(pptp.EchoReply, timeout)
        if reply.identifier != identifier:
            raise FaultPeerError(f"Echo-Reply {reply.identifier}, expected {identifier}")
        return reply

    def round_trip(self, timeout=5.0):
        """Prove the session works end to end: an echo, and a call placed and cleared."""
        self.echo(timeout)
        reply = self.call(timeout)
        if reply.result_code != pptp.OutgoingCallResult.CONNECTED:
            raise FaultPeerError(f"Outgoing-Call-Reply result {reply.result_code}")
        notify = self.clear(reply.peer_call_id, timeout)
        if notify.call_id != reply.call_id:
            raise FaultPeerError(f"Call-Disconnect-Notify for {notify.call_id}, expected {reply.call_id}")
        return reply


# --------------------------------------------------------------------------------------------
# the server


class ServerConnection(ControlConnection):
    """One control connection the scripted server accepted."""

    def __init__(self, sock, peer):
        super().__init__(sock)
        self.peer = peer
        self.host_name = None       # from the Start-Control-Connection-Request
        self.received = []          # every message, in order
        self.calls = {}             # peer's call ID -> our call ID
        self.closed = threading.Event()
        self.error = None

    def vanish(self):
        """The server drops this connection with a reset (as a crashed pptpd)."""
        reset_close(self.sock)


class ScriptedServer:
    """A control-only PPTP server on *listener* (an unaccepted, listening socket); a thread."""

    def __init__(self, listener, first_call_id=100):
        self.listener = listener
        self.address = listener.getsockname()
        self.lock = threading.Lock()
        self.connections = []
        self.active_calls = set()
        self.next_call_id = first_call_id
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def stop(self):
        self.stopping.set()
        self.thread.join(2)
        with contextlib.suppress(OSError):
            self.listener.close()
        for connection in list(self.connections):
            connection.close()

    def connection_named(self, host_name, timeout=5.0):
        """The connection whose SCCRQ carried *host_name* (the proxies pass it through)."""
        def find():
            with self.lock:
                return next((c for c in self.connections if c.host_name == host_name.encode()), None)
        return wait_until(find, timeout, f"a server connection from client {host_name!r}")

    def _accept_loop(self):
        while not self.stopping.is_set():
            ready, _, _ = select.select([self.listener], [], [], 0.1)
            if not ready:
                continue
            try:
                sock, peer = self.listener.accept()
            except OSError:
                continue
            connection = ServerConnection(sock, peer)
            with self.lock:
                self.connections.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection):
        try:
            while not self.stopping.is_set() and not connection.eof:
                try:
                    connection._read(0.1)
                except pptp.PPTPError as e:
                    connection.error = e
                    break
                while connection.inbox:
                    message = connection.inbox.pop(0)
                    connection.received.append(message)
                    if not self._answer(connection, message):
                        return
        except OSError as e:
            connection.error = e
        finally:
            with self.lock:
                self.active_calls.difference_update(connection.calls.values())
            connection.closed.set()
            connection.close()

    def _answer(self, connection, message):
        if isinstance(message, pptp.StartControlConnectionRequest):
            connection.host_name = pptp.strip_nul(message.host_name)
            connection.send(pptp.StartControlConnectionReply(
                result_code=pptp.StartResult.SUCCESS, framing_capabilities=pptp.FRAMING_ASYNC,
                bearer_capabilities=pptp.BEARER_ANALOG, maximum_channels=0xFFFF,
                host_name=b"scripted", vendor_string=b"faultpeers"))
        elif isinstance(message, pptp.OutgoingCallRequest):
            with self.lock:
                call_id = self.next_call_id
                self.next_call_id = self.next_call_id % 0xFFFF + 1
                self.active_calls.add(call_id)
            connection.calls[message.call_id] = call_id
            connection.send(pptp.OutgoingCallReply(
                call_id=call_id, peer_call_id=message.call_id,
                result_code=pptp.OutgoingCallResult.CONNECTED, connect_speed=10000000,
                packet_recv_window_size=64))
        elif isinstance(message, pptp.CallClearRequest):
            call_id = connection.calls.pop(message.call_id, None)
            if call_id is not None:
                with self.lock:
                    self.active_calls.discard(call_id)
                connection.send(pptp.CallDisconnectNotify(
                    call_id=call_id, result_code=pptp.DisconnectResult.REQUEST))
        elif isinstance(message, pptp.EchoRequest):
            connection.send(pptp.EchoReply(identifier=message.identifier,
                                           result_code=pptp.EchoResult.OK))
        elif isinstance(message, pptp.StopControlConnectionRequest):
            connection.send(pptp.StopControlConnectionReply(result_code=pptp.StopResult.OK))
            return False
        return True


# --------------------------------------------------------------------------------------------
# a scripted LRP: mux frames over TLS (stdlib ssl)


class MuxPeer:
    """A hand-driven LRP end of the link: TLS with the given certificate, then raw mux frames.

    *cert*/*key* None connects without a client certificate.  ``handshake()`` finishes TLS
    (raising ssl.SSLError or OSError if the RRP refuses us); ``hello()`` swaps HELLOs.
    """

    def __init__(self, opener, address, ca, server_name, cert=None, key=None, timeout=5.0):
        import ssl
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_verify_locations(ca)
        if cert:
            context.load_cert_chain(cert, key)
        with opener():
            raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.settimeout(timeout)
        raw.connect(address)
        self.sock = context.wrap_socket(raw, server_hostname=server_name, do_handshake_on_connect=False)
        self.decoder = None
        self.frames = []
        self.eof = False

    def handshake(self):
        self.sock.do_handshake()

    def send(self, data):
        self.sock.sendall(data)

    def hello(self):
        """Send our HELLO and read the RRP's; returns it."""
        from routeproxy.mux import frames
        self.decoder = frames.FrameDecoder(frames.MAX_MAX_PAYLOAD)
        self.send(frames.Hello().encode())
        return self.read_frame(frames.Hello)

    def read_frame(self, cls=None, timeout=5.0):
        """The next frame (of class *cls*, skipping PINGs/others); FaultPeerError on EOF/timeout."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.decoder.nextFrame()
            if frame is not None:
                self.frames.append(frame)
                if cls is None or isinstance(frame, cls):
                    return frame
                continue
            if self.eof or time.monotonic() > deadline:
                raise FaultPeerError(f"no {getattr(cls, '__name__', 'frame')} from the RRP within {timeout} s"
                                     f" (eof={self.eof}; got {self.frames!r})")
            self._read(deadline)

    def _read(self, deadline):
        import ssl
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return
        except (ssl.SSLError, ConnectionError):
            data = b""
        if not data:
            self.eof = True
        else:
            self.decoder.feed(data)

    def wait_closed(self, timeout=5.0):
        """Read (keeping frames) until the RRP closes the link; True if it did within *timeout*."""
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._read(deadline)
            with contextlib.suppress(Exception):
                while (frame := self.decoder.nextFrame()) is not None:
                    self.frames.append(frame)
        return self.eof

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()


# --------------------------------------------------------------------------------------------
# raw GRE


def gre_sender(opener, source):
    """A raw GRE socket sending from *source* (opened where *opener* puts the thread)."""
    with opener():
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, gre.IPPROTO_GRE)
    sock.bind((source, 0))
    return sock


def plain_gre(payload=b"\x00\x21junk"):
    """RFC 2784 GRE (version 0, no key): not PPTP's enhanced GRE."""
    return struct.pack(">HH", 0x0000, 0x0800) + payload


# --------------------------------------------------------------------------------------------
# the daemons


def _die_with_parent():
    """In the child before exec: get SIGTERM when the test process dies, so nothing lingers."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Daemon:
    """One ``twistd -n`` daemon in namespace *ns* of *lab*, logging to *workdir*/NAME.log."""

    def __init__(self, lab, ns, workdir, name, plugin, options):
        self.lab, self.ns, self.name = lab, ns, name
        self.plugin, self.options = plugin, list(options)
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.out_path = os.path.join(workdir, f"{name}.out")
        self.proc = None

    @property
    def argv(self):
        return [TWISTD, "-n", "--pidfile=", f"--logfile={self.log_path}", self.plugin, *self.options]

    def start(self):
        env = dict(os.environ, PYTHONPATH=REPO)
        self.proc = self.lab.spawn(self.ns, self.argv, logfile=self.out_path, cwd=REPO, env=env,
                                   preexec_fn=_die_with_parent)
        return self

    def stop(self, sig=signal.SIGTERM, timeout=5.0):
        """One *sig* (twistd logs a traceback when told to stop twice), then SIGKILL if need be."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except Exception:
            self.proc.kill()
            self.proc.wait()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def exits_within(self, timeout):
        """True if the process has exited, or does within *timeout* seconds."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
            return True
        except Exception:
            return False


    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def mark(self):
        """A position in the log: later waits look only at lines written after it."""
        return len(self.log())

    def lines(self, pattern, since=0):
        """Log lines after *since* that match the regular expression *pattern*."""
        return [line for line in self.log()[since:].splitlines() if re.search(pattern, line)]

    def wait_line(self, pattern, since=0, timeout=5.0):
        """The first line after *since* matching *pattern*; FaultPeerError (with the log) if none."""
        try:
            return wait_until(lambda: (self.lines(pattern, since) or [None])[0], timeout,
                              f"{self.name} to log /{pattern}/")
        except FaultPeerError as e:
            raise FaultPeerError(f"{e}\n{self.describe(since)}") from None

    def describe(self, since=0):
        text = self.log()[since:]
        try:
            with open(self.out_path, errors="replace") as f:
                out = f.read()[-2000:]
        except FileNotFoundError:
            out = ""
        rc = self.proc.poll() if self.proc else None
        return f"--- {self.name} (rc={rc}) ---\n$ {' '.join(self.argv)}\n{text[-6000:]}\n{out}"

    def status(self, port, timeout=5.0):
        """GET /status.json from the daemon's --status endpoint on 127.0.0.1:*port*."""
        with self.lab.inside(self.ns):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=timeout) as reply:
                return json.loads(reply.read())


def stop_all(daemons, grace=3.0):
    """One SIGTERM to each daemon at once, then SIGKILL whichever is still there after *grace* s."""
    running = [d for d in daemons if d.alive()]
    for daemon in running:
        daemon.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for daemon in running:
        if not daemon.exits_within(max(0.0, deadline - time.monotonic())):
            daemon.proc.kill()
            daemon.proc.wait()
