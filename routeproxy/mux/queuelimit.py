"""The GRE limit of a link's unsent bytes, from the link's own delivery rate
(``--link-queue-delay``; docs/limits.md).

The GRE watermark is a byte count: it bounds memory, not delay.  At 1 Gbit/s its 256 KiB
drain in 2 ms; on a 20 Mbit/s path between the LRP and the RRP they stand for 105 ms in
front of every packet of every session.  So each link measures how fast its TCP delivers
(the kernel's own rate sample, ``TCP_INFO``'s ``tcpi_delivery_rate``, as BBR does: the
largest sample of the last 0.3 s) and lowers its GRE limit to the bytes that rate drains in
the target delay, never under a floor (a wake-up's burst) nor over the watermark.  A fast
link's limit stays the watermark; a slow link drops GRE at the door instead of queueing it.

Which samples count, and when they are taken, is about the onset of an overload:

- A sample taken while TCP had data waiting (busy) is the path's rate.  One taken while it
  had nothing to send (app limited) only says the path is at least that fast, and through a
  path's token bucket it measures the line, not the path: an idle link's pings read
  220-340 Mbit/s behind a 20 Mbit/s bucket, an overload's first 10 ms 1.2-1.8 Gbit/s.  So
  an app-limited sample counts only when it raises the figure and only until the link's
  first busy sample, which replaces them at once.
- The last busy figure stays the link's starting point for as long as the link lives, after
  any idle: the path it measured is the one the next overload meets.  With the figure
  forgotten after 10 s idle (the first rule), an overload after idle filled the watermark
  before the next sample came (20 Mbit/s, the first 0.5 s: p99 120 ms; kept: 26 ms, the
  steady state's).  A figure that is now too low costs only bursts above the limit while
  TCP never waits, and the first busy sample raises it.
- Until the first busy sample the link samples every ``SEEK_INTERVAL`` while it sends: the
  kernel's samples are the path's ~20 ms into an overload (tbf, 20 Mbit/s, measured), and a
  new link at the watermark fills it in ~100 ms at twice that rate.  (The floor until then
  bounded a new link's first packets better, but a fast link whose TCP never waits, as on
  the benchmark's veth at 60 k packets/s, would keep it.)  After it, every ``INTERVAL``
  while the link sends.  A link that sends nothing is looked at every ``IDLE_INTERVAL``,
  busy figure or not: a daemon may hold many links, and each look returns the C loop to
  Python, so an idle link must not tick 50 times a second.  (A new link that stays idle and
  then meets an overload at once waits for that look, up to 0.5 s, once in its life.)
"""
import collections
import socket
import struct

# struct tcp_info (linux/tcp.h, Linux >= 4.9): the byte holding the app-limited bit, and
# tcpi_delivery_rate (bytes/s)
_APP_LIMITED_BYTE = 7
_DELIVERY_RATE = struct.Struct("=Q")
_DELIVERY_RATE_OFFSET = 160
_TCP_INFO_LENGTH = _DELIVERY_RATE_OFFSET + _DELIVERY_RATE.size


def deliveryRate(sock):
    """``(bytes per second, app limited)`` of the TCP socket *sock*'s latest delivery rate
    sample, or None where the kernel does not say (no socket, an old kernel)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LENGTH)
    except (OSError, AttributeError, ValueError):
        return None
    if len(info) < _TCP_INFO_LENGTH:
        return None
    return (_DELIVERY_RATE.unpack_from(info, _DELIVERY_RATE_OFFSET)[0],
            bool(info[_APP_LIMITED_BYTE] & 1))


class QueueLimit:
    """One link's GRE limit from the rate samples it is given (:meth:`observe`, each
    :meth:`interval` apart): :meth:`of` the watermark."""

    SEEK_INTERVAL = 0.02   # s between samples until the first busy one
    INTERVAL = 0.1     # s between samples while the link sends
    IDLE_INTERVAL = 0.5   # s between looks while it does not (a daemon may hold many links)
    WINDOW = 0.3       # s of samples the rate is the largest of
    HOLD = 10.0        # s an app-limited figure is kept when no sample comes (no busy one yet)
    FLOOR = 32768      # bytes: the limit never goes under this (a wake-up's burst)

    def __init__(self, delay, floor=FLOOR):
        self.delay = delay          # s (0: off, the watermark alone)
        self.floor = floor
        self.limit = None           # bytes the rate sends in the delay (>= floor), None: unknown
        self.rate = None            # bytes/s, None: not known
        self.samples = 0            # rate samples taken
        self.lowered = 0            # of them, those after which the limit was under the ceiling
        self._recent = collections.deque()   # (time, rate) of the window
        self._lastAt = None         # time of the newest sample kept
        self._busyAt = None         # time of the newest sample taken while TCP had data waiting

    @property
    def seeking(self):
        """No busy sample yet: the link's rate is not the path's."""
        return self._busyAt is None

    def interval(self, sent):
        """s to the next sample, the link having *sent* since the last one or not."""
        if not sent:
            return self.IDLE_INTERVAL
        return self.SEEK_INTERVAL if self._busyAt is None else self.INTERVAL

    def of(self, watermark):
        """The GRE limit under *watermark*: the lower of the two."""
        limit = self.limit
        return watermark if limit is None or limit >= watermark else limit

    def observe(self, now, rate, appLimited, watermark):
        """One sample of the link's delivery rate at *now*."""
        if self.delay <= 0:
            return
        self.samples += 1
        recent = self._recent
        while recent and now - recent[0][0] > self.WINDOW:
            recent.popleft()
        if rate > 0 and not appLimited:
            if self._busyAt is None:
                recent.clear()   # the app-limited figures before it: the line's, not the path's
            self._busyAt = now
            recent.append((now, rate))
            self._lastAt = now
        elif rate > 0 and self._busyAt is None and (self.rate is None or rate > self.rate):
            recent.append((now, rate))
            self._lastAt = now
        if recent:
            self.rate = max(r for _, r in recent)
        elif self._busyAt is None and (self._lastAt is None or now - self._lastAt > self.HOLD):
            self.rate = None
        # else the last figure holds: a busy one for the link's life
        self.limit = None if self.rate is None else int(max(self.floor, self.rate * self.delay))
        if self.of(watermark) < watermark:
            self.lowered += 1

    def snapshot(self, watermark):
        """For the link's status (docs/status.md ``send_queue``)."""
        return {"limit": self.of(watermark), "watermark": watermark,
                "delay_ms": round(self.delay * 1000.0, 3),
                "delivery_rate": None if self.rate is None else int(self.rate),
                "samples": self.samples, "lowered": self.lowered}
