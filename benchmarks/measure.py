"""One measurement (a sink and senders in namespaces) and the search for the loss-free rate.

Every path under test (veth alone, kernel router, kernel NAT, the proxies) is described by a
:class:`Path`: where the senders run, where the sink runs, and the destination address and
GRE call IDs the senders use.  :func:`run_trial` runs the sink and the senders as separate
processes (``benchmarks/loadgen.c``, or ``python -m benchmarks.loadgen``: benchmarks.instrument
chooses) in those namespaces and returns offered and delivered rates, loss and latency, and
what the instruments themselves cost; :func:`find_max_rate` searches the rates for the highest
one with less than 0.1 % loss.
"""
import json
import os
import resource
import signal
import subprocess

from benchmarks import instrument
from benchmarks.loadgen import Link, new_run_id
from tests.support.daemons import REPO, child_env

LOSS_LIMIT = 0.001
QUIET = 0.2       # s without a packet at the sink: the path is empty (before and after a trial)
ATTEMPTS = 3      # a trial that received more than it sent is rejected and run again


class MeasureError(Exception):
    """A sink or sender process failed; the message carries its stderr."""


class Path:
    """Where traffic is sent from and to: senders, and the namespace(s) where sinks count it.

    *senders* is a list of ``(namespace, destination address, [GRE call IDs], Link or None)``;
    each becomes one sender process sharing the rate equally (a Link: Ethernet frames on that
    interface, else the raw IP socket).  *label* names the path in the results.
    """

    def __init__(self, label, senders, sink_ns):
        self.label, self.senders = label, list(senders)
        self.sinks = [sink_ns] if isinstance(sink_ns, str) else list(sink_ns)
        self.legs = []   # the Paths a both() Path is made of: run_trial reports each apart

    def __repr__(self):
        return f"<Path {self.label}: {self.senders} -> {self.sinks}>"

    @staticmethod
    def both(label, *paths):
        """Every sender and sink of *paths* at once (both directions together).  Its trials
        carry one run number (the trial's marker) for all of them and report each path's own
        sent, received and latency as ``legs``, in the order of *paths*."""
        senders = [s for p in paths for s in p.senders]
        sinks = [ns for p in paths for ns in p.sinks]
        path = Path(label, senders, sinks)
        path.legs = list(paths)
        return path


def link_from(lab, veth, side="a"):
    """A loadgen Link that sends out of *veth*'s end *side* ("a" or "b") to the other end."""
    ns, name, ip = (veth.ns_a, veth.name_a, veth.ip_a) if side == "a" else (veth.ns_b, veth.name_b, veth.ip_b)
    peer_ns, peer = (veth.ns_b, veth.name_b) if side == "a" else (veth.ns_a, veth.name_a)
    src_mac = lab.run(ns, ["cat", f"/sys/class/net/{name}/address"]).stdout.strip()
    dst_mac = lab.run(peer_ns, ["cat", f"/sys/class/net/{peer}/address"]).stdout.strip()
    return Link(name, ip, src_mac, dst_mac)


