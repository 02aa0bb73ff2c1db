"""Scripted PPTP peers: the clients and the server the tests and benchmarks put around the daemons.

One family, one implementation per concept, all on routeproxy.pptp's messages:

* message builders (:func:`start_request`, :func:`outgoing_call_request`, ...): what every
  scripted client sends and the server answers, so all peers say the same thing;
* :class:`ControlConnection` -- a blocking control connection (send messages or raw bytes,
  wait for a typed message, see EOF/RST, vanish with a reset);
* :class:`PPTPClient` -- a scripted client (the PNS): start, call, clear, echo, stop;
* :class:`ScriptedServer` -- a control server (the PAC, as pptpd: its own call IDs from a
  counter) that serves any number of connections in one thread (epoll), optionally echoes GRE of
  its calls (raw socket, pptpd's source-address check) and writes a JSON status.  With
  *calls_per_connection* it takes that many calls per control connection and closes the
  connection on one more, as poptop does on a second Outgoing-Call-Request.  It runs in
  the test process (fault tests) or as its own process (:class:`ServerProcess`,
  ``python -m tests.support.pptppeers server``);
* :class:`EchoClient` -- places calls, sends GRE keyed with the server side's IDs, checks that
  exactly its own payloads come back (``python -m tests.support.pptppeers client``);
* :func:`open_sessions` -- the asyncio flavour of the client for benchmarks: thousands of
  control connections with one call each, set up concurrently and kept open;
* :class:`MuxPeer` -- a hand-driven LRP end of the link (stdlib TLS, raw mux frames).

No PPP runs here: GRE payloads are test bytes that merely look like PPP (``ff 03`` first) and
name who sent them, so a client can tell its own echoes from anybody else's.
"""
import argparse
import asyncio
import contextlib
import json
import os
import select
import selectors
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time

from routeproxy import gre, pptp
from routeproxy.config import parseHostPort
from routeproxy.capture import IPPROTO_GRE
from tests.support.daemons import REPO, child_env, tail
from tests.support.packets import parse_ipv4_gre
from tests.support.netns import stop_process
from tests.support.wait import HarnessError, wait_until

PPP_LIKE = b"\xff\x03\x00\x21"  # address, control, protocol IPv4: what a PPP frame starts with
RAW_BUFFER = 4 * 1024 * 1024
VENDOR = b"routeproxy tests"


class PeerError(HarnessError):
    """A scripted peer did not see what it waited for (timeout, EOF, another message)."""


# --------------------------------------------------------------------------------------------
# messages


def start_request(name):
    """Start-Control-Connection-Request from a client called *name* (the host name field)."""
    return pptp.StartControlConnectionRequest(
        framing_capabilities=pptp.FRAMING_ASYNC, bearer_capabilities=pptp.BEARER_ANALOG,
        maximum_channels=1, host_name=name.encode()[:64], vendor_string=VENDOR)


def start_reply(host_name):
    return pptp.StartControlConnectionReply(
        result_code=pptp.StartResult.SUCCESS, framing_capabilities=pptp.FRAMING_ASYNC,
        bearer_capabilities=pptp.BEARER_ANALOG, maximum_channels=0xFFFF,
        host_name=host_name, vendor_string=VENDOR)


def outgoing_call_request(call_id, serial=None):
    return pptp.OutgoingCallRequest(
        call_id=call_id, call_serial_number=call_id if serial is None else serial,
        minimum_bps=300, maximum_bps=100_000_000, bearer_type=3, framing_type=3,
        packet_recv_window_size=64)


def outgoing_call_reply(call_id, peer_call_id):
    return pptp.OutgoingCallReply(
        call_id=call_id, peer_call_id=peer_call_id, result_code=pptp.OutgoingCallResult.CONNECTED,
        connect_speed=100_000_000, packet_recv_window_size=64)


def echo_reply(request):
    return pptp.EchoReply(identifier=request.identifier, result_code=pptp.EchoResult.OK)


# --------------------------------------------------------------------------------------------
# sockets


def _readable(sock, timeout):
    """True if *sock* has data (or EOF) within *timeout* s; poll(), so any fd number works."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


def reset_close(sock):
    """Close *sock* with a TCP RST (SO_LINGER 0), as a peer that crashed or vanished."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _where(opener):
    """The context *opener* (e.g. ``lambda: lab.inside(ns)``) gives, or none."""
    return opener() if opener else contextlib.nullcontext()


def tcp_socket(opener=None):
    """A TCP socket, opened where *opener* (e.g. ``lambda: lab.inside(ns)``) puts the thread:
    it lives in that namespace from then on."""
    with _where(opener):
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


def listen(host, port=pptp.PPTP_PORT, opener=None, backlog=4096):
    """A listening TCP socket on host:port (opened where *opener* puts the thread)."""
    sock = tcp_socket(opener)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def open_raw_gre(bind_address=None, opener=None):
    """A raw IPPROTO_GRE socket; bound, it only sees GRE addressed to *bind_address* and sends from it."""
    with _where(opener):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_GRE)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RAW_BUFFER)
    if bind_address:
        sock.bind((bind_address, 0))
    return sock


def plain_gre(payload=b"\x00\x21junk"):
    """RFC 2784 GRE (version 0, no key): not PPTP's enhanced GRE."""
    return struct.pack(">HH", 0x0000, 0x0800) + payload


