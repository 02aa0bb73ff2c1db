"""EXPERIMENT (kept in docs/fastpath-prototype, not product code): the LRP's wake-up fused into one Python function.

For established calls only, learned from the normal path: pcap frames are parsed inline,
framed for the mux and written through pyOpenSSL and the socket in one go at the end of the
wake-up.  No watermark, no gate, no counters beyond the port's reads/received: an upper bound
of what less interpreter per wake-up buys.
"""
import os, sys, struct
if any(a.endswith("twistd") for a in sys.orig_argv[:3]) and any("routeproxy-lrp" in a for a in sys.orig_argv):
    def _install():
        from routeproxy import greport
        from routeproxy.mux import connection as mc, frames as F
        fusedCount = [0, 0]
        table = {}        # key L -> (src 4 bytes, MuxConnection, sid, callTag)
        import socket as _s
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import learning
        learning.install(lambda key, source, conn, sid, tag:
                         table.__setitem__(key, (_s.inet_aton(source), conn, sid, tag)))
        origRead = greport.GREPort.doRead
        IP = struct.Struct("!BBHHHBBH4s4s")
        H4 = struct.Struct("!HHH")
        U32 = struct.Struct("!I")
        head3, head1, head0 = F._GRE_HEAD_TAG_SEQ_ACK, F._GRE_HEAD_TAG_ONE, F._GRE_HEAD_TAG
        GRE, HAS_SEQ, HAS_ACK = F.GRE, F.GRE_HAS_SEQ, F.GRE_HAS_ACK
        def doRead(self):
            if not table:
                return origRead(self)
            self.stats.reads += 1
            pkts = []
            try:
                pkts = self._capture._pcap.readpkts()
            except OSError as e:
                return e
            offset = self._link[0]
            local = self._local
            out = {}
            slow = []
            for ts, frame in pkts:
                try:
                    vihl, _, total, ident, frag, _, proto, _, src, dst = IP.unpack_from(frame, offset)
                except struct.error:
                    slow.append((ts, frame)); continue
                hl = (vihl & 15) * 4
                if vihl >> 4 != 4 or proto != 47 or frag & 0x3fff or dst not in local:
                    slow.append((ts, frame)); continue
                g = offset + hl
                end = offset + total
                key = frame[g+6:g+8]
                entry = table.get(key)
                if entry is None or entry[0] != src:
                    slow.append((ts, frame)); continue
                f = frame[g] << 8 | frame[g + 1]
                o = g + 8
                seq = ack = None
                if f & 0x1000:
                    seq = U32.unpack_from(frame, o)[0]; o += 4
                if f & 0x0080:
                    ack = U32.unpack_from(frame, o)[0]; o += 4
                payload = frame[o:end]
                _, conn, sid, tag = entry
                n = len(payload)
                if seq is not None:
                    h = head3.pack(GRE, HAS_SEQ | HAS_ACK, 0, sid, n + 10, tag, seq, ack) if ack is not None else head1.pack(GRE, HAS_SEQ, 0, sid, n + 6, tag, seq)
                else:
                    h = head1.pack(GRE, HAS_ACK, 0, sid, n + 6, tag, ack) if ack is not None else head0.pack(GRE, 0, 0, sid, n + 2, tag)
                chunks = out.get(conn)
                if chunks is None:
                    chunks = out[conn] = []
                chunks.append(h); chunks.append(payload)
            self.stats.received += len(pkts)
            fusedCount[0] += len(pkts) - len(slow)
            if fusedCount[0] // 1000 != fusedCount[1]:
                fusedCount[1] = fusedCount[0] // 1000
                open(f'/tmp/fused.count.{os.getpid()}', 'w').write(f'{fusedCount[0]} fused')
            for conn, chunks in out.items():
                tls = conn._link.transport
                tls._aggregator.flush()
                data = b"".join(chunks)
                ssl = tls._tlsConnection
                sent = 0
                while sent < len(data):
                    sent += ssl.send(data[sent:sent + 16384])
                tls.transport.write(ssl.bio_read(1 << 20))
            if slow:
                handle = self._frameReceived
                self._turn.begin()
                try:
                    for ts, frame in slow:
                        handle(ts, frame)
                finally:
                    self._turn.end()
        greport.GREPort.doRead = doRead
    try:
        _install()
        open(f"/tmp/fused.installed.{os.getpid()}", "w").write("ok")
    except Exception as e:
        open(f"/tmp/fused.err.{os.getpid()}", "w").write(repr(e))
