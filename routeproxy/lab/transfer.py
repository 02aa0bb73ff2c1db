"""A tiny TCP sender/receiver that proves bytes cross a tunnel unchanged.

Runs inside the lab (UML has no socat, and busybox nc cannot half-close):
`recv --port P --count N` accepts N connections and prints `PEER SHA256 BYTES`
for each; `send --host H --port P --file F` prints `SHA256 SENT SECONDS SIZE`.
"""
import argparse
import hashlib
import socket
import sys
import threading
import time

CHUNK = 64 * 1024


IDLE = 15   # seconds without progress after which a side gives up


def receive(port, count, timeout=IDLE):
    """Accept `count` connections; return [(peer address, sha256 hex, bytes)].

    A connection that makes no progress for `timeout` seconds is reported
    with what it got so far (`stalled-SHA`), so a stuck tunnel ends the run
    instead of hanging it.
    """
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.listen(count)
    server.settimeout(timeout)
    results, lock, threads = [], threading.Lock(), []

    def drain(conn, peer):
        digest, total = hashlib.sha256(), 0
        stalled = ""
        with conn:
            conn.settimeout(timeout)
            while True:
                try:
                    data = conn.recv(CHUNK)
                except OSError:
                    stalled = "stalled-"
                    break
                if not data:
                    break
                digest.update(data)
                total += len(data)
        with lock:
            results.append((peer[0], stalled + digest.hexdigest(), total))
            sys.stdout.write(f"{peer[0]} {stalled}{digest.hexdigest()} {total}\n")
            sys.stdout.flush()

    for _ in range(count):
        try:
            conn, peer = server.accept()
        except OSError:
            break
        thread = threading.Thread(target=drain, args=(conn, peer))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    server.close()
    return results


def send(host, port, path, timeout=IDLE, device=None):
    """Send a file; return (sha256 hex, bytes sent, seconds, file size).

    The hash is of the whole file; `bytes sent` is less than its size when
    the tunnel stalled for `timeout` seconds.  `device` (e.g. ppp1) sends
    through that interface: several tunnels of one host reach the same
    server address.
    """
    total = 0
    started = time.monotonic()
    with open(path, "rb") as f:
        content = f.read()
    whole, size = hashlib.sha256(content).hexdigest(), len(content)
    del content
    try:
        with _connect(host, port, timeout, device) as conn, open(path, "rb") as f:
            while True:
                data = f.read(CHUNK)
                if not data:
                    break
                conn.sendall(data)
                total += len(data)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)   # wait for the receiver to finish reading and close
    except OSError as e:
        sys.stderr.write(f"send: {e} after {total} bytes\n")
    return whole, total, time.monotonic() - started, size


def _connect(host, port, timeout, device):
    conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if device:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        conn.settimeout(timeout)
        conn.connect((host, port))
    except OSError:
        conn.close()
        raise
    return conn


def main(argv=None):
    parser = argparse.ArgumentParser(prog="routeproxy.lab.transfer")
    sub = parser.add_subparsers(dest="command", required=True)
    recv = sub.add_parser("recv")
    recv.add_argument("--port", type=int, required=True)
    recv.add_argument("--count", type=int, required=True)
    snd = sub.add_parser("send")
    snd.add_argument("--host", required=True)
    snd.add_argument("--port", type=int, required=True)
    snd.add_argument("--file", required=True)
    snd.add_argument("--device", help="send through this interface (e.g. ppp1)")
    args = parser.parse_args(argv)
    if args.command == "recv":
        receive(args.port, args.count)
    else:
        sha, total, seconds, size = send(args.host, args.port, args.file, device=args.device)
        print(f"{sha} {total} {seconds:.2f} {size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
