"""Command-line options and INI files for both daemons.

Every option is also a key in the INI file named by ``--config``; options given
on the command line win over the file, and the file wins over built-in
defaults.  A bad value is a ``usage.UsageError`` whose text is one clear line,
which twistd prints without a traceback.
"""
import configparser
import dataclasses
import hashlib
import ipaddress
import sys
from typing import Any, Callable

from twisted.python import usage

from routeproxy.shard import UNSHARDED, parse_shard


@dataclasses.dataclass(frozen=True)
class Setting:
    """One option of a daemon: also a key of its INI section."""

    name: str                          # the long option and the INI key
    default: Any
    help: str
    parse: Callable[[str], Any] = str.strip
    repeatable: bool = False           # given several times (or comma-separated in INI)
    split: Callable[[str], list] = None  # INI value -> entries, when commas alone do not do


def parseHostPort(text, default_port=None, what="address"):
    """``HOST:PORT`` (or ``HOST`` when *default_port* is given) -> (host, port)."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if port is None or port == "":
        if default_port is None:
            raise usage.UsageError(f"{what} {text!r}: expected HOST:PORT")
        port = default_port
    try:
        port = int(port)
    except ValueError:
        raise usage.UsageError(f"{what} {text!r}: port {port!r} is not a number")
    if not 0 < port < 65536:
        raise usage.UsageError(f"{what} {text!r}: port {port} is out of range 1-65535")
    if not host:
        raise usage.UsageError(f"{what} {text!r}: missing host")
    return host, port


def parseListen(text, default_port, what):
    """A listening ``HOST:PORT`` whose host must be an IPv4 literal: GRE is captured and sent
    on IPv4 raw sockets, so a name or an IPv6 address cannot be served."""
    host, port = parseHostPort(text, default_port, what)
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise usage.UsageError(f"{what} {text.strip()!r}: the host must be an IPv4 address "
                               "(0.0.0.0 for all), not a name or IPv6")
    return host, port


def parseIPv4(text, what):
    try:
        return str(ipaddress.IPv4Address(text.strip()))
    except ValueError:
        raise usage.UsageError(f"{what} {text.strip()!r}: not an IPv4 address")


def parseChoice(choices, what):
    def parse(text):
        value = text.strip()
        if value not in choices:
            raise usage.UsageError(f"{what} {value!r}: choose one of {', '.join(choices)}")
        return value
    return parse


def parseStatus(text):
    """``--status``: ``unix:PATH`` (a socket only its owner may use) or ``HOST:PORT``."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path.startswith("/"):
            raise usage.UsageError(f"--status {text!r}: give an absolute path, unix:/run/...")
        return ("unix", path)
    return parseHostPort(text, None, "--status")


