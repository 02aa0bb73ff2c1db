"""A soak: hours (or minutes) of PPTP churn and link trouble through real daemons, for leaks,
counter drift and rare crashes (docs/soak.md).

::

    python -m benchmarks.soak [--minutes 2] [--clients 8] [--calls 3] [--packets 20]
                              [--cut-every 20] [--cuts reset,restart,reset,expire]
                              [--capture native --capture pcap] [--slice 30] [--out FILE]
    python -m benchmarks.soak --check FILE [thresholds]   # judge a saved report again

One topology per capture kind (tests/support/e2e.py: clients -> LRP -> NAT -> RRP -> scripted
pptpd), all built at the start and kept for the whole run, the daemons started as users start
them (``twistd -n routeproxy-lrp|rrp --gre-capture KIND --status ...``).  The run is cut in
slices; each slice loads one kind, the kinds in turn, so both are compared side by side under
the same churn:

* every client (a thread in the clients' namespace driving the project's echo client,
  tests/support/pptppeers.EchoClient) connects, opens ``--calls`` calls, sends ``--packets``
  GRE per call that the scripted server echoes, then ends the session one of four ways in
  turn (clear every call and stop; stop with the calls up; a TCP reset; a plain close), and
  again, until the slice ends;
* every ``--cut-every`` seconds of load the link has trouble, the kinds of ``--cuts`` in turn:
  ``reset`` (the NAT resets the link's TCP for ``--cut-length`` s: sessions detach and
  resume), ``expire`` (the same for longer than ``--resume-grace``: detached sessions end),
  ``restart`` (the RRP stopped and started: the resume is refused, sessions end), ``kill``
  (the same with SIGKILL);
* the loaded daemons are sampled every ``--sample-every`` s (status, RSS, descriptors); at the
  end of each slice the clients stop, the daemons must settle (no session, call or call ID
  left) and both kinds' daemons are sampled "quiet": flow entries (must be 0), RSS and
  descriptors come from these.

Each client round is *clean* when it overlaps no link trouble (from the cut until the link is
up again, plus a second): a clean round's lost GRE must be matched by drops the daemons
counted outside the trouble.  At the end: a table per kind and the checks; every failed check
is one ``FAIL`` line and the exit status is 1.  The report (JSON) holds every sample, so
``--check`` can judge it again with other thresholds.
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

from routeproxy import gre, pptp
from tests.support import daemons, e2e, netns, pptppeers

DEFAULT_CUTS = "reset,expire,reset,restart,reset,expire,reset,kill"
CUT_KINDS = ("reset", "expire", "restart", "kill")
ENDINGS = ("clear", "stop", "clear", "reset", "clear", "close")
STATUS_PORT = 8190
TROUBLE_MARGIN = 1.0     # seconds around a cut that still count as trouble
# drops of the facing peer's GRE before it is a session's (routeproxy/gredemux.py)
PRE_SESSION_DROPS = ("gre_unknown_call_id", "gre_wrong_source", "gre_unknown_source", "gre_malformed")
LOG_PROBLEMS = ("Traceback (most recent call last)", "Unhandled Error", "Unhandled error")


class Limits:
    """The thresholds of the checks (command-line options; --check can change them)."""

    def __init__(self, rss_growth=24.0, rss_slack=3.0, fd_slack=8, warmup=None, min_span=60.0, rewarmup=60.0):
        self.rss_growth = rss_growth   # MiB per hour after warm-up, extrapolated
        self.rss_slack = rss_slack     # MiB: below this much growth, no verdict on the rate
        self.fd_slack = fd_slack       # descriptors more at the end than at the start
        self.warmup = warmup           # seconds of a daemon's life not judged for RSS ...
        self.rewarmup = rewarmup       # ... or of a restarted one's (the load is already running)
        self.min_span = min_span       # seconds of quiet samples after warm-up for an RSS verdict

    def as_dict(self):
        return dict(vars(self))


def default_warmup(minutes):
    """A quarter of the run, at least 20 s and at most 5 minutes."""
    return min(300.0, max(20.0, minutes * 60 * 0.25))


# --------------------------------------------------------------------------------------------
# pure parts: the checks on a report (tests/unit/test_soak.py)


def rss_trend(points):
    """Least-squares slope of [(t, kib), ...] in MiB per hour, and last - first in MiB."""
    if len(points) < 2:
        return None, None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var <= 0:
        return None, None
    slope = sum((t - mt) * (v - mv) for t, v in points) / var   # KiB per second
    return slope * 3600 / 1024, (points[-1][1] - points[0][1]) / 1024


def quiet(samples):
    return [s for s in samples if s.get("phase") == "quiet" and s.get("rss_kib") is not None]


def rss_verdict(incarnation, limits, first=True):
    """(growth MiB/h or None, growth MiB or None, after-warm-up sample or None, failure text or None)
    of one process (*first*: started with the run, else restarted during it)."""
    samples = quiet(incarnation["samples"])
    if not samples:
        return None, None, None, None
    start = incarnation["started"]
    warmup = (limits.warmup or 0) if first else min(limits.warmup or 0, limits.rewarmup)
    warm = [s for s in samples if s["t"] - start >= warmup]
    if len(warm) < 3 or warm[-1]["t"] - warm[0]["t"] < limits.min_span:
        return None, None, (warm[0] if warm else None), None
    rate, growth = rss_trend([(s["t"], s["rss_kib"]) for s in warm])
    if rate is None:
        return None, None, warm[0], None
    failure = None
    if rate > limits.rss_growth and growth > limits.rss_slack:
        failure = (f"RSS grows {rate:.1f} MiB/h after warm-up ({growth:+.1f} MiB over "
                   f"{(warm[-1]['t'] - warm[0]['t']) / 60:.1f} min; limit {limits.rss_growth:g} MiB/h "
                   f"beyond {limits.rss_slack:g} MiB)")
    return rate, growth, warm[0], failure


def fd_verdict(incarnation, limits):
    samples = [s for s in incarnation["samples"] if s.get("phase") == "quiet" and s.get("fds") is not None]
    if len(samples) < 2:
        return None
    grown = samples[-1]["fds"] - samples[0]["fds"]
    if grown > limits.fd_slack:
        return (f"descriptors grow {samples[0]['fds']} -> {samples[-1]['fds']} (+{grown}; slack "
                f"{limits.fd_slack}) between quiet samples")
    return None


def leftovers(sample):
    """What a quiet sample still holds that it must not: a list of "name=value"."""
    found = []
    if not sample.get("settled", True):
        found += [f"calls={sample.get('calls')}", f"sessions={sample.get('sessions')}",
                  f"call_ids_in_use={sample.get('call_ids_in_use')}"]
    if (sample.get("calls") or 0) == 0:
        for key in ("native_entries", "native_in_c", "link_entries", "link_in_c"):
            if sample.get(key):
                found.append(f"{key}={sample[key]}")
    return found


def evaluate(report, limits):
    """Every failed check of *report* as one line (empty: the run passed)."""
    failures = []
    for event in report.get("deaths", []):
        failures.append(f"FAIL {event['kind']} {event['daemon']}: died unexpectedly "
                        f"(rc={event.get('rc')}) at {event.get('t', 0):.0f} s: {event.get('log', '')[-300:]!r}")
    for kind, per in report.get("daemons", {}).items():
        for name, incarnations in per.items():
            for number, inc in enumerate(incarnations):
                who = f"{kind} {name}" + (f" (incarnation {number + 1}, pid {inc.get('pid')})" if len(incarnations) > 1 else "")
                for sample in quiet(inc["samples"]) + [s for s in inc["samples"] if s.get("phase") == "quiet" and s.get("rss_kib") is None]:
                    left = leftovers(sample)
                    if left:
                        failures.append(f"FAIL {who}: left after all clients stopped at {sample['t']:.0f} s: "
                                        + ", ".join(left))
                fd = fd_verdict(inc, limits)
                if fd:
                    failures.append(f"FAIL {who}: {fd}")
                failure = rss_verdict(inc, limits, number == 0)[3]
                if failure:
                    failures.append(f"FAIL {who}: {failure}")
                if inc.get("log_problems"):
                    failures.append(f"FAIL {who}: {inc['log_problems']} traceback(s)/unhandled error(s) in "
                                    f"its log, first: {inc.get('log_first_problem', '')[:300]!r}")
    for piece in report.get("slices", []):
        kind, gre = piece["kind"], piece["gre"]
        accounted = gre["counted_calm"] + gre.get("server_dropped", 0)
        if gre["clean_lost"] > accounted:
            failures.append(f"FAIL {kind} slice {piece['index']}: {gre['clean_lost']} GRE lost in rounds without link "
                            f"trouble, only {accounted} counted as drops meanwhile (daemons "
                            f"{gre['counted_calm']}, server {gre.get('server_dropped', 0)})")
        if gre["clean_foreign"]:
            failures.append(f"FAIL {kind} slice {piece['index']}: {gre['clean_foreign']} GRE reached a client that "
                            f"was not its echo (misdelivered or altered), without link trouble")
        if piece["rounds"]["clean_errors"]:
            failures.append(f"FAIL {kind} slice {piece['index']}: {piece['rounds']['clean_errors']} control "
                            f"error(s) in rounds without link trouble, e.g. {piece['rounds']['error_samples'][:2]}")
        if not piece.get("settled", True):
            failures.append(f"FAIL {kind} slice {piece['index']}: the daemons did not settle after the clients "
                            f"stopped: {piece.get('unsettled')}")
    for kind in report.get("daemons", {}):
        ledger = kind_summary(report, kind, limits).get("ledger")
        if ledger and ledger["in_difference"]:
            failures.append(f"FAIL {kind} lrp: counters drift: the clients sent {ledger['clients_sent']} GRE, the LRP "
                            f"counted {ledger['lrp_in']} in and {ledger['lrp_dropped_before']} dropped before a session "
                            f"({ledger['in_difference']:+d})")
        if ledger and ledger["out_difference"] < 0:
            failures.append(f"FAIL {kind} lrp: counters drift: the clients got {ledger['clients_got']} GRE, more than "
                            f"the {ledger['lrp_out']} the LRP counted out")
    for problem in report.get("harness_problems", []):
        failures.append(f"FAIL harness: {problem}")
    return failures


def overlaps(start, end, windows, margin=TROUBLE_MARGIN):
    """True when [start, end] meets any (a, b) of *windows* widened by *margin*."""
    return any(start <= b + margin and end >= a - margin for a, b in windows)


def counted_drops(sample):
    """Every packet a daemon says it dropped: its drops by reason and its GRE port's."""
    return sum((sample.get("drops") or {}).values()) + sum((sample.get("port_dropped") or {}).values())


