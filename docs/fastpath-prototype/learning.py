"""What both experiments share: learn each call's mux session from the normal path.

``install(learned)`` wraps the demultiplexer and the mux's GRE queue so that every GRE packet
the normal path queues calls ``learned(key, source, connection, sid, tag)``: *key* its 2-byte
GRE call ID, *source* the client's dotted quad."""
from routeproxy import gredemux
from routeproxy.mux import connection as mc


def install(learned):
    current = [None]  # (source, key) of the packet the normal path is delivering
    demux = gredemux.GREDemultiplexer.greReceived

    def greReceived(self, src, dst, data):
        current[0] = (src, data[6:8] if len(data) >= 8 else None)
        try:
            return demux(self, src, dst, data)
        finally:
            current[0] = None

    queue = mc.MuxConnection._queueGRE

    def _queueGRE(self, sid, callTag, seq, ack, payload):
        ok = queue(self, sid, callTag, seq, ack, payload)
        packet = current[0]
        if ok and packet is not None and packet[1] is not None:
            learned(packet[1], packet[0], self, sid, callTag)
        return ok

    gredemux.GREDemultiplexer.greReceived = greReceived
    mc.MuxConnection._queueGRE = _queueGRE
