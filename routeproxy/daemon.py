"""The service around a proxy as an operator runs it: start-up errors, reload, graceful stop.

* **Start-up errors**: everything that needs privileges (the listening ports, the GRE
  capture and raw sockets) opens in ``privilegedStartService``, before twistd drops them
  (``--uid/--gid``).  What fails there becomes a :class:`StartupError`: one line naming the
  option and the fix; :func:`installExceptHook` prints it instead of a traceback and the
  process exits 1 (twistd has removed its pidfile by then).
* **Reload** (SIGHUP): the command line and ``--config`` file are parsed again (certificates
  reread); if anything is wrong the running configuration stays and one line says why.
  Otherwise each *reloader* (a callable ``(old, new) -> [change lines]``, one per component:
  the proxy's allow-list or profiles, its TLS settings, and any other part such as a CRL)
  applies its part: new settings apply to new sessions, and sessions a removed permission or
  profile covered end with a PPTP teardown.
* **Graceful stop**: every session ends with a PPTP teardown to both peers
  (:meth:`routeproxy.relay.RelaySession.shutDown`), each link gets GOAWAY, the listeners
  stop, and the process waits (at most ``stopGrace`` s) until those bytes have left.
"""
import datetime
import signal
import sys

from twisted.application.service import MultiService, Service
from twisted.internet import defer, error, task
from twisted.logger import Logger
from twisted.python import usage

from routeproxy.capture import GREIOError
from routeproxy.mux.frames import LinkError
from routeproxy.shard import UNSHARDED
from routeproxy.version import versionLine, versions

__all__ = ["DaemonService", "StartupError", "installExceptHook"]


class StartupError(Exception):
    """A fatal start-up problem, as one line that names the option and the fix."""


def describeFailure(child, e):
    """*e* raised while *child* opened what it needs -> the one line an operator reads."""
    option = getattr(child, "optionName", None) or "a listener"
    if isinstance(e, error.CannotListenError):
        reason = e.socketError
        text = getattr(reason, "strerror", None) or str(reason)
        errno = getattr(reason, "errno", None)
        if errno == 13:    # EACCES: a port below 1024
            fix = "ports below 1024 need root or CAP_NET_BIND_SERVICE"
        elif errno == 98:  # EADDRINUSE
            fix = "another process holds it: stop it or choose another port"
        elif errno == 99:  # EADDRNOTAVAIL
            fix = "that address is not configured on this host"
        else:
            fix = "check the address"
        return f"{option} {e.interface or '0.0.0.0'}:{e.port}: cannot listen ({text}); {fix}"
    if isinstance(e, GREIOError):
        text = str(e)
        if "not permitted" in text or "need root" in text or "Permission denied" in text:
            fix = "GRE needs CAP_NET_RAW: run as root or grant it (the systemd units do; docs/deploy.md)"
        elif "No such device" in text:
            fix = "no such interface: give an existing one (or any)"
        else:
            fix = "GRE needs CAP_NET_RAW and an existing interface (docs/deploy.md)"
        return f"{option}: {text}; {fix}"
    return f"{option}: cannot start: {e}"


class DaemonService(MultiService):
    """A proxy's service tree (its children: listeners, the link, the GRE port, status).

    *proxy* is a LocalRouteProxy or RemoteRouteProxy (``relay``, ``links``, ``snapshot``);
    *options* the parsed :class:`routeproxy.config.ConfigOptions`; *restartOnly* the settings
    a reload cannot change (listening addresses, interfaces, ...).
    """

    log = Logger()
    stopGrace = 3.0      # seconds the peers' teardown and GOAWAY have to leave
    shard = UNSHARDED    # --shard I/N, as started (the taps set it)

    def __init__(self, role, proxy, options, reactor, restartOnly=(), handleSignals=True):
        super().__init__()
        self.role = role
        self.proxy = proxy
        self.options = options
        self.reactor = reactor
        self.reloaders = []
        self.restartOnly = tuple(restartOnly)
        self.handleSignals = handleSignals
        self.reloads = 0
        self.reloadFailures = 0

    # --- start -----------------------------------------------------------------------------

    def privilegedStartService(self):
        Service.privilegedStartService(self)
        for child in self:
            try:
                child.privilegedStartService()
            except Exception as e:
                raise StartupError(describeFailure(child, e)) from None

    def startService(self):
        self.log.info("{version} starting as the {role}", version=versionLine(), role=self.role)
        if self.handleSignals:
            signal.signal(signal.SIGHUP, self._hangUp)
        super().startService()

    def _hangUp(self, signum, frame):
        self.reactor.callFromThread(self.reload)

    # --- reload ----------------------------------------------------------------------------

    def reload(self):
        """Read the configuration again and apply what changed; False if it was refused."""
        if not self.running:
            return False
        source = self.options["config"] or "the command line"
        try:
            new = self.options.reparse()
        except usage.UsageError as e:
            self.reloadFailures += 1
            self.log.error("reload refused: {error}; the running configuration stays",
                           error=str(e))
            return False
        changes = []
        for reloader in self.reloaders:
            changes.extend(reloader(self.options, new))
        for name in self.restartOnly:
            if self.options[name] != new[name]:
                changes.append(f"--{name} changed: takes effect at the next restart")
        self.options = new
        self.reloads += 1
        self.log.info("reloaded {source}: {changes}", source=source,
                      changes="; ".join(changes) if changes else "nothing changed")
        return True

    # --- status ----------------------------------------------------------------------------

    def snapshot(self):
        """The proxy's snapshot, with what the service knows: versions, reloads, and when
        our certificate expires."""
        snap = dict(self.proxy.snapshot(), build=versions(), reloads=self.reloads,
                    reload_failures=self.reloadFailures, **self.shard.snapshot())
        notAfter = getattr(self.proxy.tls, "notAfter", None)
        if notAfter is not None:
            left = notAfter - datetime.datetime.now(datetime.timezone.utc)
            snap["certificate"] = {"not_after": notAfter.isoformat(),
                                   "expires_in_seconds": round(left.total_seconds())}
        return snap

    # --- stop ------------------------------------------------------------------------------

    def stopService(self):
        """PPTP teardown of every session, GOAWAY on every link, listeners stopped, then
        wait (bounded) until those bytes have left."""
        transports = self.proxy.relay.shutDown(f"{self.role} stopping")
        links = list(self.proxy.links)
        for connection in links:
            connection.goAway(LinkError.NO_ERROR, f"{self.role} shutting down")
        stopped = super().stopService()
        flushed = self.whenGone(transports, links)
        return defer.gatherResults([stopped, flushed])

    def whenGone(self, transports, links):
        """Fires once every transport has disconnected and every link is gone, or after
        ``stopGrace`` seconds, whichever is first."""
        deadline = self.reactor.seconds() + self.stopGrace

        def gone():
            return (all(getattr(t, "disconnected", True) for t in transports)
                    and all(c.linkGone for c in links))

        def poll():
            if gone() or self.reactor.seconds() >= deadline:
                loop.stop()

        if gone():
            return defer.succeed(None)
        loop = task.LoopingCall(poll)
        loop.clock = self.reactor
        return loop.start(0.05, now=False).addCallback(lambda _: None)


def installExceptHook():
    """Make a :class:`StartupError` that escapes twistd one line on stderr (and in the log),
    exit status 1, no traceback; anything else keeps Python's report."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, StartupError):
            Logger(namespace="routeproxy").critical("cannot start: {error}", error=str(value))
            sys.__stderr__.write(f"routeproxy: cannot start: {value}\n")
            sys.__stderr__.flush()
            return
        previous(kind, value, tb)

    sys.excepthook = hook