def payload_for(name, round_no, call_index, seq):
    """Test bytes that look like PPP and name exactly one (client, round, call, seq)."""
    return PPP_LIKE + f"synthetic {name} r{round_no} c{call_index} s{seq}".encode()


# --------------------------------------------------------------------------------------------
# control connections


class ControlConnection:
    """A blocking PPTP control connection: send messages or bytes, read typed messages.

    *answer_echoes*: an Echo-Request met while waiting is answered (a real peer's keep-alive).
    *strict*: expect() fails on any message but the one awaited; otherwise others are kept
    in ``unexpected``.
    """

    def __init__(self, sock, answer_echoes=False, strict=True):
        self.sock = sock
        self.decoder = pptp.PPTPStreamDecoder()
        self.inbox = []
        self.unexpected = []
        self.answer_echoes, self.strict = answer_echoes, strict
        self.eof = False
        self.reset = False

    def send(self, message):
        self.sock.sendall(message.pack())

    def send_bytes(self, data):
        self.sock.sendall(data)

    def receive(self):
        """Read what the (readable) socket has and decode it; False at EOF or reset."""
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data, self.reset = b"", True
        if not data:
            self.eof = True
            return False
        self.inbox.extend(self.decoder.feed(data))
        return True

    def read(self, timeout):
        """Wait up to *timeout* s for bytes and decode them; False on timeout or EOF."""
        return _readable(self.sock, timeout) and self.receive()

    def expect(self, cls, timeout=5.0, match=None):
        """The next *cls* message (accepted by *match*); PeerError on timeout, EOF or (strict)
        another message first."""
        deadline = time.monotonic() + timeout
        while True:
            while self.inbox:
                message = self.inbox.pop(0)
                if isinstance(message, cls) and (match is None or match(message)):
                    return message
                if self.answer_echoes and isinstance(message, pptp.EchoRequest):
                    self.send(echo_reply(message))
                elif self.strict:
                    raise PeerError(f"expected {cls.__name__}, got {message!r}")
                else:
                    self.unexpected.append(message)
            if self.eof:
                raise PeerError(f"connection closed while waiting for {cls.__name__}")
            if time.monotonic() >= deadline:
                raise PeerError(f"no {cls.__name__} within {timeout} s")
            self.read(deadline - time.monotonic())

    def wait_closed(self, timeout=5.0):
        """True once the far end has closed (FIN or RST) within *timeout* s; False otherwise.

        Messages that arrive meanwhile are kept in ``inbox``.
        """
        deadline = time.monotonic() + timeout
        while not self.eof:
            if time.monotonic() >= deadline:
                return False
            self.read(deadline - time.monotonic())
        return True

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()

    def vanish(self):
        """Disappear without a word: a TCP reset."""
        reset_close(self.sock)


class PPTPClient(ControlConnection):
    """A scripted PPTP client (the PNS) connected to *server* from *bind* (any address if None).

    *opener* is a context manager factory that puts the calling thread where the socket
    must live (``lambda: lab.inside(ns)``).
    """

    def __init__(self, server, bind=None, name="client", timeout=5.0, opener=None, **options):
        sock = tcp_socket(opener)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if bind:
                sock.bind((bind, 0))
            sock.settimeout(timeout)
            sock.connect(tuple(server))
        except OSError:
            sock.close()
            raise
        sock.settimeout(None)
        super().__init__(sock, **options)
        self.name = name
        self.address = sock.getsockname()
        self.next_call_id = 1
        self.next_echo = 1

    def start_request(self):
        """Send Start-Control-Connection-Request (host name = this client's name)."""
        self.send(start_request(self.name))

    def start(self, timeout=5.0):
        """Start-Control-Connection-Request; returns the reply."""
        self.start_request()
        return self.expect(pptp.StartControlConnectionReply, timeout)

    def call(self, timeout=5.0, call_id=None, serial=None):
        """Outgoing-Call-Request (by default with the next call ID); returns the reply to it
        (its call_id is the ID the other side gave the call)."""
        if call_id is None:
            call_id, self.next_call_id = self.next_call_id, self.next_call_id + 1
        self.send(outgoing_call_request(call_id, serial))
        return self.expect(pptp.OutgoingCallReply, timeout, lambda m: m.peer_call_id == call_id)

    def clear(self, call_id, timeout=5.0, match=None):
        """Call-Clear-Request for our *call_id*; returns the Call-Disconnect-Notify."""
        self.send(pptp.CallClearRequest(call_id=call_id))
        return self.expect(pptp.CallDisconnectNotify, timeout, match)

    def echo(self, timeout=5.0):
        """Echo-Request; returns the Echo-Reply (which must carry the same identifier)."""
        identifier, self.next_echo = self.next_echo, self.next_echo + 1
        self.send(pptp.EchoRequest(identifier=identifier))
        reply = self.expect(pptp.EchoReply, timeout)
        if reply.identifier != identifier:
            raise PeerError(f"Echo-Reply {reply.identifier}, expected {identifier}")
        return reply

    def stop(self, timeout=5.0):
        """Stop-Control-Connection-Request; returns the reply."""
        self.send(pptp.StopControlConnectionRequest(reason=pptp.StopReason.NONE))
        return self.expect(pptp.StopControlConnectionReply, timeout)

    def round_trip(self, timeout=5.0):
        """Prove the session works end to end: an echo, and a call placed and cleared."""
        self.echo(timeout)
        reply = self.call(timeout)
        if reply.result_code != pptp.OutgoingCallResult.CONNECTED:
            raise PeerError(f"Outgoing-Call-Reply result {reply.result_code}")
        notify = self.clear(reply.peer_call_id, timeout)
        if notify.call_id != reply.call_id:
            raise PeerError(f"Call-Disconnect-Notify for {notify.call_id}, expected {reply.call_id}")
        return reply


