"""IPv4 fragment reassembly for captured packets (RFC 791 s3.2, RFC 815's hole idea).

A pcap capture sees IPv4 fragments as they cross the wire, before the kernel reassembles
them.  Real PPTP clients run pppd with MTU 1500, so their GRE packets are ~1550 bytes and
arrive in two fragments.  ``Reassembler`` puts the payloads back together.

It is bounded in every direction, because fragments are cheap for anyone to send:

* at most ``max_datagrams`` datagrams in progress; a new one beyond that evicts the oldest
  (counted ``reassembly_evicted``);
* at most ``max_bytes`` stored per datagram and no byte beyond offset 65535
  (``fragment_invalid``);
* at most ``max_fragments`` fragments per datagram (``reassembly_too_many_fragments``) and
  at most ``max_per_source`` datagrams in progress per source address: a new one beyond
  that evicts *that source's* oldest (``reassembly_source_limit``), so one sender cannot
  take the table, and a sender whose fragments were lost under load (leftovers that never
  complete) is not shut out until they time out: it loses its oldest, most likely dead,
  datagrams instead of every new one.  Each fragment costs at most ``max_fragments`` steps:
  a flood costs O(packets);
* a datagram not complete ``timeout`` seconds after its first fragment is dropped
  (``reassembly_timeout``), checked whenever a fragment arrives or ``expire`` is called;
* fragments may come in any order; an exact duplicate, or an overlap carrying the same
  bytes, is ignored, and so is a fragment of one of the last ``max_datagrams`` datagrams
  already put back together (``duplicates``): pcap on "any" sees a packet that crosses a
  bridge twice (on the port, then on the bridge), and each late copy would otherwise open a
  datagram that never completes and count against its source's ``max_per_source``; an overlap carrying *different* bytes drops the whole datagram
  (``reassembly_overlap``), as RFC 5722 requires for IPv6: two readings of one datagram
  cannot both be right, and choosing one is how overlap attacks work.

Payload offsets are relative to the end of each fragment's own IP header, so the caller
passes payloads (header stripped) and gets the reassembled payload back.  Plain state,
no I/O: the clock is passed in.
"""
import bisect
import collections

__all__ = ["Reassembler", "FragmentError",
           "DROP_FRAGMENT_INVALID", "DROP_REASSEMBLY_OVERLAP", "DROP_REASSEMBLY_TIMEOUT",
           "DROP_REASSEMBLY_EVICTED", "DROP_TOO_MANY_FRAGMENTS", "DROP_SOURCE_LIMIT"]

IP_MAXPACKET = 65535

DROP_FRAGMENT_INVALID = "fragment_invalid"  # not a multiple of 8 before the end, beyond 64 KiB, ...
DROP_REASSEMBLY_OVERLAP = "reassembly_overlap"  # two fragments disagree about the same bytes
DROP_REASSEMBLY_TIMEOUT = "reassembly_timeout"  # incomplete after the timeout
DROP_REASSEMBLY_EVICTED = "reassembly_evicted"  # pushed out by newer datagrams (table full)
DROP_TOO_MANY_FRAGMENTS = "reassembly_too_many_fragments"  # more pieces than max_fragments
DROP_SOURCE_LIMIT = "reassembly_source_limit"  # its source's oldest, for a new one past max_per_source


class FragmentError(ValueError):
    """A fragment that can belong to no valid datagram (its reason is the drop reason)."""


class _Partial:
    """One datagram in progress: its fragments sorted by offset, the end once known."""

    __slots__ = ("started", "pieces", "end", "stored", "source")

    def __init__(self, started, source=None):
        self.started = started
        self.source = source
        self.pieces = []  # (offset, bytes), sorted by offset
        self.end = None  # payload length, known from the fragment with MF clear
        self.stored = 0


