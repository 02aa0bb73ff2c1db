"""Waiting for something a process or peer does: the one poll loop of the harness.

Tests and benchmarks watch real processes in namespaces, which give no callback when they
are ready; polling briefly is the plain way to wait, and one loop gives one failure message.
"""
import time

POLL = 0.05


class HarnessError(Exception):
    """The harness did not see what it waited for (a timeout, a process that exited, a peer
    that said something else); the message says what and carries what helps to diagnose."""


def wait_until(predicate, timeout, what, alive=None, interval=POLL):
    """Poll *predicate* until it returns something true and return that.

    HarnessError naming *what* after *timeout* seconds, or as soon as *alive* (a callable,
    e.g. a process handle's ``alive``) returns false: a dead process will not get ready.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and not alive():
            raise HarnessError(f"{what}: the process exited")
        if time.monotonic() >= deadline:
            raise HarnessError(f"{what}: not within {timeout} s")
        time.sleep(interval)
