"""`python -m routeproxy demo` (`make demo`): the problem, then the product, with real PPTP.

Inside user-mode Linux (docs/lab.md), 4 real pptp-linux clients dial a real pptpd:

1. straight through a NAT without a PPTP helper that drops GRE: none connects;
2. through LRP -> the same NAT -> RRP: all connect, ping the server, move data whose sha256
   matches on the far side, and one hangs up and dials again while the others carry on.

Each run prints its session table.  Options are the lab's defaults; run
`python -m routeproxy lab --help` for more.
"""
import sys

from routeproxy.lab import cli, uml

CLIENTS = 4
TRANSFER_MB = 2


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv:   # the demo takes no options; --help (or anything) never starts the lab
        out = sys.stdout if argv[0] in ("-h", "--help") else sys.stderr
        out.write("usage: python -m routeproxy demo\n\n" + __doc__.split("\n\n", 1)[1])
        return 0 if out is sys.stdout else 2
    reason = uml.uml_available()
    if reason:
        sys.stderr.write(f"routeproxy demo: cannot run the lab: {reason}\n")
        return 2
    print(f"1/2  {CLIENTS} PPTP clients straight through a NAT that has no PPTP helper "
          "(and drops GRE):", flush=True)
    baseline = cli.run_lab("nat", CLIENTS)
    print(cli.format_table(baseline) + "\n", flush=True)
    print(f"2/2  the same clients through LRP -> NAT -> RRP -> pptpd, {TRANSFER_MB} MB each, "
          "one client hangs up and redials:", flush=True)
    proxied = cli.run_lab("proxy", CLIENTS, transfer_mb=TRANSFER_MB, hangup=True)
    print(cli.format_table(proxied), flush=True)
    ok = (proxied.connected == CLIENTS and proxied.pinged == CLIENTS
          and len(proxied.transfers_ok()) == CLIENTS and proxied.hangup_ok())
    print(f"\nwithout routeproxy: {baseline.connected} of {CLIENTS} connected; "
          f"with routeproxy: {proxied.connected} of {CLIENTS} connected, "
          f"{len(proxied.transfers_ok())} transfers intact: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1