# --------------------------------------------------------------------------------------------
# the server


class ServerCall:
    """A call the server accepted: its own ID, the peer's ID and the control connection's peer."""

    def __init__(self, call_id, peer_call_id, peer_address, connection):
        self.call_id, self.peer_call_id = call_id, peer_call_id
        self.peer_address, self.connection = peer_address, connection
        self.gre_in = self.echoed = self.next_seq = 0
        self.opened, self.closed = time.monotonic(), None

    def as_dict(self):
        return {"call_id": self.call_id, "peer_call_id": self.peer_call_id, "peer": self.peer_address,
                "connection": self.connection, "gre_in": self.gre_in, "echoed": self.echoed,
                "opened": self.opened, "closed": self.closed}


class ServerConnection(ControlConnection):
    """One control connection the scripted server accepted."""

    def __init__(self, sock, peer, number):
        super().__init__(sock)
        self.peer = peer
        self.number = number
        self.host_name = None       # from the Start-Control-Connection-Request
        self.received = []          # every message, in order
        self.calls = {}             # the peer's call ID -> ServerCall
        self.closed = threading.Event()
        self.error = None
        self.vanishing = False

    def vanish(self):
        """The server drops this connection with a reset (as a crashed pptpd); its serving
        thread does it, so that the socket leaves the poll set first."""
        self.vanishing = True