def calm_drops(samples, windows):
    """Drops counted between consecutive samples of one daemon (one incarnation) in intervals
    that meet no trouble window."""
    total = 0
    for a, b in zip(samples, samples[1:]):
        if not overlaps(a["t"], b["t"], windows):
            total += max(0, counted_drops(b) - counted_drops(a))
    return total


# --------------------------------------------------------------------------------------------
# samples


def extract(status):
    """The parts of /status.json the soak follows (docs/status.md)."""
    port = status.get("gre_port") or {}
    pump, link = port.get("native") or {}, port.get("native_link") or {}
    resume = status.get("resume") or {}
    return {
        "calls": status.get("calls"),
        "sessions": len(status.get("sessions") or []),
        "call_ids_in_use": sum(s.get("in_use", 0) for s in status.get("call_ids") or []),
        "links_up": sum(1 for link_ in status.get("links") or [] if link_.get("up")),
        "totals": status.get("totals"),
        "drops": status.get("drops") or {},
        "port_dropped": port.get("dropped") or {},
        "port": {k: port.get(k) for k in ("received", "delivered", "sent", "duplicates")},
        "native_entries": pump.get("entries"), "native_in_c": pump.get("in_c"),
        "native_framed": pump.get("framed"), "native_handed_back": pump.get("handed_back"),
        "native_written": pump.get("written"),
        "link_entries": link.get("entries"), "link_in_c": link.get("in_c"), "link_sent_by_c": link.get("sent_by_c"),
        "resume": {k: resume.get(k) for k in ("resumes_done", "resumes_refused", "sessions_resumed",
                                              "sessions_expired", "detached_sessions")},
        "link_reconnects": status.get("link_reconnects"),
        "refusals": status.get("refusals") or {},
        "upstream_open": (status.get("upstream_connections") or {}).get("open"),
    }