class Reassembler:
    """Collects fragments by key (e.g. (src, dst, id, protocol)) and returns whole payloads.

    ``add`` returns the reassembled payload when the fragment completed a datagram, else
    None.  Drops are counted in ``dropped`` (a Counter; pass the caller's own to share it).

    ``tails_open=False`` (a shard of docs/multiworker.md): only a first fragment opens a
    datagram; a later one with no datagram in progress is another shard's and is passed
    over, counted in ``foreign``, holding nothing (so the first fragment must come first).
    """

    def __init__(self, timeout=5.0, max_datagrams=256, max_bytes=IP_MAXPACKET, dropped=None,
                 max_fragments=64, max_per_source=16, tails_open=True):
        self.timeout = timeout
        self.max_datagrams = max_datagrams
        self.max_bytes = max_bytes
        self.max_fragments = max_fragments
        self.max_per_source = max_per_source
        self.dropped = dropped if dropped is not None else collections.Counter()
        self.reassembled = 0
        self.tails_open = tails_open
        self.foreign = 0  # later fragments passed over (tails_open=False)
        self.duplicates = 0  # fragments of a datagram already put back together
        self._partials = collections.OrderedDict()  # key -> _Partial, oldest first
        self._completed = collections.OrderedDict()  # key -> None, the last max_datagrams done
        self._by_source = {}   # source -> the keys of its datagrams in progress, oldest first

    def __len__(self):
        return len(self._partials)

    def add(self, key, offset, more, payload, now, source=None):
        """Take one fragment: *offset* in bytes, *more* the MF flag, *payload* its data.

        *source* (e.g. the sender's address) is what ``max_per_source`` counts by.
        Returns the whole payload (bytes) when this fragment completed it, else None.
        """
        self.expire(now)
        end = offset + len(payload)
        if (more and (len(payload) % 8 or not payload)) or offset % 8 or end > IP_MAXPACKET:
            self._drop(key, DROP_FRAGMENT_INVALID)
            return None
        partial = self._partials.get(key)
        if partial is None:
            if key in self._completed:
                self.duplicates += 1
                return None
            if offset and not self.tails_open:
                self.foreign += 1
                return None
            ofSource = self._by_source.get(source, ())
            if len(ofSource) >= self.max_per_source:
                self._forget(next(iter(ofSource)))   # the source's oldest
                self.dropped[DROP_SOURCE_LIMIT] += 1
            while len(self._partials) >= self.max_datagrams:
                self._forget(next(iter(self._partials)))
                self.dropped[DROP_REASSEMBLY_EVICTED] += 1
            partial = self._partials[key] = _Partial(now, source)
            self._by_source.setdefault(source, {})[key] = None
        try:
            self._insert(partial, offset, end, more, bytes(payload))
        except FragmentError as e:
            self._drop(key, str(e))
            return None
        whole = self._complete(partial)
        if whole is not None:
            self._forget(key)
            self.reassembled += 1
            completed = self._completed
            completed[key] = None
            if len(completed) > self.max_datagrams:
                completed.popitem(last=False)
        return whole

    def _forget(self, key):
        partial = self._partials.pop(key, None)
        if partial is not None:
            ofSource = self._by_source[partial.source]
            del ofSource[key]
            if not ofSource:
                del self._by_source[partial.source]

    def expire(self, now):
        """Drop datagrams older than the timeout (counted); returns how many."""
        partials, limit, n = self._partials, now - self.timeout, 0
        while partials:
            key, oldest = next(iter(partials.items()))
            if oldest.started > limit:
                break
            self._forget(key)
            n += 1
        if n:
            self.dropped[DROP_REASSEMBLY_TIMEOUT] += n
        return n

    def _drop(self, key, reason):
        self._forget(key)
        self.dropped[reason] += 1

    def _insert(self, partial, offset, end, more, data):
        if not more:
            if partial.end is not None and partial.end != end:
                raise FragmentError(DROP_REASSEMBLY_OVERLAP)  # two different last fragments
            partial.end = end
        if partial.end is not None and end > partial.end:
            raise FragmentError(DROP_REASSEMBLY_OVERLAP)  # data beyond the last fragment
        contained = False
        for start, piece in partial.pieces:
            low, high = max(start, offset), min(start + len(piece), end)
            if low >= high:
                continue
            if piece[low - start:high - start] != data[low - offset:high - offset]:
                raise FragmentError(DROP_REASSEMBLY_OVERLAP)
            if start <= offset and end <= start + len(piece):
                contained = True  # a duplicate: nothing new
        if contained:
            return
        if partial.stored + len(data) > self.max_bytes:
            raise FragmentError(DROP_FRAGMENT_INVALID)
        if len(partial.pieces) >= self.max_fragments:
            raise FragmentError(DROP_TOO_MANY_FRAGMENTS)
        partial.stored += len(data)
        bisect.insort(partial.pieces, (offset, data), key=lambda p: p[0])

    @staticmethod
    def _complete(partial):
        if partial.end is None or partial.stored < partial.end:
            return None   # not enough bytes yet: no walk over the pieces
        covered = 0
        for start, piece in partial.pieces:
            if start > covered:
                return None  # a hole
            covered = max(covered, start + len(piece))
        if covered < partial.end:
            return None
        whole = bytearray(partial.end)
        for start, piece in partial.pieces:
            whole[start:start + len(piece)] = piece
        return bytes(whole)