class ScriptedServer:
    """A PPTP server (the PAC, pptpd's stand-in): state, answers, and one thread serving.

    Answers Start-Control-Connection, Outgoing-Call (its own call IDs from *first_call_id*
    up, wrapping, never one in use; with *mirror* the peer's own ID when free: the worst case
    for a shared host), Call-Clear (Call-Disconnect-Notify with its own ID), Echo and Stop.
    With a raw GRE socket it echoes every GRE data packet of one of its calls, accepted like
    pptpd only from the call's control-connection address; everything else is counted as
    dropped.  *announce* is called with every ServerCall answered.  Thread-safe.
    """

    def __init__(self, host="0.0.0.0", port=pptp.PPTP_PORT, first_call_id=1, mirror=False,
                 status_path=None, announce=None, host_name=b"scripted", calls_per_connection=None):
        self.host, self.port = host, port
        self.calls_per_connection = calls_per_connection
        self.closed_on_extra_call = 0   # connections closed for one call too many (poptop's way)
        self.mirror, self.status_path, self.announce, self.host_name = mirror, status_path, announce, host_name
        self.lock = threading.Lock()
        self.next_call_id = first_call_id
        self.calls = {}          # own call ID -> ServerCall (active)
        self.calls_seen = []     # every ServerCall ever accepted, in order
        self.connections = []    # every ServerConnection, in order
        self.connections_open = 0
        self.control = {}        # message name -> count received
        self.gre_echoed = 0
        self.acks = 0
        self.dropped = {}        # reason -> count
        self.errors = []
        self.generation = 0
        self.stopping = threading.Event()
        self.thread = None
        self._listener = None

    # -- call IDs ------------------------------------------------------------------------------

    def allocate(self, peer_call_id, peer_address, connection):
        """A new ServerCall with our own ID, or None when all 65535 are in use."""
        with self.lock:
            if self.mirror and peer_call_id and peer_call_id not in self.calls:
                call_id = peer_call_id
            else:
                for _ in range(0xFFFF):
                    call_id = self.next_call_id
                    self.next_call_id = self.next_call_id % 0xFFFF + 1  # 1..65535, wraps
                    if call_id not in self.calls:
                        break
                else:
                    return None
            call = self.calls[call_id] = ServerCall(call_id, peer_call_id, peer_address, connection)
            self.calls_seen.append(call)
            return call

    def release(self, call):
        with self.lock:
            if self.calls.get(call.call_id) is call:
                del self.calls[call.call_id]
                call.closed = time.monotonic()

    def _count(self, table, key):
        with self.lock:
            table[key] = table.get(key, 0) + 1

    def connection_named(self, host_name, timeout=5.0):
        """The connection whose SCCRQ carried *host_name* (the proxies pass it through)."""
        def find():
            with self.lock:
                return next((c for c in self.connections if c.host_name == host_name.encode()), None)
        return wait_until(find, timeout, f"a server connection from client {host_name!r}")

    # -- answers -------------------------------------------------------------------------------

    def answer(self, connection, message):
        """Reply to one message as pptpd would; False when the connection is to close."""
        self._count(self.control, message.NAME)
        connection.received.append(message)
        if isinstance(message, pptp.StartControlConnectionRequest):
            connection.host_name = pptp.strip_nul(message.host_name)
            connection.send(start_reply(self.host_name))
        elif isinstance(message, pptp.OutgoingCallRequest):
            if self.calls_per_connection is not None and len(connection.calls) >= self.calls_per_connection:
                # poptop: "Request to open call when call is already open, closing"
                with self.lock:
                    self.closed_on_extra_call += 1
                return False
            call = self.allocate(message.call_id, connection.peer[0], connection.number)
            if call is None:
                connection.send(pptp.OutgoingCallReply(
                    peer_call_id=message.call_id, result_code=pptp.OutgoingCallResult.GENERAL_ERROR,
                    error_code=pptp.ErrorCode.NO_RESOURCE))
                return True
            old = connection.calls.pop(message.call_id, None)
            if old is not None:  # the peer reused its ID on this connection: the old call is gone
                self.release(old)
            connection.calls[message.call_id] = call
            connection.send(outgoing_call_reply(call.call_id, message.call_id))
            if self.announce:
                self.announce(call)
        elif isinstance(message, pptp.EchoRequest):
            connection.send(echo_reply(message))
        elif isinstance(message, pptp.CallClearRequest):
            call = connection.calls.pop(message.call_id, None)
            if call is None:
                with self.lock:
                    self.errors.append(f"connection {connection.number}: Call-Clear-Request for unknown "
                                       f"call {message.call_id}")
                return True
            self.release(call)
            connection.send(pptp.CallDisconnectNotify(call_id=call.call_id,
                                                      result_code=pptp.DisconnectResult.REQUEST))
        elif isinstance(message, pptp.StopControlConnectionRequest):
            connection.send(pptp.StopControlConnectionReply(result_code=pptp.StopResult.OK))
            return False
        return True  # Set-Link-Info, WAN-Error-Notify, replies: counted, nothing to answer

    # -- serving -------------------------------------------------------------------------------

    def start(self, listener, raw=None):
        """Serve *listener* (and GRE on *raw*) in a thread; ``stop()`` ends it."""
        self.thread = threading.Thread(target=self.serve, args=(listener, raw), daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(2)
        with contextlib.suppress(OSError, AttributeError):
            self._listener.close()
        for connection in list(self.connections):
            connection.close()

    def serve(self, listener, raw=None):
        """Accept, answer and echo until ``stopping`` is set: one epoll loop for everything."""
        self._listener = listener
        self.host, self.port = listener.getsockname()[:2]
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, "accept")
        if raw is not None:
            selector.register(raw, selectors.EVENT_READ, "gre")
        try:
            while not self.stopping.is_set():
                for key, _ in selector.select(0.1):
                    if key.data == "accept":
                        self._accept(listener, selector)
                    elif key.data == "gre":
                        self._gre(raw)
                    else:
                        self._serve(key.data, selector)
                for connection in [c for c in self.connections if c.vanishing and not c.closed.is_set()]:
                    self._finish(connection, selector, reset=True)
        finally:
            for connection in list(self.connections):
                if not connection.closed.is_set():
                    self._finish(connection, selector)
            selector.close()

    def _accept(self, listener, selector):
        try:
            sock, peer = listener.accept()
        except OSError:
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.lock:
            connection = ServerConnection(sock, peer, len(self.connections) + 1)
            self.connections.append(connection)
            self.connections_open += 1
        selector.register(sock, selectors.EVENT_READ, connection)

    def _serve(self, connection, selector):
        done = False
        try:
            done = not connection.receive()
            while connection.inbox and not done:
                done = not self.answer(connection, connection.inbox.pop(0))
        except (OSError, pptp.PPTPError) as e:
            connection.error, done = e, True
            with self.lock:
                self.errors.append(f"connection {connection.number} from {connection.peer[0]}: {e}")
        if done:
            self._finish(connection, selector)

    def _finish(self, connection, selector, reset=False):
        """Free the connection's calls and close it (with a TCP reset if *reset*)."""
        with contextlib.suppress(KeyError, ValueError, OSError):
            selector.unregister(connection.sock)
        for call in connection.calls.values():
            self.release(call)
        if reset:
            reset_close(connection.sock)
        connection.close()
        with self.lock:
            self.connections_open -= 1
        connection.closed.set()

    # -- GRE -----------------------------------------------------------------------------------

    def _gre(self, raw):
        try:
            frame = raw.recv(65535)
        except OSError:
            return
        self.handle_gre(frame, raw)

    def handle_gre(self, frame, raw):
        """Echo one received IPv4+GRE frame if it belongs to a call, else count why not."""
        try:
            src, dst, data = parse_ipv4_gre(frame)
            call_id, seq, ack, payload = gre.split_gre(data)
        except gre.GREError as e:
            self._count(self.dropped, f"bad GRE: {e.reason}")
            return
        if dst != self.host:
            self._count(self.dropped, "not addressed to this server")
            return
        with self.lock:
            call = self.calls.get(call_id)
        if call is None:
            self._count(self.dropped, "unknown call ID")
            return
        if src != call.peer_address:
            self._count(self.dropped, "source is not the control connection's peer")
            return
        if seq is None:
            with self.lock:
                self.acks += 1
            return
        with self.lock:
            call.gre_in += 1
            out_seq = call.next_seq
            call.next_seq = (call.next_seq + 1) & 0xFFFFFFFF
        try:
            raw.sendto(gre.build_gre(call.peer_call_id, payload, seq=out_seq, ack=seq), (src, 0))
        except OSError as e:
            self._count(self.dropped, f"echo failed: {e.strerror}")
            return
        with self.lock:
            call.echoed += 1
            self.gre_echoed += 1

    # -- status --------------------------------------------------------------------------------

    def status(self):
        with self.lock:
            seen = [c.as_dict() for c in self.calls_seen]
            return {
                "listen": f"{self.host}:{self.port}",
                "pid": os.getpid(),
                "generation": self.generation,
                "connections": len(self.connections),
                "connections_open": self.connections_open,
                "control": dict(self.control),
                "calls_seen": seen,
                "peer_call_ids": [c["peer_call_id"] for c in seen],
                "active_calls": sorted(self.calls),
                "gre_echoed": self.gre_echoed,
                "closed_on_extra_call": self.closed_on_extra_call,
                "acks": self.acks,
                "dropped": dict(self.dropped),
                "errors": list(self.errors),
            }

    def write_status(self):
        if not self.status_path:
            return
        with self.lock:
            self.generation += 1
        data = json.dumps(self.status(), indent=1)
        tmp = f"{self.status_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(data)
        os.replace(tmp, self.status_path)