def memory_split(pid):
    """KiB resident in the C heap ([heap]: glibc's brk arena, where malloc puts small C
    allocations) and in the other anonymous mappings (pymalloc's arenas, large mallocs), from
    /proc/PID/smaps: which allocator a growth comes from."""
    heap = anon = 0
    current = None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if not line[0].isupper() or ":" not in line.split()[0]:
                    fields = line.split()
                    current = fields[5] if len(fields) > 5 else ""
                elif line.startswith("Rss:"):
                    kib = int(line.split()[1])
                    if current == "[heap]":
                        heap += kib
                    elif current == "":
                        anon += kib
    except OSError:
        return None, None
    return heap, anon


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# the run


class Incarnation:
    """One process of a daemon: its pid, start and samples."""

    def __init__(self, pid, started):
        self.pid, self.started, self.samples = pid, started, []
        self.log_start = 0
        self.log_problems, self.log_first_problem = 0, ""

    def as_dict(self):
        return {"pid": self.pid, "started": self.started, "samples": self.samples,
                "log_problems": self.log_problems, "log_first_problem": self.log_first_problem}


class Rig:
    """One capture kind's topology, daemons and clients' history."""

    def __init__(self, soak, lab, kind):
        self.soak, self.kind, self.opts = soak, kind, soak.opts
        self.topo = e2e.build(self.opts.clients, lab=lab)
        try:
            e2e.make_certs(self.topo, ["lrp0"])
            self.server = e2e.start_server(self.topo, first_call_id=1)
            self.extra = ["--gre-capture", kind, "--resume-grace", str(self.opts.resume_grace)]
            self.rrp = e2e.start_rrp(self.topo, status_port=STATUS_PORT, extra=self.extra)
            self.lrp = e2e.start_lrp(self.topo, status_port=STATUS_PORT, extra=self.extra)
        except Exception:   # not a rig yet: Soak.run would not clean it up
            self.topo.cleanup()
            raise
        self.lock = threading.RLock()
        self.restarting = False
        self.incarnations = {"lrp": [Incarnation(self.lrp.pid, soak.now())],
                             "rrp": [Incarnation(self.rrp.pid, soak.now())]}
        self.rounds_done = [0] * self.opts.clients   # per client: round numbers stay unique
        self.busy = 0.0            # seconds this kind has been loaded
        self.next_cut = self.opts.cut_every
        self.cuts = []             # {"kind", "start", "end", "lost_link", ...}
        self.server_dropped = 0
        self.target = (self.lrp.address, e2e.PPTP_PORT)

    def daemons(self):
        return {"lrp": self.lrp, "rrp": self.rrp}

    def windows(self):
        return [(c["start"], c["end"]) for c in self.cuts]

    def sample(self, name, phase, settled=True):
        """One sample of daemon *name* (status, RSS, descriptors) into its current incarnation."""
        with self.lock:
            daemon, inc = self.daemons()[name], self.incarnations[name][-1]
            entry = {"t": self.soak.now(), "phase": phase, "settled": settled}
            if not daemon.alive():
                entry["dead"] = True
                inc.samples.append(entry)
                return entry
            try:
                entry["rss_kib"] = daemons.rss_kib(inc.pid)
            except OSError:
                entry["rss_kib"] = None
            entry["fds"] = fd_count(inc.pid)
            if phase == "quiet":
                entry["heap_kib"], entry["anon_kib"] = memory_split(inc.pid)
            try:
                entry.update(extract(daemon.status(timeout=5)))
            except Exception as e:   # a status endpoint that does not answer is itself a finding
                entry["status_error"] = f"{type(e).__name__}: {e}"
            inc.samples.append(entry)
            self.scan_log(name)
            return entry

    def scan_log(self, name):
        inc = self.incarnations[name][-1]
        daemon = self.daemons()[name]
        text = daemon.log()
        if len(text) < inc.log_start:   # twistd rotated the log (1 MB): the rest of the old one first
            try:
                with open(f"{daemon.log_path}.1", errors="replace") as f:
                    new = f.read()[inc.log_start:] + text
            except OSError:
                new = text
        else:
            new = text[inc.log_start:]
        inc.log_start = len(text)
        for marker in LOG_PROBLEMS:
            count = new.count(marker)
            if count:
                inc.log_problems += count
                if not inc.log_first_problem:
                    at = new.index(marker)
                    inc.log_first_problem = new[max(0, at - 200):at + 1500]

    def check_alive(self):
        with self.lock:
            if self.restarting:
                return
            for name, daemon in self.daemons().items():
                if not daemon.alive() and not getattr(daemon, "_soak_death_noted", False):
                    daemon._soak_death_noted = True
                    self.soak.deaths.append({"kind": self.kind, "daemon": name, "rc": daemon.proc.poll(),
                                             "t": self.soak.now(), "log": daemon.describe()[-3000:]})

    # -- link trouble ----------------------------------------------------------------------------

    def cut(self, what):
        """One spell of link trouble of kind *what*; returns when the link is up again."""
        lab, nat, opts = self.topo.lab, self.topo.nat.ns, self.opts
        before = self.lrp_status_quiet()
        start = self.soak.now()
        record = {"kind": what, "start": start}
        self.cuts.append(record)   # counts as trouble from now on
        record["end"] = start + 3600   # open until the link is back
        if what in ("reset", "expire"):
            seconds = opts.cut_length if what == "reset" else opts.resume_grace + opts.cut_length + 1
            rules = [("-p", "tcp", "--dport", str(e2e.RRP_PORT)), ("-p", "tcp", "--sport", str(e2e.RRP_PORT))]
            verdict = ("-j", "REJECT", "--reject-with", "tcp-reset")
            for rule in rules:
                lab.iptables(nat, "-I", "FORWARD", *rule, *verdict)
            time.sleep(seconds)
            for rule in rules:
                lab.iptables(nat, "-D", "FORWARD", *rule, *verdict)
        else:
            with self.lock:
                self.restarting = True
                self.sample("rrp", "busy")     # the old process's last counters
                self.rrp.stop(sig=signal.SIGTERM if what == "restart" else signal.SIGKILL)
            try:
                time.sleep(opts.cut_length)
                with self.lock:
                    self.scan_log("rrp")    # the old process's last lines; the new one's follow
                    offset = self.incarnations["rrp"][-1].log_start
                    self.rrp.start()
                    self.rrp.wait_ready(listen=(self.rrp.address, self.rrp.port), status_port=STATUS_PORT)
                    self.incarnations["rrp"].append(Incarnation(self.rrp.pid, self.soak.now()))
                    self.incarnations["rrp"][-1].log_start = offset
            finally:
                with self.lock:
                    self.restarting = False
        deadline = time.monotonic() + 30 + opts.resume_grace
        up = False
        while time.monotonic() < deadline and self.lrp.alive():
            status = self.lrp_status_quiet()
            if status and any(link["up"] for link in status.get("links") or []) \
                    and not (status.get("resume") or {}).get("detached_sessions"):
                up = True
                break
            time.sleep(0.1)
        after = self.lrp_status_quiet() or {}
        record["end"] = self.soak.now()
        record["link_back"] = up
        record["link_lost"] = (after.get("link_reconnects") or 0) > ((before or {}).get("link_reconnects") or 0)
        for key in ("resumes_done", "resumes_refused", "sessions_resumed", "sessions_expired"):
            record[key] = ((after.get("resume") or {}).get(key) or 0) - (((before or {}).get("resume") or {}).get(key) or 0)
        if not up:
            self.soak.harness_problems.append(f"{self.kind}: the LRP's link was not up again after a {what} cut")
        return record

    def lrp_status_quiet(self):
        try:
            return self.lrp.status(timeout=3)
        except Exception:
            return None

    # -- settling --------------------------------------------------------------------------------

    def settle(self, timeout):
        """Wait until both daemons hold no session, call or call ID; (settled, what is left)."""
        seen = {}

        def settled():
            for name, daemon in self.daemons().items():
                try:
                    status = daemon.status(timeout=3)
                except Exception as e:
                    seen[name] = f"status: {e}"
                    return False
                info = extract(status)
                seen[name] = {k: info[k] for k in ("calls", "sessions", "call_ids_in_use")}
                if info["calls"] or info["sessions"] or info["call_ids_in_use"]:
                    return False
            return True

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if settled():
                return True, seen
            time.sleep(0.2)
        return False, seen

    def server_status(self):
        try:
            status = self.server.status(timeout=10)
        except Exception as e:
            return {"error": f"{type(e).__name__}: {e}"}
        return {"dropped": sum((status.get("dropped") or {}).values()), "dropped_by_reason": status.get("dropped"),
                "active_calls": len(status.get("active_calls") or []), "connections_open": status.get("connections_open"),
                "gre_echoed": status.get("gre_echoed"), "connections": status.get("connections"),
                "errors": (status.get("errors") or [])[:5]}


