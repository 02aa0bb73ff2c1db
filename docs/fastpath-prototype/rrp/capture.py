"""Capture IPv4 GRE arriving in this namespace (AF_PACKET, cooked) to a length-prefixed file until SIGTERM."""
import socket, struct, sys, signal
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
out = open(sys.argv[1], "wb", buffering=0)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
s.settimeout(0.2)
while not stop:
    try:
        data, addr = s.recvfrom(4096)
    except socket.timeout:
        continue
    except InterruptedError:
        continue
    if addr[2] == socket.PACKET_OUTGOING or len(data) < 20 or data[9] != 47:
        continue
    out.write(struct.pack("!I", len(data)) + data)
out.close()