def concurrent_collisions(status):
    """Pairs of calls a server had open at the same time with the same peer address and peer call ID.

    The RRP must make these impossible: it is what "the server sees distinct call IDs" means
    for calls that overlap (IDs of calls that have ended may come back).
    """
    calls = status["calls_seen"]
    clashes = []
    for n, a in enumerate(calls):
        for b in calls[n + 1:]:
            if (a["peer"], a["peer_call_id"]) != (b["peer"], b["peer_call_id"]):
                continue
            a_end = a["closed"] if a["closed"] is not None else float("inf")
            b_end = b["closed"] if b["closed"] is not None else float("inf")
            if a["opened"] < b_end and b["opened"] < a_end:
                clashes.append((a, b))
    return clashes


class ServerProcess:
    """The scripted server as its own process in namespace *ns* of *lab*.

    Its stdout goes to *workdir*/NAME.log; the ``call OURS PEER`` line it prints per call
    answered fills ``calls`` (our ID -> the peer's: the IDs the server sends GRE to).
    ``status()`` asks it for a fresh JSON status (SIGUSR1), ``stop()`` returns the last one.
    """

    def __init__(self, lab, ns, address, workdir, port=pptp.PPTP_PORT, name="server", first_call_id=1,
                 mirror=False, gre=True, timeout=10, calls_per_connection=None):
        self.lab, self.ns, self.address, self.port, self.name = lab, ns, address, port, name
        self.status_path = os.path.join(workdir, f"{name}.status.json")
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.final = None
        self.calls = {}
        self._listening = threading.Event()
        argv = [sys.executable, "-m", "tests.support.pptppeers", "server", "--listen", f"{address}:{port}",
                "--status", self.status_path, "--first-call-id", str(first_call_id), "--announce"]
        argv += (["--mirror-call-ids"] if mirror else []) + ([] if gre else ["--no-gre"])
        if calls_per_connection is not None:
            argv += ["--calls-per-connection", str(calls_per_connection)]
        self.proc = lab.spawn(ns, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=REPO, env=child_env())
        threading.Thread(target=self._read, daemon=True).start()
        try:
            wait_until(self._listening.is_set, timeout, f"{name} start", alive=self.alive)
        except HarnessError as e:
            raise HarnessError(f"{e}\n{self.describe()}") from None

    def _read(self):
        with open(self.log_path, "a") as log:
            for line in self.proc.stdout:
                parts = line.split()
                if len(parts) == 3 and parts[0] == "call":
                    self.calls[int(parts[1])] = int(parts[2])
                    continue
                if parts[:1] == ["listening"]:
                    self._listening.set()
                log.write(line)
                log.flush()

    def alive(self):
        return self.proc.poll() is None

    def peer_ids(self, expected, timeout=5.0):
        """The peers' call IDs of every call so far, once at least *expected* are known."""
        with contextlib.suppress(HarnessError):
            wait_until(lambda: len(self.calls) >= expected, timeout, f"{expected} calls at {self.name}")
        return list(self.calls.values())

    def _read_status(self):
        try:
            with open(self.status_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def status(self, timeout=5.0):
        """A fresh status (asks the server with SIGUSR1 and waits for the file to change)."""
        if not self.alive():
            return self.final or self._read_status()
        before = (self._read_status() or {}).get("generation", 0)
        os.kill(self.proc.pid, signal.SIGUSR1)
        fresh = {}
        wait_until(lambda: fresh.update(self._read_status() or {}) or fresh.get("generation", 0) > before,
                   timeout, f"status of {self.name}", alive=self.alive)
        return fresh

    def stop(self):
        """SIGTERM; returns the final status."""
        stop_process(self.proc, 5.0)
        if self.final is None:
            self.final = self._read_status()
        return self.final

    def describe(self):
        status = self.final
        if status is None:
            with contextlib.suppress(Exception):
                status = self.status(timeout=2)
        status = status or self._read_status()
        return (f"--- {self.name} (scripted server {self.address}, rc={self.proc.poll()}) ---\n"
                f"{tail(self.log_path)}\nstatus: {json.dumps(status)}\n")


def run_server(args):
    host, port = parseHostPort(args.listen, pptp.PPTP_PORT)
    announce = (lambda call: print(f"call {call.call_id} {call.peer_call_id}", flush=True)) if args.announce else None
    server = ScriptedServer(host, port, first_call_id=args.first_call_id, status_path=args.status,
                            mirror=args.mirror_call_ids, announce=announce, host_name=b"synthetic",
                            calls_per_connection=args.calls_per_connection)
    listener = listen(host, port)
    raw = None if args.no_gre else open_raw_gre(host)

    def on_term(signum, frame):
        server.stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGUSR1, lambda signum, frame: server.write_status())
    server.write_status()
    print(f"listening {host}:{port}", flush=True)
    try:
        server.serve(listener, raw)
    finally:
        server.write_status()
    return 0