class ClientWorker(threading.Thread):
    """One client slot: rounds of connect, calls, GRE, an ending, until told to stop."""

    def __init__(self, rig, index):
        super().__init__(daemon=True, name=f"soak-{rig.kind}-client{index}")
        self.rig, self.index = rig, index
        self.stopping = threading.Event()
        self.rounds = []
        self.error = None

    def run(self):
        rig, opts = self.rig, self.rig.opts
        bind = rig.topo.client_addresses[self.index]
        try:
            with rig.topo.lab.inside(rig.topo.clients_ns):
                raw = pptppeers.open_raw_gre(bind)
                try:
                    while not self.stopping.is_set():
                        rig.rounds_done[self.index] += 1
                        self.rounds.append(self.one_round(raw, bind, rig.rounds_done[self.index]))
                        self.stopping.wait(opts.pause)
                finally:
                    raw.close()
        except Exception as e:   # reported; the run goes on with the other clients
            self.error = f"{type(e).__name__}: {e}"

    def one_round(self, raw, bind, number):
        opts = self.rig.opts
        ending = ENDINGS[(number + self.index) % len(ENDINGS)]
        name = f"{self.rig.kind[0]}{self.index}"
        client = ChurnClient(self.rig.target, bind, ending, call_id=1 + (number * opts.calls) % 60000,
                             packets=opts.packets, calls=opts.calls, timeout=opts.timeout, interval=0.002,
                             name=name, linger=0.1)
        result = pptppeers.RoundResult(number)
        start = self.rig.soak.now()
        try:
            client._round(raw, result)
        except (OSError, pptp.PPTPError, gre.GREError, pptppeers.PeerError) as e:
            result.errors.append(f"{type(e).__name__}: {e}")
        own = f"synthetic {name} r"
        late = sum(1 for s in result.foreign_samples if own in s)
        return {"start": start, "end": self.rig.soak.now(), "ending": ending,
                "session": bool(result.start_reply and result.start_reply[0] == 1),
                "calls": len(result.call_ids), "sent": result.sent, "echoed": result.echoed,
                "foreign": result.foreign - late, "late": late, "duplicates": result.duplicates,
                "cleared": client.cleared, "errors": result.errors[:3]}


class ChurnClient(pptppeers.EchoClient):
    """The project's echo client with one of several endings (ENDINGS) instead of always
    clearing its calls: ``clear`` (Call-Clear-Request for each, then Stop-Control-Connection),
    ``stop`` (Stop-Control-Connection with the calls up), ``reset`` (a TCP reset), ``close``
    (a FIN with the calls up)."""

    def __init__(self, server, bind, ending, **options):
        super().__init__(server, bind, **options)
        self.ending, self.cleared = ending, 0

    def _tear_down(self, client, calls, result):
        if self.ending == "clear":
            errors = len(result.errors)
            super()._tear_down(client, calls, result)
            self.cleared = len(calls) if len(result.errors) == errors else 0
        elif self.ending == "stop":
            try:
                client.stop(self.timeout)
            except pptppeers.PeerError:
                result.errors.append("no Stop-Control-Connection-Reply")
        elif self.ending == "reset":
            client.vanish()
        # "close": EchoClient._round closes the socket


