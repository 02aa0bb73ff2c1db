"""Turn trial's closing line into the plain `N passed, N failed, N skipped` line CI reads.

trial ends with ``PASSED (successes=12, skips=1)`` or
``FAILED (failures=1, errors=2, successes=10)``; CI only understands the plain form.
"""
import re
import sys


def summarize(text):
    """Return the plain summary line for trial output *text*, or None if trial never finished."""
    match = None
    for match in re.finditer(r"^(PASSED|FAILED) \(([^)]*)\)\s*$", text, re.M):
        pass
    if match is None:
        return None
    counts = dict(
        (key.strip(), int(value))
        for key, value in (item.split("=") for item in match.group(2).split(","))
    )
    passed = counts.get("successes", 0)
    failed = sum(counts.get(k, 0) for k in ("failures", "errors", "unexpectedSuccesses"))
    skipped = counts.get("skips", 0) + counts.get("expectedFailures", 0)
    return f"{passed} passed, {failed} failed, {skipped} skipped"


def main(argv):
    with open(argv[1], encoding="utf-8", errors="replace") as log:
        line = summarize(log.read())
    print(line or "0 passed, 1 failed (trial did not finish)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
