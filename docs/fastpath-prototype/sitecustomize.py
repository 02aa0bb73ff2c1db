"""EXPERIMENT (kept in docs/fastpath-prototype, not product code): hand the LRP's steady-state c2s GRE to native code.

Learns call ID -> (source, mux session, tag) from the normal path; 2 s after the first call
is learned, stops the GRE port and opens _lrpplane's own pcap handle.  PLANE_MODE=thread (the
default): a C thread with its own epoll writes frames through pyOpenSSL's SSL* (every
pyOpenSSL call locked against it).  PLANE_MODE=pump: the reactor watches the handle and each
wake-up calls one C function that does the same in the reactor's thread (no lock)."""
import os, sys, socket
if any(a.endswith("twistd") for a in sys.orig_argv[:3]) and any("routeproxy-lrp" in a for a in sys.orig_argv):
    def _install():
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import _lrpplane
        import learning
        from OpenSSL import SSL
        from OpenSSL._util import lib as ossl, ffi as offi
        from routeproxy import greport
        plib = _lrpplane.lib
        for name in ("send", "recv", "recv_into", "bio_read", "bio_write", "do_handshake", "shutdown", "pending"):
            orig = getattr(SSL.Connection, name, None)
            if orig is None:
                continue
            def locked(self, *a, _o=orig, **k):
                plib.plane_lock()
                try:
                    return _o(self, *a, **k)
                finally:
                    plib.plane_unlock()
            setattr(SSL.Connection, name, locked)
        state = {"port": None, "conn": None, "started": False, "scheduled": False}
        origRead = greport.GREPort.doRead
        def doRead(self):
            state["port"] = self
            return origRead(self)
        greport.GREPort.doRead = doRead
        class Pump:
            """The plane's pcap handle as a reactor reader (PLANE_MODE=pump)."""
            def __init__(self, fd): self.fd = fd
            def fileno(self): return self.fd
            def doRead(self): plib.plane_pump()
            def logPrefix(self): return "pump"
            def connectionLost(self, reason): pass
        def start():
            from twisted.internet import reactor, task
            port, conn = state["port"], state["conn"]
            tls = conn._link.transport
            ssl = tls._tlsConnection
            u = lambda p: int(offi.cast("uintptr_t", p))
            port.stopReading()
            args = (port.interface.encode(), port.bpfFilter.encode(), u(ssl._ssl), u(ssl._from_ssl),
                    u(offi.cast("void *", ossl.SSL_write)), u(offi.cast("void *", ossl.BIO_read)),
                    tls.transport.socket.fileno())
            if os.environ.get("PLANE_MODE", "thread") == "pump":
                rc = plib.plane_open(*args)
                reactor.addReader(Pump(rc))
            else:
                rc = plib.plane_start(*args)
            open(f"/tmp/plane.started.{os.getpid()}", "w").write(f"rc={rc}")
            def report():
                open(f"/tmp/plane.count.{os.getpid()}", "w").write(
                    " ".join(str(plib.plane_count(i)) for i in range(4)))
            task.LoopingCall(report).start(1.0)
        def learned(key, source, conn, sid, tag):
            plib.plane_set(key[0] << 8 | key[1], int.from_bytes(socket.inet_aton(source), "little"), sid, tag)
            state["conn"] = conn
            if not state["scheduled"]:
                state["scheduled"] = True
                from twisted.internet import reactor
                reactor.callLater(2.0, start)
        learning.install(learned)
    try:
        _install()
    except Exception as e:
        open(f"/tmp/plane.err.{os.getpid()}", "w").write(repr(e))
