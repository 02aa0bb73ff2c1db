"""Every limit that keeps one client or one peer from starving the others, in one record.

Each field has a safe default, an option and an INI key (:func:`settings`), a counter in
the daemon's snapshot (``limits`` and ``refusals``) and a line in docs/limits.md.  The
daemons read the values from one :class:`Limits` object; nothing else holds these numbers.
"""
import dataclasses

from twisted.python import usage

from routeproxy.config import Setting, parseCount, parseMilliseconds, parseSeconds


@dataclasses.dataclass(frozen=True)
class Limits:
    # --- the LRP's clients ----------------------------------------------------------------
    startTimeout: float = 10.0        # s a client has to send its Start-Control-Connection-Request
    maxPerAddress: int = 64           # control connections one client address may hold
    maxPending: int = 256             # connections (all addresses) that have not sent it yet
    maxCalls: int = 16                # calls one control connection may hold
    callTimeout: float = 60.0         # s a call request may wait for its answer
    idShare: float = 0.25             # share of a call-ID space one client address (LRP) or
                                      # one link (RRP) may hold
    # --- the RRP's links ------------------------------------------------------------------
    handshakeTimeout: float = 10.0    # s a TCP connection has to finish TLS and HELLO
    maxStartups: tuple = (10, 30, 100)  # OpenSSH MaxStartups start:rate:full, pre-TLS connections
    # --- both: the mux link ---------------------------------------------------------------
    muxSendBuffer: int = 64 * 1024 * 1024  # unsent bytes to a peer before the link is dropped
    muxStallTimeout: float = 60.0     # s the peer may leave over greWatermark bytes unread
    greWatermark: int = 262144        # unsent link bytes above which GRE is dropped, not queued
    linkMaxSojourn: float = 0.005     # s GRE read from the link may have waited in the kernel's
                                      # receive queue once it stands (CoDel; 0: no gate)
    linkQueueDelay: float = 0.010     # s of the link's measured delivery rate the GRE limit holds
                                      # at most (never under 32 KiB nor over greWatermark; 0: off)
    # --- both: the GRE capture ------------------------------------------------------------
    greCaptureBuffer: int = 8 * 1024 * 1024  # bytes of captured GRE the kernel holds unread
    greNoCallShare: int = 32          # GRE of no call per 50 ms the native capture gives the Python
                                      # path (counted and logged by reason); the rest C drops

    def idQuota(self, capacity):
        """How many IDs of a space of *capacity* one client address or one link may hold."""
        return max(1, int(capacity * self.idShare))

    def snapshot(self):
        """The values in force, as plain data (docs/status.md ``limits``)."""
        values = dataclasses.asdict(self)
        values["maxStartups"] = ":".join(str(v) for v in self.maxStartups)
        return values


DEFAULT = Limits()


def parseBytes(value, what, minimum, maximum):
    """A whole number of bytes from *minimum* to *maximum*."""
    count = parseCount(value, what, minimum)
    if count > maximum:
        raise usage.UsageError(f"{what} {value!r}: must be at most {maximum}")
    return count


def parseShare(value, what="--id-share"):
    try:
        share = float(str(value).strip())
    except ValueError:
        share = 0.0
    if not 0.0 < share <= 1.0:
        raise usage.UsageError(f"{what} {value!r}: a fraction in (0, 1]")
    return share


def parseStartups(value, what="--max-startups"):
    """``START:RATE:FULL`` (or one number, FULL) as OpenSSH's MaxStartups."""
    parts = str(value).strip().split(":")
    if len(parts) == 1:
        parts = [parts[0], "100", parts[0]]
    if len(parts) != 3:
        raise usage.UsageError(f"{what} {value!r}: expected START:RATE:FULL")
    start, rate, full = (parseCount(p, what) for p in parts)
    if not start <= full or rate > 100:
        raise usage.UsageError(f"{what} {value!r}: need START <= FULL and RATE <= 100")
    return start, rate, full


