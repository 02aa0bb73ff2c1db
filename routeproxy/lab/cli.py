"""`python -m routeproxy lab`: bring the lab up in UML, print the session table, tear down.

Teardown is the UML kernel powering off (every namespace, daemon and tmpfs
dies with it); a UML that hangs is killed from the host after --timeout.
"""
import argparse
import shlex
import sys

from routeproxy.lab import topology, uml


class LabRun:
    """One lab run's outcome: per-client rows, transfers, timings, raw output."""

    def __init__(self, mode, clients, result, calls_per_client=1):
        self.mode = mode
        self.clients = clients
        self.calls_per_client = calls_per_client
        self.tunnels = clients * calls_per_client
        self.result = result
        self.rows, self.transfers, self.times = topology.parse_results(result.output)
        self.sessions = topology.parse_sessions(result.output)
        self.hangup = topology.parse_hangup(result.output)
        self.cut = topology.parse_cut(result.output)
        self.cpu = topology.parse_cpu(result.output)   # the proxy daemons' CPU over the transfer
        self.proc = topology.parse_proc(result.output)   # their user/system split, faults, switches
        self.status = topology.parse_status(result.output)   # their status after it
        self.tcp = topology.parse_tcp(result.output)   # TCP's counters over it, per namespace
        self.gre_order = topology.parse_gre_order(result.output)   # pptp-linux's reorder log
        self.ping_load = topology.parse_ping_load(result.output)   # c1's pings meanwhile (ms)

    def cut_ok(self):
        """The link was cut and resumed: every pppd is the one from before, and each pings."""
        c = self.cut
        if not c:
            return False
        return (c.get("pppd_before") == c.get("pppd_after") and "," in c.get("pppd_before", "")
                and c.get("pinged_after") == str(self.tunnels) and c.get("resumed", "0") != "0")

    def hangup_ok(self):
        """Client 1 (its first pppd) hung up: pptpd lost exactly its call, the others kept
        pinging, it dialled again and pinged; in proxy modes with one call per client the LRP
        logged its session closed (with more, the client's control connection stays up)."""
        h = self.hangup
        if not h:
            return False
        try:
            freed = int(h["pptpd_calls_before"]) - int(h["pptpd_calls_after"]) == 1
        except (KeyError, ValueError):
            return False
        logged = (self.mode not in topology.PROXY_MODES or self.calls_per_client > 1
                  or h.get("lrp_closed", "0") not in ("", "0"))
        return (freed and logged and h.get("others_ping") == "yes"
                and h.get("redial_addr", "-") != "-" and h.get("redial_ping") == "yes")

    @property
    def connected(self):
        return sum(1 for r in self.rows if r.get("connected") == "yes")

    @property
    def pinged(self):
        return sum(1 for r in self.rows if r.get("ping") == "yes")

    def transfers_ok(self):
        """Clients whose transfer arrived with the sha256 it was sent with."""
        return sorted(c for c, t in self.transfers.items()
                      if t.get("sent") not in (None, "-") and t.get("sent") == t.get("received"))


def run_lab(mode, clients, transfer_mb=0, connect_timeout=25, timeout=None, keep=False, mtu=None,
            hangup=False, calls_per_client=1, run=None, cut_link=0, proxy_options=(),
            rmem_default=None, link_rate=None):
    """Run the lab once; returns a LabRun.  Raises uml.UMLError when UML cannot run.

    *run* is ``uml.run_in_uml`` (a test passes its own)."""
    script = topology.build_script(mode, clients, transfer_mb=transfer_mb,
                                   connect_timeout=connect_timeout, mtu=mtu, hangup=hangup,
                                   calls_per_client=calls_per_client, cut_link=cut_link,
                                   rmem_default=rmem_default, link_rate=link_rate,
                                   proxy_options=proxy_options)
    tunnels = clients * calls_per_client
    if timeout is None:
        timeout = (60 + connect_timeout * (2 if hangup else 1) + tunnels * 5 + calls_per_client
                   + transfer_mb * tunnels * 3 + (cut_link + 15 if cut_link else 0))
    result = (run or uml.run_in_uml)(script, timeout=timeout, keep=keep,
                                     modules=topology.lab_modules(mode, cut_link, link_rate))
    return LabRun(mode, clients, result, calls_per_client)