def summarize_rounds(rounds, windows):
    """Per slice: rounds, sessions, calls and GRE, clean (no trouble) and troubled."""
    out = {"rounds": len(rounds), "sessions": 0, "calls": 0, "cleared": 0, "endings": {},
           "clean_rounds": 0, "clean_errors": 0, "troubled_errors": 0, "error_samples": []}
    gre = {"sent": 0, "echoed": 0, "clean_sent": 0, "clean_lost": 0, "troubled_sent": 0, "troubled_lost": 0,
           "clean_foreign": 0, "troubled_foreign": 0, "late": 0, "duplicates": 0}
    for r in rounds:
        clean = not overlaps(r["start"], r["end"], windows)
        out["sessions"] += r["session"]
        out["calls"] += r["calls"]
        out["cleared"] += r["cleared"]
        out["endings"][r["ending"]] = out["endings"].get(r["ending"], 0) + 1
        lost = max(0, r["sent"] - r["echoed"])
        gre["sent"] += r["sent"]
        gre["echoed"] += r["echoed"]
        gre["late"] += r["late"]
        gre["duplicates"] += r["duplicates"]
        which = "clean" if clean else "troubled"
        gre[f"{which}_sent"] += r["sent"]
        gre[f"{which}_lost"] += lost
        gre[f"{which}_foreign"] += r["foreign"]
        out["clean_rounds"] += clean
        if r["errors"]:
            out[f"{which}_errors"] += 1
            if clean and len(out["error_samples"]) < 5:
                out["error_samples"].append(r["errors"][0])
    return out, gre


class Soak:
    """The whole run: rigs, slices, cuts, samples, the report."""

    def __init__(self, opts, log=print):
        self.opts, self.log = opts, log
        self.t0 = time.monotonic()
        self.deaths, self.harness_problems = [], []
        self.rigs = {}
        self.slices = []
        self.machine = machine()   # the commit and load the run started with

    def now(self):
        return time.monotonic() - self.t0

    def run(self):
        opts = self.opts
        netns.reap_stale()
        lab = netns.NetnsLab()
        try:
            for kind in opts.capture:
                self.log(f"soak: starting the {kind} topology ({opts.clients} clients)")
                self.rigs[kind] = Rig(self, lab, kind)
            for rig in self.rigs.values():
                for name in ("lrp", "rrp"):
                    rig.sample(name, "quiet")
            total = opts.minutes * 60
            count = max(len(opts.capture), round(total / opts.slice))
            length = total / count
            for index in range(count):
                rig = self.rigs[opts.capture[index % len(opts.capture)]]
                try:
                    self.one_slice(index, rig, length)
                except Exception:   # the harness (or a daemon that would not restart): reported
                    self.harness_problems.append(f"slice {index + 1} ({rig.kind}): {traceback.format_exc()[-3000:]}")
                    self.log(f"soak: slice {index + 1} broke off:\n{traceback.format_exc()}")
                    break
                if self.deaths and not opts.keep_going:
                    self.log("soak: a daemon died; stopping early")
                    break
            return self.report()
        finally:
            for rig in self.rigs.values():
                if opts.logs:
                    with contextlib.suppress(OSError):
                        keep = os.path.join(opts.logs, rig.kind)
                        os.makedirs(keep, exist_ok=True)
                        for name in os.listdir(rig.topo.workdir):
                            if name.endswith((".log", ".out", ".status.json")) or ".log." in name:
                                shutil.copy(os.path.join(rig.topo.workdir, name), keep)
                with contextlib.suppress(Exception):
                    rig.topo.cleanup()
            lab.cleanup()

    def one_slice(self, index, rig, length):
        opts = self.opts
        start = self.now()
        self.log(f"soak: slice {index + 1}: {rig.kind} for {length:.0f} s (t={start:.0f} s)")
        workers = [ClientWorker(rig, i) for i in range(opts.clients)]
        for worker in workers:
            worker.start()
        sampler_stop = threading.Event()

        def sampler():
            while not sampler_stop.wait(opts.sample_every):
                rig.check_alive()
                for name in ("lrp", "rrp"):
                    if not rig.restarting:
                        rig.sample(name, "busy")

        sampling = threading.Thread(target=sampler, daemon=True)
        sampling.start()
        end = start + length
        cuts = []
        busy0 = rig.busy
        while self.now() < end - 1:
            loaded = busy0 + self.now() - start
            # a cut is due every --cut-every s of load (the cut's own time included), not in
            # the first 2 s of a slice (the clients get going) nor in its last seconds
            if opts.cut_every and opts.cuts and loaded >= rig.next_cut and self.now() - start >= 2 \
                    and self.now() < end - opts.cut_length - 3:
                what = opts.cuts[len(rig.cuts) % len(opts.cuts)]
                self.log(f"soak:   {rig.kind}: cut ({what}) at t={self.now():.0f} s")
                cuts.append(rig.cut(what))
                rig.next_cut = busy0 + self.now() - start + opts.cut_every
                continue
            time.sleep(max(0.0, min(0.5, end - self.now())))
        rig.busy = busy0 + self.now() - start
        for worker in workers:
            worker.stopping.set()
        for worker in workers:
            worker.join(opts.timeout * (opts.calls + 4) + 30)
        sampler_stop.set()
        sampling.join(30)
        busy_end = self.now()
        rig.check_alive()
        settled, seen = rig.settle(opts.settle)
        server = rig.server_status()
        for other in self.rigs.values():
            for name in ("lrp", "rrp"):
                other.sample(name, "quiet", settled=settled if other is rig else True)
        rounds = [r for w in workers for r in w.rounds]
        windows = rig.windows()
        summary, gre = summarize_rounds(rounds, windows)
        calm = 0
        for name in ("lrp", "rrp"):
            for inc in rig.incarnations[name]:
                samples = [s for s in inc.samples if start - opts.sample_every <= s["t"] and "drops" in s]
                calm += calm_drops(samples, windows)
        gre["counted_calm"] = calm
        gre["counted"] = 0
        for name in ("lrp", "rrp"):
            for inc in rig.incarnations[name]:
                samples = [s for s in inc.samples if start - opts.sample_every <= s["t"] and "drops" in s]
                if len(samples) > 1:
                    gre["counted"] += max(0, counted_drops(samples[-1]) - counted_drops(samples[0]))
        gre["server_dropped"] = max(0, (server.get("dropped") or 0) - rig.server_dropped)
        rig.server_dropped = server.get("dropped") or rig.server_dropped
        piece = {"index": index + 1, "kind": rig.kind, "start": start, "busy_end": busy_end, "end": self.now(),
                 "rounds": summary, "gre": gre, "cuts": cuts, "settled": settled,
                 "unsettled": None if settled else seen, "server": server,
                 "worker_errors": [w.error for w in workers if w.error]
                 + [f"{w.name} did not finish its round" for w in workers if w.is_alive()]}
        self.harness_problems += piece["worker_errors"]
        self.slices.append(piece)
        self.log(f"soak:   {rig.kind}: {summary['rounds']} rounds, {summary['sessions']} sessions, "
                 f"{summary['calls']} calls, GRE {gre['echoed']}/{gre['sent']} echoed "
                 f"(clean lost {gre['clean_lost']}, troubled lost {gre['troubled_lost']}, counted calm {calm}), "
                 f"{len(cuts)} cut(s), settled={settled}")

    def report(self):
        for rig in self.rigs.values():
            rig.check_alive()
        return {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": dict(self.machine, load_after=os.getloadavg()),
            "options": {k: v for k, v in vars(self.opts).items() if k not in ("check",)},
            "seconds": self.now(),
            "deaths": self.deaths,
            "harness_problems": self.harness_problems,
            "daemons": {kind: {name: [inc.as_dict() for inc in incs] for name, incs in rig.incarnations.items()}
                        for kind, rig in self.rigs.items()},
            "cuts": {kind: rig.cuts for kind, rig in self.rigs.items()},
            "slices": self.slices,
        }