# --------------------------------------------------------------------------------------------
# the GRE echo client


class RoundResult:
    """What one control connection of an EchoClient saw."""

    def __init__(self, round_no):
        self.round_no = round_no
        self.call_ids = []         # our IDs
        self.server_ids = []       # the IDs the server side told us (OCRP Call ID)
        self.sent = 0
        self.echoed = 0
        self.echoed_by_call = {}   # our call ID -> its echoes
        self.duplicates = 0
        self.foreign = 0
        self.acks = 0
        self.missing = 0
        self.errors = []
        self.foreign_samples = []
        self.start_reply = None    # [result code, error code] of Start-Control-Connection-Reply

    def as_dict(self):
        return {"round": self.round_no, "start_reply": self.start_reply, "call_ids": self.call_ids,
                "server_ids": self.server_ids, "sent": self.sent, "echoed": self.echoed,
                "echoed_by_call": self.echoed_by_call,
                "duplicates": self.duplicates, "foreign": self.foreign, "acks": self.acks,
                "missing": self.missing, "errors": self.errors, "foreign_samples": self.foreign_samples[:5]}


class EchoClient:
    """Places calls from *bind*, sends GRE keyed with the server side's IDs, collects the GRE
    addressed to *bind*, clears the calls and stops; *rounds* times on fresh connections."""

    def __init__(self, server, bind, call_id=1, packets=10, calls=1, rounds=1, timeout=5.0,
                 interval=0.001, name=None, linger=0.2, hold=0.0, start_delay=0.0):
        self.server, self.bind, self.name = tuple(server), bind, name or bind
        self.call_id, self.packets, self.calls, self.rounds = call_id, packets, calls, rounds
        self.timeout, self.interval, self.linger, self.hold = timeout, interval, linger, hold
        self.start_delay = start_delay

    def run(self):
        results = []
        raw = open_raw_gre(self.bind)
        try:
            for round_no in range(1, self.rounds + 1):
                result = RoundResult(round_no)
                try:
                    self._round(raw, result)
                except (OSError, pptp.PPTPError, gre.GREError, PeerError) as e:
                    result.errors.append(f"{type(e).__name__}: {e}")
                results.append(result)
        finally:
            raw.close()
        return results

    def _round(self, raw, result):
        client = PPTPClient(self.server, self.bind, self.name, self.timeout, answer_echoes=True, strict=False)
        try:
            if self.start_delay:  # a slow client: the connection is open, nothing sent yet
                time.sleep(self.start_delay)
            try:
                reply = client.start(self.timeout)
            except PeerError:
                reply = None
                if client.eof:
                    result.errors.append("connection closed without a Start-Control-Connection-Reply")
            if reply is not None:
                result.start_reply = [reply.result_code, reply.error_code]
            if reply is None or reply.result_code != pptp.StartResult.SUCCESS:
                result.errors.append(f"no successful Start-Control-Connection-Reply: {reply}")
                result.missing = self.calls * self.packets
                return
            calls = []  # (index, our ID, server-side ID)
            for index in range(self.calls):
                ours = (self.call_id + index) & 0xFFFF
                try:
                    ocrp = client.call(self.timeout, call_id=ours, serial=index)
                except PeerError:
                    ocrp = None
                if ocrp is None or ocrp.result_code != pptp.OutgoingCallResult.CONNECTED:
                    result.errors.append(f"call {ours}: no connected Outgoing-Call-Reply: {ocrp}")
                    continue
                calls.append((index, ours, ocrp.call_id))
                result.call_ids.append(ours)
                result.server_ids.append(ocrp.call_id)
            result.missing = (self.calls - len(calls)) * self.packets
            self._exchange_gre(raw, calls, result)
            self._tear_down(client, calls, result)
        finally:
            client.close()

    def _exchange_gre(self, raw, calls, result):
        pending = {}  # payload -> our call ID it must come back with
        for index, ours, theirs in calls:
            for seq in range(self.packets):
                pending[payload_for(self.name, result.round_no, index, seq)] = ours
        received = set()
        for seq in range(self.packets):
            for index, ours, theirs in calls:
                raw.sendto(gre.build_gre(theirs, payload_for(self.name, result.round_no, index, seq), seq=seq),
                           (self.server[0], 0))
                result.sent += 1
            self.collect(raw, pending, received, result, 0)
            if self.interval:
                time.sleep(self.interval)
        deadline = time.monotonic() + self.timeout
        while len(received) < len(pending) and time.monotonic() < deadline:
            self.collect(raw, pending, received, result, min(0.05, deadline - time.monotonic()))
        # Stay a moment longer: anything foreign still on its way counts.  --hold keeps the
        # calls up longer still, so that other clients' calls overlap ours.
        end = time.monotonic() + max(self.linger, self.hold)
        while time.monotonic() < end:
            self.collect(raw, pending, received, result, end - time.monotonic())
        result.missing += len(pending) - len(received)

    def collect(self, raw, pending, received, result, timeout):
        """Read what is queued on the raw socket (waiting up to *timeout* for the first) and
        classify it: our echo, a duplicate, an ack, foreign, or not for this address."""
        wait = timeout
        while _readable(raw, wait):
            wait = 0.0
            frame = raw.recv(65535)
            try:
                src, dst, data = parse_ipv4_gre(frame)
                key, seq, ack, payload = gre.split_gre(data)
            except gre.GREError as e:
                result.foreign += 1
                result.foreign_samples.append(f"unparsable GRE: {e}")
                continue
            if dst != self.bind:
                continue  # another client's address in this namespace
            if seq is None:
                result.acks += 1
                continue
            if pending.get(payload) == key:
                if payload in received:
                    result.duplicates += 1
                else:
                    received.add(payload)
                    result.echoed += 1
                    result.echoed_by_call[key] = result.echoed_by_call.get(key, 0) + 1
            else:
                result.foreign += 1
                result.foreign_samples.append(f"from {src} key {key}: {payload[4:60]!r}")

    def _tear_down(self, client, calls, result):
        for index, ours, theirs in calls:
            try:
                client.clear(ours, self.timeout, lambda m, ours=ours, theirs=theirs: m.call_id in (ours, theirs))
            except PeerError:
                result.errors.append(f"call {ours}: no Call-Disconnect-Notify after Call-Clear-Request")
        try:
            client.stop(self.timeout)
        except PeerError:
            result.errors.append("no Stop-Control-Connection-Reply")


