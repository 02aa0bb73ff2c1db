"""Which call-ID space a peer address draws from: the one rule that differs between the sides.

The LRP hands its clients one space for all of them (``L``): GRE from any client address is
looked up there, then checked against the call's control connection.  The RRP owns one space
per pptpd address (``R``): each server chooses its own IDs, so only (address, key) names a
call.  Both the session (to allocate) and the GRE demultiplexer (to look up) ask the same
object, so the rule is written once.
"""
from routeproxy.callids import FIRST_ID, LAST_ID, CallIDSpace


class SharedScope:
    """One space for every peer address (the LRP's clients)."""

    def __init__(self, space):
        self.space = space

    def space_for(self, address):
        """The space a new control connection from *address* allocates from."""
        return self.space

    def lookup(self, address):
        """The space GRE from *address* is looked up in, or None."""
        return self.space

    def snapshot(self):
        """Call-ID usage as plain data: one entry, named after the space."""
        return [self.space.snapshot()]


class PerServerScopes:
    """One space per peer address, made on first use (the RRP's servers: few, configured)."""

    def __init__(self, name="RRP", first=FIRST_ID, last=LAST_ID):
        self.name = name
        self.first, self.last = first, last   # a shard's range (routeproxy.shard)
        self._spaces = {}

    def space_for(self, address):
        space = self._spaces.get(address)
        if space is None:
            space = self._spaces[address] = CallIDSpace(f"{self.name} towards {address}",
                                                        self.first, self.last)
        return space

    def lookup(self, address):
        return self._spaces.get(address)

    def snapshot(self):
        """Call-ID usage as plain data: one entry per server, named by its address."""
        return [dict(space.snapshot(), scope=address)
                for address, space in sorted(self._spaces.items())]
