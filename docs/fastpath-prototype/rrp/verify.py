"""Check every GRE packet of a pcap (captured in the server namespace): intact headers and probes."""
import struct, sys, collections
MAGIC = b"RPb1"
PROBE = struct.Struct("!4sIIQQ")

def packets(path):
    with open(path, "rb") as f:
        while True:
            h = f.read(4)
            if len(h) < 4:
                return
            yield f.read(struct.unpack("!I", h)[0]), 0

def pcap_packets(path):
    with open(path, "rb") as f:
        head = f.read(24)
        magic, = struct.unpack("<I", head[:4])
        en = "<" if magic in (0xa1b2c3d4, 0xa1b23c4d) else ">"
        linktype = struct.unpack(en + "I", head[20:24])[0]
        off = {113: 16, 276: 20, 1: 14, 101: 0, 12: 0}[linktype]
        while True:
            h = f.read(16)
            if len(h) < 16:
                return
            _, _, caplen, wirelen = struct.unpack(en + "IIII", h)
            data = f.read(caplen)
            if caplen != wirelen:
                yield None, None
                continue
            yield data[off:], linktype

def main(path):
    bad = collections.Counter(); ok = 0; runs = collections.Counter(); keys = {}; seen = set(); dup = 0
    truncated = 0
    for ip, _ in packets(path):
        if ip is None:
            truncated += 1; continue
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 47:
            continue
        ihl = (ip[0] & 15) * 4
        total = ip[2] << 8 | ip[3]
        if (ip[6] << 8 | ip[7]) & 0x3fff:
            bad["fragment"] += 1; continue
        g = ip[ihl:total]
        fv, proto, plen, key = struct.unpack_from("!HHHH", g)
        if fv not in (0x3001, 0x3081) or proto != 0x880B:
            bad[f"flags {fv:#x}/{proto:#x}"] += 1; continue
        hl = 12 if fv == 0x3001 else 16
        seq, = struct.unpack_from("!I", g, 8)
        payload = g[hl:]
        if len(payload) != plen:
            bad["length"] += 1; continue
        if len(payload) < PROBE.size:
            bad["short"] += 1; continue
        magic, run, flow, pseq, stamp = PROBE.unpack_from(payload)
        if magic != MAGIC:
            bad["magic"] += 1; continue
        if pseq & 0xffffffff != seq:
            bad["seq"] += 1; continue
        if any(payload[PROBE.size:]):
            bad["payload bytes"] += 1; continue
        if keys.setdefault((run, flow), key) != key:
            bad["key changed"] += 1; continue
        if (run, pseq) in seen:
            dup += 1
        seen.add((run, pseq))
        runs[run] += 1
        ok += 1
    print(f"{path}: intact={ok} bad={dict(bad)} duplicates={dup} truncated_captures={truncated} "
          f"per_run={sorted(runs.values())} flows={len(keys)}")

if __name__ == "__main__":
    for p in sys.argv[1:]:
        main(p)