def fileDigest(*paths):
    """One digest of the files' contents (None for one that cannot be read): whether a
    reload found new certificates."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            with open(path, "rb") as f:
                digest.update(f.read())
        except (OSError, TypeError):
            digest.update(b"\0missing")
    return digest.hexdigest()


def parseCount(value, what, minimum=1):
    try:
        count = int(str(value).strip())
    except ValueError:
        raise usage.UsageError(f"{what} {value!r}: not a whole number")
    if count < minimum:
        raise usage.UsageError(f"{what} {value!r}: must be at least {minimum}")
    return count


def parseSeconds(value, what, minimum=0.0, maximum=3600.0):
    try:
        seconds = float(str(value).strip())
    except ValueError:
        raise usage.UsageError(f"{what} {value!r}: not a number of seconds")
    if not minimum <= seconds <= maximum:
        raise usage.UsageError(f"{what} {value!r}: must be between {minimum:g} and {maximum:g} s")
    return seconds


#: The link's settings, the same on both daemons (docs/protocol.md s.9 and s.10).
LINK_SETTINGS = (
    Setting("resume-grace", 30.0, "seconds the sessions of a lost link wait for it to be "
            "resumed; 0 turns resuming off (sessions end with their link, as in mux version 1) "
            "[default: 30]", lambda v: parseSeconds(v, "--resume-grace")),
    Setting("dead-timeout", 8.0, "seconds of silence after which the link is considered dead "
            "(a PING goes out every quarter of it) [default: 8]",
            lambda v: parseSeconds(v, "--dead-timeout", 2.0, 600.0)),
)


def parseMilliseconds(value, what):
    """A duration in ms (0 allowed: off) -> seconds."""
    try:
        ms = float(str(value).strip())
    except ValueError:
        raise usage.UsageError(f"{what} {value!r}: not a number of milliseconds")
    if not 0 <= ms <= 60000:
        raise usage.UsageError(f"{what} {value!r}: must be 0 (off) to 60000 ms")
    return ms / 1000.0


def checkCapture(options):
    """--gre-capture raw cannot shard: a shard's capture filter picks its call IDs (native-raw
    attaches it to its socket in the kernel).  --gre-capture native and native-raw need
    routeproxy.native built (docs/fastpath.md step 3: the capture pump and the link read);
    auto (the default) is native-raw where it is built (native, libpcap's ring in C, when
    --gre-interface names an interface: only the ring captures on one), else pcap, and leaves
    the reason in ``gre-capture-note`` for the daemon's start-up line."""
    kind = options["gre-capture"]
    if kind == "raw" and options["shard"].sharded:
        raise usage.UsageError("--gre-capture raw cannot be sharded (--shard): a shard's pcap "
                               "filter picks its calls' GRE; use --gre-capture pcap or native-raw")
    options["gre-capture-note"] = None
    if kind in ("native", "native-raw", "auto"):
        from routeproxy import native as nativeModule
        module, reason = nativeModule.load()
        if module is not None:
            if kind == "auto":   # the kernel reassembles for a raw socket: fragments in C
                kind = "native-raw" if options["gre-interface"] == "any" else "native"
            options["gre-capture"] = kind
        elif kind != "auto":
            raise usage.UsageError(f"--gre-capture {kind}: {reason}")
        else:
            options["gre-capture"] = "pcap"
            options["gre-capture-note"] = f"--gre-capture auto: pcap, as {reason}"


def daemonSettings(peers, linkPeer):
    """The settings both daemons have, worded for the side: *peers* are the PPTP peers whose
    GRE it captures ("clients", "servers"), *linkPeer* the daemon at the link's far end."""
    return (
        Setting("gre-interface", "any", f"interface GRE from {peers} is captured on "
                "[default: any]"),
        Setting("gre-capture", "auto", "how GRE is received: auto (native-raw where "
                "routeproxy.native is built, native if --gre-interface names one, else pcap) or "
                "pcap (libpcap's ring on "
                "--gre-interface: the --gre-max-sojourn gate, shards, drops counted) or raw (a raw "
                "GRE socket: the kernel puts fragments back together and captures nothing twice, "
                "one read per packet; no sojourn gate, no shards; docs/gre-io.md) or native (pcap "
                f"read in C, established calls' GRE from {peers} framed for the link there, and "
                f"the link's GRE frames sent to {peers} in C; docs/fastpath.md; needs "
                "python -m routeproxy.native.build) or native-raw (as native, from a raw GRE "
                "socket read in C: the kernel's reassembled packets, so fragmented GRE is framed "
                "in C too; the sojourn gate and shards work; --gre-interface unused) "
                "[default: auto]",
                parseChoice(("auto", "pcap", "raw", "native", "native-raw"), "--gre-capture")),
        Setting("data-plane", "auto", "with the native capture: pump (one C call per "
                "wake-up of the capture, from Twisted's dispatch), loop (the reactor's poll in "
                "C: the capture's wake-ups handled there, Python entered only when something "
                "needs it; docs/fastpath.md step 5) or auto (loop where the capture is native "
                "and the reactor epoll, else the pump or Python's path, without a warning) "
                "[default: auto]",
                parseChoice(("auto", "pump", "loop"), "--data-plane")),
        Setting("gre-max-sojourn", 0.005, "ms captured GRE may wait once the capture queue "
                "has stood longer than that for 100 ms; older packets are then dropped unread, one "
                "and then more often while it stands (CoDel), and every one older than 10x it "
                "(0: never) [default: 5]", lambda v: parseMilliseconds(v, "--gre-max-sojourn")),
        Setting("status", None, "HOST:PORT or unix:PATH for the status/metrics HTTP endpoint; "
                "a unix socket (mode 0600) or loopback recommended [default: off]", parseStatus),
        Setting("log-format", "text", "text or json (one JSON object per line) [default: text]",
                parseChoice(("text", "json"), "--log-format")),
        Setting("crl", None, f"CRL file (PEM) of the CA: revoked {linkPeer} certificates are "
                "refused; reread on reload [default: none]"),
        Setting("shard", UNSHARDED, "I/N: run as shard I of N independent processes: call IDs "
                "from the I-th of N ranges, GRE captured for those only, the listener shared "
                "(SO_REUSEPORT); see docs/multiworker.md [default: 0/1, no sharding]", parseShard),
    )


