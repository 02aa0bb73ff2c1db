"""EXPERIMENT (not product code): the RRP's link receive side as one C call per wake-up.

Acts only inside ``twistd routeproxy-rrp``.  Learns (mux session, tag) -> (raw socket, pptpd
address, GRE key S) from the normal path (RelaySession.datagramReceived sets the context,
GREPort.sendGRE completes it); 2 s after the first learned flow replaces the link's TCP
transport's doRead (on the instance) with a call of _rrppump.rrp_pump, which recv()s,
decrypts through pyOpenSSL's own SSL*, sends known GRE itself and hands every other frame, in
order, to the mux protocol's dataReceived.  Counters: /tmp/rrppump.count.PID (once a second).

With PLANE_MODE set, the LRP prototype's sitecustomize (docs/fastpath-prototype) is run too
(only one sitecustomize is imported per interpreter)."""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_LRP = os.environ.get("LRP_PROTOTYPE", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if os.environ.get("PLANE_MODE"):
    try:
        _path = os.path.join(_LRP, "sitecustomize.py")
        _g = {"__file__": _path, "__name__": "lrp_sitecustomize", "__builtins__": __builtins__}
        exec(compile(open(_path).read(), _path, "exec"), _g)
    except Exception as e:  # pragma: no cover
        open(f"/tmp/rrppump.lrperr.{os.getpid()}", "w").write(repr(e))

_IS_RRP = (any(a.endswith("twistd") for a in sys.orig_argv[:3])
           and any("routeproxy-rrp" in a for a in sys.orig_argv))

COUNTERS = ("wakeups", "pump_calls", "bytes_recv", "recv_calls", "ssl_reads", "gre_sent_c",
            "frames_to_python", "send_busy", "send_error", "gre_unknown_flow", "fallback",
            "plaintext_bytes")

if _IS_RRP and not os.environ.get("RRP_PUMP_OFF"):
    def _install():
        sys.path.insert(0, _HERE)
        import socket
        import _rrppump
        from OpenSSL._util import lib as ossl, ffi as offi
        from twisted.internet import main as tmain
        from routeproxy import greport, relay
        plib, pffi = _rrppump.lib, _rrppump.ffi
        F_OUT, F_EOF, F_SOCKERR, F_SSLERR, F_TLSOUT, F_FALLBACK, F_MORE = 1, 2, 4, 8, 16, 32, 64
        state = {"ctx": None, "conn": None, "scheduled": False, "plugged": None,
                 "flows": {}, "extra": {}}
        # the (mux session, tag) the normal path is delivering, set around datagramReceived
        origDatagram = relay.RelaySession.datagramReceived

        def datagramReceived(self, callTag, seq, ack, payload):
            mux = self.mux
            state["ctx"] = (self, mux, callTag)
            try:
                return origDatagram(self, callTag, seq, ack, payload)
            finally:
                state["ctx"] = None

        origSend = greport.GREPort.sendGRE

        def sendGRE(self, src, dst, gre):
            ok = origSend(self, src, dst, gre)
            ctx = state["ctx"]
            if ok and ctx is not None and ctx[1] is not None:
                learn(self, ctx, src, dst, gre)
            return ok

        def learn(port, ctx, src, dst, gre):
            rs, mux, tag = ctx
            key = (mux.id, tag)
            if key in state["flows"] or state["plugged"] is False:
                return
            sock = port._senders.get(src)
            if sock is None:
                return
            call = rs.book.by_tag(tag)
            idx = plib.rrp_set(mux.id, tag, sock.fileno(),
                               int.from_bytes(socket.inet_aton(dst), "little"),
                               int.from_bytes(gre[6:8], "big"))
            if idx < 0:
                return
            state["flows"][key] = [idx, rs, mux, call, port, 0, 0]
            state["conn"] = mux.connection
            if not state["scheduled"]:
                state["scheduled"] = True
                from twisted.internet import reactor
                reactor.callLater(2.0, plug)

        # flows end: forget them before Python's own handling (CLOSE goes through Python)
        origClosed = relay.RelaySession.sessionClosed

        def sessionClosed(self, reason):
            mux = self.mux
            if mux is not None:
                forget_sid(mux.id)
            return origClosed(self, reason)

        origClose = relay.RelaySession.close

        def close(self, *a, **k):
            if self.mux is not None:
                forget_sid(self.mux.id)
            return origClose(self, *a, **k)

        def forget_sid(sid):
            plib.rrp_del_sid(sid)
            for key in [k for k in state["flows"] if k[0] == sid]:
                sync_one(state["flows"].pop(key))

        relay.RelaySession.datagramReceived = datagramReceived
        greport.GREPort.sendGRE = sendGRE
        relay.RelaySession.sessionClosed = sessionClosed
        relay.RelaySession.close = close

        def sync_one(f):
            """Add what C did for a flow to the Python counters it skipped."""
            idx, rs, mux, call, port = f[:5]
            pk, by = plib.rrp_entry_count(idx, 0), plib.rrp_entry_count(idx, 1)
            dp, db = pk - f[5], by - f[6]
            f[5], f[6] = pk, by
            if dp:
                rs.greOut += dp
                mux.greIn += dp
                port.stats.sent += dp
                if call is not None:
                    call.gre_out += dp
                    call.bytes_out += db

        def plug():
            conn = state["conn"]
            from twisted.internet import reactor
            if conn is None or conn._link is None or conn.closed:
                return
            if conn._decoder.buffered:       # hand over on a frame boundary only
                reactor.callLater(0.001, plug)
                return
            mux = conn._link                  # MuxProtocol
            tls = mux.transport               # TLSMemoryBIOProtocol
            tcp = tls.transport               # tcp.Server
            ssl = tls._tlsConnection
            u = lambda p: int(offi.cast("uintptr_t", p))
            rc = plib.rrp_open(tcp.socket.fileno(), u(ssl._ssl), u(ssl._into_ssl), u(ssl._from_ssl),
                               u(offi.cast("void *", ossl.SSL_read)),
                               u(offi.cast("void *", ossl.SSL_get_error)),
                               u(offi.cast("void *", ossl.BIO_write)),
                               u(offi.cast("void *", ossl.BIO_read)),
                               conn._decoder.maxPayload)
            if rc < 0:
                state["plugged"] = False
                return
            lenp = pffi.new("int *")
            seconds = reactor.seconds
            deliver = mux.dataReceived

            def unplug():
                state["plugged"] = False
                tcp.__dict__.pop("doRead", None)
                p = plib.rrp_take_pending(lenp)
                if lenp[0]:
                    deliver(bytes(pffi.buffer(p, lenp[0])))

            def doRead():
                rc = plib.rrp_pump(1)
                while True:
                    if rc & F_OUT:
                        p = plib.rrp_out(lenp)
                        data = bytes(pffi.buffer(p, lenp[0]))
                        plib.rrp_out_clear()
                        deliver(data)
                        if tls._lostTLSConnection or tcp.disconnecting or conn.closed:
                            unplug()
                            return None
                    if rc & F_FALLBACK:
                        unplug()
                        break
                    if rc & F_MORE:
                        rc = (rc & (F_EOF | F_SOCKERR | F_SSLERR | F_TLSOUT)) | plib.rrp_pump(0)
                        continue
                    break
                conn._lastReceived = seconds()
                if rc & F_TLSOUT:
                    p = plib.rrp_tls_out(lenp)
                    tcp.write(bytes(pffi.buffer(p, lenp[0])))
                if rc & F_SSLERR:
                    unplug()
                    tls._flushReceiveBIO()
                if rc & F_EOF:
                    return tmain.CONNECTION_DONE
                if rc & F_SOCKERR:
                    return tmain.CONNECTION_LOST
                return None

            tcp.doRead = doRead
            state["plugged"] = True
            open(f"/tmp/rrppump.started.{os.getpid()}", "w").write(
                f"rc={rc} fd={tcp.socket.fileno()} flows={len(state['flows'])}\n")

            def report():
                for f in list(state["flows"].values()):
                    sync_one(f)
                with open(f"/tmp/rrppump.count.{os.getpid()}", "w") as out:
                    out.write(" ".join(f"{n}={plib.rrp_count(i)}" for i, n in enumerate(COUNTERS)))
                    out.write(f" plugged={state['plugged']} flows={len(state['flows'])}\n")
            from twisted.internet import task
            task.LoopingCall(report).start(1.0)

    try:
        _install()
    except Exception as e:  # pragma: no cover
        open(f"/tmp/rrppump.err.{os.getpid()}", "w").write(repr(e))
