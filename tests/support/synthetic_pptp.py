"""Synthetic PPTP peers for the end-to-end tests: scripted control messages, real raw-socket GRE.

No PPP runs here: GRE payloads are test bytes that merely look like PPP (``ff 03`` first) and
name who sent them, so a client can tell its own echoes from anybody else's.

``python -m tests.support.synthetic_pptp server --listen HOST[:PORT] --status FILE [--first-call-id N]``
    Answers the control messages a PPTP client sends (as pptpd would: its own call IDs from a
    counter, Call-Disconnect-Notify carrying its own ID) and echoes every GRE data packet of one
    of its calls back to the sender.  Like pptpd, GRE is only accepted from the address of that
    call's control connection and with one of its own call IDs; everything else is counted as
    dropped.  It writes a JSON status to FILE once listening, on SIGUSR1, on SIGTERM and at exit.

``python -m tests.support.synthetic_pptp client --server HOST[:PORT] --bind ADDR [--call-id N] ...``
    Opens a control connection from ADDR, places M calls (IDs N, N+1, ...), sends K GRE packets
    per call keyed with the ID the server side gave it, collects the GRE addressed to ADDR, clears
    the calls and stops the connection; R rounds on fresh connections.  Prints one JSON line and
    exits 0 only when every echo came back (within ``--loss-tolerance``) and nothing foreign did.

Both use plain blocking sockets, select and (server) one thread per control connection.
"""
import argparse
import json
import os
import select
import signal
import socket
import sys
import threading
import time

from routeproxy import gre, pptp

PPP_LIKE = b"\xff\x03\x00\x21"  # address, control, protocol IPv4: what a PPP frame starts with
RAW_BUFFER = 4 * 1024 * 1024


def parse_hostport(text, default_port=pptp.PPTP_PORT):
    """"HOST" or "HOST:PORT" -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    return host, int(port)


def open_raw_gre(bind_address=None):
    """A raw IPPROTO_GRE socket; bound, it only sees GRE addressed to *bind_address* and sends from it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, gre.IPPROTO_GRE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RAW_BUFFER)
    except OSError:
        pass
    if bind_address:
        sock.bind((bind_address, 0))
    return sock


class ControlChannel:
    """One control connection: send messages, wait for a kind of message, answer Echo-Requests."""

    def __init__(self, sock):
        self.sock = sock
        self.decoder = pptp.PPTPStreamDecoder()
        self.inbox = []
        self.unexpected = []  # messages that arrived while waiting for something else
        self.closed = False

    def send(self, msg):
        self.sock.sendall(msg.pack())

    def read(self, timeout):
        """Wait up to *timeout* for bytes and decode them; False on timeout or EOF."""
        ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not ready:
            return False
        data = self.sock.recv(65536)
        if not data:
            self.closed = True
            return False
        self.inbox.extend(self.decoder.feed(data))
        return True

    def expect(self, cls, timeout, match=lambda msg: True):
        """The next *cls* message accepted by *match*, or None after *timeout* seconds or on EOF."""
        deadline = time.monotonic() + timeout
        while True:
            while self.inbox:
                msg = self.inbox.pop(0)
                if isinstance(msg, pptp.EchoRequest):
                    self.send(pptp.EchoReply(identifier=msg.identifier, result_code=pptp.EchoResult.OK))
                elif isinstance(msg, cls) and match(msg):
                    return msg
                else:
                    self.unexpected.append(msg)
            if self.closed or not self.read(deadline - time.monotonic()):
                if self.closed or time.monotonic() >= deadline:
                    return None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# server


class ServerCall:
    """A call the server accepted: its own ID, the peer's ID and the control connection's peer."""

    def __init__(self, call_id, peer_call_id, peer_address, connection):
        self.call_id = call_id
        self.peer_call_id = peer_call_id
        self.peer_address = peer_address
        self.connection = connection
        self.gre_in = 0
        self.echoed = 0
        self.next_seq = 0
        self.opened = time.monotonic()
        self.closed = None

    def as_dict(self):
        return {"call_id": self.call_id, "peer_call_id": self.peer_call_id, "peer": self.peer_address,
                "connection": self.connection, "gre_in": self.gre_in, "echoed": self.echoed,
                "opened": self.opened, "closed": self.closed}