def client_report(client, results, loss_tolerance):
    """One JSON-able report of an EchoClient's rounds; ``ok`` only when complete and clean."""
    sent = sum(r.sent for r in results)
    echoed = sum(r.echoed for r in results)
    foreign = sum(r.foreign for r in results)
    missing = sum(r.missing for r in results)
    errors = [f"round {r.round_no}: {e}" for r in results for e in r.errors]
    expected = client.packets * client.calls * client.rounds
    allowed_missing = int(expected * loss_tolerance)
    ok = not errors and foreign == 0 and missing <= allowed_missing and echoed >= expected - allowed_missing
    return {"client": client.name, "bind": client.bind, "server": f"{client.server[0]}:{client.server[1]}",
            "ok": ok, "expected": expected, "sent": sent, "echoed": echoed, "foreign": foreign,
            "missing": missing, "duplicates": sum(r.duplicates for r in results),
            "server_ids": [r.server_ids for r in results], "errors": errors,
            "rounds": [r.as_dict() for r in results]}


def echo_calls(raw, server, bind, calls, packets=5, timeout=3.0, round_no=1, name=None):
    """GRE on each of *calls* ((our call ID, the ID the far side gave it), ...) from *bind* to
    *server*, as one round of an :class:`EchoClient` on a control connection the caller drives;
    returns {our call ID: echoes that came back with it} (every call is a key)."""
    client = EchoClient(server, bind, packets=packets, timeout=timeout, interval=0.0,
                        name=name or bind, linger=0.05)
    result = RoundResult(round_no)
    client._exchange_gre(raw, [(i, ours, theirs) for i, (ours, theirs) in enumerate(calls)], result)
    return {ours: result.echoed_by_call.get(ours, 0) for ours, _ in calls}


def run_client(args):
    client = EchoClient(parseHostPort(args.server, pptp.PPTP_PORT), args.bind, call_id=args.call_id,
                        packets=args.packets, calls=args.calls, rounds=args.rounds,
                        timeout=args.timeout, interval=args.interval, name=args.name,
                        linger=args.linger, hold=args.hold, start_delay=args.start_delay)
    report = client_report(client, client.run(), args.loss_tolerance)
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


# --------------------------------------------------------------------------------------------
# asyncio: many client sessions at once (benchmarks)


class Sessions:
    """Open PNS control connections: ``calls`` is a list of (client call ID, server call ID)."""

    def __init__(self):
        self.calls, self.writers, self.setup_seconds, self.failures = [], [], 0.0, []

    @property
    def keys(self):
        """GRE keys for client->server traffic: the call IDs the server side gave us."""
        return [server_id for _, server_id in self.calls]

    def close(self):
        for writer in self.writers:
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self.writers = []


async def _one_session(make_socket, address, call_id, timeout):
    """SCCRQ -> SCCRP, OCRQ -> OCRP on a new connection; (writer, the server side's call ID)."""
    sock = make_socket()
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, address), timeout)
    reader, writer = await asyncio.open_connection(sock=sock)
    decoder = pptp.PPTPStreamDecoder()

    async def ask(message, kind, ok):
        writer.write(message.pack())
        while True:
            data = await asyncio.wait_for(reader.read(4096), timeout)
            if not data:
                raise PeerError(f"closed while waiting for {kind.NAME}")
            for reply in decoder.feed(data):
                if isinstance(reply, kind):
                    if reply.result_code != ok:
                        writer.close()
                        raise PeerError(f"{kind.NAME} result {reply.result_code} error {reply.error_code}")
                    return reply

    await ask(start_request("bench-pns"), pptp.StartControlConnectionReply, pptp.StartResult.SUCCESS)
    reply = await ask(outgoing_call_request(call_id), pptp.OutgoingCallReply, pptp.OutgoingCallResult.CONNECTED)
    return writer, reply.call_id


