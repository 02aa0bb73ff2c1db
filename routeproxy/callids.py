"""16-bit PPTP call-ID allocation: one space per scope, looked up both ways, released.

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

An ID is held until its owner releases it: nothing here ages IDs out.
"""
import random
from collections import deque

__all__ = ["CallIDExhausted", "CallIDSpace", "FIRST_ID", "LAST_ID"]

FIRST_ID = 1
LAST_ID = 0xFFFF


class CallIDExhausted(Exception):
    """Every ID of a scope is in use."""

    def __init__(self, scope, capacity):
        self.scope = scope
        self.capacity = capacity
        super().__init__(f"call-ID scope {scope!r} is exhausted: all {capacity} IDs are in use")


class CallIDSpace:
    """The call IDs of one scope ("the addresses this side faces").

    *first*/*last* bound the IDs (a small range makes exhaustion testable); *start* is the
    first ID handed out (random if None).
    """

    def __init__(self, name="", first=FIRST_ID, last=LAST_ID, start=None):
        if not FIRST_ID <= first <= last <= LAST_ID:
            raise ValueError(f"ID range {first}..{last} not within {FIRST_ID}..{LAST_ID}")
        if start is None:
            start = random.SystemRandom().randint(first, last)
        elif not first <= start <= last:
            raise ValueError(f"start {start} not within {first}..{last}")
        self.name = name
        self._first = first
        self._last = last
        self._capacity = last - first + 1
        self._cursor = start  # next never-used ID
        self._fresh = self._capacity  # how many never-used IDs remain from the cursor on
        self._released = deque()  # free IDs that were used before, oldest release first
        self._owners = {}  # id -> owner, in allocation order
        self._ids = {}  # owner -> id

    @property
    def capacity(self):
        return self._capacity

    def __len__(self):
        return len(self._owners)

    def __contains__(self, call_id):
        return call_id in self._owners

    def __iter__(self):
        """``(id, owner)`` for every ID in use, oldest allocation first."""
        return iter(list(self._owners.items()))

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
        self._owners[call_id] = owner
        self._ids[owner] = call_id
        return call_id

    def owner_of(self, call_id):
        """The owner of *call_id*, or None if it is not in use."""
        return self._owners.get(call_id)

    def id_of(self, owner):
        """The ID *owner* holds, or None."""
        return self._ids.get(owner)

    def release(self, call_id):
        """Free *call_id*; return its owner, or None if it was not in use (so it is idempotent)."""
        if call_id not in self._owners:
            return None
        owner = self._owners.pop(call_id)
        del self._ids[owner]
        self._released.append(call_id)
        return owner

    def release_owner(self, owner):
        """Free the ID *owner* holds; return it, or None if it held none."""
        call_id = self._ids.get(owner)
        if call_id is not None:
            self.release(call_id)
        return call_id

    def snapshot(self):
        """This scope as plain data for the status page: its name, IDs in use, capacity."""
        return {"scope": self.name, "in_use": len(self), "capacity": self._capacity}