def machine():
    def commit():
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        try:
            head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no", "routeproxy"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        return head + ("+dirty" if dirty else "") if head else None
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "load": os.getloadavg(), "commit": commit(),
            "daemon_repo": os.environ.get("ROUTEPROXY_DAEMON_REPO")}


# --------------------------------------------------------------------------------------------
# the table


def kind_summary(report, kind, limits):
    """The figures of one capture kind for the table."""
    slices = [s for s in report["slices"] if s["kind"] == kind]
    out = {"minutes": sum(s["busy_end"] - s["start"] for s in slices) / 60, "slices": len(slices)}
    for key in ("rounds", "sessions", "calls", "cleared", "clean_rounds"):
        out[key] = sum(s["rounds"][key] for s in slices)
    for key in ("sent", "echoed", "clean_sent", "clean_lost", "troubled_sent", "troubled_lost", "clean_foreign",
                "troubled_foreign", "late", "duplicates", "counted_calm", "counted", "server_dropped"):
        out[key] = sum(s["gre"].get(key, 0) for s in slices)
    cuts = report["cuts"].get(kind, [])
    out["cuts"] = {}
    for c in cuts:
        out["cuts"][c["kind"]] = out["cuts"].get(c["kind"], 0) + 1
    for key in ("resumes_done", "resumes_refused", "sessions_resumed", "sessions_expired"):
        out[key] = sum(c.get(key, 0) for c in cuts)
    out["daemons"] = {}
    out["ledger"] = None
    for name, incs in report["daemons"].get(kind, {}).items():
        first, last = incs[0], incs[-1]
        q_last = quiet(last["samples"])
        # RSS and descriptors of one process: the last, or (restarted) the longest-lived one
        # with a verdict, so that start, warm-up and end are the same process's
        chosen = len(incs) - 1
        rate, growth, warm, _ = rss_verdict(last, limits, len(incs) == 1)
        if rate is None and len(incs) > 1:
            judged = [(rss_verdict(inc, limits, n == 0), n) for n, inc in enumerate(incs)]
            judged = [(v, n) for v, n in judged if v[0] is not None]
            if judged:
                (rate, growth, warm, _), chosen = max(
                    judged, key=lambda p: incs[p[1]]["samples"][-1]["t"] - incs[p[1]]["started"])
        q_chosen = quiet(incs[chosen]["samples"])
        every = [s for inc in incs for s in inc["samples"]]
        totals = {}
        for inc in incs:   # counters of every incarnation: the last sample of each
            with_totals = [s for s in inc["samples"] if s.get("totals")]
            if with_totals:
                for key, value in with_totals[-1]["totals"].items():
                    totals[key] = totals.get(key, 0) + value
        drops = {}
        for inc in incs:
            with_drops = [s for s in inc["samples"] if "drops" in s]
            if with_drops:
                for key, value in {**with_drops[-1]["drops"],
                                   **{f"port:{k}": v for k, v in with_drops[-1]["port_dropped"].items()}}.items():
                    drops[key] = drops.get(key, 0) + value
        ends = [s for s in q_last if "calls" in s]
        end = ends[-1] if ends else {}
        out["daemons"][name] = {
            "incarnations": len(incs),
            "rss_process": chosen + 1,
            "rss_process_minutes": ((q_chosen[-1]["t"] - incs[chosen]["started"]) / 60) if q_chosen else None,
            "rss_start": q_chosen[0]["rss_kib"] if q_chosen else None,
            "rss_warm": warm["rss_kib"] if warm else None,
            "rss_end": q_chosen[-1]["rss_kib"] if q_chosen else None,
            "rss_max": max((s.get("rss_kib") or 0 for s in incs[chosen]["samples"]), default=None),
            "rss_growth_mib_h": rate, "rss_growth_mib": growth,
            "heap_start": q_chosen[0].get("heap_kib") if q_chosen else None,
            "heap_end": q_chosen[-1].get("heap_kib") if q_chosen else None,
            "anon_start": q_chosen[0].get("anon_kib") if q_chosen else None,
            "anon_end": q_chosen[-1].get("anon_kib") if q_chosen else None,
            "fds_start": q_chosen[0].get("fds") if q_chosen else None,
            "fds_end": q_chosen[-1].get("fds") if q_chosen else None,
            "fds_max": max((s.get("fds") or 0 for s in incs[chosen]["samples"]), default=None),
            "entries_end": None if end.get("native_entries") is None else
            (end.get("native_entries") or 0) + (end.get("link_entries") or 0),
            "entries_max_busy": None if end.get("native_entries") is None else
            max(((s.get("native_entries") or 0) + (s.get("link_entries") or 0) for s in every), default=0),
            "calls_end": end.get("calls"), "totals": totals, "drops": drops,
            "native_framed": sum(([s for s in i["samples"] if s.get("native_framed") is not None] or [{}])[-1]
                                 .get("native_framed") or 0 for i in incs),
            "link_sent_by_c": sum(([s for s in i["samples"] if s.get("link_sent_by_c") is not None] or [{}])[-1]
                                  .get("link_sent_by_c") or 0 for i in incs),
        }
    lrp = out["daemons"].get("lrp")
    if lrp and lrp["incarnations"] == 1 and lrp["totals"]:
        # Every GRE a client sent reaches the LRP (one veth) and is counted there: in a
        # session's gre_packets_in, or dropped before one (the GRE port's and gredemux's reasons).
        before = sum(v for k, v in lrp["drops"].items() if k.startswith("port:") or k in PRE_SESSION_DROPS)
        got = out["echoed"] + out["late"] + out.get("duplicates", 0)
        out["ledger"] = {"clients_sent": out["sent"], "lrp_in": lrp["totals"].get("gre_packets_in", 0),
                         "lrp_dropped_before": before,
                         "in_difference": out["sent"] - lrp["totals"].get("gre_packets_in", 0) - before,
                         "lrp_out": lrp["totals"].get("gre_packets_out", 0), "clients_got": got,
                         "out_difference": lrp["totals"].get("gre_packets_out", 0) - got}
    return out