# (option name, Limits field, parser, help, which daemons)
_OPTIONS = (
    ("start-timeout", "startTimeout", lambda v: parseSeconds(v, "--start-timeout", 0.1),
     "seconds a client has to send Start-Control-Connection-Request", ("lrp",)),
    ("max-per-address", "maxPerAddress", lambda v: parseCount(v, "--max-per-address"),
     "control connections one client address may hold", ("lrp",)),
    ("max-pending", "maxPending", lambda v: parseCount(v, "--max-pending"),
     "connections (all addresses) still waiting for their Start request", ("lrp",)),
    ("max-calls", "maxCalls", lambda v: parseCount(v, "--max-calls"),
     "calls one control connection may hold", ("lrp", "rrp")),
    ("call-timeout", "callTimeout", lambda v: parseSeconds(v, "--call-timeout", 0.1),
     "seconds a call request may go unanswered before it is cleared", ("lrp", "rrp")),
    ("id-share", "idShare", parseShare,
     "share of a call-ID space one client address (LRP) or one link (RRP) may hold",
     ("lrp", "rrp")),
    ("handshake-timeout", "handshakeTimeout", lambda v: parseSeconds(v, "--handshake-timeout", 0.1),
     "seconds a connection has to finish TLS and HELLO", ("rrp",)),
    ("max-startups", "maxStartups", parseStartups,
     "START:RATE:FULL: connections not through TLS yet; beyond START refuse RATE% rising to "
     "100% at FULL (OpenSSH MaxStartups)", ("rrp",)),
    ("mux-send-buffer", "muxSendBuffer", lambda v: parseCount(v, "--mux-send-buffer"),
     "bytes left unsent to a peer before its link is dropped", ("lrp", "rrp")),
    ("mux-stall-timeout", "muxStallTimeout", lambda v: parseSeconds(v, "--mux-stall-timeout", 0.1),
     "seconds a peer may leave the link's send buffer above the GRE watermark", ("lrp", "rrp")),
    ("gre-watermark", "greWatermark", lambda v: parseCount(v, "--gre-watermark"),
     "unsent bytes on the link above which GRE is dropped (counted), not queued; the "
     "bound on the link's standing queue", ("lrp", "rrp")),
    ("link-max-sojourn", "linkMaxSojourn", lambda v: parseMilliseconds(v, "--link-max-sojourn"),
     "ms the link's bytes may wait in the kernel's receive queue once it has stood longer than "
     "that for 100 ms; the GRE of older reads is then dropped unsent, one frame and then more "
     "often while it stands (CoDel), and all of it older than 10x (0: never)", ("lrp", "rrp")),
    ("link-queue-delay", "linkQueueDelay", lambda v: parseMilliseconds(v, "--link-queue-delay"),
     "ms of the link's measured delivery rate its unsent bytes may hold before GRE is dropped "
     "(counted as watermark), not queued: the GRE watermark lowered to that on a slow link, "
     "never under 32 KiB (0: the watermark alone)", ("lrp", "rrp")),
    ("gre-capture-buffer", "greCaptureBuffer",
     lambda v: parseBytes(v, "--gre-capture-buffer", 65536, 1 << 30),
     "bytes of captured GRE the kernel holds until the daemon reads them (pcap's ring); what "
     "does not fit is dropped, counted", ("lrp", "rrp")),
    ("gre-no-call-share", "greNoCallShare", lambda v: parseCount(v, "--gre-no-call-share", 0),
     "GRE of no call (a call ID nobody holds, a wrong source, malformed) per 50 ms that the "
     "native capture gives the Python path, which counts and logs each by its reason; the rest "
     "is dropped in C, counted as no_call", ("lrp", "rrp")),
)


_MILLISECONDS = ("linkMaxSojourn", "linkQueueDelay")   # held in seconds, given and shown in ms


def settings(daemon):
    """The :class:`~routeproxy.config.Setting` records of *daemon* ("lrp" or "rrp")."""
    result = []
    for name, field, parse, text, daemons in _OPTIONS:
        if daemon in daemons:
            default = getattr(DEFAULT, field)
            shown = ":".join(map(str, default)) if isinstance(default, tuple) else default
            if field in _MILLISECONDS:
                shown = f"{default * 1000:g}"
            result.append(Setting(name, default, f"{text} [default: {shown}]", parse))
    return tuple(result)


def fromOptions(options):
    """The :class:`Limits` an Options object (after postOptions) asks for."""
    values = {field: options[name] for name, field, _, _, _ in _OPTIONS if name in options}
    return Limits(**values)


def reconfigureLimits(proxy, old, new):
    """A reload: new limits for new connections and calls, the --crl file reread (for the
    LRP or RRP *proxy*; *old*/*new* are its parsed Options).  Returns lines for the log."""
    changes = []
    bounds = new.get("limits")
    if bounds is not None and bounds != proxy.limits:
        proxy.limits = proxy.relay.limits = bounds
        for part in (getattr(proxy, "admission", None), getattr(proxy, "startups", None)):
            if part is not None:
                part.limits = bounds
        changes.append("limits (docs/limits.md) for new connections and calls")
    if proxy.tls is not None and new.get("tls") is not None and (new.get("crl") or old.get("crl")):
        proxy.tls.useCRLOf(new["tls"])
        changes.append(f"--crl {new['crl'] or 'off'}: {len(proxy.tls.revoked)} revoked (new links)")
    return changes
