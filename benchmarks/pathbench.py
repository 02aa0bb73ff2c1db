"""The per-packet path in one process: GRE in -> mux frame -> TLS -> mux frame -> GRE out.

``python -m benchmarks.pathbench [--packets N] [--size 64|512|1400] [--batch B] [--profile]``

No sockets for GRE and no pcap: a real :class:`~routeproxy.lrp.LocalRouteProxy` and
:class:`~routeproxy.rrp.RemoteRouteProxy` with a call set up through their CallBooks (as
tests/support/relay.py does: scripted PPTP peers on StringTransports, the RRP's dial to pptpd
completed by hand), joined

* ``memory``: two MuxProtocols whose transports hand their bytes to each other (one
  ``dataReceived`` per hand-over, like one TCP read); the mux's end-of-turn flush runs on a
  MemoryReactorClock;
* ``tls``: two MuxProtocols over real mutual TLS on 127.0.0.1 (the real reactor,
  routeproxy.tls, certificates from routeproxy.certs.write_lab_certs).

N GRE packets go in through ``lrp.relay.demux.greReceived`` in batches of B (one pcap wake-up hands the
daemon up to ``GREPort.maxPacketsPerRead`` packets) and are counted at the RRP's GRE port
(``routeproxy.testing.RecordingGREPort`` counting only, a fake: nothing is sent); then the
reverse direction through ``rrp.relay.demux.greReceived``.  Each stage is also timed alone (split_gre, the mux encode, the mux
decode, build_gre), with two baselines in the same run: a loop that only copies the payload,
and the same payloads through TLS alone (pyOpenSSL memory BIOs, no mux, no sockets), one
TLS record per packet and one per batch.

This is not a test: it prints ns/packet and packets/s.  docs/perf-path.md has the method and
the figures.
"""
import argparse
import cProfile
import gc
import os
import platform
import pstats
import sys
import tempfile
import time

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from routeproxy import certs, gre, pptp, tls
from routeproxy.lrp import LinkFactory, LocalRouteProxy, PPTPServerFactory
from routeproxy.mux.connection import MuxConfig, MuxConnection
from routeproxy.mux.protocol import MuxServerFactory
from routeproxy.rrp import RemoteRouteProxy
from routeproxy.testing import RecordingGREPort, RecordingSessionReceiver, memoryTLSPair

CLIENT_IP, LRP_IP, RRP_SOURCE, SERVER_IP = "10.0.0.5", "10.0.1.1", "10.0.3.1", "10.0.4.2"
RRP_NAME, LRP_NAME = "rrp.bench.test", "lrp.bench.test"
PPP_HEAD = b"\xff\x03\x00\x21"  # PPP address/control + IPv4: what a real payload starts with


# --- fakes ---------------------------------------------------------------------------------

class HandOverTransport:
    """One end of an in-memory link (a fake TCP/TLS transport): writes wait for pump()."""

    def __init__(self, host, peer):
        self.pending = []
        self.writes = 0
        self.host, self.peer = host, peer

    def write(self, data):
        self.writes += 1
        self.pending.append(data)

    def writeSequence(self, chunks):
        self.writes += 1
        self.pending.extend(chunks)

    def take(self):
        data, self.pending = b"".join(self.pending), []
        return data

    def registerProducer(self, producer, streaming):
        pass

    def unregisterProducer(self):
        pass

    def loseConnection(self):
        pass

    abortConnection = loseConnection

    def getHost(self):
        return self.host

    def getPeer(self):
        return self.peer


class NullLink:
    """The link a lone MuxConnection writes through (the mux encode stage): keeps the bytes."""

    def __init__(self):
        self.chunks = []

    def writeFrames(self, chunks):
        self.chunks.extend(chunks)

    def sendBufferSize(self):
        return 0

    def loseConnection(self):
        pass

    abortConnection = loseConnection


# --- helpers -------------------------------------------------------------------------------