def format_table(run):
    """The session table: one line per client."""
    per_client = f" ({run.calls_per_client} calls per client)" if run.calls_per_client > 1 else ""
    lines = [f"mode {run.mode}{per_client}: {run.connected} of {run.tunnels} connected, "
             f"{run.pinged} pinged {topology.PPP_SERVER}",
             f"{'client':8} {'connected':9} {'ppp address':15} {'ping':4} {'rtt ms':>7} "
             f"{'tx bytes':>9} {'rx bytes':>9} {'call IDs C/L R/S':17}  transfer"]
    for row in run.rows:
        try:
            session = run.sessions.get(topology.client_address(topology.tunnel_client(row["client"])))
        except (KeyError, ValueError):
            session = None
        ids = f"{session['C']}/{session['L']} {session['R']}/{session['S']}" if session else "-"
        if session and run.calls_per_client > 1:   # one control connection, several calls
            ids = f"C {','.join(session['calls'])}"
        transfer = run.transfers.get(row.get("client"))
        if transfer is None:
            note = "-"
        elif transfer.get("sent") not in (None, "-") and transfer.get("sent") == transfer.get("received"):
            mib = int(transfer.get("bytes") or 0) / 2 ** 20
            note = f"{mib:.0f} MiB, sha256 equal, {transfer.get('seconds')} s"
        else:
            note = (f"FAILED: {transfer.get('received_bytes', '-')} of {transfer.get('bytes', '-')} "
                    f"bytes arrived, sha256 {'equal' if transfer.get('sent') == transfer.get('received') else 'differs'}")
        lines.append(f"{row.get('client', '?'):8} {row.get('connected', '?'):9} "
                     f"{row.get('addr', '-'):15} {row.get('ping', '?'):4} {row.get('rtt', '-'):>7} "
                     f"{row.get('tx', '-'):>9} {row.get('rx', '-'):>9} {ids:17}  {note}")
    if run.hangup:
        h = run.hangup
        lines.append(f"hang-up of {h.get('client', 'c1')}: {'ok' if run.hangup_ok() else 'FAILED'} "
                     f"(pptpd calls {h.get('pptpd_calls_before')} -> {h.get('pptpd_calls_after')}, "
                     f"LRP closed {h.get('lrp_closed')}, RRP upstream connections closed "
                     f"{h.get('rrp_upstreams_closed', '-')}, others ping {h.get('others_ping')}, "
                     f"redial {h.get('redial_addr')} ping {h.get('redial_ping')})")
    if run.cut:
        c = run.cut
        lines.append(f"link cut {c.get('seconds')} s: {'ok' if run.cut_ok() else 'FAILED'} (pppd "
                     f"{'unchanged' if c.get('pppd_before') == c.get('pppd_after') else 'restarted'}, "
                     f"{c.get('pinged_after')} pinged after, LRP resumes {c.get('resumed')})")
    if run.ping_load:
        rtts = sorted(run.ping_load)
        lines.append(f"c1's pings during the transfer: {len(rtts)} replies, round trip p50 "
                     f"{rtts[len(rtts) // 2]:.1f} ms, max {rtts[-1]:.1f} ms")
    times = ", ".join(f"{k} {v:.1f}s" for k, v in run.times.items())
    lines.append(f"UML boot {run.result.boot_seconds:.1f}s, whole run {run.result.total_seconds:.1f}s"
                 + (f"; inside: {times}" if times else ""))
    return "\n".join(lines)