def _communicate(proc, timeout):
    """``proc.communicate()`` and the CPU seconds (user + system) *proc* used in all: what
    this process's reaped children's CPU grew by while it was reaped (nothing else is reaped
    meanwhile; ``ip netns exec`` execs the instrument, so the child is the instrument).  It
    includes the kernel path the instrument's packets take in its context (on veth: the next
    namespace's receive).  Not split into user and system: those are sampled at the tick (250
    Hz here), too coarse for processes that sleep between batches (perf is, with the
    instruments' names: loadgen-send, loadgen-sink)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out, err = proc.communicate(timeout=timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return out, err, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def _json_line(text, what):
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise MeasureError(f"{what} printed no result: {text[-500:]!r}")


def _merge_sinks(counts):
    """One sink result from several (their counts added; latency from the first with any)."""
    if len(counts) == 1:
        return dict(counts[0], drained=counts[0]["drain"]["drained"])
    merged = {"received": sum(c["received"] for c in counts), "bytes": sum(c["bytes"] for c in counts),
              "flows": sum(c["flows"] for c in counts), "other": sum(c["other"] for c in counts),
              "stale": sum(c["stale"] for c in counts),
              "drained": sum(c["drain"]["drained"] for c in counts),
              "per_flow_min": min(c["per_flow_min"] for c in counts),
              "per_sink": [{"received": c["received"], "flows": c["flows"]} for c in counts]}
    for c in counts:
        if c.get("latency_us", {}).get("count"):
            merged["latency_us"] = c["latency_us"]
            break
    return merged


CONFIRM_TRIES = 3  # reruns of a found maximum before it is reported unconfirmed


def run_trial(lab, path, size, rate, duration, latency=False, batch=None, quiet=QUIET):
    """Send *size*-byte GRE at *rate* pps (0: flat out) for *duration* s along *path*.

    Returns {offered_pps, delivered_pps, loss, mbps, sent, received, latency_us?, ...}.
    Loss counts every probe of this trial sent and not received, wherever it was dropped.
    Each trial has its own run number in its probes, starts once the path has been quiet for
    *quiet* s (an earlier trial's backlog drained and counted as ``drained``) and ends once
    it is quiet again; a trial that received more than it sent is rejected and run again
    (MeasureError after ATTEMPTS).  A path of several (``Path.both``) adds ``legs``: each
    one's own figures (its senders, its sinks; the same keys as the whole), and a trial is
    rejected if any leg received more than it sent.
    """
    rejected = []
    for _ in range(ATTEMPTS):
        got = _one_trial(lab, path, size, rate, duration, latency, batch, quiet)
        if all(part["received"] <= part["sent"] for part in [got, *got.get("legs", ())]):
            if rejected:
                got["rejected"] = rejected
            return got
        rejected.append({k: got[k] for k in ("run", "sent", "received", "stale")})
    raise MeasureError(f"{path.label} {size}B: every attempt received more than it sent: {rejected}")


def _one_trial(lab, path, size, rate, duration, latency, batch, quiet):
    run = new_run_id()
    engine = instrument.engine()
    sinks = []
    cpu = {"send": 0.0, "sink": 0.0}
    try:
        for ns in path.sinks:
            argv = ["sink", "--run", run, "--quiet", quiet] + (["--latency"] if latency else [])
            sink = lab.spawn(ns, instrument.argv(*argv, engine_name=engine),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=REPO)
            sinks.append(sink)
            ready = sink.stdout.readline()
            if not ready.startswith("ready"):
                raise MeasureError(f"sink did not start: {ready!r} {sink.stderr.read()[-800:]}")
        senders = []
        share = rate / len(path.senders) if rate else 0
        flow_base = 0
        for ns, dst, keys, link in path.senders:
            argv = ["send", "--dst", dst, "--size", size, "--rate", share, "--duration", duration,
                    "--keys", ",".join(map(str, keys)), "--flow-base", flow_base, "--run", run]
            if link is not None:
                argv += link.argv()
            if batch:
                argv += ["--batch", batch]
            flow_base += len(keys)
            senders.append(lab.spawn(ns, instrument.argv(*argv, engine_name=engine), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=child_env(), cwd=REPO))
        sent_results = []
        for proc in senders:
            out, err, seconds = _communicate(proc, duration + 30)
            cpu["send"] += seconds
            if proc.returncode != 0:
                raise MeasureError(f"sender failed (rc={proc.returncode}): {err[-800:]}")
            sent_results.append(_json_line(out, "sender"))
        counts = []  # each sink reads on until its path has been quiet (the trial's own tail)
        for sink in sinks:
            sink.send_signal(signal.SIGUSR1)
            out, err, seconds = _communicate(sink, 30)
            cpu["sink"] += seconds
            if sink.returncode != 0:
                raise MeasureError(f"sink failed (rc={sink.returncode}): {err[-800:]}")
            counts.append(_json_line(out, "sink"))
    finally:
        for sink in sinks:
            if sink.poll() is None:
                sink.kill()
    result = {"path": path.label, "size": size, "target_pps": rate, "duration": duration, "run": run,
              **_figures(sent_results, counts, latency), "load": os.getloadavg()[0]}
    result["instrument"] = _instrument_cost(engine, cpu, result["sent"], result["received"])
    if path.legs:
        result["legs"] = []
        flows = sender = sink = 0
        for leg in path.legs:
            mine = slice(sender, sender + len(leg.senders))
            width = sum(len(keys) for _, _, keys, _ in leg.senders)
            for count in counts[sink:sink + len(leg.sinks)]:
                if count["received"] and not flows <= count["flow_min"] <= count["flow_max"] < flows + width:
                    raise MeasureError(f"{leg.label}: a sink of this leg got another leg's probes "
                                       f"(flows {count['flow_min']}-{count['flow_max']}, its own "
                                       f"{flows}-{flows + width - 1})")
            result["legs"].append(_figures(sent_results[mine], counts[sink:sink + len(leg.sinks)], latency))
            flows, sender, sink = flows + width, mine.stop, sink + len(leg.sinks)
    return result


def _instrument_cost(engine, cpu, sent, received):
    """Which engine ran the instruments, and their CPU (s, and us per packet: the sender's per
    packet sent, the sink's per packet received)."""
    return {"engine": engine, "send_cpu_s": round(cpu["send"], 4), "sink_cpu_s": round(cpu["sink"], 4),
            "send_us_per_packet": round(cpu["send"] * 1e6 / sent, 3) if sent else None,
            "sink_us_per_packet": round(cpu["sink"] * 1e6 / received, 3) if received else None}


def _figures(sent_results, counts, latency):
    """Offered, delivered, loss (and latency) of these senders' results and sinks' counts."""
    got = _merge_sinks(counts)
    sent = sum(r["sent"] for r in sent_results)
    seconds = max(r["seconds"] for r in sent_results)
    received = got["received"]
    result = {
        "sent": sent, "received": received, "stale": got["stale"], "drained": got["drained"],
        "tail_seconds": max(c["tail_seconds"] for c in counts),
        "offered_pps": sent / seconds if seconds else 0.0,
        "delivered_pps": received / seconds if seconds else 0.0,
        "loss": (sent - received) / sent if sent else 1.0,
        "mbps": got["bytes"] * 8 / seconds / 1e6 if seconds else 0.0,
        "flows_seen": got["flows"], "per_flow_min": got["per_flow_min"], "other_gre": got["other"],
        "send_errors": sum(r["errors"] for r in sent_results),
    }
    if latency:
        result["latency_us"] = got.get("latency_us")
    if "per_sink" in got:
        result["per_sink"] = got["per_sink"]
    return result


def find_max_rate(lab, path, size, duration, steps=4, log=None, confirm=CONFIRM_TRIES,
                  trial_runner=None):
    """The highest rate (pps) with loss < 0.1 %, and the trials that found it.

    First a flat-out trial gives the ceiling (the generator's rate: if nothing is lost there,
    the path is faster than the generator and that is the answer).  Otherwise rates below what
    got through are tried, halving until one is loss-free, then bisecting between the best
    loss-free rate and the lowest lossy one, *steps* trials in all.  Then the rate found is run
    again: one lucky trial on a noisy machine is not a maximum (runs here lost 7.5 % and
    22.7 % when a found rate was rerun).  If the rerun loses, 10 % less is tried, *confirm*
    trials in all; the answer is the first that holds (``confirmed`` True) or, if none does,
    the search's own answer with ``confirmed`` False.  *trial_runner(rate)* replaces the real
    trial (tests).  Returns (best_trial, trials); best_trial is None if even the lowest tried
    rate lost more than 0.1 %.
    """
    trials = []
    run = trial_runner or (lambda rate: run_trial(lab, path, size, rate, duration))

    def trial(rate):
        got = run(rate)
        trials.append(got)
        if log:
            log(f"  {path.label} {size}B @ {rate or 'max'}: offered {got['offered_pps']:.0f} "
                f"delivered {got['delivered_pps']:.0f} pps, loss {got['loss'] * 100:.3f}% "
                f"(drained before {got['drained']}, tail {got['tail_seconds']:.2f} s, load {got['load']:.1f})")
        return got

    flat = trial(0)
    ceiling = flat["offered_pps"]
    if flat["loss"] < LOSS_LIMIT:
        return flat, trials
    best, low, high = None, 0.0, ceiling
    candidate = flat["delivered_pps"] * 0.9
    for _ in range(steps):
        if candidate < 1:
            break
        got = trial(candidate)
        if got["loss"] < LOSS_LIMIT:
            best, low = got, candidate
            if high - low < 0.03 * high:
                break
            candidate = (low + high) / 2
        else:
            high = candidate
            # Nothing loss-free yet: step down fast, below what actually got through.
            candidate = (low + high) / 2 if best else min(candidate / 2, got["delivered_pps"] * 0.8)
    return _confirmed(best, trial, confirm), trials


def _confirmed(best, trial, tries):
    """*best* if its rate holds again, else the first of the rates 10 % apart below it that
    holds (*tries* trials in all)."""
    if best is None or not best["target_pps"]:
        return best
    rate = best["target_pps"]
    for _ in range(tries):
        again = trial(rate)
        if again["loss"] < LOSS_LIMIT:
            held = again if rate != best["target_pps"] else best
            return dict(held, confirmed=True)
        rate *= 0.9
    return dict(best, confirmed=False)


def latency_profile(lab, path, size, max_rate, duration, fractions=(0.1, 0.5, 0.9), log=None):
    """Latency (one-way, us) at each fraction of *max_rate*: {"10%": trial, ...}."""
    profile = {}
    for fraction in fractions:
        got = run_trial(lab, path, size, max_rate * fraction, duration, latency=True, batch=8)
        profile[f"{fraction * 100:.0f}%"] = got
        if log and got.get("latency_us"):
            lat = got["latency_us"]
            log(f"  {path.label} {size}B @ {fraction:.0%} ({max_rate * fraction:.0f} pps): "
                f"p50 {lat.get('p50', 0):.1f} p99 {lat.get('p99', 0):.1f} p99.9 {lat.get('p99.9', 0):.1f} us, "
                f"loss {got['loss'] * 100:.3f}% (drained before {got['drained']}, load {got['load']:.1f})")
    return profile
