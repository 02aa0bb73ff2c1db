"""Work held to the end of one read, so a wake-up's output goes out inside that wake-up.

The mux writes a reactor turn's frames at once (one TLS write); outside a read it schedules
that write with ``callLater(0)``, which costs a whole extra reactor iteration (the poll, the
timers, the context wrappers) per wake-up.  A reader that hands many packets up in one
wake-up (the GRE port's ``doRead``) marks the read with :meth:`Turn.begin` and
:meth:`Turn.end`; writers :meth:`Turn.hold` their flush meanwhile and it runs as the read
ends.  Outside a marked read ``hold`` says no and the writer schedules itself as before.

Reader and writers must share one :class:`Turn`: :func:`of` gives each reactor (or test
clock) its own, so two reactors in one process, or two tests, never see each other's reads.
"""
import weakref


class Turn:
    """The reads in progress on one reactor thread and the flushes held for their end."""

    def __init__(self):
        self._depth = 0
        self._held = []

    def begin(self):
        """A read starts: flushes asked for from here on wait for :meth:`end`."""
        self._depth += 1

    def hold(self, flush):
        """Run *flush* when the current read ends; False (and nothing held) outside a read."""
        if self._depth:
            self._held.append(flush)
            return True
        return False

    def end(self):
        """The read is over: run what it held, in the order asked (each once)."""
        self._depth -= 1
        if self._depth or not self._held:
            return
        held, self._held = self._held, []
        failed = None
        for flush in held:
            try:
                flush()
            except Exception as e:  # the others still go out; the first error goes on up
                failed = failed or e
        if failed is not None:
            raise failed


_turns = weakref.WeakKeyDictionary()


def of(reactor):
    """The :class:`Turn` of *reactor*, made on first use."""
    turn = _turns.get(reactor)
    if turn is None:
        turn = _turns[reactor] = Turn()
    return turn