async def _open(make_socket, address, count, concurrency, first_call_id, timeout):
    sessions = Sessions()
    gate = asyncio.Semaphore(concurrency)

    async def one(index):
        call_id = (first_call_id + index) % 65535 + 1
        async with gate:
            try:
                writer, server_id = await _one_session(make_socket, address, call_id, timeout)
            except (OSError, asyncio.TimeoutError, PeerError, pptp.PPTPError) as e:
                sessions.failures.append(f"{type(e).__name__}: {e}")
                return
        sessions.writers.append(writer)
        sessions.calls.append((call_id, server_id))

    start = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(count)))
    sessions.setup_seconds = time.monotonic() - start
    return sessions


def open_sessions(loop, make_socket, address, count, concurrency=64, first_call_id=0, timeout=10.0):
    """Open *count* control connections + one call each, *concurrency* at a time.

    *make_socket* returns a new TCP socket (create it inside the client namespace);
    *loop* is an asyncio event loop that the caller keeps for the sessions' lifetime.
    Returns a :class:`Sessions`; failures are listed, not raised.
    """
    return loop.run_until_complete(_open(make_socket, address, count, concurrency, first_call_id, timeout))


# --------------------------------------------------------------------------------------------
# a scripted LRP: mux frames over TLS (stdlib ssl)


class MuxPeer:
    """A hand-driven LRP end of the link: TLS with the given certificate, then raw mux frames.

    *cert*/*key* None connects without a client certificate.  ``handshake()`` finishes TLS
    (raising ssl.SSLError or OSError if the RRP refuses us); ``hello()`` swaps HELLOs.
    """

    def __init__(self, opener, address, ca, server_name, cert=None, key=None, timeout=5.0,
                 receive_buffer=None):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_verify_locations(ca)
        if cert:
            context.load_cert_chain(cert, key)
        raw = tcp_socket(opener)
        if receive_buffer:   # a small window: a peer that does not read fills the RRP's buffers
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
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
        """The next frame (of class *cls*, skipping PINGs/others); PeerError on EOF/timeout."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.decoder.nextFrame()
            if frame is not None:
                self.frames.append(frame)
                if cls is None or isinstance(frame, cls):
                    return frame
                continue
            if self.eof or time.monotonic() > deadline:
                raise PeerError(f"no {getattr(cls, '__name__', 'frame')} from the RRP within {timeout} s"
                                f" (eof={self.eof}; got {self.frames!r})")
            self._read(deadline)

    def _read(self, deadline):
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
# the command line


def build_parser():
    p = argparse.ArgumentParser(prog="python -m tests.support.pptppeers",
                                description="Scripted PPTP peers (control + raw GRE) for tests and benchmarks.")
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server", help="answer control messages and echo GRE")
    s.add_argument("--listen", required=True, metavar="HOST[:PORT]")
    s.add_argument("--first-call-id", type=int, default=1, help="first call ID handed out [default: 1]")
    s.add_argument("--mirror-call-ids", action="store_true",
                   help="answer with the peer's own call ID when free (IDs equal on both sides)")
    s.add_argument("--status", metavar="FILE", help="write a JSON status here (SIGUSR1, SIGTERM, exit)")
    s.add_argument("--no-gre", action="store_true", help="control only: no raw socket, no echoes")
    s.add_argument("--announce", action="store_true", help="print 'call OURS PEER' for every call answered")
    s.add_argument("--calls-per-connection", type=int, default=None, metavar="N",
                   help="take N calls per control connection and close it on one more, as pptpd "
                        "(poptop) does with N=1 [default: no limit]")
    c = sub.add_parser("client", help="place calls, send GRE, check the echoes")
    c.add_argument("--server", required=True, metavar="HOST[:PORT]")
    c.add_argument("--bind", required=True, metavar="ADDR", help="local address for TCP and GRE")
    c.add_argument("--call-id", type=int, default=1, help="our first call ID [default: 1]")
    c.add_argument("--packets", type=int, default=10, help="GRE packets per call [default: 10]")
    c.add_argument("--calls", type=int, default=1, help="calls per control connection [default: 1]")
    c.add_argument("--rounds", type=int, default=1, help="control connections one after another [default: 1]")
    c.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a reply or the echoes")
    c.add_argument("--interval", type=float, default=0.001, help="pause between GRE bursts (s)")
    c.add_argument("--linger", type=float, default=0.2, help="seconds to keep listening for strays")
    c.add_argument("--hold", type=float, default=0.0, help="seconds to keep the calls up before clearing")
    c.add_argument("--start-delay", type=float, default=0.0,
                   help="seconds between connecting and sending Start-Control-Connection-Request")
    c.add_argument("--loss-tolerance", type=float, default=0.0, help="fraction of echoes allowed missing")
    c.add_argument("--name", help="name in payloads and the report [default: --bind]")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_server(args) if args.role == "server" else run_client(args)


if __name__ == "__main__":
    sys.exit(main())
