"""One of N shared-nothing daemon processes: the call IDs it owns and the GRE it captures.

``--shard I/N`` (docs/multiworker.md) runs a daemon as shard *I* of *N* independent
processes.  The 16-bit call-ID space (the IDs the far side keys GRE with:
docs/pptp-call-ids.md) is cut into N contiguous ranges; shard *I* allocates only from
``[I*65536//N, (I+1)*65536//N)`` (never 0) and its capture filter asks the kernel for GRE
keyed with those IDs only, so no packet is seen by two processes and no state is shared.

The GRE call ID sits 6 bytes into the enhanced GRE header (RFC 2637 s4.1), after an IP
header of IHL*4 bytes: ``ip[(ip[0] & 0xf) * 4 + 6:2]``, so IP options are followed.  A
non-first IPv4 fragment carries no GRE header: it cannot be told apart, so it reaches every
shard, and a shard that did not take its first fragment passes it over (counted as
``fragments_other_shard``, not as a drop: see ``ipfrag.Reassembler(tails_open=False)``).
"""
from dataclasses import dataclass

__all__ = ["Shard", "UNSHARDED", "parse_shard", "shard_index", "ID_SPACE"]

ID_SPACE = 65536
_GRE_CALL_ID = "ip[(ip[0] & 0xf) * 4 + 6:2]"
_LATER_FRAGMENT = "ip[6:2] & 0x1fff != 0"  # fragment offset > 0: no GRE header in it


@dataclass(frozen=True)
class Shard:
    """Shard *index* of *count* (0-based)."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not 1 <= self.count <= 256 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 0 <= I < N <= 256")

    @property
    def low(self):
        """First key of this shard's slice of the 16-bit space (the filter's lower bound)."""
        return self.index * ID_SPACE // self.count

    @property
    def high(self):
        """One past the last key of the slice."""
        return (self.index + 1) * ID_SPACE // self.count

    @property
    def first(self):
        """First call ID this shard allocates (0 is never a call ID)."""
        return max(1, self.low)

    @property
    def last(self):
        """Last call ID this shard allocates."""
        return self.high - 1

    @property
    def sharded(self):
        return self.count > 1

    def owns(self, call_id):
        return self.low <= call_id < self.high

    def bpf_clause(self):
        """The capture-filter clause that keeps this shard's GRE (None when unsharded)."""
        if not self.sharded:
            return None
        return (f"({_LATER_FRAGMENT} or ({_GRE_CALL_ID} >= {self.low} and "
                f"{_GRE_CALL_ID} < {self.high}))")

    def __str__(self):
        return f"{self.index}/{self.count}"

    def snapshot(self):
        """For the status page: ``"I/N"`` and the call IDs it allocates."""
        return {"shard": str(self), "first_id": self.first, "last_id": self.last}


UNSHARDED = Shard(0, 1)


def shard_index(call_id, count):
    """Which of *count* shards owns *call_id* (the I with low <= call_id < high)."""
    return ((call_id + 1) * count - 1) // ID_SPACE


def parse_shard(text):
    """``"I/N"`` -> Shard; ValueError with a one-line reason otherwise."""
    index, slash, count = str(text).strip().partition("/")
    try:
        if not slash:
            raise ValueError
        return Shard(int(index), int(count))
    except ValueError as e:
        reason = str(e) if str(e).startswith("shard") else "expected I/N, e.g. 0/2 (0 <= I < N <= 256)"
        raise ValueError(f"--shard {str(text).strip()!r}: {reason}") from None
