"""`python -m benchmarks.rawsend [--packets N] [--size B]`: ways to send GRE from Python, side by side.

The RRP sends every GRE packet with one ``sendto`` on a raw socket (routeproxy/greport.py).
This measures, in one run, on a veth into a namespace that drops GRE at PREROUTING: ``sendto``
(the baseline, what the daemon does), ``send`` on a connected raw socket, and ``sendmmsg`` of
32 packets through ctypes with each payload copied into one preallocated buffer (issue 13's
lead).  It prints microseconds of CPU per packet.  Needs root, ``ip`` and ``iptables``.
"""
import argparse
import ctypes
import os
import socket
import subprocess
import sys
import time

from benchmarks.loadgen import _IoVec, _MMsgHdr, _sendmmsg

SRC, DST = "10.99.0.1", "10.99.0.2"
BATCH = 32


def timed(label, send, packets):
    start = time.process_time()
    send()
    print(f"  {label:<44} {(time.process_time() - start) / packets * 1e6:6.2f} us/packet CPU")


def measure(packets, size):
    """Run inside the sending namespace."""
    gre = b"\x30\x01\x88\x0b" + bytes(size - 24)
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
    s.bind((SRC, 0))
    s.setblocking(False)

    def loop(call, *args):
        def run():
            for _ in range(packets):
                try:
                    call(*args)
                except BlockingIOError:
                    pass
        return run

    timed("sendto (baseline: what greport does)", loop(s.sendto, gre, (DST, 0)), packets)
    s.connect((DST, 0))
    timed("send on a connected raw socket", loop(s.send, gre), packets)
    iovs, msgs = (_IoVec * BATCH)(), (_MMsgHdr * BATCH)()
    buf = bytearray(BATCH * 2048)
    base = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    for i in range(BATCH):
        iovs[i].iov_base = base + i * 2048
        msgs[i].msg_hdr.msg_iov, msgs[i].msg_hdr.msg_iovlen = ctypes.pointer(iovs[i]), 1
    batch = [gre] * BATCH

    def mmsg():
        for _ in range(packets // BATCH):
            for i, p in enumerate(batch):
                offset = i * 2048
                buf[offset:offset + len(p)] = p
                iovs[i].iov_len = len(p)
            _sendmmsg(s.fileno(), msgs, BATCH, 0)
    timed(f"sendmmsg of {BATCH} via ctypes (payload copied)", mmsg, packets)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--packets", type=int, default=200000)
    p.add_argument("--size", type=int, default=1400, help="IPv4 bytes per packet")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inside:
        return measure(args.packets, args.size)
    a, b = f"rpsend{os.getpid()}a", f"rpsend{os.getpid()}b"
    run = lambda *cmd: subprocess.run(cmd, check=True)  # noqa: E731
    try:
        run("ip", "netns", "add", a)
        run("ip", "netns", "add", b)
        run("ip", "link", "add", "va", "netns", a, "type", "veth", "peer", "name", "vb", "netns", b)
        run("ip", "-n", a, "addr", "add", f"{SRC}/24", "dev", "va")
        run("ip", "-n", b, "addr", "add", f"{DST}/24", "dev", "vb")
        run("ip", "-n", a, "link", "set", "va", "up")
        run("ip", "-n", b, "link", "set", "vb", "up")
        run("ip", "netns", "exec", b, "iptables", "-t", "raw", "-A", "PREROUTING", "-p", "47", "-j", "DROP")
        print(f"rawsend: {args.packets} GRE packets of {args.size} bytes over a veth")
        run("ip", "netns", "exec", a, sys.executable, "-m", "benchmarks.rawsend", "--inside",
            "--packets", str(args.packets), "--size", str(args.size))
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