def _v(value, spec="d"):
    if value is None:
        return "-"
    return format(value, spec)


def table(report, limits):
    kinds = list(report["daemons"])
    sums = {kind: kind_summary(report, kind, limits) for kind in kinds}
    rows = []

    def row(label, fn):
        rows.append((label, [fn(sums[k]) for k in kinds]))

    def mib(v):
        return "-" if v is None else f"{v / 1024:.1f}"

    row("minutes loaded (slices)", lambda s: f"{s['minutes']:.1f} ({s['slices']})")
    row("client rounds (clean)", lambda s: f"{s['rounds']} ({s['clean_rounds']})")
    row("sessions opened and closed (of rounds)", lambda s: f"{s['sessions']} ({s['rounds']})")
    row("calls opened and closed / of them by Call-Clear", lambda s: f"{s['calls']} / {s['cleared']}")
    row("GRE sent / echoed", lambda s: f"{s['sent']} / {s['echoed']}")
    row("GRE lost: clean rounds / rounds with link trouble", lambda s: f"{s['clean_lost']} / {s['troubled_lost']}")
    row("GRE drops counted: all / outside trouble (+ server's)",
        lambda s: f"{s['counted']} / {s['counted_calm']} (+ {s['server_dropped']})")
    row("foreign GRE: clean / trouble (late own echoes)",
        lambda s: f"{s['clean_foreign']} / {s['troubled_foreign']} ({s['late']})")
    row("cuts", lambda s: ", ".join(f"{k} {v}" for k, v in sorted(s["cuts"].items())) or "-")
    row("LRP resumes done / refused; sessions resumed / expired",
        lambda s: f"{s['resumes_done']} / {s['resumes_refused']}; {s['sessions_resumed']} / {s['sessions_expired']}")
    row("LRP ledger: clients sent = LRP in + dropped before a session",
        lambda s: "-" if not s["ledger"] else
        f"{s['ledger']['clients_sent']} = {s['ledger']['lrp_in']} + {s['ledger']['lrp_dropped_before']}"
        + ("" if not s["ledger"]["in_difference"] else f" ({s['ledger']['in_difference']:+d})"))
    row("LRP ledger: LRP out / clients got (not seen by them)",
        lambda s: "-" if not s["ledger"] else
        f"{s['ledger']['lrp_out']} / {s['ledger']['clients_got']} ({s['ledger']['out_difference']})")
    for name in ("lrp", "rrp"):
        label = name.upper()
        row(f"{label} processes (the one in the rows below: its life, min)",
            lambda s: f"{s['daemons'][name]['incarnations']} (#{s['daemons'][name]['rss_process']}: "
                      f"{_v(s['daemons'][name]['rss_process_minutes'], '.1f')})")
        row(f"{label} RSS MiB start / after warm-up / end (max)",
            lambda s: " / ".join(mib(s["daemons"][name][k]) for k in ("rss_start", "rss_warm", "rss_end"))
            + f" ({mib(s['daemons'][name]['rss_max'])})")
        row(f"{label} RSS growth after warm-up, MiB/h (MiB)",
            lambda s: "-" if s["daemons"][name]["rss_growth_mib_h"] is None else
            f"{s['daemons'][name]['rss_growth_mib_h']:+.1f} ({s['daemons'][name]['rss_growth_mib']:+.2f})")
        row(f"{label} of RSS, MiB start -> end: C heap ([heap]) / other anonymous",
            lambda s: f"{mib(s['daemons'][name].get('heap_start'))} -> {mib(s['daemons'][name].get('heap_end'))} / "
                      f"{mib(s['daemons'][name].get('anon_start'))} -> {mib(s['daemons'][name].get('anon_end'))}")
        row(f"{label} fds start / end (max)",
            lambda s: f"{_v(s['daemons'][name]['fds_start'])} / {_v(s['daemons'][name]['fds_end'])} "
                      f"({_v(s['daemons'][name]['fds_max'])})")
        row(f"{label} flow entries left at the end (max while busy)",
            lambda s: f"{_v(s['daemons'][name]['entries_end'])} ({_v(s['daemons'][name]['entries_max_busy'])})")
        row(f"{label} GRE in / out (totals)",
            lambda s: f"{s['daemons'][name]['totals'].get('gre_packets_in', '-')} / "
                      f"{s['daemons'][name]['totals'].get('gre_packets_out', '-')}")
        row(f"{label} sessions ended (totals)", lambda s: _v(s["daemons"][name]["totals"].get("sessions_ended")))
        row(f"{label} drops by reason",
            lambda s: ", ".join(f"{k} {v}" for k, v in sorted(s["daemons"][name]["drops"].items())) or "0")
        row(f"{label} GRE framed by C / sent by C",
            lambda s: "-" if s["daemons"][name]["entries_end"] is None else
            f"{s['daemons'][name]['native_framed']} / {s['daemons'][name]['link_sent_by_c']}")
    width = max(len(label) for label, _ in rows)
    lines = [f"| {'':{width}} | " + " | ".join(kinds) + " |", f"|{'-' * (width + 2)}|" + "|".join("---" for _ in kinds) + "|"]
    for label, cells in rows:
        lines.append(f"| {label:{width}} | " + " | ".join(cells) + " |")
    return "\n".join(lines), sums


