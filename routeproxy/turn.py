"""Work held to the end of one read, so a wake-up's output goes out inside that wake-up.

The mux writes a reactor turn's frames at once (one TLS write); outside a read it schedules
that write with ``callLater(0)``, which costs a whole extra reactor iteration (the poll, the
timers, the context wrappers) per wake-up.  A reader that hands many packets up in one
wake-up (the GRE port's ``doRead``) marks the read with :func:`begin` and :func:`end`;
writers :func:`hold` their flush meanwhile and it runs as the read ends.  Outside a marked
read :func:`hold` says no and the writer schedules itself as before.

One process, one reactor thread: the state is this module's.
"""

_depth = 0
_held = []


def begin():
    """A read starts: flushes asked for from here on wait for :func:`end`."""
    global _depth
    _depth += 1


def hold(flush):
    """Run *flush* when the current read ends; False (and nothing held) outside a read."""
    if _depth:
        _held.append(flush)
        return True
    return False


def end():
    """The read is over: run what it held, in the order asked (each once)."""
    global _depth, _held
    _depth -= 1
    if _depth or not _held:
        return
    held, _held = _held, []
    failed = None
    for flush in held:
        try:
            flush()
        except Exception as e:  # the others still go out; the first error goes on up
            failed = failed or e
    if failed is not None:
        raise failed
