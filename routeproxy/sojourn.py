"""When to drop captured GRE by its age: CoDel (RFC 8289) in front of the daemon.

A byte or packet limit on the capture ring cannot tell a burst from a standing queue: the
ring holds ~3,900 packets, 35 ms of 64-byte GRE at full load or 190 ms of 1400-byte GRE at
20 k packets/s, and once the daemon falls behind that whole depth is added to every packet's
latency.  The time a packet waited (now minus the kernel's receive timestamp) tells them
apart, as in CoDel: a queue whose head has waited longer than *target* for a whole
*interval* is standing, not a burst.  Then one packet older than *target* is dropped, and the
next one *interval*/sqrt(count) later (CoDel's control law), until the head is younger than
*target* again.  A short stall (a busy host, a GC pause) is absorbed and drops nothing; a
standing queue gets drops that start gently and grow until it is gone.  A flood that does
not slow down (nothing inside reads drops as congestion) would outrun that ramp and fill the
ring, so while dropping, a packet that waited longer than *ceiling* (10x *target*) is
dropped too, however many.

Gentle matters: PPTP carries TCP, and TCP reads each drop as congestion.  An earlier version
dropped every packet over *target* once the queue stood; with real peers in the UML lab that
took 506 packets from one 4 MB transfer and its TCP retransmitted 131 segments (14-25 with no
gate): a burst of loss where one drop per interval is the signal TCP needs.

Simplified against RFC 8289: the head's age is sampled once per wake-up (the last packet
read), not per packet, so the state changes at wake-ups; drops are made as packets are read.
"""
import math

INTERVAL = 0.1   # s: CoDel's interval, here and in routeproxy/native/sojourn.c's users


class SojournGate:
    """CoDel's state for one capture; the port asks it once per wake-up, and once per drop."""

    def __init__(self, target, interval=INTERVAL):
        self.target, self.interval = target, interval
        self.ceiling = 10 * target  # while dropping, older than this always goes
        self.dropping = False
        self.above_since = None  # when the head first waited longer than target, or None
        self.episodes = 0  # times the gate started dropping
        self.count = 0  # drops in this episode: they set the pace
        self.drop_next = 0.0  # while dropping: when the next drop is due
        self._left_at = None  # when the last episode ended
        self._now = 0.0

    def drop_before(self, now):
        """At a wake-up: capture timestamps older than this are dropped (0.0: none): older
        than *target* when a drop is due, else older than *ceiling* while dropping."""
        self._now = now
        return self._threshold()

    def dropped(self):
        """A packet was dropped: if it was the one due, the next is due interval/sqrt(count)
        later.  Returns the threshold for the rest of this wake-up."""
        if self._now >= self.drop_next:
            self.count += 1
            self.drop_next += self.interval / math.sqrt(self.count)
        return self._threshold()

    def _threshold(self):
        if not self.dropping:
            return 0.0
        return self._now - (self.target if self._now >= self.drop_next else self.ceiling)

    def observe(self, now, head):
        """After a wake-up: *head* is the capture time of the last packet read (0: unknown)."""
        if not head:
            return
        if now - head < self.target:
            self.above_since = None
            if self.dropping:
                self.dropping = False
                self._left_at = now
        elif self.above_since is None:
            self.above_since = now
        elif not self.dropping and now - self.above_since >= self.interval:
            self.dropping = True
            self.episodes += 1
            # RFC 8289: an episode soon after the last one goes on near its pace
            recent = self._left_at is not None and now - self._left_at < 16 * self.interval
            self.count = self.count - 2 if recent and self.count > 2 else 0
            self.drop_next = now  # the first drop is due at once


class NativeGate:
    """The same gate with its state in C (routeproxy/native/sojourn.c), for a capture whose
    frames C reads (the native pump): C drops what is too old as it reads, with this law,
    where a frame handed back to Python per drop cost a Python turn each, and an overload
    whose every frame was old turned the daemon's time into drops (512 B at 150 k/s: 6.5 k
    delivered).  The port calls it as it calls :class:`SojournGate`; *module* is
    ``routeproxy.native``'s."""

    def __init__(self, module, target, interval=INTERVAL):
        self._lib = module.lib
        self.state = module.ffi.new("struct rp_gate *")   # what the pump is given
        module.lib.rp_gate_init(self.state, target, interval)

    target = property(lambda self: self.state.target)
    interval = property(lambda self: self.state.interval)
    ceiling = property(lambda self: self.state.ceiling)
    dropping = property(lambda self: bool(self.state.dropping))
    above_since = property(lambda self: None if self.state.above_since < 0.0 else self.state.above_since)
    episodes = property(lambda self: self.state.episodes)
    count = property(lambda self: self.state.count)
    drop_next = property(lambda self: self.state.drop_next)

    def drop_before(self, now):
        return self._lib.rp_gate_drop_before(self.state, now)

    def dropped(self):
        return self._lib.rp_gate_dropped(self.state)

    def observe(self, now, head):
        self._lib.rp_gate_observe(self.state, now, head)