class SyntheticServer:
    """State of the synthetic PPTP server: calls by own ID, counters; thread-safe."""

    def __init__(self, host, port=pptp.PPTP_PORT, first_call_id=1, status_path=None, mirror=False):
        self.host, self.port = host, port
        self.mirror = mirror  # hand out the peer's own call ID when free (worst case for a shared host)
        self.status_path = status_path
        self.lock = threading.Lock()
        self.next_call_id = first_call_id
        self.calls = {}          # own call ID -> ServerCall (active)
        self.calls_seen = []     # every ServerCall ever accepted, in order
        self.connections = 0
        self.connections_open = 0
        self.control = {}        # message name -> count received
        self.gre_echoed = 0
        self.acks = 0
        self.dropped = {}        # reason -> count
        self.errors = []
        self.generation = 0
        self.stopping = threading.Event()

    # -- call IDs ------------------------------------------------------------------------------

    def allocate(self, peer_call_id, peer_address, connection):
        with self.lock:
            if self.mirror and peer_call_id and peer_call_id not in self.calls:
                call = ServerCall(peer_call_id, peer_call_id, peer_address, connection)
                self.calls[peer_call_id] = call
                self.calls_seen.append(call)
                return call
            for _ in range(0xFFFF):
                call_id = self.next_call_id
                self.next_call_id = self.next_call_id % 0xFFFF + 1  # 1..65535, wraps
                if call_id not in self.calls:
                    call = ServerCall(call_id, peer_call_id, peer_address, connection)
                    self.calls[call_id] = call
                    self.calls_seen.append(call)
                    return call
        return None

    def release(self, call):
        with self.lock:
            if self.calls.get(call.call_id) is call:
                del self.calls[call.call_id]
                call.closed = time.monotonic()

    def _count(self, table, key):
        with self.lock:
            table[key] = table.get(key, 0) + 1

    # -- status -------------------------------------------------------------------------------

    def status(self):
        with self.lock:
            seen = [c.as_dict() for c in self.calls_seen]
            return {
                "listen": f"{self.host}:{self.port}",
                "pid": os.getpid(),
                "generation": self.generation,
                "connections": self.connections,
                "connections_open": self.connections_open,
                "control": dict(self.control),
                "calls_seen": seen,
                "peer_call_ids": [c["peer_call_id"] for c in seen],
                "active_calls": sorted(self.calls),
                "gre_echoed": self.gre_echoed,
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

    # -- control ------------------------------------------------------------------------------

    def serve_control(self, sock, peer, number):
        """Answer one control connection until it stops or closes; free its calls."""
        channel = ControlChannel(sock)
        mine = {}  # peer call ID -> ServerCall, this connection's calls
        try:
            while not self.stopping.is_set():
                try:
                    if not channel.read(0.5):
                        if channel.closed:
                            break
                        continue
                except pptp.PPTPError as e:
                    with self.lock:
                        self.errors.append(f"connection {number} from {peer}: {e}")
                    break
                while channel.inbox:
                    msg = channel.inbox.pop(0)
                    self._count(self.control, msg.NAME)
                    if not self._answer(channel, msg, peer, number, mine):
                        return
        except OSError as e:
            with self.lock:
                self.errors.append(f"connection {number} from {peer}: {e}")
        finally:
            for call in mine.values():
                self.release(call)
            channel.close()
            with self.lock:
                self.connections_open -= 1

    def _answer(self, channel, msg, peer, number, mine):
        """Reply to one message; False when the connection is to close."""
        if isinstance(msg, pptp.StartControlConnectionRequest):
            channel.send(pptp.StartControlConnectionReply(
                result_code=pptp.StartResult.SUCCESS, framing_capabilities=pptp.FRAMING_ASYNC,
                bearer_capabilities=pptp.BEARER_ANALOG, maximum_channels=0xFFFF,
                host_name=b"synthetic", vendor_string=b"routeproxy tests"))
        elif isinstance(msg, pptp.OutgoingCallRequest):
            call = self.allocate(msg.call_id, peer, number)
            if call is None:
                channel.send(pptp.OutgoingCallReply(
                    peer_call_id=msg.call_id, result_code=pptp.OutgoingCallResult.GENERAL_ERROR,
                    error_code=pptp.ErrorCode.NO_RESOURCE))
                return True
            if msg.call_id in mine:  # the peer reused its ID on this connection: the old call is gone
                self.release(mine.pop(msg.call_id))
            mine[msg.call_id] = call
            channel.send(pptp.OutgoingCallReply(
                call_id=call.call_id, peer_call_id=msg.call_id,
                result_code=pptp.OutgoingCallResult.CONNECTED, connect_speed=100000000,
                packet_recv_window_size=64))
        elif isinstance(msg, pptp.EchoRequest):
            channel.send(pptp.EchoReply(identifier=msg.identifier, result_code=pptp.EchoResult.OK))
        elif isinstance(msg, pptp.CallClearRequest):
            call = mine.pop(msg.call_id, None)
            if call is None:
                with self.lock:
                    self.errors.append(f"connection {number}: Call-Clear-Request for unknown call {msg.call_id}")
                return True
            self.release(call)
            channel.send(pptp.CallDisconnectNotify(
                call_id=call.call_id, result_code=pptp.DisconnectResult.REQUEST))
        elif isinstance(msg, pptp.StopControlConnectionRequest):
            channel.send(pptp.StopControlConnectionReply(result_code=pptp.StopResult.OK))
            return False
        return True  # Set-Link-Info, WAN-Error-Notify, replies: counted, nothing to answer

    def accept_loop(self, listener):
        while not self.stopping.is_set():
            ready, _, _ = select.select([listener], [], [], 0.2)
            if not ready:
                continue
            try:
                sock, (peer, _) = listener.accept()
            except OSError:
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.connections += 1
                self.connections_open += 1
                number = self.connections
            threading.Thread(target=self.serve_control, args=(sock, peer, number), daemon=True).start()

    # -- GRE ----------------------------------------------------------------------------------

    def handle_gre(self, frame, raw):
        """Echo one received IPv4+GRE frame if it belongs to a call, else count why not."""
        try:
            src, dst, data = gre.parse_ipv4_gre(frame)
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

    def gre_loop(self, raw):
        while not self.stopping.is_set():
            ready, _, _ = select.select([raw], [], [], 0.2)
            if ready:
                try:
                    frame = raw.recv(65535)
                except OSError:
                    continue
                self.handle_gre(frame, raw)


def run_server(args):
    host, port = parse_hostport(args.listen)
    server = SyntheticServer(host, port, first_call_id=args.first_call_id, status_path=args.status,
                             mirror=args.mirror_call_ids)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(128)
    raw = open_raw_gre(host)

    def on_term(signum, frame):
        server.stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGUSR1, lambda signum, frame: server.write_status())
    threading.Thread(target=server.gre_loop, args=(raw,), daemon=True).start()
    server.write_status()
    print(f"listening {host}:{port}", flush=True)
    try:
        server.accept_loop(listener)
    finally:
        server.stopping.set()
        server.write_status()
    return 0