def parseShard(value):
    try:
        return parse_shard(value)
    except ValueError as e:
        raise usage.UsageError(str(e))


def parseCIDR(text):
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as e:
        raise usage.UsageError(f"--allow {text!r}: {e}")


@dataclasses.dataclass(frozen=True)
class Profile:
    """A PPTP server the RRP may dial, and how many calls one control connection to it carries.

    pptpd (poptop) serves one call per control connection, hence the default of 1; 0 means
    no limit (RFC 2637 allows many, as accel-ppp does).
    """

    host: str
    port: int = 1723
    callsPerConnection: int = 1

    def __str__(self):
        return f"{self.host}:{self.port}"


PROFILE_SETTINGS = ("calls-per-connection",)


def parseProfile(text, default_port=1723):
    """``NAME=HOST[:PORT][,calls-per-connection=N]`` -> (name, :class:`Profile`)."""
    head, *settings = text.split(",")
    name, sep, target = head.partition("=")
    name = name.strip()
    if not sep or not name:
        raise usage.UsageError(f"--profile {text!r}: expected NAME=HOST[:PORT][,calls-per-connection=N]")
    host, port = parseHostPort(target, default_port, what=f"--profile {name}")
    calls = 1
    for setting in settings:
        key, sep, value = setting.partition("=")
        if key.strip() not in PROFILE_SETTINGS or not sep:
            raise usage.UsageError(f"--profile {name}: unknown setting {setting.strip()!r} "
                                   "(expected calls-per-connection=N)")
        calls = parseCount(value, f"--profile {name} calls-per-connection", minimum=0)
    return name, Profile(host, port, calls)


def splitProfiles(value):
    """An INI ``profile`` value -> entries: separated by commas or lines, a
    ``calls-per-connection=N`` belonging to the entry before it."""
    entries = []
    for piece in (p.strip() for p in value.replace("\n", ",").split(",")):
        if not piece:
            continue
        if entries and piece.partition("=")[0].strip() in PROFILE_SETTINGS:
            entries[-1] += "," + piece
        else:
            entries.append(piece)
    return entries


def _handler(name, doc, repeatable):
    def handler(self, value):
        if repeatable:
            self._given.setdefault(name, []).append(value)
        else:
            self._given[name] = value

    handler.__doc__ = doc
    return handler