def gre_packets(n, size, call_id):
    """*n* GRE data packets of *size* bytes in all (header included), seq 1.., ack alternating."""
    payload_len = max(0, size - 16)
    body = (PPP_HEAD * (payload_len // 4 + 1))[:payload_len]
    return [gre.build_gre(call_id, body, seq=i + 1, ack=(i if i % 2 else None))
            for i in range(n)]


REPEAT = 3  # each stage runs this many times; the fastest run is reported (a VM is noisy)
# What a stage is timed with: wall time, or this process's CPU time (--cpu-time), which other
# processes on a loaded machine disturb far less (the in-memory stages use one thread).
CLOCK = time.perf_counter


def timed(fn, repeat=None):
    """(seconds of the fastest of *repeat* runs of fn(), its result), the collector off."""
    best = result = None
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat or REPEAT):
            start = CLOCK()
            result = fn()
            elapsed = CLOCK() - start
            best = elapsed if best is None else min(best, elapsed)
        return best, result
    finally:
        if enabled:
            gc.enable()


class Results:
    def __init__(self):
        self.rows = []

    def add(self, name, seconds, packets, note=""):
        self.rows.append((name, seconds, packets, note))
        ns = seconds / packets * 1e9 if packets else float("nan")
        pps = packets / seconds if seconds else float("nan")
        print(f"  {name:<56} {ns:>9.0f} ns/pkt {pps:>12,.0f} pkt/s  {note}", flush=True)


def counting(receiver):
    """A GRE port that only counts what it would send (routeproxy.testing's fake)."""
    return RecordingGREPort(receiver, record=False)


# --- the daemons joined in memory ----------------------------------------------------------

class Pair:
    """An LRP and an RRP with one client's call set up through their CallBooks.

    Subclasses provide the link (``settle`` delivers everything in flight).
    """

    def build_daemons(self, lrp_reactor):
        self.dials = MemoryReactorClock()   # the RRP's TCP dials to pptpd are recorded here
        self.lrp = LocalRouteProxy(lrp_reactor, counting)
        self.rrp = RemoteRouteProxy(self.dials, counting, {"default": (SERVER_IP, 1723)})

    def setup_call(self):
        """Generator of settle() points; afterwards self.l_id / self.r_id are the keys."""
        addr = IPv4Address("TCP", CLIENT_IP, 40001)
        client = PPTPServerFactory(self.lrp).buildProtocol(addr)
        ct = StringTransport(hostAddress=IPv4Address("TCP", LRP_IP, 1723), peerAddress=addr)
        client.makeConnection(ct)
        # The LRP opens the upstream only after the client's Start-Control-Connection-Request.
        client.dataReceived(pptp.StartControlConnectionRequest().pack())
        yield
        host, port, factory = self.dials.tcpClients[-1][:3]
        server = factory.buildProtocol(IPv4Address("TCP", host, port))
        st = StringTransport(hostAddress=IPv4Address("TCP", RRP_SOURCE, 40001),
                             peerAddress=IPv4Address("TCP", SERVER_IP, 1723))
        server.makeConnection(st)
        yield
        dec = pptp.PPTPStreamDecoder()

        def received(transport):
            data = transport.value()
            transport.clear()
            return dec.feed(data)

        received(st)
        server.dataReceived(pptp.StartControlConnectionReply(result_code=1).pack())
        yield
        received(ct)
        client.dataReceived(pptp.OutgoingCallRequest(call_id=1).pack())
        yield
        [ocrq] = received(st)
        server.dataReceived(pptp.OutgoingCallReply(call_id=256, peer_call_id=ocrq.call_id,
                                                   result_code=1).pack())
        yield
        [ocrp] = received(ct)
        self.r_id, self.l_id = ocrq.call_id, ocrp.call_id
        self.client_transport, self.server_transport = ct, st


class MemoryPair(Pair):
    """The link is two HandOverTransports: one dataReceived per pump() hand-over."""

    def __init__(self):
        self.clock = MemoryReactorClock()
        self.build_daemons(self.clock)
        server_factory = MuxServerFactory(self.rrp.sessionRequested, clock=self.clock)
        client_factory = LinkFactory(self.lrp, self.clock)
        client_factory.peerNameOf = server_factory.peerNameOf = None  # no certificates here
        a, b = IPv4Address("TCP", "127.0.0.1", 1), IPv4Address("TCP", "127.0.0.1", 2)
        self.lrp_mux = client_factory.buildProtocol(b)
        self.rrp_mux = server_factory.buildProtocol(a)
        self.lrp_t, self.rrp_t = HandOverTransport(a, b), HandOverTransport(b, a)
        self.lrp_mux.makeConnection(self.lrp_t)
        self.rrp_mux.makeConnection(self.rrp_t)
        self.settle()
        for _ in self.setup_call():
            self.settle()

    def settle(self):
        advance, lt, rt = self.clock.advance, self.lrp_t, self.rrp_t
        lrp_in, rrp_in = self.lrp_mux.dataReceived, self.rrp_mux.dataReceived
        while True:
            advance(0)
            if not (lt.pending or rt.pending):
                return
            if lt.pending:
                rrp_in(lt.take())
            if rt.pending:
                lrp_in(rt.take())


def push_memory(pair, direction, packets, batch):
    """All *packets* through the joined daemons, *batch* per wake-up; returns delivered."""
    if direction == "lrp->rrp":
        receive, src, dst, port = pair.lrp.relay.demux.greReceived, CLIENT_IP, LRP_IP, pair.rrp.relay.grePort
    else:
        receive, src, dst, port = pair.rrp.relay.demux.greReceived, SERVER_IP, RRP_SOURCE, pair.lrp.relay.grePort
    before = port.sentCount
    settle = pair.settle
    for i in range(0, len(packets), batch):
        for data in packets[i:i + batch]:
            receive(src, dst, data)
        settle()
    return port.sentCount - before


# --- the daemons joined over real TLS on loopback -------------------------------------------

try:  # the GRE port marks each wake-up; a tree without routeproxy.turn (an A/B) does not
    from routeproxy.turn import begin as wake_up_begins, end as wake_up_ends
except ImportError:
    wake_up_begins = wake_up_ends = lambda: None  # noqa: E731

def run_tls(count, size, batch, results, window_packets):
    """The same path over real mutual TLS on 127.0.0.1, driven by the real reactor."""
    from twisted.internet import defer, reactor, task
    from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS

    certdir = tempfile.mkdtemp(prefix="pathbench-")
    paths = certs.write_lab_certs(certdir, RRP_NAME, [LRP_NAME])
    pair = Pair()
    pair.build_daemons(reactor)
    server_factory = MuxServerFactory(pair.rrp.sessionRequested, clock=reactor,
                                      peerNameOf=tls.peerName)
    port = reactor.listenSSL(0, server_factory,
                             tls.serverCreator(paths["rrp_cert"], paths["rrp_key"], paths["ca"]),
                             interface="127.0.0.1")
    endpoint = wrapClientTLS(
        tls.clientCreator(RRP_NAME, paths["lrp_cert"], paths["lrp_key"], paths["ca"]),
        TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
    outcome = {}
    writes = [0]

    def count_writes(mux_protocol):
        """Count the link's writeFrames calls (each is one TLS write of a turn's frames)."""
        write = mux_protocol.writeFrames

        def counted(chunks):
            writes[0] += 1
            write(chunks)
        mux_protocol.writeFrames = counted

    def sleep(t):
        return task.deferLater(reactor, t, lambda: None)

    @defer.inlineCallbacks
    def push(direction, packets):
        if direction == "lrp->rrp":
            receive, src, dst, gport = pair.lrp.relay.demux.greReceived, CLIENT_IP, LRP_IP, pair.rrp.relay.grePort
        else:
            receive, src, dst, gport = pair.rrp.relay.demux.greReceived, SERVER_IP, RRP_SOURCE, pair.lrp.relay.grePort
        sender = pair.lrp if direction == "lrp->rrp" else pair.rrp
        before, dropped_before = gport.sentCount, sender.relay.drops.total()
        sent = 0
        writes_before = writes[0]
        start, cpu_start = time.perf_counter(), time.process_time()
        deadline = start + 60
        n = len(packets)

        def outstanding():
            # what left the sender and has not arrived (drops are counted as they happen)
            return sent - (sender.relay.drops.total() - dropped_before) - (gport.sentCount - before)

        while sent < n and time.perf_counter() < deadline:
            # Closed loop: keep at most window_packets in flight, like a sender that paces
            # itself to what arrives (the mux drops GRE, it never queues it).
            if outstanding() < window_packets:
                wake_up_begins()  # one capture wake-up, as GREPort.doRead marks it
                try:
                    for data in packets[sent:sent + batch]:
                        receive(src, dst, data)
                finally:
                    wake_up_ends()
                sent = min(n, sent + batch)
            yield sleep(0)
        while outstanding() > 0 and time.perf_counter() < deadline:
            yield sleep(0)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        return elapsed, cpu, gport.sentCount - before, sent, writes[0] - writes_before

    @defer.inlineCallbacks
    def main():
        protocol = yield endpoint.connect(LinkFactory(pair.lrp, reactor))
        while pair.lrp.link is None:
            yield sleep(0.01)
        steps = pair.setup_call()
        for _ in steps:
            yield sleep(0.02)
        conn = protocol.connection
        for c in (conn, *server_factory.connections):
            count_writes(c._link)
        fwd = gre_packets(count, size, pair.l_id)
        rev = gre_packets(count, size, pair.r_id)
        for direction, packets in (("lrp->rrp", fwd), ("rrp->lrp", rev)):
            runs = []
            for _ in range(REPEAT):
                runs.append((yield push(direction, packets)))
            elapsed, cpu, delivered, sent, nwrites = min(runs)
            dropped = sum(c.stats.greDropped.total() for c in
                          (conn, *server_factory.connections))
            results.add(f"whole path, real TLS loopback, {direction}", elapsed, delivered,
                        f"({delivered}/{sent} delivered, {cpu / max(1, delivered) * 1e9:.0f} ns"
                        f" CPU/pkt, {nwrites} TLS writes; mux drops in all runs {dropped})")
            if delivered < sent:
                print(f"  drops: LRP {dict(pair.lrp.relay.drops.counts)} RRP {dict(pair.rrp.relay.drops.counts)}"
                      f" mux {[dict(c.stats.greDropped) for c in (conn, *server_factory.connections)]}")
        protocol.transport.loseConnection()
        yield port.stopListening()

    def done(result):
        outcome["result"] = result
        reactor.stop()

    reactor.callWhenRunning(lambda: main().addBoth(done))
    reactor.run()
    result = outcome.get("result")
    if hasattr(result, "raiseException"):
        result.raiseException()


# --- the stages alone -----------------------------------------------------------------------

def bench_copy(packets, results):
    def run():
        for data in packets:
            data[16:]
    secs, _ = timed(run)
    results.add("baseline: copy the payload (data[16:])", secs, len(packets))


def bench_split(packets, results):
    split = gre.split_gre

    def run():
        for data in packets:
            split(data)
    secs, _ = timed(run)
    results.add("split_gre", secs, len(packets))


def bench_build(fields, results):
    build = gre.build_gre

    def run():
        for call_id, seq, ack, payload in fields:
            build(call_id, payload, seq, ack)
    secs, _ = timed(run)
    results.add("build_gre", secs, len(fields))


def open_mux_pair():
    """A lone opener and acceptor MuxConnection with session 1 open on each; no transport."""
    clock = MemoryReactorClock()
    receiver = RecordingSessionReceiver(record=False)
    # The stage measures encoding, so the GRE watermark (drops within one turn past 64 KiB
    # queued) is lifted here; the whole-path runs keep the default and report drops.
    opener = MuxConnection(True, clock, MuxConfig(greWatermark=1 << 40))
    acceptor = MuxConnection(False, clock, sessionRequested=lambda s, p, c: receiver)
    out_link, in_link = NullLink(), NullLink()
    opener.start(out_link)
    acceptor.start(in_link)

    def exchange():
        for _ in range(4):
            a, out_link.chunks = b"".join(out_link.chunks), []
            b, in_link.chunks = b"".join(in_link.chunks), []
            if a:
                acceptor.dataReceived(a)
            if b:
                opener.dataReceived(b)
            clock.advance(0)
    exchange()
    session = opener.openSession("default", "bench", RecordingSessionReceiver(record=False))
    exchange()
    assert session.state == "OPEN", session
    return clock, opener, out_link, session, acceptor, receiver


def bench_mux(fields, batch, results):
    clock, opener, link, session, acceptor, receiver = open_mux_pair()
    send, flush = session.sendGRE, opener.flush
    link.chunks = []

    def encode():
        link.chunks = []
        for i in range(0, len(fields), batch):
            for call_id, seq, ack, payload in fields[i:i + batch]:
                send(call_id, seq, ack, payload)
            flush()
    secs, _ = timed(encode)  # link.chunks keeps the last run's frames for decode
    results.add(f"mux encode (session.sendGRE + flush per {batch})", secs, len(fields))
    stream = b"".join(link.chunks)
    # cut the stream into reads of about one batch of frames each (as TLS delivers records)
    per_read = max(1, len(stream) // max(1, len(fields) // batch))
    reads = [stream[i:i + per_read] for i in range(0, len(stream), per_read)]
    data_received = acceptor.dataReceived

    def decode():
        receiver.greCount = 0
        for chunk in reads:
            data_received(chunk)
    secs, _ = timed(decode)
    assert receiver.greCount == len(fields), (receiver.greCount, len(fields))
    results.add(f"mux decode (dataReceived -> greReceived, {len(reads)} reads)", secs,
                len(fields))


def tls_memory_pair():
    """A connected pyOpenSSL client/server on memory BIOs, with the routeproxy.tls contexts."""
    certdir = tempfile.mkdtemp(prefix="pathbench-")
    paths = certs.write_lab_certs(certdir, RRP_NAME, [LRP_NAME])
    server_ctx = tls.serverCreator(paths["rrp_cert"], paths["rrp_key"], paths["ca"]).options.getContext()
    client_ctx = tls.clientCreator(RRP_NAME, paths["lrp_cert"], paths["lrp_key"],
                                   paths["ca"]).options.getContext()
    server, client = memoryTLSPair(server_ctx, client_ctx)
    return client, server


def bench_tls_alone(packets, batch, results):
    client, server = tls_memory_pair()

    def drain(n):
        got = 0
        server.bio_write(client.bio_read(1 << 22))
        while got < n:
            got += len(server.recv(1 << 16))
        return got

    def per_packet():
        for data in packets:
            client.send(data)
            drain(len(data))
    secs, _ = timed(per_packet)
    results.add("baseline: TLS alone, one record per packet", secs, len(packets))

    def per_batch():
        for i in range(0, len(packets), batch):
            blob = b"".join(packets[i:i + batch])
            client.sendall(blob)
            drain(len(blob))
    secs, _ = timed(per_batch)
    results.add(f"baseline: TLS alone, one write per {batch} packets", secs, len(packets))


# --- main ----------------------------------------------------------------------------------

def machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def main(argv=None):
    global REPEAT, CLOCK
    p = argparse.ArgumentParser(prog="python -m benchmarks.pathbench", description=__doc__.split("\n")[0])
    p.add_argument("--packets", type=int, default=50000)
    p.add_argument("--size", type=int, default=1400, help="GRE packet size (header included)")
    p.add_argument("--batch", type=int, default=32, help="packets per wake-up")
    p.add_argument("--window", type=int, default=64,
                   help="TLS run: packets in flight at most (closed loop)")
    p.add_argument("--repeat", type=int, default=REPEAT, help="runs per stage (the best counts)")
    p.add_argument("--no-tls", action="store_true", help="skip the real TLS loopback run")
    p.add_argument("--cpu-time", action="store_true",
                   help="time the in-memory stages by this process's CPU time, not wall time "
                        "(steadier on a loaded machine)")
    p.add_argument("--profile", metavar="DIRECTION", nargs="?", const="lrp->rrp",
                   help="cProfile the in-memory whole path (lrp->rrp or rrp->lrp) and print it")
    args = p.parse_args(argv)
    REPEAT = max(1, args.repeat)
    if args.cpu_time:
        CLOCK = time.process_time
    if args.size < 16 or args.packets < 1 or args.batch < 1:
        p.error("--size >= 16, --packets >= 1, --batch >= 1")

    print(f"pathbench {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; {machine()}")
    print(f"{args.packets} GRE packets of {args.size} bytes, {args.batch} per wake-up"
          f"{'; CPU time' if args.cpu_time else ''}")
    results = Results()
    pair = MemoryPair()
    fwd = gre_packets(args.packets, args.size, pair.l_id)
    rev = gre_packets(args.packets, args.size, pair.r_id)
    fields = [gre.split_gre(d) for d in fwd]

    if args.profile:
        direction = args.profile
        packets = fwd if direction == "lrp->rrp" else rev
        prof = cProfile.Profile()
        prof.enable()
        push_memory(pair, direction, packets, args.batch)
        prof.disable()
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)
        return 0

    print("stages alone:")
    bench_copy(fwd, results)
    bench_split(fwd, results)
    bench_mux(fields, args.batch, results)
    bench_build(fields, results)
    bench_tls_alone(fwd, args.batch, results)
    print("whole path, in memory (no TLS):")
    for direction, packets in (("lrp->rrp", fwd), ("rrp->lrp", rev)):
        writes = pair.lrp_t.writes + pair.rrp_t.writes
        secs, delivered = timed(lambda: push_memory(pair, direction, packets, args.batch))
        writes = (pair.lrp_t.writes + pair.rrp_t.writes - writes) // REPEAT
        drops = sum(p.connection.stats.greDropped.total() for p in (pair.lrp_mux, pair.rrp_mux))
        results.add(f"whole path, in memory, {direction}", secs, delivered,
                    f"({delivered}/{len(packets)} delivered, {writes} link writes per run;"
                    f" mux drops in all runs {drops})")
    port = pair.rrp.relay.grePort
    check = gre.split_gre(port.last)
    expected = gre.split_gre(fwd[-1])
    if check[1:] != expected[1:] or check[0] != 256:
        print(f"  !! last packet at pptpd differs: {check[:3]} vs {expected[:3]}", file=sys.stderr)
    if not args.no_tls:
        print("whole path, real TLS on 127.0.0.1:")
        run_tls(args.packets, args.size, args.batch, results, args.window)
    return 0


if __name__ == "__main__":
    sys.exit(main())
