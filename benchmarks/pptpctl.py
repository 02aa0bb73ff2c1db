"""Synthetic PPTP control peers for the benchmark: many sessions, no PPP.

* ``python -m benchmarks.pptpctl serve --listen HOST:PORT``: a PAC (pptpd stand-in) that
  answers Start-Control-Connection, Outgoing-Call (handing out its own call IDs from 1 up),
  Echo, Call-Clear and Stop on any number of connections.  GRE is not its business (the
  benchmark's sink counts it).
* :func:`open_sessions`: a PNS side that opens *count* control connections, each
  SCCRQ -> SCCRP, OCRQ -> OCRP, and returns the Call ID the server side gave it (the GRE key
  to send with) and how long the set-ups took.  The connections stay open until
  :meth:`Sessions.close`.

Only the control messages are real; the GRE traffic comes from ``benchmarks.loadgen``.
"""
import argparse
import asyncio
import contextlib
import socket
import sys
import time

from routeproxy import pptp


class ControlError(Exception):
    """A control exchange failed (refused, closed, or answered with an error result)."""


def _start_reply():
    return pptp.StartControlConnectionReply(result_code=1, framing_capabilities=pptp.FRAMING_SYNC,
                                            bearer_capabilities=pptp.BEARER_DIGITAL,
                                            maximum_channels=65535, host_name=b"bench-pac")


class PacServer:
    """The pptpd stand-in: one call-ID counter for all connections, as pptpd per host."""

    def __init__(self, announce=None):
        self.next_id = 1
        self.calls = {}      # our call ID -> the peer's call ID
        self.connections = 0
        self.announce = announce  # called with (our ID, peer's ID) for every call answered

    def reply_to(self, msg):
        """The answers to one message (a list; empty for messages needing none)."""
        if isinstance(msg, pptp.StartControlConnectionRequest):
            return [_start_reply()]
        if isinstance(msg, pptp.OutgoingCallRequest):
            call_id = self.next_id
            self.next_id = self.next_id % 65535 + 1
            self.calls[call_id] = msg.call_id
            if self.announce:
                self.announce(call_id, msg.call_id)
            return [pptp.OutgoingCallReply(call_id=call_id, peer_call_id=msg.call_id, result_code=1,
                                           connect_speed=100_000_000, packet_recv_window_size=64)]
        if isinstance(msg, pptp.EchoRequest):
            return [pptp.EchoReply(identifier=msg.identifier, result_code=1)]
        if isinstance(msg, pptp.CallClearRequest):
            mine = [k for k, v in self.calls.items() if v == msg.call_id]
            for k in mine:
                del self.calls[k]
            return [pptp.CallDisconnectNotify(call_id=mine[0] if mine else 0, result_code=3)]
        if isinstance(msg, pptp.StopControlConnectionRequest):
            return [pptp.StopControlConnectionReply(result_code=1)]
        return []

    async def handle(self, reader, writer):
        self.connections += 1
        decoder = pptp.PPTPStreamDecoder()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                for msg in decoder.feed(data):
                    for answer in self.reply_to(msg):
                        writer.write(answer.pack())
                    if isinstance(msg, pptp.StopControlConnectionRequest):
                        await writer.drain()
                        return
        except (pptp.PPTPError, ConnectionError):
            pass
        finally:
            self.connections -= 1
            writer.close()


async def serve(host, port, ready=None, announce=None):
    """Serve PPTP control connections on (host, port) until cancelled."""
    pac = PacServer(announce)
    server = await asyncio.start_server(pac.handle, host, port, backlog=4096, reuse_address=True)
    if ready:
        ready()
    async with server:
        await server.serve_forever()


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
    sock = make_socket()
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_connect(sock, address), timeout)
    reader, writer = await asyncio.open_connection(sock=sock)
    decoder = pptp.PPTPStreamDecoder()

    async def expect(kind):
        while True:
            data = await asyncio.wait_for(reader.read(4096), timeout)
            if not data:
                raise ControlError(f"closed while waiting for {kind.NAME}")
            for msg in decoder.feed(data):
                if isinstance(msg, kind):
                    return msg

    writer.write(pptp.StartControlConnectionRequest(framing_capabilities=pptp.FRAMING_SYNC,
                                                    bearer_capabilities=pptp.BEARER_DIGITAL,
                                                    host_name=b"bench-pns").pack())
    reply = await expect(pptp.StartControlConnectionReply)
    if reply.result_code != 1:
        writer.close()
        raise ControlError(f"SCCRP result {reply.result_code} error {reply.error_code}")
    writer.write(pptp.OutgoingCallRequest(call_id=call_id, call_serial_number=call_id,
                                          minimum_bps=300, maximum_bps=100_000_000,
                                          bearer_type=3, framing_type=3,
                                          packet_recv_window_size=64).pack())
    reply = await expect(pptp.OutgoingCallReply)
    if reply.result_code != 1:
        writer.close()
        raise ControlError(f"OCRP result {reply.result_code} error {reply.error_code}")
    return writer, reply.call_id


async def _open(make_socket, address, count, concurrency, first_call_id, timeout):
    sessions = Sessions()
    gate = asyncio.Semaphore(concurrency)

    async def one(index):
        call_id = (first_call_id + index) % 65535 + 1
        async with gate:
            try:
                writer, server_id = await _one_session(make_socket, address, call_id, timeout)
            except (OSError, asyncio.TimeoutError, ControlError, pptp.PPTPError) as e:
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


class PacProcess:
    """The synthetic PAC running in a namespace, and the calls it has answered.

    It prints ``call OURS PEER`` per Outgoing-Call-Reply; a thread reads them (so its pipe
    never fills) into ``peer_ids``: the IDs the PAC sends GRE to (the key for server->client).
    """

    def __init__(self, lab, ns, address, port, env, cwd):
        import subprocess
        import threading
        self.proc = lab.spawn(ns, [sys.executable, "-m", "benchmarks.pptpctl", "serve",
                                   "--listen", f"{address}:{port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise ControlError(f"synthetic PAC did not start: {line!r} {self.proc.stderr.read()[-500:]}")
        self.calls = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "call":
                self.calls[int(parts[1])] = int(parts[2])

    def peer_ids(self, expected, timeout=5.0):
        """The peers' call IDs of every call so far, once at least *expected* are known."""
        deadline = time.monotonic() + timeout
        while len(self.calls) < expected and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.calls.values())


def tcp_socket():
    """A plain TCP socket (a default *make_socket*)."""
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


def _host_port(text, default_port=pptp.PPTP_PORT):
    host, _, port = text.rpartition(":")
    if not host:
        return text, default_port
    return host, int(port)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pptpctl")
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="a synthetic pptpd (control connections only)")
    srv.add_argument("--listen", default="0.0.0.0:1723")
    args = parser.parse_args(argv)
    host, port = _host_port(args.listen)
    try:
        asyncio.run(serve(host, port, ready=lambda: print("ready", flush=True),
                          announce=lambda ours, peer: print(f"call {ours} {peer}", flush=True)))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