# --------------------------------------------------------------------------------------------
# client


def payload_for(name, round_no, call_index, seq):
    """Test bytes that look like PPP and name exactly one (client, round, call, seq)."""
    return PPP_LIKE + f"synthetic {name} r{round_no} c{call_index} s{seq}".encode()


class RoundResult:
    def __init__(self, round_no):
        self.round_no = round_no
        self.call_ids = []         # our IDs
        self.server_ids = []       # the IDs the server side told us (OCRP Call ID)
        self.sent = 0
        self.echoed = 0
        self.duplicates = 0
        self.foreign = 0
        self.acks = 0
        self.missing = 0
        self.errors = []
        self.foreign_samples = []
        self.start_reply = None    # [result code, error code] of Start-Control-Connection-Reply

    def as_dict(self):
        return {"round": self.round_no, "start_reply": self.start_reply, "call_ids": self.call_ids, "server_ids": self.server_ids,
                "sent": self.sent, "echoed": self.echoed, "duplicates": self.duplicates,
                "foreign": self.foreign, "acks": self.acks, "missing": self.missing,
                "errors": self.errors, "foreign_samples": self.foreign_samples[:5]}


class SyntheticClient:
    def __init__(self, server, bind, call_id=1, packets=10, calls=1, rounds=1, timeout=5.0,
                 interval=0.001, name=None, linger=0.2, hold=0.0, start_delay=0.0):
        self.server = server
        self.bind = bind
        self.call_id = call_id
        self.packets = packets
        self.calls = calls
        self.rounds = rounds
        self.timeout = timeout
        self.interval = interval
        self.linger = linger
        self.hold = hold
        self.start_delay = start_delay
        self.name = name or bind

    def run(self):
        results = []
        raw = open_raw_gre(self.bind)
        try:
            for round_no in range(1, self.rounds + 1):
                result = RoundResult(round_no)
                try:
                    self._round(raw, result)
                except (OSError, pptp.PPTPError, gre.GREError) as e:
                    result.errors.append(f"{type(e).__name__}: {e}")
                results.append(result)
        finally:
            raw.close()
        return results

    def _round(self, raw, result):
        sock = socket.create_connection(self.server, timeout=self.timeout, source_address=(self.bind, 0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(True)
        sock.settimeout(None)
        channel = ControlChannel(sock)
        try:
            if self.start_delay:  # a slow client: the connection is open, nothing sent yet
                time.sleep(self.start_delay)
            channel.send(pptp.StartControlConnectionRequest(
                framing_capabilities=pptp.FRAMING_ASYNC, bearer_capabilities=pptp.BEARER_ANALOG,
                host_name=self.name.encode()[:64], vendor_string=b"routeproxy synthetic client"))
            reply = channel.expect(pptp.StartControlConnectionReply, self.timeout)
            if reply is not None:
                result.start_reply = [reply.result_code, reply.error_code]
            elif channel.closed:
                result.errors.append("connection closed without a Start-Control-Connection-Reply")
            if reply is None or reply.result_code != pptp.StartResult.SUCCESS:
                result.errors.append(f"no successful Start-Control-Connection-Reply: {reply}")
                result.missing = self.calls * self.packets
                return
            calls = []  # (index, our ID, server-side ID)
            for index in range(self.calls):
                ours = (self.call_id + index) & 0xFFFF
                channel.send(pptp.OutgoingCallRequest(
                    call_id=ours, call_serial_number=index, minimum_bps=300, maximum_bps=100000000,
                    bearer_type=pptp.BEARER_ANALOG, framing_type=pptp.FRAMING_ASYNC,
                    packet_recv_window_size=64))
                ocrp = channel.expect(pptp.OutgoingCallReply, self.timeout,
                                      lambda m, ours=ours: m.peer_call_id == ours)
                if ocrp is None or ocrp.result_code != pptp.OutgoingCallResult.CONNECTED:
                    result.errors.append(f"call {ours}: no connected Outgoing-Call-Reply: {ocrp}")
                    continue
                calls.append((index, ours, ocrp.call_id))
                result.call_ids.append(ours)
                result.server_ids.append(ocrp.call_id)
            result.missing = (self.calls - len(calls)) * self.packets
            self._exchange_gre(raw, calls, result)
            self._tear_down(channel, calls, result)
        finally:
            channel.close()

    def _exchange_gre(self, raw, calls, result):
        pending = {}  # payload -> our call ID it must come back with
        for index, ours, theirs in calls:
            for seq in range(self.packets):
                pending[payload_for(self.name, result.round_no, index, seq)] = ours
        received = set()
        drain = lambda: self._receive(raw, pending, received, result, 0)
        for seq in range(self.packets):
            for index, ours, theirs in calls:
                raw.sendto(gre.build_gre(theirs, payload_for(self.name, result.round_no, index, seq), seq=seq),
                           (self.server[0], 0))
                result.sent += 1
            drain()
            if self.interval:
                time.sleep(self.interval)
        deadline = time.monotonic() + self.timeout
        while len(received) < len(pending) and time.monotonic() < deadline:
            self._receive(raw, pending, received, result, min(0.05, deadline - time.monotonic()))
        # Stay a moment longer: anything foreign still on its way counts.  --hold keeps the
        # calls up longer still, so that other clients' calls overlap ours.
        end = time.monotonic() + max(self.linger, self.hold)
        while time.monotonic() < end:
            self._receive(raw, pending, received, result, end - time.monotonic())
        result.missing += len(pending) - len(received)

    def _receive(self, raw, pending, received, result, timeout):
        """Read what is queued on the raw socket (waiting up to *timeout* for the first)."""
        wait = max(0.0, timeout)
        while True:
            ready, _, _ = select.select([raw], [], [], wait)
            if not ready:
                return
            wait = 0.0
            frame = raw.recv(65535)
            try:
                src, dst, data = gre.parse_ipv4_gre(frame)
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
            else:
                result.foreign += 1
                result.foreign_samples.append(f"from {src} key {key}: {payload[4:60]!r}")

    def _tear_down(self, channel, calls, result):
        for index, ours, theirs in calls:
            channel.send(pptp.CallClearRequest(call_id=ours))
            cdn = channel.expect(pptp.CallDisconnectNotify, self.timeout,
                                 lambda m, ours=ours, theirs=theirs: m.call_id in (ours, theirs))
            if cdn is None:
                result.errors.append(f"call {ours}: no Call-Disconnect-Notify after Call-Clear-Request")
        channel.send(pptp.StopControlConnectionRequest(reason=pptp.StopReason.NONE))
        if channel.expect(pptp.StopControlConnectionReply, self.timeout) is None:
            result.errors.append("no Stop-Control-Connection-Reply")


def client_report(client, results, loss_tolerance):
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


def run_client(args):
    client = SyntheticClient(parse_hostport(args.server), args.bind, call_id=args.call_id,
                             packets=args.packets, calls=args.calls, rounds=args.rounds,
                             timeout=args.timeout, interval=args.interval, name=args.name,
                             linger=args.linger, hold=args.hold, start_delay=args.start_delay)
    report = client_report(client, client.run(), args.loss_tolerance)
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


def build_parser():
    p = argparse.ArgumentParser(prog="python -m tests.support.synthetic_pptp",
                                description="Synthetic PPTP peers (control + raw GRE) for tests.")
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server", help="answer control messages and echo GRE")
    s.add_argument("--listen", required=True, metavar="HOST[:PORT]")
    s.add_argument("--first-call-id", type=int, default=1, help="first call ID handed out [default: 1]")
    s.add_argument("--mirror-call-ids", action="store_true",
                   help="answer with the peer's own call ID when free (IDs equal on both sides)")
    s.add_argument("--status", metavar="FILE", help="write a JSON status here (SIGUSR1, SIGTERM, exit)")
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