def parser():
    p = argparse.ArgumentParser(
        prog="routeproxy lab",
        description="Real pptp-linux clients dial real pptpd inside user-mode Linux "
                    "(see docs/lab.md).")
    p.add_argument("--clients", type=int, default=4, help="number of PPTP clients [4]")
    p.add_argument("--mode", choices=topology.MODES, default="proxy",
                   help="direct | nat (no helper, GRE dropped) | nat-helper | proxy | "
                        "proxy-colocated [proxy]")
    p.add_argument("--transfer-mb", type=int, default=0,
                   help="send this many MB over each tunnel and compare sha256 [0: none]")
    p.add_argument("--connect-timeout", type=int, default=25,
                   help="seconds the clients get to come up [25]")
    p.add_argument("--calls-per-client", type=int, default=1,
                   help="pppd per client host, sharing one pptp call manager: one control "
                        "connection carrying that many calls [1]")
    p.add_argument("--hangup", action="store_true",
                   help="after the pings, kill client 1's (first) pppd, check the rest, dial it again")
    p.add_argument("--cut-link", type=int, default=0, metavar="SECONDS",
                   help="proxy modes: 2 s into the transfer the NAT resets the LRP-RRP link's "
                        "TCP both ways for SECONDS; pass if every pppd survives [0: no cut]")
    p.add_argument("--mtu", type=int, default=None,
                   help="clients' PPP MTU and MRU [pppd's default, 1500]")
    p.add_argument("--timeout", type=int, default=None,
                   help="kill UML after this many seconds [depends on the run]")
    p.add_argument("--rmem-default", type=int, default=None, metavar="BYTES",
                   help="receive buffer of every socket that sizes none itself, pptpd's GRE "
                        "socket among them (a tuned server) [the kernel's default]")
    p.add_argument("--link-rate", type=float, default=None, metavar="MBIT",
                   help="the NAT's links send at most this many Mbit/s each way (tc tbf): a "
                        "slow path between the sites; with --transfer-mb, c1 pings through its "
                        "tunnel during the transfer (latency under load) [unlimited]")
    p.add_argument("--proxy-options", default="", metavar="OPTIONS",
                   help='more options for both daemons (proxy modes), e.g. "--link-queue-delay 0"')
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (logs of pppd, pptpd, daemons)")
    p.add_argument("--verbose", "-v", action="store_true", help="print the lab's raw output")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:   # a bad argument is said before asking whether UML can run at all
        topology.build_script(args.mode, args.clients, transfer_mb=args.transfer_mb, mtu=args.mtu,
                              calls_per_client=args.calls_per_client, cut_link=args.cut_link,
                              rmem_default=args.rmem_default, link_rate=args.link_rate,
                              proxy_options=shlex.split(args.proxy_options))
    except topology.LabScriptError as e:
        sys.stderr.write(f"routeproxy lab: {e}\n")
        return 2
    reason = uml.uml_available()
    if reason:
        sys.stderr.write(f"routeproxy lab: cannot run: {reason}\n")
        return 2
    try:
        run = run_lab(args.mode, args.clients, transfer_mb=args.transfer_mb,
                      connect_timeout=args.connect_timeout, timeout=args.timeout, keep=args.keep,
                      mtu=args.mtu, hangup=args.hangup, calls_per_client=args.calls_per_client,
                      cut_link=args.cut_link, rmem_default=args.rmem_default,
                      link_rate=args.link_rate, proxy_options=shlex.split(args.proxy_options))
    except topology.LabScriptError as e:
        sys.stderr.write(f"routeproxy lab: {e}\n")
        return 2
    except uml.UMLError as e:
        sys.stderr.write(f"routeproxy lab: {e}\n")
        output = getattr(e, "output", "")
        if output:
            sys.stderr.write(output + "\n")
        return 1
    if args.verbose:
        sys.stdout.write(run.result.output + "\n")
    print(format_table(run))
    if args.keep:
        print(f"work directory (logs): {run.result.work}")
    ok = run.connected == run.tunnels and run.pinged == run.tunnels
    if args.transfer_mb:
        ok = ok and len(run.transfers_ok()) == run.tunnels
    if args.hangup:
        ok = ok and run.hangup_ok()
    if args.cut_link:
        ok = ok and run.cut_ok()
    return 0 if ok else 1
