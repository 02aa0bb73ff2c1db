"""When to drop captured GRE by its age: a CoDel-like gate in front of the daemon.

A byte or packet limit on the capture ring cannot tell a burst from a standing queue: the
ring holds ~3,900 packets, 35 ms of 64-byte GRE at full load or 190 ms of 1400-byte GRE at
20 k packets/s, and once the daemon falls behind that whole depth is added to every packet's
latency.  The time a packet waited (now minus the kernel's receive timestamp) tells them
apart, as in CoDel (RFC 8289): a queue whose head has waited longer than *target* for a whole
*interval* is standing, not a burst; then packets older than *target* are dropped until the
head is younger than *target* again.  A short stall (a busy host, a GC pause) is absorbed and
drops nothing; an overload drops at the daemon's door, counted, and keeps the queue near
*target*.

Simplified against RFC 8289: no square-root control law (in the dropping state every packet
over *target* goes, so the queue is emptied down to *target* in one wake-up), and the head's
age is sampled once per wake-up (the last packet read), not per packet.
"""


class SojournGate:
    """Dropping state of one capture; the port asks it once per wake-up."""

    def __init__(self, target, interval=0.1):
        self.target, self.interval = target, interval
        self.dropping = False
        self.above_since = None  # when the head first waited longer than target, or None
        self.episodes = 0  # times the gate started dropping

    def drop_before(self, now):
        """Capture timestamps older than this are dropped now (0.0: none)."""
        return now - self.target if self.dropping else 0.0

    def observe(self, now, head):
        """After a wake-up: *head* is the capture time of the last packet read (0: unknown)."""
        if not head:
            return
        if now - head < self.target:
            self.above_since = None
            self.dropping = False
        elif self.above_since is None:
            self.above_since = now
        elif not self.dropping and now - self.above_since >= self.interval:
            self.dropping = True
            self.episodes += 1
