"""`python -m routeproxy COMMAND ...`: the tools that are not daemons.

The daemons themselves run under twistd (`twistd -n routeproxy-lrp`, `twistd -n
routeproxy-rrp`); this entry point hosts the helpers around them.
"""
import importlib
import sys

# command -> (module with main(argv) -> int, one-line help)
COMMANDS = {
    "demo": ("routeproxy.demo", "run the demo: 4 clients through a plain NAT, then through LRP and RRP"),
    "certs": ("routeproxy.certs", "write a private CA and LRP/RRP certificates for a lab"),
    "lab": ("routeproxy.lab", "bring up the PPTP lab with real clients and pptpd"),
    "status": ("routeproxy.statuscli", "print a daemon's sessions from its --status endpoint"),
}


def usage(out):
    out.write("usage: python -m routeproxy COMMAND [options]\n\ncommands:\n")
    for name, (_, text) in sorted(COMMANDS.items()):
        out.write(f"  {name:8} {text}\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        usage(sys.stdout)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"routeproxy: unknown command {name!r}\n")
        usage(sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
