#!/bin/bash
# One benchmark run (config $1: baseline|rrp) with tcpdump of GRE in the server namespace.
cfg=$1; HERE=$(cd "$(dirname "$0")" && pwd); OUT=${OUT:-/tmp/rrp-verify}; mkdir -p "$OUT"
cd "$HERE/../../.."
rm -f /tmp/rrppump.count.*
(
  flock 9
  if [ $cfg = rrp ]; then export PYTHONPATH="$HERE"; fi
  .venv/bin/python -m benchmarks.fixedrate --size 1400 --rate 2000 --rate 2000 --rate 10000 --latency --duration 3 > $OUT/verify-$cfg.txt 2>&1 &
  B=$!
  for i in $(seq 200); do ns=$(ip netns list | awk '{print $1}' | grep -- '-3-server$' | grep "rpt$B-" ); [ -n "$ns" ] && break; sleep 0.1; done
  ip netns exec $ns "$PWD/.venv/bin/python" "$HERE/capture.py" $OUT/verify-$cfg.cap 2> $OUT/verify-$cfg.caperr &
  T=$!
  wait $B
  sleep 0.5; kill $T; wait $T
  cat /tmp/rrppump.count.* >> $OUT/verify-$cfg.txt 2>/dev/null
) 9>/root/bench.lock
.venv/bin/python "$HERE/verify.py" $OUT/verify-$cfg.cap
