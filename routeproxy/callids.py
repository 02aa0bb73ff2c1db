"""16-bit PPTP call-ID allocation: one space per scope, looked up both ways, aged out.

The design both daemons use (docs/architecture.md): each side of the proxy owns the ID space
it *faces*, so no two sessions can collide in either direction.

* The LRP faces the PPTP clients.  It allocates the IDs its clients see in place of pptpd's
  (``L``), from one scope for all of the LRP's calls, and demultiplexes client GRE by them.
* The RRP faces pptpd.  It allocates the IDs pptpd sees in place of the clients' (``R``), one
  scope per upstream server address, and demultiplexes pptpd's GRE by them.

Clients' own IDs (``C``) and pptpd's (``S``) are never allocated here: they travel as owners
or tags.  An *owner* is whatever hashable value names the call to the caller, e.g.
``(session_id, client_call_id)``.

Allocation walks forward from a cursor, like ephemeral ports: first through IDs never handed
out (starting at a random point, so a restarted daemon does not hand a peer the IDs it saw
just before), then through released IDs oldest first.  So a just-released ID comes back only
when it is the last free one, every operation is O(1), and an empty scope costs a few
objects, not a 65535-entry table.  ID 0 is never allocated.
"""
import random
import time
from collections import OrderedDict, deque

__all__ = ["CallIDExhausted", "CallIDSpace", "FIRST_ID", "LAST_ID"]

FIRST_ID = 1
LAST_ID = 0xFFFF
DEFAULT_IDLE = 300.0  # seconds; longer than pptpd's 60 s echo + 60 s hang-up


class CallIDExhausted(Exception):
    """Every ID of a scope is in use."""

    def __init__(self, scope, capacity):
        self.scope = scope
        self.capacity = capacity
        super().__init__(f"call-ID scope {scope!r} is exhausted: all {capacity} IDs are in use")


class _Entry:
    __slots__ = ("owner", "last_seen")

    def __init__(self, owner, last_seen):
        self.owner = owner
        self.last_seen = last_seen


class CallIDSpace:
    """The call IDs of one scope ("the addresses this side faces").

    *clock* returns seconds and must not go backwards (``time.monotonic``,
    ``reactor.seconds``); *idle* is the default age for :meth:`expire`; *first*/*last* bound
    the IDs (a small range makes exhaustion testable); *start* is the first ID handed out
    (random if None).
    """

    def __init__(self, name="", clock=time.monotonic, idle=DEFAULT_IDLE,
                 first=FIRST_ID, last=LAST_ID, start=None):
        if not FIRST_ID <= first <= last <= LAST_ID:
            raise ValueError(f"ID range {first}..{last} not within {FIRST_ID}..{LAST_ID}")
        if start is None:
            start = random.SystemRandom().randint(first, last)
        elif not first <= start <= last:
            raise ValueError(f"start {start} not within {first}..{last}")
        self.name = name
        self.idle = idle
        self._clock = clock
        self._first = first
        self._last = last
        self._capacity = last - first + 1
        self._cursor = start  # next never-used ID
        self._fresh = self._capacity  # how many never-used IDs remain from the cursor on
        self._released = deque()  # free IDs that were used before, oldest release first
        self._entries = OrderedDict()  # id -> _Entry, least recently seen first
        self._ids = {}  # owner -> id

    @property
    def capacity(self):
        return self._capacity

    def __len__(self):
        return len(self._entries)

    def __contains__(self, call_id):
        return call_id in self._entries

    def __iter__(self):
        """``(id, owner)`` for every ID in use, least recently seen first."""
        return ((call_id, entry.owner) for call_id, entry in list(self._entries.items()))

    def __repr__(self):
        return f"<CallIDSpace {self.name!r} {len(self)}/{self._capacity} in use>"

    def allocate(self, owner):
        """A free ID for *owner* (hashable, holding no ID in this scope yet)."""
        if owner in self._ids:
            raise ValueError(f"{owner!r} already holds call ID {self._ids[owner]} in scope {self.name!r}")
        if self._fresh:
            call_id = self._cursor
            self._cursor = call_id + 1 if call_id < self._last else self._first
            self._fresh -= 1
        elif self._released:
            call_id = self._released.popleft()
        else:
            raise CallIDExhausted(self.name, self._capacity)
        self._entries[call_id] = _Entry(owner, self._clock())
        self._ids[owner] = call_id
        return call_id

    def owner_of(self, call_id):
        """The owner of *call_id*, or None if it is not in use."""
        entry = self._entries.get(call_id)
        return None if entry is None else entry.owner

    def id_of(self, owner):
        """The ID *owner* holds, or None."""
        return self._ids.get(owner)

    def release(self, call_id):
        """Free *call_id*; return its owner, or None if it was not in use (so it is idempotent)."""
        entry = self._entries.pop(call_id, None)
        if entry is None:
            return None
        del self._ids[entry.owner]
        self._released.append(call_id)
        return entry.owner

    def release_owner(self, owner):
        """Free the ID *owner* holds; return it, or None if it held none."""
        call_id = self._ids.get(owner)
        if call_id is not None:
            self.release(call_id)
        return call_id

    def touch(self, call_id, now=None):
        """Record activity on *call_id* (a control message or GRE); False if it is not in use."""
        entry = self._entries.get(call_id)
        if entry is None:
            return False
        entry.last_seen = self._clock() if now is None else now
        self._entries.move_to_end(call_id)
        return True

    def expire(self, now=None, idle=None):
        """Release every ID not touched for *idle* seconds; return the released ``(id, owner)``.

        For calls that never completed (a request whose reply never came) or whose clear was
        lost.  Costs O(released): entries are kept least recently seen first.
        """
        now = self._clock() if now is None else now
        deadline = now - (self.idle if idle is None else idle)
        released = []
        entries = self._entries
        while entries:
            call_id, entry = next(iter(entries.items()))
            if entry.last_seen > deadline:
                break
            self.release(call_id)
            released.append((call_id, entry.owner))
        return released
