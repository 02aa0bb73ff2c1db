"""`python -m benchmarks.spysummary FILE.raw [--top N]`: a py-spy raw profile as two tables.

``python -m benchmarks.fixedrate --py-spy DIR`` leaves ``DIR/lrp.raw`` and ``DIR/rrp.raw``
(py-spy's raw format: one ``frame;frame;... count`` line per stack).  This prints the share
of samples each function holds itself (self) and under it (inclusive), line numbers dropped
so a function's lines add up.  Idle samples (the reactor's poll, the thread pool's wait) are
counted too: read the busy shares against the total less those.
"""
import argparse
import collections
import re


def summarise(path):
    """(total samples, Counter of self samples, Counter of inclusive samples) by function."""
    own, under, total = collections.Counter(), collections.Counter(), 0
    with open(path) as f:
        for line in f:
            line = line.rstrip()
            if not line:
                continue
            stack, count = line.rsplit(" ", 1)
            count = int(count)
            total += count
            frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
            own[frames[-1]] += count
            for frame in set(frames):
                under[frame] += count
    return total, own, under


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    for path in args.files:
        total, own, under = summarise(path)
        print(f"== {path}: {total} samples")
        for title, counter in (("self", own), ("inclusive", under)):
            print(f"-- {title}")
            for name, count in counter.most_common(args.top):
                print(f"{100 * count / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