# --------------------------------------------------------------------------------------------
# the command


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=2.0, help="minutes of load in all [default: 2]")
    p.add_argument("--clients", type=int, default=8, help="client slots per kind [default: 8]")
    p.add_argument("--calls", type=int, default=3, help="calls per session [default: 3]")
    p.add_argument("--packets", type=int, default=20, help="GRE packets per call each way [default: 20]")
    p.add_argument("--pause", type=float, default=0.2, help="seconds between a client's sessions [default: 0.2]")
    p.add_argument("--timeout", type=float, default=4.0, help="a client's wait for a reply or echoes [default: 4]")
    p.add_argument("--capture", action="append", choices=("native", "native-raw", "pcap", "raw"),
                   help="a capture kind to soak (repeatable; default: native and pcap, alternating)")
    p.add_argument("--slice", type=float, default=30.0, help="seconds per slice of one kind [default: 30]")
    p.add_argument("--cut-every", type=float, default=20.0,
                   help="seconds of load between link troubles, per kind (0: none) [default: 20]")
    p.add_argument("--cuts", default=DEFAULT_CUTS,
                   help=f"the link troubles in turn, from {', '.join(CUT_KINDS)} [default: {DEFAULT_CUTS}]")
    p.add_argument("--cut-length", type=float, default=1.0, help="seconds a reset lasts / an RRP stays down [default: 1]")
    p.add_argument("--resume-grace", type=float, default=3.0, help="the daemons' --resume-grace [default: 3]")
    p.add_argument("--sample-every", type=float, default=2.0, help="seconds between busy samples [default: 2]")
    p.add_argument("--settle", type=float, default=20.0,
                   help="seconds the daemons get to drop every session after the clients stop [default: 20]")
    p.add_argument("--keep-going", action="store_true", help="go on after a daemon died")
    p.add_argument("--out", help="the report (JSON) [default: soak-DATE.json in the temporary directory]")
    p.add_argument("--logs", metavar="DIR",
                   help="keep the daemons' and the server's logs here [default: the report's name + .logs]")
    p.add_argument("--check", metavar="REPORT", help="judge a saved report again (with the thresholds given)")
    p.add_argument("--rss-growth", type=float, default=24.0,
                   help="FAIL when a daemon's RSS grows faster than this many MiB/h after warm-up ... [default: 24]")
    p.add_argument("--rss-slack", type=float, default=3.0, help="... and by more than this many MiB [default: 3]")
    p.add_argument("--fd-slack", type=int, default=8, help="FAIL when descriptors grow by more [default: 8]")
    p.add_argument("--warmup", type=float, help="seconds not judged for RSS [default: a quarter of the run, 20-300]")
    p.add_argument("--rewarmup", type=float, default=60.0,
                   help="seconds not judged for RSS after an RRP restart (at most --warmup) [default: 60]")
    p.add_argument("--min-span", type=float, default=60.0,
                   help="seconds of quiet samples after warm-up needed for an RSS verdict [default: 60]")
    return p


def limits_from(args, minutes):
    return Limits(rss_growth=args.rss_growth, rss_slack=args.rss_slack, fd_slack=args.fd_slack,
                  warmup=args.warmup if args.warmup is not None else default_warmup(minutes),
                  min_span=args.min_span, rewarmup=args.rewarmup)


def finish(report, limits, out=None, log=print):
    """Judge, print the table and the FAIL lines, write the report; the exit status."""
    report["limits"] = limits.as_dict()
    text, sums = table(report, limits)
    report["summary"] = sums
    failures = evaluate(report, limits)
    report["failures"] = failures
    report["ok"] = not failures
    log(text)
    for line in failures:
        log(line)
    log("soak: " + ("PASS" if not failures else f"{len(failures)} check(s) failed"))
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1, default=str)
        log(f"soak: report written to {out}" + (f", logs in {report['options']['logs']}"
                                                 if report.get("options", {}).get("logs") else ""))
    return 0 if not failures else 1


def main(argv=None):
    args = build_parser().parse_args(argv)
    log = lambda text: print(text, flush=True)  # noqa: E731
    if args.check:
        with open(args.check) as f:
            report = json.load(f)
        minutes = report.get("options", {}).get("minutes", args.minutes)
        return finish(report, limits_from(args, minutes), None, log)
    if os.geteuid() != 0:
        sys.stderr.write("soak: needs root (network namespaces, raw sockets)\n")
        return 2
    args.capture = args.capture or ["native", "pcap"]
    args.cuts = [c.strip() for c in args.cuts.split(",") if c.strip()]
    bad = [c for c in args.cuts if c not in CUT_KINDS]
    if bad:
        sys.stderr.write(f"soak: unknown cut kind(s) {bad}; choose from {CUT_KINDS}\n")
        return 2
    if "native" in args.capture:
        from routeproxy import native
        module, reason = native.load()
        if module is None:
            sys.stderr.write(f"soak: --capture native: {reason} (build it: python -m routeproxy.native.build)\n")
            return 2
    missing = netns.unavailable_reason() or daemons.daemons_missing()
    if missing:
        sys.stderr.write(f"soak: {missing}\n")
        return 2
    out = args.out or os.path.join(tempfile.gettempdir(),
                                   f"soak-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    if args.logs is None:
        args.logs = os.path.splitext(out)[0] + ".logs"
    from benchmarks.topology import raise_fd_limit
    raise_fd_limit()
    report = Soak(args, log).run()
    return finish(report, limits_from(args, args.minutes), out, log)


if __name__ == "__main__":
    sys.exit(main())