class ConfigOptions(usage.Options):
    """usage.Options with ``--config FILE`` and per-key precedence.

    Subclasses list ``settings`` (:class:`Setting` records).  Values stay None until
    ``postOptions`` merges command line, file, defaults.
    """

    section = None  # INI section read from --config
    settings = ()
    required = ()   # settings that must end up with a value
    optFlags = [["check", None, "validate the configuration (files, certificates, addresses), "
                 "print one line and exit 0 (valid) or 1"]]

    def __init_subclass__(cls, **kw):
        # usage.Options finds handlers by their opt_ method names; make one per
        # setting so repeatable options append and we know what was given.
        super().__init_subclass__(**kw)
        for setting in cls.settings:
            setattr(cls, "opt_" + setting.name.replace("-", "_"),
                    _handler(setting.name, setting.help, setting.repeatable))

    def __init__(self):
        super().__init__()
        self._given = {}
        self["config"] = None

    def opt_config(self, path):
        """INI file with the same keys as the long options (the options win)."""
        self["config"] = path

    def opt_version(self):
        """print routeproxy's version and exit"""
        from routeproxy.version import versionLine
        sys.stdout.write(versionLine() + "\n")
        sys.exit(0)

    @property
    def program(self):
        return f"routeproxy-{self.section}"

    def parseConfig(self, argv):
        """Parse *argv* (and the --config file it names); raises usage.UsageError."""
        self.argv = list(argv)
        usage.Options.parseOptions(self, self.argv)

    def parseOptions(self, options=None):
        """As usage.Options, but a bad option is one line on stderr and exit status 1
        (twistd would print the whole help first); ``--check`` ends here too."""
        try:
            self.parseConfig(sys.argv[1:] if options is None else options)
        except usage.UsageError as e:
            sys.stderr.write(f"{self.program}: {e} (see --help)\n")
            sys.exit(1)
        if self["check"]:
            sys.stdout.write(f"{self.program}: configuration OK\n")
            sys.exit(0)

    def reparse(self):
        """A fresh instance parsed from the same arguments (and so the same --config file,
        read again): the reload's new configuration.  Raises usage.UsageError."""
        fresh = type(self)()
        fresh.parseConfig([a for a in self.argv if a != "--check"])
        return fresh

    def postOptions(self):
        from_file = {}
        if self["config"]:
            from_file = readINI(self["config"], self.section)
        known = {setting.name for setting in self.settings}
        for key in from_file:
            if key not in known:
                raise usage.UsageError(
                    f"{self['config']}: unknown key {key!r} in [{self.section}]"
                )
        for setting in self.settings:
            name, parse = setting.name, setting.parse
            if name in self._given:
                raw = self._given[name]
            elif name in from_file:
                raw = from_file[name]
                if setting.repeatable and setting.split is not None:
                    raw = setting.split(raw)
                elif setting.repeatable:
                    raw = [v for v in raw.replace(",", "\n").split("\n") if v.strip()]
            else:
                self[name] = setting.default
                continue
            self[name] = [parse(v) for v in raw] if setting.repeatable else parse(raw)
        missing = [name for name in self.required if self[name] is None]
        if missing:
            raise usage.UsageError("missing required option(s): " + ", ".join("--" + m for m in missing))
        self.check()

    def check(self):
        """Cross-field checks; subclasses raise usage.UsageError."""


def readINI(path, section):
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise usage.UsageError(f"--config {path}: {e.strerror}")
    except configparser.ParsingError as e:
        lineno, line = e.errors[0]
        line = line.strip("'").replace("\\n", "").strip()
        raise usage.UsageError(f"--config {path} line {lineno}: cannot parse {line!r} "
                               "(expected KEY = VALUE)")
    except configparser.MissingSectionHeaderError as e:
        raise usage.UsageError(f"--config {path} line {e.lineno}: a key before any [section] header")
    except configparser.Error as e:
        where = f" line {e.lineno}" if getattr(e, "lineno", None) else ""
        text = str(e).splitlines()[0].split("]: ", 1)[-1]
        raise usage.UsageError(f"--config {path}{where}: {text}")
    if not parser.has_section(section):
        raise usage.UsageError(f"--config {path}: no [{section}] section")
    return dict(parser.items(section))
